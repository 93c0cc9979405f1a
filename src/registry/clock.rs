//! The registry clock.
//!
//! Owns: the mapping between tokio's steady clock (pausable in tests) and
//! the millisecond counters stored in state words, and between that and the
//! wall clock shown to clients.
//!
//! Deadlines are ms since the registry's own start, so they fit the 62 bits
//! of the state word and never go backwards when the wall clock jumps.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Steady milliseconds since start (they never go backwards), plus a
/// wall-clock anchor.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
    base_unix_ms: u64,
}

impl Clock {
    /// A clock whose zero is now.
    pub fn start() -> Self {
        Self {
            base: Instant::now(),
            base_unix_ms: unix_now_ms(),
        }
    }

    /// Milliseconds since start.
    pub fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// Milliseconds since start at `instant` (0 before start).
    pub fn ms_at(&self, instant: Instant) -> u64 {
        u64::try_from(instant.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX)
    }

    /// The instant of a millisecond count.
    pub fn instant_at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    /// Wall-clock ms since the Unix epoch for a registry ms count.
    pub fn unix_ms(&self, ms: u64) -> u64 {
        self.base_unix_ms.saturating_add(ms)
    }
}

/// Wall-clock ms since the Unix epoch.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Whole milliseconds of a duration (saturating): the unit of state words
/// and of the timing wheel.
pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
