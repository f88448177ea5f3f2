//! One process per cache directory: the disk cache's index lives in the process that owns it,
//! so a second daemon (or a foreground mount) on the same directory would corrupt it.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use rustix::fs::{flock, FlockOperation};

/// Held for as long as the process uses the directory; the kernel releases it when the
/// process exits, however it exits.
#[derive(Debug)]
pub struct CacheDirLock {
    _file: File,
}

impl CacheDirLock {
    /// Takes `dir` (made if missing), or says which process kind holds it.
    pub fn acquire(dir: &Path) -> io::Result<CacheDirLock> {
        let at = |e: io::Error, what: &str| {
            io::Error::new(e.kind(), format!("{what} {}: {e}", dir.display()))
        };
        std::fs::create_dir_all(dir).map_err(|e| at(e, "creating cache dir"))?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(|e| at(e, "opening the lock of cache dir"))?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(CacheDirLock { _file: file }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "cache dir {} is in use by another strata process (a daemon, or a \
                     foreground mount); mount through the daemon, or give this process its \
                     own --cache-dir",
                    dir.display()
                ),
            )),
            Err(e) => Err(at(e.into(), "locking cache dir")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_owner_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = CacheDirLock::acquire(dir.path()).unwrap();
        let second = CacheDirLock::acquire(dir.path()).unwrap_err();
        assert_eq!(second.kind(), io::ErrorKind::ResourceBusy);
        assert!(second
            .to_string()
            .contains("in use by another strata process"));
        drop(first);
        CacheDirLock::acquire(dir.path()).unwrap();
    }
}
