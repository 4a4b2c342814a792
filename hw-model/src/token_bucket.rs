//! Token buckets with Firecracker's semantics and config shape:
//! `{"bandwidth": {"size", "one_time_burst", "refill_time"}, "ops": {...}}`,
//! refill_time in milliseconds; `size` tokens refill linearly over refill_time;
//! one_time_burst is an extra initial budget that is consumed first and never refills.
//!
//! As in Firecracker (`rate_limiter` crate, `TokenBucket::reduce`):
//! - a bucket starts full (`size`) with `one_time_burst` on top;
//! - a request takes from one_time_burst first, the rest from the budget;
//! - the budget refills at `size / refill_time` and never above `size`;
//! - a request larger than `size` is not refused forever: it drives the bucket
//!   into debt ("OverConsumption") which later refill pays back, so the long-run
//!   rate still holds.
//!
//! Deliberate differences, because this is a model with exact time rather than
//! a timerfd-driven limiter:
//! - arithmetic is exact (integers scaled by the refill period), so no
//!   rounding lets extra tokens through and `Err(when)` is the exact instant;
//! - a refused request takes nothing (Firecracker drops the part of
//!   one_time_burst it had already used);
//! - an oversized request waits until the bucket is full, then goes and leaves
//!   debt (Firecracker lets it go whenever the limiter is not blocked, and
//!   forgets the debt when its timer fires). Waiting for a full bucket is the
//!   least a request of that size can wait without passing more than
//!   `size + one_time_burst` above the refill in any window.
use std::time::Duration;

const NANOS_PER_MILLI: u128 = 1_000_000;
const NANOS_PER_SEC: u128 = 1_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BucketConfig {
    pub size: u64,
    #[serde(default)]
    pub one_time_burst: u64,
    /// Milliseconds to refill `size` tokens from empty.
    pub refill_time: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RateLimiterConfig {
    pub bandwidth: Option<BucketConfig>,
    pub ops: Option<BucketConfig>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("token bucket `size` must be above 0, got 0")]
    ZeroSize,
    #[error("token bucket `refill_time` must be above 0 ms, got 0")]
    ZeroRefillTime,
    #[error("token bucket too large: `size` {size} over a refill of {refill_ns} ns overflows the model's arithmetic")]
    TooLarge { size: u64, refill_ns: u128 },
    #[error("rate limiter `{bucket}`: {source}")]
    InBucket {
        bucket: &'static str,
        source: Box<ConfigError>,
    },
}

/// One token bucket. Internally every quantity is scaled by `den` (the refill
/// period in ns), so `num` scaled tokens arrive per nanosecond and refill is an
/// exact integer addition.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenBucket {
    config: BucketConfig,
    /// Scaled tokens added per nanosecond (= tokens per refill period).
    num: i128,
    /// Scale: nanoseconds in one refill period.
    den: i128,
    /// size * den.
    capacity: i128,
    /// Scaled budget; negative while paying off an oversized request.
    budget: i128,
    /// What is left of one_time_burst (unscaled; never refills).
    one_time_burst: u64,
    last_update: Duration,
}

impl TokenBucket {
    pub fn new(config: BucketConfig, now: Duration) -> Result<Self, ConfigError> {
        if config.size == 0 {
            return Err(ConfigError::ZeroSize);
        }
        if config.refill_time == 0 {
            return Err(ConfigError::ZeroRefillTime);
        }
        let den = u128::from(config.refill_time) * NANOS_PER_MILLI;
        Self::build(config, config.size, den, now)
    }

    /// A bucket of `capacity` tokens refilled at `tokens` per `per` (for rates
    /// that are not a whole number of tokens per millisecond, e.g. a gp2
    /// credit bucket of 5.4 M I/Os refilled at 300 per second). Starts full;
    /// no one_time_burst.
    pub fn with_rate(
        capacity: u64,
        tokens: u64,
        per: Duration,
        now: Duration,
    ) -> Result<Self, ConfigError> {
        if capacity == 0 {
            return Err(ConfigError::ZeroSize);
        }
        if tokens == 0 || per.is_zero() {
            return Err(ConfigError::ZeroRefillTime);
        }
        // Refill time for `capacity`, as Firecracker's config would state it
        // (rounded to ms; informational only, the rate itself stays exact).
        let refill_ms = (u128::from(capacity) * per.as_millis()) / u128::from(tokens);
        let config = BucketConfig {
            size: capacity,
            one_time_burst: 0,
            refill_time: u64::try_from(refill_ms.max(1)).unwrap_or(u64::MAX),
        };
        Self::build(config, tokens, per.as_nanos(), now)
    }

    fn build(
        config: BucketConfig,
        num: u64,
        den: u128,
        now: Duration,
    ) -> Result<Self, ConfigError> {
        // Keep a wide margin below i128::MAX so debt and refill sums cannot overflow.
        let limit = i128::MAX as u128 / 8;
        let too_large = ConfigError::TooLarge {
            size: config.size,
            refill_ns: den,
        };
        let capacity = u128::from(config.size)
            .checked_mul(den)
            .filter(|c| *c <= limit)
            .ok_or(too_large)?;
        let den = i128::try_from(den).expect("den below limit");
        let capacity = capacity as i128;
        Ok(TokenBucket {
            config,
            num: i128::from(num),
            den,
            capacity,
            budget: capacity,
            one_time_burst: config.one_time_burst,
            last_update: now,
        })
    }

    pub fn config(&self) -> BucketConfig {
        self.config
    }

    /// Refill for the time since the last update. Time that goes backwards is
    /// ignored rather than trusted.
    fn refill(&mut self, now: Duration) {
        if now <= self.last_update {
            return;
        }
        let delta = i128::try_from((now - self.last_update).as_nanos()).unwrap_or(i128::MAX);
        self.budget = self
            .budget
            .saturating_add(delta.saturating_mul(self.num))
            .min(self.capacity);
        self.last_update = now;
    }

    /// Budget (scaled) a request of `tokens` needs before it may go, after
    /// one_time_burst, and the part it takes from the budget.
    fn needs(&self, tokens: u64) -> (i128, i128) {
        let rest = tokens.saturating_sub(self.one_time_burst);
        let rest_scaled = i128::from(rest) * self.den;
        // An oversized request only waits for a full bucket (see module doc).
        (rest_scaled.min(self.capacity), rest_scaled)
    }

    /// None if `tokens` can be taken at `now`, else the earliest model time
    /// they can. Takes nothing.
    pub fn ready_at(&mut self, tokens: u64, now: Duration) -> Option<Duration> {
        self.refill(now);
        let (need, _) = self.needs(tokens);
        if tokens == 0 || self.budget >= need {
            return None;
        }
        let missing = need - self.budget;
        // Ceil so that at the returned time the budget really is there.
        let wait_ns = ((missing + self.num - 1) / self.num).max(1);
        let base = now.max(self.last_update);
        Some(add_nanos(base, wait_ns))
    }

    /// Takes `tokens` if available now; otherwise takes nothing and returns
    /// Err(when): the earliest model time at which they will be. A request
    /// larger than `size` is allowed to drive the bucket into debt the way
    /// Firecracker does (it must never wedge forever).
    pub fn try_take(&mut self, tokens: u64, now: Duration) -> Result<(), Duration> {
        match self.ready_at(tokens, now) {
            Some(when) => Err(when),
            None => {
                self.take_unchecked(tokens);
                Ok(())
            }
        }
    }

    /// Takes without checking (after `ready_at` said yes, e.g. across the two
    /// buckets of a rate limiter).
    fn take_unchecked(&mut self, tokens: u64) {
        let (_, rest_scaled) = self.needs(tokens);
        self.one_time_burst = self.one_time_burst.saturating_sub(tokens);
        self.budget -= rest_scaled;
    }

    /// Tokens available now (including what is left of one_time_burst); 0
    /// while in debt.
    pub fn available(&mut self, now: Duration) -> u64 {
        self.refill(now);
        let budget = u64::try_from(self.budget.max(0) / self.den).unwrap_or(u64::MAX);
        budget.saturating_add(self.one_time_burst)
    }

    /// Budget as a fraction of `size` in [0, 1] (one_time_burst not counted):
    /// what CloudWatch's BurstBalance reports for a credit bucket.
    pub fn fill_fraction(&mut self, now: Duration) -> f64 {
        self.refill(now);
        (self.budget.max(0) as f64 / self.capacity as f64).clamp(0.0, 1.0)
    }

    /// Gives tokens back (an operation that was taken for and then not done),
    /// never above `size`; Firecracker's `replenish`.
    pub fn replenish(&mut self, tokens: u64) {
        self.budget = self
            .budget
            .saturating_add(i128::from(tokens) * self.den)
            .min(self.capacity);
    }

    /// Empties the budget and one_time_burst (tests, and "start with an empty
    /// credit bucket" scenarios).
    pub fn drain(&mut self, now: Duration) {
        self.refill(now);
        self.budget = 0;
        self.one_time_burst = 0;
    }
}

fn add_nanos(base: Duration, nanos: i128) -> Duration {
    let nanos = u128::try_from(nanos).unwrap_or(0);
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    let extra = Duration::new(secs, (nanos % NANOS_PER_SEC) as u32);
    base.checked_add(extra).unwrap_or(Duration::MAX)
}

/// Firecracker's pair of buckets: bytes and operations.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimiter {
    pub bandwidth: Option<TokenBucket>,
    pub ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// As in Firecracker, a bucket whose `size` or `refill_time` is 0 is
    /// disabled rather than an error, so Firecracker configs carry over as is.
    pub fn new(config: RateLimiterConfig, now: Duration) -> Result<Self, ConfigError> {
        let make = |c: Option<BucketConfig>, bucket: &'static str| match c {
            Some(c) if c.size > 0 && c.refill_time > 0 => TokenBucket::new(c, now)
                .map(Some)
                .map_err(|e| ConfigError::InBucket {
                    bucket,
                    source: Box::new(e),
                }),
            _ => Ok(None),
        };
        Ok(RateLimiter {
            bandwidth: make(config.bandwidth, "bandwidth")?,
            ops: make(config.ops, "ops")?,
        })
    }

    /// No limit at all (both buckets absent).
    pub fn unlimited() -> Self {
        RateLimiter {
            bandwidth: None,
            ops: None,
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// One operation of `bytes`: both buckets or neither.
    pub fn try_take(&mut self, bytes: u64, now: Duration) -> Result<(), Duration> {
        let b = self.bandwidth.as_mut().and_then(|b| b.ready_at(bytes, now));
        let o = self.ops.as_mut().and_then(|o| o.ready_at(1, now));
        match (b, o) {
            (None, None) => {
                if let Some(b) = self.bandwidth.as_mut() {
                    b.take_unchecked(bytes);
                }
                if let Some(o) = self.ops.as_mut() {
                    o.take_unchecked(1);
                }
                Ok(())
            }
            (b, o) => Err(b.max(o).expect("one is Some")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    fn cfg(size: u64, otb: u64, refill_time: u64) -> BucketConfig {
        BucketConfig {
            size,
            one_time_burst: otb,
            refill_time,
        }
    }

    #[test]
    fn starts_full_and_refills_linearly() {
        let mut b = TokenBucket::new(cfg(1000, 0, 1000), Duration::ZERO).unwrap();
        assert_eq!(b.available(Duration::ZERO), 1000);
        b.try_take(1000, Duration::ZERO).unwrap();
        assert_eq!(b.try_take(1, Duration::ZERO), Err(MS));
        assert_eq!(b.available(MS * 250), 250);
        // 500 more arrive 500 ms after the take.
        assert_eq!(b.try_take(500, MS * 250), Err(MS * 500));
        b.try_take(500, MS * 500).unwrap();
        // Never above size.
        assert_eq!(b.available(Duration::from_secs(100)), 1000);
    }

    #[test]
    fn one_time_burst_first_and_never_refilled() {
        let mut b = TokenBucket::new(cfg(100, 50, 1000), Duration::ZERO).unwrap();
        assert_eq!(b.available(Duration::ZERO), 150);
        b.try_take(30, Duration::ZERO).unwrap();
        assert_eq!(b.available(Duration::ZERO), 120);
        b.try_take(120, Duration::ZERO).unwrap();
        assert_eq!(b.available(Duration::from_secs(10)), 100);
    }

    #[test]
    fn refused_request_takes_nothing() {
        let mut b = TokenBucket::new(cfg(100, 50, 1000), Duration::ZERO).unwrap();
        b.try_take(100, Duration::ZERO).unwrap();
        // 50 of burst left; 80 wanted: 30 must come from the budget.
        assert_eq!(b.try_take(80, Duration::ZERO), Err(MS * 300));
        assert_eq!(b.available(Duration::ZERO), 50);
        b.try_take(80, MS * 300).unwrap();
    }

    #[test]
    fn oversized_request_goes_when_full_and_leaves_debt() {
        let mut b = TokenBucket::new(cfg(100, 0, 1000), Duration::ZERO).unwrap();
        b.try_take(50, Duration::ZERO).unwrap();
        // 250 > size: waits for a full bucket (500 ms), not for 250 tokens.
        assert_eq!(b.try_take(250, Duration::ZERO), Err(MS * 500));
        b.try_take(250, MS * 500).unwrap();
        // Debt of 150: one token needs 1510 ms from 500 ms.
        assert_eq!(b.available(MS * 1000), 0);
        assert_eq!(b.try_take(1, MS * 1000), Err(MS * 2010));
    }

    #[test]
    fn zero_tokens_always_pass() {
        let mut b = TokenBucket::new(cfg(1, 0, 1), Duration::ZERO).unwrap();
        b.try_take(1, Duration::ZERO).unwrap();
        b.try_take(0, Duration::ZERO).unwrap();
    }

    #[test]
    fn config_errors_name_the_field() {
        let e = TokenBucket::new(cfg(0, 0, 10), Duration::ZERO).unwrap_err();
        assert!(e.to_string().contains("`size`"), "{e}");
        let e = TokenBucket::new(cfg(10, 0, 0), Duration::ZERO).unwrap_err();
        assert!(e.to_string().contains("`refill_time`"), "{e}");
        let e = TokenBucket::new(cfg(u64::MAX, 0, u64::MAX), Duration::ZERO).unwrap_err();
        assert!(matches!(e, ConfigError::TooLarge { .. }));
        let e = RateLimiter::new(
            RateLimiterConfig {
                bandwidth: Some(cfg(u64::MAX, 0, u64::MAX)),
                ops: None,
            },
            Duration::ZERO,
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("rate limiter `bandwidth`"), "{e}");
    }

    #[test]
    fn firecracker_json_shape() {
        let c: RateLimiterConfig = serde_json::from_str(
            r#"{"bandwidth": {"size": 1048576, "refill_time": 100},
                "ops": {"size": 100, "one_time_burst": 50, "refill_time": 1000}}"#,
        )
        .unwrap();
        assert_eq!(c.bandwidth, Some(cfg(1 << 20, 0, 100)));
        assert_eq!(c.ops, Some(cfg(100, 50, 1000)));
        // Firecracker: size 0 disables the bucket.
        let r = RateLimiter::new(
            RateLimiterConfig {
                bandwidth: Some(cfg(0, 0, 100)),
                ops: None,
            },
            Duration::ZERO,
        )
        .unwrap();
        assert!(r.is_unlimited());
    }

    #[test]
    fn rate_limiter_takes_both_or_neither() {
        let mut r = RateLimiter::new(
            RateLimiterConfig {
                bandwidth: Some(cfg(1000, 0, 1000)),
                ops: Some(cfg(2, 0, 1000)),
            },
            Duration::ZERO,
        )
        .unwrap();
        r.try_take(100, Duration::ZERO).unwrap();
        r.try_take(100, Duration::ZERO).unwrap();
        // ops empty: refused, and bandwidth keeps its 800.
        assert_eq!(r.try_take(100, Duration::ZERO), Err(MS * 500));
        assert_eq!(r.bandwidth.as_mut().unwrap().available(Duration::ZERO), 800);
        // Asked for the later of the two: ops (1 at 500 ms), not bandwidth
        // (full again at 200 ms).
        assert_eq!(r.try_take(1000, MS * 100), Err(MS * 500));
        r.try_take(1000, MS * 500).unwrap();
    }

    #[test]
    fn with_rate_is_exact() {
        // gp2 100 GiB: 5.4 M credits at 300/s.
        let mut b =
            TokenBucket::with_rate(5_400_000, 300, Duration::from_secs(1), Duration::ZERO).unwrap();
        assert_eq!(b.config().refill_time, 18_000_000);
        b.drain(Duration::ZERO);
        assert_eq!(b.available(Duration::from_secs(1)), 300);
        assert_eq!(
            b.try_take(1, Duration::from_secs(1) + Duration::from_nanos(1)),
            Ok(())
        );
    }

    fn requests() -> impl Strategy<Value = (BucketConfig, Vec<(u64, u64)>)> {
        (1u64..10_000, 0u64..10_000, 1u64..5_000).prop_flat_map(|(size, otb, refill)| {
            (
                Just(cfg(size, otb, refill)),
                // (time step in µs, tokens asked), tokens up to 3× size.
                prop::collection::vec((0u64..2_000_000, 0..=size * 3), 1..200),
            )
        })
    }

    proptest! {
        /// No window passes more than size + one_time_burst above the refill:
        /// granted(t) <= otb + size + size * t / refill_time, exactly, for
        /// requests no larger than `size`; an oversized request may add its
        /// excess over `size` once (the debt it leaves is repaid by refill).
        #[test]
        fn never_more_than_burst_above_refill((c, reqs) in requests()) {
            let mut b = TokenBucket::new(c, Duration::ZERO).unwrap();
            let refill_ns = u128::from(c.refill_time) * NANOS_PER_MILLI;
            let (mut t, mut granted, mut max_excess) = (Duration::ZERO, 0u128, 0u128);
            for (step, tokens) in reqs {
                t += Duration::from_micros(step);
                if b.try_take(tokens, t).is_ok() {
                    granted += u128::from(tokens);
                    max_excess = max_excess.max(u128::from(tokens.saturating_sub(c.size)));
                }
                let allowed = (u128::from(c.one_time_burst + c.size) + max_excess) * refill_ns
                    + u128::from(c.size) * t.as_nanos();
                prop_assert!(granted * refill_ns <= allowed,
                    "granted {granted} by {t:?} with {c:?}");
            }
        }

        /// Never wedges: whatever was asked, at the time Err names it goes.
        #[test]
        fn err_time_is_honoured((c, reqs) in requests()) {
            let mut b = TokenBucket::new(c, Duration::ZERO).unwrap();
            let mut t = Duration::ZERO;
            for (step, tokens) in reqs {
                t += Duration::from_micros(step);
                if let Err(when) = b.try_take(tokens, t) {
                    prop_assert!(when > t);
                    prop_assert_eq!(b.try_take(tokens, when), Ok(()));
                    t = when;
                }
            }
        }
    }
}
