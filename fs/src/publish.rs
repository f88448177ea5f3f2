//! Publishing a directory as a layer.
//!
//! 1. Walk the tree (sorted by name bytes), keeping modes, owners, mtimes, symlinks, hard
//!    links, xattrs and empty directories; OCI-style `.wh.NAME` / `.wh..wh..opq` entries
//!    become whiteouts and opaque directories.
//! 2. Chunk the content stream (every regular file's bytes, in sorted path order) with FastCDC,
//!    so small files share chunks and an edit only changes the chunks around it.
//! 3. Upload the chunks the store does not have yet, packed into objects of about 16 MiB (see
//!    [`crate::pack`]); then the manifest; and only then move the ref, so no reader ever sees a ref to something missing. Every step is
//!    idempotent: a publish that died half-way finishes when run again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use strata_cache_format::{blob, Digest};
use strata_store::Store;

use crate::error::{FsError, FsResult};
use crate::gc::lease::WriterLease;
use crate::manifest::{self, check_name, ChunkRef, EntrySpec, Kind, FLAG_OPAQUE};
use crate::pack;
use crate::refs::{self, DatasetRef};

pub const CHUNK_MIN: u32 = 64 << 10;
pub const CHUNK_AVG: u32 = 256 << 10;
pub const CHUNK_MAX: u32 = 1 << 20;
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

#[derive(Clone)]
pub struct PublishOptions {
    /// Chunks looked up in the store at once (packs are uploaded 4 at a time).
    pub concurrency: usize,
    /// A local chunk cache to put the layer's chunks in as they are made: a host that
    /// commits a volume reads its new state from disk, not back from the store.
    pub keep_in: Option<Arc<cache::ChunkCache>>,
    /// Sign the ref the publish moves with this publisher's key (FORMAT §5.2).
    pub sign_key: Option<Arc<crate::refs::signed::SigningKey>>,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            concurrency: 16,
            keep_in: None,
            sign_key: None,
        }
    }
}

impl std::fmt::Debug for PublishOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishOptions")
            .field("concurrency", &self.concurrency)
            .field("keep_in", &self.keep_in.is_some())
            .field("sign_key", &self.sign_key.as_ref().map(|k| k.public()))
            .finish()
    }
}

/// Live counters a progress display can poll.
#[derive(Debug, Default)]
pub struct PublishProgress {
    pub total_files: AtomicU64,
    pub total_bytes: AtomicU64,
    pub files_done: AtomicU64,
    pub bytes_done: AtomicU64,
    pub bytes_uploaded: AtomicU64,
}

#[derive(Debug, Clone, Default)]
pub struct PublishReport {
    pub layer: Option<Digest>,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub whiteouts: u64,
    pub bytes: u64,
    pub chunks_total: u64,
    pub chunks_new: u64,
    /// Packs stored by this publish (new chunks go into packs of about 16 MiB).
    pub packs_new: u64,
    pub bytes_uploaded: u64,
    pub manifest_bytes: u64,
    pub elapsed: Duration,
    /// Entries that were skipped (sockets, devices, fifos), with why.
    pub warnings: Vec<String>,
}

/// Where a file's bytes come from.
pub(crate) enum Source {
    /// Nothing to read: a directory, symlink or whiteout, or a file whose entry a commit
    /// points at the layers' chunks afterwards.
    Empty,
    /// A file on the local disk.
    Path(PathBuf),
    /// A node of a mount's tree, read through it ([`publish_walk`]'s `tree`).
    Node(u64),
}

/// One entry of the tree to publish.
pub(crate) struct Node {
    pub name: Vec<u8>,
    pub spec: EntrySpec,
    /// Indices into [`Walk::nodes`], in any order (sorted by name when laid out).
    pub children: Vec<usize>,
    pub source: Source,
    /// One key per inode for regular files with more than one name.
    pub link_key: Option<(u64, u64)>,
}

/// The tree to publish: node 0 is the root. Built from a local directory ([`walk_dir`]) or
/// from a mount's changes ([`crate::upper::MountTree::stage`]), with no recursion, so a tree
/// of any depth is walked in bounded stack.
#[derive(Default)]
pub(crate) struct Walk {
    pub nodes: Vec<Node>,
    pub warnings: Vec<String>,
}

/// Reads a value whose size is asked first (`query`, the syscall's size probe), then read into
/// a buffer of that size (`read`). A value that grew in between (ERANGE) is asked again.
fn read_sized(
    query: impl Fn() -> io::Result<usize>,
    read: impl Fn(&mut [u8]) -> io::Result<usize>,
) -> io::Result<Vec<u8>> {
    for _ in 0..8 {
        let size = query()?;
        if size == 0 {
            return Ok(Vec::new()); // empty when asked (a second probe would not read it)
        }
        let mut buf = vec![0u8; size];
        match read(&mut buf) {
            Ok(got) => {
                buf.truncate(got);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("an xattr kept growing while read"))
}

fn read_xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    use rustix::fs::{lgetxattr, lgetxattr_query, llistxattr, llistxattr_query};
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let names = match read_sized(
        || Ok(llistxattr_query(&c_path)?),
        |buf| Ok(llistxattr(&c_path, buf)?),
    ) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let c_name = CString::new(name).map_err(io::Error::other)?;
        let value = read_sized(
            || Ok(lgetxattr_query(&c_path, &c_name)?),
            |buf| Ok(lgetxattr(&c_path, &c_name, buf)?),
        );
        match value {
            Ok(value) => out.push((name.to_vec(), value)),
            // One that vanished between the listing and now is skipped; any other failure
            // is an error, not a silently dropped attribute.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("xattr {}: {e}", String::from_utf8_lossy(name)),
                ))
            }
        }
    }
    out.sort();
    Ok(out)
}

fn spec_from_meta(meta: &fs::Metadata, kind: Kind) -> EntrySpec {
    EntrySpec {
        kind: Some(kind),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_sec: meta.mtime(),
        mtime_nsec: meta.mtime_nsec().clamp(0, 999_999_999) as u32,
        ..Default::default()
    }
}

/// Walks the directory `root` (iteratively: a deep tree costs heap, not stack).
pub(crate) fn walk_dir(root: &Path) -> FsResult<Walk> {
    let mut walk = Walk::default();
    let meta = fs::metadata(root).map_err(|e| FsError::io(root, e))?;
    let mut spec = spec_from_meta(&meta, Kind::Dir);
    spec.xattrs = read_xattrs(root).map_err(|e| FsError::io(root, e))?;
    walk.push(Vec::new(), spec, Source::Empty, None);
    let mut pending = vec![(0usize, root.to_path_buf())];
    while let Some((index, path)) = pending.pop() {
        walk.list_dir(index, &path, &mut pending)?;
    }
    Ok(walk)
}

impl Walk {
    pub(crate) fn push(
        &mut self,
        name: Vec<u8>,
        spec: EntrySpec,
        source: Source,
        link_key: Option<(u64, u64)>,
    ) -> usize {
        self.nodes.push(Node {
            name,
            spec,
            children: Vec::new(),
            source,
            link_key,
        });
        self.nodes.len() - 1
    }

    /// Adds the entries of directory `index` (at `path`); subdirectories go to `pending`.
    fn list_dir(
        &mut self,
        index: usize,
        path: &Path,
        pending: &mut Vec<(usize, PathBuf)>,
    ) -> FsResult<()> {
        let mut listing: Vec<(Vec<u8>, PathBuf)> = fs::read_dir(path)
            .map_err(|e| FsError::io(path, e))?
            .map(|d| d.map(|d| (d.file_name().as_bytes().to_vec(), d.path())))
            .collect::<io::Result<_>>()
            .map_err(|e| FsError::io(path, e))?;
        listing.sort();
        let real_names: HashSet<Vec<u8>> = listing
            .iter()
            .filter(|(n, _)| !n.starts_with(WHITEOUT_PREFIX))
            .map(|(n, _)| n.clone())
            .collect();
        let mut children = Vec::new();
        for (child_name, child_path) in listing {
            if child_name == OPAQUE_MARKER {
                self.nodes[index].spec.flags |= FLAG_OPAQUE;
                continue;
            }
            if let Some(hidden) = child_name.strip_prefix(WHITEOUT_PREFIX) {
                check_name(hidden).map_err(|r| {
                    FsError::InvalidInput(format!("{}: bad whiteout: {r}", child_path.display()))
                })?;
                if real_names.contains(hidden) {
                    return Err(FsError::InvalidInput(format!(
                        "{}: whiteout of an entry that is also present in the same directory",
                        child_path.display()
                    )));
                }
                let meta =
                    fs::symlink_metadata(&child_path).map_err(|e| FsError::io(&child_path, e))?;
                let mut spec = spec_from_meta(&meta, Kind::Whiteout);
                spec.mode = 0;
                children.push(self.push(hidden.to_vec(), spec, Source::Empty, None));
                continue;
            }
            check_name(&child_name)
                .map_err(|r| FsError::InvalidInput(format!("{}: {r}", child_path.display())))?;
            if let Some((child, is_dir)) = self.add_path(&child_path, child_name)? {
                children.push(child);
                if is_dir {
                    pending.push((child, child_path));
                }
            }
        }
        self.nodes[index].children = children;
        Ok(())
    }

    /// Adds the entry at `path` (a directory without its children); `None` when skipped.
    fn add_path(&mut self, path: &Path, name: Vec<u8>) -> FsResult<Option<(usize, bool)>> {
        let meta = fs::symlink_metadata(path).map_err(|e| FsError::io(path, e))?;
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else if ft.is_symlink() {
            Kind::Symlink
        } else {
            let what = if ft.is_socket() {
                "socket"
            } else if ft.is_fifo() {
                "fifo"
            } else {
                "device"
            };
            self.warnings
                .push(format!("{}: skipped ({what})", path.display()));
            return Ok(None);
        };
        let mut spec = spec_from_meta(&meta, kind);
        spec.xattrs = read_xattrs(path).map_err(|e| FsError::io(path, e))?;
        let mut link_key = None;
        let mut source = Source::Empty;
        match kind {
            Kind::File => {
                spec.size = meta.len();
                if meta.nlink() > 1 {
                    link_key = Some((meta.dev(), meta.ino()));
                }
                source = Source::Path(path.to_path_buf());
            }
            Kind::Symlink => {
                let target = fs::read_link(path).map_err(|e| FsError::io(path, e))?;
                spec.symlink_target = target.as_os_str().as_bytes().to_vec();
                if spec.symlink_target.len() > manifest::MAX_SYMLINK_LEN {
                    return Err(FsError::InvalidInput(format!(
                        "{}: symlink target too long",
                        path.display()
                    )));
                }
            }
            _ => {}
        }
        Ok(Some((
            self.push(name, spec, source, link_key),
            kind == Kind::Dir,
        )))
    }
}

/// A file in the content stream.
struct StreamFile {
    /// `None`: the bytes come from the feeder ([`feed_nodes`]).
    path: Option<PathBuf>,
    size: u64,
}

/// Bytes of mount-tree files, in stream order, from the feeder to the chunker.
type Fed = Result<Bytes, String>;

/// Where the stream is in its current file.
enum Current {
    File(File, PathBuf),
    Fed(Bytes),
}

/// The layer's content stream: the files' bytes back to back. A file that changes size while
/// being read is an error, not a silently wrong layer.
struct ContentStream {
    files: Vec<StreamFile>,
    next: usize,
    current: Option<(Current, u64)>,
    fed: Option<tokio::sync::mpsc::Receiver<Fed>>,
    progress: Arc<PublishProgress>,
}

impl ContentStream {
    fn next_fed(&mut self) -> io::Result<Bytes> {
        let fed = self.fed.as_mut().and_then(|rx| rx.blocking_recv());
        match fed {
            Some(Ok(b)) => Ok(b),
            Some(Err(e)) => Err(io::Error::other(e)),
            None => Err(io::Error::other("the tree's reader stopped early")),
        }
    }
}

impl Read for ContentStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some((current, left)) = &mut self.current {
                if *left == 0 {
                    if let Current::File(file, path) = current {
                        let mut probe = [0u8; 1];
                        if file.read(&mut probe)? != 0 {
                            return Err(io::Error::other(format!(
                                "{}: file grew while publishing",
                                path.display()
                            )));
                        }
                    }
                    self.current = None;
                    self.progress.files_done.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let want = buf.len().min(*left as usize);
                let n = match current {
                    Current::File(file, path) => {
                        let n = file.read(&mut buf[..want])?;
                        if n == 0 {
                            return Err(io::Error::other(format!(
                                "{}: file shrank while publishing",
                                path.display()
                            )));
                        }
                        n
                    }
                    Current::Fed(pending) => {
                        if pending.is_empty() {
                            let more = self.next_fed()?;
                            if let Some((Current::Fed(p), _)) = &mut self.current {
                                *p = more;
                            }
                            continue;
                        }
                        let n = want.min(pending.len());
                        buf[..n].copy_from_slice(&pending.split_to(n));
                        n
                    }
                };
                if let Some((_, left)) = &mut self.current {
                    *left -= n as u64;
                }
                self.progress
                    .bytes_done
                    .fetch_add(n as u64, Ordering::Relaxed);
                return Ok(n);
            }
            let Some(f) = self.files.get(self.next) else {
                return Ok(0);
            };
            self.next += 1;
            let current = match &f.path {
                Some(path) => {
                    let file = File::open(path).map_err(|e| {
                        io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                    })?;
                    Current::File(file, path.clone())
                }
                None => Current::Fed(Bytes::new()),
            };
            self.current = Some((current, f.size));
        }
    }
}

/// Reads the mount-tree files of the stream (`(inode, size)`, in stream order) and hands their
/// bytes to the chunker. Each file gives exactly `size` bytes or an error.
async fn feed_nodes(
    tree: &crate::upper::MountTree,
    files: Vec<(u64, u64)>,
    tx: tokio::sync::mpsc::Sender<Fed>,
) {
    const STEP: u64 = 1 << 20;
    for (ino, size) in files {
        let mut offset = 0;
        while offset < size {
            let want = (size - offset).min(STEP) as u32;
            let fed = match tree.read(ino, offset, want).await {
                Ok(b) if b.is_empty() => Err(format!(
                    "inode {ino}: {size} bytes expected, {offset} read: the file shrank while committing"
                )),
                Ok(mut b) => {
                    b.truncate(want as usize);
                    offset += b.len() as u64;
                    Ok(b)
                }
                Err(e) => Err(format!("inode {ino}: {e}")),
            };
            let failed = fed.is_err();
            if tx.send(fed).await.is_err() || failed {
                return;
            }
        }
    }
}

/// A walked tree numbered and laid out (see [`layout`]).
struct Layout {
    specs: Vec<EntrySpec>,
    /// The content stream's files, in order.
    files: Vec<StreamFile>,
    /// The mount-tree files among them: (inode, size).
    fed: Vec<(u64, u64)>,
    /// Each walk node's entry index.
    positions: Vec<u32>,
}

/// Numbers the walked tree breadth-first and lays out the content stream in sorted path order.
fn layout(walk: &mut Walk) -> Layout {
    for i in 0..walk.nodes.len() {
        let mut children = std::mem::take(&mut walk.nodes[i].children);
        children.sort_by(|&a, &b| walk.nodes[a].name.cmp(&walk.nodes[b].name));
        walk.nodes[i].children = children;
    }
    let n = walk.nodes.len();
    let mut order = Vec::with_capacity(n); // bfs position -> node
    let mut position = vec![0u32; n];
    let mut parent_of = vec![0u32; n];
    let mut queue = VecDeque::from([0usize]);
    while let Some(node) = queue.pop_front() {
        position[node] = order.len() as u32;
        order.push(node);
        for &c in &walk.nodes[node].children {
            parent_of[c] = position[node];
            queue.push_back(c);
        }
    }
    let mut specs: Vec<EntrySpec> = order
        .iter()
        .map(|&node| {
            let mut spec = walk.nodes[node].spec.clone();
            spec.name = walk.nodes[node].name.clone();
            spec.parent = parent_of[node];
            if let Some(&first) = walk.nodes[node].children.first() {
                spec.a = position[first];
                spec.b = walk.nodes[node].children.len() as u32;
            }
            spec
        })
        .collect();
    // Hard links: the first name in entry order holds the inode.
    let mut links: HashMap<(u64, u64), Vec<u32>> = HashMap::new();
    for (pos, &node) in order.iter().enumerate() {
        if specs[pos].kind == Some(Kind::File) {
            specs[pos].a = pos as u32;
            specs[pos].b = 1;
            if let Some(key) = walk.nodes[node].link_key {
                links.entry(key).or_default().push(pos as u32);
            }
        }
    }
    for group in links.values() {
        let primary = group[0];
        for &pos in group {
            specs[pos as usize].a = primary;
            specs[pos as usize].b = group.len() as u32;
            specs[pos as usize].size = specs[primary as usize].size;
        }
    }
    // Content stream in sorted path order (depth-first), each inode once.
    let mut files = Vec::new();
    let mut fed = Vec::new();
    let mut offset = 0u64;
    let mut stack = vec![0usize];
    while let Some(node) = stack.pop() {
        let pos = position[node] as usize;
        if specs[pos].kind == Some(Kind::File) && specs[pos].a == pos as u32 {
            let size = specs[pos].size;
            match &walk.nodes[node].source {
                Source::Path(p) => files.push(StreamFile {
                    path: Some(p.clone()),
                    size,
                }),
                Source::Node(ino) if size > 0 => {
                    fed.push((*ino, size));
                    files.push(StreamFile { path: None, size });
                }
                // Staged empty (its entry is pointed at chunks later), or no bytes at all.
                Source::Node(_) | Source::Empty => specs[pos].size = 0,
            }
            specs[pos].data_off = offset;
            offset += specs[pos].size;
        }
        stack.extend(walk.nodes[node].children.iter().rev());
    }
    for pos in 0..specs.len() {
        let primary = specs[pos].a as usize;
        if specs[pos].kind == Some(Kind::File) && primary != pos {
            specs[pos].data_off = specs[primary].data_off;
            specs[pos].size = specs[primary].size;
        }
    }
    Layout {
        specs,
        files,
        fed,
        positions: position,
    }
}

/// Publishes `dir` and, if `target` is given, points that ref at the new layer.
pub async fn publish(
    dir: &Path,
    store: &Arc<dyn Store>,
    target: Option<&DatasetRef>,
    options: &PublishOptions,
    progress: Arc<PublishProgress>,
) -> FsResult<PublishReport> {
    let started = Instant::now();
    let root_meta = fs::metadata(dir).map_err(|e| FsError::io(dir, e))?;
    if !root_meta.is_dir() {
        return Err(FsError::InvalidInput(format!(
            "{}: not a directory",
            dir.display()
        )));
    }
    // Publishing through a symlink to a directory publishes the directory.
    let dir_owned = fs::canonicalize(dir).map_err(|e| FsError::io(dir, e))?;
    let walk = tokio::task::spawn_blocking(move || walk_dir(&dir_owned))
        .await
        .map_err(|e| FsError::InvalidInput(format!("walk task failed: {e}")))??;
    // Held from before the first locator is read until the ref has moved: garbage
    // collection waits for it (see `gc::lease`).
    let lease = WriterLease::acquire(store, "publish").await?;
    let published = async {
        let (report, _) = publish_walk(walk, None, store, options, progress, started).await?;
        if let (Some(target), Some(layer)) = (target, &report.layer) {
            // A publish whose lease lapsed may have had what it reuses collected.
            lease.ensure_held().await?;
            refs::set(store, target, layer, "publish", options.sign_key.as_deref()).await?;
        }
        Ok::<_, FsError>(report)
    }
    .await;
    lease.release().await;
    let mut report = published?;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Publishes `dir` as a layer without a writer lease, for a layer that relies on nothing
/// else in the store (an empty root: no chunks), so that it never waits for a collection.
pub(crate) async fn publish_unleased(
    dir: &Path,
    store: &Arc<dyn Store>,
) -> FsResult<PublishReport> {
    let started = Instant::now();
    let dir_owned = fs::canonicalize(dir).map_err(|e| FsError::io(dir, e))?;
    let walk = tokio::task::spawn_blocking(move || walk_dir(&dir_owned))
        .await
        .map_err(|e| FsError::InvalidInput(format!("walk task failed: {e}")))??;
    let (report, _) = publish_walk(
        walk,
        None,
        store,
        &PublishOptions::default(),
        Default::default(),
        started,
    )
    .await?;
    Ok(report)
}

/// Publishes a walked tree; files whose source is a mount-tree node are read through `tree`.
/// Returns the report and, for each node of the walk, its entry index in the new layer.
pub(crate) async fn publish_walk(
    mut walk: Walk,
    tree: Option<&crate::upper::MountTree>,
    store: &Arc<dyn Store>,
    options: &PublishOptions,
    progress: Arc<PublishProgress>,
    started: Instant,
) -> FsResult<(PublishReport, Vec<u32>)> {
    if walk.nodes.len() > u32::MAX as usize - 1 {
        return Err(FsError::InvalidInput(
            "too many entries for one layer".into(),
        ));
    }
    let Layout {
        specs,
        files,
        fed: fed_files,
        positions,
    } = layout(&mut walk);
    let mut report = PublishReport {
        warnings: std::mem::take(&mut walk.warnings),
        ..Default::default()
    };
    drop(walk);
    if !fed_files.is_empty() && tree.is_none() {
        return Err(FsError::InvalidInput(
            "internal error: mount-tree files to publish without their tree".into(),
        ));
    }
    for (pos, s) in specs.iter().enumerate() {
        match s.kind {
            Some(Kind::Dir) => report.dirs += 1,
            Some(Kind::File) if s.a as usize == pos => report.files += 1,
            Some(Kind::File) => report.hardlinks += 1,
            Some(Kind::Symlink) => report.symlinks += 1,
            Some(Kind::Whiteout) => report.whiteouts += 1,
            None => {}
        }
    }
    report.bytes = files.iter().map(|f| f.size).sum();
    progress
        .total_files
        .store(files.len() as u64, Ordering::Relaxed);
    progress.total_bytes.store(report.bytes, Ordering::Relaxed);

    // Chunk on a blocking thread, upload from async tasks, with bounded buffering between.
    let concurrency = options.concurrency.clamp(1, 256);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Digest, Vec<u8>)>(concurrency * 2);
    let (fed_tx, fed_rx) = tokio::sync::mpsc::channel::<Fed>(4);
    let stream = ContentStream {
        files,
        next: 0,
        current: None,
        fed: Some(fed_rx),
        progress: progress.clone(),
    };
    let keep_in = options.keep_in.clone();
    let chunker = tokio::task::spawn_blocking(move || -> FsResult<Vec<(Digest, u64, u32)>> {
        let mut table = Vec::new();
        let cdc = fastcdc::v2020::StreamCDC::new(
            stream,
            CHUNK_MIN as usize,
            CHUNK_AVG as usize,
            CHUNK_MAX as usize,
        );
        for chunk in cdc {
            let chunk = chunk.map_err(|e| FsError::io("content stream", io::Error::from(e)))?;
            let digest = Digest::of(&chunk.data);
            table.push((digest, chunk.offset, chunk.length as u32));
            if let Some(cache) = &keep_in {
                cache.admit(&digest, &chunk.data);
            }
            if tx.blocking_send((digest, chunk.data)).is_err() {
                break; // the uploader failed; its error is reported
            }
        }
        Ok(table)
    });
    // Look chunks up in parallel but take the answers in stream order, so packs hold chunks
    // in the order a sequential read wants them.
    let mut seen = HashSet::new();
    // The stream owns the receiver: when packing fails, dropping it stops the chunker, which
    // stops the feeder.
    let lookups = futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
        .map(|(digest, data): (Digest, Vec<u8>)| {
            let first = seen.insert(digest);
            let store = Arc::clone(store);
            async move {
                let len = data.len() as u32;
                let found = if first {
                    pack::lookup(&store, digest, data).await?
                } else {
                    pack::Lookup::Repeat
                };
                Ok::<_, FsError>((digest, len, found))
            }
        })
        .buffered(concurrency);
    let mut packer = pack::Packer::new(Arc::clone(store), progress.clone());
    let packing = async {
        futures::pin_mut!(lookups);
        while let Some(next) = lookups.next().await {
            let (digest, len, found) = next?;
            packer.add(digest, len, found).await?;
        }
        packer.finish().await
    };
    let feeding = async {
        if let Some(tree) = tree {
            feed_nodes(tree, fed_files, fed_tx).await;
        }
    };
    let (packed, ()) = futures::join!(packing, feeding);
    let chunk_result = chunker
        .await
        .map_err(|e| FsError::InvalidInput(format!("chunker task failed: {e}")))?;
    let packed = packed?;
    let table = chunk_result?;
    let mut chunks = Vec::with_capacity(table.len());
    for (digest, offset, len) in table {
        let loc = packed.locations.get(&digest).ok_or_else(|| {
            FsError::InvalidInput(format!("internal error: chunk {digest} was not stored"))
        })?;
        chunks.push(ChunkRef {
            digest,
            offset,
            len,
            pack: loc.pack,
            pack_offset: loc.pack_offset,
            stored_len: loc.stored_len,
        });
    }

    let manifest_bytes = manifest::encode(&specs, &chunks);
    if manifest_bytes.len() > manifest::MAX_MANIFEST_LEN {
        return Err(FsError::InvalidInput(format!(
            "the layer's manifest would be {} bytes, more than readers accept ({}); split the tree into several layers",
            manifest_bytes.len(),
            manifest::MAX_MANIFEST_LEN
        )));
    }
    // Our own encoder's output must pass our own decoder; anything else is a bug to report,
    // not a layer to upload.
    manifest::Manifest::parse(manifest::ManifestBytes::Owned(manifest_bytes.clone())).map_err(
        |e| {
            FsError::InvalidInput(format!(
                "internal error: encoded manifest does not validate: {e}"
            ))
        },
    )?;
    let layer = Digest::of(&manifest_bytes);
    let layer_key = format!("layers/{}", layer.to_hex());
    report.manifest_bytes = manifest_bytes.len() as u64;
    if store.head(&layer_key).await?.is_none() {
        let encoded = blob::encode(&manifest_bytes);
        progress
            .bytes_uploaded
            .fetch_add(encoded.len() as u64, Ordering::Relaxed);
        store.put(&layer_key, Bytes::from(encoded)).await?;
    }
    report.layer = Some(layer);
    report.chunks_total = chunks.len() as u64;
    report.chunks_new = packed.new_chunks;
    report.packs_new = packed.packs;
    report.bytes_uploaded = progress.bytes_uploaded.load(Ordering::Relaxed);
    report.elapsed = started.elapsed();
    Ok((report, positions))
}

#[cfg(test)]
mod tests {
    use super::read_sized;
    use std::cell::Cell;
    use std::io;

    fn errno(e: i32) -> io::Error {
        io::Error::from_raw_os_error(e)
    }

    #[test]
    fn a_value_that_grows_between_size_and_read_is_read_again() {
        let calls = Cell::new(0);
        let next = || {
            calls.set(calls.get() + 1);
            calls.get()
        };
        let value = read_sized(
            || match next() {
                1 => Ok(3),
                3 => Ok(5),
                other => panic!("unexpected size query (call {other})"),
            },
            |buf| match (next(), buf.len()) {
                (2, 3) => Err(errno(libc::ERANGE)), // it grew to 5 bytes meanwhile
                (4, 5) => {
                    buf.copy_from_slice(b"hello");
                    Ok(5)
                }
                other => panic!("unexpected read {other:?}"),
            },
        )
        .unwrap();
        assert_eq!(value, b"hello");
        assert_eq!(calls.get(), 4);
    }

    #[test]
    fn other_errors_are_returned_at_once() {
        let failed = read_sized(
            || Err(errno(libc::EACCES)),
            |_| panic!("read after a failed query"),
        );
        assert_eq!(failed.unwrap_err().raw_os_error(), Some(libc::EACCES));
        let reads = Cell::new(0);
        let failed = read_sized(
            || Ok(4),
            |_| {
                reads.set(reads.get() + 1);
                Err(errno(libc::EIO))
            },
        );
        assert_eq!(failed.unwrap_err().raw_os_error(), Some(libc::EIO));
        assert_eq!(reads.get(), 1, "only ERANGE is asked again");
    }

    #[test]
    fn an_empty_value_is_not_read() {
        let value = read_sized(|| Ok(0), |_| panic!("read of an empty value")).unwrap();
        assert!(value.is_empty());
    }

    #[test]
    fn a_value_that_keeps_growing_is_given_up_on() {
        let size = Cell::new(0);
        let failed = read_sized(
            || {
                size.set(size.get() + 1);
                Ok(size.get())
            },
            |_| Err(errno(libc::ERANGE)),
        );
        assert!(failed.unwrap_err().raw_os_error().is_none());
        assert_eq!(size.get(), 8);
    }
}
