//! Property test of [`MountTree::changes`], the input of a commit: after random operations on
//! a tree over a layer, applying its changes to a plain copy of the layer's directory must
//! give the same tree as doing the operations on that copy directly.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::stack::tests::{stack_of, write};

const ROOT: u64 = crate::stack::ROOT_INO;
const PATHS: &[&str] = &[
    "a", "b", "d1", "d1/a", "d1/b", "d1/e", "d1/e/x", "d2", "d2/a", "big",
];

#[derive(Debug, Clone)]
enum Op {
    Write {
        path: usize,
        offset: u64,
        len: usize,
    },
    Truncate {
        path: usize,
        len: u64,
    },
    Unlink {
        path: usize,
    },
    Mkdir {
        path: usize,
    },
    Rmdir {
        path: usize,
    },
    Rename {
        from: usize,
        to: usize,
    },
    Chmod {
        path: usize,
        mode: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0..PATHS.len();
    prop_oneof![
        4 => (p.clone(), 0u64..400_000, 1usize..40_000)
            .prop_map(|(path, offset, len)| Op::Write { path, offset, len }),
        2 => (p.clone(), 0u64..500_000).prop_map(|(path, len)| Op::Truncate { path, len }),
        2 => p.clone().prop_map(|path| Op::Unlink { path }),
        2 => p.clone().prop_map(|path| Op::Mkdir { path }),
        1 => p.clone().prop_map(|path| Op::Rmdir { path }),
        3 => (p.clone(), p.clone()).prop_map(|(from, to)| Op::Rename { from, to }),
        1 => (p, prop_oneof![Just(0o600u32), Just(0o755)])
            .prop_map(|(path, mode)| Op::Chmod { path, mode }),
    ]
}

fn bytes_of(len: usize, seed: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + seed * 7) % 251) as u8)
        .collect()
}

/// (parent inode, name) of `path` in the tree, if its parent exists.
fn parent_of(t: &MountTree, path: &str) -> Option<(u64, Vec<u8>)> {
    let mut dir = ROOT;
    let parts: Vec<&str> = path.split('/').collect();
    for part in &parts[..parts.len() - 1] {
        dir = t.lookup(dir, part.as_bytes()).ok()?.ino;
    }
    Some((dir, parts[parts.len() - 1].as_bytes().to_vec()))
}

/// Runs `op` on the plain directory; if that works, the same on the tree, which must work too.
async fn apply(plain: &Path, t: &MountTree, op: &Op) {
    let at = |i: usize| plain.join(PATHS[i]);
    let done = match op {
        Op::Write { path, offset, len } => std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(at(*path))
            .and_then(|f| {
                std::os::unix::fs::FileExt::write_all_at(&f, &bytes_of(*len, *path), *offset)
            }),
        Op::Truncate { path, len } => std::fs::OpenOptions::new()
            .write(true)
            .open(at(*path))
            .and_then(|f| f.set_len(*len)),
        Op::Unlink { path } => std::fs::remove_file(at(*path)),
        Op::Mkdir { path } => std::fs::create_dir(at(*path)),
        Op::Rmdir { path } => std::fs::remove_dir(at(*path)),
        Op::Rename { from, to } => {
            // The kernel refuses moving a directory into itself before the upper sees it.
            if PATHS[*to].starts_with(&format!("{}/", PATHS[*from])) {
                return;
            }
            std::fs::rename(at(*from), at(*to))
        }
        Op::Chmod { path, mode } => {
            std::fs::set_permissions(at(*path), std::fs::Permissions::from_mode(*mode))
        }
    };
    if done.is_err() {
        return;
    }
    let (dir, name) = parent_of(t, PATHS[op_path(op)]).expect("parent exists on both sides");
    let r: FsResult<()> = async {
        match op {
            Op::Write { path, offset, len } => {
                let ino = match t.lookup(dir, &name) {
                    Ok(s) => s.ino,
                    Err(_) => t.create(dir, &name, 0o644, caller())?.ino,
                };
                t.open(ino, true)?;
                t.write(ino, *offset, &bytes_of(*len, *path)).await?;
                t.release(ino);
            }
            Op::Truncate { len, .. } => {
                let ino = t.lookup(dir, &name)?.ino;
                let changes = SetAttr {
                    size: Some(*len),
                    ..Default::default()
                };
                t.setattr(ino, changes).await?;
            }
            Op::Unlink { .. } => t.unlink(dir, &name)?,
            Op::Mkdir { .. } => {
                t.mkdir(dir, &name, 0o755, caller())?;
            }
            Op::Rmdir { .. } => t.rmdir(dir, &name)?,
            Op::Rename { to, .. } => {
                let (to_dir, to_name) = parent_of(t, PATHS[*to]).expect("target parent");
                t.rename(dir, &name, to_dir, &to_name, 0)?;
            }
            Op::Chmod { mode, .. } => {
                let ino = t.lookup(dir, &name)?.ino;
                let changes = SetAttr {
                    mode: Some(*mode),
                    ..Default::default()
                };
                t.setattr(ino, changes).await?;
            }
        }
        Ok(())
    }
    .await;
    r.unwrap_or_else(|e| panic!("{op:?} worked on the plain directory, not on the tree: {e}"));
}

fn op_path(op: &Op) -> usize {
    match op {
        Op::Write { path, .. }
        | Op::Truncate { path, .. }
        | Op::Unlink { path }
        | Op::Mkdir { path }
        | Op::Rmdir { path }
        | Op::Chmod { path, .. } => *path,
        Op::Rename { from, .. } => *from,
    }
}

fn caller() -> Caller {
    Caller { uid: 0, gid: 0 }
}

/// Writes node `ino` of the tree (a whole subtree for a directory) at `dest`.
async fn copy_out(t: &MountTree, ino: u64, dest: &Path) {
    let s = t.getattr(ino).unwrap();
    match s.kind {
        NodeKind::Dir => {
            std::fs::create_dir(dest).unwrap();
            for (child, name, _) in t.readdir(ino).unwrap() {
                let name = String::from_utf8(name).unwrap();
                Box::pin(copy_out(t, child, &dest.join(name))).await;
            }
        }
        NodeKind::File => {
            let data = t.read(ino, 0, s.size as u32 + 1).await.unwrap();
            std::fs::write(dest, &data).unwrap();
        }
        other => panic!("unexpected {other:?}"),
    }
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(s.perm)).unwrap();
}

fn remove_any(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).unwrap(),
        Ok(_) => std::fs::remove_file(path).unwrap(),
        Err(_) => {}
    }
}

/// Applies the tree's changes to `copy` (a copy of the layer's directory).
async fn apply_changes(t: &MountTree, copy: &Path) {
    for c in t.changes().unwrap() {
        let rel = String::from_utf8(c.path().to_vec()).unwrap();
        let dest = if rel.is_empty() {
            copy.to_path_buf()
        } else {
            copy.join(&rel)
        };
        match c {
            Change::Removed { .. } => remove_any(&dest),
            Change::Placed { ino, .. } => {
                remove_any(&dest);
                copy_out(t, ino, &dest).await;
            }
            Change::Changed { ino, .. } => {
                let s = t.getattr(ino).unwrap();
                if s.kind == NodeKind::File {
                    let data = t.read(ino, 0, s.size as u32 + 1).await.unwrap();
                    std::fs::write(&dest, &data).unwrap();
                }
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(s.perm)).unwrap();
            }
        }
    }
}

/// path → (is dir, mode, bytes)
fn snapshot(root: &Path) -> BTreeMap<String, (bool, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let mode = m.permissions().mode() & 0o7777;
            if m.is_dir() {
                stack.push(path);
                out.insert(rel, (true, mode, Vec::new()));
            } else {
                out.insert(rel, (false, mode, std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn applying_the_changes_to_the_layer_gives_the_mounted_tree(
        ops in proptest::collection::vec(op(), 1..30)
    ) {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "lower/a", b"layer a\n");
        write(tmp.path(), "lower/d1/a", &bytes_of(300_000, 9));
        write(tmp.path(), "lower/d1/e/x", b"x\n");
        write(tmp.path(), "lower/d2/f", b"f\n");
        write(tmp.path(), "lower/big", &bytes_of(450_000, 3));
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let stack = Arc::new(stack_of(tmp.path(), &["lower"]).await);
            let t = MountTree::new(
                stack,
                Some(UpperConfig::scratch(tmp.path().join("upper"))),
            )
            .unwrap();
            let plain = tmp.path().join("plain");
            copy_dir(&tmp.path().join("lower"), &plain);
            for op in &ops {
                apply(&plain, &t, op).await;
            }
            let committed = tmp.path().join("committed");
            copy_dir(&tmp.path().join("lower"), &committed);
            apply_changes(&t, &committed).await;
            let want = snapshot(&plain);
            assert_eq!(snapshot(&committed), want, "changes: {:?}", t.changes());

            // The commit path: the changes staged and published as a delta layer; stacked on
            // the layer, it shows the same tree.
            let store = t.stack().cache().store().clone();
            let (_, _, delta) =
                crate::delta::publish_changes(&store, &t, &t.changes().unwrap())
                    .await
                    .unwrap();
            let layers = vec![
                crate::layer::Layer::load(&store, t.stack().layers()[0].digest, None)
                    .await
                    .unwrap(),
                crate::layer::Layer::load(&store, delta, None).await.unwrap(),
            ];
            let stack = crate::stack::LayerStack::new(layers, t.stack().cache().clone()).unwrap();
            let stacked = MountTree::new(Arc::new(stack), None).unwrap();
            let view = tmp.path().join("view");
            copy_out(&stacked, ROOT, &view).await;
            assert_eq!(snapshot(&view), want, "changes: {:?}", t.changes());
        });
    }
}
