//! The verifying watch, shared by [`crate::fleet`] and [`crate::soak`].
//!
//! Owns: one `WatchExecutors` stream at a time — opening it, telling the
//! caller when the first snapshot arrived (or that the watch could not be
//! opened), opening it again when the server ends it (lagging, shutdown),
//! and counting those re-watches and stream errors. What a snapshot or an
//! event means is the caller's: each is handed to its [`Observer`], which
//! comes back when the watch ends.

use std::time::Duration;

use executor_registry::proto::{self, ExecutorEvent, Snapshot, WatchExecutorsRequest};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::client::Client;
use crate::stats::{self, Tally};

/// What the watch received.
pub enum Seen<'a> {
    /// A snapshot; `first` for the very first one of the run; `opened` is
    /// when the watch that delivered it was opened.
    Snapshot {
        /// The snapshot.
        snapshot: &'a Snapshot,
        /// The first snapshot of the run.
        first: bool,
        /// When this watch was opened.
        opened: Instant,
    },
    /// A membership event.
    Event(&'a ExecutorEvent),
}

/// What the caller makes of each snapshot and event.
pub trait Observer: Send + 'static {
    /// Called for every snapshot and event, in order.
    fn seen(&mut self, seen: Seen<'_>);
}

/// How the watch went.
#[derive(Debug, Clone, Default)]
pub struct WatchCounts {
    /// Watches opened again after the stream ended.
    pub rewatches: u64,
    /// Of those, ended by the server for lagging (RESOURCE_EXHAUSTED).
    pub lagged: u64,
    /// Seconds to receive the first snapshot.
    pub first_snapshot_s: f64,
    /// Stream failures by code.
    pub errors: Tally,
}

/// Watches until `stop`, handing every snapshot and event to `on`, and
/// returns it. `ready` gets `Ok` at the first snapshot, or the error if the
/// first watch cannot be opened (then this returns at once).
pub async fn run<O: Observer>(
    mut client: Client,
    stop: CancellationToken,
    ready: oneshot::Sender<anyhow::Result<()>>,
    mut on: O,
) -> (WatchCounts, O) {
    let mut ready = Some(ready);
    let mut out = WatchCounts::default();
    'watches: while !stop.is_cancelled() {
        let opened = Instant::now();
        let mut stream = match client
            .watch_executors(WatchExecutorsRequest { start_revision: 0 })
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => {
                out.errors.add(&stats::code_key("watch-open", &status), 1);
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(anyhow::anyhow!("cannot watch: {status}")));
                    return (out, on);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => break 'watches,
                m = stream.message() => m,
            };
            match message {
                Ok(Some(m)) => match &m.kind {
                    Some(proto::watch_executors_response::Kind::Snapshot(snapshot)) => {
                        let first = ready.is_some();
                        if let Some(ready) = ready.take() {
                            out.first_snapshot_s = opened.elapsed().as_secs_f64();
                            let _ = ready.send(Ok(()));
                        }
                        on.seen(Seen::Snapshot {
                            snapshot,
                            first,
                            opened,
                        });
                    }
                    Some(proto::watch_executors_response::Kind::Event(event)) => {
                        on.seen(Seen::Event(event));
                    }
                    None => {}
                },
                Ok(None) => {
                    out.errors.add("watch:ended_by_server", 1);
                    break;
                }
                Err(status) => {
                    if status.code() == Code::ResourceExhausted {
                        out.lagged += 1;
                    }
                    out.errors.add(&stats::code_key("watch", &status), 1);
                    break;
                }
            }
        }
        if !stop.is_cancelled() {
            out.rewatches += 1;
        }
    }
    (out, on)
}

/// Starts [`run`] as a task and waits (at most 120 s) for its first
/// snapshot.
pub async fn start<O: Observer>(
    client: Client,
    stop: CancellationToken,
    on: O,
) -> anyhow::Result<tokio::task::JoinHandle<(WatchCounts, O)>> {
    let (ready_tx, ready_rx) = oneshot::channel();
    let task = tokio::spawn(run(client, stop, ready_tx, on));
    match tokio::time::timeout(Duration::from_secs(120), ready_rx).await {
        Ok(Ok(Ok(()))) => Ok(task),
        Ok(Ok(Err(e))) => Err(e),
        Ok(Err(_)) => anyhow::bail!("the watch task ended before its first snapshot"),
        Err(_) => anyhow::bail!("no watch snapshot within 120 s"),
    }
}
