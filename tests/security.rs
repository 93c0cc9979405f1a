//! TLS, mutual TLS and authorization, end to end against the real binary:
//! certificates made at test time (rcgen), every refusal checked for its
//! documented code and counted in `registry_auth_denied_total{reason}` as
//! scraped from the real `/metrics`.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "tests on real time wait and measure on the real clock"
)]

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use executor_registry::client::{
    BearerToken, ChannelOptions, ClientTls, Membership, MembershipOptions,
};
use executor_registry::proto::registry_client::RegistryClient;
use executor_registry::proto::{
    self, DeregisterRequest, GetExecutorRequest, HeartbeatBatchRequest, HeartbeatRequest,
    HeartbeatStatus,
};
use support::pki::{ClientFiles, Pki};
use support::process::{BIN, RegistryProcess};
use support::{answering_client as client, http_get, register, sample};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

const RELEASE: &str = "/registry.admin.v1.Admin/ReleaseExpiryGuard";

fn tls(pki: &Pki, client: Option<&ClientFiles>) -> ClientTls {
    ClientTls::from_files(
        &pki.ca(),
        client.map(|c| c.cert.as_path()),
        client.map(|c| c.key.as_path()),
    )
    .expect("read the PEM files")
}

fn endpoint(addr: SocketAddr, tls: Option<&ClientTls>, from: Option<IpAddr>) -> Endpoint {
    support::endpoint_at(addr, tls, from).connect_timeout(Duration::from_secs(5))
}

/// Why a connection through `endpoint` got no answer from the registry
/// (it could not connect, or its first call failed in the transport); an
/// error when the registry answered.
async fn refusal(endpoint: Endpoint) -> Result<String, String> {
    let channel = match endpoint.connect().await {
        Err(e) => return Ok(format!("connect: {e}")),
        Ok(channel) => channel,
    };
    let answer = RegistryClient::new(channel)
        .count_executors(proto::CountExecutorsRequest::default())
        .await;
    match answer {
        Ok(count) => Err(format!("answered {count:?}")),
        // Transport failures; a registry's own refusal would be
        // PERMISSION_DENIED or UNAUTHENTICATED.
        Err(status)
            if matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
            ) =>
        {
            Ok(format!("{status:?}"))
        }
        Err(status) => Err(format!("answered {status:?}")),
    }
}

fn denied(metrics: &str, reason: &str) -> f64 {
    sample(
        metrics,
        &format!("registry_auth_denied_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or_else(|| panic!("no auth_denied series for {reason}:\n{metrics}"))
}

fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics").expect("scrape /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

fn beat(id: &str) -> HeartbeatRequest {
    HeartbeatRequest {
        executor_id: id.to_owned(),
        ttl_ms: 0,
    }
}

/// Calls `path` with an empty message: the admin path check happens
/// before any handler, whatever the method.
async fn raw_call(channel: Channel, path: &'static str, token: Option<&str>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let mut request = tonic::Request::new(());
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii"),
        );
    }
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    grpc.unary(request, http::uri::PathAndQuery::from_static(path), codec)
        .await
        .expect_err("release with the guard off is refused")
}

fn ctl(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("ctl")
        .args(args)
        .output()
        .expect("run ctl")
}

#[tokio::test]
async fn with_mutual_tls_only_certified_clients_connect_and_only_owners_or_admins_act() {
    let pki = Pki::new();
    let (a, b, ops) = (
        pki.client("exec-a"),
        pki.client("exec-b"),
        pki.client("ops"),
    );
    let data = tempfile::tempdir().unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let (cert, key, ca) = (s(&pki.server_cert()), s(&pki.server_key()), s(&pki.ca()));
    let registry = RegistryProcess::start(
        data.path(),
        &[
            "--store",
            "memory",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
            "--admin-identities",
            "ops,scheduler",
        ],
    );
    let addr = registry.grpc;
    let (tls_a, tls_ops) = (tls(&pki, Some(&a)), tls(&pki, Some(&ops)));
    let mut client_a = client(endpoint(addr, Some(&tls_a), None)).await;
    let mut client_b = client(endpoint(addr, Some(&tls(&pki, Some(&b))), None)).await;
    let mut client_ops = client(endpoint(addr, Some(&tls_ops), None)).await;
    let before = scrape(registry.metrics);

    // No certificate, one from another CA, an expired one, plaintext: no
    // connection at all.
    let no_cert = tls(&pki, None);
    let foreign = tls(&pki, Some(&pki.foreign_client("exec-a")));
    let expired = tls(&pki, Some(&pki.expired_client("exec-a")));
    for (what, tls) in [
        ("no client certificate", Some(&no_cert)),
        ("a certificate from another CA", Some(&foreign)),
        ("an expired certificate", Some(&expired)),
        ("plaintext", None),
    ] {
        if let Err(answer) = refusal(endpoint(addr, tls, None)).await {
            panic!("a client with {what} got an answer: {answer}");
        }
    }
    let metrics = scrape(registry.metrics);
    assert!(
        denied(&metrics, "handshake") - denied(&before, "handshake") >= 4.0,
        "four refused handshakes counted:\n{metrics}"
    );

    // Executor A cannot heartbeat or deregister B, in any form.
    let id_a = register(&mut client_a, "a", 9000).await;
    let id_b = register(&mut client_b, "b", 9000).await;
    client_a
        .heartbeat(beat(&id_a))
        .await
        .expect("own heartbeat");
    let status = client_a.heartbeat(beat(&id_b)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(beat(&id_b)).await.unwrap();
    tx.send(beat(&id_a)).await.unwrap();
    drop(tx);
    let mut stream = client_a
        .heartbeat_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream opens")
        .into_inner();
    let mut statuses = Vec::new();
    while let Some(result) = stream.message().await.expect("stream item") {
        let status = result.status();
        statuses.push((result.executor_id, status));
    }
    assert_eq!(
        statuses,
        [
            (id_b.clone(), HeartbeatStatus::Invalid),
            (id_a.clone(), HeartbeatStatus::Ok)
        ]
    );

    let batch = client_a
        .heartbeat_batch(HeartbeatBatchRequest {
            heartbeats: vec![beat(&id_a), beat(&id_b)],
        })
        .await
        .expect("batch")
        .into_inner();
    let statuses: Vec<_> = batch.results.iter().map(|r| r.status()).collect();
    assert_eq!(statuses, [HeartbeatStatus::Ok, HeartbeatStatus::Invalid]);

    let status = client_a
        .deregister(DeregisterRequest {
            executor_id: id_b.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        !status.message().contains("exec-b"),
        "the owner is not named"
    );
    // B is untouched, and its owner still keeps it alive.
    client_b
        .heartbeat(beat(&id_b))
        .await
        .expect("B's own heartbeat");

    // Admin RPCs: refused to A before any handler; ops reach the handler.
    let status = raw_call(
        endpoint(addr, Some(&tls_a), None).connect().await.unwrap(),
        RELEASE,
        None,
    )
    .await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = raw_call(
        endpoint(addr, Some(&tls_ops), None)
            .connect()
            .await
            .unwrap(),
        RELEASE,
        None,
    )
    .await;
    // Past the check the handler answers: the guard is off on this registry.
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    let metrics = scrape(registry.metrics);
    assert_eq!(
        denied(&metrics, "not_owner"),
        4.0,
        "unary, stream item, batch item, deregister"
    );
    assert_eq!(denied(&metrics, "not_admin"), 1.0);
    assert_eq!(denied(&metrics, "unauthenticated"), 0.0);

    // The admin identity deregisters B.
    client_ops
        .deregister(DeregisterRequest {
            executor_id: id_b.clone(),
        })
        .await
        .expect("an admin deregisters anyone");
    let status = client_a
        .get_executor(GetExecutorRequest {
            executor_id: id_b.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // ctl: the same rules with --ca/--cert/--key.
    let url = format!("https://{addr}");
    let ctl_as = |who: Option<&ClientFiles>, args: &[&str]| {
        let mut argv = vec![
            "--endpoint".to_owned(),
            url.clone(),
            "--ca".into(),
            ca.clone(),
        ];
        if let Some(c) = who {
            argv.extend(["--cert".into(), s(&c.cert), "--key".into(), s(&c.key)]);
        }
        argv.extend(args.iter().map(|a| a.to_string()));
        ctl(&argv.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = ctl_as(Some(&a), &["count"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    let out = ctl_as(None, &["count"]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "no certificate: unreachable, {out:?}"
    );
    let id_c = register(&mut client_b, "c", 9000).await;
    let out = ctl_as(Some(&a), &["deregister", &id_c]);
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("permission denied"), "{stderr}");
    let out = ctl_as(Some(&ops), &["deregister", &id_c]);
    assert!(out.status.success(), "{out:?}");

    // The client library: an executor joins with its certificate and
    // leaves (deregistering itself) cleanly.
    let mut options = MembershipOptions::new([url.as_str()], "lib", "127.0.0.1:9100");
    options.channel = ChannelOptions {
        tls: Some(tls(&pki, Some(&b))),
        ..ChannelOptions::default()
    };
    let membership = Membership::join(options).await.expect("join over mTLS");
    let id = membership.id().expect("joined with an id");
    client_b.heartbeat(beat(&id)).await.expect("same identity");
    membership.shutdown().await.expect("leaves");
    let status = client_a
        .get_executor(GetExecutorRequest { executor_id: id })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

/// A TLS client speaking HTTP/1.0 to the metrics endpoint.
async fn https_get(addr: SocketAddr, ca: &Path) -> String {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for cert in executor_registry::server::tls::certificates(&std::fs::read(ca).unwrap()).unwrap() {
        roots.add(cert).unwrap();
    }
    let config =
        rustls::ClientConfig::builder_with_provider(executor_registry::server::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("TLS to /metrics");
    tls.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tls.read_to_string(&mut response).await.unwrap_or_default();
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    response
}

#[tokio::test]
async fn without_mutual_tls_the_admin_token_guards_deregistering_others_and_admin_rpcs() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let token_file = data.path().join("admin-token");
    let token = "tok-3f9a1c2e7b";
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let (cert, key, tokens) = (s(&pki.server_cert()), s(&pki.server_key()), s(&token_file));
    let log = data.path().join("registry.log");
    let registry = RegistryProcess::start_logged(
        data.path(),
        &[
            "--store",
            "memory",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--metrics-tls",
            "--admin-token-file",
            &tokens,
        ],
        &log,
    );
    let addr = registry.grpc;
    let server_only = tls(&pki, None);
    // Two hosts: 127.0.0.1 registers, 127.0.0.2 is someone else.
    let mut here = client(endpoint(addr, Some(&server_only), None)).await;
    let elsewhere_endpoint = endpoint(addr, Some(&server_only), Some("127.0.0.2".parse().unwrap()));
    let mut elsewhere = client(elsewhere_endpoint.clone()).await;

    let x = register(&mut here, "x", 9000).await;
    let y = register(&mut here, "y", 9000).await;
    // Heartbeats are not guarded by the token.
    elsewhere
        .heartbeat(beat(&x))
        .await
        .expect("heartbeats are open");

    let deregister = |id: &str, token: Option<&str>| {
        let options = ChannelOptions {
            admin_token: token.map(|t| BearerToken::new(t).unwrap()),
            ..ChannelOptions::default()
        };
        options.request(DeregisterRequest {
            executor_id: id.to_owned(),
        })
    };
    for bad in [None, Some("wrong-token")] {
        let status = elsewhere.deregister(deregister(&x, bad)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{bad:?}: {status:?}");
        assert!(!status.message().contains(token));
    }
    let channel = elsewhere_endpoint.connect().await.unwrap();
    let status = raw_call(channel.clone(), RELEASE, None).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = raw_call(channel, RELEASE, Some(token)).await;
    // Past the check the handler answers: the guard is off on this registry.
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    // With the token, anyone's; without it, one's own.
    elsewhere
        .deregister(deregister(&x, Some(token)))
        .await
        .expect("the token deregisters others");
    here.deregister(deregister(&y, None))
        .await
        .expect("one's own needs no token");

    // ctl with --admin-token-file.
    let z = register(&mut here, "z", 9000).await;
    let url = format!("https://{addr}");
    let ca = s(&pki.ca());
    let out = ctl(&[
        "--endpoint",
        &url,
        "--ca",
        &ca,
        "--admin-token-file",
        &tokens,
        "deregister",
        &z,
    ]);
    assert!(out.status.success(), "{out:?}");

    // Metrics over HTTPS (--metrics-tls): the refusals are counted.
    let metrics = https_get(registry.metrics, &pki.ca()).await;
    assert_eq!(
        denied(&metrics, "unauthenticated"),
        3.0,
        "two deregistrations, one admin call"
    );
    assert_eq!(denied(&metrics, "not_owner"), 0.0);
    drop(registry);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!log.contains(token), "the token leaked into the log");
}

#[test]
fn inconsistent_security_flags_refuse_to_start_naming_the_flag() {
    let data = tempfile::tempdir().unwrap();
    for (args, flag) in [
        (&["--tls-cert", "/nonexistent/cert.pem"][..], "--tls-key"),
        (&["--admin-identities", "ops"][..], "--admin-identities"),
        (
            &[
                "--tls-cert",
                "/nonexistent/c.pem",
                "--tls-key",
                "/nonexistent/k.pem",
            ][..],
            "--tls-cert",
        ),
    ] {
        let out = Command::new(BIN)
            .args(["serve", "--store", "memory", "--listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path())
            .args(args)
            .output()
            .expect("run serve");
        assert!(!out.status.success(), "{args:?} started");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}
