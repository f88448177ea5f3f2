//! The chunk cache a mount reads through: memory LRU → disk cache → store.
//!
//! A miss becomes one fetch no matter how many readers want the chunk (single-flight); the
//! fetch runs as its own task so an interrupted reader does not cancel it for the others. Bytes
//! from the store are decoded and BLAKE3-verified before anyone sees them; a chunk that fails
//! verification is fetched once more and then reported, never served.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use lru::LruCache;

use crate::disk_cache::{DiskCache, DiskRead};
use crate::{blob, chunk_key, Digest, Store, StoreError, StoreErrorKind};

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
    pub corrupt_chunks: u64,
    pub errors: u64,
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
    corrupt_chunks: AtomicU64,
    errors: AtomicU64,
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
            corrupt_chunks: get(&self.corrupt_chunks),
            errors: get(&self.errors),
        }
    }
}

struct MemoryLru {
    lru: LruCache<Digest, Bytes>,
    used: u64,
    capacity: u64,
}

impl MemoryLru {
    fn get(&mut self, digest: &Digest) -> Option<Bytes> {
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

type Fetch = Shared<BoxFuture<'static, Result<(Bytes, Origin), ChunkError>>>;

struct LeaveInflight(Arc<ChunkCache>, Digest);

impl Drop for LeaveInflight {
    fn drop(&mut self) {
        self.0.inflight.lock().unwrap().remove(&self.1);
    }
}

/// The host's chunk cache, shared by every mount whatever store it reads from: chunks are
/// named by their content, so a chunk fetched for one store serves any other that names it.
pub struct ChunkCache {
    disk: Option<DiskCache>,
    memory: Mutex<MemoryLru>,
    inflight: Mutex<HashMap<Digest, Fetch>>,
    counters: Counters,
    fetch_deadline: Duration,
    prefetch_budget: Arc<tokio::sync::Semaphore>,
}

/// Background fetches in flight at most.
const PREFETCH_BUDGET: usize = 16;

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

    /// The plain bytes of chunk `digest`, which must be `len` bytes long.
    pub async fn get(&self, digest: Digest, len: u32) -> Result<Bytes, ChunkError> {
        self.cache.get(self, digest, len, true).await
    }

    /// Starts fetching a chunk in the background (readahead); errors are left for the reader
    /// that eventually asks for it. Background fetches have a budget of their own: when it is
    /// spent the prefetch is skipped, so readahead never queues ahead of reads a function is
    /// waiting on.
    pub fn prefetch(&self, digest: Digest, len: u32) {
        if self.cache.memory.lock().unwrap().lru.contains(&digest) {
            return;
        }
        let Ok(permit) = self.cache.prefetch_budget.clone().try_acquire_owned() else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _ = this.cache.get(&this, digest, len, false).await;
            drop(permit);
        });
    }

    /// Counts one file read of `bytes` bytes answered.
    pub fn record_read(&self, bytes: u64) {
        self.bump(|c| &c.reads, 1);
        self.bump(|c| &c.bytes_served, bytes);
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
            memory: Mutex::new(MemoryLru {
                lru: LruCache::unbounded(),
                used: 0,
                capacity: config.memory_capacity,
            }),
            inflight: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            fetch_deadline: config.fetch_deadline,
            prefetch_budget: Arc::new(tokio::sync::Semaphore::new(PREFETCH_BUDGET)),
        }))
    }

    /// A reader of chunks from `store` through this cache, with counters of its own.
    pub fn reader(self: &Arc<Self>, store: Arc<dyn Store>) -> ChunkReader {
        ChunkReader {
            cache: Arc::clone(self),
            store,
            counters: Arc::new(Counters::default()),
        }
    }

    /// `counted`: a read a function waits on (not readahead), counted as a request and a hit.
    async fn get(
        self: &Arc<Self>,
        reader: &ChunkReader,
        digest: Digest,
        len: u32,
        counted: bool,
    ) -> Result<Bytes, ChunkError> {
        let count = |field: fn(&Counters) -> &AtomicU64| {
            if counted {
                reader.bump(field, 1);
            }
        };
        count(|c| &c.chunk_requests);
        if let Some(data) = self.memory.lock().unwrap().get(&digest) {
            count(|c| &c.memory_hits);
            return check_len(reader, digest, len, data);
        }
        let fetch = {
            let mut inflight = self.inflight.lock().unwrap();
            // Re-check memory under the in-flight lock: a fetch that just finished inserted
            // its chunk before leaving the in-flight table.
            if let Some(data) = self.memory.lock().unwrap().get(&digest) {
                count(|c| &c.memory_hits);
                return check_len(reader, digest, len, data);
            }
            inflight
                .entry(digest)
                .or_insert_with(|| {
                    let this = Arc::clone(self);
                    let leader = reader.clone();
                    let task = tokio::spawn(async move {
                        // Leave the in-flight table however the fetch ends (even by a panic),
                        // so a failed fetch is tried afresh by the next reader.
                        let _leave = LeaveInflight(Arc::clone(&this), digest);
                        let result = this.load(&leader, digest, len).await;
                        if let Ok((data, _)) = &result {
                            this.memory.lock().unwrap().insert(digest, data.clone());
                        }
                        result
                    });
                    async move {
                        task.await.unwrap_or_else(|e| {
                            Err(ChunkError::Failed {
                                digest,
                                reason: format!("fetch task failed: {e}"),
                            })
                        })
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        let result = match fetch.await {
            Ok((data, origin)) => {
                count(match origin {
                    Origin::Disk => |c| &c.disk_hits,
                    Origin::Store => |c| &c.store_hits,
                });
                check_len(reader, digest, len, data)
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            count(|c| &c.errors);
        }
        result
    }

    async fn load(
        self: &Arc<Self>,
        reader: &ChunkReader,
        digest: Digest,
        len: u32,
    ) -> Result<(Bytes, Origin), ChunkError> {
        if self.disk.is_some() {
            let this = Arc::clone(self);
            let read =
                tokio::task::spawn_blocking(move || this.disk.as_ref().map(|d| d.read(&digest)))
                    .await
                    .map_err(|e| ChunkError::Failed {
                        digest,
                        reason: format!("disk cache read task failed: {e}"),
                    })?;
            match read {
                Some(DiskRead::Hit(data)) if data.len() == len as usize => {
                    return Ok((Bytes::from(data), Origin::Disk));
                }
                Some(DiskRead::Corrupt) => reader.bump(|c| &c.corrupt_chunks, 1),
                _ => {}
            }
        }
        let data = self.fetch_verified(reader, digest, len).await?;
        if self.disk.is_some() {
            let this = Arc::clone(self);
            let copy = data.clone();
            // Caching is best effort and off the reader's path: the reader has its bytes, and
            // the chunk stays in memory while the file is written.
            tokio::task::spawn_blocking(move || {
                if let Some(disk) = &this.disk {
                    disk.insert(&digest, &copy);
                }
            });
        }
        Ok((data, Origin::Store))
    }

    /// GETs the chunk and verifies it, trying once more if the bytes are wrong (a corrupt
    /// object in the store stays corrupt, but a damaged transfer does not).
    async fn fetch_verified(
        &self,
        reader: &ChunkReader,
        digest: Digest,
        len: u32,
    ) -> Result<Bytes, ChunkError> {
        let key = chunk_key(&digest);
        let store = reader.store.url();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let object = self.get_with_retries(reader, digest, &key).await?;
            reader.bump(|c| &c.store_bytes, object.len() as u64);
            let verified = tokio::task::spawn_blocking(move || {
                blob::decode_verified(&object, &digest, len as usize)
                    .map_err(|e| e.to_string())
                    .and_then(|plain| {
                        if plain.len() == len as usize {
                            Ok(plain)
                        } else {
                            Err(format!("expected {len} bytes, got {}", plain.len()))
                        }
                    })
            })
            .await
            .unwrap_or_else(|e| Err(format!("verification task failed: {e}")));
            match verified {
                Ok(plain) => return Ok(Bytes::from(plain)),
                Err(reason) => {
                    reader.bump(|c| &c.corrupt_chunks, 1);
                    tracing::error!(chunk = %digest, store, attempt,
                        "chunk from store failed verification: {reason}");
                    if attempt >= 2 {
                        return Err(ChunkError::Corrupt {
                            digest,
                            store: store.to_string(),
                            reason,
                        });
                    }
                }
            }
        }
    }

    /// GETs a chunk object, retrying store trouble (outages, timeouts, 5xx) with backoff
    /// until the fetch deadline, so a store that comes back in time only delays the read and
    /// one that does not fails it instead of hanging it. A missing object is not retried.
    async fn get_with_retries(
        &self,
        reader: &ChunkReader,
        digest: Digest,
        key: &str,
    ) -> Result<Bytes, ChunkError> {
        let deadline = Instant::now() + self.fetch_deadline;
        let mut backoff = Duration::from_millis(200);
        loop {
            reader.bump(|c| &c.store_gets, 1);
            let remaining = deadline.saturating_duration_since(Instant::now());
            let last_error = match tokio::time::timeout(remaining, reader.store.get(key)).await {
                Ok(Ok(object)) => return Ok(object),
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

    pub fn stats(&self) -> CacheStats {
        let memory = self.memory.lock().unwrap();
        CacheStats {
            reads: self.counters.snapshot(),
            memory_used: memory.used,
            memory_capacity: memory.capacity,
            disk_used: self.disk.as_ref().map_or(0, |d| d.used()),
            disk_capacity: self.disk.as_ref().map_or(0, |d| d.capacity()),
            disk_chunks: self.disk.as_ref().map_or(0, |d| d.chunks()),
            disk_evictions: self.disk.as_ref().map_or(0, |d| d.evictions()),
        }
    }
}

/// A manifest may claim two lengths for one chunk; cached bytes are only served to a caller
/// that expects their length, so no reader slices past what it got.
fn check_len(
    reader: &ChunkReader,
    digest: Digest,
    len: u32,
    data: Bytes,
) -> Result<Bytes, ChunkError> {
    if data.len() == len as usize {
        return Ok(data);
    }
    Err(ChunkError::Corrupt {
        digest,
        store: reader.store.url().to_string(),
        reason: format!("the layer says {len} bytes, the chunk has {}", data.len()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::local::LocalStore;

    async fn setup(chunks: &[Vec<u8>]) -> (tempfile::TempDir, ChunkReader) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("store");
        let store = LocalStore::open("test", root.to_str().unwrap()).unwrap();
        for c in chunks {
            store
                .put(&chunk_key(&Digest::of(c)), Bytes::from(blob::encode(c)))
                .await
                .unwrap();
        }
        let cache = ChunkCache::new(&CacheConfig {
            disk_dir: Some(tmp.path().join("cache")),
            disk_capacity: 1 << 20,
            memory_capacity: 1 << 20,
            fetch_deadline: DEFAULT_FETCH_DEADLINE,
        })
        .unwrap();
        (tmp, cache.reader(Arc::new(store)))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_readers_cause_one_fetch() {
        let chunk: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let (_tmp, cache) = setup(std::slice::from_ref(&chunk)).await;
        let d = Digest::of(&chunk);
        let readers: Vec<_> = (0..16)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(d, 100_000).await.unwrap() })
            })
            .collect();
        for r in readers {
            assert_eq!(r.await.unwrap(), chunk);
        }
        assert_eq!(cache.stats().store_gets, 1);
        assert_eq!(cache.stats().store_hits, 16);
        assert_eq!(cache.cache().stats().reads.store_gets, 1);
    }

    /// Regression: a manifest that gives one chunk two lengths got the cached bytes of the
    /// first length and sliced past their end.
    #[tokio::test]
    async fn a_chunk_asked_for_with_the_wrong_length_is_an_error() {
        let chunk = vec![3u8; 1000];
        let (_tmp, cache) = setup(std::slice::from_ref(&chunk)).await;
        let d = Digest::of(&chunk);
        assert_eq!(cache.get(d, 1000).await.unwrap().len(), 1000);
        let err = cache.get(d, 1500).await.unwrap_err();
        assert!(matches!(err, ChunkError::Corrupt { .. }), "{err}");
    }

    #[tokio::test]
    async fn corrupt_chunk_in_store_is_an_error_not_wrong_bytes() {
        let good = vec![5u8; 1000];
        let (tmp, cache) = setup(std::slice::from_ref(&good)).await;
        let d = Digest::of(&good);
        let path = tmp.path().join("store").join(chunk_key(&d));
        std::fs::write(&path, blob::encode(&[6u8; 1000])).unwrap();
        let err = cache.get(d, 1000).await.unwrap_err();
        assert!(matches!(err, ChunkError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(&d.to_string()));
        // Missing entirely: a store error naming the chunk.
        std::fs::remove_file(&path).unwrap();
        let err = cache.get(d, 1000).await.unwrap_err();
        assert!(err.to_string().contains("chunks/"), "{err}");
    }
}
