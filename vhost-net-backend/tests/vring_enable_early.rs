//! The requests third_party/vhost is patched for (see its CARDSIM-PATCH.md),
//! spoken as raw vhost-user to a real port of the card:
//! - QEMU's virtio-net sends SET_VRING_ENABLE before SET_FEATURES: the port
//!   must answer on the same connection afterwards (with the unpatched crate
//!   the card drops the connection and the next read finds it closed);
//! - NET_SET_MTU (QEMU's `host_mtu`): answered (REPLY_ACK) and in force, an
//!   impossible MTU refused without dropping the connection.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;
const NET_SET_MTU: u32 = 20;
const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const PROTOCOL_MQ: u64 = 1 << 0;
const PROTOCOL_REPLY_ACK: u64 = 1 << 3;
const PROTOCOL_NET_MTU: u64 = 1 << 4;

struct Card(Child);
impl Drop for Card {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_card(dir: &std::path::Path) -> (Card, std::path::PathBuf) {
    start_card_with(dir, &[])
}

fn start_card_with(dir: &std::path::Path, extra: &[&str]) -> (Card, std::path::PathBuf) {
    let socket = dir.join("eni-0a1.sock");
    let config = dir.join("vpc.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[vpc]
cidr = "10.0.0.0/16"
vni = 100
[[subnet]]
id = "subnet-a"
cidr = "10.0.1.0/24"
gateway = "10.0.1.1"
[[eni]]
id = "eni-0a1"
socket = "{}"
mac = "02:00:0a:00:01:0a"
ip = "10.0.1.10"
subnet = "subnet-a"
queue_pairs = 2
"#,
            socket.display()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_vhost-net-backend"))
        .arg("--config")
        .arg(&config)
        .args(extra)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let card = Card(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "card never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    (card, socket)
}

fn send(s: &mut UnixStream, request: u32, flags: u32, payload: &[u8]) {
    let mut msg = Vec::new();
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&(VERSION | flags).to_le_bytes());
    msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    msg.extend_from_slice(payload);
    s.write_all(&msg).unwrap();
}

/// Reads one reply to `request`; None if the card closed the connection.
fn reply(s: &mut UnixStream, request: u32) -> Option<u64> {
    let mut hdr = [0u8; 12];
    s.read_exact(&mut hdr).ok()?;
    let code = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
    let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
    let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
    assert_eq!(code, request);
    assert_ne!(flags & REPLY, 0);
    let mut body = vec![0u8; size];
    s.read_exact(&mut body).ok()?;
    Some(u64::from_le_bytes(body[..8].try_into().unwrap()))
}

fn vring_state(index: u32, num: u32) -> Vec<u8> {
    [index.to_le_bytes(), num.to_le_bytes()].concat()
}

#[test]
fn set_vring_enable_before_set_features_keeps_the_port() {
    let dir = tempfile::tempdir().unwrap();
    let (_card, socket) = start_card(dir.path());
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();

    send(&mut s, GET_FEATURES, 0, &[]);
    let features = reply(&mut s, GET_FEATURES).unwrap();
    assert_ne!(features & PROTOCOL_FEATURES, 0);
    send(&mut s, GET_PROTOCOL_FEATURES, 0, &[]);
    let protocol = reply(&mut s, GET_PROTOCOL_FEATURES).unwrap();
    assert_ne!(protocol & PROTOCOL_MQ, 0);
    let wanted = PROTOCOL_MQ | PROTOCOL_REPLY_ACK;
    send(&mut s, SET_PROTOCOL_FEATURES, 0, &wanted.to_le_bytes());
    send(&mut s, GET_QUEUE_NUM, 0, &[]);
    assert_eq!(reply(&mut s, GET_QUEUE_NUM), Some(4));
    send(&mut s, SET_OWNER, 0, &[]);

    // What QEMU's virtio-net does next: enable the queue pairs, before
    // SET_FEATURES. REPLY_ACK makes the card say how it went.
    for ring in 0..4 {
        send(&mut s, SET_VRING_ENABLE, NEED_REPLY, &vring_state(ring, 1));
        assert_eq!(
            reply(&mut s, SET_VRING_ENABLE),
            Some(0),
            "SET_VRING_ENABLE({ring}) before SET_FEATURES refused or connection dropped"
        );
    }
    // The port is still there on this connection.
    send(&mut s, GET_FEATURES, 0, &[]);
    assert_eq!(reply(&mut s, GET_FEATURES), Some(features));
    // SET_FEATURES then replays the early enables, successfully.
    send(&mut s, SET_FEATURES, NEED_REPLY, &features.to_le_bytes());
    assert_eq!(reply(&mut s, SET_FEATURES), Some(0));
    // And enabling after SET_FEATURES works as before.
    send(&mut s, SET_VRING_ENABLE, NEED_REPLY, &vring_state(1, 0));
    assert_eq!(reply(&mut s, SET_VRING_ENABLE), Some(0));
}

#[test]
fn an_out_of_range_ring_is_refused_without_ending_the_card() {
    let dir = tempfile::tempdir().unwrap();
    let (_card, socket) = start_card(dir.path());
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    send(&mut s, GET_FEATURES, 0, &[]);
    let features = reply(&mut s, GET_FEATURES).unwrap();
    send(
        &mut s,
        SET_PROTOCOL_FEATURES,
        0,
        &PROTOCOL_REPLY_ACK.to_le_bytes(),
    );
    send(&mut s, SET_OWNER, 0, &[]);
    // Ring 99 does not exist: accepted early, refused when replayed.
    send(&mut s, SET_VRING_ENABLE, NEED_REPLY, &vring_state(99, 1));
    assert_eq!(reply(&mut s, SET_VRING_ENABLE), Some(0));
    send(&mut s, SET_FEATURES, NEED_REPLY, &features.to_le_bytes());
    assert_eq!(reply(&mut s, SET_FEATURES), Some(1));
    drop(s);
    // The card serves the next connection.
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    send(&mut s, GET_FEATURES, 0, &[]);
    assert_eq!(reply(&mut s, GET_FEATURES), Some(features));
}

/// The MTU the port is using, from its `--metrics` file (rewritten every
/// second): waits until it reads `want`.
fn wait_for_mtu(metrics: &std::path::Path, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(metrics) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                last = v["enis"][0]["mtu"].as_u64();
                if last == Some(want) {
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the port's MTU is {last:?}, not {want}");
}

#[test]
fn net_set_mtu_is_answered_clamped_and_refused_when_impossible() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.json");
    let metrics_arg = metrics.display().to_string();
    let (_card, socket) = start_card_with(
        dir.path(),
        &["--no-sandbox", "--metrics", metrics_arg.as_str()],
    );
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    send(&mut s, GET_FEATURES, 0, &[]);
    let features = reply(&mut s, GET_FEATURES).unwrap();
    send(&mut s, GET_PROTOCOL_FEATURES, 0, &[]);
    let protocol = reply(&mut s, GET_PROTOCOL_FEATURES).unwrap();
    assert_ne!(protocol & PROTOCOL_NET_MTU, 0, "NET_MTU offered");
    let wanted = PROTOCOL_MQ | PROTOCOL_REPLY_ACK | PROTOCOL_NET_MTU;
    send(&mut s, SET_PROTOCOL_FEATURES, 0, &wanted.to_le_bytes());
    send(&mut s, SET_OWNER, 0, &[]);
    send(&mut s, SET_FEATURES, NEED_REPLY, &features.to_le_bytes());
    assert_eq!(reply(&mut s, SET_FEATURES), Some(0));
    wait_for_mtu(&metrics, 1500);

    // What QEMU sends for host_mtu=1400: accepted, in force.
    send(&mut s, NET_SET_MTU, NEED_REPLY, &1400u64.to_le_bytes());
    assert_eq!(reply(&mut s, NET_SET_MTU), Some(0));
    wait_for_mtu(&metrics, 1400);
    // No virtio-net device has these: refused, the connection goes on.
    for mtu in [67u64, 65_536, u64::MAX] {
        send(&mut s, NET_SET_MTU, NEED_REPLY, &mtu.to_le_bytes());
        assert_eq!(reply(&mut s, NET_SET_MTU), Some(1), "MTU {mtu}");
    }
    // Above the ENI's 1500: accepted, clamped to it.
    send(&mut s, NET_SET_MTU, NEED_REPLY, &9000u64.to_le_bytes());
    assert_eq!(reply(&mut s, NET_SET_MTU), Some(0));
    wait_for_mtu(&metrics, 1500);
    send(&mut s, GET_FEATURES, 0, &[]);
    assert_eq!(reply(&mut s, GET_FEATURES), Some(features));
}
