//! The tables shared by the heartbeat path, the readers and the membership
//! loop.
//!
//! Owns: [`Tables`], one per registry, behind an `Arc` that the
//! [`Registry`](super::Registry) handles and the loop share. Each field
//! names who writes it and who reads it. The rule that makes this safe
//! without a lock around the whole: membership (who is in the live table,
//! the snapshot, the events, the tombstones) has exactly one writer, the
//! membership loop; the heartbeat path writes only state words (through
//! their compare-and-swap), the status counters and the notice channel.
//!
//! Must not touch: the loop's private state (timing wheel, revision,
//! ordered member map, store batches): that is `super::membership`'s.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use tokio::sync::mpsc;

use super::clock::Clock;
use super::config::RegistryConfig;
use super::entry::{Entry, IdHasher, Status};
use super::guard::ExpiryGuardStatus;
use super::history::History;
use super::observer::Observer;
use super::snapshot::Snapshot;
use super::tombstones::Tombstones;

/// Shards of the id maps. DashMap's default (4 × cores, 8 here) makes every
/// heartbeat on two cores share a few lock words with the other core and with
/// the loop's removals; 128 shards cost ~10 KiB and spread both.
const LIVE_SHARDS: usize = 128;

/// A slot of the live table: the entry itself, hashed and compared by its id
/// (as `str`, so lookups take a `&str`). One pointer per slot where an
/// (id, entry) pair took three — at 1M executors, 16 B × 2M buckets.
#[derive(Clone)]
pub(crate) struct LiveEntry(pub(crate) Arc<Entry>);

impl std::ops::Deref for LiveEntry {
    type Target = Arc<Entry>;

    fn deref(&self) -> &Arc<Entry> {
        &self.0
    }
}

impl std::borrow::Borrow<str> for LiveEntry {
    fn borrow(&self) -> &str {
        self.0.id().as_str()
    }
}

impl std::hash::Hash for LiveEntry {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `str` hashes, which `Borrow<str>` requires.
        self.0.id().as_str().hash(state);
    }
}

impl PartialEq for LiveEntry {
    fn eq(&self, other: &Self) -> bool {
        self.0.id() == other.0.id()
    }
}

impl Eq for LiveEntry {}

/// An entry the heartbeat path points out to the loop.
pub(crate) struct Notice {
    /// The entry.
    pub entry: Arc<Entry>,
    /// Its TTL ceiling changed and must be recorded in the store.
    pub ttl_changed: bool,
}

/// The registry's shared tables.
pub(crate) struct Tables {
    /// Settings. Read-only after start.
    pub config: RegistryConfig,
    /// The registry clock. Read-only after start.
    pub clock: Clock,
    /// Live executors. The loop inserts and removes; the heartbeat path and
    /// `get` look up and CAS state words.
    pub live: DashMap<LiveEntry, (), IdHasher>,
    /// Ids expired or deregistered within the retention. The loop inserts
    /// and forgets; the heartbeat path looks up.
    pub tombstones: Tombstones,
    /// The current snapshot. The loop stores; readers load.
    pub snapshot: ArcSwap<Snapshot>,
    /// The last `--watch-history` membership events. The loop appends;
    /// watchers read at their own cursors.
    pub history: Arc<History>,
    /// Live executors INITING. The loop adds on insert and subtracts on
    /// removal; the heartbeat path moves one to `running` on a first
    /// heartbeat. Signed: a heartbeat moves INITING→RUNNING after its CAS
    /// while an expiry may already have counted the RUNNING one out, so a
    /// counter can dip below zero for an instant; readers clamp.
    pub initing: AtomicI64,
    /// Live executors RUNNING (same writers as `initing`).
    pub running: AtomicI64,
    /// Live members, for the suggested interval. The loop stores per turn.
    pub live_count: AtomicU64,
    /// Where the core reports what happens. Called by everyone; it never
    /// calls back.
    pub observer: Arc<dyn Observer>,
    /// Entries the loop must look at again: a first heartbeat (for the
    /// RUNNING event), a deadline a heartbeat moved below the queued one,
    /// or a TTL ceiling to record. The heartbeat path sends; the loop
    /// receives.
    pub notices: mpsc::UnboundedSender<Notice>,
    /// The store records TTL ceilings (`MembershipStore::records_ttls`).
    /// Read-only after start.
    pub records_ttls: bool,
    /// The mass-expiry guard's state. The loop publishes; readers load.
    pub guard: ArcSwap<ExpiryGuardStatus>,
}

impl Tables {
    /// Empty tables at `revision`; the loop's end of the notice channel is
    /// returned.
    pub(crate) fn new(
        config: RegistryConfig,
        observer: Arc<dyn Observer>,
        revision: u64,
        records_ttls: bool,
    ) -> (Self, mpsc::UnboundedReceiver<Notice>) {
        let (notices, notices_rx) = mpsc::unbounded_channel();
        let history = Arc::new(History::new(config.watch_history, revision));
        let guard = match config.expiry_guard {
            Some(guard) => ExpiryGuardStatus {
                enabled: true,
                fraction: guard.fraction,
                max_hold: guard.max_hold,
                ..ExpiryGuardStatus::OFF
            },
            None => ExpiryGuardStatus::OFF,
        };
        let tables = Self {
            config,
            clock: Clock::start(),
            live: DashMap::with_hasher_and_shard_amount(Default::default(), LIVE_SHARDS),
            tombstones: Default::default(),
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            history,
            initing: Default::default(),
            running: Default::default(),
            live_count: Default::default(),
            observer,
            notices,
            records_ttls,
            guard: ArcSwap::from_pointee(guard),
        };
        (tables, notices_rx)
    }

    /// Live executors with `status` (clamped at 0, see the counters).
    pub fn count_of(&self, status: Status) -> u64 {
        let counter = match status {
            Status::Initing => &self.initing,
            Status::Running => &self.running,
            Status::Tombstone => return 0,
        };
        u64::try_from(counter.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Moves the status counters for a transition out of `was`.
    pub fn count_leaving(&self, was: Status) {
        match was {
            Status::Initing => self.initing.fetch_sub(1, Ordering::Relaxed),
            Status::Running => self.running.fetch_sub(1, Ordering::Relaxed),
            Status::Tombstone => 0,
        };
    }
}
