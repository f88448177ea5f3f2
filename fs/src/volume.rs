//! Persistent volumes: `scope/name`, a chain of committed delta layers, named by a head object
//! `volumes/<scope>/<name>/head` (JSON) that moves only by compare-and-swap.
//!
//! A mount of a volume stacks the chain (bottom to top) on the mount's layers, with a fresh
//! upper above; committing publishes the upper's changes ([`MountTree::stage`]) as one
//! more delta layer and moves the head from the version the mount started from. Chunks are
//! content-addressed, so a commit uploads only chunks the store does not have: one changed
//! MiB of a large file costs about that MiB.
//!
//! Two mounts of a volume may commit one after the other. The later one finds the head moved:
//! if the commits made since its start touched none of its paths (a path, or one above or
//! below it; see [`clash`] for attribute-only changes), its layer goes on top of the newer
//! head (a rebase); otherwise its changes are kept as a conflict object `volumes/<scope>/<name>/conflicts/<id>` (its whole chain, and the
//! paths in conflict), and the commit fails naming those paths.

use crate::gc::lease::WriterLease;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use strata_cache_format::Digest;
use strata_store::{Store, StoreErrorKind, Version};

use crate::error::{FsError, FsResult};
use crate::layer::Layer;
use crate::publish::PublishReport;
use crate::refs::check_component;
use crate::upper::MountTree;

/// `scope/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRef {
    pub scope: String,
    pub name: String,
}

impl VolumeRef {
    pub fn parse(s: &str) -> FsResult<VolumeRef> {
        let (scope, name) = s.split_once('/').ok_or_else(|| {
            FsError::InvalidInput(format!("invalid volume {s:?}: expected SCOPE/NAME"))
        })?;
        check_component("volume scope", scope)?;
        check_component("volume name", name)?;
        Ok(VolumeRef {
            scope: scope.to_string(),
            name: name.to_string(),
        })
    }

    pub fn head_key(&self) -> String {
        format!("volumes/{}/{}/head", self.scope, self.name)
    }
}

impl std::fmt::Display for VolumeRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.scope, self.name)
    }
}

/// One commit of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// The delta layer it added (`blake3:<hex>`).
    pub layer: String,
    /// Seconds since the epoch.
    pub committed_at: u64,
    pub changes: u64,
    pub bytes_uploaded: u64,
    /// The paths it created, replaced or removed, or changed the bytes of: what a
    /// concurrent commit conflicts on.
    #[serde(default)]
    pub paths: Vec<String>,
    /// The paths whose attributes only it changed (mode, owner, times, xattrs; a directory
    /// whose entries changed is one too): a concurrent commit conflicts on them only where it
    /// replaced or removed them or a directory above them. Commits written before this field
    /// have none (their attribute-only changes of directories were not recorded at all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attrs: Vec<String>,
    /// For a squash: the commits it replaced, bottom to top (their own `squashed` left
    /// out), so that a mount started from one of them can still rebase onto it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub squashed: Vec<Commit>,
    /// The BLAKE3 of the upper's state it captured (`MountTree::fingerprint`): a commit tried
    /// again after its compare-and-swap reply was lost, or after a crash, recognizes itself
    /// on the head by it even when its layer came out different (packs are cut as uploads
    /// finish).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper: Option<String>,
    /// The layer as its mount published it, when `layer` is that layer with attributes that
    /// newer commits gave to paths it carries (see `volume::attrs`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<String>,
}

impl Commit {
    /// The layer its mount published: what the mount's next commit compares itself with.
    pub fn published(&self) -> &str {
        self.delta.as_deref().unwrap_or(&self.layer)
    }

    /// Whether it is one of the mount commits `own` (published layers).
    fn by(&self, own: &[String]) -> bool {
        own.iter()
            .any(|o| *o == self.layer || Some(o) == self.delta.as_ref())
    }

    /// Whether `other` on a head is this commit, landed.
    fn is(&self, other: &Commit) -> bool {
        other.layer == self.layer || (self.upper.is_some() && other.upper == self.upper)
    }
}

/// Commits a squash remembers: a mount that started before the last this many commits
/// gets a conflict (its changes kept) instead of a rebase.
const SQUASH_HISTORY: usize = 512;

/// A chain with its squashes opened up: the commits each one replaced.
pub(crate) fn expand(commits: &[Commit]) -> Vec<&Commit> {
    commits
        .iter()
        .flat_map(|c| {
            if c.squashed.is_empty() {
                std::slice::from_ref(c).iter()
            } else {
                c.squashed.iter()
            }
        })
        .collect()
}

/// Changes of a commit that lost a race on the same paths, kept instead of dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictRecord {
    pub id: String,
    /// Its whole chain, bottom to top: the head it started from, then its own layer. Mount it
    /// with a `--layer NAME@<digest>` per layer.
    pub layers: Vec<String>,
    /// The paths a newer commit also touched.
    pub paths: Vec<String>,
    pub committed_at: u64,
}

#[cfg(test)]
/// Whether `x` is strictly inside directory `y` ("" is the root).
fn inside(x: &str, y: &str) -> bool {
    if y.is_empty() {
        !x.is_empty()
    } else {
        x.len() > y.len() + 1 && x.starts_with(y) && x.as_bytes()[y.len()] == b'/'
    }
}

#[cfg(test)]
/// Whether a change at `p` in a stale commit conflicts with a change at `q` in a commit
/// that landed since (`*_attrs`: the change touched only attributes).
///
/// - Changes of the same path, or of one path inside the other, conflict.
/// - Except that an attribute-only change of a directory does not conflict with changes
///   inside it: adding and removing entries changes a directory's times and link count, and
///   two commits that only added files in one directory must rebase.
/// - Two attribute-only changes of one path do not conflict either: the later commit's
///   attributes win, as they would on a local disk.
///
/// So a path that the newer commits removed, replaced or changed the kind of conflicts with
/// any change to it (or inside it) in the stale commit, attribute-only ones included.
/// [`clashes`] applies this rule to whole commits at once; a test holds the two together.
fn clash(p: &str, p_attrs: bool, q: &str, q_attrs: bool) -> bool {
    if p_attrs && q_attrs {
        return false;
    }
    let collide = p == q || inside(p, q) || inside(q, p);
    collide && !(p_attrs && inside(q, p)) && !(q_attrs && inside(p, q))
}

/// A volume's conflict objects, oldest first.
pub async fn conflicts(store: &Arc<dyn Store>, v: &VolumeRef) -> FsResult<Vec<ConflictRecord>> {
    let prefix = format!("volumes/{}/{}/conflicts/", v.scope, v.name);
    let mut out = Vec::new();
    for key in store.list(&prefix).await? {
        let data = crate::record::get(store, &key).await?;
        let record: ConflictRecord = serde_json::from_slice(&data).map_err(|e| {
            FsError::InvalidInput(format!("{}: unreadable conflict {key:?}: {e}", store.url()))
        })?;
        out.push(record);
    }
    out.sort_by(|a, b| a.committed_at.cmp(&b.committed_at).then(a.id.cmp(&b.id)));
    Ok(out)
}

/// A volume upper that a daemon keeps because its commit failed (the store down, a daemon
/// crash, a bug): recorded in the store under `volumes/<scope>/<name>/kept/<id>` so that
/// `strata volume show` lists it from any host and a garbage collector keeps the layers it
/// was mounted on. The changes themselves stay on the host that keeps them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptRecord {
    /// `<host>-<directory name>`: unique per kept upper.
    pub id: String,
    pub host: String,
    /// Where the host keeps the upper.
    pub path: String,
    /// Seconds since the epoch of the first failed commit.
    pub since: u64,
    pub attempts: u32,
    pub last_error: String,
    /// Given up on after repeated failures: it waits for an operator.
    pub quarantined: bool,
    /// Every layer under the upper (`blake3:<hex>`, bottom to top): the datasets', then
    /// the volume's chain it started from.
    pub layers: Vec<String>,
}

fn kept_prefix(v: &VolumeRef) -> String {
    format!("volumes/{}/{}/kept/", v.scope, v.name)
}

/// Records (or updates) a kept upper of `v` in the store.
pub async fn put_kept(store: &Arc<dyn Store>, v: &VolumeRef, r: &KeptRecord) -> FsResult<()> {
    check_component("kept upper id", &r.id)?;
    let body = sealed(r);
    store
        .put(&format!("{}{}", kept_prefix(v), r.id), body)
        .await?;
    Ok(())
}

/// Removes the record of a kept upper that has been committed (or dropped).
pub async fn delete_kept(store: &Arc<dyn Store>, v: &VolumeRef, id: &str) -> FsResult<()> {
    store.delete(&format!("{}{id}", kept_prefix(v))).await?;
    Ok(())
}

/// The kept uppers of `v` that daemons recorded, oldest first. An unreadable record is
/// reported in its place rather than hiding the others.
pub async fn kept(store: &Arc<dyn Store>, v: &VolumeRef) -> FsResult<Vec<KeptRecord>> {
    let mut out = Vec::new();
    for key in store.list(&kept_prefix(v)).await? {
        let data = crate::record::get(store, &key).await?;
        let r = serde_json::from_slice(&data).unwrap_or_else(|e| KeptRecord {
            id: key.rsplit('/').next().unwrap_or_default().to_string(),
            host: String::new(),
            path: String::new(),
            since: 0,
            attempts: 0,
            last_error: format!("unreadable record {key:?}: {e}"),
            quarantined: false,
            layers: Vec::new(),
        });
        out.push(r);
    }
    out.sort_by(|a, b| a.since.cmp(&b.since).then(a.id.cmp(&b.id)));
    Ok(out)
}

/// What a volume's head object holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeHead {
    pub version: u32,
    /// The chain, bottom to top.
    pub commits: Vec<Commit>,
}

impl VolumeHead {
    /// The chain's layers, bottom to top.
    pub fn layers(&self) -> FsResult<Vec<Digest>> {
        self.commits
            .iter()
            .map(|c| Digest::parse(&c.layer).map_err(|e| FsError::InvalidInput(e.to_string())))
            .collect()
    }
}

/// A volume's head and the store version it was read at (`None`: the volume does not exist
/// yet, and its first commit creates it).
pub async fn read_head(
    store: &Arc<dyn Store>,
    v: &VolumeRef,
) -> FsResult<(VolumeHead, Option<Version>)> {
    let key = v.head_key();
    match crate::record::get_versioned(store, &key).await? {
        None => Ok((
            VolumeHead {
                version: 1,
                commits: Vec::new(),
            },
            None,
        )),
        Some((data, version)) => {
            let head: VolumeHead = serde_json::from_slice(&data).map_err(|e| {
                FsError::InvalidInput(format!(
                    "{}: volume {v} has an unreadable head {key:?}: {e}",
                    store.url()
                ))
            })?;
            if head.version != 1 {
                return Err(FsError::InvalidInput(format!(
                    "{}: volume {v}: unsupported head version {}",
                    store.url(),
                    head.version
                )));
            }
            Ok((head, Some(version)))
        }
    }
}

/// The result of a commit.
#[derive(Debug)]
pub struct Committed {
    /// `None` when there was nothing to commit, or it was kept as a conflict.
    pub commit: Option<Commit>,
    pub report: Option<PublishReport>,
    /// Set when a newer commit touched the same paths: the changes were kept as this
    /// conflict instead, and the head did not move.
    pub conflict: Option<ConflictRecord>,
    /// The head this commit wrote, and its store version: the base of the mount's next
    /// commit.
    pub head: Option<(VolumeHead, Version)>,
    /// The upper's state this commit captured ([`MountTree::fingerprint`]).
    pub upper: Option<String>,
    /// The commit landed on top of others that landed since the mount's base.
    pub rebased: bool,
}

impl Committed {
    fn nothing(upper: String) -> Committed {
        Committed {
            commit: None,
            report: None,
            conflict: None,
            head: None,
            upper: Some(upper),
            rebased: false,
        }
    }

    /// Kept as conflict `record`: the head did not move.
    fn conflicted(
        record: ConflictRecord,
        report: PublishReport,
        upper: Option<String>,
    ) -> Committed {
        Committed {
            commit: None,
            report: Some(report),
            conflict: Some(record),
            head: None,
            upper,
            rebased: false,
        }
    }
}

impl Committed {
    /// What a user is told about a conflict: the paths, and where the changes went.
    pub fn conflict_message(&self, v: &VolumeRef) -> Option<String> {
        self.conflict.as_ref().map(|c| {
            format!(
                "volume {v}: a newer commit changed the same paths ({}); this mount's changes \
                 are kept as conflict {} (see `strata volume show`)",
                c.paths.join(", "),
                c.id
            )
        })
    }
}

/// What a mount's earlier commits leave for its next one. Each commit of a mount carries all
/// the mount's changes since it was mounted, so the next one must be checked against every
/// commit that landed since the mount started (its own excepted), not only since its last
/// one: its earlier commits may have been rebased onto others' changes that the mount never
/// saw.
#[derive(Clone, Copy)]
pub struct Earlier<'a> {
    /// The head the mount started from.
    pub origin: &'a VolumeHead,
    /// The layers the mount's commits that landed published ([`Commit::published`]), oldest
    /// first.
    pub own: &'a [String],
    /// The manifest of the last of them: what it placed and the mount has removed since is
    /// committed as removed, and the attributes it carried are what the mount had then.
    pub last: &'a crate::manifest::Manifest,
}

/// The paths of `commit` that clash with commits in `head` that landed after `origin`, leaving
/// out the layers in `own`; all of them when what the mount committed on is gone from `head`
/// (see [`stands_on_gone_chain`]). Sets of their paths make it O(ours × depth × log theirs),
/// not ours × theirs: two commits of a million files each meet.
fn clashes(origin: &VolumeHead, own: &[String], head: &VolumeHead, commit: &Commit) -> Vec<String> {
    use std::collections::BTreeSet;
    let chain = expand(&head.commits);
    let ours = commit
        .paths
        .iter()
        .map(|p| (p, false))
        .chain(commit.attrs.iter().map(|p| (p, true)));
    let Some(since) = since_origin(origin, own, &chain) else {
        return ours.map(|(p, _)| p.clone()).collect();
    };
    let (mut structural, mut attrs) = (BTreeSet::new(), BTreeSet::new());
    for c in since.iter().filter(|c| !c.by(own)) {
        structural.extend(c.paths.iter().map(String::as_str));
        attrs.extend(c.attrs.iter().map(String::as_str));
    }
    if structural.is_empty() && attrs.is_empty() {
        return Vec::new();
    }
    // Whether a set holds a path strictly inside `p`.
    let holds_inside = |set: &BTreeSet<&str>, p: &str| {
        if p.is_empty() {
            return set.iter().any(|q| !q.is_empty());
        }
        let from = format!("{p}/");
        set.range(from.as_str()..)
            .next()
            .is_some_and(|q| q.starts_with(&from))
    };
    ours.filter(|&(p, p_attrs)| {
        // The same path: a clash unless both changed attributes only.
        let same = structural.contains(p.as_str()) || (!p_attrs && attrs.contains(p.as_str()));
        // A directory above `p` that they removed or replaced (their attribute-only change
        // of a directory is no clash with changes inside it).
        let above = (!p.is_empty() && structural.contains(""))
            || p.match_indices('/')
                .any(|(i, _)| structural.contains(&p[..i]));
        // Their changes inside `p`, unless ours is attribute-only.
        let inside = !p_attrs && (holds_inside(&structural, p) || holds_inside(&attrs, p));
        same || above || inside
    })
    .map(|(p, _)| p.clone())
    .collect()
}

/// Publishes `tree`'s changes as a delta layer and moves the head of `v` from `base` (the head
/// version the mount's last commit wrote, or the one it started from) to a chain with that
/// layer on top, rebasing onto a newer head when the commits since touched other paths. When
/// they touched the same ones, the changes are kept as a conflict (see
/// [`Committed::conflict`]). `earlier`: what the mount committed before, if anything.
pub async fn commit(
    store: &Arc<dyn Store>,
    v: &VolumeRef,
    tree: &MountTree,
    base: (&VolumeHead, Option<&Version>),
    earlier: Option<Earlier<'_>>,
) -> FsResult<Committed> {
    commit_since(store, v, tree, base, earlier, None).await
}

/// [`commit`] of a mount whose last commit captured the upper state `last` (its
/// [`Committed::upper`]): nothing is done when the upper is still in that state.
pub async fn commit_since(
    store: &Arc<dyn Store>,
    v: &VolumeRef,
    tree: &MountTree,
    base: (&VolumeHead, Option<&Version>),
    earlier: Option<Earlier<'_>>,
    last: Option<&str>,
) -> FsResult<Committed> {
    // Held from before the delta reuses any chunk until the head has moved: garbage
    // collection waits for it (see `gc::lease`).
    let lease = WriterLease::acquire(store, "commit").await?;
    let committed = commit_leased(store, v, tree, base, earlier, last, &lease).await;
    lease.release().await;
    committed
}

async fn commit_leased(
    store: &Arc<dyn Store>,
    v: &VolumeRef,
    tree: &MountTree,
    base: (&VolumeHead, Option<&Version>),
    earlier: Option<Earlier<'_>>,
    last: Option<&str>,
    lease: &WriterLease,
) -> FsResult<Committed> {
    // One moment of the mount: changes wait until it is captured, journaled (a crash after
    // this commit must not recommit an older state on top of it) and its bytes uploaded.
    let held = tree.hold_changes().await;
    let captured = crate::blocking::blocking(|| -> FsResult<_> {
        tree.save_journal()?;
        let fingerprint = tree.fingerprint()?.to_hex().to_string();
        if last == Some(fingerprint.as_str()) {
            return Ok((fingerprint, Vec::new()));
        }
        let changed = match &earlier {
            Some(e) => tree.with_removals_since(e.last, tree.changes()?)?,
            None => tree.changes()?,
        };
        Ok((fingerprint, changed))
    })?;
    let (fingerprint, changed) = captured;
    if changed.is_empty() {
        return Ok(Committed::nothing(fingerprint));
    }
    let (mut paths, mut attrs) = (Vec::new(), Vec::new());
    for c in &changed {
        let path = String::from_utf8_lossy(c.path()).into_owned();
        match c {
            // Bytes untouched: a directory's or symlink's attributes, or a layer file's.
            crate::upper::Change::Changed { ino, .. } if tree.reads_from_layers(*ino) => {
                attrs.push(path)
            }
            crate::upper::Change::Changed { ino, .. }
                if tree
                    .getattr(*ino)
                    .is_ok_and(|s| s.kind != crate::upper::NodeKind::File) =>
            {
                attrs.push(path)
            }
            _ => paths.push(path),
        }
    }
    let (report, changes, layer) = crate::delta::publish_changes(store, tree, &changed).await?;
    drop(held);
    let commit = Commit {
        layer: layer.to_string(),
        committed_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        changes: changes as u64,
        bytes_uploaded: report.bytes_uploaded,
        paths,
        attrs,
        squashed: Vec::new(),
        upper: Some(fingerprint),
        delta: None,
    };
    let (base_head, base_version) = base;
    let (origin, own) = match earlier {
        Some(e) => (e.origin, e.own),
        None => (base_head, &[][..]),
    };
    let mut head = base_head.clone();
    let mut version = base_version.cloned();
    let mut loaded = attrs::Loaded::new();
    // A few rounds: each lost race re-reads the head and rebases when it may.
    for round in 0..8 {
        // A compare-and-swap whose reply was lost, or a crash between it and the mount's
        // record: this very layer is on the head already. It landed; it is no conflict.
        if round > 0 {
            // Only after the tip this commit started from: the same layer further down is
            // an earlier commit's (the same changes made again), not this one.
            let chain = expand(&head.commits);
            let after_base = match expand(&base_head.commits).last() {
                None => &chain[..],
                Some(tip) => chain
                    .iter()
                    .rposition(|c| c.layer == tip.layer)
                    .map_or(&chain[..0], |i| &chain[i + 1..]),
            };
            if let Some(at) = after_base.iter().position(|c| commit.is(c)) {
                let landed: Commit = after_base[at].clone();
                if let Some(version) = version.clone() {
                    return Ok(Committed {
                        commit: Some(landed),
                        report: Some(report),
                        conflict: None,
                        head: Some((head, version)),
                        upper: commit.upper,
                        rebased: at > 0,
                    });
                }
            }
        }
        let conflict = |paths: Vec<String>| ConflictRecord {
            id: format!("{}-{}", commit.committed_at, &layer.to_hex()[..12]),
            layers: base_head
                .commits
                .iter()
                .map(|c| c.layer.clone())
                .chain([commit.layer.clone()])
                .collect(),
            paths,
            committed_at: commit.committed_at,
        };
        let clashing = clashes(origin, own, &head, &commit);
        if !clashing.is_empty() {
            let mut record = conflict(clashing);
            // The chain it committed on may be a removed volume's, collected since.
            if stands_on_gone_chain(origin, own, &head) {
                keep_present_layers(store, &mut record).await?;
            }
            put_conflict(store, v, lease, &record).await?;
            return Ok(Committed::conflicted(record, report, commit.upper));
        }
        // Attribute changes that landed since the mount started stay where it changed
        // nothing (see `attrs`): the layer that goes on top may be a rewritten one.
        let mut placed = commit.clone();
        let newer_attrs = attrs::take_newer_attrs(
            store,
            attrs::Mount {
                stack: tree.stack(),
                origin,
                last: earlier.map(|e| e.last),
            },
            layer,
            &head,
            &mut loaded,
        )
        .await;
        let newer_attrs = match newer_attrs {
            Ok(r) => r,
            // The first round stands on the head as the mount last saw it: a layer it names
            // may be gone since (a squash replaced it, then garbage collection took it), and
            // then the head has moved on: read it again.
            Err(FsError::NotFound(why)) => {
                let (newer, newer_version) = read_head(store, v).await?;
                if newer_version.is_none() {
                    return Err(FsError::NotFound(why));
                }
                if newer_version == version {
                    // A layer of the head as it stands is gone from the store (damage, or
                    // deleted by hand: collection keeps every layer a head names), so this
                    // commit cannot be rebased onto it. Its changes are kept as a conflict
                    // rather than lost, or stuck in retries.
                    tracing::warn!(
                        "volume {v}: cannot rebase onto the head ({why}); keeping its changes as a conflict"
                    );
                    let mut record =
                        conflict(commit.paths.iter().chain(&commit.attrs).cloned().collect());
                    keep_present_layers(store, &mut record).await?;
                    put_conflict(store, v, lease, &record).await?;
                    return Ok(Committed::conflicted(record, report, commit.upper));
                }
                (head, version) = (newer, newer_version);
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Some(rewritten) = newer_attrs {
            placed.layer = rewritten.to_string();
            placed.delta = Some(commit.layer.clone());
        }
        let mut next = head.clone();
        next.commits.push(placed.clone());
        let body = sealed(&next);
        lease.ensure_held().await?;
        match store
            .compare_and_swap(&v.head_key(), version.as_ref(), body)
            .await
        {
            Ok(written) => {
                let upper = commit.upper.clone();
                return Ok(Committed {
                    commit: Some(placed),
                    report: Some(report),
                    conflict: None,
                    head: Some((next, written)),
                    upper,
                    rebased: version.as_ref() != base_version,
                });
            }
            Err(e) if e.kind == StoreErrorKind::Conflict => {}
            // The write may have landed with its reply lost: the next round finds out.
            Err(e) => match read_head(store, v).await {
                Ok((newer, newer_version))
                    if expand(&newer.commits).iter().any(|c| commit.is(c)) =>
                {
                    (head, version) = (newer, newer_version);
                    continue;
                }
                _ => return Err(e.into()),
            },
        }
        (head, version) = read_head(store, v).await?;
    }
    Err(FsError::Conflict(format!(
        "volume {v}: the head kept moving while committing; the changes are in layer {layer}"
    )))
}

/// Writes a conflict record, a root like a head: it must not name what a collection may
/// have swept meanwhile (see FORMAT §9).
async fn put_conflict(
    store: &Arc<dyn Store>,
    v: &VolumeRef,
    lease: &WriterLease,
    record: &ConflictRecord,
) -> FsResult<()> {
    let key = format!("volumes/{}/{}/conflicts/{}", v.scope, v.name, record.id);
    let body = sealed(record);
    lease.ensure_held().await?;
    store.put(&key, body).await?;
    Ok(())
}

/// Squashes the chain of `v` into one layer when it has more than one commit (see
/// [`crate::squash`]): nothing but a manifest is uploaded. Returns the new head and its
/// version; `None` when there was nothing to squash, or a commit landed meanwhile (the next
/// squash will do).
pub async fn squash(
    store: &Arc<dyn Store>,
    v: &VolumeRef,
    cache_dir: Option<&std::path::Path>,
) -> FsResult<Option<(VolumeHead, Version)>> {
    let lease = WriterLease::acquire(store, "squash").await?;
    let squashed = squash_leased(store, v, cache_dir, &lease).await;
    lease.release().await;
    squashed
}

async fn squash_leased(
    store: &Arc<dyn Store>,
    v: &VolumeRef,
    cache_dir: Option<&std::path::Path>,
    lease: &WriterLease,
) -> FsResult<Option<(VolumeHead, Version)>> {
    let (head, version) = read_head(store, v).await?;
    let Some(version) = version.filter(|_| head.commits.len() > 1) else {
        return Ok(None);
    };
    let mut chain = Vec::new();
    for d in head.layers()? {
        chain.push(Layer::load(store, d, cache_dir).await?);
    }
    let (layer, manifest_bytes) = crate::squash::squash(store, &chain).await?;
    let mut paths: Vec<String> = head.commits.iter().flat_map(|c| c.paths.clone()).collect();
    paths.sort();
    paths.dedup();
    let mut attrs: Vec<String> = head.commits.iter().flat_map(|c| c.attrs.clone()).collect();
    attrs.sort();
    attrs.dedup();
    attrs.retain(|a| paths.binary_search(a).is_err());
    let squashed = Commit {
        layer: layer.to_string(),
        committed_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        changes: head.commits.iter().map(|c| c.changes).sum(),
        bytes_uploaded: manifest_bytes,
        paths,
        attrs,
        // Every commit it stands for (older squashes opened up), so that mounts started from
        // any of them can still rebase; the oldest are let go past a bound.
        squashed: {
            let all = expand(&head.commits);
            all[all.len().saturating_sub(SQUASH_HISTORY)..]
                .iter()
                .map(|c| Commit {
                    squashed: Vec::new(),
                    ..(*c).clone()
                })
                .collect()
        },
        upper: None,
        delta: None,
    };
    let next = VolumeHead {
        version: 1,
        commits: vec![squashed],
    };
    let body = sealed(&next);
    lease.ensure_held().await?;
    match store
        .compare_and_swap(&v.head_key(), Some(&version), body)
        .await
    {
        Ok(written) => Ok(Some((next, written))),
        Err(e) if e.kind == StoreErrorKind::Conflict => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The commits of `chain` (a head, expanded) that landed after the head a mount started from,
/// `origin`; `None` when what the mount committed on is gone from it (see
/// [`stands_on_gone_chain`]).
fn since_origin<'c>(
    origin: &VolumeHead,
    own: &[String],
    chain: &'c [&'c Commit],
) -> Option<&'c [&'c Commit]> {
    // A mount that started on an empty volume and has committed since stands on its own
    // commits: none of them on the head means they were removed.
    if !own.is_empty() && !chain.iter().any(|c| c.by(own)) {
        return None;
    }
    match expand(&origin.commits).last() {
        None => Some(chain),
        Some(tip) => chain
            .iter()
            .rposition(|c| c.layer == tip.layer)
            .map(|i| &chain[i + 1..]),
    }
}

/// Whether what a mount committed on is gone from `head`: the tip it started from (the volume
/// was removed, or squashed past what a squash remembers), or, for a mount that started on an
/// empty volume and committed since, every commit of its own.
fn stands_on_gone_chain(origin: &VolumeHead, own: &[String], head: &VolumeHead) -> bool {
    since_origin(origin, own, &expand(&head.commits)).is_none()
}

/// A record object's bytes: `value` as JSON in a checksummed envelope.
fn sealed<T: Serialize>(value: &T) -> bytes::Bytes {
    crate::record::seal(&serde_json::to_vec_pretty(value).expect("serializable"))
}

/// Leaves out of a conflict record the layers no longer in the store (a removed volume's,
/// collected since; damage): a record naming a missing layer would stop every collection. Its
/// own layer is there (the commit's lease keeps it until the record is written).
async fn keep_present_layers(store: &Arc<dyn Store>, record: &mut ConflictRecord) -> FsResult<()> {
    let mut present = Vec::new();
    for l in record.layers.drain(..) {
        let key = format!("layers/{}", l.trim_start_matches("blake3:"));
        if store.head(&key).await?.is_some() {
            present.push(l);
        } else {
            tracing::warn!(layer = %l, "a conflict's chain names a layer gone from the store");
        }
    }
    record.layers = present;
    Ok(())
}

/// Removes volume `v`: its head becomes an empty chain, as for a volume never committed to,
/// by compare-and-swap on the head as read here. A commit (or squash) that lands first makes
/// the removal fail and removes nothing (run it again to remove that commit too); a commit that
/// lands after finds the chain it stands on gone and is kept as a conflict, which `volume show`
/// lists, so no commit disappears unseen. Layers stay in the store for garbage collection.
/// Returns how many commits the head had; `NotFound` when it had none.
pub async fn remove(store: &Arc<dyn Store>, v: &VolumeRef) -> FsResult<usize> {
    let (head, version) = read_head(store, v).await?;
    remove_read(store, v, &head, version).await
}

/// [`remove`] of the head `head`, read at `version`.
async fn remove_read(
    store: &Arc<dyn Store>,
    v: &VolumeRef,
    head: &VolumeHead,
    version: Option<Version>,
) -> FsResult<usize> {
    let Some(version) = version.filter(|_| !head.commits.is_empty()) else {
        return Err(FsError::NotFound(format!(
            "no volume {v} in {}",
            store.url()
        )));
    };
    let empty = VolumeHead {
        version: 1,
        commits: Vec::new(),
    };
    let body = sealed(&empty);
    match store
        .compare_and_swap(&v.head_key(), Some(&version), body)
        .await
    {
        Ok(_) => Ok(head.commits.len()),
        Err(e) if e.kind == StoreErrorKind::Conflict => {
            // A retried write whose first try landed (its reply lost) finds its own work.
            if read_head(store, v).await?.0.commits.is_empty() {
                return Ok(head.commits.len());
            }
            Err(FsError::Conflict(format!(
                "volume {v} changed meanwhile (a commit or a squash landed); nothing was \
                 removed: run the removal again to remove that too"
            )))
        }
        Err(e) => Err(e.into()),
    }
}

mod attrs;
pub mod lifecycle;
#[cfg(test)]
mod model_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::Layer;
    use crate::stack::tests::{stack_of, write};
    use crate::stack::{LayerStack, ROOT_INO};
    use crate::upper::{Caller, SetAttr, UpperConfig};

    /// A mount over `base`'s layer and `chain`, with a journaled upper in `dir`.
    async fn mount_chain(
        base: &LayerStack,
        chain: Vec<Digest>,
        dir: std::path::PathBuf,
    ) -> MountTree {
        let store = base.cache().store();
        let mut layers = vec![Layer::load(store, base.layers()[0].digest, None)
            .await
            .unwrap()];
        for d in chain {
            layers.push(Layer::load(store, d, None).await.unwrap());
        }
        let upper = UpperConfig {
            dir,
            quota: None,
            inodes: None,
            journal: true,
        };
        MountTree::new(
            Arc::new(LayerStack::new(layers, base.cache().clone()).unwrap()),
            Some(upper),
        )
        .unwrap()
    }

    #[test]
    fn volume_names_are_checked() {
        assert_eq!(
            VolumeRef::parse("fn-1/cache").unwrap().head_key(),
            "volumes/fn-1/cache/head"
        );
        for bad in ["nocolon", "a/", "/b", "a/b/c", "a/../b", "a/.hidden"] {
            assert!(VolumeRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_collide_when_one_holds_the_other() {
        let structural = |a, b| clash(a, false, b, false);
        assert!(structural("a", "a"));
        assert!(structural("a/b", "a"));
        assert!(structural("a", "a/b/c"));
        assert!(structural("", "x"));
        assert!(!structural("a/b", "a/c"));
        assert!(!structural("ab", "a"));
    }

    #[test]
    fn clashes_of_whole_commits_follow_the_rule_for_pairs() {
        let seed = strata_testkit::rng::seed_from_env("STRATA_CLASH_SEED", 20_261_204);
        println!("seed {seed} (replay: STRATA_CLASH_SEED={seed}; STRATA_CLASH_SEED=random hunts)");
        let mut rng = strata_testkit::rng::SplitMix64::new(seed);
        let mut next = |n: u64| rng.next_u64() % n;
        let names = ["a", "b", "ab", "a-b"];
        let path = |next: &mut dyn FnMut(u64) -> u64| {
            let depth = next(4);
            (0..depth)
                .map(|_| names[next(names.len() as u64) as usize])
                .collect::<Vec<_>>()
                .join("/")
        };
        let commit_of = |paths: Vec<String>, attrs: Vec<String>| Commit {
            layer: format!("blake3:{}", paths.len() + attrs.len()),
            committed_at: 0,
            changes: 0,
            bytes_uploaded: 0,
            paths,
            attrs,
            squashed: Vec::new(),
            upper: None,
            delta: None,
        };
        let empty = VolumeHead {
            version: 1,
            commits: Vec::new(),
        };
        for case in 0..2000 {
            let mut set = |n: u64| (0..next(n)).map(|_| path(&mut next)).collect::<Vec<_>>();
            let (ours_p, ours_a, theirs_p, theirs_a) = (set(4), set(4), set(4), set(4));
            let theirs = commit_of(theirs_p.clone(), theirs_a.clone());
            let ours = commit_of(ours_p.clone(), ours_a.clone());
            let head = VolumeHead {
                version: 1,
                commits: vec![theirs],
            };
            let got = clashes(&empty, &[], &head, &ours);
            let want: Vec<String> = ours_p
                .iter()
                .map(|p| (p, false))
                .chain(ours_a.iter().map(|p| (p, true)))
                .filter(|&(p, pa)| {
                    theirs_p
                        .iter()
                        .map(|q| (q, false))
                        .chain(theirs_a.iter().map(|q| (q, true)))
                        .any(|(q, qa)| clash(p, pa, q, qa))
                })
                .map(|(p, _)| p.clone())
                .collect();
            assert_eq!(
                got, want,
                "seed {seed} case {case}: ours {ours_p:?} attrs {ours_a:?}, theirs {theirs_p:?} attrs {theirs_a:?}"
            );
        }
    }

    #[test]
    fn attribute_only_changes_conflict_where_the_path_was_replaced() {
        // A chmod of d against a newer removal or replacement of d (or of a directory above).
        assert!(clash("d", true, "d", false));
        assert!(clash("a/d", true, "a", false));
        assert!(clash("d", false, "d", true));
        assert!(clash("d", false, "d/x", true));
        // Entries added inside a directory whose attributes the other side changed: a rebase.
        assert!(!clash("d", true, "d/x", false));
        assert!(!clash("d/x", false, "d", true));
        assert!(!clash("", true, "x", false));
        // Both changed only attributes: the later commit's win.
        assert!(!clash("d", true, "d", true));
        assert!(!clash("d", true, "d/x", true));
    }

    /// The case: one mount restricts a directory (chmod 700, an xattr), another
    /// adds a file deep inside it from the same head. Whichever lands second, the directory
    /// stays restricted and the file is there; a mode the rebasing mount changed itself wins.
    #[tokio::test]
    async fn a_rebased_commit_keeps_newer_attribute_changes_it_did_not_make() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "base/d/sub/old.txt", b"old\n");
        let base = stack_of(tmp.path(), &["base"]).await;
        let store = base.cache().store().clone();
        let caller = Caller { uid: 0, gid: 0 };
        for (case, restrict_first) in [(0, true), (1, false)] {
            let v = VolumeRef::parse(&format!("fn/attrs{case}")).unwrap();
            let (head0, _) = read_head(&store, &v).await.unwrap();
            let dir = |n: &str| tmp.path().join(format!("{n}{case}"));
            let a = mount_chain(&base, Vec::new(), dir("a")).await;
            let b = mount_chain(&base, Vec::new(), dir("b")).await;
            let d = a.lookup(ROOT_INO, b"d").unwrap();
            let chmod = SetAttr {
                mode: Some(0o700),
                ..Default::default()
            };
            a.setattr(d.ino, chmod).await.unwrap();
            a.setxattr(d.ino, b"user.policy", b"private", 0).unwrap();
            let bd = b.lookup(ROOT_INO, b"d").unwrap();
            let sub = b.lookup(bd.ino, b"sub").unwrap();
            let f = b.create(sub.ino, b"new.txt", 0o644, caller).unwrap();
            b.release(f.ino);
            // And a file whose mode both change: the later commit's wins.
            let old_a = a.lookup(a.lookup(d.ino, b"sub").unwrap().ino, b"old.txt");
            let old_b = b.lookup(sub.ino, b"old.txt").unwrap();
            let mode = |m| SetAttr {
                mode: Some(m),
                ..Default::default()
            };
            a.setattr(old_a.unwrap().ino, mode(0o600)).await.unwrap();
            b.setattr(old_b.ino, mode(0o640)).await.unwrap();
            let (first, second) = if restrict_first { (&a, &b) } else { (&b, &a) };
            let c1 = commit(&store, &v, first, (&head0, None), None)
                .await
                .unwrap();
            assert!(c1.commit.is_some());
            let c2 = commit(&store, &v, second, (&head0, None), None)
                .await
                .unwrap();
            assert!(c2.conflict.is_none(), "case {case}: {:?}", c2.conflict);
            let (head, _) = read_head(&store, &v).await.unwrap();
            let after = mount_chain(&base, head.layers().unwrap(), dir("after")).await;
            let d = after.lookup(ROOT_INO, b"d").unwrap();
            assert_eq!(d.perm, 0o700, "case {case}: the chmod of d was undone");
            assert_eq!(
                after.getxattr(d.ino, b"user.policy").unwrap().as_deref(),
                Some(&b"private"[..]),
                "case {case}: the xattr of d was dropped"
            );
            let sub = after.lookup(d.ino, b"sub").unwrap();
            assert!(after.lookup(sub.ino, b"new.txt").is_ok(), "case {case}");
            let old = after.lookup(sub.ino, b"old.txt").unwrap();
            let later = if restrict_first { 0o640 } else { 0o600 };
            assert_eq!(old.perm, later, "case {case}: the later chmod wins");
        }
    }

    #[tokio::test]
    async fn a_second_commit_of_a_mount_keeps_what_it_undid_undone() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "base/data.txt", b"base\n");
        let base = stack_of(tmp.path(), &["base"]).await;
        let store = base.cache().store().clone();
        let v = VolumeRef::parse("fn/twice").unwrap();
        let (head0, _) = read_head(&store, &v).await.unwrap();
        let t = mount_chain(&base, Vec::new(), tmp.path().join("upper")).await;
        let caller = Caller { uid: 0, gid: 0 };
        // First commit: a new file, a new directory with a file, a layer file renamed.
        let f = t.create(ROOT_INO, b"tmp.txt", 0o644, caller).unwrap();
        t.release(f.ino);
        let dir = t.mkdir(ROOT_INO, b"dir", 0o755, caller).unwrap();
        let inner = t.create(dir.ino, b"inner", 0o644, caller).unwrap();
        t.release(inner.ino);
        t.rename(ROOT_INO, b"data.txt", ROOT_INO, b"renamed.txt", 0)
            .unwrap();
        let c1 = commit(&store, &v, &t, (&head0, None), None).await.unwrap();
        let (c1, (head1, version1)) = (c1.commit.unwrap(), c1.head.unwrap());
        // Then all of it undone, and committed again on top of the first commit.
        t.unlink(ROOT_INO, b"tmp.txt").unwrap();
        t.unlink(dir.ino, b"inner").unwrap();
        t.rename(ROOT_INO, b"renamed.txt", ROOT_INO, b"data.txt", 0)
            .unwrap();
        let last = Layer::load(&store, Digest::parse(&c1.layer).unwrap(), None)
            .await
            .unwrap();
        let own = [c1.layer.clone()];
        let earlier = Earlier {
            origin: &head0,
            own: &own,
            last: &last.manifest,
        };
        let c2 = commit(&store, &v, &t, (&head1, Some(&version1)), Some(earlier))
            .await
            .unwrap();
        assert!(c2.conflict.is_none(), "its own commit is no conflict");
        let (head2, _) = read_head(&store, &v).await.unwrap();
        assert_eq!(head2.commits.len(), 2);
        // The volume shows what the mount shows: the removals stay removed, and the layer
        // file is back under its name with its bytes.
        let after = mount_chain(&base, head2.layers().unwrap(), tmp.path().join("u2")).await;
        assert!(
            after.lookup(ROOT_INO, b"tmp.txt").is_err(),
            "a removed file came back"
        );
        assert!(after.lookup(ROOT_INO, b"renamed.txt").is_err());
        let dir = after.lookup(ROOT_INO, b"dir").unwrap();
        assert!(
            after.readdir(dir.ino).unwrap().is_empty(),
            "dir/inner came back"
        );
        let data = after.lookup(ROOT_INO, b"data.txt").unwrap();
        assert_eq!(&after.read(data.ino, 0, 100).await.unwrap()[..], b"base\n");
    }

    #[tokio::test]
    async fn commits_chain_up_rebase_when_disjoint_and_keep_conflicts() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "base/data.txt", b"base\n");
        let base = stack_of(tmp.path(), &["base"]).await;
        let store = base.cache().store().clone();
        let v = VolumeRef::parse("fn/state").unwrap();
        // A mount: the base layer, the volume's chain, and an upper in `upper`.
        let mount =
            |chain: Vec<Digest>, upper: &str| mount_chain(&base, chain, tmp.path().join(upper));

        // First mount: nothing yet; write a file and commit.
        let (head0, version0) = read_head(&store, &v).await.unwrap();
        assert!(head0.commits.is_empty() && version0.is_none());
        let t = mount(Vec::new(), "upper1").await;
        let caller = Caller { uid: 0, gid: 0 };
        let f = t.create(ROOT_INO, b"model.ckpt", 0o644, caller).unwrap();
        t.open(f.ino, true).unwrap();
        t.write(f.ino, 0, b"epoch 1").await.unwrap();
        t.release(f.ino);
        let c = commit(&store, &v, &t, (&head0, None), None).await.unwrap();
        assert!(c.commit.is_some());

        // Second mount: base + chain shows the commit.
        let (head1, version1) = read_head(&store, &v).await.unwrap();
        assert_eq!(head1.commits.len(), 1);
        let t2 = mount(head1.layers().unwrap(), "upper2").await;
        let got = t2.lookup(ROOT_INO, b"model.ckpt").unwrap();
        assert_eq!(&t2.read(got.ino, 0, 100).await.unwrap()[..], b"epoch 1");
        assert!(t2.lookup(ROOT_INO, b"data.txt").is_ok());
        // Nothing changed: nothing to commit.
        let none = commit(&store, &v, &t2, (&head1, version1.as_ref()), None)
            .await
            .unwrap();
        assert!(none.commit.is_none());

        // A mount that started before the first commit, touching other paths: rebased.
        let t3 = mount(Vec::new(), "upper3").await;
        t3.mkdir(ROOT_INO, b"other", 0o755, caller).unwrap();
        commit(&store, &v, &t3, (&head0, None), None).await.unwrap();
        let (head2, _) = read_head(&store, &v).await.unwrap();
        assert_eq!(head2.commits.len(), 2);
        assert_eq!(head2.commits[0], head1.commits[0]);
        let t4 = mount(head2.layers().unwrap(), "upper4").await;
        assert!(t4.lookup(ROOT_INO, b"model.ckpt").is_ok());
        assert!(t4.lookup(ROOT_INO, b"other").is_ok());

        // Another one writing the same file: a conflict, kept and listed, the head unmoved.
        let t5 = mount(Vec::new(), "upper5").await;
        let f = t5.create(ROOT_INO, b"model.ckpt", 0o644, caller).unwrap();
        t5.open(f.ino, true).unwrap();
        t5.write(f.ino, 0, b"epoch 9").await.unwrap();
        t5.release(f.ino);
        let lost = commit(&store, &v, &t5, (&head0, None), None).await.unwrap();
        assert!(lost.commit.is_none());
        let message = lost.conflict_message(&v).unwrap();
        assert!(message.contains("model.ckpt"), "{message}");
        assert_eq!(read_head(&store, &v).await.unwrap().0, head2);
        let kept = conflicts(&store, &v).await.unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].paths, ["model.ckpt"]);
        // The kept chain shows that mount's file.
        let chain: Vec<Digest> = kept[0]
            .layers
            .iter()
            .map(|l| Digest::parse(l).unwrap())
            .collect();
        let t6 = mount(chain, "upper6").await;
        let got = t6.lookup(ROOT_INO, b"model.ckpt").unwrap();
        assert_eq!(&t6.read(got.ino, 0, 100).await.unwrap()[..], b"epoch 9");
    }

    /// A layer of the head gone from the store (damaged, deleted by hand): a commit that must
    /// rebase onto it keeps its changes as a conflict instead of failing for ever.
    #[tokio::test]
    async fn a_commit_that_cannot_read_what_landed_before_it_keeps_a_conflict() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "base/d/old.txt", b"old\n");
        let base = stack_of(tmp.path(), &["base"]).await;
        let store = base.cache().store().clone();
        let caller = Caller { uid: 0, gid: 0 };
        let v = VolumeRef::parse("fn/damaged").unwrap();
        let (head0, _) = read_head(&store, &v).await.unwrap();
        let a = mount_chain(&base, Vec::new(), tmp.path().join("a")).await;
        let b = mount_chain(&base, Vec::new(), tmp.path().join("b")).await;
        // `a` changes the attributes of d: a later commit must read its layer to rebase.
        let d = a.lookup(ROOT_INO, b"d").unwrap();
        let chmod = SetAttr {
            mode: Some(0o700),
            ..Default::default()
        };
        a.setattr(d.ino, chmod).await.unwrap();
        let first = commit(&store, &v, &a, (&head0, None), None).await.unwrap();
        let layer = first.commit.unwrap().layer;
        store
            .delete(&format!("layers/{}", &layer["blake3:".len()..]))
            .await
            .unwrap();
        let f = b.create(ROOT_INO, b"new.txt", 0o644, caller).unwrap();
        b.release(f.ino);
        let bd = b.lookup(ROOT_INO, b"d").unwrap();
        let g = b.create(bd.ino, b"inner.txt", 0o644, caller).unwrap();
        b.release(g.ino);
        let second = commit(&store, &v, &b, (&head0, None), None).await.unwrap();
        let kept = second.conflict.expect("kept as a conflict");
        assert!(second.commit.is_none());
        assert!(kept.paths.iter().any(|p| p == "new.txt"), "{kept:?}");
        assert!(conflicts(&store, &v)
            .await
            .unwrap()
            .iter()
            .any(|c| c.id == kept.id));
        let (head, _) = read_head(&store, &v).await.unwrap();
        assert_eq!(head.commits.len(), 1, "the head did not move");
    }

    /// Removing a volume never hides a commit: one that lands between the removal's read and
    /// its swap makes the removal fail (nothing removed), and one from a mount of the removed
    /// chain is kept as a conflict. A mount after the removal starts from nothing.
    #[tokio::test]
    async fn a_removal_racing_commits_loses_none_of_them() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "base/data.txt", b"base\n");
        let base = stack_of(tmp.path(), &["base"]).await;
        let store = base.cache().store().clone();
        let v = VolumeRef::parse("fn/removed").unwrap();
        async fn write_file(t: &MountTree, name: &str, bytes: &[u8]) {
            let caller = Caller { uid: 0, gid: 0 };
            let f = t.create(ROOT_INO, name.as_bytes(), 0o644, caller).unwrap();
            t.open(f.ino, true).unwrap();
            t.write(f.ino, 0, bytes).await.unwrap();
            t.release(f.ino);
        }
        assert!(matches!(
            remove(&store, &v).await,
            Err(FsError::NotFound(m)) if m.contains("no volume fn/removed")
        ));
        let (head0, _) = read_head(&store, &v).await.unwrap();
        let a = mount_chain(&base, Vec::new(), tmp.path().join("a")).await;
        write_file(&a, "one.txt", b"one").await;
        commit(&store, &v, &a, (&head0, None), None).await.unwrap();
        let (head1, version1) = read_head(&store, &v).await.unwrap();

        // The removal has read the head; a commit lands before it swaps: nothing is removed.
        let b = mount_chain(&base, head1.layers().unwrap(), tmp.path().join("b")).await;
        write_file(&b, "two.txt", b"two").await;
        let landed = commit(&store, &v, &b, (&head1, version1.as_ref()), None)
            .await
            .unwrap();
        assert!(landed.commit.is_some());
        let raced = remove_read(&store, &v, &head1, version1.clone()).await;
        assert!(matches!(raced, Err(FsError::Conflict(_))), "{raced:?}");
        let (head2, version2) = read_head(&store, &v).await.unwrap();
        assert_eq!(head2.commits.len(), 2, "the removal removed nothing");

        // Run again, it removes both commits; a mount of the old chain then commits: kept.
        let c = mount_chain(&base, head2.layers().unwrap(), tmp.path().join("c")).await;
        assert_eq!(remove(&store, &v).await.unwrap(), 2);
        let (gone, _) = read_head(&store, &v).await.unwrap();
        assert!(gone.commits.is_empty());
        write_file(&c, "three.txt", b"three").await;
        let late = commit(&store, &v, &c, (&head2, version2.as_ref()), None)
            .await
            .unwrap();
        let kept = late.conflict.expect("kept as a conflict");
        assert!(late.commit.is_none());
        assert!(kept.paths.iter().any(|p| p == "three.txt"), "{kept:?}");
        assert!(read_head(&store, &v).await.unwrap().0.commits.is_empty());
        let chain: Vec<Digest> = kept
            .layers
            .iter()
            .map(|l| Digest::parse(l).unwrap())
            .collect();
        let shown = mount_chain(&base, chain, tmp.path().join("shown")).await;
        for (name, bytes) in [
            ("one.txt", &b"one"[..]),
            ("two.txt", b"two"),
            ("three.txt", b"three"),
        ] {
            let f = shown.lookup(ROOT_INO, name.as_bytes()).unwrap();
            assert_eq!(
                &shown.read(f.ino, 0, 100).await.unwrap()[..],
                bytes,
                "{name}"
            );
        }

        // A new mount starts from nothing, and its commit makes the volume again.
        let (empty, version) = read_head(&store, &v).await.unwrap();
        let d = mount_chain(&base, empty.layers().unwrap(), tmp.path().join("d")).await;
        assert!(d.lookup(ROOT_INO, b"one.txt").is_err());
        write_file(&d, "four.txt", b"four").await;
        let again = commit(&store, &v, &d, (&empty, version.as_ref()), None)
            .await
            .unwrap();
        assert_eq!(read_head(&store, &v).await.unwrap().0.commits.len(), 1);

        // That mount commits again after another removal: what it committed on is gone, so
        // its changes are kept as a conflict, not landed as a volume of their own.
        let (landed, (head_d, version_d)) = (again.commit.unwrap(), again.head.unwrap());
        assert_eq!(remove(&store, &v).await.unwrap(), 1);
        write_file(&d, "five.txt", b"five").await;
        let last = Layer::load(&store, Digest::parse(&landed.layer).unwrap(), None)
            .await
            .unwrap();
        let own = [landed.published().to_string()];
        let earlier = Earlier {
            origin: &empty,
            own: &own,
            last: &last.manifest,
        };
        let later = commit(&store, &v, &d, (&head_d, Some(&version_d)), Some(earlier))
            .await
            .unwrap();
        assert!(later.commit.is_none() && later.conflict.is_some());
        assert!(read_head(&store, &v).await.unwrap().0.commits.is_empty());
    }

    #[tokio::test]
    async fn a_mount_from_before_two_squashes_still_rebases() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "base/data.txt", b"base\n");
        let base = stack_of(tmp.path(), &["base"]).await;
        let store = base.cache().store().clone();
        let v = VolumeRef::parse("fn/squashed").unwrap();
        let mount =
            |chain: Vec<Digest>, upper: &str| mount_chain(&base, chain, tmp.path().join(upper));
        let caller = Caller { uid: 0, gid: 0 };
        // Commits a new file `name` from a mount of the current head.
        let commit_file = |name: &'static str| {
            let (store, v) = (store.clone(), v.clone());
            let mount = &mount;
            async move {
                let (head, version) = read_head(&store, &v).await.unwrap();
                let t = mount(head.layers().unwrap(), name).await;
                t.create(ROOT_INO, name.as_bytes(), 0o644, caller).unwrap();
                let c = commit(&store, &v, &t, (&head, version.as_ref()), None).await;
                assert!(c.unwrap().commit.is_some());
            }
        };
        commit_file("a").await;
        let (h1, v1) = read_head(&store, &v).await.unwrap();
        let old = mount(h1.layers().unwrap(), "old").await;
        old.create(ROOT_INO, b"from-old", 0o644, caller).unwrap();
        commit_file("b").await;
        assert!(squash(&store, &v, None).await.unwrap().is_some());
        commit_file("c").await;
        let (squashed, _) = squash(&store, &v, None).await.unwrap().unwrap();
        assert_eq!(squashed.commits.len(), 1);
        assert_eq!(squashed.commits[0].squashed.len(), 3, "a, b and c");
        // The mount from before both squashes touched other paths: it rebases.
        let c = commit(&store, &v, &old, (&h1, v1.as_ref()), None)
            .await
            .unwrap();
        assert!(c.conflict.is_none() && c.commit.is_some());
        let (head, _) = read_head(&store, &v).await.unwrap();
        let t = mount(head.layers().unwrap(), "check").await;
        for name in ["a", "b", "c", "from-old", "data.txt"] {
            assert!(t.lookup(ROOT_INO, name.as_bytes()).is_ok(), "{name}");
        }
        // One that changed what a squashed commit changed: a conflict.
        let late = mount(h1.layers().unwrap(), "late").await;
        late.create(ROOT_INO, b"b", 0o644, caller).unwrap();
        let c = commit(&store, &v, &late, (&h1, v1.as_ref()), None)
            .await
            .unwrap();
        assert_eq!(c.conflict.unwrap().paths, ["b"]);
    }
}
