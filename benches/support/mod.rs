//! Shared set-up for the benches: a fleet of executors registered in a real
//! [`Registry`] on a multi-thread tokio runtime, with its membership loop (the
//! expiry machinery) running as in production.
//!
//! Owns: the runtime, the registry handle and task, and the ids of the fleet.
//! Nothing here asserts a timing: the benches report, the reader judges.
#![allow(dead_code)]

pub mod reference;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use executor_registry::registry::MemoryStore;
use executor_registry::registry::{
    Observer, Registration, Registry, RegistryConfig, RegistryTask, Selector, SelectorOp,
};
use tokio::runtime::Runtime;

/// TTL every bench executor heartbeats with: a realistic 30 s, so entries pop
/// from the timing wheel and are re-armed while the benches run.
pub const HEARTBEAT_TTL_MS: u64 = 30_000;
/// The same TTL as our registry takes it.
pub const HEARTBEAT_TTL: Option<std::time::Duration> =
    Some(std::time::Duration::from_millis(HEARTBEAT_TTL_MS));

/// Registrations in flight at once when registering a fleet.
pub const REGISTER_CONCURRENCY: usize = 4096;

/// Executors registered between two refreshes while a fleet is built
/// (small enough that a chunk takes well under the init TTL and the 30 s
/// TTL even on a machine loaded 6× its cores).
pub const REGISTER_CHUNK: usize = 25_000;

/// A 2-worker multi-thread runtime (the machine has 2 cores).
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime starts")
}

/// The registry configuration of every bench: the defaults (TTL bounds
/// 100 ms..600 s), but an init TTL of 30 s, the heartbeat TTL: on a loaded
/// machine a chunk of registrations can take longer than the default 20 s.
/// Not longer than the heartbeat TTL, or each first heartbeat would shorten
/// the deadline and queue the entry a second time (a re-arm).
pub fn config() -> RegistryConfig {
    RegistryConfig {
        init_ttl: std::time::Duration::from_millis(HEARTBEAT_TTL_MS),
        ..RegistryConfig::default()
    }
}

/// Two labels per executor: `zone` (8 values) and `arch` (2 values).
pub fn labels(i: usize) -> Vec<(String, String)> {
    vec![
        ("zone".to_owned(), format!("zone-{}", i % 8)),
        (
            "arch".to_owned(),
            if i.is_multiple_of(2) { "x86" } else { "arm" }.to_owned(),
        ),
    ]
}

/// A realistic executor address.
pub fn address(i: usize) -> String {
    format!("10.{}.{}.{}:9000", (i >> 16) & 255, (i >> 8) & 255, i & 255)
}

/// The scheduler's selector in the read benches: `zone = zone-3` (1/8 of
/// the fleet).
pub fn selector() -> Selector {
    Selector::new("zone", "zone-3", Some(SelectorOp::Eq)).expect("a valid selector")
}

/// Longest time between two refreshes of a fleet during a bench (random
/// heartbeats alone may miss some executors for a whole TTL when throughput
/// is low, and slow benches send none).
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// Calls `refresh` (untimed) before a sample when the last refresh is older
/// than [`KEEP_ALIVE`].
pub struct KeepAlive(Instant);

impl KeepAlive {
    pub fn new() -> Self {
        Self(Instant::now())
    }

    pub fn maybe(&mut self, refresh: impl FnOnce()) {
        if self.0.elapsed() > KEEP_ALIVE {
            refresh();
            self.0 = Instant::now();
        }
    }
}

impl Default for KeepAlive {
    fn default() -> Self {
        Self::new()
    }
}

/// A tiny xorshift generator: random ids without the RNG showing up in the
/// measurement.
#[derive(Clone, Copy)]
pub struct XorShift(u64);

impl XorShift {
    /// Seeded (a zero seed is replaced).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Next index in `0..n`.
    #[inline]
    pub fn below(&mut self, n: usize) -> usize {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        ((x as u128 * n as u128) >> 64) as usize
    }
}

/// Observer that timestamps expiry passes, so a bench can tell when the last
/// of a batch of executors was removed (the loop calls it after the snapshot
/// and the events of the pass are published).
#[derive(Default)]
pub struct Probe {
    /// Executors expired so far.
    pub expired: AtomicU64,
    /// When the last expiry pass was reported.
    pub last_expiry: Mutex<Option<Instant>>,
}

impl Observer for Probe {
    fn expired(&self, lags: &[Duration]) {
        let now = Instant::now();
        *self.last_expiry.lock().expect("probe lock") = Some(now);
        self.expired.fetch_add(lags.len() as u64, Ordering::SeqCst);
    }
}

/// A registry with `ids.len()` registered executors (2 labels each), all
/// RUNNING with a 30 s TTL after [`Fleet::start`].
pub struct Fleet {
    /// The runtime the membership loop runs on.
    pub rt: Runtime,
    /// The registry.
    pub registry: Registry,
    task: Option<RegistryTask>,
    /// Ids of the fleet, in no particular order.
    pub ids: Vec<String>,
    /// Expiry timestamps.
    pub probe: Arc<Probe>,
    /// How long registering the fleet took.
    pub registration_time: Duration,
    /// When the last refresh finished.
    last_refresh: Mutex<Instant>,
}

impl Fleet {
    /// Registers `n` executors concurrently through the membership loop (the
    /// in-memory store), then heartbeats each once with a 30 s TTL.
    pub fn start(n: usize) -> Fleet {
        let rt = runtime();
        let probe = Arc::new(Probe::default());
        let (registry, task) = {
            let _guard = rt.enter();
            Registry::start(config(), Box::new(MemoryStore::volatile()), probe.clone())
                .expect("the in-memory store loads")
        };
        // Register in chunks, heartbeating what is registered after each
        // chunk: if registering the fleet takes longer than the init TTL,
        // the first executors must not expire before the fleet is complete.
        let started = Instant::now();
        let mut ids: Vec<String> = Vec::with_capacity(n);
        let mut heartbeating = Duration::ZERO;
        while ids.len() < n {
            let chunk = (n - ids.len()).min(REGISTER_CHUNK);
            let chunk_started = Instant::now();
            let first = ids.len();
            ids.extend(rt.block_on(register_many(
                registry.clone(),
                first..first + chunk,
                "exec",
            )));
            let chunk_time = chunk_started.elapsed();
            if n > REGISTER_CHUNK {
                report(
                    &format!("registered {}..{} of {n}", first, ids.len()),
                    format!(
                        "{chunk_time:.2?} = {:.0}/s",
                        chunk as f64 / chunk_time.as_secs_f64()
                    ),
                );
                let hb = Instant::now();
                refresh(&registry, &ids);
                heartbeating += hb.elapsed();
            }
        }
        let registration_time = started.elapsed() - heartbeating;
        let fleet = Fleet {
            rt,
            registry,
            task: Some(task),
            ids,
            probe,
            registration_time,
            last_refresh: Mutex::new(Instant::now()),
        };
        fleet.refresh();
        fleet
    }

    /// Heartbeats every executor of the fleet once (TTL 30 s), on two
    /// threads. Panics if any heartbeat fails: a bench must not measure a
    /// fleet that expired under it.
    pub fn refresh(&self) {
        let mut last = self.last_refresh.lock().expect("refresh lock");
        let failed = try_refresh(&self.registry, &self.ids);
        assert_eq!(
            failed,
            0,
            "executors of the fleet expired {:.1?} after the previous refresh",
            last.elapsed()
        );
        *last = Instant::now();
    }

    /// Registers `n` more executors concurrently; returns their ids. They
    /// are named like the fleet, so their ids land at random places in the
    /// ordered maps (a distinct name would sort them together, cache-hot).
    pub fn register(&self, n: usize, first_index: usize) -> Vec<String> {
        self.rt.block_on(register_many(
            self.registry.clone(),
            first_index..first_index + n,
            "exec",
        ))
    }

    /// Deregisters `ids` concurrently.
    pub fn deregister(&self, ids: Vec<String>) {
        self.rt
            .block_on(deregister_many(self.registry.clone(), ids));
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            self.rt.block_on(task.stop());
        }
    }
}

/// Heartbeats every id once with a 30 s TTL, on two threads; returns how
/// many failed.
pub fn try_refresh(registry: &Registry, ids: &[String]) -> usize {
    let half = ids.len() / 2;
    std::thread::scope(|s| {
        let parts: Vec<_> = [&ids[..half], &ids[half..]]
            .into_iter()
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .filter(|id| registry.heartbeat(id, HEARTBEAT_TTL).is_err())
                        .count()
                })
            })
            .collect();
        parts
            .into_iter()
            .map(|p| p.join().expect("a refresh thread"))
            .sum()
    })
}

/// Heartbeats every id once with a 30 s TTL, on two threads.
pub fn refresh(registry: &Registry, ids: &[String]) {
    let half = ids.len() / 2;
    std::thread::scope(|s| {
        for part in [&ids[..half], &ids[half..]] {
            s.spawn(move || {
                for id in part {
                    registry
                        .heartbeat(id, HEARTBEAT_TTL)
                        .expect("a fleet executor is alive");
                }
            });
        }
    });
}

/// Registers the executors numbered `range` with [`REGISTER_CONCURRENCY`]
/// registrations in flight; returns their ids.
pub async fn register_many(
    registry: Registry,
    range: std::ops::Range<usize>,
    name: &str,
) -> Vec<String> {
    let n = range.len();
    let concurrency = REGISTER_CONCURRENCY.min(n).max(1);
    let mut tasks = Vec::with_capacity(concurrency);
    for k in 0..concurrency {
        let registry = registry.clone();
        let name = name.to_owned();
        let start = range.start;
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::with_capacity(n / concurrency + 1);
            let mut i = k;
            while i < n {
                let index = start + i;
                let entry = registry
                    .register(Registration {
                        name: name.clone(),
                        address: address(index),
                        labels: labels(index),
                        owner: None,
                    })
                    .await
                    .expect("registration succeeds");
                ids.push(entry.id().as_str().to_owned());
                i += concurrency;
            }
            ids
        }));
    }
    let mut ids = Vec::with_capacity(n);
    for task in tasks {
        ids.extend(task.await.expect("a register task finishes"));
    }
    ids
}

/// Deregisters `ids` with [`REGISTER_CONCURRENCY`] in flight.
pub async fn deregister_many(registry: Registry, ids: Vec<String>) {
    let ids = Arc::new(ids);
    let concurrency = REGISTER_CONCURRENCY.min(ids.len()).max(1);
    let mut tasks = Vec::with_capacity(concurrency);
    for k in 0..concurrency {
        let registry = registry.clone();
        let ids = ids.clone();
        tasks.push(tokio::spawn(async move {
            for id in ids.iter().skip(k).step_by(concurrency) {
                registry
                    .deregister(id)
                    .await
                    .expect("deregistration succeeds");
            }
        }));
    }
    for task in tasks {
        task.await.expect("a deregister task finishes");
    }
}

/// Prints a result line that the README table is built from.
pub fn report(key: &str, value: impl std::fmt::Display) {
    eprintln!("## {key}: {value}");
}

/// Nanoseconds per dependent load when chasing pointers at random through
/// `mib` MiB: the machine's memory latency, which bounds any lookup in a
/// table of a million entries (each miss is one of these).
pub fn dependent_load_ns(mib: usize) -> f64 {
    let slots = mib * 1024 * 1024 / 8;
    let lines = slots / 8;
    let mut order: Vec<usize> = (0..lines).collect();
    let mut rng = XorShift::new(42);
    // Sattolo's shuffle: one cycle through every cache line.
    for i in (1..lines).rev() {
        let j = rng.below(i);
        order.swap(i, j);
    }
    let mut next = vec![0usize; slots];
    for i in 0..lines {
        next[order[i] * 8] = order[(i + 1) % lines] * 8;
    }
    let steps = 1_000_000;
    let mut p = 0;
    let started = Instant::now();
    for _ in 0..steps {
        p = next[p];
    }
    let elapsed = started.elapsed();
    std::hint::black_box(p);
    elapsed.as_nanos() as f64 / steps as f64
}

/// How much faster two threads finish two equal pure-compute jobs than one
/// thread finishes one (2.0 = two free cores). Other work on the machine
/// shows up here first.
pub fn two_thread_speedup() -> f64 {
    fn job() -> u64 {
        let mut x = 1u64;
        for i in 0..100_000_000u64 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i);
        }
        x
    }
    let started = Instant::now();
    std::hint::black_box(job());
    let one = started.elapsed();
    let started = Instant::now();
    std::thread::scope(|s| {
        let a = s.spawn(job);
        let b = s.spawn(job);
        std::hint::black_box((
            a.join().expect("a compute thread"),
            b.join().expect("a compute thread"),
        ));
    });
    let two = started.elapsed();
    2.0 * one.as_secs_f64() / two.as_secs_f64()
}

/// Reports the machine's state: memory latency and 2-thread scaling.
pub fn report_machine(when: &str) {
    for mib in [1, 64, 1024] {
        report(
            &format!("machine ({when}): ns per dependent load, random over {mib} MiB"),
            format!("{:.0}", dependent_load_ns(mib)),
        );
    }
    report(
        &format!("machine ({when}): 2-thread speedup of pure compute (2.0 = two free cores)"),
        format!("{:.2}", two_thread_speedup()),
    );
}
