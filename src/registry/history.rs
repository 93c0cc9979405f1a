//! The shared watch history.
//!
//! Owns: the last `--watch-history` events, each held once and shared by
//! every watcher, and the signal watchers wait on. Written only by the
//! membership loop, after it published the turn's snapshot; read by each
//! watcher at its own cursor (the revision it wants next) — the shape of
//! etcd's unsynced watchers and the Kubernetes watch cache, not a queue per
//! watcher. The writer never waits for a watcher: a watcher whose cursor
//! falls out of the history is told so when it next reads, and ends.
//!
//! Revisions are consecutive, so an event's revision is its position: the
//! ring keeps the revision of its oldest event and, per event, only the
//! entry and what happened to it (16 bytes an event, plus the entry of a
//! departed executor, which the history keeps alive until the event leaves).
//!
//! Must not touch: membership (it only records what the loop decided).

use std::collections::VecDeque;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::watch;

use super::entry::Entry;
use super::event::{Event, EventKind};

/// The history's position, as watchers see it change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    /// Revision of the newest event held (the start revision while none).
    pub last: u64,
    /// The registry stopped: nothing more will come.
    pub closed: bool,
}

/// A cursor fell out of the history: the oldest event held is `oldest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Behind {
    /// Revision of the oldest event still held.
    pub oldest: u64,
}

struct Ring {
    /// Revision of `events[0]` (or of the next event, while empty).
    first: u64,
    events: VecDeque<(Arc<Entry>, EventKind)>,
}

/// What [`History::append`] did.
pub(crate) struct Appended {
    /// Events held now.
    pub(crate) held: usize,
    /// The oldest events it forgot to stay within its capacity, for the
    /// caller to drop where that is cheap.
    pub(crate) forgotten: Vec<(Arc<Entry>, EventKind)>,
}

/// The last `capacity` events.
pub(crate) struct History {
    ring: RwLock<Ring>,
    capacity: usize,
    position: watch::Sender<Position>,
}

impl History {
    /// An empty history whose first event will have revision `start + 1`.
    pub(crate) fn new(capacity: usize, start: u64) -> Self {
        let capacity = capacity.max(1);
        Self {
            ring: RwLock::new(Ring {
                first: start + 1,
                events: VecDeque::new(),
            }),
            capacity,
            position: watch::Sender::new(Position {
                last: start,
                closed: false,
            }),
        }
    }

    fn read_ring(&self) -> RwLockReadGuard<'_, Ring> {
        // Nothing that can panic runs under the lock; a poisoned ring is
        // still a valid ring.
        self.ring
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_ring(&self) -> RwLockWriteGuard<'_, Ring> {
        self.ring
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends `events` (consecutive revisions, following the newest held)
    /// and forgets the oldest beyond the capacity; then wakes the watchers.
    /// The loop only. Takes the events by value: their entries move in
    /// (an `Arc` clone here and a drop at the caller would touch every
    /// entry twice more).
    pub(crate) fn append(&self, events: Vec<Event>) -> Appended {
        let Some(last) = events.last().map(|e| e.revision) else {
            return Appended {
                held: self.len(),
                forgotten: Vec::new(),
            };
        };
        let mut ring = self.write_ring();
        debug_assert_eq!(
            events[0].revision,
            ring.first + ring.events.len() as u64,
            "history revisions are consecutive"
        );
        ring.events
            .extend(events.into_iter().map(|e| (e.entry, e.kind)));
        let excess = ring.events.len().saturating_sub(self.capacity);
        // Moved out, not dropped under the lock: dropping an event releases
        // its entry, a cache miss each (and a free, for a departed one).
        let forgotten = ring.events.drain(..excess).collect();
        ring.first += excess as u64;
        let held = ring.events.len();
        drop(ring);
        self.position.send_modify(|p| p.last = last);
        Appended { held, forgotten }
    }

    /// Tells every watcher the registry stopped.
    pub(crate) fn close(&self) {
        self.position.send_modify(|p| p.closed = true);
    }

    /// Events held.
    pub(crate) fn len(&self) -> usize {
        self.read_ring().events.len()
    }

    /// Whether a watcher that has seen every event up to `revision` can go
    /// on from here: every event after it is still held.
    pub(crate) fn can_resume(&self, revision: u64) -> bool {
        let ring = self.read_ring();
        let last = ring.first + ring.events.len() as u64 - 1;
        revision + 1 >= ring.first && revision <= last
    }

    /// Appends to `out` the events from revision `from` on, at most `max`.
    /// Nothing is appended when `from` is past the newest event.
    pub(crate) fn read(
        &self,
        from: u64,
        max: usize,
        out: &mut VecDeque<Event>,
    ) -> Result<(), Behind> {
        let ring = self.read_ring();
        if from < ring.first {
            return Err(Behind { oldest: ring.first });
        }
        let start = usize::try_from(from - ring.first).unwrap_or(usize::MAX);
        let events = ring.events.range(start.min(ring.events.len())..);
        out.extend(
            events
                .take(max)
                .enumerate()
                .map(|(i, (entry, kind))| Event {
                    revision: from + i as u64,
                    kind: *kind,
                    entry: entry.clone(),
                }),
        );
        Ok(())
    }

    /// A receiver of the history's position, for a watcher to wait on.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Position> {
        self.position.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::entry::ExecutorId;
    use crate::registry::labels::Labels;
    use std::time::Duration;

    fn event(revision: u64) -> Event {
        let entry = Entry::new(
            ExecutorId::new(&format!("e-{revision:016x}")),
            "e".into(),
            "127.0.0.1:1".into(),
            Labels::default(),
            0,
            Duration::from_secs(1),
            1_000,
        );
        Event {
            revision,
            kind: EventKind::Online,
            entry: Arc::new(entry),
        }
    }

    fn revisions(out: &VecDeque<Event>) -> Vec<u64> {
        out.iter().map(|e| e.revision).collect()
    }

    #[test]
    fn a_cursor_reads_its_events_in_order_and_nothing_past_the_newest() {
        let history = History::new(8, 100);
        assert!(history.can_resume(100), "nothing after 100 was missed");
        assert!(!history.can_resume(99));
        history.append((101..=105).map(event).collect());
        let mut out = VecDeque::new();
        history.read(103, 10, &mut out).unwrap();
        assert_eq!(revisions(&out), [103, 104, 105]);
        out.clear();
        history.read(106, 10, &mut out).unwrap();
        assert!(out.is_empty());
        history.read(101, 2, &mut out).unwrap();
        assert_eq!(revisions(&out), [101, 102]);
        assert!(history.can_resume(100) && history.can_resume(105));
        assert!(!history.can_resume(106), "a revision from the future");
    }

    #[test]
    fn the_oldest_events_leave_past_the_capacity_and_a_cursor_there_is_behind() {
        let history = History::new(4, 0);
        for r in 1..=10 {
            assert!(history.append(vec![event(r)]).held <= 4);
        }
        assert_eq!(history.len(), 4);
        let mut out = VecDeque::new();
        assert_eq!(history.read(6, 10, &mut out), Err(Behind { oldest: 7 }));
        assert!(out.is_empty());
        history.read(7, 10, &mut out).unwrap();
        assert_eq!(revisions(&out), [7, 8, 9, 10]);
        assert!(history.can_resume(6) && !history.can_resume(5));
    }

    #[test]
    fn watchers_see_the_position_move_and_the_close() {
        let history = History::new(4, 10);
        let mut position = history.subscribe();
        assert_eq!(
            *position.borrow_and_update(),
            Position {
                last: 10,
                closed: false
            }
        );
        history.append(vec![event(11), event(12)]);
        assert!(position.has_changed().unwrap());
        assert_eq!(position.borrow_and_update().last, 12);
        history.close();
        assert!(position.borrow_and_update().closed);
    }
}
