//! The core's error type.
//!
//! Owns: `RegistryError`, the one error enum the core returns. The transport
//! maps it to gRPC codes in exactly one place (`server::error`).

/// Everything the core can refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// Bad input; nothing was changed. `field` names the request field.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The request field at fault (e.g. `labels`, `ttl_ms`).
        field: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// No live executor or tombstone with this id.
    #[error("executor {0:?} not found")]
    NotFound(String),
    /// The executor expired or was deregistered; it must register again.
    #[error("executor {0:?} is a tombstone (expired or deregistered): register again")]
    Tombstone(String),
    /// The store could not make a registration durable; nothing was changed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A limit was reached.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The mass-expiry guard is not configured.
    #[error("the expiry guard is off: start the registry with --expiry-guard-fraction to use it")]
    ExpiryGuardOff,
    /// The caller may not act on this executor: another identity registered
    /// it (the owner is not named).
    #[error("permission denied: executor {0:?} was registered by another identity")]
    PermissionDenied(String),
    /// The registry is stopping and takes no more membership changes.
    #[error("registry is shutting down")]
    ShuttingDown,
}

impl RegistryError {
    /// Shorthand for [`RegistryError::InvalidArgument`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// Shorthand for [`RegistryError::PermissionDenied`].
    pub fn not_owner(id: &str) -> Self {
        Self::PermissionDenied(id.chars().take(256).collect())
    }
}
