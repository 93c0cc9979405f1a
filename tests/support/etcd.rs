//! A throwaway etcd (Debian `etcd-server`, 3.4) on free loopback ports with
//! a temporary data dir, killed on drop: plaintext, or serving its clients
//! over TLS and requiring a client certificate signed by a test CA.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use executor_registry::etcd::Etcd;
use executor_registry::server::tls::OutboundTls;

use super::pki::{ClientFiles, Pki};
use super::process::free_addr;

/// Files a client of a TLS etcd needs: the CA and a client certificate.
#[derive(Debug, Clone)]
pub struct EtcdClientFiles {
    /// The CA that signed etcd's certificate (and accepted client ones).
    pub ca: PathBuf,
    /// A client certificate etcd accepts.
    pub client: ClientFiles,
}

/// A running etcd.
pub struct EtcdProcess {
    child: Child,
    /// Its client address.
    pub client: SocketAddr,
    tls: Option<EtcdClientFiles>,
    _dir: tempfile::TempDir,
}

impl EtcdProcess {
    /// A plaintext etcd.
    pub fn start() -> Self {
        Self::spawn(None)
    }

    /// An etcd with `https` client URLs, `--client-cert-auth` and a
    /// certificate for `localhost`/`127.0.0.1` from `pki`. Returns the
    /// files a client needs.
    pub fn start_tls(pki: &Pki) -> (Self, EtcdClientFiles) {
        let server = pki.server_for("etcd-server", &["localhost", "127.0.0.1"]);
        let files = EtcdClientFiles {
            ca: pki.ca(),
            client: pki.client("etcd-client"),
        };
        let etcd = Self::spawn(Some((server, files.clone())));
        (etcd, files)
    }

    fn spawn(tls: Option<(ClientFiles, EtcdClientFiles)>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let client = free_addr();
        let peer = free_addr();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut command = Command::new("etcd");
        command
            .arg("--data-dir")
            .arg(dir.path().join("etcd"))
            .args(["--name", "test"])
            .args(["--listen-client-urls", &format!("{scheme}://{client}")])
            .args(["--advertise-client-urls", &format!("{scheme}://{client}")])
            .args(["--listen-peer-urls", &format!("http://{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
            .args(["--initial-cluster", &format!("test=http://{peer}")]);
        if let Some((server, files)) = &tls {
            command
                .arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&files.ca)
                .arg("--cert-file")
                .arg(&server.cert)
                .arg("--key-file")
                .arg(&server.key);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd (Debian package etcd-server)");
        Self {
            child,
            client,
            tls: tls.map(|(_, files)| files),
            _dir: dir,
        }
    }

    /// `etcd://host:port`, for `--store`.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.client)
    }

    /// A client of this etcd, once it answers (within 20 s).
    pub async fn client(&self) -> Etcd {
        let tls = self.tls.as_ref().map(|files| {
            let read = |p: &PathBuf| std::fs::read(p).expect("read a PEM file");
            let (cert, key) = (read(&files.client.cert), read(&files.client.key));
            OutboundTls::new(&read(&files.ca), Some((&cert, &key))).expect("etcd client TLS")
        });
        let etcd = Etcd::connect(&[self.client.to_string()], tls.as_ref()).expect("etcd client");
        let deadline = Instant::now() + Duration::from_secs(20);
        while etcd.range_prefix(b"/").await.is_err() {
            assert!(Instant::now() < deadline, "etcd never came up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        etcd
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
