//! Local copies of large files in the disk cache (`<dir>/files/xx/<id>`): sparse files the
//! size of a layer file, filled chunk by chunk as its chunks are fetched, with a *map* beside
//! each (`<id>.map`) that says which parts are in place so the copy survives a restart.
//!
//! A copy is one entry of the cache's LRU and budget, counted by the bytes in place. A chunk
//! wholly inside the file is kept only in the copy and found there by digest (`slots`); the
//! file's first and last chunks may also hold neighbours' bytes, so they stay whole as chunk
//! files too, and only the BLAKE3 of the file's part of them (in the map) can check that part.
//!
//! Parts written by this process are verified (they come from verified chunks); after a
//! restart every part is checked again before use. The daemon's own writes to a copy are
//! serialized, and each one compares the copy's identity (inode, size, ctime) with the one
//! left by the previous write: a copy written behind the daemon's back has all its parts
//! checked again.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
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
    /// On disk, not checked since start (or since the copy changed behind the daemon).
    Present,
    /// On disk and checked (or written by this process from verified bytes).
    Verified,
}

pub(super) struct Copy {
    layout: Arc<FileLayout>,
    parts: Vec<Part>,
    /// BLAKE3 of the file's part of its first and last chunks when they are not wholly inside
    /// it (their digests cover neighbours' bytes too).
    edges: [Option<Digest>; 2],
    /// Parts not in place yet (absent or being written).
    missing: usize,
    /// A write of this process is under way (they take `writer` one at a time).
    writing: bool,
    writer: Arc<Mutex<()>>,
    /// The map on disk says what the parts say.
    saved: bool,
}

impl Copy {
    fn new(layout: Arc<FileLayout>) -> Copy {
        let n = layout.chunks().len();
        Copy {
            layout,
            parts: vec![Part::Absent; n],
            edges: [None; 2],
            missing: n,
            writing: false,
            writer: Arc::default(),
            saved: false,
        }
    }

    fn complete(&self) -> bool {
        self.missing == 0
    }

    fn verified(&self) -> bool {
        self.complete() && self.parts.iter().all(|p| *p == Part::Verified)
    }

    /// Which of the two edge hashes checks part `i` (`None`: the chunk's digest does).
    fn edge_of(&self, i: usize) -> Option<usize> {
        if self.layout.whole(i) {
            None
        } else if i == 0 {
            Some(0)
        } else {
            Some(1)
        }
    }

    fn part_len(&self, i: usize) -> u64 {
        let (range, _) = self.layout.part(i);
        range.end - range.start
    }

    /// After a change behind the daemon's back: every part in place is checked again.
    fn distrust(&mut self) {
        for p in &mut self.parts {
            if *p == Part::Verified {
                *p = Part::Present;
            }
        }
    }
}

/// Whether a copy is complete, and whether all of it is verified since start.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CopyState {
    pub complete: bool,
    pub verified: bool,
}

const MAP_MAGIC: &[u8; 8] = b"STRATAC1";

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
        if positions.iter().any(|&i| !layout.whole(i as usize)) {
            self.insert(digest, data);
        }
        if let Err(e) = self.write_parts(layout, digest, data) {
            tracing::warn!(file = %layout.id(), chunk = %digest, "writing into a local copy: {e}");
        }
    }

    fn write_parts(
        &self,
        layout: &Arc<FileLayout>,
        digest: &Digest,
        data: &[u8],
    ) -> io::Result<()> {
        let id = *layout.id();
        let key = Key::File(id);
        let positions = layout.positions(digest);
        // Claim the parts this chunk fills and reserve their bytes.
        let (todo, writer, evicted) = {
            let mut state = self.lock();
            if state.removing.contains_key(&key) {
                drop(state);
                if positions.iter().all(|&i| layout.whole(i as usize)) {
                    self.insert(digest, data);
                }
                return Ok(());
            }
            let st = &mut *state;
            if let std::collections::hash_map::Entry::Vacant(v) = st.copies.entry(id) {
                v.insert(Copy::new(Arc::clone(layout)));
                st.lru.put(
                    key,
                    Entry {
                        size: 0,
                        verified: false,
                        identity: None,
                        recorded: 0,
                    },
                );
            }
            let copy = state.copies.get_mut(&id).expect("inserted above");
            let mut todo = Vec::new();
            let mut size = 0;
            for &i in positions {
                let i = i as usize;
                if copy.parts[i] == Part::Absent {
                    copy.parts[i] = Part::Writing;
                    size += copy.part_len(i);
                    todo.push(i);
                }
            }
            if todo.is_empty() {
                return Ok(());
            }
            let writer = Arc::clone(&copy.writer);
            *state.pinned.entry(key).or_insert(0) += 1;
            let evicted = self.evict_until(&mut state, size);
            if state.used + size > self.capacity {
                release_parts(&mut state, &id, &todo);
                unpin(&mut state, &key);
                drop(state);
                self.unlink(evicted);
                return Ok(());
            }
            state.used += size;
            if let Some(e) = state.lru.peek_mut(&key) {
                e.size += size;
            }
            (todo, writer, evicted)
        };
        self.unlink(evicted);
        let edges: Vec<(usize, Digest)> = todo
            .iter()
            .filter(|&&i| !layout.whole(i))
            .map(|&i| {
                let (range, _) = layout.part(i);
                (
                    i,
                    Digest::of(&data[range.start as usize..range.end as usize]),
                )
            })
            .collect();
        let _one_writer = writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let path = self.path(&key);
        let written = (|| -> io::Result<(Identity, Identity)> {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            let f = fs::File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?;
            let before = Identity::of(&f.metadata()?);
            {
                let mut state = self.lock();
                let recorded = state.lru.peek(&key).and_then(|e| e.identity);
                if recorded.is_some_and(|r| r != before) {
                    tracing::warn!(file = %id, path = %path.display(),
                        "local copy changed on disk behind the daemon; checking it again");
                    if let Some(c) = state.copies.get_mut(&id) {
                        c.distrust();
                    }
                }
                if let Some(c) = state.copies.get_mut(&id) {
                    c.writing = true;
                }
            }
            if before.size != layout.len() {
                f.set_len(layout.len())?;
            }
            for &i in &todo {
                let (range, at) = layout.part(i);
                f.write_all_at(&data[range.start as usize..range.end as usize], at)?;
            }
            Ok((before, Identity::of(&f.metadata()?)))
        })();
        let completed = {
            let mut state = self.lock();
            let identity = written.as_ref().ok().map(|(_, after)| *after);
            let settled = match state.copies.get_mut(&id) {
                Some(copy) => {
                    copy.writing = false;
                    if identity.is_some() {
                        for &i in &todo {
                            copy.parts[i] = Part::Verified;
                            copy.missing -= 1;
                        }
                        for &(i, h) in &edges {
                            if let Some(e) = copy.edge_of(i) {
                                copy.edges[e] = Some(h);
                            }
                        }
                        copy.saved = false;
                    }
                    Some((copy.complete(), copy.verified()))
                }
                None => None,
            };
            match (settled, identity) {
                (Some((complete, verified)), Some(identity)) => {
                    if let Some(e) = state.lru.peek_mut(&key) {
                        e.identity = Some(identity);
                        e.verified = verified;
                    }
                    for &i in &todo {
                        if layout.whole(i) {
                            state.slots.entry(*digest).or_insert((id, i as u32));
                        }
                    }
                    unpin(&mut state, &key);
                    complete
                }
                _ => {
                    // The write failed: give the reservation back.
                    release_parts(&mut state, &id, &todo);
                    let size: u64 = todo.iter().map(|&i| part_len(layout, i)).sum();
                    if let Some(e) = state.lru.peek_mut(&key) {
                        e.size -= size;
                        state.used -= size;
                    }
                    unpin(&mut state, &key);
                    false
                }
            }
        };
        drop(_one_writer);
        if completed {
            self.save_map(&id);
        }
        self.record_use(&key);
        written.map(|_| ())
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

    /// Checks every part of a complete copy not verified since start (a copy found at start,
    /// or changed behind the daemon): a part that does not match is dropped (fetched again
    /// when read). Whether the whole copy is verified now, and how many parts were dropped.
    pub(crate) fn verify_copy(&self, id: &Digest) -> io::Result<(bool, u64)> {
        let key = Key::File(*id);
        let (layout, todo, writer) = {
            let mut state = self.lock();
            let Some(copy) = state.copies.get(id) else {
                return Ok((false, 0));
            };
            let todo: Vec<(usize, Option<Digest>)> = (0..copy.parts.len())
                .filter(|&i| copy.parts[i] == Part::Present)
                .map(|i| (i, copy.edge_of(i).and_then(|e| copy.edges[e])))
                .collect();
            let found = (Arc::clone(&copy.layout), todo, Arc::clone(&copy.writer));
            *state.pinned.entry(key).or_insert(0) += 1;
            found
        };
        let _one_writer = writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let checked = (|| -> io::Result<Checked> {
            let f = fs::File::open(self.path(&key))?;
            let before = Identity::of(&f.metadata()?);
            let mut results = Vec::with_capacity(todo.len());
            let mut buf = Vec::new();
            for &(i, edge) in &todo {
                let (range, at) = layout.part(i);
                buf.resize((range.end - range.start) as usize, 0);
                let ok = match f.read_exact_at(&mut buf, at) {
                    Ok(()) => {
                        let got = Digest::of(&buf);
                        match edge {
                            _ if layout.whole(i) => got == layout.chunks()[i].0,
                            Some(h) => got == h,
                            None => false,
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => false,
                    Err(e) => return Err(e),
                };
                results.push((i, ok));
            }
            let after = Identity::of(&f.metadata()?);
            Ok((before == after).then_some((after, results)))
        })();
        let mut state = self.lock();
        unpin(&mut state, &key);
        let Some((identity, results)) = checked? else {
            return Ok((false, 0)); // written meanwhile: checked again later
        };
        let mut dropped = Vec::new();
        let verified = match state.copies.get_mut(id) {
            Some(copy) => {
                for (i, ok) in results {
                    if copy.parts[i] != Part::Present {
                        continue;
                    }
                    if ok {
                        copy.parts[i] = Part::Verified;
                    } else {
                        copy.parts[i] = Part::Absent;
                        copy.missing += 1;
                        copy.saved = false;
                        dropped.push(i);
                    }
                }
                copy.verified()
            }
            None => false,
        };
        if !dropped.is_empty() {
            tracing::error!(file = %id, parts = dropped.len(),
                "local copy is corrupt: parts do not match their chunks; dropped them (fetched \
                 again when read)");
            let size: u64 = dropped.iter().map(|&i| part_len(&layout, i)).sum();
            if let Some(e) = state.lru.peek_mut(&key) {
                e.size -= size;
                state.used -= size;
            }
            for &i in &dropped {
                forget_slot(&mut state, &layout.chunks()[i].0, id);
            }
        }
        if let Some(e) = state.lru.peek_mut(&key) {
            e.identity = Some(identity);
            e.verified = verified;
        }
        Ok((verified, dropped.len() as u64))
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
        let Some(found) = self.slot_read(digest, None) else {
            return DiskRead::Miss;
        };
        let SlotRead {
            id,
            index,
            data,
            trusted,
        } = found;
        if trusted {
            return DiskRead::Hit(data);
        }
        let good = Digest::of(&data) == *digest;
        let mut state = self.lock();
        let key = Key::File(id);
        let mut dropped = false;
        if let Some(copy) = state.copies.get_mut(&id) {
            match copy.parts[index] {
                Part::Present | Part::Verified if good => copy.parts[index] = Part::Verified,
                Part::Present | Part::Verified => {
                    copy.parts[index] = Part::Absent;
                    copy.missing += 1;
                    copy.saved = false;
                    dropped = true;
                }
                _ => {}
            }
            let verified = copy.verified();
            if dropped {
                let size = copy.part_len(index);
                if let Some(e) = state.lru.peek_mut(&key) {
                    e.size -= size;
                    state.used -= size;
                }
                forget_slot(&mut state, digest, &id);
            }
            if let Some(e) = state.lru.peek_mut(&key) {
                e.verified = verified;
            }
        }
        if good {
            DiskRead::Hit(data)
        } else {
            tracing::error!(chunk = %digest, file = %id,
                "local copy is corrupt: a chunk does not match its digest; dropping it and \
                 fetching again");
            DiskRead::Corrupt
        }
    }

    /// Bytes `range` of chunk `digest` from a copy that holds it verified and unchanged.
    pub(super) fn read_range_from_copy(
        &self,
        digest: &Digest,
        range: std::ops::Range<usize>,
    ) -> Option<Vec<u8>> {
        let found = self.slot_read(digest, Some(range))?;
        found.trusted.then_some(found.data)
    }

    /// Reads chunk `digest` (or `range` of it) from the copy the slot index names, with
    /// whether the bytes can be used without checking them.
    fn slot_read(
        &self,
        digest: &Digest,
        range: Option<std::ops::Range<usize>>,
    ) -> Option<SlotRead> {
        let (id, index, at, len, verified, writing, recorded) = {
            let mut state = self.lock();
            let &(id, index) = state.slots.get(digest)?;
            let index = index as usize;
            let copy = state.copies.get(&id)?;
            let part = copy.parts[index];
            if !matches!(part, Part::Present | Part::Verified) || !copy.layout.whole(index) {
                return None;
            }
            let (_, at) = copy.layout.part(index);
            let len = copy.part_len(index) as usize;
            let found = (
                id,
                index,
                at,
                len,
                part == Part::Verified,
                copy.writing,
                state.lru.peek(&Key::File(id)).and_then(|e| e.identity),
            );
            *state.pinned.entry(Key::File(id)).or_insert(0) += 1;
            found
        };
        let key = Key::File(id);
        let range = range.unwrap_or(0..len);
        let read = (|| -> io::Result<(Vec<u8>, Identity, Identity)> {
            if range.end > len {
                return Err(io::Error::other("range past the chunk"));
            }
            let f = fs::File::open(self.path(&key))?;
            let before = Identity::of(&f.metadata()?);
            let mut buf = vec![0u8; range.len()];
            f.read_exact_at(&mut buf, at + range.start as u64)?;
            Ok((buf, before, Identity::of(&f.metadata()?)))
        })();
        let mut guard = self.lock();
        unpin(&mut guard, &key);
        let (data, before, after) = match read {
            Ok(r) => r,
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(chunk = %digest, file = %id, "reading a local copy: {e}");
                }
                return None;
            }
        };
        let state = &mut *guard;
        let copy = state.copies.get_mut(&id)?;
        let now_writing = copy.writing;
        let recorded_now = state.lru.peek(&key).and_then(|e| e.identity);
        // The daemon's own write into another part moves the identity: that is no change
        // behind its back, and the parts it did not write are as they were.
        let own_write = writing || now_writing || recorded != recorded_now;
        let steady = before == after && Some(before) == recorded;
        if !steady && !own_write {
            // No identity yet (found at start): nothing was verified against one.
            if recorded.is_some() {
                tracing::warn!(file = %id, path = %self.path(&key).display(),
                    "local copy changed on disk since it was verified; checking it again");
                copy.distrust();
            }
            if let Some(e) = state.lru.peek_mut(&key) {
                e.verified = false;
                e.identity = (before == after).then_some(after);
            }
        }
        drop(guard);
        self.record_use(&key);
        Some(SlotRead {
            id,
            index,
            data,
            trusted: verified && (steady || own_write),
        })
    }

    /// [`DiskCache::unchanged`] for a complete copy about to be handed to the kernel; a copy
    /// that changed has all its parts checked again first.
    pub(crate) fn file_unchanged(&self, id: &Digest, f: &fs::File) -> bool {
        let key = Key::File(*id);
        if self.unchanged(&key, f) {
            return true;
        }
        if let Some(c) = self.lock().copies.get_mut(id) {
            c.distrust();
        }
        false
    }

    /// Writes the map of copy `id` (temp file and rename).
    pub(super) fn save_map(&self, id: &Digest) {
        let bytes = {
            let mut state = self.lock();
            let Some(copy) = state.copies.get_mut(id) else {
                return;
            };
            copy.saved = true;
            encode_map(copy)
        };
        let path = self.map_path(id);
        let n = self
            .temp_counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_file_name(format!(".{}.{n}.tmp", id.to_hex()));
        let written = fs::write(&tmp, &bytes).and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            tracing::warn!(file = %id, "saving a local copy's map: {e}");
        }
    }

    /// Maps of copies changed since they were last saved (at a clean stop).
    pub(super) fn save_maps(&self) {
        let unsaved: Vec<Digest> = self
            .lock()
            .copies
            .iter()
            .filter(|(_, c)| !c.saved)
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

/// What a check of a copy's parts found: the copy's identity and each part's verdict, if
/// nothing wrote to it meanwhile.
type Checked = Option<(Identity, Vec<(usize, bool)>)>;

struct SlotRead {
    id: Digest,
    index: usize,
    data: Vec<u8>,
    trusted: bool,
}

fn part_len(layout: &FileLayout, i: usize) -> u64 {
    let (range, _) = layout.part(i);
    range.end - range.start
}

fn unpin(state: &mut State, key: &Key) {
    if let Some(n) = state.pinned.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            state.pinned.remove(key);
        }
    }
}

/// Gives parts claimed for a write that did not happen back.
fn release_parts(state: &mut State, id: &Digest, parts: &[usize]) {
    if let Some(copy) = state.copies.get_mut(id) {
        for &i in parts {
            if copy.parts[i] == Part::Writing {
                copy.parts[i] = Part::Absent;
            }
        }
    }
}

/// Forgets that `digest` can be read from copy `id`.
fn forget_slot(state: &mut State, digest: &Digest, id: &Digest) {
    if state.slots.get(digest).is_some_and(|(c, _)| c == id) {
        state.slots.remove(digest);
    }
}

/// Forgets copy `id` (evicted or removed): its parts can no longer be read by digest.
pub(super) fn drop_copy(state: &mut State, id: &Digest) {
    if let Some(copy) = state.copies.remove(id) {
        for (d, _) in copy.layout.chunks() {
            forget_slot(state, d, id);
        }
    }
}

fn encode_map(copy: &Copy) -> Vec<u8> {
    let layout = &copy.layout;
    let mut out = Vec::with_capacity(32 + layout.chunks().len() * 37 + 100);
    out.extend_from_slice(MAP_MAGIC);
    out.extend_from_slice(&layout.start().to_le_bytes());
    out.extend_from_slice(&layout.len().to_le_bytes());
    out.extend_from_slice(&(layout.chunks().len() as u32).to_le_bytes());
    for ((digest, len), part) in layout.chunks().iter().zip(&copy.parts) {
        out.extend_from_slice(&digest.0);
        out.extend_from_slice(&len.to_le_bytes());
        out.push(u8::from(matches!(part, Part::Present | Part::Verified)));
    }
    for edge in &copy.edges {
        out.push(u8::from(edge.is_some()));
        out.extend_from_slice(&edge.map_or([0; 32], |d| d.0));
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
    let parts_end = 28usize.checked_add(n.checked_mul(37)?)?;
    if body.len() != parts_end + 2 * 33 {
        return None;
    }
    let mut chunks = Vec::with_capacity(n);
    let mut present = Vec::with_capacity(n);
    for rec in body[28..parts_end].chunks_exact(37) {
        chunks.push((
            Digest(rec[..32].try_into().ok()?),
            u32::from_le_bytes(rec[32..36].try_into().ok()?),
        ));
        present.push(rec[36] == 1);
    }
    let layout = FileLayout::from_parts(start, len, chunks)?;
    if layout.id() != id {
        return None;
    }
    let mut copy = Copy::new(Arc::new(layout));
    for (i, p) in present.into_iter().enumerate() {
        if p {
            copy.parts[i] = Part::Present;
            copy.missing -= 1;
        }
    }
    for (e, rec) in body[parts_end..].chunks_exact(33).enumerate() {
        if rec[0] == 1 {
            copy.edges[e] = Some(Digest(rec[1..].try_into().ok()?));
        }
    }
    copy.saved = true;
    Some(copy)
}

/// The copies found in `<dir>/files` at start, with their sizes in place and last-use
/// times; anything else there (copies without a usable map, maps without a copy, temp files,
/// whole files of older versions) is removed.
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
        for (path, name) in &names {
            let Ok(id) = Digest::parse(name) else {
                continue;
            };
            let map_path = path.with_file_name(format!("{name}.map"));
            let (Ok(meta), Ok(map)) = (fs::metadata(path), fs::read(&map_path)) else {
                continue;
            };
            let Some(copy) = decode_map(&id, &map) else {
                tracing::warn!(file = %id, "local copy with an unusable map; removing it");
                continue;
            };
            if !meta.is_file() || meta.len() != copy.layout.len() {
                continue;
            }
            let size = (0..copy.parts.len())
                .filter(|&i| copy.parts[i] == Part::Present)
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

/// Registers a copy found at start: its whole parts in place can be read by digest.
pub(super) fn adopt(state: &mut State, id: Digest, copy: Copy) {
    for (i, (d, _)) in copy.layout.chunks().iter().enumerate() {
        if copy.parts[i] == Part::Present && copy.layout.whole(i) {
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

        // An edge part changed: caught by the hash the map keeps of it.
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
}
