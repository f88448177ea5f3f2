//! The commit lifecycle of a volume mount: committing its changes when it ends, and keeping
//! them when that cannot happen (a conflict, the store down, the host's process killed).
//!
//! - At mount, `<scratch>/volume.json` records what the upper belongs to: the store, the
//!   volume, the head it started from and the exact layer stack. The upper keeps a journal
//!   of its records, written on every fsync (see `MountTree::save_journal`).
//! - A commit that fails moves the upper to `<state-dir>/uncommitted/<name>`. At start, the
//!   daemon moves there the scratch of every volume mount a crash left behind
//!   ([`clean_scratch`]).
//! - [`commit_kept`] rebuilds such an upper from its journal over the same stack and commits
//!   it; the daemon runs it at start and then every [`RETRY_EVERY`] until it lands, and
//!   quarantines it after [`QUARANTINE_AFTER`] failures ([`Attempts`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cache::ChunkReader;
use serde::{Deserialize, Serialize};
use strata_cache_format::Digest;
use strata_store::{Store, Version};

use crate::error::{Context, FsError, FsResult};
use crate::layer::Layer;
use crate::stack::LayerStack;
use crate::upper::{MountTree, UpperConfig};
use crate::volume::{self, VolumeHead, VolumeRef};

/// The record's file name in a volume mount's scratch (data files are named in hex).
pub const RECORD_FILE: &str = "volume.json";
/// How often the daemon looks for kept uppers to try again; each one waits longer after
/// every failure (doubling, up to [`BACKOFF_MAX`]).
pub const RETRY_EVERY: Duration = Duration::from_secs(30);
const BACKOFF_MAX: Duration = Duration::from_secs(3600);
/// Failed attempts after which a kept upper is quarantined: moved to
/// `<state-dir>/quarantine/`, no longer retried, waiting for an operator.
pub const QUARANTINE_AFTER: u32 = 8;
/// A kept upper's record of its failed commits.
const ATTEMPTS_FILE: &str = "attempts.json";

/// The failed commits of a kept upper.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Attempts {
    pub count: u32,
    /// Seconds since the epoch.
    pub first_failed_at: u64,
    pub next_try_at: u64,
    pub last_error: String,
}

/// How a host's volume commits ended, counted since the daemon started.
#[derive(Debug, Default)]
pub struct CommitCounts {
    committed: AtomicU64,
    rebased: AtomicU64,
    conflict: AtomicU64,
    kept: AtomicU64,
    failed: AtomicU64,
}

/// A snapshot of [`CommitCounts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitStats {
    /// Landed on the head the mount last saw.
    pub committed: u64,
    /// Landed on top of commits that other mounts made since.
    pub rebased: u64,
    /// Touched paths a newer commit changed: kept as a conflict record.
    pub conflict: u64,
    /// Failed at a mount's end: its upper kept on this host, to be retried.
    pub kept: u64,
    /// Failed attempts of any kind (at a mount's end, `strata commit`, a retry of a kept
    /// upper); a failure at a mount's end counts here and as kept.
    pub failed: u64,
}

impl CommitCounts {
    /// Counts how one commit ended; a commit that found nothing to commit is not counted.
    pub fn record(&self, result: &FsResult<volume::Committed>) {
        let counter = match result {
            Ok(c) if c.conflict.is_some() => &self.conflict,
            Ok(c) if c.commit.is_none() => return,
            Ok(c) if c.rebased => &self.rebased,
            Ok(_) => &self.committed,
            Err(_) => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn kept(&self) {
        self.kept.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CommitStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CommitStats {
            committed: get(&self.committed),
            rebased: get(&self.rebased),
            conflict: get(&self.conflict),
            kept: get(&self.kept),
            failed: get(&self.failed),
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Attempts {
    pub fn read(dir: &Path) -> Attempts {
        std::fs::read(dir.join(ATTEMPTS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn due(&self) -> bool {
        now_secs() >= self.next_try_at
    }

    /// Counts a failure and schedules the next try; returns whether to quarantine.
    pub fn failed(&mut self, why: String) -> bool {
        let now = now_secs();
        if self.count == 0 {
            self.first_failed_at = now;
        }
        self.count += 1;
        self.last_error = why;
        let backoff = RETRY_EVERY
            .saturating_mul(1 << (self.count - 1).min(16))
            .min(BACKOFF_MAX);
        self.next_try_at = now + backoff.as_secs();
        self.count >= QUARANTINE_AFTER
    }

    /// Writes the record durably (temp file, sync, rename): the count must survive the
    /// crash it exists to count.
    pub fn write(&self, dir: &Path) -> FsResult<()> {
        let path = dir.join(ATTEMPTS_FILE);
        let tmp = dir.join(format!("{ATTEMPTS_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| FsError::io(&path, e))
    }
}

/// Moves a kept upper out of the retry loop into `<state-dir>/quarantine/`.
pub fn quarantine(state_dir: &Path, dir: &Path) -> FsResult<PathBuf> {
    let root = state_dir.join("quarantine");
    std::fs::create_dir_all(&root).map_err(|e| FsError::io(&root, e))?;
    let to = root.join(dir.file_name().unwrap_or_default());
    std::fs::rename(dir, &to)
        .map_err(|e| FsError::io(dir, e))
        .with_context(|| format!("moving it to {}", to.display()))?;
    Ok(to)
}

/// The quarantined uppers, oldest first.
pub fn quarantined(state_dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(state_dir.join("quarantine"))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// This host's name, for the kept-upper records in the store.
pub fn host_name() -> String {
    // The node name of this UTS namespace, which is what glibc's gethostname copies out of
    // uname(2) (at most 64 bytes: no buffer to size, no truncation to handle).
    let uname = rustix::system::uname();
    let name: String = String::from_utf8_lossy(uname.nodename().to_bytes())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        "host".into()
    } else {
        name
    }
}

/// The store record of the kept upper in `dir`.
pub fn kept_record(
    dir: &Path,
    record: &VolumeRecord,
    attempts: &Attempts,
    quarantined: bool,
) -> volume::KeptRecord {
    let name = dir
        .file_name()
        .map_or("kept".into(), |n| n.to_string_lossy().into_owned());
    let host = host_name();
    // At most 128 bytes, cut at a character (an operator may name a directory anything).
    let id: String = format!("{host}-{name}")
        .char_indices()
        .take_while(|(i, c)| i + c.len_utf8() <= 128)
        .map(|(_, c)| c)
        .collect();
    volume::KeptRecord {
        id,
        host,
        path: dir.display().to_string(),
        since: attempts.first_failed_at,
        attempts: attempts.count,
        last_error: attempts.last_error.clone(),
        quarantined,
        // In a tenant's home, the datasets' layers are another store's: not its to keep.
        layers: record.layers[record.datasets.min(record.layers.len())..].to_vec(),
    }
}

/// For a kept upper of a volume in a home of its own (see [`VolumeRecord::datasets_store`]):
/// the record for the datasets' store, naming the datasets' layers under it, so that their
/// collector keeps them until the upper is committed.
pub fn kept_record_of_datasets(
    dir: &Path,
    record: &VolumeRecord,
    attempts: &Attempts,
    quarantined: bool,
) -> Option<volume::KeptRecord> {
    record.datasets_store.as_ref()?;
    let mut kept = kept_record(dir, record, attempts, quarantined);
    kept.layers = record.layers[..record.datasets.min(record.layers.len())].to_vec();
    Some(kept)
}

/// What a volume mount's upper belongs to: enough to commit it without the mount.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub store: String,
    pub endpoint_url: Option<String>,
    pub volume: String,
    /// The head the mount started from, and the store version it was read at.
    pub head: VolumeHead,
    pub version: Option<String>,
    /// Every layer under the upper, bottom to top (the datasets', then the volume's chain).
    pub layers: Vec<String>,
    /// The head the mount started from, once it has committed (then `head` is the head its
    /// last commit wrote).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<VolumeHead>,
    /// The layers of the mount's commits that landed, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub own: Vec<String>,
    /// The tenant the mount was made for: its upper is committed with the tenant's
    /// credential, never the daemon's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// When the volume is in a store of its own (a tenant's home, `store`), the store of the
    /// datasets under it, which holds the first `datasets` of `layers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datasets_store: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub datasets: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl VolumeRecord {
    /// What the mount's earlier commits leave for the next one (see [`volume::Earlier`]):
    /// the origin head, its own layers, and the last one's manifest, loaded.
    pub async fn earlier(
        &self,
        store: &Arc<dyn Store>,
        cache_dir: Option<&Path>,
    ) -> FsResult<Option<(VolumeHead, Vec<String>, Layer)>> {
        earlier_of(store, self.origin.as_ref(), &self.own, cache_dir).await
    }
}

async fn earlier_of(
    store: &Arc<dyn Store>,
    origin: Option<&VolumeHead>,
    own: &[String],
    cache_dir: Option<&Path>,
) -> FsResult<Option<(VolumeHead, Vec<String>, Layer)>> {
    let (Some(origin), Some(last)) = (origin, own.last()) else {
        return Ok(None);
    };
    let digest = Digest::parse(last)
        .map_err(|e| FsError::InvalidInput(format!("the mount's last commit: {e}")))?;
    let layer = Layer::load(store, digest, cache_dir)
        .await
        .with_context(|| format!("loading the mount's last commit, layer {last}"))?;
    Ok(Some((origin.clone(), own.to_vec(), layer)))
}

/// A mount of a persistent volume: what to commit to, from which head.
pub struct VolumeMount {
    pub volume: VolumeRef,
    pub store: Arc<dyn Store>,
    endpoint_url: Option<String>,
    /// Every layer under the upper, bottom to top.
    layers: Vec<Digest>,
    /// Where the mount's next commit goes; one commit at a time.
    base: tokio::sync::Mutex<Base>,
    /// Squash the volume after a commit that leaves more commits than this (0: never).
    squash_after: usize,
    cache_dir: Option<PathBuf>,
    counts: Arc<CommitCounts>,
    /// The layer of the last commit of the head the mount started from, squashes opened up
    /// (`""` for an empty head): what its mount lease names (see `MountLease::volumes`).
    origin_tip: String,
    /// The tenant the mount is for (recorded with a kept upper).
    tenant: Option<String>,
    /// When `store` is the volume's own (a tenant's home): the datasets' store and how many
    /// of `layers` are its.
    datasets: Option<(String, usize)>,
}

struct Base {
    head: VolumeHead,
    version: Option<Version>,
    /// The upper's state at its last commit (see `MountTree::fingerprint`): a commit finding
    /// the same has nothing new.
    committed: Option<String>,
    /// The head the mount started from.
    origin: VolumeHead,
    /// The layers the mount's commits that landed published, oldest first.
    own: Vec<String>,
    /// The last of them, once loaded: a commit with nothing new needs no store.
    last: Option<Layer>,
}

impl VolumeMount {
    /// Records that the mount is made for `tenant` (its kept upper is committed as it).
    pub fn for_tenant(&mut self, tenant: Option<String>) {
        self.tenant = tenant;
    }

    /// Records that the volume's store is its own and the first `count` layers under the
    /// upper are those of the datasets in `store` (URL).
    pub fn in_home(&mut self, store: String, count: usize) {
        self.datasets = Some((store, count));
    }

    pub fn new(
        volume: VolumeRef,
        store: Arc<dyn Store>,
        endpoint_url: Option<String>,
        head: VolumeHead,
        version: Option<Version>,
    ) -> VolumeMount {
        let origin_tip = volume::expand(&head.commits)
            .last()
            .map_or(String::new(), |c| c.layer.clone());
        VolumeMount {
            origin_tip,
            tenant: None,
            datasets: None,
            volume,
            store,
            endpoint_url,
            layers: Vec::new(),
            base: tokio::sync::Mutex::new(Base {
                origin: head.clone(),
                head,
                version,
                committed: None,
                own: Vec::new(),
                last: None,
            }),
            squash_after: 0,
            cache_dir: None,
            counts: Arc::default(),
        }
    }

    /// What the mount's lease says of it: the volume, and the last commit of the head it
    /// started from (see `MountLease::volumes`).
    pub fn lease_origin(&self) -> (String, String) {
        (self.volume.to_string(), self.origin_tip.clone())
    }

    /// Counts this mount's commits into `counts` (the host's).
    pub fn count_commits(&mut self, counts: Arc<CommitCounts>) {
        self.counts = counts;
    }

    /// Squashes the volume after a commit that leaves more than `commits` commits (0:
    /// never); the chain's manifests are read from `cache_dir`.
    pub fn squash_after(&mut self, commits: usize, cache_dir: PathBuf) {
        self.squash_after = commits;
        self.cache_dir = Some(cache_dir);
    }

    /// Sets the layers the upper stands on (the record names them).
    pub fn set_layers(&mut self, layers: Vec<Digest>) {
        self.layers = layers;
    }

    /// Writes the record into the mount's scratch, durably: the journal is useless without it.
    pub fn write_record(&self, scratch: &Path) -> FsResult<()> {
        let base = self
            .base
            .try_lock()
            .map_err(|_| FsError::Errno(libc::EBUSY))
            .context("the volume is being committed")?;
        self.write_record_with(scratch, &base)
    }

    fn write_record_with(&self, scratch: &Path, base: &Base) -> FsResult<()> {
        let record = VolumeRecord {
            store: self.store.url().to_string(),
            endpoint_url: self.endpoint_url.clone(),
            volume: self.volume.to_string(),
            head: base.head.clone(),
            version: base.version.as_ref().map(|v| v.0.clone()),
            layers: self.layers.iter().map(|d| d.to_string()).collect(),
            origin: (!base.own.is_empty()).then(|| base.origin.clone()),
            own: base.own.clone(),
            tenant: self.tenant.clone(),
            datasets_store: self.datasets.as_ref().map(|(url, _)| url.clone()),
            datasets: self.datasets.as_ref().map_or(0, |(_, n)| *n),
        };
        let path = scratch.join(RECORD_FILE);
        let tmp = scratch.join(format!("{RECORD_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            std::fs::write(&tmp, serde_json::to_vec_pretty(&record)?)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(scratch)?.sync_all()
        };
        write().map_err(|e| FsError::io(&path, e))
    }

    /// Commits what the mount changed so far; the mount goes on. Each commit of a mount
    /// carries all its changes since it was mounted, on top of the head its previous commit
    /// wrote; one with nothing new since that commit does nothing.
    pub async fn commit(&self, tree: &MountTree, scratch: &Path) -> FsResult<volume::Committed> {
        let mut base = self.base.lock().await;
        if base.last.is_none() && !base.own.is_empty() {
            let loaded = earlier_of(
                &self.store,
                Some(&base.origin),
                &base.own,
                self.cache_dir.as_deref(),
            )
            .await?;
            base.last = loaded.map(|(.., layer)| layer);
        }
        let committed = volume::commit_since(
            &self.store,
            &self.volume,
            tree,
            (&base.head, base.version.as_ref()),
            base.last.as_ref().map(|last| volume::Earlier {
                origin: &base.origin,
                own: &base.own,
                last: &last.manifest,
            }),
            base.committed.as_deref(),
        )
        .await
        .with_context(|| format!("committing volume {}", self.volume));
        self.counts.record(&committed);
        let committed = committed?;
        if let Some(upper) = &committed.upper {
            base.committed = Some(upper.clone());
        }
        if let (Some((head, version)), Some(c)) = (&committed.head, &committed.commit) {
            base.head = head.clone();
            base.version = Some(version.clone());
            base.own.push(c.published().to_string());
            // Loaded now, while the store answers, so that a later commit with nothing new
            // (an unmount) needs none; else it is loaded then.
            base.last = match Digest::parse(c.published()) {
                Ok(d) => Layer::load(&self.store, d, self.cache_dir.as_deref())
                    .await
                    .ok(),
                Err(_) => None,
            };
            if self.squash_after > 0 && base.head.commits.len() > self.squash_after {
                match volume::squash(&self.store, &self.volume, self.cache_dir.as_deref()).await {
                    Ok(Some((head, version))) => {
                        tracing::info!(
                            "volume {}: squashed {} commits into layer {}",
                            self.volume,
                            base.head.commits.len(),
                            head.commits[0].layer
                        );
                        base.head = head;
                        base.version = Some(version);
                    }
                    Ok(None) => {}
                    // The commit stands; the next one squashes.
                    Err(e) => tracing::warn!("volume {}: squash failed: {e}", self.volume),
                }
            }
            // A crash from here on commits again on top of this head, not the old one.
            if scratch.exists() {
                self.write_record_with(scratch, &base)?;
            }
        }
        log_committed(&self.volume, &committed);
        Ok(committed)
    }

    /// Commits `tree`'s changes when its session has ended. On failure the upper, its
    /// journal written, is moved to `<state-dir>/uncommitted/` to be retried: never dropped.
    pub fn commit_after(
        &self,
        tree: &MountTree,
        runtime: &tokio::runtime::Handle,
        scratch: &Path,
        state_dir: &Path,
    ) -> CommitEnd {
        match runtime.block_on(self.commit(tree, scratch)) {
            Ok(c) => match c.conflict_message(&self.volume) {
                Some(message) => CommitEnd::Conflict(message),
                None => CommitEnd::Clean,
            },
            Err(e) => {
                let saved = tree.save_journal();
                let kept = uncommitted_dir(state_dir, scratch);
                let moved = saved.is_ok()
                    && std::fs::create_dir_all(state_dir.join("uncommitted")).is_ok()
                    && std::fs::rename(scratch, &kept).is_ok();
                let message = if moved {
                    format!(
                        "volume {}: {e}; the upper is kept in {} and retried every {}s",
                        self.volume,
                        kept.display(),
                        RETRY_EVERY.as_secs()
                    )
                } else {
                    format!(
                        "volume {}: {e}; the upper stays in {}",
                        self.volume,
                        scratch.display()
                    )
                };
                tracing::error!("{message}");
                self.counts.kept();
                CommitEnd::Kept(message)
            }
        }
    }
}

/// How a volume mount's last commit ended.
pub enum CommitEnd {
    /// Committed (or nothing to commit): the scratch may go.
    Clean,
    /// Kept as a conflict in the store: the scratch may go; the message says where.
    Conflict(String),
    /// Not committed: the upper is kept for a retry.
    Kept(String),
}

fn log_committed(v: &VolumeRef, c: &volume::Committed) {
    if let Some(message) = c.conflict_message(v) {
        tracing::error!("{message}");
        return;
    }
    match (&c.commit, &c.report) {
        (Some(commit), Some(report)) => tracing::info!(
            "committed volume {v}: layer {}, {} changes, {} bytes uploaded",
            commit.layer,
            commit.changes,
            report.bytes_uploaded
        ),
        _ => tracing::info!("volume {v}: nothing to commit"),
    }
}

fn uncommitted_dir(state_dir: &Path, scratch: &Path) -> PathBuf {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let id = scratch
        .file_name()
        .map_or("x".into(), |n| n.to_string_lossy());
    state_dir
        .join("uncommitted")
        .join(format!("{stamp:x}-{id}"))
}

/// At start: removes the scratch uppers a crashed daemon left behind (their mounts are gone),
/// except volume uppers, which move to `uncommitted/` to be committed.
pub fn clean_scratch(state_dir: &Path) -> FsResult<()> {
    let root = state_dir.join("scratch");
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let path = e.path();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && path.join(RECORD_FILE).exists() {
            let kept = uncommitted_dir(state_dir, &path);
            std::fs::create_dir_all(state_dir.join("uncommitted"))
                .and_then(|()| std::fs::rename(&path, &kept))
                .map_err(|e| FsError::io(&path, e))
                .context("setting aside a volume upper")?;
            tracing::warn!(
                "volume upper {} was left by an earlier run; committing it from {}",
                path.display(),
                kept.display()
            );
            continue;
        }
        tracing::warn!("removing scratch {} left by an earlier run", path.display());
        let removed = if is_dir {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| FsError::io(&path, e))?;
    }
    Ok(())
}

/// The kept uppers waiting for a commit, oldest first.
pub fn kept_uppers(state_dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(state_dir.join("uncommitted"))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .filter(|p| {
                    // A staging dir an older version left in a crash: nothing to keep.
                    let staging = p.extension().is_some_and(|x| x == "stage");
                    if staging {
                        let _ = std::fs::remove_dir_all(p);
                    }
                    !staging
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

pub fn read_record(dir: &Path) -> FsResult<VolumeRecord> {
    let path = dir.join(RECORD_FILE);
    let bytes = std::fs::read(&path).map_err(|e| FsError::io(&path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        FsError::io(
            &path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        )
    })
}

/// Commits a kept upper in `dir` (see the module docs) through `store` (the volume's,
/// `record.store`), reading with `reader` (of the datasets' store, `record.datasets_store`
/// when the volume is in a home of its own, else of `store`); on success (or when there is
/// nothing to recover) the directory is removed. An error leaves it for next time.
pub async fn commit_kept(
    dir: &Path,
    record: &VolumeRecord,
    store: Arc<dyn Store>,
    reader: ChunkReader,
    cache_dir: &Path,
    counts: &CommitCounts,
) -> FsResult<()> {
    let v = VolumeRef::parse(&record.volume)?;
    if !dir.join(crate::upper::JOURNAL_FILE).exists() {
        // Nothing was fsync'ed before the crash: there is nothing it promised to keep.
        tracing::warn!(
            "volume {v}: the upper in {} has no journal (nothing was fsync'ed); dropping it",
            dir.display()
        );
        std::fs::remove_dir_all(dir).map_err(|e| FsError::io(dir, e))?;
        return Ok(());
    }
    let in_home = record.datasets_store.is_some();
    let home_reader = reader.with_store(Arc::clone(&store));
    let mut layers = Vec::new();
    for (i, l) in record.layers.iter().enumerate() {
        let digest = Digest::parse(l).map_err(|e| {
            FsError::InvalidInput(format!("{}: {e}", dir.join(RECORD_FILE).display()))
        })?;
        layers.push(if in_home && i >= record.datasets {
            Layer::load(&store, digest, Some(cache_dir))
                .await?
                .read_through(home_reader.clone())
        } else {
            Layer::load(reader.store(), digest, Some(cache_dir)).await?
        });
    }
    let mut stack = LayerStack::new(layers, reader)?;
    if in_home {
        stack = stack.with_home_from(record.datasets);
    }
    let stack = Arc::new(stack);
    let upper = UpperConfig::journaled(dir.to_path_buf());
    let tree = crate::blocking::blocking(|| MountTree::recover(stack, upper))?;
    let version = record.version.clone().map(Version);
    let earlier = record.earlier(&store, Some(cache_dir)).await?;
    let earlier = earlier.as_ref().map(|(origin, own, last)| volume::Earlier {
        origin,
        own,
        last: &last.manifest,
    });
    let committed = volume::commit(&store, &v, &tree, (&record.head, version.as_ref()), earlier)
        .await
        .with_context(|| format!("committing volume {v} from {}", dir.display()));
    counts.record(&committed);
    let committed = committed?;
    log_committed(&v, &committed);
    drop(tree);
    std::fs::remove_dir_all(dir).map_err(|e| FsError::io(dir, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kept upper of a volume in a home: the home's record names the volume's layers only
    /// (the home's collector would take a dataset layer for a missing one), the datasets'
    /// store's names the datasets' layers; a volume in the datasets' store has one record.
    #[test]
    fn a_kept_upper_in_a_home_is_recorded_in_each_store_with_its_own_layers() {
        let dir = tempfile::tempdir().unwrap();
        let layers: Vec<String> = (0..5u8).map(|i| Digest::of(&[i]).to_string()).collect();
        let mut record = VolumeRecord {
            store: "s3://homes/alice".into(),
            endpoint_url: None,
            volume: "alice/notes".into(),
            head: VolumeHead {
                version: 1,
                commits: Vec::new(),
            },
            version: None,
            layers: layers.clone(),
            origin: None,
            own: Vec::new(),
            tenant: Some("alice".into()),
            datasets_store: Some("s3://data".into()),
            datasets: 2,
        };
        let attempts = Attempts::read(dir.path());
        let home = kept_record(dir.path(), &record, &attempts, false);
        assert_eq!(home.layers, layers[2..]);
        let data = kept_record_of_datasets(dir.path(), &record, &attempts, false).unwrap();
        assert_eq!(data.layers, layers[..2]);
        assert_eq!(data.id, home.id, "one upper, one id in both stores");
        // A record from a damaged state dir cannot make it panic.
        record.datasets = 99;
        assert!(kept_record(dir.path(), &record, &attempts, false)
            .layers
            .is_empty());
        assert_eq!(
            kept_record_of_datasets(dir.path(), &record, &attempts, false)
                .unwrap()
                .layers,
            layers
        );
        record.datasets_store = None;
        record.datasets = 0;
        assert_eq!(
            kept_record(dir.path(), &record, &attempts, false).layers,
            layers
        );
        assert!(kept_record_of_datasets(dir.path(), &record, &attempts, false).is_none());
    }

    #[test]
    fn a_failing_upper_waits_longer_each_time_then_is_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let kept = state.join("uncommitted").join("1-abc");
        std::fs::create_dir_all(&kept).unwrap();
        std::fs::write(kept.join("journal"), b"records").unwrap();
        let mut a = Attempts::read(&kept);
        assert!(a.due(), "a new upper is tried at once");
        let mut waits = Vec::new();
        for n in 1..=QUARANTINE_AFTER {
            let give_up = a.failed(format!("try {n}"));
            a.write(&kept).unwrap();
            waits.push(a.next_try_at.saturating_sub(now_secs()));
            assert_eq!(give_up, n == QUARANTINE_AFTER, "try {n}");
            assert!(
                !Attempts::read(&kept).due(),
                "try {n} is not due again at once"
            );
        }
        // 30 s, 60 s, 120 s, … capped at an hour (a second of slack for the clock).
        assert!((29..=30).contains(&waits[0]), "{waits:?}");
        assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
        assert!(*waits.last().unwrap() <= 3600, "{waits:?}");
        let read = Attempts::read(&kept);
        assert_eq!(read.count, QUARANTINE_AFTER);
        assert_eq!(read.last_error, format!("try {QUARANTINE_AFTER}"));

        let to = quarantine(&state, &kept).unwrap();
        assert!(!kept.exists());
        assert_eq!(std::fs::read(to.join("journal")).unwrap(), b"records");
        assert_eq!(quarantined(&state), vec![to.clone()]);
        assert!(
            kept_uppers(&state).is_empty(),
            "a quarantined upper is not retried"
        );
    }
}
