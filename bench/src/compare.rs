//! `cardbench compare-blk`: our card against qemu-storage-daemon and raw
//! fio on one backing file, as medians of alternating rounds.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::blk::{self, BlkConfig, Rw};
use crate::error::BenchError;
use crate::report::{self, FioDir, FioOutput};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backing {
    Tmpfs,
    Disk,
}

#[derive(Clone, Debug)]
pub struct CompareConfig {
    pub backing: Backing,
    pub direct: bool,
    pub runtime: Duration,
    pub ramp: Duration,
    pub rounds: u32,
    pub file_size: u64,
    pub results: PathBuf,
    /// Where vhost-blk-backend lives.
    pub bin_dir: PathBuf,
    /// Where a disk backing file goes (the target directory).
    pub target_dir: PathBuf,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Workload {
    pub name: &'static str,
    pub rw: Rw,
    pub bs: u64,
    pub iodepth: u16,
}

pub const MATRIX: [Workload; 6] = [
    Workload {
        name: "4k randread QD1",
        rw: Rw::Randread,
        bs: 4096,
        iodepth: 1,
    },
    Workload {
        name: "4k randread QD32",
        rw: Rw::Randread,
        bs: 4096,
        iodepth: 32,
    },
    Workload {
        name: "4k randwrite QD1",
        rw: Rw::Randwrite,
        bs: 4096,
        iodepth: 1,
    },
    Workload {
        name: "4k randwrite QD32",
        rw: Rw::Randwrite,
        bs: 4096,
        iodepth: 32,
    },
    Workload {
        name: "128k read QD8",
        rw: Rw::Read,
        bs: 128 << 10,
        iodepth: 8,
    },
    Workload {
        name: "128k write QD8",
        rw: Rw::Write,
        bs: 128 << 10,
        iodepth: 8,
    },
];
pub const QUEUES: [u16; 2] = [1, 2];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    Ours,
    Qsd,
    Raw,
}

impl System {
    pub const ALL: [System; 3] = [System::Ours, System::Qsd, System::Raw];
    pub fn label(self) -> &'static str {
        match self {
            Self::Ours => "vhost-blk-backend",
            Self::Qsd => "qemu-storage-daemon",
            Self::Raw => "fio io_uring (raw)",
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Metrics {
    pub iops: f64,
    pub mib_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// Backend CPU per I/O (not for raw fio).
    pub cpu_us_per_io: Option<f64>,
}

impl Metrics {
    /// The first job's figures for `rw`'s direction from fio-shaped output.
    pub(crate) fn from_fio(out: &FioOutput, rw: Rw) -> Self {
        let job = out.jobs.first().cloned().unwrap_or_default();
        let d: &FioDir = if rw.reads() { &job.read } else { &job.write };
        let us = |ns: Option<u64>| ns.unwrap_or(0) as f64 / 1000.0;
        Self {
            iops: d.iops,
            mib_s: d.bw_bytes as f64 / f64::from(1 << 20),
            p50_us: us(d.clat_ns.pct(50.0)),
            p99_us: us(d.clat_ns.pct(99.0)),
            p999_us: us(d.clat_ns.pct(99.9)),
            max_us: d.clat_ns.max as f64 / 1000.0,
            cpu_us_per_io: out.cardbench.as_ref().and_then(|c| c.backend_cpu_us_per_io),
        }
    }
}

impl Metrics {
    /// The median of each figure over `runs` (the backend CPU only if every
    /// run has it).
    pub(crate) fn median_of(runs: &[Metrics]) -> Metrics {
        Metrics {
            iops: median(runs.iter().map(|r| r.iops)),
            mib_s: median(runs.iter().map(|r| r.mib_s)),
            p50_us: median(runs.iter().map(|r| r.p50_us)),
            p99_us: median(runs.iter().map(|r| r.p99_us)),
            p999_us: median(runs.iter().map(|r| r.p999_us)),
            max_us: median(runs.iter().map(|r| r.max_us)),
            cpu_us_per_io: runs
                .iter()
                .map(|r| r.cpu_us_per_io)
                .collect::<Option<Vec<_>>>()
                .filter(|v| !v.is_empty())
                .map(|v| median(v.into_iter())),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    pub workload: Workload,
    pub queues: u16,
    pub ours: Vec<Metrics>,
    pub qsd: Vec<Metrics>,
    pub raw: Vec<Metrics>,
    pub median: Medians,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Medians {
    pub ours: Metrics,
    pub qsd: Metrics,
    pub raw: Metrics,
    pub ours_over_qsd_iops: f64,
    pub ours_over_raw_iops: f64,
}

impl Cell {
    pub fn label(&self) -> String {
        format!("{} {}q", self.workload.name, self.queues)
    }

    fn runs(&mut self, s: System) -> &mut Vec<Metrics> {
        match s {
            System::Ours => &mut self.ours,
            System::Qsd => &mut self.qsd,
            System::Raw => &mut self.raw,
        }
    }

    fn summarize(&mut self) {
        let m = Metrics::median_of;
        let (ours, qsd, raw) = (m(&self.ours), m(&self.qsd), m(&self.raw));
        self.median = Medians {
            ours_over_qsd_iops: ratio(ours.iops, qsd.iops),
            ours_over_raw_iops: ratio(ours.iops, raw.iops),
            ours,
            qsd,
            raw,
        };
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{system} ({cell}, round {round}): {source}")]
    Run {
        system: &'static str,
        cell: String,
        round: u32,
        source: BenchError,
    },
    #[error("{0}")]
    Backend(String),
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
    move |source| CompareError::Io { what, source }
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

/// A backend process (a card or a peer) serving `socket`: stopped when
/// dropped (SIGTERM, then SIGKILL after 5 s) and its socket removed.
pub(crate) struct Backend {
    pub(crate) child: Child,
    pub(crate) socket: PathBuf,
}

impl Backend {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // SIGTERM first so each peer cleans up like it would in production.
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_file(&self.socket);
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The backing file, removed when dropped (a tmpfs file is RAM).
pub(crate) struct BackingFile(pub(crate) PathBuf);

impl Drop for BackingFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn create_backing(path: &Path, size: u64) -> Result<(), CompareError> {
    fill_backing(path, size).map_err(|(what, e)| io_err(what)(e))
}

/// Writes `size` bytes of real data (not holes: reading a hole is cheaper
/// than reading a page) to a new file at `path`; on failure, what failed.
pub(crate) fn fill_backing(path: &Path, size: u64) -> Result<(), (String, std::io::Error)> {
    let fail = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |e| (what, e)
    };
    let mut f = File::create(path).map_err(fail("creating"))?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut written = 0u64;
    while written < size {
        let n = (size - written).min(chunk.len() as u64) as usize;
        for (i, b) in chunk[..n].iter_mut().enumerate() {
            *b = (i as u64 ^ (written >> 20)) as u8 | 1;
        }
        f.write_all(&chunk[..n]).map_err(fail("filling"))?;
        written += n as u64;
    }
    f.sync_all().map_err(fail("syncing"))
}

fn log_file(results: &Path, name: &str) -> Result<File, CompareError> {
    let path = results.join(name);
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io_err(format!("opening {}", path.display())))
}

fn start(
    mut cmd: Command,
    socket: PathBuf,
    log: &Path,
    what: &str,
) -> Result<Backend, CompareError> {
    let _ = std::fs::remove_file(&socket);
    let log_name = log.file_name().and_then(|n| n.to_str()).unwrap_or("log");
    let out = log_file(log.parent().unwrap_or(Path::new(".")), log_name)?;
    let err = out.try_clone().map_err(io_err("log file"))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let child = cmd
        .spawn()
        .map_err(|e| CompareError::Setup(format!("cannot start {what}: {e}")))?;
    let mut backend = Backend { child, socket };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !backend.socket.exists() {
        if let Ok(Some(status)) = backend.child.try_wait() {
            return Err(CompareError::Backend(format!(
                "{what} exited with {status} before listening; see {}",
                log.display()
            )));
        }
        if Instant::now() > deadline {
            return Err(CompareError::Backend(format!(
                "{what} did not create {} within 10s; see {}",
                backend.socket.display(),
                log.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(backend)
}

struct Ctx<'a> {
    cfg: &'a CompareConfig,
    backing: PathBuf,
    seq: u32,
}

impl Ctx<'_> {
    fn socket(&mut self) -> PathBuf {
        // sun_path holds 108 bytes: keep sockets short, under /tmp.
        self.seq += 1;
        PathBuf::from(format!(
            "/tmp/cardbench-{}-{}.sock",
            std::process::id(),
            self.seq
        ))
    }

    fn blk(
        &self,
        w: &Workload,
        queues: u16,
        socket: &Path,
        pid: u32,
    ) -> Result<FioOutput, BenchError> {
        let config = BlkConfig {
            socket: socket.to_owned(),
            rw: w.rw,
            bs: w.bs,
            iodepth: w.iodepth,
            queues,
            runtime: self.cfg.runtime,
            ramp: self.cfg.ramp,
            size: None,
            rwmixread: 50,
            verify: false,
            backend_pid: Some(pid),
            handshake_timeout: Duration::from_secs(5),
            connect_wait: Duration::from_secs(10),
        };
        Ok(report::to_fio(&blk::run(&config)?))
    }

    fn run_one(&mut self, s: System, w: &Workload, queues: u16) -> Result<FioOutput, CompareError> {
        let cfg = self.cfg;
        let backing = self.backing.clone();
        match s {
            System::Ours => {
                let socket = self.socket();
                let mut cmd = Command::new(cfg.bin_dir.join("vhost-blk-backend"));
                cmd.arg("--socket")
                    .arg(&socket)
                    .arg("--backing")
                    .arg(&backing)
                    .arg("--num-queues")
                    .arg(queues.to_string());
                if cfg.direct {
                    cmd.arg("--direct");
                }
                cmd.env("RUST_LOG", "warn");
                let b = start(
                    cmd,
                    socket,
                    &cfg.results.join("vhost-blk-backend.log"),
                    "vhost-blk-backend",
                )?;
                self.blk(w, queues, &b.socket, b.pid())
                    .map_err(|source| CompareError::Run {
                        system: s.label(),
                        cell: format!("{} {queues}q", w.name),
                        round: 0,
                        source,
                    })
            }
            System::Qsd => {
                let socket = self.socket();
                let mut blockdev = format!(
                    "driver=file,node-name=f,filename={},aio=io_uring",
                    backing.display()
                );
                if cfg.direct {
                    blockdev += ",cache.direct=on";
                }
                let mut cmd = Command::new("qemu-storage-daemon");
                cmd.arg("--blockdev").arg(blockdev).arg("--export").arg(format!(
                    "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                    socket.display()
                ));
                let b = start(
                    cmd,
                    socket,
                    &cfg.results.join("qemu-storage-daemon.log"),
                    "qemu-storage-daemon",
                )?;
                self.blk(w, queues, &b.socket, b.pid())
                    .map_err(|source| CompareError::Run {
                        system: s.label(),
                        cell: format!("{} {queues}q", w.name),
                        round: 0,
                        source,
                    })
            }
            System::Raw => run_fio(cfg, &backing, w, queues),
        }
    }
}

fn run_fio(
    cfg: &CompareConfig,
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

/// Raw fio on io_uring over the same file a card serves: the peer every
/// storage comparison measures against.
pub(crate) struct RawFio {
    pub(crate) runtime: Duration,
    pub(crate) ramp: Duration,
    pub(crate) direct: bool,
    pub(crate) file_size: u64,
}

/// Why raw fio gave no figures.
pub(crate) enum RawFioError {
    /// fio could not be started.
    Spawn(String),
    /// fio failed or wrote no JSON.
    Fio(String),
}

fn fio_time(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl RawFio {
    /// Workload `w` with one fio job per queue, each on its own slice of
    /// `backing` (like each of our queues).
    pub(crate) fn run(
        &self,
        backing: &Path,
        w: &Workload,
        queues: u16,
    ) -> Result<FioOutput, RawFioError> {
        let slice = self.file_size / u64::from(queues) / w.bs * w.bs;
        let mut cmd = Command::new("fio");
        cmd.arg("--name=raw")
            .arg(format!("--filename={}", backing.display()))
            .arg("--ioengine=io_uring")
            .arg(format!("--rw={}", w.rw.fio_name()))
            .arg(format!("--bs={}", w.bs))
            .arg(format!("--iodepth={}", w.iodepth))
            .arg(format!("--numjobs={queues}"))
            .arg(format!("--size={slice}"))
            .arg(format!("--offset_increment={slice}"))
            .arg("--group_reporting")
            .arg("--time_based")
            .arg(format!("--runtime={}", fio_time(self.runtime)))
            .arg("--output-format=json");
        if !self.ramp.is_zero() {
            cmd.arg(format!("--ramp_time={}", fio_time(self.ramp)));
        }
        if self.direct {
            cmd.arg("--direct=1");
        }
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| RawFioError::Spawn(format!("cannot run fio: {e}")))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(RawFioError::Fio(format!(
                "exited with {}: {}",
                out.status,
                err.lines().next().unwrap_or("")
            )));
        }
        // fio may print notes before the JSON document.
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json = stdout.find('{').map(|i| &stdout[i..]).unwrap_or("");
        serde_json::from_str(json)
            .map_err(|e| RawFioError::Fio(format!("unreadable JSON output: {e}")))
    }
}

pub fn run(cfg: &CompareConfig) -> Result<Results, CompareError> {
    for (bin, hint) in [(
        cfg.bin_dir.join("vhost-blk-backend"),
        "build it with cargo build -p vhost-blk-backend, or set CARDSIM_BIN_DIR",
    )] {
        if !bin.exists() {
            return Err(CompareError::Setup(format!(
                "{} not found; {hint}",
                bin.display()
            )));
        }
    }
    for tool in ["fio", "qemu-storage-daemon"] {
        if which(tool).is_none() {
            return Err(CompareError::Setup(format!("{tool} not found in PATH")));
        }
    }
    std::fs::create_dir_all(&cfg.results)
        .map_err(io_err(format!("creating {}", cfg.results.display())))?;
    let dir = match cfg.backing {
        Backing::Tmpfs => PathBuf::from("/dev/shm"),
        Backing::Disk => cfg.target_dir.clone(),
    };
    let path = dir.join(format!("cardbench-{}.img", std::process::id()));
    tracing::info!(file = %path.display(), size = cfg.file_size, "creating the backing file");
    let _guard = BackingFile(path.clone());
    create_backing(&path, cfg.file_size)?;

    let mut ctx = Ctx {
        cfg,
        backing: path.clone(),
        seq: 0,
    };
    let total = MATRIX.len() * QUEUES.len() * cfg.rounds as usize * System::ALL.len();
    let mut done = 0;
    let mut cells = Vec::new();
    for w in &MATRIX {
        for &queues in &QUEUES {
            let mut cell = Cell {
                workload: *w,
                queues,
                ours: vec![],
                qsd: vec![],
                raw: vec![],
                median: Medians::default(),
            };
            for round in 1..=cfg.rounds {
                // A B C, A B C: drift over time hits every system alike.
                for s in System::ALL {
                    let out = ctx.run_one(s, w, queues).map_err(|e| match e {
                        CompareError::Run {
                            system,
                            cell,
                            source,
                            ..
                        } => CompareError::Run {
                            system,
                            cell,
                            round,
                            source,
                        },
                        other => other,
                    })?;
                    let m = Metrics::from_fio(&out, w.rw);
                    done += 1;
                    tracing::info!(
                        "[{done}/{total}] {} round {round} {}: {:.0} IOPS, {:.1} MiB/s, p99 {:.1} us{}",
                        cell.label(),
                        s.label(),
                        m.iops,
                        m.mib_s,
                        m.p99_us,
                        m.cpu_us_per_io.map(|c| format!(", backend {c:.2} us CPU/IO")).unwrap_or_default()
                    );
                    cell.runs(s).push(m);
                }
            }
            cell.summarize();
            cells.push(cell);
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

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

pub fn table(results: &Results) -> String {
    let mut s = String::new();
    s += &format!(
        "{:<24} {:>10} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "workload",
        "ours IOPS",
        "qsd IOPS",
        "raw IOPS",
        "ours/qsd",
        "ours/raw",
        "ours p99",
        "qsd p99",
        "raw p99",
        "ours cpu",
        "qsd cpu"
    );
    s += &format!(
        "{:<24} {:>10} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "", "", "", "", "", "", "us", "us", "us", "us/IO", "us/IO"
    );
    let cpu = |c: Option<f64>| c.map(|c| format!("{c:.2}")).unwrap_or_else(|| "-".into());
    for c in &results.cells {
        let m = &c.median;
        s += &format!(
            "{:<24} {:>10.0} {:>10.0} {:>10.0} {:>8.2} {:>8.2} {:>9.1} {:>9.1} {:>9.1} {:>9} {:>9}\n",
            c.label(),
            m.ours.iops,
            m.qsd.iops,
            m.raw.iops,
            m.ours_over_qsd_iops,
            m.ours_over_raw_iops,
            m.ours.p99_us,
            m.qsd.p99_us,
            m.raw.p99_us,
            cpu(m.ours.cpu_us_per_io),
            cpu(m.qsd.cpu_us_per_io),
        );
    }
    s
}

/// `YYYYmmddTHHMMSSZ` for result folder names (UTC, no time zone database).
pub fn timestamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(UNIX_EPOCH), "19700101T000000Z");
        assert_eq!(
            timestamp(UNIX_EPOCH + Duration::from_secs(1_709_210_096)),
            "20240229T123456Z"
        );
    }

    #[test]
    fn medians() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
    }
}
