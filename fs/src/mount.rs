//! Mount assembly, in one place for every kind of mount (the daemon's, a foreground
//! `strata mount`, an embedder's): resolve dataset refs, load their layers, stack a volume's
//! committed chain on top, and build the [`MountTree`] with its upper.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cache::ChunkReader;
use strata_cache_format::Digest;
use strata_store::Store;

use crate::error::{Context, FsError, FsResult};
use crate::layer::Layer;
use crate::prefetch::{self, Recorder, ReplayProgress};
use crate::refs::signed::Trust;
use crate::refs::{self, DatasetRef};
use crate::stack::LayerStack;
use crate::upper::{MountTree, UpperConfig};
use crate::volume::lifecycle::{CommitCounts, VolumeMount};
use crate::volume::{self, VolumeRef};

/// Inodes a mount's upper may make unless the mount says otherwise: it bounds what one
/// function can make the host remember.
pub const DEFAULT_SCRATCH_INODES: u64 = 2_000_000;

/// What to stack, and where its manifests are cached.
#[derive(Debug, Clone, Default)]
pub struct StackSpec {
    /// Dataset refs (`NAME:TAG`, `NAME@blake3:…`), bottom to top.
    pub datasets: Vec<String>,
    /// A persistent volume: its committed chain goes on top of the datasets, and the mount's
    /// changes are committed to it.
    pub volume: Option<VolumeRef>,
    /// The endpoint the store was opened with (recorded so a kept upper reopens the same store).
    pub endpoint_url: Option<String>,
    /// Layer manifests are cached here (and read back from here).
    pub cache_dir: Option<PathBuf>,
    /// Squash the volume after a commit that leaves more commits than this (0: never).
    pub squash_after: usize,
    /// Record what the mount's function reads first, for the layers' start records (see
    /// [`crate::prefetch`]); [`Assembly::recorder`] has it.
    pub record_start: bool,
    /// Where the volume's commits are counted (the host's counts); none: not counted.
    pub commit_counts: Option<Arc<CommitCounts>>,
    /// The publishers' keys dataset refs must be signed by (none, or no keys: not checked).
    pub trust: Option<Arc<Trust>>,
    /// The tenant the mount is for (recorded with a volume's kept upper).
    pub tenant: Option<String>,
}

/// A layer of an assembled stack, named as the mount asked for it.
#[derive(Debug, Clone)]
pub struct StackedLayer {
    /// The dataset ref, or `SCOPE/NAME commit N` for a volume's commits.
    pub name: String,
    pub digest: Digest,
}

/// A stack ready to mount.
pub struct Assembly {
    pub stack: Arc<LayerStack>,
    /// Bottom to top, as named.
    pub layers: Vec<StackedLayer>,
    /// The volume the mount commits to, if any.
    pub volume: Option<Arc<VolumeMount>>,
}

/// Resolves dataset refs (checked against `trust`) and loads their layers, in the order
/// given.
pub async fn load_layers(
    store: &Arc<dyn Store>,
    datasets: &[String],
    cache_dir: Option<&Path>,
    trust: Option<&Trust>,
) -> FsResult<Vec<Layer>> {
    let mut layers = Vec::new();
    for r in datasets {
        let parsed = DatasetRef::parse(r)?;
        let digest = refs::resolve_trusted(store, &parsed, trust).await?;
        let layer = Layer::load(store, digest, cache_dir)
            .await
            .with_context(|| format!("loading dataset {parsed}"))?;
        layers.push(layer);
    }
    Ok(layers)
}

/// Loads what `spec` names from `store` and stacks it, reading chunks through `reader`.
pub async fn assemble(
    store: &Arc<dyn Store>,
    reader: ChunkReader,
    spec: &StackSpec,
) -> FsResult<Assembly> {
    let cache_dir = spec.cache_dir.as_deref();
    let mut layers = load_layers(store, &spec.datasets, cache_dir, spec.trust.as_deref()).await?;
    let mut named: Vec<StackedLayer> = spec
        .datasets
        .iter()
        .zip(&layers)
        .map(|(name, layer)| StackedLayer {
            name: name.clone(),
            digest: layer.digest,
        })
        .collect();
    let volume = match &spec.volume {
        Some(v) => {
            let (head, version) = volume::read_head(store, v).await?;
            for (i, digest) in head.layers()?.into_iter().enumerate() {
                let layer = Layer::load(store, digest, cache_dir)
                    .await
                    .with_context(|| format!("loading commit {} of volume {v}", i + 1))?;
                named.push(StackedLayer {
                    name: format!("{v} commit {}", i + 1),
                    digest,
                });
                layers.push(layer);
            }
            if layers.is_empty() {
                // A volume on its own: its chain needs something to stand on.
                layers.push(empty_layer(store, cache_dir).await?);
            }
            let mut vm = VolumeMount::new(
                v.clone(),
                store.clone(),
                spec.endpoint_url.clone(),
                head,
                version,
            );
            vm.set_layers(layers.iter().map(|l| l.digest).collect());
            vm.for_tenant(spec.tenant.clone());
            if let Some(dir) = cache_dir {
                vm.squash_after(spec.squash_after, dir.to_path_buf());
            }
            if let Some(counts) = &spec.commit_counts {
                vm.count_commits(Arc::clone(counts));
            }
            Some(Arc::new(vm))
        }
        None => None,
    };
    if layers.is_empty() {
        return Err(FsError::InvalidInput(
            "a mount needs at least one layer (or a volume)".into(),
        ));
    }
    let mut stack = LayerStack::new(layers, reader)?;
    if spec.record_start {
        stack = stack.with_recorder(Arc::new(Recorder::new()));
    }
    Ok(Assembly {
        stack: Arc::new(stack),
        layers: named,
        volume,
    })
}

/// A mount's start-record work (see [`Assembly::start_prefetch`]).
pub struct StartTasks {
    stack: Arc<LayerStack>,
    replay: Option<tokio::task::JoinHandle<()>>,
    progress: Arc<ReplayProgress>,
    recorder: Option<Arc<Recorder>>,
    save: Option<tokio::task::JoinHandle<()>>,
}

impl StartTasks {
    /// How far the replay has come.
    pub fn progress(&self) -> &Arc<ReplayProgress> {
        &self.progress
    }

    /// Stops replaying and the mount's other background fetches, and ends the recording
    /// (which is then saved, in the background). Dropping the tasks does the same.
    pub fn mount_ended(&self) {
        self.stack.close();
        if let Some(r) = &self.replay {
            r.abort();
        }
        self.progress.finish();
        if let Some(r) = &self.recorder {
            r.finish();
        }
    }

    /// Waits until the recording is saved (or was not kept); a process that is about to exit
    /// calls it after [`StartTasks::mount_ended`].
    pub async fn saved(mut self) {
        if let Some(save) = self.save.take() {
            let _ = save.await;
        }
    }
}

impl Drop for StartTasks {
    fn drop(&mut self) {
        self.mount_ended();
    }
}

/// A mount's writable upper.
#[derive(Debug, Clone)]
pub struct UpperSpec {
    /// Made private (0700) if missing; the caller removes it when the mount is done.
    pub dir: PathBuf,
    /// Bytes the upper may take on disk.
    pub quota: Option<u64>,
    /// Records the upper may hold ([`DEFAULT_SCRATCH_INODES`] when `None`).
    pub inodes: Option<u64>,
}

impl Assembly {
    /// The mount's recording of what its function reads first, if it records one.
    pub fn recorder(&self) -> Option<&Arc<Recorder>> {
        self.stack.recorder()
    }

    /// Starts, on the current runtime, what the mount does for the layers' start records:
    /// fetching what they say starts read first (`replay`), and saving what this mount's
    /// function reads first once its start is over (if it records). Call
    /// [`StartTasks::mount_ended`] when the mount ends.
    /// Start records are read from `store` and saved to `records` (the daemon's own
    /// credential, for a tenant's mount).
    pub fn start_prefetch(
        &self,
        store: &Arc<dyn Store>,
        records: &Arc<dyn Store>,
        replay: bool,
    ) -> StartTasks {
        let progress = Arc::new(ReplayProgress::default());
        if !replay {
            progress.finish();
        }
        let replay = replay.then(|| {
            let (stack, store, progress) = (self.stack.clone(), store.clone(), progress.clone());
            tokio::spawn(async move {
                let report = prefetch::replay(stack, store, progress).await;
                if report.records > 0 {
                    tracing::info!(
                        records = report.records,
                        files = report.files,
                        bytes = report.bytes_fetched,
                        "start records replayed"
                    );
                }
            })
        });
        let recorder = self.recorder().cloned();
        let save = recorder.as_ref().map(|rec| {
            let (rec, store) = (rec.clone(), records.clone());
            let layers: Vec<Digest> = self.stack.layers().iter().map(|l| l.digest).collect();
            tokio::spawn(prefetch::save_when_done(rec, store, layers))
        });
        StartTasks {
            stack: self.stack.clone(),
            replay,
            progress,
            recorder,
            save,
        }
    }

    /// The mount's tree: the stack with `upper` on it (read-only without one). A volume
    /// mount's upper is journaled, and its record written first, so a crash can commit it.
    pub fn tree(&self, upper: Option<&UpperSpec>) -> FsResult<Arc<MountTree>> {
        let upper = match upper {
            Some(u) => {
                make_private_dir(&u.dir)?;
                if let Some(volume) = &self.volume {
                    volume.write_record(&u.dir)?;
                }
                Some(UpperConfig {
                    dir: u.dir.clone(),
                    quota: u.quota,
                    inodes: Some(u.inodes.unwrap_or(DEFAULT_SCRATCH_INODES)),
                    journal: self.volume.is_some(),
                })
            }
            None if self.volume.is_some() => {
                return Err(FsError::InvalidInput(
                    "a volume mount needs a writable upper".into(),
                ))
            }
            None => None,
        };
        Ok(Arc::new(MountTree::new(self.stack.clone(), upper)?))
    }
}

/// A layer holding only an empty root (published once; it is content-addressed).
async fn empty_layer(store: &Arc<dyn Store>, cache_dir: Option<&Path>) -> FsResult<Layer> {
    let dir = tempfile::tempdir().map_err(|e| FsError::io(std::env::temp_dir(), e))?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .map_err(|e| FsError::io(dir.path(), e))?;
    let report = crate::publish::publish_unleased(dir.path(), store).await?;
    let digest = report
        .layer
        .ok_or_else(|| FsError::InvalidInput("publishing an empty layer made no layer".into()))?;
    Layer::load(store, digest, cache_dir).await
}

/// Makes `dir` (and its parents) readable by its owner only: an upper holds one invocation's
/// files.
fn make_private_dir(dir: &Path) -> FsResult<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| FsError::io(dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| FsError::io(dir, e))
}
