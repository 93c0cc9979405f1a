//! The store's own thread.
//!
//! It lives in the core, beside the port, because it does no I/O of its
//! own: it only runs the adapter's blocking calls where they cannot stall
//! the async runtime.
//!
//! Owns: the boxed `MembershipStore` and the OS thread that calls it, so that
//! blocking writes (fsync) never run on the async runtime; the load and the
//! first revision reservation run there too, while the caller waits. Commits are
//! executed one at a time in submission order. A store that does not block
//! (`MembershipStore::blocks` is false) is called inline instead. After
//! [`IDLE_AFTER`] without a job the store is told it is idle, once per quiet
//! spell.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

use super::port::{Batch, IDLE_AFTER, MembershipStore, StoreError, StoredExecutor};

struct Job {
    batch: Batch,
    done: oneshot::Sender<(Result<(), StoreError>, Duration)>,
}

/// A commit in flight: resolves with the result and how long it took.
pub type Commit = oneshot::Receiver<(Result<(), StoreError>, Duration)>;

/// Runs `f` and times it on the real clock: how long a commit took (an
/// fsync, a round trip to etcd) is a real measurement, whatever clock the
/// runtime runs on.
#[allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a store's latency is measured in real time"
)]
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let started = std::time::Instant::now();
    let out = f();
    (out, started.elapsed())
}

/// Handle to the store thread. Dropping it lets the thread finish the jobs
/// already submitted, then exit.
pub struct StoreWorker {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    /// A store that does not block, called inline.
    inline: Option<Box<dyn MembershipStore>>,
}

/// What a store held at start, and the revisions reserved on it.
#[derive(Debug)]
pub struct Loaded {
    /// Every stored executor.
    pub executors: Vec<StoredExecutor>,
    /// The stored revision floor: the registry starts here (every revision
    /// assigned before is below it).
    pub revision: u64,
    /// The floor stored now: revisions below it may be assigned.
    pub reserved: u64,
    /// The store records TTL ceilings.
    pub records_ttls: bool,
}

/// Loads everything from `store` and reserves `range` revisions above its
/// floor: a durable commit, before any of them is assigned.
fn open(store: &mut dyn MembershipStore, range: u64) -> Result<Loaded, StoreError> {
    let executors = store.load_all()?;
    let revision = store.revision_floor()?;
    let reserved = revision.saturating_add(range);
    store.commit(&Batch {
        revision_floor: Some(reserved),
        ..Batch::default()
    })?;
    Ok(Loaded {
        executors,
        revision,
        reserved,
        records_ttls: store.records_ttls(),
    })
}

impl StoreWorker {
    /// Loads everything from `store` and reserves `range` revisions above
    /// its floor (see [`Loaded`]), on a new thread that then runs the
    /// store's commits — or inline, for a store that does not block. Waits
    /// for the load.
    pub fn start(
        mut store: Box<dyn MembershipStore>,
        range: u64,
    ) -> Result<(Self, Loaded), StoreError> {
        if !store.blocks() {
            let loaded = open(&mut *store, range)?;
            let worker = Self {
                jobs: None,
                thread: None,
                inline: Some(store),
            };
            return Ok((worker, loaded));
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let (opened_tx, opened) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("registry-store".into())
            .spawn(move || {
                let loaded = open(&mut *store, range);
                let failed = loaded.is_err();
                let _ = opened_tx.send(loaded);
                if failed {
                    return;
                }
                let mut busy = true;
                loop {
                    let job = match rx.recv_timeout(IDLE_AFTER) {
                        Ok(job) => job,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            if std::mem::take(&mut busy) {
                                store.idle();
                            }
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    };
                    busy = true;
                    let answer = timed(|| store.commit(&job.batch));
                    // The loop may have stopped waiting; nothing to do then.
                    let _ = job.done.send(answer);
                }
            })
            .map_err(|e| StoreError::Failed(format!("cannot start the store thread: {e}")))?;
        // The wait blocks this thread; on a multi-thread runtime its other
        // tasks move to another worker meanwhile (a store may need them: the
        // etcd store's calls run on the runtime's I/O).
        let wait = || {
            opened.recv().unwrap_or_else(|_| {
                Err(StoreError::Failed(
                    "the store thread stopped while loading".into(),
                ))
            })
        };
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let loaded = if multi_thread {
            tokio::task::block_in_place(wait)?
        } else {
            wait()?
        };
        Ok((
            Self {
                jobs: Some(tx),
                thread: Some(thread),
                inline: None,
            },
            loaded,
        ))
    }

    /// Queues a batch; the returned receiver resolves when it is durable (or
    /// failed).
    pub fn submit(&mut self, batch: Batch) -> Commit {
        let (done, rx) = oneshot::channel();
        if let Some(store) = self.inline.as_mut() {
            let _ = done.send(timed(|| store.commit(&batch)));
            return rx;
        }
        let sent = self
            .jobs
            .as_ref()
            .map(|jobs| jobs.send(Job { batch, done }));
        if let Some(Err(mpsc::SendError(job))) = sent {
            let _ = job.done.send((
                Err(StoreError::Failed("store thread stopped".into())),
                Duration::ZERO,
            ));
        }
        rx
    }

    /// Finishes submitted jobs and joins the thread.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for StoreWorker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A blocking store that counts its commits and idle calls.
    struct Counting {
        commits: Arc<AtomicUsize>,
        idles: Arc<AtomicUsize>,
    }

    impl MembershipStore for Counting {
        fn load_all(&mut self) -> Result<Vec<StoredExecutor>, StoreError> {
            Ok(Vec::new())
        }

        fn revision_floor(&mut self) -> Result<u64, StoreError> {
            Ok(7)
        }

        fn commit(&mut self, _batch: &Batch) -> Result<(), StoreError> {
            self.commits.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }

        fn idle(&mut self) {
            self.idles.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_store_is_told_it_is_idle_once_per_quiet_spell() {
        let (commits, idles) = (Arc::default(), Arc::<AtomicUsize>::default());
        let store = Counting {
            commits: Arc::clone(&commits),
            idles: Arc::clone(&idles),
        };
        let (mut worker, loaded) = StoreWorker::start(Box::new(store), 100).unwrap();
        assert_eq!((loaded.revision, loaded.reserved), (7, 107));
        let spell = IDLE_AFTER + IDLE_AFTER / 2;
        std::thread::sleep(spell);
        assert_eq!(idles.load(Ordering::SeqCst), 1, "idle after the load");
        std::thread::sleep(spell);
        assert_eq!(idles.load(Ordering::SeqCst), 1, "once per quiet spell");
        let done = worker.submit(Batch::default());
        let (result, _) = done.blocking_recv().unwrap();
        result.unwrap();
        assert_eq!(idles.load(Ordering::SeqCst), 1, "not while working");
        std::thread::sleep(spell);
        assert_eq!(idles.load(Ordering::SeqCst), 2, "idle after the commit");
        // The revision reservation at start, then the batch.
        assert_eq!(commits.load(Ordering::SeqCst), 2);
        worker.close();
    }
}
