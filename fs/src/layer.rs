//! A layer opened for reading: its validated manifest plus the chunk cache its bytes come
//! through.
//!
//! Manifests are fetched once, verified against their digest and kept under
//! `<cache-dir>/layers/<hex>`, from where later mounts memory-map them: the entries of a large
//! layer live in the page cache, not on the daemon's heap.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use cache::{blob, ChunkReader, Digest, Store};

use crate::error::{FsError, FsResult};
use crate::manifest::{Entry, Manifest, ManifestBytes, MAX_MANIFEST_LEN};

pub struct Layer {
    pub digest: Digest,
    pub manifest: Manifest,
}

fn parse(digest: Digest, bytes: ManifestBytes) -> FsResult<Manifest> {
    Manifest::parse(bytes).map_err(|source| FsError::Manifest { digest, source })
}

impl Layer {
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
        let mut manifest = parse(digest, ManifestBytes::Owned(plain))?;
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
        Ok(Layer { digest, manifest })
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
        }))
    }

    /// Reads up to `size` bytes at `offset` of file entry `e`, fetching only the chunks that
    /// cover that range. With `readahead`, the file's next chunks are fetched in the
    /// background.
    pub async fn read(
        &self,
        cache: &ChunkReader,
        e: &Entry<'_>,
        offset: u64,
        size: u32,
        readahead: usize,
    ) -> FsResult<Bytes> {
        let file = e.content_range();
        let start = file.start.saturating_add(offset).min(file.end);
        let end = start.saturating_add(size as u64).min(file.end);
        if start >= end {
            return Ok(Bytes::new());
        }
        let indices = self.manifest.chunks_for(start..end);
        let chunks: Vec<_> = indices.clone().map(|i| self.manifest.chunk(i)).collect();
        // Readahead: the chunks after the ones this read needs, within the file.
        let mut next = indices.end;
        while next < indices.end + readahead && next < self.manifest.chunk_count() {
            let c = self.manifest.chunk(next);
            if c.offset >= file.end {
                break;
            }
            cache.prefetch(c.digest, c.len);
            next += 1;
        }
        let fetched =
            futures::future::try_join_all(chunks.iter().map(|c| cache.get(c.digest, c.len)))
                .await?;
        if chunks.len() == 1 {
            let c = &chunks[0];
            let from = (start - c.offset) as usize;
            return Ok(fetched[0].slice(from..from + (end - start) as usize));
        }
        let mut out = BytesMut::with_capacity((end - start) as usize);
        for (c, data) in chunks.iter().zip(&fetched) {
            let lo = start.max(c.offset) - c.offset;
            let hi = end.min(c.offset + c.len as u64) - c.offset;
            out.extend_from_slice(&data[lo as usize..hi as usize]);
        }
        Ok(out.freeze())
    }
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
