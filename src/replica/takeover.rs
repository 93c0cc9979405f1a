//! What a new leader knows when it takes over, and what it assumes.
//!
//! Owns: the load at the start of a term — every executor key, every
//! recorded TTL ceiling and the revision floor, read in pages of a bounded
//! size at one etcd revision — and the clean-up of records whose executor
//! is gone.
//!
//! Liveness is not written per heartbeat. The leader records, per
//! executor, only its TTL ceiling — the TTL rounded up to
//! `--watermark-interval` (5 s) — when that ceiling changes (its first
//! heartbeat, a client that changes its TTL), never because it heartbeated:
//! etcd's load is bounded by membership changes, whatever the heartbeat
//! rate. A new leader knows who is a member and each one's TTL ceiling (the
//! init TTL when none is recorded), not when each last heartbeated. It
//! assumes every member may be alive, and gives each its TTL ceiling plus
//! [`takeover_grace`] from the takeover: a live executor reaches the new
//! leader within the grace and heartbeats within its TTL, so none is
//! expired by the takeover; one that died before it (an expiry of the old
//! leader whose delete did not reach etcd included) goes OFFLINE within its
//! TTL + granularity + grace after the takeover.
//!
//! Must not touch: membership after the load (the core owns it).

use std::collections::HashMap;
use std::time::Duration;

use crate::etcd::{self as client, Etcd, EtcdError, Fence, Keys};
use crate::registry::{RegistryConfig, StoredExecutor};
use crate::store::etcd::{decode, decode_ttl};

/// The grace a member gets on top of its TTL at a takeover, for its client
/// to find the new leader: two leases (a client stuck on a paused leader,
/// or on a replica forwarding to it, waits up to a lease for the replicas
/// to notice, then times its call out) plus two suggested heartbeat
/// intervals for `executors` (reconnect backoff is capped by one).
pub fn takeover_grace(lease: Duration, config: &RegistryConfig, executors: usize) -> Duration {
    let spread = Duration::from_millis(
        (executors as u64).saturating_mul(1000) / config.max_heartbeats_per_second.max(1),
    );
    2 * lease + 2 * config.heartbeat_interval.max(spread)
}

/// What a term starts from.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Every member, with its recorded TTL ceiling.
    pub executors: Vec<StoredExecutor>,
    /// The revision floor.
    pub revision_floor: u64,
    /// Records deleted because their executor is gone.
    pub orphans: usize,
}

/// Reads the members, their TTL records and the revision floor (the three
/// reads at once: a new leader serves only after them), then deletes
/// (fenced) the records of executors that are gone, and what an older
/// version kept per heartbeat.
pub async fn load(etcd: &Etcd, keys: &Keys, fence: &Fence) -> Result<Loaded, EtcdError> {
    let executors_prefix = keys.executors();
    let ttl_prefix = keys.ttl_prefix();
    let (executor_kvs, ttl_kvs, revision_floor) = tokio::try_join!(
        etcd.range_prefix(executors_prefix.as_bytes()),
        etcd.range_prefix(ttl_prefix.as_bytes()),
        crate::store::etcd::load_revision_floor(etcd, keys),
    )?;
    let mut ttls: HashMap<String, Duration> = HashMap::with_capacity(ttl_kvs.len());
    let mut orphans = Vec::new();
    for kv in ttl_kvs {
        let id = String::from_utf8_lossy(kv.key.get(ttl_prefix.len()..).unwrap_or_default());
        match decode_ttl(&kv.value) {
            Some(ttl) => {
                ttls.insert(id.into_owned(), ttl);
            }
            None => orphans.push(client::delete(kv.key)),
        }
    }
    let mut executors = Vec::with_capacity(executor_kvs.len());
    for kv in executor_kvs {
        match decode(&kv.value) {
            Ok(mut executor) => {
                executor.ttl = ttls.remove(&executor.id);
                executors.push(executor);
            }
            Err(e) => tracing::warn!(
                key = %String::from_utf8_lossy(&kv.key),
                error = %e,
                "unreadable executor in etcd; skipped"
            ),
        }
    }
    // Records left are of executors that are gone.
    orphans.extend(ttls.into_keys().map(|id| client::delete(keys.ttl(&id))));
    orphans.push(client::delete_prefix(keys.legacy_seen_prefix()));
    let deleted = orphans.len() - 1;
    if deleted > 0 {
        tracing::info!(records = deleted, "deleting TTL records of gone executors");
    }
    etcd.fenced(fence, orphans).await?;
    Ok(Loaded {
        executors,
        revision_floor,
        orphans: deleted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grace_is_two_leases_and_two_suggested_intervals() {
        let config = RegistryConfig {
            heartbeat_interval: Duration::from_millis(500),
            max_heartbeats_per_second: 200_000,
            ..RegistryConfig::default()
        };
        let lease = Duration::from_secs(5);
        assert_eq!(
            takeover_grace(lease, &config, 1_000),
            Duration::from_secs(11)
        );
        // A million executors: the suggested interval is 5 s.
        assert_eq!(
            takeover_grace(lease, &config, 1_000_000),
            Duration::from_secs(20)
        );
    }
}
