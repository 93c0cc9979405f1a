//! The `registry.v1.Registry` gRPC service.
//!
//! Owns: request validation at the wire level (sizes, enums), conversion,
//! and the per-call stream plumbing. Each handler validates, converts, calls
//! the core on behalf of the caller the auth layer recorded
//! ([`super::auth`]), and maps errors through [`super::error`] — nothing
//! else. The service holds no membership state of its own.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt, stream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::auth::authenticated;
use super::chunks::Chunks;
use super::convert;
use super::error::{to_heartbeat_status, to_status};
use super::limits::Admission;
use super::paging::{self, Pins, Token};
use super::wire::WatchMessage;
use crate::proto;
use crate::proto::registry_server::Registry as RegistryRpc;
use crate::registry::{
    Caller, MAX_BATCH, Registration, Registry, RegistryError, Watch, WatchError, matches_all,
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
    /// The snapshots paged listings read from.
    pins: Arc<Pins>,
    /// Encodes watchers' snapshot chunks.
    chunks: Arc<Chunks>,
}

impl RegistryService {
    /// A service over `registry`; streams end when `streams_stop` is
    /// cancelled; calls are admitted by `admission`.
    pub fn new(registry: Registry, streams_stop: CancellationToken, admission: Admission) -> Self {
        Self {
            chunks: Arc::new(Chunks::new(registry.clone(), paging::CHUNK_BYTES)),
            registry,
            streams_stop,
            admission,
            pins: Arc::default(),
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

/// Where a watch stream is.
enum WatchState {
    /// Sending the snapshot, in chunks; `after` is the last id sent.
    Snapshot {
        watch: Watch,
        after: Option<String>,
    },
    /// Sending events.
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
            executor: Some(convert::executor(&self.registry, &entry, entry.status())),
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
        Ok(Response::new(convert::executor(
            &self.registry,
            &entry,
            entry.status(),
        )))
    }

    async fn list_executors(
        &self,
        request: Request<proto::ListExecutorsRequest>,
    ) -> Result<Response<proto::ListExecutorsResponse>, Status> {
        let _permit = self.admission.call()?;
        let req = request.into_inner();
        let status = convert::status_filter(req.status).map_err(to_status)?;
        let selectors = convert::selectors(&req.selectors).map_err(to_status)?;
        let filter = paging::filter_key(req.status, &req.selectors);
        let (snapshot, after) = if req.page_token.is_empty() {
            let snapshot = self.registry.snapshot();
            self.pins.pin(&snapshot);
            (snapshot, None)
        } else {
            let token = Token::decode(&req.page_token).map_err(to_status)?;
            if token.filter != filter {
                return Err(to_status(RegistryError::invalid(
                    "page_token",
                    "was issued for another status or other selectors; list again from the first page",
                )));
            }
            let snapshot = self.pins.get(token.revision).ok_or_else(|| {
                Status::aborted(format!(
                    "the snapshot at revision {} that this listing pages through is no longer held; list again from the first page",
                    token.revision
                ))
            })?;
            (snapshot, Some(token.after))
        };
        let members = snapshot.iter_after(after.as_deref()).filter(|&(entry, s)| {
            status.is_none_or(|want| s == want) && matches_all(&selectors, entry.labels())
        });
        let (executors, last, more) = {
            let _turn = self.admission.bulk().await;
            paging::fill(
                members,
                paging::page_size(req.page_size),
                paging::MAX_MESSAGE_BYTES,
                |entry, status| convert::executor(&self.registry, entry, status),
            )
        };
        let next_page_token = match (more, last) {
            (true, Some(after)) => Token {
                revision: snapshot.revision(),
                filter,
                after,
            }
            .encode(),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListExecutorsResponse {
            executors,
            revision: snapshot.revision(),
            next_page_token,
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

    type WatchExecutorsStream = ResponseStream<WatchMessage>;

    async fn watch_executors(
        &self,
        request: Request<proto::WatchExecutorsRequest>,
    ) -> Result<Response<Self::WatchExecutorsStream>, Status> {
        // Named in the log line when this watcher falls behind: the
        // RegistryWatchersLagging runbook sends operators there to find it.
        let peer = request.remote_addr();
        let start = request.into_inner().start_revision;
        if self.streams_stop.is_cancelled() {
            return Err(to_status(RegistryError::ShuttingDown));
        }
        // Held for the stream's lifetime: the closure below owns it.
        let permit = self.admission.watcher()?;
        let this = self.clone();
        let watch = self.registry.watch_from(start);
        let state = if watch.snapshot().is_some() {
            WatchState::Snapshot { watch, after: None }
        } else {
            WatchState::Events(watch)
        };
        let messages = stream::unfold(state, move |state| {
            let _held = &permit;
            let this = this.clone();
            async move { this.watch_step(state, peer).await }
        });
        Ok(Response::new(Box::pin(messages)))
    }
}

impl RegistryService {
    /// One message of a watch stream: the next snapshot chunk, or the next
    /// event, or the error that ends it.
    async fn watch_step(
        &self,
        state: WatchState,
        peer: Option<std::net::SocketAddr>,
    ) -> Option<(Result<WatchMessage, Status>, WatchState)> {
        use proto::watch_executors_response::Kind;
        let message = |kind| WatchMessage::from(proto::WatchExecutorsResponse { kind: Some(kind) });
        match state {
            WatchState::Snapshot { mut watch, after } => {
                let snapshot = watch.snapshot().expect("a snapshot state has one").clone();
                // The next chunk, then its turn at the snapshot rate.
                let sent = async {
                    let chunk = self.chunks.next(&snapshot, after).await?;
                    let paced = self.admission.snapshot_bytes(chunk.message.len()).await;
                    Some((chunk, paced))
                };
                let sent = tokio::select! {
                    sent = sent => sent,
                    () = self.streams_stop.cancelled() => {
                        return Some((Err(to_status(RegistryError::ShuttingDown)), WatchState::Done));
                    }
                };
                let Some((chunk, paced)) = sent else {
                    return Some((
                        Err(Status::internal(
                            "encoding a snapshot chunk failed; watch again",
                        )),
                        WatchState::Done,
                    ));
                };
                let (last, more) = (chunk.last.clone(), chunk.more);
                self.registry
                    .observer()
                    .snapshot_sent(chunk.message.len() as u64, paced);
                let next = if more {
                    WatchState::Snapshot { watch, after: last }
                } else {
                    watch.release_snapshot();
                    WatchState::Events(watch)
                };
                Some((Ok(WatchMessage::Encoded(chunk.message.clone())), next))
            }
            WatchState::Events(mut watch) => {
                let next = tokio::select! {
                    next = watch.next() => next,
                    () = self.streams_stop.cancelled() => {
                        return Some((Err(to_status(RegistryError::ShuttingDown)), WatchState::Done));
                    }
                };
                match next {
                    Ok(event) => Some((
                        Ok(message(Kind::Event(convert::event(&event)))),
                        WatchState::Events(watch),
                    )),
                    Err(e @ WatchError::Lagged { last, oldest }) => {
                        tracing::warn!(
                            peer = ?peer,
                            last,
                            oldest,
                            "watcher fell behind the watch history; ended with RESOURCE_EXHAUSTED"
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
}
