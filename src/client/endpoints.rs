//! The list of registry endpoints a client rotates through, and the channel
//! settings every connection gets.
//!
//! Owns: URI parsing (`host:port` is taken as `http://host:port`), the
//! round-robin position, and the tonic `Endpoint` configuration: connect
//! timeout, HTTP/2 keepalive (so a dead peer is noticed on a long-lived
//! heartbeat or watch stream even when nothing is sent) and `TCP_NODELAY` —
//! and TLS: the CA the registry's certificate must chain to, the client's own
//! certificate for mutual TLS, and the admin bearer token. Responses are
//! decoded with gRPC's default 4 MiB limit: the registry sends no larger
//! message (lists come in pages, snapshots in chunks).
//!
//! Replicas: every response names the leader in its `registry-leader`
//! metadata. A stream opened through a follower works (the follower
//! forwards it), but [`Endpoints::follow_leader`] moves the client to the
//! leader itself, adding it to the list if it was not given. A leader that
//! then cannot be reached is not followed again for a while, so a leader
//! address clients cannot reach costs one failed attempt, not a loop.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use tonic::metadata::MetadataMap;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::error::ClientError;
use crate::proto::registry_client::RegistryClient;

/// The registry's default gRPC address (`serve --listen`'s default).
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:10240";

/// Settings of every connection a client opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelOptions {
    /// Longest TCP connect to one endpoint before trying the next.
    pub connect_timeout: Duration,
    /// Longest unary call (register, deregister) and stream opening.
    pub request_timeout: Duration,
    /// HTTP/2 ping period, on idle connections too.
    pub keepalive_interval: Duration,
    /// A ping unanswered for this long closes the connection.
    pub keepalive_timeout: Duration,
    /// HTTP/2 stream window (None: hyper's default, 2 MiB).
    pub initial_stream_window_size: Option<u32>,
    /// HTTP/2 connection window (None: hyper's default, 5 MiB).
    pub initial_connection_window_size: Option<u32>,
    /// Largest response message decoded; None: gRPC's default, 4 MiB, which
    /// is enough for any registry (it sends no message over 4 MiB, whatever
    /// the fleet's size). Raise it only for a proxy that merges messages.
    pub max_decoding_message_size: Option<usize>,
    /// TLS to the registry (None: plaintext). Bare `host:port` endpoints
    /// become `https://host:port`.
    pub tls: Option<ClientTls>,
    /// The admin token, sent as `authorization: Bearer <token>` on every
    /// call (operators only: deregistering others without mutual TLS).
    pub admin_token: Option<BearerToken>,
}

/// TLS settings of a client (PEM contents).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ClientTls {
    /// CA certificate(s) the registry's certificate must chain to.
    pub ca_pem: Vec<u8>,
    /// For mutual TLS: the client's certificate chain and private key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Name to verify in the registry's certificate (default: the
    /// endpoint's host).
    pub domain: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca_pem_bytes", &self.ca_pem.len())
            .field("client_certificate", &self.identity.is_some())
            .field("domain", &self.domain)
            .finish()
    }
}

impl ClientTls {
    /// Reads `ca` and, for mutual TLS, `cert` and `key` (both or neither);
    /// the error names the file.
    pub fn from_files(ca: &Path, cert: Option<&Path>, key: Option<&Path>) -> Result<Self, String> {
        let read = |what: &str, path: &Path| {
            std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
        };
        let identity = match (cert, key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((
                read("the client certificate", cert)?,
                read("the client key", key)?,
            )),
            _ => return Err("a client certificate and its key go together".into()),
        };
        Ok(Self {
            ca_pem: read("the CA certificate", ca)?,
            identity,
            domain: None,
        })
    }

    /// The tonic configuration these settings make.
    pub fn tonic_config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        config
    }
}

/// A bearer token; its value never appears in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl BearerToken {
    /// The token (surrounding whitespace dropped); an error when it is empty
    /// or not printable ASCII.
    pub fn new(token: &str) -> Result<Self, String> {
        let token = token.trim();
        if token.is_empty() {
            return Err("the admin token is empty".into());
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the admin token must be printable ASCII without spaces".into());
        }
        let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            format!("Bearer {token}")
                .parse()
                .map_err(|_| "the admin token is not a valid header value".to_owned())?;
        value.set_sensitive(true);
        Ok(Self(value))
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl ChannelOptions {
    /// `message` as a request, carrying the admin token if one is set.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(BearerToken(value)) = &self.admin_token {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }
}

impl Default for ChannelOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            initial_stream_window_size: None,
            initial_connection_window_size: None,
            max_decoding_message_size: None,
            tls: None,
            admin_token: None,
        }
    }
}

/// `host:port` → `http://host:port`; anything with a scheme is kept.
#[cfg(test)]
pub(crate) fn normalize(endpoint: &str) -> String {
    normalize_for(endpoint, false)
}

/// `host:port` → `http://host:port`, or `https://` when `tls`; anything
/// with a scheme is kept.
pub(crate) fn normalize_for(endpoint: &str, tls: bool) -> String {
    let endpoint = endpoint.trim();
    if endpoint.contains("://") {
        endpoint.to_owned()
    } else if tls {
        format!("https://{endpoint}")
    } else {
        format!("http://{endpoint}")
    }
}

/// A configured tonic endpoint for `uri`.
pub(crate) fn endpoint(uri: &str, options: &ChannelOptions) -> Result<Endpoint, ClientError> {
    let normalized = normalize_for(uri, options.tls.is_some());
    let endpoint =
        Endpoint::from_shared(normalized.clone()).map_err(|e| ClientError::InvalidEndpoint {
            endpoint: uri.to_owned(),
            reason: e.to_string(),
        })?;
    if endpoint.uri().host().is_none() {
        return Err(ClientError::InvalidEndpoint {
            endpoint: uri.to_owned(),
            reason: "no host".into(),
        });
    }
    let endpoint =
        match (&options.tls, endpoint.uri().scheme_str()) {
            (None, _) => endpoint,
            (Some(tls), Some("https")) => endpoint.tls_config(tls.tonic_config()).map_err(|e| {
                ClientError::InvalidEndpoint {
                    endpoint: uri.to_owned(),
                    reason: describe_transport_error(&e),
                }
            })?,
            (Some(_), _) => {
                return Err(ClientError::InvalidEndpoint {
                    endpoint: uri.to_owned(),
                    reason: "TLS settings are given: use https:// (or a bare host:port)".into(),
                });
            }
        };
    Ok(endpoint
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(options.keepalive_interval)
        .keep_alive_timeout(options.keepalive_timeout)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(options.initial_stream_window_size)
        .initial_connection_window_size(options.initial_connection_window_size))
}

/// Response metadata naming the leader replica (SPEC §3).
pub const LEADER_METADATA: &str = "registry-leader";
/// How long a leader that could not be reached is not followed again.
const DISTRUST: Duration = Duration::from_secs(30);

/// Endpoints in the order given; the client starts at the first and moves to
/// the next when one fails.
#[derive(Debug, Clone)]
pub(crate) struct Endpoints {
    list: Vec<(String, Endpoint)>,
    current: usize,
    options: ChannelOptions,
    /// The current endpoint was reached by following a leader hint.
    followed: bool,
    /// A followed leader that failed, and when.
    distrusted: Option<(String, Instant)>,
}

impl Endpoints {
    pub(crate) fn new<I, S>(uris: I, options: &ChannelOptions) -> Result<Self, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let list = uris
            .into_iter()
            .map(|uri| {
                let uri = uri.as_ref();
                endpoint(uri, options).map(|e| (normalize_for(uri, options.tls.is_some()), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if list.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        Ok(Self {
            list,
            current: 0,
            options: options.clone(),
            followed: false,
            distrusted: None,
        })
    }

    /// If `metadata` names a leader other than the current endpoint (and not
    /// one that recently failed), makes it the current endpoint and returns
    /// true: the caller reconnects there.
    pub(crate) fn follow_leader(&mut self, metadata: &MetadataMap) -> bool {
        let Some(leader) = metadata
            .get(LEADER_METADATA)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
        else {
            return false;
        };
        let uri = normalize_for(leader, self.options.tls.is_some());
        if uri == self.current() {
            return false;
        }
        if let Some((bad, since)) = &self.distrusted
            && *bad == uri
            && since.elapsed() < DISTRUST
        {
            return false;
        }
        let index = match self.list.iter().position(|(u, _)| *u == uri) {
            Some(index) => index,
            None => match endpoint(leader, &self.options) {
                Ok(e) => {
                    self.list.push((uri, e));
                    self.list.len() - 1
                }
                Err(_) => return false,
            },
        };
        self.current = index;
        self.followed = true;
        true
    }

    /// The settings every connection gets.
    pub(crate) fn options(&self) -> &ChannelOptions {
        &self.options
    }

    /// The endpoint the next connection goes to.
    pub(crate) fn current(&self) -> &str {
        &self.list[self.current].0
    }

    /// Moves on to the next endpoint (after a failure).
    pub(crate) fn advance(&mut self) {
        if std::mem::take(&mut self.followed) {
            self.distrusted = Some((self.list[self.current].0.clone(), Instant::now()));
        }
        self.current = (self.current + 1) % self.list.len();
    }

    /// Every endpoint, comma-separated (for messages).
    pub(crate) fn describe(&self) -> String {
        self.list
            .iter()
            .map(|(uri, _)| uri.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Connects to the current endpoint (one attempt, bounded by the
    /// connect timeout). The error says which endpoint failed and why.
    pub(crate) async fn connect(&self) -> Result<RegistryClient<Channel>, String> {
        let (uri, endpoint) = &self.list[self.current];
        match endpoint.connect().await {
            Ok(channel) => {
                let client = RegistryClient::new(channel);
                Ok(match self.options.max_decoding_message_size {
                    Some(limit) => client.max_decoding_message_size(limit),
                    None => client,
                })
            }
            Err(e) => Err(format!("{uri}: {}", describe_transport_error(&e))),
        }
    }
}

/// The innermost cause of a transport error, which is where the useful part
/// is ("connection refused" rather than "transport error").
pub fn describe_transport_error(error: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost: &(dyn std::error::Error + 'static) = error;
    while let Some(source) = innermost.source() {
        innermost = source;
    }
    if let Some(io) = innermost.downcast_ref::<std::io::Error>() {
        return match io.kind() {
            std::io::ErrorKind::Other => io.to_string(),
            kind => kind.to_string(),
        };
    }
    let text = innermost.to_string();
    if text.is_empty() {
        error.to_string()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_host_port_gets_a_scheme() {
        assert_eq!(normalize("127.0.0.1:10240"), "http://127.0.0.1:10240");
        assert_eq!(normalize(" http://a:1 "), "http://a:1");
        assert_eq!(normalize("https://a:1"), "https://a:1");
    }

    #[test]
    fn an_empty_list_and_a_bad_uri_are_refused() {
        let options = ChannelOptions::default();
        assert!(matches!(
            Endpoints::new(Vec::<String>::new(), &options),
            Err(ClientError::NoEndpoints)
        ));
        let err = Endpoints::new(["http://exa mple:1"], &options).unwrap_err();
        assert!(
            matches!(&err, ClientError::InvalidEndpoint { endpoint, .. } if endpoint == "http://exa mple:1"),
            "{err}"
        );
    }

    #[test]
    fn tls_settings_make_bare_endpoints_https_and_refuse_http() {
        let options = ChannelOptions {
            tls: Some(ClientTls::default()),
            ..ChannelOptions::default()
        };
        let endpoints = Endpoints::new(["a:1"], &options).unwrap();
        assert_eq!(endpoints.current(), "https://a:1");
        let err = Endpoints::new(["http://a:1"], &options).unwrap_err();
        assert!(err.to_string().contains("https://"), "{err}");
    }

    #[test]
    fn the_admin_token_rides_every_request_and_never_prints() {
        let token = BearerToken::new(" s3cret\n").unwrap();
        assert!(!format!("{token:?}").contains("s3cret"));
        let options = ChannelOptions {
            admin_token: Some(token),
            ..ChannelOptions::default()
        };
        assert!(!format!("{options:?}").contains("s3cret"));
        let request = options.request(());
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
        assert!(
            ChannelOptions::default()
                .request(())
                .metadata()
                .get("authorization")
                .is_none()
        );
        assert!(BearerToken::new("  ").is_err());
        assert!(BearerToken::new("new\nline").is_err());
        assert!(BearerToken::new("tökén").is_err());
    }

    #[test]
    fn endpoints_rotate_in_order() {
        let mut endpoints =
            Endpoints::new(["a:1", "http://b:2"], &ChannelOptions::default()).unwrap();
        assert_eq!(endpoints.current(), "http://a:1");
        endpoints.advance();
        assert_eq!(endpoints.current(), "http://b:2");
        endpoints.advance();
        assert_eq!(endpoints.current(), "http://a:1");
        assert_eq!(endpoints.describe(), "http://a:1,http://b:2");
    }

    fn naming(leader: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert(LEADER_METADATA, leader.parse().unwrap());
        metadata
    }

    #[test]
    fn a_named_leader_is_followed_and_added_and_a_failed_one_is_not_followed_again() {
        let mut endpoints = Endpoints::new(["a:1", "b:2"], &ChannelOptions::default()).unwrap();
        // The current endpoint leads: nothing to do.
        assert!(!endpoints.follow_leader(&naming("a:1")));
        assert!(!endpoints.follow_leader(&MetadataMap::new()));
        assert!(endpoints.follow_leader(&naming("b:2")));
        assert_eq!(endpoints.current(), "http://b:2");
        // A leader not in the list is added.
        assert!(endpoints.follow_leader(&naming("c:3")));
        assert_eq!(endpoints.current(), "http://c:3");
        assert_eq!(endpoints.describe(), "http://a:1,http://b:2,http://c:3");
        // It fails: the client moves on and does not follow it back at once.
        endpoints.advance();
        assert_eq!(endpoints.current(), "http://a:1");
        assert!(!endpoints.follow_leader(&naming("c:3")));
        assert!(endpoints.follow_leader(&naming("b:2")));
    }
}
