//! The mass-expiry guard end to end: the real binary with
//! `--expiry-guard-fraction`, a fleet over real gRPC, the gauge on
//! `/metrics`, and both ways an operator releases it — the
//! `registry.admin.v1.Admin` RPC and `executor-registry ctl guard release`.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "tests on real time wait and measure on the real clock"
)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use executor_registry::proto::admin::admin_client::AdminClient;
use executor_registry::proto::admin::{
    ExpiryGuardState, GetExpiryGuardRequest, ReleaseExpiryGuardRequest,
};
use executor_registry::proto::registry_client::RegistryClient;
use executor_registry::proto::{
    CountExecutorsRequest, EventType, HeartbeatBatchRequest, HeartbeatRequest, HeartbeatStatus,
    OfflineReason,
};
use serde_json::Value;
use support::process::{RegistryProcess, ctl};
use support::{TestServer, eventually, next_event, register, watch};

/// The next ONLINE or OFFLINE event: RUNNING events (every first
/// heartbeat) are passed over; this test is about who leaves and when.
async fn next_change(
    stream: &mut tonic::Streaming<executor_registry::proto::WatchExecutorsResponse>,
) -> executor_registry::proto::ExecutorEvent {
    loop {
        let event = next_event(stream).await;
        if event.r#type != EventType::Running as i32 {
            return event;
        }
    }
}
use tonic::Code;
use tonic::transport::Channel;

/// Executors in the fleet that keep heartbeating.
const STEADY: usize = 40;
/// Executors that die together in each round: 60% of the fleet.
const DYING: usize = 60;
/// `--expiry-guard-fraction`.
const FRACTION: &str = "0.3";
/// At most this many of a round can expire before the guard holds the rest
/// (30% of the fleet of 100): some if their deadlines spread over several
/// passes, none if they coincide. What it then holds stays above 30% of the
/// fleet that is left, so it holds until released.
const MAX_THROUGH: usize = 30;

/// The guard's state, from the Admin RPC.
async fn guard_state(admin: &mut AdminClient<Channel>) -> ExpiryGuardState {
    admin
        .get_expiry_guard(GetExpiryGuardRequest {})
        .await
        .expect("GetExpiryGuard")
        .into_inner()
        .state
        .expect("state")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("utf-8")
}

/// One heartbeat batch for `ids` with `ttl_ms`, every item OK.
async fn beat(client: &mut RegistryClient<Channel>, ids: &[String], ttl_ms: u64) {
    let heartbeats = ids
        .iter()
        .map(|id| HeartbeatRequest {
            executor_id: id.clone(),
            ttl_ms,
        })
        .collect();
    let results = client
        .heartbeat_batch(HeartbeatBatchRequest { heartbeats })
        .await
        .expect("heartbeat batch")
        .into_inner()
        .results;
    for result in results {
        assert_eq!(result.status, HeartbeatStatus::Ok as i32, "{result:?}");
    }
}

async fn live(client: &mut RegistryClient<Channel>) -> u64 {
    client
        .count_executors(CountExecutorsRequest { status: 0 })
        .await
        .expect("count")
        .into_inner()
        .count
}

#[derive(Debug, Clone, Copy)]
enum Release {
    AdminRpc,
    Ctl,
}

#[tokio::test]
async fn a_mass_expiry_is_held_shown_on_metrics_and_released_by_the_admin_rpc_and_by_ctl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = RegistryProcess::start(
        dir.path(),
        &[
            "--store",
            "memory",
            "--expiry-guard-fraction",
            FRACTION,
            "--min-heartbeat-ttl",
            "100ms",
        ],
    );
    let channel = registry.channel().await;
    let endpoint = format!("http://{}", registry.grpc);
    let mut client = RegistryClient::new(channel.clone());
    let mut admin = AdminClient::new(channel);
    assert_eq!(registry.metric("registry_expiry_guard_active"), Some(0.0));

    let mut steady = Vec::new();
    for i in 0..STEADY {
        steady.push(register(&mut client, "steady", 7000 + i as u16).await);
    }
    let beating = tokio::spawn({
        let (mut client, steady) = (client.clone(), steady.clone());
        async move {
            loop {
                beat(&mut client, &steady, 3_000).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    });
    let (_, mut events) = watch(&mut client).await;

    for round in [Release::AdminRpc, Release::Ctl] {
        let mut dying = Vec::new();
        for i in 0..DYING {
            dying.push(register(&mut client, "dying", 8000 + i as u16).await);
        }
        for _ in 0..DYING {
            let event = next_change(&mut events).await;
            assert_eq!(event.r#type, EventType::Online as i32);
        }
        // One batch: their deadlines (1.5 s from now) coincide, or nearly.
        beat(&mut client, &dying, 1_500).await;

        eventually(Duration::from_secs(15), "the guard holds the rest", || {
            let (mut admin, mut client) = (admin.clone(), client.clone());
            async move {
                let state = guard_state(&mut admin).await;
                // Every dying one has expired or is held (held ones are live).
                state.active && live(&mut client).await == (STEADY as u64 + state.held)
            }
        })
        .await;
        assert_eq!(registry.metric("registry_expiry_guard_active"), Some(1.0));
        let state = guard_state(&mut admin).await;
        assert!(state.enabled && state.active, "{state:?}");
        assert_eq!(state.fraction, 0.3);
        assert_eq!(state.max_hold_ms, 600_000);
        assert!(state.since_unix_ms > 0);
        let held = state.held as usize;
        assert!(
            held >= DYING - MAX_THROUGH,
            "held {held}: more than the fraction went"
        );
        // What went before the guard tripped is OFFLINE already.
        let mut offline = HashSet::new();
        for _ in 0..DYING - held {
            let event = next_change(&mut events).await;
            assert_eq!(event.r#type, EventType::Offline as i32);
            offline.insert(event.executor_id);
        }

        let released = match round {
            Release::AdminRpc => {
                let answer = admin
                    .release_expiry_guard(ReleaseExpiryGuardRequest {})
                    .await
                    .expect("ReleaseExpiryGuard")
                    .into_inner();
                assert!(!answer.state.expect("state").active);
                answer.released as usize
            }
            Release::Ctl => {
                let status = ctl(&endpoint, &["guard", "--json"]).await;
                assert_eq!(status.status.code(), Some(0), "{}", text(&status.stderr));
                let status: Value = serde_json::from_slice(&status.stdout).expect("JSON");
                assert_eq!(status["active"], true, "{status}");
                assert_eq!(status["held"], held as u64, "{status}");
                let human = ctl(&endpoint, &["guard"]).await;
                let human = text(&human.stdout);
                assert!(human.contains("ACTIVE"), "{human}");
                let held_line = human
                    .lines()
                    .find(|line| line.starts_with("held "))
                    .unwrap_or_else(|| panic!("no held line in {human}"));
                assert!(held_line.ends_with(&format!(" {held}")), "{human}");

                let out = ctl(&endpoint, &["guard", "release"]).await;
                assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
                let stdout = text(&out.stdout);
                let released = stdout
                    .strip_prefix("released ")
                    .and_then(|rest| rest.split(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("ctl guard release said {stdout:?}"));
                // Holding nothing now: a second release expires nothing.
                let again = ctl(&endpoint, &["guard", "release", "--json"]).await;
                assert_eq!(again.status.code(), Some(0));
                let again: Value = serde_json::from_slice(&again.stdout).expect("JSON");
                assert_eq!(again["released"], 0, "{again}");
                released
            }
        };
        assert_eq!(released, held, "{round:?} expired every held executor");

        // The released ones go OFFLINE in one pass: consecutive revisions.
        let mut previous = None;
        for _ in 0..held {
            let event = next_change(&mut events).await;
            assert_eq!(event.r#type, EventType::Offline as i32);
            assert_eq!(event.reason, OfflineReason::Expired as i32);
            if let Some(previous) = previous {
                assert_eq!(event.revision, previous + 1, "one pass");
            }
            previous = Some(event.revision);
            offline.insert(event.executor_id);
        }
        assert_eq!(offline, dying.iter().cloned().collect(), "{round:?}");
        assert_eq!(live(&mut client).await, STEADY as u64);
        assert_eq!(registry.metric("registry_expiry_guard_active"), Some(0.0));
        let late = client
            .heartbeat(HeartbeatRequest {
                executor_id: dying[0].clone(),
                ttl_ms: 1_500,
            })
            .await
            .expect_err("a released executor is a tombstone");
        assert_eq!(late.code(), Code::FailedPrecondition);
    }
    // Every one of them counts as an expiration.
    assert_eq!(
        registry.metric("registry_expirations_total"),
        Some(2.0 * DYING as f64)
    );
    beating.abort();
}

#[tokio::test]
async fn without_the_flag_the_guard_is_off_and_a_release_is_refused() {
    let server = TestServer::start(support::fast_config()).await;
    let mut admin = AdminClient::new(server.channel().await);
    let state = guard_state(&mut admin).await;
    assert!(
        !state.enabled && !state.active && state.held == 0,
        "{state:?}"
    );
    let refused = admin
        .release_expiry_guard(ReleaseExpiryGuardRequest {})
        .await
        .expect_err("nothing to release");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("--expiry-guard-fraction"),
        "{refused:?}"
    );

    let endpoint = server.endpoint();
    let out = ctl(&endpoint, &["guard"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text(&out.stdout).starts_with("state  off"),
        "{}",
        text(&out.stdout)
    );
    let out = ctl(&endpoint, &["guard", "--json"]).await;
    let state: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(state["enabled"], false);
    let out = ctl(&endpoint, &["guard", "release"]).await;
    assert_eq!(out.status.code(), Some(1), "any other error");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("--expiry-guard-fraction"), "{stderr}");
    server.stop().await;
}
