//! Who may act on an executor's registration.
//!
//! Owns: the ownership rule, as a pure function. An executor's owner is the
//! identity that registered it (a client certificate's identity under mutual
//! TLS, or the registering peer's address when only the admin token guards
//! deregistration). The transport decides who the caller is and whether it
//! is an admin; this module decides what that caller may do.
//!
//! Must not touch: certificates, tokens, gRPC. Callers come in already
//! authenticated.

use std::sync::Arc;

/// The caller of a heartbeat or deregistration, as the transport
/// authenticated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No access control applies: a server without client authentication,
    /// or an in-process caller.
    Trusted,
    /// An authenticated identity.
    Identity {
        /// The identity (certificate SAN or CN, or `peer:<ip>`).
        name: Arc<str>,
        /// Listed in `--admin-identities`, or presented the admin token.
        admin: bool,
    },
}

impl Caller {
    /// A non-admin identity.
    pub fn identity(name: impl Into<Arc<str>>) -> Self {
        Self::Identity {
            name: name.into(),
            admin: false,
        }
    }

    /// An admin identity.
    pub fn admin(name: impl Into<Arc<str>>) -> Self {
        Self::Identity {
            name: name.into(),
            admin: true,
        }
    }

    /// The identity a registration by this caller is owned by (None when
    /// trusted: such registrations are unowned).
    pub fn owner(&self) -> Option<Arc<str>> {
        match self {
            Self::Trusted => None,
            Self::Identity { name, .. } => Some(name.clone()),
        }
    }
}

/// What a caller does to an executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Renew its lease (unary, stream item or batch item).
    Heartbeat,
    /// Remove it.
    Deregister,
}

/// The ownership rule:
/// - a trusted caller may do anything;
/// - an admin may deregister any executor (but heartbeats only its own:
///   keeping someone else's lease alive is never an operator's job);
/// - an unowned executor (registered without client authentication, e.g.
///   before it was turned on) may be acted on by anyone authenticated;
/// - otherwise only the owner may act.
///
/// Returns true when allowed.
pub fn allowed(caller: &Caller, owner: Option<&str>, action: Action) -> bool {
    match caller {
        Caller::Trusted => true,
        Caller::Identity { name, admin } => {
            (*admin && action == Action::Deregister) || owner.is_none_or(|owner| owner == &**name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_may_heartbeat_and_deregister_its_own() {
        let a = Caller::identity("exec-a");
        for action in [Action::Heartbeat, Action::Deregister] {
            assert!(allowed(&a, Some("exec-a"), action));
        }
    }

    #[test]
    fn another_identity_may_do_neither() {
        let a = Caller::identity("exec-a");
        for action in [Action::Heartbeat, Action::Deregister] {
            assert!(!allowed(&a, Some("exec-b"), action));
        }
        // Prefixes and case differences are other identities.
        assert!(!allowed(&a, Some("exec-a2"), Action::Heartbeat));
        assert!(!allowed(&a, Some("EXEC-A"), Action::Heartbeat));
        assert!(!allowed(&a, Some(""), Action::Heartbeat));
    }

    #[test]
    fn an_admin_may_deregister_anyone_but_not_heartbeat_for_them() {
        let ops = Caller::admin("ops");
        assert!(allowed(&ops, Some("exec-b"), Action::Deregister));
        assert!(!allowed(&ops, Some("exec-b"), Action::Heartbeat));
        assert!(allowed(&ops, Some("ops"), Action::Heartbeat));
    }

    #[test]
    fn unowned_executors_and_trusted_callers_are_open() {
        let a = Caller::identity("exec-a");
        assert!(allowed(&a, None, Action::Heartbeat));
        assert!(allowed(&a, None, Action::Deregister));
        for action in [Action::Heartbeat, Action::Deregister] {
            assert!(allowed(&Caller::Trusted, Some("exec-b"), action));
        }
    }

    #[test]
    fn registrations_are_owned_by_the_identity_only() {
        assert_eq!(Caller::Trusted.owner(), None);
        assert_eq!(Caller::admin("ops").owner().as_deref(), Some("ops"));
        assert_eq!(Caller::identity("a").owner().as_deref(), Some("a"));
    }
}
