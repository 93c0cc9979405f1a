//! End-to-end: every RPC of `registry.v1.Registry` and every error code,
//! over real gRPC on loopback.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "tests on real time wait and measure on the real clock"
)]

mod support;

use std::time::{Duration, Instant};

use executor_registry::proto::{
    self, CountExecutorsRequest, DeregisterRequest, EventType, ExecutorStatus, GetExecutorRequest,
    HeartbeatBatchRequest, HeartbeatRequest, HeartbeatStatus, LabelSelector, ListExecutorsRequest,
    OfflineReason, SelectorOp,
};
use executor_registry::registry::RegistryConfig;
use support::*;
use tonic::Code;

fn hb(id: &str, ttl_ms: u64) -> HeartbeatRequest {
    HeartbeatRequest {
        executor_id: id.into(),
        ttl_ms,
    }
}

#[tokio::test]
async fn register_get_heartbeat_list_count_deregister() {
    let server = TestServer::start(fast_config()).await;
    let mut c = server.client().await;

    let resp = c
        .register(register_request(
            "worker",
            7001,
            &[("zone", "a"), ("gpu", "a100")],
        ))
        .await
        .unwrap()
        .into_inner();
    let e = resp.executor.unwrap();
    let (prefix, hex) = e.id.rsplit_once('-').unwrap();
    assert_eq!(prefix, "worker");
    assert_eq!(hex.len(), 16);
    assert!(
        hex.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    assert_eq!(e.address, "127.0.0.1:7001");
    assert_eq!(e.status, ExecutorStatus::Initing as i32);
    assert_eq!(e.labels.get("zone").map(String::as_str), Some("a"));
    assert_eq!(e.last_heartbeat_unix_ms, 0);
    assert_eq!(e.ttl_ms, 5_000);
    assert_eq!(resp.heartbeat_interval_ms, 100);

    let got = c
        .get_executor(GetExecutorRequest {
            executor_id: e.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status, ExecutorStatus::Initing as i32);

    let count = |status: ExecutorStatus| CountExecutorsRequest {
        status: status as i32,
    };
    assert_eq!(
        c.count_executors(count(ExecutorStatus::Initing))
            .await
            .unwrap()
            .into_inner()
            .count,
        1
    );
    assert_eq!(
        c.count_executors(count(ExecutorStatus::Running))
            .await
            .unwrap()
            .into_inner()
            .count,
        0
    );

    let before = executor_registry::registry::Clock::start().unix_ms(0);
    let beat = c.heartbeat(hb(&e.id, 3_000)).await.unwrap().into_inner();
    assert_eq!(beat.heartbeat_interval_ms, 100);
    let got = c
        .get_executor(GetExecutorRequest {
            executor_id: e.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status, ExecutorStatus::Running as i32);
    assert_eq!(got.ttl_ms, 3_000);
    assert!(
        got.last_heartbeat_unix_ms + 1_000 >= before,
        "{} vs {before}",
        got.last_heartbeat_unix_ms
    );
    assert_eq!(
        c.count_executors(count(ExecutorStatus::Running))
            .await
            .unwrap()
            .into_inner()
            .count,
        1
    );
    assert_eq!(
        c.count_executors(count(ExecutorStatus::Unspecified))
            .await
            .unwrap()
            .into_inner()
            .count,
        1
    );

    let other = register(&mut c, "", 7002).await;
    assert!(other.starts_with("executor-"), "{other}");

    let list = c
        .list_executors(ListExecutorsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = list.executors.iter().map(|e| e.id.clone()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "list is sorted by id");
    assert_eq!(ids.len(), 2);
    // ONLINE, RUNNING (the first heartbeat), ONLINE.
    assert_eq!(list.revision, 3);

    let running = c
        .list_executors(ListExecutorsRequest {
            status: ExecutorStatus::Running as i32,
            selectors: vec![],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(running.executors.len(), 1);
    assert_eq!(running.executors[0].id, e.id);

    let selected = |label: &str, target: &str, op: SelectorOp| ListExecutorsRequest {
        status: 0,
        selectors: vec![LabelSelector {
            label: label.into(),
            target: target.into(),
            op: op as i32,
        }],
        ..Default::default()
    };
    let n = |r: proto::ListExecutorsResponse| r.executors.len();
    assert_eq!(
        n(c.list_executors(selected("zone", "a", SelectorOp::Eq))
            .await
            .unwrap()
            .into_inner()),
        1
    );
    assert_eq!(
        n(c.list_executors(selected("zone", "a", SelectorOp::Neq))
            .await
            .unwrap()
            .into_inner()),
        1
    );
    assert_eq!(
        n(c.list_executors(selected("gpu", "a1.*", SelectorOp::Regex))
            .await
            .unwrap()
            .into_inner()),
        1
    );
    assert_eq!(
        n(c.list_executors(selected("gpu", "a1", SelectorOp::Regex))
            .await
            .unwrap()
            .into_inner()),
        0
    );

    c.deregister(DeregisterRequest {
        executor_id: e.id.clone(),
    })
    .await
    .unwrap();
    let gone = c
        .get_executor(GetExecutorRequest {
            executor_id: e.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn every_error_code_of_the_spec() {
    let server = TestServer::start(fast_config()).await;
    let mut c = server.client().await;
    let code_of = |r: Result<tonic::Response<_>, tonic::Status>| -> (Code, String) {
        let s = r
            .map(|_: tonic::Response<proto::RegisterResponse>| ())
            .unwrap_err();
        (s.code(), s.message().to_owned())
    };

    // Register: INVALID_ARGUMENT naming the field.
    for (req, field) in [
        (register_request("w", 1, &[("bad_key", "v")]), "labels"),
        (register_request("w", 1, &[("k", "")]), "labels"),
        (register_request("has space", 1, &[]), "name"),
        (register_request(&"n".repeat(129), 1, &[]), "name"),
        (
            proto::RegisterRequest {
                address: "".into(),
                ..Default::default()
            },
            "address",
        ),
        (
            proto::RegisterRequest {
                address: "host".into(),
                ..Default::default()
            },
            "address",
        ),
        (
            proto::RegisterRequest {
                address: "host:99999".into(),
                ..Default::default()
            },
            "address",
        ),
        (
            proto::RegisterRequest {
                address: format!("{}:1", "h".repeat(300)),
                ..Default::default()
            },
            "address",
        ),
    ] {
        let (code, message) = code_of(c.register(req).await);
        assert_eq!(code, Code::InvalidArgument, "{message}");
        assert!(message.contains(field), "{message:?} should name {field}");
    }
    // Nothing was registered.
    let count = c
        .count_executors(CountExecutorsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(count, 0);

    let id = register(&mut c, "w", 1).await;

    // Heartbeat: NOT_FOUND, INVALID_ARGUMENT (ttl), FAILED_PRECONDITION (tombstone).
    let s = c
        .heartbeat(hb("nobody-0000000000000000", 1_000))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let s = c.heartbeat(hb(&id, 10)).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("ttl_ms"), "{}", s.message());
    let s = c.heartbeat(hb(&id, 10 * 60_000)).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let s = c.heartbeat(hb("", 1_000)).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("executor_id"));
    c.deregister(DeregisterRequest {
        executor_id: id.clone(),
    })
    .await
    .unwrap();
    let s = c.heartbeat(hb(&id, 1_000)).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(s.message().contains("register again"), "{}", s.message());

    // Deregister / Get: NOT_FOUND.
    let s = c
        .deregister(DeregisterRequest {
            executor_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let s = c
        .get_executor(GetExecutorRequest {
            executor_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);

    // List / Count: invalid selectors and statuses.
    let bad_selector = |label: &str, target: &str, op: i32| ListExecutorsRequest {
        status: 0,
        selectors: vec![LabelSelector {
            label: label.into(),
            target: target.into(),
            op,
        }],
        ..Default::default()
    };
    for (req, field) in [
        (
            bad_selector("bad key", "x", SelectorOp::Eq as i32),
            "selectors.label",
        ),
        (
            bad_selector("k", "x", SelectorOp::Unspecified as i32),
            "selectors.op",
        ),
        (bad_selector("k", "x", 42), "selectors.op"),
        (
            bad_selector("k", "(", SelectorOp::Regex as i32),
            "selectors.target",
        ),
        (
            ListExecutorsRequest {
                status: 9,
                selectors: vec![],
                ..Default::default()
            },
            "status",
        ),
        (
            ListExecutorsRequest {
                status: ExecutorStatus::Tombstone as i32,
                selectors: vec![],
                ..Default::default()
            },
            "status",
        ),
    ] {
        let s = c.list_executors(req).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(
            s.message().contains(field),
            "{:?} should name {field}",
            s.message()
        );
    }
    let s = c
        .count_executors(CountExecutorsRequest { status: 9 })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);

    // Batch: more than 10,000 → INVALID_ARGUMENT for the call.
    let batch = HeartbeatBatchRequest {
        heartbeats: (0..10_001).map(|_| hb("x", 0)).collect(),
    };
    let s = c.heartbeat_batch(batch).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("heartbeats"));

    // A message over 4 MiB is refused, and the server keeps serving.
    let huge = proto::RegisterRequest {
        name: "w".into(),
        address: "127.0.0.1:1".into(),
        labels: [("k".to_owned(), "v".repeat(5 * 1024 * 1024))]
            .into_iter()
            .collect(),
    };
    let s = c.register(huge).await.unwrap_err();
    assert_ne!(s.code(), Code::Ok);
    let mut c = server.client().await;
    register(&mut c, "after", 2).await;
    server.stop().await;
}

#[tokio::test]
async fn unavailable_store_answers_unavailable_and_nothing_is_visible() {
    use executor_registry::registry::{Batch, MembershipStore, StoreError, StoredExecutor};
    /// A store whose disk is gone: every commit of executors fails.
    struct BrokenDisk;
    impl MembershipStore for BrokenDisk {
        fn revision_floor(&mut self) -> Result<u64, StoreError> {
            Ok(0)
        }

        fn load_all(&mut self) -> Result<Vec<StoredExecutor>, StoreError> {
            Ok(vec![])
        }
        /// Fails every commit that writes executors (the revision
        /// reservation at start goes through: the disk went after it).
        fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
            if batch.inserts.is_empty() && batch.deletes.is_empty() {
                return Ok(());
            }
            Err(StoreError::Failed("disk I/O error".into()))
        }
    }
    let server = TestServer::start_with_store(fast_config(), Box::new(BrokenDisk)).await;
    let mut c = server.client().await;
    let s = c.register(register_request("w", 1, &[])).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable);
    assert!(s.message().contains("disk I/O error"), "{}", s.message());
    let list = c
        .list_executors(ListExecutorsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.executors.is_empty());
    assert_eq!(list.revision, 0);
    server.stop().await;
}

#[tokio::test]
async fn batch_and_stream_report_per_item_statuses_in_order() {
    let server = TestServer::start(fast_config()).await;
    let mut c = server.client().await;
    let a = register(&mut c, "a", 1).await;
    let b = register(&mut c, "b", 2).await;
    c.deregister(DeregisterRequest {
        executor_id: b.clone(),
    })
    .await
    .unwrap();
    let requests = vec![
        hb(&a, 1_000),
        hb("ghost-0000000000000000", 1_000),
        hb(&b, 1_000),
        hb(&a, 1),
        hb(&a, 0),
    ];
    let expected = [
        HeartbeatStatus::Ok,
        HeartbeatStatus::UnknownExecutor,
        HeartbeatStatus::Expired,
        HeartbeatStatus::Invalid,
        HeartbeatStatus::Ok,
    ];

    let batch = c
        .heartbeat_batch(HeartbeatBatchRequest {
            heartbeats: requests.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<_> = batch
        .results
        .iter()
        .map(|r| (r.executor_id.clone(), r.status))
        .collect();
    let want: Vec<_> = requests
        .iter()
        .zip(expected)
        .map(|(r, s)| (r.executor_id.clone(), s as i32))
        .collect();
    assert_eq!(got, want);
    assert!(batch.results.iter().all(|r| r.heartbeat_interval_ms == 100));

    let mut stream = c
        .heartbeat_stream(tokio_stream::iter(requests.clone()))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(result) = stream.message().await.unwrap() {
        got.push((result.executor_id, result.status));
    }
    assert_eq!(got, want, "one result per request, in order, whole stream");
    server.stop().await;
}

/// The reference's `TestExecutorManager`, on this API: register, heartbeat
/// with a short TTL, wait for expiry, and a late heartbeat is refused.
#[tokio::test]
async fn reference_executor_manager() {
    let server = TestServer::start(fast_config()).await;
    let mut c = server.client().await;
    let id = register(&mut c, "", 10001).await;
    let got = c
        .get_executor(GetExecutorRequest {
            executor_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.address, "127.0.0.1:10001");
    let count = |status: ExecutorStatus| CountExecutorsRequest {
        status: status as i32,
    };
    assert_eq!(
        c.count_executors(count(ExecutorStatus::Initing))
            .await
            .unwrap()
            .into_inner()
            .count,
        1
    );
    assert_eq!(
        c.count_executors(count(ExecutorStatus::Running))
            .await
            .unwrap()
            .into_inner()
            .count,
        0
    );

    c.heartbeat(hb(&id, 100)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let running = c
            .count_executors(count(ExecutorStatus::Running))
            .await
            .unwrap()
            .into_inner()
            .count;
        if running == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "executor never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let late = c.heartbeat(hb(&id, 100)).await.unwrap_err();
    assert_eq!(
        late.code(),
        Code::FailedPrecondition,
        "late heartbeat after expiry"
    );
    server.stop().await;
}

/// The reference's `TestExecutorManagerWatch`, on this API.
#[tokio::test]
async fn reference_executor_manager_watch() {
    let server = TestServer::start(fast_config()).await;
    let mut c = server.client().await;
    let id1 = register(&mut c, "", 10001).await;
    let (snapshot, mut stream) = watch(&mut c).await;
    assert_eq!(
        snapshot
            .executors
            .iter()
            .map(|e| e.id.clone())
            .collect::<Vec<_>>(),
        vec![id1.clone()]
    );

    let id2 = register(&mut c, "", 10002).await;
    let event = next_event(&mut stream).await;
    assert_eq!(
        (event.executor_id.as_str(), event.r#type),
        (id2.as_str(), EventType::Online as i32)
    );
    assert_eq!(event.address, "127.0.0.1:10002");
    assert_eq!(event.revision, snapshot.revision + 1);

    c.heartbeat(hb(&id1, 100)).await.unwrap();
    c.heartbeat(hb(&id2, 100)).await.unwrap();
    let running = CountExecutorsRequest {
        status: ExecutorStatus::Running as i32,
    };
    assert_eq!(
        c.count_executors(running).await.unwrap().into_inner().count,
        2
    );
    // Each first heartbeat is a RUNNING event, in order.
    for (i, id) in [&id1, &id2].into_iter().enumerate() {
        let event = next_event(&mut stream).await;
        assert_eq!(
            (event.executor_id.as_str(), event.r#type, event.status),
            (
                id.as_str(),
                EventType::Running as i32,
                ExecutorStatus::Running as i32
            )
        );
        assert_eq!(event.revision, snapshot.revision + 2 + i as u64);
    }

    // Keep id2 alive; id1 goes silent and expires.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        c.heartbeat(hb(&id2, 100)).await.unwrap();
        if c.count_executors(running).await.unwrap().into_inner().count == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "id1 never expired");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let event = next_event(&mut stream).await;
    assert_eq!(event.executor_id, id1);
    assert_eq!(event.r#type, EventType::Offline as i32);
    assert_eq!(event.reason, OfflineReason::Expired as i32);
    assert_eq!(event.status, ExecutorStatus::Tombstone as i32);
    assert_eq!(event.revision, snapshot.revision + 4);
    server.stop().await;
}

/// The reference hung with its mutex held on an invalid label; here the
/// call is refused and the registry keeps serving.
#[tokio::test]
async fn invalid_label_is_refused_and_the_registry_keeps_serving() {
    let server = TestServer::start(fast_config()).await;
    let mut c = server.client().await;
    let s = c
        .register(register_request("w", 1, &[("-bad", "x")]))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    for port in 0..20 {
        let id = register(&mut c, "w", 1000 + port).await;
        c.heartbeat(hb(&id, 1_000)).await.unwrap();
    }
    let list = c
        .list_executors(ListExecutorsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.executors.len(), 20);
    server.stop().await;
}

/// Acceptance: 2,000 executors whose deadlines pass together all go OFFLINE
/// with consecutive revisions, within 250 ms of their deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_coinciding_deadlines_expire_together_and_promptly() {
    let server = TestServer::start(fast_config()).await;
    let mut c = server.client().await;
    let mut ids = Vec::new();
    let mut joins = Vec::new();
    for i in 0..2_000u16 {
        let mut c = c.clone();
        joins.push(tokio::spawn(async move {
            register(&mut c, "fleet", 1 + i).await
        }));
    }
    for j in joins {
        ids.push(j.await.unwrap());
    }
    let (snapshot, mut stream) = watch(&mut c).await;
    assert_eq!(snapshot.executors.len(), 2_000);

    let ttl = Duration::from_millis(1_000);
    let sent = Instant::now();
    let batch = HeartbeatBatchRequest {
        heartbeats: ids
            .iter()
            .map(|id| hb(id, ttl.as_millis() as u64))
            .collect(),
    };
    let results = c.heartbeat_batch(batch).await.unwrap().into_inner().results;
    assert!(
        results
            .iter()
            .all(|r| r.status == HeartbeatStatus::Ok as i32)
    );
    // The server set every deadline at or after `sent`, so arrival - (sent +
    // ttl) bounds the expiry lag from above.
    let mut offline = std::collections::HashSet::new();
    let mut expected_revision = snapshot.revision + 1;
    // First the 2,000 first heartbeats: RUNNING, consecutive.
    let mut running = std::collections::HashSet::new();
    while running.len() < ids.len() {
        let event = next_event(&mut stream).await;
        assert_eq!(event.r#type, EventType::Running as i32);
        assert_eq!(
            event.revision, expected_revision,
            "revisions are consecutive"
        );
        expected_revision += 1;
        running.insert(event.executor_id);
    }
    let mut last_arrival = sent;
    while offline.len() < ids.len() {
        let event = next_event(&mut stream).await;
        assert_eq!(event.r#type, EventType::Offline as i32);
        assert_eq!(event.reason, OfflineReason::Expired as i32);
        assert_eq!(
            event.revision, expected_revision,
            "revisions are consecutive"
        );
        expected_revision += 1;
        offline.insert(event.executor_id);
        last_arrival = Instant::now();
    }
    let lag = last_arrival.saturating_duration_since(sent + ttl);
    assert!(
        lag <= Duration::from_millis(250),
        "last OFFLINE {lag:?} after the deadline"
    );
    assert_eq!(
        c.count_executors(CountExecutorsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .count,
        0
    );
    server.stop().await;
}

/// A watcher that never reads is ended by the registry with
/// RESOURCE_EXHAUSTED, and 3,000 registrations and deregistrations proceed
/// meanwhile without waiting for it.
///
/// Two transport details shape this test. The watcher's own HTTP/2 window
/// holds events too (the protocol's default 64 KiB here; hyper's client
/// default is 2 MiB). And h2 clients close the whole connection
/// (GOAWAY ENHANCE_YOUR_CALM) when ~170 unread DATA frames under 256 bytes
/// pile up — tonic reports that as RESOURCE_EXHAUSTED too. So the events
/// carry labels that make each frame larger, and the test checks that the
/// ending is the registry's own ("watch again"), not the transport's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_never_reads_is_ended_and_slows_nothing() {
    let config = RegistryConfig {
        watch_history: 64,
        init_ttl: Duration::from_secs(600),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let mut c = server.client().await;
    let (snapshot, mut stalled) = watch(&mut server.small_window_client().await).await;

    let started = Instant::now();
    let mut ids = Vec::new();
    let value = "v".repeat(60);
    let labels: Vec<(String, String)> = (0..4)
        .map(|i| (format!("label{i}"), value.clone()))
        .collect();
    let labels: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    for i in 0..1_500u16 {
        let request = register_request("churn", 1 + i, &labels);
        let registered = c.register(request).await.unwrap().into_inner();
        ids.push(registered.executor.unwrap().id);
    }
    for id in &ids {
        c.deregister(DeregisterRequest {
            executor_id: id.clone(),
        })
        .await
        .unwrap();
    }
    let churn = started.elapsed();

    // A fresh watcher still works, and sees the final state.
    let (fresh, _) = watch(&mut c).await;
    assert_eq!(fresh.revision, snapshot.revision + 3_000);
    assert!(fresh.executors.is_empty());

    // The stalled watcher reads consecutive events, then RESOURCE_EXHAUSTED: no gap.
    let mut expected = snapshot.revision + 1;
    let status = loop {
        match next_message(&mut stalled).await {
            Ok(proto::watch_executors_response::Kind::Event(e)) => {
                assert_eq!(e.revision, expected, "no gap before the end");
                expected += 1;
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("watch again"),
        "ended by the registry, not the transport: {status:?}"
    );
    assert!(expected <= snapshot.revision + 3_000, "it did fall behind");
    // Not a timing assertion on speed: the churn must simply not have waited
    // for the stalled watcher (which would hang until the test's timeout).
    assert!(churn < Duration::from_secs(60), "churn took {churn:?}");
    server.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_ends_watch_streams_and_drains() {
    let server = TestServer::start(fast_config()).await;
    let mut c = server.client().await;
    register(&mut c, "w", 1).await;
    let (_, mut stream) = watch(&mut c).await;
    let mut hb_stream = c
        .heartbeat_stream(tokio_stream::pending::<HeartbeatRequest>())
        .await
        .unwrap()
        .into_inner();
    let started = Instant::now();
    let stopped = server.stop().await;
    assert_eq!(stopped, executor_registry::server::Stopped::Drained);
    assert!(started.elapsed() < Duration::from_secs(5));
    let end = next_message(&mut stream).await.unwrap_err();
    assert_eq!(end.code(), Code::Unavailable);
    assert!(
        hb_stream
            .message()
            .await
            .map(|m| m.is_none())
            .unwrap_or(true)
    );
}
