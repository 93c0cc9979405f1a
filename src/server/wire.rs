//! `WatchExecutors` messages as the server sends them.
//!
//! Owns: [`WatchMessage`], the generated server's `WatchExecutorsResponse`
//! (the build maps the message to it): an event built as the prost message,
//! or a snapshot chunk already encoded — written by [`snapshot_chunk`]
//! straight from the snapshot's entries into one buffer, without building a
//! `proto::Executor` per member, copying its strings into it and freeing
//! them after the send. That building and freeing was most of the server's
//! work while many watchers took a snapshot at once (the allocator alone
//! ~40 % of its samples), on the runtime workers heartbeats wait for. On the
//! wire nothing differs: the bytes are the `WatchExecutorsResponse` with a
//! `Snapshot` that [`convert::executor`] would have made (a unit test
//! decodes them with the generated types and compares).
//!
//! Must not touch: registry state (it reads the entries a snapshot holds).

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::encoding::{DecodeContext, WireType, encode_key, encode_varint, encoded_len_varint};
use prost::{DecodeError, Message};

use super::convert;
use super::paging::BUDGET_BYTES;
use crate::proto;
use crate::registry::{Entry, Registry, Status};

/// A `WatchExecutorsResponse` on its way out: built, or encoded already.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchMessage {
    /// A message to encode (events, and anything but a snapshot chunk).
    Built(proto::WatchExecutorsResponse),
    /// The encoded message, sent as it is.
    Encoded(Bytes),
}

impl Default for WatchMessage {
    fn default() -> Self {
        Self::Built(proto::WatchExecutorsResponse::default())
    }
}

impl From<proto::WatchExecutorsResponse> for WatchMessage {
    fn from(message: proto::WatchExecutorsResponse) -> Self {
        Self::Built(message)
    }
}

impl WatchMessage {
    /// The message, decoded if it was sent encoded.
    pub fn decoded(&self) -> Result<proto::WatchExecutorsResponse, DecodeError> {
        match self {
            Self::Built(message) => Ok(message.clone()),
            Self::Encoded(bytes) => proto::WatchExecutorsResponse::decode(bytes.as_ref()),
        }
    }
}

impl Message for WatchMessage {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match self {
            Self::Built(message) => message.encode_raw(buf),
            Self::Encoded(bytes) => buf.put_slice(bytes),
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if let Self::Encoded(_) = self {
            *self = Self::Built(self.decoded()?);
        }
        let Self::Built(message) = self else {
            unreachable!("an encoded message was decoded just above")
        };
        message.merge_field(tag, wire_type, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        match self {
            Self::Built(message) => message.encoded_len(),
            Self::Encoded(bytes) => bytes.len(),
        }
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// Field numbers of the messages written here (registry.proto).
mod field {
    /// `WatchExecutorsResponse.snapshot`.
    pub const RESPONSE_SNAPSHOT: u32 = 1;
    /// `Snapshot.executors`, `.revision`, `.more`.
    pub const SNAPSHOT_EXECUTORS: u32 = 1;
    pub const SNAPSHOT_REVISION: u32 = 2;
    pub const SNAPSHOT_MORE: u32 = 3;
    /// `Executor`'s fields.
    pub const ID: u32 = 1;
    pub const NAME: u32 = 2;
    pub const ADDRESS: u32 = 3;
    pub const LABELS: u32 = 4;
    pub const STATUS: u32 = 5;
    pub const LAST_HEARTBEAT: u32 = 6;
    pub const TTL: u32 = 7;
    /// A map entry's key and value.
    pub const KEY: u32 = 1;
    pub const VALUE: u32 = 2;
}

/// Encoded length of a length-delimited field with `len` bytes of payload
/// (every tag here is below 16: one byte of key).
fn delimited_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

/// Encoded length of a string field (omitted when empty, as prost does).
fn string_len(s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        delimited_len(s.len())
    }
}

/// Encoded length of a varint field (omitted when 0, as prost does).
fn varint_len(value: u64) -> usize {
    if value == 0 {
        0
    } else {
        1 + encoded_len_varint(value)
    }
}

fn put_string(tag: u32, s: &str, buf: &mut impl BufMut) {
    if !s.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(s.len() as u64, buf);
        buf.put_slice(s.as_bytes());
    }
}

fn put_varint(tag: u32, value: u64, buf: &mut impl BufMut) {
    if value != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(value, buf);
    }
}

/// One member as an `Executor`, in its field of a `Snapshot`.
fn put_executor(entry: &Entry, status: Status, last_heartbeat_unix_ms: u64, buf: &mut impl BufMut) {
    let (id, name, address) = (entry.id().as_str(), entry.name(), entry.address());
    let status = convert::status(status) as i32 as u64;
    let ttl = convert::millis(entry.ttl());
    let label_len = |k: &str, v: &str| string_len(k) + string_len(v);
    let labels: usize = entry
        .labels()
        .iter()
        .map(|(k, v)| delimited_len(label_len(k, v)))
        .sum();
    let len = string_len(id)
        + string_len(name)
        + string_len(address)
        + labels
        + varint_len(status)
        + varint_len(last_heartbeat_unix_ms)
        + varint_len(ttl);
    encode_key(field::SNAPSHOT_EXECUTORS, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
    put_string(field::ID, id, buf);
    put_string(field::NAME, name, buf);
    put_string(field::ADDRESS, address, buf);
    for (k, v) in entry.labels().iter() {
        encode_key(field::LABELS, WireType::LengthDelimited, buf);
        encode_varint(label_len(k, v) as u64, buf);
        put_string(field::KEY, k, buf);
        put_string(field::VALUE, v, buf);
    }
    put_varint(field::STATUS, status, buf);
    put_varint(field::LAST_HEARTBEAT, last_heartbeat_unix_ms, buf);
    put_varint(field::TTL, ttl, buf);
}

/// The next chunk of the snapshot at `revision` from `members`, encoded:
/// members until the next would take it past `max_bytes` (always at least
/// one; never past [`BUDGET_BYTES`], below gRPC's default receive
/// limit). Returns the encoded message, the id of the last member in it,
/// and whether `members` has more.
pub fn snapshot_chunk<'a>(
    registry: &Registry,
    members: impl Iterator<Item = (&'a Arc<Entry>, Status)>,
    revision: u64,
    max_bytes: usize,
) -> (Bytes, Option<String>, bool) {
    let max_bytes = max_bytes.min(BUDGET_BYTES);
    let mut members = members.peekable();
    let mut executors = Vec::with_capacity(max_bytes.min(1 << 20));
    let mut last: Option<&Entry> = None;
    while let Some(&(entry, status)) = members.peek() {
        let before = executors.len();
        put_executor(
            entry,
            status,
            registry.last_heartbeat_unix_ms(entry),
            &mut executors,
        );
        if last.is_some() && executors.len() > max_bytes {
            executors.truncate(before);
            break;
        }
        last = Some(entry);
        members.next();
    }
    let more = members.peek().is_some();
    let snapshot_len = executors.len() + varint_len(revision) + usize::from(more) * 2;
    let mut out = BytesMut::with_capacity(delimited_len(snapshot_len));
    encode_key(
        field::RESPONSE_SNAPSHOT,
        WireType::LengthDelimited,
        &mut out,
    );
    encode_varint(snapshot_len as u64, &mut out);
    out.put_slice(&executors);
    put_varint(field::SNAPSHOT_REVISION, revision, &mut out);
    put_varint(field::SNAPSHOT_MORE, u64::from(more), &mut out);
    let last = last.map(|entry| entry.id().as_str().to_owned());
    (out.freeze(), last, more)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::watch_executors_response::Kind;
    use crate::registry::{Registration, RegistryConfig};

    /// A registry of `n` members, of several shapes: no labels or a few,
    /// unnamed, long names; every third has heartbeated (RUNNING).
    async fn fleet(n: usize) -> Registry {
        let (registry, _task) = Registry::start_in_memory(RegistryConfig::default());
        for i in 0..n {
            let labels = (0..i % 4)
                .map(|k| (format!("label-{k}"), "v".repeat(1 + (i * 7 + k) % 60)))
                .collect();
            let name = match i % 3 {
                0 => String::new(),
                1 => format!("worker-{i}"),
                _ => "n".repeat(100),
            };
            let registration = Registration {
                name,
                address: format!("10.0.{}.{}:{}", i / 250, i % 250, 7000 + i),
                labels,
                owner: None,
            };
            let entry = registry.register(registration).await.unwrap();
            if i % 3 == 0 {
                registry
                    .heartbeat(
                        entry.id().as_str(),
                        Some(std::time::Duration::from_secs(30 + i as u64)),
                    )
                    .unwrap();
            }
        }
        // The RUNNING events are the loop's: wait until the snapshot has them.
        let running = n.div_ceil(3);
        for _ in 0..1000 {
            if registry
                .snapshot()
                .iter_after(None)
                .filter(|(_, s)| *s == Status::Running)
                .count()
                == running
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        registry
    }

    /// Every chunk of the snapshot at `max_bytes`, decoded.
    fn chunks(registry: &Registry, max_bytes: usize) -> Vec<(proto::Snapshot, usize)> {
        let snapshot = registry.snapshot();
        let (mut out, mut after) = (Vec::new(), None::<String>);
        loop {
            let (bytes, last, more) = snapshot_chunk(
                registry,
                snapshot.iter_after(after.as_deref()),
                snapshot.revision(),
                max_bytes,
            );
            let message = WatchMessage::Encoded(bytes);
            let size = message.encoded_len();
            let Ok(proto::WatchExecutorsResponse {
                kind: Some(Kind::Snapshot(chunk)),
            }) = message.decoded()
            else {
                panic!("a snapshot chunk decodes as a Snapshot");
            };
            assert_eq!(chunk.more, more);
            assert_eq!(chunk.executors.last().map(|e| e.id.clone()), last);
            out.push((chunk, size));
            if !more {
                return out;
            }
            after = last;
        }
    }

    #[tokio::test]
    async fn chunks_decode_to_the_executors_convert_makes_in_order_at_one_revision() {
        let registry = fleet(300).await;
        let snapshot = registry.snapshot();
        let expected: Vec<proto::Executor> = snapshot
            .iter_after(None)
            .map(|(entry, status)| convert::executor(&registry, entry, status))
            .collect();
        assert_eq!(expected.len(), 300);
        assert!(
            expected
                .iter()
                .any(|e| e.status == proto::ExecutorStatus::Running as i32)
        );
        assert!(
            expected
                .iter()
                .any(|e| e.status == proto::ExecutorStatus::Initing as i32)
        );
        for max_bytes in [1, 900, 4096, CHUNK_TEST_BYTES] {
            let chunks = chunks(&registry, max_bytes);
            let got: Vec<proto::Executor> = chunks
                .iter()
                .flat_map(|(c, _)| c.executors.clone())
                .collect();
            assert_eq!(got, expected, "max_bytes {max_bytes}");
            for (chunk, size) in &chunks {
                assert_eq!(chunk.revision, snapshot.revision());
                assert!(!chunk.executors.is_empty());
                // Over the budget only when one executor alone is.
                assert!(*size <= max_bytes + 16 || chunk.executors.len() == 1);
            }
            if max_bytes == 1 {
                assert_eq!(chunks.len(), 300, "one executor a chunk");
            }
            if max_bytes == CHUNK_TEST_BYTES {
                assert_eq!(chunks.len(), 1, "the whole fleet in one chunk");
            }
        }
    }

    /// Larger than the 300-member fleet's encoding.
    const CHUNK_TEST_BYTES: usize = 1 << 20;

    #[tokio::test]
    async fn an_encoded_message_is_sent_as_is_and_decodes_back() {
        let registry = fleet(10).await;
        let snapshot = registry.snapshot();
        let (bytes, _, more) = snapshot_chunk(
            &registry,
            snapshot.iter_after(None),
            snapshot.revision(),
            1 << 16,
        );
        assert!(!more);
        let message = WatchMessage::Encoded(bytes.clone());
        assert_eq!(message.encode_to_vec(), bytes.to_vec());
        let built = message.decoded().unwrap();
        assert_eq!(built.encode_to_vec().len(), bytes.len());
        // Decoding into a WatchMessage (what a generic decoder would do)
        // gives the built message.
        assert_eq!(
            WatchMessage::decode(bytes.as_ref()).unwrap(),
            WatchMessage::Built(built)
        );
    }
}
