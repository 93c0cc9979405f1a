//! Durable membership: the `MembershipStore` trait and its worker thread.
//!
//! Owns: the contract between the membership loop and a store, and the
//! thread that runs a store's blocking calls off the async runtime. The loop
//! submits one batch at a time (inserts of registrations and deletes of
//! expired/deregistered executors); while a batch is in flight the next one
//! gathers, which is the group commit.
//!
//! Stores: [`SqliteStore`] (the default: one WAL-mode SQLite file in the data
//! directory, fsynced at each commit), [`MemoryStore`] (nothing durable) and
//! [`EtcdStore`] (replicas: one key per executor, fenced by leadership).
//!
//! Must not touch: registry state. A store only persists what it is given.

pub mod etcd;
mod memory;
mod sqlite;
mod worker;

pub use etcd::EtcdStore;
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

/// Quiet time after which a blocking store is told it is idle.
pub const IDLE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// A place membership survives restarts. Calls block; the registry runs them
/// on the store's own thread.
pub trait MembershipStore: Send + 'static {
    /// Every stored executor.
    fn load_all(&mut self) -> Result<Vec<StoredExecutor>, StoreError>;
    /// Applies a batch atomically and durably.
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError>;
    /// No batch came for [`IDLE_AFTER`] since the last one (or since the
    /// load): a chance to give back memory a burst of work took. Called
    /// once per quiet spell, on the store's thread; not for a store that
    /// does not block.
    fn idle(&mut self) {}
    /// Whether calls block (disk, network). A store that never blocks is
    /// called inline by the membership loop instead of on a thread of its own,
    /// which also keeps paused-time tests exact (tokio cannot see a thread).
    fn blocks(&self) -> bool {
        true
    }
}
