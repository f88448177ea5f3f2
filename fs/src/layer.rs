//! A layer opened for reading: its validated manifest plus the chunk cache its bytes come
//! through.
//!
//! Manifests are fetched once, verified against their digest and kept under
//! `<cache-dir>/layers/<hex>`, from where later mounts memory-map them: the entries of a large
//! layer live in the page cache, not on the daemon's heap.

use std::fs;
use std::io::Write;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use cache::ChunkReader;
use strata_cache_format::{blob, ChunkLoc, Digest};
use strata_store::Store;

use crate::error::{FsError, FsResult};
use crate::manifest::{ChunkRef, Entry, Manifest, ManifestBytes, MAX_MANIFEST_LEN};

pub struct Layer {
    pub digest: Digest,
    pub manifest: Manifest,
    /// Where its chunks are read from when not the stack's store (a tenant's volume home:
    /// see [`Layer::read_through`]).
    via: Option<ChunkReader>,
}

fn parse(digest: Digest, bytes: ManifestBytes) -> FsResult<Manifest> {
    Manifest::parse(bytes).map_err(|source| FsError::Manifest { digest, source })
}

impl Layer {
    /// This layer's chunks are read with `reader` (another store's) instead of the stack's.
    pub fn read_through(mut self, reader: ChunkReader) -> Layer {
        self.via = Some(reader);
        self
    }

    /// The reader of this layer's chunks: its own, else the stack's `default`.
    pub fn reader<'a>(&'a self, default: &'a ChunkReader) -> &'a ChunkReader {
        self.via.as_ref().unwrap_or(default)
    }

    /// Loads layer `digest`, from `cache_dir` if a verified copy is there, else from the store.
    pub async fn load(
        store: &Arc<dyn Store>,
        digest: Digest,
        cache_dir: Option<&Path>,
    ) -> FsResult<Layer> {
        let cached = cache_dir.map(|d| d.join("layers").join(digest.to_hex()));
        if let Some(path) = &cached {
            if let Some(layer) = Self::load_cached(path, digest)? {
                return Ok(layer);
            }
        }
        let key = format!("layers/{}", digest.to_hex());
        let object = store.get(&key).await.map_err(|e| {
            if e.is_not_found() {
                FsError::NotFound(format!("layer {digest} is missing from {}", store.url()))
            } else {
                e.into()
            }
        })?;
        let store_url = store.url().to_string();
        let plain = tokio::task::spawn_blocking(move || {
            blob::decode_verified(&object, &digest, MAX_MANIFEST_LEN)
        })
        .await
        .map_err(|e| FsError::InvalidInput(format!("manifest decode task failed: {e}")))?
        .map_err(|e| FsError::CorruptLayer {
            digest,
            store: store_url,
            reason: e.to_string(),
        })?;
        let mut manifest = parse(digest, ManifestBytes::Owned(plain.to_vec()))?;
        if let Some(path) = &cached {
            // Switch to the mapped copy and drop the heap one. The copy holds the bytes just
            // validated, so validating them again would only cost time.
            let mapped = write_atomic(path, manifest.as_bytes()).and_then(|()| map_file(path));
            match mapped {
                Ok(map) => {
                    manifest = manifest
                        .rehome(ManifestBytes::Mapped(map))
                        .unwrap_or_else(|same| same)
                }
                Err(e) => {
                    tracing::warn!(layer = %digest, "caching manifest at {}: {e}", path.display())
                }
            }
        }
        Ok(Layer {
            digest,
            manifest,
            via: None,
        })
    }

    fn load_cached(path: &Path, digest: Digest) -> FsResult<Option<Layer>> {
        let file = match fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(FsError::io(path, e)),
        };
        // SAFETY: as in `map_file`.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| FsError::io(path, e))?;
        if Digest::of(&map) != digest {
            tracing::warn!(layer = %digest, "cached manifest {} is corrupt; fetching it again", path.display());
            let _ = fs::remove_file(path);
            return Ok(None);
        }
        Ok(Some(Layer {
            digest,
            manifest: parse(digest, ManifestBytes::Mapped(map))?,
            via: None,
        }))
    }

    /// The content-stream range of `size` bytes at `offset` of file entry `e`, clipped to
    /// the file.
    fn span(e: &Entry<'_>, offset: u64, size: u32) -> std::ops::Range<u64> {
        let file = e.content_range();
        let start = file.start.saturating_add(offset).min(file.end);
        let end = start.saturating_add(size as u64).min(file.end);
        start..end
    }

    /// Indices of the chunks a read of `size` bytes at `offset` of `e` needs.
    pub fn chunks_for_read(&self, e: &Entry<'_>, offset: u64, size: u32) -> Range<usize> {
        self.manifest.chunks_for(Self::span(e, offset, size))
    }

    /// Where file entry `e`'s bytes are in the chunk stream.
    pub fn file_chunks(&self, e: &Entry<'_>) -> cache::FileChunks {
        let file = e.content_range();
        let chunks: Vec<_> = self
            .manifest
            .chunks_for(file.clone())
            .map(|i| self.manifest.chunk(i))
            .collect();
        let start = chunks
            .first()
            .map_or(0, |c| file.start.saturating_sub(c.offset));
        cache::FileChunks {
            chunks: chunks.iter().map(|c| c.location()).collect(),
            start,
            len: file.end - file.start,
        }
    }

    /// The chunks holding bytes `ranges` of entry `entry`, if it is a file of this layer
    /// (ranges are clipped to it), up to about `limit` stored bytes; `None` for any other
    /// entry.
    pub fn chunks_of(&self, entry: u32, ranges: &[[u64; 2]], limit: u64) -> Option<Vec<ChunkLoc>> {
        let m = &self.manifest;
        if entry as usize >= m.entry_count() {
            return None;
        }
        let e = m.entry(entry as usize);
        if e.kind != crate::manifest::Kind::File {
            return None;
        }
        let file = e.content_range();
        let mut out: Vec<ChunkLoc> = Vec::new();
        let mut last = None;
        let mut stored = 0u64;
        for &[start, end] in ranges {
            let from = file.start.saturating_add(start).min(file.end);
            let to = file.start.saturating_add(end).min(file.end);
            for i in m.chunks_for(from..to) {
                if last.is_some_and(|l| i <= l) {
                    continue;
                }
                last = Some(i);
                let loc = m.chunk(i).location();
                stored += loc.stored_len as u64;
                out.push(loc);
                if stored >= limit {
                    return Some(out);
                }
            }
        }
        Some(out)
    }

    /// Starts fetching chunks `indices` in the background, those of them inside file `e`
    /// (cached in its local copy, `home`, if it has one).
    pub fn prefetch(
        &self,
        cache: &ChunkReader,
        e: &Entry<'_>,
        indices: Range<usize>,
        home: Option<&std::sync::Arc<cache::FileLayout>>,
    ) {
        let file = e.content_range();
        let locs: Vec<_> = indices
            .take_while(|&i| i < self.manifest.chunk_count())
            .map(|i| self.manifest.chunk(i))
            .take_while(|c| c.offset < file.end)
            .filter(|c| c.offset + c.len as u64 > file.start)
            .map(|c| c.location())
            .collect();
        if !locs.is_empty() {
            self.reader(cache).prefetch(&locs, home);
        }
    }

    /// The chunks of the stream from index `from` on, up to `limit` stored bytes (at least
    /// one), whatever files they belong to.
    pub fn chunks_after(&self, from: usize, limit: u64) -> Vec<ChunkLoc> {
        let mut stored = 0u64;
        (from..self.manifest.chunk_count())
            .map(|i| self.manifest.chunk(i).location())
            .take_while(|loc| {
                let first = stored == 0;
                stored = stored.saturating_add(loc.stored_len as u64);
                first || stored <= limit
            })
            .collect()
    }

    /// Reads up to `size` bytes at `offset` of file entry `e` from local copies only (memory,
    /// or verified chunk files, reading just the bytes asked for); `None` if a chunk must be
    /// fetched.
    pub fn read_local(
        &self,
        cache: &ChunkReader,
        e: &Entry<'_>,
        offset: u64,
        size: u32,
    ) -> Option<Bytes> {
        let span = Self::span(e, offset, size);
        let pieces = self
            .manifest
            .chunks_for(span.clone())
            .map(|i| {
                let c = self.manifest.chunk(i);
                self.reader(cache).get_local(&c.location(), part(&c, &span))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(join(pieces, span))
    }

    /// Reads up to `size` bytes at `offset` of file entry `e`, fetching only the chunks that
    /// cover that range (cached in the file's local copy, `home`, if it has one).
    pub async fn read(
        &self,
        cache: &ChunkReader,
        e: &Entry<'_>,
        offset: u64,
        size: u32,
        home: Option<&std::sync::Arc<cache::FileLayout>>,
    ) -> FsResult<Bytes> {
        let span = Self::span(e, offset, size);
        let chunks: Vec<_> = self
            .manifest
            .chunks_for(span.clone())
            .map(|i| self.manifest.chunk(i))
            .collect();
        let locs: Vec<_> = chunks.iter().map(|c| c.location()).collect();
        let fetched = self.reader(cache).get_many_for(&locs, home).await?;
        let pieces = chunks
            .iter()
            .zip(fetched)
            .map(|(c, data)| data.slice(part(c, &span)))
            .collect();
        Ok(join(pieces, span))
    }
}

/// The part of chunk `c` that falls inside `span` of the content stream, in chunk offsets.
fn part(c: &ChunkRef, span: &Range<u64>) -> Range<usize> {
    let lo = span.start.max(c.offset) - c.offset;
    let hi = span.end.min(c.offset + c.len as u64) - c.offset;
    lo as usize..hi as usize
}

/// The bytes of a read from its pieces, in order; a read within one chunk is not copied.
fn join(mut pieces: Vec<Bytes>, span: Range<u64>) -> Bytes {
    if pieces.len() == 1 {
        return pieces.pop().expect("one piece");
    }
    let mut out = BytesMut::with_capacity((span.end - span.start) as usize);
    for p in &pieces {
        out.extend_from_slice(p);
    }
    out.freeze()
}

fn map_file(path: &Path) -> std::io::Result<memmap2::Mmap> {
    let file = fs::File::open(path)?;
    // SAFETY: cached manifests are written once (temp + rename) and never modified in place;
    // a file replaced under us keeps its old mapping.
    unsafe { memmap2::Mmap::map(&file) }
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("cache path has a parent");
    fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(data)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
