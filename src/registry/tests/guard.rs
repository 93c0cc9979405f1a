//! The mass-expiry guard in the running core, on tokio's paused clock: it
//! holds a mass expiry whole, heartbeats revive what it holds, it lets go
//! (recovery, operator, max hold) in one pass, it follows the fleet as it is
//! now, and off (the default) nothing changes.

use std::collections::HashSet;
use std::sync::Mutex;

use tokio::task::JoinHandle;

use super::*;

/// TTL every executor heartbeats with in these tests.
const TTL_MS: u64 = 1_000;
/// Heartbeat period of the executors that keep beating.
const BEAT: Duration = Duration::from_millis(300);
/// The housekeeping tick on which held executors are reviewed.
const TICK: Duration = super::super::membership::TICK;

/// An observer of expiry passes, releases and the guard's gauge.
#[derive(Default)]
struct Seen {
    /// Size of every expiry pass (executors expired on their deadline).
    passes: Mutex<Vec<usize>>,
    /// Every release of held executors: how many expired.
    released: Mutex<Vec<u64>>,
    /// Every change the guard reported: (active, held).
    guard: Mutex<Vec<(bool, u64)>>,
}

impl Seen {
    fn passes(&self) -> Vec<usize> {
        self.passes.lock().expect("lock").clone()
    }

    fn released(&self) -> Vec<u64> {
        self.released.lock().expect("lock").clone()
    }

    /// Times the guard started holding.
    fn trips(&self) -> usize {
        let changes = self.guard.lock().expect("lock");
        let mut active = false;
        let mut trips = 0;
        for &(now, _) in changes.iter() {
            if now && !active {
                trips += 1;
            }
            active = now;
        }
        trips
    }

    /// What `registry_expiry_guard_active` shows: the last reported state.
    fn gauge(&self) -> bool {
        self.guard
            .lock()
            .expect("lock")
            .last()
            .is_some_and(|&(active, _)| active)
    }
}

impl Observer for Seen {
    fn expired(&self, lags: &[Duration]) {
        self.passes.lock().expect("lock").push(lags.len());
    }

    fn released(&self, count: u64) {
        self.released.lock().expect("lock").push(count);
    }

    fn expiry_guard(&self, active: bool, held: u64) {
        self.guard.lock().expect("lock").push((active, held));
    }
}

fn guarded(fraction: f64, max_hold: Duration) -> RegistryConfig {
    RegistryConfig {
        expiry_guard: Some(ExpiryGuardConfig { fraction, max_hold }),
        ..RegistryConfig::default()
    }
}

fn start_seen(config: RegistryConfig) -> (Registry, RegistryTask, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let (registry, task) = Registry::start(config, Box::new(MemoryStore::new()), seen.clone())
        .expect("the in-memory store loads");
    (registry, task, seen)
}

/// `n` RUNNING executors whose deadlines are all the same millisecond (and
/// whose RUNNING events are published).
async fn fleet(registry: &Registry, n: usize) -> Vec<Arc<Entry>> {
    let entries = register_many(registry, "w", n).await;
    for entry in &entries {
        registry.heartbeat(id(entry), ttl(TTL_MS)).expect("live");
    }
    still(registry.settled()).await;
    entries
}

/// 1,000 RUNNING executors with one deadline: 400 to keep beating and 600
/// silent from now on, and that deadline.
async fn sixty_percent_silent(registry: &Registry) -> (Vec<Arc<Entry>>, Vec<Arc<Entry>>, u64) {
    let mut alive = fleet(registry, 1_000).await;
    let deadline = alive[0].state().deadline_ms();
    let silent = alive.split_off(400);
    (alive, silent, deadline)
}

/// The ids a [`Beater`] keeps alive.
type Beating = Arc<Mutex<HashSet<String>>>;

/// Heartbeats every id in its set every [`BEAT`] until dropped; the set can
/// change meanwhile (an id taken out stops beating: it dies).
struct Beater {
    ids: Beating,
    task: JoinHandle<()>,
}

impl Beater {
    fn start(registry: &Registry, entries: &[Arc<Entry>]) -> Self {
        let ids: Beating = Arc::new(Mutex::new(ids(entries).into_iter().collect()));
        let task = tokio::spawn({
            let (registry, ids) = (registry.clone(), ids.clone());
            async move {
                loop {
                    let now: Vec<String> = ids.lock().expect("lock").iter().cloned().collect();
                    for id in now {
                        registry
                            .heartbeat(&id, ttl(TTL_MS))
                            .expect("a beating executor stays live");
                    }
                    sleep(BEAT).await;
                }
            }
        });
        Self { ids, task }
    }

    fn stop(&self, entries: &[Arc<Entry>]) {
        let mut ids = self.ids.lock().expect("lock");
        for entry in entries {
            ids.remove(id(entry));
        }
    }

    fn add(&self, entries: &[Arc<Entry>]) {
        self.ids.lock().expect("lock").extend(ids(entries));
    }
}

impl Drop for Beater {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `n` events from `watch`, checked to be consecutive OFFLINE expirations
/// from `after + 1`; their ids.
async fn offline_run(watch: &mut Watch, after: u64, n: usize) -> HashSet<String> {
    let mut seen = HashSet::new();
    for i in 0..n as u64 {
        let event = next_event(watch).await;
        assert_eq!(event.revision, after + 1 + i, "consecutive revisions");
        assert_eq!(event.kind, EventKind::Offline(OfflineReason::Expired));
        seen.insert(id(&event.entry).to_owned());
    }
    seen
}

#[tokio::test(start_paused = true)]
async fn sixty_percent_expiring_at_once_is_held_whole_and_heartbeats_revive_it_with_nobody_removed()
{
    let (registry, _task, seen) = start_seen(guarded(0.5, Duration::from_secs(600)));
    let (alive, silent, deadline) = sixty_percent_silent(&registry).await;
    let (alive, silent) = (&alive[..], &silent[..]);
    let beater = Beater::start(&registry, alive);
    let revision = registry.snapshot().revision();
    let status = registry.expiry_guard();
    assert!(status.enabled && !status.active && status.held == 0);

    // 600 of 1,000 pass their deadline in the same millisecond: held.
    sleep_until(at(&registry, deadline) + 2 * TICK).await;
    assert_eq!(registry.count(None), 1_000, "nobody removed");
    assert_eq!(registry.snapshot().revision(), revision, "no event");
    assert!(silent.iter().all(|e| e.status() == Status::Running));
    assert_eq!(
        registry.schedulable(&[]).len(),
        1_000,
        "held ones stay as they are"
    );
    assert!(seen.passes().is_empty(), "no expiry pass");
    assert!(seen.gauge(), "registry_expiry_guard_active is 1");
    let status = registry.expiry_guard();
    assert!(status.active);
    assert_eq!(status.held, 600);
    assert_eq!(status.recently_expired, 0);
    let since = status.since_unix_ms.expect("an episode start");
    let tripped = since - registry.clock().unix_ms(deadline);
    assert!(
        tripped <= MAX_LAG_MS,
        "tripped {tripped} ms after the deadline"
    );

    // It stays so while they are silent.
    sleep(Duration::from_secs(20)).await;
    assert_eq!(registry.count(None), 1_000);
    assert!(registry.expiry_guard().active);

    // Heartbeats come back: each is OK, and the next review lets go.
    for entry in silent {
        registry
            .heartbeat(id(entry), ttl(TTL_MS))
            .expect("a held executor's heartbeat is OK");
    }
    beater.add(silent);
    sleep(2 * TICK).await;
    let status = registry.expiry_guard();
    assert!(!status.active, "released");
    assert_eq!(status.held, 0);
    assert!(!seen.gauge(), "registry_expiry_guard_active is 0");
    assert_eq!(seen.trips(), 1);
    assert_eq!(registry.count(None), 1_000, "nobody removed");
    assert_eq!(registry.snapshot().revision(), revision, "no event at all");
    assert!(seen.released().is_empty());

    // They are back on the timing wheel: one that dies now expires on its
    // deadline like any other (1 of 1,000 is no mass expiry).
    let mut watch = registry.watch();
    beater.stop(&silent[..1]);
    let event = next_event(&mut watch).await;
    assert_eq!(id(&event.entry), id(&silent[0]));
    assert_eq!(event.kind, EventKind::Offline(OfflineReason::Expired));
    let lag = registry.clock().now_ms() - silent[0].state().deadline_ms();
    assert!(lag <= MAX_LAG_MS, "expired {lag} ms late");
    assert_eq!(seen.passes(), [1]);
    assert_eq!(seen.trips(), 1);
}

#[tokio::test(start_paused = true)]
async fn when_heartbeats_recover_partly_the_still_silent_expire_in_one_pass_a_ttl_later() {
    let (registry, _task, seen) = start_seen(guarded(0.5, Duration::from_secs(600)));
    let (alive, silent, deadline) = sixty_percent_silent(&registry).await;
    let (alive, silent) = (&alive[..], &silent[..]);
    let beater = Beater::start(&registry, alive);
    let mut watch = registry.watch();
    let revision = watch.snapshot().unwrap().revision();
    sleep_until(at(&registry, deadline) + 2 * TICK).await;
    assert_eq!(registry.expiry_guard().held, 600);

    // 400 of the 600 come back; 200 stay silent: 20% of the fleet, within
    // the fraction. Each had a TTL to be heard: they go one TTL later.
    let (back, dead) = silent.split_at(400);
    beater.add(back);
    sleep(BEAT).await;
    let calm_from = registry.clock().now_ms();
    let expired = offline_run(&mut watch, revision, 200).await;
    let released_at = registry.clock().now_ms();
    assert_eq!(expired, ids(dead).into_iter().collect());
    assert!(
        released_at >= calm_from + TTL_MS - BEAT.as_millis() as u64
            && released_at <= calm_from + TTL_MS + 2 * TICK.as_millis() as u64,
        "released {} ms after the recovery",
        released_at - calm_from
    );
    assert_eq!(registry.count(None), 800);
    assert_eq!(registry.snapshot().revision(), revision + 200);
    assert!(back.iter().all(|e| e.status() == Status::Running));
    assert_eq!(seen.released(), [200], "one pass");
    assert!(seen.passes().is_empty(), "no lag recorded for a hold");
    assert!(!registry.expiry_guard().active);
    assert!(!seen.gauge());
    assert_eq!(
        registry.heartbeat(id(&dead[0]), ttl(TTL_MS)),
        Err(RegistryError::Tombstone(id(&dead[0]).to_owned()))
    );
}

#[tokio::test(start_paused = true)]
async fn an_operator_release_expires_everything_held_in_one_pass_with_consecutive_revisions() {
    let (registry, _task, seen) = start_seen(guarded(0.5, Duration::from_secs(600)));
    let (alive, silent, deadline) = sixty_percent_silent(&registry).await;
    let (alive, silent) = (&alive[..], &silent[..]);
    let beater = Beater::start(&registry, alive);
    sleep_until(at(&registry, deadline) + 2 * TICK).await;
    assert_eq!(registry.expiry_guard().held, 600);

    // A held executor that leaves gracefully is gone at once.
    let mut watch = registry.watch();
    let (leaving, silent) = silent.split_at(10);
    for entry in leaving {
        registry.deregister(id(entry)).await.expect("live");
        let event = next_event(&mut watch).await;
        assert_eq!(event.kind, EventKind::Offline(OfflineReason::Deregistered));
    }
    let revision = registry.snapshot().revision();

    let released = registry.release_expiry_guard().await.expect("guard on");
    assert_eq!(released, 590);
    // Answered once published: the state already shows it.
    assert_eq!(registry.count(None), 400);
    assert_eq!(registry.snapshot().revision(), revision + 590);
    assert!(!registry.expiry_guard().active);
    assert!(!seen.gauge());
    let expired = offline_run(&mut watch, revision, 590).await;
    assert_eq!(expired, ids(silent).into_iter().collect());
    assert_eq!(seen.released(), [590]);
    assert!(seen.passes().is_empty());
    assert!(silent.iter().all(|e| e.status() == Status::Tombstone));

    // Holding nothing, a release expires nothing.
    assert_eq!(registry.release_expiry_guard().await, Ok(0));

    // The guard starts afresh from the fleet after the release: a quarter
    // of the 400 dying at once goes through, on time.
    let (dying, staying) = alive.split_at(100);
    beater.stop(dying);
    let last = dying
        .iter()
        .map(|e| e.state().deadline_ms())
        .max()
        .expect("some");
    sleep_until(at(&registry, last) + 2 * TICK).await;
    assert_eq!(registry.count(None), 300);
    assert_eq!(seen.passes().iter().sum::<usize>(), 100);
    assert_eq!(seen.trips(), 1);
    assert!(staying.iter().all(|e| e.status() == Status::Running));
}

#[tokio::test(start_paused = true)]
async fn after_the_max_hold_everything_held_expires_in_one_pass_and_the_guard_works_on() {
    let max_hold = Duration::from_secs(30);
    let (registry, _task, seen) = start_seen(guarded(0.5, max_hold));
    let (alive, silent, deadline) = sixty_percent_silent(&registry).await;
    let (alive, silent) = (&alive[..], &silent[..]);
    let beater = Beater::start(&registry, alive);
    let mut watch = registry.watch();
    let revision = watch.snapshot().unwrap().revision();

    // A legitimate loss that looks like a partition: 60% killed at once.
    sleep_until(at(&registry, deadline + duration_ms(max_hold)) - TICK).await;
    assert_eq!(registry.count(None), 1_000, "held until the max hold");
    assert!(seen.gauge());
    let expired = offline_run(&mut watch, revision, 600).await;
    let now = registry.clock().now_ms();
    assert!(
        now >= deadline + duration_ms(max_hold)
            && now <= deadline + duration_ms(max_hold) + TICK.as_millis() as u64,
        "released {} ms after the deadline",
        now - deadline
    );
    assert_eq!(expired, ids(silent).into_iter().collect());
    assert_eq!(seen.released(), [600], "one pass");
    assert!(!seen.gauge());
    assert!(!registry.expiry_guard().active);

    // Not stuck: it judges the fleet of 400 now. 40% of it dying over
    // two TTLs (20% each) goes through on time...
    let (first, rest) = alive.split_at(80);
    let (second, rest) = rest.split_at(80);
    for wave in [first, second] {
        beater.stop(wave);
        sleep(Duration::from_secs(2)).await;
    }
    assert_eq!(registry.count(None), 240);
    assert_eq!(seen.passes().iter().sum::<usize>(), 160);
    assert_eq!(seen.trips(), 1);
    // ...while more than half of it at once is held again.
    let (dying, _) = rest.split_at(130);
    beater.stop(dying);
    sleep(Duration::from_secs(2)).await;
    assert_eq!(registry.count(None), 240);
    assert_eq!(registry.expiry_guard().held, 130);
    assert_eq!(seen.trips(), 2);
}

/// `n` executors heartbeating for a while, then `leaving` of them
/// deregistered: the beater and those that stay (still beating).
async fn shrunk_by_deregistration(
    registry: &Registry,
    n: usize,
    leaving: usize,
) -> (Beater, Vec<Arc<Entry>>) {
    let entries = fleet(registry, n).await;
    let beater = Beater::start(registry, &entries);
    sleep(Duration::from_secs(2)).await;
    let (leaving, staying) = entries.split_at(leaving);
    beater.stop(leaving);
    for entry in leaving {
        registry.deregister(id(entry)).await.expect("live");
    }
    (beater, staying.to_vec())
}

#[tokio::test(start_paused = true)]
async fn a_scale_down_by_deregistration_and_gradual_expiry_never_trips_the_guard() {
    let (registry, _task, seen) = start_seen(guarded(0.5, Duration::from_secs(600)));
    // 60% leave gracefully at once: no expiry at all.
    let (beater, staying) = shrunk_by_deregistration(&registry, 1_000, 600).await;
    assert_eq!(registry.count(None), 400);

    // Then the rest shrinks by killing, a fifth of the fleet per TTL and a
    // half, down to 100: on time, every one, and the guard never holds.
    let mut rest = &staying[..];
    let mut expired = 0;
    while rest.len() > 100 {
        let (dying, left) = rest.split_at(rest.len() / 5);
        beater.stop(dying);
        sleep(Duration::from_millis(1_500)).await;
        assert!(dying.iter().all(|e| e.status() == Status::Tombstone));
        expired += dying.len();
        rest = left;
    }
    assert_eq!(registry.count(None), rest.len() as u64);
    assert_eq!(seen.passes().iter().sum::<usize>(), expired);
    assert_eq!(seen.trips(), 0, "never tripped");
    assert!(!registry.expiry_guard().active);
    assert!(seen.released().is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_threshold_is_a_fraction_of_the_fleet_as_it_is_now() {
    let (registry, _task, seen) = start_seen(guarded(0.5, Duration::from_secs(600)));
    let (beater, staying) = shrunk_by_deregistration(&registry, 1_000, 800).await;
    // 110 dying at once: 11% of the fleet it was, 55% of the fleet it is.
    let (dying, _) = staying.split_at(110);
    beater.stop(dying);
    sleep(Duration::from_secs(2)).await;
    assert_eq!(registry.count(None), 200, "held");
    assert_eq!(registry.expiry_guard().held, 110);
    assert_eq!(seen.trips(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_guard_is_off_by_default_and_a_mass_expiry_goes_in_one_pass() {
    let (registry, _task, seen) = start_seen(RegistryConfig::default());
    let (alive, silent, deadline) = sixty_percent_silent(&registry).await;
    let (alive, silent) = (&alive[..], &silent[..]);
    let _beater = Beater::start(&registry, alive);
    let mut watch = registry.watch();
    let revision = watch.snapshot().unwrap().revision();
    sleep_until(at(&registry, deadline)).await;
    let expired = offline_run(&mut watch, revision, 600).await;
    assert!(registry.clock().now_ms() - deadline <= MAX_LAG_MS);
    assert_eq!(expired, ids(silent).into_iter().collect());
    assert_eq!(registry.count(None), 400);
    assert_eq!(seen.passes(), [600]);
    assert_eq!(registry.expiry_guard(), ExpiryGuardStatus::OFF);
    assert!(seen.guard.lock().expect("lock").is_empty());
    assert_eq!(
        registry.release_expiry_guard().await,
        Err(RegistryError::ExpiryGuardOff)
    );
}

#[tokio::test(start_paused = true)]
async fn after_a_restart_a_fleet_that_does_not_come_back_trips_the_guard_again() {
    // The rows of 100 executors, as a registry holding 60 of them left it.
    let store = store_holding((0..100).map(stored));
    let config = guarded(0.5, Duration::from_secs(600));
    let init_ttl = config.init_ttl;
    let (registry, _task) = start_on(config, &store);
    assert_eq!(registry.count(None), 100);
    let stored_ids: Vec<String> = (0..100).map(|i| stored(i).id).collect();
    // 40 come back; 60 stay silent until their init TTL runs out together.
    for id in &stored_ids[..40] {
        registry.heartbeat(id, ttl(60_000)).expect("loaded INITING");
    }
    sleep(init_ttl + 2 * TICK).await;
    assert_eq!(registry.count(None), 100, "held, not expired");
    let status = registry.expiry_guard();
    assert!(status.active);
    assert_eq!(status.held, 60);
    assert_eq!(registry.count(Some(Status::Initing)), 60);
    // A late one is still welcome.
    registry
        .heartbeat(&stored_ids[40], ttl(60_000))
        .expect("a held executor's heartbeat is OK");
}

/// Releases are expiries too: a replica whose leadership is not confirmed
/// releases nothing it holds — not at the max hold, not for an operator —
/// until it is again.
#[tokio::test(start_paused = true)]
async fn without_the_authority_held_executors_are_not_released_by_the_max_hold_nor_by_an_operator()
{
    use std::sync::atomic::{AtomicBool, Ordering};
    let max_hold = Duration::from_secs(30);
    let leading = Arc::new(AtomicBool::new(true));
    let authority: Authority = {
        let leading = leading.clone();
        Arc::new(move || leading.load(Ordering::SeqCst))
    };
    let seen = Arc::new(Seen::default());
    let (registry, _task) = Registry::start_with(
        guarded(0.5, max_hold),
        Box::new(MemoryStore::new()),
        seen.clone(),
        StartOptions {
            takeover_grace: None,
            authority: Some(authority),
        },
    )
    .expect("the in-memory store loads");
    let (alive, _silent, deadline) = sixty_percent_silent(&registry).await;
    let _beater = Beater::start(&registry, &alive);
    sleep_until(at(&registry, deadline) + 2 * TICK).await;
    assert!(registry.expiry_guard().active, "held");
    assert_eq!(registry.count(None), 1_000);

    // The lease is lost: past the max hold, nothing is released...
    leading.store(false, Ordering::SeqCst);
    sleep_until(at(&registry, deadline + duration_ms(max_hold)) + 5 * TICK).await;
    assert_eq!(
        registry.count(None),
        1_000,
        "released without the authority"
    );
    assert!(seen.released().is_empty());
    // ...nor by an operator, who is told why.
    match registry.release_expiry_guard().await {
        Err(RegistryError::Unavailable(why)) => assert!(why.contains("not confirmed"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(registry.count(None), 1_000);

    // Back: the max hold has passed, so what it holds expires, in one pass.
    leading.store(true, Ordering::SeqCst);
    sleep(2 * TICK).await;
    assert_eq!(registry.count(None), 400);
    assert_eq!(seen.released(), [600]);
}
