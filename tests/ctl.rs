//! `executor-registry ctl`, the real binary, against a real registry served
//! in-process: the output of every subcommand, tables and JSON, and the exit
//! codes scripts rely on; `list` through every page, `watch` through a lag,
//! a broken connection and a restart.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "tests on real time wait and measure on the real clock"
)]

mod proxy;
mod support;

use std::collections::BTreeSet;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use executor_registry::proto::{self, DeregisterRequest, HeartbeatRequest};
use executor_registry::registry::RegistryConfig;
use proxy::Proxy;
use serde_json::Value;
use support::process::ctl;
use support::{SharedStore, TestServer, fast_config, register, register_large, register_request};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

const BIN: &str = env!("CARGO_BIN_EXE_executor-registry");

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).expect("utf-8 stderr")
}

fn ok(out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        stdout(out),
        stderr(out)
    );
    stdout(out)
}

/// Three executors: `a` RUNNING with two labels, `b` and `c` INITING.
struct Fleet {
    server: TestServer,
    a: String,
    b: String,
    c: String,
}

async fn fleet() -> Fleet {
    let server = TestServer::start(support::fast_config()).await;
    let mut c = server.client().await;
    let register_with = |name: &'static str, port: u16, labels: &'static [(&str, &str)]| {
        let mut c = c.clone();
        async move {
            c.register(register_request(name, port, labels))
                .await
                .unwrap()
                .into_inner()
                .executor
                .unwrap()
                .id
        }
    };
    let a = register_with("a", 7001, &[("zone", "a"), ("gpu", "a100")]).await;
    let b = register_with("b", 7002, &[("zone", "b")]).await;
    let cc = register_with("c", 7003, &[]).await;
    c.heartbeat(HeartbeatRequest {
        executor_id: a.clone(),
        ttl_ms: 30_000,
    })
    .await
    .unwrap();
    Fleet {
        server,
        a,
        b,
        c: cc,
    }
}

/// Ids in the first column of a table's rows.
fn ids(table: &str) -> Vec<String> {
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_prints_an_aligned_table_that_status_and_selectors_filter() {
    let f = fleet().await;
    let e = f.server.endpoint();
    let table = ok(&ctl(&e, &["list"]).await);
    let lines: Vec<&str> = table.lines().collect();
    let header = lines[0];
    let columns = [
        "ID",
        "NAME",
        "ADDRESS",
        "STATUS",
        "LAST HEARTBEAT",
        "TTL",
        "LABELS",
    ];
    let mut at = 0;
    for column in columns {
        let found = header[at..].find(column).expect(column) + at;
        at = found + column.len();
        for row in &lines[1..] {
            assert_ne!(row.as_bytes()[found], b' ', "{column} aligned in {row:?}");
            if found > 0 {
                assert_eq!(
                    row.as_bytes()[found - 1],
                    b' ',
                    "{column} aligned in {row:?}"
                );
            }
        }
    }
    let mut sorted = vec![f.a.clone(), f.b.clone(), f.c.clone()];
    sorted.sort();
    assert_eq!(ids(&table), sorted, "every live executor, by id");
    let row = |id: &str| {
        *lines
            .iter()
            .find(|l| l.starts_with(id))
            .expect("row for id")
    };
    let a = row(&f.a);
    assert!(a.contains(" a ") && a.contains("127.0.0.1:7001"), "{a}");
    assert!(
        a.contains("running") && a.contains(" ago") && a.contains("30s"),
        "{a}"
    );
    assert!(a.ends_with("gpu=a100,zone=a"), "labels sorted: {a}");
    let b = row(&f.b);
    assert!(
        b.contains("initing") && b.contains("never") && b.ends_with("zone=b"),
        "{b}"
    );
    assert!(row(&f.c).ends_with(" -"), "no labels");

    let listed = |args: &'static [&'static str]| {
        let e = e.clone();
        async move { ids(&ok(&ctl(&e, args).await)) }
    };
    assert_eq!(
        listed(&["list", "--status", "running"]).await,
        vec![f.a.clone()]
    );
    assert_eq!(
        listed(&["list", "--selector", "zone=a"]).await,
        vec![f.a.clone()]
    );
    assert_eq!(
        listed(&["list", "--selector", "gpu~a1.*"]).await,
        vec![f.a.clone()]
    );
    assert_eq!(
        listed(&["list", "--selector", "gpu~a1"]).await,
        Vec::<String>::new(),
        "whole value"
    );
    let mut not_a = vec![f.b.clone(), f.c.clone()];
    not_a.sort();
    assert_eq!(listed(&["list", "--selector", "zone!=a"]).await, not_a);
    assert_eq!(
        listed(&["list", "--status", "initing", "--selector", "zone=b"]).await,
        vec![f.b.clone()]
    );
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_json_holds_every_executor_with_its_status_and_labels() {
    let f = fleet().await;
    let out = ok(&ctl(&f.server.endpoint(), &["list", "--json"]).await);
    let doc: Value = serde_json::from_str(&out).expect("one JSON document");
    assert_eq!(doc["count"], 3);
    assert_eq!(doc["revision"], f.server.registry.snapshot().revision());
    let executors = doc["executors"].as_array().unwrap();
    assert_eq!(executors.len(), 3);
    let by_id = |id: &str| {
        executors
            .iter()
            .find(|e| e["id"] == id)
            .unwrap_or_else(|| panic!("{id} in {doc}"))
            .clone()
    };
    let a = by_id(&f.a);
    assert_eq!(a["status"], "running");
    assert_eq!(a["name"], "a");
    assert_eq!(a["address"], "127.0.0.1:7001");
    assert_eq!(a["labels"], serde_json::json!({"zone": "a", "gpu": "a100"}));
    assert_eq!(a["ttl_ms"], 30_000);
    assert!(a["last_heartbeat_unix_ms"].as_u64().unwrap() > 0);
    let b = by_id(&f.b);
    assert_eq!(b["status"], "initing");
    assert_eq!(b["labels"], serde_json::json!({"zone": "b"}));
    assert_eq!(b["last_heartbeat_unix_ms"], 0);
    assert_eq!(by_id(&f.c)["labels"], serde_json::json!({}));

    let out = ok(&ctl(
        &f.server.endpoint(),
        &["list", "--json", "--status", "running"],
    )
    .await);
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["count"], 1);
    assert_eq!(doc["executors"][0]["id"], f.a.as_str());
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_shows_one_executor_and_exits_3_for_an_unknown_id() {
    let f = fleet().await;
    let e = f.server.endpoint();
    let table = ok(&ctl(&e, &["get", &f.a]).await);
    assert!(table.starts_with("ID "), "{table}");
    assert_eq!(ids(&table), vec![f.a.clone()]);
    let doc: Value = serde_json::from_str(&ok(&ctl(&e, &["get", &f.b, "--json"]).await)).unwrap();
    assert_eq!(doc["id"], f.b.as_str());
    assert_eq!(doc["status"], "initing");
    assert_eq!(doc["labels"]["zone"], "b");

    let out = ctl(&e, &["get", "ghost-0000000000000000"]).await;
    assert_eq!(out.status.code(), Some(3));
    assert!(out.stdout.is_empty());
    let err = stderr(&out);
    assert!(
        err.starts_with("error: ") && err.contains("ghost-0000000000000000"),
        "{err}"
    );
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_prints_a_number_or_a_json_object() {
    let f = fleet().await;
    let e = f.server.endpoint();
    assert_eq!(ok(&ctl(&e, &["count"]).await), "3\n");
    assert_eq!(ok(&ctl(&e, &["count", "--status", "running"]).await), "1\n");
    assert_eq!(ok(&ctl(&e, &["count", "--status", "initing"]).await), "2\n");
    let doc: Value =
        serde_json::from_str(&ok(
            &ctl(&e, &["count", "--json", "--status", "running"]).await
        ))
        .unwrap();
    assert_eq!(doc, serde_json::json!({"count": 1, "status": "running"}));
    let doc: Value = serde_json::from_str(&ok(&ctl(&e, &["--json", "count"]).await)).unwrap();
    assert_eq!(doc, serde_json::json!({"count": 3, "status": "all"}));
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregister_removes_at_once_and_exits_3_the_second_time() {
    let f = fleet().await;
    let e = f.server.endpoint();
    assert_eq!(
        ok(&ctl(&e, &["deregister", &f.b]).await),
        format!("deregistered {}\n", f.b)
    );
    assert!(f.server.registry.get(&f.b).is_err());
    let again = ctl(&e, &["deregister", &f.b]).await;
    assert_eq!(again.status.code(), Some(3), "{}", stderr(&again));
    let doc: Value =
        serde_json::from_str(&ok(&ctl(&e, &["deregister", &f.c, "--json"]).await)).unwrap();
    assert_eq!(doc["deregistered"], f.c.as_str());
    assert_eq!(f.server.registry.count(None), 1);
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_registry_exits_4_with_one_clear_line() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    for args in [
        &["list"][..],
        &["get", "x"],
        &["count"],
        &["watch"],
        &["deregister", "x"],
    ] {
        let out = ctl(&endpoint, args).await;
        assert_eq!(out.status.code(), Some(4), "{args:?}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with(&format!("error: cannot reach the registry at {endpoint}: ")),
            "{err}"
        );
        assert!(err.contains("connection refused"), "{err}");
        assert!(out.stdout.is_empty());
    }
    // The endpoint also comes from the environment (here without a scheme).
    let out = Command::new(BIN)
        .args(["ctl", "count"])
        .env("EXECUTOR_REGISTRY_ENDPOINT", format!("127.0.0.1:{port}"))
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(stderr(&out).contains(&endpoint));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2_and_help_documents_the_exit_codes() {
    let server = TestServer::start(fast_config()).await;
    let e = server.endpoint();
    for args in [
        &["list", "--selector", "zone"][..],
        &["list", "--selector", "bad_key=x"],
        &["list", "--selector", "gpu~("],
        &["list", "--status", "tombstone"],
        &["get"],
        &["frobnicate"],
    ] {
        let out = ctl(&e, args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
    let help = ok(&ctl(&e, &["--help"]).await);
    for line in [
        "Exit codes:",
        "0  success",
        "1  any other error",
        "2  usage",
        "3  not found",
        "4  the registry is unreachable",
    ] {
        assert!(help.contains(line), "{line:?} in {help}");
    }
    assert!(ok(&ctl(&e, &["list", "--help"]).await).contains("3  not found"));
    server.stop().await;
}

/// A running `ctl watch`, killed on drop.
struct Watcher {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// Its stderr by lines, once [`Watcher::note`] was called.
    notes: Option<Lines<BufReader<ChildStderr>>>,
}

impl Watcher {
    fn spawn(endpoint: &str, json: bool) -> Self {
        Self::spawn_with(endpoint, if json { &["--json"] } else { &[] })
    }

    /// `ctl --endpoint <endpoint> watch <args…>`.
    fn spawn_with(endpoint: &str, args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(["ctl", "--endpoint", endpoint, "watch"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn ctl watch");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self {
            child,
            lines,
            notes: None,
        }
    }

    async fn line(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(10), self.lines.next_line())
            .await
            .expect("a line within 10 s")
            .expect("read stdout")
            .expect("stdout open")
    }

    /// The next line on stderr.
    async fn note(&mut self) -> String {
        let child = &mut self.child;
        let notes = self
            .notes
            .get_or_insert_with(|| BufReader::new(child.stderr.take().unwrap()).lines());
        tokio::time::timeout(Duration::from_secs(10), notes.next_line())
            .await
            .expect("a line on stderr within 10 s")
            .expect("read stderr")
            .expect("stderr open")
    }

    async fn json(&mut self) -> Value {
        let line = self.line().await;
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_json_prints_the_snapshot_then_one_object_per_event() {
    let server = TestServer::start(fast_config()).await;
    let mut c = server.client().await;
    let before = register(&mut c, "before", 7000).await;
    let mut watcher = Watcher::spawn(&server.endpoint(), true);
    let snapshot = watcher.json().await;
    assert_eq!(snapshot["type"], "snapshot");
    assert_eq!(snapshot["executors"][0]["id"], before.as_str());
    assert_eq!(snapshot["executors"][0]["status"], "initing");
    let revision = snapshot["revision"].as_u64().unwrap();

    let came = c
        .register(register_request("came", 7001, &[("zone", "a")]))
        .await
        .unwrap()
        .into_inner()
        .executor
        .unwrap()
        .id;
    let online = watcher.json().await;
    assert_eq!(online["type"], "online");
    assert_eq!(online["id"], came.as_str());
    assert_eq!(online["address"], "127.0.0.1:7001");
    assert_eq!(online["labels"], serde_json::json!({"zone": "a"}));
    assert_eq!(online["revision"], revision + 1);
    assert!(online.get("reason").is_none());

    c.deregister(DeregisterRequest {
        executor_id: came.clone(),
    })
    .await
    .unwrap();
    let offline = watcher.json().await;
    assert_eq!(offline["type"], "offline");
    assert_eq!(offline["id"], came.as_str());
    assert_eq!(offline["reason"], "deregistered");
    assert_eq!(offline["revision"], revision + 2);

    c.heartbeat(HeartbeatRequest {
        executor_id: before.clone(),
        ttl_ms: 100,
    })
    .await
    .unwrap();
    // Its first heartbeat is an event too.
    let running = watcher.json().await;
    assert_eq!(running["type"], "running");
    assert_eq!(running["status"], "running");
    assert_eq!(running["id"], before.as_str());
    assert_eq!(running["revision"], revision + 3);
    let expired = watcher.json().await;
    assert_eq!(expired["id"], before.as_str());
    assert_eq!(expired["reason"], "expired");
    assert_eq!(expired["status"], "tombstone");

    watcher.child.kill().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_readable_lines_and_exits_4_when_the_registry_goes_away() {
    let server = TestServer::start(fast_config()).await;
    let mut c = server.client().await;
    // It tries to watch again for --timeout before it gives up.
    let mut watcher = Watcher::spawn_with(&server.endpoint(), &["--timeout", "2s"]);
    assert_eq!(watcher.line().await, "SNAPSHOT revision=0 executors=0");
    let id = c
        .register(register_request("w", 7001, &[("zone", "a")]))
        .await
        .unwrap()
        .into_inner()
        .executor
        .unwrap()
        .id;
    assert_eq!(
        watcher.line().await,
        format!("ONLINE revision=1 id={id} address=127.0.0.1:7001 labels=zone=a")
    );
    c.deregister(DeregisterRequest {
        executor_id: id.clone(),
    })
    .await
    .unwrap();
    assert_eq!(
        watcher.line().await,
        format!("OFFLINE revision=2 id={id} address=127.0.0.1:7001 reason=deregistered")
    );

    server.stop().await;
    let status = tokio::time::timeout(Duration::from_secs(10), watcher.child.wait())
        .await
        .expect("ctl watch ends with the registry")
        .unwrap();
    assert_eq!(status.code(), Some(4));
    let mut err = String::new();
    tokio::io::AsyncReadExt::read_to_string(watcher.child.stderr.as_mut().unwrap(), &mut err)
        .await
        .unwrap();
    assert!(
        err.starts_with("error: the registry at ") && err.contains("unavailable"),
        "{err}"
    );
}

/// Labels of a large executor: events of about 2.5 KB, so a stalled
/// watcher's 2 MiB HTTP/2 window fills after some 800.
const LARGE_LABELS: usize = 32;

/// The revision in a `KIND revision=N …` line.
fn revision_of(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix("revision="))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no revision in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_through_every_page_and_stops_at_the_limit() {
    let server = TestServer::start(fast_config()).await;
    let e = server.endpoint();
    let mut c = server.client().await;
    let mut all = Vec::new();
    for i in 0..25 {
        let id = register(&mut c, "w", 7000 + i).await;
        if i % 5 == 0 {
            c.heartbeat(HeartbeatRequest {
                executor_id: id.clone(),
                ttl_ms: 30_000,
            })
            .await
            .unwrap();
        }
        all.push(id);
    }
    all.sort();
    let revision = server.registry.snapshot().revision();
    let json = |args: &'static [&'static str]| {
        let e = e.clone();
        async move {
            let out = ok(&ctl(&e, args).await);
            serde_json::from_str::<Value>(&out).unwrap_or_else(|err| panic!("{err}: {out}"))
        }
    };
    let ids_of = |doc: &Value| -> Vec<String> {
        doc["executors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect()
    };

    let out = ctl(&e, &["list", "--page-size", "4"]).await;
    assert_eq!(ids(&ok(&out)), all, "every page, in id order");
    assert_eq!(
        stderr(&out),
        format!("revision {revision}: 25 executors\n"),
        "the listing's revision, for people"
    );
    let doc = json(&["list", "--json", "--page-size", "4"]).await;
    assert_eq!(ids_of(&doc), all);
    assert_eq!(doc["count"], 25);
    assert_eq!(doc["revision"], revision);
    assert_eq!(doc["pages"], 7);
    assert_eq!(doc["truncated"], false);
    // The registry's default page size: one page.
    let doc = json(&["list", "--json"]).await;
    assert_eq!(
        (doc["pages"].as_u64(), doc["count"].as_u64()),
        (Some(1), Some(25))
    );

    let out = ctl(&e, &["list", "--limit", "10", "--page-size", "4"]).await;
    assert_eq!(ids(&ok(&out)), all[..10]);
    assert_eq!(
        stderr(&out),
        format!("revision {revision}: the first 10 executors (--limit)\n")
    );
    let doc = json(&["list", "--json", "--limit", "10", "--page-size", "4"]).await;
    assert_eq!(ids_of(&doc), all[..10]);
    assert_eq!(
        (doc["pages"].as_u64(), doc["truncated"].as_bool()),
        (Some(3), Some(true))
    );
    let doc = json(&["list", "--json", "--limit", "25", "--page-size", "5"]).await;
    assert_eq!(ids_of(&doc), all);
    assert_eq!(doc["truncated"], false, "exactly the limit, nothing more");
    let doc = json(&["list", "--json", "--limit", "3"]).await;
    assert_eq!(ids_of(&doc), all[..3]);
    assert_eq!(doc["truncated"], true);
    let doc = json(&["list", "--json", "--limit", "40", "--page-size", "7"]).await;
    assert_eq!(ids_of(&doc), all);
    assert_eq!(doc["truncated"], false);
    let doc = json(&["list", "--json", "--status", "running", "--page-size", "2"]).await;
    assert_eq!(doc["count"], 5);
    assert_eq!(doc["pages"], 3);
    assert!(
        doc["executors"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["status"] == "running")
    );

    for args in [
        &["list", "--limit", "0"][..],
        &["list", "--page-size", "0"],
        &["list", "--page-size", "10001"],
        &["list", "--limit", "many"],
    ] {
        let out = ctl(&e, args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_come_from_one_revision_while_the_fleet_changes() {
    let server = TestServer::start(fast_config()).await;
    let mut c = server.client().await;
    for i in 0..30 {
        register(&mut c, "w", 7000 + i).await;
    }
    let (snapshot, mut events) = support::watch(&mut c).await;
    let mut members: BTreeSet<String> = snapshot.executors.into_iter().map(|e| e.id).collect();

    // Registrations and deregistrations between every two pages, the first
    // answered (so visible) before the listing starts.
    let churning = Arc::new(AtomicBool::new(true));
    let (first_landed, landed) = tokio::sync::oneshot::channel();
    let churn = {
        let (churning, mut c) = (churning.clone(), server.client().await);
        tokio::spawn(async move {
            let mut i = 0;
            let mut first_landed = Some(first_landed);
            while churning.load(Ordering::SeqCst) {
                let id = register(&mut c, "churn", 8000 + i % 1000).await;
                if let Some(first) = first_landed.take() {
                    let _ = first.send(());
                }
                if i % 2 == 0 {
                    c.deregister(DeregisterRequest { executor_id: id })
                        .await
                        .unwrap();
                }
                i += 1;
            }
        })
    };
    landed.await.expect("the churn registered one");
    let out = ok(&ctl(&server.endpoint(), &["list", "--json", "--page-size", "1"]).await);
    churning.store(false, Ordering::SeqCst);
    churn.await.unwrap();
    let doc: Value = serde_json::from_str(&out).unwrap();
    let revision = doc["revision"].as_u64().unwrap();
    let listed: Vec<String> = doc["executors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(doc["pages"].as_u64().unwrap() >= 30);
    assert!(
        revision > snapshot.revision,
        "the fleet changed meanwhile (revision {revision})"
    );

    // The live set at the listing's revision, from the watch.
    let mut at = snapshot.revision;
    while at < revision {
        let event = support::next_event(&mut events).await;
        assert_eq!(event.revision, at + 1);
        at = event.revision;
        if event.r#type == proto::EventType::Offline as i32 {
            members.remove(&event.executor_id);
        } else {
            members.insert(event.executor_id);
        }
    }
    assert_eq!(
        listed,
        members.into_iter().collect::<Vec<_>>(),
        "each executor live at revision {revision} exactly once, in id order"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_takes_a_new_snapshot_after_falling_behind_and_says_so() {
    let server = TestServer::start(RegistryConfig {
        watch_history: 64,
        init_ttl: Duration::from_secs(60),
        ..fast_config()
    })
    .await;
    let mut watcher = Watcher::spawn(&server.endpoint(), false);
    let start = revision_of(&watcher.line().await);

    // The test stops reading: ctl blocks on its stdout, stops reading its
    // stream, and the registry moves on past its 64-event history.
    let mut tasks = Vec::new();
    for t in 0..4u16 {
        let mut c = server.client().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..300u16 {
                register_large(&mut c, "burst", 1000 + t * 1000 + i, LARGE_LABELS).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let end = server.registry.snapshot().revision();
    assert_eq!(end, start + 1_200);

    // What it printed before it fell behind: consecutive events.
    let mut expected = start + 1;
    let snapshot = loop {
        let line = watcher.line().await;
        if line.starts_with("SNAPSHOT ") {
            break line;
        }
        assert!(line.starts_with("ONLINE "), "{line}");
        assert_eq!(revision_of(&line), expected, "no gap before the end");
        expected += 1;
    };
    let last = expected - 1;
    assert!(last < end, "it did fall behind");
    assert_eq!(snapshot, format!("SNAPSHOT revision={end} executors=1200"));
    let note = watcher.note().await;
    assert!(
        note.starts_with("watch: the watch fell behind the registry's watch history")
            && note.contains(&format!(
                "watched again from revision {last}: the registry no longer holds the events \
                 after it, new snapshot at revision {end}"
            )),
        "{note}"
    );
    assert!(
        watcher.line().await.starts_with("ID "),
        "the snapshot's table"
    );
    for _ in 0..1_200 {
        watcher.line().await;
    }
    let mut c = server.client().await;
    let id = register(&mut c, "after", 7).await;
    let line = watcher.line().await;
    assert!(
        line.starts_with(&format!("ONLINE revision={} id={id} ", end + 1)),
        "{line}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_after_its_connection_breaks_and_says_so() {
    let server = TestServer::start(RegistryConfig {
        watch_history: 64,
        init_ttl: Duration::from_secs(60),
        ..fast_config()
    })
    .await;
    let proxy = Proxy::start(server.addr).await;
    let mut c = server.client().await;
    let mut watcher = Watcher::spawn(&proxy.endpoint(), false);
    assert_eq!(watcher.line().await, "SNAPSHOT revision=0 executors=0");
    let a = register(&mut c, "a", 7001).await;
    assert!(watcher.line().await.starts_with("ONLINE revision=1 "));

    proxy.cut().await;
    let b = register(&mut c, "b", 7002).await;
    c.heartbeat(HeartbeatRequest {
        executor_id: a.clone(),
        ttl_ms: 30_000,
    })
    .await
    .unwrap();
    let note = watcher.note().await;
    assert!(
        note.starts_with("watch: ")
            && note.ends_with("; watched again from revision 1: resumed, no event missed"),
        "{note}"
    );
    assert_eq!(
        watcher.line().await,
        format!("ONLINE revision=2 id={b} address=127.0.0.1:7002 labels=-")
    );
    assert_eq!(
        watcher.line().await,
        format!("RUNNING revision=3 id={a} address=127.0.0.1:7001 labels=-")
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_carries_on_across_a_registry_restart_with_a_new_snapshot() {
    let store = SharedStore::default();
    let server = TestServer::start_with_store(fast_config(), Box::new(store.clone())).await;
    let addr = server.addr;
    let mut c = server.client().await;
    let mut watcher = Watcher::spawn(&server.endpoint(), true);
    let first = watcher.json().await;
    assert_eq!(first["type"], "snapshot");
    let a = register(&mut c, "a", 7001).await;
    let online = watcher.json().await;
    assert_eq!(online["id"], a.as_str());
    let before = online["revision"].as_u64().unwrap();

    server.stop().await;
    let server = TestServer::start_on(addr, fast_config(), Box::new(store.clone())).await;
    let snapshot = watcher.json().await;
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    let revision = snapshot["revision"].as_u64().unwrap();
    assert!(revision > before, "revisions go on across the restart");
    assert_eq!(snapshot["executors"][0]["id"], a.as_str());
    assert_eq!(snapshot["executors"][0]["status"], "initing", "reloaded");
    let note = watcher.note().await;
    assert!(
        note.starts_with("watch: the registry at ")
            && note.contains(&format!(
                "watched again from revision {before}: the registry no longer holds the events \
                 after it, new snapshot at revision {revision}"
            )),
        "{note}"
    );
    let mut c = server.client().await;
    let b = register(&mut c, "b", 7002).await;
    let online = watcher.json().await;
    assert_eq!(online["id"], b.as_str());
    assert_eq!(online["revision"], revision + 1);
    server.stop().await;
}
