//! The registry's keys in etcd.
//!
//! Owns: where each thing lives under `--etcd-prefix`: the leader key, one
//! key per executor, one recorded TTL ceiling per executor, the revision
//! floor.

/// Key layout under the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (a trailing `/` is ignored).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    /// The election key: value = the leader's advertise address.
    pub fn leader(&self) -> String {
        format!("{}/leader", self.prefix)
    }

    /// The revision floor: above every revision a leader assigned (see
    /// `MembershipStore::revision_floor`).
    pub fn revision_floor(&self) -> String {
        format!("{}/revision-floor", self.prefix)
    }

    /// Prefix of the executor keys.
    pub fn executors(&self) -> String {
        format!("{}/executors/", self.prefix)
    }

    /// One executor's key.
    pub fn executor(&self, id: &str) -> String {
        format!("{}{id}", self.executors())
    }

    /// Prefix of the recorded TTL ceilings.
    pub fn ttl_prefix(&self) -> String {
        format!("{}/ttl/", self.prefix)
    }

    /// One executor's recorded TTL ceiling.
    pub fn ttl(&self, id: &str) -> String {
        format!("{}{id}", self.ttl_prefix())
    }

    /// Prefix of the last-seen watermarks an older version wrote per
    /// heartbeat: deleted at a takeover.
    pub fn legacy_seen_prefix(&self) -> String {
        format!("{}/seen/", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_live_under_the_prefix() {
        let keys = Keys::new("/er/");
        assert_eq!(keys.leader(), "/er/leader");
        assert_eq!(keys.executor("x-1"), "/er/executors/x-1");
        assert_eq!(keys.ttl("x-1"), "/er/ttl/x-1");
        assert_eq!(keys.legacy_seen_prefix(), "/er/seen/");
        assert_eq!(keys.revision_floor(), "/er/revision-floor");
    }
}
