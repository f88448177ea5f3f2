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
    /// The store the volume lives in when not the datasets' (a tenant's home, opened with
    /// the tenant's credential): its head, its chain's layers and every byte its commits
    /// store are there, and its manifests name packs of that store only.
    pub volume_home: Option<Arc<dyn Store>>,
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
    let datasets = layers.len();
    let home_reader = spec
        .volume_home
        .as_ref()
        .map(|home| reader.with_store(Arc::clone(home)));
    let volume = match &spec.volume {
        Some(v) => {
            let vstore = spec.volume_home.as_ref().unwrap_or(store);
            let in_home = |layer: Layer| match &home_reader {
                Some(r) => layer.read_through(r.clone()),
                None => layer,
            };
            let (head, version) = volume::read_head(vstore, v).await?;
            for (i, digest) in head.layers()?.into_iter().enumerate() {
                let layer = Layer::load(vstore, digest, cache_dir)
                    .await
                    .with_context(|| format!("loading commit {} of volume {v}", i + 1))?;
                named.push(StackedLayer {
                    name: format!("{v} commit {}", i + 1),
                    digest,
                });
                layers.push(in_home(layer));
            }
            if layers.is_empty() {
                // A volume on its own: its chain needs something to stand on.
                layers.push(in_home(empty_layer(vstore, cache_dir).await?));
            }
            let mut vm = VolumeMount::new(
                v.clone(),
                vstore.clone(),
                spec.endpoint_url.clone(),
                head,
                version,
            );
            vm.set_layers(layers.iter().map(|l| l.digest).collect());
            vm.for_tenant(spec.tenant.clone());
            if spec.volume_home.is_some() {
                vm.in_home(store.url().to_string(), datasets);
            }
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
    if spec.volume.is_some() && spec.volume_home.is_some() {
        stack = stack.with_home_from(datasets);
    }
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
            let layers: Vec<Digest> = self
                .stack
                .recorded_layers()
                .iter()
                .map(|l| l.digest)
                .collect();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::{publish, PublishOptions};
    use crate::stack::tests::{pseudo_random, write};
    use crate::stack::ROOT_INO;
    use strata_store::{open_store, StoreOptions};

    async fn local(dir: &Path) -> Arc<dyn Store> {
        open_store(dir.to_str().unwrap(), &StoreOptions::default())
            .await
            .unwrap()
    }

    fn reader_of(store: &Arc<dyn Store>, disk: &Path) -> ChunkReader {
        cache::ChunkCache::new(&cache::CacheConfig {
            disk_capacity: 1 << 30,
            disk_dir: Some(disk.to_path_buf()),
            memory_capacity: 1 << 20,
            fetch_deadline: cache::DEFAULT_FETCH_DEADLINE,
        })
        .unwrap()
        .reader(Arc::clone(store))
    }

    async fn read_file(tree: &MountTree, name: &[u8]) -> Vec<u8> {
        let a = tree.lookup(ROOT_INO, name).unwrap();
        tree.read(a.ino, 0, a.size as u32 + 1)
            .await
            .unwrap()
            .to_vec()
    }

    /// A volume in a home of its own: its commits store every byte they keep of the
    /// datasets' files in the home (renamed, partly rewritten, untouched but chmodded), so
    /// no manifest of the home names a pack of the datasets' store, and the datasets' store
    /// gets nothing; a fresh mount (new cache) reads it all back from the two stores.
    #[tokio::test]
    async fn a_volume_in_a_home_of_its_own_names_only_the_homes_packs() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, home) = (
            local(&tmp.path().join("data")).await,
            local(&tmp.path().join("home")).await,
        );
        let src = tmp.path().join("src");
        let (big, small) = (pseudo_random(5, 3 << 20), pseudo_random(6, 70_000));
        write(&src, "big.bin", &big);
        write(&src, "small.bin", &small);
        write(&src, "mode.txt", b"chmod me");
        let r = DatasetRef::parse("data:v1").unwrap();
        publish(
            &src,
            &data,
            Some(&r),
            &PublishOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
        let data_keys = data.list("").await.unwrap();

        let spec = |cache: &Path| StackSpec {
            datasets: vec!["data:v1".into()],
            volume: Some(VolumeRef::parse("t/v").unwrap()),
            cache_dir: Some(cache.to_path_buf()),
            volume_home: Some(Arc::clone(&home)),
            ..Default::default()
        };
        let cache1 = tmp.path().join("cache1");
        let a = assemble(
            &data,
            reader_of(&data, &cache1.join("disk")),
            &spec(&cache1),
        )
        .await
        .unwrap();
        let upper = UpperSpec {
            dir: tmp.path().join("upper"),
            quota: None,
            inodes: None,
        };
        let tree = a.tree(Some(&upper)).unwrap();
        let f = tree.lookup(ROOT_INO, b"big.bin").unwrap();
        tree.open(f.ino, true).unwrap();
        tree.write(f.ino, 1 << 20, b"rewritten").await.unwrap();
        tree.release(f.ino);
        let mut want_big = big.clone();
        want_big[1 << 20..(1 << 20) + 9].copy_from_slice(b"rewritten");
        tree.rename(ROOT_INO, b"small.bin", ROOT_INO, b"moved.bin", 0)
            .unwrap();
        let m = tree.lookup(ROOT_INO, b"mode.txt").unwrap();
        let chmod = crate::upper::SetAttr {
            mode: Some(0o600),
            ..Default::default()
        };
        tree.setattr(m.ino, chmod).await.unwrap();
        let vm = a.volume.clone().unwrap();
        let committed = vm.commit(&tree, &upper.dir).await.unwrap();
        assert!(committed.conflict.is_none());
        drop(tree);

        assert_eq!(
            data.list("").await.unwrap(),
            data_keys,
            "nothing new in the datasets' store"
        );
        let (head, _) = volume::read_head(&home, &VolumeRef::parse("t/v").unwrap())
            .await
            .unwrap();
        let home_packs = home.list("packs/").await.unwrap();
        for digest in head.layers().unwrap() {
            let layer = Layer::load(&home, digest, None).await.unwrap();
            for i in 0..layer.manifest.chunk_count() {
                let pack = layer.manifest.chunk(i).pack.to_hex();
                assert!(
                    home_packs.iter().any(|k| k.ends_with(&pack)),
                    "the home's layer names pack {pack}, which is not the home's"
                );
            }
        }

        let cache2 = tmp.path().join("cache2");
        let b = assemble(
            &data,
            reader_of(&data, &cache2.join("disk")),
            &spec(&cache2),
        )
        .await
        .unwrap();
        let upper2 = UpperSpec {
            dir: tmp.path().join("upper2"),
            ..upper
        };
        let tree = b.tree(Some(&upper2)).unwrap();
        assert!(read_file(&tree, b"big.bin").await == want_big);
        assert!(read_file(&tree, b"moved.bin").await == small);
        assert_eq!(read_file(&tree, b"mode.txt").await, b"chmod me");
        let m = tree.lookup(ROOT_INO, b"mode.txt").unwrap();
        assert_eq!(m.perm & 0o7777, 0o600);
        assert!(tree.lookup(ROOT_INO, b"small.bin").is_err());
    }
}
