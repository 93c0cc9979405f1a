//! Several registry replicas on etcd: leader election, forwarding, fencing
//! and failover.
//!
//! Owns: the replica's controller task, which loops through
//!
//! 1. **Campaign.** Grant an etcd lease of `--leader-lease`, keep it alive,
//!    and poll a transaction "if the leader key does not exist, create it
//!    with my advertise address on my lease, else read it". Losing: follow
//!    the address read (the [`front::Front`] forwards every call there).
//! 2. **Lead.** The leader key's create revision is the *fence*: every write
//!    of the term (membership commits, watermarks) is a transaction
//!    comparing it, so once the key is gone (lease expired: the leader was
//!    paused, partitioned or killed) nothing this replica sends can change
//!    etcd. The leader loads membership and watermarks, starts the core
//!    (`Registry::start_resumed`: each executor resumes with its real
//!    remaining TTL plus a grace, [`watermark::resume`]) and serves it
//!    locally.
//! 3. **Step down** — without a restart — as soon as a write is fenced, or
//!    the lease is not known to be valid any more (its last keep-alive was
//!    sent more than a TTL ago: checked on the monotonic clock, which keeps
//!    running while the process is stopped, so a replica woken from SIGSTOP
//!    steps down at once). Then campaign again.
//!
//! Must not touch: the core's internals (it uses `Registry` like any
//! embedder), the sqlite store.

pub mod front;
pub mod takeover;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::etcd::{self, Etcd, EtcdError, Fence, Keys};
use crate::metrics::Metrics;
use crate::registry::{Registry, RegistryConfig, StartOptions};
use crate::server::tls::OutboundTls;
use crate::server::{Admission, Limits};
use crate::store::EtcdStore;
use front::{Forwarding, Front, Route};

/// Most concurrent HTTP/2 streams per connection a replica accepts: a
/// follower forwards every client's streams over one connection to the
/// leader.
pub const MAX_FORWARDED_STREAMS: u32 = 1 << 20;

/// Longest the start-up probe of etcd waits for an answer.
pub const ETCD_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a replica runs.
#[derive(Debug, Clone)]
pub struct ReplicaOptions {
    /// etcd endpoints (`host:port`).
    pub endpoints: Vec<String>,
    /// TLS to etcd (`--etcd-ca`, `--etcd-cert`, `--etcd-key`); None:
    /// plaintext.
    pub etcd_tls: Option<OutboundTls>,
    /// How a follower reaches the leader and vouches for its callers.
    pub forwarding: Forwarding,
    /// Key prefix (`--etcd-prefix`).
    pub prefix: String,
    /// Leader lease (`--leader-lease`), whole seconds (etcd's unit).
    pub lease: Duration,

    /// Address clients and replicas reach this one at.
    pub advertise: String,
    /// The core's settings.
    pub config: RegistryConfig,
    /// The service's overload limits.
    pub limits: Limits,
}

impl ReplicaOptions {
    /// The grace every member gets at a takeover on top of its TTL (see
    /// [`takeover::takeover_grace`]).
    pub fn takeover_grace(&self, executors: usize) -> Duration {
        takeover::takeover_grace(self.lease, &self.config, executors)
    }
}

/// A running replica: its controller task.
pub struct ReplicaTask {
    stop: CancellationToken,
    handle: JoinHandle<()>,
}

impl ReplicaTask {
    /// A token that, when cancelled, makes the replica step down (ending the
    /// streams it serves as leader) and stop.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Steps down (flushing the store and revoking the lease if leading, so
    /// another replica takes over at once) and waits for the controller.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Err(e) = self.handle.await {
            tracing::error!(error = %e, "replica controller failed");
        }
    }
}

/// Why a replica did not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// The etcd client could not be made (a bad endpoint).
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// etcd accepted a connection but no call got through: its TLS
    /// settings and this replica's differ. The message names the flags.
    #[error("{0}")]
    EtcdMismatch(String),
}

/// What to check when etcd takes connections but no call gets through,
/// given the TLS flags this replica has.
fn mismatch_hint(tls: Option<&OutboundTls>) -> &'static str {
    match tls {
        None => "does it require TLS? set --etcd-ca/--etcd-cert/--etcd-key",
        Some(tls) if !tls.has_client_certificate() => {
            "does it require a client certificate (set --etcd-cert/--etcd-key), or not speak TLS, or is its certificate not signed by --etcd-ca?"
        }
        Some(_) => {
            "check --etcd-ca/--etcd-cert/--etcd-key: does etcd speak TLS, is its certificate signed by --etcd-ca and valid for the endpoint's host, does it accept the client certificate?"
        }
    }
}

/// Starts the controller on the current runtime; serve the returned
/// [`Front`] with [`crate::server::serve_service`].
///
/// First probes etcd (at most [`ETCD_PROBE_TIMEOUT`]): an etcd that takes
/// connections but cannot be talked to with these TLS settings is an
/// error naming the flags — retrying would never help. An etcd that is
/// not reachable at all is retried by the controller, as it may be
/// starting.
pub async fn start(
    options: ReplicaOptions,
    metrics: Arc<Metrics>,
) -> Result<(Front, ReplicaTask), StartError> {
    let etcd = Etcd::connect(&options.endpoints, options.etcd_tls.as_ref())?;
    let keys = Keys::new(&options.prefix);
    let leader_key = keys.leader();
    let mut reach = etcd.probe(leader_key.as_bytes(), ETCD_PROBE_TIMEOUT).await;
    if let etcd::Reach::Mismatch(_) = reach {
        // Once more, in case that was a connection dropped by chance.
        tokio::time::sleep(Duration::from_millis(200)).await;
        reach = etcd.probe(leader_key.as_bytes(), ETCD_PROBE_TIMEOUT).await;
    }
    let endpoints = options.endpoints.join(",");
    match reach {
        etcd::Reach::Answered => {}
        etcd::Reach::Unreachable(why) => {
            tracing::warn!(%endpoints, error = %why, "cannot reach etcd yet; retrying until it answers");
        }
        etcd::Reach::Mismatch(why) => {
            return Err(StartError::EtcdMismatch(format!(
                "cannot reach etcd at {endpoints}: {why} — {}",
                mismatch_hint(options.etcd_tls.as_ref())
            )));
        }
    }
    let front = Front::new(options.forwarding.clone());
    let stop = CancellationToken::new();
    let controller = Controller {
        keys,
        admission: Admission::new(options.limits),
        options,
        etcd,
        front: front.clone(),
        metrics,
        stop: stop.clone(),
    };
    let handle = tokio::spawn(controller.run());
    Ok((front, ReplicaTask { stop, handle }))
}

struct Controller {
    options: ReplicaOptions,
    keys: Keys,
    etcd: Etcd,
    front: Front,
    metrics: Arc<Metrics>,
    admission: Admission,
    stop: CancellationToken,
}

/// What ended a term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TermEnd {
    Shutdown,
    Fenced,
    LeaseUnconfirmed,
    LoadFailed,
}

impl Controller {
    fn poll_period(&self) -> Duration {
        // A few dozen small transactions a second: cheap for etcd, and a
        // dead leader's key is noticed within ~1/40 of a lease.
        (self.options.lease / 40).clamp(Duration::from_millis(25), Duration::from_millis(250))
    }

    async fn run(self) {
        self.metrics.start_as_follower();
        while !self.stop.is_cancelled() {
            let asked = Instant::now();
            let (lease, ttl) = match self.etcd.grant(self.options.lease).await {
                Ok(granted) => granted,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot get an etcd lease; retrying");
                    self.front.set(Route::Unknown);
                    tokio::select! {
                        () = self.stop.cancelled() => {}
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    continue;
                }
            };
            let (valid_tx, valid) = watch::channel(asked + ttl);
            let keeper = {
                let etcd = self.etcd.clone();
                tokio::spawn(async move { etcd.keep_alive(lease, ttl / 4, valid_tx).await })
            };
            if let Some(fence) = self.campaign(lease, &valid).await {
                let end = self.lead(fence, &valid).await;
                tracing::warn!(?end, "no longer the leader");
                if end != TermEnd::Shutdown {
                    self.metrics.set_leader(false);
                }
            }
            keeper.abort();
            // Its keys (the leader key) go at once: a follower takes over
            // without waiting for the lease to run out.
            if let Err(e) = self.etcd.revoke(lease).await {
                tracing::debug!(error = %e, "cannot revoke the lease (it may be gone already)");
            }
        }
        tracing::info!("replica stopped");
    }

    /// Until this replica leads (its fence), the lease is lost, or stop.
    async fn campaign(&self, lease: i64, valid: &watch::Receiver<Instant>) -> Option<Fence> {
        let key = self.keys.leader();
        let request = etcd::pb::TxnRequest {
            compare: vec![etcd::absent(key.clone())],
            success: vec![etcd::put(
                key.clone(),
                self.options.advertise.clone(),
                lease,
            )],
            failure: vec![etcd::get(key.clone())],
        };
        loop {
            if self.stop.is_cancelled() || Instant::now() >= *valid.borrow() {
                return None;
            }
            match self.etcd.txn(request.clone()).await {
                Ok(response) if response.succeeded => {
                    let revision = response.header.map(|h| h.revision).unwrap_or(0);
                    return Some(Fence {
                        key: key.into_bytes(),
                        create_revision: revision,
                    });
                }
                Ok(response) => {
                    let leader = response
                        .responses
                        .into_iter()
                        .find_map(|r| match r.response {
                            Some(etcd::pb::response_op::Response::ResponseRange(range)) => {
                                range.kvs.into_iter().next()
                            }
                            _ => None,
                        });
                    match leader {
                        Some(kv) => self.front.follow(&String::from_utf8_lossy(&kv.value)),
                        None => self.front.set(Route::Unknown),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach etcd to campaign");
                }
            }
            tokio::select! {
                () = self.stop.cancelled() => return None,
                () = tokio::time::sleep(self.poll_period()) => {}
            }
        }
    }

    async fn lead(&self, fence: Fence, valid: &watch::Receiver<Instant>) -> TermEnd {
        let won = Instant::now();
        self.front.set(Route::Unknown);
        let loaded = match takeover::load(&self.etcd, &self.keys, &fence).await {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::error!(error = %e, "won the election but cannot load membership");
                return TermEnd::LoadFailed;
            }
        };
        let options = &self.options;
        let count = loaded.executors.len();
        let recorded = loaded.executors.iter().filter(|e| e.ttl.is_some()).count();
        let grace = options.takeover_grace(count);
        let fenced = CancellationToken::new();
        let store = EtcdStore::new(
            self.etcd.clone(),
            self.keys.clone(),
            fence.clone(),
            (loaded.executors, loaded.revision_floor),
            fenced.clone(),
            tokio::runtime::Handle::current(),
        );
        let observer: Arc<dyn crate::registry::Observer> = self.metrics.clone();
        // Expiries only while the lease is confirmed: woken from a pause
        // past it, this leader decides none before it notices and steps down.
        let authority: crate::registry::Authority = {
            let valid = valid.clone();
            Arc::new(move || Instant::now() < *valid.borrow())
        };
        let started = Registry::start_with(
            options.config.clone(),
            Box::new(store),
            observer,
            StartOptions {
                takeover_grace: Some(grace),
                authority: Some(authority),
            },
        );
        let (registry, task) = match started {
            Ok(started) => started,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the membership loop");
                return TermEnd::LoadFailed;
            }
        };
        let streams_stop = CancellationToken::new();
        let (service, admin) = crate::server::services(
            registry.clone(),
            streams_stop.clone(),
            self.admission.clone(),
        );
        self.front.set(Route::Local {
            service,
            admin,
            advertise: options.advertise.clone(),
        });
        self.metrics.set_leader(true);
        tracing::info!(
            executors = count,
            with_recorded_ttl = recorded,
            orphans = loaded.orphans,
            revision = fence.create_revision,
            load_ms = won.elapsed().as_millis() as u64,
            grace_ms = grace.as_millis() as u64,
            "leading"
        );
        let mut check = tokio::time::interval(Duration::from_millis(50));
        let end = loop {
            tokio::select! {
                () = self.stop.cancelled() => break TermEnd::Shutdown,
                () = fenced.cancelled() => break TermEnd::Fenced,
                _ = check.tick() => {
                    if Instant::now() >= *valid.borrow() {
                        break TermEnd::LeaseUnconfirmed;
                    }
                }
            }
        };
        if end != TermEnd::Shutdown {
            // Refuse every further commit without asking etcd.
            fenced.cancel();
            self.front.set(Route::Unknown);
            self.metrics.set_leader(false);
        }
        streams_stop.cancel();
        task.stop().await;
        if end == TermEnd::Shutdown {
            self.front.set(Route::Unknown);
            self.metrics.set_leader(false);
        }
        end
    }
}
