//! `cardbench compare-net`: DPDK testpmd on virtio_user ports (the guest
//! driver's side) loads two vhost-user-net ports of (a) our card, serving
//! ENI A and ENI B of a one-subnet VPC, and (b) DPDK's net_vhost PMD in a
//! second testpmd forwarding between its two ports: the same topology, the
//! switch replaced. Rounds alternate between the two; medians and the ratio
//! ours/DPDK are reported per mode and frame size.
//!
//! CPU placement on this 2-CPU machine: the generator's forwarding lcore on
//! CPU 0 (main lcore on CPU 1); the DPDK peer's forwarding lcore on CPU 1
//! (main on CPU 0); our card pinned to CPU 1 with all its threads. So each
//! backend has one CPU, the generator the other; the idle main lcores share.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::testpmd::{self, GeneratorPort, Mode, Placement, PortStats, Testpmd, Traffic};
use super::NetError;
use crate::blk::process_cpu;
use crate::compare::median;

pub const MAC_A: &str = "02:00:0a:00:01:0a";
pub const MAC_B: &str = "02:00:0a:00:01:0b";
pub const IP_A: &str = "10.0.1.10";
pub const IP_B: &str = "10.0.1.11";

/// The card's config: ENI A and B in one subnet, a security group that lets
/// any traffic in from the VPC (the generator's UDP flows).
pub fn card_config() -> String {
    format!(
        r#"[vpc]
cidr = "10.0.0.0/16"
vni = 100

[[subnet]]
id = "subnet-a"
cidr = "10.0.1.0/24"
gateway = "10.0.1.1"

[[security_group]]
id = "sg-bench"
ingress = [ {{ proto = "all", cidr = "10.0.0.0/16" }} ]
egress  = [ {{ proto = "all", cidr = "0.0.0.0/0" }} ]

[[eni]]
id = "eni-a"
socket = "$DIR/eni-a.sock"
mac = "{MAC_A}"
ip = "{IP_A}"
subnet = "subnet-a"
security_groups = ["sg-bench"]

[[eni]]
id = "eni-b"
socket = "$DIR/eni-b.sock"
mac = "{MAC_B}"
ip = "{IP_B}"
subnet = "subnet-a"
security_groups = ["sg-bench"]
"#
    )
}

#[derive(Clone, Debug)]
pub struct NetCompareConfig {
    pub runtime: Duration,
    pub ramp: Duration,
    pub rounds: u32,
    pub modes: Vec<Mode>,
    pub frame_sizes: Vec<u16>,
    /// Extra flags for the card.
    pub card_args: Vec<String>,
    /// The card's `--poll-us` window for the poll-mode backend.
    pub poll_us: u32,
    /// The backends to run (both for a comparison).
    pub backends: Vec<Backend>,
    pub results: PathBuf,
    /// For a testpmd or the card to come up.
    pub startup: Duration,
}

/// The two backends compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// vhost-net-backend as it starts by default: every TX batch starts with
    /// the driver's kick (interrupt mode).
    Card,
    /// vhost-net-backend with `--poll-us`: after a batch the TX queue is
    /// polled with kicks off until idle for the window (poll mode).
    CardPoll,
    /// DPDK's net_vhost PMD in testpmd.
    DpdkVhost,
}

impl Backend {
    pub fn label(self) -> &'static str {
        match self {
            Backend::Card => "vhost-net-backend (interrupt)",
            Backend::CardPoll => "vhost-net-backend (poll)",
            Backend::DpdkVhost => "DPDK net_vhost",
        }
    }
}

/// One measured run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    /// Frames per second through the backend, millions.
    pub mpps: f64,
    /// The same in Gbit/s of frames (without preamble and FCS).
    pub gbps: f64,
    /// CPUs the backend process used meanwhile (1.0 = one busy CPU).
    pub backend_cpus: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct NetCell {
    pub mode: Mode,
    pub frame_size: u16,
    pub card: Vec<Sample>,
    pub card_poll: Vec<Sample>,
    pub dpdk: Vec<Sample>,
    pub median_card_mpps: f64,
    pub median_card_poll_mpps: f64,
    pub median_dpdk_mpps: f64,
    /// median(card, interrupt mode) / median(DPDK vhost).
    pub ratio: f64,
    /// median(card, poll mode) / median(DPDK vhost).
    pub ratio_poll: f64,
}

impl NetCell {
    pub fn label(&self) -> String {
        format!("{} {} B", self.mode.label(), self.frame_size)
    }

    fn summarize(&mut self) {
        self.median_card_mpps = median(self.card.iter().map(|s| s.mpps));
        self.median_card_poll_mpps = median(self.card_poll.iter().map(|s| s.mpps));
        self.median_dpdk_mpps = median(self.dpdk.iter().map(|s| s.mpps));
        let over_dpdk = |x: f64| {
            if self.median_dpdk_mpps > 0.0 {
                x / self.median_dpdk_mpps
            } else {
                0.0
            }
        };
        self.ratio = over_dpdk(self.median_card_mpps);
        self.ratio_poll = over_dpdk(self.median_card_poll_mpps);
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct NetResults {
    pub started_unix: u64,
    pub kernel: String,
    pub cpus: usize,
    pub runtime_s: f64,
    pub ramp_s: f64,
    pub rounds: u32,
    pub generator: Placement,
    pub dpdk_peer: Placement,
    /// The CPU the card is pinned to.
    pub card_cpu: usize,
    pub card_args: Vec<String>,
    pub poll_us: u32,
    pub cells: Vec<NetCell>,
}

/// Runs the whole matrix: for each round, each cell, both backends (the
/// order alternating by round).
pub fn run(cfg: &NetCompareConfig) -> Result<NetResults, NetError> {
    testpmd::available()?;
    std::fs::create_dir_all(&cfg.results).map_err(|source| NetError::Io {
        what: format!("creating {}", cfg.results.display()),
        source,
    })?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Generator's forwarding lcore on CPU 0, the backend on the last CPU.
    let backend_cpu = cpus.saturating_sub(1);
    let generator = Placement {
        main_cpu: backend_cpu,
        forward_cpu: 0,
    };
    let dpdk_peer = Placement {
        main_cpu: 0,
        forward_cpu: backend_cpu,
    };
    let mut cells: Vec<NetCell> = Vec::new();
    for &mode in &cfg.modes {
        for &frame_size in &cfg.frame_sizes {
            cells.push(NetCell {
                mode,
                frame_size,
                card: Vec::new(),
                card_poll: Vec::new(),
                dpdk: Vec::new(),
                median_card_mpps: 0.0,
                median_card_poll_mpps: 0.0,
                median_dpdk_mpps: 0.0,
                ratio: 0.0,
                ratio_poll: 0.0,
            });
        }
    }
    for round in 0..cfg.rounds {
        for cell in &mut cells {
            let order = if round % 2 == 0 {
                [Backend::Card, Backend::CardPoll, Backend::DpdkVhost]
            } else {
                [Backend::DpdkVhost, Backend::CardPoll, Backend::Card]
            };
            for backend in order.into_iter().filter(|b| cfg.backends.contains(b)) {
                let traffic = Traffic {
                    mode: cell.mode,
                    frame_size: cell.frame_size,
                    peer_macs: [MAC_B.into(), MAC_A.into()],
                    ips: (IP_A.into(), IP_B.into()),
                };
                let sample = run_one(cfg, backend, &traffic, generator, dpdk_peer, backend_cpu)
                    .map_err(|e| {
                        NetError::Peer(format!(
                            "{} ({}, round {}): {e}",
                            backend.label(),
                            cell.label(),
                            round + 1
                        ))
                    })?;
                tracing::info!(
                    "round {} {} {}: {:.3} Mpps",
                    round + 1,
                    cell.label(),
                    backend.label(),
                    sample.mpps
                );
                match backend {
                    Backend::Card => cell.card.push(sample),
                    Backend::CardPoll => cell.card_poll.push(sample),
                    Backend::DpdkVhost => cell.dpdk.push(sample),
                }
            }
        }
    }
    for cell in &mut cells {
        cell.summarize();
    }
    Ok(NetResults {
        started_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        cpus,
        runtime_s: cfg.runtime.as_secs_f64(),
        ramp_s: cfg.ramp.as_secs_f64(),
        rounds: cfg.rounds,
        generator,
        dpdk_peer,
        card_cpu: backend_cpu,
        card_args: cfg.card_args.clone(),
        poll_us: cfg.poll_us,
        cells,
    })
}

/// A backend serving two ports, alive for one run.
enum Running {
    Card(cardsim_tests::net_card::NetCard),
    Dpdk(Testpmd, tempfile::TempDir),
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Card(c) => c.process.id(),
            Running::Dpdk(t, _) => t.pid(),
        }
    }

    fn sockets(&self) -> Vec<PathBuf> {
        match self {
            Running::Card(c) => c.enis.iter().map(|(_, s)| s.clone()).collect(),
            Running::Dpdk(_, dir) => vec![dir.path().join("a.sock"), dir.path().join("b.sock")],
        }
    }
}

fn start_backend(
    cfg: &NetCompareConfig,
    backend: Backend,
    placement: Placement,
    cpu: usize,
) -> Result<Running, NetError> {
    match backend {
        Backend::Card | Backend::CardPoll => {
            let poll = format!("--poll-us={}", cfg.poll_us);
            let mut args: Vec<&str> = cfg.card_args.iter().map(String::as_str).collect();
            if backend == Backend::CardPoll {
                args.push(&poll);
            }
            let card = cardsim_tests::net_card::NetCard::start(&card_config(), &args)
                .map_err(NetError::Harness)?;
            pin_process(card.process.id(), cpu)?;
            Ok(Running::Card(card))
        }
        Backend::DpdkVhost => {
            let dir = tempfile::Builder::new()
                .prefix("cardbench-vhost-")
                .tempdir()
                .map_err(|source| NetError::Io {
                    what: "creating a temporary folder".into(),
                    source,
                })?;
            let sockets = [dir.path().join("a.sock"), dir.path().join("b.sock")];
            for s in &sockets {
                testpmd::remove_stale(s);
            }
            let prefix = format!("cardbench-peer-{}", std::process::id());
            let pmd = Testpmd::vhost_peer(&prefix, placement, &sockets, cfg.startup)?;
            Ok(Running::Dpdk(pmd, dir))
        }
    }
}

/// Pins every thread of `pid` to `cpu` (`taskset -a`): threads made later
/// inherit it from their creator.
fn pin_process(pid: u32, cpu: usize) -> Result<(), NetError> {
    let out = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .output()
        .map_err(|source| NetError::Io {
            what: "running taskset".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetError::Peer(format!(
            "taskset -a -p -c {cpu} {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn run_one(
    cfg: &NetCompareConfig,
    backend: Backend,
    traffic: &Traffic,
    generator: Placement,
    dpdk_peer: Placement,
    backend_cpu: usize,
) -> Result<Sample, NetError> {
    let running = start_backend(cfg, backend, dpdk_peer, backend_cpu)?;
    let sockets = running.sockets();
    let ports: Vec<GeneratorPort> = sockets
        .iter()
        .zip([MAC_A, MAC_B])
        .map(|(socket, mac)| GeneratorPort {
            socket: socket.clone(),
            mac: mac.into(),
        })
        .collect();
    let prefix = format!("cardbench-gen-{}", std::process::id());
    let mut pmd = Testpmd::generator(&prefix, generator, &ports, traffic, cfg.startup)?;
    match traffic.mode {
        Mode::Txonly => pmd.command("start")?,
        // 32 bursts of 32 frames from each port start the bouncing.
        Mode::Io => pmd.command("start tx_first 32")?,
    }
    std::thread::sleep(cfg.ramp);
    let (s0, t0, c0) = (
        pmd.port_stats(2)?,
        Instant::now(),
        process_cpu(running.pid()),
    );
    std::thread::sleep(cfg.runtime);
    let (s1, t1, c1) = (
        pmd.port_stats(2)?,
        Instant::now(),
        process_cpu(running.pid()),
    );
    pmd.quit();
    if let Running::Card(card) = &running {
        if let Ok(m) = card.metrics() {
            let path = cfg.results.join(format!(
                "card-metrics-{}-{}.json",
                traffic.mode.label(),
                traffic.frame_size
            ));
            let _ = std::fs::write(path, m.to_string());
        }
    }
    let secs = (t1 - t0).as_secs_f64();
    let frames = measured_frames(traffic.mode, &s0, &s1);
    let mpps = frames as f64 / secs / 1e6;
    let backend_cpus = match (c0, c1) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a).as_secs_f64() / secs),
        _ => None,
    };
    if frames == 0 {
        return Err(NetError::Peer(format!(
            "no frames went through in {secs:.1} s (stats {s0:?} -> {s1:?})"
        )));
    }
    Ok(Sample {
        mpps,
        gbps: mpps * 1e6 * f64::from(traffic.frame_size) * 8.0 / 1e9,
        backend_cpus,
    })
}

/// Frames the backend carried between two stats snapshots: for txonly what
/// it took from port 0's TX ring, for io-fwd what arrived on both ports.
fn measured_frames(mode: Mode, before: &[PortStats], after: &[PortStats]) -> u64 {
    let delta = |f: fn(&PortStats) -> u64, i: usize| -> u64 {
        match (before.get(i), after.get(i)) {
            (Some(b), Some(a)) => f(a).saturating_sub(f(b)),
            _ => 0,
        }
    };
    match mode {
        Mode::Txonly => delta(|s| s.tx_packets, 0),
        Mode::Io => delta(|s| s.rx_packets, 0) + delta(|s| s.rx_packets, 1),
    }
}

/// The results as a text table.
pub fn table(r: &NetResults) -> String {
    let mut out = format!(
        "{:<14} {:>9} {:>9} {:>9} {:>6} {:>6} {:>6} {:>6} {:>6}\n",
        "workload", "card", "card poll", "DPDK", "ratio", "ratio", "CPUs", "CPUs", "CPUs"
    );
    out.push_str(&format!(
        "{:<14} {:>9} {:>9} {:>9} {:>6} {:>6} {:>6} {:>6} {:>6}\n",
        "", "Mpps", "Mpps", "Mpps", "card", "poll", "card", "poll", "DPDK"
    ));
    for c in &r.cells {
        let cpus = |v: &[Sample]| {
            let x: Vec<f64> = v.iter().filter_map(|s| s.backend_cpus).collect();
            if x.is_empty() {
                "-".to_string()
            } else {
                format!("{:.2}", median(x.into_iter()))
            }
        };
        out.push_str(&format!(
            "{:<14} {:>9.3} {:>9.3} {:>9.3} {:>6.2} {:>6.2} {:>6} {:>6} {:>6}\n",
            c.label(),
            c.median_card_mpps,
            c.median_card_poll_mpps,
            c.median_dpdk_mpps,
            c.ratio,
            c.ratio_poll,
            cpus(&c.card),
            cpus(&c.card_poll),
            cpus(&c.dpdk)
        ));
    }
    out.push_str(&format!(
        "medians of {} rounds, {:.1} s each after {:.1} s warm-up; card poll mode --poll-us={}; generator lcores {:?}, DPDK peer {:?}, card on CPU {}\n",
        r.rounds, r.runtime_s, r.ramp_s, r.poll_us, r.generator, r.dpdk_peer, r.card_cpu
    ));
    out
}

/// Writes `results.json` into the results folder.
pub fn write_json(r: &NetResults, dir: &Path) -> Result<PathBuf, NetError> {
    let path = dir.join("results.json");
    let text = serde_json::to_string_pretty(r).map_err(|e| NetError::Peer(e.to_string()))?;
    std::fs::write(&path, text).map_err(|source| NetError::Io {
        what: format!("writing {}", path.display()),
        source,
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measured_frames_per_mode() {
        let b = [
            PortStats {
                rx_packets: 10,
                tx_packets: 100,
                ..Default::default()
            },
            PortStats {
                rx_packets: 20,
                tx_packets: 7,
                ..Default::default()
            },
        ];
        let a = [
            PortStats {
                rx_packets: 15,
                tx_packets: 160,
                ..Default::default()
            },
            PortStats {
                rx_packets: 40,
                tx_packets: 9,
                ..Default::default()
            },
        ];
        assert_eq!(measured_frames(Mode::Txonly, &b, &a), 60);
        assert_eq!(measured_frames(Mode::Io, &b, &a), 25);
        assert_eq!(measured_frames(Mode::Io, &b, &a[..1]), 5);
    }

    #[test]
    fn ratio_is_card_over_dpdk() {
        let mut c = NetCell {
            mode: Mode::Txonly,
            frame_size: 64,
            card: vec![
                Sample {
                    mpps: 1.0,
                    ..Default::default()
                },
                Sample {
                    mpps: 3.0,
                    ..Default::default()
                },
                Sample {
                    mpps: 2.0,
                    ..Default::default()
                },
            ],
            card_poll: vec![Sample {
                mpps: 3.0,
                ..Default::default()
            }],
            dpdk: vec![Sample {
                mpps: 4.0,
                ..Default::default()
            }],
            median_card_mpps: 0.0,
            median_card_poll_mpps: 0.0,
            median_dpdk_mpps: 0.0,
            ratio: 0.0,
            ratio_poll: 0.0,
        };
        c.summarize();
        assert_eq!(c.median_card_mpps, 2.0);
        assert_eq!(c.ratio, 0.5);
        assert_eq!(c.ratio_poll, 0.75);
        assert!(card_config().contains("$DIR/eni-a.sock"));
    }
}
