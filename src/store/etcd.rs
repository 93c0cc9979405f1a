//! The etcd backend of `MembershipStore`, for replicas.
//!
//! Owns: the key layout under `--etcd-prefix` ([`Keys`]), the encoding of a
//! stored executor (one JSON object per key, so fields added later travel
//! without a migration) and of a last-seen watermark, and the fenced commit:
//! every transaction compares the leader key's create revision, so a replica
//! that lost leadership writes nothing. A fenced commit cancels the `fenced`
//! token so the replica steps down.
//!
//! Batches larger than etcd's per-transaction limit are split into several
//! transactions: a batch is then not atomic as a whole (a failure midway
//! leaves the earlier chunks written). A registration in a failed batch is
//! refused to its caller; if its key did land, the next leader loads it and
//! it expires after the init TTL unless it heartbeats.
//!
//! Must not touch: registry state, leadership (it only reports a fence).

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use super::{Batch, MembershipStore, StoreError, StoredExecutor};
use crate::replica::etcd::{self as client, Etcd, EtcdError, Fence};

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

    /// Prefix of the executor keys.
    pub fn executors(&self) -> String {
        format!("{}/executors/", self.prefix)
    }

    /// One executor's key.
    pub fn executor(&self, id: &str) -> String {
        format!("{}{id}", self.executors())
    }

    /// Prefix of the last-seen watermarks.
    pub fn seen_prefix(&self) -> String {
        format!("{}/seen/", self.prefix)
    }

    /// One executor's watermark key.
    pub fn seen(&self, id: &str) -> String {
        format!("{}{id}", self.seen_prefix())
    }
}

/// A last-seen watermark: wall-clock ms of a heartbeat, and the TTL it set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Wall-clock ms (Unix epoch) of the heartbeat.
    pub unix_ms: u64,
    /// The TTL that heartbeat asked for.
    pub ttl_ms: u64,
}

impl Seen {
    /// `"<unix_ms> <ttl_ms>"`.
    pub fn encode(&self) -> String {
        format!("{} {}", self.unix_ms, self.ttl_ms)
    }

    /// Parses [`Seen::encode`]'s output.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (seen, ttl) = text.split_once(' ')?;
        Some(Self {
            unix_ms: seen.parse().ok()?,
            ttl_ms: ttl.parse().ok()?,
        })
    }
}

/// The JSON form of a stored executor. Unknown fields are ignored, so a
/// newer replica's extra fields do not stop an older one from loading.
#[derive(serde::Serialize, serde::Deserialize)]
struct Json<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    name: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    address: std::borrow::Cow<'a, str>,
    #[serde(default)]
    labels: Vec<(String, String)>,
    #[serde(default)]
    registered_unix_ms: u64,
    /// The identity that registered it (absent: registered without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
}

/// One executor as the JSON value of its key.
pub fn encode(executor: &StoredExecutor) -> String {
    let json = Json {
        id: executor.id.as_str().into(),
        name: executor.name.as_str().into(),
        address: executor.address.as_str().into(),
        labels: executor.labels.clone(),
        registered_unix_ms: executor.registered_unix_ms,
        owner: executor.owner.clone(),
    };
    serde_json::to_string(&json).expect("a struct of strings and numbers serializes")
}

/// Parses [`encode`]'s output (unknown fields are ignored).
pub fn decode(bytes: &[u8]) -> Result<StoredExecutor, String> {
    let json: Json<'_> = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    Ok(StoredExecutor {
        id: json.id.into_owned(),
        name: json.name.into_owned(),
        address: json.address.into_owned(),
        labels: json.labels,
        registered_unix_ms: json.registered_unix_ms,
        owner: json.owner,
    })
}

/// What a new leader reads at the start of its term.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Every stored executor.
    pub executors: Vec<StoredExecutor>,
    /// Watermarks by executor id.
    pub seen: std::collections::HashMap<String, Seen>,
}

/// Reads every executor and watermark under `keys`, and deletes (fenced)
/// watermarks whose executor is gone.
pub async fn load(etcd: &Etcd, keys: &Keys, fence: &Fence) -> Result<Loaded, EtcdError> {
    let mut loaded = Loaded::default();
    let executors = keys.executors();
    let seen_prefix = keys.seen_prefix();
    // Both reads at once: a new leader serves only after them.
    let (executor_kvs, seen_kvs) = tokio::try_join!(
        etcd.range_prefix(executors.as_bytes()),
        etcd.range_prefix(seen_prefix.as_bytes())
    )?;
    for kv in executor_kvs {
        match decode(&kv.value) {
            Ok(executor) => loaded.executors.push(executor),
            Err(e) => tracing::warn!(
                key = %String::from_utf8_lossy(&kv.key),
                error = %e,
                "unreadable executor in etcd; skipped"
            ),
        }
    }
    let known: std::collections::HashSet<&str> =
        loaded.executors.iter().map(|e| e.id.as_str()).collect();
    let mut orphans = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for kv in seen_kvs {
        let id = String::from_utf8_lossy(&kv.key[seen_prefix.len()..]).into_owned();
        match Seen::decode(&kv.value) {
            Some(s) if known.contains(id.as_str()) => {
                seen.insert(id, s);
            }
            _ => orphans.push(client::delete(kv.key)),
        }
    }
    loaded.seen = seen;
    if !orphans.is_empty() {
        tracing::info!(
            watermarks = orphans.len(),
            "deleting watermarks of gone executors"
        );
        etcd.fenced(fence, orphans).await?;
    }
    Ok(loaded)
}

/// `MembershipStore` on etcd, for the leader's term.
pub struct EtcdStore {
    etcd: Etcd,
    keys: Keys,
    fence: Fence,
    handle: Handle,
    loaded: Vec<StoredExecutor>,
    fenced: CancellationToken,
}

impl EtcdStore {
    /// A store writing under `keys` with `fence`; `load_all` returns
    /// `executors` (read beforehand with [`load`]); `fenced` is cancelled at
    /// the first commit refused by the fence. Blocking calls run on `handle`.
    pub fn new(
        etcd: Etcd,
        keys: Keys,
        fence: Fence,
        executors: Vec<StoredExecutor>,
        fenced: CancellationToken,
        handle: Handle,
    ) -> Self {
        Self {
            etcd,
            keys,
            fence,
            handle,
            loaded: executors,
            fenced,
        }
    }

    /// The operations of `batch`.
    fn ops(&self, batch: &Batch) -> Vec<client::pb::RequestOp> {
        let mut ops = Vec::with_capacity(batch.inserts.len() + 2 * batch.deletes.len());
        for executor in &batch.inserts {
            ops.push(client::put(
                self.keys.executor(&executor.id),
                encode(executor),
                0,
            ));
        }
        for id in &batch.deletes {
            ops.push(client::delete(self.keys.executor(id)));
            ops.push(client::delete(self.keys.seen(id)));
        }
        ops
    }
}

impl MembershipStore for EtcdStore {
    fn load_all(&mut self) -> Result<Vec<StoredExecutor>, StoreError> {
        Ok(std::mem::take(&mut self.loaded))
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        if self.fenced.is_cancelled() {
            return Err(StoreError(EtcdError::Fenced.to_string()));
        }
        let ops = self.ops(batch);
        let result = self.handle.block_on(self.etcd.fenced(&self.fence, ops));
        if result == Err(EtcdError::Fenced) {
            self.fenced.cancel();
        }
        result.map_err(|e| StoreError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_executor_round_trips_through_json_and_unknown_fields_are_ignored() {
        let executor = StoredExecutor {
            id: "w-1".into(),
            name: "w".into(),
            address: "10.0.0.1:9000".into(),
            labels: vec![("zone".into(), "a".into()), ("gpu".into(), "\"x\"".into())],
            registered_unix_ms: 1_700_000_000_123,
            owner: None,
        };
        assert_eq!(decode(encode(&executor).as_bytes()).unwrap(), executor);
        let owned = StoredExecutor {
            owner: Some("spiffe://fleet/w".into()),
            ..executor
        };
        assert_eq!(decode(encode(&owned).as_bytes()).unwrap(), owned);
        let later = br#"{"id":"a","name":"n","address":"h:1","labels":[],"registered_unix_ms":5,"future":"x"}"#;
        assert_eq!(decode(later).unwrap().id, "a");
        assert!(decode(b"{\"name\":\"n\"}").unwrap_err().contains("id"));
    }

    #[test]
    fn watermarks_round_trip_and_garbage_is_refused() {
        let seen = Seen {
            unix_ms: 1_700_000_000_000,
            ttl_ms: 1_500,
        };
        assert_eq!(Seen::decode(seen.encode().as_bytes()), Some(seen));
        assert_eq!(Seen::decode(b"12"), None);
        assert_eq!(Seen::decode(b"a b"), None);
    }

    #[test]
    fn keys_live_under_the_prefix() {
        let keys = Keys::new("/er/");
        assert_eq!(keys.leader(), "/er/leader");
        assert_eq!(keys.executor("x-1"), "/er/executors/x-1");
        assert_eq!(keys.seen("x-1"), "/er/seen/x-1");
    }
}
