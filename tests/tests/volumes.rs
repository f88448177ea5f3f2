//! Persistent volumes against a real Garage, across two daemons with their own caches: what one
//! invocation changes is committed when its mount ends and seen by the next one on the other
//! host; a changed MiB of a large file uploads about that MiB.

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};

use strata_tests::daemon::Daemon;
use strata_tests::garage;
use strata_tests::proxy::Proxy;
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
        // Read whole here, so this host holds all of it (and later, its new state).
        assert!(fs::read(m.path("model.bin")).unwrap() == model);
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
    // Host A holds the newest state: mounting it again downloads nothing.
    {
        let fetched = |d: &Daemon| d.stats()["total"]["store_bytes"].as_u64().unwrap();
        let before = fetched(&a);
        let m = a
            .mount_with(&store, &work.join("a1-again"), &["base:v1"], &vol)
            .unwrap();
        assert_eq!(fs::read(m.path("state/counter")).unwrap(), b"1");
        let got = fs::read(m.path("model.bin")).unwrap();
        assert_eq!(got[2 << 20..3 << 20], pseudo_random(52, 1 << 20)[..]);
        assert_eq!(fetched(&a), before, "{}", a.stats());
    }

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

    let removed = a.strata().ok(&["volume", "rm", &store, "fn/state"]);
    assert!(removed.contains("2 commits"), "{removed}");
    for args in [["volume", "show"], ["volume", "rm"]] {
        let out = a.strata().run(&[args[0], args[1], &store, "fn/state"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("no volume fn/state"));
    }
    let ls = a.strata().ok(&["volume", "ls", &store]);
    assert!(
        !ls.contains("fn/state"),
        "a removed volume is not listed: {ls}"
    );
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
    // The daemon counted each ending: m1 and m4 on the head they saw, m2 on top of m1's,
    // m5 kept as a conflict (m3 had nothing to commit).
    let commits = &d.stats()["commits"];
    assert_eq!(
        *commits,
        serde_json::json!({"committed": 2, "rebased": 1, "conflict": 1, "kept": 0, "failed": 0}),
        "{commits}"
    );
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

/// Polls `volume show --json` until the volume has `n` commits (or fails after 60 s).
fn wait_for_commits(d: &Daemon, store: &str, volume: &str, n: usize) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let out = d.strata().run(&["volume", "show", store, volume, "--json"]);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if v["commits"].as_array().map_or(0, |c| c.len()) >= n {
                return v;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "volume {volume} never reached {n} commits\n{}",
            d.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn fsynced_writes_survive_a_daemon_killed_mid_loop() {
    use std::io::Write;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;

    let work = strata_tests::scratch_dir("volume-crash");
    let store = garage::bucket("volume-crash");
    let src = work.join("src");
    let table = pseudo_random(61, 3 << 20);
    write_file(&src.join("table.bin"), &table);
    let mut d = Daemon::start(env(), &work.join("host"), &[]).unwrap();
    d.strata().publish(&src, &store, "base:v1");
    let vol = ["--volume", "fn/crash"];
    let mp = work.join("m1");
    let m = d.mount_with(&store, &mp, &["base:v1"], &vol).unwrap();
    fs::create_dir(m.path("files")).unwrap();

    // A writer appends records to a log and fsyncs each; every tenth record also goes into a
    // file of its own, and a block of the layer's table is rewritten (partial copy-up). What
    // it counts is what fsync acknowledged.
    let acked = Arc::new(AtomicI64::new(-1));
    let writer = {
        let acked = acked.clone();
        let mp = mp.clone();
        std::thread::spawn(move || -> std::io::Result<()> {
            let mut log = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(mp.join("log"))?;
            let table = fs::OpenOptions::new()
                .write(true)
                .open(mp.join("table.bin"))?;
            for i in 0..i64::MAX {
                writeln!(log, "record {i}")?;
                if i % 10 == 0 {
                    let mut f = fs::File::create(mp.join(format!("files/f{i}")))?;
                    f.write_all(format!("file {i}").as_bytes())?;
                    f.sync_all()?;
                    table.write_all_at(&i.to_le_bytes(), (i as u64 * 4096) % (3 << 20))?;
                    table.sync_all()?;
                }
                log.sync_all()?;
                acked.store(i, Ordering::SeqCst);
            }
            Ok(())
        })
    };
    while acked.load(Ordering::SeqCst) < 300 {
        assert!(!writer.is_finished(), "writer stopped: {:?}", writer.join());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    d.kill();
    let stopped = writer.join().unwrap();
    assert!(stopped.is_err(), "the writer should see the mount die");
    let acked = acked.load(Ordering::SeqCst);

    // The restarted daemon finds the upper and commits it; it also detaches the dead mount
    // (dropping `m` detaches it too, should it be left: no test leaves a mount behind).
    d.restart().unwrap();
    drop(m);
    assert!(
        !strata_fuse::is_strata_mount(&mp).unwrap(),
        "the dead mount is still at {}",
        mp.display()
    );
    wait_for_commits(&d, &store, "fn/crash", 1);
    let m = d
        .mount_with(&store, &work.join("m2"), &["base:v1"], &vol)
        .unwrap();
    let log = fs::read_to_string(m.path("log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        lines.len() as i64 > acked,
        "{} records survived, {} were fsync'ed",
        lines.len(),
        acked + 1
    );
    for (i, line) in lines.iter().enumerate().take(acked as usize + 1) {
        assert_eq!(*line, format!("record {i}"));
    }
    let mut want = table.clone();
    for i in (0..=acked).step_by(10) {
        assert_eq!(
            fs::read(m.path(&format!("files/f{i}"))).unwrap(),
            format!("file {i}").as_bytes()
        );
        let at = ((i as u64 * 4096) % (3 << 20)) as usize;
        want[at..at + 8].copy_from_slice(&i.to_le_bytes());
    }
    // The record after the last acknowledged one may have reached the table before the kill.
    let next = (acked / 10 + 1) * 10;
    let mut or_next = want.clone();
    let at = ((next as u64 * 4096) % (3 << 20)) as usize;
    or_next[at..at + 8].copy_from_slice(&next.to_le_bytes());
    let got = fs::read(m.path("table.bin")).unwrap();
    let diff = got.iter().zip(&want).position(|(a, b)| a != b);
    assert!(
        got == want || got == or_next,
        "table.bin differs from the fsync'ed writes at {diff:?} (acked {acked})"
    );
    println!(
        "{} records fsync'ed before kill -9; {} in the volume",
        acked + 1,
        lines.len()
    );
    drop(m);
    assert!(d.scratch_dirs().is_empty());
    let kept: Vec<_> = fs::read_dir(d.state_dir.join("uncommitted"))
        .map(|e| e.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(kept.is_empty(), "left uncommitted: {kept:?}");
    drop(d);
    let _ = fs::remove_dir_all(&work);
}

#[test]
fn a_commit_while_the_store_is_down_is_kept_and_retried() {
    let work = strata_tests::scratch_dir("volume-outage");
    let store = garage::bucket("volume-outage");
    let mut d = Daemon::start(env(), &work.join("host"), &[]).unwrap();
    let endpoint = garage::shared().endpoint();
    let target: std::net::SocketAddr = endpoint.trim_start_matches("http://").parse().unwrap();
    // The mount reaches the store through a proxy that the test cuts before the commit.
    let proxy = Proxy::start(0, target).unwrap();
    let port = proxy.port;
    let url = proxy.url();
    let vol = ["--volume", "fn/outage", "--endpoint-url", &url];
    let m = d.mount_with(&store, &work.join("m1"), &[], &vol).unwrap();
    fs::write(m.path("kept.txt"), b"not lost").unwrap();
    proxy.stop();
    // The commit fails (the store is unreachable), and the unmount says where the upper is.
    let out = m.unmount();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("kept"),
        "strata unmount: {said}\ndaemon log:\n{}",
        d.log_text()
    );
    let kept = fs::read_dir(d.state_dir.join("uncommitted"))
        .map(|e| e.count())
        .unwrap_or(0);
    assert_eq!(kept, 1, "{}", d.log_text());
    assert!(
        d.log_text().contains("the upper is kept in"),
        "{}",
        d.log_text()
    );
    assert!(d.scratch_dirs().is_empty());

    // The store is back; the daemon's next start commits the kept upper.
    let _proxy = Proxy::start(port, target).unwrap();
    d.stop().unwrap();
    d.restart().unwrap();
    wait_for_commits(&d, &store, "fn/outage", 1);
    let m = d.mount_with(&store, &work.join("m2"), &[], &vol).unwrap();
    assert_eq!(fs::read(m.path("kept.txt")).unwrap(), b"not lost");
    drop(m);
    assert_eq!(
        fs::read_dir(d.state_dir.join("uncommitted"))
            .unwrap()
            .count(),
        0
    );
    drop(d);
    let _ = fs::remove_dir_all(&work);
}

#[test]
fn two_hosts_committing_at_once_keep_everything_on_a_store_that_enforces_cas() {
    let work = strata_tests::scratch_dir("volume-cas");
    let store = strata_tests::moto::bucket("volume-cas");
    let env = strata_tests::moto::shared().env();
    let a = Daemon::start(env.clone(), &work.join("host-a"), &[]).unwrap();
    let b = Daemon::start(env, &work.join("host-b"), &[]).unwrap();
    let vol = ["--volume", "fn/cas"];
    let unmount_together = |x: strata_tests::daemon::DaemonMount,
                            y: strata_tests::daemon::DaemonMount| {
        std::thread::scope(|s| {
            s.spawn(move || drop(x));
            s.spawn(move || drop(y));
        });
    };

    // Different paths: both commits land, in either order.
    let ma = a.mount_with(&store, &work.join("a1"), &[], &vol).unwrap();
    let mb = b.mount_with(&store, &work.join("b1"), &[], &vol).unwrap();
    fs::write(ma.path("from-a"), b"a").unwrap();
    fs::write(mb.path("from-b"), b"b").unwrap();
    unmount_together(ma, mb);
    let v = wait_for_commits(&a, &store, "fn/cas", 2);
    assert_eq!(v["commits"].as_array().unwrap().len(), 2, "{v}");
    {
        let m = b.mount_with(&store, &work.join("b2"), &[], &vol).unwrap();
        assert_eq!(fs::read(m.path("from-a")).unwrap(), b"a");
        assert_eq!(fs::read(m.path("from-b")).unwrap(), b"b");
    }

    // The same path: one lands, the other is a conflict; both versions can be read.
    let ma = a.mount_with(&store, &work.join("a3"), &[], &vol).unwrap();
    let mb = b.mount_with(&store, &work.join("b3"), &[], &vol).unwrap();
    fs::write(ma.path("shared"), b"version a").unwrap();
    fs::write(mb.path("shared"), b"version b").unwrap();
    unmount_together(ma, mb);
    let show = a
        .strata()
        .ok(&["volume", "show", &store, "fn/cas", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(v["commits"].as_array().unwrap().len(), 3, "{show}");
    let conflicts = v["conflicts"].as_array().unwrap();
    assert_eq!(conflicts.len(), 1, "{show}");
    assert_eq!(conflicts[0]["paths"][0], "shared");
    let logs = format!("{}{}", a.log_text(), b.log_text());
    assert!(
        logs.contains("a newer commit changed the same paths (shared)"),
        "{logs}"
    );
    let head = {
        let m = a.mount_with(&store, &work.join("a4"), &[], &vol).unwrap();
        fs::read(m.path("shared")).unwrap()
    };
    let layers: Vec<String> = conflicts[0]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| format!("cas@{}", l.as_str().unwrap()))
        .collect();
    let refs: Vec<&str> = layers.iter().map(|s| s.as_str()).collect();
    let kept = a
        .mount_with(&store, &work.join("kept"), &refs, &["--read-only"])
        .unwrap();
    let mut both = [head, fs::read(kept.path("shared")).unwrap()];
    both.sort();
    assert_eq!(both, [b"version a".to_vec(), b"version b".to_vec()]);
    drop((kept, a, b));
    let _ = fs::remove_dir_all(&work);
}

#[test]
fn strata_commit_lands_changes_while_the_mount_goes_on() {
    let work = strata_tests::scratch_dir("volume-commit");
    let store = garage::bucket("volume-commit");
    let a = Daemon::start(env(), &work.join("host-a"), &[]).unwrap();
    let b = Daemon::start(env(), &work.join("host-b"), &[]).unwrap();
    let vol = ["--volume", "fn/live"];
    let m = a.mount_with(&store, &work.join("a1"), &[], &vol).unwrap();
    let mp = m.mountpoint.to_str().unwrap().to_string();
    fs::write(m.path("step"), b"1").unwrap();
    let out = a.strata().ok(&["commit", &mp]);
    assert!(out.contains("committed volume fn/live"), "{out}");
    // Another host sees it while the first mount is still there, and commits elsewhere.
    {
        let mb = b.mount_with(&store, &work.join("b1"), &[], &vol).unwrap();
        assert_eq!(fs::read(mb.path("step")).unwrap(), b"1");
        fs::write(mb.path("from-b"), b"b").unwrap();
    }
    // The first mount goes on: a second commit rebases over b's.
    fs::write(m.path("step"), b"2").unwrap();
    let out = a.strata().ok(&["commit", &mp, "--json"]);
    let reply: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(reply["layer"].is_string(), "{out}");
    let out = a.strata().ok(&["commit", &mp]);
    assert!(out.contains("nothing new"), "{out}");
    drop(m); // nothing new since the last commit: no commit at unmount
    let v = wait_for_commits(&a, &store, "fn/live", 3);
    assert_eq!(v["commits"].as_array().unwrap().len(), 3, "{v}");
    {
        let m = b.mount_with(&store, &work.join("b2"), &[], &vol).unwrap();
        assert_eq!(fs::read(m.path("step")).unwrap(), b"2");
        assert_eq!(fs::read(m.path("from-b")).unwrap(), b"b");
    }
    // Only volume mounts commit.
    write_file(&work.join("src/f"), b"f");
    a.strata().publish(&work.join("src"), &store, "plain:v1");
    let plain = a.mount(&store, &work.join("plain"), &["plain:v1"]).unwrap();
    let err = a
        .strata()
        .fails(&["commit", plain.mountpoint.to_str().unwrap()]);
    assert!(err.contains("not a volume mount"), "{err}");
    drop(plain);
    drop((a, b));
    let _ = fs::remove_dir_all(&work);
}

#[test]
fn a_long_chain_is_squashed_and_mounts_the_same() {
    let work = strata_tests::scratch_dir("volume-squash");
    let store = garage::bucket("volume-squash");
    let d = Daemon::start(env(), &work.join("host"), &["--squash-after", "4"]).unwrap();
    let vol = ["--volume", "fn/long"];
    // A mount from before any commit, committing after the squash: it rebases onto it.
    let early = d
        .mount_with(&store, &work.join("early"), &[], &vol)
        .unwrap();
    fs::write(early.path("early.txt"), b"early").unwrap();
    for i in 0..6 {
        let m = d
            .mount_with(&store, &work.join(format!("m{i}")), &[], &vol)
            .unwrap();
        fs::write(m.path(&format!("f{i}")), format!("file {i}")).unwrap();
        match i {
            2 => fs::remove_file(m.path("f0")).unwrap(),
            3 => fs::rename(m.path("f1"), m.path("renamed")).unwrap(),
            4 => fs::set_permissions(m.path("f2"), fs::Permissions::from_mode(0o600)).unwrap(),
            _ => {}
        }
    }
    // The fifth commit made five: squashed into one; the sixth went on top.
    let v = wait_for_commits(&d, &store, "fn/long", 2);
    let commits = v["commits"].as_array().unwrap();
    assert_eq!(commits.len(), 2, "{v}");
    assert_eq!(commits[0]["squashed"].as_array().unwrap().len(), 5, "{v}");
    drop(early);
    let v = wait_for_commits(&d, &store, "fn/long", 3);
    assert_eq!(v["commits"].as_array().unwrap().len(), 3, "{v}");
    let check = |name: &str| {
        let m = d.mount_with(&store, &work.join(name), &[], &vol).unwrap();
        let mut names: Vec<String> = fs::read_dir(&m.mountpoint)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["early.txt", "f2", "f3", "f4", "f5", "renamed"]);
        assert_eq!(fs::read(m.path("renamed")).unwrap(), b"file 1");
        assert_eq!(fs::read(m.path("early.txt")).unwrap(), b"early");
        assert_eq!(fs::metadata(m.path("f2")).unwrap().mode() & 0o777, 0o600);
    };
    check("after-auto");
    let out = d.strata().ok(&["volume", "squash", &store, "fn/long"]);
    assert!(out.contains("squashed volume fn/long: 3 commits"), "{out}");
    let history = d.strata().ok(&["volume", "history", &store, "fn/long"]);
    assert_eq!(history.lines().count(), 1, "{history}");
    // The squash stands for every commit, the earlier squash opened up: 5 + 1 + 1.
    assert!(history.contains("squash of 7 commits"), "{history}");
    check("after-manual");
    drop(d);
    let _ = fs::remove_dir_all(&work);
}

#[test]
fn moved_and_chmodded_layer_files_are_committed_without_their_bytes() {
    let work = strata_tests::scratch_dir("volume-refs");
    let store = garage::bucket("volume-refs");
    let src = work.join("src");
    let big = pseudo_random(81, 16 << 20);
    write_file(&src.join("models/big.bin"), &big);
    write_file(&src.join("models/other.bin"), &pseudo_random(82, 8 << 20));
    let a = Daemon::start(env(), &work.join("host-a"), &[]).unwrap();
    let b = Daemon::start(env(), &work.join("host-b"), &[]).unwrap();
    a.strata().publish(&src, &store, "base:v1");
    let vol = ["--volume", "fn/refs"];
    {
        // A host with a cold cache moves one big file and chmods the other.
        let m = a
            .mount_with(&store, &work.join("a1"), &["base:v1"], &vol)
            .unwrap();
        fs::create_dir(m.path("archive")).unwrap();
        fs::rename(m.path("models/big.bin"), m.path("archive/big.bin")).unwrap();
        fs::set_permissions(
            m.path("models/other.bin"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
    }
    let stats = a.stats();
    assert_eq!(
        stats["total"]["store_bytes"], 0,
        "the commit read file bytes: {stats}"
    );
    let v = wait_for_commits(&a, &store, "fn/refs", 1);
    let uploaded = v["commits"][0]["bytes_uploaded"].as_u64().unwrap();
    assert!(uploaded < 64 << 10, "the commit uploaded {uploaded} bytes");
    let m = b
        .mount_with(&store, &work.join("b1"), &["base:v1"], &vol)
        .unwrap();
    assert!(fs::read(m.path("archive/big.bin")).unwrap() == big);
    assert!(!m.path("models/big.bin").exists());
    let meta = fs::metadata(m.path("models/other.bin")).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.len()), (0o600, 8 << 20));
    drop(m);
    drop((a, b));
    let _ = fs::remove_dir_all(&work);
}

/// `mkdir d; cd d` 20,000 times in a volume mount and a file at the bottom: the unmount
/// commits it (this crashed the daemon with a stack overflow, then again at every restart),
/// and another host's mount shows the whole depth. A directory past the kernel's path
/// length is reached by relative steps, as the function made it.
#[test]
fn a_20000_level_tree_commits_and_mounts_on_another_host() {
    let work = strata_tests::scratch_dir("volume-deep");
    let store = garage::bucket("volume-deep");
    let src = work.join("src");
    write_file(&src.join("readme"), b"base\n");
    let a = Daemon::start(env(), &work.join("host-a"), &[]).unwrap();
    let b = Daemon::start(env(), &work.join("host-b"), &[]).unwrap();
    a.strata().publish(&src, &store, "base:v1");
    let vol = ["--volume", "fn/deep"];
    let depth = 20_000;
    let script = |mp: &std::path::Path, make: bool| {
        let body = if make {
            "for _ in range(n):\n    os.mkdir('d')\n    os.chdir('d')\nopen('bottom', 'w').write('deep down')\nprint('ok')"
        } else {
            "for _ in range(n):\n    os.chdir('d')\nprint(open('bottom').read())"
        };
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import os, sys\nn = {depth}\nos.chdir(sys.argv[1])\n{body}"
            ))
            .arg(mp)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    {
        let m = a
            .mount_with(&store, &work.join("a1"), &["base:v1"], &vol)
            .unwrap();
        assert_eq!(script(&m.mountpoint, true).trim(), "ok");
        let out = a.strata().ok(&["unmount", m.mountpoint.to_str().unwrap()]);
        println!("{out}");
    }
    // Daemon A still serves.
    a.strata().ok(&["stats"]);
    let m = b
        .mount_with(&store, &work.join("b1"), &["base:v1"], &vol)
        .unwrap();
    assert_eq!(script(&m.mountpoint, false).trim(), "deep down");
    assert_eq!(fs::read(m.path("readme")).unwrap(), b"base\n");
    drop(m);
    drop((a, b));
    let _ = fs::remove_dir_all(&work);
}
