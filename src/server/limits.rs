//! Admission control: what keeps the registry up under overload.
//!
//! Owns: the count of calls in flight and of open watch streams, and the
//! decision to shed. Heartbeats (unary, stream, batch) are never counted and
//! never shed: answering one costs a map lookup and a compare-and-swap, less
//! than refusing it, and a shed heartbeat is a false expiry in the making.
//! Every other call takes a permit while it runs; past `max_in_flight` it is
//! shed at once with UNAVAILABLE (retryable), so a registration storm or a
//! flood of lists cannot starve heartbeats of CPU. Watch streams are capped
//! separately. Building a snapshot chunk for a watcher (or a page of a list)
//! is CPU work proportional to the fleet: at most one is built at a time,
//! process-wide, so watchers taking a million-member snapshot at once share
//! one core between them and leave the other to heartbeats.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tonic::Status;

/// Default most non-heartbeat calls in flight (`--max-in-flight`).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 10_000;
/// Default most open watch streams (`--max-watchers`).
pub const DEFAULT_MAX_WATCHERS: usize = 1_024;

/// Limits of one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Non-heartbeat calls in flight at once; more are shed.
    pub max_in_flight: usize,
    /// Open watch streams at once; more are refused.
    pub max_watchers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_watchers: DEFAULT_MAX_WATCHERS,
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
    /// One permit: the snapshot chunk (or list page) being built.
    bulk: Arc<tokio::sync::Semaphore>,
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
        }
    }

    /// Waits for the turn to build one snapshot chunk or list page (one at
    /// a time, process-wide); the turn ends when the permit drops.
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
}
