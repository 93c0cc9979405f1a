//! Bytes per executor at 1,000,000 executors with two labels.
//!
//! Two measures per design, each in a fresh child process (so one design's
//! freed memory cannot hide the next one's growth):
//! - *heap*: bytes requested from the allocator and still live, counted by a
//!   counting `#[global_allocator]` (no malloc headers or fragmentation);
//! - *RSS*: growth of the resident set (`/proc/self/statm`), which includes
//!   the allocator's overhead and memory freed but not returned.
//!
//! Designs: this registry as `--store memory` runs it (a volatile
//! `MemoryStore` that keeps nothing: the core alone, as with the SQLite store
//! where the copy lives on disk), the same with a `MemoryStore` that keeps a
//! copy of every executor (as tests use it), the reference port, and a
//! breakdown of the registry's structures built one after the other by hand.
//!
//! Churn (`registry_churn`, the core alone): 100,000 live executors, then
//! 20 rounds of 10,000 deregistered and 10,000 new ones (two turnovers of
//! the fleet) with a 2 s tombstone retention; heap and RSS against the same
//! live set before the churn, once the deregistered entries have left the
//! timing wheel (at their deadline, 30 s) and the tombstones are forgotten,
//! and the heap cost of a deregistration within those windows. A leak in the core shows as heap growth; RSS
//! growth without heap growth is table capacity and allocator slack.
//!
//! The bench's own list of ids is dropped before measuring.
//!
//! Run: `cargo bench --bench memory`.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a benchmark measures real time"
)]

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use executor_registry::registry::{Batch, MembershipStore, MemoryStore, StoredExecutor};
use executor_registry::registry::{Entry, ExecutorId, Labels, Registry};
use support::reference::RefRegistry;
use support::{HEARTBEAT_TTL_MS, REGISTER_CHUNK, address, config, labels, register_many, report};

const FLEET: usize = 1_000_000;
/// Live executors of the churn design.
const CHURN_FLEET: usize = 100_000;
/// Executors replaced per churn round.
const CHURN_ROUND: usize = 10_000;
/// Rounds: two turnovers of the whole fleet.
const CHURN_ROUNDS: usize = 20;
const DESIGN_ENV: &str = "MEMORY_BENCH_DESIGN";

/// The live table's slot, as the registry's (crate-private) one: the entry,
/// hashed and compared by its id.
struct LiveSlot(Arc<Entry>);

impl std::hash::Hash for LiveSlot {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.id().as_str().hash(state);
    }
}

impl PartialEq for LiveSlot {
    fn eq(&self, other: &Self) -> bool {
        self.0.id() == other.0.id()
    }
}

impl Eq for LiveSlot {}

struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call forwards to the system allocator unchanged; the counter
// only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn heap() -> isize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

fn rss() -> isize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: isize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("resident pages in statm");
    pages * 4096
}

/// Heap and RSS at one moment.
#[derive(Clone, Copy)]
struct Mark(isize, isize);

impl Mark {
    fn now() -> Self {
        Self(heap(), rss())
    }

    /// Bytes per executor since `self`.
    fn per_executor(self, n: usize) -> (f64, f64) {
        let now = Mark::now();
        (
            (now.0 - self.0) as f64 / n as f64,
            (now.1 - self.1) as f64 / n as f64,
        )
    }
}

fn print(design: &str, (heap, rss): (f64, f64)) {
    // One parseable line per measure, read back by the parent.
    println!("MEASURE\t{design}\t{heap:.0}\t{rss:.0}");
}

fn main() {
    if let Ok(design) = std::env::var(DESIGN_ENV) {
        match design.as_str() {
            "registry_store_memory" => registry(Box::new(MemoryStore::volatile())),
            "registry_keeping_store" => registry(Box::new(MemoryStore::new())),
            "reference" => reference(),
            "registry_parts" => parts(),
            "registry_churn" => churn(),
            other => panic!("unknown design {other}"),
        }
        return;
    }
    // Honour a criterion-style filter: `cargo bench -- heartbeat` skips us.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if !filters.is_empty() && !filters.iter().any(|f| "memory".contains(f.as_str())) {
        return;
    }
    for design in [
        "registry_store_memory",
        "registry_keeping_store",
        "reference",
        "registry_parts",
        "registry_churn",
    ] {
        let started = Instant::now();
        let output = Command::new(std::env::current_exe().expect("the bench binary"))
            .env(DESIGN_ENV, design)
            .output()
            .expect("the child runs");
        assert!(
            output.status.success(),
            "{design} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let fields: Vec<&str> = line.split('\t').collect();
            if let ["MEASURE", what, heap, rss] = fields[..] {
                report(
                    &format!("bytes per executor at 1M, 2 labels: {what}"),
                    format!("heap {heap} B, RSS {rss} B"),
                );
            }
            if let ["CHURN", what, heap, rss] = fields[..] {
                report(
                    &format!("churn at {CHURN_FLEET} live: {what}"),
                    format!("heap {heap}, RSS {rss}"),
                );
            }
        }
        eprintln!("({design} took {:.1?})", started.elapsed());
    }
}

fn registry(store: Box<dyn MembershipStore>) {
    let rt = support::runtime();
    let (registry, task) = {
        let _guard = rt.enter();
        Registry::start(
            config(),
            store,
            Arc::new(executor_registry::registry::NoopObserver),
        )
        .expect("the store loads")
    };
    let mark = Mark::now();
    let mut ids: Vec<String> = Vec::with_capacity(FLEET);
    while ids.len() < FLEET {
        let first = ids.len();
        let chunk = (FLEET - first).min(REGISTER_CHUNK);
        ids.extend(rt.block_on(register_many(
            registry.clone(),
            first..first + chunk,
            "exec",
        )));
        support::refresh(&registry, &ids);
    }
    // Let the loop finish its turns (re-arms) before measuring.
    std::thread::sleep(Duration::from_millis(500));
    let ids_bytes: usize = ids.capacity() * std::mem::size_of::<String>()
        + ids.iter().map(|s| s.capacity()).sum::<usize>();
    drop(ids);
    assert_eq!(registry.count(None), FLEET as u64);
    let design = std::env::var(DESIGN_ENV).expect("set by the parent");
    print(&design, mark.per_executor(FLEET));
    eprintln!("(ids list was {ids_bytes} B, dropped before measuring)");
    rt.block_on(task.stop());
}

fn reference() {
    let mark = Mark::now();
    let registry = RefRegistry::new(config().init_ttl);
    let ids: Vec<String> = (0..FLEET)
        .map(|i| {
            registry
                .register("exec", &address(i), labels(i))
                .expect("valid labels")
                .id
                .clone()
        })
        .collect();
    for id in &ids {
        registry.heartbeat(id, HEARTBEAT_TTL_MS).expect("alive");
    }
    drop(ids);
    // Let the notifier thread drain the online events.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(registry.len(), FLEET);
    print("reference", mark.per_executor(FLEET));
}

/// The registry's structures built one after the other, each measured.
fn parts() {
    let rt = support::runtime();
    let _guard = rt.enter();
    let clock = executor_registry::registry::Clock::start();
    let mut mark = Mark::now();
    let step = |what: &str, mark: &mut Mark| {
        print(&format!("part: {what}"), mark.per_executor(FLEET));
        *mark = Mark::now();
    };
    let entries: Vec<Arc<Entry>> = (0..FLEET)
        .map(|i| {
            let id = ExecutorId::new(&format!("exec-{:016x}", rand::random::<u64>()));
            let labels = Labels::new(labels(i)).expect("valid labels");
            Arc::new(Entry::new(
                id,
                "exec".into(),
                address(i).into(),
                labels,
                0,
                Duration::from_millis(HEARTBEAT_TTL_MS),
                HEARTBEAT_TTL_MS,
            ))
        })
        .collect();
    let vec_bytes = (FLEET * std::mem::size_of::<Arc<Entry>>()) as f64 / FLEET as f64;
    step(
        &format!(
            "Arc<Entry> + id + name, address and 2 labels, 3 allocations (+{vec_bytes:.0} B of the bench's Vec)"
        ),
        &mut mark,
    );
    // As the registry builds it: foldhash, 128 shards, the entry as the key
    // (hashed by its id) and no value.
    let live: DashMap<LiveSlot, (), foldhash::fast::RandomState> =
        DashMap::with_hasher_and_shard_amount(Default::default(), 128);
    for e in &entries {
        live.insert(LiveSlot(e.clone()), ());
    }
    step("live table DashMap<entry keyed by id, ()>", &mut mark);
    let mut members = imbl::OrdMap::new();
    for e in &entries {
        members.insert(e.id().clone(), e.clone());
    }
    step("snapshot imbl::OrdMap<ExecutorId, Arc<Entry>>", &mut mark);
    // As the registry's wheel holds it: one queue item per millisecond,
    // each with the list of its entries; a fleet heartbeating over a 30 s
    // TTL spreads its deadlines over 30,000 ms (about 33 per ms at 1M).
    let mut queue = tokio_util::time::DelayQueue::new();
    let mut buckets: HashMap<u64, Vec<Arc<Entry>>, foldhash::fast::FixedState> = HashMap::default();
    for (i, e) in entries.iter().enumerate() {
        let deadline = HEARTBEAT_TTL_MS + (i as u64 * HEARTBEAT_TTL_MS) / FLEET as u64;
        buckets
            .entry(deadline)
            .or_insert_with(|| {
                queue.insert_at(deadline, clock.instant_at(deadline));
                Vec::new()
            })
            .push(e.clone());
    }
    step(
        "timing wheel: DelayQueue<u64> of ms + HashMap<ms, Vec<Arc<Entry>>>",
        &mut mark,
    );
    let mut store = MemoryStore::new();
    let rows = entries
        .iter()
        .map(|e| StoredExecutor {
            id: e.id().as_str().to_owned(),
            name: e.name().to_owned(),
            address: e.address().to_owned(),
            labels: e
                .labels()
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            registered_unix_ms: 0,
            owner: None,
            ttl: None,
        })
        .collect();
    store
        .commit(&Batch {
            inserts: rows,
            deletes: Vec::new(),
            revision_floor: None,
            ttls: Vec::new(),
        })
        .expect("memory store commit");
    step(
        "MemoryStore copy (BTreeMap<String, StoredExecutor>)",
        &mut mark,
    );
    std::hint::black_box((&live, &members, &queue, &buckets, &store));
}

/// Two turnovers of a 100,000-executor fleet; heap and RSS at the same live
/// set before and after (see the module header).
fn churn() {
    let rt = support::runtime();
    let retention = Duration::from_secs(2);
    let (registry, task) = {
        let _guard = rt.enter();
        let config = executor_registry::registry::RegistryConfig {
            tombstone_retention: retention,
            ..config()
        };
        Registry::start(
            config,
            Box::new(MemoryStore::volatile()),
            Arc::new(executor_registry::registry::NoopObserver),
        )
        .expect("the store loads")
    };
    let mut ids = rt.block_on(register_many(registry.clone(), 0..CHURN_FLEET, "exec"));
    support::refresh(&registry, &ids);
    std::thread::sleep(retention + Duration::from_millis(1_500));
    let before = Mark::now();
    let mut next = CHURN_FLEET;
    let mut replace = |ids: &mut Vec<String>, round: usize| {
        let at = (round * CHURN_ROUND) % CHURN_FLEET;
        let gone: Vec<String> = ids[at..at + CHURN_ROUND].to_vec();
        rt.block_on(support::deregister_many(registry.clone(), gone));
        let fresh = rt.block_on(register_many(
            registry.clone(),
            next..next + CHURN_ROUND,
            "exec",
        ));
        next += CHURN_ROUND;
        for (slot, id) in ids[at..at + CHURN_ROUND].iter_mut().zip(fresh) {
            *slot = id;
        }
        support::refresh(&registry, ids);
    };
    for round in 0..CHURN_ROUNDS {
        replace(&mut ids, round);
    }
    // A deregistered entry stays in the timing wheel until its deadline (a
    // heartbeat TTL, 30 s here), then every tombstone is forgotten.
    let settle = Duration::from_millis(HEARTBEAT_TTL_MS) + retention + Duration::from_secs(2);
    for _ in 0..settle.as_secs().div_ceil(10) {
        std::thread::sleep(Duration::from_secs(10));
        support::refresh(&registry, &ids);
    }
    support::refresh(&registry, &ids);
    assert_eq!(registry.count(None), CHURN_FLEET as u64);
    let after = Mark::now();
    println!(
        "CHURN\tafter {} replaced, tombstones forgotten, vs before\t{:+} B\t{:+} B",
        CHURN_ROUND * CHURN_ROUNDS,
        after.0 - before.0,
        after.1 - before.1
    );
    // One more round, measured before its tombstones are forgotten.
    let mark = Mark::now();
    replace(&mut ids, CHURN_ROUNDS);
    let (heap, _) = mark.per_executor(CHURN_ROUND);
    println!(
        "CHURN\tper deregistration, until its deadline and retention pass (heap)\t{heap:.0} B\t-"
    );
    rt.block_on(task.stop());
}
