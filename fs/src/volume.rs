//! Persistent volumes: `scope/name`, a chain of committed delta layers, named by a head object
//! `volumes/<scope>/<name>/head` (JSON) that moves only by compare-and-swap.
//!
//! A mount of a volume stacks the chain (bottom to top) on the mount's layers, with a fresh
//! upper above; committing publishes the upper's changes ([`MountTree::stage_changes`]) as one
//! more delta layer and moves the head from the version the mount started from. Chunks are
//! content-addressed, so a commit uploads only chunks the store does not have: one changed
//! MiB of a large file costs about that MiB.

use std::sync::Arc;

use bytes::Bytes;
use cache::{Digest, Store, StoreErrorKind, Version};
use serde::{Deserialize, Serialize};

use crate::error::{FsError, FsResult};
use crate::publish::{publish, PublishOptions, PublishReport};
use crate::upper::MountTree;

/// `scope/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRef {
    pub scope: String,
    pub name: String,
}

fn check_part(what: &str, s: &str) -> FsResult<()> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(FsError::InvalidInput(format!(
            "invalid volume {what} {s:?}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter, digit or '_'"
        )))
    }
}

impl VolumeRef {
    pub fn parse(s: &str) -> FsResult<VolumeRef> {
        let (scope, name) = s.split_once('/').ok_or_else(|| {
            FsError::InvalidInput(format!("invalid volume {s:?}: expected SCOPE/NAME"))
        })?;
        check_part("scope", scope)?;
        check_part("name", name)?;
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
    match store.get_versioned(&key).await? {
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
    /// `None` when there was nothing to commit.
    pub commit: Option<Commit>,
    pub report: Option<PublishReport>,
}

/// Publishes `tree`'s changes as a delta layer and moves the head of `v` from `base` (the
/// head version the mount started from) to a chain with that layer on top. Fails with
/// [`FsError::Conflict`] if another commit moved the head meanwhile; the layer is uploaded
/// either way.
pub async fn commit(
    store: &Arc<dyn Store>,
    v: &VolumeRef,
    tree: &MountTree,
    base: (&VolumeHead, Option<&Version>),
    staging: &std::path::Path,
) -> FsResult<Committed> {
    if tree.changes()?.is_empty() {
        return Ok(Committed {
            commit: None,
            report: None,
        });
    }
    let _ = std::fs::remove_dir_all(staging);
    std::fs::create_dir_all(staging).map_err(|e| FsError::io(staging, e))?;
    let changes = tree.stage_changes(staging).await;
    let published = match changes {
        Ok(_) => publish(
            staging,
            store,
            None,
            &PublishOptions::default(),
            Default::default(),
        )
        .await
        .map(|r| (r, changes.unwrap_or(0))),
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_dir_all(staging);
    let (report, changes) = published?;
    let layer = report
        .layer
        .ok_or_else(|| FsError::InvalidInput("publish returned no layer".into()))?;
    let commit = Commit {
        layer: layer.to_string(),
        committed_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        changes: changes as u64,
        bytes_uploaded: report.bytes_uploaded,
    };
    let (head, version) = base;
    let mut next = head.clone();
    next.commits.push(commit.clone());
    let body = Bytes::from(serde_json::to_vec_pretty(&next).expect("serializable"));
    match store.compare_and_swap(&v.head_key(), version, body).await {
        Ok(_) => Ok(Committed {
            commit: Some(commit),
            report: Some(report),
        }),
        Err(e) if e.kind == StoreErrorKind::Conflict => Err(FsError::Conflict(format!(
            "volume {v} was committed by another mount since this one started; its changes \
             are in layer {layer} ({e})"
        ))),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::Layer;
    use crate::stack::tests::{stack_of, write};
    use crate::stack::{LayerStack, ROOT_INO};
    use crate::upper::{Caller, UpperConfig};

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

    #[tokio::test]
    async fn commits_chain_up_and_a_stale_base_is_a_conflict() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "base/data.txt", b"base\n");
        let base = stack_of(tmp.path(), &["base"]).await;
        let store = base.cache().store().clone();
        let v = VolumeRef::parse("fn/state").unwrap();
        let base_digest = base.layers()[0].digest;
        // A mount: the base layer, the volume's chain, and an upper in `upper`.
        let mount = |chain: Vec<Digest>, upper: &str| {
            let store = store.clone();
            let cache = base.cache().clone();
            let dir = tmp.path().join(upper);
            async move {
                let mut layers = vec![Layer::load(&store, base_digest, None).await.unwrap()];
                for d in chain {
                    layers.push(Layer::load(&store, d, None).await.unwrap());
                }
                MountTree::new(
                    Arc::new(LayerStack::new(layers, cache).unwrap()),
                    Some(UpperConfig { dir, quota: None }),
                )
                .unwrap()
            }
        };

        // First mount: nothing yet; write a file and commit.
        let (head0, version0) = read_head(&store, &v).await.unwrap();
        assert!(head0.commits.is_empty() && version0.is_none());
        let t = mount(Vec::new(), "upper1").await;
        let caller = Caller { uid: 0, gid: 0 };
        let f = t.create(ROOT_INO, b"model.ckpt", 0o644, caller).unwrap();
        t.open(f.ino, true).unwrap();
        t.write(f.ino, 0, b"epoch 1").await.unwrap();
        t.release(f.ino);
        let c = commit(&store, &v, &t, (&head0, None), &tmp.path().join("stage"))
            .await
            .unwrap();
        assert!(c.commit.is_some());

        // Second mount: base + chain shows the commit.
        let (head1, version1) = read_head(&store, &v).await.unwrap();
        assert_eq!(head1.commits.len(), 1);
        let t2 = mount(head1.layers().unwrap(), "upper2").await;
        let got = t2.lookup(ROOT_INO, b"model.ckpt").unwrap();
        assert_eq!(&t2.read(got.ino, 0, 100).await.unwrap()[..], b"epoch 1");
        assert!(t2.lookup(ROOT_INO, b"data.txt").is_ok());
        // Nothing changed: nothing to commit.
        let none = commit(
            &store,
            &v,
            &t2,
            (&head1, version1.as_ref()),
            &tmp.path().join("stage"),
        )
        .await
        .unwrap();
        assert!(none.commit.is_none());

        // A commit from a mount that started before the first one: conflict, not lost.
        let t3 = mount(Vec::new(), "upper3").await;
        t3.mkdir(ROOT_INO, b"other", 0o755, caller).unwrap();
        let e = commit(&store, &v, &t3, (&head0, None), &tmp.path().join("stage"))
            .await
            .unwrap_err();
        assert!(matches!(e, FsError::Conflict(_)), "{e}");
        assert_eq!(read_head(&store, &v).await.unwrap().0, head1);
    }
}
