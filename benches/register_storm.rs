//! Durable registrations per second under a storm of concurrent gRPC
//! clients: a measurement, not a timed test.
//!
//! By default it starts the real server itself — the binary built by
//! `cargo bench` (release settings) — on the default SQLite store, with
//! fsync at every commit, in a fresh temporary data directory, and
//! registers from `--concurrency` concurrent calls over `--connections`
//! HTTP/2 connections for `--duration`, `--runs` times (after a warm-up).
//! Every registration counted was answered OK, which the server does only
//! once its row is durable.
//!
//! ```sh
//! cargo bench --bench register_storm                      # defaults
//! cargo bench --bench register_storm -- --concurrency 64 --runs 3 --json
//! cargo bench --bench register_storm -- --endpoint http://10.0.0.5:10240 \
//!     --metrics 10.0.0.5:9464                              # a running server
//! ```
//!
//! Per run it reports registrations/s, call latency, and from the server's
//! `/metrics`: commits, rows per commit and mean commit time
//! (`registry_store_operation_seconds{op="commit"}`), the share of the run
//! the store thread spent committing, and CPU used by the server, by this
//! client and by everything else on the machine (the noise; all from
//! `/proc`, when the server is local). The summary is the median run.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a benchmark measures real time"
)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use executor_registry::proto::RegisterRequest;
use executor_registry::proto::registry_client::RegistryClient;
use tonic::transport::{Channel, Endpoint};

/// Durable registrations per second under a storm of concurrent clients.
#[derive(Debug, Parser)]
struct Args {
    /// A running registry to measure, e.g. `http://127.0.0.1:10240`
    /// (default: start the release binary on a temporary data dir).
    #[arg(long)]
    endpoint: Option<String>,
    /// Its `/metrics` address (`host:port`), for the store figures.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Server binary to start (default: the one `cargo bench` built), e.g.
    /// a copy of another build to compare against.
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Data directory for the started server (default: a temporary one
    /// under $TMPDIR, removed at the end). Must be empty or absent.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Registrations in flight at once, spread over the connections.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Length of one run.
    #[arg(long, default_value = "5s", value_parser = executor_registry::config::parse_duration::<Duration>)]
    duration: Duration,
    /// Runs; the summary is their median.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Unmeasured storm before the runs.
    #[arg(long, default_value = "2s", value_parser = executor_registry::config::parse_duration::<Duration>)]
    warmup: Duration,
    /// Worker threads of this client's runtime.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// Print the summary as one JSON object instead.
    #[arg(long)]
    json: bool,
    /// Passed by `cargo bench`. Without it (`cargo test --all-targets`
    /// runs this too) it is a one-second smoke run.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The server this benchmark started, killed on drop.
struct Server {
    child: Child,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Starts `executor-registry serve` on the default SQLite store.
fn start_server(args: &Args) -> anyhow::Result<(Server, String, SocketAddr)> {
    let (dir, data) = match &args.data_dir {
        Some(data) => (None, data.clone()),
        None => {
            let dir = tempfile::tempdir()?;
            let data = dir.path().join("data");
            (Some(dir), data)
        }
    };
    let (listen, metrics) = (free_addr()?, free_addr()?);
    let binary = args
        .binary
        .clone()
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_executor-registry").into());
    let child = Command::new(&binary)
        .arg("serve")
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--metrics-listen")
        .arg(metrics.to_string())
        .arg("--data-dir")
        .arg(&data)
        // Nothing expires during the measurement: registrations only.
        .args(["--init-heartbeat-ttl", "10m"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    eprintln!(
        "started {} (pid {}) on {listen}, data dir {}",
        binary.display(),
        child.id(),
        data.display()
    );
    let server = Server { child, _dir: dir };
    Ok((server, format!("http://{listen}"), metrics))
}

/// What `/metrics` and `/proc` say at one instant.
#[derive(Debug, Clone, Copy, Default)]
struct Probe {
    at: Option<Instant>,
    commits: f64,
    commit_seconds: f64,
    commit_errors: f64,
    registrations_ok: f64,
    server_cpu_seconds: Option<f64>,
    client_cpu_seconds: Option<f64>,
    /// Busy CPU time of the whole machine.
    machine_cpu_seconds: Option<f64>,
}

/// CPU seconds (user + system) of a process, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(ticks / 100.0)
}

/// Busy CPU seconds of the whole machine (every state but idle and
/// iowait), from `/proc/stat`.
fn machine_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<f64> = cpu
        .split_whitespace()
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((ticks.iter().sum::<f64>() - idle) / 100.0)
}

fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: registry\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn probe(metrics: Option<SocketAddr>, server_pid: Option<u32>) -> anyhow::Result<Probe> {
    let mut probe = Probe {
        at: Some(Instant::now()),
        server_cpu_seconds: server_pid.and_then(|pid| cpu_seconds(&pid.to_string())),
        client_cpu_seconds: cpu_seconds("self"),
        machine_cpu_seconds: machine_cpu_seconds(),
        ..Probe::default()
    };
    if let Some(metrics) = metrics {
        let text = scrape(metrics)?;
        probe.commits = sample(
            &text,
            r#"registry_store_operation_seconds_count{op="commit"}"#,
        );
        probe.commit_seconds = sample(
            &text,
            r#"registry_store_operation_seconds_sum{op="commit"}"#,
        );
        probe.commit_errors = sample(&text, r#"registry_store_errors_total{op="commit"}"#);
        probe.registrations_ok = sample(&text, r#"registry_registrations_total{result="ok"}"#);
    }
    Ok(probe)
}

/// One run's figures.
#[derive(Debug, Clone)]
struct Run {
    registrations: u64,
    errors: u64,
    seconds: f64,
    per_second: f64,
    latency_ms_p50: f64,
    latency_ms_p99: f64,
    latency_ms_max: f64,
    commits: Option<f64>,
    rows_per_commit: Option<f64>,
    commit_ms_mean: Option<f64>,
    /// Share of the run the store thread spent inside commits.
    store_busy: Option<f64>,
    /// Cores used by the server process, on average.
    server_cores: Option<f64>,
    /// Cores used by this client, on average.
    client_cores: Option<f64>,
    /// Cores used by everything else on the machine (other processes, and
    /// interrupts not charged to either), on average: the noise.
    other_cores: Option<f64>,
}

impl Run {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "registrations": self.registrations,
            "errors": self.errors,
            "seconds": self.seconds,
            "per_second": self.per_second,
            "latency_ms_p50": self.latency_ms_p50,
            "latency_ms_p99": self.latency_ms_p99,
            "latency_ms_max": self.latency_ms_max,
            "commits": self.commits,
            "rows_per_commit": self.rows_per_commit,
            "commit_ms_mean": self.commit_ms_mean,
            "store_busy": self.store_busy,
            "server_cores": self.server_cores,
            "client_cores": self.client_cores,
            "other_cores": self.other_cores,
        })
    }
}

/// Runs `concurrency` registration loops over `channels` for `duration`.
async fn storm(
    channels: &[Channel],
    concurrency: usize,
    duration: Duration,
) -> (u64, u64, Vec<u32>) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..concurrency {
        let mut client = RegistryClient::new(channels[task % channels.len()].clone());
        let stop = stop.clone();
        tasks.spawn(async move {
            let (mut ok, mut errors) = (0u64, 0u64);
            let mut latencies_us = Vec::with_capacity(4096);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let request = RegisterRequest {
                    name: "storm".into(),
                    address: format!(
                        "10.{}.{}.{}:{}",
                        task >> 8,
                        task & 255,
                        n & 255,
                        1 + n % 60_000
                    ),
                    labels: [
                        ("pool".to_owned(), format!("p{}", task % 7)),
                        ("zone".to_owned(), "eu-west-1a".to_owned()),
                    ]
                    .into(),
                };
                let sent = Instant::now();
                match client.register(request).await {
                    Ok(_) => ok += 1,
                    Err(_) => errors += 1,
                }
                latencies_us.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            (ok, errors, latencies_us)
        });
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut errors, mut latencies) = (0, 0, Vec::new());
    while let Some(joined) = tasks.join_next().await {
        let (o, e, l) = joined.expect("storm task");
        ok += o;
        errors += e;
        latencies.extend(l);
    }
    (ok, errors, latencies)
}

fn percentile_ms(sorted_us: &[u32], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let i = ((sorted_us.len() - 1) as f64 * q).round() as usize;
    f64::from(sorted_us[i]) / 1000.0
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if !args.bench {
        eprintln!("not under `cargo bench`: a one-second smoke run (pass --bench to measure)");
        args.runs = 1;
        args.duration = Duration::from_secs(1);
        args.warmup = Duration::ZERO;
        args.concurrency = args.concurrency.min(16);
    }
    anyhow::ensure!(args.connections > 0 && args.concurrency > 0 && args.runs > 0);
    let (server, endpoint, metrics) = match &args.endpoint {
        Some(endpoint) => (None, endpoint.clone(), args.metrics),
        None => {
            let (server, endpoint, metrics) = start_server(&args)?;
            (Some(server), endpoint, Some(metrics))
        }
    };
    let server_pid = server.as_ref().map(|s| s.child.id());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()?;
    let runs = runtime.block_on(async {
        let mut channels = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        for _ in 0..args.connections {
            // Each `connect` is its own HTTP/2 connection.
            let channel = loop {
                match Endpoint::from_shared(endpoint.clone())?
                    .tcp_nodelay(true)
                    .connect()
                    .await
                {
                    Ok(channel) => break channel,
                    Err(e) if Instant::now() > deadline => return Err(anyhow::anyhow!("connect {endpoint}: {e}")),
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            };
            channels.push(channel);
        }
        eprintln!(
            "storm: {} concurrent registrations over {} connections, {} client threads; \
             warm-up {:?}, {} runs of {:?}",
            args.concurrency, args.connections, args.client_threads, args.warmup, args.runs, args.duration
        );
        if !args.warmup.is_zero() {
            let (ok, errors, _) = storm(&channels, args.concurrency, args.warmup).await;
            eprintln!("warm-up: {ok} registered, {errors} errors");
        }
        let mut runs = Vec::new();
        for run in 1..=args.runs {
            let before = probe(metrics, server_pid)?;
            let (ok, errors, mut latencies) = storm(&channels, args.concurrency, args.duration).await;
            let after = probe(metrics, server_pid)?;
            let seconds = after
                .at
                .zip(before.at)
                .map(|(a, b)| (a - b).as_secs_f64())
                .unwrap_or(args.duration.as_secs_f64());
            latencies.sort_unstable();
            let commits = after.commits - before.commits;
            let with_metrics = metrics.is_some() && commits > 0.0;
            let cores = |a: Option<f64>, b: Option<f64>| Some((a? - b?) / seconds);
            let r = Run {
                registrations: ok,
                errors,
                seconds,
                per_second: ok as f64 / seconds,
                latency_ms_p50: percentile_ms(&latencies, 0.5),
                latency_ms_p99: percentile_ms(&latencies, 0.99),
                latency_ms_max: percentile_ms(&latencies, 1.0),
                commits: with_metrics.then_some(commits),
                rows_per_commit: with_metrics
                    .then(|| (after.registrations_ok - before.registrations_ok) / commits),
                commit_ms_mean: with_metrics
                    .then(|| (after.commit_seconds - before.commit_seconds) * 1000.0 / commits),
                store_busy: with_metrics
                    .then(|| (after.commit_seconds - before.commit_seconds) / seconds),
                server_cores: cores(after.server_cpu_seconds, before.server_cpu_seconds),
                client_cores: cores(after.client_cpu_seconds, before.client_cpu_seconds),
                other_cores: None,
            };
            let machine = cores(after.machine_cpu_seconds, before.machine_cpu_seconds);
            let r = Run {
                other_cores: machine.map(|m| {
                    (m - r.server_cores.unwrap_or(0.0) - r.client_cores.unwrap_or(0.0)).max(0.0)
                }),
                ..r
            };
            let store_errors = after.commit_errors - before.commit_errors;
            let opt = |v: Option<f64>, digits: usize| {
                v.map_or("-".to_owned(), |v| format!("{v:.digits$}"))
            };
            eprintln!(
                "run {run}/{}: {:>8.0} registrations/s ({ok} in {seconds:.2} s, {errors} errors); \
                 latency p50 {:.1} ms p99 {:.1} ms max {:.1} ms; commits {} of {} rows, {} ms mean, \
                 store busy {}; cores: server {} client {} other {}{}",
                args.runs,
                r.per_second,
                r.latency_ms_p50,
                r.latency_ms_p99,
                r.latency_ms_max,
                opt(r.commits, 0),
                opt(r.rows_per_commit, 1),
                opt(r.commit_ms_mean, 2),
                opt(r.store_busy.map(|b| b * 100.0), 0) + "%",
                opt(r.server_cores, 2),
                opt(r.client_cores, 2),
                opt(r.other_cores, 2),
                if store_errors > 0.0 { format!("; {store_errors} FAILED COMMITS") } else { String::new() },
            );
            runs.push(r);
        }
        anyhow::Ok(runs)
    })?;
    drop(server);

    let median_of = |f: fn(&Run) -> Option<f64>| {
        let values: Vec<f64> = runs.iter().filter_map(f).collect();
        (!values.is_empty()).then(|| median(values))
    };
    let per_second = median_of(|r| Some(r.per_second)).unwrap_or(0.0);
    let summary = serde_json::json!({
        "registrations_per_second_median": per_second,
        "registrations_per_second_runs": runs.iter().map(|r| r.per_second.round()).collect::<Vec<_>>(),
        "concurrency": args.concurrency,
        "connections": args.connections,
        "client_threads": args.client_threads,
        "run_seconds": args.duration.as_secs_f64(),
        "latency_ms_p50_median": median_of(|r| Some(r.latency_ms_p50)),
        "latency_ms_p99_median": median_of(|r| Some(r.latency_ms_p99)),
        "rows_per_commit_median": median_of(|r| r.rows_per_commit),
        "commit_ms_mean_median": median_of(|r| r.commit_ms_mean),
        "store_busy_median": median_of(|r| r.store_busy),
        "server_cores_median": median_of(|r| r.server_cores),
        "client_cores_median": median_of(|r| r.client_cores),
        "other_cores_median": median_of(|r| r.other_cores),
        "runs": runs.iter().map(Run::to_json).collect::<Vec<_>>(),
    });
    if args.json {
        println!("{summary}");
    } else {
        let get = |key: &str, digits: usize| {
            summary[key]
                .as_f64()
                .map_or("-".to_owned(), |v| format!("{v:.digits$}"))
        };
        println!(
            "\nregister storm: median {per_second:.0} durable registrations/s over {} runs \
             ({}/s)\n  {} concurrent over {} connections; latency p50 {} ms, p99 {} ms\n  \
             store: {} rows per commit, {} ms per commit, busy {} of the time\n  \
             cores used: server {}, client {}, everything else {}",
            runs.len(),
            runs.iter()
                .map(|r| format!("{:.0}", r.per_second))
                .collect::<Vec<_>>()
                .join(", "),
            args.concurrency,
            args.connections,
            get("latency_ms_p50_median", 1),
            get("latency_ms_p99_median", 1),
            get("rows_per_commit_median", 1),
            get("commit_ms_mean_median", 2),
            summary["store_busy_median"]
                .as_f64()
                .map_or("-".to_owned(), |v| format!("{:.0}%", v * 100.0)),
            get("server_cores_median", 2),
            get("client_cores_median", 2),
            get("other_cores_median", 2),
        );
    }
    Ok(())
}
