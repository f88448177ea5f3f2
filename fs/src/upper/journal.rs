//! The upper's journal: its node records, kept in `<upper dir>/journal` and brought up to date
//! whenever a process fsyncs, so that a persistent volume's fsync'ed changes outlive a crash
//! of the daemon.
//!
//! The data files already sit in the upper's directory; what a crash loses is the in-memory
//! table saying which inode is which name and where each file's bytes are. On fsync the data
//! files written since the last journal update are synced first; then the records changed
//! since then are appended to the journal as one frame and the journal is synced. Every so
//! often (when the appended frames outgrow the last full snapshot) the whole table is written
//! instead, to a temporary file that is synced and renamed over the journal.
//!
//! The file: the magic `STRATAJ2`, then frames, each `[u32 LE payload length][16 bytes of the
//! payload's BLAKE3][payload]`, the payload a MessagePack [`Frame`]; the first frame is a
//! full snapshot, the others are changes on top of it. A frame cut short or damaged by a
//! crash during its append ends the journal there: its fsync never returned.
//! [`MountTree::recover`] rebuilds a tree from it over the same layer stack (lower inode
//! numbers are fixed by the stack), ready to commit.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::node::{Node, Nodes};
use super::{MountTree, Tree, UpperConfig};
use crate::error::{FsError, FsResult};
use crate::stack::LayerStack;

/// The journal's file name in the upper's directory (data files are named in hex).
pub const JOURNAL_FILE: &str = "journal";
const MAGIC: &[u8; 8] = b"STRATAJ2";
const FRAME_HEAD: usize = 4 + 16;
/// More files than this to sync before a journal update: one `syncfs` instead.
const SYNCFS_FROM: usize = 64;
/// Appended frames may grow to this, or to twice the last snapshot, before a new snapshot.
const APPEND_SLACK: u64 = if cfg!(test) { 16 << 10 } else { 1 << 20 };

#[derive(Serialize)]
enum FrameRef<'a> {
    Snapshot {
        next_ino: u64,
        nodes: Vec<(u64, &'a Node)>,
    },
    Changes {
        next_ino: u64,
        put: Vec<(u64, &'a Node)>,
        gone: Vec<u64>,
    },
}

#[derive(Deserialize)]
enum Frame {
    Snapshot {
        next_ino: u64,
        nodes: Vec<(u64, Node)>,
    },
    Changes {
        next_ino: u64,
        put: Vec<(u64, Node)>,
        gone: Vec<u64>,
    },
}

/// What the journal on disk holds, for the next update.
#[derive(Debug, Default)]
pub(super) struct JournalState {
    /// Bytes of the last snapshot (0: none written yet).
    snapshot: u64,
    /// Bytes appended since.
    appended: u64,
}

fn encode(frame: &FrameRef<'_>) -> FsResult<Vec<u8>> {
    let payload = rmp_serde::to_vec(frame)
        .map_err(|e| FsError::InvalidInput(format!("encoding the upper journal: {e}")))?;
    let mut out = Vec::with_capacity(FRAME_HEAD + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&blake3::hash(&payload).as_bytes()[..16]);
    out.extend_from_slice(&payload);
    Ok(out)
}

fn sorted(tree: &Tree) -> Vec<(u64, &Node)> {
    let mut nodes: Vec<(u64, &Node)> = tree.nodes.iter().map(|(i, n)| (*i, n)).collect();
    nodes.sort_unstable_by_key(|(ino, _)| *ino);
    nodes
}

impl MountTree {
    /// Brings the journal up to date, if this upper keeps one: once it returns, everything
    /// the upper holds now survives a crash.
    pub fn save_journal(&self) -> FsResult<()> {
        let Some(upper) = self.upper.as_ref().filter(|u| u.journal) else {
            return Ok(());
        };
        // One writer at a time, each taking its changes after the one before it: the journal
        // is never older than a finished fsync.
        let mut state = self
            .journal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let next_ino = self.next_ino.load(std::sync::atomic::Ordering::Relaxed);
        let (unsynced, doomed, dirty, frame, full, sync_dir) = {
            let mut tree = self.lock();
            let dirty = tree.nodes.take_dirty();
            let full = state.snapshot == 0 || state.appended > APPEND_SLACK.max(2 * state.snapshot);
            let unsynced: Vec<(u64, u64)> = tree.unsynced.iter().map(|(i, g)| (*i, *g)).collect();
            let doomed = std::mem::take(&mut tree.doomed);
            let sync_dir = std::mem::take(&mut tree.dir_unsynced);
            let frame = if dirty.is_empty() && !full {
                Ok(None) // the records are as the journal has them
            } else if full {
                encode(&FrameRef::Snapshot {
                    next_ino,
                    nodes: sorted(&tree),
                })
                .map(Some)
            } else {
                let mut put = Vec::new();
                let mut gone = Vec::new();
                for ino in &dirty {
                    match tree.nodes.get(ino) {
                        Some(n) => put.push((*ino, n)),
                        None => gone.push(*ino),
                    }
                }
                encode(&FrameRef::Changes {
                    next_ino,
                    put,
                    gone,
                })
                .map(Some)
            };
            (unsynced, doomed, dirty, frame, full, sync_dir)
        };
        let written = frame.and_then(|frame| {
            self.sync_data_files(&unsynced)?;
            if sync_dir {
                // New data files' names must be on disk before a journal names them.
                std::fs::File::open(&upper.dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| FsError::io(&upper.dir, e))?;
            }
            let Some(frame) = frame else {
                return Ok(());
            };
            if full {
                self.write_snapshot(&upper.dir, &frame)?;
                state.snapshot = frame.len() as u64;
                state.appended = 0;
            } else {
                self.append(&upper.dir, &frame)?;
                state.appended += frame.len() as u64;
            }
            Ok(())
        });
        match written {
            Ok(()) => {
                // No journal names them any more.
                remove_all(doomed);
                Ok(())
            }
            Err(e) => {
                // A failed append may have left part of a frame (and a failed sync may have
                // lost pages): the next update writes a whole new snapshot instead of
                // appending after it.
                state.snapshot = 0;
                let mut tree = self.lock();
                tree.doomed.extend(doomed);
                tree.nodes.redirty(dirty);
                tree.dir_unsynced |= sync_dir;
                Err(e)
            }
        }
    }

    /// Syncs the data files written since the last update (the journal may only name bytes
    /// that are on disk: a partly copied-up file whose copied blocks were lost would read
    /// zeros where the layers' bytes were).
    fn sync_data_files(&self, unsynced: &[(u64, u64)]) -> FsResult<()> {
        if unsynced.len() > SYNCFS_FROM {
            // Many files (a tree unpacked, then one fsync): one pass over the file system is
            // far cheaper than a journal commit per file.
            let dir = &self.upper()?.dir;
            let f = std::fs::File::open(dir).map_err(|e| FsError::io(dir, e))?;
            rustix::fs::syncfs(&f).map_err(|e| FsError::io(dir, e.into()))?;
        } else {
            for (ino, _) in unsynced {
                let path = self.data_path(*ino)?;
                match std::fs::File::open(&path) {
                    Ok(f) => f.sync_data().map_err(|e| FsError::io(&path, e))?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {} // removed since
                    Err(e) => return Err(FsError::io(&path, e)),
                }
            }
        }
        let mut tree = self.lock();
        for (ino, generation) in unsynced {
            // Written again since it was synced (every write counts): it stays.
            if tree.unsynced.get(ino) == Some(generation) {
                tree.unsynced.remove(ino);
            }
        }
        Ok(())
    }

    fn write_snapshot(&self, dir: &std::path::Path, frame: &[u8]) -> FsResult<()> {
        let path = dir.join(JOURNAL_FILE);
        let tmp = dir.join(format!("{JOURNAL_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(MAGIC)?;
            f.write_all(frame)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| FsError::io(&path, e))
    }

    fn append(&self, dir: &std::path::Path, frame: &[u8]) -> FsResult<()> {
        let path = dir.join(JOURNAL_FILE);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new().append(true).open(&path)?;
            f.write_all(frame)?;
            f.sync_data()
        };
        write().map_err(|e| FsError::io(&path, e))
    }

    /// A hash of the upper's records: equal fingerprints mean no change in between (every
    /// change to a file's bytes also changes its size or mtime).
    pub fn fingerprint(&self) -> FsResult<blake3::Hash> {
        let tree = self.lock();
        let next_ino = self.next_ino.load(std::sync::atomic::Ordering::Relaxed);
        let bytes = encode(&FrameRef::Snapshot {
            next_ino,
            nodes: sorted(&tree),
        })?;
        Ok(blake3::hash(&bytes))
    }

    /// Rebuilds the tree a crashed mount left in `upper.dir` from its journal, over the same
    /// layer stack it was mounted with. Nothing is open and the kernel holds no inodes.
    pub fn recover(stack: Arc<LayerStack>, upper: UpperConfig) -> FsResult<MountTree> {
        let path = upper.dir.join(JOURNAL_FILE);
        let bytes = std::fs::read(&path).map_err(|e| FsError::io(&path, e))?;
        let bad = |why: &str| {
            FsError::InvalidInput(format!(
                "{}: unreadable upper journal: {why}",
                path.display()
            ))
        };
        let Some(mut rest) = bytes.strip_prefix(MAGIC.as_slice()) else {
            return Err(bad("not a strata journal (bad magic)"));
        };
        let mut nodes: HashMap<u64, Node> = HashMap::new();
        let mut next_ino = 0;
        let mut frames = 0;
        while !rest.is_empty() {
            let Some((len, hash, payload)) = split_frame(rest) else {
                tracing::warn!(
                    "{}: the last {} bytes are a frame cut short by the crash; ignored",
                    path.display(),
                    rest.len()
                );
                break;
            };
            if blake3::hash(payload).as_bytes()[..16] != *hash {
                tracing::warn!(
                    "{}: frame {} is damaged (a crash while appending it); the journal ends before it",
                    path.display(),
                    frames + 1
                );
                break;
            }
            let frame: Frame = rmp_serde::from_slice(payload)
                .map_err(|e| bad(&format!("frame {}: {e}", frames + 1)))?;
            match (frames, frame) {
                (
                    0,
                    Frame::Snapshot {
                        next_ino: n,
                        nodes: all,
                    },
                ) => {
                    next_ino = n;
                    nodes = all.into_iter().collect();
                }
                (0, Frame::Changes { .. }) => return Err(bad("it does not start with a snapshot")),
                (_, Frame::Snapshot { .. }) => return Err(bad("a second snapshot")),
                (
                    _,
                    Frame::Changes {
                        next_ino: n,
                        put,
                        gone,
                    },
                ) => {
                    next_ino = next_ino.max(n);
                    for ino in gone {
                        nodes.remove(&ino);
                    }
                    nodes.extend(put);
                }
            }
            frames += 1;
            rest = &rest[FRAME_HEAD + len..];
        }
        if frames == 0 {
            return Err(bad("no complete snapshot"));
        }
        // A data file made after the last directory sync may be missing: its file was never
        // fsync'ed, so it reads as zeros (the bytes after a data file's end do).
        // Bytes written past the journaled size before the crash must not come back when
        // the file grows again: data files are cut to their recorded size.
        for (ino, n) in &nodes {
            if let super::node::Body::File { data, .. } = &n.body {
                if matches!(data, super::node::Data::Lower) {
                    continue;
                }
                let path = upper.dir.join(format!("{ino:x}"));
                if !path.exists() {
                    tracing::warn!("{}: missing after a crash; empty now", path.display());
                }
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(|e| FsError::io(&path, e))?;
                let len = f.metadata().map_err(|e| FsError::io(&path, e))?.len();
                if len > n.stat.size {
                    f.set_len(n.stat.size).map_err(|e| FsError::io(&path, e))?;
                }
            }
        }
        let tree = MountTree::new(stack, Some(upper))?;
        {
            let mut t = tree.lock();
            t.used = nodes
                .values()
                .fold(0u64, |sum, n| sum.saturating_add(n.charged));
            // Extra names of files count against the inode limit again (a layer file's own
            // links too: the count errs on the side of the limit).
            t.links = nodes.values().filter(|n| !n.is_dir()).fold(0u64, |sum, n| {
                sum.saturating_add(n.stat.nlink.saturating_sub(1) as u64)
            });
            t.nodes = Nodes::from_recovered(nodes);
        }
        // Never below an inode the journal holds, whatever it says.
        let highest = tree
            .lock()
            .nodes
            .keys()
            .max()
            .map_or(0, |i| i.saturating_add(1));
        tree.next_ino.store(
            next_ino.max(highest).max(super::FIRST_UPPER_INO),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(tree)
    }
}

/// `(payload length, hash, payload)` of the frame at the start of `b`; `None` if cut short.
fn split_frame(b: &[u8]) -> Option<(usize, &[u8; 16], &[u8])> {
    let len = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let hash: &[u8; 16] = b.get(4..FRAME_HEAD)?.try_into().ok()?;
    let payload = b.get(FRAME_HEAD..FRAME_HEAD.checked_add(len)?)?;
    Some((len, hash, payload))
}

fn remove_all(paths: Vec<std::path::PathBuf>) {
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}
