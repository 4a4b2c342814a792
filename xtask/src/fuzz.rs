//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/`, on stable Rust.
//!
//! Sanitizers need nightly, so targets are built with `-s none` (libFuzzer's
//! coverage and comparison tracing still work on stable) and with debug
//! assertions, so arithmetic overflow panics. Each target starts from its
//! checked-in seeds (`fuzz/corpus/<target>`, read only) and keeps what it
//! finds in `fuzz/target/corpus/<target>` (not checked in). A crash stops the
//! run; libFuzzer writes the input to `fuzz/artifacts/<target>/`, and
//! `cargo fuzz run -s none -a <target> <file>` replays it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::{cargo, cargo_bin};

pub const TARGETS: [&str; 7] = [
    "virtio_blk_request",
    "vhost_user_messages",
    "virtio_net_tx",
    "nvme_driver",
    "nvme_data_pointer",
    "vfio_user_device",
    "agent_protocol",
];

/// `--quick`: every target for this long, all at once (CI).
pub const QUICK_SECONDS: u64 = 30;

pub fn run(quick: bool, seconds: u64, target: Option<&str>) -> Result<()> {
    let targets: Vec<&str> = match target {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("unknown fuzz target {t:?} (one of {})", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    let seconds = if quick { QUICK_SECONDS } else { seconds };
    ensure_cargo_fuzz()?;
    let root = cardsim_tests::workspace_root();
    let started = Instant::now();
    cargo(&["fuzz", "build", "-s", "none", "--debug-assertions"])?;
    eprintln!("xtask: fuzz targets built in {:.0?}", started.elapsed());

    let logs = root.join("fuzz/target/logs");
    std::fs::create_dir_all(&logs)?;
    let mut runs = Vec::new();
    for &t in &targets {
        let mut child = spawn(&root, t, seconds, &logs)?;
        // CI (--quick) runs every target at once, so the whole run takes
        // ~30 s after the build; otherwise one after another.
        if !quick {
            wait(t, &mut child)?;
        }
        runs.push((t, child));
    }
    let mut failed = Vec::new();
    println!(
        "{:<22} {:>12} {:>8}  result",
        "target", "executions", "exec/s"
    );
    for (t, mut child) in runs {
        let ok = wait(t, &mut child)?;
        let log = std::fs::read_to_string(log_path(&logs, t)).unwrap_or_default();
        let execs = stat(&log, "stat::number_of_executed_units:");
        let rate = stat(&log, "stat::average_exec_per_sec:");
        println!(
            "{t:<22} {:>12} {:>8}  {}",
            execs.unwrap_or_default(),
            rate.unwrap_or_default(),
            if ok { "ok" } else { "FAILED" }
        );
        if !ok {
            failed.push((t, log));
        }
    }
    for (t, log) in &failed {
        eprintln!("---- {t}: last lines of {}", log_path(&logs, t).display());
        let lines: Vec<&str> = log.lines().collect();
        for line in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("{line}");
        }
    }
    eprintln!("xtask: fuzzing took {:.0?}", started.elapsed());
    if !failed.is_empty() {
        let names: Vec<&str> = failed.iter().map(|(t, _)| *t).collect();
        bail!(
            "fuzz target(s) {} found a crash or hang; the input is in fuzz/artifacts/<target>/",
            names.join(", ")
        );
    }
    Ok(())
}

/// Installs cargo-fuzz if `cargo fuzz` is not there (a fresh CI machine).
fn ensure_cargo_fuzz() -> Result<()> {
    let present = Command::new(cargo_bin())
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !present {
        eprintln!("xtask: installing cargo-fuzz");
        cargo(&["install", "cargo-fuzz", "--locked"])?;
    }
    Ok(())
}

fn log_path(logs: &Path, target: &str) -> PathBuf {
    logs.join(format!("{target}.log"))
}

fn spawn(root: &Path, target: &str, seconds: u64, logs: &Path) -> Result<std::process::Child> {
    let work = root.join("fuzz/target/corpus").join(target);
    std::fs::create_dir_all(&work)?;
    let seeds = root.join("fuzz/corpus").join(target);
    let log = std::fs::File::create(log_path(logs, target))?;
    eprintln!("xtask: fuzzing {target} for {seconds} s");
    Command::new(cargo_bin())
        .current_dir(root)
        .args(["fuzz", "run", "-s", "none", "--debug-assertions", target])
        .arg(&work)
        .arg(&seeds)
        .args([
            "--".to_string(),
            format!("-max_total_time={seconds}"),
            // A request that takes this long is a hang (the targets run in
            // well under a millisecond).
            "-timeout=10".to_string(),
            "-print_final_stats=1".to_string(),
        ])
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("running cargo fuzz run {target}"))
}

fn wait(target: &str, child: &mut std::process::Child) -> Result<bool> {
    let status = child
        .wait()
        .with_context(|| format!("waiting for fuzz target {target}"))?;
    Ok(status.success())
}

/// A number from libFuzzer's final stats.
fn stat<'a>(log: &'a str, key: &str) -> Option<&'a str> {
    log.lines()
        .rev()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}
