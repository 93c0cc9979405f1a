//! Durable membership: the `MembershipStore` trait and its worker thread.
//!
//! Owns: the contract between the membership loop and a store, and the
//! thread that runs a store's blocking calls off the async runtime. The loop
//! submits one batch at a time (inserts of registrations and deletes of
//! expired/deregistered executors); while a batch is in flight the next one
//! gathers, which is the group commit.
//!
//! Stores: [`SqliteStore`] (the default: one WAL-mode SQLite file in the data
//! directory, fsynced at each commit) and [`MemoryStore`] (nothing durable).
//!
//! Must not touch: registry state. A store only persists what it is given.

mod memory;
mod sqlite;
mod worker;

pub use memory::MemoryStore;
pub use sqlite::SqliteStore;
pub use worker::{Commit, StoreWorker};

/// An executor as persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredExecutor {
    /// Its id.
    pub id: String,
    /// Name given at registration.
    pub name: String,
    /// `host:port`.
    pub address: String,
    /// Labels, sorted by key.
    pub labels: Vec<(String, String)>,
    /// Wall-clock registration time.
    pub registered_unix_ms: u64,
    /// The identity that registered it (None: unowned).
    pub owner: Option<String>,
}

/// One transaction: all of it is durable, or none of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Executors to insert.
    pub inserts: Vec<StoredExecutor>,
    /// Ids to delete (missing ids are not an error).
    pub deletes: Vec<String>,
}

impl Batch {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.inserts.is_empty() && self.deletes.is_empty()
    }
}

/// A store failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// A place membership survives restarts. Calls block; the registry runs them
/// on the store's own thread.
pub trait MembershipStore: Send + 'static {
    /// Every stored executor.
    fn load_all(&mut self) -> Result<Vec<StoredExecutor>, StoreError>;
    /// Applies a batch atomically and durably.
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError>;
    /// Whether calls block (disk, network). A store that never blocks is
    /// called inline by the membership loop instead of on a thread of its own,
    /// which also keeps paused-time tests exact (tokio cannot see a thread).
    fn blocks(&self) -> bool {
        true
    }
}
