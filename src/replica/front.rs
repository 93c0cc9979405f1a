//! The `registry.v1.Registry` service every replica serves: the leader's own
//! service when this replica leads, otherwise an HTTP/2-level proxy to the
//! leader, so a client may call any replica.
//!
//! Owns: the current [`Route`] (swapped by the replica's controller), the
//! channels to leaders, the `registry-leader` response metadata, and the
//! loop guard (a forwarded call that reaches a non-leader is refused with
//! UNAVAILABLE instead of being forwarded again). Every method, unary and
//! streaming, is forwarded the same way: the request's HTTP/2 stream is
//! relayed as is over a tonic channel, so the proxy decodes nothing.
//!
//! Security ([`Forwarding`]): with TLS on, the channel to the leader is TLS,
//! the leader's certificate verified against a CA, and under mutual TLS this
//! replica presents its own certificate. Before relaying a call the front
//! removes any [`FORWARDED_IDENTITY`] or [`REPLICA_TOKEN`] header the client
//! sent and names the caller this replica's auth layer authenticated (with
//! the admin token as proof in token mode); the leader's auth layer believes
//! that only from a replica ([`crate::server::auth`]), so authorization is
//! decided on the client's own identity whichever replica it reached.
//!
//! Must not touch: membership; it holds no state but the route.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::{HeaderValue, Request, Response};
use tonic::server::NamedService;
use tonic::transport::{Channel, Endpoint};

use crate::proto::admin::admin_server::AdminServer;
use crate::proto::registry_server::RegistryServer;
use crate::registry::Caller;
use crate::server::auth::{Authenticated, FORWARDED_IDENTITY, REPLICA_TOKEN};
use crate::server::tls::OutboundTls;
use crate::server::{AdminService, AdminToken, FramingChecked, RegistryService};

/// Response metadata naming the leader's advertise address (SPEC §3).
pub const LEADER_HEADER: &str = crate::client::LEADER_METADATA;
/// Request header marking a call a replica forwarded.
pub const FORWARDED_HEADER: &str = "registry-forwarded";

/// Where calls go now.
#[derive(Clone)]
pub enum Route {
    /// No leader known (election in progress): UNAVAILABLE.
    Unknown,
    /// This replica leads: its own services.
    Local {
        /// The leader's service.
        service: FramingChecked<RegistryServer<RegistryService>>,
        /// The leader's operator service.
        admin: FramingChecked<AdminServer<AdminService>>,
        /// This replica's advertise address.
        advertise: String,
    },
    /// Another replica leads: forward to it.
    Remote {
        /// The leader's advertise address.
        leader: String,
        /// A channel to it.
        channel: Channel,
        /// Cancelled when the route changes: calls still waiting on this
        /// leader (a paused or partitioned one answers nothing) end with
        /// UNAVAILABLE at once, so their clients retry at the new leader.
        gone: CancellationToken,
    },
}

/// How a follower reaches the leader and vouches for its callers. The
/// default is plaintext with nobody to vouch for (every caller trusted).
#[derive(Debug, Clone, Default)]
pub struct Forwarding {
    /// TLS to the leader (None: plaintext): the CA its certificate must
    /// chain to, and under mutual TLS this replica's own certificate.
    pub tls: Option<OutboundTls>,
    /// Token mode: the admin token, sent in [`REPLICA_TOKEN`] as proof
    /// that the caller named in [`FORWARDED_IDENTITY`] was authenticated by
    /// a replica.
    pub token: Option<AdminToken>,
}

/// The routed service (cheap to clone; clones share the route).
#[derive(Clone)]
pub struct Front {
    route: Arc<ArcSwap<Route>>,
    forwarding: Arc<Forwarding>,
}

impl Default for Front {
    fn default() -> Self {
        Self::new(Forwarding::default())
    }
}

impl Front {
    /// A front with no leader yet, forwarding as `forwarding` says.
    pub fn new(forwarding: Forwarding) -> Self {
        Self {
            route: Arc::new(ArcSwap::from_pointee(Route::Unknown)),
            forwarding: Arc::new(forwarding),
        }
    }

    /// Sets the route for calls from now on; calls forwarded on the
    /// previous route end (see [`Route::Remote::gone`]).
    pub fn set(&self, route: Route) {
        let old = self.route.swap(Arc::new(route));
        if let Route::Remote { gone, .. } = &*old {
            gone.cancel();
        }
    }

    /// Routes to `leader`, reusing the current channel if it already goes
    /// there.
    pub fn follow(&self, leader: &str) {
        if let Route::Remote {
            leader: current, ..
        } = &**self.route.load()
            && current == leader
        {
            return;
        }
        let scheme = if self.forwarding.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let uri = if leader.contains("://") {
            leader.to_owned()
        } else {
            format!("{scheme}://{leader}")
        };
        let endpoint = Endpoint::from_shared(uri).map_err(|e| e.to_string());
        let endpoint = match (&self.forwarding.tls, endpoint) {
            (Some(tls), Ok(endpoint)) => tls.apply(endpoint).map_err(|e| e.to_string()),
            (None, endpoint) => endpoint,
            (_, Err(e)) => Err(e),
        };
        match endpoint {
            Ok(endpoint) => {
                let channel = endpoint
                    .connect_timeout(std::time::Duration::from_secs(1))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(std::time::Duration::from_secs(5))
                    .keep_alive_timeout(std::time::Duration::from_secs(3))
                    .keep_alive_while_idle(true)
                    .connect_lazy();
                tracing::info!(%leader, "following the leader");
                self.set(Route::Remote {
                    leader: leader.to_owned(),
                    channel,
                    gone: CancellationToken::new(),
                });
            }
            Err(e) => {
                tracing::error!(%leader, error = %e, "the leader key holds no usable address");
                self.set(Route::Unknown);
            }
        }
    }
}

impl NamedService for Front {
    const NAME: &'static str = crate::server::SERVICE_NAME;
}

/// The operator service (`registry.admin.v1.Admin`) on the same route:
/// local when this replica leads, forwarded otherwise.
#[derive(Clone)]
pub struct AdminFront(pub Front);

impl NamedService for AdminFront {
    const NAME: &'static str = crate::server::ADMIN_SERVICE_NAME;
}

impl Service<Request<Body>> for AdminFront {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        self.0.route(request, true)
    }
}

fn with_leader(mut response: Response<Body>, leader: &str) -> Response<Body> {
    if let Ok(value) = HeaderValue::from_str(leader) {
        response.headers_mut().insert(LEADER_HEADER, value);
    }
    response
}

fn unavailable(message: String) -> Response<Body> {
    tonic::Status::unavailable(message).into_http()
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl Service<Request<Body>> for Front {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        self.route(request, false)
    }
}

impl Front {
    /// Replaces whatever the client sent in the identity headers with the
    /// caller this replica authenticated (nothing when every caller is
    /// trusted), and the replica's proof in token mode.
    fn vouch(forwarding: &Forwarding, request: &mut Request<Body>) -> Result<(), tonic::Status> {
        let caller = request
            .extensions()
            .get::<Authenticated>()
            .map(|a| a.caller.clone());
        let headers = request.headers_mut();
        headers.remove(FORWARDED_IDENTITY);
        headers.remove(REPLICA_TOKEN);
        let Some(Caller::Identity { name, .. }) = caller else {
            return Ok(());
        };
        // Certificate identities hold no control characters (`tls::identity`)
        // and `peer:<ip>` none either: this refusal is for a broken invariant.
        let value = HeaderValue::from_bytes(name.as_bytes()).map_err(|_| {
            tonic::Status::unauthenticated(
                "the caller's identity cannot be forwarded to the leader",
            )
        })?;
        headers.insert(FORWARDED_IDENTITY, value);
        if let Some(token) = &forwarding.token {
            headers.insert(REPLICA_TOKEN, token.header_value());
        }
        Ok(())
    }

    /// Routes one call: to the local registry (or, with `admin`, operator)
    /// service when leading, else to the leader.
    fn route(&self, mut request: Request<Body>, admin: bool) -> BoxFuture {
        let route = self.route.load_full();
        let forwarding = self.forwarding.clone();
        Box::pin(async move {
            match &*route {
                Route::Unknown => Ok(unavailable(
                    "no registry leader is elected yet; retry shortly".into(),
                )),
                Route::Local {
                    service,
                    admin: admin_service,
                    advertise,
                } => {
                    let response = if admin {
                        admin_service.clone().call(request).await?
                    } else {
                        service.clone().call(request).await?
                    };
                    Ok(with_leader(response, advertise))
                }
                Route::Remote {
                    leader,
                    channel,
                    gone,
                } => {
                    if request.headers().contains_key(FORWARDED_HEADER) {
                        return Ok(with_leader(
                            unavailable(format!(
                                "this replica is not the leader (it follows {leader}); retry"
                            )),
                            leader,
                        ));
                    }
                    if let Err(refused) = Self::vouch(&forwarding, &mut request) {
                        return Ok(with_leader(refused.into_http(), leader));
                    }
                    request
                        .headers_mut()
                        .insert(FORWARDED_HEADER, HeaderValue::from_static("1"));
                    let mut channel = channel.clone();
                    let forwarded = async {
                        std::future::poll_fn(|cx| channel.poll_ready(cx)).await?;
                        channel.call(request).await
                    };
                    let forwarded = tokio::select! {
                        result = forwarded => result,
                        () = gone.cancelled() => {
                            return Ok(unavailable(format!(
                                "the leader changed from {leader} while this call waited; retry"
                            )));
                        }
                    };
                    match forwarded {
                        Ok(response) => {
                            let response = response.map(|body| {
                                Body::new(Cut {
                                    inner: body,
                                    gone: Box::pin(gone.clone().cancelled_owned()),
                                })
                            });
                            Ok(with_leader(response, leader))
                        }
                        Err(e) => Ok(with_leader(
                            unavailable(format!(
                                "cannot reach the leader {leader}: {}",
                                crate::client::describe_transport_error(&e)
                            )),
                            leader,
                        )),
                    }
                }
            }
        })
    }
}

/// A forwarded response body that ends with UNAVAILABLE when the route it
/// came by is gone (a stream to a leader that stopped answering).
struct Cut {
    inner: Body,
    gone: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl http_body::Body for Cut {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        if self.gone.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(tonic::Status::unavailable(
                "the registry leader changed; reconnect",
            ))));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(caller: Option<Caller>) -> Request<Body> {
        let mut request = Request::builder()
            .uri("/registry.v1.Registry/Heartbeat")
            .header(FORWARDED_IDENTITY, "exec-b")
            .header(REPLICA_TOKEN, "guess")
            .body(Body::empty())
            .unwrap();
        if let Some(caller) = caller {
            request.extensions_mut().insert(Authenticated {
                caller,
                token_mode: false,
            });
        }
        request
    }

    fn header<'a>(request: &'a Request<Body>, name: &str) -> Option<&'a [u8]> {
        request.headers().get(name).map(HeaderValue::as_bytes)
    }

    #[test]
    fn a_follower_names_the_caller_it_authenticated_not_the_one_the_client_claims() {
        let mutual = Forwarding::default();
        let mut relayed = request(Some(Caller::identity("exec-a")));
        Front::vouch(&mutual, &mut relayed).unwrap();
        assert_eq!(header(&relayed, FORWARDED_IDENTITY), Some(&b"exec-a"[..]));
        assert_eq!(header(&relayed, REPLICA_TOKEN), None);

        let token = Forwarding {
            tls: None,
            token: Some(AdminToken::from_file_contents(b"s3cret").unwrap()),
        };
        let mut relayed = request(Some(Caller::admin("peer:10.0.0.7")));
        Front::vouch(&token, &mut relayed).unwrap();
        assert_eq!(
            header(&relayed, FORWARDED_IDENTITY),
            Some(&b"peer:10.0.0.7"[..])
        );
        assert_eq!(header(&relayed, REPLICA_TOKEN), Some(&b"s3cret"[..]));
        assert!(relayed.headers()[REPLICA_TOKEN].is_sensitive());

        // Every caller trusted: nothing to vouch for, and nothing the client
        // sent goes on.
        for caller in [None, Some(Caller::Trusted)] {
            let mut relayed = request(caller);
            Front::vouch(&token, &mut relayed).unwrap();
            assert_eq!(header(&relayed, FORWARDED_IDENTITY), None);
            assert_eq!(header(&relayed, REPLICA_TOKEN), None);
        }
    }
}
