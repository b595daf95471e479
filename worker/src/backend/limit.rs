//! Flow control for one backend: an adaptive concurrency limit and a
//! circuit breaker.
//!
//! The limit grows by about one per limit's worth of successes (additive
//! increase) and halves on overload: 429, 5xx, timeouts (multiplicative
//! decrease), so a struggling server gets less load instead of a retry
//! storm. It never exceeds the configured maximum nor drops below one.
//!
//! The breaker opens after `threshold` consecutive overload failures: the
//! worker then stops pulling the backend's queues (tasks stay queued, no
//! attempt is burned) for the cool-down, then lets one probe through. A
//! probe that succeeds closes it; one that fails opens it again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

pub struct Limiter {
    max: usize,
    state: Mutex<LimitState>,
    freed: Notify,
}

struct LimitState {
    limit: f64,
    in_flight: usize,
}

/// One admitted call; dropping it frees the place.
pub struct Permit<'a> {
    limiter: &'a Limiter,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.limiter.state.lock().expect("lock").in_flight -= 1;
        self.limiter.freed.notify_waiters();
    }
}

impl Limiter {
    pub fn new(max: usize) -> Limiter {
        let max = max.max(1);
        Limiter {
            max,
            state: Mutex::new(LimitState {
                limit: max as f64,
                in_flight: 0,
            }),
            freed: Notify::new(),
        }
    }

    /// Waits for a place under the current limit.
    pub async fn acquire(&self) -> Permit<'_> {
        loop {
            // Register for the wake-up before checking, so a place freed in
            // between is not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut s = self.state.lock().expect("lock");
                if s.in_flight < s.limit.floor().max(1.0) as usize {
                    s.in_flight += 1;
                    return Permit { limiter: self };
                }
            }
            freed.await;
        }
    }

    pub fn on_success(&self) {
        let mut s = self.state.lock().expect("lock");
        s.limit = (s.limit + 1.0 / s.limit).min(self.max as f64);
        drop(s);
        self.freed.notify_waiters();
    }

    pub fn on_overload(&self) {
        let mut s = self.state.lock().expect("lock");
        s.limit = (s.limit / 2.0).max(1.0);
    }

    /// The current limit (whole calls).
    pub fn limit(&self) -> usize {
        self.state.lock().expect("lock").limit.floor() as usize
    }
}

/// What the fetch loop may take from a backend's queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pull {
    /// As many as there are free slots.
    Any,
    /// Exactly one task, as the half-open breaker's probe.
    Probe,
    /// Nothing: the breaker is open.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// A probe has been let through and not yet answered. If none has
    /// answered by `reprobe` (a probe can end without a call: a cached
    /// result, a cancel, a panic), another is let through, so the
    /// breaker never waits on a probe that will not answer. The price: a
    /// backend slower than the cool-down sees several probes at once (one
    /// per cool-down of its call); their failures are not charged.
    HalfOpen {
        reprobe: Instant,
    },
}

/// A probe that has not answered within this long (or the cool-down, if
/// longer) no longer holds the next one back.
const REPROBE_AFTER: Duration = Duration::from_secs(1);

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    /// A breaker that never opens (for the simulated backend).
    pub fn disabled() -> Breaker {
        Breaker::new(u32::MAX, Duration::ZERO)
    }

    pub fn state(&self) -> BreakerState {
        match *self.state.lock().expect("lock") {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Asked by the fetch loop before popping the backend's queues.
    pub fn pull(&self) -> Pull {
        let mut s = self.state.lock().expect("lock");
        match *s {
            State::Closed { .. } => Pull::Any,
            State::Open { until: due } | State::HalfOpen { reprobe: due }
                if Instant::now() >= due =>
            {
                *s = State::HalfOpen {
                    reprobe: Instant::now() + self.cooldown.max(REPROBE_AFTER),
                };
                Pull::Probe
            }
            State::Open { .. } | State::HalfOpen { .. } => Pull::None,
        }
    }

    /// The probe's turn was granted but it sent nothing (no task, only
    /// stale ids, or a failed claim): the next fetch may probe at once.
    pub fn probe_unused(&self) {
        let mut s = self.state.lock().expect("lock");
        if matches!(*s, State::HalfOpen { .. }) {
            *s = State::Open {
                until: Instant::now(),
            };
        }
    }

    pub fn on_success(&self) {
        *self.state.lock().expect("lock") = State::Closed { failures: 0 };
    }

    /// Records an overload failure. Returns true when the failure belongs
    /// to an outage (the breaker was open or half-open, or this failure
    /// opened it), in which case the task should not be charged.
    pub fn on_failure(&self) -> bool {
        let mut s = self.state.lock().expect("lock");
        let open = State::Open {
            until: Instant::now() + self.cooldown,
        };
        match *s {
            State::Closed { failures } if failures.saturating_add(1) >= self.threshold => {
                *s = open;
                tracing::warn!(
                    cooldown_ms = self.cooldown.as_millis() as u64,
                    "circuit breaker opened"
                );
                true
            }
            State::Closed { failures } => {
                *s = State::Closed {
                    failures: failures + 1,
                };
                false
            }
            State::HalfOpen { .. } | State::Open { .. } => {
                *s = open;
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A probe that never answers (it ended without a call) holds the
    /// breaker half-open for a while, not for good.
    #[test]
    fn a_probe_that_never_answers_is_followed_by_another_after_a_cooldown() {
        let cooldown = Duration::from_millis(50);
        let b = Breaker::new(1, cooldown);
        assert!(b.on_failure(), "the first failure opens it");
        assert_eq!(b.pull(), Pull::None);
        std::thread::sleep(cooldown + Duration::from_millis(10));
        assert_eq!(b.pull(), Pull::Probe);
        assert_eq!(b.pull(), Pull::None, "one probe at a time");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        std::thread::sleep(REPROBE_AFTER + Duration::from_millis(10));
        assert_eq!(b.pull(), Pull::Probe, "the silent probe gave way");
        b.on_success();
        assert_eq!(b.pull(), Pull::Any);
    }

    #[test]
    fn aimd_halves_on_overload_and_creeps_back() {
        let l = Limiter::new(16);
        assert_eq!(l.limit(), 16);
        l.on_overload();
        l.on_overload();
        assert_eq!(l.limit(), 4);
        for _ in 0..4 {
            l.on_success();
        }
        assert_eq!(l.limit(), 4, "one step per limit's worth of successes");
        for _ in 0..200 {
            l.on_success();
        }
        assert_eq!(l.limit(), 16, "never above the maximum");
        for _ in 0..20 {
            l.on_overload();
        }
        assert_eq!(l.limit(), 1, "never below one");
    }

    #[tokio::test]
    async fn the_limit_holds_calls_back() {
        let l = Limiter::new(2);
        let a = l.acquire().await;
        let _b = l.acquire().await;
        let third = tokio::time::timeout(Duration::from_millis(50), l.acquire()).await;
        assert!(third.is_err(), "a third call waits");
        drop(a);
        let third = tokio::time::timeout(Duration::from_millis(50), l.acquire()).await;
        assert!(third.is_ok(), "and runs once a place frees");
    }

    #[test]
    fn breaker_opens_probes_and_closes() {
        let b = Breaker::new(3, Duration::from_millis(0));
        assert!(!b.on_failure());
        assert!(!b.on_failure());
        assert!(
            b.on_failure(),
            "the third failure opens it and is not charged"
        );
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.pull(), Pull::Probe, "cool-down over: one probe");
        assert_eq!(b.pull(), Pull::None, "only one");
        assert!(b.on_failure(), "a failed probe is not charged");
        assert_eq!(b.pull(), Pull::Probe);
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.pull(), Pull::Any);
    }

    #[test]
    fn an_open_breaker_waits_out_its_cooldown() {
        let b = Breaker::new(1, Duration::from_secs(60));
        assert!(b.on_failure());
        assert_eq!(b.pull(), Pull::None);
    }
}
