//! The block card under a real Linux guest, on QEMU 7.2 and QEMU 11.1.
//!
//! Every test here boots a guest, so each name contains "guest" (nextest runs
//! those one at a time; see .config/nextest.toml).

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Result};
use cardsim_tests::block_card::BlockCard;
use cardsim_tests::pagecache::dirty_pages;
use cardsim_tests::{target_dir, Guest, Vmm};

const VOLUME_SIZE: u64 = 128 << 20;
/// Where the guest writes known blocks, past fio's 64 MiB.
const PATTERN_OFFSETS: [u64; 3] = [80 << 20, (100 << 20) + 4096, VOLUME_SIZE - 4096];
const DISCARD_OFFSET: u64 = 90 << 20;
const DISCARD_LEN: u64 = 1 << 20;

/// The 4 KiB block the guest writes at `offset`:
/// `yes "cardsim block at OFFSET" | head -c 4096`.
fn block_pattern(offset: u64) -> Vec<u8> {
    format!("cardsim block at {offset}\n")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(4096)
        .collect()
}

/// A scratch folder on a real filesystem (the flush check reads page flags,
/// which tmpfs does not keep).
fn scratch() -> Result<tempfile::TempDir> {
    Ok(tempfile::tempdir_in(target_dir())?)
}

fn backing_file(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("vol.img");
    fs::File::create(&path)?.set_len(VOLUME_SIZE)?;
    Ok(path)
}

fn total_dirty(backing: &Path) -> Result<usize> {
    let mut dirty = 0;
    for offset in PATTERN_OFFSETS {
        dirty += dirty_pages(backing, offset, 4096)?;
    }
    Ok(dirty)
}

/// fio with verification on both queues, known blocks that must reach the
/// file, a flush that must leave nothing dirty on the host, a discard and a
/// write-zeroes that must read back as zeros.
fn guest_io_through_the_card(vmm: Vmm) -> Result<()> {
    let dir = scratch()?;
    let backing = backing_file(dir.path())?;
    let card = BlockCard::start(dir.path(), &backing, &["--num-queues", "2"])?;

    let writes: String = PATTERN_OFFSETS
        .iter()
        .map(|o| {
            format!(
                "yes 'cardsim block at {o}' | head -c 4096 > /tmp/p\n\
                 dd if=/tmp/p of=/dev/vda bs=4096 seek={} count=1 oflag=direct\n",
                o / 4096
            )
        })
        .collect();
    let script = format!(
        r#"
wait_dev /dev/vda
echo "vda: $(cat /sys/block/vda/size) sectors, $(ls /sys/block/vda/mq | wc -l) queues, serial $(cat /sys/block/vda/serial)"
# One fio job per vCPU, so both virtqueues carry verified I/O.
fio --name=verify --filename=/dev/vda --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio \
    --direct=1 --verify=crc32c --size=32M --numjobs=2 --offset_increment=32M \
    --cpus_allowed=0-1 --cpus_allowed_policy=split --group_reporting
{writes}
echo CARDSIM-STEP-WRITTEN
sleep 4
dd if=/dev/zero of=/dev/vda bs=512 count=0 conv=fsync
echo CARDSIM-STEP-FLUSHED
sleep 4
yes discard-me | head -c {discard_len} > /tmp/d
dd if=/tmp/d of=/dev/vda bs=65536 seek={discard_seek} oflag=direct
blkdiscard -o {discard_offset} -l {discard_len} /dev/vda
zeros=$(head -c {discard_len} /dev/zero | md5sum)
got=$(dd if=/dev/vda bs=65536 skip={discard_seek} count={discard_count} iflag=direct | md5sum)
[ "$zeros" = "$got" ] || {{ echo "discarded range does not read as zeros"; exit 1; }}
echo CARDSIM-STEP-DISCARDED
dd if=/tmp/d of=/dev/vda bs=65536 seek={discard_seek} oflag=direct
/usr/sbin/blkdiscard -z -o {discard_offset} -l {discard_len} /dev/vda
got=$(dd if=/dev/vda bs=65536 skip={discard_seek} count={discard_count} iflag=direct | md5sum)
[ "$zeros" = "$got" ] || {{ echo "zeroed range does not read as zeros"; exit 1; }}
echo CARDSIM-STEP-ZEROED
"#,
        discard_offset = DISCARD_OFFSET,
        discard_len = DISCARD_LEN,
        discard_seek = DISCARD_OFFSET / 65536,
        discard_count = DISCARD_LEN / 65536,
    );
    let mut guest = Guest::builder(vmm)
        .smp(2)
        .mem_mib(512)
        .vhost_user_blk(&card.socket, 2, false)
        .script(&script)
        .timeout(Duration::from_secs(240))
        .boot()?;

    guest.wait_for_line("CARDSIM-STEP-WRITTEN", Duration::from_secs(200))?;
    let dirty_before = total_dirty(&backing)?;
    guest.wait_for_line("CARDSIM-STEP-FLUSHED", Duration::from_secs(30))?;
    let dirty_after = total_dirty(&backing)?;
    let out = guest.wait()?;
    eprintln!(
        "{vmm}: ready after {:?}, whole run {:?}",
        out.boot_time, out.elapsed
    );

    ensure!(
        out.console.contains(&format!(
            "vda: {} sectors, 2 queues, serial vol0",
            VOLUME_SIZE / 512
        )),
        "unexpected device:\n{}",
        out.console
    );
    ensure!(
        out.console.contains("err= 0"),
        "fio reported errors:\n{}",
        out.console
    );
    // The check is only meaningful if the writes were still dirty before the flush.
    ensure!(
        dirty_before > 0,
        "the guest's writes were not dirty in the host page cache before its flush"
    );
    ensure!(
        dirty_after == 0,
        "{dirty_after} page(s) still dirty on the host after the guest's flush completed"
    );

    for offset in PATTERN_OFFSETS {
        let mut got = vec![0u8; 4096];
        fs::File::open(&backing)?.read_exact_at(&mut got, offset)?;
        ensure!(
            got == block_pattern(offset),
            "block at {offset} did not reach the backing file: {:?}",
            String::from_utf8_lossy(&got[..40])
        );
    }

    let metrics = card.metrics()?;
    let total = &metrics["total"];
    for q in 0..2 {
        let served = metrics["queues"][q]["requests"].as_u64().unwrap_or(0);
        ensure!(
            served > 1000,
            "queue {q} served only {served} requests: {metrics}"
        );
    }
    ensure!(total["invalid_requests"] == 0, "{metrics}");
    ensure!(total["media_errors"] == 0, "{metrics}");
    ensure!(total["flush_ops"].as_u64() >= Some(1), "{metrics}");
    ensure!(total["discard_ops"].as_u64() >= Some(1), "{metrics}");
    ensure!(total["write_zeroes_ops"].as_u64() >= Some(1), "{metrics}");
    ensure!(total["get_id_ops"].as_u64() >= Some(1), "{metrics}");
    Ok(())
}

#[test]
fn guest_qemu7_block_card_io() -> Result<()> {
    guest_io_through_the_card(Vmm::Qemu7)
}

#[test]
fn guest_qemu11_block_card_io() -> Result<()> {
    guest_io_through_the_card(Vmm::Qemu11)
}

/// A read-only card: the guest sees a read-only disk, reads work, writes fail,
/// and the backing file is unchanged.
#[test]
fn guest_qemu7_read_only_card_refuses_writes() -> Result<()> {
    let dir = scratch()?;
    let backing = backing_file(dir.path())?;
    let before = block_pattern(0);
    fs::OpenOptions::new()
        .write(true)
        .open(&backing)?
        .write_all_at(&before, 0)?;
    let card = BlockCard::start(dir.path(), &backing, &["--read-only"])?;
    let script = r#"
wait_dev /dev/vda
[ "$(cat /sys/block/vda/ro)" = 1 ] || { echo "disk is not read-only"; exit 1; }
dd if=/dev/vda bs=4096 count=1 iflag=direct | grep -q 'cardsim block at 0'
if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct; then
    echo "a write to the read-only disk succeeded"; exit 1
fi
echo CARDSIM-RO-OK
"#;
    let out = Guest::builder(Vmm::Qemu7)
        .vhost_user_blk(&card.socket, 1, false)
        .script(script)
        .timeout(Duration::from_secs(120))
        .boot()?
        .wait()?;
    ensure!(out.console.contains("CARDSIM-RO-OK"), "{}", out.console);
    let mut after = vec![0u8; 4096];
    fs::File::open(&backing)?.read_exact_at(&mut after, 0)?;
    ensure!(after == before, "the read-only volume changed");
    Ok(())
}

/// The card is killed while the guest is idle and started again on the same
/// socket; QEMU reconnects and the guest keeps its data and its disk.
fn guest_survives_card_restart(vmm: Vmm) -> Result<()> {
    let dir = scratch()?;
    let backing = backing_file(dir.path())?;
    let mut card = BlockCard::start(dir.path(), &backing, &[])?;
    let script = r#"
wait_dev /dev/vda
yes 'before restart' | head -c 4096 > /tmp/a
dd if=/tmp/a of=/dev/vda bs=4096 seek=10 count=1 oflag=direct conv=fsync
echo CARDSIM-STEP-BEFORE
sleep 8
dd if=/dev/vda bs=4096 skip=10 count=1 iflag=direct | cmp - /tmp/a
fio --name=after --filename=/dev/vda --rw=randwrite --bs=4k --iodepth=8 --ioengine=libaio \
    --direct=1 --verify=crc32c --size=8M --offset=64M
echo CARDSIM-STEP-AFTER
"#;
    let mut guest = Guest::builder(vmm)
        .vhost_user_blk(&card.socket, 1, true)
        .script(script)
        .timeout(Duration::from_secs(180))
        .boot()?;
    guest.wait_for_line("CARDSIM-STEP-BEFORE", Duration::from_secs(120))?;
    // SIGKILL: no chance to clean up, as in a crash.
    card.process.0.kill()?;
    card.process.0.wait()?;
    card = BlockCard::start(dir.path(), &backing, &[])?;
    let out = guest.wait()?;
    ensure!(
        out.console.contains("CARDSIM-STEP-AFTER"),
        "{}",
        out.console
    );
    ensure!(
        out.console.contains("err= 0"),
        "fio reported errors:\n{}",
        out.console
    );
    let metrics = card.metrics()?;
    ensure!(
        metrics["total"]["write_ops"].as_u64() > Some(0),
        "the restarted card served no writes: {metrics}"
    );
    Ok(())
}

#[test]
fn guest_qemu7_card_restart_reconnects() -> Result<()> {
    guest_survives_card_restart(Vmm::Qemu7)
}

#[test]
fn guest_qemu11_card_restart_reconnects() -> Result<()> {
    guest_survives_card_restart(Vmm::Qemu11)
}
