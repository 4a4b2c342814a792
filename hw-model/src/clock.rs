//! Time, injected. Model code never reads a clock itself: callers pass `now`
//! as a `Duration` since an epoch of their choosing. The clocks here are the
//! only place that look at the wall clock, and only [`ScaledClock`] does.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Something that says what time it is (model time).
pub trait Clock: Send + Sync {
    fn now(&self) -> Duration;
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ClockError {
    #[error("clock factor must be a finite number above 0, got {0}")]
    Factor(f64),
}

/// Wall-clock time scaled by `factor`: with factor 100, one wall second is
/// 100 model seconds, so a burst bucket that drains in 2,000 s drains in 20.
#[derive(Clone, Debug)]
pub struct ScaledClock {
    pub epoch: Instant,
    pub factor: f64,
}

impl ScaledClock {
    /// # Panics
    /// If `factor` is not finite and above 0 (use [`ScaledClock::try_new`] for
    /// a factor that comes from a user).
    pub fn new(factor: f64) -> Self {
        Self::try_new(factor).expect("ScaledClock factor")
    }

    pub fn try_new(factor: f64) -> Result<Self, ClockError> {
        if !(factor.is_finite() && factor > 0.0) {
            return Err(ClockError::Factor(factor));
        }
        Ok(ScaledClock {
            epoch: Instant::now(),
            factor,
        })
    }

    /// Model time now.
    pub fn model_now(&self) -> Duration {
        self.wall_to_model(self.epoch.elapsed())
    }

    /// Model time elapsed for a wall-clock span since the epoch.
    pub fn wall_to_model(&self, wall: Duration) -> Duration {
        Duration::try_from_secs_f64(wall.as_secs_f64() * self.factor).unwrap_or(Duration::MAX)
    }

    /// The wall-clock instant at which model time reaches `model`. Times too
    /// far away to represent (e.g. `Duration::MAX`, "until cleared") come back
    /// as about a century from the epoch: a sleeper must be woken by something
    /// else well before then.
    pub fn wall_instant(&self, model: Duration) -> Instant {
        const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
        let wall = Duration::try_from_secs_f64(model.as_secs_f64() / self.factor)
            .unwrap_or(FAR)
            .min(FAR);
        self.epoch
            .checked_add(wall)
            .unwrap_or_else(|| self.epoch + Duration::from_secs(365 * 24 * 3600))
    }
}

impl Clock for ScaledClock {
    fn now(&self) -> Duration {
        self.model_now()
    }
}

/// A clock tests move by hand. Nanoseconds in a u64 cover 584 years.
#[derive(Debug, Default)]
pub struct ManualClock {
    nanos: AtomicU64,
}

impl ManualClock {
    pub fn new(start: Duration) -> Self {
        let c = ManualClock::default();
        c.set(start);
        c
    }
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        // fetch_update so concurrent advances add up and saturate rather than wrap.
        let _ = self
            .nanos
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_add(by))
            });
    }
    pub fn set(&self, to: Duration) {
        let to = u64::try_from(to.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.store(to, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_by_hand() {
        let c = ManualClock::default();
        assert_eq!(c.now(), Duration::ZERO);
        c.advance(Duration::from_millis(1500));
        assert_eq!(c.now(), Duration::from_millis(1500));
        c.set(Duration::from_secs(10));
        assert_eq!(c.now(), Duration::from_secs(10));
    }

    #[test]
    fn scaled_clock_maps_both_ways() {
        let c = ScaledClock::new(100.0);
        assert_eq!(
            c.wall_to_model(Duration::from_secs(20)),
            Duration::from_secs(2000)
        );
        let at = c.wall_instant(Duration::from_secs(2000));
        assert_eq!(at - c.epoch, Duration::from_secs(20));
        // "Until cleared" must not panic.
        let _ = c.wall_instant(Duration::MAX);
        assert!(c.model_now() < Duration::from_secs(3600));
        assert_eq!(
            ScaledClock::try_new(0.0).unwrap_err(),
            ClockError::Factor(0.0)
        );
        assert!(ScaledClock::try_new(f64::INFINITY).is_err());
    }
}
