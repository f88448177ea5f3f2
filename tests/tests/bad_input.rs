//! Bad input gets a clear error and no panic: corrupt chunks, broken manifests, missing refs,
//! unreachable stores, unusable mountpoints.

use std::sync::Arc;

use bytes::Bytes;
use strata_cache_format::{blob, Digest};
use strata_store::{open_store, Store};
use strata_tests::garage;
use strata_tests::strata::Strata;
use strata_tests::tree::{pseudo_random, write_file};

fn strata() -> Strata {
    Strata::new(garage::shared().env())
}

async fn garage_store(url: &str) -> Arc<dyn Store> {
    let options = strata_tests::store_options(&garage::shared().env(), false);
    open_store(url, &options).await.unwrap()
}

fn assert_no_panic(stderr: &str) {
    assert!(!stderr.contains("panicked"), "strata panicked: {stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_chunk_reads_fail_with_eio_never_wrong_bytes() {
    let work = strata_tests::scratch_dir("corrupt");
    let src = work.join("src");
    let victim = pseudo_random(21, 3 << 20);
    write_file(&src.join("victim.bin"), &victim);
    write_file(&src.join("fine.txt"), b"still fine");
    let url = garage::bucket("corrupt");
    let s = strata();
    s.publish(&src, &url, "c:v1");
    // Damage victim.bin's bytes in the pack (the chunk still decodes, but its hash no longer
    // matches its name). fine.txt sorts first, so its bytes open the pack: leave those be.
    let store = garage_store(&url).await;
    let packs = store.list("packs/").await.unwrap();
    assert_eq!(packs.len(), 1, "{packs:?}");
    let mut pack = store.get(&packs[0]).await.unwrap().to_vec();
    for at in ((1 << 20) + 4096..pack.len()).step_by(256 << 10) {
        pack[at] ^= 0xff;
    }
    store.put(&packs[0], Bytes::from(pack)).await.unwrap();
    let replaced = [packs[0].rsplit('/').next().unwrap().to_string()];
    let m = s
        .mount(&url, &work.join("mnt"), &["c:v1"], &work.join("cache"), &[])
        .unwrap();
    let err = std::fs::read(m.path("victim.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(std::fs::read(m.path("fine.txt")).unwrap(), b"still fine");
    let log = m.log_text();
    assert!(
        replaced.iter().any(|hex| log.contains(hex)),
        "log names the chunk: {log}"
    );
    assert!(log.contains("corrupt"), "{log}");
    drop(m);
    let _ = std::fs::remove_dir_all(&work);
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_manifests_are_clear_errors_at_mount() {
    let work = strata_tests::scratch_dir("manifest");
    let src = work.join("src");
    write_file(&src.join("a.txt"), b"a");
    let url = garage::bucket("manifest");
    let s = strata();
    let report = s.publish(&src, &url, "m:v1");
    let digest = Digest::parse(report["layer"].as_str().unwrap()).unwrap();
    let store = garage_store(&url).await;
    let good = blob::decode(
        &store
            .get(&format!("layers/{}", digest.to_hex()))
            .await
            .unwrap(),
        1 << 30,
    )
    .unwrap();

    // A truncated manifest and garbage, each stored under its own true hash (so only the
    // format check can catch them), and a layer object that does not match its name.
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (good[..good.len() / 2].to_vec(), "truncated"),
        (
            b"this is not a manifest at all, just some garbage bytes........................"
                .to_vec(),
            "bad magic",
        ),
    ];
    for (i, (plain, expect)) in cases.into_iter().enumerate() {
        let d = Digest::of(&plain);
        store
            .put(
                &format!("layers/{}", d.to_hex()),
                Bytes::from(blob::encode(&plain)),
            )
            .await
            .unwrap();
        let mnt = work.join(format!("mnt{i}"));
        std::fs::create_dir_all(&mnt).unwrap();
        let pinned = format!("m@{d}");
        let err = s.fails(&[
            "mount",
            &url,
            mnt.to_str().unwrap(),
            "--layer",
            &pinned,
            "--foreground",
            "--cache-dir",
            work.join("cache").to_str().unwrap(),
        ]);
        assert!(
            err.contains(expect) && err.contains(&d.to_hex()),
            "{expect}: {err}"
        );
        assert_no_panic(&err);
    }
    store
        .put(
            &format!("layers/{}", digest.to_hex()),
            Bytes::from(blob::encode(b"swapped")),
        )
        .await
        .unwrap();
    let mnt = work.join("mnt-swapped");
    std::fs::create_dir_all(&mnt).unwrap();
    let err = s.fails(&[
        "mount",
        &url,
        mnt.to_str().unwrap(),
        "--layer",
        "m:v1",
        "--foreground",
        "--cache-dir",
        work.join("cache2").to_str().unwrap(),
    ]);
    assert!(err.contains("hash mismatch"), "{err}");
    assert_no_panic(&err);
    let err = s.fails(&["cat", &url, "m:v1", "a.txt"]);
    assert!(err.contains("hash mismatch"), "{err}");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn missing_refs_stores_and_mountpoints_are_clear_errors() {
    let work = strata_tests::scratch_dir("errors");
    let src = work.join("src");
    write_file(&src.join("a.txt"), b"a");
    let url = garage::bucket("errors");
    let s = strata();
    s.publish(&src, &url, "e:v1");
    let cache = work.join("cache");
    let mnt = work.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mount = |args: &[&str]| {
        let mut all = vec![
            "mount",
            &url,
            mnt.to_str().unwrap(),
            "--foreground",
            "--cache-dir",
            cache.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        let err = s.fails(&all);
        assert_no_panic(&err);
        err
    };
    let err = mount(&["--layer", "nope:v1"]);
    assert!(err.contains("dataset nope:v1 not found"), "{err}");
    let err = mount(&["--layer", "bad/name:v1"]);
    assert!(err.contains("invalid dataset name"), "{err}");
    let err = s.fails(&["cat", &url, "e:v1", "missing.txt"]);
    assert!(
        err.contains("missing.txt") && err.contains("no such file"),
        "{err}"
    );

    // Mountpoints: missing, not empty, a file.
    let missing = work.join("does-not-exist");
    let err = s.fails(&[
        "mount",
        &url,
        missing.to_str().unwrap(),
        "--layer",
        "e:v1",
        "--foreground",
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    assert!(err.contains("does not exist"), "{err}");
    write_file(&mnt.join("occupant"), b"x");
    let err = mount(&["--layer", "e:v1"]);
    assert!(err.contains("not empty"), "{err}");
    assert!(mnt.join("occupant").exists(), "nothing lost");

    // An unreachable store: a clear error naming it, within the retry budget.
    let port = strata_tests::free_port();
    let dead = Strata::new(vec![
        ("AWS_ACCESS_KEY_ID".into(), "k".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "s".into()),
        ("AWS_REGION".into(), "garage".into()),
        (
            "AWS_ENDPOINT_URL".into(),
            format!("http://127.0.0.1:{port}"),
        ),
    ]);
    let started = std::time::Instant::now();
    let err = dead.fails(&["ls", "s3://somewhere"]);
    assert!(err.contains("s3://somewhere"), "{err}");
    assert_no_panic(&err);
    assert!(started.elapsed() < std::time::Duration::from_secs(60));

    // Unmounting something that is not a strata mount.
    let err = s.fails(&["unmount", work.to_str().unwrap()]);
    assert!(err.contains("not a strata mount"), "{err}");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn sigterm_and_unmount_end_the_mount_cleanly() {
    let work = strata_tests::scratch_dir("signals");
    let src = work.join("src");
    write_file(&src.join("a.txt"), b"a");
    let url = garage::bucket("signals");
    let s = strata();
    s.publish(&src, &url, "s:v1");
    let mnt = work.join("mnt");
    let mut m = s
        .mount(&url, &mnt, &["s:v1"], &work.join("cache"), &[])
        .unwrap();
    assert_eq!(std::fs::read(m.path("a.txt")).unwrap(), b"a");
    strata_tests::sigterm(&m.child);
    let status =
        strata_tests::strata::wait_timeout(&mut m.child, std::time::Duration::from_secs(20))
            .unwrap();
    assert!(status.success(), "{status}: {}", m.log_text());
    assert!(!strata_fuse::is_strata_mount(&mnt).unwrap());
    drop(m);

    // fusermount3 -u works as well, and the mountpoint is reusable afterwards.
    let m = s
        .mount(&url, &mnt, &["s:v1"], &work.join("cache"), &[])
        .unwrap();
    let out = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut m = m;
    let status =
        strata_tests::strata::wait_timeout(&mut m.child, std::time::Duration::from_secs(20))
            .unwrap();
    assert!(status.success());
    drop(m);

    // Regression: a mountpoint reached through a symlink is still found for SIGTERM and
    // `strata unmount` (the kernel records the resolved path).
    std::os::unix::fs::symlink(&work, work.join("via-link")).unwrap();
    let linked = work.join("via-link").join("mnt");
    let mut m = s
        .mount(&url, &linked, &["s:v1"], &work.join("cache"), &[])
        .unwrap();
    strata_tests::sigterm(&m.child);
    let status =
        strata_tests::strata::wait_timeout(&mut m.child, std::time::Duration::from_secs(20))
            .unwrap();
    assert!(status.success(), "{status}: {}", m.log_text());
    assert!(!strata_fuse::is_strata_mount(&mnt).unwrap(), "left mounted");
    drop(m);
    let _ = std::fs::remove_dir_all(&work);
}
