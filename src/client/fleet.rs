//! A scheduler's view of the live fleet, kept from `WatchExecutors`.
//!
//! Owns: one background task per [`FleetView`], the only writer of the
//! view's [`Fleet`] (published through an `ArcSwap`, so readers never lock
//! and never wait) and the only sender of its changes.
//!
//! Invariants:
//!
//! - The published fleet is the registry's live set as of
//!   [`Fleet::revision`]: the snapshot the current watch began with, plus
//!   every event after it, applied in revision order. An event whose
//!   revision is not the next one, or that contradicts the fleet (OFFLINE
//!   for an id not held), ends the watch as a lag would.
//! - Every change to the published fleet after [`FleetView::connect`]
//!   returned is sent on the change channel, in order, *after* it is
//!   published: when a change is received, [`FleetView::members`] already
//!   holds it (or something newer).
//! - When a watch ends — RESOURCE_EXHAUSTED (the view fell behind the
//!   registry's `--watch-buffer`), UNAVAILABLE (restart), a network error —
//!   the task watches again (at once after a lag, unless watches keep
//!   lagging within a second; otherwise at the next endpoint, after a
//!   backoff), diffs the fresh snapshot against the
//!   fleet, and sends the difference as changes marked `resync: true`. A
//!   consumer that applies every change to the fleet it started from
//!   therefore always holds the registry's live set; only executors that
//!   came *and* went while no watch was open are never seen, as if the
//!   consumer had looked away for that long.
//!
//! The change channel is unbounded on purpose: the view must neither drop a
//! change nor slow its watch (slowing it is what makes the registry end it).
//! A consumer that never calls [`FleetView::next_change`] makes it grow;
//! one that only needs the current fleet can read [`FleetView::members`].
//!
//! What is not tracked: an executor's status. The watch carries membership
//! (ONLINE at registration, OFFLINE at expiry or deregistration), and the
//! INITING → RUNNING step is not an event; a view's members are all live
//! executors, INITING ones included.

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

/// A live executor as the view knows it: what the watch carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its id.
    pub id: String,
    /// `host:port` where it serves.
    pub address: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

impl From<&proto::Executor> for Member {
    fn from(e: &proto::Executor) -> Self {
        Self {
            id: e.id.clone(),
            address: e.address.clone(),
            labels: e
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

impl From<&proto::ExecutorEvent> for Member {
    fn from(e: &proto::ExecutorEvent) -> Self {
        Self {
            id: e.executor_id.clone(),
            address: e.address.clone(),
            labels: e
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

/// An immutable copy of the live fleet at one revision. Cloning is O(1).
#[derive(Clone, Default)]
pub struct Fleet {
    revision: u64,
    members: OrdMap<String, Arc<Member>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("revision", &self.revision)
            .field("members", &self.members.len())
            .finish()
    }
}

impl Fleet {
    /// The registry revision this fleet is consistent with. It is the
    /// registry's counter: after the registry restarts it starts again.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Number of live executors.
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

    /// Every live executor, sorted by id.
    pub fn iter(&self) -> impl Iterator<Item = &Member> {
        self.members.values().map(|m| &**m)
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

/// One change to the live fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetChange {
    /// An executor joined the live set.
    Online {
        /// The executor.
        member: Member,
        /// True when learned from a resync (the view's watch had ended and
        /// this executor was in the next snapshot but not in the view).
        resync: bool,
    },
    /// An executor left the live set.
    Offline {
        /// Its id.
        id: String,
        /// Why, when the event was seen ([`OfflineReason::Unknown`] on a
        /// resync).
        reason: OfflineReason,
        /// True when learned from a resync.
        resync: bool,
    },
}

impl FleetChange {
    /// The executor it is about.
    pub fn id(&self) -> &str {
        match self {
            Self::Online { member, .. } => &member.id,
            Self::Offline { id, .. } => id,
        }
    }

    /// Whether it came from a resync rather than from an event.
    pub fn is_resync(&self) -> bool {
        match self {
            Self::Online { resync, .. } | Self::Offline { resync, .. } => *resync,
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
            .field("resyncs", &self.resyncs())
            .finish()
    }
}

type WatchStream = Streaming<WatchExecutorsResponse>;

impl FleetView {
    /// Watches the registry at `endpoints` with default options; resolves
    /// once the first snapshot is applied. Retries until it gets one (wrap
    /// it in a timeout, or use [`connect_with`](Self::connect_with) and
    /// `give_up_after`, to bound that). Cancel-safe.
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
        let (snapshot, stream) = loop {
            match open_watch(&mut endpoints).await {
                Ok(opened) => break opened,
                Err(Attempt::Fatal(status)) => return Err(ClientError::Rejected(status)),
                Err(Attempt::Retry(why)) => {
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
        let fleet = fleet_of(&snapshot);
        tracing::debug!(
            revision = fleet.revision,
            members = fleet.len(),
            endpoint = endpoints.current(),
            "fleet view connected"
        );
        let shared = Arc::new(Shared {
            fleet: ArcSwap::from_pointee(fleet.clone()),
            resyncs: AtomicU64::new(0),
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

    /// The current fleet (lock-free; O(1)).
    pub fn members(&self) -> Arc<Fleet> {
        self.shared.fleet.load_full()
    }

    /// The revision of the current fleet.
    pub fn revision(&self) -> u64 {
        self.shared.fleet.load().revision
    }

    /// How many times the view watched again and reconciled.
    pub fn resyncs(&self) -> u64 {
        self.shared.resyncs.load(Ordering::Relaxed)
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

/// The fleet of a snapshot.
fn fleet_of(snapshot: &proto::Snapshot) -> Fleet {
    Fleet {
        revision: snapshot.revision,
        members: snapshot
            .executors
            .iter()
            .map(|e| (e.id.clone(), Arc::new(Member::from(e))))
            .collect(),
    }
}

/// Opens a watch on the current endpoint and reads its snapshot.
async fn open_watch(endpoints: &mut Endpoints) -> Result<(proto::Snapshot, WatchStream), Attempt> {
    let response = open_watch_stream(endpoints).await?;
    // Through a follower replica: watch at the leader it named instead.
    if endpoints.follow_leader(response.metadata()) {
        tracing::debug!(
            leader = endpoints.current(),
            "watching at the leader replica directly"
        );
        let direct = open_watch_stream(endpoints).await?;
        return read_snapshot(endpoints, direct.into_inner()).await;
    }
    read_snapshot(endpoints, response.into_inner()).await
}

fn classify(endpoints: &Endpoints, status: tonic::Status) -> Attempt {
    if retryable(status.code()) || status.code() == Code::ResourceExhausted {
        Attempt::Retry(status_text(endpoints.current(), &status))
    } else {
        Attempt::Fatal(status)
    }
}

/// Opens a watch on the current endpoint (its response headers).
async fn open_watch_stream(endpoints: &Endpoints) -> Result<tonic::Response<WatchStream>, Attempt> {
    let mut client = endpoints.connect().await.map_err(Attempt::Retry)?;
    let limit = endpoints.options().request_timeout;
    match timeout(
        limit,
        client.watch_executors(
            endpoints
                .options()
                .request(WatchExecutorsRequest { start_revision: 0 }),
        ),
    )
    .await
    {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(status)) => Err(classify(endpoints, status)),
        Err(_) => Err(Attempt::Retry(format!(
            "{}: WatchExecutors not answered within {limit:?}",
            endpoints.current()
        ))),
    }
}

/// Reads a new watch's first message, its snapshot.
async fn read_snapshot(
    endpoints: &Endpoints,
    mut stream: WatchStream,
) -> Result<(proto::Snapshot, WatchStream), Attempt> {
    let limit = endpoints.options().request_timeout;
    let first = match timeout(limit, stream.message()).await {
        Ok(Ok(Some(message))) => message,
        Ok(Ok(None)) => {
            return Err(Attempt::Retry(format!(
                "{}: the watch ended before its snapshot",
                endpoints.current()
            )));
        }
        Ok(Err(status)) => return Err(classify(endpoints, status)),
        Err(_) => {
            return Err(Attempt::Retry(format!(
                "{}: no snapshot within {limit:?}",
                endpoints.current()
            )));
        }
    };
    match first.kind {
        Some(watch_executors_response::Kind::Snapshot(snapshot)) => Ok((snapshot, stream)),
        other => Err(Attempt::Fatal(tonic::Status::internal(format!(
            "the watch began with {other:?} instead of a snapshot"
        )))),
    }
}

/// Why a watch stopped being followed.
enum WatchEnd {
    /// The view fell behind (or saw a gap): watch again at once, same endpoint.
    Behind(String),
    /// The stream or the connection failed: next endpoint, after a backoff.
    Failed(String),
}

/// A watch that lags again within this long of opening backs off first.
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
        // Re-watching after a lag costs the registry a full snapshot: at once
        // the first time, but backing off when watches keep lagging within
        // a second (a burst larger than the buffer, again and again).
        let mut lags = Retry::new(self.retry_backoff);
        loop {
            let opened = Instant::now();
            let end = self.follow(&mut stream).await;
            drop(stream);
            match &end {
                WatchEnd::Behind(why) => {
                    tracing::info!(reason = %why, revision = self.fleet.revision, "fleet view fell behind; watching again");
                    if opened.elapsed() < LAG_STORM_WINDOW {
                        sleep(lags.next_delay()).await;
                    } else {
                        lags.reset();
                    }
                }
                WatchEnd::Failed(why) => {
                    tracing::warn!(error = %why, revision = self.fleet.revision, "fleet watch ended; watching again");
                    self.endpoints.advance();
                    sleep(self.retry.next_delay()).await;
                }
            }
            stream = loop {
                match open_watch(&mut self.endpoints).await {
                    Ok((snapshot, stream)) => {
                        self.retry.reset();
                        self.resync(&snapshot);
                        break stream;
                    }
                    Err(Attempt::Retry(why)) => {
                        let delay = self.retry.next_delay();
                        tracing::debug!(error = %why, retry_in = ?delay, "cannot watch again yet");
                        self.endpoints.advance();
                        sleep(delay).await;
                    }
                    Err(Attempt::Fatal(status)) => {
                        let delay = self.retry.next_delay();
                        tracing::error!(error = %status_text(self.endpoints.current(), &status), retry_in = ?delay, "the registry refused the watch");
                        self.endpoints.advance();
                        sleep(delay).await;
                    }
                }
            };
        }
    }

    /// Applies the stream's messages until it ends.
    async fn follow(&mut self, stream: &mut WatchStream) -> WatchEnd {
        loop {
            match stream.message().await {
                Ok(Some(message)) => match message.kind {
                    Some(watch_executors_response::Kind::Event(event)) => {
                        if let Err(why) = self.apply(&event) {
                            return WatchEnd::Behind(why);
                        }
                    }
                    Some(watch_executors_response::Kind::Snapshot(snapshot)) => {
                        self.resync(&snapshot);
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
                    return WatchEnd::Behind(status.message().to_owned());
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

    /// Applies one event; an error means the view cannot trust its copy.
    fn apply(&mut self, event: &proto::ExecutorEvent) -> Result<(), String> {
        let expected = self.fleet.revision + 1;
        if event.revision != expected {
            return Err(format!(
                "event revision {} where {expected} was due",
                event.revision
            ));
        }
        let change = match proto::EventType::try_from(event.r#type) {
            Ok(proto::EventType::Online) => {
                let member = Member::from(event);
                self.fleet
                    .members
                    .insert(member.id.clone(), Arc::new(member.clone()));
                FleetChange::Online {
                    member,
                    resync: false,
                }
            }
            Ok(proto::EventType::Offline) => {
                if self.fleet.members.remove(&event.executor_id).is_none() {
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
                    resync: false,
                }
            }
            _ => return Err(format!("event of unknown type {}", event.r#type)),
        };
        self.fleet.revision = event.revision;
        self.publish();
        self.send(change);
        Ok(())
    }

    /// Replaces the fleet with a fresh snapshot and sends the difference.
    fn resync(&mut self, snapshot: &proto::Snapshot) {
        let fresh = fleet_of(snapshot);
        let mut changes = Vec::new();
        for (id, old) in self.fleet.members.iter() {
            match fresh.members.get(id) {
                Some(new) if new == old => {}
                _ => changes.push(FleetChange::Offline {
                    id: id.clone(),
                    reason: OfflineReason::Unknown,
                    resync: true,
                }),
            }
        }
        for (id, new) in fresh.members.iter() {
            match self.fleet.members.get(id) {
                Some(old) if old == new => {}
                _ => changes.push(FleetChange::Online {
                    member: (**new).clone(),
                    resync: true,
                }),
            }
        }
        tracing::info!(
            from = self.fleet.revision,
            to = fresh.revision,
            changes = changes.len(),
            "fleet view resynchronised"
        );
        self.fleet = fresh;
        self.shared.resyncs.fetch_add(1, Ordering::Relaxed);
        self.publish();
        for change in changes {
            self.send(change);
        }
    }
}
