//! The metrics as an operator sees them, against the real binary:
//!
//! - a scrape after a known sequence of RPCs shows exactly the counts that
//!   sequence implies (no Prometheus needed);
//! - every expression of `dashboards/` names a metric the registry exports,
//!   and the dashboard and rules have the shape operators rely on;
//! - `promtool` accepts the exposition, the rules and the scrape config;
//! - a real Prometheus, scraping a real registry with `dashboards/alerts.yml`
//!   loaded, returns data for every expression of the dashboard and of the
//!   alert rules.
//!
//! The last two need `prometheus` and `promtool` (Debian package
//! `prometheus`): they are ignored in a bare `cargo test`, and
//! `scripts/test.sh` installs the package and runs them.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "tests on real time wait and measure on the real clock"
)]

mod support;

use support::process::free_addr;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use executor_registry::proto::registry_client::RegistryClient;
use executor_registry::proto::{
    self, DeregisterRequest, EventType, HeartbeatBatchRequest, HeartbeatRequest, HeartbeatStatus,
    OfflineReason, RegisterRequest, WatchExecutorsRequest,
};
use regex::Regex;
use serde_json::Value;
use support::{http_get, next_event, next_message, register, register_request, sample, watch};
use tonic::Code;
use tonic::transport::Channel;
use yaml_rust2::YamlLoader;

const BIN: &str = env!("CARGO_BIN_EXE_executor-registry");
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/dashboards/executor-registry.json"
);
const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/alerts.yml");
const PROMETHEUS_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/prometheus.yml");

/// The scrape job of `dashboards/prometheus.yml`; the alerts select it.
const JOB: &str = "executor-registry";

/// What Grafana's `$__rate_interval` stands for here: at least four scrape
/// intervals (Prometheus scrapes every second in these tests).
const RATE_INTERVAL: &str = "1m";

/// Metrics with no series in a healthy single-process registry, so an
/// expression over them alone cannot return data; each with the reason.
/// Every other expression must.
/// (None today: `registry_auth_denied_total` registers its reasons at 0.)
const KNOWN_EMPTY: &[(&str, &str)] = &[];

/// SPEC §4 metric names with their Prometheus types, spelled out here rather
/// than taken from `src/metrics.rs`: a typo in a constant must fail a test.
const SPEC_METRICS: &[(&str, &str)] = &[
    ("registry_executors", "gauge"),
    ("registry_registrations_total", "counter"),
    ("registry_heartbeats_total", "counter"),
    ("registry_expirations_total", "counter"),
    ("registry_deregistrations_total", "counter"),
    ("registry_expiry_lag_seconds", "histogram"),
    ("registry_events_total", "counter"),
    ("registry_watchers", "gauge"),
    ("registry_watchers_lagged_total", "counter"),
    ("registry_store_operation_seconds", "histogram"),
    ("registry_store_errors_total", "counter"),
    ("registry_revision", "gauge"),
    ("registry_is_leader", "gauge"),
    ("registry_leader_changes_total", "counter"),
    ("registry_auth_denied_total", "counter"),
    ("registry_watch_starts_total", "counter"),
    ("registry_watch_history_events", "gauge"),
    // What watchers' snapshots send and how often the rate paced them,
    // beside SPEC §4.
    ("registry_watch_snapshot_bytes_total", "counter"),
    ("registry_watch_snapshot_paced_total", "counter"),
    // The mass-expiry guard, beside SPEC §4.
    ("registry_expiry_guard_active", "gauge"),
    // What outlives departures is bounded (the soak), beside SPEC §4.
    ("registry_tombstones", "gauge"),
    ("registry_timing_wheel_entries", "gauge"),
    ("process_cpu_seconds_total", "counter"),
    ("process_resident_memory_bytes", "gauge"),
    ("process_virtual_memory_bytes", "gauge"),
    ("process_open_fds", "gauge"),
    ("process_max_fds", "gauge"),
    ("process_start_time_seconds", "gauge"),
    ("process_threads", "gauge"),
];

// ---------------------------------------------------------------------------
// HTTP, by hand: two GET endpoints do not justify an HTTP client dependency.

/// `s` percent-encoded for a URL query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The registry binary.

/// A running `executor-registry serve --store memory`, killed on drop.
struct RegistryProcess {
    child: Child,
    grpc: SocketAddr,
    metrics: SocketAddr,
}

impl RegistryProcess {
    fn start(extra: &[&str]) -> Self {
        let grpc = free_addr();
        let metrics = free_addr();
        let child = Command::new(BIN)
            .args(["serve", "--store", "memory"])
            .args(["--listen", &grpc.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the binary");
        Self {
            child,
            grpc,
            metrics,
        }
    }

    async fn endpoint_connect(&self, endpoint: tonic::transport::Endpoint) -> Channel {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match endpoint.connect().await {
                Ok(channel) => return channel,
                Err(e) if Instant::now() > deadline => panic!("registry never came up: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    fn endpoint(&self) -> tonic::transport::Endpoint {
        Channel::from_shared(format!("http://{}", self.grpc)).expect("valid uri")
    }

    async fn client(&self) -> RegistryClient<Channel> {
        RegistryClient::new(self.endpoint_connect(self.endpoint()).await)
    }

    /// A client with the protocol's default 64 KiB HTTP/2 windows (see
    /// `support::TestServer::small_window_client`): one that stops reading
    /// pushes back on the server after a few hundred events.
    async fn small_window_client(&self) -> RegistryClient<Channel> {
        let endpoint = self
            .endpoint()
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535);
        RegistryClient::new(self.endpoint_connect(endpoint).await)
    }

    /// The Prometheus text on `/metrics`.
    fn scrape(&self) -> String {
        let (status, body) = http_get(self.metrics, "/metrics").expect("scrape /metrics");
        assert_eq!(status, 200, "{body}");
        body
    }
}

impl Drop for RegistryProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn heartbeat(
    client: &mut RegistryClient<Channel>,
    id: &str,
    ttl_ms: u64,
) -> Result<(), tonic::Status> {
    client
        .heartbeat(HeartbeatRequest {
            executor_id: id.into(),
            ttl_ms,
        })
        .await
        .map(drop)
}

// ---------------------------------------------------------------------------
// Exact counts.

/// The scrape after this sequence, every count it implies:
///
/// | step | effect |
/// |---|---|
/// Revisions count from the start's, R (`--store memory` starts from the
/// clock, so that a restart never goes back).
///
/// | step | effect |
/// |---|---|
/// | a watcher W1 | watchers 1 |
/// | register a, b, c, d, e | registrations ok 5; online events, revisions R+1–R+5 |
/// | register without address, with a bad label key | registrations invalid 2 |
/// | heartbeat a, c (TTL 60 s), d, e (TTL 100 ms) | heartbeats ok 4; running events, R+6–R+9; b stays INITING |
/// | a batch: a, c (TTL kept) | heartbeats ok 6 |
/// | heartbeat an id never registered | heartbeats unknown 1 |
/// | heartbeat a with TTL 1 ms (below `--min-heartbeat-ttl`) | heartbeats invalid 1 |
/// | d and e time out | expirations 2, lag observations 2; offline events, R+10–R+11 |
/// | heartbeat d | heartbeats expired 1 (tombstone) |
/// | deregister c | deregistrations 1; offline event, R+12 |
/// | deregister an unknown id | NOT_FOUND, counted nowhere |
/// | a watcher W2 | watchers 2 |
///
/// Live: a RUNNING, b INITING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_after_a_known_sequence_shows_exactly_the_counts_it_implies() {
    let registry =
        RegistryProcess::start(&["--min-heartbeat-ttl", "50ms", "--init-heartbeat-ttl", "60s"]);
    let mut c = registry.client().await;
    let (snapshot, mut w1) = watch(&mut c).await;
    let r = snapshot.revision;
    assert!(r > 0, "started from the clock");

    let mut ids = Vec::new();
    for (port, name) in (1..).zip(["a", "b", "c", "d", "e"]) {
        ids.push(register(&mut c, name, port).await);
    }
    let [a, _b, c_id, d, e] = <[String; 5]>::try_from(ids.clone()).expect("five ids");

    let no_address = RegisterRequest {
        address: String::new(),
        ..register_request("x", 1, &[])
    };
    let bad_label = register_request("y", 1, &[("bad key", "v")]);
    for request in [no_address, bad_label] {
        let status = c.register(request).await.expect_err("invalid");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }

    for (id, ttl_ms) in [(&a, 60_000), (&c_id, 60_000), (&d, 100), (&e, 100)] {
        heartbeat(&mut c, id, ttl_ms).await.expect("heartbeat ok");
    }
    let batch = c
        .heartbeat_batch(HeartbeatBatchRequest {
            heartbeats: [&a, &c_id]
                .map(|id| HeartbeatRequest {
                    executor_id: id.clone(),
                    ttl_ms: 0,
                })
                .into(),
        })
        .await
        .expect("batch")
        .into_inner();
    assert!(
        batch
            .results
            .iter()
            .all(|r| r.status() == HeartbeatStatus::Ok),
        "{batch:?}"
    );
    let unknown = heartbeat(&mut c, "ghost-0123456789abcdef", 0).await;
    assert_eq!(unknown.expect_err("unknown").code(), Code::NotFound);
    let invalid = heartbeat(&mut c, &a, 1).await;
    assert_eq!(invalid.expect_err("bad TTL").code(), Code::InvalidArgument);

    for i in 1..=5 {
        let event = next_event(&mut w1).await;
        assert_eq!(
            (event.r#type(), event.revision, event.executor_id.as_str()),
            (EventType::Online, r + i, ids[i as usize - 1].as_str())
        );
    }
    for (i, id) in (6..).zip([&a, &c_id, &d, &e]) {
        let event = next_event(&mut w1).await;
        assert_eq!(
            (event.r#type(), event.revision, event.executor_id.as_str()),
            (EventType::Running, r + i, id.as_str())
        );
    }
    // The watcher is the clock: d and e are gone once their events arrive.
    let mut gone = BTreeSet::new();
    for i in 10..=11 {
        let event = next_event(&mut w1).await;
        assert_eq!(
            (event.r#type(), event.reason(), event.revision),
            (EventType::Offline, OfflineReason::Expired, r + i)
        );
        gone.insert(event.executor_id);
    }
    assert_eq!(gone, BTreeSet::from([d.clone(), e.clone()]));

    let late = heartbeat(&mut c, &d, 0).await;
    assert_eq!(
        late.expect_err("tombstone").code(),
        Code::FailedPrecondition
    );

    for (id, expected) in [(&c_id, Code::Ok), (&"ghost-0".to_owned(), Code::NotFound)] {
        let result = c
            .deregister(DeregisterRequest {
                executor_id: id.clone(),
            })
            .await;
        assert_eq!(result.map_or_else(|s| s.code(), |_| Code::Ok), expected);
    }
    let event = next_event(&mut w1).await;
    assert_eq!(
        (
            event.r#type(),
            event.reason(),
            event.revision,
            event.executor_id
        ),
        (
            EventType::Offline,
            OfflineReason::Deregistered,
            r + 12,
            c_id
        )
    );
    let (snapshot, _w2) = watch(&mut c).await;
    assert_eq!((snapshot.revision, snapshot.executors.len()), (r + 12, 2));

    let expected: &[(&str, f64)] = &[
        ("registry_registrations_total{result=\"ok\"}", 5.0),
        ("registry_registrations_total{result=\"invalid\"}", 2.0),
        ("registry_registrations_total{result=\"unavailable\"}", 0.0),
        ("registry_heartbeats_total{result=\"ok\"}", 6.0),
        ("registry_heartbeats_total{result=\"unknown\"}", 1.0),
        ("registry_heartbeats_total{result=\"expired\"}", 1.0),
        ("registry_heartbeats_total{result=\"invalid\"}", 1.0),
        ("registry_expirations_total", 2.0),
        ("registry_expiry_lag_seconds_count", 2.0),
        ("registry_expiry_lag_seconds_bucket{le=\"+Inf\"}", 2.0),
        ("registry_deregistrations_total", 1.0),
        ("registry_events_total{type=\"online\"}", 5.0),
        ("registry_events_total{type=\"running\"}", 4.0),
        ("registry_events_total{type=\"offline\"}", 3.0),
        ("registry_revision", (r + 12) as f64),
        ("registry_watch_starts_total{from=\"snapshot\"}", 2.0),
        ("registry_watch_starts_total{from=\"history\"}", 0.0),
        ("registry_watch_history_events", 12.0),
        ("registry_executors{status=\"running\"}", 1.0),
        ("registry_executors{status=\"initing\"}", 1.0),
        ("registry_watchers", 2.0),
        ("registry_watchers_lagged_total", 0.0),
        // Two snapshots of two executors: far below the rate.
        ("registry_watch_snapshot_paced_total", 0.0),
        ("registry_store_errors_total{op=\"commit\"}", 0.0),
        ("registry_store_errors_total{op=\"load\"}", 0.0),
        ("registry_store_operation_seconds_count{op=\"load\"}", 1.0),
        ("registry_is_leader", 1.0),
        ("registry_leader_changes_total", 0.0),
    ];
    let mismatches = |text: &str| -> Vec<String> {
        expected
            .iter()
            .filter_map(|&(series, want)| {
                let got = sample(text, series);
                (got != Some(want)).then(|| format!("{series}: want {want}, got {got:?}"))
            })
            .collect()
    };
    // A scrape flushes the heartbeat tallies itself; the watchers gauge moves
    // once W2's stream is set up on the server, so allow a moment for that.
    let settle = Duration::from_millis(500);
    let deadline = Instant::now() + settle * 20;
    while !mismatches(&registry.scrape()).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(settle / 5).await;
    }
    // Then waiting longer must change nothing: exact, not "at least".
    tokio::time::sleep(settle * 2).await;
    let text = registry.scrape();
    let wrong = mismatches(&text);
    assert!(wrong.is_empty(), "{wrong:#?}\nin:\n{text}");

    // Both watchers' snapshot chunks were counted (their size depends on
    // the ids, so only that they were).
    assert!(
        sample(&text, "registry_watch_snapshot_bytes_total").is_some_and(|b| b > 0.0),
        "snapshot bytes in:\n{text}"
    );
    // Every SPEC §4 metric with its type; store commits happened (their count
    // depends on group commit, so only that they did).
    for &(name, kind) in SPEC_METRICS {
        let declared = text.contains(&format!("# TYPE {name} {kind}\n"));
        assert!(declared, "# TYPE {name} {kind} in:\n{text}");
    }
    assert!(
        sample(
            &text,
            "registry_store_operation_seconds_count{op=\"commit\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(!text.contains("quantile="), "histograms, not summaries");
}

// ---------------------------------------------------------------------------
// The expressions of dashboards/.

/// One PromQL expression of `dashboards/`, and where it comes from.
#[derive(Debug, Clone)]
struct Expression {
    origin: String,
    promql: String,
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(DASHBOARD).expect("read the dashboard");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every `targets[].expr` of every panel (rows' nested panels included), as
/// Grafana would send it with every instance selected.
fn dashboard_expressions() -> Vec<Expression> {
    fn walk(value: &Value, title: &str, out: &mut Vec<Expression>) {
        match value {
            Value::Object(object) => {
                let title = object.get("title").and_then(Value::as_str).unwrap_or(title);
                if let Some(Value::Array(targets)) = object.get("targets") {
                    for target in targets {
                        let raw = target["expr"].as_str().expect("every target has an expr");
                        let ref_id = target["refId"].as_str().unwrap_or("?");
                        out.push(Expression {
                            origin: format!("dashboard panel {title:?} target {ref_id}"),
                            promql: grafana_to_promql(raw),
                        });
                    }
                }
                for (key, child) in object {
                    if key != "targets" && key != "templating" {
                        walk(child, title, out);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|item| walk(item, title, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&dashboard()["panels"], "", &mut out);
    out
}

/// Grafana's variables replaced as a query with "All" instances would have
/// them; any variable left over is a variable this test does not know.
fn grafana_to_promql(raw: &str) -> String {
    let promql = raw
        .replace("${instance}", ".*")
        .replace("$instance", ".*")
        .replace("${__rate_interval}", RATE_INTERVAL)
        .replace("$__rate_interval", RATE_INTERVAL);
    assert!(!promql.contains('$'), "unknown Grafana variable in {raw:?}");
    promql
}

/// The alerting rules of `dashboards/alerts.yml`: (alert, expr).
fn alert_rules() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(ALERTS).expect("read alerts.yml");
    let docs = YamlLoader::load_from_str(&text).expect("alerts.yml is YAML");
    let mut rules = Vec::new();
    for group in docs[0]["groups"].as_vec().expect("groups") {
        for rule in group["rules"].as_vec().expect("rules") {
            let name = rule["alert"].as_str().expect("only alerting rules");
            let expr = rule["expr"].as_str().expect("every rule has an expr");
            rules.push((name.to_owned(), expr.trim().to_owned()));
        }
    }
    rules
}

/// An alert's query without its final `<op> <number>`: what a healthy
/// registry answers, where the condition itself answers nothing.
fn strip_comparison(expr: &str) -> Option<String> {
    let comparison = Regex::new(r"\s*(==|!=|>=|<=|>|<)\s*(bool\s+)?-?[0-9.]+(e[+-]?[0-9]+)?\s*$")
        .expect("valid regex");
    let m = comparison.find(expr)?;
    Some(expr[..m.start()].trim().to_owned())
}

/// Every expression to evaluate: the dashboard's, each alert's as written,
/// and each alert's core query.
fn all_expressions() -> Vec<(Expression, bool)> {
    let mut out: Vec<(Expression, bool)> = dashboard_expressions()
        .into_iter()
        .map(|e| (e, true))
        .collect();
    for (alert, expr) in alert_rules() {
        let core = strip_comparison(&expr)
            .unwrap_or_else(|| panic!("alert {alert}: expr does not end with a comparison"));
        // The condition itself may or may not hold: it must parse.
        out.push((
            Expression {
                origin: format!("alert {alert} (condition)"),
                promql: expr,
            },
            false,
        ));
        out.push((
            Expression {
                origin: format!("alert {alert} (core, comparison stripped)"),
                promql: core,
            },
            true,
        ));
    }
    out
}

/// The metric names an expression selects (histogram series mapped to their
/// family, `up` left out).
fn metric_names(promql: &str) -> BTreeSet<String> {
    let name = Regex::new(r"\b(registry|process)_[a-z_]+\b").expect("valid regex");
    name.find_iter(promql)
        .map(|m| {
            let n = m.as_str();
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    n.strip_suffix(suffix)
                        .filter(|family| family.ends_with("_seconds"))
                })
                .unwrap_or(n)
                .to_owned()
        })
        .collect()
}

/// Why `promql` may legitimately return nothing, if it only selects metrics
/// of [`KNOWN_EMPTY`].
fn known_empty(promql: &str) -> Option<&'static str> {
    let names = metric_names(promql);
    let (metric, reason) = KNOWN_EMPTY
        .iter()
        .find(|(metric, _)| names.contains(*metric))?;
    (names.len() == 1 && names.contains(*metric)).then_some(*reason)
}

/// Without Prometheus: every metric an expression of `dashboards/` selects
/// has its SPEC §4 name (the scrape tests show the registry exports those);
/// every SPEC metric an operator watches has a panel; every panel describes
/// what healthy looks like and queries the datasource variable; every alert
/// has a severity, a summary and a runbook, and ends in one comparison.
#[test]
fn dashboards_select_only_spec_metrics_and_have_the_shape_operators_rely_on() {
    let spec: BTreeSet<&str> = SPEC_METRICS.iter().map(|(name, _)| *name).collect();
    let expressions = all_expressions();
    assert!(expressions.len() > 20, "{expressions:#?}");
    for (expression, _) in &expressions {
        let names = metric_names(&expression.promql);
        for name in &names {
            assert!(
                spec.contains(name.as_str()),
                "{}: {name} is not a SPEC §4 metric: {}",
                expression.origin,
                expression.promql
            );
        }
        assert!(
            !names.is_empty() || expression.promql.contains("up{"),
            "{}: selects nothing: {}",
            expression.origin,
            expression.promql
        );
    }
    // Every metric of SPEC §4 appears on the dashboard.
    let shown: BTreeSet<String> = dashboard_expressions()
        .iter()
        .flat_map(|e| metric_names(&e.promql))
        .collect();
    let missing: Vec<_> = spec
        .iter()
        .filter(|name| {
            !shown.contains(**name)
                && ![
                    "process_virtual_memory_bytes",
                    "process_start_time_seconds",
                    "process_threads",
                ]
                .contains(name)
        })
        .collect();
    assert!(missing.is_empty(), "not on the dashboard: {missing:?}");

    let dashboard = dashboard();
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(variables, ["datasource", "instance"]);
    let top = dashboard["panels"].as_array().expect("panels");
    // Collapsed rows hold their panels.
    let nested = top.iter().filter_map(|p| p["panels"].as_array()).flatten();
    for panel in top.iter().chain(nested) {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().expect("title");
        assert!(
            panel["description"]
                .as_str()
                .is_some_and(|d| d.contains("Healthy")),
            "panel {title:?} says what healthy looks like"
        );
        for datasource in std::iter::once(&panel["datasource"]).chain(
            panel["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| &t["datasource"]),
        ) {
            assert_eq!(
                datasource["uid"], "${datasource}",
                "panel {title:?} queries the datasource variable"
            );
        }
    }

    let text = std::fs::read_to_string(ALERTS).expect("read alerts.yml");
    let docs = YamlLoader::load_from_str(&text).expect("alerts.yml is YAML");
    for group in docs[0]["groups"].as_vec().expect("groups") {
        for rule in group["rules"].as_vec().expect("rules") {
            let name = rule["alert"].as_str().expect("alert");
            assert!(
                matches!(
                    rule["labels"]["severity"].as_str(),
                    Some("critical" | "warning")
                ),
                "{name}: severity"
            );
            for key in ["summary", "description", "runbook"] {
                assert!(
                    rule["annotations"][key]
                        .as_str()
                        .is_some_and(|s| !s.is_empty()),
                    "{name}: annotation {key}"
                );
            }
        }
    }
    assert_eq!(
        alert_rules()
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>(),
        [
            "RegistryDown",
            "RegistryExpiryLagHigh",
            "RegistryExpirationSurge",
            "RegistryExpiryGuardActive",
            "RegistryStoreErrors",
            "RegistryWatchersLagging",
            "RegistryHeartbeatRejectionsRising",
        ]
    );
    // Stripping finds the comparison, and only it.
    assert_eq!(
        strip_comparison("up{job=\"executor-registry\"} == 0").as_deref(),
        Some("up{job=\"executor-registry\"}")
    );
    assert_eq!(
        strip_comparison("sum(rate(x[5m])) / clamp_min(sum(y), 10) > 0.1").as_deref(),
        Some("sum(rate(x[5m])) / clamp_min(sum(y), 10)")
    );
    assert_eq!(strip_comparison("sum(rate(x[5m]))"), None);
}

// ---------------------------------------------------------------------------
// promtool.

/// Runs `promtool args…` with `stdin`; its exit status and output.
fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (Debian package prometheus; scripts/test.sh installs it)");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool finishes");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs prometheus and promtool (Debian package prometheus): scripts/test.sh installs them"]
async fn promtool_accepts_the_exposition_the_alert_rules_and_the_scrape_config() {
    // Every series populated: an expiry for the lag histogram, a watcher.
    let registry = RegistryProcess::start(&["--min-heartbeat-ttl", "50ms"]);
    let mut c = registry.client().await;
    let (_, mut w) = watch(&mut c).await;
    let id = register(&mut c, "lint", 1).await;
    heartbeat(&mut c, &id, 60).await.expect("heartbeat");
    next_event(&mut w).await; // ONLINE
    next_event(&mut w).await; // RUNNING
    let offline = next_event(&mut w).await;
    assert_eq!(offline.reason(), OfflineReason::Expired);
    let exposition = registry.scrape();
    assert!(
        exposition.contains("registry_expiry_lag_seconds_bucket{le=\"0.001\"}"),
        "{exposition}"
    );

    let (ok, out) = promtool(&["check", "metrics"], &exposition);
    assert!(ok, "promtool check metrics:\n{out}\non:\n{exposition}");
    assert!(out.trim().is_empty(), "lint findings:\n{out}");

    let rules = alert_rules().len();
    let (ok, out) = promtool(&["check", "rules", ALERTS], "");
    assert!(ok, "promtool check rules:\n{out}");
    assert!(
        out.contains(&format!("SUCCESS: {rules} rules found")),
        "{out}"
    );

    let (ok, out) = promtool(&["check", "config", PROMETHEUS_CONFIG], "");
    assert!(ok, "promtool check config:\n{out}");
    assert!(out.contains("SUCCESS: 1 rule files found"), "{out}");
}

// ---------------------------------------------------------------------------
// A real Prometheus.

/// A Prometheus on loopback scraping one registry every second, with
/// `dashboards/alerts.yml` loaded through a copy of
/// `dashboards/prometheus.yml`; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let shipped = std::fs::read_to_string(PROMETHEUS_CONFIG).expect("read prometheus.yml");
        let mut config = shipped.clone();
        for (from, to) in [
            ("scrape_interval: 15s", "scrape_interval: 1s".to_owned()),
            (
                "evaluation_interval: 15s",
                "evaluation_interval: 1s".to_owned(),
            ),
            ("\"127.0.0.1:9464\"", format!("\"{target}\"")),
        ] {
            assert_eq!(
                config.matches(from).count(),
                1,
                "dashboards/prometheus.yml changed: {from:?} no longer occurs once:\n{shipped}"
            );
            config = config.replace(from, &to);
        }
        assert!(config.contains(&format!("job_name: {JOB}")), "{config}");
        std::fs::write(dir.path().join("prometheus.yml"), config).expect("write config");
        // `rule_files: [alerts.yml]` is relative to the config file.
        std::fs::copy(ALERTS, dir.path().join("alerts.yml")).expect("copy alerts.yml");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let addr = free_addr();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("prometheus runs (Debian package prometheus; scripts/test.sh installs it)");
        let prometheus = Self { child, addr, dir };
        prometheus.wait_ready();
        prometheus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(self.addr, "/-/ready") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn api(&self, path: &str) -> Value {
        let (status, body) = http_get(self.addr, path).expect("prometheus answers");
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{path}: HTTP {status}, not JSON ({e}): {body}"))
    }

    /// `/api/v1/query`: the samples, or Prometheus's error.
    fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let answer = self.api(&format!("/api/v1/query?query={}", encode(promql)));
        if answer["status"] != "success" {
            return Err(format!("{}: {}", answer["errorType"], answer["error"]));
        }
        let data = &answer["data"];
        Ok(match data["resultType"].as_str() {
            Some("vector" | "matrix") => data["result"].as_array().cloned().unwrap_or_default(),
            // A scalar or string is one value.
            _ => vec![data["result"].clone()],
        })
    }

    /// The one value of a query that returns one sample.
    fn value(&self, promql: &str) -> Option<f64> {
        let samples = self.query(promql).ok()?;
        samples.first()?["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `samples` in one line: `{labels} value` each.
fn render_samples(samples: &[Value]) -> String {
    let mut out = String::new();
    for sample in samples.iter().take(4) {
        let labels: BTreeMap<String, String> = sample["metric"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "instance" | "job"))
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let value = sample["value"][1].as_str().unwrap_or("?");
        let _ = write!(out, "{labels:?}={value} ");
    }
    if samples.len() > 4 {
        let _ = write!(out, "(+{} more)", samples.len() - 4);
    }
    out.trim_end().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs prometheus and promtool (Debian package prometheus): scripts/test.sh installs them"]
async fn every_dashboard_and_alert_expression_returns_data_from_a_real_prometheus() {
    let registry = RegistryProcess::start(&[
        "--min-heartbeat-ttl",
        "50ms",
        "--init-heartbeat-ttl",
        "60s",
        "--watch-buffer",
        "4",
    ]);
    let mut c = registry.client().await;
    let prometheus = Prometheus::start(registry.metrics);
    let up = format!("up{{job=\"{JOB}\"}}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while prometheus.value(&up) != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "target never up:\n{:#}\n{}",
            prometheus.api("/api/v1/targets"),
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Traffic. A watcher that reads, as a scheduler would: with a watch
    // buffer of 4 a burst can bury it too, and then it watches again.
    let reader = {
        let mut c = c.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(response) = c.watch_executors(WatchExecutorsRequest::default()).await {
                    let mut stream = response.into_inner();
                    while let Ok(Some(_)) = stream.message().await {}
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // And one that never reads, until the end.
    let (stalled_from, mut stalled) = watch(&mut registry.small_window_client().await).await;
    // A fleet that keeps heartbeating while Prometheus scrapes.
    let mut fleet = Vec::new();
    for port in 1..=20 {
        let request = register_request("fleet", port, &[("zone", "z1"), ("gpu", "a100")]);
        let id = c.register(request).await.expect("register").into_inner();
        fleet.push(id.executor.expect("executor").id);
    }
    // It goes on heartbeating the one that leaves below: `expired` answers.
    let leaver = fleet.last().cloned().expect("fleet");
    let heartbeater = {
        let mut c = c.clone();
        let fleet = fleet.clone();
        tokio::spawn(async move {
            loop {
                for id in &fleet {
                    let _ = heartbeat(&mut c, id, 60_000).await;
                }
                // And one for an id the registry never knew: `unknown`.
                let _ = heartbeat(&mut c, "ghost-0123456789abcdef", 0).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    // Expirations: five executors with a short TTL.
    for port in 100..105 {
        let id = register(&mut c, "doomed", port).await;
        heartbeat(&mut c, &id, 100).await.expect("heartbeat");
    }
    // A deregistration.
    c.deregister(DeregisterRequest {
        executor_id: leaver,
    })
    .await
    .expect("deregister");
    // Churn that buries the stalled watcher: far more events than its
    // HTTP/2 window plus a watch buffer of 4 can hold. The labels make each
    // event's DATA frame larger than 256 bytes: h2 (0.4.20) on the client
    // tears the whole connection down (GOAWAY ENHANCE_YOUR_CALM, seen as
    // RESOURCE_EXHAUSTED too) when ~170 smaller frames sit unread, before
    // the server could notice the lag.
    let labels: Vec<(String, String)> = ["image", "team", "rack", "pool", "build"]
        .iter()
        .map(|k| {
            (
                (*k).to_owned(),
                format!("{k}-0123456789-abcdefghij-0123456789"),
            )
        })
        .collect();
    let labels: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    for port in 0..600 {
        let request = register_request("churn", 1_000 + port, &labels);
        let registered = c.register(request).await.expect("register").into_inner();
        let executor_id = registered.executor.expect("executor").id;
        c.deregister(DeregisterRequest { executor_id })
            .await
            .expect("deregister");
    }
    // The stalled watcher reads consecutive events, then is told it lagged.
    let mut expected = stalled_from.revision + 1;
    let lagged = loop {
        match next_message(&mut stalled).await {
            Ok(proto::watch_executors_response::Kind::Event(e)) => {
                assert_eq!(e.revision, expected, "no gap before the end");
                expected += 1;
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(status) => break status,
        }
    };
    // Ended by the registry, not by the client's own HTTP/2 library.
    assert_eq!(lagged.code(), Code::ResourceExhausted, "{lagged:?}");
    assert!(lagged.message().contains("watch again"), "{lagged:?}");
    drop(stalled);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(&registry.scrape(), "registry_expirations_total") != Some(5.0) {
        assert!(Instant::now() < deadline, "the doomed five never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // rate() needs two samples in its window: let Prometheus scrape a few
    // times after the traffic, and evaluate the rules.
    let scrapes = format!("count_over_time({up}[10m])");
    let before = prometheus.value(&scrapes).unwrap_or(0.0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while prometheus.value(&scrapes).unwrap_or(0.0) < before + 3.0 {
        assert!(
            Instant::now() < deadline,
            "no scrapes:\n{}",
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let lagged = format!("max_over_time(registry_watchers_lagged_total{{job=\"{JOB}\"}}[10m])");
    assert!(
        prometheus.value(&lagged).is_some_and(|n| n >= 1.0),
        "the lagged watcher was counted and scraped: {:?}\n{}",
        prometheus.query(&lagged),
        registry.scrape()
    );

    // Every rule of alerts.yml loaded and evaluated without error.
    let names: BTreeSet<String> = alert_rules().into_iter().map(|(name, _)| name).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let rules = loop {
        let answer = prometheus.api("/api/v1/rules");
        let rules: Vec<Value> = answer["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = rules.iter().all(|r| {
            r["health"] == "ok"
                && r["lastEvaluation"]
                    .as_str()
                    .is_some_and(|t| !t.starts_with("0001"))
        });
        if (rules.len() == names.len() && evaluated) || Instant::now() > deadline {
            break rules;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let loaded: BTreeSet<String> = rules
        .iter()
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(loaded, names, "rules loaded by prometheus");
    for rule in &rules {
        assert_eq!(rule["type"], "alerting", "{rule:#}");
        assert_eq!(rule["health"], "ok", "{rule:#}");
    }

    // The instance variable's query: label_values(registry_revision, instance).
    let instances = prometheus.api(&format!(
        "/api/v1/label/instance/values?match[]={}",
        encode("registry_revision")
    ));
    assert_eq!(
        instances["data"],
        serde_json::json!([registry.metrics.to_string()]),
        "{instances:#}"
    );

    // Every expression, until each has data (or 30 s passed).
    let expressions = all_expressions();
    let mut results: Vec<Option<Result<Vec<Value>, String>>> = vec![None; expressions.len()];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for ((expression, _), result) in expressions.iter().zip(&mut results) {
            let done = matches!(result, Some(Ok(samples)) if !samples.is_empty());
            if !done {
                *result = Some(prometheus.query(&expression.promql));
            }
        }
        let waiting = expressions.iter().zip(&results).any(|((e, must), r)| {
            *must
                && known_empty(&e.promql).is_none()
                && !matches!(r, Some(Ok(samples)) if !samples.is_empty())
        });
        if !waiting || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    heartbeater.abort();
    reader.abort();

    let mut report = String::new();
    let mut failures = Vec::new();
    for ((expression, must_have_data), result) in expressions.iter().zip(&results) {
        let result = result.as_ref().expect("evaluated");
        let verdict = match (result, must_have_data, known_empty(&expression.promql)) {
            (Err(e), _, _) => {
                failures.push(format!("{}: does not evaluate: {e}", expression.origin));
                format!("ERROR {e}")
            }
            (Ok(samples), _, _) if !samples.is_empty() => {
                format!("data: {}", render_samples(samples))
            }
            (Ok(_), false, _) => "no data (condition does not hold)".to_owned(),
            (Ok(_), true, Some(reason)) => format!("no data, known exception: {reason}"),
            (Ok(_), true, None) => {
                failures.push(format!("{}: no data", expression.origin));
                "NO DATA".to_owned()
            }
        };
        let _ = writeln!(
            report,
            "{}\n    {}\n    -> {verdict}",
            expression.origin, expression.promql
        );
    }
    println!("{report}");
    assert!(
        failures.is_empty(),
        "{failures:#?}\n\n{report}\nprometheus log:\n{}",
        prometheus.log()
    );
    // A healthy registry is up: RegistryDown's condition returns nothing.
    assert_eq!(prometheus.query(&format!("{up} == 0")), Ok(vec![]));
}
