//! Durable membership: the adapters that implement the core's store port
//! ([`crate::registry::MembershipStore`]).
//!
//! Stores: [`SqliteStore`] (the default: one WAL-mode SQLite file in the data
//! directory, fsynced at each commit) and [`EtcdStore`] (replicas: one key
//! per executor, fenced by leadership). The port itself, its in-memory
//! implementation ([`crate::registry::MemoryStore`]) and the thread that
//! runs a blocking store live in the core.
//!
//! Must not touch: registry state. A store only persists what it is given.

pub mod etcd;
mod sqlite;

pub use etcd::EtcdStore;
pub use sqlite::SqliteStore;
