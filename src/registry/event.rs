//! Membership events: what changed, to whom, at which revision.
//!
//! Owns: [`Event`] and its kinds. Plain data: the membership loop makes
//! them, the history keeps them, watchers read them.

use std::sync::Arc;

use super::entry::{Entry, Status};

/// Why an executor went offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfflineReason {
    /// Its deadline passed.
    Expired,
    /// It left gracefully.
    Deregistered,
}

/// What happened to an executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Registered (visible and durable); INITING.
    Online,
    /// Its first heartbeat since it registered or was loaded was accepted;
    /// RUNNING.
    Running,
    /// Removed from the live set; TOMBSTONE.
    Offline(OfflineReason),
}

impl EventKind {
    /// The executor's status after the change.
    pub fn status(self) -> Status {
        match self {
            EventKind::Online => Status::Initing,
            EventKind::Running => Status::Running,
            EventKind::Offline(_) => Status::Tombstone,
        }
    }
}

/// One membership change.
#[derive(Debug, Clone)]
pub struct Event {
    /// Its revision; consecutive across all events.
    pub revision: u64,
    /// What happened.
    pub kind: EventKind,
    /// The executor it happened to.
    pub entry: Arc<Entry>,
}
