//! The port's in-memory implementation: a store that keeps membership in
//! memory only (tests, embedding, and the `--store memory` option); nothing
//! survives the process. It lives in the core, beside the port, because it
//! does no I/O: the core's own tests and
//! [`Registry::start_in_memory`](super::Registry::start_in_memory) need a
//! store without importing an adapter.
//!
//! Owns: its rows, behind a mutex that clones share — like two connections to
//! one database, so a test can keep a handle on what a registry committed,
//! or start a second registry on the same rows (a restart). A
//! [`MemoryStore::volatile`] store keeps no rows at all: when nobody can ever
//! load them again (`--store memory`, `Registry::start_in_memory`),
//! a copy of every executor would only double the registry's memory. Its
//! revision floor is the wall clock (ms × 1,024): a restart starts above
//! every revision the previous process assigned unless the clock went back
//! or that process averaged over a million changes a second (it cannot),
//! and the revision stays below 2^53, exact as a Prometheus sample.
//!
//! Must not touch: registry state.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::clock::unix_now_ms;
use super::port::{Batch, MembershipStore, StoreError, StoredExecutor};

#[derive(Debug, Default)]
struct Rows {
    executors: BTreeMap<String, StoredExecutor>,
    revision_floor: u64,
    /// Records TTL ceilings (as replicas' etcd store does).
    records_ttls: bool,
}

/// In-memory [`MembershipStore`]. Clones share the same rows.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    /// `None`: volatile, commits are accepted and forgotten.
    rows: Option<Arc<Mutex<Rows>>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            rows: Some(Arc::default()),
        }
    }
}

impl MemoryStore {
    /// An empty store that keeps what is committed to it.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store that also records each executor's TTL ceiling, as
    /// the replicas' store does: for tests of a takeover.
    pub fn recording_ttls() -> Self {
        Self {
            rows: Some(Arc::new(Mutex::new(Rows {
                records_ttls: true,
                ..Rows::default()
            }))),
        }
    }

    /// A store that keeps nothing: every commit succeeds and `load_all` is
    /// always empty. For a registry whose store is never loaded again.
    pub fn volatile() -> Self {
        Self { rows: None }
    }

    fn rows(&self) -> Option<std::sync::MutexGuard<'_, Rows>> {
        // Nothing that can panic runs under the lock (clones and map
        // updates), and a map poisoned anyway is still a valid map.
        self.rows
            .as_ref()
            .map(|rows| rows.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl MembershipStore for MemoryStore {
    fn load_all(&mut self) -> Result<Vec<StoredExecutor>, StoreError> {
        Ok(self
            .rows()
            .map(|rows| rows.executors.values().cloned().collect())
            .unwrap_or_default())
    }

    fn revision_floor(&mut self) -> Result<u64, StoreError> {
        Ok(match self.rows() {
            Some(rows) => rows.revision_floor,
            None => unix_now_ms() << 10,
        })
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        let Some(mut rows) = self.rows() else {
            return Ok(());
        };
        for row in &batch.inserts {
            rows.executors.insert(row.id.clone(), row.clone());
        }
        for id in &batch.deletes {
            rows.executors.remove(id);
        }
        if let Some(floor) = batch.revision_floor {
            rows.revision_floor = floor;
        }
        for (id, ttl) in &batch.ttls {
            if let Some(row) = rows.executors.get_mut(id) {
                row.ttl = Some(*ttl);
            }
        }
        Ok(())
    }

    fn records_ttls(&self) -> bool {
        self.rows().is_some_and(|rows| rows.records_ttls)
    }

    fn blocks(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> StoredExecutor {
        StoredExecutor {
            id: id.into(),
            name: "e".into(),
            address: "127.0.0.1:1".into(),
            labels: vec![("zone".into(), "a".into())],
            registered_unix_ms: 1,
            owner: Some("team-a".into()),
            ttl: None,
        }
    }

    #[test]
    fn clones_share_rows_and_deletes_apply() {
        let mut store = MemoryStore::new();
        let mut other = store.clone();
        let batch = Batch {
            inserts: vec![row("a"), row("b")],
            revision_floor: Some(42),
            ..Batch::default()
        };
        store.commit(&batch).expect("commit");
        let delete = Batch {
            deletes: vec!["a".into(), "missing".into()],
            ..Batch::default()
        };
        store.commit(&delete).expect("commit");
        assert_eq!(other.load_all().expect("load"), vec![row("b")]);
        assert_eq!(other.revision_floor().expect("floor"), 42);
    }

    #[test]
    fn a_volatile_store_accepts_commits_and_keeps_nothing() {
        let mut store = MemoryStore::volatile();
        let batch = Batch {
            inserts: vec![row("a")],
            deletes: vec!["x".into()],
            revision_floor: Some(1),
            ttls: Vec::new(),
        };
        let before = store.revision_floor().expect("floor");
        store.commit(&batch).expect("commit");
        assert!(store.load_all().expect("load").is_empty());
        assert!(store.clone().load_all().expect("load").is_empty());
        // Its floor is the clock's, above any floor a moment ago, whatever
        // was committed.
        assert!(store.revision_floor().expect("floor") >= before.max(1 << 10));
        assert!(before < 1 << 53, "exact in a float64");
    }
}
