//! The `nvme` and `compare-nvme` subcommands (included by main.rs with
//! `#[path]`, so the binary's argument types stay beside the NVMe code).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context};

use cardbench::blk::{process_cpu, Rw};
use cardbench::compare::{timestamp, Backing};
use cardbench::nvme::compare::{self, NvmeCompareConfig};
use cardbench::nvme::load::{self, NvmeConfig};
use cardbench::report;
use cardbench::units::{parse_duration, parse_size};

use super::Failure;

#[derive(clap::Args, Debug)]
pub struct NvmeArgs {
    /// The card's vfio-user socket.
    #[arg(long)]
    socket: PathBuf,
    /// Namespace to drive.
    #[arg(long, default_value_t = 1)]
    nsid: u32,
    #[arg(long, value_enum)]
    rw: Rw,
    /// Block size (a multiple of the namespace's LBA size, at most MDTS).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Commands in flight per queue.
    #[arg(long, default_value_t = 1)]
    iodepth: u16,
    /// I/O queue pairs to drive, one thread each.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Measured time (5, 2.5s, 500ms).
    #[arg(long, default_value = "5", value_parser = parse_duration)]
    runtime: Duration,
    /// Time run before measuring starts.
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    ramp_time: Duration,
    /// Working set from LBA 0, split evenly between queues (default: the namespace).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Percentage of reads in randrw.
    #[arg(long, default_value_t = 50)]
    rwmixread: u8,
    /// Check every read against what was written.
    #[arg(long)]
    verify: bool,
    /// Ring every doorbell over the socket even if the card offers shadow doorbells.
    #[arg(long)]
    no_shadow_doorbells: bool,
    /// Report this process's CPU time per I/O.
    #[arg(long)]
    backend_pid: Option<u32>,
    /// fio-shaped JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Limit for each socket reply and admin command.
    #[arg(long, default_value = "10", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(clap::Args, Debug)]
pub struct CompareNvmeArgs {
    /// Where the namespace file lives: /dev/shm, or the target directory.
    #[arg(long, value_enum, default_value = "tmpfs")]
    backing: Backing,
    /// O_DIRECT on both sides (--direct, fio --direct=1).
    #[arg(long)]
    direct: bool,
    /// Measured time per run (default 5s; 500ms with --quick).
    #[arg(long, value_parser = parse_duration)]
    runtime: Option<Duration>,
    /// Warm-up per run (default 1s; 0 with --quick).
    #[arg(long, value_parser = parse_duration)]
    ramp_time: Option<Duration>,
    /// Rounds per system (default 3; 1 with --quick).
    #[arg(long)]
    rounds: Option<u32>,
    /// Namespace file size (default 1G; 64M with --quick).
    #[arg(long, value_parser = parse_size)]
    file_size: Option<u64>,
    /// Only the workloads whose name contains this, e.g. "randread QD32".
    #[arg(long)]
    only: Option<String>,
    /// A fast pass that proves the harness works.
    #[arg(long)]
    quick: bool,
    /// Results folder (default target/cardbench/<timestamp>-nvme).
    #[arg(long)]
    results: Option<PathBuf>,
}

pub fn run_nvme(a: NvmeArgs) -> Result<(), Failure> {
    if let Some(pid) = a.backend_pid {
        if process_cpu(pid).is_none() {
            return Err(Failure::Usage(anyhow!(
                "--backend-pid {pid}: no such process (cannot read /proc/{pid}/stat)"
            )));
        }
    }
    let config = NvmeConfig {
        socket: a.socket,
        nsid: a.nsid,
        rw: a.rw,
        bs: a.bs,
        iodepth: a.iodepth,
        queues: a.queues,
        runtime: a.runtime,
        ramp: a.ramp_time,
        size: a.size,
        rwmixread: a.rwmixread,
        verify: a.verify,
        backend_pid: a.backend_pid,
        shadow_doorbells: !a.no_shadow_doorbells,
        timeout: a.timeout,
        connect_wait: Duration::ZERO,
    };
    let result = load::run(&config).map_err(|e| {
        if e.is_usage() {
            Failure::Usage(e.into())
        } else {
            Failure::Run(e.into())
        }
    })?;
    let out = report::to_fio(&result);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&out).expect("serializable")
        );
    } else {
        print!("{}", report::human(&out));
    }
    if result.verify_errors > 0 || result.io_errors > 0 {
        return Err(Failure::Run(anyhow!(
            "{} verify errors, {} I/O errors in {} reads checked",
            result.verify_errors,
            result.io_errors,
            result.verified_reads
        )));
    }
    Ok(())
}

pub fn run_compare_nvme(a: CompareNvmeArgs, exe_dir: Option<PathBuf>) -> Result<(), Failure> {
    let exe_dir = exe_dir.unwrap_or_else(|| PathBuf::from("target/debug"));
    let bin_dir = std::env::var_os("CARDSIM_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| exe_dir.clone());
    let target_dir = exe_dir
        .parent()
        .filter(|p| p.file_name().is_some_and(|n| n == "target"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    let results = a.results.unwrap_or_else(|| {
        target_dir
            .join("cardbench")
            .join(format!("{}-nvme", timestamp(SystemTime::now())))
    });
    let q = a.quick;
    let cfg = NvmeCompareConfig {
        backing: a.backing,
        direct: a.direct,
        runtime: a.runtime.unwrap_or(if q {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(5)
        }),
        ramp: a.ramp_time.unwrap_or(if q {
            Duration::ZERO
        } else {
            Duration::from_secs(1)
        }),
        rounds: a.rounds.unwrap_or(if q { 1 } else { 3 }),
        file_size: a.file_size.unwrap_or(if q { 64 << 20 } else { 1 << 30 }),
        results,
        bin_dir,
        target_dir,
        only: a.only,
    };
    if cfg.rounds == 0 || cfg.runtime.is_zero() {
        return Err(Failure::Usage(anyhow!(
            "--rounds and --runtime must be more than zero"
        )));
    }
    if cfg.file_size < 16 << 20 {
        return Err(Failure::Usage(anyhow!("--file-size must be at least 16M")));
    }
    let res = compare::run(&cfg).map_err(|e| {
        if e.is_usage() {
            Failure::Usage(e.into())
        } else {
            Failure::Run(e.into())
        }
    })?;
    print!("{}", compare::table(&res));
    let json = cfg.results.join("results.json");
    std::fs::write(
        &json,
        serde_json::to_string_pretty(&res).expect("serializable"),
    )
    .with_context(|| format!("writing {}", json.display()))
    .map_err(Failure::Run)?;
    println!("results: {}", cfg.results.display());
    Ok(())
}
