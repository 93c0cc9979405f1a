//! The watch contract on tokio's paused clock: each status change is one
//! event (ONLINE → RUNNING → OFFLINE), a snapshot shows every member as of
//! its revision, a watcher resumes from the history without a snapshot
//! when it can (and takes one when it cannot), and revisions never go back
//! across a restart on the same store.

use std::collections::BTreeMap;

use super::*;

/// Members and their statuses, as a watcher keeps them.
type View = BTreeMap<String, Status>;

fn view_of(snapshot: &Snapshot) -> View {
    snapshot
        .iter()
        .map(|(e, s)| (id(e).to_owned(), s))
        .collect()
}

/// Applies one event to a view, checking it is a change the view allows.
fn apply(view: &mut View, event: &Event) {
    let id = id(&event.entry).to_owned();
    match event.kind {
        EventKind::Online => {
            assert_eq!(view.insert(id, Status::Initing), None, "ONLINE twice");
        }
        EventKind::Running => {
            let was = view.insert(id, Status::Running);
            assert_eq!(was, Some(Status::Initing), "RUNNING from {was:?}");
        }
        EventKind::Offline(_) => {
            assert!(view.remove(&id).is_some(), "OFFLINE for a non-member");
        }
    }
    assert_eq!(
        event.kind.status(),
        match event.kind {
            EventKind::Online => Status::Initing,
            EventKind::Running => Status::Running,
            EventKind::Offline(_) => Status::Tombstone,
        }
    );
}

#[tokio::test(start_paused = true)]
async fn each_status_change_is_one_event_and_later_heartbeats_are_none() {
    let (registry, _task, _) = start(RegistryConfig::default());
    let mut watch = registry.watch();
    let start = watch.snapshot().unwrap().revision();
    let entry = register(&registry, "w").await;

    let online = watch.next().await.expect("ONLINE");
    assert_eq!(
        (online.kind, online.revision),
        (EventKind::Online, start + 1)
    );
    assert_eq!(online.kind.status(), Status::Initing);
    assert_eq!(
        registry.snapshot().get(id(&entry)).map(|(_, s)| s),
        Some(Status::Initing)
    );

    registry.heartbeat(id(&entry), ttl(1_000)).expect("first");
    let running = watch.next().await.expect("RUNNING");
    assert_eq!(
        (running.kind, running.revision),
        (EventKind::Running, start + 2)
    );
    assert_eq!(id(&running.entry), id(&entry));
    assert_eq!(
        registry.snapshot().get(id(&entry)).map(|(_, s)| s),
        Some(Status::Running)
    );

    // Later heartbeats change nothing a watcher sees.
    for _ in 0..5 {
        sleep(Duration::from_millis(300)).await;
        registry.heartbeat(id(&entry), ttl(1_000)).expect("later");
    }
    assert_eq!(registry.snapshot().revision(), start + 2);

    // Silence: OFFLINE, TOMBSTONE.
    let offline = watch.next().await.expect("OFFLINE");
    assert_eq!(
        (offline.kind, offline.revision),
        (EventKind::Offline(OfflineReason::Expired), start + 3)
    );
    assert_eq!(offline.kind.status(), Status::Tombstone);
}

/// Registrations, first heartbeats, deregistrations and expiries, with a
/// snapshot taken after every step: applying the events between any two
/// snapshots to the first gives exactly the second, statuses included —
/// and an old snapshot read late still shows the fleet as of its revision.
#[tokio::test(start_paused = true)]
async fn a_snapshot_plus_the_events_after_it_is_exactly_a_later_snapshot() {
    let (registry, _task, _) = start(RegistryConfig::default());
    let mut watch = registry.watch();
    let mut snapshots = vec![registry.snapshot()];
    let mut views = vec![view_of(&snapshots[0])];
    let mut entries = Vec::new();
    for step in 0..40u64 {
        match step % 5 {
            0 | 1 => entries.extend(register_many(&registry, "w", 3).await),
            2 => {
                for e in entries.iter().skip(step as usize % 3).step_by(2) {
                    let _ = registry.heartbeat(id(e), ttl(700));
                }
            }
            3 => {
                if let Some(e) = entries.iter().find(|e| e.status() != Status::Tombstone) {
                    let _ = registry.deregister(id(e)).await;
                }
            }
            _ => sleep(Duration::from_millis(400)).await,
        }
        still(registry.settled()).await;
        let snapshot = registry.snapshot();
        views.push(view_of(&snapshot));
        snapshots.push(snapshot);
    }
    // Old snapshots, read now, still show their own revision's fleet.
    for (snapshot, view) in snapshots.iter().zip(&views) {
        assert_eq!(&view_of(snapshot), view, "at {}", snapshot.revision());
        assert_eq!(snapshot.len(), view.len());
    }
    // Replaying the events from the first takes every view in turn.
    let mut replayed = views[0].clone();
    let mut revision = snapshots[0].revision();
    let last = snapshots.last().unwrap().revision();
    let mut at = snapshots
        .iter()
        .position(|s| s.revision() > revision)
        .unwrap_or(snapshots.len());
    while revision < last {
        let event = watch.next().await.expect("the watch goes on");
        assert_eq!(event.revision, revision + 1, "consecutive");
        revision = event.revision;
        apply(&mut replayed, &event);
        while let Some(snapshot) = snapshots.get(at)
            && snapshot.revision() == revision
        {
            assert_eq!(replayed, views[at], "replayed up to {revision}");
            at += 1;
        }
    }
    assert_eq!(at, snapshots.len(), "every snapshot was met");
    let running = views
        .last()
        .unwrap()
        .values()
        .filter(|s| **s == Status::Running);
    assert!(running.count() > 0, "the scenario made some RUNNING");
}

#[tokio::test(start_paused = true)]
async fn a_watcher_resumes_from_the_history_and_takes_a_snapshot_once_it_is_gone() {
    let config = RegistryConfig {
        watch_history: 64,
        ..RegistryConfig::default()
    };
    let (registry, _task, _) = start(config);
    register_many(&registry, "before", 10).await;
    let resume_at = registry.watch().snapshot().unwrap().revision();

    // Fewer changes than the history holds: the resume starts at R + 1.
    let entries = register_many(&registry, "during", 40).await;
    let mut resumed = registry.watch_from(resume_at);
    assert!(resumed.snapshot().is_none(), "no snapshot");
    for expected in resume_at + 1..=resume_at + 40 {
        assert_eq!(resumed.next().await.expect("event").revision, expected);
    }
    // Resuming from the newest revision waits for the next change.
    let newest = registry.snapshot().revision();
    let mut caught_up = registry.watch_from(newest);
    assert!(caught_up.snapshot().is_none());
    registry
        .heartbeat(id(&entries[0]), ttl(5_000))
        .expect("live");
    let next = caught_up.next().await.expect("RUNNING");
    assert_eq!((next.revision, next.kind), (newest + 1, EventKind::Running));

    // More changes than it holds: a snapshot, at the newest revision.
    register_many(&registry, "after", 100).await;
    let late = registry.watch_from(resume_at);
    let snapshot = late.snapshot().expect("too far back: a snapshot");
    assert_eq!(snapshot.revision(), registry.snapshot().revision());
    assert_eq!(snapshot.len(), 150);
    // A revision from the future (another registry's) takes a snapshot too.
    assert!(registry.watch_from(u64::MAX / 2).snapshot().is_some());
    // 0 always starts from a snapshot.
    assert!(registry.watch_from(0).snapshot().is_some());
    assert_eq!(registry.history_len(), 64);
}

/// A watcher that stops reading while a mass expiry goes by is not cut
/// off: the history holds the whole pass, and it reads on afterwards.
#[tokio::test(start_paused = true)]
async fn a_stalled_watcher_reads_a_whole_mass_expiry_from_the_history_afterwards() {
    const N: usize = 3_000;
    let config = RegistryConfig {
        watch_history: 4 * N,
        ..RegistryConfig::default()
    };
    let (registry, _task, _) = start(config);
    let entries = register_many(&registry, "w", N).await;
    for e in &entries {
        registry.heartbeat(id(e), ttl(1_000)).expect("live");
    }
    still(registry.settled()).await;
    let mut stalled = registry.watch();
    let from = stalled.snapshot().unwrap().revision();
    sleep(Duration::from_secs(10)).await;
    assert_eq!(registry.count(None), 0, "all expired meanwhile");
    for expected in from + 1..=from + N as u64 {
        let event = stalled.next().await.expect("still in the history");
        assert_eq!(event.revision, expected);
        assert_eq!(event.kind, EventKind::Offline(OfflineReason::Expired));
    }
}

#[tokio::test(start_paused = true)]
async fn revisions_go_on_above_every_earlier_one_after_a_restart_on_the_same_store() {
    let store = MemoryStore::new();
    let (registry, task) = start_on(RegistryConfig::default(), &store);
    let entries = register_many(&registry, "w", 5).await;
    registry
        .heartbeat(id(&entries[0]), ttl(60_000))
        .expect("live");
    still(registry.settled()).await;
    let before = registry.snapshot().revision();
    assert!(before >= 6);
    task.stop().await;

    let (again, _task) = start_on(RegistryConfig::default(), &store);
    let start = again.snapshot().revision();
    assert!(start > before, "restarted at {start}, was at {before}");
    // A resume point from before the restart is not resumed from.
    assert!(again.watch_from(before).snapshot().is_some());
    // A loaded executor's first heartbeat is a RUNNING event again.
    let mut watch = again.watch();
    again
        .heartbeat(id(&entries[0]), ttl(60_000))
        .expect("loaded");
    let event = watch.next().await.expect("RUNNING");
    assert_eq!(
        (event.kind, event.revision),
        (EventKind::Running, start + 1)
    );
}

// ------------------------------------------------- takeover (replicas)

/// A recording store that counts the TTL records written to it.
#[derive(Clone)]
struct CountingTtls {
    inner: MemoryStore,
    written: Arc<Mutex<Vec<(String, Duration)>>>,
}

impl MembershipStore for CountingTtls {
    fn load_all(&mut self) -> Result<Vec<StoredExecutor>, StoreError> {
        self.inner.load_all()
    }
    fn revision_floor(&mut self) -> Result<u64, StoreError> {
        self.inner.revision_floor()
    }
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        self.written
            .lock()
            .expect("lock")
            .extend(batch.ttls.iter().cloned());
        self.inner.commit(batch)
    }
    fn records_ttls(&self) -> bool {
        true
    }
    fn blocks(&self) -> bool {
        false
    }
}

/// A store that records TTLs gets each executor's TTL ceiling (rounded up
/// to the granularity) when it changes, never per heartbeat.
#[tokio::test(start_paused = true)]
async fn a_recording_store_gets_a_ttl_ceiling_per_change_not_per_heartbeat() {
    let store = CountingTtls {
        inner: MemoryStore::recording_ttls(),
        written: Arc::default(),
    };
    let (registry, task) = Registry::start(
        RegistryConfig::default(),
        Box::new(store.clone()),
        Arc::new(NoopObserver),
    )
    .expect("loads");
    let mut entries = register_many(&registry, "w", 3).await;
    entries.sort_by(|a, b| id(a).cmp(id(b)));
    let written =
        || -> Vec<(String, Duration)> { std::mem::take(&mut *store.written.lock().expect("lock")) };
    let stored_ttl = |i: usize| {
        let rows = store.inner.clone().load_all().expect("load");
        rows.into_iter()
            .find(|r| r.id == id(&entries[i]))
            .and_then(|r| r.ttl)
    };
    assert!(written().is_empty(), "registered: nothing recorded");
    // 1.5 s is recorded as 5 s; 12 s as 15 s; the third never heartbeats.
    registry
        .heartbeat(id(&entries[0]), ttl(1_500))
        .expect("live");
    registry
        .heartbeat(id(&entries[1]), ttl(12_000))
        .expect("live");
    still(registry.settled()).await;
    let mut first = written();
    first.sort();
    assert_eq!(
        first,
        [
            (id(&entries[0]).to_owned(), Duration::from_secs(5)),
            (id(&entries[1]).to_owned(), Duration::from_secs(15)),
        ]
    );
    assert_eq!(stored_ttl(0), Some(Duration::from_secs(5)));
    assert_eq!(stored_ttl(2), None);
    // Heartbeats with the same TTL, or one in the same 5 s step, or keeping
    // it: nothing to record.
    for _ in 0..10 {
        registry
            .heartbeat(id(&entries[0]), ttl(1_500))
            .expect("live");
        registry
            .heartbeat(id(&entries[0]), ttl(4_000))
            .expect("live");
        registry.heartbeat(id(&entries[1]), ttl(0)).expect("live");
        still(registry.settled()).await;
    }
    assert!(written().is_empty(), "no record per heartbeat");
    // A TTL in another step is recorded, once.
    registry
        .heartbeat(id(&entries[0]), ttl(31_000))
        .expect("live");
    registry
        .heartbeat(id(&entries[0]), ttl(31_000))
        .expect("live");
    still(registry.settled()).await;
    assert_eq!(
        written(),
        [(id(&entries[0]).to_owned(), Duration::from_secs(35))]
    );
    // A departure takes its record with its row.
    registry.deregister(id(&entries[1])).await.expect("live");
    still(registry.settled()).await;
    assert_eq!(store.inner.clone().load_all().expect("load").len(), 2);
    task.stop().await;
}

/// A registry taking over gives each member its recorded TTL plus the
/// grace from the takeover: one that keeps heartbeating is never expired;
/// one that died before goes OFFLINE at takeover + TTL ceiling + grace, not
/// before; one with no record (never heartbeated) gets the init TTL.
#[tokio::test(start_paused = true)]
async fn a_takeover_gives_each_member_its_recorded_ttl_plus_the_grace() {
    let store = MemoryStore::recording_ttls();
    let config = RegistryConfig::default();
    let (old, task) = start_on(config.clone(), &store);
    let entries = register_many(&old, "w", 3).await;
    let (alive, dead, never) = (
        id(&entries[0]).to_owned(),
        id(&entries[1]).to_owned(),
        id(&entries[2]).to_owned(),
    );
    old.heartbeat(&alive, ttl(3_000)).expect("live");
    old.heartbeat(&dead, ttl(3_000)).expect("live");
    still(old.settled()).await;
    sleep(MS).await;
    task.stop().await;

    let grace = Duration::from_secs(11);
    let (new, _task) = Registry::start_with(
        config.clone(),
        Box::new(store.clone()),
        Arc::new(NoopObserver),
        StartOptions {
            takeover_grace: Some(grace),
            authority: None,
        },
    )
    .expect("loads");
    let took_over = Instant::now();
    let mut watch = new.watch();
    // The live one heartbeats every second throughout.
    let beating = tokio::spawn({
        let (new, alive) = (new.clone(), alive.clone());
        async move {
            loop {
                sleep(SECOND).await;
                new.heartbeat(&alive, ttl(3_000)).expect("never expired");
            }
        }
    });
    // The dead one: recorded 5 s (3 s rounded up) + 11 s.
    let first = next_event(&mut watch).await;
    assert_eq!(
        (id(&first.entry), first.kind),
        (dead.as_str(), EventKind::Offline(OfflineReason::Expired))
    );
    let at = Instant::now() - took_over;
    assert!(
        at >= Duration::from_secs(16) && at <= Duration::from_secs(16) + MS * MAX_LAG_MS as u32,
        "the dead one expired {at:?} after the takeover"
    );
    // The one that never heartbeated: the init TTL (20 s) + 11 s.
    let second = next_event(&mut watch).await;
    assert_eq!(id(&second.entry), never);
    let at = Instant::now() - took_over;
    assert!(at >= Duration::from_secs(31), "{at:?}");
    sleep(Duration::from_secs(60)).await;
    assert!(new.get(&alive).is_ok(), "the live one was never expired");
    beating.abort();
}
