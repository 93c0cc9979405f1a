//! The real `executor-registry` binary as a child process, for tests that
//! need signals, restarts or a crash: started on free loopback ports, killed
//! on drop.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use executor_registry::proto::registry_client::RegistryClient;
use tonic::transport::{Channel, Endpoint};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_executor-registry");

/// Runs `executor-registry ctl --endpoint <endpoint> <args…>` to its end.
pub async fn ctl(endpoint: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(BIN)
        .arg("ctl")
        .args(["--endpoint", endpoint])
        .args(args)
        .env_remove("EXECUTOR_REGISTRY_ENDPOINT")
        .output()
        .await
        .expect("run ctl")
}

/// A loopback address with a port that was free a moment ago.
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// A running `executor-registry serve`, killed (SIGKILL) on drop.
pub struct RegistryProcess {
    child: Child,
    /// gRPC address.
    pub grpc: SocketAddr,
    /// Prometheus address.
    pub metrics: SocketAddr,
    /// `--data-dir` (unused with `--store memory`).
    pub data_dir: PathBuf,
}

impl RegistryProcess {
    /// Starts `serve` on new ports with `--data-dir data_dir` and `extra`.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Self {
        Self::start_on(free_addr(), data_dir, extra)
    }

    /// Starts `serve` on `grpc` (e.g. again after a restart).
    pub fn start_on(grpc: SocketAddr, data_dir: &Path, extra: &[&str]) -> Self {
        Self::spawn(grpc, data_dir, extra, Stdio::null(), Stdio::inherit())
    }

    /// Starts `serve` with its output written to `log` — stdout, where
    /// `tracing` logs, and stderr, where errors and panics go — and
    /// `RUST_BACKTRACE=1` so a panic would show in it.
    pub fn start_logged(data_dir: &Path, extra: &[&str], log: &Path) -> Self {
        let file = std::fs::File::create(log).expect("create the log file");
        let stdout = file.try_clone().expect("share the log file");
        Self::spawn(
            free_addr(),
            data_dir,
            extra,
            Stdio::from(stdout),
            Stdio::from(file),
        )
    }

    fn spawn(
        grpc: SocketAddr,
        data_dir: &Path,
        extra: &[&str],
        stdout: Stdio,
        stderr: Stdio,
    ) -> Self {
        let metrics = free_addr();
        let child = Command::new(BIN)
            .args(["serve", "--listen", &grpc.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .env("RUST_BACKTRACE", "1")
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("start the binary");
        Self {
            child,
            grpc,
            metrics,
            data_dir: data_dir.to_owned(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An endpoint for the gRPC address.
    pub fn endpoint(&self) -> Endpoint {
        Channel::from_shared(format!("http://{}", self.grpc)).expect("valid uri")
    }

    /// A channel, once the server accepts (within 20 s).
    pub async fn channel(&self) -> Channel {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.endpoint().connect().await {
                Ok(channel) => return channel,
                Err(e) if Instant::now() > deadline => panic!("registry never came up: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// A client with no decoding limit (snapshots can be large).
    pub async fn client(&self) -> RegistryClient<Channel> {
        RegistryClient::new(self.channel().await)
    }

    /// The value of one sample on `/metrics` (e.g. `registry_revision`),
    /// None if the scrape fails or does not have it.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        use std::io::{Read, Write};
        let mut stream =
            std::net::TcpStream::connect_timeout(&self.metrics, Duration::from_secs(5)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: registry\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        response.lines().find_map(|line| {
            line.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    /// Sends `signal` (e.g. `-STOP`, `-TERM`) with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("kill(1) runs");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Waits up to `limit` for the process to exit; its exit code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(Instant::now() < deadline, "did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RegistryProcess {
    fn drop(&mut self) {
        // A stopped process must be continued to die promptly.
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Index of the replica that leads, once every replica answers and exactly
/// one leads (within 20 s); `is_leader` samples a replica's
/// `registry_is_leader` (None: no answer).
pub async fn wait_for_leader(
    replicas: &[&RegistryProcess],
    is_leader: impl Fn(&RegistryProcess) -> Option<f64>,
) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let samples: Vec<Option<f64>> = replicas.iter().map(|r| is_leader(r)).collect();
        let leaders: Vec<usize> = (0..replicas.len())
            .filter(|&i| samples[i] == Some(1.0))
            .collect();
        if let [one] = leaders.as_slice()
            && samples.iter().all(Option::is_some)
        {
            return *one;
        }
        assert!(Instant::now() < deadline, "no single leader: {samples:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
