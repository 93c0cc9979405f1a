//! The etcd backend of `MembershipStore`, for replicas.
//!
//! Owns: the encoding of a stored executor (one JSON object per key under
//! [`Keys::executors`], so fields added later travel without a migration)
//! and of its recorded TTL ceiling (under [`Keys::ttl_prefix`]), and the
//! fenced commit:
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

/// A recorded TTL ceiling as its key's value: whole milliseconds.
pub fn encode_ttl(ttl: std::time::Duration) -> String {
    ttl.as_millis().to_string()
}

/// Parses [`encode_ttl`]'s output.
pub fn decode_ttl(bytes: &[u8]) -> Option<std::time::Duration> {
    let ms = std::str::from_utf8(bytes).ok()?.parse().ok()?;
    Some(std::time::Duration::from_millis(ms))
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
        ttl: None,
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
    /// `executors` and `revision_floor` the floor (read beforehand, by the
    /// replica taking over); `fenced` is cancelled at the first commit
    /// refused by the fence. Blocking calls run on `handle`.
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
        ops(&self.keys, batch)
    }
}

/// The operations of `batch` under `keys`.
fn ops(keys: &Keys, batch: &Batch) -> Vec<client::pb::RequestOp> {
    let mut ops =
        Vec::with_capacity(1 + batch.inserts.len() + 2 * batch.deletes.len() + batch.ttls.len());
    // First: a batch split into several transactions stores its floor
    // before any of its other writes.
    if let Some(floor) = batch.revision_floor {
        ops.push(client::put(keys.revision_floor(), floor.to_string(), 0));
    }
    for executor in &batch.inserts {
        ops.push(client::put(
            keys.executor(&executor.id),
            encode(executor),
            0,
        ));
    }
    for id in &batch.deletes {
        ops.push(client::delete(keys.executor(id)));
        ops.push(client::delete(keys.ttl(id)));
    }
    for (id, ttl) in &batch.ttls {
        ops.push(client::put(keys.ttl(id), encode_ttl(*ttl), 0));
    }
    ops
}

impl MembershipStore for EtcdStore {
    fn load_all(&mut self) -> Result<Vec<StoredExecutor>, StoreError> {
        Ok(std::mem::take(&mut self.loaded))
    }

    fn revision_floor(&mut self) -> Result<u64, StoreError> {
        Ok(self.revision_floor)
    }

    fn records_ttls(&self) -> bool {
        true
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
            ttl: None,
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
    fn a_ttl_record_round_trips_and_garbage_is_refused() {
        let ttl = std::time::Duration::from_millis(15_000);
        assert_eq!(decode_ttl(encode_ttl(ttl).as_bytes()), Some(ttl));
        assert_eq!(decode_ttl(b"15s"), None);
        assert_eq!(decode_ttl(b""), None);
    }

    #[test]
    fn a_batch_writes_its_floor_first_and_deletes_a_departed_executors_ttl_record() {
        let keys = Keys::new("/er");
        let batch = Batch {
            inserts: vec![],
            deletes: vec!["gone-1".into()],
            revision_floor: Some(7),
            ttls: vec![("kept-1".into(), std::time::Duration::from_secs(5))],
        };
        let ops = ops(&keys, &batch);
        let keys_of: Vec<String> = ops
            .iter()
            .map(|op| match &op.request {
                Some(client::pb::request_op::Request::RequestPut(p)) => {
                    format!("put {}", String::from_utf8_lossy(&p.key))
                }
                Some(client::pb::request_op::Request::RequestDeleteRange(d)) => {
                    format!("delete {}", String::from_utf8_lossy(&d.key))
                }
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            keys_of,
            [
                "put /er/revision-floor",
                "delete /er/executors/gone-1",
                "delete /er/ttl/gone-1",
                "put /er/ttl/kept-1",
            ]
        );
    }
}
