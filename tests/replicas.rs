//! Three registry replicas (the real binary) on one real etcd: forwarding
//! from any replica, failover after `kill -9` of the leader without a false
//! expiry or a lost registration, prompt expiry of executors that died
//! during the failover, a paused leader that wakes up and writes nothing, and
//! a graceful (SIGTERM) handover that does not wait for the lease.
//!
//! Needs `etcd` (Debian `etcd-server`) on PATH; scripts/test.sh installs it
//! and runs these with `--include-ignored`. Each test starts its own etcd on
//! free loopback ports with a temporary data dir.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "tests on real time wait and measure on the real clock"
)]

mod support;

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use executor_registry::client::{FleetView, Membership, MembershipOptions, MembershipState};
use executor_registry::etcd::Etcd;
use executor_registry::proto::registry_client::RegistryClient;
use executor_registry::proto::{
    HeartbeatBatchRequest, HeartbeatRequest, HeartbeatStatus, ListExecutorsRequest,
};
use support::etcd::EtcdProcess;
use support::process::RegistryProcess;
use tonic::transport::Channel;

const LEASE: Duration = Duration::from_secs(2);
const WATERMARK: Duration = Duration::from_secs(1);
/// TTL the test's heartbeats ask for.
const TTL: Duration = Duration::from_secs(2);
const PREFIX: &str = "/test-registry";

/// The tests run one at a time: each runs an etcd, three replicas and a
/// load, and on a small machine two at once starve each other's leases.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn start_replica(etcd: &EtcdProcess, dir: &Path, log: &Path, extra: &[&str]) -> RegistryProcess {
    let store = etcd.url();
    let mut args = vec![
        "--store",
        &store,
        "--etcd-prefix",
        PREFIX,
        "--leader-lease",
        "2s",
        "--watermark-interval",
        "1s",
    ];
    args.extend_from_slice(extra);
    RegistryProcess::start_logged(dir, &args, log)
}

/// One sample of a replica's `/metrics`, if it answers.
fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// Index of the replica that leads (see [`support::process::wait_for_leader`]),
/// sampled with short timeouts: a replica may be paused.
async fn wait_for_leader(replicas: &[&RegistryProcess]) -> usize {
    support::process::wait_for_leader(replicas, |r| metric(r.metrics, "registry_is_leader ")).await
}

/// Waits until every endpoint answers a call (each follower knows the
/// leader, the leader has loaded membership).
async fn wait_routed(endpoints: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for endpoint in endpoints {
        loop {
            if let Some(mut client) = connect(endpoint).await
                && client
                    .count_executors(executor_registry::proto::CountExecutorsRequest::default())
                    .await
                    .is_ok()
            {
                break;
            }
            assert!(Instant::now() < deadline, "{endpoint} never routed a call");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Heartbeats `ids` in batches every 400 ms through the endpoints, moving to
/// the next endpoint when a call fails. Records every id the registry
/// answered EXPIRED or UNKNOWN_EXECUTOR for (a false expiry).
struct Heartbeater {
    lost: Arc<Mutex<BTreeSet<String>>>,
    answered: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeater {
    fn start(endpoints: Vec<String>, ids: Vec<String>) -> Self {
        let lost = Arc::new(Mutex::new(BTreeSet::new()));
        let answered = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (lost, answered, stop) = (lost.clone(), answered.clone(), stop.clone());
            async move {
                let mut at = 0;
                let mut client: Option<RegistryClient<Channel>> = None;
                while !stop.load(Ordering::Relaxed) {
                    let started = tokio::time::Instant::now();
                    let mut failed = false;
                    for chunk in ids.chunks(5_000) {
                        if client.is_none() {
                            client = connect(&endpoints[at]).await;
                        }
                        let Some(c) = client.as_mut() else {
                            failed = true;
                            break;
                        };
                        let request = HeartbeatBatchRequest {
                            heartbeats: chunk
                                .iter()
                                .map(|id| HeartbeatRequest {
                                    executor_id: id.clone(),
                                    ttl_ms: TTL.as_millis() as u64,
                                })
                                .collect(),
                        };
                        let call = c.heartbeat_batch(request);
                        match tokio::time::timeout(Duration::from_secs(2), call).await {
                            Ok(Ok(response)) => {
                                answered.fetch_add(1, Ordering::Relaxed);
                                for result in response.into_inner().results {
                                    let status = HeartbeatStatus::try_from(result.status);
                                    if matches!(
                                        status,
                                        Ok(HeartbeatStatus::Expired
                                            | HeartbeatStatus::UnknownExecutor)
                                    ) {
                                        lost.lock().unwrap().insert(result.executor_id);
                                    }
                                }
                            }
                            _ => {
                                failed = true;
                                break;
                            }
                        }
                    }
                    if failed {
                        client = None;
                        at = (at + 1) % endpoints.len();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    } else {
                        tokio::time::sleep_until(started + Duration::from_millis(400)).await;
                    }
                }
            }
        });
        Self {
            lost,
            answered,
            stop,
            task,
        }
    }

    async fn stop(self) -> BTreeSet<String> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.lost.lock().unwrap().clone()
    }
}

async fn connect(endpoint: &str) -> Option<RegistryClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .connect()
        .await
        .ok()?;
    Some(RegistryClient::new(channel))
}

/// Registers `n` executors named `name` through the endpoints (in turn,
/// 32 at a time); every id returned was acknowledged.
async fn register_many(endpoints: &[String], name: &str, n: usize) -> Vec<String> {
    let mut clients = Vec::new();
    for endpoint in endpoints {
        clients.push(connect(endpoint).await.expect("connect"));
    }
    let mut tasks = tokio::task::JoinSet::new();
    let per_task = n.div_ceil(32);
    for t in 0..32 {
        let mut client = clients[t % clients.len()].clone();
        let name = name.to_owned();
        let count = per_task.min(n.saturating_sub(t * per_task));
        tasks.spawn(async move {
            let mut ids = Vec::with_capacity(count);
            for i in 0..count {
                let port = 1 + ((t * per_task + i) % 60_000) as u16;
                ids.push(support::register(&mut client, &name, port).await);
            }
            ids
        });
    }
    let mut ids = Vec::with_capacity(n);
    while let Some(batch) = tasks.join_next().await {
        ids.extend(batch.expect("registration task"));
    }
    ids
}

/// Every id, from every page of one listing.
async fn list_ids(endpoint: &str) -> BTreeSet<String> {
    let mut client = connect(endpoint).await.expect("connect");
    let (executors, _) = support::list_all(&mut client, ListExecutorsRequest::default()).await;
    executors.into_iter().map(|e| e.id).collect()
}

/// Keys of executors in etcd, with their mod revisions.
async fn stored(etcd: &Etcd) -> HashMap<String, i64> {
    let prefix = format!("{PREFIX}/executors/");
    etcd.range_prefix(prefix.as_bytes())
        .await
        .expect("read etcd")
        .into_iter()
        .map(|kv| {
            let id = String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned();
            (id, kv.mod_revision)
        })
        .collect()
}

fn url(replica: &RegistryProcess) -> String {
    format!("http://{}", replica.grpc)
}

/// One heartbeat on each of `ids.len()` (> 200, HTTP/2's usual per-connection
/// limit) concurrent `HeartbeatStream`s over one connection to `follower`,
/// which forwards them all over its one connection to the leader.
async fn streams_beyond_http2s_default_limit_are_forwarded(follower: &str, ids: &[String]) {
    assert!(ids.len() > 200);
    let client = connect(follower).await.expect("connect");
    let mut streams = tokio::task::JoinSet::new();
    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<()>(ids.len());
    let release = tokio_util::sync::CancellationToken::new();
    for id in ids {
        let (mut client, id) = (client.clone(), id.clone());
        let (open_tx, release) = (open_tx.clone(), release.clone());
        streams.spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let request = HeartbeatRequest {
                executor_id: id,
                ttl_ms: TTL.as_millis() as u64,
            };
            tx.send(request).await.unwrap();
            let call = client.heartbeat_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
            let mut results = call.await.expect("stream opened").into_inner();
            let first = results.message().await.expect("a result").expect("one");
            // Held open until every stream has its answer.
            open_tx.send(()).await.unwrap();
            release.cancelled().await;
            drop(tx);
            first.status
        });
    }
    for _ in 0..ids.len() {
        tokio::time::timeout(Duration::from_secs(20), open_rx.recv())
            .await
            .expect("every stream is answered while all are open");
    }
    release.cancel();
    while let Some(status) = streams.join_next().await {
        assert_eq!(status.unwrap(), HeartbeatStatus::Ok as i32);
    }
}

/// Three replicas on an etcd of their own, once one leads and every one
/// routes calls.
struct Cluster {
    replicas: Vec<RegistryProcess>,
    _etcd: EtcdProcess,
    kv: Etcd,
    leader: usize,
    followers: Vec<usize>,
    /// The followers' endpoints, then the leader's.
    endpoints: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start(extra: &[&str]) -> Self {
        let etcd = EtcdProcess::start();
        let kv = etcd.client().await;
        let dir = tempfile::tempdir().unwrap();
        let replicas: Vec<RegistryProcess> = (0..3)
            .map(|i| {
                let log = dir.path().join(format!("r{i}.log"));
                start_replica(&etcd, dir.path(), &log, extra)
            })
            .collect();
        let all: Vec<&RegistryProcess> = replicas.iter().collect();
        let leader = wait_for_leader(&all).await;
        let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
        let endpoints: Vec<String> = followers
            .iter()
            .chain(std::iter::once(&leader))
            .map(|&i| url(&replicas[i]))
            .collect();
        wait_routed(&endpoints).await;
        Self {
            replicas,
            _etcd: etcd,
            kv,
            leader,
            followers,
            endpoints,
            _dir: dir,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs etcd: Debian package etcd-server (scripts/test.sh installs it)"]
async fn kill_9_of_the_leader_loses_no_live_executor_and_no_registration() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(&[]).await;
    let (kv, replicas, endpoints) = (&cluster.kv, &cluster.replicas, &cluster.endpoints);
    let all: Vec<&RegistryProcess> = replicas.iter().collect();
    // Clients start at a follower: every call below is forwarded.

    let started = Instant::now();
    let live = register_many(endpoints, "live", 10_000).await;
    let doomed = register_many(endpoints, "doomed", 200).await;
    eprintln!(
        "registered {} executors through followers in {:?}",
        live.len() + doomed.len(),
        started.elapsed()
    );
    let live_beats = Heartbeater::start(endpoints.clone(), live.clone());
    let doomed_beats = Heartbeater::start(endpoints.clone(), doomed.clone());

    // Executors and a scheduler through the client library.
    let mut members = Vec::new();
    for i in 0..5 {
        let options =
            MembershipOptions::new(endpoints.clone(), "lib", format!("127.0.0.1:{}", 7000 + i));
        members.push(
            Membership::join(options)
                .await
                .expect("join through a follower"),
        );
    }
    let fleet = FleetView::connect(endpoints.clone())
        .await
        .expect("fleet view");
    let states: Vec<_> = members.iter().map(Membership::state).collect();

    // Let every executor heartbeat and its TTL be recorded.
    tokio::time::sleep(WATERMARK * 3).await;
    assert!(live_beats.answered.load(Ordering::Relaxed) > 0);
    let before = stored(kv).await;
    assert_eq!(
        before.len(),
        10_000 + 200 + 5,
        "every acknowledged registration is in etcd"
    );
    let fleet_before: BTreeSet<String> = fleet.members().iter().map(|m| m.id.clone()).collect();
    assert_eq!(fleet_before.len(), before.len());

    // The newest revision before the kill, as a watcher sees it.
    let revision_before = {
        let mut client = connect(&endpoints[0]).await.expect("connect");
        let mut stream = client
            .watch_executors(executor_registry::proto::WatchExecutorsRequest::default())
            .await
            .expect("watch")
            .into_inner();
        let first = stream.message().await.expect("watch").expect("snapshot");
        match first.kind {
            Some(executor_registry::proto::watch_executors_response::Kind::Snapshot(s)) => {
                s.revision
            }
            other => panic!("a snapshot first, got {other:?}"),
        }
    };

    // Kill the leader (whichever leads now); the doomed executors die with it.
    let changes: f64 = replicas
        .iter()
        .filter_map(|r| metric(r.metrics, "registry_leader_changes_total "))
        .sum();
    let leader = wait_for_leader(&all).await;
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    eprintln!("leader changes before the kill: {changes}");
    let killed_at = Instant::now();
    replicas[leader].signal("-KILL");
    let last_doomed_beat = Instant::now();
    let lost_doomed_early = doomed_beats.stop().await;
    assert!(lost_doomed_early.is_empty(), "{lost_doomed_early:?}");

    // Elected: the leader key names another replica (polled in etcd).
    let killed = replicas[leader].grpc.to_string();
    let leader_key = format!("{PREFIX}/leader");
    loop {
        let kvs = kv
            .range_prefix(leader_key.as_bytes())
            .await
            .expect("read etcd");
        if kvs
            .iter()
            .any(|kv| kv.key == leader_key.as_bytes() && kv.value != killed.as_bytes())
        {
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(20),
            "no new leader elected"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elected = killed_at.elapsed();
    // Serving: it has loaded membership and runs the membership loop.
    let survivors: Vec<&RegistryProcess> = followers.iter().map(|&i| &replicas[i]).collect();
    let new_leader = wait_for_leader(&survivors).await;
    let serving = killed_at.elapsed();
    eprintln!(
        "after kill -9: a follower elected in {elected:?}, serving in {serving:?} (lease {LEASE:?})"
    );
    assert!(
        elected <= LEASE + Duration::from_secs(1),
        "a follower must lead within the lease + 1 s, took {elected:?}"
    );

    // The doomed ones go OFFLINE within their recorded TTL (their TTL
    // rounded up to the granularity, --watermark-interval) + the grace
    // (2 leases + 2 suggested intervals) after the takeover — before the
    // 20 s init TTL a blanket grace would give them.
    let grace = 2 * LEASE + 2 * Duration::from_millis(500);
    let allowance = WATERMARK + grace;
    let bound = serving + TTL + allowance + Duration::from_secs(1);
    let other_url = url(survivors[1 - new_leader]);
    let mut other = connect(&other_url).await.expect("connect");
    loop {
        let count = other
            .count_executors(executor_registry::proto::CountExecutorsRequest::default())
            .await
            .expect("count through a follower")
            .into_inner()
            .count;
        if count == 10_000 + 5 {
            break;
        }
        assert!(
            last_doomed_beat.elapsed() < bound,
            "executors dead since the failover are still live after {:?} ({count} live)",
            last_doomed_beat.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let doomed_gone = last_doomed_beat.elapsed();
    eprintln!(
        "executors killed at the failover OFFLINE after {doomed_gone:?} (serving {serving:?} + TTL {TTL:?} + granularity and grace {allowance:?})"
    );
    // The new term's revisions are above every revision of the old one.
    let mut client = connect(&other_url).await.expect("connect");
    let after = client
        .list_executors(ListExecutorsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .revision;
    assert!(
        after > revision_before,
        "revision {after} after the failover, {revision_before} before it"
    );

    // Everything that kept heartbeating is still there, under the same id.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lost = live_beats.stop().await;
    assert!(
        lost.is_empty(),
        "{} live executors were expired: {:?}",
        lost.len(),
        lost.iter().take(5).collect::<Vec<_>>()
    );
    let listed = list_ids(&other_url).await;
    for id in &live {
        assert!(
            listed.contains(id),
            "acknowledged registration {id} is gone"
        );
    }
    for (state, member) in states.iter().zip(&members) {
        assert!(
            matches!(*state.borrow(), MembershipState::Joined { .. }),
            "a library executor lost its lease: {:?}",
            *state.borrow()
        );
        assert!(listed.contains(&member.id().unwrap()));
    }
    let after = stored(kv).await;
    assert_eq!(after.len(), 10_000 + 5);
    // The scheduler's view ends with the members it started with, minus the
    // ones that died.
    let doomed_set: BTreeSet<String> = doomed.iter().cloned().collect();
    let expected: BTreeSet<String> = fleet_before.difference(&doomed_set).cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now: BTreeSet<String> = fleet.members().iter().map(|m| m.id.clone()).collect();
        if now == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fleet view has {} members, expected {}",
            now.len(),
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for member in members {
        member
            .shutdown()
            .await
            .expect("deregister through a follower");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs etcd: Debian package etcd-server (scripts/test.sh installs it)"]
async fn a_paused_leader_that_wakes_up_steps_down_and_writes_nothing() {
    let _serial = SERIAL.lock().await;
    // Stall compensation off: woken up, the old leader's loop expires every
    // executor it holds (their TTL ran out while it was stopped). Only the
    // fence keeps those deletes out of etcd.
    let cluster = Cluster::start(&["--stall-threshold", "0s"]).await;
    let (kv, replicas, endpoints) = (&cluster.kv, &cluster.replicas, &cluster.endpoints);
    let (leader, followers) = (cluster.leader, &cluster.followers);
    let ids = register_many(endpoints, "paused", 300).await;
    streams_beyond_http2s_default_limit_are_forwarded(&endpoints[0], &ids).await;
    let beats = Heartbeater::start(endpoints.clone(), ids.clone());
    tokio::time::sleep(WATERMARK * 2).await;

    replicas[leader].signal("-STOP");
    let survivors: Vec<&RegistryProcess> = followers.iter().map(|&i| &replicas[i]).collect();
    wait_for_leader(&survivors).await;
    // Past the lease, and past every TTL the old leader knows of.
    tokio::time::sleep(LEASE + TTL).await;
    let before = stored(kv).await;
    assert_eq!(before.len(), 300);

    replicas[leader].signal("-CONT");
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(replicas[leader].metrics, "registry_is_leader ") != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "the woken leader did not step down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // It led and stepped down as often as it led (on a loaded machine a
    // slow lease renewal may already have cost it one term before the pause).
    let changes = metric(replicas[leader].metrics, "registry_leader_changes_total ")
        .expect("registry_leader_changes_total");
    assert!(
        changes >= 2.0 && changes % 2.0 == 0.0,
        "leader changes {changes}: it must have stepped down from every term it led"
    );
    // No executor key was deleted or rewritten.
    let after = stored(kv).await;
    assert_eq!(after, before, "the woken leader changed etcd");
    let lost = beats.stop().await;
    assert!(
        lost.is_empty(),
        "{} executors were expired: {:?}",
        lost.len(),
        lost.iter().take(5).collect::<Vec<_>>()
    );
    // It still serves: forwards to the new leader.
    let listed = list_ids(&url(&replicas[leader])).await;
    assert_eq!(listed.len(), 300);

    // A leader stopped with SIGTERM hands over at once: it revokes its
    // lease instead of letting it run out.
    let all: Vec<&RegistryProcess> = replicas.iter().collect();
    let current = wait_for_leader(&all).await;
    let stopped_at = Instant::now();
    replicas[current].signal("-TERM");
    let rest: Vec<&RegistryProcess> = (0..3)
        .filter(|&i| i != current)
        .map(|i| &replicas[i])
        .collect();
    let next = wait_for_leader(&rest).await;
    let handover = stopped_at.elapsed();
    eprintln!("handover after SIGTERM of the leader: {handover:?}");
    assert!(
        handover < LEASE,
        "a graceful handover must not wait for the lease ({handover:?})"
    );
    let follower = url(rest[1 - next]);
    wait_routed(std::slice::from_ref(&follower)).await;
    let listed = list_ids(&follower).await;
    assert_eq!(listed.len(), 300, "the handover lost executors");
}
