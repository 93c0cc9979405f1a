//! The read side at scale over gRPC, with a client at gRPC's default
//! message limits (4 MiB): paged listings, chunked snapshots, RUNNING
//! events, resumes from the history, and page tokens.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "tests on real time wait and measure on the real clock"
)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use executor_registry::proto::watch_executors_response::Kind;
use executor_registry::proto::{
    DeregisterRequest, EventType, ExecutorStatus, HeartbeatBatchRequest, HeartbeatRequest,
    ListExecutorsRequest, RegisterRequest, WatchExecutorsRequest,
};
use executor_registry::registry::RegistryConfig;
use support::*;
use tonic::Code;

/// Six labels with 40-byte values: about 350 bytes an executor on the wire.
fn six_labels(i: usize) -> std::collections::HashMap<String, String> {
    (0..6)
        .map(|k| (format!("label-{k}"), format!("{:0>40}", i * 6 + k)))
        .collect()
}

async fn register_fleet(server: &TestServer, n: usize) -> Vec<String> {
    let mut tasks = tokio::task::JoinSet::new();
    for part in 0..8 {
        let mut c = server.client().await;
        tasks.spawn(async move {
            let mut ids = Vec::new();
            for i in (part..n).step_by(8) {
                let request = RegisterRequest {
                    name: "big".into(),
                    address: format!("10.{}.{}.{}:9000", i >> 16, (i >> 8) & 255, i & 255),
                    labels: six_labels(i),
                };
                ids.push(
                    c.register(request)
                        .await
                        .expect("register")
                        .into_inner()
                        .executor
                        .expect("executor")
                        .id,
                );
            }
            ids
        });
    }
    let mut ids = Vec::with_capacity(n);
    while let Some(part) = tasks.join_next().await {
        ids.extend(part.expect("register task"));
    }
    ids
}

/// 20,000 executors with six 40-byte labels (a single list of them is over
/// 6 MB): every page of a listing fits the default limit and is at the
/// first page's revision while registrations and deregistrations go on,
/// and together the pages hold every id once; the watch snapshot comes in
/// chunks that together hold every id, then events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_big_executors_list_in_pages_and_watch_in_chunks_at_default_limits() {
    const N: usize = 20_000;
    // Nothing expires while the test runs.
    let config = RegistryConfig {
        init_ttl: Duration::from_secs(600),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let ids = register_fleet(&server, N).await;
    let mut c = server.client().await;

    // Churn all the while: registrations and deregistrations.
    let churn = tokio::spawn({
        let mut c = server.client().await;
        let victims = ids[..500].to_vec();
        async move {
            for (i, victim) in victims.into_iter().enumerate() {
                let request = RegisterRequest {
                    name: "churn".into(),
                    address: format!("10.200.0.{}:1", i % 250),
                    labels: six_labels(i),
                };
                c.register(request).await.expect("register");
                c.deregister(DeregisterRequest {
                    executor_id: victim,
                })
                .await
                .expect("deregister");
            }
        }
    });

    let mut request = ListExecutorsRequest::default();
    let mut listed = Vec::new();
    let mut pages = 0;
    let mut revision = None;
    loop {
        let page = c
            .list_executors(request.clone())
            .await
            .expect("a page within 4 MiB")
            .into_inner();
        pages += 1;
        assert!(page.executors.len() <= 1_000, "page_size 0 means 1,000");
        assert_eq!(
            *revision.get_or_insert(page.revision),
            page.revision,
            "page {pages}"
        );
        listed.extend(page.executors.into_iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    let unique: BTreeSet<&String> = listed.iter().collect();
    assert_eq!(unique.len(), listed.len(), "every id once");
    assert!(listed.windows(2).all(|w| w[0] < w[1]), "sorted by id");
    assert!(listed.len() >= N, "{} listed", listed.len());
    assert!(pages >= 20, "{pages} pages");

    // The watch: chunks of one revision, all but the last with more.
    let mut stream = c
        .watch_executors(WatchExecutorsRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let mut chunks = 0;
    let mut snapshot_ids = BTreeSet::new();
    let snapshot_revision = loop {
        let message = stream
            .message()
            .await
            .expect("a chunk within 4 MiB")
            .expect("not ended");
        let Some(Kind::Snapshot(chunk)) = message.kind else {
            panic!("the snapshot comes first, whole, got {message:?}");
        };
        chunks += 1;
        snapshot_ids.extend(chunk.executors.into_iter().map(|e| e.id));
        if !chunk.more {
            break chunk.revision;
        }
    };
    assert!(chunks > 1, "{chunks} chunks");
    churn.await.expect("churn");
    let now = server.registry.snapshot();
    assert!(
        now.revision() > snapshot_revision,
        "churn went on after the snapshot"
    );
    // The snapshot plus the events after it is the fleet now.
    let mut view = snapshot_ids;
    let mut expected = snapshot_revision + 1;
    while expected <= now.revision() {
        let message = stream.message().await.expect("event").expect("not ended");
        let Some(Kind::Event(event)) = message.kind else {
            panic!("events after the snapshot, got {message:?}");
        };
        assert_eq!(event.revision, expected, "consecutive");
        expected += 1;
        match EventType::try_from(event.r#type).expect("a type") {
            EventType::Online => assert!(view.insert(event.executor_id)),
            EventType::Offline => assert!(view.remove(&event.executor_id)),
            other => panic!("unexpected {other:?}"),
        }
    }
    let fleet: BTreeSet<String> = now.iter().map(|(e, _)| e.id().to_string()).collect();
    assert_eq!(view, fleet);
    server.stop().await;
}

/// Register → ONLINE (INITING); first heartbeat → RUNNING (RUNNING) at the
/// next revision; later heartbeats → nothing; expiry → OFFLINE (TOMBSTONE).
/// And `ListExecutors(status=RUNNING)` at revision R agrees with the
/// snapshot plus the events up to R.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_travel_in_events_and_a_running_list_agrees_with_snapshot_plus_events() {
    let server = TestServer::start(fast_config()).await;
    let mut c = server.client().await;
    let mut before = Vec::new();
    for port in 1..=20 {
        before.push(register(&mut c, "b", 9000 + port).await);
    }
    for id in before.iter().step_by(2) {
        c.heartbeat(hb(id, 30_000)).await.expect("heartbeat");
    }
    let (snapshot, mut stream) = watch(&mut c).await;
    let id = register(&mut c, "w", 7001).await;
    let event = next_event(&mut stream).await;
    let mut view: BTreeMap<String, i32> = snapshot
        .executors
        .iter()
        .map(|e| (e.id.clone(), e.status))
        .collect();
    // Events of the RUNNING heartbeats above may come first.
    let mut apply =
        |event: &executor_registry::proto::ExecutorEvent| match EventType::try_from(event.r#type)
            .expect("type")
        {
            EventType::Online => assert!(
                view.insert(event.executor_id.clone(), event.status)
                    .is_none()
            ),
            EventType::Running => assert_eq!(
                view.insert(event.executor_id.clone(), event.status),
                Some(ExecutorStatus::Initing as i32)
            ),
            EventType::Offline => assert!(view.remove(&event.executor_id).is_some()),
            EventType::Unspecified => panic!("unspecified"),
        };
    let mut event = event;
    while event.executor_id != id {
        apply(&event);
        event = next_event(&mut stream).await;
    }
    let online = event;
    assert_eq!(
        (online.r#type, online.status),
        (EventType::Online as i32, ExecutorStatus::Initing as i32)
    );
    apply(&online);

    c.heartbeat(hb(&id, 300)).await.expect("first");
    let running = next_event(&mut stream).await;
    assert_eq!(
        (
            running.r#type,
            running.status,
            running.executor_id.as_str(),
            running.revision
        ),
        (
            EventType::Running as i32,
            ExecutorStatus::Running as i32,
            id.as_str(),
            online.revision + 1
        )
    );
    apply(&running);
    // RUNNING at R: the list agrees with snapshot + events up to R.
    let (listed, revision) = list_all(
        &mut c,
        ListExecutorsRequest {
            status: ExecutorStatus::Running as i32,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(revision, running.revision);
    let running_ids: BTreeSet<String> = listed.iter().map(|e| e.id.clone()).collect();
    let view_running: BTreeSet<String> = view
        .iter()
        .filter(|(_, s)| **s == ExecutorStatus::Running as i32)
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(running_ids, view_running);
    assert!(
        listed
            .iter()
            .all(|e| e.status == ExecutorStatus::Running as i32)
    );

    // Later heartbeats are no events; silence is OFFLINE, TOMBSTONE.
    for _ in 0..3 {
        c.heartbeat(hb(&id, 300)).await.expect("later");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let offline = next_event(&mut stream).await;
    assert_eq!(
        (
            offline.r#type,
            offline.status,
            offline.executor_id.as_str(),
            offline.revision
        ),
        (
            EventType::Offline as i32,
            ExecutorStatus::Tombstone as i32,
            id.as_str(),
            running.revision + 1
        )
    );
    server.stop().await;
}

/// Watch, note R, cancel, make 1,000 changes, watch from R: the first
/// message is the event R + 1 and the rest follow consecutively. With a
/// history of 64 events, the same resume starts with a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_from_its_revision_and_takes_a_snapshot_once_the_history_is_past_it() {
    for history in [262_144, 64] {
        let config = RegistryConfig {
            watch_history: history,
            ..fast_config()
        };
        let server = TestServer::start(config).await;
        let mut c = server.client().await;
        register(&mut c, "first", 1).await;
        let (snapshot, stream) = watch(&mut c).await;
        let r = snapshot.revision;
        drop(stream);
        let mut ids = Vec::new();
        for port in 1..=500 {
            ids.push(register(&mut c, "change", port).await);
        }
        let heartbeats = HeartbeatBatchRequest {
            heartbeats: ids.iter().map(|id| hb(id, 30_000)).collect(),
        };
        c.heartbeat_batch(heartbeats).await.expect("batch");
        eventually(
            Duration::from_secs(5),
            "the 1,000 changes are published",
            || {
                let revision = server.registry.snapshot().revision();
                async move { revision == r + 1_000 }
            },
        )
        .await;

        let mut stream = c
            .watch_executors(WatchExecutorsRequest { start_revision: r })
            .await
            .expect("watch")
            .into_inner();
        let first = stream.message().await.expect("message").expect("not ended");
        match (history, first.kind) {
            (64, Some(Kind::Snapshot(snapshot))) => {
                assert_eq!(snapshot.revision, r + 1_000, "a fresh snapshot");
            }
            (262_144, Some(Kind::Event(event))) => {
                assert_eq!(event.revision, r + 1, "resumed at R + 1");
                for expected in r + 2..=r + 1_000 {
                    let event = next_event(&mut stream).await;
                    assert_eq!(event.revision, expected, "consecutive");
                }
            }
            (history, other) => panic!("history {history}: {other:?}"),
        }
        server.stop().await;
    }
}

#[tokio::test]
async fn page_tokens_are_pinned_to_their_filter_and_refused_once_let_go_or_forged() {
    let server = TestServer::start(fast_config()).await;
    let mut c = server.client().await;
    for port in 1..=30 {
        register(&mut c, "p", port).await;
    }
    let first = c
        .list_executors(ListExecutorsRequest {
            page_size: 10,
            ..Default::default()
        })
        .await
        .expect("first page")
        .into_inner();
    assert_eq!(first.executors.len(), 10);
    assert!(!first.next_page_token.is_empty());
    // Another status with this listing's token: INVALID_ARGUMENT.
    let other_filter = c
        .list_executors(ListExecutorsRequest {
            status: ExecutorStatus::Running as i32,
            page_size: 10,
            page_token: first.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .expect_err("another filter");
    assert_eq!(other_filter.code(), Code::InvalidArgument);
    assert!(
        other_filter.message().contains("page_token"),
        "{other_filter:?}"
    );
    // A malformed token: INVALID_ARGUMENT naming page_token.
    let malformed = c
        .list_executors(ListExecutorsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .expect_err("malformed");
    assert_eq!(malformed.code(), Code::InvalidArgument);
    assert!(malformed.message().contains("page_token"), "{malformed:?}");
    // A well-formed token of a snapshot that is not pinned: ABORTED.
    let unpinned =
        first
            .next_page_token
            .replacen(&format!("v1.{:x}.", first.revision), "v1.fffff.", 1);
    let aborted = c
        .list_executors(ListExecutorsRequest {
            page_size: 10,
            page_token: unpinned,
            ..Default::default()
        })
        .await
        .expect_err("unpinned");
    assert_eq!(aborted.code(), Code::Aborted, "{aborted:?}");
    // Changes after the first page do not show in the listing.
    register(&mut c, "late", 99).await;
    let second = c
        .list_executors(ListExecutorsRequest {
            page_size: 1_000,
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .expect("second page")
        .into_inner();
    assert_eq!(
        (second.revision, second.executors.len()),
        (first.revision, 20)
    );
    assert!(second.next_page_token.is_empty(), "the last page");
    server.stop().await;
}

fn hb(id: &str, ttl_ms: u64) -> HeartbeatRequest {
    HeartbeatRequest {
        executor_id: id.into(),
        ttl_ms,
    }
}
