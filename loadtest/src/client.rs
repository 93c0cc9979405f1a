//! Connections and the three heartbeat transports.
//!
//! Every generator (fleet, throughput, compare) sends through these
//! functions only, so the registry and the echo service are driven by the
//! same code: any difference in their numbers is the server's.

use anyhow::Context as _;
use executor_registry::client::ClientTls;
use executor_registry::proto::registry_client::RegistryClient;
use executor_registry::proto::{
    self, HeartbeatBatchRequest, HeartbeatRequest, HeartbeatResult, RegisterRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};

/// A client on one HTTP/2 connection. Clones share the connection.
pub type Client = RegistryClient<Channel>;

/// Opens `connections` separate HTTP/2 connections to `endpoint`, with
/// TCP_NODELAY and gRPC's default message limits (the registry sends no
/// message over 4 MiB: lists come in pages, watch snapshots in chunks; the
/// echo sends less).
pub async fn connect(endpoint: &str, connections: usize) -> anyhow::Result<Vec<Client>> {
    connect_with(endpoint, connections, None).await
}

/// [`connect`], over TLS when `tls` is given (the endpoint is then
/// `https://`).
pub async fn connect_with(
    endpoint: &str,
    connections: usize,
    tls: Option<&ClientTls>,
) -> anyhow::Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections.max(1) {
        clients.push(RegistryClient::new(channel(endpoint, tls).await?));
    }
    Ok(clients)
}

/// One HTTP/2 connection to `endpoint` with the settings of [`connect`],
/// for callers that need the bare channel (e.g. to decode a response with
/// their own message types).
pub async fn channel(endpoint: &str, tls: Option<&ClientTls>) -> anyhow::Result<Channel> {
    let mut target = Endpoint::from_shared(endpoint.to_owned())
        .with_context(|| format!("invalid endpoint {endpoint:?}"))?
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        target = target
            .tls_config(tls.tonic_config())
            .context("TLS settings")?;
    }
    target
        .connect()
        .await
        .with_context(|| format!("cannot connect to {endpoint}"))
}

/// A heartbeat request.
pub fn heartbeat_request(executor_id: &str, ttl_ms: u64) -> HeartbeatRequest {
    HeartbeatRequest {
        executor_id: executor_id.to_owned(),
        ttl_ms,
    }
}

/// Registers one executor; returns its id and the suggested interval (ms).
pub async fn register(
    client: &mut Client,
    request: RegisterRequest,
) -> Result<(String, u64), Status> {
    let response = client.register(request).await?.into_inner();
    let id = response
        .executor
        .map(|e| e.id)
        .ok_or_else(|| Status::internal("RegisterResponse without an executor"))?;
    Ok((id, response.heartbeat_interval_ms))
}

/// One unary heartbeat; returns the suggested interval (ms).
pub async fn unary(client: &mut Client, request: HeartbeatRequest) -> Result<u64, Status> {
    Ok(client
        .heartbeat(request)
        .await?
        .into_inner()
        .heartbeat_interval_ms)
}

/// One batch of heartbeats; results in the same order.
pub async fn batch(
    client: &mut Client,
    heartbeats: Vec<HeartbeatRequest>,
) -> Result<Vec<HeartbeatResult>, Status> {
    Ok(client
        .heartbeat_batch(HeartbeatBatchRequest { heartbeats })
        .await?
        .into_inner()
        .results)
}

/// A long-lived `HeartbeatStream`: requests go in with [`BeatStream::send`],
/// results come back in order from [`BeatStream::next`]. The caller bounds
/// how many are in flight; `capacity` must be at least that bound.
pub struct BeatStream {
    requests: mpsc::Sender<HeartbeatRequest>,
    results: Streaming<HeartbeatResult>,
}

impl BeatStream {
    /// Opens a stream on `client`'s connection.
    pub async fn open(client: &mut Client, capacity: usize) -> Result<Self, Status> {
        let (requests, rx) = mpsc::channel(capacity.max(1));
        let results = client
            .heartbeat_stream(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self { requests, results })
    }

    /// Queues one request; fails only if more than `capacity` are queued or
    /// the stream is gone.
    pub fn send(&self, request: HeartbeatRequest) -> Result<(), Status> {
        self.requests
            .try_send(request)
            .map_err(|_| Status::unavailable("heartbeat stream closed or over capacity"))
    }

    /// The next result; `Ok(None)` when the server ended the stream.
    /// Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<HeartbeatResult>, Status> {
        self.results.message().await
    }
}

/// The name of a per-item heartbeat status, for error tallies.
pub fn heartbeat_status_name(status: i32) -> &'static str {
    proto::HeartbeatStatus::try_from(status)
        .map(|s| s.as_str_name())
        .unwrap_or("HEARTBEAT_STATUS_UNKNOWN_VALUE")
}

/// Whether a per-item status is OK.
pub fn is_ok(status: i32) -> bool {
    status == proto::HeartbeatStatus::Ok as i32
}
