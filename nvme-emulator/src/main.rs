//! `nvme-emulator`: cardsim's local-NVMe (instance store) card.
//!
//! Serves an NVMe controller with one namespace per `--namespace` file to a
//! VMM over vfio-user. Exit status: 0 never (it serves until killed), 1 on a
//! runtime failure, 2 on a usage or configuration error — and then nothing
//! has been changed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use card_firmware::middle::{Latency, MiddleConfig};
use card_firmware::sandbox::SandboxArgs;
use card_firmware::{agent, metrics};
use hw_model::fault::FaultSpec;
use nvme_emulator::agent::NvmeAgent;
use nvme_emulator::controller::{Controller, ControllerConfig};
use nvme_emulator::namespace::{Namespace, NamespaceSpec};
use nvme_emulator::server;

/// Model number every card reports unless told otherwise.
const DEFAULT_MODEL: &str = "cardsim NVMe Instance Storage";

#[derive(Parser, Debug)]
#[command(
    version,
    about = "cardsim's local-NVMe card: an NVMe 1.4 controller over vfio-user on io_uring"
)]
struct Args {
    /// vfio-user socket to serve (the card is the server; the VMM connects).
    #[arg(long)]
    socket: PathBuf,
    /// A namespace: `FILE[,size=BYTES][,lba=512|4096]` (repeatable; NSID 1
    /// is the first). The file is never truncated; `size` grows it sparsely.
    #[arg(long = "namespace", required = true)]
    namespaces: Vec<NamespaceSpec>,
    /// I/O queue pairs the controller offers, 1–64.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    io_queues: u16,
    /// Serial number, at most 20 bytes of printable ASCII. Default: "AWS"
    /// and 17 hex digits derived from the first namespace's path.
    #[arg(long, value_parser = parse_serial)]
    serial: Option<String>,
    /// Model number, at most 40 bytes of printable ASCII.
    #[arg(long, default_value = DEFAULT_MODEL, value_parser = parse_model)]
    model: String,
    /// Open namespace files with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    direct: bool,
    /// Write the card's counters as JSON to this file every second.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Service time added to each read and write: `flash` (local NVMe
    /// flash, from hw-model) or `none`.
    #[arg(long, default_value = "none", value_parser = parse_media_model)]
    media_model: Latency,
    /// Microseconds an idle queue worker keeps polling its doorbell and its
    /// completions before it sleeps: fewer trapped doorbell writes and
    /// wake-ups for a busy guest, at the cost of host CPU. 0 = never poll.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    poll_us: u64,
    /// Seed of every random choice the card makes (latency, faults).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A fault applied to every namespace from the start, e.g.
    /// `kind=io_error,range=0-1M` or `kind=latency,fixed_ms=5`
    /// (repeatable; io_error, latency and stall).
    #[arg(long = "fault", value_parser = parse_fault)]
    faults: Vec<FaultSpec>,
    /// The card's agent socket (0600): the management channel's end, for
    /// faults, health and metrics while the card runs.
    #[arg(long, alias = "control")]
    agent: Option<PathBuf>,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

fn parse_media_model(text: &str) -> Result<Latency, String> {
    match text {
        "flash" => Ok(Latency::Flash),
        "none" => Ok(Latency::None),
        other => Err(format!("unknown media model {other:?} (flash or none)")),
    }
}

fn parse_fault(text: &str) -> Result<FaultSpec, String> {
    let spec: FaultSpec = text.parse().map_err(|e| format!("{e}"))?;
    nvme_emulator::agent::check_fault(&spec)?;
    Ok(spec)
}

fn parse_ascii(text: &str, max: usize, what: &str) -> Result<String, String> {
    if text.len() > max {
        return Err(format!(
            "{} bytes is longer than the {max} the {what} holds",
            text.len()
        ));
    }
    if !text.bytes().all(|b| (0x20..0x7f).contains(&b)) || text.trim().is_empty() {
        return Err(format!("the {what} must be printable ASCII"));
    }
    Ok(text.to_owned())
}

fn parse_serial(text: &str) -> Result<String, String> {
    parse_ascii(text, 20, "serial number")
}

fn parse_model(text: &str) -> Result<String, String> {
    parse_ascii(text, 40, "model number")
}

/// A stable default serial, so the guest sees the same serial every time
/// the card serves this file.
fn default_serial(path: &std::path::Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in path.as_os_str().as_encoded_bytes() {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("AWS{hash:017X}")
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            // One line for usage errors: clap's first paragraph, its lines
            // joined (without the usage text that follows).
            if e.use_stderr() {
                let text = e.to_string();
                let first = text.split("\n\n").next().unwrap_or("bad arguments");
                let line: Vec<&str> = first.split_whitespace().collect();
                eprintln!("nvme-emulator: {}", line.join(" "));
                return ExitCode::from(2);
            }
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("nvme-emulator: {e:#}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("nvme-emulator: {e:#}");
            ExitCode::from(1)
        }
    }
}

enum Failure {
    Config(anyhow::Error),
    Runtime(anyhow::Error),
}

fn run(args: Args) -> Result<(), Failure> {
    let mut namespaces = Vec::new();
    for (i, spec) in args.namespaces.iter().enumerate() {
        let middle = MiddleConfig {
            volume: None,
            latency: args.media_model,
            time_scale: 1.0,
            // Each namespace draws its own latencies.
            seed: args.seed.wrapping_add(i as u64),
        };
        let ns =
            Namespace::open(spec, args.direct, &middle).map_err(|e| Failure::Config(e.into()))?;
        for fault in &args.faults {
            ns.middle
                .add_fault(fault.clone())
                .map_err(|e| Failure::Config(anyhow::anyhow!("--fault: {e}")))?;
        }
        namespaces.push(ns);
    }
    let serial = args
        .serial
        .clone()
        .unwrap_or_else(|| default_serial(&args.namespaces[0].path));
    let ctrl = Controller::new(ControllerConfig {
        serial: serial.clone(),
        model: args.model.clone(),
        firmware: env!("CARGO_PKG_VERSION").to_string(),
        io_queues: args.io_queues,
        poll: Duration::from_micros(args.poll_us),
        namespaces,
    })
    .map_err(|e| Failure::Runtime(e.into()))?;
    // Everything that needs a path or a privilege happens before the card
    // jails itself: namespaces open, sockets bound. Threads start after, so
    // they inherit the jail.
    let agent = match &args.agent {
        Some(path) => Some(agent::bind(path).map_err(|e| Failure::Config(e.into()))?),
        None => None,
    };
    let server = server::listen(&ctrl, &args.socket).map_err(|e| Failure::Config(e.into()))?;
    let metrics_path = args
        .sandbox
        .jail_card(
            args.metrics.as_deref(),
            &nvme_emulator::sandbox::allowlist(),
            &nvme_emulator::sandbox::queue_worker_allowlist(),
        )
        .map_err(|e| Failure::Config(e.into()))?;
    if let Some(agent) = agent {
        agent
            .serve(Arc::new(NvmeAgent {
                controller: ctrl.clone(),
            }))
            .map_err(|e| Failure::Runtime(e.into()))?;
    }
    if let Some(path) = metrics_path {
        let c = ctrl.clone();
        metrics::spawn_writer(path.clone(), Duration::from_secs(1), move || c.snapshot())
            .with_context(|| format!("cannot write metrics to {}", path.display()))
            .map_err(Failure::Config)?;
    }
    for (i, ns) in ctrl.config.namespaces.iter().enumerate() {
        tracing::info!(
            nsid = i + 1,
            path = %ns.media.path().display(),
            bytes = ns.media.capacity(),
            lba = ns.lba_size(),
            "namespace"
        );
    }
    tracing::info!(
        socket = %args.socket.display(),
        io_queues = ctrl.io_queues(),
        serial,
        "NVMe card listening"
    );
    server::serve(ctrl, server).map_err(|e| Failure::Runtime(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identify_strings_fit_their_fields() {
        assert!(parse_serial("AWS0123456789ABCDEF0").is_ok());
        assert!(parse_serial("AWS0123456789ABCDEF01").is_err());
        assert!(parse_model(DEFAULT_MODEL).is_ok());
        assert!(parse_model(&"m".repeat(41)).is_err());
        assert!(parse_model("tab\there").is_err());
        assert_eq!(default_serial(std::path::Path::new("/x")).len(), 20);
    }
}
