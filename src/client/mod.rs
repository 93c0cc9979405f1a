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
//! - [`FleetView`] — a scheduler's local copy of the live fleet, kept from
//!   `WatchExecutors`; when the watch ends (lag, restart, network) it watches
//!   again and turns the fresh snapshot into the changes it missed, so its
//!   consumer never misses one.
//!
//! Both end their task when dropped (a `CancellationToken` in a drop guard)
//! and every `async fn` here is cancel-safe: dropping the future leaves no
//! task behind.
//!
//! Shared plumbing lives in the private submodules: endpoint lists and
//! channel settings (`endpoints`), backoff and jitter (`backoff`).
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
//! println!("{} executors", fleet.members().len());
//! while let Some(change) = fleet.next_change().await {
//!     println!("{change:?}");
//! }
//! membership.shutdown().await?;
//! # Ok(())
//! # }
//! ```

mod backoff;
mod endpoints;
mod fleet;
mod membership;

use std::time::Duration;

pub use backoff::Backoff;
pub use endpoints::{
    BearerToken, ChannelOptions, ClientTls, DEFAULT_ENDPOINT, DEFAULT_MAX_DECODING_MESSAGE_SIZE,
    describe_transport_error,
};
pub use fleet::{Fleet, FleetChange, FleetView, FleetViewOptions, Member, OfflineReason};
pub use membership::{Membership, MembershipOptions, MembershipState};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint list is empty.
    #[error("no registry endpoints given")]
    NoEndpoints,
    /// An endpoint is not a usable URI.
    #[error("invalid registry endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The registry answered with an error that retrying cannot fix
    /// (for example `INVALID_ARGUMENT` for a bad address or label).
    #[error("the registry refused the request ({}): {}", .0.code(), .0.message())]
    Rejected(tonic::Status),
    /// No endpoint could be reached (or kept answering `UNAVAILABLE`) within
    /// the time allowed.
    #[error("cannot reach the registry at {endpoints} within {waited:?}: {last}")]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// How long it tried.
        waited: Duration,
        /// The last failure seen.
        last: String,
    },
}

/// Whether a failed call may succeed on retry (possibly at another endpoint):
/// the server is down, restarting, or the connection broke.
pub(crate) fn retryable(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Aborted
    )
}

/// One failed attempt: retry (the reason, for logs and errors), or give up
/// with the registry's answer.
pub(crate) enum Attempt {
    Retry(String),
    Fatal(tonic::Status),
}

/// A status as a one-line reason naming the endpoint.
pub(crate) fn status_text(endpoint: &str, status: &tonic::Status) -> String {
    format!("{endpoint}: {}: {}", status.code(), status.message())
}
