//! The gRPC transport around the core.
//!
//! Owns: the tonic server — the `registry.v1.Registry` service, the
//! operator service `registry.admin.v1.Admin`, standard health
//! (`grpc.health.v1.Health`) and reflection — message size limits,
//! and graceful shutdown: health NOT_SERVING, streams ended, in-flight calls
//! finished, all within a grace period — and the security around them: TLS
//! and mutual TLS on the listener ([`tls`]), authentication and admin-only
//! paths ([`auth`]). It holds no membership state.

mod admin;
pub mod auth;
mod chunks;
mod convert;
mod error;
mod framing;
mod limits;
pub mod paging;
mod service;
pub mod tls;
pub mod wire;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

pub use admin::AdminService;
pub use auth::{ADMIN_PREFIX, AdminToken, Auth};
pub use error::{to_heartbeat_status, to_status};
pub use framing::FramingChecked;
pub use limits::{
    Admission, DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_WATCHERS, DEFAULT_SNAPSHOT_RATE_MIB, Limits,
};
pub use service::RegistryService;

use crate::proto;
use crate::proto::admin::admin_server::AdminServer;
use crate::proto::registry_server::RegistryServer;
use crate::registry::Registry;

/// Largest request message accepted (SPEC: a message over 4 MiB is refused).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Fully qualified service name, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "registry.v1.Registry";
/// Fully qualified name of the operator service; every method path under
/// `/registry.admin.v1.Admin/` is for admins.
pub const ADMIN_SERVICE_NAME: &str = "registry.admin.v1.Admin";

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

/// Default time a graceful shutdown may drain (`--shutdown-grace`).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

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
            grace: DEFAULT_SHUTDOWN_GRACE,
            limits: Limits::default(),
        }
    }
}

/// Who may connect and what they may do. The default is plaintext with no
/// authentication (every caller trusted).
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// TLS on the listener (with a client verifier for mutual TLS): see
    /// [`tls::server_config`]. None: plaintext.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// How callers are authenticated. [`Auth::Mutual`] needs `tls` with a
    /// client verifier.
    pub auth: Auth,
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
    services(registry, streams_stop, Admission::new(limits)).0
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
    serve_secure(listener, registry, shutdown, options, Security::default()).await
}

/// [`serve_with`], with `security`: TLS on the listener and authentication
/// of every call. Refused handshakes and calls are counted through the
/// registry's observer.
pub async fn serve_secure(
    listener: TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
    options: ServeOptions,
    security: Security,
) -> Result<Stopped, tonic::transport::Error> {
    let observer = registry.observer().clone();
    let streams_stop = CancellationToken::new();
    let admission = Admission::new(options.limits);
    let (service, admin) = services(registry, streams_stop.clone(), admission);
    let serving = Serving {
        streams_stop,
        grace: options.grace,
        max_concurrent_streams: None,
        security,
        observer,
    };
    serve_service(listener, service, admin, shutdown, serving).await
}

/// The registry's gRPC services over `registry`: `registry.v1.Registry`
/// (streams end when `streams_stop` is cancelled) and the operator service.
pub fn services(
    registry: Registry,
    streams_stop: CancellationToken,
    admission: Admission,
) -> (
    FramingChecked<RegistryServer<RegistryService>>,
    FramingChecked<AdminServer<AdminService>>,
) {
    let admin = AdminServer::new(AdminService::new(registry.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let service = RegistryServer::new(RegistryService::new(registry, streams_stop, admission))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        // Pages and snapshot chunks stop below it (`paging`), so a client
        // with gRPC's default receive limit reads any fleet.
        .max_encoding_message_size(paging::MAX_MESSAGE_BYTES);
    (
        // The one method whose requests are a stream (possibly empty).
        FramingChecked::new(service, &["/registry.v1.Registry/HeartbeatStream"]),
        FramingChecked::new(admin, &[]),
    )
}

/// A gRPC service the server can mount (what tonic's router asks of one).
pub trait Mountable:
    tonic::codegen::Service<
        tonic::codegen::http::Request<tonic::body::Body>,
        Response = tonic::codegen::http::Response<tonic::body::Body>,
        Error = std::convert::Infallible,
        Future: Send + 'static,
    > + tonic::server::NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T> Mountable for T where
    T: tonic::codegen::Service<
            tonic::codegen::http::Request<tonic::body::Body>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
            Future: Send + 'static,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// How [`serve_service`] runs its services.
pub struct Serving {
    /// Cancelled at shutdown: the services end their streams on it.
    pub streams_stop: CancellationToken,
    /// How long shutdown may drain before connections are dropped.
    pub grace: Duration,
    /// HTTP/2 streams per connection; None keeps the default (200). A
    /// follower replica raises it: it multiplexes the calls it forwards
    /// (long-lived heartbeat and watch streams among them) over one
    /// connection to the leader.
    pub max_concurrent_streams: Option<u32>,
    /// TLS and authentication.
    pub security: Security,
    /// Where refused handshakes and calls are counted.
    pub observer: Arc<dyn crate::registry::Observer>,
}

/// Serves `service` as `registry.v1.Registry` and `admin` as
/// `registry.admin.v1.Admin` (with health and reflection) on `listener`
/// until `shutdown` resolves; then cancels `serving.streams_stop` and drains
/// for at most `serving.grace`. Replicas serve their routing front this way.
pub async fn serve_service<S, A>(
    listener: TcpListener,
    service: S,
    admin: A,
    shutdown: impl Future<Output = ()> + Send + 'static,
    serving: Serving,
) -> Result<Stopped, tonic::transport::Error>
where
    S: Mountable,
    A: Mountable,
{
    let Serving {
        streams_stop,
        grace,
        max_concurrent_streams,
        security,
        observer,
    } = serving;
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

    let mut builder = tonic::transport::Server::builder();
    if max_concurrent_streams.is_some() {
        builder = builder.max_concurrent_streams(max_concurrent_streams);
    }
    let router = builder
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(auth::AuthLayer::new(security.auth, observer.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .add_service(admin);
    type Server = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;
    let mut server: Server = match security.tls {
        None => Box::pin(router.serve_with_incoming_shutdown(incoming(listener), signal)),
        Some(config) => Box::pin(
            router.serve_with_incoming_shutdown(tls::incoming(listener, config, observer), signal),
        ),
    };
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
