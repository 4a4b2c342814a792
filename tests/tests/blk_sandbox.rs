//! The block card jails itself (issue 9): seen from outside through /proc,
//! and a forbidden system call, made by one of its own threads, kills it.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cardsim_tests::sandbox::{inject_syscall, top_folder, wait_for_seccomp};
use cardsim_tests::{card_binary, wait_for_socket, KillOnDrop};

const NOBODY: u32 = 65534;

fn start(dir: &Path, extra: &[&str]) -> Child {
    let backing = dir.join("vol.img");
    std::fs::write(&backing, vec![0u8; 1 << 20]).unwrap();
    Command::new(card_binary("vhost-blk-backend").unwrap())
        .arg("--socket")
        .arg(dir.join("blk.sock"))
        .arg("--backing")
        .arg(&backing)
        .arg("--agent")
        .arg(dir.join("agent.sock"))
        .args(extra)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the card did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn the_block_card_runs_jailed() {
    if !is_root() {
        eprintln!("skipped: the jail needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let metrics_dir = dir.path().join("metrics");
    std::fs::create_dir(&metrics_dir).unwrap();
    std::os::unix::fs::chown(&metrics_dir, Some(NOBODY), Some(NOBODY)).unwrap();
    let metrics = metrics_dir.join("blk.json");
    let mut card = KillOnDrop(start(dir.path(), &["--metrics", metrics.to_str().unwrap()]));
    let jail = wait_for_seccomp(card.id(), Duration::from_secs(10)).unwrap();
    assert_eq!((jail.uid, jail.gid), (NOBODY, NOBODY), "{jail:?}");
    assert_eq!(jail.cap_effective, 0, "{jail:?}");
    assert_eq!(jail.cap_bounding, 0, "{jail:?}");
    assert!(jail.no_new_privs, "{jail:?}");
    assert!(jail.own_mount_namespace, "{jail:?}");
    // The card's whole filesystem is the path to its metrics folder.
    assert_eq!(
        jail.root_entries,
        vec![top_folder(&metrics_dir)],
        "{jail:?}"
    );

    // Still a working card: the agent socket answers and the metrics file
    // is replaced from inside the jail.
    wait_for_socket(
        &dir.path().join("blk.sock"),
        Some(&mut card.0),
        Duration::from_secs(5),
    )
    .unwrap();
    let first = std::fs::metadata(&metrics).unwrap().modified().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&metrics).unwrap().modified().unwrap() == first {
        assert!(
            Instant::now() < deadline,
            "metrics not rewritten inside the jail"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let answer = cardsim_tests::block_card::call(
        &dir.path().join("agent.sock"),
        "metrics",
        serde_json::json!({}),
    )
    .unwrap();
    assert!(answer["queues"].is_array(), "{answer}");
}

#[test]
fn a_forbidden_system_call_kills_the_block_card() {
    let dir = tempfile::tempdir().unwrap();
    let mut card = start(dir.path(), &[]);
    let pid = card.id();
    wait_for_seccomp(pid, Duration::from_secs(10)).unwrap();
    // The main thread waits in accept4 for a VMM. Make it open an internet
    // socket, which no card thread ever needs.
    let injected = inject_syscall(
        pid,
        libc::SYS_socket,
        [libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0],
    );
    if let Err(e) = &injected {
        let _ = card.kill();
        panic!("cannot inject: {e:#}");
    }
    let status = wait_exit(&mut card, Duration::from_secs(10));
    let mut stderr = String::new();
    card.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}\n{stderr}");
    let named = format!(
        "{}{}",
        card_firmware::sandbox::FORBIDDEN_SYSCALL_MESSAGE,
        libc::SYS_socket
    );
    assert!(stderr.contains(&named), "{stderr}");
}

#[test]
fn a_metrics_folder_the_card_cannot_write_is_a_config_error() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap(); // root's, mode 0700
    let metrics = dir.path().join("blk.json");
    let mut card = start(dir.path(), &["--metrics", metrics.to_str().unwrap()]);
    let status = wait_exit(&mut card, Duration::from_secs(10));
    let mut stderr = String::new();
    card.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("uid 65534 cannot write"), "{stderr}");
    assert!(stderr.contains("--no-sandbox"), "{stderr}");
}

#[test]
fn no_sandbox_leaves_the_card_unfiltered() {
    let dir = tempfile::tempdir().unwrap();
    let mut card = KillOnDrop(start(dir.path(), &["--no-sandbox"]));
    wait_for_socket(
        &dir.path().join("agent.sock"),
        Some(&mut card.0),
        Duration::from_secs(10),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let jail = cardsim_tests::sandbox::process_jail(card.id()).unwrap();
    assert_eq!(jail.seccomp, 0, "{jail:?}");
    assert!(!jail.own_mount_namespace, "{jail:?}");
}

/// The thread ids of `pid` whose name is `name`.
fn threads_named(pid: u32, name: &str) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|comm| comm.trim() == name)
                })
                .filter_map(|t| t.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn seccomp_filters(pid: u32, tid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Seccomp_filters:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn a_queue_worker_is_confined_beyond_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let mut card = start(dir.path(), &[]);
    let pid = card.id();
    wait_for_seccomp(pid, Duration::from_secs(10)).unwrap();
    // A VMM with a queue running: cardbench plays it.
    let mut vmm = KillOnDrop(
        Command::new(card_binary("cardbench").unwrap())
            .args(["blk", "--rw", "randread", "--runtime", "30", "--socket"])
            .arg(dir.path().join("blk.sock"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The worker confines itself on its first event.
    let deadline = Instant::now() + Duration::from_secs(20);
    let worker = loop {
        let confined: Vec<u32> = threads_named(pid, "vring_worker")
            .into_iter()
            .filter(|&tid| seccomp_filters(pid, tid) >= 2)
            .collect();
        if let Some(&tid) = confined.first() {
            break tid;
        }
        if Instant::now() > deadline {
            let _ = card.kill();
            panic!("no queue worker with its own filter appeared");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // accept4 is in the process's allowlist (the main thread takes VMM
    // connections with it), not in a queue worker's.
    if let Err(e) = inject_syscall(worker, libc::SYS_accept4, [0, 0, 0]) {
        let _ = card.kill();
        panic!("cannot inject: {e:#}");
    }
    let status = wait_exit(&mut card, Duration::from_secs(10));
    let _ = vmm.0.kill();
    let mut stderr = String::new();
    card.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}\n{stderr}");
    let named = format!(
        "{}{}",
        card_firmware::sandbox::FORBIDDEN_SYSCALL_MESSAGE,
        libc::SYS_accept4
    );
    assert!(stderr.contains(&named), "{stderr}");
}
