//! The host daemon against a real Garage: one cache shared by every mount, a budget that
//! holds, a restart that keeps warm chunks (and catches a corrupt one), and a crash whose
//! stale mounts the next start cleans up.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use strata_tests::daemon::{hash_file, Daemon};
use strata_tests::garage;
use strata_tests::tree::{pseudo_random, write_file};

fn total(stats: &serde_json::Value, field: &str) -> u64 {
    stats["total"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("stats has no total.{field}: {stats}"))
}

#[test]
fn two_mounts_sixteen_readers_fetch_each_chunk_once() {
    let work = strata_tests::scratch_dir("fanout");
    let data = pseudo_random(11, 24 << 20);
    write_file(&work.join("src/model.bin"), &data);
    // Its own server, so the GET count is this test's alone.
    let g = garage::dedicated();
    g.create_bucket("fanout").unwrap();
    let d = Daemon::start(g.env(), &work.join("daemon"), &[]).unwrap();
    let report = d.strata().publish(&work.join("src"), "s3://fanout", "m:v1");
    let chunks = report["chunks_total"].as_u64().unwrap();

    let a = d.mount("s3://fanout", &work.join("a"), &["m:v1"]).unwrap();
    let b = d.mount("s3://fanout", &work.join("b"), &["m:v1"]).unwrap();
    let listed = d.strata().ok(&["mounts"]);
    assert!(
        listed.contains(a.mountpoint.to_str().unwrap())
            && listed.contains(b.mountpoint.to_str().unwrap()),
        "{listed}"
    );

    let before = g.get_object_count().unwrap();
    let requests_before = d.stats()["store_requests"].clone();
    let readers: Vec<_> = (0..16)
        .map(|i| {
            let path = if i % 2 == 0 {
                a.path("model.bin")
            } else {
                b.path("model.bin")
            };
            std::thread::spawn(move || std::fs::read(path))
        })
        .collect();
    for r in readers {
        let got = r.join().unwrap().expect("reading through the daemon");
        assert!(got == data, "bytes differ");
    }
    let stats = d.stats();
    // The server may count a GET a moment after its body was sent: wait for it to settle.
    let mut gets = g.get_object_count().unwrap() - before;
    for _ in 0..20 {
        if gets >= total(&stats, "store_gets") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        gets = g.get_object_count().unwrap() - before;
    }
    // Each chunk came from the store once: the bytes fetched are the file's stored bytes (its
    // chunks plus a one-byte envelope each), and no more GETs than chunks (adjoining chunks
    // share a ranged GET).
    let fetched = total(&stats, "store_bytes");
    assert!(
        fetched >= data.len() as u64 && fetched <= data.len() as u64 + chunks,
        "16 readers on 2 mounts fetched {fetched} bytes of a {} byte file: {stats}",
        data.len()
    );
    assert!(
        gets >= 1 && gets <= chunks,
        "the store saw {gets} GETs for {chunks} chunks"
    );
    assert_eq!(
        total(&stats, "store_gets"),
        gets,
        "strata's count and the store's agree"
    );
    // The daemon's count of its requests by kind agrees with the server's too.
    let gets_of = |r: &serde_json::Value| {
        ["get", "get_range", "get_versioned"]
            .iter()
            .map(|k| r[k].as_u64().unwrap())
            .sum::<u64>()
    };
    let requests = &stats["store_requests"];
    assert_eq!(
        gets_of(requests) - gets_of(&requests_before),
        gets,
        "GETs by strata's count and the store's: {requests} {requests_before}"
    );
    assert!(
        requests["bytes_read"].as_u64().unwrap() >= fetched,
        "{requests}"
    );
    let mounts = stats["mounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 2, "{stats}");
    let per_mount: u64 = mounts
        .iter()
        .map(|m| m["store_requests"]["get_range"].as_u64().unwrap())
        .sum();
    assert!(
        per_mount >= total(&stats, "store_gets"),
        "the mounts' ranged GETs cover their chunk fetches: {stats}"
    );
    for m in mounts {
        let s = &m["stats"];
        assert!(s["reads"].as_u64().unwrap() > 0, "{m}");
        // Readers of one mount share its page cache, so each mount serves the file at least once.
        assert!(
            s["bytes_served"].as_u64().unwrap() >= data.len() as u64,
            "{m}"
        );
    }

    // The control socket is root's alone.
    let nobody = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(strata_tests::strata::strata_bin())
        .args(["--socket", d.socket.to_str().unwrap(), "mounts"])
        .output()
        .unwrap();
    assert!(!nobody.status.success());
    let err = String::from_utf8_lossy(&nobody.stderr);
    assert!(
        err.contains("root only") || err.contains("ermission denied"),
        "{err}"
    );

    // Unmounting one mount leaves the other serving.
    d.strata().ok(&["unmount", a.mountpoint.to_str().unwrap()]);
    assert!(!strata_fuse::is_strata_mount(&a.mountpoint).unwrap());
    assert!(std::fs::read(b.path("model.bin")).unwrap() == data);
    assert!(!d
        .strata()
        .ok(&["mounts"])
        .contains(a.mountpoint.to_str().unwrap()));
    drop((a, b, d));
    let _ = std::fs::remove_dir_all(&work);
}

/// Sums the chunk files (and temp files being written) under a cache dir. The walk is not
/// atomic: a chunk evicted after it was counted and one written after that in a shard not yet
/// walked both count, so a sample can exceed the true usage by the chunks in flight.
fn cache_bytes(cache: &Path) -> u64 {
    let mut total = 0;
    let mut dirs = vec![cache.join("tmp"), cache.join("chunks"), cache.join("files")];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => dirs.push(e.path()),
                // Local copies are sparse: what they hold is what is allocated (their maps
                // are not cache content).
                Ok(_) if e.path().extension().is_some_and(|x| x == "map") => {}
                Ok(m) if dir.starts_with(cache.join("files")) => {
                    total += (std::os::unix::fs::MetadataExt::blocks(&m) * 512).min(m.len())
                }
                Ok(m) => total += m.len(),
                Err(_) => {} // evicted while we looked
            }
        }
    }
    total
}

/// [`cache_bytes`] once the cache writes behind the reads have settled (two walks 100 ms apart
/// agree; 5 s at most).
fn settled_cache_bytes(cache: &Path) -> u64 {
    let mut settled = cache_bytes(cache);
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let now = cache_bytes(cache);
        if now == settled {
            break;
        }
        settled = now;
    }
    settled
}

#[test]
fn cache_stays_within_its_budget_under_four_readers() {
    let work = strata_tests::scratch_dir("budget");
    let mut hashes = Vec::new();
    for i in 0..4u64 {
        let data = pseudo_random(100 + i, 125 << 20);
        hashes.push(blake3::hash(&data));
        write_file(&work.join(format!("src/part-{i}.bin")), &data);
    }
    let store = garage::bucket("budget");
    // The budget comes from the config file, the rest from flags.
    let config = work.join("daemon.toml");
    std::fs::write(
        &config,
        "cache_size = \"64M\"\nmemory_cache_size = \"8M\"\n",
    )
    .unwrap();
    let d = Daemon::start(
        garage::shared().env(),
        &work.join("daemon"),
        &["--config", config.to_str().unwrap()],
    )
    .unwrap();
    d.strata().publish(&work.join("src"), &store, "big:v1");
    let _ = std::fs::remove_dir_all(work.join("src"));
    let m = d.mount(&store, &work.join("mnt"), &["big:v1"]).unwrap();
    assert_eq!(total(&d.stats(), "disk_capacity"), 64 << 20);

    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, peak, cache) = (done.clone(), peak.clone(), d.cache_dir.clone());
        std::thread::spawn(move || {
            let mut samples = 0u64;
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(cache_bytes(&cache), Ordering::Relaxed);
                samples += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            samples
        })
    };
    let readers: Vec<_> = (0..4)
        .map(|i| {
            let path = m.path(&format!("part-{i}.bin"));
            std::thread::spawn(move || hash_file(&path))
        })
        .collect();
    for (i, r) in readers.into_iter().enumerate() {
        let got = r.join().unwrap().expect("reading under a small cache");
        assert_eq!(got, hashes[i], "part-{i}.bin differs");
    }
    done.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    let stats = d.stats();
    eprintln!(
        "500 MiB through a 64 MiB cache: peak on disk {peak} bytes over {samples} samples, {} evictions",
        total(&stats, "disk_evictions")
    );
    assert!(samples > 10, "the sampler ran {samples} times");
    // The daemon's own account never passes the budget: space is reserved before a chunk file
    // is written. The sampled walk may count chunks in flight twice (one evicted after it was
    // counted, its replacement written in a shard not walked yet); allow for 8 MiB of them.
    let in_flight = 8 << 20;
    assert!(
        peak <= (64 << 20) + in_flight,
        "cache reached {peak} bytes, over its 64 MiB budget plus the chunks in flight"
    );
    assert!(total(&stats, "disk_used") <= 64 << 20, "{stats}");
    // Once the cache writes behind the reads have settled, a walk is exact: the files on disk
    // fit the budget, with no slack at all.
    let settled = settled_cache_bytes(&d.cache_dir);
    assert!(
        settled <= 64 << 20,
        "{settled} bytes of chunk files on disk after the run"
    );
    assert!(total(&stats, "disk_evictions") > 0, "{stats}");
    drop((m, d));
    let _ = std::fs::remove_dir_all(&work);
}

/// Large files cached as local copies under a small budget: copies evict each other (whole,
/// never the one being read), the cache dir never holds more than the budget, every byte read
/// is right, and after a restart the copies left are checked and serve reads again.
#[test]
fn local_copies_share_a_small_budget_and_survive_a_restart() {
    let work = strata_tests::scratch_dir("copies");
    let files: Vec<Vec<u8>> = (0..6u64)
        .map(|i| pseudo_random(300 + i, 10 << 20))
        .collect();
    for (i, f) in files.iter().enumerate() {
        write_file(&work.join(format!("src/f{i}.bin")), f);
    }
    let store = garage::bucket("copies");
    // 48 MiB: each 10 MiB file fits a quarter of it (a copy), four do not fit at once.
    let mut d = Daemon::start(
        garage::shared().env(),
        &work.join("daemon"),
        &["--cache-size", "48M"],
    )
    .unwrap();
    d.strata().publish(&work.join("src"), &store, "c:v1");
    let m = d.mount(&store, &work.join("mnt"), &["c:v1"]).unwrap();
    for round in 0..2 {
        for (i, f) in files.iter().enumerate() {
            let got = std::fs::read(m.path(&format!("f{i}.bin"))).unwrap();
            assert!(got == *f, "f{i}.bin differs in round {round}");
        }
    }
    let stats = d.stats();
    assert!(total(&stats, "disk_used") <= 48 << 20, "{stats}");
    assert!(total(&stats, "disk_evictions") > 0, "{stats}");
    assert!(total(&stats, "disk_files") >= 1, "{stats}");
    let settled = settled_cache_bytes(&d.cache_dir);
    assert!(settled <= 48 << 20, "{settled} bytes in the cache dir");
    drop(m);
    assert!(d.stop().unwrap().success(), "{}", d.log_text());

    d.restart().unwrap();
    let before = total(&d.stats(), "disk_used");
    assert!(before > 0, "the copies survived the restart");
    let m = d.mount(&store, &work.join("mnt"), &["c:v1"]).unwrap();
    for (i, f) in files.iter().enumerate().rev() {
        let got = std::fs::read(m.path(&format!("f{i}.bin"))).unwrap();
        assert!(got == *f, "f{i}.bin differs after the restart");
    }
    let stats = d.stats();
    assert_eq!(total(&stats, "corrupt_chunks"), 0, "{stats}");
    assert!(
        total(&stats, "disk_hits") + total(&stats, "memory_hits") > 0,
        "{stats}"
    );
    assert!(total(&stats, "disk_used") <= 48 << 20, "{stats}");
    drop((m, d));
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn restart_serves_warm_chunks_and_replaces_a_corrupt_one() {
    let work = strata_tests::scratch_dir("restart");
    let data = pseudo_random(21, 8 << 20);
    write_file(&work.join("src/table.bin"), &data);
    let store = garage::bucket("restart");
    let mut d = Daemon::start(garage::shared().env(), &work.join("daemon"), &[]).unwrap();
    d.strata().publish(&work.join("src"), &store, "t:v1");
    {
        let m = d.mount(&store, &work.join("mnt"), &["t:v1"]).unwrap();
        assert!(std::fs::read(m.path("table.bin")).unwrap() == data);
    }
    // The file's chunks are cached in its local copy (once: no chunk files beside it). The
    // last writes of a read finish just after it.
    let mut stats = d.stats();
    for _ in 0..100 {
        if total(&stats, "disk_files") == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        stats = d.stats();
    }
    assert_eq!(total(&stats, "disk_files"), 1, "{stats}");
    assert!(total(&stats, "disk_used") <= data.len() as u64, "{stats}");
    assert!(d.stop().unwrap().success(), "{}", d.log_text());

    // Damage one cached chunk while the daemon is down (same length, different bytes).
    let shard = std::fs::read_dir(d.cache_dir.join("files"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let victim = std::fs::read_dir(&shard)
        .unwrap()
        .map(|f| f.unwrap().path())
        .find(|p| p.extension().is_none())
        .unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&victim, &bytes).unwrap();

    d.restart().unwrap();
    let m = d.mount(&store, &work.join("mnt"), &["t:v1"]).unwrap();
    assert!(
        std::fs::read(m.path("table.bin")).unwrap() == data,
        "bytes differ after restart"
    );
    let stats = d.stats();
    assert_eq!(
        total(&stats, "store_gets"),
        1,
        "only the corrupted chunk is fetched again: {stats}"
    );
    assert_eq!(total(&stats, "corrupt_chunks"), 1, "{stats}");
    assert!(d.log_text().contains("corrupt"), "{}", d.log_text());
    drop((m, d));
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn a_killed_daemon_leaves_stale_mounts_that_the_next_start_cleans() {
    let work = strata_tests::scratch_dir("crash");
    let data = pseudo_random(31, 1 << 20);
    write_file(&work.join("src/f.bin"), &data);
    let store = garage::bucket("crash");
    let mut d = Daemon::start(garage::shared().env(), &work.join("daemon"), &[]).unwrap();
    d.strata().publish(&work.join("src"), &store, "c:v1");
    let mps = [work.join("one"), work.join("two")];
    for mp in &mps {
        std::mem::forget(d.mount(&store, mp, &["c:v1"]).unwrap());
    }
    // Another test's daemon starting now would clean these mounts first.
    let held = strata_tests::daemon::exclusive();
    d.kill();
    for mp in &mps {
        let err = std::fs::metadata(mp).expect_err("the mount's server is dead");
        assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    }

    d.restart_holding(&held).unwrap();
    drop(held);
    for mp in &mps {
        assert!(
            !strata_fuse::is_strata_mount(mp).unwrap(),
            "{} still mounted",
            mp.display()
        );
        assert!(std::fs::metadata(mp).unwrap().is_dir());
    }
    assert!(
        d.log_text().contains("cleaned up stale mount"),
        "{}",
        d.log_text()
    );
    let m = d.mount(&store, &mps[0], &["c:v1"]).unwrap();
    assert!(std::fs::read(m.path("f.bin")).unwrap() == data);
    drop((m, d));
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn mount_without_a_daemon_says_how_to_get_one() {
    let work = strata_tests::scratch_dir("nodaemon");
    std::fs::create_dir_all(work.join("mnt")).unwrap();
    let s = strata_tests::strata::Strata::new(vec![(
        "STRATA_SOCKET".into(),
        work.join("none.sock").display().to_string(),
    )]);
    let err = s.fails(&[
        "mount",
        "file:///nowhere",
        work.join("mnt").to_str().unwrap(),
        "--layer",
        "x:v1",
    ]);
    assert!(
        err.contains("strata daemon") && err.contains("--foreground"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn daemon_refuses_a_bad_config_and_a_second_instance() {
    let work = strata_tests::scratch_dir("daemon-bad");
    let s = strata_tests::strata::Strata::new(vec![]);
    let config = work.join("bad.toml");
    std::fs::write(&config, "cache_sise = \"1G\"\n").unwrap();
    let err = s.fails(&["daemon", "--config", config.to_str().unwrap()]);
    assert!(
        err.contains("cache_sise") && err.contains("bad.toml"),
        "{err}"
    );
    std::fs::write(&config, "cache_size = \"lots\"\n").unwrap();
    let err = s.fails(&["daemon", "--config", config.to_str().unwrap()]);
    assert!(err.contains("cache_size") && err.contains("lots"), "{err}");

    let d = Daemon::start(vec![], &work.join("one"), &[]).unwrap();
    // Same socket: refused, and the running daemon keeps its socket.
    let err = d.strata().fails(&[
        "daemon",
        "--cache-dir",
        work.join("other-cache").to_str().unwrap(),
    ]);
    assert!(err.contains("another strata daemon"), "{err}");
    d.strata().ok(&["mounts"]);
    // Same cache dir, other socket: refused too.
    let err = s.fails(&[
        "--socket",
        work.join("two.sock").to_str().unwrap(),
        "daemon",
        "--cache-dir",
        d.cache_dir.to_str().unwrap(),
    ]);
    assert!(err.contains("in use by another strata process"), "{err}");
    // A request that is not JSON gets a clear answer, and the daemon goes on.
    use std::io::{BufRead, Write};
    let mut conn = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    conn.write_all(b"hello\n").unwrap();
    let mut reply = String::new();
    std::io::BufReader::new(conn).read_line(&mut reply).unwrap();
    assert!(reply.contains("malformed request"), "{reply}");
    d.strata().ok(&["mounts"]);
    drop(d);
    let _ = std::fs::remove_dir_all(&work);
}

/// Read-only mounts of one stack are one FUSE session bound at several mountpoints (one kernel
/// page cache); a scratch mount, or another stack, gets a session of its own. The session
/// outlives any one of its mountpoints and ends with the last.
#[test]
fn read_only_mounts_of_one_stack_share_one_session() {
    use std::os::unix::fs::MetadataExt;
    let work = strata_tests::scratch_dir("shared-session");
    let data = pseudo_random(21, 8 << 20);
    write_file(&work.join("src/model.bin"), &data);
    write_file(&work.join("other/x"), b"x");
    let store = garage::bucket("shared");
    let d = Daemon::start(garage::shared().env(), &work.join("daemon"), &[]).unwrap();
    d.strata().publish(&work.join("src"), &store, "m:v1");
    d.strata().publish(&work.join("other"), &store, "o:v1");
    let ro = |name: &str, layer: &str| {
        d.mount_with(&store, &work.join(name), &[layer], &["--read-only"])
            .unwrap()
    };
    let a = ro("a", "m:v1");
    let b = ro("b", "m:v1");
    let c = d.mount(&store, &work.join("c"), &["m:v1"]).unwrap();
    let e = ro("e", "o:v1");
    let dev = |p: &Path| std::fs::metadata(p).unwrap().dev();
    assert_eq!(dev(&a.mountpoint), dev(&b.mountpoint), "one session");
    assert_ne!(
        dev(&a.mountpoint),
        dev(&c.mountpoint),
        "a scratch mount has its own"
    );
    assert_ne!(
        dev(&a.mountpoint),
        dev(&e.mountpoint),
        "another stack has its own"
    );
    let mounts: serde_json::Value =
        serde_json::from_str(&d.strata().ok(&["mounts", "--json"])).unwrap();
    let of = |mp: &Path| {
        mounts
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountpoint"].as_str() == mp.to_str())
            .cloned()
            .unwrap()
    };
    assert_eq!(of(&b.mountpoint)["shared_with"], of(&a.mountpoint)["id"]);
    assert!(of(&c.mountpoint)["shared_with"].is_null());
    assert!(std::fs::read(a.path("model.bin")).unwrap() == data);
    assert!(std::fs::read(b.path("model.bin")).unwrap() == data);

    // The first mountpoint goes; the session goes on for the second, and a new one joins it.
    d.strata().ok(&["unmount", a.mountpoint.to_str().unwrap()]);
    assert!(!strata_fuse::is_strata_mount(&a.mountpoint).unwrap());
    assert!(std::fs::read(b.path("model.bin")).unwrap() == data);
    let f = ro("f", "m:v1");
    assert_eq!(dev(&f.mountpoint), dev(&b.mountpoint));
    // Unmounted behind the daemon's back: forgotten at the next listing.
    rustix::mount::unmount(&f.mountpoint, rustix::mount::UnmountFlags::empty()).unwrap();
    let listed = d.strata().ok(&["mounts"]);
    assert!(!listed.contains(f.mountpoint.to_str().unwrap()), "{listed}");
    assert!(std::fs::read(b.path("model.bin")).unwrap() == data);
    // Other start-record flags: a session of its own.
    let g = d
        .mount_with(
            &store,
            &work.join("g"),
            &["m:v1"],
            &["--read-only", "--no-prefetch-record"],
        )
        .unwrap();
    assert_ne!(dev(&g.mountpoint), dev(&b.mountpoint));
    drop(g);
    // The last mountpoint: the session ends (at once: the unmount waits for it).
    let t = std::time::Instant::now();
    d.strata().ok(&["unmount", b.mountpoint.to_str().unwrap()]);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let listed = d.strata().ok(&["mounts"]);
    assert!(!listed.contains(b.mountpoint.to_str().unwrap()), "{listed}");
    assert!(listed.contains(c.mountpoint.to_str().unwrap()), "{listed}");
    assert!(!strata_fuse::is_strata_mount(&b.mountpoint).unwrap());
    drop((c, e));
}

/// The value of the sample `name` (with its labels, as printed) in a Prometheus scrape.
fn sample(scrape: &str, name: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn metrics_are_served_and_follow_what_mounts_read() {
    let work = strata_tests::scratch_dir("metrics");
    let data = pseudo_random(21, 3 << 20);
    write_file(&work.join("src/data.bin"), &data);
    let g = garage::shared();
    let store = garage::bucket("metrics");
    let port = strata_tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start(g.env(), &work.join("daemon"), &["--metrics-addr", &addr]).unwrap();
    d.strata().publish(&work.join("src"), &store, "m:v1");
    let m = d
        .mount_with(&store, &work.join("mnt"), &["m:v1"], &["--read-only"])
        .unwrap();
    assert!(std::fs::read(m.path("data.bin")).unwrap() == data);
    // The function probes for files that are not there: errors by errno.
    for name in ["missing-1", "missing-2", "missing-3"] {
        assert!(std::fs::metadata(m.path(name)).is_err());
    }

    let response = garage::http_get(port, "/metrics").unwrap();
    let (head, scrape) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    // What the daemon says in `strata stats` is what Prometheus sees.
    let stats = d.stats();
    let served = sample(scrape, "strata_read_bytes_total").expect(scrape);
    assert!(served >= data.len() as f64, "{served}\n{scrape}");
    assert!(served <= total(&stats, "bytes_served") as f64);
    let mp = m.mountpoint.to_str().unwrap();
    let labels = format!("{{mountpoint=\"{mp}\",store=\"{store}\"}}");
    let mount_served =
        sample(scrape, &format!("strata_mount_read_bytes_total{labels}")).expect(scrape);
    assert!(mount_served >= data.len() as f64, "{scrape}");
    let gets = sample(scrape, "strata_store_requests_total{kind=\"get_range\"}").expect(scrape)
        + sample(scrape, "strata_store_requests_total{kind=\"get\"}").expect(scrape);
    assert!(gets > 0.0, "{scrape}");
    assert_eq!(sample(scrape, "strata_mounts"), Some(1.0), "{scrape}");
    // (Background fetches may go on after the scrape: never more than stats says after it.)
    let fetched = sample(scrape, "strata_chunk_hits_total{tier=\"store\"}").expect(scrape);
    assert!(
        fetched > 0.0 && fetched <= total(&stats, "store_hits") as f64,
        "{scrape}"
    );
    // Every GET's time is in the histogram, in total and for the mount.
    let timed = sample(scrape, "strata_store_fetch_seconds_count").expect(scrape);
    assert!(
        timed > 0.0 && timed <= gets,
        "{timed} of {gets} GETs\n{scrape}"
    );
    assert_eq!(
        sample(scrape, "strata_store_fetch_seconds_bucket{le=\"+Inf\"}"),
        Some(timed)
    );
    assert!(sample(scrape, "strata_store_fetch_seconds_sum").expect(scrape) > 0.0);
    let mount_timed = format!("strata_mount_store_fetch_seconds_count{labels}");
    assert_eq!(sample(scrape, &mount_timed), Some(timed), "{scrape}");
    // The kernel caches a negative lookup, so each missing name is one ENOENT at least.
    let enoent = sample(scrape, "strata_errors_total{errno=\"ENOENT\"}").expect(scrape);
    assert!(enoent >= 3.0, "{scrape}");
    let mount_enoent = format!(
        "strata_mount_errors_total{{errno=\"ENOENT\",mountpoint=\"{mp}\",store=\"{store}\"}}"
    );
    assert_eq!(sample(scrape, &mount_enoent), Some(enoent), "{scrape}");
    assert_eq!(
        sample(scrape, "strata_volume_commits_total{outcome=\"committed\"}"),
        Some(0.0),
        "{scrape}"
    );
    for family in [
        "# TYPE strata_cache_disk_bytes gauge",
        "# TYPE strata_cache_disk_evictions_total counter",
        "# TYPE strata_mount_chunk_hits_total counter",
    ] {
        assert!(scrape.lines().any(|l| l == family), "{family}\n{scrape}");
    }
    // Anything but /metrics is not found; the daemon goes on.
    let other = garage::http_get(port, "/").unwrap();
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    drop(m);
    // Scrapes within a second share a snapshot: the unmount shows in the next one.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let scrape = garage::http_get(port, "/metrics").unwrap();
        if scrape.lines().any(|l| l == "strata_mounts 0") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{scrape}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
