//! The core registry: membership and liveness, with no I/O.
//!
//! Owns: the [`Registry`] handle that adapters (gRPC server, in-process
//! schedulers) call. Heartbeats are served here directly, on the live table's
//! atomics, and never leave it; registrations and deregistrations go to the
//! single membership writer ([`membership`]); reads come from the current
//! [`Snapshot`]. The opt-in mass-expiry guard's rule is in `guard.rs`; the
//! writer applies it.
//!
//! Must not touch: gRPC, SQL, Prometheus. Time comes from tokio's clock, so
//! tests can pause it.

mod access;
mod clock;
mod entry;
mod error;
mod guard;
mod labels;
mod membership;
mod observer;
mod snapshot;
mod tombstones;
mod watch;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use access::{Action, Caller, allowed};
pub use clock::Clock;
pub use entry::{Beat, Entry, ExecutorId, Expiry, State, Status};
pub use error::RegistryError;
pub use guard::{ExpiryGuardConfig, ExpiryGuardStatus};
pub use labels::{Labels, MAX_LABEL_LEN, MAX_LABELS, Selector, SelectorOp, check_label_part};
pub use observer::{HeartbeatResult, NoopObserver, Observer, RegistrationResult};
pub use snapshot::Snapshot;
pub use watch::{Event, EventKind, OfflineReason, Watch, WatchError};

use crate::store::{MembershipStore, MemoryStore, StoreError, StoreWorker};
use membership::{Command, MembershipLoop, Shared, duration_ms};

/// Most heartbeats in one `HeartbeatBatch`.
pub const MAX_BATCH: usize = 10_000;
/// Longest executor name, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Longest address, in bytes.
pub const MAX_ADDRESS_LEN: usize = 255;
/// Shards of the id maps. DashMap's default (4 × cores, 8 here) makes every
/// heartbeat on two cores share a few lock words with the other core and with
/// the loop's removals; 128 shards cost ~10 KiB and spread both.
const LIVE_SHARDS: usize = 128;
/// Longest owner identity, in bytes.
pub const MAX_OWNER_LEN: usize = 1024;
/// Capacity of the command channel to the membership loop.
const COMMAND_QUEUE: usize = 65_536;

/// Liveness and fan-out settings of the core (the CLI's flags map onto it).
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// TTL from registration (or start-up load) to the first heartbeat.
    pub init_ttl: Duration,
    /// Smallest TTL a heartbeat may ask for.
    pub min_ttl: Duration,
    /// Largest TTL a heartbeat may ask for.
    pub max_ttl: Duration,
    /// Floor of the suggested heartbeat interval.
    pub heartbeat_interval: Duration,
    /// The fleet's total heartbeat rate the suggested interval aims at.
    pub max_heartbeats_per_second: u64,
    /// How long expired/deregistered ids are remembered.
    pub tombstone_retention: Duration,
    /// Events a watcher may fall behind before it is ended (rounded up to a
    /// power of two by the broadcast channel).
    pub watch_buffer: usize,
    /// A membership-loop turn this much later than its 100 ms tick means the
    /// registry was stalled: deadlines that fell in the stall are moved by
    /// its length instead of expiring. Zero disables the compensation.
    pub stall_threshold: Duration,
    /// Most executors live (and being registered) at once; registrations
    /// beyond it are refused with `ResourceExhausted`.
    pub max_executors: usize,
    /// The mass-expiry guard (None: off, the default); its rule is in
    /// `registry/guard.rs` and the README.
    pub expiry_guard: Option<ExpiryGuardConfig>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            init_ttl: Duration::from_secs(20),
            min_ttl: Duration::from_millis(100),
            max_ttl: Duration::from_secs(600),
            heartbeat_interval: Duration::from_millis(500),
            max_heartbeats_per_second: 200_000,
            tombstone_retention: Duration::from_secs(600),
            watch_buffer: 4096,
            stall_threshold: Duration::from_secs(1),
            max_executors: 2_000_000,
            expiry_guard: None,
        }
    }
}

/// Whether this process may decide expiries now. A replica answers true only
/// while its leader lease is confirmed, so a leader woken from a pause past
/// its lease expires nothing, not even in memory, before it steps down.
pub type Authority = Arc<dyn Fn() -> bool + Send + Sync>;

/// How a loaded executor resumes (after a leader failover): the TTL it last
/// asked for and the time it has left, instead of a fresh init TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// Its TTL.
    pub ttl: Duration,
    /// Time from the load until its deadline.
    pub left: Duration,
}

/// A registration request as received (unvalidated).
#[derive(Debug, Clone, Default)]
pub struct Registration {
    /// Prefix of the id; empty means `executor`.
    pub name: String,
    /// `host:port` where the executor serves.
    pub address: String,
    /// Labels for selectors.
    pub labels: Vec<(String, String)>,
    /// The identity registering it (see [`Caller::owner`]); None: unowned.
    /// Only this identity may heartbeat or deregister it (admins may
    /// deregister it too).
    pub owner: Option<String>,
}

/// A registration that passed validation.
#[derive(Debug, Clone)]
pub(crate) struct ValidRegistration {
    pub name: String,
    pub address: String,
    pub labels: Labels,
    pub owner: Option<Arc<str>>,
}

impl Registration {
    /// Checks every field; the error names the field and what is wrong.
    pub(crate) fn validate(self) -> Result<ValidRegistration, RegistryError> {
        check_name(&self.name)?;
        check_address(&self.address)?;
        let labels = Labels::new(self.labels)?;
        if let Some(owner) = &self.owner
            && (owner.is_empty() || owner.len() > MAX_OWNER_LEN)
        {
            return Err(RegistryError::invalid(
                "owner",
                format!(
                    "identity is {} bytes; it must be 1 to {MAX_OWNER_LEN}",
                    owner.len()
                ),
            ));
        }
        Ok(ValidRegistration {
            name: self.name,
            address: self.address,
            labels,
            owner: self.owner.map(Arc::from),
        })
    }
}

fn check_name(name: &str) -> Result<(), RegistryError> {
    if name.len() > MAX_NAME_LEN {
        return Err(RegistryError::invalid(
            "name",
            format!("is {} bytes, at most {MAX_NAME_LEN} allowed", name.len()),
        ));
    }
    if let Some(c) = name.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(RegistryError::invalid(
            "name",
            format!("contains {c:?}; only printable ASCII without spaces is allowed"),
        ));
    }
    Ok(())
}

fn check_address(address: &str) -> Result<(), RegistryError> {
    if address.is_empty() {
        return Err(RegistryError::invalid("address", "is required (host:port)"));
    }
    if address.len() > MAX_ADDRESS_LEN {
        return Err(RegistryError::invalid(
            "address",
            format!(
                "is {} bytes, at most {MAX_ADDRESS_LEN} allowed",
                address.len()
            ),
        ));
    }
    let shown = || address.chars().take(80).collect::<String>();
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(RegistryError::invalid(
            "address",
            format!("{:?} is not host:port", shown()),
        ));
    };
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty()
            && host
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b'_')
    };
    if !host_ok {
        return Err(RegistryError::invalid(
            "address",
            format!("{:?} has an invalid host", shown()),
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 && !port.starts_with('+') => Ok(()),
        _ => Err(RegistryError::invalid(
            "address",
            format!("{:?} has an invalid port (1-65535)", shown()),
        )),
    }
}

/// The registry: a cheap-to-clone handle on the live fleet.
#[derive(Clone)]
pub struct Registry {
    shared: Arc<Shared>,
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
        Self::start_resumed(config, store, observer, Default::default(), None)
    }

    /// Like [`Registry::start`], but a stored executor with an entry in
    /// `resume` comes back with that TTL and time left (a new leader resuming
    /// from last-seen watermarks); the others get a fresh init TTL. With an
    /// `authority`, expiries are decided only while it answers true (due
    /// executors wait, still live, until it does).
    pub fn start_resumed(
        config: RegistryConfig,
        store: Box<dyn MembershipStore>,
        observer: Arc<dyn Observer>,
        resume: std::collections::HashMap<String, Resume>,
        authority: Option<Authority>,
    ) -> Result<(Registry, RegistryTask), StoreError> {
        let started = std::time::Instant::now();
        let started_worker = StoreWorker::start(store);
        observer.store_operation("load", started.elapsed(), started_worker.is_ok());
        let (worker, loaded) = started_worker?;
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let (rearm_tx, rearm_rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(config.watch_buffer.max(1));
        let guard = match config.expiry_guard {
            Some(guard) => ExpiryGuardStatus {
                enabled: true,
                fraction: guard.fraction,
                max_hold: guard.max_hold,
                ..ExpiryGuardStatus::OFF
            },
            None => ExpiryGuardStatus::OFF,
        };
        let shared = Arc::new(Shared {
            config,
            clock: Clock::start(),
            live: DashMap::with_hasher_and_shard_amount(Default::default(), LIVE_SHARDS),
            tombstones: Default::default(),
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            events,
            initing: Default::default(),
            running: Default::default(),
            live_count: Default::default(),
            observer,
            rearm: rearm_tx,
            guard: ArcSwap::from_pointee(guard),
        });
        let stop = CancellationToken::new();
        let membership = MembershipLoop::new(
            shared.clone(),
            commands_rx,
            rearm_rx,
            worker,
            membership::Start {
                loaded,
                resume,
                authority,
            },
            stop.clone(),
        );
        let handle = tokio::spawn(membership.run());
        Ok((
            Registry {
                shared,
                commands: commands_tx,
            },
            RegistryTask { handle, stop },
        ))
    }

    /// The settings this registry runs with.
    pub fn config(&self) -> &RegistryConfig {
        &self.shared.config
    }

    /// The registry clock (ms counters in state words).
    pub fn clock(&self) -> &Clock {
        &self.shared.clock
    }

    /// Registers an executor. Answers once the registration is durable and
    /// visible (snapshot, watchers); the new executor is INITING.
    pub async fn register(&self, registration: Registration) -> Result<Arc<Entry>, RegistryError> {
        let registration = registration.validate().inspect_err(|_| {
            self.shared
                .observer
                .registration(RegistrationResult::Invalid)
        })?;
        let (reply, answer) = oneshot::channel();
        let command = Command::Register {
            registration,
            reply,
        };
        if self.commands.send(command).await.is_err() {
            self.shared
                .observer
                .registration(RegistrationResult::Unavailable);
            return Err(RegistryError::ShuttingDown);
        }
        answer.await.unwrap_or(Err(RegistryError::ShuttingDown))
    }

    /// Renews an executor's lease. `ttl_ms` = 0 keeps its current TTL.
    /// Returns the suggested heartbeat interval. Never leaves the live table.
    pub fn heartbeat(&self, id: &str, ttl_ms: u64) -> Result<Duration, RegistryError> {
        self.heartbeat_as(id, ttl_ms, &Caller::Trusted)
    }

    /// [`heartbeat`](Self::heartbeat) on behalf of `caller`: refused with
    /// [`RegistryError::PermissionDenied`] unless [`allowed`].
    pub fn heartbeat_as(
        &self,
        id: &str,
        ttl_ms: u64,
        caller: &Caller,
    ) -> Result<Duration, RegistryError> {
        let result = self.heartbeat_inner(id, ttl_ms, caller);
        let observed = match &result {
            Ok(_) => HeartbeatResult::Ok,
            Err(RegistryError::NotFound(_)) => HeartbeatResult::Unknown,
            Err(RegistryError::Tombstone(_)) => HeartbeatResult::Expired,
            Err(_) => HeartbeatResult::Invalid,
        };
        self.shared.observer.heartbeat(observed);
        result.map(|()| self.suggested_interval())
    }

    fn heartbeat_inner(&self, id: &str, ttl_ms: u64, caller: &Caller) -> Result<(), RegistryError> {
        let ttl = self.check_ttl(ttl_ms)?;
        if id.is_empty() {
            return Err(RegistryError::invalid("executor_id", "is required"));
        }
        let shared = &*self.shared;
        let Some(slot) = shared.live.get(id) else {
            return Err(if shared.tombstones.contains(id) {
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
        match entry.heartbeat(shared.clock.now_ms(), ttl) {
            Beat::Renewed {
                deadline_ms,
                was_initing,
            } => {
                if was_initing {
                    shared.initing.fetch_sub(1, Ordering::Relaxed);
                    shared.running.fetch_add(1, Ordering::Relaxed);
                }
                if deadline_ms < entry.armed_ms() {
                    // A smaller TTL moved the deadline before the queued time
                    // (each new executor's first heartbeat when its TTL is
                    // below the init TTL; rare after). Tell the loop, or it
                    // would expire this one late.
                    let _ = shared.rearm.send(entry.0.clone());
                }
                Ok(())
            }
            Beat::Tombstoned => Err(RegistryError::Tombstone(id.to_owned())),
        }
    }

    /// Validates a heartbeat TTL: 0 → keep (None), else within the bounds.
    fn check_ttl(&self, ttl_ms: u64) -> Result<Option<u64>, RegistryError> {
        if ttl_ms == 0 {
            return Ok(None);
        }
        let config = &self.shared.config;
        let (min, max) = (duration_ms(config.min_ttl), duration_ms(config.max_ttl));
        if ttl_ms < min || ttl_ms > max {
            return Err(RegistryError::invalid(
                "ttl_ms",
                format!("{ttl_ms} is outside [{min}, {max}] (0 keeps the current TTL)"),
            ));
        }
        Ok(Some(ttl_ms))
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
        match self.shared.live.get(id).as_ref().map(|slot| slot.key()) {
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
        **self.shared.guard.load()
    }

    /// Operator release of the mass-expiry guard: every executor it holds
    /// that has not heartbeated since expires now, in one pass (consecutive
    /// revisions), and the guard judges from the fleet as it is after that.
    /// Returns how many expired (0 when it held nothing).
    pub async fn release_expiry_guard(&self) -> Result<u64, RegistryError> {
        if self.shared.config.expiry_guard.is_none() {
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
        answer.await.map_err(|_| RegistryError::ShuttingDown)
    }

    /// One live executor.
    pub fn get(&self, id: &str) -> Result<Arc<Entry>, RegistryError> {
        if id.is_empty() {
            return Err(RegistryError::invalid("executor_id", "is required"));
        }
        match self.shared.live.get(id) {
            Some(slot) if slot.key().status() != Status::Tombstone => Ok(slot.key().0.clone()),
            _ => Err(RegistryError::NotFound(id.to_owned())),
        }
    }

    /// The observer this registry reports to (adapters report their own
    /// events, e.g. refused calls, through it too).
    pub fn observer(&self) -> &Arc<dyn Observer> {
        &self.shared.observer
    }

    /// The current snapshot (lock-free).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    /// The scheduler's view: RUNNING executors matching every selector,
    /// sorted by id, from the current snapshot.
    pub fn schedulable(&self, selectors: &[Selector]) -> Vec<Arc<Entry>> {
        self.shared.snapshot.load().schedulable(selectors)
    }

    /// Live executors with `status` (None: all), matching every selector, and
    /// the revision they are consistent with.
    pub fn list(&self, status: Option<Status>, selectors: &[Selector]) -> (Vec<Arc<Entry>>, u64) {
        let snapshot = self.shared.snapshot.load();
        (snapshot.select(status, selectors), snapshot.revision())
    }

    /// Number of live executors with `status` (None: all). O(1).
    pub fn count(&self, status: Option<Status>) -> u64 {
        let shared = &self.shared;
        match status {
            None => shared.live_count.load(Ordering::Relaxed),
            Some(status) => shared.count_of(status),
        }
    }

    /// A snapshot, then every membership change after it, in order.
    pub fn watch(&self) -> Watch {
        // Subscribe before loading: see `watch` for why this order is exact.
        let events = self.shared.events.subscribe();
        let snapshot = self.shared.snapshot.load_full();
        Watch::new(events, snapshot, self.shared.observer.clone())
    }

    /// max(`heartbeat_interval`, live ÷ `max_heartbeats_per_second`).
    pub fn suggested_interval(&self) -> Duration {
        let config = &self.shared.config;
        let live = self.shared.live_count.load(Ordering::Relaxed);
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
        self.shared.clock.unix_ms(last)
    }
}

#[cfg(test)]
mod tests;
