//! Unit tests of the core: liveness, expiry, tombstones, watch, validation
//! and reads, all on tokio's paused clock (no real sleeps).
//!
//! The in-memory store does not block, so the membership loop commits to it
//! inline: registering takes no virtual time, and [`still`] asserts exactly
//! that around set-up. (A blocking store runs on an OS thread that a paused
//! runtime cannot see; while the loop waited for it, tokio would auto-advance
//! virtual time.)

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until};

use super::*;

/// The mass-expiry guard (`tests/guard.rs`).
mod guard;
/// RUNNING events, statuses as of a revision, resumes, revision floors
/// (`tests/watch.rs`).
mod watch;

const MS: Duration = Duration::from_millis(1);

/// A heartbeat's TTL as the wire gives it: ms, 0 keeping the current one.
fn ttl(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}
const SECOND: Duration = Duration::from_secs(1);

/// Most a removal may trail its deadline on the virtual clock ("within a
/// few ms"): the timing wheel has 1 ms slots.
const MAX_LAG_MS: u64 = 3;

/// An observer that remembers expiry passes and published revisions.
#[derive(Default)]
struct Recorder {
    /// One entry per `expired` call: the lags of that pass.
    passes: Mutex<Vec<Vec<Duration>>>,
    /// The revision of every published snapshot, in order.
    revisions: Mutex<Vec<u64>>,
    /// The last `tables` report: (tombstones, timing-wheel entries).
    tables: Mutex<(u64, u64)>,
}

impl Recorder {
    fn passes(&self) -> Vec<Vec<Duration>> {
        self.passes.lock().expect("recorder lock").clone()
    }

    fn revisions(&self) -> Vec<u64> {
        self.revisions.lock().expect("recorder lock").clone()
    }

    fn tables(&self) -> (u64, u64) {
        *self.tables.lock().expect("recorder lock")
    }
}

impl Observer for Recorder {
    fn expired(&self, lags: &[Duration]) {
        self.passes
            .lock()
            .expect("recorder lock")
            .push(lags.to_vec());
    }

    fn membership(&self, revision: u64, _initing: u64, _running: u64) {
        self.revisions.lock().expect("recorder lock").push(revision);
    }

    fn tables(&self, tombstones: u64, wheel: u64) {
        *self.tables.lock().expect("recorder lock") = (tombstones, wheel);
    }
}

/// A registry on an in-memory store, with a [`Recorder`].
fn start(config: RegistryConfig) -> (Registry, RegistryTask, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let (registry, task) = Registry::start(config, Box::new(MemoryStore::new()), recorder.clone())
        .expect("the in-memory store loads");
    (registry, task, recorder)
}

/// Awaits `work` and asserts that no virtual time passed meanwhile (see the
/// module header): every assertion about time is made outside it.
async fn still<F: Future>(work: F) -> F::Output {
    let before = Instant::now();
    let out = work.await;
    assert_eq!(Instant::now(), before, "virtual time moved during set-up");
    out
}

fn registration(name: &str, address: &str) -> Registration {
    Registration {
        name: name.into(),
        address: address.into(),
        labels: Vec::new(),
        owner: None,
    }
}

fn labelled(name: &str, labels: &[(&str, &str)]) -> Registration {
    Registration {
        name: name.into(),
        address: "10.0.0.1:9000".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        owner: None,
    }
}

async fn register(registry: &Registry, name: &str) -> Arc<Entry> {
    still(registry.register(registration(name, "10.0.0.1:9000")))
        .await
        .expect("a valid registration succeeds")
}

/// Registers `n` executors concurrently (they become visible in batches).
async fn register_many(registry: &Registry, name: &str, n: usize) -> Vec<Arc<Entry>> {
    still(async {
        let mut tasks = JoinSet::new();
        for i in 0..n {
            let registry = registry.clone();
            let registration = registration(
                name,
                &format!("10.{}.{}.{}:9000", i >> 16, (i >> 8) & 255, i & 255),
            );
            tasks.spawn(async move { registry.register(registration).await });
        }
        let mut entries = Vec::with_capacity(n);
        while let Some(joined) = tasks.join_next().await {
            entries.push(joined.expect("register task").expect("registration"));
        }
        entries
    })
    .await
}

fn id(entry: &Entry) -> &str {
    entry.id().as_str()
}

fn ids<'a>(entries: impl IntoIterator<Item = &'a Arc<Entry>>) -> Vec<String> {
    entries.into_iter().map(|e| id(e).to_owned()).collect()
}

/// The virtual instant of a deadline on the registry clock.
fn at(registry: &Registry, ms: u64) -> Instant {
    registry.clock().instant_at(ms)
}

/// The next ONLINE or OFFLINE event: RUNNING events (each executor's first
/// heartbeat, which most tests send) are passed over here and checked by
/// the tests about them.
async fn next_event(watch: &mut Watch) -> Event {
    loop {
        let event = watch.next().await.expect("the watch goes on");
        if event.kind != EventKind::Running {
            return event;
        }
    }
}

fn assert_invalid<T: std::fmt::Debug>(result: Result<T, RegistryError>, expected: &str) {
    match result {
        Err(RegistryError::InvalidArgument { field, ref reason }) => {
            assert_eq!(field, expected, "wrong field named ({reason})");
            let message = result.unwrap_err().to_string();
            assert!(
                message.contains(expected),
                "{message:?} does not name {expected}"
            );
        }
        other => panic!("expected InvalidArgument on {expected}, got {other:?}"),
    }
}

// ---------------------------------------------------------------- expiry

#[tokio::test(start_paused = true)]
async fn ten_thousand_coinciding_deadlines_expire_in_one_pass_with_consecutive_revisions() {
    const N: usize = 10_000;
    let config = RegistryConfig {
        // The whole pass is sent before the watcher reads: let it all fit.
        watch_history: 16_384,
        ..RegistryConfig::default()
    };
    let (registry, _task, recorder) = start(config);
    let entries = register_many(&registry, "worker", N).await;
    assert_eq!(registry.count(None), N as u64);

    // One virtual instant, one TTL: every deadline is the same millisecond.
    for entry in &entries {
        registry
            .heartbeat(id(entry), ttl(5_000))
            .expect("a live executor");
    }
    let deadline = entries[0].state().deadline_ms();
    assert!(entries.iter().all(|e| e.state().deadline_ms() == deadline));
    // Their RUNNING events are published before the watch starts.
    still(registry.settled()).await;

    let mut watch = registry.watch();
    let before = watch.snapshot().unwrap().revision();
    assert_eq!(watch.snapshot().unwrap().len(), N);

    // Not a millisecond early.
    sleep_until(at(&registry, deadline) - MS).await;
    assert_eq!(registry.count(None), N as u64);
    assert!(recorder.passes().is_empty());

    let first = next_event(&mut watch).await;
    let removed_at = registry.clock().now_ms();
    // By the first event, the whole batch was already applied and published.
    assert_eq!(registry.count(None), 0);
    assert_eq!(registry.snapshot().revision(), before + N as u64);
    assert!(registry.snapshot().is_empty());
    assert!(
        removed_at >= deadline && removed_at - deadline <= MAX_LAG_MS,
        "removed at {removed_at} ms for a deadline at {deadline} ms"
    );

    let mut events = vec![first];
    while events.len() < N {
        events.push(next_event(&mut watch).await);
    }
    for (i, event) in events.iter().enumerate() {
        assert_eq!(
            event.revision,
            before + 1 + i as u64,
            "revisions are consecutive"
        );
        assert_eq!(event.kind, EventKind::Offline(OfflineReason::Expired));
    }
    let offline: HashSet<String> = ids(events.iter().map(|e| &e.entry)).into_iter().collect();
    let registered: HashSet<String> = ids(&entries).into_iter().collect();
    assert_eq!(
        offline, registered,
        "each executor went offline exactly once"
    );

    // One pass: the observer saw one expiry batch of N, and no snapshot was
    // published between the one before the deadline and the one after it.
    let sizes: Vec<usize> = recorder.passes().iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![N], "expiry passes and their sizes");
    let lags = &recorder.passes()[0];
    assert!(
        lags.iter()
            .all(|lag| *lag <= Duration::from_millis(MAX_LAG_MS)),
        "largest lag {:?}",
        lags.iter().max()
    );
    let published: Vec<u64> = recorder
        .revisions()
        .into_iter()
        .filter(|r| *r > before)
        .collect();
    assert_eq!(published, vec![before + N as u64]);
}

#[tokio::test(start_paused = true)]
async fn an_executor_heartbeating_at_a_third_of_its_ttl_survives_ten_thousand_seconds() {
    let (registry, _task, _) = start(RegistryConfig::default());
    let init_ttl = duration_ms(registry.config().init_ttl);
    let alive = register(&registry, "alive").await;
    let once = register(&registry, "once").await;
    let never = register(&registry, "never").await;
    let t0 = registry.clock().now_ms();
    let mut watch = registry.watch();

    // Every membership change, with the virtual time it was seen at.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let watcher = {
        let (seen, clock) = (seen.clone(), *registry.clock());
        tokio::spawn(async move {
            while let Ok(event) = watch.next().await {
                let mut seen = seen.lock().expect("seen lock");
                seen.push((id(&event.entry).to_owned(), event.kind, clock.now_ms()));
            }
        })
    };

    registry.heartbeat(id(&alive), ttl(3_000)).expect("alive");
    registry.heartbeat(id(&once), ttl(3_000)).expect("alive");
    for second in 1..=10_000u64 {
        sleep(SECOND).await;
        registry
            .heartbeat(id(&alive), ttl(3_000))
            .unwrap_or_else(|e| panic!("heartbeat at {second} s refused: {e}"));
    }
    assert!(registry.clock().now_ms() - t0 >= 10_000_000);
    assert_eq!(alive.status(), Status::Running);
    assert_eq!(registry.count(None), 1);
    assert_eq!(ids(registry.schedulable(&[]).iter()), vec![id(&alive)]);

    watcher.abort();
    let seen = seen.lock().expect("seen lock").clone();
    let expired = EventKind::Offline(OfflineReason::Expired);
    // The two that heartbeated are announced RUNNING at once (in the order
    // of their first heartbeats); then only the silent ones go offline.
    let mut expected = [
        (id(&alive).to_owned(), EventKind::Running, t0),
        (id(&once).to_owned(), EventKind::Running, t0),
        (id(&once).to_owned(), expired, t0 + 3_000),
        (id(&never).to_owned(), expired, t0 + init_ttl),
    ];
    expected.sort_by_key(|e| e.2);
    assert_eq!(seen.len(), 4, "only the silent ones go offline: {seen:?}");
    for ((seen_id, kind, at), (want_id, want_kind, deadline)) in seen.iter().zip(&expected) {
        assert_eq!((seen_id, kind), (want_id, want_kind));
        assert!(
            *at >= *deadline && at - deadline <= MAX_LAG_MS,
            "{seen_id} went offline at {at} ms, deadline {deadline} ms"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn an_initing_executor_expires_after_the_init_ttl_and_not_before() {
    let config = RegistryConfig {
        init_ttl: Duration::from_secs(20),
        ..RegistryConfig::default()
    };
    let (registry, _task, _) = start(config);
    let initing = register(&registry, "initing").await;
    // Registered together, but heartbeated once with a longer TTL: RUNNING.
    let running = register(&registry, "running").await;
    registry
        .heartbeat(id(&running), ttl(60_000))
        .expect("alive");
    let registered = registry.clock().now_ms();
    let deadline = initing.state().deadline_ms();
    assert_eq!(deadline, registered + 20_000);
    let mut watch = registry.watch();

    sleep_until(at(&registry, deadline) - MS).await;
    assert_eq!(initing.status(), Status::Initing);
    assert!(registry.get(id(&initing)).is_ok());
    assert_eq!(registry.count(Some(Status::Initing)), 1);

    let event = next_event(&mut watch).await;
    let now = registry.clock().now_ms();
    assert_eq!(id(&event.entry), id(&initing));
    assert_eq!(event.kind, EventKind::Offline(OfflineReason::Expired));
    assert!(
        now >= deadline && now - deadline <= MAX_LAG_MS,
        "{now} vs {deadline}"
    );
    assert_eq!(
        registry.get(id(&initing)).unwrap_err(),
        RegistryError::NotFound(id(&initing).to_owned())
    );
    assert_eq!(
        registry.heartbeat(id(&initing), ttl(0)).unwrap_err(),
        RegistryError::Tombstone(id(&initing).to_owned())
    );
    assert_eq!(registry.count(Some(Status::Initing)), 0);
    // The init TTL applies to INITING executors only.
    assert_eq!(registry.count(Some(Status::Running)), 1);
    assert!(registry.get(id(&running)).is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_tombstone_answers_late_heartbeats_until_the_retention_then_is_forgotten() {
    let retention = Duration::from_secs(30);
    let config = RegistryConfig {
        tombstone_retention: retention,
        ..RegistryConfig::default()
    };
    let (registry, _task, _) = start(config);
    let gone = register(&registry, "gone").await;
    let gone = id(&gone).to_owned();
    let mut watch = registry.watch();
    registry.heartbeat(&gone, ttl(1_000)).expect("alive");

    let event = next_event(&mut watch).await;
    assert_eq!(event.kind, EventKind::Offline(OfflineReason::Expired));
    let expired_at = registry.clock().now_ms();
    let tombstone = Err(RegistryError::Tombstone(gone.clone()));
    let not_found = Err(RegistryError::NotFound(gone.clone()));
    let beat = |ttl_ms| registry.heartbeat(&gone, ttl(ttl_ms)).map(|_| ());
    assert_eq!(beat(0), tombstone);
    assert_eq!(beat(1_000), tombstone);
    assert_eq!(registry.get(&gone).map(|_| ()), not_found);
    assert_eq!(registry.deregister(&gone).await, not_found);

    let forget_at = expired_at + duration_ms(retention);
    sleep_until(at(&registry, forget_at) - MS).await;
    assert_eq!(beat(0), tombstone);

    // Forgotten at the first housekeeping pass after the retention.
    sleep_until(at(&registry, forget_at) + SECOND + MS).await;
    assert_eq!(beat(0), not_found);
}

#[tokio::test(start_paused = true)]
async fn a_shorter_ttl_than_the_queued_deadline_expires_on_the_new_deadline() {
    // Queued at the init deadline (20 s); the first heartbeat asks for 1 s.
    let (registry, _task, _) = start(RegistryConfig::default());
    let entry = register(&registry, "short").await;
    let mut watch = registry.watch();
    registry.heartbeat(id(&entry), ttl(1_000)).expect("alive");
    let deadline = entry.state().deadline_ms();

    sleep_until(at(&registry, deadline) - MS).await;
    assert!(registry.get(id(&entry)).is_ok());
    let event = next_event(&mut watch).await;
    let now = registry.clock().now_ms();
    assert_eq!(id(&event.entry), id(&entry));
    assert!(
        now >= deadline && now - deadline <= MAX_LAG_MS,
        "{now} vs {deadline}"
    );
}

#[tokio::test(start_paused = true)]
async fn shortening_the_ttl_after_the_loop_re_queued_a_long_one_still_expires_on_time() {
    let (registry, _task, _) = start(RegistryConfig::default());
    let entry = register(&registry, "shrinking").await;
    registry.heartbeat(id(&entry), ttl(60_000)).expect("alive");
    // Past the init deadline (20 s): the loop popped it and re-queued it at
    // its 60 s deadline.
    sleep(Duration::from_secs(25)).await;
    let mut watch = registry.watch();
    registry.heartbeat(id(&entry), ttl(1_000)).expect("alive");
    let deadline = entry.state().deadline_ms();

    sleep_until(at(&registry, deadline) - MS).await;
    assert!(registry.get(id(&entry)).is_ok());
    let event = next_event(&mut watch).await;
    let now = registry.clock().now_ms();
    assert_eq!(id(&event.entry), id(&entry));
    assert_eq!(event.kind, EventKind::Offline(OfflineReason::Expired));
    assert!(
        now >= deadline && now - deadline <= MAX_LAG_MS,
        "{now} vs {deadline}"
    );
}

// ------------------------------------------------------------ heartbeats

#[tokio::test(start_paused = true)]
async fn a_heartbeat_with_ttl_zero_keeps_the_current_ttl() {
    let (registry, _task, _) = start(RegistryConfig::default());
    let init_ttl = duration_ms(registry.config().init_ttl);
    let entry = register(&registry, "keeper").await;
    let mut watch = registry.watch();

    // A first heartbeat with 0 keeps the init TTL.
    registry.heartbeat(id(&entry), ttl(0)).expect("alive");
    assert_eq!(entry.status(), Status::Running);
    assert_eq!(entry.ttl_ms(), init_ttl);
    assert_eq!(
        entry.state().deadline_ms(),
        registry.clock().now_ms() + init_ttl
    );

    registry.heartbeat(id(&entry), ttl(2_000)).expect("alive");
    sleep(SECOND).await;
    registry.heartbeat(id(&entry), ttl(0)).expect("alive");
    assert_eq!(entry.ttl_ms(), 2_000);
    let deadline = entry.state().deadline_ms();
    assert_eq!(deadline, registry.clock().now_ms() + 2_000);

    // And it expires on that deadline.
    sleep_until(at(&registry, deadline) - MS).await;
    assert!(registry.get(id(&entry)).is_ok());
    next_event(&mut watch).await;
    let now = registry.clock().now_ms();
    assert!(
        now >= deadline && now - deadline <= MAX_LAG_MS,
        "{now} vs {deadline}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_out_of_range_ttl_is_refused_naming_ttl_ms_and_changes_nothing() {
    let config = RegistryConfig {
        min_ttl: Duration::from_millis(100),
        max_ttl: Duration::from_secs(600),
        ..RegistryConfig::default()
    };
    let (registry, _task, _) = start(config);
    let entry = register(&registry, "strict").await;
    let (state, ttl_before) = (entry.state(), entry.ttl_ms());
    for bad in [1, 99, 600_001, u64::MAX] {
        assert_invalid(registry.heartbeat(id(&entry), ttl(bad)), "ttl_ms");
        assert_eq!(entry.state(), state, "ttl {bad} changed the state word");
        assert_eq!(entry.ttl_ms(), ttl_before, "ttl {bad} changed the TTL");
        assert_eq!(registry.count(Some(Status::Initing)), 1);
    }
    // The bounds themselves are allowed.
    registry.heartbeat(id(&entry), ttl(100)).expect("min TTL");
    assert_eq!(entry.ttl_ms(), 100);
    registry
        .heartbeat(id(&entry), ttl(600_000))
        .expect("max TTL");
    let (state, ttl_before) = (entry.state(), entry.ttl_ms());
    assert_invalid(registry.heartbeat(id(&entry), ttl(600_001)), "ttl_ms");
    assert_eq!((entry.state(), entry.ttl_ms()), (state, ttl_before));
    assert_eq!(registry.count(Some(Status::Running)), 1);
    // No id, unknown id.
    assert_invalid(registry.heartbeat("", ttl(1_000)), "executor_id");
    assert_eq!(
        registry.heartbeat("nobody-0000000000000000", ttl(1_000)),
        Err(RegistryError::NotFound("nobody-0000000000000000".into()))
    );
}

// ------------------------------------------------------------ deregister

#[tokio::test(start_paused = true)]
async fn a_deregistered_executor_is_removed_at_once_and_its_heartbeats_meet_a_tombstone() {
    let (registry, _task, _) = start(RegistryConfig::default());
    let leaver = register(&registry, "leaver").await;
    let stayer = register(&registry, "stayer").await;
    registry.heartbeat(id(&leaver), ttl(10_000)).expect("alive");
    registry.heartbeat(id(&stayer), ttl(10_000)).expect("alive");
    // Their RUNNING events are published before the watch starts.
    still(registry.settled()).await;
    let mut watch = registry.watch();
    let before = watch.snapshot().unwrap().revision();
    let leaver_id = id(&leaver).to_owned();

    registry.deregister(&leaver_id).await.expect("deregistered");
    // Removed by the time the call returns, with no time passing.
    assert_eq!(
        registry.get(&leaver_id).map(|_| ()),
        Err(RegistryError::NotFound(leaver_id.clone()))
    );
    assert!(registry.snapshot().get(&leaver_id).is_none());
    assert_eq!(registry.snapshot().revision(), before + 1);
    assert_eq!(
        ids(registry.list(None, &[]).0.iter().map(|(e, _)| e)),
        vec![id(&stayer)]
    );
    assert_eq!(registry.count(None), 1);
    assert_eq!(registry.count(Some(Status::Running)), 1);

    let event = next_event(&mut watch).await;
    assert_eq!(event.revision, before + 1);
    assert_eq!(event.kind, EventKind::Offline(OfflineReason::Deregistered));
    assert_eq!(id(&event.entry), leaver_id);

    assert_eq!(
        registry.heartbeat(&leaver_id, ttl(0)),
        Err(RegistryError::Tombstone(leaver_id.clone()))
    );
    assert_eq!(
        registry.deregister(&leaver_id).await,
        Err(RegistryError::NotFound(leaver_id.clone()))
    );
    assert_eq!(
        registry.deregister("nobody-0000000000000000").await,
        Err(RegistryError::NotFound("nobody-0000000000000000".into()))
    );
    assert_invalid(registry.deregister("").await, "executor_id");
    // The failed calls changed nothing.
    assert_eq!(registry.snapshot().revision(), before + 1);
    assert_eq!(registry.count(None), 1);
}

// ----------------------------------------------------------------- watch

/// Applies events to a set of ids, checking each makes sense for it.
/// A mass expiry (at least `BULK_REMOVALS` in one pass) leaves its
/// tombstoned entries in the snapshot's map for a background purge: readers
/// never see them, counts and `len` are exact at once, a registration made
/// around the purge is kept, and the purge takes the tombstones out.
#[tokio::test(start_paused = true)]
async fn a_mass_expiry_leaves_no_visible_trace_and_its_tombstones_are_purged() {
    let n = super::membership::BULK_REMOVALS * 3;
    let (registry, _task, recorder) = start(RegistryConfig::default());
    let dying = register_many(&registry, "dying", n).await;
    let kept = register_many(&registry, "kept", 100).await;
    for entry in &kept {
        registry
            .heartbeat(id(entry), ttl(60_000))
            .expect("a live executor");
    }
    let deadline = dying[0].state().deadline_ms();
    assert!(dying.iter().all(|e| e.state().deadline_ms() == deadline));

    sleep_until(at(&registry, deadline) + MS).await;
    let sizes: Vec<usize> = recorder.passes().iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![n], "one pass");
    // Expired is expired wherever the entry still sits.
    assert!(matches!(
        registry.heartbeat(id(&dying[0]), ttl(0)),
        Err(RegistryError::Tombstone(_))
    ));
    assert!(matches!(
        registry.get(id(&dying[1])),
        Err(RegistryError::NotFound(_))
    ));
    let late = register(&registry, "late").await;
    let mut expected: HashSet<String> = ids(&kept).into_iter().collect();
    expected.insert(id(&late).to_owned());
    let snapshot = registry.snapshot();
    assert_eq!(snapshot.len(), kept.len() + 1);
    assert_eq!(snapshot_ids(&snapshot), expected);
    assert_eq!(registry.count(None), kept.len() as u64 + 1);
    assert_eq!(registry.list(None, &[]).0.len(), kept.len() + 1);

    // The purge runs on the background thread, in real time, which paused
    // tokio time would race past: wait for it in real time.
    let mut waited = 0;
    while registry.snapshot().held() != kept.len() + 1 {
        waited += 1;
        assert!(waited < 30_000, "tombstones never purged in 30 s");
        tokio::task::spawn_blocking(|| {
            #[allow(
                clippy::disallowed_methods,
                reason = "a real-time wait for a real thread"
            )]
            std::thread::sleep(std::time::Duration::from_millis(1));
        })
        .await
        .expect("the wait");
    }
    let snapshot = registry.snapshot();
    assert_eq!(snapshot.len(), kept.len() + 1);
    assert_eq!(snapshot_ids(&snapshot), expected);
    // The live table has moved them all to the tombstone set.
    assert_eq!(registry.tables.live.len(), kept.len() + 1);
    assert!(
        dying
            .iter()
            .all(|e| registry.tables.tombstones.contains(id(e)))
    );
    assert!(matches!(
        registry.heartbeat(id(&dying[2]), ttl(0)),
        Err(RegistryError::Tombstone(_))
    ));
    assert_eq!(
        registry
            .snapshot()
            .get(id(&late))
            .map(|(e, _)| id(e).to_owned()),
        Some(id(&late).to_owned())
    );
    assert!(registry.snapshot().get(id(&dying[0])).is_none());
}

fn replay(view: &mut HashSet<String>, events: &[Event]) {
    for event in events {
        let id = id(&event.entry).to_owned();
        match event.kind {
            EventKind::Online => assert!(view.insert(id), "ONLINE for a member"),
            EventKind::Running => assert!(view.contains(&id), "RUNNING for a non-member"),
            EventKind::Offline(_) => assert!(view.remove(&id), "OFFLINE for a non-member"),
        }
    }
}

fn snapshot_ids(snapshot: &Snapshot) -> HashSet<String> {
    snapshot.iter().map(|(e, _)| id(e).to_owned()).collect()
}

async fn events_until(watch: &mut Watch, revision: u64) -> Vec<Event> {
    let mut events = Vec::new();
    let mut expected = watch.snapshot().unwrap().revision() + 1;
    while expected <= revision {
        let event = watch.next().await.expect("the watch goes on");
        assert_eq!(event.revision, expected, "revisions are consecutive");
        expected += 1;
        events.push(event);
    }
    events
}

#[tokio::test(start_paused = true)]
async fn a_watch_yields_the_snapshot_then_every_change_with_consecutive_revisions() {
    let (registry, _task, _) = start(RegistryConfig::default());
    let first = register_many(&registry, "first", 5).await;
    let mut early = registry.watch();
    let mut early_view = snapshot_ids(early.snapshot().unwrap());
    assert_eq!(early.snapshot().unwrap().revision(), 5);
    assert_eq!(early_view, ids(&first).into_iter().collect());

    // Registrations, deregistrations and expiries, interleaved.
    let second = register_many(&registry, "second", 4).await;
    registry.deregister(id(&first[0])).await.expect("live");
    registry.deregister(id(&second[1])).await.expect("live");
    for entry in [&first[1], &first[2]] {
        registry.heartbeat(id(entry), ttl(1_000)).expect("alive");
    }
    for entry in [&first[3], &first[4], &second[0], &second[2], &second[3]] {
        registry.heartbeat(id(entry), ttl(60_000)).expect("alive");
    }
    let mut late = registry.watch();
    let mut late_view = snapshot_ids(late.snapshot().unwrap());
    assert_eq!(late.snapshot().unwrap().revision(), 5 + 4 + 2);
    sleep(Duration::from_secs(2)).await;
    let third = register_many(&registry, "third", 2).await;
    registry.deregister(id(&second[0])).await.expect("live");

    // 4 + 2 + 2 + 2 + 1 changes, and 7 first heartbeats (RUNNING); later
    // heartbeats are none.
    let last = 5 + 11 + 7;
    assert_eq!(registry.snapshot().revision(), last);
    let events = events_until(&mut early, last).await;
    let of_kind = |kind| events.iter().filter(|e| e.kind == kind).count();
    assert_eq!(of_kind(EventKind::Online), 6);
    assert_eq!(of_kind(EventKind::Running), 7);
    assert_eq!(of_kind(EventKind::Offline(OfflineReason::Deregistered)), 3);
    assert_eq!(of_kind(EventKind::Offline(OfflineReason::Expired)), 2);
    let expired: HashSet<String> = events
        .iter()
        .filter(|e| e.kind == EventKind::Offline(OfflineReason::Expired))
        .map(|e| id(&e.entry).to_owned())
        .collect();
    assert_eq!(expired, ids([&first[1], &first[2]]).into_iter().collect());

    // Snapshot + events = the current membership, for either watcher.
    let now = snapshot_ids(&registry.snapshot());
    replay(&mut early_view, &events);
    assert_eq!(early_view, now);
    replay(&mut late_view, &events_until(&mut late, last).await);
    assert_eq!(late_view, now);
    assert!(now.contains(id(&third[0])) && now.contains(id(&third[1])));
}

#[tokio::test(start_paused = true)]
async fn a_watcher_that_falls_behind_its_buffer_is_told_it_lagged_and_never_sees_a_gap() {
    let config = RegistryConfig {
        watch_history: 16,
        ..RegistryConfig::default()
    };
    let (registry, _task, _) = start(config);
    let mut stalled = registry.watch();
    // A watcher that keeps up is not affected by the one that does not.
    let mut keeping_up = registry.watch();
    let reader = tokio::spawn(async move {
        let mut revisions = Vec::new();
        while let Ok(event) = keeping_up.next().await {
            revisions.push(event.revision);
            if revisions.len() == 150 {
                break;
            }
        }
        revisions
    });

    // 150 membership changes while `stalled` reads nothing: none waits for it.
    let entries = still(async {
        let mut entries = Vec::new();
        for i in 0..100 {
            let entry = registry
                .register(registration("busy", &format!("10.0.0.{i}:1")))
                .await
                .expect("registered");
            entries.push(entry);
        }
        for entry in &entries[..50] {
            registry.deregister(id(entry)).await.expect("deregistered");
        }
        entries
    })
    .await;
    assert_eq!(registry.snapshot().revision(), 150);
    assert_eq!(registry.count(None), 50);
    registry
        .heartbeat(id(&entries[99]), ttl(1_000))
        .expect("heartbeats are unaffected");

    let revisions = reader.await.expect("reader");
    assert_eq!(revisions, (1..=150).collect::<Vec<u64>>());

    match stalled.next().await {
        Err(WatchError::Lagged { last, oldest }) => {
            // It was given nothing after its snapshot, and the history has
            // moved past the next event it needs.
            assert_eq!(last, 0);
            assert!(oldest > last + 1, "oldest held {oldest}");
        }
        other => panic!("expected Lagged, got {other:?}"),
    }
    // The watch is over: asking again must not resume after a gap.
    match stalled.next().await {
        Err(WatchError::Lagged { .. }) => {}
        other => panic!("a lagged watch went on: {other:?}"),
    }
    // Watching again starts from a snapshot that includes everything: the
    // 150 changes, and the RUNNING event of the heartbeat above.
    registry.settled().await;
    let again = registry.watch();
    assert_eq!(again.snapshot().unwrap().revision(), 151);
    assert_eq!(again.snapshot().unwrap().len(), 50);
}

// ------------------------------------------------------- ids, validation

#[tokio::test(start_paused = true)]
async fn ids_are_the_name_and_16_lowercase_hex_digits_and_unique_across_10_000() {
    let (registry, _task, _) = start(RegistryConfig::default());
    let named = register(&registry, "gpu.node-1").await;
    let hex16 = "[0-9a-f]{16}";
    let format = |prefix: &str| regex::Regex::new(&format!("^{prefix}-{hex16}$")).expect("regex");
    assert!(
        format(r"gpu\.node-1").is_match(id(&named)),
        "{:?}",
        named.id()
    );
    assert_eq!(named.name(), "gpu.node-1");
    let unnamed = register(&registry, "").await;
    assert!(
        format("executor").is_match(id(&unnamed)),
        "{:?}",
        unnamed.id()
    );

    let many = register_many(&registry, "worker", 10_000).await;
    let worker = format("worker");
    assert!(many.iter().all(|e| worker.is_match(id(e))));
    let unique: HashSet<String> = ids(&many).into_iter().collect();
    assert_eq!(unique.len(), 10_000);
    assert_eq!(registry.count(None), 10_002);
}

#[tokio::test(start_paused = true)]
async fn invalid_registrations_are_refused_naming_the_field_and_register_nothing() {
    let (registry, _task, _) = start(RegistryConfig::default());
    let long_address = format!("{}:80", "h".repeat(253)); // 256 bytes
    let bad_addresses = [
        "",
        "host",
        "host:",
        "host:0",
        "host:70000",
        "host:65536",
        "host:-1",
        "host:+80",
        ":80",
        "a b:1",
        "::1:80",
        "[::1:80",
        "[zz]:80",
        "h\u{e9}:80",
        &long_address,
    ];
    for address in bad_addresses {
        let refused = registry.register(registration("w", address)).await;
        assert_invalid(refused, "address");
    }
    let long_name = "n".repeat(129);
    for name in [long_name.as_str(), "a b", "tab\t", "caf\u{e9}", "nl\n"] {
        assert_invalid(registry.register(registration(name, "h:1")).await, "name");
    }
    let many: Vec<(String, String)> = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
    let bad_labels = [
        vec![("a_b".to_owned(), "v".to_owned())],
        vec![("k".into(), String::new())],
        vec![(String::new(), "v".into())],
        vec![("-k".into(), "v".into())],
        vec![("k".into(), "v".repeat(64))],
        vec![("k".into(), "1".into()), ("k".into(), "2".into())],
        many,
    ];
    for labels in bad_labels {
        let refused = registry
            .register(Registration {
                name: "w".into(),
                address: "h:1".into(),
                labels,
                owner: None,
            })
            .await;
        assert_invalid(refused, "labels");
    }
    assert_eq!(registry.count(None), 0);
    assert_eq!(registry.snapshot().revision(), 0);
    assert!(registry.snapshot().is_empty());

    // The edges that are allowed.
    let longest_address = format!("{}:80", "h".repeat(252)); // 255 bytes
    let good = [
        registration("", "10.0.0.7:9000"),
        registration(&"n".repeat(128), "localhost:65535"),
        registration("w", "[::1]:80"),
        registration("w", "my-host.example.com:1"),
        registration("w", &longest_address),
        labelled("w", &[("k", &"v".repeat(63)), ("zone.a-1", "x")]),
    ];
    let n = good.len();
    for registration in good {
        let what = format!("{registration:?}");
        still(registry.register(registration))
            .await
            .unwrap_or_else(|e| panic!("{what} refused: {e}"));
    }
    assert_eq!(registry.count(None), n as u64);
}

// ----------------------------------------------------------------- reads

fn selector(label: &str, target: &str, op: SelectorOp) -> Selector {
    Selector::new(label, target, Some(op)).expect("valid selector")
}

#[tokio::test(start_paused = true)]
async fn counts_and_the_scheduler_view_follow_every_transition() {
    let (registry, _task, _) = start(RegistryConfig::default());
    let count = |status| registry.count(status);
    let a = still(registry.register(labelled("a", &[("zone", "a"), ("gpu", "yes")]))).await;
    let b = still(registry.register(labelled("b", &[("zone", "b")]))).await;
    let c = still(registry.register(labelled("c", &[("zone", "a")]))).await;
    let (a, b, c) = (a.expect("a"), b.expect("b"), c.expect("c"));
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(
        (
            count(None),
            count(Some(Status::Initing)),
            count(Some(Status::Running))
        ),
        (3, 3, 0)
    );
    // INITING executors are never schedulable.
    assert!(registry.schedulable(&[]).is_empty());
    assert_eq!(registry.list(Some(Status::Initing), &[]).0.len(), 3);
    let (all, revision) = registry.list(None, &[]);
    assert_eq!(
        ids(all.iter().map(|(e, _)| e)),
        sorted(ids([&a, &b, &c])),
        "list is sorted by id"
    );
    assert_eq!(revision, registry.snapshot().revision());

    registry.heartbeat(id(&a), ttl(3_000)).expect("alive");
    registry.heartbeat(id(&b), ttl(60_000)).expect("alive");
    assert_eq!(
        (
            count(None),
            count(Some(Status::Initing)),
            count(Some(Status::Running))
        ),
        (3, 1, 2)
    );
    // Snapshots show them RUNNING once their RUNNING events are published.
    assert!(registry.schedulable(&[]).is_empty());
    still(registry.settled()).await;
    assert_eq!(ids(registry.schedulable(&[]).iter()), sorted(ids([&a, &b])));
    let zone_a = [selector("zone", "a", SelectorOp::Eq)];
    assert_eq!(ids(registry.schedulable(&zone_a).iter()), vec![id(&a)]);
    let not_a = [selector("zone", "a", SelectorOp::Neq)];
    assert_eq!(ids(registry.schedulable(&not_a).iter()), vec![id(&b)]);
    let no_gpu = [selector("gpu", "yes", SelectorOp::Neq)];
    assert_eq!(ids(registry.schedulable(&no_gpu).iter()), vec![id(&b)]);
    let any_zone = [selector("zone", "[ab]", SelectorOp::Regex)];
    assert_eq!(registry.schedulable(&any_zone).len(), 2);
    let both = [
        selector("zone", "a|b", SelectorOp::Regex),
        selector("gpu", "y.*", SelectorOp::Regex),
    ];
    assert_eq!(ids(registry.schedulable(&both).iter()), vec![id(&a)]);
    assert_eq!(
        ids(registry
            .list(Some(Status::Initing), &zone_a)
            .0
            .iter()
            .map(|(e, _)| e)),
        vec![id(&c)]
    );

    registry.heartbeat(id(&c), ttl(60_000)).expect("alive");
    assert_eq!(
        (count(Some(Status::Initing)), count(Some(Status::Running))),
        (0, 3)
    );
    still(registry.settled()).await;
    assert_eq!(
        ids(registry.schedulable(&zone_a).iter()),
        sorted(ids([&a, &c]))
    );

    registry.deregister(id(&b)).await.expect("live");
    assert_eq!((count(None), count(Some(Status::Running))), (2, 2));
    assert!(registry.schedulable(&not_a).is_empty());

    // `a` stops heartbeating and expires.
    sleep(Duration::from_secs(4)).await;
    assert_eq!((count(None), count(Some(Status::Running))), (1, 1));
    assert_eq!(ids(registry.schedulable(&zone_a).iter()), vec![id(&c)]);

    let d = register(&registry, "d").await;
    assert_eq!(
        (
            count(None),
            count(Some(Status::Initing)),
            count(Some(Status::Running))
        ),
        (2, 1, 1)
    );
    assert_eq!(ids(registry.schedulable(&[]).iter()), vec![id(&c)]);
    let (all, _) = registry.list(None, &[]);
    assert_eq!(ids(all.iter().map(|(e, _)| e)), sorted(ids([&c, &d])));
    assert_eq!(count(Some(Status::Tombstone)), 0);
}

#[tokio::test(start_paused = true)]
async fn the_suggested_interval_grows_with_the_fleet_over_the_heartbeat_budget() {
    let config = RegistryConfig {
        heartbeat_interval: Duration::from_millis(500),
        max_heartbeats_per_second: 100,
        ..RegistryConfig::default()
    };
    let (registry, _task, _) = start(config);
    let first = register(&registry, "w").await;
    // 1 ÷ 100/s = 10 ms: the floor wins.
    assert_eq!(
        registry.heartbeat(id(&first), ttl(0)),
        Ok(Duration::from_millis(500))
    );
    register_many(&registry, "w", 59).await;
    // 60 ÷ 100/s = 600 ms.
    assert_eq!(
        registry.heartbeat(id(&first), ttl(0)),
        Ok(Duration::from_millis(600))
    );
    let rest = register_many(&registry, "w", 940).await;
    // 1,000 ÷ 100/s = 10 s.
    assert_eq!(
        registry.heartbeat(id(&first), ttl(0)),
        Ok(Duration::from_secs(10))
    );
    assert_eq!(registry.suggested_interval(), Duration::from_secs(10));
    // It shrinks again as the fleet does.
    for entry in &rest[..900] {
        registry.deregister(id(entry)).await.expect("live");
    }
    assert_eq!(
        registry.heartbeat(id(&first), ttl(0)),
        Ok(Duration::from_millis(1_000))
    );
}

/// A stall of the registry itself: the clock jumps `stall` while no task
/// runs (as under SIGSTOP), then the loop gets to run before anything else.
async fn stall_registry(stall: Duration) {
    tokio::time::advance(stall).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn executors_are_not_expired_for_heartbeats_the_registry_was_too_stalled_to_read() {
    let (registry, _task, _) = start(RegistryConfig::default());
    let alive = register(&registry, "alive").await;
    let dead = register(&registry, "dead").await;
    registry
        .heartbeat(id(&alive), ttl(1_000))
        .expect("alive beats");
    registry
        .heartbeat(id(&dead), ttl(1_000))
        .expect("dead beats once, then dies");
    let mut watch = registry.watch();
    sleep(Duration::from_millis(300)).await;
    registry
        .heartbeat(id(&alive), ttl(1_000))
        .expect("alive beats");

    // Stalled for twice the TTL: both deadlines pass while nothing runs.
    stall_registry(Duration::from_secs(2)).await;
    let resumed = registry.clock().now_ms();
    assert_eq!(alive.status(), Status::Running, "not expired at the resume");
    assert_eq!(dead.status(), Status::Running, "not expired at the resume");

    // The heartbeat sent during the stall is read now, and alive carries on.
    let beats = tokio::spawn({
        let registry = registry.clone();
        let alive = id(&alive).to_owned();
        async move {
            for _ in 0..20 {
                registry
                    .heartbeat(&alive, ttl(1_000))
                    .expect("alive keeps beating");
                sleep(Duration::from_millis(300)).await;
            }
        }
    });
    // The dead one still expires: at the end of the resume grace (its
    // deadline moved by the stall's length falls before that), not never.
    let event = next_event(&mut watch).await;
    let now = registry.clock().now_ms();
    assert_eq!(id(&event.entry), id(&dead));
    assert_eq!(event.kind, EventKind::Offline(OfflineReason::Expired));
    let grace = super::membership::RESUME_GRACE.as_millis() as u64;
    assert!(
        now >= resumed + grace && now <= resumed + grace + MAX_LAG_MS,
        "expired {}ms after the resume",
        now - resumed
    );
    beats.await.expect("alive was never expired");
    assert_eq!(alive.status(), Status::Running);
}

/// The control: without compensation the same stall expires the live
/// executor at the resume (what the test above guards against).
#[tokio::test(start_paused = true)]
async fn without_stall_compensation_a_stall_expires_live_executors() {
    let config = RegistryConfig {
        stall_threshold: Duration::ZERO,
        ..RegistryConfig::default()
    };
    let (registry, _task, _) = start(config);
    let alive = register(&registry, "alive").await;
    registry
        .heartbeat(id(&alive), ttl(1_000))
        .expect("alive beats");
    stall_registry(Duration::from_secs(2)).await;
    assert_eq!(alive.status(), Status::Tombstone);
    assert_eq!(
        registry.heartbeat(id(&alive), ttl(1_000)).unwrap_err(),
        RegistryError::Tombstone(id(&alive).to_owned())
    );
}

/// A short hiccup below the threshold is not a stall: expiry stays exact.
#[tokio::test(start_paused = true)]
async fn a_hiccup_below_the_stall_threshold_changes_nothing() {
    let (registry, _task, _) = start(RegistryConfig::default());
    let silent = register(&registry, "silent").await;
    registry
        .heartbeat(id(&silent), ttl(1_000))
        .expect("beats once");
    sleep(Duration::from_millis(500)).await;
    // 600 ms without the loop: late, but under tick + 1 s.
    stall_registry(Duration::from_millis(600)).await;
    assert_eq!(
        silent.status(),
        Status::Tombstone,
        "expired at its deadline"
    );
}

#[tokio::test(start_paused = true)]
async fn registrations_beyond_max_executors_are_refused_and_change_nothing() {
    let config = RegistryConfig {
        max_executors: 2,
        ..RegistryConfig::default()
    };
    let (registry, _task, _) = start(config);
    let a = register(&registry, "a").await;
    register(&registry, "b").await;
    let refused = still(registry.register(registration("c", "10.0.0.1:1"))).await;
    assert!(
        matches!(&refused, Err(RegistryError::ResourceExhausted(m)) if m.contains("--max-executors")),
        "{refused:?}"
    );
    assert_eq!(registry.count(None), 2);
    assert_eq!(registry.snapshot().revision(), 2);
    still(registry.deregister(id(&a)))
        .await
        .expect("deregister");
    register(&registry, "c").await;
}

// ------------------------------------------------------ restart grace

/// A stored executor as a previous run of the registry left it.
fn stored(i: usize) -> StoredExecutor {
    StoredExecutor {
        id: format!("stored-{i:016x}"),
        name: "stored".into(),
        address: format!("10.0.1.{i}:9000"),
        labels: vec![
            ("idx".into(), i.to_string()),
            (
                "pool".into(),
                if i.is_multiple_of(2) { "even" } else { "odd" }.into(),
            ),
        ],
        registered_unix_ms: 1_600_000_000_000 + i as u64,
        owner: None,
        ttl: None,
    }
}

/// A memory store that already holds `rows`.
fn store_holding(rows: impl IntoIterator<Item = StoredExecutor>) -> MemoryStore {
    let mut store = MemoryStore::new();
    store
        .commit(&Batch {
            inserts: rows.into_iter().collect(),
            deletes: Vec::new(),
            revision_floor: None,
            ttls: Vec::new(),
        })
        .expect("the memory store commits");
    store
}

/// Ids of what `store` holds, sorted.
fn stored_ids(store: &MemoryStore) -> Vec<String> {
    let mut ids: Vec<String> = store
        .clone()
        .load_all()
        .expect("the memory store loads")
        .into_iter()
        .map(|row| row.id)
        .collect();
    ids.sort();
    ids
}

/// A registry started on `store` (a clone: the caller keeps a handle on the rows).
fn start_on(config: RegistryConfig, store: &MemoryStore) -> (Registry, RegistryTask) {
    Registry::start(config, Box::new(store.clone()), Arc::new(NoopObserver))
        .expect("the memory store loads")
}

/// A mass expiry queues its store deletes as the following turns unlink
/// the departed; a stop before they all ran still deletes every one.
#[tokio::test(start_paused = true)]
async fn a_stop_right_after_a_mass_expiry_still_deletes_every_departed_row() {
    // Several unlink turns' worth (4,096 a turn).
    let n = 3 * 4096 + 1;
    let store = MemoryStore::new();
    let (registry, task) = start_on(RegistryConfig::default(), &store);
    let dying = register_many(&registry, "dying", n).await;
    let deadline = dying[0].state().deadline_ms();
    assert!(dying.iter().all(|e| e.state().deadline_ms() == deadline));
    assert_eq!(stored_ids(&store).len(), n);
    // Wake at the deadline, beside the loop's pass, and stop at once.
    sleep_until(at(&registry, deadline)).await;
    task.stop().await;
    assert!(
        dying.iter().all(|e| e.status() == Status::Tombstone),
        "the pass ran before the stop"
    );
    assert_eq!(stored_ids(&store).len(), 0, "rows left in the store");
}

#[tokio::test(start_paused = true)]
async fn stored_executors_come_back_initing_with_a_fresh_init_ttl_and_the_silent_ones_expire_and_are_deleted()
 {
    const N: usize = 10;
    let init_ttl = Duration::from_secs(20);
    let store = store_holding((0..N).map(stored));
    // The rows are old: the grace runs from the start, not from registration.
    sleep(Duration::from_secs(3600)).await;
    let config = RegistryConfig {
        init_ttl,
        ..RegistryConfig::default()
    };
    let started = Instant::now();
    let (registry, task) = start_on(config.clone(), &store);

    // Everything is back, INITING, as it was stored, with a fresh init TTL.
    let snapshot = registry.snapshot();
    assert_eq!(snapshot.len(), N);
    assert_eq!(registry.count(Some(Status::Initing)), N as u64);
    assert_eq!(registry.count(Some(Status::Running)), 0);
    assert!(
        registry.schedulable(&[]).is_empty(),
        "INITING is never schedulable"
    );
    let now = registry.clock().now_ms();
    for ((entry, status), row) in snapshot.iter().zip((0..N).map(stored)) {
        assert_eq!(id(entry), row.id);
        assert_eq!(entry.status(), Status::Initing);
        assert_eq!(status, Status::Initing);
        assert_eq!(entry.name(), row.name);
        assert_eq!(entry.address(), row.address);
        let labels: Vec<(String, String)> = entry
            .labels()
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(labels, row.labels);
        assert_eq!(entry.registered_unix_ms(), row.registered_unix_ms);
        assert_eq!(entry.ttl_ms(), 20_000);
        assert_eq!(entry.state().deadline_ms(), now + 20_000);
    }
    let mut watch = registry.watch();

    // The even ones heartbeat (late in the grace, but within it).
    sleep(Duration::from_secs(15)).await;
    let survivors: Vec<String> = (0..N).step_by(2).map(|i| stored(i).id).collect();
    let silent: Vec<String> = (1..N).step_by(2).map(|i| stored(i).id).collect();
    for id in &survivors {
        registry
            .heartbeat(id, ttl(60_000))
            .expect("a loaded executor heartbeats");
    }
    assert_eq!(
        registry.count(Some(Status::Running)),
        survivors.len() as u64
    );
    still(registry.settled()).await;
    assert_eq!(ids(&registry.schedulable(&[])), survivors);

    // The silent ones: not a millisecond before start + init TTL...
    sleep_until(started + init_ttl - MS).await;
    assert_eq!(registry.count(None), N as u64);
    assert_eq!(stored_ids(&store).len(), N);

    // ...then all of them in one pass, on time.
    let mut expired = Vec::new();
    for _ in 0..silent.len() {
        let event = next_event(&mut watch).await;
        assert_eq!(event.kind, EventKind::Offline(OfflineReason::Expired));
        expired.push(id(&event.entry).to_owned());
    }
    let lag = Instant::now() - (started + init_ttl);
    assert!(
        lag <= MS * MAX_LAG_MS as u32,
        "expired {lag:?} after start + init TTL"
    );
    expired.sort();
    assert_eq!(expired, silent);
    assert_eq!(
        ids(registry.list(None, &[]).0.iter().map(|(e, _)| e)),
        survivors
    );
    // Their deletes were committed.
    assert_eq!(stored_ids(&store), survivors);

    // The survivors carry on, well past the grace, with no more changes.
    for _ in 0..9 {
        sleep(Duration::from_secs(20)).await;
        for id in &survivors {
            registry.heartbeat(id, ttl(60_000)).expect("still alive");
        }
    }
    assert_eq!(
        registry.count(Some(Status::Running)),
        survivors.len() as u64
    );
    assert!(
        tokio::time::timeout(SECOND, watch.next()).await.is_err(),
        "no membership change after the grace"
    );

    // A restart finds exactly the survivors, INITING again.
    task.stop().await;
    let (again, _task) = start_on(config, &store);
    assert_eq!(
        ids(again
            .list(Some(Status::Initing), &[])
            .0
            .iter()
            .map(|(e, _)| e)),
        survivors
    );
    assert_eq!(again.count(None), survivors.len() as u64);
}

#[tokio::test(start_paused = true)]
async fn new_ids_skip_stored_tombstoned_and_reserved_ones() {
    use super::membership::FORCED_ID_SUFFIXES;
    let row = |suffix: u64| StoredExecutor {
        id: format!("worker-{suffix:016x}"),
        name: "worker".into(),
        address: "10.0.2.1:9000".into(),
        labels: vec![("stored".into(), "yes".into())],
        registered_unix_ms: 1,
        owner: None,
        ttl: None,
    };
    let store = store_holding([row(0xa), row(0xb)]);
    let config = RegistryConfig {
        init_ttl: Duration::from_secs(20),
        ..RegistryConfig::default()
    };
    let (registry, _task) = start_on(config, &store);
    // 0xa stays (heartbeats), 0xb expires: a tombstone.
    registry
        .heartbeat(&row(0xa).id, ttl(600_000))
        .expect("loaded");
    sleep(Duration::from_secs(21)).await;
    assert_eq!(
        registry.heartbeat(&row(0xb).id, ttl(0)),
        Err(RegistryError::Tombstone(row(0xb).id))
    );

    // The next candidates: a stored live id, a tombstone, then 0xc twice
    // for two registrations of one batch, then 0xd.
    FORCED_ID_SUFFIXES.with_borrow_mut(|q| q.extend([0xa, 0xb, 0xc, 0xc, 0xd]));
    let mut new = ids(&register_many(&registry, "worker", 2).await);
    new.sort();
    assert!(FORCED_ID_SUFFIXES.with_borrow(|q| q.is_empty()));
    assert_eq!(new, [row(0xc).id, row(0xd).id]);

    // The stored row was not overwritten.
    let rows = store.clone().load_all().expect("loads");
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0], row(0xa));
    assert_eq!(
        registry
            .get(&row(0xa).id)
            .expect("live")
            .labels()
            .get("stored"),
        Some("yes")
    );
}

#[tokio::test(start_paused = true)]
async fn only_the_owner_heartbeats_or_deregisters_and_an_admin_may_deregister() {
    let store = MemoryStore::new();
    let (registry, task) = start_on(RegistryConfig::default(), &store);
    let owned = |owner: &str| Registration {
        owner: Some(owner.into()),
        ..registration("w", "10.0.0.1:9000")
    };
    let a = still(registry.register(owned("exec-a"))).await.expect("a");
    let b = still(registry.register(owned("exec-b"))).await.expect("b");
    assert_eq!(a.owner(), Some("exec-a"));
    let (a_id, b_id) = (a.id().as_str(), b.id().as_str());
    let caller_a = Caller::identity("exec-a");

    assert!(registry.heartbeat_as(a_id, ttl(0), &caller_a).is_ok());
    let denied = RegistryError::PermissionDenied(b_id.to_owned());
    assert_eq!(
        registry.heartbeat_as(b_id, ttl(0), &caller_a),
        Err(denied.clone())
    );
    assert_eq!(registry.deregister_as(b_id, &caller_a).await, Err(denied));
    assert_eq!(
        b.status(),
        Status::Initing,
        "the refused heartbeat changed nothing"
    );
    // The message never names the owner.
    assert!(
        !RegistryError::not_owner(b_id)
            .to_string()
            .contains("exec-b")
    );

    // Unknown ids stay NOT_FOUND whoever asks (no ownership oracle).
    assert_eq!(
        registry.heartbeat_as("nobody-0000000000000000", ttl(0), &caller_a),
        Err(RegistryError::NotFound("nobody-0000000000000000".into()))
    );
    still(registry.deregister_as(b_id, &Caller::admin("ops")))
        .await
        .expect("an admin deregisters b");
    still(registry.deregister_as(a_id, &caller_a))
        .await
        .expect("a deregisters itself");

    // The owner survives a restart.
    let c = still(registry.register(owned("exec-c"))).await.expect("c");
    let c_id = c.id().as_str().to_owned();
    task.stop().await;
    let (again, _task) = start_on(RegistryConfig::default(), &store);
    assert_eq!(again.get(&c_id).expect("reloaded").owner(), Some("exec-c"));
    assert!(again.heartbeat_as(&c_id, ttl(0), &caller_a).is_err());
    assert!(
        again
            .heartbeat_as(&c_id, ttl(0), &Caller::identity("exec-c"))
            .is_ok()
    );
}

#[tokio::test(start_paused = true)]
async fn an_empty_or_oversized_owner_is_refused_naming_owner() {
    let (registry, _task, _) = start(RegistryConfig::default());
    for owner in [String::new(), "x".repeat(MAX_OWNER_LEN + 1)] {
        let refused = registry
            .register(Registration {
                owner: Some(owner),
                ..registration("w", "10.0.0.1:9000")
            })
            .await;
        assert_invalid(refused, "owner");
    }
}

#[tokio::test(start_paused = true)]
async fn without_the_authority_to_decide_nothing_expires_and_with_it_all_due_go_in_one_pass() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let leading = Arc::new(AtomicBool::new(true));
    let recorder = Arc::new(Recorder::default());
    let authority: Authority = {
        let leading = leading.clone();
        Arc::new(move || leading.load(Ordering::SeqCst))
    };
    let (registry, _task) = Registry::start_with(
        RegistryConfig::default(),
        Box::new(MemoryStore::new()),
        recorder.clone(),
        StartOptions {
            takeover_grace: None,
            authority: Some(authority),
        },
    )
    .expect("the in-memory store loads");
    let entries = register_many(&registry, "worker", 100).await;
    for entry in &entries {
        registry.heartbeat(id(entry), ttl(1_000)).expect("live");
    }
    let deadline = entries[0].state().deadline_ms();

    // The lease is lost: deadlines pass, nobody is expired, not even in memory.
    leading.store(false, Ordering::SeqCst);
    sleep_until(at(&registry, deadline) + Duration::from_secs(5)).await;
    assert_eq!(registry.count(None), 100);
    assert!(recorder.passes().is_empty());
    assert!(entries.iter().all(|e| e.status() == Status::Running));

    // Authority back: every due executor goes, in one pass.
    leading.store(true, Ordering::SeqCst);
    sleep(Duration::from_millis(300)).await;
    assert_eq!(registry.count(None), 0);
    assert_eq!(recorder.passes().len(), 1, "one pass");
    assert_eq!(recorder.passes()[0].len(), 100);
}

/// A burst of departures leaves one timing-wheel entry per departed executor
/// until its deadline, and a tombstone per id until the retention ends. The
/// housekeeping compaction rebuilds the wheel from the live members long
/// before those deadlines; the survivors keep theirs (none early, none late)
/// and the departed stay tombstones for the retention, then are forgotten.
#[tokio::test(start_paused = true)]
async fn a_burst_of_departures_gives_the_timing_wheel_back_and_survivors_keep_their_deadlines() {
    const N: usize = 20_000;
    const STAYING: usize = 1_000;
    let retention = Duration::from_secs(15);
    let config = RegistryConfig {
        tombstone_retention: retention,
        ..RegistryConfig::default()
    };
    let init_ttl = config.init_ttl;
    let (registry, _task, recorder) = start(config);
    let entries = register_many(&registry, "worker", N).await;
    let (leaving, staying) = entries.split_at(N - STAYING);
    // Survivors: half heartbeat with a TTL longer than the init TTL, half
    // stay INITING (their queued deadline is the init one).
    for entry in &staying[..STAYING / 2] {
        registry.heartbeat(id(entry), ttl(40_000)).expect("live");
    }
    still(async {
        for entry in leaving {
            registry.deregister(id(entry)).await.expect("live");
        }
    })
    .await;
    sleep(SECOND).await;
    assert_eq!(recorder.tables(), ((N - STAYING) as u64, N as u64));

    // Compaction runs within every 100 housekeeping ticks (10 s), well
    // before the departed entries' deadlines (the init TTL, 20 s).
    sleep(Duration::from_secs(11)).await;
    assert!(registry.clock().now_ms() < init_ttl.as_millis() as u64);
    assert_eq!(recorder.tables(), ((N - STAYING) as u64, STAYING as u64));
    assert!(matches!(
        registry.heartbeat(id(&leaving[0]), ttl(0)),
        Err(RegistryError::Tombstone(_))
    ));

    // The INITING half expires at the init TTL, the others 40 s after their
    // heartbeat: each in one pass, on time.
    let initing_deadline = staying[STAYING - 1].state().deadline_ms();
    let running_deadline = staying[0].state().deadline_ms();
    sleep_until(at(&registry, initing_deadline) - MS).await;
    assert_eq!(registry.count(None), STAYING as u64);
    sleep_until(at(&registry, running_deadline) - MS).await;
    assert_eq!(registry.count(None), (STAYING / 2) as u64);
    sleep(MS * (MAX_LAG_MS as u32 + 1)).await;
    assert_eq!(registry.count(None), 0);
    let sizes: Vec<usize> = recorder.passes().iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![STAYING / 2, STAYING / 2]);
    assert!(
        recorder
            .passes()
            .iter()
            .flatten()
            .all(|lag| *lag <= Duration::from_millis(MAX_LAG_MS))
    );
    // Past the retention every tombstone is forgotten: "not found".
    sleep(retention).await;
    assert_eq!(recorder.tables(), (0, 0));
    assert!(matches!(
        registry.heartbeat(id(&leaving[0]), ttl(0)),
        Err(RegistryError::NotFound(_))
    ));
}
