//! Start records against a real Garage: a start recorded by one daemon is fetched ahead by
//! another with a cold cache (another host, as far as strata can tell), so that its reads find
//! their bytes local; and the flags that turn recording and replay off.

use std::path::Path;
use std::time::{Duration, Instant};

use strata_tests::daemon::Daemon;
use strata_tests::garage;
use strata_tests::tree::{pseudo_random, write_file};

/// An environment of `n` small modules in a few packages, and a model file.
fn write_env(root: &Path, n: usize) -> Vec<String> {
    let mut files = Vec::new();
    for i in 0..n {
        let rel = format!("pkg{}/mod{i}.py", i % 7);
        write_file(
            &root.join(&rel),
            &pseudo_random(i as u64, 6000 + (i * 997) % 30_000),
        );
        files.push(rel);
    }
    write_file(&root.join("model.bin"), &pseudo_random(1000, 6 << 20));
    files
}

/// The start a function makes: the first `n` modules, then 1 MiB of the model.
fn start(root: &Path, files: &[String], n: usize) -> Vec<Vec<u8>> {
    let mut got: Vec<Vec<u8>> = files[..n]
        .iter()
        .map(|f| std::fs::read(root.join(f)).unwrap())
        .collect();
    let mut part = vec![0u8; 1 << 20];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(root.join("model.bin")).unwrap(),
        &mut part,
        2 << 20,
    )
    .unwrap();
    got.push(part);
    got
}

fn mount_stats(d: &Daemon, mountpoint: &Path) -> serde_json::Value {
    let stats = d.stats();
    stats["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountpoint"].as_str() == mountpoint.to_str())
        .cloned()
        .unwrap_or_else(|| panic!("no stats for {}: {stats}", mountpoint.display()))
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let t = Instant::now();
    while !check() {
        assert!(t.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_start_recorded_on_one_host_is_fetched_ahead_on_another() {
    let work = strata_tests::scratch_dir("prefetch");
    let files = write_env(&work.join("src"), 240);
    let expected = start(&work.join("src"), &files, 120);
    let g = garage::shared();
    let store = garage::bucket("prefetch");

    // Host A: the first start ever. It reads half the modules and part of the model.
    let a = Daemon::start(g.env(), &work.join("a"), &[]).unwrap();
    a.strata().publish(&work.join("src"), &store, "env:v1");
    let inspect = |a: &Daemon| -> serde_json::Value {
        serde_json::from_str(
            &a.strata()
                .ok(&["inspect", &store, "env:v1", "--json", "--summary"]),
        )
        .unwrap()
    };
    assert!(
        inspect(&a)["start_record"].is_null(),
        "no record before any start"
    );
    let m = a.mount(&store, &work.join("mnt-a"), &["env:v1"]).unwrap();
    assert_eq!(start(&m.mountpoint, &files, 120), expected);
    // The start is over once the function has read nothing new for a while; then the record
    // is merged into the store.
    let mut record = serde_json::Value::Null;
    wait_for("the start record", Duration::from_secs(30), || {
        record = inspect(&a)["start_record"].clone();
        !record.is_null()
    });
    drop(m);
    let recorded: Vec<&str> = record["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    let mut read: Vec<String> = files[..120].iter().map(|f| format!("/{f}")).collect();
    read.push("/model.bin".into());
    assert_eq!(recorded, read, "the files the start read, in its order");
    assert_eq!(record["replayed_files"], 121);
    let text = a.strata().ok(&["inspect", &store, "env:v1", "--prefetch"]);
    assert!(
        text.contains("121 fetched at a cold mount") && text.contains("/pkg0/mod0.py"),
        "{text}"
    );

    // Host B: a cold cache. The mount fetches what the record names, ahead of the function.
    let b = Daemon::start(g.env(), &work.join("b"), &[]).unwrap();
    let mb = b.mount(&store, &work.join("mnt-b"), &["env:v1"]).unwrap();
    wait_for("the replay", Duration::from_secs(60), || {
        mount_stats(&b, &mb.mountpoint)["prefetch"]["done"] == true
    });
    let before = mount_stats(&b, &mb.mountpoint);
    assert_eq!(before["prefetch"]["records"], 1, "{before}");
    assert_eq!(before["prefetch"]["files"], 121, "{before}");
    let fetched = before["prefetch"]["bytes_fetched"].as_u64().unwrap();
    assert!(fetched > 0, "{before}");
    assert_eq!(start(&mb.mountpoint, &files, 120), expected);
    let after = mount_stats(&b, &mb.mountpoint);
    // (Readahead past the part of the model the start read may still fetch.)
    assert_eq!(
        after["stats"]["store_hits"], before["stats"]["store_hits"],
        "no read of the start waited on the store: {after}"
    );
    assert!(
        after["stats"]["disk_hits"].as_u64().unwrap() >= 121,
        "the start's reads were answered from the local disk: {after}"
    );
    // What no start read was not fetched: most of the model.
    let dataset: u64 = files
        .iter()
        .chain(["model.bin".to_string()].iter())
        .map(|f| std::fs::metadata(work.join("src").join(f)).unwrap().len())
        .sum();
    let replayed = before["stats"]["store_bytes"].as_u64().unwrap();
    assert!(
        replayed + (4 << 20) < dataset,
        "replay fetched {replayed} bytes of a {dataset} byte dataset"
    );
    assert!(fetched <= replayed, "{before}");
    drop(mb);
    // Host B's start is merged in too (the unmount ends its recording).
    wait_for("host B's start merged", Duration::from_secs(30), || {
        inspect(&b)["start_record"]["starts"].as_f64() > Some(1.5)
    });
    let record = inspect(&b)["start_record"].clone();

    // Host C: replay off, per mount; then recording off for the whole daemon.
    let c = Daemon::start(g.env(), &work.join("c"), &["--no-prefetch-record"]).unwrap();
    let mc = c
        .mount_with(
            &store,
            &work.join("mnt-c"),
            &["env:v1"],
            &["--no-prefetch-replay"],
        )
        .unwrap();
    assert_eq!(mount_stats(&c, &mc.mountpoint)["prefetch"]["records"], 0);
    let before = mount_stats(&c, &mc.mountpoint)["stats"]["store_gets"].clone();
    assert_eq!(
        start(&mc.mountpoint, &files, 10),
        start(&work.join("src"), &files, 10)
    );
    assert!(mount_stats(&c, &mc.mountpoint)["stats"]["store_gets"].as_u64() > before.as_u64());
    // Reads of other files, then idle: with recording off the record stays as it was.
    for f in &files[150..160] {
        std::fs::read(mc.path(f)).unwrap();
    }
    // Past the idle time that ends a recording (2 s) and the save that would follow.
    std::thread::sleep(Duration::from_secs(4));
    drop(mc);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        inspect(&c)["start_record"],
        record,
        "recording off: the record is as it was"
    );
}
