//! Smoke test: the simulator against a real registry on loopback, and the
//! echo baseline, small and short enough for CI in a debug build.

use std::net::SocketAddr;
use std::time::Duration;

use executor_registry::registry::{Registry, RegistryConfig, RegistryTask};
use executor_registry::server::{self, Stopped};
use loadtest::fleet::{self, FleetConfig};
use loadtest::soak::{self, SoakConfig};
use loadtest::throughput::{self, Load};
use loadtest::watchers::{self, WatchersConfig};
use loadtest::{Mode, echo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct Server {
    addr: SocketAddr,
    shutdown: CancellationToken,
    handle: JoinHandle<Result<Stopped, tonic::transport::Error>>,
    task: RegistryTask,
}

impl Server {
    /// A registry that allows short TTLs and suggests a 100 ms interval.
    async fn start() -> Self {
        let config = RegistryConfig {
            init_ttl: Duration::from_secs(2),
            min_ttl: Duration::from_millis(50),
            max_ttl: Duration::from_secs(60),
            heartbeat_interval: Duration::from_millis(100),
            ..RegistryConfig::default()
        };
        let (registry, task) = Registry::start_in_memory(config);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(server::serve(
            listener,
            registry,
            shutdown.clone().cancelled_owned(),
            Duration::from_secs(5),
        ));
        Self {
            addr,
            shutdown,
            handle,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.expect("server task").expect("server ran");
        self.task.stop().await;
    }
}

async fn fleet_expires_exactly_the_killed_executors(mode: Mode) {
    let server = Server::start().await;
    let mut config = FleetConfig::new(format!("http://{}", server.addr), 200, mode);
    config.connections = 2;
    config.duration = Duration::from_secs(3);
    config.ttl = Some(Duration::from_millis(500));
    config.kill_fraction = 0.2;
    let report = fleet::run(&config).await.expect("fleet run");
    server.stop().await;

    assert_eq!(report.registration.registered, 200, "{report:#?}");
    assert_eq!(report.expiry.false_expirations, 0, "{report:#?}");
    assert_eq!(report.expiry.killed, 40, "{report:#?}");
    assert_eq!(report.expiry.killed_offline, 40, "{report:#?}");
    assert_eq!(report.expiry.killed_not_offline, 0, "{report:#?}");
    assert!(report.passed, "{:?}", report.failures);
    assert!(report.heartbeats.ok > 0);
    assert_eq!(report.heartbeats.interval_ms, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_fleet_expires_exactly_the_killed_executors() {
    fleet_expires_exactly_the_killed_executors(Mode::Stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_fleet_expires_exactly_the_killed_executors() {
    fleet_expires_exactly_the_killed_executors(Mode::Batch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_fleet_expires_exactly_the_killed_executors() {
    fleet_expires_exactly_the_killed_executors(Mode::Unary).await;
}

/// With nothing killed there is no expiry to wait for: the run ends at
/// `duration`, not a TTL after the kill point (with a 10 minute TTL, a
/// 2 s run took 5 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_run_without_kills_ends_at_its_duration_whatever_the_ttl() {
    let server = Server::start().await;
    let mut config = FleetConfig::new(format!("http://{}", server.addr), 50, Mode::Batch);
    config.connections = 1;
    config.duration = Duration::from_secs(2);
    config.ttl = Some(Duration::from_secs(60));
    config.kill_fraction = 0.0;
    let started = tokio::time::Instant::now();
    let report = fleet::run(&config).await.expect("fleet run");
    let took = started.elapsed();
    server.stop().await;
    assert_eq!(report.expiry.killed, 0, "{report:#?}");
    assert_eq!(report.expiry.false_expirations, 0, "{report:#?}");
    assert!(
        took < Duration::from_secs(30),
        "a 2 s run with a 60 s TTL took {took:?}"
    );
}

/// The watchers scenario, small and fast: every watcher gets exactly the
/// fleet, and the stalled watcher every OFFLINE of the expiring executors,
/// revisions consecutive, without a new snapshot. (The RSS and p99 ratios
/// are not asserted: at this size they measure noise. The server runs in
/// this process, so its "RSS" is this test's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_scenario_sees_whole_snapshots_and_every_offline_after_a_stall() {
    let server = Server::start().await;
    let mut config = WatchersConfig::new(format!("http://{}", server.addr), 1_000);
    config.server_pid = Some(std::process::id());
    config.watchers = 4;
    config.expiring = 100;
    config.stall = Duration::from_millis(1_500);
    config.expiring_ttl = Duration::from_millis(300);
    config.fleet_ttl = Duration::from_secs(60);
    config.connections = 2;
    config.beat_sample = 50;
    config.beat_rate = 200.0;
    config.warmup = Duration::from_millis(200);
    config.quiet = Duration::from_millis(500);
    config.settle = Duration::from_millis(300);
    config.watch_timeout = Duration::from_secs(30);
    let report = watchers::run(&config).await.expect("watchers run");
    server.stop().await;

    assert_eq!(report.snapshots.exact, 4, "{report:#?}");
    assert_eq!(report.snapshots.revisions, 1, "{report:#?}");
    let stall = &report.stall;
    assert_eq!(stall.snapshot_ids, 1_000, "{report:#?}");
    assert_eq!(stall.offline_received, 100, "{report:#?}");
    assert_eq!(stall.offline_expired, 100, "{report:#?}");
    assert_eq!(stall.offline_other, 0, "{report:#?}");
    assert_eq!(stall.chain.gaps, 0, "{report:#?}");
    assert_eq!(stall.snapshots, 0, "{report:#?}");
    assert_eq!(
        stall.chain.last,
        stall.snapshot_revision + 100,
        "{report:#?}"
    );
    assert_eq!(report.heartbeats.errors.total(), 0, "{report:#?}");
    assert!(report.heartbeats.quiet.count > 0, "{report:#?}");
    assert!(
        report.rss_a.is_some_and(|r| r.before_bytes > 0),
        "{report:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_throughput_is_positive_in_every_mode() {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(echo::serve(listener, shutdown.clone().cancelled_owned()));
    let endpoint = format!("http://{addr}");
    let pool = throughput::prepare(&endpoint, 2, 100, Duration::from_secs(60))
        .await
        .expect("prepare echo pool");
    for mode in [Mode::Unary, Mode::Stream, Mode::Batch] {
        let load = Load {
            mode,
            concurrency: 8,
            window: 4,
            batch_size: 100,
            duration: Duration::from_secs(1),
            warmup: Duration::from_millis(100),
        };
        let report = throughput::measure(&pool, &load).await;
        assert!(report.heartbeats_per_s > 0.0, "{mode}: {report:#?}");
        assert_eq!(report.errors.total(), 0, "{mode}: {report:#?}");
        assert!(report.latency.count > 0);
    }
    shutdown.cancel();
    server.await.expect("echo task").expect("echo served");
}

/// A stand-in `/metrics` with a fixed RSS: the soak's memory verdict is
/// about the real binary (README "Soak"); here the churn and its expiry
/// checks are what is tested.
async fn fixed_metrics() -> (String, JoinHandle<()>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let url = format!("http://{}/metrics", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await;
            let body = "process_resident_memory_bytes 1.0e8\nregistry_executors 1\n";
            let _ = conn
                .write_all(
                    format!(
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
        }
    });
    (url, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_churn_deregisters_kills_and_replaces_without_false_expiry() {
    let server = Server::start().await;
    let (metrics, metrics_task) = fixed_metrics().await;
    let mut config = SoakConfig::new(format!("http://{}", server.addr), metrics, 300);
    config.connections = 2;
    config.warmup = Duration::from_millis(300);
    config.duration = Duration::from_secs(3);
    config.ttl = Duration::from_millis(500);
    config.churn_rate = 40.0;
    config.kill_rate = 15.0;
    config.sample_every = Duration::from_secs(1);
    config.settle = Duration::from_millis(100);
    let report = soak::run(&config).await.expect("soak run");
    metrics_task.abort();
    server.stop().await;

    let c = &report.churn;
    assert!(c.deregistered > 0 && c.killed > 0, "{report:#?}");
    assert_eq!(c.deregistered_offline, c.deregistered, "{report:#?}");
    assert_eq!(c.killed_offline, c.killed, "{report:#?}");
    assert_eq!(c.false_expirations, 0, "{report:#?}");
    // Every deregistered or killed slot got a new executor.
    assert_eq!(c.registered, 300 + c.deregistered + c.killed, "{report:#?}");
    assert_eq!(report.memory.last.live, 300, "{report:#?}");
    assert!(report.samples.len() >= 4, "{report:#?}");
    assert!(report.passed, "{:?}", report.failures);
}
