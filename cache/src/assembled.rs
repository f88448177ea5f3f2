//! Assembled files: the whole content of a layer file in one local file, built from its cached
//! chunks, so that opens of a hot file can be handed to the kernel (FUSE passthrough) and read
//! at the speed of the local disk with no trip through the daemon.
//!
//! A file is assembled in the background once all of its chunks are in the disk cache (after
//! a full read); it lives in the disk cache's budget and LRU like a chunk, and is pinned while
//! open. Chunks ignore file boundaries, so a file's first and last chunks may hold bytes of
//! its neighbours: only the file's own part of them is copied. The BLAKE3 of the content is
//! kept in an extended attribute of the file, and an assembled file found at start is checked
//! against it before it is handed out, as chunk files are.

use std::io::{self, Read};
use std::sync::Arc;

use crate::disk_cache::DiskCache;
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
        let mut h = blake3::Hasher::new();
        h.update(b"strata file v1\0");
        h.update(&self.start.to_le_bytes());
        h.update(&self.len.to_le_bytes());
        for loc in &self.chunks {
            h.update(&loc.digest.0);
            h.update(&loc.len.to_le_bytes());
        }
        Digest(*h.finalize().as_bytes())
    }

    /// The part of each chunk that belongs to the file, in chunk offsets.
    fn parts(&self) -> impl Iterator<Item = (&ChunkLoc, std::ops::Range<u64>)> {
        let mut chunk_start = 0u64; // of each chunk, relative to the file's first chunk
        let file = self.start..self.start + self.len;
        self.chunks.iter().map(move |loc| {
            let lo = file.start.max(chunk_start) - chunk_start;
            let hi = file.end.min(chunk_start + loc.len as u64).max(chunk_start) - chunk_start;
            chunk_start += loc.len as u64;
            (loc, lo..hi.max(lo))
        })
    }
}

/// The extended attribute holding the BLAKE3 of an assembled file's content.
const CONTENT_XATTR: &str = "user.strata.blake3";

/// Files larger than this share of the disk budget are not assembled: one file should not
/// push the rest of the cache out.
const MAX_SHARE_OF_BUDGET: u64 = 4;

/// An assembled file, open; the cache keeps it (no eviction) while this lives.
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
    /// The assembled copy of `file`, if there is one verified since start. One that is not
    /// verified yet is verified by [`ChunkCache::assemble`]; until then, `None`.
    pub fn assembled(self: &Arc<Self>, file: &FileChunks) -> Option<AssembledFile> {
        let disk = self.disk.as_ref()?;
        let id = file.id();
        let (path, verified) = disk.open_file(&id)?;
        let assembled = AssembledFile {
            cache: Arc::clone(self),
            id,
            file: match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!("opening assembled file {}: {e}", path.display());
                    disk.release_file(&id);
                    return None;
                }
            },
        };
        // Handed to the kernel only as verified: a copy changed on disk since (another
        // process wrote to it) is verified again first (see `ChunkCache::assemble`).
        (verified && disk.file_unchanged(&id, &assembled.file)).then_some(assembled)
    }

    /// In the background: assembles `file` if all of its chunks are on disk and it fits the
    /// budget, or verifies the copy found at start. Does nothing if either is under way
    /// already. Must be called within a tokio runtime.
    pub fn assemble(self: &Arc<Self>, file: FileChunks) {
        let Some(disk) = &self.disk else { return };
        if file.len == 0 || file.len > disk.capacity() / MAX_SHARE_OF_BUDGET {
            return;
        }
        let id = file.id();
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
            let result = this.assemble_now(&id, &file);
            this.assembling
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&id);
            match result {
                Ok(true) => tracing::debug!(file = %id, size = file.len, "assembled file ready"),
                Ok(false) => {}
                Err(e) => tracing::warn!(file = %id, "assembling a file from its chunks: {e}"),
            }
        });
    }

    fn assemble_now(&self, id: &Digest, file: &FileChunks) -> io::Result<bool> {
        let disk = self.disk.as_ref().expect("checked by assemble");
        if let Some((path, verified)) = disk.open_file(id) {
            let checked = if verified {
                Ok(false)
            } else {
                verify_file(&path).map(|(ok, before)| {
                    if ok {
                        disk.file_verified(id, &before);
                    } else {
                        tracing::error!(file = %id, path = %path.display(),
                            "assembled file is corrupt (hash mismatch); dropping it");
                        disk.remove_file(id);
                    }
                    ok
                })
            };
            disk.release_file(id);
            return checked;
        }
        // A read that just ended may have chunks still on their way to disk: those come from
        // memory.
        let in_memory = |d: &Digest| {
            self.memory
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .lru
                .contains(d)
        };
        if !file
            .chunks
            .iter()
            .all(|l| disk.contains(&l.digest) || in_memory(&l.digest))
        {
            return Ok(false);
        }
        disk.insert_file(id, file.len, |out| {
            for (loc, part) in file.parts() {
                if part.is_empty() {
                    continue;
                }
                match disk.copy_chunk(&loc.digest, loc.len, part.clone(), out) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        let data = self
                            .memory
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .get(&loc.digest)
                            .ok_or(e)?;
                        if data.len() != loc.len as usize {
                            return Err(io::Error::other(format!(
                                "chunk {} has {} bytes, the layer says {}",
                                loc.digest,
                                data.len(),
                                loc.len
                            )));
                        }
                        io::Write::write_all(out, &data[part.start as usize..part.end as usize])?;
                    }
                    other => other?,
                }
            }
            // The copies come from verified chunks; the hash of the whole lets the file be
            // checked after a restart without its neighbours' bytes.
            let content = hash_file(out)?;
            set_content_hash(out, &content)
        })
    }
}

fn hash_file(f: &std::fs::File) -> io::Result<Digest> {
    use std::io::Seek;
    let mut f = f;
    f.seek(io::SeekFrom::Start(0))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Digest(*h.finalize().as_bytes()))
}

fn set_content_hash(f: &std::fs::File, d: &Digest) -> io::Result<()> {
    rustix::fs::fsetxattr(f, CONTENT_XATTR, &d.0, rustix::fs::XattrFlags::empty()).map_err(|e| {
        let e = io::Error::from(e);
        io::Error::new(e.kind(), format!("setting {CONTENT_XATTR}: {e}"))
    })
}

fn content_hash(f: &std::fs::File) -> Option<Digest> {
    let mut out = [0u8; 32];
    let n = rustix::fs::fgetxattr(f, CONTENT_XATTR, &mut out[..]).ok()?;
    (n == 32).then_some(Digest(out))
}

/// Whether the file at `path` still holds the content it was assembled with, with its stat
/// from before hashing. Not if it was written while being hashed (its identity moved).
fn verify_file(path: &std::path::Path) -> io::Result<(bool, std::fs::Metadata)> {
    let file = std::fs::File::open(path)?;
    let before = file.metadata()?;
    let Some(expected) = content_hash(&file) else {
        return Ok((false, before));
    };
    let hashed = hash_file(&file)?;
    let steady = DiskCache::same_identity(&before, &file.metadata()?);
    Ok((steady && hashed == expected, before))
}
