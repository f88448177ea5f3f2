//! Fully cached large files are read by the kernel from a local copy (FUSE passthrough): the
//! bytes are the layer's, through read and mmap; the copy is rebuilt when it is damaged; an
//! inode with a cached open stays on the FUSE path.

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
