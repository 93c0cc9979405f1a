//! Last-seen watermarks: what a new leader needs to resume each executor with
//! its real remaining TTL instead of a blanket grace.
//!
//! Owns: the leader's writer task (at most one write per executor per
//! `--watermark-interval`: the wall-clock time of its latest heartbeat and
//! its TTL, written only when it changed, in fenced transactions) and the
//! pure arithmetic that turns a watermark into a [`Resume`] at load.
//!
//! Clock assumptions: watermarks are wall-clock (Unix ms) times written by
//! one replica and read by another, so replicas' clocks must agree to well
//! within the failover allowance (NTP keeps them within milliseconds). A
//! clock ahead on the new leader makes executors expire early by the skew,
//! one behind makes them expire late by it.
//!
//! Must not touch: membership (it only reads snapshots).

use std::collections::HashMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::etcd::{self as client, Etcd, EtcdError, Fence};
use crate::registry::{Registry, Resume, Status};
use crate::store::etcd::{Keys, Seen};

/// How a new leader resumes an executor last seen at `seen` (by a watermark
/// that may lag its latest heartbeat by up to `interval`): its deadline as
/// the watermark says, or now if that passed, plus `grace` (the time a live
/// executor needs to reach the new leader).
pub fn resume(seen: Seen, now_unix_ms: u64, interval: Duration, grace: Duration) -> Resume {
    let deadline = seen
        .unix_ms
        .saturating_add(seen.ttl_ms)
        .saturating_add(ms(interval));
    Resume {
        ttl: Duration::from_millis(seen.ttl_ms),
        left: Duration::from_millis(deadline.saturating_sub(now_unix_ms)) + grace,
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The leader's watermark writer: every `interval`, the latest heartbeat of
/// every RUNNING executor whose watermark changed. Returns when `stop` is
/// cancelled, or after cancelling `fenced` when a write is fenced.
pub async fn write_loop(
    registry: Registry,
    etcd: Etcd,
    keys: Keys,
    fence: Fence,
    interval: Duration,
    fenced: CancellationToken,
    stop: CancellationToken,
) {
    let mut written: HashMap<String, Seen> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = fenced.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (running, _) = registry.list(Some(Status::Running), &[]);
        let mut current = HashMap::with_capacity(running.len());
        let mut ops = Vec::new();
        for entry in running {
            let seen = Seen {
                unix_ms: registry.last_heartbeat_unix_ms(&entry),
                ttl_ms: entry.ttl_ms(),
            };
            let id = entry.id().as_str();
            if written.get(id) != Some(&seen) {
                ops.push(client::put(keys.seen(id), seen.encode(), 0));
            }
            current.insert(id.to_owned(), seen);
        }
        let count = ops.len();
        match etcd.fenced(&fence, ops).await {
            Ok(()) => {
                tracing::debug!(watermarks = count, "watermarks written");
                written = current;
            }
            Err(EtcdError::Fenced) => {
                fenced.cancel();
                return;
            }
            Err(e) => {
                // Keep the old map: what failed is written again next time.
                tracing::warn!(error = %e, "cannot write watermarks; retrying next interval");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_recent_watermark_keeps_its_remaining_ttl_plus_the_grace() {
        let seen = Seen {
            unix_ms: 100_000,
            ttl_ms: 10_000,
        };
        // Deadline 100 s + 10 s TTL + 1 s interval = 111 s; now 104 s.
        let r = resume(seen, 104_000, S, 2 * S);
        assert_eq!(r.ttl, Duration::from_secs(10));
        assert_eq!(r.left, Duration::from_secs(7 + 2));
    }

    #[test]
    fn a_passed_deadline_gets_only_the_grace() {
        let seen = Seen {
            unix_ms: 100_000,
            ttl_ms: 1_500,
        };
        let r = resume(seen, 160_000, S, 3 * S);
        assert_eq!(r.left, 3 * S);
    }

    #[test]
    fn huge_values_saturate_instead_of_overflowing() {
        let seen = Seen {
            unix_ms: u64::MAX - 5,
            ttl_ms: 100,
        };
        let r = resume(seen, 0, S, S);
        assert!(r.left > Duration::from_secs(1_000_000));
    }
}
