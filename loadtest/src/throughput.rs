//! Closed-loop heartbeat throughput: as fast as the server answers.
//!
//! `concurrency` tasks spread over `connections` connections; each sends its
//! next request as soon as the previous one is answered (unary, batch), or
//! keeps `window` requests in flight on its own `HeartbeatStream` (stream).
//! Only answers completed inside the measured window count; a warm-up before
//! it fills connection windows and allocator caches. The executors are
//! registered once ([`prepare`]) with a long TTL, so the registry serves
//! every heartbeat from its live table.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use executor_registry::proto::RegisterRequest;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use serde::Serialize;
use tokio::time::Instant;

use crate::Mode;
use crate::client::{self, BeatStream, Client};
use crate::stats::{self, Latency, Tally};

/// Registrations in flight while preparing a pool.
const PREPARE_INFLIGHT: usize = 256;

/// Connections and registered executors, ready to heartbeat.
pub struct Pool {
    /// The endpoint the pool is connected to.
    pub endpoint: String,
    clients: Vec<Client>,
    ids: Arc<Vec<String>>,
    ttl_ms: u64,
}

impl Pool {
    /// Connections in the pool.
    pub fn connections(&self) -> usize {
        self.clients.len()
    }
}

/// Connects `connections` times to `endpoint`, registers `executors`
/// executors and heartbeats each once with `ttl` (so they are RUNNING with a
/// TTL longer than the whole measurement).
pub async fn prepare(
    endpoint: &str,
    connections: usize,
    executors: usize,
    ttl: Duration,
) -> anyhow::Result<Pool> {
    prepare_with(endpoint, connections, executors, ttl, None).await
}

/// [`prepare`], over TLS when `tls` is given.
pub async fn prepare_with(
    endpoint: &str,
    connections: usize,
    executors: usize,
    ttl: Duration,
    tls: Option<&executor_registry::client::ClientTls>,
) -> anyhow::Result<Pool> {
    let clients = client::connect_with(endpoint, connections, tls).await?;
    let ttl_ms = ttl.as_millis() as u64;
    let prefix = format!("tp{:08x}x", rand::random::<u32>());
    let mut ids = vec![String::new(); executors.max(1)];
    let mut pending = FuturesUnordered::new();
    let mut next = 0;
    while next < ids.len() || !pending.is_empty() {
        while next < ids.len() && pending.len() < PREPARE_INFLIGHT {
            let mut c = clients[next % clients.len()].clone();
            let request = RegisterRequest {
                name: format!("{prefix}{next}"),
                address: format!("127.0.0.1:{}", 1 + next % 65_000),
                labels: Default::default(),
            };
            let i = next;
            pending.push(async move { (i, client::register(&mut c, request).await) });
            next += 1;
        }
        if let Some((i, result)) = pending.next().await {
            let (id, _) =
                result.with_context(|| format!("registering executor {i} at {endpoint}"))?;
            ids[i] = id;
        }
    }
    let mut c = clients[0].clone();
    for chunk in ids.chunks(1_000) {
        let requests = chunk
            .iter()
            .map(|id| client::heartbeat_request(id, ttl_ms))
            .collect();
        let results = client::batch(&mut c, requests)
            .await
            .with_context(|| format!("first heartbeat at {endpoint}"))?;
        if let Some(bad) = results.iter().find(|r| !client::is_ok(r.status)) {
            bail!(
                "first heartbeat of {} at {endpoint}: {}",
                bad.executor_id,
                client::heartbeat_status_name(bad.status)
            );
        }
    }
    Ok(Pool {
        endpoint: endpoint.to_owned(),
        clients,
        ids: Arc::new(ids),
        ttl_ms,
    })
}

/// The shape of one measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Load {
    /// Transport.
    pub mode: Mode,
    /// Tasks: unary/batch calls in flight, or streams.
    pub concurrency: usize,
    /// Requests in flight per stream (stream mode; 1 = ping-pong).
    pub window: usize,
    /// Heartbeats per batch call (batch mode).
    pub batch_size: usize,
    /// Measured time.
    #[serde(with = "secs")]
    pub duration: Duration,
    /// Unmeasured time before it.
    #[serde(with = "secs")]
    pub warmup: Duration,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// What one measurement achieved.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputReport {
    /// Server measured.
    pub endpoint: String,
    /// Connections used.
    pub connections: usize,
    /// The load applied.
    pub load: Load,
    /// Calls (unary, batch) or stream messages answered in the window.
    pub calls: u64,
    /// Heartbeats answered OK in the window.
    pub heartbeats: u64,
    /// `calls` per second.
    pub calls_per_s: f64,
    /// `heartbeats` per second (executors per second in batch mode).
    pub heartbeats_per_s: f64,
    /// Per call (unary, batch) or per message (stream), send to answer.
    pub latency: Latency,
    /// Failures by gRPC code or per-item status.
    pub errors: Tally,
}

struct TaskResult {
    calls: u64,
    heartbeats: u64,
    hist: hdrhistogram::Histogram<u64>,
    errors: Tally,
}

impl TaskResult {
    fn new() -> Self {
        Self {
            calls: 0,
            heartbeats: 0,
            hist: stats::histogram(),
            errors: Tally::default(),
        }
    }
}

#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    fn counts(&self, t: Instant) -> bool {
        t >= self.start && t <= self.end
    }
}

/// Runs `load` against `pool` and reports what the window saw.
pub async fn measure(pool: &Pool, load: &Load) -> ThroughputReport {
    let start = Instant::now() + load.warmup;
    let window = Window {
        start,
        end: start + load.duration,
    };
    let concurrency = load.concurrency.max(1);
    let stride = pool.ids.len() / concurrency + 1;
    let mut tasks = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let client = pool.clients[i % pool.clients.len()].clone();
        let ids = pool.ids.clone();
        let ttl_ms = pool.ttl_ms;
        let cursor = i * stride;
        let load = load.clone();
        tasks.push(tokio::spawn(async move {
            match load.mode {
                Mode::Unary => unary_task(client, ids, cursor, ttl_ms, window).await,
                Mode::Batch => {
                    batch_task(client, ids, cursor, ttl_ms, load.batch_size, window).await
                }
                Mode::Stream => {
                    stream_task(client, ids, cursor, ttl_ms, load.window.max(1), window).await
                }
            }
        }));
    }
    let mut total = TaskResult::new();
    for task in tasks {
        match task.await {
            Ok(r) => {
                total.calls += r.calls;
                total.heartbeats += r.heartbeats;
                total.hist.add(&r.hist).expect("histograms share bounds");
                total.errors.merge(&r.errors);
            }
            Err(e) => total.errors.add(&format!("task:{e}"), 1),
        }
    }
    let secs = load.duration.as_secs_f64().max(1e-9);
    ThroughputReport {
        endpoint: pool.endpoint.clone(),
        connections: pool.connections(),
        load: load.clone(),
        calls: total.calls,
        heartbeats: total.heartbeats,
        calls_per_s: total.calls as f64 / secs,
        heartbeats_per_s: total.heartbeats as f64 / secs,
        latency: Latency::of(&total.hist),
        errors: total.errors,
    }
}

/// Connects, prepares `executors` executors and measures once.
pub async fn run(
    endpoint: &str,
    connections: usize,
    executors: usize,
    ttl: Duration,
    load: &Load,
) -> anyhow::Result<ThroughputReport> {
    let pool = prepare(endpoint, connections, executors, ttl).await?;
    Ok(measure(&pool, load).await)
}

async fn unary_task(
    mut client: Client,
    ids: Arc<Vec<String>>,
    mut cursor: usize,
    ttl_ms: u64,
    window: Window,
) -> TaskResult {
    let mut r = TaskResult::new();
    while Instant::now() < window.end {
        let request = client::heartbeat_request(&ids[cursor % ids.len()], ttl_ms);
        cursor += 1;
        let sent = Instant::now();
        let result = client::unary(&mut client, request).await;
        let done = Instant::now();
        if !window.counts(done) {
            continue;
        }
        r.calls += 1;
        match result {
            Ok(_) => {
                r.heartbeats += 1;
                stats::record(&mut r.hist, (done - sent).as_micros() as u64);
            }
            Err(status) => r.errors.add(&stats::code_key("heartbeat", &status), 1),
        }
    }
    r
}

async fn batch_task(
    mut client: Client,
    ids: Arc<Vec<String>>,
    mut cursor: usize,
    ttl_ms: u64,
    batch_size: usize,
    window: Window,
) -> TaskResult {
    let mut r = TaskResult::new();
    while Instant::now() < window.end {
        let requests = (0..batch_size.max(1))
            .map(|k| client::heartbeat_request(&ids[(cursor + k) % ids.len()], ttl_ms))
            .collect();
        cursor += batch_size;
        let sent = Instant::now();
        let result = client::batch(&mut client, requests).await;
        let done = Instant::now();
        if !window.counts(done) {
            continue;
        }
        r.calls += 1;
        match result {
            Ok(results) => {
                stats::record(&mut r.hist, (done - sent).as_micros() as u64);
                for item in results {
                    if client::is_ok(item.status) {
                        r.heartbeats += 1;
                    } else {
                        r.errors.add(client::heartbeat_status_name(item.status), 1);
                    }
                }
            }
            Err(status) => r.errors.add(&stats::code_key("batch", &status), 1),
        }
    }
    r
}

async fn stream_task(
    mut client: Client,
    ids: Arc<Vec<String>>,
    mut cursor: usize,
    ttl_ms: u64,
    in_flight: usize,
    window: Window,
) -> TaskResult {
    let mut r = TaskResult::new();
    let mut stream = match BeatStream::open(&mut client, in_flight).await {
        Ok(s) => s,
        Err(status) => {
            r.errors.add(&stats::code_key("stream-open", &status), 1);
            return r;
        }
    };
    let mut sent: VecDeque<Instant> = VecDeque::with_capacity(in_flight);
    loop {
        while sent.len() < in_flight && Instant::now() < window.end {
            let request = client::heartbeat_request(&ids[cursor % ids.len()], ttl_ms);
            cursor += 1;
            if let Err(status) = stream.send(request) {
                r.errors.add(&stats::code_key("stream-send", &status), 1);
                return r;
            }
            sent.push_back(Instant::now());
        }
        let Some(&t0) = sent.front() else {
            return r;
        };
        match stream.next().await {
            Ok(Some(item)) => {
                sent.pop_front();
                let done = Instant::now();
                if window.counts(done) {
                    r.calls += 1;
                    if client::is_ok(item.status) {
                        r.heartbeats += 1;
                        stats::record(&mut r.hist, (done - t0).as_micros() as u64);
                    } else {
                        r.errors.add(client::heartbeat_status_name(item.status), 1);
                    }
                }
            }
            Ok(None) => {
                r.errors.add("stream:ended", 1);
                return r;
            }
            Err(status) => {
                r.errors.add(&stats::code_key("stream", &status), 1);
                return r;
            }
        }
    }
}
