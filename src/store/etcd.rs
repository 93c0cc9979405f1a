//! The etcd backend of `MembershipStore`, for replicas.
//!
//! Owns: the encoding of a stored executor (one JSON object per key under
//! [`Keys::executors`], so fields added later travel without a migration),
//! the paged load of them, and the fenced commit:
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

use crate::etcd::{self as client, Etcd, EtcdError, Fence, Keys};
use crate::registry::{Batch, MembershipStore, StoreError, StoredExecutor};

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

/// The revision floor stored under `keys` (0 when none is).
pub async fn load_revision_floor(etcd: &Etcd, keys: &Keys) -> Result<u64, EtcdError> {
    let Some(value) = etcd.value(keys.revision_floor().as_bytes()).await? else {
        return Ok(0);
    };
    std::str::from_utf8(&value)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            EtcdError::Call(format!(
                "{} holds {:?}, not a revision",
                keys.revision_floor(),
                String::from_utf8_lossy(&value)
            ))
        })
}

/// Every executor stored under `keys`, read in pages (an unreadable one is
/// skipped, and said so).
pub async fn load(etcd: &Etcd, keys: &Keys) -> Result<Vec<StoredExecutor>, EtcdError> {
    let prefix = keys.executors();
    let kvs = etcd.range_prefix(prefix.as_bytes()).await?;
    let mut executors = Vec::with_capacity(kvs.len());
    for kv in kvs {
        match decode(&kv.value) {
            Ok(executor) => executors.push(executor),
            Err(e) => tracing::warn!(
                key = %String::from_utf8_lossy(&kv.key),
                error = %e,
                "unreadable executor in etcd; skipped"
            ),
        }
    }
    Ok(executors)
}

/// `MembershipStore` on etcd, for the leader's term.
pub struct EtcdStore {
    etcd: Etcd,
    keys: Keys,
    fence: Fence,
    handle: Handle,
    loaded: Vec<StoredExecutor>,
    revision_floor: u64,
    fenced: CancellationToken,
}

impl EtcdStore {
    /// A store writing under `keys` with `fence`; `load_all` returns
    /// `executors` and `revision_floor` the floor (read beforehand with
    /// [`load`] and [`load_revision_floor`]); `fenced` is cancelled at the
    /// first commit refused by the fence. Blocking calls run on `handle`.
    pub fn new(
        etcd: Etcd,
        keys: Keys,
        fence: Fence,
        (executors, revision_floor): (Vec<StoredExecutor>, u64),
        fenced: CancellationToken,
        handle: Handle,
    ) -> Self {
        Self {
            etcd,
            keys,
            fence,
            handle,
            loaded: executors,
            revision_floor,
            fenced,
        }
    }

    /// The operations of `batch`.
    fn ops(&self, batch: &Batch) -> Vec<client::pb::RequestOp> {
        let mut ops = Vec::with_capacity(batch.inserts.len() + 2 * batch.deletes.len() + 1);
        // First: a batch split into several transactions stores its floor
        // before any of its other writes.
        if let Some(floor) = batch.revision_floor {
            ops.push(client::put(
                self.keys.revision_floor(),
                floor.to_string(),
                0,
            ));
        }
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

    fn revision_floor(&mut self) -> Result<u64, StoreError> {
        Ok(self.revision_floor)
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        if self.fenced.is_cancelled() {
            return Err(StoreError::Fenced(EtcdError::Fenced.to_string()));
        }
        let ops = self.ops(batch);
        let result = self.handle.block_on(self.etcd.fenced(&self.fence, ops));
        if result == Err(EtcdError::Fenced) {
            self.fenced.cancel();
        }
        result.map_err(|e| match e {
            EtcdError::Fenced => StoreError::Fenced(e.to_string()),
            EtcdError::Call(_) => StoreError::Unreachable(e.to_string()),
        })
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
}
