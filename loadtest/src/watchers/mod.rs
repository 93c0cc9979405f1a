//! The watchers scenario: what many watchers at once, and one watcher that
//! stops reading, cost a registry that holds a large fleet.
//!
//! Owns: this scenario's fleet (ids by index; names from
//! [`crate::fleet::register_request`]), its background heartbeat load (on a
//! thread and runtime of its own) and that load's latency per phase, the
//! snapshot readers of phase A, the stalled watcher of phase B, the report,
//! and the verdict.
//!
//! Timeline: register N executors (each heartbeated once, in batches, with a
//! long TTL as soon as it is registered, so the fleet is RUNNING and stays
//! live with no further cost); start a steady unary heartbeat load on a
//! sample of them; a quiet window (no watcher) gives the baseline RSS and
//! heartbeat latency. **Phase A:** `watchers` watches open at the same
//! moment, each on its own connection, read their chunked snapshot until
//! `more = false` and close; RSS peak over the phase and a settle window
//! after it, RSS after the settle window; heartbeat latency during the
//! phase. **Phase B:** one watch reads its snapshot, then stops reading for
//! `stall` (HTTP/2 flow control backs the server up); at the start of the
//! stall `expiring` executors get one batch heartbeat with a short TTL and
//! nothing more, so they expire together within the stall; then it reads
//! again and must get every one of their OFFLINE events, revisions
//! consecutive, and no new snapshot. If the server ends the stream, it
//! watches again from the last revision seen and counts whether that
//! resumed or began with a snapshot.
//!
//! ## Layout
//!
//! - `lite` — the watch stream decoded lightly ([`LiteResponse`]: a
//!   snapshot's executors as ids only, events whole), and why it is not
//!   read with [`crate::watch`].
//! - `check` — the pure checks ([`IdIndex`], [`SnapshotCheck`],
//!   [`EventChain`], [`rewatch_kind`]) and the arithmetic of the RSS and
//!   p99 goals.
//! - `procfs` — the server's RSS and CPU from `/proc`, and the sampler of
//!   its RSS.
//!
//! Must not touch: the simulator's and the verifying watch's internals
//! ([`crate::fleet`], [`crate::watch`]); the server beyond its public gRPC
//! API and its `/metrics` (its `/proc` is read in `procfs` only).

mod check;
mod lite;
mod procfs;

pub use check::{
    EventChain, IdIndex, Rewatch, SnapshotCheck, p99_kept, rewatch_kind, rss_failures,
};
pub use lite::{LiteExecutor, LiteKind, LiteResponse, LiteSnapshot, open_lite_watch};
pub use procfs::{CpuUse, parse_cpu_seconds, parse_vm_rss};

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use executor_registry::proto::{self, CountExecutorsRequest};
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use rand::Rng as _;
use serde::Serialize;
use tokio::sync::Barrier;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::client::{self, Client};
use crate::fleet::register_request;
use crate::prom;
use crate::stats::{self, Latency, Tally};

use check::Bits;
use procfs::{CpuMark, RssSampler, read_rss};

/// Most heartbeats in one `HeartbeatBatch` call (the registry's limit).
const MAX_BATCH: usize = 10_000;
/// Tries per registration.
const REGISTER_ATTEMPTS: u32 = 5;
/// Unary heartbeats of the background load in flight, at most; beyond it
/// the load skips (and counts) what falls due.
const BEAT_MAX_INFLIGHT: usize = 512;
/// Phase B: with no message for this long after the stall, the reader
/// stops waiting for the missing events.
const DRAIN_IDLE: Duration = Duration::from_secs(10);
/// Phase B: the stall must outlast the short TTL by at least this, so every
/// deadline falls inside it.
const STALL_MARGIN: Duration = Duration::from_secs(1);
/// The window before a phase whose median RSS is its "before".
const BEFORE_WINDOW_S: f64 = 1.0;

/// Background heartbeat phases: where each latency is counted (by the
/// moment its call went out).
const WARMUP: usize = 0;
const QUIET: usize = 1;
const WATCHERS: usize = 2;
const SETTLE: usize = 3;
const STALL: usize = 4;
const PHASES: usize = 5;

/// What to run.
#[derive(Debug, Clone)]
pub struct WatchersConfig {
    /// The registry's gRPC endpoint, `http://host:port`.
    pub endpoint: String,
    /// Its Prometheus endpoint, for the watch counters at the end (optional).
    pub metrics: Option<String>,
    /// The server's process id, for its RSS; without it no RSS is judged.
    pub server_pid: Option<u32>,
    /// Fleet size.
    pub executors: usize,
    /// Phase A: watchers taking a snapshot at the same moment.
    pub watchers: usize,
    /// Phase B: executors that expire together while the watcher stalls.
    pub expiring: usize,
    /// Phase B: how long the watcher stops reading.
    pub stall: Duration,
    /// Phase B: the TTL of the expiring executors' last heartbeat.
    pub expiring_ttl: Duration,
    /// TTL of every other heartbeat (longer than the whole run).
    pub fleet_ttl: Duration,
    /// Connections for registration and batch heartbeats.
    pub connections: usize,
    /// Registrations in flight, over all connections.
    pub register_concurrency: usize,
    /// Executors of the background heartbeat load.
    pub beat_sample: usize,
    /// Its heartbeats per second (unary, open loop).
    pub beat_rate: f64,
    /// Its connections.
    pub beat_connections: usize,
    /// Heartbeats before the quiet window, not counted.
    pub warmup: Duration,
    /// The quiet window: baseline RSS and heartbeat latency.
    pub quiet: Duration,
    /// After phase A: how long before the "after" RSS.
    pub settle: Duration,
    /// Period of the RSS samples.
    pub rss_every: Duration,
    /// Longest a watcher may take for its snapshot.
    pub watch_timeout: Duration,
    /// Goals.
    pub goals: Goals,
    /// Progress lines on stderr.
    pub progress: bool,
    /// Period of progress lines.
    pub progress_every: Duration,
}

/// The acceptance figures' limits.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Goals {
    /// Phase A: peak RSS ÷ before at most this.
    pub max_peak_ratio: f64,
    /// Phase A: after RSS ÷ before at most this.
    pub max_after_ratio: f64,
    /// Heartbeat p99 during phase A ÷ quiet p99 at most this…
    pub max_p99_ratio: f64,
    /// …or at most this much above it (µs), whichever allows more (the
    /// ratio alone would judge noise at a p99 of a few hundred µs).
    pub p99_slack_us: u64,
}

impl Default for Goals {
    fn default() -> Self {
        Self {
            max_peak_ratio: 1.25,
            max_after_ratio: 1.10,
            max_p99_ratio: 1.5,
            p99_slack_us: 1_000,
        }
    }
}

impl WatchersConfig {
    /// Defaults for `executors` executors against `endpoint`.
    pub fn new(endpoint: impl Into<String>, executors: usize) -> Self {
        Self {
            endpoint: endpoint.into(),
            metrics: None,
            server_pid: None,
            executors,
            watchers: 64,
            expiring: 100_000,
            stall: Duration::from_secs(10),
            expiring_ttl: Duration::from_secs(2),
            fleet_ttl: Duration::from_secs(600),
            connections: 4,
            register_concurrency: 1_024,
            beat_sample: 10_000,
            beat_rate: 2_000.0,
            beat_connections: 2,
            warmup: Duration::from_secs(2),
            quiet: Duration::from_secs(10),
            settle: Duration::from_secs(5),
            rss_every: Duration::from_millis(50),
            watch_timeout: Duration::from_secs(600),
            goals: Goals::default(),
            progress: false,
            progress_every: Duration::from_secs(5),
        }
    }
}

fn median_u64(values: &[u64]) -> u64 {
    let v: Vec<f64> = values.iter().map(|&b| b as f64).collect();
    stats::median(&v) as u64
}

// ---------------------------------------------------------------------------
// Registration.

/// Registers executors `0..n` named from `prefix`, heartbeating each once
/// with `ttl_ms` in batches as soon as it is registered (so the init TTL
/// only has to cover one batch's registrations). Returns their ids.
async fn register_fleet(
    clients: &[Client],
    prefix: &str,
    n: usize,
    concurrency: usize,
    ttl_ms: u64,
    progress: Option<Duration>,
) -> anyhow::Result<(Vec<String>, Histogram<u64>)> {
    let mut ids = vec![String::new(); n];
    let mut latency = stats::histogram();
    let mut registering = FuturesUnordered::new();
    let mut beats: Vec<tokio::task::JoinHandle<anyhow::Result<()>>> = Vec::new();
    let mut ready: Vec<String> = Vec::with_capacity(MAX_BATCH);
    let (mut next, mut done) = (0usize, 0usize);
    let started = Instant::now();
    let mut next_line = started + progress.unwrap_or(Duration::MAX / 4);
    let spawn_batch = |ready: Vec<String>, k: usize| {
        let mut c = clients[k % clients.len()].clone();
        tokio::spawn(async move {
            let requests = ready
                .iter()
                .map(|id| client::heartbeat_request(id, ttl_ms))
                .collect();
            let results = client::batch(&mut c, requests)
                .await
                .context("first heartbeats")?;
            if let Some(bad) = results.iter().find(|r| !client::is_ok(r.status)) {
                bail!(
                    "first heartbeat of {}: {}",
                    bad.executor_id,
                    client::heartbeat_status_name(bad.status)
                );
            }
            Ok(())
        })
    };
    while done < n {
        while next < n && registering.len() < concurrency.max(1) {
            let mut c = clients[next % clients.len()].clone();
            let i = next;
            registering.push(async move {
                let mut attempt = 0;
                loop {
                    let sent = Instant::now();
                    match client::register(&mut c, register_request(prefix, i)).await {
                        Ok((id, _)) => return Ok((i, id, sent.elapsed())),
                        Err(_) if attempt + 1 < REGISTER_ATTEMPTS => {
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt)))
                                .await;
                        }
                        Err(status) => return Err((i, status)),
                    }
                }
            });
            next += 1;
        }
        let Some(result) = registering.next().await else {
            break;
        };
        let (i, id, took) = match result {
            Ok(r) => r,
            Err((i, status)) => bail!("registering executor {i}: {status}"),
        };
        stats::record(&mut latency, took.as_micros() as u64);
        ready.push(id.clone());
        ids[i] = id;
        done += 1;
        if ready.len() >= MAX_BATCH || done == n {
            beats.push(spawn_batch(std::mem::take(&mut ready), beats.len()));
        }
        if progress.is_some() && Instant::now() >= next_line {
            next_line += progress.unwrap_or_default();
            eprintln!(
                "[{:>6.1}s] registering {done}/{n} ({:.0}/s)",
                started.elapsed().as_secs_f64(),
                done as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    for beat in beats {
        beat.await.context("a first-heartbeat task panicked")??;
    }
    Ok((ids, latency))
}

// ---------------------------------------------------------------------------
// The background heartbeat load.

struct BeatOutput {
    latency: Vec<Histogram<u64>>,
    skipped: Vec<u64>,
    errors: Tally,
}

/// Unary heartbeats of `ids`, round robin, at `rate` per second (open
/// loop), until `stop`; each latency counted in the phase it went out in.
struct BeatLoad {
    endpoint: String,
    connections: usize,
    ids: Vec<String>,
    rate: f64,
    ttl_ms: u64,
    /// The phase now ([`QUIET`], [`WATCHERS`], …).
    phase: Arc<AtomicUsize>,
    /// Largest latency since the last progress line (µs).
    worst_us: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl BeatLoad {
    /// Runs on a thread of its own with a single-threaded runtime, its
    /// connections opened there too: the latencies it measures are the
    /// server's (and the machine's), never a wait behind this process's
    /// snapshot readers in a shared task queue.
    fn spawn(self) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<BeatOutput>>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("the heartbeat thread's runtime")?;
        std::thread::Builder::new()
            .name("heartbeats".into())
            .spawn(move || runtime.block_on(self.run()))
            .context("starting the heartbeat thread")
    }

    async fn run(self) -> anyhow::Result<BeatOutput> {
        let clients = client::connect(&self.endpoint, self.connections).await?;
        let mut out = BeatOutput {
            latency: (0..PHASES).map(|_| stats::histogram()).collect(),
            skipped: vec![0; PHASES],
            errors: Tally::default(),
        };
        let start = Instant::now();
        let mut sent = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut calls = FuturesUnordered::new();
        let record =
            |out: &mut BeatOutput, (p, took, result): (usize, Duration, Result<u64, Status>)| {
                match result {
                    Ok(_) => {
                        let us = took.as_micros() as u64;
                        stats::record(&mut out.latency[p], us);
                        self.worst_us.fetch_max(us, Ordering::Relaxed);
                    }
                    Err(status) => out.errors.add(&stats::code_key("heartbeat", &status), 1),
                }
            };
        loop {
            tokio::select! {
                () = self.stop.cancelled() => break,
                _ = tick.tick() => {
                    let due = (start.elapsed().as_secs_f64() * self.rate) as u64;
                    let p = self.phase.load(Ordering::Relaxed);
                    while sent < due {
                        if calls.len() >= BEAT_MAX_INFLIGHT {
                            out.skipped[p] += due - sent;
                            sent = due;
                            break;
                        }
                        let k = sent as usize % self.ids.len();
                        let mut c = clients[k % clients.len()].clone();
                        let request = client::heartbeat_request(&self.ids[k], self.ttl_ms);
                        let went = Instant::now();
                        calls.push(async move {
                            let result = client::unary(&mut c, request).await;
                            (p, went.elapsed(), result)
                        });
                        sent += 1;
                    }
                }
                Some(done) = calls.next(), if !calls.is_empty() => record(&mut out, done),
            }
        }
        let drain = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(drain);
        while !calls.is_empty() {
            tokio::select! {
                () = &mut drain => break,
                Some(done) = calls.next() => record(&mut out, done),
            }
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------
// Phase A: many watchers at once.

/// One watcher of phase A.
#[derive(Debug, Clone)]
struct WatcherOutcome {
    check: SnapshotCheck,
    first_chunk_s: Option<f64>,
    whole_s: Option<f64>,
    error: Option<String>,
}

async fn snapshot_reader(
    channel: Channel,
    index: Arc<IdIndex>,
    barrier: Arc<Barrier>,
    timeout: Duration,
    ids_received: Arc<AtomicU64>,
    done: Arc<AtomicUsize>,
) -> WatcherOutcome {
    let mut out = WatcherOutcome {
        check: SnapshotCheck::new(index.len()),
        first_chunk_s: None,
        whole_s: None,
        error: None,
    };
    barrier.wait().await;
    let opened = Instant::now();
    let read = async {
        let mut stream = open_lite_watch(channel, 0).await?;
        loop {
            match stream.message().await? {
                Some(LiteResponse {
                    kind: Some(LiteKind::Snapshot(chunk)),
                }) => {
                    if out.first_chunk_s.is_none() {
                        out.first_chunk_s = Some(opened.elapsed().as_secs_f64());
                    }
                    ids_received.fetch_add(chunk.executors.len() as u64, Ordering::Relaxed);
                    out.check.chunk(
                        chunk.revision,
                        chunk.more,
                        chunk.executors.iter().map(|e| index.index_of(&e.id)),
                    );
                    if !chunk.more {
                        out.whole_s = Some(opened.elapsed().as_secs_f64());
                        // Close: dropping the stream resets it.
                        return Ok(());
                    }
                }
                Some(LiteResponse {
                    kind: Some(LiteKind::Event(e)),
                }) => {
                    return Err(Status::internal(format!(
                        "event at revision {} before the snapshot ended",
                        e.revision
                    )));
                }
                Some(LiteResponse { kind: None }) => {}
                None => return Err(Status::internal("stream ended before the snapshot did")),
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(())) => {}
        Ok(Err(status)) => out.error = Some(stats::code_key("watch", &status)),
        Err(_) => out.error = Some("watch:timeout".to_owned()),
    }
    done.fetch_add(1, Ordering::Relaxed);
    out
}

// ---------------------------------------------------------------------------
// Phase B: one watcher stops reading while many expire.

/// What phase B's watcher saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StallSummary {
    /// Executors that were to expire.
    pub expiring: usize,
    /// Ids in the watcher's snapshot before the stall.
    pub snapshot_ids: u64,
    /// What was wrong with that snapshot, if anything.
    pub snapshot_problem: Option<String>,
    /// Seconds to read it.
    pub snapshot_s: f64,
    /// Its revision.
    pub snapshot_revision: u64,
    /// How long the stall lasted (s).
    pub stall_s: f64,
    /// From the first short-TTL batch sent to the last answered (s): the
    /// spread of their deadlines.
    pub expiring_beats_s: f64,
    /// From the stall's start until the live count showed every one of them
    /// gone (s); None if it never did within the stall.
    pub expired_after_s: Option<f64>,
    /// OFFLINE events received for the expiring executors (each once).
    pub offline_received: u64,
    /// Of those, with reason EXPIRED.
    pub offline_expired: u64,
    /// OFFLINE events for an expiring executor seen before.
    pub offline_repeated: u64,
    /// OFFLINE events for other executors.
    pub offline_other: u64,
    /// Events other than OFFLINE.
    pub other_events: u64,
    /// The revision chain of every event read.
    pub chain: EventChain,
    /// Times the server ended the stream (any way).
    pub server_ended: u64,
    /// Of those, RESOURCE_EXHAUSTED (lagging).
    pub lagged: u64,
    /// Re-watches that resumed at the next event.
    pub resumes: u64,
    /// Re-watches that began with a snapshot.
    pub snapshots: u64,
    /// Re-watches whose first event was out of order.
    pub rewatch_gaps: u64,
    /// Seconds from the end of the stall to the last OFFLINE read.
    pub drain_s: f64,
    /// Stream errors by code.
    pub errors: Tally,
}

struct StallRun<'a> {
    channel: Channel,
    index: &'a IdIndex,
    clients: &'a [Client],
    expiring: std::ops::Range<usize>,
    stall: Duration,
    expiring_ttl_ms: u64,
    timeout: Duration,
    progress: Option<Duration>,
    start: Instant,
}

impl StallRun<'_> {
    async fn run(&self) -> anyhow::Result<StallSummary> {
        let n = self.index.len();
        let mut s = StallSummary {
            expiring: self.expiring.len(),
            ..StallSummary::default()
        };
        // The snapshot, read whole.
        let opened = Instant::now();
        let mut stream = open_lite_watch(self.channel.clone(), 0)
            .await
            .context("phase B: cannot watch")?;
        let mut check = SnapshotCheck::new(n);
        while !check.complete {
            let m = tokio::time::timeout(self.timeout, stream.message())
                .await
                .context("phase B: no snapshot in time")?
                .context("phase B: the watch failed during its snapshot")?;
            let Some(m) = m else {
                bail!("phase B: the watch ended during its snapshot");
            };
            match m.kind {
                Some(LiteKind::Snapshot(chunk)) => check.chunk(
                    chunk.revision,
                    chunk.more,
                    chunk.executors.iter().map(|e| self.index.index_of(&e.id)),
                ),
                Some(LiteKind::Event(_)) => bail!("phase B: an event before the snapshot ended"),
                None => {}
            }
        }
        s.snapshot_s = opened.elapsed().as_secs_f64();
        s.snapshot_ids = check.ids;
        s.snapshot_problem = check.problem();
        s.snapshot_revision = check.revision.unwrap_or(0);
        let mut chain = EventChain::from(s.snapshot_revision);
        self.line(format_args!(
            "phase B: snapshot of {} ids read in {:.1} s; not reading for {:.0} s while {} expire",
            s.snapshot_ids,
            s.snapshot_s,
            self.stall.as_secs_f64(),
            self.expiring.len()
        ));

        // The stall: the stream is held, not read.
        let stall_start = Instant::now();
        let stall_end = stall_start + self.stall;
        let first_sent = Instant::now();
        self.expire_together().await?;
        s.expiring_beats_s = first_sent.elapsed().as_secs_f64();
        let target = (n - self.expiring.len()) as u64;
        let mut counter = self.clients[0].clone();
        let mut next_line = Instant::now() + self.progress.unwrap_or(Duration::MAX / 4);
        while Instant::now() < stall_end {
            if s.expired_after_s.is_none() {
                let live = counter
                    .count_executors(CountExecutorsRequest {
                        status: proto::ExecutorStatus::Unspecified as i32,
                    })
                    .await
                    .map(|r| r.into_inner().count);
                if let Ok(live) = live
                    && live <= target
                {
                    s.expired_after_s = Some(stall_start.elapsed().as_secs_f64());
                    self.line(format_args!(
                        "phase B: all {} expired {:.2} s into the stall",
                        self.expiring.len(),
                        stall_start.elapsed().as_secs_f64()
                    ));
                }
            }
            if self.progress.is_some() && Instant::now() >= next_line {
                next_line += self.progress.unwrap_or_default();
                self.line(format_args!(
                    "phase B: stalled {:.0} s",
                    stall_start.elapsed().as_secs_f64()
                ));
            }
            tokio::time::sleep_until(stall_end.min(Instant::now() + Duration::from_millis(100)))
                .await;
        }
        s.stall_s = stall_start.elapsed().as_secs_f64();

        // Read again, until every OFFLINE or nothing more comes.
        let mut seen = Bits::new(self.expiring.len());
        let read_start = Instant::now();
        let mut next_line = read_start + self.progress.unwrap_or(Duration::MAX / 4);
        // Some(last) while a re-watch has not yet shown how it began.
        let mut rewatch_from: Option<u64> = None;
        while (s.offline_received as usize) < self.expiring.len() {
            if self.progress.is_some() && Instant::now() >= next_line {
                next_line += self.progress.unwrap_or_default();
                self.line(format_args!(
                    "phase B: OFFLINE {}/{}",
                    s.offline_received,
                    self.expiring.len()
                ));
            }
            let message = match tokio::time::timeout(DRAIN_IDLE, stream.message()).await {
                Err(_) => {
                    s.errors.add("watch:idle", 1);
                    break;
                }
                Ok(m) => m,
            };
            let kind = match message {
                Ok(Some(m)) => match m.kind {
                    Some(kind) => kind,
                    None => continue,
                },
                Ok(None) | Err(_) => {
                    s.server_ended += 1;
                    match message {
                        Err(status) => {
                            if status.code() == Code::ResourceExhausted {
                                s.lagged += 1;
                            }
                            s.errors.add(&stats::code_key("watch", &status), 1);
                        }
                        _ => s.errors.add("watch:ended_by_server", 1),
                    }
                    if read_start.elapsed() > self.timeout {
                        break;
                    }
                    self.line(format_args!(
                        "phase B: the server ended the watch; watching again from revision {}",
                        chain.last
                    ));
                    stream = open_lite_watch(self.channel.clone(), chain.last)
                        .await
                        .context("phase B: cannot watch again")?;
                    rewatch_from = Some(chain.last);
                    continue;
                }
            };
            if let Some(last) = rewatch_from.take() {
                match rewatch_kind(last, &kind) {
                    Rewatch::Resumed => s.resumes += 1,
                    Rewatch::Snapshot => s.snapshots += 1,
                    Rewatch::Gap => s.rewatch_gaps += 1,
                }
            }
            match kind {
                // A new snapshot (counted above): the chain goes on from
                // its revision; the events before it are lost.
                LiteKind::Snapshot(chunk) => {
                    if !chunk.more {
                        chain.restart(chunk.revision);
                    }
                }
                LiteKind::Event(e) => {
                    chain.event(e.revision);
                    if e.r#type == proto::EventType::Offline as i32 {
                        match self.index.index_of(&e.executor_id) {
                            Some(i) if self.expiring.contains(&i) => {
                                if seen.insert(i - self.expiring.start) {
                                    s.offline_received += 1;
                                    if e.reason == proto::OfflineReason::Expired as i32 {
                                        s.offline_expired += 1;
                                    }
                                    s.drain_s = read_start.elapsed().as_secs_f64();
                                } else {
                                    s.offline_repeated += 1;
                                }
                            }
                            _ => s.offline_other += 1,
                        }
                    } else {
                        s.other_events += 1;
                    }
                }
            }
        }
        s.chain = chain;
        Ok(s)
    }

    /// One batch heartbeat with the short TTL for every expiring executor,
    /// all batches at once over the connections.
    async fn expire_together(&self) -> anyhow::Result<()> {
        let ids: Vec<usize> = self.expiring.clone().collect();
        let mut calls = FuturesUnordered::new();
        for (k, chunk) in ids.chunks(MAX_BATCH).enumerate() {
            let mut c = self.clients[k % self.clients.len()].clone();
            let requests = chunk
                .iter()
                .map(|&i| client::heartbeat_request(self.index.id(i), self.expiring_ttl_ms))
                .collect();
            calls.push(async move { client::batch(&mut c, requests).await });
        }
        while let Some(result) = calls.next().await {
            let results = result.context("phase B: the short-TTL heartbeats")?;
            if let Some(bad) = results.iter().find(|r| !client::is_ok(r.status)) {
                bail!(
                    "phase B: short-TTL heartbeat of {}: {}",
                    bad.executor_id,
                    client::heartbeat_status_name(bad.status)
                );
            }
        }
        Ok(())
    }

    fn line(&self, what: std::fmt::Arguments<'_>) {
        if self.progress.is_some() {
            eprintln!("[{:>6.1}s] {what}", self.start.elapsed().as_secs_f64());
        }
    }
}

// ---------------------------------------------------------------------------
// The report.

/// The server's RSS around a phase, in bytes.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RssFigures {
    /// Median over the window before.
    pub before_bytes: u64,
    /// Largest sample during (and, for phase A, the settle window after).
    pub peak_bytes: u64,
    /// Median over the last second of the settle window (phase A only).
    pub after_bytes: u64,
    /// peak ÷ before.
    pub peak_ratio: f64,
    /// after ÷ before.
    pub after_ratio: f64,
}

/// Phase A's snapshots.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SnapshotSummary {
    /// Watchers started.
    pub watchers: usize,
    /// Of those, with exactly the fleet, each id once.
    pub exact: usize,
    /// Seconds from opening to the whole snapshot: median, max.
    pub whole_median_s: f64,
    /// Largest.
    pub whole_max_s: f64,
    /// Seconds from opening to the first chunk: median, max.
    pub first_chunk_median_s: f64,
    /// Largest.
    pub first_chunk_max_s: f64,
    /// Chunks per snapshot (median).
    pub chunks_median: f64,
    /// Distinct snapshot revisions among the watchers.
    pub revisions: usize,
    /// Seconds from the common start until the last one was done.
    pub phase_s: f64,
    /// What was wrong, per watcher (index: problem).
    pub problems: Vec<String>,
    /// Stream errors by code.
    pub errors: Tally,
}

/// The background heartbeat load.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BeatSummary {
    /// Executors it heartbeats.
    pub sample: usize,
    /// Heartbeats per second.
    pub rate: f64,
    /// Latency in the quiet window (the baseline).
    pub quiet: Latency,
    /// During phase A.
    pub watchers: Latency,
    /// In the settle window after it.
    pub settle: Latency,
    /// During phase B (snapshot, stall, reading again).
    pub stall: Latency,
    /// CPU use in the quiet window.
    pub cpu_quiet: CpuUse,
    /// CPU use during phase A.
    pub cpu_watchers: CpuUse,
    /// Heartbeats not sent because 512 were in flight, over the run.
    pub skipped: u64,
    /// Errors by code.
    pub errors: Tally,
}

/// The server's own watch counters from `/metrics`, at the end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerCounters {
    /// `registry_watchers_lagged_total`.
    pub watchers_lagged: f64,
    /// `registry_watch_starts_total{from="snapshot"}`.
    pub starts_from_snapshot: f64,
    /// `registry_watch_starts_total{from="history"}`.
    pub starts_from_history: f64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct WatchersReport {
    /// The registry's endpoint.
    pub endpoint: String,
    /// Fleet size.
    pub executors: usize,
    /// Phase A's watchers.
    pub watchers: usize,
    /// Phase B's expiring executors.
    pub expiring: usize,
    /// Phase B's stall (s).
    pub stall_s: f64,
    /// The server's pid, if its RSS was sampled.
    pub server_pid: Option<u32>,
    /// RSS samples taken.
    pub rss_samples: usize,
    /// Why RSS sampling stopped early, if it did.
    pub rss_error: Option<String>,
    /// The server's RSS before registration.
    pub rss_empty_bytes: Option<u64>,
    /// Seconds to register the fleet (first heartbeats included).
    pub register_s: f64,
    /// Registrations per second.
    pub registrations_per_s: f64,
    /// Registration latency.
    pub register_latency: Latency,
    /// The background heartbeats.
    pub heartbeats: BeatSummary,
    /// Phase A's snapshots.
    pub snapshots: SnapshotSummary,
    /// Phase A's RSS.
    pub rss_a: Option<RssFigures>,
    /// Phase B.
    pub stall: StallSummary,
    /// Phase B's RSS (before, peak).
    pub rss_b: Option<RssFigures>,
    /// The server's watch counters.
    pub server: Option<ServerCounters>,
    /// The goals judged.
    pub goals: Goals,
    /// Every goal met.
    pub passed: bool,
    /// One line per goal missed.
    pub failures: Vec<String>,
    /// Things worth a look that are not goals.
    pub notes: Vec<String>,
}

// ---------------------------------------------------------------------------
// The run.

/// Runs both phases against `config.endpoint`.
pub async fn run(config: &WatchersConfig) -> anyhow::Result<WatchersReport> {
    let n = config.executors;
    ensure!(n > 0, "--executors must be at least 1");
    ensure!(config.watchers > 0, "--watchers must be at least 1");
    ensure!(config.beat_sample > 0, "--beat-sample must be at least 1");
    ensure!(
        config.beat_sample + config.expiring <= n,
        "--beat-sample ({}) + --expiring ({}) must not exceed --executors ({n})",
        config.beat_sample,
        config.expiring
    );
    ensure!(
        config.expiring_ttl + STALL_MARGIN <= config.stall,
        "--stall must be at least --expiring-ttl + 1 s, so every expiry falls within it"
    );
    let start = Instant::now();
    let progress = config.progress.then_some(config.progress_every);
    let line = |what: std::fmt::Arguments<'_>| {
        if config.progress {
            eprintln!("[{:>6.1}s] {what}", start.elapsed().as_secs_f64());
        }
    };

    let rss_empty = match config.server_pid {
        Some(pid) => Some(read_rss(pid).context("--server-pid")?),
        None => {
            line(format_args!(
                "no --server-pid: the server's RSS is neither measured nor judged"
            ));
            None
        }
    };
    let sampler = config
        .server_pid
        .map(|pid| RssSampler::start(pid, config.rss_every, start));

    let clients = client::connect(&config.endpoint, config.connections).await?;
    let prefix = format!("wl{:08x}x", rand::rng().random::<u32>());
    let fleet_ttl_ms = config.fleet_ttl.as_millis() as u64;

    // The fleet.
    line(format_args!("registering {n} executors (prefix {prefix})"));
    let register_start = Instant::now();
    let (ids, register_latency) = register_fleet(
        &clients,
        &prefix,
        n,
        config.register_concurrency,
        fleet_ttl_ms,
        progress,
    )
    .await?;
    let register_s = register_start.elapsed().as_secs_f64();
    let live = clients[0]
        .clone()
        .count_executors(CountExecutorsRequest {
            status: proto::ExecutorStatus::Running as i32,
        })
        .await
        .context("counting executors")?
        .into_inner()
        .count;
    line(format_args!(
        "registered {n} in {register_s:.1} s ({:.0}/s), each heartbeated once with TTL {}; {live} RUNNING",
        n as f64 / register_s,
        humantime::format_duration(config.fleet_ttl)
    ));
    let index = Arc::new(IdIndex::new(prefix, ids));

    // Background heartbeats on executors 0..sample.
    let phase = Arc::new(AtomicUsize::new(WARMUP));
    let worst_us = Arc::new(AtomicU64::new(0));
    let beat_stop = CancellationToken::new();
    let beat_task = BeatLoad {
        endpoint: config.endpoint.clone(),
        connections: config.beat_connections,
        ids: (0..config.beat_sample)
            .map(|i| index.id(i).to_owned())
            .collect(),
        rate: config.beat_rate,
        ttl_ms: fleet_ttl_ms,
        phase: phase.clone(),
        worst_us: worst_us.clone(),
        stop: beat_stop.clone(),
    }
    .spawn()?;
    // Connections for the watchers, opened before anything is timed.
    let mut channels = Vec::with_capacity(config.watchers);
    for _ in 0..config.watchers {
        channels.push(client::channel(&config.endpoint, None).await?);
    }
    let stall_channel = client::channel(&config.endpoint, None).await?;
    let rss_now = || {
        sampler.as_ref().map_or_else(
            || "?".to_owned(),
            |s| format!("{:.1}", s.last.load(Ordering::Relaxed) as f64 / 1_048_576.0),
        )
    };
    tokio::time::sleep(config.warmup).await;

    // The quiet window.
    phase.store(QUIET, Ordering::Relaxed);
    let quiet_from = start.elapsed().as_secs_f64();
    line(format_args!(
        "quiet window {:.0} s: {} heartbeats/s on {} executors, no watcher; RSS {} MiB",
        config.quiet.as_secs_f64(),
        config.beat_rate,
        config.beat_sample,
        rss_now()
    ));
    let cpu_quiet_from = CpuMark::now(config.server_pid);
    tokio::time::sleep(config.quiet).await;
    let quiet_to = start.elapsed().as_secs_f64();
    let cpu_quiet_to = CpuMark::now(config.server_pid);

    // Phase A.
    let barrier = Arc::new(Barrier::new(config.watchers + 1));
    let ids_received = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = channels
        .into_iter()
        .map(|channel| {
            tokio::spawn(snapshot_reader(
                channel,
                index.clone(),
                barrier.clone(),
                config.watch_timeout,
                ids_received.clone(),
                done.clone(),
            ))
        })
        .collect();
    phase.store(WATCHERS, Ordering::Relaxed);
    let a_from = start.elapsed().as_secs_f64();
    line(format_args!(
        "phase A: {} watchers open at once, each reads its snapshot and closes",
        config.watchers
    ));
    barrier.wait().await;
    let a_start = Instant::now();
    let mut next_line = a_start + config.progress_every;
    while done.load(Ordering::Relaxed) < config.watchers {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if config.progress && Instant::now() >= next_line {
            next_line += config.progress_every;
            line(format_args!(
                "phase A: {}/{} done, {} ids received, RSS {} MiB, worst heartbeat {} ms",
                done.load(Ordering::Relaxed),
                config.watchers,
                ids_received.load(Ordering::Relaxed),
                rss_now(),
                worst_us.swap(0, Ordering::Relaxed) / 1_000
            ));
        }
    }
    let a_seconds = a_start.elapsed().as_secs_f64();
    phase.store(SETTLE, Ordering::Relaxed);
    let cpu_a_to = CpuMark::now(config.server_pid);
    let mut outcomes = Vec::with_capacity(readers.len());
    for r in readers {
        outcomes.push(r.await.context("a watcher task panicked")?);
    }
    line(format_args!(
        "phase A: all done in {a_seconds:.1} s; RSS {} MiB; settling {:.0} s",
        rss_now(),
        config.settle.as_secs_f64()
    ));
    tokio::time::sleep(config.settle).await;
    let settle_to = start.elapsed().as_secs_f64();

    // Phase B.
    phase.store(STALL, Ordering::Relaxed);
    let b_from = start.elapsed().as_secs_f64();
    line(format_args!("phase B: one watcher; RSS {} MiB", rss_now()));
    let stall = StallRun {
        channel: stall_channel,
        index: &index,
        clients: &clients,
        expiring: n - config.expiring..n,
        stall: config.stall,
        expiring_ttl_ms: config.expiring_ttl.as_millis() as u64,
        timeout: config.watch_timeout,
        progress,
        start,
    }
    .run()
    .await?;
    let b_to = start.elapsed().as_secs_f64();
    line(format_args!(
        "phase B: {} OFFLINE of {} read, resumes {}, snapshots {}; RSS {} MiB",
        stall.offline_received,
        config.expiring,
        stall.resumes,
        stall.snapshots,
        rss_now()
    ));
    beat_stop.cancel();
    let beats = tokio::task::spawn_blocking(move || beat_task.join())
        .await
        .context("joining the heartbeat thread")?
        .map_err(|_| anyhow::anyhow!("the heartbeat thread panicked"))??;

    // Figures.
    let (rss_a, rss_b, rss_samples, rss_error) = match sampler {
        Some(s) => {
            let before = median_u64(&s.window(quiet_from, quiet_to));
            let peak = s.window(a_from, settle_to).into_iter().max().unwrap_or(0);
            let after = median_u64(&s.window(settle_to - BEFORE_WINDOW_S, settle_to));
            let b_before = median_u64(&s.window(b_from - BEFORE_WINDOW_S, b_from));
            let b_peak = s.window(b_from, b_to).into_iter().max().unwrap_or(0);
            let (count, error) = s.finish().await;
            let ratio = |x: u64, of: u64| if of == 0 { 0.0 } else { x as f64 / of as f64 };
            (
                Some(RssFigures {
                    before_bytes: before,
                    peak_bytes: peak,
                    after_bytes: after,
                    peak_ratio: ratio(peak, before),
                    after_ratio: ratio(after, before),
                }),
                Some(RssFigures {
                    before_bytes: b_before,
                    peak_bytes: b_peak,
                    after_bytes: 0,
                    peak_ratio: ratio(b_peak, b_before),
                    after_ratio: 0.0,
                }),
                count,
                error,
            )
        }
        None => (None, None, 0, None),
    };
    let server = match &config.metrics {
        Some(url) => match prom::fetch(url).await {
            Ok(text) => Some(ServerCounters {
                watchers_lagged: prom::sum(&text, "registry_watchers_lagged_total").unwrap_or(0.0),
                starts_from_snapshot: prom::sum(
                    &text,
                    "registry_watch_starts_total{from=\"snapshot\"}",
                )
                .unwrap_or(0.0),
                starts_from_history: prom::sum(
                    &text,
                    "registry_watch_starts_total{from=\"history\"}",
                )
                .unwrap_or(0.0),
            }),
            Err(e) => {
                line(format_args!("cannot read {url}: {e:#}"));
                None
            }
        },
        None => None,
    };

    let snapshots = summarize_snapshots(&outcomes, a_seconds);
    let heartbeats = BeatSummary {
        sample: config.beat_sample,
        rate: config.beat_rate,
        quiet: Latency::of(&beats.latency[QUIET]),
        watchers: Latency::of(&beats.latency[WATCHERS]),
        settle: Latency::of(&beats.latency[SETTLE]),
        stall: Latency::of(&beats.latency[STALL]),
        cpu_quiet: cpu_quiet_from.until(&cpu_quiet_to),
        cpu_watchers: cpu_quiet_to.until(&cpu_a_to),
        skipped: beats.skipped.iter().sum(),
        errors: beats.errors,
    };

    // Verdict.
    let mut failures = Vec::new();
    let mut notes = Vec::new();
    if snapshots.exact < snapshots.watchers {
        failures.push(format!(
            "phase A: {} of {} watchers did not get exactly the {n} executors, each once: {}",
            snapshots.watchers - snapshots.exact,
            snapshots.watchers,
            snapshots.problems.join("; ")
        ));
    }
    match &rss_a {
        Some(r) => rss_failures(
            r.before_bytes,
            r.peak_bytes,
            r.after_bytes,
            config.goals.max_peak_ratio,
            config.goals.max_after_ratio,
            &mut failures,
        ),
        None => notes.push("RSS not measured (no --server-pid): its goals were not judged".into()),
    }
    if let Some(e) = &rss_error {
        failures.push(format!("RSS sampling stopped: {e}"));
    }
    let (q, w) = (heartbeats.quiet, heartbeats.watchers);
    if q.count == 0 || w.count == 0 {
        failures.push("no heartbeat latency in the quiet window or in phase A".to_owned());
    } else if !p99_kept(
        q.p99_us,
        w.p99_us,
        config.goals.max_p99_ratio,
        config.goals.p99_slack_us,
    ) {
        failures.push(format!(
            "heartbeat p99 not kept: {} µs during phase A against {} µs quiet (p99.9 {} µs against {} µs); \
             goal ≤ max({} ×, + {} µs)",
            w.p99_us,
            q.p99_us,
            w.p999_us,
            q.p999_us,
            config.goals.max_p99_ratio,
            config.goals.p99_slack_us
        ));
    }
    if heartbeats.errors.total() > 0 {
        failures.push(format!(
            "background heartbeats failed: {}",
            heartbeats.errors.summary()
        ));
    }
    if heartbeats.skipped > 0 {
        notes.push(format!(
            "{} background heartbeats skipped ({BEAT_MAX_INFLIGHT} in flight): the load was not offered in full",
            heartbeats.skipped
        ));
    }
    stall_failures(&stall, &mut failures, &mut notes);
    if let Some(p) = &stall.snapshot_problem {
        failures.push(format!("phase B: the watcher's first snapshot: {p}"));
    }

    Ok(WatchersReport {
        endpoint: config.endpoint.clone(),
        executors: n,
        watchers: config.watchers,
        expiring: config.expiring,
        stall_s: config.stall.as_secs_f64(),
        server_pid: config.server_pid,
        rss_samples,
        rss_error,
        rss_empty_bytes: rss_empty,
        register_s,
        registrations_per_s: n as f64 / register_s.max(1e-9),
        register_latency: Latency::of(&register_latency),
        heartbeats,
        snapshots,
        rss_a,
        stall,
        rss_b,
        server,
        goals: config.goals,
        passed: failures.is_empty(),
        failures,
        notes,
    })
}

fn summarize_snapshots(outcomes: &[WatcherOutcome], phase_s: f64) -> SnapshotSummary {
    let whole: Vec<f64> = outcomes.iter().filter_map(|o| o.whole_s).collect();
    let first: Vec<f64> = outcomes.iter().filter_map(|o| o.first_chunk_s).collect();
    let chunks: Vec<f64> = outcomes.iter().map(|o| o.check.chunks as f64).collect();
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let mut errors = Tally::default();
    let mut problems = Vec::new();
    for (i, o) in outcomes.iter().enumerate() {
        if let Some(e) = &o.error {
            errors.add(e, 1);
        }
        let problem = match (&o.error, o.check.problem()) {
            (Some(e), Some(p)) => Some(format!("{e}, {p}")),
            (Some(e), None) => Some(e.clone()),
            (None, p) => p,
        };
        if let Some(p) = problem {
            problems.push(format!("watcher {i}: {p}"));
        }
    }
    SnapshotSummary {
        watchers: outcomes.len(),
        exact: outcomes
            .iter()
            .filter(|o| o.error.is_none() && o.check.exact())
            .count(),
        whole_median_s: stats::median(&whole),
        whole_max_s: max(&whole),
        first_chunk_median_s: stats::median(&first),
        first_chunk_max_s: max(&first),
        chunks_median: stats::median(&chunks),
        revisions: outcomes
            .iter()
            .filter_map(|o| o.check.revision)
            .collect::<BTreeSet<_>>()
            .len(),
        phase_s,
        problems,
        errors,
    }
}

/// Phase B's goals: every OFFLINE of the expiring executors, consecutive
/// revisions, no snapshot after the first.
pub fn stall_failures(s: &StallSummary, failures: &mut Vec<String>, notes: &mut Vec<String>) {
    let expected = s.expiring as u64;
    if s.offline_received < expected {
        failures.push(format!(
            "phase B: {} of {expected} OFFLINE events never arrived",
            expected - s.offline_received
        ));
    }
    if s.offline_expired < s.offline_received {
        failures.push(format!(
            "phase B: {} OFFLINE events of the expiring executors without reason EXPIRED",
            s.offline_received - s.offline_expired
        ));
    }
    if s.chain.gaps > 0 {
        failures.push(format!(
            "phase B: {} events out of order (revision not the last + 1)",
            s.chain.gaps
        ));
    }
    if s.snapshots > 0 {
        failures.push(format!(
            "phase B: {} re-watches began with a new snapshot instead of resuming",
            s.snapshots
        ));
    }
    if s.rewatch_gaps > 0 {
        failures.push(format!(
            "phase B: {} re-watches began with an event out of order",
            s.rewatch_gaps
        ));
    }
    if s.offline_repeated > 0 {
        failures.push(format!(
            "phase B: {} OFFLINE events repeated",
            s.offline_repeated
        ));
    }
    if s.offline_other > 0 {
        failures.push(format!(
            "phase B: {} executors that kept heartbeating went OFFLINE",
            s.offline_other
        ));
    }
    if s.server_ended > 0 {
        notes.push(format!(
            "phase B: the server ended the stalled watch {} times ({} for lagging); {} re-watches resumed",
            s.server_ended, s.lagged, s.resumes
        ));
    }
    if s.expired_after_s.is_none() {
        notes.push(
            "phase B: the live count did not show every expiring executor gone within the stall"
                .to_owned(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stall_verdict_wants_every_offline_and_no_snapshot() {
        let good = StallSummary {
            expiring: 3,
            offline_received: 3,
            offline_expired: 3,
            chain: EventChain {
                last: 13,
                events: 3,
                gaps: 0,
            },
            expired_after_s: Some(2.1),
            ..StallSummary::default()
        };
        let (mut f, mut n) = (Vec::new(), Vec::new());
        stall_failures(&good, &mut f, &mut n);
        assert!(f.is_empty() && n.is_empty(), "{f:?} {n:?}");

        // Ended for lagging and resumed: a note, not a failure.
        let resumed = StallSummary {
            server_ended: 1,
            lagged: 1,
            resumes: 1,
            ..good.clone()
        };
        stall_failures(&resumed, &mut f, &mut n);
        assert!(f.is_empty(), "{f:?}");
        assert_eq!(n.len(), 1);

        let snapshot = StallSummary {
            offline_received: 2,
            offline_expired: 2,
            snapshots: 1,
            server_ended: 1,
            lagged: 1,
            ..good
        };
        stall_failures(&snapshot, &mut f, &mut n);
        assert_eq!(f.len(), 2, "{f:?}");
    }
}
