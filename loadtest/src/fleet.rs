//! The fleet simulator: a million executors from one process.
//!
//! Owns: per-executor liveness records (when registered, last OK heartbeat
//! and the TTL it asked for, when the watch saw it OFFLINE), the killed set,
//! and the run's phases.
//!
//! Shape: one worker task per connection owns the executors `w, w + C,
//! w + 2C, …`: it registers them (bounded in flight), then keeps each one's
//! next heartbeat in a timing wheel ([`Wheel`]) — never a task or timer per
//! executor. Heartbeats go out as unary calls, on one long-lived pipelined
//! `HeartbeatStream`, or as `HeartbeatBatch` calls, with at most `inflight`
//! calls (or stream messages) outstanding per connection. Each executor is in
//! exactly one place at a time (wheel, pending queue, or in flight), so its
//! record has a single writer. A separate connection keeps a watch open and
//! stamps OFFLINE events.
//!
//! Timeline: register everything (heartbeats start as each registration
//! returns, at a random point within the first interval), then `duration` of
//! heartbeats; at half of it the killed set stops heartbeating; the run ends
//! no sooner than TTL + 1.5 s after the kill, so every killed executor has
//! had its chance to expire.
//!
//! Verification, from the watch: every killed executor went OFFLINE, no
//! earlier than its last OK heartbeat + TTL and no later than 1 s after; no
//! other executor went OFFLINE (false expirations). The last heartbeat's
//! time is when it was *sent*, which is no later than when the server
//! stamped it, so a measured lag is an upper bound of the real one and a
//! lag below −1 ms (the registry's clock counts whole milliseconds) is a
//! premature expiry.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use executor_registry::proto::{self, HeartbeatResult, HeartbeatStatus, RegisterRequest};
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::Mode;
use crate::client::{self, BeatStream, Client};
use crate::prom::{self, ServerSample};
use crate::stats::{self, Latency, Tally};
use crate::watch;
use crate::wheel::Wheel;

/// Wheel resolution.
const TICK_US: u64 = 5_000;
/// Wheel slots: 16,384 × 5 ms ≈ 82 s of horizon.
const WHEEL_SLOTS: usize = 16_384;
/// Tries per registration.
const REGISTER_ATTEMPTS: u32 = 5;
/// After a failed stream, wait this long before opening another.
const STREAM_REOPEN_DELAY: Duration = Duration::from_millis(200);
/// Slack after the kill beyond the largest TTL before the run ends.
const EXPIRY_SLACK: Duration = Duration::from_millis(1_500);
/// A killed executor must be OFFLINE within TTL + this (by default).
pub const EXPIRY_ALLOWANCE: Duration = Duration::from_secs(1);

/// The verdict on killed executors, shared by the fleet run and the soak:
/// every one OFFLINE, none later than TTL + `allowance`, none before its
/// last heartbeat + TTL. Appends a line per breach.
pub(crate) fn kill_failures(
    not_offline: u64,
    late: u64,
    premature: u64,
    allowance: Duration,
    failures: &mut Vec<String>,
) {
    if not_offline > 0 {
        failures.push(format!("{not_offline} killed executors never went OFFLINE"));
    }
    if late > 0 {
        failures.push(format!(
            "{late} killed executors went OFFLINE later than TTL + {}",
            humantime::format_duration(allowance)
        ));
    }
    if premature > 0 {
        failures.push(format!(
            "{premature} killed executors went OFFLINE before last heartbeat + TTL"
        ));
    }
}
/// The registry's clock counts whole milliseconds (a deadline is the
/// truncated `now` + TTL), so an expiry up to 1 ms before send + TTL is on
/// time; earlier than this is premature.
pub const CLOCK_GRANULARITY: Duration = Duration::from_millis(1);
/// Wait after registration before sampling the server's memory (its
/// `process_*` metrics are sampled every 5 s).
const MEMORY_SAMPLE_DELAY: Duration = Duration::from_secs(6);

/// A heartbeat went out after last OK + TTL: the generator fell behind.
const SENT_LATE: u8 = 1;
/// A heartbeat sent before last OK + TTL was refused after that deadline:
/// it spent its slack in queues (client, kernel or server), and the registry
/// cannot tell a late heartbeat from a missing one.
const ANSWERED_LATE: u8 = 2;

const REASON_EXPIRED: u8 = 1;
const REASON_DEREGISTERED: u8 = 2;
const REASON_MISSING: u8 = 3;
const REASON_OTHER: u8 = 4;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The registry's gRPC endpoint, `http://host:port`.
    pub endpoint: String,
    /// Its Prometheus endpoint, `http://host:port/metrics`, if memory is to
    /// be measured.
    pub metrics: Option<String>,
    /// Fleet size.
    pub executors: usize,
    /// Transport of heartbeats.
    pub mode: Mode,
    /// Connections for registrations and heartbeats (the watch has its own).
    pub connections: usize,
    /// Heartbeat phase, after registration.
    pub duration: Duration,
    /// TTL the executors ask for; None: 3 × the suggested interval.
    pub ttl: Option<Duration>,
    /// Share of the fleet that stops heartbeating halfway.
    pub kill_fraction: f64,
    /// A killed executor is late when OFFLINE more than this after its last
    /// OK heartbeat + TTL ([`EXPIRY_ALLOWANCE`]; more where a failover of
    /// replicas falls in between).
    pub expiry_allowance: Duration,
    /// Registrations in flight, over all connections.
    pub register_concurrency: usize,
    /// Per connection: unary calls, batch calls, or stream messages in flight.
    pub inflight: usize,
    /// Heartbeats per batch call (at most).
    pub batch_size: usize,
    /// Progress bar and periodic lines on stderr.
    pub progress: bool,
    /// Period of progress lines.
    pub progress_every: Duration,
    /// TLS to the registry (the endpoint is then `https://`).
    pub tls: Option<executor_registry::client::ClientTls>,
}

impl FleetConfig {
    /// Defaults for `executors` executors against `endpoint`.
    pub fn new(endpoint: impl Into<String>, executors: usize, mode: Mode) -> Self {
        Self {
            endpoint: endpoint.into(),
            metrics: None,
            executors,
            mode,
            connections: 4,
            duration: Duration::from_secs(60),
            ttl: None,
            kill_fraction: 0.1,
            expiry_allowance: EXPIRY_ALLOWANCE,
            register_concurrency: 1_024,
            inflight: default_inflight(mode),
            batch_size: 1_000,
            progress: false,
            progress_every: Duration::from_secs(5),
            tls: None,
        }
    }
}

/// Per-connection in-flight bound that suits `mode`.
pub fn default_inflight(mode: Mode) -> usize {
    match mode {
        Mode::Unary => 64,
        Mode::Stream => 1_024,
        Mode::Batch => 8,
    }
}

/// The run's shared records. Each executor's slots are written by the one
/// worker that owns it (and the watch, for `offline_*`).
struct Fleet {
    start: Instant,
    /// `start` on the wall clock, microseconds since the Unix epoch.
    start_unix_us: u64,
    /// Names are `<prefix><index>`, so ids are `<prefix><index>-<hex>`.
    prefix: String,
    killed: Vec<bool>,
    fixed_ttl_ms: Option<u64>,
    /// µs since start (+1; 0 = never) of each event.
    registered_us: Vec<AtomicU64>,
    last_ok_us: Vec<AtomicU64>,
    ttl_ms: Vec<AtomicU32>,
    offline_us: Vec<AtomicU64>,
    offline_reason: Vec<AtomicU8>,
    /// Why an expiry of this executor may not be the registry's fault:
    /// [`SENT_LATE`], [`ANSWERED_LATE`].
    late: Vec<AtomicU8>,
    /// When the killed set stopped (0: not yet).
    kill_us: AtomicU64,
    interval_ms: AtomicU64,
    max_ttl_ms: AtomicU64,
    registered: AtomicU64,
    register_failed: AtomicU64,
    beats_ok: AtomicU64,
    beats_failed: AtomicU64,
    lost: AtomicU64,
    late_sends: AtomicU64,
    /// Largest heartbeat latency since the last progress line (µs).
    worst_latency_us: AtomicU64,
    offline_killed: AtomicU64,
    offline_false: AtomicU64,
    stop: CancellationToken,
}

impl Fleet {
    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64 + 1
    }

    fn len(&self) -> usize {
        self.killed.len()
    }

    fn index_of(&self, id: &str) -> Option<usize> {
        let (index, _) = id.strip_prefix(&self.prefix)?.split_once('-')?;
        index.parse::<usize>().ok().filter(|&i| i < self.len())
    }

    fn ttl_for_next_beat(&self) -> u64 {
        self.fixed_ttl_ms
            .unwrap_or_else(|| 3 * self.interval_ms.load(Ordering::Relaxed).max(1))
    }

    fn is_stopped(&self, index: usize) -> bool {
        self.killed[index] && self.kill_us.load(Ordering::Relaxed) != 0
    }

    /// Records the first OFFLINE of `index`.
    fn mark_offline(&self, index: usize, at_us: u64, reason: u8) -> bool {
        if self.offline_us[index]
            .compare_exchange(0, at_us, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        self.offline_reason[index].store(reason, Ordering::Relaxed);
        let kill = self.kill_us.load(Ordering::Relaxed);
        if self.killed[index] && kill != 0 && at_us >= kill {
            self.offline_killed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.offline_false.fetch_add(1, Ordering::Relaxed);
        }
        true
    }
}

fn atomics<T: Default>(n: usize) -> Vec<T> {
    (0..n).map(|_| T::default()).collect()
}

/// The registration of executor `index` of a run: name `<prefix><index>`,
/// a loopback address and two labels (`zone`, `pool`).
pub fn register_request(prefix: &str, index: usize) -> RegisterRequest {
    RegisterRequest {
        name: format!("{prefix}{index}"),
        address: format!("127.0.0.1:{}", 1 + index % 65_000),
        labels: [
            ("zone".to_owned(), format!("z{}", index % 8)),
            ("pool".to_owned(), format!("p{}", index % 32)),
        ]
        .into_iter()
        .collect(),
    }
}

type Registered = (u32, u32, u64, Result<(String, u64), Status>);
type RegisterFuture = Pin<Box<dyn Future<Output = Registered> + Send>>;

enum Answer {
    Unary {
        slot: u32,
        sent_us: u64,
        ttl_ms: u64,
        result: Result<u64, Status>,
    },
    Batch {
        slots: Vec<u32>,
        sent_us: u64,
        ttl_ms: u64,
        result: Result<Vec<HeartbeatResult>, Status>,
    },
}
type CallFuture = Pin<Box<dyn Future<Output = Answer> + Send>>;

struct StreamState {
    stream: BeatStream,
    /// (slot, sent µs, ttl ms), in send order.
    inflight: VecDeque<(u32, u64, u64)>,
}

/// What a worker saw, merged into the report.
struct WorkerOutput {
    beat_latency: Histogram<u64>,
    slip: Histogram<u64>,
    register_latency: Histogram<u64>,
    errors: Tally,
}

/// One connection's share of the fleet.
struct Worker {
    fleet: Arc<Fleet>,
    client: Client,
    first: usize,
    stride: usize,
    slots: u32,
    mode: Mode,
    inflight: usize,
    batch_size: usize,
    register_cap: usize,
    ids: Vec<String>,
    due_us: Vec<u64>,
    wheel: Wheel,
    pending: VecDeque<u32>,
    next_register: u32,
    register_retry: Vec<(u32, u32)>,
    reopen_at: Option<Instant>,
    rng: SmallRng,
    out: WorkerOutput,
}

impl Worker {
    fn index(&self, slot: u32) -> usize {
        self.first + slot as usize * self.stride
    }

    async fn run(mut self) -> WorkerOutput {
        let mut tick = tokio::time::interval(Duration::from_micros(TICK_US));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut registering: FuturesUnordered<RegisterFuture> = FuturesUnordered::new();
        let mut calls: FuturesUnordered<CallFuture> = FuturesUnordered::new();
        let mut stream: Option<StreamState> = None;
        let stop = self.fleet.stop.clone();
        let mut due = Vec::new();
        loop {
            self.start_registrations(&mut registering);
            if self.mode == Mode::Stream && stream.is_none() {
                stream = self.open_stream().await;
            }
            self.dispatch(&mut calls, &mut stream);
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {
                    self.wheel.advance(self.fleet.now_us(), &mut due);
                    self.pending.extend(due.drain(..));
                }
                Some(done) = registering.next(), if !registering.is_empty() => self.on_registered(done),
                Some(answer) = calls.next(), if !calls.is_empty() => self.on_answer(answer),
                result = next_result(stream.as_mut()) => {
                    if let Some(st) = stream.as_mut()
                        && !self.on_stream_result(result, st)
                    {
                        let lost = std::mem::take(&mut st.inflight);
                        for (slot, _, _) in lost {
                            self.retry_soon(slot);
                        }
                        stream = None;
                        self.reopen_at = Some(Instant::now() + STREAM_REOPEN_DELAY);
                    }
                }
            }
        }
        self.out
    }

    fn start_registrations(&mut self, registering: &mut FuturesUnordered<RegisterFuture>) {
        while registering.len() < self.register_cap {
            let (slot, attempt) = if let Some(retry) = self.register_retry.pop() {
                retry
            } else if self.next_register < self.slots {
                self.next_register += 1;
                (self.next_register - 1, 0)
            } else {
                return;
            };
            let request = register_request(&self.fleet.prefix, self.index(slot));
            let mut client = self.client.clone();
            let sent_us = self.fleet.now_us();
            registering.push(Box::pin(async move {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                }
                let result = client::register(&mut client, request).await;
                (slot, attempt, sent_us, result)
            }));
        }
    }

    fn on_registered(&mut self, (slot, attempt, sent_us, result): Registered) {
        let index = self.index(slot);
        match result {
            Ok((id, interval_ms)) => {
                let now = self.fleet.now_us();
                stats::record(&mut self.out.register_latency, now.saturating_sub(sent_us));
                self.ids[slot as usize] = id;
                self.fleet.registered_us[index].store(now, Ordering::Relaxed);
                self.fleet.registered.fetch_add(1, Ordering::Relaxed);
                if interval_ms > 0 {
                    self.fleet.interval_ms.store(interval_ms, Ordering::Relaxed);
                }
                // Spread first heartbeats over one interval.
                let first = self.rng.random_range(0..interval_ms.max(1) * 1_000);
                self.schedule(slot, now + first);
            }
            Err(status) => {
                self.out
                    .errors
                    .add(&stats::code_key("register", &status), 1);
                if attempt + 1 < REGISTER_ATTEMPTS {
                    self.register_retry.push((slot, attempt + 1));
                } else {
                    self.fleet.register_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn record_latency(&mut self, us: u64) {
        stats::record(&mut self.out.beat_latency, us);
        self.fleet.worst_latency_us.fetch_max(us, Ordering::Relaxed);
    }

    fn schedule(&mut self, slot: u32, due_us: u64) {
        self.due_us[slot as usize] = due_us;
        self.wheel.insert(due_us, slot);
    }

    fn retry_soon(&mut self, slot: u32) {
        let interval_us = self.fleet.interval_ms.load(Ordering::Relaxed).max(1) * 1_000;
        self.schedule(slot, self.fleet.now_us() + interval_us / 4);
    }

    /// The next due executor that is still heartbeating.
    fn next_pending(&mut self) -> Option<u32> {
        while let Some(slot) = self.pending.pop_front() {
            if !self.fleet.is_stopped(self.index(slot)) {
                return Some(slot);
            }
        }
        None
    }

    /// Records how late `slot` goes out; returns (sent µs, TTL ms).
    fn sending(&mut self, slot: u32) -> (u64, u64) {
        let now = self.fleet.now_us();
        stats::record(
            &mut self.out.slip,
            now.saturating_sub(self.due_us[slot as usize]),
        );
        let index = self.index(slot);
        let last = self.fleet.last_ok_us[index].load(Ordering::Relaxed);
        let ttl_us = u64::from(self.fleet.ttl_ms[index].load(Ordering::Relaxed)) * 1_000;
        if last != 0 && now > last + ttl_us {
            self.fleet.late[index].fetch_or(SENT_LATE, Ordering::Relaxed);
            self.fleet.late_sends.fetch_add(1, Ordering::Relaxed);
        }
        (now, self.fleet.ttl_for_next_beat())
    }

    fn dispatch(
        &mut self,
        calls: &mut FuturesUnordered<CallFuture>,
        stream: &mut Option<StreamState>,
    ) {
        match self.mode {
            Mode::Unary => {
                while calls.len() < self.inflight {
                    let Some(slot) = self.next_pending() else {
                        return;
                    };
                    let (sent_us, ttl_ms) = self.sending(slot);
                    let request = client::heartbeat_request(&self.ids[slot as usize], ttl_ms);
                    let mut client = self.client.clone();
                    calls.push(Box::pin(async move {
                        let result = client::unary(&mut client, request).await;
                        Answer::Unary {
                            slot,
                            sent_us,
                            ttl_ms,
                            result,
                        }
                    }));
                }
            }
            Mode::Batch => {
                while calls.len() < self.inflight {
                    let mut slots = Vec::new();
                    let mut requests = Vec::new();
                    let mut sent = (0, 0);
                    while slots.len() < self.batch_size {
                        let Some(slot) = self.next_pending() else {
                            break;
                        };
                        sent = self.sending(slot);
                        requests.push(client::heartbeat_request(&self.ids[slot as usize], sent.1));
                        slots.push(slot);
                    }
                    if slots.is_empty() {
                        return;
                    }
                    let (sent_us, ttl_ms) = sent;
                    let mut client = self.client.clone();
                    calls.push(Box::pin(async move {
                        let result = client::batch(&mut client, requests).await;
                        Answer::Batch {
                            slots,
                            sent_us,
                            ttl_ms,
                            result,
                        }
                    }));
                }
            }
            Mode::Stream => {
                let Some(st) = stream.as_mut() else {
                    return;
                };
                while st.inflight.len() < self.inflight {
                    let Some(slot) = self.next_pending() else {
                        return;
                    };
                    let (sent_us, ttl_ms) = self.sending(slot);
                    let request = client::heartbeat_request(&self.ids[slot as usize], ttl_ms);
                    if st.stream.send(request).is_err() {
                        self.pending.push_front(slot);
                        return;
                    }
                    st.inflight.push_back((slot, sent_us, ttl_ms));
                }
            }
        }
    }

    async fn open_stream(&mut self) -> Option<StreamState> {
        if self.reopen_at.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        self.reopen_at = None;
        let opened = tokio::time::timeout(
            Duration::from_secs(5),
            BeatStream::open(&mut self.client, self.inflight),
        )
        .await;
        match opened {
            Ok(Ok(stream)) => Some(StreamState {
                stream,
                inflight: VecDeque::with_capacity(self.inflight),
            }),
            Ok(Err(status)) => {
                self.out
                    .errors
                    .add(&stats::code_key("stream-open", &status), 1);
                self.reopen_at = Some(Instant::now() + STREAM_REOPEN_DELAY);
                None
            }
            Err(_) => {
                self.out.errors.add("stream-open:timeout", 1);
                self.reopen_at = Some(Instant::now() + STREAM_REOPEN_DELAY);
                None
            }
        }
    }

    fn on_answer(&mut self, answer: Answer) {
        let now = self.fleet.now_us();
        match answer {
            Answer::Unary {
                slot,
                sent_us,
                ttl_ms,
                result,
            } => match result {
                Ok(interval_ms) => {
                    self.record_latency(now.saturating_sub(sent_us));
                    self.beat_ok(slot, sent_us, ttl_ms, interval_ms);
                }
                Err(status) => {
                    self.out
                        .errors
                        .add(&stats::code_key("heartbeat", &status), 1);
                    let lost = matches!(status.code(), Code::NotFound | Code::FailedPrecondition);
                    self.beat_failed(slot, lost);
                }
            },
            Answer::Batch {
                slots,
                sent_us,
                ttl_ms,
                result,
            } => match result {
                Ok(results) if results.len() == slots.len() => {
                    self.record_latency(now.saturating_sub(sent_us));
                    for (slot, item) in slots.into_iter().zip(results) {
                        self.item_result(slot, sent_us, ttl_ms, &item);
                    }
                }
                Ok(_) => {
                    self.out.errors.add("batch:wrong_result_count", 1);
                    for slot in slots {
                        self.beat_failed(slot, false);
                    }
                }
                Err(status) => {
                    self.out.errors.add(&stats::code_key("batch", &status), 1);
                    for slot in slots {
                        self.beat_failed(slot, false);
                    }
                }
            },
        }
    }

    /// Handles one stream result; false if the stream is finished.
    fn on_stream_result(
        &mut self,
        result: Result<Option<HeartbeatResult>, Status>,
        st: &mut StreamState,
    ) -> bool {
        match result {
            Ok(Some(item)) => {
                let Some((slot, sent_us, ttl_ms)) = st.inflight.pop_front() else {
                    self.out.errors.add("stream:unexpected_result", 1);
                    return false;
                };
                if item.executor_id != self.ids[slot as usize] {
                    self.out.errors.add("stream:out_of_order", 1);
                }
                let now = self.fleet.now_us();
                self.record_latency(now.saturating_sub(sent_us));
                self.item_result(slot, sent_us, ttl_ms, &item);
                true
            }
            Ok(None) => {
                self.out.errors.add("stream:ended_by_server", 1);
                false
            }
            Err(status) => {
                self.out.errors.add(&stats::code_key("stream", &status), 1);
                false
            }
        }
    }

    fn item_result(&mut self, slot: u32, sent_us: u64, ttl_ms: u64, item: &HeartbeatResult) {
        if client::is_ok(item.status) {
            self.beat_ok(slot, sent_us, ttl_ms, item.heartbeat_interval_ms);
        } else {
            self.out
                .errors
                .add(client::heartbeat_status_name(item.status), 1);
            let lost = item.status == HeartbeatStatus::UnknownExecutor as i32
                || item.status == HeartbeatStatus::Expired as i32;
            self.beat_failed(slot, lost);
        }
    }

    fn beat_ok(&mut self, slot: u32, sent_us: u64, ttl_ms: u64, interval_ms: u64) {
        let index = self.index(slot);
        let fleet = &*self.fleet;
        fleet.last_ok_us[index].fetch_max(sent_us, Ordering::Relaxed);
        fleet.ttl_ms[index].store(ttl_ms as u32, Ordering::Relaxed);
        fleet.max_ttl_ms.fetch_max(ttl_ms, Ordering::Relaxed);
        fleet.beats_ok.fetch_add(1, Ordering::Relaxed);
        if interval_ms > 0 {
            fleet.interval_ms.store(interval_ms, Ordering::Relaxed);
        }
        let jitter = self.rng.random_range(0.9..1.1);
        let next = sent_us + (interval_ms.max(1) as f64 * 1_000.0 * jitter) as u64;
        self.schedule(slot, next);
    }

    fn beat_failed(&mut self, slot: u32, lost: bool) {
        self.fleet.beats_failed.fetch_add(1, Ordering::Relaxed);
        let index = self.index(slot);
        let last = self.fleet.last_ok_us[index].load(Ordering::Relaxed);
        let ttl_us = u64::from(self.fleet.ttl_ms[index].load(Ordering::Relaxed)) * 1_000;
        if last != 0 && self.fleet.now_us() > last + ttl_us {
            self.fleet.late[index].fetch_or(ANSWERED_LATE, Ordering::Relaxed);
        }
        if lost {
            // The registry no longer knows it: a real executor would register
            // again; here it leaves the fleet (and shows up in the checks).
            self.fleet.lost.fetch_add(1, Ordering::Relaxed);
        } else {
            self.retry_soon(slot);
        }
    }
}

async fn next_result(stream: Option<&mut StreamState>) -> Result<Option<HeartbeatResult>, Status> {
    match stream {
        Some(st) => st.stream.next().await,
        None => std::future::pending().await,
    }
}

/// What the watch saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WatchSummary {
    /// ONLINE events (any executor).
    pub online_events: u64,
    /// RUNNING events (any executor): first heartbeats.
    pub running_events: u64,
    /// OFFLINE events (any executor).
    pub offline_events: u64,
    /// Watches opened again after the stream ended.
    pub rewatches: u64,
    /// Of those, ended by the server for lagging (RESOURCE_EXHAUSTED).
    pub lagged: u64,
    /// Re-watches that resumed from the registry's history (no event
    /// missed, nothing to reconcile).
    pub resumes: u64,
    /// Re-watches that began with a new snapshot (reconciled: executors
    /// missing from it went OFFLINE in the gap).
    pub resnapshots: u64,
    /// Events out of order; each ended a watch.
    pub gaps: u64,
    /// Snapshots or events whose revision went below one handed on before
    /// (never, across restarts and leader terms too).
    pub backwards: u64,
    /// The highest revision the watch saw.
    pub highest_revision: u64,
    /// Executors found missing from a re-watch snapshot (counted OFFLINE at
    /// the snapshot's arrival: an approximate time).
    pub missing_from_snapshot: u64,
    /// Executors in the largest snapshot received.
    pub largest_snapshot: u64,
    /// Seconds to receive the first snapshot.
    pub first_snapshot_s: f64,
    /// Stream failures by code.
    pub errors: Tally,
}

/// Stamps OFFLINE events and reconciles re-watch snapshots (a resumed
/// watch needs no reconciling: it missed nothing).
struct FleetWatch {
    fleet: Arc<Fleet>,
    summary: WatchSummary,
}

impl watch::Observer for FleetWatch {
    fn seen(&mut self, seen: watch::Seen<'_>) {
        let (fleet, out) = (&*self.fleet, &mut self.summary);
        match seen {
            watch::Seen::Snapshot {
                snapshot,
                first,
                opened,
            } => {
                out.largest_snapshot = out.largest_snapshot.max(snapshot.executors.len() as u64);
                if !first {
                    let opened_us =
                        opened.saturating_duration_since(fleet.start).as_micros() as u64 + 1;
                    out.missing_from_snapshot += reconcile(fleet, snapshot, opened_us);
                }
            }
            watch::Seen::Event(event) => {
                if event.r#type == proto::EventType::Online as i32 {
                    out.online_events += 1;
                } else if event.r#type == proto::EventType::Running as i32 {
                    out.running_events += 1;
                } else if event.r#type == proto::EventType::Offline as i32 {
                    out.offline_events += 1;
                    if let Some(index) = fleet.index_of(&event.executor_id) {
                        let reason = match proto::OfflineReason::try_from(event.reason) {
                            Ok(proto::OfflineReason::Expired) => REASON_EXPIRED,
                            Ok(proto::OfflineReason::Deregistered) => REASON_DEREGISTERED,
                            _ => REASON_OTHER,
                        };
                        fleet.mark_offline(index, fleet.now_us(), reason);
                    }
                }
            }
        }
    }
}

/// After a re-watch: executors registered before the watch opened that are
/// neither in the snapshot nor already seen OFFLINE went OFFLINE in the gap.
fn reconcile(fleet: &Fleet, snapshot: &proto::Snapshot, opened_us: u64) -> u64 {
    let mut present = vec![false; fleet.len()];
    for executor in &snapshot.executors {
        if let Some(index) = fleet.index_of(&executor.id) {
            present[index] = true;
        }
    }
    let now = fleet.now_us();
    let mut missing = 0;
    for (index, &here) in present.iter().enumerate() {
        let registered = fleet.registered_us[index].load(Ordering::Relaxed);
        if !here
            && registered != 0
            && registered < opened_us
            && fleet.mark_offline(index, now, REASON_MISSING)
        {
            missing += 1;
        }
    }
    missing
}

/// Registration phase figures.
#[derive(Debug, Clone, Serialize)]
pub struct RegistrationSummary {
    /// Executors registered.
    pub registered: u64,
    /// Executors that failed every attempt.
    pub failed: u64,
    /// Seconds from the first request to the last answer.
    pub seconds: f64,
    /// `registered / seconds`.
    pub per_s: f64,
    /// Per call, send to answer.
    pub latency: Latency,
}

/// Heartbeat figures.
#[derive(Debug, Clone, Serialize)]
pub struct HeartbeatSummary {
    /// OK heartbeats in the heartbeat phase.
    pub ok: u64,
    /// Failed heartbeats (whole run).
    pub failed: u64,
    /// Executors the registry no longer knew (UNKNOWN/EXPIRED answers).
    pub lost: u64,
    /// Heartbeats sent later than their executor's last OK + TTL.
    pub late_sends: u64,
    /// Length of the heartbeat phase.
    pub seconds: f64,
    /// `ok / seconds`.
    pub per_s: f64,
    /// Suggested interval at the end (ms).
    pub interval_ms: u64,
    /// Largest TTL asked for (ms).
    pub max_ttl_ms: u64,
    /// Per call (unary, batch) or per message (stream), send to answer.
    pub latency: Latency,
    /// How late heartbeats went out after their due time (client backlog).
    pub slip: Latency,
}

/// Expiry checks.
#[derive(Debug, Clone, Serialize)]
pub struct ExpirySummary {
    /// Executors in the killed set (registered ones).
    pub killed: u64,
    /// Killed and seen OFFLINE after the kill.
    pub killed_offline: u64,
    /// Killed and never seen OFFLINE.
    pub killed_not_offline: u64,
    /// Killed, OFFLINE more than TTL + the allowance after the last OK
    /// heartbeat.
    pub killed_late: u64,
    /// Killed, OFFLINE more than the registry's clock granularity (1 ms)
    /// before last OK heartbeat + TTL.
    pub killed_premature: u64,
    /// Killed before any OK heartbeat (no lag to measure).
    pub killed_without_heartbeat: u64,
    /// OFFLINE time − (last OK heartbeat sent + TTL), milliseconds.
    pub lag_ms: LagSummary,
    /// When the killed set stopped heartbeating, milliseconds since the
    /// Unix epoch (0: nobody was killed).
    pub kill_unix_ms: u64,
    /// When the last killed executor went OFFLINE, milliseconds since the
    /// Unix epoch (0: none did): to set against an outside event, such as
    /// a new leader serving.
    pub last_killed_offline_unix_ms: u64,
    /// Executors that kept heartbeating on time (or were not yet stopped)
    /// and went OFFLINE anyway: the registry's fault (or the transport's).
    pub false_expirations: u64,
    /// Executors not killed that went OFFLINE after the generator sent one
    /// of their heartbeats later than last OK + TTL: the load generator fell
    /// behind, so these say nothing against the registry, but the run did
    /// not test what it was meant to.
    pub expired_after_late_send: u64,
    /// Executors not killed, whose heartbeats all went out on time, that went
    /// OFFLINE and had a heartbeat refused only after its deadline had
    /// passed: the slack (TTL − interval) was spent in queues between the
    /// generator and the registry's table.
    pub expired_answered_late: u64,
    /// Why this fleet's executors went OFFLINE, as the watch told.
    pub offline_reasons: Tally,
}

/// Distribution of expiry lag, ms.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LagSummary {
    /// Values.
    pub count: u64,
    /// Smallest (negative = premature).
    pub min: f64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl LagSummary {
    fn of(mut lags_us: Vec<i64>) -> Self {
        if lags_us.is_empty() {
            return Self::default();
        }
        lags_us.sort_unstable();
        let at = |q: f64| {
            let i = ((lags_us.len() as f64 * q).ceil() as usize).clamp(1, lags_us.len()) - 1;
            lags_us[i] as f64 / 1_000.0
        };
        Self {
            count: lags_us.len() as u64,
            min: lags_us[0] as f64 / 1_000.0,
            p50: at(0.5),
            p99: at(0.99),
            max: lags_us[lags_us.len() - 1] as f64 / 1_000.0,
        }
    }
}

/// The server's memory, from its `/metrics`.
#[derive(Debug, Clone, Serialize)]
pub struct ServerMemory {
    /// Before registration.
    pub before: ServerSample,
    /// Some seconds after registration finished.
    pub after_registration: Option<ServerSample>,
    /// At the end of the run.
    pub at_end: Option<ServerSample>,
    /// RSS growth over registration ÷ executors registered.
    pub bytes_per_executor: Option<f64>,
    /// Why a later sample is missing.
    pub error: Option<String>,
}

/// Everything a fleet run measured.
#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    /// Registry measured.
    pub endpoint: String,
    /// Transport.
    pub mode: Mode,
    /// Fleet size.
    pub executors: usize,
    /// Connections (plus one for the watch).
    pub connections: usize,
    /// In flight per connection.
    pub inflight: usize,
    /// Batch size (batch mode).
    pub batch_size: usize,
    /// TTL asked for: `3 × interval` or a fixed duration.
    pub ttl: String,
    /// Share killed.
    pub kill_fraction: f64,
    /// Seconds from start to end.
    pub total_seconds: f64,
    /// Registration.
    pub registration: RegistrationSummary,
    /// Heartbeats.
    pub heartbeats: HeartbeatSummary,
    /// Expiry checks.
    pub expiry: ExpirySummary,
    /// The watch.
    pub watch: WatchSummary,
    /// Failures by gRPC code or per-item status.
    pub errors: Tally,
    /// Server memory, if `--metrics` was given.
    pub server: Option<ServerMemory>,
    /// Whether every check passed.
    pub passed: bool,
    /// The checks that failed.
    pub failures: Vec<String>,
}

/// Runs the simulation described by `config`.
pub async fn run(config: &FleetConfig) -> anyhow::Result<FleetReport> {
    let n = config.executors;
    ensure!(n > 0, "--executors must be at least 1");
    ensure!(n < u32::MAX as usize, "--executors must fit in 32 bits");
    ensure!(config.connections > 0, "--connections must be at least 1");
    ensure!(
        (0.0..=1.0).contains(&config.kill_fraction),
        "--kill-fraction must be within [0, 1]"
    );
    let clients =
        client::connect_with(&config.endpoint, config.connections, config.tls.as_ref()).await?;
    let watch_client = client::connect_with(&config.endpoint, 1, config.tls.as_ref())
        .await?
        .pop()
        .context("one watch connection")?;
    let memory_before = match &config.metrics {
        Some(url) => Some(
            prom::sample(url)
                .await
                .with_context(|| format!("reading {url}"))?,
        ),
        None => None,
    };

    let mut rng = SmallRng::from_os_rng();
    let mut killed = vec![false; n];
    let kill_count = (n as f64 * config.kill_fraction).round() as usize;
    for i in rand::seq::index::sample(&mut rng, n, kill_count.min(n)) {
        killed[i] = true;
    }
    let fleet = Arc::new(Fleet {
        start: Instant::now(),
        start_unix_us: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64),
        prefix: format!("lt{:08x}x", rng.random::<u32>()),
        killed,
        fixed_ttl_ms: config.ttl.map(|t| t.as_millis() as u64),
        registered_us: atomics(n),
        last_ok_us: atomics(n),
        ttl_ms: atomics(n),
        offline_us: atomics(n),
        offline_reason: atomics(n),
        late: atomics(n),
        kill_us: AtomicU64::new(0),
        interval_ms: AtomicU64::new(500),
        max_ttl_ms: AtomicU64::new(0),
        registered: AtomicU64::new(0),
        register_failed: AtomicU64::new(0),
        beats_ok: AtomicU64::new(0),
        beats_failed: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        late_sends: AtomicU64::new(0),
        worst_latency_us: AtomicU64::new(0),
        offline_killed: AtomicU64::new(0),
        offline_false: AtomicU64::new(0),
        stop: CancellationToken::new(),
    });

    let watch_stop = CancellationToken::new();
    let watch = watch::start(
        watch_client,
        watch_stop.clone(),
        FleetWatch {
            fleet: fleet.clone(),
            summary: WatchSummary::default(),
        },
    )
    .await?;

    // Registration; heartbeats start as registrations return.
    let register_start = Instant::now();
    let c = config.connections;
    let mut workers = Vec::with_capacity(c);
    for (w, client) in clients.into_iter().enumerate() {
        let slots = n.saturating_sub(w).div_ceil(c);
        let worker = Worker {
            fleet: fleet.clone(),
            client,
            first: w,
            stride: c,
            slots: slots as u32,
            mode: config.mode,
            inflight: config.inflight.max(1),
            batch_size: config.batch_size.max(1),
            register_cap: (config.register_concurrency / c).max(1),
            ids: vec![String::new(); slots],
            due_us: vec![0; slots],
            wheel: Wheel::new(WHEEL_SLOTS, TICK_US, fleet.now_us()),
            pending: VecDeque::new(),
            next_register: 0,
            register_retry: Vec::new(),
            reopen_at: None,
            rng: SmallRng::seed_from_u64(rng.random()),
            out: WorkerOutput {
                beat_latency: stats::histogram(),
                slip: stats::histogram(),
                register_latency: stats::histogram(),
                errors: Tally::default(),
            },
        };
        workers.push(tokio::spawn(worker.run()));
    }
    let bar = if config.progress {
        let bar = ProgressBar::new(n as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "registering [{elapsed_precise}] {bar:40} {human_pos}/{human_len} ({per_sec}, eta {eta})",
            )
            .expect("the template is valid"),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut next_line = Instant::now() + config.progress_every;
    loop {
        let done = fleet.registered.load(Ordering::Relaxed)
            + fleet.register_failed.load(Ordering::Relaxed);
        bar.set_position(done);
        if done >= n as u64 {
            break;
        }
        if workers.iter().all(|w| w.is_finished()) {
            bail!("every worker stopped before registration finished");
        }
        if config.progress && bar.is_hidden() && Instant::now() >= next_line {
            next_line += config.progress_every;
            eprintln!(
                "[{:>7.1}s] registering {done}/{n} ({:.0}/s)",
                fleet.start.elapsed().as_secs_f64(),
                done as f64 / register_start.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bar.finish_and_clear();
    let register_seconds = register_start.elapsed().as_secs_f64();
    let registered = fleet.registered.load(Ordering::Relaxed);
    if config.progress {
        eprintln!(
            "[{:>7.1}s] registered {registered}/{n} in {register_seconds:.1} s ({:.0}/s), interval {} ms",
            fleet.start.elapsed().as_secs_f64(),
            registered as f64 / register_seconds,
            fleet.interval_ms.load(Ordering::Relaxed),
        );
    }

    // Memory a little after registration (process metrics are sampled).
    let memory_task = config.metrics.clone().map(|url| {
        tokio::spawn(async move {
            tokio::time::sleep(MEMORY_SAMPLE_DELAY).await;
            prom::sample(&url).await
        })
    });

    // Heartbeat phase: kill at half, end at `duration` or TTL + slack after
    // the kill, whichever is later (at `duration` when nobody is killed:
    // there is no expiry to wait for).
    let beat_start = Instant::now();
    let beats_at_start = fleet.beats_ok.load(Ordering::Relaxed);
    let kill_at = beat_start + config.duration / 2;
    let mut killed_at: Option<Instant> = None;
    let mut next_line = beat_start + config.progress_every;
    let (mut last_t, mut last_beats) = (beat_start, beats_at_start);
    loop {
        let now = Instant::now();
        if killed_at.is_none() && now >= kill_at {
            fleet.kill_us.store(fleet.now_us(), Ordering::Relaxed);
            killed_at = Some(now);
            if config.progress {
                eprintln!(
                    "[{:>7.1}s] stopping heartbeats of {kill_count} executors",
                    fleet.start.elapsed().as_secs_f64()
                );
            }
        }
        if let Some(k) = killed_at {
            let ttl = Duration::from_millis(fleet.max_ttl_ms.load(Ordering::Relaxed));
            let expiries_seen = if kill_count == 0 {
                k
            } else {
                k + ttl + EXPIRY_SLACK
            };
            if now >= (beat_start + config.duration).max(expiries_seen) {
                break;
            }
        }
        if config.progress && now >= next_line {
            next_line += config.progress_every;
            let beats = fleet.beats_ok.load(Ordering::Relaxed);
            eprintln!(
                "[{:>7.1}s] heartbeats {:>9.0}/s  worst {:>5} ms  interval {} ms  failed {}  lost {}  sent late {}  offline: killed {}/{kill_count}, other {}",
                fleet.start.elapsed().as_secs_f64(),
                (beats - last_beats) as f64 / (now - last_t).as_secs_f64(),
                fleet.worst_latency_us.swap(0, Ordering::Relaxed) / 1_000,
                fleet.interval_ms.load(Ordering::Relaxed),
                fleet.beats_failed.load(Ordering::Relaxed),
                fleet.lost.load(Ordering::Relaxed),
                fleet.late_sends.load(Ordering::Relaxed),
                fleet.offline_killed.load(Ordering::Relaxed),
                fleet.offline_false.load(Ordering::Relaxed),
            );
            (last_t, last_beats) = (now, beats);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let beat_seconds = beat_start.elapsed().as_secs_f64();
    let beats_ok = fleet.beats_ok.load(Ordering::Relaxed) - beats_at_start;
    fleet.stop.cancel();
    watch_stop.cancel();

    let mut beat_latency = stats::histogram();
    let mut slip = stats::histogram();
    let mut register_latency = stats::histogram();
    let mut errors = Tally::default();
    for worker in workers {
        let out = worker.await.context("a worker panicked")?;
        beat_latency.add(&out.beat_latency).expect("same bounds");
        slip.add(&out.slip).expect("same bounds");
        register_latency
            .add(&out.register_latency)
            .expect("same bounds");
        errors.merge(&out.errors);
    }
    let (counts, observer) = watch.await.context("the watch task panicked")?;
    let watch = WatchSummary {
        rewatches: counts.rewatches,
        lagged: counts.lagged,
        resumes: counts.resumes,
        resnapshots: counts.resnapshots,
        gaps: counts.gaps,
        backwards: counts.backwards,
        highest_revision: counts.highest_revision,
        first_snapshot_s: counts.first_snapshot_s,
        errors: counts.errors,
        ..observer.summary
    };
    errors.merge(&watch.errors);

    let server = match (memory_before, &config.metrics) {
        (Some(before), Some(url)) => {
            let mut error = None;
            let after_registration = match memory_task {
                Some(task) => match task.await {
                    Ok(Ok(sample)) => Some(sample),
                    Ok(Err(e)) => {
                        error = Some(format!("{e:#}"));
                        None
                    }
                    Err(e) => {
                        error = Some(e.to_string());
                        None
                    }
                },
                None => None,
            };
            let at_end = prom::sample(url).await.ok();
            let bytes_per_executor = after_registration
                .filter(|_| registered > 0)
                .map(|a| (a.rss_bytes - before.rss_bytes) / registered as f64);
            Some(ServerMemory {
                before,
                after_registration,
                at_end,
                bytes_per_executor,
                error,
            })
        }
        _ => None,
    };

    let expiry = check_expiry(&fleet, config.expiry_allowance);
    let mut failures = Vec::new();
    if registered == 0 {
        failures.push("no executor registered".to_owned());
    }
    if expiry.false_expirations > 0 {
        failures.push(format!(
            "{} executors went OFFLINE while heartbeating (false expirations)",
            expiry.false_expirations
        ));
    }
    if watch.backwards > 0 {
        failures.push(format!(
            "the watch saw a revision go backwards {} times",
            watch.backwards
        ));
    }
    if expiry.expired_after_late_send > 0 {
        failures.push(format!(
            "{} executors expired after the load generator sent a heartbeat later than \
             last OK + TTL (send slip p99 {} ms): the generator could not offer this load \
             on this machine; lower the server's --max-heartbeats-per-second or use batch mode",
            expiry.expired_after_late_send,
            slip.value_at_quantile(0.99) / 1_000
        ));
    }
    if expiry.expired_answered_late > 0 {
        failures.push(format!(
            "{} executors expired although every heartbeat went out on time: one was refused \
             after its deadline (heartbeat latency p99.9 {} ms), so the slack TTL − interval \
             was spent in queues on this machine",
            expiry.expired_answered_late,
            beat_latency.value_at_quantile(0.999) / 1_000
        ));
    }
    kill_failures(
        expiry.killed_not_offline,
        expiry.killed_late,
        expiry.killed_premature,
        config.expiry_allowance,
        &mut failures,
    );
    Ok(FleetReport {
        endpoint: config.endpoint.clone(),
        mode: config.mode,
        executors: n,
        connections: config.connections,
        inflight: config.inflight,
        batch_size: config.batch_size,
        ttl: match config.ttl {
            Some(t) => humantime::format_duration(t).to_string(),
            None => "3 × interval".to_owned(),
        },
        kill_fraction: config.kill_fraction,
        total_seconds: fleet.start.elapsed().as_secs_f64(),
        registration: RegistrationSummary {
            registered,
            failed: fleet.register_failed.load(Ordering::Relaxed),
            seconds: register_seconds,
            per_s: registered as f64 / register_seconds.max(1e-9),
            latency: Latency::of(&register_latency),
        },
        heartbeats: HeartbeatSummary {
            ok: beats_ok,
            failed: fleet.beats_failed.load(Ordering::Relaxed),
            lost: fleet.lost.load(Ordering::Relaxed),
            late_sends: fleet.late_sends.load(Ordering::Relaxed),
            seconds: beat_seconds,
            per_s: beats_ok as f64 / beat_seconds.max(1e-9),
            interval_ms: fleet.interval_ms.load(Ordering::Relaxed),
            max_ttl_ms: fleet.max_ttl_ms.load(Ordering::Relaxed),
            latency: Latency::of(&beat_latency),
            slip: Latency::of(&slip),
        },
        expiry,
        watch,
        errors,
        server,
        passed: failures.is_empty(),
        failures,
    })
}

fn check_expiry(fleet: &Fleet, allowance: Duration) -> ExpirySummary {
    let kill_us = fleet.kill_us.load(Ordering::Relaxed);
    let allowance_us = allowance.as_micros() as i64;
    let unix_ms = |us: u64| (fleet.start_unix_us + us) / 1_000;
    let mut s = ExpirySummary {
        killed: 0,
        killed_offline: 0,
        killed_not_offline: 0,
        killed_late: 0,
        killed_premature: 0,
        killed_without_heartbeat: 0,
        lag_ms: LagSummary::default(),
        kill_unix_ms: if kill_us == 0 { 0 } else { unix_ms(kill_us) },
        last_killed_offline_unix_ms: 0,
        false_expirations: 0,
        expired_after_late_send: 0,
        expired_answered_late: 0,
        offline_reasons: Tally::default(),
    };
    let mut lags = Vec::new();
    for index in 0..fleet.len() {
        if fleet.registered_us[index].load(Ordering::Relaxed) == 0 {
            continue;
        }
        let offline = fleet.offline_us[index].load(Ordering::Relaxed);
        if offline != 0 {
            let reason = match fleet.offline_reason[index].load(Ordering::Relaxed) {
                REASON_EXPIRED => "expired",
                REASON_DEREGISTERED => "deregistered",
                REASON_MISSING => "missing_from_snapshot",
                _ => "other",
            };
            s.offline_reasons.add(reason, 1);
        }
        let late = fleet.late[index].load(Ordering::Relaxed);
        let classify_unexpected = |s: &mut ExpirySummary| {
            if late & SENT_LATE != 0 {
                s.expired_after_late_send += 1;
            } else if late & ANSWERED_LATE != 0 {
                s.expired_answered_late += 1;
            } else {
                s.false_expirations += 1;
            }
        };
        if !fleet.killed[index] || kill_us == 0 {
            if offline != 0 {
                classify_unexpected(&mut s);
            }
            continue;
        }
        s.killed += 1;
        if offline == 0 {
            s.killed_not_offline += 1;
            continue;
        }
        if offline < kill_us {
            classify_unexpected(&mut s);
            continue;
        }
        s.killed_offline += 1;
        s.last_killed_offline_unix_ms = s.last_killed_offline_unix_ms.max(unix_ms(offline));
        let last = fleet.last_ok_us[index].load(Ordering::Relaxed);
        if last == 0 {
            s.killed_without_heartbeat += 1;
            continue;
        }
        let deadline = last + u64::from(fleet.ttl_ms[index].load(Ordering::Relaxed)) * 1_000;
        let lag = offline as i64 - deadline as i64;
        if lag < -(CLOCK_GRANULARITY.as_micros() as i64) {
            s.killed_premature += 1;
        } else if lag > allowance_us {
            s.killed_late += 1;
        }
        lags.push(lag);
    }
    s.lag_ms = LagSummary::of(lags);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_summary_takes_nearest_rank_percentiles() {
        let lags: Vec<i64> = (1..=100).map(|ms| ms * 1_000).collect();
        let s = LagSummary::of(lags);
        assert_eq!(s.count, 100);
        assert_eq!(s.p50, 50.0);
        assert_eq!(s.p99, 99.0);
        assert_eq!(s.max, 100.0);
        assert_eq!(s.min, 1.0);
    }

    #[test]
    fn register_requests_are_valid_for_the_registry() {
        let r = register_request("lt0000abcdx", 12);
        assert_eq!(r.name, "lt0000abcdx12");
        assert_eq!(r.labels.len(), 2);
        assert!(r.address.starts_with("127.0.0.1:"));
    }
}
