//! Immutable views of the live fleet.
//!
//! Owns: `Snapshot` — a revision and the members ordered by id, in a
//! persistent ordered map (`imbl::OrdMap`) so the membership loop can publish
//! a new one per turn in O(changes · log n) and readers clone it in O(1).
//!
//! A snapshot shows each member as of its revision: members are
//! `Arc<Entry>`, and an entry's status in the snapshot is what the loop had
//! published by then ([`Entry::status_at`]), not what its state word says
//! now. So a snapshot read long after it was taken (a watcher streaming a
//! million members in chunks, a paged list) is still exactly the fleet at
//! its revision, and applying the events after it gives a later one.
//! Entries the map holds past their OFFLINE event (a mass expiry's, left for
//! a background purge; or any, in a snapshot older than the removal) are
//! skipped by revision. `len` counts the members at the revision.
//!
//! Must not touch: anything mutable. Only the membership loop builds these.

use std::ops::Bound;
use std::sync::Arc;

use imbl::OrdMap;

use super::entry::{Entry, ExecutorId, Status};
use super::labels::{Selector, matches_all};

/// The members as of one revision, sorted by id.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    revision: u64,
    /// Members at `revision` (the map may hold more, see the module header).
    len: usize,
    members: OrdMap<ExecutorId, Arc<Entry>>,
}

impl Snapshot {
    pub(crate) fn new(revision: u64, members: OrdMap<ExecutorId, Arc<Entry>>, len: usize) -> Self {
        Self {
            revision,
            len,
            members,
        }
    }

    /// Entries the map holds, tombstones left for a purge included.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.members.len()
    }

    /// Revision of the last membership change included.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Number of members (INITING and RUNNING).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nobody is registered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// One member by id, with its status at this revision.
    pub fn get(&self, id: &str) -> Option<(&Arc<Entry>, Status)> {
        let entry = self.members.get(id)?;
        Some((entry, entry.status_at(self.revision)?))
    }

    /// Every member with its status at this revision, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<Entry>, Status)> {
        self.members_of(self.members.values())
    }

    /// The members after `id` (all of them for None), in id order: where a
    /// chunk or a page that ended at `id` goes on.
    pub fn iter_after(&self, id: Option<&str>) -> impl Iterator<Item = (&Arc<Entry>, Status)> {
        let from = match id {
            Some(id) => Bound::Excluded(id),
            None => Bound::Unbounded,
        };
        let range = self
            .members
            .range::<_, str>((from, Bound::Unbounded))
            .map(|(_, entry)| entry);
        self.members_of(range)
    }

    fn members_of<'a>(
        &'a self,
        entries: impl Iterator<Item = &'a Arc<Entry>> + 'a,
    ) -> impl Iterator<Item = (&'a Arc<Entry>, Status)> + 'a {
        let revision = self.revision;
        entries.filter_map(move |e| Some((e, e.status_at(revision)?)))
    }

    /// Members with `status` (None: all) matching every selector, in id
    /// order, each with its status at this revision.
    pub fn select(
        &self,
        status: Option<Status>,
        selectors: &[Selector],
    ) -> Vec<(Arc<Entry>, Status)> {
        self.iter()
            .filter(|&(e, s)| {
                status.is_none_or(|want| s == want) && matches_all(selectors, e.labels())
            })
            .map(|(e, s)| (e.clone(), s))
            .collect()
    }

    /// The scheduler's view: members RUNNING at this revision matching
    /// every selector, in id order. INITING executors (no heartbeat yet)
    /// are never schedulable.
    pub fn schedulable(&self, selectors: &[Selector]) -> Vec<Arc<Entry>> {
        self.iter()
            .filter(|&(e, s)| s == Status::Running && matches_all(selectors, e.labels()))
            .map(|(e, _)| e.clone())
            .collect()
    }
}
