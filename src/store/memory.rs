//! A store that keeps membership in memory only (tests, embedding, and the
//! `--store memory` option): nothing survives the process.
//!
//! Owns: its rows, behind a mutex that clones share — like two connections to
//! one database, so a test can keep a handle on what a registry committed,
//! or start a second registry on the same rows (a restart).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::{Batch, MembershipStore, StoreError, StoredExecutor};

/// In-memory [`MembershipStore`]. Clones share the same rows.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    rows: Arc<Mutex<BTreeMap<String, StoredExecutor>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn rows(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, StoredExecutor>> {
        // Nothing that can panic runs under the lock (clones and map
        // updates), and a map poisoned anyway is still a valid map.
        self.rows.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl MembershipStore for MemoryStore {
    fn load_all(&mut self) -> Result<Vec<StoredExecutor>, StoreError> {
        Ok(self.rows().values().cloned().collect())
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        let mut rows = self.rows();
        for row in &batch.inserts {
            rows.insert(row.id.clone(), row.clone());
        }
        for id in &batch.deletes {
            rows.remove(id);
        }
        Ok(())
    }

    fn blocks(&self) -> bool {
        false
    }
}
