//! Registry ÷ bare transport, measured in one run.
//!
//! Both targets get the same pool shape and the same closed loop
//! ([`crate::throughput`]); rounds alternate which goes first, so drift from
//! other work on the machine falls on both. Reported: each target's median
//! over the rounds, the ratio of medians, and the median of the per-round
//! ratios (each round's pair ran seconds apart).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::Mode;
use crate::stats::{Latency, Tally, median};
use crate::throughput::{self, Load, Pool, ThroughputReport};

/// Goal: unary, pipelined stream and batch heartbeats at this fraction of
/// the echo's rate.
pub const RATIO_GOAL: f64 = 0.9;
/// Goal: stream ping-pong (one heartbeat in flight per stream) at this
/// fraction of the echo's rate: nothing but the lookup is added per call.
pub const PING_PONG_GOAL: f64 = 0.95;

/// The registry ÷ echo ratio `mode` with `window` is held to.
fn ratio_goal(mode: Mode, window: usize) -> f64 {
    match mode {
        Mode::Stream if window <= 1 => PING_PONG_GOAL,
        _ => RATIO_GOAL,
    }
}

/// How a comparison measures, the same for both of its targets (the echo
/// and the registry here; plaintext and TLS in [`crate::tls_compare`]).
#[derive(Debug, Clone)]
pub struct Plan {
    /// Modes to measure, in order.
    pub modes: Vec<Mode>,
    /// Connections per target.
    pub connections: usize,
    /// Shape of each measurement (its `mode` is overridden per mode).
    pub load: Load,
    /// Measurements per target and mode.
    pub rounds: usize,
    /// Executors registered per target.
    pub executors: usize,
    /// TTL of their heartbeats.
    pub ttl: Duration,
    /// Print a line per measurement on stderr.
    pub progress: bool,
}

/// What to compare.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    /// The registry's gRPC endpoint.
    pub registry: String,
    /// The echo's gRPC endpoint.
    pub echo: String,
    /// How both are measured.
    pub plan: Plan,
}

/// One mode, both targets.
#[derive(Debug, Clone, Serialize)]
pub struct ModeComparison {
    /// Transport.
    pub mode: Mode,
    /// Echo heartbeats/s, per round.
    pub echo_per_s: Vec<f64>,
    /// Registry heartbeats/s, per round.
    pub registry_per_s: Vec<f64>,
    /// Median of `echo_per_s`.
    pub echo_median: f64,
    /// Median of `registry_per_s`.
    pub registry_median: f64,
    /// `registry_median / echo_median`.
    pub ratio: f64,
    /// Median of the per-round ratios.
    pub paired_ratio_median: f64,
    /// Latency of the echo's median round.
    pub echo_latency: Latency,
    /// Latency of the registry's median round.
    pub registry_latency: Latency,
    /// Errors over all rounds, echo.
    pub echo_errors: Tally,
    /// Errors over all rounds, registry.
    pub registry_errors: Tally,
    /// The goal for this mode and whether the median meets it.
    pub goal: String,
    /// Whether the goal is met.
    pub goal_met: bool,
}

/// Every mode compared.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    /// Connections per target.
    pub connections: usize,
    /// The load shape.
    pub load: Load,
    /// Rounds per target and mode.
    pub rounds: usize,
    /// Per mode.
    pub modes: Vec<ModeComparison>,
}

/// Runs the comparison.
pub async fn run(config: &CompareConfig) -> anyhow::Result<CompareReport> {
    let plan = &config.plan;
    let echo = throughput::prepare(&config.echo, plan.connections, plan.executors, plan.ttl)
        .await
        .context("preparing the echo")?;
    let registry =
        throughput::prepare(&config.registry, plan.connections, plan.executors, plan.ttl)
            .await
            .context("preparing the registry")?;
    let runs = alternate([("echo", &echo), ("registry", &registry)], plan).await;
    let modes = runs
        .into_iter()
        .map(|(mode, [echo_runs, registry_runs])| {
            summarise(mode, plan.load.window, &echo_runs, &registry_runs)
        })
        .collect();
    Ok(CompareReport {
        connections: plan.connections,
        load: plan.load.clone(),
        rounds: plan.rounds.max(1),
        modes,
    })
}

/// Measures both pools `plan.rounds` times per mode, alternating which goes
/// first each round (drift from other work falls on both); per mode, the
/// runs of each pool in round order.
pub async fn alternate(
    pools: [(&str, &Pool); 2],
    plan: &Plan,
) -> Vec<(Mode, [Vec<ThroughputReport>; 2])> {
    let mut out = Vec::new();
    for &mode in &plan.modes {
        let load = Load {
            mode,
            ..plan.load.clone()
        };
        let mut runs: [Vec<ThroughputReport>; 2] = [Vec::new(), Vec::new()];
        for round in 0..plan.rounds.max(1) {
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let (name, pool) = pools[i];
                let report = throughput::measure(pool, &load).await;
                if plan.progress {
                    eprintln!(
                        "compare {mode:>6} round {} {name:>9}: {:>12.0} heartbeats/s  p50 {} µs  p99 {} µs  errors {}",
                        round + 1,
                        report.heartbeats_per_s,
                        report.latency.p50_us,
                        report.latency.p99_us,
                        report.errors.total()
                    );
                }
                runs[i].push(report);
            }
        }
        out.push((mode, runs));
    }
    out
}

/// The runs of one target, summarised.
#[derive(Debug, Clone)]
pub struct Side {
    /// Heartbeats/s, per round.
    pub per_s: Vec<f64>,
    /// Median of `per_s`.
    pub median: f64,
    /// Latency of the median round.
    pub latency: Latency,
    /// Errors over all rounds.
    pub errors: Tally,
}

impl Side {
    /// Summarises `runs`.
    pub fn of(runs: &[ThroughputReport]) -> Self {
        let per_s: Vec<f64> = runs.iter().map(|r| r.heartbeats_per_s).collect();
        let mut errors = Tally::default();
        for r in runs {
            errors.merge(&r.errors);
        }
        Self {
            median: median(&per_s),
            latency: median_latency(runs),
            per_s,
            errors,
        }
    }

    /// `self ÷ baseline`: the ratio of the medians, and the median of the
    /// per-round ratios (0 where the baseline did nothing).
    pub fn ratios(&self, baseline: &Side) -> (f64, f64) {
        let ratio = |t: f64, b: f64| if b > 0.0 { t / b } else { 0.0 };
        let paired: Vec<f64> = self
            .per_s
            .iter()
            .zip(&baseline.per_s)
            .map(|(t, b)| ratio(*t, *b))
            .collect();
        (ratio(self.median, baseline.median), median(&paired))
    }
}

fn summarise(
    mode: Mode,
    window: usize,
    echo: &[ThroughputReport],
    registry: &[ThroughputReport],
) -> ModeComparison {
    let (echo, registry) = (Side::of(echo), Side::of(registry));
    let (ratio, paired_ratio_median) = registry.ratios(&echo);
    let wanted = ratio_goal(mode, window);
    let (goal, goal_met) = (format!("registry ÷ echo ≥ {wanted}"), ratio >= wanted);
    ModeComparison {
        mode,
        echo_latency: echo.latency,
        registry_latency: registry.latency,
        echo_errors: echo.errors,
        registry_errors: registry.errors,
        paired_ratio_median,
        echo_per_s: echo.per_s,
        registry_per_s: registry.per_s,
        echo_median: echo.median,
        registry_median: registry.median,
        ratio,
        goal,
        goal_met,
    }
}

/// The latency of the run whose throughput is the median.
pub fn median_latency(runs: &[ThroughputReport]) -> Latency {
    let mut sorted: Vec<&ThroughputReport> = runs.iter().collect();
    sorted.sort_by(|a, b| a.heartbeats_per_s.total_cmp(&b.heartbeats_per_s));
    sorted
        .get(sorted.len() / 2)
        .map(|r| r.latency)
        .unwrap_or_default()
}

/// Starts `exe echo-server --listen 127.0.0.1:0` as a child process (its own
/// runtime, like the registry's) and returns it with its endpoint. The
/// child is killed when the handle is dropped.
pub async fn spawn_echo(exe: &Path) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(exe)
        .args(["echo-server", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {} echo-server", exe.display()))?;
    let stdout = child.stdout.take().context("echo-server stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .context("echo-server did not say where it listens within 10 s")??
        .context("echo-server exited before listening")?;
    let Some(addr) = line.strip_prefix("listening on ") else {
        bail!("unexpected first line from echo-server: {line:?}");
    };
    Ok((child, format!("http://{}", addr.trim())))
}
