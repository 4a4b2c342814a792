//! `vhost-net-backend`: the networking card.
//!
//! Serves every ENI of a VPC config as its own vhost-user-net socket and
//! switches between them (and to remote cards over VXLAN) as a VPC does.
//! Exit status: 0 for `--check-config` on a good config (the card otherwise
//! serves until killed), 1 on a runtime failure, 2 on a usage or
//! configuration error — and then nothing has been started.

use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use card_firmware::sandbox::SandboxArgs;
use card_firmware::{agent, metrics, vhost};
use vhost_net_backend::agent::NetAgent;
use vhost_net_backend::card::Card;
use vhost_net_backend::device::PortDevice;
use vhost_net_backend::{uplink, vxlan};
use vpc::config::VpcConfig;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "cardsim's networking card: a vhost-user-net VPC switch, one port per ENI"
)]
struct Args {
    /// The VPC config (TOML): subnets, security groups, ENIs, remotes, VXLAN.
    #[arg(long)]
    config: PathBuf,
    /// Validate the config, print a summary and exit (0 good, 2 bad).
    #[arg(long)]
    check_config: bool,
    /// Write the card's counters as JSON to this file every second.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// The card's agent socket (0600): the management channel's end, for
    /// health, metrics and live security-group changes.
    #[arg(long, alias = "control")]
    agent: Option<PathBuf>,
    /// Poll mode: after a TX batch, keep polling the queue (guest kicks off)
    /// until it has been idle this many microseconds. 0: interrupt mode.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    poll_us: u64,
    /// Seed of every random choice the card makes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    sandbox: SandboxArgs,
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
            eprintln!("vhost-net-backend: {}", one_line(&format!("{e:#}")));
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("vhost-net-backend: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// A config error on one line: the TOML parser's message quotes the
/// offending line under a location; keep the location and the problem.
fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    match (lines.first(), lines.last()) {
        (Some(first), Some(last)) if lines.len() > 1 => format!("{first} — {}", last.trim()),
        _ => text.trim().to_owned(),
    }
}

enum Failure {
    Config(anyhow::Error),
    Runtime(anyhow::Error),
}

fn run(args: Args) -> Result<(), Failure> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("cannot read config {}", args.config.display()))
        .map_err(Failure::Config)?;
    let config = VpcConfig::parse(&text)
        .map_err(|e| Failure::Config(anyhow::anyhow!("{}: {e}", args.config.display())))?;
    if args.check_config {
        println!(
            "{}: ok ({} subnets, {} security groups, {} ENIs, {} remotes)",
            args.config.display(),
            config.subnets.len(),
            config.security_groups.len(),
            config.enis.len(),
            config.remotes.len()
        );
        return Ok(());
    }
    tracing::debug!(seed = args.seed, "seed");

    // Everything that can fail on operator input is checked before the
    // first socket is claimed.
    for eni in &config.enis {
        card_firmware::socket::claim_socket_path(&eni.socket)
            .with_context(|| format!("eni {}", eni.id))
            .map_err(Failure::Config)?;
    }
    let vxlan_socket = match &config.vxlan {
        Some(v) => Some(Arc::new(
            UdpSocket::bind(v.listen)
                .with_context(|| format!("vxlan.listen: cannot bind {}", v.listen))
                .map_err(Failure::Config)?,
        )),
        None => None,
    };
    let uplink = match &config.uplink {
        Some(u) => Some(Arc::new(
            uplink::open_tap(&u.tap)
                .with_context(|| format!("uplink.tap: cannot open tap {}", u.tap))
                .map_err(Failure::Config)?,
        )),
        None => None,
    };
    let mut card = Card::new(config, vxlan_socket.clone(), uplink.clone())
        .map_err(|e| Failure::Config(anyhow::anyhow!(e)))?;
    card.poll = Duration::from_micros(args.poll_us);
    let card = Arc::new(card);

    // Everything that needs a path or a privilege happens before the card
    // jails itself: every port's socket listening, the agent socket bound,
    // the VXLAN socket and the tap open. Threads start after, so they inherit
    // the jail.
    let mut listeners = Vec::new();
    for port in &card.ports {
        let mut listener = vhost::listen(&port.eni.socket)
            .with_context(|| format!("eni {}", port.eni.id))
            .map_err(Failure::Config)?;
        let (c, id) = (card.clone(), port.id);
        listener.set_net_mtu_handler(Arc::new(move |mtu| c.set_port_mtu(id, mtu)));
        listeners.push((port.clone(), listener));
    }
    let agent = match &args.agent {
        Some(path) => Some(agent::bind(path).map_err(|e| Failure::Config(e.into()))?),
        None => None,
    };
    let metrics_path = args
        .sandbox
        .jail_card(
            args.metrics.as_deref(),
            &vhost_net_backend::sandbox::allowlist(),
            &vhost_net_backend::sandbox::queue_worker_allowlist(),
        )
        .map_err(|e| Failure::Config(e.into()))?;

    if let Some(agent) = agent {
        agent
            .serve(Arc::new(NetAgent { card: card.clone() }))
            .map_err(|e| Failure::Runtime(e.into()))?;
    }
    if let Some(path) = metrics_path {
        let c = card.clone();
        metrics::spawn_writer(path.clone(), Duration::from_secs(1), move || c.snapshot())
            .with_context(|| format!("cannot write metrics to {}", path.display()))
            .map_err(Failure::Config)?;
    }
    if let Some(socket) = vxlan_socket {
        let c = card.clone();
        let out = card
            .forwarder(256)
            .map_err(|e| Failure::Runtime(e.into()))?;
        std::thread::Builder::new()
            .name("vxlan-rx".into())
            .spawn(move || {
                if let Err(e) = vxlan::receive_forever(c, socket, out) {
                    tracing::error!(error = %e, "VXLAN receiver stopped");
                }
            })
            .map_err(|e| Failure::Runtime(e.into()))?;
    }
    if let Some(tap) = uplink {
        let c = card.clone();
        let out = card
            .forwarder(256)
            .map_err(|e| Failure::Runtime(e.into()))?;
        std::thread::Builder::new()
            .name("uplink-rx".into())
            .spawn(move || {
                if let Err(e) = uplink::receive_forever(c, tap, out) {
                    tracing::error!(error = %e, "uplink receiver stopped");
                }
            })
            .map_err(|e| Failure::Runtime(e.into()))?;
    }

    let mut threads = Vec::new();
    for (port, listener) in listeners {
        let card = card.clone();
        let name = format!("port-{}", port.eni.id);
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                tracing::info!(
                    eni = port.eni.id,
                    socket = %port.eni.socket.display(),
                    mac = %port.eni.mac,
                    ip = %port.eni.ip,
                    queue_pairs = port.eni.queue_pairs,
                    "port listening"
                );
                vhost::serve("vhost-net-backend", listener, |memory| {
                    PortDevice::new(card.clone(), port.clone(), memory).map_err(|e| e.to_string())
                })
                .with_context(|| format!("eni {}", port.eni.id))
            })
            .map_err(|e| Failure::Runtime(e.into()))?;
        threads.push(handle);
    }
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Failure::Runtime(e)),
            Err(_) => return Err(Failure::Runtime(anyhow::anyhow!("a port thread panicked"))),
        }
    }
    Ok(())
}
