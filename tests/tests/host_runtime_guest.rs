//! host-runtime against real cards and real guests: the supervisor on a
//! block card (killed, updated), an instance launched with a device of each
//! card, volume hot-plug over QMP, a supervised card killed under a guest's
//! fio, and what bad hot-plug requests get. Tests with "guest" in their name
//! boot a QEMU guest under TCG (run one at a time).

use anyhow::{bail, ensure, Context, Result};
use card_firmware::boot::{self, TrustedKeys};
use cardsim_tests::{card_binary, guest_image, tail, Vmm, EXIT_MARKER, READY_MARKER};
use host_runtime::card::{
    CardError, CardEvent, CardEventKind, CardKind, CardPhase, CardProgram, CardSpec, Supervisor,
};
use host_runtime::crossbeam_channel::{self, Receiver};
use host_runtime::instance::{
    Accel, Instance, InstanceError, InstanceSpec, NicAttachment, NvmeAttachment, VolumeAttachment,
};
use std::fs;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// A volume's card: a block card on a sparse backing file in `dir`.
struct Volume {
    id: String,
    backing: PathBuf,
    socket: PathBuf,
}

impl Volume {
    fn new(dir: &Path, id: &str) -> Result<Self> {
        let backing = dir.join(format!("{id}.img"));
        fs::File::create(&backing)?.set_len(64 * MIB)?;
        Ok(Self {
            id: id.into(),
            backing,
            socket: dir.join(format!("{id}.sock")),
        })
    }

    fn card(&self, dir: &Path) -> Result<CardSpec> {
        Ok(CardSpec {
            name: format!("blk-{}", self.id),
            kind: CardKind::Block,
            program: CardProgram::Binary(card_binary("vhost-blk-backend")?),
            args: vec![
                "--socket".into(),
                self.socket.clone().into(),
                "--backing".into(),
                self.backing.clone().into(),
                "--agent".into(),
                self.agent().into(),
                "--num-queues".into(),
                "1".into(),
            ],
            agent_socket: self.agent(),
            log: dir.join(format!("{}.log", self.id)),
        })
    }

    fn agent(&self) -> PathBuf {
        self.socket.with_extension("agent.sock")
    }

    fn attachment(&self) -> VolumeAttachment {
        VolumeAttachment {
            id: self.id.clone(),
            socket: self.socket.clone(),
            num_queues: 1,
        }
    }
}

fn vmm_binary(vmm: Vmm) -> Result<PathBuf> {
    vmm.available()?;
    Ok(match vmm {
        Vmm::Qemu7 => PathBuf::from("/usr/bin/qemu-system-x86_64"),
        Vmm::Qemu11 => Vmm::qemu11_root().join("usr/bin/qemu-system-x86_64"),
    })
}

fn spec(
    vmm: Vmm,
    dir: &Path,
    script: &str,
    volumes: Vec<VolumeAttachment>,
) -> Result<InstanceSpec> {
    let image = guest_image()?;
    Ok(InstanceSpec {
        id: "i-0123456789abcdef0".into(),
        vmm: vmm_binary(vmm)?,
        vcpus: 2,
        memory_mib: 512,
        kernel: image.kernel,
        initrd: image.initramfs,
        cmdline: image.cmdline,
        user_data: Some(script.into()),
        volumes,
        enis: vec![],
        namespaces: vec![],
        run_dir: dir.join("i-0123456789abcdef0"),
        hotplug_slots: 2,
        // KVM is not usable on these machines.
        accel: Accel::Tcg,
    })
}

/// Waits for `needle` on the instance's serial console (a file).
fn wait_console(instance: &mut Instance, needle: &str, timeout: Duration) -> Result<()> {
    let log = instance
        .console_log()
        .context("a launched instance")?
        .to_path_buf();
    let deadline = Instant::now() + timeout;
    loop {
        let text = String::from_utf8_lossy(&fs::read(&log).unwrap_or_default()).replace('\r', "");
        if text.contains(needle) {
            return Ok(());
        }
        if let Some(status) = instance.exit_status() {
            bail!(
                "QEMU exited ({status}) before {needle:?} on the console\n--- console tail ---\n{}",
                tail(&text, 30)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "no {needle:?} on the console within {timeout:?}\n--- console tail ---\n{}",
                tail(&text, 30)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The guest's script ran to its end with exit code 0, and QEMU exited.
fn wait_script_ok(instance: &mut Instance, timeout: Duration) -> Result<()> {
    wait_console(instance, &format!("{EXIT_MARKER} rc="), timeout)?;
    wait_console(instance, &format!("{EXIT_MARKER} rc=0"), Duration::ZERO)?;
    instance.stop(Duration::from_secs(20))?;
    Ok(())
}

fn collect_events(events: &Receiver<CardEvent>) -> Vec<CardEvent> {
    events.try_iter().collect()
}

#[test]
fn guest_qemu11_volume_hot_attach_and_detach() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (tx, _events) = crossbeam_channel::unbounded();
    let supervisor = Supervisor::new(tx);
    let root = Volume::new(dir.path(), "vol-0aaa")?;
    let data = Volume::new(dir.path(), "vol-0bbb")?;
    for v in [&root, &data] {
        let card = v.card(dir.path())?;
        let name = card.name.clone();
        supervisor.start(card)?;
        supervisor.wait_healthy(&name, Duration::from_secs(10))?;
    }
    let script = r#"
wait_dev /dev/vda
echo HR-WAITING-VDB
wait_dev /dev/vdb 60
echo HR-VDB-APPEARED
yes hotplug | head -c 1048576 > /tmp/pattern
dd if=/tmp/pattern of=/dev/vdb bs=65536 oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vdb bs=65536 count=16 iflag=direct 2>/dev/null | cmp - /tmp/pattern
echo HR-VDB-READBACK-OK
n=0
while [ -e /dev/vdb ]; do
    n=$((n + 1))
    [ $n -gt 600 ] && { echo "HR-VDB-STILL-THERE"; exit 1; }
    sleep 0.1
done
echo HR-VDB-GONE
"#;
    let mut instance = Instance::launch(spec(
        Vmm::Qemu11,
        dir.path(),
        script,
        vec![root.attachment()],
    )?)?;
    wait_console(&mut instance, "HR-WAITING-VDB", Duration::from_secs(60))?;

    let attaching = Instant::now();
    instance.attach_volume(&data.attachment())?;
    let attach_took = attaching.elapsed();
    ensure!(instance.devices()?.contains(&"blk-vol-0bbb".to_string()));
    wait_console(&mut instance, "HR-VDB-READBACK-OK", Duration::from_secs(30))?;
    // What the guest wrote went through the hot-plugged card to its file.
    let mut head = vec![0u8; 4096];
    fs::File::open(&data.backing)?.read_exact_at(&mut head, 0)?;
    ensure!(
        head.starts_with(b"hotplug\nhotplug\n"),
        "the volume's file did not get the guest's write"
    );

    let detaching = Instant::now();
    instance.detach_volume("vol-0bbb", Duration::from_secs(30))?;
    // Figures for the report, not checked: TCG timings vary.
    eprintln!(
        "attach (chardev-add + device_add) {attach_took:?}; detach (device_del to DEVICE_DELETED) {:?}",
        detaching.elapsed()
    );
    ensure!(!instance.devices()?.contains(&"blk-vol-0bbb".to_string()));
    wait_console(&mut instance, "HR-VDB-GONE", Duration::from_secs(30))?;
    wait_script_ok(&mut instance, Duration::from_secs(30))?;
    Ok(())
}

#[test]
fn guest_qemu11_supervisor_restarts_a_killed_card_under_fio() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (tx, events) = crossbeam_channel::unbounded();
    let supervisor = Supervisor::new(tx);
    let vol = Volume::new(dir.path(), "vol-0ccc")?;
    let card = vol.card(dir.path())?;
    let name = card.name.clone();
    supervisor.start(card)?;
    supervisor.wait_healthy(&name, Duration::from_secs(10))?;
    // Rate-limited so the card dies in the middle of the write phase.
    let script = r#"
wait_dev /dev/vda
echo HR-FIO-START
fio --name=restart --filename=/dev/vda --rw=randwrite --bs=4k --iodepth=8 --ioengine=libaio \
    --direct=1 --verify=crc32c --size=16M --rate_iops=1000 --output-format=terse
echo HR-FIO-OK
"#;
    let mut instance = Instance::launch(spec(
        Vmm::Qemu11,
        dir.path(),
        script,
        vec![vol.attachment()],
    )?)?;
    wait_console(&mut instance, "HR-FIO-START", Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(1));
    let console = fs::read_to_string(instance.console_log().context("console")?)?;
    ensure!(
        !console.contains("HR-FIO-OK"),
        "fio ended before the card was killed: slow it down"
    );
    let before = collect_events(&events);
    let pid = supervisor.status(&name)?.pid.context("the card runs")?;
    // SAFETY: kill(2) on the supervised card's pid, not yet reaped.
    ensure!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } == 0);

    wait_script_ok(&mut instance, Duration::from_secs(60))?;
    let console = fs::read_to_string(instance.console_log().context("console")?)?;
    ensure!(console.contains("HR-FIO-OK"), "{}", tail(&console, 30));

    let after: Vec<CardEvent> = collect_events(&events)
        .into_iter()
        .filter(|e| e.card == name)
        .collect();
    let at =
        |want: fn(&CardEventKind) -> bool| after.iter().find(|e| want(&e.kind)).map(|e| e.time);
    if let (Some(exited), Some(healthy)) = (
        at(|k| matches!(k, CardEventKind::Exited { .. })),
        at(|k| *k == CardEventKind::Healthy),
    ) {
        // A figure for the report, not checked.
        eprintln!(
            "card killed -> healthy again: {:?}",
            healthy.duration_since(exited).unwrap_or_default()
        );
    }
    let after: Vec<CardEventKind> = after.into_iter().map(|e| e.kind).collect();
    ensure!(
        before
            .iter()
            .all(|e| !matches!(e.kind, CardEventKind::Exited { .. })),
        "the card exited before it was killed: {before:?}"
    );
    let exited = after
        .iter()
        .position(|k| matches!(k, CardEventKind::Exited { status } if status.signal() == Some(libc::SIGKILL)))
        .with_context(|| format!("no Exited(SIGKILL) event: {after:?}"))?;
    let started = after[exited..]
        .iter()
        .position(|k| matches!(k, CardEventKind::Started { pid: new } if *new != pid))
        .with_context(|| format!("no Started after Exited: {after:?}"))?
        + exited;
    ensure!(
        after[started..].contains(&CardEventKind::Healthy),
        "no Healthy after the restart: {after:?}"
    );
    ensure!(supervisor.status(&name)?.restarts == 1);
    Ok(())
}

#[test]
fn guest_qemu7_bad_hot_plug_requests_change_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (tx, _events) = crossbeam_channel::unbounded();
    let supervisor = Supervisor::new(tx);
    let vol = Volume::new(dir.path(), "vol-0ddd")?;
    let card = vol.card(dir.path())?;
    let name = card.name.clone();
    supervisor.start(card)?;
    supervisor.wait_healthy(&name, Duration::from_secs(10))?;

    // vfio-user-pci is QEMU 10.1's: refused before anything starts.
    let mut nvme = spec(Vmm::Qemu7, dir.path(), "", vec![])?;
    nvme.namespaces.push(NvmeAttachment {
        id: "nvme0".into(),
        socket: dir.path().join("nvme.sock"),
    });
    let run_dir = nvme.run_dir.clone();
    let err = Instance::launch(nvme).unwrap_err();
    ensure!(matches!(err, InstanceError::Unsupported { .. }), "{err}");
    // A volume whose card is not running, an ENI with a multicast MAC:
    // refused before anything is written or started.
    let unserved = Volume::new(dir.path(), "vol-0fff")?;
    let err = Instance::launch(spec(
        Vmm::Qemu7,
        dir.path(),
        "",
        vec![unserved.attachment()],
    )?)
    .unwrap_err();
    ensure!(
        matches!(&err, InstanceError::CardNotServing { device, .. } if device == "blk-vol-0fff"),
        "{err}"
    );
    let mut bad_mac = spec(Vmm::Qemu7, dir.path(), "", vec![])?;
    bad_mac.enis.push(NicAttachment {
        id: "eni-0a1".into(),
        socket: dir.path().join("eni.sock"),
        mac: "01:00:5e:00:00:01".into(),
        queues: 1,
    });
    let err = Instance::launch(bad_mac).unwrap_err();
    ensure!(
        matches!(&err, InstanceError::InvalidSpec { detail, .. } if detail.contains("MAC")),
        "{err}"
    );
    ensure!(
        !run_dir.exists(),
        "a refused launch left {}",
        run_dir.display()
    );

    let mut spec = spec(Vmm::Qemu7, dir.path(), "echo HR-IDLE\nsleep 600", vec![])?;
    spec.hotplug_slots = 1;
    let mut instance = Instance::launch(spec)?;
    wait_console(&mut instance, READY_MARKER, Duration::from_secs(60))?;
    instance.attach_volume(&vol.attachment())?;
    let devices = instance.devices()?;
    let chardevs = instance
        .qmp()
        .execute("query-chardev", serde_json::json!({}))?;
    ensure!(devices.contains(&"blk-vol-0ddd".to_string()), "{devices:?}");

    let twice = instance.attach_volume(&vol.attachment()).unwrap_err();
    ensure!(
        matches!(&twice, InstanceError::AlreadyAttached { device, .. } if device == "blk-vol-0ddd"),
        "{twice}"
    );
    let other = Volume::new(dir.path(), "vol-0eee")?;
    let full = instance.attach_volume(&other.attachment()).unwrap_err();
    ensure!(matches!(full, InstanceError::NoFreeSlot { .. }), "{full}");
    let mut comma = other.attachment();
    comma.id = "vol-1,bus=x".into();
    let bad = instance.attach_volume(&comma).unwrap_err();
    ensure!(matches!(bad, InstanceError::InvalidSpec { .. }), "{bad}");
    ensure!(instance.devices()? == devices);
    ensure!(
        instance
            .qmp()
            .execute("query-chardev", serde_json::json!({}))?
            == chardevs
    );

    let missing = instance
        .detach_volume("vol-0fff", Duration::from_secs(5))
        .unwrap_err();
    ensure!(
        matches!(&missing, InstanceError::NotAttached { device, .. } if device == "blk-vol-0fff"),
        "{missing}"
    );
    ensure!(instance.devices()? == devices);
    instance.detach_volume("vol-0ddd", Duration::from_secs(30))?;
    ensure!(!instance.devices()?.contains(&"blk-vol-0ddd".to_string()));

    // A volume whose card is not running: refused before QEMU waits for it.
    let devices = instance.devices()?;
    let chardevs = instance
        .qmp()
        .execute("query-chardev", serde_json::json!({}))?;
    let unserved = instance.attach_volume(&other.attachment()).unwrap_err();
    ensure!(
        matches!(&unserved, InstanceError::CardNotServing { device, .. } if device == "blk-vol-0eee"),
        "{unserved}"
    );
    ensure!(instance.devices()? == devices);
    ensure!(
        instance
            .qmp()
            .execute("query-chardev", serde_json::json!({}))?
            == chardevs
    );
    ensure!(instance.status()?.running);

    // Released (a daemon restart) and registered again by its QMP socket:
    // hot-plug finds the launched instance's free root port through QEMU.
    let pid = instance.pid().context("a launched instance")?;
    let (id, qmp_socket) = (
        instance.id().to_string(),
        instance.qmp_socket().to_path_buf(),
    );
    instance.release();
    let mut instance = Instance::register(&id, &qmp_socket)?;
    ensure!(instance.status()?.running);
    instance.attach_volume(&vol.attachment())?;
    ensure!(instance.devices()?.contains(&"blk-vol-0ddd".to_string()));

    // The guest ignores ACPI power-off (busybox init): quit, then gone.
    instance.stop(Duration::from_secs(2))?;
    let mut status = 0;
    // SAFETY: waitpid(2) on our own child (QEMU), which nobody else reaps now.
    let reaped = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
    ensure!(reaped == pid as libc::pid_t, "QEMU was not reaped");
    ensure!(instance.status().is_err());
    Ok(())
}

/// One instance with one device of each card, every card under the
/// supervisor: the guest sees the volume, the namespace and the ENI (which
/// takes its address from the networking card's DHCP).
#[test]
fn guest_qemu11_instance_with_a_volume_a_namespace_and_an_eni() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (tx, _events) = crossbeam_channel::unbounded();
    let supervisor = Supervisor::new(tx);
    let vol = Volume::new(dir.path(), "vol-0123")?;
    let mut cards = vec![vol.card(dir.path())?];

    let namespace = dir.path().join("ns1.img");
    fs::File::create(&namespace)?.set_len(64 * MIB)?;
    let nvme_socket = dir.path().join("nvme.sock");
    cards.push(CardSpec {
        name: "nvme-i-0123".into(),
        kind: CardKind::Nvme,
        program: CardProgram::Binary(card_binary("nvme-emulator")?),
        args: vec![
            "--socket".into(),
            nvme_socket.clone().into(),
            "--namespace".into(),
            format!("{},size=64M", namespace.display()).into(),
            "--agent".into(),
            dir.path().join("nvme.agent.sock").into(),
        ],
        agent_socket: dir.path().join("nvme.agent.sock"),
        log: dir.path().join("nvme.log"),
    });

    let eni_socket = dir.path().join("eni-0a1.sock");
    let vpc = dir.path().join("vpc.toml");
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
[[eni]]
id = "eni-0a1"
socket = "{}"
mac = "02:00:0a:00:01:0a"
ip = "10.0.1.10"
subnet = "subnet-a"
"#,
            eni_socket.display()
        ),
    )?;
    cards.push(CardSpec {
        name: "net-host".into(),
        kind: CardKind::Net,
        program: CardProgram::Binary(card_binary("vhost-net-backend")?),
        args: vec![
            "--config".into(),
            vpc.into(),
            "--agent".into(),
            dir.path().join("net.agent.sock").into(),
        ],
        agent_socket: dir.path().join("net.agent.sock"),
        log: dir.path().join("net.log"),
    });
    for card in cards {
        let (name, log) = (card.name.clone(), card.log.clone());
        supervisor.start(card)?;
        supervisor
            .wait_healthy(&name, Duration::from_secs(20))
            .with_context(|| fs::read_to_string(&log).unwrap_or_default())?;
    }

    let script = format!(
        "{}\nwait_dev /dev/vda\nwait_dev /dev/nvme0n1 30\necho HR-DISKS-OK\ndhcp eth0\necho HR-ALL-OK\n",
        cardsim_tests::net_card::GUEST_DHCP
    );
    let mut spec = spec(Vmm::Qemu11, dir.path(), &script, vec![vol.attachment()])?;
    spec.namespaces.push(NvmeAttachment {
        id: "ns-0123".into(),
        socket: nvme_socket,
    });
    spec.enis.push(NicAttachment {
        id: "eni-0a1".into(),
        socket: eni_socket,
        mac: "02:00:0a:00:01:0a".into(),
        queues: 1,
    });
    let mut instance = Instance::launch(spec)?;
    wait_console(&mut instance, "HR-DISKS-OK", Duration::from_secs(60))?;
    wait_console(
        &mut instance,
        "DHCP-BOUND iface=eth0 ip=10.0.1.10",
        Duration::from_secs(30),
    )?;
    wait_script_ok(&mut instance, Duration::from_secs(30))?;
    let devices = instance.devices().unwrap_or_default();
    ensure!(devices.is_empty(), "QEMU has exited, yet lists {devices:?}");
    Ok(())
}

/// The supervisor on a real block card, no guest: killed, it is started
/// again and answers its agent; restarted on "new firmware" (the same
/// binary by another path), it runs that.
#[test]
fn supervisor_restarts_a_killed_block_card_and_updates_its_firmware() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (tx, events) = crossbeam_channel::unbounded();
    let supervisor = Supervisor::new(tx);
    let vol = Volume::new(dir.path(), "vol-0a11")?;
    let card = vol.card(dir.path())?;
    let name = card.name.clone();
    let pid = supervisor.start(card.clone())?;
    supervisor.wait_healthy(&name, Duration::from_secs(10))?;
    let twice = supervisor.start(card.clone()).unwrap_err();
    ensure!(matches!(twice, CardError::AlreadyExists { .. }), "{twice}");

    // SAFETY: kill(2) on the supervised card's pid, not yet reaped.
    ensure!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } == 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while !seen.contains(&CardEventKind::Healthy) || seen.len() < 5 {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = events
            .recv_timeout(left)
            .with_context(|| format!("events so far: {seen:?}"))?;
        seen.push(event.kind);
    }
    let new_pid = match seen.as_slice() {
        [CardEventKind::Started { pid: first }, CardEventKind::Healthy, CardEventKind::Exited { status }, CardEventKind::Restarting { after_ms: 100 }, CardEventKind::Started { pid: second }, ..]
            if *first == pid && status.signal() == Some(libc::SIGKILL) && *second != pid =>
        {
            *second
        }
        other => bail!("unexpected events: {other:?}"),
    };
    supervisor.wait_healthy(&name, Duration::from_secs(10))?;
    let status = supervisor.status(&name)?;
    ensure!(
        status.pid == Some(new_pid) && status.restarts == 1,
        "{status:?}"
    );

    let CardProgram::Binary(binary) = &card.program else {
        bail!("a binary card");
    };
    let v2 = dir.path().join("vhost-blk-backend-v2");
    std::os::unix::fs::symlink(binary, &v2)?;
    let updated = supervisor.restart(&name, Some(CardProgram::Binary(v2.clone())))?;
    let status = supervisor.status(&name)?;
    ensure!(
        status.pid == Some(updated) && updated != new_pid,
        "{status:?}"
    );
    ensure!(status.program == v2.display().to_string(), "{status:?}");

    // Firmware from a verified image: signed with a fresh key, checked, and
    // run from the verified bytes (the agent's pid check holds: the image's
    // command execs in the process the supervisor started).
    let image_dir = dir.path().join("image");
    let bin = boot::create_bin_dir(&image_dir)?;
    fs::copy(binary, bin.join("vhost-blk-backend"))?;
    let key = boot::generate_signing_key()?;
    boot::sign_image(&image_dir, &key, "2.0.0-test")?;
    let trusted = TrustedKeys::from_keys(vec![key.verifying_key()]);
    let image = Arc::new(boot::verify_image(&image_dir, &trusted)?);
    let from_image = supervisor.restart(
        &name,
        Some(CardProgram::Image {
            image,
            binary: "vhost-blk-backend".into(),
        }),
    )?;
    let status = supervisor.status(&name)?;
    ensure!(status.pid == Some(from_image), "{status:?}");
    ensure!(status.program.contains("version 2.0.0-test"), "{status:?}");

    // A spec that names the wrong kind of card: its agent says otherwise,
    // so it never counts as healthy.
    let mut wrong = Volume::new(dir.path(), "vol-0a22")?.card(dir.path())?;
    wrong.kind = CardKind::Net;
    supervisor.start(wrong)?;
    let err = supervisor
        .wait_healthy("blk-vol-0a22", Duration::from_secs(3))
        .unwrap_err();
    ensure!(
        err.to_string()
            .contains("is served by a Blk card, not a Net card"),
        "{err}"
    );
    supervisor.stop("blk-vol-0a22")?;

    // A firmware that is not there: refused, the card stays stopped on the
    // old program.
    let old_program = supervisor.status(&name)?.program;
    let missing = supervisor
        .restart(&name, Some(CardProgram::Binary(dir.path().join("nope"))))
        .unwrap_err();
    ensure!(
        matches!(missing, CardError::StartFailed { .. }),
        "{missing}"
    );
    let status = supervisor.status(&name)?;
    ensure!(status.phase == CardPhase::Stopped, "{status:?}");
    ensure!(status.program == old_program, "{status:?}");
    Ok(())
}
