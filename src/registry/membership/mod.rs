//! The single membership writer.
//!
//! Owns (exclusively): the revision counter, the event sender's order, the
//! mass-expiry guard's held executors, and — through its parts — the timing
//! wheel ([`expiry`]), the member map and mass changes ([`bulk`]), and the
//! store batches and ids ([`commit`]). Every membership change — register,
//! deregister, expiry, start-up load — is applied here, in order.
//!
//! One turn = everything ready at one wake-up: every queue entry whose time
//! came, every command waiting, every finished commit. A turn assigns one
//! revision per change, publishes one snapshot, *then* sends its events (so a
//! watcher that loads a snapshot never misses an event), then answers callers.
//! A turn with many departures removes them [`Removal::Deferred`] (see
//! [`bulk`]); the way is decided per turn and passed to every removal.
//!
//! Mass-expiry guard (when configured): executors whose deadline passed are
//! collected for the whole pass and `ExpiryGuard` decides whether they
//! expire now or are held; held ones are reviewed on every housekeeping
//! tick (revived ones go back to the wheel, released ones expire in one
//! pass). See `registry/guard.rs` for the rule and [`guarded`] for how the
//! loop applies it.
//!
//! Must not touch: I/O (the store runs on its own thread), gRPC types.

mod bulk;
mod changes;
mod commit;
mod expiry;
mod guarded;
mod turn;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::clock::duration_ms;
use super::entry::{Entry, Expiry, Status};
use super::error::RegistryError;
use super::event::{Event, EventKind, OfflineReason};
use super::guard::ExpiryGuard;
use super::observer::RegistrationResult;
use super::port::StoredExecutor;
use super::tables::{Notice, Tables};
use super::worker::{Loaded, StoreWorker};
use bulk::{Members, Removal};
use commit::Commits;

pub(crate) use commit::REVISION_RANGE;
use expiry::{Sifted, Wheel};
use turn::{Changes, Turn};

pub(crate) use turn::Command;

#[cfg(test)]
pub(crate) use bulk::BULK_REMOVALS;
#[cfg(test)]
pub(crate) use commit::FORCED_ID_SUFFIXES;
#[cfg(test)]
pub(crate) use expiry::RESUME_GRACE;
pub(crate) use expiry::TICK;

/// Most commands taken in one turn, so a flood of registrations cannot delay
/// expiry for long.
const MAX_COMMANDS_PER_TURN: usize = 8192;
/// Housekeeping ticks between two looks at the tables' spare capacity.
const COMPACT_EVERY_TICKS: u32 = 100;

/// Whether this process may decide expiries now. A replica answers true only
/// while its leader lease is confirmed, so a leader woken from a pause past
/// its lease expires nothing, not even in memory, before it steps down.
pub type Authority = Arc<dyn Fn() -> bool + Send + Sync>;

/// How a registry starts besides its store.
#[derive(Clone, Default)]
pub struct StartOptions {
    /// Taking over from another registry (a new leader): each stored
    /// executor comes back with its recorded TTL (or the init TTL when none
    /// is recorded) plus this grace — time for a live executor to find the
    /// new leader — instead of a fresh init TTL.
    pub takeover_grace: Option<Duration>,
    /// When set, expiries are decided only while it answers true.
    pub authority: Option<Authority>,
}

/// What a loop starts from: the stored executors and revisions, and how.
pub(crate) struct Start {
    pub(crate) loaded: Loaded,
    pub(crate) options: StartOptions,
}

/// The loop's private state.
pub(crate) struct MembershipLoop {
    tables: Arc<Tables>,
    commands: mpsc::Receiver<Command>,
    notices: mpsc::UnboundedReceiver<Notice>,
    wheel: Wheel,
    members: Members,
    commits: Commits,
    revision: u64,
    /// Housekeeping ticks until the next [`Self::compact_tables`].
    ticks_to_compaction: u32,
    /// The mass-expiry guard, when configured.
    guard: Option<ExpiryGuard<Arc<Entry>>>,
    /// When set, expiries wait while it answers false (a replica whose
    /// leader lease is not confirmed).
    authority: Option<Authority>,
    housekeeping: Interval,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl MembershipLoop {
    pub(crate) fn new(
        tables: Arc<Tables>,
        commands: mpsc::Receiver<Command>,
        notices: mpsc::UnboundedReceiver<Notice>,
        store: StoreWorker,
        start: Start,
        stop: CancellationToken,
    ) -> Self {
        let Start { loaded, options } = start;
        let mut housekeeping = tokio::time::interval(TICK);
        housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut this = Self {
            guard: tables.config.expiry_guard.map(ExpiryGuard::new),
            tables,
            commands,
            notices,
            wheel: Wheel::new(),
            members: Members::new(),
            commits: Commits::new(store, loaded.reserved),
            revision: loaded.revision,
            ticks_to_compaction: COMPACT_EVERY_TICKS,
            authority: options.authority,
            housekeeping,
            stop: Box::pin(stop.cancelled_owned()),
        };
        this.load(loaded.executors, options.takeover_grace);
        this
    }

    /// Start-up: every stored executor comes back INITING with a fresh init
    /// TTL; or, taking over (`grace`), with its recorded TTL (the init TTL
    /// when none is) plus the grace. Those that heartbeat carry on; the
    /// others expire.
    fn load(&mut self, loaded: Vec<StoredExecutor>, grace: Option<Duration>) {
        let now = self.tables.clock.now_ms();
        let init_ttl = duration_ms(self.tables.config.init_ttl);
        let mut entries = Vec::with_capacity(loaded.len());
        for row in loaded {
            let recorded = row.ttl.map(duration_ms);
            let (ttl, left) = match grace {
                None => (init_ttl, init_ttl),
                Some(grace) => {
                    let ttl = recorded.unwrap_or(init_ttl);
                    (ttl, ttl.saturating_add(duration_ms(grace)))
                }
            };
            let entry = commit::loaded_entry(row, ttl, left, now);
            // What the store holds now: the recorded ceiling, or (none
            // recorded) what a takeover would assume.
            entry.record_ttl(
                recorded.unwrap_or_else(|| self.tables.config.ttl_ceiling_ms(init_ttl)),
            );
            entries.push(Some(entry));
        }
        // Stores load in id order; the member map is a B-tree (see
        // `two_sweeps`).
        for i in bulk::two_sweeps(entries.len()) {
            if let Some(entry) = entries[i].take() {
                self.insert_live(entry);
            }
        }
        self.publish();
        tracing::info!(executors = self.members.live(), "loaded stored membership");
    }

    /// Runs until stopped, then flushes pending store work.
    pub(crate) async fn run(mut self) {
        loop {
            // Gathering a turn must not be cut short by tokio's cooperative
            // budget (128 operations per task poll): DelayQueue polls a timer
            // per popped entry and so runs out after ~128, splitting one
            // expiry pass into many turns. A turn is bounded anyway (what
            // expired, MAX_COMMANDS_PER_TURN); the loop pays one unit of
            // budget per turn instead, so it still yields under a flood.
            let turn =
                tokio::task::unconstrained(std::future::poll_fn(|cx| self.poll_turn(cx))).await;
            let stop = turn.stop;
            let heavy = turn.expired.len() >= bulk::BULK_REMOVALS || turn.unlink;
            self.apply(turn);
            self.commits.reserve_after(self.revision);
            self.commits.submit(self.tables.clock.now_ms());
            if stop {
                break;
            }
            if heavy {
                // After a long turn (a mass pass, unlinking after one), let
                // the worker turn the timer driver: its timers are only
                // processed when a worker parks or yields, and a loop that
                // keeps the worker busy through the following turns would
                // otherwise see the next millisecond's deadlines fire a
                // whole housekeeping tick late.
                tokio::task::yield_now().await;
            } else {
                tokio::task::consume_budget().await;
            }
        }
        self.finish().await;
    }

    /// Whether this process may decide expiries now (see [`Authority`]).
    fn may_expire(&self) -> bool {
        self.authority.as_ref().is_none_or(|may| may())
    }

    fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<Turn> {
        let mut turn = Turn::default();
        // Expired queue entries first, all of them: one pass. Without the
        // authority to decide expiries they stay queued (the housekeeping
        // tick brings the next turn).
        if self.may_expire() {
            self.wheel.poll_expired(cx, &mut turn.expired);
        }
        turn.purged = self.members.poll_purge(cx);
        turn.committed = self.commits.poll_committed(cx);
        while turn.commands.len() < MAX_COMMANDS_PER_TURN {
            match self.commands.poll_recv(cx) {
                Poll::Ready(Some(command)) => turn.commands.push(command),
                Poll::Ready(None) => {
                    turn.stop = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        while turn.notices.len() < MAX_COMMANDS_PER_TURN {
            match self.notices.poll_recv(cx) {
                Poll::Ready(Some(notice)) => turn.notices.push(notice),
                _ => break,
            }
        }
        if self.housekeeping.poll_tick(cx).is_ready() {
            turn.housekeeping = true;
        }
        turn.unlink = self.members.unlinking();
        if self.stop.as_mut().poll(cx).is_ready() {
            turn.stop = true;
        }
        if turn.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(turn)
        }
    }

    fn apply(&mut self, turn: Turn) {
        #[cfg(test)]
        let mut barriers = Vec::new();
        let now = self.tables.clock.now_ms();
        self.wheel.detect_stall(
            now,
            self.tables.config.stall_threshold,
            &*self.tables.observer,
        );
        let mut changes = Changes::default();
        if let Some(result) = turn.purged
            && self.members.purged(result)
        {
            self.store_snapshot();
        }
        let mut removal = Removal::for_departures(turn.expired.len());
        if removal == Removal::Deferred {
            // A mass pass: room for every departure at once, rather than
            // growing (and rehashing) the tables step by step.
            let departures = turn.expired.len();
            changes.events.reserve(departures);
            changes.lags.reserve(departures);
            self.members.reserve(departures);
            self.commits.reserve_deletes(departures);
        }
        if let Some(committed) = turn.committed {
            self.committed(committed, now, &mut changes);
        }
        for (entry, armed) in turn.expired {
            self.expire_or_rearm(entry, armed, now, removal, &mut changes);
        }
        // The guard's releases are expiries too: only with the authority.
        let may_expire = self.may_expire();
        let review = turn.housekeeping && may_expire;
        self.guard_turn(now, review, &mut removal, &mut changes);
        for notice in turn.notices {
            self.noticed(notice, &mut changes);
        }
        for command in turn.commands {
            match command {
                Command::Register {
                    registration,
                    reply,
                } => self.register(registration, reply, turn.stop),
                Command::Deregister { id, reply } => {
                    match self.deregister(&id, removal, &mut changes) {
                        Ok(()) => changes.deregistered.push(reply),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Command::ReleaseGuard { reply } if !may_expire => {
                    let _ = reply.send(Err(RegistryError::Unavailable(
                        "this replica's leadership is not confirmed: it expires nothing; retry"
                            .into(),
                    )));
                }
                Command::ReleaseGuard { reply } => {
                    self.release_guard(now, &mut removal, reply, &mut changes)
                }
                #[cfg(test)]
                Command::Barrier { reply } => barriers.push(reply),
            }
        }
        if turn.unlink {
            self.unlink_some(now);
        }
        if turn.housekeeping {
            self.housekeeping(now);
        }
        let guard_releases = std::mem::take(&mut changes.guard_releases);
        self.finish_turn(changes);
        self.publish_guard();
        for (reply, released) in guard_releases {
            let _ = reply.send(Ok(released));
        }
        #[cfg(test)]
        for reply in barriers {
            let _ = reply.send(());
        }
        self.members.start_purge();
    }

    fn expire_or_rearm(
        &mut self,
        entry: Arc<Entry>,
        armed: u64,
        now: u64,
        removal: Removal,
        changes: &mut Changes,
    ) {
        let entry = match self.wheel.sift(&self.tables.clock, entry, armed, now) {
            Sifted::Superseded => return,
            Sifted::Compensated => {
                changes.compensated += 1;
                return;
            }
            Sifted::Due(entry) => entry,
        };
        let state = entry.state();
        if self.guard.is_some() && state.status() != Status::Tombstone && state.deadline_ms() <= now
        {
            // The guard decides for the whole pass (`guard_turn`).
            changes.due.push(entry);
            return;
        }
        self.expire(entry, now, false, removal, changes);
    }

    /// Tombstones `entry` if its deadline passed (else queues it again) and
    /// records the OFFLINE event. `held`: the guard held it, so the time
    /// since its deadline is the hold, not expiry lag.
    fn expire(
        &mut self,
        entry: Arc<Entry>,
        now: u64,
        held: bool,
        removal: Removal,
        changes: &mut Changes,
    ) {
        match entry.try_expire(now) {
            Expiry::Alive { deadline_ms } => self.wheel.arm(&self.tables.clock, entry, deadline_ms),
            Expiry::Expired { deadline_ms, was } => {
                self.tables.count_leaving(was);
                if held {
                    changes.released += 1;
                } else {
                    changes
                        .lags
                        .push(Duration::from_millis(now.saturating_sub(deadline_ms)));
                }
                self.go_offline(entry, now, removal, OfflineReason::Expired, changes);
            }
            Expiry::AlreadyTombstone => {}
        }
    }

    fn insert_live(&mut self, entry: Arc<Entry>) {
        if entry.recorded_ttl_ms() == u64::MAX {
            // A registration: the store holds no TTL for it, which a
            // takeover reads as the init TTL.
            let init_ttl = duration_ms(self.tables.config.init_ttl);
            entry.record_ttl(self.tables.config.ttl_ceiling_ms(init_ttl));
        }
        let deadline = entry.state().deadline_ms();
        self.members.insert(&self.tables, entry.clone());
        self.wheel.arm(&self.tables.clock, entry, deadline);
    }

    /// Takes a (tombstoned) entry out of the live set — the id is
    /// remembered as a tombstone for the retention, and deleted from the
    /// store — and records its OFFLINE event for `reason`.
    fn go_offline(
        &mut self,
        entry: Arc<Entry>,
        now: u64,
        removal: Removal,
        reason: OfflineReason,
        changes: &mut Changes,
    ) {
        let forget_at = self.forget_at(now);
        self.members
            .remove(&self.tables, &entry, forget_at, removal);
        if removal == Removal::AtOnce {
            // A deferred removal deletes it from the store when unlinked.
            self.commits.delete(entry.id().clone());
        }
        let revision = self.next_revision();
        entry.set_offline_rev(revision);
        changes.events.push(Event {
            revision,
            kind: EventKind::Offline(reason),
            entry,
        });
    }

    /// When a departure at `now` stops being remembered as a tombstone.
    fn forget_at(&self, now: u64) -> u64 {
        now + duration_ms(self.tables.config.tombstone_retention)
    }

    /// Moves some of what a mass change left in the live table to the
    /// tombstone set, and queues their store deletes.
    fn unlink_some(&mut self, now: u64) {
        let forget_at = self.forget_at(now);
        let commits = &mut self.commits;
        self.members.unlink_some(&self.tables, forget_at, |entry| {
            commits.delete(entry.id().clone());
        });
    }

    /// Every [`TICK`]: tombstones past their retention are forgotten, the
    /// table sizes reported, and now and then the tables compacted.
    fn housekeeping(&mut self, now: u64) {
        self.members.forget_tombstones(now, &self.tables);
        self.tables
            .observer
            .tables(self.members.tombstones() as u64, self.wheel.len() as u64);
        self.ticks_to_compaction = self.ticks_to_compaction.saturating_sub(1);
        if self.ticks_to_compaction == 0 {
            self.ticks_to_compaction = COMPACT_EVERY_TICKS;
            self.compact_tables();
        }
    }

    /// Gives back the capacity a burst (a mass expiry or deregistration, a
    /// fleet that shrank) left in the tables. The timing wheel is rebuilt
    /// from the live members when its slab is several times larger than
    /// the live set — not while the guard holds executors (they are live
    /// but out of the wheel, and go back to it on their own).
    fn compact_tables(&mut self) {
        self.members.compact(&self.tables);
        self.commits.compact();
        let live = self.members.live();
        if self.wheel.oversized(live) && !self.guard.as_ref().is_some_and(|g| g.holding()) {
            let old = self
                .wheel
                .rebuild(&self.tables.clock, self.members.entries());
            self.members.release(old);
        }
    }

    fn next_revision(&mut self) -> u64 {
        self.revision += 1;
        if self.revision >= self.commits.revisions_reserved() {
            // Half a range (2^31 changes) went by while the next floor
            // could not be stored: the store has been failing that long.
            tracing::error!(
                revision = self.revision,
                reserved = self.commits.revisions_reserved(),
                "assigning a revision above the durable floor (the store keeps failing): a crash now could repeat it"
            );
        }
        self.revision
    }

    /// Publishes the snapshot, then the events, then answers callers.
    fn finish_turn(&mut self, changes: Changes) {
        if changes.compensated > 0 {
            tracing::warn!(
                executors = changes.compensated,
                "deadlines moved by the stall's length instead of expiring"
            );
        }
        if changes.events.is_empty() {
            return;
        }
        self.publish();
        let (mut online, mut running) = (0, 0);
        for event in &changes.events {
            match event.kind {
                EventKind::Online => online += 1,
                EventKind::Running => running += 1,
                EventKind::Offline(_) => {}
            }
        }
        let offline = changes.events.len() as u64 - online - running;
        let appended = self.tables.history.append(changes.events);
        let held = appended.held;
        self.members.release(appended.forgotten);
        let observer = &self.tables.observer;
        observer.events(online, running, offline);
        observer.history(held as u64);
        if changes.released > 0 {
            observer.released(changes.released);
        }
        if !changes.lags.is_empty() {
            observer.expired(&changes.lags);
            let max = changes.lags.iter().max().copied().unwrap_or_default();
            tracing::info!(
                expired = changes.lags.len(),
                max_lag_ms = max.as_millis() as u64,
                revision = self.revision,
                "expiry pass"
            );
        }
        for (reply, entry) in changes.registered {
            observer.registration(RegistrationResult::Ok);
            let _ = reply.send(Ok(entry));
        }
        for reply in changes.deregistered {
            observer.deregistered();
            let _ = reply.send(Ok(()));
        }
    }

    fn publish(&mut self) {
        self.store_snapshot();
        let tables = &self.tables;
        tables.observer.membership(
            self.revision,
            tables.count_of(Status::Initing),
            tables.count_of(Status::Running),
        );
    }

    /// Replaces the snapshot with the current members and revision.
    fn store_snapshot(&mut self) {
        let snapshot = self.members.snapshot(self.revision);
        let old = self.tables.snapshot.swap(Arc::new(snapshot));
        self.tables
            .live_count
            .store(self.members.live() as u64, Ordering::Relaxed);
        self.members.release(old);
    }

    /// After stop: refuse what is queued, let the in-flight commit land,
    /// flush the pending deletes once, and close the store.
    async fn finish(mut self) {
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Register { reply, .. } => {
                    let _ = reply.send(Err(RegistryError::ShuttingDown));
                }
                Command::Deregister { reply, .. } => {
                    let _ = reply.send(Err(RegistryError::ShuttingDown));
                }
                // Dropped unanswered: the caller sees the registry stopping.
                Command::ReleaseGuard { .. } => {}
                #[cfg(test)]
                Command::Barrier { .. } => {}
            }
        }
        // What a mass change left to unlink still owes its store deletes:
        // queue them all, so the flush below takes them.
        let now = self.tables.clock.now_ms();
        while self.members.unlinking() {
            self.unlink_some(now);
        }
        self.commits.refuse_pending();
        if let Some(committed) = self.commits.in_flight().await {
            let now = self.tables.clock.now_ms();
            let mut changes = Changes::default();
            self.committed(committed, now, &mut changes);
            self.finish_turn(changes);
        }
        self.tables.history.close();
        let Self {
            commits,
            tables,
            revision,
            ..
        } = self;
        commits.flush(&*tables.observer).await;
        tracing::info!(revision, "membership loop stopped");
    }
}
