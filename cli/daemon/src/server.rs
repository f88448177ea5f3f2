//! The host daemon: one chunk cache, any number of mounts (each its own FUSE session), and
//! the control socket that `strata mount|unmount|mounts|stats` talk to. An embedder calls the
//! same operations directly ([`Daemon::mount`], [`Daemon::unmount`], …).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cache::{CacheConfig, CacheDirLock, ChunkCache, ChunkReader};
use strata_fs::blocking::blocking;
use strata_fs::gc::lease::Timings;
use strata_fs::mount::{StackSpec, UpperSpec};
use strata_fs::prefetch::ReplayProgress;
use strata_fs::refs::signed::{PublicKey, Trust};
use strata_fs::refs::DatasetRef;
use strata_fs::upper::MountTree;
use strata_fs::volume::lifecycle::{self as volumes, VolumeMount};
use strata_fs::volume::{self, VolumeRef};
use strata_fuse::ErrnoCounts;
use strata_store::{CountingStore, Store, StoreCounts};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::config::{DaemonConfig, Tenant};
use crate::error::{Context, DaemonError, DaemonResult};
use crate::leases::{LeaseToken, MountLeases};
use crate::protocol::{
    decode_request, encode_reply, CommitReply, KeptInfo, LayerInfo, MountInfo, MountSpec,
    MountStats, Request, StatsReply, MAX_REQUEST,
};

/// A store URL and the endpoint it was opened with.
/// A store client: URL, endpoint, and the tenant whose credential it uses (none: the daemon's).
type StoreKey = (String, Option<String>, Option<String>);

/// What makes two read-only mounts the same tree: the store and its endpoint, the layer
/// digests bottom to top, and what the mount does with start records (record, replay).
type ShareKey = (
    String,
    Option<String>,
    Option<String>,
    Vec<String>,
    bool,
    bool,
);

/// A read-only FUSE session and the mountpoints it is mounted at.
struct Shared {
    session: u64,
    /// The session's device number (see `strata_fuse::bind`).
    dev: u64,
    mountpoints: Vec<PathBuf>,
}

struct Mounted {
    info: MountInfo,
    /// The uid of the tenant agent that asked for it (see [`Client::Tenant`]); none: the
    /// platform's.
    agent: Option<u32>,
    /// The kernel's id of its mount (see [`strata_fuse::unmount_exact`]); none for a bind
    /// of a shared session.
    mount_id: Option<u64>,
    /// The mount whose FUSE session serves this one: its own id, or, for a read-only mount
    /// that shares the session of an earlier one of the same stack, that mount's.
    session: u64,
    reader: ChunkReader,
    prefetch: Arc<ReplayProgress>,
    /// The mount's requests to its store (the session's, for a mount that shares one).
    requests: Arc<CountingStore>,
    /// The session's error replies by errno.
    errors: Arc<ErrnoCounts>,
    /// A volume mount: its tree, volume and scratch. It commits on `strata commit` and when
    /// its session ends (which may take a while).
    volume: Option<(Arc<MountTree>, Arc<VolumeMount>, PathBuf)>,
    /// Set when the FUSE session has ended, however it ended (with what went wrong
    /// committing a volume, if anything did).
    ended: watch::Receiver<Option<Ended>>,
}

/// The host daemon. Start it with [`Daemon::start`], then serve its socket
/// ([`Daemon::serve`]) or call it directly; [`Daemon::shutdown`] unmounts everything.
pub struct Daemon {
    config: DaemonConfig,
    /// Open control connections per uid (root's not counted).
    connections: OpenConnections,
    /// Held for the daemon's life: one owner per cache dir.
    _cache_lock: CacheDirLock,
    cache: Arc<ChunkCache>,
    /// Stores are opened once per (URL, endpoint) and shared by the mounts that use them,
    /// each counting the requests sent to it (see [`StatsReply::store_requests`]). A std
    /// mutex, never held across an await: opening a store happens without it.
    stores: Mutex<HashMap<StoreKey, Arc<CountingStore>>>,
    mounts: Arc<Mutex<HashMap<PathBuf, Mounted>>>,
    /// Mountpoints with a mount request being served, so two requests cannot race for one.
    pending: Mutex<HashSet<PathBuf>>,
    /// Read-only sessions other read-only mounts of the same stack may share (bind mounts).
    shared: Arc<Mutex<HashMap<ShareKey, Shared>>>,
    /// Held while a mountpoint joins or leaves a shared session, so that a join never binds a
    /// session its last mountpoint is leaving.
    share_gate: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
    /// The loop that commits kept volume uppers; stopped by [`Daemon::shutdown`].
    retries: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// What the mounts read, per store, for garbage collection; renewed by `lease_renewer`.
    leases: Arc<MountLeases>,
    lease_renewer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// How the volume commits of every mount ended.
    commits: Arc<volumes::CommitCounts>,
    /// Every mount's error replies by errno.
    errors: Arc<ErrnoCounts>,
    /// The publishers whose signed refs mounts are checked against (none: not checked), and
    /// the highest sequence seen per tag (remembered across restarts in the state dir).
    trust: Arc<Trust>,
}

/// Where the daemon remembers the signed refs it has seen.
const SIGNED_REFS_SEEN: &str = "signed-refs-seen.json";

/// A tenant's pinned layer (`NAME@blake3:…`) is granted only if a tag of `NAME` points, or
/// once pointed, at it (read with the tenant's credential).
async fn prove_pinned(store: &Arc<dyn Store>, spec: &MountSpec) -> DaemonResult<()> {
    for layer in &spec.layers {
        let r = DatasetRef::parse(layer)?;
        if let Some(digest) = r.pinned {
            if !strata_fs::refs::ever_named(store, &r.name, &digest).await? {
                return Err(DaemonError::new(
                    crate::ErrorKind::Permission,
                    format!(
                        "{r}: no tag of {} points or pointed at this layer, so it is not granted with the dataset",
                        r.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// How long a client has to send its request.
const REQUEST_WAIT: Duration = Duration::from_secs(10);

/// How long a refused client's request is waited for (it is read only so that the client
/// reads its refusal, not a reset connection).
const REFUSED_WAIT: Duration = Duration::from_secs(1);

/// Control connections one user other than root may hold open at once: with agents, any
/// local user may connect, and none may tie up the daemon's tasks and descriptors.
const CONNECTIONS_PER_USER: usize = 32;
/// How long an unmount waits for the FUSE session to wind down.
const SESSION_END_WAIT: Duration = Duration::from_secs(10);
/// How long an unmount waits for a volume's commit.
const COMMIT_WAIT: Duration = Duration::from_secs(600);
/// How long a mount of a pinned layer waits for a garbage collection under way.
const PINNED_MOUNT_GC_WAIT: Duration = Duration::from_secs(300);

/// How long an unmount that finds its mount busy asks again: a file closed just before keeps
/// the mount busy until the daemon has answered its RELEASE.
const UNMOUNT_SETTLE: Duration = Duration::from_secs(2);

/// Unmounts; a busy mount is asked again for a moment before the error is given.
fn unmount_settling(
    mountpoint: &Path,
    mount_id: Option<u64>,
    lazy: bool,
) -> Result<(), strata_fs::error::FsError> {
    let started = std::time::Instant::now();
    loop {
        match strata_fuse::unmount_exact(mountpoint, mount_id, lazy) {
            Err(e) if !lazy && strata_fuse::is_busy(&e) && started.elapsed() < UNMOUNT_SETTLE => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// A background task that ends with its owner (an early return, a dropped future).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A mount's part of its store's mount lease, taken out again unless the mount is made.
struct LeaseGuard {
    leases: Arc<MountLeases>,
    token: Option<LeaseToken>,
}

impl LeaseGuard {
    /// The mount is made: its session takes the lease over.
    fn keep(mut self) -> Option<LeaseToken> {
        self.token.take()
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            self.leases.forget(token);
        }
    }
}

/// One open control connection of a user, counted while it lives.
struct ConnectionSlot(Option<(u32, OpenConnections)>);

/// Open control connections per uid.
type OpenConnections = Arc<Mutex<HashMap<u32, usize>>>;

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some((uid, open)) = &self.0 {
            let mut open = open
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(n) = open.get_mut(uid) {
                *n -= 1;
                if *n == 0 {
                    open.remove(uid);
                }
            }
        }
    }
}

/// Who sent a request on the socket, by its peer credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Client {
    /// Root, the daemon's own user, or a member of the platform group: anything.
    Platform,
    /// An agent of tenant `name` (its uid is in the tenant's `uids`): mounts only as that
    /// tenant, on directories `uid` owns, and sees, commits and unmounts only its mounts.
    Tenant { name: String, uid: u32, gid: u32 },
}

impl Client {
    fn agent(&self) -> Option<u32> {
        match self {
            Client::Platform => None,
            Client::Tenant { uid, .. } => Some(*uid),
        }
    }

    /// Whether this client may see and act on mount `m`.
    fn may_touch(&self, m: &Mounted) -> bool {
        match self {
            Client::Platform => true,
            Client::Tenant { uid, .. } => m.agent == Some(*uid),
        }
    }
}

/// The supplementary groups of the peer of `stream` (SO_PEERGROUPS); none if they cannot be
/// read (so a group's rights are not given).
fn peer_groups(stream: &UnixStream) -> Vec<u32> {
    use std::os::fd::AsRawFd;
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    // Enough for most users; a user in more groups is asked for again with the room the
    // kernel says they need (up to NGROUPS_MAX, 65,536).
    let mut groups = vec![0 as libc::gid_t; 64];
    for _ in 0..3 {
        let mut len = (groups.len() * GID) as libc::socklen_t;
        // SAFETY: the buffer and its length are the kernel's to fill, and both outlive the
        // call.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == 0 {
            groups.truncate(len as usize / GID);
            return groups;
        }
        let needed = len as usize / GID;
        let too_small = std::io::Error::last_os_error().raw_os_error() == Some(libc::ERANGE);
        if !too_small || needed <= groups.len() || needed > 1 << 16 {
            break;
        }
        groups.resize(needed, 0);
    }
    Vec::new()
}

impl Daemon {
    /// A place for one more control connection from the peer of `stream`, held while it is
    /// served; `None` when that user (not root) has [`CONNECTIONS_PER_USER`] open already.
    fn connection_slot(&self, stream: &UnixStream) -> Option<ConnectionSlot> {
        let uid = stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
        if uid == 0 {
            return Some(ConnectionSlot(None));
        }
        let mut open = self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = open.entry(uid).or_default();
        if *n >= CONNECTIONS_PER_USER {
            tracing::warn!(
                uid,
                "too many control connections from one user; dropped one"
            );
            return None;
        }
        *n += 1;
        Some(ConnectionSlot(Some((uid, Arc::clone(&self.connections)))))
    }

    /// Who the peer of `stream` is to this daemon; `None`: nobody it serves.
    fn client_of(&self, stream: &UnixStream, uid: u32, gid: u32) -> Option<Client> {
        let own = rustix::process::geteuid().as_raw();
        if uid == 0 || uid == own {
            return Some(Client::Platform);
        }
        if let Some(group) = self.config.platform_group {
            if gid == group || peer_groups(stream).contains(&group) {
                return Some(Client::Platform);
            }
        }
        self.config
            .tenants
            .iter()
            .find(|(_, t)| t.uids.contains(&uid))
            .map(|(name, _)| Client::Tenant {
                name: name.clone(),
                uid,
                gid,
            })
    }

    /// Takes the cache dir, cleans up mounts a crashed daemon left behind, opens the cache and
    /// starts committing the volume uppers that earlier runs kept (see
    /// [`volumes::commit_kept`]). Call it within a multi-threaded tokio runtime, and
    /// [`Daemon::shutdown`] before dropping it.
    pub fn start(config: DaemonConfig) -> DaemonResult<Arc<Daemon>> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            DaemonError::internal("the daemon must be started within a tokio runtime")
        })?;
        let cache_lock = CacheDirLock::acquire(&config.cache_dir)?;
        for mp in strata_fuse::clean_stale_mounts().context("looking for stale mounts")? {
            tracing::warn!(
                "cleaned up stale mount {} (its serving process is gone)",
                mp.display()
            );
        }
        volumes::clean_scratch(&config.state_dir)?;
        let cache = ChunkCache::new(&CacheConfig {
            disk_dir: Some(config.cache_dir.clone()),
            disk_capacity: config.cache_size,
            memory_capacity: config.memory_cache_size,
            fetch_deadline: config.read_timeout,
        })
        .with_context(|| format!("opening cache dir {}", config.cache_dir.display()))?;
        let trust = Arc::new(
            Trust::new(
                config.trusted_keys.clone(),
                Some(config.state_dir.join(SIGNED_REFS_SEEN)),
            )
            .map_err(|e| DaemonError::internal(e.to_string()))?,
        );
        let daemon = Arc::new(Daemon {
            config,
            _cache_lock: cache_lock,
            cache,
            stores: Default::default(),
            mounts: Default::default(),
            pending: Default::default(),
            shared: Default::default(),
            share_gate: Default::default(),
            next_id: AtomicU64::new(1),
            connections: Default::default(),
            retries: Mutex::new(None),
            leases: Arc::new(MountLeases::new()),
            lease_renewer: Mutex::new(None),
            commits: Arc::default(),
            errors: Arc::default(),
            trust,
        });
        let renewer = runtime.spawn(Arc::clone(&daemon.leases).renew(Timings::default()));
        *daemon
            .lease_renewer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(renewer);
        let retries = runtime.spawn(Arc::clone(&daemon).commit_kept_uppers());
        *daemon
            .retries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(retries);
        Ok(daemon)
    }

    pub fn config(&self) -> &DaemonConfig {
        &self.config
    }

    fn tenant(&self, name: &str) -> DaemonResult<&Tenant> {
        self.config.tenants.get(name).ok_or_else(|| {
            DaemonError::new(
                crate::ErrorKind::Permission,
                format!("no tenant {name:?} in this daemon's config"),
            )
        })
    }

    /// Refuses, before anything is opened, a mount for a tenant of what it is not granted:
    /// a dataset not in its `datasets`, a volume outside its `volume_scopes`, or an endpoint
    /// other than its own.
    fn granted(&self, spec: &MountSpec) -> DaemonResult<()> {
        let Some(name) = &spec.tenant else {
            return Ok(());
        };
        let tenant = self.tenant(name)?;
        let refuse = |why: String| {
            Err(DaemonError::new(
                crate::ErrorKind::Permission,
                format!("tenant {name}: {why}"),
            ))
        };
        // A local store knows no credentials (and would have the daemon write where the
        // request says): a tenant's stores are S3 buckets its credential opens.
        if !spec.store.starts_with("s3://") {
            return refuse(format!(
                "its mounts read S3 stores only, not {}",
                spec.store
            ));
        }
        if let Some(asked) = &spec.endpoint_url {
            let own = tenant.store_options.endpoint_url.as_deref();
            if Some(asked.trim_end_matches('/')) != own.map(|e| e.trim_end_matches('/')) {
                return refuse(format!("its mounts use its own endpoint, not {asked}"));
            }
        }
        for layer in &spec.layers {
            let r = DatasetRef::parse(layer)?;
            if !tenant.may_mount(&r.name) {
                return refuse(format!("dataset {} is not granted to it", r.name));
            }
        }
        if let Some(v) = &spec.volume {
            let v = VolumeRef::parse(v)?;
            if !tenant.owns_scope(&v.scope) {
                return refuse(format!("volume {v} is not in a scope it owns"));
            }
        }
        Ok(())
    }

    /// What a mount's refs are checked against: the daemon's trusted keys, narrowed to those
    /// the request names too (a request cannot widen them).
    fn trust_for(&self, spec: &MountSpec) -> DaemonResult<Arc<Trust>> {
        if spec.trusted_keys.is_empty() {
            return Ok(Arc::clone(&self.trust));
        }
        let asked = spec
            .trusted_keys
            .iter()
            .map(|k| PublicKey::parse(k))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DaemonError::bad_request(e.to_string()))?;
        let keys: Vec<PublicKey> = match self.trust.keys() {
            [] => asked,
            own => asked.into_iter().filter(|k| own.contains(k)).collect(),
        };
        if keys.is_empty() {
            return Err(DaemonError::new(
                crate::ErrorKind::Permission,
                "this daemon trusts none of the keys the mount asks for (its trusted_keys decide)",
            ));
        }
        Ok(Arc::new(self.trust.with_keys(keys)))
    }

    /// Serves the control socket (and retries kept volume uppers) until `shutdown` completes,
    /// then unmounts everything.
    pub async fn serve(self: Arc<Self>, shutdown: impl Future<Output = ()>) -> DaemonResult<()> {
        self.serve_with(shutdown, || {}).await
    }

    /// [`Daemon::serve`], calling `on_ready` once the control socket accepts connections (a
    /// service manager's readiness notice goes there).
    pub async fn serve_with(
        self: Arc<Self>,
        shutdown: impl Future<Output = ()>,
        on_ready: impl FnOnce(),
    ) -> DaemonResult<()> {
        // Bound first: a port in use fails the start before the daemon says it is ready.
        let metrics = match self.config.metrics_addr {
            Some(addr) => {
                let bound = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the metrics address {addr}"))?;
                let at = bound.local_addr().unwrap_or(addr);
                eprintln!("strata: metrics on http://{at}/metrics");
                Some(AbortOnDrop(tokio::spawn(
                    Arc::clone(&self).serve_metrics(bound),
                )))
            }
            None => None,
        };
        // Others than root may connect when the config names them (the daemon then tells
        // them apart by their peer credentials).
        let access = if self.config.tenants.values().any(|t| !t.uids.is_empty()) {
            SocketAccess::Everyone
        } else if let Some(gid) = self.config.platform_group {
            SocketAccess::Group(gid)
        } else {
            SocketAccess::Owner
        };
        let listener = bind_socket(&self.config.socket, access)?;
        let stats = self.cache.stats();
        tracing::info!(
            "daemon ready on {} (cache {}: {} chunks, {} of {} bytes)",
            self.config.socket.display(),
            self.config.cache_dir.display(),
            stats.disk_chunks,
            stats.disk_used,
            stats.disk_capacity
        );
        eprintln!(
            "strata: daemon listening on {}",
            self.config.socket.display()
        );
        on_ready();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let Some(slot) = self.connection_slot(&stream) else {
                            continue; // dropped: that user has enough open already
                        };
                        let this = Arc::clone(&self);
                        tokio::spawn(async move {
                            let _slot = slot;
                            if let Err(e) = this.handle(stream).await {
                                tracing::warn!("control connection: {e}");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!("accepting a control connection: {e}");
                        // Out of descriptors, say: not a busy loop.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = &mut shutdown => break,
            }
        }
        tracing::info!("shutting down: unmounting everything");
        drop(metrics);
        drop(listener);
        let _ = std::fs::remove_file(&self.config.socket);
        self.shutdown().await;
        Ok(())
    }

    /// Commits the volume uppers kept by failed commits or a crash: now, then again after
    /// each failure with a growing delay; after [`volumes::QUARANTINE_AFTER`] failures one
    /// is quarantined. Each try runs as its own task, so not even a bug in it (a panic) stops
    /// the daemon or the other uppers; the store records every kept upper.
    async fn commit_kept_uppers(self: Arc<Self>) {
        loop {
            for dir in volumes::kept_uppers(&self.config.state_dir) {
                let mut attempts = volumes::Attempts::read(&dir);
                if !attempts.due() {
                    continue;
                }
                let record = volumes::read_record(&dir);
                if attempts.count >= volumes::QUARANTINE_AFTER {
                    // Its last try stopped the daemon: do not try again.
                    self.give_up_on(&dir, record.as_ref().ok(), &attempts).await;
                    continue;
                }
                // Counted before the try: a try that takes the whole daemon down (the one
                // thing a task cannot contain) still counts, so such an upper cannot make the
                // daemon fail at every start forever.
                let give_up = attempts.failed("the daemon stopped during the commit".into());
                if let Err(e) = attempts.write(&dir) {
                    // Uncounted, a try that takes the daemon down could repeat at every start.
                    tracing::error!(
                        "{e:#}; not trying to commit {} until it can be counted",
                        dir.display()
                    );
                    continue;
                }
                let this = Arc::clone(&self);
                let try_dir = dir.clone();
                let tried = tokio::spawn(async move { this.commit_kept(&try_dir).await }).await;
                let error = match tried {
                    Ok(Ok(())) => {
                        if let Ok(record) = &record {
                            self.forget_kept(&dir, record, &attempts).await;
                        }
                        continue;
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => format!("internal error committing it: {e}"),
                };
                attempts.last_error = error.clone();
                if let Err(e) = attempts.write(&dir) {
                    tracing::warn!("{e:#}");
                }
                if give_up {
                    self.give_up_on(&dir, record.as_ref().ok(), &attempts).await;
                    continue;
                }
                tracing::warn!(
                    "{error}; kept in {}, try {} of {} in {}s",
                    dir.display(),
                    attempts.count + 1,
                    volumes::QUARANTINE_AFTER,
                    attempts.next_try_at.saturating_sub(
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs())
                    )
                );
                if let Ok(record) = &record {
                    self.record_kept(&dir, record, &attempts, false).await;
                }
            }
            tokio::time::sleep(volumes::RETRY_EVERY).await;
        }
    }

    /// Quarantines a kept upper that failed [`volumes::QUARANTINE_AFTER`] times.
    async fn give_up_on(
        &self,
        dir: &Path,
        record: Option<&volumes::VolumeRecord>,
        attempts: &volumes::Attempts,
    ) {
        let error = &attempts.last_error;
        let place = match volumes::quarantine(&self.config.state_dir, dir) {
            Ok(to) => {
                tracing::error!(
                    "{error}; quarantined after {} failed commits in {} (an operator may move \
                     it back to {} to retry, after deleting its attempts.json)",
                    attempts.count,
                    to.display(),
                    dir.parent()
                        .map_or(String::new(), |p| p.display().to_string())
                );
                to
            }
            Err(e) => {
                tracing::error!("{error}; {e}");
                dir.to_path_buf()
            }
        };
        if let Some(record) = record {
            self.record_kept(&place, record, attempts, true).await;
        }
    }

    /// Writes the store's record of a kept upper (best effort: the store may be what fails).
    async fn record_kept(
        &self,
        dir: &Path,
        record: &volumes::VolumeRecord,
        attempts: &volumes::Attempts,
        quarantined: bool,
    ) {
        let kept = volumes::kept_record(dir, record, attempts, quarantined);
        let done = async {
            let v = VolumeRef::parse(&record.volume)?;
            let store = self
                .store(
                    &record.store,
                    record.endpoint_url.clone(),
                    record.tenant.as_deref(),
                )
                .await?;
            volume::put_kept(&store, &v, &kept).await?;
            // A volume in a home: its datasets' layers are kept in their own store too
            // (with the daemon's credential, at the tenant's endpoint).
            if let (Some(url), Some(kept)) = (
                &record.datasets_store,
                volumes::kept_record_of_datasets(dir, record, attempts, quarantined),
            ) {
                let datasets = self.store(url, self.endpoint_of(record)?, None).await?;
                volume::put_kept(&datasets, &v, &kept).await?;
            }
            DaemonResult::Ok(())
        };
        if let Err(e) = done.await {
            tracing::warn!("recording kept upper {} in the store: {e}", dir.display());
        }
    }

    /// The endpoint a volume record's stores are at: its tenant's own, else what the mount
    /// asked for.
    fn endpoint_of(&self, record: &volumes::VolumeRecord) -> DaemonResult<Option<String>> {
        Ok(match &record.tenant {
            Some(t) => self.tenant(t)?.store_options.endpoint_url.clone(),
            None => record.endpoint_url.clone(),
        })
    }

    /// Removes the store's record of a kept upper that is now committed.
    async fn forget_kept(
        &self,
        dir: &Path,
        record: &volumes::VolumeRecord,
        attempts: &volumes::Attempts,
    ) {
        // The count includes the try that just worked; only an earlier failure recorded it.
        if attempts.count <= 1 {
            return;
        }
        let kept = volumes::kept_record(dir, record, attempts, false);
        let done = async {
            let v = VolumeRef::parse(&record.volume)?;
            let store = self
                .store(
                    &record.store,
                    record.endpoint_url.clone(),
                    record.tenant.as_deref(),
                )
                .await?;
            volume::delete_kept(&store, &v, &kept.id).await?;
            if let Some(url) = &record.datasets_store {
                let datasets = self.store(url, self.endpoint_of(record)?, None).await?;
                volume::delete_kept(&datasets, &v, &kept.id).await?;
            }
            DaemonResult::Ok(())
        };
        if let Err(e) = done.await {
            tracing::warn!("removing the record of kept upper {}: {e}", dir.display());
        }
    }

    async fn commit_kept(&self, dir: &Path) -> DaemonResult<()> {
        let record = volumes::read_record(dir)?;
        let store = self
            .store(
                &record.store,
                record.endpoint_url.clone(),
                record.tenant.as_deref(),
            )
            .await?;
        // A volume in a tenant's home reads its datasets from their own store.
        let datasets = match &record.datasets_store {
            Some(url) => {
                self.store(url, record.endpoint_url.clone(), record.tenant.as_deref())
                    .await?
            }
            None => store.clone(),
        };
        let reader = self.cache.reader(datasets);
        Ok(volumes::commit_kept(
            dir,
            &record,
            store,
            reader,
            &self.config.cache_dir,
            &self.commits,
        )
        .await?)
    }

    async fn handle(&self, stream: UnixStream) -> std::io::Result<()> {
        let cred = stream.peer_cred()?;
        let client = self.client_of(&stream, cred.uid(), cred.gid());
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        // A client that connects and says nothing must not hold a task forever. The request
        // is read even from a client that is refused, so that it reads the refusal (one
        // whose request went unread would see its connection reset).
        let wait = if client.is_some() {
            REQUEST_WAIT
        } else {
            REFUSED_WAIT
        };
        tokio::time::timeout(
            wait,
            BufReader::new(read)
                .take(MAX_REQUEST as u64)
                .read_line(&mut line),
        )
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request in time"))
        .and_then(|read| read.map(|_| ()))
        .or_else(|e| if client.is_some() { Err(e) } else { Ok(()) })?;
        let incoming = decode_request(&line);
        let version = incoming.version;
        let reply = match client {
            Some(client) => match incoming.request {
                Ok(request) => self.answer(request, cred.pid(), &client).await,
                Err(e) => Err(e),
            },
            None => {
                tracing::warn!(uid = cred.uid(), "refused a control connection");
                Err(DaemonError::new(
                    crate::ErrorKind::Permission,
                    "permission denied: the strata daemon takes requests from root, the \
                     platform group and the tenants' agents only",
                ))
            }
        };
        write.write_all(&encode_reply(version, &reply)).await
    }

    /// `client`: the pid of the process that sent it (as the kernel reports it).
    async fn answer(
        &self,
        request: Request,
        client: Option<libc::pid_t>,
        by: &Client,
    ) -> DaemonResult<serde_json::Value> {
        let value = match request {
            Request::Mount(spec) => serde_json::to_value(self.mount_for(spec, client, by).await?),
            Request::Unmount { mountpoint, lazy } => {
                serde_json::to_value(self.unmount_by(&mountpoint, lazy, by).await?)
            }
            Request::Commit { mountpoint } => {
                serde_json::to_value(self.commit_by(&mountpoint, by).await?)
            }
            Request::Mounts => serde_json::to_value(self.mounts_for(by)),
            Request::Stats => match by {
                Client::Platform => serde_json::to_value(self.stats()),
                Client::Tenant { name, .. } => {
                    return Err(DaemonError::new(
                        crate::ErrorKind::Permission,
                        format!("tenant {name}: the host's stats are the platform's"),
                    ))
                }
            },
        };
        value.map_err(|e| DaemonError::internal(format!("encoding the reply: {e}")))
    }

    async fn store(
        &self,
        url: &str,
        endpoint_url: Option<String>,
        tenant: Option<&str>,
    ) -> DaemonResult<Arc<dyn Store>> {
        let key = (
            url.to_string(),
            endpoint_url.clone(),
            tenant.map(str::to_string),
        );
        let stores = || {
            self.stores
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some(s) = stores().get(&key) {
            return Ok(Arc::clone(s) as Arc<dyn Store>);
        }
        // Opened without the lock held (it may wait on the network); if another request
        // opened the same store meanwhile, its instance is kept.
        let options = match tenant {
            // The tenant's own credential and endpoint (a request cannot name another: see
            // `granted`).
            Some(t) => self.tenant(t)?.store_options.clone(),
            None => {
                let mut options = self.config.store_options.clone();
                if endpoint_url.is_some() {
                    options.endpoint_url = endpoint_url;
                }
                options
            }
        };
        let store = strata_store::open_store(url, &options)
            .await
            .with_context(|| format!("opening store {url}"))?;
        let counted = Arc::clone(
            stores()
                .entry(key)
                .or_insert_with(|| Arc::new(CountingStore::new(store))),
        );
        Ok(counted as Arc<dyn Store>)
    }

    /// Mounts what `spec` says. (`unmount_with_client` needs a client on the socket: here
    /// it is refused.)
    pub async fn mount(&self, spec: MountSpec) -> DaemonResult<MountInfo> {
        self.mount_for(spec, None, &Client::Platform).await
    }

    /// A mount asked for by process `client`, which is `by`.
    async fn mount_for(
        &self,
        mut spec: MountSpec,
        client: Option<libc::pid_t>,
        by: &Client,
    ) -> DaemonResult<MountInfo> {
        spec.check()?;
        spec.mountpoint = match by {
            // The daemon keys a mount by the path the kernel knows it by (and unmounts it
            // without following a symlink): a platform path through one is resolved first.
            Client::Platform => blocking(|| strata_fuse::resolve_mountpoint(&spec.mountpoint))
                .map_err(|e| {
                    DaemonError::bad_request(format!(
                        "resolving mountpoint {}: {e}",
                        spec.mountpoint.display()
                    ))
                })?,
            // An agent's path is taken as it is (it is opened as the agent, without following
            // a symlink), but must be plain: absolute, without `.` or `..`.
            Client::Tenant { .. } => {
                let plain = spec.mountpoint.is_absolute()
                    && spec.mountpoint.components().all(|c| {
                        matches!(
                            c,
                            std::path::Component::RootDir | std::path::Component::Normal(_)
                        )
                    });
                if !plain {
                    return Err(DaemonError::bad_request(format!(
                        "mountpoint {}: give an absolute path without `.` or `..`",
                        spec.mountpoint.display()
                    )));
                }
                spec.mountpoint
            }
        };
        if let Client::Tenant { name, .. } = by {
            match &spec.tenant {
                None => spec.tenant = Some(name.clone()),
                Some(t) if t == name => {}
                Some(t) => {
                    return Err(DaemonError::new(
                        crate::ErrorKind::Permission,
                        format!("an agent of tenant {name} may not mount as tenant {t}"),
                    ))
                }
            }
        }
        let mp = spec.mountpoint.clone();
        if self
            .mounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(&mp)
            || !self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(mp.clone())
        {
            return Err(DaemonError::busy(format!(
                "{} is already mounted by this daemon",
                mp.display()
            )));
        }
        let result = self.mount_reserved(spec, client, by).await;
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&mp);
        result
    }

    async fn mount_reserved(
        &self,
        spec: MountSpec,
        client: Option<libc::pid_t>,
        by: &Client,
    ) -> DaemonResult<MountInfo> {
        // Watched from now on, so a pid reused later cannot stand in for the client.
        let owner = match (spec.unmount_with_client, client) {
            (true, Some(pid)) => watch_process(pid)?,
            (true, None) => {
                return Err(DaemonError::bad_request(
                    "the daemon cannot tell which process asked for this mount",
                ))
            }
            (false, _) => None,
        };
        let mp = spec.mountpoint.clone();
        // An agent's mountpoint is looked at only as the agent (when mounting).
        if *by == Client::Platform {
            strata_fuse::check_mountpoint(&mp)?;
        }
        // The daemon's store (shared by its mounts, holding their lease), counted per mount too.
        self.granted(&spec)?;
        let leased = self
            .store(
                &spec.store,
                spec.endpoint_url.clone(),
                spec.tenant.as_deref(),
            )
            .await?;
        // What the daemon keeps for itself (the mount lease, start records) is written with
        // its own credential, at the tenant's endpoint.
        let (platform, platform_endpoint) = match &spec.tenant {
            Some(t) => {
                prove_pinned(&leased, &spec).await?;
                let endpoint = self.tenant(t)?.store_options.endpoint_url.clone();
                (
                    self.store(&spec.store, endpoint.clone(), None).await?,
                    endpoint,
                )
            }
            None => (Arc::clone(&leased), spec.endpoint_url.clone()),
        };
        // A tenant's volume in its home: opened with the tenant's credential for the mount,
        // and with the daemon's for the lease that keeps the chain from collection.
        let home = match (&spec.tenant, &spec.volume) {
            (Some(t), Some(_)) => match self.tenant(t)?.volume_home.clone() {
                // A home that is the mounted store is no home of its own.
                Some(url) if url.trim_end_matches('/') != spec.store.trim_end_matches('/') => {
                    let endpoint = self.tenant(t)?.store_options.endpoint_url.clone();
                    Some((
                        self.store(&url, endpoint.clone(), Some(t)).await?,
                        self.store(&url, endpoint, None).await?,
                    ))
                }
                _ => None,
            },
            _ => None,
        };
        let requests = Arc::new(CountingStore::new(Arc::clone(&leased)));
        let store: Arc<dyn Store> = requests.clone();
        let reader = self.cache.reader(store.clone());
        // The first `datasets` layers of the stack are the datasets'; the rest, the volume's,
        // are in `home_store` (the same store when the tenant has no home).
        let datasets = spec.layers.len();
        let home_store = home.as_ref().map_or(&store, |(h, _)| h);
        let store_of = |i: usize| if i < datasets { &store } else { home_store };
        let stack_spec = StackSpec {
            datasets: spec.layers.clone(),
            volume: spec.volume.as_deref().map(VolumeRef::parse).transpose()?,
            endpoint_url: spec.endpoint_url.clone(),
            cache_dir: Some(self.config.cache_dir.clone()),
            squash_after: self.config.squash_after,
            record_start: self.config.record_starts && !spec.no_prefetch_record,
            commit_counts: Some(Arc::clone(&self.commits)),
            trust: Some(self.trust_for(&spec)?),
            tenant: spec.tenant.clone(),
            volume_home: home.as_ref().map(|(h, _)| Arc::clone(h)),
        };
        let assembly = strata_fs::mount::assemble(&store, reader.clone(), &stack_spec).await?;
        if spec.tenant.is_some() {
            // A manifest found in the cache was read by someone: the tenant's own credential
            // proves, one request per layer, that it can read each.
            for (i, l) in assembly.layers.iter().enumerate() {
                let key = format!("layers/{}", l.digest.to_hex());
                if store_of(i).head(&key).await?.is_none() {
                    return Err(DaemonError::not_found(format!(
                        "layer {} of {} is not in the store",
                        l.digest, l.name
                    )));
                }
            }
        }
        // Read-only mounts of one stack share one FUSE session (one kernel page cache): the
        // later ones are bind mounts of the first. A mount tied to its client's life is not
        // shared, so its unmount never waits on another's.
        // (Binding takes root.)
        let shareable = spec.read_only
            && *by == Client::Platform
            && spec.volume.is_none()
            && !spec.unmount_with_client
            && rustix::process::geteuid().is_root();
        let share = shareable.then(|| -> ShareKey {
            let digests = assembly.layers.iter().map(|l| l.digest.to_string());
            (
                spec.store.clone(),
                spec.endpoint_url.clone(),
                spec.tenant.clone(),
                digests.collect(),
                spec.no_prefetch_record,
                spec.no_prefetch_replay,
            )
        });
        if let Some(key) = &share {
            let _gate = self.share_gate.lock().await;
            if let Some(info) = self.join_shared(key, &mp, &spec, &assembly)? {
                return Ok(info);
            }
        }
        // Before any chunk is read: from now on garbage collection keeps these layers, even
        // once the tags that named them move on (until then, its grace period does). A mount
        // that joined a shared session above is covered by that session's lease.
        let digests = assembly.layers.iter().map(|l| l.digest);
        let origin = assembly.volume.as_ref().map(|v| v.lease_origin());
        let (token, written) = match &home {
            // Each store's lease names only its own layers (its collector would take any
            // other for a missing one).
            Some((_, platform_home)) => {
                let (token, written) = self
                    .leases
                    .add(
                        &platform,
                        platform_endpoint.as_deref(),
                        digests.clone().take(datasets).collect(),
                        None,
                    )
                    .await;
                let in_home = self
                    .leases
                    .add_to(
                        token,
                        platform_home,
                        platform_endpoint.as_deref(),
                        digests.skip(datasets).collect(),
                        origin,
                    )
                    .await;
                // The datasets' lease is the one a pinned layer's wait looks for.
                (token, in_home.and(written))
            }
            None => {
                self.leases
                    .add(
                        &platform,
                        platform_endpoint.as_deref(),
                        digests.collect(),
                        origin,
                    )
                    .await
            }
        };
        let lease = LeaseGuard {
            leases: Arc::clone(&self.leases),
            token: Some(token),
        };
        if spec.layers.iter().any(|l| l.contains('@')) {
            // A pinned layer may be one no root keeps, which a collection running now may
            // have marked dead before the lease above was written: wait for it to end, and
            // make sure the layers are still there. Without the lease in the store, nothing
            // protects it: refused.
            let own =
                match written {
                    Ok(key) => key,
                    Err(e) => return Err(DaemonError::from(e).context(
                        "writing the mount lease that keeps a pinned layer from garbage collection",
                    )),
                };
            strata_fs::gc::lease::wait_while_collecting(&platform, &own, PINNED_MOUNT_GC_WAIT)
                .await?;
            for (i, l) in assembly.layers.iter().enumerate() {
                if store_of(i)
                    .head(&format!("layers/{}", l.digest.to_hex()))
                    .await?
                    .is_none()
                {
                    return Err(DaemonError::from(strata_fs::error::FsError::NotFound(
                        format!(
                            "layer {} ({}) was collected by strata gc while mounting",
                            l.digest, l.name
                        ),
                    )));
                }
            }
        }
        let volume = assembly.volume.clone();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let scratch = (!spec.read_only).then(|| scratch_dir(&self.config.state_dir, id));
        let upper = scratch.as_ref().map(|dir| UpperSpec {
            dir: dir.clone(),
            quota: spec.scratch_size,
            inodes: spec.scratch_inodes,
        });
        let errors = Arc::new(ErrnoCounts::new(Some(Arc::clone(&self.errors))));
        let mounted = blocking(|| -> DaemonResult<_> {
            let tree = assembly.tree(upper.as_ref())?;
            let owner = match by {
                Client::Tenant { uid, gid, .. } => strata_fuse::MountpointOwner::Uid {
                    uid: *uid,
                    gid: *gid,
                },
                Client::Platform => strata_fuse::MountpointOwner::Any,
            };
            let session = strata_fuse::mount(
                tree.clone(),
                &mp,
                owner,
                tokio::runtime::Handle::current(),
                self.config.passthrough,
                Arc::clone(&errors),
            )?;
            Ok((session, tree))
        });
        let (session, tree) = match mounted {
            Ok(s) => s,
            Err(e) => {
                if let Some(dir) = &scratch {
                    let _ = std::fs::remove_dir_all(dir);
                }
                return Err(e);
            }
        };
        let mount_id = session.mount_id;
        let starts = assembly.start_prefetch(
            &store,
            &platform,
            self.config.replay_starts && !spec.no_prefetch_replay,
        );
        let layer_info = assembly
            .layers
            .iter()
            .map(|l| LayerInfo {
                dataset: l.name.clone(),
                digest: l.digest.to_string(),
            })
            .collect();
        let info = MountInfo {
            id,
            mountpoint: mp.clone(),
            store: spec.store,
            layers: layer_info,
            mounted_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            writable: scratch.is_some(),
            scratch_size: spec.scratch_size.filter(|_| scratch.is_some()),
            volume: spec.volume.clone(),
            commit_error: None,
            shared_with: None,
            tenant: spec.tenant.clone(),
        };
        // Offered for sharing unless another session of the stack already is (one mounted
        // meanwhile): that one stays the one later mounts join.
        if let Some(key) = share {
            match blocking(|| strata_fuse::mounted_dev(&mp)) {
                Ok(dev) => {
                    self.shared
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .entry(key)
                        .or_insert_with(|| Shared {
                            session: id,
                            dev,
                            mountpoints: vec![mp.clone()],
                        });
                }
                Err(e) => tracing::warn!("{}: not shared: {e}", mp.display()),
            }
        }
        let (ended_tx, ended) = watch::channel(None);
        self.mounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                mp.clone(),
                Mounted {
                    info: info.clone(),
                    agent: by.agent(),
                    mount_id,
                    session: id,
                    reader,
                    prefetch: starts.progress().clone(),
                    requests,
                    errors,
                    volume: match (&volume, &scratch) {
                        (Some(vm), Some(dir)) => Some((tree.clone(), vm.clone(), dir.clone())),
                        _ => None,
                    },
                    ended,
                },
            );
        // The session ends when the mount goes away (all its mountpoints), whoever unmounted
        // it; forget it then.
        let mounts = Arc::clone(&self.mounts);
        let shared = Arc::clone(&self.shared);
        // The session's lease goes when the session ends (every mountpoint sharing it gone).
        let lease = lease.keep();
        let kept_lease = lease;
        let leases = Arc::clone(&self.leases);
        let runtime = tokio::runtime::Handle::current();
        let state_dir = self.config.state_dir.clone();
        std::thread::Builder::new()
            .name(format!("strata-mount-{id}"))
            .spawn(move || {
                if let Err(e) = session.wait() {
                    tracing::warn!("mount {}: FUSE session ended with {e}", mp.display());
                }
                starts.mount_ended();
                mounts
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .retain(|_, m| m.session != id);
                shared
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .retain(|_, s| s.session != id);
                // The session is over and its files closed: a volume's changes are committed;
                // then the scratch goes, unless it holds changes that could not be committed.
                let (remove, problem) = match (&volume, &scratch) {
                    (Some(vm), Some(dir)) => {
                        match vm.commit_after(&tree, &runtime, dir, &state_dir) {
                            volumes::CommitEnd::Clean => (true, None),
                            volumes::CommitEnd::Conflict(m) => (true, Some(m)),
                            volumes::CommitEnd::Kept(m) => (false, Some(m)),
                        }
                    }
                    _ => (true, None),
                };
                drop(tree);
                if let (Some(dir), true) = (&scratch, remove) {
                    if let Err(e) = std::fs::remove_dir_all(dir) {
                        tracing::warn!("removing scratch {}: {e}", dir.display());
                    }
                }
                let _ = ended_tx.send(Some(Ended { problem }));
                tracing::info!("unmounted {}", mp.display());
                if let Some(token) = lease {
                    runtime.spawn(async move { leases.remove(token).await });
                }
            })
            .map_err(|e| {
                if let Some(token) = kept_lease {
                    self.leases.forget(token);
                }
                DaemonError::internal(format!("starting the session watcher: {e}"))
            })?;
        if let Some(pidfd) = owner {
            self.unmount_when_gone(pidfd, info.mountpoint.clone(), id);
        }
        tracing::info!(
            "mounted {} at {}",
            spec.layers.join(" + "),
            info.mountpoint.display()
        );
        Ok(info)
    }

    /// Mounts `mp` as another mountpoint of the read-only session of the same stack, if there
    /// is one (`None`: there is none, or binding failed, and the caller mounts anew).
    fn join_shared(
        &self,
        key: &ShareKey,
        mp: &Path,
        spec: &MountSpec,
        assembly: &strata_fs::mount::Assembly,
    ) -> DaemonResult<Option<MountInfo>> {
        let Some((session, dev, sources)) = self
            .shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .map(|s| (s.session, s.dev, s.mountpoints.clone()))
        else {
            return Ok(None);
        };
        let Some((reader, prefetch, ended, requests, errors)) = self
            .mounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .find(|m| m.session == session)
            .map(|m| {
                (
                    m.reader.clone(),
                    m.prefetch.clone(),
                    m.ended.clone(),
                    m.requests.clone(),
                    m.errors.clone(),
                )
            })
        else {
            return Ok(None);
        };
        let bound = blocking(|| {
            sources
                .iter()
                .any(|source| match strata_fuse::bind(source, dev, mp) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::info!(
                            "{}: not sharing the session at {}: {e}",
                            mp.display(),
                            source.display()
                        );
                        false
                    }
                })
        });
        if !bound {
            return Ok(None);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let info = MountInfo {
            id,
            mountpoint: mp.to_path_buf(),
            store: spec.store.clone(),
            layers: assembly
                .layers
                .iter()
                .map(|l| LayerInfo {
                    dataset: l.name.clone(),
                    digest: l.digest.to_string(),
                })
                .collect(),
            mounted_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            writable: false,
            scratch_size: None,
            volume: None,
            commit_error: None,
            shared_with: Some(session),
            tenant: spec.tenant.clone(),
        };
        if let Some(s) = self
            .shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_mut(key)
        {
            s.mountpoints.push(mp.to_path_buf());
        }
        self.mounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                mp.to_path_buf(),
                Mounted {
                    info: info.clone(),
                    agent: None,
                    mount_id: None,
                    session,
                    reader,
                    prefetch,
                    requests,
                    errors,
                    volume: None,
                    ended,
                },
            );
        tracing::info!(
            "mounted {} at {} (sharing the session of mount {session})",
            spec.layers.join(" + "),
            mp.display()
        );
        Ok(Some(info))
    }

    /// Forgets `mp` as a mountpoint of its shared session; whether the session has others.
    fn leave_shared(&self, mp: &Path, session: u64) -> bool {
        let mut shared = self
            .shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut others = false;
        shared.retain(|_, s| {
            if s.session == session {
                s.mountpoints.retain(|m| m != mp);
                others = !s.mountpoints.is_empty();
            }
            s.session != session || others
        });
        others
    }

    /// Unmounts mount `id` at `mp` once the process behind `pidfd` has exited (if the mount
    /// is still there then): a client killed outright leaves nothing mounted.
    fn unmount_when_gone(&self, pidfd: std::os::fd::OwnedFd, mp: PathBuf, id: u64) {
        let mounts = Arc::clone(&self.mounts);
        tokio::spawn(async move {
            // SAFETY: the OwnedFd keeps the pidfd open, unchanged, as long as the AsyncFd.
            let fd = match unsafe { tokio::io::unix::AsyncFd::register(pidfd) } {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::warn!("watching the client of {}: {e}", mp.display());
                    return;
                }
            };
            // Readable once the process has exited; a wakeup is only a hint (readiness may be
            // spurious), so the process is asked before its mount is taken away.
            loop {
                let Ok(mut ready) = fd.readable().await else {
                    return; // the runtime is going down: the daemon unmounts everything
                };
                if process_gone(fd.get_ref()) {
                    break;
                }
                ready.clear_ready();
            }
            let still = mounts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&mp)
                .filter(|m| m.info.id == id)
                .map(|m| m.mount_id);
            if let Some(mount_id) = still {
                tracing::warn!(
                    "{}: the client that mounted it is gone; unmounting",
                    mp.display()
                );
                if let Err(e) = strata_fuse::unmount_exact(&mp, mount_id, true) {
                    tracing::error!("unmounting {}: {e}", mp.display());
                }
            }
        });
    }

    /// `strata commit`: commits a volume mount's changes so far; the mount goes on.
    pub async fn commit(&self, mountpoint: &Path) -> DaemonResult<CommitReply> {
        self.commit_by(mountpoint, &Client::Platform).await
    }

    /// A commit asked for by `by`, which may commit only mounts it may touch (others are
    /// told as if there were none: an agent learns nothing of others' mounts).
    async fn commit_by(&self, mountpoint: &Path, by: &Client) -> DaemonResult<CommitReply> {
        let (tree, vm, scratch) = {
            let mounts = self
                .mounts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let Some(m) = mounts.get(mountpoint).filter(|m| by.may_touch(m)) else {
                return Err(not_mounted(mountpoint));
            };
            match &m.volume {
                Some(v) => v.clone(),
                None => {
                    return Err(DaemonError::bad_request(format!(
                        "{} is not a volume mount: only a --volume mount commits",
                        mountpoint.display()
                    )))
                }
            }
        };
        let committed = vm.commit(&tree, &scratch).await?;
        Ok(CommitReply {
            volume: vm.volume.to_string(),
            conflict: committed.conflict_message(&vm.volume),
            layer: committed.commit.as_ref().map(|c| c.layer.clone()),
            changes: committed.commit.as_ref().map_or(0, |c| c.changes),
            bytes_uploaded: committed.report.as_ref().map_or(0, |r| r.bytes_uploaded),
        })
    }

    /// Unmounts; a volume mount's reply comes once its changes are committed (or kept, which
    /// `commit_error` says).
    pub async fn unmount(&self, mountpoint: &Path, lazy: bool) -> DaemonResult<MountInfo> {
        self.unmount_by(mountpoint, lazy, &Client::Platform).await
    }

    /// An unmount asked for by `by` (see [`Daemon::commit_by`]).
    async fn unmount_by(
        &self,
        mountpoint: &Path,
        lazy: bool,
        by: &Client,
    ) -> DaemonResult<MountInfo> {
        let (mut info, mut ended, commits, session, mount_id) = {
            let mounts = self
                .mounts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let Some(m) = mounts.get(mountpoint).filter(|m| by.may_touch(m)) else {
                return Err(not_mounted(mountpoint));
            };
            (
                m.info.clone(),
                m.ended.clone(),
                m.volume.is_some(),
                m.session,
                m.mount_id,
            )
        };
        let gate = (!commits).then(|| self.share_gate.lock());
        let _gate = match gate {
            Some(g) => Some(g.await),
            None => None,
        };
        blocking(|| unmount_settling(mountpoint, mount_id, lazy))?;
        // One mountpoint of a shared session: the session goes on for the others.
        if self.leave_shared(mountpoint, session) {
            {
                let mut mounts = self
                    .mounts
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if mounts.get(mountpoint).is_some_and(|m| m.info.id == info.id) {
                    mounts.remove(mountpoint);
                }
            }
            return Ok(info);
        }
        drop(_gate);
        // A volume mount's unmount returns once its changes are committed.
        let wait = if commits {
            COMMIT_WAIT
        } else {
            SESSION_END_WAIT
        };
        match tokio::time::timeout(wait, ended.wait_for(|e| e.is_some())).await {
            Ok(Ok(end)) => info.commit_error = end.as_ref().and_then(|e| e.problem.clone()),
            _ => {
                tracing::warn!(
                    "{}: FUSE session still running {wait:?} after unmount",
                    mountpoint.display()
                );
                // Never a success for a commit that has not landed.
                if commits {
                    info.commit_error = Some(format!(
                        "the volume's commit had not finished {}s after the unmount; it goes \
                         on in the daemon (if it fails, the changes are kept and retried: see \
                         the daemon's log and `strata volume show`)",
                        wait.as_secs()
                    ));
                }
            }
        }
        Ok(info)
    }

    /// Unmounts everything (volumes commit first), as the daemon does when it stops.
    pub async fn shutdown(&self) {
        if let Some(retries) = self
            .retries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            retries.abort();
        }
        /// A mount to take down: where, its end, whether it commits, its kernel mount id.
        type Down = (PathBuf, watch::Receiver<Option<Ended>>, bool, Option<u64>);
        let all: Vec<Down> = self
            .mounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(mp, m)| (mp.clone(), m.ended.clone(), m.volume.is_some(), m.mount_id))
            .collect();
        // Mounts that could not be taken down (an agent renamed a parent of one, say) have no
        // session end to wait for.
        let stuck: HashSet<PathBuf> = blocking(|| {
            let mut stuck = HashSet::new();
            for (mp, _, _, id) in &all {
                if let Err(e) = strata_fuse::unmount_exact(mp, *id, false) {
                    tracing::warn!("{e}; detaching {} instead", mp.display());
                    if let Err(e) = strata_fuse::unmount_exact(mp, *id, true) {
                        tracing::error!("cannot unmount {}: {e}", mp.display());
                        stuck.insert(mp.clone());
                    }
                }
            }
            stuck
        });
        for (mp, mut ended, commits, _) in all {
            if stuck.contains(&mp) {
                continue;
            }
            // Volumes commit before their session counts as ended.
            let wait = if commits {
                COMMIT_WAIT
            } else {
                SESSION_END_WAIT
            };
            if tokio::time::timeout(wait, ended.wait_for(|e| e.is_some()))
                .await
                .is_err()
            {
                tracing::warn!("{}: FUSE session did not end", mp.display());
            }
        }
        if let Some(renewer) = self
            .lease_renewer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            renewer.abort();
        }
        self.leases.release_all().await;
    }

    /// Forgets the mountpoints of shared sessions that were unmounted behind the daemon's back
    /// (a plain `umount` of one of them ends nothing the daemon would see).
    fn prune_shared(&self) {
        let sessions: HashSet<u64> = self
            .shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .filter(|s| s.mountpoints.len() > 1)
            .map(|s| s.session)
            .collect();
        if sessions.is_empty() {
            return;
        }
        let members: Vec<(PathBuf, u64, u64)> = self
            .mounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|(_, m)| sessions.contains(&m.session))
            .map(|(mp, m)| (mp.clone(), m.session, m.info.id))
            .collect();
        let Ok(mounted) = blocking(strata_fuse::strata_mounts) else {
            return;
        };
        let mounted: HashSet<PathBuf> = mounted.into_iter().collect();
        for (mp, session, id) in members {
            if mounted.contains(&mp) {
                continue;
            }
            tracing::info!("{} was unmounted behind the daemon's back", mp.display());
            if self.leave_shared(&mp, session) {
                let mut mounts = self
                    .mounts
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if mounts.get(&mp).is_some_and(|m| m.info.id == id) {
                    mounts.remove(&mp);
                }
            }
        }
    }

    /// The mounts, oldest first.
    pub fn mounts(&self) -> Vec<MountInfo> {
        self.mounts_for(&Client::Platform)
    }

    /// The mounts `by` may see, oldest first.
    fn mounts_for(&self, by: &Client) -> Vec<MountInfo> {
        self.prune_shared();
        let mut list: Vec<MountInfo> = self
            .mounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .filter(|m| by.may_touch(m))
            .map(|m| m.info.clone())
            .collect();
        list.sort_by_key(|m| m.id);
        list
    }

    /// Cache and per-mount read counters, and the kept volume uppers.
    pub fn stats(&self) -> StatsReply {
        self.prune_shared();
        let mut mounts: Vec<MountStats> = self
            .mounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .map(|m| MountStats {
                mount: m.info.clone(),
                stats: m.reader.stats(),
                prefetch: m.prefetch.report(),
                store_requests: m.requests.snapshot(),
                errors: m.errors.snapshot(),
            })
            .collect();
        mounts.sort_by_key(|m| m.mount.id);
        let state = &self.config.state_dir;
        let waiting = volumes::kept_uppers(state).into_iter().map(|d| (d, false));
        let kept = waiting
            .chain(volumes::quarantined(state).into_iter().map(|d| (d, true)))
            .map(|(path, quarantined)| {
                let a = volumes::Attempts::read(&path);
                KeptInfo {
                    volume: volumes::read_record(&path)
                        .map_or_else(|e| format!("? ({e})"), |r| r.volume),
                    attempts: a.count,
                    last_error: a.last_error,
                    quarantined,
                    next_try_at: (!quarantined).then_some(a.next_try_at),
                    path,
                }
            })
            .collect();
        let store_requests = self
            .stores
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .map(|s| s.snapshot())
            .fold(StoreCounts::default(), |a, b| a.plus(&b));
        StatsReply {
            total: self.cache.stats(),
            store_requests,
            manifest_bytes: dir_size(&self.config.cache_dir.join("layers")),
            mounts,
            kept,
            local_integrity: crate::protocol::LOCAL_INTEGRITY.into(),
            commits: self.commits.snapshot(),
            errors: self.errors.snapshot(),
        }
    }
}

fn not_mounted(mountpoint: &Path) -> DaemonError {
    DaemonError::not_found(format!(
        "{} is not mounted by this daemon",
        mountpoint.display()
    ))
}

/// Whether the process behind `pidfd` has exited (signal 0 finds no process).
fn process_gone(pidfd: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    // rustix's pidfd_send_signal takes only real signals, not 0 (which asks whether the
    // process exists).
    // SAFETY: pidfd_send_signal with a pidfd we own, signal 0 (nothing is sent) and no info.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// A pidfd for process `pid`; `None` where the kernel has no pidfds (the mount then lives
/// until it is unmounted).
fn watch_process(pid: libc::pid_t) -> DaemonResult<Option<OwnedFd>> {
    let Some(pid) = rustix::process::Pid::from_raw(pid) else {
        // The kernel reports pid 0 for a client outside the daemon's pid namespace.
        tracing::warn!(
            "cannot watch a client outside the daemon's pid namespace; its mounts stay until \
             unmounted"
        );
        return Ok(None);
    };
    match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => Ok(Some(fd)),
        Err(rustix::io::Errno::SRCH) => Err(DaemonError::bad_request(format!(
            "the client (pid {}) is gone",
            pid.as_raw_nonzero()
        ))),
        Err(e) => {
            tracing::warn!(
                "cannot watch process {} ({e}); its mounts stay until unmounted",
                pid.as_raw_nonzero()
            );
            Ok(None)
        }
    }
}

/// How a mount's session ended.
#[derive(Debug, Clone)]
struct Ended {
    /// What went wrong committing its volume (a conflict, or the upper kept for a retry).
    problem: Option<String>,
}

fn scratch_dir(state_dir: &Path, id: u64) -> PathBuf {
    state_dir.join("scratch").join(id.to_string())
}

/// Who may connect to the control socket (what the daemon then serves them is its own
/// check, by peer credentials).
enum SocketAccess {
    Owner,
    Group(u32),
    Everyone,
}

/// Binds the control socket, refusing to take over one a live daemon still answers on.
fn bind_socket(path: &Path, access: SocketAccess) -> DaemonResult<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating socket dir {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::busy(format!(
                "another strata daemon is listening on {}",
                path.display()
            )));
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    // The socket must never exist with a looser mode, not even for a moment: it is bound in
    // a private (0700) directory beside it, restricted there, and renamed into place. (The
    // umask would do it too, but it is process-wide in a threaded daemon.)
    let dir = path.parent().unwrap_or(Path::new("."));
    let private = tempfile::Builder::new()
        .prefix(".strata-socket-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(dir)
        .with_context(|| format!("making a private dir in {}", dir.display()))?;
    let staged = private.path().join("sock");
    let listener =
        UnixListener::bind(&staged).with_context(|| format!("listening on {}", path.display()))?;
    let mode = match access {
        SocketAccess::Owner => 0o600,
        SocketAccess::Group(gid) => {
            std::os::unix::fs::chown(&staged, None, Some(gid))
                .with_context(|| format!("giving {} to group {gid}", staged.display()))?;
            0o660
        }
        SocketAccess::Everyone => 0o666,
    };
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("restricting {}", staged.display()))?;
    std::fs::rename(&staged, path)
        .with_context(|| format!("moving the socket to {}", path.display()))?;
    Ok(listener)
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
