//! Prefetch learned from starts, with no build step: a mount records what its function reads
//! in its first seconds ([`Recorder`]), the daemon merges that into each layer's start record
//! in the store ([`save`]), and the next cold mount of the layer, on any host, fetches what the
//! record names in the order starts read it ([`replay`]), as background work that a read a
//! function waits on always passes.
//!
//! Records are kept per layer, naming the layer's own entries: a volume's chain that grows by
//! a commit keeps the records of its older layers, and two stacks that share a layer share
//! its record.

pub mod record;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use strata_cache_format::{ChunkLoc, Digest};
use strata_store::Store;

use crate::error::{FsError, FsResult};
use crate::stack::LayerStack;
pub use record::{Observation, ObservedFile, StartRecord};

/// Where layer `layer`'s start record is stored.
pub fn record_key(layer: &Digest) -> String {
    format!("prefetch/{}", layer.to_hex())
}

/// A recording ends once no read has asked for new bytes for this long (the start is over)…
pub const IDLE: Duration = Duration::from_secs(2);
/// …or this long after its first read at the latest…
pub const WINDOW: Duration = Duration::from_secs(30);
/// …or once it has recorded this many bytes of files.
pub const RECORD_BYTES: u64 = 1 << 30;
/// Replay fetches at most this many stored bytes for one mount, and at most a quarter of the
/// disk cache: a wrong or hostile record wastes no more.
pub const REPLAY_BYTES: u64 = 1 << 30;
/// Replay hands the cache this many stored bytes at a time, and keeps as many batches going
/// as the background budget may run GETs.
const REPLAY_BATCH: u64 = 4 << 20;
const REPLAY_BATCHES_IN_FLIGHT: usize = 8;

/// What one mount's function read first, per (layer, entry), in the order it first read it.
pub struct Recorder {
    open: AtomicBool,
    state: Mutex<Recording>,
}

#[derive(Default)]
struct Recording {
    first: Option<Instant>,
    last_new: Option<Instant>,
    bytes: u64,
    index: HashMap<FileKey, usize>,
    /// Each file read, with the ranges read of it, in the order first read.
    files: Vec<(FileKey, Vec<Range<u64>>)>,
}

/// A file of the stack: (layer index, entry index).
type FileKey = (u16, u32);

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            open: AtomicBool::new(true),
            state: Mutex::new(Recording::default()),
        }
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder::default()
    }

    /// Notes a read of bytes `range` of entry `entry` of the stack's layer `layer`. Cheap once
    /// the recording is over (one atomic load).
    pub fn note(&self, layer: u16, entry: u32, range: Range<u64>) {
        if !self.open.load(Ordering::Relaxed) || range.start >= range.end {
            return;
        }
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if s.over(now) {
            self.open.store(false, Ordering::Relaxed);
            return;
        }
        let range = record::to_grain(range);
        let added = match s.index.get(&(layer, entry)) {
            Some(&i) => {
                let ranges = &mut s.files[i].1;
                // New bytes are those of this read the file's ranges did not hold yet (before
                // joining: past MAX_RANGES, joining fills gaps nobody read).
                let overlap: u64 = ranges
                    .iter()
                    .map(|r| {
                        r.end
                            .min(range.end)
                            .saturating_sub(r.start.max(range.start))
                    })
                    .sum();
                let added = (range.end - range.start).saturating_sub(overlap);
                let mut all = std::mem::take(ranges);
                all.push(range);
                *ranges = record::join_ranges(all);
                added
            }
            None if s.files.len() >= record::MAX_FILES => {
                self.open.store(false, Ordering::Relaxed);
                return;
            }
            None => {
                let i = s.files.len();
                s.index.insert((layer, entry), i);
                let len = range.end - range.start;
                s.files.push(((layer, entry), vec![range]));
                len
            }
        };
        if added > 0 {
            s.first.get_or_insert(now);
            s.last_new = Some(now);
            s.bytes += added;
            if s.bytes >= RECORD_BYTES {
                self.open.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Whether reads are still being noted (cheap: one atomic load).
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    /// Whether the recording is over: idle, past its window or budget, or finished.
    pub fn done(&self) -> bool {
        !self.open.load(Ordering::Relaxed)
            || self
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .over(Instant::now())
    }

    /// Ends the recording now (the mount is going away).
    pub fn finish(&self) {
        self.open.store(false, Ordering::Relaxed);
    }

    /// Ends the recording and gives what it saw, per layer index of the stack (nothing if the
    /// function read nothing). A second call gives nothing.
    pub fn take(&self) -> Vec<(u16, Observation)> {
        self.finish();
        let files = std::mem::take(
            &mut self
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .files,
        );
        let n = files.len().max(1) as f64;
        let mut per_layer: Vec<(u16, Observation)> = Vec::new();
        for (i, ((layer, entry), ranges)) in files.into_iter().enumerate() {
            let observed = ObservedFile {
                entry,
                ranges,
                rank: i as f64 / n,
            };
            match per_layer.iter_mut().find(|(l, _)| *l == layer) {
                Some((_, o)) => o.files.push(observed),
                None => per_layer.push((
                    layer,
                    Observation {
                        files: vec![observed],
                    },
                )),
            }
        }
        per_layer
    }
}

impl Recording {
    fn over(&self, now: Instant) -> bool {
        match (self.first, self.last_new) {
            (Some(first), Some(last)) => {
                now.duration_since(last) > IDLE || now.duration_since(first) > WINDOW
            }
            _ => false,
        }
    }
}

/// Merges what one start read into the start records of the stack's layers (`layers`, by
/// index) in `store`. A record that cannot be read (damaged, too large, another version) is
/// replaced; one that is settled and agrees with this start is left alone; store trouble
/// skips the layer (a record is a hint). Returns how many records were written.
pub async fn save(
    store: &Arc<dyn Store>,
    layers: &[Digest],
    observed: Vec<(u16, Observation)>,
) -> FsResult<usize> {
    let mut written = 0;
    for (index, start) in observed {
        let Some(layer) = layers.get(index as usize) else {
            continue;
        };
        let key = record_key(layer);
        let mut rec = match fetch_record(store, layer).await {
            Ok(Fetched::Record(rec)) => rec,
            Ok(Fetched::Missing) => StartRecord::new(layer),
            Ok(Fetched::Unusable(why)) => {
                tracing::warn!(%layer, "replacing the layer's start record: {why}");
                StartRecord::new(layer)
            }
            // A newer strata's record is left to it (a rolling upgrade must not flip-flop).
            Ok(Fetched::Newer(why)) => {
                tracing::debug!(%layer, "start record left as it is: {why}");
                continue;
            }
            Err(e) => {
                tracing::warn!(%layer, "start record not saved: {e}");
                continue;
            }
        };
        if !rec.worth_merging(&start) {
            continue;
        }
        rec.merge(&start);
        match store.put(&key, crate::record::seal(&rec.encode())).await {
            Ok(()) => written += 1,
            Err(e) => tracing::warn!(%layer, "start record not saved: {e}"),
        }
    }
    Ok(written)
}

/// Waits for `recorder`'s start to be over, then merges what it saw into the layers' start
/// records (store trouble is logged: a record is a hint).
pub async fn save_when_done(recorder: Arc<Recorder>, store: Arc<dyn Store>, layers: Vec<Digest>) {
    while !recorder.done() {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let observed = recorder.take();
    if observed.is_empty() {
        return;
    }
    match save(&store, &layers, observed).await {
        Ok(n) => tracing::debug!("{n} start record(s) written"),
        Err(e) => tracing::warn!("saving start records: {e}"),
    }
}

/// Layer `layer`'s start record in `store`: `Ok(None)` when there is none; an error when it
/// cannot be used.
pub async fn load(store: &Arc<dyn Store>, layer: &Digest) -> FsResult<Option<StartRecord>> {
    match fetch_record(store, layer).await? {
        Fetched::Record(r) => Ok(Some(r)),
        Fetched::Missing => Ok(None),
        Fetched::Unusable(why) | Fetched::Newer(why) => {
            Err(FsError::InvalidInput(format!("layer {layer}: {why}")))
        }
    }
}

/// A record object, as found.
enum Fetched {
    Record(StartRecord),
    Missing,
    /// Damaged (three times), too large, or not a record.
    Unusable(String),
    /// Written by a newer strata.
    Newer(String),
}

/// Fetches the record object with a ranged GET no longer than a record may be (a huge object
/// under the record's name costs one bounded GET, not its size), again when it arrives
/// damaged (three tries, as for every enveloped object), and decodes it. Errors are store
/// trouble.
async fn fetch_record(store: &Arc<dyn Store>, layer: &Digest) -> FsResult<Fetched> {
    /// Room for the envelope's header line.
    const HEADER: u64 = 256;
    let limit = record::MAX_RECORD_BYTES as u64 + HEADER;
    let mut why = String::new();
    for _ in 0..3 {
        let data = match store.get_range(&record_key(layer), 0..limit + 1).await {
            Ok(d) => d,
            Err(e) if e.is_not_found() => return Ok(Fetched::Missing),
            Err(e) => return Err(e.into()),
        };
        if data.len() as u64 > limit {
            return Ok(Fetched::Unusable(format!(
                "start record is larger than {} bytes",
                record::MAX_RECORD_BYTES
            )));
        }
        match crate::record::open(&data) {
            Ok(body) => {
                return Ok(match StartRecord::decode(&body, layer) {
                    Ok(r) => Fetched::Record(r),
                    Err(e @ record::RecordError::Unsupported { version, .. })
                        if version > record::VERSION =>
                    {
                        Fetched::Newer(e.to_string())
                    }
                    Err(e) => Fetched::Unusable(e.to_string()),
                })
            }
            Err(e) => why = e,
        }
    }
    Ok(Fetched::Unusable(format!(
        "start record arrived damaged 3 times: {why}"
    )))
}

/// What a replay did (so far).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplayReport {
    /// Layers of the stack that had a usable record.
    pub records: u64,
    /// Files the records named that were replayed (entries that are not files of their layer
    /// are skipped).
    pub files: u64,
    /// Stored bytes the store was asked for (chunks already cached cost nothing).
    pub bytes_fetched: u64,
    /// The replay is over (or was stopped).
    pub done: bool,
}

/// A replay's progress, readable while it runs.
#[derive(Debug, Default)]
pub struct ReplayProgress {
    records: AtomicU64,
    files: AtomicU64,
    bytes_fetched: AtomicU64,
    done: AtomicBool,
}

impl ReplayProgress {
    pub fn report(&self) -> ReplayReport {
        ReplayReport {
            records: self.records.load(Ordering::Relaxed),
            files: self.files.load(Ordering::Relaxed),
            bytes_fetched: self.bytes_fetched.load(Ordering::Relaxed),
            done: self.done.load(Ordering::Acquire),
        }
    }

    /// Marks the replay over (also when it was stopped half way).
    pub fn finish(&self) {
        self.done.store(true, Ordering::Release);
    }
}

/// Fetches, as background work, what the start records of `stack`'s layers say starts read
/// first, in that order, up to [`REPLAY_BYTES`] (and a quarter of the disk cache), telling
/// `progress` as it goes. A missing or unreadable record only means less is fetched; nothing
/// a record says can change a byte (chunks are verified as always) or hold up a read (see the
/// cache's background budget).
pub async fn replay(
    stack: Arc<LayerStack>,
    store: Arc<dyn Store>,
    progress: Arc<ReplayProgress>,
) -> ReplayReport {
    replay_records(&stack, &store, &progress).await;
    progress.finish();
    progress.report()
}

async fn replay_records(stack: &LayerStack, store: &Arc<dyn Store>, progress: &ReplayProgress) {
    // A tenant's home layers have no records in the datasets' store.
    let loads = stack
        .recorded_layers()
        .iter()
        .map(|l| load(store, &l.digest));
    let records = futures::future::join_all(loads).await;
    let mut plan: Vec<(f64, u16, u32, Vec<[u64; 2]>)> = Vec::new();
    for (index, (layer, rec)) in stack.recorded_layers().iter().zip(records).enumerate() {
        match rec {
            Ok(Some(rec)) => {
                progress.records.fetch_add(1, Ordering::Relaxed);
                plan.extend(
                    rec.replay()
                        .map(|f| (f.rank, index as u16, f.entry, f.ranges.clone())),
                );
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(layer = %layer.digest, "start record not used: {e}"),
        }
    }
    if plan.is_empty() {
        return;
    }
    plan.sort_by(|a, b| a.0.total_cmp(&b.0));
    let reader = stack.cache().clone();
    let budget = REPLAY_BYTES.min(reader.cache().disk_capacity() / 4);
    if budget == 0 {
        return; // no disk cache: fetched chunks would only crowd the memory cache
    }
    // Batches of chunks in plan order, each about REPLAY_BATCH stored bytes, in groups by
    // file: a large file's chunks are cached in its local copy.
    type Group = (Option<Arc<cache::FileLayout>>, Vec<ChunkLoc>);
    let mut batches: Vec<Vec<Group>> = Vec::new();
    let mut batch: Vec<Group> = Vec::new();
    let mut batch_bytes = 0u64;
    let mut planned = 0u64;
    // Small files share chunks: each chunk is planned once.
    let mut seen = std::collections::HashSet::new();
    'plan: for (_, layer, entry, ranges) in &plan {
        let limit = budget.saturating_mul(4) - planned;
        let Some(locs) = stack.layers()[*layer as usize].chunks_of(*entry, ranges, limit) else {
            continue;
        };
        progress.files.fetch_add(1, Ordering::Relaxed);
        let covered = ranges.iter().map(|[a, b]| b.saturating_sub(*a)).sum();
        let home = stack.home_of(*layer, *entry, covered);
        for loc in locs.into_iter().filter(|l| seen.insert(l.digest)) {
            batch_bytes += loc.stored_len as u64;
            planned += loc.stored_len as u64;
            match batch.last_mut() {
                Some((h, group)) if same_home(h, &home) => group.push(loc),
                _ => batch.push((home.clone(), vec![loc])),
            }
            if batch_bytes >= REPLAY_BATCH {
                batches.push(std::mem::take(&mut batch));
                batch_bytes = 0;
            }
            // What is cached already costs nothing, so more may be planned than the budget;
            // the fetches below stop at it.
            if planned >= budget.saturating_mul(4) {
                break 'plan;
            }
        }
    }
    batches.push(batch);
    let mut fetches = futures::stream::iter(batches)
        .map(|b| {
            let (reader, closed) = (reader.clone(), stack.closed().clone());
            async move {
                let groups = b.iter().map(|(home, locs)| {
                    reader.fetch_background(
                        locs,
                        home.as_ref(),
                        cache::BackgroundKind::Deferred,
                        &closed,
                    )
                });
                futures::future::join_all(groups)
                    .await
                    .into_iter()
                    .sum::<u64>()
            }
        })
        .buffered(REPLAY_BATCHES_IN_FLIGHT);
    while let Some(fetched) = fetches.next().await {
        let total = progress.bytes_fetched.fetch_add(fetched, Ordering::Relaxed) + fetched;
        if total >= budget {
            break;
        }
    }
}

fn same_home(a: &Option<Arc<cache::FileLayout>>, b: &Option<Arc<cache::FileLayout>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::tests::{pseudo_random, stack_with_cache, write};
    use crate::stack::ROOT_INO;

    /// Publishes `base` (small files and a 3 MiB one) and `top`, and gives a stack of them
    /// with a cold cache of its own in `tmp/<cache>`.
    async fn stack(tmp: &std::path::Path, cache: &str) -> LayerStack {
        stack_with_cache(tmp, &["base", "top"], Some(tmp.join(cache))).await
    }

    async fn read(s: &LayerStack, path: &[&str], offset: u64, size: u32) -> Vec<u8> {
        let mut ino = ROOT_INO;
        for name in path {
            ino = s.lookup(ino, name.as_bytes()).unwrap().ino;
        }
        s.read(ino, offset, size).await.unwrap().to_vec()
    }

    fn store_gets(s: &LayerStack) -> u64 {
        s.cache().stats().store_gets
    }

    /// Recording, merging into the store, and replay on a cold cache elsewhere: what the
    /// first start read is local before the second start asks for it; what it did not read
    /// is not fetched; a hostile record changes nothing a reader sees.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_recorded_start_is_replayed_on_a_cold_cache_and_a_hostile_record_is_harmless() {
        let tmp = tempfile::tempdir().unwrap();
        let (base, top) = (tmp.path().join("base"), tmp.path().join("top"));
        for i in 0..20u64 {
            write(&base, &format!("lib/m{i}.py"), &pseudo_random(i, 300_000));
        }
        let big = pseudo_random(99, 3 << 20);
        write(&base, "big.bin", &big);
        write(&top, "main.py", &pseudo_random(7, 5000));

        let first = stack(tmp.path(), "cache1").await;
        let rec = Arc::new(Recorder::new());
        let first = first.with_recorder(rec.clone());
        read(&first, &["main.py"], 0, 5000).await;
        read(&first, &["lib", "m3.py"], 0, 300_000).await;
        read(&first, &["big.bin"], 2 << 20, 4096).await;
        read(&first, &["lib", "m11.py"], 0, 100).await;
        let store = first.cache().store().clone();
        let layers: Vec<Digest> = first.layers().iter().map(|l| l.digest).collect();
        assert_eq!(save(&store, &layers, rec.take()).await.unwrap(), 2);
        let base_rec = load(&store, &layers[0]).await.unwrap().unwrap();
        assert_eq!(base_rec.files.len(), 3, "{base_rec:?}");

        let second = Arc::new(stack(tmp.path(), "cache2").await);
        let report = replay(second.clone(), store.clone(), Default::default()).await;
        assert_eq!((report.records, report.files), (2, 4), "{report:?}");
        assert!(report.bytes_fetched > 0);
        let gets = store_gets(&second);
        assert_eq!(
            read(&second, &["main.py"], 0, 5000).await,
            pseudo_random(7, 5000)
        );
        assert_eq!(
            read(&second, &["lib", "m3.py"], 0, 300_000).await,
            pseudo_random(3, 300_000)
        );
        assert_eq!(
            read(&second, &["big.bin"], 2 << 20, 4096).await,
            big[2 << 20..(2 << 20) + 4096]
        );
        assert_eq!(store_gets(&second), gets, "the start found its reads local");
        read(&second, &["lib", "m17.py"], 0, 10).await;
        assert!(
            store_gets(&second) > gets,
            "what no start read was not fetched"
        );

        // Hostile records: entries that are not files, ranges past the end, garbage.
        let hostile = serde_json::json!({
            "format": record::FORMAT, "version": record::VERSION,
            "layer": layers[0].to_string(), "starts": 1.0,
            "files": [
                {"entry": 0, "ranges": [[0, 1u64 << 40]], "weight": 1.0, "rank": 0.0},
                {"entry": 4_000_000_000u32, "ranges": [[0, 10]], "weight": 1.0, "rank": 0.1},
                {"entry": 1, "ranges": [[0, u64::MAX]], "weight": 1.0, "rank": 0.2},
            ]
        });
        let key = record_key(&layers[0]);
        store
            .put(&key, crate::record::seal(hostile.to_string().as_bytes()))
            .await
            .unwrap();
        store
            .put(
                &record_key(&layers[1]),
                crate::record::seal(b"{\"format\": 3"),
            )
            .await
            .unwrap();
        let third = Arc::new(stack(tmp.path(), "cache3").await);
        let report = replay(third.clone(), store.clone(), Default::default()).await;
        assert_eq!(report.records, 1, "the garbage record is not used");
        assert!(report.files <= 1, "{report:?}");
        assert!(report.bytes_fetched <= (3 << 20) + (8 << 20), "{report:?}");
        assert_eq!(
            read(&third, &["big.bin"], 0, 3 << 20).await,
            big,
            "bytes are the layer's whatever the record says"
        );
    }

    #[test]
    fn a_recording_keeps_first_reads_in_order_per_layer_and_stops_when_idle() {
        let r = Recorder::new();
        r.note(1, 7, 0..100);
        r.note(0, 3, 5000..6000);
        r.note(1, 7, 70_000..70_001);
        r.note(1, 9, 0..1);
        assert!(!r.done());
        let got = r.take();
        assert_eq!(got.len(), 2);
        let (l1, o1) = &got[0];
        assert_eq!(*l1, 1);
        assert_eq!(o1.files[0].entry, 7);
        assert_eq!(o1.files[0].ranges, vec![0..2 * record::GRAIN]);
        assert_eq!(o1.files[1].entry, 9);
        assert_eq!(got[1].1.files[0].entry, 3);
        assert!(o1.files[0].rank < got[1].1.files[0].rank);
        assert!(got[1].1.files[0].rank < o1.files[1].rank);
        assert!(r.done());
        r.note(0, 1, 0..1);
        assert!(r.take().is_empty(), "nothing after the end");
    }
}
