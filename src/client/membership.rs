//! An executor's membership: register once, then keep the lease alive.
//!
//! Owns: one background task per [`Membership`], which alone holds the
//! executor's current id, the connection, the heartbeat stream and the
//! suggested interval; the application sees them only through a
//! [`watch`] of [`MembershipState`].
//!
//! The task's loop:
//!
//! 1. with no id (after the registry said EXPIRED or UNKNOWN_EXECUTOR),
//!    register again (backoff across endpoints) and publish `Rejoined`;
//! 2. open one `HeartbeatStream` (requests fed from an mpsc) on the current
//!    endpoint, and beat on it: one request, wait for its result, sleep the
//!    suggested interval ± jitter, again. The first beat on a fresh stream is
//!    immediate, so a reconnect resumes the lease at once;
//! 3. when the stream breaks (server restart, network, no answer in time),
//!    drop the connection, move to the next endpoint, back off (capped by the
//!    heartbeat interval while holding a lease) and go to 2 with the *same*
//!    id. A registry restarted with its store still knows the id; one that
//!    lost it answers UNKNOWN_EXECUTOR, and 1 follows.
//!
//! TTL asked for = max(`min_ttl`, `ttl_intervals` × suggested interval), at
//! least three intervals. When the suggested interval changes, the next
//! heartbeat goes at once with the new TTL (a lease sized for a short
//! interval must not wait out a long one). If the registry refuses it (INVALID: outside its
//! `--min/max-heartbeat-ttl`), the task heartbeats with `ttl_ms = 0` (keep
//! the TTL the registry already gave) and logs it, until the suggested
//! interval changes, when it asks again.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use super::backoff::{Backoff, Retry, jittered};
use super::endpoints::{ChannelOptions, DEFAULT_ENDPOINT, Endpoints};
use super::error::{Attempt, ClientError, retryable, status_text};
use crate::proto::registry_client::RegistryClient;
use crate::proto::{
    DeregisterRequest, HeartbeatRequest, HeartbeatResult, HeartbeatStatus, RegisterRequest,
    RegisterResponse,
};

/// Used when the registry suggests no interval (0): the server's default.
const FALLBACK_INTERVAL: Duration = Duration::from_millis(500);
/// Fewest heartbeat intervals a TTL spans.
const MIN_TTL_INTERVALS: u32 = 3;

/// What an executor registers with, and how it keeps its lease.
#[derive(Debug, Clone)]
pub struct MembershipOptions {
    /// Registry endpoints (`http://host:port` or `host:port`), tried in turn.
    pub endpoints: Vec<String>,
    /// Prefix of the id (`<name>-<16 hex>`); empty gives `executor-…`.
    pub name: String,
    /// `host:port` where this executor serves.
    pub address: String,
    /// Labels schedulers select on.
    pub labels: BTreeMap<String, String>,
    /// Smallest TTL asked for, whatever the interval.
    pub min_ttl: Duration,
    /// TTL asked for, in suggested intervals (values below 3 count as 3):
    /// the lease survives that many late or lost heartbeats minus one.
    pub ttl_intervals: u32,
    /// Each heartbeat period is the suggested interval moved by a random
    /// fraction within ± this (clamped to 0–0.5), so a fleet does not beat in
    /// lockstep.
    pub jitter: f64,
    /// Pacing of retries (registration, reconnection).
    pub backoff: Backoff,
    /// Settings of every connection.
    pub channel: ChannelOptions,
    /// Longest [`Membership::shutdown`] waits for the deregistration.
    pub shutdown_timeout: Duration,
    /// [`Membership::join`] gives up with [`ClientError::Unreachable`] after
    /// this long without a registration; `None` keeps trying until the
    /// caller drops the future.
    pub give_up_after: Option<Duration>,
}

impl Default for MembershipOptions {
    fn default() -> Self {
        Self {
            endpoints: vec![DEFAULT_ENDPOINT.to_owned()],
            name: String::new(),
            address: String::new(),
            labels: BTreeMap::new(),
            min_ttl: Duration::ZERO,
            ttl_intervals: MIN_TTL_INTERVALS,
            jitter: 0.1,
            backoff: Backoff::default(),
            channel: ChannelOptions::default(),
            shutdown_timeout: Duration::from_secs(5),
            give_up_after: None,
        }
    }
}

impl MembershipOptions {
    /// Options with defaults for everything but where and who.
    pub fn new<I, S>(endpoints: I, name: impl Into<String>, address: impl Into<String>) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            name: name.into(),
            address: address.into(),
            ..Self::default()
        }
    }

    /// Adds a label.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    fn register_request(&self) -> RegisterRequest {
        RegisterRequest {
            name: self.name.clone(),
            address: self.address.clone(),
            labels: self
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

/// Where an executor stands with the registry, as published on
/// [`Membership::state`].
///
/// A `watch` keeps only the latest value: a receiver that looks rarely may
/// see `Rejoined` without the `Lost` before it. `Rejoined` always means a
/// `Lost` happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipState {
    /// The initial value, in place when [`Membership::join`] returns: the
    /// registry holds this id (INITING until the first heartbeat, which the
    /// task sends at once). Never sent again.
    Joined {
        /// The id the registry gave.
        id: String,
    },
    /// Sent when the registry answers a heartbeat with EXPIRED or
    /// UNKNOWN_EXECUTOR: it no longer holds this executor (its lease ran out,
    /// or the registry restarted without its store), so nothing should be
    /// scheduled on it under the old id. The task is registering again.
    /// Not sent for a broken connection: the lease may well still be held,
    /// and the task reconnects and resumes with the same id.
    Lost,
    /// Sent when the registration that follows a `Lost` succeeded: a new id,
    /// heartbeated from now on.
    Rejoined {
        /// The new id.
        id: String,
    },
}

impl MembershipState {
    /// The id held, if any (`None` while `Lost`).
    pub fn id(&self) -> Option<&str> {
        match self {
            Self::Joined { id } | Self::Rejoined { id } => Some(id),
            Self::Lost => None,
        }
    }
}

/// An executor's membership: registered, and kept alive by a background
/// task until [`shutdown`](Self::shutdown) (which deregisters) or drop
/// (which only stops heartbeating: the lease then expires after its TTL).
pub struct Membership {
    state: watch::Receiver<MembershipState>,
    task: JoinHandle<Lease>,
    guard: DropGuard,
    /// A copy of the endpoints for deregistration at shutdown.
    endpoints: Endpoints,
    shutdown_timeout: Duration,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("state", &*self.state.borrow())
            .field("endpoints", &self.endpoints.describe())
            .finish()
    }
}

/// What the task held when it stopped.
#[derive(Default)]
struct Lease {
    id: Option<String>,
    client: Option<RegistryClient<Channel>>,
}

impl Membership {
    /// Registers (retrying UNAVAILABLE and connection failures with backoff
    /// across the endpoints) and starts heartbeating in the background.
    ///
    /// Errors: [`ClientError::Rejected`] when the registry refuses the
    /// registration (bad address, name or labels), [`ClientError::Unreachable`]
    /// after `give_up_after`, or a bad endpoint list.
    ///
    /// Cancel-safe: dropping the future starts no task. (A registration the
    /// registry had already accepted is then never heartbeated and expires
    /// after the registry's `--init-heartbeat-ttl`.)
    pub async fn join(options: MembershipOptions) -> Result<Self, ClientError> {
        let mut endpoints = Endpoints::new(&options.endpoints, &options.channel)?;
        let request = options.register_request();
        let mut retry = Retry::new(options.backoff);
        let mut client = None;
        let deadline = options.give_up_after.map(|d| Instant::now() + d);
        let response =
            register(&mut endpoints, &mut client, &request, &mut retry, deadline).await?;
        let (id, interval) = registered(&response)?;
        tracing::info!(%id, endpoint = endpoints.current(), ?interval, "registered");

        let (state_tx, state) = watch::channel(MembershipState::Joined { id: id.clone() });
        let cancel = CancellationToken::new();
        let heartbeater = Heartbeater {
            endpoints: endpoints.clone(),
            client,
            request,
            id: Some(id),
            interval,
            min_ttl: options.min_ttl,
            ttl_intervals: options.ttl_intervals.max(MIN_TTL_INTERVALS),
            keep_server_ttl: false,
            jitter: options.jitter,
            retry,
            failures: 0,
            state: state_tx,
        };
        let task = tokio::spawn(heartbeater.run_until(cancel.clone()));
        Ok(Self {
            state,
            task,
            guard: cancel.drop_guard(),
            endpoints,
            shutdown_timeout: options.shutdown_timeout,
        })
    }

    /// A receiver of the state: `borrow()` for the current one, `changed()`
    /// to wait for the next.
    pub fn state(&self) -> watch::Receiver<MembershipState> {
        self.state.clone()
    }

    /// The id held now (`None` between `Lost` and `Rejoined`).
    pub fn id(&self) -> Option<String> {
        self.state.borrow().id().map(str::to_owned)
    }

    /// Stops heartbeating and deregisters the id held, within
    /// `shutdown_timeout`. An id the registry no longer knows counts as
    /// deregistered. Errors: [`ClientError::Unreachable`] if no endpoint
    /// answered in time (the lease then expires by itself after its TTL).
    pub async fn shutdown(self) -> Result<(), ClientError> {
        let Membership {
            task,
            guard,
            mut endpoints,
            shutdown_timeout,
            ..
        } = self;
        guard.disarm().cancel();
        let lease = match task.await {
            Ok(lease) => lease,
            Err(e) => {
                tracing::error!(error = %e, "membership task failed");
                Lease::default()
            }
        };
        let Some(id) = lease.id else {
            return Ok(());
        };
        let started = Instant::now();
        let mut last = String::from("no answer");
        let result = timeout(
            shutdown_timeout,
            deregister(&mut endpoints, lease.client, &id, &mut last),
        )
        .await;
        match result {
            Ok(Ok(())) => {
                tracing::info!(%id, "deregistered");
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClientError::Unreachable {
                endpoints: endpoints.describe(),
                waited: started.elapsed(),
                last,
            }),
        }
    }
}

/// One registration on the current endpoint (connecting if needed).
async fn register_once(
    endpoints: &Endpoints,
    client: &mut Option<RegistryClient<Channel>>,
    request: &RegisterRequest,
) -> Result<RegisterResponse, Attempt> {
    let mut c = match client.take() {
        Some(c) => c,
        None => endpoints.connect().await.map_err(Attempt::Retry)?,
    };
    let limit = endpoints.options().request_timeout;
    let call = c.register(endpoints.options().request(request.clone()));
    match timeout(limit, call).await {
        Err(_) => Err(Attempt::Retry(format!(
            "{}: no answer to Register within {limit:?}",
            endpoints.current()
        ))),
        Ok(Ok(response)) => {
            *client = Some(c);
            Ok(response.into_inner())
        }
        Ok(Err(status)) if retryable(status.code()) => {
            Err(Attempt::Retry(status_text(endpoints.current(), &status)))
        }
        Ok(Err(status)) => {
            *client = Some(c);
            Err(Attempt::Fatal(status))
        }
    }
}

/// Registers, retrying with backoff across the endpoints until `deadline`.
async fn register(
    endpoints: &mut Endpoints,
    client: &mut Option<RegistryClient<Channel>>,
    request: &RegisterRequest,
    retry: &mut Retry,
    deadline: Option<Instant>,
) -> Result<RegisterResponse, ClientError> {
    let started = Instant::now();
    loop {
        match register_once(endpoints, client, request).await {
            Ok(response) => {
                retry.reset();
                return Ok(response);
            }
            Err(Attempt::Fatal(status)) => return Err(ClientError::Rejected(status)),
            Err(Attempt::Retry(why)) => {
                endpoints.advance();
                let delay = retry.next_delay();
                if deadline.is_some_and(|d| Instant::now() + delay > d) {
                    return Err(ClientError::Unreachable {
                        endpoints: endpoints.describe(),
                        waited: started.elapsed(),
                        last: why,
                    });
                }
                tracing::warn!(error = %why, retry_in = ?delay, "cannot register yet");
                sleep(delay).await;
            }
        }
    }
}

/// The id and interval of a registration.
fn registered(response: &RegisterResponse) -> Result<(String, Duration), ClientError> {
    let Some(executor) = &response.executor else {
        return Err(ClientError::Rejected(tonic::Status::internal(
            "the registry answered Register without an executor",
        )));
    };
    let interval = interval_of(response.heartbeat_interval_ms).unwrap_or(FALLBACK_INTERVAL);
    Ok((executor.id.clone(), interval))
}

/// A suggested interval (0 = none suggested).
fn interval_of(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// Deregisters `id`, retrying across endpoints (the caller bounds the time).
async fn deregister(
    endpoints: &mut Endpoints,
    mut client: Option<RegistryClient<Channel>>,
    id: &str,
    last: &mut String,
) -> Result<(), ClientError> {
    let mut retry = Retry::new(Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_secs(1),
    });
    loop {
        let connected = match client.take() {
            Some(c) => Ok(c),
            None => endpoints.connect().await,
        };
        match connected {
            Err(why) => *last = why,
            Ok(mut c) => {
                let request = DeregisterRequest {
                    executor_id: id.to_owned(),
                };
                match c.deregister(endpoints.options().request(request)).await {
                    Ok(_) => return Ok(()),
                    Err(status) if status.code() == Code::NotFound => {
                        tracing::debug!(%id, "already gone at deregistration");
                        return Ok(());
                    }
                    Err(status) if retryable(status.code()) => {
                        *last = status_text(endpoints.current(), &status);
                    }
                    Err(status) => return Err(ClientError::Rejected(status)),
                }
            }
        }
        endpoints.advance();
        sleep(retry.next_delay()).await;
    }
}

/// Why a heartbeat stream stopped.
enum StreamEnd {
    /// The connection or stream failed; the lease may still be held.
    Broken(String),
    /// The registry no longer holds the id.
    Lost(HeartbeatStatus),
}

/// The background task's state (see the module docs for its loop).
struct Heartbeater {
    endpoints: Endpoints,
    client: Option<RegistryClient<Channel>>,
    request: RegisterRequest,
    /// The id held; `None` between `Lost` and `Rejoined`.
    id: Option<String>,
    /// The registry's latest suggested interval.
    interval: Duration,
    min_ttl: Duration,
    ttl_intervals: u32,
    /// The registry refused our TTL: send 0 (keep its TTL) until the
    /// interval changes.
    keep_server_ttl: bool,
    jitter: f64,
    retry: Retry,
    /// Stream failures since the last answered heartbeat (log volume).
    failures: u32,
    state: watch::Sender<MembershipState>,
}

impl Heartbeater {
    /// Runs until `cancel`; returns what it held, for deregistration.
    async fn run_until(mut self, cancel: CancellationToken) -> Lease {
        tokio::select! {
            () = cancel.cancelled() => {}
            () = self.run() => {}
        }
        Lease {
            id: self.id,
            client: self.client,
        }
    }

    async fn run(&mut self) {
        loop {
            if self.id.is_none() {
                self.rejoin().await;
            }
            let why = match self.open_stream().await {
                Ok((requests, results)) => match self.beat(&requests, results).await {
                    StreamEnd::Lost(status) => {
                        tracing::warn!(
                            id = self.id.as_deref().unwrap_or_default(),
                            ?status,
                            "the registry no longer holds this executor; registering again"
                        );
                        self.id = None;
                        self.state.send_replace(MembershipState::Lost);
                        continue;
                    }
                    StreamEnd::Broken(why) => why,
                },
                Err(why) => why,
            };
            self.failures += 1;
            self.client = None;
            self.endpoints.advance();
            // While a lease is held, never wait longer than an interval
            // between attempts: the TTL is only a few intervals.
            let delay = self.retry.next_delay_capped(self.interval);
            if self.failures == 1 {
                tracing::warn!(error = %why, retry_in = ?delay, next = self.endpoints.current(), "heartbeat stream broke; reconnecting");
            } else {
                tracing::debug!(error = %why, retry_in = ?delay, attempt = self.failures, "still reconnecting");
            }
            sleep(delay).await;
        }
    }

    /// Registers again until it succeeds, then publishes `Rejoined`.
    async fn rejoin(&mut self) {
        loop {
            let result = register(
                &mut self.endpoints,
                &mut self.client,
                &self.request,
                &mut self.retry,
                None,
            )
            .await;
            match result.and_then(|r| registered(&r)) {
                Ok((id, interval)) => {
                    tracing::info!(%id, ?interval, "registered again");
                    self.interval = interval;
                    self.keep_server_ttl = false;
                    self.id = Some(id.clone());
                    self.state.send_replace(MembershipState::Rejoined { id });
                    return;
                }
                Err(e) => {
                    // It registered before with the same request: a refusal
                    // now is the registry's problem (or a new version's);
                    // keep trying, loudly.
                    let delay = self.retry.next_delay();
                    tracing::error!(error = %e, retry_in = ?delay, "cannot register again");
                    sleep(delay).await;
                }
            }
        }
    }

    async fn open_stream(
        &mut self,
    ) -> Result<(mpsc::Sender<HeartbeatRequest>, Streaming<HeartbeatResult>), String> {
        // Twice at most: through the endpoint at hand, then (when that was a
        // follower replica) at the leader it named.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut client = match self.client.take() {
                Some(c) => c,
                None => self.endpoints.connect().await?,
            };
            let (requests, rx) = mpsc::channel(1);
            let limit = self.endpoints.options().request_timeout;
            match timeout(
                limit,
                client.heartbeat_stream(self.endpoints.options().request(ReceiverStream::new(rx))),
            )
            .await
            {
                Ok(Ok(response)) => {
                    if attempts == 1 && self.endpoints.follow_leader(response.metadata()) {
                        tracing::debug!(
                            leader = self.endpoints.current(),
                            "heartbeating at the leader replica directly"
                        );
                        continue;
                    }
                    self.client = Some(client);
                    return Ok((requests, response.into_inner()));
                }
                Ok(Err(status)) => return Err(status_text(self.endpoints.current(), &status)),
                Err(_) => {
                    return Err(format!(
                        "{}: HeartbeatStream not opened within {limit:?}",
                        self.endpoints.current()
                    ));
                }
            }
        }
    }

    /// The `ttl_ms` of the next heartbeat.
    fn ttl_ms(&self) -> u64 {
        if self.keep_server_ttl {
            return 0;
        }
        let ttl = self
            .interval
            .saturating_mul(self.ttl_intervals)
            .max(self.min_ttl);
        u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
    }

    /// How long a heartbeat's result may take before the stream counts as
    /// broken.
    fn answer_timeout(&self) -> Duration {
        (self.interval * 2).max(Duration::from_secs(2))
    }

    /// Heartbeats on one stream until it breaks or the id is lost.
    async fn beat(
        &mut self,
        requests: &mpsc::Sender<HeartbeatRequest>,
        mut results: Streaming<HeartbeatResult>,
    ) -> StreamEnd {
        let Some(id) = self.id.clone() else {
            return StreamEnd::Lost(HeartbeatStatus::UnknownExecutor);
        };
        let mut next = Instant::now();
        loop {
            // Between beats nothing is due on the stream; anything that
            // arrives is its end (the registry restarting), noticed now
            // rather than at the next beat. (`message()` is cancel-safe.)
            tokio::select! {
                () = sleep_until(next) => {}
                early = results.message() => {
                    return StreamEnd::Broken(match early {
                        Ok(None) => "the registry ended the heartbeat stream".into(),
                        Ok(Some(_)) => "a heartbeat result nobody asked for".into(),
                        Err(status) => status_text(self.endpoints.current(), &status),
                    });
                }
            }
            let ttl_ms = self.ttl_ms();
            let request = HeartbeatRequest {
                executor_id: id.clone(),
                ttl_ms,
            };
            if requests.send(request).await.is_err() {
                return StreamEnd::Broken("the heartbeat stream closed".into());
            }
            let limit = self.answer_timeout();
            let answer = match timeout(limit, results.message()).await {
                Err(_) => {
                    return StreamEnd::Broken(format!("no heartbeat result within {limit:?}"));
                }
                Ok(Err(status)) => {
                    return StreamEnd::Broken(status_text(self.endpoints.current(), &status));
                }
                Ok(Ok(None)) => {
                    return StreamEnd::Broken("the registry ended the heartbeat stream".into());
                }
                Ok(Ok(Some(answer))) => answer,
            };
            if self.failures > 0 {
                tracing::info!(%id, endpoint = self.endpoints.current(), attempts = self.failures, "heartbeating again");
                self.failures = 0;
            }
            self.retry.reset();
            if let Some(interval) = interval_of(answer.heartbeat_interval_ms)
                && interval != self.interval
            {
                tracing::debug!(from = ?self.interval, to = ?interval, "suggested heartbeat interval changed");
                self.interval = interval;
                self.keep_server_ttl = false;
            }
            match HeartbeatStatus::try_from(answer.status) {
                Ok(HeartbeatStatus::Ok) if self.ttl_ms() != ttl_ms => {
                    // The interval changed, so the TTL should too. Beat again
                    // at once: waiting a longer interval on a lease sized for
                    // the shorter one would let it expire.
                    next = Instant::now();
                }
                Ok(HeartbeatStatus::Ok) => {
                    next = Instant::now() + jittered(self.interval, self.jitter);
                }
                Ok(status @ (HeartbeatStatus::UnknownExecutor | HeartbeatStatus::Expired)) => {
                    return StreamEnd::Lost(status);
                }
                Ok(HeartbeatStatus::Invalid) if ttl_ms != 0 => {
                    tracing::warn!(
                        ttl_ms,
                        interval = ?self.interval,
                        "the registry refused this TTL (outside its --min/--max-heartbeat-ttl); \
                         heartbeating with ttl_ms = 0, which keeps the TTL it gave, \
                         until the suggested interval changes"
                    );
                    self.keep_server_ttl = true;
                    next = Instant::now();
                }
                Ok(HeartbeatStatus::Invalid) => {
                    // Even "keep the TTL" refused: only an id the registry
                    // cannot parse does that. Registering again is the way out.
                    return StreamEnd::Lost(HeartbeatStatus::Invalid);
                }
                Ok(HeartbeatStatus::Unspecified) | Err(_) => {
                    tracing::warn!(
                        status = answer.status,
                        "unexpected heartbeat status; carrying on"
                    );
                    next = Instant::now() + jittered(self.interval, self.jitter);
                }
            }
        }
    }
}
