//! The store port: what the membership loop needs from durable storage.
//!
//! Owns: the [`MembershipStore`] trait the core commits to, the data that
//! crosses it ([`Batch`], [`StoredExecutor`]) and its error
//! ([`StoreError`]). The store adapters (SQLite, etcd) implement it;
//! [`super::MemoryStore`] is its in-memory implementation. The loop submits
//! one batch at a time (inserts of registrations, deletes of expired and
//! deregistered executors); while a batch is in flight the next one
//! gathers, which is the group commit.
//!
//! Must not touch: registry state. A store only persists what it is given.

use std::time::Duration;

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
    /// Wall-clock registration time (ms since the Unix epoch: the stored
    /// form).
    pub registered_unix_ms: u64,
    /// The identity that registered it (None: unowned).
    pub owner: Option<String>,
    /// The TTL recorded for it by a store that records TTLs (see
    /// [`MembershipStore::records_ttls`]): a ceiling of the TTL its
    /// heartbeats ask for. None: none recorded (it never heartbeated, or the
    /// store does not record TTLs).
    pub ttl: Option<Duration>,
}

/// One transaction: all of it is durable, or none of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Executors to insert.
    pub inserts: Vec<StoredExecutor>,
    /// Ids to delete (missing ids are not an error).
    pub deletes: Vec<String>,
    /// A new revision floor to store (see
    /// [`MembershipStore::revision_floor`]): the registry reserves the
    /// revisions below it before it assigns them.
    pub revision_floor: Option<u64>,
    /// TTL ceilings to record, by id (only for a store that
    /// [`records_ttls`](MembershipStore::records_ttls)).
    pub ttls: Vec<(String, Duration)>,
}

impl Batch {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.inserts.is_empty()
            && self.deletes.is_empty()
            && self.revision_floor.is_none()
            && self.ttls.is_empty()
    }
}

/// A store failure, by what an operator does about it. The message names
/// the store (file, endpoint) and what failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No room left (a full disk or quota): writes work again once space
    /// is freed.
    #[error("{0}")]
    Full(String),
    /// Another writer holds the store now (a replica that lost its
    /// leadership): this one must stop writing.
    #[error("{0}")]
    Fenced(String),
    /// The backend could not be reached or did not answer in time.
    #[error("{0}")]
    Unreachable(String),
    /// Anything else: an I/O error, unreadable or corrupt data, a refusal.
    #[error("{0}")]
    Failed(String),
}

impl StoreError {
    /// The kind, as a short lowercase word (`full`, `fenced`,
    /// `unreachable`, `failed`) for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Full(_) => "full",
            StoreError::Fenced(_) => "fenced",
            StoreError::Unreachable(_) => "unreachable",
            StoreError::Failed(_) => "failed",
        }
    }
}

/// Quiet time after which a blocking store is told it is idle.
pub const IDLE_AFTER: Duration = Duration::from_secs(1);

/// A place membership survives restarts. Calls block; the registry runs them
/// on the store's own thread (`super::worker`).
pub trait MembershipStore: Send + 'static {
    /// Every stored executor.
    fn load_all(&mut self) -> Result<Vec<StoredExecutor>, StoreError>;
    /// The stored revision floor: every revision the registry assigned on
    /// this store is below it (0 for a new store). The registry starts
    /// above it and stores a higher one, in a batch, before it assigns the
    /// revisions under that — so revisions never go backwards across
    /// restarts, a `kill -9` included.
    fn revision_floor(&mut self) -> Result<u64, StoreError>;
    /// Applies a batch atomically and durably.
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError>;
    /// No batch came for [`IDLE_AFTER`] since the last one (or since the
    /// load): a chance to give back memory a burst of work took. Called
    /// once per quiet spell, on the store's thread; not for a store that
    /// does not block.
    fn idle(&mut self) {}
    /// Whether the store records each executor's TTL ceiling (sent in
    /// [`Batch::ttls`] when it changes, loaded back in
    /// [`StoredExecutor::ttl`]), so that a registry taking over from another
    /// one can give each executor its own TTL rather than assume one. The
    /// replicas' etcd store does; a store whose registry restarts gives
    /// every executor a fresh init TTL (SPEC §2) and need not.
    fn records_ttls(&self) -> bool {
        false
    }
    /// Whether calls block (disk, network). A store that never blocks is
    /// called inline by the membership loop instead of on a thread of its own,
    /// which also keeps paused-time tests exact (tokio cannot see a thread).
    fn blocks(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_shows_its_message_as_is_and_names_its_kind() {
        for (error, kind) in [
            (StoreError::Full("disk full".into()), "full"),
            (StoreError::Fenced("leader key changed".into()), "fenced"),
            (
                StoreError::Unreachable("etcd timed out".into()),
                "unreachable",
            ),
            (StoreError::Failed("corrupt row".into()), "failed"),
        ] {
            assert_eq!(error.kind(), kind);
            let message = match &error {
                StoreError::Full(m)
                | StoreError::Fenced(m)
                | StoreError::Unreachable(m)
                | StoreError::Failed(m) => m.clone(),
            };
            assert_eq!(error.to_string(), message);
        }
    }
}
