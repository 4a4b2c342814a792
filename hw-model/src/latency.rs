//! Latency models: a network hop to an EBS server, and local flash (instance store).
//!
//! Service times are log-normal around a median (the usual shape of storage
//! latency: a floor, a mode near it and a long right tail), plus the time to
//! move the bytes at the path's bandwidth. Seeded, so a run repeats exactly.
use std::time::Duration;

use crate::ebs::IoDirection;
use crate::rng::Rng;

pub trait LatencyModel: Send {
    /// The service time to add for one I/O of `len` bytes.
    fn sample(&mut self, dir: IoDirection, len: u64) -> Duration;
}

/// z of the 99th percentile of the standard normal.
const Z99: f64 = 2.326_347_874;

/// A log-normal sample with the given median and sigma, capped at `max`.
fn lognormal(rng: &mut Rng, median: Duration, sigma: f64, max: Duration) -> Duration {
    let x = median.as_secs_f64() * (sigma * rng.next_normal()).exp();
    Duration::try_from_secs_f64(x).unwrap_or(max).min(max)
}

fn transfer(len: u64, bytes_per_sec: u64) -> Duration {
    if bytes_per_sec == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos((u128::from(len) * 1_000_000_000 / u128::from(bytes_per_sec)) as u64)
}

/// Parameters of [`EbsHop`].
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EbsHopParams {
    /// Median service time of a small (4 KiB) I/O: network round trip plus server time.
    pub median: Duration,
    /// 99th percentile of the same; sets the tail's width.
    pub p99: Duration,
    /// Bandwidth of the path for the size-dependent part.
    pub bytes_per_sec: u64,
    /// No sample above this (a log-normal tail is unbounded; real ones time out).
    pub max: Duration,
}

impl Default for EbsHopParams {
    /// AWS quotes "single-digit millisecond" latency for gp2/gp3 and
    /// sub-millisecond for io2; ~0.5 ms median and ~3 ms p99 for 4 KiB is the
    /// commonly measured shape. 10 Gb/s is a typical EBS-optimized path.
    fn default() -> Self {
        EbsHopParams {
            median: Duration::from_micros(500),
            p99: Duration::from_millis(3),
            bytes_per_sec: 1_250_000_000,
            max: Duration::from_millis(50),
        }
    }
}

/// EBS: a network round trip plus server time; median ~0.5 ms for 4 KiB, a
/// long tail (p99 a few ms); grows with size at the link's bandwidth. Seeded.
#[derive(Clone, Debug)]
pub struct EbsHop {
    rng: Rng,
    params: EbsHopParams,
    sigma: f64,
}

impl EbsHop {
    pub fn new(seed: u64) -> Self {
        Self::with_params(seed, EbsHopParams::default())
    }

    pub fn with_params(seed: u64, params: EbsHopParams) -> Self {
        // p99 = median × e^(σ·z99); a p99 below the median means no tail.
        let ratio = params.p99.as_secs_f64() / params.median.as_secs_f64().max(1e-12);
        let sigma = if ratio > 1.0 { ratio.ln() / Z99 } else { 0.0 };
        EbsHop {
            rng: Rng::new(seed),
            params,
            sigma,
        }
    }

    pub fn params(&self) -> EbsHopParams {
        self.params
    }
}

impl LatencyModel for EbsHop {
    fn sample(&mut self, _dir: IoDirection, len: u64) -> Duration {
        // The median is quoted for 4 KiB, so only bytes beyond that add transfer time.
        let base = lognormal(
            &mut self.rng,
            self.params.median,
            self.sigma,
            self.params.max,
        );
        base + transfer(len.saturating_sub(4096), self.params.bytes_per_sec)
    }
}

/// Parameters of [`Flash`].
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FlashParams {
    pub read_median: Duration,
    /// Writes land in the drive's cache, so they are faster than reads.
    pub write_median: Duration,
    /// Log-normal width of ordinary I/O.
    pub sigma: f64,
    pub bytes_per_sec: u64,
    /// Chance that an I/O waits behind garbage collection.
    pub gc_probability: f64,
    /// A GC stall adds a uniform time in [gc_min, gc_max).
    pub gc_min: Duration,
    pub gc_max: Duration,
}

impl Default for FlashParams {
    /// NVMe instance store (i3/i4i class): ~80 µs 4 KiB reads, ~20 µs cached
    /// writes, ~2 GB/s per device, and a rare multi-millisecond GC stall.
    fn default() -> Self {
        FlashParams {
            read_median: Duration::from_micros(80),
            write_median: Duration::from_micros(20),
            sigma: 0.25,
            bytes_per_sec: 2_000_000_000,
            gc_probability: 0.001,
            gc_min: Duration::from_millis(1),
            gc_max: Duration::from_millis(5),
        }
    }
}

/// NVMe flash: ~80 us reads, ~20 us writes (cache), tail spikes from GC. Seeded.
#[derive(Clone, Debug)]
pub struct Flash {
    rng: Rng,
    params: FlashParams,
}

impl Flash {
    pub fn new(seed: u64) -> Self {
        Self::with_params(seed, FlashParams::default())
    }

    pub fn with_params(seed: u64, params: FlashParams) -> Self {
        Flash {
            rng: Rng::new(seed),
            params,
        }
    }

    pub fn params(&self) -> FlashParams {
        self.params
    }
}

impl LatencyModel for Flash {
    fn sample(&mut self, dir: IoDirection, len: u64) -> Duration {
        let p = &self.params;
        let median = match dir {
            IoDirection::Read => p.read_median,
            IoDirection::Write => p.write_median,
        };
        // Ordinary I/O never exceeds 100 × median; GC supplies the real tail.
        let mut t = lognormal(&mut self.rng, median, p.sigma, median * 100)
            + transfer(len.saturating_sub(4096), p.bytes_per_sec);
        if self.rng.chance(p.gc_probability) {
            let span = p.gc_max.saturating_sub(p.gc_min);
            t += p.gc_min + span.mul_f64(self.rng.next_f64());
        }
        t
    }
}

/// Fixed latency, or none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fixed(pub Duration);

impl LatencyModel for Fixed {
    fn sample(&mut self, _dir: IoDirection, _len: u64) -> Duration {
        self.0
    }
}

impl<T: LatencyModel + ?Sized> LatencyModel for Box<T> {
    fn sample(&mut self, dir: IoDirection, len: u64) -> Duration {
        (**self).sample(dir, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use IoDirection::{Read, Write};

    fn percentiles(m: &mut dyn LatencyModel, dir: IoDirection, len: u64) -> (Duration, Duration) {
        let mut v: Vec<Duration> = (0..100_000).map(|_| m.sample(dir, len)).collect();
        v.sort();
        (v[50_000], v[99_000])
    }

    #[test]
    fn ebs_hop_median_and_tail() {
        let (p50, p99) = percentiles(&mut EbsHop::new(1), Read, 4096);
        assert!((450..=550).contains(&p50.as_micros()), "p50 {p50:?}");
        assert!((2_500..=3_500).contains(&p99.as_micros()), "p99 {p99:?}");
        // 1 MiB adds ~0.84 ms at 10 Gb/s.
        let (p50_big, _) = percentiles(&mut EbsHop::new(1), Write, 1 << 20);
        let extra = p50_big.as_micros() as i64 - p50.as_micros() as i64;
        assert!((780..=900).contains(&extra), "extra {extra} us");
    }

    #[test]
    fn flash_reads_writes_and_gc() {
        let mut f = Flash::new(3);
        let (r50, _) = percentiles(&mut f, Read, 4096);
        let (w50, _) = percentiles(&mut f, Write, 4096);
        assert!((75..=85).contains(&r50.as_micros()), "{r50:?}");
        assert!((18..=22).contains(&w50.as_micros()), "{w50:?}");
        let spikes = (0..100_000)
            .filter(|_| f.sample(Read, 4096) >= Duration::from_millis(1))
            .count();
        assert!((60..=140).contains(&spikes), "{spikes} GC spikes in 100k");
    }

    #[test]
    fn seeded_and_deterministic() {
        let a: Vec<_> = {
            let mut m = EbsHop::new(42);
            (0..1000).map(|_| m.sample(Read, 4096)).collect()
        };
        let mut m = EbsHop::new(42);
        let b: Vec<_> = (0..1000).map(|_| m.sample(Read, 4096)).collect();
        assert_eq!(a, b);
        let mut other = EbsHop::new(43);
        assert_ne!(a[0], other.sample(Read, 4096));
        let mut f1 = Flash::new(9);
        let mut f2 = Flash::new(9);
        for _ in 0..1000 {
            assert_eq!(f1.sample(Write, 8192), f2.sample(Write, 8192));
        }
        let mut z = Fixed::default();
        assert_eq!(z.sample(Read, 1 << 30), Duration::ZERO);
        let mut boxed: Box<dyn LatencyModel> = Box::new(Fixed(Duration::from_millis(2)));
        assert_eq!(boxed.sample(Write, 1), Duration::from_millis(2));
    }
}
