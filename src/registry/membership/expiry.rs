//! Expiry: the timing wheel, lazy re-arm, and pause compensation.
//!
//! Owns: the `DelayQueue` of deadlines, the entries armed at each, and the
//! record of recent stalls.
//!
//! Buckets: the `DelayQueue` holds one item per millisecond at which some
//! entry is armed (deadlines are whole ms), and each millisecond keeps the
//! list of its entries. Arming is a push onto that list; a millisecond that
//! comes due hands its whole list over with one pop. A mass expiry of 100k
//! executors sharing a deadline is therefore one queue pop instead of 100k
//! (each of which would touch a random slab slot and re-create the queue's
//! timer), and an executor costs the queue a list slot, not a slab entry.
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

use std::collections::{HashMap, VecDeque};
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

/// Emptied lists kept for reuse, and the largest one kept.
const SPARE_LISTS: usize = 4096;
const SPARE_CAPACITY: usize = 1024;

/// Entries armed at each queued millisecond.
type Buckets = HashMap<u64, Vec<Arc<Entry>>, foldhash::fast::FixedState>;

/// What [`Wheel::rebuild`] replaced, for the caller to drop where it is
/// cheap.
pub(super) type Replaced = (DelayQueue<u64>, Buckets);

/// The timing wheel and the stalls it compensates.
pub(super) struct Wheel {
    /// One item per millisecond that has entries armed at it.
    queue: DelayQueue<u64>,
    /// Those entries, by millisecond.
    buckets: Buckets,
    /// Entries in the buckets, stale ones included.
    queued: usize,
    /// Emptied lists kept for new milliseconds: a fleet's steady re-arms
    /// fill and empty about one list per millisecond, and allocating each
    /// afresh (growing it 4, 8, 16… entries at a time) fragments the heap
    /// that every other allocation then searches.
    spare: Vec<Vec<Arc<Entry>>>,
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
            buckets: Buckets::default(),
            queued: 0,
            spare: Vec::new(),
            last_turn_ms: 0,
            stalls: VecDeque::new(),
        }
    }

    /// Queues `entry` at `deadline_ms`; the entry remembers it as its armed
    /// deadline, which makes every earlier queue entry of it stale.
    pub(super) fn arm(&mut self, clock: &Clock, entry: Arc<Entry>, deadline_ms: u64) {
        entry.set_armed_ms(deadline_ms);
        Self::push(
            &mut self.queue,
            &mut self.buckets,
            &mut self.spare,
            clock,
            entry,
            deadline_ms,
        );
        self.queued += 1;
    }

    /// Adds `entry` to the bucket of `deadline_ms`, queueing the bucket
    /// when it is new.
    fn push(
        queue: &mut DelayQueue<u64>,
        buckets: &mut Buckets,
        spare: &mut Vec<Vec<Arc<Entry>>>,
        clock: &Clock,
        entry: Arc<Entry>,
        deadline_ms: u64,
    ) {
        buckets
            .entry(deadline_ms)
            .or_insert_with(|| {
                queue.insert_at(deadline_ms, clock.instant_at(deadline_ms));
                spare.pop().unwrap_or_default()
            })
            .push(entry);
    }

    /// Moves every queue entry whose time came into `out` (each with the
    /// deadline it was armed at): one pass.
    pub(super) fn poll_expired(&mut self, cx: &mut Context<'_>, out: &mut Vec<(Arc<Entry>, u64)>) {
        while let Poll::Ready(Some(expired)) = self.queue.poll_expired(cx) {
            let ms = expired.into_inner();
            if let Some(mut bucket) = self.buckets.remove(&ms) {
                self.queued -= bucket.len();
                out.extend(bucket.drain(..).map(|entry| (entry, ms)));
                if self.spare.len() < SPARE_LISTS && bucket.capacity() <= SPARE_CAPACITY {
                    self.spare.push(bucket);
                }
            }
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

    /// Queued entries, stale ones included.
    pub(super) fn len(&self) -> usize {
        self.queued
    }

    /// Whether the wheel holds several times more entries than `live` needs
    /// (see [`crate::registry::tombstones::oversized`]).
    pub(super) fn oversized(&self, live: usize) -> bool {
        crate::registry::tombstones::oversized(self.queued, live)
    }

    /// Rebuilds the wheel with each of `members` that is not a tombstone
    /// queued once, at the deadline it is armed for (the one queue entry
    /// the loop acts on); what the old one held besides — departed entries,
    /// superseded re-arms — needs no timer. Returns the old queue and
    /// buckets, for the caller to drop where it is cheap. A deregistered
    /// entry stays queued until its deadline, so a burst of departures
    /// would otherwise keep its memory until then.
    pub(super) fn rebuild<'a>(
        &mut self,
        clock: &Clock,
        members: impl Iterator<Item = &'a Arc<Entry>>,
    ) -> Replaced {
        let mut queue = DelayQueue::new();
        let mut buckets = Buckets::default();
        let mut queued = 0;
        for entry in members {
            if entry.status() == Status::Tombstone {
                continue;
            }
            let deadline = entry.armed_ms();
            Self::push(
                &mut queue,
                &mut buckets,
                &mut self.spare,
                clock,
                entry.clone(),
                deadline,
            );
            queued += 1;
        }
        self.queued = queued;
        (
            std::mem::replace(&mut self.queue, queue),
            std::mem::replace(&mut self.buckets, buckets),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::registry::entry::ExecutorId;
    use crate::registry::labels::Labels;

    fn entry(n: u64, deadline_ms: u64) -> Arc<Entry> {
        Arc::new(Entry::new(
            ExecutorId::new(&format!("e-{n:016x}")),
            "e".into(),
            "127.0.0.1:1".into(),
            Labels::default(),
            0,
            Duration::from_millis(100),
            deadline_ms,
        ))
    }

    /// Polls the wheel once, without waiting.
    fn due(wheel: &mut Wheel) -> Vec<(Arc<Entry>, u64)> {
        let mut out = Vec::new();
        let waker = futures_util::task::noop_waker();
        wheel.poll_expired(&mut Context::from_waker(&waker), &mut out);
        out
    }

    #[tokio::test(start_paused = true)]
    async fn entries_sharing_a_millisecond_come_due_together_and_no_earlier() {
        let clock = Clock::start();
        let mut wheel = Wheel::new();
        let at_50: Vec<_> = (0..1000).map(|n| entry(n, 50)).collect();
        for e in &at_50 {
            wheel.arm(&clock, e.clone(), 50);
        }
        let later = entry(1000, 51);
        wheel.arm(&clock, later.clone(), 51);
        assert_eq!(wheel.len(), 1001);
        // One timer per millisecond, not per entry.
        assert_eq!(wheel.queue.len(), 2);

        tokio::time::sleep_until(clock.instant_at(49)).await;
        assert!(due(&mut wheel).is_empty(), "nothing before its deadline");

        tokio::time::sleep_until(clock.instant_at(50)).await;
        let popped = due(&mut wheel);
        assert_eq!(popped.len(), 1000);
        assert!(popped.iter().all(|(_, armed)| *armed == 50));
        assert_eq!(wheel.len(), 1);

        tokio::time::sleep_until(clock.instant_at(51)).await;
        let popped = due(&mut wheel);
        assert_eq!(popped.len(), 1);
        assert!(Arc::ptr_eq(&popped[0].0, &later));
        assert_eq!(wheel.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rebuild_keeps_each_live_member_once_at_its_armed_deadline() {
        let clock = Clock::start();
        let mut wheel = Wheel::new();
        let members: Vec<_> = (0..10).map(|n| entry(n, 40)).collect();
        for e in &members {
            // Queued twice: the first queue entry is superseded.
            wheel.arm(&clock, e.clone(), 80);
            wheel.arm(&clock, e.clone(), 40);
        }
        members[0].tombstone();
        assert_eq!(wheel.len(), 20);
        let _old = wheel.rebuild(&clock, members.iter());
        assert_eq!(wheel.len(), 9, "live members only, once each");
        tokio::time::sleep_until(clock.instant_at(40)).await;
        let popped = due(&mut wheel);
        assert_eq!(popped.len(), 9);
        assert!(
            popped
                .iter()
                .all(|(e, armed)| *armed == 40 && !Arc::ptr_eq(e, &members[0]))
        );
    }
}
