//! The gRPC transport around the core.
//!
//! Owns: the tonic server — the `registry.v1.Registry` service, standard
//! health (`grpc.health.v1.Health`) and reflection — message size limits,
//! and graceful shutdown: health NOT_SERVING, streams ended, in-flight calls
//! finished, all within a grace period. It holds no membership state.

mod convert;
mod error;
mod framing;
mod limits;
mod service;

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

pub use error::{to_heartbeat_status, to_status};
pub use framing::FramingChecked;
pub use limits::{Admission, Limits};
pub use service::RegistryService;

use crate::proto;
use crate::proto::registry_server::RegistryServer;
use crate::registry::Registry;

/// Largest request message accepted (SPEC: a message over 4 MiB is refused).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Fully qualified service name, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "registry.v1.Registry";

/// Accepted connections, with Nagle's algorithm off: heartbeats are small
/// messages that must not wait for a delayed ACK. (tonic's own `tcp_nodelay`
/// applies only when it binds the socket itself.)
fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        if let Err(e) = conn.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        Ok(conn)
    })
}

/// How the server stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Every connection finished within the grace period.
    Drained,
    /// The grace period ran out; remaining connections were dropped.
    GraceElapsed,
}

/// How a server runs.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// How long shutdown may drain before connections are dropped.
    pub grace: Duration,
    /// Overload limits.
    pub limits: Limits,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(10),
            limits: Limits::default(),
        }
    }
}

/// The `registry.v1.Registry` service exactly as [`serve_with`] mounts it:
/// the [`RegistryService`] over `registry`, admitted by `limits`, with the
/// request size limit ([`MAX_REQUEST_BYTES`]), no limit on response size,
/// and request bodies checked for whole gRPC messages ([`FramingChecked`]).
/// Its streams end when `streams_stop` is cancelled. A tower `Service` of
/// `http::Request`s: the fuzz targets (`fuzz/`) and tests drive it without
/// a socket.
pub fn registry_service(
    registry: Registry,
    streams_stop: CancellationToken,
    limits: Limits,
) -> FramingChecked<RegistryServer<RegistryService>> {
    FramingChecked::new(
        RegistryServer::new(RegistryService::new(
            registry,
            streams_stop,
            Admission::new(limits),
        ))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        // Lists and snapshots of a large fleet are big; clients raise their
        // own decoding limit to read them.
        .max_encoding_message_size(usize::MAX),
        // The one method whose requests are a stream (possibly empty).
        &["/registry.v1.Registry/HeartbeatStream"],
    )
}

/// Serves `registry` on `listener` until `shutdown` resolves, then drains
/// for at most `grace`; default limits.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> Result<Stopped, tonic::transport::Error> {
    let options = ServeOptions {
        grace,
        ..ServeOptions::default()
    };
    serve_with(listener, registry, shutdown, options).await
}

/// Serves `registry` on `listener` until `shutdown` resolves, then drains
/// for at most `options.grace`.
pub async fn serve_with(
    listener: TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
    options: ServeOptions,
) -> Result<Stopped, tonic::transport::Error> {
    let grace = options.grace;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid");

    let streams_stop = CancellationToken::new();
    let service = registry_service(registry, streams_stop.clone(), options.limits);

    let signal = {
        let streams_stop = streams_stop.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: health NOT_SERVING, ending streams");
            health
                .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
                .await;
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            streams_stop.cancel();
        }
    };

    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming(listener), signal);
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result.map(|()| Stopped::Drained),
        () = streams_stop.cancelled() => {
            match tokio::time::timeout(grace, &mut server).await {
                Ok(result) => result.map(|()| Stopped::Drained),
                Err(_) => {
                    tracing::warn!(grace = ?grace, "grace period elapsed; dropping the remaining connections");
                    Ok(Stopped::GraceElapsed)
                }
            }
        }
    }
}
