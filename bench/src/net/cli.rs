//! The command line of `cardbench compare-net` and `compare-net-guests`
//! (a module of the binary: it shares main's exit-status convention).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::anyhow;

use cardbench::net::compare::{self, Backend, NetCompareConfig};
use cardbench::net::guests::{self, GuestsConfig};
use cardbench::net::testpmd::Mode;
use cardbench::net::NetError;
use cardbench::units::parse_duration;

use super::Failure;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    Txonly,
    Io,
}

#[derive(clap::Args, Debug)]
pub struct CompareNetArgs {
    /// Measured time per run (default 5s; 1s with --quick).
    #[arg(long, value_parser = parse_duration)]
    runtime: Option<Duration>,
    /// Warm-up per run before measuring (default 1s; 500ms with --quick).
    #[arg(long, value_parser = parse_duration)]
    ramp_time: Option<Duration>,
    /// Rounds per backend (default 3; 1 with --quick).
    #[arg(long)]
    rounds: Option<u32>,
    /// Generator modes (default both).
    #[arg(long, value_enum, value_delimiter = ',')]
    mode: Vec<ModeArg>,
    /// Frame sizes in bytes, 64 to 1514 (default 64,1500).
    #[arg(long, value_delimiter = ',')]
    frame_size: Vec<u16>,
    /// Backends to run (default all three: the comparison).
    #[arg(long, value_enum, value_delimiter = ',')]
    backend: Vec<Backend>,
    /// The card's --poll-us window for its poll-mode runs (1 to 1000000).
    #[arg(long, default_value_t = 200)]
    poll_us: u32,
    /// An extra flag for vhost-net-backend (repeat for more).
    #[arg(long, allow_hyphen_values = true)]
    card_arg: Vec<String>,
    /// A fast pass that proves the harness works.
    #[arg(long)]
    quick: bool,
    /// Results folder (default target/cardbench/<timestamp>-net).
    #[arg(long)]
    results: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct CompareNetGuestsArgs {
    /// iperf3 time per run, whole seconds (default 10s; 3s with --quick).
    #[arg(long, value_parser = parse_duration)]
    runtime: Option<Duration>,
    /// Rounds per setup (default 3; 1 with --quick).
    #[arg(long)]
    rounds: Option<u32>,
    /// vCPUs per guest.
    #[arg(long, default_value_t = 1)]
    smp: u32,
    /// iperf3 parallel streams.
    #[arg(long, default_value_t = 1)]
    streams: u32,
    #[arg(long)]
    quick: bool,
    /// Where results.json goes (default target/cardbench/<timestamp>-net-guests).
    #[arg(long)]
    results: Option<PathBuf>,
}

/// The card binary is the bench binary's sibling unless CARDSIM_BIN_DIR
/// says otherwise; the harness looks there.
fn point_harness_at_binaries(exe_dir: &Option<PathBuf>) {
    if std::env::var_os("CARDSIM_BIN_DIR").is_none() {
        if let Some(dir) = exe_dir {
            std::env::set_var("CARDSIM_BIN_DIR", dir);
        }
    }
}

fn results_dir(given: Option<PathBuf>, exe_dir: &Option<PathBuf>, suffix: &str) -> PathBuf {
    given.unwrap_or_else(|| {
        let target = exe_dir
            .as_ref()
            .and_then(|d| d.parent())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("target"));
        target.join("cardbench").join(format!(
            "{}-{suffix}",
            cardbench::compare::timestamp(SystemTime::now())
        ))
    })
}

fn classify(e: NetError) -> Failure {
    if e.is_usage() {
        Failure::Usage(e.into())
    } else {
        Failure::Run(e.into())
    }
}

pub fn run_compare_net(a: CompareNetArgs, exe_dir: Option<PathBuf>) -> Result<(), Failure> {
    let q = a.quick;
    let modes = if a.mode.is_empty() {
        vec![Mode::Txonly, Mode::Io]
    } else {
        a.mode
            .iter()
            .map(|m| match m {
                ModeArg::Txonly => Mode::Txonly,
                ModeArg::Io => Mode::Io,
            })
            .collect()
    };
    let frame_sizes = if a.frame_size.is_empty() {
        vec![64, 1500]
    } else {
        a.frame_size.clone()
    };
    if let Some(bad) = frame_sizes.iter().find(|s| !(64..=1514).contains(*s)) {
        return Err(Failure::Usage(anyhow!(
            "--frame-size {bad}: must be 64 to 1514 bytes (an Ethernet frame without FCS within the VPC's 1500 MTU)"
        )));
    }
    let cfg = NetCompareConfig {
        runtime: a
            .runtime
            .unwrap_or(Duration::from_secs(if q { 1 } else { 5 })),
        ramp: a.ramp_time.unwrap_or(if q {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(1)
        }),
        rounds: a.rounds.unwrap_or(if q { 1 } else { 3 }),
        modes,
        frame_sizes,
        card_args: a.card_arg,
        poll_us: a.poll_us,
        backends: if a.backend.is_empty() {
            vec![Backend::Card, Backend::CardPoll, Backend::DpdkVhost]
        } else {
            a.backend
        },
        results: results_dir(a.results, &exe_dir, "net"),
        startup: Duration::from_secs(30),
    };
    if cfg.rounds == 0 || cfg.runtime.is_zero() {
        return Err(Failure::Usage(anyhow!(
            "--rounds and --runtime must be more than zero"
        )));
    }
    if !(1..=1_000_000).contains(&cfg.poll_us) {
        return Err(Failure::Usage(anyhow!(
            "--poll-us {}: must be 1 to 1000000",
            cfg.poll_us
        )));
    }
    point_harness_at_binaries(&exe_dir);
    let res = compare::run(&cfg).map_err(classify)?;
    print!("{}", compare::table(&res));
    let json = compare::write_json(&res, &cfg.results).map_err(classify)?;
    println!("results: {}", json.display());
    Ok(())
}

pub fn run_compare_net_guests(
    a: CompareNetGuestsArgs,
    exe_dir: Option<PathBuf>,
) -> Result<(), Failure> {
    let q = a.quick;
    let cfg = GuestsConfig {
        runtime: a
            .runtime
            .unwrap_or(Duration::from_secs(if q { 3 } else { 10 })),
        rounds: a.rounds.unwrap_or(if q { 1 } else { 3 }),
        smp: a.smp,
        streams: a.streams,
    };
    if cfg.rounds == 0 || cfg.runtime < Duration::from_secs(1) {
        return Err(Failure::Usage(anyhow!(
            "--rounds must be more than zero and --runtime at least 1s"
        )));
    }
    if !(1..=8).contains(&cfg.smp) || !(1..=16).contains(&cfg.streams) {
        return Err(Failure::Usage(anyhow!(
            "--smp must be 1 to 8 and --streams 1 to 16"
        )));
    }
    point_harness_at_binaries(&exe_dir);
    let dir = results_dir(a.results, &exe_dir, "net-guests");
    let res = guests::run(&cfg).map_err(classify)?;
    print!("{}", guests::table(&res));
    std::fs::create_dir_all(&dir)
        .and_then(|()| {
            std::fs::write(
                dir.join("results.json"),
                serde_json::to_string_pretty(&res).unwrap_or_default(),
            )
        })
        .map_err(|e| Failure::Run(anyhow!("writing {}: {e}", dir.display())))?;
    println!("results: {}", dir.join("results.json").display());
    Ok(())
}
