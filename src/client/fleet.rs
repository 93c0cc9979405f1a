//! A scheduler's view of the live fleet, kept from `WatchExecutors`.
//!
//! Owns: one background task per [`FleetView`], the only writer of the
//! view's [`Fleet`] (published through an `ArcSwap`, so readers never lock
//! and never wait), the only sender of its changes, and the counters of its
//! re-watches ([`FleetView::resumes`], [`FleetView::resyncs`]).
//!
//! Invariants:
//!
//! - The published fleet is the registry's live set, each member with its
//!   status (INITING or RUNNING), as of [`Fleet::revision`]: a whole
//!   snapshot (its chunks are gathered until the one with `more = false`
//!   before any is applied), plus every event after it, applied in
//!   revision order. An event whose revision is not the next one, or that
//!   contradicts the fleet (RUNNING for an id not held as INITING, OFFLINE
//!   for an id not held), ends the watch, and the next watch starts from a
//!   fresh snapshot.
//! - Every change to the published fleet after [`FleetView::connect`]
//!   returned is sent on the change channel, in order, *after* it is
//!   published: when a change is received, [`FleetView::members`] already
//!   holds it (or something newer).
//! - When a watch ends — RESOURCE_EXHAUSTED (the view fell out of the
//!   registry's `--watch-history`), UNAVAILABLE (restart, failover), a
//!   network error — the task watches again with `start_revision` = the last
//!   revision it applied (at once after a lag, unless watches keep lagging
//!   within a second; otherwise at the next endpoint, after a backoff). The
//!   first message says how the new watch starts:
//!   - an event (the one after that revision): the registry still held
//!     every event the view had not seen, so the view **resumes** — it goes
//!     on applying events; nothing was missed, nothing is diffed;
//!   - a snapshot: it did not, so the view **resyncs** — it diffs the
//!     snapshot against the fleet and sends the difference as changes
//!     marked `resync: true`. Only executors that came *and* went while no
//!     watch was open are never seen, as if the consumer had looked away
//!     for that long.
//!
//!   Either way a consumer that applies every change to the fleet it
//!   started from holds the registry's live set. Revisions never go
//!   backwards, across registry restarts too, so a revision from before a
//!   restart always gets a snapshot, never a resume in the wrong history.
//!
//! The change channel is unbounded on purpose: the view must neither drop a
//! change nor slow its watch (slowing it is what makes the registry end it).
//! A consumer that never calls [`FleetView::next_change`] makes it grow;
//! one that only needs the current fleet can read [`FleetView::members`]
//! or [`FleetView::schedulable`].
//!
//! Statuses: an executor is INITING from its registration (or from a
//! restarted registry reloading it) until a heartbeat is accepted, then
//! RUNNING — a `RUNNING` event, [`FleetChange::Running`] here. Only RUNNING
//! executors should be given work: [`Fleet::running`] and
//! [`FleetView::schedulable`] hold just those, as `ListExecutors` with
//! `status = RUNNING` would at the same revision.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use imbl::OrdMap;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::{Code, Streaming};

use super::backoff::{Backoff, Retry};
use super::endpoints::{ChannelOptions, DEFAULT_ENDPOINT, Endpoints};
use super::error::{Attempt, ClientError, retryable, status_text};
use crate::proto::{self, WatchExecutorsRequest, WatchExecutorsResponse, watch_executors_response};

/// An executor's status, as far as the view knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemberStatus {
    /// Registered, or reloaded by a restarted registry, and no heartbeat
    /// accepted since: not to be given work yet.
    Initing,
    /// Heartbeating: schedulable.
    Running,
}

impl MemberStatus {
    /// The wire status: RUNNING is running, anything else (INITING, or
    /// unset by an older registry) is not.
    fn from_wire(status: i32) -> Self {
        if status == proto::ExecutorStatus::Running as i32 {
            Self::Running
        } else {
            Self::Initing
        }
    }
}

/// A live executor as the view knows it: what the watch carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its id.
    pub id: String,
    /// `host:port` where it serves.
    pub address: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// INITING or RUNNING.
    pub status: MemberStatus,
}

impl Member {
    /// Whether it is RUNNING (schedulable).
    pub fn is_running(&self) -> bool {
        self.status == MemberStatus::Running
    }

    /// The same executor, only RUNNING where this one is INITING: what a
    /// RUNNING event changes.
    fn became_running(&self, now: &Member) -> bool {
        self.status == MemberStatus::Initing
            && now.status == MemberStatus::Running
            && self.id == now.id
            && self.address == now.address
            && self.labels == now.labels
    }
}

fn labels_of(labels: &std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

impl From<&proto::Executor> for Member {
    fn from(e: &proto::Executor) -> Self {
        Self {
            id: e.id.clone(),
            address: e.address.clone(),
            labels: labels_of(&e.labels),
            status: MemberStatus::from_wire(e.status),
        }
    }
}

impl From<&proto::ExecutorEvent> for Member {
    /// The executor an ONLINE or RUNNING event is about, with the status
    /// the event gives it.
    fn from(e: &proto::ExecutorEvent) -> Self {
        let status = if e.r#type == proto::EventType::Running as i32 {
            MemberStatus::Running
        } else {
            MemberStatus::from_wire(e.status)
        };
        Self {
            id: e.executor_id.clone(),
            address: e.address.clone(),
            labels: labels_of(&e.labels),
            status,
        }
    }
}

/// An immutable copy of the live fleet at one revision. Cloning is O(1).
#[derive(Clone, Default)]
pub struct Fleet {
    revision: u64,
    members: OrdMap<String, Arc<Member>>,
    /// The RUNNING members: an index over `members`, sharing its entries.
    running: OrdMap<String, Arc<Member>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("revision", &self.revision)
            .field("members", &self.members.len())
            .field("running", &self.running.len())
            .finish()
    }
}

impl Fleet {
    /// The registry revision this fleet is consistent with: the last one
    /// the view applied. Revisions never go backwards, across registry
    /// restarts too.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Number of live executors, INITING and RUNNING.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True when no executor is live.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// One executor.
    pub fn get(&self, id: &str) -> Option<&Member> {
        self.members.get(id).map(|m| &**m)
    }

    /// Whether `id` is live.
    pub fn contains(&self, id: &str) -> bool {
        self.members.contains_key(id)
    }

    /// Every live executor, INITING and RUNNING, sorted by id.
    pub fn iter(&self) -> impl Iterator<Item = &Member> {
        self.members.values().map(|m| &**m)
    }

    /// The RUNNING executors — the schedulable ones — sorted by id: what
    /// `ListExecutors` with `status = RUNNING` lists at [`revision`](Self::revision).
    pub fn running(&self) -> impl Iterator<Item = &Member> {
        self.running.values().map(|m| &**m)
    }

    /// Number of RUNNING executors. O(1).
    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    /// Holds `member` (in place of one with its id), in the RUNNING index
    /// if it is RUNNING.
    fn insert(&mut self, member: Arc<Member>) {
        if member.is_running() {
            self.running.insert(member.id.clone(), member.clone());
        } else {
            self.running.remove(&member.id);
        }
        self.members.insert(member.id.clone(), member);
    }

    /// Forgets `id`; what it held.
    fn remove(&mut self, id: &str) -> Option<Arc<Member>> {
        self.running.remove(id);
        self.members.remove(id)
    }
}

/// Why an executor left, as far as the view knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfflineReason {
    /// Its lease ran out.
    Expired,
    /// It left gracefully.
    Deregistered,
    /// It was gone from the snapshot of a new watch (a resync): the event
    /// itself was not seen, so neither was its cause.
    Unknown,
}

/// One change to the live fleet. `revision` is the fleet's revision once
/// the change is applied: the event's, or on a resync the snapshot's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetChange {
    /// An executor joined the live set. From an event it is INITING; on a
    /// resync it has the status the snapshot gave it, RUNNING included
    /// (no separate [`FleetChange::Running`] follows).
    Online {
        /// The executor.
        member: Member,
        /// The fleet's revision with it.
        revision: u64,
        /// True when learned from a resync (the view's watch had ended and
        /// this executor was in the next snapshot but not in the view).
        resync: bool,
    },
    /// A live INITING executor became RUNNING (its first heartbeat was
    /// accepted): it can be given work from now on.
    Running {
        /// The executor, now RUNNING.
        member: Member,
        /// The fleet's revision with it RUNNING.
        revision: u64,
        /// True when learned from a resync (the view held it INITING and
        /// the next snapshot had it RUNNING).
        resync: bool,
    },
    /// An executor left the live set.
    Offline {
        /// Its id.
        id: String,
        /// Why, when the event was seen ([`OfflineReason::Unknown`] on a
        /// resync).
        reason: OfflineReason,
        /// The fleet's revision without it.
        revision: u64,
        /// True when learned from a resync. A resync also sends `Offline`
        /// then `Online` for an executor it finds changed otherwise (a
        /// restarted registry reloaded it as INITING).
        resync: bool,
    },
}

impl FleetChange {
    /// The executor it is about.
    pub fn id(&self) -> &str {
        match self {
            Self::Online { member, .. } | Self::Running { member, .. } => &member.id,
            Self::Offline { id, .. } => id,
        }
    }

    /// The fleet's revision once it is applied.
    pub fn revision(&self) -> u64 {
        match self {
            Self::Online { revision, .. }
            | Self::Running { revision, .. }
            | Self::Offline { revision, .. } => *revision,
        }
    }

    /// Whether it came from a resync rather than from an event.
    pub fn is_resync(&self) -> bool {
        match self {
            Self::Online { resync, .. }
            | Self::Running { resync, .. }
            | Self::Offline { resync, .. } => *resync,
        }
    }
}

/// Where a view watches, and how it retries.
#[derive(Debug, Clone)]
pub struct FleetViewOptions {
    /// Registry endpoints, tried in turn.
    pub endpoints: Vec<String>,
    /// Pacing of re-watches after a failure.
    pub backoff: Backoff,
    /// Settings of every connection.
    pub channel: ChannelOptions,
    /// [`FleetView::connect_with`] gives up with [`ClientError::Unreachable`]
    /// after this long without a snapshot; `None` keeps trying until the
    /// caller drops the future.
    pub give_up_after: Option<Duration>,
}

impl Default for FleetViewOptions {
    fn default() -> Self {
        Self {
            endpoints: vec![DEFAULT_ENDPOINT.to_owned()],
            backoff: Backoff::default(),
            channel: ChannelOptions::default(),
            give_up_after: None,
        }
    }
}

impl FleetViewOptions {
    /// Defaults, at these endpoints.
    pub fn new<I, S>(endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }
}

/// State the task writes and the handle reads.
struct Shared {
    fleet: ArcSwap<Fleet>,
    resyncs: AtomicU64,
    resumes: AtomicU64,
}

/// A local, always-consistent copy of the live fleet, and the stream of its
/// changes. Dropping it ends its background task.
pub struct FleetView {
    shared: Arc<Shared>,
    changes: mpsc::UnboundedReceiver<FleetChange>,
    _guard: DropGuard,
}

impl std::fmt::Debug for FleetView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetView")
            .field("fleet", &*self.shared.fleet.load())
            .field("resumes", &self.resumes())
            .field("resyncs", &self.resyncs())
            .finish()
    }
}

type WatchStream = Streaming<WatchExecutorsResponse>;

impl FleetView {
    /// Watches the registry at `endpoints` with default options; resolves
    /// once the first snapshot (every chunk of it) is applied. Retries until
    /// it gets one (wrap it in a timeout, or use
    /// [`connect_with`](Self::connect_with) and `give_up_after`, to bound
    /// that). Cancel-safe.
    pub async fn connect<I, S>(endpoints: I) -> Result<Self, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::connect_with(FleetViewOptions::new(endpoints)).await
    }

    /// [`connect`](Self::connect) with options. Errors: a bad endpoint list,
    /// [`ClientError::Rejected`] if the registry refuses the watch for a
    /// reason retrying cannot fix, [`ClientError::Unreachable`] after
    /// `give_up_after`.
    pub async fn connect_with(options: FleetViewOptions) -> Result<Self, ClientError> {
        let mut endpoints = Endpoints::new(&options.endpoints, &options.channel)?;
        let mut retry = Retry::new(options.backoff);
        let started = Instant::now();
        let (fleet, stream) = loop {
            let attempt = match open_watch(&mut endpoints, 0).await {
                Ok((Start::Snapshot(fleet), stream)) => break (fleet, stream),
                Ok((Start::Resumed(event), _)) => Attempt::Fatal(tonic::Status::internal(format!(
                    "the watch from start_revision 0 began with the event at revision {} instead of a snapshot",
                    event.revision
                ))),
                Err(attempt) => attempt,
            };
            match attempt {
                Attempt::Fatal(status) => return Err(ClientError::Rejected(status)),
                Attempt::Retry(why) => {
                    endpoints.advance();
                    let delay = retry.next_delay();
                    if options
                        .give_up_after
                        .is_some_and(|limit| started.elapsed() + delay > limit)
                    {
                        return Err(ClientError::Unreachable {
                            endpoints: endpoints.describe(),
                            waited: started.elapsed(),
                            last: why,
                        });
                    }
                    tracing::warn!(error = %why, retry_in = ?delay, "cannot watch the registry yet");
                    sleep(delay).await;
                }
            }
        };
        retry.reset();
        tracing::debug!(
            revision = fleet.revision,
            members = fleet.len(),
            running = fleet.running_len(),
            endpoint = endpoints.current(),
            "fleet view connected"
        );
        let shared = Arc::new(Shared {
            fleet: ArcSwap::from_pointee(fleet.clone()),
            resyncs: AtomicU64::new(0),
            resumes: AtomicU64::new(0),
        });
        let (changes_tx, changes) = mpsc::unbounded_channel();
        let follower = Follower {
            endpoints,
            retry,
            retry_backoff: options.backoff,
            shared: shared.clone(),
            fleet,
            changes: changes_tx,
        };
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = token.cancelled() => {}
                () = follower.run(stream) => {}
            }
        });
        Ok(Self {
            shared,
            changes,
            _guard: cancel.drop_guard(),
        })
    }

    /// The current fleet (lock-free; O(1)). Read it once to get members,
    /// RUNNING members and the revision consistent with each other.
    pub fn members(&self) -> Arc<Fleet> {
        self.shared.fleet.load_full()
    }

    /// The schedulable executors: the RUNNING members of the current fleet,
    /// sorted by id ([`Fleet::running`] of [`members`](Self::members)).
    pub fn schedulable(&self) -> Vec<Arc<Member>> {
        self.shared.fleet.load().running.values().cloned().collect()
    }

    /// The revision of the current fleet: the last one the view applied.
    pub fn revision(&self) -> u64 {
        self.shared.fleet.load().revision
    }

    /// How many times the view watched again and had to reconcile: the
    /// new watch began with a snapshot (the registry no longer held the
    /// events it missed, or it restarted), diffed into `resync` changes.
    pub fn resyncs(&self) -> u64 {
        self.shared.resyncs.load(Ordering::Relaxed)
    }

    /// How many times the view watched again and resumed: the new watch
    /// began with the event after the view's revision, so nothing was
    /// missed and no snapshot was sent.
    pub fn resumes(&self) -> u64 {
        self.shared.resumes.load(Ordering::Relaxed)
    }

    /// The next change, in order. Cancel-safe. `None` only if the background
    /// task has stopped, which it does not while the view exists (it retries
    /// forever), except by panicking.
    pub async fn next_change(&mut self) -> Option<FleetChange> {
        self.changes.recv().await
    }

    /// The next change if one is waiting.
    pub fn try_next_change(&mut self) -> Option<FleetChange> {
        self.changes.try_recv().ok()
    }
}

/// How a new watch began.
enum Start {
    /// With a snapshot, every chunk of it gathered.
    Snapshot(Fleet),
    /// Without one (it resumed from the history): its first event.
    Resumed(proto::ExecutorEvent),
}

/// Opens a watch from `start_revision` on the current endpoint and reads
/// how it starts: a whole snapshot, or its first event.
async fn open_watch(
    endpoints: &mut Endpoints,
    start_revision: u64,
) -> Result<(Start, WatchStream), Attempt> {
    let response = open_watch_stream(endpoints, start_revision).await?;
    // Through a follower replica: watch at the leader it named instead.
    if endpoints.follow_leader(response.metadata()) {
        tracing::debug!(
            leader = endpoints.current(),
            "watching at the leader replica directly"
        );
        let direct = open_watch_stream(endpoints, start_revision).await?;
        return read_start(endpoints, direct.into_inner()).await;
    }
    read_start(endpoints, response.into_inner()).await
}

fn classify(endpoints: &Endpoints, status: tonic::Status) -> Attempt {
    if retryable(status.code()) || status.code() == Code::ResourceExhausted {
        Attempt::Retry(status_text(endpoints.current(), &status))
    } else {
        Attempt::Fatal(status)
    }
}

/// Opens a watch on the current endpoint (its response headers).
async fn open_watch_stream(
    endpoints: &Endpoints,
    start_revision: u64,
) -> Result<tonic::Response<WatchStream>, Attempt> {
    let mut client = endpoints.connect().await.map_err(Attempt::Retry)?;
    let limit = endpoints.options().request_timeout;
    let request = endpoints
        .options()
        .request(WatchExecutorsRequest { start_revision });
    match timeout(limit, client.watch_executors(request)).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(status)) => Err(classify(endpoints, status)),
        Err(_) => Err(Attempt::Retry(format!(
            "{}: WatchExecutors not answered within {limit:?}",
            endpoints.current()
        ))),
    }
}

/// The next message of a watch that is starting, within the request
/// timeout; `what` names what was awaited, for errors.
async fn next_kind(
    endpoints: &Endpoints,
    stream: &mut WatchStream,
    what: &str,
) -> Result<watch_executors_response::Kind, Attempt> {
    let limit = endpoints.options().request_timeout;
    loop {
        match timeout(limit, stream.message()).await {
            Ok(Ok(Some(message))) => match message.kind {
                Some(kind) => return Ok(kind),
                None => continue,
            },
            Ok(Ok(None)) => {
                return Err(Attempt::Retry(format!(
                    "{}: the watch ended before {what}",
                    endpoints.current()
                )));
            }
            Ok(Err(status)) => return Err(classify(endpoints, status)),
            Err(_) => {
                return Err(Attempt::Retry(format!(
                    "{}: no {what} within {limit:?}",
                    endpoints.current()
                )));
            }
        }
    }
}

/// Reads how a new watch starts: its first event, or its snapshot, chunk by
/// chunk until the one with `more = false`.
async fn read_start(
    endpoints: &Endpoints,
    mut stream: WatchStream,
) -> Result<(Start, WatchStream), Attempt> {
    use watch_executors_response::Kind;
    let first = match next_kind(endpoints, &mut stream, "its first message").await? {
        Kind::Event(event) => return Ok((Start::Resumed(event), stream)),
        Kind::Snapshot(chunk) => chunk,
    };
    let mut fleet = Fleet {
        revision: first.revision,
        ..Fleet::default()
    };
    let mut chunk = first;
    loop {
        for executor in &chunk.executors {
            fleet.insert(Arc::new(Member::from(executor)));
        }
        if !chunk.more {
            return Ok((Start::Snapshot(fleet), stream));
        }
        chunk = match next_kind(endpoints, &mut stream, "the snapshot's next chunk").await? {
            Kind::Snapshot(next) if next.revision == fleet.revision => next,
            Kind::Snapshot(next) => {
                return Err(Attempt::Fatal(tonic::Status::internal(format!(
                    "a snapshot chunk at revision {} followed chunks at revision {}",
                    next.revision, fleet.revision
                ))));
            }
            Kind::Event(event) => {
                return Err(Attempt::Fatal(tonic::Status::internal(format!(
                    "the event at revision {} came before the snapshot's last chunk",
                    event.revision
                ))));
            }
        };
    }
}

/// Why a watch stopped being followed.
enum WatchEnd {
    /// The registry ended it for falling behind: watch again at once, same
    /// endpoint, from the view's revision.
    Lagged(String),
    /// The stream contradicted the view: watch again at once, from a fresh
    /// snapshot.
    Inconsistent(String),
    /// The stream or the connection failed: next endpoint, after a backoff,
    /// from the view's revision.
    Failed(String),
}

/// A watch that ends again within this long of opening, for lagging or
/// for a contradiction, backs off first.
const LAG_STORM_WINDOW: Duration = Duration::from_secs(1);

/// The background task.
struct Follower {
    endpoints: Endpoints,
    retry: Retry,
    retry_backoff: Backoff,
    shared: Arc<Shared>,
    /// The working copy; published after every change.
    fleet: Fleet,
    changes: mpsc::UnboundedSender<FleetChange>,
}

impl Follower {
    async fn run(mut self, mut stream: WatchStream) {
        // A lag costs the registry a snapshot (the events after the view's
        // revision have left its history): at once the first time, but
        // backing off when watches keep lagging within a second (a burst
        // larger than the history, again and again).
        let mut lags = Retry::new(self.retry_backoff);
        loop {
            let opened = Instant::now();
            let end = self.follow(&mut stream).await;
            drop(stream);
            let from = match &end {
                WatchEnd::Lagged(why) | WatchEnd::Inconsistent(why) => {
                    let inconsistent = matches!(end, WatchEnd::Inconsistent(_));
                    if inconsistent {
                        tracing::warn!(reason = %why, revision = self.fleet.revision, "fleet view cannot trust its watch; watching again from a snapshot");
                    } else {
                        tracing::info!(reason = %why, revision = self.fleet.revision, "fleet view fell behind; watching again");
                    }
                    if opened.elapsed() < LAG_STORM_WINDOW {
                        sleep(lags.next_delay()).await;
                    } else {
                        lags.reset();
                    }
                    if inconsistent { 0 } else { self.fleet.revision }
                }
                WatchEnd::Failed(why) => {
                    tracing::warn!(error = %why, revision = self.fleet.revision, "fleet watch ended; watching again");
                    self.endpoints.advance();
                    sleep(self.retry.next_delay()).await;
                    self.fleet.revision
                }
            };
            stream = self.watch_again(from).await;
        }
    }

    /// Watches again from `from` (0: from a snapshot) until a watch opens;
    /// resumes or resyncs by how it starts. A watch that cannot be resumed
    /// from (its first event is not the next one) is followed by one from
    /// a snapshot.
    async fn watch_again(&mut self, mut from: u64) -> WatchStream {
        loop {
            let failed = match open_watch(&mut self.endpoints, from).await {
                Ok((Start::Snapshot(fresh), stream)) => {
                    self.retry.reset();
                    self.resync(fresh);
                    return stream;
                }
                Ok((Start::Resumed(event), stream)) => {
                    let why = if from > 0 && event.revision == self.fleet.revision + 1 {
                        self.retry.reset();
                        self.shared.resumes.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            from = self.fleet.revision,
                            endpoint = self.endpoints.current(),
                            "fleet view resumed from the registry's watch history"
                        );
                        match self.apply(&event) {
                            Ok(()) => return stream,
                            Err(why) => why,
                        }
                    } else {
                        format!(
                            "the watch from start_revision {from} began with the event at revision {}",
                            event.revision
                        )
                    };
                    tracing::warn!(reason = %why, "fleet view cannot trust the watch; watching again from a snapshot");
                    // Not the next event: only a snapshot can be trusted now.
                    from = 0;
                    why
                }
                Err(Attempt::Retry(why)) => {
                    tracing::debug!(error = %why, "cannot watch again yet");
                    why
                }
                Err(Attempt::Fatal(status)) => {
                    let why = status_text(self.endpoints.current(), &status);
                    tracing::error!(error = %why, "the registry refused the watch");
                    why
                }
            };
            let delay = self.retry.next_delay();
            tracing::debug!(error = %failed, retry_in = ?delay, "watching again after a backoff");
            self.endpoints.advance();
            sleep(delay).await;
        }
    }

    /// Applies the stream's events until it ends.
    async fn follow(&mut self, stream: &mut WatchStream) -> WatchEnd {
        loop {
            match stream.message().await {
                Ok(Some(message)) => match message.kind {
                    Some(watch_executors_response::Kind::Event(event)) => {
                        if let Err(why) = self.apply(&event) {
                            return WatchEnd::Inconsistent(why);
                        }
                    }
                    Some(watch_executors_response::Kind::Snapshot(snapshot)) => {
                        return WatchEnd::Inconsistent(format!(
                            "a snapshot chunk at revision {} in the middle of the watch",
                            snapshot.revision
                        ));
                    }
                    None => {}
                },
                Ok(None) => {
                    return WatchEnd::Failed(format!(
                        "{}: the registry ended the watch",
                        self.endpoints.current()
                    ));
                }
                Err(status) if status.code() == Code::ResourceExhausted => {
                    return WatchEnd::Lagged(status.message().to_owned());
                }
                Err(status) => {
                    return WatchEnd::Failed(status_text(self.endpoints.current(), &status));
                }
            }
        }
    }

    fn publish(&self) {
        self.shared.fleet.store(Arc::new(self.fleet.clone()));
    }

    fn send(&self, change: FleetChange) {
        // Fails only when the view was dropped, and then this task is
        // being cancelled.
        let _ = self.changes.send(change);
    }

    /// Applies one event; an error means the view cannot trust its copy
    /// (and then nothing was changed).
    fn apply(&mut self, event: &proto::ExecutorEvent) -> Result<(), String> {
        let revision = event.revision;
        let expected = self.fleet.revision + 1;
        if revision != expected {
            return Err(format!(
                "event revision {revision} where {expected} was due"
            ));
        }
        let change = match proto::EventType::try_from(event.r#type) {
            Ok(proto::EventType::Online) => {
                let member = Member::from(event);
                self.fleet.insert(Arc::new(member.clone()));
                FleetChange::Online {
                    member,
                    revision,
                    resync: false,
                }
            }
            Ok(proto::EventType::Running) => {
                let member = Member::from(event);
                match self.fleet.members.get(&event.executor_id) {
                    Some(held) if held.status == MemberStatus::Initing => {}
                    Some(_) => {
                        return Err(format!(
                            "RUNNING for {} which the view already holds as RUNNING",
                            event.executor_id
                        ));
                    }
                    None => {
                        return Err(format!(
                            "RUNNING for {} which the view does not hold",
                            event.executor_id
                        ));
                    }
                }
                self.fleet.insert(Arc::new(member.clone()));
                FleetChange::Running {
                    member,
                    revision,
                    resync: false,
                }
            }
            Ok(proto::EventType::Offline) => {
                if self.fleet.remove(&event.executor_id).is_none() {
                    return Err(format!(
                        "OFFLINE for {} which the view does not hold",
                        event.executor_id
                    ));
                }
                let reason = match proto::OfflineReason::try_from(event.reason) {
                    Ok(proto::OfflineReason::Expired) => OfflineReason::Expired,
                    Ok(proto::OfflineReason::Deregistered) => OfflineReason::Deregistered,
                    _ => OfflineReason::Unknown,
                };
                FleetChange::Offline {
                    id: event.executor_id.clone(),
                    reason,
                    revision,
                    resync: false,
                }
            }
            _ => return Err(format!("event of unknown type {}", event.r#type)),
        };
        self.fleet.revision = revision;
        self.publish();
        self.send(change);
        Ok(())
    }

    /// Replaces the fleet with a fresh snapshot and sends the difference.
    fn resync(&mut self, fresh: Fleet) {
        let revision = fresh.revision;
        let mut changes = Vec::new();
        for (id, old) in self.fleet.members.iter() {
            match fresh.members.get(id) {
                Some(new) if new == old || old.became_running(new) => {}
                _ => changes.push(FleetChange::Offline {
                    id: id.clone(),
                    reason: OfflineReason::Unknown,
                    revision,
                    resync: true,
                }),
            }
        }
        for (id, new) in fresh.members.iter() {
            match self.fleet.members.get(id) {
                Some(old) if old == new => {}
                Some(old) if old.became_running(new) => changes.push(FleetChange::Running {
                    member: (**new).clone(),
                    revision,
                    resync: true,
                }),
                _ => changes.push(FleetChange::Online {
                    member: (**new).clone(),
                    revision,
                    resync: true,
                }),
            }
        }
        tracing::info!(
            from = self.fleet.revision,
            to = revision,
            changes = changes.len(),
            "fleet view resynchronised from a snapshot"
        );
        self.fleet = fresh;
        self.shared.resyncs.fetch_add(1, Ordering::Relaxed);
        self.publish();
        for change in changes {
            self.send(change);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn follower() -> (Follower, mpsc::UnboundedReceiver<FleetChange>) {
        let endpoints = Endpoints::new(["http://127.0.0.1:1"], &ChannelOptions::default())
            .expect("a valid endpoint");
        let (changes, rx) = mpsc::unbounded_channel();
        let follower = Follower {
            endpoints,
            retry: Retry::new(Backoff::default()),
            retry_backoff: Backoff::default(),
            shared: Arc::new(Shared {
                fleet: ArcSwap::from_pointee(Fleet::default()),
                resyncs: AtomicU64::new(0),
                resumes: AtomicU64::new(0),
            }),
            fleet: Fleet::default(),
            changes,
        };
        (follower, rx)
    }

    fn event(kind: proto::EventType, id: &str, revision: u64) -> proto::ExecutorEvent {
        let status = match kind {
            proto::EventType::Online => proto::ExecutorStatus::Initing,
            proto::EventType::Running => proto::ExecutorStatus::Running,
            _ => proto::ExecutorStatus::Tombstone,
        };
        proto::ExecutorEvent {
            r#type: kind as i32,
            executor_id: id.into(),
            address: "10.0.0.1:9000".into(),
            revision,
            status: status as i32,
            ..Default::default()
        }
    }

    fn member(id: &str, status: MemberStatus) -> Arc<Member> {
        Arc::new(Member {
            id: id.into(),
            address: "10.0.0.1:9000".into(),
            labels: BTreeMap::new(),
            status,
        })
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<FleetChange>) -> Vec<FleetChange> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    #[test]
    fn events_move_members_through_their_statuses_and_the_running_index() {
        let (mut f, mut rx) = follower();
        f.apply(&event(proto::EventType::Online, "a", 1)).unwrap();
        f.apply(&event(proto::EventType::Online, "b", 2)).unwrap();
        assert_eq!((f.fleet.len(), f.fleet.running_len()), (2, 0));
        f.apply(&event(proto::EventType::Running, "a", 3)).unwrap();
        let published = f.shared.fleet.load_full();
        assert_eq!(published.revision(), 3);
        let running: Vec<&str> = published.running().map(|m| m.id.as_str()).collect();
        assert_eq!(running, ["a"]);
        assert_eq!(published.get("b").unwrap().status, MemberStatus::Initing);
        f.apply(&event(proto::EventType::Offline, "a", 4)).unwrap();
        assert_eq!((f.fleet.len(), f.fleet.running_len()), (1, 0));
        let changes = drain(&mut rx);
        assert!(matches!(
            &changes[2],
            FleetChange::Running { member, revision: 3, resync: false } if member.id == "a" && member.is_running()
        ));
        assert_eq!(
            changes
                .iter()
                .map(FleetChange::revision)
                .collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
    }

    #[test]
    fn an_event_that_contradicts_the_fleet_changes_nothing() {
        let (mut f, mut rx) = follower();
        f.apply(&event(proto::EventType::Online, "a", 1)).unwrap();
        drain(&mut rx);
        for (bad, why) in [
            (event(proto::EventType::Online, "b", 3), "due"),
            (event(proto::EventType::Running, "x", 2), "does not hold"),
            (event(proto::EventType::Offline, "x", 2), "does not hold"),
        ] {
            let err = f.apply(&bad).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
        f.apply(&event(proto::EventType::Running, "a", 2)).unwrap();
        let err = f
            .apply(&event(proto::EventType::Running, "a", 3))
            .unwrap_err();
        assert!(err.contains("already holds as RUNNING"), "{err}");
        assert_eq!(f.fleet.revision(), 2);
        assert_eq!(drain(&mut rx).len(), 1);
    }

    #[test]
    fn a_resync_sends_the_difference_running_included() {
        let (mut f, mut rx) = follower();
        for (id, status) in [
            ("gone", MemberStatus::Running),
            ("same", MemberStatus::Running),
            ("started", MemberStatus::Initing),
            ("reloaded", MemberStatus::Running),
        ] {
            f.fleet.insert(member(id, status));
        }
        f.fleet.revision = 10;
        let mut fresh = Fleet {
            revision: 20,
            ..Fleet::default()
        };
        for (id, status) in [
            ("same", MemberStatus::Running),
            ("started", MemberStatus::Running),
            ("reloaded", MemberStatus::Initing),
            ("new", MemberStatus::Running),
        ] {
            fresh.insert(member(id, status));
        }
        f.resync(fresh);
        let changes = drain(&mut rx);
        let offline = |id: &str| FleetChange::Offline {
            id: id.into(),
            reason: OfflineReason::Unknown,
            revision: 20,
            resync: true,
        };
        let online = |id: &str, status| FleetChange::Online {
            member: (*member(id, status)).clone(),
            revision: 20,
            resync: true,
        };
        assert_eq!(
            changes,
            [
                offline("gone"),
                offline("reloaded"),
                online("new", MemberStatus::Running),
                online("reloaded", MemberStatus::Initing),
                FleetChange::Running {
                    member: (*member("started", MemberStatus::Running)).clone(),
                    revision: 20,
                    resync: true,
                },
            ]
        );
        assert_eq!(f.shared.resyncs.load(Ordering::Relaxed), 1);
        let running: Vec<&str> = f.fleet.running().map(|m| m.id.as_str()).collect();
        assert_eq!(running, ["new", "same", "started"]);
    }
}
