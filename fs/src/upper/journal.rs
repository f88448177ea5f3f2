//! The upper's journal: its node records, written to `<upper dir>/journal` whenever a process
//! fsyncs, so that a persistent volume's fsync'ed changes outlive a crash of the daemon.
//!
//! The data files already sit in the upper's directory; what a crash loses is the in-memory
//! table saying which inode is which name and where each file's bytes are. On fsync the data
//! file is synced first, then the whole table is written to a temporary file, synced, and
//! renamed over the journal (and the directory synced), so the journal is always one complete
//! snapshot: the last fsync's, or an older one. [`MountTree::recover`] rebuilds a tree from
//! it over the same layer stack (lower inode numbers are fixed by the stack), ready to commit.
//!
//! Writing the whole table is simple and, for the few thousand changed nodes a volume
//! typically holds, cheap (about 100 bytes a node); an fsync that finds the table unchanged
//! since the last snapshot writes nothing.

use std::io::Write;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::node::Node;
use super::{MountTree, Tree, UpperConfig};
use crate::error::{FsError, FsResult};
use crate::stack::LayerStack;

/// The journal's file name in the upper's directory (data files are named in hex).
pub const JOURNAL_FILE: &str = "journal";
const VERSION: u32 = 1;

#[derive(Serialize)]
struct SnapshotRef<'a> {
    version: u32,
    next_ino: u64,
    nodes: Vec<(u64, &'a Node)>,
}

#[derive(Deserialize)]
struct Snapshot {
    version: u32,
    next_ino: u64,
    nodes: Vec<(u64, Node)>,
}

impl MountTree {
    /// Writes the journal if this upper keeps one: a complete, durable snapshot of the
    /// upper's records as they are now.
    pub fn save_journal(&self) -> FsResult<()> {
        let Some(upper) = self.upper.as_ref().filter(|u| u.journal) else {
            return Ok(());
        };
        // One writer at a time, each taking its snapshot after the one before it: the file
        // left behind is never older than a finished fsync.
        let mut last = self.journal_written.lock().unwrap();
        let (unsynced, doomed, bytes) = {
            let mut tree = self.lock();
            let unsynced: Vec<(u64, u64)> = tree.unsynced.iter().map(|(i, g)| (*i, *g)).collect();
            let doomed = std::mem::take(&mut tree.doomed);
            (unsynced, doomed, self.encode_records(&tree)?)
        };
        // The journal may only name bytes that are on disk: other files written since the
        // last snapshot are synced first (a partly copied-up file whose copied blocks were
        // lost would read zeros where the layers' bytes were).
        for (ino, _) in &unsynced {
            let path = self.data_path(*ino)?;
            match std::fs::File::open(&path) {
                Ok(f) => f.sync_data().map_err(|e| FsError::io(&path, e))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {} // removed since
                Err(e) => return Err(FsError::io(&path, e)),
            }
        }
        {
            let mut tree = self.lock();
            for (ino, generation) in &unsynced {
                // Written again since it was synced, or still open (and so maybe written
                // before the next snapshot): it stays.
                if !tree.opens.contains_key(ino) && tree.unsynced.get(ino) == Some(generation) {
                    tree.unsynced.remove(ino);
                }
            }
        }
        let hash = blake3::hash(&bytes);
        let written = if *last == Some(hash) {
            Ok(())
        } else {
            self.write_journal(&upper.dir, &bytes)
        };
        match written {
            Ok(()) => {
                *last = Some(hash);
                // No journal names them any more.
                for p in doomed {
                    let _ = std::fs::remove_file(p);
                }
                Ok(())
            }
            Err(e) => {
                self.lock().doomed.extend(doomed);
                Err(e)
            }
        }
    }

    fn write_journal(&self, upper_dir: &std::path::Path, bytes: &[u8]) -> FsResult<()> {
        let path = upper_dir.join(JOURNAL_FILE);
        let tmp = upper_dir.join(format!("{JOURNAL_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(upper_dir)?.sync_all()
        };
        write().map_err(|e| FsError::io(&path, e))
    }

    /// A hash of the upper's records: equal fingerprints mean no change in between (every
    /// change to a file's bytes also changes its size or mtime).
    pub fn fingerprint(&self) -> FsResult<blake3::Hash> {
        Ok(blake3::hash(&self.encode_records(&self.lock())?))
    }

    fn encode_records(&self, tree: &Tree) -> FsResult<Vec<u8>> {
        let snapshot = SnapshotRef {
            version: VERSION,
            next_ino: self.next_ino.load(std::sync::atomic::Ordering::Relaxed),
            nodes: {
                let mut nodes: Vec<(u64, &Node)> =
                    tree.nodes.iter().map(|(ino, n)| (*ino, n)).collect();
                nodes.sort_unstable_by_key(|(ino, _)| *ino);
                nodes
            },
        };
        rmp_serde::to_vec(&snapshot)
            .map_err(|e| FsError::InvalidInput(format!("encoding the upper journal: {e}")))
    }

    /// Rebuilds the tree a crashed mount left in `upper.dir` from its journal, over the same
    /// layer stack it was mounted with. Nothing is open and the kernel holds no inodes.
    pub fn recover(stack: Arc<LayerStack>, upper: UpperConfig) -> FsResult<MountTree> {
        let path = upper.dir.join(JOURNAL_FILE);
        let bytes = std::fs::read(&path).map_err(|e| FsError::io(&path, e))?;
        let snapshot: Snapshot = rmp_serde::from_slice(&bytes).map_err(|e| {
            FsError::InvalidInput(format!("{}: unreadable upper journal: {e}", path.display()))
        })?;
        if snapshot.version != VERSION {
            return Err(FsError::InvalidInput(format!(
                "{}: unsupported upper journal version {}",
                path.display(),
                snapshot.version
            )));
        }
        // A data file made after the last directory sync may be missing: its file was never
        // fsync'ed, so it reads as zeros (the bytes after a data file's end do).
        for (ino, n) in &snapshot.nodes {
            if let super::node::Body::File { data, .. } = &n.body {
                let path = upper.dir.join(format!("{ino:x}"));
                if !matches!(data, super::node::Data::Lower) && !path.exists() {
                    tracing::warn!("{}: missing after a crash; empty now", path.display());
                    std::fs::File::create(&path).map_err(|e| FsError::io(&path, e))?;
                }
            }
        }
        let tree = MountTree::new(stack, Some(upper))?;
        {
            let mut t: std::sync::MutexGuard<'_, Tree> = tree.lock();
            t.used = snapshot.nodes.iter().map(|(_, n)| n.charged).sum();
            t.nodes = snapshot.nodes.into_iter().collect();
        }
        // Never below an inode the journal holds, whatever it says.
        let next = tree.lock().nodes.keys().max().map_or(0, |i| i + 1);
        tree.next_ino.store(
            snapshot.next_ino.max(next).max(super::FIRST_UPPER_INO),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(tree)
    }
}
