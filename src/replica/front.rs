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
use crate::server::{AdminService, FramingChecked, RegistryService};

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

/// The routed service (cheap to clone; clones share the route).
#[derive(Clone)]
pub struct Front {
    route: Arc<ArcSwap<Route>>,
}

impl Default for Front {
    fn default() -> Self {
        Self {
            route: Arc::new(ArcSwap::from_pointee(Route::Unknown)),
        }
    }
}

impl Front {
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
        let uri = if leader.contains("://") {
            leader.to_owned()
        } else {
            format!("http://{leader}")
        };
        match Endpoint::from_shared(uri) {
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
    /// Routes one call: to the local registry (or, with `admin`, operator)
    /// service when leading, else to the leader.
    fn route(&self, mut request: Request<Body>, admin: bool) -> BoxFuture {
        let route = self.route.load_full();
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
