//! Threads that do background work's CPU-heavy part (decompressing and hashing fetched chunks,
//! writing them to disk) at a low CPU priority.
//!
//! The background budget ([`crate::chunk_cache`]'s gate) keeps background GETs from getting
//! ahead of a function's reads at the store, but once their bytes arrive, decoding them costs
//! as much CPU as a read's. On a small host (two cores shared by the function, the daemon and
//! a store or network stack) that work, run on tokio's blocking pool at normal priority, delays
//! the daemon's FUSE threads and so every request of every mount. Here it runs at nice
//! [`NICE`]: it still gets the cores when they are idle, and yields them to everything else
//! when they are not. Only work that no reader waits on comes here; a run a reader joins
//! decodes on the normal pool.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// The niceness of the pool's threads: a weight about a tenth of a normal thread's, so a busy
/// host still gives background work a little time (it is never starved outright, as
/// `SCHED_IDLE` would be, and a reader that joins a background fetch late does not wait for
/// ever).
const NICE: i32 = 10;

pub(crate) struct LowPriorityPool {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl LowPriorityPool {
    /// Starts `threads` threads; they end once the pool is dropped and their queue is empty.
    pub(crate) fn new(threads: usize) -> std::io::Result<LowPriorityPool> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("strata-bg-{i}"))
                .spawn(move || {
                    // Linux keeps a niceness per thread: this lowers only this one. A host
                    // that refuses (a seccomp policy, say) runs the work at normal priority.
                    if let Err(e) =
                        rustix::process::setpriority_process(Some(rustix::thread::gettid()), NICE)
                    {
                        tracing::debug!("background threads keep normal priority: {e}");
                    }
                    loop {
                        let job = {
                            let rx = rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                            rx.recv()
                        };
                        let Ok(job) = job else { return };
                        // A panicking job loses its answer (its caller sees it as failed),
                        // not the thread.
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                    }
                })?;
        }
        Ok(LowPriorityPool {
            jobs: Mutex::new(tx),
        })
    }

    /// Runs `f` on the pool; `None` if it panicked.
    pub(crate) async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send(job);
        // The threads live as long as the pool, so a send fails only if every thread failed
        // to start, which `new` reports.
        sent.ok()?;
        rx.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_at_low_priority_and_a_panic_is_an_answer() {
        let pool = LowPriorityPool::new(2).unwrap();
        let nice = pool
            .run(|| rustix::process::getpriority_process(Some(rustix::thread::gettid())))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(nice, NICE, "the pool's threads run at nice {NICE}");
        assert_eq!(pool.run(|| 6 * 7).await, Some(42));
        assert_eq!(pool.run(|| -> u32 { panic!("a bad job") }).await, None);
        // The threads survive a panicking job.
        let sums = futures::future::join_all((0..8u64).map(|i| pool.run(move || i * 2))).await;
        assert_eq!(sums, (0..8u64).map(|i| Some(i * 2)).collect::<Vec<_>>());
    }
}
