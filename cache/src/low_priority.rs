//! Threads that do background work's CPU-heavy part (decompressing and hashing fetched chunks)
//! at a low CPU priority.
//!
//! The background budget ([`crate::chunk_cache`]'s gate) keeps background GETs from getting
//! ahead of a function's reads at the store, but once their bytes arrive, decoding them costs
//! as much CPU as a read's. On a small host (two cores shared by the function, the daemon and
//! a store or network stack) that work, run on tokio's blocking pool at normal priority, delays
//! the daemon's FUSE threads and so every request of every mount. Here it runs [`NICE`] steps
//! nicer than the daemon: it still gets the cores when they are idle, and yields them to
//! everything else when they are not. Only work that no reader waits on comes here, and a job
//! still queued when a reader starts waiting for it moves to tokio's blocking pool
//! ([`LowPriorityPool::run_unless`]). The jobs take no lock a FUSE thread needs (a descheduled
//! low-priority thread holding one would stall that thread): writing to the disk cache stays
//! at normal priority.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// How much nicer than the daemon the pool's threads are (up to 19): a weight about a tenth of
/// the daemon's, so a busy host still gives background work a little time (it is never starved
/// outright, as under `SCHED_IDLE`).
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
                    let me = Some(rustix::thread::gettid());
                    let lowered = rustix::process::getpriority_process(me).and_then(|now| {
                        rustix::process::setpriority_process(me, (now + NICE).min(19))
                    });
                    if let Err(e) = lowered {
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

    /// Runs `f` on the pool; `None` if it panicked. If `urgent` is set (a reader now waits for
    /// the result; whoever sets it notifies `changed`) while `f` is still queued, `f` runs on
    /// tokio's blocking pool instead, at normal priority.
    pub(crate) async fn run_unless<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
        urgent: &AtomicBool,
        changed: &tokio::sync::Notify,
    ) -> Option<R> {
        // Whichever side takes the job first runs it.
        let job = Arc::new(Mutex::new(Some(f)));
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let queued = Arc::clone(&job);
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send(Box::new(move || {
                let f = queued
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take();
                if let Some(f) = f {
                    let _ = tx.send(f());
                }
            }));
        // The threads live as long as the pool, so a send fails only if every thread failed
        // to start, which `new` reports; the job is then run below.
        let take = || {
            job.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
        };
        if sent.is_err() {
            return tokio::task::spawn_blocking(take()?).await.ok();
        }
        loop {
            let woken = changed.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if urgent.load(Ordering::Acquire) {
                if let Some(f) = take() {
                    return tokio::task::spawn_blocking(f).await.ok();
                }
                // A pool thread has it already: wait for its answer.
                return rx.await.ok();
            }
            tokio::select! {
                answer = &mut rx => return answer.ok(),
                _ = woken => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run<R: Send + 'static>(
        pool: &LowPriorityPool,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Option<R> {
        let never = AtomicBool::new(false);
        pool.run_unless(f, &never, &tokio::sync::Notify::new())
            .await
    }

    fn nice() -> i32 {
        rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
    }

    #[tokio::test]
    async fn jobs_run_at_low_priority_and_a_panic_is_an_answer() {
        let pool = LowPriorityPool::new(2).unwrap();
        let base = nice();
        assert_eq!(
            run(&pool, nice).await,
            Some((base + NICE).min(19)),
            "the pool's threads run {NICE} steps nicer"
        );
        assert!(
            base < 19,
            "a test run at nice 19 cannot tell the priorities apart"
        );
        assert_eq!(run(&pool, || 6 * 7).await, Some(42));
        assert_eq!(run(&pool, || -> u32 { panic!("a bad job") }).await, None);
        // The threads survive a panicking job.
        let sums = futures::future::join_all((0..8u64).map(|i| run(&pool, move || i * 2))).await;
        assert_eq!(sums, (0..8u64).map(|i| Some(i * 2)).collect::<Vec<_>>());
    }

    /// A queued job whose result a reader starts waiting for runs at once, at normal priority,
    /// even while every pool thread is busy.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_queued_job_moves_to_normal_priority_when_it_becomes_urgent() {
        let pool = Arc::new(LowPriorityPool::new(1).unwrap());
        let base = nice();
        // Keep the only pool thread busy until told.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
        let busy = {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move {
                run(&pool, move || {
                    let _ = started_tx.send(());
                    held.recv().is_ok()
                })
                .await
            })
        };
        started.await.unwrap();
        let urgent = Arc::new(AtomicBool::new(false));
        let changed = Arc::new(tokio::sync::Notify::new());
        let queued = {
            let (pool, urgent, changed) = (Arc::clone(&pool), urgent.clone(), changed.clone());
            tokio::spawn(async move { pool.run_unless(nice, &urgent, &changed).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            !queued.is_finished(),
            "the job waits behind the busy thread"
        );
        urgent.store(true, Ordering::Release);
        changed.notify_waiters();
        let answer = tokio::time::timeout(std::time::Duration::from_secs(10), queued)
            .await
            .expect("an urgent job does not wait for the pool")
            .unwrap();
        assert_eq!(answer, Some(base), "it ran at the daemon's priority");
        release.send(()).unwrap();
        assert_eq!(busy.await.unwrap(), Some(true));
    }
}
