//! A store that keeps membership in memory only (tests, embedding, and the
//! `--store memory` option): nothing survives the process.

use std::collections::BTreeMap;

use super::{Batch, MembershipStore, StoreError, StoredExecutor};

/// In-memory [`MembershipStore`].
#[derive(Debug, Default)]
pub struct MemoryStore {
    rows: BTreeMap<String, StoredExecutor>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl MembershipStore for MemoryStore {
    fn load_all(&mut self) -> Result<Vec<StoredExecutor>, StoreError> {
        Ok(self.rows.values().cloned().collect())
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        for row in &batch.inserts {
            self.rows.insert(row.id.clone(), row.clone());
        }
        for id in &batch.deletes {
            self.rows.remove(id);
        }
        Ok(())
    }

    fn blocks(&self) -> bool {
        false
    }
}
