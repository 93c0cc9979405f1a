//! Durability against the real `executor-registry` binary, on real SQLite
//! files in temporary data directories, with real faults: `kill -9` and
//! restart, the crash test at 20 random kill points, SIGTERM with pending
//! deletes, a store that fails while the server runs (an immutable WAL, as
//! root), corrupt and truncated databases at start, and the data-dir lock
//! between two processes.
//!
//! The tests take turns ([`SERIAL`]): each runs servers whose expiries it
//! times, on a 2-core machine; run together they would measure each other.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "tests on real time wait and measure on the real clock"
)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod support;

use executor_registry::proto::registry_client::RegistryClient;
use executor_registry::proto::watch_executors_response::Kind;
use executor_registry::proto::{
    CountExecutorsRequest, EventType, Executor, ExecutorEvent, ExecutorStatus, GetExecutorRequest,
    HeartbeatBatchRequest, HeartbeatRequest, HeartbeatStatus, ListExecutorsRequest, OfflineReason,
    RegisterRequest, WatchExecutorsRequest, WatchExecutorsResponse,
};
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_executor-registry");

/// One test at a time (see the module header).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

/// A running `executor-registry serve`, killed on drop. Its output goes to
/// a file beside the data directory, shown when a test fails.
struct Server {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
    log: PathBuf,
    /// When the process was spawned: it loads the store after this.
    spawned: Instant,
}

impl Server {
    /// Starts a server on `data` (its parent directory receives the log).
    fn start(data: &Path, extra: &[&str]) -> Server {
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, Ordering::Relaxed);
        let log = data
            .parent()
            .expect("the data dir has a parent")
            .join(format!("server-{n}.log"));
        let (addr, metrics) = (free_addr(), free_addr());
        // Logs go to stdout, errors to stderr: both into the one file.
        let out = std::fs::File::create(&log).expect("create the log file");
        let err = out.try_clone().expect("clone the log file");
        let child = Command::new(BIN)
            .arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--metrics-listen")
            .arg(metrics.to_string())
            .arg("--data-dir")
            .arg(data)
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start the binary");
        Server {
            child,
            addr,
            metrics,
            log,
            spawned: Instant::now(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A channel to it, once it accepts connections.
    async fn channel(&mut self) -> Channel {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("the server exited ({status}) at start:\n{}", self.log());
            }
            match Channel::from_shared(format!("http://{}", self.addr))
                .expect("uri")
                .connect()
                .await
            {
                Ok(channel) => return channel,
                Err(e) if Instant::now() > deadline => {
                    panic!("the server never came up: {e}\n{}", self.log())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    async fn client(&mut self) -> RegistryClient<Channel> {
        RegistryClient::new(self.channel().await)
    }

    /// `kill -9`, and reaps it.
    fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    /// SIGTERM, then waits up to `limit` for the exit: its code and how long
    /// it took.
    async fn sigterm(&mut self, limit: Duration) -> (Option<i32>, Duration) {
        let sent = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (status.code(), sent.elapsed());
            }
            assert!(
                sent.elapsed() < limit,
                "no exit within {limit:?} of SIGTERM:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The value of one sample on `/metrics`, e.g.
    /// `registry_store_errors_total{op="commit"}`.
    fn metric(&self, sample: &str) -> f64 {
        let mut stream = TcpStream::connect_timeout(&self.metrics, Duration::from_secs(5))
            .expect("connect to /metrics");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: registry\r\n\r\n").expect("request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        response
            .lines()
            .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no sample {sample} in:\n{response}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- server log {}:\n{}", self.log.display(), self.log());
        }
    }
}

/// Runs `serve` on `data`, expecting it to exit by itself within 20 s: the
/// exit code and stderr.
fn serve_to_exit(data: &Path) -> (Option<i32>, String) {
    let (addr, metrics) = (free_addr(), free_addr());
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--metrics-listen")
        .arg(metrics.to_string())
        .arg("--data-dir")
        .arg(data)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the binary");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve on {} did not exit by itself", data.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut stderr)
        .expect("stderr");
    (status.code(), stderr)
}

/// Asserts `serve` on `data` refuses to start: a non-zero exit, no panic,
/// and an error on stderr naming `named`. Returns stderr.
fn assert_refused(data: &Path, named: &Path) -> String {
    let (code, stderr) = serve_to_exit(data);
    assert!(
        matches!(code, Some(c) if c != 0),
        "exit {code:?}:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains(&named.display().to_string()),
        "does not name {}:\n{stderr}",
        named.display()
    );
    stderr
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

async fn register(
    client: &mut RegistryClient<Channel>,
    name: &str,
    address: &str,
    labels: HashMap<String, String>,
) -> Result<Executor, tonic::Status> {
    let response = client
        .register(RegisterRequest {
            name: name.into(),
            address: address.into(),
            labels,
        })
        .await?;
    Ok(response.into_inner().executor.expect("an executor"))
}

/// Live executors with `status` by id, and the revision (every page at the
/// first page's).
async fn list(
    client: &mut RegistryClient<Channel>,
    status: ExecutorStatus,
) -> (BTreeMap<String, Executor>, u64) {
    let request = ListExecutorsRequest {
        status: status as i32,
        ..Default::default()
    };
    let (executors, revision) = support::list_all(client, request).await;
    let executors = executors.into_iter().map(|e| (e.id.clone(), e)).collect();
    (executors, revision)
}

async fn count(client: &mut RegistryClient<Channel>, status: ExecutorStatus) -> u64 {
    client
        .count_executors(CountExecutorsRequest {
            status: status as i32,
        })
        .await
        .expect("count")
        .into_inner()
        .count
}

type WatchStream = tonic::Streaming<WatchExecutorsResponse>;

/// Opens a watch: its snapshot's ids and revision, and the stream.
async fn watch(client: &mut RegistryClient<Channel>) -> (BTreeSet<String>, u64, WatchStream) {
    let mut stream = client
        .watch_executors(WatchExecutorsRequest::default())
        .await
        .expect("watch")
        .into_inner();
    // The snapshot, in chunks of one revision.
    let mut ids = BTreeSet::new();
    loop {
        let message = stream.message().await.expect("snapshot").expect("snapshot");
        let Some(Kind::Snapshot(chunk)) = message.kind else {
            panic!("a watch starts with a snapshot, got {message:?}");
        };
        ids.extend(chunk.executors.into_iter().map(|e| e.id));
        if !chunk.more {
            return (ids, chunk.revision, stream);
        }
    }
}

/// The next ONLINE or OFFLINE event within `limit`; `None` if none came.
/// RUNNING events (first heartbeats) are passed over: these tests are
/// about membership surviving crashes; `tests/grpc_api.rs` checks them.
async fn next_event(stream: &mut WatchStream, limit: Duration) -> Option<ExecutorEvent> {
    let until = Instant::now() + limit;
    loop {
        let message = tokio::time::timeout_at(until.into(), stream.message())
            .await
            .ok()?;
        match message.expect("the watch goes on").expect("not ended").kind {
            Some(Kind::Event(event)) if event.r#type == EventType::Running as i32 => {}
            Some(Kind::Event(event)) => return Some(event),
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

/// `n` events, each within `limit`.
async fn events(stream: &mut WatchStream, n: usize, limit: Duration) -> Vec<ExecutorEvent> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match next_event(stream, limit).await {
            Some(event) => out.push(event),
            None => panic!("{} of {n} events came: {out:?}", out.len()),
        }
    }
    out
}

fn is_expiry(event: &ExecutorEvent) -> bool {
    event.r#type == EventType::Offline as i32 && event.reason == OfflineReason::Expired as i32
}

/// Heartbeats `ids` every `every` with `ttl_ms` until cancelled, in one
/// `HeartbeatBatch` per round; returns how many rounds were not all OK.
fn heartbeat_until(
    mut client: RegistryClient<Channel>,
    ids: Vec<String>,
    ttl_ms: u64,
    every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut bad_rounds = 0;
        while !stop.is_cancelled() {
            let request = HeartbeatBatchRequest {
                heartbeats: ids
                    .iter()
                    .map(|id| HeartbeatRequest {
                        executor_id: id.clone(),
                        ttl_ms,
                    })
                    .collect(),
            };
            let all_ok = match client.heartbeat_batch(request).await {
                Ok(response) => response
                    .into_inner()
                    .results
                    .iter()
                    .all(|r| r.status == HeartbeatStatus::Ok as i32),
                Err(_) => false,
            };
            if !all_ok {
                bad_rounds += 1;
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stop.cancelled() => {}
            }
        }
        bad_rounds
    })
}

/// Ids and addresses of the rows in `<data>/registry.db`, read through a
/// read-only connection of our own while the server may be running.
fn rows_in_file(data: &Path) -> BTreeSet<String> {
    let conn = rusqlite::Connection::open_with_flags(
        data.join("registry.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the database read-only");
    let mut select = conn.prepare("SELECT id FROM executors").expect("prepare");
    select
        .query_map([], |row| row.get::<_, String>(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

/// `path` made immutable with `chattr +i` (root): even descriptors already
/// open cannot write it. Undone on drop. `None` where that does not work
/// here (not root, no `chattr`, a filesystem without attributes).
struct Immutable(PathBuf);

impl Immutable {
    fn make(path: &Path) -> Option<Immutable> {
        let set = Command::new("chattr").arg("+i").arg(path).output();
        if !set.is_ok_and(|out| out.status.success()) {
            return None;
        }
        let guard = Immutable(path.to_owned());
        let refused = std::fs::OpenOptions::new().append(true).open(path).is_err();
        refused.then_some(guard)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let status = Command::new("chattr").arg("-i").arg(&self.0).status();
        assert!(
            status.is_ok_and(|s| s.success()) || std::thread::panicking(),
            "chattr -i {}",
            self.0.display()
        );
    }
}

/// A temporary root holding `data/` (the data dir) and the server logs.
fn data_dir() -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    (root, data)
}

// ------------------------------------------------------------ acceptance

/// Durability end to end: every stored executor comes back INITING after a
/// kill -9, and only those that heartbeat again survive.
#[tokio::test]
async fn after_kill_9_all_200_come_back_initing_and_only_those_that_heartbeat_survive_a_clean_restart()
 {
    const N: usize = 200;
    let _serial = SERIAL.lock().await;
    let (_root, data) = data_dir();
    let init_ttl = Duration::from_secs(3);
    let flags = ["--init-heartbeat-ttl", "3s", "--min-heartbeat-ttl", "100ms"];

    let mut server = Server::start(&data, &flags);
    let client = server.client().await;
    let registrations = (0..N).map(|i| {
        let mut client = client.clone();
        async move {
            let labels = labels(&[
                ("idx", &i.to_string()),
                ("pool", &format!("pool-{}", i % 4)),
                ("zone", "eu-west-1a"),
            ]);
            let address = format!("10.1.{}.{}:7000", i / 256, i % 256);
            register(&mut client, "acceptance", &address, labels)
                .await
                .expect("register")
        }
    });
    let registered: BTreeMap<String, Executor> = futures_util::future::join_all(registrations)
        .await
        .into_iter()
        .map(|e| (e.id.clone(), e))
        .collect();
    assert_eq!(registered.len(), N);
    server.kill9();

    // All 200 are back, INITING, as registered.
    let mut server = Server::start(&data, &flags);
    let mut client = server.client().await;
    let (listed, _) = list(&mut client, ExecutorStatus::Unspecified).await;
    assert!(
        server.spawned.elapsed() < init_ttl,
        "the check came too late to see INITING"
    );
    assert_eq!(
        listed.keys().collect::<Vec<_>>(),
        registered.keys().collect::<Vec<_>>()
    );
    for (id, executor) in &listed {
        let before = &registered[id];
        assert_eq!(executor.status, ExecutorStatus::Initing as i32, "{id}");
        assert_eq!(executor.labels, before.labels, "{id}");
        assert_eq!(executor.address, before.address, "{id}");
        assert_eq!(executor.name, "acceptance");
    }
    assert_eq!(count(&mut client, ExecutorStatus::Initing).await, N as u64);

    // Half of them heartbeat: RUNNING at once.
    let (snapshot, _, mut stream) = watch(&mut client).await;
    assert_eq!(snapshot.len(), N);
    let ids: Vec<String> = registered.keys().cloned().collect();
    let survivors: Vec<String> = ids.iter().step_by(2).cloned().collect();
    let silent: BTreeSet<String> = ids.iter().skip(1).step_by(2).cloned().collect();
    let stop = CancellationToken::new();
    let heartbeats = heartbeat_until(
        client.clone(),
        survivors.clone(),
        1_000,
        Duration::from_millis(100),
        stop.clone(),
    );
    let deadline = Instant::now() + Duration::from_secs(1);
    while count(&mut client, ExecutorStatus::Running).await < survivors.len() as u64 {
        assert!(
            Instant::now() < deadline,
            "heartbeats did not make them RUNNING"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (running, _) = list(&mut client, ExecutorStatus::Running).await;
    assert_eq!(running.keys().cloned().collect::<Vec<_>>(), survivors);

    // The rest expire after the init TTL, not before, all together.
    let expired = events(&mut stream, silent.len(), Duration::from_secs(10)).await;
    assert!(
        server.spawned.elapsed() >= init_ttl,
        "expired {:?} after the start, before the init TTL",
        server.spawned.elapsed()
    );
    assert!(expired.iter().all(is_expiry), "{expired:?}");
    let expired_ids: BTreeSet<String> = expired.iter().map(|e| e.executor_id.clone()).collect();
    assert_eq!(expired_ids, silent);

    // The survivors stay: RUNNING, through several heartbeat TTLs.
    assert_eq!(
        next_event(&mut stream, Duration::from_millis(2_500)).await,
        None,
        "no other change"
    );
    let (live, _) = list(&mut client, ExecutorStatus::Unspecified).await;
    assert_eq!(live.keys().cloned().collect::<Vec<_>>(), survivors);
    assert!(
        live.values()
            .all(|e| e.status == ExecutorStatus::Running as i32)
    );
    stop.cancel();
    assert_eq!(
        heartbeats.await.expect("heartbeat task"),
        0,
        "a heartbeat failed"
    );

    // A clean restart: only the survivors come back.
    let (code, _) = server.sigterm(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0), "{}", server.log());
    let mut server = Server::start(&data, &flags);
    let mut client = server.client().await;
    let (listed, _) = list(&mut client, ExecutorStatus::Unspecified).await;
    assert_eq!(listed.keys().cloned().collect::<Vec<_>>(), survivors);
    for (id, executor) in &listed {
        assert_eq!(executor.status, ExecutorStatus::Initing as i32, "{id}");
        assert_eq!(executor.labels, registered[id].labels, "{id}");
    }
}

// ------------------------------------------------------------ crash test

/// One answered registration: what the server said it stored.
#[derive(Debug, Clone)]
struct Acked {
    id: String,
    address: String,
}

/// A storm of registrations from `connections` × `per_connection` tasks,
/// until `stop`; every OK answer goes to `acked`. Each task ends with the
/// number of its calls that failed (0 or 1: each may or may not have been
/// committed).
async fn storm(
    server: &mut Server,
    round: usize,
    connections: usize,
    per_connection: usize,
    acked: Arc<Mutex<Vec<Acked>>>,
    stop: CancellationToken,
) -> tokio::task::JoinSet<usize> {
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..connections {
        let client = server.client().await;
        for t in 0..per_connection {
            let mut client = client.clone();
            let acked = acked.clone();
            let stop = stop.clone();
            tasks.spawn(async move {
                for seq in 0.. {
                    if stop.is_cancelled() {
                        return 0;
                    }
                    let address = format!("r{round}-c{c}-t{t}-n{seq}.storm:9000");
                    let labels = labels(&[("round", &round.to_string())]);
                    match register(&mut client, "storm", &address, labels).await {
                        Ok(executor) => {
                            assert_eq!(executor.address, address);
                            acked.lock().expect("acked").push(Acked {
                                id: executor.id,
                                address,
                            });
                        }
                        // The server died under it: this one may have
                        // been committed or not. Stop here.
                        Err(_) => return 1,
                    }
                }
                0
            });
        }
    }
    tasks
}

/// No registration answered OK is ever lost across kill -9, at 20 random
/// kill points. Replay a failure with the seed it printed:
/// `CRASH_SEED=<seed> cargo test --test durability no_registration`.
#[tokio::test]
async fn no_registration_answered_ok_is_lost_across_kill_9_at_20_random_points() {
    const ROUNDS: usize = 20;
    let _serial = SERIAL.lock().await;
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("crash test seed: {seed} (replay: CRASH_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (_root, data) = data_dir();
    // Nothing expires during the test: every stored row stays.
    let flags = ["--init-heartbeat-ttl", "10m"];
    let acked = Arc::new(Mutex::new(Vec::<Acked>::new()));
    let mut unanswered = 0;
    let started = Instant::now();

    for round in 0..=ROUNDS {
        let mut server = Server::start(&data, &flags);
        let mut client = server.client().await;

        // Everything answered OK in earlier rounds is here, as it was
        // answered; anything else must be one of the unanswered calls.
        let (listed, _) = list(&mut client, ExecutorStatus::Unspecified).await;
        let acked_so_far = acked.lock().expect("acked").clone();
        for a in &acked_so_far {
            let Some(executor) = listed.get(&a.id) else {
                panic!(
                    "seed {seed}, round {round}: {} was answered OK and is lost \
                     ({} of {} acked listed)",
                    a.id,
                    acked_so_far
                        .iter()
                        .filter(|a| listed.contains_key(&a.id))
                        .count(),
                    acked_so_far.len()
                );
            };
            assert_eq!(executor.address, a.address, "seed {seed}: {}", a.id);
            assert_eq!(executor.status, ExecutorStatus::Initing as i32);
        }
        assert!(
            listed.len() <= acked_so_far.len() + unanswered,
            "seed {seed}, round {round}: {} listed, but only {} acked + {unanswered} unanswered",
            listed.len(),
            acked_so_far.len()
        );
        if round == ROUNDS {
            println!(
                "{} registrations answered OK over {ROUNDS} kills, all present; \
                 {} listed, {unanswered} calls cut off by a kill; {:.1} s",
                acked_so_far.len(),
                listed.len(),
                started.elapsed().as_secs_f64()
            );
            break;
        }

        // A storm from 8 connections × 4 concurrent calls, killed at random.
        let delay = Duration::from_millis(rng.random_range(50..=500));
        let before = acked_so_far.len();
        let stop = CancellationToken::new();
        let mut tasks = storm(&mut server, round, 8, 4, acked.clone(), stop.clone()).await;
        tokio::time::sleep(delay).await;
        server.kill9();
        stop.cancel();
        let mut failed = 0;
        while let Some(task) = tasks.join_next().await {
            failed += task.expect("storm task");
        }
        unanswered += failed;
        let now = acked.lock().expect("acked").len();
        println!(
            "round {round:2}: kill -9 after {:3} ms of storm: {:5} acked, {failed:2} cut off",
            delay.as_millis(),
            now - before
        );
    }
    assert!(
        acked.lock().expect("acked").len() > ROUNDS,
        "the storms registered (almost) nothing"
    );
}

// ------------------------------------------------------------ shutdown

/// SIGTERM while watches are open and deletes are pending (the store failed
/// them and their retry is not due yet): exit 0 within the grace, the
/// watches end, and the deletes were flushed — none of the expired comes
/// back. Without `chattr` the deletes are merely in flight at SIGTERM.
#[tokio::test]
async fn sigterm_with_open_watches_and_pending_deletes_exits_0_within_the_grace_and_flushes_them() {
    const DOOMED: usize = 50;
    let _serial = SERIAL.lock().await;
    let (_root, data) = data_dir();
    let grace = Duration::from_secs(5);
    let flags = ["--init-heartbeat-ttl", "1s", "--shutdown-grace", "5s"];
    let mut server = Server::start(&data, &flags);
    let mut client = server.client().await;

    let mut keepers = BTreeSet::new();
    for i in 0..3 {
        let e = register(&mut client, "keeper", &format!("10.2.0.{i}:1"), labels(&[]))
            .await
            .expect("register");
        client
            .heartbeat(HeartbeatRequest {
                executor_id: e.id.clone(),
                ttl_ms: 600_000,
            })
            .await
            .expect("heartbeat");
        keepers.insert(e.id);
    }
    // Together, so that they expire together.
    futures_util::future::join_all((0..DOOMED).map(|i| {
        let mut client = client.clone();
        async move {
            register(&mut client, "doomed", &format!("10.2.1.{i}:1"), labels(&[]))
                .await
                .expect("register")
        }
    }))
    .await;
    let mut watches = Vec::new();
    for _ in 0..3 {
        watches.push(watch(&mut client).await.2);
    }
    let fault = Immutable::make(&data.join("registry.db-wal"));
    let faulted = fault.is_some();
    if !faulted {
        eprintln!("no chattr here: the deletes are only in flight at SIGTERM");
    }

    let expired = events(&mut watches[0], DOOMED, Duration::from_secs(10)).await;
    assert!(expired.iter().all(is_expiry));
    if fault.is_some() {
        // Their delete batch failed; the retry is a second away.
        let errors = r#"registry_store_errors_total{op="commit"}"#;
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.metric(errors) < 1.0 {
            assert!(Instant::now() < deadline, "the delete never failed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(rows_in_file(&data).len(), keepers.len() + DOOMED);
    }
    drop(fault);
    let (code, took) = server.sigterm(grace + Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "{}", server.log());
    assert!(took < grace + Duration::from_secs(1), "took {took:?}");
    for mut stream in watches {
        // After the events it had not read yet: the end.
        let end = loop {
            let message = tokio::time::timeout(Duration::from_secs(5), stream.message())
                .await
                .expect("the watch ended");
            match message {
                Ok(Some(WatchExecutorsResponse {
                    kind: Some(Kind::Event(event)),
                })) if is_expiry(&event) => continue,
                end => break end,
            }
        };
        assert!(
            matches!(&end, Err(s) if s.code() == Code::Unavailable) || matches!(end, Ok(None)),
            "watch ended with {end:?}"
        );
    }
    let log = server.log();
    assert!(!log.contains("could not flush"), "{log}");
    if faulted {
        // Held back for their retry, they were written by the shutdown flush.
        assert!(
            log.contains("flushed pending deletes at shutdown deletes=50"),
            "{log}"
        );
    }

    let mut server = Server::start(&data, &flags);
    let mut client = server.client().await;
    let (listed, _) = list(&mut client, ExecutorStatus::Unspecified).await;
    assert_eq!(listed.keys().cloned().collect::<BTreeSet<_>>(), keepers);
    assert_eq!(rows_in_file(&data), keepers);
}

/// Revisions never go backwards across a `kill -9`: the restarted registry
/// starts above every revision the killed one assigned (it had reserved
/// them in the store before assigning them), so an old `start_revision`
/// gets a snapshot, never a wrong resume. Three kills in a row.
#[tokio::test]
async fn after_kill_9_revisions_go_on_above_every_revision_seen_before() {
    let _serial = SERIAL.lock().await;
    let (_root, data) = data_dir();
    let flags = ["--init-heartbeat-ttl", "10m"];
    let mut seen = 0;
    for round in 0..3 {
        let mut server = Server::start(&data, &flags);
        let mut client = server.client().await;
        let (_, start, mut stream) = watch(&mut client).await;
        assert!(
            round == 0 || start > seen,
            "round {round}: started at {start}, saw {seen} before the kill"
        );
        // An old revision is no resume point in this life.
        if round > 0 {
            let mut old = client
                .watch_executors(WatchExecutorsRequest {
                    start_revision: seen,
                })
                .await
                .expect("watch")
                .into_inner();
            let first = old.message().await.expect("message").expect("not ended");
            assert!(
                matches!(first.kind, Some(Kind::Snapshot(ref s)) if s.revision == start),
                "round {round}: {first:?}"
            );
        }
        let mut last = start;
        for i in 0..20 {
            let e = register(
                &mut client,
                "rev",
                &format!("10.9.{round}.{i}:1"),
                Default::default(),
            )
            .await
            .expect("register");
            client
                .heartbeat(HeartbeatRequest {
                    executor_id: e.id,
                    ttl_ms: 600_000,
                })
                .await
                .expect("heartbeat");
        }
        // ONLINE and RUNNING for each.
        while last < start + 40 {
            let message = stream.message().await.expect("event").expect("not ended");
            let Some(Kind::Event(event)) = message.kind else {
                panic!("an event, got {message:?}");
            };
            assert_eq!(event.revision, last + 1, "consecutive");
            last = event.revision;
        }
        seen = last;
        server.kill9();
    }
}

// ------------------------------------------------------- store failure

/// The store fails for real while the server runs (its WAL made immutable:
/// every write fails with a disk I/O error), then works again.
#[tokio::test]
async fn a_failing_store_refuses_registrations_keeps_serving_from_memory_and_recovers_without_a_restart()
 {
    let _serial = SERIAL.lock().await;
    let (_root, data) = data_dir();
    let flags = ["--init-heartbeat-ttl", "2s", "--min-heartbeat-ttl", "100ms"];
    let mut server = Server::start(&data, &flags);
    let mut client = server.client().await;

    let mut keepers = BTreeSet::new();
    let mut doomed = BTreeSet::new();
    for i in 0..3 {
        let labels = labels(&[("role", "keeper")]);
        let e = register(&mut client, "keeper", &format!("10.3.0.{i}:1"), labels)
            .await
            .expect("register");
        keepers.insert(e.id);
        let e = register(
            &mut client,
            "doomed",
            &format!("10.3.1.{i}:1"),
            Default::default(),
        )
        .await
        .expect("register");
        doomed.insert(e.id);
    }
    let stop = CancellationToken::new();
    let heartbeats = heartbeat_until(
        client.clone(),
        keepers.iter().cloned().collect(),
        1_000,
        Duration::from_millis(100),
        stop.clone(),
    );
    let all: BTreeSet<String> = keepers.union(&doomed).cloned().collect();
    // The keepers' first heartbeats (RUNNING events) are published first.
    let deadline = Instant::now() + Duration::from_secs(5);
    while list(&mut client, ExecutorStatus::Running).await.0.len() < keepers.len() {
        assert!(Instant::now() < deadline, "the keepers never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (snapshot, revision, mut stream) = watch(&mut client).await;
    assert_eq!(snapshot, all);

    let Some(fault) = Immutable::make(&data.join("registry.db-wal")) else {
        eprintln!("skipped: needs root and chattr to make the WAL immutable");
        return;
    };

    // Register: UNAVAILABLE, naming the file; nothing of it anywhere.
    let refused = register(&mut client, "refused", "10.3.2.1:1", Default::default())
        .await
        .expect_err("the store cannot write");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("registry.db"), "{refused:?}");
    let (listed, listed_revision) = list(&mut client, ExecutorStatus::Unspecified).await;
    assert_eq!(listed.keys().cloned().collect::<BTreeSet<_>>(), all);
    assert_eq!(listed_revision, revision);
    assert_eq!(count(&mut client, ExecutorStatus::Unspecified).await, 6);
    assert!(listed.values().all(|e| e.name != "refused"));

    // Reads, watches and heartbeats go on from memory.
    let (again, again_revision, _) = watch(&mut client).await;
    assert_eq!((again, again_revision), (all.clone(), revision));
    let one = keepers.first().expect("a keeper").clone();
    let got = client
        .get_executor(GetExecutorRequest { executor_id: one })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.status, ExecutorStatus::Running as i32);

    // The doomed expire on time; the first events after the refusal are
    // theirs, with the next revisions: no ONLINE for the refused one.
    let expired = events(&mut stream, doomed.len(), Duration::from_secs(10)).await;
    assert!(expired.iter().all(is_expiry), "{expired:?}");
    let expired_ids: BTreeSet<String> = expired.iter().map(|e| e.executor_id.clone()).collect();
    assert_eq!(expired_ids, doomed);
    let revisions: Vec<u64> = expired.iter().map(|e| e.revision).collect();
    assert_eq!(revisions, (revision + 1..=revision + 3).collect::<Vec<_>>());
    let (live, _) = list(&mut client, ExecutorStatus::Unspecified).await;
    assert_eq!(live.keys().cloned().collect::<BTreeSet<_>>(), keepers);

    // Their deletes fail, and are retried: more failed commits, rows stay.
    let errors = r#"registry_store_errors_total{op="commit"}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.metric(errors) < 3.0 {
        assert!(Instant::now() < deadline, "the deletes were not retried");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rows_in_file(&data), all);

    // The store works again: no restart.
    drop(fault);
    let back = register(&mut client, "back", "10.3.3.1:1", Default::default())
        .await
        .expect("registers again once the store works");
    let online = next_event(&mut stream, Duration::from_secs(5))
        .await
        .expect("an event");
    assert_eq!(online.executor_id, back.id);
    assert_eq!(online.r#type, EventType::Online as i32);
    assert_eq!(online.revision, revision + 4);
    client
        .heartbeat(HeartbeatRequest {
            executor_id: back.id.clone(),
            ttl_ms: 600_000,
        })
        .await
        .expect("heartbeat");
    let mut expected = keepers.clone();
    expected.insert(back.id.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    while rows_in_file(&data) != expected {
        assert!(
            Instant::now() < deadline,
            "the retried deletes never landed: {:?}",
            rows_in_file(&data)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    assert_eq!(
        heartbeats.await.expect("heartbeat task"),
        0,
        "a heartbeat failed"
    );

    // No shutdown flush to help: kill -9. The expired do not come back,
    // the refused never existed.
    server.kill9();
    let mut server = Server::start(&data, &flags);
    let mut client = server.client().await;
    let (listed, _) = list(&mut client, ExecutorStatus::Unspecified).await;
    assert_eq!(listed.keys().cloned().collect::<BTreeSet<_>>(), expected);
}

/// A database that is not one, or is cut short, or cannot be written: serve
/// exits non-zero at start with an error naming the file, and no panic.
#[tokio::test]
async fn a_corrupt_truncated_or_unwritable_database_at_start_is_a_clear_error_naming_the_file() {
    let _serial = SERIAL.lock().await;
    let (_root, data) = data_dir();
    let db = data.join("registry.db");

    // Garbage.
    std::fs::create_dir_all(&data).expect("mkdir");
    let garbage: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&db, &garbage).expect("write");
    let stderr = assert_refused(&data, &db);
    assert!(
        stderr.contains("not a usable registry database"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&db).expect("read"), garbage, "left untouched");
    std::fs::remove_file(&db).expect("rm");

    // A real database, written by the registry and closed cleanly (so all
    // of it is in the main file), then truncated.
    let mut server = Server::start(&data, &[]);
    let client = server.client().await;
    futures_util::future::join_all((0..500).map(|i| {
        let mut client = client.clone();
        async move {
            let labels = labels(&[("zone", "eu-west-1a"), ("rack", &format!("r{i}"))]);
            register(
                &mut client,
                "w",
                &format!("10.4.{}.{}:1", i / 256, i % 256),
                labels,
            )
            .await
            .expect("register")
        }
    }))
    .await;
    let (code, _) = server.sigterm(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0));
    assert!(
        !data.join("registry.db-wal").exists(),
        "checkpointed at exit"
    );
    let full = std::fs::read(&db).expect("read");
    assert!(full.len() > 16 * 1024, "{} bytes", full.len());
    for keep in [100, 4096, full.len() / 2] {
        std::fs::write(&db, &full[..keep]).expect("truncate");
        let stderr = assert_refused(&data, &db);
        assert!(
            stderr.contains("not a usable registry database"),
            "{keep} bytes: {stderr}"
        );
    }

    // Intact again, but unwritable (root ignores permissions: chattr).
    std::fs::write(&db, &full).expect("restore");
    if let Some(_fault) = Immutable::make(&db) {
        let stderr = assert_refused(&data, &db);
        assert!(stderr.contains("cannot read and write"), "{stderr}");
    }
    let mut server = Server::start(&data, &[]);
    let mut client = server.client().await;
    assert_eq!(count(&mut client, ExecutorStatus::Unspecified).await, 500);
}

// ------------------------------------------------------- data-dir lock

#[tokio::test]
async fn a_second_registry_on_the_same_data_dir_is_refused_until_the_first_is_gone() {
    let _serial = SERIAL.lock().await;
    let (_root, data) = data_dir();
    let mut first = Server::start(&data, &[]);
    let mut client = first.client().await;
    let kept = register(&mut client, "w", "10.5.0.1:1", Default::default())
        .await
        .expect("register");

    let (code, stderr) = serve_to_exit(&data);
    assert!(
        matches!(code, Some(c) if c != 0),
        "exit {code:?}:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("in use by another registry"), "{stderr}");
    assert!(stderr.contains(&data.display().to_string()), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {}", first.pid())),
        "names the holder: {stderr}"
    );

    // The first one never noticed.
    register(&mut client, "w", "10.5.0.2:1", Default::default())
        .await
        .expect("the first registry still works");

    // A crash releases the lock: the next one starts and has everything.
    first.kill9();
    let mut second = Server::start(&data, &[]);
    let mut client = second.client().await;
    let (listed, _) = list(&mut client, ExecutorStatus::Unspecified).await;
    assert_eq!(listed.len(), 2);
    assert!(listed.contains_key(&kept.id));
}
