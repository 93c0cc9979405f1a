//! The single membership writer.
//!
//! Owns (exclusively): the `DelayQueue` of deadlines, the revision counter,
//! the ordered member map behind snapshots, the tombstone retention queue,
//! the event sender's order, and the store batches (pending registrations and
//! deletes, and the set of ids whose delete has not landed yet). Every
//! membership change — register, deregister, expiry,
//! start-up load — is applied here, in order.
//!
//! One turn = everything ready at one wake-up: every queue entry whose time
//! came, every command waiting, every finished commit. A turn assigns one
//! revision per change, publishes one snapshot, *then* sends its events (so a
//! watcher that loads a snapshot never misses an event), then answers callers.
//!
//! Expiry is lazy: an entry sits in the queue once, at the deadline known when
//! it was queued. When it pops, the loop reads its state word: a later
//! deadline re-queues it; a passed one is tombstoned by CAS. Heartbeats only
//! write the state word; when a heartbeat *shortens* a deadline below the
//! queued one (a smaller TTL) it sends the entry on the re-arm channel.
//!
//! Pause compensation: the loop wakes at least every [`TICK`]. A turn that
//! comes more than `stall_threshold` later than that means the process was
//! stalled (SIGSTOP, CPU starvation, a blocked runtime): heartbeats sent
//! meanwhile could not be read. An executor whose deadline fell in the stall
//! (or within [`RESUME_GRACE`] after it, while the backlog of heartbeats is
//! read) has its deadline moved by the length of the stall, and at least to
//! the end of that grace, instead of being expired (Eureka compensates its
//! eviction the same way). Those that really died still expire, at most one
//! stall + grace later. Each deadline is compensated at most once.
//!
//! Mass changes: a turn that removes at least [`BULK_REMOVALS`] members (a
//! mass expiry) leaves them in the ordered map — tombstoned, so every reader
//! already skips them — instead of copying one path of the shared tree per
//! removal (100k removals in a 1M tree copy nearly all of it). A purge then
//! rebuilds the map without tombstones on a blocking thread, from a clone of
//! it; registrations made meanwhile are replayed onto the result. In such a
//! turn the live table keeps the tombstoned entries too (a heartbeat finds
//! the tombstone in them, as it would in the tombstone set): the following
//! turns move them to the tombstone set [`UNLINK_PER_TURN`] at a time,
//! yielding in between, so heartbeats meet the loop's shard write locks in
//! short slices rather than a 100k-removal burst. Replaced
//! snapshots and maps of a large fleet are dropped on a blocking thread too,
//! not on the loop. Revisions and events are unaffected: one pass is still
//! one turn.
//! Mass-expiry guard (when configured): executors whose deadline passed are
//! collected for the whole pass and [`ExpiryGuard`] decides whether they
//! expire now or are held; held ones are reviewed on every housekeeping
//! tick (revived ones go back to the queue, released ones expire in one
//! pass). See [`super::guard`] for the rule.
//!
//! Must not touch: I/O (the store runs on its own thread), gRPC types.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use imbl::OrdMap;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::time::DelayQueue;

use super::clock::{Clock, unix_now_ms};
use super::entry::{Entry, ExecutorId, Expiry, Status};
use super::error::RegistryError;
use super::guard::{ExpiryGuard, ExpiryGuardStatus, Held, Pass};
use super::labels::Labels;
use super::observer::{Observer, RegistrationResult};
use super::snapshot::Snapshot;
use super::tombstones::{Retention, Tombstones, oversized};
use super::watch::{Event, EventKind, OfflineReason};
use super::{RegistryConfig, ValidRegistration};
use crate::store::{Batch, Commit, StoreError, StoreWorker, StoredExecutor};

/// Most commands taken in one turn, so a flood of registrations cannot delay
/// expiry for long.
const MAX_COMMANDS_PER_TURN: usize = 8192;
/// Most deletes written in one store transaction.
const MAX_DELETES_PER_COMMIT: usize = 8192;
/// Wait before retrying deletes after a store failure.
const DELETE_RETRY: Duration = Duration::from_secs(1);
/// A turn removing at least this many members leaves them in the ordered map
/// (tombstoned) for a background purge.
pub(crate) const BULK_REMOVALS: usize = 1024;
/// Entries a mass change left in the live table moved out per turn.
const UNLINK_PER_TURN: usize = 4096;
/// A purge starts when at least this many tombstoned entries, and at least
/// 1/16 of the map, are left in the ordered map.
const PURGE_MIN: usize = 1024;
/// Replaced snapshots and maps are dropped off the loop thread from this
/// many members on (dropping the old copy of a path costs an atomic
/// decrement per member it holds, on random cache lines).
const OFFLOAD_DROP_MIN: usize = 1 << 14;
/// The loop wakes at least this often (stall detection, and forgetting
/// tombstones past their retention).
pub(crate) const TICK: Duration = Duration::from_millis(100);
/// Housekeeping ticks between two looks at the tables' spare capacity.
const COMPACT_EVERY_TICKS: u32 = 100;
/// After a stall, deadlines this soon after the resume are compensated too:
/// the heartbeats queued during the stall are still being read.
pub(crate) const RESUME_GRACE: Duration = Duration::from_secs(1);

/// Hasher of the id maps: foldhash, several times cheaper than SipHash on
/// the heartbeat path. Hash flooding needs inserts, and only the registry
/// inserts, with ids it generated (64 random bits); lookups of hostile ids
/// cannot degrade the table. Seeded randomly per process.
pub(crate) type IdHasher = foldhash::fast::RandomState;

/// A slot of the live table: the entry itself, hashed and compared by its id
/// (as `str`, so lookups take a `&str`). One pointer per slot where an
/// (id, entry) pair took three — at 1M executors, 16 B × 2M buckets.
#[derive(Clone)]
pub(crate) struct LiveEntry(pub(crate) Arc<Entry>);

impl std::ops::Deref for LiveEntry {
    type Target = Arc<Entry>;

    fn deref(&self) -> &Arc<Entry> {
        &self.0
    }
}

impl std::borrow::Borrow<str> for LiveEntry {
    fn borrow(&self) -> &str {
        self.0.id().as_str()
    }
}

impl std::hash::Hash for LiveEntry {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `str` hashes, which `Borrow<str>` requires.
        self.0.id().as_str().hash(state);
    }
}

impl PartialEq for LiveEntry {
    fn eq(&self, other: &Self) -> bool {
        self.0.id() == other.0.id()
    }
}

impl Eq for LiveEntry {}

/// State shared between the loop (sole writer of membership) and readers.
pub(crate) struct Shared {
    pub config: RegistryConfig,
    pub clock: Clock,
    /// Live executors; heartbeats CAS their state words here.
    pub live: DashMap<LiveEntry, (), IdHasher>,
    /// Ids expired or deregistered within the retention.
    pub tombstones: Tombstones,
    pub snapshot: ArcSwap<Snapshot>,
    pub events: broadcast::Sender<Event>,
    /// Live executors by status. Signed: a heartbeat moves INITING→RUNNING
    /// after its CAS while an expiry may already have counted the RUNNING
    /// one out, so a counter can dip below zero for an instant; readers clamp.
    pub initing: AtomicI64,
    pub running: AtomicI64,
    /// Live members (for the suggested interval), updated per turn.
    pub live_count: AtomicU64,
    pub observer: Arc<dyn Observer>,
    /// Entries whose deadline a heartbeat moved below their queued time.
    pub rearm: mpsc::UnboundedSender<Arc<Entry>>,
    /// The mass-expiry guard's state, published by the loop.
    pub guard: ArcSwap<ExpiryGuardStatus>,
}

impl Shared {
    /// Live executors with `status` (clamped at 0, see the counters).
    pub fn count_of(&self, status: Status) -> u64 {
        let counter = match status {
            Status::Initing => &self.initing,
            Status::Running => &self.running,
            Status::Tombstone => return 0,
        };
        u64::try_from(counter.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Moves the status counters for a transition out of `was`.
    pub fn count_leaving(&self, was: Status) {
        match was {
            Status::Initing => self.initing.fetch_sub(1, Ordering::Relaxed),
            Status::Running => self.running.fetch_sub(1, Ordering::Relaxed),
            Status::Tombstone => 0,
        };
    }
}

/// Where a registration's answer goes.
pub(crate) type RegisterReply = oneshot::Sender<Result<Arc<Entry>, RegistryError>>;

/// A request to the loop.
pub(crate) enum Command {
    Register {
        registration: ValidRegistration,
        reply: RegisterReply,
    },
    Deregister {
        id: String,
        reply: oneshot::Sender<Result<(), RegistryError>>,
    },
    /// Operator release of the mass-expiry guard: the number expired.
    ReleaseGuard { reply: oneshot::Sender<u64> },
}

struct PendingRegistration {
    id: ExecutorId,
    registration: ValidRegistration,
    registered_unix_ms: u64,
    reply: RegisterReply,
}

/// What one store batch carried, to settle once it commits or fails.
struct Submitted {
    registrations: Vec<PendingRegistration>,
    deletes: Vec<ExecutorId>,
}

struct InFlight {
    commit: Commit,
    submitted: Submitted,
}

/// A commit's answer; a store thread that went away is a failure too.
fn commit_outcome(
    answer: Result<(Result<(), StoreError>, Duration), oneshot::error::RecvError>,
) -> (Result<(), String>, Duration) {
    match answer {
        Ok((result, elapsed)) => (result.map_err(|e| e.0), elapsed),
        Err(_) => (Err("store thread stopped".to_owned()), Duration::ZERO),
    }
}

/// Everything that was ready at one wake-up.
#[derive(Default)]
struct Turn {
    expired: Vec<(Arc<Entry>, u64)>,
    /// A background purge finished (`None` inside: it failed).
    purged: Option<Option<Members>>,
    commands: Vec<Command>,
    rearm: Vec<Arc<Entry>>,
    committed: Option<(Submitted, Result<(), String>, Duration)>,
    housekeeping: bool,
    /// Entries left in the live table by a mass change wait to be moved out.
    unlink: bool,
    stop: bool,
}

impl Turn {
    fn is_empty(&self) -> bool {
        self.expired.is_empty()
            && self.purged.is_none()
            && self.commands.is_empty()
            && self.rearm.is_empty()
            && self.committed.is_none()
            && !self.housekeeping
            && !self.unlink
            && !self.stop
    }
}

/// Changes of one turn, published together.
#[derive(Default)]
struct Changes {
    events: Vec<Event>,
    registered: Vec<(RegisterReply, Arc<Entry>)>,
    deregistered: Vec<oneshot::Sender<Result<(), RegistryError>>>,
    lags: Vec<Duration>,
    /// Executors whose deadline was moved because of a stall.
    compensated: u64,
    /// Past their deadline, for the guard to decide on (guard on only).
    due: Vec<Arc<Entry>>,
    /// Executors the guard had held that expired in this turn.
    released: u64,
    /// Operator releases, answered after the turn is published.
    guard_releases: Vec<(oneshot::Sender<u64>, u64)>,
}

/// The ordered member map behind snapshots.
type Members = OrdMap<ExecutorId, Arc<Entry>>;

/// A purge in flight: the map without tombstones, built on a blocking
/// thread, and what was inserted since it started.
struct Purge {
    done: oneshot::Receiver<Members>,
    inserted: Vec<Arc<Entry>>,
}

/// The loop's private state.
pub(crate) struct MembershipLoop {
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    rearm: mpsc::UnboundedReceiver<Arc<Entry>>,
    queue: DelayQueue<(Arc<Entry>, u64)>,
    /// Every live member, plus tombstoned ones a mass change left in it.
    members: Members,
    /// Live members (the rest of `members` is tombstones left for a purge).
    live: usize,
    /// This turn leaves removed members in `members` (see [`BULK_REMOVALS`]).
    defer_removals: bool,
    purge: Option<Purge>,
    /// Tombstoned entries a mass change left in the live table, to be moved
    /// to the tombstone set by the following turns.
    unlinked: VecDeque<Arc<Entry>>,
    revision: u64,
    /// When each tombstone is forgotten.
    retention: Retention,
    /// Housekeeping ticks until the next [`Self::compact_tables`].
    ticks_to_compaction: u32,
    /// Ids handed out but not yet visible (registration being committed).
    reserved: HashSet<ExecutorId, IdHasher>,
    pending_registrations: Vec<PendingRegistration>,
    pending_deletes: Vec<ExecutorId>,
    /// Ids removed from membership whose store delete has not committed
    /// (pending or in flight). They are still rows in the store, so a new
    /// registration must not take one: its insert would collide with the
    /// row and fail the whole batch. Usually empty within milliseconds; it
    /// outlives the tombstone retention only while the store is failing.
    undeleted: HashSet<ExecutorId, IdHasher>,
    in_flight: Option<InFlight>,
    retry_deletes_at_ms: u64,
    /// When the previous turn ran (registry ms), for stall detection.
    last_turn_ms: u64,
    /// Recent stalls `(start, end)`: deadlines in `(start, end + grace]` are
    /// compensated rather than expired.
    stalls: VecDeque<(u64, u64)>,
    /// The mass-expiry guard, when configured.
    guard: Option<ExpiryGuard<Arc<Entry>>>,
    /// When set, expiries wait while it answers false (a replica whose
    /// leader lease is not confirmed).
    authority: Option<super::Authority>,
    store: StoreWorker,
    housekeeping: Interval,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
}

/// What a loop starts from: the stored executors, how some of them resume
/// (after a leader failover), and who may decide expiries.
pub(crate) struct Start {
    pub(crate) loaded: Vec<StoredExecutor>,
    pub(crate) resume: std::collections::HashMap<String, super::Resume>,
    pub(crate) authority: Option<super::Authority>,
}

impl MembershipLoop {
    pub(crate) fn new(
        shared: Arc<Shared>,
        commands: mpsc::Receiver<Command>,
        rearm: mpsc::UnboundedReceiver<Arc<Entry>>,
        store: StoreWorker,
        start: Start,
        stop: CancellationToken,
    ) -> Self {
        let Start {
            loaded,
            resume,
            authority,
        } = start;
        let mut housekeeping = tokio::time::interval(TICK);
        housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut this = Self {
            shared: shared.clone(),
            commands,
            rearm,
            queue: DelayQueue::new(),
            members: OrdMap::new(),
            live: 0,
            defer_removals: false,
            purge: None,
            unlinked: VecDeque::new(),
            revision: 0,
            retention: Retention::default(),
            ticks_to_compaction: COMPACT_EVERY_TICKS,
            reserved: HashSet::default(),
            pending_registrations: Vec::new(),
            pending_deletes: Vec::new(),
            undeleted: HashSet::default(),
            in_flight: None,
            retry_deletes_at_ms: 0,
            last_turn_ms: 0,
            stalls: VecDeque::new(),
            guard: shared.config.expiry_guard.map(ExpiryGuard::new),
            authority,
            store,
            housekeeping,
            stop: Box::pin(stop.cancelled_owned()),
        };
        this.load(loaded, resume);
        this
    }

    /// Start-up: every stored executor comes back INITING with a fresh init
    /// TTL (or, with a `resume` entry, its own TTL and time left). Those that
    /// heartbeat carry on; the others expire.
    fn load(
        &mut self,
        loaded: Vec<StoredExecutor>,
        resume: std::collections::HashMap<String, super::Resume>,
    ) {
        let now = self.shared.clock.now_ms();
        let ttl = duration_ms(self.shared.config.init_ttl);
        for row in loaded {
            let labels = match Labels::new(row.labels.iter().map(|(k, v)| (k, v))) {
                Ok(labels) => labels,
                Err(e) => {
                    tracing::warn!(id = %row.id, error = %e, "stored executor has invalid labels; loading it without them");
                    Labels::default()
                }
            };
            let id = ExecutorId::new(&row.id);
            let (ttl, left) = resume
                .get(&row.id)
                .map_or((ttl, ttl), |r| (duration_ms(r.ttl), duration_ms(r.left)));
            let entry = Arc::new(
                Entry::new(
                    id.clone(),
                    row.name.into(),
                    row.address.into(),
                    labels,
                    row.registered_unix_ms,
                    ttl,
                    now + left,
                )
                .with_owner(row.owner.map(Arc::from)),
            );
            self.insert_live(entry);
        }
        self.publish();
        tracing::info!(executors = self.live, "loaded stored membership");
    }

    /// Runs until stopped, then flushes pending store work.
    pub(crate) async fn run(mut self) {
        loop {
            // Gathering a turn must not be cut short by tokio's cooperative
            // budget (128 operations per task poll): DelayQueue polls a timer
            // per popped entry and so runs out after ~128, splitting one
            // expiry pass into many turns. A turn is bounded anyway (what
            // expired, MAX_COMMANDS_PER_TURN); the loop pays one unit of
            // budget per turn instead, so it still yields under a flood.
            let turn =
                tokio::task::unconstrained(std::future::poll_fn(|cx| self.poll_turn(cx))).await;
            let stop = turn.stop;
            self.apply(turn);
            self.submit_store_work();
            if stop {
                break;
            }
            tokio::task::consume_budget().await;
        }
        self.finish().await;
    }

    fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<Turn> {
        let mut turn = Turn::default();
        // Expired queue entries first, all of them: one pass. Without the
        // authority to decide expiries they stay queued (the housekeeping
        // tick brings the next turn).
        let may_expire = self.authority.as_ref().is_none_or(|may| may());
        while may_expire && let Poll::Ready(Some(expired)) = self.queue.poll_expired(cx) {
            let (entry, armed) = expired.into_inner();
            turn.expired.push((entry, armed));
        }
        if let Some(purge) = self.purge.as_mut()
            && let Poll::Ready(result) = Pin::new(&mut purge.done).poll(cx)
        {
            turn.purged = Some(result.ok());
        }
        if let Some(in_flight) = self.in_flight.as_mut()
            && let Poll::Ready(result) = Pin::new(&mut in_flight.commit).poll(cx)
        {
            let in_flight = self.in_flight.take().expect("in_flight was Some");
            let (result, elapsed) = commit_outcome(result);
            turn.committed = Some((in_flight.submitted, result, elapsed));
        }
        while turn.commands.len() < MAX_COMMANDS_PER_TURN {
            match self.commands.poll_recv(cx) {
                Poll::Ready(Some(command)) => turn.commands.push(command),
                Poll::Ready(None) => {
                    turn.stop = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        while turn.rearm.len() < MAX_COMMANDS_PER_TURN {
            match self.rearm.poll_recv(cx) {
                Poll::Ready(Some(entry)) => turn.rearm.push(entry),
                _ => break,
            }
        }
        if self.housekeeping.poll_tick(cx).is_ready() {
            turn.housekeeping = true;
        }
        turn.unlink = !self.unlinked.is_empty();
        if self.stop.as_mut().poll(cx).is_ready() {
            turn.stop = true;
        }
        if turn.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(turn)
        }
    }

    fn apply(&mut self, turn: Turn) {
        let now = self.shared.clock.now_ms();
        self.detect_stall(now);
        let mut changes = Changes::default();
        if let Some(result) = turn.purged {
            self.purged(result);
        }
        self.defer_removals = turn.expired.len() >= BULK_REMOVALS;
        if let Some((in_flight, result, elapsed)) = turn.committed {
            self.committed(in_flight, result, elapsed, now, &mut changes);
        }
        for (entry, armed) in turn.expired {
            self.expire_or_rearm(entry, armed, now, &mut changes);
        }
        self.guard_turn(now, turn.housekeeping, &mut changes);
        for entry in turn.rearm {
            let deadline = entry.state().deadline_ms();
            if entry.status() != Status::Tombstone && deadline < entry.armed_ms() {
                self.arm(entry, deadline);
            }
        }
        for command in turn.commands {
            match command {
                Command::Register {
                    registration,
                    reply,
                } => {
                    if turn.stop {
                        let _ = reply.send(Err(RegistryError::ShuttingDown));
                        continue;
                    }
                    let max = self.shared.config.max_executors;
                    if self.live + self.reserved.len() >= max {
                        self.shared
                            .observer
                            .registration(RegistrationResult::Unavailable);
                        let _ = reply.send(Err(RegistryError::ResourceExhausted(format!(
                            "the registry holds its maximum of {max} executors (--max-executors)"
                        ))));
                        continue;
                    }
                    let id = self.new_id(&registration.name);
                    self.reserved.insert(id.clone());
                    self.pending_registrations.push(PendingRegistration {
                        id,
                        registration,
                        registered_unix_ms: unix_now_ms(),
                        reply,
                    });
                }
                Command::Deregister { id, reply } => {
                    let result = self.deregister(&id, &mut changes);
                    match result {
                        Ok(()) => changes.deregistered.push(reply),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Command::ReleaseGuard { reply } => {
                    let released = self.guard.as_mut().map(|g| g.release(now));
                    let before = changes.released;
                    for entry in released.into_iter().flatten() {
                        self.expire(entry, now, true, &mut changes);
                    }
                    // Answered once the turn is published.
                    let count = changes.released - before;
                    changes.guard_releases.push((reply, count));
                }
            }
        }
        if turn.unlink {
            self.unlink_some();
        }
        if turn.housekeeping {
            self.housekeeping(now);
        }
        let guard_releases = std::mem::take(&mut changes.guard_releases);
        self.finish_turn(changes);
        self.publish_guard();
        for (reply, released) in guard_releases {
            let _ = reply.send(released);
        }
        self.defer_removals = false;
        self.start_purge();
    }

    /// Moves up to [`UNLINK_PER_TURN`] entries left in the live table by a
    /// mass change into the tombstone set (tombstone first, so a heartbeat
    /// always finds one or the other).
    fn unlink_some(&mut self) {
        let n = self.unlinked.len().min(UNLINK_PER_TURN);
        for entry in self.unlinked.drain(..n) {
            let id = entry.id();
            self.shared.tombstones.insert(id.as_str());
            self.shared
                .live
                .remove_if(id.as_str(), |live, ()| Arc::ptr_eq(live, &entry));
        }
    }

    /// Starts a background purge when enough tombstones were left in the
    /// map: a clone (O(1)) rebuilt without them on a blocking thread.
    fn start_purge(&mut self) {
        let dead = self.members.len() - self.live;
        if self.purge.is_some() || dead < PURGE_MIN || dead * 16 < self.members.len() {
            return;
        }
        let members = self.members.clone();
        let (done, result) = oneshot::channel();
        tokio::task::spawn_blocking(move || {
            let purged: Members = members
                .iter()
                .filter(|(_, entry)| entry.status() != Status::Tombstone)
                .map(|(id, entry)| (id.clone(), entry.clone()))
                .collect();
            drop(members);
            let _ = done.send(purged);
        });
        self.purge = Some(Purge {
            done: result,
            inserted: Vec::new(),
        });
    }

    /// A purge finished: its map, plus what was inserted since, becomes the
    /// members (tombstoned meanwhile or not: `live` stays exact, and what
    /// the purge kept is left for the next one). Republished at the same
    /// revision: readers skip tombstones, so they see no difference.
    fn purged(&mut self, result: Option<Members>) {
        let Some(purge) = self.purge.take() else {
            return;
        };
        let Some(mut purged) = result else {
            tracing::warn!("purging expired members failed; retrying later");
            return;
        };
        for entry in purge.inserted {
            if entry.status() != Status::Tombstone {
                purged.insert(entry.id().clone(), entry);
            }
        }
        let old = std::mem::replace(&mut self.members, purged);
        self.release(old);
        self.store_snapshot();
    }

    /// Drops a replaced map or snapshot: on a blocking thread when large.
    fn release<T: Send + 'static>(&self, old: T) {
        if self.members.len() >= OFFLOAD_DROP_MIN {
            tokio::task::spawn_blocking(move || drop(old));
        }
    }

    /// A commit finished: registrations become visible (or are refused);
    /// failed deletes are retried later.
    fn committed(
        &mut self,
        submitted: Submitted,
        result: Result<(), String>,
        elapsed: Duration,
        now: u64,
        changes: &mut Changes,
    ) {
        let ok = result.is_ok();
        self.shared.observer.store_operation("commit", elapsed, ok);
        match result {
            Ok(()) => {
                for id in &submitted.deletes {
                    self.undeleted.remove(id);
                }
                let ttl = duration_ms(self.shared.config.init_ttl);
                for pending in submitted.registrations {
                    self.reserved.remove(&pending.id);
                    let ValidRegistration {
                        name,
                        address,
                        labels,
                        owner,
                    } = pending.registration;
                    let entry = Arc::new(
                        Entry::new(
                            pending.id,
                            name.into(),
                            address.into(),
                            labels,
                            pending.registered_unix_ms,
                            ttl,
                            now + ttl,
                        )
                        .with_owner(owner),
                    );
                    self.insert_live(entry.clone());
                    let revision = self.next_revision();
                    changes.events.push(Event {
                        revision,
                        kind: EventKind::Online,
                        entry: entry.clone(),
                    });
                    changes.registered.push((pending.reply, entry));
                }
            }
            Err(error) => {
                tracing::warn!(%error, registrations = submitted.registrations.len(), deletes = submitted.deletes.len(), "store commit failed");
                for pending in submitted.registrations {
                    self.reserved.remove(&pending.id);
                    self.shared
                        .observer
                        .registration(RegistrationResult::Unavailable);
                    let _ = pending
                        .reply
                        .send(Err(RegistryError::Unavailable(error.clone())));
                }
                self.pending_deletes.extend(submitted.deletes);
                self.retry_deletes_at_ms = now + duration_ms(DELETE_RETRY);
            }
        }
    }

    fn expire_or_rearm(&mut self, entry: Arc<Entry>, armed: u64, now: u64, changes: &mut Changes) {
        if armed != entry.armed_ms() {
            // A re-arm queued it again, earlier; that queue entry is the live one.
            return;
        }
        let state = entry.state();
        if state.status() != Status::Tombstone
            && state.deadline_ms() <= now
            && let Some(compensated) = self.compensated_deadline(state.deadline_ms())
        {
            // Its heartbeat may be among those the stall kept us from reading.
            entry.extend_deadline_to(compensated);
            changes.compensated += 1;
            let deadline = entry.state().deadline_ms();
            self.arm(entry, deadline);
            return;
        }
        if self.guard.is_some() && state.status() != Status::Tombstone && state.deadline_ms() <= now
        {
            // The guard decides for the whole pass (`guard_turn`).
            changes.due.push(entry);
            return;
        }
        self.expire(entry, now, false, changes);
    }

    /// Tombstones `entry` if its deadline passed (else queues it again) and
    /// records the OFFLINE event. `held`: the guard held it, so the time
    /// since its deadline is the hold, not expiry lag.
    fn expire(&mut self, entry: Arc<Entry>, now: u64, held: bool, changes: &mut Changes) {
        match entry.try_expire(now) {
            Expiry::Alive { deadline_ms } => self.arm(entry, deadline_ms),
            Expiry::Expired { deadline_ms, was } => {
                self.shared.count_leaving(was);
                if held {
                    changes.released += 1;
                } else {
                    changes
                        .lags
                        .push(Duration::from_millis(now.saturating_sub(deadline_ms)));
                }
                self.remove_live(&entry, now);
                let revision = self.next_revision();
                changes.events.push(Event {
                    revision,
                    kind: EventKind::Offline(OfflineReason::Expired),
                    entry,
                });
            }
            Expiry::AlreadyTombstone => {}
        }
    }

    fn deregister(&mut self, id: &str, changes: &mut Changes) -> Result<(), RegistryError> {
        let entry = self
            .shared
            .live
            .get(id)
            .map(|slot| slot.key().0.clone())
            .ok_or_else(|| RegistryError::NotFound(id.to_owned()))?;
        let was = entry
            .tombstone()
            .ok_or_else(|| RegistryError::NotFound(id.to_owned()))?;
        self.shared.count_leaving(was);
        let now = self.shared.clock.now_ms();
        self.remove_live(&entry, now);
        let revision = self.next_revision();
        changes.events.push(Event {
            revision,
            kind: EventKind::Offline(OfflineReason::Deregistered),
            entry,
        });
        Ok(())
    }

    fn insert_live(&mut self, entry: Arc<Entry>) {
        let id = entry.id().clone();
        self.shared.initing.fetch_add(1, Ordering::Relaxed);
        self.shared.live.insert(LiveEntry(entry.clone()), ());
        self.members.insert(id, entry.clone());
        self.live += 1;
        if let Some(purge) = self.purge.as_mut() {
            purge.inserted.push(entry.clone());
        }
        let deadline = entry.state().deadline_ms();
        self.arm(entry, deadline);
    }

    /// Takes a (tombstoned) entry out of the live set; the id is remembered
    /// as a tombstone for the retention, and deleted from the store.
    fn remove_live(&mut self, entry: &Arc<Entry>, now: u64) {
        let id = entry.id().clone();
        self.live -= 1;
        let fingerprint = if self.defer_removals {
            // The tombstoned entry answers heartbeats where it is; the next
            // turns move it out of the live table, a purge out of `members`.
            self.unlinked.push_back(entry.clone());
            self.shared.tombstones.fingerprint(id.as_str())
        } else {
            // Tombstone first, so a heartbeat that misses the live table
            // finds it.
            let fingerprint = self.shared.tombstones.insert(id.as_str());
            self.shared.live.remove(id.as_str());
            self.members.remove(&id);
            fingerprint
        };
        self.retention.push(
            now + duration_ms(self.shared.config.tombstone_retention),
            fingerprint,
        );
        self.undeleted.insert(id.clone());
        self.pending_deletes.push(id);
    }

    fn arm(&mut self, entry: Arc<Entry>, deadline_ms: u64) {
        entry.set_armed_ms(deadline_ms);
        let at = self.shared.clock.instant_at(deadline_ms);
        self.queue.insert_at((entry, deadline_ms), at);
    }

    /// Notes a stall if this turn came much later than the tick allows, and
    /// forgets stalls whose compensation window has passed.
    fn detect_stall(&mut self, now: u64) {
        let threshold = self.shared.config.stall_threshold;
        let gap = now.saturating_sub(self.last_turn_ms);
        self.last_turn_ms = now;
        let grace = duration_ms(RESUME_GRACE);
        while let Some(&(_, end)) = self.stalls.front() {
            if end + grace >= now {
                break;
            }
            self.stalls.pop_front();
        }
        if threshold.is_zero() || gap <= duration_ms(TICK + threshold) {
            return;
        }
        let stalled_ms = gap - duration_ms(TICK);
        tracing::warn!(
            stalled_ms,
            "the registry was stalled (paused, starved or blocked); deadlines that fell in the stall move by its length"
        );
        self.shared
            .observer
            .stalled(Duration::from_millis(stalled_ms));
        self.stalls.push_back((now - stalled_ms, now));
    }

    /// If a deadline fell in a recent stall (or its resume grace), the
    /// deadline it gets instead: moved by the stall's length, and at least to
    /// the end of the grace — which lies outside the window, so no deadline
    /// is compensated twice.
    fn compensated_deadline(&self, deadline_ms: u64) -> Option<u64> {
        let grace = duration_ms(RESUME_GRACE);
        self.stalls
            .iter()
            .find(|&&(start, end)| deadline_ms > start && deadline_ms < end + grace)
            .map(|&(start, end)| (deadline_ms + (end - start)).max(end + grace))
    }

    /// Every [`TICK`]: tombstones past their retention are forgotten, the
    /// table sizes reported, and now and then the tables compacted.
    fn housekeeping(&mut self, now: u64) {
        // An id still waiting to be unlinked is not in the tombstone set
        // yet: forgetting waits for the (few) turns that move it there.
        if self.unlinked.is_empty() {
            self.retention.forget_due(now, &self.shared.tombstones);
        }
        self.shared
            .observer
            .tables(self.retention.len() as u64, self.queue.len() as u64);
        self.ticks_to_compaction = self.ticks_to_compaction.saturating_sub(1);
        if self.ticks_to_compaction == 0 {
            self.ticks_to_compaction = COMPACT_EVERY_TICKS;
            self.compact_tables();
        }
    }

    /// Gives back the capacity a burst (a mass expiry or deregistration, a
    /// fleet that shrank) left in the tables: each is compacted only when it
    /// is several times larger than what it holds (see
    /// [`super::tombstones::oversized`]), so steady churn never compacts.
    fn compact_tables(&mut self) {
        self.retention.compact(&self.shared.tombstones);
        let live = &self.shared.live;
        if oversized(live.capacity(), live.len()) {
            live.shrink_to_fit();
        }
        if oversized(self.undeleted.capacity(), self.undeleted.len()) {
            self.undeleted.shrink_to_fit();
        }
        if oversized(self.reserved.capacity(), self.reserved.len()) {
            self.reserved.shrink_to_fit();
        }
        if oversized(self.unlinked.capacity(), self.unlinked.len()) {
            self.unlinked.shrink_to_fit();
        }
        self.compact_wheel();
    }

    /// Rebuilds the timing wheel when its slab is several times larger than
    /// the live set. The slab keeps the capacity of its peak (its entries
    /// cannot move), and a deregistered entry stays queued until its
    /// deadline, so a burst of departures would otherwise keep its memory.
    /// The new wheel holds each live member once, at the deadline it is armed
    /// for (the one queue entry [`Self::expire_or_rearm`] acts on); what the
    /// old one held besides — departed entries, superseded re-arms — needs
    /// no timer. Not while the guard holds executors (they are live but out
    /// of the wheel, and go back to it on their own).
    fn compact_wheel(&mut self) {
        if !oversized(self.queue.capacity(), self.live)
            || self.guard.as_ref().is_some_and(|g| g.holding())
        {
            return;
        }
        // Room for half as many again, so the churn that follows does not
        // double the new slab at once.
        let mut queue = DelayQueue::with_capacity(self.live + self.live / 2);
        for entry in self.members.values() {
            if entry.status() == Status::Tombstone {
                continue;
            }
            let deadline = entry.armed_ms();
            let at = self.shared.clock.instant_at(deadline);
            queue.insert_at((entry.clone(), deadline), at);
        }
        let old = std::mem::replace(&mut self.queue, queue);
        self.release(old);
    }

    /// The guard's part of a turn: the pass's due executors expire or are
    /// held; on housekeeping ticks the held ones are reviewed (revived ones
    /// queued again, released ones expired, in this one pass).
    fn guard_turn(&mut self, now: u64, review: bool, changes: &mut Changes) {
        let Some(guard) = self.guard.as_mut() else {
            return;
        };
        let live = self.live as u64;
        let due: Vec<_> = changes
            .due
            .drain(..)
            .map(|e| {
                let ttl_ms = e.ttl_ms();
                (e, ttl_ms)
            })
            .collect();
        let expire = match guard.pass(due, live, now) {
            Pass::Expire(entries) => entries,
            Pass::Held => Vec::new(),
        };
        let review = if review {
            guard.review(live, now, |entry| Held::of(entry, now))
        } else {
            Default::default()
        };
        for entry in expire {
            self.expire(entry, now, false, changes);
        }
        for entry in review.revived {
            let deadline = entry.state().deadline_ms();
            self.arm(entry, deadline);
        }
        if review.released.len() >= BULK_REMOVALS {
            self.defer_removals = true;
        }
        for entry in review.released {
            self.expire(entry, now, true, changes);
        }
    }

    /// Publishes the guard's state when it changed; the observer hears of
    /// every change of whether it holds.
    fn publish_guard(&mut self) {
        let Some(guard) = &self.guard else {
            return;
        };
        let status = guard.status(|ms| self.shared.clock.unix_ms(ms));
        let published = self.shared.guard.load();
        if **published == status {
            return;
        }
        if published.active != status.active || published.held != status.held {
            self.shared
                .observer
                .expiry_guard(status.active, status.held);
        }
        drop(published);
        self.shared.guard.store(Arc::new(status));
    }

    fn next_revision(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    /// A fresh id, unique among live ids (which include every stored
    /// executor: all are loaded at start), tombstones, ids being registered,
    /// and ids still in the store awaiting their delete.
    fn new_id(&self, name: &str) -> ExecutorId {
        let name = if name.is_empty() { "executor" } else { name };
        loop {
            let id = ExecutorId::new(&format!("{name}-{:016x}", id_suffix()));
            if !self.shared.live.contains_key(id.as_str())
                && !self.shared.tombstones.contains(id.as_str())
                && !self.reserved.contains(&id)
                && !self.undeleted.contains(&id)
            {
                return id;
            }
        }
    }

    /// Publishes the snapshot, then the events, then answers callers.
    fn finish_turn(&mut self, changes: Changes) {
        if changes.compensated > 0 {
            tracing::warn!(
                executors = changes.compensated,
                "deadlines moved by the stall's length instead of expiring"
            );
        }
        if changes.events.is_empty() {
            return;
        }
        self.publish();
        let mut online = 0;
        for event in &changes.events {
            if event.kind == EventKind::Online {
                online += 1;
            }
            // No receiver is not an error: nobody is watching.
            let _ = self.shared.events.send(event.clone());
        }
        let observer = &self.shared.observer;
        observer.events(online, changes.events.len() as u64 - online);
        if changes.released > 0 {
            observer.released(changes.released);
        }
        if !changes.lags.is_empty() {
            observer.expired(&changes.lags);
            let max = changes.lags.iter().max().copied().unwrap_or_default();
            tracing::info!(
                expired = changes.lags.len(),
                max_lag_ms = max.as_millis() as u64,
                revision = self.revision,
                "expiry pass"
            );
        }
        for (reply, entry) in changes.registered {
            observer.registration(RegistrationResult::Ok);
            let _ = reply.send(Ok(entry));
        }
        for reply in changes.deregistered {
            observer.deregistered();
            let _ = reply.send(Ok(()));
        }
    }

    fn publish(&mut self) {
        self.store_snapshot();
        let shared = &self.shared;
        shared.observer.membership(
            self.revision,
            shared.count_of(Status::Initing),
            shared.count_of(Status::Running),
        );
    }

    /// Replaces the snapshot with the current members and revision.
    fn store_snapshot(&mut self) {
        let snapshot = Snapshot::new(self.revision, self.members.clone(), self.live);
        let old = self.shared.snapshot.swap(Arc::new(snapshot));
        self.shared
            .live_count
            .store(self.live as u64, Ordering::Relaxed);
        self.release(old);
    }

    /// Sends the next store batch if none is in flight: every pending
    /// registration, and deletes (chunked; held back for a while after a
    /// failure, but never holding a registration back).
    fn submit_store_work(&mut self) {
        if self.in_flight.is_some() {
            return;
        }
        let now = self.shared.clock.now_ms();
        let registrations = std::mem::take(&mut self.pending_registrations);
        let deletes = if now >= self.retry_deletes_at_ms {
            let n = self.pending_deletes.len().min(MAX_DELETES_PER_COMMIT);
            self.pending_deletes.drain(..n).collect()
        } else {
            Vec::new()
        };
        if registrations.is_empty() && deletes.is_empty() {
            return;
        }
        let batch = Batch {
            inserts: registrations
                .iter()
                .map(|p| StoredExecutor {
                    id: p.id.as_str().to_owned(),
                    name: p.registration.name.clone(),
                    address: p.registration.address.clone(),
                    labels: p
                        .registration
                        .labels
                        .iter()
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect(),
                    registered_unix_ms: p.registered_unix_ms,
                    owner: p.registration.owner.as_deref().map(str::to_owned),
                })
                .collect(),
            deletes: deletes.iter().map(|id| id.as_str().to_owned()).collect(),
        };
        self.in_flight = Some(InFlight {
            commit: self.store.submit(batch),
            submitted: Submitted {
                registrations,
                deletes,
            },
        });
    }

    /// After stop: refuse what is queued, let the in-flight commit land,
    /// flush the pending deletes once, and close the store.
    async fn finish(mut self) {
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Register { reply, .. } => {
                    let _ = reply.send(Err(RegistryError::ShuttingDown));
                }
                Command::Deregister { reply, .. } => {
                    let _ = reply.send(Err(RegistryError::ShuttingDown));
                }
                // Dropped unanswered: the caller sees the registry stopping.
                Command::ReleaseGuard { .. } => {}
            }
        }
        for pending in std::mem::take(&mut self.pending_registrations) {
            self.reserved.remove(&pending.id);
            let _ = pending.reply.send(Err(RegistryError::ShuttingDown));
        }
        if let Some(in_flight) = self.in_flight.take() {
            let (result, elapsed) = commit_outcome(in_flight.commit.await);
            let now = self.shared.clock.now_ms();
            let mut changes = Changes::default();
            self.committed(in_flight.submitted, result, elapsed, now, &mut changes);
            self.finish_turn(changes);
        }
        let mut flushed = 0;
        while !self.pending_deletes.is_empty() {
            self.retry_deletes_at_ms = 0;
            self.submit_store_work();
            let Some(in_flight) = self.in_flight.take() else {
                break;
            };
            let (result, elapsed) = commit_outcome(in_flight.commit.await);
            let observer = &self.shared.observer;
            observer.store_operation("commit", elapsed, result.is_ok());
            if let Err(error) = result {
                tracing::warn!(
                    %error,
                    left = self.pending_deletes.len() + in_flight.submitted.deletes.len(),
                    "could not flush deletes at shutdown; they expire at the next start"
                );
                break;
            }
            flushed += in_flight.submitted.deletes.len();
        }
        if flushed > 0 {
            tracing::info!(deletes = flushed, "flushed pending deletes at shutdown");
        }
        self.store.close();
        tracing::info!(revision = self.revision, "membership loop stopped");
    }
}

/// The random 64 bits of a new id.
fn id_suffix() -> u64 {
    #[cfg(test)]
    if let Some(forced) = FORCED_ID_SUFFIXES.with_borrow_mut(|queue| queue.pop_front()) {
        return forced;
    }
    rand::random()
}

#[cfg(test)]
thread_local! {
    /// Suffixes [`id_suffix`] returns before random ones, on the thread the
    /// loop runs on (a current-thread test runtime): tests force an id
    /// collision with them.
    pub(crate) static FORCED_ID_SUFFIXES: std::cell::RefCell<VecDeque<u64>> =
        const { std::cell::RefCell::new(VecDeque::new()) };
}

/// Whole milliseconds of a duration (saturating).
pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
