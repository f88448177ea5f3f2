//! What a mount's upper changed, by path: the input of a commit (publishing the changes as a
//! layer) and of conflict checks between two commits.
//!
//! The walk looks only where changes can be: into directories whose listing changed, and into
//! the layers' directories that hold a changed node (found from the changed nodes' paths in
//! the layers). A dataset of a million files with three changed ones costs a few lookups.

use std::collections::{BTreeMap, HashMap, HashSet};

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
        // Layer entries of directories already resolved to the mount's inode: each node
        // climbs only to the first such ancestor, so this stays linear in a deep tree.
        let mut resolved: HashMap<(u16, u32), u64> = HashMap::new();
        for &ino in tree.nodes.keys().filter(|&&ino| ino < FIRST_UPPER_INO) {
            let Some((layer, entry)) = self.stack.top_source(ino) else {
                continue;
            };
            let mut climb = Vec::new();
            let mut dir = ROOT_INO;
            let mut at = entry;
            while let Some((_, parent)) = self.stack.layer_parent((layer, at)) {
                if parent == 0 {
                    break;
                }
                if let Some(&known) = resolved.get(&(layer, parent)) {
                    dir = known;
                    break;
                }
                climb.push(parent);
                at = parent;
            }
            for &entry in climb.iter().rev() {
                let Some((name, _)) = self.stack.layer_parent((layer, entry)) else {
                    break;
                };
                match self.stack.lookup(dir, name) {
                    Ok(a) => {
                        dir = a.ino;
                        wanted.insert(dir);
                        resolved.insert((layer, entry), dir);
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
        // Depth first with an explicit stack (a tree may be as deep as a function likes):
        // each frame is a directory's differences still to emit, and where its path ends.
        let mut path: Vec<u8> = Vec::new();
        let mut frames = vec![(self.diff_dir(&tree, ROOT_INO, &wanted)?.into_iter(), 0usize)];
        while let Some((items, len)) = frames.last_mut() {
            let Some((name, change, descend)) = items.next() else {
                frames.pop();
                continue;
            };
            let base = *len;
            path.truncate(base);
            if base > 0 {
                path.push(b'/');
            }
            path.extend_from_slice(&name);
            let child_path = path.clone();
            match change {
                Diff::Removed => out.push(Change::Removed { path: child_path }),
                Diff::Placed { ino, hides_lower } => out.push(Change::Placed {
                    path: child_path,
                    ino,
                    hides_lower,
                }),
                Diff::Changed(ino) => out.push(Change::Changed {
                    path: child_path,
                    ino,
                }),
                Diff::Same => {}
            }
            if let Some(dir) = descend {
                let items = self.diff_dir(&tree, dir, &wanted)?;
                frames.push((items.into_iter(), path.len()));
            }
        }
        Ok(out)
    }

    /// The differences in directory `dir`, by name in byte order: (name, what differs, the
    /// directory to look into next).
    fn diff_dir(&self, tree: &Tree, dir: u64, wanted: &HashSet<u64>) -> FsResult<Vec<DirDiff>> {
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
            Some(_) => return Ok(Vec::new()),
            None => {
                let lower = lower_listing(dir)?;
                (lower.clone(), lower)
            }
        };
        // Names gone, and names now naming something else, in one ordered pass.
        let names: std::collections::BTreeSet<&Vec<u8>> = lower.keys().chain(now.keys()).collect();
        let mut out = Vec::new();
        for name in names {
            match (lower.get(name), now.get(name)) {
                (Some(_), None) => out.push((name.clone(), Diff::Removed, None)),
                (was, Some(&ino)) if was != Some(&ino) => out.push((
                    name.clone(),
                    Diff::Placed {
                        ino,
                        hides_lower: was.is_some(),
                    },
                    None,
                )),
                (_, Some(&ino)) => {
                    let node = tree.nodes.get(&ino);
                    let is_dir = match node {
                        Some(n) => n.is_dir(),
                        None => wanted.contains(&ino),
                    };
                    let descend =
                        (is_dir && (node.is_some() || wanted.contains(&ino))).then_some(ino);
                    let diff = if node.is_some() {
                        Diff::Changed(ino)
                    } else {
                        Diff::Same
                    };
                    if descend.is_some() || !matches!(diff, Diff::Same) {
                        out.push((name.clone(), diff, descend));
                    }
                }
                (None, None) => {}
            }
        }
        Ok(out)
    }
}

impl MountTree {
    /// `changes` made good for going on top of `earlier`, a delta this mount committed before.
    ///
    /// The next commit carries all the mount's changes since it was mounted, measured against
    /// the layers under the mount, but it goes on top of `earlier`. Two things would then show
    /// wrong, and are fixed here:
    /// - a name `earlier` placed that the mount has removed since (a file made, committed,
    ///   then deleted) has no removal in `changes`, the layers never having had it: a removal
    ///   is added (for the topmost gone name of a subtree only);
    /// - a name where `earlier` has a whiteout, an opaque directory or a non-directory, and
    ///   where the mount now has the layers' own node again (a rename undone): `changes`
    ///   leaves it out or changes it in place, which would let `earlier` hide it. It is placed
    ///   anew instead, whole, hiding what is below.
    ///
    /// The order stays parents before children, names in byte order.
    pub fn with_removals_since(
        &self,
        earlier: &crate::manifest::Manifest,
        changes: Vec<Change>,
    ) -> FsResult<Vec<Change>> {
        use crate::manifest::Kind;
        let placed: HashMap<&[u8], bool> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Placed {
                    path, hides_lower, ..
                } => Some((&path[..], *hides_lower)),
                _ => None,
            })
            .collect();
        let (mut gone, mut again) = (Vec::new(), Vec::new());
        {
            let tree = self.lock();
            let mut path: Vec<u8> = Vec::new();
            // Depth first with an explicit stack: (entries left in a directory, the mount's
            // inode of that directory, where its path ends, whether a placed subtree holds it).
            let mut frames = vec![(earlier.root().children(), ROOT_INO, 0usize, false)];
            while let Some((children, dir, len, in_placed)) = frames.last_mut() {
                let (dir, len, in_placed) = (*dir, *len, *in_placed);
                let Some(child) = children.next() else {
                    frames.pop();
                    continue;
                };
                let e = earlier.entry(child as usize);
                path.truncate(len);
                if len > 0 {
                    path.push(b'/');
                }
                path.extend_from_slice(e.name);
                let ino = match self.child(&tree, dir, e.name) {
                    Ok(Some(ino)) => ino,
                    Ok(None) => {
                        if e.kind != Kind::Whiteout {
                            gone.push(Change::Removed { path: path.clone() });
                        }
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let is_dir = match tree.nodes.get(&ino) {
                    Some(n) => n.is_dir(),
                    None => self
                        .stack
                        .getattr(ino)
                        .is_ok_and(|a| a.kind == crate::stack::FileKind::Dir),
                };
                let descend = is_dir && e.kind == Kind::Dir;
                match placed.get(&path[..]) {
                    // Placed whole, hiding everything below: nothing of `earlier` shows.
                    Some(true) => {}
                    // Placed over nothing of the layers' (so, not opaque): its subtree is in
                    // the change, but what `earlier` had inside and the mount has not must
                    // still be removed.
                    Some(false) => {
                        if descend {
                            frames.push((e.children(), ino, path.len(), true));
                        }
                    }
                    None if in_placed => {
                        if descend {
                            frames.push((e.children(), ino, path.len(), true));
                        }
                    }
                    // The layers' own node, changed in place or not at all.
                    None => {
                        if e.kind == Kind::Dir && !e.is_opaque() {
                            if is_dir {
                                frames.push((e.children(), ino, path.len(), false));
                            }
                        } else {
                            again.push(Change::Placed {
                                path: path.clone(),
                                ino,
                                hides_lower: true,
                            });
                        }
                    }
                }
            }
        }
        if gone.is_empty() && again.is_empty() {
            return Ok(changes);
        }
        let removed: HashSet<&[u8]> = changes
            .iter()
            .filter(|c| matches!(c, Change::Removed { .. }))
            .map(|c| c.path())
            .collect();
        let gone: Vec<Change> = gone
            .into_iter()
            .filter(|c| !removed.contains(c.path()))
            .collect();
        // Tagged `true` when placed again: such a change covers its whole subtree, so what
        // `changes` had there and below goes.
        let mut all: Vec<(Change, bool)> = changes
            .into_iter()
            .map(|c| (c, false))
            .chain(gone.into_iter().map(|c| (c, false)))
            .chain(again.into_iter().map(|c| (c, true)))
            .collect();
        // Pre-order with names in byte order is the order of paths compared name by name,
        // which is byte order with the separator below every other byte; at one path, the
        // change placed again first.
        all.sort_by_cached_key(|(c, again)| {
            let key: Vec<u8> = c
                .path()
                .iter()
                .map(|&b| if b == b'/' { 0 } else { b })
                .collect();
            (key, !*again)
        });
        let mut out = Vec::with_capacity(all.len());
        let mut cover: Option<Vec<u8>> = None;
        for (c, again) in all {
            if let Some(cp) = &cover {
                let p = c.path();
                if p.starts_with(cp) && (p.len() == cp.len() || p[cp.len()] == b'/') {
                    continue;
                }
            }
            if again {
                cover = Some(c.path().to_vec());
            }
            out.push(c);
        }
        let all = out;
        Ok(all)
    }
}

/// One name of a directory that differs: (name, what differs, the directory to look into
/// next).
type DirDiff = (Vec<u8>, Diff, Option<u64>);

/// What differs at one name of a directory.
enum Diff {
    Removed,
    Placed {
        ino: u64,
        hides_lower: bool,
    },
    Changed(u64),
    /// Nothing here, but maybe below.
    Same,
}
