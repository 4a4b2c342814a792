//! The NVMe and networking cards jail themselves as the block card does
//! (issue 9; the block card's own checks are in blk_sandbox.rs): seen from
//! outside through /proc, and a forbidden system call kills them.

use std::os::unix::process::ExitStatusExt;
use std::process::Child;
use std::time::{Duration, Instant};

use cardsim_tests::net_card::NetCard;
use cardsim_tests::nvme_card::NvmeCard;
use cardsim_tests::sandbox::{inject_syscall, wait_for_seccomp, ProcessJail};

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn assert_jailed(jail: &ProcessJail) {
    assert_eq!((jail.uid, jail.gid), (NOBODY, NOBODY), "{jail:?}");
    assert_eq!(jail.cap_effective, 0, "{jail:?}");
    assert_eq!(jail.cap_bounding, 0, "{jail:?}");
    assert!(jail.no_new_privs, "{jail:?}");
    assert!(jail.own_mount_namespace, "{jail:?}");
}

/// Makes the card's main thread open an internet socket, which no card
/// needs once serving, and expects it to die of SIGSYS.
fn forbidden_call_kills(child: &mut Child) {
    inject_syscall(
        child.id(),
        libc::SYS_socket,
        [libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0],
    )
    .expect("injecting a system call");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the card survived a forbidden call"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");
}

const VPC: &str = r#"
[vpc]
cidr = "10.0.0.0/16"
vni = 100
[[subnet]]
id = "subnet-a"
cidr = "10.0.1.0/24"
[[eni]]
id = "eni-a"
socket = "$DIR/eni-a.sock"
mac = "02:00:0a:00:01:0a"
ip = "10.0.1.10"
subnet = "subnet-a"
"#;

#[test]
fn the_networking_card_runs_jailed_and_dies_of_a_forbidden_call() {
    if !is_root() {
        eprintln!("skipped: the jail needs root");
        return;
    }
    let mut card = NetCard::start(VPC, &[]).unwrap();
    let jail = wait_for_seccomp(card.process.id(), Duration::from_secs(10)).unwrap();
    assert_jailed(&jail);
    // Its whole filesystem is the path to its folder (metrics live there).
    let top = cardsim_tests::sandbox::top_folder(card.dir());
    assert_eq!(jail.root_entries, vec![top], "{jail:?}");
    card.metrics()
        .expect("the control socket answers from the jail");
    forbidden_call_kills(&mut card.process.0);
}

#[test]
fn the_nvme_card_runs_jailed_and_dies_of_a_forbidden_call() {
    if !is_root() {
        eprintln!("skipped: the jail needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = dir.path().join("ns0.img");
    std::fs::File::create(&ns)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut card = NvmeCard::start(dir.path(), &[ns.to_str().unwrap()], &[]).unwrap();
    let jail = wait_for_seccomp(card.process.id(), Duration::from_secs(10)).unwrap();
    assert_jailed(&jail);
    assert!(jail.root_entries.is_empty(), "{jail:?}");
    forbidden_call_kills(&mut card.process.0);
}
