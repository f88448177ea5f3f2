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
    /// Tenants a mount may be made on behalf of (`--tenant NAME`): each its own credential
    /// and what it may mount.
    pub tenants: std::collections::BTreeMap<String, Tenant>,
    /// Clients of the socket in this group (their primary or a supplementary group) may do
    /// everything, as root may; the socket is then group-accessible.
    pub platform_group: Option<u32>,
}

/// A tenant: the credential its mounts use (never the daemon's own) and its grants.
#[derive(Debug, Clone, Default)]
pub struct Tenant {
    /// Credentials, region, endpoint and profile of the tenant's store client. The endpoint
    /// is the tenant's (or the daemon's): a mount cannot point the credential elsewhere.
    pub store_options: StoreOptions,
    /// Datasets it may mount: names, or prefixes ending in `*`.
    pub datasets: Vec<String>,
    /// Volume scopes it owns (`SCOPE` of `SCOPE/NAME`).
    pub volume_scopes: Vec<String>,
    /// The store (URL) its volumes live in, whatever store its datasets are mounted from:
    /// heads, chains and every byte their commits store, so that a credential scoped to it
    /// (and read-only on the datasets) is all the tenant needs. None: in the mounted store.
    pub volume_home: Option<String>,
    /// Clients of the socket with these uids are this tenant's agents: they mount only as
    /// this tenant, only on directories they own, and see and unmount only their mounts.
    pub uids: Vec<u32>,
}

impl Tenant {
    /// Whether dataset `name` is granted.
    pub fn may_mount(&self, name: &str) -> bool {
        self.datasets.iter().any(|g| match g.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => g == name,
        })
    }

    /// Whether volume scope `scope` is the tenant's.
    pub fn owns_scope(&self, scope: &str) -> bool {
        self.volume_scopes.iter().any(|s| s == scope)
    }
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
            tenants: Default::default(),
            platform_group: None,
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
