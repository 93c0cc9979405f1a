//! Event fan-out to watchers.
//!
//! Owns: `Event` and the watcher side of the broadcast channel. The
//! membership loop is the only sender; it never waits for a watcher. A
//! watcher subscribes *before* loading the snapshot and skips events at or
//! below the snapshot's revision, which — because the loop publishes each
//! turn's snapshot before sending that turn's events — yields exactly the
//! events from snapshot + 1 on, consecutively. A watcher that falls more than
//! the buffer behind gets [`WatchError::Lagged`] and must watch again: the
//! watch is over at its first error, which every later call returns again,
//! so nobody can read on past a gap.

use std::sync::Arc;

use tokio::sync::broadcast;

use super::entry::Entry;
use super::observer::Observer;
use super::snapshot::Snapshot;

/// Why an executor went offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfflineReason {
    /// Its deadline passed.
    Expired,
    /// It left gracefully.
    Deregistered,
}

/// What happened to an executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Registered (visible and durable).
    Online,
    /// Removed from the live set.
    Offline(OfflineReason),
}

/// One membership change.
#[derive(Debug, Clone)]
pub struct Event {
    /// Its revision; consecutive across all events.
    pub revision: u64,
    /// What happened.
    pub kind: EventKind,
    /// The executor it happened to.
    pub entry: Arc<Entry>,
}

/// Why a watch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    /// The watcher fell more than the watch buffer behind.
    #[error("watcher fell {missed} events behind the watch buffer; watch again")]
    Lagged {
        /// Events it would have missed.
        missed: u64,
    },
    /// The registry stopped.
    #[error("registry stopped")]
    Closed,
}

/// A live watch: the snapshot it started from, then events.
pub struct Watch {
    snapshot: Arc<Snapshot>,
    events: broadcast::Receiver<Event>,
    observer: Arc<dyn Observer>,
    /// The error that ended this watch. After `Lagged` the receiver would
    /// resume at the oldest event still buffered, past a gap.
    ended: Option<WatchError>,
}

impl Watch {
    pub(crate) fn new(
        events: broadcast::Receiver<Event>,
        snapshot: Arc<Snapshot>,
        observer: Arc<dyn Observer>,
    ) -> Self {
        observer.watchers(1);
        Self {
            snapshot,
            events,
            observer,
            ended: None,
        }
    }

    /// The snapshot this watch starts from.
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snapshot
    }

    /// The next event after the snapshot, in revision order. Cancel-safe.
    /// Once it returns an error, it returns that error forever.
    pub async fn next(&mut self) -> Result<Event, WatchError> {
        if let Some(ended) = self.ended {
            return Err(ended);
        }
        loop {
            let error = match self.events.recv().await {
                Ok(event) if event.revision <= self.snapshot.revision() => continue,
                Ok(event) => return Ok(event),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    self.observer.watcher_lagged();
                    WatchError::Lagged { missed }
                }
                Err(broadcast::error::RecvError::Closed) => WatchError::Closed,
            };
            self.ended = Some(error);
            return Err(error);
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.observer.watchers(-1);
    }
}
