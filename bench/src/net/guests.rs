//! `cardbench compare-net-guests`: TCP throughput (iperf3) between two QEMU
//! guests on one card against the same two guests on a Linux bridge with
//! vhost-less taps (QEMU's own virtio-net and tap backend). Under TCG the
//! guests are the bottleneck; the card must not be (target: within 10%).
//!
//! Both setups use static addresses (the same guest work on both sides) and
//! QEMU 11.1 with one queue pair; rounds alternate between the two.

use std::time::Duration;

use serde::Serialize;

use cardsim_tests::net_card::{iperf_received_bps, run_pair, Bridge, NetCard, PairSpec};
use cardsim_tests::Vmm;

use super::compare::{card_config, IP_A, IP_B, MAC_A, MAC_B};
use super::NetError;
use crate::compare::median;

#[derive(Clone, Debug)]
pub struct GuestsConfig {
    /// iperf3's measured time per run.
    pub runtime: Duration,
    pub rounds: u32,
    /// vCPUs per guest.
    pub smp: u32,
    /// iperf3 parallel streams.
    pub streams: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Path {
    Card,
    LinuxBridge,
}

#[derive(Clone, Debug, Serialize)]
pub struct GuestsResults {
    pub runtime_s: f64,
    pub rounds: u32,
    pub smp: u32,
    pub streams: u32,
    /// Received Gbit/s per round.
    pub card_gbps: Vec<f64>,
    pub bridge_gbps: Vec<f64>,
    pub median_card_gbps: f64,
    pub median_bridge_gbps: f64,
    /// median(card) / median(bridge).
    pub ratio: f64,
}

fn spec(cfg: &GuestsConfig) -> PairSpec {
    PairSpec {
        vmm: Vmm::Qemu11,
        smp: cfg.smp,
        mem_mib: 512,
        server_setup: format!("ip link set eth0 up\nip addr add {IP_B}/24 dev eth0"),
        client_setup: format!("ip link set eth0 up\nip addr add {IP_A}/24 dev eth0"),
        server_ip: IP_B.into(),
        client_ip: IP_A.into(),
        server_extra: String::new(),
        client_body: format!(
            "iperf_json tput -c {IP_B} -t {} -O 1 -P {}\n",
            cfg.runtime.as_secs().max(1),
            cfg.streams
        ),
        timeout: Duration::from_secs(240) + cfg.runtime,
    }
}

fn run_one(cfg: &GuestsConfig, path: Path) -> Result<f64, NetError> {
    let spec = spec(cfg);
    let run = match path {
        Path::Card => {
            let card = NetCard::start(&card_config(), &[]).map_err(NetError::Harness)?;
            let a = card
                .socket("eni-a")
                .map_err(NetError::Harness)?
                .to_path_buf();
            let b = card
                .socket("eni-b")
                .map_err(NetError::Harness)?
                .to_path_buf();
            run_pair(
                &spec,
                |g| Ok(g.vhost_user_net(&b, MAC_B, 1)),
                |g| Ok(g.vhost_user_net(&a, MAC_A, 1)),
            )
        }
        Path::LinuxBridge => {
            let bridge = Bridge::create(2).map_err(NetError::Harness)?;
            let attach = |index: usize, mac: &str| {
                let args = bridge.qemu_args(index, mac);
                move |mut g: cardsim_tests::GuestBuilder| {
                    for a in args? {
                        g = g.qemu_arg(a);
                    }
                    Ok(g)
                }
            };
            run_pair(&spec, attach(1, MAC_B), attach(0, MAC_A))
        }
    }
    .map_err(NetError::Harness)?;
    let bps = iperf_received_bps(&run.client.console, "tput").map_err(NetError::Harness)?;
    Ok(bps / 1e9)
}

pub fn run(cfg: &GuestsConfig) -> Result<GuestsResults, NetError> {
    Vmm::Qemu11
        .available()
        .map_err(|e| NetError::Setup(format!("{e:#}")))?;
    let (mut card, mut bridge) = (Vec::new(), Vec::new());
    for round in 0..cfg.rounds {
        let order = if round % 2 == 0 {
            [Path::Card, Path::LinuxBridge]
        } else {
            [Path::LinuxBridge, Path::Card]
        };
        for path in order {
            let gbps = run_one(cfg, path)
                .map_err(|e| NetError::Peer(format!("{path:?}, round {}: {e}", round + 1)))?;
            tracing::info!("round {} {path:?}: {gbps:.3} Gbit/s", round + 1);
            match path {
                Path::Card => card.push(gbps),
                Path::LinuxBridge => bridge.push(gbps),
            }
        }
    }
    let (mc, mb) = (median(card.iter().copied()), median(bridge.iter().copied()));
    Ok(GuestsResults {
        runtime_s: cfg.runtime.as_secs_f64(),
        rounds: cfg.rounds,
        smp: cfg.smp,
        streams: cfg.streams,
        card_gbps: card,
        bridge_gbps: bridge,
        median_card_gbps: mc,
        median_bridge_gbps: mb,
        ratio: if mb > 0.0 { mc / mb } else { 0.0 },
    })
}

pub fn table(r: &GuestsResults) -> String {
    format!(
        "{:<28} {:>10}\n{:<28} {:>10.3}\n{:<28} {:>10.3}\n{:<28} {:>10.2}\n\
         medians of {} rounds, iperf3 -t {:.0} -P {}, QEMU 11.1 TCG guests with {} vCPU(s)\n",
        "TCP guest to guest",
        "Gbit/s",
        "vhost-net-backend",
        r.median_card_gbps,
        "Linux bridge + tap (vhost=off)",
        r.median_bridge_gbps,
        "ratio card/bridge",
        r.ratio,
        r.rounds,
        r.runtime_s,
        r.streams,
        r.smp
    )
}
