//! The writable upper of a mount: every change to the tree lands here, above the read-only
//! [`LayerStack`], with overlay semantics.
//!
//! The upper keeps its own inode table of the nodes that differ from the layers (new ones,
//! changed ones, and directories whose listing changed). Everything else is answered by the
//! stack, so an untouched dataset costs nothing. A node keeps its inode number when it is
//! first changed ("copied up"), so the kernel's view never moves under a process.
//!
//! - A file's bytes move to a data file under the upper's directory block by block
//!   ([`COPY_UP_BLOCK`]): the first write into a large lower file copies only the blocks it
//!   touches, and unwritten blocks keep coming from the layers.
//! - A directory's listing is taken from the layers on its first change and kept whole from
//!   then on: a deleted lower entry is simply absent (the whiteout), and a directory made
//!   anew where one was removed starts empty (opaque).
//! - Permission checks are the kernel's (`default_permissions`); the rules it leaves to the
//!   filesystem (setgid directories, link counts, times, sticky-free renames) are here.
//!
//! A mount without an upper is read-only: every change answers EROFS.

mod changes;
#[cfg(test)]
mod changes_tests;
mod data;
pub mod gate;
mod journal;
mod node;
mod stage;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

pub use changes::Change;
pub use journal::JOURNAL_FILE;
use node::{Body, Data, Node};
pub use node::{NodeKind, Stat};
pub use stage::{LowerContent, PartialFile, Segment, Staged};

use crate::error::{FsError, FsResult};
use crate::stack::{DirEntry, FileKind, LayerStack};

/// Copy-up granularity: the first write into a lower file copies the blocks it touches.
pub const COPY_UP_BLOCK: u64 = 256 << 10;
/// Inode numbers of nodes made in the upper start here (lower ones stay below 2^48).
const FIRST_UPPER_INO: u64 = 1 << 56;
const NAME_MAX: usize = 255;
/// Links one file may have (ext4's limit).
const LINK_MAX: u32 = 65_000;
const XATTR_NAME_MAX: usize = 255;
const XATTR_SIZE_MAX: usize = 64 << 10;

/// Where an upper keeps its data files, and how much it may hold.
#[derive(Debug, Clone)]
pub struct UpperConfig {
    /// A private directory (the caller makes it and removes it).
    pub dir: PathBuf,
    /// Bytes the data files may take on disk; writes past it answer ENOSPC.
    pub quota: Option<u64>,
    /// Records the upper may hold (nodes it made, and layer nodes it changed): making a node
    /// past it answers ENOSPC. It bounds the daemon's memory for the mount.
    pub inodes: Option<u64>,
    /// Keep a journal of the upper's records in `dir`, written on every fsync, so what was
    /// fsync'ed can be recovered after a crash ([`MountTree::recover`]). Persistent volumes
    /// need it; a scratch that dies with its mount does not.
    pub journal: bool,
}

impl UpperConfig {
    /// An upper in `dir` with no limits and no journal (a scratch).
    pub fn scratch(dir: impl Into<PathBuf>) -> UpperConfig {
        UpperConfig {
            dir: dir.into(),
            quota: None,
            inodes: None,
            journal: false,
        }
    }

    /// An upper in `dir` with no limits and a journal (a volume's).
    pub fn journaled(dir: impl Into<PathBuf>) -> UpperConfig {
        UpperConfig {
            journal: true,
            ..UpperConfig::scratch(dir)
        }
    }
}

/// A mount's capacity, as statfs reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFs {
    /// The layers' bytes plus what the upper may hold.
    pub bytes: u64,
    /// What the upper may still take (the quota's rest, or the disk's free space).
    pub free_bytes: u64,
    /// The layers' entries plus the upper's inode limit.
    pub files: u64,
    /// Inodes the upper may still make; 0 on a read-only mount.
    pub free_files: u64,
}

/// The changes `setattr` asks for.
#[derive(Debug, Default, Clone)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    pub ctime: Option<SystemTime>,
}

#[derive(Debug, Clone, Copy)]
pub enum TimeSet {
    Now,
    At(SystemTime),
}

/// Who makes a node: its owner, unless a setgid directory says otherwise.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// What `make` makes.
struct NewNode {
    kind: NodeKind,
    mode: u32,
    rdev: u32,
    body: Body,
}

impl NewNode {
    fn new(kind: NodeKind, mode: u32, body: Body) -> NewNode {
        NewNode {
            kind,
            mode,
            rdev: 0,
            body,
        }
    }
}

struct Tree {
    nodes: node::Nodes,
    /// Open handles per inode, layer files' included: a node nothing names lives on (with its
    /// data file) until the last one is released.
    opens: std::collections::HashMap<u64, u32>,
    /// How many times the kernel was handed each inode made in the upper: a removed one stays
    /// answerable (`fstat`, `stat .` in a removed directory) until the kernel forgets it.
    lookups: std::collections::HashMap<u64, u64>,
    /// Bytes the data files take (their allocated blocks), plus writes under way.
    used: u64,
    /// Files whose data file may hold bytes not yet on disk (opened for writing or truncated
    /// since the journal was last written), each with a count bumped on every such event;
    /// see [`MountTree::save_journal`].
    unsynced: std::collections::HashMap<u64, u64>,
    /// Data files of removed nodes that the last journal may still name: removed once a
    /// newer journal is written (journaled uppers only).
    doomed: Vec<PathBuf>,
    /// A data file was made since the upper's directory was last synced.
    dir_unsynced: bool,
    /// Names made by `link` that still stand. They count against the inode limit with the
    /// records: each is an entry the daemon keeps, and one file may have 65,000.
    links: u64,
}

impl Tree {
    /// What counts against the inode limit: records and extra names.
    fn counted(&self) -> u64 {
        self.nodes.len() as u64 + self.links
    }

    /// `ino`'s data file may now hold bytes that are not on disk (tracked for the journal
    /// only: a scratch upper is never synced, and must not remember every file it wrote).
    fn mark_unsynced(&mut self, ino: u64) {
        if !self.nodes.journaled() {
            return;
        }
        *self.unsynced.entry(ino).or_insert(0) += 1;
    }
}

/// The mount's tree: read-only layers and, for a writable mount, the upper.
pub struct MountTree {
    stack: Arc<LayerStack>,
    upper: Option<UpperConfig>,
    tree: Mutex<Tree>,
    next_ino: AtomicU64,
    /// What the journal on disk holds (journaled uppers only); also serializes its writers.
    journal: Mutex<journal::JournalState>,
    /// Every change passes it; a live commit closes it while it captures the mount.
    gate: gate::Gate,
}

fn errno(e: i32) -> FsError {
    FsError::Errno(e)
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn check_name(name: &[u8]) -> FsResult<()> {
    if name.len() > NAME_MAX {
        return Err(errno(libc::ENAMETOOLONG));
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(errno(libc::EINVAL));
    }
    Ok(())
}

impl MountTree {
    /// `upper: None` for a read-only mount.
    pub fn new(stack: Arc<LayerStack>, upper: Option<UpperConfig>) -> FsResult<MountTree> {
        if let Some(u) = &upper {
            std::fs::create_dir_all(&u.dir).map_err(|e| FsError::io(&u.dir, e))?;
        }
        let journaled = upper.as_ref().is_some_and(|u| u.journal);
        Ok(MountTree {
            stack,
            upper,
            tree: Mutex::new(Tree {
                nodes: node::Nodes::new(journaled),
                opens: Default::default(),
                lookups: Default::default(),
                used: 0,
                unsynced: Default::default(),
                doomed: Vec::new(),
                dir_unsynced: false,
                links: 0,
            }),
            next_ino: AtomicU64::new(FIRST_UPPER_INO),
            journal: Mutex::new(Default::default()),
            gate: Default::default(),
        })
    }

    /// Holds back every change to the mount until the guard is dropped, once the changes
    /// under way have finished: a commit captures one moment of the mount (see `gate`).
    pub async fn hold_changes(&self) -> gate::Closed<'_> {
        self.gate.close().await
    }

    pub fn stack(&self) -> &Arc<LayerStack> {
        &self.stack
    }

    pub fn is_writable(&self) -> bool {
        self.upper.is_some()
    }

    fn upper(&self) -> FsResult<&UpperConfig> {
        self.upper.as_ref().ok_or(errno(libc::EROFS))
    }

    fn lock(&self) -> MutexGuard<'_, Tree> {
        self.tree
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn data_path(&self, ino: u64) -> FsResult<PathBuf> {
        Ok(self.upper()?.dir.join(format!("{ino:x}")))
    }

    // ----------------------------------------------------------------------------------
    // Reading the tree

    pub fn getattr(&self, ino: u64) -> FsResult<Stat> {
        if self.upper.is_some() {
            if let Some(n) = self.lock().nodes.get(&ino) {
                return Ok(n.stat.clone());
            }
        }
        Ok(Stat::from_lower(&self.stack.getattr(ino)?))
    }

    /// The inode of `name` in directory `parent`, if there is one.
    fn child(&self, tree: &Tree, parent: u64, name: &[u8]) -> FsResult<Option<u64>> {
        match tree.nodes.get(&parent) {
            Some(n) => match &n.body {
                Body::Dir {
                    entries: Some(map), ..
                } => Ok(map.get(name).copied()),
                Body::Dir {
                    lower: Some(lower), ..
                } => self.lower_child(*lower, name),
                Body::Dir { .. } => Ok(None),
                _ => Err(errno(libc::ENOTDIR)),
            },
            None => self.lower_child(parent, name),
        }
    }

    fn lower_child(&self, dir: u64, name: &[u8]) -> FsResult<Option<u64>> {
        match self.stack.lookup(dir, name) {
            Ok(a) => Ok(Some(a.ino)),
            Err(FsError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Stat> {
        if name.len() > NAME_MAX {
            return Err(errno(libc::ENAMETOOLONG));
        }
        if self.upper.is_none() {
            return Ok(Stat::from_lower(&self.stack.lookup(parent, name)?));
        }
        let tree = self.lock();
        let ino = self
            .child(&tree, parent, name)?
            .ok_or_else(|| FsError::NotFound(String::from_utf8_lossy(name).into_owned()))?;
        match tree.nodes.get(&ino) {
            Some(n) => Ok(n.stat.clone()),
            None => Ok(Stat::from_lower(&self.stack.getattr(ino)?)),
        }
    }

    /// A directory's entries, sorted by name (without `.` and `..`).
    pub fn readdir(&self, ino: u64) -> FsResult<Vec<(u64, Vec<u8>, NodeKind)>> {
        let tree = if self.upper.is_some() {
            Some(self.lock())
        } else {
            None
        };
        let lower_listing = |dir: u64| -> FsResult<Vec<(u64, Vec<u8>, NodeKind)>> {
            Ok(self
                .stack
                .readdir(dir)?
                .into_iter()
                .map(|DirEntry { ino, name, kind }| (ino, name, kind.into()))
                .collect())
        };
        let Some(tree) = tree else {
            return lower_listing(ino);
        };
        let entries = match tree.nodes.get(&ino) {
            Some(n) => match &n.body {
                Body::Dir {
                    entries: Some(map), ..
                } => map.clone(),
                Body::Dir {
                    lower: Some(lower), ..
                } => return lower_listing(*lower),
                Body::Dir { .. } => BTreeMap::new(),
                _ => return Err(errno(libc::ENOTDIR)),
            },
            None => return lower_listing(ino),
        };
        entries
            .into_iter()
            .map(|(name, child)| {
                let kind = match tree.nodes.get(&child) {
                    Some(n) => n.stat.kind,
                    None => self.stack.getattr(child)?.kind.into(),
                };
                Ok((child, name, kind))
            })
            .collect()
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        if self.upper.is_some() {
            if let Some(n) = self.lock().nodes.get(&ino) {
                return match &n.body {
                    Body::Symlink(t) => Ok(t.clone()),
                    _ => Err(errno(libc::EINVAL)),
                };
            }
        }
        self.stack.readlink(ino)
    }

    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<Vec<u8>>> {
        if self.upper.is_some() {
            if let Some(n) = self.lock().nodes.get(&ino) {
                return Ok(n.xattrs.keys().cloned().collect());
            }
        }
        self.stack.listxattr(ino)
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Option<Vec<u8>>> {
        if self.upper.is_some() {
            if let Some(n) = self.lock().nodes.get(&ino) {
                return Ok(n.xattrs.get(name).cloned());
            }
        }
        self.stack.getxattr(ino, name)
    }

    /// Whether reads of `ino` are the lower file's bytes (so the stack, its readahead and
    /// passthrough serve them).
    pub fn reads_from_layers(&self, ino: u64) -> bool {
        if self.upper.is_none() {
            return true;
        }
        match self.lock().nodes.get(&ino) {
            None => true,
            Some(n) => matches!(
                n.body,
                Body::File {
                    data: Data::Lower,
                    ..
                }
            ),
        }
    }

    /// What statfs reports.
    pub fn statfs(&self) -> StatFs {
        let (lower_bytes, lower_files) = self.stack.totals();
        let Some(u) = &self.upper else {
            return StatFs {
                bytes: lower_bytes,
                free_bytes: 0,
                files: lower_files,
                free_files: 0,
            };
        };
        let (used, records) = {
            let tree = self.lock();
            (tree.used, tree.counted())
        };
        let disk_free = disk_free(&u.dir).unwrap_or(0);
        let (bytes, free_bytes) = match u.quota {
            Some(q) => (lower_bytes + q, q.saturating_sub(used).min(disk_free)),
            None => (lower_bytes + used + disk_free, disk_free),
        };
        let inodes = u.inodes.unwrap_or(u32::MAX as u64);
        StatFs {
            bytes,
            free_bytes,
            files: lower_files + inodes,
            free_files: inodes.saturating_sub(records),
        }
    }

    // ----------------------------------------------------------------------------------
    // Bringing nodes into the upper

    /// Makes sure `ino` has an upper node (a copy of its lower attributes) and returns it.
    fn node_mut<'t>(&self, tree: &'t mut Tree, ino: u64) -> FsResult<&'t mut Node> {
        use std::collections::hash_map::Entry;
        let slot = match tree.nodes.entry(ino) {
            Entry::Occupied(o) => return Ok(o.into_mut()),
            Entry::Vacant(slot) => slot,
        };
        {
            let a = self.stack.getattr(ino)?;
            let mut stat = Stat::from_lower(&a);
            if stat.kind == NodeKind::Dir {
                // Layers say 1 ("not counted"); from here on the count is kept, so it must
                // start right: 2 plus one per subdirectory.
                let subdirs = self
                    .stack
                    .readdir(ino)?
                    .iter()
                    .filter(|e| e.kind == FileKind::Dir)
                    .count();
                stat.nlink = 2 + subdirs as u32;
            }
            let xattrs = self.stack.xattrs(ino)?.into_iter().collect();
            let body = match stat.kind {
                NodeKind::Dir => Body::Dir {
                    lower: Some(ino),
                    entries: None,
                },
                NodeKind::Symlink => Body::Symlink(self.stack.readlink(ino)?),
                NodeKind::File => Body::File {
                    data: Data::Lower,
                    file: None,
                    write_lock: Default::default(),
                },
                _ => Body::Special,
            };
            Ok(slot.insert(Node {
                stat,
                xattrs,
                body,
                charged: 0,
            }))
        }
    }

    /// The listing of directory `dir`, taken whole from the layers on its first change.
    fn entries_mut<'t>(
        &self,
        tree: &'t mut Tree,
        dir: u64,
    ) -> FsResult<&'t mut BTreeMap<Vec<u8>, u64>> {
        let node = self.node_mut(tree, dir)?;
        let Body::Dir { lower, entries } = &mut node.body else {
            return Err(errno(libc::ENOTDIR));
        };
        if entries.is_none() {
            let listing = match lower {
                Some(l) => self
                    .stack
                    .readdir(*l)?
                    .into_iter()
                    .map(|e| (e.name, e.ino))
                    .collect(),
                None => BTreeMap::new(),
            };
            *entries = Some(listing);
        }
        Ok(entries.as_mut().expect("set above"))
    }

    fn dir_is_empty(&self, tree: &Tree, dir: u64) -> FsResult<bool> {
        match tree.nodes.get(&dir).map(|n| &n.body) {
            Some(Body::Dir {
                entries: Some(m), ..
            }) => Ok(m.is_empty()),
            Some(Body::Dir { lower: Some(l), .. }) => Ok(self.stack.readdir(*l)?.is_empty()),
            Some(Body::Dir { .. }) => Ok(true),
            Some(_) => Err(errno(libc::ENOTDIR)),
            None => Ok(self.stack.readdir(dir)?.is_empty()),
        }
    }

    fn touch_dir(tree: &mut Tree, dir: u64) {
        if let Some(n) = tree.nodes.get_mut(&dir) {
            let t = now();
            n.stat.mtime = t;
            n.stat.ctime = t;
        }
    }

    fn kind_of(&self, tree: &Tree, ino: u64) -> FsResult<NodeKind> {
        match tree.nodes.get(&ino) {
            Some(n) => Ok(n.stat.kind),
            None => Ok(self.stack.getattr(ino)?.kind.into()),
        }
    }

    /// Forgets a node nothing names or holds open any more, and its data file.
    fn drop_if_unused(&self, tree: &mut Tree, ino: u64) {
        let Some(n) = tree.nodes.get(&ino) else {
            return;
        };
        let known = tree.opens.contains_key(&ino) || tree.lookups.contains_key(&ino);
        if n.stat.nlink > 0 || known {
            return;
        }
        let n = tree.nodes.remove(&ino).expect("present");
        tree.used = tree.used.saturating_sub(n.charged);
        if let Body::File { data, .. } = &n.body {
            if !matches!(data, Data::Lower) {
                if let Ok(p) = self.data_path(ino) {
                    if self.upper.as_ref().is_some_and(|u| u.journal) {
                        // The last journal may name it: a crash now must still find it.
                        tree.doomed.push(p);
                    } else {
                        let _ = std::fs::remove_file(p);
                    }
                }
            }
        }
        if ino < FIRST_UPPER_INO {
            // The layers still have this inode: keep a bare record with no links, so it is
            // not found there again.
            let mut stat = n.stat;
            stat.nlink = 0;
            let body = match n.body {
                Body::File { .. } => Body::File {
                    data: Data::Lower,
                    file: None,
                    write_lock: Default::default(),
                },
                Body::Dir { .. } => Body::Dir {
                    lower: None,
                    entries: Some(BTreeMap::new()),
                },
                other => other,
            };
            tree.nodes.insert(
                ino,
                Node {
                    stat,
                    xattrs: BTreeMap::new(),
                    body,
                    charged: 0,
                },
            );
        }
    }

    /// The kernel was handed `ino` (a lookup, or a node made or linked).
    pub fn remember(&self, ino: u64) {
        if self.upper.is_some() && ino >= FIRST_UPPER_INO {
            *self.lock().lookups.entry(ino).or_insert(0) += 1;
        }
    }

    /// The kernel dropped `n` of its references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        if self.upper.is_none() || ino < FIRST_UPPER_INO {
            return;
        }
        let mut tree = self.lock();
        if let Some(count) = tree.lookups.get_mut(&ino) {
            *count = count.saturating_sub(n);
            if *count == 0 {
                tree.lookups.remove(&ino);
                self.drop_if_unused(&mut tree, ino);
            }
        }
    }

    // ----------------------------------------------------------------------------------
    // Changing the tree

    /// Makes a new node `name` in `parent`.
    fn make(&self, parent: u64, name: &[u8], new: NewNode, caller: Caller) -> FsResult<Stat> {
        let _pass = self.gate.pass();
        self.make_passed(parent, name, new, caller)
    }

    /// [`MountTree::make`] for a caller that holds a pass already (passes do not nest: a
    /// commit closing the gate between two would wait on the first while the second waits
    /// on it).
    fn make_passed(
        &self,
        parent: u64,
        name: &[u8],
        new: NewNode,
        caller: Caller,
    ) -> FsResult<Stat> {
        let NewNode {
            kind,
            mode,
            rdev,
            body,
        } = new;
        self.upper()?;
        check_name(name)?;
        let mut tree = self.lock();
        let parent_stat = self.node_mut(&mut tree, parent)?.stat.clone();
        if parent_stat.kind != NodeKind::Dir {
            return Err(errno(libc::ENOTDIR));
        }
        if parent_stat.nlink == 0 {
            return Err(errno(libc::ENOENT)); // removed while a process is inside it
        }
        self.room_for_one(&tree)?;
        let entries = self.entries_mut(&mut tree, parent)?;
        if entries.contains_key(name) {
            return Err(errno(libc::EEXIST));
        }
        let ino = self.next_ino.fetch_add(1, Ordering::Relaxed);
        entries.insert(name.to_vec(), ino);
        // A setgid directory hands its group down (and, to directories, the bit itself).
        let mut perm = mode & 0o7777;
        let mut gid = caller.gid;
        if parent_stat.perm & libc::S_ISGID != 0 {
            gid = parent_stat.gid;
            if kind == NodeKind::Dir {
                perm |= libc::S_ISGID;
            }
        }
        let t = now();
        let stat = Stat {
            ino,
            kind,
            size: match &body {
                Body::Symlink(target) => target.len() as u64,
                _ => 0,
            },
            perm,
            nlink: if kind == NodeKind::Dir { 2 } else { 1 },
            uid: caller.uid,
            gid,
            rdev,
            atime: t,
            mtime: t,
            ctime: t,
        };
        tree.nodes.insert(
            ino,
            Node {
                stat: stat.clone(),
                xattrs: BTreeMap::new(),
                body,
                charged: 0,
            },
        );
        let p = tree.nodes.get_mut(&parent).expect("made above");
        p.stat.mtime = t;
        p.stat.ctime = t;
        if kind == NodeKind::Dir {
            p.stat.nlink += 1;
        }
        Ok(stat)
    }

    pub fn mkdir(&self, parent: u64, name: &[u8], mode: u32, caller: Caller) -> FsResult<Stat> {
        let body = Body::Dir {
            lower: None,
            entries: Some(BTreeMap::new()),
        };
        self.make(
            parent,
            name,
            NewNode::new(NodeKind::Dir, mode, body),
            caller,
        )
    }

    /// A regular file (empty), FIFO, socket or device node.
    pub fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> FsResult<Stat> {
        let kind = NodeKind::from_mode(mode).ok_or(errno(libc::EINVAL))?;
        match kind {
            NodeKind::File => self.create(parent, name, mode, caller),
            NodeKind::Dir => Err(errno(libc::EINVAL)),
            _ => {
                let new = NewNode {
                    rdev,
                    ..NewNode::new(kind, mode, Body::Special)
                };
                self.make(parent, name, new, caller)
            }
        }
    }

    /// A new empty regular file.
    pub fn create(&self, parent: u64, name: &[u8], mode: u32, caller: Caller) -> FsResult<Stat> {
        let body = Body::File {
            data: Data::Local,
            file: None,
            write_lock: Default::default(),
        };
        // One pass for the node and its data file: a commit must not find one without the other.
        let _pass = self.gate.pass();
        let stat = self.make_passed(
            parent,
            name,
            NewNode::new(NodeKind::File, mode, body),
            caller,
        )?;
        let path = self.data_path(stat.ino)?;
        if let Err(e) = std::fs::File::create(&path) {
            let _ = self.remove_passed(parent, name, false);
            return Err(FsError::io(path, e));
        }
        self.lock().dir_unsynced = true;
        Ok(stat)
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        caller: Caller,
    ) -> FsResult<Stat> {
        if target.len() > 4095 {
            return Err(errno(libc::ENAMETOOLONG));
        }
        let body = Body::Symlink(target.to_vec());
        self.make(
            parent,
            name,
            NewNode::new(NodeKind::Symlink, 0o777, body),
            caller,
        )
    }

    /// ENOSPC when the upper holds as many records and names as its inode limit allows.
    fn room_for_one(&self, tree: &Tree) -> FsResult<()> {
        match self.upper()?.inodes {
            Some(limit) if tree.counted() >= limit => Err(errno(libc::ENOSPC)),
            _ => Ok(()),
        }
    }

    pub fn link(&self, ino: u64, parent: u64, name: &[u8]) -> FsResult<Stat> {
        let _pass = self.gate.pass();
        self.upper()?;
        check_name(name)?;
        let mut tree = self.lock();
        let target = self.node_mut(&mut tree, ino)?;
        if target.is_dir() {
            return Err(errno(libc::EPERM));
        }
        if target.stat.nlink >= LINK_MAX {
            return Err(errno(libc::EMLINK));
        }
        self.room_for_one(&tree)?;
        let entries = self.entries_mut(&mut tree, parent)?;
        if entries.contains_key(name) {
            return Err(errno(libc::EEXIST));
        }
        entries.insert(name.to_vec(), ino);
        tree.links += 1;
        Self::touch_dir(&mut tree, parent);
        let n = tree.nodes.get_mut(&ino).expect("made above");
        n.stat.nlink += 1;
        n.stat.ctime = now();
        Ok(n.stat.clone())
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.remove(parent, name, false)
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: u64, name: &[u8], dir: bool) -> FsResult<()> {
        let _pass = self.gate.pass();
        self.remove_passed(parent, name, dir)
    }

    /// [`MountTree::remove`] for a caller that holds a pass already.
    fn remove_passed(&self, parent: u64, name: &[u8], dir: bool) -> FsResult<()> {
        self.upper()?;
        let mut tree = self.lock();
        let ino = self
            .child(&tree, parent, name)?
            .ok_or(errno(libc::ENOENT))?;
        let is_dir = self.kind_of(&tree, ino)? == NodeKind::Dir;
        match (dir, is_dir) {
            (true, false) => return Err(errno(libc::ENOTDIR)),
            (false, true) => return Err(errno(libc::EISDIR)),
            (true, true) if !self.dir_is_empty(&tree, ino)? => return Err(errno(libc::ENOTEMPTY)),
            _ => {}
        }
        self.entries_mut(&mut tree, parent)?.remove(name);
        self.unlinked(&mut tree, parent, ino)?;
        Ok(())
    }

    /// Bookkeeping after `ino` lost its name in `parent`.
    fn unlinked(&self, tree: &mut Tree, parent: u64, ino: u64) -> FsResult<()> {
        let t = now();
        let n = self.node_mut(tree, ino)?;
        let was_dir = n.is_dir();
        let other_names = !was_dir && n.stat.nlink > 1;
        if was_dir {
            n.stat.nlink = 0;
        } else {
            n.stat.nlink = n.stat.nlink.saturating_sub(1);
        }
        n.stat.ctime = t;
        if other_names {
            tree.links = tree.links.saturating_sub(1);
        }
        let p = tree
            .nodes
            .get_mut(&parent)
            .expect("parent has an upper node");
        p.stat.mtime = t;
        p.stat.ctime = t;
        if was_dir {
            p.stat.nlink = p.stat.nlink.saturating_sub(1);
        }
        self.drop_if_unused(tree, ino);
        Ok(())
    }

    /// rename(2), with `RENAME_NOREPLACE` and `RENAME_EXCHANGE`.
    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        let _pass = self.gate.pass();
        self.upper()?;
        check_name(new_name)?;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        if flags & !(libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE) != 0 || (exchange && noreplace)
        {
            return Err(errno(libc::EINVAL));
        }
        let mut tree = self.lock();
        let src = self
            .child(&tree, parent, name)?
            .ok_or(errno(libc::ENOENT))?;
        let dst = self.child(&tree, new_parent, new_name)?;
        let src_dir = self.kind_of(&tree, src)? == NodeKind::Dir;
        let t = now();
        if exchange {
            let dst = dst.ok_or(errno(libc::ENOENT))?;
            let dst_dir = self.kind_of(&tree, dst)? == NodeKind::Dir;
            self.entries_mut(&mut tree, parent)?
                .insert(name.to_vec(), dst);
            self.entries_mut(&mut tree, new_parent)?
                .insert(new_name.to_vec(), src);
            if parent != new_parent && src_dir != dst_dir {
                let (from, to) = if src_dir {
                    (parent, new_parent)
                } else {
                    (new_parent, parent)
                };
                self.node_mut(&mut tree, from)?.stat.nlink -= 1;
                self.node_mut(&mut tree, to)?.stat.nlink += 1;
            }
            for ino in [src, dst] {
                self.node_mut(&mut tree, ino)?.stat.ctime = t;
            }
            Self::touch_dir(&mut tree, parent);
            Self::touch_dir(&mut tree, new_parent);
            return Ok(());
        }
        if let Some(dst) = dst {
            if noreplace {
                return Err(errno(libc::EEXIST));
            }
            if dst == src {
                return Ok(()); // two names of one file: nothing to do
            }
            let dst_dir = self.kind_of(&tree, dst)? == NodeKind::Dir;
            match (src_dir, dst_dir) {
                (true, false) => return Err(errno(libc::ENOTDIR)),
                (false, true) => return Err(errno(libc::EISDIR)),
                (true, true) if !self.dir_is_empty(&tree, dst)? => {
                    return Err(errno(libc::ENOTEMPTY))
                }
                _ => {}
            }
            self.entries_mut(&mut tree, new_parent)?.remove(new_name);
            self.unlinked(&mut tree, new_parent, dst)?;
        }
        self.entries_mut(&mut tree, parent)?.remove(name);
        self.entries_mut(&mut tree, new_parent)?
            .insert(new_name.to_vec(), src);
        if src_dir && parent != new_parent {
            self.node_mut(&mut tree, parent)?.stat.nlink -= 1;
            self.node_mut(&mut tree, new_parent)?.stat.nlink += 1;
        }
        self.node_mut(&mut tree, src)?.stat.ctime = t;
        Self::touch_dir(&mut tree, parent);
        Self::touch_dir(&mut tree, new_parent);
        Ok(())
    }

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> FsResult<()> {
        let _pass = self.gate.pass();
        self.upper()?;
        if name.is_empty() || name.len() > XATTR_NAME_MAX {
            return Err(errno(libc::ERANGE));
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(errno(libc::E2BIG));
        }
        let mut tree = self.lock();
        let n = self.node_mut(&mut tree, ino)?;
        let exists = n.xattrs.contains_key(name);
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(errno(libc::EEXIST));
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(errno(libc::ENODATA));
        }
        n.xattrs.insert(name.to_vec(), value.to_vec());
        n.stat.ctime = now();
        Ok(())
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> FsResult<()> {
        let _pass = self.gate.pass();
        self.upper()?;
        let mut tree = self.lock();
        let n = self.node_mut(&mut tree, ino)?;
        if n.xattrs.remove(name).is_none() {
            return Err(errno(libc::ENODATA));
        }
        n.stat.ctime = now();
        Ok(())
    }
}

/// Free bytes on the filesystem holding `dir`.
fn disk_free(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    let st = rustix::fs::statvfs(c.as_c_str())?;
    Ok(st.f_bavail * st.f_frsize)
}
