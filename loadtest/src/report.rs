//! Human-readable tables for the reports (`--json` prints the structs
//! themselves).

use std::fmt::Write as _;

use crate::compare::CompareReport;
use crate::fleet::FleetReport;
use crate::stats::Latency;
use crate::throughput::ThroughputReport;
use crate::tls_compare::TlsCompareReport;
use crate::watchers::WatchersReport;

/// `1234567.8` → `1,234,568`.
pub fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 && digits != "0" {
        out.insert(0, '-');
    }
    out
}

/// `p50 / p99 / p99.9 / max` in µs.
pub fn latency(l: &Latency) -> String {
    format!(
        "p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
        thousands(l.p50_us as f64),
        thousands(l.p99_us as f64),
        thousands(l.p999_us as f64),
        thousands(l.max_us as f64)
    )
}

fn row(out: &mut String, key: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "  {key:<28} {value}");
}

/// The fleet run as a table.
pub fn fleet(r: &FleetReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "fleet: {} executors, {} mode, {} connections (+1 watch), {} in flight each{}, TTL {}, kill {:.0}%",
        thousands(r.executors as f64),
        r.mode,
        r.connections,
        r.inflight,
        if r.mode == crate::Mode::Batch {
            format!(", batches ≤ {}", r.batch_size)
        } else {
            String::new()
        },
        r.ttl,
        r.kill_fraction * 100.0
    );
    let g = &r.registration;
    row(
        &mut out,
        "registered",
        format!(
            "{} ({} failed) in {:.1} s",
            thousands(g.registered as f64),
            g.failed,
            g.seconds
        ),
    );
    row(&mut out, "registrations/s", thousands(g.per_s));
    row(&mut out, "registration latency", latency(&g.latency));
    let h = &r.heartbeats;
    row(
        &mut out,
        "heartbeats OK",
        format!("{} in {:.1} s", thousands(h.ok as f64), h.seconds),
    );
    row(&mut out, "heartbeats/s", thousands(h.per_s));
    row(
        &mut out,
        "suggested interval / TTL",
        format!("{} ms / {} ms (largest asked)", h.interval_ms, h.max_ttl_ms),
    );
    row(&mut out, "heartbeat latency", latency(&h.latency));
    row(&mut out, "send slip (client backlog)", latency(&h.slip));
    row(
        &mut out,
        "heartbeats failed / lost",
        format!("{} / {}", h.failed, h.lost),
    );
    let e = &r.expiry;
    row(&mut out, "killed", thousands(e.killed as f64));
    row(
        &mut out,
        "killed seen OFFLINE",
        thousands(e.killed_offline as f64),
    );
    row(&mut out, "killed never OFFLINE", e.killed_not_offline);
    row(&mut out, "killed late (> TTL + 1 s)", e.killed_late);
    row(&mut out, "killed premature (< TTL-1ms)", e.killed_premature);
    row(
        &mut out,
        "expiry lag (ms)",
        format!(
            "p50 {:.1}, p99 {:.1}, max {:.1}, min {:.1} (n = {})",
            e.lag_ms.p50, e.lag_ms.p99, e.lag_ms.max, e.lag_ms.min, e.lag_ms.count
        ),
    );
    row(&mut out, "false expirations", e.false_expirations);
    row(
        &mut out,
        "expired after a late send",
        e.expired_after_late_send,
    );
    row(&mut out, "OFFLINE reasons", e.offline_reasons.summary());
    let w = &r.watch;
    row(
        &mut out,
        "watch",
        format!(
            "{} online, {} running, {} offline events; re-watches {} (lagged {}; resumed {}, \
             new snapshot {}), gaps {}, missing from snapshot {}, revisions up to {} \
             (went backwards {})",
            thousands(w.online_events as f64),
            thousands(w.running_events as f64),
            thousands(w.offline_events as f64),
            w.rewatches,
            w.lagged,
            w.resumes,
            w.resnapshots,
            w.gaps,
            w.missing_from_snapshot,
            w.highest_revision,
            w.backwards
        ),
    );
    row(&mut out, "errors", r.errors.summary());
    if let Some(m) = &r.server {
        let mb = |b: f64| format!("{:.1} MiB", b / (1024.0 * 1024.0));
        row(&mut out, "server RSS before", mb(m.before.rss_bytes));
        if let Some(a) = &m.after_registration {
            row(
                &mut out,
                "server RSS registered",
                format!(
                    "{} with {} executors",
                    mb(a.rss_bytes),
                    thousands(a.executors)
                ),
            );
        }
        if let Some(a) = &m.at_end {
            row(
                &mut out,
                "server RSS at end",
                format!(
                    "{} with {} executors",
                    mb(a.rss_bytes),
                    thousands(a.executors)
                ),
            );
        }
        match m.bytes_per_executor {
            Some(b) => row(
                &mut out,
                "server bytes/executor",
                format!("{b:.0} (RSS delta ÷ registered)"),
            ),
            None => row(
                &mut out,
                "server bytes/executor",
                m.error.as_deref().unwrap_or("unknown"),
            ),
        }
    }
    row(
        &mut out,
        "verification",
        if r.passed {
            "PASSED".to_owned()
        } else {
            format!("FAILED: {}", r.failures.join("; "))
        },
    );
    out
}

/// One throughput measurement as a table.
pub fn throughput(r: &ThroughputReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "throughput: {} {} mode, {} connections, concurrency {}{}, {:.0} s",
        r.endpoint,
        r.load.mode,
        r.connections,
        r.load.concurrency,
        match r.load.mode {
            crate::Mode::Stream => format!(", window {}", r.load.window),
            crate::Mode::Batch => format!(", batch {}", r.load.batch_size),
            crate::Mode::Unary => String::new(),
        },
        r.load.duration.as_secs_f64()
    );
    row(&mut out, "calls/s", thousands(r.calls_per_s));
    row(&mut out, "heartbeats/s", thousands(r.heartbeats_per_s));
    row(&mut out, "latency", latency(&r.latency));
    row(&mut out, "errors", r.errors.summary());
    out
}

/// The comparison as a table.
pub fn compare(r: &CompareReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "compare: {} connections, concurrency {}, stream window {}, batch {}, {} rounds of {:.0} s (medians)",
        r.connections,
        r.load.concurrency,
        r.load.window,
        r.load.batch_size,
        r.rounds,
        r.load.duration.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "  {:<7} {:>14} {:>14} {:>7} {:>8} {:>10} {:>10}  goal",
        "mode", "echo/s", "registry/s", "ratio", "paired", "echo p99", "reg p99"
    );
    for m in &r.modes {
        let _ = writeln!(
            out,
            "  {:<7} {:>14} {:>14} {:>7.3} {:>8.3} {:>8} µs {:>7} µs  {} — {}",
            m.mode.to_string(),
            thousands(m.echo_median),
            thousands(m.registry_median),
            m.ratio,
            m.paired_ratio_median,
            thousands(m.echo_latency.p99_us as f64),
            thousands(m.registry_latency.p99_us as f64),
            m.goal,
            if m.goal_met { "met" } else { "NOT met" }
        );
    }
    for m in &r.modes {
        if m.echo_errors.total() + m.registry_errors.total() > 0 {
            let _ = writeln!(
                out,
                "  {} errors: echo {}; registry {}",
                m.mode,
                m.echo_errors.summary(),
                m.registry_errors.summary()
            );
        }
    }
    out
}

/// The TLS comparison as a table.
pub fn tls_compare(r: &TlsCompareReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "tls-compare ({}): {} connections, concurrency {}, stream window {}, batch {}, {} rounds of {:.0} s (medians)",
        if r.mutual { "mutual TLS" } else { "server TLS" },
        r.connections,
        r.load.concurrency,
        r.load.window,
        r.load.batch_size,
        r.rounds,
        r.load.duration.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "  {:<7} {:>14} {:>14} {:>11} {:>8} {:>10} {:>10}",
        "mode", "plaintext/s", "tls/s", "tls÷plain", "paired", "plain p99", "tls p99"
    );
    for m in &r.modes {
        let _ = writeln!(
            out,
            "  {:<7} {:>14} {:>14} {:>11.3} {:>8.3} {:>7} µs {:>7} µs",
            m.mode.to_string(),
            thousands(m.plaintext_median),
            thousands(m.tls_median),
            m.ratio,
            m.paired_ratio_median,
            thousands(m.plaintext_latency.p99_us as f64),
            thousands(m.tls_latency.p99_us as f64),
        );
    }
    for m in &r.modes {
        if m.plaintext_errors.total() + m.tls_errors.total() > 0 {
            let _ = writeln!(
                out,
                "  {} errors: plaintext {}; tls {}",
                m.mode,
                m.plaintext_errors.summary(),
                m.tls_errors.summary()
            );
        }
    }
    out
}

/// The soak as a table, with its memory curve.
pub fn soak(r: &crate::soak::SoakReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "soak: {} executors, {} connections (+1 watch), TTL {} ms, interval {} ms, \
         churn {}/s deregister + {}/s kill for {:.0} s",
        thousands(r.executors as f64),
        r.connections,
        r.ttl_ms,
        r.interval_ms,
        r.churn_rate,
        r.kill_rate,
        r.churn_seconds
    );
    let c = &r.churn;
    row(
        &mut out,
        "registered",
        format!(
            "{} ({} failed), fleet in {:.1} s",
            thousands(c.registered as f64),
            c.register_failed,
            r.register_seconds
        ),
    );
    row(
        &mut out,
        "deregistered",
        format!(
            "{} ({:.1}/s), OFFLINE seen {}, missing {}",
            thousands(c.deregistered as f64),
            c.deregistrations_per_s,
            thousands(c.deregistered_offline as f64),
            c.deregistered_not_offline
        ),
    );
    row(
        &mut out,
        "killed",
        format!(
            "{} ({:.1}/s), OFFLINE {}, never {}, late {}, premature {}",
            thousands(c.killed as f64),
            c.kills_per_s,
            thousands(c.killed_offline as f64),
            c.killed_not_offline,
            c.killed_late,
            c.killed_premature
        ),
    );
    row(&mut out, "expiry lag", latency(&c.expiry_lag));
    row(
        &mut out,
        "false expirations",
        format!(
            "{} (+{} after a late send), lost {}",
            c.false_expirations, c.expired_after_late_send, c.lost
        ),
    );
    row(
        &mut out,
        "heartbeats",
        format!(
            "{} OK, {} failed",
            thousands(r.heartbeats_ok as f64),
            thousands(r.heartbeats_failed as f64)
        ),
    );
    row(&mut out, "batch latency", latency(&r.heartbeat_latency));
    row(
        &mut out,
        "rewatches",
        format!(
            "{} (resumed {}, new snapshot {})",
            r.rewatches, r.resumes, r.resnapshots
        ),
    );
    if !r.errors.0.is_empty() {
        row(&mut out, "errors", r.errors.summary());
    }
    let _ = writeln!(out, "  memory curve:");
    let _ = writeln!(
        out,
        "  {:>8}  {:<11} {:>9} {:>9} {:>10} {:>8} {:>9} {:>9} {:>10} {:>9}",
        "t (s)",
        "phase",
        "live",
        "server",
        "RSS MiB",
        "CPU s",
        "killed",
        "dereg",
        "tombstones",
        "wheel"
    );
    for s in &r.samples {
        let _ = writeln!(
            out,
            "  {:>8.0}  {:<11} {:>9} {:>9} {:>10.1} {:>8.1} {:>9} {:>9} {:>10} {:>9}",
            s.t_s,
            s.phase,
            s.live,
            s.server_executors,
            s.rss_bytes / 1_048_576.0,
            s.cpu_seconds,
            s.killed,
            s.deregistered,
            s.tombstones,
            s.timing_wheel
        );
    }
    let m = &r.memory;
    row(
        &mut out,
        "RSS baseline → final",
        format!(
            "{:.1} → {:.1} MiB at live {} → {} (ratio {:.3}, peak {:.1} MiB, allowed ≤ {:.2})",
            m.baseline.rss_bytes / 1_048_576.0,
            m.last.rss_bytes / 1_048_576.0,
            m.baseline.live,
            m.last.live,
            m.rss_ratio,
            m.peak_rss_bytes / 1_048_576.0,
            1.0 + r.max_rss_growth
        ),
    );
    verdict(&mut out, r.passed, &r.failures);
    out
}

/// The verdict line, and a line per failed check.
fn verdict(out: &mut String, passed: bool, failures: &[String]) {
    if passed {
        let _ = writeln!(out, "  verdict: passed");
    } else {
        let _ = writeln!(out, "  verdict: FAILED");
        for f in failures {
            let _ = writeln!(out, "    - {f}");
        }
    }
}

/// The watchers scenario as a summary, goals judged at the end.
pub fn watchers(r: &WatchersReport) -> String {
    let mut out = String::new();
    let mib = |b: u64| format!("{:.1}", b as f64 / 1_048_576.0);
    let _ = writeln!(
        out,
        "watchers: {} executors; phase A: {} watchers snapshot at once; phase B: one watcher \
         stops reading {:.0} s while {} expire",
        thousands(r.executors as f64),
        r.watchers,
        r.stall_s,
        thousands(r.expiring as f64)
    );
    row(
        &mut out,
        "registered",
        format!(
            "{} in {:.1} s ({}/s), first heartbeats included",
            thousands(r.executors as f64),
            r.register_s,
            thousands(r.registrations_per_s)
        ),
    );
    let h = &r.heartbeats;
    row(
        &mut out,
        "background heartbeats",
        format!(
            "{}/s unary on {} executors; skipped {}, errors {}",
            thousands(h.rate),
            thousands(h.sample as f64),
            h.skipped,
            h.errors.summary()
        ),
    );
    if let Some(empty) = r.rss_empty_bytes {
        row(&mut out, "server RSS, empty", format!("{} MiB", mib(empty)));
    }
    let _ = writeln!(out, "  phase A");
    let a = &r.snapshots;
    row(
        &mut out,
        "snapshots exact",
        format!(
            "{}/{} (each the whole fleet, every id once; {} revision(s))",
            a.exact, a.watchers, a.revisions
        ),
    );
    row(
        &mut out,
        "time to whole snapshot",
        format!(
            "median {:.2} s, max {:.2} s ({:.0} chunks each; all done in {:.2} s)",
            a.whole_median_s, a.whole_max_s, a.chunks_median, a.phase_s
        ),
    );
    row(
        &mut out,
        "time to first chunk",
        format!(
            "median {:.3} s, max {:.3} s",
            a.first_chunk_median_s, a.first_chunk_max_s
        ),
    );
    if !a.errors.0.is_empty() {
        row(&mut out, "watch errors", a.errors.summary());
    }
    match &r.rss_a {
        Some(m) => row(
            &mut out,
            "RSS before / peak / after",
            format!(
                "{} / {} / {} MiB (peak {:.3} × before, goal ≤ {}; after {:.3} ×, goal ≤ {})",
                mib(m.before_bytes),
                mib(m.peak_bytes),
                mib(m.after_bytes),
                m.peak_ratio,
                r.goals.max_peak_ratio,
                m.after_ratio,
                r.goals.max_after_ratio
            ),
        ),
        None => row(&mut out, "RSS", "not measured (no --server-pid)"),
    }
    row(&mut out, "heartbeats, quiet", latency(&h.quiet));
    row(&mut out, "heartbeats, during A", latency(&h.watchers));
    let cores = |c: Option<f64>| c.map_or_else(|| "?".to_owned(), |c| format!("{c:.2}"));
    row(
        &mut out,
        "cores used, quiet / during A",
        format!(
            "server {} / {}, loadtest {} / {}",
            cores(h.cpu_quiet.server_cores),
            cores(h.cpu_watchers.server_cores),
            cores(h.cpu_quiet.loadtest_cores),
            cores(h.cpu_watchers.loadtest_cores)
        ),
    );
    row(&mut out, "heartbeats, after A", latency(&h.settle));
    let _ = writeln!(out, "  phase B");
    let b = &r.stall;
    row(
        &mut out,
        "snapshot before the stall",
        format!(
            "{} ids in {:.2} s at revision {}{}",
            thousands(b.snapshot_ids as f64),
            b.snapshot_s,
            b.snapshot_revision,
            b.snapshot_problem
                .as_deref()
                .map(|p| format!(" ({p})"))
                .unwrap_or_default()
        ),
    );
    row(
        &mut out,
        "expiring together",
        format!(
            "{} short-TTL heartbeats in {:.2} s; all gone {} into the {:.1} s stall",
            thousands(b.expiring as f64),
            b.expiring_beats_s,
            b.expired_after_s
                .map(|s| format!("{s:.2} s"))
                .unwrap_or_else(|| "not".to_owned()),
            b.stall_s
        ),
    );
    row(
        &mut out,
        "OFFLINE events received",
        format!(
            "{}/{} (reason EXPIRED {}), repeated {}, other executors {}, other events {}",
            thousands(b.offline_received as f64),
            thousands(b.expiring as f64),
            thousands(b.offline_expired as f64),
            b.offline_repeated,
            b.offline_other,
            b.other_events
        ),
    );
    row(
        &mut out,
        "revisions",
        format!(
            "{} events, {} out of order, last {}",
            thousands(b.chain.events as f64),
            b.chain.gaps,
            b.chain.last
        ),
    );
    row(
        &mut out,
        "stream ended by the server",
        format!(
            "{} (lagging {}); re-watches resumed {}, snapshot {}",
            b.server_ended, b.lagged, b.resumes, b.snapshots
        ),
    );
    row(
        &mut out,
        "read after the stall",
        format!("{:.2} s to the last OFFLINE", b.drain_s),
    );
    if !b.errors.0.is_empty() {
        row(&mut out, "watch errors", b.errors.summary());
    }
    if let Some(m) = &r.rss_b {
        row(
            &mut out,
            "RSS before / peak",
            format!(
                "{} / {} MiB ({:.3} × before)",
                mib(m.before_bytes),
                mib(m.peak_bytes),
                m.peak_ratio
            ),
        );
    }
    row(&mut out, "heartbeats, during B", latency(&h.stall));
    if let Some(c) = &r.server {
        row(
            &mut out,
            "server watch counters",
            format!(
                "lagged {}, starts from snapshot {}, from history {}",
                c.watchers_lagged, c.starts_from_snapshot, c.starts_from_history
            ),
        );
    }
    for note in &r.notes {
        let _ = writeln!(out, "  note: {note}");
    }
    verdict(&mut out, r.passed, &r.failures);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
        assert_eq!(thousands(-1_000.0), "-1,000");
    }
}
