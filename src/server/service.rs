//! The `registry.v1.Registry` gRPC service.
//!
//! Owns: request validation at the wire level (sizes, enums), conversion,
//! and the per-call stream plumbing. Each handler validates, converts, calls
//! the core on behalf of the caller the auth layer recorded
//! ([`super::auth`]), and maps errors through [`super::error`] — nothing
//! else. The service holds no membership state of its own.

use std::pin::Pin;

use futures_util::{Stream, StreamExt, stream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::auth::authenticated;
use super::convert;
use super::error::{to_heartbeat_status, to_status};
use super::limits::Admission;
use crate::proto;
use crate::proto::registry_server::Registry as RegistryRpc;
use crate::registry::{
    Caller, MAX_BATCH, Registration, Registry, RegistryError, Watch, WatchError,
};

/// A boxed response stream.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The gRPC face of a [`Registry`].
#[derive(Clone)]
pub struct RegistryService {
    registry: Registry,
    /// Cancelled at shutdown: ends watch and heartbeat streams, which would
    /// otherwise hold the server open forever.
    streams_stop: CancellationToken,
    /// Sheds non-heartbeat calls under overload; caps watchers.
    admission: Admission,
}

impl RegistryService {
    /// A service over `registry`; streams end when `streams_stop` is
    /// cancelled; calls are admitted by `admission`.
    pub fn new(registry: Registry, streams_stop: CancellationToken, admission: Admission) -> Self {
        Self {
            registry,
            streams_stop,
            admission,
        }
    }

    /// Counts a refusal of the ownership rule (an executor acting on
    /// another's registration).
    fn count_denial<T>(&self, result: &Result<T, RegistryError>) {
        if let Err(RegistryError::PermissionDenied(_)) = result {
            self.registry.observer().auth_denied("not_owner");
        }
    }

    /// One heartbeat's per-item result; the request's id moves into it.
    fn heartbeat_result(
        &self,
        req: proto::HeartbeatRequest,
        caller: &Caller,
    ) -> proto::HeartbeatResult {
        let result = self
            .registry
            .heartbeat_as(&req.executor_id, convert::ttl(req.ttl_ms), caller);
        self.count_denial(&result);
        let status = to_heartbeat_status(&result) as i32;
        let interval = result.unwrap_or_else(|_| self.registry.suggested_interval());
        proto::HeartbeatResult {
            executor_id: req.executor_id,
            status,
            heartbeat_interval_ms: convert::millis(interval),
        }
    }
}

enum WatchState {
    Start(Watch),
    Events(Watch),
    Done,
}

#[tonic::async_trait]
impl RegistryRpc for RegistryService {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterResponse>, Status> {
        let _permit = self.admission.call()?;
        let owner = authenticated(&request).caller.owner();
        let req = request.into_inner();
        let registration = Registration {
            name: req.name,
            address: req.address,
            labels: req.labels.into_iter().collect(),
            owner: owner.as_deref().map(str::to_owned),
        };
        let entry = self
            .registry
            .register(registration)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::RegisterResponse {
            executor: Some(convert::executor(&self.registry, &entry)),
            heartbeat_interval_ms: convert::millis(self.registry.suggested_interval()),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatResponse>, Status> {
        let caller = authenticated(&request).heartbeat_caller();
        let req = request.into_inner();
        let result =
            self.registry
                .heartbeat_as(&req.executor_id, convert::ttl(req.ttl_ms), &caller);
        self.count_denial(&result);
        let interval = result.map_err(to_status)?;
        Ok(Response::new(proto::HeartbeatResponse {
            heartbeat_interval_ms: convert::millis(interval),
        }))
    }

    type HeartbeatStreamStream = ResponseStream<proto::HeartbeatResult>;

    async fn heartbeat_stream(
        &self,
        request: Request<Streaming<proto::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStreamStream>, Status> {
        let this = self.clone();
        let caller = authenticated(&request).heartbeat_caller();
        let stop = self.streams_stop.clone().cancelled_owned();
        let results = request
            .into_inner()
            .take_until(stop)
            .map(move |item| item.map(|req| this.heartbeat_result(req, &caller)));
        Ok(Response::new(Box::pin(results)))
    }

    async fn heartbeat_batch(
        &self,
        request: Request<proto::HeartbeatBatchRequest>,
    ) -> Result<Response<proto::HeartbeatBatchResponse>, Status> {
        let caller = authenticated(&request).heartbeat_caller();
        let req = request.into_inner();
        if req.heartbeats.len() > MAX_BATCH {
            return Err(to_status(RegistryError::invalid(
                "heartbeats",
                format!(
                    "{} heartbeats in one batch; at most {MAX_BATCH}",
                    req.heartbeats.len()
                ),
            )));
        }
        let results = req
            .heartbeats
            .into_iter()
            .map(|hb| self.heartbeat_result(hb, &caller))
            .collect();
        Ok(Response::new(proto::HeartbeatBatchResponse { results }))
    }

    async fn deregister(
        &self,
        request: Request<proto::DeregisterRequest>,
    ) -> Result<Response<proto::DeregisterResponse>, Status> {
        let _permit = self.admission.call()?;
        let auth = authenticated(&request);
        let req = request.into_inner();
        let result = self
            .registry
            .deregister_as(&req.executor_id, &auth.caller)
            .await;
        match result {
            Err(e @ RegistryError::PermissionDenied(_)) if auth.token_mode => {
                self.registry.observer().auth_denied("unauthenticated");
                return Err(Status::unauthenticated(format!(
                    "{}: deregistering it needs the admin token (`authorization: Bearer <token>`)",
                    to_status(e).message()
                )));
            }
            result => {
                self.count_denial(&result);
                result.map_err(to_status)?;
            }
        }
        Ok(Response::new(proto::DeregisterResponse {}))
    }

    async fn get_executor(
        &self,
        request: Request<proto::GetExecutorRequest>,
    ) -> Result<Response<proto::Executor>, Status> {
        let _permit = self.admission.call()?;
        let req = request.into_inner();
        let entry = self.registry.get(&req.executor_id).map_err(to_status)?;
        Ok(Response::new(convert::executor(&self.registry, &entry)))
    }

    async fn list_executors(
        &self,
        request: Request<proto::ListExecutorsRequest>,
    ) -> Result<Response<proto::ListExecutorsResponse>, Status> {
        let _permit = self.admission.call()?;
        let req = request.into_inner();
        let status = convert::status_filter(req.status).map_err(to_status)?;
        let selectors = convert::selectors(&req.selectors).map_err(to_status)?;
        let (entries, revision) = self.registry.list(status, &selectors);
        let executors = entries
            .iter()
            .map(|e| convert::executor(&self.registry, e))
            .collect();
        Ok(Response::new(proto::ListExecutorsResponse {
            executors,
            revision,
        }))
    }

    async fn count_executors(
        &self,
        request: Request<proto::CountExecutorsRequest>,
    ) -> Result<Response<proto::CountExecutorsResponse>, Status> {
        let _permit = self.admission.call()?;
        let req = request.into_inner();
        let status = convert::status_filter(req.status).map_err(to_status)?;
        Ok(Response::new(proto::CountExecutorsResponse {
            count: self.registry.count(status),
        }))
    }

    type WatchExecutorsStream = ResponseStream<proto::WatchExecutorsResponse>;

    async fn watch_executors(
        &self,
        request: Request<proto::WatchExecutorsRequest>,
    ) -> Result<Response<Self::WatchExecutorsStream>, Status> {
        // Named in the log line when this watcher falls behind: the
        // RegistryWatchersLagging runbook sends operators there to find it.
        let peer = request.remote_addr();
        if self.streams_stop.is_cancelled() {
            return Err(to_status(RegistryError::ShuttingDown));
        }
        // Held for the stream's lifetime: the closure below owns it.
        let permit = self.admission.watcher()?;
        let registry = self.registry.clone();
        let stop = self.streams_stop.clone();
        let watch = self.registry.watch();
        let messages = stream::unfold(WatchState::Start(watch), move |state| {
            let _held = &permit;
            let registry = registry.clone();
            let stop = stop.clone();
            async move {
                match state {
                    WatchState::Start(watch) => {
                        let snapshot = watch.snapshot();
                        let executors = snapshot
                            .iter()
                            .map(|e| convert::executor(&registry, e))
                            .collect();
                        let message = proto::WatchExecutorsResponse {
                            kind: Some(proto::watch_executors_response::Kind::Snapshot(
                                proto::Snapshot {
                                    executors,
                                    revision: snapshot.revision(),
                                },
                            )),
                        };
                        Some((Ok(message), WatchState::Events(watch)))
                    }
                    WatchState::Events(mut watch) => {
                        let next = tokio::select! {
                            next = watch.next() => next,
                            () = stop.cancelled() => {
                                return Some((Err(to_status(RegistryError::ShuttingDown)), WatchState::Done));
                            }
                        };
                        match next {
                            Ok(event) => {
                                let message = proto::WatchExecutorsResponse {
                                    kind: Some(proto::watch_executors_response::Kind::Event(
                                        convert::event(&event),
                                    )),
                                };
                                Some((Ok(message), WatchState::Events(watch)))
                            }
                            Err(e @ WatchError::Lagged { missed }) => {
                                tracing::warn!(
                                    peer = ?peer,
                                    missed,
                                    "watcher fell behind the watch buffer; ended with RESOURCE_EXHAUSTED"
                                );
                                Some((
                                    Err(Status::resource_exhausted(e.to_string())),
                                    WatchState::Done,
                                ))
                            }
                            Err(WatchError::Closed) => Some((
                                Err(to_status(RegistryError::ShuttingDown)),
                                WatchState::Done,
                            )),
                        }
                    }
                    WatchState::Done => None,
                }
            }
        });
        Ok(Response::new(Box::pin(messages)))
    }
}
