//! Rewriting packs that are mostly dead (`docs/FORMAT.md` §9).
//!
//! A pack stays as long as any live layer uses a byte of it, so after a few years of small
//! changes most packs a dataset's first version wrote hold a few live chunks among many dead
//! ones. Manifests name chunks by pack and offset and layers are named by their manifest's
//! hash, so the chunks cannot move under the manifests' feet: instead their live regions are
//! copied into new packs and each old pack gets a forwarding map (`moved/<old pack>`,
//! [`PackMoves`]) that readers follow when they find it gone. Layer digests, refs, heads and
//! signatures stay as they are.
//!
//! Order, so that no reader ever finds a chunk nowhere: the new packs, then the maps (and the
//! maps that pointed into a rewritten pack, sent on), then (in `collect`) the locators that
//! named an old pack are pointed at the new copies, and only then do the old packs go.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures::stream::{self, StreamExt};
use serde::Serialize;
use strata_cache_format::{blob, moved_key, pack_key, ChunkLoc, Digest, Move, PackMoves};
use strata_store::{ObjectInfo, Store};

use super::lease::{self, GcLock};
use super::mark::{Marked, Region};
use super::usage::Tally;
use crate::error::{FsError, FsResult};
use crate::pack::PACK_TARGET;

/// Old packs read at once (each held in memory, up to a pack's size, until copied).
const READS: usize = 4;
/// A forwarding map's size: header and checksum, and per move.
const MAP_FIXED: u64 = 48 + 32;
const MAP_PER_MOVE: u64 = 56;
/// Live bytes one collection copies at most.
pub const MAX_COPY: u64 = 2 << 30;
/// A pack with fewer dead bytes than this is not worth a rewrite's requests.
const MIN_DEAD: u64 = 64 << 10;

/// What a rewrite did (or, dry, would do).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RewriteReport {
    /// Packs whose live regions were copied out (they are deleted with the dead packs).
    pub packs: Tally,
    /// Live bytes copied.
    pub copied: u64,
    /// New packs written, and forwarding maps written (new ones, and those sent on).
    pub new_packs: Tally,
    pub maps: Tally,
    /// Of `maps`, those that replaced a map (sent on), at the size of the one replaced.
    pub maps_replaced: Tally,
    /// Packs left as they were because a live chunk in them failed verification.
    pub skipped: Vec<String>,
}

impl RewriteReport {
    /// Objects and bytes the rewrite added to the store (before anything was deleted).
    pub fn added(&self) -> (Tally, Tally) {
        let written = Tally {
            objects: self.new_packs.objects + self.maps.objects,
            bytes: self.new_packs.bytes.saturating_add(self.maps.bytes),
        };
        (written, self.maps_replaced)
    }
}

/// A pack to rewrite: its digest and size.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    pub pack: Digest,
    pub size: u64,
}

/// Packs older than `grace` whose live bytes are less than `below` (a fraction) of their
/// size, with enough dead bytes to be worth it; no more than [`MAX_COPY`] live bytes in all
/// (the rest waits for the next collection: publishes and commits wait while one runs).
pub fn candidates(
    objects: &[ObjectInfo],
    marked: &Marked,
    now: SystemTime,
    grace: std::time::Duration,
    below: f64,
) -> Vec<Candidate> {
    if below <= 0.0 {
        return Vec::new();
    }
    let mut found: Vec<Candidate> = objects
        .iter()
        .filter(|o| o.key.starts_with("packs/") && lease::stale(now, o.modified, grace))
        .filter_map(|o| {
            let pack = Digest::parse(o.key.rsplit('/').next()?).ok()?;
            if marked.forwarded.contains_key(&pack) {
                // Rewritten already (its map holds what it had): goes with the dead packs.
                return None;
            }
            let regions = marked.packs.get(&pack)?;
            let live: u64 = regions.values().map(|r| r.stored_len as u64).sum();
            let worth =
                o.size.saturating_sub(live) >= MIN_DEAD && (live as f64) < below * o.size as f64;
            // Regions that overlap (manifests that disagree on a chunk's place) are left
            // where they are.
            let mut end = 0u64;
            let disjoint = regions.iter().all(|(&offset, r)| {
                let ok = offset >= end;
                end = offset.saturating_add(r.stored_len as u64);
                ok
            });
            (worth && disjoint).then_some((Candidate { pack, size: o.size }, live))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .scan(0u64, |copied, (c, live)| {
            *copied = copied.saturating_add(live);
            Some((c, *copied))
        })
        .take_while(|(_, copied)| *copied <= MAX_COPY)
        .map(|(c, _)| c)
        .collect();
    // Packs in digest order: the same store plans the same rewrite.
    found.sort_by_key(|c| c.pack);
    found
}

/// Counts what rewriting `candidates` would do (the maps' sizes estimated), and marks them as
/// if it had been done (so the plan counts them dead).
pub fn simulate(marked: &mut Marked, candidates: &[Candidate]) -> RewriteReport {
    let mut report = RewriteReport::default();
    for c in candidates {
        if let Some(regions) = marked.packs.remove(&c.pack) {
            let live: u64 = regions.values().map(|r| r.stored_len as u64).sum();
            report.packs.add(c.size);
            report.copied = report.copied.saturating_add(live);
            // Its map, with one move per run of adjoining regions (a run split by the end of
            // a new pack, or a map sent on, is not counted: an estimate).
            let mut runs = 0u64;
            let mut end = None;
            for (&offset, r) in &regions {
                if end != Some(offset) {
                    runs += 1;
                }
                end = Some(offset + r.stored_len as u64);
            }
            report.maps.add(MAP_FIXED + MAP_PER_MOVE * runs);
        }
    }
    if report.copied > 0 {
        report.new_packs = Tally {
            objects: report.copied.div_ceil(PACK_TARGET as u64),
            bytes: report.copied,
        };
    }
    report
}

/// One old pack's live regions, read and verified: (offset, region, stored bytes).
type Copied = Vec<(u64, Region, Bytes)>;

/// Copies the live regions of `candidates` into new packs and writes their forwarding maps;
/// updates `marked` to where the bytes are now.
pub async fn rewrite(
    store: &Arc<dyn Store>,
    lock: &GcLock,
    marked: &mut Marked,
    candidates: &[Candidate],
) -> FsResult<RewriteReport> {
    let mut report = RewriteReport::default();
    let jobs: Vec<(Candidate, BTreeMap<u64, Region>)> = candidates
        .iter()
        .filter_map(|c| Some((*c, marked.packs.get(&c.pack)?.clone())))
        .collect();
    let mut reads = stream::iter(jobs)
        .map(|(c, regions)| async move {
            let copied = read_live(store, c.pack, &regions).await;
            (c, copied)
        })
        .buffered(READS);
    let mut out = PackWriter::default();
    while let Some((c, copied)) = reads.next().await {
        let copied = match copied? {
            Ok(copied) => copied,
            Err(reason) => {
                tracing::warn!(pack = %c.pack, "not rewritten: {reason}");
                report.skipped.push(format!("pack {}: {reason}", c.pack));
                continue;
            }
        };
        report.packs.add(c.size);
        for (offset, region, bytes) in copied {
            if out.len() + bytes.len() > PACK_TARGET && out.len() > 0 {
                out.flush(store, lock, &mut report).await?;
            }
            report.copied = report.copied.saturating_add(bytes.len() as u64);
            out.add(c.pack, offset, region, &bytes);
        }
    }
    out.flush(store, lock, &mut report).await?;

    let mut maps: HashMap<Digest, Arc<PackMoves>> = HashMap::new();
    for (pack, moves) in out.moves {
        let map = PackMoves::new(pack, merge(moves)).ok_or_else(|| {
            FsError::InvalidInput(format!("the moves planned for pack {pack} overlap"))
        })?;
        maps.insert(pack, Arc::new(map));
    }
    // Maps before anything that relies on them; the live maps that point into a rewritten
    // pack (or into one an interrupted collection rewrote) are sent on, so that a reader
    // needs one hop.
    let mut to_write: Vec<Arc<PackMoves>> = maps.values().cloned().collect();
    let mut replaced: Vec<Arc<PackMoves>> = Vec::new();
    let forwarded: Vec<(Digest, Arc<PackMoves>)> = marked
        .forwarded
        .iter()
        .map(|(p, m)| (*p, Arc::clone(m)))
        .collect();
    for (pack, map) in forwarded {
        let mut sent = (*map).clone();
        for _ in 0..3 {
            let into: std::collections::BTreeSet<Digest> =
                sent.moves().iter().map(|m| m.pack).collect();
            let next: Vec<Arc<PackMoves>> = into
                .iter()
                .filter(|p| **p != pack)
                .filter_map(|p| maps.get(p).or_else(|| marked.forwarded.get(p)).cloned())
                .collect();
            if next.is_empty() {
                break;
            }
            for next in next {
                sent = sent.forward(&next).ok_or_else(|| {
                    FsError::InvalidInput(format!(
                        "the forwarding map of pack {pack} cannot be sent on through that of {}: \
                         it has overlapping moves; nothing was deleted",
                        next.pack()
                    ))
                })?;
            }
        }
        if sent != *map {
            replaced.push(map);
            let sent = Arc::new(sent);
            to_write.push(Arc::clone(&sent));
            marked.forwarded.insert(pack, sent);
        }
    }
    for map in &replaced {
        report.maps_replaced.add(map.encode().len() as u64);
    }
    for map in &to_write {
        lock.ensure_held()?;
        let bytes = Bytes::from(map.encode());
        report.maps.add(bytes.len() as u64);
        store.put(&moved_key(&map.pack()), bytes).await?;
    }

    for (pack, map) in &maps {
        let Some(regions) = marked.packs.remove(pack) else {
            continue;
        };
        for (offset, r) in regions {
            let loc = ChunkLoc {
                digest: r.digest,
                len: r.len,
                pack: *pack,
                pack_offset: offset,
                stored_len: r.stored_len,
            };
            let new = map
                .relocate(&loc)
                .expect("every live region of a rewritten pack was moved");
            marked
                .packs
                .entry(new.pack)
                .or_default()
                .insert(new.pack_offset, r);
        }
        marked.forwarded.insert(*pack, Arc::clone(map));
    }
    marked.relocate_chunks();
    Ok(report)
}

/// Joins moves that continue each other (adjoining in both packs) so a map stays small.
fn merge(mut moves: Vec<Move>) -> Vec<Move> {
    moves.sort_by_key(|m| m.from);
    let mut out: Vec<Move> = Vec::with_capacity(moves.len());
    for m in moves {
        match out.last_mut() {
            Some(last)
                if last.pack == m.pack
                    && last.from + last.len == m.from
                    && last.to + last.len == m.to =>
            {
                last.len += m.len
            }
            _ => out.push(m),
        }
    }
    out
}

/// Reads the live regions of `pack` with one ranged GET and verifies each chunk; reads once
/// more if any fails (a damaged transfer), and answers why if it still does.
async fn read_live(
    store: &Arc<dyn Store>,
    pack: Digest,
    regions: &BTreeMap<u64, Region>,
) -> FsResult<Result<Copied, String>> {
    let (Some((&start, _)), Some((&last, last_region))) =
        (regions.first_key_value(), regions.last_key_value())
    else {
        return Ok(Ok(Vec::new()));
    };
    let end = last + last_region.stored_len as u64;
    let key = pack_key(&pack);
    let mut reason = String::new();
    for _ in 0..2 {
        let object = store.get_range(&key, start..end).await?;
        let regions = regions.clone();
        let checked = tokio::task::spawn_blocking(move || -> Result<Copied, String> {
            regions
                .into_iter()
                .map(|(offset, r)| {
                    let from = (offset - start) as usize;
                    let to = from + r.stored_len as usize;
                    let stored = object
                        .get(from..to)
                        .map(|_| object.slice(from..to))
                        .ok_or_else(|| {
                            format!(
                                "the pack answered {} bytes, short of the chunk at {offset}",
                                object.len()
                            )
                        })?;
                    let plain = blob::decode_verified(&stored, &r.digest, r.len as usize)
                        .map_err(|e| format!("chunk {} at {offset}: {e}", r.digest))?;
                    if plain.len() != r.len as usize {
                        return Err(format!("chunk {} at {offset}: wrong length", r.digest));
                    }
                    Ok((offset, r, stored))
                })
                .collect()
        })
        .await
        .map_err(|e| FsError::InvalidInput(format!("verification task failed: {e}")))?;
        match checked {
            Ok(copied) => return Ok(Ok(copied)),
            Err(r) => reason = r,
        }
    }
    Ok(Err(reason))
}

/// The new pack being filled, and where each copied region went.
#[derive(Default)]
struct PackWriter {
    bytes: Vec<u8>,
    /// Regions in `bytes`: (old pack, old offset, stored length, offset in `bytes`).
    placed: Vec<(Digest, u64, u64, u64)>,
    /// Moves of the packs written so far, by old pack.
    moves: HashMap<Digest, Vec<Move>>,
}

impl PackWriter {
    fn len(&self) -> usize {
        self.bytes.len()
    }

    fn add(&mut self, pack: Digest, offset: u64, region: Region, stored: &[u8]) {
        debug_assert_eq!(stored.len(), region.stored_len as usize);
        self.placed
            .push((pack, offset, stored.len() as u64, self.bytes.len() as u64));
        self.bytes.extend_from_slice(stored);
    }

    /// Uploads the pack filled so far (named by its content, like publish's).
    async fn flush(
        &mut self,
        store: &Arc<dyn Store>,
        lock: &GcLock,
        report: &mut RewriteReport,
    ) -> FsResult<()> {
        if self.bytes.is_empty() {
            return Ok(());
        }
        let bytes = Bytes::from(std::mem::take(&mut self.bytes));
        let digest = Digest::of(&bytes);
        lock.ensure_held()?;
        report.new_packs.add(bytes.len() as u64);
        store.put(&pack_key(&digest), bytes).await?;
        for (pack, from, len, to) in self.placed.drain(..) {
            self.moves.entry(pack).or_default().push(Move {
                from,
                len,
                pack: digest,
                to,
            });
        }
        Ok(())
    }
}
