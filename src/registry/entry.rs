//! One executor's record and its state word.
//!
//! Owns: the `Entry` of a registered executor — its immutable identity (id,
//! name, address, labels, registration time) and its mutable liveness, packed
//! into one `AtomicU64` (status + deadline) so that heartbeats and expiry
//! decide by compare-and-swap on a single word.
//!
//! Invariants:
//! - `TOMBSTONE` is final: no transition leaves it.
//! - A heartbeat that returned OK wrote a deadline that any later expiry
//!   decision reads (the expiry CAS fails if a heartbeat changed the word).
//! - `armed_ms`, `running_rev` and `offline_rev` are written only by the
//!   membership loop. The two revisions say what the loop *published*: a
//!   snapshot at revision R shows an entry as of R ([`Entry::status_at`]),
//!   whatever its state word says now, so that applying the events after R
//!   to it gives exactly a later snapshot, statuses included.
//!
//! Must not touch: maps, queues, I/O. Time is passed in as milliseconds on
//! the registry clock (see [`super::clock`]).

use std::sync::Arc;
#[cfg(not(registry_loom))]
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

// Model checking: under `--cfg registry_loom` the state word uses loom's
// atomics, and `loom_tests` below explores every interleaving.
#[cfg(registry_loom)]
use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::clock::duration_ms;
use super::labels::{Labels, LabelsRef};

/// Hasher of the id tables (live table, tombstones, reserved ids): foldhash,
/// several times cheaper than SipHash on the heartbeat path. Hash flooding
/// needs inserts, and only the registry inserts, with ids it generated (64
/// random bits); lookups of hostile ids cannot degrade a table. Seeded
/// randomly per process.
pub(crate) type IdHasher = foldhash::fast::RandomState;

/// Identifier of an executor: `<name>-<16 lowercase hex>`.
///
/// Shared (`Arc<str>`) between the live table, the snapshot and the entry, so
/// that holding it in several indexes costs one allocation.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExecutorId(Arc<str>);

impl ExecutorId {
    /// Wraps an id string (no validation: ids come from the registry itself
    /// or from the store it wrote).
    pub fn new(id: &str) -> Self {
        Self(Arc::from(id))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for ExecutorId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ExecutorId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for ExecutorId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// Liveness status of an executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Registered (or loaded at start-up), no heartbeat yet.
    Initing,
    /// Has heartbeated at least once; schedulable.
    Running,
    /// Expired or deregistered; final.
    Tombstone,
}

const STATUS_SHIFT: u32 = 62;
const DEADLINE_MASK: u64 = (1 << STATUS_SHIFT) - 1;

/// The packed state word: status in the top 2 bits, deadline (ms on the
/// registry clock) in the low 62.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State(u64);

impl State {
    /// Packs a status and a deadline. Deadlines beyond 2^62 ms saturate.
    pub fn new(status: Status, deadline_ms: u64) -> Self {
        let bits = match status {
            Status::Initing => 0,
            Status::Running => 1,
            Status::Tombstone => 2,
        };
        Self((bits << STATUS_SHIFT) | deadline_ms.min(DEADLINE_MASK))
    }

    /// The status half.
    pub fn status(self) -> Status {
        match self.0 >> STATUS_SHIFT {
            0 => Status::Initing,
            1 => Status::Running,
            _ => Status::Tombstone,
        }
    }

    /// The deadline half, in ms on the registry clock.
    pub fn deadline_ms(self) -> u64 {
        self.0 & DEADLINE_MASK
    }

    const fn bits(self) -> u64 {
        self.0
    }
}

/// Result of a heartbeat on an entry's state word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Beat {
    /// The deadline was moved; `was_initing` says this was the first heartbeat.
    Renewed {
        /// The new deadline (ms on the registry clock).
        deadline_ms: u64,
        /// This was the executor's first heartbeat (INITING → RUNNING).
        was_initing: bool,
    },
    /// The entry is a tombstone: the executor must register again.
    Tombstoned,
}

/// Result of an expiry check on an entry's state word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// Still alive: its current deadline is later than now.
    Alive {
        /// The current deadline.
        deadline_ms: u64,
    },
    /// Now a tombstone, decided on `deadline_ms`; `was` is the status before.
    Expired {
        /// The deadline the decision was based on.
        deadline_ms: u64,
        /// Status before the tombstone.
        was: Status,
    },
    /// Already a tombstone (deregistered meanwhile).
    AlreadyTombstone,
}

/// A registered executor. Identity is immutable; liveness lives in atomics.
pub struct Entry {
    id: ExecutorId,
    /// The name, then the address, then the labels' encoded form: one
    /// allocation for the three.
    text: Box<str>,
    /// Where the name ends and where the address ends in `text`: 32 bits
    /// each (names and addresses are at most a few hundred bytes), like
    /// [`Self::ttl_ms`] and [`Self::recorded_ttl_ms`] (ms of TTLs, which are
    /// at most 7 days). The four make two words, which keeps the entry at
    /// 104 bytes: its `Arc` allocation in glibc's 128-byte size class.
    name_len: u32,
    address_end: u32,
    registered_unix_ms: u64,
    /// The identity that registered it (None: unowned).
    owner: Option<Arc<str>>,
    state: AtomicU64,
    ttl_ms: AtomicU32,
    /// Deadline (ms) at which the membership loop's queue holds this entry.
    armed_ms: AtomicU64,
    /// Revision of its RUNNING event (`u64::MAX`: none published yet).
    running_rev: AtomicU64,
    /// Revision of its OFFLINE event (`u64::MAX`: none published yet).
    offline_rev: AtomicU64,
    /// The TTL ceiling (ms) a store that records TTLs holds, or is about to
    /// (see `MembershipStore::records_ttls`); `u32::MAX`: none.
    recorded_ttl_ms: AtomicU32,
}

/// A TTL in ms as the entry holds it: 32 bits, enough for 49 days (every
/// TTL is validated below 7 days); longer would saturate.
fn short_ms(ms: u64) -> u32 {
    u32::try_from(ms).unwrap_or(u32::MAX)
}

impl Entry {
    /// A new INITING entry with `ttl` and its deadline at `deadline_ms` on
    /// the registry clock ([`super::Clock::now_ms`]). Not in any registry:
    /// only the membership loop makes an entry live.
    pub fn new(
        id: ExecutorId,
        name: Box<str>,
        address: Box<str>,
        labels: Labels,
        registered_unix_ms: u64,
        ttl: Duration,
        deadline_ms: u64,
    ) -> Self {
        let ttl_ms = short_ms(duration_ms(ttl));
        let labels = labels.encoded();
        let mut text = String::with_capacity(name.len() + address.len() + labels.len());
        text.push_str(&name);
        text.push_str(&address);
        text.push_str(labels);
        let offset = |at: usize| u32::try_from(at).unwrap_or(u32::MAX);
        Self {
            id,
            text: text.into_boxed_str(),
            name_len: offset(name.len()),
            address_end: offset(name.len() + address.len()),
            registered_unix_ms,
            owner: None,
            state: AtomicU64::new(State::new(Status::Initing, deadline_ms).bits()),
            ttl_ms: AtomicU32::new(ttl_ms),
            armed_ms: AtomicU64::new(u64::MAX),
            running_rev: AtomicU64::new(u64::MAX),
            offline_rev: AtomicU64::new(u64::MAX),
            recorded_ttl_ms: AtomicU32::new(u32::MAX),
        }
    }

    /// The same entry, owned by `owner` (see [`super::access`]).
    pub(crate) fn with_owner(mut self, owner: Option<Arc<str>>) -> Self {
        self.owner = owner;
        self
    }

    /// The identity that registered it; None when registered without client
    /// authentication.
    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    /// The executor's id.
    pub fn id(&self) -> &ExecutorId {
        &self.id
    }

    /// The name given at registration (may be empty).
    pub fn name(&self) -> &str {
        &self.text[..self.name_len as usize]
    }

    /// The `host:port` given at registration.
    pub fn address(&self) -> &str {
        &self.text[self.name_len as usize..self.address_end as usize]
    }

    /// Validated labels.
    pub fn labels(&self) -> LabelsRef<'_> {
        LabelsRef::new(&self.text[self.address_end as usize..])
    }

    /// Wall-clock registration time (ms since the Unix epoch).
    pub fn registered_unix_ms(&self) -> u64 {
        self.registered_unix_ms
    }

    /// The current state word.
    pub fn state(&self) -> State {
        State(self.state.load(Ordering::Acquire))
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.state().status()
    }

    /// The TTL set by the last heartbeat (or the init TTL).
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms())
    }

    /// [`Self::ttl`] in ms, the unit of the state word.
    pub(crate) fn ttl_ms(&self) -> u64 {
        u64::from(self.ttl_ms.load(Ordering::Relaxed))
    }

    /// The one compare-and-swap loop on the state word: `decide` looks at the
    /// current state and either keeps it (`Err(outcome)`) or names the state
    /// to write (`Ok((next, outcome))`), retried until the write lands on the
    /// state it was decided on. Every transition goes through here, so two
    /// racing transitions can never both be decided on the same old word.
    fn transition<T>(&self, mut decide: impl FnMut(State) -> Result<(State, T), T>) -> T {
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            let (next, outcome) = match decide(State(current)) {
                Ok(write) => write,
                Err(outcome) => return outcome,
            };
            match self.state.compare_exchange_weak(
                current,
                next.bits(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return outcome,
                Err(actual) => current = actual,
            }
        }
    }

    /// Heartbeat at `now_ms`: deadline = now + TTL (`ttl_ms` = None keeps the
    /// current TTL), status RUNNING. Fails only on a tombstone.
    pub(crate) fn heartbeat(&self, now_ms: u64, ttl_ms: Option<u64>) -> Beat {
        let ttl = match ttl_ms {
            Some(ttl) => {
                self.ttl_ms.store(short_ms(ttl), Ordering::Relaxed);
                ttl
            }
            None => self.ttl_ms(),
        };
        let deadline_ms = now_ms.saturating_add(ttl);
        let next = State::new(Status::Running, deadline_ms);
        self.transition(|state| match state.status() {
            Status::Tombstone => Err(Beat::Tombstoned),
            status => Ok((
                next,
                Beat::Renewed {
                    deadline_ms,
                    was_initing: status == Status::Initing,
                },
            )),
        })
    }

    /// Expiry check at `now_ms`: a deadline at or before now becomes a
    /// tombstone; a later one is reported so the caller can re-arm.
    pub(crate) fn try_expire(&self, now_ms: u64) -> Expiry {
        self.transition(|state| {
            let deadline_ms = state.deadline_ms();
            if state.status() == Status::Tombstone {
                Err(Expiry::AlreadyTombstone)
            } else if deadline_ms > now_ms {
                Err(Expiry::Alive { deadline_ms })
            } else {
                let was = state.status();
                Ok((
                    State::new(Status::Tombstone, deadline_ms),
                    Expiry::Expired { deadline_ms, was },
                ))
            }
        })
    }

    /// Unconditional tombstone (deregistration). Returns the status before,
    /// or `None` if it already was a tombstone.
    pub(crate) fn tombstone(&self) -> Option<Status> {
        self.transition(|state| match state.status() {
            Status::Tombstone => Err(None),
            was => Ok((
                State::new(Status::Tombstone, state.deadline_ms()),
                Some(was),
            )),
        })
    }

    /// Moves the deadline later (never earlier), keeping the status; no-op
    /// on a tombstone. For pause compensation (membership loop only).
    pub(crate) fn extend_deadline_to(&self, deadline_ms: u64) {
        self.transition(|state| {
            if state.status() == Status::Tombstone || state.deadline_ms() >= deadline_ms {
                Err(())
            } else {
                Ok((State::new(state.status(), deadline_ms), ()))
            }
        })
    }

    /// Deadline at which the loop's queue holds this entry (`u64::MAX`: none).
    pub(crate) fn armed_ms(&self) -> u64 {
        self.armed_ms.load(Ordering::Acquire)
    }

    pub(crate) fn set_armed_ms(&self, ms: u64) {
        self.armed_ms.store(ms, Ordering::Release);
    }

    /// Its status in the snapshot at `revision`, as the loop published it:
    /// None once its OFFLINE event is at or before `revision` (it is not a
    /// member then), RUNNING once its RUNNING event is, else INITING.
    pub fn status_at(&self, revision: u64) -> Option<Status> {
        if self.offline_rev.load(Ordering::Acquire) <= revision {
            None
        } else if self.running_rev.load(Ordering::Acquire) <= revision {
            Some(Status::Running)
        } else {
            Some(Status::Initing)
        }
    }

    /// Whether its RUNNING event was published.
    pub(crate) fn announced_running(&self) -> bool {
        self.running_rev.load(Ordering::Acquire) != u64::MAX
    }

    /// The loop published its RUNNING event at `revision`.
    pub(crate) fn set_running_rev(&self, revision: u64) {
        self.running_rev.store(revision, Ordering::Release);
    }

    /// The loop published its OFFLINE event at `revision`.
    pub(crate) fn set_offline_rev(&self, revision: u64) {
        self.offline_rev.store(revision, Ordering::Release);
    }

    /// The TTL ceiling (ms) recorded for it in the store.
    /// (`u64::MAX`: none yet).
    pub(crate) fn recorded_ttl_ms(&self) -> u64 {
        match self.recorded_ttl_ms.load(Ordering::Relaxed) {
            u32::MAX => u64::MAX,
            ms => u64::from(ms),
        }
    }

    /// Takes `ceiling_ms` as the TTL ceiling to record; true when it is a
    /// change (the caller then has it written).
    pub(crate) fn record_ttl(&self, ceiling_ms: u64) -> bool {
        let ceiling = short_ms(ceiling_ms);
        self.recorded_ttl_ms.load(Ordering::Relaxed) != ceiling
            && self.recorded_ttl_ms.swap(ceiling, Ordering::Relaxed) != ceiling
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("id", &self.id)
            .field("address", &self.address())
            .field("state", &self.state())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(deadline: u64) -> Entry {
        Entry::new(
            ExecutorId::new("e-0000000000000001"),
            "e".into(),
            "127.0.0.1:1".into(),
            Labels::default(),
            0,
            Duration::from_millis(100),
            deadline,
        )
    }

    #[test]
    fn an_entry_fits_in_104_bytes() {
        // With the `Arc` counts, 120 bytes: glibc's 128-byte chunks. Every
        // executor pays each byte over it in a 16-byte step.
        assert!(std::mem::size_of::<Entry>() <= 104);
    }

    #[test]
    fn name_address_and_labels_share_one_allocation_and_read_back() {
        let two = Labels::new([("zone", "a"), ("gpu", "h100")]).unwrap();
        for labels in [Labels::default(), two] {
            for (name, address) in [("e", "127.0.0.1:1"), ("", "h:2"), ("worker", "")] {
                let e = Entry::new(
                    ExecutorId::new("e-0000000000000001"),
                    name.into(),
                    address.into(),
                    labels.clone(),
                    0,
                    Duration::from_millis(100),
                    100,
                );
                assert_eq!((e.name(), e.address()), (name, address));
                assert_eq!(e.labels(), labels.view());
                assert_eq!(e.labels().to_map(), labels.to_map());
            }
        }
    }

    #[test]
    fn a_recorded_ttl_reads_back_and_none_is_max() {
        let e = entry(1_000);
        assert_eq!(e.recorded_ttl_ms(), u64::MAX);
        assert!(e.record_ttl(605_000));
        assert!(!e.record_ttl(605_000), "no change");
        assert_eq!(e.recorded_ttl_ms(), 605_000);
    }

    #[test]
    fn state_word_packs_status_and_deadline() {
        for status in [Status::Initing, Status::Running, Status::Tombstone] {
            for deadline in [0, 1, 12345, DEADLINE_MASK] {
                let s = State::new(status, deadline);
                assert_eq!(s.status(), status);
                assert_eq!(s.deadline_ms(), deadline);
            }
        }
        assert_eq!(
            State::new(Status::Running, u64::MAX).deadline_ms(),
            DEADLINE_MASK
        );
        assert_eq!(
            State::new(Status::Running, u64::MAX).status(),
            Status::Running
        );
    }

    #[test]
    fn first_heartbeat_moves_initing_to_running() {
        let e = entry(100);
        assert_eq!(e.status(), Status::Initing);
        assert_eq!(
            e.heartbeat(50, Some(300)),
            Beat::Renewed {
                deadline_ms: 350,
                was_initing: true
            }
        );
        assert_eq!(e.status(), Status::Running);
        assert_eq!(e.ttl_ms(), 300);
        assert_eq!(
            e.heartbeat(60, None),
            Beat::Renewed {
                deadline_ms: 360,
                was_initing: false
            }
        );
    }

    #[test]
    fn expiry_only_at_or_after_the_deadline() {
        let e = entry(100);
        assert_eq!(e.try_expire(99), Expiry::Alive { deadline_ms: 100 });
        assert_eq!(
            e.try_expire(100),
            Expiry::Expired {
                deadline_ms: 100,
                was: Status::Initing
            }
        );
        assert_eq!(e.try_expire(200), Expiry::AlreadyTombstone);
    }

    #[test]
    fn the_status_at_a_revision_is_what_the_loop_published_by_then() {
        let e = entry(100);
        assert_eq!(e.status_at(5), Some(Status::Initing));
        e.heartbeat(50, None);
        // RUNNING in its state word, but not published yet.
        assert_eq!(e.status_at(5), Some(Status::Initing));
        e.set_running_rev(7);
        assert!(e.announced_running());
        assert_eq!(e.status_at(6), Some(Status::Initing));
        assert_eq!(e.status_at(7), Some(Status::Running));
        e.tombstone();
        e.set_offline_rev(9);
        assert_eq!(e.status_at(8), Some(Status::Running));
        assert_eq!(e.status_at(9), None);
        assert_eq!(e.status_at(u64::MAX), None);
    }

    #[test]
    fn a_tombstone_never_comes_back_to_life() {
        let e = entry(100);
        assert_eq!(e.tombstone(), Some(Status::Initing));
        assert_eq!(e.heartbeat(10, Some(100)), Beat::Tombstoned);
        assert_eq!(e.tombstone(), None);
        assert_eq!(e.try_expire(u64::MAX), Expiry::AlreadyTombstone);
        assert_eq!(e.status(), Status::Tombstone);
    }

    /// Real threads hammer heartbeat against expiry on one word: whenever the
    /// expiry wins, the deadline it decided on must be at least as late as
    /// every deadline an OK heartbeat wrote before (no OK heartbeat is
    /// followed by an expiry based on an older deadline).
    #[test]
    fn extending_a_deadline_never_shortens_it_nor_revives_a_tombstone() {
        let e = entry(100);
        e.extend_deadline_to(50);
        assert_eq!(e.state().deadline_ms(), 100);
        e.extend_deadline_to(500);
        assert_eq!(e.state(), State::new(Status::Initing, 500));
        e.tombstone();
        e.extend_deadline_to(10_000);
        assert_eq!(e.status(), Status::Tombstone);
    }

    #[test]
    fn heartbeat_versus_expiry_race_never_expires_on_a_stale_deadline() {
        use std::sync::atomic::AtomicBool;
        for round in 0..200u64 {
            let e = Arc::new(entry(1_000));
            let clock = Arc::new(AtomicU64::new(0));
            let last_ok = Arc::new(AtomicU64::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let beater = {
                let (e, clock, last_ok, stop) =
                    (e.clone(), clock.clone(), last_ok.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let now = clock.load(Ordering::Acquire);
                        match e.heartbeat(now, Some(5 + round % 7)) {
                            Beat::Renewed { deadline_ms, .. } => {
                                last_ok.fetch_max(deadline_ms, Ordering::AcqRel);
                            }
                            Beat::Tombstoned => return,
                        }
                    }
                })
            };
            let mut decided = None;
            for now in (0..5_000).step_by(3) {
                clock.store(now, Ordering::Release);
                if let Expiry::Expired { deadline_ms, .. } = e.try_expire(now) {
                    decided = Some((deadline_ms, now));
                    break;
                }
            }
            stop.store(true, Ordering::Relaxed);
            beater.join().expect("beater thread");
            if let Some((deadline, now)) = decided {
                // The tombstone is final, and the winning deadline had passed.
                assert!(deadline <= now);
                // Every OK heartbeat wrote a deadline no later than the one the
                // expiry decided on: none was overtaken.
                assert!(
                    last_ok.load(Ordering::Acquire) <= deadline,
                    "round {round}: OK heartbeat with deadline {} but expired on {deadline}",
                    last_ok.load(Ordering::Acquire)
                );
                assert_eq!(e.heartbeat(now, None), Beat::Tombstoned);
            }
        }
    }
}

/// Every interleaving of heartbeat, expiry and deregistration on one state
/// word, explored by loom. Run with
/// `RUSTFLAGS="--cfg registry_loom" cargo test --lib loom_`.
#[cfg(all(test, registry_loom))]
mod loom_tests {
    use loom::sync::Arc;
    use loom::thread;

    use super::*;

    fn entry(status: Status, deadline_ms: u64) -> Entry {
        let e = Entry::new(
            ExecutorId::new("e-0000000000000001"),
            "e".into(),
            "127.0.0.1:1".into(),
            Labels::default(),
            0,
            Duration::from_millis(100),
            deadline_ms,
        );
        if status == Status::Running {
            e.heartbeat(deadline_ms - 100, None);
        }
        e
    }

    /// Heartbeat (now 90, TTL 50: deadline 140), expiry (now 120) and
    /// deregistration race on an entry whose deadline is 100.
    fn race(start: Status, deregister: bool) {
        loom::model(move || {
            let e = Arc::new(entry(start, 100));
            let beat = {
                let e = e.clone();
                thread::spawn(move || e.heartbeat(90, Some(50)))
            };
            let expire = {
                let e = e.clone();
                thread::spawn(move || e.try_expire(120))
            };
            let leave = deregister.then(|| {
                let e = e.clone();
                thread::spawn(move || e.tombstone())
            });
            let beat = beat.join().expect("heartbeat thread");
            let expiry = expire.join().expect("expiry thread");
            let left = leave.map(|t| t.join().expect("deregister thread"));

            // An OK heartbeat is never followed by an expiry decided on the
            // older deadline: expiry on 100 means the heartbeat came after
            // the tombstone and was refused.
            if let Expiry::Expired { deadline_ms, was } = expiry {
                assert_eq!(deadline_ms, 100, "only the old deadline had passed");
                assert_eq!(beat, Beat::Tombstoned, "an OK heartbeat was overtaken");
                assert_eq!(was, start);
            }
            if let Beat::Renewed {
                deadline_ms,
                was_initing,
            } = beat
            {
                assert_eq!(deadline_ms, 140);
                assert_eq!(was_initing, start == Status::Initing);
                // Renewed before the expiry looked: it saw the new deadline.
                assert!(!matches!(expiry, Expiry::Expired { .. }));
            }
            // Exactly one transition made the tombstone.
            let by_expiry = matches!(expiry, Expiry::Expired { .. });
            let by_leave = matches!(left, Some(Some(_)));
            assert!(!(by_expiry && by_leave), "two transitions to TOMBSTONE");
            // A tombstone never comes back to life.
            let end = e.state();
            if by_expiry || by_leave {
                assert_eq!(end.status(), Status::Tombstone);
                assert_eq!(e.heartbeat(200, Some(50)), Beat::Tombstoned);
                assert_eq!(e.status(), Status::Tombstone);
            } else {
                assert_eq!(end, State::new(Status::Running, 140));
            }
        });
    }

    #[test]
    fn loom_heartbeat_versus_expiry_from_initing() {
        race(Status::Initing, false);
    }

    #[test]
    fn loom_heartbeat_versus_expiry_from_running() {
        race(Status::Running, false);
    }

    #[test]
    fn loom_heartbeat_expiry_and_deregister_from_running() {
        race(Status::Running, true);
    }
}
