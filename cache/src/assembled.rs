//! Local copies of large layer files: the whole content of a layer file in one sparse local
//! file, so that opens of a hot file can be handed to the kernel (FUSE passthrough) and read
//! at the speed of the local disk with no trip through the daemon.
//!
//! The copy *is* where the file's chunks are cached: a read of a large file hands the cache
//! its [`FileLayout`], and each chunk fetched for it is written straight into its place in
//! the copy (see the disk cache), so its bytes reach the disk once. Chunks ignore file
//! boundaries: a chunk wholly inside the file lives only in the copy (and is read from there
//! by digest, whichever file asks for it); the first and last chunks may hold neighbours'
//! bytes, so they are also kept whole as chunk files and only the file's own part of them is
//! in the copy. A copy is handed to the kernel once every part is in place and verified.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use crate::disk_cache::DiskRead;
use crate::ChunkCache;
use strata_cache_format::{ChunkLoc, Digest};

/// Where a file's bytes are in the chunk stream: its chunks in order, where it starts in the
/// first one, and its length.
#[derive(Debug, Clone)]
pub struct FileChunks {
    pub chunks: Vec<ChunkLoc>,
    pub start: u64,
    pub len: u64,
}

impl FileChunks {
    /// The name of the file's content. Chunks are content-addressed, so two files with the same
    /// chunks and bounds have the same content, whatever layer or store they come from.
    pub fn id(&self) -> Digest {
        file_id(
            self.start,
            self.len,
            self.chunks.iter().map(|l| (&l.digest, l.len)),
        )
    }
}

pub(crate) fn file_id<'a>(
    start: u64,
    len: u64,
    chunks: impl Iterator<Item = (&'a Digest, u32)>,
) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"strata file v1\0");
    h.update(&start.to_le_bytes());
    h.update(&len.to_le_bytes());
    for (digest, len) in chunks {
        h.update(&digest.0);
        h.update(&len.to_le_bytes());
    }
    Digest(*h.finalize().as_bytes())
}

/// A file's chunks with where each one's bytes go in the file's local copy: what the cache
/// needs to write a chunk fetched for the file into its place.
#[derive(Debug)]
pub struct FileLayout {
    id: Digest,
    start: u64,
    len: u64,
    /// Digest and plain length of each chunk, in file order.
    chunks: Vec<(Digest, u32)>,
    /// Where each chunk starts in the chunk stream, relative to the first chunk.
    offsets: Vec<u64>,
    /// The positions of each chunk (a file may hold one chunk several times).
    at: HashMap<Digest, Vec<u32>>,
}

impl FileLayout {
    /// The layout of `file`; `None` if its bounds do not fit its chunks (a layer whose
    /// manifest lies about them).
    pub fn new(file: &FileChunks) -> Option<Arc<FileLayout>> {
        Self::from_parts(
            file.start,
            file.len,
            file.chunks.iter().map(|l| (l.digest, l.len)).collect(),
        )
        .map(Arc::new)
    }

    pub(crate) fn from_parts(
        start: u64,
        len: u64,
        chunks: Vec<(Digest, u32)>,
    ) -> Option<FileLayout> {
        let mut offsets = Vec::with_capacity(chunks.len());
        let mut at: HashMap<Digest, Vec<u32>> = HashMap::new();
        let mut total = 0u64;
        for (i, (digest, l)) in chunks.iter().enumerate() {
            offsets.push(total);
            total += *l as u64;
            at.entry(*digest).or_default().push(i as u32);
        }
        // Every chunk holds some of the file's bytes: the first one its start, the last its end.
        let fits = !chunks.is_empty()
            && len > 0
            && start < chunks[0].1 as u64
            && start
                .checked_add(len)
                .is_some_and(|end| end <= total && end > offsets[offsets.len() - 1]);
        fits.then(|| FileLayout {
            id: file_id(start, len, chunks.iter().map(|(d, l)| (d, *l))),
            start,
            len,
            chunks,
            offsets,
            at,
        })
    }

    /// The file's content name (see [`FileChunks::id`]).
    pub fn id(&self) -> &Digest {
        &self.id
    }

    /// The file's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn start(&self) -> u64 {
        self.start
    }

    pub(crate) fn chunks(&self) -> &[(Digest, u32)] {
        &self.chunks
    }

    /// The positions of chunk `digest` in the file (none if it is not one of its chunks).
    pub(crate) fn positions(&self, digest: &Digest) -> &[u32] {
        self.at.get(digest).map_or(&[], |v| v.as_slice())
    }

    /// Chunk `i`'s part of the file: the range of the chunk's bytes that belong to the file,
    /// and where the first of them goes in the file.
    pub(crate) fn part(&self, i: usize) -> (std::ops::Range<u64>, u64) {
        let chunk_start = self.offsets[i];
        let chunk_end = chunk_start + self.chunks[i].1 as u64;
        let lo = self.start.max(chunk_start);
        let hi = (self.start + self.len).min(chunk_end).max(lo);
        (lo - chunk_start..hi - chunk_start, lo - self.start)
    }

    /// Whether all of chunk `i` lies inside the file (the copy then holds it whole).
    pub(crate) fn whole(&self, i: usize) -> bool {
        let (range, _) = self.part(i);
        range.start == 0 && range.end == self.chunks[i].1 as u64
    }
}

/// Files larger than this share of the disk budget get no local copy: one file should not
/// push the rest of the cache out.
pub(crate) const MAX_SHARE_OF_BUDGET: u64 = 4;

/// A file's complete local copy, open; the cache keeps it (no eviction) while this lives.
pub struct AssembledFile {
    cache: Arc<ChunkCache>,
    id: Digest,
    pub file: std::fs::File,
}

impl Drop for AssembledFile {
    fn drop(&mut self) {
        if let Some(disk) = &self.cache.disk {
            disk.release_file(&self.id);
        }
    }
}

impl ChunkCache {
    /// The complete local copy of a file, if every part of it is in place and verified since
    /// start. One that is not verified yet is verified by [`ChunkCache::assemble`]; until
    /// then, `None`.
    pub fn assembled(self: &Arc<Self>, id: &Digest) -> Option<AssembledFile> {
        let disk = self.disk.as_ref()?;
        let id = *id;
        let (path, verified) = disk.open_file(&id)?;
        let assembled = AssembledFile {
            cache: Arc::clone(self),
            id,
            file: match std::fs::File::options()
                .read(true)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(&path)
            {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!("opening local copy {}: {e}", path.display());
                    disk.release_file(&id);
                    return None;
                }
            },
        };
        // Handed to the kernel only as verified: a copy changed on disk since (another
        // process wrote to it) is verified again first (see `ChunkCache::assemble`).
        (verified && disk.file_unchanged(&id, &assembled.file)).then_some(assembled)
    }

    /// In the background: completes a file's local copy with the chunks it misses, if all of
    /// them are cached elsewhere (in memory, as chunk files or in other copies: chunks shared
    /// with other files), or verifies the parts of a copy found at start. Does nothing if
    /// either is under way already. Must be called within a tokio runtime.
    pub fn assemble(self: &Arc<Self>, layout: Arc<FileLayout>) {
        let Some(disk) = &self.disk else { return };
        if layout.len() > disk.capacity() / MAX_SHARE_OF_BUDGET {
            return;
        }
        let id = *layout.id();
        if !self
            .assembling
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id)
        {
            return;
        }
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let result = this.assemble_now(&layout, false);
            this.assembling
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&id);
            match result {
                Ok(true) => {
                    tracing::debug!(file = %id, size = layout.len(), "local copy ready")
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(file = %id, "completing a local copy: {e}"),
            }
        });
    }

    /// Completes a file's local copy now (as [`ChunkCache::assemble`] does in the
    /// background), and returns the chunks it still misses: those cached nowhere.
    pub async fn complete_copy(
        self: &Arc<Self>,
        layout: Arc<FileLayout>,
    ) -> std::collections::HashSet<Digest> {
        let Some(disk_capacity) = self.disk.as_ref().map(|d| d.capacity()) else {
            return Default::default();
        };
        if layout.len() > disk_capacity / MAX_SHARE_OF_BUDGET {
            return Default::default();
        }
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = this.assemble_now(&layout, true) {
                tracing::warn!(file = %layout.id(), "completing a local copy: {e}");
            }
            let disk = this.disk.as_ref().expect("checked above");
            disk.missing_parts(&layout).into_iter().collect()
        })
        .await
        .unwrap_or_default()
    }

    /// Completes (or checks) `layout`'s copy from what is cached; with `partial`, puts in
    /// whatever is cached even if that does not complete it. Whether it is complete and
    /// verified.
    fn assemble_now(&self, layout: &Arc<FileLayout>, partial: bool) -> io::Result<bool> {
        let disk = self.disk.as_ref().expect("checked by assemble");
        let id = layout.id();
        if let Some(copy) = disk.copy_state(id) {
            if copy.complete {
                if copy.verified {
                    return Ok(true);
                }
                let (verified, dropped) = disk.verify_copy(id)?;
                self.count_corrupt(dropped);
                if verified || dropped == 0 {
                    return Ok(verified);
                }
            }
        }
        // Peeked: completing a copy is not a use of the chunks it takes from memory.
        let in_memory = |d: &Digest| {
            self.memory
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .lru
                .peek(d)
                .cloned()
        };
        let missing = disk.missing_parts(layout);
        if !partial
            && !missing
                .iter()
                .all(|d| disk.contains(d) || in_memory(d).is_some())
        {
            return Ok(false);
        }
        for digest in missing {
            let data = match in_memory(&digest) {
                Some(data) => data.to_vec(),
                None => match disk.read(&digest) {
                    DiskRead::Hit(data) => data,
                    DiskRead::Miss | DiskRead::Corrupt if partial => continue,
                    DiskRead::Miss | DiskRead::Corrupt => return Ok(false),
                },
            };
            disk.store_part(layout, &digest, &data);
        }
        Ok(disk
            .copy_state(id)
            .is_some_and(|c| c.complete && c.verified))
    }
}
