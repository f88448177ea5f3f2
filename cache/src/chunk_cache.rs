//! The chunk cache a mount reads through: memory LRU → disk cache → store.
//!
//! A miss becomes one fetch no matter how many readers want the chunk (single-flight); the
//! fetch runs as its own task so an interrupted reader does not cancel it for the others. Bytes
//! from the store are decoded and BLAKE3-verified before anyone sees them; a chunk that fails
//! verification is fetched once more and then reported, never served.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use lru::LruCache;

use crate::assembled::FileLayout;
use crate::disk_cache::{DiskCache, DiskRead};
use crate::low_priority::LowPriorityPool;
use crate::pieces::Pieces;
use strata_cache_format::{blob, moved_key, pack_key, ChunkLoc, Digest, PackMoves};
use strata_store::{Store, StoreError, StoreErrorKind};

#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Where chunk files live; `None` keeps chunks in memory only.
    pub disk_dir: Option<PathBuf>,
    pub disk_capacity: u64,
    pub memory_capacity: u64,
    /// How long one chunk fetch keeps retrying store trouble before the read fails with EIO.
    pub fetch_deadline: Duration,
}

/// A read never hangs longer than this on an unreachable store, by default.
pub const DEFAULT_FETCH_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {digest}: {source}")]
    Store {
        digest: Digest,
        #[source]
        source: Arc<StoreError>,
    },
    #[error("chunk {digest}: {store} did not answer within {after:?}: {last_error}")]
    Timeout {
        digest: Digest,
        store: String,
        after: Duration,
        last_error: String,
    },
    #[error("chunk {digest}: {reason}")]
    Failed { digest: Digest, reason: String },
    /// A background fetch given up before it reached the store (its mount went away); whoever
    /// else wants the chunk fetches it afresh.
    #[error("chunk {digest}: background fetch cancelled")]
    Cancelled { digest: Digest },
    #[error("chunk {digest} from {store} is corrupt: {reason}")]
    Corrupt {
        digest: Digest,
        store: String,
        reason: String,
    },
}

/// Read counters, for the whole cache and for each mount.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReadStats {
    /// File reads answered (FUSE reads, `cat`).
    pub reads: u64,
    /// File bytes handed to readers.
    pub bytes_served: u64,
    /// Chunks asked for by reads (readahead not counted).
    pub chunk_requests: u64,
    pub memory_hits: u64,
    pub disk_hits: u64,
    /// Chunk requests answered by a store fetch (their own or one they joined).
    pub store_hits: u64,
    pub store_gets: u64,
    pub store_bytes: u64,
    /// Chunks fetched from the store (several may come with one GET).
    pub chunks_fetched: u64,
    pub corrupt_chunks: u64,
    pub errors: u64,
    /// Opens handed to the kernel to read a file's local copy directly (their reads are not
    /// counted above: they never reach strata).
    #[serde(default)]
    pub passthrough_opens: u64,
    /// Opens of small files whose bytes were handed to the kernel's page cache with the open
    /// (counted above as one read each): their first read never reaches strata.
    #[serde(default)]
    pub prefilled_opens: u64,
    /// How long the store took to answer each ranged GET, body included.
    #[serde(default)]
    pub fetch_latency: FetchLatency,
}

/// Upper bounds, in seconds, of the buckets of [`FetchLatency`] (a last bucket holds the rest).
pub const FETCH_LATENCY_BOUNDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
const LATENCY_SLOTS: usize = FETCH_LATENCY_BOUNDS.len() + 1;

/// A histogram of store fetch times.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FetchLatency {
    /// `counts[i]`: GETs that took more than bound `i - 1` and at most bound `i` of
    /// [`FETCH_LATENCY_BOUNDS`]; the last: longer than every bound.
    pub counts: [u64; LATENCY_SLOTS],
    pub sum_micros: u64,
}

impl FetchLatency {
    /// The upper bound, in seconds, of the bucket holding quantile `q` (0 to 1) of the GETs:
    /// `None` without GETs, `Some(f64::INFINITY)` past the last bound.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        let total: u64 = self.counts.iter().sum();
        if total == 0 {
            return None;
        }
        let wanted = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= wanted {
                return Some(
                    FETCH_LATENCY_BOUNDS
                        .get(i)
                        .copied()
                        .unwrap_or(f64::INFINITY),
                );
            }
        }
        Some(f64::INFINITY)
    }
}

/// The whole cache: read counters plus how full it is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    #[serde(flatten)]
    pub reads: ReadStats,
    pub memory_used: u64,
    pub memory_capacity: u64,
    pub disk_used: u64,
    pub disk_capacity: u64,
    pub disk_chunks: u64,
    /// Complete local copies of large layer files (for passthrough) in the disk cache.
    #[serde(default)]
    pub disk_files: u64,
    pub disk_evictions: u64,
}

#[derive(Default)]
pub struct Counters {
    reads: AtomicU64,
    bytes_served: AtomicU64,
    chunk_requests: AtomicU64,
    memory_hits: AtomicU64,
    disk_hits: AtomicU64,
    store_hits: AtomicU64,
    store_gets: AtomicU64,
    store_bytes: AtomicU64,
    chunks_fetched: AtomicU64,
    corrupt_chunks: AtomicU64,
    errors: AtomicU64,
    passthrough_opens: AtomicU64,
    prefilled_opens: AtomicU64,
    fetch_latency: [AtomicU64; LATENCY_SLOTS],
    fetch_micros: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ReadStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ReadStats {
            reads: get(&self.reads),
            bytes_served: get(&self.bytes_served),
            chunk_requests: get(&self.chunk_requests),
            memory_hits: get(&self.memory_hits),
            disk_hits: get(&self.disk_hits),
            store_hits: get(&self.store_hits),
            store_gets: get(&self.store_gets),
            store_bytes: get(&self.store_bytes),
            chunks_fetched: get(&self.chunks_fetched),
            corrupt_chunks: get(&self.corrupt_chunks),
            errors: get(&self.errors),
            passthrough_opens: get(&self.passthrough_opens),
            prefilled_opens: get(&self.prefilled_opens),
            fetch_latency: FetchLatency {
                counts: std::array::from_fn(|i| get(&self.fetch_latency[i])),
                sum_micros: get(&self.fetch_micros),
            },
        }
    }

    fn observe_fetch(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let slot = FETCH_LATENCY_BOUNDS
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(LATENCY_SLOTS - 1);
        self.fetch_latency[slot].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.fetch_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

pub(crate) struct MemoryLru {
    pub(crate) lru: LruCache<Digest, Bytes>,
    used: u64,
    capacity: u64,
}

impl MemoryLru {
    pub(crate) fn get(&mut self, digest: &Digest) -> Option<Bytes> {
        self.lru.get(digest).cloned()
    }

    fn insert(&mut self, digest: Digest, data: Bytes) {
        let size = data.len() as u64;
        if size > self.capacity || self.lru.contains(&digest) {
            return;
        }
        while self.used + size > self.capacity {
            match self.lru.pop_lru() {
                Some((_, old)) => self.used -= old.len() as u64,
                None => break,
            }
        }
        self.used += size;
        self.lru.put(digest, data);
    }
}

/// Where a fetched chunk came from.
#[derive(Clone, Copy)]
enum Origin {
    Disk,
    Store,
}

type Loaded = Result<(Bytes, Origin), ChunkError>;
type Fetch = Shared<BoxFuture<'static, Loaded>>;

/// Who waits for a fetch, which decides how it shares the store with the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Priority {
    /// A read a function waits on, or the readahead of one: never held back.
    Foreground,
    /// Work nobody waits on yet (prefetch from a start record, whole-file fetches): runs in
    /// the connections foreground reads leave free (see [`Gate`]).
    Background,
}

/// Why chunks are asked for.
#[derive(Clone)]
enum Asked {
    /// A read waits on them: counted, foreground.
    Read,
    /// Readahead of a read: foreground (the reader will wait on it soon), not counted.
    Readahead,
    /// Nobody waits yet: background, waiting as `Gating` says.
    Background(Gating),
}

/// How background work (cached on disk, not in memory; cancellable) shares the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackgroundKind {
    /// Nobody waits on it (a start record's replay): it shrinks to its minimum while reads
    /// wait (see [`Gate`]).
    Deferred,
    /// A reader waits on it soon (the rest of a file it reads at random): it keeps
    /// [`BULK_GETS`] GETs running whether or not reads wait, and a read that needs a chunk
    /// still queued lets that chunk's GET go at once.
    Bulk,
}

/// How a run of chunks waits before it goes to the store.
#[derive(Clone)]
enum Gating {
    /// It does not: reads and readahead.
    Open,
    /// For a slot of the background budget (see [`Gate`]); decoded at low CPU priority.
    Deferred,
    /// For one of its whole-file fetch's GET permits, first come first served.
    Bulk(Arc<tokio::sync::Semaphore>),
}

/// GETs one whole-file fetch keeps running, and the most bytes each asks for: about what
/// saturates a store's bandwidth. Larger than a read's GETs: nobody waits on all of one (a read
/// that joins one waits longer, but the whole set of reads still ends when the file is in), and
/// every GET costs the store a request (Garage on loopback, 2,000 random reads of a 1 GiB file:
/// 8 × 8 MiB took 2.45–2.71 s and 2.1–2.5 s of Garage's CPU, 16 × 4 MiB 2.63–2.72 s and 2.4–2.6 s).
const BULK_GETS: usize = 8;
const BULK_RUN_BYTES: u64 = 8 << 20;

/// What a run going to the store holds until its chunks are checked and written.
enum Held<'a> {
    Nothing,
    Background {
        _slot: BackgroundSlot<'a>,
    },
    Bulk {
        _permit: tokio::sync::SemaphorePermit<'a>,
    },
}

/// A fetch in flight, and whether a foreground read has joined it (so it no longer waits
/// for a background slot).
#[derive(Clone)]
struct InFlight {
    fetch: Fetch,
    urgent: Arc<AtomicBool>,
    /// Told when `urgent` is set, so a whole-file run waiting for a permit wakes alone (the
    /// gate's `changed` would wake every queued run of every such fetch).
    wake: Arc<tokio::sync::Notify>,
}

/// The background budget: how many store GETs background fetches may have running. While
/// any foreground read waits on the store, background work keeps [`BACKGROUND_MIN`] GETs
/// (so it still progresses); when none waits, it grows to [`BACKGROUND_MAX`]. A background
/// fetch that a foreground read joins stops waiting at once.
pub(crate) struct Gate {
    foreground_waiting: AtomicUsize,
    /// When a foreground wait last ended, in ms since `epoch`.
    last_foreground: AtomicU64,
    epoch: Instant,
    background_running: AtomicUsize,
    changed: tokio::sync::Notify,
    /// Background GETs that waited for a slot (for tests and stats).
    background_waits: AtomicU64,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            foreground_waiting: AtomicUsize::new(0),
            last_foreground: AtomicU64::new(0),
            epoch: Instant::now(),
            background_running: AtomicUsize::new(0),
            changed: tokio::sync::Notify::new(),
            background_waits: AtomicU64::new(0),
        }
    }
}

/// Background GETs while a foreground read waits.
const BACKGROUND_MIN: usize = 1;
/// Background work stays at its minimum this long after a foreground wait ended: a program
/// reading one file after another waits again a moment later, and background GETs started
/// in between would be ahead of its next read at the store.
const FOREGROUND_HOLD: Duration = Duration::from_millis(100);
/// Background GETs while no foreground read waits: about what saturates a store's bandwidth.
const BACKGROUND_MAX: usize = 8;

/// A background slot; gives it back on drop.
struct BackgroundSlot<'a>(&'a Gate);

impl Drop for BackgroundSlot<'_> {
    fn drop(&mut self) {
        self.0.background_running.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

/// Counts a foreground read as waiting while it lives.
struct ForegroundWait<'a>(&'a Gate);

impl<'a> ForegroundWait<'a> {
    fn new(gate: &'a Gate) -> Self {
        gate.foreground_waiting.fetch_add(1, Ordering::AcqRel);
        ForegroundWait(gate)
    }
}

impl Drop for ForegroundWait<'_> {
    fn drop(&mut self) {
        let now = self.0.epoch.elapsed().as_millis() as u64;
        self.0.last_foreground.store(now, Ordering::Release);
        if self.0.foreground_waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.changed.notify_waiters();
        }
    }
}

impl Gate {
    /// Waits for a background slot (or for `urgent`: a foreground read joined the fetch);
    /// `None` once `cancelled` (and not urgent).
    async fn background_slot(
        &self,
        urgent: &AtomicBool,
        cancelled: &AtomicBool,
    ) -> Option<BackgroundSlot<'_>> {
        let mut waited = false;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if cancelled.load(Ordering::Acquire) && !urgent.load(Ordering::Acquire) {
                return None;
            }
            let since_foreground = Duration::from_millis(
                (self.epoch.elapsed().as_millis() as u64)
                    .saturating_sub(self.last_foreground.load(Ordering::Acquire)),
            );
            let held = self.last_foreground.load(Ordering::Acquire) > 0
                && since_foreground < FOREGROUND_HOLD;
            let limit = if urgent.load(Ordering::Acquire) {
                usize::MAX
            } else if self.foreground_waiting.load(Ordering::Acquire) > 0 || held {
                BACKGROUND_MIN
            } else {
                BACKGROUND_MAX
            };
            let running = self.background_running.load(Ordering::Acquire);
            if running < limit
                && self
                    .background_running
                    .compare_exchange(running, running + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                if waited {
                    self.background_waits.fetch_add(1, Ordering::Relaxed);
                }
                return Some(BackgroundSlot(self));
            }
            if running >= limit {
                waited = true;
                if held && self.foreground_waiting.load(Ordering::Acquire) == 0 {
                    // Nothing may notify when the hold runs out: look again then.
                    let _ = tokio::time::timeout(FOREGROUND_HOLD - since_foreground, changed).await;
                } else {
                    changed.await;
                }
            }
        }
    }
}

/// Waits for one of `permits` (a whole-file fetch's), or for `urgent` (told by `wake`);
/// `Err(())` once `cancelled` and not urgent. `Ok(None)`: urgent, no permit taken. A run
/// of a cancelled fetch learns it when its turn comes (and hands the permit on at once):
/// waking every queued run at a cancel would cost as much as the herd `wake` avoids.
async fn bulk_permit<'p>(
    permits: &'p tokio::sync::Semaphore,
    urgent: &AtomicBool,
    wake: &tokio::sync::Notify,
    cancelled: &AtomicBool,
) -> Result<Option<tokio::sync::SemaphorePermit<'p>>, ()> {
    // One acquire for the whole wait keeps this run's place in the queue.
    let acquire = permits.acquire();
    tokio::pin!(acquire);
    loop {
        // `notify_one` keeps a wake-up given before this waits: none is lost.
        if urgent.load(Ordering::Acquire) {
            return Ok(None);
        }
        if cancelled.load(Ordering::Acquire) {
            return Err(());
        }
        tokio::select! {
            permit = &mut acquire => {
                let permit = permit.map_err(|_| ())?;
                if cancelled.load(Ordering::Acquire) && !urgent.load(Ordering::Acquire) {
                    return Err(());
                }
                return Ok(Some(permit));
            }
            () = wake.notified() => {}
        }
    }
}

/// A chunk asked for: in memory already, or being fetched (by this call or an earlier one).
enum Pending {
    Ready(Bytes),
    Fetching(Fetch),
}

/// Removes a run's chunks from the in-flight table however its fetch ends (even by a panic),
/// so a failed fetch is tried afresh by the next reader.
struct LeaveInflight(Arc<ChunkCache>, Vec<Digest>);

impl Drop for LeaveInflight {
    fn drop(&mut self) {
        let mut inflight = self
            .0
            .inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for d in &self.1 {
            inflight.remove(d);
        }
    }
}

/// The host's chunk cache, shared by every mount whatever store it reads from: chunks are
/// named by their content, so a chunk fetched for one store serves any other that names it.
pub struct ChunkCache {
    pub(crate) disk: Option<DiskCache>,
    /// Local copies being completed or checked (see [`ChunkCache::assemble`]).
    pub(crate) assembling: Mutex<std::collections::HashSet<Digest>>,
    pub(crate) memory: Mutex<MemoryLru>,
    inflight: Mutex<HashMap<Digest, InFlight>>,
    gate: Gate,
    counters: Counters,
    fetch_deadline: Duration,
    prefetch_budget: Arc<tokio::sync::Semaphore>,
    /// Whole files being fetched in the background, host-wide (see
    /// [`ChunkCache::whole_file_slot`]).
    whole_files: Arc<tokio::sync::Semaphore>,
    /// Where background work nobody waits on decodes and writes its chunks.
    low_priority: LowPriorityPool,
    /// Forwarding maps of rewritten packs read so far, by store and old pack, so only the
    /// first read of a moved pack pays for finding it gone.
    moved: Mutex<MovedMaps>,
    /// Whether a forwarding map was ever read (then `moved` is worth a look).
    any_moved: AtomicBool,
}

/// Moves the forwarding maps kept in memory may hold in all (56 bytes each: about 56 MiB).
/// A real map holds a few, but a map from a hostile store may hold a million.
const MOVED_MOVES: usize = 1 << 20;

/// Forwarding maps read so far, least recently used first out, bounded by their moves.
struct MovedMaps {
    maps: LruCache<(String, Digest), Arc<PackMoves>>,
    moves: usize,
}

impl MovedMaps {
    fn get(&mut self, key: &(String, Digest)) -> Option<Arc<PackMoves>> {
        self.maps.get(key).cloned()
    }

    fn pop(&mut self, key: &(String, Digest)) {
        if let Some(map) = self.maps.pop(key) {
            self.moves -= map.moves().len();
        }
    }

    fn put(&mut self, key: (String, Digest), map: Arc<PackMoves>) {
        self.pop(&key);
        while self.moves + map.moves().len() > MOVED_MOVES {
            match self.maps.pop_lru() {
                Some((_, old)) => self.moves -= old.moves().len(),
                None => return, // larger than the whole budget: not kept
            }
        }
        self.moves += map.moves().len();
        self.maps.put(key, map);
    }
}
/// Forwarding hops one fetch follows: a map is rewritten when the pack it points into is, so
/// more than one is only ever a reader holding a map from before that.
const MOVED_HOPS: u8 = 3;
/// A forwarding map is far smaller (a few KiB for a 16 MiB pack); anything longer is cut.
const MAX_MOVED_MAP: u64 = 64 << 20;
/// Gap between two relocated chunks up to which one GET fetches both.
const MOVED_GAP: u64 = 1 << 20;

/// Whole-file fetches (of files read at random) that run at once on a host: each is large,
/// so a few keep the store busy and more would only push each other out of the cache.
const WHOLE_FILES_AT_ONCE: usize = 2;

/// Chunks being fetched in the background (readahead) at most: a full readahead window.
const PREFETCH_BUDGET: usize = 128;
/// The most bytes one ranged GET asks for: big enough that a sequential read costs few
/// requests, small enough that several run in parallel and a reader waits for little.
/// Measured against Garage on loopback (cold 1 GiB read): 2 MiB 318 MiB/s, 4 MiB 366-392,
/// 8 MiB 327.
const MAX_RUN_BYTES: u64 = 4 << 20;
/// The most bytes one GET of deferred background work (a start record's replay) asks for:
/// less than a read's, so that the GET such work keeps while a read waits holds the store and
/// the cores only briefly.
const BACKGROUND_RUN_BYTES: u64 = 1 << 20;

/// One mount's way into the shared cache: the store its chunks come from and its own counters.
#[derive(Clone)]
pub struct ChunkReader {
    cache: Arc<ChunkCache>,
    store: Arc<dyn Store>,
    counters: Arc<Counters>,
}

impl ChunkReader {
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// A reader of the same cache from `store`, counted with this one (a mount whose layers
    /// are in two stores).
    pub fn with_store(&self, store: Arc<dyn Store>) -> ChunkReader {
        ChunkReader {
            cache: Arc::clone(&self.cache),
            store,
            counters: Arc::clone(&self.counters),
        }
    }

    /// The plain bytes of one chunk.
    pub async fn get(&self, loc: &ChunkLoc) -> Result<Bytes, ChunkError> {
        let mut got = self.get_many(std::slice::from_ref(loc)).await?;
        Ok(got.pop().expect("one chunk asked, one given"))
    }

    /// The plain bytes of several chunks, in order. Missing chunks stored next to each other
    /// in a pack are fetched together, with one ranged GET.
    pub async fn get_many(&self, locs: &[ChunkLoc]) -> Result<Vec<Bytes>, ChunkError> {
        self.get_many_for(locs, None).await
    }

    /// [`ChunkReader::get_many`] for a read of the file of `home`: chunks fetched are cached in
    /// its local copy (see [`FileLayout`]).
    pub async fn get_many_for(
        &self,
        locs: &[ChunkLoc],
        home: Option<&Arc<FileLayout>>,
    ) -> Result<Vec<Bytes>, ChunkError> {
        let pending = self.cache.start(self, locs, Asked::Read, None, home);
        // While this read waits on the store, background work shrinks to its minimum.
        let _waiting = pending
            .iter()
            .any(|p| matches!(p, Pending::Fetching(_)))
            .then(|| ForegroundWait::new(&self.cache.gate));
        let mut out = Vec::with_capacity(locs.len());
        for (loc, p) in locs.iter().zip(pending) {
            let mut p = p;
            // A read that joined a background fetch as it was being cancelled (another
            // mount's, gone) starts its own; a few times at most, in case of a race each time.
            for _ in 0..3 {
                let Pending::Fetching(fetch) = &p else { break };
                if !matches!(fetch.clone().await, Err(ChunkError::Cancelled { .. })) {
                    break;
                }
                p = self
                    .cache
                    .start(self, std::slice::from_ref(loc), Asked::Read, None, home)
                    .pop()
                    .expect("one chunk asked, one given");
            }
            let data = match p {
                Pending::Ready(data) => Ok(data),
                Pending::Fetching(fetch) => match fetch.await {
                    Ok((data, origin)) => {
                        self.bump(
                            |c| match origin {
                                Origin::Disk => &c.disk_hits,
                                Origin::Store => &c.store_hits,
                            },
                            1,
                        );
                        Ok(data)
                    }
                    Err(e) => Err(e),
                },
            };
            match data.and_then(|d| check_len(self, loc, d)) {
                Ok(d) => out.push(d),
                Err(e) => {
                    self.bump(|c| &c.errors, 1);
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// The bytes `range` of a chunk if they can be had without waiting on the store or on a
    /// fetch in flight: from memory, or read straight from a disk copy verified since start
    /// (only the range: a 4 KiB random read should not read a whole chunk). Blocking (disk);
    /// `None` means: use [`ChunkReader::get_many`].
    pub fn get_local(&self, loc: &ChunkLoc, range: std::ops::Range<usize>) -> Option<Bytes> {
        if range.end > loc.len as usize {
            return None;
        }
        {
            let inflight = self
                .cache
                .inflight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut memory = self
                .cache
                .memory
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(data) = memory.get(&loc.digest) {
                if data.len() != loc.len as usize {
                    return None; // get_many reports the mismatch
                }
                self.bump(|c| &c.chunk_requests, 1);
                self.bump(|c| &c.memory_hits, 1);
                return Some(data.slice(range));
            }
            if inflight.contains_key(&loc.digest) {
                return None;
            }
        }
        let data = self.cache.disk.as_ref()?.read_range(&loc.digest, range)?;
        self.bump(|c| &c.chunk_requests, 1);
        self.bump(|c| &c.disk_hits, 1);
        Some(Bytes::from(data))
    }

    /// Starts fetching chunks in the background (readahead); errors are left for the reader
    /// that eventually asks for them. Background fetches have a budget of their own: when it is
    /// spent the rest is skipped, so readahead never queues ahead of reads a function is
    /// waiting on. Chunks of the file of `home` are cached in its local copy.
    pub fn prefetch(&self, locs: &[ChunkLoc], home: Option<&Arc<FileLayout>>) {
        let mut wanted = Vec::new();
        let mut permits = Vec::new();
        {
            let memory = self
                .cache
                .memory
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for loc in locs {
                if memory.lru.contains(&loc.digest) {
                    continue;
                }
                match self.cache.prefetch_budget.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
                wanted.push(*loc);
            }
        }
        if wanted.is_empty() {
            return;
        }
        let pending = self
            .cache
            .start(self, &wanted, Asked::Readahead, None, home);
        tokio::spawn(async move {
            for p in pending {
                if let Pending::Fetching(f) = p {
                    let _ = f.await;
                }
            }
            drop(permits);
        });
    }

    /// Fetches into the cache, as background work (see [`Gate`]), the chunks of `locs` that are
    /// neither in memory nor on disk, and waits for them. Returns the stored bytes fetched
    /// (what the store was asked for). Errors are not reported: a reader that needs a chunk
    /// that failed fetches it again and sees the error.
    /// Runs that have not reached the store when `cancelled` is set end without fetching.
    /// A run another mount started and cancelled is started again. Chunks of the file of
    /// `home` are cached in its local copy.
    pub async fn fetch_background(
        &self,
        locs: &[ChunkLoc],
        home: Option<&Arc<FileLayout>>,
        kind: BackgroundKind,
        cancelled: &Arc<AtomicBool>,
    ) -> u64 {
        let wanted: Vec<ChunkLoc> = {
            let memory = self
                .cache
                .memory
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let on_disk = |d: &Digest| {
                self.cache
                    .disk
                    .as_ref()
                    .is_some_and(|disk| disk.contains(d))
            };
            let mut seen = std::collections::HashSet::new();
            locs.iter()
                .filter(|l| seen.insert(l.digest))
                .filter(|l| !memory.lru.contains(&l.digest) && !on_disk(&l.digest))
                .copied()
                .collect()
        };
        if wanted.is_empty() {
            return 0;
        }
        let asked: u64 = wanted.iter().map(|l| l.stored_len as u64).sum();
        let gating = match kind {
            BackgroundKind::Deferred => Gating::Deferred,
            BackgroundKind::Bulk => Gating::Bulk(Arc::new(tokio::sync::Semaphore::new(BULK_GETS))),
        };
        let mut todo = wanted;
        for _ in 0..3 {
            let pending = self.cache.start(
                self,
                &todo,
                Asked::Background(gating.clone()),
                Some(cancelled),
                home,
            );
            // Awaited as they finish, so each run's bytes go as soon as it is done (a whole
            // file's runs finish in no fixed order).
            let mut waits: futures::stream::FuturesUnordered<_> = todo
                .iter()
                .zip(pending)
                .filter_map(|(loc, p)| match p {
                    Pending::Fetching(f) => Some(async move {
                        matches!(f.await, Err(ChunkError::Cancelled { .. })).then_some(*loc)
                    }),
                    Pending::Ready(_) => None,
                })
                .collect();
            let mut again = Vec::new();
            while let Some(cancelled_run) = futures::StreamExt::next(&mut waits).await {
                again.extend(cancelled_run);
            }
            drop(waits);
            if again.is_empty() || cancelled.load(Ordering::Acquire) {
                break;
            }
            todo = again;
        }
        asked
    }

    /// Wakes background fetches waiting for a slot, to see that they were cancelled.
    pub fn wake_background(&self) {
        self.cache.gate.changed.notify_waiters();
    }

    /// Background GETs that had to wait for a slot, since start (the whole cache's).
    pub fn background_waits(&self) -> u64 {
        self.cache.gate.background_waits.load(Ordering::Relaxed)
    }

    /// Counts one file read of `bytes` bytes answered.
    pub fn record_read(&self, bytes: u64) {
        self.bump(|c| &c.reads, 1);
        self.bump(|c| &c.bytes_served, bytes);
    }

    /// Counts an open handed to the kernel (FUSE passthrough).
    pub fn record_passthrough_open(&self) {
        self.bump(|c| &c.passthrough_opens, 1);
    }

    /// Counts an open whose file's bytes went to the kernel's page cache with it.
    pub fn record_prefilled_open(&self) {
        self.bump(|c| &c.prefilled_opens, 1);
    }

    /// Counts a failed file read that never reached the cache (bad range, missing entry).
    pub fn record_error(&self) {
        self.bump(|c| &c.errors, 1);
    }

    pub fn stats(&self) -> ReadStats {
        self.counters.snapshot()
    }

    /// Adds to a counter of this reader and of the whole cache.
    fn bump(&self, field: impl Fn(&Counters) -> &AtomicU64, n: u64) {
        field(&self.counters).fetch_add(n, Ordering::Relaxed);
        field(&self.cache.counters).fetch_add(n, Ordering::Relaxed);
    }
}

impl ChunkCache {
    pub fn new(config: &CacheConfig) -> std::io::Result<Arc<ChunkCache>> {
        let disk = match &config.disk_dir {
            Some(dir) => Some(DiskCache::open(dir, config.disk_capacity)?),
            None => None,
        };
        Ok(Arc::new(ChunkCache {
            disk,
            assembling: Mutex::new(Default::default()),
            memory: Mutex::new(MemoryLru {
                lru: LruCache::unbounded(),
                used: 0,
                capacity: config.memory_capacity,
            }),
            inflight: Mutex::new(HashMap::new()),
            gate: Gate::default(),
            counters: Counters::default(),
            fetch_deadline: config.fetch_deadline,
            prefetch_budget: Arc::new(tokio::sync::Semaphore::new(PREFETCH_BUDGET)),
            whole_files: Arc::new(tokio::sync::Semaphore::new(WHOLE_FILES_AT_ONCE)),
            low_priority: LowPriorityPool::new(
                std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
            )?,
            moved: Mutex::new(MovedMaps {
                maps: LruCache::unbounded(),
                moves: 0,
            }),
            any_moved: AtomicBool::new(false),
        }))
    }

    /// A reader of chunks from `store` through this cache, with counters of its own.
    /// Keeps a chunk this host made (a commit's) on disk, as if it had been fetched.
    pub fn admit(&self, digest: &Digest, data: &[u8]) {
        if let Some(disk) = &self.disk {
            disk.insert(digest, data);
        }
    }

    pub fn reader(self: &Arc<Self>, store: Arc<dyn Store>) -> ChunkReader {
        ChunkReader {
            cache: Arc::clone(self),
            store,
            counters: Arc::new(Counters::default()),
        }
    }

    /// Finds each chunk in memory or in flight, and starts fetches for the rest: one task per
    /// run of chunks that adjoin in a pack. Reads a function waits on count as requests and
    /// memory hits, and make a background fetch they join urgent.
    fn start(
        self: &Arc<Self>,
        reader: &ChunkReader,
        locs: &[ChunkLoc],
        asked: Asked,
        cancelled: Option<&Arc<AtomicBool>>,
        home: Option<&Arc<FileLayout>>,
    ) -> Vec<Pending> {
        enum Slot {
            Done(Pending),
            New(usize),
        }
        let counted = matches!(asked, Asked::Read);
        let (priority, gating) = match asked {
            Asked::Read | Asked::Readahead => (Priority::Foreground, Gating::Open),
            Asked::Background(gating) => (Priority::Background, gating),
        };
        let mut slots = Vec::with_capacity(locs.len());
        let mut new: Vec<ChunkLoc> = Vec::new();
        // Where each chunk of `new` is: a whole file's chunks come in one call.
        let mut new_at: HashMap<Digest, usize> = HashMap::new();
        let mut promoted = false;
        let mut inflight = self
            .inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        {
            // Memory is checked under the in-flight lock: a fetch inserts its chunks into
            // memory before it leaves the in-flight table.
            let mut memory = self
                .memory
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for loc in locs {
                if counted {
                    reader.bump(|c| &c.chunk_requests, 1);
                }
                if let Some(data) = memory.get(&loc.digest) {
                    if counted {
                        reader.bump(|c| &c.memory_hits, 1);
                    }
                    slots.push(Slot::Done(Pending::Ready(data)));
                } else if let Some(f) = inflight.get(&loc.digest) {
                    if priority == Priority::Foreground && !f.urgent.swap(true, Ordering::AcqRel) {
                        promoted = true;
                        f.wake.notify_one();
                    }
                    slots.push(Slot::Done(Pending::Fetching(f.fetch.clone())));
                } else if let Some(&i) = new_at.get(&loc.digest) {
                    slots.push(Slot::New(i));
                } else {
                    new_at.insert(loc.digest, new.len());
                    slots.push(Slot::New(new.len()));
                    new.push(*loc);
                }
            }
        }
        if promoted {
            self.gate.changed.notify_waiters();
        }
        let mut fetches: Vec<Fetch> = Vec::with_capacity(new.len());
        let run_bytes = match gating {
            Gating::Open => MAX_RUN_BYTES,
            Gating::Deferred => BACKGROUND_RUN_BYTES,
            Gating::Bulk(_) => BULK_RUN_BYTES,
        };
        let mut i = 0;
        while i < new.len() {
            let mut end = i + 1;
            let mut bytes = new[i].stored_len as u64;
            while end < new.len()
                && new[end - 1].adjoins(&new[end])
                && bytes + new[end].stored_len as u64 <= run_bytes
            {
                bytes += new[end].stored_len as u64;
                end += 1;
            }
            let run: Vec<ChunkLoc> = new[i..end].to_vec();
            let this = Arc::clone(self);
            let leader = reader.clone();
            let digests: Vec<Digest> = run.iter().map(|l| l.digest).collect();
            let urgent = Arc::new(AtomicBool::new(priority == Priority::Foreground));
            let wake = Arc::new(tokio::sync::Notify::new());
            let task = {
                let urgent = urgent.clone();
                let wake = wake.clone();
                let cancelled = cancelled.cloned().unwrap_or_default();
                let home = home.cloned();
                let gating = gating.clone();
                tokio::spawn(async move {
                    Arc::new(
                        this.load_run(&leader, run, (&urgent, &wake), &cancelled, gating, home)
                            .await,
                    )
                })
            };
            let run_fetch = async move {
                task.await.unwrap_or_else(|e| {
                    let failed = |digest| ChunkError::Failed {
                        digest,
                        reason: format!("fetch task failed: {e}"),
                    };
                    Arc::new(digests.into_iter().map(|d| Err(failed(d))).collect())
                })
            }
            .boxed()
            .shared();
            for (k, loc) in new[i..end].iter().enumerate() {
                let fetch = run_fetch
                    .clone()
                    .map(move |r| r[k].clone())
                    .boxed()
                    .shared();
                inflight.insert(
                    loc.digest,
                    InFlight {
                        fetch: fetch.clone(),
                        urgent: urgent.clone(),
                        wake: wake.clone(),
                    },
                );
                fetches.push(fetch);
            }
            i = end;
        }
        drop(inflight);
        slots
            .into_iter()
            .map(|s| match s {
                Slot::Done(p) => p,
                Slot::New(i) => Pending::Fetching(fetches[i].clone()),
            })
            .collect()
    }

    /// Loads a run of chunks that adjoin in one pack: from the disk cache where it has them,
    /// the rest with one ranged GET. Every chunk loaded goes into memory (or, for background
    /// work nobody joined, onto disk) before the run leaves the in-flight table. Chunks
    /// fetched go to disk once: into the local copy of `home`'s file where it has a place for
    /// them, else as chunk files.
    async fn load_run(
        self: &Arc<Self>,
        reader: &ChunkReader,
        run: Vec<ChunkLoc>,
        // Whether a foreground read joined the run, and its wake-up when one does.
        (urgent, wake): (&AtomicBool, &tokio::sync::Notify),
        cancelled: &AtomicBool,
        gating: Gating,
        home: Option<Arc<FileLayout>>,
    ) -> Vec<Loaded> {
        let _leave = LeaveInflight(Arc::clone(self), run.iter().map(|l| l.digest).collect());
        let mut results: Vec<Option<Result<(Bytes, Origin), ChunkError>>> = vec![None; run.len()];
        // A cold read finds none of its chunks on disk: skip the hop to a blocking thread.
        let on_disk = self
            .disk
            .as_ref()
            .is_some_and(|d| run.iter().any(|l| d.contains(&l.digest)));
        if on_disk {
            let this = Arc::clone(self);
            let digests: Vec<(Digest, u32)> = run.iter().map(|l| (l.digest, l.len)).collect();
            let reads = tokio::task::spawn_blocking(move || {
                let disk = this.disk.as_ref().expect("checked above");
                digests
                    .iter()
                    .map(|(d, len)| match disk.read(d) {
                        DiskRead::Hit(data) if data.len() == *len as usize => Some(data),
                        DiskRead::Corrupt => None,
                        _ => Some(Vec::new()),
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            for (i, read) in reads.into_iter().enumerate() {
                match read {
                    Some(data) if !data.is_empty() => {
                        results[i] = Some(Ok((Bytes::from(data), Origin::Disk)));
                    }
                    Some(_) => {}
                    None => reader.bump(|c| &c.corrupt_chunks, 1),
                }
            }
        }
        let missing: Vec<usize> = (0..run.len()).filter(|&i| results[i].is_none()).collect();
        let mut keep_in_memory = true;
        if let (Some(&first), Some(&last)) = (missing.first(), missing.last()) {
            // Background work waits for a slot or a permit (a foreground read that joins the
            // run meanwhile lets it through at once); foreground runs go straight to the
            // store. What it holds is held until the run's chunks are checked and written:
            // background work whose decoding falls behind (at low priority, on a busy host)
            // then fetches no more than it can decode.
            let unwanted = || {
                run.iter()
                    .map(|l| Err(ChunkError::Cancelled { digest: l.digest }))
            };
            // Nobody wants these any more (the mount is gone): the run ends unfetched, and a
            // later reader fetches afresh.
            let _held = if urgent.load(Ordering::Acquire) {
                Held::Nothing
            } else {
                match &gating {
                    Gating::Open if cancelled.load(Ordering::Acquire) => {
                        return unwanted().collect()
                    }
                    Gating::Open => Held::Nothing,
                    Gating::Deferred => match self.gate.background_slot(urgent, cancelled).await {
                        Some(slot) => Held::Background { _slot: slot },
                        None => return unwanted().collect(),
                    },
                    Gating::Bulk(permits) => {
                        match bulk_permit(permits, urgent, wake, cancelled).await {
                            Ok(Some(permit)) => Held::Bulk { _permit: permit },
                            Ok(None) => Held::Nothing,
                            Err(()) => return unwanted().collect(),
                        }
                    }
                }
            };
            let fetched = self
                .fetch_verified(
                    reader,
                    &run[first..=last],
                    &missing.iter().map(|i| i - first).collect::<Vec<_>>(),
                    matches!(gating, Gating::Deferred),
                    urgent,
                    0,
                )
                .await;
            let mut to_disk = Vec::new();
            for (&i, r) in missing.iter().zip(fetched) {
                if let Ok(data) = &r {
                    to_disk.push((run[i].digest, data.clone()));
                }
                results[i] = Some(r.map(|d| (d, Origin::Store)));
            }
            if self.disk.is_some() && !to_disk.is_empty() {
                let this = Arc::clone(self);
                let write = move || {
                    if let Some(disk) = &this.disk {
                        for (d, data) in to_disk {
                            match &home {
                                Some(home) => disk.store_part(home, &d, &data),
                                None => disk.insert(&d, &data),
                            }
                        }
                    }
                };
                if urgent.load(Ordering::Acquire) {
                    // Caching is best effort and off the reader's path: the reader has its
                    // bytes, and the chunks stay in memory while the files are written.
                    drop(tokio::task::spawn_blocking(write));
                } else {
                    // Background work nobody waits on is done once its chunks are on disk;
                    // they stay out of memory, where they would push out what readers use.
                    let _ = tokio::task::spawn_blocking(write).await;
                    keep_in_memory = false;
                }
            }
        }
        let mut memory = self
            .memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        results
            .into_iter()
            .zip(&run)
            .map(|(r, loc)| {
                let r = r.expect("every chunk of the run was loaded or failed");
                if let (Ok((data, _)), true) = (&r, keep_in_memory) {
                    memory.insert(loc.digest, data.clone());
                }
                r
            })
            .collect()
    }

    /// GETs the stored bytes of `span` (chunks adjoining in one pack) with one ranged GET and
    /// verifies the chunks at positions `wanted`, trying once more if any are wrong (a corrupt
    /// object in the store stays corrupt, but a damaged transfer does not). Verified at low
    /// CPU priority if `low_priority` (deferred background work) and not `urgent` (no reader
    /// joined, or not before the verification started).
    ///
    /// A pack gc rewrote is read where its forwarding map says (`hops` maps followed so far).
    fn fetch_verified<'a>(
        &'a self,
        reader: &'a ChunkReader,
        span: &'a [ChunkLoc],
        wanted: &'a [usize],
        low_priority: bool,
        urgent: &'a AtomicBool,
        hops: u8,
    ) -> BoxFuture<'a, Vec<Result<Bytes, ChunkError>>> {
        async move {
            let first = span[0];
            // Most hosts never meet a rewritten pack: their reads skip the lookup.
            let cached = match self.any_moved.load(Ordering::Relaxed) {
                true => {
                    let key = (reader.store.url().to_string(), first.pack);
                    self.moved_map(&key).map(|m| (key, m))
                }
                false => None,
            };
            if let Some((cache_key, map)) = cached {
                let got = self
                    .fetch_moved(reader, &map, span, wanted, (low_priority, urgent), hops, false)
                    .await;
                let gone = got.iter().any(|r| {
                    matches!(r, Err(ChunkError::Store { source, .. }) if source.kind == StoreErrorKind::NotFound)
                });
                if !gone {
                    return got;
                }
                // The map was rewritten since (the pack it pointed into was rewritten too):
                // read it again.
                self.forget_moved_map(&cache_key);
            }
            self.fetch_from_pack(reader, span, wanted, low_priority, urgent, hops)
                .await
        }
        .boxed()
    }

    fn moved_map(&self, key: &(String, Digest)) -> Option<Arc<PackMoves>> {
        self.moved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
    }

    fn forget_moved_map(&self, key: &(String, Digest)) {
        self.moved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop(key);
    }

    /// Fetches the chunks `wanted` of `span` (all in `map`'s old pack) from where the map
    /// says they are now, grouping those that are close in one new pack into one GET. A chunk
    /// the map does not hold is read from the old pack, unless that is known to be gone.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_moved(
        &self,
        reader: &ChunkReader,
        map: &PackMoves,
        span: &[ChunkLoc],
        wanted: &[usize],
        (low_priority, urgent): (bool, &AtomicBool),
        hops: u8,
        pack_gone: bool,
    ) -> Vec<Result<Bytes, ChunkError>> {
        let mut results: Vec<Option<Result<Bytes, ChunkError>>> = vec![None; wanted.len()];
        // Runs of (position in `wanted`, new location), each in one pack, offsets rising.
        let mut runs: Vec<Vec<(usize, ChunkLoc)>> = Vec::new();
        // Chunks the map does not hold: (position in `wanted`, location in the old pack).
        let mut unheld: Vec<(usize, ChunkLoc)> = Vec::new();
        for (at, &i) in wanted.iter().enumerate() {
            let Some(new) = map.relocate(&span[i]) else {
                unheld.push((at, span[i]));
                continue;
            };
            match runs.last_mut() {
                Some(run)
                    if run.last().is_some_and(|(_, prev): &(usize, ChunkLoc)| {
                        let end = prev.pack_offset + prev.stored_len as u64;
                        prev.pack == new.pack
                            && new.pack_offset >= end
                            && new.pack_offset - end <= MOVED_GAP
                    }) =>
                {
                    run.push((at, new))
                }
                _ => runs.push(vec![(at, new)]),
            }
        }
        if hops >= MOVED_HOPS {
            for run in &runs {
                for (at, loc) in run {
                    results[*at] = Some(Err(ChunkError::Failed {
                        digest: loc.digest,
                        reason: format!("pack {} was moved more than {MOVED_HOPS} times", loc.pack),
                    }));
                }
            }
            runs.clear();
        }
        for run in runs {
            let locs: Vec<ChunkLoc> = run.iter().map(|(_, l)| *l).collect();
            let all: Vec<usize> = (0..locs.len()).collect();
            let got = self
                .fetch_verified(reader, &locs, &all, low_priority, urgent, hops + 1)
                .await;
            for ((at, _), r) in run.iter().zip(got) {
                results[*at] = Some(r);
            }
        }
        if !unheld.is_empty() {
            let got = if pack_gone {
                unheld
                    .iter()
                    .map(|(_, loc)| {
                        Err(ChunkError::Failed {
                            digest: loc.digest,
                            reason: format!(
                                "pack {} was rewritten by gc and its forwarding map does not hold this chunk",
                                loc.pack
                            ),
                        })
                    })
                    .collect()
            } else {
                // A map read while its old pack is still there (a collection stopped before
                // deleting it) may not hold every chunk of it.
                let locs: Vec<ChunkLoc> = unheld.iter().map(|(_, l)| *l).collect();
                let all: Vec<usize> = (0..locs.len()).collect();
                Box::pin(self.fetch_from_pack(reader, &locs, &all, low_priority, urgent, hops))
                    .await
            };
            for ((at, _), r) in unheld.iter().zip(got) {
                results[*at] = Some(r);
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every wanted chunk was fetched or failed"))
            .collect()
    }

    /// Reads the forwarding map of `pack` (gone from the store), if gc left one; store trouble
    /// is retried as for packs.
    async fn load_moved_map(
        &self,
        reader: &ChunkReader,
        digest: Digest,
        pack: Digest,
    ) -> Result<Option<Arc<PackMoves>>, ChunkError> {
        let key = moved_key(&pack);
        // A map damaged in transit is fetched again; one damaged in the store stays so.
        for _ in 0..3 {
            let Some(pieces) = self
                .get_with_retries(reader, digest, &key, 0..MAX_MOVED_MAP)
                .await?
            else {
                return Ok(None);
            };
            if let Some(map) = PackMoves::parse(pack, &pieces.join()) {
                let map = Arc::new(map);
                self.any_moved.store(true, Ordering::Relaxed);
                self.moved
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .put((reader.store.url().to_string(), pack), Arc::clone(&map));
                return Ok(Some(map));
            }
            tracing::warn!(%pack, "damaged forwarding map; reading it again");
        }
        Err(ChunkError::Corrupt {
            digest,
            store: reader.store.url().to_string(),
            reason: format!("the forwarding map of moved pack {pack} is damaged"),
        })
    }

    async fn fetch_from_pack(
        &self,
        reader: &ChunkReader,
        span: &[ChunkLoc],
        wanted: &[usize],
        low_priority: bool,
        urgent: &AtomicBool,
        hops: u8,
    ) -> Vec<Result<Bytes, ChunkError>> {
        let first = span[0];
        let start = first.pack_offset;
        let end = span[span.len() - 1].pack_offset + span[span.len() - 1].stored_len as u64;
        let key = pack_key(&first.pack);
        let store = reader.store.url();
        let mut attempt = 0;
        let mut missing_tries = 0u32;
        loop {
            attempt += 1;
            let object = match self
                .get_with_retries(reader, first.digest, &key, start..end)
                .await
            {
                Ok(Some(o)) => o,
                Ok(None) => {
                    // The pack is gone: gc rewrote it if it left a forwarding map.
                    match self.load_moved_map(reader, first.digest, first.pack).await {
                        Ok(Some(map)) => {
                            return self
                                .fetch_moved(
                                    reader,
                                    &map,
                                    span,
                                    wanted,
                                    (low_priority, urgent),
                                    hops,
                                    true,
                                )
                                .await
                        }
                        // Reached through a map: most likely a map kept from before the pack
                        // it names was rewritten too, which the caller reads again.
                        Ok(None) if missing_tries < 2 && hops == 0 => {
                            // A pack a live layer names is never deleted while mounted (see
                            // gc's leases) without a map, so a missing one is either damage or
                            // a server answering wrongly under load: asked again a few times
                            // before the read fails.
                            missing_tries += 1;
                            attempt -= 1;
                            let pause = Duration::from_millis(200) * missing_tries;
                            tracing::warn!(pack = %first.pack, "pack not found; asking again in {pause:?}");
                            tokio::time::sleep(pause).await;
                            continue;
                        }
                        Ok(None) => {
                            let e = ChunkError::Store {
                                digest: first.digest,
                                source: Arc::new(StoreError::new(
                                    store,
                                    "get",
                                    &key,
                                    StoreErrorKind::NotFound,
                                    "no such pack, and no forwarding map",
                                )),
                            };
                            return wanted.iter().map(|_| Err(e.clone())).collect();
                        }
                        Err(e) => return wanted.iter().map(|_| Err(e.clone())).collect(),
                    }
                }
                Err(e) => return wanted.iter().map(|_| Err(e.clone())).collect(),
            };
            reader.bump(|c| &c.store_bytes, object.len() as u64);
            let locs: Vec<ChunkLoc> = wanted.iter().map(|&i| span[i]).collect();
            let verify = move || {
                locs.iter()
                    .map(|loc| {
                        let from = (loc.pack_offset - start) as usize;
                        let to = from + loc.stored_len as usize;
                        let Some(stored) = object.slice(from, to) else {
                            return Err(format!(
                                "the pack answered {} bytes, short of the chunk at {}",
                                object.len(),
                                loc.pack_offset
                            ));
                        };
                        blob::decode_verified(&stored, &loc.digest, loc.len as usize)
                            .map_err(|e| e.to_string())
                            .and_then(|plain| {
                                if plain.len() == loc.len as usize {
                                    Ok(plain)
                                } else {
                                    Err(format!("expected {} bytes, got {}", loc.len, plain.len()))
                                }
                            })
                    })
                    .collect::<Vec<_>>()
            };
            // Deferred background work nobody waits on yields the cores to work that someone
            // does (a whole-file fetch has a reader waiting soon: it keeps normal priority).
            let verified = if !low_priority || urgent.load(Ordering::Acquire) {
                tokio::task::spawn_blocking(verify)
                    .await
                    .map_err(|e| e.to_string())
            } else {
                self.low_priority
                    .run_unless(verify, urgent, &self.gate.changed)
                    .await
                    .ok_or_else(|| "it panicked".to_string())
            }
            .unwrap_or_else(|e| vec![Err(format!("verification task failed: {e}")); wanted.len()]);
            let bad = verified.iter().filter(|r| r.is_err()).count();
            reader.bump(|c| &c.chunks_fetched, (verified.len() - bad) as u64);
            if bad == 0 || attempt >= 2 {
                return verified
                    .into_iter()
                    .zip(wanted)
                    .map(|(r, &i)| {
                        r.map_err(|reason| {
                            reader.bump(|c| &c.corrupt_chunks, 1);
                            tracing::error!(chunk = %span[i].digest, store, pack = %span[i].pack,
                                "chunk from store failed verification: {reason}");
                            ChunkError::Corrupt {
                                digest: span[i].digest,
                                store: store.to_string(),
                                reason,
                            }
                        })
                    })
                    .collect();
            }
            tracing::warn!(store, pack = %first.pack, "{bad} chunk(s) failed verification; fetching again");
        }
    }

    /// GETs a range of an object (a pack, or a forwarding map) as the pieces it arrived in,
    /// retrying store trouble (outages, timeouts, 5xx) with backoff until the fetch deadline,
    /// so a store that comes back in time only delays the read and one that does not fails it
    /// instead of hanging it. A missing object is `None`, at once.
    async fn get_with_retries(
        &self,
        reader: &ChunkReader,
        digest: Digest,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Option<Pieces>, ChunkError> {
        let deadline = Instant::now() + self.fetch_deadline;
        let mut backoff = Duration::from_millis(200);
        loop {
            reader.bump(|c| &c.store_gets, 1);
            let remaining = deadline.saturating_duration_since(Instant::now());
            let get = reader.store.get_range_pieces(key, range.clone());
            let started = Instant::now();
            let last_error = match tokio::time::timeout(remaining, get).await {
                Ok(Ok(pieces)) => {
                    let took = started.elapsed();
                    reader.counters.observe_fetch(took);
                    reader.cache.counters.observe_fetch(took);
                    return Ok(Some(Pieces::new(pieces)));
                }
                Ok(Err(e)) if e.kind == StoreErrorKind::NotFound => return Ok(None),
                Ok(Err(e)) if e.kind != StoreErrorKind::Io => {
                    return Err(ChunkError::Store {
                        digest,
                        source: Arc::new(e),
                    })
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".to_string(),
            };
            if Instant::now() + backoff >= deadline {
                return Err(ChunkError::Timeout {
                    digest,
                    store: reader.store.url().to_string(),
                    after: self.fetch_deadline,
                    last_error,
                });
            }
            tracing::warn!(chunk = %digest, "store trouble, retrying in {backoff:?}: {last_error}");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Counts cached chunks (or parts of local copies) found corrupt outside any read.
    pub(crate) fn count_corrupt(&self, n: u64) {
        self.counters.corrupt_chunks.fetch_add(n, Ordering::Relaxed);
    }

    /// A slot for fetching a whole file in the background, if one is free (held while it
    /// runs).
    pub fn whole_file_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.whole_files.clone().try_acquire_owned().ok()
    }

    /// Bytes the disk cache may hold (0 without one).
    pub fn disk_capacity(&self) -> u64 {
        self.disk.as_ref().map_or(0, |d| d.capacity())
    }

    pub fn stats(&self) -> CacheStats {
        let memory = self
            .memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        CacheStats {
            reads: self.counters.snapshot(),
            memory_used: memory.used,
            memory_capacity: memory.capacity,
            disk_used: self.disk.as_ref().map_or(0, |d| d.used()),
            disk_capacity: self.disk.as_ref().map_or(0, |d| d.capacity()),
            disk_chunks: self.disk.as_ref().map_or(0, |d| d.chunks()),
            disk_files: self.disk.as_ref().map_or(0, |d| d.files()),
            disk_evictions: self.disk.as_ref().map_or(0, |d| d.evictions()),
        }
    }
}

/// A manifest may claim two lengths for one chunk; cached bytes are only served to a caller
/// that expects their length, so no reader slices past what it got.
fn check_len(reader: &ChunkReader, loc: &ChunkLoc, data: Bytes) -> Result<Bytes, ChunkError> {
    if data.len() == loc.len as usize {
        return Ok(data);
    }
    Err(ChunkError::Corrupt {
        digest: loc.digest,
        store: reader.store.url().to_string(),
        reason: format!(
            "the layer says {} bytes, the chunk has {}",
            loc.len,
            data.len()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_store::local::LocalStore;

    /// A local store holding `chunks` in one pack, and a reader through a fresh cache.
    async fn setup(chunks: &[Vec<u8>]) -> (tempfile::TempDir, ChunkReader, Vec<ChunkLoc>) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("store");
        let store = LocalStore::open("test", root.to_str().unwrap()).unwrap();
        let mut pack = Vec::new();
        let mut locs = Vec::new();
        for c in chunks {
            let stored = blob::encode(c);
            locs.push(ChunkLoc {
                digest: Digest::of(c),
                len: c.len() as u32,
                pack: Digest([0; 32]),
                pack_offset: pack.len() as u64,
                stored_len: stored.len() as u32,
            });
            pack.extend_from_slice(&stored);
        }
        let pack_digest = Digest::of(&pack);
        for l in &mut locs {
            l.pack = pack_digest;
        }
        store
            .put(&pack_key(&pack_digest), Bytes::from(pack))
            .await
            .unwrap();
        let cache = ChunkCache::new(&CacheConfig {
            disk_dir: Some(tmp.path().join("cache")),
            disk_capacity: 1 << 20,
            memory_capacity: 1 << 20,
            fetch_deadline: DEFAULT_FETCH_DEADLINE,
        })
        .unwrap();
        (tmp, cache.reader(Arc::new(store)), locs)
    }

    #[tokio::test]
    async fn a_moved_pack_is_read_through_its_map_and_what_the_map_lacks_from_the_old_pack() {
        let chunks: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 5000 + i as usize]).collect();
        let (_tmp, reader, locs) = setup(&chunks).await;
        let store = Arc::clone(reader.store());
        let old = locs[0].pack;
        let pack = store.get(&pack_key(&old)).await.unwrap();
        // gc moved chunk 0 alone (say chunks 1 and 2 were dead then) into a new pack, at 7.
        let first = &pack[..locs[0].stored_len as usize];
        let mut moved = vec![0xEE; 7];
        moved.extend_from_slice(first);
        let new = Digest::of(&moved);
        store
            .put(&pack_key(&new), Bytes::from(moved))
            .await
            .unwrap();
        let map = PackMoves::new(
            old,
            vec![strata_cache_format::Move {
                from: 0,
                len: first.len() as u64,
                pack: new,
                to: 7,
            }],
        )
        .unwrap();
        store
            .put(&moved_key(&old), Bytes::from(map.encode()))
            .await
            .unwrap();
        store.delete(&pack_key(&old)).await.unwrap();
        let gets = reader.stats().store_gets;
        assert_eq!(&reader.get(&locs[0]).await.unwrap()[..], &chunks[0][..]);
        assert_eq!(
            reader.stats().store_gets - gets,
            3,
            "the old pack, its map, the new pack"
        );
        // A chunk the map lacks, with the old pack gone: an error, not wrong bytes.
        let err = reader.get(&locs[1]).await.unwrap_err().to_string();
        assert!(err.contains("forwarding map does not hold"), "{err}");
        // The old pack back (a collection stopped before deleting it): the map kept from
        // before does not hold chunk 2, which is read from the old pack.
        store.put(&pack_key(&old), pack).await.unwrap();
        assert_eq!(&reader.get(&locs[2]).await.unwrap()[..], &chunks[2][..]);
        // A damaged map is never believed.
        let other = reader.cache().reader(Arc::clone(&store));
        reader
            .cache()
            .forget_moved_map(&(store.url().to_string(), old));
        store.delete(&pack_key(&old)).await.unwrap();
        let mut bad = map.encode();
        bad[60] ^= 1;
        store.put(&moved_key(&old), Bytes::from(bad)).await.unwrap();
        let err = other.get(&locs[1]).await.unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_readers_cause_one_fetch() {
        let chunk: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let (_tmp, cache, locs) = setup(std::slice::from_ref(&chunk)).await;
        let readers: Vec<_> = (0..16)
            .map(|_| {
                let (cache, loc) = (cache.clone(), locs[0]);
                tokio::spawn(async move { cache.get(&loc).await.unwrap() })
            })
            .collect();
        for r in readers {
            assert_eq!(r.await.unwrap(), chunk);
        }
        assert_eq!(cache.stats().store_gets, 1);
        assert_eq!(cache.cache().stats().reads.store_gets, 1);
    }

    #[tokio::test]
    async fn adjoining_chunks_come_with_one_ranged_get_and_readahead_fills_memory() {
        let chunks: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i; 10_000 + i as usize]).collect();
        let (_tmp, cache, locs) = setup(&chunks).await;
        let got = cache.get_many(&locs[..3]).await.unwrap();
        assert_eq!(got, chunks[..3].to_vec());
        assert_eq!(
            cache.stats().store_gets,
            1,
            "three adjoining chunks, one GET"
        );
        cache.prefetch(&locs[3..], None);
        // The prefetch is in flight or done; asking joins it rather than fetching again.
        let got = cache.get_many(&locs[3..]).await.unwrap();
        assert_eq!(got, chunks[3..].to_vec());
        assert_eq!(cache.stats().store_gets, 2);
        assert_eq!(
            cache.stats().store_bytes,
            locs.iter().map(|l| l.stored_len as u64).sum::<u64>()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_reads_take_a_range_of_a_verified_disk_copy_and_nothing_else() {
        let chunk: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let (tmp, reader, locs) = setup(std::slice::from_ref(&chunk)).await;
        let loc = locs[0];
        assert!(reader.get_local(&loc, 0..10).is_none(), "nothing local yet");
        reader.get(&loc).await.unwrap();
        assert_eq!(
            reader.get_local(&loc, 5..9).unwrap(),
            chunk[5..9],
            "from memory"
        );
        // A fresh cache over the same dir: the chunk file is there but not verified yet.
        let wait_for_disk = std::time::Instant::now();
        while reader.cache().stats().disk_chunks == 0 {
            assert!(wait_for_disk.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let cache = ChunkCache::new(&CacheConfig {
            disk_dir: Some(tmp.path().join("cache")),
            disk_capacity: 1 << 20,
            memory_capacity: 0,
            fetch_deadline: DEFAULT_FETCH_DEADLINE,
        })
        .unwrap();
        let fresh = cache.reader(Arc::clone(reader.store()));
        assert!(
            fresh.get_local(&loc, 0..10).is_none(),
            "unverified copies are not read in part"
        );
        fresh.get(&loc).await.unwrap(); // loads it whole and verifies it (memory keeps nothing)
        assert_eq!(
            fresh.get_local(&loc, 100_000..100_100).unwrap(),
            chunk[100_000..100_100]
        );
        assert_eq!(fresh.stats().store_gets, 0);
        assert!(
            fresh.get_local(&loc, 0..300_000).is_none(),
            "past the chunk"
        );
    }

    /// A store that answers each GET after `delay`, at most `connections` at a time (as a
    /// client's connection pool does): work queued ahead of a read delays it.
    #[derive(Debug)]
    struct SlowStore {
        inner: Arc<dyn Store>,
        delay: Duration,
        connections: tokio::sync::Semaphore,
        /// The ranges asked for, in order, with their keys.
        ranges: std::sync::Mutex<Vec<(String, std::ops::Range<u64>)>>,
        /// GETs under way, and the most there were at once.
        under_way: AtomicUsize,
        most_at_once: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Store for SlowStore {
        fn url(&self) -> &str {
            self.inner.url()
        }
        async fn get(&self, key: &str) -> strata_store::StoreResult<Bytes> {
            self.inner.get(key).await
        }
        async fn get_range(
            &self,
            key: &str,
            range: std::ops::Range<u64>,
        ) -> strata_store::StoreResult<Bytes> {
            self.ranges
                .lock()
                .unwrap()
                .push((key.to_string(), range.clone()));
            let now = self.under_way.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_at_once.fetch_max(now, Ordering::SeqCst);
            let _c = self.connections.acquire().await.unwrap();
            tokio::time::sleep(self.delay).await;
            let got = self.inner.get_range(key, range).await;
            self.under_way.fetch_sub(1, Ordering::SeqCst);
            got
        }
        async fn head(&self, key: &str) -> strata_store::StoreResult<Option<u64>> {
            self.inner.head(key).await
        }
        async fn put(&self, key: &str, data: Bytes) -> strata_store::StoreResult<()> {
            self.inner.put(key, data).await
        }
        async fn get_versioned(
            &self,
            key: &str,
        ) -> strata_store::StoreResult<Option<(Bytes, strata_store::Version)>> {
            self.inner.get_versioned(key).await
        }
        async fn compare_and_swap(
            &self,
            key: &str,
            expected: Option<&strata_store::Version>,
            data: Bytes,
        ) -> strata_store::StoreResult<strata_store::Version> {
            self.inner.compare_and_swap(key, expected, data).await
        }
        async fn list(&self, prefix: &str) -> strata_store::StoreResult<Vec<String>> {
            self.inner.list(prefix).await
        }
        async fn list_info(
            &self,
            prefix: &str,
        ) -> strata_store::StoreResult<Vec<strata_store::ObjectInfo>> {
            self.inner.list_info(prefix).await
        }
        async fn delete(&self, key: &str) -> strata_store::StoreResult<()> {
            self.inner.delete(key).await
        }
    }

    /// `n` chunks of 64 KiB, each in a pack of its own (one GET each), behind a [`SlowStore`].
    async fn slow_setup(n: usize) -> (tempfile::TempDir, ChunkReader, Vec<ChunkLoc>, Vec<Vec<u8>>) {
        let (tmp, reader, locs, chunks, _) =
            packed_slow_setup(n, 1, Duration::from_millis(30)).await;
        (tmp, reader, locs, chunks)
    }

    /// `packs` packs of `per_pack` chunks of 64 KiB behind a [`SlowStore`] (returned too)
    /// whose GETs take `delay`.
    async fn packed_slow_setup(
        packs: usize,
        per_pack: usize,
        delay: Duration,
    ) -> (
        tempfile::TempDir,
        ChunkReader,
        Vec<ChunkLoc>,
        Vec<Vec<u8>>,
        Arc<SlowStore>,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("store");
        let local = LocalStore::open("test", root.to_str().unwrap()).unwrap();
        let mut locs = Vec::new();
        let mut chunks = Vec::new();
        for p in 0..packs {
            let mut pack = Vec::new();
            let first = locs.len();
            for k in 0..per_pack {
                let i = p * per_pack + k;
                let c: Vec<u8> = (0..65_536u32).map(|b| (b as usize * 7 + i) as u8).collect();
                let stored = blob::encode(&c);
                locs.push(ChunkLoc {
                    digest: Digest::of(&c),
                    len: c.len() as u32,
                    pack: Digest([0; 32]),
                    pack_offset: pack.len() as u64,
                    stored_len: stored.len() as u32,
                });
                pack.extend_from_slice(&stored);
                chunks.push(c);
            }
            let digest = Digest::of(&pack);
            for l in &mut locs[first..] {
                l.pack = digest;
            }
            local
                .put(&pack_key(&digest), Bytes::from(pack))
                .await
                .unwrap();
        }
        let store = Arc::new(SlowStore {
            inner: Arc::new(local),
            delay,
            connections: tokio::sync::Semaphore::new(4),
            ranges: Default::default(),
            under_way: Default::default(),
            most_at_once: Default::default(),
        });
        let cache = ChunkCache::new(&CacheConfig {
            disk_dir: Some(tmp.path().join("cache")),
            disk_capacity: 64 << 20,
            memory_capacity: 64 << 20,
            fetch_deadline: DEFAULT_FETCH_DEADLINE,
        })
        .unwrap();
        let reader = cache.reader(store.clone());
        (tmp, reader, locs, chunks, store)
    }

    /// A whole-file fetch (of a file read at random) asks for all its chunks at once, runs
    /// [`BULK_GETS`] GETs of them at a time, and a read of a chunk whose GET is still queued
    /// starts that GET at once and waits on it: the store is never asked for that chunk alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_joins_the_queued_get_of_a_whole_file_fetch() {
        let packs = BULK_GETS + 8;
        // GETs slow enough that none of the first ones ends before the read below asks.
        let (_tmp, reader, locs, chunks, store) =
            packed_slow_setup(packs, 4, Duration::from_millis(300)).await;
        let background = {
            let (reader, locs) = (reader.clone(), locs.clone());
            tokio::spawn(async move {
                reader
                    .fetch_background(&locs, None, BackgroundKind::Bulk, &Default::default())
                    .await
            })
        };
        // Wait until the first GETs went out, then read a chunk of a pack still queued.
        let t = Instant::now();
        let queued = loop {
            {
                let asked = store.ranges.lock().unwrap();
                if asked.len() >= BULK_GETS {
                    let queued = locs
                        .iter()
                        .rposition(|l| !asked.iter().any(|(key, _)| *key == pack_key(&l.pack)));
                    break queued.expect("more packs than GETs at once");
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the fetch never started"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        assert_eq!(reader.get(&locs[queued]).await.unwrap(), chunks[queued]);
        let asked = background.await.unwrap();
        assert_eq!(asked, locs.iter().map(|l| l.stored_len as u64).sum::<u64>());
        // The read's run went at once, beside the fetch's own GETs, without a permit.
        let most = store.most_at_once.load(Ordering::SeqCst);
        assert_eq!(most, BULK_GETS + 1, "GETs at once");
        let whole_packs: HashMap<String, std::ops::Range<u64>> = locs
            .chunks(4)
            .map(|p| {
                (
                    pack_key(&p[0].pack),
                    0..p[3].pack_offset + p[3].stored_len as u64,
                )
            })
            .collect();
        let ranges = store.ranges.lock().unwrap().clone();
        assert_eq!(
            ranges.len(),
            packs,
            "one GET per pack, none for the read: {ranges:?}"
        );
        for (key, range) in &ranges {
            assert_eq!(Some(range), whole_packs.get(key), "a GET of part of a pack");
        }
        for (loc, chunk) in locs.iter().zip(&chunks) {
            assert_eq!(&reader.get(loc).await.unwrap(), chunk);
        }
        assert_eq!(reader.stats().store_gets, packs as u64);
    }

    /// The background budget: a read a function waits on is not queued behind a large
    /// prefetch (60 GETs on a store that serves 4 at a time would hold it ~450 ms), and a read
    /// of a chunk the prefetch has not reached yet takes it over at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn foreground_reads_pass_a_large_background_fetch() {
        let (_tmp, reader, locs, chunks) = slow_setup(64).await;
        let background = {
            let (reader, locs) = (reader.clone(), locs[..60].to_vec());
            tokio::spawn(async move {
                reader
                    .fetch_background(&locs, None, BackgroundKind::Deferred, &Default::default())
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(40)).await;
        // A chunk the prefetch does not want, and one it wants last.
        for (i, what) in [(62, "a chunk of its own"), (59, "a queued prefetch chunk")] {
            let t = Instant::now();
            assert_eq!(reader.get(&locs[i]).await.unwrap(), chunks[i]);
            let took = t.elapsed();
            assert!(
                took < Duration::from_millis(250),
                "{what}: the read waited {took:?} behind background work"
            );
        }
        let asked = background.await.unwrap();
        assert!(asked > 0);
        assert!(
            reader.background_waits() > 0,
            "the budget held back some GETs"
        );
        for (loc, chunk) in locs[..60].iter().zip(&chunks) {
            assert_eq!(&reader.get(loc).await.unwrap(), chunk);
        }
        assert_eq!(
            reader.stats().store_gets,
            61,
            "every chunk fetched once, the read's own once"
        );
        // Everything is local now: a second background pass asks the store for nothing.
        assert_eq!(
            reader
                .fetch_background(
                    &locs[..60],
                    None,
                    BackgroundKind::Deferred,
                    &Default::default()
                )
                .await,
            0
        );
    }

    /// Background work of a mount that went away stops: runs that have not reached the store
    /// end unfetched, and later readers fetch those chunks themselves.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_background_work_stops_before_the_store() {
        let (_tmp, reader, locs, chunks) = slow_setup(64).await;
        let cancelled: Arc<AtomicBool> = Default::default();
        let background = {
            let (reader, locs, cancelled) = (reader.clone(), locs.clone(), cancelled.clone());
            tokio::spawn(async move {
                reader
                    .fetch_background(&locs, None, BackgroundKind::Deferred, &cancelled)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(40)).await;
        cancelled.store(true, Ordering::Release);
        reader.wake_background();
        let t = Instant::now();
        background.await.unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        let gets = reader.stats().store_gets;
        assert!(gets < 30, "{gets} of 64 GETs after the cancel");
        assert_eq!(reader.get(&locs[63]).await.unwrap(), chunks[63]);
    }

    /// A whole-file fetch of a mount that went away: the GETs under way finish, the queued
    /// runs drop out as their turn comes without reaching the store, and a later read fetches
    /// such a chunk itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_whole_file_fetch_stops_before_its_queued_gets() {
        let packs = BULK_GETS * 3;
        let (_tmp, reader, locs, chunks, store) =
            packed_slow_setup(packs, 4, Duration::from_millis(100)).await;
        let cancelled: Arc<AtomicBool> = Default::default();
        let background = {
            let (reader, locs, cancelled) = (reader.clone(), locs.clone(), cancelled.clone());
            tokio::spawn(async move {
                reader
                    .fetch_background(&locs, None, BackgroundKind::Bulk, &cancelled)
                    .await
            })
        };
        let t = Instant::now();
        while store.ranges.lock().unwrap().len() < BULK_GETS {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the fetch never started"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        cancelled.store(true, Ordering::Release);
        tokio::time::timeout(Duration::from_secs(10), background)
            .await
            .expect("the cancelled fetch ends")
            .unwrap();
        let gets = store.ranges.lock().unwrap().len();
        assert!(gets < packs, "{gets} of {packs} GETs after the cancel");
        let last = locs.len() - 1;
        assert_eq!(reader.get(&locs[last]).await.unwrap(), chunks[last]);
    }

    /// Regression: a manifest that gives one chunk two lengths got the cached bytes of the
    /// first length and sliced past their end.
    #[tokio::test]
    async fn a_chunk_asked_for_with_the_wrong_length_is_an_error() {
        let chunk = vec![3u8; 1000];
        let (_tmp, cache, locs) = setup(std::slice::from_ref(&chunk)).await;
        assert_eq!(cache.get(&locs[0]).await.unwrap().len(), 1000);
        let wrong = ChunkLoc {
            len: 1500,
            ..locs[0]
        };
        let err = cache.get(&wrong).await.unwrap_err();
        assert!(matches!(err, ChunkError::Corrupt { .. }), "{err}");
    }

    #[tokio::test]
    async fn corrupt_chunk_in_store_is_an_error_not_wrong_bytes() {
        let good = vec![5u8; 1000];
        let (tmp, cache, locs) = setup(std::slice::from_ref(&good)).await;
        let path = tmp.path().join("store").join(pack_key(&locs[0].pack));
        std::fs::write(&path, blob::encode(&[6u8; 1000])).unwrap();
        let err = cache.get(&locs[0]).await.unwrap_err();
        assert!(matches!(err, ChunkError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(&locs[0].digest.to_string()));
        assert_eq!(
            cache.stats().store_gets,
            2,
            "fetched once more before giving up"
        );
        // Missing entirely: a store error naming the pack.
        std::fs::remove_file(&path).unwrap();
        let err = cache.get(&locs[0]).await.unwrap_err();
        assert!(err.to_string().contains("packs/"), "{err}");
    }
}
