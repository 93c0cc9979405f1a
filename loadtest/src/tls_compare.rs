//! TLS ÷ plaintext heartbeat throughput, measured in one run.
//!
//! Starts two registries from the same binary on loopback — one plaintext,
//! one with TLS (mutual TLS by default, the most expensive setting: client
//! certificate verified at the handshake, identity checked on every
//! heartbeat) — with certificates made on the spot (rcgen), prepares the
//! same pool shape against each, and measures them alternately
//! ([`crate::compare::alternate`]). Reported per mode: each median, the ratio
//! TLS ÷ plaintext (1.0 = TLS is free), and the median of the per-round
//! ratios.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use executor_registry::client::ClientTls;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde::Serialize;
use tokio::process::{Child, Command};

use crate::Mode;
use crate::compare::{Plan, Side, alternate};
use crate::stats::{Latency, Tally};
use crate::throughput::{self, Load, ThroughputReport};

/// What to compare.
#[derive(Debug, Clone)]
pub struct TlsCompareConfig {
    /// The `executor-registry` binary.
    pub registry_bin: PathBuf,
    /// Client certificates too (mutual TLS), not only server TLS.
    pub mutual: bool,
    /// How both registries are measured.
    pub plan: Plan,
}

/// One mode, both registries.
#[derive(Debug, Clone, Serialize)]
pub struct TlsModeComparison {
    /// Transport.
    pub mode: Mode,
    /// Plaintext heartbeats/s, per round.
    pub plaintext_per_s: Vec<f64>,
    /// TLS heartbeats/s, per round.
    pub tls_per_s: Vec<f64>,
    /// Median of `plaintext_per_s`.
    pub plaintext_median: f64,
    /// Median of `tls_per_s`.
    pub tls_median: f64,
    /// `tls_median / plaintext_median`.
    pub ratio: f64,
    /// Median of the per-round ratios.
    pub paired_ratio_median: f64,
    /// Latency of the plaintext median round.
    pub plaintext_latency: Latency,
    /// Latency of the TLS median round.
    pub tls_latency: Latency,
    /// Errors over all rounds, plaintext.
    pub plaintext_errors: Tally,
    /// Errors over all rounds, TLS.
    pub tls_errors: Tally,
}

/// Every mode compared.
#[derive(Debug, Clone, Serialize)]
pub struct TlsCompareReport {
    /// Mutual TLS (client certificates) or server TLS only.
    pub mutual: bool,
    /// Connections per registry.
    pub connections: usize,
    /// The load shape.
    pub load: Load,
    /// Rounds per registry and mode.
    pub rounds: usize,
    /// Per mode.
    pub modes: Vec<TlsModeComparison>,
}

/// PEM files of a throw-away PKI: CA, server (localhost, 127.0.0.1), and
/// one client.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("temporary directory for certificates")?;
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca.distinguished_name
            .push(DnType::CommonName, "loadtest CA");
        std::fs::write(dir.path().join("ca.pem"), ca.self_signed(&ca_key)?.pem())?;
        let issuer = Issuer::new(ca, ca_key);
        for (stem, names, usage) in [
            (
                "server",
                vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            (
                "client",
                vec!["loadtest-client".to_owned()],
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
        ] {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(names)?;
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer)?;
            std::fs::write(dir.path().join(format!("{stem}.pem")), cert.pem())?;
            std::fs::write(dir.path().join(format!("{stem}.key")), key.serialize_pem())?;
        }
        Ok(Self { dir })
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// `bin serve` on free loopback ports with `flags`, in-memory store; killed
/// when dropped.
fn spawn_registry(bin: &Path, data: &Path, flags: &[&str]) -> anyhow::Result<(Child, SocketAddr)> {
    let (grpc, metrics) = (free_addr()?, free_addr()?);
    let mut command = Command::new(bin);
    command
        .args(["serve", "--store", "memory"])
        .args(["--listen", &grpc.to_string()])
        .args(["--metrics-listen", &metrics.to_string()])
        .arg("--data-dir")
        .arg(data)
        .args(flags);
    let child = command
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {} serve", bin.display()))?;
    Ok((child, grpc))
}

/// Prepares a pool once the registry answers (within 20 s).
async fn prepare_when_up(
    endpoint: &str,
    config: &TlsCompareConfig,
    tls: Option<&ClientTls>,
) -> anyhow::Result<throughput::Pool> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let plan = &config.plan;
        match throughput::prepare_with(endpoint, plan.connections, plan.executors, plan.ttl, tls)
            .await
        {
            Ok(pool) => return Ok(pool),
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(e.context(format!("the registry at {endpoint} never answered")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Runs the comparison.
pub async fn run(config: &TlsCompareConfig) -> anyhow::Result<TlsCompareReport> {
    if !config.registry_bin.exists() {
        bail!(
            "{} does not exist: build it (cargo build --release) or pass --registry-bin",
            config.registry_bin.display()
        );
    }
    let pki = Pki::new()?;
    let data = tempfile::tempdir()?;
    let (cert, key, ca) = (
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("ca.pem"),
    );
    let (cert, key, ca_text) = (
        cert.to_string_lossy().into_owned(),
        key.to_string_lossy().into_owned(),
        ca.to_string_lossy().into_owned(),
    );
    let (_plain, plain_addr) = spawn_registry(&config.registry_bin, data.path(), &[])?;
    let mut tls_flags = vec!["--tls-cert", &cert, "--tls-key", &key];
    if config.mutual {
        tls_flags.extend(["--tls-client-ca", &ca_text]);
    }
    let (_tls, tls_addr) = spawn_registry(&config.registry_bin, data.path(), &tls_flags)?;
    let client_files = config
        .mutual
        .then(|| (pki.path("client.pem"), pki.path("client.key")));
    let tls = ClientTls::from_files(
        &ca,
        client_files.as_ref().map(|(c, _)| c.as_path()),
        client_files.as_ref().map(|(_, k)| k.as_path()),
    )
    .map_err(anyhow::Error::msg)?;
    let plain = prepare_when_up(&format!("http://{plain_addr}"), config, None)
        .await
        .context("preparing the plaintext registry")?;
    let secure = prepare_when_up(&format!("https://{tls_addr}"), config, Some(&tls))
        .await
        .context("preparing the TLS registry")?;
    let plan = &config.plan;
    let runs = alternate([("plaintext", &plain), ("tls", &secure)], plan).await;
    let modes = runs
        .into_iter()
        .map(|(mode, [plain, tls])| summarise(mode, &plain, &tls))
        .collect();
    Ok(TlsCompareReport {
        mutual: config.mutual,
        connections: plan.connections,
        load: plan.load.clone(),
        rounds: plan.rounds.max(1),
        modes,
    })
}

fn summarise(
    mode: Mode,
    plain: &[ThroughputReport],
    tls: &[ThroughputReport],
) -> TlsModeComparison {
    let (plain, tls) = (Side::of(plain), Side::of(tls));
    let (ratio, paired_ratio_median) = tls.ratios(&plain);
    TlsModeComparison {
        mode,
        ratio,
        paired_ratio_median,
        plaintext_latency: plain.latency,
        tls_latency: tls.latency,
        plaintext_errors: plain.errors,
        tls_errors: tls.errors,
        plaintext_per_s: plain.per_s,
        tls_per_s: tls.per_s,
        plaintext_median: plain.median,
        tls_median: tls.median,
    }
}
