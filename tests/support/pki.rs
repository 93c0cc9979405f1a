//! A throw-away PKI made at test time with rcgen: a CA, a server certificate
//! for `localhost` and `127.0.0.1` (also usable as a client certificate, as
//! replicas use theirs with each other), other server certificates (etcd's),
//! and client certificates — valid, expired, or from another CA — written as
//! PEM files into a temporary directory.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A CA and the files it signed.
pub struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
}

/// A client certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct ClientFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn ca(name: &str) -> (rcgen::Certificate, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("CA certificate");
    (cert, Issuer::new(params, key))
}

impl Pki {
    /// A new CA (`ca.pem`) and server certificate (`server.pem`,
    /// `server.key`; identity `localhost`).
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, issuer) = ca("registry test CA");
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).expect("write ca.pem");
        let pki = Self { dir, issuer };
        pki.server_for("server", &["localhost", "127.0.0.1"]);
        pki
    }

    /// A certificate for the names (DNS or IP) in `sans`, for server and
    /// client authentication both, as `<stem>.pem` and `<stem>.key`.
    pub fn server_for(&self, stem: &str, sans: &[&str]) -> ClientFiles {
        let key = KeyPair::generate().expect("server key");
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("server params");
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).expect("server cert");
        self.write(stem, &cert.pem(), &key.serialize_pem())
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `ca.pem`.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// `server.pem`.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    /// `server.key`.
    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    fn write(&self, stem: &str, cert: &str, key: &str) -> ClientFiles {
        let files = ClientFiles {
            cert: self.dir.path().join(format!("{stem}.pem")),
            key: self.dir.path().join(format!("{stem}.key")),
        };
        std::fs::write(&files.cert, cert).expect("write cert");
        std::fs::write(&files.key, key).expect("write key");
        files
    }

    fn client_params(identity: &str) -> CertificateParams {
        let mut params = CertificateParams::new(vec![identity.into()]).expect("client params");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params
    }

    /// A valid client certificate whose identity (DNS SAN) is `identity`.
    pub fn client(&self, identity: &str) -> ClientFiles {
        let key = KeyPair::generate().expect("client key");
        let cert = Self::client_params(identity)
            .signed_by(&key, &self.issuer)
            .expect("client cert");
        self.write(identity, &cert.pem(), &key.serialize_pem())
    }

    /// A client certificate from this CA that expired in 2001.
    pub fn expired_client(&self, identity: &str) -> ClientFiles {
        let key = KeyPair::generate().expect("client key");
        let mut params = Self::client_params(identity);
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let cert = params.signed_by(&key, &self.issuer).expect("client cert");
        self.write(
            &format!("{identity}-expired"),
            &cert.pem(),
            &key.serialize_pem(),
        )
    }

    /// A client certificate for `identity` signed by another CA.
    pub fn foreign_client(&self, identity: &str) -> ClientFiles {
        let (_, other) = ca("someone else's CA");
        let key = KeyPair::generate().expect("client key");
        let cert = Self::client_params(identity)
            .signed_by(&key, &other)
            .expect("client cert");
        self.write(
            &format!("{identity}-foreign"),
            &cert.pem(),
            &key.serialize_pem(),
        )
    }
}
