//! Squashing a chain of delta layers into one layer that stacks the same way, by merging
//! their manifests: no file byte is read or uploaded, the new manifest points at the chunks
//! the chain's layers already stored.
//!
//! The result must equal the chain on top of *any* base, so what the chain hides stays
//! hidden: a path's topmost entry wins; a whiteout stays a whiteout; a directory merges the
//! directories below it down to the first opaque one, or to a whiteout or file in a lower
//! delta, in which case it is opaque itself (the base's directory was hidden there).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use bytes::Bytes;
use strata_cache_format::{blob, Digest};
use strata_store::Store;

use crate::error::{FsError, FsResult};
use crate::layer::Layer;
use crate::manifest::{self, ChunkRef, EntrySpec, Kind, Manifest, FLAG_OPAQUE};

/// (layer index in the chain, entry index in its manifest).
type Src = (usize, u32);

/// A node of the merged tree.
struct Node {
    src: Src,
    opaque: bool,
    /// Sorted by name (a BTreeMap's order): indices into the node list.
    children: Vec<usize>,
}

struct Merge<'a> {
    layers: Vec<&'a Manifest>,
    nodes: Vec<Node>,
}

impl<'a> Merge<'a> {
    fn entry(&self, (l, e): Src) -> manifest::Entry<'a> {
        self.layers[l].entry(e as usize)
    }

    /// Adds the node for a path whose entries are `run` (top first: the visible ones, the
    /// first being what the path is), with everything below it; returns its index. The walk
    /// keeps its own stack: a chain may hold a tree of any depth.
    fn add(&mut self, run: &[Src]) -> usize {
        let root = self.push(run[0]);
        let mut pending = vec![(root, run.to_vec())];
        while let Some((idx, run)) = pending.pop() {
            if self.entry(run[0]).kind != Kind::Dir {
                continue;
            }
            // The directories this one merges, top first.
            let mut dirs = Vec::new();
            let mut opaque = false;
            for &s in &run {
                let e = self.entry(s);
                if e.kind != Kind::Dir {
                    opaque = true; // a whiteout or file below hid the base's directory
                    break;
                }
                dirs.push(s);
                if e.is_opaque() {
                    opaque = true;
                    break;
                }
            }
            let mut by_name: BTreeMap<&'a [u8], Vec<Src>> = BTreeMap::new();
            for &(l, e) in &dirs {
                let dir = self.layers[l].entry(e as usize);
                for c in dir.children() {
                    let child = self.layers[l].entry(c as usize);
                    by_name.entry(child.name).or_default().push((l, c));
                }
            }
            let mut children = Vec::with_capacity(by_name.len());
            for (_, child_run) in by_name {
                let child = self.push(child_run[0]);
                children.push(child);
                pending.push((child, child_run));
            }
            self.nodes[idx].opaque = opaque;
            self.nodes[idx].children = children;
        }
        root
    }

    fn push(&mut self, src: Src) -> usize {
        self.nodes.push(Node {
            src,
            opaque: false,
            children: Vec::new(),
        });
        self.nodes.len() - 1
    }
}

/// The manifest of `chain` (bottom to top) squashed into one layer.
pub fn merge(chain: &[&Manifest]) -> FsResult<Vec<u8>> {
    if chain.is_empty() {
        return Err(FsError::InvalidInput("nothing to squash".into()));
    }
    let mut m = Merge {
        layers: chain.to_vec(),
        nodes: Vec::new(),
    };
    let roots: Vec<Src> = (0..chain.len()).rev().map(|l| (l, 0)).collect();
    let root = m.add(&roots);
    emit(&m, root, &HashMap::new(), &HashMap::new())
}

/// Attributes to set on an entry, field by field (`None`: as it is).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttrsOverride {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub xattrs: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

impl AttrsOverride {
    pub fn is_empty(&self) -> bool {
        *self == AttrsOverride::default()
    }
}

/// `layer` with the attributes of some entries (by index) replaced: a commit rebasing over
/// newer attribute changes takes them where it changed nothing itself.
pub fn with_attrs(layer: &Manifest, attrs: &HashMap<u32, AttrsOverride>) -> FsResult<Vec<u8>> {
    let mut m = Merge {
        layers: vec![layer],
        nodes: Vec::new(),
    };
    let root = m.add(&[(0, 0)]);
    let attrs = attrs.iter().map(|(&e, a)| ((0, e), a.clone())).collect();
    emit(&m, root, &HashMap::new(), &attrs)
}

/// Where a file's bytes come from, for [`with_content_from`].
#[derive(Debug, Clone)]
pub enum Content {
    /// The bytes of a file in a source layer: (index into `sources`, entry there).
    File(usize, u32),
    /// `size` bytes starting `skip` bytes into the first of `pieces`.
    Pieces {
        pieces: Vec<Piece>,
        skip: u64,
        size: u64,
    },
}

#[derive(Debug, Clone)]
pub enum Piece {
    /// Chunks of a source layer as they are: (index into `sources`, chunk indices).
    Chunks(usize, Range<usize>),
    /// Chunks made for this file; their `offset`s count from the piece's start.
    New(Vec<ChunkRef>),
}

/// What a file of the merged tree is made of, in `Merge::layers` numbering.
enum Override {
    File(Src),
    Pieces {
        pieces: Vec<Piece>,
        skip: u64,
        size: u64,
    },
}

/// `layer` with the bytes of some of its files taken from elsewhere: `content` maps an entry
/// of `layer` to a file of one of `sources`, or to pieces of their chunks and new chunks. A
/// commit uses it for files whose bytes are all or mostly the layers' (moved, attributes
/// changed, a few blocks rewritten), so the unchanged bytes are neither read nor uploaded.
pub fn with_content_from(
    layer: &Manifest,
    sources: &[&Manifest],
    content: &HashMap<u32, Content>,
) -> FsResult<Vec<u8>> {
    let mut layers = vec![layer];
    layers.extend_from_slice(sources);
    let mut m = Merge {
        layers,
        nodes: Vec::new(),
    };
    let root = m.add(&[(0, 0)]);
    let bad = |what: String| FsError::InvalidInput(format!("internal error: {what}"));
    let is_file = |l: usize, i: u32| {
        l < m.layers.len()
            && (i as usize) < m.layers[l].entry_count()
            && m.layers[l].entry(i as usize).kind == Kind::File
    };
    let mut overrides = HashMap::new();
    for (&e, c) in content {
        if !is_file(0, e) {
            return Err(bad(format!("entry {e} of the delta is not a file")));
        }
        let o = match c {
            Content::File(l, se) => {
                if !is_file(l + 1, *se) {
                    return Err(bad(format!("the content of entry {e} is not a file's")));
                }
                Override::File((l + 1, *se))
            }
            Content::Pieces { pieces, skip, size } => {
                let mut shifted = Vec::with_capacity(pieces.len());
                for p in pieces {
                    shifted.push(match p {
                        Piece::Chunks(l, r) => {
                            if l + 1 >= m.layers.len() || r.end > m.layers[l + 1].chunk_count() {
                                return Err(bad(format!("chunks {r:?} of source {l}")));
                            }
                            Piece::Chunks(l + 1, r.clone())
                        }
                        Piece::New(c) => Piece::New(c.clone()),
                    });
                }
                Override::Pieces {
                    pieces: shifted,
                    skip: *skip,
                    size: *size,
                }
            }
        };
        overrides.insert((0, e), o);
    }
    emit(&m, root, &overrides, &HashMap::new())
}

/// A file's bytes as pieces: (hard-link key, size, pieces, skip). Files with the same key are
/// one inode.
fn file_pieces(
    m: &Merge<'_>,
    src: Src,
    content: &HashMap<Src, Override>,
) -> (Option<Src>, u64, Vec<Piece>, u64) {
    match content.get(&src) {
        Some(Override::Pieces { pieces, skip, size }) => (None, *size, pieces.clone(), *skip),
        other => {
            let src = match other {
                Some(Override::File(s)) => *s,
                _ => src,
            };
            let (manifest, e) = (m.layers[src.0], m.entry(src));
            let range = e.content_range();
            let idx = manifest.chunks_for(range.clone());
            let skip = if idx.is_empty() {
                0
            } else {
                range.start - manifest.chunk(idx.start).offset
            };
            (
                Some((src.0, e.inode_entry())),
                e.size,
                vec![Piece::Chunks(src.0, idx)],
                skip,
            )
        }
    }
}

/// Encodes the merged tree under `root`; a file in `content` takes its bytes from there, an
/// entry in `attrs` the attributes it gives.
fn emit(
    m: &Merge<'_>,
    root: usize,
    content: &HashMap<Src, Override>,
    attrs: &HashMap<Src, AttrsOverride>,
) -> FsResult<Vec<u8>> {
    // Breadth-first order, each directory's children contiguous and sorted.
    let mut order = vec![root];
    let mut parent = vec![0u32];
    let mut i = 0;
    while i < order.len() {
        for &c in &m.nodes[order[i]].children {
            order.push(c);
            parent.push(i as u32);
        }
        i += 1;
    }
    let position: HashMap<usize, u32> = order
        .iter()
        .enumerate()
        .map(|(pos, &n)| (n, pos as u32))
        .collect();
    // Hard links: names of one source inode that survive, and where the first one lands.
    let mut links: HashMap<Src, u32> = HashMap::new();
    for &n in &order {
        if m.entry(m.nodes[n].src).kind == Kind::File {
            if let (Some(key), ..) = file_pieces(m, m.nodes[n].src, content) {
                *links.entry(key).or_default() += 1;
            }
        }
    }
    let mut first_link: HashMap<Src, u32> = HashMap::new();

    let mut chunks: Vec<ChunkRef> = Vec::new();
    let mut content_end = 0u64;
    // Where each source chunk was last placed in the new content stream.
    let mut placed: HashMap<(usize, usize), u64> = HashMap::new();
    let mut entries = Vec::with_capacity(order.len());
    for (pos, &n) in order.iter().enumerate() {
        let node = &m.nodes[n];
        let e = m.entry(node.src);
        let mut spec = EntrySpec {
            kind: Some(e.kind),
            flags: if node.opaque { FLAG_OPAQUE } else { 0 },
            name: if pos == 0 {
                Vec::new()
            } else {
                e.name.to_vec()
            },
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime_sec: e.mtime_sec,
            mtime_nsec: e.mtime_nsec,
            parent: parent[pos],
            size: e.size,
            xattrs: m.layers[node.src.0]
                .xattrs(&e)
                .into_iter()
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect(),
            ..Default::default()
        };
        if let Some(a) = attrs.get(&node.src) {
            spec.mode = a.mode.unwrap_or(spec.mode);
            spec.uid = a.uid.unwrap_or(spec.uid);
            spec.gid = a.gid.unwrap_or(spec.gid);
            if let Some(x) = &a.xattrs {
                spec.xattrs = x.clone();
            }
        }
        match e.kind {
            Kind::Dir => {
                spec.size = 0;
                spec.a = node.children.first().map_or(0, |c| position[c]);
                spec.b = node.children.len() as u32;
            }
            Kind::Symlink => spec.symlink_target = m.layers[node.src.0].symlink_target(&e).to_vec(),
            Kind::Whiteout => {}
            Kind::File => {
                let (key, size, pieces, skip) = file_pieces(m, node.src, content);
                spec.size = size;
                spec.a = pos as u32;
                spec.b = 1;
                if let Some(key) = key {
                    spec.b = links[&key];
                    if let Some(&first) = first_link.get(&key) {
                        spec.a = first;
                        spec.data_off = entries_data_off(&entries, first);
                        entries.push(spec);
                        continue;
                    }
                    first_link.insert(key, pos as u32);
                }
                // Chunks already laid out back to back (a neighbour file shares them) are
                // used where they are; anything else is appended.
                let start = match pieces.as_slice() {
                    [Piece::Chunks(l, idx)] if !idx.is_empty() => {
                        let (l, manifest) = (*l, m.layers[*l]);
                        let contiguous = idx.clone().all(|c| placed.contains_key(&(l, c)))
                            && idx.clone().skip(1).all(|c| {
                                placed[&(l, c)]
                                    == placed[&(l, c - 1)] + manifest.chunk(c - 1).len as u64
                            });
                        if contiguous {
                            Some(placed[&(l, idx.start)])
                        } else {
                            None
                        }
                    }
                    _ => None,
                };
                let start = match start {
                    Some(s) => s,
                    None => {
                        let start = content_end;
                        for piece in &pieces {
                            match piece {
                                Piece::Chunks(l, idx) => {
                                    for c in idx.clone() {
                                        let mut chunk = m.layers[*l].chunk(c);
                                        placed.insert((*l, c), content_end);
                                        chunk.offset = content_end;
                                        content_end += chunk.len as u64;
                                        chunks.push(chunk);
                                    }
                                }
                                Piece::New(new) => {
                                    for c in new {
                                        let mut chunk = *c;
                                        chunk.offset = content_end;
                                        content_end += chunk.len as u64;
                                        chunks.push(chunk);
                                    }
                                }
                            }
                        }
                        start
                    }
                };
                spec.data_off = start + skip;
                if spec.data_off + size > content_end {
                    return Err(FsError::InvalidInput(format!(
                        "internal error: the pieces of {:?} hold fewer bytes than its size {size}",
                        String::from_utf8_lossy(e.name)
                    )));
                }
            }
        }
        entries.push(spec);
    }
    let bytes = manifest::encode(&entries, &chunks);
    // Our own encoder's output must pass our own decoder.
    Manifest::parse(manifest::ManifestBytes::Owned(bytes.clone())).map_err(|e| {
        FsError::InvalidInput(format!(
            "internal error: squashed manifest does not validate: {e}"
        ))
    })?;
    Ok(bytes)
}

fn entries_data_off(entries: &[EntrySpec], i: u32) -> u64 {
    entries[i as usize].data_off
}

/// Squashes `chain` (bottom to top) into one layer stored in `store`; returns its digest
/// and manifest size.
pub async fn squash(store: &std::sync::Arc<dyn Store>, chain: &[Layer]) -> FsResult<(Digest, u64)> {
    let manifests: Vec<&Manifest> = chain.iter().map(|l| &l.manifest).collect();
    let bytes = merge(&manifests)?;
    Ok((store_manifest(store, &bytes).await?, bytes.len() as u64))
}

/// Stores a manifest (unless the store has it) and returns its layer digest.
pub async fn store_manifest(store: &std::sync::Arc<dyn Store>, bytes: &[u8]) -> FsResult<Digest> {
    let digest = Digest::of(bytes);
    let key = format!("layers/{}", digest.to_hex());
    if store.head(&key).await?.is_none() {
        store.put(&key, Bytes::from(blob::encode(bytes))).await?;
    }
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::tests::{stack_of, write};
    use crate::stack::{FileKind, LayerStack, ROOT_INO};
    use std::path::Path;

    /// Every path of a stack: kind, mode, link count and bytes (or symlink target).
    async fn dump(s: &LayerStack) -> BTreeMap<String, (String, u32, u32, String)> {
        let mut out = BTreeMap::new();
        let mut todo = vec![(ROOT_INO, String::new())];
        while let Some((ino, path)) = todo.pop() {
            for e in s.readdir(ino).unwrap() {
                let p = format!("{path}/{}", String::from_utf8_lossy(&e.name));
                let a = s.getattr(e.ino).unwrap();
                let body = match a.kind {
                    FileKind::File => s.read(e.ino, 0, a.size as u32 + 1).await.unwrap().to_vec(),
                    FileKind::Symlink => s.readlink(e.ino).unwrap(),
                    FileKind::Dir => {
                        todo.push((e.ino, p.clone()));
                        Vec::new()
                    }
                };
                // Link counts are left out: the stack reports a file's count in its own layer,
                // even when a later whiteout hid one of its names; a squash counts the names
                // that survive (checked below).
                let nlink = 0;
                let body = blake3::hash(&body).to_hex()[..12].to_string();
                out.insert(p, (format!("{:?}", a.kind), a.mode, nlink, body));
            }
        }
        out
    }

    fn delta(t: &Path) {
        write(t, "base/a/x", b"base x");
        write(t, "base/a/y", b"base y");
        write(t, "base/b/z", b"z");
        write(t, "base/c", b"c");
        write(t, "base/d/e", b"e");
        write(t, "base/keep", b"keep");
        // L1: change a/x, remove c, a new dir, d made opaque with a new file, hard links.
        write(t, "l1/a/x", b"l1 x");
        write(t, "l1/.wh.c", b"");
        write(t, "l1/n/f", b"f");
        write(t, "l1/n/g", &vec![7u8; 300_000]);
        write(t, "l1/d/.wh..wh..opq", b"");
        write(t, "l1/d/new", b"new");
        write(t, "l1/h1", b"linked");
        std::fs::hard_link(t.join("l1/h1"), t.join("l1/h2")).unwrap();
        std::os::unix::fs::symlink("n/f", t.join("l1/link")).unwrap();
        // L2: remove a (base's and l1's), a file where the dir n was.
        write(t, "l2/.wh.a", b"");
        write(t, "l2/b/z2", b"z2");
        // L3: a again (so: opaque), n/g's bytes partly changed, one hard link removed.
        write(t, "l3/a/again", b"again");
        write(t, "l3/n/new-in-n", b"nn");
        let mut g = vec![7u8; 300_000];
        g[1000..1010].copy_from_slice(b"0123456789");
        write(t, "l3/n/g", &g);
        write(t, "l3/.wh.h2", b"");
        write(t, "l3/.wh.keep", b"");
        // Another base, with what the first did not have.
        write(t, "other/a/q", b"q");
        write(t, "other/d/old", b"old");
        write(t, "other/n/zz", b"zz");
        write(t, "other/c/inner", b"inner");
        write(t, "other/unrelated", b"u");
    }

    #[tokio::test]
    async fn a_squashed_chain_stacks_like_the_chain_on_any_base() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        delta(t);
        for base in ["base", "other"] {
            let chain = stack_of(t, &[base, "l1", "l2", "l3"]).await;
            let store = chain.cache().store().clone();
            let (digest, _) = squash(&store, &chain.layers()[1..]).await.unwrap();
            let layers = vec![
                Layer::load(&store, chain.layers()[0].digest, None)
                    .await
                    .unwrap(),
                Layer::load(&store, digest, None).await.unwrap(),
            ];
            let squashed = LayerStack::new(layers, chain.cache().clone()).unwrap();
            let want = dump(&chain).await;
            assert!(want.contains_key("/a/again") && !want.contains_key("/a/x"));
            let got = dump(&squashed).await;
            let diff: Vec<_> = want
                .iter()
                .filter(|(k, v)| got.get(*k) != Some(v))
                .map(|(k, v)| (k, v, got.get(k)))
                .collect();
            let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
            assert!(
                diff.is_empty() && extra.is_empty(),
                "on {base}: {diff:?} extra {extra:?}"
            );
        }
    }

    #[tokio::test]
    async fn hard_links_survive_a_squash_with_the_names_left() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        delta(t);
        let chain = stack_of(t, &["base", "l1", "l2", "l3"]).await;
        let store = chain.cache().store().clone();
        let load = |d| Layer::load(&store, d, None);
        for (top, links) in [(3, 1), (2, 2)] {
            let (digest, _) = squash(&store, &chain.layers()[1..top + 1]).await.unwrap();
            let s =
                LayerStack::new(vec![load(digest).await.unwrap()], chain.cache().clone()).unwrap();
            let h1 = s.lookup(ROOT_INO, b"h1").unwrap();
            assert_eq!(h1.nlink, links);
            if links == 2 {
                assert_eq!(s.lookup(ROOT_INO, b"h2").unwrap().ino, h1.ino);
            }
        }
    }

    #[tokio::test]
    async fn squashing_stores_no_chunk_and_reuses_neighbours() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        delta(t);
        let chain = stack_of(t, &["base", "l1", "l2", "l3"]).await;
        let store = chain.cache().store().clone();
        let before = store.list("packs/").await.unwrap().len();
        let (digest, _) = squash(&store, &chain.layers()[1..]).await.unwrap();
        assert_eq!(store.list("packs/").await.unwrap().len(), before);
        let m = Layer::load(&store, digest, None).await.unwrap().manifest;
        let total: usize = chain.layers()[1..]
            .iter()
            .map(|l| l.manifest.chunk_count())
            .sum();
        assert!(m.chunk_count() <= total, "{} > {total}", m.chunk_count());
        // Squashing again gives the same layer (content-addressed, deterministic).
        let (again, _) = squash(&store, &chain.layers()[1..]).await.unwrap();
        assert_eq!(again, digest);
    }
}
