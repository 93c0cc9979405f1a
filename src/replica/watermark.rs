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

use crate::etcd::{self as client, Etcd, EtcdError, Fence, Keys};
use crate::registry::{Registry, Resume, Status, StoredExecutor};

/// A last-seen watermark: wall-clock ms of a heartbeat, and the TTL it set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Wall-clock ms (Unix epoch) of the heartbeat.
    pub unix_ms: u64,
    /// The TTL that heartbeat asked for.
    pub ttl_ms: u64,
}

impl Seen {
    /// `"<unix_ms> <ttl_ms>"`.
    pub fn encode(&self) -> String {
        format!("{} {}", self.unix_ms, self.ttl_ms)
    }

    /// Parses [`Seen::encode`]'s output.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (seen, ttl) = text.split_once(' ')?;
        Some(Self {
            unix_ms: seen.parse().ok()?,
            ttl_ms: ttl.parse().ok()?,
        })
    }
}

/// Every watermark stored under `keys`: `(key, value)` pairs, to be sorted
/// out by [`keep_known`] once the executors are read too.
pub async fn read(etcd: &Etcd, keys: &Keys) -> Result<Vec<(Vec<u8>, Vec<u8>)>, EtcdError> {
    let kvs = etcd.range_prefix(keys.seen_prefix().as_bytes()).await?;
    Ok(kvs.into_iter().map(|kv| (kv.key, kv.value)).collect())
}

/// The watermarks of `executors` among `read`, by id; the others —
/// watermarks of executors that are gone, or unreadable ones — are deleted
/// (fenced).
pub async fn keep_known(
    etcd: &Etcd,
    keys: &Keys,
    fence: &Fence,
    executors: &[StoredExecutor],
    read: Vec<(Vec<u8>, Vec<u8>)>,
) -> Result<HashMap<String, Seen>, EtcdError> {
    let prefix = keys.seen_prefix().into_bytes();
    let known: std::collections::HashSet<&str> = executors.iter().map(|e| e.id.as_str()).collect();
    let mut orphans = Vec::new();
    let mut seen = HashMap::new();
    for (key, value) in read {
        let id = String::from_utf8_lossy(key.get(prefix.len()..).unwrap_or_default()).into_owned();
        match Seen::decode(&value) {
            Some(s) if known.contains(id.as_str()) => {
                seen.insert(id, s);
            }
            _ => orphans.push(client::delete(key)),
        }
    }
    if !orphans.is_empty() {
        tracing::info!(
            watermarks = orphans.len(),
            "deleting watermarks of gone executors"
        );
        etcd.fenced(fence, orphans).await?;
    }
    Ok(seen)
}

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
        for (entry, _) in running {
            let seen = Seen {
                unix_ms: registry.last_heartbeat_unix_ms(&entry),
                ttl_ms: u64::try_from(entry.ttl().as_millis()).unwrap_or(u64::MAX),
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

    #[test]
    fn watermarks_round_trip_and_garbage_is_refused() {
        let seen = Seen {
            unix_ms: 1_700_000_000_000,
            ttl_ms: 1_500,
        };
        assert_eq!(Seen::decode(seen.encode().as_bytes()), Some(seen));
        assert_eq!(Seen::decode(b"12"), None);
        assert_eq!(Seen::decode(b"a b"), None);
    }
}
