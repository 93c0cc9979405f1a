//! Retry pacing: capped exponential backoff with jitter, and jittered
//! heartbeat periods.
//!
//! Owns: the arithmetic only (no sleeping, no clocks), so it is tested
//! directly. Jitter spreads a fleet that lost its registry at the same moment
//! over time instead of letting it reconnect in lockstep.

use std::time::Duration;

use rand::Rng;

/// Capped exponential backoff: the n-th retry waits a random time in
/// `[d/2, d]` where `d = min(max, initial · 2ⁿ)` ("equal jitter": never zero,
/// never above the cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Ceiling of the first wait.
    pub initial: Duration,
    /// Ceiling of every wait.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

/// Successive waits of one retry sequence.
#[derive(Debug, Clone)]
pub(crate) struct Retry {
    backoff: Backoff,
    attempt: u32,
}

impl Retry {
    pub(crate) fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            attempt: 0,
        }
    }

    /// The ceiling of the next wait, before jitter.
    fn ceiling(&self) -> Duration {
        let initial = self.backoff.initial.max(Duration::from_millis(1));
        let max = self.backoff.max.max(initial);
        // 2^20 · 1 ms is already 17 minutes: stop doubling long before overflow.
        let factor = 1u32 << self.attempt.min(20);
        initial.saturating_mul(factor).min(max)
    }

    /// The next wait, at most `cap` (a caller holding a lease caps waits by
    /// its heartbeat interval).
    pub(crate) fn next_delay_capped(&mut self, cap: Duration) -> Duration {
        let ceiling = self.ceiling().min(cap.max(Duration::from_millis(1)));
        self.attempt = self.attempt.saturating_add(1);
        let floor = ceiling / 2;
        rand::rng().random_range(floor..=ceiling)
    }

    /// The next wait.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.next_delay_capped(Duration::MAX)
    }

    /// After a success: the next failure starts from `initial` again.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// `period` moved by a uniformly random fraction in `[-fraction, +fraction]`
/// (`fraction` is clamped to `[0, 0.5]`).
pub(crate) fn jittered(period: Duration, fraction: f64) -> Duration {
    let fraction = if fraction.is_finite() {
        fraction.clamp(0.0, 0.5)
    } else {
        0.0
    };
    if fraction == 0.0 {
        return period;
    }
    let factor = rand::rng().random_range((1.0 - fraction)..=(1.0 + fraction));
    period.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_and_never_drop_below_half() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let mut retry = Retry::new(backoff);
        let ceilings = [100, 200, 400, 800, 1000, 1000, 1000];
        for ceiling in ceilings {
            let ceiling = Duration::from_millis(ceiling);
            let wait = retry.next_delay();
            assert!(
                wait >= ceiling / 2 && wait <= ceiling,
                "{wait:?} not in [{:?}, {ceiling:?}]",
                ceiling / 2
            );
        }
        for _ in 0..100 {
            assert!(retry.next_delay() <= backoff.max, "capped forever");
        }
    }

    #[test]
    fn reset_starts_again_from_the_initial_wait() {
        let mut retry = Retry::new(Backoff::default());
        for _ in 0..10 {
            retry.next_delay();
        }
        retry.reset();
        assert!(retry.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn a_cap_below_the_ceiling_wins() {
        let mut retry = Retry::new(Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
        });
        for _ in 0..10 {
            assert!(
                retry.next_delay_capped(Duration::from_millis(300)) <= Duration::from_millis(300)
            );
        }
    }

    #[test]
    fn jitter_stays_within_its_fraction_and_varies() {
        let period = Duration::from_millis(1000);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let d = jittered(period, 0.1);
            assert!(
                d >= Duration::from_millis(900) && d <= Duration::from_millis(1100),
                "{d:?}"
            );
            seen.insert(d);
        }
        assert!(seen.len() > 10, "jitter varies");
        assert_eq!(jittered(period, 0.0), period);
        assert!(
            jittered(period, 7.0) <= Duration::from_millis(1500),
            "fraction clamped"
        );
        assert_eq!(jittered(period, f64::NAN), period);
    }
}
