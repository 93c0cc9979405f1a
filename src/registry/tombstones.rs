//! Tombstones: the ids expired or deregistered within
//! `--tombstone-retention`, kept so a late heartbeat is answered "tombstone,
//! register again" rather than "not found", and so a new id never repeats
//! one.
//!
//! Owns: the shared set readers check ([`Tombstones`]) and the loop's
//! forgetting order ([`Retention`]). A tombstone is kept as a 64-bit
//! fingerprint of its id under a per-process random key, not as the id: at
//! the default retention a churning fleet holds tens of thousands of them,
//! and a fingerprint costs about 30 bytes where the id string, the set slot
//! and the queue slot cost over 100. Two ids share a fingerprint with
//! probability 2⁻⁶⁴ per pair; the only effect would be a late heartbeat for
//! an unknown id answered as a tombstone (both answers mean "register
//! again"), or one random id drawn again.
//!
//! Must not touch: entries, the live table, I/O.

use std::collections::VecDeque;
use std::hash::BuildHasher;

use dashmap::DashSet;

use super::entry::IdHasher;

/// Tables are compacted once their capacity exceeds this many times what
/// they hold (plus [`SHRINK_SLACK`]): after a mass removal, not under steady
/// churn (whose deletion markers settle a table at about twice its fill).
pub(crate) const SHRINK_FACTOR: usize = 4;
/// Below this much spare capacity a table is left alone.
pub(crate) const SHRINK_SLACK: usize = 4096;

/// Whether a table of `capacity` holding `len` is worth compacting.
pub(crate) fn oversized(capacity: usize, len: usize) -> bool {
    capacity
        > len
            .saturating_mul(SHRINK_FACTOR)
            .saturating_add(SHRINK_SLACK)
}

/// The shared set of tombstone fingerprints.
pub(crate) struct Tombstones {
    set: DashSet<u64, IdHasher>,
    key: foldhash::quality::RandomState,
}

impl Default for Tombstones {
    fn default() -> Self {
        Self {
            set: DashSet::with_hasher(IdHasher::default()),
            key: foldhash::quality::RandomState::default(),
        }
    }
}

impl Tombstones {
    pub(crate) fn fingerprint(&self, id: &str) -> u64 {
        self.key.hash_one(id)
    }

    /// Whether `id` was tombstoned within the retention.
    pub(crate) fn contains(&self, id: &str) -> bool {
        self.set.contains(&self.fingerprint(id))
    }

    /// Remembers `id`; returns its fingerprint, to forget it by later.
    pub(crate) fn insert(&self, id: &str) -> u64 {
        let fingerprint = self.fingerprint(id);
        self.set.insert(fingerprint);
        fingerprint
    }

    fn forget(&self, fingerprint: u64) {
        self.set.remove(&fingerprint);
    }

    /// Tombstones remembered now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.set.len()
    }

    /// Gives back the capacity a burst of removals left (see [`oversized`]).
    fn compact(&self) {
        if oversized(self.set.capacity(), self.set.len()) {
            self.set.shrink_to_fit();
        }
    }
}

/// The loop's order of forgetting: fingerprints with the time (registry ms)
/// their retention ends, oldest first.
#[derive(Default)]
pub(crate) struct Retention {
    queue: VecDeque<(u64, u64)>,
}

impl Retention {
    /// `fingerprint` is to be forgotten at `forget_at`.
    pub(crate) fn push(&mut self, forget_at: u64, fingerprint: u64) {
        self.queue.push_back((forget_at, fingerprint));
    }

    /// Room for `more` tombstones.
    pub(crate) fn reserve(&mut self, more: usize) {
        self.queue.reserve(more);
    }

    /// Forgets every tombstone whose retention ended by `now`.
    pub(crate) fn forget_due(&mut self, now: u64, tombstones: &Tombstones) {
        while let Some(&(forget_at, fingerprint)) = self.queue.front() {
            if forget_at > now {
                break;
            }
            self.queue.pop_front();
            tombstones.forget(fingerprint);
        }
    }

    /// Compacts both the queue and the set when a burst left them mostly
    /// empty.
    pub(crate) fn compact(&mut self, tombstones: &Tombstones) {
        if oversized(self.queue.capacity(), self.queue.len()) {
            self.queue.shrink_to(self.queue.len() * 2);
        }
        tombstones.compact();
    }

    /// Tombstones waiting to be forgotten.
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tombstone_is_found_until_its_retention_ends() {
        let tombstones = Tombstones::default();
        let mut retention = Retention::default();
        retention.push(100, tombstones.insert("a-0000000000000001"));
        retention.push(200, tombstones.insert("b-0000000000000002"));
        assert!(tombstones.contains("a-0000000000000001"));
        assert!(tombstones.contains("b-0000000000000002"));
        assert!(!tombstones.contains("c-0000000000000003"));
        retention.forget_due(99, &tombstones);
        assert!(tombstones.contains("a-0000000000000001"));
        retention.forget_due(100, &tombstones);
        assert!(!tombstones.contains("a-0000000000000001"));
        assert!(tombstones.contains("b-0000000000000002"));
        assert_eq!((retention.len(), tombstones.len()), (1, 1));
        retention.forget_due(u64::MAX, &tombstones);
        assert_eq!((retention.len(), tombstones.len()), (0, 0));
    }

    #[test]
    fn fingerprints_are_keyed_per_process_instance() {
        // Two sets (two registries) fingerprint the same id differently, so
        // nobody can pick ids that collide in a registry they do not run.
        let (a, b) = (Tombstones::default(), Tombstones::default());
        let id = "executor-00000000000000ff";
        assert_ne!(a.fingerprint(id), b.fingerprint(id));
        assert_eq!(a.fingerprint(id), a.fingerprint(id));
    }

    #[test]
    fn a_burst_of_tombstones_gives_its_capacity_back_once_forgotten() {
        let tombstones = Tombstones::default();
        let mut retention = Retention::default();
        for i in 0..100_000u64 {
            retention.push(i, tombstones.insert(&format!("executor-{i:016x}")));
        }
        let peak = tombstones.set.capacity();
        assert!(peak >= 100_000);
        retention.forget_due(98_999, &tombstones);
        retention.compact(&tombstones);
        assert_eq!(tombstones.len(), 1_000);
        assert!(
            tombstones.set.capacity() < peak / 8,
            "set capacity {} after compaction (peak {peak})",
            tombstones.set.capacity()
        );
        assert!(retention.queue.capacity() < 10_000);
        // Steady state: not compacted again while the fill is reasonable.
        let settled = tombstones.set.capacity();
        retention.compact(&tombstones);
        assert_eq!(tombstones.set.capacity(), settled);
        for i in 99_000..100_000u64 {
            assert!(tombstones.contains(&format!("executor-{i:016x}")));
        }
    }

    #[test]
    fn oversized_needs_both_the_factor_and_the_slack() {
        assert!(!oversized(0, 0));
        assert!(!oversized(SHRINK_SLACK, 0));
        assert!(oversized(SHRINK_SLACK + 1, 0));
        assert!(!oversized(4 * 10_000 + SHRINK_SLACK, 10_000));
        assert!(oversized(4 * 10_000 + SHRINK_SLACK + 1, 10_000));
        assert!(!oversized(usize::MAX, usize::MAX));
    }
}
