//! A commit's attributes over newer attribute changes. A commit carries the directories on
//! the way to its changes, and the paths whose attributes it changed, with the attributes its
//! mount saw. Rebased as they are over a newer commit that changed only the attributes of one
//! of those paths (a `chmod 700` of a directory another mount merely added a file to), they
//! would silently undo that change. So before it goes on top, each of mode, owner, group and
//! xattrs that the mount left as it was (at its last commit, or else when it started) takes
//! the value the newer commits gave it; the fields the mount changed keep its own (the later
//! commit wins).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use strata_cache_format::Digest;
use strata_store::Store;

use super::{expand, VolumeHead};
use crate::error::{FsError, FsResult};
use crate::layer::Layer;
use crate::manifest::{Entry, Manifest};
use crate::squash::AttrsOverride;
use crate::stack::{LayerStack, ROOT_INO};

/// Manifests of newer commits, loaded once per commit attempt.
pub(super) type Loaded = HashMap<String, Arc<Layer>>;

async fn load(store: &Arc<dyn Store>, layer: &str, loaded: &mut Loaded) -> FsResult<Arc<Layer>> {
    if let Some(l) = loaded.get(layer) {
        return Ok(l.clone());
    }
    let digest = Digest::parse(layer)
        .map_err(|e| FsError::InvalidInput(format!("commit layer {layer:?}: {e}")))?;
    let l = Arc::new(Layer::load(store, digest, None).await?);
    loaded.insert(layer.to_string(), l.clone());
    Ok(l)
}

/// The entry at `path` of one layer, without crossing anything but directories.
fn resolve<'a>(m: &'a Manifest, path: &str) -> Option<Entry<'a>> {
    let mut e = m.root();
    if path.is_empty() {
        return Some(e);
    }
    for name in path.split('/') {
        if e.kind != crate::manifest::Kind::Dir {
            return None;
        }
        e = m.lookup(&e, name.as_bytes())?;
    }
    Some(e)
}

/// A path's (mode, uid, gid, xattrs).
type Found = (u32, u32, u32, Vec<(Vec<u8>, Vec<u8>)>);

/// The committing mount, as far as attributes go.
pub(super) struct Mount<'a> {
    /// The layers it started with.
    pub stack: &'a LayerStack,
    /// The head it started from.
    pub origin: &'a VolumeHead,
    /// The layer its last commit published, if it committed before.
    pub last: Option<&'a Manifest>,
}

impl Mount<'_> {
    /// What the mount had at `path` before this commit: at its last commit if that carried
    /// the path, else when it started.
    fn before(&self, path: &str) -> Option<Found> {
        if let Some(m) = self.last {
            if let Some(e) = resolve(m, path) {
                if e.kind != crate::manifest::Kind::Whiteout {
                    return Some((e.mode, e.uid, e.gid, xattrs_of(m, &e)));
                }
            }
        }
        found_at_mount(self.stack, path)
    }
}

fn found_at_mount(stack: &LayerStack, path: &str) -> Option<Found> {
    let mut ino = ROOT_INO;
    let mut attr = stack.getattr(ino).ok()?;
    if !path.is_empty() {
        for name in path.split('/') {
            attr = stack.lookup(ino, name.as_bytes()).ok()?;
            ino = attr.ino;
        }
    }
    let xattrs = stack.xattrs(ino).ok()?;
    Some((attr.mode & 0o7777, attr.uid, attr.gid, xattrs))
}

fn xattrs_of(m: &Manifest, e: &Entry<'_>) -> Vec<(Vec<u8>, Vec<u8>)> {
    m.xattrs(e)
        .into_iter()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect()
}

/// The layer `delta` (the commit's, as published) with the attributes newer commits gave to
/// paths it carries and its mount left unchanged; `None` when it needs none. `head`: the head
/// it is about to go on.
pub(super) async fn take_newer_attrs(
    store: &Arc<dyn Store>,
    mount: Mount<'_>,
    delta: Digest,
    head: &VolumeHead,
    loaded: &mut Loaded,
) -> FsResult<Option<Digest>> {
    let origin = mount.origin;
    // Paths whose attributes commits since the mount's start changed, its own included: a
    // layer is known by its digest, and another mount's may be the very bytes of one of ours
    // (or of this one); the merged view of a path only the mount changed is its own value.
    let (origin_chain, chain) = (expand(&origin.commits), expand(&head.commits));
    let since = match origin_chain.last() {
        None => &chain[..],
        Some(tip) => match chain.iter().rposition(|c| c.layer == tip.layer) {
            Some(i) => &chain[i + 1..],
            // Squashed past: the commit conflicts (see `clashes`), nothing to take.
            None => return Ok(None),
        },
    };
    let theirs: BTreeSet<&str> = since
        .iter()
        .flat_map(|c| c.attrs.iter().map(String::as_str))
        .collect();
    if theirs.is_empty() {
        return Ok(None);
    }
    // The layers since the mount started, newest first: the newest that carries a path
    // holds its attributes as the volume shows them now.
    let stop = origin.commits.last().map(|c| c.layer.as_str());
    let mut newer = Vec::new();
    for c in head.commits.iter().rev() {
        if Some(c.layer.as_str()) == stop {
            break;
        }
        newer.push(load(store, &c.layer, loaded).await?);
    }
    let delta = load(store, &delta.to_string(), loaded).await?;
    let delta = &delta.manifest;
    let mut overrides = HashMap::new();
    for path in theirs {
        let Some(ours) = resolve(delta, path) else {
            continue;
        };
        let Some((mode, uid, gid, xattrs)) = mount.before(path) else {
            continue; // new to the mount: its own
        };
        let Some((m, e)) = newer
            .iter()
            .find_map(|l| resolve(&l.manifest, path).map(|e| (&l.manifest, e)))
        else {
            continue;
        };
        if e.kind != ours.kind {
            continue; // replaced: a clash, found before this
        }
        let their_xattrs = xattrs_of(m, &e);
        let o = AttrsOverride {
            mode: (ours.mode == mode && e.mode != mode).then_some(e.mode),
            uid: (ours.uid == uid && e.uid != uid).then_some(e.uid),
            gid: (ours.gid == gid && e.gid != gid).then_some(e.gid),
            xattrs: (xattrs_of(delta, &ours) == xattrs && their_xattrs != xattrs)
                .then_some(their_xattrs),
        };
        if !o.is_empty() {
            overrides.insert(ours.index, o);
        }
    }
    if overrides.is_empty() {
        return Ok(None);
    }
    let bytes = crate::blocking::blocking(|| crate::squash::with_attrs(delta, &overrides))?;
    Ok(Some(crate::squash::store_manifest(store, &bytes).await?))
}
