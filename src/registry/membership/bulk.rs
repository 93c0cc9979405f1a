//! The member set, and how it takes mass changes.
//!
//! Owns: the ordered member map behind snapshots (`imbl::OrdMap`, so a
//! snapshot is an O(1) clone and a change O(log n)), the live count, the
//! tombstone retention queue, and the machinery of mass changes: entries a
//! mass change left in the live table, and the background purge.
//!
//! Mass changes: a turn that removes at least [`BULK_REMOVALS`] members (a
//! mass expiry) takes them out with [`Removal::Deferred`]: they stay in the
//! ordered map — tombstoned, so every reader already skips them — instead
//! of copying one path of the shared tree per removal (100k removals in a
//! 1M tree copy nearly all of it). A purge then rebuilds the map without
//! tombstones on the background thread (`janitor.rs`, idle priority), from a clone of it; registrations made
//! meanwhile are replayed onto the result. They stay in the live table too
//! (a heartbeat finds the tombstone in them, as it would in the tombstone
//! set): the following turns move them to the tombstone set
//! [`UNLINK_PER_TURN`] at a time, yielding in between, so heartbeats meet
//! the loop's shard write locks in short slices rather than a 100k-removal
//! burst. Replaced snapshots and maps of a large fleet are dropped on a
//! background thread too, not on the loop. Revisions and events are
//! unaffected: one pass is still one turn.
//!
//! Compaction: tables that a burst left mostly empty give their capacity
//! back (see [`oversized`]); steady churn never compacts.
//!
//! Must not touch: the timing wheel, revisions, events, the store.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use imbl::OrdMap;
use tokio::sync::oneshot;

use crate::registry::entry::{Entry, ExecutorId, Status};
use crate::registry::janitor::Janitor;
use crate::registry::snapshot::Snapshot;
use crate::registry::tables::Tables;
use crate::registry::tombstones::{Retention, oversized};

/// A turn removing at least this many members removes them
/// [`Removal::Deferred`].
pub(crate) const BULK_REMOVALS: usize = 1024;
/// Entries a mass change left in the live table moved out per turn.
const UNLINK_PER_TURN: usize = 4096;
/// A purge starts when at least this many tombstoned entries, and at least
/// 1/16 of the map, are left in the ordered map.
const PURGE_MIN: usize = 1024;
/// Replaced snapshots and maps are dropped off the loop thread from this
/// many members on (dropping the old copy of a path costs an atomic
/// decrement per member it holds, on random cache lines).
const OFFLOAD_DROP_MIN: usize = 1 << 14;

/// Every index below `n` once: the even ones in order, then the odd ones.
/// Rows loaded in key order and inserted this way fill a B-tree's nodes:
/// the first sweep leaves each node it split half full, the second fills
/// the other half in place. In plain key order every node stays half
/// full; in a scattered order the nodes are fuller but every insert is a
/// cache miss, several times slower for a large map.
pub(super) fn two_sweeps(n: usize) -> impl Iterator<Item = usize> {
    (0..n).step_by(2).chain((1..n).step_by(2))
}

/// The ordered member map behind snapshots.
pub(super) type Map = OrdMap<ExecutorId, Arc<Entry>>;

/// How a turn takes departed members out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Removal {
    /// Out of the live table and the map at once: a few departures.
    AtOnce,
    /// Left in place, tombstoned: unlinked from the live table by the next
    /// turns and purged from the map in the background. A mass change.
    Deferred,
}

impl Removal {
    /// The way to remove `departures` members in one turn.
    pub(super) fn for_departures(departures: usize) -> Self {
        if departures >= BULK_REMOVALS {
            Removal::Deferred
        } else {
            Removal::AtOnce
        }
    }
}

/// A purge in flight: the map without tombstones, built on a blocking
/// thread, and what was inserted since it started.
struct Purge {
    done: oneshot::Receiver<Map>,
    inserted: Vec<Arc<Entry>>,
}

/// The members, as the loop sees them.
pub(super) struct Members {
    /// Every live member, plus tombstoned ones a mass change left in it.
    map: Map,
    /// Live members (the rest of `map` is tombstones left for a purge).
    live: usize,
    /// Tombstoned entries a mass change left in the live table, to be moved
    /// to the tombstone set by the following turns.
    unlinked: VecDeque<Arc<Entry>>,
    purge: Option<Purge>,
    /// When each tombstone is forgotten.
    retention: Retention,
    /// Where purges run and large replaced structures are dropped.
    janitor: Janitor,
}

impl Members {
    pub(super) fn new() -> Self {
        Self {
            map: OrdMap::new(),
            live: 0,
            unlinked: VecDeque::new(),
            purge: None,
            retention: Retention::default(),
            janitor: Janitor::start(),
        }
    }

    /// Live members.
    pub(super) fn live(&self) -> usize {
        self.live
    }

    /// Entries of the map, tombstones left for a purge included.
    pub(super) fn entries(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.map.values()
    }

    /// Tombstones waiting to be forgotten.
    pub(super) fn tombstones(&self) -> usize {
        self.retention.len()
    }

    /// The snapshot of the members at `revision`.
    pub(super) fn snapshot(&self, revision: u64) -> Snapshot {
        Snapshot::new(revision, self.map.clone(), self.live)
    }

    /// Makes a new INITING entry live.
    pub(super) fn insert(&mut self, tables: &Tables, entry: Arc<Entry>) {
        tables.initing.fetch_add(1, Ordering::Relaxed);
        tables
            .live
            .insert(crate::registry::tables::LiveEntry(entry.clone()), ());
        self.map.insert(entry.id().clone(), entry.clone());
        self.live += 1;
        if let Some(purge) = self.purge.as_mut() {
            purge.inserted.push(entry);
        }
    }

    /// Takes a (tombstoned) entry out of the live set, `removal`'s way. At
    /// once: the id is remembered as a tombstone until `forget_at`.
    /// Deferred: the entry answers heartbeats as a tombstone where it is, and
    /// [`Self::unlink_some`] does the rest in the next turns — the mass
    /// pass itself does not read the id at all.
    pub(super) fn remove(
        &mut self,
        tables: &Tables,
        entry: &Arc<Entry>,
        forget_at: u64,
        removal: Removal,
    ) {
        self.live -= 1;
        match removal {
            Removal::Deferred => self.unlinked.push_back(entry.clone()),
            Removal::AtOnce => {
                let id = entry.id();
                // Tombstone first, so a heartbeat that misses the live
                // table finds it.
                let fingerprint = tables.tombstones.insert(id.as_str());
                tables.live.remove(id.as_str());
                self.map.remove(id);
                self.retention.push(forget_at, fingerprint);
            }
        }
    }

    /// Room for `departures` removals in this turn.
    pub(super) fn reserve(&mut self, departures: usize) {
        self.unlinked.reserve(departures);
        self.retention.reserve(departures);
    }

    /// Whether entries a mass change left in the live table wait to be
    /// moved out.
    pub(super) fn unlinking(&self) -> bool {
        !self.unlinked.is_empty()
    }

    /// Moves up to [`UNLINK_PER_TURN`] entries left in the live table by a
    /// mass change into the tombstone set (tombstone first, so a heartbeat
    /// always finds one or the other), remembered until `forget_at` (a few
    /// turns later than if removed at once); `departed` is told of each
    /// (the store's delete). The member map keeps them for a purge.
    pub(super) fn unlink_some(
        &mut self,
        tables: &Tables,
        forget_at: u64,
        mut departed: impl FnMut(&Arc<Entry>),
    ) {
        let n = self.unlinked.len().min(UNLINK_PER_TURN);
        for entry in self.unlinked.drain(..n) {
            let id = entry.id();
            let fingerprint = tables.tombstones.insert(id.as_str());
            tables
                .live
                .remove_if(id.as_str(), |live, ()| Arc::ptr_eq(live, &entry));
            self.retention.push(forget_at, fingerprint);
            departed(&entry);
        }
    }

    /// Forgets the tombstones whose retention ended by `now`. An id still
    /// waiting to be unlinked is not in the tombstone set yet: forgetting
    /// waits for the (few) turns that move it there.
    pub(super) fn forget_tombstones(&mut self, now: u64, tables: &Tables) {
        if self.unlinked.is_empty() {
            self.retention.forget_due(now, &tables.tombstones);
        }
    }

    /// Starts a background purge when enough tombstones were left in the
    /// map: a clone (O(1)) rebuilt without them on the background thread.
    pub(super) fn start_purge(&mut self) {
        let dead = self.map.len() - self.live;
        if self.purge.is_some() || dead < PURGE_MIN || dead * 16 < self.map.len() {
            return;
        }
        let members = self.map.clone();
        let (done, result) = oneshot::channel();
        self.janitor.run(move || {
            let purged: Map = members
                .iter()
                .filter(|(_, entry)| entry.status() != Status::Tombstone)
                .map(|(id, entry)| (id.clone(), entry.clone()))
                .collect();
            drop(members);
            let _ = done.send(purged);
        });
        self.purge = Some(Purge {
            done: result,
            inserted: Vec::new(),
        });
    }

    /// A purge's result once it finished (`Some(None)`: it failed).
    pub(super) fn poll_purge(&mut self, cx: &mut Context<'_>) -> Option<Option<Map>> {
        let purge = self.purge.as_mut()?;
        match Pin::new(&mut purge.done).poll(cx) {
            Poll::Ready(result) => Some(result.ok()),
            Poll::Pending => None,
        }
    }

    /// A purge finished: its map, plus what was inserted since, becomes the
    /// members (tombstoned meanwhile or not: `live` stays exact, and what
    /// the purge kept is left for the next one). True when the map was
    /// replaced: the caller republishes at the same revision (readers skip
    /// tombstones, so they see no difference).
    pub(super) fn purged(&mut self, result: Option<Map>) -> bool {
        let Some(purge) = self.purge.take() else {
            return false;
        };
        let Some(mut purged) = result else {
            tracing::warn!("purging expired members failed; retrying later");
            return false;
        };
        for entry in purge.inserted {
            if entry.status() != Status::Tombstone {
                purged.insert(entry.id().clone(), entry);
            }
        }
        let old = std::mem::replace(&mut self.map, purged);
        self.release(old);
        true
    }

    /// Drops a replaced map, snapshot or queue: on the background thread when
    /// the fleet is large (here if that thread has fallen far behind).
    pub(super) fn release<T: Send + 'static>(&self, old: T) {
        if self.map.len() >= OFFLOAD_DROP_MIN {
            self.janitor.run_or_here(move || drop(old));
        }
    }

    /// Gives back the capacity a burst (a mass expiry or deregistration, a
    /// fleet that shrank) left in the tombstones, the live table and the
    /// unlink queue: each only when it is several times larger than what
    /// it holds, so steady churn never compacts.
    pub(super) fn compact(&mut self, tables: &Tables) {
        self.retention.compact(&tables.tombstones);
        let live = &tables.live;
        if oversized(live.capacity(), live.len()) {
            live.shrink_to_fit();
        }
        if oversized(self.unlinked.capacity(), self.unlinked.len()) {
            self.unlinked.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_sweeps_visit_every_index_once() {
        for n in [0, 1, 2, 3, 10, 1001] {
            let mut order: Vec<usize> = two_sweeps(n).collect();
            order.sort_unstable();
            assert_eq!(order, (0..n).collect::<Vec<_>>());
        }
    }
}
