//! The NVMe card faced with operator mistakes: each gets one line naming
//! the problem, exit status 2, and no file is truncated, overwritten or
//! taken over.

use std::ffi::OsStr;
use std::fs;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{ensure, Result};
use cardsim_tests::nvme_card::NvmeCard;
use cardsim_tests::{card_binary, wait_for_socket, KillOnDrop};

fn card(args: &[&OsStr]) -> Result<Output> {
    Ok(Command::new(card_binary("nvme-emulator")?)
        .args(args)
        .stdin(Stdio::null())
        .output()?)
}

/// Runs the card, expecting exit 2 and exactly one line that mentions `needle`.
fn refused(args: &[&OsStr], needle: &str) -> Result<()> {
    let out = card(args)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2),
        "expected exit 2, got {:?}; stderr:\n{stderr}",
        out.status
    );
    ensure!(stderr.lines().count() == 1, "more than one line:\n{stderr}");
    ensure!(stderr.contains(needle), "{stderr:?} lacks {needle:?}");
    Ok(())
}

fn os(s: &str) -> &OsStr {
    s.as_ref()
}

#[test]
fn missing_namespace_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("s");
    let missing = dir.path().join("nope.img");
    refused(
        &[
            os("--socket"),
            sock.as_os_str(),
            os("--namespace"),
            missing.as_os_str(),
        ],
        "does not exist",
    )?;
    ensure!(!missing.exists() && !sock.exists());
    Ok(())
}

#[test]
fn no_namespace_at_all() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("s");
    refused(&[os("--socket"), sock.as_os_str()], "--namespace")
}

#[test]
fn sizes_that_are_not_whole_lbas() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("s");
    let img = dir.path().join("ns.img");
    fs::write(&img, vec![0x77u8; 4096 + 512])?;
    let arg = format!("{},size=6K,lba=4096", img.display());
    refused(
        &[
            os("--socket"),
            sock.as_os_str(),
            os("--namespace"),
            os(&arg),
        ],
        "not a positive multiple of the 4096-byte LBA",
    )?;
    // The file's own length is not a multiple of 4096.
    let arg = format!("{},lba=4096", img.display());
    refused(
        &[
            os("--socket"),
            sock.as_os_str(),
            os("--namespace"),
            os(&arg),
        ],
        "not a multiple of its 4096-byte LBA",
    )?;
    let arg = format!("{},lba=1024", img.display());
    refused(
        &[
            os("--socket"),
            sock.as_os_str(),
            os("--namespace"),
            os(&arg),
        ],
        "512 or 4096",
    )?;
    ensure!(
        fs::read(&img)? == vec![0x77u8; 4096 + 512],
        "the file changed"
    );
    Ok(())
}

#[test]
fn bad_queue_counts_and_identify_strings() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("s");
    let img = dir.path().join("ns.img");
    fs::write(&img, vec![0u8; 4096])?;
    let base = [
        os("--socket"),
        sock.as_os_str(),
        os("--namespace"),
        img.as_os_str(),
    ];
    for (extra, needle) in [
        (["--io-queues", "0"], "--io-queues"),
        (["--io-queues", "65"], "--io-queues"),
        (["--serial", "0123456789abcdefghijk"], "serial number"),
        (["--model", &"m".repeat(41)], "model number"),
    ] {
        let mut args = base.to_vec();
        args.extend(extra.iter().map(|s| os(s)));
        refused(&args, needle)?;
    }
    Ok(())
}

#[test]
fn a_socket_path_that_is_a_file_is_left_alone() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let not_a_socket = dir.path().join("disk.img");
    fs::write(&not_a_socket, b"precious")?;
    let img = dir.path().join("ns.img");
    fs::write(&img, vec![0u8; 4096])?;
    refused(
        &[
            os("--socket"),
            not_a_socket.as_os_str(),
            os("--namespace"),
            img.as_os_str(),
        ],
        "not a socket",
    )?;
    ensure!(fs::read(&not_a_socket)? == b"precious");
    Ok(())
}

#[test]
fn a_namespace_served_by_another_card_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("ns.img");
    fs::write(&img, vec![0u8; 1 << 20])?;
    let first = NvmeCard::start(dir.path(), &[img.to_str().unwrap_or_default()], &[])?;
    let other = dir.path().join("other.sock");
    refused(
        &[
            os("--socket"),
            other.as_os_str(),
            os("--namespace"),
            img.as_os_str(),
        ],
        "in use by another card",
    )?;
    // The same socket path while the first card serves it.
    let out = card(&[
        os("--socket"),
        first.socket.as_os_str(),
        os("--namespace"),
        dir.path().join("missing-too").as_os_str(),
    ])?;
    ensure!(out.status.code() == Some(2));
    ensure!(first.socket.exists());
    Ok(())
}

#[test]
fn a_stale_socket_is_replaced() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("s");
    drop(std::os::unix::net::UnixListener::bind(&sock)?);
    let img = dir.path().join("ns.img");
    fs::write(&img, vec![0u8; 4096])?;
    let child = Command::new(card_binary("nvme-emulator")?)
        .args([
            os("--socket"),
            sock.as_os_str(),
            os("--namespace"),
            img.as_os_str(),
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut card = KillOnDrop(child);
    std::thread::sleep(Duration::from_millis(300));
    ensure!(card.0.try_wait()?.is_none(), "the card exited");
    wait_for_socket(&sock, Some(&mut card.0), Duration::from_secs(10))?;
    std::os::unix::net::UnixStream::connect(&sock)?;
    Ok(())
}

/// Started as root, the card jails itself before it serves: seccomp filter
/// on, uid nobody; `--no-sandbox` leaves it as it was started.
#[test]
fn the_card_runs_jailed_unless_told_not_to() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the jail needs root");
        return Ok(());
    }
    // The card jails itself just after it binds its socket.
    let status_of = |pid: u32| -> Result<(String, String)> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = status_of_now(pid)?;
            if now.0 == "2" || std::time::Instant::now() > deadline {
                return Ok(now);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("ns.img");
    fs::write(&img, vec![0u8; 1 << 20])?;
    let card = NvmeCard::start(dir.path(), &[img.to_str().unwrap_or_default()], &[])?;
    ensure!(status_of(card.process.id())? == ("2".into(), "65534".into()));
    drop(card);
    let card = NvmeCard::start(
        dir.path(),
        &[img.to_str().unwrap_or_default()],
        &["--no-sandbox"],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    ensure!(status_of_now(card.process.id())? == ("0".into(), "0".into()));
    Ok(())
}

/// Seccomp mode and real uid of a process.
fn status_of_now(pid: u32) -> Result<(String, String)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| {
                l[name.len()..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
            .unwrap_or_default()
    };
    Ok((field("Seccomp:"), field("Uid:")))
}
