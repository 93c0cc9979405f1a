//! `loadtest`: fleet simulator, closed-loop throughput, registry ÷ echo
//! comparison, the soak, the watchers scenario, and the echo server. See the
//! crate docs of `loadtest`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use tokio::net::TcpListener;

use executor_registry::config::parse_duration;
use loadtest::compare::{self, CompareConfig, Plan};
use loadtest::fleet::{self, FleetConfig};
use loadtest::soak::{self, SoakConfig};
use loadtest::throughput::{self, Load};
use loadtest::tls_compare::{self, TlsCompareConfig};
use loadtest::watchers::{self, WatchersConfig};
use loadtest::{Mode, echo, report};

/// Load tests for executor-registry. Without a subcommand: the fleet
/// simulator (same flags as `loadtest fleet`).
#[derive(Debug, Parser)]
#[command(
    name = "loadtest",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    fleet: FleetArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Simulate a fleet against a running registry and verify expiry.
    Fleet(FleetArgs),
    /// Closed-loop heartbeat throughput against the registry or the echo.
    Throughput(ThroughputArgs),
    /// Registry ÷ echo throughput for each mode, in one run.
    Compare(CompareArgs),
    /// Registry over TLS ÷ the same registry in plaintext, in one run (starts
    /// both, with certificates made on the spot).
    TlsCompare(TlsCompareArgs),
    /// Long churn soak at a constant live set, with the server's memory curve.
    Soak(SoakArgs),
    /// Many watchers snapshotting a large fleet at once, and one watcher
    /// that stops reading through a mass expiry: the server's RSS and
    /// heartbeat latency.
    Watchers(WatchersArgs),
    /// Serve the trivial echo `registry.v1.Registry` (the transport baseline).
    EchoServer(EchoServerArgs),
}

/// TLS to the registry (use an https:// endpoint).
#[derive(Debug, Args)]
struct TlsArgs {
    /// CA certificate (PEM) the registry's certificate must chain to; turns
    /// on TLS.
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM), for mutual TLS.
    #[arg(long, requires = "key")]
    cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, requires = "cert")]
    key: Option<std::path::PathBuf>,
}

impl TlsArgs {
    fn client_tls(&self) -> anyhow::Result<Option<executor_registry::client::ClientTls>> {
        match &self.ca {
            None if self.cert.is_some() => anyhow::bail!("--cert and --key need --ca"),
            None => Ok(None),
            Some(ca) => executor_registry::client::ClientTls::from_files(
                ca,
                self.cert.as_deref(),
                self.key.as_deref(),
            )
            .map(Some)
            .map_err(anyhow::Error::msg),
        }
    }
}

#[derive(Debug, Args)]
struct FleetArgs {
    /// Registry gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:10240")]
    endpoint: String,
    /// Registry Prometheus endpoint, to measure its memory per executor
    /// (e.g. http://127.0.0.1:9464/metrics).
    #[arg(long)]
    metrics: Option<String>,
    /// Fleet size.
    #[arg(long, default_value_t = 10_000)]
    executors: usize,
    /// How heartbeats travel.
    #[arg(long, value_enum, default_value_t = Mode::Stream)]
    mode: Mode,
    /// Connections for registrations and heartbeats (the watch gets one more).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Heartbeat phase after registration (the kill happens at half).
    #[arg(long, value_parser = parse_duration::<Duration>, default_value = "60s")]
    duration: Duration,
    /// TTL the executors ask for [default: 3 × the suggested interval].
    #[arg(long, value_parser = parse_duration::<Duration>)]
    ttl: Option<Duration>,
    /// Share of the fleet that stops heartbeating halfway.
    #[arg(long, default_value_t = 0.1)]
    kill_fraction: f64,
    /// A killed executor counts as late when OFFLINE more than this after
    /// its last OK heartbeat + TTL (raise it where a failover of replicas
    /// falls in between).
    #[arg(long, value_parser = parse_duration::<Duration>, default_value = "1s")]
    expiry_allowance: Duration,
    /// Registrations in flight, over all connections.
    #[arg(long, default_value_t = 1_024)]
    register_concurrency: usize,
    /// Per connection: unary calls, batch calls or stream messages in flight
    /// [default: unary 64, stream 1024, batch 8].
    #[arg(long)]
    inflight: Option<usize>,
    /// Most heartbeats per HeartbeatBatch call.
    #[arg(long, default_value_t = 1_000)]
    batch_size: usize,
    /// Period of progress lines.
    #[arg(long, value_parser = parse_duration::<Duration>, default_value = "5s")]
    progress_every: Duration,
    /// Print one JSON document on stdout instead of the table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Debug, Args)]
struct SoakArgs {
    /// Registry gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:10240")]
    endpoint: String,
    /// Registry Prometheus endpoint.
    #[arg(long, default_value = "http://127.0.0.1:9464/metrics")]
    metrics: String,
    /// Live-set size.
    #[arg(long, default_value_t = 100_000)]
    executors: usize,
    /// Connections for registrations and heartbeats (the watch gets one more).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Churn phase, after the warm-up.
    #[arg(long, value_parser = parse_duration::<Duration>, default_value = "30m")]
    duration: Duration,
    /// Heartbeats without churn after registration, before the baseline sample.
    #[arg(long, value_parser = parse_duration::<Duration>, default_value = "30s")]
    warmup: Duration,
    /// TTL every heartbeat asks for.
    #[arg(long, value_parser = parse_duration::<Duration>, default_value = "15s")]
    ttl: Duration,
    /// Per second: this many executors deregister and as many new ones register.
    #[arg(long, default_value_t = 50.0)]
    churn_rate: f64,
    /// Per second: this many executors stop heartbeating without deregistering
    /// (each must be OFFLINE within TTL + 1 s; its slot then registers a new one).
    #[arg(long, default_value_t = 10.0)]
    kill_rate: f64,
    /// Period of the memory samples from /metrics.
    #[arg(long, value_parser = parse_duration::<Duration>, default_value = "30s")]
    sample_every: Duration,
    /// Largest final ÷ baseline RSS growth that passes (0.10 = 10 %).
    #[arg(long, default_value_t = 0.10)]
    max_rss_growth: f64,
    /// Registrations in flight, over all connections.
    #[arg(long, default_value_t = 512)]
    register_concurrency: usize,
    /// Batch calls in flight per connection.
    #[arg(long, default_value_t = 8)]
    inflight: usize,
    /// Most heartbeats per HeartbeatBatch call.
    #[arg(long, default_value_t = 1_000)]
    batch_size: usize,
    /// Print one JSON document on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct WatchersArgs {
    /// Registry gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:10240")]
    endpoint: String,
    /// Registry Prometheus endpoint, for its watch counters at the end.
    #[arg(long, default_value = "http://127.0.0.1:9464/metrics")]
    metrics: String,
    /// The registry's process id: its RSS is sampled from /proc/<pid>/status
    /// (without it, RSS is neither measured nor judged).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Fleet size.
    #[arg(long, default_value_t = 1_000_000)]
    executors: usize,
    /// Phase A: watchers taking a snapshot at the same moment (one
    /// connection each).
    #[arg(long, default_value_t = 64)]
    watchers: usize,
    /// Phase B: executors that expire together while the watcher stalls.
    #[arg(long, default_value_t = 100_000)]
    expiring: usize,
    /// Phase B: how long the watcher stops reading.
    #[arg(long, value_parser = parse_duration::<Duration>, default_value = "10s")]
    stall: Duration,
    /// Phase B: TTL of the expiring executors' last heartbeat (sent at the
    /// start of the stall).
    #[arg(long, value_parser = parse_duration::<Duration>, default_value = "2s")]
    expiring_ttl: Duration,
    /// TTL of every other heartbeat: longer than the run, at most the
    /// server's --max-heartbeat-ttl.
    #[arg(long, value_parser = parse_duration::<Duration>, default_value = "10m")]
    fleet_ttl: Duration,
    /// Connections for registration and batch heartbeats.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Registrations in flight, over all connections.
    #[arg(long, default_value_t = 1_024)]
    register_concurrency: usize,
    /// Executors of the background heartbeat load.
    #[arg(long, default_value_t = 10_000)]
    beat_sample: usize,
    /// Background heartbeats per second (unary, open loop).
    #[arg(long, default_value_t = 2_000.0)]
    beat_rate: f64,
    /// Connections of the background heartbeat load.
    #[arg(long, default_value_t = 2)]
    beat_connections: usize,
    /// Quiet window before phase A: the baseline RSS and heartbeat latency.
    #[arg(long, value_parser = parse_duration::<Duration>, default_value = "10s")]
    quiet: Duration,
    /// After phase A, until the "after" RSS.
    #[arg(long, value_parser = parse_duration::<Duration>, default_value = "5s")]
    settle: Duration,
    /// Period of the RSS samples.
    #[arg(long, value_parser = parse_duration::<Duration>, default_value = "50ms")]
    rss_every: Duration,
    /// Largest peak ÷ before RSS in phase A that passes.
    #[arg(long, default_value_t = 1.25)]
    max_peak_ratio: f64,
    /// Largest after ÷ before RSS in phase A that passes.
    #[arg(long, default_value_t = 1.10)]
    max_after_ratio: f64,
    /// Heartbeat p99 during phase A passes at most this × the quiet p99…
    #[arg(long, default_value_t = 1.5)]
    max_p99_ratio: f64,
    /// …or at most this much above it, whichever allows more.
    #[arg(long, value_parser = parse_duration::<Duration>, default_value = "1ms")]
    p99_slack: Duration,
    /// Period of progress lines.
    #[arg(long, value_parser = parse_duration::<Duration>, default_value = "5s")]
    progress_every: Duration,
    /// Print one JSON document on stdout instead of the summary.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
    Registry,
    Echo,
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// Connections to the target.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Unary/batch calls in flight, or streams, over all connections.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Requests in flight per stream (stream mode; 1 = ping-pong).
    #[arg(long, default_value_t = 1)]
    window: usize,
    /// Heartbeats per HeartbeatBatch call.
    #[arg(long, default_value_t = 1_000)]
    batch_size: usize,
    /// Measured time per run.
    #[arg(long, value_parser = parse_duration::<Duration>, default_value = "10s")]
    duration: Duration,
    /// Unmeasured time before each run.
    #[arg(long, value_parser = parse_duration::<Duration>, default_value = "1s")]
    warmup: Duration,
    /// Executors registered beforehand (heartbeats cycle through them).
    #[arg(long, default_value_t = 10_000)]
    executors: usize,
    /// TTL of their heartbeats (longer than the whole run).
    #[arg(long, value_parser = parse_duration::<Duration>, default_value = "120s")]
    ttl: Duration,
    /// Print one JSON document on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ThroughputArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Target::Registry)]
    target: Target,
    /// Transport.
    #[arg(long, value_enum, default_value_t = Mode::Unary)]
    mode: Mode,
    /// Registry gRPC endpoint (target registry).
    #[arg(long, default_value = "http://127.0.0.1:10240")]
    endpoint: String,
    /// Echo endpoint (target echo) [default: start `loadtest echo-server` as a child].
    #[arg(long)]
    echo_endpoint: Option<String>,
    #[command(flatten)]
    load: LoadArgs,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// Registry gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:10240")]
    endpoint: String,
    /// Echo endpoint [default: start `loadtest echo-server` as a child].
    #[arg(long)]
    echo_endpoint: Option<String>,
    #[command(flatten)]
    plan: PlanArgs,
}

#[derive(Debug, Args)]
struct TlsCompareArgs {
    /// The `executor-registry` binary [default: next to this one].
    #[arg(long)]
    registry_bin: Option<std::path::PathBuf>,
    /// Server TLS only (no client certificates) instead of mutual TLS.
    #[arg(long)]
    server_only: bool,
    #[command(flatten)]
    plan: PlanArgs,
}

/// How `compare` and `tls-compare` measure both of their targets.
#[derive(Debug, Args)]
struct PlanArgs {
    /// Modes to compare.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "unary,stream,batch"
    )]
    modes: Vec<Mode>,
    /// Measurements per target and mode (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[command(flatten)]
    load: LoadArgs,
}

impl PlanArgs {
    fn plan(&self) -> Plan {
        Plan {
            modes: self.modes.clone(),
            connections: self.load.connections,
            load: self.load.load(Mode::Unary),
            rounds: self.rounds,
            executors: self.load.executors,
            ttl: self.load.ttl,
            progress: true,
        }
    }
}

#[derive(Debug, Args)]
struct EchoServerArgs {
    /// Address to listen on; the first line on stdout says where it listens.
    #[arg(long, default_value = "127.0.0.1:10250")]
    listen: SocketAddr,
}

impl LoadArgs {
    fn load(&self, mode: Mode) -> Load {
        Load {
            mode,
            concurrency: self.concurrency,
            window: self.window,
            batch_size: self.batch_size,
            duration: self.duration,
            warmup: self.warmup,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => run_fleet(cli.fleet).await,
        Some(Command::Fleet(args)) => run_fleet(args).await,
        Some(Command::Throughput(args)) => run_throughput(args).await,
        Some(Command::Compare(args)) => run_compare(args).await,
        Some(Command::TlsCompare(args)) => run_tls_compare(args).await,
        Some(Command::Soak(args)) => run_soak(args).await,
        Some(Command::Watchers(args)) => run_watchers(args).await,
        Some(Command::EchoServer(args)) => run_echo_server(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints `report` on stdout: one JSON document with `--json`, else its
/// table.
fn emit<R: Serialize>(report: &R, json: bool, table: fn(&R) -> String) -> anyhow::Result<()> {
    if json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, report)?;
        writeln!(out)?;
    } else {
        print!("{}", table(report));
    }
    Ok(())
}

/// The exit code of a run with a verdict: 2 when it failed.
fn verdict(passed: bool) -> ExitCode {
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

async fn run_fleet(args: FleetArgs) -> anyhow::Result<ExitCode> {
    let mut config = FleetConfig::new(args.endpoint, args.executors, args.mode);
    config.metrics = args.metrics;
    config.connections = args.connections;
    config.duration = args.duration;
    config.ttl = args.ttl;
    config.kill_fraction = args.kill_fraction;
    config.expiry_allowance = args.expiry_allowance;
    config.register_concurrency = args.register_concurrency;
    config.inflight = args.inflight.unwrap_or(fleet::default_inflight(args.mode));
    config.batch_size = args.batch_size;
    config.progress = true;
    config.progress_every = args.progress_every;
    config.tls = args.tls.client_tls()?;
    let report = fleet::run(&config).await?;
    emit(&report, args.json, report::fleet)?;
    Ok(verdict(report.passed))
}

async fn run_soak(args: SoakArgs) -> anyhow::Result<ExitCode> {
    let mut config = SoakConfig::new(args.endpoint, args.metrics, args.executors);
    config.connections = args.connections;
    config.duration = args.duration;
    config.warmup = args.warmup;
    config.ttl = args.ttl;
    config.churn_rate = args.churn_rate;
    config.kill_rate = args.kill_rate;
    config.sample_every = args.sample_every;
    config.max_rss_growth = args.max_rss_growth;
    config.register_concurrency = args.register_concurrency;
    config.inflight = args.inflight;
    config.batch_size = args.batch_size;
    config.progress = true;
    let report = soak::run(&config).await?;
    emit(&report, args.json, report::soak)?;
    Ok(verdict(report.passed))
}

async fn run_watchers(args: WatchersArgs) -> anyhow::Result<ExitCode> {
    let mut config = WatchersConfig::new(args.endpoint, args.executors);
    config.metrics = Some(args.metrics);
    config.server_pid = args.server_pid;
    config.watchers = args.watchers;
    config.expiring = args.expiring;
    config.stall = args.stall;
    config.expiring_ttl = args.expiring_ttl;
    config.fleet_ttl = args.fleet_ttl;
    config.connections = args.connections;
    config.register_concurrency = args.register_concurrency;
    config.beat_sample = args.beat_sample;
    config.beat_rate = args.beat_rate;
    config.beat_connections = args.beat_connections;
    config.quiet = args.quiet;
    config.settle = args.settle;
    config.rss_every = args.rss_every;
    config.goals.max_peak_ratio = args.max_peak_ratio;
    config.goals.max_after_ratio = args.max_after_ratio;
    config.goals.max_p99_ratio = args.max_p99_ratio;
    config.goals.p99_slack_us = args.p99_slack.as_micros() as u64;
    config.progress = true;
    config.progress_every = args.progress_every;
    let report = watchers::run(&config).await?;
    emit(&report, args.json, report::watchers)?;
    Ok(verdict(report.passed))
}

/// The echo endpoint, starting a child echo server if none is given.
async fn echo_endpoint(
    given: Option<String>,
) -> anyhow::Result<(Option<tokio::process::Child>, String)> {
    match given {
        Some(endpoint) => Ok((None, endpoint)),
        None => {
            let exe = std::env::current_exe().context("cannot find the loadtest executable")?;
            let (child, endpoint) = compare::spawn_echo(&exe).await?;
            Ok((Some(child), endpoint))
        }
    }
}

async fn run_throughput(args: ThroughputArgs) -> anyhow::Result<ExitCode> {
    let (child, endpoint) = match args.target {
        Target::Registry => (None, args.endpoint),
        Target::Echo => echo_endpoint(args.echo_endpoint).await?,
    };
    let load = args.load.load(args.mode);
    let tls = args.tls.client_tls()?;
    let pool = throughput::prepare_with(
        &endpoint,
        args.load.connections,
        args.load.executors,
        args.load.ttl,
        tls.as_ref(),
    )
    .await?;
    let report = throughput::measure(&pool, &load).await;
    drop(child);
    emit(&report, args.load.json, report::throughput)?;
    Ok(ExitCode::SUCCESS)
}

async fn run_compare(args: CompareArgs) -> anyhow::Result<ExitCode> {
    let (child, echo) = echo_endpoint(args.echo_endpoint).await?;
    let config = CompareConfig {
        registry: args.endpoint,
        echo,
        plan: args.plan.plan(),
    };
    let report = compare::run(&config).await?;
    drop(child);
    emit(&report, args.plan.load.json, report::compare)?;
    Ok(ExitCode::SUCCESS)
}

async fn run_tls_compare(args: TlsCompareArgs) -> anyhow::Result<ExitCode> {
    let registry_bin = match args.registry_bin {
        Some(bin) => bin,
        None => std::env::current_exe()
            .context("cannot find the loadtest executable")?
            .with_file_name("executor-registry"),
    };
    let config = TlsCompareConfig {
        registry_bin,
        mutual: !args.server_only,
        plan: args.plan.plan(),
    };
    let report = tls_compare::run(&config).await?;
    emit(&report, args.plan.load.json, report::tls_compare)?;
    Ok(ExitCode::SUCCESS)
}

async fn run_echo_server(args: EchoServerArgs) -> anyhow::Result<ExitCode> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", listener.local_addr()?)?;
        out.flush()?;
    }
    echo::serve(listener, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}
