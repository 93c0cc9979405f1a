//! Limits that keep the registry up under overload, over real gRPC:
//! `--max-executors`, `--max-watchers`, the in-flight limit that sheds other
//! calls but never heartbeats, and client deadlines.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "tests on real time wait and measure on the real clock"
)]

mod support;

use std::time::{Duration, Instant};

use executor_registry::proto::{
    CountExecutorsRequest, HeartbeatBatchRequest, HeartbeatRequest, HeartbeatStatus,
    ListExecutorsRequest, WatchExecutorsRequest,
};
use executor_registry::registry::MemoryStore;
use executor_registry::registry::RegistryConfig;
use executor_registry::server::Limits;
use support::*;
use tonic::Code;

fn hb(id: &str) -> HeartbeatRequest {
    HeartbeatRequest {
        executor_id: id.into(),
        ttl_ms: 5_000,
    }
}

#[tokio::test]
async fn registrations_beyond_max_executors_are_refused_until_one_leaves() {
    let config = RegistryConfig {
        max_executors: 3,
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let mut c = server.client().await;
    let ids = [
        register(&mut c, "a", 1).await,
        register(&mut c, "b", 2).await,
        register(&mut c, "c", 3).await,
    ];
    let refused = c.register(register_request("d", 4, &[])).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("--max-executors"),
        "{}",
        refused.message()
    );
    let count = c
        .count_executors(CountExecutorsRequest::default())
        .await
        .unwrap();
    assert_eq!(count.into_inner().count, 3, "nothing half-registered");
    c.deregister(executor_registry::proto::DeregisterRequest {
        executor_id: ids[0].clone(),
    })
    .await
    .unwrap();
    register(&mut c, "d", 4).await;
    server.stop().await;
}

#[tokio::test]
async fn watchers_beyond_the_cap_are_refused_and_a_closed_one_frees_its_slot() {
    let limits = Limits {
        max_watchers: 2,
        ..Limits::default()
    };
    let server =
        TestServer::start_limited(fast_config(), Box::new(MemoryStore::new()), limits).await;
    let mut c = server.client().await;
    let (_, first) = watch(&mut c).await;
    let (_, _second) = watch(&mut c).await;
    let refused = c
        .watch_executors(WatchExecutorsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("--max-watchers 2"),
        "{}",
        refused.message()
    );
    drop(first);
    // The server notices the closed stream shortly after.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match c.watch_executors(WatchExecutorsRequest::default()).await {
            Ok(_) => break,
            Err(s) if s.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(s) => panic!("the slot never came back: {s:?}"),
        }
    }
    server.stop().await;
}

/// With the store stalled, registrations pile up in flight; past the limit
/// other calls are shed at once with UNAVAILABLE, while heartbeats — unary,
/// batch and stream — are still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_sheds_other_calls_but_never_heartbeats() {
    // The store is stalled from the start: every registration stays in flight.
    let (store, gate) = GatedStore::new();
    let limits = Limits {
        max_in_flight: 4,
        ..Limits::default()
    };
    let config = RegistryConfig {
        init_ttl: Duration::from_secs(60),
        ..fast_config()
    };
    let server = TestServer::start_limited(config, Box::new(store), limits).await;
    let mut c = server.client().await;
    let mut stuck = Vec::new();
    for i in 0..4u16 {
        let mut c = c.clone();
        stuck.push(tokio::spawn(async move {
            // The probe below holds a permit while it is in flight: a stuck
            // registration that arrives then is shed itself, and retries.
            loop {
                match c.register(register_request("stuck", 10 + i, &[])).await {
                    Err(s) if s.code() == Code::Unavailable => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(s) => panic!("register: {s:?}"),
                    Ok(r) => break r.into_inner().executor.expect("executor in response").id,
                }
            }
        }));
    }
    // Wait until all four hold a permit: a fifth call is then shed.
    let deadline = Instant::now() + Duration::from_secs(5);
    let shed = loop {
        match c.list_executors(ListExecutorsRequest::default()).await {
            Err(s) => break s,
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Ok(_) => panic!("calls were never shed"),
        }
    };
    assert_eq!(shed.code(), Code::Unavailable);
    assert!(shed.message().contains("overloaded"), "{}", shed.message());
    let started = Instant::now();
    let refused = c
        .register(register_request("more", 99, &[]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "shed at once, not queued"
    );

    // Heartbeats are answered throughout (the id is unknown: nothing could
    // be registered while the store is stalled, but the answer comes).
    let unary = c
        .heartbeat(hb("nobody-0000000000000000"))
        .await
        .unwrap_err();
    assert_eq!(unary.code(), Code::NotFound);
    let batch = c
        .heartbeat_batch(HeartbeatBatchRequest {
            heartbeats: vec![hb("nobody-0000000000000000")],
        })
        .await
        .expect("a batch is never shed")
        .into_inner();
    assert_eq!(
        batch.results[0].status,
        HeartbeatStatus::UnknownExecutor as i32
    );
    let mut stream = c
        .heartbeat_stream(tokio_stream::iter(vec![hb("nobody-0000000000000000")]))
        .await
        .expect("a heartbeat stream is never shed")
        .into_inner();
    let result = stream.message().await.unwrap().expect("one result");
    assert_eq!(result.status, HeartbeatStatus::UnknownExecutor as i32);

    // The store recovers: the four registrations complete, and the registry
    // takes calls again.
    gate.open();
    let mut ids = Vec::new();
    for call in stuck {
        ids.push(call.await.expect("registration completed"));
    }
    for id in &ids {
        c.heartbeat(hb(id))
            .await
            .expect("registered executors heartbeat");
    }
    let list = c
        .list_executors(ListExecutorsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.executors.len(), 4);
    server.stop().await;
}

/// A client's deadline is honoured: a registration stuck behind a stalled
/// store ends when the client's deadline passes, not when the store answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_deadline_ends_the_call_when_it_passes() {
    let (store, gate) = GatedStore::new();
    let server = TestServer::start_with_store(fast_config(), Box::new(store)).await;
    let mut c = server.client().await;
    let mut request = tonic::Request::new(register_request("late", 1, &[]));
    request.set_timeout(Duration::from_millis(200));
    let started = Instant::now();
    let status = c.register(request).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert!(took < Duration::from_secs(3), "ended after {took:?}");
    gate.open();
    // The registry is fine afterwards.
    register(&mut c, "after", 2).await;
    server.stop().await;
}
