//! A bounded number of pieces of work under way at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// One of at most `max` slots of a shared count, given back when dropped (while unwinding from
/// a panic too). It owns its count, so it can travel with the work into a spawned task.
pub struct Permit(Arc<AtomicUsize>);

impl Permit {
    /// A slot of `taken` if fewer than `max` are taken; `None` otherwise.
    pub fn try_take(taken: &Arc<AtomicUsize>, max: usize) -> Option<Permit> {
        taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit(Arc::clone(taken)))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_max_are_taken_and_each_comes_back_when_dropped() {
        let taken = Arc::new(AtomicUsize::new(0));
        let a = Permit::try_take(&taken, 2).unwrap();
        let b = Permit::try_take(&taken, 2).unwrap();
        assert!(Permit::try_take(&taken, 2).is_none());
        drop(a);
        let c = Permit::try_take(&taken, 2).unwrap();
        let unwound = std::panic::catch_unwind(move || {
            let _held = c;
            panic!("work that fails");
        });
        assert!(unwound.is_err());
        assert_eq!(taken.load(Ordering::Acquire), 1, "b only");
        drop(b);
        assert_eq!(taken.load(Ordering::Acquire), 0);
    }
}
