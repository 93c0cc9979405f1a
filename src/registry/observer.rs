//! Hooks through which adapters (metrics, logs) observe the core.
//!
//! Owns: the `Observer` trait. The core calls it; it never calls back into
//! the core. Every method has an empty default so an adapter implements only
//! what it needs. Implementations on the heartbeat path must be cheap: hold
//! metric handles, do not hash keys per call.

use std::time::Duration;

/// Outcome of one heartbeat, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatResult {
    /// Deadline renewed.
    Ok,
    /// No such executor.
    Unknown,
    /// The executor is a tombstone.
    Expired,
    /// Invalid request (TTL out of range, empty id).
    Invalid,
}

/// Outcome of one registration, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistrationResult {
    /// Durable and visible.
    Ok,
    /// Refused by validation.
    Invalid,
    /// The store failed or the registry is stopping.
    Unavailable,
}

/// Receives the core's events. All methods default to doing nothing.
pub trait Observer: Send + Sync + 'static {
    /// One heartbeat was handled.
    fn heartbeat(&self, _result: HeartbeatResult) {}
    /// One registration was answered.
    fn registration(&self, _result: RegistrationResult) {}
    /// The membership loop expired `count` executors in one pass; `lags` are
    /// the times from each deadline to its removal.
    fn expired(&self, _lags: &[Duration]) {}
    /// An executor was deregistered.
    fn deregistered(&self) {}
    /// Events were published: `online`, `running` and `offline` counts.
    fn events(&self, _online: u64, _running: u64, _offline: u64) {}
    /// The live set after a membership change.
    fn membership(&self, _revision: u64, _initing: u64, _running: u64) {}
    /// A watcher started (`+1`) or ended (`-1`).
    fn watchers(&self, _delta: i64) {}
    /// A watcher fell further behind than the watch history holds and was
    /// ended.
    fn watcher_lagged(&self) {}
    /// A watcher started: from a snapshot, or (`false`) from the history.
    fn watch_started(&self, _from_snapshot: bool) {}
    /// The watch history now holds `events`.
    fn history(&self, _events: u64) {}
    /// A snapshot chunk of `bytes` was sent to a watcher; `paced`: it
    /// waited for the server's snapshot rate first.
    fn snapshot_sent(&self, _bytes: u64, _paced: bool) {}
    /// The registry itself was stalled for about `duration` (deadlines that
    /// fell in it are compensated).
    fn stalled(&self, _duration: Duration) {}
    /// The mass-expiry guard started (`active`) or stopped holding
    /// expirations, or the number it holds changed.
    fn expiry_guard(&self, _active: bool, _held: u64) {}
    /// `count` executors the mass-expiry guard had held expired (released).
    /// They are expirations, but not late ones: no lag is reported for them.
    fn released(&self, _count: u64) {}
    /// The sizes of the tables that outlive departures, reported on every
    /// housekeeping tick: `tombstones` remembered, `wheel` entries in the
    /// expiry timing wheel (one per live executor, plus departed ones until
    /// their deadline or the next compaction).
    fn tables(&self, _tombstones: u64, _wheel: u64) {}
    /// A store operation finished after `elapsed`; `ok` = false on error.
    fn store_operation(&self, _op: &'static str, _elapsed: Duration, _ok: bool) {}
    /// A connection or call was refused by authentication or authorization;
    /// `reason` is `handshake`, `unauthenticated`, `not_owner` or `not_admin`.
    fn auth_denied(&self, _reason: &'static str) {}
}

/// The observer that observes nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopObserver;

impl Observer for NoopObserver {}
