//! The changes that come from outside the timing wheel: a registration
//! (its command, then its commit), a deregistration, and what the heartbeat
//! path points out (a first heartbeat, a TTL ceiling, a shorter deadline).
//!
//! Owns: nothing of its own; these are the loop's methods for them (the
//! turn that calls them is in `mod.rs`).

use super::MembershipLoop;
use super::bulk::Removal;
use super::commit::{Committed, RegisterReply};
use super::turn::Changes;
use crate::registry::clock::duration_ms;
use crate::registry::entry::Status;
use crate::registry::error::RegistryError;
use crate::registry::event::{Event, EventKind, OfflineReason};
use crate::registry::observer::RegistrationResult;
use crate::registry::registration::ValidRegistration;
use crate::registry::tables::Notice;

impl MembershipLoop {
    /// An entry the heartbeat path pointed out: its first heartbeat is
    /// announced (RUNNING, once per lifetime: the flag is the revision), a
    /// new TTL ceiling goes to the store, and a deadline moved below the
    /// queued one is queued again.
    pub(super) fn noticed(&mut self, notice: Notice, changes: &mut Changes) {
        let Notice { entry, ttl_changed } = notice;
        let state = entry.state();
        if state.status() == Status::Tombstone {
            return;
        }
        if ttl_changed {
            self.commits
                .record_ttl(entry.id().clone(), entry.recorded_ttl_ms());
        }
        if state.status() == Status::Running && !entry.announced_running() {
            let revision = self.next_revision();
            entry.set_running_rev(revision);
            changes.events.push(Event {
                revision,
                kind: EventKind::Running,
                entry: entry.clone(),
            });
        }
        if state.deadline_ms() < entry.armed_ms() {
            self.wheel
                .arm(&self.tables.clock, entry, state.deadline_ms());
        }
    }

    /// A registration command: an id is reserved and the registration waits
    /// for the next batch (refused at stop, or beyond `max_executors`).
    pub(super) fn register(
        &mut self,
        registration: ValidRegistration,
        reply: RegisterReply,
        stop: bool,
    ) {
        if stop {
            let _ = reply.send(Err(RegistryError::ShuttingDown));
            return;
        }
        let max = self.tables.config.max_executors;
        if self.members.live() + self.commits.reserved() >= max {
            self.tables
                .observer
                .registration(RegistrationResult::Unavailable);
            let _ = reply.send(Err(RegistryError::ResourceExhausted(format!(
                "the registry holds its maximum of {max} executors (--max-executors)"
            ))));
            return;
        }
        let id = self.commits.new_id(&registration.name, &self.tables);
        self.commits.register(id, registration, reply);
    }

    /// A batch finished: its registrations become visible (or were refused).
    pub(super) fn committed(&mut self, committed: Committed, now: u64, changes: &mut Changes) {
        let registered = self.commits.settle(committed, now, &*self.tables.observer);
        let ttl = duration_ms(self.tables.config.init_ttl);
        for pending in registered {
            let (entry, reply) = pending.into_entry(ttl, now);
            self.insert_live(entry.clone());
            let revision = self.next_revision();
            changes.events.push(Event {
                revision,
                kind: EventKind::Online,
                entry: entry.clone(),
            });
            changes.registered.push((reply, entry));
        }
    }

    pub(super) fn deregister(
        &mut self,
        id: &str,
        removal: Removal,
        changes: &mut Changes,
    ) -> Result<(), RegistryError> {
        let entry = self
            .tables
            .live
            .get(id)
            .map(|slot| slot.key().0.clone())
            .ok_or_else(|| RegistryError::NotFound(id.to_owned()))?;
        let was = entry
            .tombstone()
            .ok_or_else(|| RegistryError::NotFound(id.to_owned()))?;
        self.tables.count_leaving(was);
        let now = self.tables.clock.now_ms();
        self.go_offline(entry, now, removal, OfflineReason::Deregistered, changes);
        Ok(())
    }
}
