//! The bare transport: a `registry.v1.Registry` whose bodies do nothing.
//!
//! `Heartbeat` answers a constant at once, `HeartbeatStream` answers each
//! request as it arrives, `HeartbeatBatch` answers every item OK. The results
//! carry the request's executor id, as the registry's do, so both servers
//! encode the same bytes. It is served with the same tonic settings as the
//! registry (TCP_NODELAY on accepted sockets, HTTP/2 keepalive, 4 MiB request
//! limit), so registry ÷ echo is the registry's own cost.
//!
//! Owns: a registration counter (for ids). Nothing else.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use executor_registry::proto::registry_server::{Registry, RegistryServer};
use executor_registry::proto::{self, HeartbeatResult, HeartbeatStatus};
use executor_registry::server::wire::WatchMessage;
use futures_util::{Stream, StreamExt as _, stream};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

/// The interval the echo suggests, like an idle registry's.
pub const ECHO_INTERVAL_MS: u64 = 500;
/// Request size limit, as the registry's.
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The trivial service.
#[derive(Debug, Default)]
pub struct Echo {
    registered: AtomicU64,
}

fn ok(executor_id: String) -> HeartbeatResult {
    HeartbeatResult {
        executor_id,
        status: HeartbeatStatus::Ok as i32,
        heartbeat_interval_ms: ECHO_INTERVAL_MS,
    }
}

#[tonic::async_trait]
impl Registry for Echo {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterResponse>, Status> {
        let req = request.into_inner();
        let n = self.registered.fetch_add(1, Ordering::Relaxed);
        let name = if req.name.is_empty() {
            "executor".to_owned()
        } else {
            req.name
        };
        Ok(Response::new(proto::RegisterResponse {
            executor: Some(proto::Executor {
                id: format!("{name}-{n:016x}"),
                name,
                address: req.address,
                labels: req.labels,
                status: proto::ExecutorStatus::Initing as i32,
                last_heartbeat_unix_ms: 0,
                ttl_ms: 0,
            }),
            heartbeat_interval_ms: ECHO_INTERVAL_MS,
        }))
    }

    async fn heartbeat(
        &self,
        _request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatResponse>, Status> {
        Ok(Response::new(proto::HeartbeatResponse {
            heartbeat_interval_ms: ECHO_INTERVAL_MS,
        }))
    }

    type HeartbeatStreamStream = ResponseStream<HeartbeatResult>;

    async fn heartbeat_stream(
        &self,
        request: Request<Streaming<proto::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStreamStream>, Status> {
        let results = request
            .into_inner()
            .map(|item| item.map(|req| ok(req.executor_id)));
        Ok(Response::new(Box::pin(results)))
    }

    async fn heartbeat_batch(
        &self,
        request: Request<proto::HeartbeatBatchRequest>,
    ) -> Result<Response<proto::HeartbeatBatchResponse>, Status> {
        let results = request
            .into_inner()
            .heartbeats
            .into_iter()
            .map(|hb| ok(hb.executor_id))
            .collect();
        Ok(Response::new(proto::HeartbeatBatchResponse { results }))
    }

    async fn deregister(
        &self,
        _request: Request<proto::DeregisterRequest>,
    ) -> Result<Response<proto::DeregisterResponse>, Status> {
        Ok(Response::new(proto::DeregisterResponse {}))
    }

    async fn get_executor(
        &self,
        request: Request<proto::GetExecutorRequest>,
    ) -> Result<Response<proto::Executor>, Status> {
        Err(Status::not_found(request.into_inner().executor_id))
    }

    async fn list_executors(
        &self,
        _request: Request<proto::ListExecutorsRequest>,
    ) -> Result<Response<proto::ListExecutorsResponse>, Status> {
        Ok(Response::new(proto::ListExecutorsResponse::default()))
    }

    async fn count_executors(
        &self,
        _request: Request<proto::CountExecutorsRequest>,
    ) -> Result<Response<proto::CountExecutorsResponse>, Status> {
        Ok(Response::new(proto::CountExecutorsResponse::default()))
    }

    type WatchExecutorsStream = ResponseStream<WatchMessage>;

    async fn watch_executors(
        &self,
        _request: Request<proto::WatchExecutorsRequest>,
    ) -> Result<Response<Self::WatchExecutorsStream>, Status> {
        let snapshot = WatchMessage::from(proto::WatchExecutorsResponse {
            kind: Some(proto::watch_executors_response::Kind::Snapshot(
                proto::Snapshot::default(),
            )),
        });
        Ok(Response::new(Box::pin(
            stream::once(async { Ok(snapshot) }).chain(stream::pending()),
        )))
    }
}

/// Serves the echo on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        // As the registry does: small messages must not wait for delayed ACKs.
        let _ = conn.set_nodelay(true);
        Ok::<_, std::io::Error>(conn)
    });
    let service = RegistryServer::new(Echo::default())
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(usize::MAX);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
