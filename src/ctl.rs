//! `executor-registry ctl`: the operator CLI.
//!
//! Owns: the `ctl` flags, the RPCs of each subcommand, the output (aligned
//! tables for people, `--json` for scripts) and the mapping of every failure
//! to an exit code scripts can rely on ([`EXIT_CODES`]). It keeps no state.
//! The two subcommands that take more than one call have a module each:
//! [`list`] pages through a listing, [`watch`] watches again when its
//! stream breaks. Every answer is decoded with gRPC's default 4 MiB limit:
//! the registry sends nothing larger.

mod list;
mod watch;

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use executor_registry::client::{
    BearerToken, ChannelOptions, ClientTls, DEFAULT_ENDPOINT, describe_transport_error,
};
use executor_registry::config::parse_duration;
use executor_registry::proto;
use executor_registry::proto::admin::admin_client::AdminClient;
use executor_registry::proto::admin::{self, ExpiryGuardState};
use executor_registry::proto::registry_client::RegistryClient;
use executor_registry::registry::check_label_part;

/// Exit codes, as `ctl --help` shows them.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  any other error (e.g. `guard release` on a registry without --expiry-guard-fraction)
  2  usage: bad flags, selector or argument (also when the registry answers INVALID_ARGUMENT)
  3  not found: `get` or `deregister` of an id that is not a live executor
  4  the registry is unreachable (connection refused, timeout, TLS handshake refused) or unavailable
     (UNAVAILABLE); `watch`: it could not watch again within --timeout after its stream broke";

const EXIT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_NOT_FOUND: u8 = 3;
const EXIT_UNAVAILABLE: u8 = 4;

/// `executor-registry ctl`.
#[derive(Debug, Args)]
#[command(after_help = EXIT_CODES)]
pub struct CtlArgs {
    /// The registry's gRPC endpoint (`http://host:port` or `host:port`).
    #[arg(long, global = true, env = "EXECUTOR_REGISTRY_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    endpoint: String,

    /// Print JSON: one document (list, get, count, deregister, guard), or one object
    /// per line (watch).
    #[arg(long, global = true)]
    json: bool,

    /// Longest wait to connect, and for each answer; for `watch`, also
    /// the longest it tries to watch again after its stream broke.
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration::<Duration>)]
    timeout: Duration,

    /// CA certificate (PEM) the registry's certificate must chain to; turns
    /// on TLS (a bare host:port endpoint becomes https://).
    #[arg(long, global = true, env = "EXECUTOR_REGISTRY_CA")]
    ca: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS; needs --key and --ca.
    #[arg(long, global = true, env = "EXECUTOR_REGISTRY_CERT")]
    cert: Option<PathBuf>,

    /// Private key (PEM) of --cert.
    #[arg(long, global = true, env = "EXECUTOR_REGISTRY_KEY")]
    key: Option<PathBuf>,

    /// File holding the admin token, sent as `authorization: Bearer …`
    /// (deregistering executors registered by others without mutual TLS).
    #[arg(long, global = true, env = "EXECUTOR_REGISTRY_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,

    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Live executors, sorted by id, all at one revision (printed on
    /// stderr; in the document with --json), read page by page.
    #[command(after_help = EXIT_CODES)]
    List {
        /// Only executors with this status.
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
        /// `key=value`, `key!=value` (absent or different) or `key~regex`
        /// (whole value matches); repeat to AND them.
        #[arg(long = "selector", value_name = "SELECTOR", value_parser = parse_selector)]
        selectors: Vec<proto::LabelSelector>,
        /// Stop after the first N executors.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        /// Executors asked for per call [default: the registry's, 1000; at
        /// most 10000]. Every page comes from the same snapshot.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
        page_size: Option<u32>,
    },
    /// One live executor.
    #[command(after_help = EXIT_CODES)]
    Get {
        /// Its id.
        id: String,
    },
    /// Number of live executors.
    #[command(after_help = EXIT_CODES)]
    Count {
        /// Only executors with this status.
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
    },
    /// The live fleet, then one line per change (an executor coming,
    /// becoming RUNNING, going), until interrupted (Ctrl-C exits 0). When
    /// the stream breaks (it fell behind, the registry restarted or is
    /// unreachable) it watches again from the last revision printed and says
    /// on stderr whether it resumed or printed a new snapshot; it gives up
    /// after --timeout without the registry.
    #[command(after_help = EXIT_CODES)]
    Watch,
    /// Removes an executor at once (OFFLINE, reason DEREGISTERED).
    #[command(after_help = EXIT_CODES)]
    Deregister {
        /// Its id.
        id: String,
    },
    /// The mass-expiry guard: its state, or `release` to expire what it holds.
    #[command(after_help = EXIT_CODES)]
    Guard {
        #[command(subcommand)]
        action: Option<GuardAction>,
    },
}

#[derive(Debug, Subcommand)]
enum GuardAction {
    /// Expires now, in one pass, every executor the guard holds that has not
    /// heartbeated since (operator release).
    #[command(after_help = EXIT_CODES)]
    Release,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StatusArg {
    /// Registered, no heartbeat yet.
    Initing,
    /// Heartbeating.
    Running,
}

impl StatusArg {
    fn wire(self) -> proto::ExecutorStatus {
        match self {
            Self::Initing => proto::ExecutorStatus::Initing,
            Self::Running => proto::ExecutorStatus::Running,
        }
    }
}

/// `k=v`, `k!=v` or `k~regex`, checked as the registry would.
fn parse_selector(s: &str) -> Result<proto::LabelSelector, String> {
    const FORMS: &str = "use key=value, key!=value or key~regex";
    let at = s
        .find(['=', '!', '~'])
        .ok_or_else(|| format!("no operator in {s:?}; {FORMS}"))?;
    let (label, rest) = s.split_at(at);
    let (op, target) = if let Some(t) = rest.strip_prefix("!=") {
        (proto::SelectorOp::Neq, t)
    } else if let Some(t) = rest.strip_prefix('=') {
        (proto::SelectorOp::Eq, t)
    } else if let Some(t) = rest.strip_prefix('~') {
        (proto::SelectorOp::Regex, t)
    } else {
        return Err(format!("bad operator in {s:?}; {FORMS}"));
    };
    check_label_part(label).map_err(|why| format!("label key {label:?} {why}"))?;
    if op == proto::SelectorOp::Regex {
        regex::Regex::new(&format!("^(?:{target})$"))
            .map_err(|e| format!("regex {target:?} does not compile: {e}"))?;
    }
    Ok(proto::LabelSelector {
        label: label.to_owned(),
        target: target.to_owned(),
        op: op as i32,
    })
}

/// A failure, with its exit code.
#[derive(Debug)]
enum CtlError {
    Usage(String),
    NotFound(String),
    Unavailable(String),
    Other(String),
}

impl CtlError {
    fn code(&self) -> u8 {
        match self {
            Self::Usage(_) => EXIT_USAGE,
            Self::NotFound(_) => EXIT_NOT_FOUND,
            Self::Unavailable(_) => EXIT_UNAVAILABLE,
            Self::Other(_) => EXIT_ERROR,
        }
    }

    fn message(&self) -> &str {
        match self {
            Self::Usage(m) | Self::NotFound(m) | Self::Unavailable(m) | Self::Other(m) => m,
        }
    }

    /// A registry answer as an error for `endpoint`.
    fn from_status(endpoint: &str, status: &tonic::Status) -> Self {
        let message = status.message();
        match status.code() {
            Code::NotFound => Self::NotFound(message.to_owned()),
            Code::InvalidArgument => Self::Usage(message.to_owned()),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => Self::Unavailable(
                format!("the registry at {endpoint} is unavailable: {message}"),
            ),
            // The connection broke before any answer: most often a refused
            // TLS handshake, or plaintext against a TLS port.
            Code::Unknown
                if message.contains("transport error") || message.contains("h2 protocol error") =>
            {
                Self::Unavailable(format!(
                    "the connection to {endpoint} failed: {message} (if the registry serves TLS, \
                     use https:// with --ca, and --cert/--key for mutual TLS)"
                ))
            }
            code => Self::Other(format!(
                "the registry at {endpoint} answered {code}: {message}"
            )),
        }
    }

    /// Output failures: a closed pipe (`ctl watch | head`) is a normal end.
    fn from_io(error: io::Error) -> Option<Self> {
        (error.kind() != io::ErrorKind::BrokenPipe)
            .then(|| Self::Other(format!("cannot write the output: {error}")))
    }
}

/// Runs `ctl`; the process exit code.
pub fn run(args: CtlArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match runtime.block_on(execute(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message());
            ExitCode::from(e.code())
        }
    }
}

/// The endpoint with a scheme (`host:port` → `http://host:port`, or
/// `https://` with TLS).
fn normalize(endpoint: &str, tls: bool) -> String {
    let endpoint = endpoint.trim();
    if endpoint.contains("://") {
        endpoint.to_owned()
    } else if tls {
        format!("https://{endpoint}")
    } else {
        format!("http://{endpoint}")
    }
}

/// The TLS settings and admin token the flags name (files read).
fn credentials(args: &CtlArgs) -> Result<ChannelOptions, CtlError> {
    let tls = match (&args.ca, &args.cert, &args.key) {
        (None, None, None) => None,
        (None, _, _) => {
            return Err(CtlError::Usage(
                "--cert and --key need --ca (the CA that signed the registry's certificate)".into(),
            ));
        }
        (Some(ca), cert, key) => Some(
            ClientTls::from_files(ca, cert.as_deref(), key.as_deref())
                .map_err(|e| CtlError::Usage(format!("--ca/--cert/--key: {e}")))?,
        ),
    };
    let admin_token = match &args.admin_token_file {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                CtlError::Usage(format!(
                    "--admin-token-file {}: cannot read: {e}",
                    path.display()
                ))
            })?;
            Some(BearerToken::new(&text).map_err(|e| {
                CtlError::Usage(format!("--admin-token-file {}: {e}", path.display()))
            })?)
        }
    };
    Ok(ChannelOptions {
        tls,
        admin_token,
        ..ChannelOptions::default()
    })
}

async fn connect(
    endpoint: &str,
    timeout: Duration,
    options: &ChannelOptions,
) -> Result<Channel, CtlError> {
    let mut target = Endpoint::from_shared(endpoint.to_owned())
        .map_err(|e| CtlError::Usage(format!("invalid --endpoint {endpoint:?}: {e}")))?
        .connect_timeout(timeout)
        .tcp_nodelay(true);
    if let Some(tls) = &options.tls {
        if !endpoint.starts_with("https://") {
            return Err(CtlError::Usage(format!(
                "--ca is given: the endpoint must be https:// or a bare host:port, not {endpoint:?}"
            )));
        }
        target = target.tls_config(tls.tonic_config()).map_err(|e| {
            CtlError::Usage(format!(
                "--ca/--cert/--key: {}",
                describe_transport_error(&e)
            ))
        })?;
    }
    let channel = target.connect().await.map_err(|e| {
        CtlError::Unavailable(format!(
            "cannot reach the registry at {endpoint}: {}",
            describe_transport_error(&e)
        ))
    })?;
    Ok(channel)
}

/// One call's answer, or the registry's error, bounded by `--timeout` (no
/// answer in time is the outer error).
async fn answer<T>(
    endpoint: &str,
    timeout: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<Result<T, tonic::Status>, CtlError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => Ok(result.map(tonic::Response::into_inner)),
        Err(_) => Err(CtlError::Unavailable(format!(
            "the registry at {endpoint} did not answer within {}",
            humantime::format_duration(timeout)
        ))),
    }
}

/// One call, bounded by `--timeout`.
async fn call<T>(
    endpoint: &str,
    timeout: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CtlError> {
    answer(endpoint, timeout, call)
        .await?
        .map_err(|status| CtlError::from_status(endpoint, &status))
}

async fn execute(args: CtlArgs) -> Result<(), CtlError> {
    let options = credentials(&args)?;
    let endpoint = normalize(&args.endpoint, options.tls.is_some());
    let channel = connect(&endpoint, args.timeout, &options).await?;
    let mut client = RegistryClient::new(channel.clone());
    let (json, timeout) = (args.json, args.timeout);
    let mut out = io::stdout().lock();
    let written = match args.command {
        CtlCommand::List {
            status,
            selectors,
            limit,
            page_size,
        } => {
            let query = list::Query {
                status: status.map_or(proto::ExecutorStatus::Unspecified, StatusArg::wire),
                selectors,
                limit,
                page_size,
            };
            let list = list::list(&endpoint, timeout, &mut client, &options, &query).await?;
            if json {
                let executors: Vec<Value> = list.executors.iter().map(executor_json).collect();
                let document = json!({
                    "revision": list.revision,
                    "count": list.executors.len(),
                    "executors": executors,
                    "pages": list.pages,
                    "truncated": list.truncated,
                });
                writeln!(out, "{document:#}")
            } else {
                // The table alone on stdout, for scripts; its revision for
                // people.
                let n = list.executors.len();
                let executors = if n == 1 { "executor" } else { "executors" };
                if list.truncated {
                    eprintln!(
                        "revision {}: the first {n} {executors} (--limit)",
                        list.revision
                    );
                } else {
                    eprintln!("revision {}: {n} {executors}", list.revision);
                }
                out.write_all(table(&list.executors, now_unix_ms()).as_bytes())
            }
        }
        CtlCommand::Get { id } => {
            let request = proto::GetExecutorRequest { executor_id: id };
            let executor = call(
                &endpoint,
                timeout,
                client.get_executor(options.request(request)),
            )
            .await?;
            if json {
                writeln!(out, "{:#}", executor_json(&executor))
            } else {
                out.write_all(table(&[executor], now_unix_ms()).as_bytes())
            }
        }
        CtlCommand::Count { status } => {
            let wire = status.map_or(proto::ExecutorStatus::Unspecified, StatusArg::wire);
            let request = proto::CountExecutorsRequest {
                status: wire as i32,
            };
            let count = call(
                &endpoint,
                timeout,
                client.count_executors(options.request(request)),
            )
            .await?
            .count;
            if json {
                let status = status.map_or("all", |s| status_name(s.wire()));
                writeln!(out, "{}", json!({ "count": count, "status": status }))
            } else {
                writeln!(out, "{count}")
            }
        }
        CtlCommand::Deregister { id } => {
            let request = proto::DeregisterRequest {
                executor_id: id.clone(),
            };
            call(
                &endpoint,
                timeout,
                client.deregister(options.request(request)),
            )
            .await?;
            if json {
                writeln!(out, "{}", json!({ "deregistered": id }))
            } else {
                writeln!(out, "deregistered {id}")
            }
        }
        CtlCommand::Guard { action } => {
            let mut admin = AdminClient::new(channel);
            match action {
                None => {
                    let request = admin::GetExpiryGuardRequest {};
                    let answer = call(
                        &endpoint,
                        timeout,
                        admin.get_expiry_guard(options.request(request)),
                    )
                    .await?;
                    let state = answer.state.unwrap_or_default();
                    if json {
                        writeln!(out, "{:#}", guard_json(&state))
                    } else {
                        out.write_all(guard_text(&state, now_unix_ms()).as_bytes())
                    }
                }
                Some(GuardAction::Release) => {
                    let request = admin::ReleaseExpiryGuardRequest {};
                    let answer = call(
                        &endpoint,
                        timeout,
                        admin.release_expiry_guard(options.request(request)),
                    )
                    .await?;
                    if json {
                        let state = answer.state.unwrap_or_default();
                        let document = json!({
                            "released": answer.released,
                            "state": guard_json(&state),
                        });
                        writeln!(out, "{document:#}")
                    } else {
                        writeln!(
                            out,
                            "released {} executor(s): OFFLINE, reason expired",
                            answer.released
                        )
                    }
                }
            }
        }
        CtlCommand::Watch => {
            drop(out);
            return watch::watch(&endpoint, timeout, &mut client, &options, json).await;
        }
    };
    written.or_else(|e| CtlError::from_io(e).map_or(Ok(()), Err))
}

fn snapshot_text(snapshot: &proto::Snapshot, json: bool) -> String {
    if json {
        let executors: Vec<Value> = snapshot.executors.iter().map(executor_json).collect();
        let line = json!({
            "type": "snapshot",
            "revision": snapshot.revision,
            "executors": executors,
        });
        return format!("{line}\n");
    }
    let mut text = format!(
        "SNAPSHOT revision={} executors={}\n",
        snapshot.revision,
        snapshot.executors.len()
    );
    if !snapshot.executors.is_empty() {
        text.push_str(&table(&snapshot.executors, now_unix_ms()));
    }
    text
}

fn event_line(event: &proto::ExecutorEvent, json: bool) -> String {
    let kind = proto::EventType::try_from(event.r#type).unwrap_or(proto::EventType::Unspecified);
    let labels: BTreeMap<&str, &str> = event
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let reason = match proto::OfflineReason::try_from(event.reason) {
        Ok(proto::OfflineReason::Expired) => "expired",
        Ok(proto::OfflineReason::Deregistered) => "deregistered",
        _ => "unspecified",
    };
    let name = match kind {
        proto::EventType::Online => "online",
        proto::EventType::Running => "running",
        proto::EventType::Offline => "offline",
        proto::EventType::Unspecified => "unspecified",
    };
    let offline = kind == proto::EventType::Offline;
    if json {
        let mut line = json!({
            "type": name,
            "revision": event.revision,
            "id": event.executor_id,
            "address": event.address,
            "labels": labels,
            "status": status_name(
                proto::ExecutorStatus::try_from(event.status)
                    .unwrap_or(proto::ExecutorStatus::Unspecified)
            ),
        });
        if offline {
            line["reason"] = json!(reason);
        }
        return format!("{line}\n");
    }
    match kind {
        proto::EventType::Offline => format!(
            "OFFLINE revision={} id={} address={} reason={reason}\n",
            event.revision, event.executor_id, event.address
        ),
        _ => format!(
            "{} revision={} id={} address={} labels={}\n",
            name.to_uppercase(),
            event.revision,
            event.executor_id,
            event.address,
            labels_text(labels.into_iter())
        ),
    }
}

fn status_name(status: proto::ExecutorStatus) -> &'static str {
    match status {
        proto::ExecutorStatus::Unspecified => "unspecified",
        proto::ExecutorStatus::Initing => "initing",
        proto::ExecutorStatus::Running => "running",
        proto::ExecutorStatus::Tombstone => "tombstone",
    }
}

fn status_of(raw: i32) -> &'static str {
    proto::ExecutorStatus::try_from(raw).map_or("unknown", status_name)
}

fn executor_json(e: &proto::Executor) -> Value {
    let labels: BTreeMap<&str, &str> = e
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    json!({
        "id": e.id,
        "name": e.name,
        "address": e.address,
        "status": status_of(e.status),
        "labels": labels,
        "last_heartbeat_unix_ms": e.last_heartbeat_unix_ms,
        "ttl_ms": e.ttl_ms,
    })
}

fn guard_json(state: &ExpiryGuardState) -> Value {
    json!({
        "enabled": state.enabled,
        "active": state.active,
        "held": state.held,
        "fraction": state.fraction,
        "since_unix_ms": state.since_unix_ms,
        "max_hold_ms": state.max_hold_ms,
        "recently_expired": state.recently_expired,
        "live": state.live,
    })
}

/// The guard's state for people: one `key  value` line each.
fn guard_text(state: &ExpiryGuardState, now_ms: u64) -> String {
    if !state.enabled {
        return "state  off (start the registry with --expiry-guard-fraction to use it)\n".into();
    }
    let mut rows: Vec<(&str, String)> = Vec::new();
    if state.active {
        let held_for = now_ms.saturating_sub(state.since_unix_ms);
        rows.push(("state", "ACTIVE: holding expirations".into()));
        rows.push(("held", state.held.to_string()));
        rows.push(("since", format!("{} ago", short_duration(held_for))));
        rows.push((
            "released",
            format!(
                "when heartbeats recover, on `ctl guard release`, or in {} (max hold {})",
                short_duration(state.max_hold_ms.saturating_sub(held_for)),
                short_duration(state.max_hold_ms)
            ),
        ));
    } else {
        rows.push(("state", "armed (not holding)".into()));
        rows.push(("max hold", short_duration(state.max_hold_ms)));
    }
    rows.push((
        "fraction",
        format!(
            "{} (holds when more of the fleet would expire within one TTL)",
            state.fraction
        ),
    ));
    rows.push(("live", state.live.to_string()));
    rows.push(("recently expired", state.recently_expired.to_string()));
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}

fn labels_text<'a>(labels: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let text = labels
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    if text.is_empty() { "-".into() } else { text }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A compact duration: `850ms`, `1.5s`, `42s`, `4m12s`, `2h3m`.
fn short_duration(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..10_000 => {
            let tenths = ms / 100;
            if tenths.is_multiple_of(10) {
                format!("{}s", tenths / 10)
            } else {
                format!("{}.{}s", tenths / 10, tenths % 10)
            }
        }
        10_000..60_000 => format!("{}s", ms / 1_000),
        60_000..3_600_000 => {
            let s = ms / 1_000;
            if s.is_multiple_of(60) {
                format!("{}m", s / 60)
            } else {
                format!("{}m{}s", s / 60, s % 60)
            }
        }
        _ => {
            let m = ms / 60_000;
            if m.is_multiple_of(60) {
                format!("{}h", m / 60)
            } else {
                format!("{}h{}m", m / 60, m % 60)
            }
        }
    }
}

/// Executors as an aligned table, with a header (also when empty).
fn table(executors: &[proto::Executor], now_ms: u64) -> String {
    let header = [
        "ID",
        "NAME",
        "ADDRESS",
        "STATUS",
        "LAST HEARTBEAT",
        "TTL",
        "LABELS",
    ];
    let rows: Vec<[String; 7]> = executors
        .iter()
        .map(|e| {
            let mut labels: Vec<(&str, &str)> = e
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            labels.sort_unstable();
            let last = if e.last_heartbeat_unix_ms == 0 {
                "never".to_owned()
            } else {
                format!(
                    "{} ago",
                    short_duration(now_ms.saturating_sub(e.last_heartbeat_unix_ms))
                )
            };
            [
                e.id.clone(),
                if e.name.is_empty() {
                    "-".into()
                } else {
                    e.name.clone()
                },
                e.address.clone(),
                status_of(e.status).to_owned(),
                last,
                short_duration(e.ttl_ms),
                labels_text(labels.into_iter()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: &[&str]| {
        let last = cells.len() - 1;
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        text.push('\n');
    };
    line(&header);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&cells);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse_into_the_three_operators() {
        let s = parse_selector("zone=a").unwrap();
        assert_eq!((s.label.as_str(), s.target.as_str()), ("zone", "a"));
        assert_eq!(s.op, proto::SelectorOp::Eq as i32);
        let s = parse_selector("zone!=a").unwrap();
        assert_eq!((s.label.as_str(), s.target.as_str()), ("zone", "a"));
        assert_eq!(s.op, proto::SelectorOp::Neq as i32);
        let s = parse_selector("gpu~a100|h100").unwrap();
        assert_eq!((s.label.as_str(), s.target.as_str()), ("gpu", "a100|h100"));
        assert_eq!(s.op, proto::SelectorOp::Regex as i32);
        let s = parse_selector("k=").unwrap();
        assert_eq!(s.target, "", "an empty target is allowed");
    }

    #[test]
    fn bad_selectors_are_refused_with_the_reason() {
        assert!(parse_selector("zone").unwrap_err().contains("no operator"));
        assert!(
            parse_selector("zone!a")
                .unwrap_err()
                .contains("bad operator")
        );
        assert!(parse_selector("=a").unwrap_err().contains("label key"));
        assert!(parse_selector("a_b=c").unwrap_err().contains("label key"));
        assert!(
            parse_selector("gpu~(")
                .unwrap_err()
                .contains("does not compile")
        );
    }

    #[test]
    fn the_guard_state_reads_as_lines() {
        let off = guard_text(&ExpiryGuardState::default(), 0);
        assert!(off.starts_with("state  off") && off.contains("--expiry-guard-fraction"));
        let mut state = ExpiryGuardState {
            enabled: true,
            fraction: 0.5,
            max_hold_ms: 600_000,
            live: 1_000,
            ..Default::default()
        };
        let armed = guard_text(&state, 0);
        assert!(armed.contains("state             armed"), "{armed}");
        assert!(armed.contains("max hold          10m"), "{armed}");
        state.active = true;
        state.held = 600;
        state.since_unix_ms = 1_000_000;
        let active = guard_text(&state, 1_012_000);
        assert!(active.contains("state             ACTIVE"), "{active}");
        assert!(active.contains("held              600\n"), "{active}");
        assert!(active.contains("since             12s ago"), "{active}");
        assert!(active.contains("in 9m48s (max hold 10m)"), "{active}");
        assert!(active.contains("live              1000\n"), "{active}");
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(short_duration(0), "0ms");
        assert_eq!(short_duration(850), "850ms");
        assert_eq!(short_duration(1_000), "1s");
        assert_eq!(short_duration(1_500), "1.5s");
        assert_eq!(short_duration(42_000), "42s");
        assert_eq!(short_duration(252_000), "4m12s");
        assert_eq!(short_duration(600_000), "10m");
        assert_eq!(short_duration(7_380_000), "2h3m");
    }

    #[test]
    fn the_table_aligns_its_columns() {
        let executor = |id: &str, status: proto::ExecutorStatus, last: u64| proto::Executor {
            id: id.into(),
            name: "w".into(),
            address: "10.0.0.1:9000".into(),
            labels: [("zone".to_owned(), "a".to_owned())].into(),
            status: status as i32,
            last_heartbeat_unix_ms: last,
            ttl_ms: 1_500,
        };
        let text = table(
            &[
                executor("w-0000000000000001", proto::ExecutorStatus::Running, 9_000),
                executor("w-2", proto::ExecutorStatus::Initing, 0),
            ],
            10_000,
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        for column in [
            "NAME",
            "ADDRESS",
            "STATUS",
            "LAST HEARTBEAT",
            "TTL",
            "LABELS",
        ] {
            let at = lines[0].find(column).unwrap();
            for row in &lines[1..] {
                assert_ne!(
                    row.as_bytes()[at],
                    b' ',
                    "a cell starts at {column} in {row:?}"
                );
                assert_eq!(&row[at - 2..at], "  ", "column {column} aligned in {row:?}");
            }
        }
        assert!(lines[1].contains("running") && lines[1].contains("1s ago"));
        assert!(lines[2].contains("initing") && lines[2].contains("never"));
        assert!(lines[1].ends_with("zone=a"));
        assert_eq!(
            table(&[], 0).trim_end(),
            "ID  NAME  ADDRESS  STATUS  LAST HEARTBEAT  TTL  LABELS"
        );
    }
}
