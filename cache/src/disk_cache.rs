//! The on-disk chunk cache: one file per chunk (plain bytes) under `<dir>/chunks/xx/<hex>`,
//! with a hard byte budget.
//!
//! Space is reserved under the lock *before* a file is written and the least recently used
//! chunks are evicted to make room; a chunk that does not fit even then is not cached. So the
//! files on disk never exceed the budget, however many inserts run at once. Files are
//! written to a temp file beside their final name and renamed into place, so a crash never
//! leaves a half-written chunk under its name; leftover temp files are removed at start. The files on disk are the truth: the index is
//! rebuilt from them at start, and a chunk found there is verified against its name the first
//! time it is read.
//!
//! When each chunk was last used is kept in a `sled` tree under `<dir>/index`, so the LRU order
//! survives restarts (file access times cannot be trusted: `relatime` and `noatime` mounts).
//! It is a hint, not the truth: sled may lose its last writes in a crash, entries without a
//! file are dropped at start, and files without an entry count by their modification time.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use lru::LruCache;

use crate::Digest;

struct Entry {
    size: u64,
    /// Checked against its digest since this process started.
    verified: bool,
    /// When its last use was written to the index (ns since the epoch; 0: not by us).
    recorded: u64,
}

struct State {
    lru: LruCache<Digest, Entry>,
    /// Chunks whose files are being written (space reserved, not yet in `lru`).
    writing: HashSet<Digest>,
    /// Chunks being read right now, with their reader counts: eviction passes over them.
    pinned: HashMap<Digest, u32>,
    used: u64,
    evictions: u64,
}

const RECORD_EVERY_NS: u64 = 60_000_000_000;

pub(crate) struct DiskCache {
    dir: PathBuf,
    /// digest → last use (ns since the epoch, big-endian u64).
    last_use: Option<sled::Db>,
    capacity: u64,
    record_every_ns: u64,
    state: Mutex<State>,
    temp_counter: AtomicU64,
}

pub(crate) enum DiskRead {
    Hit(Vec<u8>),
    Miss,
    /// The file did not match its name; it has been removed.
    Corrupt,
}

impl DiskCache {
    pub(crate) fn open(dir: &Path, capacity: u64) -> io::Result<DiskCache> {
        // Temp files of writes cut short by a crash are removed below with anything else in
        // the shards that is not named by a digest (and the `tmp/` of older versions here).
        let legacy_tmp = dir.join("tmp");
        if legacy_tmp.exists() {
            fs::remove_dir_all(&legacy_tmp)?;
        }
        fs::create_dir_all(dir.join("chunks"))?;
        let last_use = open_index(&dir.join("index"));
        let mut found = Vec::new();
        for shard in fs::read_dir(dir.join("chunks"))? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for file in fs::read_dir(shard.path())? {
                let file = file?;
                let name = file.file_name();
                let digest = name.to_str().and_then(|n| Digest::parse(n).ok());
                let meta = file.metadata()?;
                match digest {
                    Some(d) if meta.is_file() => {
                        let recorded = last_use.as_ref().and_then(|db| db.get(d.0).ok().flatten());
                        let used = match recorded {
                            Some(v) if v.len() == 8 => {
                                u64::from_be_bytes(v[..].try_into().unwrap())
                            }
                            _ => meta.modified().map(nanos_since_epoch).unwrap_or(0),
                        };
                        found.push((used, d, meta.len()));
                    }
                    _ => {
                        let _ = fs::remove_file(file.path());
                    }
                }
            }
        }
        // Oldest first, so the most recently used end up at the front of the LRU.
        found.sort_by_key(|(used, _, _)| *used);
        if let Some(db) = &last_use {
            // Forget entries whose files are gone (evicted just before a crash, or removed).
            let present: HashSet<[u8; 32]> = found.iter().map(|(_, d, _)| d.0).collect();
            for key in db.iter().keys().flatten() {
                if key.len() != 32 || !present.contains(&key[..]) {
                    let _ = db.remove(key);
                }
            }
        }
        let mut state = State {
            lru: LruCache::unbounded(),
            writing: HashSet::new(),
            pinned: HashMap::new(),
            used: 0,
            evictions: 0,
        };
        for (_, digest, size) in found {
            state.used += size;
            state.lru.put(
                digest,
                Entry {
                    size,
                    verified: false,
                    recorded: 0,
                },
            );
        }
        let cache = DiskCache {
            dir: dir.to_path_buf(),
            last_use,
            capacity,
            record_every_ns: RECORD_EVERY_NS,
            state: Mutex::new(state),
            temp_counter: AtomicU64::new(0),
        };
        {
            let mut state = cache.state.lock().unwrap();
            cache.evict_until(&mut state, 0);
        }
        Ok(cache)
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.dir.join("chunks").join(&hex[..2]).join(hex)
    }

    /// Evicts least recently used chunks until `incoming` more bytes fit. Pinned chunks (being
    /// read) stay, at the cold end.
    fn evict_until(&self, state: &mut State, incoming: u64) {
        let mut passed_over = Vec::new();
        while state.used + incoming > self.capacity {
            let Some((digest, entry)) = state.lru.pop_lru() else {
                break;
            };
            if state.pinned.contains_key(&digest) {
                passed_over.push((digest, entry));
                continue;
            }
            state.used -= entry.size;
            state.evictions += 1;
            self.forget_use(&digest);
            if let Err(e) = fs::remove_file(self.path(&digest)) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(chunk = %digest, "evicting chunk file: {e}");
                }
            }
        }
        for (digest, entry) in passed_over {
            state.lru.push(digest, entry);
            state.lru.demote(&digest);
        }
    }

    pub(crate) fn read(&self, digest: &Digest) -> DiskRead {
        let verified = {
            let mut state = self.state.lock().unwrap();
            let verified = match state.lru.get(digest) {
                Some(e) => e.verified,
                None => return DiskRead::Miss,
            };
            *state.pinned.entry(*digest).or_insert(0) += 1;
            verified
        };
        let result = self.read_pinned(digest, verified);
        self.unpin(digest);
        result
    }

    /// Reads `range` of a chunk whose file has been verified since start; `None` if the chunk
    /// is not on disk or not verified yet (the caller loads it whole, which verifies it).
    pub(crate) fn read_range(
        &self,
        digest: &Digest,
        range: std::ops::Range<usize>,
    ) -> Option<Vec<u8>> {
        {
            let mut state = self.state.lock().unwrap();
            match state.lru.get(digest) {
                Some(e) if e.verified && range.end as u64 <= e.size => {}
                _ => return None,
            }
            *state.pinned.entry(*digest).or_insert(0) += 1;
        }
        let read = (|| -> io::Result<Vec<u8>> {
            use std::os::unix::fs::FileExt;
            let f = fs::File::open(self.path(digest))?;
            let mut buf = vec![0u8; range.len()];
            f.read_exact_at(&mut buf, range.start as u64)?;
            Ok(buf)
        })();
        self.unpin(digest);
        match read {
            Ok(buf) => {
                self.record_use(digest);
                Some(buf)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(chunk = %digest, "reading cached chunk: {e}");
                }
                None
            }
        }
    }

    pub(crate) fn contains(&self, digest: &Digest) -> bool {
        self.state.lock().unwrap().lru.contains(digest)
    }

    fn unpin(&self, digest: &Digest) {
        let mut state = self.state.lock().unwrap();
        if let Some(n) = state.pinned.get_mut(digest) {
            *n -= 1;
            if *n == 0 {
                state.pinned.remove(digest);
            }
        }
    }

    fn read_pinned(&self, digest: &Digest, verified: bool) -> DiskRead {
        let data = match fs::read(self.path(digest)) {
            Ok(d) => d,
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(chunk = %digest, "reading cached chunk: {e}");
                }
                self.forget(digest);
                return DiskRead::Miss;
            }
        };
        self.record_use(digest);
        if !verified {
            if Digest::of(&data) != *digest {
                tracing::error!(chunk = %digest, path = %self.path(digest).display(),
                    "cached chunk file is corrupt (hash mismatch); dropping it and fetching again");
                self.remove(digest);
                return DiskRead::Corrupt;
            }
            if let Some(e) = self.state.lock().unwrap().lru.peek_mut(digest) {
                e.verified = true;
            }
        }
        DiskRead::Hit(data)
    }

    fn forget(&self, digest: &Digest) {
        let mut state = self.state.lock().unwrap();
        if let Some(e) = state.lru.pop(digest) {
            state.used -= e.size;
        }
        self.forget_use(digest);
    }

    /// Writes a chunk's last use to the index, at most once a minute per chunk: the memory LRU
    /// has the exact order; the index only has to keep it roughly across a restart, and an
    /// index write on every 4 KiB read would cost more than the read.
    fn record_use(&self, digest: &Digest) {
        if let Some(db) = &self.last_use {
            let now = nanos_since_epoch(std::time::SystemTime::now());
            {
                let mut state = self.state.lock().unwrap();
                match state.lru.peek_mut(digest) {
                    Some(e) if now.saturating_sub(e.recorded) < self.record_every_ns => return,
                    Some(e) => e.recorded = now,
                    None => {}
                }
            }
            if let Err(e) = db.insert(digest.0, &now.to_be_bytes()) {
                tracing::debug!(chunk = %digest, "recording chunk use: {e}");
            }
        }
    }

    fn forget_use(&self, digest: &Digest) {
        if let Some(db) = &self.last_use {
            let _ = db.remove(digest.0);
        }
    }

    fn remove(&self, digest: &Digest) {
        self.forget(digest);
        let _ = fs::remove_file(self.path(digest));
    }

    /// Stores a verified chunk. Chunks larger than the whole budget are not cached.
    pub(crate) fn insert(&self, digest: &Digest, data: &[u8]) {
        let size = data.len() as u64;
        {
            let mut state = self.state.lock().unwrap();
            if size > self.capacity || state.lru.contains(digest) || state.writing.contains(digest)
            {
                return;
            }
            self.evict_until(&mut state, size);
            if state.used + size > self.capacity {
                // Everything evictable is gone and writes in flight hold the rest: skip
                // caching rather than go over the budget.
                return;
            }
            // Reserve now; the entry is visible only once the file is in place (below).
            state.used += size;
            state.writing.insert(*digest);
        }
        let written = self.write_file(digest, data);
        let mut state = self.state.lock().unwrap();
        state.writing.remove(digest);
        match written {
            Ok(()) => {
                let entry = Entry {
                    size,
                    verified: true,
                    recorded: 0,
                };
                if let Some(old) = state.lru.put(*digest, entry) {
                    state.used -= old.size;
                }
                drop(state);
                self.record_use(digest);
            }
            Err(e) => {
                tracing::warn!(chunk = %digest, "caching chunk on disk failed: {e}");
                state.used -= size;
            }
        }
    }

    fn write_file(&self, digest: &Digest, data: &[u8]) -> io::Result<()> {
        let dest = self.path(digest);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        // The temp file sits in the chunk's own shard: creating thousands of files in one
        // shared directory serializes writers on its lock and crowds one inode group.
        let tmp = dest.with_file_name(format!(".{}.{n}.tmp", digest.to_hex()));
        let result = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(data)?;
            fs::rename(&tmp, &dest)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    pub(crate) fn used(&self) -> u64 {
        self.state.lock().unwrap().used
    }

    pub(crate) fn chunks(&self) -> u64 {
        self.state.lock().unwrap().lru.len() as u64
    }

    pub(crate) fn evictions(&self) -> u64 {
        self.state.lock().unwrap().evictions
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }
}

fn nanos_since_epoch(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Opens the last-use index; a damaged one is thrown away (it is only a hint), and without one
/// the cache still works, ordered by file times.
fn open_index(path: &Path) -> Option<sled::Db> {
    // A small page cache: the index is touched once per chunk read, not scanned.
    let open = || {
        sled::Config::new()
            .path(path)
            .cache_capacity(8 << 20)
            .open()
    };
    match open() {
        Ok(db) => Some(db),
        Err(e) => {
            tracing::warn!(
                "chunk cache index {} is unusable ({e}); starting a new one",
                path.display()
            );
            let _ = fs::remove_dir_all(path);
            open()
                .inspect_err(|e| tracing::warn!("chunk cache index disabled: {e}"))
                .ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn du(dir: &Path) -> u64 {
        let mut total = 0;
        for shard in fs::read_dir(dir.join("chunks")).unwrap() {
            for f in fs::read_dir(shard.unwrap().path()).unwrap() {
                total += f.unwrap().metadata().unwrap().len();
            }
        }
        total
    }

    #[test]
    fn never_exceeds_budget_and_evicts_least_recently_used() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(tmp.path(), 3000).unwrap();
        let chunks: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1000]).collect();
        let digests: Vec<Digest> = chunks.iter().map(|c| Digest::of(c)).collect();
        for i in 0..3 {
            cache.insert(&digests[i], &chunks[i]);
        }
        // Touch chunk 0 so chunk 1 is the least recently used.
        assert!(matches!(cache.read(&digests[0]), DiskRead::Hit(_)));
        cache.insert(&digests[3], &chunks[3]);
        assert!(du(tmp.path()) <= 3000);
        assert!(matches!(cache.read(&digests[1]), DiskRead::Miss));
        assert!(matches!(cache.read(&digests[0]), DiskRead::Hit(_)));
        // Too big for the budget: not cached at all.
        let big = vec![9u8; 4000];
        cache.insert(&Digest::of(&big), &big);
        assert!(du(tmp.path()) <= 3000);
        assert_eq!(cache.used(), du(tmp.path()));
    }

    #[test]
    fn least_recently_used_order_survives_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let chunks: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 1000]).collect();
        let d: Vec<Digest> = chunks.iter().map(|c| Digest::of(c)).collect();
        {
            let mut cache = DiskCache::open(tmp.path(), 3000).unwrap();
            cache.record_every_ns = 0; // (normally once a minute per chunk)
            for i in 0..3 {
                cache.insert(&d[i], &chunks[i]);
            }
            assert!(matches!(cache.read(&d[0]), DiskRead::Hit(_)));
        }
        // File times say chunk 0 is the oldest; the index knows it was used last.
        let hex = d[0].to_hex();
        let f = fs::File::options()
            .write(true)
            .open(tmp.path().join("chunks").join(&hex[..2]).join(&hex))
            .unwrap();
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000))
            .unwrap();
        drop(f);
        let cache = DiskCache::open(tmp.path(), 3000).unwrap();
        cache.insert(&d[3], &chunks[3]);
        assert!(
            matches!(cache.read(&d[0]), DiskRead::Hit(_)),
            "recently used chunk kept"
        );
        assert!(
            matches!(cache.read(&d[1]), DiskRead::Miss),
            "least recently used chunk evicted"
        );
    }

    #[test]
    fn survives_reopen_and_detects_corruption() {
        let tmp = tempfile::tempdir().unwrap();
        let a = vec![1u8; 100];
        let b = vec![2u8; 100];
        {
            let cache = DiskCache::open(tmp.path(), 10_000).unwrap();
            cache.insert(&Digest::of(&a), &a);
            cache.insert(&Digest::of(&b), &b);
        }
        // Corrupt b while "stopped", and leave a half-written temp file behind.
        let hex = Digest::of(&b).to_hex();
        let partial = tmp
            .path()
            .join("chunks")
            .join(&hex[..2])
            .join(format!(".{hex}.7.tmp"));
        fs::write(&partial, b"partial").unwrap();
        fs::write(
            tmp.path().join("chunks").join(&hex[..2]).join(&hex),
            vec![3u8; 100],
        )
        .unwrap();
        let cache = DiskCache::open(tmp.path(), 10_000).unwrap();
        assert!(!partial.exists());
        match cache.read(&Digest::of(&a)) {
            DiskRead::Hit(d) => assert_eq!(d, a),
            _ => panic!("expected a hit for the intact chunk"),
        }
        assert!(matches!(cache.read(&Digest::of(&b)), DiskRead::Corrupt));
        assert!(matches!(cache.read(&Digest::of(&b)), DiskRead::Miss));
    }
}
