//! What a client call can end in.
//!
//! Owns: [`ClientError`], and which gRPC codes are worth retrying.

use std::time::Duration;

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
