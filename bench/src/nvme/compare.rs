//! `cardbench compare-nvme`: the NVMe card driven through the userspace
//! driver against raw fio io_uring on the same namespace file, as medians
//! of alternating rounds (the shape of `compare-blk`).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::compare::{
    fill_backing, Backend, Backing, BackingFile, Metrics, RawFio, RawFioError, Workload, MATRIX,
    QUEUES,
};
use crate::report::{self, FioOutput};

use super::load::{self, LoadError, NvmeConfig};

#[derive(Clone, Debug)]
pub struct NvmeCompareConfig {
    pub backing: Backing,
    pub direct: bool,
    pub runtime: Duration,
    pub ramp: Duration,
    pub rounds: u32,
    pub file_size: u64,
    pub results: PathBuf,
    /// Where nvme-emulator lives.
    pub bin_dir: PathBuf,
    pub target_dir: PathBuf,
    /// Only workloads whose name contains this (e.g. "randread QD32").
    pub only: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    pub workload: Workload,
    pub queues: u16,
    pub ours: Vec<Metrics>,
    pub raw: Vec<Metrics>,
    pub median_ours: Metrics,
    pub median_raw: Metrics,
    pub ours_over_raw_iops: f64,
}

impl Cell {
    pub fn label(&self) -> String {
        format!("{} {}q", self.workload.name, self.queues)
    }
}

#[derive(Serialize)]
pub struct Results {
    pub started_unix: u64,
    pub kernel: String,
    pub cpus: usize,
    pub backing: Backing,
    pub backing_file: String,
    pub file_size: u64,
    pub direct: bool,
    pub runtime_s: f64,
    pub ramp_s: f64,
    pub rounds: u32,
    pub cells: Vec<Cell>,
}

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("{0}")]
    Setup(String),
    // Causes are part of the message, not `source`s: `{:#}` would print
    // them twice.
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("nvme-emulator ({cell}, round {round}): {error}")]
    Run {
        cell: String,
        round: u32,
        error: LoadError,
    },
    #[error("{0}")]
    Card(String),
    #[error("fio: {0}")]
    Fio(String),
}

impl CompareError {
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Setup(_))
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CompareError {
    let what = what.into();
    move |error| CompareError::Io { what, error }
}

fn create_backing(path: &Path, size: u64) -> Result<(), CompareError> {
    fill_backing(path, size).map_err(|(what, e)| io_err(what)(e))
}

fn start_card(
    cfg: &NvmeCompareConfig,
    backing: &Path,
    queues: u16,
    seq: u32,
) -> Result<Backend, CompareError> {
    // sun_path holds 108 bytes: keep sockets short, under /tmp.
    let socket = PathBuf::from(format!(
        "/tmp/cardbench-nvme-{}-{seq}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&socket);
    let log = cfg.results.join("nvme-emulator.log");
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(io_err(format!("opening {}", log.display())))?;
    let err = out.try_clone().map_err(io_err("log file"))?;
    let mut cmd = Command::new(cfg.bin_dir.join("nvme-emulator"));
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--namespace")
        .arg(backing)
        .arg("--io-queues")
        .arg(queues.to_string());
    if cfg.direct {
        cmd.arg("--direct");
    }
    cmd.env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let child = cmd
        .spawn()
        .map_err(|e| CompareError::Setup(format!("cannot start nvme-emulator: {e}")))?;
    let mut card = Backend { child, socket };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !card.socket.exists() {
        if let Ok(Some(status)) = card.child.try_wait() {
            return Err(CompareError::Card(format!(
                "nvme-emulator exited with {status} before listening; see {}",
                log.display()
            )));
        }
        if Instant::now() > deadline {
            return Err(CompareError::Card(format!(
                "nvme-emulator did not create {} within 10s; see {}",
                card.socket.display(),
                log.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(card)
}

fn run_fio(
    cfg: &NvmeCompareConfig,
    backing: &Path,
    w: &Workload,
    queues: u16,
) -> Result<FioOutput, CompareError> {
    let job = RawFio {
        runtime: cfg.runtime,
        ramp: cfg.ramp,
        direct: cfg.direct,
        file_size: cfg.file_size,
    };
    job.run(backing, w, queues).map_err(|e| match e {
        RawFioError::Spawn(m) => CompareError::Setup(m),
        RawFioError::Fio(m) => CompareError::Fio(m),
    })
}

fn run_ours(
    cfg: &NvmeCompareConfig,
    backing: &Path,
    w: &Workload,
    queues: u16,
    seq: u32,
) -> Result<FioOutput, CompareError> {
    let card = start_card(cfg, backing, queues, seq)?;
    let config = NvmeConfig {
        socket: card.socket.clone(),
        nsid: 1,
        rw: w.rw,
        bs: w.bs,
        iodepth: w.iodepth,
        queues,
        runtime: cfg.runtime,
        ramp: cfg.ramp,
        size: None,
        rwmixread: 50,
        verify: false,
        backend_pid: Some(card.child.id()),
        shadow_doorbells: true,
        timeout: Duration::from_secs(10),
        connect_wait: Duration::from_secs(10),
    };
    let r = load::run(&config).map_err(|error| CompareError::Run {
        cell: format!("{} {queues}q", w.name),
        round: 0,
        error,
    })?;
    Ok(report::to_fio(&r))
}

pub fn run(cfg: &NvmeCompareConfig) -> Result<Results, CompareError> {
    let card = cfg.bin_dir.join("nvme-emulator");
    if !card.exists() {
        return Err(CompareError::Setup(format!(
            "{} not found; build it with cargo build -p nvme-emulator, or set CARDSIM_BIN_DIR",
            card.display()
        )));
    }
    if Command::new("fio")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        return Err(CompareError::Setup("fio not found in PATH".into()));
    }
    let workloads: Vec<Workload> = MATRIX
        .iter()
        .filter(|w| {
            cfg.only
                .as_ref()
                .is_none_or(|o| w.name.contains(o.as_str()))
        })
        .copied()
        .collect();
    if workloads.is_empty() {
        return Err(CompareError::Setup(format!(
            "no workload matches {:?}; names: {}",
            cfg.only.as_deref().unwrap_or(""),
            MATRIX.map(|w| w.name).join(", ")
        )));
    }
    std::fs::create_dir_all(&cfg.results)
        .map_err(io_err(format!("creating {}", cfg.results.display())))?;
    let dir = match cfg.backing {
        Backing::Tmpfs => PathBuf::from("/dev/shm"),
        Backing::Disk => cfg.target_dir.clone(),
    };
    let path = dir.join(format!("cardbench-nvme-{}.img", std::process::id()));
    tracing::info!(file = %path.display(), size = cfg.file_size, "creating the namespace file");
    let _guard = BackingFile(path.clone());
    create_backing(&path, cfg.file_size)?;

    let total = workloads.len() * QUEUES.len() * cfg.rounds as usize * 2;
    let mut done = 0;
    let mut seq = 0;
    let mut cells = Vec::new();
    for w in &workloads {
        for &queues in &QUEUES {
            let (mut ours, mut raw) = (Vec::new(), Vec::new());
            let label = format!("{} {queues}q", w.name);
            for round in 1..=cfg.rounds {
                // A B, A B: drift over time hits both alike.
                seq += 1;
                let out = run_ours(cfg, &path, w, queues, seq).map_err(|e| match e {
                    CompareError::Run { cell, error, .. } => {
                        CompareError::Run { cell, round, error }
                    }
                    other => other,
                })?;
                let m = Metrics::from_fio(&out, w.rw);
                done += 1;
                tracing::info!(
                    "[{done}/{total}] {label} round {round} nvme-emulator: {:.0} IOPS, p99 {:.1} us{}",
                    m.iops,
                    m.p99_us,
                    m.cpu_us_per_io
                        .map(|c| format!(", card {c:.2} us CPU/IO"))
                        .unwrap_or_default()
                );
                ours.push(m);
                let m = Metrics::from_fio(&run_fio(cfg, &path, w, queues)?, w.rw);
                done += 1;
                tracing::info!(
                    "[{done}/{total}] {label} round {round} fio io_uring (raw): {:.0} IOPS, p99 {:.1} us",
                    m.iops,
                    m.p99_us
                );
                raw.push(m);
            }
            let (mo, mr) = (Metrics::median_of(&ours), Metrics::median_of(&raw));
            cells.push(Cell {
                workload: *w,
                queues,
                ours_over_raw_iops: if mr.iops > 0.0 {
                    mo.iops / mr.iops
                } else {
                    0.0
                },
                ours,
                raw,
                median_ours: mo,
                median_raw: mr,
            });
        }
    }
    Ok(Results {
        started_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        backing: cfg.backing,
        backing_file: path.display().to_string(),
        file_size: cfg.file_size,
        direct: cfg.direct,
        runtime_s: cfg.runtime.as_secs_f64(),
        ramp_s: cfg.ramp.as_secs_f64(),
        rounds: cfg.rounds,
        cells,
    })
}

pub fn table(results: &Results) -> String {
    let mut s = format!(
        "{:<24} {:>10} {:>10} {:>8} {:>9} {:>9} {:>9}\n",
        "workload", "ours IOPS", "raw IOPS", "ours/raw", "ours p99", "raw p99", "ours cpu"
    );
    s += &format!(
        "{:<24} {:>10} {:>10} {:>8} {:>9} {:>9} {:>9}\n",
        "", "", "", "", "us", "us", "us/IO"
    );
    for c in &results.cells {
        s += &format!(
            "{:<24} {:>10.0} {:>10.0} {:>8.2} {:>9.1} {:>9.1} {:>9}\n",
            c.label(),
            c.median_ours.iops,
            c.median_raw.iops,
            c.ours_over_raw_iops,
            c.median_ours.p99_us,
            c.median_raw.p99_us,
            c.median_ours
                .cpu_us_per_io
                .map(|v| format!("{v:.2}"))
                .unwrap_or_else(|| "-".into()),
        );
    }
    s
}
