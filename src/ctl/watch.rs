//! `ctl watch`: the fleet, then every change, across broken streams.
//!
//! Owns: the watch loop — a snapshot's chunks gathered and printed as one
//! snapshot, events printed as they come, the last revision printed — and
//! watching again. When the stream ends because the registry ended it for
//! falling behind (RESOURCE_EXHAUSTED) or went away (restart, network), it
//! watches again with `start_revision` = the last revision printed, and
//! says on stderr how that went: *resumed* (the registry still held every
//! event since: the next line is the next event) or *new snapshot* (it did
//! not, or it restarted: a snapshot is printed as the first one was, and a
//! consumer starts over from it). Without a watch for longer than
//! `--timeout` it gives up: exit 4, as when it cannot connect.

use std::io::Write;
use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

use executor_registry::client::ChannelOptions;
use executor_registry::proto::{
    self, WatchExecutorsRequest, registry_client::RegistryClient, watch_executors_response::Kind,
};

use super::{CtlError, call, event_line, snapshot_text};

/// First wait between attempts to watch again; doubled up to
/// [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(1);

type Stream = tonic::Streaming<proto::WatchExecutorsResponse>;

/// Whether a stream that ended with `code` is worth watching again: the
/// registry ended it for lagging, or is restarting, or the connection
/// broke.
fn worth_watching_again(code: Code) -> bool {
    matches!(
        code,
        Code::ResourceExhausted
            | Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
    )
}

/// Why a stream ended, in words.
fn ended_text(endpoint: &str, status: &tonic::Status) -> String {
    match status.code() {
        Code::ResourceExhausted => format!(
            "the watch fell behind the registry's watch history ({})",
            status.message()
        ),
        Code::Unavailable => CtlError::from_status(endpoint, status).message().to_owned(),
        code => format!(
            "the connection to {endpoint} broke ({code}: {})",
            status.message()
        ),
    }
}

/// How a stream ended.
enum End {
    /// Ctrl-C, or stdout closed.
    Quit,
    /// The registry closed it without an error.
    Closed,
    /// With this error.
    Failed(tonic::Status),
}

/// A watch opened again, not yet told about.
struct Rewatch {
    /// The last revision printed: where it watched from.
    from: u64,
    /// Why it watched again.
    why: String,
}

/// What the loop knows across streams.
struct State {
    json: bool,
    /// The last revision printed (a snapshot's or an event's).
    last: Option<u64>,
    /// The chunks of a snapshot until its last one.
    chunks: Option<proto::Snapshot>,
    /// Set when a watch was opened again, until its first message.
    rewatch: Option<Rewatch>,
}

impl State {
    /// Adds a snapshot chunk; the whole snapshot once its last chunk came.
    fn gather(&mut self, chunk: proto::Snapshot) -> Result<Option<proto::Snapshot>, CtlError> {
        let Some(held) = &mut self.chunks else {
            if chunk.more {
                self.chunks = Some(chunk);
                return Ok(None);
            }
            return Ok(Some(chunk));
        };
        if held.revision != chunk.revision {
            return Err(CtlError::Other(format!(
                "the registry sent a snapshot chunk at revision {} among chunks at revision {}",
                chunk.revision, held.revision
            )));
        }
        held.executors.extend(chunk.executors);
        if chunk.more {
            return Ok(None);
        }
        Ok(self.chunks.take())
    }

    /// Tells stderr how a watch opened again began, at its first snapshot
    /// or event.
    fn tell(&mut self, began_with: Option<u64>) {
        let Some(Rewatch { from, why }) = self.rewatch.take() else {
            return;
        };
        match began_with {
            None => eprintln!(
                "watch: {why}; watched again from revision {from}: resumed, no event missed"
            ),
            Some(revision) => eprintln!(
                "watch: {why}; watched again from revision {from}: the registry no longer holds \
                 the events after it, new snapshot at revision {revision}"
            ),
        }
    }
}

/// Prints the snapshot, then one line per event, until Ctrl-C or the end of
/// the stream, watching again when it breaks.
pub(super) async fn watch(
    endpoint: &str,
    timeout: Duration,
    client: &mut RegistryClient<Channel>,
    options: &ChannelOptions,
    json: bool,
) -> Result<(), CtlError> {
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let request = options.request(WatchExecutorsRequest::default());
    let mut stream = call(endpoint, timeout, client.watch_executors(request)).await?;
    let mut state = State {
        json,
        last: None,
        chunks: None,
        rewatch: None,
    };
    loop {
        let ended = tokio::select! {
            _ = &mut interrupted => return Ok(()),
            end = follow(&mut stream, &mut state) => match end? {
                End::Quit | End::Closed => return Ok(()),
                End::Failed(status) => status,
            },
        };
        if !worth_watching_again(ended.code()) {
            return Err(CtlError::from_status(endpoint, &ended));
        }
        // A snapshot cut short is taken again whole.
        state.chunks = None;
        let from = state.last.unwrap_or(0);
        let why = ended_text(endpoint, &ended);
        stream = tokio::select! {
            _ = &mut interrupted => return Ok(()),
            opened = watch_again(endpoint, timeout, client, options, from) => match opened {
                Ok(stream) => stream,
                Err(failure) => {
                    return Err(CtlError::Unavailable(format!(
                        "{why}; could not watch again within {}: {failure}",
                        humantime::format_duration(timeout)
                    )));
                }
            },
        };
        state.rewatch = Some(Rewatch { from, why });
    }
}

/// Opens a watch from `from` (0: a snapshot), trying again with a backoff
/// for at most `timeout`; the last failure otherwise.
async fn watch_again(
    endpoint: &str,
    timeout: Duration,
    client: &mut RegistryClient<Channel>,
    options: &ChannelOptions,
    from: u64,
) -> Result<Stream, String> {
    let deadline = Instant::now() + timeout;
    let mut delay = FIRST_RETRY_DELAY;
    let mut failure = format!("no answer from {endpoint}");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let request = options.request(WatchExecutorsRequest {
            start_revision: from,
        });
        match tokio::time::timeout(left, client.watch_executors(request)).await {
            Ok(Ok(response)) => return Ok(response.into_inner()),
            Ok(Err(status)) if worth_watching_again(status.code()) => {
                failure = CtlError::from_status(endpoint, &status)
                    .message()
                    .to_owned();
            }
            Ok(Err(status)) => {
                return Err(CtlError::from_status(endpoint, &status)
                    .message()
                    .to_owned());
            }
            Err(_) => return Err(failure),
        }
        if Instant::now() + delay >= deadline {
            return Err(failure);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
}

/// Prints the stream's snapshot and events until it ends.
async fn follow(stream: &mut Stream, state: &mut State) -> Result<End, CtlError> {
    loop {
        let kind = match stream.message().await {
            Ok(Some(message)) => message.kind,
            Ok(None) => return Ok(End::Closed),
            Err(status) => return Ok(End::Failed(status)),
        };
        let text = match kind {
            Some(Kind::Snapshot(chunk)) => {
                let Some(snapshot) = state.gather(chunk)? else {
                    continue;
                };
                state.tell(Some(snapshot.revision));
                state.last = Some(snapshot.revision);
                snapshot_text(&snapshot, state.json)
            }
            Some(Kind::Event(event)) => {
                if let Some(held) = &state.chunks {
                    return Err(CtlError::Other(format!(
                        "the registry sent the event at revision {} before the last chunk of the \
                         snapshot at revision {}",
                        event.revision, held.revision
                    )));
                }
                state.tell(None);
                state.last = Some(event.revision);
                event_line(&event, state.json)
            }
            None => continue,
        };
        let mut out = std::io::stdout().lock();
        if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            return match CtlError::from_io(e) {
                Some(error) => Err(error),
                None => Ok(End::Quit),
            };
        }
    }
}
