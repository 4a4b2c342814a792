//! `cargo xtask demo`: a real guest whose disk is served by the block card.
//!
//! Starts the release block card on a 1 GiB sparse file, boots a guest on
//! it (QEMU 11.1 when `cargo xtask deps` prepared it, else the host's 7.2),
//! runs a short fio random read and random write inside, and prints what fio
//! saw beside what the card counted.

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cardsim_tests::{wait_for_socket, Guest, KillOnDrop, Vmm};

const VOLUME_SIZE: u64 = 1 << 30;
const RUNTIME_SECS: u32 = 8;

/// Runs the demo against the release binaries (built by the caller).
pub fn run_demo() -> Result<()> {
    let card_path = cardsim_tests::target_dir().join("release/vhost-blk-backend");
    if !card_path.is_file() {
        bail!(
            "the block card binary is not built yet ({} is missing)",
            card_path.display()
        );
    }
    let vmm = if Vmm::Qemu11.available().is_ok() {
        Vmm::Qemu11
    } else {
        Vmm::Qemu7
    };
    let dir = cardsim_tests::cache_dir().join("demo");
    fs::create_dir_all(&dir)?;
    let backing = dir.join("vol.img");
    let socket = dir.join("blk.sock");
    // The card jails itself as nobody and replaces its metrics file by name:
    // the file's folder must be that uid's.
    let metrics_dir = dir.join("metrics");
    fs::create_dir_all(&metrics_dir)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let nobody = card_firmware::sandbox::DEFAULT_ID;
        std::os::unix::fs::chown(&metrics_dir, Some(nobody), Some(nobody))?;
    }
    let metrics = metrics_dir.join("metrics.json");
    let log = dir.join("card.log");
    // A fresh sparse volume each time: nothing to carry over.
    let _ = fs::remove_file(&backing);
    fs::File::create(&backing)?.set_len(VOLUME_SIZE)?;

    println!("cardsim demo");
    println!(
        "  card:   vhost-blk-backend, 2 queues, 1 GiB sparse volume {}",
        backing.display()
    );
    let card = Command::new(&card_path)
        .arg("--socket")
        .arg(&socket)
        .arg("--backing")
        .arg(&backing)
        .args(["--num-queues", "2"])
        .arg("--metrics")
        .arg(&metrics)
        .stdin(Stdio::null())
        .stderr(fs::File::create(&log)?)
        .spawn()
        .context("starting the block card")?;
    let mut card = KillOnDrop(card);
    wait_for_socket(&socket, Some(&mut card.0), Duration::from_secs(10))
        .with_context(|| format!("the block card did not start; see {}", log.display()))?;
    println!("  guest:  Debian kernel + busybox initramfs on {vmm} (TCG), 2 vCPUs");

    let fio = |rw: &str| {
        cardsim_tests::fio::job(
            rw,
            &format!(
                "--rw={rw} --bs=4k --iodepth=16 --time_based --runtime={RUNTIME_SECS} \
                 --size=1G --numjobs=2 --group_reporting"
            ),
        )
    };
    let script = format!("wait_dev /dev/vda\n{}{}", fio("randread"), fio("randwrite"));
    println!(
        "  fio:    4k randread, then 4k randwrite; iodepth 16 x 2 jobs, {RUNTIME_SECS} s each"
    );
    println!();
    let out = Guest::builder(vmm)
        .smp(2)
        .mem_mib(512)
        .vhost_user_blk(&socket, 2, false)
        .script(&script)
        .timeout(Duration::from_secs(240))
        .boot()?
        .wait()?;

    let reports = fio_reports(&out.console)?;
    println!(
        "{:<10} {:>9} {:>9} {:>10} {:>10} {:>10}",
        "workload", "IOPS", "MiB/s", "p50 (us)", "p99 (us)", "p99.9 (us)"
    );
    for report in &reports {
        let job = &report["jobs"][0];
        let name = job["jobname"].as_str().unwrap_or("?");
        let side = if name.contains("read") {
            "read"
        } else {
            "write"
        };
        let stats = &job[side];
        let pct = |p: &str| stats["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
        println!(
            "{:<10} {:>9.0} {:>9.1} {:>10.0} {:>10.0} {:>10.0}",
            name,
            stats["iops"].as_f64().unwrap_or(0.0),
            stats["bw"].as_f64().unwrap_or(0.0) / 1024.0,
            pct("50.000000"),
            pct("99.000000"),
            pct("99.900000"),
        );
    }
    // The card writes its counters every second; wait for a fresh copy.
    std::thread::sleep(Duration::from_millis(1200));
    let m: serde_json::Value = serde_json::from_str(&fs::read_to_string(&metrics)?)?;
    let t = &m["total"];
    println!();
    println!(
        "card counted: {} requests ({} reads, {} writes) over queues {}; {} refused, {} media errors",
        t["requests"],
        t["read_ops"],
        t["write_ops"],
        m["queues"]
            .as_array()
            .map(|qs| qs.iter().map(|q| q["requests"].to_string()).collect::<Vec<_>>().join(" + "))
            .unwrap_or_default(),
        t["invalid_requests"].as_u64().unwrap_or(0) + t["unsupported_requests"].as_u64().unwrap_or(0),
        t["media_errors"],
    );
    println!(
        "guest boot {:.1?}, whole run {:.1?}. Under TCG these figures measure QEMU's CPU\n\
         emulation more than the card; `cardbench` drives the card without a guest.",
        out.boot_time, out.elapsed
    );
    Ok(())
}

/// fio's two JSON reports from the guest console.
fn fio_reports(console: &str) -> Result<Vec<serde_json::Value>> {
    let reports = cardsim_tests::fio::reports(console)?;
    if reports.len() != 2 {
        bail!(
            "expected 2 fio reports on the guest console, found {}:\n{}",
            reports.len(),
            cardsim_tests::tail(console, 40)
        );
    }
    Ok(reports)
}
