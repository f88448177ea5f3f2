//! Publishing a mount's changes as a delta layer (what a volume commit uploads).
//!
//! The changes are staged as a tree in memory ([`MountTree::stage`]) and published like any
//! tree, their new files' bytes read through the mount; then the files whose bytes are the
//! layers' are pointed at the layers' chunks ([`crate::squash::with_content_from`]): a moved
//! or chmodded layer file costs no read and no upload, and a layer file rewritten in places
//! costs the chunks its written blocks touch — only those byte ranges are read (through the
//! tree), chunked and uploaded.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use strata_cache_format::Digest;
use strata_store::Store;

use crate::error::{FsError, FsResult};
use crate::layer::Layer;
use crate::manifest::{ChunkRef, Manifest};
use crate::pack::{self, Lookup, Packer};
use crate::publish::{
    publish_walk, PublishOptions, PublishReport, CHUNK_AVG, CHUNK_MAX, CHUNK_MIN,
};
use crate::squash::{Content, Piece};
use crate::upper::{Change, LowerContent, MountTree, PartialFile, Segment};

/// Bytes of a rewritten range read from the tree at a time.
const READ_STEP: u32 = 1 << 20;
/// Buffered bytes after which the chunker cuts what it can.
const CUT_WINDOW: usize = 8 << 20;

/// Publishes `changes` of `tree` ([`MountTree::changes`]) as a delta layer: the publish
/// report, the number of changes and the layer. The chunks it makes are kept in the tree's
/// chunk cache, so this host reads the new state locally.
pub async fn publish_changes(
    store: &Arc<dyn Store>,
    tree: &MountTree,
    changes: &[Change],
) -> FsResult<(PublishReport, usize, Digest)> {
    let started = std::time::Instant::now();
    let staged = crate::blocking::blocking(|| tree.stage(changes))?;
    let options = PublishOptions {
        keep_in: Some(tree.stack().cache().cache().clone()),
        ..Default::default()
    };
    let (mut report, entries) = publish_walk(
        staged.walk,
        Some(tree),
        store,
        &options,
        Default::default(),
        started,
    )
    .await?;
    let mut layer = report
        .layer
        .ok_or_else(|| FsError::InvalidInput("publish returned no layer".into()))?;
    if !staged.lower_files.is_empty() {
        let lower_files: Vec<(u32, &LowerContent)> = staged
            .lower_files
            .iter()
            .map(|(node, c)| (entries[*node], c))
            .collect();
        let (relinked, uploaded) = point_at_layer_files(store, tree, layer, &lower_files).await?;
        layer = relinked;
        report.bytes_uploaded += uploaded;
    }
    Ok((report, staged.changes, layer))
}

/// The delta layer `delta` with the files staged empty in `lower_files` (by entry index)
/// pointing at the layers' chunks (and, for partly rewritten ones, at new chunks of their
/// rewritten ranges). Returns the new layer and the bytes uploaded for it.
async fn point_at_layer_files(
    store: &Arc<dyn Store>,
    tree: &MountTree,
    delta: Digest,
    lower_files: &[(u32, &LowerContent)],
) -> FsResult<(Digest, u64)> {
    let delta = Layer::load(store, delta, None).await?;
    let m = &delta.manifest;
    let mut uploader = Uploader::new(store, tree);
    let mut content = HashMap::new();
    for &(entry, source) in lower_files {
        let c = match source {
            LowerContent::File(layer, e) => Content::File(*layer, *e),
            LowerContent::Partial(p) => uploader.pieces(p).await?,
        };
        content.insert(entry, c);
    }
    let uploaded = uploader.finish(&mut content).await?;
    let sources: Vec<&Manifest> = tree.stack().layers().iter().map(|l| &l.manifest).collect();
    let bytes = crate::squash::with_content_from(m, &sources, &content)?;
    let digest = crate::squash::store_manifest(store, &bytes).await?;
    Ok((digest, uploaded + bytes.len() as u64))
}

/// Chunks rewritten ranges and stores the chunks the store lacks, in packs.
struct Uploader<'a> {
    store: &'a Arc<dyn Store>,
    tree: &'a MountTree,
    packer: Packer,
    progress: Arc<crate::publish::PublishProgress>,
    seen: HashSet<Digest>,
}

impl<'a> Uploader<'a> {
    fn new(store: &'a Arc<dyn Store>, tree: &'a MountTree) -> Uploader<'a> {
        let progress = Arc::new(crate::publish::PublishProgress::default());
        Uploader {
            store,
            tree,
            packer: Packer::new(store.clone(), progress.clone()),
            progress,
            seen: HashSet::new(),
        }
    }

    /// The pieces of a partly rewritten file. New chunks are listed by digest with no
    /// location yet ([`Uploader::finish`] fills it in once the packs are stored).
    async fn pieces(&mut self, p: &PartialFile) -> FsResult<Content> {
        let mut pieces = Vec::with_capacity(p.segments.len());
        for s in &p.segments {
            pieces.push(match s {
                Segment::Lower(r) => Piece::Chunks(p.layer, r.clone()),
                Segment::New(r) => Piece::New(self.chunk_range(p.ino, r.clone()).await?),
            });
        }
        Ok(Content::Pieces {
            pieces,
            skip: p.skip,
            size: p.size,
        })
    }

    /// Reads `range` of file `ino` from the tree and cuts it into content-defined chunks,
    /// handing each to the packer.
    async fn chunk_range(
        &mut self,
        ino: u64,
        range: std::ops::Range<u64>,
    ) -> FsResult<Vec<ChunkRef>> {
        let mut out = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut pos = range.start;
        let mut offset = 0u64;
        loop {
            let done = pos >= range.end;
            if !done {
                let want = (range.end - pos).min(READ_STEP as u64) as u32;
                let data = self.tree.read(ino, pos, want).await?;
                if data.is_empty() {
                    return Err(FsError::InvalidInput(format!(
                        "inode {ino}: short read at {pos} while committing"
                    )));
                }
                pos += data.len() as u64;
                buf.extend_from_slice(&data);
            }
            if buf.len() < CUT_WINDOW && !done {
                continue;
            }
            // FastCDC's cut points depend only on the bytes from the chunk's start on, so
            // cutting a window and carrying its last (maybe unfinished) chunk over is the
            // same as cutting the whole range at once.
            let cuts: Vec<(usize, usize)> = fastcdc::v2020::FastCDC::new(
                &buf,
                CHUNK_MIN as usize,
                CHUNK_AVG as usize,
                CHUNK_MAX as usize,
            )
            .map(|c| (c.offset, c.length))
            .collect();
            let keep = if done {
                cuts.len()
            } else {
                cuts.len().saturating_sub(1)
            };
            let mut consumed = 0;
            for &(at, len) in &cuts[..keep] {
                let data = buf[at..at + len].to_vec();
                out.push(self.add(data, offset).await?);
                offset += len as u64;
                consumed = at + len;
            }
            buf.drain(..consumed);
            if done {
                return Ok(out);
            }
        }
    }

    async fn add(&mut self, data: Vec<u8>, offset: u64) -> FsResult<ChunkRef> {
        let digest = Digest::of(&data);
        let len = data.len() as u32;
        self.tree.stack().cache().cache().admit(&digest, &data);
        let found = if self.seen.insert(digest) {
            pack::lookup(self.store, digest, data).await?
        } else {
            Lookup::Repeat
        };
        self.packer.add(digest, len, found).await?;
        Ok(ChunkRef {
            digest,
            offset,
            len,
            // Filled in by `finish`.
            pack: Digest([0; 32]),
            pack_offset: 0,
            stored_len: 0,
        })
    }

    /// Stores the packs and fills in the new chunks' locations; returns the bytes uploaded.
    async fn finish(self, content: &mut HashMap<u32, Content>) -> FsResult<u64> {
        let packed = self.packer.finish().await?;
        for c in content.values_mut() {
            let Content::Pieces { pieces, .. } = c else {
                continue;
            };
            for piece in pieces {
                let Piece::New(chunks) = piece else { continue };
                for chunk in chunks {
                    let loc = packed.locations.get(&chunk.digest).ok_or_else(|| {
                        FsError::InvalidInput(format!(
                            "internal error: chunk {} was not stored",
                            chunk.digest
                        ))
                    })?;
                    chunk.pack = loc.pack;
                    chunk.pack_offset = loc.pack_offset;
                    chunk.stored_len = loc.stored_len;
                }
            }
        }
        Ok(self
            .progress
            .bytes_uploaded
            .load(std::sync::atomic::Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::tests::{pseudo_random, stack_of, write};
    use crate::stack::{LayerStack, ROOT_INO};
    use crate::upper::{Caller, SetAttr, UpperConfig};

    /// A tree over a layer with `a.bin` and `big.bin` (4 MiB each, sharing chunks at their
    /// boundary) and `z.txt`.
    async fn tree(tmp: &std::path::Path) -> (MountTree, Vec<u8>) {
        let big = pseudo_random(1, 4 << 20);
        write(tmp, "lower/a.bin", &pseudo_random(2, 3 << 20));
        write(tmp, "lower/big.bin", &big);
        write(tmp, "lower/z.txt", b"zzz");
        let stack = Arc::new(stack_of(tmp, &["lower"]).await);
        let upper = UpperConfig::scratch(tmp.join("upper"));
        (MountTree::new(stack, Some(upper)).unwrap(), big)
    }

    /// Publishes the changes; the layer stacked with the delta, and the bytes uploaded.
    async fn commit(t: &MountTree) -> (LayerStack, u64) {
        let store = t.stack().cache().store().clone();
        let (report, _, delta) = publish_changes(&store, t, &t.changes().unwrap())
            .await
            .unwrap();
        let layers = vec![
            Layer::load(&store, t.stack().layers()[0].digest, None)
                .await
                .unwrap(),
            Layer::load(&store, delta, None).await.unwrap(),
        ];
        let s = LayerStack::new(layers, t.stack().cache().clone()).unwrap();
        (s, report.bytes_uploaded)
    }

    /// Publishes the changes and reads `name` back through the layer stacked with the delta.
    async fn commit_and_read(t: &MountTree, name: &[u8]) -> (Vec<u8>, u64) {
        let (s, uploaded) = commit(t).await;
        let a = s.lookup(ROOT_INO, name).unwrap();
        let got = s.read(a.ino, 0, a.size as u32 + 1).await.unwrap().to_vec();
        (got, uploaded)
    }

    #[tokio::test]
    async fn a_few_rewritten_blocks_upload_a_few_chunks() {
        let tmp = tempfile::tempdir().unwrap();
        let (t, mut want) = tree(tmp.path()).await;
        let f = t.lookup(ROOT_INO, b"big.bin").unwrap();
        t.open(f.ino, true).unwrap();
        t.write(f.ino, 2 << 20, b"rewritten").await.unwrap();
        want[2 << 20..(2 << 20) + 9].copy_from_slice(b"rewritten");
        t.release(f.ino);
        let before = t.stack().cache().stats().chunk_requests;
        let store = t.stack().cache().store().clone();
        publish_changes(&store, &t, &t.changes().unwrap())
            .await
            .unwrap();
        // The commit read the chunks around the written block, not the file's 16 or so.
        let read = t.stack().cache().stats().chunk_requests - before;
        assert!(read <= 3, "the commit read {read} chunks");
        let (got, uploaded) = commit_and_read(&t, b"big.bin").await;
        assert!(got == want, "bytes differ");
        assert!(
            uploaded < 1 << 20,
            "uploaded {uploaded} bytes for one rewritten block"
        );
    }

    #[tokio::test]
    async fn grown_and_cut_files_keep_their_bytes() {
        for case in 0..4 {
            let tmp = tempfile::tempdir().unwrap();
            let (t, mut want) = tree(tmp.path()).await;
            let f = t.lookup(ROOT_INO, b"big.bin").unwrap();
            t.open(f.ino, true).unwrap();
            match case {
                0 => {
                    // Appended to: the last chunk (shared with z.txt) cannot be reused.
                    t.write(f.ino, want.len() as u64, b"tail").await.unwrap();
                    want.extend_from_slice(b"tail");
                }
                1 => {
                    // Cut short.
                    let size = Some(3_000_000);
                    t.setattr(
                        f.ino,
                        SetAttr {
                            size,
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap();
                    want.truncate(3_000_000);
                }
                2 => {
                    // Cut, then grown again past the old size: zeros in between.
                    let cut = SetAttr {
                        size: Some(1_000_000),
                        ..Default::default()
                    };
                    t.setattr(f.ino, cut).await.unwrap();
                    t.write(f.ino, 5 << 20, b"far").await.unwrap();
                    want.truncate(1_000_000);
                    want.resize(5 << 20, 0);
                    want.extend_from_slice(b"far");
                }
                _ => {
                    // The first block, which shares its chunk with a.bin.
                    t.write(f.ino, 10, b"head").await.unwrap();
                    want[10..14].copy_from_slice(b"head");
                }
            }
            t.release(f.ino);
            let (got, _) = commit_and_read(&t, b"big.bin").await;
            assert!(got == want, "case {case}: bytes differ");
            let _ = Caller { uid: 0, gid: 0 };
        }
    }

    #[tokio::test]
    async fn hard_links_made_in_the_mount_are_committed_as_links() {
        let tmp = tempfile::tempdir().unwrap();
        let (t, _) = tree(tmp.path()).await;
        let caller = Caller { uid: 0, gid: 0 };
        let a = t.create(ROOT_INO, b"a", 0o644, caller).unwrap();
        t.open(a.ino, true).unwrap();
        t.write(a.ino, 0, b"shared bytes").await.unwrap();
        t.release(a.ino);
        t.link(a.ino, ROOT_INO, b"b").unwrap();
        let z = t.lookup(ROOT_INO, b"z.txt").unwrap();
        t.link(z.ino, ROOT_INO, b"z2").unwrap();
        let (s, _) = commit(&t).await;
        for (x, y, bytes) in [
            (&b"a"[..], &b"b"[..], &b"shared bytes"[..]),
            (b"z.txt", b"z2", b"zzz"),
        ] {
            let (x, y) = (
                s.lookup(ROOT_INO, x).unwrap(),
                s.lookup(ROOT_INO, y).unwrap(),
            );
            assert_eq!(x.ino, y.ino, "one inode");
            assert_eq!(x.nlink, 2);
            assert_eq!(&s.read(y.ino, 0, 100).await.unwrap()[..], bytes);
        }
    }

    /// `mkdir d; cd d` 20,000 times and a file at the bottom: the commit, a second commit on
    /// top of it, and their squash all walk the tree without recursion (the test thread's
    /// stack is 2 MiB; a frame per level overflowed it) and without paths the kernel sees.
    #[tokio::test]
    async fn a_20000_level_tree_commits_and_squashes() {
        const DEPTH: usize = 20_000;
        let tmp = tempfile::tempdir().unwrap();
        let (t, _) = tree(tmp.path()).await;
        let caller = Caller { uid: 0, gid: 0 };
        let mut dir = ROOT_INO;
        for _ in 0..DEPTH {
            dir = t.mkdir(dir, b"d", 0o755, caller).unwrap().ino;
        }
        let f = t.create(dir, b"bottom", 0o640, caller).unwrap();
        t.open(f.ino, true).unwrap();
        t.write(f.ino, 0, b"deep down").await.unwrap();
        t.release(f.ino);
        let (s, _) = commit(&t).await;
        let walk_down = |s: &LayerStack| {
            let mut ino = ROOT_INO;
            for _ in 0..DEPTH {
                ino = s.lookup(ino, b"d").unwrap().ino;
            }
            s.lookup(ino, b"bottom").unwrap()
        };
        let a = walk_down(&s);
        assert_eq!(a.mode & 0o777, 0o640);
        assert_eq!(&s.read(a.ino, 0, 100).await.unwrap()[..], b"deep down");

        // A mount of that, changing the bottom file and a directory half-way down.
        let store = t.stack().cache().store().clone();
        let upper = UpperConfig::journaled(tmp.path().join("upper2"));
        let t2 = MountTree::new(Arc::new(s), Some(upper)).unwrap();
        let mut ino = ROOT_INO;
        for level in 0..DEPTH {
            ino = t2.lookup(ino, b"d").unwrap().ino;
            if level == DEPTH / 2 {
                let mode = SetAttr {
                    mode: Some(0o700),
                    ..Default::default()
                };
                t2.setattr(ino, mode).await.unwrap();
            }
        }
        let bottom = t2.lookup(ino, b"bottom").unwrap();
        t2.open(bottom.ino, true).unwrap();
        t2.write(bottom.ino, 0, b"DEEP").await.unwrap();
        t2.release(bottom.ino);
        t2.save_journal().unwrap();
        let (_, _, delta2) = publish_changes(&store, &t2, &t2.changes().unwrap())
            .await
            .unwrap();
        let layers = t2.stack().layers();
        let chain = [
            &layers[1].manifest,
            &Layer::load(&store, delta2, None).await.unwrap().manifest,
        ];
        let squashed = crate::squash::merge(&chain).unwrap();
        let squashed = crate::squash::store_manifest(&store, &squashed)
            .await
            .unwrap();
        for top in [vec![delta2], vec![squashed]] {
            let mut l = vec![Layer::load(&store, layers[0].digest, None).await.unwrap()];
            if top[0] == delta2 {
                l.push(Layer::load(&store, layers[1].digest, None).await.unwrap());
            }
            l.push(Layer::load(&store, top[0], None).await.unwrap());
            let s = LayerStack::new(l, t.stack().cache().clone()).unwrap();
            let a = walk_down(&s);
            assert_eq!(&s.read(a.ino, 0, 100).await.unwrap()[..], b"DEEP down");
            let mut ino = ROOT_INO;
            for _ in 0..=DEPTH / 2 {
                ino = s.lookup(ino, b"d").unwrap().ino;
            }
            assert_eq!(s.getattr(ino).unwrap().mode & 0o777, 0o700);
        }
    }

    /// One directory of 1,000,000 entries (symlinks: no data file each) commits, and the
    /// stacked layer lists them all.
    #[tokio::test]
    async fn a_directory_of_a_million_entries_commits() {
        const N: usize = 1_000_000;
        let tmp = tempfile::tempdir().unwrap();
        let (t, _) = tree(tmp.path()).await;
        let caller = Caller { uid: 0, gid: 0 };
        let d = t.mkdir(ROOT_INO, b"wide", 0o755, caller).unwrap();
        for i in 0..N {
            let name = format!("e{i:07}");
            t.symlink(d.ino, name.as_bytes(), format!("t{i}").as_bytes(), caller)
                .unwrap();
        }
        let (s, _) = commit(&t).await;
        let wide = s.lookup(ROOT_INO, b"wide").unwrap();
        let listing = s.readdir(wide.ino).unwrap();
        assert_eq!(listing.len(), N);
        for i in [0, 1, N / 2, N - 1] {
            let e = &listing[i];
            assert_eq!(e.name, format!("e{i:07}").into_bytes());
            assert_eq!(s.readlink(e.ino).unwrap(), format!("t{i}").into_bytes());
        }
    }
}
