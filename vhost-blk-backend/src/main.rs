//! `vhost-blk-backend`: the EBS-style block card.
//!
//! Serves one volume (a local file) to a VMM as a vhost-user-blk device.
//! Exit status: 0 never (it serves until killed), 1 on a runtime failure,
//! 2 on a usage or configuration error — and then nothing has been changed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use card_firmware::media::{FileMedia, MediaOptions};
use card_firmware::middle::{Latency, Middle, MiddleConfig};
use card_firmware::sandbox::SandboxArgs;
use card_firmware::{agent, metrics, vhost};
use hw_model::ebs::{VolumeSpec, VolumeType};
use hw_model::fault::{FaultKind, FaultSpec};
use vhost_blk_backend::agent::BlockAgent;
use vhost_blk_backend::config;
use vhost_blk_backend::device::BlockDevice;
use vhost_blk_backend::metrics::BlockMetrics;
use vhost_blk_backend::{Volume, SERIAL_LEN};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "cardsim's EBS-style block card: virtio-blk over vhost-user on io_uring"
)]
struct Args {
    /// vhost-user socket to serve (the card is the server; the VMM connects).
    #[arg(long)]
    socket: PathBuf,
    /// The volume's backing file (or block device). Never truncated.
    #[arg(long)]
    backing: PathBuf,
    /// Capacity in bytes (suffixes K, M, G, T accepted); grows the file
    /// sparsely if larger, refused if smaller than it. Default: the file's length.
    #[arg(long, value_parser = card_firmware::media::parse_size)]
    size: Option<u64>,
    /// Number of virtqueues (request queues), 1–64.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    num_queues: u16,
    /// Largest virtqueue accepted: a power of two, 2–32768.
    #[arg(long, default_value_t = 1024, value_parser = parse_queue_size)]
    queue_size: u16,
    /// Refuse writes, discards and write-zeroes (VIRTIO_BLK_F_RO).
    #[arg(long)]
    read_only: bool,
    /// Open the backing file with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    direct: bool,
    /// Serial answered to GET_ID, at most 20 bytes of printable ASCII.
    /// Default: "vol" and 17 hex digits derived from the backing file's path.
    #[arg(long, value_parser = parse_serial)]
    serial: Option<String>,
    /// Write the card's counters as JSON to this file every second.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// EBS volume type to model: throttling, burst credits, CloudWatch metrics.
    #[arg(long, value_parser = parse_volume_type)]
    volume_type: Option<VolumeType>,
    /// Provisioned IOPS (gp3, io1, io2).
    #[arg(long, requires = "volume_type")]
    iops: Option<u64>,
    /// Provisioned throughput in MiB/s (gp3).
    #[arg(long, requires = "volume_type")]
    throughput: Option<u64>,
    /// Service time to add to each I/O: `ebs` (a network hop) or `none`.
    #[arg(long, default_value = "none", value_parser = parse_latency)]
    latency_model: Latency,
    /// Burst credits move this many times faster than wall time, so a burst
    /// bucket drains in seconds (IOPS limits are unchanged).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Seed of every random choice the card makes (latency, faults).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A fault to apply from the start, e.g. `kind=io_error,range=0-1M`
    /// (repeatable; see the README for every kind and key).
    #[arg(long = "fault", value_parser = parse_fault)]
    faults: Vec<FaultSpec>,
    /// The card's agent socket (0600): the management channel's end, for
    /// faults, volume changes, health and metrics while the card runs.
    #[arg(long, alias = "control")]
    agent: Option<PathBuf>,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

fn parse_volume_type(text: &str) -> Result<VolumeType, String> {
    text.parse().map_err(|e| format!("{e}"))
}

fn parse_latency(text: &str) -> Result<Latency, String> {
    match text {
        "ebs" => Ok(Latency::Ebs),
        "none" => Ok(Latency::None),
        other => Err(format!("unknown latency model {other:?} (ebs or none)")),
    }
}

fn parse_fault(text: &str) -> Result<FaultSpec, String> {
    text.parse().map_err(|e| format!("{e}"))
}

fn parse_queue_size(text: &str) -> Result<u16, String> {
    let n: u16 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if (2..=32768).contains(&n) && n.is_power_of_two() {
        Ok(n)
    } else {
        Err(format!("{n} is not a power of two between 2 and 32768"))
    }
}

fn parse_serial(text: &str) -> Result<String, String> {
    if text.len() > SERIAL_LEN {
        return Err(format!(
            "{} bytes is longer than the {SERIAL_LEN} the virtio-blk serial holds",
            text.len()
        ));
    }
    if !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the serial must be printable ASCII without spaces".into());
    }
    Ok(text.to_owned())
}

/// A stable default serial in the style of an EBS volume id, so the guest
/// sees the same serial every time the card serves this file.
fn default_serial(backing: &std::path::Path) -> String {
    let path = std::fs::canonicalize(backing).unwrap_or_else(|_| backing.to_owned());
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in path.as_os_str().as_encoded_bytes() {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("vol0{hash:016x}")
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
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("vhost-blk-backend: {e:#}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("vhost-blk-backend: {e:#}");
            ExitCode::from(1)
        }
    }
}

enum Failure {
    Config(anyhow::Error),
    Runtime(anyhow::Error),
}

fn run(args: Args) -> Result<(), Failure> {
    let media = FileMedia::open(
        &args.backing,
        &MediaOptions {
            size: args.size,
            read_only: args.read_only,
            direct: args.direct,
        },
    )
    .map_err(|e| Failure::Config(e.into()))?;
    let serial_text = args
        .serial
        .clone()
        .unwrap_or_else(|| default_serial(&args.backing));
    let mut serial = [0u8; SERIAL_LEN];
    serial[..serial_text.len()].copy_from_slice(serial_text.as_bytes());

    let middle = Middle::new(&MiddleConfig {
        volume: args.volume_type.map(|volume_type| VolumeSpec {
            volume_type,
            size_bytes: media.capacity(),
            iops: args.iops,
            throughput_mibps: args.throughput,
        }),
        latency: args.latency_model,
        time_scale: args.time_scale,
        seed: args.seed,
    })
    .map_err(|e| Failure::Config(e.into()))?;
    for fault in &args.faults {
        middle
            .add_fault(fault.clone())
            .map_err(|e| Failure::Config(anyhow::anyhow!("--fault: {e}")))?;
    }

    let volume = Arc::new(Volume {
        media,
        serial,
        num_queues: args.num_queues,
        queue_size: args.queue_size,
        // Linux sizes its scatter lists from seg_max; a request's descriptors
        // are header + data + status and must fit the queue without INDIRECT.
        seg_max: config::MAX_SEG_MAX
            .min(u32::from(args.queue_size).saturating_sub(2))
            .max(1),
        metrics: BlockMetrics::new(args.num_queues as usize),
        middle,
    });
    // Everything that needs a path or a privilege happens before the card
    // jails itself: sockets bound, media open. Threads start after, so they
    // inherit the jail.
    let agent = match &args.agent {
        Some(path) => Some(agent::bind(path).map_err(|e| Failure::Config(e.into()))?),
        None => None,
    };
    let listener = vhost::listen(&args.socket).map_err(|e| Failure::Config(e.into()))?;
    let metrics_path = args
        .sandbox
        .jail_card(
            args.metrics.as_deref(),
            &vhost_blk_backend::sandbox::allowlist(),
            &vhost_blk_backend::sandbox::queue_worker_allowlist(),
        )
        .map_err(|e| Failure::Config(e.into()))?;

    if let Some(agent) = agent {
        agent
            .serve(Arc::new(BlockAgent {
                volume: volume.clone(),
            }))
            .map_err(|e| Failure::Runtime(e.into()))?;
    }
    spawn_fault_events(volume.clone()).map_err(|e| Failure::Runtime(e.into()))?;
    if let Some(path) = metrics_path {
        let v = volume.clone();
        metrics::spawn_writer(path.clone(), Duration::from_secs(1), move || v.snapshot())
            .with_context(|| format!("cannot write metrics to {}", path.display()))
            .map_err(Failure::Config)?;
    }

    tracing::info!(
        socket = %args.socket.display(),
        backing = %volume.media.path().display(),
        capacity = volume.media.capacity(),
        queues = volume.num_queues,
        read_only = volume.media.read_only(),
        serial = serial_text,
        "block card listening"
    );
    vhost::serve("vhost-blk-backend", listener, |memory| {
        BlockDevice::new(volume.clone(), memory).map_err(|e| e.to_string())
    })
    .map_err(|e| Failure::Runtime(e.into()))
}

/// Fires power cuts and crashes when their time comes, whether or not the
/// guest is doing I/O.
fn spawn_fault_events(volume: Arc<Volume>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("fault-events".into())
        .spawn(move || loop {
            for event in volume.middle.due_events() {
                match event.kind {
                    FaultKind::PowerCut { .. } => {
                        match volume.middle.power_cut(&event, volume.media.buffered()) {
                            Ok(dropped) => tracing::warn!(
                                id = event.id,
                                dropped,
                                "power cut: writes since the last flush taken back; card going down"
                            ),
                            Err(e) => {
                                tracing::error!(id = event.id, error = %e, "power cut failed")
                            }
                        }
                        // SAFETY: ends the process at once, as a power cut would.
                        unsafe { libc::_exit(POWER_CUT_EXIT) };
                    }
                    FaultKind::Crash => {
                        tracing::warn!(id = event.id, "crash fault: card aborting");
                        std::process::abort();
                    }
                    _ => {}
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        })
        .map(|_| ())
}

/// Exit status of a card taken down by a power-cut fault.
const POWER_CUT_EXIT: i32 = 75;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_sizes_are_powers_of_two() {
        assert_eq!(parse_queue_size("256"), Ok(256));
        assert!(parse_queue_size("100").is_err());
        assert!(parse_queue_size("1").is_err());
    }

    #[test]
    fn serials_fit_the_field() {
        assert!(parse_serial("vol0123456789abcdef0").is_ok());
        assert!(parse_serial("vol0123456789abcdef01").is_err());
        assert!(parse_serial("has space").is_err());
        assert_eq!(default_serial(std::path::Path::new("/x")).len(), SERIAL_LEN);
    }
}
