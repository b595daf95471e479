//! The retry policy: how long a task waits before its next attempt.
//!
//! The delay is a pure function of the attempt number and a random source the
//! caller owns (seed it in tests). It is stored as the task's run-at time, not
//! slept in process, so a worker restart never forgets a pending retry.
//! In-process retries of a single I/O call (reconnecting to PostgreSQL or
//! Redis) use `backon` instead; see [`io_backoff`].

use std::time::Duration;

/// The random source of jitter; seed it (`Rng::with_seed`) for repeatable delays.
pub use fastrand::Rng;

/// Exponential backoff with jitter between attempts of one task.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Delay after the first failed attempt.
    pub initial: Duration,
    /// Growth factor per further failed attempt.
    pub multiplier: f64,
    /// Ceiling of the delay, before jitter.
    pub max: Duration,
    /// Fraction (0..=1) of the delay that is randomised: the delay lands in
    /// `[base * (1 - jitter), base]`, so retries of a batch that failed
    /// together spread out instead of arriving together.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max: Duration::from_secs(300),
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// The delay before the base (un-jittered) wait after `failed_attempt`
    /// (1-based) has failed.
    pub fn base_delay(&self, failed_attempt: u32) -> Duration {
        let exp = failed_attempt.saturating_sub(1).min(64) as i32;
        let secs = self.initial.as_secs_f64() * self.multiplier.max(1.0).powi(exp);
        let capped = secs.min(self.max.as_secs_f64());
        Duration::from_secs_f64(capped.max(0.0))
    }

    /// The bounds `delay` stays within for this attempt.
    pub fn bounds(&self, failed_attempt: u32) -> (Duration, Duration) {
        let base = self.base_delay(failed_attempt);
        (base.mul_f64(1.0 - self.jitter.clamp(0.0, 1.0)), base)
    }

    /// The wait after `failed_attempt` failed, jittered by `rng`.
    pub fn delay(&self, failed_attempt: u32, rng: &mut fastrand::Rng) -> Duration {
        let base = self.base_delay(failed_attempt);
        let jitter = self.jitter.clamp(0.0, 1.0);
        base.mul_f64(1.0 - jitter * rng.f64())
    }

    /// The wait when the backend asked for one (`Retry-After`): never sooner.
    pub fn delay_with_hint(
        &self,
        failed_attempt: u32,
        retry_after: Option<Duration>,
        rng: &mut fastrand::Rng,
    ) -> Duration {
        let d = self.delay(failed_attempt, rng);
        retry_after.map_or(d, |hint| d.max(hint))
    }
}

/// Backoff for retrying one I/O call in process (reconnects, a completion
/// write during a brief PostgreSQL outage).
pub fn io_backoff() -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(8)
        .with_jitter()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            max: Duration::from_secs(1),
            jitter: 0.5,
        }
    }

    #[test]
    fn grows_then_caps() {
        let p = policy();
        assert_eq!(p.base_delay(1), Duration::from_millis(100));
        assert_eq!(p.base_delay(2), Duration::from_millis(200));
        assert_eq!(p.base_delay(4), Duration::from_millis(800));
        assert_eq!(p.base_delay(5), Duration::from_secs(1));
        assert_eq!(p.base_delay(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_in_bounds_and_varies() {
        let p = policy();
        let mut rng = fastrand::Rng::with_seed(7);
        for attempt in 1..=12 {
            let (lo, hi) = p.bounds(attempt);
            let samples: Vec<_> = (0..500).map(|_| p.delay(attempt, &mut rng)).collect();
            assert!(
                samples.iter().all(|d| *d >= lo && *d <= hi),
                "attempt {attempt}"
            );
            let distinct: std::collections::HashSet<_> = samples.iter().collect();
            assert!(distinct.len() > 100, "jitter should spread delays");
        }
    }

    #[test]
    fn same_seed_same_delays() {
        let p = policy();
        let a: Vec<_> = {
            let mut r = fastrand::Rng::with_seed(42);
            (1..10).map(|n| p.delay(n, &mut r)).collect()
        };
        let b: Vec<_> = {
            let mut r = fastrand::Rng::with_seed(42);
            (1..10).map(|n| p.delay(n, &mut r)).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn retry_after_is_a_floor() {
        let p = policy();
        let mut rng = fastrand::Rng::with_seed(1);
        let d = p.delay_with_hint(1, Some(Duration::from_secs(30)), &mut rng);
        assert_eq!(d, Duration::from_secs(30));
        let d = p.delay_with_hint(1, Some(Duration::from_millis(1)), &mut rng);
        assert!(d >= Duration::from_millis(50));
    }
}
