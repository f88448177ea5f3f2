//! Turns a mount's changes ([`MountTree::changes`]) into the tree a delta layer holds, in
//! memory: changed and new nodes with their attributes, whiteouts for removed names, opaque
//! directories where a directory replaces the layers' one. Published, it gives a delta layer:
//! stacked on the mount's layers, it shows the mounted tree.
//!
//! Nothing is written to disk and no path is ever handed to the kernel, so a tree of any depth
//! or path length stages the same; every walk keeps its own stack on the heap.
//!
//! The directories on the way to a change are staged with their current attributes too (a
//! layer's directory entry carries them). A file whose bytes are all or partly the layers' is
//! staged empty and listed in [`Staged::lower_files`]: the commit points its entry at the
//! layer's chunks instead of reading them again — all of them for a file moved or only changed
//! in its attributes; for a file rewritten in places, the chunks no written block touches,
//! with new chunks for the rest ([`PartialFile`]). Other files' bytes are read through the
//! tree while publishing.

use std::ops::Range;

use super::node::{Body, Data};
use super::{Change, MountTree, NodeKind, Stat, COPY_UP_BLOCK};
use crate::error::FsResult;
use crate::manifest::{EntrySpec, Kind, FLAG_OPAQUE};
use crate::publish::{Source, Walk};
use crate::stack::ROOT_INO;

/// What [`MountTree::stage`] made.
pub struct Staged {
    pub(crate) walk: Walk,
    pub changes: usize,
    /// Files staged empty whose bytes are (mostly) a layer file's, by node of the walk.
    pub(crate) lower_files: Vec<(usize, LowerContent)>,
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
    /// The delta tree of `changes` (from [`MountTree::changes`], in their order: parents
    /// before children).
    pub fn stage(&self, changes: &[Change]) -> FsResult<Staged> {
        let mut st = Stager {
            t: self,
            walk: Walk::default(),
            lower_files: Vec::new(),
            // The directories from the root to the last change: (name, walk node, inode).
            cursor: Vec::new(),
            dirs: Default::default(),
        };
        let root = st.spec_of(ROOT_INO, &self.getattr(ROOT_INO)?)?;
        st.walk.push(Vec::new(), root, Source::Empty, None);
        for change in changes {
            let rel = change.path();
            if rel.is_empty() {
                continue; // the root: staged above, with its current attributes
            }
            let mut names: Vec<&[u8]> = rel.split(|&b| b == b'/').collect();
            let name = names.pop().expect("split gives one part at least");
            let parent = st.enter(&names)?;
            match change {
                Change::Removed { .. } => {
                    let spec = EntrySpec {
                        kind: Some(Kind::Whiteout),
                        ..Default::default()
                    };
                    let w = st.walk.push(name.to_vec(), spec, Source::Empty, None);
                    st.walk.nodes[parent].children.push(w);
                }
                Change::Placed {
                    ino, hides_lower, ..
                } => {
                    if let Some(node) = st.add(parent, name, *ino)? {
                        if *hides_lower && st.walk.nodes[node].spec.kind == Some(Kind::Dir) {
                            st.walk.nodes[node].spec.flags |= FLAG_OPAQUE;
                        }
                        st.add_subtree(node, *ino)?;
                    } else {
                        // A FIFO, socket or device is not committed, but what it replaced
                        // (in the layers, or in an earlier commit of the mount) is gone:
                        // a whiteout says so, and hides nothing where nothing was.
                        let spec = EntrySpec {
                            kind: Some(Kind::Whiteout),
                            ..Default::default()
                        };
                        let w = st.walk.push(name.to_vec(), spec, Source::Empty, None);
                        st.walk.nodes[parent].children.push(w);
                    }
                }
                // A directory changed in place keeps its children from the layers.
                Change::Changed { ino, .. } => {
                    st.add(parent, name, *ino)?;
                }
            }
        }
        Ok(Staged {
            walk: st.walk,
            changes: changes.len(),
            lower_files: st.lower_files,
        })
    }

    /// How a commit can reuse the layers' chunks for file `ino`, if it can.
    fn lower_content(&self, ino: u64, s: &Stat) -> Option<LowerContent> {
        let (layer, entry) = self.stack.file_source(ino)?;
        if self.stack.foreign(layer) {
            return None;
        }
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
}

/// Builds the delta tree.
struct Stager<'a> {
    t: &'a MountTree,
    walk: Walk,
    lower_files: Vec<(usize, LowerContent)>,
    cursor: Vec<(Vec<u8>, usize, u64)>,
    /// The directories in the walk by (parent walk node, name): a change inside a directory
    /// staged before (placed whole, or on the way) must go into that one.
    dirs: std::collections::HashMap<(usize, Vec<u8>), usize>,
}

impl Stager<'_> {
    /// The layer entry of node `ino` (attributes `s`), without its children or bytes.
    fn spec_of(&self, ino: u64, s: &Stat) -> FsResult<EntrySpec> {
        let secs = |t: std::time::SystemTime| match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
            Err(e) => {
                let d = e.duration();
                let (mut sec, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                (sec, nsec)
            }
        };
        let (mtime_sec, mtime_nsec) = secs(s.mtime);
        let mut xattrs = Vec::new();
        for name in self.t.listxattr(ino)? {
            if let Some(value) = self.t.getxattr(ino, &name)? {
                xattrs.push((name, value));
            }
        }
        xattrs.sort();
        let mut spec = EntrySpec {
            kind: None,
            mode: s.perm & 0o7777,
            uid: s.uid,
            gid: s.gid,
            mtime_sec,
            mtime_nsec,
            xattrs,
            ..Default::default()
        };
        match s.kind {
            NodeKind::Dir => spec.kind = Some(Kind::Dir),
            NodeKind::File => {
                spec.kind = Some(Kind::File);
                spec.size = s.size;
            }
            NodeKind::Symlink => {
                spec.kind = Some(Kind::Symlink);
                spec.symlink_target = self.t.readlink(ino)?;
            }
            // Layers hold no FIFOs, sockets or devices: they are not committed.
            _ => {}
        }
        Ok(spec)
    }

    /// The walk node of the directory `names` (from the root), staging the directories on the
    /// way that the last change did not. Changes come parents first and sorted, so the cursor
    /// only moves a little between two of them.
    fn enter(&mut self, names: &[&[u8]]) -> FsResult<usize> {
        let common = self
            .cursor
            .iter()
            .zip(names)
            .take_while(|((have, ..), want)| have.as_slice() == **want)
            .count();
        self.cursor.truncate(common);
        for name in &names[common..] {
            let (parent, parent_ino) = self.cursor.last().map_or((0, ROOT_INO), |c| (c.1, c.2));
            let ino = self.t.lookup(parent_ino, name)?.ino;
            // A directory placed whole is in the walk already, with its subtree.
            let node = match self.dirs.get(&(parent, name.to_vec())) {
                Some(&n) => n,
                None => {
                    let spec = self.spec_of(ino, &self.t.getattr(ino)?)?;
                    let n = self.walk.push(name.to_vec(), spec, Source::Empty, None);
                    self.walk.nodes[parent].children.push(n);
                    self.dirs.insert((parent, name.to_vec()), n);
                    n
                }
            };
            self.cursor.push((name.to_vec(), node, ino));
        }
        Ok(self.cursor.last().map_or(0, |c| c.1))
    }

    /// Adds node `ino` as `name` in walk directory `parent` (a directory without its
    /// children); `None` for a kind layers do not hold.
    fn add(&mut self, parent: usize, name: &[u8], ino: u64) -> FsResult<Option<usize>> {
        let s = self.t.getattr(ino)?;
        let mut spec = self.spec_of(ino, &s)?;
        if spec.kind.is_none() {
            return Ok(None);
        }
        let mut source = Source::Empty;
        let mut link_key = None;
        let mut lower = None;
        if s.kind == NodeKind::File {
            if s.nlink > 1 {
                link_key = Some((0, ino));
            }
            match self.t.lower_content(ino, &s) {
                Some(content) => {
                    spec.size = 0;
                    lower = Some(content);
                }
                None => source = Source::Node(ino),
            }
        }
        let is_dir = spec.kind == Some(Kind::Dir);
        let node = self.walk.push(name.to_vec(), spec, source, link_key);
        self.walk.nodes[parent].children.push(node);
        if is_dir {
            self.dirs.insert((parent, name.to_vec()), node);
        }
        if let Some(content) = lower {
            self.lower_files.push((node, content));
        }
        Ok(Some(node))
    }

    /// Adds the whole subtree of directory `ino` under walk node `node`.
    fn add_subtree(&mut self, node: usize, ino: u64) -> FsResult<()> {
        if self.walk.nodes[node].spec.kind != Some(Kind::Dir) {
            return Ok(());
        }
        let mut pending = vec![(node, ino)];
        while let Some((node, ino)) = pending.pop() {
            for (child, name, kind) in self.t.readdir(ino)? {
                if let Some(c) = self.add(node, &name, child)? {
                    if kind == NodeKind::Dir {
                        pending.push((c, child));
                    }
                }
            }
        }
        Ok(())
    }
}
