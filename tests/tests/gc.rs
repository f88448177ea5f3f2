//! `strata gc` against real servers: alone on Garage (which ignores conditional writes, so gc
//! there needs --single-writer), and in a loop beside publishes and a daemon's mount on moto
//! (which enforces them).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use strata_tests::daemon::Daemon;
use strata_tests::strata::Strata;
use strata_tests::tree::{pseudo_random, write_file};
use strata_tests::{garage, moto};

/// A publish the race made: its tag, and its own file's bytes.
type Published = (String, Vec<u8>);

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn layer_of(published: &serde_json::Value) -> String {
    published["layer"].as_str().unwrap().to_string()
}

fn cat(s: &Strata, store: &str, dataset: &str, file: &str) -> Vec<u8> {
    let out = s.run(&["cat", store, dataset, file]);
    assert!(
        out.status.success(),
        "cat {dataset} {file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `strata gc --json STORE --grace 0s EXTRA…`, parsed.
fn gc_now(s: &Strata, store: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["gc", "--json", store, "--grace", "0s"];
    args.extend(extra);
    json(&s.ok(&args))
}

/// Store-clock times have a resolution of a second: with `--grace 0s`, what was written in
/// the same second as the collector's lock is still young.
fn let_a_second_pass() {
    std::thread::sleep(Duration::from_millis(1100));
}

#[test]
fn gc_on_garage_needs_single_writer_drops_what_retention_lets_go_and_keeps_every_live_byte() {
    let work = strata_tests::scratch_dir("gc-garage");
    let dir = work.join("ds");
    let shared = pseudo_random(1, 2 << 20);
    write_file(&dir.join("shared.bin"), &shared);
    let store = garage::bucket("gc-alone");
    let s = Strata::new(garage::shared().env());
    // This test is the store's only writer, and says so (refs move only so on Garage).
    let mut env = garage::shared().env();
    env.push(("STRATA_SINGLE_WRITER".into(), "1".into()));
    let sw = Strata::new(env);
    let mut layers = Vec::new();
    let mut changing = Vec::new();
    for v in 0..4u64 {
        let bytes = pseudo_random(100 + v, 1 << 20);
        write_file(&dir.join("changing.bin"), &bytes);
        changing.push(bytes);
        layers.push(layer_of(&sw.publish(&dir, &store, "ds:latest")));
    }
    let policy = s.ok(&["retain", &store, "ds", "--keep-history", "1"]);
    assert!(policy.contains("keep 1 earlier"), "{policy}");
    let_a_second_pass();

    let err = s.fails(&["gc", &store, "--grace", "0s"]);
    assert!(err.contains("--single-writer"), "{err}");
    let dry = json(&s.ok(&[
        "--single-writer",
        "gc",
        "--dry-run",
        "--json",
        &store,
        "--grace",
        "0s",
    ]));
    let before = json(&s.ok(&["du", "--json", &store]));
    assert_eq!(before["total"], dry["before"], "a dry run deletes nothing");
    let report = gc_now(&sw, &store, &[]);
    assert_eq!(report["deleted"]["layers"]["objects"], 2, "{report}");
    assert_eq!(report["freed_bytes"], dry["freed_bytes"], "{report}\n{dry}");
    // v1 had a pack of its own; v0's bytes share a pack with what is live, so they stay,
    // counted as dead bytes inside live packs.
    assert!(
        report["freed_bytes"].as_u64().unwrap() >= 1 << 20,
        "v1's own megabyte: {report}"
    );
    assert!(
        report["requests"]["delete"].as_u64().unwrap() > 0,
        "{report}"
    );

    // The current and the one kept earlier layer read back whole; the other two are gone,
    // and saying so is a clear error.
    assert_eq!(cat(&s, &store, "ds:latest", "changing.bin"), changing[3]);
    assert_eq!(cat(&s, &store, "ds:latest", "shared.bin"), shared);
    let kept = format!("ds@{}", layers[2]);
    assert_eq!(cat(&s, &store, &kept, "changing.bin"), changing[2]);
    for gone in &layers[..2] {
        let err = s.fails(&["cat", &store, &format!("ds@{gone}"), "changing.bin"]);
        assert!(
            err.contains("not found") || err.contains("NotFound") || err.contains("missing"),
            "{err}"
        );
    }
    // Nothing dead is left, and the store holds what du calls live.
    let after = json(&s.ok(&["du", "--json", &store]));
    assert_eq!(after["dead"]["freeable"], 0, "{after}");
    assert!(
        after["dead"]["in_live_packs"].as_u64().unwrap() >= 900 << 10,
        "v0's megabyte: {after}"
    );
    assert_eq!(after["total"], report["after"], "{after}\n{report}");
    let again = gc_now(&sw, &store, &[]);
    assert_eq!(again["freed_bytes"], 0, "{again}");
}

/// A pack mostly dead (a dataset kept one of its ten first files) is rewritten: its live
/// chunks move to a new pack behind a forwarding map, and a daemon's mount made before the
/// rewrite, a fresh mount and `strata cat` all read every byte of the layer (whose digest did
/// not change) from where it is now.
#[test]
fn gc_rewrites_a_mostly_dead_pack_under_a_live_mount() {
    let work = strata_tests::scratch_dir("gc-rewrite");
    let dir = work.join("ds");
    let store = garage::bucket("gc-rewrite");
    let mut env = garage::shared().env();
    env.push(("STRATA_SINGLE_WRITER".into(), "1".into()));
    let d = Daemon::start(env.clone(), &work.join("daemon"), &[]).unwrap();
    let s = d.strata();
    let mut files: Vec<Vec<u8>> = (0..10).map(|i| pseudo_random(500 + i, 1 << 20)).collect();
    for (i, bytes) in files.iter().enumerate() {
        write_file(&dir.join(format!("f{i}.bin")), bytes);
    }
    s.publish(&dir, &store, "ds:latest");
    for (i, bytes) in files.iter_mut().enumerate().skip(1) {
        *bytes = pseudo_random(600 + i as u64, 1 << 20);
        write_file(&dir.join(format!("f{i}.bin")), bytes);
    }
    let layer = layer_of(&s.publish(&dir, &store, "ds:latest"));
    s.ok(&["retain", &store, "ds", "--keep-history", "0"]);
    let held = d
        .mount_with(&store, &work.join("held"), &["ds:latest"], &["--read-only"])
        .unwrap();
    let_a_second_pass();

    let off = json(&s.ok(&[
        "gc",
        "--json",
        "--dry-run",
        &store,
        "--grace",
        "0s",
        "--rewrite-below",
        "0",
    ]));
    assert_eq!(off["rewrite"]["packs"]["objects"], 0, "{off}");
    let report = gc_now(&s, &store, &[]);
    assert!(
        report["problems"].as_array().unwrap().is_empty(),
        "{report}"
    );
    let r = &report["rewrite"];
    assert_eq!(
        r["packs"]["objects"], 1,
        "the first pack, a tenth live: {report}"
    );
    let copied = r["copied"].as_u64().unwrap();
    assert!(
        (512 << 10..1100 << 10).contains(&copied),
        "f0, but for its last chunk: {report}"
    );
    assert_eq!(r["maps"]["objects"], 1, "{report}");
    // The first layer went whole, and nine tenths of its pack with it.
    assert_eq!(report["deleted"]["layers"]["objects"], 1, "{report}");
    assert!(
        report["freed_bytes"].as_u64().unwrap() >= 8 << 20,
        "{report}\n{off}"
    );
    let du = json(&s.ok(&["du", "--json", &store]));
    assert_eq!(du["dead"]["freeable"], 0, "{du}");
    assert!(
        du["dead"]["in_live_packs"].as_u64().unwrap() < 256 << 10,
        "{du}"
    );
    assert_eq!(du["total"], report["after"], "{du}\n{report}");

    // The mount from before the rewrite (nothing read yet), a new one and `cat` read it all.
    let fresh = Daemon::start(garage::shared().env(), &work.join("fresh"), &[]).unwrap();
    let pinned = format!("ds@{layer}");
    let new = fresh
        .mount_with(&store, &work.join("new"), &[&pinned], &["--read-only"])
        .unwrap();
    for (i, bytes) in files.iter().enumerate() {
        let name = format!("f{i}.bin");
        assert!(
            std::fs::read(held.path(&name)).unwrap() == *bytes,
            "held {name}"
        );
        assert!(
            std::fs::read(new.path(&name)).unwrap() == *bytes,
            "new {name}"
        );
    }
    assert!(cat(&s, &store, "ds:latest", "f0.bin") == files[0]);
    let again = gc_now(&s, &store, &[]);
    assert_eq!(again["freed_bytes"], 0, "{again}");
    assert_eq!(again["rewrite"]["packs"]["objects"], 0, "{again}");
}

/// A volume's squashed commits: kept while a mount that started before them may commit
/// again, collected once it has; the volume keeps every committed byte.
#[test]
fn gc_frees_squashed_volume_commits_once_no_mount_needs_them() {
    let work = strata_tests::scratch_dir("gc-squashed");
    let store = garage::bucket("gc-squashed");
    let mut env = garage::shared().env();
    env.push(("STRATA_SINGLE_WRITER".into(), "1".into()));
    let d = Daemon::start(env, &work.join("daemon"), &[]).unwrap();
    let s = d.strata();
    let vol = ["--volume", "t/h"];
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| (format!("f{i}.bin"), pseudo_random(70 + i, 300 << 10)))
        .collect();
    let commit_file = |i: usize, at: &str| {
        let m = d.mount_with(&store, &work.join(at), &[], &vol).unwrap();
        std::fs::write(m.path(&files[i].0), &files[i].1).unwrap();
    };
    // No horizon: only the live mounts decide what of a squash stays.
    let gc = |what: &str| {
        let report = gc_now(&s, &store, &["--keep-replaced", "0s"]);
        assert!(
            report["problems"].as_array().unwrap().is_empty(),
            "{what}: {report}"
        );
        report["deleted"]["layers"]["objects"].as_u64().unwrap_or(0)
    };
    commit_file(0, "m0");
    let_a_second_pass();
    // The empty layer the first mount stood on (a volume with commits needs none).
    assert_eq!(gc("after the first commit"), 1);
    // A mount from the head of one commit, open through what follows.
    let old = d.mount_with(&store, &work.join("old"), &[], &vol).unwrap();
    commit_file(1, "m1");
    commit_file(2, "m2");
    s.ok(&["volume", "squash", &store, "t/h"]);
    let_a_second_pass();
    // The old mount reads its commit 1 and needs 2 and 3 to commit again: nothing goes.
    assert_eq!(gc("while mounted"), 0);
    std::fs::write(old.path(&files[3].0), &files[3].1).unwrap();
    drop(old);
    // Now nobody needs what the squash replaced: its three layers go (the old mount's commit
    // rebased onto the squash) once the daemon has taken the mount out of its lease, which
    // it does in the background.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut freed = 0;
    while freed < 3 {
        let_a_second_pass();
        freed += gc("after the unmount");
        assert!(
            std::time::Instant::now() < deadline,
            "{freed} of 3 layers went"
        );
    }
    assert_eq!(freed, 3);
    // A later squash lists the replaced commits again, gone now: nothing is broken for it.
    commit_file(0, "m4");
    s.ok(&["volume", "squash", &store, "t/h"]);
    let_a_second_pass();
    let report = gc_now(&s, &store, &[]);
    assert!(
        report["problems"].as_array().unwrap().is_empty(),
        "{report}"
    );
    let m = d
        .mount_with(&store, &work.join("check"), &[], &vol)
        .unwrap();
    for (name, bytes) in &files {
        assert!(std::fs::read(m.path(name)).unwrap() == *bytes, "{name}");
    }
    let show = json(&s.ok(&["volume", "show", &store, "t/h", "--json"]));
    assert!(show["conflicts"].as_array().unwrap().is_empty(), "{show}");
}

/// Publishes of overlapping trees from two writers while gc runs in a loop, and a daemon's
/// mount of a tag that then moves: afterwards every tag reads back its last publish, the
/// mount reads what it mounted, and nothing dead is left. Seeded: STRATA_GC_RACE_SEED
/// replays a run.
#[test]
fn gc_in_a_loop_beside_publishes_and_a_mount_loses_nothing() {
    let seed: u64 = std::env::var("STRATA_GC_RACE_SEED")
        .map(|s| s.parse().expect("STRATA_GC_RACE_SEED: a number"))
        .unwrap_or_else(|_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("gc race: seed {seed} (replay: STRATA_GC_RACE_SEED={seed})");
    let work = strata_tests::scratch_dir("gc-race");
    let store = moto::bucket("gc-race");
    let s = Strata::new(moto::shared().env());
    s.ok(&["retain", &store, "ds", "--keep-history", "0"]);
    let shared: Vec<Vec<u8>> = (0..3).map(|i| pseudo_random(seed ^ i, 700 << 10)).collect();
    let write_tree = |dir: &Path, own: &[u8]| {
        for (i, bytes) in shared.iter().enumerate() {
            write_file(&dir.join(format!("shared-{i}.bin")), bytes);
        }
        write_file(&dir.join("own.bin"), own);
    };

    // A daemon mounts ds:held before the race; the race moves that tag, gc runs with no
    // grace and keeps no earlier layer: only the mount's lease keeps its bytes.
    let held_own = pseudo_random(seed ^ 0xAB, 900 << 10);
    write_tree(&work.join("held"), &held_own);
    let held_layer = layer_of(&s.publish(&work.join("held"), &store, "ds:held"));
    let d = Daemon::start(moto::shared().env(), &work.join("host"), &[]).unwrap();
    let mount = d
        .mount_with(&store, &work.join("mnt"), &["ds:held"], &["--read-only"])
        .unwrap();

    // Two daemons (two hosts) mount one volume and commit files of their own to it, so
    // their commits rebase on each other's, while squashes replace the chain beside them.
    let d2 = Daemon::start(moto::shared().env(), &work.join("host2"), &[]).unwrap();
    let volumes = [&d, &d2].map(|daemon| {
        let mp = work.join(format!("vol-{}", daemon.pid().unwrap_or_default()));
        daemon
            .mount_with(&store, &mp, &[], &["--volume", "t/v"])
            .unwrap()
    });

    let writers_done = AtomicBool::new(false);
    let expected: Mutex<Vec<Published>> = Mutex::default();
    let rounds = 4u64;
    let ((runs, freed_in_race), committed) = std::thread::scope(|scope| {
        let publishers: Vec<_> = (0..2u64)
            .map(|w| {
                let (s, store, work, shared, expected) = (&s, &store, &work, &shared, &expected);
                scope.spawn(move || {
                    for round in 0..rounds {
                        let dir = work.join(format!("w{w}-{round}"));
                        for (i, bytes) in shared.iter().enumerate() {
                            write_file(&dir.join(format!("shared-{i}.bin")), bytes);
                        }
                        let own = pseudo_random(seed ^ (w << 32) ^ round, 500 << 10);
                        write_file(&dir.join("own.bin"), &own);
                        // The first writer moves ds:held (the mount's tag) on its first round.
                        let tag = if (w, round) == (0, 0) {
                            "held".to_string()
                        } else {
                            format!("w{w}")
                        };
                        s.publish(&dir, store, &format!("ds:{tag}"));
                        expected.lock().unwrap().push((tag, own));
                    }
                })
            })
            .collect();
        let committers: Vec<_> = volumes
            .iter()
            .zip([d.strata(), d2.strata()])
            .enumerate()
            .map(|(host, (vol, daemon))| {
                scope.spawn(move || {
                    let mut files = Vec::new();
                    for round in 0..2 * rounds {
                        let name = format!("host{host}-{round}.bin");
                        let bytes = pseudo_random(seed ^ ((host as u64) << 40) ^ round, 300 << 10);
                        std::fs::write(vol.path(&name), &bytes).unwrap();
                        daemon.ok(&["commit", vol.mountpoint.to_str().unwrap()]);
                        files.push((name, bytes));
                    }
                    files
                })
            })
            .collect();
        let collector = {
            let (s, store, done) = (&s, &store, &writers_done);
            scope.spawn(move || {
                let (mut runs, mut freed) = (0, 0);
                // What each collection deleted goes to the test's output (shown if it fails).
                let mut logged = s.clone();
                logged
                    .env
                    .push(("STRATA_LOG".into(), "strata_fs::gc=debug".into()));
                while !done.load(Ordering::SeqCst) || runs < 2 {
                    // No horizon for squashed commits: only the hosts' leases keep them.
                    let out = logged.run(&[
                        "gc",
                        "--json",
                        store,
                        "--grace",
                        "0s",
                        "--keep-replaced",
                        "0s",
                        "--wait",
                        "5m",
                    ]);
                    let said = String::from_utf8_lossy(&out.stderr);
                    println!("gc run {runs}:\n{said}");
                    assert!(out.status.success(), "{said}");
                    let report = json(&String::from_utf8_lossy(&out.stdout));
                    assert!(
                        report["problems"].as_array().unwrap().is_empty(),
                        "{report}"
                    );
                    runs += 1;
                    if !done.load(Ordering::SeqCst) {
                        freed += report["freed_bytes"].as_u64().unwrap();
                    }
                    // A squash may find that a commit landed meanwhile: it says so, and the
                    // next one squashes. Before the hosts' first commit there is no volume
                    // yet to squash.
                    let squash = s.run(&["volume", "squash", store, "t/v"]);
                    let said = String::from_utf8_lossy(&squash.stderr);
                    assert!(
                        squash.status.success()
                            || said.contains("try again")
                            || said.contains("no volume t/v"),
                        "{said}"
                    );
                    // Writers waiting for the lock get their turn.
                    std::thread::sleep(Duration::from_millis(200));
                }
                (runs, freed)
            })
        };
        for p in publishers {
            p.join().unwrap();
        }
        let committed: Vec<(String, Vec<u8>)> = committers
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect();
        writers_done.store(true, Ordering::SeqCst);
        (collector.join().unwrap(), committed)
    });
    // The volume mounts commit what is left as they go.
    for v in volumes {
        drop(v);
    }
    let_a_second_pass();
    let final_gc = gc_now(&s, &store, &["--keep-replaced", "0s"]);
    println!(
        "gc race: {runs} collections beside {} publishes and {} commits on two hosts; last: {final_gc}",
        2 * rounds,
        committed.len()
    );

    // Every tag reads back its last publish (each tag has one writer, whose publishes are
    // in order).
    let expected = expected.into_inner().unwrap();
    for w in 0..2u64 {
        let tag = format!("ds:w{w}");
        let want = &expected
            .iter()
            .rev()
            .find(|(t, _)| t == &format!("w{w}"))
            .unwrap()
            .1;
        assert_eq!(&cat(&s, &store, &tag, "own.bin"), want, "{tag}");
        for (i, bytes) in shared.iter().enumerate() {
            assert_eq!(&cat(&s, &store, &tag, &format!("shared-{i}.bin")), bytes);
        }
    }
    let held_now = cat(&s, &store, "ds:held", "own.bin");
    assert!(
        expected
            .iter()
            .any(|(t, own)| t == "held" && *own == held_now),
        "ds:held reads its publish"
    );
    // The collections beside the writers did collect (the layers the tags left).
    assert!(
        freed_in_race > 0,
        "no collection freed anything during the race"
    );
    // The mount's layer is no root but its lease, and it is whole in the store...
    for f in ["own.bin", "shared-0.bin"] {
        let want = if f == "own.bin" {
            &held_own
        } else {
            &shared[0]
        };
        assert_eq!(
            &cat(&s, &store, &format!("ds@{held_layer}"), f),
            want,
            "{f}"
        );
    }
    // ...and the mount reads it.
    assert_eq!(std::fs::read(mount.path("own.bin")).unwrap(), held_own);
    for (i, bytes) in shared.iter().enumerate() {
        assert_eq!(
            &std::fs::read(mount.path(&format!("shared-{i}.bin"))).unwrap(),
            bytes
        );
    }
    // The volume, mounted anew, has every file both hosts committed.
    let check = d
        .mount_with(&store, &work.join("vol-check"), &[], &["--volume", "t/v"])
        .unwrap();
    for (name, bytes) in &committed {
        assert_eq!(&std::fs::read(check.path(name)).unwrap(), bytes, "{name}");
    }
    drop(check);
    let du = json(&s.ok(&["du", "--json", &store]));
    assert_eq!(du["dead"]["freeable"], 0, "{du}");
    // Unmounted, its layer goes at the next collection (once the daemon has taken it out
    // of its lease).
    drop(mount);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let du = json(&s.ok(&["du", "--json", &store]));
        let leased = du["owners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["owner"]["kind"] == "mount");
        if !leased {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the lease stays: {du}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let_a_second_pass();
    let last = gc_now(&s, &store, &["--keep-replaced", "0s"]);
    assert_eq!(
        last["deleted"]["layers"]["objects"], 1,
        "the held layer: {last}"
    );
    drop(d);
    let _ = std::fs::remove_dir_all(&work);
}
