//! How the loop applies the mass-expiry guard's answers.
//!
//! Owns: nothing of its own; the guard's state is the loop's
//! (`ExpiryGuard`, whose rule is in `registry/guard.rs`). A pass's due
//! executors expire or are held; on housekeeping ticks the held ones are
//! reviewed (revived ones go back to the wheel, released ones expire in
//! this one pass); an operator release expires everything held.
//!
//! Must not touch: state words other than through expiry.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::MembershipLoop;
use super::bulk::Removal;
use super::turn::Changes;
use crate::registry::error::RegistryError;
use crate::registry::guard::{Held, Pass};

impl MembershipLoop {
    /// The guard's part of a turn: the pass's due executors expire or are
    /// held; on housekeeping ticks (`review`) the held ones are reviewed. A
    /// mass release makes the rest of the turn remove [`Removal::Deferred`].
    pub(super) fn guard_turn(
        &mut self,
        now: u64,
        review: bool,
        removal: &mut Removal,
        changes: &mut Changes,
    ) {
        let Some(guard) = self.guard.as_mut() else {
            return;
        };
        let live = self.members.live() as u64;
        let due: Vec<_> = changes
            .due
            .drain(..)
            .map(|e| {
                let ttl_ms = e.ttl_ms();
                (e, ttl_ms)
            })
            .collect();
        let expire = match guard.pass(due, live, now) {
            Pass::Expire(entries) => entries,
            Pass::Held => Vec::new(),
        };
        let review = if review {
            guard.review(live, now, |entry| Held::of(entry, now))
        } else {
            Default::default()
        };
        for entry in expire {
            self.expire(entry, now, false, *removal, changes);
        }
        for entry in review.revived {
            let deadline = entry.state().deadline_ms();
            self.wheel.arm(&self.tables.clock, entry, deadline);
        }
        *removal = (*removal).max(Removal::for_departures(review.released.len()));
        for entry in review.released {
            self.expire(entry, now, true, *removal, changes);
        }
    }

    /// An operator release: everything held expires now, in this pass;
    /// answered with the count once the turn is published.
    pub(super) fn release_guard(
        &mut self,
        now: u64,
        removal: &mut Removal,
        reply: oneshot::Sender<Result<u64, RegistryError>>,
        changes: &mut Changes,
    ) {
        let released = self
            .guard
            .as_mut()
            .map(|g| g.release(now))
            .unwrap_or_default();
        *removal = (*removal).max(Removal::for_departures(released.len()));
        let before = changes.released;
        for entry in released {
            self.expire(entry, now, true, *removal, changes);
        }
        changes
            .guard_releases
            .push((reply, changes.released - before));
    }

    /// Publishes the guard's state when it changed; the observer hears of
    /// every change of whether it holds.
    pub(super) fn publish_guard(&mut self) {
        let Some(guard) = &self.guard else {
            return;
        };
        let status = guard.status(|ms| self.tables.clock.unix_ms(ms));
        let published = self.tables.guard.load();
        if **published == status {
            return;
        }
        if published.active != status.active || published.held != status.held {
            self.tables
                .observer
                .expiry_guard(status.active, status.held);
        }
        drop(published);
        self.tables.guard.store(Arc::new(status));
    }
}
