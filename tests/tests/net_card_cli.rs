//! The networking card faced with operator mistakes: a bad config names the
//! key and the problem on one line, exit status 2, and nothing is started —
//! no socket claimed, no file touched. `--check-config` says yes or no.

use std::fs;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{ensure, Result};
use cardsim_tests::{card_binary, wait_for_socket, KillOnDrop};

fn card(args: &[&std::ffi::OsStr]) -> Result<Output> {
    Ok(Command::new(card_binary("vhost-net-backend")?)
        .args(args)
        .stdin(Stdio::null())
        .output()?)
}

fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

/// A config with two ENIs whose sockets live in `dir`; `edit` changes its text.
fn config(dir: &Path, edit: impl Fn(String) -> String) -> Result<PathBuf> {
    let text = format!(
        r#"
[vpc]
cidr = "10.0.0.0/16"
vni = 100
[[subnet]]
id = "subnet-a"
cidr = "10.0.1.0/24"
gateway = "10.0.1.1"
[[security_group]]
id = "sg-web"
ingress = [ {{ proto = "tcp", ports = "5201", cidr = "10.0.0.0/16" }}, {{ proto = "icmp", cidr = "0.0.0.0/0" }} ]
egress  = [ {{ proto = "all", cidr = "0.0.0.0/0" }} ]
[[eni]]
id = "eni-0a1"
socket = "{dir}/eni-0a1.sock"
mac = "02:00:0a:00:01:0a"
ip = "10.0.1.10"
subnet = "subnet-a"
security_groups = ["sg-web"]
allowance = {{ bandwidth = {{ size = 1250000, refill_time = 10 }}, ops = {{ size = 1000, refill_time = 10 }} }}
[[eni]]
id = "eni-0b2"
socket = "{dir}/eni-0b2.sock"
mac = "02:00:0a:00:01:0b"
ip = "10.0.1.11"
subnet = "subnet-a"
security_groups = ["sg-web"]
"#,
        dir = dir.display()
    );
    let path = dir.join("vpc.toml");
    fs::write(&path, edit(text))?;
    Ok(path)
}

/// Runs `--config path` (plus `extra`), expecting exit 2 and one line that
/// mentions every needle.
fn refused(path: &Path, extra: &[&str], needles: &[&str]) -> Result<String> {
    let mut args = vec![os("--config"), path.as_os_str()];
    args.extend(extra.iter().map(|s| os(s)));
    let out = card(&args)?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        out.status.code() == Some(2),
        "expected exit 2, got {:?}; stderr:\n{stderr}",
        out.status
    );
    ensure!(stderr.lines().count() == 1, "more than one line:\n{stderr}");
    for needle in needles {
        ensure!(stderr.contains(needle), "{stderr:?} lacks {needle:?}");
    }
    Ok(stderr)
}

fn no_sockets(dir: &Path) -> Result<()> {
    for name in ["eni-0a1.sock", "eni-0b2.sock"] {
        ensure!(!dir.join(name).exists(), "{name} was created");
    }
    Ok(())
}

#[test]
fn check_config_accepts_a_good_config() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = config(dir.path(), |t| t)?;
    let out = card(&[os("--config"), path.as_os_str(), os("--check-config")])?;
    ensure!(
        out.status.success(),
        "{:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(String::from_utf8_lossy(&out.stdout).contains("2 ENIs"));
    no_sockets(dir.path())
}

#[test]
fn an_eni_outside_its_subnet_names_the_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = config(dir.path(), |t| t.replace("10.0.1.11", "10.0.3.4"))?;
    refused(
        &path,
        &["--check-config"],
        &["eni[1]", "10.0.3.4", "subnet-a"],
    )?;
    refused(&path, &[], &["eni[1]", "10.0.3.4"])?;
    no_sockets(dir.path())
}

#[test]
fn a_bad_port_range_names_the_rule() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = config(dir.path(), |t| t.replace("\"5201\"", "\"70000\""))?;
    refused(&path, &[], &["sg-web", "ingress[0]", "70000"])?;
    no_sockets(dir.path())
}

#[test]
fn an_unknown_key_is_an_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = config(dir.path(), |t| {
        t.replace("vni = 100", "vni = 100\nvnii = 5")
    })?;
    refused(&path, &[], &["vnii"])?;
    no_sockets(dir.path())
}

#[test]
fn duplicate_macs_are_an_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = config(dir.path(), |t| {
        t.replace("02:00:0a:00:01:0b", "02:00:0a:00:01:0a")
    })?;
    refused(&path, &[], &["02:00:0a:00:01:0a"])?;
    no_sockets(dir.path())
}

#[test]
fn a_missing_config_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    refused(&dir.path().join("nope.toml"), &[], &["nope.toml"])?;
    Ok(())
}

#[test]
fn a_socket_path_that_is_a_file_is_not_deleted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let precious = dir.path().join("eni-0b2.sock");
    fs::write(&precious, b"do not delete")?;
    let path = config(dir.path(), |t| t)?;
    refused(&path, &[], &["eni-0b2", "not a socket"])?;
    ensure!(fs::read(&precious)? == b"do not delete");
    ensure!(!dir.path().join("eni-0a1.sock").exists());
    Ok(())
}

#[test]
fn a_socket_held_by_a_live_card_is_left_alone() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = config(dir.path(), |t| t)?;
    let mut first = KillOnDrop(
        Command::new(card_binary("vhost-net-backend")?)
            .args([os("--config"), path.as_os_str()])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let sock = dir.path().join("eni-0b2.sock");
    wait_for_socket(&sock, Some(&mut first.0), Duration::from_secs(20))?;
    refused(&path, &[], &["in use by a live process"])?;
    ensure!(first.0.try_wait()?.is_none(), "the first card died");
    UnixStream::connect(&sock)?;
    Ok(())
}

#[test]
fn a_vxlan_address_in_use_is_a_config_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let taken = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?;
    let path = config(dir.path(), |t| {
        format!("{t}\n[vxlan]\nlisten = \"{addr}\"\n")
    })?;
    refused(&path, &[], &["vxlan.listen", &addr.to_string()])?;
    no_sockets(dir.path())
}

#[test]
fn bad_flags_are_usage_errors() -> Result<()> {
    let out = card(&[os("--no-such-flag")])?;
    ensure!(out.status.code() == Some(2));
    let out = card(&[])?;
    ensure!(out.status.code() == Some(2), "--config is required");
    let out = card(&[os("--help")])?;
    ensure!(out.status.success());
    Ok(())
}

#[test]
fn a_stale_socket_is_reclaimed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    drop(UnixListener::bind(dir.path().join("eni-0a1.sock"))?);
    let path = config(dir.path(), |t| t)?;
    let mut card = KillOnDrop(
        Command::new(card_binary("vhost-net-backend")?)
            .args([os("--config"), path.as_os_str()])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let sock = dir.path().join("eni-0a1.sock");
    wait_for_socket(
        &dir.path().join("eni-0b2.sock"),
        Some(&mut card.0),
        Duration::from_secs(20),
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&sock).is_err() {
        ensure!(
            std::time::Instant::now() < deadline,
            "stale socket never served"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
