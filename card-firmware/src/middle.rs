//! The middle of a storage card: what happens to a request between the
//! frontend that parsed it and the media that serves it.
//!
//! A frontend (virtio-blk today, NVMe later) asks the middle to [`admit`]
//! each read and write. The middle applies, in order:
//!
//! 1. **Faults** from the volume's fault plan: fail the request, add latency,
//!    stall it (an impaired volume).
//! 2. **Throttling** by the EBS volume model: IOPS and throughput limits and
//!    burst credits. A request over the limit is not failed: the frontend is
//!    told when to ask again, as EBS queues I/O rather than rejecting it.
//! 3. **Latency**: the service time of a network hop (EBS) or of flash.
//!
//! It also keeps what a power cut needs: while a power-cut fault is pending,
//! the old contents of every range written since the last flush, so the cut
//! can take back exactly the writes that were not made durable.
//!
//! Times: fault windows, throttling and latency are in wall time since the
//! card started. `time_scale` speeds up only the burst-credit economy (see
//! hw-model), so a test sees a gp2 bucket drain in seconds while IOPS limits
//! stay what a guest measures.
//!
//! [`admit`]: Middle::admit

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hw_model::ebs::{IoDirection, Limits, VolumeMetrics, VolumeModel, VolumeSpec, VolumeType};
use hw_model::fault::{FaultError, FaultKind, FaultPlan, FaultSpec};
use hw_model::latency::{EbsHop, Flash, LatencyModel};
use hw_model::rng::Rng;

/// How long a stalled request waits before it asks again whether its stall
/// was cleared (stalls without an end last until cleared).
const STALL_RECHECK: Duration = Duration::from_millis(50);

/// Which service-time model a volume has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Latency {
    #[default]
    None,
    /// A network hop to an EBS server.
    Ebs,
    /// Local NVMe flash (instance store).
    Flash,
}

#[derive(Clone, Debug, Default)]
pub struct MiddleConfig {
    /// The EBS volume type and its provisioned figures; None = no throttling.
    pub volume: Option<VolumeSpec>,
    pub latency: Latency,
    /// Burst credits move this many times faster than wall time (≥ 1 in tests).
    pub time_scale: f64,
    pub seed: u64,
}

/// What the frontend should do with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Submit it to the media now. Report failure instead if `fail`; do not
    /// complete it before `not_before`; if `stalled`, keep asking
    /// [`Middle::still_stalled`] before completing.
    Go {
        fail: bool,
        not_before: Option<Instant>,
        stalled: bool,
    },
    /// Throttled: ask again at this instant (and keep later requests behind it).
    Retry(Instant),
}

/// Counters the middle adds to a card's metrics.
#[derive(Debug, Default)]
pub struct MiddleCounters {
    pub throttled: AtomicU64,
    pub fault_errors: AtomicU64,
    pub fault_delays: AtomicU64,
    pub fault_stalls: AtomicU64,
}

/// One write since the last flush: where, and what was there before.
struct UndoEntry {
    offset: u64,
    old: Vec<u8>,
}

struct State {
    volume: Option<VolumeModel>,
    latency: Option<Box<dyn LatencyModel>>,
    faults: FaultPlan,
    /// Writes since the last flush, oldest first; kept only while a power
    /// cut is pending.
    undo: Vec<UndoEntry>,
    /// Entries before this index were covered by a flush that completed.
    undo_base: u64,
    /// CloudWatch figures summed since the card started (the model reports
    /// per period; every reader of the card sees running totals).
    totals: VolumeMetrics,
}

pub struct Middle {
    epoch: Instant,
    seed: u64,
    /// Burst-credit speed-up, kept for a volume modified live.
    time_scale: f64,
    state: Mutex<State>,
    pub counters: MiddleCounters,
}

#[derive(Debug, thiserror::Error)]
pub enum MiddleError {
    #[error("volume: {0}")]
    Volume(#[from] hw_model::ebs::SpecError),
    #[error("fault: {0}")]
    Fault(#[from] FaultError),
    #[error("--time-scale must be a finite number ≥ 1, not {0}")]
    TimeScale(f64),
    #[error("{0} faults apply to the networking card, not to storage")]
    NotForStorage(String),
    #[error("the card models no volume type: give `volume_type`")]
    NoVolume,
}

impl Middle {
    pub fn new(config: &MiddleConfig) -> Result<Self, MiddleError> {
        let time_scale = if config.time_scale == 0.0 {
            1.0
        } else {
            config.time_scale
        };
        if !time_scale.is_finite() || time_scale < 1.0 {
            return Err(MiddleError::TimeScale(config.time_scale));
        }
        let volume = match &config.volume {
            Some(spec) => Some(
                VolumeModel::new(spec, Duration::ZERO)?.with_time_scale(time_scale, Duration::ZERO),
            ),
            None => None,
        };
        let latency: Option<Box<dyn LatencyModel>> = match config.latency {
            Latency::None => None,
            Latency::Ebs => Some(Box::new(EbsHop::new(config.seed))),
            Latency::Flash => Some(Box::new(Flash::new(config.seed))),
        };
        Ok(Self {
            epoch: Instant::now(),
            seed: config.seed,
            time_scale,
            state: Mutex::new(State {
                volume,
                latency,
                faults: FaultPlan::new(),
                undo: Vec::new(),
                undo_base: 0,
                totals: VolumeMetrics::default(),
            }),
            counters: MiddleCounters::default(),
        })
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn at(&self, t: Duration) -> Instant {
        self.epoch
            .checked_add(t)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not stop the data path: the state stays usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides what happens to one read or write.
    pub fn admit(&self, dir: IoDirection, offset: u64, len: u64) -> Admission {
        let now = self.now();
        let mut state = self.state();
        let verdict = state.faults.judge(dir, offset, len, now);
        if verdict.error {
            self.counters.fault_errors.fetch_add(1, Ordering::Relaxed);
            return Admission::Go {
                fail: true,
                not_before: None,
                stalled: false,
            };
        }
        if let Some(volume) = state.volume.as_mut() {
            if let Err(when) = volume.admit(dir, offset, len, now) {
                self.counters.throttled.fetch_add(1, Ordering::Relaxed);
                return Admission::Retry(self.at(when.max(now)));
            }
        }
        let mut delay = verdict.extra_latency;
        if !delay.is_zero() {
            self.counters.fault_delays.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(model) = state.latency.as_mut() {
            delay += model.sample(dir, len);
        }
        let stalled = verdict.hold_until.is_some();
        if stalled {
            self.counters.fault_stalls.fetch_add(1, Ordering::Relaxed);
        }
        // A huge latency fault must not overflow Instant (found by fuzzing).
        let mut not_before = (!delay.is_zero()).then(|| {
            Instant::now()
                .checked_add(delay)
                .unwrap_or_else(|| self.at(Duration::MAX))
        });
        if let Some(until) = verdict.hold_until.filter(|t| *t != Duration::MAX) {
            let until = self.at(until);
            not_before = Some(not_before.map_or(until, |t| t.max(until)));
        }
        Admission::Go {
            fail: false,
            not_before,
            stalled,
        }
    }

    /// A stalled request asks whether it may complete; `Some(t)` = ask again at t.
    pub fn still_stalled(&self, dir: IoDirection, offset: u64, len: u64) -> Option<Instant> {
        let now = self.now();
        let until = self.state().faults.judge_stall(dir, offset, len, now);
        until.map(|until| {
            if until == Duration::MAX {
                Instant::now() + STALL_RECHECK
            } else {
                self.at(until)
            }
        })
    }

    /// An admitted request finished (for queue length and idle time).
    pub fn completed(&self, dir: IoDirection, len: u64) {
        let now = self.now();
        if let Some(volume) = self.state().volume.as_mut() {
            volume.on_complete(dir, len, now);
        }
    }

    // ---- the volume's performance, live (the agent's volume_modify) ----

    /// The modelled volume's type and provisioned figures, and the limits
    /// they give; None when the card does not model a volume.
    pub fn volume(&self) -> Option<(VolumeSpec, Limits)> {
        let state = self.state();
        let volume = state.volume.as_ref()?;
        Some((volume.spec().clone(), volume.limits()))
    }

    /// Changes the volume's type, IOPS or throughput while it serves, as
    /// EBS's ModifyVolume does, and returns the new spec. `size_bytes` is the
    /// volume's capacity. A figure not given is kept when the type stays (or
    /// when the new type takes it too), otherwise it becomes the new type's
    /// default. The result is validated as `--volume-type`/`--iops`/
    /// `--throughput` are; refused, nothing changes.
    ///
    /// The new model starts with fresh token buckets (and a full burst
    /// bucket, as a newly modified gp2 volume does not keep its balance on
    /// AWS either); CloudWatch totals carry over.
    pub fn modify_volume(
        &self,
        size_bytes: u64,
        change: &VolumeChange,
    ) -> Result<VolumeSpec, MiddleError> {
        let now = self.now();
        let mut state = self.state();
        let current = state.volume.as_ref().map(|v| v.spec().clone());
        let volume_type = match (change.volume_type, &current) {
            (Some(t), _) => t,
            (None, Some(c)) => c.volume_type,
            (None, None) => return Err(MiddleError::NoVolume),
        };
        let kept = |field: fn(&VolumeSpec) -> Option<u64>, takes: bool| {
            current.as_ref().and_then(field).filter(|_| takes)
        };
        let spec = VolumeSpec {
            volume_type,
            size_bytes,
            iops: change.iops.or_else(|| {
                kept(
                    |s| s.iops,
                    matches!(
                        volume_type,
                        VolumeType::Gp3 | VolumeType::Io1 | VolumeType::Io2
                    ),
                )
            }),
            throughput_mibps: change
                .throughput_mibps
                .or_else(|| kept(|s| s.throughput_mibps, volume_type == VolumeType::Gp3)),
        };
        let model = VolumeModel::new(&spec, now)?.with_time_scale(self.time_scale, now);
        // What the old model counted this period goes into the totals first.
        if let Some(old) = state.volume.as_mut() {
            let period = old.metrics(now);
            add_period(&mut state.totals, &period);
        }
        state.volume = Some(model);
        Ok(spec)
    }

    // ---- faults, through the agent socket ----

    pub fn add_fault(&self, spec: FaultSpec) -> Result<String, MiddleError> {
        if spec.kind.is_network() {
            return Err(MiddleError::NotForStorage(spec.kind.name().to_owned()));
        }
        let now = self.now();
        Ok(self.state().faults.add(spec, now)?)
    }

    pub fn clear_fault(&self, id: &str) -> Result<FaultSpec, MiddleError> {
        Ok(self.state().faults.clear(id)?)
    }

    pub fn clear_faults(&self) {
        self.state().faults.clear_all();
    }

    pub fn faults(&self) -> Vec<FaultSpec> {
        self.state().faults.list()
    }

    /// Power cuts and crashes whose time has come (each returned once).
    pub fn due_events(&self) -> Vec<FaultSpec> {
        let now = self.now();
        self.state().faults.due_events(now)
    }

    /// CloudWatch's per-volume figures: operations, bytes and idle time since
    /// the card started; queue length, BurstBalance and throughput
    /// percentage as of now.
    pub fn volume_metrics(&self) -> Option<VolumeMetrics> {
        let now = self.now();
        let mut state = self.state();
        let state = &mut *state;
        let period = state.volume.as_mut()?.metrics(now);
        add_period(&mut state.totals, &period);
        Some(state.totals.clone())
    }

    // ---- power cut ----

    /// Whether writes must be logged for a power cut that has not happened yet.
    pub fn power_cut_pending(&self) -> bool {
        // Asked for every write: no cloning of the plan here.
        self.state().faults.power_cut_pending()
    }

    /// Records what `[offset, offset + len)` held before a write (read from
    /// `file`, a buffered descriptor of the media). Called before the write
    /// is submitted.
    pub fn log_write(&self, file: &File, offset: u64, len: u64) -> std::io::Result<()> {
        let mut old = vec![0u8; len as usize];
        let mut done = 0;
        while done < old.len() {
            match file.read_at(&mut old[done..], offset + done as u64)? {
                0 => break, // past the end of the file: reads as zeros
                n => done += n,
            }
        }
        self.state().undo.push(UndoEntry { offset, old });
        Ok(())
    }

    /// A flush is being submitted: returns the log position it covers.
    pub fn flush_started(&self) -> u64 {
        let state = self.state();
        state.undo_base + state.undo.len() as u64
    }

    /// The flush that started at `position` completed: its writes are durable.
    pub fn flush_completed(&self, position: u64) {
        let mut state = self.state();
        let covered = position.saturating_sub(state.undo_base) as usize;
        let covered = covered.min(state.undo.len());
        state.undo.drain(..covered);
        state.undo_base += covered as u64;
    }

    /// Takes back the writes since the last flush — each with the fault's
    /// drop probability, newest first — and makes the result durable.
    /// Returns how many writes were dropped. The caller then ends the card.
    ///
    /// `file` is a buffered, writable descriptor of the media: a jailed card
    /// can no longer open its media by name.
    pub fn power_cut(&self, fault: &FaultSpec, file: &File) -> std::io::Result<usize> {
        let FaultKind::PowerCut { drop_probability } = fault.kind else {
            return Ok(0);
        };
        let mut rng = Rng::new(fault.seed ^ self.seed);
        let state = self.state();
        let mut dropped = 0;
        for entry in state.undo.iter().rev() {
            if rng.chance(drop_probability) {
                file.write_all_at(&entry.old, entry.offset)?;
                dropped += 1;
            }
        }
        file.sync_data()?;
        // Keep the lock: no request may start while the card goes down.
        std::mem::forget(state);
        Ok(dropped)
    }
}

/// Sums one period's figures into the totals since the card started; the
/// gauges (queue length, balance, percentage) are the period's.
fn add_period(t: &mut VolumeMetrics, period: &VolumeMetrics) {
    t.volume_read_ops += period.volume_read_ops;
    t.volume_write_ops += period.volume_write_ops;
    t.volume_read_bytes += period.volume_read_bytes;
    t.volume_write_bytes += period.volume_write_bytes;
    t.volume_idle_time += period.volume_idle_time;
    t.volume_queue_length = period.volume_queue_length;
    t.burst_balance = period.burst_balance;
    t.volume_throughput_percentage = period.volume_throughput_percentage;
}

/// What a live volume modification asks for; `None` fields are kept (see
/// [`Middle::modify_volume`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeChange {
    pub volume_type: Option<VolumeType>,
    pub iops: Option<u64>,
    pub throughput_mibps: Option<u64>,
}

impl std::fmt::Debug for Middle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Middle")
            .field("seed", &self.seed)
            .field("faults", &self.faults().len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gp3() -> Middle {
        Middle::new(&MiddleConfig {
            volume: Some(VolumeSpec::gib(VolumeType::Gp3, 100)),
            ..MiddleConfig::default()
        })
        .unwrap()
    }

    /// Random 4 KiB reads admitted back to back before the first throttle:
    /// the IOPS bucket's size, a tenth of a second of the limit.
    fn admitted_at_once(m: &Middle) -> u64 {
        let mut n = 0;
        while let Admission::Go { .. } = m.admit(IoDirection::Read, n << 20, 4096) {
            m.completed(IoDirection::Read, 4096);
            n += 1;
        }
        n
    }

    #[test]
    fn a_volume_modified_live_throttles_at_its_new_limit() {
        let m = gp3();
        assert_eq!(m.volume().unwrap().1.baseline_iops, 3000);
        // 300 tokens, plus what refills while the loop runs (bounded loosely:
        // the assertion is about the bucket doubling, not about speed).
        let before = admitted_at_once(&m);
        assert!((300..450).contains(&before), "{before}");
        let change = VolumeChange {
            iops: Some(6000),
            ..VolumeChange::default()
        };
        let spec = m.modify_volume(100 << 30, &change).unwrap();
        assert_eq!(spec.iops, Some(6000));
        assert_eq!(m.volume().unwrap().1.baseline_iops, 6000);
        let after = admitted_at_once(&m);
        assert!((600..750).contains(&after), "{after}");
        // Throughput not given: kept (default), so a second change keeps IOPS.
        let change = VolumeChange {
            throughput_mibps: Some(500),
            ..VolumeChange::default()
        };
        let spec = m.modify_volume(100 << 30, &change).unwrap();
        assert_eq!((spec.iops, spec.throughput_mibps), (Some(6000), Some(500)));
    }

    #[test]
    fn a_refused_modification_changes_nothing() {
        let m = gp3();
        m.modify_volume(
            100 << 30,
            &VolumeChange {
                iops: Some(4000),
                ..VolumeChange::default()
            },
        )
        .unwrap();
        let before = m.volume().unwrap();
        for bad in [
            VolumeChange {
                iops: Some(80_000),
                ..VolumeChange::default()
            },
            VolumeChange {
                volume_type: Some(VolumeType::Gp2),
                iops: Some(3000),
                ..VolumeChange::default()
            },
            VolumeChange {
                volume_type: Some(VolumeType::St1),
                ..VolumeChange::default()
            },
        ] {
            let e = m.modify_volume(100 << 30, &bad).unwrap_err();
            assert!(matches!(e, MiddleError::Volume(_)), "{bad:?}: {e}");
            assert_eq!(m.volume().unwrap(), before, "{bad:?}");
        }
        let e = m
            .modify_volume(
                100 << 30,
                &VolumeChange {
                    iops: Some(80_000),
                    ..VolumeChange::default()
                },
            )
            .unwrap_err();
        assert!(e.to_string().contains("`iops`"), "{e}");
        // A card without a volume model needs a type to start one.
        let plain = Middle::new(&MiddleConfig::default()).unwrap();
        assert!(matches!(
            plain.modify_volume(100 << 30, &VolumeChange::default()),
            Err(MiddleError::NoVolume)
        ));
    }

    #[test]
    fn a_huge_latency_fault_does_not_panic() {
        let m = Middle::new(&MiddleConfig::default()).unwrap();
        m.add_fault("kind=latency,fixed_ms=1e300".parse().unwrap())
            .unwrap();
        let _ = m.admit(IoDirection::Read, 0, 4096);
    }
}
