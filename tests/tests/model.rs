//! Model-based test of the scratch upper: random sequences of file operations run against a
//! strata mount (scratch over a non-empty layer) and against a plain directory holding the
//! same tree. Every operation must give the same result (or the same errno) on both, and the
//! trees must be equal after each sequence. proptest shrinks a failure to a short sequence.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;
use strata_tests::daemon::Daemon;
use strata_tests::garage;
use strata_tests::tree::{pseudo_random, write_file};

/// The names operations pick from: some exist in the layer, some do not.
const PATHS: &[&str] = &[
    "a", "b", "c", "d1", "d1/a", "d1/b", "d1/e", "d2", "d2/a", "d2/f", "d1/e/x", "big",
];

#[derive(Debug, Clone)]
enum Op {
    Write {
        path: usize,
        offset: u64,
        len: usize,
        seed: u8,
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
    Link {
        from: usize,
        to: usize,
    },
    Symlink {
        target: usize,
        path: usize,
    },
    Chmod {
        path: usize,
        mode: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0..PATHS.len();
    prop_oneof![
        4 => (p.clone(), 0u64..600_000, 1usize..70_000, any::<u8>())
            .prop_map(|(path, offset, len, seed)| Op::Write { path, offset, len, seed }),
        2 => (p.clone(), 0u64..700_000).prop_map(|(path, len)| Op::Truncate { path, len }),
        2 => p.clone().prop_map(|path| Op::Unlink { path }),
        1 => p.clone().prop_map(|path| Op::Mkdir { path }),
        1 => p.clone().prop_map(|path| Op::Rmdir { path }),
        2 => (p.clone(), p.clone()).prop_map(|(from, to)| Op::Rename { from, to }),
        1 => (p.clone(), p.clone()).prop_map(|(from, to)| Op::Link { from, to }),
        1 => (p.clone(), p.clone()).prop_map(|(target, path)| Op::Symlink { target, path }),
        1 => (p, prop_oneof![Just(0o600u32), Just(0o644), Just(0o755), Just(0o4711)])
            .prop_map(|(path, mode)| Op::Chmod { path, mode }),
    ]
}

/// Runs one operation under `root`; the result as the errno it failed with.
fn apply(root: &Path, op: &Op) -> Result<(), i32> {
    let at = |i: usize| root.join(PATHS[i]);
    let r: std::io::Result<()> = match op {
        Op::Write {
            path,
            offset,
            len,
            seed,
        } => fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(at(*path))
            .and_then(|f| f.write_all_at(&pseudo_random(*seed as u64, *len), *offset)),
        Op::Truncate { path, len } => fs::OpenOptions::new()
            .write(true)
            .open(at(*path))
            .and_then(|f| f.set_len(*len)),
        Op::Unlink { path } => fs::remove_file(at(*path)),
        Op::Mkdir { path } => fs::create_dir(at(*path)),
        Op::Rmdir { path } => fs::remove_dir(at(*path)),
        Op::Rename { from, to } => fs::rename(at(*from), at(*to)),
        Op::Link { from, to } => fs::hard_link(at(*from), at(*to)),
        Op::Symlink { target, path } => std::os::unix::fs::symlink(PATHS[*target], at(*path)),
        Op::Chmod { path, mode } => {
            fs::set_permissions(at(*path), fs::Permissions::from_mode(*mode))
        }
    };
    r.map_err(|e| e.raw_os_error().unwrap_or(-1))
}

#[derive(Debug, PartialEq, Eq)]
enum Node {
    Dir {
        mode: u32,
    },
    File {
        mode: u32,
        nlink: u64,
        hash: String,
        len: u64,
    },
    Symlink(PathBuf),
}

/// Everything a user would compare, by relative path.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let node = if meta.file_type().is_symlink() {
                Node::Symlink(fs::read_link(&path).unwrap())
            } else if meta.is_dir() {
                stack.push(path.clone());
                Node::Dir {
                    mode: meta.mode() & 0o7777,
                }
            } else {
                let bytes = fs::read(&path).unwrap();
                Node::File {
                    mode: meta.mode() & 0o7777,
                    nlink: meta.nlink(),
                    hash: blake3::hash(&bytes).to_hex().to_string(),
                    len: meta.len(),
                }
            };
            out.insert(rel, node);
        }
    }
    out
}

fn seed_tree(root: &Path) {
    write_file(&root.join("a"), b"layer a\n");
    write_file(&root.join("d1/a"), &pseudo_random(5, 300_000));
    write_file(&root.join("d1/e/x"), b"x\n");
    write_file(&root.join("d2/f"), b"f\n");
    write_file(&root.join("big"), &pseudo_random(6, 900_000));
    fs::hard_link(root.join("d2/f"), root.join("c")).unwrap();
}

struct Fixture {
    work: PathBuf,
    store: String,
    daemon: Daemon,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let work = strata_tests::scratch_dir("model");
        let store = garage::bucket("model");
        seed_tree(&work.join("seed"));
        let daemon = Daemon::start(garage::shared().env(), &work.join("daemon"), &[]).unwrap();
        daemon
            .strata()
            .publish(&work.join("seed"), &store, "seed:v1");
        Fixture {
            work,
            store,
            daemon,
        }
    })
}

fn copy_tree(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        max_shrink_iters: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn scratch_behaves_like_a_local_directory(ops in proptest::collection::vec(op(), 1..40)) {
        let f = fixture();
        let case = f.work.join(format!("case-{}", std::process::id()));
        let _ = fs::remove_dir_all(&case);
        fs::create_dir_all(&case).unwrap();
        let plain = case.join("plain");
        copy_tree(&f.work.join("seed"), &plain);
        let m = f.daemon.mount(&f.store, &case.join("mnt"), &["seed:v1"]).unwrap();
        prop_assert_eq!(snapshot(&m.mountpoint), snapshot(&plain), "before any operation");
        for (i, op) in ops.iter().enumerate() {
            let want = apply(&plain, op);
            if std::env::var("MODEL_TRACE").is_ok() { eprintln!("{op:?} -> {want:?}"); }
            let got = apply(&m.mountpoint, op);
            prop_assert_eq!(got, want, "operation {} {:?}", i, op);
        }
        prop_assert_eq!(snapshot(&m.mountpoint), snapshot(&plain));
        drop(m);
        fs::remove_dir_all(&case).unwrap();
    }
}
