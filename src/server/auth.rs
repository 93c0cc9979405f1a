//! Authentication at the gRPC door: who is calling, and whether admin-only
//! paths may be reached.
//!
//! Owns: the [`Auth`] policy (open, admin token, or mutual TLS with admin
//! identities), the tower layer that runs before every handler — it turns
//! the connection's certificate identity or the `authorization: Bearer`
//! token into a [`Caller`] in the request's extensions, and refuses any
//! method under [`ADMIN_PREFIX`] to non-admins before it reaches a handler —
//! and the constant-time token comparison. Refusals are counted through the
//! registry's observer (`registry_auth_denied_total`).
//!
//! Also the one rule by which a replica's word about a caller is believed.
//! A follower forwards calls to the leader over its own connection and
//! names the caller it authenticated in [`FORWARDED_IDENTITY`]. The leader
//! believes that header only with proof that the sender is a replica: under
//! mutual TLS, the connection's certificate identity is one of the replica
//! identities; in token mode, [`REPLICA_TOKEN`] holds the admin token.
//! Everywhere else the header is ignored, and the layer removes both headers
//! from every request it passes on, so nothing behind it (a handler, or a
//! follower's forwarding) ever sees a client's copy.
//!
//! Must not touch: who owns which executor (that rule is the core's,
//! [`crate::registry::allowed`]), the token's value in any log or message.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use subtle::ConstantTimeEq;
use tonic::Status;
use tonic::transport::server::TcpConnectInfo;

use super::tls::PeerInfo;
use crate::registry::{Caller, MAX_OWNER_LEN, Observer};

/// gRPC path prefix of the admin service: every method under it is
/// admin-only, whatever the service implements.
pub const ADMIN_PREFIX: &str = "/registry.admin.v1.Admin/";

/// The metadata key of the admin token (`authorization: Bearer <token>`).
pub const AUTHORIZATION: &str = "authorization";

/// Request header in which a replica forwarding a call names the caller it
/// authenticated (a certificate identity, or `peer:<ip>` in token mode).
/// Believed only from a replica; see the module's header.
pub const FORWARDED_IDENTITY: &str = "registry-forwarded-identity";

/// Request header in which a replica forwarding a call in token mode
/// presents the admin token as its proof of being a replica.
pub const REPLICA_TOKEN: &str = "registry-replica-token";

/// The admin bearer token. Its value never appears in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(Arc<[u8]>);

impl AdminToken {
    /// A token from the contents of `--admin-token-file`: surrounding
    /// whitespace (a trailing newline) is dropped; what is left must be
    /// printable ASCII without spaces (it travels in an HTTP/2 header).
    pub fn from_file_contents(contents: &[u8]) -> Result<Self, &'static str> {
        let text = contents.trim_ascii();
        if text.is_empty() {
            return Err("is empty");
        }
        if !text.iter().all(u8::is_ascii_graphic) {
            return Err("must hold printable ASCII without spaces");
        }
        Ok(Self(Arc::from(text)))
    }

    /// Whether `presented` is the token, in time independent of where they
    /// differ (only the length may show).
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.0.ct_eq(presented).into()
    }

    /// The token as a header value marked sensitive (HPACK never indexes
    /// it), for [`REPLICA_TOKEN`].
    pub fn header_value(&self) -> http::HeaderValue {
        let mut value = http::HeaderValue::from_bytes(&self.0)
            .expect("a token is printable ASCII (checked when it was read)");
        value.set_sensitive(true);
        value
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// How callers are authenticated.
#[derive(Debug, Clone, Default)]
pub enum Auth {
    /// Nobody is: every caller is trusted (plaintext, or TLS without client
    /// certificates and without a token).
    #[default]
    Open,
    /// Without client certificates: the admin token is needed to deregister
    /// an executor registered from another address, and for admin RPCs.
    Token(AdminToken),
    /// Mutual TLS: every caller has a verified certificate identity; these
    /// identities are admins.
    Mutual {
        /// `--admin-identities`.
        admins: Arc<HashSet<String>>,
        /// Identities of the other replicas (`--replica-identities`, by
        /// default this replica's own certificate's): a call over a
        /// connection with one of them may name its caller in
        /// [`FORWARDED_IDENTITY`]. Empty for a single process.
        replicas: Arc<HashSet<String>>,
    },
}

/// What the layer established about a request; handlers read it from the
/// request's extensions.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// The caller.
    pub caller: Caller,
    /// Only the admin token guards this server (heartbeats are not
    /// checked; a refused deregistration is UNAUTHENTICATED).
    pub token_mode: bool,
}

impl Authenticated {
    /// The caller of a heartbeat: under token mode heartbeats are not
    /// checked.
    pub fn heartbeat_caller(&self) -> Caller {
        if self.token_mode {
            Caller::Trusted
        } else {
            self.caller.clone()
        }
    }
}

/// The request's [`Authenticated`]; a request without one (an open server,
/// where the layer records nothing) is trusted.
pub fn authenticated<T>(request: &tonic::Request<T>) -> Authenticated {
    request
        .extensions()
        .get::<Authenticated>()
        .cloned()
        .unwrap_or(Authenticated {
            caller: Caller::Trusted,
            token_mode: false,
        })
}

/// The layer installing [`Auth`] in front of every service.
#[derive(Clone)]
pub struct AuthLayer {
    auth: Auth,
    observer: Arc<dyn Observer>,
}

impl AuthLayer {
    /// `auth`, counting refusals through `observer`.
    pub fn new(auth: Auth, observer: Arc<dyn Observer>) -> Self {
        Self { auth, observer }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
            observer: self.observer.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Auth,
    observer: Arc<dyn Observer>,
}

/// A refusal: the status and the metric reason.
type Refusal = (Status, &'static str);

fn bearer<B>(request: &http::Request<B>) -> Option<&[u8]> {
    let value = request.headers().get(AUTHORIZATION)?.as_bytes();
    Some(
        value
            .strip_prefix(b"Bearer ")
            .or_else(|| value.strip_prefix(b"bearer "))
            .unwrap_or(b""),
    )
}

fn remote_ip<B>(request: &http::Request<B>) -> Option<IpAddr> {
    let ext = request.extensions();
    ext.get::<PeerInfo>()
        .and_then(|p| p.remote_addr)
        .or_else(|| ext.get::<TcpConnectInfo>().and_then(|t| t.remote_addr()))
        .map(|a: SocketAddr| a.ip())
}

/// The caller a replica named in [`FORWARDED_IDENTITY`]: None without the
/// header, a refusal when it is not a usable identity.
fn forwarded<B>(request: &http::Request<B>) -> Option<Result<Arc<str>, Refusal>> {
    let value = request.headers().get(FORWARDED_IDENTITY)?;
    Some(
        std::str::from_utf8(value.as_bytes())
            .ok()
            .filter(|name| !name.is_empty() && name.len() <= MAX_OWNER_LEN)
            .map(Arc::from)
            .ok_or_else(|| {
                (
                    Status::unauthenticated(format!(
                        "a replica forwarded this call naming no usable caller in {FORWARDED_IDENTITY}"
                    )),
                    "unauthenticated",
                )
            }),
    )
}

/// Decides one request: who calls, and whether it may go on.
fn check<B>(auth: &Auth, request: &http::Request<B>) -> Result<Authenticated, Refusal> {
    let admin_path = request.uri().path().starts_with(ADMIN_PREFIX);
    match auth {
        Auth::Open => Ok(Authenticated {
            caller: Caller::Trusted,
            token_mode: false,
        }),
        Auth::Token(token) => {
            let admin = match bearer(request) {
                None => false,
                Some(presented) if token.matches(presented) => true,
                Some(_) => {
                    return Err((
                        Status::unauthenticated(
                            "the admin token in `authorization: Bearer …` is not valid",
                        ),
                        "unauthenticated",
                    ));
                }
            };
            if admin_path && !admin {
                return Err((
                    Status::unauthenticated(format!(
                        "{} is an admin RPC: send the admin token as `authorization: Bearer <token>`",
                        request.uri().path()
                    )),
                    "unauthenticated",
                ));
            }
            // A replica proves itself with the token: anyone holding it is
            // an admin already, so a forged replica header gains nothing.
            let from_replica = match request.headers().get(REPLICA_TOKEN) {
                None => false,
                Some(presented) if token.matches(presented.as_bytes()) => true,
                Some(_) => {
                    return Err((
                        Status::unauthenticated(format!(
                            "the token in {REPLICA_TOKEN} is not valid"
                        )),
                        "unauthenticated",
                    ));
                }
            };
            let name: Arc<str> = match forwarded(request).filter(|_| from_replica) {
                Some(name) => name?,
                None => match remote_ip(request) {
                    Some(ip) => format!("peer:{ip}").into(),
                    None => "peer:unknown".into(),
                },
            };
            Ok(Authenticated {
                caller: Caller::Identity { name, admin },
                token_mode: true,
            })
        }
        Auth::Mutual { admins, replicas } => {
            let Some(peer) = request
                .extensions()
                .get::<PeerInfo>()
                .and_then(|p| p.identity.clone())
            else {
                return Err((
                    Status::unauthenticated(
                        "the client certificate names no identity (no DNS, URI or e-mail SAN, no CN)",
                    ),
                    "unauthenticated",
                ));
            };
            // Only a replica may speak for another caller; anyone else's
            // header is ignored (and removed by the layer).
            let identity = match forwarded(request).filter(|_| replicas.contains(&*peer)) {
                Some(name) => name?,
                None => peer,
            };
            let admin = admins.contains(&*identity);
            if admin_path && !admin {
                return Err((
                    Status::permission_denied(format!(
                        "{} is an admin RPC and {identity:?} is not in --admin-identities",
                        request.uri().path()
                    )),
                    "not_admin",
                ));
            }
            Ok(Authenticated {
                caller: Caller::Identity {
                    name: identity,
                    admin,
                },
                token_mode: false,
            })
        }
    }
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for AuthService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        if let Auth::Open = self.auth {
            // Nothing to record: a request without `Authenticated` is
            // trusted, and plaintext heartbeats pay no allocation for it.
            return Either::Right(self.inner.call(request));
        }
        let checked = check(&self.auth, &request);
        let headers = request.headers_mut();
        headers.remove(FORWARDED_IDENTITY);
        headers.remove(REPLICA_TOKEN);
        match checked {
            Ok(authenticated) => {
                request.extensions_mut().insert(authenticated);
                Either::Right(self.inner.call(request))
            }
            Err((status, reason)) => {
                self.observer.auth_denied(reason);
                Either::Left(ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    fn request(path: &str, token: Option<&str>, identity: Option<&str>) -> http::Request<()> {
        let mut builder = http::Request::builder().uri(path);
        if let Some(token) = token {
            builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let mut request = builder.body(()).unwrap();
        request.extensions_mut().insert(PeerInfo {
            remote_addr: Some("10.1.2.3:5000".parse().unwrap()),
            identity: identity.map(Arc::from),
        });
        request
    }

    const HEARTBEAT: &str = "/registry.v1.Registry/Heartbeat";
    const RELEASE: &str = "/registry.admin.v1.Admin/ReleaseExpiryGuard";

    fn token_auth() -> Auth {
        Auth::Token(AdminToken::from_file_contents(b"s3cret\n").unwrap())
    }

    fn mutual() -> Auth {
        Auth::Mutual {
            admins: Arc::new(["ops".to_owned()].into()),
            replicas: Arc::new(["replica".to_owned()].into()),
        }
    }

    fn with_header(
        mut request: http::Request<()>,
        name: &'static str,
        value: &str,
    ) -> http::Request<()> {
        request
            .headers_mut()
            .insert(name, http::HeaderValue::from_str(value).unwrap());
        request
    }

    #[test]
    fn tokens_compare_exactly_and_never_print() {
        let token = AdminToken::from_file_contents(b"  s3cret\n").unwrap();
        assert!(token.matches(b"s3cret"));
        for wrong in [&b"s3cres"[..], b"s3cret ", b"", b"S3CRET"] {
            assert!(!token.matches(wrong));
        }
        assert!(!format!("{token:?}").contains("s3cret"));
        assert!(AdminToken::from_file_contents(b" \n").is_err());
        assert!(AdminToken::from_file_contents("tök".as_bytes()).is_err());
        assert!(AdminToken::from_file_contents(b"two words").is_err());
    }

    #[test]
    fn open_trusts_everyone_including_admin_paths() {
        let ok = check(&Auth::Open, &request(RELEASE, None, None)).unwrap();
        assert_eq!(ok.caller, Caller::Trusted);
    }

    #[test]
    fn token_mode_knows_callers_by_address_and_guards_admin_paths() {
        let auth = token_auth();
        let plain = check(&auth, &request(HEARTBEAT, None, None)).unwrap();
        assert_eq!(plain.caller, Caller::identity("peer:10.1.2.3"));
        assert!(plain.token_mode);
        assert_eq!(plain.heartbeat_caller(), Caller::Trusted);

        let (status, reason) = check(&auth, &request(RELEASE, None, None)).unwrap_err();
        assert_eq!(
            (status.code(), reason),
            (tonic::Code::Unauthenticated, "unauthenticated")
        );
        let (status, reason) = check(&auth, &request(HEARTBEAT, Some("nope"), None)).unwrap_err();
        assert_eq!(
            (status.code(), reason),
            (tonic::Code::Unauthenticated, "unauthenticated")
        );
        assert!(!status.message().contains("s3cret"));

        let admin = check(&auth, &request(RELEASE, Some("s3cret"), None)).unwrap();
        assert_eq!(admin.caller, Caller::admin("peer:10.1.2.3"));
    }

    #[test]
    fn plaintext_token_mode_knows_callers_by_their_tcp_address() {
        let mut request = http::Request::builder().uri(HEARTBEAT).body(()).unwrap();
        request.extensions_mut().insert(TcpConnectInfo {
            local_addr: None,
            remote_addr: Some("[::1]:7".parse().unwrap()),
        });
        let plain = check(&token_auth(), &request).unwrap();
        assert_eq!(plain.caller, Caller::identity("peer:::1"));
        request.extensions_mut().clear();
        let unknown = check(&token_auth(), &request).unwrap();
        assert_eq!(unknown.caller, Caller::identity("peer:unknown"));
    }

    #[test]
    fn mutual_tls_names_callers_by_certificate_and_admins_by_list() {
        let auth = mutual();
        let a = check(&auth, &request(HEARTBEAT, None, Some("exec-a"))).unwrap();
        assert_eq!(a.caller, Caller::identity("exec-a"));
        assert_eq!(a.heartbeat_caller(), Caller::identity("exec-a"));

        let (status, reason) = check(&auth, &request(RELEASE, None, Some("exec-a"))).unwrap_err();
        assert_eq!(
            (status.code(), reason),
            (tonic::Code::PermissionDenied, "not_admin")
        );
        // A token is no substitute for an admin certificate.
        assert!(check(&auth, &request(RELEASE, Some("s3cret"), Some("exec-a"))).is_err());

        let ops = check(&auth, &request(RELEASE, None, Some("ops"))).unwrap();
        assert_eq!(ops.caller, Caller::admin("ops"));

        let (status, reason) = check(&auth, &request(HEARTBEAT, None, None)).unwrap_err();
        assert_eq!(
            (status.code(), reason),
            (tonic::Code::Unauthenticated, "unauthenticated")
        );
    }

    #[test]
    fn under_mutual_tls_only_a_replica_may_name_the_caller() {
        let auth = mutual();
        // A client naming someone else is itself.
        let forged = with_header(
            request(HEARTBEAT, None, Some("exec-a")),
            FORWARDED_IDENTITY,
            "exec-b",
        );
        assert_eq!(
            check(&auth, &forged).unwrap().caller,
            Caller::identity("exec-a")
        );
        let forged = with_header(
            request(RELEASE, None, Some("exec-a")),
            FORWARDED_IDENTITY,
            "ops",
        );
        let (status, reason) = check(&auth, &forged).unwrap_err();
        assert_eq!(
            (status.code(), reason),
            (tonic::Code::PermissionDenied, "not_admin")
        );

        // A replica's word is taken, and the caller's admin rights are the
        // leader's to decide.
        let relayed = with_header(
            request(HEARTBEAT, None, Some("replica")),
            FORWARDED_IDENTITY,
            "exec-b",
        );
        assert_eq!(
            check(&auth, &relayed).unwrap().caller,
            Caller::identity("exec-b")
        );
        let relayed = with_header(
            request(RELEASE, None, Some("replica")),
            FORWARDED_IDENTITY,
            "ops",
        );
        assert_eq!(check(&auth, &relayed).unwrap().caller, Caller::admin("ops"));
        let relayed = with_header(
            request(RELEASE, None, Some("replica")),
            FORWARDED_IDENTITY,
            "exec-b",
        );
        let (status, _) = check(&auth, &relayed).unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        // A replica calling for itself is itself.
        let own = request(HEARTBEAT, None, Some("replica"));
        assert_eq!(
            check(&auth, &own).unwrap().caller,
            Caller::identity("replica")
        );
        let empty = with_header(
            request(HEARTBEAT, None, Some("replica")),
            FORWARDED_IDENTITY,
            "",
        );
        let (status, reason) = check(&auth, &empty).unwrap_err();
        assert_eq!(
            (status.code(), reason),
            (tonic::Code::Unauthenticated, "unauthenticated")
        );
        // Without replicas (one process) nobody may.
        let single = Auth::Mutual {
            admins: Arc::new(HashSet::new()),
            replicas: Arc::new(HashSet::new()),
        };
        let relayed = with_header(
            request(HEARTBEAT, None, Some("replica")),
            FORWARDED_IDENTITY,
            "exec-b",
        );
        assert_eq!(
            check(&single, &relayed).unwrap().caller,
            Caller::identity("replica")
        );
    }

    #[test]
    fn in_token_mode_a_replica_names_the_caller_only_with_the_token() {
        let auth = token_auth();
        let forged = with_header(
            request(HEARTBEAT, None, None),
            FORWARDED_IDENTITY,
            "peer:10.9.9.9",
        );
        assert_eq!(
            check(&auth, &forged).unwrap().caller,
            Caller::identity("peer:10.1.2.3")
        );

        let relayed = with_header(forged, REPLICA_TOKEN, "s3cret");
        let ok = check(&auth, &relayed).unwrap();
        assert_eq!(ok.caller, Caller::identity("peer:10.9.9.9"));
        assert!(ok.token_mode);
        // The caller's own token makes it an admin, not the replica's.
        let relayed = with_header(relayed, AUTHORIZATION, "Bearer s3cret");
        assert_eq!(
            check(&auth, &relayed).unwrap().caller,
            Caller::admin("peer:10.9.9.9")
        );

        let wrong = with_header(request(HEARTBEAT, None, None), REPLICA_TOKEN, "guess");
        let wrong = with_header(wrong, FORWARDED_IDENTITY, "peer:10.9.9.9");
        let (status, reason) = check(&auth, &wrong).unwrap_err();
        assert_eq!(
            (status.code(), reason),
            (tonic::Code::Unauthenticated, "unauthenticated")
        );
        assert!(!status.message().contains("s3cret"));
    }

    #[test]
    fn the_layer_passes_no_identity_header_on() {
        use tower::{Layer as _, Service as _};
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let inner = {
            let seen = seen.clone();
            tower::service_fn(move |request: http::Request<()>| {
                let names: Vec<String> = request
                    .headers()
                    .keys()
                    .map(|k| k.as_str().to_owned())
                    .collect();
                seen.lock().unwrap().push(names);
                ready(Ok::<_, Infallible>(http::Response::new(())))
            })
        };
        let observer: Arc<dyn Observer> = Arc::new(crate::registry::NoopObserver);
        for auth in [mutual(), token_auth()] {
            let mut service = AuthLayer::new(auth, observer.clone()).layer(inner.clone());
            for peer in ["replica", "exec-a"] {
                let request = with_header(
                    request(HEARTBEAT, None, Some(peer)),
                    FORWARDED_IDENTITY,
                    "x",
                );
                let request = with_header(request, REPLICA_TOKEN, "s3cret");
                let _ = futures_util::FutureExt::now_or_never(service.call(request));
            }
        }
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 4);
        for names in seen.iter() {
            assert!(
                !names
                    .iter()
                    .any(|n| n == FORWARDED_IDENTITY || n == REPLICA_TOKEN),
                "{names:?}"
            );
        }
    }

    #[test]
    fn the_replica_token_header_is_sensitive() {
        let token = AdminToken::from_file_contents(b"s3cret").unwrap();
        let value = token.header_value();
        assert!(value.is_sensitive());
        assert_eq!(value.as_bytes(), b"s3cret");
    }
}
