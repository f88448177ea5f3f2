//! The writable scratch upper of daemon mounts, against a real Garage: overlay semantics over
//! a non-empty layer, private uppers per mount, read-only mounts, the quota, large copy-ups
//! that copy only what changes, and scratch dirs that go away with their mounts (also after a
//! crash).

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use strata_tests::daemon::Daemon;
use strata_tests::garage;
use strata_tests::tree::{pseudo_random, set_xattr, write_file, xattrs};

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Bytes on disk under `dir`.
fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    for e in fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() {
            disk_usage(&e.path())
        } else {
            m.blocks() * 512
        };
    }
    total
}

/// A layer with a bit of everything: nested dirs, a hard link, a symlink, a large file.
fn publish_base(d: &Daemon, work: &Path, store: &str) -> Vec<u8> {
    let src = work.join("src");
    write_file(&src.join("etc/config.txt"), b"threads = 4\n");
    write_file(&src.join("etc/keep.txt"), b"keep\n");
    write_file(&src.join("data/table.csv"), b"a,b\n1,2\n");
    write_file(&src.join("data/sub/deep.txt"), b"deep\n");
    fs::hard_link(src.join("data/table.csv"), src.join("data/table-link.csv")).unwrap();
    std::os::unix::fs::symlink("../etc/config.txt", src.join("data/config-link")).unwrap();
    let big = pseudo_random(41, 24 << 20);
    write_file(&src.join("model.bin"), &big);
    d.strata().publish(&src, store, "base:v1");
    big
}

#[test]
fn scratch_has_overlay_semantics_over_a_layer() {
    let work = strata_tests::scratch_dir("scratch-overlay");
    let store = garage::bucket("scratch-overlay");
    let d = Daemon::start(garage::shared().env(), &work.join("daemon"), &[]).unwrap();
    publish_base(&d, &work, &store);
    let m = d.mount(&store, &work.join("mnt"), &["base:v1"]).unwrap();
    let p = |rel: &str| m.path(rel);

    // Copy-up on write keeps the inode number; the layer itself is untouched (checked on a
    // second mount below).
    let ino = fs::metadata(p("etc/config.txt")).unwrap().ino();
    fs::OpenOptions::new()
        .append(true)
        .open(p("etc/config.txt"))
        .unwrap()
        .write_all(b"debug = true\n")
        .unwrap();
    assert_eq!(
        fs::read(p("etc/config.txt")).unwrap(),
        b"threads = 4\ndebug = true\n"
    );
    assert_eq!(fs::metadata(p("etc/config.txt")).unwrap().ino(), ino);
    // Through the symlink in the layer, the changed file.
    assert_eq!(
        fs::read(p("data/config-link")).unwrap(),
        b"threads = 4\ndebug = true\n"
    );

    // Truncate of a lower file, and O_TRUNC.
    fs::OpenOptions::new()
        .write(true)
        .open(p("etc/keep.txt"))
        .unwrap()
        .set_len(2)
        .unwrap();
    assert_eq!(fs::read(p("etc/keep.txt")).unwrap(), b"ke");
    fs::write(p("data/sub/deep.txt"), b"shallow").unwrap();
    assert_eq!(fs::read(p("data/sub/deep.txt")).unwrap(), b"shallow");

    // Whiteouts: a deleted lower file is gone from lookups and listings.
    fs::remove_file(p("data/table.csv")).unwrap();
    assert!(!p("data/table.csv").exists());
    assert_eq!(names(&p("data")), ["config-link", "sub", "table-link.csv"]);
    // Its other hard link still has the bytes, now with one link.
    assert_eq!(fs::read(p("data/table-link.csv")).unwrap(), b"a,b\n1,2\n");
    assert_eq!(fs::metadata(p("data/table-link.csv")).unwrap().nlink(), 1);

    // Opaque directory: rm -rf of a lower dir, mkdir of the same name, shows an empty dir.
    fs::remove_dir_all(p("data/sub")).unwrap();
    fs::create_dir(p("data/sub")).unwrap();
    assert!(names(&p("data/sub")).is_empty());

    // Rename of a lower directory with its contents, and of files across dirs.
    fs::rename(p("etc"), p("conf")).unwrap();
    assert!(!p("etc").exists());
    assert_eq!(names(&p("conf")), ["config.txt", "keep.txt"]);
    fs::rename(p("conf/keep.txt"), p("data/keep.txt")).unwrap();
    assert_eq!(fs::read(p("data/keep.txt")).unwrap(), b"ke");
    // Rename over an existing file replaces it.
    fs::write(p("new.txt"), b"new").unwrap();
    fs::rename(p("new.txt"), p("data/keep.txt")).unwrap();
    assert_eq!(fs::read(p("data/keep.txt")).unwrap(), b"new");
    // Non-empty directory cannot be replaced.
    fs::create_dir(p("empty")).unwrap();
    let e = fs::rename(p("empty"), p("conf")).unwrap_err();
    assert_eq!(errno_of(&e), libc::ENOTEMPTY, "{e}");
    let e = fs::remove_dir(p("conf")).unwrap_err();
    assert_eq!(errno_of(&e), libc::ENOTEMPTY, "{e}");

    // Hard links and symlinks in the upper; a FIFO.
    fs::hard_link(p("data/keep.txt"), p("keep-link")).unwrap();
    assert_eq!(fs::metadata(p("keep-link")).unwrap().nlink(), 2);
    std::os::unix::fs::symlink("data/keep.txt", p("sym")).unwrap();
    assert_eq!(fs::read_link(p("sym")).unwrap(), Path::new("data/keep.txt"));
    assert_eq!(fs::read(p("sym")).unwrap(), b"new");
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        p("fifo"),
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &fs::metadata(p("fifo")).unwrap().file_type()
    ));

    // chmod, chown, utimes, xattrs on a lower file (metadata only: no copy of its bytes).
    fs::set_permissions(p("model.bin"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(p("model.bin"), Some(1234), Some(5678)).unwrap();
    let when = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    fs::File::open(p("model.bin"))
        .unwrap()
        .set_modified(when)
        .unwrap();
    set_xattr(&p("model.bin"), "user.origin", b"layer");
    let meta = fs::metadata(p("model.bin")).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
    assert_eq!(meta.modified().unwrap(), when);
    assert_eq!(
        xattrs(&p("model.bin")).get(&b"user.origin"[..]).cloned(),
        Some(b"layer".to_vec())
    );
    let scratch = d.scratch_dirs();
    assert_eq!(scratch.len(), 1);
    assert!(
        disk_usage(&scratch[0]) < 1 << 20,
        "a metadata change copies no bytes"
    );

    // fsync, fdatasync, fallocate, statfs.
    let mut f = fs::File::create(p("log")).unwrap();
    f.write_all(b"record\n").unwrap();
    f.sync_all().unwrap();
    f.sync_data().unwrap();
    // SAFETY: posix_fallocate takes plain integers, `f`'s fd open for the call. libc's, not
    // rustix's fallocate: glibc falls back to writing zeros where fallocate(2) is refused.
    let rc = unsafe { libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 1 << 20) };
    assert_eq!(rc, 0);
    assert_eq!(f.metadata().unwrap().len(), 1 << 20);
    drop(f);
    let st = statvfs(&m.mountpoint);
    assert!(st.f_bavail > 0 && st.f_namemax == 255);

    // A second mount of the same layer sees the layer as published, not this scratch.
    let other = d.mount(&store, &work.join("mnt2"), &["base:v1"]).unwrap();
    assert_eq!(
        fs::read(other.path("etc/config.txt")).unwrap(),
        b"threads = 4\n"
    );
    assert!(other.path("data/table.csv").exists());
    assert_eq!(names(&other.path("data/sub")), ["deep.txt"]);
    assert!(!other.path("log").exists());
    drop((other, m, d));
    let _ = fs::remove_dir_all(&work);
}

#[test]
fn first_write_into_a_large_lower_file_copies_only_its_blocks() {
    let work = strata_tests::scratch_dir("scratch-copyup");
    let store = garage::bucket("scratch-copyup");
    let d = Daemon::start(garage::shared().env(), &work.join("daemon"), &[]).unwrap();
    let mut big = publish_base(&d, &work, &store);
    let m = d.mount(&store, &work.join("mnt"), &["base:v1"]).unwrap();

    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("model.bin"))
        .unwrap();
    let start = Instant::now();
    f.write_all_at(b"PATCHED", 10 << 20).unwrap();
    let first_write = start.elapsed();
    big[10 << 20..(10 << 20) + 7].copy_from_slice(b"PATCHED");
    // Extend past the end, then cut back into the lower part.
    f.write_all_at(b"tail", big.len() as u64 + 100).unwrap();
    f.set_len(20 << 20).unwrap();
    big.truncate(20 << 20);
    f.set_len(21 << 20).unwrap();
    big.resize(21 << 20, 0);
    drop(f);

    let scratch = d.scratch_dirs();
    let used = disk_usage(&scratch[0]);
    assert!(
        used < 4 << 20,
        "a 7-byte write into a 24 MiB file took {used} bytes of scratch"
    );
    let mut back = Vec::new();
    fs::File::open(m.path("model.bin"))
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back.len(), big.len());
    assert!(back == big, "bytes after partial copy-up differ");
    println!("first write into a 24 MiB lower file: {first_write:?}, scratch {used} bytes");
    drop((m, d));
    let _ = fs::remove_dir_all(&work);
}

#[test]
fn each_mount_has_its_own_scratch_and_a_quota() {
    let work = strata_tests::scratch_dir("scratch-private");
    let store = garage::bucket("scratch-private");
    let mut d = Daemon::start(garage::shared().env(), &work.join("daemon"), &[]).unwrap();
    publish_base(&d, &work, &store);
    let a = d.mount(&store, &work.join("a"), &["base:v1"]).unwrap();
    let b = d
        .mount_with(
            &store,
            &work.join("b"),
            &["base:v1"],
            &["--scratch-size", "4M"],
        )
        .unwrap();
    let ro = d
        .mount_with(&store, &work.join("ro"), &["base:v1"], &["--read-only"])
        .unwrap();
    fs::write(a.path("only-a.txt"), b"a").unwrap();
    fs::write(b.path("only-b.txt"), b"b").unwrap();
    assert!(!b.path("only-a.txt").exists());
    assert!(!a.path("only-b.txt").exists());
    assert_eq!(d.scratch_dirs().len(), 2, "the read-only mount has none");
    for dir in d.scratch_dirs() {
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    }

    // Read-only: every change is EROFS.
    let e = fs::write(ro.path("x"), b"x").unwrap_err();
    assert_eq!(errno_of(&e), libc::EROFS, "{e}");
    let e = fs::remove_file(ro.path("etc/keep.txt")).unwrap_err();
    assert_eq!(errno_of(&e), libc::EROFS, "{e}");

    // Quota: writes stop with ENOSPC; what was written stays intact.
    let kept = pseudo_random(42, 1 << 20);
    fs::write(b.path("kept.bin"), &kept).unwrap();
    let mut f = fs::File::create(b.path("filler")).unwrap();
    let chunk = vec![7u8; 256 << 10];
    let mut written = 0u64;
    let err = loop {
        match f.write_all(&chunk) {
            Ok(()) => written += chunk.len() as u64,
            Err(e) => break e,
        }
        assert!(written < 64 << 20, "quota never enforced");
    };
    assert_eq!(errno_of(&err), libc::ENOSPC, "{err}");
    assert!(written <= 4 << 20);
    drop(f);
    assert!(fs::read(b.path("kept.bin")).unwrap() == kept);
    // Freeing space makes room again.
    fs::remove_file(b.path("filler")).unwrap();
    fs::write(b.path("after.bin"), vec![1u8; 1 << 20]).unwrap();

    // Unmount removes the scratch; a crash leaves it for the next start to remove.
    drop(a);
    let start = Instant::now();
    while d.scratch_dirs().len() != 1 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            d.scratch_dirs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    d.kill();
    assert_eq!(d.scratch_dirs().len(), 1);
    d.restart().unwrap();
    assert!(d.scratch_dirs().is_empty(), "{:?}", d.scratch_dirs());
    drop((b, ro, d));
    let _ = fs::remove_dir_all(&work);
}

#[test]
fn readdir_while_the_directory_changes_returns_no_entry_twice() {
    let work = strata_tests::scratch_dir("scratch-readdir");
    let store = garage::bucket("scratch-readdir");
    let src = work.join("src");
    for i in 0..300 {
        write_file(&src.join(format!("dir/f{i:03}")), b"x");
    }
    let d = Daemon::start(garage::shared().env(), &work.join("daemon"), &[]).unwrap();
    d.strata().publish(&src, &store, "many:v1");
    let m = d.mount(&store, &work.join("mnt"), &["many:v1"]).unwrap();
    let dir = m.path("dir");
    let mut seen = std::collections::HashSet::new();
    for (i, e) in fs::read_dir(&dir).unwrap().enumerate() {
        let name = e.unwrap().file_name();
        assert!(seen.insert(name.clone()), "{name:?} listed twice");
        // Change the directory under the listing: remove, add, rename.
        if i % 3 == 0 {
            let _ = fs::remove_file(dir.join(&name));
            fs::write(dir.join(format!("new{i}")), b"y").unwrap();
        } else if i % 3 == 1 {
            let _ = fs::rename(dir.join(&name), dir.join(format!("moved{i}")));
        }
    }
    assert!(seen.len() >= 300);
    // A rewind sees the current listing.
    let mut d2 = fs::read_dir(&dir).unwrap();
    let first = d2.next();
    assert!(first.is_some());
    drop((m, d));
    let _ = fs::remove_dir_all(&work);
}

/// A listing hands the kernel each entry's attributes (READDIRPLUS), so what `ls -l` and
/// `find` see comes from the listing: it must be what a lookup gives, for layer entries,
/// entries changed in the upper, new ones, and names that changed since the listing began.
#[test]
fn a_listing_carries_each_entrys_attributes() {
    let work = strata_tests::scratch_dir("scratch-readdirplus");
    let store = garage::bucket("scratch-readdirplus");
    let src = work.join("src");
    for i in 0..400u32 {
        // More entries than one reply holds, with sizes and modes that differ per entry.
        let p = src.join(format!("dir/f{i:03}"));
        write_file(&p, &vec![b'x'; i as usize * 7]);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600 + (i % 8) * 0o10)).unwrap();
    }
    fs::create_dir_all(src.join("dir/sub")).unwrap();
    std::os::unix::fs::symlink("f001", src.join("dir/link")).unwrap();
    let d = Daemon::start(garage::shared().env(), &work.join("daemon"), &[]).unwrap();
    d.strata().publish(&src, &store, "attrs:v1");
    let m = d.mount(&store, &work.join("mnt"), &["attrs:v1"]).unwrap();
    let dir = m.path("dir");
    // Changes in the upper before the listing: a chmod, a rewrite, a new file, a removal.
    fs::set_permissions(dir.join("f005"), fs::Permissions::from_mode(0o751)).unwrap();
    fs::write(dir.join("f006"), b"rewritten").unwrap();
    fs::write(dir.join("new"), b"brand new file").unwrap();
    fs::set_permissions(dir.join("new"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::remove_file(dir.join("f007")).unwrap();

    let expected = |name: &str| -> Option<(u64, u32, bool)> {
        match name {
            "f005" => Some((35, 0o751, false)),
            "f006" => Some((9, 0o600 + 6 * 0o10, false)),
            "new" => Some((14, 0o640, false)),
            "f007" | "link" => None,
            "sub" => Some((0, 0, true)),
            _ => {
                let i: u32 = name.strip_prefix('f')?.parse().ok()?;
                Some((i as u64 * 7, 0o600 + (i % 8) * 0o10, false))
            }
        }
    };
    // Twice: the second listing finds the entries in the kernel's caches, linked by the first.
    for pass in 0..2 {
        let mut seen = 0;
        for (k, e) in fs::read_dir(&dir).unwrap().enumerate() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            assert_ne!(name, "f007", "a removed entry is listed");
            if pass == 1 && k == 100 {
                // A name changed under a listing: the listing's later entries stay right.
                fs::rename(dir.join("f300"), dir.join("renamed")).unwrap();
            }
            let meta = match fs::symlink_metadata(e.path()) {
                Ok(m) => m,
                Err(err) if errno_of(&err) == libc::ENOENT => continue, // renamed meanwhile
                Err(err) => panic!("{name}: {err}"),
            };
            assert_eq!(
                meta.ino(),
                e.ino(),
                "{name}: the listing's inode is the lookup's"
            );
            if name == "link" {
                assert!(meta.file_type().is_symlink());
                assert_eq!(fs::read_link(e.path()).unwrap(), Path::new("f001"));
                continue;
            }
            let (size, mode, is_dir) = expected(&name).unwrap_or_else(|| panic!("{name} listed"));
            assert_eq!(meta.is_dir(), is_dir, "{name}");
            if !is_dir {
                assert_eq!(meta.len(), size, "{name}: size");
                assert_eq!(meta.mode() & 0o7777, mode, "{name}: mode {:o}", meta.mode());
            }
            seen += 1;
        }
        assert!(seen >= 400, "pass {pass}: {seen} entries");
    }
    // What was listed reads back as it is.
    assert_eq!(fs::read(dir.join("f006")).unwrap(), b"rewritten");
    assert_eq!(fs::read(dir.join("renamed")).unwrap(), vec![b'x'; 2100]);
    drop((m, d));
    let _ = fs::remove_dir_all(&work);
}

/// The kernel counts each entry a listing hands it with attributes as looked up, and forgets
/// it later: strata must count the same, or it would drop a node the kernel still uses (too
/// few) or keep removed ones for ever (too many).
#[test]
fn entries_listed_with_attributes_are_kept_while_used_and_dropped_when_forgotten() {
    let work = strata_tests::scratch_dir("scratch-readdirplus-counts");
    let store = garage::bucket("scratch-readdirplus-counts");
    let d = Daemon::start(garage::shared().env(), &work.join("daemon"), &[]).unwrap();
    publish_base(&d, &work, &store);
    let m = d
        .mount_with(
            &store,
            &work.join("m"),
            &["base:v1"],
            &["--scratch-inodes", "300"],
        )
        .unwrap();
    fs::create_dir(m.path("up")).unwrap();
    fs::create_dir(m.path("up/d")).unwrap();
    let free_at_start = statvfs(&m.path("")).f_ffree;
    for round in 0..3 {
        for i in 0..100 {
            fs::write(m.path(&format!("up/f{i}")), b"x").unwrap();
        }
        // The kernel drops its entries (so that the listing links them afresh), then lists.
        fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
        let listed = names(&m.path("up"));
        assert_eq!(listed.len(), 101, "round {round}");
        for i in 0..100 {
            fs::remove_file(m.path(&format!("up/f{i}"))).unwrap();
        }
    }
    // Every removed file is forgotten by the kernel (a moment later), and strata frees it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let free = statvfs(&m.path("")).f_ffree;
        if free >= free_at_start {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{free} inodes free after removing what was made, {free_at_start} before"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A directory whose only count is its listing's: held (through the dentry the listing
    // made; an O_PATH open sends strata nothing), removed, and still answered for the holder
    // by strata itself (a forced statx is not served from the kernel's cache).
    fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    assert_eq!(names(&m.path("up")), ["d"]);
    use rustix::fs::{AtFlags, Mode, OFlags, StatxFlags};
    let held = rustix::fs::open(
        m.path("up/d"),
        OFlags::PATH | OFlags::DIRECTORY,
        Mode::empty(),
    )
    .unwrap();
    fs::remove_dir(m.path("up/d")).unwrap();
    let st = rustix::fs::statx(
        &held,
        "",
        AtFlags::EMPTY_PATH | AtFlags::STATX_FORCE_SYNC,
        StatxFlags::NLINK,
    )
    .unwrap_or_else(|e| panic!("a removed directory still held: {e}"));
    assert_eq!(st.stx_nlink, 0);
    drop(held);
    drop(m);
    let _ = fs::remove_dir_all(&work);
}

#[test]
fn open_files_outlive_their_names() {
    let work = strata_tests::scratch_dir("scratch-open-unlinked");
    let store = garage::bucket("scratch-open-unlinked");
    let d = Daemon::start(garage::shared().env(), &work.join("daemon"), &[]).unwrap();
    publish_base(&d, &work, &store);
    let m = d.mount(&store, &work.join("mnt"), &["base:v1"]).unwrap();

    // A reader of an untouched layer file; the file is then changed, and a new version is
    // renamed over its name (the usual atomic save).
    let reader = fs::File::open(m.path("etc/keep.txt")).unwrap();
    let mut buf = [0u8; 5];
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"keep\n");
    fs::OpenOptions::new()
        .write(true)
        .open(m.path("etc/keep.txt"))
        .unwrap()
        .write_all_at(b"KEEP", 0)
        .unwrap();
    fs::write(m.path("etc/keep.new"), b"new version\n").unwrap();
    fs::rename(m.path("etc/keep.new"), m.path("etc/keep.txt")).unwrap();
    // The reader still has its file: the same inode, with the change made through it.
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"KEEP\n");
    assert_eq!(reader.metadata().unwrap().nlink(), 0);
    assert_eq!(fs::read(m.path("etc/keep.txt")).unwrap(), b"new version\n");
    drop(reader);

    // A directory removed while a process is inside it still answers stat, with no links.
    fs::create_dir(m.path("gone")).unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("cd gone && rmdir ../gone && stat -c %h .")
        .current_dir(&m.mountpoint)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
    drop((m, d));
    let _ = fs::remove_dir_all(&work);
}

fn statvfs(path: &Path) -> rustix::fs::StatVfs {
    rustix::fs::statvfs(path).unwrap_or_else(|e| panic!("statvfs {path:?}: {e}"))
}

#[test]
fn a_mount_cannot_make_more_nodes_than_its_inode_limit() {
    let work = strata_tests::scratch_dir("scratch-inodes");
    let store = garage::bucket("scratch-inodes");
    let d = Daemon::start(garage::shared().env(), &work.join("daemon"), &[]).unwrap();
    publish_base(&d, &work, &store);
    let m = d
        .mount_with(
            &store,
            &work.join("m"),
            &["base:v1"],
            &["--scratch-inodes", "50"],
        )
        .unwrap();
    let before = statvfs(&m.path(""));
    assert!(
        before.f_ffree > 0 && before.f_ffree <= 50,
        "free inodes {} with a limit of 50",
        before.f_ffree
    );
    assert!(before.f_files >= before.f_ffree);
    // Files one after another until the upper is full: ENOSPC, at the limit, not before.
    let mut made = 0;
    let err = loop {
        match fs::write(m.path(&format!("f{made}")), b"x") {
            Ok(()) => made += 1,
            Err(e) => break e,
        }
        assert!(made <= 50, "the limit of 50 was not enforced");
    };
    assert_eq!(errno_of(&err), libc::ENOSPC, "{err}");
    assert!(
        made >= 45,
        "only {made} files before ENOSPC with a limit of 50"
    );
    let e = fs::create_dir(m.path("another-dir")).unwrap_err();
    assert_eq!(errno_of(&e), libc::ENOSPC, "{e}");
    assert_eq!(statvfs(&m.path("")).f_ffree, 0);
    // What was made is intact, and the layers are still read.
    for i in 0..made {
        assert_eq!(fs::read(m.path(&format!("f{i}"))).unwrap(), b"x");
    }
    assert!(m.path("etc/keep.txt").exists());
    drop(m);
    let _ = fs::remove_dir_all(&work);
}

#[test]
fn a_bug_in_one_request_costs_that_request_alone() {
    let work = strata_tests::scratch_dir("scratch-panic");
    let store = garage::bucket("scratch-panic");
    let mut env = garage::shared().env();
    // Debug builds panic on a lookup of this name (a stand-in for any bug in a handler).
    env.push(("STRATA_TEST_PANIC_LOOKUP".into(), "boom".into()));
    let d = Daemon::start(env, &work.join("daemon"), &[]).unwrap();
    // The control socket is born with its final mode: no window where others may connect.
    let mode = fs::metadata(d.socket()).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    publish_base(&d, &work, &store);
    let a = d.mount(&store, &work.join("a"), &["base:v1"]).unwrap();
    let b = d.mount(&store, &work.join("b"), &["base:v1"]).unwrap();
    for _ in 0..3 {
        let e = fs::metadata(a.path("boom")).unwrap_err();
        assert_eq!(errno_of(&e), libc::EIO, "{e}");
    }
    // The same mount, the other mount and the daemon go on.
    assert_eq!(
        fs::read(a.path("etc/keep.txt")).unwrap(),
        fs::read(b.path("etc/keep.txt")).unwrap()
    );
    fs::write(a.path("after.txt"), b"still here").unwrap();
    assert_eq!(fs::read(a.path("after.txt")).unwrap(), b"still here");
    // Counted as what the function saw: EIO, on that mount only (each lookup of the name
    // panics; the kernel keeps no entry for a failed one).
    let stats = d.stats();
    let mount_errors = |mp: &std::path::Path| {
        stats["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountpoint"].as_str() == mp.to_str())
            .map(|m| m["errors"]["EIO"].as_u64().unwrap_or(0))
            .unwrap()
    };
    assert!(mount_errors(&a.mountpoint) >= 3, "{stats}");
    assert_eq!(mount_errors(&b.mountpoint), 0, "{stats}");
    assert!(
        d.log_text().contains("internal error in lookup"),
        "the panic is not logged: {}",
        d.log_text()
    );
    drop((a, b));
    let _ = fs::remove_dir_all(&work);
}
