//! The verifying watch against a real registry behind a proxy that can cut
//! and refuse connections: it gathers a snapshot's chunks into one, resumes
//! from the registry's history after a broken connection (no snapshot, no
//! event missed), and takes a new snapshot when the history no longer holds
//! what it missed — counting the two apart.

#[path = "../../tests/proxy/mod.rs"]
mod proxy;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use executor_registry::proto::{ExecutorEvent, RegisterRequest};
use executor_registry::registry::{Registry, RegistryConfig};
use executor_registry::server;
use loadtest::client::{self, Client};
use loadtest::watch::{self, Observer, Seen};
use proxy::Proxy;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the watch handed on.
#[derive(Default)]
struct Log {
    /// (revision, executors, first) of each snapshot.
    snapshots: Vec<(u64, usize, bool)>,
    events: Vec<ExecutorEvent>,
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Log>>);

impl Observer for Recorder {
    fn seen(&mut self, seen: Seen<'_>) {
        let mut log = self.0.lock().unwrap();
        match seen {
            Seen::Snapshot {
                snapshot, first, ..
            } => {
                assert!(!snapshot.more, "a whole snapshot");
                log.snapshots
                    .push((snapshot.revision, snapshot.executors.len(), first));
            }
            Seen::Event(event) => log.events.push(event.clone()),
        }
    }
}

async fn register(client: &mut Client, i: usize) {
    let value = "v".repeat(60);
    let request = RegisterRequest {
        name: "w".into(),
        address: format!("127.0.0.1:{}", 1000 + i),
        labels: (0..8)
            .map(|l| (format!("label{l}"), value.clone()))
            .collect(),
    };
    client::register(client, request).await.expect("register");
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not within 10 s: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_gathers_chunks_resumes_after_a_break_and_resnapshots_after_a_long_one() {
    let config = RegistryConfig {
        watch_history: 16,
        init_ttl: Duration::from_secs(60),
        ..RegistryConfig::default()
    };
    let (registry, task) = Registry::start_in_memory(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(server::serve(
        listener,
        registry.clone(),
        shutdown.clone().cancelled_owned(),
        Duration::from_secs(5),
    ));
    let proxy = Proxy::start(addr).await;
    let mut c = client::connect(&format!("http://{addr}"), 1)
        .await
        .expect("connect")
        .pop()
        .expect("a client");
    // About 400 KB of executors: a snapshot in more than one chunk.
    for i in 0..600 {
        register(&mut c, i).await;
    }
    let watch_client = client::connect(&proxy.endpoint(), 1)
        .await
        .expect("connect through the proxy")
        .pop()
        .expect("a client");
    let log = Recorder::default();
    let stop = CancellationToken::new();
    let watching = watch::start(watch_client, stop.clone(), log.clone())
        .await
        .expect("first snapshot");
    let start = registry.snapshot().revision();
    assert_eq!(log.0.lock().unwrap().snapshots, vec![(start, 600, true)]);

    // A break shorter than the history: resumed, every event seen once.
    proxy.cut().await;
    for i in 600..605 {
        register(&mut c, i).await;
    }
    eventually("the five events", || {
        log.0.lock().unwrap().events.len() == 5
    })
    .await;

    // Out of reach for more changes than the history holds: a new snapshot.
    proxy.down().await;
    for i in 605..630 {
        register(&mut c, i).await;
    }
    proxy.up();
    let end = registry.snapshot().revision();
    eventually("the new snapshot", || {
        log.0.lock().unwrap().snapshots.len() == 2
    })
    .await;
    register(&mut c, 630).await;
    eventually("the event after it", || {
        log.0.lock().unwrap().events.len() == 6
    })
    .await;

    stop.cancel();
    let (counts, _) = watching.await.expect("watch task");
    let (revisions, snapshots) = {
        let log = log.0.lock().unwrap();
        let revisions: Vec<u64> = log.events.iter().map(|e| e.revision).collect();
        (revisions, log.snapshots.clone())
    };
    let mut expected: Vec<u64> = (start + 1..=start + 5).collect();
    expected.push(end + 1);
    assert_eq!(revisions, expected, "events in order, none twice");
    assert_eq!(snapshots[1], (end, 630, false));
    assert_eq!(
        (counts.rewatches, counts.resumes, counts.resnapshots),
        (2, 1, 1),
        "{counts:?}"
    );
    assert_eq!((counts.lagged, counts.gaps), (0, 0), "{counts:?}");

    shutdown.cancel();
    served.await.expect("server task").expect("server ran");
    task.stop().await;
}
