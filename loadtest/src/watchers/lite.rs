//! The watch stream, decoded lightly.
//!
//! Watch streams are read here, not with [`crate::watch`]: phase B must stop
//! reading on purpose, and 64 readers of a million-member snapshot must not
//! decode 64 million executors on a client that shares the server's
//! machine. They decode `WatchExecutorsResponse` with [`LiteResponse`]: a
//! snapshot's executors as ids only (prost skips the other fields), events
//! whole.
//!
//! Owns: the lite message types and opening `WatchExecutors` with them
//! ([`open_lite_watch`]).
//!
//! Must not touch: the verifying watch's internals ([`crate::watch`]); the
//! server beyond its public gRPC API.

use executor_registry::codec::RegistryCodec;
use executor_registry::proto::{ExecutorEvent, WatchExecutorsRequest};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// `WatchExecutorsResponse` with a snapshot's executors decoded as ids only.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LiteResponse {
    /// Snapshot chunk or event.
    #[prost(oneof = "LiteKind", tags = "1, 2")]
    pub kind: Option<LiteKind>,
}

/// `WatchExecutorsResponse.kind`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum LiteKind {
    /// A snapshot chunk, ids only.
    #[prost(message, tag = "1")]
    Snapshot(LiteSnapshot),
    /// An event, whole.
    #[prost(message, tag = "2")]
    Event(ExecutorEvent),
}

/// `Snapshot` with its executors as ids only.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LiteSnapshot {
    /// The chunk's executors.
    #[prost(message, repeated, tag = "1")]
    pub executors: Vec<LiteExecutor>,
    /// The snapshot's revision.
    #[prost(uint64, tag = "2")]
    pub revision: u64,
    /// More chunks follow.
    #[prost(bool, tag = "3")]
    pub more: bool,
}

/// `Executor`, its id only.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LiteExecutor {
    /// `Executor.id`.
    #[prost(string, tag = "1")]
    pub id: String,
}

/// Opens `WatchExecutors` from `start_revision` on `channel`, decoded as
/// [`LiteResponse`].
pub async fn open_lite_watch(
    channel: Channel,
    start_revision: u64,
) -> Result<Streaming<LiteResponse>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("connection not ready: {e}")))?;
    let path = PathAndQuery::from_static("/registry.v1.Registry/WatchExecutors");
    let codec = RegistryCodec::<WatchExecutorsRequest, LiteResponse>::default();
    Ok(grpc
        .server_streaming(
            tonic::Request::new(WatchExecutorsRequest { start_revision }),
            path,
            codec,
        )
        .await?
        .into_inner())
}
