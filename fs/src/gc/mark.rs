//! Marking: from the roots in a store to every layer, pack region and chunk they keep alive.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::Serialize;
use strata_cache_format::Digest;
use strata_store::Store;

use crate::error::{FsError, FsResult};
use crate::layer::Layer;
use crate::refs;
use crate::volume::{Commit, ConflictRecord, KeptRecord, VolumeHead};

/// Who keeps a layer alive: a dataset (any of its tags) or a volume (its head, the commits
/// its squashes replaced, its conflicts and kept uppers).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(tag = "kind", content = "name", rename_all = "lowercase")]
pub enum Owner {
    Dataset(String),
    Volume(String),
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Dataset(n) => write!(f, "dataset {n}"),
            Owner::Volume(v) => write!(f, "volume {v}"),
        }
    }
}

/// The roots of a store: every layer something names, by whom.
#[derive(Debug, Default)]
pub struct Roots {
    pub layers: BTreeMap<Digest, BTreeSet<Owner>>,
    /// Roots that could not be read (a damaged head, say). Whatever they name is unknown, so
    /// nothing may be swept while there are any.
    pub unreadable: Vec<String>,
}

impl Roots {
    fn add(&mut self, layer: &str, owner: &Owner, key: &str) {
        match Digest::parse(layer) {
            Ok(d) => {
                self.layers.entry(d).or_default().insert(owner.clone());
            }
            Err(e) => self
                .unreadable
                .push(format!("{key}: names an invalid layer {layer:?}: {e}")),
        }
    }

    fn add_commits(&mut self, commits: &[Commit], owner: &Owner, key: &str) {
        for c in commits {
            self.add(&c.layer, owner, key);
            if let Some(delta) = &c.delta {
                self.add(delta, owner, key);
            }
            self.add_commits(&c.squashed, owner, key);
        }
    }
}

/// Reads every root of `store`.
pub async fn roots(store: &Arc<dyn Store>) -> FsResult<Roots> {
    let mut roots = Roots::default();
    // Every ref key, not only those `refs::list` understands: one it cannot read names
    // something unknown, which must not then look dead.
    for key in store.list("refs/").await? {
        if key.ends_with('/') {
            continue; // a "folder" marker some S3 consoles make
        }
        let parsed = match key.split('/').collect::<Vec<_>>().as_slice() {
            ["refs", name, tag] => refs::DatasetRef::parse(&format!("{name}:{tag}")).ok(),
            _ => None,
        };
        let Some(r) = parsed else {
            roots
                .unreadable
                .push(format!("{key}: not a ref this strata version knows"));
            continue;
        };
        match refs::resolve(store, &r).await {
            Ok(digest) => {
                roots
                    .layers
                    .entry(digest)
                    .or_default()
                    .insert(Owner::Dataset(r.name));
            }
            Err(FsError::NotFound(_)) => {} // removed, or deleted while listing
            Err(FsError::Store(e)) => return Err(e.into()),
            Err(e) => roots.unreadable.push(format!("{key}: {e}")),
        }
    }
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
                Ok(head) if head.version == 1 => roots.add_commits(&head.commits, &owner, &key),
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
                Ok(k) => k.layers.iter().for_each(|l| roots.add(l, &owner, &key)),
                Err(e) => roots.unreadable.push(unreadable(e)),
            },
            // Not a root this version knows: keep whatever it might name by refusing to
            // call the store fully understood.
            _ => roots
                .unreadable
                .push(format!("{key}: not an object this strata version knows")),
        }
    }
    Ok(roots)
}

/// A chunk some live layer uses.
#[derive(Debug, Clone)]
pub struct LiveChunk {
    pub stored_len: u32,
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
    /// Per pack, the live regions in it (offset → stored length).
    pub packs: HashMap<Digest, BTreeMap<u64, u32>>,
    /// Layers a root names that are missing or damaged (nothing of them can be marked).
    pub broken_layers: Vec<String>,
    /// Roots that could not be read (see [`Roots::unreadable`]).
    pub unreadable: Vec<String>,
}

impl Marked {
    /// Whether every root and every live layer was read: only then is "not marked" the same
    /// as "not needed".
    pub fn is_complete(&self) -> bool {
        self.broken_layers.is_empty() && self.unreadable.is_empty()
    }
}

/// Marks everything `roots` keep alive, reading each live manifest once.
pub async fn mark(store: &Arc<dyn Store>, roots: Roots) -> FsResult<Marked> {
    let mut marked = Marked {
        unreadable: roots.unreadable,
        ..Marked::default()
    };
    for (digest, owners) in roots.layers {
        marked.layers.insert(digest, owners.clone());
        let layer = match Layer::load(store, digest, None).await {
            Ok(l) => l,
            Err(e @ (FsError::NotFound(_) | FsError::CorruptLayer { .. })) => {
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
                marked
                    .broken_layers
                    .push(format!("layer {digest}: its manifest does not parse"));
                continue;
            }
            Err(e) => return Err(e),
        };
        let m = &layer.manifest;
        for i in 0..m.chunk_count() {
            let c = m.chunk(i);
            let live = marked.chunks.entry(c.digest).or_insert_with(|| LiveChunk {
                stored_len: c.stored_len,
                owners: BTreeSet::new(),
            });
            live.owners.extend(owners.iter().cloned());
            marked
                .packs
                .entry(c.pack)
                .or_default()
                .insert(c.pack_offset, c.stored_len);
        }
    }
    Ok(marked)
}
