//! A model test of concurrent volume commits, with no mount: two or three mounts of one volume
//! from one head make random changes (files written, removed and renamed, directories made,
//! removed, renamed, chmodded and touched) and commit in a random interleaving, some twice.
//! Every commit either lands or is kept as a conflict; the final tree must equal a reference
//! merge of the landed commits, and every conflict must mount as the tree its mount had.
//! Never a silent loss.
//!
//! The seed is printed; `STRATA_MODEL_SEED=N` replays one case, `STRATA_MODEL_CASES` sets
//! how many run.

use std::collections::BTreeMap;
use std::sync::Arc;

use strata_cache_format::Digest;
use strata_store::Version;

use super::{commit, read_head, Earlier, VolumeHead, VolumeRef};
use crate::layer::Layer;
use crate::stack::tests::{stack_of, write};
use crate::stack::{LayerStack, ROOT_INO};
use crate::upper::{Caller, MountTree, NodeKind, SetAttr, TimeSet, UpperConfig};

/// A path's state as a user sees it (times aside).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir { mode: u32 },
    File { mode: u32, bytes: Vec<u8> },
}

type Tree = BTreeMap<String, Node>;

type Rng = strata_testkit::rng::SplitMix64;

const PATHS: &[&str] = &["d", "e", "f", "g", "d/x", "d/y", "d/n", "e/z", "e/n", "g/w"];
const MODES: &[u32] = &[0o755, 0o700, 0o750, 0o644, 0o600];
const CALLER: Caller = Caller { uid: 0, gid: 0 };

fn split(path: &str) -> (&str, &str) {
    match path.rsplit_once('/') {
        Some((p, n)) => (p, n),
        None => ("", path),
    }
}

fn resolve(t: &MountTree, path: &str) -> Option<u64> {
    let mut ino = ROOT_INO;
    if path.is_empty() {
        return Some(ino);
    }
    for name in path.split('/') {
        ino = t.lookup(ino, name.as_bytes()).ok()?.ino;
    }
    Some(ino)
}

/// The tree as a user walks it.
async fn snapshot(t: &MountTree) -> Tree {
    let mut out = Tree::new();
    let root = t.getattr(ROOT_INO).unwrap();
    out.insert(String::new(), Node::Dir { mode: root.perm });
    let mut pending = vec![(ROOT_INO, String::new())];
    while let Some((dir, path)) = pending.pop() {
        for (ino, name, kind) in t.readdir(dir).unwrap() {
            let name = String::from_utf8(name).unwrap();
            let p = if path.is_empty() {
                name
            } else {
                format!("{path}/{name}")
            };
            let s = t.getattr(ino).unwrap();
            match kind {
                NodeKind::Dir => {
                    out.insert(p.clone(), Node::Dir { mode: s.perm });
                    pending.push((ino, p));
                }
                NodeKind::File => {
                    let bytes = t.read(ino, 0, s.size as u32 + 1).await.unwrap().to_vec();
                    out.insert(
                        p,
                        Node::File {
                            mode: s.perm,
                            bytes,
                        },
                    );
                }
                other => panic!("{p}: unexpected {other:?}"),
            }
        }
    }
    out
}

/// Removes `path` and everything under it.
fn rm_rf(t: &MountTree, path: &str) {
    let Some(ino) = resolve(t, path) else { return };
    if t.getattr(ino).unwrap().kind == NodeKind::Dir {
        for (_, name, _) in t.readdir(ino).unwrap() {
            rm_rf(t, &format!("{path}/{}", String::from_utf8(name).unwrap()));
        }
        let (parent, name) = split(path);
        let p = resolve(t, parent).unwrap();
        t.rmdir(p, name.as_bytes()).unwrap();
    } else {
        let (parent, name) = split(path);
        let p = resolve(t, parent).unwrap();
        t.unlink(p, name.as_bytes()).unwrap();
    }
}

/// One random change; one that the tree refuses (a missing parent, say) changes nothing.
async fn random_op(t: &MountTree, rng: &mut Rng, what: &mut Vec<String>) {
    let path = *rng.pick(PATHS);
    let (parent, name) = split(path);
    let Some(p) = resolve(t, parent) else { return };
    let existing = resolve(t, path);
    match rng.below(7) {
        0 | 1 => {
            // Write a file (made if absent).
            let ino = match existing {
                Some(ino) if t.getattr(ino).unwrap().kind == NodeKind::File => ino,
                Some(_) => return,
                None => match t.create(p, name.as_bytes(), 0o644, CALLER) {
                    Ok(s) => s.ino,
                    Err(_) => return,
                },
            };
            let bytes = format!("{path} {}", rng.next_u64()).into_bytes();
            t.open(ino, true).unwrap();
            let cut = SetAttr {
                size: Some(0),
                ..Default::default()
            };
            t.setattr(ino, cut).await.unwrap();
            t.write(ino, 0, &bytes).await.unwrap();
            t.release(ino);
            what.push(format!("write {path}"));
        }
        2 => {
            if existing.is_some() {
                rm_rf(t, path);
                what.push(format!("rm -rf {path}"));
            }
        }
        3 => {
            if t.mkdir(p, name.as_bytes(), 0o755, CALLER).is_ok() {
                what.push(format!("mkdir {path}"));
            }
        }
        4 => {
            if let Some(ino) = existing {
                let mode = MODES[rng.below(MODES.len())];
                let set = SetAttr {
                    mode: Some(mode),
                    ..Default::default()
                };
                t.setattr(ino, set).await.unwrap();
                what.push(format!("chmod {mode:o} {path}"));
            }
        }
        5 => {
            if let Some(ino) = existing {
                let set = SetAttr {
                    mtime: Some(TimeSet::Now),
                    ..Default::default()
                };
                t.setattr(ino, set).await.unwrap();
                what.push(format!("touch {path}"));
            }
        }
        _ => {
            let to = *rng.pick(PATHS);
            let (to_parent, to_name) = split(to);
            let Some(tp) = resolve(t, to_parent) else {
                return;
            };
            // The kernel refuses to move a directory into itself; the tree leaves it to it.
            if existing.is_some()
                && !under(to, path)
                && t.rename(p, name.as_bytes(), tp, to_name.as_bytes(), 0)
                    .is_ok()
            {
                what.push(format!("mv {path} {to}"));
            }
        }
    }
}

/// A mount of the base with the volume's `chain` above, and a journaled upper in `dir`.
async fn mount_chain(base: &LayerStack, chain: &[Digest], dir: std::path::PathBuf) -> MountTree {
    let store = base.cache().store();
    let mut layers = vec![Layer::load(store, base.layers()[0].digest, None)
        .await
        .unwrap()];
    for d in chain {
        layers.push(Layer::load(store, *d, None).await.unwrap());
    }
    let upper = UpperConfig {
        dir,
        quota: None,
        inodes: None,
        journal: true,
    };
    let stack = LayerStack::new(layers, base.cache().clone()).unwrap();
    MountTree::new(Arc::new(stack), Some(upper)).unwrap()
}

fn parents(path: &str) -> impl Iterator<Item = &str> {
    let mut out = vec![""];
    for (i, b) in path.bytes().enumerate() {
        if b == b'/' {
            out.push(&path[..i]);
        }
    }
    out.into_iter()
}

fn under(path: &str, dir: &str) -> bool {
    dir.is_empty() || path == dir || path.starts_with(&format!("{dir}/"))
}

/// What the commits that landed before this one left, for the model's attribute rule: their
/// attribute-only paths, and what each of their layers carries (newest first).
#[derive(Default)]
struct Others {
    attrs: std::collections::BTreeSet<String>,
    carried: Vec<Tree>,
}

fn mode_of(n: &Node) -> u32 {
    match n {
        Node::Dir { mode } | Node::File { mode, .. } => *mode,
    }
}

fn set_mode(n: &mut Node, m: u32) {
    match n {
        Node::Dir { mode } | Node::File { mode, .. } => *mode = m,
    }
}

fn same_kind(a: &Node, b: &Node) -> bool {
    matches!(
        (a, b),
        (Node::Dir { .. }, Node::Dir { .. }) | (Node::File { .. }, Node::File { .. })
    )
}

/// What a landed commit does to the tree before it, in the model: its structural paths take
/// the mount's state (a whole subtree for a directory); its attribute-only paths, and every
/// directory on the way to a change, take the mount's mode, unless the mount left the mode
/// as it was (`before`: at its last commit, or when it started) and a commit that landed
/// since it started changed the path's attributes: then the mode of the newest layer that
/// carries the path stays. Returns the paths the commit's layer carries.
fn apply(
    reference: &mut Tree,
    seen: &Tree,
    before: impl Fn(&str) -> Option<Node>,
    others: &Others,
    paths: &[String],
    attrs: &[String],
) -> Vec<String> {
    let mut paths = paths.to_vec();
    paths.sort();
    for p in &paths {
        reference.retain(|k, _| !under(k, p) || p.is_empty());
        for (k, v) in seen.iter().filter(|(k, _)| under(k, p)) {
            reference.insert(k.clone(), v.clone());
        }
    }
    let mut carried: Vec<&str> = Vec::new();
    for p in paths.iter().chain(attrs) {
        let own = attrs.contains(p).then_some(p.as_str());
        for q in parents(p).chain(own) {
            carried.push(q);
            let (Some(r), Some(s)) = (reference.get_mut(q), seen.get(q)) else {
                continue;
            };
            if !same_kind(r, s) {
                continue;
            }
            let mut mode = mode_of(s);
            let unchanged = before(q).is_some_and(|i| same_kind(&i, s) && mode_of(&i) == mode);
            if unchanged && others.attrs.contains(q) {
                let newest = others.carried.iter().find_map(|c| c.get(q));
                if let Some(theirs) = newest.filter(|t| same_kind(t, s)) {
                    mode = mode_of(theirs);
                }
            }
            set_mode(r, mode);
        }
    }
    let mut out: Vec<String> = carried.into_iter().map(str::to_string).collect();
    for p in &paths {
        out.extend(reference.keys().filter(|k| under(k, p)).cloned());
    }
    out
}

/// The nodes at `paths` of `tree`.
fn pick(tree: &Tree, paths: &[String]) -> Tree {
    paths
        .iter()
        .filter_map(|q| tree.get(q).map(|n| (q.clone(), n.clone())))
        .collect()
}

async fn chain_tree(base: &LayerStack, chain: &[Digest], tmp: &std::path::Path) -> Tree {
    let t = mount_chain(base, chain, tmp.join(format!("view-{}", rand_name()))).await;
    snapshot(&t).await
}

fn rand_name() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// One case: returns (commits landed, conflicts).
async fn run_case(seed: u64, base: &LayerStack, tmp: &std::path::Path) -> (usize, usize) {
    let mut rng = Rng::new(seed);
    let store = base.cache().store().clone();
    let v = VolumeRef::parse(&format!("model/case-{seed}")).unwrap();
    let mounts = 2 + rng.below(2);
    let mut trees = Vec::new();
    let mut bases: Vec<(VolumeHead, Option<Version>)> = Vec::new();
    // Each mount's commits that landed, and the last one's layer.
    let mut own: Vec<Vec<String>> = Vec::new();
    let mut earlier: Vec<Option<Layer>> = Vec::new();
    let origin = VolumeHead {
        version: 1,
        commits: Vec::new(),
    };
    for m in 0..mounts {
        let dir = tmp.join(format!("case-{seed}-m{m}"));
        trees.push(mount_chain(base, &[], dir).await);
        earlier.push(None);
        own.push(Vec::new());
        bases.push((
            VolumeHead {
                version: 1,
                commits: Vec::new(),
            },
            None,
        ));
    }
    // Each mount commits once or twice; the steps interleave at random.
    let mut steps: Vec<usize> = (0..mounts)
        .flat_map(|m| std::iter::repeat_n(m, 1 + rng.below(2)))
        .collect();
    for i in (1..steps.len()).rev() {
        steps.swap(i, rng.below(i + 1));
    }
    let mut reference = snapshot(&trees[0]).await;
    let initial = reference.clone();
    let (mut landed, mut conflicts) = (0, 0);
    let mut log = Vec::new();
    // Each landed commit: its mount, its attribute-only paths, what its layer carries.
    let mut carried: Vec<(usize, Vec<String>, Tree)> = Vec::new();
    // What each mount's last landed commit carried, as the mount had it.
    let mut published: Vec<Tree> = vec![Tree::new(); mounts];
    for m in steps {
        let mut what = Vec::new();
        for _ in 0..1 + rng.below(6) {
            random_op(&trees[m], &mut rng, &mut what).await;
        }
        let seen = snapshot(&trees[m]).await;
        let (head, version) = &bases[m];
        let previous = earlier[m].as_ref().map(|l| Earlier {
            origin: &origin,
            own: &own[m],
            last: &l.manifest,
        });
        let c = commit(&store, &v, &trees[m], (head, version.as_ref()), previous)
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: commit of mount {m} failed: {e}"));
        log.push(format!("mount {m}: {what:?}"));
        if let Some(conflict) = &c.conflict {
            conflicts += 1;
            log.push(format!("  conflict on {:?}", conflict.paths));
            // The losing side's changes mount as the tree it had.
            let layers: Vec<Digest> = conflict
                .layers
                .iter()
                .map(|l| Digest::parse(l).unwrap())
                .collect();
            let kept = chain_tree(base, &layers, tmp).await;
            if earlier[m].is_none() {
                assert_eq!(
                    kept,
                    seen,
                    "seed {seed}: the conflict does not mount as mount {m}'s tree\n{}",
                    log.join("\n")
                );
            } else {
                // Its earlier commit was rebased onto others' commits, which the conflict's
                // chain holds too; every change the mount made must still be there.
                for p in initial.keys().chain(seen.keys()) {
                    if initial.get(p) != seen.get(p) {
                        assert_eq!(
                            kept.get(p),
                            seen.get(p),
                            "seed {seed}: the conflict lost mount {m}'s change at {p:?}\n{}",
                            log.join("\n")
                        );
                    }
                }
            }
        }
        if let (Some(commit), Some((head, version))) = (&c.commit, c.head) {
            landed += 1;
            log.push(format!(
                "  landed: paths {:?} attrs {:?}",
                commit.paths, commit.attrs
            ));
            let landed_before = Others {
                attrs: carried
                    .iter()
                    .flat_map(|(_, attrs, _)| attrs.iter().cloned())
                    .collect(),
                carried: carried
                    .iter()
                    .rev()
                    .map(|(.., tree)| tree.clone())
                    .collect(),
            };
            let mount_had = &published[m];
            let before = |q: &str| mount_had.get(q).or(initial.get(q)).cloned();
            let holds = apply(
                &mut reference,
                &seen,
                before,
                &landed_before,
                &commit.paths,
                &commit.attrs,
            );
            carried.push((m, commit.attrs.clone(), pick(&reference, &holds)));
            published[m] = pick(&seen, &holds);
            bases[m] = (head, Some(version));
            let layer = Digest::parse(commit.published()).unwrap();
            earlier[m] = Some(Layer::load(&store, layer, None).await.unwrap());
            own[m].push(commit.published().to_string());
        }
    }
    let (head, _) = read_head(&store, &v).await.unwrap();
    let chain = head.layers().unwrap();
    let got = chain_tree(base, &chain, tmp).await;
    assert_eq!(
        got,
        reference,
        "seed {seed}: the volume differs from the reference merge\n{}",
        log.join("\n")
    );
    (landed, conflicts)
}

#[tokio::test]
async fn concurrent_commits_merge_or_conflict_and_never_lose_a_change() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "lower/d/x", b"x\n");
    write(tmp.path(), "lower/d/y", b"y\n");
    write(tmp.path(), "lower/e/z", b"z\n");
    write(tmp.path(), "lower/f", b"f\n");
    let base = stack_of(tmp.path(), &["lower"]).await;
    let (first, cases) = match std::env::var("STRATA_MODEL_SEED") {
        Ok(s) => (s.parse().expect("STRATA_MODEL_SEED: a number"), 1),
        Err(_) => {
            let cases = std::env::var("STRATA_MODEL_CASES")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(200);
            let clock = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64;
            (clock % 1_000_000_000, cases)
        }
    };
    println!(
        "model seeds {first}..{} (replay one: STRATA_MODEL_SEED=N)",
        first + cases
    );
    let (mut landed, mut conflicts) = (0, 0);
    for seed in first..first + cases {
        let (l, c) = run_case(seed, &base, tmp.path()).await;
        landed += l;
        conflicts += c;
    }
    println!("{cases} cases: {landed} commits landed, {conflicts} kept as conflicts");
    assert!(landed > 0);
}
