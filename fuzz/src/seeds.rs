//! The checked-in seed corpus, `fuzz/corpus/<target>/<name>`: a handful of
//! valid inputs per target, from which libFuzzer mutates.

use crate::blk::{self, Descriptor, DATA, HDR, INDIRECT, STATUS};
use crate::agent::{self, CLI, JSON, RAW};
use crate::vhost_user::{self, Frame, FD_A, FD_B, FD_MEM, MEM_SIZE};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT_F: u16 = 4;

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Descriptor {
    Descriptor {
        addr,
        len,
        flags,
        next,
    }
}

fn header(request_type: u32, sector: u64) -> (u32, Vec<u8>) {
    let mut h = request_type.to_le_bytes().to_vec();
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    (HDR as u32, h)
}

fn range_segment(sector: u64, num_sectors: u32, flags: u32) -> (u32, Vec<u8>) {
    let mut r = sector.to_le_bytes().to_vec();
    r.extend_from_slice(&num_sectors.to_le_bytes());
    r.extend_from_slice(&flags.to_le_bytes());
    (DATA as u32, r)
}

fn blk_input(descriptors: Vec<Descriptor>, patches: Vec<(u32, Vec<u8>)>) -> blk::Input {
    blk::Input {
        read_only: false,
        event_idx: true,
        queue_size_exp: 4,
        capacity: 1 << 20,
        max_descriptors: 10,
        seg_max: 16,
        head: 0,
        descriptors,
        patches,
    }
}

/// A three-descriptor chain: header, one data buffer, status.
fn simple(request_type: u32, sector: u64, data: (u64, u32, u16)) -> blk::Input {
    blk_input(
        vec![
            desc(HDR, 16, NEXT, 1),
            desc(data.0, data.1, data.2 | NEXT, 2),
            desc(STATUS, 1, WRITE, 0),
        ],
        vec![header(request_type, sector)],
    )
}

fn virtio_blk_request() -> Vec<(&'static str, Vec<u8>)> {
    let mut read_only_flush = blk_input(
        vec![desc(HDR, 16, NEXT, 1), desc(STATUS, 1, WRITE, 0)],
        vec![header(4, 0)],
    );
    read_only_flush.read_only = true;
    let mut discard = simple(11, 0, (DATA, 16, 0));
    discard.patches.push(range_segment(16, 8, 0));
    let mut write_zeroes = simple(13, 0, (DATA, 16, 0));
    write_zeroes.patches.push(range_segment(0, 1, 1));
    // A write whose data straddles the two adjacent memory regions.
    let straddle = simple(1, 2, (0xf800, 4096, 0));
    // One indirect descriptor pointing at a table of three.
    let mut table = Vec::new();
    for (addr, len, flags, next) in [
        (HDR, 16u32, NEXT, 1u16),
        (DATA, 4096, NEXT | WRITE, 2),
        (STATUS, 1, WRITE, 0),
    ] {
        table.extend_from_slice(&addr.to_le_bytes());
        table.extend_from_slice(&len.to_le_bytes());
        table.extend_from_slice(&flags.to_le_bytes());
        table.extend_from_slice(&next.to_le_bytes());
    }
    let indirect = blk_input(
        vec![desc(INDIRECT, 48, INDIRECT_F, 0)],
        vec![header(0, 0), (INDIRECT as u32, table)],
    );
    // 0 -> 1 -> 0 -> ...
    let looping = blk_input(
        vec![desc(HDR, 16, NEXT, 1), desc(DATA, 512, NEXT | WRITE, 0)],
        vec![header(0, 0)],
    );
    vec![
        ("read", simple(0, 8, (DATA, 4096, WRITE)).encode()),
        ("write_straddling_regions", straddle.encode()),
        ("flush_read_only", read_only_flush.encode()),
        ("get_id", simple(8, 0, (DATA, 20, WRITE)).encode()),
        ("discard", discard.encode()),
        ("write_zeroes_unmap", write_zeroes.encode()),
        ("indirect_read", indirect.encode()),
        ("looping_chain", looping.encode()),
    ]
}

// vhost-user requests and header flags.
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;
const GET_CONFIG: u32 = 24;
const SET_CONFIG: u32 = 25;
const V1: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;

/// Where the VMM has guest memory mapped (the backend translates ring
/// addresses from it).
const VMM_VA: u64 = 0x7f00_0000_0000;

fn msg(fds: u8, request: u32, flags: u32, body: Vec<u8>) -> Frame {
    Frame::Message {
        fds,
        request,
        flags,
        size: body.len() as u32,
        body,
    }
}

fn le(values: &[u64], widths: &[usize]) -> Vec<u8> {
    values
        .iter()
        .zip(widths)
        .flat_map(|(v, w)| v.to_le_bytes()[..*w].to_vec())
        .collect()
}

/// QEMU's start-up sequence for one queue of 16, up to an enabled ring.
fn handshake(mem_size: u64) -> Vec<Frame> {
    let features = (1u64 << 32) | (1 << 30) | (1 << 9) | (1 << 29);
    let protocol = (1u64 << 9) | (1 << 0) | (1 << 3);
    let mut config = le(&[0, 60, 0], &[4, 4, 4]);
    config.extend_from_slice(&[0; 60]);
    vec![
        msg(0, GET_FEATURES, V1, vec![]),
        msg(0, GET_PROTOCOL_FEATURES, V1, vec![]),
        msg(
            0,
            SET_PROTOCOL_FEATURES,
            V1,
            protocol.to_le_bytes().to_vec(),
        ),
        msg(0, GET_QUEUE_NUM, V1, vec![]),
        msg(0, GET_CONFIG, V1, config),
        msg(0, SET_OWNER, V1, vec![]),
        msg(0, SET_FEATURES, V1, features.to_le_bytes().to_vec()),
        msg(
            FD_MEM,
            SET_MEM_TABLE,
            V1 | NEED_REPLY,
            le(&[1, 0, 0, mem_size, VMM_VA, 0], &[4, 4, 8, 8, 8, 8]),
        ),
        msg(0, SET_VRING_NUM, V1, le(&[0, 16], &[4, 4])),
        msg(0, SET_VRING_BASE, V1, le(&[0, 0], &[4, 4])),
        msg(
            0,
            SET_VRING_ADDR,
            V1,
            le(
                &[0, 0, VMM_VA, VMM_VA + 0x2000, VMM_VA + 0x1000, 0],
                &[4, 4, 8, 8, 8, 8],
            ),
        ),
        msg(FD_B, SET_VRING_CALL, V1, 0u64.to_le_bytes().to_vec()),
        msg(FD_A, SET_VRING_KICK, V1, 0u64.to_le_bytes().to_vec()),
        msg(0, SET_VRING_ENABLE, V1, le(&[0, 1], &[4, 4])),
    ]
}

/// A read request at the head of the ring the handshake set up, and a kick.
fn read_request() -> Vec<Frame> {
    let mut table = Vec::new();
    for (addr, len, flags, next) in [
        (0x3000u64, 16u32, NEXT, 1u16),
        (0x4000, 4096, NEXT | WRITE, 2),
        (0x5000, 1, WRITE, 0),
    ] {
        table.extend_from_slice(&le(
            &[addr, len.into(), flags.into(), next.into()],
            &[8, 4, 2, 2],
        ));
    }
    vec![
        Frame::Write {
            offset: 0,
            bytes: table,
        },
        Frame::Write {
            offset: 0x3000,
            bytes: le(&[0, 0, 8], &[4, 4, 8]),
        },
        // avail: flags 0, idx 1, ring[0] = 0
        Frame::Write {
            offset: 0x1000,
            bytes: le(&[0, 1, 0], &[2, 2, 2]),
        },
        Frame::Kick { b: false },
    ]
}

fn vhost_user_messages() -> Vec<(&'static str, Vec<u8>)> {
    let mut session = handshake(MEM_SIZE);
    session.extend(read_request());
    session.push(msg(0, GET_VRING_BASE, V1, le(&[0, 0], &[4, 4])));
    let mut set_config = handshake(MEM_SIZE);
    set_config.truncate(7);
    set_config.push(msg(
        0,
        SET_CONFIG,
        V1 | NEED_REPLY,
        le(&[0, 4, 0, 0], &[4, 4, 4, 4]),
    ));
    // A memory region larger than the file behind it.
    let mut too_big = handshake(MEM_SIZE * 16);
    too_big.truncate(8);
    let both_fds = vec![msg(
        FD_MEM | FD_A | FD_B,
        SET_VRING_KICK,
        V1,
        0u64.to_le_bytes().to_vec(),
    )];
    vec![
        ("read_session", vhost_user::encode(&session)),
        ("handshake", vhost_user::encode(&handshake(MEM_SIZE))),
        ("set_config", vhost_user::encode(&set_config)),
        ("mem_table_past_eof", vhost_user::encode(&too_big)),
        ("stray_fds", vhost_user::encode(&both_fds)),
    ]
}

fn agent_protocol() -> Vec<(&'static str, Vec<u8>)> {
    let json = |lines: &[&str]| agent::encode(JSON, &lines.join("\n"));
    let raw = |lines: &[&str]| agent::encode(RAW, &lines.join("\n"));
    let cli = |spec: &str| agent::encode(CLI, spec);
    vec![
        (
            "json_io_error",
            json(&[
                r#"{"fault_add": {"kind": "io_error", "scope": {"range": [0, 1048576]}}}"#,
                r#"{"fault_list": null}"#,
                r#"{"fault_clear": {"id": "fault-1"}}"#,
            ]),
        ),
        (
            "json_latency_metrics",
            json(&[
                r#"{"fault_add": {"kind": "latency", "fixed_ms": 5, "spike_probability": 0.1, "spike_ms": 100, "start_s": 0, "end_s": 10, "seed": 3}}"#,
                r#"{"metrics": {}}"#,
            ]),
        ),
        (
            "json_stall_power_cut",
            json(&[
                r#"{"fault_add": {"kind": "stall", "id": "s", "scope": {"direction": "write"}, "end_s": 2}}"#,
                r#"{"fault_add": {"kind": "power_cut", "drop_probability": 0.5, "start_s": 1}}"#,
                r#"{"fault_clear": {"all": true}}"#,
            ]),
        ),
        (
            "json_garbage",
            json(&["not json", "[1,2]", r#"{"a":1,"b":2}"#, r#"{"nope": 1}"#]),
        ),
        (
            "json_volume_modify",
            json(&[
                r#"{"volume_modify": {"volume_type": "gp3", "iops": 4000, "throughput": 250}}"#,
                r#"{"volume_modify": {"iops": 80000}}"#,
                r#"{"volume_modify": {"volume_type": "io2", "iops": 500}}"#,
                r#"{"health": {}}"#,
            ]),
        ),
        (
            "raw_hello_then_fault",
            raw(&[
                r#"{"hello": {"version": 1}}"#,
                r#"{"fault_add": {"kind": "io_error", "probability": 0.5}}"#,
                r#"{"hello": {"version": 1}}"#,
            ]),
        ),
        ("raw_wrong_version", raw(&[r#"{"hello": {"version": 7}}"#])),
        ("raw_no_hello", raw(&[r#"{"metrics": {}}"#])),
        (
            "cli_io_error",
            cli("kind=io_error,range=0-1M,probability=0.5,seed=7,start=0,end=30"),
        ),
        (
            "cli_latency",
            cli("kind=latency,fixed_ms=5,spike_probability=0.01,spike_ms=200,dir=read"),
        ),
        (
            "cli_stall",
            cli("kind=stall,range=4K-8K,direction=write,end=2"),
        ),
        (
            "cli_power_cut",
            cli("kind=power_cut,drop_probability=0.5,start=1"),
        ),
        ("cli_crash", cli("kind=crash,id=boom,start=5")),
    ]
}

/// Every target's seeds: (target, [(file name, bytes)]).
pub fn all() -> Vec<(&'static str, Vec<(&'static str, Vec<u8>)>)> {
    vec![
        ("virtio_blk_request", virtio_blk_request()),
        ("vhost_user_messages", vhost_user_messages()),
        ("agent_protocol", agent_protocol()),
    ]
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn checked_in_seeds_are_current() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        let write = std::env::var_os("CARDSIM_WRITE_SEEDS").is_some();
        for (target, seeds) in super::all() {
            let dir = root.join(target);
            for (name, bytes) in seeds {
                let path = dir.join(name);
                if write {
                    std::fs::create_dir_all(&dir).unwrap();
                    std::fs::write(&path, &bytes).unwrap();
                } else {
                    let on_disk = std::fs::read(&path).unwrap_or_default();
                    assert!(
                        on_disk == bytes,
                        "{} is stale: run CARDSIM_WRITE_SEEDS=1 cargo test --manifest-path fuzz/Cargo.toml",
                        path.display()
                    );
                }
            }
        }
    }
}
