//! The pool that runs pixel work off the async reactor.
//!
//! A fixed set of rayon threads (one per core by default) runs the kernels,
//! so a large image never stalls the tokio threads that serve connections.
//! Kernels that split work across threads use the *current* rayon pool, so a
//! request's parallelism and concurrent requests share these same threads
//! and the process never runs more CPU-bound threads than configured.
//!
//! Admission is bounded: at most `threads + max_queued` jobs are accepted
//! at once; the next one is refused at once with [`WorkerError::Busy`]. A job
//! whose caller has gone away (cancelled RPC) before it starts is skipped.

use std::{panic::AssertUnwindSafe, sync::Arc};

use thiserror::Error;
use tokio::sync::{Semaphore, oneshot};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WorkerError {
    #[error("server is busy: {capacity} image jobs are already running or queued")]
    Busy { capacity: usize },
    #[error("image job failed unexpectedly: {0}")]
    Panicked(String),
    #[error("cannot start {threads} worker threads: {reason}")]
    Start { threads: usize, reason: String },
}

#[derive(Clone)]
pub struct WorkerPool {
    pool: Arc<rayon::ThreadPool>,
    admission: Arc<Semaphore>,
    capacity: usize,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool").field("threads", &self.pool.current_num_threads()).field("capacity", &self.capacity).finish()
    }
}

impl WorkerPool {
    pub fn new(threads: usize, max_queued: usize) -> Result<Self, WorkerError> {
        Self::with_nice(threads, max_queued, 0)
    }

    /// A pool whose threads run `nice` steps below the calling thread's
    /// priority, so that the I/O threads (accepting, TLS, small requests)
    /// are scheduled ahead of long kernels when cores are scarce.
    pub fn with_nice(threads: usize, max_queued: usize, nice: i32) -> Result<Self, WorkerError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("imgsvc-worker-{i}"))
            .start_handler(move |_| lower_thread_priority(nice))
            .build()
            .map_err(|e| WorkerError::Start { threads, reason: e.to_string() })?;
        let capacity = threads + max_queued;
        Ok(Self { pool: Arc::new(pool), admission: Arc::new(Semaphore::new(capacity)), capacity })
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Starts `job` on the pool and returns at once: for jobs the caller
    /// has already admitted (the tenancy scheduler reserves a thread before
    /// it spawns). First in, first out: a job spawned from a worker thread
    /// (the scheduler starts the next job when one ends) would otherwise go
    /// on top of that thread's own stack, and an earlier job spawned there
    /// for another tenant could wait behind every later one until another
    /// thread steals it. A panic in `job` is the job's to catch.
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        self.pool.spawn_fifo(job);
    }

    /// Runs `job` on the pool and waits for its result.
    pub async fn run<R, F>(&self, job: F) -> Result<R, WorkerError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let permit = self.admission.clone().try_acquire_owned().map_err(|_| WorkerError::Busy { capacity: self.capacity })?;
        let (tx, rx) = oneshot::channel();
        self.pool.spawn(move || {
            if tx.is_closed() {
                return; // the caller was cancelled while the job waited
            }
            let result = std::panic::catch_unwind(AssertUnwindSafe(job));
            // Free the slot before answering, so a caller that submits its
            // next job as soon as it has this result is not refused.
            drop(permit);
            let _ = tx.send(result);
        });
        match rx.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(panic)) => Err(WorkerError::Panicked(panic_message(&panic))),
            Err(_) => Err(WorkerError::Panicked("worker dropped the job".into())),
        }
    }
}

/// Adds `nice` to the calling thread's nice value. Raising it needs no
/// privilege; failure only costs latency, so it is logged, not fatal.
#[cfg(target_os = "linux")]
fn lower_thread_priority(nice: i32) {
    use rustix::{process, thread};
    if nice == 0 {
        return;
    }
    // On Linux, PRIO_PROCESS with a thread id sets that one thread's value.
    let tid = Some(thread::gettid());
    let result = process::getpriority_process(tid).and_then(|current| process::setpriority_process(tid, (current + nice).min(19)));
    if let Err(error) = result {
        tracing::warn!(nice, %error, "cannot lower the worker thread's priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_thread_priority(_nice: i32) {}

pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[tokio::test]
    async fn runs_job_and_returns_value() {
        let pool = WorkerPool::new(1, 1).unwrap();
        assert_eq!(pool.run(|| 6 * 7).await, Ok(42));
    }

    #[tokio::test]
    async fn refuses_jobs_beyond_threads_plus_queue() {
        let pool = WorkerPool::new(1, 1).unwrap();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (started_tx, started_rx) = oneshot::channel();
        // Occupies the only thread until released.
        let blocker = tokio::spawn({
            let pool = pool.clone();
            async move {
                pool.run(move || {
                    let _ = started_tx.send(());
                    release_rx.recv().unwrap();
                })
                .await
            }
        });
        started_rx.await.unwrap();
        let queued = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(|| 1).await }
        });
        // Wait until the queued job holds its permit.
        while pool.admission.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(pool.run(|| 2).await, Err(WorkerError::Busy { capacity: 2 }));
        release_tx.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        assert_eq!(queued.await.unwrap(), Ok(1));
        assert_eq!(pool.run(|| 3).await, Ok(3));
    }

    #[tokio::test]
    async fn a_panicking_job_is_reported_and_the_pool_keeps_working() {
        let pool = WorkerPool::new(1, 0).unwrap();
        let err = pool.run(|| -> u8 { panic!("kernel bug") }).await.unwrap_err();
        assert_eq!(err, WorkerError::Panicked("kernel bug".into()));
        assert_eq!(pool.run(|| 5).await, Ok(5));
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn worker_threads_run_below_the_callers_priority() {
        fn own_nice() -> i32 {
            rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
        }
        let caller = own_nice();
        let pool = WorkerPool::with_nice(1, 0, 3).unwrap();
        assert_eq!(pool.run(own_nice).await, Ok((caller + 3).min(19)));
        let plain = WorkerPool::new(1, 0).unwrap();
        assert_eq!(plain.run(own_nice).await, Ok(caller));
    }
}
