//! The verifying watch, shared by [`crate::fleet`] and [`crate::soak`].
//!
//! Owns: one `WatchExecutors` stream at a time — opening it, gathering a
//! snapshot's chunks (until the one with `more = false`) into one snapshot,
//! telling the caller when the first snapshot arrived (or that the watch
//! could not be opened), the last revision handed on, and opening the watch
//! again when the server ends it (lagging, shutdown) or it breaks, from that
//! revision. The registry then either resumes it from its history (the next
//! event, nothing missed) or starts it with a new snapshot; the two are
//! counted apart, with stream errors. What a snapshot or an event means is
//! the caller's: each is handed to its [`Observer`], which comes back when
//! the watch ends.
//!
//! Every event handed on is the one after the last revision handed on: an
//! event out of order (a gap) ends the watch, and the next one starts from
//! a snapshot, so no caller ever reads past a gap unknowingly. Revisions
//! never go backwards, across restarts and leader terms too: a snapshot or
//! event below the highest revision handed on is counted.

use std::time::Duration;

use executor_registry::proto::{
    ExecutorEvent, Snapshot, WatchExecutorsRequest, watch_executors_response::Kind,
};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::client::Client;
use crate::stats::{self, Tally};

/// What the watch received.
pub enum Seen<'a> {
    /// A whole snapshot (every chunk); `first` for the very first one of the
    /// run; `opened` is when the watch that delivered it was opened.
    Snapshot {
        /// The snapshot, its chunks gathered (`more` is false).
        snapshot: &'a Snapshot,
        /// The first snapshot of the run.
        first: bool,
        /// When this watch was opened.
        opened: Instant,
    },
    /// A membership event: ONLINE, RUNNING or OFFLINE.
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
    /// Of those ends, by the server for lagging (RESOURCE_EXHAUSTED).
    pub lagged: u64,
    /// Re-watches that resumed from the registry's history: no snapshot,
    /// no event missed.
    pub resumes: u64,
    /// Re-watches that began with a new snapshot: the events in the gap
    /// were not seen.
    pub resnapshots: u64,
    /// Events out of order (a watch ended for it).
    pub gaps: u64,
    /// Snapshots below, or events at or below, the highest revision handed
    /// on before them: a revision that went backwards.
    pub backwards: u64,
    /// The highest revision handed on.
    pub highest_revision: u64,
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
    // The last revision handed on; None: the next watch starts from a
    // snapshot.
    let mut last: Option<u64> = None;
    'watches: while !stop.is_cancelled() {
        let opened = Instant::now();
        let request = WatchExecutorsRequest {
            start_revision: last.unwrap_or(0),
        };
        let mut stream = match client.watch_executors(request).await {
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
        // A watch after the first snapshot: it resumes or re-snapshots.
        let rewatch = ready.is_none();
        // Nothing of this watch handed on yet: its first snapshot or event
        // tells how it began.
        let mut began = false;
        let mut chunks: Option<Snapshot> = None;
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => break 'watches,
                m = stream.message() => m,
            };
            match message {
                Ok(Some(m)) => match m.kind {
                    Some(Kind::Snapshot(chunk)) => {
                        let snapshot = match chunks.take() {
                            None => chunk,
                            Some(mut held) if held.revision == chunk.revision => {
                                held.executors.extend(chunk.executors);
                                held.more = chunk.more;
                                held
                            }
                            Some(_) => {
                                out.errors.add("watch:chunk_of_another_snapshot", 1);
                                last = None;
                                break;
                            }
                        };
                        if snapshot.more {
                            chunks = Some(snapshot);
                            continue;
                        }
                        if rewatch && !began {
                            out.resnapshots += 1;
                        }
                        began = true;
                        let first = ready.is_some();
                        if first {
                            out.first_snapshot_s = opened.elapsed().as_secs_f64();
                        }
                        if went_back(out.highest_revision, snapshot.revision, false) {
                            out.backwards += 1;
                        }
                        out.highest_revision = out.highest_revision.max(snapshot.revision);
                        last = Some(snapshot.revision);
                        on.seen(Seen::Snapshot {
                            snapshot: &snapshot,
                            first,
                            opened,
                        });
                        // Ready once the caller has the snapshot.
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(Ok(()));
                        }
                    }
                    Some(Kind::Event(event)) => {
                        let due = last.map(|l| l + 1);
                        if went_back(out.highest_revision, event.revision, true) {
                            out.backwards += 1;
                        }
                        if chunks.is_some() || due != Some(event.revision) {
                            out.gaps += 1;
                            out.errors.add("watch:event_out_of_order", 1);
                            last = None;
                            break;
                        }
                        if rewatch && !began {
                            out.resumes += 1;
                        }
                        began = true;
                        out.highest_revision = event.revision;
                        last = Some(event.revision);
                        on.seen(Seen::Event(&event));
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

/// Whether a snapshot (`event` false) or an event at `revision` goes below
/// `highest`, the highest revision handed on so far (0: none yet): a
/// snapshot may repeat it (nothing changed since), an event may not.
fn went_back(highest: u64, revision: u64, event: bool) -> bool {
    if event {
        highest > 0 && revision <= highest
    } else {
        revision < highest
    }
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

#[cfg(test)]
mod tests {
    use super::went_back;

    #[test]
    fn a_revision_goes_back_below_the_highest_handed_on() {
        // Nothing handed on yet: anything goes.
        assert!(!went_back(0, 1, true));
        assert!(!went_back(0, 0, false));
        // A snapshot may repeat the highest revision, not go below it.
        assert!(!went_back(10, 10, false));
        assert!(!went_back(10, 11, false));
        assert!(went_back(10, 9, false));
        // An event must be above it.
        assert!(went_back(10, 10, true));
        assert!(went_back(10, 3, true));
        assert!(!went_back(10, 11, true));
    }
}
