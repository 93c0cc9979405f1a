//! Admission control: what keeps the registry up under overload.
//!
//! Owns: the count of calls in flight and of open watch streams, and the
//! decision to shed. Heartbeats (unary, stream, batch) are never counted and
//! never shed: answering one costs a map lookup and a compare-and-swap, less
//! than refusing it, and a shed heartbeat is a false expiry in the making.
//! Every other call takes a permit while it runs; past `max_in_flight` it is
//! shed at once with UNAVAILABLE (retryable), so a registration storm or a
//! flood of lists cannot starve heartbeats of CPU. Watch streams are capped
//! separately. Building a page of a list is CPU work proportional to the
//! page: at most one is built at a time, process-wide. Snapshot chunks
//! (encoded once for every watcher reading them, off the runtime's workers:
//! [`super::chunks`]) are sent at most at `snapshot_bytes_per_second` in
//! all: sending and receiving them costs CPU in proportion to their bytes
//! (the kernel's, the connections', the watchers'), and watchers that all
//! take a million-member snapshot at once must not take the cores the
//! heartbeats need. At the default rate, 64 watchers taking a 1M snapshot at
//! once left heartbeats their p99 on a 2-core machine shared with the
//! watchers themselves (docs/PERFORMANCE.md); one watcher alone reads a 1M
//! snapshot (about 110 MB) in about a second.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tonic::Status;

/// Default most non-heartbeat calls in flight (`--max-in-flight`).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 10_000;
/// Default most open watch streams (`--max-watchers`).
pub const DEFAULT_MAX_WATCHERS: usize = 1_024;
/// Default rate of snapshot chunks, MiB/s (`--snapshot-rate`).
pub const DEFAULT_SNAPSHOT_RATE_MIB: u64 = 96;
/// Sending time that accumulates while no snapshot is sent: a small
/// snapshot after a quiet spell goes at once.
const SNAPSHOT_BURST: Duration = Duration::from_millis(50);

/// Limits of one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Non-heartbeat calls in flight at once; more are shed.
    pub max_in_flight: usize,
    /// Open watch streams at once; more are refused.
    pub max_watchers: usize,
    /// Bytes of snapshot chunks sent per second, to all watchers together;
    /// 0: unlimited.
    pub snapshot_bytes_per_second: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_watchers: DEFAULT_MAX_WATCHERS,
            snapshot_bytes_per_second: DEFAULT_SNAPSHOT_RATE_MIB << 20,
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    in_flight: AtomicUsize,
    watchers: AtomicUsize,
}

/// Hands out permits within the limits.
#[derive(Debug, Clone)]
pub struct Admission {
    limits: Limits,
    counts: Arc<Counts>,
    /// One permit: the list page being built.
    bulk: Arc<tokio::sync::Semaphore>,
    /// When the next snapshot chunk may be sent.
    snapshot_slot: Arc<Mutex<Instant>>,
}

/// Held while a call runs (or a watch stream is open); released on drop.
#[derive(Debug)]
pub struct Permit {
    counts: Arc<Counts>,
    watcher: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let counter = if self.watcher {
            &self.counts.watchers
        } else {
            &self.counts.in_flight
        };
        counter.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// Admission within `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            counts: Arc::default(),
            bulk: Arc::new(tokio::sync::Semaphore::new(1)),
            snapshot_slot: Arc::new(Mutex::new(Instant::now())),
        }
    }

    /// Waits for the turn to send a snapshot chunk of `bytes`: each chunk's
    /// turn comes `bytes ÷ rate` after the one before it (first come, first
    /// served; up to [`SNAPSHOT_BURST`] of sending goes at once after a
    /// quiet spell). True when it had to wait.
    pub async fn snapshot_bytes(&self, bytes: usize) -> bool {
        let rate = self.limits.snapshot_bytes_per_second;
        if rate == 0 {
            return false;
        }
        let takes = Duration::from_secs_f64(bytes as f64 / rate as f64);
        let now = Instant::now();
        let turn = {
            let mut next = self
                .snapshot_slot
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let turn = (*next).max(now.checked_sub(SNAPSHOT_BURST).unwrap_or(now));
            *next = turn + takes;
            turn
        };
        if turn <= now {
            return false;
        }
        tokio::time::sleep_until(turn).await;
        true
    }

    /// Waits for the turn to build one list page (one at a time,
    /// process-wide); the turn ends when the permit drops.
    pub async fn bulk(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.bulk
            .acquire()
            .await
            .expect("the bulk semaphore is never closed")
    }

    /// A permit for a non-heartbeat call, or UNAVAILABLE when overloaded.
    pub fn call(&self) -> Result<Permit, Status> {
        let max = self.limits.max_in_flight;
        self.take(&self.counts.in_flight, max, false).map_err(|n| {
            Status::unavailable(format!(
                "overloaded: {n} calls in flight (--max-in-flight {max}); retry with backoff"
            ))
        })
    }

    /// A permit for a watch stream, or RESOURCE_EXHAUSTED at the cap.
    pub fn watcher(&self) -> Result<Permit, Status> {
        let max = self.limits.max_watchers;
        self.take(&self.counts.watchers, max, true).map_err(|n| {
            Status::resource_exhausted(format!(
                "{n} watch streams are open, the most allowed (--max-watchers {max})"
            ))
        })
    }

    fn take(&self, counter: &AtomicUsize, max: usize, watcher: bool) -> Result<Permit, usize> {
        let before = counter.fetch_add(1, Ordering::AcqRel);
        if before >= max {
            counter.fetch_sub(1, Ordering::AcqRel);
            return Err(before);
        }
        Ok(Permit {
            counts: self.counts.clone(),
            watcher,
        })
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn calls_beyond_the_limit_are_shed_and_permits_come_back_on_drop() {
        let admission = Admission::new(Limits {
            max_in_flight: 2,
            max_watchers: 1,
            ..Limits::default()
        });
        let a = admission.call().expect("first");
        let _b = admission.call().expect("second");
        let shed = admission.call().unwrap_err();
        assert_eq!(shed.code(), Code::Unavailable);
        assert!(
            shed.message().contains("--max-in-flight 2"),
            "{}",
            shed.message()
        );
        drop(a);
        admission.call().expect("a permit came back");

        let w = admission.watcher().expect("one watcher");
        let refused = admission.watcher().unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(refused.message().contains("--max-watchers 1"));
        // Watchers and calls are counted apart.
        drop(w);
        admission.watcher().expect("the watcher slot came back");
    }

    #[tokio::test(start_paused = true)]
    async fn snapshot_chunks_are_sent_at_the_rate_one_after_another() {
        let admission = Admission::new(Limits {
            snapshot_bytes_per_second: 1 << 20,
            ..Limits::default()
        });
        let start = Instant::now();
        // The first goes at once; each next one a second after it.
        for n in 0..4u32 {
            let waited = admission.snapshot_bytes(1 << 20).await;
            assert_eq!(start.elapsed(), Duration::from_secs(n.into()), "chunk {n}");
            assert_eq!(waited, n > 0, "chunk {n}");
        }
        // A quiet spell is credited up to the burst only.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let quiet = Instant::now();
        admission.snapshot_bytes(1 << 19).await;
        admission.snapshot_bytes(1 << 19).await;
        assert_eq!(quiet.elapsed(), Duration::from_millis(500) - SNAPSHOT_BURST);
        // Unlimited: never waits.
        let unlimited = Admission::new(Limits {
            snapshot_bytes_per_second: 0,
            ..Limits::default()
        });
        let before = Instant::now();
        for _ in 0..100 {
            unlimited.snapshot_bytes(1 << 30).await;
        }
        assert_eq!(before.elapsed(), Duration::ZERO);
    }
}
