//! `strata run` against a real daemon and Garage: what a command sees in its sandbox, what it
//! cannot see or change, its exit status, its volume, and 16 runs at once sharing one cache
//! and leaving nothing behind.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use strata_tests::daemon::Daemon;
use strata_tests::garage;
use strata_tests::tree::{pseudo_random, write_file};

fn env() -> Vec<(String, String)> {
    let mut env = garage::shared().env();
    env.push(("STRATA_SINGLE_WRITER".into(), "1".into()));
    env
}

/// `strata run STORE ARGS… -- sh -c SCRIPT`.
fn run_command(d: &Daemon, store: &str, args: &[&str], script: &str) -> Command {
    let mut all = vec!["run", store];
    all.extend(args);
    all.extend(["--", "sh", "-c", script]);
    d.strata().command(&all)
}

fn run(d: &Daemon, store: &str, args: &[&str], script: &str) -> Output {
    run_command(d, store, args, script).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Nothing of any run is left: no mounts, no scratch, no run dirs, no sandbox processes.
fn assert_nothing_left(d: &Daemon) {
    let mounts = d.strata().ok(&["mounts"]);
    assert_eq!(mounts.trim(), "no mounts", "daemon log:\n{}", d.log_text());
    assert!(d.scratch_dirs().is_empty(), "{:?}", d.scratch_dirs());
    let runs = d.dir.join("runs");
    let left: Vec<_> = fs::read_dir(&runs)
        .map(|e| e.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "run dirs left: {left:?}");
    let marker = runs.to_string_lossy().into_owned();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let sandboxes: Vec<String> = fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
            .map(|c| text(&c))
            .filter(|c| c.contains(&marker))
            .collect();
        if sandboxes.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "processes left: {sandboxes:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn publish_base(d: &Daemon, work: &Path, store: &str) {
    let src = work.join("src");
    write_file(&src.join("hello.txt"), b"hello\n");
    write_file(&src.join("locked/secret.txt"), b"layer secret\n");
    write_file(&src.join("shared/notes.txt"), b"notes\n");
    fs::set_permissions(src.join("locked"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(src.join("shared"), fs::Permissions::from_mode(0o777)).unwrap();
    d.strata().publish(&src, store, "base:v1");
}

#[test]
fn a_run_sees_its_data_and_nothing_of_the_host() {
    let work = strata_tests::scratch_dir("run-isolation");
    let store = garage::bucket("run-isolation");
    let d = Daemon::start(env(), &work.join("host"), &[]).unwrap();
    publish_base(&d, &work, &store);
    let script = format!(
        r#"set -u
        echo "cwd=$(pwd)"
        cat hello.txt
        env | grep -E '^(AWS_|STRATA_)' && echo LEAK-ENV
        grep -l -a -E 'AWS_SECRET|STRATA_SOCKET' /proc/[0-9]*/environ 2>/dev/null && echo LEAK-PROC
        for p in {socket} {state} {cache} {src}; do test -e "$p" && echo "LEAK-PATH $p"; done
        echo "pids=$(ls -d /proc/[0-9]* | wc -l)"
        grep -c fuse /proc/self/mounts
        grep CapEff /proc/self/status
        mount -o remount,rw /usr 2>/dev/null && echo LEAK-REMOUNT
        mount -t tmpfs none /tmp 2>/dev/null && echo LEAK-MOUNT
        mknod /tmp/disk b 8 0 2>/dev/null && echo LEAK-MKNOD
        echo 1 > /proc/sys/kernel/sysrq 2>/dev/null && echo LEAK-SYSCTL
        touch /usr/leak 2>/dev/null && echo LEAK-WRITE
        echo "fds=$(ls /proc/self/fd | wc -l)"
        echo "shadow=$(cat /etc/shadow | wc -c)"
        echo changed > hello.txt
        exit 7"#,
        socket = d.socket.display(),
        state = d.state_dir.display(),
        cache = d.cache_dir.display(),
        src = work.join("src").display(),
    );
    let out = run(&d, &store, &["--dataset", "base:v1"], &script);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(stdout.contains("cwd=/data\nhello\n"), "{stdout}");
    assert!(!stdout.contains("LEAK"), "{stdout}");
    // Its own init, the shell, and the shell's children: nothing of the host.
    let pids: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("pids="))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(pids <= 6, "{stdout}");
    // One FUSE mount: its own dataset.
    assert!(stdout.lines().any(|l| l == "1"), "{stdout}");
    // Root in the sandbox holds no capabilities, and only stdin, stdout, stderr (and the
    // listing's own descriptor) are open.
    assert!(stdout.contains("CapEff:\t0000000000000000"), "{stdout}");
    assert!(stdout.contains("fds=4\n"), "{stdout}");
    // Not even uid 0 reads what only the host's root may read.
    assert!(stdout.contains("shadow=0\n"), "{stdout}");

    // The write went to that run's scratch only.
    let out = run(&d, &store, &["--dataset", "base:v1"], "cat hello.txt");
    assert_eq!(text(&out.stdout), "hello\n", "{}", text(&out.stderr));
    assert_nothing_left(&d);
    drop(d);
    let _ = fs::remove_dir_all(&work);
}

#[test]
fn concurrent_runs_cannot_see_each_others_scratch() {
    let work = strata_tests::scratch_dir("run-private");
    let store = garage::bucket("run-private");
    let d = Daemon::start(env(), &work.join("host"), &[]).unwrap();
    publish_base(&d, &work, &store);
    // Run A writes files, then waits on its stdin while run B looks for them.
    let mut a = run_command(
        &d,
        &store,
        &["--dataset", "base:v1"],
        "echo mine > /data/only-a.txt && echo private > /tmp/only-a && echo ready && (read _ || true)",
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut ready = [0u8; 6];
    std::io::Read::read_exact(a.stdout.as_mut().unwrap(), &mut ready).unwrap();
    assert_eq!(&ready, b"ready\n");
    let out = run(
        &d,
        &store,
        &["--dataset", "base:v1"],
        "ls /data; ls /tmp; find / -name 'only-a*' 2>/dev/null; echo done",
    );
    let seen = text(&out.stdout);
    assert!(out.status.success(), "{seen}\n{}", text(&out.stderr));
    assert!(!seen.contains("only-a"), "{seen}");
    assert!(
        seen.contains("hello.txt") && seen.ends_with("done\n"),
        "{seen}"
    );
    drop(a.stdin.take()); // A reads EOF and exits
    assert!(a.wait().unwrap().success());
    assert_nothing_left(&d);
    drop(d);
    let _ = fs::remove_dir_all(&work);
}

#[test]
fn an_unprivileged_run_writes_only_where_modes_allow() {
    let work = strata_tests::scratch_dir("run-uid");
    let store = garage::bucket("run-uid");
    let d = Daemon::start(env(), &work.join("host"), &[]).unwrap();
    publish_base(&d, &work, &store);
    let script = r#"
        id -u
        cat hello.txt
        touch new.txt 2>&1 || echo "root-dir: denied"
        echo x >> hello.txt 2>&1 || echo "layer-file: denied"
        cat locked/secret.txt 2>&1 || echo "locked: denied"
        echo mine > shared/mine.txt && cat shared/mine.txt
        echo tmp > /tmp/t && cat /tmp/t
        "#;
    let out = run(
        &d,
        &store,
        &["--dataset", "base:v1", "--uid", "65534", "--gid", "65534"],
        script,
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    for want in [
        "65534\n",
        "hello\n",
        "root-dir: denied",
        "layer-file: denied",
        "locked: denied",
        "mine\n",
        "tmp\n",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
    let stderr = text(&out.stderr);
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert_nothing_left(&d);
    drop(d);
    let _ = fs::remove_dir_all(&work);
}

#[test]
fn a_run_keeps_its_volume_and_reports_failures() {
    let work = strata_tests::scratch_dir("run-volume");
    let store = garage::bucket("run-volume");
    let d = Daemon::start(env(), &work.join("host"), &[]).unwrap();
    publish_base(&d, &work, &store);
    let args = ["--dataset", "base:v1:/models", "--volume", "fn/state"];
    for i in 1..=3 {
        let out = run(
            &d,
            &store,
            &args,
            "pwd; cat /models/hello.txt; echo run >> /persist/runs; wc -l < /persist/runs",
        );
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
        assert_eq!(stdout, format!("/\nhello\n{i}\n"));
    }
    let history = d.strata().ok(&["volume", "history", &store, "fn/state"]);
    assert_eq!(history.lines().count(), 3, "{history}");
    // --workdir, and --env: set, passed from here, or absent.
    let out = d
        .strata()
        .command(&[
            "run",
            &store,
            "--dataset",
            "base:v1:/models",
            "--workdir",
            "/models/shared",
            "--env",
            "GREETING=hi",
            "--env",
            "PASSED",
            "--env",
            "UNSET_HERE",
            "--",
            "sh",
            "-c",
            "pwd; echo $GREETING $PASSED ${UNSET_HERE-unset}",
        ])
        .env("PASSED", "from-caller")
        .output()
        .unwrap();
    assert_eq!(
        text(&out.stdout),
        "/models/shared\nhi from-caller unset\n",
        "{}",
        text(&out.stderr)
    );
    // A command that cannot start, and a command killed by a signal.
    let out = d.strata().run(&[
        "run",
        &store,
        "--dataset",
        "base:v1",
        "--",
        "no-such-command",
    ]);
    assert_eq!(out.status.code(), Some(127));
    assert!(text(&out.stderr).contains("no-such-command"));
    let out = run(&d, &store, &["--dataset", "base:v1"], "kill -KILL $$");
    assert_eq!(out.status.code(), Some(128 + 9));
    // Without the host's network: a loopback interface only, and it is up.
    let out = run(
        &d,
        &store,
        &["--dataset", "base:v1", "--no-network"],
        "grep -c : /proc/net/dev; python3 -c 'import socket; s = socket.socket(); \
         s.bind((\"127.0.0.1\", 0)); s.listen(); socket.create_connection(s.getsockname()); \
         print(\"loopback up\")'",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "1\nloopback up\n");
    // Bad input: clear errors, nothing mounted.
    let out = d
        .strata()
        .run(&["run", &store, "--dataset", "nope:v1", "--", "true"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("nope"), "{}", text(&out.stderr));
    let out = d.strata().run(&[
        "run",
        &store,
        "--dataset",
        "base:v1:/data",
        "--volume",
        "fn/x:/data/inner",
        "--",
        "true",
    ]);
    assert!(
        text(&out.stderr).contains("must not overlap"),
        "{}",
        text(&out.stderr)
    );
    assert_nothing_left(&d);
    drop(d);
    let _ = fs::remove_dir_all(&work);
}

#[test]
fn sixteen_runs_at_once_share_the_cache_and_leave_nothing() {
    let work = strata_tests::scratch_dir("run-fanout");
    let data = pseudo_random(71, 32 << 20);
    write_file(&work.join("src/model.bin"), &data);
    // Its own server, so the GET count is this test's alone.
    let g = garage::dedicated();
    g.create_bucket("runfanout").unwrap();
    let mut env = g.env();
    env.push(("STRATA_SINGLE_WRITER".into(), "1".into()));
    let d = Daemon::start(env, &work.join("host"), &[]).unwrap();
    let report = d
        .strata()
        .publish(&work.join("src"), "s3://runfanout", "m:v1");
    let chunks = report["chunks_total"].as_u64().unwrap();
    let want = Command::new("md5sum")
        .arg(work.join("src/model.bin"))
        .output()
        .unwrap();
    let want = text(&want.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();

    let before = g.get_object_count().unwrap();
    let started = Instant::now();
    let runs: Vec<_> = (0..16)
        .map(|i| {
            // Start records add a record GET (and PUT) per run that this count of chunk
            // fetches is not about (tests/tests/prefetch.rs covers them).
            run_command(
                &d,
                "s3://runfanout",
                &[
                    "--dataset",
                    "m:v1",
                    "--no-prefetch-record",
                    "--no-prefetch-replay",
                ],
                &format!("md5sum model.bin; echo {i} > mine.txt; cat mine.txt"),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    for (i, r) in runs.into_iter().enumerate() {
        let out = r.wait_with_output().unwrap();
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "run {i}: {stdout}\n{}",
            text(&out.stderr)
        );
        assert_eq!(stdout, format!("{want}  model.bin\n{i}\n"), "run {i}");
    }
    let wall = started.elapsed();
    let stats = d.stats();
    let mut gets = g.get_object_count().unwrap() - before;
    for _ in 0..20 {
        if gets >= stats["total"]["store_gets"].as_u64().unwrap() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        gets = g.get_object_count().unwrap() - before;
    }
    let fetched = stats["total"]["store_bytes"].as_u64().unwrap();
    assert!(
        fetched <= data.len() as u64 + chunks,
        "16 runs fetched {fetched} bytes of a {} byte file",
        data.len()
    );
    assert!(
        gets <= chunks,
        "the store saw {gets} GETs for {chunks} chunks"
    );
    println!(
        "16 runs of a 32 MiB dataset: {:.2}s wall, {gets} GETs for {chunks} chunks, {fetched} bytes fetched",
        wall.as_secs_f64()
    );
    assert_nothing_left(&d);
    drop(d);
    let _ = fs::remove_dir_all(&work);
}

#[test]
fn a_run_killed_outright_leaves_nothing_behind() {
    let work = strata_tests::scratch_dir("run-killed");
    let store = garage::bucket("run-killed");
    let d = Daemon::start(env(), &work.join("host"), &[]).unwrap();
    publish_base(&d, &work, &store);
    let mut victim = run_command(
        &d,
        &store,
        &["--dataset", "base:v1", "--volume", "fn/killed"],
        "echo kept > /persist/note && sync /persist/note && echo ready && sleep 600",
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut ready = [0u8; 6];
    std::io::Read::read_exact(victim.stdout.as_mut().unwrap(), &mut ready).unwrap();
    assert_eq!(d.strata().ok(&["mounts"]).lines().count(), 2);
    // SIGKILL: `strata run` gets no chance to tear down. The daemon notices its owner is
    // gone, the sandbox dies with its helper, and the volume is committed.
    victim.kill().unwrap();
    victim.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.strata().ok(&["mounts"]).trim() != "no mounts" {
        assert!(Instant::now() < deadline, "{}", d.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The commit runs after the mount is gone: wait for it.
    while !d
        .strata()
        .run(&["volume", "show", &store, "fn/killed"])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "{}", d.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Runs sweep dead runs' dirs a minute after they were made: pretend that time passed.
    for e in fs::read_dir(d.dir.join("runs")).unwrap().flatten() {
        let ok = Command::new("touch")
            .args(["-d", "2 minutes ago"])
            .arg(e.path())
            .status()
            .unwrap();
        assert!(ok.success());
    }
    let out = run(&d, &store, &["--volume", "fn/killed"], "cat /persist/note");
    assert_eq!(text(&out.stdout), "kept\n", "{}", text(&out.stderr));
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The next run swept the killed one's run dir.
    assert_nothing_left(&d);
    drop(d);
    let _ = fs::remove_dir_all(&work);
}
