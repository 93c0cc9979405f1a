//! Logging: the `tracing` subscriber and per-key rate limiting.
//!
//! Owns: the process's subscriber set-up ([`init`], level from `RUST_LOG`)
//! and [`RateLimitedLog`], which keeps per-executor messages to one per
//! interval (the reference design logs each executor at most once per 5 s)
//! and counts what it held back.
//!
//! Invariant: a `RateLimitedLog` forgets keys idle for longer than its
//! interval, so its memory follows the set of keys logged recently, not
//! every key ever seen.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;
use tracing_subscriber::EnvFilter;

/// Filter used when `RUST_LOG` is unset or invalid.
pub const DEFAULT_FILTER: &str = "info";

/// Interval of [`RateLimitedLog::per_executor`].
pub const PER_EXECUTOR_INTERVAL: Duration = Duration::from_secs(5);

/// Keys kept before the first sweep of idle ones.
const FIRST_SWEEP_AT: usize = 1024;

/// Installs a `fmt` subscriber filtered by `RUST_LOG` (an `EnvFilter`
/// directive such as `info,executor_registry=debug`), defaulting to
/// [`DEFAULT_FILTER`]. An invalid `RUST_LOG` falls back to the default and
/// says so. A second call (or a subscriber set by someone else) leaves the
/// first in place.
pub fn init() {
    let (filter, invalid) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(e) => {
            let invalid = std::env::var("RUST_LOG").ok().map(|value| (value, e));
            (EnvFilter::new(DEFAULT_FILTER), invalid)
        }
    };
    let installed = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .try_init()
        .is_ok();
    if let (true, Some((value, error))) = (installed, invalid) {
        tracing::warn!(rust_log = %value, %error, "invalid RUST_LOG; logging at {DEFAULT_FILTER}");
    }
}

/// The last message allowed for a key, and how many were held back since.
#[derive(Debug, Clone, Copy)]
struct Slot {
    at: Instant,
    suppressed: u64,
}

/// Lets through at most one message per key per interval.
///
/// ```
/// use executor_registry::logging::RateLimitedLog;
///
/// let limit = RateLimitedLog::per_executor();
/// let id = "7f3a";
/// if let Some(suppressed) = limit.check(id) {
///     tracing::warn!(id, suppressed, "heartbeat for an expired executor");
/// }
/// assert_eq!(limit.check(id), None);
/// ```
#[derive(Debug)]
pub struct RateLimitedLog {
    interval: Duration,
    slots: DashMap<Box<str>, Slot>,
    /// Inserts since the last sweep, and the count that triggers the next:
    /// kept apart from the map because `DashMap::len` locks every shard.
    inserts: AtomicUsize,
    sweep_at: AtomicUsize,
}

impl RateLimitedLog {
    /// At most one message per key per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            slots: DashMap::new(),
            inserts: AtomicUsize::new(0),
            sweep_at: AtomicUsize::new(FIRST_SWEEP_AT),
        }
    }

    /// One message per executor per [`PER_EXECUTOR_INTERVAL`].
    pub fn per_executor() -> Self {
        Self::new(PER_EXECUTOR_INTERVAL)
    }

    /// `Some(n)` if a message for `key` may be logged now, `n` being how many
    /// were held back since the last one let through; `None` to hold this
    /// one back.
    pub fn check(&self, key: &str) -> Option<u64> {
        self.check_at(key, Instant::now())
    }

    /// [`check`](Self::check) at a given instant.
    fn check_at(&self, key: &str, now: Instant) -> Option<u64> {
        {
            // Scoped so the shard lock is released before any insert.
            if let Some(mut slot) = self.slots.get_mut(key) {
                if now.saturating_duration_since(slot.at) < self.interval {
                    slot.suppressed += 1;
                    return None;
                }
                let suppressed = slot.suppressed;
                *slot = Slot {
                    at: now,
                    suppressed: 0,
                };
                return Some(suppressed);
            }
        }
        self.slots.insert(
            key.into(),
            Slot {
                at: now,
                suppressed: 0,
            },
        );
        if self.inserts.fetch_add(1, Ordering::Relaxed) + 1 >= self.sweep_at.load(Ordering::Relaxed)
        {
            self.sweep(now);
        }
        Some(0)
    }

    /// Forgets keys idle for longer than the interval. Runs by itself as
    /// keys accumulate.
    fn sweep(&self, now: Instant) {
        self.inserts.store(0, Ordering::Relaxed);
        // A key dropped with suppressed messages loses only that count.
        self.slots
            .retain(|_, slot| now.saturating_duration_since(slot.at) < self.interval);
        let kept = self.slots.len();
        self.sweep_at
            .store(kept.max(FIRST_SWEEP_AT), Ordering::Relaxed);
    }

    /// Keys currently remembered.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True if no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_one_message_per_key_through_per_interval_and_counts_the_rest() {
        let limit = RateLimitedLog::new(Duration::from_secs(5));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(limit.check_at("a", at(0)), Some(0));
        assert_eq!(limit.check_at("a", at(1)), None);
        assert_eq!(limit.check_at("a", at(2)), None);
        assert_eq!(
            limit.check_at("b", at(3)),
            Some(0),
            "keys are limited independently"
        );
        assert_eq!(limit.check_at("a", at(4_999)), None);
        assert_eq!(
            limit.check_at("a", at(5_000)),
            Some(3),
            "reports the three held back"
        );
        assert_eq!(limit.check_at("a", at(5_001)), None);
    }

    #[test]
    fn forgets_keys_idle_for_longer_than_the_interval() {
        let limit = RateLimitedLog::new(Duration::from_secs(5));
        let t0 = Instant::now();
        for i in 0..FIRST_SWEEP_AT - 1 {
            limit.check_at(&format!("old-{i}"), t0);
        }
        assert_eq!(limit.len(), FIRST_SWEEP_AT - 1);
        let later = t0 + Duration::from_secs(6);
        limit.check_at("new", later); // reaches the sweep threshold
        assert_eq!(limit.len(), 1, "only the fresh key is kept");
        assert_eq!(
            limit.check_at("old-0", later),
            Some(0),
            "a forgotten key starts over"
        );
    }

    #[test]
    fn keeps_keys_logged_within_the_interval_through_a_sweep() {
        let limit = RateLimitedLog::new(Duration::from_secs(5));
        let t0 = Instant::now();
        for i in 0..FIRST_SWEEP_AT {
            limit.check_at(&format!("k-{i}"), t0);
        }
        assert_eq!(limit.len(), FIRST_SWEEP_AT);
        assert_eq!(limit.check_at("k-0", t0 + Duration::from_secs(1)), None);
    }
}
