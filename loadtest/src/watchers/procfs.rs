//! The server's RSS and CPU, from procfs.
//!
//! Owns: reading `VmRSS` of `--server-pid` from `/proc/<pid>/status`, the
//! CPU seconds of the server and of this process from `/proc/<pid>/stat`,
//! and the sampler of the server's RSS (every `--rss-every`, 50 ms by
//! default).
//!
//! Must not touch: the server beyond its `/proc/<pid>/status` and
//! `/proc/<pid>/stat`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// `VmRSS` of a `/proc/<pid>/status` text, in bytes.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => Some(value * 1024),
        _ => None,
    }
}

/// CPU seconds (user + system) of a `/proc/<pid>/stat` text. Linux
/// reports them in USER_HZ, which is 100 on every architecture it runs on.
pub fn parse_cpu_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) are the 12th and 13th after it.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    parse_cpu_seconds(&std::fs::read_to_string(path).ok()?)
}

/// CPU seconds of the server and of this process at one moment.
#[derive(Debug, Clone, Copy)]
pub(super) struct CpuMark {
    at: Instant,
    server: Option<f64>,
    client: Option<f64>,
}

impl CpuMark {
    pub(super) fn now(server_pid: Option<u32>) -> Self {
        Self {
            at: Instant::now(),
            server: server_pid.and_then(|pid| cpu_seconds(Some(pid))),
            client: cpu_seconds(None),
        }
    }

    /// Cores used by each from `self` to `later`.
    pub(super) fn until(&self, later: &CpuMark) -> CpuUse {
        let wall = (later.at - self.at).as_secs_f64().max(1e-9);
        let cores = |a: Option<f64>, b: Option<f64>| Some((b? - a?) / wall);
        CpuUse {
            server_cores: cores(self.server, later.server),
            loadtest_cores: cores(self.client, later.client),
        }
    }
}

/// Cores used over a window (CPU seconds ÷ wall seconds).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuUse {
    /// By the server (with --server-pid).
    pub server_cores: Option<f64>,
    /// By this load generator.
    pub loadtest_cores: Option<f64>,
}

#[derive(Debug, Clone, Copy)]
struct RssSample {
    /// Seconds since the run started.
    t_s: f64,
    bytes: u64,
}

/// Samples `/proc/<pid>/status` every `every` until stopped.
pub(super) struct RssSampler {
    samples: Arc<Mutex<Vec<RssSample>>>,
    pub(super) last: Arc<AtomicU64>,
    error: Arc<Mutex<Option<String>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

pub(super) fn read_rss(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vm_rss(&text).with_context(|| format!("no VmRSS in {path}"))
}

impl RssSampler {
    pub(super) fn start(pid: u32, every: Duration, start: Instant) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let last = Arc::new(AtomicU64::new(0));
        let error = Arc::new(Mutex::new(None));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (samples, last, error, stop) =
                (samples.clone(), last.clone(), error.clone(), stop.clone());
            async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    match read_rss(pid) {
                        Ok(bytes) => {
                            last.store(bytes, Ordering::Relaxed);
                            samples.lock().unwrap_or_else(PoisonError::into_inner).push(
                                RssSample {
                                    t_s: start.elapsed().as_secs_f64(),
                                    bytes,
                                },
                            );
                        }
                        Err(e) => {
                            *error.lock().unwrap_or_else(PoisonError::into_inner) =
                                Some(format!("{e:#} (the server exited?)"));
                            return;
                        }
                    }
                }
            }
        });
        Self {
            samples,
            last,
            error,
            stop,
            task,
        }
    }

    /// Samples taken in `[from_s, to_s]`.
    pub(super) fn window(&self, from_s: f64, to_s: f64) -> Vec<u64> {
        self.samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|s| s.t_s >= from_s && s.t_s <= to_s)
            .map(|s| s.bytes)
            .collect()
    }

    pub(super) async fn finish(self) -> (usize, Option<String>) {
        self.stop.cancel();
        let _ = self.task.await;
        let n = self
            .samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        let error = self
            .error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        (n, error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_are_utime_plus_stime_in_hundredths() {
        // pid (comm with a space and a parenthesis) state ppid … utime stime …
        let stat = "4242 (exec (x) y) S 1 4242 4242 0 -1 4194560 9000 0 0 0 250 125 0 0 20 0 7 0";
        assert_eq!(parse_cpu_seconds(stat), Some(3.75));
        assert_eq!(parse_cpu_seconds("4242 (x) S 1"), None);
    }

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status =
            "Name:\texecutor-regist\nVmPeak:\t 2000 kB\nVmRSS:\t  123456 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(status), Some(123_456 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\t12 MB\n"), None);
    }
}
