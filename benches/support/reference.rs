//! The baseline: a faithful Rust port of the reference design,
//! `ExecutorManagerImpl` in `../shared/reference/executor_manager.go.txt`.
//!
//! Kept from the reference, on purpose:
//! - one global `Mutex<HashMap<id, Arc<Executor>>>`; each executor has its
//!   own lock over its liveness (status, last update, TTL), as the Go struct's
//!   `mu` guards exactly those fields while its metadata is immutable;
//! - a heartbeat locks the global map, looks up, unlocks, then locks the
//!   executor and writes last update, TTL and status;
//! - a check-alive thread that every tick scans the whole map under the
//!   global lock, locking each executor and reading the clock per executor
//!   (`time.Now()` inside `checkAlive`);
//! - events go to a notifier (here a channel drained by its own thread), sent
//!   under the global lock as `removeExecutorLocked` does.
//!
//! Changed, to make the comparison fair (each favours the reference):
//! - the scan removes *every* dead executor in one pass (the Go code returns
//!   after the first removal: one removal per tick);
//! - no logging, no rate limiter, no database call, no goroutine per removal;
//! - the scheduler read builds a `Vec` of the RUNNING executors matching the
//!   selector (the Go code builds a map of every executor, then filters).
//!
//! Locks are `parking_lot` mutexes: like Go's `sync.Mutex` (which hands the
//! lock to a waiter that waited over 1 ms), they are eventually fair. With
//! `std`'s mutex the check-alive thread, scanning back to back at 1M, would
//! re-take the lock before any heartbeat and starve them for seconds, which
//! the Go code does not do.
//!
//! Label validation and selector matching reuse the registry's own types, so
//! only the structure differs between the two designs.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use executor_registry::registry::{Labels, Selector, Status};
use parking_lot::{Mutex, MutexGuard};

/// Why a reference call failed (`ErrUnknownExecutor`, `ErrTombstoneExecutor`,
/// invalid labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefError {
    /// No such executor.
    Unknown,
    /// The executor is a tombstone.
    Tombstone,
    /// Labels did not validate.
    InvalidLabels,
}

/// Liveness of one executor, behind the executor's own lock.
struct Liveness {
    status: Status,
    last_update: Instant,
    ttl: Duration,
}

/// One executor: immutable metadata plus its locked liveness.
pub struct RefExecutor {
    /// Its id.
    pub id: String,
    /// Name given at registration.
    pub name: String,
    /// `host:port`.
    pub address: String,
    /// Validated labels.
    pub labels: Labels,
    live: Mutex<Liveness>,
}

impl RefExecutor {
    fn live(&self) -> MutexGuard<'_, Liveness> {
        self.live.lock()
    }

    /// `Executor.checkAlive`: false (and TOMBSTONE) once last update + TTL
    /// is before now.
    fn check_alive(&self) -> bool {
        let mut live = self.live();
        if live.status == Status::Tombstone {
            return false;
        }
        if live.last_update + live.ttl < Instant::now() {
            live.status = Status::Tombstone;
            return false;
        }
        true
    }

    /// `Executor.heartbeat`.
    fn heartbeat(&self, ttl_ms: u64) -> Result<(), RefError> {
        let mut live = self.live();
        if live.status == Status::Tombstone {
            return Err(RefError::Tombstone);
        }
        live.last_update = Instant::now();
        live.ttl = Duration::from_millis(ttl_ms);
        live.status = Status::Running;
        Ok(())
    }

    /// `Executor.statusEqual`.
    pub fn status(&self) -> Status {
        self.live().status
    }
}

/// An online/offline notification.
pub struct RefEvent {
    /// True for online, false for offline.
    pub online: bool,
    /// The executor.
    pub executor: Arc<RefExecutor>,
}

/// What the check-alive thread did.
#[derive(Default)]
pub struct CheckStats {
    /// Executors removed so far.
    pub removed: AtomicU64,
    /// When the last scan that removed something released the global lock.
    pub last_removal: Mutex<Option<Instant>>,
    /// Duration of every scan (global lock held).
    pub scans: Mutex<Vec<Duration>>,
}

/// `ExecutorManagerImpl`.
pub struct RefRegistry {
    executors: Mutex<HashMap<String, Arc<RefExecutor>>>,
    init_ttl: Duration,
    notifier: Mutex<Option<mpsc::Sender<RefEvent>>>,
    notifier_thread: Mutex<Option<JoinHandle<()>>>,
    /// Check-alive statistics.
    pub stats: CheckStats,
}

impl RefRegistry {
    /// An empty manager; `init_ttl` is `initHeartbeatTTL`.
    pub fn new(init_ttl: Duration) -> Arc<Self> {
        let (tx, rx) = mpsc::channel::<RefEvent>();
        let drain = std::thread::Builder::new()
            .name("ref-notifier".into())
            .spawn(move || for _event in rx {})
            .expect("the notifier thread starts");
        Arc::new(Self {
            executors: Mutex::new(HashMap::new()),
            init_ttl,
            notifier: Mutex::new(Some(tx)),
            notifier_thread: Mutex::new(Some(drain)),
            stats: CheckStats::default(),
        })
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<RefExecutor>>> {
        self.executors.lock()
    }

    fn notify(&self, online: bool, executor: Arc<RefExecutor>) {
        if let Some(tx) = self.notifier.lock().as_ref() {
            let _ = tx.send(RefEvent { online, executor });
        }
    }

    /// `HandleHeartbeat`: global lock for the lookup only, then the
    /// executor's lock for the update.
    pub fn heartbeat(&self, id: &str, ttl_ms: u64) -> Result<(), RefError> {
        let executor = {
            let map = self.map();
            map.get(id).cloned()
        };
        executor.ok_or(RefError::Unknown)?.heartbeat(ttl_ms)
    }

    /// `AllocateNewExec` (without the database write): a fresh id under the
    /// global lock, labels validated, inserted INITING, notified.
    pub fn register(
        &self,
        name: &str,
        address: &str,
        labels: Vec<(String, String)>,
    ) -> Result<Arc<RefExecutor>, RefError> {
        let mut map = self.map();
        let id = loop {
            let id = format!("{name}-{:016x}", rand::random::<u64>());
            if !map.contains_key(&id) {
                break id;
            }
        };
        let labels = Labels::new(labels).map_err(|_| RefError::InvalidLabels)?;
        let executor = Arc::new(RefExecutor {
            id: id.clone(),
            name: name.to_owned(),
            address: address.to_owned(),
            labels,
            live: Mutex::new(Liveness {
                status: Status::Initing,
                last_update: Instant::now(),
                ttl: self.init_ttl,
            }),
        });
        map.insert(id, executor.clone());
        self.notify(true, executor.clone());
        Ok(executor)
    }

    /// `registerExecLocked` with a known id, as `resetExecutors` does for
    /// the executors it loads: inserted INITING under the global lock and
    /// notified. The benches use it to put back executors the check-alive
    /// thread removed, so a fleet keeps its size.
    pub fn register_with_id(
        &self,
        id: &str,
        name: &str,
        address: &str,
        labels: Vec<(String, String)>,
    ) -> Result<Arc<RefExecutor>, RefError> {
        let labels = Labels::new(labels).map_err(|_| RefError::InvalidLabels)?;
        let mut map = self.map();
        let executor = Arc::new(RefExecutor {
            id: id.to_owned(),
            name: name.to_owned(),
            address: address.to_owned(),
            labels,
            live: Mutex::new(Liveness {
                status: Status::Initing,
                last_update: Instant::now(),
                ttl: self.init_ttl,
            }),
        });
        map.insert(id.to_owned(), executor.clone());
        self.notify(true, executor.clone());
        Ok(executor)
    }

    /// Bench hygiene only (the reference has no deregistration): drops an
    /// executor at once.
    pub fn remove(&self, id: &str) {
        self.map().remove(id);
    }

    /// `ListExecutors`: every executor, under the global lock.
    pub fn list(&self) -> Vec<Arc<RefExecutor>> {
        self.map().values().cloned().collect()
    }

    /// The scheduler's read (`GetExecutorInfos` + selector filtering):
    /// RUNNING executors matching every selector.
    pub fn schedulable(&self, selectors: &[Selector]) -> Vec<Arc<RefExecutor>> {
        self.map()
            .values()
            .filter(|e| e.status() == Status::Running)
            .filter(|e| selectors.iter().all(|s| s.matches(e.labels.view())))
            .cloned()
            .collect()
    }

    /// Number of executors.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// `checkAliveImpl` without the one-removal-per-tick bug: one pass under
    /// the global lock removes every dead executor. Returns how many.
    pub fn check_alive(&self) -> usize {
        let started = Instant::now();
        let mut removed = 0;
        {
            let mut map = self.map();
            let mut gone = Vec::new();
            map.retain(|_, executor| {
                let alive = executor.check_alive();
                if !alive {
                    gone.push(executor.clone());
                }
                alive
            });
            for executor in gone {
                removed += 1;
                self.notify(false, executor);
            }
        }
        let done = Instant::now();
        if removed > 0 {
            *self.stats.last_removal.lock() = Some(done);
            self.stats
                .removed
                .fetch_add(removed as u64, Ordering::SeqCst);
        }
        self.stats.scans.lock().push(done - started);
        removed
    }

    /// Starts the check-alive thread (`Run`'s ticker loop) with `tick`.
    pub fn start_checker(self: &Arc<Self>, tick: Duration) -> Checker {
        let stop = Arc::new(AtomicBool::new(false));
        let this = self.clone();
        let stopping = stop.clone();
        let handle = std::thread::Builder::new()
            .name("ref-check-alive".into())
            .spawn(move || {
                // Like Go's ticker: a fixed period; ticks missed while a scan
                // ran are dropped, not queued.
                let mut next = Instant::now() + tick;
                while !stopping.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    if now < next {
                        std::thread::sleep((next - now).min(Duration::from_millis(10)));
                        continue;
                    }
                    next += tick;
                    if next < now {
                        next = now + tick;
                    }
                    this.check_alive();
                }
            })
            .expect("the check-alive thread starts");
        Checker {
            stop,
            handle: Some(handle),
        }
    }

    /// Median scan duration so far, and how many scans ran; clears the log.
    pub fn take_scan_stats(&self) -> (Duration, usize) {
        let mut scans = std::mem::take(&mut *self.stats.scans.lock());
        scans.sort();
        let median = scans.get(scans.len() / 2).copied().unwrap_or_default();
        (median, scans.len())
    }
}

impl Drop for RefRegistry {
    fn drop(&mut self) {
        self.notifier.lock().take();
        if let Some(thread) = self.notifier_thread.lock().take() {
            let _ = thread.join();
        }
    }
}

/// The running check-alive thread; stops when dropped.
pub struct Checker {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}
