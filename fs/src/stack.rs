//! A stack of read-only layers seen as one tree (overlay semantics), as a plain Rust API that
//! the FUSE adapter and tests call alike.
//!
//! Layers are ordered bottom to top; the topmost entry of a name wins. A whiteout hides the name
//! in every layer below it; an opaque directory hides everything below it under its name; a
//! directory merges with the directories of the same name below it until an opaque one or a
//! non-directory is met.
//!
//! Inode numbers are computed, not remembered: a node is named by the topmost layer entry that
//! provides it (for a file, the entry holding its inode, so hard links share a number), and its
//! inode number encodes that (layer, entry) pair. Layers never change, so the numbers are stable
//! for as long as the stack lives, and the stack keeps no per-entry state: a `find` over a
//! million files costs no heap. Only merged directories need more than their number says (the
//! list of layers they merge); that list is recomputed from the entry's path and kept in a
//! bounded LRU.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cache::ChunkReader;
use lru::LruCache;

use crate::error::{FsError, FsResult};
use crate::layer::Layer;
use crate::manifest::{Entry, Kind};
use crate::permit::Permit;
use crate::prefetch::Recorder;

pub const ROOT_INO: u64 = 1;

/// (layer index, entry index)
type Source = (u16, u32);

/// Readahead, in chunks: a read that continues where the last one of the file ended doubles
/// the window (from 1) up to the maximum; a read anywhere else turns readahead off until the
/// file is read sequentially again. A first read at offset 0 is taken as the start of a scan.
/// So a sequential scan soon keeps several chunks in flight (the store's bandwidth, not its
/// latency, sets the pace), while a random read fetches only the chunk it needs. The window
/// is topped up in batches (once half of it has been read), so that the chunks asked for
/// adjoin and go out as few, large ranged GETs.
const READAHEAD_MAX: usize = 128;
/// How far from the previous read's end a read may start and still count as sequential.
const SEQUENTIAL_SLACK: u64 = 4 << 20;
/// Files whose read position is remembered for readahead.
const STREAMS: usize = 4096;

struct Stream {
    next_offset: u64,
    /// Chunks before this index have been asked for (read or prefetched).
    prefetched_to: usize,
    window: usize,
    /// Reads that were not where the previous one ended.
    jumps: u32,
    /// The whole file is being (or was) fetched.
    whole: bool,
    /// Read from its start, or in order at least once (two reads in a row): its chunks go
    /// to its local copy.
    in_order: bool,
}

/// A file read at random this many times is fetched whole in the background (see
/// [`LayerStack::fetch_whole`]): a program that reads a large file at random otherwise pays
/// one store round trip per miss for ever.
const JUMPS_FOR_WHOLE_FILE: u32 = 4;
/// Files smaller than this are not fetched whole: readahead and a few misses cost less.
const WHOLE_FILE_MIN: u64 = 1 << 20;

/// Small files a function reads one after another are mostly neighbours in their layer (a
/// package's modules, published in directory order), so their bytes lie close together in the
/// layer's chunk stream. A miss on a small file within [`NEIGHBOUR_DISTANCE`] chunks of a
/// recent miss in the same layer shows that pattern: the chunks that follow the file in the
/// stream, up to this many stored bytes, are then fetched as background work (a read that
/// needs one of them takes its fetch over at once), so the next files read are local instead
/// of one store round trip each. Being background work, a guess that turns out wrong (files
/// sampled at random, close together only by chance) costs the reads a function waits on
/// little; misses far apart fetch nothing extra.
const NEIGHBOURS_BYTES: u64 = 4 << 20;
/// How close (in chunks of a layer's stream) two misses must be to count as neighbours.
const NEIGHBOUR_DISTANCE: usize = 32;
/// Recent misses on small files remembered for that test.
const RECENT_MISSES: usize = 8;
/// Neighbour fetches a mount has under way at most; a miss beyond that fetches only itself.
const NEIGHBOUR_FETCHES: usize = 4;

/// Merged directories whose source lists are kept; beyond this they are recomputed.
const MERGED_DIR_CACHE: usize = 16 * 1024;
/// Layouts of large files (where their chunks go in their local copies) kept for files read
/// lately; beyond this they are computed again from the manifest.
const HOMES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Dir,
    File,
    Symlink,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: FileKind,
    pub size: u64,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub name: Vec<u8>,
    pub kind: FileKind,
}

pub struct LayerStack {
    layers: Vec<Layer>,
    cache: ChunkReader,
    /// The root's sources: every layer's root from the top down to the first opaque one.
    root_sources: Vec<Source>,
    merged_dirs: Mutex<LruCache<u64, Arc<Vec<Source>>>>,
    /// Per-file sequential-read detection for readahead (recently read files only).
    streams: Mutex<LruCache<u64, Stream>>,
    /// Notes what the mount's function reads first, for the layers' start records.
    recorder: Option<Arc<Recorder>>,
    /// Set when the mount ends: its background work (replay, whole-file fetches) stops.
    closed: Arc<AtomicBool>,
    /// Stored bytes of the whole-file fetches this stack has started.
    whole_file_bytes: AtomicU64,
    /// When the volume's commits go to a store of their own (a tenant's home), the index of
    /// its first layer there: the layers below are in another store (see
    /// [`LayerStack::foreign`]).
    home_from: Option<usize>,
    /// Layouts of the local copies of large files read lately, by (layer, entry).
    homes: Mutex<LruCache<(u16, u32), Arc<cache::FileLayout>>>,
    /// Recent misses on small files, newest last: layer, entry and the last chunk they
    /// needed (see [`NEIGHBOURS_BYTES`]).
    recent_misses: Mutex<std::collections::VecDeque<(u16, u32, usize)>>,
    /// Neighbour fetches under way (see [`NEIGHBOUR_FETCHES`]).
    neighbour_fetches: Arc<AtomicUsize>,
    /// Neighbour fetches started since the mount began.
    neighbour_fetches_started: AtomicU64,
}

fn mtime(e: &Entry<'_>) -> SystemTime {
    if e.mtime_sec >= 0 {
        UNIX_EPOCH + Duration::new(e.mtime_sec as u64, e.mtime_nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(e.mtime_sec.unsigned_abs())
            + Duration::from_nanos(e.mtime_nsec as u64)
    }
}

fn file_kind(k: Kind) -> FileKind {
    match k {
        Kind::Dir => FileKind::Dir,
        Kind::Symlink => FileKind::Symlink,
        _ => FileKind::File,
    }
}

fn not_found(what: impl std::fmt::Display) -> FsError {
    FsError::NotFound(what.to_string())
}

impl LayerStack {
    /// `layers` bottom to top.
    pub fn new(layers: Vec<Layer>, cache: ChunkReader) -> FsResult<LayerStack> {
        if layers.is_empty() || layers.len() > u16::MAX as usize {
            return Err(FsError::InvalidInput(
                "a mount needs 1 to 65535 layers".into(),
            ));
        }
        let mut root_sources = Vec::new();
        for (i, layer) in layers.iter().enumerate().rev() {
            root_sources.push((i as u16, 0));
            if layer.manifest.root().is_opaque() {
                break;
            }
        }
        Ok(LayerStack {
            layers,
            cache,
            root_sources,
            merged_dirs: Mutex::new(LruCache::new(
                std::num::NonZeroUsize::new(MERGED_DIR_CACHE).expect("non-zero"),
            )),
            streams: Mutex::new(LruCache::new(
                std::num::NonZeroUsize::new(STREAMS).expect("non-zero"),
            )),
            recorder: None,
            closed: Default::default(),
            whole_file_bytes: AtomicU64::new(0),
            home_from: None,
            homes: Mutex::new(LruCache::new(
                std::num::NonZeroUsize::new(HOMES).expect("non-zero"),
            )),
            recent_misses: Default::default(),
            neighbour_fetches: Default::default(),
            neighbour_fetches_started: AtomicU64::new(0),
        })
    }

    /// The mount is over: background work for it stops (fetches that reached the store finish).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.cache.wake_background();
    }

    /// Set once [`LayerStack::close`] is called; hand it to background fetches.
    pub fn closed(&self) -> &Arc<AtomicBool> {
        &self.closed
    }

    /// Records what is read first (see [`crate::prefetch`]).
    pub fn with_recorder(mut self, recorder: Arc<Recorder>) -> LayerStack {
        self.recorder = Some(recorder);
        self
    }

    /// The volume's commits go to a store of their own, which holds the layers from index
    /// `from` up: a commit never names chunks of the layers below (see
    /// [`LayerStack::foreign`]).
    pub fn with_home_from(mut self, from: usize) -> LayerStack {
        self.home_from = Some(from);
        self
    }

    /// Whether layer `layer` is in another store than the one the volume's commits go to:
    /// a commit then stores the bytes of its files anew instead of naming its chunks, so
    /// that every manifest names only packs of the store that holds it.
    pub fn foreign(&self, layer: usize) -> bool {
        self.home_from.is_some_and(|from| layer < from)
    }

    /// The layers the mount's start record covers: those of the stack's own store.
    pub fn recorded_layers(&self) -> &[Layer] {
        &self.layers[..self.home_from.unwrap_or(self.layers.len())]
    }

    pub fn recorder(&self) -> Option<&Arc<Recorder>> {
        self.recorder.as_ref()
    }

    /// Notes, for the start record, that the whole of file `ino` is read (by the kernel, from
    /// a local copy, where strata does not see its reads).
    pub fn note_whole_file(&self, ino: u64) {
        if let (Some(rec), Ok((layer, entry, e))) = (&self.recorder, self.top_at(ino)) {
            if e.kind == Kind::File {
                rec.note(layer, entry, 0..e.size);
            }
        }
    }

    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    pub fn cache(&self) -> &ChunkReader {
        &self.cache
    }

    fn entry(&self, (layer, index): Source) -> Entry<'_> {
        self.layers[layer as usize].manifest.entry(index as usize)
    }

    /// The inode number of the node whose topmost source is `source`.
    fn ino_of(&self, (layer, entry): Source) -> u64 {
        if entry == 0 {
            return ROOT_INO;
        }
        ((layer as u64 + 1) << 32) | entry as u64
    }

    /// The node behind an inode number: its sources (topmost first) and kind.
    fn sources(&self, ino: u64) -> FsResult<(Vec<Source>, Kind)> {
        if ino == ROOT_INO {
            return Ok((self.root_sources.clone(), Kind::Dir));
        }
        let bad = || not_found(format!("inode {ino}"));
        let layer = (ino >> 32).checked_sub(1).ok_or_else(bad)? as usize;
        let entry = (ino & 0xffff_ffff) as usize;
        let manifest = &self.layers.get(layer).ok_or_else(bad)?.manifest;
        if entry == 0 || entry >= manifest.entry_count() {
            return Err(bad());
        }
        let kind = manifest.entry(entry).kind;
        if kind != Kind::Dir || layer == 0 {
            // Nothing lies below the bottom layer, and only directories merge.
            return Ok((vec![(layer as u16, entry as u32)], kind));
        }
        if let Some(sources) = self
            .merged_dirs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&ino)
        {
            return Ok(((**sources).clone(), kind));
        }
        let sources = self.resolve_path(layer, entry).ok_or_else(bad)?;
        self.merged_dirs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .put(ino, Arc::new(sources.clone()));
        Ok((sources, kind))
    }

    /// Recomputes a directory's merged sources by resolving its path: from the nearest
    /// ancestor (in its own layer) whose sources are remembered, else from the root. Starting
    /// from a remembered ancestor keeps a walk down a deep tree linear even when the walk
    /// outgrows the memo.
    fn resolve_path(&self, layer: usize, entry: usize) -> Option<Vec<Source>> {
        let manifest = &self.layers[layer].manifest;
        let mut names = Vec::new();
        let mut start = None;
        let mut at = entry;
        while at != 0 {
            let e = manifest.entry(at);
            names.push(e.name);
            at = e.parent as usize;
            if at != 0 {
                let remembered = self
                    .merged_dirs
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(&self.ino_of((layer as u16, at as u32)))
                    .cloned();
                if let Some(sources) = remembered {
                    start = Some((*sources).clone());
                    break;
                }
            }
        }
        let mut sources = start.unwrap_or_else(|| self.root_sources.clone());
        for name in names.into_iter().rev() {
            sources = self.resolve(&sources, name)?.0;
        }
        // The path must lead back to the same entry, or the number was not one we gave out.
        (sources.first() == Some(&(layer as u16, entry as u32))).then_some(sources)
    }

    /// Resolves `name` in a merged directory: the sources of the visible node, if any.
    fn resolve(&self, dir_sources: &[Source], name: &[u8]) -> Option<(Vec<Source>, Kind)> {
        let mut found: Vec<Source> = Vec::new();
        for &(layer, dir_index) in dir_sources {
            let manifest = &self.layers[layer as usize].manifest;
            let dir = manifest.entry(dir_index as usize);
            let Some(e) = manifest.lookup(&dir, name) else {
                continue;
            };
            match e.kind {
                Kind::Whiteout => break,
                Kind::Dir => {
                    found.push((layer, e.index));
                    if e.is_opaque() {
                        break;
                    }
                }
                _ if found.is_empty() => return Some((vec![(layer, e.inode_entry())], e.kind)),
                _ => break, // a lower non-directory under a directory is hidden
            }
        }
        if found.is_empty() {
            None
        } else {
            Some((found, Kind::Dir))
        }
    }

    fn attr_of(&self, ino: u64, source: Source, kind: Kind) -> Attr {
        let e = self.entry(source);
        Attr {
            ino,
            kind: file_kind(kind),
            size: e.size,
            mode: e.mode,
            nlink: e.nlink(),
            uid: e.uid,
            gid: e.gid,
            mtime: mtime(&e),
        }
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let (sources, kind) = self.sources(ino)?;
        Ok(self.attr_of(ino, sources[0], kind))
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        let (dir_sources, kind) = self.sources(parent)?;
        if kind != Kind::Dir {
            return Err(FsError::io(
                "lookup",
                std::io::Error::from_raw_os_error(libc::ENOTDIR),
            ));
        }
        let (sources, kind) = self
            .resolve(&dir_sources, name)
            .ok_or_else(|| not_found(String::from_utf8_lossy(name)))?;
        let top = sources[0];
        let ino = self.ino_of(top);
        if kind == Kind::Dir && top.0 > 0 && ino != ROOT_INO {
            // The kernel asks for this directory by number next; remembering its sources now
            // spares resolving its whole path again, which in a deep tree makes a walk from
            // the root quadratic.
            self.merged_dirs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .put(ino, Arc::new(sources));
        }
        Ok(self.attr_of(ino, top, kind))
    }

    /// The merged listing of a directory, sorted by name (without `.` and `..`).
    pub fn readdir(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        let (dir_sources, kind) = self.sources(ino)?;
        if kind != Kind::Dir {
            return Err(FsError::io(
                "readdir",
                std::io::Error::from_raw_os_error(libc::ENOTDIR),
            ));
        }
        // Collect every name once, then resolve each through the same rules as lookup.
        let mut names: Vec<&[u8]> = Vec::new();
        for &(layer, dir_index) in &dir_sources {
            let manifest = &self.layers[layer as usize].manifest;
            let dir = manifest.entry(dir_index as usize);
            for child in dir.children() {
                names.push(manifest.entry(child as usize).name);
            }
        }
        names.sort_unstable();
        names.dedup();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if let Some((sources, kind)) = self.resolve(&dir_sources, name) {
                out.push(DirEntry {
                    ino: self.ino_of(sources[0]),
                    name: name.to_vec(),
                    kind: file_kind(kind),
                });
            }
        }
        Ok(out)
    }

    /// The topmost source of `ino` (layer, entry); `None` for the root or an unknown inode.
    pub fn top_source(&self, ino: u64) -> Option<(u16, u32)> {
        let (sources, _) = self.sources(ino).ok()?;
        (sources[0].1 != 0).then_some(sources[0])
    }

    /// An entry's name and its parent entry in the entry's own layer (`None` for the root).
    pub fn layer_parent(&self, (layer, entry): (u16, u32)) -> Option<(&[u8], u32)> {
        let e = self
            .layers
            .get(layer as usize)?
            .manifest
            .entry(entry as usize);
        (entry != 0).then_some((e.name, e.parent))
    }

    /// The layer and entry that define a node's attributes and content.
    fn top(&self, ino: u64) -> FsResult<(&Layer, Entry<'_>)> {
        let (sources, _) = self.sources(ino)?;
        Ok((&self.layers[sources[0].0 as usize], self.entry(sources[0])))
    }

    /// [`LayerStack::top`] by index: (layer index, entry index, entry).
    fn top_at(&self, ino: u64) -> FsResult<(u16, u32, Entry<'_>)> {
        let (sources, _) = self.sources(ino)?;
        Ok((sources[0].0, sources[0].1, self.entry(sources[0])))
    }

    /// The layer and entry a file's bytes come from (its topmost source).
    pub fn file_source(&self, ino: u64) -> Option<(usize, u32)> {
        let (sources, kind) = self.sources(ino).ok()?;
        (kind == Kind::File).then(|| (sources[0].0 as usize, sources[0].1))
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let (layer, e) = self.top(ino)?;
        if e.kind != Kind::Symlink {
            return Err(FsError::InvalidInput(format!(
                "inode {ino} is not a symlink"
            )));
        }
        Ok(layer.manifest.symlink_target(&e).to_vec())
    }

    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<Vec<u8>>> {
        let (layer, e) = self.top(ino)?;
        Ok(layer
            .manifest
            .xattrs(&e)
            .into_iter()
            .map(|(n, _)| n.to_vec())
            .collect())
    }

    /// Every extended attribute of a node, names with values.
    pub fn xattrs(&self, ino: u64) -> FsResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let (layer, e) = self.top(ino)?;
        Ok(layer
            .manifest
            .xattrs(&e)
            .into_iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect())
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Option<Vec<u8>>> {
        let (layer, e) = self.top(ino)?;
        Ok(layer
            .manifest
            .xattrs(&e)
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_vec()))
    }

    /// Reads a file's bytes; fetches only the chunks covering the range.
    pub async fn read(&self, ino: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        self.start_read(ino, offset, size)?;
        self.fetch_range(ino, offset, size).await
    }

    /// The first half of a read that may not block on the store: readahead bookkeeping, then
    /// the bytes if every chunk they need is in memory or verified on disk (a blocking disk
    /// read at most). `None`: finish with [`LayerStack::read_fetch`].
    pub fn read_local(&self, ino: u64, offset: u64, size: u32) -> Option<FsResult<Bytes>> {
        let (layer, e) = match self.start_read(ino, offset, size) {
            Ok(found) => found,
            Err(e) => return Some(Err(e)),
        };
        let data = layer.read_local(&self.cache, &e, offset, size)?;
        self.cache.record_read(data.len() as u64);
        Some(Ok(data))
    }

    /// All of file `ino`, if its layer entry is `size` bytes (not empty) and every one of them
    /// is here (in memory or the disk cache); `None` otherwise. Nothing is fetched, counted or
    /// noted in the start record: see [`LayerStack::count_whole_read`].
    pub fn read_whole_local(&self, ino: u64, size: u64) -> Option<Bytes> {
        let (layer, e, _) = self.file(ino).ok()?;
        if e.size != size {
            return None;
        }
        let n = u32::try_from(size).ok().filter(|&n| n > 0)?;
        let data = layer.read_local(&self.cache, &e, 0, n)?;
        (data.len() as u64 == size).then_some(data)
    }

    /// Counts bytes from [`LayerStack::read_whole_local`] that reached their reader as one read
    /// of the whole file, and notes it in the start record, as a read of it would be.
    pub fn count_whole_read(&self, ino: u64, size: u64) {
        self.note_for_record(ino, 0..size);
        self.cache.record_read(size);
    }

    /// Notes a read of `range` of file `ino` in the start record, if one is being taken.
    fn note_for_record(&self, ino: u64, range: std::ops::Range<u64>) {
        if let Some(rec) = self.recorder.as_ref().filter(|r| r.is_open()) {
            if let Some((l, entry)) = self.file_source(ino) {
                rec.note(l as u16, entry, range);
            }
        }
    }

    /// The second half of a read whose [`LayerStack::read_local`] found bytes missing: fetches
    /// them, then, for a small file, maybe its neighbours (see [`NEIGHBOURS_BYTES`]).
    pub async fn read_fetch(&self, ino: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let data = self.fetch_range(ino, offset, size).await;
        if data.is_ok() {
            self.fetch_neighbours(ino, offset, size);
        }
        data
    }

    /// Reads a file's bytes, fetching what is missing; no readahead bookkeeping.
    async fn fetch_range(&self, ino: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let (layer, e, home) = self.file(ino)?;
        let data = layer
            .read(&self.cache, &e, offset, size, home.as_ref())
            .await;
        match &data {
            Ok(bytes) => self.cache.record_read(bytes.len() as u64),
            Err(_) => self.cache.record_error(),
        }
        data
    }

    /// Notes a miss on file `ino` if it is small and, if a recent miss on another file was
    /// near it in the same layer, starts fetching the chunks that follow it (see
    /// [`NEIGHBOURS_BYTES`]). Called after the read's own fetch, so that it goes first.
    fn fetch_neighbours(&self, ino: u64, offset: u64, size: u32) {
        let Ok((l, entry, e)) = self.top_at(ino) else {
            return;
        };
        if e.kind != Kind::File || e.size >= WHOLE_FILE_MIN {
            return;
        }
        let layer = &self.layers[l as usize];
        let needed = layer.chunks_for_read(&e, offset, size);
        let Some(last) = needed.end.checked_sub(1) else {
            return;
        };
        let near = {
            let mut recent = self
                .recent_misses
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Two misses in one file (a file of several chunks read in pieces) say nothing
            // about its neighbours.
            let near = recent.iter().any(|&(rl, re, ri)| {
                rl == l && re != entry && ri.abs_diff(last) <= NEIGHBOUR_DISTANCE
            });
            if recent.len() == RECENT_MISSES {
                recent.pop_front();
            }
            recent.push_back((l, entry, last));
            near
        };
        if !near {
            return;
        }
        let locs = layer.chunks_after(needed.end, NEIGHBOURS_BYTES);
        if locs.is_empty() {
            return;
        }
        let Some(running) = Permit::try_take(&self.neighbour_fetches, NEIGHBOUR_FETCHES) else {
            return;
        };
        self.neighbour_fetches_started
            .fetch_add(1, Ordering::Relaxed);
        let (reader, closed) = (layer.reader(&self.cache).clone(), self.closed.clone());
        tokio::spawn(async move {
            let _running = running;
            reader
                .fetch_background(&locs, None, cache::BackgroundKind::Deferred, &closed)
                .await;
        });
    }

    /// The complete local copy of a file (see [`cache::AssembledFile`]), if the cache has a
    /// verified one.
    pub fn assembled(&self, ino: u64) -> Option<cache::AssembledFile> {
        let (layer, e) = self.top(ino).ok()?;
        if e.kind != Kind::File || e.size < crate::handles::PASSTHROUGH_MIN_SIZE {
            return None;
        }
        // By the content's id: no layout is built for a file that has no complete copy.
        self.cache.cache().assembled(&layer.file_chunks(&e).id())
    }

    /// Starts completing a file's local copy in the background from chunks cached elsewhere,
    /// if they all are (or verifying the copy a restart left). Within a tokio runtime.
    pub fn assemble(&self, ino: u64) {
        if let Ok((layer, entry, e)) = self.top_at(ino) {
            if let Some(home) = self.home(layer, entry, &e) {
                self.cache.cache().assemble(home);
            }
        }
    }

    /// The layout of the local copy of file `e` (entry `entry` of layer `layer`), if it gets
    /// one: files of at least [`crate::handles::PASSTHROUGH_MIN_SIZE`] bytes that fit a quarter
    /// of the disk cache. Their chunks are cached in the copy.
    fn home(&self, layer: u16, entry: u32, e: &Entry<'_>) -> Option<Arc<cache::FileLayout>> {
        let share = self.cache.cache().disk_capacity() / 4;
        if e.kind != Kind::File || e.size < crate::handles::PASSTHROUGH_MIN_SIZE || e.size > share {
            return None;
        }
        let homes = || {
            self.homes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some(home) = homes().get(&(layer, entry)) {
            return Some(Arc::clone(home));
        }
        // Built outside the lock: a large file has thousands of chunks.
        let home = cache::FileLayout::new(&self.layers.get(layer as usize)?.file_chunks(e))?;
        homes().put((layer, entry), Arc::clone(&home));
        Some(home)
    }

    /// [`LayerStack::home`] of entry `entry` of layer `layer`, if it is a file of which
    /// `covered` bytes are to be fetched, at least half of it (for a start record's entries,
    /// which may name anything).
    pub fn home_of(&self, layer: u16, entry: u32, covered: u64) -> Option<Arc<cache::FileLayout>> {
        let m = &self.layers.get(layer as usize)?.manifest;
        if entry as usize >= m.entry_count() {
            return None;
        }
        let e = m.entry(entry as usize);
        if covered < e.size / 2 {
            return None;
        }
        self.home(layer, entry, &e)
    }

    /// A file's layer and entry, and the layout of its local copy if its chunks go there: a
    /// file read in order, or fetched whole. (A file only sampled at random keeps its chunks
    /// as chunk files: a copy of it would hold little and its layout would cost memory for
    /// all of its chunks.)
    fn file(&self, ino: u64) -> FsResult<(&Layer, Entry<'_>, Option<Arc<cache::FileLayout>>)> {
        let (l, entry, e) = self.top_at(ino)?;
        if e.kind != Kind::File {
            self.cache.record_error();
            return Err(FsError::io(
                "read",
                std::io::Error::from_raw_os_error(libc::EISDIR),
            ));
        }
        let wanted = self
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .peek(&ino)
            .is_some_and(|s| s.in_order || s.whole);
        let home = if wanted {
            self.home(l, entry, &e)
        } else {
            None
        };
        Ok((&self.layers[l as usize], e, home))
    }

    /// Finds the file and starts the readahead its read pattern calls for.
    fn start_read(&self, ino: u64, offset: u64, size: u32) -> FsResult<(&Layer, Entry<'_>)> {
        let (layer, e, _) = self.file(ino)?;
        self.note_for_record(ino, offset..offset.saturating_add(size as u64).min(e.size));
        let needed = layer.chunks_for_read(&e, offset, size);
        let window = self.readahead_window(ino, offset, size);
        if let Some(ahead) = self.readahead_batch(ino, window, needed.end) {
            // Asked after the bookkeeping above: a file now read in order has a copy.
            let (_, _, home) = self.file(ino)?;
            layer.prefetch(&self.cache, &e, ahead, home.as_ref());
        }
        Ok((layer, e))
    }

    fn readahead_window(&self, ino: u64, offset: u64, size: u32) -> usize {
        let mut streams = self
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let next_offset = offset + size as u64;
        match streams.get_mut(&ino) {
            // The kernel issues readahead requests concurrently, so a sequential scan arrives
            // slightly out of order: anything near the last position counts as continuing.
            Some(s) if offset.abs_diff(s.next_offset) <= SEQUENTIAL_SLACK => {
                s.window = (s.window * 2).clamp(1, READAHEAD_MAX);
                s.in_order = true;
                s.next_offset = s.next_offset.max(next_offset);
                s.window
            }
            Some(s) => {
                s.window = 0;
                s.next_offset = next_offset;
                s.jumps = s.jumps.saturating_add(1);
                if s.jumps >= JUMPS_FOR_WHOLE_FILE && !s.whole {
                    // Asked again at the next jump if it could not start now.
                    s.whole = self.fetch_whole(ino);
                }
                0
            }
            None => {
                let window = usize::from(offset == 0);
                streams.put(
                    ino,
                    Stream {
                        next_offset,
                        prefetched_to: 0,
                        window,
                        jumps: u32::from(offset != 0),
                        whole: false,
                        // A read from the start is most likely the first of a whole read.
                        in_order: offset == 0,
                    },
                );
                window
            }
        }
    }

    /// Fetches the whole of file `ino` into the disk cache in the background, in large ranged
    /// GETs (see [`cache::BackgroundKind::Bulk`]), into its local copy (for passthrough); whether
    /// it started. A file starts if it fits a quarter of the disk cache together with the other
    /// files this mount fetched whole, and one of the host's whole-file slots is free. Within
    /// a tokio runtime.
    fn fetch_whole(&self, ino: u64) -> bool {
        let Ok((l, entry, e)) = self.top_at(ino) else {
            return true; // nothing to fetch: do not ask again
        };
        let share = self.cache.cache().disk_capacity() / 4;
        if e.kind != Kind::File || e.size < WHOLE_FILE_MIN || e.size > share {
            return true;
        }
        let Some(home) = self.home(l, entry, &e) else {
            return true;
        };
        let Some(slot) = self.cache.cache().whole_file_slot() else {
            return false;
        };
        let file = self.layers[l as usize].file_chunks(&e);
        let stored: u64 = file.chunks.iter().map(|c| c.stored_len as u64).sum();
        if self.whole_file_bytes.fetch_add(stored, Ordering::Relaxed) + stored > share {
            self.whole_file_bytes.fetch_sub(stored, Ordering::Relaxed);
            return true;
        }
        tracing::debug!(
            ino,
            size = e.size,
            "read at random: fetching the whole file"
        );
        let layer = &self.layers[l as usize];
        let (reader, closed) = (layer.reader(&self.cache).clone(), self.closed.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let mut todo = file.chunks.clone();
            // Chunks cached before (as chunk files, or in memory) are not fetched again but
            // copied into the copy; one whose write was still on its way, and that left memory
            // meanwhile, is looked for again (a few rounds at most). Every chunk is asked for
            // at once, so a read that needs one joins its GET (or starts it, if still queued)
            // instead of asking the store for it alone.
            for _ in 0..3 {
                reader
                    .fetch_background(&todo, Some(&home), cache::BackgroundKind::Bulk, &closed)
                    .await;
                if closed.load(Ordering::Acquire) {
                    return;
                }
                let missing = reader.cache().complete_copy(Arc::clone(&home)).await;
                if missing.is_empty() {
                    return;
                }
                todo = file
                    .chunks
                    .iter()
                    .filter(|c| missing.contains(&c.digest))
                    .copied()
                    .collect();
            }
        });
        true
    }

    /// The chunks to prefetch now for a read of `ino` that needs chunks up to `needed_end`
    /// with readahead `window`: none until less than half the window lies ahead, then enough
    /// to fill it.
    fn readahead_batch(&self, ino: u64, window: usize, needed_end: usize) -> Option<Range<usize>> {
        let mut streams = self
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let s = streams.get_mut(&ino)?;
        if window == 0 || s.prefetched_to < needed_end {
            s.prefetched_to = needed_end;
        }
        if window == 0 || (s.prefetched_to - needed_end) * 2 > window {
            return None;
        }
        let batch = s.prefetched_to..needed_end + window;
        s.prefetched_to = batch.end;
        Some(batch)
    }

    /// Total file bytes and inodes across the layers, for statfs.
    pub fn totals(&self) -> (u64, u64) {
        let bytes = self.layers.iter().map(|l| l.manifest.content_len()).sum();
        let files = self
            .layers
            .iter()
            .map(|l| l.manifest.entry_count() as u64)
            .sum();
        (bytes, files)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::publish::{publish, PublishOptions};
    use crate::refs::{self, DatasetRef};
    use cache::{CacheConfig, ChunkCache};
    use std::path::Path;
    use strata_store::{open_store, StoreOptions};

    /// Bytes that do not compress and cut into content-defined chunks (xorshift).
    pub(crate) fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    pub(crate) fn write(root: &Path, rel: &str, data: &[u8]) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }

    /// A stack of the directories `dirs` under `tmp` (bottom to top), each published to a
    /// local store.
    pub(crate) async fn stack_of(tmp: &Path, dirs: &[&str]) -> LayerStack {
        stack_with_cache(tmp, dirs, None).await
    }

    /// [`stack_of`] with a disk cache in `disk` (which local copies need).
    pub(crate) async fn stack_with_cache(
        tmp: &Path,
        dirs: &[&str],
        disk: Option<std::path::PathBuf>,
    ) -> LayerStack {
        let store = open_store(
            tmp.join("store").to_str().unwrap(),
            &StoreOptions::default(),
        )
        .await
        .unwrap();
        let mut layers = Vec::new();
        for d in dirs {
            let r = DatasetRef::parse(&format!("{d}:v1")).unwrap();
            publish(
                &tmp.join(d),
                &store,
                Some(&r),
                &PublishOptions::default(),
                Default::default(),
            )
            .await
            .unwrap();
            let digest = refs::resolve(&store, &r).await.unwrap();
            layers.push(Layer::load(&store, digest, None).await.unwrap());
        }
        let cache = ChunkCache::new(&CacheConfig {
            disk_capacity: if disk.is_some() { 1 << 30 } else { 0 },
            disk_dir: disk,
            memory_capacity: 1 << 20,
            fetch_deadline: cache::DEFAULT_FETCH_DEADLINE,
        })
        .unwrap()
        .reader(store);
        LayerStack::new(layers, cache).unwrap()
    }

    fn names(s: &LayerStack, ino: u64) -> Vec<String> {
        s.readdir(ino)
            .unwrap()
            .into_iter()
            .map(|e| String::from_utf8(e.name).unwrap())
            .collect()
    }

    async fn read_all(s: &LayerStack, parent: u64, name: &str) -> Vec<u8> {
        let a = s.lookup(parent, name.as_bytes()).unwrap();
        s.read(a.ino, 0, a.size as u32 + 10).await.unwrap().to_vec()
    }

    #[tokio::test]
    async fn overlay_rules_without_a_mount() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        write(t, "base/a/x", b"x");
        write(t, "base/a/y", b"y");
        write(t, "base/f", b"base f");
        write(t, "base/gone", b"g");
        write(t, "base/d/old", b"old");
        write(t, "base/dir-over-file/inner", b"inner");
        write(t, "base/file-over-dir", b"lower file");
        write(t, "top/a/.wh.x", b"");
        write(t, "top/a/z", b"z");
        write(t, "top/.wh.gone", b"");
        write(t, "top/d/.wh..wh..opq", b"");
        write(t, "top/d/new", b"new");
        write(t, "top/f", b"top f");
        write(t, "top/dir-over-file", b"upper file");
        write(t, "top/file-over-dir/inner", b"upper dir");
        write(t, "base/m/n/o/lower", b"l");
        write(t, "top/m/n/o/upper", b"u");
        let s = stack_of(t, &["base", "top"]).await;
        // A merged directory three levels down: its number leads back to both layers.
        let mut ino = ROOT_INO;
        for part in ["m", "n", "o"] {
            ino = s.lookup(ino, part.as_bytes()).unwrap().ino;
        }
        assert_eq!(names(&s, ino), ["lower", "upper"]);
        assert_eq!(s.getattr(ino).unwrap().kind, FileKind::Dir);
        assert!(
            s.getattr(ino ^ 0xffff).is_err(),
            "made-up inode numbers are refused"
        );
        assert_eq!(
            names(&s, ROOT_INO),
            ["a", "d", "dir-over-file", "f", "file-over-dir", "m"]
        );
        let a = s.lookup(ROOT_INO, b"a").unwrap();
        assert_eq!(names(&s, a.ino), ["y", "z"]);
        assert!(matches!(s.lookup(a.ino, b"x"), Err(FsError::NotFound(_))));
        let d = s.lookup(ROOT_INO, b"d").unwrap();
        assert_eq!(names(&s, d.ino), ["new"]);
        assert_eq!(read_all(&s, ROOT_INO, "f").await, b"top f");
        assert_eq!(read_all(&s, ROOT_INO, "dir-over-file").await, b"upper file");
        let fod = s.lookup(ROOT_INO, b"file-over-dir").unwrap();
        assert_eq!(fod.kind, FileKind::Dir);
        assert_eq!(names(&s, fod.ino), ["inner"]);
        // Inode numbers are stable: the same name gives the same inode, readdir agrees.
        assert_eq!(s.lookup(ROOT_INO, b"a").unwrap().ino, a.ino);
        let listed = s.readdir(ROOT_INO).unwrap();
        assert_eq!(listed.iter().find(|e| e.name == b"a").unwrap().ino, a.ino);
        // Reads past the end are empty; reads straddle chunk edges correctly.
        let f = s.lookup(ROOT_INO, b"f").unwrap();
        assert!(s.read(f.ino, 100, 10).await.unwrap().is_empty());
        assert_eq!(&s.read(f.ino, 2, 3).await.unwrap()[..], b"p f");
    }

    #[tokio::test]
    async fn readahead_grows_on_sequential_reads_and_resets_on_random_ones() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "one/f", b"x");
        let s = stack_of(tmp.path(), &["one"]).await;
        let windows: Vec<usize> = [0u64, 128 << 10, 256 << 10, 384 << 10, 512 << 10]
            .iter()
            .map(|&off| s.readahead_window(7, off, 128 << 10))
            .collect();
        assert_eq!(windows, [1, 2, 4, 8, 16]);
        for _ in 0..10 {
            s.readahead_window(7, 0, 0);
        }
        assert_eq!(s.readahead_window(7, 0, 0), READAHEAD_MAX, "capped");
        assert_eq!(
            s.readahead_window(7, 900 << 20, 4096),
            0,
            "a jump turns it off"
        );
        assert_eq!(
            s.readahead_window(7, (900 << 20) + 4096, 4096),
            1,
            "reading on from there starts it again"
        );
        assert_eq!(
            s.readahead_window(8, 0, 4096),
            1,
            "files are tracked apart; a scan from the start prefetches"
        );
        assert_eq!(
            s.readahead_window(9, 300 << 20, 4096),
            0,
            "a first read in the middle of a file fetches only what it needs"
        );
    }

    #[tokio::test]
    async fn multi_chunk_files_read_back_at_any_offset() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let mut x = 7u64;
        let data: Vec<u8> = (0..3_000_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        write(t, "one/big", &data);
        write(t, "one/small", b"tail");
        let s = stack_of(t, &["one"]).await;
        let big = s.lookup(ROOT_INO, b"big").unwrap();
        for (off, len) in [
            (0u64, 4096u32),
            (262_000, 300_000),
            (1_048_575, 2),
            (2_999_990, 4096),
        ] {
            let got = s.read(big.ino, off, len).await.unwrap();
            let end = (off as usize + len as usize).min(data.len());
            assert!(got[..] == data[off as usize..end], "offset {off} len {len}");
        }
        assert_eq!(read_all(&s, ROOT_INO, "small").await, b"tail");
    }

    /// A file read at random is fetched whole in the background, so that later reads of any
    /// part of it are local; a file read sequentially is not (readahead serves it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_read_at_random_is_fetched_whole_and_then_read_locally() {
        let tmp = tempfile::tempdir().unwrap();
        let data = pseudo_random(5, 24 << 20);
        write(&tmp.path().join("l"), "random.bin", &data);
        write(
            &tmp.path().join("l"),
            "sequential.bin",
            &pseudo_random(6, 64 << 20),
        );
        let s = stack_with_cache(tmp.path(), &["l"], Some(tmp.path().join("cache"))).await;
        let file = s.lookup(ROOT_INO, b"random.bin").unwrap();
        // Far enough apart not to look like a scan that arrives out of order.
        for off in [20u64 << 20, 2 << 20, 14 << 20, 7 << 20] {
            let got = s.read(file.ino, off, 4096).await.unwrap();
            assert!(got[..] == data[off as usize..off as usize + 4096]);
        }
        let t = std::time::Instant::now();
        while s.assembled(file.ino).is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the file was not fetched whole"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Its bytes reached the disk once: in its local copy (plus its two edge chunks).
        let used = s.cache.cache().stats().disk_used;
        assert!(
            used <= data.len() as u64 + (8 << 20),
            "{used} bytes on disk for a {} byte file",
            data.len()
        );
        let gets = s.cache.stats().store_gets;
        for off in (0..data.len() as u64).step_by(300_000) {
            let got = s.read(file.ino, off, 4096).await.unwrap();
            let end = (off as usize + 4096).min(data.len());
            assert!(got[..] == data[off as usize..end], "offset {off}");
        }
        assert_eq!(
            s.cache.stats().store_gets,
            gets,
            "every later read is local"
        );

        let seq = s.lookup(ROOT_INO, b"sequential.bin").unwrap();
        let before = s.cache.cache().stats().disk_used;
        for i in 0..8u64 {
            s.read(seq.ino, i * 131_072, 131_072).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Readahead fetches up to 128 chunks ahead (about 32 MiB), not the 64 MiB file.
        let fetched = s.cache.cache().stats().disk_used - before;
        assert!(
            fetched < 48 << 20,
            "a sequential read of 1 MiB put {fetched} bytes on disk: the whole file?"
        );
    }

    /// Stored bytes fetched by `s` once its neighbour fetches are done (their chunks on disk).
    async fn settled_store_bytes(s: &LayerStack) -> u64 {
        let t = std::time::Instant::now();
        while s.neighbour_fetches.load(Ordering::Acquire) > 0 {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "neighbour fetches did not end"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.cache.stats().store_bytes
    }

    /// Small files read one after another from one part of a layer bring the chunks that
    /// follow them in the layer along; misses far apart fetch only what they read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn misses_on_neighbouring_small_files_fetch_what_follows_them() {
        let tmp = tempfile::tempdir().unwrap();
        let l = tmp.path().join("l");
        // 24 MiB of incompressible 16 KiB files: about 96 chunks, in name order.
        let files: Vec<(String, Vec<u8>)> = (0..1536u64)
            .map(|i| (format!("p/f{i:04}"), pseudo_random(100 + i, 16 << 10)))
            .collect();
        for (name, data) in &files {
            write(&l, name, data);
        }
        let read_file = |s: &LayerStack, i: usize| {
            let dir = s.lookup(ROOT_INO, b"p").unwrap().ino;
            let f = s.lookup(dir, &files[i].0.as_bytes()[2..]).unwrap();
            (f.ino, files[i].1.clone())
        };

        let s = stack_with_cache(tmp.path(), &["l"], Some(tmp.path().join("cache1"))).await;
        // As the FUSE adapter reads: what is here at once, else a fetch.
        let read = |s: &LayerStack, i: usize| {
            let (ino, data) = read_file(s, i);
            let local = s.read_local(ino, 0, 1 << 20).map(|r| r.unwrap());
            (ino, data, local)
        };
        // Two misses a few chunks apart: the second fetches up to 4 MiB beyond itself.
        let mut alone = 0;
        for i in [0usize, 40] {
            let (ino, data, local) = read(&s, i);
            assert!(local.is_none(), "file {i} is not cached yet");
            assert_eq!(s.read_fetch(ino, 0, 1 << 20).await.unwrap(), data);
            alone += 2 * (256 << 10); // a chunk (or two) per read
        }
        let fetched = settled_store_bytes(&s).await;
        assert_eq!(s.neighbour_fetches_started.load(Ordering::Relaxed), 1);
        assert!(
            fetched > alone + (2 << 20) && fetched <= alone + NEIGHBOURS_BYTES,
            "{fetched} bytes fetched for two neighbouring misses"
        );
        // The files that follow are then here when read.
        let gets = s.cache.stats().store_gets;
        for i in 41..60 {
            let (_, data, local) = read(&s, i);
            assert_eq!(local, Some(Bytes::from(data)), "file {i} is local");
        }
        assert_eq!(s.cache.stats().store_gets, gets, "the next files are local");

        // Two misses in one file (of several chunks, read in pieces) fetch nothing else.
        write(&tmp.path().join("m"), "a/big", &pseudo_random(9, 900 << 10));
        for i in 0..24u64 {
            write(
                &tmp.path().join("m"),
                &format!("b/f{i:02}"),
                &pseudo_random(200 + i, 256 << 10),
            );
        }
        let s = stack_with_cache(tmp.path(), &["m"], Some(tmp.path().join("cache3"))).await;
        let a = s.lookup(ROOT_INO, b"a").unwrap();
        let big = s.lookup(a.ino, b"big").unwrap();
        for off in [0u64, 600 << 10] {
            assert!(s.read_local(big.ino, off, 4096).is_none());
            s.read_fetch(big.ino, off, 4096).await.unwrap();
        }
        let fetched = settled_store_bytes(&s).await;
        assert_eq!(s.neighbour_fetches_started.load(Ordering::Relaxed), 0);
        // The file's chunks at most (one may reach into the files after it), not 4 MiB more.
        assert!(
            fetched <= 2 << 20,
            "{fetched} bytes fetched for two reads of one file"
        );

        // Misses far apart in the layer (more than NEIGHBOUR_DISTANCE chunks) fetch nothing else.
        let s = stack_with_cache(tmp.path(), &["l"], Some(tmp.path().join("cache2"))).await;
        for i in [0usize, 1535, 700] {
            let (ino, data) = read_file(&s, i);
            assert!(s.read_local(ino, 0, 1 << 20).is_none());
            assert_eq!(s.read_fetch(ino, 0, 1 << 20).await.unwrap(), data);
        }
        let fetched = settled_store_bytes(&s).await;
        assert_eq!(s.neighbour_fetches_started.load(Ordering::Relaxed), 0);
        assert!(
            fetched <= 3 * 2 * (256 << 10) + (1 << 20),
            "{fetched} bytes fetched for three far-apart misses"
        );
    }
}
