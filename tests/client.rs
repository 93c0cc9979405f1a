//! The client library against a real registry served over loopback:
//! `Membership` through restarts with and without the store, interval and
//! TTL handling, shutdown and drop; `FleetView` through heavy churn, forced
//! re-watches and restarts: it resumes from the registry's history when it
//! can (a broken connection), resyncs from a snapshot when it cannot (a lag,
//! a long absence, a restart), and its RUNNING members are what
//! `ListExecutors(status = RUNNING)` lists.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "tests on real time wait and measure on the real clock"
)]

mod proxy;
mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use executor_registry::client::{
    Backoff, ChannelOptions, ClientError, FleetChange, FleetView, FleetViewOptions, MemberStatus,
    Membership, MembershipOptions, MembershipState, OfflineReason,
};
use executor_registry::proto::registry_client::RegistryClient;
use executor_registry::proto::{
    self, DeregisterRequest, HeartbeatBatchRequest, HeartbeatRequest, ListExecutorsRequest,
};
use executor_registry::registry::{MemoryStore, Observer};
use executor_registry::registry::{RegistryConfig, Status};
use proxy::Proxy;
use support::{
    FlakyStore, SharedStore, TestServer, WatcherGauge, eventually, fast_config, register,
    register_large, register_request,
};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::Channel;

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

/// The registry's live set as the view models it: id → address, labels,
/// status.
type Model = BTreeMap<String, (String, BTreeMap<String, String>, MemberStatus)>;

/// Every page of a listing with `status` (UNSPECIFIED: all): the ids with
/// what the view would hold of them, and the listing's revision.
async fn listed_with(server: &TestServer, status: proto::ExecutorStatus) -> (Model, u64) {
    let mut client = server.client().await;
    let (mut model, mut revision, mut token) = (Model::new(), None, String::new());
    loop {
        let page = client
            .list_executors(ListExecutorsRequest {
                status: status as i32,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(*revision.get_or_insert(page.revision), page.revision);
        for e in page.executors {
            let running = e.status == proto::ExecutorStatus::Running as i32;
            let status = if running {
                MemberStatus::Running
            } else {
                MemberStatus::Initing
            };
            model.insert(e.id, (e.address, e.labels.into_iter().collect(), status));
        }
        if page.next_page_token.is_empty() {
            return (model, revision.unwrap());
        }
        token = page.next_page_token;
    }
}

async fn listed(server: &TestServer) -> (Model, u64) {
    listed_with(server, proto::ExecutorStatus::Unspecified).await
}

fn modelled(view: &FleetView) -> Model {
    view.members()
        .iter()
        .map(|m| {
            let held = (m.address.clone(), m.labels.clone(), m.status);
            (m.id.clone(), held)
        })
        .collect()
}

/// The RUNNING ones of a model.
fn running(model: &Model) -> Vec<String> {
    model
        .iter()
        .filter(|(_, (_, _, status))| *status == MemberStatus::Running)
        .map(|(id, _)| id.clone())
        .collect()
}

/// Applies every waiting change to `model`, checking each one makes sense.
fn replay(view: &mut FleetView, model: &mut Model) -> Vec<FleetChange> {
    let mut seen = Vec::new();
    while let Some(change) = view.try_next_change() {
        match &change {
            FleetChange::Online { member, .. } => {
                let held = (member.address.clone(), member.labels.clone(), member.status);
                let previous = model.insert(member.id.clone(), held);
                assert!(previous.is_none(), "ONLINE twice for {}", member.id);
            }
            FleetChange::Running { member, .. } => {
                assert_eq!(member.status, MemberStatus::Running);
                let held = model
                    .get_mut(&member.id)
                    .unwrap_or_else(|| panic!("RUNNING for unknown {}", member.id));
                assert_eq!(held.2, MemberStatus::Initing, "RUNNING twice");
                held.2 = MemberStatus::Running;
            }
            FleetChange::Offline { id, .. } => {
                assert!(model.remove(id).is_some(), "OFFLINE for unknown {id}");
            }
        }
        if let Some(previous) = seen.last().map(FleetChange::revision) {
            assert!(change.revision() >= previous, "revisions never go back");
        }
        seen.push(change);
    }
    seen
}

/// The view holds what `ListExecutors` holds at the same revision: every
/// member with its status, and its RUNNING ones are what a RUNNING listing
/// lists.
async fn assert_view_equals_the_registry(server: &TestServer, view: &FleetView) -> (Model, u64) {
    let (expected, revision) = listed(server).await;
    eventually(
        Duration::from_secs(10),
        "view at the list's revision",
        || async { view.revision() >= revision },
    )
    .await;
    assert_eq!(view.revision(), revision, "nothing changed since the list");
    assert_eq!(modelled(view), expected, "members() equals ListExecutors");
    let (listed_running, at) = listed_with(server, proto::ExecutorStatus::Running).await;
    assert_eq!(at, revision);
    let schedulable: Vec<String> = view.schedulable().iter().map(|m| m.id.clone()).collect();
    assert_eq!(
        schedulable,
        listed_running.keys().cloned().collect::<Vec<_>>(),
        "schedulable() equals ListExecutors(status = RUNNING), in id order"
    );
    let fleet = view.members();
    assert_eq!(fleet.running_len(), schedulable.len());
    assert!(fleet.running().all(|m| m.is_running()));
    (expected, revision)
}

fn small_window_options(server: &TestServer) -> FleetViewOptions {
    small_window_options_at(server.endpoint())
}

fn small_window_options_at(endpoint: String) -> FleetViewOptions {
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
        ..FleetViewOptions::new([endpoint])
    }
}

async fn heartbeat(c: &mut RegistryClient<Channel>, id: &str, ttl_ms: u64) {
    c.heartbeat(HeartbeatRequest {
        executor_id: id.to_owned(),
        ttl_ms,
    })
    .await
    .unwrap();
}

/// Labels of a large executor: each event a DATA frame of about 600 bytes.
const LARGE_LABELS: usize = 8;

/// How watches began on the server, and how many it ended for lagging.
#[derive(Default)]
struct WatchStarts {
    from_snapshot: AtomicU64,
    from_history: AtomicU64,
    lagged: AtomicU64,
}

impl Observer for WatchStarts {
    fn watch_started(&self, from_snapshot: bool) {
        let counter = if from_snapshot {
            &self.from_snapshot
        } else {
            &self.from_history
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }

    fn watcher_lagged(&self) {
        self.lagged.fetch_add(1, Ordering::SeqCst);
    }
}

async fn observed_server(config: RegistryConfig) -> (TestServer, Arc<WatchStarts>) {
    let starts = Arc::new(WatchStarts::default());
    let server =
        TestServer::start_observed(None, config, Box::new(MemoryStore::new()), starts.clone())
            .await;
    (server, starts)
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
    // turn: far past a 4-event watch history).
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
        "the tiny watch history forced re-watches"
    );

    // And the changes alone, applied to where the view started, give the
    // same fleet: nothing was missed.
    let changes = replay(&mut view, &mut model);
    assert_eq!(model, expected, "changes replayed equal ListExecutors");
    assert!(changes.iter().any(|c| !c.is_resync()), "events seen too");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_view_gathers_every_chunk_of_a_snapshot_before_applying_it() {
    let (server, _) = observed_server(RegistryConfig {
        watch_history: 16,
        init_ttl: Duration::from_secs(60),
        ..fast_config()
    })
    .await;
    let proxy = Proxy::start(server.addr).await;
    // About 700 KB of executors: a snapshot in several chunks.
    let mut tasks = Vec::new();
    for t in 0..8u16 {
        let mut c = server.client().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..150u16 {
                let id = register_large(&mut c, "big", 1000 + t * 200 + i, LARGE_LABELS).await;
                if i % 2 == 0 {
                    heartbeat(&mut c, &id, 60_000).await;
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut stream = server
        .client()
        .await
        .watch_executors(proto::WatchExecutorsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut chunks = 0;
    loop {
        match support::next_message(&mut stream).await.unwrap() {
            proto::watch_executors_response::Kind::Snapshot(chunk) => {
                chunks += 1;
                if !chunk.more {
                    break;
                }
            }
            other => panic!("the snapshot's chunks first, got {other:?}"),
        }
    }
    assert!(chunks > 1, "the registry sent {chunks} chunk(s)");
    drop(stream);

    let mut view = FleetView::connect_with(small_window_options_at(proxy.endpoint()))
        .await
        .unwrap();
    assert_eq!(
        view.members().len(),
        1_200,
        "every chunk applied at connect"
    );
    assert_eq!(view.schedulable().len(), 600);
    let (mut model, _) = assert_view_equals_the_registry(&server, &view).await;

    // A resync gathers its chunks too.
    proxy.down().await;
    let mut c = server.client().await;
    for i in 0..20 {
        register(&mut c, "late", 10 + i).await;
    }
    proxy.up();
    let (expected, _) = assert_view_equals_the_registry(&server, &view).await;
    assert_eq!(view.resyncs(), 1);
    let changes = replay(&mut view, &mut model);
    assert_eq!(model, expected);
    assert_eq!(changes.len(), 20, "only the new ones: {changes:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_views_running_members_are_what_list_executors_running_lists() {
    let config = RegistryConfig {
        watch_history: 8,
        init_ttl: Duration::from_secs(60),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let mut view = FleetView::connect_with(small_window_options(&server))
        .await
        .unwrap();
    let mut model = modelled(&view);
    assert!(model.is_empty() && view.schedulable().is_empty());

    // Four kinds of executor: deregistered, RUNNING then expired, RUNNING
    // for good, INITING for good.
    let mut tasks = Vec::new();
    for t in 0..6u16 {
        let mut c = server.client().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..40u16 {
                let id = register(&mut c, "w", 1000 + t * 100 + i).await;
                match i % 4 {
                    0 => {
                        c.deregister(DeregisterRequest { executor_id: id })
                            .await
                            .unwrap();
                    }
                    1 => heartbeat(&mut c, &id, 100).await,
                    2 => {
                        heartbeat(&mut c, &id, 60_000).await;
                        // A later heartbeat is no change.
                        heartbeat(&mut c, &id, 60_000).await;
                    }
                    _ => {}
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (expected, _) = assert_view_equals_the_registry(&server, &view).await;
    assert_eq!(expected.len(), 6 * 20);
    assert_eq!(running(&expected).len(), 6 * 10);

    let changes = replay(&mut view, &mut model);
    assert_eq!(model, expected, "changes replayed equal ListExecutors");
    assert_eq!(running(&model), running(&expected));
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, FleetChange::Running { resync: false, .. })),
        "RUNNING events seen as changes"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_view_resumes_without_a_snapshot_when_its_connection_breaks() {
    let (server, starts) = observed_server(RegistryConfig {
        watch_history: 64,
        init_ttl: Duration::from_secs(60),
        ..fast_config()
    })
    .await;
    let proxy = Proxy::start(server.addr).await;
    let mut c = server.client().await;
    let a = register(&mut c, "a", 1).await;
    let b = register(&mut c, "b", 2).await;
    heartbeat(&mut c, &a, 60_000).await;
    let mut view = FleetView::connect_with(small_window_options_at(proxy.endpoint()))
        .await
        .unwrap();
    let (mut model, before) = assert_view_equals_the_registry(&server, &view).await;

    proxy.cut().await;
    // Fewer changes than the history holds, while the view reconnects.
    let n = register(&mut c, "n", 3).await;
    heartbeat(&mut c, &b, 60_000).await;
    heartbeat(&mut c, &n, 60_000).await;
    c.deregister(DeregisterRequest {
        executor_id: a.clone(),
    })
    .await
    .unwrap();
    let (expected, revision) = assert_view_equals_the_registry(&server, &view).await;
    assert_eq!(revision, before + 4);
    assert_eq!(view.resumes(), 1, "one re-watch, resumed");
    assert_eq!(view.resyncs(), 0, "no snapshot");
    assert_eq!(
        starts.from_snapshot.load(Ordering::SeqCst),
        1,
        "connect's only"
    );
    assert_eq!(starts.from_history.load(Ordering::SeqCst), 1);

    let changes = replay(&mut view, &mut model);
    assert_eq!(model, expected);
    assert!(changes.iter().all(|c| !c.is_resync()), "{changes:?}");
    let revisions: Vec<u64> = changes.iter().map(FleetChange::revision).collect();
    assert_eq!(
        revisions,
        (before + 1..=revision).collect::<Vec<_>>(),
        "each event once"
    );
    assert!(
        matches!(&changes[1], FleetChange::Running { member, .. } if member.id == b),
        "{changes:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_view_that_falls_out_of_the_history_resyncs_from_a_snapshot() {
    let (server, starts) = observed_server(RegistryConfig {
        watch_history: 16,
        init_ttl: Duration::from_secs(60),
        ..fast_config()
    })
    .await;
    let proxy = Proxy::start(server.addr).await;
    let mut c = server.client().await;
    let a = register(&mut c, "a", 1).await;
    let b = register(&mut c, "b", 2).await;
    heartbeat(&mut c, &a, 60_000).await;
    let mut view = FleetView::connect_with(small_window_options_at(proxy.endpoint()))
        .await
        .unwrap();
    let (mut model, _) = assert_view_equals_the_registry(&server, &view).await;

    // The view stops receiving: the registry fills its 64 KiB window,
    // then keeps its events only in the 16-event history.
    proxy.stall();
    let mut ids = Vec::new();
    for i in 0..300 {
        ids.push(register_large(&mut c, "burst", 100 + i, LARGE_LABELS).await);
    }
    for id in ids.iter().step_by(3) {
        heartbeat(&mut c, id, 60_000).await;
    }
    heartbeat(&mut c, &b, 60_000).await;
    proxy.resume();

    let (expected, _) = assert_view_equals_the_registry(&server, &view).await;
    assert_eq!(starts.lagged.load(Ordering::SeqCst), 1, "ended for lagging");
    assert_eq!(
        view.resyncs(),
        1,
        "the events it missed were gone: a snapshot"
    );
    assert_eq!(view.resumes(), 0);
    let changes = replay(&mut view, &mut model);
    assert_eq!(model, expected, "changes replayed equal ListExecutors");
    assert!(changes.iter().any(FleetChange::is_resync));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_view_resyncs_when_the_history_no_longer_holds_its_revision() {
    let (server, starts) = observed_server(RegistryConfig {
        watch_history: 16,
        init_ttl: Duration::from_secs(60),
        ..fast_config()
    })
    .await;
    let proxy = Proxy::start(server.addr).await;
    let mut c = server.client().await;
    let gone = register(&mut c, "gone", 1).await;
    let stays = register(&mut c, "stays", 2).await;
    let mut view = FleetView::connect_with(small_window_options_at(proxy.endpoint()))
        .await
        .unwrap();
    let (mut model, before) = assert_view_equals_the_registry(&server, &view).await;

    // Out of reach while more changes happen than the history holds.
    proxy.down().await;
    c.deregister(DeregisterRequest {
        executor_id: gone.clone(),
    })
    .await
    .unwrap();
    heartbeat(&mut c, &stays, 60_000).await;
    for i in 0..20 {
        register(&mut c, "new", 100 + i).await;
    }
    proxy.up();

    let (expected, revision) = assert_view_equals_the_registry(&server, &view).await;
    assert_eq!(revision, before + 22);
    assert_eq!(view.resyncs(), 1);
    assert_eq!(view.resumes(), 0);
    assert_eq!(
        starts.lagged.load(Ordering::SeqCst),
        0,
        "no lag: out of reach"
    );
    let changes = replay(&mut view, &mut model);
    assert_eq!(model, expected);
    assert!(
        changes
            .iter()
            .all(|c| c.is_resync() && c.revision() == revision)
    );
    assert!(changes.contains(&FleetChange::Offline {
        id: gone,
        reason: OfflineReason::Unknown,
        revision,
        resync: true,
    }));
    assert!(
        changes.iter().any(
            |c| matches!(c, FleetChange::Running { member, resync: true, .. } if member.id == stays)
        ),
        "INITING in the view, RUNNING in the snapshot: a RUNNING change"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revision_from_before_a_restart_gets_a_snapshot_never_a_resume() {
    let store = SharedStore::default();
    let config = || RegistryConfig {
        init_ttl: Duration::from_secs(60),
        ..fast_config()
    };
    let server = TestServer::start_with_store(config(), Box::new(store.clone())).await;
    let addr = server.addr;
    let mut c = server.client().await;
    let a = register(&mut c, "a", 1).await;
    register(&mut c, "b", 2).await;
    heartbeat(&mut c, &a, 60_000).await;
    let mut view = FleetView::connect_with(small_window_options(&server))
        .await
        .unwrap();
    let (mut model, before) = assert_view_equals_the_registry(&server, &view).await;
    assert_eq!(view.schedulable().len(), 1);

    server.stop().await;
    let server = TestServer::start_on(addr, config(), Box::new(store.clone())).await;
    // Enough changes that a history counted again from 0 would hold the
    // view's revision.
    let mut c = server.client().await;
    for i in 0..before + 2 {
        register(&mut c, "n", 10 + i as u16).await;
    }
    let (expected, revision) = assert_view_equals_the_registry(&server, &view).await;
    assert!(
        revision > before + 2,
        "revisions went on: {revision} after {before}"
    );
    assert_eq!(view.resumes(), 0, "never resumed across the restart");
    assert!(view.resyncs() >= 1);
    // Reloaded executors are INITING until they heartbeat again.
    assert_eq!(expected[&a].2, MemberStatus::Initing);
    assert!(view.schedulable().is_empty());
    let changes = replay(&mut view, &mut model);
    assert_eq!(model, expected);
    assert!(changes.iter().all(FleetChange::is_resync));
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
            changes.iter().any(|c| matches!(
                c,
                FleetChange::Offline { id, reason: OfflineReason::Unknown, resync: true, .. }
                    if id == gone
            )),
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
