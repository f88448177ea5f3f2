//! Building source trees for tests and comparing a mounted tree with its source the way a
//! user would: every entry's type, mode, owner, size, mtime, symlink target, xattrs and bytes.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Deterministic pseudo-random bytes (xorshift), incompressible enough to defeat zstd.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn write_file(path: &Path, data: &[u8]) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
}

pub fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    if let Err(e) = rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty()) {
        panic!(
            "setxattr {name} on {}: {}",
            path.display(),
            std::io::Error::from(e)
        );
    }
}

pub fn set_mtime(path: &Path, sec: i64, nsec: i64) {
    let t = rustix::fs::Timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    let times = rustix::fs::Timestamps {
        last_access: t,
        last_modification: t,
    };
    let flags = rustix::fs::AtFlags::SYMLINK_NOFOLLOW;
    if let Err(e) = rustix::fs::utimensat(rustix::fs::CWD, path, &times, flags) {
        panic!("utimensat {}: {e}", path.display());
    }
}

pub fn xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut names = vec![0u8; 65536];
    let n = match rustix::fs::llistxattr(path, &mut names[..]) {
        Ok(n) if n > 0 => n,
        _ => return out,
    };
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut value = vec![0u8; 65536];
        let len = rustix::fs::lgetxattr(path, name, &mut value[..]).unwrap_or_else(|e| {
            panic!(
                "getxattr {:?} on {}: {e}",
                String::from_utf8_lossy(name),
                path.display()
            )
        });
        value.truncate(len);
        out.insert(name.to_vec(), value);
    }
    out
}

/// Every kind of entry strata keeps, plus odd names and things it must skip.
/// Returns the names of the skipped special files.
pub fn build_rich_tree(root: &Path, big_file_bytes: usize, small_files: usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(root).unwrap();
    write_file(&root.join("hello.txt"), b"hello, strata\n");
    write_file(&root.join("empty"), b"");
    write_file(&root.join("big.bin"), &pseudo_random(1, big_file_bytes));
    write_file(
        &root.join("données/日本語 ファイル.txt"),
        "unicode ✓\n".as_bytes(),
    );
    write_file(&root.join("odd/with space"), b"space");
    write_file(&root.join("odd/-rf"), b"dash");
    write_file(&root.join("odd/new\nline"), b"newline");
    write_file(&root.join("odd/tab\tand'quote\""), b"quotes");
    write_file(&root.join("odd").join("x".repeat(255)), b"long name");
    let non_utf8 = root
        .join("odd")
        .join(OsString::from_vec(vec![b'b', b'a', b'd', 0xff, 0xfe]));
    write_file(&non_utf8, b"not utf-8");
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::create_dir_all(root.join("sticky")).unwrap();
    std::fs::set_permissions(root.join("sticky"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let mut deep = root.join("deep");
    for i in 0..40 {
        deep = deep.join(format!("level{i:02}"));
    }
    write_file(&deep.join("bottom.txt"), b"deep");
    // Modes, owners, times.
    write_file(&root.join("modes/private"), b"secret");
    std::fs::set_permissions(
        root.join("modes/private"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    write_file(&root.join("modes/tool"), b"#!/bin/sh\necho hi\n");
    std::fs::set_permissions(
        root.join("modes/tool"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    write_file(&root.join("modes/owned"), b"owned");
    std::os::unix::fs::lchown(root.join("modes/owned"), Some(1234), Some(5678)).unwrap();
    set_mtime(&root.join("modes/owned"), 1_000_000_000, 123_456_789);
    // Symlinks: relative, absolute, dangling, to a dir.
    std::os::unix::fs::symlink("hello.txt", root.join("link-rel")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("link-abs")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", root.join("link-dangling")).unwrap();
    std::os::unix::fs::symlink("données", root.join("link-dir")).unwrap();
    // Hard links.
    write_file(&root.join("links/a"), b"shared inode");
    std::fs::hard_link(root.join("links/a"), root.join("links/b")).unwrap();
    std::fs::hard_link(root.join("links/a"), root.join("hello-hardlink")).unwrap();
    // Xattrs on a file and a dir.
    set_xattr(&root.join("hello.txt"), "user.origin", b"test suite");
    set_xattr(&root.join("hello.txt"), "user.binary", &[0, 1, 2, 255]);
    set_xattr(&root.join("données"), "user.dir", b"yes");
    // Many small files.
    for i in 0..small_files {
        let p = root.join(format!("small/{:03}/{i:05}.txt", i % 100));
        write_file(&p, format!("small file {i}\n").repeat(i % 7 + 1).as_bytes());
    }
    // Special files that publish skips with a warning.
    let fifo = root.join("a-fifo");
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .unwrap();
    let sock = root.join("a-socket");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    vec![fifo, sock]
}

#[derive(Debug, PartialEq)]
struct Seen {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    target: Option<Vec<u8>>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    content: Option<blake3::Hash>,
}

fn describe(path: &Path) -> Option<(Seen, (u64, u64), u64)> {
    let m = std::fs::symlink_metadata(path).unwrap();
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_symlink() {
        "symlink"
    } else {
        return None;
    };
    let content = ft.is_file().then(|| {
        let mut h = blake3::Hasher::new();
        let mut f = std::fs::File::open(path).unwrap();
        std::io::copy(&mut f, &mut h).unwrap();
        h.finalize()
    });
    let seen = Seen {
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        size: if ft.is_dir() { 0 } else { m.len() },
        mtime: (m.mtime(), m.mtime_nsec()),
        target: ft.is_symlink().then(|| {
            std::fs::read_link(path)
                .unwrap()
                .into_os_string()
                .into_vec()
        }),
        xattrs: xattrs(path),
        content,
    };
    Some((seen, (m.dev(), m.ino()), m.nlink()))
}

/// Walks `source` and `mounted` together and asserts they hold the same tree. Directory
/// mtimes are compared too. Returns the number of entries compared.
pub fn assert_same_tree(source: &Path, mounted: &Path) -> usize {
    let mut compared = 0;
    let mut src_links: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    let mut mnt_inodes: HashMap<PathBuf, (u64, u64)> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let s = source.join(&rel);
        let m = mounted.join(&rel);
        let Some((src, src_ino, nlink)) = describe(&s) else {
            assert!(
                std::fs::symlink_metadata(&m).is_err(),
                "special file {} should be skipped",
                rel.display()
            );
            continue;
        };
        let (mnt, mnt_ino, _) =
            describe(&m).unwrap_or_else(|| panic!("{} missing or odd in mount", rel.display()));
        assert_eq!(src, mnt, "entry {:?} differs", rel);
        compared += 1;
        if src.kind == "file" && nlink > 1 {
            src_links.entry(src_ino).or_default().push(rel.clone());
            mnt_inodes.insert(rel.clone(), mnt_ino);
        }
        if src.kind == "dir" {
            let names = |p: &Path| -> Vec<OsString> {
                let mut v: Vec<OsString> = std::fs::read_dir(p)
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                v.sort();
                v
            };
            let src_names: Vec<OsString> = names(&s)
                .into_iter()
                .filter(|n| describe(&s.join(n)).is_some())
                .collect();
            assert_eq!(src_names, names(&m), "listing of {:?} differs", rel);
            for n in src_names {
                stack.push(rel.join(n));
            }
        }
    }
    // Names of one source inode share one inode in the mount.
    for names in src_links.values() {
        let inos: Vec<_> = names.iter().map(|n| mnt_inodes[n]).collect();
        assert!(
            inos.windows(2).all(|w| w[0] == w[1]),
            "hard links {names:?} do not share an inode"
        );
    }
    compared
}

pub fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}
