//! The local-NVMe card under a real Linux guest on QEMU 11.1's
//! `vfio-user-pci` (the host's QEMU 7.2 has no vfio-user client): the stock
//! nvme driver binds, the namespace has the configured size, serial and
//! model, fio verifies random writes on both I/O queues, discard, write
//! zeroes and flush work, and the data is in the namespace file afterwards.
//!
//! Every test here boots a guest, so each name contains "guest" (nextest
//! runs those one at a time; see .config/nextest.toml).

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use cardsim_tests::nvme_card::NvmeCard;
use cardsim_tests::pagecache::dirty_pages;
use cardsim_tests::{target_dir, Guest, Vmm};

const NAMESPACE_SIZE: u64 = 128 << 20;
const SERIAL: &str = "cardsim-nvme-0001";
/// Where the guest writes known blocks, past fio's 32 MiB.
const PATTERN_OFFSETS: [u64; 3] = [80 << 20, (100 << 20) + 4096, NAMESPACE_SIZE - 4096];
const DISCARD_OFFSET: u64 = 90 << 20;
const DISCARD_LEN: u64 = 1 << 20;
const ZERO_OFFSET: u64 = 92 << 20;

/// The 4 KiB block the guest writes at `offset`:
/// `yes "cardsim nvme at OFFSET" | head -c 4096`.
fn block_pattern(offset: u64) -> Vec<u8> {
    format!("cardsim nvme at {offset}\n")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(4096)
        .collect()
}

fn total_dirty(file: &Path) -> Result<usize> {
    let mut dirty = 0;
    for offset in PATTERN_OFFSETS {
        dirty += dirty_pages(file, offset, 4096)?;
    }
    Ok(dirty)
}

fn metric(path: &Path, name: &str) -> Result<u64> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    v[name]
        .as_u64()
        .with_context(|| format!("no counter {name} in {text}"))
}

#[test]
fn nvme_card_serves_a_linux_guest() -> Result<()> {
    // A real filesystem: the flush check reads page flags, which tmpfs lacks.
    let dir = tempfile::tempdir_in(target_dir())?;
    let ns = dir.path().join("ns1.img");
    fs::File::create(&ns)?.set_len(NAMESPACE_SIZE)?;
    // Something to discard and zero, so the host can see it go.
    let junk = vec![0x5au8; DISCARD_LEN as usize];
    let file = fs::OpenOptions::new().write(true).open(&ns)?;
    file.write_all_at(&junk, DISCARD_OFFSET)?;
    file.write_all_at(&junk, ZERO_OFFSET)?;
    file.sync_all()?;
    drop(file);
    // The card jails itself as nobody when started as root: its metrics
    // folder must be the jailed uid's.
    let metrics_dir = dir.path().join("metrics");
    fs::create_dir(&metrics_dir)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::chown(&metrics_dir, Some(65534), Some(65534))?;
    }
    let metrics = metrics_dir.join("metrics.json");
    // A second namespace with 4 KiB blocks, grown by the card to 16 MiB.
    let ns2 = dir.path().join("ns2.img");
    fs::File::create(&ns2)?;
    let ns2_arg = format!("{},size=16M,lba=4096", ns2.display());
    let card = NvmeCard::start(
        dir.path(),
        &[ns.to_str().context("path")?, &ns2_arg],
        &[
            "--serial",
            SERIAL,
            "--io-queues",
            "2",
            "--metrics",
            metrics.to_str().context("path")?,
        ],
    )?;

    let writes: String = PATTERN_OFFSETS
        .iter()
        .map(|o| {
            format!(
                "yes 'cardsim nvme at {o}' | head -c 4096 > /tmp/p\n\
                 dd if=/tmp/p of=/dev/nvme0n1 bs=4096 seek={} count=1 oflag=direct\n",
                o / 4096
            )
        })
        .collect();
    let script = format!(
        r#"
wait_dev /dev/nvme0n1 30
echo "nvme0n1: $(cat /sys/block/nvme0n1/size) sectors, $(ls /sys/block/nvme0n1/mq | wc -l) queues"
wait_dev /dev/nvme0n2 30
echo "nvme0n2: $(cat /sys/block/nvme0n2/size) sectors of 512, $(cat /sys/block/nvme0n2/queue/logical_block_size)-byte blocks"
echo "serial=[$(cat /sys/class/nvme/nvme0/serial)] model=[$(cat /sys/class/nvme/nvme0/model)]"
# One fio job per vCPU, so both I/O queues carry verified I/O.
fio --name=verify --filename=/dev/nvme0n1 --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio \
    --direct=1 --verify=crc32c --size=16M --numjobs=2 --offset_increment=16M \
    --cpus_allowed=0-1 --cpus_allowed_policy=split --group_reporting
{writes}
echo CARDSIM-STEP-WRITTEN
sleep 1
dd if=/dev/zero of=/dev/nvme0n1 bs=512 count=0 conv=fsync
echo CARDSIM-STEP-FLUSHED
sleep 2
zeros=$(head -c {len} /dev/zero | md5sum)
/usr/sbin/blkdiscard -o {discard} -l {len} /dev/nvme0n1
got=$(dd if=/dev/nvme0n1 bs=65536 skip={discard_seek} count={count} iflag=direct | md5sum)
[ "$zeros" = "$got" ] || {{ echo "discarded range does not read as zeros"; exit 1; }}
echo CARDSIM-STEP-DISCARDED
/usr/sbin/blkdiscard -z -o {zero} -l {len} /dev/nvme0n1
got=$(dd if=/dev/nvme0n1 bs=65536 skip={zero_seek} count={count} iflag=direct | md5sum)
[ "$zeros" = "$got" ] || {{ echo "zeroed range does not read as zeros"; exit 1; }}
echo CARDSIM-STEP-ZEROED
# A controller reset in the middle of verified writes: Linux requeues what
# was in flight, and every block must still verify.
fio --name=reset --filename=/dev/nvme0n1 --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio \
    --direct=1 --verify=crc32c --size=16M --offset=48M > /tmp/reset.log 2>&1 &
pid=$!
sleep 1
echo 1 > /sys/class/nvme/nvme0/reset_controller
wait $pid || {{ cat /tmp/reset.log; echo "fio across a controller reset failed"; exit 1; }}
grep -q "err= 0" /tmp/reset.log || {{ cat /tmp/reset.log; exit 1; }}
echo CARDSIM-STEP-RESET-VERIFIED
"#,
        discard = DISCARD_OFFSET,
        zero = ZERO_OFFSET,
        len = DISCARD_LEN,
        discard_seek = DISCARD_OFFSET / 65536,
        zero_seek = ZERO_OFFSET / 65536,
        count = DISCARD_LEN / 65536,
    );
    let mut guest = card
        .attach(Guest::builder(Vmm::Qemu11).smp(2).mem_mib(512))
        .script(&script)
        .timeout(Duration::from_secs(240))
        .boot()?;

    guest.wait_for_line("CARDSIM-STEP-WRITTEN", Duration::from_secs(200))?;
    let dirty_before = total_dirty(&ns)?;
    let flushes_before = metric(&metrics, "flush_commands")?;
    let resets_before = metric(&metrics, "resets")?;
    guest.wait_for_line("CARDSIM-STEP-FLUSHED", Duration::from_secs(30))?;
    let dirty_after = total_dirty(&ns)?;
    let out = guest.wait()?;
    eprintln!(
        "ready after {:?}, whole run {:?}",
        out.boot_time, out.elapsed
    );
    // The metrics file is rewritten every second.
    std::thread::sleep(Duration::from_millis(1500));
    let flushes_after = metric(&metrics, "flush_commands")?;

    ensure!(
        out.console.contains(&format!(
            "nvme0n1: {} sectors, 2 queues",
            NAMESPACE_SIZE / 512
        )),
        "unexpected namespace:\n{}",
        out.console
    );
    ensure!(
        out.console
            .contains("nvme0n2: 32768 sectors of 512, 4096-byte blocks"),
        "unexpected second namespace:\n{}",
        out.console
    );
    ensure!(
        out.console.contains(&format!(
            // sysfs shows the Identify fields as they are: space-padded.
            "serial=[{SERIAL:<20}] model=[{:<40}]",
            "cardsim NVMe Instance Storage"
        )),
        "unexpected identify strings:\n{}",
        out.console
    );
    ensure!(
        out.console.contains("err= 0") && !out.console.contains("verify: bad"),
        "fio reported errors:\n{}",
        out.console
    );
    ensure!(
        dirty_before > 0,
        "the guest's writes were not dirty in the host page cache before its flush"
    );
    ensure!(
        dirty_after == 0 && flushes_after > flushes_before,
        "the guest's flush left {dirty_after} pages dirty ({flushes_before} → {flushes_after} flushes)"
    );
    ensure!(
        metric(&metrics, "deallocate_commands")? > 0,
        "no deallocate reached the card"
    );
    ensure!(
        out.console.contains("CARDSIM-STEP-RESET-VERIFIED")
            && metric(&metrics, "resets")? > resets_before,
        "no controller reset under load"
    );
    let snapshot = fs::read_to_string(&metrics)?;
    ensure!(
        metric(&metrics, "doorbell_buffer_configs")? > 0,
        "Linux did not take the shadow doorbells: {snapshot}"
    );
    eprintln!("card counters: {snapshot}");
    ensure!(
        metric(&metrics, "io_errors")? == 0,
        "the card failed I/O commands"
    );

    let file = fs::File::open(&ns)?;
    for offset in PATTERN_OFFSETS {
        let mut got = vec![0u8; 4096];
        file.read_exact_at(&mut got, offset)?;
        ensure!(
            got == block_pattern(offset),
            "block at {offset} is not on the namespace file"
        );
    }
    for offset in [DISCARD_OFFSET, ZERO_OFFSET] {
        let mut got = vec![1u8; DISCARD_LEN as usize];
        file.read_exact_at(&mut got, offset)?;
        ensure!(
            got.iter().all(|&b| b == 0),
            "range at {offset} is not zero on the namespace file"
        );
    }
    Ok(())
}
