//! cardbench against real backends: our card and qemu-storage-daemon, bad
//! peers, and a card whose backing file changes under it.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin_dir() -> PathBuf {
    std::env::var_os("CARDSIM_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"))
}

fn card_bin() -> PathBuf {
    let p = bin_dir().join("vhost-blk-backend");
    assert!(
        p.exists(),
        "{} missing: cargo build -p vhost-blk-backend (or set CARDSIM_BIN_DIR)",
        p.display()
    );
    p
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// A backend process, killed when the test ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(p: &mut Proc, socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(p.0.try_wait().unwrap().is_none(), "backend exited early");
        assert!(
            Instant::now() < deadline,
            "no socket at {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn backing(dir: &Path, size: u64) -> PathBuf {
    let path = dir.join("vol.img");
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path
}

fn start_card(dir: &Path, size: u64, queues: u16) -> (Proc, PathBuf, PathBuf) {
    let img = backing(dir, size);
    let socket = dir.join("card.sock");
    let mut p = Proc(
        Command::new(card_bin())
            .arg("--socket")
            .arg(&socket)
            .arg("--backing")
            .arg(&img)
            .arg("--num-queues")
            .arg(queues.to_string())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&mut p, &socket);
    (p, socket, img)
}

fn start_qsd(dir: &Path, size: u64, queues: u16) -> (Proc, PathBuf) {
    let img = backing(dir, size);
    let socket = dir.join("qsd.sock");
    let mut p = Proc(
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f,filename={},aio=io_uring",
                img.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                socket.display()
            ))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&mut p, &socket);
    (p, socket)
}

fn cardbench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cardbench"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn blk(socket: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["blk", "--socket", socket.to_str().unwrap()];
    args.extend_from_slice(extra);
    cardbench(&args)
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {:?} stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn assert_verified(out: &Output, reads: bool, writes: bool) {
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(out);
    let extra = &v["cardbench"];
    assert_eq!(extra["verify_errors"], 0);
    assert_eq!(extra["io_errors"], 0);
    assert!(extra["verified_reads"].as_u64().unwrap() > 100, "{extra}");
    let job = &v["jobs"][0];
    assert_eq!(job["read"]["iops"].as_f64().unwrap() > 0.0, reads);
    assert_eq!(job["write"]["iops"].as_f64().unwrap() > 0.0, writes);
    if reads {
        assert!(
            job["read"]["clat_ns"]["percentile"]["99.000000"]
                .as_u64()
                .unwrap()
                > 0
        );
    }
}

const VERIFY_RANDRW: &[&str] = &[
    "--rw",
    "randrw",
    "--iodepth",
    "8",
    "--queues",
    "2",
    "--runtime",
    "1",
    "--size",
    "16M",
    "--verify",
    "--json",
];
const VERIFY_SEQWRITE: &[&str] = &[
    "--rw",
    "write",
    "--bs",
    "128k",
    "--iodepth",
    "4",
    "--runtime",
    "500ms",
    "--size",
    "16M",
    "--verify",
    "--json",
];

#[test]
fn verify_passes_against_our_card() {
    let dir = tempfile::tempdir().unwrap();
    let (card, socket, _) = start_card(dir.path(), 32 << 20, 2);
    let pid = card.0.id().to_string();
    let mut args = VERIFY_RANDRW.to_vec();
    args.extend(["--backend-pid", &pid]);
    let out = blk(&socket, &args);
    assert_verified(&out, true, true);
    let cpu = json(&out)["cardbench"]["backend_cpu_us_per_io"].as_f64();
    assert!(cpu.is_some_and(|c| c > 0.0), "{cpu:?}");
    // The card listens again after a disconnect: a second run, sequential.
    assert_verified(&blk(&socket, VERIFY_SEQWRITE), false, true);
}

#[test]
fn verify_passes_against_qemu_storage_daemon() {
    if !have("qemu-storage-daemon") {
        eprintln!("skipped: qemu-storage-daemon not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_qsd, socket) = start_qsd(dir.path(), 32 << 20, 2);
    assert_verified(&blk(&socket, VERIFY_RANDRW), true, true);
    assert_verified(&blk(&socket, VERIFY_SEQWRITE), false, true);
}

/// The card reads through the page cache, so rewriting its backing file
/// mid-run changes what the guest reads: verify must notice.
#[test]
fn verify_catches_data_changed_under_the_card() {
    let dir = tempfile::tempdir().unwrap();
    let (_card, socket, img) = start_card(dir.path(), 8 << 20, 1);
    let corrupt = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
        f.write_all_at(&vec![0u8; 4 << 20], 0).unwrap();
    });
    let out = blk(
        &socket,
        &[
            "--rw",
            "randread",
            "--iodepth",
            "4",
            "--runtime",
            "3",
            "--size",
            "4M",
            "--verify",
            "--json",
        ],
    );
    corrupt.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("no stamp"), "stderr: {stderr}");
    let errors = json(&out)["cardbench"]["verify_errors"].as_u64().unwrap();
    assert!(errors > 0);
}

fn assert_usage_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {stderr}");
    assert!(lines[0].starts_with("cardbench: "), "{stderr}");
    assert!(lines[0].contains(needle), "{needle:?} not in {stderr}");
}

const QUICK: &[&str] = &[
    "--rw",
    "randread",
    "--runtime",
    "200ms",
    "--handshake-timeout",
    "1s",
];

#[test]
fn no_listener() {
    let dir = tempfile::tempdir().unwrap();
    assert_usage_error(
        &blk(&dir.path().join("nothing.sock"), QUICK),
        "cannot connect",
    );
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"not a socket").unwrap();
    assert_usage_error(&blk(&file, QUICK), "cannot connect");
}

/// A peer that accepts and then runs `serve` on the connection.
fn fake_peer(dir: &Path, serve: fn(std::os::unix::net::UnixStream)) -> PathBuf {
    let path = dir.join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        if let Ok((s, _)) = listener.accept() {
            serve(s);
        }
    });
    path
}

#[test]
fn silent_peer_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let socket = fake_peer(dir.path(), |mut s| {
        // Read everything, answer nothing.
        let mut buf = [0u8; 4096];
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    });
    let started = Instant::now();
    let out = blk(&socket, QUICK);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_usage_error(&out, "no answer to GET_FEATURES");
}

#[test]
fn peer_that_is_not_vhost_user() {
    let dir = tempfile::tempdir().unwrap();
    let socket = fake_peer(dir.path(), |mut s| {
        let _ = s.write_all(b"220 smtp.example ESMTP ready\r\n");
        std::thread::sleep(Duration::from_secs(3));
    });
    assert_usage_error(&blk(&socket, QUICK), "is it a vhost-user-blk backend?");
}

#[test]
fn peer_answers_out_of_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let socket = fake_peer(dir.path(), |mut s| {
        let mut hdr = [0u8; 12];
        // SET_OWNER (no reply wanted), then GET_FEATURES.
        s.read_exact(&mut hdr).unwrap();
        s.read_exact(&mut hdr).unwrap();
        // A well-formed reply, but to GET_PROTOCOL_FEATURES (15).
        let mut reply = Vec::new();
        reply.extend_from_slice(&15u32.to_le_bytes());
        reply.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
        reply.extend_from_slice(&8u32.to_le_bytes());
        reply.extend_from_slice(&u64::MAX.to_le_bytes());
        s.write_all(&reply).unwrap();
        std::thread::sleep(Duration::from_secs(3));
    });
    assert_usage_error(&blk(&socket, QUICK), "GET_FEATURES failed");
}

#[test]
fn device_smaller_than_size_and_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let (_card, socket, _) = start_card(dir.path(), 8 << 20, 1);
    let mut args = QUICK.to_vec();
    args.extend(["--size", "16M"]);
    assert_usage_error(&blk(&socket, &args), "less than --size");
    let mut args = QUICK.to_vec();
    args.extend(["--queues", "2"]);
    assert_usage_error(&blk(&socket, &args), "queue");
    let mut args = QUICK.to_vec();
    args.extend(["--bs", "3000"]);
    assert_usage_error(&blk(&socket, &args), "--bs 3000");
    assert_usage_error(&blk(&socket, &["--rw", "sideways"]), "sideways");
}

#[test]
fn compare_quick_runs() {
    if !have("qemu-storage-daemon") || !have("fio") {
        eprintln!("skipped: qemu-storage-daemon or fio not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results");
    let out = Command::new(env!("CARGO_BIN_EXE_cardbench"))
        .args(["compare-blk", "--quick", "--results"])
        .arg(&results)
        .env("CARDSIM_BIN_DIR", bin_dir())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("4k randread QD32 1q"), "{table}");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(results.join("results.json")).unwrap()).unwrap();
    let cells = v["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 12);
    for c in cells {
        for s in ["ours", "qsd", "raw"] {
            assert!(c["median"][s]["iops"].as_f64().unwrap() > 0.0, "{c}");
        }
    }
    let svg = std::fs::read_to_string(results.join("compare-blk.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("qemu-storage-daemon"));
}
