//! The upper through its plain API, without a mount: the cases the FUSE suites do not reach
//! (renameat2 flags, partial copy-up edge cases, unlinked open files, read-only trees).

use std::sync::Arc;

use super::*;
use crate::stack::tests::{stack_of, write};

const ROOT: u64 = crate::stack::ROOT_INO;

fn caller() -> Caller {
    Caller { uid: 0, gid: 0 }
}

async fn tree_of(tmp: &Path, writable: bool) -> MountTree {
    let stack = Arc::new(stack_of(tmp, &["lower"]).await);
    let upper = writable.then(|| UpperConfig::scratch(tmp.join("upper")));
    MountTree::new(stack, upper).unwrap()
}

fn lower_tree(tmp: &Path) -> Vec<u8> {
    let big: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
    write(tmp, "lower/big.bin", &big);
    write(tmp, "lower/dir/a.txt", b"a");
    write(tmp, "lower/dir/sub/b.txt", b"b");
    big
}

/// A tree over `tmp/lower` whose upper keeps a journal: the stack and upper, to recover with.
async fn journaled(tmp: &Path) -> (Arc<LayerStack>, UpperConfig, MountTree) {
    let stack = Arc::new(stack_of(tmp, &["lower"]).await);
    let upper = UpperConfig::journaled(tmp.join("upper"));
    let t = MountTree::new(stack.clone(), Some(upper.clone())).unwrap();
    (stack, upper, t)
}

async fn read_all(t: &MountTree, ino: u64) -> Vec<u8> {
    let size = t.getattr(ino).unwrap().size;
    t.read(ino, 0, size as u32 + 100).await.unwrap().to_vec()
}

#[tokio::test]
async fn rename_exchange_swaps_a_layer_directory_and_an_upper_file() {
    let tmp = tempfile::tempdir().unwrap();
    lower_tree(tmp.path());
    let t = tree_of(tmp.path(), true).await;
    let f = t.create(ROOT, b"file", 0o644, caller()).unwrap();
    let dir = t.lookup(ROOT, b"dir").unwrap();
    let sub = t.lookup(dir.ino, b"sub").unwrap();
    t.rename(dir.ino, b"sub", ROOT, b"file", libc::RENAME_EXCHANGE)
        .unwrap();
    assert_eq!(t.lookup(ROOT, b"file").unwrap().ino, sub.ino);
    assert_eq!(t.lookup(dir.ino, b"sub").unwrap().ino, f.ino);
    // The directory moved from `dir` to the root: link counts follow.
    assert_eq!(t.getattr(dir.ino).unwrap().nlink, 2);
    let b = t.lookup(sub.ino, b"b.txt").unwrap();
    assert_eq!(read_all(&t, b.ino).await, b"b");
    // NOREPLACE refuses an existing name; EXCHANGE needs one.
    let e = t
        .rename(ROOT, b"big.bin", ROOT, b"file", libc::RENAME_NOREPLACE)
        .unwrap_err();
    assert_eq!(e.errno(), libc::EEXIST);
    let e = t
        .rename(ROOT, b"big.bin", ROOT, b"none", libc::RENAME_EXCHANGE)
        .unwrap_err();
    assert_eq!(e.errno(), libc::ENOENT);
}

#[tokio::test]
async fn partial_copy_up_reads_layer_bytes_around_written_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let mut want = lower_tree(tmp.path());
    let t = tree_of(tmp.path(), true).await;
    let big = t.lookup(ROOT, b"big.bin").unwrap();
    t.open(big.ino, true).unwrap();
    t.write(big.ino, 300_000, b"hello").await.unwrap();
    want[300_000..300_005].copy_from_slice(b"hello");
    assert_eq!(read_all(&t, big.ino).await, want);
    // Only the written block is in the data file.
    let data = std::fs::metadata(tmp.path().join("upper").join(format!("{:x}", big.ino))).unwrap();
    assert!(std::os::unix::fs::MetadataExt::blocks(&data) * 512 <= 2 * COPY_UP_BLOCK);
    // Cut into an unwritten block, grow again: zeros after the cut, not layer bytes.
    let cut = 600_000;
    t.setattr(
        big.ino,
        SetAttr {
            size: Some(cut),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    t.setattr(
        big.ino,
        SetAttr {
            size: Some(650_000),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    want.truncate(cut as usize);
    want.resize(650_000, 0);
    assert_eq!(read_all(&t, big.ino).await, want);
    // The inode number never changed.
    assert_eq!(t.lookup(ROOT, b"big.bin").unwrap().ino, big.ino);
    t.release(big.ino);
}

#[tokio::test]
async fn an_unlinked_file_lives_while_open() {
    let tmp = tempfile::tempdir().unwrap();
    lower_tree(tmp.path());
    let t = tree_of(tmp.path(), true).await;
    let f = t.create(ROOT, b"tmp", 0o600, caller()).unwrap();
    t.open(f.ino, true).unwrap();
    t.write(f.ino, 0, b"still here").await.unwrap();
    t.unlink(ROOT, b"tmp").unwrap();
    assert_eq!(t.lookup(ROOT, b"tmp").unwrap_err().errno(), libc::ENOENT);
    assert_eq!(t.getattr(f.ino).unwrap().nlink, 0);
    assert_eq!(read_all(&t, f.ino).await, b"still here");
    let data = tmp.path().join("upper").join(format!("{:x}", f.ino));
    assert!(data.exists());
    t.release(f.ino);
    assert!(!data.exists(), "the last close frees the data file");
}

#[tokio::test]
async fn a_tree_without_an_upper_refuses_every_change() {
    let tmp = tempfile::tempdir().unwrap();
    lower_tree(tmp.path());
    let t = tree_of(tmp.path(), false).await;
    let big = t.lookup(ROOT, b"big.bin").unwrap();
    let erofs = |r: FsResult<Stat>| assert_eq!(r.unwrap_err().errno(), libc::EROFS);
    erofs(t.mkdir(ROOT, b"new", 0o755, caller()));
    erofs(t.create(ROOT, b"new", 0o644, caller()));
    erofs(
        t.setattr(
            big.ino,
            SetAttr {
                mode: Some(0o600),
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(t.open(big.ino, true).unwrap_err().errno(), libc::EROFS);
    assert_eq!(t.unlink(ROOT, b"big.bin").unwrap_err().errno(), libc::EROFS);
    t.open(big.ino, false).unwrap();
    assert!(t.reads_from_layers(big.ino));
}

#[tokio::test]
async fn changes_name_every_path_the_upper_differs_at() {
    let tmp = tempfile::tempdir().unwrap();
    lower_tree(tmp.path());
    write(tmp.path(), "lower/keep/deep/x.txt", b"x");
    write(tmp.path(), "lower/keep/deep/y.txt", b"y");
    write(tmp.path(), "lower/gone/z.txt", b"z");
    let t = tree_of(tmp.path(), true).await;
    assert!(t.changes().unwrap().is_empty());

    // A write to a layer file; a chmod deep in directories whose listings never changed.
    let big = t.lookup(ROOT, b"big.bin").unwrap();
    t.open(big.ino, true).unwrap();
    t.write(big.ino, 10, b"w").await.unwrap();
    t.release(big.ino);
    let keep = t.lookup(ROOT, b"keep").unwrap();
    let deep = t.lookup(keep.ino, b"deep").unwrap();
    let x = t.lookup(deep.ino, b"x.txt").unwrap();
    t.setattr(
        x.ino,
        SetAttr {
            mode: Some(0o600),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // A directory moved, a new file, a directory removed and made anew.
    let dir = t.lookup(ROOT, b"dir").unwrap();
    t.rename(ROOT, b"dir", ROOT, b"moved", 0).unwrap();
    t.create(ROOT, b"new.txt", 0o644, caller()).unwrap();
    let gone = t.lookup(ROOT, b"gone").unwrap();
    t.unlink(gone.ino, b"z.txt").unwrap();
    t.rmdir(ROOT, b"gone").unwrap();
    let again = t.mkdir(ROOT, b"gone", 0o755, caller()).unwrap();

    let new = t.lookup(ROOT, b"new.txt").unwrap();
    let changes = t.changes().unwrap();
    let want = vec![
        Change::Changed {
            path: vec![],
            ino: ROOT,
        },
        Change::Changed {
            path: b"big.bin".to_vec(),
            ino: big.ino,
        },
        Change::Removed {
            path: b"dir".to_vec(),
        },
        Change::Placed {
            path: b"gone".to_vec(),
            ino: again.ino,
            hides_lower: true,
        },
        Change::Changed {
            path: b"keep/deep/x.txt".to_vec(),
            ino: x.ino,
        },
        Change::Placed {
            path: b"moved".to_vec(),
            ino: dir.ino,
            hides_lower: false,
        },
        Change::Placed {
            path: b"new.txt".to_vec(),
            ino: new.ino,
            hides_lower: false,
        },
    ];
    assert_eq!(changes, want);
}

#[tokio::test]
async fn punching_a_hole_in_a_layer_file_reads_zeros_there_only() {
    let tmp = tempfile::tempdir().unwrap();
    let mut want = lower_tree(tmp.path());
    let t = tree_of(tmp.path(), true).await;
    let big = t.lookup(ROOT, b"big.bin").unwrap();
    t.open(big.ino, true).unwrap();
    // Across a block boundary, partly covering both blocks.
    let hole = 200_000..300_000u64;
    t.fallocate(
        big.ino,
        hole.start,
        hole.end - hole.start,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    )
    .await
    .unwrap();
    want[hole.start as usize..hole.end as usize].fill(0);
    assert_eq!(read_all(&t, big.ino).await, want);
    // Zeroing past the end grows the file.
    let size = want.len() as u64;
    t.fallocate(big.ino, size - 10, 100, libc::FALLOC_FL_ZERO_RANGE)
        .await
        .unwrap();
    want.truncate(want.len() - 10);
    want.resize(want.len() + 100, 0);
    assert_eq!(t.getattr(big.ino).unwrap().size, size + 90);
    assert_eq!(read_all(&t, big.ino).await, want);
    // Collapsing a range is not supported.
    let e = t
        .fallocate(big.ino, 0, 4096, libc::FALLOC_FL_COLLAPSE_RANGE)
        .await
        .unwrap_err();
    assert_eq!(e.errno(), libc::EOPNOTSUPP);
    t.release(big.ino);
}

#[tokio::test]
async fn a_journaled_upper_recovers_what_was_fsynced() {
    let tmp = tempfile::tempdir().unwrap();
    let mut want = lower_tree(tmp.path());
    let (stack, upper, t) = journaled(tmp.path()).await;
    // A new file, fsync'ed; a layer file partly rewritten and closed, never fsync'ed itself;
    // a removed layer file and a renamed directory.
    let log = t.create(ROOT, b"log", 0o600, caller()).unwrap();
    t.open(log.ino, true).unwrap();
    t.write(log.ino, 0, b"record 1\n").await.unwrap();
    let big = t.lookup(ROOT, b"big.bin").unwrap();
    t.open(big.ino, true).unwrap();
    t.write(big.ino, 300_000, b"hello").await.unwrap();
    want[300_000..300_005].copy_from_slice(b"hello");
    t.release(big.ino);
    t.unlink(t.lookup(ROOT, b"dir").unwrap().ino, b"a.txt")
        .unwrap();
    t.rename(ROOT, b"dir", ROOT, b"renamed", 0).unwrap();
    t.fsync(log.ino, false).unwrap();
    let journal = upper.dir.join(journal::JOURNAL_FILE);
    let first = std::fs::read(&journal).unwrap();
    // An fsync with nothing new writes nothing.
    t.fsync(log.ino, true).unwrap();
    assert_eq!(std::fs::read(&journal).unwrap(), first);
    // Not fsync'ed: may be lost.
    t.mkdir(ROOT, b"after", 0o755, caller()).unwrap();
    let expected: Vec<Vec<u8>> = {
        let mut c: Vec<Vec<u8>> = t
            .changes()
            .unwrap()
            .iter()
            .map(|c| c.path().to_vec())
            .collect();
        c.retain(|p| p != b"after");
        c
    };

    // "Crash": the tree is dropped without a word; a new one is rebuilt from the directory.
    std::mem::forget(t);
    let r = MountTree::recover(stack, upper).unwrap();
    let log = r.lookup(ROOT, b"log").unwrap();
    assert_eq!(read_all(&r, log.ino).await, b"record 1\n");
    assert_eq!(log.perm, 0o600);
    let big = r.lookup(ROOT, b"big.bin").unwrap();
    assert_eq!(read_all(&r, big.ino).await, want);
    assert!(r.lookup(ROOT, b"dir").is_err());
    let renamed = r.lookup(ROOT, b"renamed").unwrap();
    assert!(r.lookup(renamed.ino, b"a.txt").is_err());
    assert!(r.lookup(renamed.ino, b"sub").is_ok());
    assert!(r.lookup(ROOT, b"after").is_err());
    let got: Vec<Vec<u8>> = r
        .changes()
        .unwrap()
        .iter()
        .map(|c| c.path().to_vec())
        .collect();
    assert_eq!(got, expected);
    // New inodes do not reuse the recovered ones.
    let more = r.create(ROOT, b"more", 0o644, caller()).unwrap();
    assert!(more.ino > log.ino);
}

#[tokio::test]
async fn an_unreadable_journal_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    lower_tree(tmp.path());
    let stack = Arc::new(stack_of(tmp.path(), &["lower"]).await);
    let dir = tmp.path().join("upper");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(journal::JOURNAL_FILE), b"\x93garbage").unwrap();
    let upper = UpperConfig {
        dir,
        quota: None,
        inodes: None,
        journal: true,
    };
    let e = MountTree::recover(stack, upper).err().unwrap();
    assert!(e.to_string().contains("unreadable upper journal"), "{e}");
}

#[tokio::test]
async fn a_rename_over_an_fsynced_file_after_the_last_fsync_keeps_the_old_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    lower_tree(tmp.path());
    let (stack, upper, t) = journaled(tmp.path()).await;
    for (name, bytes) in [(&b"target"[..], &b"old"[..]), (b"target.tmp", b"new")] {
        let f = t.create(ROOT, name, 0o644, caller()).unwrap();
        t.open(f.ino, true).unwrap();
        t.write(f.ino, 0, bytes).await.unwrap();
        t.fsync(f.ino, false).unwrap();
        t.release(f.ino);
    }
    // The classic atomic replace, but the crash comes before anything fsyncs again: the old
    // target's data file must still be there for the journal that names it.
    t.rename(ROOT, b"target.tmp", ROOT, b"target", 0).unwrap();
    std::mem::forget(t);
    let r = MountTree::recover(stack, upper).unwrap();
    let target = r.lookup(ROOT, b"target").unwrap();
    assert_eq!(read_all(&r, target.ino).await, b"old");
    let tmp_file = r.lookup(ROOT, b"target.tmp").unwrap();
    assert_eq!(read_all(&r, tmp_file.ino).await, b"new");
}

#[tokio::test]
async fn journal_appends_changes_survives_a_torn_tail_and_compacts() {
    let tmp = tempfile::tempdir().unwrap();
    lower_tree(tmp.path());
    let (stack, upper, t) = journaled(tmp.path()).await;
    // Many files, then many small fsynced appends to one of them: each fsync appends the one
    // changed record, not the whole table.
    for i in 0..200 {
        t.create(ROOT, format!("f{i}").as_bytes(), 0o644, caller())
            .unwrap();
    }
    let log = t.create(ROOT, b"log", 0o644, caller()).unwrap();
    t.open(log.ino, true).unwrap();
    t.fsync(log.ino, false).unwrap();
    let journal = upper.dir.join(journal::JOURNAL_FILE);
    let snapshot = std::fs::metadata(&journal).unwrap().len();
    let mut want = Vec::new();
    for i in 0..100u32 {
        let rec = format!("record {i}\n");
        t.write(log.ino, want.len() as u64, rec.as_bytes())
            .await
            .unwrap();
        want.extend_from_slice(rec.as_bytes());
        t.fsync(log.ino, true).unwrap();
    }
    let grown = std::fs::metadata(&journal).unwrap().len() - snapshot;
    assert!(
        grown < 32 * 1024,
        "100 fsyncs of one file appended {grown} bytes to a {snapshot}-byte journal"
    );
    // A crash in the middle of the next append: half a frame at the end.
    t.unlink(ROOT, b"f0").unwrap();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&journal)
            .unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap();
    }
    std::mem::forget(t);
    let r = MountTree::recover(stack.clone(), upper.clone()).unwrap();
    let got = r.lookup(ROOT, b"log").unwrap();
    assert_eq!(read_all(&r, got.ino).await, want);
    assert!(
        r.lookup(ROOT, b"f0").is_ok(),
        "the unlink was never fsync'ed"
    );
    assert!(r.lookup(ROOT, b"f199").is_ok());

    // Appends past the slack make the next update a fresh snapshot.
    let big = r.lookup(ROOT, b"big.bin").unwrap();
    r.open(big.ino, true).unwrap();
    r.fsync(big.ino, true).unwrap(); // a recovered tree starts with a snapshot
    let mut size = std::fs::metadata(&journal).unwrap().len();
    let mut compacted = false;
    for i in 0..5_000u64 {
        r.write(big.ino, i * 7, b"x").await.unwrap();
        r.fsync(big.ino, true).unwrap();
        let now = std::fs::metadata(&journal).unwrap().len();
        if now < size {
            compacted = true;
            break;
        }
        size = now;
    }
    assert!(
        compacted,
        "the journal grew to {size} bytes without a new snapshot"
    );
    r.release(big.ino);
    std::mem::forget(r);
    let again = MountTree::recover(stack, upper).unwrap();
    assert!(again.lookup(ROOT, b"f199").is_ok());
}

/// Hard links make no records, but each name is an entry the daemon keeps: they count against
/// the inode limit, and a removed link frees its place.
#[tokio::test]
async fn hard_links_count_against_the_inode_limit() {
    let tmp = tempfile::tempdir().unwrap();
    lower_tree(tmp.path());
    let stack = Arc::new(stack_of(tmp.path(), &["lower"]).await);
    let upper = UpperConfig {
        inodes: Some(10),
        ..UpperConfig::scratch(tmp.path().join("upper"))
    };
    let t = MountTree::new(stack, Some(upper)).unwrap();
    let f = t.create(ROOT, b"f", 0o644, caller()).unwrap();
    t.release(f.ino);
    let records = 10 - t.statfs().free_files;
    let mut made = 0;
    let err = loop {
        match t.link(f.ino, ROOT, format!("l{made}").as_bytes()) {
            Ok(_) => made += 1,
            Err(e) => break e,
        }
        assert!(made <= 10, "links past the limit");
    };
    assert_eq!(err.errno(), libc::ENOSPC);
    assert_eq!(made, 10 - records, "every free place taken by a name");
    assert_eq!(t.statfs().free_files, 0);
    assert_eq!(
        t.create(ROOT, b"g", 0o644, caller())
            .err()
            .map(|e| e.errno()),
        Some(libc::ENOSPC)
    );
    t.unlink(ROOT, b"l0").unwrap();
    assert_eq!(t.statfs().free_files, 1);
    t.link(f.ino, ROOT, b"again").unwrap();
}
