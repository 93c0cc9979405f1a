//! Pause compensation against the real binary: the registry process itself
//! is stopped (SIGSTOP) for twice the TTL while 1,000 executors heartbeat.
//! After SIGCONT, none of those that kept heartbeating may go OFFLINE; those
//! that really died meanwhile must still expire.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "tests on real time wait and measure on the real clock"
)]

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use executor_registry::proto::watch_executors_response::Kind;
use executor_registry::proto::{
    EventType, HeartbeatBatchRequest, HeartbeatRequest, HeartbeatStatus, OfflineReason,
    RegisterRequest, WatchExecutorsRequest,
};
use support::process::RegistryProcess;

const FLEET: usize = 1_000;
const TTL: Duration = Duration::from_millis(1_000);
const BEAT_EVERY: Duration = Duration::from_millis(250);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_for_twice_the_ttl_expires_no_heartbeating_executor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = RegistryProcess::start(
        dir.path(),
        &[
            "--store",
            "memory",
            "--min-heartbeat-ttl",
            "100ms",
            "--heartbeat-interval",
            "200ms",
        ],
    );
    let mut client = registry.client().await;

    // Register the fleet, 50 at a time.
    let mut ids = Vec::with_capacity(FLEET);
    for chunk in 0..FLEET / 50 {
        let mut calls = Vec::new();
        for i in 0..50 {
            let mut c = client.clone();
            calls.push(tokio::spawn(async move {
                let request = RegisterRequest {
                    name: "paused".into(),
                    address: format!("127.0.0.1:{}", 1 + chunk * 50 + i),
                    labels: Default::default(),
                };
                c.register(request)
                    .await
                    .expect("register")
                    .into_inner()
                    .executor
                    .expect("executor")
                    .id
            }));
        }
        for call in calls {
            ids.push(call.await.expect("join"));
        }
    }

    // Watch: record when each executor went OFFLINE.
    let offline: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut watch = client
        .watch_executors(WatchExecutorsRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let watcher = tokio::spawn({
        let offline = offline.clone();
        async move {
            while let Ok(Some(message)) = watch.message().await {
                if let Some(Kind::Event(e)) = message.kind
                    && e.r#type == EventType::Offline as i32
                {
                    assert_eq!(e.reason, OfflineReason::Expired as i32);
                    offline
                        .lock()
                        .expect("lock")
                        .insert(e.executor_id, Instant::now());
                }
            }
        }
    });

    // Everyone heartbeats; the first 50 die before the pause, the next 50
    // during it; the other 900 go on throughout.
    let died_before: HashSet<String> = ids[..50].iter().cloned().collect();
    let died_during: HashSet<String> = ids[50..100].iter().cloned().collect();
    let alive: HashSet<String> = ids[100..].iter().cloned().collect();
    let beating: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(ids.clone()));
    let beats = tokio::spawn({
        let beating = beating.clone();
        let mut c = client.clone();
        async move {
            let stop_at = Instant::now() + Duration::from_secs(30);
            while Instant::now() < stop_at {
                let batch: Vec<_> = beating.lock().expect("lock").clone();
                if batch.is_empty() {
                    return;
                }
                let heartbeats = batch
                    .iter()
                    .map(|id| HeartbeatRequest {
                        executor_id: id.clone(),
                        ttl_ms: TTL.as_millis() as u64,
                    })
                    .collect();
                let results = c
                    .heartbeat_batch(HeartbeatBatchRequest { heartbeats })
                    .await
                    .expect("heartbeat batch")
                    .into_inner()
                    .results;
                for r in results {
                    assert_eq!(
                        r.status,
                        HeartbeatStatus::Ok as i32,
                        "{} was expired",
                        r.executor_id
                    );
                }
                tokio::time::sleep(BEAT_EVERY).await;
            }
        }
    });

    tokio::time::sleep(Duration::from_millis(1_500)).await;
    beating
        .lock()
        .expect("lock")
        .retain(|id| !died_before.contains(id));
    tokio::time::sleep(Duration::from_millis(200)).await;

    registry.signal("-STOP");
    beating
        .lock()
        .expect("lock")
        .retain(|id| !died_during.contains(id));
    tokio::time::sleep(TTL * 2).await;
    registry.signal("-CONT");
    let resumed = Instant::now();

    // Heartbeats go on for a while after the resume.
    tokio::time::sleep(Duration::from_secs(4)).await;
    beating.lock().expect("lock").clear();
    beats
        .await
        .expect("no heartbeat of a live executor was refused");

    let offline = offline.lock().expect("lock").clone();
    let falsely_expired: Vec<_> = alive
        .iter()
        .filter(|id| offline.contains_key(*id))
        .collect();
    assert!(
        falsely_expired.is_empty(),
        "{} heartbeating executors went OFFLINE",
        falsely_expired.len()
    );
    for id in died_before.iter().chain(&died_during) {
        let at = offline
            .get(id)
            .unwrap_or_else(|| panic!("{id} died but never went OFFLINE"));
        // Deadline + stall length, at least to the resume grace (1 s): well
        // within 3 s of the resume.
        assert!(
            *at <= resumed + Duration::from_secs(3),
            "{id} expired {:?} after the resume",
            at.duration_since(resumed)
        );
    }
    drop(registry);
    let _ = watcher.await;
}
