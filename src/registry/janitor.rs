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
//! Must not touch: membership. It runs what it is given; whoever gives it
//! work owns its outcome (a purge answers on a channel).

use std::sync::mpsc;
use std::thread;

type Job = Box<dyn FnOnce() + Send>;

/// The handle to the background thread; the thread ends once every handle
/// is dropped and its queue is empty.
pub struct Janitor {
    jobs: Option<mpsc::Sender<Job>>,
}

impl Janitor {
    /// Starts the thread. If it cannot start, work runs where it is given.
    pub(crate) fn start() -> Self {
        Self::named("registry-janitor")
    }

    /// Starts a thread named `name`.
    pub fn named(name: &str) -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        let started = thread::Builder::new().name(name.into()).spawn(move || {
            lower_priority();
            for job in queue {
                job();
            }
        });
        match started {
            Ok(_) => Self { jobs: Some(jobs) },
            Err(e) => {
                tracing::warn!(error = %e, "no background thread: deferred work runs on the membership loop");
                Self { jobs: None }
            }
        }
    }

    /// Runs `job` on the background thread (here if that thread is gone).
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        let job: Job = Box::new(job);
        let Some(jobs) = &self.jobs else {
            return job();
        };
        if let Err(mpsc::SendError(job)) = jobs.send(job) {
            job();
        }
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
}
