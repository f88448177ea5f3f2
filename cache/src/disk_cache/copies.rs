//! Local copies of large files in the disk cache (`<dir>/files/xx/<id>`): sparse files the
//! size of a layer file, filled in place as its chunks are fetched, with a *map* beside each
//! (`<id>.map`) that says which parts are in place, so the copy survives a restart.
//!
//! A copy is one entry of the cache's LRU and budget, counted by the bytes in place (a part
//! dropped, or a write that failed, has its blocks punched out). A chunk wholly inside the
//! file is kept only in the copy and found there by digest (`slots`); the file's first and
//! last chunks may also hold neighbours' bytes, so they stay whole as chunk files too, and the
//! copy's part of such an *edge* chunk is checked against that (verified) chunk file.
//!
//! Parts written by this process are verified (they come from verified chunks); after a
//! restart every part is checked before use. The daemon's own changes to a copy (writes,
//! punched parts, checks) are serialized by the copy's `writer` lock, and each compares the
//! copy's identity (inode, size, ctime) with the one the previous change left: a copy changed
//! behind the daemon's back has every part checked again. A read uses a verified part's bytes
//! unchecked only if the copy's identity was the recorded one before and after it; otherwise
//! it hashes them. What is not caught: a write by another process during one of the daemon's
//! own changes (its identity is recorded as the daemon's), or within one ctime tick of a check
//! (see SEMANTICS: keep the cache dir writable by the daemon only).

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{DiskCache, DiskRead, Entry, Identity, Key, State};
use crate::assembled::{FileLayout, MAX_SHARE_OF_BUDGET};
use strata_cache_format::Digest;

/// Where one part of a copy stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Absent,
    /// Being written by this process.
    Writing,
    /// Being punched out by this process (found corrupt or unreadable): not readable, not
    /// claimable, still counted until its blocks are freed.
    Dropping,
    /// On disk, not checked since start (or since the copy changed behind the daemon).
    Present,
    /// On disk and checked (or written by this process from verified bytes).
    Verified,
}

pub(super) struct Copy {
    layout: Arc<FileLayout>,
    /// Tells this copy from a later one of the same file (after an eviction): work that
    /// started on one never settles on the other.
    gen: u64,
    parts: Vec<Part>,
    /// Parts not in place (absent or being written).
    missing: usize,
    /// Parts in place but not verified.
    unverified: usize,
    /// A change of this process is under way (they take `writer` one at a time).
    writing: bool,
    /// Changes of this process done (writes, punched parts).
    writes: u64,
    /// Changes behind the daemon's back found (each made every part be checked again).
    distrusts: u64,
    writer: Arc<Mutex<()>>,
    /// Bytes put in place since the map was last saved.
    unsaved: u64,
    /// The map on disk says what the parts say.
    saved: bool,
}

impl Copy {
    fn new(layout: Arc<FileLayout>) -> Copy {
        static NEXT_GEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = layout.chunks().len();
        Copy {
            layout,
            gen: NEXT_GEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            parts: vec![Part::Absent; n],
            missing: n,
            unverified: 0,
            writing: false,
            writes: 0,
            distrusts: 0,
            writer: Arc::default(),
            unsaved: 0,
            saved: false,
        }
    }

    fn complete(&self) -> bool {
        self.missing == 0
    }

    fn verified(&self) -> bool {
        self.missing == 0 && self.unverified == 0
    }

    fn in_place(&self, i: usize) -> bool {
        matches!(self.parts[i], Part::Present | Part::Verified)
    }

    /// Moves part `i` to `new`, keeping the counts.
    fn set(&mut self, i: usize, new: Part) {
        match self.parts[i] {
            Part::Absent | Part::Writing | Part::Dropping => self.missing -= 1,
            Part::Present => self.unverified -= 1,
            Part::Verified => {}
        }
        match new {
            Part::Absent | Part::Writing | Part::Dropping => self.missing += 1,
            Part::Present => self.unverified += 1,
            Part::Verified => {}
        }
        self.parts[i] = new;
    }

    fn part_len(&self, i: usize) -> u64 {
        part_len(&self.layout, i)
    }

    /// After a change behind the daemon's back: every part in place is checked again.
    fn distrust(&mut self) {
        for i in 0..self.parts.len() {
            if self.parts[i] == Part::Verified {
                self.set(i, Part::Present);
            }
        }
        self.distrusts += 1;
    }
}

/// Whether a copy is complete, and whether all of it is verified since start.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CopyState {
    pub complete: bool,
    pub verified: bool,
}

const MAP_MAGIC: &[u8; 8] = b"STRATAC1";
/// A copy's map is saved again once this many bytes were put in place since the last save
/// (and when it is complete, and at a clean stop), so a crash loses little of a large copy.
const SAVE_EVERY: u64 = 64 << 20;
/// Chunk lengths a map may give (chunks are far smaller): a hostile map cannot make a read
/// allocate more.
const MAX_MAP_CHUNK: u32 = 64 << 20;
/// Chunks of all incomplete copies together at most (about 100 bytes of memory each).
const MAX_PARTIAL_PARTS: usize = 1 << 20;

/// A read of a chunk in a copy.
struct SlotRead {
    id: Digest,
    gen: u64,
    index: usize,
    data: Vec<u8>,
    /// The part was verified and the copy is as it was then: the bytes need no check.
    trusted: bool,
    /// The copy was as the recorded identity says, `identity`, during the read and no change
    /// of the daemon ran: bytes found right may mark the part verified if the copy is still
    /// so (same `writes`, `distrusts` and identity).
    settled: Option<Identity>,
    writes: u64,
    distrusts: u64,
}

/// What a check of a copy's parts found: each part's verdict (`None`: cannot tell, an edge
/// whose chunk file is gone), if nothing else wrote to the copy meanwhile.
type Checked = Option<Vec<(usize, Option<bool>)>>;

/// How a change of the daemon to a copy ended, for its caller to settle under the lock.
struct Ended<'a> {
    state: &'a mut State,
    /// The copy the change was made to, if it is still there (not evicted, not replaced).
    live: bool,
    /// Another reader found the copy changed behind the daemon while this change ran: what it
    /// wrote is not vouched for.
    distrusted: bool,
}

impl DiskCache {
    pub(super) fn map_path(&self, id: &Digest) -> PathBuf {
        let mut p = self.path(&Key::File(*id)).into_os_string();
        p.push(".map");
        PathBuf::from(p)
    }

    /// Writes chunk `digest` (verified bytes) for the file of `layout`: into its place in
    /// the file's copy, and as a chunk file too if the copy cannot hold all of it (an edge
    /// chunk, a file too large for a copy, a copy being removed).
    pub(crate) fn store_part(&self, layout: &Arc<FileLayout>, digest: &Digest, data: &[u8]) {
        let positions = layout.positions(digest);
        let fits = !positions.is_empty()
            && positions
                .iter()
                .all(|&i| layout.chunks()[i as usize].1 as usize == data.len())
            && layout.len() <= self.capacity / MAX_SHARE_OF_BUDGET;
        if !fits {
            self.insert(digest, data);
            return;
        }
        let placed = match self.write_parts(layout, digest, data) {
            Ok(placed) => placed,
            Err(e) => {
                tracing::warn!(file = %layout.id(), chunk = %digest,
                    "writing into a local copy: {e}");
                false
            }
        };
        // An edge chunk's neighbours need all of it; a chunk the copy could not take is kept
        // as a chunk file instead. (After the copy's write: the copy, just used, is not what
        // this insert evicts.)
        if !placed || positions.iter().any(|&i| !layout.whole(i as usize)) {
            self.insert(digest, data);
        }
    }

    /// Puts `data` (chunk `digest`) in every place it has in `layout`'s copy; whether the
    /// copy holds it (or is about to).
    fn write_parts(
        &self,
        layout: &Arc<FileLayout>,
        digest: &Digest,
        data: &[u8],
    ) -> io::Result<bool> {
        let id = *layout.id();
        let key = Key::File(id);
        let positions = layout.positions(digest);
        // Claim the parts this chunk fills and reserve their bytes.
        let (todo, size, gen, evicted) = {
            let mut guard = self.lock();
            let state = &mut *guard;
            if state.removing.contains_key(&key) {
                return Ok(false);
            }
            if !state.copies.contains_key(&id) {
                // Layouts of incomplete copies cost memory for all their chunks, whatever they
                // hold: past a bound, chunks go to chunk files instead.
                let partial: usize = state
                    .copies
                    .values()
                    .filter(|c| !c.complete())
                    .map(|c| c.parts.len())
                    .sum();
                if partial + layout.chunks().len() > MAX_PARTIAL_PARTS {
                    return Ok(false);
                }
            }
            if let std::collections::hash_map::Entry::Vacant(v) = state.copies.entry(id) {
                v.insert(Copy::new(Arc::clone(layout)));
                state.lru.put(
                    key,
                    Entry {
                        size: 0,
                        verified: false,
                        identity: None,
                        recorded: 0,
                    },
                );
            }
            state.lru.promote(&key);
            let copy = state.copies.get_mut(&id).expect("inserted above");
            let gen = copy.gen;
            let mut todo = Vec::new();
            let mut size = 0;
            let mut dropping = false;
            for &i in positions {
                let i = i as usize;
                match copy.parts[i] {
                    Part::Absent => {
                        copy.set(i, Part::Writing);
                        size += copy.part_len(i);
                        todo.push(i);
                    }
                    // In place already (the digest may have lost its slot to another copy
                    // that was evicted): readable by digest from here.
                    Part::Present | Part::Verified if layout.whole(i) => {
                        state.slots.entry(*digest).or_insert((id, i as u32));
                    }
                    // Being punched out: it will not hold this chunk.
                    Part::Dropping => dropping = true,
                    _ => {}
                }
            }
            if todo.is_empty() {
                return Ok(!dropping);
            }
            *state.pinned.entry(key).or_insert(0) += 1;
            let evicted = self.evict_until(state, size);
            if state.used + size > self.capacity {
                release_parts(state, &id, gen, &todo);
                unpin(state, &key);
                discard_if_empty(state, &id);
                drop(guard);
                self.unlink(evicted);
                return Ok(false);
            }
            state.used += size;
            if let Some(e) = state.lru.peek_mut(&key) {
                e.size += size;
            }
            (todo, size, gen, evicted)
        };
        self.unlink(evicted);
        let mut completed = false;
        let mut settled = false;
        let written = self.own_change(
            &id,
            gen,
            |f| {
                if f.metadata()?.len() != layout.len() {
                    f.set_len(layout.len())?;
                }
                let result = todo.iter().try_for_each(|&i| {
                    let (range, at) = layout.part(i);
                    f.write_all_at(&data[range.start as usize..range.end as usize], at)
                });
                if result.is_err() {
                    // What got written of the claimed parts leaves no blocks behind.
                    for &i in &todo {
                        if let Err(e) = punch(f, layout, i) {
                            tracing::warn!(file = %id, "freeing a failed write's blocks: {e}");
                        }
                    }
                }
                result
            },
            |ended, result| {
                settled = true;
                let state = &mut *ended.state;
                match (result.is_ok() && ended.live, state.copies.get_mut(&id)) {
                    (true, Some(copy)) => {
                        // Found changed behind the daemon meanwhile: the parts are checked
                        // when read, like the rest.
                        let part = if ended.distrusted {
                            Part::Present
                        } else {
                            Part::Verified
                        };
                        for &i in &todo {
                            copy.set(i, part);
                        }
                        copy.unsaved += size;
                        copy.saved = false;
                        completed = copy.complete() || copy.unsaved >= SAVE_EVERY;
                        let verified = copy.verified();
                        if let Some(e) = state.lru.peek_mut(&key) {
                            e.verified = verified;
                        }
                        for &i in &todo {
                            if layout.whole(i) {
                                state.slots.entry(*digest).or_insert((id, i as u32));
                            }
                        }
                    }
                    _ if ended.live => {
                        release_parts(state, &id, gen, &todo);
                        shrink(state, &key, size);
                    }
                    // The copy went (its size with it) or is another one now.
                    _ => {}
                }
                unpin(state, &key);
                true
            },
        );
        if !settled {
            // The change never started: the copy left, or its file could not be opened.
            let mut guard = self.lock();
            let state = &mut *guard;
            if state.copies.get(&id).is_some_and(|c| c.gen == gen) {
                release_parts(state, &id, gen, &todo);
                shrink(state, &key, size);
            }
            unpin(state, &key);
        }
        if completed {
            self.save_map(&id);
        }
        self.record_use(&key);
        written.map(|()| true)
    }

    /// Runs `change` on the file of copy `id` (generation `gen`) as the daemon's own change:
    /// one at a time per copy, after checking that the file is as the last change left it (if
    /// not, every part is checked again). `settle` then runs under the cache's lock together
    /// with recording the identity the change left (if `settle` says it is known: `false`
    /// records none, so the next reader checks what it reads). `settle` does not run if the
    /// change could not start.
    fn own_change<R>(
        &self,
        id: &Digest,
        gen: u64,
        change: impl FnOnce(&fs::File) -> io::Result<R>,
        settle: impl FnOnce(Ended<'_>, &io::Result<R>) -> bool,
    ) -> io::Result<R> {
        let key = Key::File(*id);
        let gone = || io::Error::other("the local copy left the cache");
        let writer = match self.lock().copies.get(id) {
            Some(c) if c.gen == gen => Arc::clone(&c.writer),
            _ => return Err(gone()),
        };
        let _one_at_a_time = writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let path = self.path(&key);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let f = fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&path)?;
        let before = Identity::of(&f.metadata()?);
        let distrusts = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let recorded = state.lru.peek(&key).and_then(|e| e.identity);
            let copy = match state.copies.get_mut(id) {
                Some(c) if c.gen == gen => c,
                _ => return Err(gone()),
            };
            if recorded != Some(before) && copy.missing < copy.parts.len() {
                if recorded.is_some() {
                    tracing::warn!(file = %id, path = %path.display(),
                        "local copy changed on disk behind the daemon; checking it again");
                }
                copy.distrust();
                if let Some(e) = state.lru.peek_mut(&key) {
                    e.verified = false;
                }
            }
            copy.writing = true;
            copy.distrusts
        };
        let result = change(&f);
        let after = f.metadata().map(|m| Identity::of(&m)).ok();
        let mut guard = self.lock();
        let state = &mut *guard;
        let (live, distrusted) = match state.copies.get_mut(id) {
            Some(c) if c.gen == gen => {
                c.writing = false;
                c.writes += 1;
                (true, c.distrusts != distrusts)
            }
            _ => (false, false),
        };
        let known = settle(
            Ended {
                state,
                live,
                distrusted,
            },
            &result,
        );
        if live {
            if let Some(e) = state.lru.peek_mut(&key) {
                e.identity = if known { after } else { None };
            }
        }
        result
    }

    /// Whether `layout`'s copy is complete and verified; `None` if there is none.
    pub(crate) fn copy_state(&self, id: &Digest) -> Option<CopyState> {
        let state = self.lock();
        state.copies.get(id).map(|c| CopyState {
            complete: c.complete(),
            verified: c.verified(),
        })
    }

    /// The chunks `layout`'s copy misses (each once), for completing it from elsewhere.
    pub(crate) fn missing_parts(&self, layout: &FileLayout) -> Vec<Digest> {
        let state = self.lock();
        let parts = state.copies.get(layout.id()).map(|c| &c.parts);
        let mut seen = HashSet::new();
        layout
            .chunks()
            .iter()
            .enumerate()
            .filter(|(i, _)| parts.is_none_or(|p| p[*i] == Part::Absent))
            .map(|(_, (d, _))| *d)
            .filter(|d| seen.insert(*d))
            .collect()
    }

    /// Checks every part in place of a complete copy (one found at start, or changed behind
    /// the daemon): a whole chunk against its digest, an edge part against its chunk file
    /// (verified against its own digest; an edge whose chunk file is gone stays unchecked
    /// until the chunk is fetched again); a part that does not match is dropped (fetched again
    /// when read). Whether the whole copy is verified now, and how many parts were dropped.
    pub(crate) fn verify_copy(&self, id: &Digest) -> io::Result<(bool, u64)> {
        let key = Key::File(*id);
        let (layout, gen) = {
            let mut state = self.lock();
            let Some(copy) = state.copies.get(id) else {
                return Ok((false, 0));
            };
            let found = (Arc::clone(&copy.layout), copy.gen);
            *state.pinned.entry(key).or_insert(0) += 1;
            found
        };
        let mut outcome = (false, 0u64);
        let mut dropped = Vec::new();
        let checked = self.own_change(
            id,
            gen,
            |f| self.check_parts(id, &layout, f),
            |ended, result| {
                let state = &mut *ended.state;
                let Some(copy) = state.copies.get_mut(id).filter(|_| ended.live) else {
                    return true;
                };
                let results = match result {
                    Ok(Some(results)) if !ended.distrusted => results,
                    // Changed while it was read, or found changed by a reader meanwhile: every
                    // part is checked again, and the identity the check left vouches for none.
                    Ok(_) => {
                        copy.distrust();
                        if let Some(e) = state.lru.peek_mut(&key) {
                            e.verified = false;
                        }
                        return false;
                    }
                    Err(_) => return true,
                };
                for &(i, verdict) in results {
                    if !copy.in_place(i) {
                        continue;
                    }
                    match verdict {
                        Some(true) => copy.set(i, Part::Verified),
                        Some(false) => {
                            copy.set(i, Part::Absent);
                            copy.saved = false;
                            dropped.push(i);
                        }
                        None => copy.set(i, Part::Present),
                    }
                }
                outcome.0 = copy.verified();
                outcome.1 = dropped.len() as u64;
                let size: u64 = dropped.iter().map(|&i| part_len(&layout, i)).sum();
                shrink(state, &key, size);
                for &i in &dropped {
                    forget_slot(state, &layout.chunks()[i].0, id, i);
                }
                if let Some(e) = state.lru.peek_mut(&key) {
                    e.verified = outcome.0;
                }
                true
            },
        );
        unpin(&mut self.lock(), &key);
        if !dropped.is_empty() {
            tracing::error!(file = %id, parts = dropped.len(),
                "local copy is corrupt: parts do not match their chunks; dropped them (fetched \
                 again when read)");
        }
        checked.map(|_| outcome)
    }

    /// The verdict on each part in place of copy `id` (open as `f`, under its writer lock);
    /// parts found wrong are punched out. `None` if the file changed while it was read.
    fn check_parts(&self, id: &Digest, layout: &FileLayout, f: &fs::File) -> io::Result<Checked> {
        let todo: Vec<usize> = {
            let state = self.lock();
            let Some(copy) = state.copies.get(id) else {
                return Ok(None);
            };
            (0..copy.parts.len())
                .filter(|&i| copy.in_place(i))
                .collect()
        };
        let before = Identity::of(&f.metadata()?);
        let mut results = Vec::with_capacity(todo.len());
        let mut buf = Vec::new();
        for i in todo {
            let (range, at) = layout.part(i);
            buf.resize((range.end - range.start) as usize, 0);
            let verdict = match f.read_exact_at(&mut buf, at) {
                Ok(()) if layout.whole(i) => Some(Digest::of(&buf) == layout.chunks()[i].0),
                Ok(()) => match self.read_chunk_file(&layout.chunks()[i].0) {
                    DiskRead::Hit(chunk) => {
                        Some(chunk.get(range.start as usize..range.end as usize) == Some(&buf[..]))
                    }
                    DiskRead::Miss | DiskRead::Corrupt => None,
                },
                Err(e) => {
                    tracing::warn!(file = %id, "reading a local copy: {e}");
                    Some(false)
                }
            };
            results.push((i, verdict));
        }
        if Identity::of(&f.metadata()?) != before {
            return Ok(None);
        }
        for &(i, verdict) in &results {
            if verdict == Some(false) {
                if let Err(e) = punch(f, layout, i) {
                    tracing::warn!(file = %id, "freeing a corrupt part's blocks: {e}");
                }
            }
        }
        Ok(Some(results))
    }

    /// Whether a complete copy of `id` is here; pins it if so.
    pub(super) fn pin_complete(&self, id: &Digest) -> Option<bool> {
        let key = Key::File(*id);
        let mut state = self.lock();
        let verified = match state.copies.get(id) {
            Some(c) if c.complete() => c.verified(),
            _ => return None,
        };
        state.lru.get(&key)?;
        *state.pinned.entry(key).or_insert(0) += 1;
        Some(verified)
    }

    /// Reads chunk `digest` whole from a copy that holds it, checked against its digest unless
    /// its part is verified and the copy unchanged. A part that does not match is dropped.
    pub(super) fn read_from_copy(&self, digest: &Digest) -> DiskRead {
        let Some(read) = self.slot_read(digest, None) else {
            return DiskRead::Miss;
        };
        if read.trusted {
            return DiskRead::Hit(read.data);
        }
        if Digest::of(&read.data) == *digest {
            if let Some(identity) = read.settled {
                self.mark_verified_if_still(&read, identity);
            }
            return DiskRead::Hit(read.data);
        }
        // Dropped only if no change of the daemon ran since the read began (a part rewritten
        // meanwhile is not the one read).
        if !self.drop_part(&read.id, read.gen, read.index, Some(read.writes)) {
            return DiskRead::Miss;
        }
        tracing::error!(chunk = %digest, file = %read.id,
            "local copy is corrupt: a chunk does not match its digest; dropped it, fetching \
             again");
        DiskRead::Corrupt
    }

    /// Marks the part `read` found right verified, if the copy is still as it was during the
    /// read: same copy, no change of the daemon or found behind its back since, and still the
    /// identity the read saw.
    fn mark_verified_if_still(&self, read: &SlotRead, identity: Identity) {
        let key = Key::File(read.id);
        let mut guard = self.lock();
        let state = &mut *guard;
        let recorded = state.lru.peek(&key).and_then(|e| e.identity);
        let Some(copy) = state.copies.get_mut(&read.id) else {
            return;
        };
        if copy.gen != read.gen
            || copy.writes != read.writes
            || copy.distrusts != read.distrusts
            || copy.writing
            || recorded != Some(identity)
            || copy.parts[read.index] != Part::Present
        {
            return;
        }
        copy.set(read.index, Part::Verified);
        let verified = copy.verified();
        if let Some(e) = state.lru.peek_mut(&key) {
            e.verified = verified;
        }
    }

    /// Bytes `range` of chunk `digest` from a copy that holds it verified and unchanged.
    pub(super) fn read_range_from_copy(
        &self,
        digest: &Digest,
        range: std::ops::Range<usize>,
    ) -> Option<Vec<u8>> {
        let read = self.slot_read(digest, Some(range))?;
        read.trusted.then_some(read.data)
    }

    /// Reads chunk `digest` (or `range` of it) from the copy the slot index names, and says
    /// whether the bytes can be used unchecked. A part that cannot be read is dropped.
    fn slot_read(
        &self,
        digest: &Digest,
        range: Option<std::ops::Range<usize>>,
    ) -> Option<SlotRead> {
        let (id, index, at, range, seen) = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let &(id, index) = state.slots.get(digest)?;
            let index = index as usize;
            let key = Key::File(id);
            let copy = state.copies.get(&id)?;
            if !copy.in_place(index) || !copy.layout.whole(index) {
                return None;
            }
            let len = copy.part_len(index) as usize;
            let range = range.unwrap_or(0..len);
            if range.start > range.end || range.end > len {
                return None; // asked by a layer that disagrees about the chunk's length
            }
            let (_, at) = copy.layout.part(index);
            let seen = Seen {
                gen: copy.gen,
                verified: copy.parts[index] == Part::Verified,
                writing: copy.writing,
                writes: copy.writes,
                distrusts: copy.distrusts,
                recorded: state.lru.peek(&key).and_then(|e| e.identity),
            };
            state.lru.promote(&key);
            *state.pinned.entry(key).or_insert(0) += 1;
            (id, index, at, range, seen)
        };
        let key = Key::File(id);
        let read = (|| -> io::Result<(Vec<u8>, Identity, Identity)> {
            let f = fs::File::options()
                .read(true)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(self.path(&key))?;
            let before = Identity::of(&f.metadata()?);
            let mut buf = vec![0u8; range.len()];
            f.read_exact_at(&mut buf, at + range.start as u64)?;
            Ok((buf, before, Identity::of(&f.metadata()?)))
        })();
        let mut guard = self.lock();
        let state = &mut *guard;
        unpin(state, &key);
        let (data, before, after) = match read {
            Ok(r) => r,
            Err(e) => {
                drop(guard);
                tracing::warn!(chunk = %digest, file = %id, "reading a local copy: {e}");
                let _ = self.drop_part(&id, seen.gen, index, None);
                return None;
            }
        };
        let recorded = state.lru.peek(&key).and_then(|e| e.identity);
        let copy = state.copies.get_mut(&id).filter(|c| c.gen == seen.gen)?;
        // The daemon's own change to another part moves the identity: that is no change behind
        // its back (nothing is distrusted for it), but the bytes are then checked. A change
        // found by another reader meanwhile leaves nothing to trust either.
        let own_change = seen.writing || copy.writing || copy.writes != seen.writes;
        let found_changed = copy.distrusts != seen.distrusts;
        let steady = before == after && seen.recorded == Some(before) && recorded == seen.recorded;
        if !steady && !own_change && !found_changed {
            // Changed behind the daemon, or no identity yet (a copy found at start).
            if seen.recorded.is_some() {
                tracing::warn!(file = %id, path = %self.path(&key).display(),
                    "local copy changed on disk since it was verified; checking it again");
            }
            copy.distrust();
            if let Some(e) = state.lru.peek_mut(&key) {
                e.verified = false;
                e.identity = (before == after).then_some(after);
            }
        }
        let trusted = steady
            && seen.verified
            && copy.parts[index] == Part::Verified
            && !found_changed
            && !own_change;
        let settled = (before == after && !own_change).then_some(after);
        let (writes, distrusts) = (copy.writes, copy.distrusts);
        drop(guard);
        self.record_use(&key);
        Some(SlotRead {
            id,
            gen: seen.gen,
            index,
            data,
            trusted,
            settled,
            writes,
            distrusts,
        })
    }

    /// Drops part `index` of copy `id` (generation `gen`; found corrupt or unreadable): its
    /// blocks are punched out and it is fetched again when read. With `unless_changed`, not
    /// if a change of the daemon ran since (the part may be another one now). Whether this
    /// call dropped it.
    fn drop_part(&self, id: &Digest, gen: u64, index: usize, unless_changed: Option<u64>) -> bool {
        let key = Key::File(*id);
        let layout = {
            let mut state = self.lock();
            let Some(copy) = state.copies.get_mut(id) else {
                return false;
            };
            if copy.gen != gen
                || !copy.in_place(index)
                || unless_changed.is_some_and(|w| w != copy.writes)
            {
                return false;
            }
            copy.set(index, Part::Dropping);
            copy.saved = false;
            let layout = Arc::clone(&copy.layout);
            let verified = copy.verified();
            if let Some(e) = state.lru.peek_mut(&key) {
                e.verified = verified;
            }
            forget_slot(&mut state, &layout.chunks()[index].0, id, index);
            layout
        };
        let finish = |state: &mut State| {
            if let Some(copy) = state.copies.get_mut(id).filter(|c| c.gen == gen) {
                if copy.parts[index] == Part::Dropping {
                    copy.set(index, Part::Absent);
                    shrink(state, &key, part_len(&layout, index));
                }
            }
        };
        let mut finished = false;
        let punched = self.own_change(
            id,
            gen,
            |f| punch(f, &layout, index),
            |ended, _| {
                finished = true;
                finish(ended.state);
                true
            },
        );
        if !finished {
            finish(&mut self.lock());
        }
        if let Err(e) = punched {
            tracing::warn!(file = %id, "freeing a dropped part's blocks: {e}");
        }
        true
    }

    /// Whether the open file `f` of complete copy `id` is the verified one, about to be
    /// handed to the kernel: the copy is verified and `f` is as the recorded identity says,
    /// both under one lock. A copy that changed has every part checked again first.
    pub(crate) fn file_unchanged(&self, id: &Digest, f: &fs::File) -> bool {
        let key = Key::File(*id);
        let Ok(found) = f.metadata().map(|m| Identity::of(&m)) else {
            return false;
        };
        let mut guard = self.lock();
        let state = &mut *guard;
        let recorded = state.lru.peek(&key).and_then(|e| e.identity);
        let Some(copy) = state.copies.get_mut(id) else {
            return false;
        };
        if recorded == Some(found) {
            return copy.verified();
        }
        if !copy.writing {
            tracing::warn!(file = %id, path = %self.path(&key).display(),
                "local copy changed on disk since it was verified; checking it again");
            copy.distrust();
            if let Some(e) = state.lru.peek_mut(&key) {
                e.verified = false;
                e.identity = None;
            }
        }
        false
    }

    /// Writes the map of copy `id` (temp file and rename).
    pub(super) fn save_map(&self, id: &Digest) {
        let (layout, present) = {
            let mut state = self.lock();
            let Some(copy) = state.copies.get_mut(id) else {
                return;
            };
            copy.saved = true;
            copy.unsaved = 0;
            let present: Vec<bool> = (0..copy.parts.len()).map(|i| copy.in_place(i)).collect();
            (Arc::clone(&copy.layout), present)
        };
        let bytes = encode_map(&layout, &present);
        let path = self.map_path(id);
        let n = self
            .temp_counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_file_name(format!(".{}.{n}.tmp", id.to_hex()));
        let written = fs::write(&tmp, &bytes).and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            tracing::warn!(file = %id, "saving a local copy's map: {e}");
            if let Some(c) = self.lock().copies.get_mut(id) {
                c.saved = false;
            }
        }
    }

    /// Maps of copies changed since they were last saved (at a clean stop).
    pub(super) fn save_maps(&self) {
        let unsaved: Vec<Digest> = self
            .lock()
            .copies
            .iter()
            .filter(|(_, c)| !c.saved && c.missing < c.parts.len())
            .map(|(id, _)| *id)
            .collect();
        for id in unsaved {
            self.save_map(&id);
        }
    }

    /// Complete local copies.
    pub(crate) fn files(&self) -> u64 {
        self.lock().copies.values().filter(|c| c.complete()).count() as u64
    }
}

/// What a reader saw of a copy before reading it.
struct Seen {
    gen: u64,
    verified: bool,
    writing: bool,
    writes: u64,
    distrusts: u64,
    recorded: Option<Identity>,
}

fn part_len(layout: &FileLayout, i: usize) -> u64 {
    let (range, _) = layout.part(i);
    range.end - range.start
}

/// Frees the blocks of part `i` (the file keeps its length).
fn punch(f: &fs::File, layout: &FileLayout, i: usize) -> io::Result<()> {
    let (range, at) = layout.part(i);
    if range.is_empty() {
        return Ok(());
    }
    rustix::fs::fallocate(
        f,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        at,
        range.end - range.start,
    )
    .map_err(io::Error::from)
}

fn unpin(state: &mut State, key: &Key) {
    if let Some(n) = state.pinned.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            state.pinned.remove(key);
        }
    }
}

/// Takes `bytes` off copy `key`'s size and the cache's use.
fn shrink(state: &mut State, key: &Key, bytes: u64) {
    if let Some(e) = state.lru.peek_mut(key) {
        e.size -= bytes;
        state.used -= bytes;
    }
}

/// Gives parts claimed for a write that did not happen back.
fn release_parts(state: &mut State, id: &Digest, gen: u64, parts: &[usize]) {
    if let Some(copy) = state.copies.get_mut(id).filter(|c| c.gen == gen) {
        for &i in parts {
            if copy.parts[i] == Part::Writing {
                copy.set(i, Part::Absent);
            }
        }
    }
}

/// Forgets a copy that holds nothing and nobody uses (one whose first write found no room).
fn discard_if_empty(state: &mut State, id: &Digest) {
    let key = Key::File(*id);
    let empty = state.copies.get(id).is_some_and(|c| {
        c.missing == c.parts.len()
            && !c
                .parts
                .iter()
                .any(|p| matches!(p, Part::Writing | Part::Dropping))
    });
    if empty && !state.pinned.contains_key(&key) {
        super::take_out(state, &key);
    }
}

/// Forgets that `digest` can be read from part `index` of copy `id`; another place of the
/// digest in that copy takes the slot if it is in place.
fn forget_slot(state: &mut State, digest: &Digest, id: &Digest, index: usize) {
    if state.slots.get(digest) != Some(&(*id, index as u32)) {
        return;
    }
    state.slots.remove(digest);
    if let Some(copy) = state.copies.get(id) {
        let other = copy
            .layout
            .positions(digest)
            .iter()
            .map(|&i| i as usize)
            .find(|&i| i != index && copy.in_place(i) && copy.layout.whole(i));
        if let Some(i) = other {
            state.slots.insert(*digest, (*id, i as u32));
        }
    }
}

/// Forgets copy `id` (evicted or removed): its parts can no longer be read by digest.
pub(super) fn drop_copy(state: &mut State, id: &Digest) {
    if let Some(copy) = state.copies.remove(id) {
        for (d, _) in copy.layout.chunks() {
            if state.slots.get(d).is_some_and(|(c, _)| c == id) {
                state.slots.remove(d);
            }
        }
    }
}

fn encode_map(layout: &FileLayout, present: &[bool]) -> Vec<u8> {
    let mut out = Vec::with_capacity(60 + layout.chunks().len() * 37);
    out.extend_from_slice(MAP_MAGIC);
    out.extend_from_slice(&layout.start().to_le_bytes());
    out.extend_from_slice(&layout.len().to_le_bytes());
    out.extend_from_slice(&(layout.chunks().len() as u32).to_le_bytes());
    for ((digest, len), present) in layout.chunks().iter().zip(present) {
        out.extend_from_slice(&digest.0);
        out.extend_from_slice(&len.to_le_bytes());
        out.push(u8::from(*present));
    }
    let check = Digest::of(&out);
    out.extend_from_slice(&check.0);
    out
}

/// A copy from its map, if the map is whole and describes the copy named `id`: its parts
/// in place are unverified.
fn decode_map(id: &Digest, bytes: &[u8]) -> Option<Copy> {
    let (body, check) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
    if Digest::of(body).0 != check || body.get(..8)? != MAP_MAGIC {
        return None;
    }
    let u64_at = |at: usize| Some(u64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?));
    let (start, len) = (u64_at(8)?, u64_at(16)?);
    let n = u32::from_le_bytes(body.get(24..28)?.try_into().ok()?) as usize;
    if body.len() != 28usize.checked_add(n.checked_mul(37)?)? {
        return None;
    }
    let mut chunks = Vec::with_capacity(n);
    let mut present = Vec::with_capacity(n);
    for rec in body[28..].chunks_exact(37) {
        let len = u32::from_le_bytes(rec[32..36].try_into().ok()?);
        if len > MAX_MAP_CHUNK {
            return None;
        }
        chunks.push((Digest(rec[..32].try_into().ok()?), len));
        present.push(rec[36] == 1);
    }
    let layout = FileLayout::from_parts(start, len, chunks)?;
    if layout.id() != id {
        return None;
    }
    let mut copy = Copy::new(Arc::new(layout));
    for (i, p) in present.into_iter().enumerate() {
        if p {
            copy.set(i, Part::Present);
        }
    }
    copy.saved = true;
    Some(copy)
}

/// The copies found in `<dir>/files` at start, with their sizes in place and last-use
/// times; anything else there (copies without a usable map, maps without a copy, temp files,
/// whole files of older versions, symlinks) is removed. Blocks of parts the map does not
/// count (written after its last save, before a crash) are punched out.
pub(super) fn scan(
    files_dir: &Path,
    last_use: impl Fn(&Key, &fs::Metadata) -> u64,
) -> io::Result<Vec<(u64, Digest, u64, Copy)>> {
    let mut found = Vec::new();
    for shard in fs::read_dir(files_dir)? {
        let shard = shard?;
        if !shard.file_type()?.is_dir() {
            continue;
        }
        let mut names: Vec<(PathBuf, String)> = Vec::new();
        for file in fs::read_dir(shard.path())? {
            let file = file?;
            names.push((file.path(), file.file_name().to_string_lossy().into_owned()));
        }
        let mut keep: HashSet<PathBuf> = HashSet::new();
        let shard_name = shard.file_name().to_string_lossy().into_owned();
        for (path, name) in &names {
            // Only the name the cache gives a copy (lowercase hex, in its own shard): another
            // spelling of the same id would count its bytes twice.
            let Some(id) = canonical(name, &shard_name) else {
                continue;
            };
            let map_path = path.with_file_name(format!("{name}.map"));
            let (Ok(meta), Ok(map)) = (fs::symlink_metadata(path), fs::read(&map_path)) else {
                continue;
            };
            let Some(copy) = decode_map(&id, &map) else {
                tracing::warn!(file = %id, "local copy with an unusable map; removing it");
                continue;
            };
            if !meta.is_file() || meta.len() != copy.layout.len() {
                continue;
            }
            let absent: Vec<usize> = (0..copy.parts.len())
                .filter(|&i| !copy.in_place(i))
                .collect();
            if !absent.is_empty() {
                let punched = fs::File::options()
                    .write(true)
                    .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                    .open(path)
                    .and_then(|f| absent.iter().try_for_each(|&i| punch(&f, &copy.layout, i)));
                if let Err(e) = punched {
                    tracing::warn!(file = %id, "local copy: {e}; removing it");
                    continue;
                }
            }
            let size = (0..copy.parts.len())
                .filter(|&i| copy.in_place(i))
                .map(|i| copy.part_len(i))
                .sum();
            found.push((last_use(&Key::File(id), &meta), id, size, copy));
            keep.insert(path.clone());
            keep.insert(map_path);
        }
        for (path, _) in names {
            if !keep.contains(&path) {
                let _ = fs::remove_file(&path);
            }
        }
    }
    Ok(found)
}

/// The digest a cache file's `name` spells, if it is spelled as the cache spells it (lowercase
/// hex) and lies in its shard `shard`.
pub(super) fn canonical(name: &str, shard: &str) -> Option<Digest> {
    let d = Digest::parse(name).ok()?;
    let hex = d.to_hex();
    (hex == name && hex[..2] == *shard).then_some(d)
}

/// Registers a copy found at start: its whole parts in place can be read by digest.
pub(super) fn adopt(state: &mut State, id: Digest, copy: Copy) {
    for (i, (d, _)) in copy.layout.chunks().iter().enumerate() {
        if copy.in_place(i) && copy.layout.whole(i) {
            state.slots.entry(*d).or_insert((id, i as u32));
        }
    }
    state.copies.insert(id, copy);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Five distinct 1,000-byte chunks and a file from byte 300 of the first to byte 200 of
    /// the last: the middle three lie wholly inside it, the first and last are edges.
    fn file() -> (Vec<Vec<u8>>, Arc<FileLayout>, Vec<u8>) {
        let chunks: Vec<Vec<u8>> = (0..5u32)
            .map(|i| (0..1000u32).map(|b| (b * 7 + i * 31) as u8).collect())
            .collect();
        let layout = FileLayout::from_parts(
            300,
            3900,
            chunks
                .iter()
                .map(|c| (Digest::of(c), c.len() as u32))
                .collect(),
        )
        .unwrap();
        let content = chunks.concat()[300..4200].to_vec();
        (chunks, Arc::new(layout), content)
    }

    fn fill(cache: &DiskCache, layout: &Arc<FileLayout>, chunks: &[Vec<u8>], order: &[usize]) {
        for &i in order {
            cache.store_part(layout, &Digest::of(&chunks[i]), &chunks[i]);
        }
    }

    fn hit(read: DiskRead) -> Vec<u8> {
        match read {
            DiskRead::Hit(d) => d,
            DiskRead::Miss => panic!("miss"),
            DiskRead::Corrupt => panic!("corrupt"),
        }
    }

    /// Bytes reach the disk once: the chunks inside the file are only in its copy (and read
    /// from there by digest), the edge chunks also whole; the budget counts each byte once.
    #[test]
    fn a_copy_is_filled_in_place_and_its_chunks_read_from_it() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(tmp.path(), 100_000).unwrap();
        let (chunks, layout, content) = file();
        fill(&cache, &layout, &chunks, &[3, 0, 1]);
        assert!(!cache.copy_state(layout.id()).unwrap().complete);
        assert!(
            cache.open_file(layout.id()).is_none(),
            "not handed out incomplete"
        );
        assert_eq!(hit(cache.read(&Digest::of(&chunks[1]))), chunks[1]);
        assert!(matches!(
            cache.read(&Digest::of(&chunks[2])),
            DiskRead::Miss
        ));
        fill(&cache, &layout, &chunks, &[4, 2, 2]);
        let state = cache.copy_state(layout.id()).unwrap();
        assert!(state.complete && state.verified);
        let (path, verified) = cache.open_file(layout.id()).unwrap();
        assert!(verified);
        assert_eq!(fs::read(&path).unwrap(), content);
        cache.release_file(layout.id());
        assert_eq!(cache.chunks(), 2, "only the edge chunks as chunk files");
        assert_eq!(cache.used(), 3900 + 2000);
        for c in &chunks {
            assert_eq!(&hit(cache.read(&Digest::of(c))), c);
        }
        assert_eq!(
            cache.read_range(&Digest::of(&chunks[2]), 10..20).unwrap(),
            chunks[2][10..20]
        );
        assert_eq!(cache.missing_parts(&layout), Vec::<Digest>::new());
    }

    /// A copy survives a restart through its map, its parts are checked before use, and a
    /// part changed on disk meanwhile is dropped and written again, never served.
    #[test]
    fn a_copy_survives_a_restart_and_is_checked_again() {
        let tmp = tempfile::tempdir().unwrap();
        let (chunks, layout, content) = file();
        {
            let cache = DiskCache::open(tmp.path(), 100_000).unwrap();
            fill(&cache, &layout, &chunks, &[0, 1, 2, 3, 4]);
            // An incomplete copy of another file is saved at the clean stop.
            let other = Arc::new(
                FileLayout::from_parts(
                    0,
                    1500,
                    vec![
                        (Digest::of(&chunks[1]), 1000),
                        (Digest::of(&chunks[3]), 1000),
                    ],
                )
                .unwrap(),
            );
            fill(&cache, &other, &chunks, &[3]);
        }
        let hex = layout.id().to_hex();
        let path = tmp.path().join("files").join(&hex[..2]).join(&hex);
        let cache = DiskCache::open(tmp.path(), 100_000).unwrap();
        // (chunk 3 is an edge of the other file: a chunk file too)
        assert_eq!(cache.used(), 3900 + 2000 + 500 + 1000);
        let state = cache.copy_state(layout.id()).unwrap();
        assert!(state.complete && !state.verified);
        let (_, verified) = cache.open_file(layout.id()).unwrap();
        assert!(!verified, "checked before it is handed to the kernel");
        cache.release_file(layout.id());
        assert!(cache.verify_copy(layout.id()).unwrap().0);
        assert_eq!(fs::read(&path).unwrap(), content);
        drop(cache);

        // One byte of chunk 2's part changes while the daemon is stopped.
        let mut bytes = fs::read(&path).unwrap();
        bytes[1700 + 5] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let cache = DiskCache::open(tmp.path(), 100_000).unwrap();
        assert!(matches!(
            cache.read(&Digest::of(&chunks[2])),
            DiskRead::Corrupt
        ));
        assert!(!cache.copy_state(layout.id()).unwrap().complete);
        assert_eq!(cache.missing_parts(&layout), vec![Digest::of(&chunks[2])]);
        fill(&cache, &layout, &chunks, &[2]);
        assert!(cache.copy_state(layout.id()).unwrap().complete);
        assert!(cache.verify_copy(layout.id()).unwrap().0);
        assert_eq!(fs::read(&path).unwrap(), content);
        drop(cache);

        // An edge part changed: caught against its (verified) chunk file.
        let mut bytes = fs::read(&path).unwrap();
        bytes[3] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let cache = DiskCache::open(tmp.path(), 100_000).unwrap();
        assert!(!cache.verify_copy(layout.id()).unwrap().0);
        assert_eq!(cache.missing_parts(&layout), vec![Digest::of(&chunks[0])]);
        assert_eq!(cache.used(), 3900 - 700 + 2000 + 500 + 1000);
    }

    #[test]
    fn a_copy_changed_behind_the_daemon_is_checked_again() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(tmp.path(), 100_000).unwrap();
        let (chunks, layout, _) = file();
        fill(&cache, &layout, &chunks, &[0, 1, 2, 3, 4]);
        let (path, verified) = cache.open_file(layout.id()).unwrap();
        assert!(verified);
        let f = fs::File::open(&path).unwrap();
        assert!(cache.file_unchanged(layout.id(), &f));
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(b"x", 1000)
            .unwrap();
        assert!(!cache.file_unchanged(layout.id(), &f));
        cache.release_file(layout.id());
        let (_, verified) = cache.open_file(layout.id()).unwrap();
        assert!(!verified, "to be verified again before it is handed out");
        cache.release_file(layout.id());
        // The changed part is caught when read by digest; the others check out.
        assert!(matches!(
            cache.read(&Digest::of(&chunks[1])),
            DiskRead::Corrupt
        ));
        assert_eq!(hit(cache.read(&Digest::of(&chunks[2]))), chunks[2]);
        assert!(!cache.verify_copy(layout.id()).unwrap().0);
    }

    #[test]
    fn copies_share_the_budget_stay_while_open_and_leave_nothing_when_evicted() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(tmp.path(), 16_000).unwrap();
        let (chunks, layout, _) = file();
        fill(&cache, &layout, &chunks, &[0, 1, 2, 3, 4]);
        assert_eq!(cache.files(), 1);
        let (path, _) = cache.open_file(layout.id()).unwrap();
        // Open (pinned): chunks that need room evict each other, not the copy.
        for i in 10..30u8 {
            let c = vec![i; 1000];
            cache.insert(&Digest::of(&c), &c);
            assert!(cache.used() <= 16_000);
        }
        assert!(path.exists());
        cache.release_file(layout.id());
        for i in 30..45u8 {
            let c = vec![i; 1000];
            cache.insert(&Digest::of(&c), &c);
        }
        assert!(!path.exists(), "released and least recently used: evicted");
        let mut map = path.clone().into_os_string();
        map.push(".map");
        assert!(!Path::new(&map).exists());
        assert_eq!(cache.files(), 0);
        assert!(matches!(
            cache.read(&Digest::of(&chunks[2])),
            DiskRead::Miss
        ));
        assert!(cache.used() <= 16_000);
    }

    #[test]
    fn copies_without_a_usable_map_are_removed_at_start() {
        let tmp = tempfile::tempdir().unwrap();
        let (chunks, layout, _) = file();
        {
            let cache = DiskCache::open(tmp.path(), 100_000).unwrap();
            fill(&cache, &layout, &chunks, &[0, 1, 2, 3, 4]);
        }
        let hex = layout.id().to_hex();
        let shard = tmp.path().join("files").join(&hex[..2]);
        // A damaged map, and a whole file of an older version (no map at all).
        let mut map = fs::read(shard.join(format!("{hex}.map"))).unwrap();
        map[40] ^= 1;
        fs::write(shard.join(format!("{hex}.map")), map).unwrap();
        let old = Digest::of(b"old").to_hex();
        let old_shard = tmp.path().join("files").join(&old[..2]);
        fs::create_dir_all(&old_shard).unwrap();
        fs::write(old_shard.join(&old), b"assembled by an older strata").unwrap();
        let cache = DiskCache::open(tmp.path(), 100_000).unwrap();
        assert!(cache.copy_state(layout.id()).is_none());
        assert!(!shard.join(&hex).exists() && !old_shard.join(&old).exists());
        assert_eq!(cache.used(), 2000, "the edge chunk files stay");
    }

    /// Four 64 KiB chunks and a file of exactly them (every part whole, block-aligned).
    fn aligned() -> (Vec<Vec<u8>>, Arc<FileLayout>) {
        let chunks: Vec<Vec<u8>> = (0..4u32)
            .map(|i| (0..65536u32).map(|b| (b * 13 + i * 7) as u8).collect())
            .collect();
        let layout = FileLayout::from_parts(
            0,
            4 << 16,
            chunks.iter().map(|c| (Digest::of(c), 65536)).collect(),
        )
        .unwrap();
        (chunks, Arc::new(layout))
    }

    fn allocated(path: &Path) -> u64 {
        std::os::unix::fs::MetadataExt::blocks(&fs::metadata(path).unwrap()) * 512
    }

    /// A part dropped as corrupt gives its blocks back, and so does a part written after the
    /// map was last saved (a crash), at the next start: the budget counts what is on disk.
    #[test]
    fn dropped_and_unsaved_parts_leave_no_blocks_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let (chunks, layout) = aligned();
        let hex = layout.id().to_hex();
        let path = tmp.path().join("files").join(&hex[..2]).join(&hex);
        {
            let cache = DiskCache::open(tmp.path(), 10 << 20).unwrap();
            fill(&cache, &layout, &chunks, &[0, 1, 2, 3]);
            assert!(allocated(&path) >= 4 << 16);
            let mut f = fs::OpenOptions::new().write(true).open(&path).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            io::Write::write_all(&mut f, b"X").unwrap();
            assert!(matches!(
                cache.read(&Digest::of(&chunks[0])),
                DiskRead::Corrupt
            ));
            assert_eq!(cache.used(), 3 << 16);
            assert!(
                allocated(&path) <= 3 << 16,
                "{} allocated",
                allocated(&path)
            );
        }
        // The map says parts 1-3; part 0 is written behind its back before the next start.
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&chunks[0], 0)
            .unwrap();
        let cache = DiskCache::open(tmp.path(), 10 << 20).unwrap();
        assert_eq!(cache.used(), 3 << 16);
        assert!(
            allocated(&path) <= 3 << 16,
            "{} allocated",
            allocated(&path)
        );
        assert_eq!(cache.missing_parts(&layout), vec![Digest::of(&chunks[0])]);
    }

    /// A part verified by a read after a start and changed behind the daemon afterwards is
    /// caught when the whole copy is checked (before it goes to the kernel), not absorbed.
    #[test]
    fn a_part_changed_after_it_was_read_is_caught_by_the_check_of_the_copy() {
        let tmp = tempfile::tempdir().unwrap();
        let (chunks, layout) = aligned();
        let hex = layout.id().to_hex();
        let path = tmp.path().join("files").join(&hex[..2]).join(&hex);
        drop({
            let cache = DiskCache::open(tmp.path(), 10 << 20).unwrap();
            fill(&cache, &layout, &chunks, &[0, 1, 2, 3]);
            cache
        });
        let cache = DiskCache::open(tmp.path(), 10 << 20).unwrap();
        assert_eq!(hit(cache.read(&Digest::of(&chunks[2]))), chunks[2]);
        assert_eq!(hit(cache.read(&Digest::of(&chunks[2]))), chunks[2]);
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(b"changed", (2 << 16) + 10)
            .unwrap();
        assert_eq!(cache.verify_copy(layout.id()).unwrap(), (false, 1));
        assert!(matches!(
            cache.read(&Digest::of(&chunks[2])),
            DiskRead::Miss
        ));
        assert_eq!(hit(cache.read(&Digest::of(&chunks[1]))), chunks[1]);
    }

    /// Two files share a chunk; the copy that held its slot goes: the next time the chunk is
    /// fetched for the other file, its copy (which has it in place) serves it again.
    #[test]
    fn a_chunk_shared_by_two_copies_stays_readable_when_one_goes() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(tmp.path(), 10 << 20).unwrap();
        let (chunks, _) = aligned();
        let d: Vec<(Digest, u32)> = chunks.iter().map(|c| (Digest::of(c), 65536)).collect();
        let a = Arc::new(FileLayout::from_parts(0, 2 << 16, vec![d[0], d[1]]).unwrap());
        let b = Arc::new(FileLayout::from_parts(0, 2 << 16, vec![d[0], d[2]]).unwrap());
        fill(&cache, &a, &chunks, &[0, 1]);
        fill(&cache, &b, &chunks, &[0, 2]);
        cache.remove(&Key::File(*a.id()));
        assert!(matches!(cache.read(&d[0].0), DiskRead::Miss));
        fill(&cache, &b, &chunks, &[0]);
        assert_eq!(hit(cache.read(&d[0].0)), chunks[0]);
        assert_eq!(cache.used(), 2 << 16, "b's copy only");
    }

    /// An edge part whose chunk file is gone cannot be checked: it stays (unchecked, so the
    /// copy does not go to the kernel) until the chunk is fetched again, then checks out.
    #[test]
    fn an_edge_without_its_chunk_file_waits_for_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (chunks, layout, content) = file();
        drop({
            let cache = DiskCache::open(tmp.path(), 100_000).unwrap();
            fill(&cache, &layout, &chunks, &[0, 1, 2, 3, 4]);
            cache
        });
        let hex = Digest::of(&chunks[4]).to_hex();
        fs::remove_file(tmp.path().join("chunks").join(&hex[..2]).join(&hex)).unwrap();
        let cache = DiskCache::open(tmp.path(), 100_000).unwrap();
        assert_eq!(cache.verify_copy(layout.id()).unwrap(), (false, 0));
        assert!(cache.missing_parts(&layout).is_empty());
        assert!(!cache.copy_state(layout.id()).unwrap().verified);
        fill(&cache, &layout, &chunks, &[4]);
        assert_eq!(cache.verify_copy(layout.id()).unwrap(), (true, 0));
        let (path, verified) = cache.open_file(layout.id()).unwrap();
        assert!(verified);
        assert_eq!(fs::read(path).unwrap(), content);
        cache.release_file(layout.id());
    }

    /// Fills, reads, checks, opens and evictions of several copies racing on four threads:
    /// every read is a miss or the right bytes, and afterwards the accounts agree with the
    /// parts in place.
    #[test]
    fn racing_fills_reads_and_evictions_of_copies_keep_the_accounts() {
        let tmp = tempfile::tempdir().unwrap();
        // Room for about three of the four files: copies evict each other.
        let cache = DiskCache::open(tmp.path(), 3 << 18).unwrap();
        let files: Vec<(Vec<Vec<u8>>, Arc<FileLayout>)> = (0..4u32)
            .map(|f| {
                let chunks: Vec<Vec<u8>> = (0..4u32)
                    .map(|i| {
                        (0..49152u32)
                            .map(|b| (b * 31 + i * 7 + f * 101) as u8)
                            .collect()
                    })
                    .collect();
                let layout = FileLayout::from_parts(
                    100,
                    4 * 49152 - 300,
                    chunks.iter().map(|c| (Digest::of(c), 49152)).collect(),
                )
                .unwrap();
                (chunks, Arc::new(layout))
            })
            .collect();
        std::thread::scope(|s| {
            for t in 0..4usize {
                let (cache, files) = (&cache, &files);
                s.spawn(move || {
                    for round in 0..400usize {
                        let (chunks, layout) = &files[(round * 3 + t) % 4];
                        let c = &chunks[(round * 7 + t * 3) % 4];
                        cache.store_part(layout, &Digest::of(c), c);
                        let (chunks, layout) = &files[(round + t * 5) % 4];
                        let c = &chunks[(round * 5 + t) % 4];
                        match cache.read(&Digest::of(c)) {
                            DiskRead::Hit(d) => assert!(d == *c, "wrong bytes"),
                            DiskRead::Miss => {}
                            DiskRead::Corrupt => panic!("read corrupt"),
                        }
                        if round % 50 == t {
                            let _ = cache.verify_copy(layout.id());
                        }
                        if let Some((path, _)) = cache.open_file(layout.id()) {
                            assert_eq!(fs::metadata(path).unwrap().len(), layout.len());
                            cache.release_file(layout.id());
                        }
                    }
                });
            }
        });
        let state = cache.lock();
        let total: u64 = state.lru.iter().map(|(_, e)| e.size).sum();
        assert_eq!(state.used, total);
        assert!(state.used <= 3 << 18);
        for (id, copy) in &state.copies {
            let in_place: u64 = (0..copy.parts.len())
                .filter(|&i| copy.in_place(i))
                .map(|i| copy.part_len(i))
                .sum();
            assert_eq!(state.lru.peek(&Key::File(*id)).unwrap().size, in_place);
            assert!(!copy
                .parts
                .iter()
                .any(|p| matches!(p, Part::Writing | Part::Dropping)));
        }
        assert!(state.pinned.is_empty());
    }
}
