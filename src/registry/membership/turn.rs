//! What one turn of the loop gathers, and what it changes.
//!
//! Owns: [`Command`] (a request to the loop), [`Turn`] (everything ready at
//! one wake-up) and [`Changes`] (the events, answers and counts a turn
//! publishes together). Plain data.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::bulk::Map;
use super::commit::{Committed, RegisterReply};
use crate::registry::entry::Entry;
use crate::registry::error::RegistryError;
use crate::registry::event::Event;
use crate::registry::registration::ValidRegistration;
use crate::registry::tables::Notice;

/// A request to the loop.
pub(crate) enum Command {
    Register {
        registration: ValidRegistration,
        reply: RegisterReply,
    },
    Deregister {
        id: String,
        reply: oneshot::Sender<Result<(), RegistryError>>,
    },
    /// Operator release of the mass-expiry guard: the number expired.
    ReleaseGuard {
        reply: oneshot::Sender<Result<u64, RegistryError>>,
    },
    /// Answered once a turn that saw everything sent before it (commands
    /// and notices) is published: tests wait for the loop with it.
    #[cfg(test)]
    Barrier { reply: oneshot::Sender<()> },
}

/// Everything that was ready at one wake-up.
#[derive(Default)]
pub(super) struct Turn {
    pub(super) expired: Vec<(Arc<Entry>, u64)>,
    /// A background purge finished (`None` inside: it failed).
    pub(super) purged: Option<Option<Map>>,
    pub(super) commands: Vec<Command>,
    /// Entries the heartbeat path pointed out (first heartbeat, shorter
    /// deadline).
    pub(super) notices: Vec<Notice>,
    pub(super) committed: Option<Committed>,
    pub(super) housekeeping: bool,
    /// Entries left in the live table by a mass change wait to be moved out.
    pub(super) unlink: bool,
    pub(super) stop: bool,
}

impl Turn {
    pub(super) fn is_empty(&self) -> bool {
        self.expired.is_empty()
            && self.purged.is_none()
            && self.commands.is_empty()
            && self.notices.is_empty()
            && self.committed.is_none()
            && !self.housekeeping
            && !self.unlink
            && !self.stop
    }
}

/// Changes of one turn, published together.
#[derive(Default)]
pub(super) struct Changes {
    pub(super) events: Vec<Event>,
    pub(super) registered: Vec<(RegisterReply, Arc<Entry>)>,
    pub(super) deregistered: Vec<oneshot::Sender<Result<(), RegistryError>>>,
    pub(super) lags: Vec<Duration>,
    /// Executors whose deadline was moved because of a stall.
    pub(super) compensated: u64,
    /// Past their deadline, for the guard to decide on (guard on only).
    pub(super) due: Vec<Arc<Entry>>,
    /// Executors the guard had held that expired in this turn.
    pub(super) released: u64,
    /// Operator releases, answered after the turn is published.
    pub(super) guard_releases: Vec<(oneshot::Sender<Result<u64, RegistryError>>, u64)>,
}
