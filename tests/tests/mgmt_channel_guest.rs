//! mgmt-channel end to end: the daemon launches real cards and a real guest
//! (QEMU 11.1 under TCG), driven only through `cardctl --json`. Tests with
//! "guest" in their name boot a guest (run one at a time).

use anyhow::{bail, ensure, Context, Result};
use card_firmware::boot;
use cardsim_tests::{card_binary, guest_image, tail, Vmm, EXIT_MARKER};
use serde_json::Value;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A daemon on a temporary socket and state directory.
struct ControlPlane {
    daemon: Child,
    socket: PathBuf,
    state: PathBuf,
    cardctl: PathBuf,
}

impl ControlPlane {
    /// A daemon running the built cards unverified (`--card-bin-dir`).
    fn start(dir: &Path) -> Result<ControlPlane> {
        let bin_dir = card_binary("mgmt-channel")?
            .parent()
            .context("bin dir")?
            .to_path_buf();
        Self::start_with(dir, &["--card-bin-dir".as_ref(), bin_dir.as_os_str()])
    }

    /// A daemon whose cards come from `cards` (`--card-bin-dir DIR` or
    /// `--trusted-keys FILE --image DIR`).
    fn start_with(dir: &Path, cards: &[&std::ffi::OsStr]) -> Result<ControlPlane> {
        Vmm::Qemu11.available()?;
        let image = guest_image()?;
        let daemon_bin = card_binary("mgmt-channel")?;
        let socket = dir.join("api.sock");
        let state = dir.join("state");
        let log = fs::File::create(dir.join("daemon.log"))?;
        let daemon = Command::new(&daemon_bin)
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state)
            .args(cards)
            .arg("--vmm")
            .arg(Vmm::qemu11_root().join("usr/bin/qemu-system-x86_64"))
            .arg("--accel")
            .arg("tcg")
            .arg("--kernel")
            .arg(&image.kernel)
            .arg("--initrd")
            .arg(&image.initramfs)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting mgmt-channel")?;
        let cp = ControlPlane {
            daemon,
            socket,
            state,
            cardctl: card_binary("cardctl")?,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while cp.cardctl_raw(&["volume", "list"])?.0 != Some(0) {
            ensure!(Instant::now() < deadline, "mgmt-channel did not answer");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(cp)
    }

    /// Runs cardctl; its exit code and stdout, stderr.
    fn cardctl_raw(&self, args: &[&str]) -> Result<(Option<i32>, String, String)> {
        let out = Command::new(&self.cardctl)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--json")
            .args(args)
            .output()?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Runs cardctl and expects success: its JSON answer.
    fn cardctl(&self, args: &[&str]) -> Result<Value> {
        let (code, stdout, stderr) = self.cardctl_raw(args)?;
        ensure!(code == Some(0), "cardctl {args:?}: {stderr}{stdout}");
        Ok(serde_json::from_str(&stdout)?)
    }

    /// Runs cardctl and expects a refusal with this error code.
    fn refused(&self, args: &[&str], code: &str) -> Result<()> {
        let (exit, stdout, stderr) = self.cardctl_raw(args)?;
        ensure!(
            exit == Some(1),
            "cardctl {args:?} was not refused: {stdout}{stderr}"
        );
        let body: Value = serde_json::from_str(&stdout)?;
        ensure!(body["error"]["code"] == code, "cardctl {args:?}: {body}");
        Ok(())
    }

    fn card(&self, name: &str) -> Result<Value> {
        let cards = self.cardctl(&["cards"])?;
        cards
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == name).cloned())
            .with_context(|| format!("no card {name}: {cards}"))
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Terminate instances (their QEMUs outlive the daemon by design).
        if let Ok(list) = self.cardctl(&["instance", "list"]) {
            for i in list.as_array().into_iter().flatten() {
                if let Some(id) = i["id"].as_str() {
                    let _ = self.cardctl(&["instance", "terminate", id]);
                }
            }
        }
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.daemon.id() as i32, libc::SIGTERM) };
        let _ = self.daemon.wait();
    }
}

fn wait_console(log: &Path, needle: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = String::from_utf8_lossy(&fs::read(log).unwrap_or_default()).replace('\r', "");
        if text.contains(needle) {
            return Ok(());
        }
        if text.contains(&format!("{EXIT_MARKER} rc=")) && !needle.starts_with(EXIT_MARKER) {
            bail!(
                "the guest's script ended before {needle:?}\n{}",
                tail(&text, 30)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "no {needle:?} on the console within {timeout:?}\n{}",
                tail(&text, 30)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn id(v: &Value) -> Result<String> {
    Ok(v["id"].as_str().context("an id")?.to_string())
}

#[test]
fn guest_qemu11_cardctl_runs_an_instance_with_a_volume_and_a_namespace_and_hot_attaches_a_volume(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start(dir.path())?;
    let root = id(&cp.cardctl(&["volume", "create", "--size", "1G", "--type", "gp3"])?)?;
    let data = id(&cp.cardctl(&["volume", "create", "--size", "1G", "--type", "gp3"])?)?;
    let ns = id(&cp.cardctl(&["namespace", "create", "--size", "64M"])?)?;
    let script = dir.path().join("user-data.sh");
    fs::write(
        &script,
        r#"
wait_dev /dev/vda
wait_dev /dev/nvme0n1
yes nvme | head -c 65536 > /tmp/nvme
dd if=/tmp/nvme of=/dev/nvme0n1 bs=65536 oflag=direct 2>/dev/null
dd if=/dev/nvme0n1 bs=65536 count=1 iflag=direct 2>/dev/null | cmp - /tmp/nvme
echo MC-WAITING-VDB
wait_dev /dev/vdb 60
yes hotplug | head -c 1048576 > /tmp/pattern
dd if=/tmp/pattern of=/dev/vdb bs=65536 oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vdb bs=65536 count=16 iflag=direct 2>/dev/null | cmp - /tmp/pattern
echo MC-VDB-READBACK-OK
n=0
while [ -e /dev/vdb ]; do
    n=$((n + 1))
    [ $n -gt 600 ] && { echo MC-VDB-STILL-THERE; exit 1; }
    sleep 0.1
done
echo MC-VDB-GONE
"#,
    )?;
    let instance = cp.cardctl(&[
        "instance",
        "run",
        "--volume",
        &root,
        "--namespace",
        &ns,
        "--vcpus",
        "2",
        "--user-data",
        script.to_str().context("path")?,
        "--wait-for",
        "MC-WAITING-VDB",
        "--wait-timeout",
        "90",
    ])?;
    let i = id(&instance)?;
    let console = PathBuf::from(instance["console_log"].as_str().context("console")?);
    ensure!(cp.cardctl(&["describe", &root])?["attached_to"] == i.as_str());
    ensure!(cp.cardctl(&["describe", &ns])?["attached_to"] == i.as_str());
    // The guest's NVMe write reached the namespace's file through its card.
    let mut nvme = vec![0u8; 10];
    fs::File::open(cp.state.join(format!("namespaces/{ns}.img")))?.read_exact_at(&mut nvme, 0)?;
    ensure!(
        nvme == b"nvme\nnvme\n",
        "the namespace's file did not get the guest's write"
    );

    let attached = cp.cardctl(&["volume", "attach", &data, "--instance", &i])?;
    ensure!(attached["state"] == "in-use", "{attached}");
    cp.refused(&["volume", "attach", &data, "--instance", &i], "conflict")?;
    wait_console(&console, "MC-VDB-READBACK-OK", Duration::from_secs(30))?;
    // What the guest wrote went through the hot-plugged card to its file.
    let mut head = vec![0u8; 16];
    fs::File::open(cp.state.join(format!("volumes/{data}.img")))?.read_exact_at(&mut head, 0)?;
    ensure!(
        head == b"hotplug\nhotplug\n",
        "the volume's file did not get the guest's write"
    );

    // modify-volume, live: the card's limits change under the running guest.
    cp.cardctl(&[
        "volume",
        "modify",
        &data,
        "--iops",
        "3000",
        "--throughput",
        "250",
    ])?;
    let metrics = cp.cardctl(&["metrics", &format!("blk-{data}")])?;
    ensure!(
        metrics["metrics"]["volume"]["limits"]["baseline_mibps"] == 250,
        "{metrics}"
    );

    let detached = cp.cardctl(&["volume", "detach", &data])?;
    ensure!(detached["state"] == "available", "{detached}");
    wait_console(&console, "MC-VDB-GONE", Duration::from_secs(30))?;
    cp.refused(&["volume", "detach", &data], "conflict")?;
    wait_console(
        &console,
        &format!("{EXIT_MARKER} rc=0"),
        Duration::from_secs(30),
    )?;
    let events = cp.cardctl(&["events", "--resource", &data])?;
    let kinds: Vec<&str> = events
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    ensure!(
        kinds == ["created", "attached", "modified", "detached"],
        "{kinds:?}"
    );
    cp.cardctl(&["instance", "terminate", &i])?;
    ensure!(cp.cardctl(&["describe", &root])?["state"] == "available");
    ensure!(cp.cardctl(&["describe", &ns])?["state"] == "available");
    Ok(())
}

#[test]
fn guest_qemu11_a_killed_card_is_restarted_and_the_guest_io_resumes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start(dir.path())?;
    let vol = id(&cp.cardctl(&["volume", "create", "--size", "1G", "--type", "gp3"])?)?;
    let script = dir.path().join("user-data.sh");
    // Rate-limited so the card dies in the middle of the writes.
    fs::write(
        &script,
        r#"
wait_dev /dev/vda
echo MC-FIO-START
fio --name=restart --filename=/dev/vda --rw=randwrite --bs=4k --iodepth=8 --ioengine=libaio \
    --direct=1 --verify=crc32c --size=16M --rate_iops=1000 --output-format=terse
echo MC-FIO-OK
"#,
    )?;
    let instance = cp.cardctl(&[
        "instance",
        "run",
        "--volume",
        &vol,
        "--vcpus",
        "2",
        "--user-data",
        script.to_str().context("path")?,
        "--wait-for",
        "MC-FIO-START",
        "--wait-timeout",
        "90",
    ])?;
    let console = PathBuf::from(instance["console_log"].as_str().context("console")?);
    std::thread::sleep(Duration::from_secs(1));
    let text = fs::read_to_string(&console)?;
    ensure!(
        !text.contains("MC-FIO-OK"),
        "fio ended before the card was killed"
    );
    let card = format!("blk-{vol}");
    let pid = cp.card(&card)?["pid"].as_u64().context("the card runs")?;
    // SAFETY: kill(2) on the pid the daemon reports for its card.
    ensure!(unsafe { libc::kill(pid as i32, libc::SIGKILL) } == 0);

    wait_console(&console, "MC-FIO-OK", Duration::from_secs(60))?;
    wait_console(
        &console,
        &format!("{EXIT_MARKER} rc=0"),
        Duration::from_secs(10),
    )?;
    let now = cp.card(&card)?;
    ensure!(now["restarts"] == 1 && now["phase"] == "healthy", "{now}");
    ensure!(now["pid"].as_u64() != Some(pid));
    let events = cp.cardctl(&["events", "--resource", &card])?;
    let kinds: Vec<&str> = events
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    let exited = kinds
        .iter()
        .position(|k| *k == "card-exited")
        .with_context(|| format!("{kinds:?}"))?;
    ensure!(
        kinds[exited..].contains(&"card-restarting") && kinds[exited..].contains(&"card-healthy"),
        "{kinds:?}"
    );
    Ok(())
}

/// A card image of the built cards, signed by `key`.
fn card_image(dir: &Path, key: &boot::SigningKey, version: &str) -> Result<PathBuf> {
    let bin = boot::create_bin_dir(dir)?;
    for card in ["vhost-blk-backend", "nvme-emulator", "vhost-net-backend"] {
        fs::copy(card_binary(card)?, bin.join(card))?;
    }
    boot::sign_image(dir, key, version)?;
    Ok(dir.to_path_buf())
}

/// `cardctl firmware update` while fio writes with verification in a guest:
/// the volume's card is restarted on the new image under the I/O, and fio
/// sees no error.
#[test]
fn guest_qemu11_cardctl_firmware_update_under_fio_verify() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let key = boot::generate_signing_key()?;
    let v1 = card_image(&dir.path().join("v1"), &key, "1.0.0")?;
    let v2 = card_image(&dir.path().join("v2"), &key, "2.0.0")?;
    let keys = dir.path().join("trusted-keys");
    fs::write(&keys, boot::public_key_hex(&key.verifying_key()))?;
    let cp = ControlPlane::start_with(
        dir.path(),
        &[
            "--trusted-keys".as_ref(),
            keys.as_os_str(),
            "--image".as_ref(),
            v1.as_os_str(),
        ],
    )?;
    let vol = id(&cp.cardctl(&["volume", "create", "--size", "1G", "--type", "gp3"])?)?;
    let card = format!("blk-{vol}");
    let script = dir.path().join("user-data.sh");
    // Rate-limited so the update lands in the middle of the writes.
    fs::write(
        &script,
        format!(
            "wait_dev /dev/vda\necho MC-FIO-START\n{}",
            cardsim_tests::fio::job(
                "update",
                "--rw=randwrite --bs=4k --iodepth=8 --verify=crc32c --size=32M --rate_iops=1000"
            )
        ),
    )?;
    let instance = cp.cardctl(&[
        "instance",
        "run",
        "--volume",
        &vol,
        "--vcpus",
        "2",
        "--user-data",
        script.to_str().context("path")?,
        "--wait-for",
        "MC-FIO-START",
        "--wait-timeout",
        "90",
    ])?;
    let console = PathBuf::from(instance["console_log"].as_str().context("console")?);
    std::thread::sleep(Duration::from_secs(1));
    let old_pid = cp.card(&card)?["pid"].as_u64().context("the card runs")?;

    let started = Instant::now();
    let updated = cp.cardctl(&["firmware", "update", v2.to_str().context("path")?])?;
    let took = started.elapsed();
    let text = fs::read_to_string(&console)?;
    ensure!(
        !text.contains(cardsim_tests::fio::END),
        "fio ended before the update did:\n{}",
        tail(&text, 20)
    );
    ensure!(updated["firmware"]["version"] == "2.0.0", "{updated}");
    let now = cp.card(&card)?;
    ensure!(
        now["phase"] == "healthy" && now["pid"].as_u64() != Some(old_pid),
        "{now}"
    );

    wait_console(
        &console,
        &format!("{EXIT_MARKER} rc="),
        Duration::from_secs(120),
    )?;
    let text = fs::read_to_string(&console)?;
    let reports = cardsim_tests::fio::reports(&text)?;
    let job = &reports
        .first()
        .with_context(|| format!("no fio report:\n{}", tail(&text, 30)))?["jobs"][0];
    ensure!(job["error"] == 0, "fio: {job}\n{}", tail(&text, 20));
    ensure!(
        text.contains(&format!("{EXIT_MARKER} rc=0")),
        "{}",
        tail(&text, 20)
    );
    let written = job["write"]["total_ios"].as_u64().unwrap_or(0);
    let verified = job["read"]["total_ios"].as_u64().unwrap_or(0);
    ensure!(
        written == 8192 && verified == 8192,
        "fio wrote {written} and verified {verified} blocks of 4 KiB (8192 each expected)"
    );
    let log = cp.cardctl(&["firmware", "log"])?;
    ensure!(log["verified"] == true, "{log}");
    println!(
        "firmware update under fio: cardctl answered in {:.2} s (card {card}: pid {old_pid} -> {})",
        took.as_secs_f64(),
        now["pid"]
    );
    Ok(())
}
