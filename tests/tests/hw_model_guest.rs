//! The EBS model and fault injection, seen from inside a real guest: the
//! figures fio reports are the ones the card was told to model.
//!
//! Every test here boots a guest, so each name contains "guest".

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cardsim_tests::block_card::BlockCard;
use cardsim_tests::{fio, target_dir, Guest, Vmm};
use serde_json::{json, Value};

fn volume(dir: &Path, size: u64) -> Result<PathBuf> {
    let path = dir.join("vol.img");
    fs::File::create(&path)?.set_len(size)?;
    Ok(path)
}

fn read_iops(report: &Value) -> f64 {
    report["jobs"][0]["read"]["iops"].as_f64().unwrap_or(0.0)
}

fn within(value: f64, want: f64, tolerance: f64) -> bool {
    (value - want).abs() <= want * tolerance
}

/// An io1 volume provisioned at 300 IOPS: fio in the guest sees 300 ±5%.
#[test]
fn guest_provisioned_iops_limit_what_fio_sees() -> Result<()> {
    let dir = tempfile::tempdir_in(target_dir())?;
    let backing = volume(dir.path(), 8 << 30)?;
    let card = BlockCard::start(
        dir.path(),
        &backing,
        &["--volume-type", "io1", "--iops", "300"],
    )?;
    // The ramp skips the bucket's first second of tokens.
    let script = format!(
        "wait_dev /dev/vda\n{}",
        fio::job(
            "limited",
            "--rw=randread --bs=4k --iodepth=16 --size=1G --time_based --ramp_time=3 --runtime=10"
        )
    );
    let out = Guest::builder(Vmm::Qemu7)
        .vhost_user_blk(&card.socket, 1, false)
        .script(&script)
        .timeout(Duration::from_secs(120))
        .boot()?
        .wait()?;
    let reports = fio::reports(&out.console)?;
    let iops = read_iops(reports.first().context("no fio report")?);
    ensure!(
        within(iops, 300.0, 0.05),
        "fio saw {iops:.1} IOPS, want 300 ±5%"
    );
    let metrics = card.call("metrics", json!({}))?;
    ensure!(
        metrics["middle"]["throttled"].as_u64() > Some(0),
        "nothing was throttled: {metrics}"
    );
    ensure!(
        metrics["cloudwatch"]["VolumeReadOps"].as_u64() > Some(3000),
        "{metrics}"
    );
    Ok(())
}

/// gp2 with a time scale: BurstBalance drains at the modelled rate while the
/// guest bursts, then the guest's IOPS fall to the baseline.
#[test]
fn guest_gp2_burst_balance_drains_then_iops_fall_to_baseline() -> Result<()> {
    const SCALE: f64 = 400.0;
    let dir = tempfile::tempdir_in(target_dir())?;
    // 33 GiB gp2: baseline 100 IOPS (the minimum), bursts to 3000.
    let backing = volume(dir.path(), 33 << 30)?;
    let card = BlockCard::start(
        dir.path(),
        &backing,
        &["--volume-type", "gp2", "--time-scale", &SCALE.to_string()],
    )?;
    let script = format!(
        "wait_dev /dev/vda\necho CARDSIM-BURST-START\n{}{}",
        fio::job(
            "burst",
            "--rw=randread --bs=4k --iodepth=32 --size=1G --time_based --runtime=10"
        ),
        fio::job(
            "baseline",
            "--rw=randread --bs=4k --iodepth=32 --size=1G --time_based --ramp_time=2 --runtime=8"
        )
    );
    let mut guest = Guest::builder(Vmm::Qemu7)
        .vhost_user_blk(&card.socket, 1, false)
        .script(&script)
        .timeout(Duration::from_secs(150))
        .boot()?;
    guest.wait_for_line("CARDSIM-BURST-START", Duration::from_secs(100))?;
    // Sample BurstBalance and the card's read count twice while the guest bursts.
    std::thread::sleep(Duration::from_millis(1500));
    let (t1, (b1, r1)) = (Instant::now(), balance_and_reads(&card)?);
    std::thread::sleep(Duration::from_millis(1500));
    let (t2, (b2, r2)) = (Instant::now(), balance_and_reads(&card)?);
    let out = guest.wait()?;
    let reports = fio::reports(&out.console)?;
    ensure!(reports.len() == 2, "{}", out.console);

    // Each 4 KiB read spends SCALE credits and the bucket refills at the
    // 100 IOPS baseline (× SCALE), out of 5.4 million: it drains at
    // (IOPS - 100) × SCALE / 5.4M per second, whatever IOPS this guest reaches.
    let elapsed = (t2 - t1).as_secs_f64();
    let card_iops = (r2 - r1) as f64 / elapsed;
    let drained_per_s = (b1 - b2) / elapsed;
    let modelled = (card_iops - 100.0) * SCALE / 5.4e6 * 100.0;
    eprintln!(
        "burst phase: card served {card_iops:.0} IOPS; BurstBalance {b1:.1}% -> {b2:.1}%: \
         {drained_per_s:.1} %/s, modelled {modelled:.1} %/s"
    );
    ensure!(
        card_iops > 1000.0,
        "the guest never burst: {card_iops:.0} IOPS"
    );
    ensure!(
        within(drained_per_s, modelled, 0.15),
        "BurstBalance drained at {drained_per_s:.1} %/s, modelled {modelled:.1} %/s"
    );
    let baseline_iops = read_iops(&reports[1]);
    ensure!(
        within(baseline_iops, 100.0, 0.05),
        "after the burst fio saw {baseline_iops:.1} IOPS, want the 100 IOPS baseline ±5%"
    );
    ensure!(burst_balance(&card)? < 1.0, "the bucket did not empty");
    Ok(())
}

fn burst_balance(card: &BlockCard) -> Result<f64> {
    Ok(balance_and_reads(card)?.0)
}

/// BurstBalance (%) and the card's completed reads so far.
fn balance_and_reads(card: &BlockCard) -> Result<(f64, u64)> {
    let m = card.call("metrics", json!({}))?;
    let balance = m["cloudwatch"]["BurstBalance"]
        .as_f64()
        .with_context(|| format!("no BurstBalance in {m}"))?;
    let reads = m["total"]["read_ops"].as_u64().context("no read_ops")?;
    Ok((balance, reads))
}

/// An I/O-error fault on one range fails only that range, and clearing it
/// heals it; a stall on the range holds reads until it ends.
#[test]
fn guest_error_and_stall_faults_on_a_range() -> Result<()> {
    let dir = tempfile::tempdir_in(target_dir())?;
    let backing = volume(dir.path(), 64 << 20)?;
    let card = BlockCard::start(
        dir.path(),
        &backing,
        &["--fault", "kind=io_error,range=16M-17M"],
    )?;
    let faults = card.call("fault_list", json!({}))?;
    ensure!(faults.as_array().map(Vec::len) == Some(1), "{faults}");
    let script = r#"
wait_dev /dev/vda
rd() { dd if=/dev/vda of=/dev/null bs=4096 skip=$1 count=1 iflag=direct 2>/dev/null; }
# 16 MiB = block 4096; 17 MiB = block 4352.
for b in 4096 4200 4351; do if rd $b; then echo "read of block $b succeeded"; exit 1; fi; done
for b in 0 4095 4352 8000; do rd $b || { echo "read of block $b failed"; exit 1; }; done
if dd if=/dev/zero of=/dev/vda bs=4096 seek=4100 count=1 oflag=direct 2>/dev/null; then
    echo "write into the faulty range succeeded"; exit 1
fi
echo CARDSIM-FAULT-SEEN
sleep 4
for b in 4096 4200 4351; do rd $b || { echo "block $b still failing after clear"; exit 1; }; done
echo CARDSIM-HEALED
# An impaired volume: reads of the range hang until the stall ends, then succeed.
sleep 3
start=$(date +%s)
rd 4096 || { echo "read after the stall failed"; exit 1; }
echo "CARDSIM-STALLED $(( $(date +%s) - start ))"
"#;
    let mut guest = Guest::builder(Vmm::Qemu7)
        .vhost_user_blk(&card.socket, 1, false)
        .script(script)
        .timeout(Duration::from_secs(120))
        .boot()?;
    guest.wait_for_line("CARDSIM-FAULT-SEEN", Duration::from_secs(100))?;
    card.call("fault_clear", json!({"all": true}))?;
    guest.wait_for_line("CARDSIM-HEALED", Duration::from_secs(30))?;
    card.call(
        "fault_add",
        json!({"kind": "stall", "scope": {"range": [16 << 20, 17 << 20]}, "end_s": 6.0}),
    )?;
    let out = guest.wait()?;
    let stalled: u64 = out
        .console
        .lines()
        .find_map(|l| l.trim().strip_prefix("CARDSIM-STALLED "))
        .and_then(|s| s.trim().parse().ok())
        .with_context(|| format!("no stall timing:\n{}", out.console))?;
    // The stall began ~3 s before the read and lasts 6 s: the read waits ~3 s.
    ensure!(
        stalled >= 2,
        "the read was not held by the stall ({stalled} s)"
    );
    let m = card.call("metrics", json!({}))?;
    ensure!(m["middle"]["fault_errors"].as_u64() >= Some(4), "{m}");
    ensure!(m["middle"]["fault_stalls"].as_u64() >= Some(1), "{m}");
    Ok(())
}

/// Added latency shows in the guest's fio completion latency.
#[test]
fn guest_latency_fault_shows_in_fio_percentiles() -> Result<()> {
    const ADDED_MS: f64 = 20.0;
    let dir = tempfile::tempdir_in(target_dir())?;
    let backing = volume(dir.path(), 64 << 20)?;
    let card = BlockCard::start(dir.path(), &backing, &[])?;
    let qd1 = "--rw=randread --bs=4k --iodepth=1 --size=32M --time_based --runtime=4";
    let script = format!(
        "wait_dev /dev/vda\n{}echo CARDSIM-ADD-LATENCY\nsleep 2\n{}",
        fio::job("before", qd1),
        fio::job("after", qd1)
    );
    let mut guest = Guest::builder(Vmm::Qemu7)
        .vhost_user_blk(&card.socket, 1, false)
        .script(&script)
        .timeout(Duration::from_secs(120))
        .boot()?;
    guest.wait_for_line("CARDSIM-ADD-LATENCY", Duration::from_secs(100))?;
    card.call(
        "fault_add",
        json!({"kind": "latency", "fixed_ms": ADDED_MS}),
    )?;
    let out = guest.wait()?;
    let reports = fio::reports(&out.console)?;
    ensure!(reports.len() == 2, "{}", out.console);
    let p50 = |r: &Value| {
        r["jobs"][0]["read"]["clat_ns"]["percentile"]["50.000000"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e6
    };
    let (before, after) = (p50(&reports[0]), p50(&reports[1]));
    let added = after - before;
    eprintln!("p50 before {before:.2} ms, after {after:.2} ms");
    ensure!(
        within(added, ADDED_MS, 0.15),
        "fio's p50 rose by {added:.2} ms, want {ADDED_MS} ms ±15%"
    );
    Ok(())
}

/// A power cut after unflushed writes loses exactly those writes and
/// nothing that was flushed.
#[test]
fn guest_power_cut_loses_only_unflushed_writes() -> Result<()> {
    let dir = tempfile::tempdir_in(target_dir())?;
    let backing = volume(dir.path(), 64 << 20)?;
    // A pending power cut (far in the future) makes the card log writes.
    let mut card = BlockCard::start(
        dir.path(),
        &backing,
        &["--fault", "kind=power_cut,start=86400"],
    )?;
    let script = r#"
wait_dev /dev/vda
w() { yes "$1" | head -c 4096 > /tmp/b; dd if=/tmp/b of=/dev/vda bs=4096 seek=$2 count=1 oflag=direct 2>/dev/null; }
w flushed-a 100
w flushed-b 200
dd if=/dev/zero of=/dev/vda bs=512 count=0 conv=fsync
w unflushed-c 300
w unflushed-d 400
w unflushed-e 100
echo CARDSIM-CUT-NOW
sleep 30
"#;
    let mut guest = Guest::builder(Vmm::Qemu7)
        .vhost_user_blk(&card.socket, 1, false)
        .script(script)
        .timeout(Duration::from_secs(120))
        .boot()?;
    guest.wait_for_line("CARDSIM-CUT-NOW", Duration::from_secs(100))?;
    card.call("fault_add", json!({"kind": "power_cut"}))?;
    let status = wait_exit(&mut card.process.0, Duration::from_secs(10))?;
    ensure!(status.code() == Some(75), "card exited with {status}");
    drop(guest);

    let block = |n: u64| -> Result<Vec<u8>> {
        let mut b = vec![0u8; 4096];
        fs::File::open(&backing)?.read_exact_at(&mut b, n * 4096)?;
        Ok(b)
    };
    let pattern = |text: &str| -> Vec<u8> {
        format!("{text}\n")
            .into_bytes()
            .into_iter()
            .cycle()
            .take(4096)
            .collect()
    };
    ensure!(
        block(100)? == pattern("flushed-a"),
        "a flushed write was lost (or the later unflushed one kept)"
    );
    ensure!(
        block(200)? == pattern("flushed-b"),
        "a flushed write was lost"
    );
    ensure!(
        block(300)? == vec![0u8; 4096],
        "an unflushed write survived the cut"
    );
    ensure!(
        block(400)? == vec![0u8; 4096],
        "an unflushed write survived the cut"
    );
    Ok(())
}

fn wait_exit(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("the card did not go down within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
