//! Command-line flags of `executor-registry serve`, and their validation.
//!
//! Owns: the flag names, defaults and `EXECUTOR_REGISTRY_*` environment
//! variables of SPEC §3, and the translation into [`RegistryConfig`]. Each
//! default is one `DEFAULT_*` constant: the core's settings take theirs from
//! `crate::registry` (the same constants its `Default` uses), the server's
//! from `crate::server`, and the rest are below. Every check that can be
//! made before start-up, alone or across flags, is made in
//! [`ServeArgs::validate`], with a message that names the flag.

use std::collections::HashSet;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::registry::{
    DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_INIT_TTL, DEFAULT_MAX_EXECUTORS,
    DEFAULT_MAX_HEARTBEATS_PER_SECOND, DEFAULT_MAX_TTL, DEFAULT_MIN_TTL, DEFAULT_STALL_THRESHOLD,
    DEFAULT_TOMBSTONE_RETENTION, DEFAULT_WATCH_HISTORY, ExpiryGuardConfig, RegistryConfig,
};
use crate::replica::front::Forwarding;
use crate::server::tls::OutboundTls;
use crate::server::{
    AdminToken, Auth, DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_WATCHERS, DEFAULT_SHUTDOWN_GRACE,
    DEFAULT_SNAPSHOT_RATE_MIB, Security, tls,
};

/// Largest TTL accepted anywhere: the timing wheel cannot hold deadlines
/// beyond ~2 years, and no lease should be anywhere near that.
pub const MAX_TTL_CEILING: Duration = Duration::from_secs(7 * 24 * 3600);
/// Largest `--watch-history` (16 bytes an event: 256 MiB).
pub const MAX_WATCH_HISTORY: usize = 1 << 24;

const WATCH_HISTORY_HELP: &str = "Events the shared watch history holds: a watcher may fall this far behind, or resume from this far back, without a snapshot (--watch-buffer is an alias)";

/// Default gRPC listen address.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10240));
/// Default Prometheus listen address.
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9464));
/// Default directory of the embedded store.
pub const DEFAULT_DATA_DIR: &str = "./data";
/// Default key prefix in etcd.
pub const DEFAULT_ETCD_PREFIX: &str = "/executor-registry";
/// Default leader lease of replicas.
pub const DEFAULT_LEADER_LEASE: Duration = Duration::from_secs(5);
/// Default `--watermark-interval` of replicas.
pub const DEFAULT_WATERMARK_INTERVAL: Duration = Duration::from_secs(5);

/// Parses a humantime duration (`500ms`, `20s`, `5m`): the one parser of
/// every duration flag (`serve`, `ctl`, the load test). `D` is
/// `std::time::Duration`, or `humantime::Duration` where clap shows a
/// default taken from a constant.
pub fn parse_duration<D: From<Duration>>(s: &str) -> Result<D, String> {
    humantime::parse_duration(s)
        .map(D::from)
        .map_err(|e| format!("{e} (use e.g. 500ms, 20s, 5m)"))
}

/// A duration flag whose default comes from a `DEFAULT_*` constant (clap
/// shows defaults through `Display`, which `std::time::Duration` lacks).
type Flag = humantime::Duration;

/// Flags of `executor-registry serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// gRPC listen address.
    #[arg(long, env = "EXECUTOR_REGISTRY_LISTEN", default_value_t = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Prometheus exposition address (`/metrics`).
    #[arg(long, env = "EXECUTOR_REGISTRY_METRICS_LISTEN", default_value_t = DEFAULT_METRICS_LISTEN)]
    pub metrics_listen: SocketAddr,

    /// Directory of the embedded store.
    #[arg(long, env = "EXECUTOR_REGISTRY_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,

    /// TTL from registration (or restart) to the first heartbeat.
    #[arg(long, env = "EXECUTOR_REGISTRY_INIT_HEARTBEAT_TTL", default_value_t = DEFAULT_INIT_TTL.into(), value_parser = parse_duration::<Flag>)]
    pub init_heartbeat_ttl: Flag,

    /// Smallest TTL a heartbeat may ask for.
    #[arg(long, env = "EXECUTOR_REGISTRY_MIN_HEARTBEAT_TTL", default_value_t = DEFAULT_MIN_TTL.into(), value_parser = parse_duration::<Flag>)]
    pub min_heartbeat_ttl: Flag,

    /// Largest TTL a heartbeat may ask for.
    #[arg(long, env = "EXECUTOR_REGISTRY_MAX_HEARTBEAT_TTL", default_value_t = DEFAULT_MAX_TTL.into(), value_parser = parse_duration::<Flag>)]
    pub max_heartbeat_ttl: Flag,

    /// Floor of the heartbeat interval suggested to executors.
    #[arg(long, env = "EXECUTOR_REGISTRY_HEARTBEAT_INTERVAL", default_value_t = DEFAULT_HEARTBEAT_INTERVAL.into(), value_parser = parse_duration::<Flag>)]
    pub heartbeat_interval: Flag,

    /// Total heartbeat rate the suggested interval keeps the fleet under.
    #[arg(
        long,
        env = "EXECUTOR_REGISTRY_MAX_HEARTBEATS_PER_SECOND",
        default_value_t = DEFAULT_MAX_HEARTBEATS_PER_SECOND
    )]
    pub max_heartbeats_per_second: u64,

    /// How long expired or deregistered ids are remembered (late heartbeats
    /// get EXPIRED instead of NOT_FOUND).
    #[arg(long, env = "EXECUTOR_REGISTRY_TOMBSTONE_RETENTION", default_value_t = DEFAULT_TOMBSTONE_RETENTION.into(), value_parser = parse_duration::<Flag>)]
    pub tombstone_retention: Flag,

    /// Events the shared watch history holds: a watcher may fall this far
    /// behind, or resume from this far back, without a snapshot; one
    /// further behind is ended with RESOURCE_EXHAUSTED. `--watch-buffer`
    /// (and `EXECUTOR_REGISTRY_WATCH_BUFFER`) is an accepted alias.
    #[arg(
        long,
        env = "EXECUTOR_REGISTRY_WATCH_HISTORY",
        visible_alias = "watch-buffer",
        value_name = "EVENTS",
        help = format!("{} [default: {DEFAULT_WATCH_HISTORY}]", WATCH_HISTORY_HELP)
    )]
    pub watch_history: Option<usize>,

    /// `EXECUTOR_REGISTRY_WATCH_BUFFER`, the variable of the alias: used
    /// when neither --watch-history nor its variable is given.
    #[arg(
        long = "watch-buffer-variable",
        env = "EXECUTOR_REGISTRY_WATCH_BUFFER",
        hide = true
    )]
    pub watch_buffer_variable: Option<usize>,

    /// A membership-loop turn this much later than due means the registry
    /// was stalled (paused, CPU-starved): executors whose deadlines fell in
    /// the stall have it moved by the stall's length instead of expiring.
    /// 0s disables.
    #[arg(long, env = "EXECUTOR_REGISTRY_STALL_THRESHOLD", default_value_t = DEFAULT_STALL_THRESHOLD.into(), value_parser = parse_duration::<Flag>)]
    pub stall_threshold: Flag,

    /// Most executors at once; registrations beyond it get RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "EXECUTOR_REGISTRY_MAX_EXECUTORS",
        default_value_t = DEFAULT_MAX_EXECUTORS
    )]
    pub max_executors: usize,

    /// Mass-expiry guard (off unless given): when more than this fraction
    /// of the fleet (0 < F ≤ 1) would expire within one TTL, hold those
    /// expirations until heartbeats recover, an operator releases them
    /// (`ctl guard release`) or --expiry-guard-max-hold passes.
    #[arg(
        long,
        env = "EXECUTOR_REGISTRY_EXPIRY_GUARD_FRACTION",
        value_name = "F"
    )]
    pub expiry_guard_fraction: Option<f64>,

    /// Longest the mass-expiry guard holds: then what it still holds expires.
    #[arg(long, env = "EXECUTOR_REGISTRY_EXPIRY_GUARD_MAX_HOLD", default_value_t = ExpiryGuardConfig::DEFAULT_MAX_HOLD.into(), value_parser = parse_duration::<Flag>)]
    pub expiry_guard_max_hold: Flag,

    /// Most open watch streams; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "EXECUTOR_REGISTRY_MAX_WATCHERS", default_value_t = DEFAULT_MAX_WATCHERS)]
    pub max_watchers: usize,

    /// Most MiB of snapshot chunks sent per second, to all watchers
    /// together (0: unlimited): a re-list storm of many watchers must not
    /// take the CPU heartbeats need.
    #[arg(long, env = "EXECUTOR_REGISTRY_SNAPSHOT_RATE", default_value_t = DEFAULT_SNAPSHOT_RATE_MIB, value_name = "MIB_PER_SECOND")]
    pub snapshot_rate: u64,

    /// Most non-heartbeat calls in flight; more are shed with UNAVAILABLE.
    /// Heartbeats are never shed.
    #[arg(
        long,
        env = "EXECUTOR_REGISTRY_MAX_IN_FLIGHT",
        default_value_t = DEFAULT_MAX_IN_FLIGHT
    )]
    pub max_in_flight: usize,

    /// How long a graceful shutdown may take before connections are dropped.
    #[arg(long, env = "EXECUTOR_REGISTRY_SHUTDOWN_GRACE", default_value_t = DEFAULT_SHUTDOWN_GRACE.into(), value_parser = parse_duration::<Flag>)]
    pub shutdown_grace: Flag,

    /// Membership store: `sqlite` (embedded, in --data-dir), `memory`
    /// (nothing survives a restart), or `etcd://host:port[,host:port…]`.
    #[arg(long, env = "EXECUTOR_REGISTRY_STORE", default_value_t = StoreKind::Sqlite)]
    pub store: StoreKind,

    /// Key prefix in etcd.
    #[arg(long, env = "EXECUTOR_REGISTRY_ETCD_PREFIX", default_value = DEFAULT_ETCD_PREFIX)]
    pub etcd_prefix: String,

    /// Leader lease (replicas on etcd).
    #[arg(long, env = "EXECUTOR_REGISTRY_LEADER_LEASE", default_value_t = DEFAULT_LEADER_LEASE.into(), value_parser = parse_duration::<Flag>)]
    pub leader_lease: Flag,

    /// Replicas on etcd: the granularity of the TTL ceilings the leader
    /// records per executor (a TTL is recorded rounded up to a multiple of
    /// it, once per change of that rounding, never per heartbeat); a new
    /// leader assumes the recorded ceiling, so it expires an executor that
    /// died before the takeover up to this much later.
    #[arg(long, env = "EXECUTOR_REGISTRY_WATERMARK_INTERVAL", default_value_t = DEFAULT_WATERMARK_INTERVAL.into(), value_parser = parse_duration::<Flag>)]
    pub watermark_interval: Flag,
    /// Address other replicas and clients reach this one at (default: --listen).
    #[arg(long, env = "EXECUTOR_REGISTRY_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,

    /// Server certificate (PEM).
    #[arg(long, env = "EXECUTOR_REGISTRY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// Server private key (PEM).
    #[arg(long, env = "EXECUTOR_REGISTRY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// CA whose client certificates are accepted (turns on mutual TLS).
    #[arg(long, env = "EXECUTOR_REGISTRY_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// Certificate identities allowed to deregister any executor.
    #[arg(
        long,
        env = "EXECUTOR_REGISTRY_ADMIN_IDENTITIES",
        value_delimiter = ','
    )]
    pub admin_identities: Vec<String>,

    /// File holding the admin bearer token.
    #[arg(long, env = "EXECUTOR_REGISTRY_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Serve `/metrics` over HTTPS too, with --tls-cert and --tls-key (no
    /// client certificates asked).
    #[arg(long, env = "EXECUTOR_REGISTRY_METRICS_TLS")]
    pub metrics_tls: bool,

    /// Replicas with --tls-client-ca: certificate identities of the
    /// replicas, whose connections may name the caller of a call they
    /// forward (default: the identity of this replica's own --tls-cert).
    #[arg(
        long,
        env = "EXECUTOR_REGISTRY_REPLICA_IDENTITIES",
        value_delimiter = ','
    )]
    pub replica_identities: Vec<String>,

    /// Replicas with --tls-cert: CA (PEM) a follower verifies the leader's
    /// certificate against (default: --tls-client-ca; required without it).
    #[arg(long, env = "EXECUTOR_REGISTRY_REPLICA_CA")]
    pub replica_ca: Option<PathBuf>,

    /// CA (PEM) that signed etcd's certificate: talk to etcd over TLS.
    #[arg(long, env = "EXECUTOR_REGISTRY_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,

    /// Client certificate (PEM) presented to etcd (with --etcd-key).
    #[arg(long, env = "EXECUTOR_REGISTRY_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,

    /// Private key (PEM) of --etcd-cert.
    #[arg(long, env = "EXECUTOR_REGISTRY_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
}

/// The security settings the flags describe, files read.
#[derive(Debug, Clone, Default)]
pub struct SecuritySetup {
    /// For the gRPC listener.
    pub grpc: Security,
    /// TLS for the metrics listener (`--metrics-tls`).
    pub metrics_tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// Replicas: how a follower reaches the leader and vouches for its
    /// callers (default for a single process: unused).
    pub forwarding: Forwarding,
    /// Replicas: TLS to etcd (`--etcd-ca`, `--etcd-cert`, `--etcd-key`).
    pub etcd_tls: Option<OutboundTls>,
}

/// Which membership store to run on (`--store`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// Embedded SQLite in `--data-dir`.
    Sqlite,
    /// In memory only.
    Memory,
    /// Replicas on etcd: its endpoints (`host:port`).
    Etcd(Vec<String>),
}

impl FromStr for StoreKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sqlite" => Ok(StoreKind::Sqlite),
            "memory" => Ok(StoreKind::Memory),
            s if s.starts_with("etcd://") => {
                let endpoints: Vec<String> = s["etcd://".len()..]
                    .split(',')
                    .map(|e| e.trim().to_owned())
                    .collect();
                if let Some(bad) = endpoints.iter().find(|e| {
                    e.rsplit_once(':')
                        .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
                }) {
                    return Err(format!("etcd endpoint {bad:?} is not host:port"));
                }
                Ok(StoreKind::Etcd(endpoints))
            }
            other => Err(format!(
                "{other:?} is not a store: use sqlite, memory or etcd://host:port[,host:port…]"
            )),
        }
    }
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreKind::Sqlite => f.write_str("sqlite"),
            StoreKind::Memory => f.write_str("memory"),
            StoreKind::Etcd(endpoints) => write!(f, "etcd://{}", endpoints.join(",")),
        }
    }
}

/// The contents of the file `flag` names; the error names both.
fn read_file(flag: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| ConfigError(format!("{flag} {}: cannot read: {e}", path.display())))
}

/// Items of a comma-separated list flag, trimmed, without empty ones.
fn trimmed(items: &[String]) -> Vec<String> {
    items
        .iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A refused flag combination; the message names the flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ServeArgs {
    /// Checks every flag, alone and against the others; the core's
    /// settings on success. The one place a flag combination is refused.
    pub fn validate(&self) -> Result<RegistryConfig, ConfigError> {
        let err = |s: String| Err(ConfigError(s));
        let show = |d: Duration| humantime::format_duration(d).to_string();
        let (min_ttl, max_ttl) = (*self.min_heartbeat_ttl, *self.max_heartbeat_ttl);
        let (init_ttl, interval) = (*self.init_heartbeat_ttl, *self.heartbeat_interval);
        if min_ttl.is_zero() {
            return err("--min-heartbeat-ttl must be above 0".into());
        }
        if min_ttl > max_ttl {
            return err(format!(
                "--min-heartbeat-ttl ({}) is above --max-heartbeat-ttl ({})",
                show(min_ttl),
                show(max_ttl)
            ));
        }
        for (flag, value) in [
            ("--max-heartbeat-ttl", max_ttl),
            ("--init-heartbeat-ttl", init_ttl),
            ("--tombstone-retention", *self.tombstone_retention),
        ] {
            if value > MAX_TTL_CEILING {
                return err(format!(
                    "{flag} ({}) is above the ceiling of {}",
                    show(value),
                    show(MAX_TTL_CEILING)
                ));
            }
        }
        if init_ttl < Duration::from_millis(1) {
            return err("--init-heartbeat-ttl must be at least 1ms".into());
        }
        if interval.is_zero() {
            return err("--heartbeat-interval must be above 0".into());
        }
        if interval >= max_ttl {
            return err(format!(
                "--heartbeat-interval ({}) must be below --max-heartbeat-ttl ({}), or no client can keep a lease",
                show(interval),
                show(max_ttl)
            ));
        }
        if self.max_heartbeats_per_second == 0 {
            return err("--max-heartbeats-per-second must be above 0".into());
        }
        let watch_history = self.watch_history();
        if watch_history == 0 || watch_history > MAX_WATCH_HISTORY {
            return err(format!(
                "--watch-history ({watch_history}) must be between 1 and {MAX_WATCH_HISTORY}"
            ));
        }
        for (flag, value) in [
            ("--max-executors", self.max_executors),
            ("--max-watchers", self.max_watchers),
            ("--max-in-flight", self.max_in_flight),
        ] {
            if value == 0 {
                return err(format!("{flag} must be above 0"));
            }
        }
        let expiry_guard = self.expiry_guard()?;
        self.check_replicas()?;
        self.check_security()?;
        Ok(RegistryConfig {
            init_ttl,
            min_ttl,
            max_ttl,
            heartbeat_interval: interval,
            max_heartbeats_per_second: self.max_heartbeats_per_second,
            tombstone_retention: *self.tombstone_retention,
            watch_history,
            stall_threshold: *self.stall_threshold,
            max_executors: self.max_executors,
            expiry_guard,
            ttl_record_granularity: *self.watermark_interval,
        })
    }

    /// The mass-expiry guard's settings (None: off).
    fn expiry_guard(&self) -> Result<Option<ExpiryGuardConfig>, ConfigError> {
        let show = |d: Duration| humantime::format_duration(d).to_string();
        let max_hold = *self.expiry_guard_max_hold;
        if max_hold.is_zero() || max_hold > MAX_TTL_CEILING {
            return Err(ConfigError(format!(
                "--expiry-guard-max-hold ({}) must be above 0 and at most {}",
                show(max_hold),
                show(MAX_TTL_CEILING)
            )));
        }
        let Some(fraction) = self.expiry_guard_fraction else {
            return Ok(None);
        };
        // Also refuses NaN: no comparison holds for it.
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(ConfigError(format!(
                "--expiry-guard-fraction ({fraction}) must be above 0 and at most 1 \
                 (e.g. 0.5: hold expirations when more than half the fleet would expire within one TTL)"
            )));
        }
        Ok(Some(ExpiryGuardConfig { fraction, max_hold }))
    }

    /// The flags of replicas on etcd: those that need `--store etcd://`,
    /// and, when it is, their values and combinations.
    fn check_replicas(&self) -> Result<(), ConfigError> {
        let err = |s: String| Err(ConfigError(s));
        let StoreKind::Etcd(_) = self.store else {
            for (flag, given) in [
                ("--etcd-ca", self.etcd_ca.is_some()),
                ("--etcd-cert", self.etcd_cert.is_some()),
                ("--etcd-key", self.etcd_key.is_some()),
                ("--replica-ca", self.replica_ca.is_some()),
                (
                    "--replica-identities",
                    !self.replica_identities().is_empty(),
                ),
            ] {
                if given {
                    return err(format!(
                        "{flag} is for replicas: it only makes sense with --store etcd://host:port (--store is {})",
                        self.store
                    ));
                }
            }
            return Ok(());
        };
        if *self.leader_lease < Duration::from_secs(1) {
            return err(format!(
                "--leader-lease ({}) must be at least 1s (etcd leases count whole seconds)",
                humantime::format_duration(*self.leader_lease)
            ));
        }
        if self.watermark_interval.is_zero() {
            return err("--watermark-interval must be above 0".into());
        }
        if !self.etcd_prefix.starts_with('/') {
            return err(format!(
                "--etcd-prefix {:?} must start with /",
                self.etcd_prefix
            ));
        }
        if self.advertise_address.is_none() && self.listen.ip().is_unspecified() {
            return err(format!(
                "--listen {} is a wildcard address other replicas cannot reach: set --advertise-address host:port",
                self.listen
            ));
        }
        if self.etcd_cert.is_some() != self.etcd_key.is_some() {
            return err("--etcd-cert and --etcd-key go together: give both or neither".into());
        }
        if self.etcd_cert.is_some() && self.etcd_ca.is_none() {
            return err(
                "--etcd-cert/--etcd-key need --etcd-ca: the CA etcd's certificate is verified against (no system roots are loaded)".into(),
            );
        }
        if self.replica_ca.is_some() && self.tls_cert.is_none() {
            return err(
                "--replica-ca needs --tls-cert: without TLS, followers reach the leader in plaintext".into(),
            );
        }
        if self.tls_cert.is_some() && self.tls_client_ca.is_none() && self.replica_ca.is_none() {
            return err(
                "--store etcd:// with --tls-cert but without --tls-client-ca needs --replica-ca: the CA a follower verifies the leader's certificate against".into(),
            );
        }
        if !self.replica_identities().is_empty() && self.tls_client_ca.is_none() {
            return err(
                "--replica-identities needs --tls-client-ca: replicas recognise each other by client certificate".into(),
            );
        }
        Ok(())
    }

    /// `--watch-history`, or its alias's variable, or the default.
    pub fn watch_history(&self) -> usize {
        self.watch_history
            .or(self.watch_buffer_variable)
            .unwrap_or(DEFAULT_WATCH_HISTORY)
    }

    /// The server's overload limits.
    pub fn limits(&self) -> crate::server::Limits {
        crate::server::Limits {
            max_in_flight: self.max_in_flight,
            max_watchers: self.max_watchers,
            snapshot_bytes_per_second: self.snapshot_rate.saturating_mul(1 << 20),
        }
    }

    /// The security flags that only make sense together.
    fn check_security(&self) -> Result<(), ConfigError> {
        let err = |s: &str| Err(ConfigError(s.into()));
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return err("--tls-cert and --tls-key go together: give both or neither");
        }
        let tls = self.tls_cert.is_some();
        if self.tls_client_ca.is_some() && !tls {
            return err("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key");
        }
        if self.metrics_tls && !tls {
            return err("--metrics-tls needs --tls-cert and --tls-key");
        }
        if !self.admin_identities().is_empty() && self.tls_client_ca.is_none() {
            return err(
                "--admin-identities needs --tls-client-ca: identities come from client certificates",
            );
        }
        if self.admin_token_file.is_some() && self.tls_client_ca.is_some() {
            return err(
                "--admin-token-file is for servers without client certificates; with --tls-client-ca, name operators in --admin-identities",
            );
        }
        Ok(())
    }

    /// `--admin-identities`, trimmed, without empty items.
    fn admin_identities(&self) -> Vec<String> {
        trimmed(&self.admin_identities)
    }

    /// `--replica-identities`, trimmed, without empty items.
    fn replica_identities(&self) -> Vec<String> {
        trimmed(&self.replica_identities)
    }

    /// Reads the certificate, key, CA and token files the flags name; the
    /// error names the flag and the file.
    pub fn security(&self) -> Result<SecuritySetup, ConfigError> {
        self.check_security()?;
        self.check_replicas()?;
        let mut setup = SecuritySetup {
            etcd_tls: self.etcd_tls()?,
            ..SecuritySetup::default()
        };
        if let Some(path) = &self.admin_token_file {
            let token = AdminToken::from_file_contents(&read_file("--admin-token-file", path)?)
                .map_err(|why| {
                    ConfigError(format!("--admin-token-file {}: {why}", path.display()))
                })?;
            // A follower proves to the leader that it is a replica with it.
            setup.forwarding.token = Some(token.clone());
            setup.grpc.auth = Auth::Token(token);
        }
        let (Some(cert_path), Some(key_path)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(setup);
        };
        let cert = read_file("--tls-cert", cert_path)?;
        let key = read_file("--tls-key", key_path)?;
        let ca = match &self.tls_client_ca {
            Some(path) => Some(read_file("--tls-client-ca", path)?),
            None => None,
        };
        let named = |e: String| {
            ConfigError(format!(
                "--tls-cert {} / --tls-key {}{}: {e}",
                cert_path.display(),
                key_path.display(),
                self.tls_client_ca
                    .as_ref()
                    .map(|p| format!(" / --tls-client-ca {}", p.display()))
                    .unwrap_or_default()
            ))
        };
        setup.grpc.tls =
            Some(tls::server_config(&cert, &key, ca.as_deref(), &[b"h2"]).map_err(named)?);
        let replicas = matches!(self.store, StoreKind::Etcd(_));
        if ca.is_some() {
            let replica_identities = if replicas {
                self.replica_identities_or_own(cert_path, &cert)?
            } else {
                HashSet::new()
            };
            setup.grpc.auth = Auth::Mutual {
                admins: Arc::new(self.admin_identities().into_iter().collect()),
                replicas: Arc::new(replica_identities),
            };
        }
        if self.metrics_tls {
            setup.metrics_tls =
                Some(tls::server_config(&cert, &key, None, &[b"http/1.1"]).map_err(named)?);
        }
        if replicas {
            setup.forwarding.tls = Some(self.tls_to_the_leader(&cert, &key, ca.as_deref())?);
        }
        Ok(setup)
    }

    /// How a follower connects to the leader when TLS is on: it verifies the
    /// leader against `--replica-ca`, else the client CA (which signed the
    /// replicas' certificates, since they present them to each other), and
    /// under mutual TLS presents its own certificate.
    fn tls_to_the_leader(
        &self,
        cert: &[u8],
        key: &[u8],
        client_ca: Option<&[u8]>,
    ) -> Result<OutboundTls, ConfigError> {
        let (flag, path, ca) = match (&self.replica_ca, &self.tls_client_ca, client_ca) {
            (Some(path), _, _) => ("--replica-ca", path, read_file("--replica-ca", path)?),
            (None, Some(path), Some(pem)) => ("--tls-client-ca", path, pem.to_vec()),
            _ => {
                return Err(ConfigError(
                    "--store etcd:// with --tls-cert but without --tls-client-ca needs --replica-ca"
                        .into(),
                ));
            }
        };
        let identity = client_ca.is_some().then_some((cert, key));
        OutboundTls::new(&ca, identity).map_err(|e| {
            ConfigError(format!(
                "{flag} {} (verifying the leader), with this replica's --tls-cert/--tls-key as its client certificate: {e}",
                path.display()
            ))
        })
    }

    /// Under mutual TLS on etcd: `--replica-identities`, else the identity
    /// of this replica's own certificate — which it presents to the leader
    /// as a client certificate, so it must allow client authentication.
    fn replica_identities_or_own(
        &self,
        cert_path: &Path,
        cert_pem: &[u8],
    ) -> Result<HashSet<String>, ConfigError> {
        let named = |e: String| ConfigError(format!("--tls-cert {}: {e}", cert_path.display()));
        let leaf = tls::certificates(cert_pem)
            .map_err(|e| named(format!("server certificate {e}")))?
            .into_iter()
            .next()
            .expect("certificates() returns at least one or an error");
        if !tls::allows_client_auth(&leaf) {
            return Err(named(
                "replicas present their own certificate to the leader as a client certificate, but its extended key usage lacks clientAuth: issue it for both serverAuth and clientAuth".into(),
            ));
        }
        let listed = self.replica_identities();
        if !listed.is_empty() {
            return Ok(listed.into_iter().collect());
        }
        match tls::identity(&leaf) {
            Some(own) => Ok([own].into()),
            None => Err(named(
                "names no identity (no DNS, URI or e-mail SAN, no CN) to recognise the other replicas by: give --replica-identities".into(),
            )),
        }
    }

    /// TLS to etcd from `--etcd-ca`, `--etcd-cert`, `--etcd-key` (None
    /// without them: plaintext).
    fn etcd_tls(&self) -> Result<Option<OutboundTls>, ConfigError> {
        let Some(ca_path) = &self.etcd_ca else {
            return Ok(None);
        };
        let ca = read_file("--etcd-ca", ca_path)?;
        let identity = match (&self.etcd_cert, &self.etcd_key) {
            (Some(cert), Some(key)) => Some((
                read_file("--etcd-cert", cert)?,
                read_file("--etcd-key", key)?,
            )),
            _ => None,
        };
        let identity = identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice()));
        OutboundTls::new(&ca, identity).map(Some).map_err(|e| {
            let files = [
                ("--etcd-ca", Some(ca_path)),
                ("--etcd-cert", self.etcd_cert.as_ref()),
                ("--etcd-key", self.etcd_key.as_ref()),
            ]
            .iter()
            .filter_map(|(flag, path)| path.map(|p| format!("{flag} {}", p.display())))
            .collect::<Vec<_>>()
            .join(" / ");
            ConfigError(format!("{files}: {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> ServeArgs {
        let mut argv = vec!["serve"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect("flags parse").serve
    }

    #[test]
    fn defaults_match_the_spec() {
        let a = parse(&[]);
        assert_eq!(a.listen.to_string(), "127.0.0.1:10240");
        assert_eq!(a.metrics_listen.to_string(), "127.0.0.1:9464");
        assert_eq!(a.data_dir, PathBuf::from("./data"));
        let c = a.validate().unwrap();
        assert_eq!(c.init_ttl, Duration::from_secs(20));
        assert_eq!(c.min_ttl, Duration::from_millis(100));
        assert_eq!(c.max_ttl, Duration::from_secs(600));
        assert_eq!(c.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(c.max_heartbeats_per_second, 200_000);
        assert_eq!(c.tombstone_retention, Duration::from_secs(600));
        assert_eq!(c.watch_history, 262_144);
        assert_eq!(c.expiry_guard, None, "the expiry guard is opt-in");
        assert_eq!(a.store, StoreKind::Sqlite);
    }

    #[test]
    fn a_wildcard_listen_address_needs_an_advertise_address_with_replicas() {
        let wildcard = [
            "--store",
            "etcd://127.0.0.1:2379",
            "--listen",
            "0.0.0.0:10240",
        ];
        let e = parse(&wildcard).validate().unwrap_err().to_string();
        assert!(e.contains("--advertise-address"), "{e}");
        let mut named = wildcard.to_vec();
        named.extend(["--advertise-address", "10.0.0.5:10240"]);
        parse(&named).validate().expect("named");
        // Without replicas nobody needs to reach this one by address.
        parse(&["--listen", "0.0.0.0:10240"])
            .validate()
            .expect("one process");
    }

    #[test]
    fn the_watch_history_takes_its_flag_or_the_old_name() {
        assert_eq!(parse(&["--watch-history", "64"]).watch_history(), 64);
        assert_eq!(parse(&["--watch-buffer", "128"]).watch_history(), 128);
        let old_variable = parse(&["--watch-buffer-variable", "256"]);
        assert_eq!(old_variable.watch_history(), 256);
        let both = parse(&["--watch-history", "64", "--watch-buffer-variable", "256"]);
        assert_eq!(both.watch_history(), 64, "the flag wins");
        let help = Cli::command().render_help().to_string();
        assert!(
            help.contains(&format!("[default: {DEFAULT_WATCH_HISTORY}]")),
            "{help}"
        );
        assert!(!help.contains("watch-buffer-variable"), "hidden");
    }

    #[test]
    fn etcd_endpoints_are_parsed() {
        let a = parse(&["--store", "etcd://127.0.0.1:2379, 127.0.0.2:2379"]);
        assert_eq!(
            a.store,
            StoreKind::Etcd(vec!["127.0.0.1:2379".into(), "127.0.0.2:2379".into()])
        );
    }

    #[test]
    fn the_expiry_guard_takes_a_fraction_and_a_max_hold() {
        let c = parse(&["--expiry-guard-fraction", "0.3"])
            .validate()
            .unwrap();
        assert_eq!(
            c.expiry_guard,
            Some(ExpiryGuardConfig {
                fraction: 0.3,
                max_hold: ExpiryGuardConfig::DEFAULT_MAX_HOLD,
            })
        );
        let c = parse(&[
            "--expiry-guard-fraction",
            "1",
            "--expiry-guard-max-hold",
            "90s",
        ])
        .validate()
        .unwrap();
        assert_eq!(
            c.expiry_guard,
            Some(ExpiryGuardConfig {
                fraction: 1.0,
                max_hold: Duration::from_secs(90),
            })
        );
        for bad in ["0", "-0.1", "1.01", "NaN", "inf"] {
            let flag = format!("--expiry-guard-fraction={bad}");
            let e = parse(&[&flag]).validate().unwrap_err().to_string();
            assert!(e.contains("--expiry-guard-fraction"), "{bad}: {e}");
        }
        assert!(Cli::try_parse_from(["serve", "--expiry-guard-fraction", "half"]).is_err());
        let e = parse(&[
            "--expiry-guard-fraction",
            "0.5",
            "--expiry-guard-max-hold",
            "0s",
        ])
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("--expiry-guard-max-hold"), "{e}");
    }

    #[test]
    fn humantime_durations_parse() {
        let a = parse(&[
            "--init-heartbeat-ttl",
            "1m30s",
            "--min-heartbeat-ttl",
            "250ms",
        ]);
        assert_eq!(*a.init_heartbeat_ttl, Duration::from_secs(90));
        assert_eq!(*a.min_heartbeat_ttl, Duration::from_millis(250));
        assert!(Cli::try_parse_from(["serve", "--init-heartbeat-ttl", "soon"]).is_err());
    }

    #[test]
    fn min_ttl_above_max_ttl_is_refused_naming_both_flags() {
        let a = parse(&["--min-heartbeat-ttl", "5m", "--max-heartbeat-ttl", "1m"]);
        let e = a.validate().unwrap_err().to_string();
        assert!(
            e.contains("--min-heartbeat-ttl") && e.contains("--max-heartbeat-ttl"),
            "{e}"
        );
    }

    #[test]
    fn nonsense_values_are_refused() {
        for args in [
            &["--watch-buffer", "0"][..],
            &["--watch-history", "0"],
            &["--watch-history", "16777217"],
            &["--max-executors", "0"],
            &["--max-watchers", "0"],
            &["--max-in-flight", "0"],
            &["--max-heartbeats-per-second", "0"],
            &["--min-heartbeat-ttl", "0s"],
            &["--heartbeat-interval", "0s"],
            &["--heartbeat-interval", "20m"],
            &["--max-heartbeat-ttl", "1000days"],
            &[
                "--store",
                "etcd://127.0.0.1:2379",
                "--leader-lease",
                "500ms",
            ],
            &["--store", "etcd://127.0.0.1:2379", "--etcd-prefix", "x"],
            &[
                "--store",
                "etcd://127.0.0.1:2379",
                "--listen",
                "0.0.0.0:10240",
            ],
            &["--tls-cert", "/tmp/cert.pem"],
            &["--tls-key", "/tmp/key.pem"],
            &["--tls-client-ca", "/tmp/ca.pem"],
            &["--metrics-tls"],
            &["--admin-identities", "ops"],
            &[
                "--tls-cert",
                "c",
                "--tls-key",
                "k",
                "--tls-client-ca",
                "ca",
                "--admin-token-file",
                "t",
            ],
        ] {
            assert!(
                parse(args).validate().is_err(),
                "{args:?} should be refused"
            );
        }
        // A store that is not one is refused as the flag is parsed, naming it.
        for store in ["postgres", "etcd://", "etcd://127.0.0.1:2379,nohost"] {
            let e = Cli::try_parse_from(["serve", "--store", store])
                .err()
                .unwrap_or_else(|| panic!("--store {store} should be refused"))
                .to_string();
            assert!(e.contains("--store"), "{e}");
        }
    }

    #[test]
    fn security_files_are_read_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let a = parse(&["--admin-token-file", token.to_str().unwrap()]);
        a.validate().unwrap();
        let setup = a.security().unwrap();
        assert!(setup.grpc.tls.is_none());
        assert!(matches!(&setup.grpc.auth, Auth::Token(t) if t.matches(b"s3cret")));

        std::fs::write(&token, "\n").unwrap();
        let e = a.security().unwrap_err().to_string();
        assert!(
            e.contains("--admin-token-file") && e.contains("empty"),
            "{e}"
        );

        let missing = dir.path().join("nope.pem");
        let m = missing.to_str().unwrap();
        let e = parse(&["--tls-cert", m, "--tls-key", m])
            .security()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--tls-cert") && e.contains("nope.pem"), "{e}");
    }

    #[test]
    fn certificate_flags_make_tls_and_a_client_ca_makes_it_mutual() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        let (c, k) = (c.to_str().unwrap(), k.to_str().unwrap());
        let plain = parse(&["--tls-cert", c, "--tls-key", k, "--metrics-tls"]);
        plain.validate().unwrap();
        let setup = plain.security().unwrap();
        assert!(setup.grpc.tls.is_some() && setup.metrics_tls.is_some());
        assert!(matches!(setup.grpc.auth, Auth::Open));

        let mutual = parse(&[
            "--tls-cert",
            c,
            "--tls-key",
            k,
            "--tls-client-ca",
            c,
            "--admin-identities",
            "ops, sched,",
        ]);
        mutual.validate().unwrap();
        match mutual.security().unwrap().grpc.auth {
            Auth::Mutual { admins, .. } => {
                let mut names: Vec<_> = admins.iter().cloned().collect();
                names.sort();
                assert_eq!(names, ["ops", "sched"]);
            }
            other => panic!("{other:?}"),
        }
        // A key file that is not a key is named.
        let e = parse(&["--tls-cert", c, "--tls-key", c])
            .security()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--tls-key") && e.contains("key"), "{e}");
    }

    /// A CA and, signed by it, a certificate for `localhost`/`127.0.0.1`
    /// with `usages` (none: no extended key usage extension), as files.
    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new(usages: &[rcgen::ExtendedKeyUsagePurpose], sans: &[&str]) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca_cert = ca.self_signed(&ca_key).unwrap();
            let issuer = rcgen::Issuer::new(ca, ca_key);
            let key = rcgen::KeyPair::generate().unwrap();
            let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
            let mut params = rcgen::CertificateParams::new(sans).unwrap();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params.extended_key_usages = usages.to_vec();
            let cert = params.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
            std::fs::write(dir.path().join("c.pem"), cert.pem()).unwrap();
            std::fs::write(dir.path().join("k.pem"), key.serialize_pem()).unwrap();
            Self { dir }
        }

        fn path(&self, name: &str) -> String {
            self.dir.path().join(name).to_str().unwrap().to_owned()
        }

        /// Replicas on etcd with mutual TLS from these files, then `extra`.
        fn replica_mtls(&self, extra: &[&str]) -> ServeArgs {
            let (c, k, ca) = (self.path("c.pem"), self.path("k.pem"), self.path("ca.pem"));
            let mut args = vec![
                "--store",
                ETCD,
                "--tls-cert",
                &c,
                "--tls-key",
                &k,
                "--tls-client-ca",
                &ca,
            ];
            args.extend_from_slice(extra);
            parse(&args)
        }
    }

    const ETCD: &str = "etcd://127.0.0.1:2379";

    #[test]
    fn every_security_flag_is_accepted_with_replicas() {
        let both = [
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let f = Files::new(&both, &["replica.fleet", "127.0.0.1"]);
        let (c, k, ca) = (f.path("c.pem"), f.path("k.pem"), f.path("ca.pem"));
        let token = f.path("token");
        std::fs::write(&token, "s3cret").unwrap();

        // Mutual TLS: the replicas are known by this one's own identity,
        // and a follower presents its certificate to the leader.
        let mutual = f.replica_mtls(&["--admin-identities", "ops", "--metrics-tls"]);
        mutual.validate().unwrap();
        let setup = mutual.security().unwrap();
        match &setup.grpc.auth {
            Auth::Mutual { replicas, .. } => {
                assert_eq!(replicas.iter().collect::<Vec<_>>(), ["replica.fleet"]);
            }
            other => panic!("{other:?}"),
        }
        let tls = setup.forwarding.tls.as_ref().expect("TLS to the leader");
        assert!(tls.has_client_certificate());
        assert!(setup.forwarding.token.is_none());
        assert!(setup.metrics_tls.is_some());

        // --replica-identities overrides.
        let listed = f.replica_mtls(&["--replica-identities", "r1, r2,"]);
        match listed.security().unwrap().grpc.auth {
            Auth::Mutual { replicas, .. } => {
                let mut names: Vec<_> = replicas.iter().cloned().collect();
                names.sort();
                assert_eq!(names, ["r1", "r2"]);
            }
            other => panic!("{other:?}"),
        }

        // Token mode over TLS: the leader verified against --replica-ca, no
        // client certificate, the token as the replica's proof.
        let token_tls = parse(&[
            "--store",
            ETCD,
            "--tls-cert",
            &c,
            "--tls-key",
            &k,
            "--replica-ca",
            &ca,
            "--admin-token-file",
            &token,
        ]);
        token_tls.validate().unwrap();
        let setup = token_tls.security().unwrap();
        assert!(
            !setup
                .forwarding
                .tls
                .as_ref()
                .unwrap()
                .has_client_certificate()
        );
        assert!(setup.forwarding.token.as_ref().unwrap().matches(b"s3cret"));
        // Plaintext token mode.
        let plain = parse(&["--store", ETCD, "--admin-token-file", &token]);
        plain.validate().unwrap();
        let setup = plain.security().unwrap();
        assert!(setup.forwarding.tls.is_none() && setup.forwarding.token.is_some());
        // A single process recognises no replica.
        let single = parse(&["--tls-cert", &c, "--tls-key", &k, "--tls-client-ca", &ca]);
        match single.security().unwrap().grpc.auth {
            Auth::Mutual { replicas, .. } => assert!(replicas.is_empty()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_replica_certificate_must_allow_client_authentication_and_name_an_identity() {
        let server_only = Files::new(&[rcgen::ExtendedKeyUsagePurpose::ServerAuth], &["r.fleet"]);
        let e = server_only
            .replica_mtls(&[])
            .security()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--tls-cert") && e.contains("clientAuth"), "{e}");
        // Without replicas the same certificate is fine.
        let (c, k, ca) = (
            server_only.path("c.pem"),
            server_only.path("k.pem"),
            server_only.path("ca.pem"),
        );
        parse(&["--tls-cert", &c, "--tls-key", &k, "--tls-client-ca", &ca])
            .security()
            .unwrap();

        // No extended key usage at all allows every usage; but a
        // certificate without a name needs --replica-identities.
        let nameless = Files::new(&[], &["127.0.0.1"]);
        let e = nameless
            .replica_mtls(&[])
            .security()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--replica-identities"), "{e}");
        nameless
            .replica_mtls(&["--replica-identities", "r1"])
            .security()
            .unwrap();
    }

    #[test]
    fn replica_and_etcd_tls_flags_are_refused_where_they_make_no_sense() {
        for (args, named) in [
            (&["--etcd-ca", "ca.pem"][..], "--etcd-ca"),
            (
                &["--etcd-cert", "c.pem", "--etcd-key", "k.pem"],
                "--etcd-cert",
            ),
            (&["--replica-ca", "ca.pem"], "--replica-ca"),
            (&["--replica-identities", "r1"], "--replica-identities"),
            (&["--store", ETCD, "--etcd-cert", "c.pem"], "--etcd-key"),
            (&["--store", ETCD, "--etcd-key", "k.pem"], "--etcd-cert"),
            (
                &[
                    "--store",
                    ETCD,
                    "--etcd-cert",
                    "c.pem",
                    "--etcd-key",
                    "k.pem",
                ],
                "--etcd-ca",
            ),
            (&["--store", ETCD, "--replica-ca", "ca.pem"], "--tls-cert"),
            (
                &["--store", ETCD, "--tls-cert", "c", "--tls-key", "k"],
                "--replica-ca",
            ),
            (
                &[
                    "--store",
                    ETCD,
                    "--tls-cert",
                    "c",
                    "--tls-key",
                    "k",
                    "--replica-ca",
                    "ca",
                    "--replica-identities",
                    "r1",
                ],
                "--tls-client-ca",
            ),
        ] {
            let e = parse(args)
                .validate()
                .expect_err(&format!("{args:?} should be refused"))
                .to_string();
            assert!(e.contains(named), "{args:?}: {e}");
        }
        // TLS to etcd without a client certificate is fine.
        parse(&["--store", ETCD, "--etcd-ca", "ca.pem"])
            .validate()
            .unwrap();
    }

    #[test]
    fn etcd_tls_files_are_read_and_a_bad_one_is_named() {
        let both = [
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let f = Files::new(&both, &["etcd-client"]);
        let (c, k, ca) = (f.path("c.pem"), f.path("k.pem"), f.path("ca.pem"));
        let setup = parse(&[
            "--store",
            ETCD,
            "--etcd-ca",
            &ca,
            "--etcd-cert",
            &c,
            "--etcd-key",
            &k,
        ])
        .security()
        .unwrap();
        assert!(setup.etcd_tls.unwrap().has_client_certificate());
        let setup = parse(&["--store", ETCD, "--etcd-ca", &ca])
            .security()
            .unwrap();
        assert!(!setup.etcd_tls.unwrap().has_client_certificate());

        let missing = f.path("nope.pem");
        let e = parse(&["--store", ETCD, "--etcd-ca", &missing])
            .security()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--etcd-ca") && e.contains("nope.pem"), "{e}");
        // A key that is not one (the certificate given twice) is named.
        let e = parse(&[
            "--store",
            ETCD,
            "--etcd-ca",
            &ca,
            "--etcd-cert",
            &c,
            "--etcd-key",
            &c,
        ])
        .security()
        .unwrap_err()
        .to_string();
        assert!(e.contains("--etcd-key") && e.contains("key"), "{e}");
        // A key of another certificate.
        let other = Files::new(&both, &["other"]);
        let e = parse(&[
            "--store",
            ETCD,
            "--etcd-ca",
            &ca,
            "--etcd-cert",
            &c,
            "--etcd-key",
            &other.path("k.pem"),
        ])
        .security()
        .unwrap_err()
        .to_string();
        assert!(e.contains("do not match"), "{e}");
    }
}
