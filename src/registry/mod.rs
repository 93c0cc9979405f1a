//! The core registry: membership and liveness, with no I/O.
//!
//! Owns: the [`Registry`] handle that adapters (gRPC server, in-process
//! schedulers) call. Heartbeats are served here directly, on the live table's
//! atomics, and never leave it; registrations and deregistrations go to the
//! single membership writer (`membership`); reads come from the current
//! [`Snapshot`]. The opt-in mass-expiry guard's rule is in `guard.rs`; the
//! writer applies it.
//!
//! Layout: `tables.rs` holds what the heartbeat path and the writer share
//! (each field with its writer named); `membership/` is the writer;
//! `port.rs` is what the writer needs from a store, implemented by
//! [`MemoryStore`] here and by the store adapters (SQLite, etcd);
//! `worker.rs` runs a blocking store on its own thread. No file of the core
//! imports an adapter (the store, server, replica or metrics modules).
//!
//! Must not touch: gRPC, SQL, Prometheus. Time comes from tokio's clock, so
//! tests can pause it.

mod access;
mod clock;
mod config;
mod entry;
mod error;
mod event;
mod guard;
mod history;
mod janitor;
mod labels;
mod membership;
mod memory;
mod observer;
mod port;
mod registration;
mod snapshot;
mod tables;
mod tombstones;
mod watch;
mod worker;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use access::{Action, Caller, allowed};
pub use clock::Clock;
pub use config::{
    DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_INIT_TTL, DEFAULT_MAX_EXECUTORS,
    DEFAULT_MAX_HEARTBEATS_PER_SECOND, DEFAULT_MAX_TTL, DEFAULT_MIN_TTL, DEFAULT_STALL_THRESHOLD,
    DEFAULT_TOMBSTONE_RETENTION, DEFAULT_WATCH_HISTORY, MAX_BATCH, RegistryConfig,
};
pub use entry::{Entry, ExecutorId, State, Status};
pub use error::RegistryError;
pub use event::{Event, EventKind, OfflineReason};
pub use guard::{ExpiryGuardConfig, ExpiryGuardStatus};
pub use janitor::Janitor;
pub use labels::{
    Labels, LabelsRef, MAX_LABEL_LEN, MAX_LABELS, Selector, SelectorOp, check_label_part,
    matches_all,
};
pub use membership::{Authority, StartOptions};
pub use memory::MemoryStore;
pub use observer::{HeartbeatResult, NoopObserver, Observer, RegistrationResult};
pub use port::{Batch, IDLE_AFTER, MembershipStore, StoreError, StoredExecutor};
pub use registration::{MAX_ADDRESS_LEN, MAX_NAME_LEN, MAX_OWNER_LEN, Registration};
pub use snapshot::Snapshot;
pub use watch::{Watch, WatchError};
pub use worker::{Commit, Loaded, StoreWorker};

#[cfg(test)]
pub(crate) use membership::FORCED_ID_SUFFIXES;

use clock::duration_ms;
use entry::Beat;
use membership::{Command, MembershipLoop, REVISION_RANGE};
use tables::{Notice, Tables};

/// Capacity of the command channel to the membership loop.
const COMMAND_QUEUE: usize = 65_536;

/// The registry: a cheap-to-clone handle on the live fleet.
#[derive(Clone)]
pub struct Registry {
    tables: Arc<Tables>,
    commands: mpsc::Sender<Command>,
}

/// The running membership loop; await it after [`Registry::stop`] to know
/// the store was flushed.
pub struct RegistryTask {
    handle: JoinHandle<()>,
    stop: CancellationToken,
}

impl RegistryTask {
    /// Asks the loop to stop (refusing new membership changes, flushing the
    /// store) and waits for it.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Err(e) = self.handle.await {
            tracing::error!(error = %e, "membership loop failed");
        }
    }

    /// A token that stops the loop when cancelled.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }
}

impl Registry {
    /// Starts a registry on a volatile in-memory store (nothing is durable,
    /// nothing is copied).
    pub fn start_in_memory(config: RegistryConfig) -> (Registry, RegistryTask) {
        Self::start(
            config,
            Box::new(MemoryStore::volatile()),
            Arc::new(NoopObserver),
        )
        .expect("the in-memory store cannot fail to load")
    }

    /// Loads membership from `store` and starts the membership loop on the
    /// current tokio runtime. Every stored executor comes back INITING with a
    /// fresh init TTL.
    pub fn start(
        config: RegistryConfig,
        store: Box<dyn MembershipStore>,
        observer: Arc<dyn Observer>,
    ) -> Result<(Registry, RegistryTask), StoreError> {
        Self::start_with(config, store, observer, StartOptions::default())
    }

    /// Like [`Registry::start`], with `options`: a registry taking over
    /// from another one (a new leader) gives each stored executor its
    /// recorded TTL plus a grace; one with an authority decides expiries
    /// only while it answers true (due executors wait, still live, until it
    /// does).
    pub fn start_with(
        config: RegistryConfig,
        store: Box<dyn MembershipStore>,
        observer: Arc<dyn Observer>,
        options: StartOptions,
    ) -> Result<(Registry, RegistryTask), StoreError> {
        let started = tokio::time::Instant::now();
        let started_worker = StoreWorker::start(store, REVISION_RANGE);
        observer.store_operation("load", started.elapsed(), started_worker.is_ok());
        let (worker, loaded) = started_worker?;
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let (tables, notices_rx) =
            Tables::new(config, observer, loaded.revision, loaded.records_ttls);
        let tables = Arc::new(tables);
        let stop = CancellationToken::new();
        let membership = MembershipLoop::new(
            tables.clone(),
            commands_rx,
            notices_rx,
            worker,
            membership::Start { loaded, options },
            stop.clone(),
        );
        let handle = tokio::spawn(membership.run());
        Ok((
            Registry {
                tables,
                commands: commands_tx,
            },
            RegistryTask { handle, stop },
        ))
    }

    /// The settings this registry runs with.
    pub fn config(&self) -> &RegistryConfig {
        &self.tables.config
    }

    /// The registry clock (ms counters in state words).
    pub fn clock(&self) -> &Clock {
        &self.tables.clock
    }

    /// Registers an executor. Answers once the registration is durable and
    /// visible (snapshot, watchers); the new executor is INITING.
    pub async fn register(&self, registration: Registration) -> Result<Arc<Entry>, RegistryError> {
        let registration = registration.validate().inspect_err(|_| {
            self.tables
                .observer
                .registration(RegistrationResult::Invalid)
        })?;
        let (reply, answer) = oneshot::channel();
        let command = Command::Register {
            registration,
            reply,
        };
        if self.commands.send(command).await.is_err() {
            self.tables
                .observer
                .registration(RegistrationResult::Unavailable);
            return Err(RegistryError::ShuttingDown);
        }
        answer.await.unwrap_or(Err(RegistryError::ShuttingDown))
    }

    /// Renews an executor's lease with `ttl` (None keeps its current TTL).
    /// Returns the suggested heartbeat interval. Never leaves the live table.
    pub fn heartbeat(&self, id: &str, ttl: Option<Duration>) -> Result<Duration, RegistryError> {
        self.heartbeat_as(id, ttl, &Caller::Trusted)
    }

    /// [`heartbeat`](Self::heartbeat) on behalf of `caller`: refused with
    /// [`RegistryError::PermissionDenied`] unless [`allowed`].
    pub fn heartbeat_as(
        &self,
        id: &str,
        ttl: Option<Duration>,
        caller: &Caller,
    ) -> Result<Duration, RegistryError> {
        let result = self.heartbeat_inner(id, ttl, caller);
        let observed = match &result {
            Ok(_) => HeartbeatResult::Ok,
            Err(RegistryError::NotFound(_)) => HeartbeatResult::Unknown,
            Err(RegistryError::Tombstone(_)) => HeartbeatResult::Expired,
            Err(_) => HeartbeatResult::Invalid,
        };
        self.tables.observer.heartbeat(observed);
        result.map(|()| self.suggested_interval())
    }

    fn heartbeat_inner(
        &self,
        id: &str,
        ttl: Option<Duration>,
        caller: &Caller,
    ) -> Result<(), RegistryError> {
        let ttl_ms = self.check_ttl(ttl)?;
        if id.is_empty() {
            return Err(RegistryError::invalid("executor_id", "is required"));
        }
        let tables = &*self.tables;
        let Some(slot) = tables.live.get(id) else {
            return Err(if tables.tombstones.contains(id) {
                RegistryError::Tombstone(id.to_owned())
            } else {
                RegistryError::NotFound(id.to_owned())
            });
        };
        let entry = slot.key();
        if entry.status() == Status::Tombstone {
            // Expired in a mass pass and not yet moved to the tombstone set:
            // the same answer as from the set, for any caller.
            return Err(RegistryError::Tombstone(id.to_owned()));
        }
        if !allowed(caller, entry.owner(), Action::Heartbeat) {
            return Err(RegistryError::not_owner(id));
        }
        match entry.heartbeat(tables.clock.now_ms(), ttl_ms) {
            Beat::Renewed {
                deadline_ms,
                was_initing,
            } => {
                if was_initing {
                    tables.initing.fetch_sub(1, Ordering::Relaxed);
                    tables.running.fetch_add(1, Ordering::Relaxed);
                }
                // A store that records TTLs gets the new ceiling when it
                // changes (a step of the granularity, not every heartbeat).
                let ttl_changed = tables.records_ttls
                    && ttl_ms
                        .is_some_and(|ttl| entry.record_ttl(tables.config.ttl_ceiling_ms(ttl)));
                if was_initing || ttl_changed || deadline_ms < entry.armed_ms() {
                    // The first heartbeat is a membership change the loop
                    // announces (RUNNING, once per lifetime); and a smaller
                    // TTL that moved the deadline before the queued time
                    // (usually that same first heartbeat, its TTL below the
                    // init TTL) must be queued again, or it would expire late.
                    let _ = tables.notices.send(Notice {
                        entry: entry.0.clone(),
                        ttl_changed,
                    });
                }
                Ok(())
            }
            Beat::Tombstoned => Err(RegistryError::Tombstone(id.to_owned())),
        }
    }

    /// Validates a heartbeat TTL (None keeps the current one): within the
    /// configured bounds. Answers it in ms, the state word's unit.
    fn check_ttl(&self, ttl: Option<Duration>) -> Result<Option<u64>, RegistryError> {
        let Some(ttl) = ttl else {
            return Ok(None);
        };
        let config = &self.tables.config;
        if ttl < config.min_ttl || ttl > config.max_ttl {
            let show = |d: Duration| humantime::format_duration(d).to_string();
            return Err(RegistryError::invalid(
                "ttl_ms",
                format!(
                    "{} is outside [{}, {}] (0 keeps the current TTL)",
                    show(ttl),
                    show(config.min_ttl),
                    show(config.max_ttl)
                ),
            ));
        }
        Ok(Some(duration_ms(ttl)))
    }

    /// Graceful leave: removed at once, OFFLINE with reason DEREGISTERED.
    pub async fn deregister(&self, id: &str) -> Result<(), RegistryError> {
        self.deregister_as(id, &Caller::Trusted).await
    }

    /// [`deregister`](Self::deregister) on behalf of `caller`: refused with
    /// [`RegistryError::PermissionDenied`] unless [`allowed`].
    pub async fn deregister_as(&self, id: &str, caller: &Caller) -> Result<(), RegistryError> {
        if id.is_empty() {
            return Err(RegistryError::invalid("executor_id", "is required"));
        }
        match self.tables.live.get(id).as_ref().map(|slot| slot.key()) {
            None => return Err(RegistryError::NotFound(id.to_owned())),
            // Tombstoned but not yet moved out of the live table (a mass pass).
            Some(entry) if entry.status() == Status::Tombstone => {
                return Err(RegistryError::NotFound(id.to_owned()));
            }
            Some(entry) if !allowed(caller, entry.owner(), Action::Deregister) => {
                return Err(RegistryError::not_owner(id));
            }
            Some(_) => {}
        }
        let (reply, answer) = oneshot::channel();
        let command = Command::Deregister {
            id: id.to_owned(),
            reply,
        };
        if self.commands.send(command).await.is_err() {
            return Err(RegistryError::ShuttingDown);
        }
        answer.await.unwrap_or(Err(RegistryError::ShuttingDown))
    }

    /// The mass-expiry guard's state (lock-free; held counts are at most
    /// one 100 ms review old).
    pub fn expiry_guard(&self) -> ExpiryGuardStatus {
        **self.tables.guard.load()
    }

    /// Operator release of the mass-expiry guard: every executor it holds
    /// that has not heartbeated since expires now, in one pass (consecutive
    /// revisions), and the guard judges from the fleet as it is after that.
    /// Returns how many expired (0 when it held nothing).
    pub async fn release_expiry_guard(&self) -> Result<u64, RegistryError> {
        if self.tables.config.expiry_guard.is_none() {
            return Err(RegistryError::ExpiryGuardOff);
        }
        let (reply, answer) = oneshot::channel();
        if self
            .commands
            .send(Command::ReleaseGuard { reply })
            .await
            .is_err()
        {
            return Err(RegistryError::ShuttingDown);
        }
        answer.await.unwrap_or(Err(RegistryError::ShuttingDown))
    }

    /// One live executor.
    pub fn get(&self, id: &str) -> Result<Arc<Entry>, RegistryError> {
        if id.is_empty() {
            return Err(RegistryError::invalid("executor_id", "is required"));
        }
        match self.tables.live.get(id) {
            Some(slot) if slot.key().status() != Status::Tombstone => Ok(slot.key().0.clone()),
            _ => Err(RegistryError::NotFound(id.to_owned())),
        }
    }

    /// The observer this registry reports to (adapters report their own
    /// events, e.g. refused calls, through it too).
    pub fn observer(&self) -> &Arc<dyn Observer> {
        &self.tables.observer
    }

    /// The current snapshot (lock-free).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.tables.snapshot.load_full()
    }

    /// The scheduler's view: RUNNING executors matching every selector,
    /// sorted by id, from the current snapshot.
    pub fn schedulable(&self, selectors: &[Selector]) -> Vec<Arc<Entry>> {
        self.tables.snapshot.load().schedulable(selectors)
    }

    /// Live executors with `status` (None: all), matching every selector,
    /// each with its status at the revision they are consistent with.
    pub fn list(
        &self,
        status: Option<Status>,
        selectors: &[Selector],
    ) -> (Vec<(Arc<Entry>, Status)>, u64) {
        let snapshot = self.tables.snapshot.load();
        (snapshot.select(status, selectors), snapshot.revision())
    }

    /// Number of live executors with `status` (None: all). O(1).
    pub fn count(&self, status: Option<Status>) -> u64 {
        let tables = &self.tables;
        match status {
            None => tables.live_count.load(Ordering::Relaxed),
            Some(status) => tables.count_of(status),
        }
    }

    /// A snapshot, then every membership change after it, in order.
    pub fn watch(&self) -> Watch {
        self.watch_from(0)
    }

    /// Every membership change after revision `start` (0: none seen yet),
    /// in order: straight from the history when it still holds every event
    /// after `start`, else after a snapshot ([`Watch::snapshot`] tells).
    pub fn watch_from(&self, start: u64) -> Watch {
        let tables = &self.tables;
        let observer = tables.observer.clone();
        if start > 0 && tables.history.can_resume(start) {
            return Watch::new(tables.history.clone(), None, start, observer);
        }
        // The loop publishes a turn's snapshot before its events reach the
        // history, so the events after this snapshot are there, or coming.
        let snapshot = tables.snapshot.load_full();
        Watch::new(tables.history.clone(), Some(snapshot), 0, observer)
    }

    /// Waits until the loop published everything sent to it before (first
    /// heartbeats' RUNNING events included).
    #[cfg(test)]
    pub(crate) async fn settled(&self) {
        loop {
            let before = self.snapshot().revision();
            let (reply, answer) = oneshot::channel();
            if self
                .commands
                .send(Command::Barrier { reply })
                .await
                .is_err()
                || answer.await.is_err()
            {
                return;
            }
            // A turn takes a bounded number of notices: until one publishes
            // nothing new.
            if self.snapshot().revision() == before {
                return;
            }
        }
    }

    /// Events the watch history holds now.
    pub fn history_len(&self) -> usize {
        self.tables.history.len()
    }

    /// max(`heartbeat_interval`, live ÷ `max_heartbeats_per_second`).
    pub fn suggested_interval(&self) -> Duration {
        let config = &self.tables.config;
        let live = self.tables.live_count.load(Ordering::Relaxed);
        let spread_ms = live.saturating_mul(1000) / config.max_heartbeats_per_second.max(1);
        config
            .heartbeat_interval
            .max(Duration::from_millis(spread_ms))
    }

    /// Wall-clock ms of the entry's last heartbeat (0 if it never beat).
    pub fn last_heartbeat_unix_ms(&self, entry: &Entry) -> u64 {
        let state = entry.state();
        if state.status() == Status::Initing {
            return 0;
        }
        let last = state.deadline_ms().saturating_sub(entry.ttl_ms());
        self.tables.clock.unix_ms(last)
    }
}

#[cfg(test)]
mod tests;
