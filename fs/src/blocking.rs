//! Blocking work called from async code: commits journal, hash and stage an upper, the
//! daemon mounts and unmounts; none of it may hold a runtime worker that other mounts' reads
//! and the control socket are waiting on.

/// Runs `f`, which blocks (disk, syscalls, long CPU work), without starving the runtime: on
/// a multi-threaded runtime the worker hands its other tasks to a fresh thread first
/// (`block_in_place`); elsewhere (a current-thread runtime: tests, a foreground command)
/// there is no other task to starve and `f` just runs.
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::blocking;

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn other_tasks_run_while_a_worker_blocks() {
        // Both tasks on the only worker: without block_in_place the second could never run
        // while the first waits for it.
        let waiter = tokio::spawn(async {
            let (tx, rx) = std::sync::mpsc::channel();
            tokio::spawn(async move { tx.send(()).unwrap() });
            blocking(|| rx.recv_timeout(std::time::Duration::from_secs(10)))
        });
        let got = waiter.await.unwrap();
        assert!(got.is_ok(), "the spawned task ran while the worker blocked");
    }

    #[tokio::test]
    async fn runs_inline_on_a_current_thread_runtime() {
        assert_eq!(blocking(|| 7), 7);
    }
}
