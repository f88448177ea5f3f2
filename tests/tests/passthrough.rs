//! Fully cached large files are read by the kernel from a local copy (FUSE passthrough): the
//! bytes are the layer's, through read and mmap; the copy is rebuilt when it is damaged; an
//! inode with a cached open stays on the FUSE path. Fully cached small files reach the kernel's
//! page cache with their open (a prefill), so their reads never reach strata.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use strata_tests::daemon::Daemon;
use strata_tests::garage;
use strata_tests::tree::{pseudo_random, write_file};

fn total(stats: &serde_json::Value, field: &str) -> u64 {
    stats["total"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("stats has no total.{field}: {stats}"))
}

/// Waits until the daemon reports `want` complete local copies.
fn wait_for_files(d: &Daemon, want: u64) {
    let start = Instant::now();
    loop {
        let stats = d.stats();
        if total(&stats, "disk_files") == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "expected {want} complete local copies: {stats}\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Field `field` of the read stats of the mount at `mountpoint`.
fn mount_stat(stats: &serde_json::Value, mountpoint: &Path, field: &str) -> u64 {
    let mounts = stats["mounts"].as_array().expect("stats has mounts");
    let m = mounts
        .iter()
        .find(|m| {
            m["mountpoint"]
                .as_str()
                .and_then(|p| std::fs::canonicalize(p).ok())
                .as_deref()
                == Some(mountpoint)
        })
        .unwrap_or_else(|| panic!("no mount {} in {stats}", mountpoint.display()));
    m["stats"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("no stats.{field} for {}: {stats}", mountpoint.display()))
}

fn read_with_mmap(path: &Path) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: the mount is read-only; nothing changes the file while it is mapped.
    let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
    map.to_vec()
}

/// The local copies in the daemon's cache dir (not their maps).
fn assembled_files(cache: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for shard in std::fs::read_dir(cache.join("files")).unwrap() {
        for f in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let path = f.unwrap().path();
            if path.extension().is_none() {
                out.push(path);
            }
        }
    }
    out
}

#[test]
fn a_fully_read_file_is_then_read_by_the_kernel_from_its_local_copy() {
    let work = strata_tests::scratch_dir("passthrough");
    // Small neighbours on both sides share chunks with the big file: its copy must hold only
    // its own bytes.
    let before = pseudo_random(31, 70_000);
    let big = pseudo_random(32, 12 << 20);
    let after = pseudo_random(33, 90_000);
    write_file(&work.join("src/a.bin"), &before);
    write_file(&work.join("src/big.bin"), &big);
    write_file(&work.join("src/c.bin"), &after);
    let store = garage::bucket("passthrough");
    let mut d = Daemon::start(garage::shared().env(), &work.join("daemon"), &[]).unwrap();
    d.strata().publish(&work.join("src"), &store, "p:v1");
    let mnt = work.join("mnt");

    {
        let m = d.mount(&store, &mnt, &["p:v1"]).unwrap();
        // A handle held open from the start: the kernel will not mix cached and passthrough
        // opens on one inode, so while it lives every open goes through strata.
        let held = std::fs::File::open(m.path("big.bin")).unwrap();
        assert!(std::fs::read(m.path("big.bin")).unwrap() == big);
        wait_for_files(&d, 1);
        let second = std::fs::read(m.path("big.bin")).unwrap();
        let mut buf = vec![0u8; 4096];
        held.read_exact_at(&mut buf, 5 << 20).unwrap();
        assert!(buf == big[5 << 20..(5 << 20) + 4096]);
        assert!(second == big);
        assert_eq!(total(&d.stats(), "passthrough_opens"), 0);
        drop(held);
        let served_before = total(&d.stats(), "bytes_served");

        // Now nothing holds it: read, and mmap, straight from the local copy.
        let direct = std::fs::read(m.path("big.bin")).unwrap();
        assert!(direct == big, "passthrough read differs from the layer");
        assert!(read_with_mmap(&m.path("big.bin")) == big, "mmap differs");
        let f = std::fs::File::open(m.path("big.bin")).unwrap();
        f.read_exact_at(&mut buf, (12 << 20) - 4096).unwrap();
        assert!(buf == big[(12 << 20) - 4096..]);
        drop(f);
        let stats = d.stats();
        assert!(total(&stats, "passthrough_opens") >= 3, "{stats}");
        assert_eq!(
            total(&stats, "bytes_served"),
            served_before,
            "passthrough reads should not reach strata: {stats}"
        );
        // The neighbours (small: never passthrough) are intact.
        assert!(std::fs::read(m.path("a.bin")).unwrap() == before);
        assert!(std::fs::read(m.path("c.bin")).unwrap() == after);
    }
    assert!(d.stop().unwrap().success(), "{}", d.log_text());

    // Damage the copy while the daemon is down: it is caught before the kernel sees it.
    let copies = assembled_files(&d.cache_dir);
    assert_eq!(copies.len(), 1, "{copies:?}");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&copies[0])
        .unwrap();
    f.write_all_at(b"garbage!", 1 << 20).unwrap();
    drop(f);

    d.restart().unwrap();
    let m = d.mount(&store, &mnt, &["p:v1"]).unwrap();
    assert!(std::fs::read(m.path("big.bin")).unwrap() == big);
    let start = Instant::now();
    while !d.log_text().contains("local copy is corrupt") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Rebuilt from the chunks after the next full read, then read directly again.
    assert!(std::fs::read(m.path("big.bin")).unwrap() == big);
    wait_for_files(&d, 1);
    assert!(std::fs::read(m.path("big.bin")).unwrap() == big);
    let stats = d.stats();
    assert!(total(&stats, "passthrough_opens") >= 1, "{stats}");
    assert_eq!(total(&stats, "errors"), 0, "{stats}");
    drop((m, d));
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn no_passthrough_keeps_every_read_in_strata() {
    let work = strata_tests::scratch_dir("no-passthrough");
    let big = pseudo_random(34, 3 << 20);
    write_file(&work.join("src/big.bin"), &big);
    let store = garage::bucket("no-passthrough");
    let d = Daemon::start(
        garage::shared().env(),
        &work.join("daemon"),
        &["--no-passthrough"],
    )
    .unwrap();
    d.strata().publish(&work.join("src"), &store, "p:v1");
    let m = d.mount(&store, &work.join("mnt"), &["p:v1"]).unwrap();
    for _ in 0..3 {
        assert!(std::fs::read(m.path("big.bin")).unwrap() == big);
    }
    let stats = d.stats();
    assert_eq!(total(&stats, "passthrough_opens"), 0, "{stats}");
    drop((m, d));
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn a_file_read_through_passthrough_is_written_once_its_readers_are_gone() {
    let work = strata_tests::scratch_dir("passthrough-write");
    let big = pseudo_random(35, 4 << 20);
    let other = pseudo_random(36, 2 << 20);
    write_file(&work.join("src/big.bin"), &big);
    write_file(&work.join("src/other.bin"), &other);
    let store = garage::bucket("passthrough-write");
    let d = Daemon::start(garage::shared().env(), &work.join("daemon"), &[]).unwrap();
    d.strata().publish(&work.join("src"), &store, "p:v1");
    let m = d.mount(&store, &work.join("mnt"), &["p:v1"]).unwrap();
    assert!(std::fs::read(m.path("big.bin")).unwrap() == big);
    wait_for_files(&d, 1);

    let passthrough_before = total(&d.stats(), "passthrough_opens");
    let reader = std::fs::File::open(m.path("big.bin")).unwrap();
    assert_eq!(
        total(&d.stats(), "passthrough_opens"),
        passthrough_before + 1
    );
    // A truncate by path is refused too, and a rename or chmod keeps readers working.
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("big.bin"))
        .and_then(|f| f.set_len(0));
    assert!(e.is_err());
    let c = std::ffi::CString::new(m.path("big.bin").to_str().unwrap()).unwrap();
    // SAFETY: truncate(2) with a NUL-terminated path that outlives the call (rustix has no
    // truncate by path; std's set_len needs the file opened for writing, refused above).
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 0) }, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ETXTBSY)
    );
    std::fs::rename(m.path("big.bin"), m.path("moved.bin")).unwrap();
    std::fs::set_permissions(
        m.path("moved.bin"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    assert!(std::fs::read(m.path("moved.bin")).unwrap() == big);
    std::fs::rename(m.path("moved.bin"), m.path("big.bin")).unwrap();
    // The kernel reads this inode from the layer's copy: no writer until the reader is gone.
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("big.bin"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ETXTBSY), "{e}");
    drop(reader);

    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("big.bin"))
        .unwrap();
    f.write_all_at(b"changed", 1 << 20).unwrap();
    drop(f);
    let mut want = big.clone();
    want[1 << 20..(1 << 20) + 7].copy_from_slice(b"changed");
    // Changed files are read from the upper, never from the layer's copy.
    assert!(std::fs::read(m.path("big.bin")).unwrap() == want);
    assert!(read_with_mmap(&m.path("big.bin")) == want);

    // `cat other; echo >> other`: the reader's release reaches the daemon a moment after its
    // close returned; the writer must not get ETXTBSY for that.
    assert!(std::fs::read(m.path("other.bin")).unwrap() == other);
    wait_for_files(&d, 2);
    assert!(std::fs::read(m.path("other.bin")).unwrap() == other);
    std::fs::OpenOptions::new()
        .append(true)
        .open(m.path("other.bin"))
        .expect("write-open right after a passthrough reader closed")
        .write_all(b"more")
        .unwrap();
    drop((m, d));
    let _ = std::fs::remove_dir_all(&work);
}

/// A new mount on a host whose cache holds a layer (a new sandbox on a warm host): each small
/// file's bytes go to the kernel's page cache with its first open, so its reads cost no trip
/// through the daemon; the bytes are the layer's, the kernel keeps them for later opens, and a
/// change made after a prefill is what is read back.
#[test]
fn small_cached_files_reach_the_page_cache_with_their_open() {
    let work = strata_tests::scratch_dir("prefill");
    // Sizes from 1 byte up to the largest prefilled (128 KiB), most not page-aligned, and one
    // just past it.
    let mut files: Vec<(String, Vec<u8>)> = (0..40u64)
        .map(|i| {
            (
                format!("f{i:02}"),
                pseudo_random(100 + i, 1 + i as usize * 3301),
            )
        })
        .collect();
    files.push(("edge".into(), pseudo_random(98, 128 << 10)));
    let big = pseudo_random(99, (128 << 10) + 1);
    for (name, bytes) in &files {
        write_file(&work.join("src").join(name), bytes);
    }
    write_file(&work.join("src/big"), &big);
    let store = garage::bucket("prefill");
    let d = Daemon::start(garage::shared().env(), &work.join("daemon"), &[]).unwrap();
    d.strata().publish(&work.join("src"), &store, "p:v1");
    {
        // A first invocation on this host: its reads fetch the layer's chunks.
        let m = d.mount(&store, &work.join("first"), &["p:v1"]).unwrap();
        for (name, bytes) in &files {
            assert!(std::fs::read(m.path(name)).unwrap() == *bytes, "{name}");
        }
        assert!(std::fs::read(m.path("big")).unwrap() == big);
    }
    let m = d.mount(&store, &work.join("mnt"), &["p:v1"]).unwrap();
    let mnt = std::fs::canonicalize(m.path("")).unwrap();
    let n = files.len() as u64;
    for (name, bytes) in &files {
        assert!(std::fs::read(m.path(name)).unwrap() == *bytes, "{name}");
    }
    let stats = d.stats();
    assert_eq!(mount_stat(&stats, &mnt, "prefilled_opens"), n, "{stats}");
    // One read per file, the prefill's: the kernel never asked strata for their bytes.
    assert_eq!(mount_stat(&stats, &mnt, "reads"), n, "{stats}");

    // Opened again, they are still in the page cache: no prefill, no read.
    for (name, bytes) in &files {
        assert!(std::fs::read(m.path(name)).unwrap() == *bytes, "{name}");
    }
    assert!(std::fs::read(m.path("big")).unwrap() == big);
    let stats = d.stats();
    assert_eq!(mount_stat(&stats, &mnt, "prefilled_opens"), n, "{stats}");
    assert!(
        mount_stat(&stats, &mnt, "reads") > n,
        "the larger file is read: {stats}"
    );

    // Once the kernel drops the inodes (and their page cache), the next opens prefill again.
    std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for (name, bytes) in &files {
        assert!(std::fs::read(m.path(name)).unwrap() == *bytes, "{name}");
    }
    let again = mount_stat(&d.stats(), &mnt, "prefilled_opens") - n;
    // (A FORGET still being handled when the file is opened again leaves that one unfilled.)
    assert!(again >= n / 2, "prefilled again: {again} of {n}");

    // Changes after a prefill are what is read back: a rewrite, a truncate, an append.
    std::fs::write(m.path("f03"), b"rewritten").unwrap();
    assert_eq!(std::fs::read(m.path("f03")).unwrap(), b"rewritten");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("f05"))
        .unwrap();
    f.set_len(10).unwrap();
    drop(f);
    assert!(std::fs::read(m.path("f05")).unwrap() == files[5].1[..10]);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(m.path("f07"))
        .unwrap();
    f.write_all(b"+tail").unwrap();
    drop(f);
    let mut want = files[7].1.clone();
    want.extend_from_slice(b"+tail");
    assert!(std::fs::read(m.path("f07")).unwrap() == want);
    drop((m, d));
    let _ = std::fs::remove_dir_all(&work);
}
