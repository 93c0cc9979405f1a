//! Watching membership: a snapshot or a resume point, then every change.
//!
//! Owns: the watcher's side of the shared history (its cursor,
//! and the few events it read ahead). The membership loop publishes each
//! turn's snapshot, *then* appends the turn's events to the history, so a
//! watcher that loads a snapshot at revision S and reads the history from
//! S + 1 gets exactly the events after it, consecutively. A watcher that
//! resumes from a revision R the history still covers reads from R + 1
//! without a snapshot. A watcher whose cursor falls out of the history gets
//! [`WatchError::Lagged`] naming the last revision it was given, to resume
//! from: the watch is over at its first error, which every later call
//! returns again, so nobody can read on past a gap.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::watch;

use super::event::Event;
use super::history::{History, Position};
use super::observer::Observer;
use super::snapshot::Snapshot;

/// Events a watcher takes from the history at a time.
const READ_AHEAD: usize = 1024;

/// Why a watch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    /// The watcher fell further behind than the history holds.
    #[error(
        "watcher fell behind the watch history (the oldest event held is {oldest}); watch again with start_revision {last}"
    )]
    Lagged {
        /// The last revision it was given (its snapshot's, or its last
        /// event's): where to resume from.
        last: u64,
        /// The oldest revision the history still held.
        oldest: u64,
    },
    /// The registry stopped.
    #[error("registry stopped")]
    Closed,
}

/// A live watch: the snapshot it started from (or none, resumed), then
/// events.
pub struct Watch {
    snapshot: Option<Arc<Snapshot>>,
    history: Arc<History>,
    position: watch::Receiver<Position>,
    /// Revision of the next event it hands out.
    next: u64,
    read: VecDeque<Event>,
    observer: Arc<dyn Observer>,
    /// The error that ended this watch.
    ended: Option<WatchError>,
}

impl Watch {
    /// A watch from `snapshot`, or (None) resumed after `after`.
    pub(crate) fn new(
        history: Arc<History>,
        snapshot: Option<Arc<Snapshot>>,
        after: u64,
        observer: Arc<dyn Observer>,
    ) -> Self {
        observer.watchers(1);
        observer.watch_started(snapshot.is_some());
        Self {
            position: history.subscribe(),
            history,
            next: snapshot.as_ref().map_or(after, |s| s.revision()) + 1,
            snapshot,
            read: VecDeque::new(),
            observer,
            ended: None,
        }
    }

    /// The snapshot this watch starts from; None when it resumed from a
    /// revision the history still held.
    pub fn snapshot(&self) -> Option<&Arc<Snapshot>> {
        self.snapshot.as_ref()
    }

    /// Lets go of the start snapshot once it was sent: an old snapshot
    /// keeps the member map's old paths alive.
    pub fn release_snapshot(&mut self) {
        self.snapshot = None;
    }

    /// The revision of the last event handed out (or of the start).
    pub fn last_revision(&self) -> u64 {
        self.next - 1
    }

    /// The next event, in revision order. Cancel-safe. Once it returns an
    /// error, it returns that error forever.
    pub async fn next(&mut self) -> Result<Event, WatchError> {
        loop {
            if let Some(ended) = self.ended {
                return Err(ended);
            }
            if let Some(event) = self.read.pop_front() {
                self.next = event.revision + 1;
                return Ok(event);
            }
            // Marked seen before reading: an append after the read wakes
            // the wait below.
            let position = *self.position.borrow_and_update();
            if let Err(behind) = self.history.read(self.next, READ_AHEAD, &mut self.read) {
                self.observer.watcher_lagged();
                self.ended = Some(WatchError::Lagged {
                    last: self.next - 1,
                    oldest: behind.oldest,
                });
                continue;
            }
            if !self.read.is_empty() {
                continue;
            }
            if position.closed {
                self.ended = Some(WatchError::Closed);
                continue;
            }
            if self.position.changed().await.is_err() {
                self.ended = Some(WatchError::Closed);
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.observer.watchers(-1);
    }
}
