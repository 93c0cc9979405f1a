//! Hostile input: every RPC fed random bytes, invalid UTF-8, truncated and
//! oversized messages, 10,000 labels; thousands of idle connections;
//! abrupt disconnects mid-stream. Each gets a clear error or is shrugged
//! off; the server never panics, leaks no watcher, and keeps serving.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "tests on real time wait and measure on the real clock"
)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut};
use executor_registry::proto::{self, HeartbeatRequest, ListExecutorsRequest};
use executor_registry::registry::MemoryStore;
use support::process::RegistryProcess;
use support::*;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Sends and receives raw message bytes, whatever they are.
#[derive(Default)]
struct Raw;

struct RawEncoder;
struct RawDecoder;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

const UNARY: &[&str] = &[
    "/registry.v1.Registry/Register",
    "/registry.v1.Registry/Heartbeat",
    "/registry.v1.Registry/HeartbeatBatch",
    "/registry.v1.Registry/Deregister",
    "/registry.v1.Registry/GetExecutor",
    "/registry.v1.Registry/ListExecutors",
    "/registry.v1.Registry/CountExecutors",
];
const SERVER_STREAMING: &str = "/registry.v1.Registry/WatchExecutors";
const BIDI: &str = "/registry.v1.Registry/HeartbeatStream";

/// Sends `payload` to `path` and returns the final status (OK if the call
/// succeeded).
async fn send_raw(channel: Channel, path: &'static str, payload: Vec<u8>) -> Status {
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(usize::MAX);
    grpc.ready().await.expect("channel ready");
    let path = PathAndQuery::from_static(path);
    let result = match path.as_str() {
        SERVER_STREAMING => {
            match grpc
                .server_streaming(tonic::Request::new(payload), path, Raw)
                .await
            {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    // The snapshot, if the request decoded; then let it go.
                    match tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
                        Ok(Err(status)) => Err(status),
                        _ => Ok(()),
                    }
                }
                Err(status) => Err(status),
            }
        }
        BIDI => {
            let requests = tokio_stream::iter(vec![payload]);
            match grpc
                .streaming(tonic::Request::new(requests), path, Raw)
                .await
            {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(_)) => continue,
                            Ok(None) => break Ok(()),
                            Err(status) => break Err(status),
                        }
                    }
                }
                Err(status) => Err(status),
            }
        }
        _ => grpc
            .unary(tonic::Request::new(payload), path, Raw)
            .await
            .map(|_| ()),
    };
    result.err().unwrap_or_else(|| Status::ok(""))
}

/// xorshift64*: reproducible random bytes without a dependency.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

fn all_paths() -> Vec<&'static str> {
    let mut paths = UNARY.to_vec();
    paths.push(SERVER_STREAMING);
    paths.push(BIDI);
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_to_every_rpc_get_a_clear_error_and_the_server_keeps_serving() {
    let server = TestServer::start(fast_config()).await;
    let channel = server.channel().await;
    for path in all_paths() {
        for seed in 1..=40u64 {
            let payload = random_bytes(seed * 7919, (seed as usize * 37) % 1500 + 1);
            let status = send_raw(channel.clone(), path, payload).await;
            // Random bytes may happen to decode (protobuf skips unknown
            // fields); then the request is judged on its content. Never an
            // error that blames the server.
            assert!(
                !matches!(
                    status.code(),
                    Code::Internal | Code::Unknown | Code::DataLoss
                ),
                "{path} seed {seed}: {status:?}"
            );
            if status.code() == Code::InvalidArgument {
                assert!(!status.message().is_empty());
            }
        }
    }
    let mut c = server.client().await;
    register(&mut c, "after", 1).await;
    server.stop().await;
}

#[tokio::test]
async fn malformed_messages_are_invalid_argument_naming_what_is_wrong() {
    let server = TestServer::start(fast_config()).await;
    let channel = server.channel().await;
    // Field 1 (a string in every request that has one) holding invalid UTF-8.
    let bad_utf8 = vec![0x0a, 0x02, 0xff, 0xfe];
    // Field 1 announcing 16 bytes, carrying 2.
    let truncated = vec![0x0a, 0x10, b'a', b'b'];
    for path in all_paths() {
        for (what, payload) in [("invalid UTF-8", &bad_utf8), ("truncated", &truncated)] {
            let status = send_raw(channel.clone(), path, payload.clone()).await;
            let requests_with_a_string_field_1 = !path.ends_with("ListExecutors")
                && !path.ends_with("CountExecutors")
                && !path.ends_with("WatchExecutors")
                && !path.ends_with("HeartbeatBatch");
            if requests_with_a_string_field_1 || what == "truncated" {
                assert_eq!(
                    status.code(),
                    Code::InvalidArgument,
                    "{path} {what}: {status:?}"
                );
                assert!(
                    status.message().contains("malformed message"),
                    "{path}: {status:?}"
                );
            } else {
                assert_ne!(status.code(), Code::Internal, "{path} {what}: {status:?}");
            }
        }
    }
    // prost names the field.
    let status = send_raw(channel.clone(), UNARY[0], bad_utf8.clone()).await;
    assert!(
        status.message().contains("RegisterRequest.name"),
        "{status:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn ten_thousand_labels_and_oversized_strings_are_refused_and_change_nothing() {
    let server = TestServer::start(fast_config()).await;
    let mut c = server.client().await;
    let mut request = register_request("many", 1, &[]);
    request.labels = (0..10_000)
        .map(|i| (format!("k{i}"), "v".to_owned()))
        .collect();
    let status = c.register(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("more than 64"), "{status:?}");

    let mut request = register_request("big", 1, &[]);
    request.name = "n".repeat(1_000_000);
    let status = c.register(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("name"), "{status:?}");

    let huge_id = HeartbeatRequest {
        executor_id: "x".repeat(3_000_000),
        ttl_ms: 1_000,
    };
    let status = c.heartbeat(huge_id).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().len() < 2_000, "the message is capped");

    let list = c
        .list_executors(ListExecutorsRequest::default())
        .await
        .unwrap();
    assert!(list.into_inner().executors.is_empty(), "nothing registered");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_connections_do_not_stop_the_server() {
    let server = TestServer::start(fast_config()).await;
    let mut idle = Vec::new();
    for _ in 0..2_000 {
        idle.push(
            tokio::net::TcpStream::connect(server.addr)
                .await
                .expect("connect"),
        );
    }
    let mut c = server.client().await;
    let id = register(&mut c, "busy", 1).await;
    c.heartbeat(HeartbeatRequest {
        executor_id: id,
        ttl_ms: 1_000,
    })
    .await
    .expect("served beside 2,000 idle connections");
    drop(idle);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abrupt_disconnects_mid_stream_leak_no_watcher_and_lose_nothing() {
    let gauge = Arc::new(WatcherGauge(AtomicI64::new(0)));
    let server = TestServer::start_observed(
        None,
        fast_config(),
        Box::new(MemoryStore::new()),
        gauge.clone(),
    )
    .await;
    let mut c = server.client().await;
    let id = register(&mut c, "steady", 1).await;
    for round in 0..50 {
        let channel = server.channel().await;
        let mut client = proto::registry_client::RegistryClient::new(channel);
        let (_, watch_stream) = watch(&mut client).await;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(HeartbeatRequest {
            executor_id: id.clone(),
            ttl_ms: 5_000,
        })
        .await
        .expect("queue a heartbeat");
        let mut results = client
            .heartbeat_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("heartbeat stream")
            .into_inner();
        results.message().await.expect("result").expect("one");
        // Cut everything without a goodbye: streams open, a request queued.
        let _ = tx.try_send(HeartbeatRequest {
            executor_id: id.clone(),
            ttl_ms: 5_000,
        });
        drop((client, watch_stream, results, tx));
        assert!(round < 50);
    }
    eventually(Duration::from_secs(10), "every watcher released", || {
        let gauge = gauge.clone();
        async move { gauge.0.load(Ordering::SeqCst) == 0 }
    })
    .await;
    // The executor was never harmed, and the server serves.
    let got = c
        .get_executor(proto::GetExecutorRequest { executor_id: id })
        .await
        .expect("still registered")
        .into_inner();
    assert_eq!(got.status, proto::ExecutorStatus::Running as i32);
    server.stop().await;
}

/// The real binary with RUST_BACKTRACE=1 takes garbage on every RPC and
/// its log shows no panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_never_panics_on_garbage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("registry.log");
    let mut registry = RegistryProcess::start_logged(&dir.path().join("data"), &[], &log);
    let channel = registry.channel().await;
    for path in all_paths() {
        for seed in 1..=10u64 {
            let payload = random_bytes(seed * 104_729, (seed as usize * 211) % 4000 + 1);
            let status = send_raw(channel.clone(), path, payload).await;
            assert_ne!(status.code(), Code::Internal, "{path}: {status:?}");
        }
        let status = send_raw(channel.clone(), path, vec![0x0a, 0x7f]).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{path}: {status:?}");
    }
    let mut c = registry.client().await;
    register(&mut c, "after", 1).await;
    registry.signal("-TERM");
    let code = tokio::task::spawn_blocking(move || registry.wait(Duration::from_secs(15)))
        .await
        .expect("wait");
    assert_eq!(code, Some(0));
    let text = std::fs::read_to_string(&log).expect("read the log");
    assert!(!text.contains("panicked"), "{text}");
}

/// Found by the `grpc_service` fuzz target: a request body that ends inside
/// a gRPC message (its header declares more bytes than follow), carries an
/// unknown flag byte, or holds no message for a method that takes one, was
/// answered INTERNAL by tonic. Driven through the
/// service exactly as the server mounts it, as a tower `Service` (a tonic
/// client always frames correctly, so it cannot send these).
#[tokio::test]
async fn a_body_ending_inside_a_grpc_message_is_invalid_argument_on_every_rpc() {
    use executor_registry::registry::Registry;
    use executor_registry::server::{self, Limits};
    use http_body_util::{BodyExt as _, Full};
    use tonic::codegen::{Service as _, http};

    let (registry, task) = Registry::start_in_memory(fast_config());
    let service = server::registry_service(
        registry,
        tokio_util::sync::CancellationToken::new(),
        Limits::default(),
    );
    // (flag, declared length, bytes that follow), and what the answer names.
    let bodies: [(&[u8], &str); 4] = [
        (
            &[0, 0, 0, 0, 16, 0x0a, 0x02, b'a', b'b'],
            "4 of the 16 bytes",
        ),
        (&[0, 0, 0], "3 of 5 bytes"),
        (&[9, 0, 0, 0, 0], "flag 9"),
        // No message at all: tonic said INTERNAL "Missing request message".
        (&[], "no message"),
    ];
    for path in all_paths() {
        for (body, names) in bodies {
            if path == BIDI && body.is_empty() {
                // An empty stream of heartbeats is a valid request.
                continue;
            }
            let request = http::Request::builder()
                .method(http::Method::POST)
                .uri(path)
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(tonic::body::Body::new(Full::new(
                    bytes::Bytes::from_static(body),
                )))
                .expect("a valid request");
            let response = service.clone().call(request).await.expect("infallible");
            let (parts, mut body) = response.into_parts();
            let mut status = Status::from_header_map(&parts.headers);
            while status.is_none() {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Some(trailers) = frame.trailers_ref() {
                            status = Status::from_header_map(trailers);
                        }
                    }
                    Some(Err(e)) => panic!("{path}: body failed: {e}"),
                    None => break,
                }
            }
            let status = status.unwrap_or_else(|| panic!("{path}: no grpc-status"));
            assert_eq!(status.code(), Code::InvalidArgument, "{path}: {status:?}");
            assert!(status.message().contains(names), "{path}: {status:?}");
        }
    }
    task.stop().await;
}
