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

/// A loopback port that is free now and that this process never handed out before.
///
/// Servers started by the harness (Garage, moto_server) bind their port some time after it is
/// chosen, so the choice must not collide with another server started meanwhile: ports come
/// from below the kernel's ephemeral range (where no `bind(0)` or outgoing connection lands) and
/// each is handed out once per process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN)
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
