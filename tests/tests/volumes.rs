//! Persistent volumes against a real Garage, across two daemons with their own caches: what one
//! invocation changes is committed when its mount ends and seen by the next one on the other
//! host; a changed MiB of a large file uploads about that MiB.

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};

use strata_tests::daemon::Daemon;
use strata_tests::garage;
use strata_tests::tree::{pseudo_random, write_file};

/// Garage accepts conditional writes but ignores them; the daemons promise to be the only
/// writers of this bucket's heads.
fn env() -> Vec<(String, String)> {
    let mut env = garage::shared().env();
    env.push(("STRATA_SINGLE_WRITER".into(), "1".into()));
    env
}

#[test]
fn a_volume_carries_changes_from_one_host_to_the_next() {
    let work = strata_tests::scratch_dir("volume");
    let store = garage::bucket("volume");
    let src = work.join("src");
    let model = pseudo_random(51, 8 << 20);
    write_file(&src.join("model.bin"), &model);
    write_file(&src.join("data/old.txt"), b"old\n");
    write_file(&src.join("data/keep.txt"), b"keep\n");
    write_file(&src.join("data/dir/inner.txt"), b"inner\n");
    let a = Daemon::start(env(), &work.join("host-a"), &[]).unwrap();
    let b = Daemon::start(env(), &work.join("host-b"), &[]).unwrap();
    a.strata().publish(&src, &store, "base:v1");
    let vol = ["--volume", "fn/state"];

    // Host A: the first invocation.
    {
        let m = a
            .mount_with(&store, &work.join("a1"), &["base:v1"], &vol)
            .unwrap();
        fs::create_dir(m.path("state")).unwrap();
        fs::write(m.path("state/counter"), b"1").unwrap();
        let f = fs::OpenOptions::new()
            .write(true)
            .open(m.path("model.bin"))
            .unwrap();
        f.write_all_at(&pseudo_random(52, 1 << 20), 2 << 20)
            .unwrap();
        drop(f);
        fs::set_permissions(m.path("data/keep.txt"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::remove_file(m.path("data/old.txt")).unwrap();
        fs::rename(m.path("data/dir"), m.path("data/moved")).unwrap();
    }
    let show = a
        .strata()
        .ok(&["volume", "show", &store, "fn/state", "--json"]);
    let head: serde_json::Value = serde_json::from_str(&show).unwrap();
    let commits = head["commits"].as_array().unwrap();
    assert_eq!(commits.len(), 1, "{show}\n{}", a.log_text());
    let uploaded = commits[0]["bytes_uploaded"].as_u64().unwrap();
    assert!(
        uploaded < 3 << 20,
        "one changed MiB of an 8 MiB file uploaded {uploaded} bytes"
    );
    println!("commit 1 uploaded {uploaded} bytes");

    // Host B, its own cache: sees exactly what A committed; changes it again.
    let mut want = model.clone();
    want[2 << 20..3 << 20].copy_from_slice(&pseudo_random(52, 1 << 20));
    {
        let m = b
            .mount_with(&store, &work.join("b1"), &["base:v1"], &vol)
            .unwrap();
        assert_eq!(fs::read(m.path("state/counter")).unwrap(), b"1");
        assert!(fs::read(m.path("model.bin")).unwrap() == want);
        assert_eq!(
            fs::metadata(m.path("data/keep.txt")).unwrap().mode() & 0o777,
            0o600
        );
        assert!(!m.path("data/old.txt").exists());
        assert!(!m.path("data/dir").exists());
        assert_eq!(
            fs::read(m.path("data/moved/inner.txt")).unwrap(),
            b"inner\n"
        );
        fs::write(m.path("state/counter"), b"2").unwrap();
    }

    // Back on A: the newest state, two commits in the history.
    {
        let m = a
            .mount_with(&store, &work.join("a2"), &["base:v1"], &vol)
            .unwrap();
        assert_eq!(fs::read(m.path("state/counter")).unwrap(), b"2");
        assert!(fs::read(m.path("model.bin")).unwrap() == want);
        // A mount that changes nothing commits nothing.
    }
    let history = a.strata().ok(&["volume", "history", &store, "fn/state"]);
    assert_eq!(history.lines().count(), 2, "{history}");
    let ls = a.strata().ok(&["volume", "ls", &store]);
    assert!(ls.contains("fn/state\t2 commits"), "{ls}");
    // The plain layer is untouched.
    let plain = a.mount(&store, &work.join("plain"), &["base:v1"]).unwrap();
    assert!(plain.path("data/old.txt").exists());
    assert!(!plain.path("state").exists());
    drop(plain);

    a.strata().ok(&["volume", "rm", &store, "fn/state"]);
    let out = a.strata().run(&["volume", "show", &store, "fn/state"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no volume fn/state"));
    // Nothing left behind: no scratch, no uncommitted uppers.
    assert!(a.scratch_dirs().is_empty() && b.scratch_dirs().is_empty());
    assert!(!a.state_dir.join("uncommitted").exists());
    drop((a, b));
    let _ = fs::remove_dir_all(&work);
}

#[test]
fn a_volume_needs_no_layer_below_it() {
    let work = strata_tests::scratch_dir("volume-solo");
    let store = garage::bucket("volume-solo");
    let d = Daemon::start(env(), &work.join("host"), &[]).unwrap();
    let vol = ["--volume", "fn/solo"];
    {
        let m = d.mount_with(&store, &work.join("m1"), &[], &vol).unwrap();
        assert!(
            fs::read_dir(&m.mountpoint).unwrap().next().is_none(),
            "starts empty"
        );
        fs::create_dir(m.path("cache")).unwrap();
        fs::write(m.path("cache/index.json"), b"{}").unwrap();
    }
    let m = d.mount_with(&store, &work.join("m2"), &[], &vol).unwrap();
    assert_eq!(fs::read(m.path("cache/index.json")).unwrap(), b"{}");
    drop((m, d));
    let _ = fs::remove_dir_all(&work);
}

#[test]
fn concurrent_commits_rebase_on_disjoint_paths_and_keep_conflicts() {
    let work = strata_tests::scratch_dir("volume-race");
    let store = garage::bucket("volume-race");
    let d = Daemon::start(env(), &work.join("host"), &[]).unwrap();
    let vol = ["--volume", "fn/race"];
    // Two invocations at once, different files: both land.
    let m1 = d.mount_with(&store, &work.join("m1"), &[], &vol).unwrap();
    let m2 = d.mount_with(&store, &work.join("m2"), &[], &vol).unwrap();
    fs::write(m1.path("a.txt"), b"from m1").unwrap();
    fs::write(m2.path("b.txt"), b"from m2").unwrap();
    drop(m1);
    drop(m2);
    {
        let m = d.mount_with(&store, &work.join("m3"), &[], &vol).unwrap();
        assert_eq!(fs::read(m.path("a.txt")).unwrap(), b"from m1");
        assert_eq!(fs::read(m.path("b.txt")).unwrap(), b"from m2");
    }
    // Two at once on the same file: the later commit is kept as a conflict, named in the log
    // and by `volume show`, and can be mounted.
    let m4 = d.mount_with(&store, &work.join("m4"), &[], &vol).unwrap();
    let m5 = d.mount_with(&store, &work.join("m5"), &[], &vol).unwrap();
    fs::write(m4.path("a.txt"), b"m4 wins").unwrap();
    fs::write(m5.path("a.txt"), b"m5 kept").unwrap();
    drop(m4);
    drop(m5);
    assert!(
        d.log_text()
            .contains("a newer commit changed the same paths (a.txt)"),
        "{}",
        d.log_text()
    );
    let show = d
        .strata()
        .ok(&["volume", "show", &store, "fn/race", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(v["commits"].as_array().unwrap().len(), 3, "{show}");
    let conflicts = v["conflicts"].as_array().unwrap();
    assert_eq!(conflicts.len(), 1, "{show}");
    assert_eq!(conflicts[0]["paths"][0], "a.txt");
    {
        let m = d.mount_with(&store, &work.join("m6"), &[], &vol).unwrap();
        assert_eq!(fs::read(m.path("a.txt")).unwrap(), b"m4 wins");
    }
    let layers: Vec<String> = conflicts[0]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| format!("race@{}", l.as_str().unwrap()))
        .collect();
    let layer_refs: Vec<&str> = layers.iter().map(|s| s.as_str()).collect();
    let kept = d
        .mount_with(&store, &work.join("kept"), &layer_refs, &["--read-only"])
        .unwrap();
    assert_eq!(fs::read(kept.path("a.txt")).unwrap(), b"m5 kept");
    assert_eq!(fs::read(kept.path("b.txt")).unwrap(), b"from m2");
    drop((kept, d));
    let _ = fs::remove_dir_all(&work);
}
