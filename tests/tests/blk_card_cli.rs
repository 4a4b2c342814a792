//! The block card faced with operator mistakes: each gets one line naming
//! the problem, exit status 2, and no file is truncated, overwritten or
//! taken over.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{ensure, Result};
use cardsim_tests::{card_binary, wait_for_socket, KillOnDrop};

fn card(args: &[&std::ffi::OsStr]) -> Result<Output> {
    Ok(Command::new(card_binary("vhost-blk-backend")?)
        .args(args)
        .stdin(Stdio::null())
        .output()?)
}

/// Runs the card, expecting a configuration error that mentions `needle`.
fn refused(args: &[&std::ffi::OsStr], needle: &str) -> Result<()> {
    let out = card(args)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2),
        "expected exit 2, got {:?}; stderr:\n{stderr}",
        out.status
    );
    let first = stderr.lines().next().unwrap_or_default();
    ensure!(
        first.contains(needle),
        "first line {first:?} lacks {needle:?}"
    );
    Ok(())
}

fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

fn one_line(args: &[&std::ffi::OsStr], needle: &str) -> Result<()> {
    refused(args, needle)?;
    let out = card(args)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(stderr.lines().count() == 1, "more than one line:\n{stderr}");
    Ok(())
}

fn file_of(dir: &Path, name: &str, content: &[u8]) -> Result<std::path::PathBuf> {
    let path = dir.join(name);
    fs::write(&path, content)?;
    Ok(path)
}

#[test]
fn missing_backing_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("s");
    let missing = dir.path().join("nope.img");
    one_line(
        &[
            os("--socket"),
            sock.as_os_str(),
            os("--backing"),
            missing.as_os_str(),
        ],
        "does not exist",
    )?;
    ensure!(!missing.exists() && !sock.exists());
    Ok(())
}

#[test]
fn size_smaller_than_the_file_truncates_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("s");
    let data = vec![0xabu8; 1 << 20];
    let img = file_of(dir.path(), "vol.img", &data)?;
    one_line(
        &[
            os("--socket"),
            sock.as_os_str(),
            os("--backing"),
            img.as_os_str(),
            os("--size"),
            os("4096"),
        ],
        "would hide data",
    )?;
    ensure!(fs::read(&img)? == data, "the backing file changed");
    Ok(())
}

#[test]
fn size_not_a_multiple_of_a_sector() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("s");
    let img = file_of(dir.path(), "vol.img", &[0u8; 4096])?;
    one_line(
        &[
            os("--socket"),
            sock.as_os_str(),
            os("--backing"),
            img.as_os_str(),
            os("--size"),
            os("5000"),
        ],
        "multiple of 512",
    )?;
    ensure!(fs::metadata(&img)?.len() == 4096);
    Ok(())
}

#[test]
fn socket_held_by_a_live_card_is_left_alone() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("s");
    let first_img = file_of(dir.path(), "a.img", &[0u8; 4096])?;
    let second_img = file_of(dir.path(), "b.img", &[0u8; 4096])?;
    let mut first = KillOnDrop(
        Command::new(card_binary("vhost-blk-backend")?)
            .args([
                os("--socket"),
                sock.as_os_str(),
                os("--backing"),
                first_img.as_os_str(),
            ])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_for_socket(&sock, Some(&mut first.0), Duration::from_secs(10))?;
    one_line(
        &[
            os("--socket"),
            sock.as_os_str(),
            os("--backing"),
            second_img.as_os_str(),
        ],
        "in use by a live process",
    )?;
    ensure!(first.0.try_wait()?.is_none(), "the first card died");
    UnixStream::connect(&sock)?;
    Ok(())
}

#[test]
fn socket_path_that_is_a_file_is_not_deleted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let precious = file_of(dir.path(), "precious", b"do not delete")?;
    let img = file_of(dir.path(), "vol.img", &[0u8; 4096])?;
    one_line(
        &[
            os("--socket"),
            precious.as_os_str(),
            os("--backing"),
            img.as_os_str(),
        ],
        "is not a socket",
    )?;
    ensure!(fs::read(&precious)? == b"do not delete");
    Ok(())
}

#[test]
fn a_volume_served_by_another_card_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = file_of(dir.path(), "vol.img", &[0u8; 4096])?;
    let first_sock = dir.path().join("a");
    let mut first = KillOnDrop(
        Command::new(card_binary("vhost-blk-backend")?)
            .args([
                os("--socket"),
                first_sock.as_os_str(),
                os("--backing"),
                img.as_os_str(),
            ])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_for_socket(&first_sock, Some(&mut first.0), Duration::from_secs(10))?;
    let second_sock = dir.path().join("b");
    one_line(
        &[
            os("--socket"),
            second_sock.as_os_str(),
            os("--backing"),
            img.as_os_str(),
        ],
        "in use by another card",
    )?;
    Ok(())
}

#[test]
fn bad_flags_are_usage_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("s");
    let img = file_of(dir.path(), "vol.img", &[0u8; 4096])?;
    let base = [
        os("--socket"),
        sock.as_os_str(),
        os("--backing"),
        img.as_os_str(),
    ];
    for (extra, needle) in [
        (["--serial", "vol0123456789abcdef012"], "20"),
        (["--queue-size", "100"], "power of two"),
        (["--num-queues", "0"], "num-queues"),
        (["--size", "12Q"], "suffix"),
        (["--frobnicate", "1"], "--frobnicate"),
    ] {
        let mut args = base.to_vec();
        args.extend(extra.iter().map(|s| os(s)));
        refused(&args, needle)?;
    }
    ensure!(fs::metadata(&img)?.len() == 4096 && !sock.exists());
    Ok(())
}

#[test]
fn a_crash_fault_kills_the_card_at_its_time() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("s");
    let img = file_of(dir.path(), "vol.img", &[0u8; 4096])?;
    let started = std::time::Instant::now();
    let out = card(&[
        os("--socket"),
        sock.as_os_str(),
        os("--backing"),
        img.as_os_str(),
        os("--fault"),
        os("kind=crash,start=0.5"),
    ])?;
    use std::os::unix::process::ExitStatusExt;
    ensure!(
        out.status.signal() == Some(libc::SIGABRT),
        "expected SIGABRT, got {:?}",
        out.status
    );
    ensure!(started.elapsed() >= Duration::from_millis(500));
    Ok(())
}

#[test]
fn bad_model_and_fault_flags_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("s");
    let small = file_of(dir.path(), "small.img", &[0u8; 4096])?;
    // io1 needs at least 4 GiB.
    refused(
        &[
            os("--socket"),
            sock.as_os_str(),
            os("--backing"),
            small.as_os_str(),
            os("--volume-type"),
            os("io1"),
        ],
        "io1",
    )?;
    for (fault, needle) in [
        ("kind=io_error,probability=2", "probability"),
        ("kind=teleport", "kind"),
        ("kind=loss,probability=0.1", "networking card"),
    ] {
        refused(
            &[
                os("--socket"),
                sock.as_os_str(),
                os("--backing"),
                small.as_os_str(),
                os("--fault"),
                os(fault),
            ],
            needle,
        )?;
    }
    ensure!(fs::metadata(&small)?.len() == 4096 && !sock.exists());
    Ok(())
}
