//! Group commit, and the ids it hands out.
//!
//! Owns: the store's worker, the registrations waiting for their commit
//! (and the ids reserved for them), the deletes waiting for theirs (and the
//! ids removed from membership whose row is still stored), and the one batch
//! in flight. While a batch is in flight the next one gathers: every
//! registration that arrived meanwhile goes in the next transaction. A
//! registration becomes visible (and is answered) only once its commit
//! landed; deletes go in later batches, chunked, and never hold a
//! registration back.
//!
//! Ids: `<name>-<16 lowercase hex>` of 64 random bits, never one that is
//! live, a tombstone, reserved, or still stored awaiting its delete.
//!
//! Revisions: the store keeps a floor above every revision assigned on it.
//! At start the registry resumes at the floor and stores one
//! [`REVISION_RANGE`] higher before it assigns any; when half of a range
//! is used, the next floor goes in the next batch. A `kill -9` can lose
//! only revisions below a durable floor, so none is ever assigned twice.
//!
//! Must not touch: the live table, the snapshot, events: the loop makes a
//! committed registration visible.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::registry::clock::{duration_ms, unix_now_ms};
use crate::registry::entry::{Entry, ExecutorId, IdHasher};
use crate::registry::error::RegistryError;
use crate::registry::labels::Labels;
use crate::registry::observer::{Observer, RegistrationResult};
use crate::registry::port::{Batch, StoreError, StoredExecutor};
use crate::registry::registration::ValidRegistration;
use crate::registry::tables::Tables;
use crate::registry::tombstones::oversized;
use crate::registry::worker::{Commit, StoreWorker};

/// Most deletes written in one store transaction.
const MAX_DELETES_PER_COMMIT: usize = 8192;
/// Wait before retrying deletes after a store failure.
const DELETE_RETRY: Duration = Duration::from_secs(1);
/// Revisions reserved at a time: the store's floor moves up by this much
/// when half of the reserved ones are used (and once at start), so a floor
/// is written about once per 2^31 changes — and a restart skips at most
/// this many revisions.
pub(crate) const REVISION_RANGE: u64 = 1 << 32;

/// Where a registration's answer goes.
pub(crate) type RegisterReply = oneshot::Sender<Result<Arc<Entry>, RegistryError>>;

/// A registration waiting for its commit.
pub(super) struct PendingRegistration {
    id: ExecutorId,
    registration: ValidRegistration,
    registered_unix_ms: u64,
    reply: RegisterReply,
}

impl PendingRegistration {
    /// The committed registration as a new INITING entry with `ttl_ms`,
    /// due at `now + ttl_ms`, and where to answer.
    pub(super) fn into_entry(self, ttl_ms: u64, now: u64) -> (Arc<Entry>, RegisterReply) {
        let ValidRegistration {
            name,
            address,
            labels,
            owner,
        } = self.registration;
        let entry = Entry::new(
            self.id,
            name.into(),
            address.into(),
            labels,
            self.registered_unix_ms,
            Duration::from_millis(ttl_ms),
            now + ttl_ms,
        )
        .with_owner(owner);
        (Arc::new(entry), self.reply)
    }

    fn stored(&self) -> StoredExecutor {
        let r = &self.registration;
        StoredExecutor {
            id: self.id.as_str().to_owned(),
            name: r.name.clone(),
            address: r.address.clone(),
            labels: r
                .labels
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            registered_unix_ms: self.registered_unix_ms,
            owner: r.owner.as_deref().map(str::to_owned),
            ttl: None,
        }
    }
}

/// What one store batch carried, to settle once it commits or fails.
pub(super) struct Submitted {
    registrations: Vec<PendingRegistration>,
    deletes: Vec<ExecutorId>,
    revision_floor: Option<u64>,
    ttls: Vec<(ExecutorId, u64)>,
}

/// A batch's outcome: what it carried, its result, how long it took.
pub(super) struct Committed {
    submitted: Submitted,
    result: Result<(), StoreError>,
    elapsed: Duration,
}

struct InFlight {
    commit: Commit,
    submitted: Submitted,
}

impl InFlight {
    /// A commit's answer; a store thread that went away is a failure too.
    fn outcome(
        submitted: Submitted,
        answer: Result<(Result<(), StoreError>, Duration), oneshot::error::RecvError>,
    ) -> Committed {
        let (result, elapsed) = answer.unwrap_or_else(|_| {
            (
                Err(StoreError::Failed("store thread stopped".to_owned())),
                Duration::ZERO,
            )
        });
        Committed {
            submitted,
            result,
            elapsed,
        }
    }
}

/// The loop's store work.
pub(super) struct Commits {
    store: StoreWorker,
    /// Ids handed out but not yet visible (registration being committed).
    reserved: HashSet<ExecutorId, IdHasher>,
    pending_registrations: Vec<PendingRegistration>,
    pending_deletes: Vec<ExecutorId>,
    /// Ids removed from membership whose store delete has not committed
    /// (pending or in flight). They are still rows in the store, so a new
    /// registration must not take one: its insert would collide with the
    /// row and fail the whole batch. Usually empty within milliseconds; it
    /// outlives the tombstone retention only while the store is failing.
    undeleted: HashSet<ExecutorId, IdHasher>,
    in_flight: Option<InFlight>,
    retry_deletes_at_ms: u64,
    /// The durable revision floor: revisions below it may be assigned.
    revisions_reserved: u64,
    /// A higher floor to store, not yet submitted.
    next_floor: Option<u64>,
    /// TTL ceilings (ms) to record, by id, not yet submitted: the latest
    /// of each (a store that records TTLs only).
    pending_ttls: HashMap<ExecutorId, u64, IdHasher>,
}

impl Commits {
    /// Store work on `store`, where revisions below `revisions_reserved`
    /// are reserved.
    pub(super) fn new(store: StoreWorker, revisions_reserved: u64) -> Self {
        Self {
            store,
            reserved: HashSet::default(),
            pending_registrations: Vec::new(),
            pending_deletes: Vec::new(),
            undeleted: HashSet::default(),
            in_flight: None,
            retry_deletes_at_ms: 0,
            revisions_reserved,
            next_floor: None,
            pending_ttls: HashMap::default(),
        }
    }

    /// Queues the record of `id`'s TTL ceiling.
    pub(super) fn record_ttl(&mut self, id: ExecutorId, ceiling_ms: u64) {
        self.pending_ttls.insert(id, ceiling_ms);
    }

    /// Revisions below this may be assigned.
    pub(super) fn revisions_reserved(&self) -> u64 {
        self.revisions_reserved
    }

    /// Once `revision` (the last assigned) used half of the reserved range,
    /// the next floor goes in the next batch.
    pub(super) fn reserve_after(&mut self, revision: u64) {
        let in_flight = self
            .in_flight
            .as_ref()
            .is_some_and(|f| f.submitted.revision_floor.is_some());
        if self.next_floor.is_none()
            && !in_flight
            && revision.saturating_add(REVISION_RANGE / 2) >= self.revisions_reserved
        {
            self.next_floor = Some(self.revisions_reserved.saturating_add(REVISION_RANGE));
        }
    }

    /// Registrations accepted but not yet visible.
    pub(super) fn reserved(&self) -> usize {
        self.reserved.len()
    }

    /// A fresh id, unique among live ids (which include every stored
    /// executor: all are loaded at start), tombstones, ids being registered,
    /// and ids still in the store awaiting their delete.
    pub(super) fn new_id(&self, name: &str, tables: &Tables) -> ExecutorId {
        let name = if name.is_empty() { "executor" } else { name };
        loop {
            let id = ExecutorId::new(&format!("{name}-{:016x}", id_suffix()));
            if !tables.live.contains_key(id.as_str())
                && !tables.tombstones.contains(id.as_str())
                && !self.reserved.contains(&id)
                && !self.undeleted.contains(&id)
            {
                return id;
            }
        }
    }

    /// Queues a registration for the next batch under `id` (from
    /// [`Self::new_id`]).
    pub(super) fn register(
        &mut self,
        id: ExecutorId,
        registration: ValidRegistration,
        reply: RegisterReply,
    ) {
        self.reserved.insert(id.clone());
        self.pending_registrations.push(PendingRegistration {
            id,
            registration,
            registered_unix_ms: unix_now_ms(),
            reply,
        });
    }

    /// Room for `more` deletes in this turn.
    pub(super) fn reserve_deletes(&mut self, more: usize) {
        self.undeleted.reserve(more);
        self.pending_deletes.reserve(more);
    }

    /// Queues the delete of a departed executor's row.
    pub(super) fn delete(&mut self, id: ExecutorId) {
        self.undeleted.insert(id.clone());
        self.pending_deletes.push(id);
    }

    /// The batch in flight, once it finished.
    pub(super) fn poll_committed(&mut self, cx: &mut Context<'_>) -> Option<Committed> {
        let in_flight = self.in_flight.as_mut()?;
        let Poll::Ready(answer) = Pin::new(&mut in_flight.commit).poll(cx) else {
            return None;
        };
        let in_flight = self.in_flight.take().expect("in_flight was Some");
        Some(InFlight::outcome(in_flight.submitted, answer))
    }

    /// Settles a finished batch: on success its deletes are done and its
    /// registrations are returned, for the loop to make visible; on failure
    /// its registrations are refused and its deletes retried later.
    pub(super) fn settle(
        &mut self,
        committed: Committed,
        now: u64,
        observer: &dyn Observer,
    ) -> Vec<PendingRegistration> {
        let Committed {
            submitted,
            result,
            elapsed,
        } = committed;
        observer.store_operation("commit", elapsed, result.is_ok());
        for pending in &submitted.registrations {
            self.reserved.remove(&pending.id);
        }
        match result {
            Ok(()) => {
                for id in &submitted.deletes {
                    self.undeleted.remove(id);
                }
                if let Some(floor) = submitted.revision_floor {
                    self.revisions_reserved = floor;
                }
                submitted.registrations
            }
            Err(error) => {
                tracing::warn!(%error, kind = error.kind(), registrations = submitted.registrations.len(), deletes = submitted.deletes.len(), "store commit failed");
                for pending in submitted.registrations {
                    observer.registration(RegistrationResult::Unavailable);
                    let _ = pending
                        .reply
                        .send(Err(RegistryError::Unavailable(error.to_string())));
                }
                self.pending_deletes.extend(submitted.deletes);
                self.next_floor = self.next_floor.max(submitted.revision_floor);
                for (id, ceiling) in submitted.ttls {
                    // A newer ceiling queued since wins.
                    self.pending_ttls.entry(id).or_insert(ceiling);
                }
                self.retry_deletes_at_ms = now + duration_ms(DELETE_RETRY);
                Vec::new()
            }
        }
    }

    /// Sends the next store batch if none is in flight: every pending
    /// registration, deletes (chunked; held back for a while after a
    /// failure, but never holding a registration back), and the next
    /// revision floor when [`Self::reserve_after`] asked for one.
    pub(super) fn submit(&mut self, now: u64) {
        if self.in_flight.is_some() {
            return;
        }
        let registrations = std::mem::take(&mut self.pending_registrations);
        let deletes: Vec<ExecutorId> = if now >= self.retry_deletes_at_ms {
            let n = self.pending_deletes.len().min(MAX_DELETES_PER_COMMIT);
            self.pending_deletes.drain(..n).collect()
        } else {
            Vec::new()
        };
        let revision_floor = self.next_floor.take();
        // Not for executors that left (their records go with their rows),
        // nor for ones still being registered.
        let ttls: Vec<(ExecutorId, u64)> = if now >= self.retry_deletes_at_ms {
            let undeleted = &self.undeleted;
            let reserved = &self.reserved;
            self.pending_ttls
                .drain()
                .filter(|(id, _)| !undeleted.contains(id) && !reserved.contains(id))
                .collect()
        } else {
            Vec::new()
        };
        if registrations.is_empty()
            && deletes.is_empty()
            && revision_floor.is_none()
            && ttls.is_empty()
        {
            return;
        }
        let batch = Batch {
            inserts: registrations
                .iter()
                .map(PendingRegistration::stored)
                .collect(),
            deletes: deletes.iter().map(|id| id.as_str().to_owned()).collect(),
            revision_floor,
            ttls: ttls
                .iter()
                .map(|(id, ms)| (id.as_str().to_owned(), Duration::from_millis(*ms)))
                .collect(),
        };
        self.in_flight = Some(InFlight {
            commit: self.store.submit(batch),
            submitted: Submitted {
                registrations,
                deletes,
                revision_floor,
                ttls,
            },
        });
    }

    /// Gives back the capacity a burst left in the id sets.
    pub(super) fn compact(&mut self) {
        if oversized(self.undeleted.capacity(), self.undeleted.len()) {
            self.undeleted.shrink_to_fit();
        }
        if oversized(self.reserved.capacity(), self.reserved.len()) {
            self.reserved.shrink_to_fit();
        }
    }

    /// At stop: refuses the registrations not yet submitted.
    pub(super) fn refuse_pending(&mut self) {
        for pending in std::mem::take(&mut self.pending_registrations) {
            self.reserved.remove(&pending.id);
            let _ = pending.reply.send(Err(RegistryError::ShuttingDown));
        }
    }

    /// At stop: waits for the batch in flight, if any.
    pub(super) async fn in_flight(&mut self) -> Option<Committed> {
        let in_flight = self.in_flight.take()?;
        let answer = in_flight.commit.await;
        Some(InFlight::outcome(in_flight.submitted, answer))
    }

    /// At stop: writes the pending deletes once (a failure leaves them for
    /// the next start, where those executors expire), then closes the store.
    pub(super) async fn flush(mut self, observer: &dyn Observer) {
        let mut flushed = 0;
        while !self.pending_deletes.is_empty() {
            self.retry_deletes_at_ms = 0;
            self.submit(0);
            let Some(committed) = self.in_flight().await else {
                break;
            };
            observer.store_operation("commit", committed.elapsed, committed.result.is_ok());
            if let Err(error) = committed.result {
                tracing::warn!(
                    %error,
                    left = self.pending_deletes.len() + committed.submitted.deletes.len(),
                    "could not flush deletes at shutdown; they expire at the next start"
                );
                break;
            }
            flushed += committed.submitted.deletes.len();
        }
        if flushed > 0 {
            tracing::info!(deletes = flushed, "flushed pending deletes at shutdown");
        }
        self.store.close();
    }
}

/// A stored executor as an INITING entry due at `now + left_ms`, with
/// `ttl_ms`. Labels that no longer validate are dropped (and said so).
pub(super) fn loaded_entry(row: StoredExecutor, ttl_ms: u64, left_ms: u64, now: u64) -> Arc<Entry> {
    let labels = match Labels::new(row.labels.iter().map(|(k, v)| (k, v))) {
        Ok(labels) => labels,
        Err(e) => {
            tracing::warn!(id = %row.id, error = %e, "stored executor has invalid labels; loading it without them");
            Labels::default()
        }
    };
    let entry = Entry::new(
        ExecutorId::new(&row.id),
        row.name.into(),
        row.address.into(),
        labels,
        row.registered_unix_ms,
        Duration::from_millis(ttl_ms),
        now + left_ms,
    )
    .with_owner(row.owner.map(Arc::from));
    Arc::new(entry)
}

/// The random 64 bits of a new id.
fn id_suffix() -> u64 {
    #[cfg(test)]
    if let Some(forced) = FORCED_ID_SUFFIXES.with_borrow_mut(|queue| queue.pop_front()) {
        return forced;
    }
    rand::random()
}

#[cfg(test)]
thread_local! {
    /// Suffixes [`id_suffix`] returns before random ones, on the thread the
    /// loop runs on (a current-thread test runtime): tests force an id
    /// collision with them.
    pub(crate) static FORCED_ID_SUFFIXES: std::cell::RefCell<std::collections::VecDeque<u64>> =
        const { std::cell::RefCell::new(std::collections::VecDeque::new()) };
}
