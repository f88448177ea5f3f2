//! What a daemon is started with, and where things live by default.

use std::path::PathBuf;
use std::time::Duration;

use strata_store::StoreOptions;

/// Everything the daemon is started with (the `strata` command merges it from flags, the
/// environment and a config file; an embedder builds it).
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Chunks and layer manifests; one daemon per directory (it holds the directory's lock).
    pub cache_dir: PathBuf,
    /// Scratch uppers live under `<state_dir>/scratch/<mount id>`, kept volume uppers under
    /// `uncommitted/` and `quarantine/`.
    pub state_dir: PathBuf,
    /// Hard cap on the chunk bytes under `cache_dir`.
    pub cache_size: u64,
    /// Cap on hot chunks kept in memory.
    pub memory_cache_size: u64,
    /// How long a read waits for an unreachable store before it fails with EIO.
    pub read_timeout: Duration,
    /// Open fully cached large files in FUSE passthrough mode where the kernel allows it.
    pub passthrough: bool,
    /// A volume with more commits than this is squashed after a commit (0: never).
    pub squash_after: usize,
    /// Record what each mount's function reads first into the layers' start records in the
    /// store (a mount may opt out).
    pub record_starts: bool,
    /// Fetch, at each mount, what the layers' start records say starts read first (a mount
    /// may opt out).
    pub replay_starts: bool,
    /// The control socket.
    pub socket: PathBuf,
    /// How stores are opened (credentials are the daemon's; a mount may name the endpoint).
    pub store_options: StoreOptions,
    /// Where to serve Prometheus metrics (`/metrics`); none by default.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Mount only datasets whose refs one of these publishers signed (none: not checked).
    pub trusted_keys: Vec<strata_fs::refs::signed::PublicKey>,
}

impl DaemonConfig {
    /// A daemon with the documented defaults, its cache, state and socket where given.
    pub fn new(cache_dir: PathBuf, state_dir: PathBuf, socket: PathBuf) -> DaemonConfig {
        DaemonConfig {
            cache_dir,
            state_dir,
            cache_size: 10 << 30,
            memory_cache_size: 256 << 20,
            read_timeout: cache::DEFAULT_FETCH_DEADLINE,
            passthrough: true,
            squash_after: 16,
            record_starts: true,
            replay_starts: true,
            socket,
            store_options: StoreOptions::default(),
            metrics_addr: None,
            trusted_keys: Vec::new(),
        }
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// Where chunks and manifests are cached unless told otherwise.
pub fn default_cache_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/cache/strata");
    }
    match std::env::var_os("XDG_CACHE_HOME") {
        Some(xdg) => PathBuf::from(xdg).join("strata"),
        None => home().join(".cache").join("strata"),
    }
}

/// Where the daemon keeps per-mount state (scratch uppers, kept volume uppers).
pub fn default_state_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/strata");
    }
    match std::env::var_os("XDG_STATE_HOME") {
        Some(xdg) => PathBuf::from(xdg).join("strata"),
        None => home().join(".local").join("state").join("strata"),
    }
}

/// Where the daemon listens unless told otherwise.
pub fn default_socket() -> PathBuf {
    if is_root() {
        return PathBuf::from("/run/strata/daemon.sock");
    }
    let uid = rustix::process::geteuid().as_raw();
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("strata").join("daemon.sock"),
        None => PathBuf::from(format!("/tmp/strata-{uid}")).join("daemon.sock"),
    }
}
