//! # executor-registry
//!
//! Membership and liveness for a fleet of executors: they register and
//! heartbeat over gRPC; the registry expires the silent ones in one pass,
//! streams every online/offline change to watchers, and serves lock-free
//! snapshots of the live fleet to schedulers.
//!
//! ## Layout
//!
//! - [`registry`] — the core: live table, state words, the single membership
//!   writer (timing wheel, revisions, snapshots, events). No I/O.
//!   It owns its store port (`MembershipStore`), the in-memory store and
//!   the thread that runs a blocking store; it imports no adapter.
//! - [`store`] — the store adapters: SQLite (the default) and etcd.
//! - [`etcd`] — the etcd client and the registry's key layout in etcd, used
//!   by the etcd store and by the replicas.
//! - [`replica`] — several replicas on etcd: election, fencing, forwarding
//!   to the leader, last-seen watermarks and failover.
//! - [`server`] — the gRPC adapter: validation of wire types, error mapping,
//!   health, reflection, graceful shutdown.
//! - [`metrics`] — the Prometheus adapter: metric names (SPEC §4), an
//!   `Observer` holding every handle, the `/metrics` exporter, `process_*`.
//! - [`logging`] — the `tracing` subscriber (`RUST_LOG`) and per-executor
//!   rate limiting of log lines.
//! - [`config`] — command-line flags and their validation.
//! - [`proto`] — the generated `registry.v1` types, for clients and tools
//!   (and the operator API `registry.admin.v1` in [`proto::admin`]);
//!   [`codec`] — their codec (malformed messages are INVALID_ARGUMENT).
//! - [`client`] — the client library: [`client::Membership`] keeps an
//!   executor's lease, [`client::FleetView`] keeps a scheduler's copy of the
//!   live fleet.
//!
//! ## Embedding
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::time::Duration;
//!
//! use executor_registry::registry::{EventKind, Registration, Registry, RegistryConfig};
//!
//! let (registry, task) = Registry::start_in_memory(RegistryConfig::default());
//! let entry = registry
//!     .register(Registration {
//!         name: "worker".into(),
//!         address: "10.0.0.7:9000".into(),
//!         labels: vec![("zone".into(), "a".into())],
//!         owner: None,
//!     })
//!     .await
//!     .unwrap();
//! let mut watch = registry.watch();
//! registry
//!     .heartbeat(entry.id().as_str(), Some(Duration::from_secs(3)))
//!     .unwrap();
//! // The first heartbeat is a membership change: RUNNING, at the next
//! // revision; from that revision on, snapshots schedule it.
//! while watch.next().await.unwrap().kind != EventKind::Running {}
//! assert_eq!(registry.schedulable(&[]).len(), 1);
//! task.stop().await;
//! # }
//! ```
#![forbid(unsafe_code)]
// Tests may wait on real time; the crate's own code may not (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_types, clippy::disallowed_methods))]
#![warn(missing_docs)]

pub mod client;
pub mod codec;
pub mod config;
pub mod etcd;
pub mod logging;
pub mod metrics;
pub mod registry;
pub mod replica;
pub mod server;
pub mod store;

/// The README's Rust examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// Generated `registry.v1` protobuf and gRPC types (and `registry.admin.v1`
/// in [`proto::admin`]).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("registry.v1");
    include!(concat!(env!("OUT_DIR"), "/servers/registry.v1.rs"));

    /// Generated `registry.admin.v1` types: operator calls.
    pub mod admin {
        tonic::include_proto!("registry.admin.v1");
        include!(concat!(env!("OUT_DIR"), "/servers/registry.admin.v1.rs"));
    }

    /// Encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("registry_descriptor");
}
