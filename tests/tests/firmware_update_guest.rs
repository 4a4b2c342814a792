//! Firmware updates under guest load (issue 8, item 4 b and c): every card
//! runs from a verified image under `host_runtime::card::Supervisor`, and is
//! restarted onto a second verified image while guests use it; an image
//! that fails verification is refused and the running card keeps running.
//! Guests are QEMU 11.1 under TCG launched by `host_runtime::instance`; run
//! this file alone (`cargo nextest run -p cardsim-tests --test
//! firmware_update_guest`).
//!
//! The NVMe card is updated too, but with no guest on it: QEMU's
//! vfio-user-pci has no reconnect, so a guest loses a namespace whose card
//! restarts.

use anyhow::{bail, ensure, Context, Result};
use card_firmware::agent::AgentClient;
use card_firmware::boot::{self, BootError, MeasuredBootLog, SigningKey, TrustedKeys};
use cardsim_tests::net_card::{iperf_json, GUEST_DHCP};
use cardsim_tests::{card_binary, guest_image, tail, Vmm, EXIT_MARKER};
use host_runtime::card::{
    CardKind, CardPhase, CardProgram, CardSpec, Supervisor, SupervisorConfig,
};
use host_runtime::crossbeam_channel;
use host_runtime::instance::{Accel, Instance, InstanceSpec, NicAttachment, VolumeAttachment};
use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const CARDS: [&str; 3] = ["vhost-blk-backend", "nvme-emulator", "vhost-net-backend"];
const V1: &str = "1.0.0-test";
const V2: &str = "2.0.0-test";
const BLK: &str = "blk-vol-0f1";
const NET: &str = "net-host";
const NVME: &str = "nvme-host";
const IP_A: &str = "10.0.1.10";
const IP_B: &str = "10.0.1.11";
const MAC_A: &str = "02:00:0a:00:01:0a";
const MAC_B: &str = "02:00:0a:00:01:0b";
const LOAD_STARTED: &str = "FW-LOAD-STARTED";

/// An image of this test build's card binaries, signed by `key` as `version`.
fn build_image(dir: &Path, key: &SigningKey, version: &str) -> Result<PathBuf> {
    let bin = boot::create_bin_dir(dir)?;
    for card in CARDS {
        fs::copy(card_binary(card)?, bin.join(card))?;
    }
    boot::sign_image(dir, key, version)?;
    Ok(dir.to_path_buf())
}

/// The verified-image program of one card binary.
fn program(dir: &Path, trusted: &TrustedKeys, binary: &str) -> Result<CardProgram, BootError> {
    Ok(CardProgram::Image {
        image: Arc::new(boot::verify_image(dir, trusted)?),
        binary: binary.into(),
    })
}

/// The cards and the supervisor a test's guests run on.
struct Host {
    dir: tempfile::TempDir,
    supervisor: Supervisor,
    boot_log: MeasuredBootLog,
    trusted: TrustedKeys,
    key: SigningKey,
    v1: PathBuf,
    volume_socket: PathBuf,
}

impl Host {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let key = boot::generate_signing_key()?;
        let trusted = TrustedKeys::from_keys(vec![key.verifying_key()]);
        let v1 = build_image(&dir.path().join("image-v1"), &key, V1)?;
        let boot_log = MeasuredBootLog::new(&dir.path().join("measured-boot.log"));
        let (tx, _events) = crossbeam_channel::unbounded();
        let supervisor = Supervisor::with_config(
            tx,
            SupervisorConfig {
                boot_log: Some(boot_log.clone()),
                ..SupervisorConfig::default()
            },
        );
        let volume_socket = dir.path().join("vol-0f1.sock");
        Ok(Self {
            dir,
            supervisor,
            boot_log,
            trusted,
            key,
            v1,
            volume_socket,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start(&self, name: &str, kind: CardKind, binary: &str, args: Vec<String>) -> Result<()> {
        let agent = self.path(&format!("{name}.agent.sock"));
        let mut args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        args.extend(["--agent".into(), agent.clone().into()]);
        let log = self.path(&format!("{name}.log"));
        self.supervisor.start(CardSpec {
            name: name.into(),
            kind,
            program: program(&self.v1, &self.trusted, binary)?,
            args,
            agent_socket: agent,
            log: log.clone(),
        })?;
        self.supervisor
            .wait_healthy(name, Duration::from_secs(20))
            .with_context(|| fs::read_to_string(&log).unwrap_or_default())?;
        Ok(())
    }

    /// The block card on a 64 MiB volume.
    fn start_block_card(&self) -> Result<()> {
        let backing = self.path("vol-0f1.img");
        fs::File::create(&backing)?.set_len(64 * MIB)?;
        let args = [
            "--socket",
            &self.volume_socket.display().to_string(),
            "--backing",
            &backing.display().to_string(),
            "--num-queues",
            "1",
        ];
        self.start(
            BLK,
            CardKind::Block,
            "vhost-blk-backend",
            args.map(String::from).to_vec(),
        )
    }

    /// The networking card with ENIs A and B in one subnet.
    fn start_net_card(&self) -> Result<()> {
        let vpc = self.path("vpc.toml");
        let eni = |id: &str, mac: &str, ip: &str| {
            format!(
                "[[eni]]\nid = \"{id}\"\nsocket = \"{}\"\nmac = \"{mac}\"\nip = \"{ip}\"\n\
                 subnet = \"subnet-a\"\nsecurity_groups = [\"sg-web\"]\n",
                self.path(&format!("{id}.sock")).display()
            )
        };
        fs::write(
            &vpc,
            format!(
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
{}
{}"#,
                eni("eni-0a", MAC_A, IP_A),
                eni("eni-0b", MAC_B, IP_B)
            ),
        )?;
        self.start(
            NET,
            CardKind::Net,
            "vhost-net-backend",
            vec!["--config".into(), vpc.display().to_string()],
        )
    }

    /// The NVMe card on one 64 MiB namespace (no guest on it).
    fn start_nvme_card(&self) -> Result<()> {
        let namespace = self.path("ns1.img");
        fs::File::create(&namespace)?.set_len(64 * MIB)?;
        let args = vec![
            "--socket".into(),
            self.path("nvme.sock").display().to_string(),
            "--namespace".into(),
            format!("{},size=64M", namespace.display()),
        ];
        self.start(NVME, CardKind::Nvme, "nvme-emulator", args)
    }

    fn pid(&self, card: &str) -> Result<u32> {
        self.supervisor
            .status(card)?
            .pid
            .with_context(|| format!("{card} is not running"))
    }

    /// The card answers its agent as the process the supervisor runs.
    fn check_healthy(&self, card: &str) -> Result<()> {
        let status = self.supervisor.status(card)?;
        ensure!(status.phase == CardPhase::Healthy, "{status:?}");
        let agent = self.path(&format!("{card}.agent.sock"));
        let mut client = AgentClient::connect(&agent, Duration::from_secs(5))?;
        ensure!(Some(client.card().pid) == status.pid, "{status:?}");
        ensure!(client.call("health", json!({}))?["status"] == "ok");
        Ok(())
    }

    fn instance(
        &self,
        id: &str,
        vcpus: u32,
        script: &str,
        volumes: Vec<VolumeAttachment>,
        enis: Vec<NicAttachment>,
    ) -> Result<Instance> {
        let image = guest_image()?;
        Vmm::Qemu11.available()?;
        Ok(Instance::launch(InstanceSpec {
            id: id.into(),
            vmm: Vmm::qemu11_root().join("usr/bin/qemu-system-x86_64"),
            vcpus,
            memory_mib: 512,
            kernel: image.kernel,
            initrd: image.initramfs,
            cmdline: image.cmdline,
            user_data: Some(script.into()),
            volumes,
            enis,
            namespaces: vec![],
            run_dir: self.path(id),
            hotplug_slots: 0,
            // KVM is not usable on these machines.
            accel: Accel::Tcg,
        })?)
    }

    fn volume(&self) -> VolumeAttachment {
        VolumeAttachment {
            id: "vol-0f1".into(),
            socket: self.volume_socket.clone(),
            num_queues: 1,
        }
    }

    fn eni(&self, id: &str, mac: &str) -> NicAttachment {
        NicAttachment {
            id: id.into(),
            socket: self.path(&format!("{id}.sock")),
            mac: mac.into(),
            queues: 1,
        }
    }
}

fn console(instance: &Instance) -> String {
    instance
        .console_log()
        .and_then(|log| fs::read(log).ok())
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default()
}

/// Waits for `needle` on the instance's serial console.
fn wait_console(instance: &mut Instance, needle: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = console(instance);
        if text.contains(needle) {
            return Ok(());
        }
        if let Some(status) = instance.exit_status() {
            bail!(
                "QEMU exited ({status}) before {needle:?}\n--- console tail ---\n{}",
                tail(&text, 40)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "no {needle:?} within {timeout:?}\n--- console tail ---\n{}",
                tail(&text, 40)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Guest shell: fio random writes with crc32c verification at iodepth 16 on
/// /dev/vda in the background (`$fio`), its JSON to /tmp/fio.json and every
/// I/O's completion time to /tmp/fiolat_lat.1.log.
fn fio_in_background(size_mib: u32) -> String {
    format!(
        "fio --name=update --filename=/dev/vda --rw=randwrite --bs=4k --iodepth=16 \
         --ioengine=libaio --direct=1 --verify=crc32c --verify_fatal=1 --size={size_mib}M \
         --rate_iops=500 --write_lat_log=/tmp/fiolat --log_avg_msec=0 \
         --output-format=json > /tmp/fio.json 2> /tmp/fio.err &\nfio=$!\n"
    )
}

/// Guest shell: waits for `$fio`, prints its JSON on one line and the
/// longest gap between two I/O completions (the pause the guest saw, as
/// `cargo xtask soak` measures it), and fails on an error.
const FIO_WAIT: &str = r#"
fio_rc=0
wait $fio || fio_rc=$?
echo "FIO-JSON $(tr -d '\n' < /tmp/fio.json)"
awk -F, 'NR > 1 { g = $1 - p; if (g > m) m = g } { p = $1 } END { print "FIO-LONGEST-GAP " m + 0 " ms" }' /tmp/fiolat_lat.1.log
echo "FIO-RC=$fio_rc"
[ $fio_rc -eq 0 ] || { cat /tmp/fio.err; exit 1; }
"#;

/// fio's result on a console: (errors, longest write latency, submission to
/// completion, in ms, longest gap between two completions in ms).
fn fio_result(console: &str) -> Result<(u64, f64, u64)> {
    let line = console
        .lines()
        .find_map(|l| l.split_once("FIO-JSON ").map(|(_, json)| json))
        .context("no fio result on the console")?;
    let json: Value = serde_json::from_str(line).context("fio's JSON")?;
    let job = json.pointer("/jobs/0").context("no fio job")?;
    let errors = job["error"].as_u64().context("fio: no error field")?;
    let max_ns = job
        .pointer("/write/lat_ns/max")
        .and_then(Value::as_f64)
        .context("fio: no write lat_ns.max")?;
    let gap_ms = console
        .lines()
        .find_map(|l| l.split_once("FIO-LONGEST-GAP ").map(|(_, g)| g))
        .and_then(|g| g.trim_end_matches(" ms").trim().parse().ok())
        .context("no FIO-LONGEST-GAP on the console")?;
    Ok((errors, max_ns / 1e6, gap_ms))
}

/// Guest A (volume + ENI A) runs fio and an iperf3 client to guest B (ENI
/// B, iperf3 server) while the block, networking and NVMe cards are updated
/// one at a time from image v1 to image v2; then the networking card is
/// killed (SIGKILL) and the supervisor starts it again. fio verifies every
/// write, iperf3's one TCP connection survives, the guest pings B at the end.
#[test]
fn guest_qemu11_every_card_updated_under_fio_and_iperf3() -> Result<()> {
    let host = Host::new()?;
    host.start_block_card()?;
    host.start_net_card()?;
    host.start_nvme_card()?;
    let v2 = build_image(&host.path("image-v2"), &host.key, V2)?;

    let server = format!(
        "{GUEST_DHCP}\ndhcp eth0\niperf3 -s -D -p 5201\necho FW-SERVER-READY\nsleep 3600\n"
    );
    let client = format!(
        r#"{GUEST_DHCP}
wait_dev /dev/vda
dhcp eth0
n=0
until ping -c 1 -W 1 {IP_B} > /dev/null 2>&1; do
    n=$((n + 1))
    [ $n -lt 60 ] || {{ echo "FW: no answer from {IP_B}"; exit 1; }}
done
{fio}echo {LOAD_STARTED}
iperf_json load -c {IP_B} -t 15 -i 1
{FIO_WAIT}
ping -c 1 -W 2 {IP_B}
echo FW-ALL-OK
"#,
        fio = fio_in_background(16),
    );
    let booting = Instant::now();
    let mut b = host.instance(
        "i-0b0000000000000b",
        1,
        &server,
        vec![],
        vec![host.eni("eni-0b", MAC_B)],
    )?;
    let mut a = host.instance(
        "i-0a0000000000000a",
        2,
        &client,
        vec![host.volume()],
        vec![host.eni("eni-0a", MAC_A)],
    )?;
    wait_console(&mut b, "FW-SERVER-READY", Duration::from_secs(60))?;
    wait_console(&mut a, LOAD_STARTED, Duration::from_secs(60))?;
    let load_started = Instant::now();
    eprintln!("guests booted, load started after {:?}", booting.elapsed());
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        !console(&a).contains("FIO-RC="),
        "fio ended before the update: slow it down"
    );

    let before: Vec<u32> = [BLK, NET, NVME]
        .iter()
        .map(|c| host.pid(c))
        .collect::<Result<_>>()?;
    for (card, binary) in [
        (BLK, "vhost-blk-backend"),
        (NET, "vhost-net-backend"),
        (NVME, "nvme-emulator"),
    ] {
        let verifying = Instant::now();
        let update = program(&v2, &host.trusted, binary)?;
        let updating = Instant::now();
        host.supervisor.restart(card, Some(update))?;
        // Figures for the report, not checked.
        eprintln!(
            "{card}: image v2 verified in {:?}; stop + start + healthy in {:?}",
            updating - verifying,
            updating.elapsed()
        );
        host.check_healthy(card)?;
        ensure!(
            host.supervisor.status(card)?.program.contains(V2),
            "{card} does not run {V2}"
        );
        if card == NET {
            // The guest's cards (block, networking) were updated under load.
            ensure!(
                !console(&a).contains("FIO-RC="),
                "fio ended before the guest's cards were updated: slow it down"
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let after: Vec<u32> = [BLK, NET, NVME]
        .iter()
        .map(|c| host.pid(c))
        .collect::<Result<_>>()?;
    for ((card, old), new) in [BLK, NET, NVME].iter().zip(&before).zip(&after) {
        ensure!(old != new, "{card} kept pid {old}");
    }

    // A crash of the networking card under the same TCP connection: the
    // supervisor starts v2 again, QEMU reconnects, iperf3 goes on.
    ensure!(
        !console(&a).contains("IPERF-JSON load"),
        "iperf3 ended before the networking card was killed: lengthen it"
    );
    let killed = host.pid(NET)?;
    // SAFETY: kill(2) on the supervised card's pid, not yet reaped.
    ensure!(unsafe { libc::kill(killed as libc::pid_t, libc::SIGKILL) } == 0);
    let crashed = Instant::now();
    let deadline = crashed + Duration::from_secs(20);
    while host
        .supervisor
        .status(NET)?
        .pid
        .is_none_or(|pid| pid == killed)
    {
        ensure!(Instant::now() < deadline, "{NET} was not started again");
        std::thread::sleep(Duration::from_millis(20));
    }
    host.supervisor.wait_healthy(NET, Duration::from_secs(20))?;
    // A figure for the report, not checked.
    eprintln!("{NET}: SIGKILL -> healthy again in {:?}", crashed.elapsed());
    host.check_healthy(NET)?;

    wait_console(
        &mut a,
        &format!("{EXIT_MARKER} rc="),
        Duration::from_secs(60),
    )?;
    eprintln!("load ran {:?}", load_started.elapsed());
    let text = console(&a);
    ensure!(
        text.contains(&format!("{EXIT_MARKER} rc=0")) && text.contains("FW-ALL-OK"),
        "guest A failed\n{}",
        tail(&text, 40)
    );
    let (errors, max_lat_ms, gap_ms) = fio_result(&text)?;
    ensure!(errors == 0, "fio reported error {errors}");
    let iperf = iperf_json(&text, "load")?;
    let retransmits = iperf
        .pointer("/end/sum_sent/retransmits")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let received = iperf
        .pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .with_context(|| {
            format!(
                "iperf3: no end.sum_received; error {}, end {}",
                iperf["error"], iperf["end"]
            )
        })?;
    let intervals: Vec<f64> = iperf["intervals"]
        .as_array()
        .context("iperf3: no intervals")?
        .iter()
        .filter_map(|i| i.pointer("/sum/bits_per_second").and_then(Value::as_f64))
        .collect();
    let lowest = intervals.iter().copied().fold(f64::INFINITY, f64::min);
    let stalled = intervals.iter().filter(|bps| **bps < 1e6).count();
    let per_second: Vec<String> = intervals
        .iter()
        .map(|bps| format!("{:.0}", bps / 1e6))
        .collect();
    // Figures for the report, not checked: TCG timings vary.
    eprintln!(
        "the longest I/O pause the guest saw: {gap_ms} ms between two completions; \
         longest fio write latency {max_lat_ms:.1} ms"
    );
    eprintln!(
        "iperf3: {:.1} Mbit/s overall, {retransmits} retransmits, lowest 1 s interval {:.2} Mbit/s, \
         {stalled} of {} intervals under 1 Mbit/s; per second (Mbit/s): {}",
        received / 1e6,
        lowest / 1e6,
        intervals.len(),
        per_second.join(" ")
    );

    // The measured-boot log: every start, v1 then v2 for each card, in one
    // unbroken chain.
    let entries = host.boot_log.verify()?;
    for (card, starts) in [
        (BLK, &[V1, V2][..]),
        (NET, &[V1, V2, V2]),
        (NVME, &[V1, V2]),
    ] {
        let versions: Vec<&str> = entries
            .iter()
            .filter(|e| e.card == card)
            .map(|e| e.image_version.as_str())
            .collect();
        ensure!(versions == starts, "{card}: boot log has {versions:?}");
    }
    a.stop(Duration::from_secs(10))?;
    b.stop(Duration::from_secs(10))?;
    Ok(())
}

/// A card running from image v1 is offered a tampered image (one flipped
/// byte in its binary) and an image signed by an unknown key, while a
/// guest writes to its volume: both refused, naming the problem; the card
/// keeps its pid and health, nothing is measured, and fio finishes clean.
#[test]
fn guest_qemu11_a_tampered_or_unknown_image_is_refused_and_the_card_keeps_running() -> Result<()> {
    let host = Host::new()?;
    host.start_block_card()?;
    let tampered = build_image(&host.path("image-tampered"), &host.key, V2)?;
    let binary = tampered.join("bin/vhost-blk-backend");
    let mut bytes = fs::read(&binary)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    fs::write(&binary, &bytes)?;
    let stranger = boot::generate_signing_key()?;
    let unknown = build_image(&host.path("image-unknown-key"), &stranger, V2)?;

    let script = format!(
        "wait_dev /dev/vda\n{}echo {LOAD_STARTED}\n{FIO_WAIT}echo FW-ALL-OK\n",
        fio_in_background(6)
    );
    let mut guest = host.instance(
        "i-0c0000000000000c",
        1,
        &script,
        vec![host.volume()],
        vec![],
    )?;
    wait_console(&mut guest, LOAD_STARTED, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        !console(&guest).contains("FIO-RC="),
        "fio ended before the update: slow it down"
    );
    let pid = host.pid(BLK)?;
    let measured = host.boot_log.verify()?.len();

    let refused = program(&tampered, &host.trusted, "vhost-blk-backend")
        .map(|p| host.supervisor.restart(BLK, Some(p)))
        .err()
        .context("the tampered image was taken")?;
    eprintln!("tampered image: {refused}");
    ensure!(
        matches!(&refused, BootError::DigestMismatch { name, .. } if name == "vhost-blk-backend"),
        "{refused}"
    );
    ensure!(
        refused.to_string().contains("vhost-blk-backend"),
        "{refused}"
    );

    let refused = program(&unknown, &host.trusted, "vhost-blk-backend")
        .map(|p| host.supervisor.restart(BLK, Some(p)))
        .err()
        .context("the image signed by an unknown key was taken")?;
    eprintln!("unknown key: {refused}");
    ensure!(matches!(refused, BootError::UnknownKey { .. }), "{refused}");

    ensure!(host.pid(BLK)? == pid, "the running card was replaced");
    host.check_healthy(BLK)?;
    ensure!(
        host.supervisor.status(BLK)?.program.contains(V1),
        "the card left image v1"
    );
    ensure!(
        host.boot_log.verify()?.len() == measured,
        "a refused image was measured"
    );

    wait_console(
        &mut guest,
        &format!("{EXIT_MARKER} rc="),
        Duration::from_secs(60),
    )?;
    let text = console(&guest);
    ensure!(
        text.contains(&format!("{EXIT_MARKER} rc=0")) && text.contains("FW-ALL-OK"),
        "the guest failed\n{}",
        tail(&text, 40)
    );
    let (errors, max_lat_ms, gap_ms) = fio_result(&text)?;
    ensure!(errors == 0, "fio reported error {errors}");
    eprintln!(
        "while refusing: longest gap between completions {gap_ms} ms, longest write latency {max_lat_ms:.1} ms"
    );
    ensure!(host.pid(BLK)? == pid, "the running card was replaced");
    guest.stop(Duration::from_secs(10))?;
    Ok(())
}
