//! The `registry.admin.v1.Admin` gRPC service: operator calls.
//!
//! Owns: conversion of the core's operator answers (the mass-expiry guard's
//! state, its release) to wire types. Like the registry service it calls the
//! core and maps errors, nothing else; it holds no state.
//!
//! Must not touch: access control. Every method lives under
//! `/registry.admin.v1.Admin/`, and authorization restricts that path to
//! admins in front of the services. Calls are not shed under overload: a
//! release is what an operator needs most when the registry is busiest.

use tonic::{Request, Response, Status};

use super::convert;
use super::error::to_status;
use crate::proto::admin;
use crate::proto::admin::admin_server::Admin;
use crate::registry::{ExpiryGuardStatus, Registry};

/// The operator face of a [`Registry`].
#[derive(Clone)]
pub struct AdminService {
    registry: Registry,
}

impl AdminService {
    /// An admin service over `registry`.
    pub fn new(registry: Registry) -> Self {
        Self { registry }
    }

    fn state(&self, guard: ExpiryGuardStatus) -> admin::ExpiryGuardState {
        admin::ExpiryGuardState {
            enabled: guard.enabled,
            active: guard.active,
            held: guard.held,
            fraction: guard.fraction,
            since_unix_ms: guard.since_unix_ms.unwrap_or(0),
            max_hold_ms: convert::millis(guard.max_hold),
            recently_expired: guard.recently_expired,
            live: self.registry.count(None),
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_expiry_guard(
        &self,
        _request: Request<admin::GetExpiryGuardRequest>,
    ) -> Result<Response<admin::GetExpiryGuardResponse>, Status> {
        let state = self.state(self.registry.expiry_guard());
        Ok(Response::new(admin::GetExpiryGuardResponse {
            state: Some(state),
        }))
    }

    async fn release_expiry_guard(
        &self,
        request: Request<admin::ReleaseExpiryGuardRequest>,
    ) -> Result<Response<admin::ReleaseExpiryGuardResponse>, Status> {
        let peer = request.remote_addr();
        let released = self
            .registry
            .release_expiry_guard()
            .await
            .map_err(to_status)?;
        tracing::info!(?peer, released, "expiry guard release asked (Admin RPC)");
        let state = self.state(self.registry.expiry_guard());
        Ok(Response::new(admin::ReleaseExpiryGuardResponse {
            released,
            state: Some(state),
        }))
    }
}
