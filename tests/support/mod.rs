//! Shared helpers for end-to-end tests: a real registry behind a real tonic
//! server on `127.0.0.1:0`, and clients connected to it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use executor_registry::proto::registry_client::RegistryClient;
use executor_registry::proto::{self, RegisterRequest};
use executor_registry::registry::{NoopObserver, Registry, RegistryConfig, RegistryTask};
use executor_registry::server::{self, Stopped};
use executor_registry::store::{MembershipStore, MemoryStore};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// A server under test.
pub struct TestServer {
    pub addr: SocketAddr,
    pub registry: Registry,
    shutdown: CancellationToken,
    server: JoinHandle<Result<Stopped, tonic::transport::Error>>,
    task: RegistryTask,
}

/// Settings that keep tests fast: short TTLs allowed.
pub fn fast_config() -> RegistryConfig {
    RegistryConfig {
        init_ttl: Duration::from_secs(5),
        min_ttl: Duration::from_millis(50),
        max_ttl: Duration::from_secs(60),
        heartbeat_interval: Duration::from_millis(100),
        ..RegistryConfig::default()
    }
}

impl TestServer {
    /// Starts a server with `config` on an in-memory store.
    pub async fn start(config: RegistryConfig) -> Self {
        Self::start_with_store(config, Box::new(MemoryStore::new())).await
    }

    /// Starts a server with `config` on `store`.
    pub async fn start_with_store(config: RegistryConfig, store: Box<dyn MembershipStore>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (registry, task) =
            Registry::start(config, store, Arc::new(NoopObserver)).expect("registry starts");
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone().cancelled_owned();
        let server = tokio::spawn(server::serve(
            listener,
            registry.clone(),
            signal,
            Duration::from_secs(5),
        ));
        Self {
            addr,
            registry,
            shutdown,
            server,
            task,
        }
    }

    /// A connected client.
    pub async fn client(&self) -> RegistryClient<Channel> {
        RegistryClient::new(self.channel().await).max_decoding_message_size(usize::MAX)
    }

    /// A client whose HTTP/2 windows are the protocol's default 64 KiB
    /// (hyper's client defaults to 2 MiB per stream), so a client that stops
    /// reading pushes back on the server after 64 KiB of events. Beware: h2
    /// also closes the connection when ~170 unread DATA frames under 256
    /// bytes pile up, so stalled-watcher tests need events above that size.
    pub async fn small_window_client(&self) -> RegistryClient<Channel> {
        let endpoint = Channel::from_shared(format!("http://{}", self.addr))
            .expect("valid uri")
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535);
        RegistryClient::new(endpoint.connect().await.expect("connect"))
    }

    /// A connected channel.
    pub async fn channel(&self) -> Channel {
        let endpoint = format!("http://{}", self.addr);
        for _ in 0..50 {
            if let Ok(channel) = Channel::from_shared(endpoint.clone())
                .expect("valid uri")
                .connect()
                .await
            {
                return channel;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("server on {} never accepted a connection", self.addr);
    }

    /// Graceful shutdown: how the server stopped.
    pub async fn stop(self) -> Stopped {
        self.shutdown.cancel();
        let stopped = self.server.await.expect("server task").expect("server ran");
        self.task.stop().await;
        stopped
    }
}

/// A valid registration request.
pub fn register_request(name: &str, port: u16, labels: &[(&str, &str)]) -> RegisterRequest {
    RegisterRequest {
        name: name.into(),
        address: format!("127.0.0.1:{port}"),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

/// Registers and returns the id.
pub async fn register(client: &mut RegistryClient<Channel>, name: &str, port: u16) -> String {
    client
        .register(register_request(name, port, &[]))
        .await
        .expect("register")
        .into_inner()
        .executor
        .expect("executor in response")
        .id
}

/// The next message of a watch stream, within 10 s.
pub async fn next_message(
    stream: &mut tonic::Streaming<proto::WatchExecutorsResponse>,
) -> Result<proto::watch_executors_response::Kind, tonic::Status> {
    let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("watch message within 10 s")?
        .expect("stream not ended");
    Ok(message.kind.expect("message has a kind"))
}

/// The next event of a watch stream (panics on a snapshot or error).
pub async fn next_event(
    stream: &mut tonic::Streaming<proto::WatchExecutorsResponse>,
) -> proto::ExecutorEvent {
    match next_message(stream).await.expect("watch event") {
        proto::watch_executors_response::Kind::Event(e) => e,
        other => panic!("expected an event, got {other:?}"),
    }
}

/// Opens a watch and returns the snapshot and the stream.
pub async fn watch(
    client: &mut RegistryClient<Channel>,
) -> (
    proto::Snapshot,
    tonic::Streaming<proto::WatchExecutorsResponse>,
) {
    let mut stream = client
        .watch_executors(proto::WatchExecutorsRequest {})
        .await
        .expect("watch")
        .into_inner();
    match next_message(&mut stream).await.expect("snapshot") {
        proto::watch_executors_response::Kind::Snapshot(s) => (s, stream),
        other => panic!("expected a snapshot first, got {other:?}"),
    }
}
