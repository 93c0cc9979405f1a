//! The pure checks of the watchers scenario: what its watchers saw, and the
//! arithmetic of its goals.
//!
//! Owns: the fleet's ids by index ([`IdIndex`]), whether a snapshot held
//! the fleet exactly ([`SnapshotCheck`]), consecutive event revisions
//! ([`EventChain`]), how a re-watch began ([`rewatch_kind`]), and the RSS
//! and heartbeat p99 goals ([`rss_failures`], [`p99_kept`]).
//!
//! Must not touch: the network, procfs or the clock: everything here is a
//! function of its arguments.

use serde::Serialize;

use crate::watchers::lite::LiteKind;

/// The fleet's ids by index: ids are `<prefix><index>-<hex>`.
#[derive(Debug)]
pub struct IdIndex {
    prefix: String,
    ids: Vec<String>,
}

impl IdIndex {
    /// The index of a run whose names are `<prefix><index>`.
    pub fn new(prefix: String, ids: Vec<String>) -> Self {
        Self { prefix, ids }
    }

    /// Executors in the fleet.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the fleet is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The id of executor `index`.
    pub fn id(&self, index: usize) -> &str {
        &self.ids[index]
    }

    /// The index of `id`, if it is one of this fleet's.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        let (index, _) = id.strip_prefix(&self.prefix)?.split_once('-')?;
        let index: usize = index.parse().ok()?;
        (self.ids.get(index)? == id).then_some(index)
    }
}

/// A set of indices `0..n` as bits.
#[derive(Debug, Clone)]
pub(super) struct Bits(Vec<u64>);

impl Bits {
    pub(super) fn new(n: usize) -> Self {
        Self(vec![0; n.div_ceil(64)])
    }

    /// Sets `i`; false if it was set already.
    pub(super) fn insert(&mut self, i: usize) -> bool {
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        let fresh = self.0[word] & bit == 0;
        self.0[word] |= bit;
        fresh
    }
}

/// What one snapshot (all its chunks) held, against a fleet of `expected`
/// executors that must all be in it.
#[derive(Debug, Clone)]
pub struct SnapshotCheck {
    seen: Bits,
    expected: usize,
    /// Ids received.
    pub ids: u64,
    /// Ids received a second time.
    pub duplicates: u64,
    /// Ids not of this fleet.
    pub foreign: u64,
    /// Chunks received.
    pub chunks: u64,
    /// The first chunk's revision.
    pub revision: Option<u64>,
    /// Chunks with another revision than the first.
    pub other_revisions: u64,
    /// The chunk with `more = false` arrived.
    pub complete: bool,
}

impl SnapshotCheck {
    /// A check of a snapshot that must hold exactly executors `0..expected`.
    pub fn new(expected: usize) -> Self {
        Self {
            seen: Bits::new(expected),
            expected,
            ids: 0,
            duplicates: 0,
            foreign: 0,
            chunks: 0,
            revision: None,
            other_revisions: 0,
            complete: false,
        }
    }

    /// One chunk: its revision, `more`, and its ids as fleet indices (None:
    /// not of this fleet).
    pub fn chunk(
        &mut self,
        revision: u64,
        more: bool,
        indices: impl Iterator<Item = Option<usize>>,
    ) {
        self.chunks += 1;
        match self.revision {
            None => self.revision = Some(revision),
            Some(r) if r != revision => self.other_revisions += 1,
            Some(_) => {}
        }
        for index in indices {
            self.ids += 1;
            match index {
                Some(i) if i < self.expected => {
                    if !self.seen.insert(i) {
                        self.duplicates += 1;
                    }
                }
                _ => self.foreign += 1,
            }
        }
        if !more {
            self.complete = true;
        }
    }

    /// Complete, one revision, exactly the `expected` executors, none twice.
    pub fn exact(&self) -> bool {
        self.complete
            && self.other_revisions == 0
            && self.duplicates == 0
            && self.foreign == 0
            && self.ids == self.expected as u64
    }

    /// What is wrong with it, or None.
    pub fn problem(&self) -> Option<String> {
        if self.exact() {
            return None;
        }
        let mut p = Vec::new();
        if !self.complete {
            p.push("incomplete (no chunk with more = false)".to_owned());
        }
        if self.ids != self.expected as u64 {
            p.push(format!("{} ids, expected {}", self.ids, self.expected));
        }
        if self.duplicates > 0 {
            p.push(format!("{} ids twice", self.duplicates));
        }
        if self.foreign > 0 {
            p.push(format!("{} ids not of the fleet", self.foreign));
        }
        if self.other_revisions > 0 {
            p.push(format!(
                "{} chunks of another revision",
                self.other_revisions
            ));
        }
        Some(p.join(", "))
    }
}

/// Events must come with consecutive revisions: each one after the last
/// revision seen (a snapshot's, or the previous event's).
#[derive(Debug, Clone, Default, Serialize)]
pub struct EventChain {
    /// The last revision seen (0: none yet).
    pub last: u64,
    /// Events seen.
    pub events: u64,
    /// Events whose revision was not `last + 1`.
    pub gaps: u64,
}

impl EventChain {
    /// A chain that continues from a snapshot (or event) at `revision`.
    pub fn from(revision: u64) -> Self {
        Self {
            last: revision,
            ..Self::default()
        }
    }

    /// One event; false (and a gap counted) unless it is `last + 1`.
    pub fn event(&mut self, revision: u64) -> bool {
        self.events += 1;
        let consecutive = revision == self.last + 1;
        if !consecutive {
            self.gaps += 1;
        }
        self.last = revision;
        consecutive
    }

    /// A new snapshot at `revision`: the chain continues from it.
    pub fn restart(&mut self, revision: u64) {
        self.last = revision;
    }
}

/// How a re-watch from `start_revision = last` began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewatch {
    /// Its first message was the event `last + 1`: nothing missed.
    Resumed,
    /// Its first message was a snapshot: the events in between are lost.
    Snapshot,
    /// Its first message was an event out of order.
    Gap,
}

/// Judges the first message of a re-watch from `last`.
pub fn rewatch_kind(last: u64, first: &LiteKind) -> Rewatch {
    match first {
        LiteKind::Snapshot(_) => Rewatch::Snapshot,
        LiteKind::Event(e) if e.revision == last + 1 => Rewatch::Resumed,
        LiteKind::Event(_) => Rewatch::Gap,
    }
}

/// Whether heartbeat p99 was kept: `during` at most `ratio ×` or
/// `slack_us` above `before`, whichever allows more.
pub fn p99_kept(before_us: u64, during_us: u64, ratio: f64, slack_us: u64) -> bool {
    let allowed = ((before_us as f64 * ratio) as u64).max(before_us + slack_us);
    during_us <= allowed
}

/// The RSS goals of phase A: peak ≤ `max_peak` × before, after ≤
/// `max_after` × before. Appends a line per miss.
pub fn rss_failures(
    before: u64,
    peak: u64,
    after: u64,
    max_peak: f64,
    max_after: f64,
    failures: &mut Vec<String>,
) {
    let mib = |b: u64| b as f64 / 1_048_576.0;
    if before == 0 {
        failures.push("no RSS before phase A".to_owned());
        return;
    }
    let peak_ratio = peak as f64 / before as f64;
    if peak_ratio > max_peak {
        failures.push(format!(
            "RSS peak during the watchers {:.1} MiB = {peak_ratio:.3} × before ({:.1} MiB), goal ≤ {max_peak}",
            mib(peak),
            mib(before)
        ));
    }
    let after_ratio = after as f64 / before as f64;
    if after_ratio > max_after {
        failures.push(format!(
            "RSS after the watchers left {:.1} MiB = {after_ratio:.3} × before ({:.1} MiB), goal ≤ {max_after}",
            mib(after),
            mib(before)
        ));
    }
}

#[cfg(test)]
mod tests {
    use executor_registry::proto::ExecutorEvent;

    use super::*;
    use crate::watchers::lite::LiteSnapshot;

    fn index(n: usize) -> IdIndex {
        IdIndex::new(
            "wlx".into(),
            (0..n).map(|i| format!("wlx{i}-{:016x}", i * 7)).collect(),
        )
    }

    #[test]
    fn ids_map_back_to_their_index_only_when_whole() {
        let ix = index(12);
        assert_eq!(ix.index_of("wlx3-0000000000000015"), Some(3));
        assert_eq!(ix.index_of("wlx3-0000000000000016"), None, "other hex");
        assert_eq!(ix.index_of("wlx12-0000000000000054"), None, "out of range");
        assert_eq!(ix.index_of("other3-0000000000000015"), None, "other prefix");
        assert_eq!(ix.index_of("wlx3"), None);
    }

    #[test]
    fn a_snapshot_is_exact_only_with_every_id_once_at_one_revision() {
        let mut c = SnapshotCheck::new(4);
        c.chunk(9, true, [Some(0), Some(1)].into_iter());
        assert!(!c.exact(), "incomplete");
        c.chunk(9, false, [Some(3), Some(2)].into_iter());
        assert!(c.exact(), "{:?}", c.problem());

        let mut dup = SnapshotCheck::new(3);
        dup.chunk(9, true, [Some(0), Some(1)].into_iter());
        dup.chunk(9, false, [Some(1)].into_iter());
        assert_eq!(dup.duplicates, 1);
        assert!(!dup.exact());
        assert!(dup.problem().unwrap().contains("twice"));

        let mut foreign = SnapshotCheck::new(2);
        foreign.chunk(9, false, [Some(0), Some(1), None].into_iter());
        assert_eq!(foreign.foreign, 1);
        assert!(!foreign.exact());

        let mut short = SnapshotCheck::new(3);
        short.chunk(9, false, [Some(0), Some(1)].into_iter());
        assert!(short.problem().unwrap().contains("2 ids, expected 3"));

        let mut mixed = SnapshotCheck::new(2);
        mixed.chunk(9, true, [Some(0)].into_iter());
        mixed.chunk(10, false, [Some(1)].into_iter());
        assert_eq!(mixed.other_revisions, 1);
        assert!(!mixed.exact());
    }

    #[test]
    fn events_must_follow_the_last_revision_one_by_one() {
        let mut chain = EventChain::from(100);
        assert!(chain.event(101));
        assert!(chain.event(102));
        assert!(!chain.event(104), "103 is missing");
        assert!(chain.event(105), "the chain continues from the gap");
        assert!(!chain.event(105), "a repeat is out of order too");
        assert_eq!((chain.events, chain.gaps), (5, 2));
        chain.restart(200);
        assert!(chain.event(201));
    }

    #[test]
    fn a_rewatch_resumes_only_at_the_next_event() {
        let event = |revision| {
            LiteKind::Event(ExecutorEvent {
                revision,
                ..ExecutorEvent::default()
            })
        };
        assert_eq!(rewatch_kind(7, &event(8)), Rewatch::Resumed);
        assert_eq!(rewatch_kind(7, &event(9)), Rewatch::Gap);
        assert_eq!(
            rewatch_kind(7, &LiteKind::Snapshot(LiteSnapshot::default())),
            Rewatch::Snapshot
        );
    }

    #[test]
    fn rss_goals_are_ratios_of_before() {
        let mib = 1 << 20;
        let mut f = Vec::new();
        rss_failures(1000 * mib, 1250 * mib, 1100 * mib, 1.25, 1.1, &mut f);
        assert!(f.is_empty(), "{f:?}");
        rss_failures(1000 * mib, 1251 * mib, 1000 * mib, 1.25, 1.1, &mut f);
        assert_eq!(f.len(), 1);
        assert!(f[0].contains("peak"), "{f:?}");
        f.clear();
        rss_failures(1000 * mib, 1000 * mib, 1101 * mib, 1.25, 1.1, &mut f);
        assert_eq!(f.len(), 1);
        assert!(f[0].contains("after"), "{f:?}");
        f.clear();
        rss_failures(0, 1, 1, 1.25, 1.1, &mut f);
        assert_eq!(f.len(), 1, "no baseline is a failure, not a pass");
    }

    #[test]
    fn p99_is_kept_within_the_ratio_or_the_slack() {
        // 400 µs before: 1.5 × is 600, + 1 ms is 1,400: the slack allows more.
        assert!(p99_kept(400, 1_400, 1.5, 1_000));
        assert!(!p99_kept(400, 1_401, 1.5, 1_000));
        // 10 ms before: 1.5 × (15 ms) allows more than + 1 ms.
        assert!(p99_kept(10_000, 15_000, 1.5, 1_000));
        assert!(!p99_kept(10_000, 15_001, 1.5, 1_000));
    }
}
