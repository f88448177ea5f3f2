//! The on-disk chunk cache: one file per chunk (plain bytes) under `<dir>/chunks/xx/<hex>`,
//! with a hard byte budget.
//!
//! It also keeps *local copies* of large layer files under `<dir>/files/xx/<id>`, filled in
//! place as their chunks arrive so the kernel can read a complete one directly (FUSE
//! passthrough); chunks wholly inside such a file live only there (see [`copies`]). Copies
//! share the budget, the LRU, the pins and the index with the chunks.
//!
//! Space is reserved under the lock *before* a file is written and the least recently used
//! chunks are evicted to make room; a chunk that does not fit even then is not cached. So the
//! files on disk never exceed the budget, however many inserts run at once. Chunk files are
//! written to a temp file beside their final name and renamed into place, so a crash never
//! leaves a half-written chunk under its name; leftover temp files are removed at start (copies
//! are written in place: see [`copies`] for how a crash is survived). The files on disk are the
//! truth: the index is rebuilt from them at start, and a chunk found there is verified against
//! its name the first time it is read.
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

use strata_cache_format::Digest;

mod copies;

/// What a cache file holds: one chunk, or a local copy of a layer file (named by its file id,
/// see [`crate::FileChunks::id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    Chunk(Digest),
    File(Digest),
}

impl Key {
    fn digest(&self) -> &Digest {
        match self {
            Key::Chunk(d) | Key::File(d) => d,
        }
    }

    /// Its key in the last-use index: a chunk's digest, or `f` and a file's id.
    fn index_key(&self) -> Vec<u8> {
        match self {
            Key::Chunk(d) => d.0.to_vec(),
            Key::File(d) => [&b"f"[..], &d.0].concat(),
        }
    }

    fn from_index_key(k: &[u8]) -> Option<Key> {
        match k.len() {
            32 => Some(Key::Chunk(Digest(k.try_into().ok()?))),
            33 if k[0] == b'f' => Some(Key::File(Digest(k[1..].try_into().ok()?))),
            _ => None,
        }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Chunk(d) => write!(f, "chunk {d}"),
            Key::File(d) => write!(f, "local copy {d}"),
        }
    }
}

struct Entry {
    size: u64,
    /// Checked against its digest since this process started.
    verified: bool,
    /// The file as it was when verified (or written): a file that no longer matches was
    /// changed behind the daemon's back, and is not trusted until verified again.
    identity: Option<Identity>,
    /// When its last use was written to the index (ns since the epoch; 0: not by us).
    recorded: u64,
}

struct State {
    lru: LruCache<Key, Entry>,
    /// Files being written (space reserved, not yet in `lru`).
    writing: HashSet<Key>,
    /// Files being read right now, with their reader counts: eviction passes over them.
    pinned: HashMap<Key, u32>,
    /// Files evicted or dropped whose unlink is under way (outside the lock): not written
    /// again until it is done, so the unlink cannot take a new file with it.
    removing: HashMap<Key, u32>,
    /// The local copies (each also a `Key::File` entry of `lru`).
    copies: HashMap<Digest, copies::Copy>,
    /// Chunks held whole by a copy: the copy and the chunk's position in it.
    slots: HashMap<Digest, (Digest, u32)>,
    used: u64,
    evictions: u64,
}

const RECORD_EVERY_NS: u64 = 60_000_000_000;

/// Inode, size and ctime of a file: any write, truncate, rename over it or attribute change
/// moves one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    ino: u64,
    size: u64,
    ctime: (i64, i64),
}

impl Identity {
    fn of(m: &fs::Metadata) -> Identity {
        use std::os::unix::fs::MetadataExt;
        Identity {
            ino: m.ino(),
            size: m.len(),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

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
        let last_use = open_index(&dir.join("index"));
        let used_at = |key: &Key, meta: &fs::Metadata| {
            let recorded = last_use
                .as_ref()
                .and_then(|db| db.get(key.index_key()).ok().flatten());
            match recorded {
                Some(v) if v.len() == 8 => u64::from_be_bytes(v[..].try_into().unwrap()),
                _ => meta.modified().map(nanos_since_epoch).unwrap_or(0),
            }
        };
        let mut found = Vec::new();
        fs::create_dir_all(dir.join("chunks"))?;
        for shard in fs::read_dir(dir.join("chunks"))? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            let shard_name = shard.file_name().to_string_lossy().into_owned();
            for file in fs::read_dir(shard.path())? {
                let file = file?;
                let name = file.file_name();
                let digest = name
                    .to_str()
                    .and_then(|n| copies::canonical(n, &shard_name));
                let meta = file.metadata()?;
                match digest {
                    Some(d) if meta.is_file() => {
                        let key = Key::Chunk(d);
                        found.push((used_at(&key, &meta), key, meta.len()));
                    }
                    _ => {
                        let _ = fs::remove_file(file.path());
                    }
                }
            }
        }
        fs::create_dir_all(dir.join("files"))?;
        let mut copies_found = Vec::new();
        for (used, id, size, copy) in copies::scan(&dir.join("files"), used_at)? {
            found.push((used, Key::File(id), size));
            copies_found.push((id, copy));
        }
        // Oldest first, so the most recently used end up at the front of the LRU.
        found.sort_by_key(|(used, _, _)| *used);
        if let Some(db) = &last_use {
            // Forget entries whose files are gone (evicted just before a crash, or removed).
            let present: HashSet<Key> = found.iter().map(|(_, k, _)| *k).collect();
            for key in db.iter().keys().flatten() {
                if !Key::from_index_key(&key).is_some_and(|k| present.contains(&k)) {
                    let _ = db.remove(key);
                }
            }
        }
        let mut state = State {
            lru: LruCache::unbounded(),
            writing: HashSet::new(),
            pinned: HashMap::new(),
            removing: HashMap::new(),
            copies: HashMap::new(),
            slots: HashMap::new(),
            used: 0,
            evictions: 0,
        };
        for (id, copy) in copies_found {
            copies::adopt(&mut state, id, copy);
        }
        for (_, key, size) in found {
            state.used += size;
            state.lru.put(
                key,
                Entry {
                    size,
                    verified: false,
                    identity: None,
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
        let evicted = cache.evict_until(&mut cache.lock(), 0);
        cache.unlink(evicted);
        Ok(cache)
    }

    fn path(&self, key: &Key) -> PathBuf {
        let subdir = match key {
            Key::Chunk(_) => "chunks",
            Key::File(_) => "files",
        };
        let hex = key.digest().to_hex();
        self.dir.join(subdir).join(&hex[..2]).join(hex)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Evicts least recently used files until `incoming` more bytes fit. Pinned ones (being
    /// read) stay, at the cold end. Returns the evicted keys, to [`DiskCache::unlink`] once
    /// the lock is released: every reader and writer of the cache waits on that lock, and an
    /// unlink waits on the disk.
    #[must_use]
    fn evict_until(&self, state: &mut State, incoming: u64) -> Vec<Key> {
        let mut passed_over = Vec::new();
        let mut evicted = Vec::new();
        while state.used + incoming > self.capacity {
            let Some((key, entry)) = state.lru.pop_lru() else {
                break;
            };
            if state.pinned.contains_key(&key) {
                passed_over.push((key, entry));
                continue;
            }
            state.used -= entry.size;
            state.evictions += 1;
            if let Key::File(id) = &key {
                copies::drop_copy(state, id);
            }
            *state.removing.entry(key).or_insert(0) += 1;
            evicted.push(key);
        }
        for (key, entry) in passed_over {
            state.lru.push(key, entry);
            state.lru.demote(&key);
        }
        evicted
    }

    /// Removes the files of keys marked as being removed, and their last uses, without the
    /// lock; then lets them be cached again.
    fn unlink(&self, keys: Vec<Key>) {
        if keys.is_empty() {
            return;
        }
        for key in &keys {
            self.forget_use(key);
            if let Err(e) = fs::remove_file(self.path(key)) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!("removing {key} from the cache: {e}");
                }
            }
            if let Key::File(id) = key {
                let _ = fs::remove_file(self.map_path(id));
            }
        }
        let mut state = self.lock();
        for key in &keys {
            if let Some(n) = state.removing.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    state.removing.remove(key);
                }
            }
        }
    }

    /// Chunk `digest`, from its chunk file or a local copy that holds it.
    pub(crate) fn read(&self, digest: &Digest) -> DiskRead {
        match self.read_chunk_file(digest) {
            DiskRead::Miss => self.read_from_copy(digest),
            found => found,
        }
    }

    /// Chunk `digest` from its chunk file only.
    pub(crate) fn read_chunk_file(&self, digest: &Digest) -> DiskRead {
        let key = Key::Chunk(*digest);
        let Some(verified) = self.pin(&key) else {
            return DiskRead::Miss;
        };
        let result = self.read_pinned(digest, verified);
        self.unpin(&key);
        result
    }

    /// Pins `key` if it is cached; returns whether it was verified since start.
    fn pin(&self, key: &Key) -> Option<bool> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let verified = state.lru.get(key)?.verified;
        *state.pinned.entry(*key).or_insert(0) += 1;
        Some(verified)
    }

    /// Reads `range` of a chunk whose file has been verified since start; `None` if the chunk
    /// is not on disk or not verified yet (the caller loads it whole, which verifies it).
    pub(crate) fn read_range(
        &self,
        digest: &Digest,
        range: std::ops::Range<usize>,
    ) -> Option<Vec<u8>> {
        let key = Key::Chunk(*digest);
        {
            let mut state = self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match state.lru.get(&key) {
                Some(e) if e.verified && range.end as u64 <= e.size => {}
                Some(_) => return None,
                None => {
                    drop(state);
                    return self.read_range_from_copy(digest, range);
                }
            }
            *state.pinned.entry(key).or_insert(0) += 1;
        }
        let read = (|| -> io::Result<Option<Vec<u8>>> {
            use std::os::unix::fs::FileExt;
            let f = fs::File::open(self.path(&key))?;
            if !self.unchanged(&key, &f) {
                return Ok(None);
            }
            let mut buf = vec![0u8; range.len()];
            f.read_exact_at(&mut buf, range.start as u64)?;
            // Written meanwhile? (A write moves the ctime before it copies its bytes.)
            Ok(self.unchanged(&key, &f).then_some(buf))
        })();
        self.unpin(&key);
        match read {
            Ok(buf) => {
                self.record_use(&key);
                buf
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(chunk = %digest, "reading cached chunk: {e}");
                }
                None
            }
        }
    }

    /// Whether chunk `digest` is on disk, as a chunk file or whole in a local copy.
    pub(crate) fn contains(&self, digest: &Digest) -> bool {
        let state = self.lock();
        state.lru.contains(&Key::Chunk(*digest)) || state.slots.contains_key(digest)
    }

    fn unpin(&self, key: &Key) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = state.pinned.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                state.pinned.remove(key);
            }
        }
    }

    fn read_pinned(&self, digest: &Digest, verified: bool) -> DiskRead {
        let key = Key::Chunk(*digest);
        let opened = fs::File::open(self.path(&key)).and_then(|mut f| {
            use std::io::Read;
            let before = Identity::of(&f.metadata()?);
            let mut data = Vec::with_capacity(before.size as usize);
            f.read_to_end(&mut data)?;
            // Written while read: not the file any identity vouches for.
            let after = Identity::of(&f.metadata()?);
            Ok((data, before, before == after))
        });
        let (data, identity, steady) = match opened {
            Ok(read) => read,
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(chunk = %digest, "reading cached chunk: {e}");
                }
                self.forget(&key);
                return DiskRead::Miss;
            }
        };
        self.record_use(&key);
        if !verified || !steady || !self.identity_is(&key, identity) {
            if Digest::of(&data) != *digest {
                tracing::error!(chunk = %digest, path = %self.path(&key).display(),
                    "cached chunk file is corrupt (hash mismatch); dropping it and fetching again");
                self.remove(&key);
                return DiskRead::Corrupt;
            }
            self.mark_verified(&key, steady.then_some(identity));
        }
        DiskRead::Hit(data)
    }

    fn mark_verified(&self, key: &Key, identity: Option<Identity>) {
        self.set_verified(key, true, identity);
    }

    /// Sets whether `key`'s file counts as verified, and as which file.
    fn set_verified(&self, key: &Key, verified: bool, identity: Option<Identity>) {
        if let Some(e) = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .lru
            .peek_mut(key)
        {
            e.verified = verified;
            e.identity = identity;
        }
    }

    /// Whether `key`'s file is still as it was when verified.
    fn identity_is(&self, key: &Key, found: Identity) -> bool {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .lru
            .peek(key)
            .is_some_and(|e| e.identity == Some(found))
    }

    /// Whether the open file `f` of `key` is the one verified; if not (it changed on disk
    /// behind the daemon), `key` is no longer counted as verified, so it is hashed again
    /// before its bytes are used.
    pub(crate) fn unchanged(&self, key: &Key, f: &fs::File) -> bool {
        let found = match f.metadata() {
            Ok(m) => Identity::of(&m),
            Err(_) => return false,
        };
        if self.identity_is(key, found) {
            return true;
        }
        tracing::warn!(%key, path = %self.path(key).display(),
            "cached file changed on disk since it was verified; verifying it again");
        self.set_verified(key, false, None);
        false
    }

    /// A complete local copy, pinned until [`DiskCache::release_file`]: its path, and whether
    /// all of it was verified since start. `None` if there is no complete copy.
    pub(crate) fn open_file(&self, id: &Digest) -> Option<(PathBuf, bool)> {
        let key = Key::File(*id);
        let verified = self.pin_complete(id)?;
        self.record_use(&key);
        Some((self.path(&key), verified))
    }

    pub(crate) fn release_file(&self, id: &Digest) {
        self.unpin(&Key::File(*id));
    }

    fn forget(&self, key: &Key) {
        take_out(&mut self.lock(), key);
        self.forget_use(key);
    }

    /// Writes a file's last use to the index, at most once a minute per file: the memory LRU
    /// has the exact order; the index only has to keep it roughly across a restart, and an
    /// index write on every 4 KiB read would cost more than the read.
    fn record_use(&self, key: &Key) {
        if let Some(db) = &self.last_use {
            let now = nanos_since_epoch(std::time::SystemTime::now());
            {
                let mut state = self
                    .state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match state.lru.peek_mut(key) {
                    Some(e) if now.saturating_sub(e.recorded) < self.record_every_ns => return,
                    Some(e) => e.recorded = now,
                    None => {}
                }
            }
            if let Err(e) = db.insert(key.index_key(), &now.to_be_bytes()) {
                tracing::debug!("recording use of {key}: {e}");
            }
        }
    }

    fn forget_use(&self, key: &Key) {
        if let Some(db) = &self.last_use {
            let _ = db.remove(key.index_key());
        }
    }

    fn remove(&self, key: &Key) {
        {
            let mut state = self.lock();
            take_out(&mut state, key);
            *state.removing.entry(*key).or_insert(0) += 1;
        }
        self.unlink(vec![*key]);
    }

    /// Stores a verified chunk. Chunks larger than the whole budget are not cached.
    pub(crate) fn insert(&self, digest: &Digest, data: &[u8]) {
        if let Err(e) = self.insert_with(Key::Chunk(*digest), data.len() as u64, |f| {
            f.write_all(data)
        }) {
            tracing::warn!(chunk = %digest, "caching chunk on disk failed: {e}");
        }
    }

    /// Reserves `size` bytes (evicting to make room), writes the file through `write` and
    /// makes it visible. `Ok(false)`: skipped (cached already, being written, or no room).
    fn insert_with(
        &self,
        key: Key,
        size: u64,
        write: impl FnOnce(&mut fs::File) -> io::Result<()>,
    ) -> io::Result<bool> {
        let evicted = {
            let mut state = self.lock();
            if size > self.capacity
                || state.lru.contains(&key)
                || state.writing.contains(&key)
                || state.removing.contains_key(&key)
            {
                return Ok(false);
            }
            let evicted = self.evict_until(&mut state, size);
            if state.used + size > self.capacity {
                // Everything evictable is gone and writes in flight hold the rest: skip
                // caching rather than go over the budget.
                drop(state);
                self.unlink(evicted);
                return Ok(false);
            }
            // Reserve now; the entry is visible only once the file is in place (below).
            state.used += size;
            state.writing.insert(key);
            evicted
        };
        self.unlink(evicted);
        let written = self.write_file(&key, size, write);
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.writing.remove(&key);
        match written {
            Ok(identity) => {
                let entry = Entry {
                    size,
                    verified: true,
                    identity: Some(identity),
                    recorded: 0,
                };
                if let Some(old) = state.lru.put(key, entry) {
                    state.used -= old.size;
                }
                drop(state);
                self.record_use(&key);
                Ok(true)
            }
            Err(e) => {
                state.used -= size;
                Err(e)
            }
        }
    }

    fn write_file(
        &self,
        key: &Key,
        size: u64,
        write: impl FnOnce(&mut fs::File) -> io::Result<()>,
    ) -> io::Result<Identity> {
        let dest = self.path(key);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        // The temp file sits in the file's own shard: creating thousands of files in one
        // shared directory serializes writers on its lock and crowds one inode group.
        let tmp = dest.with_file_name(format!(".{}.{n}.tmp", key.digest().to_hex()));
        let result = (|| {
            // Readable too: a writer may check what it wrote.
            let mut f = fs::File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            write(&mut f)?;
            // The reservation was for `size` bytes: a writer that put more would break the
            // budget.
            let written = f.metadata()?.len();
            if written != size {
                return Err(io::Error::other(format!(
                    "wrote {written} bytes where {size} were reserved"
                )));
            }
            fs::rename(&tmp, &dest)?;
            // The file as written, from its own handle (a rename moves its ctime): not
            // whatever the path holds by now.
            Ok(Identity::of(&f.metadata()?))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    pub(crate) fn used(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .used
    }

    pub(crate) fn chunks(&self) -> u64 {
        let state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state
            .lru
            .iter()
            .filter(|(k, _)| matches!(k, Key::Chunk(_)))
            .count() as u64
    }

    pub(crate) fn evictions(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .evictions
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }
}

impl Drop for DiskCache {
    /// A clean stop keeps the last uses recorded (sled writes them out in the background).
    fn drop(&mut self) {
        self.save_maps();
        if let Some(db) = &self.last_use {
            if let Err(e) = db.flush() {
                tracing::debug!("flushing the chunk cache index: {e}");
            }
        }
    }
}

/// Takes `key` out of the index: its bytes out of the budget (a copy's slots with it).
fn take_out(state: &mut State, key: &Key) {
    if let Some(e) = state.lru.pop(key) {
        state.used -= e.size;
    }
    if let Key::File(id) = key {
        copies::drop_copy(state, id);
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
    // A previous owner in this process may still be letting go of it (sled's flusher thread
    // holds the lock for a moment after the last handle is dropped): wait a little before
    // deciding the index is damaged.
    let mut opened = open();
    for _ in 0..20 {
        match &opened {
            Err(sled::Error::Io(_)) => {
                std::thread::sleep(std::time::Duration::from_millis(50));
                opened = open();
            }
            _ => break,
        }
    }
    match opened {
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

    /// A file verified (or written) by this process and changed on disk afterwards, behind
    /// its back, is not trusted: its bytes are hashed again before use, and a chunk that no
    /// longer matches is dropped, never served.
    #[test]
    fn a_file_changed_on_disk_after_verification_is_verified_again() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(tmp.path(), 10_000).unwrap();
        let a = vec![1u8; 1000];
        let d = Digest::of(&a);
        cache.insert(&d, &a);
        assert_eq!(cache.read_range(&d, 10..20).unwrap(), a[10..20]);
        let hex = d.to_hex();
        let path = tmp.path().join("chunks").join(&hex[..2]).join(&hex);
        // Same size, other bytes, written in place (the inode stays; its ctime moves).
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all(&[9u8; 1000])
            .unwrap();
        assert!(
            cache.read_range(&d, 10..20).is_none(),
            "a changed file is not read in part"
        );
        assert!(matches!(cache.read(&d), DiskRead::Corrupt));
        assert!(!path.exists());
    }

    /// Eviction unlinks outside the lock: racing inserts, reads and evictions of the same
    /// few chunks must still leave the index and the files in agreement, within budget,
    /// and every read a hit of the right bytes or a miss.
    #[test]
    fn racing_inserts_and_evictions_keep_files_and_index_in_agreement() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(tmp.path(), 5_000).unwrap();
        let chunks: Vec<Vec<u8>> = (0..12u8).map(|i| vec![i; 1000]).collect();
        let digests: Vec<Digest> = chunks.iter().map(|c| Digest::of(c)).collect();
        std::thread::scope(|s| {
            for t in 0..4usize {
                let (cache, chunks, digests) = (&cache, &chunks, &digests);
                s.spawn(move || {
                    for round in 0..2000usize {
                        let i = (round * 7 + t * 5) % chunks.len();
                        cache.insert(&digests[i], &chunks[i]);
                        let j = (round * 3 + t) % chunks.len();
                        match cache.read(&digests[j]) {
                            DiskRead::Hit(d) => assert_eq!(d, chunks[j]),
                            DiskRead::Miss => {}
                            DiskRead::Corrupt => panic!("chunk {j} read corrupt"),
                        }
                    }
                });
            }
        });
        assert!(du(tmp.path()) <= 5_000);
        assert_eq!(cache.used(), du(tmp.path()), "index and files agree");
        let state = cache.lock();
        assert!(state.removing.is_empty());
        for (key, entry) in state.lru.iter() {
            let len = fs::metadata(cache.path(key)).map(|m| m.len());
            assert_eq!(len.ok(), Some(entry.size), "{key} has its file");
        }
    }
}
