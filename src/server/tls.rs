//! TLS on the gRPC listener: certificates, the handshake, and the identity a
//! client certificate carries.
//!
//! Owns: turning PEM files into a rustls server configuration (ring
//! provider, ALPN `h2`, and — with a client CA — a verifier that refuses any
//! client without a valid certificate signed by it), the accept loop that
//! runs each handshake in its own task (a slow or hostile client never holds
//! up the others; a refused handshake is counted as
//! `registry_auth_denied_total{reason="handshake"}`), and the identity of a
//! verified client certificate: its first DNS, URI or e-mail subject
//! alternative name, else its subject common name. Also the client side of
//! the registry's own outgoing TLS connections ([`OutboundTls`]: to etcd,
//! and a follower's to its leader).
//!
//! Must not touch: authorization (see [`super::auth`]), registry state.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::registry::{MAX_OWNER_LEN, Observer};

/// Longest a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The crypto provider every TLS configuration here uses (ring: no C
/// toolchain beyond cc, no aws-lc).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Certificates (a chain, leaf first) from PEM text.
pub fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certs)
}

/// A private key (PKCS#8, PKCS#1 or SEC1) from PEM text.
pub fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("holds no usable PEM private key: {e}"))
}

/// A server configuration for `cert_pem`/`key_pem`, speaking `alpn`. With
/// `client_ca_pem`, every client must present a certificate signed by one
/// of those CAs, or the handshake fails.
pub fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: Option<&[u8]>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, String> {
    let provider = provider();
    let certs = certificates(cert_pem).map_err(|e| format!("server certificate {e}"))?;
    let key = private_key(key_pem).map_err(|e| format!("server key {e}"))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates(pem).map_err(|e| format!("client CA {e}"))? {
                roots
                    .add(ca)
                    .map_err(|e| format!("client CA certificate is unusable: {e}"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("client CA: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("server certificate and key do not match or are unusable: {e}"))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The identity of a (verified) certificate: its first DNS, URI or e-mail
/// subject alternative name, else its subject common name. None when it has
/// none of them, or only one longer than an owner may be or holding a
/// control character (an identity travels in a header between replicas).
pub fn identity(cert: &[u8]) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert).ok()?;
    let from_san = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|name| match name {
                GeneralName::DNSName(s) | GeneralName::URI(s) | GeneralName::RFC822Name(s) => {
                    Some((*s).to_owned())
                }
                _ => None,
            })
        });
    let name = from_san.or_else(|| {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned)
    })?;
    (!name.is_empty() && name.len() <= MAX_OWNER_LEN && !name.chars().any(char::is_control))
        .then_some(name)
}

/// Whether a certificate may serve as a TLS client certificate: it has no
/// extended key usage extension, or one naming `clientAuth` (or any usage).
/// A replica presents its own `--tls-cert` to the leader as one.
pub fn allows_client_auth(cert: &[u8]) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(cert) else {
        return false;
    };
    match cert.extended_key_usage() {
        Ok(None) => true,
        Ok(Some(eku)) => eku.value.any || eku.value.client_auth,
        Err(_) => false,
    }
}

/// The client side of a TLS connection the registry makes: the CA the
/// server's certificate must chain to and, for mutual TLS, this side's
/// certificate and key. `Debug` shows neither PEM.
#[derive(Clone)]
pub struct OutboundTls {
    config: tonic::transport::ClientTlsConfig,
    client_certificate: bool,
}

impl fmt::Debug for OutboundTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundTls")
            .field("client_certificate", &self.client_certificate)
            .finish_non_exhaustive()
    }
}

impl OutboundTls {
    /// Trusts the CA certificates in `ca_pem`; presents `identity`
    /// (certificate chain and key, PEM) when given. The PEM is checked
    /// here, so a bad file is refused at start rather than at the first
    /// connection; the error says which part is wrong.
    pub fn new(ca_pem: &[u8], identity: Option<(&[u8], &[u8])>) -> Result<Self, String> {
        let mut roots = RootCertStore::empty();
        for ca in certificates(ca_pem).map_err(|e| format!("CA {e}"))? {
            roots
                .add(ca)
                .map_err(|e| format!("CA certificate is unusable: {e}"))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
        if let Some((cert_pem, key_pem)) = identity {
            let certs = certificates(cert_pem).map_err(|e| format!("certificate {e}"))?;
            let key = private_key(key_pem).map_err(|e| format!("key {e}"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("certificate and key do not match or are unusable: {e}"))?;
            config = config.identity(Identity::from_pem(cert_pem, key_pem));
        }
        Ok(Self {
            config,
            client_certificate: identity.is_some(),
        })
    }

    /// Whether this side presents a certificate.
    pub fn has_client_certificate(&self) -> bool {
        self.client_certificate
    }

    /// `endpoint` over TLS with these settings (its URI must be `https://`).
    pub fn apply(
        &self,
        endpoint: tonic::transport::Endpoint,
    ) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
        endpoint.tls_config(self.config.clone())
    }
}

/// What the server knows about a TLS connection's peer; tonic puts it in
/// every request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The peer's address.
    pub remote_addr: Option<SocketAddr>,
    /// The identity of its verified client certificate (mutual TLS).
    pub identity: Option<Arc<str>>,
}

/// A TLS connection whose handshake completed.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Connections on `listener` that completed a TLS handshake with `config`.
/// Each handshake runs in a task of its own, bounded by
/// [`HANDSHAKE_TIMEOUT`]; a failed one is logged at debug level and counted
/// through `observer` (reason `handshake`). The accept loop ends when the
/// returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    observer: Arc<dyn Observer>,
) -> ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(128);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            let (acceptor, tx, observer) = (acceptor.clone(), tx.clone(), observer.clone());
            tokio::spawn(async move {
                let refused = |why: String| {
                    observer.auth_denied("handshake");
                    tracing::debug!(%peer, error = %why, "TLS handshake refused");
                };
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let identity = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .and_then(|leaf| identity(leaf))
                            .map(Arc::from);
                        let info = PeerInfo {
                            remote_addr: Some(peer),
                            identity,
                        };
                        let _ = tx
                            .send(Ok(TlsConn {
                                inner: stream,
                                info,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => refused(e.to_string()),
                    Err(_) => refused(format!("no handshake within {HANDSHAKE_TIMEOUT:?}")),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(params: rcgen::CertificateParams) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    /// A self-signed certificate for `localhost` and its key, as PEM.
    fn localhost_pem() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn the_identity_is_the_first_name_san_else_the_common_name() {
        let mut params = rcgen::CertificateParams::new(vec!["exec-7.fleet".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ignored-cn");
        assert_eq!(identity(&cert(params)).as_deref(), Some("exec-7.fleet"));

        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![
            rcgen::SanType::IpAddress("10.0.0.1".parse().unwrap()),
            rcgen::SanType::URI("spiffe://fleet/exec-8".try_into().unwrap()),
        ];
        assert_eq!(
            identity(&cert(params)).as_deref(),
            Some("spiffe://fleet/exec-8")
        );

        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ops");
        assert_eq!(identity(&cert(params)).as_deref(), Some("ops"));
    }

    #[test]
    fn a_certificate_without_a_name_has_no_identity_and_garbage_is_none() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        assert_eq!(identity(&cert(params)), None);
        assert_eq!(identity(b"not a certificate"), None);
    }

    #[test]
    fn bad_pem_is_refused_naming_what_is_wrong() {
        let (cert_pem, key_pem) = localhost_pem();
        assert!(server_config(cert_pem.as_bytes(), key_pem.as_bytes(), None, &[b"h2"]).is_ok());
        assert!(
            server_config(
                cert_pem.as_bytes(),
                key_pem.as_bytes(),
                Some(cert_pem.as_bytes()),
                &[b"h2"]
            )
            .is_ok()
        );
        let e = server_config(b"junk", key_pem.as_bytes(), None, &[]).unwrap_err();
        assert!(e.contains("server certificate"), "{e}");
        let e = server_config(cert_pem.as_bytes(), b"junk", None, &[]).unwrap_err();
        assert!(e.contains("server key"), "{e}");
        let e = server_config(cert_pem.as_bytes(), key_pem.as_bytes(), Some(b""), &[]).unwrap_err();
        assert!(e.contains("client CA"), "{e}");
        let other = rcgen::KeyPair::generate().unwrap();
        let e = server_config(
            cert_pem.as_bytes(),
            other.serialize_pem().as_bytes(),
            None,
            &[],
        )
        .unwrap_err();
        assert!(e.contains("do not match"), "{e}");
    }

    #[test]
    fn a_certificate_allows_client_authentication_by_its_extended_key_usage() {
        use rcgen::ExtendedKeyUsagePurpose::{Any, ClientAuth, ServerAuth};
        let with = |usages: Vec<rcgen::ExtendedKeyUsagePurpose>| {
            let mut params = rcgen::CertificateParams::new(vec!["r".into()]).unwrap();
            params.extended_key_usages = usages;
            cert(params)
        };
        assert!(allows_client_auth(&with(vec![])), "no extension: any usage");
        assert!(allows_client_auth(&with(vec![ServerAuth, ClientAuth])));
        assert!(allows_client_auth(&with(vec![Any])));
        assert!(!allows_client_auth(&with(vec![ServerAuth])));
        assert!(!allows_client_auth(b"garbage"));
    }

    #[test]
    fn an_identity_with_a_control_character_is_none() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "exec\r\nx-forged: 1");
        assert_eq!(identity(&cert(params)), None);
    }

    #[test]
    fn outbound_tls_checks_its_pem_at_once() {
        let (cert_pem, key_pem) = localhost_pem();
        let (c, k) = (cert_pem.as_bytes(), key_pem.as_bytes());
        let plain = OutboundTls::new(c, None).unwrap();
        assert!(!plain.has_client_certificate());
        let mutual = OutboundTls::new(c, Some((c, k))).unwrap();
        assert!(mutual.has_client_certificate());
        assert!(!format!("{mutual:?}").contains("PRIVATE"));
        let e = OutboundTls::new(b"junk", None).unwrap_err();
        assert!(e.starts_with("CA"), "{e}");
        let e = OutboundTls::new(c, Some((b"junk", k))).unwrap_err();
        assert!(e.starts_with("certificate"), "{e}");
        let e = OutboundTls::new(c, Some((c, b"junk"))).unwrap_err();
        assert!(e.starts_with("key"), "{e}");
        let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let e = OutboundTls::new(c, Some((c, other.as_bytes()))).unwrap_err();
        assert!(e.contains("do not match"), "{e}");
        // Applied to an https endpoint.
        let endpoint = tonic::transport::Endpoint::from_static("https://127.0.0.1:1");
        assert!(mutual.apply(endpoint).is_ok());
    }
}
