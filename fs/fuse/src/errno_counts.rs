//! Error replies counted by errno, per mount and for the whole process: what an operator
//! reads to tell a function probing for files (ENOENT) from a store going bad (EIO).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Linux errnos are below this; anything else is counted in one more slot.
const SLOTS: usize = 134;

pub struct ErrnoCounts {
    counts: [AtomicU64; SLOTS + 1],
    /// Counted there too (the daemon's total of its mounts').
    parent: Option<Arc<ErrnoCounts>>,
}

impl ErrnoCounts {
    pub fn new(parent: Option<Arc<ErrnoCounts>>) -> ErrnoCounts {
        ErrnoCounts {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            parent,
        }
    }

    pub fn count(&self, errno: i32) {
        let slot = usize::try_from(errno).map_or(SLOTS, |e| e.min(SLOTS));
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        if let Some(parent) = &self.parent {
            parent.count(errno);
        }
    }

    /// The errnos answered at least once, by name (`ENOENT`), with how often.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts
            .iter()
            .enumerate()
            .filter_map(|(errno, n)| {
                let n = n.load(Ordering::Relaxed);
                (n > 0).then(|| (name(errno), n))
            })
            .collect()
    }
}

impl Default for ErrnoCounts {
    fn default() -> ErrnoCounts {
        ErrnoCounts::new(None)
    }
}

fn name(errno: usize) -> String {
    if errno >= SLOTS {
        return "other".into();
    }
    let known = match errno as i32 {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::E2BIG => "E2BIG",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::ETXTBSY => "ETXTBSY",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ESTALE => "ESTALE",
        libc::EDQUOT => "EDQUOT",
        libc::ECANCELED => "ECANCELED",
        _ => "",
    };
    if known.is_empty() {
        format!("errno {errno}")
    } else {
        known.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_name_here_and_in_the_parent() {
        let total = Arc::new(ErrnoCounts::default());
        let a = ErrnoCounts::new(Some(Arc::clone(&total)));
        let b = ErrnoCounts::new(Some(Arc::clone(&total)));
        a.count(libc::ENOENT);
        a.count(libc::ENOENT);
        b.count(libc::EIO);
        b.count(-3);
        b.count(100_000);
        b.count(libc::EHWPOISON);
        assert_eq!(a.snapshot(), BTreeMap::from([("ENOENT".to_string(), 2)]));
        let all = total.snapshot();
        assert_eq!(all["ENOENT"], 2);
        assert_eq!(all["EIO"], 1);
        assert_eq!(all["other"], 2);
        assert_eq!(all[&format!("errno {}", libc::EHWPOISON)], 1);
    }
}
