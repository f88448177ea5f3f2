//! The daemon's mount leases: per store, one record naming the layers every mount of this
//! daemon reads, so that garbage collection keeps them while they are mounted, even after the
//! tags that named them moved (`docs/FORMAT.md` §9).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use strata_cache_format::Digest;
use strata_fs::error::{FsError, FsResult};
use strata_fs::gc::lease::{unique_id, MountLease, Timings};
use strata_store::Store;

/// One mount's part of a lease, to take it out again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseToken(u64);

/// One store's lease: what is written, and the gate that keeps its writes in order.
struct Held {
    store: Arc<dyn Store>,
    /// Its key: this daemon's, on this store.
    key: String,
    mounts: HashMap<LeaseToken, MountPart>,
    /// Held across a write of the lease (and only that), so a write of an older state never
    /// lands after a newer one.
    write: Arc<tokio::sync::Mutex<()>>,
}

/// What one mount adds to its store's lease.
struct MountPart {
    layers: Vec<Digest>,
    /// A volume mount: the volume and the last commit of the head it started from (see
    /// [`MountLease::volumes`]).
    volume: Option<(String, String)>,
}

pub struct MountLeases {
    daemon: String,
    /// By store URL. A std mutex, never held across an await.
    held: Mutex<HashMap<String, Held>>,
    next: AtomicU64,
}

impl MountLeases {
    pub fn new() -> MountLeases {
        MountLeases {
            daemon: unique_id(),
            held: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds the layers of a mount to the lease of `store` (at `endpoint`, if the mount named
    /// one) and writes it; the token takes them out again. `volume`: the volume a volume
    /// mount commits to and the last commit of the head it started from. Also says whether
    /// the lease is in the store now (its key), or why not.
    pub async fn add(
        &self,
        store: &Arc<dyn Store>,
        endpoint: Option<&str>,
        layers: Vec<Digest>,
        volume: Option<(String, String)>,
    ) -> (LeaseToken, FsResult<String>) {
        let token = LeaseToken(self.next.fetch_add(1, Ordering::Relaxed));
        let written = self.add_to(token, store, endpoint, layers, volume).await;
        (token, written)
    }

    /// [`MountLeases::add`] for a mount whose layers are in two stores (a tenant's volume
    /// home): its part in another store's lease, under the same token.
    pub async fn add_to(
        &self,
        token: LeaseToken,
        store: &Arc<dyn Store>,
        endpoint: Option<&str>,
        layers: Vec<Digest>,
        volume: Option<(String, String)>,
    ) -> FsResult<String> {
        // One store is one (URL, endpoint): two endpoints may serve buckets of one name.
        let name = match endpoint {
            Some(e) => format!("{} at {e}", store.url()),
            None => store.url().to_string(),
        };
        {
            let mut held = self.held();
            let h = held.entry(name.clone()).or_insert_with(|| Held {
                store: Arc::clone(store),
                key: MountLease::key(&self.daemon, &name),
                mounts: HashMap::new(),
                write: Default::default(),
            });
            h.mounts.insert(token, MountPart { layers, volume });
        }
        self.write(&name).await
    }

    /// Takes a mount out of its lease (rewriting it; a lease left empty is deleted).
    pub async fn remove(&self, token: LeaseToken) {
        for name in self.take_out(token) {
            let _ = self.write(&name).await;
        }
    }

    /// [`MountLeases::remove`] without waiting: the lease is rewritten in the background,
    /// or at the next renewal when no runtime is there to do it now.
    pub fn forget(self: &Arc<Self>, token: LeaseToken) {
        let names = self.take_out(token);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let this = Arc::clone(self);
            rt.spawn(async move {
                for name in names {
                    let _ = this.write(&name).await;
                }
            });
        }
    }

    fn take_out(&self, token: LeaseToken) -> Vec<String> {
        self.held()
            .iter_mut()
            .filter_map(|(name, h)| h.mounts.remove(&token).map(|_| name.clone()))
            .collect()
    }

    /// Writes the lease of store `name` as it stands when its turn comes; its key, written.
    async fn write(&self, name: &str) -> FsResult<String> {
        let Some(gate) = self.held().get(name).map(|h| Arc::clone(&h.write)) else {
            return Err(FsError::NotFound(format!("no mount lease for {name}")));
        };
        let _turn = gate.lock().await;
        let Some((store, key, layers, volumes)) = self.held().get(name).map(|h| {
            let layers: BTreeSet<Digest> = h
                .mounts
                .values()
                .flat_map(|m| m.layers.iter().copied())
                .collect();
            let mut volumes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (volume, origin) in h.mounts.values().filter_map(|m| m.volume.as_ref()) {
                volumes
                    .entry(volume.clone())
                    .or_default()
                    .insert(origin.clone());
            }
            (Arc::clone(&h.store), h.key.clone(), layers, volumes)
        }) else {
            return Err(FsError::NotFound(format!("no mount lease for {name}")));
        };
        // A volume mount with no layer in this store (a new volume in a home) still says
        // which head it started from.
        let written: FsResult<()> = if layers.is_empty() && volumes.is_empty() {
            store.delete(&key).await.map_err(Into::into)
        } else {
            MountLease::new(layers, volumes).write(&store, &key).await
        };
        match written {
            Ok(()) => Ok(key),
            Err(e) => {
                tracing::warn!(
                    "{name}: writing mount lease {key}: {e} (garbage collection keeps mounted \
                     layers only while it is renewed; retrying)"
                );
                Err(e)
            }
        }
    }

    /// Rewrites every lease every `timings.mount_renew`, for ever (abort the task to stop).
    pub async fn renew(self: Arc<Self>, timings: Timings) {
        loop {
            tokio::time::sleep(timings.mount_renew).await;
            // Leases with mounts (an empty one was deleted when it emptied).
            let names: Vec<String> = self
                .held()
                .iter()
                .filter(|(_, h)| !h.mounts.is_empty())
                .map(|(name, _)| name.clone())
                .collect();
            for name in names {
                let _ = self.write(&name).await;
            }
        }
    }

    /// Deletes every lease (the daemon is stopping and has unmounted everything).
    pub async fn release_all(&self) {
        let urls: Vec<String> = {
            let mut held = self.held();
            held.values_mut().for_each(|h| h.mounts.clear());
            held.keys().cloned().collect()
        };
        for url in urls {
            let _ = self.write(&url).await;
        }
    }
}
