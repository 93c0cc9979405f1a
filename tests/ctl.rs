//! `executor-registry ctl`, the real binary, against a real registry served
//! in-process: the output of every subcommand, tables and JSON, and the exit
//! codes scripts rely on.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "tests on real time wait and measure on the real clock"
)]

mod support;

use std::process::{Output, Stdio};
use std::time::Duration;

use executor_registry::proto::{DeregisterRequest, HeartbeatRequest};
use serde_json::Value;
use support::process::ctl;
use support::{TestServer, fast_config, register, register_request};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

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
}

impl Watcher {
    fn spawn(endpoint: &str, json: bool) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args(["ctl", "--endpoint", endpoint, "watch"]);
        if json {
            cmd.arg("--json");
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn ctl watch");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self { child, lines }
    }

    async fn line(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(10), self.lines.next_line())
            .await
            .expect("a line within 10 s")
            .expect("read stdout")
            .expect("stdout open")
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
    let mut watcher = Watcher::spawn(&server.endpoint(), false);
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
