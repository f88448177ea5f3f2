//! Publish to Garage, mount through FUSE, and check what a user would: the same tree, lazily
//! fetched, deduplicated, stacked.

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Instant;

use strata_tests::garage;
use strata_tests::strata::Strata;
use strata_tests::tree::{assert_same_tree, build_rich_tree, pseudo_random, write_file};

fn strata() -> Strata {
    Strata::new(garage::shared().env())
}

#[test]
fn published_tree_mounts_identically() {
    let work = strata_tests::scratch_dir("rich");
    let src = work.join("src");
    let skipped = build_rich_tree(&src, 100 << 20, 10_000);
    let store = garage::bucket("rich");
    let s = strata();
    let report = s.publish(&src, &store, "rich:v1");
    assert_eq!(
        report["warnings"].as_array().unwrap().len(),
        skipped.len(),
        "{report}"
    );
    for w in report["warnings"].as_array().unwrap() {
        assert!(w.as_str().unwrap().contains("skipped"), "{w}");
    }
    let (new, total) = (
        report["chunks_new"].as_u64().unwrap(),
        report["chunks_total"].as_u64().unwrap(),
    );
    assert!(new > 0 && new <= total, "{report}");
    // Small files share chunks: far fewer objects than files.
    assert!(total < 1_000, "{total} chunks for ~110 MB in 10,000 files");

    let ls = s.ok(&["ls", &store]);
    assert!(
        ls.contains("rich:v1") && ls.contains(report["layer"].as_str().unwrap()),
        "{ls}"
    );
    // Machine-readable listings agree with the publish report.
    let ls: serde_json::Value =
        serde_json::from_str(s.ok(&["ls", "--json", &store, "rich"]).trim()).unwrap();
    assert_eq!(ls[0]["tag"], "v1");
    assert_eq!(ls[0]["layer"], report["layer"]);
    let summary: serde_json::Value = serde_json::from_str(
        s.ok(&["inspect", "--json", "--summary", &store, "rich:v1"])
            .trim(),
    )
    .unwrap();
    assert_eq!(summary["layer"], report["layer"]);
    assert_eq!(summary["bytes"], report["bytes"]);
    assert_eq!(summary["chunks"], report["chunks_total"]);
    assert_eq!(
        summary["packs"], report["packs_new"],
        "a first publish packs every chunk itself"
    );
    assert_eq!(summary["symlinks"], report["symlinks"]);
    assert_eq!(
        summary["files"].as_u64().unwrap(),
        report["files"].as_u64().unwrap() + report["hardlinks"].as_u64().unwrap(),
        "every name of a file is an entry"
    );
    let inspect = s.ok(&["inspect", &store, "rich:v1"]);
    assert!(
        inspect.contains("/modes/owned") && inspect.contains("-> hello.txt"),
        "{inspect}"
    );
    assert_eq!(
        s.ok(&["cat", &store, "rich:v1", "données/日本語 ファイル.txt"]),
        "unicode ✓\n"
    );

    let mnt = work.join("mnt");
    let m = s
        .mount(
            &store,
            &mnt,
            &["rich:v1"],
            &work.join("cache"),
            &["--read-only"],
        )
        .unwrap();
    let compared = assert_same_tree(&src, &m.mountpoint);
    assert!(compared > 10_000, "compared only {compared} entries");

    // Read-only: every kind of write answers EROFS, and nothing changes.
    let erofs = |r: std::io::Result<()>| {
        let e = r.expect_err("write should fail");
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    };
    erofs(std::fs::write(m.path("new-file"), b"x"));
    erofs(
        std::fs::OpenOptions::new()
            .append(true)
            .open(m.path("hello.txt"))
            .map(|_| ()),
    );
    erofs(std::fs::create_dir(m.path("new-dir")));
    erofs(std::fs::remove_file(m.path("hello.txt")));
    erofs(std::fs::rename(m.path("hello.txt"), m.path("renamed")));
    erofs(std::fs::set_permissions(
        m.path("hello.txt"),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    ));
    assert_eq!(
        std::fs::read(m.path("hello.txt")).unwrap(),
        b"hello, strata\n"
    );
    assert!(m.unmount().unwrap().success());
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn reading_one_file_fetches_only_its_chunks() {
    let work = strata_tests::scratch_dir("lazy");
    let src = work.join("src");
    for i in 0..20 {
        write_file(
            &src.join(format!("part-{i:02}.bin")),
            &pseudo_random(100 + i, 10 << 20),
        );
    }
    let wanted = pseudo_random(7, 1 << 20);
    write_file(&src.join("part-10-target.bin"), &wanted);
    // Its own server, so the request counts are this test's alone.
    let g = garage::dedicated();
    g.create_bucket("lazy").unwrap();
    let store = "s3://lazy".to_string();
    let s = Strata::new(g.env());
    let report = s.publish(&src, &store, "lazy:v1");
    let total_chunks = report["chunks_total"].as_u64().unwrap();
    assert!(report["bytes"].as_u64().unwrap() > 200 << 20);

    let before_mount = g.get_object_count().unwrap();
    let started = Instant::now();
    let m = s
        .mount(
            &store,
            &work.join("mnt"),
            &["lazy:v1"],
            &work.join("cache"),
            &[],
        )
        .unwrap();
    let mounted = started.elapsed();
    let after_mount = g.get_object_count().unwrap();
    let read_started = Instant::now();
    let got = std::fs::read(m.path("part-10-target.bin")).unwrap();
    let read_time = read_started.elapsed();
    assert!(got == wanted, "bytes differ");
    let after_read = g.get_object_count().unwrap();
    eprintln!(
        "cold 200 MB layer: mount {mounted:?} ({} GETs), cat 1 MiB file {read_time:?} ({} GETs of {total_chunks} chunks)",
        after_mount - before_mount,
        after_read - after_mount
    );
    // The ref and the manifest at mount; at read, the file's own chunks (about 4 at 256 KiB
    // average, plus the chunks it shares with its neighbours), which adjoin in one pack: one
    // ranged GET, or a few.
    assert!(
        after_mount - before_mount <= 3,
        "mount fetched {} objects",
        after_mount - before_mount
    );
    let read_gets = after_read - after_mount;
    assert!(
        (1..=10).contains(&read_gets),
        "reading 1 MiB fetched {read_gets} of {total_chunks} chunks"
    );

    // Random access into a big file fetches the chunk under the offset, and the bytes match.
    let mut f = std::fs::File::open(m.path("part-03.bin")).unwrap();
    f.seek(SeekFrom::Start(7 << 20)).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact(&mut buf).unwrap();
    assert_eq!(buf, pseudo_random(103, 10 << 20)[7 << 20..(7 << 20) + 4096]);
    drop(m);
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn republish_uploads_nothing_and_small_edit_uploads_little() {
    let work = strata_tests::scratch_dir("dedup");
    let src = work.join("src");
    let big = pseudo_random(9, 64 << 20);
    write_file(&src.join("model.bin"), &big);
    for i in 0..500 {
        write_file(
            &src.join(format!("cfg/{i}.json")),
            format!("{{\"i\": {i}}}\n").as_bytes(),
        );
    }
    let store = garage::bucket("dedup");
    let s = strata();
    let first = s.publish(&src, &store, "d:v1");
    assert!(first["chunks_new"].as_u64().unwrap() > 100);

    let again = s.publish(&src, &store, "d:v1");
    assert_eq!(again["layer"], first["layer"], "same tree, same layer");
    assert_eq!(again["chunks_new"], 0);
    assert_eq!(again["bytes_uploaded"], 0, "{again}");

    // Change 1% of the big file in place (640 KiB in the middle).
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(src.join("model.bin"))
        .unwrap();
    f.seek(SeekFrom::Start(30 << 20)).unwrap();
    f.write_all(&pseudo_random(10, 640 << 10)).unwrap();
    drop(f);
    let edited = s.publish(&src, &store, "d:v2");
    let uploaded = edited["bytes_uploaded"].as_u64().unwrap();
    let total = edited["bytes"].as_u64().unwrap();
    eprintln!(
        "1% edit: {} new chunks of {}, {uploaded} bytes uploaded of {total} ({:.2}%)",
        edited["chunks_new"],
        edited["chunks_total"],
        uploaded as f64 * 100.0 / total as f64
    );
    assert!(edited["chunks_new"].as_u64().unwrap() <= 8, "{edited}");
    assert!(
        uploaded < total / 20,
        "a 1% edit uploaded {uploaded} of {total} bytes"
    );

    // Moving an existing ref on Garage (which ignores conditional writes) needs --single-writer.
    let err = s.fails(&["publish", "--json", src.to_str().unwrap(), &store, "d:v1"]);
    assert!(err.contains("--single-writer"), "{err}");
    s.ok(&[
        "--single-writer",
        "publish",
        "--json",
        src.to_str().unwrap(),
        &store,
        "d:v1",
    ]);
    assert!(s
        .ok(&["ls", &store, "d:v1"])
        .contains(edited["layer"].as_str().unwrap()));

    let m = s
        .mount(
            &store,
            &work.join("mnt"),
            &["d:v1"],
            &work.join("cache"),
            &[],
        )
        .unwrap();
    assert!(
        std::fs::read(m.path("model.bin")).unwrap()
            == std::fs::read(src.join("model.bin")).unwrap()
    );
    drop(m);
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn stacked_layers_follow_whiteouts_and_opaque_dirs() {
    let work = strata_tests::scratch_dir("stack");
    let base = work.join("base");
    write_file(&base.join("a/x"), b"base x");
    write_file(&base.join("a/y"), b"base y");
    write_file(&base.join("b/z"), b"base z");
    write_file(&base.join("c"), b"base c");
    write_file(&base.join("d/old1"), b"old");
    write_file(&base.join("d/old2"), b"old");
    write_file(&base.join("same"), b"from base");
    let upper = work.join("upper");
    write_file(&upper.join("a/.wh.x"), b"");
    write_file(&upper.join("a/new"), b"upper new");
    write_file(&upper.join(".wh.c"), b"");
    write_file(&upper.join("d/.wh..wh..opq"), b"");
    write_file(&upper.join("d/only"), b"only this");
    write_file(&upper.join("same"), b"from upper");
    let store = garage::bucket("stack");
    let s = strata();
    s.publish(&base, &store, "base:v1");
    s.publish(&upper, &store, "delta:v1");
    let m = s
        .mount(
            &store,
            &work.join("mnt"),
            &["base:v1", "delta:v1"],
            &work.join("cache"),
            &[],
        )
        .unwrap();
    let list = |p: &str| {
        let mut v: Vec<String> = std::fs::read_dir(m.path(p))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(list(""), ["a", "b", "d", "same"]);
    assert_eq!(list("a"), ["new", "y"]);
    assert_eq!(list("d"), ["only"]);
    assert_eq!(std::fs::read(m.path("same")).unwrap(), b"from upper");
    assert_eq!(std::fs::read(m.path("a/y")).unwrap(), b"base y");
    assert_eq!(std::fs::read(m.path("b/z")).unwrap(), b"base z");
    for hidden in ["a/x", "c", "d/old1", "a/.wh.x", "d/.wh..wh..opq"] {
        let e = std::fs::metadata(m.path(hidden)).unwrap_err();
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::NotFound,
            "{hidden} should be hidden"
        );
    }
    drop(m);
    // Order matters: with the delta at the bottom, the base wins.
    let m = s
        .mount(
            &store,
            &work.join("mnt2"),
            &["delta:v1", "base:v1"],
            &work.join("cache2"),
            &[],
        )
        .unwrap();
    assert_eq!(std::fs::read(m.path("same")).unwrap(), b"from base");
    assert_eq!(std::fs::read(m.path("c")).unwrap(), b"base c");
    drop(m);
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn killed_publish_leaves_no_ref_and_a_rerun_finishes_the_job() {
    let work = strata_tests::scratch_dir("crash");
    let src = work.join("src");
    write_file(&src.join("big.bin"), &pseudo_random(31, 300 << 20));
    let store = garage::bucket("crash");
    let s = strata();
    let mut child = s
        .command(&[
            "publish",
            "--quiet",
            src.to_str().unwrap(),
            &store,
            "crash:v1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once some packs (and their chunks' locators) have landed, long before it could
    // finish.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let options = strata_tests::store_options(&garage::shared().env(), false);
    let st = rt
        .block_on(strata_store::open_store(&store, &options))
        .unwrap();
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let landed = rt.block_on(st.list("chunks/")).unwrap().len();
        if landed >= 20 {
            break;
        }
        assert!(Instant::now() < deadline, "publish made no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "publish finished before it could be killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Nothing points at the half-published layer.
    let err = s.fails(&["ls", &store, "crash:v1"]);
    assert!(err.contains("no dataset"), "{err}");
    assert!(rt.block_on(st.list("refs/")).unwrap().is_empty());

    let rerun = s.publish(&src, &store, "crash:v1");
    let (new, total) = (
        rerun["chunks_new"].as_u64().unwrap(),
        rerun["chunks_total"].as_u64().unwrap(),
    );
    assert!(
        new < total,
        "the re-run uploaded only what was missing ({new} of {total})"
    );
    let m = s
        .mount(
            &store,
            &work.join("mnt"),
            &["crash:v1"],
            &work.join("cache"),
            &[],
        )
        .unwrap();
    assert!(std::fs::read(m.path("big.bin")).unwrap() == pseudo_random(31, 300 << 20));
    drop(m);
    let _ = std::fs::remove_dir_all(&work);
}
