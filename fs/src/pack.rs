//! Packing a layer's new chunks for upload.
//!
//! Chunks are small (256 KiB on average) so that edits and random reads touch little, but one
//! object per chunk makes a sequential read cost one request per chunk, and S3 servers charge
//! per request in time and money. So new chunks are stored back to back in packs of about
//! 16 MiB, in content-stream order: the manifest records each chunk's pack, offset and stored
//! length, and readers fetch runs of adjoining chunks with one ranged GET.
//!
//! Dedup stays store-wide: after a pack is stored, each of its chunks gets a small locator
//! object (`chunks/<hex>`, see `strata_cache_format::locator`) naming the pack. A publish looks each chunk
//! up there first and reuses any stored copy. Locators are written only after their pack, so a
//! locator never points at a pack that is not there.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use strata_cache_format::{blob, chunk_key, pack_key, ChunkLoc, Digest, Locator};
use strata_store::{Store, StoreErrorKind};
use tokio::task::JoinSet;

use crate::error::{FsError, FsResult};
use crate::publish::PublishProgress;

/// Packs are closed once they reach this size.
pub const PACK_TARGET: usize = 16 << 20;
/// Packs being uploaded at once (each held in memory until stored).
const PACK_UPLOADS: usize = 4;
/// Locator PUTs in flight per pack.
const LOCATOR_UPLOADS: usize = 32;

/// What the store already knows about a chunk.
pub enum Lookup {
    /// An earlier chunk of this publish has the same digest.
    Repeat,
    /// Stored already, here.
    Stored(ChunkLoc),
    /// Not stored: these are its stored (enveloped) bytes.
    New(Vec<u8>),
}

/// Looks chunk `digest` up in the store; a chunk it lacks is encoded for packing.
pub async fn lookup(store: &Arc<dyn Store>, digest: Digest, data: Vec<u8>) -> FsResult<Lookup> {
    match store.get(&chunk_key(&digest)).await {
        Ok(bytes) => {
            if let Some(loc) = Locator::parse(digest, &bytes) {
                if loc.len as usize == data.len() {
                    return Ok(Lookup::Stored(loc));
                }
            }
            tracing::warn!(chunk = %digest, "unreadable chunk locator in the store; storing the chunk again");
        }
        Err(e) if e.kind == StoreErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let stored = tokio::task::spawn_blocking(move || blob::encode(&data))
        .await
        .map_err(|e| FsError::InvalidInput(format!("compression task failed: {e}")))?;
    Ok(Lookup::New(stored))
}

/// Where a chunk went: a stored copy, or a place in one of this publish's packs.
enum Placement {
    Stored(ChunkLoc),
    Packed {
        pack: usize,
        offset: u64,
        stored_len: u32,
        len: u32,
    },
}

/// What a finished publish stored.
pub struct Packed {
    /// Every chunk of the layer, by digest.
    pub locations: HashMap<Digest, ChunkLoc>,
    pub new_chunks: u64,
    pub packs: u64,
}

/// Collects new chunks into packs and uploads them (then their locators) in the background.
pub struct Packer {
    store: Arc<dyn Store>,
    progress: Arc<PublishProgress>,
    placements: HashMap<Digest, Placement>,
    open: Vec<u8>,
    /// (digest, plain len, offset in the open pack, stored len)
    open_chunks: Vec<(Digest, u32, u64, u32)>,
    sealed: Vec<Digest>,
    uploads: JoinSet<FsResult<()>>,
    slots: Arc<tokio::sync::Semaphore>,
    new_chunks: u64,
}

impl Packer {
    pub fn new(store: Arc<dyn Store>, progress: Arc<PublishProgress>) -> Packer {
        Packer {
            store,
            progress,
            placements: HashMap::new(),
            open: Vec::new(),
            open_chunks: Vec::new(),
            sealed: Vec::new(),
            uploads: JoinSet::new(),
            slots: Arc::new(tokio::sync::Semaphore::new(PACK_UPLOADS)),
            new_chunks: 0,
        }
    }

    /// Takes the next chunk of the content stream (in order).
    pub async fn add(&mut self, digest: Digest, len: u32, lookup: Lookup) -> FsResult<()> {
        match lookup {
            Lookup::Repeat => {}
            Lookup::Stored(loc) => {
                self.placements.insert(digest, Placement::Stored(loc));
            }
            Lookup::New(stored) => {
                if self.placements.contains_key(&digest) {
                    return Ok(());
                }
                let offset = self.open.len() as u64;
                let stored_len = stored.len() as u32;
                self.open.extend_from_slice(&stored);
                self.open_chunks.push((digest, len, offset, stored_len));
                self.placements.insert(
                    digest,
                    Placement::Packed {
                        pack: self.sealed.len(),
                        offset,
                        stored_len,
                        len,
                    },
                );
                self.new_chunks += 1;
                if self.open.len() >= PACK_TARGET {
                    self.seal().await?;
                }
            }
        }
        // Surface a failed upload early rather than after the whole tree is chunked.
        while let Some(done) = self.uploads.try_join_next() {
            join_result(done)?;
        }
        Ok(())
    }

    /// Closes the open pack and starts its upload (waiting for an upload slot).
    async fn seal(&mut self) -> FsResult<()> {
        if self.open_chunks.is_empty() {
            return Ok(());
        }
        let pack = std::mem::take(&mut self.open);
        let chunks = std::mem::take(&mut self.open_chunks);
        let digest = Digest::of(&pack);
        self.sealed.push(digest);
        let permit = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .map_err(|e| FsError::InvalidInput(format!("upload slots closed: {e}")))?;
        let store = Arc::clone(&self.store);
        let progress = Arc::clone(&self.progress);
        self.uploads.spawn(async move {
            let _permit = permit;
            let key = pack_key(&digest);
            let size = pack.len() as u64;
            // A pack is named by its content: one already there (a re-run) is the same bytes.
            if store.head(&key).await?.is_none() {
                store.put(&key, Bytes::from(pack)).await?;
                progress.bytes_uploaded.fetch_add(size, Ordering::Relaxed);
            }
            let puts = futures::stream::iter(chunks)
                .map(|(chunk, len, offset, stored_len)| {
                    let store = Arc::clone(&store);
                    let locator = Locator::encode(&ChunkLoc {
                        digest: chunk,
                        len,
                        pack: digest,
                        pack_offset: offset,
                        stored_len,
                    });
                    async move { store.put(&chunk_key(&chunk), Bytes::from(locator)).await }
                })
                .buffer_unordered(LOCATOR_UPLOADS);
            futures::pin_mut!(puts);
            while let Some(r) = puts.next().await {
                r?;
            }
            Ok(())
        });
        Ok(())
    }

    /// Uploads what is left and waits for every upload; returns where each chunk is.
    pub async fn finish(mut self) -> FsResult<Packed> {
        self.seal().await?;
        while let Some(done) = self.uploads.join_next().await {
            join_result(done)?;
        }
        let sealed = self.sealed;
        let locations = self
            .placements
            .into_iter()
            .map(|(digest, p)| {
                let loc = match p {
                    Placement::Stored(loc) => loc,
                    Placement::Packed {
                        pack,
                        offset,
                        stored_len,
                        len,
                    } => ChunkLoc {
                        digest,
                        len,
                        pack: sealed[pack],
                        pack_offset: offset,
                        stored_len,
                    },
                };
                (digest, loc)
            })
            .collect();
        Ok(Packed {
            locations,
            new_chunks: self.new_chunks,
            packs: sealed.len() as u64,
        })
    }
}

fn join_result(r: Result<FsResult<()>, tokio::task::JoinError>) -> FsResult<()> {
    r.map_err(|e| FsError::InvalidInput(format!("upload task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::{publish, PublishOptions};
    use crate::refs::{self, DatasetRef};
    use crate::stack::tests::pseudo_random;

    async fn publish_dir(
        store: &Arc<dyn Store>,
        dir: &std::path::Path,
        name: &str,
    ) -> crate::publish::PublishReport {
        publish(
            dir,
            store,
            Some(&DatasetRef::parse(name).unwrap()),
            &PublishOptions::default(),
            Default::default(),
        )
        .await
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_anywhere_in_the_store_are_not_stored_again() {
        let tmp = tempfile::tempdir().unwrap();
        let store = strata_store::open_store(
            tmp.path().join("store").to_str().unwrap(),
            &Default::default(),
        )
        .await
        .unwrap();
        let shared = pseudo_random(1, 40 << 20);
        std::fs::create_dir_all(tmp.path().join("a")).unwrap();
        std::fs::write(tmp.path().join("a/big.bin"), &shared).unwrap();
        let first = publish_dir(&store, &tmp.path().join("a"), "a:v1").await;
        assert!(first.packs_new >= 2, "40 MiB fills more than one pack");
        assert_eq!(first.chunks_new, first.chunks_total);

        // Another dataset holding the same bytes plus a new file: only the new file's chunks
        // are stored, found through the locators of the first publish.
        std::fs::create_dir_all(tmp.path().join("b")).unwrap();
        std::fs::write(tmp.path().join("b/big.bin"), &shared).unwrap();
        std::fs::write(tmp.path().join("b/zz-new.bin"), pseudo_random(2, 2 << 20)).unwrap();
        let second = publish_dir(&store, &tmp.path().join("b"), "b:v1").await;
        assert!(
            second.chunks_new > 0 && second.chunks_new <= 12,
            "{} new of {}",
            second.chunks_new,
            second.chunks_total
        );
        assert_eq!(second.packs_new, 1);

        // A damaged locator is ignored: the chunk is stored again and the layer still reads.
        let a = refs::resolve(&store, &DatasetRef::parse("a:v1").unwrap())
            .await
            .unwrap();
        let a = crate::layer::Layer::load(&store, a, None).await.unwrap();
        let key = chunk_key(&a.manifest.chunk(0).digest);
        store
            .put(&key, Bytes::from_static(b"garbage"))
            .await
            .unwrap();
        let third = publish_dir(&store, &tmp.path().join("a"), "c:v1").await;
        assert_eq!(third.chunks_new, 1, "only the chunk with the bad locator");
        let digest = refs::resolve(&store, &DatasetRef::parse("c:v1").unwrap())
            .await
            .unwrap();
        let layer = crate::layer::Layer::load(&store, digest, None)
            .await
            .unwrap();
        let reader = cache::ChunkCache::new(&cache::CacheConfig {
            disk_dir: None,
            disk_capacity: 0,
            memory_capacity: 64 << 20,
            fetch_deadline: cache::DEFAULT_FETCH_DEADLINE,
        })
        .unwrap()
        .reader(Arc::clone(&store));
        let m = &layer.manifest;
        let locs: Vec<_> = (0..m.chunk_count())
            .map(|i| m.chunk(i).location())
            .collect();
        let plain: Vec<u8> = reader.get_many(&locs).await.unwrap().concat();
        assert!(plain == shared, "the layer's chunks give back the file");
        // Adjoining chunks went out as ranged GETs of up to 4 MiB, not one per chunk.
        assert!(
            reader.stats().store_gets < locs.len() as u64 / 4,
            "{} GETs for {} chunks",
            reader.stats().store_gets,
            locs.len()
        );
    }
}
