//! Fault plans: what goes wrong, where, when, reproducibly by seed.
//!
//! A plan holds faults, each with a window in model time (anchored when it
//! is added), a scope (byte range, direction) and its own RNG seeded from the
//! spec, so the same seed and the same sequence of I/O give the same verdicts
//! whatever other faults are in the plan.
//!
//! The CLI form of a spec is `key=value` pairs separated by commas, e.g.
//! `kind=io_error,range=0-1M,probability=0.5,seed=7,start=0,end=30`
//! (sizes take K/M/G/T suffixes, powers of 1024; start/end are seconds).
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::ebs::IoDirection;
use crate::rng::Rng;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// Fail matching I/O with an error, each with `probability`.
    IoError {
        #[serde(default = "one")]
        probability: f64,
    },
    /// Add `fixed_ms` to each matching I/O; with `spike_probability`, add `spike_ms` instead (a tail).
    Latency {
        fixed_ms: f64,
        #[serde(default)]
        spike_probability: f64,
        #[serde(default)]
        spike_ms: f64,
    },
    /// Matching I/O hangs until the fault ends, then completes (an impaired volume).
    Stall,
    /// Power cut at the fault's start: writes since the last flush are dropped (each with drop_probability).
    PowerCut {
        #[serde(default = "one")]
        drop_probability: f64,
    },
    /// The card dies at the fault's start.
    Crash,
    // Network (per ENI), for the networking card. Data only for now: `judge`
    // (block I/O) ignores them.
    Loss {
        probability: f64,
    },
    Delay {
        ms: f64,
        #[serde(default)]
        jitter_ms: f64,
    },
    Reorder {
        probability: f64,
    },
    Duplicate {
        probability: f64,
    },
    Corrupt {
        probability: f64,
    },
    LinkDown,
}
fn one() -> f64 {
    1.0
}

impl FaultKind {
    /// The name in JSON and in the CLI form.
    pub fn name(&self) -> &'static str {
        match self {
            FaultKind::IoError { .. } => "io_error",
            FaultKind::Latency { .. } => "latency",
            FaultKind::Stall => "stall",
            FaultKind::PowerCut { .. } => "power_cut",
            FaultKind::Crash => "crash",
            FaultKind::Loss { .. } => "loss",
            FaultKind::Delay { .. } => "delay",
            FaultKind::Reorder { .. } => "reorder",
            FaultKind::Duplicate { .. } => "duplicate",
            FaultKind::Corrupt { .. } => "corrupt",
            FaultKind::LinkDown => "link_down",
        }
    }

    /// Faults of the networking card (not judged for block I/O).
    pub fn is_network(&self) -> bool {
        matches!(
            self,
            FaultKind::Loss { .. }
                | FaultKind::Delay { .. }
                | FaultKind::Reorder { .. }
                | FaultKind::Duplicate { .. }
                | FaultKind::Corrupt { .. }
                | FaultKind::LinkDown
        )
    }

    /// Faults that happen once at their start rather than to each I/O.
    pub fn is_event(&self) -> bool {
        matches!(self, FaultKind::PowerCut { .. } | FaultKind::Crash)
    }

    /// (name, value) of the kind's parameters, in CLI order.
    fn params(&self) -> Vec<(&'static str, f64)> {
        match *self {
            FaultKind::IoError { probability }
            | FaultKind::Loss { probability }
            | FaultKind::Reorder { probability }
            | FaultKind::Duplicate { probability }
            | FaultKind::Corrupt { probability } => vec![("probability", probability)],
            FaultKind::Latency {
                fixed_ms,
                spike_probability,
                spike_ms,
            } => vec![
                ("fixed_ms", fixed_ms),
                ("spike_probability", spike_probability),
                ("spike_ms", spike_ms),
            ],
            FaultKind::PowerCut { drop_probability } => {
                vec![("drop_probability", drop_probability)]
            }
            FaultKind::Delay { ms, jitter_ms } => vec![("ms", ms), ("jitter_ms", jitter_ms)],
            FaultKind::Stall | FaultKind::Crash | FaultKind::LinkDown => vec![],
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Scope {
    /// Byte range [start, end) of the volume; None = all of it.
    pub range: Option<(u64, u64)>,
    /// Only reads, only writes, or both (None).
    pub direction: Option<Dir>,
}

impl Scope {
    /// Whether an I/O falls in this scope. An I/O of no length (a flush)
    /// touches no bytes, so only an unranged fault reaches it.
    pub fn matches(&self, dir: IoDirection, offset: u64, len: u64) -> bool {
        let dir_ok = matches!(
            (self.direction, dir),
            (None, _)
                | (Some(Dir::Read), IoDirection::Read)
                | (Some(Dir::Write), IoDirection::Write)
        );
        let range_ok = match self.range {
            None => true,
            Some(_) if len == 0 => false,
            Some((s, e)) => offset < e && offset.saturating_add(len) > s,
        };
        dir_ok && range_ok
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dir {
    Read,
    Write,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FaultSpec {
    /// Assigned by the plan if empty ("fault-1", ...).
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub scope: Scope,
    #[serde(flatten)]
    pub kind: FaultKind,
    /// Seconds after the fault is added that it starts (default 0) and ends (default never), model time.
    #[serde(default)]
    pub start_s: f64,
    #[serde(default)]
    pub end_s: Option<f64>,
}

impl FaultSpec {
    /// A fault of `kind` on the whole volume, from now on, seed 0.
    pub fn new(kind: FaultKind) -> Self {
        FaultSpec {
            id: String::new(),
            seed: 0,
            scope: Scope::default(),
            kind,
            start_s: 0.0,
            end_s: None,
        }
    }

    /// Checks every value; the errors name the field.
    pub fn validate(&self) -> Result<(), FaultError> {
        for (field, v) in self.kind.params() {
            let ok = if field.ends_with("probability") {
                (0.0..=1.0).contains(&v)
            } else {
                v.is_finite() && v >= 0.0
            };
            if !ok {
                return Err(if field.ends_with("probability") {
                    FaultError::Probability { field, value: v }
                } else {
                    FaultError::Latency { field, value: v }
                });
            }
        }
        if let Some((start, end)) = self.scope.range {
            if start >= end {
                return Err(FaultError::Range { start, end });
            }
        }
        if !(self.start_s.is_finite() && self.start_s >= 0.0) {
            return Err(FaultError::Start(self.start_s));
        }
        if let Some(end) = self.end_s {
            if !(end.is_finite() && end > self.start_s) {
                return Err(FaultError::End {
                    start: self.start_s,
                    end,
                });
            }
        }
        Ok(())
    }
}

/// What the plan says about one I/O.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Verdict {
    pub error: bool,
    pub extra_latency: Duration,
    /// Hold the completion until this model time (a stall). `Duration::MAX`
    /// means until the fault is cleared: judge again when the plan changes.
    pub hold_until: Option<Duration>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FaultError {
    #[error("no fault with id {0:?}")]
    UnknownId(String),
    #[error("a fault with id {0:?} already exists")]
    DuplicateId(String),
    #[error("fault `{field}` must be a probability in [0, 1], got {value}")]
    Probability { field: &'static str, value: f64 },
    #[error("fault `{field}` must be a finite number of milliseconds >= 0, got {value}")]
    Latency { field: &'static str, value: f64 },
    #[error("fault `range` start must be below its end, got {start}-{end}")]
    Range { start: u64, end: u64 },
    #[error("fault `start` must be a finite number of seconds >= 0, got {0}")]
    Start(f64),
    #[error("fault `end` must be after `start` ({start} s), got {end}")]
    End { start: f64, end: f64 },
    #[error("fault spec item {0:?} is not key=value")]
    Malformed(String),
    #[error("fault key `{0}` given twice")]
    DuplicateKey(String),
    #[error("fault key `{key}` does not apply to kind {kind}")]
    UnknownKey { key: String, kind: String },
    #[error("fault key `{0}` is required")]
    MissingKey(&'static str),
    #[error("fault key `{key}`: {value:?} is not {expected}")]
    BadValue {
        key: String,
        value: String,
        expected: &'static str,
    },
}

#[derive(Clone, Debug)]
struct Entry {
    spec: FaultSpec,
    start: Duration,
    end: Option<Duration>,
    rng: Rng,
    fired: bool,
}

impl Entry {
    fn active(&self, now: Duration) -> bool {
        self.start <= now && self.end.is_none_or(|e| now < e)
    }
}

#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    entries: Vec<Entry>,
    next_id: u64,
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
}

impl FaultPlan {
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates and adds; returns the id. `now` anchors start_s/end_s.
    pub fn add(&mut self, mut spec: FaultSpec, now: Duration) -> Result<String, FaultError> {
        spec.validate()?;
        if spec.id.is_empty() {
            // Skip ids a caller already chose by hand.
            loop {
                self.next_id += 1;
                let id = format!("fault-{}", self.next_id);
                if !self.entries.iter().any(|e| e.spec.id == id) {
                    spec.id = id;
                    break;
                }
            }
        } else if self.entries.iter().any(|e| e.spec.id == spec.id) {
            return Err(FaultError::DuplicateId(spec.id));
        }
        let start = now.saturating_add(secs(spec.start_s));
        let end = spec.end_s.map(|e| now.saturating_add(secs(e)));
        let id = spec.id.clone();
        self.entries.push(Entry {
            rng: Rng::new(spec.seed),
            spec,
            start,
            end,
            fired: false,
        });
        Ok(id)
    }

    pub fn clear(&mut self, id: &str) -> Result<FaultSpec, FaultError> {
        let i = self
            .entries
            .iter()
            .position(|e| e.spec.id == id)
            .ok_or_else(|| FaultError::UnknownId(id.to_string()))?;
        Ok(self.entries.remove(i).spec)
    }

    pub fn clear_all(&mut self) {
        self.entries.clear();
    }

    /// The specs, in the order they were added.
    pub fn list(&self) -> Vec<FaultSpec> {
        self.entries.iter().map(|e| e.spec.clone()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Block I/O: the combined verdict of every active fault matching this I/O.
    /// An error if any fires; latencies add; a stall holds until the latest
    /// end among matching stalls (`Duration::MAX` for a stall without an end).
    pub fn judge(&mut self, dir: IoDirection, offset: u64, len: u64, now: Duration) -> Verdict {
        let mut v = Verdict::default();
        for e in self.entries.iter_mut() {
            if !e.active(now) || !e.spec.scope.matches(dir, offset, len) {
                continue;
            }
            match e.spec.kind {
                FaultKind::IoError { probability } => {
                    v.error |= e.rng.chance(probability);
                }
                FaultKind::Latency {
                    fixed_ms,
                    spike_probability,
                    spike_ms,
                } => {
                    let ms = if e.rng.chance(spike_probability) {
                        spike_ms
                    } else {
                        fixed_ms
                    };
                    v.extra_latency = v.extra_latency.saturating_add(secs(ms / 1000.0));
                }
                FaultKind::Stall => {
                    let until = e.end.unwrap_or(Duration::MAX);
                    v.hold_until = Some(v.hold_until.map_or(until, |h| h.max(until)));
                }
                // Events fire through due_events; network kinds are not block faults.
                _ => {}
            }
        }
        v
    }

    /// Whether an active stall still holds this I/O: the latest end among the
    /// matching stalls (`Duration::MAX` until cleared), or None. Unlike
    /// [`FaultPlan::judge`] this draws no random numbers, so asking again
    /// leaves other faults' sequences untouched.
    pub fn judge_stall(
        &self,
        dir: IoDirection,
        offset: u64,
        len: u64,
        now: Duration,
    ) -> Option<Duration> {
        self.entries
            .iter()
            .filter(|e| matches!(e.spec.kind, FaultKind::Stall))
            .filter(|e| e.active(now) && e.spec.scope.matches(dir, offset, len))
            .map(|e| e.end.unwrap_or(Duration::MAX))
            .max()
    }

    /// Whether a power cut is waiting to fire (so writes must be logged).
    pub fn power_cut_pending(&self) -> bool {
        self.entries
            .iter()
            .any(|e| !e.fired && matches!(e.spec.kind, FaultKind::PowerCut { .. }))
    }

    /// Power cuts and crashes whose start has come and which have not fired yet (each fires once).
    pub fn due_events(&mut self, now: Duration) -> Vec<FaultSpec> {
        self.entries
            .iter_mut()
            .filter(|e| e.spec.kind.is_event() && !e.fired && e.start <= now)
            .map(|e| {
                e.fired = true;
                e.spec.clone()
            })
            .collect()
    }

    /// The next model time after `now` at which a fault starts or ends: when
    /// a caller should look at due events or re-judge held I/O.
    pub fn next_change(&self, now: Duration) -> Option<Duration> {
        self.entries
            .iter()
            .flat_map(|e| [Some(e.start), e.end])
            .flatten()
            .filter(|t| *t > now)
            .min()
    }
}

/// Parses a size with an optional K/M/G/T suffix (powers of 1024; "KiB",
/// "MB" and the like are accepted too).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(digits);
    let n: u64 = num.parse().ok()?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

/// The shortest exact form: the largest suffix that divides the size.
pub fn format_size(n: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if n != 0 && n % (1u64 << shift) == 0 {
            return format!("{}{suffix}", n >> shift);
        }
    }
    n.to_string()
}

impl fmt::Display for FaultSpec {
    /// The CLI form; `parse` reads it back to an equal spec.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kind={}", self.kind.name())?;
        if !self.id.is_empty() {
            write!(f, ",id={}", self.id)?;
        }
        for (k, v) in self.kind.params() {
            write!(f, ",{k}={v}")?;
        }
        if let Some((s, e)) = self.scope.range {
            write!(f, ",range={}-{}", format_size(s), format_size(e))?;
        }
        match self.scope.direction {
            Some(Dir::Read) => f.write_str(",dir=read")?,
            Some(Dir::Write) => f.write_str(",dir=write")?,
            None => {}
        }
        if self.seed != 0 {
            write!(f, ",seed={}", self.seed)?;
        }
        if self.start_s != 0.0 {
            write!(f, ",start={}", self.start_s)?;
        }
        if let Some(e) = self.end_s {
            write!(f, ",end={e}")?;
        }
        Ok(())
    }
}

impl FromStr for FaultSpec {
    type Err = FaultError;

    fn from_str(s: &str) -> Result<Self, FaultError> {
        let mut kv: BTreeMap<String, String> = BTreeMap::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| FaultError::Malformed(item.to_string()))?;
            let k = k.trim().to_ascii_lowercase();
            // "direction" is the JSON name; "dir" the short one.
            let k = if k == "direction" {
                "dir".to_string()
            } else {
                k
            };
            if kv.insert(k.clone(), v.trim().to_string()).is_some() {
                return Err(FaultError::DuplicateKey(k));
            }
        }
        let bad = |key: &str, value: &str, expected| FaultError::BadValue {
            key: key.to_string(),
            value: value.to_string(),
            expected,
        };
        let kind_name = kv.remove("kind").ok_or(FaultError::MissingKey("kind"))?;
        let mut num = |key: &'static str, default: Option<f64>| -> Result<f64, FaultError> {
            match kv.remove(key) {
                Some(v) => v.parse::<f64>().map_err(|_| bad(key, &v, "a number")),
                None => default.ok_or(FaultError::MissingKey(key)),
            }
        };
        let kind = match kind_name.as_str() {
            "io_error" => FaultKind::IoError {
                probability: num("probability", Some(1.0))?,
            },
            "latency" => FaultKind::Latency {
                fixed_ms: num("fixed_ms", None)?,
                spike_probability: num("spike_probability", Some(0.0))?,
                spike_ms: num("spike_ms", Some(0.0))?,
            },
            "stall" => FaultKind::Stall,
            "power_cut" => FaultKind::PowerCut {
                drop_probability: num("drop_probability", Some(1.0))?,
            },
            "crash" => FaultKind::Crash,
            "loss" => FaultKind::Loss {
                probability: num("probability", None)?,
            },
            "delay" => FaultKind::Delay {
                ms: num("ms", None)?,
                jitter_ms: num("jitter_ms", Some(0.0))?,
            },
            "reorder" => FaultKind::Reorder {
                probability: num("probability", None)?,
            },
            "duplicate" => FaultKind::Duplicate {
                probability: num("probability", None)?,
            },
            "corrupt" => FaultKind::Corrupt {
                probability: num("probability", None)?,
            },
            "link_down" => FaultKind::LinkDown,
            other => {
                return Err(bad(
                    "kind",
                    other,
                    "one of io_error, latency, stall, power_cut, crash, loss, delay, reorder, duplicate, corrupt, link_down",
                ))
            }
        };
        let start_s = num("start", Some(0.0))?;
        let end_s = match kv.remove("end") {
            Some(v) => Some(v.parse::<f64>().map_err(|_| bad("end", &v, "a number"))?),
            None => None,
        };
        let mut spec = FaultSpec::new(kind);
        spec.start_s = start_s;
        spec.end_s = end_s;
        if let Some(v) = kv.remove("id") {
            spec.id = v;
        }
        if let Some(v) = kv.remove("seed") {
            spec.seed = v
                .parse()
                .map_err(|_| bad("seed", &v, "an unsigned integer"))?;
        }
        if let Some(v) = kv.remove("range") {
            let parsed = v
                .split_once('-')
                .and_then(|(a, b)| Some((parse_size(a)?, parse_size(b)?)));
            spec.scope.range =
                Some(parsed.ok_or_else(|| bad("range", &v, "START-END with K/M/G/T sizes"))?);
        }
        if let Some(v) = kv.remove("dir") {
            spec.scope.direction = match v.to_ascii_lowercase().as_str() {
                "read" => Some(Dir::Read),
                "write" => Some(Dir::Write),
                "both" | "any" => None,
                _ => return Err(bad("dir", &v, "read, write or both")),
            };
        }
        if let Some(key) = kv.into_keys().next() {
            return Err(FaultError::UnknownKey {
                key,
                kind: kind_name,
            });
        }
        spec.validate()?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use IoDirection::{Read, Write};

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn spec(s: &str) -> FaultSpec {
        s.parse().unwrap()
    }

    #[test]
    fn ids_are_assigned_and_unique() {
        let mut p = FaultPlan::new();
        assert_eq!(p.add(spec("kind=stall"), S(0)).unwrap(), "fault-1");
        assert_eq!(
            p.add(spec("kind=stall,id=fault-2"), S(0)).unwrap(),
            "fault-2"
        );
        // fault-2 is taken by hand, so the next assigned id skips it.
        assert_eq!(p.add(spec("kind=crash"), S(0)).unwrap(), "fault-3");
        assert_eq!(
            p.add(spec("kind=crash,id=fault-1"), S(0)),
            Err(FaultError::DuplicateId("fault-1".into()))
        );
        let ids: Vec<_> = p.list().into_iter().map(|s| s.id).collect();
        assert_eq!(ids, ["fault-1", "fault-2", "fault-3"]);
        assert_eq!(p.clear("fault-2").unwrap().kind, FaultKind::Stall);
        assert_eq!(
            p.clear("fault-2"),
            Err(FaultError::UnknownId("fault-2".into()))
        );
        p.clear_all();
        assert!(p.is_empty());
    }

    #[test]
    fn validation_names_the_field() {
        let mut p = FaultPlan::new();
        let e = p
            .add(
                FaultSpec::new(FaultKind::IoError { probability: 1.5 }),
                S(0),
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "fault `probability` must be a probability in [0, 1], got 1.5"
        );
        let e = p
            .add(
                FaultSpec::new(FaultKind::Latency {
                    fixed_ms: -1.0,
                    spike_probability: 0.0,
                    spike_ms: 0.0,
                }),
                S(0),
            )
            .unwrap_err();
        assert!(e.to_string().starts_with("fault `fixed_ms`"), "{e}");
        let mut s = FaultSpec::new(FaultKind::Stall);
        s.scope.range = Some((10, 10));
        assert_eq!(
            p.add(s, S(0)),
            Err(FaultError::Range { start: 10, end: 10 })
        );
        let mut s = FaultSpec::new(FaultKind::Stall);
        s.start_s = 5.0;
        s.end_s = Some(5.0);
        assert!(matches!(p.add(s, S(0)), Err(FaultError::End { .. })));
        let mut s = FaultSpec::new(FaultKind::Stall);
        s.start_s = -1.0;
        assert_eq!(p.add(s, S(0)), Err(FaultError::Start(-1.0)));
        assert!(matches!(
            p.add(
                FaultSpec::new(FaultKind::Loss {
                    probability: f64::NAN
                }),
                S(0)
            ),
            Err(FaultError::Probability {
                field: "probability",
                ..
            })
        ));
        assert!(p.is_empty());
    }

    #[test]
    fn windows_are_anchored_at_add() {
        let mut p = FaultPlan::new();
        p.add(spec("kind=io_error,start=10,end=20"), S(100))
            .unwrap();
        assert!(!p.judge(Read, 0, 4096, S(109)).error);
        assert!(p.judge(Read, 0, 4096, S(110)).error);
        assert!(p.judge(Read, 0, 4096, S(119)).error);
        assert!(!p.judge(Read, 0, 4096, S(120)).error);
        assert_eq!(p.next_change(S(100)), Some(S(110)));
        assert_eq!(p.next_change(S(110)), Some(S(120)));
        assert_eq!(p.next_change(S(120)), None);
    }

    #[test]
    fn scope_range_and_direction() {
        let mut p = FaultPlan::new();
        p.add(spec("kind=io_error,range=1M-2M,dir=write"), S(0))
            .unwrap();
        assert!(p.judge(Write, 1 << 20, 4096, S(0)).error);
        // Overlapping the range's edges counts; touching it does not.
        assert!(p.judge(Write, (1 << 20) - 4096, 8192, S(0)).error);
        assert!(!p.judge(Write, (1 << 20) - 4096, 4096, S(0)).error);
        assert!(!p.judge(Write, 2 << 20, 4096, S(0)).error);
        assert!(!p.judge(Read, 1 << 20, 4096, S(0)).error);
        // A flush (no bytes) is outside any range.
        assert!(!p.judge(Write, 0, 0, S(0)).error);
    }

    #[test]
    fn verdicts_combine() {
        let mut p = FaultPlan::new();
        p.add(spec("kind=latency,fixed_ms=2"), S(0)).unwrap();
        p.add(spec("kind=latency,fixed_ms=0.5"), S(0)).unwrap();
        p.add(spec("kind=io_error,probability=0"), S(0)).unwrap();
        p.add(spec("kind=stall,end=30"), S(0)).unwrap();
        p.add(spec("kind=stall,start=1,end=60"), S(0)).unwrap();
        p.add(spec("kind=loss,probability=1"), S(0)).unwrap();
        p.add(spec("kind=crash"), S(0)).unwrap();
        let v = p.judge(Read, 0, 4096, S(0));
        assert_eq!(
            v,
            Verdict {
                error: false,
                extra_latency: Duration::from_micros(2_500),
                hold_until: Some(S(30)),
            }
        );
        // Both stalls active: the later end holds.
        assert_eq!(p.judge(Read, 0, 4096, S(2)).hold_until, Some(S(60)));
        p.add(spec("kind=stall"), S(0)).unwrap();
        assert_eq!(p.judge(Read, 0, 4096, S(2)).hold_until, Some(Duration::MAX));
        p.add(spec("kind=io_error"), S(0)).unwrap();
        assert!(p.judge(Read, 0, 4096, S(2)).error);
    }

    #[test]
    fn latency_spikes_by_probability() {
        let mut p = FaultPlan::new();
        p.add(
            spec("kind=latency,fixed_ms=1,spike_probability=0.1,spike_ms=100,seed=3"),
            S(0),
        )
        .unwrap();
        let spikes = (0..10_000)
            .filter(|_| p.judge(Read, 0, 4096, S(0)).extra_latency == Duration::from_millis(100))
            .count();
        assert!((900..=1_100).contains(&spikes), "{spikes}");
    }

    #[test]
    fn same_seed_same_verdicts() {
        let run = |seed: u64| {
            let mut p = FaultPlan::new();
            p.add(
                spec(&format!("kind=io_error,probability=0.5,seed={seed}")),
                S(0),
            )
            .unwrap();
            p.add(
                spec(&format!(
                    "kind=latency,fixed_ms=1,spike_probability=0.2,spike_ms=9,seed={seed}"
                )),
                S(0),
            )
            .unwrap();
            (0..1_000u64)
                .map(|i| p.judge(Read, i * 4096, 4096, S(0)))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let errors = run(7).iter().filter(|v| v.error).count();
        assert!((430..=570).contains(&errors), "{errors}");
    }

    #[test]
    fn events_fire_once_at_start() {
        let mut p = FaultPlan::new();
        p.add(spec("kind=power_cut,drop_probability=0.5,start=5"), S(0))
            .unwrap();
        p.add(spec("kind=crash,start=10"), S(0)).unwrap();
        p.add(spec("kind=stall,start=1"), S(0)).unwrap();
        assert!(p.due_events(S(4)).is_empty());
        let due = p.due_events(S(5));
        assert_eq!(due.len(), 1);
        assert_eq!(
            due[0].kind,
            FaultKind::PowerCut {
                drop_probability: 0.5
            }
        );
        assert!(p.due_events(S(6)).is_empty());
        // A late poll still gets the crash, once.
        assert_eq!(p.due_events(S(50)).len(), 1);
        assert!(p.due_events(S(60)).is_empty());
        // Events do not touch I/O verdicts (the stall does).
        assert_eq!(p.judge(Write, 0, 1, S(60)).hold_until, Some(Duration::MAX));
    }

    #[test]
    fn cli_form_parses() {
        let s = spec("kind=io_error,range=0-1M,probability=0.5,seed=7,start=0,end=30");
        assert_eq!(
            s,
            FaultSpec {
                id: String::new(),
                seed: 7,
                scope: Scope {
                    range: Some((0, 1 << 20)),
                    direction: None
                },
                kind: FaultKind::IoError { probability: 0.5 },
                start_s: 0.0,
                end_s: Some(30.0),
            }
        );
        assert_eq!(
            spec("kind=io_error").kind,
            FaultKind::IoError { probability: 1.0 }
        );
        assert_eq!(
            spec("kind=stall,range=4K-2G").scope.range,
            Some((4096, 2 << 30))
        );
        assert_eq!(
            spec(" kind = delay , ms=5, jitter_ms=1 ,").kind,
            FaultKind::Delay {
                ms: 5.0,
                jitter_ms: 1.0
            }
        );
        assert_eq!(
            spec("kind=link_down,direction=read").scope.direction,
            Some(Dir::Read)
        );
    }

    #[test]
    fn cli_form_round_trips() {
        for s in [
            "kind=io_error,range=0-1M,probability=0.5,seed=7,start=0,end=30",
            "kind=latency,id=slow,fixed_ms=0.25,spike_probability=0.01,spike_ms=250,dir=read",
            "kind=stall,range=1T-2T,start=1.5,end=2.75",
            "kind=power_cut,drop_probability=0.3,dir=write",
            "kind=crash,start=60",
            "kind=loss,probability=0.001",
            "kind=delay,ms=5,jitter_ms=0.5",
            "kind=reorder,probability=0.1",
            "kind=duplicate,probability=0.2",
            "kind=corrupt,probability=0.3,seed=18446744073709551615",
            "kind=link_down,end=10",
            "kind=stall,range=4097-8193",
        ] {
            let a = spec(s);
            let b = spec(&a.to_string());
            assert_eq!(a, b, "{s} -> {a}");
            // JSON carries the same spec.
            let json = serde_json::to_string(&a).unwrap();
            assert_eq!(
                serde_json::from_str::<FaultSpec>(&json).unwrap(),
                a,
                "{json}"
            );
        }
        let json: FaultSpec = serde_json::from_str(r#"{"kind":"io_error"}"#).unwrap();
        assert_eq!(json.kind, FaultKind::IoError { probability: 1.0 });
    }

    #[test]
    fn cli_errors_name_the_key() {
        let err = |s: &str| s.parse::<FaultSpec>().unwrap_err();
        assert_eq!(err("probability=0.5"), FaultError::MissingKey("kind"));
        assert_eq!(
            err("kind=io_error,probability=lots").to_string(),
            "fault key `probability`: \"lots\" is not a number"
        );
        assert_eq!(
            err("kind=io_error,fixed_ms=3"),
            FaultError::UnknownKey {
                key: "fixed_ms".into(),
                kind: "io_error".into()
            }
        );
        assert_eq!(err("kind=latency"), FaultError::MissingKey("fixed_ms"));
        assert!(err("kind=melt")
            .to_string()
            .starts_with("fault key `kind`: \"melt\""));
        assert!(err("kind=stall,range=1M")
            .to_string()
            .starts_with("fault key `range`"));
        assert!(err("kind=stall,range=1X-2M")
            .to_string()
            .starts_with("fault key `range`"));
        assert!(err("kind=stall,range=99999999T-100000000T")
            .to_string()
            .starts_with("fault key `range`"));
        assert_eq!(
            err("kind=stall,range=2M-1M"),
            FaultError::Range {
                start: 2 << 20,
                end: 1 << 20
            }
        );
        assert!(err("kind=stall,seed=-1")
            .to_string()
            .starts_with("fault key `seed`"));
        assert!(err("kind=stall,dir=up")
            .to_string()
            .starts_with("fault key `dir`"));
        assert!(err("kind=stall,end=x")
            .to_string()
            .starts_with("fault key `end`"));
        assert_eq!(
            err("kind=stall,kind=crash"),
            FaultError::DuplicateKey("kind".into())
        );
        assert_eq!(err("kind=stall,oops"), FaultError::Malformed("oops".into()));
        assert!(matches!(
            err("kind=io_error,probability=2"),
            FaultError::Probability { .. }
        ));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("3g"), Some(3 << 30));
        assert_eq!(parse_size("2T"), Some(2 << 40));
        assert_eq!(parse_size("1.5M"), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(format_size(3 << 30), "3G");
        assert_eq!(format_size(1536), "1536");
        assert_eq!(format_size(0), "0");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn kind() -> impl Strategy<Value = FaultKind> {
            let p = 0.0f64..=1.0;
            let ms = 0.0f64..1e6;
            prop_oneof![
                p.clone()
                    .prop_map(|probability| FaultKind::IoError { probability }),
                (ms.clone(), p.clone(), ms.clone()).prop_map(
                    |(fixed_ms, spike_probability, spike_ms)| {
                        FaultKind::Latency {
                            fixed_ms,
                            spike_probability,
                            spike_ms,
                        }
                    }
                ),
                Just(FaultKind::Stall),
                p.clone()
                    .prop_map(|drop_probability| FaultKind::PowerCut { drop_probability }),
                Just(FaultKind::Crash),
                p.clone()
                    .prop_map(|probability| FaultKind::Loss { probability }),
                (ms.clone(), ms).prop_map(|(ms, jitter_ms)| FaultKind::Delay { ms, jitter_ms }),
                p.prop_map(|probability| FaultKind::Corrupt { probability }),
                Just(FaultKind::LinkDown),
            ]
        }

        proptest! {
            /// Display then parse gives back the same spec.
            #[test]
            fn display_parse_round_trip(
                kind in kind(),
                seed: u64,
                range in prop::option::of((0u64..1 << 50, 1u64..1 << 50)),
                dir in prop::option::of(prop_oneof![Just(Dir::Read), Just(Dir::Write)]),
                start_s in 0.0f64..1e6,
                len_s in prop::option::of(0.001f64..1e6),
                id in "[a-z][a-z0-9-]{0,12}",
            ) {
                let spec = FaultSpec {
                    id,
                    seed,
                    scope: Scope { range: range.map(|(s, l)| (s, s + l)), direction: dir },
                    kind,
                    start_s,
                    end_s: len_s.map(|l| start_s + l).filter(|e| *e > start_s),
                };
                prop_assert_eq!(spec.to_string().parse::<FaultSpec>(), Ok(spec.clone()));
            }
        }
    }
}
