//! Background work that must never take a CPU from a heartbeat.
//!
//! Owns: a thread at the lowest scheduling priority (`SCHED_IDLE` on
//! Linux, the lowest nice value elsewhere) that runs the work it is given
//! in order. The membership loop's ([`Janitor::start`]) runs its deferred
//! work: rebuilding the member map without a mass expiry's tombstones, and
//! dropping replaced snapshots, maps and history events (an atomic
//! decrement per member on random cache lines, and the frees of departed
//! entries); the server's encodes watchers' snapshot chunks. On a machine with as many busy threads as
//! cores, work at normal priority preempts the threads that answer
//! heartbeats for milliseconds at a time; at idle priority it runs only on
//! a core nothing else wants, and is preempted at once when a heartbeat
//! needs it.
//!
//! If the priority cannot be lowered (a platform without it, a sandbox
//! that forbids it) the thread runs at normal priority, with a warning.
//!
//! On a machine whose cores are busy all the time, an idle-priority thread
//! gets a sliver of CPU, and what it has yet to drop stays in memory (a
//! churn benchmark beside a full build grew by 460 MB instead of 70). Work
//! given with [`Janitor::run_or_here`] therefore runs where it is given
//! once [`MAX_QUEUED`] jobs wait: the caller pays for it then, and memory
//! stays bounded.
//!
//! Must not touch: membership. It runs what it is given; whoever gives it
//! work owns its outcome (a purge answers on a channel).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;

type Job = Box<dyn FnOnce() + Send>;

/// Jobs waiting past which [`Janitor::run_or_here`] runs them in place.
pub const MAX_QUEUED: usize = 1_024;

/// The handle to the background thread; the thread ends once every handle
/// is dropped and its queue is empty.
pub struct Janitor {
    jobs: Option<mpsc::Sender<Job>>,
    /// Jobs given and not yet finished.
    queued: Arc<AtomicUsize>,
}

impl Janitor {
    /// Starts the thread. If it cannot start, work runs where it is given.
    pub(crate) fn start() -> Self {
        Self::named("registry-janitor")
    }

    /// Starts a thread named `name`.
    pub fn named(name: &str) -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queued = Arc::new(AtomicUsize::new(0));
        let done = queued.clone();
        let started = thread::Builder::new().name(name.into()).spawn(move || {
            lower_priority();
            for job in queue {
                job();
                done.fetch_sub(1, Ordering::Relaxed);
            }
        });
        match started {
            Ok(_) => Self {
                jobs: Some(jobs),
                queued,
            },
            Err(e) => {
                tracing::warn!(error = %e, "no background thread: deferred work runs where it is given");
                Self { jobs: None, queued }
            }
        }
    }

    /// Runs `job` on the background thread, however many wait before it
    /// (here if that thread is gone).
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        let job: Job = Box::new(job);
        let Some(jobs) = &self.jobs else {
            return job();
        };
        self.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(mpsc::SendError(job)) = jobs.send(job) {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            job();
        }
    }

    /// [`Self::run`], or runs `job` here when [`MAX_QUEUED`] jobs already
    /// wait (the thread is starved of CPU).
    pub fn run_or_here(&self, job: impl FnOnce() + Send + 'static) {
        if self.queued() >= MAX_QUEUED {
            job();
        } else {
            self.run(job);
        }
    }

    /// Jobs given and not yet finished.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

/// The calling thread at the lowest priority its platform offers.
fn lower_priority() {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    #[cfg(target_os = "linux")]
    let lowered = set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Min,
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
    );
    #[cfg(not(target_os = "linux"))]
    let lowered = thread_priority::set_current_thread_priority(ThreadPriority::Min);
    if let Err(e) = lowered {
        tracing::warn!(error = ?e, "the background thread runs at normal priority: it may delay heartbeats on a busy machine");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_in_order_off_the_calling_thread_at_idle_priority() {
        let janitor = Janitor::start();
        let (tx, rx) = mpsc::channel();
        for n in 0..100 {
            let tx = tx.clone();
            janitor.run(move || {
                let _ = tx.send((n, thread::current().name().map(str::to_owned)));
            });
        }
        let got: Vec<_> = (0..100).map(|_| rx.recv().expect("a job ran")).collect();
        assert!(got.iter().enumerate().all(|(i, (n, _))| *n == i));
        assert!(
            got.iter()
                .all(|(_, name)| name.as_deref() == Some("registry-janitor"))
        );
        #[cfg(target_os = "linux")]
        {
            let (tx, rx) = mpsc::channel();
            janitor.run(move || {
                let policy = thread_priority::thread_schedule_policy();
                let _ = tx.send(policy.ok());
            });
            assert_eq!(
                rx.recv().expect("a job ran"),
                Some(thread_priority::ThreadSchedulePolicy::Normal(
                    thread_priority::NormalThreadSchedulePolicy::Idle
                ))
            );
        }
    }

    #[test]
    fn past_the_queue_bound_work_runs_where_it_is_given() {
        let janitor = Janitor::named("registry-test-janitor");
        // Hold the thread until released: everything else waits.
        let (release, held) = mpsc::channel::<()>();
        janitor.run(move || {
            let _ = held.recv();
        });
        let here = thread::current().id();
        let (tx, rx) = mpsc::channel();
        for _ in 0..MAX_QUEUED + 10 {
            let tx = tx.clone();
            janitor.run_or_here(move || {
                let _ = tx.send(thread::current().id() == here);
            });
        }
        // The first MAX_QUEUED - 1 queued behind the held job; the rest ran
        // here, at once.
        let ran_here: Vec<bool> = (0..11).map(|_| rx.recv().expect("ran here")).collect();
        assert!(ran_here.iter().all(|&h| h), "{ran_here:?}");
        assert_eq!(janitor.queued(), MAX_QUEUED);
        release.send(()).expect("the held job waits");
        let rest: Vec<bool> = (0..MAX_QUEUED - 1)
            .map(|_| rx.recv().expect("ran"))
            .collect();
        assert!(
            rest.iter().all(|&h| !h),
            "the queued ones ran on the thread"
        );
        // Plain `run` always queues.
        let (tx, rx) = mpsc::channel();
        janitor.run(move || {
            let _ = tx.send(thread::current().id() == here);
        });
        assert_eq!(rx.recv(), Ok(false));
    }
}
