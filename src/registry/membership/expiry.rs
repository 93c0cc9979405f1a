//! Expiry: the timing wheel, lazy re-arm, and pause compensation.
//!
//! Owns: the `DelayQueue` of deadlines and the record of recent stalls.
//!
//! Lazy re-arm: an entry sits in the queue once, at the deadline known when
//! it was queued (its `armed_ms`). When it pops, [`Wheel::sift`] reads its
//! state word: a queue entry that a later re-arm superseded is dropped; a
//! deadline that fell in a stall is compensated and queued again; anything
//! else goes back to the loop, which re-queues a later deadline or
//! tombstones a passed one by CAS. Heartbeats only write the state word;
//! when one *shortens* a deadline below the queued one (a smaller TTL) it
//! sends the entry on the re-arm channel and the loop queues it again,
//! earlier.
//!
//! Pause compensation: the loop wakes at least every [`TICK`]. A turn that
//! comes more than the stall threshold later than that means the process was
//! stalled (SIGSTOP, CPU starvation, a blocked runtime): heartbeats sent
//! meanwhile could not be read. An executor whose deadline fell in the stall
//! (or within [`RESUME_GRACE`] after it, while the backlog of heartbeats is
//! read) has its deadline moved by the length of the stall, and at least to
//! the end of that grace, instead of being expired (Eureka compensates its
//! eviction the same way). Those that really died still expire, at most one
//! stall + grace later. Each deadline is compensated at most once.
//!
//! Must not touch: membership (the loop decides what a due entry becomes),
//! events, revisions.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_util::time::DelayQueue;

use crate::registry::clock::{Clock, duration_ms};
use crate::registry::entry::{Entry, Status};
use crate::registry::observer::Observer;

/// The loop wakes at least this often (stall detection, and forgetting
/// tombstones past their retention).
pub(crate) const TICK: Duration = Duration::from_millis(100);
/// After a stall, deadlines this soon after the resume are compensated too:
/// the heartbeats queued during the stall are still being read.
pub(crate) const RESUME_GRACE: Duration = Duration::from_secs(1);

/// What a popped queue entry is.
pub(super) enum Sifted {
    /// A re-arm queued it again, earlier; that queue entry is the live one.
    Superseded,
    /// Its deadline fell in a stall: moved, and queued again.
    Compensated,
    /// For the loop to decide: a tombstone, or a deadline to expire or
    /// re-arm.
    Due(Arc<Entry>),
}

/// The timing wheel and the stalls it compensates.
pub(super) struct Wheel {
    queue: DelayQueue<(Arc<Entry>, u64)>,
    /// When the previous turn ran (registry ms), for stall detection.
    last_turn_ms: u64,
    /// Recent stalls `(start, end)`: deadlines in `(start, end + grace]` are
    /// compensated rather than expired.
    stalls: VecDeque<(u64, u64)>,
}

impl Wheel {
    pub(super) fn new() -> Self {
        Self {
            queue: DelayQueue::new(),
            last_turn_ms: 0,
            stalls: VecDeque::new(),
        }
    }

    /// Queues `entry` at `deadline_ms`; the entry remembers it as its armed
    /// deadline, which makes every earlier queue entry of it stale.
    pub(super) fn arm(&mut self, clock: &Clock, entry: Arc<Entry>, deadline_ms: u64) {
        entry.set_armed_ms(deadline_ms);
        self.queue
            .insert_at((entry, deadline_ms), clock.instant_at(deadline_ms));
    }

    /// Moves every queue entry whose time came into `out`: one pass.
    pub(super) fn poll_expired(&mut self, cx: &mut Context<'_>, out: &mut Vec<(Arc<Entry>, u64)>) {
        while let Poll::Ready(Some(expired)) = self.queue.poll_expired(cx) {
            out.push(expired.into_inner());
        }
    }

    /// Sorts out a popped queue entry armed at `armed` (see [`Sifted`]).
    pub(super) fn sift(
        &mut self,
        clock: &Clock,
        entry: Arc<Entry>,
        armed: u64,
        now: u64,
    ) -> Sifted {
        if armed != entry.armed_ms() {
            return Sifted::Superseded;
        }
        let state = entry.state();
        if state.status() != Status::Tombstone
            && state.deadline_ms() <= now
            && let Some(compensated) = self.compensated_deadline(state.deadline_ms())
        {
            // Its heartbeat may be among those the stall kept us from reading.
            entry.extend_deadline_to(compensated);
            let deadline = entry.state().deadline_ms();
            self.arm(clock, entry, deadline);
            return Sifted::Compensated;
        }
        Sifted::Due(entry)
    }

    /// Notes a stall if this turn came much later than the tick allows, and
    /// forgets stalls whose compensation window has passed.
    pub(super) fn detect_stall(&mut self, now: u64, threshold: Duration, observer: &dyn Observer) {
        let gap = now.saturating_sub(self.last_turn_ms);
        self.last_turn_ms = now;
        let grace = duration_ms(RESUME_GRACE);
        while let Some(&(_, end)) = self.stalls.front() {
            if end + grace >= now {
                break;
            }
            self.stalls.pop_front();
        }
        if threshold.is_zero() || gap <= duration_ms(TICK + threshold) {
            return;
        }
        let stalled_ms = gap - duration_ms(TICK);
        tracing::warn!(
            stalled_ms,
            "the registry was stalled (paused, starved or blocked); deadlines that fell in the stall move by its length"
        );
        observer.stalled(Duration::from_millis(stalled_ms));
        self.stalls.push_back((now - stalled_ms, now));
    }

    /// If a deadline fell in a recent stall (or its resume grace), the
    /// deadline it gets instead: moved by the stall's length, and at least to
    /// the end of the grace — which lies outside the window, so no deadline
    /// is compensated twice.
    fn compensated_deadline(&self, deadline_ms: u64) -> Option<u64> {
        let grace = duration_ms(RESUME_GRACE);
        self.stalls
            .iter()
            .find(|&&(start, end)| deadline_ms > start && deadline_ms < end + grace)
            .map(|&(start, end)| (deadline_ms + (end - start)).max(end + grace))
    }

    /// Queue entries, stale ones included.
    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether the slab is several times larger than `live` needs (see
    /// [`crate::registry::tombstones::oversized`]).
    pub(super) fn oversized(&self, live: usize) -> bool {
        crate::registry::tombstones::oversized(self.queue.capacity(), live)
    }

    /// Rebuilds the wheel with each of `members` that is not a tombstone
    /// queued once, at the deadline it is armed for (the one queue entry
    /// the loop acts on); what the old one held besides — departed entries,
    /// superseded re-arms — needs no timer. Returns the old queue, for the
    /// caller to drop where it is cheap. The slab keeps the capacity of its
    /// peak (its entries cannot move), and a deregistered entry stays queued
    /// until its deadline, so a burst of departures would otherwise keep its
    /// memory.
    pub(super) fn rebuild<'a>(
        &mut self,
        clock: &Clock,
        live: usize,
        members: impl Iterator<Item = &'a Arc<Entry>>,
    ) -> DelayQueue<(Arc<Entry>, u64)> {
        // Room for half as many again, so the churn that follows does not
        // double the new slab at once.
        let mut queue = DelayQueue::with_capacity(live + live / 2);
        for entry in members {
            if entry.status() == Status::Tombstone {
                continue;
            }
            let deadline = entry.armed_ms();
            queue.insert_at((entry.clone(), deadline), clock.instant_at(deadline));
        }
        std::mem::replace(&mut self.queue, queue)
    }
}
