//! Conversions between wire types (`proto`) and the core's types.
//!
//! Owns: enum decoding (an unknown or UNSPECIFIED value where one is not
//! allowed is an INVALID_ARGUMENT naming the field), the encoding of
//! executors and events, and the wire's milliseconds: the only place they
//! meet the core's `Duration`s. No registry state is touched here.

use std::time::Duration;

use crate::proto;
use crate::registry::{
    Entry, Event, EventKind, OfflineReason, Registry, RegistryError, Selector, SelectorOp, Status,
};

/// Wire `Executor` for an entry with `status` (its status now, or in a
/// snapshot).
pub fn executor(registry: &Registry, entry: &Entry, status_now: Status) -> proto::Executor {
    proto::Executor {
        id: entry.id().to_string(),
        name: entry.name().to_owned(),
        address: entry.address().to_owned(),
        labels: entry.labels().to_map(),
        status: status(status_now) as i32,
        last_heartbeat_unix_ms: registry.last_heartbeat_unix_ms(entry),
        ttl_ms: millis(entry.ttl()),
    }
}

/// Wire status of a core status.
pub fn status(status: Status) -> proto::ExecutorStatus {
    match status {
        Status::Initing => proto::ExecutorStatus::Initing,
        Status::Running => proto::ExecutorStatus::Running,
        Status::Tombstone => proto::ExecutorStatus::Tombstone,
    }
}

/// The status filter of a list or count: UNSPECIFIED means every live
/// executor; TOMBSTONE is refused (tombstones are not live).
pub fn status_filter(raw: i32) -> Result<Option<Status>, RegistryError> {
    match proto::ExecutorStatus::try_from(raw) {
        Ok(proto::ExecutorStatus::Unspecified) => Ok(None),
        Ok(proto::ExecutorStatus::Initing) => Ok(Some(Status::Initing)),
        Ok(proto::ExecutorStatus::Running) => Ok(Some(Status::Running)),
        Ok(proto::ExecutorStatus::Tombstone) => Err(RegistryError::invalid(
            "status",
            "TOMBSTONE executors have left the live set and are not listed",
        )),
        Err(_) => Err(RegistryError::invalid(
            "status",
            format!("{raw} is not an ExecutorStatus"),
        )),
    }
}

/// Compiles wire selectors.
pub fn selectors(raw: &[proto::LabelSelector]) -> Result<Vec<Selector>, RegistryError> {
    raw.iter()
        .map(|s| {
            let op = match proto::SelectorOp::try_from(s.op) {
                Ok(proto::SelectorOp::Eq) => Some(SelectorOp::Eq),
                Ok(proto::SelectorOp::Neq) => Some(SelectorOp::Neq),
                Ok(proto::SelectorOp::Regex) => Some(SelectorOp::Regex),
                Ok(proto::SelectorOp::Unspecified) | Err(_) => None,
            };
            Selector::new(&s.label, &s.target, op)
        })
        .collect()
}

/// Wire event of a core event.
pub fn event(event: &Event) -> proto::ExecutorEvent {
    let (kind, reason) = match event.kind {
        EventKind::Online => (proto::EventType::Online, proto::OfflineReason::Unspecified),
        EventKind::Running => (proto::EventType::Running, proto::OfflineReason::Unspecified),
        EventKind::Offline(OfflineReason::Expired) => {
            (proto::EventType::Offline, proto::OfflineReason::Expired)
        }
        EventKind::Offline(OfflineReason::Deregistered) => (
            proto::EventType::Offline,
            proto::OfflineReason::Deregistered,
        ),
    };
    proto::ExecutorEvent {
        r#type: kind as i32,
        executor_id: event.entry.id().to_string(),
        address: event.entry.address().to_owned(),
        revision: event.revision,
        reason: reason as i32,
        labels: event.entry.labels().to_map(),
        status: status(event.kind.status()) as i32,
    }
}

/// A heartbeat's `ttl_ms` as the core takes it: 0 keeps the current TTL.
pub fn ttl(ttl_ms: u64) -> Option<Duration> {
    (ttl_ms > 0).then(|| Duration::from_millis(ttl_ms))
}

/// Milliseconds of a duration, for the wire.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
