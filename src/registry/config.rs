//! The core's settings and their defaults.
//!
//! Owns: [`RegistryConfig`] and one `DEFAULT_*` constant per default. The
//! command line (`serve`'s flags) takes its defaults from these same
//! constants, so a default is written once.
//!
//! Must not touch: anything at run time; these are plain values.

use std::time::Duration;

use super::guard::ExpiryGuardConfig;

/// Default TTL from registration (or start-up load) to the first heartbeat.
pub const DEFAULT_INIT_TTL: Duration = Duration::from_secs(20);
/// Default smallest TTL a heartbeat may ask for.
pub const DEFAULT_MIN_TTL: Duration = Duration::from_millis(100);
/// Default largest TTL a heartbeat may ask for.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(600);
/// Default floor of the suggested heartbeat interval.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// Default fleet-wide heartbeat rate the suggested interval aims at.
pub const DEFAULT_MAX_HEARTBEATS_PER_SECOND: u64 = 200_000;
/// Default time expired and deregistered ids are remembered.
pub const DEFAULT_TOMBSTONE_RETENTION: Duration = Duration::from_secs(600);
/// Default number of events the watch history holds.
pub const DEFAULT_WATCH_HISTORY: usize = 262_144;
/// Default stall threshold of pause compensation.
pub const DEFAULT_STALL_THRESHOLD: Duration = Duration::from_secs(1);
/// Default most executors live at once.
pub const DEFAULT_MAX_EXECUTORS: usize = 2_000_000;
/// Default granularity of the TTL ceilings a store that records TTLs keeps
/// (replicas on etcd: `--watermark-interval`).
pub const DEFAULT_TTL_RECORD_GRANULARITY: Duration = Duration::from_secs(5);
/// Most heartbeats in one `HeartbeatBatch`.
pub const MAX_BATCH: usize = 10_000;

/// Liveness and fan-out settings of the core (the CLI's flags map onto it).
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// TTL from registration (or start-up load) to the first heartbeat.
    pub init_ttl: Duration,
    /// Smallest TTL a heartbeat may ask for.
    pub min_ttl: Duration,
    /// Largest TTL a heartbeat may ask for.
    pub max_ttl: Duration,
    /// Floor of the suggested heartbeat interval.
    pub heartbeat_interval: Duration,
    /// The fleet's total heartbeat rate the suggested interval aims at.
    pub max_heartbeats_per_second: u64,
    /// How long expired/deregistered ids are remembered.
    pub tombstone_retention: Duration,
    /// Events the shared watch history holds: a watcher may fall this far
    /// behind, or resume from this far back, without a snapshot.
    pub watch_history: usize,
    /// A membership-loop turn this much later than its 100 ms tick means the
    /// registry was stalled: deadlines that fell in the stall are moved by
    /// its length instead of expiring. Zero disables the compensation.
    pub stall_threshold: Duration,
    /// Most executors live (and being registered) at once; registrations
    /// beyond it are refused with `ResourceExhausted`.
    pub max_executors: usize,
    /// The mass-expiry guard (None: off, the default); its rule is in
    /// `registry/guard.rs`.
    pub expiry_guard: Option<ExpiryGuardConfig>,
    /// For a store that records TTLs: each executor's TTL is recorded
    /// rounded up to a multiple of this, so a TTL that drifts costs a write
    /// per step of it, not per heartbeat; a registry taking over assumes
    /// the recorded ceiling (up to this much longer than the real TTL).
    pub ttl_record_granularity: Duration,
}

impl RegistryConfig {
    /// The TTL ceiling (ms) recorded for a TTL of `ttl_ms`.
    pub(crate) fn ttl_ceiling_ms(&self, ttl_ms: u64) -> u64 {
        let step = u64::try_from(self.ttl_record_granularity.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        ttl_ms.div_ceil(step).saturating_mul(step)
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            init_ttl: DEFAULT_INIT_TTL,
            min_ttl: DEFAULT_MIN_TTL,
            max_ttl: DEFAULT_MAX_TTL,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            max_heartbeats_per_second: DEFAULT_MAX_HEARTBEATS_PER_SECOND,
            tombstone_retention: DEFAULT_TOMBSTONE_RETENTION,
            watch_history: DEFAULT_WATCH_HISTORY,
            stall_threshold: DEFAULT_STALL_THRESHOLD,
            max_executors: DEFAULT_MAX_EXECUTORS,
            expiry_guard: None,
            ttl_record_granularity: DEFAULT_TTL_RECORD_GRANULARITY,
        }
    }
}
