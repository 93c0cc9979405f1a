//! Shared helpers for end-to-end tests: a real registry behind a real tonic
//! server on `127.0.0.1:0`, and clients connected to it.
#![allow(dead_code)]

pub mod etcd;
pub mod pki;
pub mod process;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use executor_registry::client::ClientTls;
use executor_registry::proto::registry_client::RegistryClient;
use executor_registry::proto::{self, RegisterRequest};
use executor_registry::registry::{
    Batch, MembershipStore, MemoryStore, StoreError, StoredExecutor,
};
use executor_registry::registry::{NoopObserver, Observer, Registry, RegistryConfig, RegistryTask};
use executor_registry::server::{self, Limits, ServeOptions, Stopped};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

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
        Self::serve(
            listener,
            config,
            store,
            Arc::new(NoopObserver),
            Limits::default(),
        )
    }

    /// Starts a server with `config` on `store`, with overload `limits`.
    pub async fn start_limited(
        config: RegistryConfig,
        store: Box<dyn MembershipStore>,
        limits: Limits,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        Self::serve(listener, config, store, Arc::new(NoopObserver), limits)
    }

    /// Starts a server on `addr` — the address of a server that was stopped:
    /// a restart, as clients see it. Retries the bind for a few seconds.
    pub async fn start_on(
        addr: SocketAddr,
        config: RegistryConfig,
        store: Box<dyn MembershipStore>,
    ) -> Self {
        Self::start_observed(Some(addr), config, store, Arc::new(NoopObserver)).await
    }

    /// Starts a server on `addr` (None: any port) reporting to `observer`.
    pub async fn start_observed(
        addr: Option<SocketAddr>,
        config: RegistryConfig,
        store: Box<dyn MembershipStore>,
        observer: Arc<dyn Observer>,
    ) -> Self {
        let addr = addr.unwrap_or_else(|| "127.0.0.1:0".parse().expect("addr"));
        let mut attempts = 0;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(_) if attempts < 100 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot bind {addr} again: {e}"),
            }
        };
        Self::serve(listener, config, store, observer, Limits::default())
    }

    fn serve(
        listener: TcpListener,
        config: RegistryConfig,
        store: Box<dyn MembershipStore>,
        observer: Arc<dyn Observer>,
        limits: Limits,
    ) -> Self {
        let addr = listener.local_addr().expect("local addr");
        let (registry, task) = Registry::start(config, store, observer).expect("registry starts");
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone().cancelled_owned();
        let options = ServeOptions {
            grace: Duration::from_secs(5),
            limits,
        };
        let server = tokio::spawn(server::serve_with(
            listener,
            registry.clone(),
            signal,
            options,
        ));
        Self {
            addr,
            registry,
            shutdown,
            server,
            task,
        }
    }

    /// `http://addr`, as clients are configured.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A connected client.
    pub async fn client(&self) -> RegistryClient<Channel> {
        RegistryClient::new(self.channel().await)
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

/// An endpoint at `addr`: `https` with `tls`, plaintext without, from the
/// local address `from` when given. Timeouts are the caller's.
pub fn endpoint_at(
    addr: impl std::fmt::Display,
    tls: Option<&ClientTls>,
    from: Option<IpAddr>,
) -> Endpoint {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .expect("valid uri")
        .local_address(from);
    match tls {
        Some(tls) => endpoint.tls_config(tls.tonic_config()).expect("tls config"),
        None => endpoint,
    }
}

/// A client through `endpoint`, once a call through it is answered (within
/// 20 s: a server starting, a replica finding a leader that has loaded).
pub async fn answering_client(endpoint: Endpoint) -> RegistryClient<Channel> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = async {
            let mut c = RegistryClient::new(endpoint.connect().await.map_err(|e| e.to_string())?);
            c.count_executors(proto::CountExecutorsRequest::default())
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(c)
        };
        match attempt.await {
            Ok(c) => return c,
            Err(e) if tokio::time::Instant::now() > deadline => {
                panic!("no answer through {}: {e}", endpoint.uri())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Registers and returns the id.
pub async fn register(client: &mut RegistryClient<Channel>, name: &str, port: u16) -> String {
    register_large(client, name, port, 0).await
}

/// Registers `name` with `labels` labels of 60 bytes (each adds about 75
/// bytes to the executor's events) and returns the id.
pub async fn register_large(
    client: &mut RegistryClient<Channel>,
    name: &str,
    port: u16,
    labels: usize,
) -> String {
    let value = "v".repeat(60);
    let labels: Vec<(String, String)> = (0..labels)
        .map(|i| (format!("label{i:02}"), value.clone()))
        .collect();
    let labels: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    client
        .register(register_request(name, port, &labels))
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

/// Opens a watch and returns the whole snapshot (its chunks joined: each
/// at the same revision, all but the last with `more`) and the stream.
pub async fn watch(
    client: &mut RegistryClient<Channel>,
) -> (
    proto::Snapshot,
    tonic::Streaming<proto::WatchExecutorsResponse>,
) {
    let mut stream = client
        .watch_executors(proto::WatchExecutorsRequest { start_revision: 0 })
        .await
        .expect("watch")
        .into_inner();
    let snapshot = snapshot_chunks(&mut stream).await;
    (snapshot, stream)
}

/// Reads a chunked snapshot from `stream` and joins it.
pub async fn snapshot_chunks(
    stream: &mut tonic::Streaming<proto::WatchExecutorsResponse>,
) -> proto::Snapshot {
    let mut whole: Option<proto::Snapshot> = None;
    loop {
        let chunk = match next_message(stream).await.expect("snapshot") {
            proto::watch_executors_response::Kind::Snapshot(s) => s,
            other => panic!("expected a snapshot chunk, got {other:?}"),
        };
        let more = chunk.more;
        match whole.as_mut() {
            None => whole = Some(chunk),
            Some(whole) => {
                assert_eq!(chunk.revision, whole.revision, "chunks of one snapshot");
                whole.executors.extend(chunk.executors);
            }
        }
        if !more {
            let mut whole = whole.expect("a chunk came");
            whole.more = false;
            return whole;
        }
    }
}

/// Every page of a listing (`page_size` 0: the default), checking that
/// every page is at the first page's revision: the executors and that
/// revision.
pub async fn list_all(
    client: &mut RegistryClient<Channel>,
    request: proto::ListExecutorsRequest,
) -> (Vec<proto::Executor>, u64) {
    let mut request = request;
    let mut executors = Vec::new();
    let mut revision = None;
    loop {
        let page = client
            .list_executors(request.clone())
            .await
            .expect("list")
            .into_inner();
        assert_eq!(
            *revision.get_or_insert(page.revision),
            page.revision,
            "every page at the first page's revision"
        );
        executors.extend(page.executors);
        if page.next_page_token.is_empty() {
            return (executors, page.revision);
        }
        request.page_token = page.next_page_token;
    }
}

/// A store whose rows outlive the registry that wrote them: a second
/// registry started on a clone loads what the first committed (a restart
/// "with its store").
#[derive(Clone, Default)]
pub struct SharedStore(Arc<Mutex<MemoryStore>>);

impl MembershipStore for SharedStore {
    fn load_all(&mut self) -> Result<Vec<StoredExecutor>, StoreError> {
        self.0.lock().expect("store lock").load_all()
    }

    fn revision_floor(&mut self) -> Result<u64, StoreError> {
        self.0.lock().expect("store lock").revision_floor()
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        self.0.lock().expect("store lock").commit(batch)
    }
}

/// An in-memory store whose first `failures` commits fail (the registry
/// then answers UNAVAILABLE).
pub struct FlakyStore {
    inner: MemoryStore,
    failures: Arc<AtomicUsize>,
}

impl FlakyStore {
    /// A store that fails its first `failures` commits.
    pub fn new(failures: usize) -> Self {
        Self {
            inner: MemoryStore::new(),
            failures: Arc::new(AtomicUsize::new(failures)),
        }
    }
}

impl MembershipStore for FlakyStore {
    fn load_all(&mut self) -> Result<Vec<StoredExecutor>, StoreError> {
        self.inner.load_all()
    }

    fn revision_floor(&mut self) -> Result<u64, StoreError> {
        self.inner.revision_floor()
    }

    /// Fails the first `failures` commits that write executors (the
    /// revision reservation at start goes through).
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        let writes_executors = !batch.inserts.is_empty() || !batch.deletes.is_empty();
        let failing = writes_executors
            && self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        if failing {
            return Err(StoreError::Failed("disk on fire (test)".into()));
        }
        self.inner.commit(batch)
    }
}

/// Counts open watches on the server.
#[derive(Default)]
pub struct WatcherGauge(pub AtomicI64);

impl Observer for WatcherGauge {
    fn watchers(&self, delta: i64) {
        self.0.fetch_add(delta, Ordering::SeqCst);
    }
}

/// Waits up to `limit` for `check` to hold, polling every 20 ms.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A store whose commits wait until the gate is opened: a slow disk, to
/// hold registrations in flight.
pub struct GatedStore {
    inner: MemoryStore,
    gate: Gate,
}

/// Opens a [`GatedStore`].
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, std::sync::Condvar)>);

impl Gate {
    /// Lets every waiting and later commit through.
    pub fn open(&self) {
        self.open_even_if_poisoned();
    }

    fn open_even_if_poisoned(&self) {
        let (open, changed) = &*self.0;
        *open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        changed.notify_all();
    }

    fn wait(&self) {
        let (open, changed) = &*self.0;
        let mut guard = open.lock().unwrap_or_else(|e| e.into_inner());
        while !*guard {
            guard = changed.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The test's handle opens the gate when it goes away, also when a test
/// fails before opening it: otherwise the store thread would wait forever
/// and the registry, flushing it at shutdown, would hang the test instead
/// of letting it report its failure.
impl Drop for Gate {
    fn drop(&mut self) {
        self.open_even_if_poisoned();
    }
}

impl GatedStore {
    /// A closed store and the gate that opens it.
    pub fn new() -> (Self, Gate) {
        let gate = Gate::default();
        let store = Self {
            inner: MemoryStore::new(),
            gate: gate.clone(),
        };
        (store, gate)
    }
}

impl MembershipStore for GatedStore {
    fn load_all(&mut self) -> Result<Vec<StoredExecutor>, StoreError> {
        self.inner.load_all()
    }

    fn revision_floor(&mut self) -> Result<u64, StoreError> {
        self.inner.revision_floor()
    }

    /// Waits at the gate before each commit that writes executors (the
    /// revision reservation at start goes through).
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        if !batch.inserts.is_empty() || !batch.deletes.is_empty() {
            self.gate.wait();
        }
        self.inner.commit(batch)
    }
}

/// GETs `path` from `addr` over HTTP/1.0 (no chunking, the server closes):
/// the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    use std::io::{Read as _, Write as _};
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8(response)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let malformed = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("malformed HTTP response: {response:?}"),
        )
    };
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(malformed)?;
    Ok((status, body.to_owned()))
}

/// The value of the sample line `series` (name and labels exactly as rendered).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.parse().ok()
    })
}
