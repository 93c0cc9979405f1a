//! # loadtest
//!
//! Load generators for `executor-registry`, as a library so the smoke test
//! drives the same code as the `loadtest` binary.
//!
//! - [`fleet`] — the fleet simulator: registers N executors against a running
//!   registry, heartbeats each at the server-suggested interval with jitter,
//!   keeps a watch open, stops heartbeating a fraction halfway through and
//!   verifies from the watch that exactly those go OFFLINE, on time.
//! - [`throughput`] — closed-loop heartbeat throughput (unary, stream,
//!   batch) against any `registry.v1.Registry` endpoint; [`compare`] runs it
//!   against the registry and the [`echo`] service in one invocation and
//!   reports the ratio.
//! - [`tls_compare`] — the registry over TLS (mutual by default) against
//!   the same binary in plaintext, in one invocation: the cost of TLS as a
//!   ratio.
//! - [`soak`] — the churn soak: a fleet of constant size that keeps
//!   deregistering, registering and dying for a long time, expiry verified
//!   from a watch and the server's memory sampled from `/metrics`.
//! - [`watchers`] — many watchers snapshotting a large fleet at once, and
//!   one watcher that stops reading while many executors expire together:
//!   the server's RSS (from procfs) and the latency of a steady heartbeat
//!   load, against goals.
//! - [`echo`] — a trivial `registry.v1.Registry` that answers at once: the
//!   bare transport's cost, driven by exactly the same client code.
//!
//! ## Layout
//!
//! - [`client`] — connections and the three heartbeat transports, shared by
//!   every generator (so registry and echo see identical clients).
//! - [`wheel`] — the per-connection timing wheel of heartbeat deadlines.
//! - [`watch`] — the verifying watch (open, chunked snapshots, re-watch by
//!   revision: resumed or a new snapshot).
//! - [`stats`] — latency summaries and error tallies.
//! - [`prom`] — reading the registry's Prometheus `/metrics`.
//! - [`report`] — the human-readable tables.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod compare;
pub mod echo;
pub mod fleet;
pub mod prom;
pub mod report;
pub mod soak;
pub mod stats;
pub mod throughput;
pub mod tls_compare;
pub mod watch;
pub mod watchers;
pub mod wheel;

use serde::Serialize;

/// How heartbeats travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One `Heartbeat` call per heartbeat.
    Unary,
    /// Long-lived `HeartbeatStream`s, pipelined.
    Stream,
    /// `HeartbeatBatch` calls of up to `batch_size` heartbeats.
    Batch,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Unary => "unary",
            Mode::Stream => "stream",
            Mode::Batch => "batch",
        })
    }
}
