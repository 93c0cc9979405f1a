//! Prometheus metrics: the [`Observer`] adapter and the `/metrics` exporter.
//!
//! Owns: the metric names of SPEC §4 (defined once, here, as constants), their
//! descriptions and histogram buckets, every metric handle (created once, in
//! [`Metrics::new`]), the heartbeat tallies, and the `/metrics` HTTP endpoint,
//! which at every scrape folds the tallies into the exported counters,
//! samples the standard `process_*` metrics and renders the text.
//!
//! Invariants:
//! - Every known label value is registered at start, so each series exists
//!   at 0 before its first event (`rate()` and alerts need the zero).
//! - The heartbeat path is one relaxed `fetch_add` on a tally of our own. A
//!   `metrics::Counter` increment through the Prometheus recorder is a virtual
//!   call plus two read-modify-writes (the value, and a generation counter for
//!   idle tracking), roughly twice the cost under contention; so tallies are
//!   copied into the counters by [`Metrics::flush`], which every scrape
//!   calls first: a scrape shows every heartbeat answered before it.
//! - `process_cpu_seconds_total` is rendered here, as a float: `metrics`
//!   counters are integers, and whole CPU seconds make a useless rate.

use std::fmt;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::thread;
use std::time::Duration;

use ::metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, Unit};
use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use crate::registry::{HeartbeatResult, Observer, RegistrationResult};

/// `registry_executors{status}` gauge: live executors by status.
pub const EXECUTORS: &str = "registry_executors";
/// `registry_registrations_total{result}` counter.
pub const REGISTRATIONS: &str = "registry_registrations_total";
/// `registry_heartbeats_total{result}` counter.
pub const HEARTBEATS: &str = "registry_heartbeats_total";
/// `registry_expirations_total` counter.
pub const EXPIRATIONS: &str = "registry_expirations_total";
/// `registry_deregistrations_total` counter.
pub const DEREGISTRATIONS: &str = "registry_deregistrations_total";
/// `registry_expiry_lag_seconds` histogram: deadline to removal.
pub const EXPIRY_LAG: &str = "registry_expiry_lag_seconds";
/// `registry_events_total{type}` counter.
pub const EVENTS: &str = "registry_events_total";
/// `registry_watchers` gauge.
pub const WATCHERS: &str = "registry_watchers";
/// `registry_watchers_lagged_total` counter.
pub const WATCHERS_LAGGED: &str = "registry_watchers_lagged_total";
/// `registry_watch_starts_total{from}` counter.
pub const WATCH_STARTS: &str = "registry_watch_starts_total";
/// `registry_watch_history_events` gauge.
pub const WATCH_HISTORY_EVENTS: &str = "registry_watch_history_events";
/// `registry_watch_snapshot_bytes_total` counter.
pub const WATCH_SNAPSHOT_BYTES: &str = "registry_watch_snapshot_bytes_total";
/// `registry_watch_snapshot_paced_total` counter.
pub const WATCH_SNAPSHOT_PACED: &str = "registry_watch_snapshot_paced_total";
/// `registry_store_operation_seconds{op}` histogram.
pub const STORE_OPERATION: &str = "registry_store_operation_seconds";
/// `registry_store_errors_total{op}` counter.
pub const STORE_ERRORS: &str = "registry_store_errors_total";
/// `registry_revision` gauge.
pub const REVISION: &str = "registry_revision";
/// `registry_is_leader` gauge: 1 on the replica that runs the membership loop.
pub const IS_LEADER: &str = "registry_is_leader";
/// `registry_leader_changes_total` counter.
pub const LEADER_CHANGES: &str = "registry_leader_changes_total";
/// `registry_auth_denied_total{reason}` counter.
pub const AUTH_DENIED: &str = "registry_auth_denied_total";
/// `registry_expiry_guard_active` gauge: 1 while the mass-expiry guard holds
/// expirations, else 0 (also when the guard is off).
pub const EXPIRY_GUARD_ACTIVE: &str = "registry_expiry_guard_active";
/// `registry_tombstones` gauge: tombstones remembered (expired or
/// deregistered within `--tombstone-retention`).
pub const TOMBSTONES: &str = "registry_tombstones";
/// `registry_timing_wheel_entries` gauge: entries in the expiry timing wheel.
pub const TIMING_WHEEL_ENTRIES: &str = "registry_timing_wheel_entries";

/// `process_cpu_seconds_total` counter, rendered by [`Metrics::render`] as a float.
pub const PROCESS_CPU_SECONDS: &str = "process_cpu_seconds_total";
/// `process_resident_memory_bytes` gauge.
pub const PROCESS_RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
/// `process_virtual_memory_bytes` gauge.
pub const PROCESS_VIRTUAL_MEMORY: &str = "process_virtual_memory_bytes";
/// `process_open_fds` gauge.
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
/// `process_max_fds` gauge (0 = unlimited).
pub const PROCESS_MAX_FDS: &str = "process_max_fds";
/// `process_start_time_seconds` gauge (Unix time).
pub const PROCESS_START_TIME: &str = "process_start_time_seconds";
/// `process_threads` gauge.
pub const PROCESS_THREADS: &str = "process_threads";

/// Buckets of [`EXPIRY_LAG`], in seconds. SPEC's target is p99 ≤ 50 ms; the
/// alert fires at p99 > 1 s; both are bucket bounds.
pub const EXPIRY_LAG_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets of [`STORE_OPERATION`], in seconds.
pub const STORE_OPERATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Store operations registered at start (the `op` label of the store metrics).
pub const STORE_OPS: &[&str] = &["commit", "load"];

/// Reasons of `registry_auth_denied_total`, registered at 0 so the series
/// exist before the first denial: a TLS handshake refused, a request without
/// valid credentials, an executor touching another's registration, a call
/// that needs an admin identity or token.
pub const AUTH_DENIED_REASONS: &[&str] =
    &["handshake", "unauthenticated", "not_owner", "not_admin"];

/// How often the recorder's upkeep (histogram bucket draining) runs.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Heartbeat results in tally order, with their label values.
const HEARTBEAT_RESULTS: [(HeartbeatResult, &str); 4] = [
    (HeartbeatResult::Ok, "ok"),
    (HeartbeatResult::Unknown, "unknown"),
    (HeartbeatResult::Expired, "expired"),
    (HeartbeatResult::Invalid, "invalid"),
];

/// Registration results in handle order, with their label values.
const REGISTRATION_RESULTS: [(RegistrationResult, &str); 3] = [
    (RegistrationResult::Ok, "ok"),
    (RegistrationResult::Invalid, "invalid"),
    (RegistrationResult::Unavailable, "unavailable"),
];

const METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

fn heartbeat_index(result: HeartbeatResult) -> usize {
    match result {
        HeartbeatResult::Ok => 0,
        HeartbeatResult::Unknown => 1,
        HeartbeatResult::Expired => 2,
        HeartbeatResult::Invalid => 3,
    }
}

fn registration_index(result: RegistrationResult) -> usize {
    match result {
        RegistrationResult::Ok => 0,
        RegistrationResult::Invalid => 1,
        RegistrationResult::Unavailable => 2,
    }
}

/// The exporter settings shared by [`install`] and tests: explicit buckets,
/// so both histograms render as Prometheus histograms (`_bucket` series that
/// `histogram_quantile` can aggregate across instances), not summaries.
pub fn builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(EXPIRY_LAG.into()), EXPIRY_LAG_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(STORE_OPERATION.into()),
            STORE_OPERATION_BUCKETS,
        )
}

/// Installs the global recorder and serves Prometheus text over HTTP on
/// `listen` at `/metrics`; returns the observer to hand to the registry.
///
/// Must run inside a tokio runtime: the endpoint is a task on it. A thread
/// named `registry-metrics` runs the recorder's upkeep until the returned
/// `Metrics` is dropped (without upkeep, histograms grow without bound).
///
/// Fails if `listen` cannot be bound or a global recorder is already set.
pub async fn install(listen: SocketAddr) -> anyhow::Result<Arc<Metrics>> {
    install_with_tls(listen, None, true).await
}

/// [`install`], serving HTTPS with `tls` when given (`--metrics-tls`).
pub async fn install_with_tls(
    listen: SocketAddr,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    leads: bool,
) -> anyhow::Result<Arc<Metrics>> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the metrics endpoint on {listen}"))?;
    let recorder = builder().context("metric buckets")?.build_recorder();
    let handle = recorder.handle();
    ::metrics::set_global_recorder(recorder)
        .context("a global metrics recorder is already installed")?;
    let metrics = Arc::new(::metrics::with_recorder(Metrics::new));
    // A replica is a follower until elected: never let a scrape see it
    // leading before that (a scrape may come as soon as the endpoint serves).
    if !leads {
        metrics.start_as_follower();
    }
    spawn_upkeep(Arc::downgrade(&metrics), handle.clone())
        .context("starting the metrics upkeep thread")?;
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(serve_scrapes(
        listener,
        tls,
        handle,
        Arc::downgrade(&metrics),
    ));
    Ok(metrics)
}

#[allow(
    clippy::disallowed_methods,
    reason = "an OS thread of its own, off the runtime: a blocking sleep is what it means"
)]
fn spawn_upkeep(metrics: Weak<Metrics>, handle: PrometheusHandle) -> std::io::Result<()> {
    thread::Builder::new()
        .name("registry-metrics".into())
        .spawn(move || {
            while metrics.strong_count() > 0 {
                thread::sleep(UPKEEP_INTERVAL);
                handle.run_upkeep();
            }
        })
        .map(drop)
}

/// Answers `GET /metrics` (HTTP/1.1, over TLS when `tls` is given) with a
/// fresh rendering; 404 elsewhere.
async fn serve_scrapes(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handle: PrometheusHandle,
    metrics: Weak<Metrics>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (handle, metrics) = (handle.clone(), metrics.clone());
        let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            let response = scrape(&request, &handle, &metrics);
            async move { Ok::<_, std::convert::Infallible>(response) }
        });
        let tls = tls.clone();
        tokio::spawn(async move {
            let result = match tls {
                None => serve_connection(stream, service).await,
                Some(acceptor) => {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(stream)) => serve_connection(stream, service).await,
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("no TLS handshake within 10s".into()),
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

async fn serve_connection<IO, S>(io: IO, service: S) -> Result<(), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            Request<hyper::body::Incoming>,
            Response = Response<Full<Bytes>>,
            Error = std::convert::Infallible,
        >,
    S::Future: Send + 'static,
{
    hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await
        .map_err(|e| e.to_string())
}

fn scrape<B>(
    request: &Request<B>,
    handle: &PrometheusHandle,
    metrics: &Weak<Metrics>,
) -> Response<Full<Bytes>> {
    let response = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        response
    };
    if request.uri().path() != "/metrics" {
        return response(StatusCode::NOT_FOUND, "metrics are at /metrics\n".into());
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return response(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n".into());
    }
    match metrics.upgrade() {
        Some(metrics) => response(StatusCode::OK, metrics.render(handle)),
        None => response(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into()),
    }
}

/// Heartbeat tallies, one set per shard of threads, each on a cache line
/// of its own: threads answering heartbeats on different cores then never
/// write the same line (one shared counter cost the batch path about 5 %
/// of its time, the line bouncing between the workers).
#[derive(Default)]
struct Tallies([TallyShard; TALLY_SHARDS]);

/// Shards of [`Tallies`]: threads take one each, round robin.
const TALLY_SHARDS: usize = 16;

#[repr(align(128))]
#[derive(Default)]
struct TallyShard([AtomicU64; 4]);

impl Tallies {
    fn add(&self, index: usize) {
        thread_local! {
            static SHARD: usize = {
                static NEXT: AtomicUsize = AtomicUsize::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed) % TALLY_SHARDS
            };
        }
        let shard = SHARD.with(|shard| *shard);
        self.0[shard].0[index].fetch_add(1, Ordering::Relaxed);
    }

    /// The count of `index` over every shard.
    fn total(&self, index: usize) -> u64 {
        self.0
            .iter()
            .map(|shard| shard.0[index].load(Ordering::Relaxed))
            .sum()
    }
}

/// Handles of one store operation.
struct StoreHandles {
    seconds: Histogram,
    errors: Counter,
}

/// Handles per label value: the known ones registered at start, others
/// registered on first use through the current recorder.
struct ByLabel<T> {
    known: Vec<(&'static str, T)>,
    extra: Mutex<Vec<(&'static str, T)>>,
    make: fn(&dyn Recorder, &'static str) -> T,
}

impl<T> ByLabel<T> {
    fn new(
        recorder: &dyn Recorder,
        values: &[&'static str],
        make: fn(&dyn Recorder, &'static str) -> T,
    ) -> Self {
        Self {
            known: values.iter().map(|&v| (v, make(recorder, v))).collect(),
            extra: Mutex::new(Vec::new()),
            make,
        }
    }

    fn with(&self, value: &'static str, f: impl FnOnce(&T)) {
        if let Some((_, handles)) = self.known.iter().find(|(v, _)| *v == value) {
            return f(handles);
        }
        let mut extra = self.extra.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, handles)) = extra.iter().find(|(v, _)| *v == value) {
            return f(handles);
        }
        let handles = ::metrics::with_recorder(|recorder| (self.make)(recorder, value));
        f(&handles);
        extra.push((value, handles));
    }
}

/// Handles of the standard process metrics.
struct ProcessMetrics {
    /// Bits of the last CPU-seconds sample (an `f64`), rendered by hand.
    cpu_seconds: AtomicU64,
    resident_memory: Gauge,
    virtual_memory: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    start_time: Gauge,
    threads: Gauge,
}

/// The metrics adapter: every handle, created once. Implements [`Observer`].
pub struct Metrics {
    heartbeat_tallies: Tallies,
    heartbeats: [Counter; 4],
    registrations: [Counter; 3],
    expirations: Counter,
    deregistrations: Counter,
    expiry_lag: Histogram,
    events_online: Counter,
    events_running: Counter,
    events_offline: Counter,
    watch_starts_snapshot: Counter,
    watch_starts_history: Counter,
    watch_history: Gauge,
    watch_snapshot_bytes: Counter,
    watch_snapshot_paced: Counter,
    executors_initing: Gauge,
    executors_running: Gauge,
    watchers: Gauge,
    watchers_lagged: Counter,
    store: ByLabel<StoreHandles>,
    revision: Gauge,
    expiry_guard_active: Gauge,
    tombstones: Gauge,
    timing_wheel: Gauge,
    leader: AtomicBool,
    is_leader: Gauge,
    leader_changes: Counter,
    auth_denied: ByLabel<Counter>,
    process: ProcessMetrics,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("leader", &self.leader.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn key(name: &'static str, label: Option<(&'static str, &'static str)>) -> Key {
    match label {
        None => Key::from_static_name(name),
        Some((k, v)) => Key::from_parts(name, vec![Label::from_static_parts(k, v)]),
    }
}

fn counter(
    r: &dyn Recorder,
    name: &'static str,
    label: Option<(&'static str, &'static str)>,
) -> Counter {
    r.register_counter(&key(name, label), &METADATA)
}

fn gauge(
    r: &dyn Recorder,
    name: &'static str,
    label: Option<(&'static str, &'static str)>,
) -> Gauge {
    r.register_gauge(&key(name, label), &METADATA)
}

fn histogram(
    r: &dyn Recorder,
    name: &'static str,
    label: Option<(&'static str, &'static str)>,
) -> Histogram {
    r.register_histogram(&key(name, label), &METADATA)
}

fn describe(recorder: &dyn Recorder) {
    let counters: &[(&'static str, Option<Unit>, &'static str)] = &[
        (REGISTRATIONS, None, "Registrations answered, by result."),
        (HEARTBEATS, None, "Heartbeats handled, by result."),
        (
            EXPIRATIONS,
            None,
            "Executors removed because their TTL ran out.",
        ),
        (
            DEREGISTRATIONS,
            None,
            "Executors removed by a graceful Deregister.",
        ),
        (
            EVENTS,
            None,
            "Membership events published to watchers, by type.",
        ),
        (
            WATCHERS_LAGGED,
            None,
            "Watch streams ended because the watcher fell further behind than the watch history holds.",
        ),
        (
            WATCH_STARTS,
            None,
            "Watch streams started, by where from: a snapshot, or the history (a resume).",
        ),
        (
            WATCH_SNAPSHOT_BYTES,
            None,
            "Bytes of snapshot chunks sent to watchers.",
        ),
        (
            WATCH_SNAPSHOT_PACED,
            None,
            "Snapshot chunks that waited for --snapshot-rate before they were sent.",
        ),
        (
            STORE_ERRORS,
            None,
            "Store operations that failed, by operation.",
        ),
        (
            LEADER_CHANGES,
            None,
            "Times this replica gained or lost leadership.",
        ),
        (
            AUTH_DENIED,
            None,
            "Requests refused by authentication or authorization, by reason.",
        ),
    ];
    for &(name, unit, help) in counters {
        recorder.describe_counter(KeyName::from_const_str(name), unit, help.into());
    }
    let gauges: &[(&'static str, Option<Unit>, &'static str)] = &[
        (EXECUTORS, None, "Live executors, by status."),
        (WATCHERS, None, "Open watch streams."),
        (
            WATCH_HISTORY_EVENTS,
            None,
            "Events the watch history holds for watchers to read or resume from.",
        ),
        (REVISION, None, "Current membership revision."),
        (
            EXPIRY_GUARD_ACTIVE,
            None,
            "1 while the mass-expiry guard holds expirations, else 0.",
        ),
        (
            IS_LEADER,
            None,
            "1 if this replica runs the membership loop, else 0.",
        ),
        (
            TOMBSTONES,
            None,
            "Tombstones remembered: executors expired or deregistered within the tombstone retention.",
        ),
        (
            TIMING_WHEEL_ENTRIES,
            None,
            "Entries in the expiry timing wheel: one per live executor, plus departed ones until their deadline.",
        ),
        (
            PROCESS_RESIDENT_MEMORY,
            Some(Unit::Bytes),
            "Resident memory size in bytes.",
        ),
        (
            PROCESS_VIRTUAL_MEMORY,
            Some(Unit::Bytes),
            "Virtual memory size in bytes.",
        ),
        (
            PROCESS_OPEN_FDS,
            Some(Unit::Count),
            "Number of open file descriptors.",
        ),
        (
            PROCESS_MAX_FDS,
            Some(Unit::Count),
            "Maximum number of open file descriptors (0 = unlimited).",
        ),
        (
            PROCESS_START_TIME,
            Some(Unit::Seconds),
            "Start time of the process since the Unix epoch, in seconds.",
        ),
        (
            PROCESS_THREADS,
            Some(Unit::Count),
            "Number of OS threads in the process.",
        ),
    ];
    for &(name, unit, help) in gauges {
        recorder.describe_gauge(KeyName::from_const_str(name), unit, help.into());
    }
    recorder.describe_histogram(
        KeyName::from_const_str(EXPIRY_LAG),
        Some(Unit::Seconds),
        "Time from an executor's deadline to its removal.".into(),
    );
    recorder.describe_histogram(
        KeyName::from_const_str(STORE_OPERATION),
        Some(Unit::Seconds),
        "Duration of store operations, by operation.".into(),
    );
}

impl Metrics {
    /// Describes every metric and registers every handle on `recorder`, each
    /// known label value at 0; `registry_is_leader` starts at 1 (a
    /// single-process registry leads from the start). Samples `process_*`
    /// once.
    ///
    /// Label values outside the known sets (a new store `op`, any auth
    /// `reason`) are registered on first use through the recorder current at
    /// that moment (`metrics::with_recorder`): the global one once installed.
    pub fn new(recorder: &dyn Recorder) -> Self {
        describe(recorder);
        let metrics = Self {
            heartbeat_tallies: Tallies::default(),
            heartbeats: HEARTBEAT_RESULTS
                .map(|(_, v)| counter(recorder, HEARTBEATS, Some(("result", v)))),
            registrations: REGISTRATION_RESULTS
                .map(|(_, v)| counter(recorder, REGISTRATIONS, Some(("result", v)))),
            expirations: counter(recorder, EXPIRATIONS, None),
            deregistrations: counter(recorder, DEREGISTRATIONS, None),
            expiry_lag: histogram(recorder, EXPIRY_LAG, None),
            events_online: counter(recorder, EVENTS, Some(("type", "online"))),
            events_running: counter(recorder, EVENTS, Some(("type", "running"))),
            events_offline: counter(recorder, EVENTS, Some(("type", "offline"))),
            watch_starts_snapshot: counter(recorder, WATCH_STARTS, Some(("from", "snapshot"))),
            watch_starts_history: counter(recorder, WATCH_STARTS, Some(("from", "history"))),
            watch_history: gauge(recorder, WATCH_HISTORY_EVENTS, None),
            watch_snapshot_bytes: counter(recorder, WATCH_SNAPSHOT_BYTES, None),
            watch_snapshot_paced: counter(recorder, WATCH_SNAPSHOT_PACED, None),
            executors_initing: gauge(recorder, EXECUTORS, Some(("status", "initing"))),
            executors_running: gauge(recorder, EXECUTORS, Some(("status", "running"))),
            watchers: gauge(recorder, WATCHERS, None),
            watchers_lagged: counter(recorder, WATCHERS_LAGGED, None),
            store: ByLabel::new(recorder, STORE_OPS, |r, op| StoreHandles {
                seconds: histogram(r, STORE_OPERATION, Some(("op", op))),
                errors: counter(r, STORE_ERRORS, Some(("op", op))),
            }),
            revision: gauge(recorder, REVISION, None),
            expiry_guard_active: gauge(recorder, EXPIRY_GUARD_ACTIVE, None),
            tombstones: gauge(recorder, TOMBSTONES, None),
            timing_wheel: gauge(recorder, TIMING_WHEEL_ENTRIES, None),
            leader: AtomicBool::new(true),
            is_leader: gauge(recorder, IS_LEADER, None),
            leader_changes: counter(recorder, LEADER_CHANGES, None),
            auth_denied: ByLabel::new(recorder, AUTH_DENIED_REASONS, |r, reason| {
                counter(r, AUTH_DENIED, Some(("reason", reason)))
            }),
            process: ProcessMetrics {
                cpu_seconds: AtomicU64::new(0f64.to_bits()),
                resident_memory: gauge(recorder, PROCESS_RESIDENT_MEMORY, None),
                virtual_memory: gauge(recorder, PROCESS_VIRTUAL_MEMORY, None),
                open_fds: gauge(recorder, PROCESS_OPEN_FDS, None),
                max_fds: gauge(recorder, PROCESS_MAX_FDS, None),
                start_time: gauge(recorder, PROCESS_START_TIME, None),
                threads: gauge(recorder, PROCESS_THREADS, None),
            },
        };
        // Gauges and histograms register without a value; counters start at 0.
        metrics.is_leader.set(1.0);
        for g in [
            &metrics.executors_initing,
            &metrics.executors_running,
            &metrics.watchers,
            &metrics.watch_history,
            &metrics.revision,
            &metrics.expiry_guard_active,
            &metrics.tombstones,
            &metrics.timing_wheel,
        ] {
            g.set(0.0);
        }
        metrics.collect_process();
        metrics
    }

    /// Copies the heartbeat tallies into the exported counters. Every scrape
    /// of [`install`]'s endpoint calls it; call it before rendering a
    /// recorder of your own.
    pub fn flush(&self) {
        for (index, counter) in self.heartbeats.iter().enumerate() {
            counter.absolute(self.heartbeat_tallies.total(index));
        }
    }

    /// Samples the `process_*` metrics now. Every scrape calls it.
    pub fn collect_process(&self) {
        let sample = metrics_process::collector::collect();
        let p = &self.process;
        if let Some(v) = sample.cpu_seconds_total {
            p.cpu_seconds.store(v.to_bits(), Ordering::Relaxed);
        }
        let gauges = [
            (&p.resident_memory, sample.resident_memory_bytes),
            (&p.virtual_memory, sample.virtual_memory_bytes),
            (&p.open_fds, sample.open_fds),
            (&p.max_fds, sample.max_fds),
            (&p.start_time, sample.start_time_seconds),
            (&p.threads, sample.threads),
        ];
        for (gauge, value) in gauges {
            if let Some(v) = value {
                gauge.set(v as f64);
            }
        }
    }

    /// One scrape: flushes the heartbeat tallies, samples the process, and
    /// renders `handle` followed by `process_cpu_seconds_total` as a float.
    pub fn render(&self, handle: &PrometheusHandle) -> String {
        self.flush();
        self.collect_process();
        let mut text = handle.render();
        let cpu = f64::from_bits(self.process.cpu_seconds.load(Ordering::Relaxed));
        let _ = write!(
            text,
            "# HELP {PROCESS_CPU_SECONDS} Total user and system CPU time spent in seconds.\n\
             # TYPE {PROCESS_CPU_SECONDS} counter\n\
             {PROCESS_CPU_SECONDS} {cpu}\n"
        );
        text
    }

    /// A replica starts as a follower: `registry_is_leader` 0, no change
    /// counted.
    pub fn start_as_follower(&self) {
        self.leader.store(false, Ordering::Relaxed);
        self.is_leader.set(0.0);
    }

    /// Records whether this replica leads; counts a change when it flips.
    pub fn set_leader(&self, leader: bool) {
        if self.leader.swap(leader, Ordering::Relaxed) != leader {
            self.leader_changes.increment(1);
        }
        self.is_leader.set(if leader { 1.0 } else { 0.0 });
    }

    /// Counts one request refused by authentication or authorization.
    pub fn auth_denied(&self, reason: &'static str) {
        self.auth_denied.with(reason, |c| c.increment(1));
    }
}

impl Observer for Metrics {
    fn auth_denied(&self, reason: &'static str) {
        Metrics::auth_denied(self, reason);
    }

    fn heartbeat(&self, result: HeartbeatResult) {
        self.heartbeat_tallies.add(heartbeat_index(result));
    }

    fn registration(&self, result: RegistrationResult) {
        self.registrations[registration_index(result)].increment(1);
    }

    fn expired(&self, lags: &[Duration]) {
        self.expirations.increment(lags.len() as u64);
        for lag in lags {
            self.expiry_lag.record(lag.as_secs_f64());
        }
    }

    fn deregistered(&self) {
        self.deregistrations.increment(1);
    }

    fn expiry_guard(&self, active: bool, _held: u64) {
        self.expiry_guard_active.set(if active { 1.0 } else { 0.0 });
    }

    fn tables(&self, tombstones: u64, wheel: u64) {
        self.tombstones.set(tombstones as f64);
        self.timing_wheel.set(wheel as f64);
    }

    fn released(&self, count: u64) {
        self.expirations.increment(count);
    }

    fn events(&self, online: u64, running: u64, offline: u64) {
        for (counter, n) in [
            (&self.events_online, online),
            (&self.events_running, running),
            (&self.events_offline, offline),
        ] {
            if n > 0 {
                counter.increment(n);
            }
        }
    }

    fn watch_started(&self, from_snapshot: bool) {
        if from_snapshot {
            self.watch_starts_snapshot.increment(1);
        } else {
            self.watch_starts_history.increment(1);
        }
    }

    fn history(&self, events: u64) {
        self.watch_history.set(events as f64);
    }

    fn membership(&self, revision: u64, initing: u64, running: u64) {
        self.revision.set(revision as f64);
        self.executors_initing.set(initing as f64);
        self.executors_running.set(running as f64);
    }

    fn watchers(&self, delta: i64) {
        self.watchers.increment(delta as f64);
    }

    fn snapshot_sent(&self, bytes: u64, paced: bool) {
        self.watch_snapshot_bytes.increment(bytes);
        if paced {
            self.watch_snapshot_paced.increment(1);
        }
    }

    fn watcher_lagged(&self) {
        self.watchers_lagged.increment(1);
    }

    fn store_operation(&self, op: &'static str, elapsed: Duration, ok: bool) {
        self.store.with(op, |h| {
            h.seconds.record(elapsed.as_secs_f64());
            if !ok {
                h.errors.increment(1);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn heartbeat_tallies_from_many_threads_add_up() {
        let tallies = Tallies::default();
        std::thread::scope(|s| {
            for t in 0..(TALLY_SHARDS + 3) {
                let tallies = &tallies;
                s.spawn(move || {
                    for _ in 0..1000 {
                        tallies.add(t % 4);
                    }
                });
            }
        });
        let counts: Vec<u64> = (0..4).map(|i| tallies.total(i)).collect();
        assert_eq!(counts, vec![5000, 5000, 5000, 4000]);
    }

    use metrics_exporter_prometheus::PrometheusRecorder;

    use super::*;

    fn recorder() -> PrometheusRecorder {
        builder()
            .expect("bucket lists are non-empty")
            .build_recorder()
    }

    /// The value of the sample line `series` (name and labels exactly as rendered).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| {
            let value = line.strip_prefix(series)?.strip_prefix(' ')?;
            Some(value.parse().expect("sample values are numbers"))
        })
    }

    #[track_caller]
    fn assert_sample(text: &str, series: &str, expected: f64) {
        assert_eq!(sample(text, series), Some(expected), "{series} in:\n{text}");
    }

    #[test]
    fn every_known_series_exists_at_zero_before_any_event() {
        let recorder = recorder();
        let metrics = Metrics::new(&recorder);
        let text = metrics.render(&recorder.handle());
        for result in ["ok", "unknown", "expired", "invalid"] {
            assert_sample(&text, &format!("{HEARTBEATS}{{result=\"{result}\"}}"), 0.0);
        }
        for result in ["ok", "invalid", "unavailable"] {
            assert_sample(
                &text,
                &format!("{REGISTRATIONS}{{result=\"{result}\"}}"),
                0.0,
            );
        }
        for status in ["initing", "running"] {
            assert_sample(&text, &format!("{EXECUTORS}{{status=\"{status}\"}}"), 0.0);
        }
        for kind in ["online", "running", "offline"] {
            assert_sample(&text, &format!("{EVENTS}{{type=\"{kind}\"}}"), 0.0);
        }
        for from in ["snapshot", "history"] {
            assert_sample(&text, &format!("{WATCH_STARTS}{{from=\"{from}\"}}"), 0.0);
        }
        for op in STORE_OPS {
            assert_sample(&text, &format!("{STORE_ERRORS}{{op=\"{op}\"}}"), 0.0);
            assert_sample(
                &text,
                &format!("{STORE_OPERATION}_count{{op=\"{op}\"}}"),
                0.0,
            );
        }
        for name in [
            EXPIRATIONS,
            DEREGISTRATIONS,
            WATCHERS,
            WATCHERS_LAGGED,
            WATCH_HISTORY_EVENTS,
            REVISION,
            LEADER_CHANGES,
            EXPIRY_GUARD_ACTIVE,
            TOMBSTONES,
            TIMING_WHEEL_ENTRIES,
        ] {
            assert_sample(&text, name, 0.0);
        }
        assert_sample(&text, &format!("{EXPIRY_LAG}_count"), 0.0);
        assert_sample(&text, IS_LEADER, 1.0);
        assert!(
            sample(&text, PROCESS_RESIDENT_MEMORY).is_some_and(|v| v > 0.0),
            "{text}"
        );
        assert!(
            sample(&text, PROCESS_START_TIME).is_some_and(|v| v > 1.5e9),
            "{text}"
        );
        for name in [
            PROCESS_CPU_SECONDS,
            PROCESS_VIRTUAL_MEMORY,
            PROCESS_OPEN_FDS,
            PROCESS_MAX_FDS,
        ] {
            assert!(sample(&text, name).is_some(), "{name} in:\n{text}");
        }
    }

    #[test]
    fn a_known_sequence_renders_exactly_its_counts() {
        let recorder = recorder();
        let metrics = Metrics::new(&recorder);
        let observer: &dyn Observer = &metrics;
        for _ in 0..3 {
            observer.heartbeat(HeartbeatResult::Ok);
        }
        observer.heartbeat(HeartbeatResult::Unknown);
        observer.registration(RegistrationResult::Ok);
        observer.registration(RegistrationResult::Ok);
        observer.registration(RegistrationResult::Invalid);
        observer.expired(&[Duration::from_millis(3), Duration::from_millis(40)]);
        observer.deregistered();
        observer.events(2, 4, 3);
        observer.watch_started(true);
        observer.watch_started(false);
        observer.watch_started(false);
        observer.history(9);
        observer.membership(7, 1, 2);
        observer.watchers(1);
        observer.watchers(1);
        observer.watchers(-1);
        observer.watcher_lagged();
        observer.snapshot_sent(65_000, false);
        observer.snapshot_sent(64_000, true);
        observer.store_operation("commit", Duration::from_millis(2), true);
        observer.store_operation("commit", Duration::from_millis(700), false);
        observer.expiry_guard(true, 600);
        // Released by the guard: expirations, without lag samples.
        observer.released(4);

        let before_flush = recorder.handle().render();
        assert_sample(
            &before_flush,
            "registry_heartbeats_total{result=\"ok\"}",
            0.0,
        );
        metrics.flush();
        let text = recorder.handle().render();

        assert_sample(&text, "registry_heartbeats_total{result=\"ok\"}", 3.0);
        assert_sample(&text, "registry_heartbeats_total{result=\"unknown\"}", 1.0);
        assert_sample(&text, "registry_heartbeats_total{result=\"expired\"}", 0.0);
        assert_sample(&text, "registry_heartbeats_total{result=\"invalid\"}", 0.0);
        assert_sample(&text, "registry_registrations_total{result=\"ok\"}", 2.0);
        assert_sample(
            &text,
            "registry_registrations_total{result=\"invalid\"}",
            1.0,
        );
        assert_sample(
            &text,
            "registry_registrations_total{result=\"unavailable\"}",
            0.0,
        );
        assert_sample(&text, "registry_expirations_total", 6.0);
        assert_sample(&text, "registry_expiry_guard_active", 1.0);
        assert_sample(&text, "registry_deregistrations_total", 1.0);
        assert_sample(&text, "registry_events_total{type=\"online\"}", 2.0);
        assert_sample(&text, "registry_events_total{type=\"running\"}", 4.0);
        assert_sample(&text, "registry_events_total{type=\"offline\"}", 3.0);
        assert_sample(&text, "registry_watch_starts_total{from=\"snapshot\"}", 1.0);
        assert_sample(&text, "registry_watch_starts_total{from=\"history\"}", 2.0);
        assert_sample(&text, "registry_watch_history_events", 9.0);
        assert_sample(&text, "registry_revision", 7.0);
        assert_sample(&text, "registry_executors{status=\"initing\"}", 1.0);
        assert_sample(&text, "registry_executors{status=\"running\"}", 2.0);
        assert_sample(&text, "registry_watchers", 1.0);
        assert_sample(&text, "registry_watchers_lagged_total", 1.0);
        assert_sample(&text, "registry_watch_snapshot_bytes_total", 129_000.0);
        assert_sample(&text, "registry_watch_snapshot_paced_total", 1.0);
        assert_sample(&text, "registry_store_errors_total{op=\"commit\"}", 1.0);
        assert_sample(&text, "registry_store_errors_total{op=\"load\"}", 0.0);
        assert_sample(&text, "registry_is_leader", 1.0);
        assert_sample(&text, "registry_leader_changes_total", 0.0);

        // Histograms, not summaries: cumulative buckets around 3 ms and 40 ms.
        assert!(
            text.contains("# TYPE registry_expiry_lag_seconds histogram"),
            "{text}"
        );
        assert!(!text.contains("quantile="), "{text}");
        assert_sample(
            &text,
            "registry_expiry_lag_seconds_bucket{le=\"0.0025\"}",
            0.0,
        );
        assert_sample(
            &text,
            "registry_expiry_lag_seconds_bucket{le=\"0.005\"}",
            1.0,
        );
        assert_sample(
            &text,
            "registry_expiry_lag_seconds_bucket{le=\"0.025\"}",
            1.0,
        );
        assert_sample(
            &text,
            "registry_expiry_lag_seconds_bucket{le=\"0.05\"}",
            2.0,
        );
        assert_sample(
            &text,
            "registry_expiry_lag_seconds_bucket{le=\"+Inf\"}",
            2.0,
        );
        assert_sample(&text, "registry_expiry_lag_seconds_count", 2.0);
        let sum = sample(&text, "registry_expiry_lag_seconds_sum").expect("lag sum");
        assert!((sum - 0.043).abs() < 1e-9, "{sum}");
        assert!(
            text.contains("# TYPE registry_store_operation_seconds histogram"),
            "{text}"
        );
        assert_sample(
            &text,
            "registry_store_operation_seconds_bucket{op=\"commit\",le=\"0.0025\"}",
            1.0,
        );
        assert_sample(
            &text,
            "registry_store_operation_seconds_bucket{op=\"commit\",le=\"1\"}",
            2.0,
        );
        assert_sample(
            &text,
            "registry_store_operation_seconds_count{op=\"commit\"}",
            2.0,
        );
        assert_sample(
            &text,
            "registry_store_operation_seconds_count{op=\"load\"}",
            0.0,
        );
        assert!(
            text.contains("# HELP registry_heartbeats_total Heartbeats handled, by result."),
            "{text}"
        );
    }

    #[test]
    fn heartbeat_counts_accumulate_across_flushes() {
        let recorder = recorder();
        let metrics = Metrics::new(&recorder);
        metrics.heartbeat(HeartbeatResult::Expired);
        metrics.flush();
        metrics.heartbeat(HeartbeatResult::Expired);
        metrics.heartbeat(HeartbeatResult::Invalid);
        metrics.flush();
        metrics.flush();
        let text = recorder.handle().render();
        assert_sample(&text, "registry_heartbeats_total{result=\"expired\"}", 2.0);
        assert_sample(&text, "registry_heartbeats_total{result=\"invalid\"}", 1.0);
    }

    #[test]
    fn unknown_store_ops_and_auth_reasons_get_series_on_first_use() {
        let recorder = recorder();
        let metrics = Metrics::new(&recorder);
        ::metrics::with_local_recorder(&recorder, || {
            metrics.store_operation("compact", Duration::from_millis(1), false);
            metrics.store_operation("compact", Duration::from_millis(1), false);
            metrics.auth_denied("no_client_certificate");
        });
        let text = recorder.handle().render();
        assert_sample(&text, "registry_store_errors_total{op=\"compact\"}", 2.0);
        assert_sample(
            &text,
            "registry_store_operation_seconds_count{op=\"compact\"}",
            2.0,
        );
        assert_sample(
            &text,
            "registry_auth_denied_total{reason=\"no_client_certificate\"}",
            1.0,
        );
    }

    #[test]
    fn leader_changes_count_flips_only() {
        let recorder = recorder();
        let metrics = Metrics::new(&recorder);
        metrics.set_leader(true);
        metrics.set_leader(false);
        metrics.set_leader(false);
        let text = recorder.handle().render();
        assert_sample(&text, "registry_is_leader", 0.0);
        assert_sample(&text, "registry_leader_changes_total", 1.0);
        metrics.set_leader(true);
        let text = recorder.handle().render();
        assert_sample(&text, "registry_is_leader", 1.0);
        assert_sample(&text, "registry_leader_changes_total", 2.0);
    }

    fn get_metrics(addr: SocketAddr) -> String {
        let mut stream = TcpStream::connect(addr).expect("exporter accepts");
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .expect("request sent");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response read");
        response
    }

    /// The only test that installs: the global recorder can be set once per
    /// process, and the endpoint runs on (and stops with) this test's runtime.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn installed_endpoint_serves_fresh_metrics_over_http_at_every_scrape() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port");
        let metrics = install(addr).await.expect("endpoint installs");
        metrics.heartbeat(HeartbeatResult::Ok);
        metrics.heartbeat(HeartbeatResult::Ok);
        metrics.membership(5, 0, 1);
        // No waiting: the scrape itself flushes the heartbeat tallies.
        let response = tokio::task::spawn_blocking(move || get_metrics(addr))
            .await
            .expect("GET does not panic");
        assert!(
            response.lines().next().is_some_and(|l| l.contains(" 200 ")),
            "{response}"
        );
        assert_sample(&response, "registry_heartbeats_total{result=\"ok\"}", 2.0);
        assert_sample(&response, "registry_revision", 5.0);
        assert_sample(&response, "registry_is_leader", 1.0);
        assert!(
            response.contains("# TYPE registry_expiry_lag_seconds histogram"),
            "{response}"
        );
        assert!(
            response.contains("registry_expiry_lag_seconds_bucket{le=\"+Inf\"} 0"),
            "{response}"
        );
        assert!(
            sample(&response, PROCESS_RESIDENT_MEMORY).is_some_and(|v| v > 0.0),
            "{response}"
        );
        // CPU time is rendered as a float with tick (10 ms) resolution. Burn
        // a little CPU so the sample cannot legitimately be 0.
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let response = tokio::task::spawn_blocking(move || get_metrics(addr))
            .await
            .expect("GET does not panic");
        assert!(
            response.contains("# TYPE process_cpu_seconds_total counter"),
            "{response}"
        );
        let cpu = sample(&response, PROCESS_CPU_SECONDS).expect("cpu sample");
        assert!(cpu > 0.0, "cpu {cpu}");
        let mut stream = TcpStream::connect(addr).expect("endpoint accepts");
        stream
            .write_all(b"GET /other HTTP/1.0\r\n\r\n")
            .expect("request sent");
        let mut other = String::new();
        stream.read_to_string(&mut other).expect("response read");
        assert!(
            other.lines().next().is_some_and(|l| l.contains(" 404 ")),
            "{other}"
        );
    }
}
