//! `strata du`: what a store holds, who keeps it alive, what is dead, and what it costs.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;
use strata_cache_format::Digest;
use strata_store::Store;

use super::mark::{self, Marked, Owner};
use crate::error::FsResult;

/// Prices to estimate costs with, in dollars (defaults: S3 Standard list prices).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Prices {
    pub per_gb_month: f64,
    pub per_1000_puts: f64,
    pub per_1000_gets: f64,
}

impl Default for Prices {
    fn default() -> Self {
        Prices {
            per_gb_month: 0.023,
            per_1000_puts: 0.005,
            per_1000_gets: 0.0004,
        }
    }
}

/// A count of objects and their bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub objects: u64,
    pub bytes: u64,
}

impl Tally {
    // Saturating: sizes come from the store's listing.
    pub(crate) fn add(&mut self, bytes: u64) {
        self.objects = self.objects.saturating_add(1);
        self.bytes = self.bytes.saturating_add(bytes);
    }
}

/// What one dataset or volume keeps alive, by the stored bytes of its chunks.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OwnerUsage {
    pub owner: Owner,
    /// Live layers it names.
    pub layers: u64,
    /// Stored bytes of the chunks its layers use: `unique` + `shared`.
    pub referenced: u64,
    /// Of those, the bytes no one else uses: about what removing it would free (a pack that
    /// also holds others' chunks stays whole).
    pub unique: u64,
    /// The bytes others use too.
    pub shared: u64,
}

/// What nothing keeps alive.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Dead {
    /// Packs no live layer uses a byte of.
    pub packs: Tally,
    /// Manifests no root names.
    pub layers: Tally,
    /// Locators of chunks no live layer uses.
    pub locators: Tally,
    /// Start records of layers that are not live.
    pub start_records: Tally,
    /// Forwarding maps of rewritten packs no live layer names.
    pub forwarding_maps: Tally,
    /// Bytes inside live packs that no live layer uses: freed only by rewriting those packs
    /// (`strata gc` rewrites packs whose live share is below `--rewrite-below`).
    pub in_live_packs: u64,
    /// What deleting the dead objects frees (all of the above but `in_live_packs`).
    pub freeable: u64,
}

/// Estimated costs, in dollars, at [`Prices`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cost {
    pub prices: Prices,
    /// Storing everything the store holds, per month.
    pub storage_per_month: f64,
    /// Of that, what deleting the dead objects would save per month (bytes unused inside
    /// live packs not counted: freeing them takes rewriting the packs).
    pub dead_per_month: f64,
    /// The PUTs that wrote the objects held (one each).
    pub puts_to_write: f64,
    /// Reading every live byte once: one GET per manifest and per 4 MiB of live packs (the
    /// most a read's ranged GET asks for).
    pub gets_to_read_all: f64,
}

/// A store's usage (see the module documentation).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Usage {
    pub store: String,
    /// Everything the store holds.
    pub total: Tally,
    /// By kind of object: `packs`, `locators`, `layers`, `refs`, `tag histories`, `volumes`,
    /// `start records`, `forwarding maps`, `other` (what this version does not know; never
    /// counted dead).
    pub by_kind: BTreeMap<String, Tally>,
    pub owners: Vec<OwnerUsage>,
    pub dead: Dead,
    pub cost: Cost,
    /// Roots or layers that could not be read: while there are any, what looks dead may not
    /// be, and garbage collection refuses to run.
    pub problems: Vec<String>,
}

/// Lists `store`, marks what its roots keep alive (as `roots` says: the grace period and the
/// default retention, as garbage collection would be given them) and adds it up.
pub async fn usage(
    store: &Arc<dyn Store>,
    prices: Prices,
    roots: &mark::RootOptions,
) -> FsResult<Usage> {
    let roots = mark::roots(store, roots).await?;
    let marked = mark::mark(store, roots).await?;
    let objects = store.list_info("").await?;
    Ok(account(
        store.url(),
        &marked,
        objects.iter().map(|o| (o.key.as_str(), o.size)),
        prices,
    ))
}

/// The digest at the end of a content-named key (`packs/ab/<hex>`, `layers/<hex>`...).
fn named(key: &str) -> Option<Digest> {
    Digest::parse(key.rsplit('/').next()?).ok()
}

/// Adds up `objects` (key, size) against what is marked.
pub fn account<'a>(
    store: &str,
    marked: &Marked,
    objects: impl Iterator<Item = (&'a str, u64)>,
    prices: Prices,
) -> Usage {
    let mut total = Tally::default();
    let mut by_kind: BTreeMap<String, Tally> = BTreeMap::new();
    let mut dead = Dead::default();
    let mut live_pack_bytes = 0u64;
    for (key, size) in objects {
        total.add(size);
        let (kind, live) = match key.split('/').next().unwrap_or_default() {
            "packs" => match named(key) {
                Some(d) => {
                    match marked.packs.get(&d) {
                        Some(regions) => {
                            let used: u64 = regions.values().map(|r| r.stored_len as u64).sum();
                            live_pack_bytes = live_pack_bytes.saturating_add(size);
                            dead.in_live_packs =
                                dead.in_live_packs.saturating_add(size.saturating_sub(used));
                        }
                        None => dead.packs.add(size),
                    }
                    ("packs", true) // counted above, dead or alive
                }
                None => ("other", true),
            },
            "chunks" => match named(key) {
                Some(d) => ("locators", marked.chunks.contains_key(&d)),
                None => ("other", true),
            },
            "layers" => match named(key) {
                Some(d) => ("layers", marked.layers.contains_key(&d)),
                None => ("other", true),
            },
            "prefetch" => match named(key) {
                Some(d) => ("start records", marked.layers.contains_key(&d)),
                None => ("other", true),
            },
            "moved" => match named(key) {
                Some(d) => ("forwarding maps", marked.forwarded.contains_key(&d)),
                None => ("other", true),
            },
            "refs" => ("refs", true),
            "history" => ("tag histories", true),
            "volumes" => ("volumes", true),
            _ => ("other", true),
        };
        by_kind.entry(kind.to_string()).or_default().add(size);
        if !live {
            match kind {
                "locators" => dead.locators.add(size),
                "layers" => dead.layers.add(size),
                "start records" => dead.start_records.add(size),
                "forwarding maps" => dead.forwarding_maps.add(size),
                _ => {}
            }
        }
    }
    dead.freeable = [
        dead.packs.bytes,
        dead.layers.bytes,
        dead.locators.bytes,
        dead.start_records.bytes,
        dead.forwarding_maps.bytes,
    ]
    .iter()
    .fold(0u64, |a, &b| a.saturating_add(b));

    let mut owners: HashMap<&Owner, OwnerUsage> = HashMap::new();
    for layer_owners in marked.layers.values() {
        for o in layer_owners {
            owners.entry(o).or_insert_with(|| empty_usage(o)).layers += 1;
        }
    }
    for chunk in marked.chunks.values() {
        let bytes = chunk.stored_len as u64;
        let alone = chunk.owners.len() == 1;
        for o in &chunk.owners {
            let u = owners.entry(o).or_insert_with(|| empty_usage(o));
            u.referenced = u.referenced.saturating_add(bytes);
            if alone {
                u.unique = u.unique.saturating_add(bytes);
            } else {
                u.shared = u.shared.saturating_add(bytes);
            }
        }
    }
    let mut owners: Vec<OwnerUsage> = owners.into_values().collect();
    owners.sort_by(|a, b| a.owner.cmp(&b.owner));

    let gb = |bytes: u64| bytes as f64 / 1e9;
    let cost = Cost {
        prices,
        storage_per_month: gb(total.bytes) * prices.per_gb_month,
        dead_per_month: gb(dead.freeable) * prices.per_gb_month,
        puts_to_write: total.objects as f64 / 1000.0 * prices.per_1000_puts,
        gets_to_read_all: (marked.layers.len() as u64 + live_pack_bytes.div_ceil(4 << 20)) as f64
            / 1000.0
            * prices.per_1000_gets,
    };
    let mut problems = marked.unreadable.clone();
    problems.extend(marked.broken_layers.iter().cloned());
    Usage {
        store: store.to_string(),
        total,
        by_kind,
        owners,
        dead,
        cost,
        problems,
    }
}

fn empty_usage(o: &Owner) -> OwnerUsage {
    OwnerUsage {
        owner: o.clone(),
        layers: 0,
        referenced: 0,
        unique: 0,
        shared: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::Layer;
    use crate::publish::{publish, PublishOptions};
    use crate::refs::DatasetRef;
    use std::collections::BTreeSet;
    use strata_store::MemoryStore;

    fn random_file(path: &std::path::Path, seed: u64, len: usize) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, strata_testkit::rng::SplitMix64::new(seed).bytes(len)).unwrap();
    }

    async fn publish_as(store: &Arc<dyn Store>, dir: &std::path::Path, r: Option<&str>) -> Digest {
        let target = r.map(|r| DatasetRef::parse(r).unwrap());
        publish(
            dir,
            store,
            target.as_ref(),
            &PublishOptions::default(),
            Default::default(),
        )
        .await
        .unwrap()
        .layer
        .unwrap()
    }

    fn owner<'u>(u: &'u Usage, o: &Owner) -> &'u OwnerUsage {
        u.owners
            .iter()
            .find(|x| &x.owner == o)
            .unwrap_or_else(|| panic!("{o} not among {:?}", u.owners))
    }

    /// The keys of packs a layer's manifest names.
    async fn packs_of(store: &Arc<dyn Store>, layer: Digest) -> BTreeSet<String> {
        let l = Layer::load(store, layer, None).await.unwrap();
        (0..l.manifest.pack_count())
            .map(|i| strata_cache_format::pack_key(&l.manifest.pack(i)))
            .collect()
    }

    #[tokio::test]
    async fn usage_follows_refs_heads_and_conflicts_and_finds_what_is_dead() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        for dir in [&a, &b] {
            random_file(&dir.join("one"), 1, 700_000);
            random_file(&dir.join("two"), 2, 700_000);
        }
        random_file(&b.join("three"), 3, 900_000);
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new("du"));
        let layer_a = publish_as(&store, &a, Some("a:v1")).await;
        let layer_b = publish_as(&store, &b, Some("b:v1")).await;
        store
            .put(
                &format!("prefetch/{}", layer_b.to_hex()),
                crate::record::seal(b"{}"),
            )
            .await
            .unwrap();

        // Both alive: b shares a's files, and has bytes of its own.
        let u = usage(&store, Prices::default(), &Default::default())
            .await
            .unwrap();
        assert!(u.problems.is_empty(), "{:?}", u.problems);
        let listed: u64 = store
            .list_info("")
            .await
            .unwrap()
            .iter()
            .map(|o| o.size)
            .sum();
        assert_eq!(u.total.bytes, listed);
        let (da, db) = (Owner::Dataset("a".into()), Owner::Dataset("b".into()));
        for o in [&da, &db] {
            let x = owner(&u, o);
            assert_eq!(x.layers, 1);
            assert_eq!(x.referenced, x.unique + x.shared);
        }
        assert!(owner(&u, &da).shared > 1_000_000, "{:?}", u.owners);
        assert!(owner(&u, &db).unique > 800_000, "{:?}", u.owners);
        assert_eq!(u.dead, Dead::default(), "nothing is dead");

        // b's ref goes: its manifest, start record, the locators of its own chunks and the
        // packs only it used are dead; a now has all its bytes to itself.
        store.delete("refs/b/v1").await.unwrap();
        store.delete("history/b/v1").await.unwrap();
        let u = usage(&store, Prices::default(), &Default::default())
            .await
            .unwrap();
        assert_eq!(u.owners.len(), 1);
        let x = owner(&u, &da);
        assert_eq!((x.unique, x.shared), (x.referenced, 0));
        assert_eq!(u.dead.layers.objects, 1);
        assert_eq!(u.dead.start_records.objects, 1);
        assert!(u.dead.locators.objects > 0);
        let live = packs_of(&store, layer_a).await;
        let only_b: Vec<_> = store
            .list_info("packs/")
            .await
            .unwrap()
            .into_iter()
            .filter(|o| !live.contains(&o.key))
            .collect();
        assert!(!only_b.is_empty());
        assert_eq!(u.dead.packs.objects, only_b.len() as u64);
        assert_eq!(
            u.dead.packs.bytes,
            only_b.iter().map(|o| o.size).sum::<u64>()
        );
        assert_eq!(
            u.dead.freeable,
            u.dead.packs.bytes
                + u.dead.layers.bytes
                + u.dead.locators.bytes
                + u.dead.start_records.bytes
        );
        assert!(u.cost.dead_per_month > 0.0 && u.cost.storage_per_month > u.cost.dead_per_month);

        // A volume whose head (or a conflict record) names b's layer keeps it alive.
        let head = serde_json::json!({"version": 1, "commits": [{
            "layer": layer_b.to_string(), "committed_at": 1, "changes": 1, "bytes_uploaded": 1}]});
        store
            .put(
                "volumes/team/work/head",
                crate::record::seal(head.to_string().as_bytes()),
            )
            .await
            .unwrap();
        let u = usage(&store, Prices::default(), &Default::default())
            .await
            .unwrap();
        assert!(u.problems.is_empty(), "{:?}", u.problems);
        assert_eq!(owner(&u, &Owner::Volume("team/work".into())).layers, 1);
        assert_eq!(u.dead, Dead::default());
        store.delete("volumes/team/work/head").await.unwrap();
        let conflict = serde_json::json!({"id": "c1", "layers": [layer_a.to_string(), layer_b.to_string()],
            "paths": ["/three"], "committed_at": 2});
        store
            .put(
                "volumes/team/work/conflicts/c1",
                crate::record::seal(conflict.to_string().as_bytes()),
            )
            .await
            .unwrap();
        let u = usage(&store, Prices::default(), &Default::default())
            .await
            .unwrap();
        assert_eq!(owner(&u, &Owner::Volume("team/work".into())).layers, 2);
        assert_eq!(u.dead, Dead::default());

        // A root that cannot be read is a problem, not a reason to call its layers dead.
        store
            .put("volumes/team/other/head", crate::record::seal(b"{not json"))
            .await
            .unwrap();
        store.delete("refs/a/v1").await.unwrap();
        store.delete("history/a/v1").await.unwrap();
        store
            .delete("volumes/team/work/conflicts/c1")
            .await
            .unwrap();
        let u = usage(&store, Prices::default(), &Default::default())
            .await
            .unwrap();
        assert_eq!(u.problems.len(), 1, "{:?}", u.problems);
        assert!(u.problems[0].contains("volumes/team/other/head"));
        // A layer a root names that is gone is a problem too.
        store
            .put(
                "refs/gone/v1",
                crate::record::seal(format!("{}\n", Digest([7; 32])).as_bytes()),
            )
            .await
            .unwrap();
        store
            .put(
                &format!("prefetch/{}", Digest([7; 32]).to_hex()),
                crate::record::seal(b"{}"),
            )
            .await
            .unwrap();
        let u = usage(&store, Prices::default(), &Default::default())
            .await
            .unwrap();
        assert!(
            u.problems.iter().any(|p| p.contains("dataset gone")),
            "{:?}",
            u.problems
        );
        assert_eq!(
            u.dead.start_records.objects, 1,
            "b's record is dead; the record of the layer a ref names, missing or not, is not"
        );
        // So is a ref this version cannot parse.
        store
            .put("refs/deep/er/key", crate::record::seal(b"x"))
            .await
            .unwrap();
        let u = usage(&store, Prices::default(), &Default::default())
            .await
            .unwrap();
        assert!(
            u.problems.iter().any(|p| p.contains("refs/deep/er/key")),
            "{:?}",
            u.problems
        );
    }
}
