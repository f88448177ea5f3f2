//! What the writable upper knows about one node: everything `stat` shows, its xattrs, and where
//! its content is (the lower layers, the upper's data file, or partly both).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::stack::{Attr, FileKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    Dir,
    File,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl NodeKind {
    /// The kind of a `mknod` mode (`S_IFMT` bits); `None` for a type it cannot make.
    pub fn from_mode(mode: u32) -> Option<NodeKind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => NodeKind::File,
            libc::S_IFIFO => NodeKind::Fifo,
            libc::S_IFSOCK => NodeKind::Socket,
            libc::S_IFCHR => NodeKind::CharDevice,
            libc::S_IFBLK => NodeKind::BlockDevice,
            libc::S_IFDIR => NodeKind::Dir,
            _ => return None,
        })
    }
}

impl From<FileKind> for NodeKind {
    fn from(k: FileKind) -> NodeKind {
        match k {
            FileKind::Dir => NodeKind::Dir,
            FileKind::File => NodeKind::File,
            FileKind::Symlink => NodeKind::Symlink,
        }
    }
}

/// A node's attributes, as `stat` reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stat {
    pub ino: u64,
    pub kind: NodeKind,
    pub size: u64,
    /// Permission bits with setuid, setgid and sticky (`0o7777`).
    pub perm: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

impl Stat {
    /// The attributes sent with a negative entry (they mean nothing).
    pub fn absent() -> Stat {
        Stat {
            ino: 0,
            kind: NodeKind::File,
            size: 0,
            perm: 0,
            nlink: 0,
            uid: 0,
            gid: 0,
            rdev: 0,
            atime: std::time::UNIX_EPOCH,
            mtime: std::time::UNIX_EPOCH,
            ctime: std::time::UNIX_EPOCH,
        }
    }

    pub fn from_lower(a: &Attr) -> Stat {
        Stat {
            ino: a.ino,
            kind: a.kind.into(),
            size: a.size,
            perm: a.mode & 0o7777,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: 0,
            atime: a.mtime,
            mtime: a.mtime,
            ctime: a.mtime,
        }
    }
}

/// Where a regular file's bytes are.
#[derive(Debug, Serialize, Deserialize)]
pub enum Data {
    /// Unchanged: all in the lower layers (the node's inode number names the lower file).
    Lower,
    /// Being changed: blocks written since copy-up are in the data file, the rest still comes
    /// from the lower file (up to `lower_len`; zeros after it).
    Partial { lower_len: u64, present: Vec<bool> },
    /// All in the data file.
    Local,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Body {
    /// `entries: None` while the listing is still the lower directory's (inode `lower`);
    /// from its first change on, the whole listing (name → inode).
    Dir {
        lower: Option<u64>,
        entries: Option<BTreeMap<Vec<u8>, u64>>,
    },
    File {
        data: Data,
        /// Open on the data file while the node has open handles.
        #[serde(skip)]
        file: Option<Arc<std::fs::File>>,
        /// Serializes writes to this file: a write may first have to copy blocks up. Made on
        /// the first write: a million files never written cost no lock each.
        #[serde(skip)]
        write_lock: Option<Arc<tokio::sync::Mutex<()>>>,
    },
    Symlink(Vec<u8>),
    /// FIFOs, sockets and device nodes: attributes only.
    Special,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Node {
    pub stat: Stat,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub body: Body,
    /// Bytes of the upper's quota this node's data file takes.
    pub charged: u64,
}

impl Node {
    pub fn is_dir(&self) -> bool {
        self.stat.kind == NodeKind::Dir
    }
}

/// The upper's node table. It remembers which entries were changed (or might have been:
/// every mutable access counts) since [`Nodes::take_dirty`], so the journal writes only those.
#[derive(Debug, Default)]
pub struct Nodes {
    map: std::collections::HashMap<u64, Node>,
    dirty: std::collections::HashSet<u64>,
    /// Only a journaled upper drains `dirty`; a scratch one must not let it grow.
    journaled: bool,
}

impl Nodes {
    pub fn new(journaled: bool) -> Nodes {
        Nodes {
            journaled,
            ..Default::default()
        }
    }

    pub fn journaled(&self) -> bool {
        self.journaled
    }

    fn touch(&mut self, ino: u64) {
        if self.journaled {
            self.dirty.insert(ino);
        }
    }

    pub fn get(&self, ino: &u64) -> Option<&Node> {
        self.map.get(ino)
    }

    pub fn get_mut(&mut self, ino: &u64) -> Option<&mut Node> {
        self.touch(*ino);
        self.map.get_mut(ino)
    }

    pub fn entry(&mut self, ino: u64) -> std::collections::hash_map::Entry<'_, u64, Node> {
        self.touch(ino);
        self.map.entry(ino)
    }

    pub fn insert(&mut self, ino: u64, node: Node) {
        self.touch(ino);
        self.map.insert(ino, node);
    }

    pub fn remove(&mut self, ino: &u64) -> Option<Node> {
        self.touch(*ino);
        self.map.remove(ino)
    }

    pub fn contains_key(&self, ino: &u64) -> bool {
        self.map.contains_key(ino)
    }

    pub fn keys(&self) -> impl Iterator<Item = &u64> {
        self.map.keys()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&u64, &Node)> {
        self.map.iter()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The inodes changed since the last call.
    pub fn take_dirty(&mut self) -> std::collections::HashSet<u64> {
        std::mem::take(&mut self.dirty)
    }

    /// Marks `inos` changed again (their journal write failed).
    pub fn redirty(&mut self, inos: impl IntoIterator<Item = u64>) {
        self.dirty.extend(inos);
    }

    /// A table of recovered nodes, none of them dirty.
    pub fn from_recovered(map: std::collections::HashMap<u64, Node>) -> Nodes {
        Nodes {
            map,
            dirty: Default::default(),
            journaled: true,
        }
    }
}
