//! A small etcd v3 client over the generated `etcdserverpb` stubs, and the
//! registry's key layout in etcd.
//!
//! Owns: the gRPC channel to the etcd endpoints (plaintext, or TLS with a
//! CA and optionally a client certificate), the start-up probe that tells
//! an etcd that is not there from one this client cannot talk to
//! ([`Etcd::probe`]), paginated prefix reads,
//! fenced transactions chunked under etcd's per-transaction operation limit,
//! and leases (grant, keep-alive, revoke); and [`Keys`], where each thing
//! lives under `--etcd-prefix`. Used by the etcd store and by the
//! replicas, which do not import each other for it. Knows nothing of
//! executors or leadership: callers build the values and the fence.
//!
//! Must not touch: registry state.

mod keys;

pub use keys::Keys;

use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::server::tls::OutboundTls;

/// The generated etcd types (the subset in `proto/etcd/etcd.proto`).
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::request_op::Request;
use pb::{
    Compare, DeleteRangeRequest, KeyValue, LeaseGrantRequest, LeaseKeepAliveRequest,
    LeaseRevokeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, TxnResponse,
};

/// etcd's default `--max-txn-ops`: most operations in one transaction.
pub const MAX_TXN_OPS: usize = 128;
/// Keys read per page when loading a prefix, at least: a page of executors
/// is about 700 KB (at most ~18 MB with every label at its largest).
const PAGE: i64 = 2_000;
/// A large prefix is read in about this many pages: etcd 3.4 applies a
/// range's limit only after collecting every revision of the range from its
/// index, so each page costs as much as the keys after it, and a load in
/// fixed pages grows with the square of the fleet (1M executors in pages of
/// 2,000: 500 scans of up to 1M keys, minutes).
const TARGET_PAGES: i64 = 16;
/// Largest page asked for, in bytes, by the mean key-value size seen so far.
const PAGE_BYTES: i64 = 32 << 20;
/// Longest single etcd call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// An etcd failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EtcdError {
    /// The fence compare failed: this replica no longer holds leadership.
    #[error("fenced: this replica is no longer the leader (its leader key changed)")]
    Fenced,
    /// etcd could not be reached or refused the call.
    #[error("etcd: {0}")]
    Call(String),
}

fn call_error(status: tonic::Status) -> EtcdError {
    EtcdError::Call(format!("{}: {}", status.code(), status.message()))
}

/// The condition every write of a leader carries: its leader key still has
/// the create revision it had when this replica won the election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The leader key.
    pub key: Vec<u8>,
    /// Its create revision when this replica created it.
    pub create_revision: i64,
}

impl Fence {
    fn compare(&self) -> Compare {
        Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Create as i32,
            key: self.key.clone(),
            target_union: Some(TargetUnion::CreateRevision(self.create_revision)),
        }
    }
}

/// A put operation.
pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: key.into(),
            value: value.into(),
            lease,
            prev_kv: false,
        })),
    }
}

/// A delete of one key.
pub fn delete(key: impl Into<Vec<u8>>) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
            key: key.into(),
            range_end: Vec::new(),
            prev_kv: false,
        })),
    }
}

/// A delete of every key under `prefix`.
pub fn delete_prefix(prefix: impl Into<Vec<u8>>) -> RequestOp {
    let key = prefix.into();
    RequestOp {
        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
            range_end: prefix_end(&key),
            key,
            prev_kv: false,
        })),
    }
}

/// A read of one key.
pub fn get(key: impl Into<Vec<u8>>) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestRange(RangeRequest {
            key: key.into(),
            ..Default::default()
        })),
    }
}

/// The compare "`key` does not exist".
pub fn absent(key: impl Into<Vec<u8>>) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.into(),
        target_union: Some(TargetUnion::CreateRevision(0)),
    }
}

/// The end of the range of keys starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A cheap-to-clone connection to etcd.
#[derive(Clone)]
pub struct Etcd {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd").finish_non_exhaustive()
    }
}

/// What a probe of etcd found ([`Etcd::probe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// etcd answered: with data, or with a gRPC error of its own (no
    /// leader yet, say), which the caller's retries deal with.
    Answered,
    /// Nothing answered: the connection was refused, found no route, or
    /// timed out. etcd may be down or still starting; worth retrying.
    Unreachable(String),
    /// A connection was made but no call got through: the TLS handshake
    /// failed, or the server did not speak (plaintext) HTTP/2 — TLS on one
    /// side only, a CA that did not sign etcd's certificate, a client
    /// certificate missing or refused. Retrying will not help.
    Mismatch(String),
}

/// One unary call to etcd, bounded by [`CALL_TIMEOUT`]; `what` names it
/// in the timeout's error.
async fn call<T>(
    what: &str,
    request: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, EtcdError> {
    tokio::time::timeout(CALL_TIMEOUT, request)
        .await
        .map_err(|_| EtcdError::Call(format!("{what} timed out")))?
        .map(tonic::Response::into_inner)
        .map_err(call_error)
}

/// Walks an error's sources: unreachable when any is an I/O error of a
/// connection that was never made (or timed out), a mismatch otherwise.
fn classify(error: &(dyn std::error::Error + 'static)) -> Reach {
    use std::io::ErrorKind;
    let mut innermost = error;
    while let Some(source) = innermost.source() {
        innermost = source;
    }
    // "connection closed", "invalid peer certificate: UnknownIssuer", …
    let described = innermost.to_string();
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::TimedOut
                    | ErrorKind::HostUnreachable
                    | ErrorKind::NetworkUnreachable
                    | ErrorKind::AddrNotAvailable
            )
        {
            return Reach::Unreachable(described);
        }
        source = e.source();
    }
    Reach::Mismatch(described)
}

impl Etcd {
    /// A plaintext client balancing over `endpoints` (`host:port`);
    /// connects lazily.
    pub fn new(endpoints: &[String]) -> Result<Self, EtcdError> {
        Self::connect(endpoints, None)
    }

    /// A client balancing over `endpoints` (`host:port`), over TLS with
    /// `tls` (`https://`), plaintext without; connects lazily.
    pub fn connect(endpoints: &[String], tls: Option<&OutboundTls>) -> Result<Self, EtcdError> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let list = endpoints
            .iter()
            .map(|e| {
                let uri = if e.contains("://") {
                    e.clone()
                } else {
                    format!("{scheme}://{e}")
                };
                let bad = |err: String| EtcdError::Call(format!("bad etcd endpoint {e:?}: {err}"));
                let endpoint = Endpoint::from_shared(uri).map_err(|err| bad(err.to_string()))?;
                let endpoint = match tls {
                    Some(tls) => tls.apply(endpoint).map_err(|err| bad(err.to_string()))?,
                    None => endpoint,
                };
                Ok(endpoint
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    .keep_alive_timeout(Duration::from_secs(3)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let channel = match list.as_slice() {
            [] => return Err(EtcdError::Call("no etcd endpoint given".into())),
            [one] => one.connect_lazy(),
            _ => Channel::balance_list(list.into_iter()),
        };
        Ok(Self {
            kv: KvClient::new(channel.clone()).max_decoding_message_size(256 << 20),
            lease: LeaseClient::new(channel),
        })
    }

    /// One cheap read (a count of one key), to learn whether etcd can be
    /// talked to at all, within `within`. A gRPC error from etcd itself
    /// counts as an answer.
    pub async fn probe(&self, key: &[u8], within: Duration) -> Reach {
        let request = RangeRequest {
            key: key.to_vec(),
            count_only: true,
            ..Default::default()
        };
        let mut kv = self.kv.clone();
        match tokio::time::timeout(within, kv.range(request)).await {
            Err(_) => Reach::Unreachable(format!("no answer within {within:?}")),
            Ok(Ok(_)) => Reach::Answered,
            Ok(Err(status)) => match std::error::Error::source(&status) {
                // A status etcd sent carries no transport error.
                None => Reach::Answered,
                Some(_) => classify(&status),
            },
        }
    }

    /// Every key-value whose key starts with `prefix`, in key order, read in
    /// pages at one revision.
    pub async fn range_prefix(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, EtcdError> {
        let end = prefix_end(prefix);
        let mut from = prefix.to_vec();
        let mut revision = 0;
        let mut limit = PAGE;
        let mut out = Vec::new();
        loop {
            let request = RangeRequest {
                key: from.clone(),
                range_end: end.clone(),
                limit,
                revision,
                ..Default::default()
            };
            let mut kv = self.kv.clone();
            let response = call("range", kv.range(request)).await?;
            if revision == 0 {
                revision = response.header.map(|h| h.revision).unwrap_or(0);
                // The first page counts the whole prefix.
                limit = page_limit(response.count, kv_bytes(&response.kvs), response.kvs.len());
            }
            let more = response.more;
            if let Some(last) = response.kvs.last() {
                from = last.key.clone();
                from.push(0);
            }
            out.extend(response.kvs);
            if !more {
                return Ok(out);
            }
        }
    }

    /// The value of `key`, if it exists.
    pub async fn value(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EtcdError> {
        let request = RangeRequest {
            key: key.to_vec(),
            ..Default::default()
        };
        let mut kv = self.kv.clone();
        let response = call("range", kv.range(request)).await?;
        Ok(response.kvs.into_iter().next().map(|kv| kv.value))
    }

    /// One transaction.
    pub async fn txn(&self, request: TxnRequest) -> Result<TxnResponse, EtcdError> {
        let mut kv = self.kv.clone();
        call("transaction", kv.txn(request)).await
    }

    /// Applies `ops` in transactions of at most [`MAX_TXN_OPS`] operations,
    /// each conditional on `fence`. Stops at the first failure; chunks
    /// before it stay applied.
    pub async fn fenced(&self, fence: &Fence, ops: Vec<RequestOp>) -> Result<(), EtcdError> {
        let mut ops = ops.into_iter().peekable();
        while ops.peek().is_some() {
            let chunk: Vec<RequestOp> = ops.by_ref().take(MAX_TXN_OPS).collect();
            let response = self
                .txn(TxnRequest {
                    compare: vec![fence.compare()],
                    success: chunk,
                    failure: Vec::new(),
                })
                .await?;
            if !response.succeeded {
                return Err(EtcdError::Fenced);
            }
        }
        Ok(())
    }

    /// Grants a lease of `ttl`; returns its id and granted TTL.
    pub async fn grant(&self, ttl: Duration) -> Result<(i64, Duration), EtcdError> {
        let mut lease = self.lease.clone();
        let request = LeaseGrantRequest {
            ttl: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            id: 0,
        };
        let response = call("lease grant", lease.lease_grant(request)).await?;
        if !response.error.is_empty() {
            return Err(EtcdError::Call(response.error));
        }
        Ok((
            response.id,
            Duration::from_secs(u64::try_from(response.ttl).unwrap_or(0)),
        ))
    }

    /// Revokes a lease (its keys are deleted at once). Best effort.
    pub async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        let mut lease = self.lease.clone();
        call(
            "lease revoke",
            lease.lease_revoke(LeaseRevokeRequest { id }),
        )
        .await
        .map(|_| ())
    }

    /// Keeps lease `id` alive every `period`, reporting after each answer
    /// the instant until which the lease is certainly valid (that request's
    /// send time + the TTL granted). Requests go out on schedule whether or
    /// not earlier ones were answered, so a slow answer does not delay the
    /// next renewal. Returns when the lease is gone (etcd answered TTL 0) or
    /// `valid_until` has no receiver left. A broken stream is reopened; it
    /// does not extend validity.
    pub async fn keep_alive(
        &self,
        id: i64,
        period: Duration,
        valid_until: tokio::sync::watch::Sender<Instant>,
    ) {
        let request = LeaseKeepAliveRequest { id };
        while !valid_until.is_closed() {
            let (tx, rx) = mpsc::channel(16);
            let mut sent = std::collections::VecDeque::new();
            // The first request goes before the stream opens: etcd answers
            // the stream's headers only with the first keep-alive answer.
            sent.push_back(Instant::now());
            if tx.send(request).await.is_err() {
                return;
            }
            let mut lease = self.lease.clone();
            let opened = tokio::time::timeout(
                CALL_TIMEOUT,
                lease.lease_keep_alive(ReceiverStream::new(rx)),
            )
            .await;
            let mut answers = match opened {
                Ok(Ok(response)) => response.into_inner(),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "cannot open the lease keep-alive stream");
                    tokio::time::sleep(period / 2).await;
                    continue;
                }
                Err(_) => continue,
            };
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                if valid_until.is_closed() {
                    return;
                }
                tokio::select! {
                    _ = tick.tick() => {
                        if sent.len() >= 8 {
                            tracing::debug!("lease keep-alives unanswered; reopening the stream");
                            break;
                        }
                        sent.push_back(Instant::now());
                        if tx.try_send(request).is_err() {
                            break;
                        }
                    }
                    answer = answers.message() => match answer {
                        Ok(Some(answer)) if answer.ttl <= 0 => {
                            tracing::warn!(lease = id, "the etcd lease expired");
                            return;
                        }
                        Ok(Some(answer)) => {
                            let ttl = Duration::from_secs(u64::try_from(answer.ttl).unwrap_or(0));
                            if let Some(at) = sent.pop_front() {
                                valid_until.send_replace(at + ttl);
                            }
                        }
                        Ok(None) | Err(_) => break,
                    },
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Bytes of keys and values in `kvs`.
fn kv_bytes(kvs: &[KeyValue]) -> i64 {
    kvs.iter()
        .map(|kv| (kv.key.len() + kv.value.len()) as i64)
        .sum()
}

/// Keys per page for a prefix of `count` keys whose first `seen` took
/// `bytes`: about [`TARGET_PAGES`] pages, none over [`PAGE_BYTES`] at that
/// mean size, none under [`PAGE`] keys.
fn page_limit(count: i64, bytes: i64, seen: usize) -> i64 {
    let mean = (bytes / (seen as i64).max(1)).max(1);
    let by_count = (count + TARGET_PAGES - 1) / TARGET_PAGES;
    by_count.min(PAGE_BYTES / mean).max(PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("transport error")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn no_connection_is_unreachable_and_a_failed_conversation_a_mismatch() {
        use std::io::{Error, ErrorKind};
        for kind in [
            ErrorKind::ConnectionRefused,
            ErrorKind::TimedOut,
            ErrorKind::HostUnreachable,
        ] {
            let reach = classify(&Wrapped(Error::from(kind)));
            assert!(
                matches!(reach, Reach::Unreachable(_)),
                "{kind:?}: {reach:?}"
            );
        }
        for error in [
            Error::from(ErrorKind::ConnectionReset),
            Error::from(ErrorKind::UnexpectedEof),
            Error::new(
                ErrorKind::InvalidData,
                "invalid peer certificate: UnknownIssuer",
            ),
        ] {
            let reach = classify(&Wrapped(error));
            assert!(matches!(reach, Reach::Mismatch(_)), "{reach:?}");
        }
        // The innermost cause is what is reported.
        let reach = classify(&Wrapped(Error::new(
            ErrorKind::InvalidData,
            "bad certificate",
        )));
        assert_eq!(reach, Reach::Mismatch("bad certificate".into()));
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap();
        let etcd = Etcd::new(&[port.to_string()]).unwrap();
        let reach = etcd.probe(b"/k", Duration::from_secs(5)).await;
        assert!(matches!(reach, Reach::Unreachable(_)), "{reach:?}");
    }

    #[tokio::test]
    async fn a_server_that_does_not_speak_grpc_is_a_mismatch() {
        // Accepts, reads a little, hangs up: what a TLS-only etcd does to
        // a plaintext client.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                use tokio::io::AsyncReadExt as _;
                let mut buf = [0u8; 64];
                let _ = conn.read(&mut buf).await;
            }
        });
        let etcd = Etcd::new(&[addr.to_string()]).unwrap();
        let reach = etcd.probe(b"/k", Duration::from_secs(5)).await;
        assert!(matches!(reach, Reach::Mismatch(_)), "{reach:?}");
    }

    #[test]
    fn a_large_prefix_is_read_in_a_few_pages_of_bounded_bytes() {
        // Small prefixes: the smallest page.
        assert_eq!(page_limit(0, 0, 0), PAGE);
        assert_eq!(page_limit(10_000, 700_000, 2_000), PAGE);
        // 1M executors of 350 bytes: 16 pages of 62,500 (22 MB).
        assert_eq!(page_limit(1_000_000, 700_000, 2_000), 62_500);
        // Large values: bounded by bytes instead (32 MiB at 9 KB each).
        assert_eq!(page_limit(1_000_000, 18_000_000, 2_000), PAGE_BYTES / 9_000);
    }

    #[test]
    fn prefix_end_increments_the_last_byte_that_can_be() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
