//! The commit gate. A live commit (`strata commit` while the function runs) must commit one
//! moment of the mount, not a file half rewritten while its bytes were being read. So a commit
//! closes the gate: changes already under way finish, new ones wait until the commit has
//! captured the changes and read their bytes (uploading included), then all go on. Reads never
//! wait. Writers wait rather than see an error: a commit is short next to a function's life,
//! and no program expects `EAGAIN` from `write(2)` on a file system.

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<State>,
    opened: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Changes under way.
    passing: usize,
    closed: bool,
}

/// One change under way; the gate cannot close on it.
pub struct Pass<'a>(&'a Gate);

/// The gate closed: no change starts until this is dropped.
pub struct Closed<'a>(&'a Gate);

impl Gate {
    /// Waits (blocking: changes come on the file system's own threads) while the gate is
    /// closed, then lets one change through.
    pub fn pass(&self) -> Pass<'_> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while s.closed {
            s = self.opened.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        s.passing += 1;
        Pass(self)
    }

    /// Closes the gate and waits for the changes under way to finish. Async and polling, so
    /// that a commit on a runtime thread never blocks it.
    pub async fn close(&self) -> Closed<'_> {
        loop {
            {
                let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                if !s.closed {
                    s.closed = true;
                    break;
                }
            }
            // Another commit holds it: one at a time.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let closed = Closed(self);
        while self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .passing
            > 0
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        closed
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.passing -= 1;
    }
}

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.closed = false;
        self.0.opened.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn a_closed_gate_waits_for_changes_under_way_and_holds_new_ones() {
        let gate = Arc::new(Gate::default());
        let under_way = gate.pass();
        let closing = {
            let gate = Arc::clone(&gate);
            tokio::spawn(async move {
                let _closed = gate.close().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !closing.is_finished(),
            "closed while a change was under way"
        );
        drop(under_way);
        // A change that starts now waits for the commit.
        while !gate.state.lock().unwrap().closed {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let passed = Arc::new(AtomicBool::new(false));
        let writer = {
            let (gate, passed) = (Arc::clone(&gate), Arc::clone(&passed));
            std::thread::spawn(move || {
                let _p = gate.pass();
                passed.store(true, Ordering::SeqCst);
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            !passed.load(Ordering::SeqCst),
            "a change went through a closed gate"
        );
        closing.await.unwrap();
        writer.join().unwrap();
        assert!(passed.load(Ordering::SeqCst));
    }
}
