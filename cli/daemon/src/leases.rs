//! The daemon's mount leases: per store, one record naming the layers every mount of this
//! daemon reads, so that garbage collection keeps them while they are mounted, even after the
//! tags that named them moved (`docs/FORMAT.md` §9).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use strata_cache_format::Digest;
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
    mounts: HashMap<LeaseToken, Vec<Digest>>,
    /// Held across a write of the lease (and only that), so a write of an older state never
    /// lands after a newer one.
    write: Arc<tokio::sync::Mutex<()>>,
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

    /// Adds the layers of a mount to the lease of `store` and writes it; the token takes
    /// them out again.
    pub async fn add(&self, store: &Arc<dyn Store>, layers: Vec<Digest>) -> LeaseToken {
        let token = LeaseToken(self.next.fetch_add(1, Ordering::Relaxed));
        {
            let mut held = self.held();
            let h = held.entry(store.url().to_string()).or_insert_with(|| Held {
                store: Arc::clone(store),
                key: MountLease::key(&self.daemon, store.url()),
                mounts: HashMap::new(),
                write: Default::default(),
            });
            h.mounts.insert(token, layers);
        }
        self.write(store.url()).await;
        token
    }

    /// Takes a mount out of its lease (rewriting it; a lease left empty is deleted).
    pub async fn remove(&self, token: LeaseToken) {
        let urls: Vec<String> = self
            .held()
            .iter_mut()
            .filter_map(|(url, h)| h.mounts.remove(&token).map(|_| url.clone()))
            .collect();
        for url in urls {
            self.write(&url).await;
        }
    }

    /// Writes the lease of store `url` as it stands when its turn comes.
    async fn write(&self, url: &str) {
        let Some(gate) = self.held().get(url).map(|h| Arc::clone(&h.write)) else {
            return;
        };
        let _turn = gate.lock().await;
        let Some((store, key, layers)) = self.held().get(url).map(|h| {
            let layers: BTreeSet<Digest> = h.mounts.values().flatten().copied().collect();
            (Arc::clone(&h.store), h.key.clone(), layers)
        }) else {
            return;
        };
        let written: strata_fs::error::FsResult<()> = if layers.is_empty() {
            store.delete(&key).await.map_err(Into::into)
        } else {
            MountLease::new(layers).write(&store, &key).await
        };
        if let Err(e) = written {
            tracing::warn!(
                "{url}: writing mount lease {key}: {e} (garbage collection keeps mounted \
                 layers only while it is renewed; retrying)"
            );
        }
    }

    /// Rewrites every lease every `timings.mount_renew`, for ever (abort the task to stop).
    pub async fn renew(self: Arc<Self>, timings: Timings) {
        loop {
            tokio::time::sleep(timings.mount_renew).await;
            let urls: Vec<String> = self.held().keys().cloned().collect();
            for url in urls {
                self.write(&url).await;
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
            self.write(&url).await;
        }
    }
}
