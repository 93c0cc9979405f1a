//! The churn soak: a fleet of constant size whose members keep changing,
//! for a long time, with the server's memory sampled along the way.
//!
//! Owns: the slots of the fleet (each holds one incarnation of an executor
//! at a time), the churn decisions, the expectations the watch checks
//! OFFLINE events against, and the memory curve.
//!
//! Shape: as in [`crate::fleet`], one worker task per connection owns the
//! slots `w, w + C, …` and keeps each slot's next action in a timing wheel;
//! heartbeats travel as `HeartbeatBatch` calls. When a live slot comes due,
//! and only then (it has no call in flight, so its last OK heartbeat is
//! final), the worker draws its fate: with the probability that makes
//! `kill_rate` per second over the fleet it is *killed* (it stops
//! heartbeating, without deregistering; after its TTL + 1 s + a margin the
//! slot registers a new executor); with the probability that makes
//! `churn_rate` per second it *deregisters* and the slot registers a new
//! executor at once; otherwise it heartbeats. So the live set stays close to
//! `executors` while the whole fleet turns over.
//!
//! Verification, from a watch: every killed executor goes OFFLINE no earlier
//! than last OK heartbeat (sent) + TTL and no later than 1 s after; every
//! deregistered one goes OFFLINE; no other executor of the run goes OFFLINE
//! (a false expiration, unless the generator itself sent a heartbeat late).
//!
//! Memory: `/metrics` is sampled every `sample_every`. The baseline is the
//! first sample after `warmup` (the fleet registered and heartbeating, no
//! churn yet); at the end churn stops, killed slots expire and are replaced,
//! and the final sample is taken at the same live-set size. The verdict
//! wants the final RSS within `max_rss_growth` of the baseline.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use executor_registry::proto::{self, DeregisterRequest, HeartbeatResult};
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::client::{self, Client};
use crate::fleet::{CLOCK_GRANULARITY, EXPIRY_ALLOWANCE, kill_failures};
use crate::prom;
use crate::stats::{self, Latency, Tally};
use crate::watch;
use crate::wheel::Wheel;

/// Wheel resolution.
const TICK_US: u64 = 5_000;
/// Wheel slots: 16,384 × 5 ms ≈ 82 s of horizon.
const WHEEL_SLOTS: usize = 16_384;
/// A killed slot registers again this long after its deadline + allowance.
const REPLACE_MARGIN: Duration = Duration::from_millis(500);

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// The registry's gRPC endpoint.
    pub endpoint: String,
    /// Its Prometheus endpoint, `http://host:port/metrics`.
    pub metrics: String,
    /// Live-set size.
    pub executors: usize,
    /// Connections for registrations and heartbeats (the watch has its own).
    pub connections: usize,
    /// Churn phase length (after warm-up).
    pub duration: Duration,
    /// Heartbeats without churn after registration, before the baseline.
    pub warmup: Duration,
    /// TTL every heartbeat asks for.
    pub ttl: Duration,
    /// Deregistrations (each followed by a new registration) per second.
    pub churn_rate: f64,
    /// Kills (heartbeats stop, no deregistration) per second.
    pub kill_rate: f64,
    /// Period of memory samples.
    pub sample_every: Duration,
    /// Most final RSS ÷ baseline RSS − 1 that passes.
    pub max_rss_growth: f64,
    /// Wait before the baseline and the final sample, so the server's
    /// `process_*` metrics (sampled every 5 s) describe the moment.
    pub settle: Duration,
    /// Registrations in flight, over all connections.
    pub register_concurrency: usize,
    /// Batch calls in flight per connection.
    pub inflight: usize,
    /// Heartbeats per batch call (at most).
    pub batch_size: usize,
    /// Progress lines on stderr.
    pub progress: bool,
}

impl SoakConfig {
    /// Defaults for `executors` executors.
    pub fn new(endpoint: impl Into<String>, metrics: impl Into<String>, executors: usize) -> Self {
        Self {
            endpoint: endpoint.into(),
            metrics: metrics.into(),
            executors,
            connections: 4,
            duration: Duration::from_secs(30 * 60),
            warmup: Duration::from_secs(30),
            ttl: Duration::from_secs(15),
            churn_rate: 50.0,
            kill_rate: 10.0,
            sample_every: Duration::from_secs(30),
            max_rss_growth: 0.10,
            settle: Duration::from_secs(6),
            register_concurrency: 512,
            inflight: 8,
            batch_size: 1_000,
            progress: false,
        }
    }
}

/// What the watch expects next for an executor of the run.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// A Deregister call was (or is being) sent.
    Deregistered,
    /// Heartbeats stopped; OFFLINE due at `deadline_us` (last OK sent + TTL).
    Killed { deadline_us: u64 },
}

/// Shared by the workers, the watch and the driver.
struct Shared {
    start: Instant,
    prefix: String,
    ttl_ms: u64,
    churn_rate: f64,
    kill_rate: f64,
    interval_ms: AtomicU64,
    churning: AtomicBool,
    expecting: Mutex<HashMap<String, Expect>>,
    /// Ids with a heartbeat sent after last OK + TTL, or refused after it.
    late: Mutex<HashSet<String>>,
    lag_us: Mutex<Histogram<u64>>,
    live: AtomicU64,
    registered: AtomicU64,
    register_failed: AtomicU64,
    deregistered: AtomicU64,
    killed: AtomicU64,
    beats_ok: AtomicU64,
    beats_failed: AtomicU64,
    lost: AtomicU64,
    killed_offline: AtomicU64,
    killed_late: AtomicU64,
    killed_premature: AtomicU64,
    deregistered_offline: AtomicU64,
    false_expirations: AtomicU64,
    expired_after_late: AtomicU64,
    false_examples: Mutex<Vec<String>>,
    stop: CancellationToken,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64 + 1
    }

    fn is_ours(&self, id: &str) -> bool {
        id.starts_with(&self.prefix)
    }

    fn on_offline(&self, id: &str, reason: i32) {
        if !self.is_ours(id) {
            return;
        }
        let now = self.now_us();
        let expected = self.expecting.lock().expect("not poisoned").remove(id);
        match expected {
            Some(Expect::Killed { deadline_us }) => {
                self.killed_offline.fetch_add(1, Ordering::Relaxed);
                let lag = now as i64 - deadline_us as i64;
                if lag < -(CLOCK_GRANULARITY.as_micros() as i64) {
                    self.killed_premature.fetch_add(1, Ordering::Relaxed);
                } else if lag > EXPIRY_ALLOWANCE.as_micros() as i64 {
                    self.killed_late.fetch_add(1, Ordering::Relaxed);
                }
                stats::record(
                    &mut self.lag_us.lock().expect("not poisoned"),
                    lag.max(0) as u64,
                );
            }
            Some(Expect::Deregistered) if reason == proto::OfflineReason::Deregistered as i32 => {
                self.deregistered_offline.fetch_add(1, Ordering::Relaxed);
            }
            Some(Expect::Deregistered) | None => {
                if self.late.lock().expect("not poisoned").contains(id) {
                    self.expired_after_late.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.false_expirations.fetch_add(1, Ordering::Relaxed);
                    let mut examples = self.false_examples.lock().expect("not poisoned");
                    if examples.len() < 10 {
                        examples.push(id.to_owned());
                    }
                }
            }
        }
    }

    fn mark_late(&self, id: &str) {
        self.late
            .lock()
            .expect("not poisoned")
            .insert(id.to_owned());
    }

    /// Probability per due event of an action happening `rate` times per
    /// second over the fleet: each live slot comes due once per interval.
    fn chance(&self, rate: f64, fleet: usize) -> f64 {
        let interval_s = self.interval_ms.load(Ordering::Relaxed).max(1) as f64 / 1_000.0;
        (rate * interval_s / fleet.max(1) as f64).clamp(0.0, 1.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// Waiting for (or in) a Register call.
    Registering,
    /// Heartbeating.
    Live,
    /// Deregister call in flight.
    Leaving,
    /// Killed; in the wheel until its replacement is due.
    Dead,
}

struct Slot {
    id: String,
    generation: u32,
    last_ok_us: u64,
    state: SlotState,
}

enum Op {
    Registered {
        slot: u32,
        attempt: u32,
        result: Result<(String, u64), Status>,
    },
    Deregistered {
        slot: u32,
        result: Result<(), Status>,
    },
    Batch {
        slots: Vec<u32>,
        sent_us: u64,
        result: Result<Vec<HeartbeatResult>, Status>,
    },
}
type OpFuture = Pin<Box<dyn Future<Output = Op> + Send>>;

struct Worker {
    shared: Arc<Shared>,
    client: Client,
    first: usize,
    stride: usize,
    fleet: usize,
    slots: Vec<Slot>,
    wheel: Wheel,
    pending: VecDeque<u32>,
    to_register: VecDeque<(u32, u32)>,
    registering: usize,
    register_cap: usize,
    batches: usize,
    inflight: usize,
    batch_size: usize,
    rng: SmallRng,
    beat_latency: Histogram<u64>,
    errors: Tally,
}

struct WorkerOutput {
    beat_latency: Histogram<u64>,
    errors: Tally,
}

impl Worker {
    fn name(&self, slot: u32) -> String {
        let s = &self.slots[slot as usize];
        format!(
            "{}{}g{}",
            self.shared.prefix,
            self.first + slot as usize * self.stride,
            s.generation
        )
    }

    async fn run(mut self) -> WorkerOutput {
        let mut tick = tokio::time::interval(Duration::from_micros(TICK_US));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut ops: FuturesUnordered<OpFuture> = FuturesUnordered::new();
        let stop = self.shared.stop.clone();
        let mut due = Vec::new();
        loop {
            self.start_registrations(&mut ops);
            self.send_batches(&mut ops);
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {
                    self.wheel.advance(self.shared.now_us(), &mut due);
                    for slot in due.drain(..) {
                        self.on_due(slot, &mut ops);
                    }
                }
                Some(op) = ops.next(), if !ops.is_empty() => self.on_op(op),
            }
        }
        WorkerOutput {
            beat_latency: self.beat_latency,
            errors: self.errors,
        }
    }

    fn start_registrations(&mut self, ops: &mut FuturesUnordered<OpFuture>) {
        while self.registering < self.register_cap {
            let Some((slot, attempt)) = self.to_register.pop_front() else {
                return;
            };
            self.registering += 1;
            let index = self.first + slot as usize * self.stride;
            let mut request = crate::fleet::register_request("", index);
            request.name = self.name(slot);
            let mut client = self.client.clone();
            ops.push(Box::pin(async move {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                }
                let result = client::register(&mut client, request).await;
                Op::Registered {
                    slot,
                    attempt,
                    result,
                }
            }));
        }
    }

    fn send_batches(&mut self, ops: &mut FuturesUnordered<OpFuture>) {
        while self.batches < self.inflight && !self.pending.is_empty() {
            let now = self.shared.now_us();
            let take = self.pending.len().min(self.batch_size);
            let slots: Vec<u32> = self.pending.drain(..take).collect();
            let mut requests = Vec::with_capacity(slots.len());
            for &slot in &slots {
                let s = &self.slots[slot as usize];
                if s.last_ok_us != 0 && now > s.last_ok_us + self.shared.ttl_ms * 1_000 {
                    self.shared.mark_late(&s.id);
                }
                requests.push(client::heartbeat_request(&s.id, self.shared.ttl_ms));
            }
            self.batches += 1;
            let mut client = self.client.clone();
            ops.push(Box::pin(async move {
                let result = client::batch(&mut client, requests).await;
                Op::Batch {
                    slots,
                    sent_us: now,
                    result,
                }
            }));
        }
    }

    fn on_due(&mut self, slot: u32, ops: &mut FuturesUnordered<OpFuture>) {
        match self.slots[slot as usize].state {
            SlotState::Dead => self.replace(slot),
            SlotState::Live => {
                let churning = self.shared.churning.load(Ordering::Relaxed);
                let draw: f64 = self.rng.random();
                let p_kill = self.shared.chance(self.shared.kill_rate, self.fleet);
                let p_leave = self.shared.chance(self.shared.churn_rate, self.fleet);
                let s = &mut self.slots[slot as usize];
                if churning && s.last_ok_us != 0 && draw < p_kill {
                    let deadline_us = s.last_ok_us + self.shared.ttl_ms * 1_000;
                    self.shared
                        .expecting
                        .lock()
                        .expect("not poisoned")
                        .insert(s.id.clone(), Expect::Killed { deadline_us });
                    s.state = SlotState::Dead;
                    self.shared.killed.fetch_add(1, Ordering::Relaxed);
                    self.shared.live.fetch_sub(1, Ordering::Relaxed);
                    let replace_at =
                        deadline_us + (EXPIRY_ALLOWANCE + REPLACE_MARGIN).as_micros() as u64;
                    self.wheel.insert(replace_at, slot);
                } else if churning && draw < p_kill + p_leave {
                    self.shared
                        .expecting
                        .lock()
                        .expect("not poisoned")
                        .insert(s.id.clone(), Expect::Deregistered);
                    s.state = SlotState::Leaving;
                    self.shared.live.fetch_sub(1, Ordering::Relaxed);
                    let request = DeregisterRequest {
                        executor_id: s.id.clone(),
                    };
                    let mut client = self.client.clone();
                    ops.push(Box::pin(async move {
                        let result = client.deregister(request).await.map(|_| ());
                        Op::Deregistered { slot, result }
                    }));
                } else {
                    self.pending.push_back(slot);
                }
            }
            SlotState::Registering | SlotState::Leaving => {}
        }
    }

    /// A new executor in `slot`.
    fn replace(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        s.generation += 1;
        s.last_ok_us = 0;
        s.state = SlotState::Registering;
        self.to_register.push_back((slot, 0));
    }

    fn on_op(&mut self, op: Op) {
        let now = self.shared.now_us();
        match op {
            Op::Registered {
                slot,
                attempt,
                result,
            } => {
                self.registering -= 1;
                match result {
                    Ok((id, interval_ms)) => {
                        if interval_ms > 0 {
                            self.shared
                                .interval_ms
                                .store(interval_ms, Ordering::Relaxed);
                        }
                        self.shared.registered.fetch_add(1, Ordering::Relaxed);
                        self.shared.live.fetch_add(1, Ordering::Relaxed);
                        let s = &mut self.slots[slot as usize];
                        s.id = id;
                        s.state = SlotState::Live;
                        // The first heartbeat at once (the init TTL may be
                        // shorter than ours), then every interval.
                        self.pending.push_back(slot);
                    }
                    Err(status) => {
                        self.errors.add(&stats::code_key("register", &status), 1);
                        if attempt + 1 < 5 {
                            self.to_register.push_back((slot, attempt + 1));
                        } else {
                            self.shared.register_failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            Op::Deregistered { slot, result } => {
                match result {
                    Ok(()) => {
                        self.shared.deregistered.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) => {
                        self.errors.add(&stats::code_key("deregister", &status), 1);
                    }
                }
                self.replace(slot);
            }
            Op::Batch {
                slots,
                sent_us,
                result,
            } => {
                self.batches -= 1;
                match result {
                    Ok(results) if results.len() == slots.len() => {
                        stats::record(&mut self.beat_latency, now.saturating_sub(sent_us));
                        for (slot, item) in slots.into_iter().zip(results) {
                            self.beat_result(slot, sent_us, now, &item);
                        }
                    }
                    other => {
                        let key = match other {
                            Err(status) => stats::code_key("batch", &status),
                            Ok(_) => "batch:wrong_result_count".to_owned(),
                        };
                        self.errors.add(&key, 1);
                        for slot in slots {
                            self.beat_failed(slot, now, false);
                        }
                    }
                }
            }
        }
    }

    fn interval_us(&self) -> u64 {
        self.shared.interval_ms.load(Ordering::Relaxed).max(1) * 1_000
    }

    fn beat_result(&mut self, slot: u32, sent_us: u64, now: u64, item: &HeartbeatResult) {
        if client::is_ok(item.status) {
            self.shared.beats_ok.fetch_add(1, Ordering::Relaxed);
            if item.heartbeat_interval_ms > 0 {
                self.shared
                    .interval_ms
                    .store(item.heartbeat_interval_ms, Ordering::Relaxed);
            }
            let s = &mut self.slots[slot as usize];
            s.last_ok_us = s.last_ok_us.max(sent_us);
            let jitter = self.rng.random_range(0.9..1.1);
            let next = sent_us + (self.interval_us() as f64 * jitter) as u64;
            self.wheel.insert(next, slot);
        } else {
            self.errors
                .add(client::heartbeat_status_name(item.status), 1);
            let lost = item.status == proto::HeartbeatStatus::UnknownExecutor as i32
                || item.status == proto::HeartbeatStatus::Expired as i32;
            self.beat_failed(slot, now, lost);
        }
    }

    fn beat_failed(&mut self, slot: u32, now: u64, lost: bool) {
        self.shared.beats_failed.fetch_add(1, Ordering::Relaxed);
        let s = &self.slots[slot as usize];
        if s.last_ok_us != 0 && now > s.last_ok_us + self.shared.ttl_ms * 1_000 {
            self.shared.mark_late(&s.id);
        }
        if lost {
            // The registry no longer knows it: register a new one (the
            // watch has counted its OFFLINE).
            self.shared.lost.fetch_add(1, Ordering::Relaxed);
            self.shared.live.fetch_sub(1, Ordering::Relaxed);
            self.replace(slot);
        } else {
            let next = now + self.interval_us() / 4;
            self.wheel.insert(next, slot);
        }
    }
}

/// One reading of the server's `/metrics`.
#[derive(Debug, Clone, Serialize)]
pub struct MemorySample {
    /// Seconds since the run started.
    pub t_s: f64,
    /// `registering`, `warmup`, `churn`, `drain` or `final`.
    pub phase: &'static str,
    /// Live executors as the generator counts them.
    pub live: u64,
    /// `registry_executors` (summed over statuses).
    pub server_executors: f64,
    /// `registry_watchers`.
    pub watchers: f64,
    /// `registry_tombstones` (absent from older servers: 0).
    pub tombstones: f64,
    /// `registry_timing_wheel_entries` (absent from older servers: 0).
    pub timing_wheel: f64,
    /// `process_resident_memory_bytes`.
    pub rss_bytes: f64,
    /// `process_cpu_seconds_total`.
    pub cpu_seconds: f64,
    /// Executors killed so far.
    pub killed: u64,
    /// Executors deregistered so far.
    pub deregistered: u64,
}

async fn sample(url: &str, shared: &Shared, phase: &'static str) -> anyhow::Result<MemorySample> {
    let text = prom::fetch(url).await?;
    Ok(MemorySample {
        t_s: shared.start.elapsed().as_secs_f64(),
        phase,
        live: shared.live.load(Ordering::Relaxed),
        server_executors: prom::sum(&text, "registry_executors").unwrap_or(0.0),
        watchers: prom::sum(&text, "registry_watchers").unwrap_or(0.0),
        tombstones: prom::sum(&text, "registry_tombstones").unwrap_or(0.0),
        timing_wheel: prom::sum(&text, "registry_timing_wheel_entries").unwrap_or(0.0),
        rss_bytes: prom::sum(&text, "process_resident_memory_bytes")
            .context("no process_resident_memory_bytes in /metrics")?,
        cpu_seconds: prom::sum(&text, "process_cpu_seconds_total").unwrap_or(0.0),
        killed: shared.killed.load(Ordering::Relaxed),
        deregistered: shared.deregistered.load(Ordering::Relaxed),
    })
}

/// Churn and expiry checks.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChurnSummary {
    /// Registrations, the initial fleet included.
    pub registered: u64,
    /// Registrations that failed every attempt.
    pub register_failed: u64,
    /// Deregistrations answered OK.
    pub deregistered: u64,
    /// Deregistered executors seen OFFLINE (reason DEREGISTERED).
    pub deregistered_offline: u64,
    /// Deregistered executors never seen OFFLINE.
    pub deregistered_not_offline: u64,
    /// Executors killed (heartbeats stopped without deregistering).
    pub killed: u64,
    /// Killed executors seen OFFLINE.
    pub killed_offline: u64,
    /// Killed executors not OFFLINE by their deadline + 1 s at the end.
    pub killed_not_offline: u64,
    /// Killed, OFFLINE more than 1 s after last OK heartbeat + TTL.
    pub killed_late: u64,
    /// Killed, OFFLINE before last OK heartbeat + TTL (beyond 1 ms).
    pub killed_premature: u64,
    /// OFFLINE − (last OK heartbeat sent + TTL), µs (negative counted as 0).
    pub expiry_lag: Latency,
    /// Executors of the run that went OFFLINE while heartbeating on time.
    pub false_expirations: u64,
    /// Of those OFFLINE unexpectedly, the ones with a heartbeat sent (or
    /// refused) after their deadline: the generator fell behind.
    pub expired_after_late_send: u64,
    /// Some falsely expired ids.
    pub false_examples: Vec<String>,
    /// Executors the registry no longer knew when they heartbeat.
    pub lost: u64,
    /// Churn rates achieved over the churn phase, per second.
    pub deregistrations_per_s: f64,
    /// Kills per second achieved.
    pub kills_per_s: f64,
}

/// The soak's memory verdict.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryVerdict {
    /// After warm-up, before churn.
    pub baseline: MemorySample,
    /// After churn stopped and the killed slots were replaced.
    pub last: MemorySample,
    /// Largest RSS seen during churn.
    pub peak_rss_bytes: f64,
    /// `last.rss_bytes / baseline.rss_bytes`.
    pub rss_ratio: f64,
    /// `last.live / baseline.live`.
    pub live_ratio: f64,
}

/// Everything a soak measured.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    /// Registry measured.
    pub endpoint: String,
    /// Live-set size.
    pub executors: usize,
    /// Connections (+1 for the watch).
    pub connections: usize,
    /// TTL asked for, ms.
    pub ttl_ms: u64,
    /// Interval the server suggested at the end, ms.
    pub interval_ms: u64,
    /// Deregistrations per second asked for.
    pub churn_rate: f64,
    /// Kills per second asked for.
    pub kill_rate: f64,
    /// Seconds of churn.
    pub churn_seconds: f64,
    /// Seconds to register the fleet.
    pub register_seconds: f64,
    /// Seconds from start to end.
    pub total_seconds: f64,
    /// OK heartbeats.
    pub heartbeats_ok: u64,
    /// Failed heartbeats.
    pub heartbeats_failed: u64,
    /// Per batch call, send to answer.
    pub heartbeat_latency: Latency,
    /// Churn and expiry.
    pub churn: ChurnSummary,
    /// Watches opened again.
    pub rewatches: u64,
    /// Of those, resumed from the registry's history: no event missed.
    pub resumes: u64,
    /// Of those, begun with a new snapshot: the events in the gap were not
    /// checked.
    pub resnapshots: u64,
    /// Memory curve.
    pub samples: Vec<MemorySample>,
    /// Baseline against the end.
    pub memory: MemoryVerdict,
    /// Allowed RSS growth (0.10 = 10 %).
    pub max_rss_growth: f64,
    /// Failures by gRPC code or per-item status.
    pub errors: Tally,
    /// Whether every check passed.
    pub passed: bool,
    /// The checks that failed.
    pub failures: Vec<String>,
}

/// Checks every OFFLINE against what the workers expect.
struct SoakWatch(Arc<Shared>);

impl watch::Observer for SoakWatch {
    fn seen(&mut self, seen: watch::Seen<'_>) {
        if let watch::Seen::Event(event) = seen
            && event.r#type == proto::EventType::Offline as i32
        {
            self.0.on_offline(&event.executor_id, event.reason);
        }
    }
}

fn progress(shared: &Shared, what: &str) {
    eprintln!(
        "[{:>7.1}s] {what}: live {}  registered {}  deregistered {}  killed {} (offline {}, late {})  false expirations {}  heartbeats OK {} failed {}",
        shared.start.elapsed().as_secs_f64(),
        shared.live.load(Ordering::Relaxed),
        shared.registered.load(Ordering::Relaxed),
        shared.deregistered.load(Ordering::Relaxed),
        shared.killed.load(Ordering::Relaxed),
        shared.killed_offline.load(Ordering::Relaxed),
        shared.killed_late.load(Ordering::Relaxed),
        shared.false_expirations.load(Ordering::Relaxed),
        shared.beats_ok.load(Ordering::Relaxed),
        shared.beats_failed.load(Ordering::Relaxed),
    );
}

/// Runs the soak described by `config`.
pub async fn run(config: &SoakConfig) -> anyhow::Result<SoakReport> {
    let n = config.executors;
    ensure!(n > 0, "--executors must be at least 1");
    ensure!(n < u32::MAX as usize, "--executors must fit in 32 bits");
    ensure!(config.connections > 0, "--connections must be at least 1");
    ensure!(
        config.churn_rate >= 0.0 && config.kill_rate >= 0.0,
        "--churn-rate and --kill-rate must not be negative"
    );
    ensure!(
        config.sample_every >= Duration::from_secs(1),
        "--sample-every must be at least 1 s"
    );
    let clients = client::connect(&config.endpoint, config.connections).await?;
    let watch_client = client::connect(&config.endpoint, 1)
        .await?
        .pop()
        .context("one watch connection")?;
    let mut rng = SmallRng::from_os_rng();
    let shared = Arc::new(Shared {
        start: Instant::now(),
        prefix: format!("sk{:08x}x", rng.random::<u32>()),
        ttl_ms: config.ttl.as_millis() as u64,
        churn_rate: config.churn_rate,
        kill_rate: config.kill_rate,
        interval_ms: AtomicU64::new(500),
        churning: AtomicBool::new(false),
        expecting: Mutex::new(HashMap::new()),
        late: Mutex::new(HashSet::new()),
        lag_us: Mutex::new(stats::histogram()),
        live: AtomicU64::new(0),
        registered: AtomicU64::new(0),
        register_failed: AtomicU64::new(0),
        deregistered: AtomicU64::new(0),
        killed: AtomicU64::new(0),
        beats_ok: AtomicU64::new(0),
        beats_failed: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        killed_offline: AtomicU64::new(0),
        killed_late: AtomicU64::new(0),
        killed_premature: AtomicU64::new(0),
        deregistered_offline: AtomicU64::new(0),
        false_expirations: AtomicU64::new(0),
        expired_after_late: AtomicU64::new(0),
        false_examples: Mutex::new(Vec::new()),
        stop: CancellationToken::new(),
    });
    let mut samples = vec![sample(&config.metrics, &shared, "registering").await?];

    let watch_stop = CancellationToken::new();
    let watch = watch::start(watch_client, watch_stop.clone(), SoakWatch(shared.clone())).await?;

    let c = config.connections;
    let mut workers = Vec::with_capacity(c);
    for (w, client) in clients.into_iter().enumerate() {
        let count = n.saturating_sub(w).div_ceil(c);
        let worker = Worker {
            shared: shared.clone(),
            client,
            first: w,
            stride: c,
            fleet: n,
            slots: (0..count)
                .map(|_| Slot {
                    id: String::new(),
                    generation: 0,
                    last_ok_us: 0,
                    state: SlotState::Registering,
                })
                .collect(),
            wheel: Wheel::new(WHEEL_SLOTS, TICK_US, shared.now_us()),
            pending: VecDeque::new(),
            to_register: (0..count as u32).map(|slot| (slot, 0)).collect(),
            registering: 0,
            register_cap: (config.register_concurrency / c).max(1),
            batches: 0,
            inflight: config.inflight.max(1),
            batch_size: config.batch_size.max(1),
            rng: SmallRng::seed_from_u64(rng.random()),
            beat_latency: stats::histogram(),
            errors: Tally::default(),
        };
        workers.push(tokio::spawn(worker.run()));
    }

    // Phase 1: register the fleet.
    let register_start = Instant::now();
    let mut next_line = Instant::now() + Duration::from_secs(5);
    loop {
        let done = shared.registered.load(Ordering::Relaxed)
            + shared.register_failed.load(Ordering::Relaxed);
        if done >= n as u64 {
            break;
        }
        if workers.iter().all(|w| w.is_finished()) {
            bail!("every worker stopped before registration finished");
        }
        if config.progress && Instant::now() >= next_line {
            next_line += Duration::from_secs(5);
            progress(&shared, "registering");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let register_seconds = register_start.elapsed().as_secs_f64();
    if config.progress {
        progress(
            &shared,
            &format!("registered in {register_seconds:.1} s, warming up"),
        );
    }

    // Phase 2: warm-up without churn, then the baseline.
    let mut next_sample = Instant::now() + config.sample_every;
    let warm_end = Instant::now() + config.warmup.max(config.settle);
    while Instant::now() < warm_end {
        if Instant::now() >= next_sample {
            next_sample += config.sample_every;
            samples.push(sample(&config.metrics, &shared, "warmup").await?);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let baseline = sample(&config.metrics, &shared, "baseline").await?;
    samples.push(baseline.clone());
    if config.progress {
        eprintln!(
            "[{:>7.1}s] baseline: live {}, RSS {:.1} MiB; churn starts",
            shared.start.elapsed().as_secs_f64(),
            baseline.live,
            baseline.rss_bytes / 1_048_576.0
        );
    }

    // Phase 3: churn.
    let churn_start = Instant::now();
    let (killed0, dereg0) = (
        shared.killed.load(Ordering::Relaxed),
        shared.deregistered.load(Ordering::Relaxed),
    );
    shared.churning.store(true, Ordering::Relaxed);
    next_sample = Instant::now() + config.sample_every;
    while churn_start.elapsed() < config.duration {
        if Instant::now() >= next_sample {
            next_sample += config.sample_every;
            match sample(&config.metrics, &shared, "churn").await {
                Ok(s) => {
                    if config.progress {
                        progress(
                            &shared,
                            &format!("churn, RSS {:.1} MiB", s.rss_bytes / 1_048_576.0),
                        );
                    }
                    samples.push(s);
                }
                Err(e) => eprintln!("sample failed: {e:#}"),
            }
        }
        if workers.iter().all(|w| w.is_finished()) {
            bail!("every worker stopped during churn");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shared.churning.store(false, Ordering::Relaxed);
    let churn_seconds = churn_start.elapsed().as_secs_f64();
    let kills = shared.killed.load(Ordering::Relaxed) - killed0;
    let deregs = shared.deregistered.load(Ordering::Relaxed) - dereg0;

    // Phase 4: drain — the last killed expire and are replaced.
    let drain_until = Instant::now() + config.ttl + EXPIRY_ALLOWANCE + REPLACE_MARGIN * 4;
    let give_up = drain_until + Duration::from_secs(60);
    loop {
        let now = Instant::now();
        let live = shared.live.load(Ordering::Relaxed);
        if now >= give_up || (now >= drain_until && live >= baseline.live) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(config.settle).await;
    let last = sample(&config.metrics, &shared, "final").await?;
    samples.push(last.clone());
    if config.progress {
        progress(&shared, "done");
    }

    shared.stop.cancel();
    watch_stop.cancel();
    let mut beat_latency = stats::histogram();
    let mut errors = Tally::default();
    for worker in workers {
        let out = worker.await.context("a worker panicked")?;
        beat_latency.add(&out.beat_latency).expect("same bounds");
        errors.merge(&out.errors);
    }
    let (watch, _) = watch.await.context("the watch task panicked")?;
    errors.merge(&watch.errors);

    let now = shared.now_us();
    let (mut killed_not_offline, mut deregistered_not_offline) = (0, 0);
    for expect in shared.expecting.lock().expect("not poisoned").values() {
        match *expect {
            Expect::Killed { deadline_us }
                if deadline_us + (EXPIRY_ALLOWANCE.as_micros() as u64) < now =>
            {
                killed_not_offline += 1;
            }
            Expect::Killed { .. } => {}
            Expect::Deregistered => deregistered_not_offline += 1,
        }
    }
    let churn = ChurnSummary {
        registered: shared.registered.load(Ordering::Relaxed),
        register_failed: shared.register_failed.load(Ordering::Relaxed),
        deregistered: shared.deregistered.load(Ordering::Relaxed),
        deregistered_offline: shared.deregistered_offline.load(Ordering::Relaxed),
        deregistered_not_offline,
        killed: shared.killed.load(Ordering::Relaxed),
        killed_offline: shared.killed_offline.load(Ordering::Relaxed),
        killed_not_offline,
        killed_late: shared.killed_late.load(Ordering::Relaxed),
        killed_premature: shared.killed_premature.load(Ordering::Relaxed),
        expiry_lag: Latency::of(&shared.lag_us.lock().expect("not poisoned")),
        false_expirations: shared.false_expirations.load(Ordering::Relaxed),
        expired_after_late_send: shared.expired_after_late.load(Ordering::Relaxed),
        false_examples: shared.false_examples.lock().expect("not poisoned").clone(),
        lost: shared.lost.load(Ordering::Relaxed),
        deregistrations_per_s: deregs as f64 / churn_seconds.max(1e-9),
        kills_per_s: kills as f64 / churn_seconds.max(1e-9),
    };
    let peak_rss_bytes = samples
        .iter()
        .filter(|s| s.phase == "churn")
        .map(|s| s.rss_bytes)
        .fold(last.rss_bytes, f64::max);
    let memory = MemoryVerdict {
        rss_ratio: last.rss_bytes / baseline.rss_bytes.max(1.0),
        live_ratio: last.live as f64 / baseline.live.max(1) as f64,
        baseline,
        last,
        peak_rss_bytes,
    };

    let mut failures = Vec::new();
    if churn.registered == 0 {
        failures.push("no executor registered".to_owned());
    }
    if churn.false_expirations > 0 {
        failures.push(format!(
            "{} executors went OFFLINE while heartbeating (false expirations)",
            churn.false_expirations
        ));
    }
    if churn.expired_after_late_send > 0 {
        failures.push(format!(
            "{} executors expired after the generator sent a heartbeat late: \
             the run did not offer the load it meant to",
            churn.expired_after_late_send
        ));
    }
    kill_failures(
        churn.killed_not_offline,
        churn.killed_late,
        churn.killed_premature,
        EXPIRY_ALLOWANCE,
        &mut failures,
    );
    if churn.deregistered_not_offline > 0 {
        failures.push(format!(
            "{} deregistered executors never went OFFLINE",
            churn.deregistered_not_offline
        ));
    }
    // A resumed watch missed nothing; one that needed a new snapshot did.
    if watch.resnapshots > 0 || watch.gaps > 0 {
        failures.push(format!(
            "the watch needed {} new snapshots ({} events out of order): events in the gaps \
             were not checked",
            watch.resnapshots, watch.gaps
        ));
    }
    if watch.backwards > 0 {
        failures.push(format!(
            "the watch saw a revision go backwards {} times",
            watch.backwards
        ));
    }
    if (memory.live_ratio - 1.0).abs() > 0.01 {
        failures.push(format!(
            "the final live set ({}) is not the baseline's ({}): memory not comparable",
            memory.last.live, memory.baseline.live
        ));
    }
    if memory.rss_ratio > 1.0 + config.max_rss_growth {
        failures.push(format!(
            "RSS grew from {:.1} MiB to {:.1} MiB ({:+.1} %, more than {:.0} %)",
            memory.baseline.rss_bytes / 1_048_576.0,
            memory.last.rss_bytes / 1_048_576.0,
            (memory.rss_ratio - 1.0) * 100.0,
            config.max_rss_growth * 100.0
        ));
    }
    Ok(SoakReport {
        endpoint: config.endpoint.clone(),
        executors: n,
        connections: config.connections,
        ttl_ms: shared.ttl_ms,
        interval_ms: shared.interval_ms.load(Ordering::Relaxed),
        churn_rate: config.churn_rate,
        kill_rate: config.kill_rate,
        churn_seconds,
        register_seconds,
        total_seconds: shared.start.elapsed().as_secs_f64(),
        heartbeats_ok: shared.beats_ok.load(Ordering::Relaxed),
        heartbeats_failed: shared.beats_failed.load(Ordering::Relaxed),
        heartbeat_latency: Latency::of(&beat_latency),
        churn,
        rewatches: watch.rewatches,
        resumes: watch.resumes,
        resnapshots: watch.resnapshots,
        samples,
        memory,
        max_rss_growth: config.max_rss_growth,
        errors,
        passed: failures.is_empty(),
        failures,
    })
}
