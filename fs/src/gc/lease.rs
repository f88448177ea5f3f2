//! How writers and the collector keep out of each other's way (`docs/FORMAT.md` §9).
//!
//! Anything that moves a root or relies on objects it did not write holds a **writer lease**
//! (`leases/writers/<id>`) while it works; the collector holds **`gc/lock`**, taken by
//! create-only compare-and-swap, and sweeps only once no live writer lease is left. A writer
//! puts its lease first and reads the lock second, and the collector takes the lock first
//! and lists leases second, so one of the two always sees the other.
//!
//! Daemons also hold **mount leases** (`leases/mounts/<host>-<id>`): the layers their mounts
//! read, which the collector keeps alive as roots (see [`MountLease`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use strata_cache_format::Digest;
use strata_store::{Store, StoreError, StoreErrorKind, Version};

use crate::error::{FsError, FsResult};

/// The collector's lock.
pub const LOCK_KEY: &str = "gc/lock";
/// Where writer leases live.
pub const WRITERS: &str = "leases/writers/";
/// Where mount leases live.
pub const MOUNTS: &str = "leases/mounts/";

/// How often leases and the lock are renewed, and when they count as abandoned.
#[derive(Clone, Copy, Debug)]
pub struct Timings {
    /// A writer renews its lease this often.
    pub writer_renew: Duration,
    /// A writer that could not renew for this long stops before its root write.
    pub writer_give_up: Duration,
    /// The collector ignores a writer lease not renewed for this long (a writer killed
    /// outright).
    pub writer_stale: Duration,
    /// The collector renews its lock this often.
    pub lock_renew: Duration,
    /// A lock not renewed for this long is taken over (a collector killed outright).
    pub lock_stale: Duration,
    /// A daemon rewrites its mount lease this often.
    pub mount_renew: Duration,
    /// A mount lease not rewritten for this long no longer keeps anything alive.
    pub mount_stale: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            writer_renew: Duration::from_secs(60),
            writer_give_up: Duration::from_secs(5 * 60),
            writer_stale: Duration::from_secs(10 * 60),
            lock_renew: Duration::from_secs(60),
            lock_stale: Duration::from_secs(10 * 60),
            mount_renew: Duration::from_secs(5 * 60),
            mount_stale: Duration::from_secs(15 * 60),
        }
    }
}

/// What a writer lease or the lock says of its holder, for people reading the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub version: u32,
    /// What holds it: `publish`, `tag`, `commit`, `gc`...
    pub what: String,
    pub host: String,
    pub pid: u32,
    /// When it was first taken, seconds since the epoch (the holder's clock).
    pub since: u64,
    /// Unique to this holder: a lease or lock found in the store is known for its own.
    #[serde(default)]
    pub id: String,
}

impl Holder {
    fn new(what: &str) -> Holder {
        Holder {
            version: 1,
            what: what.to_string(),
            host: crate::volume::lifecycle::host_name(),
            pid: std::process::id(),
            since: epoch_secs(SystemTime::now()),
            id: unique_id(),
        }
    }

    fn sealed(&self) -> bytes::Bytes {
        let json = serde_json::to_vec(self).unwrap_or_default();
        crate::record::seal(&json)
    }
}

pub(crate) fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A name no other lease of any host takes: this process, this moment, a counter.
pub fn unique_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = blake3::Hasher::new();
    h.update(crate::volume::lifecycle::host_name().as_bytes());
    h.update(&std::process::id().to_le_bytes());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.update(&nanos.to_le_bytes());
    h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    h.finalize().to_hex()[..24].to_string()
}

/// When the object at `key` was last written, by the store's clock (`None`: not there).
async fn modified(store: &Arc<dyn Store>, key: &str) -> FsResult<Option<SystemTime>> {
    Ok(store
        .list_info(key)
        .await?
        .into_iter()
        .find(|o| o.key == key)
        .map(|o| o.modified))
}

/// Whether something last written at `modified` is older than `ttl` at `now` (one written
/// after `now`, by a clock ahead, is not).
pub(crate) fn stale(now: SystemTime, modified: SystemTime, ttl: Duration) -> bool {
    now.duration_since(modified).is_ok_and(|age| age > ttl)
}

/// A writer's lease; [`WriterLease::release`] it when done (dropping it releases it too, in
/// the background).
pub struct WriterLease {
    store: Arc<dyn Store>,
    key: String,
    what: String,
    renewals: Arc<Mutex<Renewals>>,
    renewer: tokio::task::JoinHandle<()>,
    give_up: Duration,
    /// The collection epoch when the lease was taken (see [`EPOCH_KEY`]).
    epoch: Option<bytes::Bytes>,
    released: bool,
}

/// When the lease was last renewed, and whether it ever went unrenewed for too long.
struct Renewals {
    /// When the last successful renewal was sent, by both clocks (a monotonic clock stops
    /// while the host sleeps).
    sent: (Instant, SystemTime),
    lapsed: bool,
}

impl Renewals {
    fn since(&self) -> Duration {
        let wall = self.sent.1.elapsed().unwrap_or_default();
        self.sent.0.elapsed().max(wall)
    }
}

impl std::fmt::Debug for WriterLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterLease")
            .field("key", &self.key)
            .finish()
    }
}

/// How long a writer waits for a collector before it gives up.
pub const WAIT_FOR_GC: Duration = Duration::from_secs(60 * 60);

/// Rewritten by every collection once no writer is left, before it marks: a writer that
/// finds it changed between taking its lease and its root write was taken for dead by a
/// collection, which may have swept what it relies on.
pub const EPOCH_KEY: &str = "gc/epoch";

/// The current collection epoch (`None`: no collection ever ran).
async fn read_epoch(store: &Arc<dyn Store>) -> FsResult<Option<bytes::Bytes>> {
    match store.get(EPOCH_KEY).await {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl WriterLease {
    /// Takes a writer lease for `what`, waiting while a collector holds the lock.
    pub async fn acquire(store: &Arc<dyn Store>, what: &str) -> FsResult<WriterLease> {
        Self::acquire_with(store, what, Timings::default(), WAIT_FOR_GC).await
    }

    pub async fn acquire_with(
        store: &Arc<dyn Store>,
        what: &str,
        timings: Timings,
        max_wait: Duration,
    ) -> FsResult<WriterLease> {
        let key = format!("{WRITERS}{}", unique_id());
        let body = Holder::new(what).sealed();
        let started = Instant::now();
        let mut pause = Duration::from_millis(500);
        let mut said = false;
        let epoch = loop {
            let sent = (Instant::now(), SystemTime::now());
            store.put(&key, body.clone()).await?;
            // Only after the lease is in place: a collector that took the lock before this
            // read is seen here; one that takes it after sees the lease.
            let checked = async {
                let lock = live_lock(store, &key, timings).await?;
                let epoch = read_epoch(store).await?;
                Ok::<_, FsError>((lock, epoch))
            }
            .await;
            let holder = match checked {
                Ok((None, epoch)) => break (epoch, sent),
                Ok((Some(holder), _)) => holder,
                Err(e) => {
                    if let Err(d) = store.delete(&key).await {
                        tracing::warn!("removing writer lease {key}: {d}");
                    }
                    return Err(e);
                }
            };
            store.delete(&key).await?;
            if started.elapsed() >= max_wait {
                return Err(FsError::Conflict(format!(
                    "{}: garbage collection ({} on {}, pid {}) still holds {LOCK_KEY} after {}s; \
                     {what} did not start",
                    store.url(),
                    holder.what,
                    holder.host,
                    holder.pid,
                    max_wait.as_secs()
                )));
            }
            if !said {
                tracing::info!(
                    "{}: waiting for garbage collection on {} (pid {}) to finish before {what}",
                    store.url(),
                    holder.host,
                    holder.pid
                );
                said = true;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(10));
        };
        let (epoch, sent) = epoch;
        let renewals = Arc::new(Mutex::new(Renewals {
            sent,
            lapsed: false,
        }));
        let give_up = timings.writer_give_up;
        let renewer = tokio::spawn({
            let (store, key, renewals) = (Arc::clone(store), key.clone(), Arc::clone(&renewals));
            async move {
                loop {
                    tokio::time::sleep(timings.writer_renew).await;
                    let sent = (Instant::now(), SystemTime::now());
                    match store.put(&key, body.clone()).await {
                        Ok(()) => {
                            let mut r = renewals.lock().unwrap_or_else(|e| e.into_inner());
                            // A gap too long once is a lapse for good: a collector may have
                            // swept in it, whatever later renewals say.
                            if r.since() > give_up {
                                r.lapsed = true;
                            }
                            r.sent = sent;
                        }
                        Err(e) => tracing::warn!("renewing writer lease {key}: {e}"),
                    }
                }
            }
        });
        Ok(WriterLease {
            store: Arc::clone(store),
            key,
            what: what.to_string(),
            renewals,
            renewer,
            give_up,
            epoch,
            released: false,
        })
    }

    /// Called right before a root write: fails if a collection may have run since the lease
    /// was taken (it could not be renewed for too long, or the collection epoch moved), and
    /// so may have swept what this writer relies on.
    pub async fn ensure_held(&self) -> FsResult<()> {
        let lapsed = {
            let r = self.renewals.lock().unwrap_or_else(|e| e.into_inner());
            r.lapsed || r.since() > self.give_up
        };
        let moved = !lapsed && read_epoch(&self.store).await? != self.epoch;
        if lapsed || moved {
            return Err(FsError::Conflict(format!(
                "{}: garbage collection may have run while this {} was under way (its writer \
                 lease {}); stopping before moving anything (run it again)",
                self.store.url(),
                self.what,
                if lapsed {
                    "could not be renewed in time"
                } else {
                    "was taken for abandoned"
                }
            )));
        }
        Ok(())
    }

    /// Deletes the lease.
    pub async fn release(mut self) {
        self.renewer.abort();
        self.released = true;
        if let Err(e) = self.store.delete(&self.key).await {
            tracing::warn!("removing writer lease {}: {e}", self.key);
        }
    }
}

impl Drop for WriterLease {
    fn drop(&mut self) {
        self.renewer.abort();
        if self.released {
            return;
        }
        // An early return (an error) dropped it: delete it in the background; if that cannot
        // run, the lease goes stale and the collector stops waiting for it.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (store, key) = (Arc::clone(&self.store), self.key.clone());
            rt.spawn(async move {
                if let Err(e) = store.delete(&key).await {
                    tracing::warn!("removing writer lease {key}: {e}");
                }
            });
        }
    }
}

/// The holder of `gc/lock` if a collector holds it and renews it; `own`: a key just written,
/// whose time is the store's now (only read when there is a lock).
async fn live_lock(
    store: &Arc<dyn Store>,
    own: &str,
    timings: Timings,
) -> FsResult<Option<Holder>> {
    let holder = match crate::record::get(store, LOCK_KEY).await {
        Ok(body) => serde_json::from_slice::<Holder>(&body)
            .unwrap_or_else(|_| Holder::new("an unreadable lock")),
        Err(FsError::Store(e)) if e.is_not_found() => return Ok(None),
        // A lock that cannot be read is still a lock while it is renewed.
        Err(FsError::InvalidInput(why)) => {
            tracing::warn!("{}: {LOCK_KEY} is unreadable: {why}", store.url());
            Holder::new("an unreadable lock")
        }
        Err(e) => return Err(e),
    };
    let Some(locked) = modified(store, LOCK_KEY).await? else {
        return Ok(None); // released meanwhile
    };
    // The store's now is the time of the lease just written; a listing that does not show it
    // yet leaves this host's clock to judge.
    let now = modified(store, own).await?.unwrap_or_else(SystemTime::now);
    Ok((!stale(now, locked, timings.lock_stale)).then_some(holder))
}

/// The collector's hold on `gc/lock`, renewed in the background until released.
pub struct GcLock {
    store: Arc<dyn Store>,
    /// The store's clock when the lock was taken (the lock's own LastModified).
    pub now: SystemTime,
    state: Arc<Mutex<LockState>>,
    /// The hold ends once the last renewal is older than this.
    trust: Duration,
    renewer: tokio::task::JoinHandle<()>,
}

struct LockState {
    version: Version,
    /// When the last successful renewal was sent, by both clocks.
    renewed: (Instant, SystemTime),
    /// Another collector took the lock over.
    lost: bool,
}

impl GcLock {
    /// Takes the lock: creates it, or takes over one its collector stopped renewing.
    /// Fails with [`FsError::Conflict`] while another collector holds it, and with a store
    /// error of kind [`StoreErrorKind::Unsupported`] on a store that cannot do conditional
    /// writes.
    pub async fn take(store: &Arc<dyn Store>, timings: Timings) -> FsResult<GcLock> {
        let body = Holder::new("gc").sealed();
        let unsupported = |why: &str| {
            FsError::Store(StoreError::new(
                store.url(),
                "gc",
                LOCK_KEY,
                StoreErrorKind::Unsupported,
                format!(
                    "the store ignores conditional writes, so garbage collection cannot \
                     exclude publishes, commits and other collectors; run it with \
                     --single-writer when nothing else writes to the store ({why})"
                ),
            ))
        };
        let created = match store.compare_and_swap(LOCK_KEY, None, body.clone()).await {
            Ok(v) => v,
            Err(e) if e.kind == StoreErrorKind::Conflict => {
                match store.get_versioned(LOCK_KEY).await? {
                    // This very write landed, and only its reply was lost.
                    Some((found, v)) if found == body => v,
                    _ => take_over(store, timings, body.clone()).await?,
                }
            }
            Err(e) if e.kind == StoreErrorKind::Unsupported => return Err(unsupported(&e.message)),
            Err(e) => return Err(e.into()),
        };
        // Renewing (and taking over) replaces the lock by version: a store must refuse a
        // wrong version and take the right one, or the lock excludes nothing.
        let wrong = Version("strata-gc-probe-not-a-version".into());
        let probed = match store
            .compare_and_swap(LOCK_KEY, Some(&wrong), body.clone())
            .await
        {
            Err(e) if e.kind == StoreErrorKind::Conflict => {
                store
                    .compare_and_swap(LOCK_KEY, Some(&created), body.clone())
                    .await
            }
            Ok(_) => Err(StoreError::new(
                store.url(),
                "gc",
                LOCK_KEY,
                StoreErrorKind::Unsupported,
                "a replace with a wrong version (If-Match) was taken",
            )),
            Err(e) => Err(e),
        };
        let version = match probed {
            Ok(v) => v,
            Err(e) => {
                let _ = store.delete(LOCK_KEY).await;
                return Err(match e.kind {
                    StoreErrorKind::Unsupported => unsupported(&e.message),
                    _ => e.into(),
                });
            }
        };
        let now = modified(store, LOCK_KEY)
            .await?
            .unwrap_or_else(SystemTime::now);
        let state = Arc::new(Mutex::new(LockState {
            version,
            renewed: (Instant::now(), SystemTime::now()),
            lost: false,
        }));
        let renewer = tokio::spawn({
            let (store, state) = (Arc::clone(store), Arc::clone(&state));
            async move {
                loop {
                    tokio::time::sleep(timings.lock_renew).await;
                    let version = lock_state(&state).version.clone();
                    let sent = (Instant::now(), SystemTime::now());
                    match store
                        .compare_and_swap(LOCK_KEY, Some(&version), body.clone())
                        .await
                    {
                        Ok(v) => {
                            let mut st = lock_state(&state);
                            st.version = v;
                            st.renewed = sent;
                        }
                        Err(e) if e.kind == StoreErrorKind::Conflict => {
                            tracing::error!("{LOCK_KEY} was taken over: stopping");
                            lock_state(&state).lost = true;
                            return;
                        }
                        Err(e) => tracing::warn!("renewing {LOCK_KEY}: {e}"),
                    }
                }
            }
        });
        Ok(GcLock {
            store: Arc::clone(store),
            now,
            state,
            trust: timings.lock_stale / 2,
            renewer,
        })
    }

    /// Fails once the hold may be over: another collector took the lock over, or it was not
    /// renewed for long enough that writers may count it abandoned.
    pub fn ensure_held(&self) -> FsResult<()> {
        let st = lock_state(&self.state);
        let since = st
            .renewed
            .0
            .elapsed()
            .max(st.renewed.1.elapsed().unwrap_or_default());
        if st.lost || since > self.trust {
            return Err(FsError::Conflict(format!(
                "{}: {LOCK_KEY} {}; stopped",
                self.store.url(),
                if st.lost {
                    "was taken over by another collector"
                } else {
                    "could not be renewed in time"
                }
            )));
        }
        Ok(())
    }

    /// The store's clock now (the lock's LastModified after a write of it).
    pub async fn store_now(&self) -> FsResult<SystemTime> {
        Ok(modified(&self.store, LOCK_KEY).await?.unwrap_or(self.now))
    }

    /// Deletes the lock if it is still this collector's (S3 has no conditional delete: a
    /// takeover in the moment between the check and the delete is lost, and that collector
    /// then stops at its next renewal).
    pub async fn release(self) {
        self.renewer.abort();
        let (lost, ours) = {
            let st = lock_state(&self.state);
            (st.lost, st.version.clone())
        };
        if lost {
            return;
        }
        match self.store.get_versioned(LOCK_KEY).await {
            Ok(Some((_, v))) if v == ours => {
                if let Err(e) = self.store.delete(LOCK_KEY).await {
                    tracing::warn!("removing {LOCK_KEY}: {e}");
                }
            }
            Ok(_) => tracing::warn!("{LOCK_KEY} is another collector's now: left in place"),
            Err(e) => tracing::warn!("reading {LOCK_KEY} to release it: {e}"),
        }
    }
}

fn lock_state(state: &Mutex<LockState>) -> std::sync::MutexGuard<'_, LockState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for GcLock {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// Takes over a lock whose collector stopped renewing it (by the local clock: the lock is
/// renewed every minute and counts as abandoned after ten, which leaves room for clocks that
/// disagree by minutes).
async fn take_over(
    store: &Arc<dyn Store>,
    timings: Timings,
    body: bytes::Bytes,
) -> FsResult<Version> {
    let held = |detail: String| {
        FsError::Conflict(format!(
            "{}: another garbage collection holds {LOCK_KEY}{detail}",
            store.url()
        ))
    };
    let Some((data, version)) = store.get_versioned(LOCK_KEY).await? else {
        return Err(held(" (it was just released: try again)".into()));
    };
    let Some(locked) = modified(store, LOCK_KEY).await? else {
        return Err(held(" (it was just released: try again)".into()));
    };
    if !stale(SystemTime::now(), locked, timings.lock_stale) {
        let who = crate::record::open(&data)
            .ok()
            .and_then(|b| serde_json::from_slice::<Holder>(&b).ok())
            .map(|h| format!(" ({} on {}, pid {})", h.what, h.host, h.pid))
            .unwrap_or_default();
        return Err(held(who));
    }
    tracing::warn!(
        "{}: {LOCK_KEY} was not renewed for {}s: taking it over",
        store.url(),
        SystemTime::now()
            .duration_since(locked)
            .map_or(0, |d| d.as_secs())
    );
    store
        .compare_and_swap(LOCK_KEY, Some(&version), body)
        .await
        .map_err(|e| match e.kind {
            StoreErrorKind::Conflict => held(" (another collector took it over first)".into()),
            _ => e.into(),
        })
}

/// Writer leases still renewed at `now` (the store's clock): (key, holder).
pub async fn live_writers(
    store: &Arc<dyn Store>,
    now: SystemTime,
    timings: Timings,
) -> FsResult<Vec<(String, Option<Holder>)>> {
    let mut out = Vec::new();
    for o in store.list_info(WRITERS).await? {
        if stale(now, o.modified, timings.writer_stale) {
            continue;
        }
        let holder = match crate::record::get(store, &o.key).await {
            Ok(b) => serde_json::from_slice::<Holder>(&b).ok(),
            Err(FsError::Store(e)) if e.is_not_found() => continue, // released meanwhile
            Err(_) => None,
        };
        out.push((o.key, holder));
    }
    Ok(out)
}

/// Waits while a collector holds `gc/lock`, at most `max_wait`; `own`: a key the caller just
/// wrote, whose time is the store's now (as for a writer).
pub async fn wait_while_collecting(
    store: &Arc<dyn Store>,
    own: &str,
    max_wait: Duration,
) -> FsResult<()> {
    let timings = Timings::default();
    let started = Instant::now();
    loop {
        if live_lock(store, own, timings).await?.is_none() {
            return Ok(());
        }
        if started.elapsed() >= max_wait {
            return Err(FsError::Conflict(format!(
                "{}: garbage collection still holds {LOCK_KEY} after {}s",
                store.url(),
                max_wait.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A daemon's mount lease: the layers its mounts of one store read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountLease {
    pub version: u32,
    pub host: String,
    /// `blake3:<hex>` of every layer a mount of this daemon reads.
    pub layers: Vec<String>,
    /// For each volume (`SCOPE/NAME`) this daemon's mounts commit to, the last commit of the
    /// head each started from (its layer; `""` for an empty head): such a mount may need
    /// every commit that landed after it to commit (see FORMAT §9). `None` (a lease written
    /// before this field): every commit a squash replaced stays a root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<BTreeMap<String, BTreeSet<String>>>,
    /// The daemon reads a pack gc rewrote through its forwarding map (FORMAT §9). A live
    /// lease without it (an older daemon) holds every rewrite off.
    #[serde(default)]
    pub follows_moved: bool,
}

impl MountLease {
    pub fn new(
        layers: impl IntoIterator<Item = Digest>,
        volumes: BTreeMap<String, BTreeSet<String>>,
    ) -> MountLease {
        let mut layers: Vec<String> = layers.into_iter().map(|d| d.to_string()).collect();
        layers.sort();
        layers.dedup();
        MountLease {
            version: 1,
            host: crate::volume::lifecycle::host_name(),
            layers,
            volumes: Some(volumes),
            follows_moved: true,
        }
    }

    /// The key of a daemon's lease on the store at `store_url`:
    /// `leases/mounts/<host>-<daemon id>-<store>` (two URLs may name one bucket).
    pub fn key(daemon_id: &str, store_url: &str) -> String {
        format!(
            "{MOUNTS}{}-{daemon_id}-{}",
            crate::volume::lifecycle::host_name(),
            &blake3::hash(store_url.as_bytes()).to_hex()[..8]
        )
    }

    pub async fn write(&self, store: &Arc<dyn Store>, key: &str) -> FsResult<()> {
        let json = serde_json::to_vec(self)
            .map_err(|e| FsError::InvalidInput(format!("encoding a mount lease: {e}")))?;
        store.put(key, crate::record::seal(&json)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_store::MemoryStore;

    fn fast() -> Timings {
        Timings {
            writer_renew: Duration::from_millis(50),
            writer_give_up: Duration::from_secs(5),
            writer_stale: Duration::from_secs(5),
            lock_renew: Duration::from_millis(50),
            lock_stale: Duration::from_secs(5),
            mount_renew: Duration::from_millis(50),
            mount_stale: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn a_writer_waits_for_the_collector_and_the_collector_sees_the_writer() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new("lease"));
        let writer = WriterLease::acquire_with(&store, "publish", fast(), Duration::from_secs(5))
            .await
            .unwrap();
        let lock = GcLock::take(&store, fast()).await.unwrap();
        let live = live_writers(&store, lock.store_now().await.unwrap(), fast())
            .await
            .unwrap();
        assert_eq!(
            live.len(),
            1,
            "the collector sees the writer that came first"
        );
        assert_eq!(live[0].1.as_ref().unwrap().what, "publish");
        writer.release().await;
        assert!(live_writers(&store, lock.now, fast())
            .await
            .unwrap()
            .is_empty());

        // A writer that comes while the lock is held waits, and gives up after its limit
        // without leaving a lease behind.
        let err = WriterLease::acquire_with(&store, "tag", fast(), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("gc/lock"), "{err}");
        assert!(store.list(WRITERS).await.unwrap().is_empty());
        // A second collector is refused while the first renews its lock.
        tokio::time::sleep(Duration::from_millis(120)).await;
        let err = GcLock::take(&store, fast()).await.err().unwrap();
        assert!(matches!(err, FsError::Conflict(_)), "{err}");
        // Once released, a waiting writer goes on.
        let waiting = tokio::spawn({
            let store = Arc::clone(&store);
            async move {
                WriterLease::acquire_with(&store, "commit", fast(), Duration::from_secs(5)).await
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished());
        lock.release().await;
        let w = waiting.await.unwrap().unwrap();
        w.ensure_held().await.unwrap();
        drop(w);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !store.list(WRITERS).await.unwrap().is_empty() {
            assert!(Instant::now() < deadline, "a dropped lease is removed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn an_abandoned_lock_is_taken_over_and_its_holder_stops() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new("lock"));
        // The first collector stops renewing (its next renewal is far off)...
        let first = Timings {
            lock_renew: Duration::from_secs(60),
            lock_stale: Duration::from_millis(400),
            ..fast()
        };
        // ...and to the second its lock soon looks abandoned.
        let timings = Timings {
            lock_stale: Duration::from_millis(300),
            ..fast()
        };
        let first = GcLock::take(&store, first).await.unwrap();
        first.ensure_held().unwrap();
        let err = GcLock::take(&store, timings).await.err().unwrap();
        assert!(matches!(err, FsError::Conflict(_)), "held: {err}");
        tokio::time::sleep(Duration::from_millis(350)).await;
        let second = GcLock::take(&store, timings).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            first.ensure_held().is_err(),
            "the first stops trusting a lock it could not renew"
        );
        second.ensure_held().unwrap();
        first.release().await;
        assert!(
            store.head(LOCK_KEY).await.unwrap().is_some(),
            "a lost lock is not deleted"
        );
        second.release().await;
        assert!(store.head(LOCK_KEY).await.unwrap().is_none());
    }
}
