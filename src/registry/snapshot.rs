//! Immutable views of the live fleet.
//!
//! Owns: `Snapshot` — a revision and the live members ordered by id, in a
//! persistent ordered map (`imbl::OrdMap`) so the membership loop can publish
//! a new one per turn in O(changes · log n) and readers clone it in O(1).
//!
//! Status and deadline are not copied into the snapshot: members are
//! `Arc<Entry>` and readers see their state words live. Tombstoned entries
//! that a snapshot still holds are skipped by every reader: the loop removes
//! a few in the turn that ends them, but leaves a mass expiry's in the map
//! (copying the tree's paths for 100k removals would cost a copy of the whole
//! tree) and purges them later in the background; the snapshot's `len` counts
//! live members only.
//!
//! Must not touch: anything mutable. Only the membership loop builds these.

use std::sync::Arc;

use imbl::OrdMap;

use super::entry::{Entry, ExecutorId, Status};
use super::labels::{Selector, matches_all};

/// The live members as of one revision, sorted by id.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    revision: u64,
    /// Live members (the map may also hold tombstoned entries).
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

    /// Number of live members (INITING and RUNNING).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nobody is registered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// One member by id.
    pub fn get(&self, id: &str) -> Option<&Arc<Entry>> {
        self.members
            .get(id)
            .filter(|e| e.status() != Status::Tombstone)
    }

    /// Every live member, in id order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.members
            .values()
            .filter(|e| e.status() != Status::Tombstone)
    }

    /// Members with `status` (None: all live) matching every selector, in id
    /// order.
    pub fn select(&self, status: Option<Status>, selectors: &[Selector]) -> Vec<Arc<Entry>> {
        self.iter()
            .filter(|e| status.is_none_or(|s| e.status() == s))
            .filter(|e| matches_all(selectors, e.labels()))
            .cloned()
            .collect()
    }

    /// The scheduler's view: RUNNING members matching every selector, in id
    /// order. INITING executors (no heartbeat yet) are never schedulable.
    pub fn schedulable(&self, selectors: &[Selector]) -> Vec<Arc<Entry>> {
        self.select(Some(Status::Running), selectors)
    }
}
