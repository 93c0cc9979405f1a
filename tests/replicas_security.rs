//! Security with replicas, end to end: three registry replicas (the real
//! binary) on a real etcd, with mutual TLS or the admin token, decide every
//! call on the client's own identity whichever replica it reaches, and no
//! client gains anything by sending identity metadata of its own; replicas
//! on an etcd that requires client certificates work with `--etcd-ca`,
//! `--etcd-cert` and `--etcd-key`, and exit at start, naming them, without.
//!
//! Needs `etcd` (Debian `etcd-server`) on PATH; scripts/test.sh installs it
//! and runs these with `--include-ignored`.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "tests on real time wait and measure on the real clock"
)]

mod support;

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use executor_registry::client::ClientTls;
use executor_registry::proto::registry_client::RegistryClient;
use executor_registry::proto::{
    CountExecutorsRequest, DeregisterRequest, GetExecutorRequest, HeartbeatBatchRequest,
    HeartbeatRequest, HeartbeatStatus,
};
use support::answering_client as client;
use support::etcd::EtcdProcess;
use support::pki::{ClientFiles, Pki};
use support::process::RegistryProcess;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

const PREFIX: &str = "/test-registry";

/// One etcd and three replicas at a time: on a small machine two clusters
/// at once starve each other's leases.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn path(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_owned()
}

fn start_replica(etcd: &EtcdProcess, dir: &Path, name: &str, extra: &[&str]) -> RegistryProcess {
    let store = etcd.url();
    let mut args = vec![
        "--store",
        &store,
        "--etcd-prefix",
        PREFIX,
        "--leader-lease",
        "2s",
    ];
    args.extend_from_slice(extra);
    RegistryProcess::start_logged(dir, &args, &dir.join(format!("{name}.log")))
}

/// Index of the replica that leads (see [`support::process::wait_for_leader`]).
async fn wait_for_leader(replicas: &[&RegistryProcess]) -> usize {
    support::process::wait_for_leader(replicas, |r| r.metric("registry_is_leader")).await
}

/// An endpoint of `replica`: TLS with `tls` (from `from`, a local address,
/// when given), plaintext without.
fn endpoint(replica: &RegistryProcess, tls: Option<&ClientTls>, from: Option<IpAddr>) -> Endpoint {
    support::endpoint_at(replica.grpc, tls, from)
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
}

/// Whether a client through `endpoint` gets no answer at all (no
/// connection, or its call fails in the transport).
async fn gets_no_answer(endpoint: Endpoint) -> Result<(), String> {
    let Ok(channel) = endpoint.connect().await else {
        return Ok(());
    };
    match RegistryClient::new(channel)
        .count_executors(CountExecutorsRequest::default())
        .await
    {
        Ok(count) => Err(format!("answered {count:?}")),
        Err(status)
            if matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
            ) && status.metadata().get("registry-leader").is_none() =>
        {
            Ok(())
        }
        Err(status) => Err(format!("answered {status:?}")),
    }
}

fn tls(pki: &Pki, client: Option<&ClientFiles>) -> ClientTls {
    ClientTls::from_files(
        &pki.ca(),
        client.map(|c| c.cert.as_path()),
        client.map(|c| c.key.as_path()),
    )
    .expect("read the PEM files")
}

/// A request carrying `metadata` (a client's attempt to claim an identity).
fn with<T>(message: T, metadata: &[(&'static str, &str)]) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    for (key, value) in metadata {
        request
            .metadata_mut()
            .insert(*key, value.parse().expect("ascii metadata"));
    }
    request
}

fn beat(id: &str) -> HeartbeatRequest {
    HeartbeatRequest {
        executor_id: id.to_owned(),
        ttl_ms: 0,
    }
}

fn deregistration(id: &str) -> DeregisterRequest {
    DeregisterRequest {
        executor_id: id.to_owned(),
    }
}

/// Every way `client` may act on `id`'s lease, with the statuses it got:
/// unary heartbeat, the item of a stream and of a batch (each beside an
/// executor of its own, `own`, which must pass), and deregistration.
async fn act_on(
    client: &mut RegistryClient<Channel>,
    id: &str,
    own: &str,
    metadata: &[(&'static str, &str)],
) -> (Code, HeartbeatStatus, HeartbeatStatus, Code) {
    fn code<T>(r: Result<T, tonic::Status>) -> Code {
        r.map_or_else(|s| s.code(), |_| Code::Ok)
    }
    let unary = code(client.heartbeat(with(beat(id), metadata)).await);

    let stream = tokio_stream::iter([beat(id), beat(own)]);
    let mut results = client
        .heartbeat_stream(with(stream, metadata))
        .await
        .expect("a stream opens")
        .into_inner();
    let mut streamed = Vec::new();
    while let Some(result) = results.message().await.expect("a stream item") {
        streamed.push(result.status());
    }
    assert_eq!(streamed.len(), 2, "one result per item");
    assert_eq!(streamed[1], HeartbeatStatus::Ok, "its own executor");

    let batch = client
        .heartbeat_batch(with(
            HeartbeatBatchRequest {
                heartbeats: vec![beat(id), beat(own)],
            },
            metadata,
        ))
        .await
        .expect("a batch is answered")
        .into_inner();
    let batched: Vec<HeartbeatStatus> = batch.results.iter().map(|r| r.status()).collect();
    assert_eq!(batched[1], HeartbeatStatus::Ok, "its own executor");

    let deregistered = code(client.deregister(with(deregistration(id), metadata)).await);
    (unary, streamed[0], batched[0], deregistered)
}

/// `registry_auth_denied_total{reason}` summed over the replicas.
fn denied(replicas: &[RegistryProcess], reason: &str) -> f64 {
    let series = format!("registry_auth_denied_total{{reason=\"{reason}\"}}");
    replicas.iter().filter_map(|r| r.metric(&series)).sum()
}

/// Three replicas with `extra` flags, once exactly one leads.
struct Cluster {
    replicas: Vec<RegistryProcess>,
    leader: usize,
    followers: [usize; 2],
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn start(etcd: &EtcdProcess, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let replicas: Vec<RegistryProcess> = (0..3)
            .map(|i| start_replica(etcd, dir.path(), &format!("r{i}"), extra))
            .collect();
        let all: Vec<&RegistryProcess> = replicas.iter().collect();
        let leader = wait_for_leader(&all).await;
        let followers = match leader {
            0 => [1, 2],
            1 => [0, 2],
            _ => [0, 1],
        };
        Self {
            replicas,
            leader,
            followers,
            dir,
        }
    }

    fn logs(&self) -> String {
        (0..3)
            .map(|i| {
                let log = self.dir.path().join(format!("r{i}.log"));
                format!(
                    "--- r{i}\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs etcd: Debian package etcd-server (scripts/test.sh installs it)"]
async fn with_mutual_tls_every_replica_decides_on_the_callers_own_certificate() {
    let _serial = SERIAL.lock().await;
    let etcd = EtcdProcess::start();
    etcd.client().await;
    let pki = Pki::new();
    let (a, b, ops) = (
        pki.client("exec-a"),
        pki.client("exec-b"),
        pki.client("ops"),
    );
    // Every replica with the same certificate and SPEC §3's flags alone.
    let (cert, key, ca) = (
        path(&pki.server_cert()),
        path(&pki.server_key()),
        path(&pki.ca()),
    );
    let cluster = Cluster::start(
        &etcd,
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
            "--admin-identities",
            "ops",
        ],
    )
    .await;
    let replicas = &cluster.replicas;
    let leader = &replicas[cluster.leader];
    let [f1, f2] = cluster.followers.map(|i| &replicas[i]);
    let (tls_a, tls_b, tls_ops) = (
        tls(&pki, Some(&a)),
        tls(&pki, Some(&b)),
        tls(&pki, Some(&ops)),
    );

    // A registers through a follower; its registration is owned by A.
    let mut a_at_f1 = client(endpoint(f1, Some(&tls_a), None)).await;
    let mut a_at_leader = client(endpoint(leader, Some(&tls_a), None)).await;
    let id_a = support::register(&mut a_at_f1, "a", 9000).await;
    let mut b_at_leader = client(endpoint(leader, Some(&tls_b), None)).await;
    let mut b_at_f2 = client(endpoint(f2, Some(&tls_b), None)).await;
    let id_b = support::register(&mut b_at_f2, "b", 9001).await;
    // Each heartbeats its own through any replica.
    for c in [&mut a_at_f1, &mut a_at_leader] {
        c.heartbeat(beat(&id_a)).await.expect("A's own heartbeat");
    }
    b_at_leader
        .heartbeat(beat(&id_b))
        .await
        .expect("B's own heartbeat");

    // B cannot touch A's executor, through the leader or a follower, in any
    // form; nor by claiming to be A, an admin or a replica in metadata.
    let refused = (
        Code::PermissionDenied,
        HeartbeatStatus::Invalid,
        HeartbeatStatus::Invalid,
        Code::PermissionDenied,
    );
    let claims: [&[(&'static str, &str)]; 4] = [
        &[],
        &[("registry-forwarded-identity", "exec-a")],
        &[
            ("registry-forwarded-identity", "ops"),
            ("registry-replica-token", "anything"),
        ],
        &[
            ("registry-forwarded-identity", "exec-a"),
            ("registry-forwarded", "1"),
        ],
    ];
    let mut attempts = 0.0;
    for (at, b_client) in [("leader", &mut b_at_leader), ("a follower", &mut b_at_f2)] {
        for claim in claims {
            // A client marking its call as forwarded is refused by a
            // follower (the loop guard), and gains nothing at the leader.
            if at == "a follower" && claim.iter().any(|(k, _)| *k == "registry-forwarded") {
                let status = b_client
                    .heartbeat(with(beat(&id_a), claim))
                    .await
                    .unwrap_err();
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                continue;
            }
            let got = act_on(b_client, &id_a, &id_b, claim).await;
            assert_eq!(
                got, refused,
                "B acting on A's executor through {at} with {claim:?}"
            );
            attempts += 4.0;
        }
    }
    // A still owns it and keeps it alive, through either kind of replica.
    a_at_f1.heartbeat(beat(&id_a)).await.expect("A's own");
    a_at_leader.heartbeat(beat(&id_a)).await.expect("A's own");
    let not_owner = denied(replicas, "not_owner");
    assert_eq!(
        not_owner,
        attempts,
        "every refusal counted once, by the leader\n{}",
        cluster.logs()
    );

    // An admin identity deregisters A's executor through a follower.
    let mut ops_at_f2 = client(endpoint(f2, Some(&tls_ops), None)).await;
    ops_at_f2
        .deregister(deregistration(&id_a))
        .await
        .expect("an admin deregisters anyone's executor");
    let status = a_at_f1
        .get_executor(GetExecutorRequest {
            executor_id: id_a.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // No certificate, or plaintext: no connection to any replica.
    let no_cert = tls(&pki, None);
    for replica in replicas {
        for (what, tls) in [("plaintext", None), ("no certificate", Some(&no_cert))] {
            if let Err(answer) = gets_no_answer(endpoint(replica, tls, None)).await {
                panic!(
                    "a {what} client of {} got an answer: {answer}",
                    replica.grpc
                );
            }
        }
    }

    // Ownership is in etcd: after a handover, B is still refused and A's
    // second executor still its own.
    let id_a2 = support::register(&mut a_at_f1, "a2", 9002).await;
    leader.signal("-TERM");
    let rest: Vec<&RegistryProcess> = vec![f1, f2];
    wait_for_leader(&rest).await;
    let mut a_at_f1 = client(endpoint(f1, Some(&tls_a), None)).await;
    let mut b_at_f2 = client(endpoint(f2, Some(&tls_b), None)).await;
    let status = b_at_f2.heartbeat(beat(&id_a2)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    a_at_f1
        .heartbeat(beat(&id_a2))
        .await
        .expect("A's own, after the handover");
    a_at_f1
        .deregister(deregistration(&id_a2))
        .await
        .expect("A deregisters its own");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs etcd: Debian package etcd-server (scripts/test.sh installs it)"]
async fn with_the_admin_token_the_leader_knows_callers_by_their_own_address() {
    let _serial = SERIAL.lock().await;
    let etcd = EtcdProcess::start();
    etcd.client().await;
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let token = "tok-9c1d27aa55";
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let (cert, key, ca, tokens) = (
        path(&pki.server_cert()),
        path(&pki.server_key()),
        path(&pki.ca()),
        path(&token_file),
    );

    // TLS to a plaintext etcd: refused at start, naming the flags.
    let mut wrong = start_replica(&etcd, dir.path(), "tls-to-plain", &["--etcd-ca", &ca]);
    let code = wrong.wait(Duration::from_secs(20));
    let log = std::fs::read_to_string(dir.path().join("tls-to-plain.log")).unwrap();
    assert_ne!(code, Some(0), "{log}");
    assert!(log.contains("--etcd-ca"), "{log}");

    // TLS without client certificates: followers verify the leader against
    // --replica-ca and prove themselves with the token.
    let cluster = Cluster::start(
        &etcd,
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--replica-ca",
            &ca,
            "--admin-token-file",
            &tokens,
        ],
    )
    .await;
    let replicas = &cluster.replicas;
    let leader = &replicas[cluster.leader];
    let [f1, f2] = cluster.followers.map(|i| &replicas[i]);
    let server_only = tls(&pki, None);
    // Every replica is on 127.0.0.1: a leader that saw the follower's
    // address would take 127.0.0.2's calls for 127.0.0.1's.
    let elsewhere = Some("127.0.0.2".parse().unwrap());
    let mut here = client(endpoint(f1, Some(&server_only), None)).await;
    let mut there_f2 = client(endpoint(f2, Some(&server_only), elsewhere)).await;
    let mut there_leader = client(endpoint(leader, Some(&server_only), elsewhere)).await;

    let x = support::register(&mut here, "x", 9000).await;
    let y = support::register(&mut there_f2, "y", 9001).await;
    // Not the owner, and no token: refused, whatever it claims.
    let bearer = format!("Bearer {token}");
    for claim in [
        &[][..],
        &[("registry-forwarded-identity", "peer:127.0.0.1")],
        &[
            ("registry-forwarded-identity", "peer:127.0.0.1"),
            ("registry-replica-token", "tok-guess"),
        ],
    ] {
        for (at, c) in [
            ("a follower", &mut there_f2),
            ("the leader", &mut there_leader),
        ] {
            let status = c
                .deregister(with(deregistration(&x), claim))
                .await
                .unwrap_err();
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "127.0.0.2 deregistering 127.0.0.1's executor through {at} with {claim:?}: {status:?}"
            );
            assert!(!status.message().contains(token));
        }
    }
    let status = here.deregister(deregistration(&y)).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "127.0.0.1 (the replicas' own address) deregistering 127.0.0.2's: {status:?}"
    );
    // Its own, through a follower, needs no token; another's needs it.
    there_f2
        .deregister(deregistration(&y))
        .await
        .expect("one's own");
    there_f2
        .deregister(with(deregistration(&x), &[("authorization", &bearer)]))
        .await
        .expect("the token deregisters anyone's");
    assert_eq!(
        denied(replicas, "unauthenticated"),
        7.0,
        "{}",
        cluster.logs()
    );
    drop(cluster);
    for i in 0..3 {
        let log = std::fs::read_to_string(dir.path().join(format!("r{i}.log"))).unwrap_or_default();
        assert!(!log.contains(token), "the token leaked into a log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs etcd: Debian package etcd-server (scripts/test.sh installs it)"]
async fn on_an_etcd_requiring_client_certificates_replicas_need_the_etcd_flags() {
    let _serial = SERIAL.lock().await;
    let pki = Pki::new();
    let (etcd, files) = EtcdProcess::start_tls(&pki);
    let kv = etcd.client().await;
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = (
        path(&files.ca),
        path(&files.client.cert),
        path(&files.client.key),
    );
    let other_ca = Pki::new();
    let foreign_ca = path(&other_ca.ca());

    // Without the flags, or some of them, or the wrong CA: an exit at
    // start, naming the flags — not an endless retry.
    for (name, flags, named) in [
        ("plain", &[][..], "--etcd-ca"),
        ("no-client-cert", &["--etcd-ca", &ca][..], "--etcd-cert"),
        (
            "wrong-ca",
            &[
                "--etcd-ca",
                &foreign_ca,
                "--etcd-cert",
                &cert,
                "--etcd-key",
                &key,
            ][..],
            "--etcd-ca",
        ),
    ] {
        let started = Instant::now();
        let mut replica = start_replica(&etcd, dir.path(), name, flags);
        let code = replica.wait(Duration::from_secs(20));
        let log = std::fs::read_to_string(dir.path().join(format!("{name}.log"))).unwrap();
        assert_eq!(code, Some(1), "{name}: {log}");
        assert!(
            log.contains("cannot reach etcd at") && log.contains(named),
            "{name}: {log}"
        );
        eprintln!(
            "{name}: exited after {:?}: {}",
            started.elapsed(),
            log.trim()
        );
    }

    // With them: three replicas elect a leader and serve through followers.
    let cluster = Cluster::start(
        &etcd,
        &["--etcd-ca", &ca, "--etcd-cert", &cert, "--etcd-key", &key],
    )
    .await;
    let [f1, f2] = cluster.followers.map(|i| &cluster.replicas[i]);
    let mut at_f1 = client(endpoint(f1, None, None)).await;
    let id = support::register(&mut at_f1, "over-tls", 9000).await;
    let mut at_f2 = client(endpoint(f2, None, None)).await;
    at_f2.heartbeat(beat(&id)).await.expect("heartbeat");
    let count = at_f2
        .count_executors(CountExecutorsRequest::default())
        .await
        .expect("count")
        .into_inner()
        .count;
    assert_eq!(count, 1);
    let stored = kv
        .range_prefix(format!("{PREFIX}/executors/").as_bytes())
        .await
        .expect("read etcd over TLS");
    assert_eq!(stored.len(), 1, "the registration is in etcd");
    let leader = kv
        .value(format!("{PREFIX}/leader").as_bytes())
        .await
        .expect("read etcd over TLS")
        .expect("a leader key");
    assert_eq!(
        String::from_utf8_lossy(&leader),
        cluster.replicas[cluster.leader].grpc.to_string()
    );
}
