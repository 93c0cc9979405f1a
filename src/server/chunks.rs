//! Snapshot chunks for watchers: encoded once, off the runtime's workers,
//! and shared by every watcher reading the same snapshot.
//!
//! Owns: [`Chunks`] — the thread that encodes chunks ([`wire::snapshot_chunk`])
//! at the lowest scheduling priority (a [`Janitor`]: encoding runs on a core
//! no heartbeat wants, and is preempted as soon as one does), and a small
//! cache of the chunks encoded in the last [`KEEP_FOR`], keyed by the
//! snapshot's revision and the id the chunk starts after. Watchers that take
//! a snapshot at the same moment — schedulers re-watching after a failover,
//! a re-list storm — get the same snapshot and ask for the same chunks in
//! the same order, so each chunk is encoded once and its bytes sent to all
//! of them (as the Kubernetes watch cache serializes an object once for all
//! its watchers). The cache holds at most [`CACHE_BYTES`]; a cached chunk's
//! last-heartbeat times and TTLs are at most [`KEEP_FOR`] old (statuses are
//! the snapshot's revision's either way).
//!
//! Must not touch: registry state (it reads the snapshots it is given).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::wire;
use crate::registry::{Janitor, Registry, Snapshot};

/// How long an encoded chunk is reused.
pub const KEEP_FOR: Duration = Duration::from_secs(1);
/// Most bytes of encoded chunks kept.
pub const CACHE_BYTES: usize = 8 << 20;

/// One encoded chunk of a snapshot.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// The `WatchExecutorsResponse`, encoded.
    pub message: Bytes,
    /// The id of its last executor: the next chunk starts after it.
    pub last: Option<String>,
    /// More chunks follow.
    pub more: bool,
}

/// Which chunk: the snapshot's revision and the id it starts after.
type Key = (u64, Option<String>);

/// Recently encoded chunks, oldest first.
#[derive(Default)]
struct Cache {
    chunks: HashMap<Key, (Arc<Chunk>, Instant)>,
    order: VecDeque<Key>,
    bytes: usize,
}

impl Cache {
    fn get(&self, key: &Key, now: Instant) -> Option<Arc<Chunk>> {
        let (chunk, at) = self.chunks.get(key)?;
        (now.duration_since(*at) <= KEEP_FOR).then(|| chunk.clone())
    }

    fn insert(&mut self, key: Key, chunk: Arc<Chunk>, now: Instant) {
        self.bytes += chunk.message.len();
        if let Some((old, _)) = self.chunks.insert(key.clone(), (chunk, now)) {
            self.bytes -= old.message.len();
            self.order.retain(|k| k != &key);
        }
        self.order.push_back(key);
        while let Some(oldest) = self.order.front() {
            let expired = self.chunks[oldest].1 + KEEP_FOR < now;
            if !expired && self.bytes <= CACHE_BYTES {
                break;
            }
            let oldest = self.order.pop_front().expect("the front exists");
            if let Some((chunk, _)) = self.chunks.remove(&oldest) {
                self.bytes -= chunk.message.len();
            }
        }
    }
}

/// Encodes snapshot chunks for the watch streams of one server.
pub struct Chunks {
    registry: Registry,
    encoder: Janitor,
    cache: Arc<Mutex<Cache>>,
    /// Target size of a chunk.
    chunk_bytes: usize,
}

impl Chunks {
    /// Chunks of `registry`'s snapshots of about `chunk_bytes` each; starts
    /// the encoder thread.
    pub fn new(registry: Registry, chunk_bytes: usize) -> Self {
        Self {
            registry,
            encoder: Janitor::named("registry-chunks"),
            cache: Arc::default(),
            chunk_bytes,
        }
    }

    /// The chunk of `snapshot` after the id `after` (None: the first);
    /// None if encoding it failed (a bug: the encoder panicked).
    pub async fn next(
        &self,
        snapshot: &Arc<Snapshot>,
        after: Option<String>,
    ) -> Option<Arc<Chunk>> {
        let key = (snapshot.revision(), after);
        // The worker's clock, for the encoder thread too (tests pause it).
        let now = Instant::now();
        if let Some(chunk) = lock(&self.cache).get(&key, now) {
            return Some(chunk);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (registry, snapshot, cache) =
            (self.registry.clone(), snapshot.clone(), self.cache.clone());
        let chunk_bytes = self.chunk_bytes;
        self.encoder.run(move || {
            // Another watcher's request for it may have been queued first.
            let cached = lock(&cache).get(&key, now);
            let chunk = cached.unwrap_or_else(|| {
                let (message, last, more) = wire::snapshot_chunk(
                    &registry,
                    snapshot.iter_after(key.1.as_deref()),
                    key.0,
                    chunk_bytes,
                );
                let chunk = Arc::new(Chunk {
                    message,
                    last,
                    more,
                });
                lock(&cache).insert(key, chunk.clone(), now);
                chunk
            });
            let _ = tx.send(chunk);
        });
        rx.await.ok()
    }
}

/// The cache, whatever a panicking holder left it as (it holds only
/// finished chunks).
fn lock(cache: &Mutex<Cache>) -> MutexGuard<'_, Cache> {
    cache.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Registration, RegistryConfig};

    fn chunk(bytes: usize) -> Arc<Chunk> {
        Arc::new(Chunk {
            message: Bytes::from(vec![0; bytes]),
            last: None,
            more: false,
        })
    }

    #[test]
    fn the_cache_keeps_chunks_for_a_while_and_within_its_bytes() {
        let t0 = Instant::now();
        let mut cache = Cache::default();
        cache.insert((1, None), chunk(100), t0);
        assert!(cache.get(&(1, None), t0 + KEEP_FOR).is_some());
        assert!(
            cache.get(&(1, None), t0 + KEEP_FOR * 2).is_none(),
            "too old"
        );
        assert!(cache.get(&(2, None), t0).is_none(), "another revision");
        // Replacing a chunk counts its bytes once.
        cache.insert((1, None), chunk(200), t0);
        assert_eq!((cache.bytes, cache.order.len()), (200, 1));
        // Past the byte bound the oldest go first.
        let half = CACHE_BYTES / 2;
        cache.insert((1, Some("a".into())), chunk(half), t0);
        cache.insert((1, Some("b".into())), chunk(half), t0);
        assert!(cache.get(&(1, None), t0).is_none());
        assert!(cache.get(&(1, Some("a".into())), t0).is_some());
        assert_eq!(cache.bytes, 2 * half);
        // Expired ones go when the next chunk comes.
        cache.insert((3, None), chunk(1), t0 + KEEP_FOR * 2);
        assert_eq!((cache.bytes, cache.order.len()), (1, 1));
    }

    // Real time: a paused clock would jump ahead to the membership loop's
    // timers while a test waits for the encoder thread.
    #[tokio::test]
    async fn watchers_of_one_snapshot_share_each_chunk_until_it_is_old() {
        let (registry, _task) = Registry::start_in_memory(RegistryConfig::default());
        for i in 0..50 {
            let registration = Registration {
                name: format!("w{i}"),
                address: format!("10.0.0.{i}:7000"),
                labels: Vec::new(),
                owner: None,
            };
            registry.register(registration).await.unwrap();
        }
        let chunks = Chunks::new(registry.clone(), 1_000);
        let snapshot = registry.snapshot();
        let first = chunks.next(&snapshot, None).await.unwrap();
        assert!(first.more, "50 executors take more than 1,000 bytes");
        let again = chunks.next(&snapshot, None).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again), "encoded once, shared");
        let second = chunks.next(&snapshot, first.last.clone()).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        tokio::time::sleep(KEEP_FOR + Duration::from_millis(100)).await;
        let later = chunks.next(&snapshot, None).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &later), "encoded again once old");
        assert_eq!(
            later.message, first.message,
            "the same snapshot, the same bytes"
        );
    }
}
