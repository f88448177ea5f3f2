//! What a mount's upper changed, by path: the input of a commit (publishing the changes as a
//! layer) and of conflict checks between two commits.
//!
//! The walk looks only where changes can be: into directories whose listing changed, and into
//! the layers' directories that hold a changed node (found from the changed nodes' paths in
//! the layers). A dataset of a million files with three changed ones costs a few lookups.

use std::collections::{BTreeMap, HashSet};

use super::node::Body;
use super::{MountTree, Tree, FIRST_UPPER_INO};
use crate::error::FsResult;
use crate::stack::ROOT_INO;

/// One difference between a mount's tree and its layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `path` no longer names anything (a whiteout over the layers).
    Removed { path: Vec<u8> },
    /// `path` names a node that is not the layers' node there: new, moved here, or made anew
    /// in place of one. All of it belongs to the change (for a directory, its whole subtree).
    /// `hides_lower`: the layers have something at this path that it replaces (for a
    /// directory: opaque).
    Placed {
        path: Vec<u8>,
        ino: u64,
        hides_lower: bool,
    },
    /// `path` still names the layers' node, changed in place (attributes, xattrs, bytes, or
    /// for a directory its link count or times).
    Changed { path: Vec<u8>, ino: u64 },
}

impl Change {
    pub fn path(&self) -> &[u8] {
        match self {
            Change::Removed { path }
            | Change::Placed { path, .. }
            | Change::Changed { path, .. } => path,
        }
    }
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        name.to_vec()
    } else {
        [dir, b"/", name].concat()
    }
}

impl MountTree {
    /// Every change of the upper, parents before children, names in byte order. Empty for a
    /// read-only mount.
    pub fn changes(&self) -> FsResult<Vec<Change>> {
        if self.upper.is_none() {
            return Ok(Vec::new());
        }
        let tree = self.lock();
        // The layers' directories on the way to each changed layer node.
        let mut wanted = HashSet::from([ROOT_INO]);
        for &ino in tree.nodes.keys().filter(|&&ino| ino < FIRST_UPPER_INO) {
            let Some(path) = self.stack.lower_path(ino) else {
                continue;
            };
            let mut dir = ROOT_INO;
            for name in &path[..path.len() - 1] {
                match self.stack.lookup(dir, name) {
                    Ok(a) => {
                        dir = a.ino;
                        wanted.insert(dir);
                    }
                    Err(_) => break,
                }
            }
        }
        let mut out = Vec::new();
        if tree.nodes.contains_key(&ROOT_INO) {
            out.push(Change::Changed {
                path: Vec::new(),
                ino: ROOT_INO,
            });
        }
        self.walk(&tree, ROOT_INO, b"", &wanted, &mut out)?;
        Ok(out)
    }

    fn walk(
        &self,
        tree: &Tree,
        dir: u64,
        path: &[u8],
        wanted: &HashSet<u64>,
        out: &mut Vec<Change>,
    ) -> FsResult<()> {
        let lower_listing = |lower: u64| -> FsResult<BTreeMap<Vec<u8>, u64>> {
            Ok(self
                .stack
                .readdir(lower)?
                .into_iter()
                .map(|e| (e.name, e.ino))
                .collect())
        };
        // What the layers have at this path, and what the mount has now.
        let (lower, now) = match tree.nodes.get(&dir).map(|n| &n.body) {
            Some(Body::Dir {
                lower: Some(l),
                entries,
            }) => {
                let lower = lower_listing(*l)?;
                let now = entries.clone().unwrap_or_else(|| lower.clone());
                (lower, now)
            }
            Some(Body::Dir {
                lower: None,
                entries,
            }) => (BTreeMap::new(), entries.clone().unwrap_or_default()),
            Some(_) => return Ok(()),
            None => {
                let lower = lower_listing(dir)?;
                (lower.clone(), lower)
            }
        };
        // Names gone, and names now naming something else, in one ordered pass.
        let names: std::collections::BTreeSet<&Vec<u8>> = lower.keys().chain(now.keys()).collect();
        for name in names {
            let child_path = join(path, name);
            match (lower.get(name), now.get(name)) {
                (Some(_), None) => out.push(Change::Removed { path: child_path }),
                (was, Some(&ino)) if was != Some(&ino) => out.push(Change::Placed {
                    path: child_path,
                    ino,
                    hides_lower: was.is_some(),
                }),
                (_, Some(&ino)) => {
                    let node = tree.nodes.get(&ino);
                    if node.is_some() {
                        out.push(Change::Changed {
                            path: child_path.clone(),
                            ino,
                        });
                    }
                    let is_dir = match node {
                        Some(n) => n.is_dir(),
                        None => wanted.contains(&ino),
                    };
                    if is_dir && (node.is_some() || wanted.contains(&ino)) {
                        self.walk(tree, ino, &child_path, wanted, out)?;
                    }
                }
                (None, None) => {}
            }
        }
        Ok(())
    }
}
