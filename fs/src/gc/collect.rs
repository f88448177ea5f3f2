//! `strata gc`: deletes what no root keeps alive, beside publishes and commits that run at the
//! same time (the protocol is `docs/FORMAT.md` §9).
//!
//! 1. Take `gc/lock`; wait until no writer lease is live.
//! 2. Mark from every root ([`super::mark`]), with what was written within the grace period.
//! 3. Plan from one listing of the store; read the mount leases again and mark anew if a
//!    daemon started reading a layer meanwhile.
//! 4. Rewrite packs mostly dead ([`super::rewrite`]): copy their live chunks into new packs
//!    and leave forwarding maps.
//! 5. Delete in an order that never leaves a dangling name: start records, manifests,
//!    forwarding maps no live layer needs, locators (a live chunk's locator that names a pack
//!    about to go is pointed at a live copy first), then packs.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::stream::{self, StreamExt, TryStreamExt};
use serde::Serialize;
use strata_cache_format::{Digest, Locator};
use strata_store::{ObjectInfo, Store};

use super::lease::{self, GcLock, Timings};
use super::mark::{self, Marked, RootOptions, Roots};
use super::retention::Policy;
use super::rewrite::{self, RewriteReport};
use super::usage::Tally;
use crate::error::{FsError, FsResult};

/// Deletes in flight at once.
const DELETES: usize = 32;
/// Locators are written after their packs, by clocks that may disagree a little: those
/// written up to this long before the oldest pack to go are checked too.
const CLOCK_SLACK: Duration = Duration::from_secs(5 * 60);

#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Objects written within this long are never deleted.
    pub grace: Duration,
    /// Only report what would be deleted (takes no lock, waits for no one).
    pub dry_run: bool,
    /// The retention of datasets without a policy of their own (`None`: keep every layer).
    pub default_policy: Option<Policy>,
    pub timings: Timings,
    /// How long to wait for running writers before giving up.
    pub writer_wait: Duration,
    /// How long after a squash everything it replaced stays (see `RootOptions`).
    pub keep_replaced: Duration,
    /// Packs whose live bytes are less than this share of their size are rewritten (0:
    /// never).
    pub rewrite_below: f64,
}

/// By default a pack is rewritten once less than half of it is live: the rewrite then copies
/// fewer bytes than it frees.
pub const DEFAULT_REWRITE_BELOW: f64 = 0.5;

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: mark::DEFAULT_GRACE,
            dry_run: false,
            default_policy: None,
            timings: Timings::default(),
            writer_wait: Duration::from_secs(30 * 60),
            keep_replaced: mark::DEFAULT_KEEP_REPLACED,
            rewrite_below: DEFAULT_REWRITE_BELOW,
        }
    }
}

/// What a collection did (or, dry, would do).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GcReport {
    pub store: String,
    pub dry_run: bool,
    /// Everything the store held when it was listed.
    pub before: Tally,
    /// Deleted (or to delete), by kind: `start records`, `layers`, `forwarding maps`,
    /// `locators`, `packs`, `leases`.
    pub deleted: BTreeMap<String, Tally>,
    /// Packs mostly dead whose live chunks were copied out (they are among the deleted packs).
    pub rewrite: RewriteReport,
    /// What is left: `before` less what was deleted, plus what the rewrite wrote.
    pub after: Tally,
    /// Dead objects kept because they were written within the grace period.
    pub kept_recent: Tally,
    /// Live chunks' locators read because they might name a pack to delete, and how many of
    /// those were pointed at a live copy.
    pub locators_checked: u64,
    pub locators_rewritten: u64,
    /// Live layers.
    pub live_layers: u64,
    /// Roots or live layers that could not be read: while there are any, nothing is deleted.
    pub problems: Vec<String>,
    /// Time spent waiting for writers, and in all.
    pub waited_secs: f64,
    pub secs: f64,
}

impl GcReport {
    /// Bytes the store holds less than before (deleted less what the rewrite wrote).
    pub fn freed(&self) -> u64 {
        let (written, replaced) = self.rewrite.added();
        (self.deleted_bytes() + replaced.bytes).saturating_sub(written.bytes)
    }

    fn deleted_bytes(&self) -> u64 {
        self.deleted.values().map(|t| t.bytes).sum()
    }
}

/// What to delete, from one listing.
#[derive(Debug, Default)]
struct Plan {
    start_records: Vec<ObjectInfo>,
    layers: Vec<ObjectInfo>,
    forwarding_maps: Vec<ObjectInfo>,
    locators: Vec<ObjectInfo>,
    packs: Vec<ObjectInfo>,
    leases: Vec<ObjectInfo>,
    /// Live chunks' locators that may name a pack in `packs`.
    check: Vec<(String, Digest)>,
    recent: Tally,
}

/// The digest at the end of a content-named key (`packs/ab/<hex>`, `layers/<hex>`...).
fn named(key: &str) -> Option<Digest> {
    Digest::parse(key.rsplit('/').next()?).ok()
}

fn plan(objects: &[ObjectInfo], marked: &Marked, now: SystemTime, options: &GcOptions) -> Plan {
    let older = |o: &ObjectInfo, ttl: Duration| lease::stale(now, o.modified, ttl);
    let mut plan = Plan::default();
    let mut live_locators = Vec::new();
    let mut recent_dead_locators = Vec::new();
    for o in objects {
        let dead = match (o.key.split('/').next().unwrap_or_default(), named(&o.key)) {
            ("packs", Some(d)) => (!marked.packs.contains_key(&d)).then_some(&mut plan.packs),
            ("layers", Some(d)) => (!marked.layers.contains_key(&d)).then_some(&mut plan.layers),
            ("prefetch", Some(d)) => {
                (!marked.layers.contains_key(&d)).then_some(&mut plan.start_records)
            }
            ("moved", Some(d)) => {
                (!marked.forwarded.contains_key(&d)).then_some(&mut plan.forwarding_maps)
            }
            ("chunks", Some(d)) if marked.chunks.contains_key(&d) => {
                live_locators.push((o, d));
                None
            }
            ("chunks", Some(d)) => {
                if !older(o, options.grace) {
                    // Kept for now, but it may name a pack about to go (see below).
                    recent_dead_locators.push((o, d));
                }
                Some(&mut plan.locators)
            }
            ("leases", _) => {
                if older(o, lease_ttl(&o.key, options)) {
                    plan.leases.push(o.clone());
                }
                None
            }
            _ => None, // refs, histories, policies, volumes, the lock, unknown objects
        };
        if let Some(list) = dead {
            if older(o, options.grace) {
                list.push(o.clone());
            } else {
                plan.recent.objects += 1;
                plan.recent.bytes = plan.recent.bytes.saturating_add(o.size);
            }
        }
    }
    if let Some(oldest) = plan.packs.iter().map(|o| o.modified).min() {
        let since = oldest.checked_sub(CLOCK_SLACK).unwrap_or(oldest);
        // And a dead chunk's locator kept by the grace period, whatever pack it names: one
        // naming a pack that goes is deleted (a publish would reuse a chunk that is gone).
        plan.check = live_locators
            .into_iter()
            .filter(|(o, _)| o.modified >= since)
            .chain(recent_dead_locators)
            .map(|(o, d)| (o.key.clone(), d))
            .collect();
    }
    plan
}

/// How long a lease goes unrenewed before the collector deletes it. A daemon deletes its own
/// mount lease when it stops; one left a day unrenewed is a crashed daemon's (deleting a live
/// one, renewed between the listing and the delete, would leave its mounts unprotected until
/// the next renewal).
fn lease_ttl(key: &str, options: &GcOptions) -> Duration {
    let ttl = if key.starts_with(lease::WRITERS) {
        options.timings.writer_stale
    } else {
        options.timings.mount_stale.max(MOUNT_LEASE_LEFT)
    };
    ttl.max(options.grace)
}

/// How long a mount lease goes unrenewed before the collector deletes it.
const MOUNT_LEASE_LEFT: Duration = Duration::from_secs(24 * 60 * 60);

fn tally<'a>(objects: impl Iterator<Item = &'a ObjectInfo>) -> Tally {
    let mut t = Tally::default();
    for o in objects {
        t.objects += 1;
        t.bytes = t.bytes.saturating_add(o.size);
    }
    t
}

/// Marks from every root: refs with their retention, heads, records, mount leases, and the
/// layers written within the grace period.
async fn mark_all(store: &Arc<dyn Store>, roots: &RootOptions) -> FsResult<Marked> {
    let mut found = mark::roots(store, roots).await?;
    mark::recent_layers(store, roots, &mut found).await?;
    mark::mark(store, found).await
}

/// Collects the garbage of `store` (see the module documentation).
pub async fn collect(store: &Arc<dyn Store>, options: &GcOptions) -> FsResult<GcReport> {
    let started = Instant::now();
    let mut report = GcReport {
        store: store.url().to_string(),
        dry_run: options.dry_run,
        ..GcReport::default()
    };
    let lock = match options.dry_run {
        true => None,
        false => Some(GcLock::take(store, options.timings).await?),
    };
    let result = collect_locked(store, options, lock.as_ref(), &mut report).await;
    if let Some(lock) = lock {
        lock.release().await;
    }
    report.secs = started.elapsed().as_secs_f64();
    result.map(|()| report)
}

async fn collect_locked(
    store: &Arc<dyn Store>,
    options: &GcOptions,
    lock: Option<&GcLock>,
    report: &mut GcReport,
) -> FsResult<()> {
    if let Some(lock) = lock {
        let waiting = Instant::now();
        wait_for_writers(store, lock, options).await?;
        report.waited_secs = waiting.elapsed().as_secs_f64();
        // A writer whose lease this collection took for abandoned finds the epoch moved
        // before its root write, and stops.
        store
            .put(lease::EPOCH_KEY, bytes::Bytes::from(lease::unique_id()))
            .await?;
    }
    let now = match lock {
        Some(l) => l.store_now().await?,
        None => SystemTime::now(),
    };
    let roots = RootOptions {
        now,
        grace: options.grace,
        default_policy: options.default_policy,
        mount_stale: options.timings.mount_stale,
        keep_replaced: options.keep_replaced,
    };
    let mut marked = mark_all(store, &roots).await?;
    let mut objects = store.list_info("").await?;
    objects.retain(|o| o.key != lease::LOCK_KEY); // the collector's own, gone when it ends
    report.before = tally(objects.iter());
    remark_for_new_mounts(store, &roots, &mut marked, options).await?;
    report.problems = problems(&marked);
    if report.problems.is_empty() {
        let candidates =
            rewrite::candidates(&objects, &marked, now, options.grace, options.rewrite_below);
        if !marked.old_readers.is_empty() && !candidates.is_empty() {
            report.rewrite.skipped.push(format!(
                "nothing rewritten: daemons that do not follow forwarding maps hold live mount leases ({})",
                marked.old_readers.join(", ")
            ));
        } else {
            report.rewrite = match lock {
                Some(lock) if !options.dry_run => {
                    rewrite::rewrite(store, lock, &mut marked, &candidates).await?
                }
                _ => rewrite::simulate(&mut marked, &candidates),
            };
        }
        if report.rewrite.packs.objects > 0 && !options.dry_run {
            // A mount may have begun reading a layer while the packs were copied: marked
            // anew (through the new maps), its regions a map does not hold keep their pack.
            remark_for_new_mounts(store, &roots, &mut marked, options).await?;
            report.problems = problems(&marked);
        }
    }
    report.live_layers = marked.layers.len() as u64;
    let plan = plan(&objects, &marked, now, options);
    report.kept_recent = plan.recent;
    for (kind, list) in [
        ("start records", &plan.start_records),
        ("layers", &plan.layers),
        ("forwarding maps", &plan.forwarding_maps),
        ("locators", &plan.locators),
        ("packs", &plan.packs),
        ("leases", &plan.leases),
    ] {
        if !list.is_empty() {
            report.deleted.insert(kind.to_string(), tally(list.iter()));
        }
    }
    if !report.problems.is_empty() {
        // What looks dead may not be: delete nothing.
        report.deleted.clear();
        report.after = report.before;
        return Ok(());
    }
    let (written, replaced) = report.rewrite.added();
    report.after = Tally {
        objects: (report.before.objects + written.objects).saturating_sub(
            replaced.objects + report.deleted.values().map(|t| t.objects).sum::<u64>(),
        ),
        bytes: (report.before.bytes.saturating_add(written.bytes))
            .saturating_sub(replaced.bytes + report.deleted_bytes()),
    };
    if options.dry_run {
        report.locators_checked = plan.check.len() as u64;
        return Ok(());
    }
    let Some(lock) = lock else {
        return Ok(()); // only a dry run goes without the lock
    };
    delete_all(store, lock, &plan.start_records).await?;
    delete_all(store, lock, &plan.layers).await?;
    delete_all(store, lock, &plan.forwarding_maps).await?;
    let dead_packs: HashSet<Digest> = plan.packs.iter().filter_map(|o| named(&o.key)).collect();
    let (checked, rewritten) =
        repoint_locators(store, lock, &plan.check, &marked, &dead_packs).await?;
    report.locators_checked = checked;
    report.locators_rewritten = rewritten;
    delete_all(store, lock, &plan.locators).await?;
    delete_all(store, lock, &plan.packs).await?;
    // A lease renewed since the listing is live again: only those still stale now go.
    let now = lock.store_now().await?;
    let fresh: HashSet<String> = store
        .list_info("leases/")
        .await?
        .into_iter()
        .filter(|o| !lease::stale(now, o.modified, lease_ttl(&o.key, options)))
        .map(|o| o.key)
        .collect();
    let stale: Vec<ObjectInfo> = plan
        .leases
        .iter()
        .filter(|o| !fresh.contains(&o.key))
        .cloned()
        .collect();
    delete_all(store, lock, &stale).await?;
    Ok(())
}

fn problems(marked: &Marked) -> Vec<String> {
    let mut problems = marked.unreadable.clone();
    problems.extend(marked.broken_layers.iter().cloned());
    problems
}

/// A daemon that began reading a layer after the marking names it in its lease: marks anew
/// with it (the second time round nothing new is likely).
async fn remark_for_new_mounts(
    store: &Arc<dyn Store>,
    roots: &RootOptions,
    marked: &mut Marked,
    options: &GcOptions,
) -> FsResult<()> {
    for _ in 0..3 {
        if !marked.is_complete() || options.dry_run {
            break;
        }
        let mut leased = Roots::default();
        mark::mount_leases(store, roots, &mut leased).await?;
        let new = leased.layers.keys().any(|d| !marked.layers.contains_key(d));
        if !new && leased.unreadable.is_empty() {
            break;
        }
        *marked = mark_all(store, roots).await?;
    }
    Ok(())
}

/// Waits until no writer lease is live (writers that began before the lock finish; those
/// that come after see the lock and wait).
async fn wait_for_writers(
    store: &Arc<dyn Store>,
    lock: &GcLock,
    options: &GcOptions,
) -> FsResult<()> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(100);
    let mut said = false;
    loop {
        lock.ensure_held()?;
        let now = lock.store_now().await?;
        let live = lease::live_writers(store, now, options.timings).await?;
        let Some((key, holder)) = live.first() else {
            return Ok(());
        };
        let who = holder
            .as_ref()
            .map(|h| format!("{} on {} (pid {})", h.what, h.host, h.pid))
            .unwrap_or_else(|| key.clone());
        if started.elapsed() >= options.writer_wait {
            return Err(FsError::Conflict(format!(
                "{}: {} writer(s) still at work after {}s ({who}); nothing was deleted",
                store.url(),
                live.len(),
                options.writer_wait.as_secs()
            )));
        }
        if !said {
            tracing::info!("waiting for {} writer(s) to finish: {who}", live.len());
            said = true;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

async fn delete_all(store: &Arc<dyn Store>, lock: &GcLock, objects: &[ObjectInfo]) -> FsResult<()> {
    // The hold is checked again every few hundred deletes: a collection whose lock lapsed
    // stops within seconds.
    for batch in objects.chunks(8 * DELETES) {
        lock.ensure_held()?;
        stream::iter(batch)
            .map(|o| async move {
                tracing::debug!("deleting {}", o.key);
                store.delete(&o.key).await
            })
            .buffer_unordered(DELETES)
            .try_collect::<()>()
            .await?;
    }
    Ok(())
}

/// Points every checked locator that names a pack about to be deleted at the live copy of its
/// chunk (a dead chunk's is deleted); a damaged one is deleted (publish would ignore it
/// anyway). Returns (read, rewritten).
async fn repoint_locators(
    store: &Arc<dyn Store>,
    lock: &GcLock,
    check: &[(String, Digest)],
    marked: &Marked,
    dead_packs: &HashSet<Digest>,
) -> FsResult<(u64, u64)> {
    lock.ensure_held()?;
    let rewritten = stream::iter(check)
        .map(|(key, digest)| async move {
            let bytes = match store.get(key).await {
                Ok(b) => b,
                Err(e) if e.is_not_found() => return Ok(0u64),
                Err(e) => return Err(FsError::from(e)),
            };
            match Locator::parse(*digest, &bytes) {
                Some(loc) if !dead_packs.contains(&loc.pack) => Ok(0),
                Some(_) => match marked.chunks.get(digest) {
                    Some(live) => {
                        store
                            .put(key, Locator::encode(&live.location).into())
                            .await?;
                        Ok(1)
                    }
                    // A dead chunk's, kept by the grace period: it must not name a pack
                    // that is gone.
                    None => {
                        store.delete(key).await?;
                        Ok(0)
                    }
                },
                None => {
                    store.delete(key).await?;
                    Ok(0)
                }
            }
        })
        .buffer_unordered(DELETES)
        .try_fold(0u64, |sum, n| async move { Ok(sum + n) })
        .await?;
    Ok((check.len() as u64, rewritten))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gc::retention;
    use crate::layer::Layer;
    use crate::publish::{publish, PublishOptions};
    use crate::refs::{self, DatasetRef};
    use strata_cache_format::{chunk_key, moved_key, pack_key};
    use strata_store::MemoryStore;

    fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
        strata_testkit::rng::SplitMix64::new(seed).bytes(len)
    }

    async fn publish_dir(store: &Arc<dyn Store>, dir: &std::path::Path, r: &str) -> Digest {
        let target = DatasetRef::parse(r).unwrap();
        publish(
            dir,
            store,
            Some(&target),
            &PublishOptions::default(),
            Default::default(),
        )
        .await
        .unwrap()
        .layer
        .unwrap()
    }

    /// A reader of `store` through a cache of its own that keeps (almost) nothing in memory.
    fn reader(store: &Arc<dyn Store>) -> cache::ChunkReader {
        let cache = cache::ChunkCache::new(&cache::CacheConfig {
            disk_dir: None,
            disk_capacity: 0,
            memory_capacity: 1,
            fetch_deadline: Duration::from_secs(10),
        })
        .unwrap();
        cache.reader(Arc::clone(store))
    }

    /// Every chunk of `layer` reads back verified, as a mount reads it (through forwarding
    /// maps where gc rewrote a pack).
    async fn assert_whole(store: &Arc<dyn Store>, layer: Digest) {
        assert_whole_with(&reader(store), store, layer).await
    }

    async fn assert_whole_with(reader: &cache::ChunkReader, store: &Arc<dyn Store>, layer: Digest) {
        let l = Layer::load(store, layer, None).await.unwrap();
        let m = &l.manifest;
        for i in 0..m.chunk_count() {
            let c = m.chunk(i);
            let data = reader
                .get(&c.location())
                .await
                .unwrap_or_else(|e| panic!("layer {layer}: chunk {i}: {e}"));
            assert_eq!(Digest::of(&data), c.digest, "layer {layer}: chunk {i}");
        }
    }

    /// Packs a live layer names directly.
    async fn packs_named(
        store: &Arc<dyn Store>,
        layer: Digest,
    ) -> std::collections::BTreeSet<Digest> {
        let l = Layer::load(store, layer, None).await.unwrap();
        (0..l.manifest.chunk_count())
            .map(|i| l.manifest.chunk(i).pack)
            .collect()
    }

    /// A dry run with [`options`].
    async fn dry_run(store: &Arc<dyn Store>) -> GcReport {
        let dry = GcOptions {
            dry_run: true,
            ..options()
        };
        collect(store, &dry).await.unwrap()
    }

    fn options() -> GcOptions {
        GcOptions {
            grace: Duration::ZERO,
            ..GcOptions::default()
        }
    }

    #[tokio::test]
    async fn gc_frees_what_retention_drops_and_keeps_every_live_byte() {
        let tmp = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new("gc"));
        let dir = tmp.path().join("ds");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("shared"), random_bytes(1, 600_000)).unwrap();
        let mut versions = Vec::new();
        for v in 0..4u64 {
            std::fs::write(dir.join("changing"), random_bytes(100 + v, 500_000)).unwrap();
            versions.push(publish_dir(&store, &dir, "ds:latest").await);
        }
        // `other` holds the same files as the current version (a chunking stream is per
        // layer, so the same chunks), and one chunk of it stored twice: its locator was lost
        // before `other` was published, so the chunk went into a second pack, and the
        // locator names that one.
        let other = tmp.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        for f in ["changing", "shared"] {
            std::fs::copy(dir.join(f), other.join(f)).unwrap();
        }
        let shared_chunk = Layer::load(&store, versions[3], None)
            .await
            .unwrap()
            .manifest
            .chunk(0)
            .digest;
        store.delete(&chunk_key(&shared_chunk)).await.unwrap();
        let other_layer = publish_dir(&store, &other, "other:v1").await;
        // A pack of a publish killed before its manifest.
        let orphan = strata_cache_format::blob::encode(&random_bytes(9, 1000));
        let orphan_key = pack_key(&Digest::of(&orphan));
        store.put(&orphan_key, orphan.into()).await.unwrap();
        retention::write(&store, "ds", Some(&Policy::new(Some(1), None)))
            .await
            .unwrap();
        retention::write(&store, "other", Some(&Policy::new(Some(0), None)))
            .await
            .unwrap();
        refs::remove(&store, &DatasetRef::parse("other:v1").unwrap(), None)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;

        let dry = dry_run(&store).await;
        assert!(dry.problems.is_empty(), "{:?}", dry.problems);
        let before: u64 = store
            .list_info("")
            .await
            .unwrap()
            .iter()
            .map(|o| o.size)
            .sum();
        assert_eq!(dry.before.bytes, before, "a dry run deletes nothing");

        let report = collect(&store, &options()).await.unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(
            report.freed(),
            dry.freed(),
            "the dry run said what the run did"
        );
        assert_eq!(
            report.deleted["layers"].objects, 3,
            "v0, v1 and other: {report:?}"
        );
        assert!(report.deleted["packs"].objects >= 2, "{report:?}");
        assert_eq!(report.locators_rewritten, 1, "{report:?}");
        let left: Vec<ObjectInfo> = store.list_info("").await.unwrap();
        assert_eq!(report.after.bytes, left.iter().map(|o| o.size).sum::<u64>());
        assert!(!left.iter().any(|o| o.key == orphan_key));
        assert!(store.head(lease::LOCK_KEY).await.unwrap().is_none());

        // What the current and the one kept earlier layer read is all there; the dropped
        // ones are gone.
        for live in [versions[2], versions[3]] {
            assert_whole(&store, live).await;
        }
        for dead in [versions[0], versions[1], other_layer] {
            assert!(Layer::load(&store, dead, None).await.is_err());
        }
        // Nothing is left that no live layer uses: only live packs, and no byte of them
        // unused... but for what shares a pack with a live chunk.
        let u = crate::gc::usage::usage(&store, Default::default(), &Default::default())
            .await
            .unwrap();
        assert_eq!(u.dead.freeable, 0, "{:?}", u.dead);
        // The re-pointed locator lets a new publish of the same bytes reuse the live copy.
        let again = publish_dir(&store, &other, "other:v2").await;
        assert_whole(&store, again).await;
        let loc = store.get(&chunk_key(&shared_chunk)).await.unwrap();
        let loc = Locator::parse(shared_chunk, &loc).unwrap();
        assert!(store.head(&pack_key(&loc.pack)).await.unwrap().is_some());

        // A second collection finds nothing more.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let report = collect(&store, &options()).await.unwrap();
        assert_eq!(report.freed(), 0, "{report:?}");
    }

    #[tokio::test]
    async fn mostly_dead_packs_are_rewritten_behind_forwarding_maps_that_follow_a_second_rewrite() {
        let tmp = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new("gc-rewrite"));
        let dir = tmp.path().join("ds");
        std::fs::create_dir_all(&dir).unwrap();
        let write = |files: std::ops::Range<u64>, seed: u64| {
            for f in files {
                std::fs::write(
                    dir.join(format!("f{f:02}")),
                    random_bytes(seed + f, 1_000_000),
                )
                .unwrap();
            }
        };
        // Datasets a and b start as the same 12 files: one pack, named by both.
        write(0..12, 1000);
        let a1 = publish_dir(&store, &dir, "a:latest").await;
        let b1 = publish_dir(&store, &dir, "b:latest").await;
        let first: Vec<Digest> = packs_named(&store, a1).await.into_iter().collect();
        assert_eq!(first.len(), 1, "12 MB fit one pack");
        let old = first[0];
        assert_eq!(packs_named(&store, b1).await, packs_named(&store, a1).await);
        // a keeps its first 4 files, b its first one; nothing keeps the earlier layers.
        write(4..12, 2000);
        let a2 = publish_dir(&store, &dir, "a:latest").await;
        write(0..4, 1000);
        write(1..12, 3000);
        let b2 = publish_dir(&store, &dir, "b:latest").await;
        for ds in ["a", "b"] {
            retention::write(&store, ds, Some(&Policy::new(Some(0), None)))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;

        // A live lease of a daemon that does not follow forwarding maps holds rewrites off.
        let old_daemon = format!("{}old-host-1", lease::MOUNTS);
        let lease = lease::MountLease {
            follows_moved: false,
            ..lease::MountLease::new([b2], Default::default())
        };
        lease.write(&store, &old_daemon).await.unwrap();
        let held = dry_run(&store).await;
        assert_eq!(held.rewrite.packs.objects, 0, "{held:?}");
        assert!(held.rewrite.skipped[0].contains("old-host-1"), "{held:?}");
        store.delete(&old_daemon).await.unwrap();
        // Off, nothing is rewritten.
        let dry_off = collect(
            &store,
            &GcOptions {
                dry_run: true,
                rewrite_below: 0.0,
                ..options()
            },
        )
        .await
        .unwrap();
        assert_eq!(dry_off.rewrite, RewriteReport::default());
        let dry = dry_run(&store).await;
        let report = collect(&store, &options()).await.unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        let r = &report.rewrite;
        assert_eq!(
            r.packs.objects, 1,
            "only the first pack is mostly dead: {report:?}"
        );
        assert!(
            r.copied > 0 && r.copied * 2 < r.packs.bytes,
            "about a third is live: {r:?}"
        );
        assert_eq!((r.new_packs.objects, r.maps.objects), (1, 1), "{r:?}");
        assert_eq!(
            report.deleted, dry.deleted,
            "the dry run said what the run did"
        );
        assert_eq!(report.rewrite.copied, dry.rewrite.copied);
        assert_eq!(
            report.rewrite.maps, dry.rewrite.maps,
            "one move per run of live chunks"
        );
        let left: u64 = store
            .list_info("")
            .await
            .unwrap()
            .iter()
            .map(|o| o.size)
            .sum();
        assert_eq!(report.after.bytes, left);
        assert_eq!(report.before.bytes - left, report.freed());
        assert!(
            store.head(&pack_key(&old)).await.unwrap().is_none(),
            "the old pack is gone"
        );
        assert!(store.head(&moved_key(&old)).await.unwrap().is_some());
        // Layers keep their digests and read back whole, through the map.
        let (stale, staler) = (reader(&store), reader(&store));
        for live in [a2, b2] {
            assert_whole_with(&stale, &store, live).await;
        }
        assert_whole_with(&staler, &store, b2).await;
        let u = crate::gc::usage::usage(&store, Default::default(), &Default::default())
            .await
            .unwrap();
        assert_eq!(u.dead.freeable, 0, "{:?}", u.dead);
        assert!(u.dead.in_live_packs < r.packs.bytes / 10, "{:?}", u.dead);

        // a moves on from its 4 kept files: the new pack is mostly dead in turn. Its rewrite
        // sends the old pack's map (b still names the old pack) on to the newest copy.
        write(0..4, 4000);
        let a3 = publish_dir(&store, &dir, "a:latest").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let middle = store.list("moved/").await.unwrap();
        let report = collect(&store, &options()).await.unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        let r = &report.rewrite;
        assert_eq!(r.packs.objects, 1, "{report:?}");
        assert_eq!(
            r.maps.objects, 2,
            "the new pack's map, and the old one's sent on: {r:?}"
        );
        assert!(
            store.head(&moved_key(&old)).await.unwrap().is_some(),
            "b still reads through it"
        );
        // A reader holding the old map follows it, then the new pack's.
        for live in [a3, b2] {
            assert_whole_with(&stale, &store, live).await;
            assert_whole(&store, live).await;
        }
        // No live layer names the middle pack: its map goes at the next collection, and a
        // reader holding the old pack's first map finds its pack gone and reads the map again.
        assert_eq!(middle.len(), 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let report = collect(&store, &options()).await.unwrap();
        assert_eq!(report.deleted["forwarding maps"].objects, 1, "{report:?}");
        assert_eq!(store.list("moved/").await.unwrap(), middle);
        assert_whole_with(&staler, &store, b2).await;

        // Once nothing names the old pack, its map goes too.
        refs::remove(&store, &DatasetRef::parse("b:latest").unwrap(), None)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let report = collect(&store, &options()).await.unwrap();
        assert!(report.deleted.contains_key("forwarding maps"), "{report:?}");
        assert!(store.head(&moved_key(&old)).await.unwrap().is_none());
        assert_whole(&store, a3).await;
        let report = collect(&store, &options()).await.unwrap();
        assert_eq!(report.freed(), 0, "{report:?}");
        assert_eq!(report.rewrite, RewriteReport::default());
    }

    #[tokio::test]
    async fn a_dead_chunks_locator_kept_by_the_grace_period_never_names_a_deleted_pack() {
        let tmp = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new("gc-recent-locator"));
        let dir = tmp.path().join("x");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a"), random_bytes(77, 400_000)).unwrap();
        let layer = publish_dir(&store, &dir, "x:v1").await;
        let chunk = Layer::load(&store, layer, None)
            .await
            .unwrap()
            .manifest
            .chunk(0);
        refs::remove(&store, &DatasetRef::parse("x:v1").unwrap(), None)
            .await
            .unwrap();
        retention::write(&store, "x", Some(&Policy::new(Some(0), None)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The chunk's locator was written again lately (an earlier collection pointed it at
        // this copy): the grace period keeps it, but its pack goes.
        let key = chunk_key(&chunk.digest);
        let bytes = store.get(&key).await.unwrap();
        store.put(&key, bytes).await.unwrap();
        let report = collect(
            &store,
            &GcOptions {
                grace: Duration::from_millis(200),
                ..options()
            },
        )
        .await
        .unwrap();
        assert!(report.deleted["packs"].objects >= 1, "{report:?}");
        assert!(store.head(&pack_key(&chunk.pack)).await.unwrap().is_none());
        assert!(
            store.head(&key).await.unwrap().is_none(),
            "a locator naming the deleted pack is left: {report:?}"
        );
        // So the same bytes published again are stored again, and read back.
        let again = publish_dir(&store, &dir, "x:v2").await;
        assert_whole(&store, again).await;
    }

    #[tokio::test]
    async fn a_writer_taken_for_abandoned_stops_before_its_root_write() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new("gc-fence"));
        let quiet = Timings {
            writer_renew: Duration::from_secs(60),
            ..Timings::default()
        };
        let writer =
            lease::WriterLease::acquire_with(&store, "publish", quiet, Duration::from_secs(5))
                .await
                .unwrap();
        writer.ensure_held().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        // To this collector the writer's lease is long stale: it goes ahead without it.
        let impatient = GcOptions {
            timings: Timings {
                writer_stale: Duration::from_millis(1),
                ..Timings::default()
            },
            ..options()
        };
        collect(&store, &impatient).await.unwrap();
        let err = writer.ensure_held().await.unwrap_err();
        assert!(
            err.to_string().contains("garbage collection may have run"),
            "{err}"
        );
        writer.release().await;
        // One that starts after the collection goes on.
        let next = lease::WriterLease::acquire(&store, "publish")
            .await
            .unwrap();
        next.ensure_held().await.unwrap();
        next.release().await;
    }

    #[tokio::test]
    async fn nothing_is_deleted_while_a_root_is_unreadable_or_young() {
        let tmp = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new("gc-safe"));
        let dir = tmp.path().join("ds");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("f"), random_bytes(3, 300_000)).unwrap();
        let layer = publish_dir(&store, &dir, "ds:v1").await;
        retention::write(&store, "ds", Some(&Policy::new(Some(0), None)))
            .await
            .unwrap();
        refs::remove(&store, &DatasetRef::parse("ds:v1").unwrap(), None)
            .await
            .unwrap();
        // Young: the default grace keeps it all.
        let report = collect(&store, &GcOptions::default()).await.unwrap();
        assert_eq!(report.freed(), 0, "{report:?}");
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        // An unreadable head: whatever it names is unknown, so nothing goes.
        store
            .put("volumes/t/v/head", crate::record::seal(b"{nope"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let report = collect(&store, &options()).await.unwrap();
        assert_eq!(report.freed(), 0, "{report:?}");
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert_whole(&store, layer).await;
        // A live mount lease keeps the layer it names.
        store.delete("volumes/t/v/head").await.unwrap();
        let key = lease::MountLease::key("d1", store.url());
        lease::MountLease::new([layer], Default::default())
            .write(&store, &key)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let report = collect(&store, &options()).await.unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_whole(&store, layer).await;
        // Once the lease goes, so does the layer.
        store.delete(&key).await.unwrap();
        let report = collect(&store, &options()).await.unwrap();
        assert!(report.deleted.contains_key("packs"), "{report:?}");
        assert!(Layer::load(&store, layer, None).await.is_err());
    }
}
