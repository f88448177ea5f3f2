//! Writes a mount's changes ([`MountTree::changes`]) out as a directory in the layer
//! convention `publish` reads: changed and new nodes with their attributes, `.wh.NAME` for a
//! removed name, `.wh..wh..opq` in a directory that replaces the layers' one. Publishing that
//! directory gives a delta layer: stacked on the mount's layers, it shows the mounted tree.
//!
//! The directories on the way to a change are written with their current attributes too
//! (a layer's directory entry carries them). A file whose bytes are all or partly the
//! layers' is staged empty and listed in [`Staged::lower_files`]: the commit points its entry
//! at the layer's chunks instead of reading them again — all of them for a file moved or
//! only changed in its attributes; for a file rewritten in places, the chunks no written
//! block touches, with new chunks for the rest ([`PartialFile`]). Other files' bytes are
//! read through the tree and chunked by publish.

use std::ffi::CString;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::node::{Body, Data};
use super::{Change, MountTree, NodeKind, Stat, COPY_UP_BLOCK};
use crate::error::{FsError, FsResult};
use crate::stack::ROOT_INO;

/// Bytes read from the tree at a time while staging a file.
const STAGE_READ: u32 = 1 << 20;

fn io(path: &Path, e: std::io::Error) -> FsError {
    FsError::io(path, e)
}

fn c_path(path: &Path) -> FsResult<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| FsError::InvalidInput(format!("{}: NUL in path", path.display())))
}

/// Gives `path` (already made) the owner, mode, times and xattrs of `s` / `ino`.
fn set_attrs(t: &MountTree, ino: u64, s: &Stat, path: &Path) -> FsResult<()> {
    let c = c_path(path)?;
    // SAFETY: a valid C string; lchown does not follow symlinks.
    if unsafe { libc::lchown(c.as_ptr(), s.uid, s.gid) } != 0 {
        return Err(io(path, std::io::Error::last_os_error()));
    }
    if s.kind != NodeKind::Symlink {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(s.perm))
            .map_err(|e| io(path, e))?;
    }
    for name in t.listxattr(ino)? {
        if let Some(value) = t.getxattr(ino, &name)? {
            let n = CString::new(name)
                .map_err(|_| FsError::InvalidInput("NUL in an xattr name".into()))?;
            // SAFETY: valid C strings and a buffer of the given length.
            let rc = unsafe {
                libc::lsetxattr(
                    c.as_ptr(),
                    n.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            };
            if rc != 0 {
                return Err(io(path, std::io::Error::last_os_error()));
            }
        }
    }
    let ts = |t: std::time::SystemTime| {
        let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        libc::timespec {
            tv_sec: d.as_secs() as i64,
            tv_nsec: d.subsec_nanos() as i64,
        }
    };
    let times = [ts(s.atime), ts(s.mtime)];
    // SAFETY: a valid path and two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(io(path, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// What staging has written so far.
#[derive(Default)]
struct Staging {
    lower_files: Vec<(PathBuf, LowerContent)>,
    /// Files with several names: where the first was staged.
    links: std::collections::HashMap<u64, PathBuf>,
}

/// What [`MountTree::stage_changes`] wrote.
#[derive(Debug, Default)]
pub struct Staged {
    pub changes: usize,
    /// Files staged empty whose bytes are (mostly) a layer file's, by path under the staging
    /// directory.
    pub lower_files: Vec<(PathBuf, LowerContent)>,
}

#[derive(Debug, Clone)]
pub enum LowerContent {
    /// All the bytes of a layer file: (layer index in the stack, entry in its manifest).
    File(usize, u32),
    /// Partly rewritten.
    Partial(PartialFile),
}

/// A layer file rewritten in places, as a commit rebuilds it: the layer's chunks that no
/// written block touches, and the byte ranges in between, read from the tree.
#[derive(Debug, Clone)]
pub struct PartialFile {
    pub ino: u64,
    /// Layer index in the stack the chunks are from.
    pub layer: usize,
    pub segments: Vec<Segment>,
    /// Bytes of the first chunk before the file's start (when the first segment is a
    /// layer chunk shared with the file before it).
    pub skip: u64,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Chunk indices in the layer's manifest.
    Lower(Range<usize>),
    /// File bytes to chunk anew.
    New(Range<u64>),
}

/// The segments of a file of `size` bytes whose first `lower_len` bytes are the layer file's
/// (`entry` of `m`) except the blocks marked `present`.
fn plan_partial(
    m: &crate::manifest::Manifest,
    entry: u32,
    lower_len: u64,
    present: &[bool],
    size: u64,
) -> (Vec<Segment>, u64) {
    let e = m.entry(entry as usize);
    let range = e.content_range();
    let lower_size = e.size;
    let keep_end = lower_len.min(size);
    let touched = |from: u64, to: u64| {
        let first = (from / COPY_UP_BLOCK) as usize;
        let last = to.div_ceil(COPY_UP_BLOCK) as usize;
        (first..last).any(|b| present.get(b).copied().unwrap_or(true))
    };
    let mut segments: Vec<Segment> = Vec::new();
    let mut covered = 0u64;
    for c in m.chunks_for(range.clone()) {
        let chunk = m.chunk(c);
        let start = chunk.offset.max(range.start) - range.start;
        let end = (chunk.offset + chunk.len as u64).min(range.end) - range.start;
        // A chunk running past the file's end holds the next file's bytes: it can only end
        // the file, so only if the size is unchanged.
        let past_end = chunk.offset + chunk.len as u64 > range.end;
        let clean = end <= keep_end && !touched(start, end) && (!past_end || size == lower_size);
        match (clean, segments.last_mut()) {
            (true, Some(Segment::Lower(r))) if r.end == c => r.end = c + 1,
            (true, _) => segments.push(Segment::Lower(c..c + 1)),
            (false, Some(Segment::New(r))) if r.end == start => r.end = end,
            (false, _) => segments.push(Segment::New(start..end)),
        }
        covered = end;
    }
    if covered < size {
        match segments.last_mut() {
            Some(Segment::New(r)) if r.end == covered => r.end = size,
            _ => segments.push(Segment::New(covered..size)),
        }
    }
    // Bytes cut off by a truncate: the last segments may reach past the new size.
    segments.retain_mut(|s| match s {
        Segment::New(r) => {
            r.end = r.end.min(size);
            r.start < r.end
        }
        Segment::Lower(_) => true,
    });
    let skip = match segments.first() {
        Some(Segment::Lower(r)) => range.start - m.chunk(r.start).offset,
        _ => 0,
    };
    (segments, skip)
}

impl MountTree {
    /// Writes this mount's changes under `dest` (an empty directory) for `publish`.
    pub async fn stage_changes(&self, dest: &Path) -> FsResult<Staged> {
        self.stage(dest, &self.changes()?).await
    }

    /// Writes `changes` (from [`MountTree::changes`]) under `dest`.
    pub async fn stage(&self, dest: &Path, changes: &[Change]) -> FsResult<Staged> {
        let mut out = Staging::default();
        // Directories get their attributes last, children first: writing into a directory
        // changes its mtime. The root always: its entry in the delta is what a mount shows.
        let mut dirs = vec![(dest.to_path_buf(), ROOT_INO)];
        for change in changes {
            let rel = change.path();
            let (parent_rel, name) = match rel.iter().rposition(|&b| b == b'/') {
                Some(i) => (&rel[..i], &rel[i + 1..]),
                None => (&rel[..0], rel),
            };
            let parent = self.stage_parents(dest, parent_rel, &mut dirs)?;
            match change {
                Change::Removed { .. } => {
                    let marker = parent.join(std::ffi::OsStr::from_bytes(
                        &[b".wh.".as_slice(), name].concat(),
                    ));
                    std::fs::write(&marker, b"").map_err(|e| io(&marker, e))?;
                }
                Change::Placed {
                    ino, hides_lower, ..
                } => {
                    let path = parent.join(std::ffi::OsStr::from_bytes(name));
                    self.stage_node(*ino, &path, true, &mut dirs, &mut out)
                        .await?;
                    if *hides_lower && self.getattr(*ino)?.kind == NodeKind::Dir {
                        let marker = path.join(".wh..wh..opq");
                        std::fs::write(&marker, b"").map_err(|e| io(&marker, e))?;
                    }
                }
                Change::Changed { .. } if rel.is_empty() => {} // the root: below
                Change::Changed { ino, .. } => {
                    let path = parent.join(std::ffi::OsStr::from_bytes(name));
                    // A directory changed in place keeps its children from the layers.
                    self.stage_node(*ino, &path, false, &mut dirs, &mut out)
                        .await?;
                }
            }
        }
        for (path, ino) in dirs.iter().rev() {
            let s = self.getattr(*ino)?;
            set_attrs(self, *ino, &s, path)?;
        }
        let lower_files = out
            .lower_files
            .into_iter()
            .filter_map(|(p, src)| Some((p.strip_prefix(dest).ok()?.to_path_buf(), src)))
            .collect();
        Ok(Staged {
            changes: changes.len(),
            lower_files,
        })
    }

    /// Makes the directories of `rel` under `dest` (their attributes are set at the end).
    fn stage_parents(
        &self,
        dest: &Path,
        rel: &[u8],
        dirs: &mut Vec<(std::path::PathBuf, u64)>,
    ) -> FsResult<std::path::PathBuf> {
        let mut path = dest.to_path_buf();
        let mut ino = ROOT_INO;
        if rel.is_empty() {
            return Ok(path);
        }
        for name in rel.split(|&b| b == b'/') {
            ino = self.lookup(ino, name)?.ino;
            path.push(std::ffi::OsStr::from_bytes(name));
            if !path.exists() {
                std::fs::create_dir(&path).map_err(|e| io(&path, e))?;
                dirs.push((path.clone(), ino));
            }
        }
        Ok(path)
    }

    /// How a commit can reuse the layers' chunks for file `ino`, if it can.
    fn lower_content(&self, ino: u64, s: &Stat) -> Option<LowerContent> {
        let (layer, entry) = self.stack.file_source(ino)?;
        let partial = {
            let tree = self.lock();
            match tree.nodes.get(&ino).map(|n| &n.body) {
                None
                | Some(Body::File {
                    data: Data::Lower, ..
                }) => None,
                Some(Body::File {
                    data: Data::Partial { lower_len, present },
                    ..
                }) => Some((*lower_len, present.clone())),
                Some(_) => return None,
            }
        };
        let Some((lower_len, present)) = partial else {
            return (s.size > 0).then_some(LowerContent::File(layer, entry));
        };
        let m = &self.stack.layers()[layer].manifest;
        let (segments, skip) = plan_partial(m, entry, lower_len, &present, s.size);
        // Nothing of the layer's left to reuse: chunk it like a new file.
        if !segments.iter().any(|s| matches!(s, Segment::Lower(_))) {
            return None;
        }
        Some(LowerContent::Partial(PartialFile {
            ino,
            layer,
            segments,
            skip,
            size: s.size,
        }))
    }

    /// Writes node `ino` at `path`; a directory with its whole subtree when `subtree`.
    async fn stage_node(
        &self,
        ino: u64,
        path: &Path,
        subtree: bool,
        dirs: &mut Vec<(std::path::PathBuf, u64)>,
        out: &mut Staging,
    ) -> FsResult<()> {
        let s = self.getattr(ino)?;
        match s.kind {
            NodeKind::Dir => {
                if !path.exists() {
                    std::fs::create_dir(path).map_err(|e| io(path, e))?;
                    dirs.push((path.to_path_buf(), ino));
                }
                if subtree {
                    for (child, name, _) in self.readdir(ino)? {
                        let child_path = path.join(std::ffi::OsStr::from_bytes(&name));
                        Box::pin(self.stage_node(child, &child_path, true, dirs, out)).await?;
                    }
                }
                return Ok(());
            }
            NodeKind::File => {
                use std::io::Write;
                // A further name of a file staged already: a hard link, as in the mount.
                if let Some(first) = out.links.get(&ino) {
                    std::fs::hard_link(first, path).map_err(|e| io(path, e))?;
                    let content = out
                        .lower_files
                        .iter()
                        .find(|(p, _)| p == first)
                        .map(|(_, c)| c.clone());
                    if let Some(c) = content {
                        out.lower_files.push((path.to_path_buf(), c));
                    }
                    return Ok(());
                }
                if s.nlink > 1 {
                    out.links.insert(ino, path.to_path_buf());
                }
                let mut f = std::fs::File::create(path).map_err(|e| io(path, e))?;
                if let Some(content) = self.lower_content(ino, &s) {
                    out.lower_files.push((path.to_path_buf(), content));
                    drop(f);
                    return set_attrs(self, ino, &s, path);
                }
                let mut offset = 0;
                while offset < s.size {
                    let want = (s.size - offset).min(STAGE_READ as u64) as u32;
                    let data = self.read(ino, offset, want).await?;
                    if data.is_empty() {
                        break;
                    }
                    f.write_all(&data).map_err(|e| io(path, e))?;
                    offset += data.len() as u64;
                }
            }
            NodeKind::Symlink => {
                let target = self.readlink(ino)?;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), path)
                    .map_err(|e| io(path, e))?;
            }
            // Layers hold no FIFOs, sockets or devices: they are not committed.
            _ => return Ok(()),
        }
        set_attrs(self, ino, &s, path)
    }
}
