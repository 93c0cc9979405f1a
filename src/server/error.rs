//! The one place where core errors become gRPC statuses.
//!
//! Owns: the mapping `RegistryError` → `tonic::Status` (and, for per-item
//! heartbeat results, → `HeartbeatStatus`). The set of codes is deliberately
//! small; every message says which field or id and what is wrong.

use tonic::{Code, Status};

use crate::proto::HeartbeatStatus;
use crate::registry::RegistryError;

/// Longest status message: it travels in an HTTP/2 trailer, and an error
/// that echoes a hostile 3 MB id must not turn into a transport failure.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// Maps a core error to the gRPC status a client sees.
pub fn to_status(error: RegistryError) -> Status {
    let code = match &error {
        RegistryError::InvalidArgument { .. } => Code::InvalidArgument,
        RegistryError::NotFound(_) => Code::NotFound,
        RegistryError::Tombstone(_) | RegistryError::ExpiryGuardOff => Code::FailedPrecondition,
        RegistryError::Unavailable(_) | RegistryError::ShuttingDown => Code::Unavailable,
        RegistryError::ResourceExhausted(_) => Code::ResourceExhausted,
        RegistryError::PermissionDenied(_) => Code::PermissionDenied,
    };
    let mut message = error.to_string();
    if message.len() > MAX_MESSAGE_BYTES {
        let mut cut = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str("… (truncated)");
    }
    Status::new(code, message)
}

/// Maps a heartbeat's outcome to its per-item status (stream and batch).
pub fn to_heartbeat_status(result: &Result<std::time::Duration, RegistryError>) -> HeartbeatStatus {
    match result {
        Ok(_) => HeartbeatStatus::Ok,
        Err(RegistryError::NotFound(_)) => HeartbeatStatus::UnknownExecutor,
        Err(RegistryError::Tombstone(_)) => HeartbeatStatus::Expired,
        Err(_) => HeartbeatStatus::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn every_variant_maps_to_its_code_and_keeps_the_message() {
        let cases = [
            (
                RegistryError::invalid("labels", "key \"a_b\" bad"),
                Code::InvalidArgument,
            ),
            (RegistryError::NotFound("x-1".into()), Code::NotFound),
            (
                RegistryError::Tombstone("x-1".into()),
                Code::FailedPrecondition,
            ),
            (
                RegistryError::Unavailable("disk full".into()),
                Code::Unavailable,
            ),
            (
                RegistryError::ResourceExhausted("too many".into()),
                Code::ResourceExhausted,
            ),
            (RegistryError::ShuttingDown, Code::Unavailable),
            (RegistryError::ExpiryGuardOff, Code::FailedPrecondition),
            (RegistryError::not_owner("x-1"), Code::PermissionDenied),
        ];
        for (error, code) in cases {
            let message = error.to_string();
            let status = to_status(error);
            assert_eq!(status.code(), code, "{message}");
            assert_eq!(status.message(), message);
        }
        let status = to_status(RegistryError::invalid(
            "ttl_ms",
            "5 is outside [100, 600000]",
        ));
        assert!(status.message().contains("ttl_ms") && status.message().contains("outside"));
    }

    #[test]
    fn long_messages_are_truncated_on_a_char_boundary() {
        let status = to_status(RegistryError::NotFound("é".repeat(2_000)));
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().len() <= MAX_MESSAGE_BYTES + 20);
        assert!(status.message().ends_with("(truncated)"));
    }

    #[test]
    fn heartbeat_outcomes_map_to_item_statuses() {
        assert_eq!(
            to_heartbeat_status(&Ok(Duration::from_millis(500))),
            HeartbeatStatus::Ok
        );
        let item = |e| to_heartbeat_status(&Err(e));
        assert_eq!(
            item(RegistryError::NotFound("a".into())),
            HeartbeatStatus::UnknownExecutor
        );
        assert_eq!(
            item(RegistryError::Tombstone("a".into())),
            HeartbeatStatus::Expired
        );
        assert_eq!(
            item(RegistryError::invalid("ttl_ms", "x")),
            HeartbeatStatus::Invalid
        );
        assert_eq!(
            item(RegistryError::not_owner("a")),
            HeartbeatStatus::Invalid,
            "another identity's executor is never a silent success"
        );
    }
}
