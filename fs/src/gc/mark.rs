//! Marking: from the roots in a store to every layer, pack region and chunk they keep alive.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use strata_cache_format::{moved_key, ChunkLoc, Digest, PackMoves};
use strata_store::Store;

use super::lease;
use super::retention::{self, Policy};
use crate::error::{FsError, FsResult};
use crate::layer::Layer;
use crate::refs;
use crate::volume::{ConflictRecord, KeptRecord, VolumeHead};

/// Who keeps a layer alive: a dataset (any of its tags) or a volume (its head, the commits
/// its squashes replaced, its conflicts and kept uppers).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(tag = "kind", content = "name", rename_all = "lowercase")]
pub enum Owner {
    Dataset(String),
    Volume(String),
    /// A daemon's mount lease (`<host>-<daemon id>`).
    Mount(String),
    /// Written within the grace period (a layer no root names yet).
    Recent,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Dataset(n) => write!(f, "dataset {n}"),
            Owner::Volume(v) => write!(f, "volume {v}"),
            Owner::Mount(m) => write!(f, "mounts of daemon {m}"),
            Owner::Recent => write!(f, "the grace period"),
        }
    }
}

/// The roots of a store: every layer something names, by whom.
#[derive(Debug, Default)]
pub struct Roots {
    pub layers: BTreeMap<Digest, BTreeSet<Owner>>,
    /// Layers named only as commits a volume's squash replaced: a squash copies the list of
    /// the squash before it, whose layers an earlier collection may have deleted already, so
    /// one that is missing is no damage.
    pub replaced: BTreeSet<Digest>,
    /// Layers something else names too (then missing is damage).
    required: BTreeSet<Digest>,
    /// Roots that could not be read (a damaged head, say). Whatever they name is unknown, so
    /// nothing may be swept while there are any.
    pub unreadable: Vec<String>,
    /// Live mount leases of daemons that do not follow forwarding maps: no pack may be
    /// rewritten while there are any.
    pub old_readers: Vec<String>,
}

impl Roots {
    /// Adds a root (`key` names it).
    fn add(&mut self, layer: &str, owner: &Owner, key: &str) {
        if let Some(d) = self.add_named(layer, owner, key) {
            self.required.insert(d);
        }
    }

    fn add_digest(&mut self, d: Digest, owner: &Owner) {
        self.layers.entry(d).or_default().insert(owner.clone());
        self.required.insert(d);
    }

    /// Whether a missing `layer` is damage: something other than a squash's list of the
    /// commits it replaced names it.
    pub fn must_exist(&self, layer: &Digest) -> bool {
        self.required.contains(layer) || !self.replaced.contains(layer)
    }

    fn add_named(&mut self, layer: &str, owner: &Owner, key: &str) -> Option<Digest> {
        match Digest::parse(layer) {
            Ok(d) => {
                self.layers.entry(d).or_default().insert(owner.clone());
                Some(d)
            }
            Err(e) => {
                self.unreadable
                    .push(format!("{key}: names an invalid layer {layer:?}: {e}"));
                None
            }
        }
    }

    /// A volume head's roots: its chain, and of the commits its squashes replaced those a
    /// mount may still need. A mount (or kept upper) that started from a head whose last
    /// commit is the replaced commit at position `p` needs every one after it to commit
    /// (what landed since it started, to rebase on); those before are read by nobody. A
    /// squash made within the grace period keeps all it replaced: a mount may have read the
    /// head before it and not yet written its lease. Where a mount started is unknown (a
    /// lease that does not say, a kept upper from a head since squashed away, a head no
    /// longer in the chain), everything is kept. `keep_within` (at least the grace period):
    /// how long after a squash everything it replaced stays, whoever mounted what (a host
    /// that crashed holds no live lease, yet commits its upper when it comes back).
    fn add_head(
        &mut self,
        head: &VolumeHead,
        owner: &Owner,
        key: &str,
        origins: &VolumeOrigins,
        now_secs: u64,
        keep_within: Duration,
    ) {
        let volume = match owner {
            Owner::Volume(v) => v.as_str(),
            _ => "",
        };
        let chain = crate::volume::expand(&head.commits);
        let position = |layer: &str| {
            chain
                .iter()
                .position(|c| c.layer == layer || c.delta.as_deref() == Some(layer))
        };
        // The first replaced commit (position in `chain`) some mount may need.
        let mut from = chain.len();
        if origins.unknown {
            from = 0;
        }
        for tip in origins.mounts.get(volume).into_iter().flatten() {
            from = from.min(match position(tip) {
                Some(p) => p + 1,
                None => 0,
            });
        }
        for stack in origins.kept.get(volume).into_iter().flatten() {
            let named = chain
                .iter()
                .enumerate()
                .filter(|(_, c)| stack.contains(&c.layer))
                .map(|(p, _)| p)
                .max();
            from = from.min(named.map_or(0, |p| p + 1));
        }
        let mut at = 0;
        for c in &head.commits {
            self.add(&c.layer, owner, key);
            if let Some(delta) = &c.delta {
                self.add(delta, owner, key);
            }
            if c.squashed.is_empty() {
                at += 1;
                continue;
            }
            let recent = c.committed_at.saturating_add(keep_within.as_secs()) > now_secs;
            for (i, replaced) in c.squashed.iter().enumerate() {
                if recent || at + i >= from {
                    for layer in std::iter::once(&replaced.layer).chain(&replaced.delta) {
                        if let Some(d) = self.add_named(layer, owner, key) {
                            self.replaced.insert(d);
                        }
                    }
                }
            }
            at += c.squashed.len();
        }
    }
}

/// What counts as a root besides refs, heads and records: the retention of tags' earlier
/// layers, daemons' mount leases, and the grace period.
#[derive(Clone, Debug)]
pub struct RootOptions {
    /// The store's clock now.
    pub now: SystemTime,
    /// Layers a tag stopped pointing at within this long stay roots, whatever the policy (a
    /// mount that resolved the tag just before it moved has yet to write its lease).
    pub grace: Duration,
    /// The policy of datasets that have none of their own (`None`: keep every layer).
    pub default_policy: Option<Policy>,
    /// A mount lease not rewritten for this long keeps nothing alive.
    pub mount_stale: Duration,
    /// Everything a volume's squash replaced stays a root this long after the squash (see
    /// `Roots::add_head`).
    pub keep_replaced: Duration,
}

impl Default for RootOptions {
    fn default() -> Self {
        RootOptions {
            now: SystemTime::now(),
            grace: DEFAULT_GRACE,
            default_policy: None,
            mount_stale: lease::Timings::default().mount_stale,
            keep_replaced: DEFAULT_KEEP_REPLACED,
        }
    }
}

/// Objects written within this long are never swept.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60 * 60);

/// How long the commits a squash replaced stay roots whoever mounted what: a daemon that
/// crashed (its lease lapses in 15 minutes) and comes back within a week commits its kept
/// uppers onto them.
pub const DEFAULT_KEEP_REPLACED: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Reads every root of `store`.
pub async fn roots(store: &Arc<dyn Store>, options: &RootOptions) -> FsResult<Roots> {
    let mut roots = Roots::default();
    let now_secs = lease::epoch_secs(options.now);
    // Every ref key, not only those `refs::list` understands: one it cannot read names
    // something unknown, which must not then look dead. Tags with a history but no ref (a
    // ref deleted by hand) keep what their retention says too.
    let mut tags: BTreeMap<(String, String), Option<SystemTime>> = BTreeMap::new();
    // When each history was last written (for a history whose ref is gone).
    let mut histories: HashMap<(String, String), SystemTime> = HashMap::new();
    for o in store.list_info("refs/").await? {
        if o.key.ends_with('/') {
            continue; // a "folder" marker some S3 consoles make
        }
        match o.key.split('/').collect::<Vec<_>>().as_slice() {
            ["refs", name, tag] if refs::DatasetRef::parse(&format!("{name}:{tag}")).is_ok() => {
                tags.insert((name.to_string(), tag.to_string()), Some(o.modified));
            }
            _ => roots
                .unreadable
                .push(format!("{}: not a ref this strata version knows", o.key)),
        }
    }
    for o in store.list_info("history/").await? {
        if let ["history", name, tag] = o.key.split('/').collect::<Vec<_>>().as_slice() {
            if refs::DatasetRef::parse(&format!("{name}:{tag}")).is_ok() {
                let tag = (name.to_string(), tag.to_string());
                histories.insert(tag.clone(), o.modified);
                tags.entry(tag).or_insert(None);
            }
        }
    }
    let mut policies: HashMap<String, Option<Policy>> = HashMap::new();
    for ((name, tag), ref_modified) in tags {
        let history_modified = histories.get(&(name.clone(), tag.clone())).copied();
        let r = refs::DatasetRef::parse(&format!("{name}:{tag}"))?;
        let owner = Owner::Dataset(name.clone());
        let key = r.key();
        let current = match ref_modified {
            None => None,
            Some(_) => match refs::resolve(store, &r).await {
                Ok(digest) => {
                    roots.add_digest(digest, &owner);
                    Some(digest)
                }
                Err(FsError::NotFound(_)) => None, // removed, or deleted while listing
                Err(FsError::Store(e)) => return Err(e.into()),
                Err(e) => {
                    roots.unreadable.push(format!("{key}: {e}"));
                    continue;
                }
            },
        };
        let policy = match policies.get(&name) {
            Some(p) => *p,
            None => {
                let p = match retention::read(store, &name).await {
                    Ok(p) => p.or(options.default_policy),
                    Err(FsError::Store(e)) => return Err(e.into()),
                    Err(e) => {
                        roots.unreadable.push(e.to_string());
                        None
                    }
                };
                policies.insert(name.clone(), p);
                p
            }
        };
        let history = match refs::history::read(store, &r).await {
            Ok(h) => h,
            Err(FsError::Store(e)) => return Err(e.into()),
            Err(e) => {
                roots
                    .unreadable
                    .push(format!("{}: {e}", refs::history::key(&r)));
                continue;
            }
        };
        // A ref that moved within the grace period with no record of the move: the layer it
        // pointed at before is unknown, and a mount may have just resolved it.
        let recent = ref_modified.is_some_and(|m| !lease::stale(options.now, m, options.grace));
        let last = history.moves.last().map(|m| m.layer.clone());
        if recent && last != Some(current.map(|d| d.to_string())) {
            roots.unreadable.push(format!(
                "{key} moved within the grace period and its history lacks that move: the \
                 layer it pointed at before is unknown"
            ));
        }
        let secs = |t: Option<SystemTime>| t.map_or(0, lease::epoch_secs);
        for (rank, (layer, ended)) in earlier_layers(&history, current).into_iter().enumerate() {
            // When it was left: by the writer's clock, or, for the move that made the ref
            // what it is, by the store's when that is later (a writer's clock running behind
            // must not shorten the grace). A history whose ref was deleted by hand still
            // points at its last layer: that was left when the history was last written.
            let ended = match ended {
                Some(Left { at, latest: true }) => at.max(secs(ref_modified)),
                Some(Left { at, .. }) => at,
                None => secs(history_modified),
            };
            let in_grace = ended.saturating_add(options.grace.as_secs()) > now_secs;
            if in_grace || policy.is_none_or(|p| p.keeps(rank, ended, now_secs)) {
                roots.add_digest(layer, &owner);
            }
        }
    }
    let mut origins = mount_leases(store, options, &mut roots).await?;
    let mut heads = Vec::new();
    for key in store.list("volumes/").await? {
        if key.ends_with('/') {
            continue;
        }
        let parts: Vec<&str> = key.split('/').collect();
        let (scope, name, rest) = match parts.as_slice() {
            ["volumes", scope, name, rest @ ..] => (*scope, *name, rest),
            _ => continue,
        };
        let owner = Owner::Volume(format!("{scope}/{name}"));
        let body = match crate::record::get(store, &key).await {
            Ok(b) => b,
            Err(FsError::Store(e)) if e.is_not_found() => continue, // removed while listing
            Err(FsError::Store(e)) => return Err(e.into()),
            Err(e) => {
                roots.unreadable.push(format!("{key}: {e}"));
                continue;
            }
        };
        let unreadable = |e: serde_json::Error| format!("{key}: unreadable: {e}");
        match rest {
            ["head"] => match serde_json::from_slice::<VolumeHead>(&body) {
                Ok(head) if head.version == 1 => heads.push((owner, key, head)),
                Ok(head) => roots.unreadable.push(format!(
                    "{key}: head version {} is not one this strata reads",
                    head.version
                )),
                Err(e) => roots.unreadable.push(unreadable(e)),
            },
            ["conflicts", _] => match serde_json::from_slice::<ConflictRecord>(&body) {
                Ok(c) => c.layers.iter().for_each(|l| roots.add(l, &owner, &key)),
                Err(e) => roots.unreadable.push(unreadable(e)),
            },
            ["kept", _] => match serde_json::from_slice::<KeptRecord>(&body) {
                Ok(k) => {
                    k.layers.iter().for_each(|l| roots.add(l, &owner, &key));
                    origins
                        .kept
                        .entry(format!("{scope}/{name}"))
                        .or_default()
                        .push(k.layers.into_iter().collect());
                }
                Err(e) => roots.unreadable.push(unreadable(e)),
            },
            // Not a root this version knows: keep whatever it might name by refusing to
            // call the store fully understood.
            _ => roots
                .unreadable
                .push(format!("{key}: not an object this strata version knows")),
        }
    }
    let keep_replaced = options.keep_replaced.max(options.grace);
    for (owner, key, head) in heads {
        roots.add_head(&head, &owner, &key, &origins, now_secs, keep_replaced);
    }
    Ok(roots)
}

/// When a tag left a layer: `at` (seconds, the writer's clock) of the move that left it;
/// `latest`: that move is the tag's last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Left {
    at: u64,
    latest: bool,
}

/// The layers a tag pointed at before `current`, most recent first, each with when it was
/// left (`None`: the history still points at it, its ref gone). A layer it came back to counts
/// once, at its latest. Both the layer each move set and the layer each move names as left
/// (`from`) count, so a move missing from the history (its append failed) still leaves a
/// trace in the next one.
fn earlier_layers(
    history: &refs::history::History,
    current: Option<Digest>,
) -> Vec<(Digest, Option<Left>)> {
    let moves = &history.moves;
    let last = moves.len().saturating_sub(1);
    let parse = |l: &Option<String>| l.as_deref().and_then(|l| Digest::parse(l).ok());
    // (layer, index of the move that left it or `moves.len()`: not left, and whether a
    // move named it as left: of two layers left by one move, that one is the later, since
    // the other's own leaving is missing from the history)
    let mut left: Vec<(Digest, usize, bool)> = Vec::new();
    for (i, m) in moves.iter().enumerate() {
        if let Some(layer) = parse(&m.layer) {
            left.push((layer, i + 1, false));
        }
        if let Some(from) = parse(&m.from) {
            left.push((from, i, true));
        }
    }
    left.sort_by_key(|&(_, i, named)| std::cmp::Reverse((i, named)));
    let mut seen = HashSet::new();
    left.into_iter()
        .filter(|(layer, ..)| Some(*layer) != current && seen.insert(*layer))
        .map(|(layer, i, _)| {
            let when = moves.get(i).map(|m| Left {
                at: m.at,
                latest: i == last,
            });
            (layer, when)
        })
        .collect()
}

/// Where live volume mounts started, by volume: what decides which commits a squash replaced
/// are still roots (see [`Roots::add_head`]).
#[derive(Debug, Default)]
pub struct VolumeOrigins {
    /// Per volume, the last commit (layer) of each head a live mount started from; `""`: an
    /// empty head.
    pub mounts: BTreeMap<String, BTreeSet<String>>,
    /// Per volume, the layers of each kept upper's stack (its head's among them).
    pub kept: BTreeMap<String, Vec<BTreeSet<String>>>,
    /// A live lease that does not say (written before leases named origins): every replaced
    /// commit stays a root.
    pub unknown: bool,
}

/// Adds the layers of daemons' live mount leases to `roots`; returns where their volume
/// mounts started.
pub async fn mount_leases(
    store: &Arc<dyn Store>,
    options: &RootOptions,
    roots: &mut Roots,
) -> FsResult<VolumeOrigins> {
    let mut origins = VolumeOrigins::default();
    for o in store.list_info(lease::MOUNTS).await? {
        if lease::stale(options.now, o.modified, options.mount_stale) {
            continue;
        }
        let owner = Owner::Mount(o.key.trim_start_matches(lease::MOUNTS).to_string());
        let lease = match crate::record::get(store, &o.key).await {
            Ok(body) => serde_json::from_slice::<lease::MountLease>(&body)
                .map_err(|e| format!("{}: unreadable: {e}", o.key)),
            Err(FsError::Store(e)) if e.is_not_found() => continue, // released meanwhile
            Err(FsError::Store(e)) => return Err(e.into()),
            Err(e) => Err(format!("{}: {e}", o.key)),
        };
        match lease {
            Ok(l) if l.version == 1 => {
                l.layers.iter().for_each(|d| roots.add(d, &owner, &o.key));
                if !l.follows_moved {
                    roots.old_readers.push(o.key.clone());
                }
                match l.volumes {
                    Some(volumes) => {
                        for (volume, tips) in volumes {
                            origins.mounts.entry(volume).or_default().extend(tips);
                        }
                    }
                    None => origins.unknown = true,
                }
            }
            Ok(l) => roots.unreadable.push(format!(
                "{}: mount lease version {} is not one this strata reads",
                o.key, l.version
            )),
            Err(why) => roots.unreadable.push(why),
        }
    }
    Ok(origins)
}

/// Adds the layers whose manifests were written within the grace period: a publish or commit
/// may be about to point a root at them.
pub async fn recent_layers(
    store: &Arc<dyn Store>,
    options: &RootOptions,
    roots: &mut Roots,
) -> FsResult<()> {
    for o in store.list_info("layers/").await? {
        if o.key.ends_with('/') {
            continue; // a "folder" marker some S3 consoles make
        }
        if !lease::stale(options.now, o.modified, options.grace) {
            if let Some(d) = o.key.rsplit('/').next() {
                roots.add(d, &Owner::Recent, &o.key);
            }
        }
    }
    Ok(())
}

/// A live chunk's stored bytes in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub stored_len: u32,
    pub digest: Digest,
    /// Plain length.
    pub len: u32,
}

/// A chunk some live layer uses.
#[derive(Debug, Clone)]
pub struct LiveChunk {
    pub stored_len: u32,
    /// Where a live layer has it (the first one marked).
    pub location: strata_cache_format::ChunkLoc,
    pub owners: BTreeSet<Owner>,
}

/// What the roots keep alive.
#[derive(Debug, Default)]
pub struct Marked {
    /// Live layers, with their owners: every layer a root names, even one that could not
    /// be read (its manifest and start record stay; see `broken_layers`).
    pub layers: BTreeMap<Digest, BTreeSet<Owner>>,
    /// Live chunks by digest.
    pub chunks: HashMap<Digest, LiveChunk>,
    /// Per pack, the live regions in it, where the bytes are now: a region of a pack gc
    /// rewrote is counted where its forwarding map sends it.
    pub packs: HashMap<Digest, BTreeMap<u64, Region>>,
    /// Forwarding maps a live layer reads through: those of the rewritten packs that live
    /// layers (or the live maps before them) name.
    pub forwarded: HashMap<Digest, Arc<PackMoves>>,
    /// Layers a root names that are missing or damaged (nothing of them can be marked).
    pub broken_layers: Vec<String>,
    /// Roots that could not be read (see [`Roots::unreadable`]).
    pub unreadable: Vec<String>,
    /// See [`Roots::old_readers`].
    pub old_readers: Vec<String>,
}

impl Marked {
    /// Whether every root and every live layer was read: only then is "not marked" the same
    /// as "not needed".
    pub fn is_complete(&self) -> bool {
        self.broken_layers.is_empty() && self.unreadable.is_empty()
    }
}

/// Marks everything `roots` keep alive, reading each live manifest once.
pub async fn mark(store: &Arc<dyn Store>, mut roots: Roots) -> FsResult<Marked> {
    let mut marked = Marked {
        unreadable: std::mem::take(&mut roots.unreadable),
        old_readers: std::mem::take(&mut roots.old_readers),
        ..Marked::default()
    };
    for (digest, owners) in &roots.layers {
        let (digest, owners) = (*digest, owners);
        let layer = match Layer::load(store, digest, None).await {
            Ok(l) => l,
            // Collected already (see `Roots::replaced`): nothing to keep.
            Err(FsError::NotFound(_)) if !roots.must_exist(&digest) => continue,
            Err(e @ (FsError::NotFound(_) | FsError::CorruptLayer { .. })) => {
                marked.layers.insert(digest, owners.clone());
                marked.broken_layers.push(format!(
                    "layer {digest} of {}: {e}",
                    owners
                        .iter()
                        .map(|o| o.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                continue;
            }
            Err(FsError::Manifest { .. }) => {
                marked.layers.insert(digest, owners.clone());
                marked
                    .broken_layers
                    .push(format!("layer {digest}: its manifest does not parse"));
                continue;
            }
            Err(e) => return Err(e),
        };
        marked.layers.insert(digest, owners.clone());
        let m = &layer.manifest;
        for i in 0..m.chunk_count() {
            let c = m.chunk(i);
            let live = marked.chunks.entry(c.digest).or_insert_with(|| LiveChunk {
                stored_len: c.stored_len,
                location: c.location(),
                owners: BTreeSet::new(),
            });
            live.owners.extend(owners.iter().cloned());
            marked.packs.entry(c.pack).or_default().insert(
                c.pack_offset,
                Region {
                    stored_len: c.stored_len,
                    digest: c.digest,
                    len: c.len,
                },
            );
        }
    }
    follow_moves(store, &mut marked).await?;
    Ok(marked)
}

/// Forwarding maps a chain of rewrites may leave to follow (gc sends a map on when the pack it
/// points into is rewritten, so more than one is an interrupted collection's).
const MOVED_HOPS: usize = 3;

/// Moves the live regions of packs gc rewrote to where their forwarding maps say the bytes
/// are now, and the live chunks' locations with them. A region a map does not hold stays
/// where it was (its pack is then kept). An unreadable map is a problem: what it forwards to
/// is unknown.
async fn follow_moves(store: &Arc<dyn Store>, marked: &mut Marked) -> FsResult<()> {
    let listed: HashSet<Digest> = store
        .list("moved/")
        .await?
        .iter()
        .filter_map(|k| Digest::parse(k.rsplit('/').next()?).ok())
        .collect();
    for _ in 0..MOVED_HOPS {
        let follow: Vec<Digest> = marked
            .packs
            .keys()
            .filter(|p| listed.contains(p) && !marked.forwarded.contains_key(p))
            .copied()
            .collect();
        if follow.is_empty() {
            break;
        }
        for pack in follow {
            let key = moved_key(&pack);
            let map = match store.get(&key).await {
                Ok(bytes) => PackMoves::parse(pack, &bytes),
                Err(e) if e.is_not_found() => None,
                Err(e) => return Err(e.into()),
            };
            let Some(map) = map else {
                marked
                    .unreadable
                    .push(format!("{key}: damaged or gone since listed"));
                continue;
            };
            let regions = marked.packs.remove(&pack).unwrap_or_default();
            let mut left = BTreeMap::new();
            for (offset, r) in regions {
                let loc = ChunkLoc {
                    digest: r.digest,
                    len: r.len,
                    pack,
                    pack_offset: offset,
                    stored_len: r.stored_len,
                };
                match map.relocate(&loc) {
                    Some(new) => {
                        marked
                            .packs
                            .entry(new.pack)
                            .or_default()
                            .insert(new.pack_offset, r);
                    }
                    None => {
                        left.insert(offset, r);
                    }
                }
            }
            if !left.is_empty() {
                marked.packs.insert(pack, left);
            }
            marked.forwarded.insert(pack, Arc::new(map));
        }
    }
    // Regions still in a pack with a map not followed: a chain of maps longer than any
    // collection leaves. Where their bytes are is not known.
    for pack in marked.packs.keys() {
        if listed.contains(pack) && !marked.forwarded.contains_key(pack) {
            marked.unreadable.push(format!(
                "{}: more than {MOVED_HOPS} forwarding maps to follow",
                moved_key(pack)
            ));
        }
    }
    marked.relocate_chunks();
    Ok(())
}

impl Marked {
    /// Points every live chunk's location past the forwarding maps of `forwarded`.
    pub fn relocate_chunks(&mut self) {
        if self.forwarded.is_empty() {
            return;
        }
        for chunk in self.chunks.values_mut() {
            for _ in 0..MOVED_HOPS {
                match self
                    .forwarded
                    .get(&chunk.location.pack)
                    .and_then(|m| m.relocate(&chunk.location))
                {
                    Some(new) => chunk.location = new,
                    None => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refs::history::{History, Move};
    use crate::volume::Commit;

    fn d(n: u8) -> Digest {
        Digest([n; 32])
    }

    fn mv(layer: Option<u8>, at: u64, from: Option<u8>) -> Move {
        Move {
            layer: layer.map(|n| d(n).to_string()),
            at,
            by: "publish".into(),
            from: from.map(|n| d(n).to_string()),
        }
    }

    fn commit(n: u8, at: u64, squashed: Vec<Commit>) -> Commit {
        Commit {
            layer: d(n).to_string(),
            committed_at: at,
            changes: 1,
            bytes_uploaded: 1,
            paths: vec![format!("f{n}")],
            attrs: Vec::new(),
            squashed,
            upper: None,
            delta: None,
        }
    }

    /// The roots of a head of squash 10 (replacing commits 1–4, at time 1,000) then commit 5,
    /// with `origins`, at time `now` and a grace of 100 s: which of 1–4 stay.
    fn replaced_kept(origins: &VolumeOrigins, now: u64) -> Vec<u8> {
        let head = VolumeHead {
            version: 1,
            commits: vec![
                commit(
                    10,
                    1_000,
                    (1..=4).map(|n| commit(n, n as u64, vec![])).collect(),
                ),
                commit(5, 1_100, vec![]),
            ],
        };
        let mut roots = Roots::default();
        let owner = Owner::Volume("s/v".into());
        roots.add_head(&head, &owner, "k", origins, now, Duration::from_secs(100));
        assert!(roots.layers.contains_key(&d(10)) && roots.layers.contains_key(&d(5)));
        assert!(roots.unreadable.is_empty());
        (1..=4)
            .filter(|n| roots.layers.contains_key(&d(*n)))
            .collect()
    }

    fn mounts_from(tips: &[&str]) -> VolumeOrigins {
        VolumeOrigins {
            mounts: [(
                "s/v".to_string(),
                tips.iter().map(|t| t.to_string()).collect(),
            )]
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn replaced_commits_stay_roots_only_while_a_mount_may_rebase_across_them() {
        let late = 10_000;
        // Nobody mounted: only the chain itself.
        assert_eq!(
            replaced_kept(&VolumeOrigins::default(), late),
            Vec::<u8>::new()
        );
        // A mount that started from commit 2 needs 3 and 4 to commit.
        assert_eq!(
            replaced_kept(&mounts_from(&[&d(2).to_string()]), late),
            [3, 4]
        );
        // Two mounts: the earlier one decides.
        let both = mounts_from(&[&d(3).to_string(), &d(1).to_string()]);
        assert_eq!(replaced_kept(&both, late), [2, 3, 4]);
        // From an empty head, or a head this chain does not know: everything.
        assert_eq!(replaced_kept(&mounts_from(&[""]), late), [1, 2, 3, 4]);
        assert_eq!(
            replaced_kept(&mounts_from(&[&d(99).to_string()]), late),
            [1, 2, 3, 4]
        );
        // From commit 5 (after the squash): none of them.
        assert_eq!(
            replaced_kept(&mounts_from(&[&d(5).to_string()]), late),
            Vec::<u8>::new()
        );
        // Another volume's mounts do not count.
        let other = VolumeOrigins {
            mounts: [("s/w".to_string(), [String::new()].into())].into(),
            ..Default::default()
        };
        assert_eq!(replaced_kept(&other, late), Vec::<u8>::new());
        // A lease that does not say where its mounts started keeps everything.
        let unknown = VolumeOrigins {
            unknown: true,
            ..Default::default()
        };
        assert_eq!(replaced_kept(&unknown, late), [1, 2, 3, 4]);
        // A kept upper whose stack holds commit 3: 4 after it; one whose stack the chain
        // does not know (its head since squashed away): everything.
        let kept = |layers: Vec<String>| VolumeOrigins {
            kept: [("s/v".to_string(), vec![layers.into_iter().collect()])].into(),
            ..Default::default()
        };
        let stack = vec![d(1).to_string(), d(2).to_string(), d(3).to_string()];
        assert_eq!(replaced_kept(&kept(stack), late), [4]);
        assert_eq!(
            replaced_kept(&kept(vec![d(77).to_string()]), late),
            [1, 2, 3, 4]
        );
        // A squash within the grace period keeps all it replaced (a mount may have read the
        // head before it and not written its lease yet).
        assert_eq!(
            replaced_kept(&VolumeOrigins::default(), 1_050),
            [1, 2, 3, 4]
        );
    }

    #[tokio::test]
    async fn a_replaced_commit_collected_already_is_no_damage_unless_named_elsewhere() {
        let store: Arc<dyn Store> = Arc::new(strata_store::MemoryStore::new("mark"));
        let owner = Owner::Volume("s/v".into());
        let mut roots = Roots::default();
        // 1: only in a squash's list; 2: in a list and named by a lease too; 3: a head's.
        for n in [1, 2] {
            let d = roots.add_named(&d(n).to_string(), &owner, "head").unwrap();
            roots.replaced.insert(d);
        }
        roots.add(&d(2).to_string(), &Owner::Mount("h".into()), "lease");
        roots.add(&d(3).to_string(), &owner, "head");
        let marked = mark(&store, roots).await.unwrap();
        assert_eq!(marked.broken_layers.len(), 2, "{:?}", marked.broken_layers);
        for n in [2, 3] {
            let named = d(n).to_string();
            assert!(marked.broken_layers.iter().any(|b| b.contains(&named)));
        }
        assert!(!marked.layers.contains_key(&d(1)));
    }

    #[test]
    fn earlier_layers_come_most_recent_first_and_a_lost_move_leaves_a_trace() {
        // 1 → 2 → (3, whose move is missing from the history) → 4 → 1 again, then 5.
        let h = History {
            version: 1,
            moves: vec![
                mv(Some(1), 10, None),
                mv(Some(2), 20, Some(1)),
                mv(Some(4), 40, Some(3)),
                mv(Some(1), 50, Some(4)),
                mv(Some(5), 60, Some(1)),
            ],
        };
        let got = earlier_layers(&h, Some(d(5)));
        let left = |at, latest| Some(Left { at, latest });
        assert_eq!(
            got,
            vec![
                (d(1), left(60, true)),
                (d(4), left(50, false)),
                (d(3), left(40, false)),
                (d(2), left(40, false)),
            ],
            "1 counts once, at its latest; 3 is known from the move that left it"
        );
        // The ref deleted by hand: the history still points at 5, left at no known time.
        let got = earlier_layers(&h, None);
        assert_eq!(got[0], (d(5), None));
        // Removed (a tombstone move): 5 was left by the removal.
        let mut removed = h.clone();
        removed.moves.push(mv(None, 70, Some(5)));
        assert_eq!(earlier_layers(&removed, None)[0], (d(5), left(70, true)));
    }
}
