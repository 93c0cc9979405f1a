//! Client library: what executors and schedulers use instead of hand-written
//! gRPC loops.
//!
//! Owns: nothing shared with the server. Two handles, each with one
//! background task that owns all of its state:
//!
//! - [`Membership`] — an executor's lease: registers, heartbeats over one
//!   `HeartbeatStream` at the server's suggested interval, reconnects across
//!   endpoints, re-registers when the registry forgot it, and tells the
//!   application through a [`tokio::sync::watch`] of [`MembershipState`].
//! - [`FleetView`] — a scheduler's local copy of the live fleet, each
//!   member INITING or RUNNING, kept from `WatchExecutors`; when the watch
//!   ends (lag, restart, network) it watches again from the last revision it
//!   applied and resumes from the registry's history, or, when that no
//!   longer holds what it missed, turns a fresh snapshot into the changes it
//!   missed, so its consumer never misses one.
//!
//! Both end their task when dropped (a `CancellationToken` in a drop guard)
//! and every `async fn` here is cancel-safe: dropping the future leaves no
//! task behind.
//!
//! Shared plumbing lives in the private submodules: endpoint lists and
//! channel settings (`endpoints`), backoff and jitter (`backoff`), errors
//! and retry classification (`error`). Every connection decodes with gRPC's
//! default 4 MiB limit: the registry sends nothing larger.
//!
//! ```no_run
//! # async fn demo() -> Result<(), executor_registry::client::ClientError> {
//! use executor_registry::client::{FleetView, Membership, MembershipOptions};
//!
//! // An executor.
//! let options = MembershipOptions::new(["http://10.0.0.1:10240"], "worker", "10.0.0.7:9000")
//!     .label("zone", "a");
//! let membership = Membership::join(options).await?;
//! println!("joined as {:?}", membership.id());
//!
//! // A scheduler.
//! let mut fleet = FleetView::connect(["http://10.0.0.1:10240"]).await?;
//! println!("{} executors, {} schedulable", fleet.members().len(), fleet.schedulable().len());
//! while let Some(change) = fleet.next_change().await {
//!     println!("{change:?}");
//! }
//! membership.shutdown().await?;
//! # Ok(())
//! # }
//! ```

mod backoff;
mod endpoints;
mod error;
mod fleet;
mod membership;

pub use backoff::Backoff;
pub use endpoints::{
    BearerToken, ChannelOptions, ClientTls, DEFAULT_ENDPOINT, LEADER_METADATA,
    describe_transport_error,
};
pub use error::ClientError;
pub use fleet::{
    Fleet, FleetChange, FleetView, FleetViewOptions, Member, MemberStatus, OfflineReason,
};
pub use membership::{Membership, MembershipOptions, MembershipState};
