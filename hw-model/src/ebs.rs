//! EBS volume types, their limits and burst credits, and I/O counted the way EBS counts it.
//!
//! Figures are AWS's published ones (Amazon EBS User Guide, "Amazon EBS volume
//! types", "I/O characteristics and monitoring", "Amazon EBS volume limits"),
//! as of the gp3 limits of 16,000 IOPS / 1,000 MiB/s / 16 TiB and io2 without
//! Block Express. Each rule below cites the figure it uses.
//!
//! How a volume is modelled: every volume has a *peak* IOPS bucket and a peak
//! throughput bucket (100 ms worth of the peak rate, so admission is smooth at
//! a 100 ms grain). Bursting types add a *credit* bucket that refills at the
//! baseline rate: gp2 counts I/O credits, st1/sc1 count throughput credits.
//! Every I/O takes from all of its buckets, so with credits left the volume
//! runs at the peak rate, and once they are gone at the credit bucket's refill
//! rate, which is the baseline.
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::token_bucket::TokenBucket;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const TIB: u64 = 1 << 40;

/// SSD volumes count I/O in units of up to 256 KiB; HDD volumes in units of
/// up to 1 MiB (AWS "I/O characteristics": "a single 1,024 KiB I/O operation
/// counts as four operations" on SSD; HDD "I/O size capped at 1,024 KiB").
pub const SSD_IO_UNIT: u64 = 256 * KIB;
pub const HDD_IO_UNIT: u64 = MIB;

/// gp2's I/O credit bucket: "an initial I/O credit balance of 5.4 million".
pub const GP2_CREDIT_BUCKET: u64 = 5_400_000;

/// The peak buckets hold this much of their rate: fine enough that a 1 s
/// measurement sees the rate, coarse enough to admit a batch at once.
const PEAK_WINDOW_DIVISOR: u64 = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeType {
    Gp2,
    Gp3,
    Io1,
    Io2,
    St1,
    Sc1,
}

impl VolumeType {
    pub const ALL: [VolumeType; 6] = [
        VolumeType::Gp2,
        VolumeType::Gp3,
        VolumeType::Io1,
        VolumeType::Io2,
        VolumeType::St1,
        VolumeType::Sc1,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VolumeType::Gp2 => "gp2",
            VolumeType::Gp3 => "gp3",
            VolumeType::Io1 => "io1",
            VolumeType::Io2 => "io2",
            VolumeType::St1 => "st1",
            VolumeType::Sc1 => "sc1",
        }
    }

    pub fn is_hdd(self) -> bool {
        matches!(self, VolumeType::St1 | VolumeType::Sc1)
    }

    /// The unit EBS counts one operation in.
    pub fn io_unit(self) -> u64 {
        if self.is_hdd() {
            HDD_IO_UNIT
        } else {
            SSD_IO_UNIT
        }
    }

    /// Volume size limits in GiB (AWS "Amazon EBS volume types" tables):
    /// gp2/gp3 1 GiB–16 TiB, io1/io2 4 GiB–16 TiB, st1/sc1 125 GiB–16 TiB.
    pub fn size_range_gib(self) -> (u64, u64) {
        match self {
            VolumeType::Gp2 | VolumeType::Gp3 => (1, 16 * 1024),
            VolumeType::Io1 | VolumeType::Io2 => (4, 16 * 1024),
            VolumeType::St1 | VolumeType::Sc1 => (125, 16 * 1024),
        }
    }
}

impl fmt::Display for VolumeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VolumeType {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        VolumeType::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| SpecError::UnknownType(s.to_string()))
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VolumeSpec {
    pub volume_type: VolumeType,
    pub size_bytes: u64,
    /// Provisioned IOPS (gp3, io1, io2); None = the type's default/baseline.
    #[serde(default)]
    pub iops: Option<u64>,
    /// Provisioned throughput in MiB/s (gp3); None = default.
    #[serde(default)]
    pub throughput_mibps: Option<u64>,
}

impl VolumeSpec {
    /// A volume of `gib` GiB with the type's default performance.
    pub fn gib(volume_type: VolumeType, gib: u64) -> Self {
        VolumeSpec {
            volume_type,
            size_bytes: gib.saturating_mul(GIB),
            iops: None,
            throughput_mibps: None,
        }
    }
    pub fn with_iops(mut self, iops: u64) -> Self {
        self.iops = Some(iops);
        self
    }
    pub fn with_throughput(mut self, mibps: u64) -> Self {
        self.throughput_mibps = Some(mibps);
        self
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("unknown volume type {0:?}: expected one of gp2, gp3, io1, io2, st1, sc1")]
    UnknownType(String),
    #[error("{volume_type} volume `size` must be {min_gib} GiB to {max_gib} GiB, got {} GiB", fmt_gib(*.size_bytes))]
    Size {
        volume_type: VolumeType,
        min_gib: u64,
        max_gib: u64,
        size_bytes: u64,
    },
    #[error(
        "{volume_type} does not take provisioned `{field}`: its performance follows from its size"
    )]
    NotProvisionable {
        volume_type: VolumeType,
        field: &'static str,
    },
    #[error("{volume_type} `iops` must be {min} to {max}, got {asked}")]
    IopsRange {
        volume_type: VolumeType,
        min: u64,
        max: u64,
        asked: u64,
    },
    #[error("{volume_type} allows at most {per_gib} IOPS per GiB: {size_gib} GiB allows {allowed}, asked {asked}")]
    IopsPerGib {
        volume_type: VolumeType,
        per_gib: u64,
        size_gib: u64,
        allowed: u64,
        asked: u64,
    },
    #[error("{volume_type} `throughput_mibps` must be {min} to {max} MiB/s, got {asked}")]
    ThroughputRange {
        volume_type: VolumeType,
        min: u64,
        max: u64,
        asked: u64,
    },
    #[error("{volume_type} allows at most 0.25 MiB/s per provisioned IOPS: {iops} IOPS allow {allowed} MiB/s, asked {asked}")]
    ThroughputPerIops {
        volume_type: VolumeType,
        iops: u64,
        allowed: u64,
        asked: u64,
    },
}

fn fmt_gib(bytes: u64) -> String {
    let gib = bytes as f64 / GIB as f64;
    if bytes % GIB == 0 {
        format!("{}", bytes / GIB)
    } else {
        format!("{gib:.3}")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoDirection {
    Read,
    Write,
}

impl IoDirection {
    fn index(self) -> usize {
        match self {
            IoDirection::Read => 0,
            IoDirection::Write => 1,
        }
    }
}

/// Per-volume figures in CloudWatch's names (for the last period).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct VolumeMetrics {
    /// Completed guest operations and bytes in the period (as reported through
    /// `on_complete`), like CloudWatch's VolumeReadOps/VolumeReadBytes.
    pub volume_read_ops: u64,
    pub volume_write_ops: u64,
    pub volume_read_bytes: u64,
    pub volume_write_bytes: u64,
    /// Requests admitted but not completed (the caller reports in/out via on_complete).
    pub volume_queue_length: u64,
    /// Percent of the burst bucket left (gp2, st1, sc1); None for types without one.
    pub burst_balance: Option<f64>,
    /// Throughput used as a percent of provisioned (io1/io2/gp3) — CloudWatch's definition.
    /// CloudWatch defines it as IOPS delivered over IOPS provisioned, so that
    /// is what this is (EBS-counted operations, clamped to 100).
    pub volume_throughput_percentage: Option<f64>,
    /// Seconds with no I/O.
    pub volume_idle_time: f64,
}

/// Baseline and burst rates of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    pub baseline_iops: u64,
    pub burst_iops: Option<u64>,
    /// Rounded down to whole MiB/s (st1/sc1 rates per TiB are fractional on
    /// small volumes); the model itself enforces the exact rate.
    pub baseline_mibps: u64,
    pub burst_mibps: Option<u64>,
}

/// What one I/O costs as EBS counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoCost {
    /// Operations against the IOPS limit (and gp2's I/O credits).
    pub ops: u64,
    /// Bytes against the throughput limit (and st1/sc1 throughput credits).
    pub bytes: u64,
}

/// A rate as `tokens` per `per`, kept as a fraction so per-TiB rates stay exact.
#[derive(Clone, Copy, Debug)]
struct Rate {
    tokens: u64,
    per: Duration,
}

impl Rate {
    fn per_sec(tokens: u64) -> Self {
        Rate {
            tokens,
            per: Duration::from_secs(1),
        }
    }
    /// Whole tokens per second, rounded down.
    fn per_sec_floor(self) -> u64 {
        (u128::from(self.tokens) * 1_000_000_000 / self.per.as_nanos().max(1)) as u64
    }
    fn min(self, other: Rate) -> Rate {
        // a/b < c/d  <=>  a*d < c*b
        let l = u128::from(self.tokens) * other.per.as_nanos();
        let r = u128::from(other.tokens) * self.per.as_nanos();
        if l <= r {
            self
        } else {
            other
        }
    }
    /// A bucket that holds 1/10 s of this rate (at least `floor` tokens).
    fn peak_bucket(self, floor: u64, now: Duration) -> TokenBucket {
        let cap = (self.per_sec_floor() / PEAK_WINDOW_DIVISOR)
            .max(floor)
            .max(1);
        TokenBucket::with_rate(cap, self.tokens.max(1), self.per, now)
            .expect("peak rates are validated to be non-zero and small")
    }
}

/// Rates a spec resolves to.
struct Plan {
    limits: Limits,
    peak_iops: Rate,
    peak_bytes: Rate,
    /// gp2: I/O credits; st1/sc1: throughput credits (bytes).
    credits: Option<(u64, Rate)>,
    provisioned_iops: Option<u64>,
}

fn check_iops(t: VolumeType, min: u64, max: u64, asked: u64) -> Result<(), SpecError> {
    if (min..=max).contains(&asked) {
        Ok(())
    } else {
        Err(SpecError::IopsRange {
            volume_type: t,
            min,
            max,
            asked,
        })
    }
}

fn check_per_gib(t: VolumeType, per_gib: u64, gib: u64, asked: u64) -> Result<(), SpecError> {
    let allowed = per_gib.saturating_mul(gib);
    if asked <= allowed {
        Ok(())
    } else {
        Err(SpecError::IopsPerGib {
            volume_type: t,
            per_gib,
            size_gib: gib,
            allowed,
            asked,
        })
    }
}

fn mibps(bytes: Rate) -> u64 {
    bytes.per_sec_floor() / MIB
}

fn plan(spec: &VolumeSpec) -> Result<Plan, SpecError> {
    let t = spec.volume_type;
    let (min_gib, max_gib) = t.size_range_gib();
    if spec.size_bytes < min_gib * GIB || spec.size_bytes > max_gib * GIB {
        return Err(SpecError::Size {
            volume_type: t,
            min_gib,
            max_gib,
            size_bytes: spec.size_bytes,
        });
    }
    // Ratios use whole GiB, as AWS sizes are whole GiB.
    let gib = spec.size_bytes / GIB;
    let not_provisionable = |field| SpecError::NotProvisionable {
        volume_type: t,
        field,
    };
    if spec.throughput_mibps.is_some() && t != VolumeType::Gp3 {
        return Err(not_provisionable("throughput_mibps"));
    }
    match t {
        VolumeType::Gp2 => {
            if spec.iops.is_some() {
                return Err(not_provisionable("iops"));
            }
            // "Baseline performance scales linearly at 3 IOPS per GiB of volume
            // size", minimum 100, maximum 16,000; volumes under 1,000 GiB burst
            // to 3,000 IOPS (at 1,000 GiB the baseline is 3,000).
            let baseline = (3 * gib).clamp(100, 16_000);
            let burst = (baseline < 3_000).then_some(3_000);
            // Throughput: "Volumes smaller than or equal to 170 GiB deliver a
            // maximum throughput of 128 MiB/s"; above that 250 MiB/s (between
            // 170 and 334 GiB only while burst credits last, which the IOPS
            // credits model already produces: baseline IOPS × 256 KiB < 250).
            let cap = if gib <= 170 { 128 } else { 250 };
            let baseline_mibps = cap.min(baseline * SSD_IO_UNIT / MIB);
            let burst_mibps = burst
                .map(|b| cap.min(b * SSD_IO_UNIT / MIB))
                .filter(|b| *b > baseline_mibps);
            Ok(Plan {
                limits: Limits {
                    baseline_iops: baseline,
                    burst_iops: burst,
                    baseline_mibps,
                    burst_mibps,
                },
                peak_iops: Rate::per_sec(burst.unwrap_or(baseline)),
                peak_bytes: Rate::per_sec(cap * MIB),
                // The bucket "fills at the baseline rate" of 3 IOPS per GiB.
                credits: burst.map(|_| (GP2_CREDIT_BUCKET, Rate::per_sec(baseline))),
                provisioned_iops: None,
            })
        }
        VolumeType::Gp3 => {
            // Baseline 3,000 IOPS and 125 MiB/s at any size; up to 16,000 IOPS
            // ("500 IOPS per GiB" beyond the baseline) and 1,000 MiB/s
            // ("0.25 MiB/s per provisioned IOPS" beyond the baseline).
            let iops = spec.iops.unwrap_or(3_000);
            check_iops(t, 3_000, 16_000, iops)?;
            if iops > 3_000 {
                check_per_gib(t, 500, gib, iops)?;
            }
            let tp = spec.throughput_mibps.unwrap_or(125);
            if !(125..=1_000).contains(&tp) {
                return Err(SpecError::ThroughputRange {
                    volume_type: t,
                    min: 125,
                    max: 1_000,
                    asked: tp,
                });
            }
            if tp > 125 && tp * 4 > iops {
                return Err(SpecError::ThroughputPerIops {
                    volume_type: t,
                    iops,
                    allowed: iops / 4,
                    asked: tp,
                });
            }
            Ok(provisioned(iops, Rate::per_sec(tp * MIB)))
        }
        VolumeType::Io1 | VolumeType::Io2 => {
            // io1: 100–64,000 IOPS, at most 50 IOPS per GiB; io2 (not Block
            // Express): at most 500 IOPS per GiB, 64,000 max.
            let per_gib = if t == VolumeType::Io1 { 50 } else { 500 };
            // The API requires IOPS for these types; the console pre-fills
            // 3,000, which we take as the default where the size allows it.
            let iops = spec.iops.unwrap_or((per_gib * gib).min(3_000));
            check_iops(t, 100, 64_000, iops)?;
            check_per_gib(t, per_gib, gib, iops)?;
            // "io1 volumes provisioned with up to 32,000 IOPS support a maximum
            // I/O size of 256 KiB and yield as much as 500 MiB/s"; above 32,000
            // "a linear increase in throughput at a rate of 16 KiB per
            // provisioned IOPS" (48,000 IOPS → 750 MiB/s, 64,000 → 1,000).
            let bytes = if iops <= 32_000 {
                (iops * SSD_IO_UNIT).min(500 * MIB)
            } else {
                iops * 16 * KIB
            };
            Ok(provisioned(iops, Rate::per_sec(bytes)))
        }
        VolumeType::St1 | VolumeType::Sc1 => {
            if spec.iops.is_some() {
                return Err(not_provisionable("iops"));
            }
            // st1: baseline 40 MiB/s per TiB, burst 250 MiB/s per TiB, both
            // capped at 500 MiB/s, 500 IOPS (1 MiB I/O). sc1: 12 and 80 MiB/s
            // per TiB, capped at 250 MiB/s, 250 IOPS. The throughput-credit
            // bucket holds 1 TiB of credits per TiB of volume and fills at the
            // baseline rate.
            let (base_per_tib, burst_per_tib, cap, iops) = if t == VolumeType::St1 {
                (40, 250, 500, 500)
            } else {
                (12, 80, 250, 250)
            };
            // size × N MiB/s per TiB = size × N bytes per 2^20 s.
            let per_tib = |n: u64| Rate {
                tokens: spec.size_bytes * n,
                per: Duration::from_secs(TIB / MIB),
            };
            let cap = Rate::per_sec(cap * MIB);
            let baseline = per_tib(base_per_tib).min(cap);
            let burst = per_tib(burst_per_tib).min(cap);
            let bursts = burst.per_sec_floor() > baseline.per_sec_floor();
            Ok(Plan {
                limits: Limits {
                    baseline_iops: iops,
                    burst_iops: None,
                    baseline_mibps: mibps(baseline),
                    burst_mibps: bursts.then(|| mibps(burst)),
                },
                peak_iops: Rate::per_sec(iops),
                peak_bytes: burst,
                credits: bursts.then_some((spec.size_bytes, baseline)),
                provisioned_iops: None,
            })
        }
    }
}

fn provisioned(iops: u64, bytes: Rate) -> Plan {
    Plan {
        limits: Limits {
            baseline_iops: iops,
            burst_iops: None,
            baseline_mibps: mibps(bytes),
            burst_mibps: None,
        },
        peak_iops: Rate::per_sec(iops),
        peak_bytes: bytes,
        credits: None,
        provisioned_iops: Some(iops),
    }
}

/// Where the last I/O of one direction ended, for merging contiguous I/O.
#[derive(Clone, Copy, Debug, Default)]
struct Stream {
    end: Option<u64>,
    /// Bytes already in the open unit (0 = no unit open).
    fill: u64,
}

pub struct VolumeModel {
    spec: VolumeSpec,
    /// Burst credits move this many times faster (see `with_time_scale`).
    credit_scale: u64,
    limits: Limits,
    iops: TokenBucket,
    throughput: TokenBucket,
    /// gp2: I/O credits; st1/sc1: throughput credits in bytes.
    credits: Option<TokenBucket>,
    provisioned_iops: Option<u64>,
    streams: [Stream; 2],
    merge_contiguous: bool,
    // Counters for the current metrics period.
    period_start: Duration,
    ops: [u64; 2],
    bytes: [u64; 2],
    ebs_ops_period: u64,
    ebs_ops_total: u64,
    queue_length: u64,
    idle: Duration,
    /// Since when the queue has been empty (None while I/O is in flight).
    idle_since: Option<Duration>,
}

impl VolumeModel {
    pub fn new(spec: &VolumeSpec, now: Duration) -> Result<Self, SpecError> {
        let p = plan(spec)?;
        let unit = spec.volume_type.io_unit();
        let credits = p.credits.map(|(cap, rate)| {
            TokenBucket::with_rate(cap, rate.tokens, rate.per, now)
                .expect("credit buckets are non-zero and bounded")
        });
        Ok(VolumeModel {
            spec: spec.clone(),
            credit_scale: 1,
            limits: p.limits,
            iops: p.peak_iops.peak_bucket(1, now),
            throughput: p.peak_bytes.peak_bucket(unit, now),
            credits,
            provisioned_iops: p.provisioned_iops,
            streams: [Stream::default(); 2],
            merge_contiguous: true,
            period_start: now,
            ops: [0; 2],
            bytes: [0; 2],
            ebs_ops_period: 0,
            ebs_ops_total: 0,
            queue_length: 0,
            idle: Duration::ZERO,
            idle_since: Some(now),
        })
    }

    pub fn spec(&self) -> &VolumeSpec {
        &self.spec
    }

    /// Makes burst credits move `factor` times faster than the IOPS and
    /// throughput limits: each I/O spends `factor` times its credits and the
    /// bucket refills `factor` times faster. A test then sees a gp2 bucket
    /// drain in seconds while the IOPS a guest measures stay the modelled
    /// ones. `factor` is rounded to a whole number, at least 1.
    pub fn with_time_scale(mut self, factor: f64, now: Duration) -> Self {
        let scale = if factor.is_finite() {
            factor.round().max(1.0) as u64
        } else {
            1
        };
        if let Ok(p) = plan(&self.spec) {
            self.credits = p.credits.map(|(cap, rate)| {
                TokenBucket::with_rate(cap, rate.tokens.saturating_mul(scale), rate.per, now)
                    .expect("credit buckets are non-zero and bounded")
            });
        }
        self.credit_scale = scale;
        self
    }

    /// EBS merges physically contiguous I/O into one operation up to the unit
    /// size (AWS: "8 contiguous I/O operations at 32 KiB each count as 1
    /// operation"). On by default; off counts every I/O on its own.
    pub fn set_merge_contiguous(&mut self, on: bool) {
        self.merge_contiguous = on;
        self.streams = [Stream::default(); 2];
    }

    /// Empties the burst credits (a volume that has already used its burst).
    pub fn drain_credits(&mut self, now: Duration) {
        if let Some(c) = self.credits.as_mut() {
            c.drain(now);
        }
    }

    /// What an I/O would cost now, without admitting it, and the stream state
    /// it would leave.
    fn cost_and_stream(&self, dir: IoDirection, offset: u64, len: u64) -> (IoCost, Stream) {
        let unit = self.spec.volume_type.io_unit();
        let s = self.streams[dir.index()];
        if len == 0 {
            return (IoCost { ops: 0, bytes: 0 }, s);
        }
        let fill = if self.merge_contiguous && s.end == Some(offset) {
            s.fill
        } else {
            0
        };
        // Units opened by this I/O: the open unit (if any) is already paid for.
        let ops = (fill + len).div_ceil(unit) - fill.div_ceil(unit);
        let next = Stream {
            end: offset.checked_add(len),
            fill: (fill + len) % unit,
        };
        // HDD: every unit costs 1 MiB of throughput ("random I/O counted as
        // 1 MiB"; a sequential stream pays 1 MiB per merged MiB). SSD: bytes moved.
        let bytes = if self.spec.volume_type.is_hdd() {
            ops * unit
        } else {
            len
        };
        (IoCost { ops, bytes }, next)
    }

    /// What an I/O at `offset` of `len` bytes would cost now (merging with the
    /// previous I/O of the same direction if contiguous).
    pub fn cost(&self, dir: IoDirection, offset: u64, len: u64) -> IoCost {
        self.cost_and_stream(dir, offset, len).0
    }

    /// Admits one guest I/O at `offset` of `len` bytes, counting it as EBS does
    /// (SSD: ceil(len / 256 KiB) ops; HDD: sequential I/O merged up to 1 MiB,
    /// random I/O counted as 1 MiB). Ok = go now (tokens taken); Err(t) = not
    /// before model time t (nothing taken; ask again then).
    pub fn admit(
        &mut self,
        dir: IoDirection,
        offset: u64,
        len: u64,
        now: Duration,
    ) -> Result<(), Duration> {
        let (cost, next) = self.cost_and_stream(dir, offset, len);
        let credit_tokens = if self.spec.volume_type.is_hdd() {
            cost.bytes
        } else {
            cost.ops
        }
        .saturating_mul(self.credit_scale);
        let wait = [
            self.iops.ready_at(cost.ops, now),
            self.throughput.ready_at(cost.bytes, now),
            self.credits
                .as_mut()
                .and_then(|c| c.ready_at(credit_tokens, now)),
        ]
        .into_iter()
        .flatten()
        .max();
        if let Some(when) = wait {
            return Err(when);
        }
        // All said yes at `now`, so these takes succeed.
        let _ = self.iops.try_take(cost.ops, now);
        let _ = self.throughput.try_take(cost.bytes, now);
        if let Some(c) = self.credits.as_mut() {
            let _ = c.try_take(credit_tokens, now);
        }
        self.streams[dir.index()] = next;
        self.ebs_ops_period += cost.ops;
        self.ebs_ops_total += cost.ops;
        if self.queue_length == 0 {
            self.close_idle(now);
            self.idle_since = None;
        }
        self.queue_length += 1;
        Ok(())
    }

    fn close_idle(&mut self, now: Duration) {
        if let Some(since) = self.idle_since {
            self.idle += now.saturating_sub(since.max(self.period_start));
        }
    }

    pub fn on_complete(&mut self, dir: IoDirection, len: u64, now: Duration) {
        let i = dir.index();
        self.ops[i] += 1;
        self.bytes[i] += len;
        self.queue_length = self.queue_length.saturating_sub(1);
        if self.queue_length == 0 {
            self.idle_since = Some(now);
        }
    }

    /// The figures for the period since the previous call (or creation), and
    /// starts a new period.
    pub fn metrics(&mut self, now: Duration) -> VolumeMetrics {
        self.close_idle(now);
        if self.idle_since.is_some() {
            self.idle_since = Some(now);
        }
        let period = now.saturating_sub(self.period_start).as_secs_f64();
        let tp_percent = self.provisioned_iops.map(|iops| {
            if period > 0.0 {
                (self.ebs_ops_period as f64 / (period * iops as f64) * 100.0).min(100.0)
            } else {
                0.0
            }
        });
        let m = VolumeMetrics {
            volume_read_ops: self.ops[0],
            volume_write_ops: self.ops[1],
            volume_read_bytes: self.bytes[0],
            volume_write_bytes: self.bytes[1],
            volume_queue_length: self.queue_length,
            burst_balance: self.burst_balance(now),
            volume_throughput_percentage: tp_percent,
            volume_idle_time: self.idle.as_secs_f64(),
        };
        self.period_start = now;
        self.ops = [0; 2];
        self.bytes = [0; 2];
        self.ebs_ops_period = 0;
        self.idle = Duration::ZERO;
        m
    }

    /// Percent of burst credits left (gp2 under 1,000 GiB, st1, sc1).
    pub fn burst_balance(&mut self, now: Duration) -> Option<f64> {
        self.credits.as_mut().map(|c| c.fill_fraction(now) * 100.0)
    }

    /// Operations counted (as EBS counts them) since the volume was created.
    pub fn ebs_ops_total(&self) -> u64 {
        self.ebs_ops_total
    }

    /// Baseline and burst IOPS / MiB/s this volume is entitled to (for docs, tests and cardctl).
    pub fn limits(&self) -> Limits {
        self.limits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use IoDirection::{Read, Write};

    #[test]
    fn a_time_scale_drains_gp2_credits_faster_but_keeps_the_iops_limit() {
        let spec = VolumeSpec::gib(VolumeType::Gp2, 100);
        let mut m = VolumeModel::new(&spec, Duration::ZERO)
            .unwrap()
            .set_scaled(100.0);
        // Random 4 KiB reads as fast as admitted for 30 s: the unscaled bucket
        // would last 2,000 s; scaled by 100 it lasts 20 s.
        let mut t = Duration::ZERO;
        let mut offset = 0u64;
        let mut admitted_last_5s = 0u64;
        while t < Duration::from_secs(30) {
            match m.admit(Read, offset, 4096, t) {
                Ok(()) => {
                    m.on_complete(Read, 4096, t);
                    offset = offset.wrapping_add(1 << 20) % (64 << 30);
                    if t >= Duration::from_secs(25) {
                        admitted_last_5s += 1;
                    }
                }
                Err(at) => t = at.max(t + Duration::from_micros(1)),
            }
        }
        let balance = m.burst_balance(t).unwrap();
        assert!(balance < 1.0, "bucket not drained: {balance}%");
        // After draining, the baseline (300 IOPS) holds.
        let iops = admitted_last_5s as f64 / 5.0;
        assert!((iops - 300.0).abs() < 15.0, "{iops} IOPS after draining");
    }

    impl VolumeModel {
        fn set_scaled(self, factor: f64) -> Self {
            self.with_time_scale(factor, Duration::ZERO)
        }
    }

    fn model(spec: VolumeSpec) -> VolumeModel {
        VolumeModel::new(&spec, Duration::ZERO).unwrap()
    }
    fn err(spec: VolumeSpec) -> SpecError {
        VolumeModel::new(&spec, Duration::ZERO).err().unwrap()
    }

    /// Random 4 KiB reads as fast as admitted until `until`; returns the model
    /// time at which the burst balance first reached 0 (or None).
    fn drive_random_4k(v: &mut VolumeModel, until: Duration) -> Option<Duration> {
        let mut t = Duration::ZERO;
        let mut offset = 0u64;
        while t < until {
            // Far apart offsets: never contiguous.
            offset = (offset + 977 * 4096) % (64 * GIB);
            match v.admit(Read, offset, 4096, t) {
                Ok(()) => {
                    v.on_complete(Read, 4096, t);
                    if v.burst_balance(t) == Some(0.0) {
                        return Some(t);
                    }
                }
                Err(when) => t = when,
            }
        }
        None
    }

    #[test]
    fn gp2_100gib_bursts_for_about_2000_seconds() {
        // 5.4 M credits / (3,000 − 300) IOPS = 2,000 s (AWS's burst-duration formula).
        let mut v = model(VolumeSpec::gib(VolumeType::Gp2, 100));
        assert_eq!(
            v.limits(),
            Limits {
                baseline_iops: 300,
                burst_iops: Some(3_000),
                baseline_mibps: 75,
                burst_mibps: Some(128),
            }
        );
        assert_eq!(v.burst_balance(Duration::ZERO), Some(100.0));
        let empty_at = drive_random_4k(&mut v, Duration::from_secs(2_100)).expect("drains");
        let s = empty_at.as_secs_f64();
        assert!((1_990.0..=2_010.0).contains(&s), "drained at {s} s");
        // About 3,000 IOPS while bursting.
        let iops = v.ebs_ops_total() as f64 / s;
        assert!((2_990.0..=3_010.0).contains(&iops), "{iops} IOPS");
        // Then the baseline: 300 IOPS over the next 100 s.
        let before = v.ebs_ops_total();
        let mut t = empty_at;
        let end = empty_at + Duration::from_secs(100);
        let mut off = 0;
        while t < end {
            off += 8192;
            match v.admit(Read, off, 4096, t) {
                Ok(()) => v.on_complete(Read, 4096, t),
                Err(w) => t = w,
            }
        }
        let n = v.ebs_ops_total() - before;
        assert!(
            (29_900..=30_100).contains(&n),
            "{n} ops in 100 s at baseline"
        );
    }

    #[test]
    fn gp2_credits_refill_at_baseline() {
        let mut v = model(VolumeSpec::gib(VolumeType::Gp2, 100));
        v.drain_credits(Duration::ZERO);
        assert_eq!(v.burst_balance(Duration::ZERO), Some(0.0));
        // 300 credits/s: half of 5.4 M after 9,000 s idle.
        let b = v.burst_balance(Duration::from_secs(9_000)).unwrap();
        assert!((b - 50.0).abs() < 1e-9, "{b}");
        assert_eq!(v.burst_balance(Duration::from_secs(90_000)), Some(100.0));
    }

    #[test]
    fn gp2_limits_by_size() {
        // 1 TiB: 3 × 1,024 = 3,072 IOPS baseline, no burst, 250 MiB/s.
        let mut v = model(VolumeSpec::gib(VolumeType::Gp2, 1024));
        assert_eq!(
            v.limits(),
            Limits {
                baseline_iops: 3_072,
                burst_iops: None,
                baseline_mibps: 250,
                burst_mibps: None
            }
        );
        assert_eq!(v.burst_balance(Duration::ZERO), None);
        // 1,000 GiB: baseline exactly 3,000, so no bursting.
        let l = model(VolumeSpec::gib(VolumeType::Gp2, 1000)).limits();
        assert_eq!((l.baseline_iops, l.burst_iops), (3_000, None));
        // Minimum 100 IOPS; maximum 16,000 (reached at 5,334 GiB).
        assert_eq!(
            model(VolumeSpec::gib(VolumeType::Gp2, 10))
                .limits()
                .baseline_iops,
            100
        );
        assert_eq!(
            model(VolumeSpec::gib(VolumeType::Gp2, 5_334))
                .limits()
                .baseline_iops,
            16_000
        );
        assert_eq!(
            model(VolumeSpec::gib(VolumeType::Gp2, 16_384))
                .limits()
                .baseline_iops,
            16_000
        );
        // 128 MiB/s up to 170 GiB; 250 above (200 GiB: 150 baseline, 250 burst).
        assert_eq!(
            model(VolumeSpec::gib(VolumeType::Gp2, 170))
                .limits()
                .burst_mibps,
            Some(128)
        );
        let l = model(VolumeSpec::gib(VolumeType::Gp2, 200)).limits();
        assert_eq!((l.baseline_mibps, l.burst_mibps), (150, Some(250)));
        let l = model(VolumeSpec::gib(VolumeType::Gp2, 334)).limits();
        assert_eq!((l.baseline_mibps, l.burst_mibps), (250, None));
    }

    #[test]
    fn gp2_throughput_cap_128_on_small_volume() {
        let mut v = model(VolumeSpec::gib(VolumeType::Gp2, 100));
        // Random 256 KiB reads for 10 s: 128 MiB/s → ~512 per second.
        let (mut t, mut n, mut off) = (Duration::ZERO, 0u64, 0u64);
        while t < Duration::from_secs(10) {
            off += 3 * SSD_IO_UNIT;
            match v.admit(Read, off, SSD_IO_UNIT, t) {
                Ok(()) => n += 1,
                Err(w) => t = w,
            }
        }
        let mibps = n as f64 * 0.25 / 10.0;
        assert!((127.0..=131.0).contains(&mibps), "{mibps} MiB/s");
    }

    #[test]
    fn gp3_limits_and_errors() {
        let l = model(VolumeSpec::gib(VolumeType::Gp3, 1)).limits();
        assert_eq!(
            l,
            Limits {
                baseline_iops: 3_000,
                burst_iops: None,
                baseline_mibps: 125,
                burst_mibps: None
            }
        );
        // 16,000 IOPS needs 32 GiB (500 per GiB); 1,000 MiB/s needs 4,000 IOPS.
        let l = model(
            VolumeSpec::gib(VolumeType::Gp3, 32)
                .with_iops(16_000)
                .with_throughput(1_000),
        )
        .limits();
        assert_eq!((l.baseline_iops, l.baseline_mibps), (16_000, 1_000));
        assert_eq!(
            err(VolumeSpec::gib(VolumeType::Gp3, 31).with_iops(16_000)).to_string(),
            "gp3 allows at most 500 IOPS per GiB: 31 GiB allows 15500, asked 16000"
        );
        assert_eq!(
            err(VolumeSpec::gib(VolumeType::Gp3, 100).with_iops(16_001)).to_string(),
            "gp3 `iops` must be 3000 to 16000, got 16001"
        );
        assert!(matches!(
            err(VolumeSpec::gib(VolumeType::Gp3, 100).with_iops(2_000)),
            SpecError::IopsRange { min: 3_000, .. }
        ));
        assert_eq!(
            err(VolumeSpec::gib(VolumeType::Gp3, 100).with_throughput(1_000)).to_string(),
            "gp3 allows at most 0.25 MiB/s per provisioned IOPS: 3000 IOPS allow 750 MiB/s, asked 1000"
        );
        assert!(matches!(
            err(VolumeSpec::gib(VolumeType::Gp3, 100)
                .with_iops(8_000)
                .with_throughput(1_001)),
            SpecError::ThroughputRange { max: 1_000, .. }
        ));
        assert_eq!(
            err(VolumeSpec::gib(VolumeType::Gp2, 100).with_throughput(200)).to_string(),
            "gp2 does not take provisioned `throughput_mibps`: its performance follows from its size"
        );
    }

    #[test]
    fn gp3_throughput_is_enforced() {
        let mut v = model(VolumeSpec::gib(VolumeType::Gp3, 100));
        // Sequential 1 MiB writes for 10 s at 125 MiB/s.
        let (mut t, mut n) = (Duration::ZERO, 0u64);
        while t < Duration::from_secs(10) {
            match v.admit(Write, n * MIB, MIB, t) {
                Ok(()) => n += 1,
                Err(w) => t = w,
            }
        }
        assert!((1_250..=1_265).contains(&n), "{n} MiB in 10 s");
        // A 1 MiB SSD I/O counts 4 operations.
        assert_eq!(v.ebs_ops_total(), n * 4);
    }

    #[test]
    fn io1_io2_ratios_and_throughput() {
        assert_eq!(
            err(VolumeSpec::gib(VolumeType::Io1, 100).with_iops(9_000)).to_string(),
            "io1 allows at most 50 IOPS per GiB: 100 GiB allows 5000, asked 9000"
        );
        assert!(VolumeModel::new(
            &VolumeSpec::gib(VolumeType::Io1, 100).with_iops(5_000),
            Duration::ZERO
        )
        .is_ok());
        assert!(matches!(
            err(VolumeSpec::gib(VolumeType::Io1, 2_000).with_iops(64_001)),
            SpecError::IopsRange { max: 64_000, .. }
        ));
        assert!(matches!(
            err(VolumeSpec::gib(VolumeType::Io1, 100).with_iops(99)),
            SpecError::IopsRange { min: 100, .. }
        ));
        // io2: 500 per GiB, so 100 GiB allows 50,000.
        assert!(VolumeModel::new(
            &VolumeSpec::gib(VolumeType::Io2, 100).with_iops(50_000),
            Duration::ZERO
        )
        .is_ok());
        assert!(matches!(
            err(VolumeSpec::gib(VolumeType::Io2, 100).with_iops(50_001)),
            SpecError::IopsPerGib {
                per_gib: 500,
                allowed: 50_000,
                ..
            }
        ));
        // Throughput: 256 KiB per IOPS up to 500 MiB/s; above 32,000 IOPS 16 KiB per IOPS.
        let mibps = |iops, gib| {
            model(VolumeSpec::gib(VolumeType::Io1, gib).with_iops(iops))
                .limits()
                .baseline_mibps
        };
        assert_eq!(mibps(1_000, 100), 250);
        assert_eq!(mibps(2_000, 100), 500);
        assert_eq!(mibps(32_000, 1_000), 500);
        assert_eq!(mibps(48_000, 1_000), 750);
        assert_eq!(mibps(64_000, 1_280), 1_000);
        // Default: 3,000 where the size allows, else the ratio's maximum.
        assert_eq!(
            model(VolumeSpec::gib(VolumeType::Io1, 100))
                .limits()
                .baseline_iops,
            3_000
        );
        assert_eq!(
            model(VolumeSpec::gib(VolumeType::Io1, 4))
                .limits()
                .baseline_iops,
            200
        );
    }

    #[test]
    fn io1_admits_at_provisioned_rate() {
        let mut v = model(VolumeSpec::gib(VolumeType::Io1, 100).with_iops(1_000));
        let (mut t, mut n) = (Duration::ZERO, 0u64);
        while t < Duration::from_secs(5) {
            match v.admit(Read, n * 1_000_000, 4096, t) {
                Ok(()) => n += 1,
                Err(w) => t = w,
            }
        }
        assert!((5_000..=5_101).contains(&n), "{n}");
        let m = v.metrics(Duration::from_secs(5));
        let pct = m.volume_throughput_percentage.unwrap();
        assert!(pct > 99.0, "{pct}");
        assert_eq!(m.burst_balance, None);
    }

    #[test]
    fn sizes_are_validated() {
        assert_eq!(
            err(VolumeSpec {
                volume_type: VolumeType::Gp2,
                size_bytes: GIB / 2,
                iops: None,
                throughput_mibps: None
            })
            .to_string(),
            "gp2 volume `size` must be 1 GiB to 16384 GiB, got 0.500 GiB"
        );
        assert!(matches!(
            err(VolumeSpec::gib(VolumeType::Io1, 3)),
            SpecError::Size { min_gib: 4, .. }
        ));
        assert!(matches!(
            err(VolumeSpec::gib(VolumeType::Io2, 3)),
            SpecError::Size { .. }
        ));
        assert!(matches!(
            err(VolumeSpec::gib(VolumeType::St1, 124)),
            SpecError::Size { min_gib: 125, .. }
        ));
        assert!(matches!(
            err(VolumeSpec::gib(VolumeType::Sc1, 124)),
            SpecError::Size { .. }
        ));
        for t in VolumeType::ALL {
            assert!(
                matches!(
                    err(VolumeSpec::gib(t, 16 * 1024 + 1)),
                    SpecError::Size { .. }
                ),
                "{t}"
            );
            assert!(
                VolumeModel::new(&VolumeSpec::gib(t, 16 * 1024), Duration::ZERO).is_ok(),
                "{t}"
            );
        }
        assert!(matches!(
            err(VolumeSpec::gib(VolumeType::St1, 500).with_iops(500)),
            SpecError::NotProvisionable { field: "iops", .. }
        ));
    }

    #[test]
    fn hdd_limits() {
        // st1 1 TiB: 40 MiB/s baseline, 250 burst; 2 TiB: 80 / 500; 16 TiB: 500 (capped, no burst).
        let l = model(VolumeSpec::gib(VolumeType::St1, 1024)).limits();
        assert_eq!(
            (l.baseline_iops, l.baseline_mibps, l.burst_mibps),
            (500, 40, Some(250))
        );
        let l = model(VolumeSpec::gib(VolumeType::St1, 2048)).limits();
        assert_eq!((l.baseline_mibps, l.burst_mibps), (80, Some(500)));
        let mut v = model(VolumeSpec::gib(VolumeType::St1, 16 * 1024));
        assert_eq!(
            (v.limits().baseline_mibps, v.limits().burst_mibps),
            (500, None)
        );
        assert_eq!(v.burst_balance(Duration::ZERO), None);
        // sc1 1 TiB: 12 / 80; 16 TiB: 192 / 250 (cap); 250 IOPS.
        let l = model(VolumeSpec::gib(VolumeType::Sc1, 1024)).limits();
        assert_eq!(
            (l.baseline_iops, l.baseline_mibps, l.burst_mibps),
            (250, 12, Some(80))
        );
        let l = model(VolumeSpec::gib(VolumeType::Sc1, 16 * 1024)).limits();
        assert_eq!((l.baseline_mibps, l.burst_mibps), (192, Some(250)));
    }

    #[test]
    fn st1_counts_in_1mib_units() {
        let mut v = model(VolumeSpec::gib(VolumeType::St1, 1024));
        // A random 4 KiB read costs one op and 1 MiB of throughput.
        assert_eq!(v.cost(Read, 10 * MIB, 4096), IoCost { ops: 1, bytes: MIB });
        // A 1.5 MiB random read: 2 ops, 2 MiB.
        assert_eq!(
            v.cost(Read, 10 * MIB, 3 * MIB / 2),
            IoCost {
                ops: 2,
                bytes: 2 * MIB
            }
        );
        // 256 sequential 4 KiB reads merge into one 1 MiB operation.
        for i in 0..256 {
            v.admit(Read, 64 * MIB + i * 4096, 4096, Duration::ZERO)
                .unwrap();
        }
        assert_eq!(v.ebs_ops_total(), 1);
        // The next one opens a second unit.
        v.admit(Read, 65 * MIB, 4096, Duration::ZERO).unwrap();
        assert_eq!(v.ebs_ops_total(), 2);
        // Writes are their own stream; a jump breaks the stream.
        v.admit(Write, 65 * MIB + 4096, 4096, Duration::ZERO)
            .unwrap();
        v.admit(Read, 200 * MIB, 4096, Duration::ZERO).unwrap();
        assert_eq!(v.ebs_ops_total(), 4);
    }

    #[test]
    fn st1_random_small_io_is_throughput_bound() {
        // 1 TiB st1 at burst: 250 MiB/s of credit-counted throughput = 250
        // random 4 KiB reads per second, though that is only 1 MB/s of data.
        let mut v = model(VolumeSpec::gib(VolumeType::St1, 1024));
        let (mut t, mut n) = (Duration::ZERO, 0u64);
        while t < Duration::from_secs(10) {
            match v.admit(Read, (n % 1000) * 7 * MIB, 4096, t) {
                Ok(()) => n += 1,
                Err(w) => t = w,
            }
        }
        assert!((2_500..=2_530).contains(&n), "{n}");
        // Credits went down by 10 s × (250 − 40) MiB out of 1 TiB.
        let b = v.burst_balance(Duration::from_secs(10)).unwrap();
        let expect = 100.0 - 100.0 * (10.0 * 210.0) / (1024.0 * 1024.0);
        assert!((b - expect).abs() < 0.01, "{b} vs {expect}");
    }

    #[test]
    fn ssd_counts_in_256kib_units() {
        let mut v = model(VolumeSpec::gib(VolumeType::Gp3, 100));
        // A 1 MiB I/O is 4 operations; 4 KiB is 1; 300 KiB is 2.
        assert_eq!(v.cost(Read, 0, MIB).ops, 4);
        assert_eq!(
            v.cost(Read, 0, 4096),
            IoCost {
                ops: 1,
                bytes: 4096
            }
        );
        assert_eq!(v.cost(Read, 0, 300 * KIB).ops, 2);
        // 8 contiguous 32 KiB I/Os count as one; 8 random ones as eight.
        for i in 0..8 {
            v.admit(Write, i * 32 * KIB, 32 * KIB, Duration::ZERO)
                .unwrap();
        }
        assert_eq!(v.ebs_ops_total(), 1);
        for i in 0..8 {
            v.admit(Write, GIB + i * MIB, 32 * KIB, Duration::ZERO)
                .unwrap();
        }
        assert_eq!(v.ebs_ops_total(), 9);
        // Without merging, every I/O counts on its own.
        v.set_merge_contiguous(false);
        for i in 0..8 {
            v.admit(Write, 2 * GIB + i * 32 * KIB, 32 * KIB, Duration::ZERO)
                .unwrap();
        }
        assert_eq!(v.ebs_ops_total(), 17);
        assert_eq!(v.cost(Read, 0, 0), IoCost { ops: 0, bytes: 0 });
    }

    #[test]
    fn refused_io_takes_nothing() {
        let mut v = model(VolumeSpec::gib(VolumeType::Io1, 100).with_iops(100));
        let mut t = Duration::ZERO;
        let mut n = 0;
        let when = loop {
            match v.admit(Read, n * GIB, 4096, t) {
                Ok(()) => n += 1,
                Err(w) => break w,
            }
        };
        assert!(when > t);
        let total = v.ebs_ops_total();
        assert_eq!(v.admit(Read, n * GIB, 4096, t), Err(when));
        assert_eq!(v.ebs_ops_total(), total);
        t = when;
        v.admit(Read, n * GIB, 4096, t).unwrap();
    }

    #[test]
    fn metrics_periods_queue_and_idle() {
        let mut v = model(VolumeSpec::gib(VolumeType::Gp2, 100));
        let s = Duration::from_secs;
        // Idle 0–2 s, busy 2–5 s, idle 5–10 s.
        v.admit(Write, 0, 8192, s(2)).unwrap();
        v.admit(Read, GIB, 4096, s(3)).unwrap();
        assert_eq!(v.metrics(s(4)).volume_queue_length, 2);
        v.on_complete(Write, 8192, s(4));
        v.on_complete(Read, 4096, s(5));
        let m = v.metrics(s(10));
        assert_eq!(
            (
                m.volume_read_ops,
                m.volume_write_ops,
                m.volume_read_bytes,
                m.volume_write_bytes
            ),
            (1, 1, 4096, 8192)
        );
        assert_eq!(m.volume_queue_length, 0);
        assert!(
            (m.volume_idle_time - 5.0).abs() < 1e-9,
            "{}",
            m.volume_idle_time
        );
        assert!(m.burst_balance.unwrap() > 99.9);
        assert_eq!(m.volume_throughput_percentage, None);
        // The first period (0–4 s) had 2 s idle; the next resets.
        let m = v.metrics(s(12));
        assert_eq!((m.volume_read_ops, m.volume_write_ops), (0, 0));
        assert!((m.volume_idle_time - 2.0).abs() < 1e-9);
        let json = serde_json::to_value(&m).unwrap();
        assert!(json.get("BurstBalance").is_some() && json.get("VolumeQueueLength").is_some());
    }

    #[test]
    fn volume_type_strings() {
        for t in VolumeType::ALL {
            assert_eq!(t.to_string().parse::<VolumeType>(), Ok(t));
        }
        assert_eq!("GP3".parse::<VolumeType>(), Ok(VolumeType::Gp3));
        assert!("standard"
            .parse::<VolumeType>()
            .unwrap_err()
            .to_string()
            .contains("\"standard\""));
        let spec: VolumeSpec =
            serde_json::from_str(r#"{"volume_type":"io2","size_bytes":107374182400,"iops":5000}"#)
                .unwrap();
        assert_eq!(spec, VolumeSpec::gib(VolumeType::Io2, 100).with_iops(5000));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn spec() -> impl Strategy<Value = VolumeSpec> {
            prop_oneof![
                (1u64..=16_384).prop_map(|g| VolumeSpec::gib(VolumeType::Gp2, g)),
                (1u64..=16_384).prop_map(|g| VolumeSpec::gib(VolumeType::Gp3, g)),
                (20u64..=16_384).prop_map(|g| VolumeSpec::gib(VolumeType::Io1, g).with_iops(1_000)),
                (125u64..=16_384).prop_map(|g| VolumeSpec::gib(VolumeType::St1, g)),
                (125u64..=16_384).prop_map(|g| VolumeSpec::gib(VolumeType::Sc1, g)),
            ]
        }

        proptest! {
            /// An I/O refused with Err(t) is admitted at t: no volume wedges,
            /// whatever the I/O size (up to 64 MiB) or pattern.
            #[test]
            fn refusal_time_is_honoured(
                spec in spec(),
                ios in prop::collection::vec((0u64..50_000, any::<bool>(), 0u64..1_000, 0u64..=64 * MIB), 1..100),
            ) {
                let mut v = VolumeModel::new(&spec, Duration::ZERO).unwrap();
                let mut t = Duration::ZERO;
                for (step_us, write, block, len) in ios {
                    t += Duration::from_micros(step_us);
                    let dir = if write { Write } else { Read };
                    let off = block * MIB;
                    if let Err(when) = v.admit(dir, off, len, t) {
                        prop_assert!(when > t);
                        prop_assert_eq!(v.admit(dir, off, len, when), Ok(()));
                        t = when;
                    }
                    v.on_complete(dir, len, t);
                }
                prop_assert_eq!(v.metrics(t).volume_queue_length, 0);
            }
        }
    }
}
