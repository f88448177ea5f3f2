//! The end-to-end test harness: real S3 servers (Garage, moto_server) on loopback, the real
//! `strata` binary, and real FUSE mounts.

pub mod daemon;
pub mod garage;
pub mod moto;
pub mod proxy;
pub mod strata;
pub mod tree;

use std::net::TcpListener;
use std::path::PathBuf;

/// Store options for an in-process client of a test server, from the environment the harness
/// hands to the `strata` binary (`AWS_*`).
pub fn store_options(env: &[(String, String)], single_writer: bool) -> strata_store::StoreOptions {
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    strata_store::StoreOptions {
        endpoint_url: get("AWS_ENDPOINT_URL"),
        single_writer,
        credentials: get("AWS_ACCESS_KEY_ID").zip(get("AWS_SECRET_ACCESS_KEY")),
        region: get("AWS_REGION"),
        profile: None,
    }
}

/// A client of store `url` in this process, as someone with the harness's credentials (the
/// `AWS_*` of `env`) and no strata in between: to read or plant objects by hand. Returns the
/// runtime to drive it with.
pub fn raw_store(
    url: &str,
    env: &[(String, String)],
) -> (
    tokio::runtime::Runtime,
    std::sync::Arc<dyn strata_store::Store>,
) {
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let store = rt
        .block_on(strata_store::open_store(url, &store_options(env, true)))
        .expect("opening the store");
    (rt, store)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a free loopback port")
}

/// A scratch directory under the system temp dir, named after this process so leftovers of
/// dead test processes can be found and removed.
pub fn scratch_dir(what: &str) -> PathBuf {
    let base = std::env::temp_dir().join("strata-tests");
    std::fs::create_dir_all(&base).expect("creating the test scratch base");
    cleanup_dead_runs(&base);
    let dir = base.join(format!("{}-{}-{}", std::process::id(), what, unique()));
    std::fs::create_dir_all(&dir).expect("creating a test scratch dir");
    dir
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn cleanup_dead_runs(base: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Runs `f` on a thread that lives as long as the process, so children spawned there with
/// PR_SET_PDEATHSIG die with the test process and not with the test's thread.
pub fn on_lifetime_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
        loop {
            std::thread::park();
        }
    });
    rx.recv().expect("lifetime thread result")
}

/// SIGTERM to `child`, a child of this process not yet waited for (so its pid is not reused);
/// errors are ignored, like kill(2)'s return code was.
pub fn sigterm(child: &std::process::Child) {
    use rustix::process::{kill_process, Pid, Signal};
    if let Some(pid) = Pid::from_raw(child.id() as i32) {
        let _ = kill_process(pid, Signal::TERM);
    }
}

/// `pre_exec` hook: the child gets SIGKILL when the spawning thread (and so the test) dies.
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: pre_exec: the closure runs in the forked child, where only async-signal-safe
    // calls are sound; it makes one prctl syscall (rustix's: the raw syscall, no allocation
    // or lock) and ignores its result, as before.
    unsafe {
        cmd.pre_exec(|| {
            let _ = rustix::process::set_parent_process_death_signal(Some(
                rustix::process::Signal::KILL,
            ));
            Ok(())
        });
    }
}

/// Prints the last lines of a log to stderr (a failed test's output shows them).
pub fn print_log_tail(whose: &str, log: &str) {
    let tail: Vec<&str> = log.lines().rev().take(60).collect();
    eprintln!("--- log of {whose} (last {} lines) ---", tail.len());
    for line in tail.iter().rev() {
        eprintln!("{line}");
    }
}
