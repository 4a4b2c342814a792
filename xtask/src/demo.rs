//! `cargo xtask demo`: a small cloud on one host, driven by its control plane.
//!
//! Starts mgmt-channel (release build) on a fresh state directory, its cards
//! from a verified image signed with a throwaway key, then, only
//! through `cardctl`: a subnet, a security group allowing iperf3 and ping, a
//! gp3 volume and two ENIs; two instances (QEMU 11.1 when `cargo xtask deps`
//! prepared it, else the host's 7.2). The first runs fio on its volume and
//! iperf3 to the second across the networking card. Prints what fio and
//! iperf3 saw, then the control plane's view (volumes, ENIs, instances,
//! cards, firmware) as cardctl shows it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cardsim_tests::net_card::{dhcp_lease, iperf_received_bps, GUEST_DHCP};
use cardsim_tests::{guest_image, KillOnDrop, Vmm, EXIT_MARKER};
use serde_json::Value;

const RUNTIME_SECS: u32 = 5;
const SERVER_READY: &str = "DEMO-SERVER-READY";

/// The daemon and the CLI, both from the release build.
struct ControlPlane {
    cardctl: PathBuf,
    socket: PathBuf,
}

impl ControlPlane {
    /// cardctl with `--json`: its answer.
    fn json(&self, args: &[&str]) -> Result<Value> {
        let out = Command::new(&self.cardctl)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--json")
            .args(args)
            .output()
            .context("running cardctl")?;
        ensure!(
            out.status.success(),
            "cardctl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// cardctl as a person sees it (tables, progress) and the command echoed.
    fn show(&self, args: &[&str]) -> Result<()> {
        println!("$ cardctl {}", args.join(" "));
        let status = Command::new(&self.cardctl)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .status()?;
        ensure!(status.success(), "cardctl {} failed", args.join(" "));
        Ok(())
    }

    fn id(&self, args: &[&str]) -> Result<String> {
        let v = self.json(args)?;
        let id = v["id"].as_str().context("an id")?.to_string();
        println!("$ cardctl {}  ->  {id}", args.join(" "));
        Ok(id)
    }
}

/// Runs the demo against the release binaries (built by the caller).
pub fn run_demo() -> Result<()> {
    // CARDSIM_BIN_DIR (as the tests take it) runs the demo on another build.
    let bin = std::env::var_os("CARDSIM_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cardsim_tests::target_dir().join("release"));
    for b in [
        "mgmt-channel",
        "cardctl",
        "vhost-blk-backend",
        "vhost-net-backend",
    ] {
        if !bin.join(b).is_file() {
            bail!(
                "{b} is not built yet ({} is missing)",
                bin.join(b).display()
            );
        }
    }
    let vmm = if Vmm::Qemu11.available().is_ok() {
        Vmm::Qemu11
    } else {
        Vmm::Qemu7
    };
    let vmm_path = match vmm {
        Vmm::Qemu11 => Vmm::qemu11_root().join("usr/bin/qemu-system-x86_64"),
        Vmm::Qemu7 => PathBuf::from("/usr/bin/qemu-system-x86_64"),
    };
    let image = guest_image()?;
    let dir = cardsim_tests::cache_dir().join("demo");
    // A fresh control plane each time: nothing carried over.
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let socket = dir.join("mgmt.sock");
    let log = dir.join("mgmt-channel.log");

    println!("cardsim demo: mgmt-channel with {vmm} guests (TCG)\n");
    let (image_dir, trusted_keys) = demo_image(&bin, &dir)?;
    let daemon = Command::new(bin.join("mgmt-channel"))
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--trusted-keys")
        .arg(&trusted_keys)
        .arg("--image")
        .arg(&image_dir)
        .arg("--vmm")
        .arg(&vmm_path)
        .arg("--kernel")
        .arg(&image.kernel)
        .arg("--initrd")
        .arg(&image.initramfs)
        .stdin(Stdio::null())
        .stderr(fs::File::create(&log)?)
        .spawn()
        .context("starting mgmt-channel")?;
    let daemon = KillOnDrop(daemon);
    let cp = ControlPlane {
        cardctl: bin.join("cardctl"),
        socket,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while cp.json(&["cards"]).is_err() {
        ensure!(
            Instant::now() < deadline,
            "mgmt-channel did not answer; see {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let result = demo(&cp, &dir);
    // Instances first (their QEMUs would outlive the daemon), then the
    // daemon, which stops every card.
    if let Ok(list) = cp.json(&["instance", "list"]) {
        for i in list.as_array().into_iter().flatten() {
            if let Some(id) = i["id"].as_str() {
                let _ = cp.json(&["instance", "terminate", id]);
            }
        }
    }
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    // The daemon stops its cards on SIGTERM; killing it first would leave
    // them running.
    let mut daemon = daemon;
    let deadline = Instant::now() + Duration::from_secs(20);
    while matches!(daemon.0.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(daemon);
    result
}

fn demo(cp: &ControlPlane, dir: &Path) -> Result<()> {
    let subnet = cp.id(&["subnet", "create", "--cidr", "10.0.1.0/24"])?;
    let sg = cp.id(&[
        "sg",
        "create",
        "--description",
        "iperf3 and ping",
        "--ingress",
        "tcp:5201:10.0.0.0/16",
        "--ingress",
        "icmp:10.0.0.0/16",
    ])?;
    let vol = cp.id(&[
        "volume", "create", "--size", "8G", "--type", "gp3", "--iops", "3000",
    ])?;
    let eni_client = cp.id(&["eni", "create", "--subnet", &subnet, "--sg", &sg])?;
    let eni_server = cp.id(&["eni", "create", "--subnet", &subnet, "--sg", &sg])?;
    let server_ip = cp.json(&["describe", &eni_server])?["ip"]
        .as_str()
        .context("ip")?
        .to_string();

    let server_script = dir.join("server.sh");
    fs::write(
        &server_script,
        format!("{GUEST_DHCP}\ndhcp eth0\niperf3 -s -D\necho {SERVER_READY}\nsleep 600\n"),
    )?;
    let client_script = dir.join("client.sh");
    fs::write(
        &client_script,
        format!(
            "{GUEST_DHCP}\nwait_dev /dev/vda\ndhcp eth0\n\
             n=0; until ping -c 1 -W 1 {server_ip} > /dev/null; do n=$((n+1)); [ $n -gt 30 ] && exit 1; done\n\
             {}iperf_json demo -c {server_ip} -t {RUNTIME_SECS}\n",
            cardsim_tests::fio::job(
                "randrw",
                &format!("--rw=randrw --bs=4k --iodepth=16 --time_based --runtime={RUNTIME_SECS} --size=1G"),
            )
        ),
    )?;
    let path = |p: &Path| p.to_str().map(str::to_string).context("a UTF-8 path");
    println!();
    cp.show(&[
        "instance",
        "run",
        "--eni",
        &eni_server,
        "--vcpus",
        "2",
        "--user-data",
        &path(&server_script)?,
        "--wait-for",
        SERVER_READY,
    ])?;
    cp.show(&[
        "instance",
        "run",
        "--volume",
        &vol,
        "--eni",
        &eni_client,
        "--vcpus",
        "2",
        "--user-data",
        &path(&client_script)?,
    ])?;
    let instances = cp.json(&["instance", "list"])?;
    let client = instances
        .as_array()
        .and_then(|l| l.iter().find(|i| i["volumes"][0] == vol.as_str()))
        .context("the client instance")?;
    let console = PathBuf::from(client["console_log"].as_str().context("console")?);
    let text = wait_exit(&console, Duration::from_secs(240))?;
    ensure!(
        text.contains(&format!("{EXIT_MARKER} rc=0")),
        "the client's script failed:\n{}",
        cardsim_tests::tail(&text, 40)
    );

    let reports = cardsim_tests::fio::reports(&text)?;
    let fio = reports.first().context("no fio report")?;
    let job = &fio["jobs"][0];
    let lease = dhcp_lease(&text).context("the client got no DHCP lease")?;
    let bps = iperf_received_bps(&text, "demo")?;
    println!();
    println!(
        "{:<40} {:>9} {:>9} {:>10}",
        "workload", "IOPS", "MiB/s", "p99 (us)"
    );
    for side in ["read", "write"] {
        let s = &job[side];
        println!(
            "{:<40} {:>9.0} {:>9.1} {:>10.0}",
            format!("fio 4k rand{side} ({vol})"),
            s["iops"].as_f64().unwrap_or(0.0),
            s["bw"].as_f64().unwrap_or(0.0) / 1024.0,
            s["clat_ns"]["percentile"]["99.000000"]
                .as_f64()
                .unwrap_or(0.0)
                / 1000.0,
        );
    }
    println!(
        "iperf3 {} -> {server_ip}: {:.0} Mbit/s over {RUNTIME_SECS} s",
        lease.ip,
        bps / 1e6
    );
    println!();
    for what in [
        &["volume", "list"][..],
        &["eni", "list"],
        &["instance", "list"],
        &["cards"],
        &["firmware", "show"],
    ] {
        cp.show(what)?;
    }
    println!(
        "\nUnder TCG these figures measure QEMU's CPU emulation more than the cards;\n\
         `cardbench` drives the cards without a guest. State: {}",
        dir.join("state").display()
    );
    Ok(())
}

/// The cards as a verified image signed with a throwaway key (what `cargo
/// xtask image build` makes with a kept one): the image and the
/// trusted-keys file naming the key.
fn demo_image(bin: &Path, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    use card_firmware::boot;
    let image = dir.join("image");
    let image_bin = boot::create_bin_dir(&image)?;
    for card in ["vhost-blk-backend", "nvme-emulator", "vhost-net-backend"] {
        if bin.join(card).is_file() {
            fs::copy(bin.join(card), image_bin.join(card))
                .with_context(|| format!("copying {card} into the demo image"))?;
        }
    }
    let key = boot::generate_signing_key().context("no randomness for a key")?;
    boot::sign_image(&image, &key, "demo")?;
    let trusted = dir.join("trusted-keys");
    fs::write(
        &trusted,
        format!(
            "# the demo's throwaway key\n{}\n",
            boot::public_key_hex(&key.verifying_key())
        ),
    )?;
    Ok((image, trusted))
}

/// Waits until the guest's script has ended; the console's text.
fn wait_exit(console: &Path, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let text =
            String::from_utf8_lossy(&fs::read(console).unwrap_or_default()).replace('\r', "");
        if text.contains(&format!("{EXIT_MARKER} rc=")) {
            return Ok(text);
        }
        if Instant::now() >= deadline {
            bail!(
                "the client did not finish within {timeout:?}:\n{}",
                cardsim_tests::tail(&text, 40)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
