//! `cardbench`: load generators that play the VMM against cardsim's cards
//! and their peers. Exit status: 0 success, 1 a failed run (I/O or verify
//! errors, a backend that died), 2 a usage or configuration error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Parser, Subcommand};

use cardbench::blk::{self, BlkConfig, Rw};
use cardbench::compare::{self, Backing, CompareConfig};
use cardbench::units::{parse_duration, parse_size};
use cardbench::{chart, report};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "cardsim's host-side load generators and peer comparisons"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Drive a vhost-user-blk backend as a VMM's guest driver would.
    Blk(BlkArgs),
    /// Our block card against qemu-storage-daemon and raw fio.
    CompareBlk(CompareArgs),
    /// Drive the NVMe card (vfio-user) through the userspace NVMe driver.
    Nvme(nvme_args::NvmeArgs),
    /// The NVMe card through the driver against raw fio io_uring.
    CompareNvme(nvme_args::CompareNvmeArgs),
    /// Our networking card against DPDK's net_vhost PMD, testpmd as the load.
    CompareNet(net_args::CompareNetArgs),
    /// Two QEMU guests on our networking card against a Linux bridge (iperf3).
    CompareNetGuests(net_args::CompareNetGuestsArgs),
}

#[derive(clap::Args, Debug)]
struct BlkArgs {
    /// The backend's vhost-user socket.
    #[arg(long)]
    socket: PathBuf,
    #[arg(long, value_enum)]
    rw: Rw,
    /// Block size (multiple of 512, at most 128k).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 1)]
    iodepth: u16,
    /// Virtqueues to drive, one thread each.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Measured time (5, 2.5s, 500ms).
    #[arg(long, default_value = "5", value_parser = parse_duration)]
    runtime: Duration,
    /// Time run before measuring starts.
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    ramp_time: Duration,
    /// Working set from offset 0, split evenly between queues (default: the device).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Percentage of reads in randrw.
    #[arg(long, default_value_t = 50)]
    rwmixread: u8,
    /// Check every read against what was written (fills the working set
    /// first for reads, reads back every written block after writes).
    #[arg(long)]
    verify: bool,
    /// Report this process's CPU time per I/O.
    #[arg(long)]
    backend_pid: Option<u32>,
    /// fio-shaped JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Limit for each handshake reply.
    #[arg(long, default_value = "5", value_parser = parse_duration)]
    handshake_timeout: Duration,
}

#[derive(clap::Args, Debug)]
struct CompareArgs {
    /// Where the shared backing file lives: /dev/shm, or the target directory.
    #[arg(long, value_enum, default_value = "tmpfs")]
    backing: Backing,
    /// O_DIRECT in every system (--direct, cache.direct=on, fio --direct=1).
    #[arg(long)]
    direct: bool,
    /// Measured time per run (default 5s; 500ms with --quick).
    #[arg(long, value_parser = parse_duration)]
    runtime: Option<Duration>,
    /// Warm-up per run before measuring (default 1s; 0 with --quick).
    #[arg(long, value_parser = parse_duration)]
    ramp_time: Option<Duration>,
    /// Rounds per system (default 3; 1 with --quick).
    #[arg(long)]
    rounds: Option<u32>,
    /// Backing file size (default 1G; 64M with --quick).
    #[arg(long, value_parser = parse_size)]
    file_size: Option<u64>,
    /// A fast pass (under a minute) that proves the harness works.
    #[arg(long)]
    quick: bool,
    /// Results folder (default target/cardbench/<timestamp>).
    #[arg(long)]
    results: Option<PathBuf>,
}

#[path = "net/cli.rs"]
mod net_args;

#[path = "nvme/cli.rs"]
mod nvme_args;

enum Failure {
    Usage(anyhow::Error),
    Run(anyhow::Error),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,cardbench=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One line, not clap's usage block: scripts grep this.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("cardbench: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let result = match cli.command {
        Cmd::Blk(args) => run_blk(args),
        Cmd::CompareBlk(args) => run_compare(args),
        Cmd::Nvme(args) => nvme_args::run_nvme(args),
        Cmd::CompareNvme(args) => nvme_args::run_compare_nvme(args, exe_dir()),
        Cmd::CompareNet(args) => net_args::run_compare_net(args, exe_dir()),
        Cmd::CompareNetGuests(args) => net_args::run_compare_net_guests(args, exe_dir()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("cardbench: {e:#}");
            ExitCode::from(2)
        }
        Err(Failure::Run(e)) => {
            eprintln!("cardbench: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run_blk(a: BlkArgs) -> Result<(), Failure> {
    let config = BlkConfig {
        socket: a.socket,
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
        handshake_timeout: a.handshake_timeout,
        connect_wait: Duration::ZERO,
    };
    if let Some(pid) = config.backend_pid {
        if blk::process_cpu(pid).is_none() {
            return Err(Failure::Usage(anyhow::anyhow!(
                "--backend-pid {pid}: no such process (cannot read /proc/{pid}/stat)"
            )));
        }
    }
    let result = blk::run(&config).map_err(|e| {
        if e.is_usage() {
            Failure::Usage(e.into())
        } else {
            Failure::Run(e.into())
        }
    })?;
    let out = report::to_fio(&result);
    if a.json {
        let text = serde_json::to_string_pretty(&out).expect("serializable");
        println!("{text}");
    } else {
        print!("{}", report::human(&out));
    }
    if result.verify_errors > 0 || result.io_errors > 0 {
        return Err(Failure::Run(anyhow::anyhow!(
            "{} verify errors, {} I/O errors in {} reads checked",
            result.verify_errors,
            result.io_errors,
            result.verified_reads
        )));
    }
    Ok(())
}

/// The directory holding this binary (target/<profile>), where its sibling
/// binaries live unless CARDSIM_BIN_DIR says otherwise.
fn exe_dir() -> Option<PathBuf> {
    std::env::current_exe().ok()?.parent().map(PathBuf::from)
}

fn run_compare(a: CompareArgs) -> Result<(), Failure> {
    let exe_dir = exe_dir().unwrap_or_else(|| PathBuf::from("target/debug"));
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
            .join(compare::timestamp(SystemTime::now()))
    });
    let q = a.quick;
    let cfg = CompareConfig {
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
    };
    if cfg.rounds == 0 || cfg.runtime.is_zero() {
        return Err(Failure::Usage(anyhow::anyhow!(
            "--rounds and --runtime must be more than zero"
        )));
    }
    if cfg.file_size < 16 << 20 {
        return Err(Failure::Usage(anyhow::anyhow!(
            "--file-size must be at least 16M"
        )));
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
    let svg = cfg.results.join("compare-blk.svg");
    chart::write_svg(&res, &svg).map_err(|e| Failure::Run(e.into()))?;
    println!("results: {}", cfg.results.display());
    Ok(())
}
