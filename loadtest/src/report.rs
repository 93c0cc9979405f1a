//! Human-readable tables for the three reports (`--json` prints the
//! structs themselves).

use std::fmt::Write as _;

use crate::compare::CompareReport;
use crate::fleet::FleetReport;
use crate::stats::Latency;
use crate::throughput::ThroughputReport;
use crate::tls_compare::TlsCompareReport;

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
            "{} online, {} offline events; re-watches {} (lagged {}), missing from snapshot {}",
            thousands(w.online_events as f64),
            thousands(w.offline_events as f64),
            w.rewatches,
            w.lagged,
            w.missing_from_snapshot
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
