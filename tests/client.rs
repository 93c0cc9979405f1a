//! The client library against a real registry served over loopback:
//! `Membership` through restarts with and without the store, interval and
//! TTL handling, shutdown and drop; `FleetView` through heavy churn, forced
//! re-watches and restarts.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "tests on real time wait and measure on the real clock"
)]

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use executor_registry::client::{
    Backoff, ChannelOptions, ClientError, FleetChange, FleetView, FleetViewOptions, Membership,
    MembershipOptions, MembershipState, OfflineReason,
};
use executor_registry::proto::{
    self, DeregisterRequest, HeartbeatBatchRequest, HeartbeatRequest, ListExecutorsRequest,
};
use executor_registry::registry::MemoryStore;
use executor_registry::registry::{RegistryConfig, Status};
use support::{
    FlakyStore, SharedStore, TestServer, WatcherGauge, eventually, fast_config, register,
    register_request,
};
use tokio::sync::watch;
use tokio::time::Instant;

/// Options that retry fast, for tests.
fn options(endpoints: Vec<String>, name: &str) -> MembershipOptions {
    MembershipOptions {
        backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
        shutdown_timeout: Duration::from_secs(2),
        ..MembershipOptions::new(endpoints, name, "127.0.0.1:7000")
    }
    .label("zone", "a")
}

/// Every state published after the initial one.
fn record(mut rx: watch::Receiver<MembershipState>) -> Arc<Mutex<Vec<MembershipState>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let state = rx.borrow_and_update().clone();
            sink.lock().unwrap().push(state);
        }
    });
    seen
}

fn status(server: &TestServer, id: &str) -> Option<Status> {
    server.registry.get(id).ok().map(|e| e.status())
}

async fn wait_running(server: &TestServer, id: &str) {
    eventually(
        Duration::from_secs(10),
        &format!("{id} RUNNING"),
        || async { status(server, id) == Some(Status::Running) },
    )
    .await;
}

/// An address nothing listens on.
fn dead_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_membership_keeps_its_id_through_a_restart_with_the_store() {
    let store = SharedStore::default();
    let server = TestServer::start_with_store(fast_config(), Box::new(store.clone())).await;
    let addr = server.addr;
    let membership = Membership::join(options(vec![server.endpoint()], "worker"))
        .await
        .unwrap();
    let id = membership.id().unwrap();
    assert!(id.starts_with("worker-"), "{id}");
    assert_eq!(
        *membership.state().borrow(),
        MembershipState::Joined { id: id.clone() }
    );
    let states = record(membership.state());
    wait_running(&server, &id).await;
    let before = server.registry.get(&id).unwrap();
    assert_eq!(
        before.ttl(),
        Duration::from_millis(300),
        "3 × the suggested 100 ms"
    );

    server.stop().await;
    // Down for longer than the TTL the client asked for: only the store
    // carries the executor across.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server = TestServer::start_on(addr, fast_config(), Box::new(store.clone())).await;
    wait_running(&server, &id).await;

    // It keeps running on the new instance, under the same id, and the
    // application was never told anything changed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(status(&server, &id), Some(Status::Running));
    assert_eq!(membership.id().as_deref(), Some(id.as_str()));
    assert!(states.lock().unwrap().is_empty(), "{:?}", states.lock());
    assert_eq!(server.registry.count(None), 1, "no second registration");

    membership.shutdown().await.unwrap();
    assert!(server.registry.get(&id).is_err(), "deregistered");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_membership_that_the_registry_lost_is_told_and_rejoins_with_a_new_id() {
    let server = TestServer::start(fast_config()).await;
    let addr = server.addr;
    let membership = Membership::join(options(vec![server.endpoint()], "worker"))
        .await
        .unwrap();
    let old = membership.id().unwrap();
    let states = record(membership.state());
    wait_running(&server, &old).await;

    server.stop().await;
    // The new instance has an empty store, which also fails its first three
    // commits: the re-registration meets UNAVAILABLE and must retry.
    let server = TestServer::start_on(addr, fast_config(), Box::new(FlakyStore::new(3))).await;
    eventually(Duration::from_secs(10), "Rejoined", || async {
        matches!(
            *membership.state().borrow(),
            MembershipState::Rejoined { .. }
        )
    })
    .await;
    let new = membership.id().unwrap();
    assert_ne!(new, old);
    assert_eq!(
        *states.lock().unwrap(),
        vec![
            MembershipState::Lost,
            MembershipState::Rejoined { id: new.clone() }
        ]
    );
    wait_running(&server, &new).await;
    assert!(server.registry.get(&old).is_err());
    let entry = server.registry.get(&new).unwrap();
    assert_eq!(entry.labels().get("zone"), Some("a"), "same labels");
    assert_eq!(entry.address(), "127.0.0.1:7000");

    membership.shutdown().await.unwrap();
    assert_eq!(server.registry.count(None), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_moves_past_an_endpoint_that_is_down() {
    let server = TestServer::start(fast_config()).await;
    let membership = Membership::join(options(vec![dead_endpoint(), server.endpoint()], "w"))
        .await
        .unwrap();
    wait_running(&server, &membership.id().unwrap()).await;
    membership.shutdown().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_waits_for_a_registry_that_is_not_up_yet_and_can_give_up() {
    let endpoint = dead_endpoint();
    let addr = endpoint.trim_start_matches("http://").parse().unwrap();

    let started = Instant::now();
    let err = Membership::join(MembershipOptions {
        give_up_after: Some(Duration::from_millis(300)),
        ..options(vec![endpoint.clone()], "w")
    })
    .await
    .unwrap_err();
    assert!(
        matches!(&err, ClientError::Unreachable { last, .. } if last.contains("refused")),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    let joining = tokio::spawn(Membership::join(options(vec![endpoint], "late")));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!joining.is_finished());
    let server = TestServer::start_on(addr, fast_config(), Box::new(MemoryStore::new())).await;
    let membership = tokio::time::timeout(Duration::from_secs(5), joining)
        .await
        .expect("joined once the registry came up")
        .unwrap()
        .unwrap();
    wait_running(&server, &membership.id().unwrap()).await;
    membership.shutdown().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn join_returns_the_registrys_refusal_without_retrying() {
    let server = TestServer::start(fast_config()).await;
    let started = Instant::now();
    let err = Membership::join(MembershipOptions {
        address: "no-port".into(),
        ..options(vec![server.endpoint()], "w")
    })
    .await
    .unwrap_err();
    match &err {
        ClientError::Rejected(status) => {
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().contains("address"), "{err}");
        }
        other => panic!("expected Rejected, got {other}"),
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(server.registry.count(None), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ttl_is_three_suggested_intervals_and_follows_the_interval_both_ways() {
    // Suggested interval = max(100 ms, live ÷ 10/s): 30 live → 3 s.
    let config = RegistryConfig {
        max_heartbeats_per_second: 10,
        init_ttl: Duration::from_secs(60),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let membership = Membership::join(options(vec![server.endpoint()], "w"))
        .await
        .unwrap();
    let id = membership.id().unwrap();
    wait_running(&server, &id).await;
    let ttl = |server: &TestServer| server.registry.get(&id).unwrap().ttl().as_millis();
    assert_eq!(ttl(&server), 300);

    let mut c = server.client().await;
    let mut others = Vec::new();
    for i in 0..29 {
        others.push(register(&mut c, "other", 100 + i).await);
    }
    assert_eq!(server.registry.suggested_interval(), Duration::from_secs(3));
    eventually(Duration::from_secs(5), "TTL 9 s", || async {
        ttl(&server) == 9_000
    })
    .await;
    // Now it beats every 3 s ± 10%: no beat in the next 2 s.
    let last = server
        .registry
        .last_heartbeat_unix_ms(&server.registry.get(&id).unwrap());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        server
            .registry
            .last_heartbeat_unix_ms(&server.registry.get(&id).unwrap()),
        last,
        "heartbeats follow the longer interval"
    );

    for id in others {
        c.deregister(DeregisterRequest { executor_id: id })
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(5), "TTL back to 300 ms", || async {
        ttl(&server) == 300
    })
    .await;
    assert_eq!(status(&server, &id), Some(Status::Running));
    membership.shutdown().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_the_registry_refuses_falls_back_to_the_ttl_it_gave() {
    // 3 × 100 ms = 300 ms is above this registry's maximum of 250 ms.
    let config = RegistryConfig {
        max_ttl: Duration::from_millis(250),
        init_ttl: Duration::from_secs(2),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let membership = Membership::join(options(vec![server.endpoint()], "w"))
        .await
        .unwrap();
    let id = membership.id().unwrap();
    let states = record(membership.state());
    wait_running(&server, &id).await;
    assert_eq!(
        server.registry.get(&id).unwrap().ttl(),
        Duration::from_millis(2_000),
        "kept"
    );
    // Past the init TTL: the fallback heartbeats keep renewing it.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    assert_eq!(status(&server, &id), Some(Status::Running));
    assert!(states.lock().unwrap().is_empty());
    membership.shutdown().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_deregisters_and_drop_only_stops_heartbeating() {
    let server = TestServer::start(fast_config()).await;
    let mut c = server.client().await;
    let (_, mut events) = support::watch(&mut c).await;

    let leaving = Membership::join(options(vec![server.endpoint()], "leaving"))
        .await
        .unwrap();
    let id = leaving.id().unwrap();
    assert_eq!(support::next_event(&mut events).await.executor_id, id);
    leaving.shutdown().await.unwrap();
    let event = support::next_event(&mut events).await;
    assert_eq!(event.executor_id, id);
    assert_eq!(event.reason, proto::OfflineReason::Deregistered as i32);

    let dropped = Membership::join(options(vec![server.endpoint()], "dropped"))
        .await
        .unwrap();
    let id = dropped.id().unwrap();
    wait_running(&server, &id).await;
    drop(dropped);
    // The task is gone: the 300 ms lease runs out.
    let event = loop {
        let event = support::next_event(&mut events).await;
        if event.r#type == proto::EventType::Offline as i32 {
            break event;
        }
    };
    assert_eq!(event.executor_id, id);
    assert_eq!(event.reason, proto::OfflineReason::Expired as i32);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_the_registry_down_is_bounded_by_its_timeout() {
    let server = TestServer::start(fast_config()).await;
    let membership = Membership::join(MembershipOptions {
        shutdown_timeout: Duration::from_millis(300),
        ..options(vec![server.endpoint()], "w")
    })
    .await
    .unwrap();
    wait_running(&server, &membership.id().unwrap()).await;
    server.stop().await;
    let started = Instant::now();
    let err = membership.shutdown().await.unwrap_err();
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// The registry's live set as the view models it.
type Model = BTreeMap<String, (String, BTreeMap<String, String>)>;

async fn listed(server: &TestServer) -> (Model, u64) {
    let list = server
        .client()
        .await
        .list_executors(ListExecutorsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let model = list
        .executors
        .into_iter()
        .map(|e| (e.id, (e.address, e.labels.into_iter().collect())))
        .collect();
    (model, list.revision)
}

fn modelled(view: &FleetView) -> Model {
    view.members()
        .iter()
        .map(|m| (m.id.clone(), (m.address.clone(), m.labels.clone())))
        .collect()
}

/// Applies every waiting change to `model`, checking each one makes sense.
fn replay(view: &mut FleetView, model: &mut Model) -> Vec<FleetChange> {
    let mut seen = Vec::new();
    while let Some(change) = view.try_next_change() {
        match &change {
            FleetChange::Online { member, .. } => {
                let previous = model.insert(
                    member.id.clone(),
                    (member.address.clone(), member.labels.clone()),
                );
                assert!(previous.is_none(), "ONLINE twice for {}", member.id);
            }
            FleetChange::Offline { id, .. } => {
                assert!(model.remove(id).is_some(), "OFFLINE for unknown {id}");
            }
        }
        seen.push(change);
    }
    seen
}

fn small_window_options(server: &TestServer) -> FleetViewOptions {
    FleetViewOptions {
        backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
        channel: ChannelOptions {
            initial_stream_window_size: Some(65_535),
            initial_connection_window_size: Some(65_535),
            ..ChannelOptions::default()
        },
        ..FleetViewOptions::new([server.endpoint()])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_view_equals_list_executors_after_heavy_churn_and_forced_rewatches() {
    let config = RegistryConfig {
        watch_history: 4,
        init_ttl: Duration::from_secs(60),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let mut c = server.client().await;
    for i in 0..20 {
        register(&mut c, "before", 1 + i).await;
    }
    let mut view = FleetView::connect_with(small_window_options(&server))
        .await
        .unwrap();
    let mut model = modelled(&view);
    assert_eq!(model.len(), 20);

    // Eight tasks of registrations, deregistrations and short leases, and
    // one mass expiry of 100 leases in a single pass (100 events in one
    // turn: far past a 4-event watch buffer).
    let mut tasks = Vec::new();
    for t in 0..8u16 {
        let mut c = server.client().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..40u16 {
                let labels = [("task", t.to_string()), ("n", i.to_string())];
                let labels: Vec<(&str, &str)> =
                    labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let id = c
                    .register(register_request("churn", 1000 + t * 100 + i, &labels))
                    .await
                    .unwrap()
                    .into_inner()
                    .executor
                    .unwrap()
                    .id;
                match i % 3 {
                    0 => {
                        c.deregister(DeregisterRequest { executor_id: id })
                            .await
                            .unwrap();
                    }
                    1 => {
                        c.heartbeat(HeartbeatRequest {
                            executor_id: id,
                            ttl_ms: 100,
                        })
                        .await
                        .unwrap();
                    }
                    _ => {}
                }
            }
        }));
    }
    let mut mass = Vec::new();
    for i in 0..100 {
        mass.push(register(&mut c, "mass", 5000 + i).await);
    }
    c.heartbeat_batch(HeartbeatBatchRequest {
        heartbeats: mass
            .iter()
            .map(|id| HeartbeatRequest {
                executor_id: id.clone(),
                ttl_ms: 200,
            })
            .collect(),
    })
    .await
    .unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    // Every short lease has run out (100–200 ms), and been removed.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (expected, revision) = listed(&server).await;
    assert_eq!(expected.len(), 20 + 8 * 13, "the churn did what it should");

    eventually(
        Duration::from_secs(10),
        "view at the list's revision",
        || async { view.revision() == revision },
    )
    .await;
    assert_eq!(modelled(&view), expected, "members() equals ListExecutors");
    assert!(
        view.resyncs() > 0,
        "the tiny watch buffer forced re-watches"
    );

    // And the changes alone, applied to where the view started, give the
    // same fleet: nothing was missed.
    let changes = replay(&mut view, &mut model);
    assert_eq!(model, expected, "changes replayed equal ListExecutors");
    assert!(changes.iter().any(|c| !c.is_resync()), "events seen too");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_view_reconciles_after_the_registry_restarts_without_its_store() {
    let server = TestServer::start(fast_config()).await;
    let addr = server.addr;
    let mut c = server.client().await;
    let a = register(&mut c, "a", 1).await;
    let b = register(&mut c, "b", 2).await;
    let mut view = FleetView::connect_with(small_window_options(&server))
        .await
        .unwrap();
    let mut model = modelled(&view);
    assert_eq!(model.len(), 2);

    server.stop().await;
    let server = TestServer::start_on(addr, fast_config(), Box::new(MemoryStore::new())).await;
    let mut c = server.client().await;
    let n = register(&mut c, "n", 3).await;
    let (expected, revision) = listed(&server).await;
    eventually(Duration::from_secs(10), "view caught up", || async {
        view.revision() == revision && view.members().contains(&n)
    })
    .await;
    assert_eq!(modelled(&view), expected);
    let changes = replay(&mut view, &mut model);
    assert_eq!(model, expected);
    for gone in [&a, &b] {
        assert!(
            changes.contains(&FleetChange::Offline {
                id: gone.clone(),
                reason: OfflineReason::Unknown,
                resync: true,
            }),
            "{gone} offline by resync: {changes:?}"
        );
    }
    assert!(view.resyncs() >= 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_fleet_view_ends_its_watch() {
    let gauge = Arc::new(WatcherGauge::default());
    let server = TestServer::start_observed(
        None,
        fast_config(),
        Box::new(MemoryStore::new()),
        gauge.clone(),
    )
    .await;
    let view = FleetView::connect([server.endpoint()]).await.unwrap();
    assert_eq!(gauge.0.load(Ordering::SeqCst), 1);
    drop(view);
    eventually(Duration::from_secs(5), "watch closed", || async {
        gauge.0.load(Ordering::SeqCst) == 0
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn a_fleet_view_gives_up_when_asked_to() {
    let err = FleetView::connect_with(FleetViewOptions {
        give_up_after: Some(Duration::from_millis(200)),
        ..FleetViewOptions::new([dead_endpoint()])
    })
    .await
    .unwrap_err();
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
}
