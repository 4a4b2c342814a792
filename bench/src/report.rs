//! fio-shaped results: cardbench writes the fields it shares with fio's
//! `--output-format=json` under the same names, and compare-blk reads
//! fio's own output with the same types.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::blk::{BlkResult, DirStats};

/// fio's default percentile list.
pub const PERCENTILES: [f64; 17] = [
    1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95,
    99.99,
];

pub fn percentile_key(p: f64) -> String {
    format!("{p:.6}")
}

#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub struct FioOutput {
    #[serde(rename = "fio version", default)]
    pub fio_version: String,
    #[serde(default)]
    pub jobs: Vec<FioJob>,
    /// cardbench's own figures; absent in fio's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cardbench: Option<CardbenchExtra>,
}

#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub struct FioJob {
    #[serde(default)]
    pub jobname: String,
    #[serde(default)]
    pub read: FioDir,
    #[serde(default)]
    pub write: FioDir,
    /// Milliseconds.
    #[serde(default)]
    pub job_runtime: u64,
}

#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub struct FioDir {
    #[serde(default)]
    pub io_bytes: u64,
    #[serde(default)]
    pub io_kbytes: u64,
    #[serde(default)]
    pub bw_bytes: u64,
    /// KiB/s.
    #[serde(default)]
    pub bw: u64,
    #[serde(default)]
    pub iops: f64,
    /// Milliseconds.
    #[serde(default)]
    pub runtime: u64,
    #[serde(default)]
    pub total_ios: u64,
    #[serde(default)]
    pub clat_ns: FioLat,
}

#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub struct FioLat {
    #[serde(default)]
    pub min: u64,
    #[serde(default)]
    pub max: u64,
    #[serde(default)]
    pub mean: f64,
    #[serde(default)]
    pub stddev: f64,
    #[serde(rename = "N", default)]
    pub n: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub percentile: BTreeMap<String, u64>,
}

impl FioLat {
    pub fn pct(&self, p: f64) -> Option<u64> {
        self.percentile.get(&percentile_key(p)).copied()
    }
}

#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub struct CardbenchExtra {
    pub socket: String,
    pub rw: String,
    pub bs: u64,
    pub iodepth: u16,
    pub queues: u16,
    pub working_set: u64,
    pub capacity: u64,
    pub verify: bool,
    pub verified_reads: u64,
    pub verify_errors: u64,
    pub io_errors: u64,
    pub backend_pid: Option<u32>,
    pub backend_cpu_seconds: Option<f64>,
    pub backend_cpu_us_per_io: Option<f64>,
}

fn dir(stats: &DirStats, runtime_s: f64) -> FioDir {
    let h = &stats.clat;
    let n = h.len();
    let percentile = if n == 0 {
        BTreeMap::new()
    } else {
        PERCENTILES
            .iter()
            .map(|&p| (percentile_key(p), h.value_at_quantile(p / 100.0)))
            .collect()
    };
    FioDir {
        io_bytes: stats.bytes,
        io_kbytes: stats.bytes / 1024,
        bw_bytes: (stats.bytes as f64 / runtime_s) as u64,
        bw: (stats.bytes as f64 / runtime_s / 1024.0) as u64,
        iops: stats.ios as f64 / runtime_s,
        runtime: (runtime_s * 1000.0) as u64,
        total_ios: stats.ios,
        clat_ns: FioLat {
            min: if n == 0 { 0 } else { h.min() },
            max: if n == 0 { 0 } else { h.max() },
            mean: if n == 0 { 0.0 } else { h.mean() },
            stddev: if n == 0 { 0.0 } else { h.stdev() },
            n,
            percentile,
        },
    }
}

pub fn to_fio(r: &BlkResult) -> FioOutput {
    let secs = r.runtime.as_secs_f64();
    FioOutput {
        fio_version: format!("cardbench-{}", env!("CARGO_PKG_VERSION")),
        jobs: vec![FioJob {
            jobname: "cardbench".into(),
            read: dir(&r.read, secs),
            write: dir(&r.write, secs),
            job_runtime: r.runtime.as_millis() as u64,
        }],
        cardbench: Some(CardbenchExtra {
            socket: r.config.socket.display().to_string(),
            rw: r.config.rw.fio_name().into(),
            bs: r.config.bs,
            iodepth: r.config.iodepth,
            queues: r.config.queues,
            working_set: r.working_set,
            capacity: r.device.capacity_bytes,
            verify: r.config.verify,
            verified_reads: r.verified_reads,
            verify_errors: r.verify_errors,
            io_errors: r.io_errors,
            backend_pid: r.config.backend_pid,
            backend_cpu_seconds: r.backend_cpu.map(|d| d.as_secs_f64()),
            backend_cpu_us_per_io: r.backend_cpu_per_io().map(|d| d.as_secs_f64() * 1e6),
        }),
    }
}

fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1000.0)
}

/// fio-like text for people.
pub fn human(out: &FioOutput) -> String {
    let mut s = String::new();
    let job = &out.jobs[0];
    for (name, d) in [("read", &job.read), ("write", &job.write)] {
        if d.total_ios == 0 {
            continue;
        }
        s += &format!(
            "{name}: IOPS={:.0}, BW={:.1}MiB/s, ios={}, runtime={}ms\n",
            d.iops,
            d.bw_bytes as f64 / (1 << 20) as f64,
            d.total_ios,
            d.runtime
        );
        let l = &d.clat_ns;
        s += &format!(
            "  clat (usec): min={} avg={:.1} p50={} p90={} p99={} p99.9={} max={}\n",
            us(l.min),
            l.mean / 1000.0,
            us(l.pct(50.0).unwrap_or(0)),
            us(l.pct(90.0).unwrap_or(0)),
            us(l.pct(99.0).unwrap_or(0)),
            us(l.pct(99.9).unwrap_or(0)),
            us(l.max)
        );
    }
    if let Some(x) = &out.cardbench {
        if let (Some(cpu), Some(per)) = (x.backend_cpu_seconds, x.backend_cpu_us_per_io) {
            s += &format!("backend cpu: {cpu:.2}s, {per:.2} us/IO\n");
        }
        if x.verify {
            s += &format!(
                "verify: {} reads checked, {} errors\n",
                x.verified_reads, x.verify_errors
            );
        }
        if x.io_errors > 0 {
            s += &format!("I/O errors: {}\n", x.io_errors);
        }
    }
    s
}
