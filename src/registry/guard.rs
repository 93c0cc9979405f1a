//! The mass-expiry guard (opt-in: `--expiry-guard-fraction`).
//!
//! Owns: the decision whether executors whose deadline passed expire now or
//! are *held*; the list of held executors; the window of recent expirations
//! it judges by; and the episode (since when it holds, and why it lets go).
//!
//! The rule. F is the configured fraction; at the moment of a decision,
//! L = live executors (those due and those held included: they are still
//! live), R = executors expired within the last TTL (each one counts for
//! its own TTL after it expired), D = executors due in this pass, H = those
//! held:
//!
//! - **Trip.** A pass is held, whole, when `R + D > F · (L + R)`: more than F
//!   of the fleet — as it is now, plus what it lost to expiry within the last
//!   TTL — would have expired within one TTL. Nothing of it is removed.
//! - **Hold.** While the guard holds, every executor that comes due joins the
//!   held ones. Held executors are left as they are: live, in lists and
//!   snapshots, with their status. A heartbeat revives one (the membership
//!   loop queues it again at its new deadline); a deregistration removes one.
//! - **Recovery.** Once `R + H ≤ F · (L + R)` — heartbeats revived enough of
//!   them, the fleet grew, or old expirations left the window — and that has
//!   held for the longest TTL among the held (so each had a full TTL to
//!   heartbeat again), the rest expire, in one pass. If heartbeats revive all
//!   of them, nobody is removed.
//! - **Max hold, operator.** After `max_hold` of holding, or when an operator
//!   releases it, everything still held expires in one pass and the window
//!   is cleared: the fleet as it is after the release is the new baseline, so
//!   the guard cannot trip again on the same loss, and cannot stay stuck.
//!
//! The guard cannot see expiries that have not happened yet: when a mass
//! failure's deadlines spread over several passes, passes go through until
//! the next one would take the window over F, and from that one on they are
//! held. A pass of coinciding deadlines is held whole.
//!
//! Pure: no clock, no I/O. Time comes in as registry ms, the fleet as
//! counts, and the caller classifies held items ([`Held`], which reads an
//! entry's state word); the membership loop applies the answers. Must not
//! touch: state words (it never writes one), the timing wheel, events or
//! revisions.

use std::collections::BTreeMap;
use std::time::Duration;

use super::clock::duration_ms;
use super::entry::{Entry, Status};

/// Settings of the guard.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpiryGuardConfig {
    /// Hold a pass that would take the expirations within one TTL above this
    /// fraction of the fleet. In `(0, 1]`.
    pub fraction: f64,
    /// Longest a guard episode lasts: then everything held expires.
    pub max_hold: Duration,
}

impl ExpiryGuardConfig {
    /// Default `max_hold`: longer than any heartbeat interval the default
    /// `--max-heartbeat-ttl` (10 minutes) allows, so a fleet that is alive has
    /// time to be heard again.
    pub const DEFAULT_MAX_HOLD: Duration = Duration::from_secs(600);
}

/// What a held item is now, as the caller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Held {
    /// Still past its deadline; `ttl_ms` is its TTL.
    Due {
        /// Its TTL (ms).
        ttl_ms: u64,
    },
    /// A heartbeat moved its deadline into the future.
    Revived,
    /// No longer live (deregistered).
    Gone,
}

impl Held {
    /// What a held entry is at `now` (registry ms).
    pub(crate) fn of(entry: &Entry, now: u64) -> Self {
        let state = entry.state();
        if state.status() == Status::Tombstone {
            Self::Gone
        } else if state.deadline_ms() > now {
            Self::Revived
        } else {
            Self::Due {
                ttl_ms: entry.ttl_ms(),
            }
        }
    }
}

/// The guard's answer for one pass.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pass<T> {
    /// These expire now.
    Expire(Vec<T>),
    /// The pass is held.
    Held,
}

/// The outcome of a review of the held items.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Review<T> {
    /// Heartbeats revived these: queue them again.
    pub revived: Vec<T>,
    /// These expire now, in one pass.
    pub released: Vec<T>,
}

impl<T> Default for Review<T> {
    fn default() -> Self {
        Self {
            revived: Vec::new(),
            released: Vec::new(),
        }
    }
}

/// The guard's state as readers see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpiryGuardStatus {
    /// The guard is on (`--expiry-guard-fraction` given).
    pub enabled: bool,
    /// It holds expirations now.
    pub active: bool,
    /// Executors held now (as of the last review, at most 100 ms old).
    pub held: u64,
    /// Executors expired within the last TTL: the window it judges by.
    pub recently_expired: u64,
    /// Wall-clock ms since the Unix epoch when this episode began.
    pub since_unix_ms: Option<u64>,
    /// The configured fraction (0 when off).
    pub fraction: f64,
    /// The configured longest hold.
    pub max_hold: Duration,
}

impl ExpiryGuardStatus {
    /// The state of a guard that is off.
    pub const OFF: Self = Self {
        enabled: false,
        active: false,
        held: 0,
        recently_expired: 0,
        since_unix_ms: None,
        fraction: 0.0,
        max_hold: Duration::ZERO,
    };
}

/// Counts of a guard, in registry ms.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    pub held: u64,
    pub recently_expired: u64,
    pub since_ms: Option<u64>,
}

/// The guard. `T` is what it holds (the loop: `Arc<Entry>`).
pub(crate) struct ExpiryGuard<T> {
    config: ExpiryGuardConfig,
    /// Expirations let through, by the ms at which each stops counting.
    window: BTreeMap<u64, u64>,
    /// Sum of `window`.
    recent: u64,
    /// Held items, with their TTL (ms) as last seen.
    held: Vec<(T, u64)>,
    /// When the episode started (Some iff something is held).
    since_ms: Option<u64>,
    /// Since when the recovery condition has held without a break.
    calm_since_ms: Option<u64>,
}

impl<T> ExpiryGuard<T> {
    pub(crate) fn new(config: ExpiryGuardConfig) -> Self {
        Self {
            config,
            window: BTreeMap::new(),
            recent: 0,
            held: Vec::new(),
            since_ms: None,
            calm_since_ms: None,
        }
    }

    /// The state to publish; `unix_ms` maps registry ms to wall-clock ms.
    pub(crate) fn status(&self, unix_ms: impl Fn(u64) -> u64) -> ExpiryGuardStatus {
        ExpiryGuardStatus {
            enabled: true,
            active: self.since_ms.is_some(),
            held: self.held.len() as u64,
            recently_expired: self.recent,
            since_unix_ms: self.since_ms.map(unix_ms),
            fraction: self.config.fraction,
            max_hold: self.config.max_hold,
        }
    }

    /// Whether it holds anything now.
    pub(crate) fn holding(&self) -> bool {
        self.since_ms.is_some()
    }

    /// The current counts.
    #[cfg(test)]
    pub(crate) fn counts(&self) -> Counts {
        Counts {
            held: self.held.len() as u64,
            recently_expired: self.recent,
            since_ms: self.since_ms,
        }
    }

    /// Whether `expiring` (within one TTL) is more than the fraction of a
    /// fleet of `live` now plus the ones expired within the window.
    fn over(&self, expiring: u64, live: u64) -> bool {
        expiring as f64 > self.config.fraction * live.saturating_add(self.recent) as f64
    }

    /// Counts an expiry (of an executor with `ttl_ms`) in the window.
    fn record(&mut self, ttl_ms: u64, now: u64) {
        *self.window.entry(now.saturating_add(ttl_ms)).or_default() += 1;
        self.recent += 1;
    }

    /// Drops expirations older than their TTL from the window.
    fn forget(&mut self, now: u64) {
        while let Some(entry) = self.window.first_entry() {
            if *entry.key() > now {
                break;
            }
            self.recent -= entry.remove();
        }
    }

    /// One expiry pass: `due` (item, TTL in ms) are past their deadline, in a
    /// fleet of `live` executors (`due` and held included).
    ///
    /// What it lets through is counted as expired: a heartbeat that races
    /// the caller's expiry may keep one of them alive, and the window then
    /// counts one expiry too many for a TTL (on the side of holding).
    pub(crate) fn pass(&mut self, due: Vec<(T, u64)>, live: u64, now: u64) -> Pass<T> {
        self.forget(now);
        if due.is_empty() {
            return Pass::Expire(Vec::new());
        }
        let count = due.len() as u64;
        if self.since_ms.is_some() {
            self.held.extend(due);
            return Pass::Held;
        }
        if self.over(self.recent + count, live) {
            tracing::warn!(
                held = count,
                live,
                expired_within_ttl = self.recent,
                fraction = self.config.fraction,
                "expiry guard tripped: holding a mass expiry (more than the fraction of the fleet within one TTL); \
                 heartbeats revive held executors; release with `executor-registry ctl guard release`"
            );
            self.held = due;
            self.since_ms = Some(now);
            self.calm_since_ms = None;
            return Pass::Held;
        }
        let mut expire = Vec::with_capacity(due.len());
        for (item, ttl_ms) in due {
            self.record(ttl_ms, now);
            expire.push(item);
        }
        Pass::Expire(expire)
    }

    /// Looks at every held item (`classify`): revived ones are handed back,
    /// gone ones dropped; then decides whether the episode ends (recovery,
    /// max hold). The caller reviews periodically while something is held.
    pub(crate) fn review(
        &mut self,
        live: u64,
        now: u64,
        mut classify: impl FnMut(&T) -> Held,
    ) -> Review<T> {
        let mut review = Review::default();
        let Some(since) = self.since_ms else {
            return review;
        };
        self.forget(now);
        let mut still = Vec::with_capacity(self.held.len());
        for (item, ttl_ms) in std::mem::take(&mut self.held) {
            match classify(&item) {
                Held::Due { ttl_ms: now_ttl } => still.push((item, now_ttl.max(ttl_ms))),
                Held::Revived => review.revived.push(item),
                Held::Gone => {}
            }
        }
        self.held = still;
        let held = self.held.len() as u64;
        if held == 0 {
            tracing::warn!(
                revived = review.revived.len(),
                "expiry guard released: heartbeats revived every held executor; nobody expired"
            );
            self.end();
            return review;
        }
        if now.saturating_sub(since) >= duration_ms(self.config.max_hold) {
            tracing::warn!(
                expiring = held,
                held_ms = now - since,
                "expiry guard held for its maximum (--expiry-guard-max-hold): expiring what is still held, in one pass"
            );
            review.released = self.release_all();
            return review;
        }
        if self.over(self.recent + held, live) {
            self.calm_since_ms = None;
            return review;
        }
        let calm_since = *self.calm_since_ms.get_or_insert(now);
        let settle = self.held.iter().map(|&(_, ttl)| ttl).max().unwrap_or(0);
        if now.saturating_sub(calm_since) >= settle {
            tracing::warn!(
                expiring = held,
                live,
                held_ms = now - since,
                "expiry guard released: heartbeats recovered (what is held is within the fraction); \
                 expiring the executors still silent, in one pass"
            );
            let released: Vec<(T, u64)> = std::mem::take(&mut self.held);
            for (item, ttl_ms) in released {
                self.record(ttl_ms, now);
                review.released.push(item);
            }
            self.end();
        }
        review
    }

    /// Operator release: everything held, to expire now in one pass; the
    /// window starts afresh from the fleet as it is after it.
    pub(crate) fn release(&mut self, now: u64) -> Vec<T> {
        if let Some(since) = self.since_ms {
            tracing::warn!(
                expiring = self.held.len(),
                held_ms = now.saturating_sub(since),
                "expiry guard released by an operator: expiring what is held, in one pass"
            );
        }
        self.release_all()
    }

    fn release_all(&mut self) -> Vec<T> {
        let released = std::mem::take(&mut self.held)
            .into_iter()
            .map(|(item, _)| item)
            .collect();
        self.window.clear();
        self.recent = 0;
        self.end();
        released
    }

    fn end(&mut self) {
        self.since_ms = None;
        self.calm_since_ms = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: u64 = 1_000;

    fn guard(fraction: f64) -> ExpiryGuard<u32> {
        ExpiryGuard::new(ExpiryGuardConfig {
            fraction,
            max_hold: Duration::from_secs(60),
        })
    }

    fn due(range: std::ops::Range<u32>) -> Vec<(u32, u64)> {
        range.map(|i| (i, TTL)).collect()
    }

    fn expired(pass: Pass<u32>) -> Vec<u32> {
        match pass {
            Pass::Expire(items) => items,
            Pass::Held => panic!("the pass was held"),
        }
    }

    #[test]
    fn a_pass_above_the_fraction_is_held_whole_and_one_at_it_goes_through() {
        let mut g = guard(0.5);
        assert_eq!(g.pass(due(0..501), 1_000, 10), Pass::Held);
        assert_eq!(g.counts().held, 501);
        assert_eq!(g.counts().since_ms, Some(10));

        let mut g = guard(0.5);
        assert_eq!(expired(g.pass(due(0..500), 1_000, 10)).len(), 500);
        assert_eq!(g.counts().held, 0);
        assert_eq!(g.counts().recently_expired, 500);
    }

    #[test]
    fn expirations_count_for_one_ttl_against_the_fleet_plus_them() {
        let within = || {
            let mut g = guard(0.5);
            // 400 of 1,000 go; the fleet is now 600, the baseline 600 + 400.
            expired(g.pass(due(0..400), 1_000, 0));
            // 100 more within the TTL: 500 of 1,000, not more: they go.
            expired(g.pass(due(400..500), 600, TTL - 1));
            g
        };
        // One more within the TTL of the first 400: held.
        assert_eq!(within().pass(due(500..501), 500, TTL - 1), Pass::Held);
        // At their TTL the first 400 leave the window: 101 of 600 is fine.
        let mut g = within();
        assert_eq!(expired(g.pass(due(500..501), 500, TTL)), vec![500]);
        assert_eq!(g.counts().recently_expired, 101);
    }

    #[test]
    fn a_gradual_decline_never_trips_whatever_its_total() {
        let mut g = guard(0.5);
        let mut live = 1_000u64;
        let mut now = 0;
        let mut next = 0u32;
        // A third of the fleet every TTL, for 20 TTLs: 1,000 down to 0.
        while live > 0 {
            let n = live.div_ceil(3).min(live) as u32;
            let batch = due(next..next + n);
            next += n;
            let expired = expired(g.pass(batch, live, now));
            live -= expired.len() as u64;
            now += TTL;
            if live == 1 {
                break;
            }
        }
        assert_eq!(g.counts().since_ms, None);
    }

    #[test]
    fn while_holding_every_due_item_joins_the_held_ones() {
        let mut g = guard(0.5);
        assert_eq!(g.pass(due(0..600), 1_000, 0), Pass::Held);
        assert_eq!(g.pass(due(600..601), 1_000, 5), Pass::Held);
        assert_eq!(g.counts().held, 601);
        assert_eq!(g.counts().since_ms, Some(0));
    }

    #[test]
    fn heartbeats_reviving_every_held_item_end_the_episode_with_nobody_expired() {
        let mut g = guard(0.5);
        g.pass(due(0..600), 1_000, 0);
        let review = g.review(1_000, 100, |_| Held::Revived);
        assert_eq!(review.revived.len(), 600);
        assert!(review.released.is_empty());
        assert_eq!(g.counts().since_ms, None, "the episode ended");
        assert_eq!(g.counts().recently_expired, 0);
    }

    #[test]
    fn partial_recovery_waits_one_ttl_of_calm_then_releases_the_rest() {
        let mut g = guard(0.5);
        g.pass(due(0..600), 1_000, 0);
        // Heartbeats revive 200: 400 of 1,000 held, within the fraction. The
        // calm starts; nothing goes yet.
        let review = g.review(1_000, 100, |&i| {
            if i < 200 {
                Held::Revived
            } else {
                Held::Due { ttl_ms: TTL }
            }
        });
        assert_eq!(review.revived.len(), 200);
        assert!(review.released.is_empty());
        assert_eq!(g.counts().since_ms, Some(0));
        // More revive during the calm; the rest goes one TTL after it began.
        let silent = |i: &u32| {
            if *i < 300 {
                Held::Revived
            } else {
                Held::Due { ttl_ms: TTL }
            }
        };
        let review = g.review(1_000, 100 + TTL - 1, silent);
        assert_eq!(review.revived.len(), 100);
        assert!(review.released.is_empty());
        let review = g.review(1_000, 100 + TTL, silent);
        assert_eq!(review.released, (300..600).collect::<Vec<_>>());
        // Released ones count as expirations within their TTL.
        assert_eq!(g.counts().recently_expired, 300);
        assert_eq!(g.counts().since_ms, None);
    }

    #[test]
    fn calm_broken_by_new_due_items_starts_over() {
        let mut g = guard(0.5);
        g.pass(due(0..600), 1_000, 0);
        let first_half = |i: &u32| {
            if *i < 300 {
                Held::Revived
            } else {
                Held::Due { ttl_ms: TTL }
            }
        };
        g.review(1_000, 100, first_half);
        // 300 held of 1,000: calm. Then 300 more come due: 600, over.
        assert_eq!(g.pass(due(600..900), 1_000, 200), Pass::Held);
        let review = g.review(1_000, 100 + TTL, first_half);
        assert!(review.released.is_empty());
        assert_eq!(g.counts().held, 600);
        assert_eq!(g.counts().since_ms, Some(0));
    }

    #[test]
    fn gone_items_are_dropped_and_the_longest_ttl_sets_the_calm() {
        let mut g = guard(0.5);
        g.pass(vec![(1, TTL), (2, TTL), (3, TTL)], 4, 0);
        assert_eq!(g.counts().held, 3);
        let classify = |i: &u32| match i {
            1 => Held::Gone,
            2 => Held::Due { ttl_ms: 5 * TTL },
            _ => Held::Revived,
        };
        // One held of 4 live: within the fraction; calm for 5 TTLs.
        let review = g.review(4, 10, classify);
        assert_eq!(review.revived, vec![3]);
        assert_eq!(g.counts().held, 1);
        assert!(g.review(4, 10 + 5 * TTL - 1, classify).released.is_empty());
        assert_eq!(g.review(4, 10 + 5 * TTL, classify).released, vec![2]);
    }

    #[test]
    fn max_hold_releases_everything_and_clears_the_window() {
        let mut g = guard(0.5);
        expired(g.pass(due(0..100), 1_000, 0));
        g.pass(due(100..700), 900, 10);
        let still = |_: &u32| Held::Due { ttl_ms: TTL };
        assert!(g.review(900, 60_009, still).released.is_empty());
        let review = g.review(900, 60_010, still);
        assert_eq!(review.released.len(), 600);
        assert_eq!(g.counts().since_ms, None);
        assert_eq!(g.counts().recently_expired, 0);
        // The baseline is the fleet after the release: 300. A third of it
        // at once goes through; more than half would trip again.
        expired(g.pass(due(700..800), 300, 60_020));
        assert_eq!(g.pass(due(800..860), 200, 60_030), Pass::Held);
    }

    #[test]
    fn operator_release_hands_back_everything_held_and_nothing_when_idle() {
        let mut g = guard(0.2);
        assert!(g.release(0).is_empty());
        g.pass(due(0..30), 100, 0);
        assert_eq!(g.release(5).len(), 30);
        assert_eq!(g.counts().held, 0);
        assert_eq!(g.counts().since_ms, None);
        assert!(g.release(6).is_empty());
    }

    #[test]
    fn the_published_status_shows_the_episode_in_wall_clock_time() {
        let mut g = guard(0.5);
        let armed = g.status(|ms| ms + 1_000_000);
        assert!(armed.enabled && !armed.active);
        assert_eq!((armed.held, armed.since_unix_ms), (0, None));
        assert_eq!(armed.max_hold, Duration::from_secs(60));
        g.pass(due(0..6), 10, 42);
        let active = g.status(|ms| ms + 1_000_000);
        assert!(active.active);
        assert_eq!(active.held, 6);
        assert_eq!(active.since_unix_ms, Some(1_000_042));
        assert_eq!(active.fraction, 0.5);
    }

    #[test]
    fn a_held_entry_is_due_revived_or_gone_by_its_state_word() {
        use crate::registry::entry::ExecutorId;
        use crate::registry::labels::Labels;
        let entry = Entry::new(
            ExecutorId::new("w-0000000000000001"),
            "w".into(),
            "127.0.0.1:1".into(),
            Labels::default(),
            0,
            Duration::from_millis(TTL),
            500,
        );
        assert_eq!(Held::of(&entry, 500), Held::Due { ttl_ms: TTL });
        entry.heartbeat(600, Some(2 * TTL));
        assert_eq!(Held::of(&entry, 700), Held::Revived);
        assert_eq!(
            Held::of(&entry, 600 + 2 * TTL),
            Held::Due { ttl_ms: 2 * TTL }
        );
        entry.tombstone();
        assert_eq!(Held::of(&entry, 700), Held::Gone);
    }

    #[test]
    fn a_fraction_of_one_never_holds() {
        let mut g = guard(1.0);
        assert_eq!(expired(g.pass(due(0..10), 10, 0)).len(), 10);
        assert_eq!(g.counts().held, 0);
    }
}
