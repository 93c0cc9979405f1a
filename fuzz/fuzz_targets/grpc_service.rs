//! Every `registry.v1.Registry` RPC, decoded and handled by the real tonic
//! service (`server::registry_service`, the same codec and size limits as
//! the binary), driven as a tower `Service` with an HTTP/2-less
//! `http::Request` — no sockets, so libFuzzer sees only our code and tonic's.
//!
//! Input: byte 0 picks the RPC, byte 1 how the body is framed (a correct
//! gRPC frame, two frames, no frame at all, the compressed flag, a length
//! prefix longer than the body, a length over the 4 MiB limit), the rest is
//! the message. A placeholder id `fz-????????????????` in the message is
//! replaced (same length, so protobuf lengths stay right) by the id of an
//! executor registered at start-up, so heartbeat, get and deregister reach
//! their success paths too.
//!
//! Checked: no panic (libFuzzer reports it), every call ends (a hang is a
//! panic after 10 s), and every answer carries a `grpc-status` that is a
//! known code other than UNKNOWN or INTERNAL — bad input is the client's
//! error and must be answered as such (except the compressed flag without
//! a `grpc-encoding`, which the gRPC spec answers INTERNAL).
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use bytes::{BufMut as _, Bytes, BytesMut};
use executor_registry::proto::registry_server::RegistryServer;
use executor_registry::registry::{Registration, Registry, RegistryConfig};
use executor_registry::server::{self, FramingChecked, Limits, RegistryService};
use http_body_util::{BodyExt as _, Full};
use libfuzzer_sys::fuzz_target;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::codegen::Service as _;
use tonic::codegen::http;

const PATHS: [&str; 9] = [
    "/registry.v1.Registry/Register",
    "/registry.v1.Registry/Heartbeat",
    "/registry.v1.Registry/HeartbeatStream",
    "/registry.v1.Registry/HeartbeatBatch",
    "/registry.v1.Registry/Deregister",
    "/registry.v1.Registry/GetExecutor",
    "/registry.v1.Registry/ListExecutors",
    "/registry.v1.Registry/CountExecutors",
    "/registry.v1.Registry/WatchExecutors",
];
const WATCH: usize = 8;

/// The service as the server mounts it.
type Svc = FramingChecked<RegistryServer<RegistryService>>;
const PLACEHOLDER: &[u8] = b"fz-????????????????";

struct State {
    runtime: Runtime,
    service: Svc,
    /// Ids of executors registered at start-up, each as long as PLACEHOLDER.
    ids: Vec<String>,
}

fn state() -> &'static State {
    static STATE: OnceLock<State> = OnceLock::new();
    STATE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let config = RegistryConfig {
            // Fuzzed registrations expire quickly, so the table stays small.
            init_ttl: Duration::from_secs(1),
            min_ttl: Duration::from_millis(100),
            tombstone_retention: Duration::from_secs(5),
            ..RegistryConfig::default()
        };
        let (service, ids) = runtime.block_on(async {
            let (registry, task) = Registry::start_in_memory(config);
            // The membership loop runs for the whole process.
            std::mem::forget(task);
            let mut ids = Vec::new();
            for _ in 0..4 {
                let entry = register_fixture(&registry).await;
                ids.push(entry);
            }
            let service =
                server::registry_service(registry, CancellationToken::new(), Limits::default());
            (service, ids)
        });
        State {
            runtime,
            service,
            ids,
        }
    })
}

async fn register_fixture(registry: &Registry) -> String {
    let entry = registry
        .register(Registration {
            name: "fz".into(),
            address: "127.0.0.1:1".into(),
            labels: vec![("zone".into(), "a".into())],
        })
        .await
        .expect("the fixture registers");
    let id = entry.id().as_str().to_owned();
    assert_eq!(id.len(), PLACEHOLDER.len(), "fixture id {id}");
    // Ten minutes: the fixtures outlive a run unless the input deregisters
    // them or heartbeats them with a shorter TTL.
    let _ = registry.heartbeat(&id, 600_000);
    id
}

fn substitute(message: &[u8], ids: &[String]) -> Vec<u8> {
    let mut out = message.to_vec();
    let mut i = 0;
    let mut n = 0;
    while i + PLACEHOLDER.len() <= out.len() {
        if &out[i..i + PLACEHOLDER.len()] == PLACEHOLDER {
            out[i..i + PLACEHOLDER.len()].copy_from_slice(ids[n % ids.len()].as_bytes());
            n += 1;
            i += PLACEHOLDER.len();
        } else {
            i += 1;
        }
    }
    out
}

fn frame(out: &mut BytesMut, compressed: u8, declared: u32, payload: &[u8]) {
    out.put_u8(compressed);
    out.put_u32(declared);
    out.put_slice(payload);
}

fn body(framing: u8, message: &[u8]) -> Bytes {
    let mut out = BytesMut::new();
    let len = message.len() as u32;
    match framing % 6 {
        0 => frame(&mut out, 0, len, message),
        1 => {
            // Two messages (a stream's two requests; a unary call's extra).
            let cut = message
                .first()
                .map_or(0, |&b| b as usize % (message.len() + 1));
            let (a, b) = message.split_at(cut);
            frame(&mut out, 0, a.len() as u32, a);
            frame(&mut out, 0, b.len() as u32, b);
        }
        2 => out.put_slice(message),
        3 => frame(&mut out, 1, len, message),
        4 => frame(&mut out, 0, len + 1 + len % 7, message),
        _ => frame(&mut out, 0, 5 * 1024 * 1024, message),
    }
    out.freeze()
}

/// `grpc-status` and `grpc-message`, if the headers (or trailers) end the call.
fn grpc_status(headers: &http::HeaderMap) -> Option<(i32, String)> {
    let code = headers.get("grpc-status")?;
    let code = code
        .to_str()
        .expect("ASCII grpc-status")
        .parse()
        .expect("numeric grpc-status");
    let message = headers
        .get("grpc-message")
        .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
        .unwrap_or_default();
    Some((code, message))
}

async fn call(service: Svc, path: usize, body: Bytes) {
    let mut service = service;
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(PATHS[path])
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(Full::new(body)))
        .expect("a valid request");
    let response = service
        .call(request)
        .await
        .expect("tonic services are infallible");
    let (parts, mut body) = response.into_parts();
    assert_eq!(parts.status, http::StatusCode::OK, "gRPC answers 200");
    let mut status = grpc_status(&parts.headers);
    let mut messages = 0;
    while status.is_none() {
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = frame.expect("the response body does not fail");
        if frame.is_data() {
            messages += 1;
            if path == WATCH {
                // The snapshot arrived; the stream would now wait for events.
                return;
            }
        } else if let Some(trailers) = frame.trailers_ref() {
            status = grpc_status(trailers);
        }
    }
    let (status, message) =
        status.unwrap_or_else(|| panic!("no grpc-status after {messages} messages"));
    let code = Code::from_i32(status);
    // The gRPC spec requires INTERNAL for this one client error.
    let compressed_without_encoding =
        code == Code::Internal && message.contains("compressed-flag%20but%20no%20grpc-encoding");
    assert!(
        (!matches!(code, Code::Unknown | Code::Internal) || compressed_without_encoding)
            && (0..=16).contains(&status),
        "{} answered grpc-status {status} ({code:?}): {message}",
        PATHS[path]
    );
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let state = state();
    let path = data[0] as usize % PATHS.len();
    let message = substitute(&data[2..], &state.ids);
    let body = body(data[1], &message);
    let service = state.service.clone();
    state.runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), call(service, path, body))
            .await
            .unwrap_or_else(|_| panic!("{} did not answer within 10 s", PATHS[path]));
    });
});
