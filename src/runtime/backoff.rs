//! Per-cluster exponential backoff on reconcile errors.
//!
//! # Guarantees
//! - The failure count of a cluster grows only when a reconcile of that cluster *ran*
//!   and failed, and resets only when one succeeds. Triggers (source changes, the
//!   live-state poll, resyncs) cannot touch it: they go through the scheduler, whose
//!   not-before hold keeps them from running the cluster before the backoff expires.
//!   This is the fix for controller-runtime's bug (kubernetes/kubernetes#136853), where
//!   event-driven enqueues bypassed the delay, failed again and drove the counter to
//!   its cap within seconds.
//! - Delays are `initial · factor^(failures-1)`, capped at `max`, plus up to `jitter`
//!   of themselves so many clusters failing together do not retry in lock-step.
//!
//! # Caveats
//! - A fixed spec still waits for the running backoff to expire (at most `max`).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use tokio::time::Instant;

/// Backoff parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffPolicy {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Upper bound.
    pub max: Duration,
    /// Growth per failure.
    pub factor: u32,
    /// Extra random fraction (0.0–1.0) added to each delay.
    pub jitter: f64,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(2),
            max: Duration::from_secs(300),
            factor: 2,
            jitter: 0.1,
        }
    }
}

impl BackoffPolicy {
    /// The delay after `failures` consecutive failures (≥ 1), before jitter.
    pub fn base_delay(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(31);
        let mult = self.factor.max(1).saturating_pow(exp);
        self.initial.saturating_mul(mult).min(self.max)
    }
}

#[derive(Debug, Clone, Copy)]
struct KeyState {
    failures: u32,
    until: Instant,
}

/// Backoff state of every key.
#[derive(Debug, Default)]
pub struct Backoff<K> {
    policy: BackoffPolicy,
    keys: HashMap<K, KeyState>,
}

impl<K: Eq + Hash + Clone> Backoff<K> {
    /// Empty state under `policy`.
    pub fn new(policy: BackoffPolicy) -> Self {
        Self {
            policy,
            keys: HashMap::new(),
        }
    }

    /// Record a failed reconcile of `key` finishing at `now`; returns until when it must
    /// not run again.
    pub fn on_failure(&mut self, key: &K, now: Instant) -> Instant {
        let failures = self.failures(key) + 1;
        let base = self.policy.base_delay(failures);
        let until = now + base + self.jitter(key, failures, base);
        self.keys.insert(key.clone(), KeyState { failures, until });
        until
    }

    /// Hold `key` (in backoff) at least until `at`; returns the resulting hold.
    pub fn hold_until(&mut self, key: &K, at: Instant) -> Instant {
        let state = self.keys.entry(key.clone()).or_insert(KeyState {
            failures: 0,
            until: at,
        });
        state.until = state.until.max(at);
        state.until
    }

    /// Record a successful reconcile: the backoff is over.
    pub fn on_success(&mut self, key: &K) {
        self.keys.remove(key);
    }

    /// Consecutive failures of `key`.
    pub fn failures(&self, key: &K) -> u32 {
        self.keys.get(key).map_or(0, |s| s.failures)
    }

    /// Until when `key` is held back, if it is in backoff.
    pub fn until(&self, key: &K) -> Option<Instant> {
        self.keys.get(key).map(|s| s.until)
    }

    /// Forget `key` (its cluster is gone).
    pub fn forget(&mut self, key: &K) {
        self.keys.remove(key);
    }

    fn jitter(&self, key: &K, failures: u32, base: Duration) -> Duration {
        if self.policy.jitter <= 0.0 {
            return Duration::ZERO;
        }
        // Deterministic per (key, attempt): reproducible in tests, spread across keys.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        failures.hash(&mut h);
        let unit = (h.finish() % 1_000) as f64 / 1_000.0;
        base.mul_f64(self.policy.jitter.min(1.0) * unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap() {
        let p = BackoffPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
            factor: 2,
            jitter: 0.0,
        };
        let d: Vec<u64> = (1..=6).map(|f| p.base_delay(f).as_secs()).collect();
        assert_eq!(d, vec![1, 2, 4, 8, 10, 10]);
        assert_eq!(p.base_delay(10_000), Duration::from_secs(10), "no overflow");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_count_up_reset_on_success_and_jitter_stays_bounded() {
        let mut b = Backoff::new(BackoffPolicy::default());
        let now = Instant::now();
        let u1 = b.on_failure(&"a", now);
        let u2 = b.on_failure(&"a", now);
        assert_eq!(b.failures(&"a"), 2);
        assert!(u1 >= now + Duration::from_secs(2) && u1 <= now + Duration::from_millis(2200));
        assert!(u2 >= now + Duration::from_secs(4) && u2 <= now + Duration::from_millis(4400));
        assert_eq!(b.until(&"b"), None);
        b.on_success(&"a");
        assert_eq!(b.failures(&"a"), 0);
        assert_eq!(b.until(&"a"), None);
    }
}
