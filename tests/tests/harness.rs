//! Proves the harness against a real vhost-user-blk peer,
//! qemu-storage-daemon, before any card of ours exists. Every test here
//! boots a guest, so each name contains "guest" (nextest runs those one at a
//! time; see .config/nextest.toml).

use anyhow::{ensure, Context, Result};
use cardsim_tests::{wait_for_socket, Guest, GuestError, KillOnDrop, Vmm};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const IMG_SIZE: u64 = 64 << 20;
/// Past fio's 16 MiB so fio's writes can't touch the pattern.
const PATTERN_OFFSET: u64 = 40 << 20;

/// The same bytes the guest's `printf` writes.
fn pattern() -> Vec<u8> {
    (0..256)
        .map(|i| format!("CARDSIM-PATTERN-{i:04}\n"))
        .collect::<String>()
        .into_bytes()
}

/// Starts qemu-storage-daemon exporting `img` as vhost-user-blk on `sock`.
fn storage_daemon(img: &Path, sock: &Path) -> Result<KillOnDrop> {
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={}",
            img.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues=2",
            sock.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .context("starting qemu-storage-daemon (cargo xtask deps installs it)")?;
    let mut child = KillOnDrop(child);
    wait_for_socket(sock, Some(&mut child.0), Duration::from_secs(10))?;
    Ok(child)
}

fn fio_and_pattern_on(vmm: Vmm) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("disk.img");
    let sock = dir.path().join("blk.sock");
    fs::File::create(&img)?.set_len(IMG_SIZE)?;
    let _qsd = storage_daemon(&img, &sock)?;

    let script = format!(
        r#"
ls -d /sys/module/nvme /sys/module/virtio_net /sys/module/virtio_blk
wait_dev /dev/vda
echo "vda: $(cat /sys/block/vda/size) sectors, $(ls /sys/block/vda/mq | wc -l) queues"
echo CARDSIM-FIO-START
fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio \
    --direct=1 --verify=crc32c --size=16M
printf 'CARDSIM-PATTERN-%04d\n' $(seq 0 255) > /tmp/pattern
dd if=/tmp/pattern of=/dev/vda bs=4096 seek={} conv=fsync
"#,
        PATTERN_OFFSET / 4096
    );
    let mut guest = Guest::builder(vmm)
        .smp(2)
        .mem_mib(512)
        .vhost_user_blk(&sock, 2, true)
        .script(&script)
        .timeout(Duration::from_secs(180))
        .boot()?;
    // Exercises acting mid-run: the host sees the cue before fio finishes.
    guest.wait_for_line("CARDSIM-FIO-START", Duration::from_secs(120))?;
    let out = guest.wait()?;
    eprintln!(
        "{vmm}: ready after {:?}, whole run {:?}",
        out.boot_time, out.elapsed
    );
    ensure!(
        !out.console.contains("cardsim: insmod"),
        "a module failed to load:\n{}",
        out.console
    );
    ensure!(
        out.console.contains("vda: 131072 sectors, 2 queues"),
        "{}",
        out.console
    );
    ensure!(
        out.console.contains("err= 0"),
        "fio reported errors:\n{}",
        out.console
    );

    let want = pattern();
    let mut got = vec![0u8; want.len()];
    fs::File::open(&img)?.read_exact_at(&mut got, PATTERN_OFFSET)?;
    ensure!(
        got == want,
        "pattern mismatch at {PATTERN_OFFSET}: read {:?}",
        String::from_utf8_lossy(&got[..64])
    );
    Ok(())
}

#[test]
fn guest_qemu7_qsd_fio_verify() -> Result<()> {
    fio_and_pattern_on(Vmm::Qemu7)
}

#[test]
fn guest_qemu11_qsd_fio_verify() -> Result<()> {
    fio_and_pattern_on(Vmm::Qemu11)
}

/// A failing command in the script must fail `wait()`, with the console in
/// the error, and stop the script there.
#[test]
fn guest_failing_script_fails_wait() -> Result<()> {
    let err = Guest::builder(Vmm::Qemu7)
        .script("echo before\nfalse\necho not-reached\n")
        .timeout(Duration::from_secs(120))
        .boot()?
        .wait()
        .expect_err("a failing script must fail wait()");
    let guest_err = err
        .downcast_ref::<GuestError>()
        .context("wait() should fail with a GuestError")?;
    let GuestError::ScriptFailed { rc, output } = guest_err else {
        anyhow::bail!("expected ScriptFailed, got: {guest_err}");
    };
    assert_eq!(*rc, 1);
    assert!(output.console.contains("before"), "{}", output.console);
    assert!(
        !output.console.contains("not-reached"),
        "{}",
        output.console
    );
    // The message carries the console's tail, for debugging.
    eprintln!("{err:#}");
    assert!(err.to_string().contains("CARDSIM-EXIT rc=1"), "{err}");
    Ok(())
}

/// QEMU refusing its command line must fail with QEMU's own message.
#[test]
fn guest_bad_qemu_arg_reports_stderr() -> Result<()> {
    let err = Guest::builder(Vmm::Qemu11)
        .qemu_arg("-device")
        .qemu_arg("no-such-device")
        .boot()?
        .wait()
        .expect_err("QEMU must refuse an unknown device");
    let msg = format!("{err:#}");
    eprintln!("{msg}");
    assert!(
        matches!(err.downcast_ref(), Some(GuestError::NoExit { .. })),
        "{msg}"
    );
    assert!(msg.contains("no-such-device"), "{msg}");
    Ok(())
}

/// A guest that never finishes is killed at its timeout, and the error shows
/// how far it got.
#[test]
fn guest_timeout_kills_qemu() -> Result<()> {
    let mut guest = Guest::builder(Vmm::Qemu7)
        .script("echo sleeping\nsleep 600\n")
        // Room for a slow boot on a loaded machine: the timeout must fall
        // after the script started, while it sleeps.
        .timeout(Duration::from_secs(40))
        .boot()?;
    guest.wait_for_line("sleeping", Duration::from_secs(40))?;
    let pid = guest.pid().context("QEMU should be running")?;
    let err = guest.wait().expect_err("the guest must time out");
    eprintln!("{err:#}");
    assert!(
        matches!(err.downcast_ref(), Some(GuestError::Timeout { .. })),
        "{err:#}"
    );
    assert!(format!("{err:#}").contains("sleeping"), "{err:#}");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU (pid {pid}) still runs"
    );
    Ok(())
}
