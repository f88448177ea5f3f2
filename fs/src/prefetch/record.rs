//! The start record of a layer: which parts of which of its files the starts of functions
//! read first, in the order they read them, merged over many starts. Stored beside the layer
//! (`prefetch/<hex>`, see `docs/FORMAT.md` §8) and only ever a hint: it names entries and
//! byte ranges of the layer, never bytes, so the worst a wrong one can do is fetch chunks
//! nobody reads, within the replay budget.
//!
//! This module is the format and the merge rule, with no I/O.

use std::ops::Range;

use serde::{Deserialize, Serialize};
use strata_cache_format::Digest;

/// What the record's `format` field says.
pub const FORMAT: &str = "strata-start-record";
/// The version this code writes and reads; a record of another version is ignored.
pub const VERSION: u32 = 1;
/// A stored record larger than this is not read (it could not have been written).
pub const MAX_RECORD_BYTES: usize = 4 << 20;
/// Files one record names at most (the earliest read are kept).
pub const MAX_FILES: usize = 16_384;
/// Byte ranges one file's record keeps at most; beyond, the closest ones are joined.
pub const MAX_RANGES: usize = 16;
/// Ranges are widened to multiples of this: finer would only grow the record, since replay
/// fetches whole chunks (64 KiB at least) anyway.
pub const GRAIN: u64 = 64 << 10;
/// At each merge, what earlier starts weigh is multiplied by this: a record follows what
/// starts do now, and forgets what they stopped doing after a few starts.
pub const DECAY: f64 = 0.75;
/// Files read by fewer than this share of recent starts are dropped from the record.
pub const FORGET_SHARE: f64 = 0.2;
/// Files read by at least this share of recent starts are replayed: what most starts need.
pub const REPLAY_SHARE: f64 = 0.5;
/// A record is rewritten at every start until it has merged this many; afterwards only when
/// a start read something the record would not replay, or skipped something it would.
pub const SETTLED_STARTS: f64 = 3.0;

/// One layer's start record, as stored (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartRecord {
    pub format: String,
    pub version: u32,
    /// The layer the record is about (`blake3:<hex>`); a record found under another layer's
    /// name is ignored.
    pub layer: String,
    /// How many starts were merged, each weighed down by [`DECAY`] per later one.
    pub starts: f64,
    /// In the order starts read them (by `rank`).
    pub files: Vec<FileRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    /// The file's entry index in the layer's manifest (the entry that holds its content).
    pub entry: u32,
    /// Byte ranges of the file read, `[start, end)`, sorted, multiples of [`GRAIN`] (the
    /// last may end at the file's end or past it; replay clips).
    pub ranges: Vec<[u64; 2]>,
    /// How many of the merged starts read it (decayed like `starts`).
    pub weight: f64,
    /// When starts read it, from 0 (first) to 1 (last), averaged over them.
    pub rank: f64,
}

/// What one start read of one layer, in the order it first read each file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    pub files: Vec<ObservedFile>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ObservedFile {
    pub entry: u32,
    /// Sorted, disjoint, in [`GRAIN`] multiples.
    pub ranges: Vec<Range<u64>>,
    /// When the start first read it, 0 to 1.
    pub rank: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("start record is {0} bytes, more than the {MAX_RECORD_BYTES} allowed")]
    TooLarge(usize),
    #[error("start record is not valid: {0}")]
    Malformed(String),
    #[error("start record has format {format:?} version {version}; this strata reads {FORMAT:?} version {VERSION}")]
    Unsupported { format: String, version: u32 },
    #[error("start record is about layer {found}, not {expected}")]
    WrongLayer { expected: String, found: String },
}

impl StartRecord {
    /// An empty record of `layer`.
    pub fn new(layer: &Digest) -> StartRecord {
        StartRecord {
            format: FORMAT.into(),
            version: VERSION,
            layer: layer.to_string(),
            starts: 0.0,
            files: Vec::new(),
        }
    }

    /// Parses a stored record of `layer`. What is out of bounds in an otherwise readable record
    /// (too many files or ranges, empty or reversed ranges, weights that are not numbers) is
    /// dropped, not trusted: the record is a hint from a store that may lie.
    pub fn decode(bytes: &[u8], layer: &Digest) -> Result<StartRecord, RecordError> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge(bytes.len()));
        }
        let mut r: StartRecord =
            serde_json::from_slice(bytes).map_err(|e| RecordError::Malformed(e.to_string()))?;
        if r.format != FORMAT || r.version != VERSION {
            return Err(RecordError::Unsupported {
                format: r.format,
                version: r.version,
            });
        }
        if r.layer != layer.to_string() {
            return Err(RecordError::WrongLayer {
                expected: layer.to_string(),
                found: r.layer,
            });
        }
        if !(r.starts.is_finite() && r.starts >= 0.0) {
            r.starts = 0.0;
        }
        r.files.truncate(MAX_FILES);
        let mut seen = std::collections::HashSet::new();
        r.files.retain_mut(|f| {
            f.ranges.retain(|[s, e]| s < e);
            f.ranges.sort_unstable();
            f.ranges.truncate(MAX_RANGES);
            f.weight.is_finite()
                && f.weight > 0.0
                && f.rank.is_finite()
                && !f.ranges.is_empty()
                && seen.insert(f.entry)
        });
        for f in &mut r.files {
            f.weight = f.weight.min(r.starts.max(1.0));
            f.rank = f.rank.clamp(0.0, 1.0);
        }
        r.files.sort_by(|a, b| a.rank.total_cmp(&b.rank));
        Ok(r)
    }

    /// The stored form: JSON, at most [`MAX_RECORD_BYTES`] (the latest-read files are left out
    /// if it would be larger).
    pub fn encode(&self) -> Vec<u8> {
        let mut r = self.clone();
        loop {
            let bytes = serde_json::to_vec(&r).expect("a record serializes");
            if bytes.len() <= MAX_RECORD_BYTES || r.files.is_empty() {
                return bytes;
            }
            let keep = r.files.len() * MAX_RECORD_BYTES / bytes.len();
            r.files.truncate(keep.min(r.files.len() - 1));
        }
    }

    /// The files a start should fetch first, in order: those most recent starts read.
    pub fn replay(&self) -> impl Iterator<Item = &FileRecord> {
        let starts = self.starts.max(f64::MIN_POSITIVE);
        self.files
            .iter()
            .filter(move |f| f.weight / starts >= REPLAY_SHARE)
    }

    /// Merges one more start into the record: earlier starts weigh [`DECAY`] less, the files
    /// this start read weigh one more, with their rank averaged by weight and their ranges
    /// joined; files few recent starts read are forgotten.
    pub fn merge(&mut self, start: &Observation) {
        self.starts = self.starts * DECAY + 1.0;
        for f in &mut self.files {
            f.weight *= DECAY;
        }
        let mut index: std::collections::HashMap<u32, usize> = self
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.entry, i))
            .collect();
        for o in &start.files {
            let ranges = o.ranges.iter().map(|r| [r.start, r.end]);
            match index.get(&o.entry) {
                Some(&i) => {
                    let f = &mut self.files[i];
                    f.rank = (f.rank * f.weight + o.rank) / (f.weight + 1.0);
                    f.weight += 1.0;
                    let mut all: Vec<Range<u64>> = f.ranges.iter().map(|[s, e]| *s..*e).collect();
                    all.extend(o.ranges.iter().cloned());
                    f.ranges = join_ranges(all)
                        .into_iter()
                        .map(|r| [r.start, r.end])
                        .collect();
                }
                None => {
                    index.insert(o.entry, self.files.len());
                    self.files.push(FileRecord {
                        entry: o.entry,
                        ranges: ranges.collect(),
                        weight: 1.0,
                        rank: o.rank,
                    });
                }
            }
        }
        let starts = self.starts;
        self.files.retain(|f| f.weight / starts >= FORGET_SHARE);
        self.files.sort_by(|a, b| a.rank.total_cmp(&b.rank));
        self.files.truncate(MAX_FILES);
    }

    /// Whether merging `start` changes what the record makes a start fetch (or the record is
    /// still young), so that a settled record is not rewritten by every start.
    pub fn worth_merging(&self, start: &Observation) -> bool {
        if self.starts < SETTLED_STARTS {
            return true;
        }
        let replayed: std::collections::HashSet<u32> = self.replay().map(|f| f.entry).collect();
        let read: std::collections::HashSet<u32> = start.files.iter().map(|f| f.entry).collect();
        replayed != read
    }
}

/// Sorts and joins ranges that touch or overlap, then joins the closest neighbours until at
/// most [`MAX_RANGES`] are left.
pub fn join_ranges(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.retain(|r| r.start < r.end);
    ranges.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    while out.len() > MAX_RANGES {
        let i = (1..out.len())
            .min_by_key(|&i| out[i].start - out[i - 1].end)
            .expect("more than one range");
        out[i - 1].end = out[i].end;
        out.remove(i);
    }
    out
}

/// `range` widened to [`GRAIN`] multiples.
pub fn to_grain(range: Range<u64>) -> Range<u64> {
    let start = range.start / GRAIN * GRAIN;
    let end = range.end.div_ceil(GRAIN).saturating_mul(GRAIN);
    start..end.max(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer() -> Digest {
        Digest::of(b"layer")
    }

    fn start(files: &[(u32, Range<u64>)]) -> Observation {
        let n = files.len() as f64;
        Observation {
            files: files
                .iter()
                .enumerate()
                .map(|(i, (entry, r))| ObservedFile {
                    entry: *entry,
                    ranges: vec![to_grain(r.clone())],
                    rank: i as f64 / n,
                })
                .collect(),
        }
    }

    fn replayed(r: &StartRecord) -> Vec<u32> {
        r.replay().map(|f| f.entry).collect()
    }

    #[test]
    fn what_most_starts_read_is_replayed_in_the_order_they_read_it() {
        let mut r = StartRecord::new(&layer());
        // Every start reads 1, 2, 3 in that order; each also reads one file of its own.
        for own in 100..106u32 {
            r.merge(&start(&[(1, 0..10), (2, 0..10), (own, 0..10), (3, 0..10)]));
        }
        assert_eq!(replayed(&r), vec![1, 2, 3], "{r:#?}");
        // The starts change: 3 is read first now, 1 no longer at all.
        for _ in 0..6 {
            r.merge(&start(&[(3, 0..10), (2, 0..10)]));
        }
        assert_eq!(replayed(&r), vec![3, 2]);
        assert!(
            r.files.iter().all(|f| f.entry != 1),
            "forgotten once few starts read it"
        );
    }

    #[test]
    fn ranges_are_widened_joined_and_bounded() {
        assert_eq!(to_grain(1..2), 0..GRAIN);
        assert_eq!(to_grain(GRAIN..GRAIN + 1), GRAIN..2 * GRAIN);
        assert_eq!(
            join_ranges(vec![5..9, 0..5, 20..30, 8..12]),
            vec![0..12, 20..30]
        );
        let many: Vec<Range<u64>> = (0..100u64).map(|i| i * 10..i * 10 + 1 + i % 3).collect();
        let joined = join_ranges(many);
        assert_eq!(joined.len(), MAX_RANGES);
        assert_eq!(joined.first().unwrap().start, 0);
        assert_eq!(joined.last().unwrap().end, 991);
    }

    #[test]
    fn a_settled_record_is_rewritten_only_when_starts_change() {
        let mut r = StartRecord::new(&layer());
        let same = start(&[(1, 0..10), (2, 0..10)]);
        while r.starts < SETTLED_STARTS {
            assert!(r.worth_merging(&same));
            r.merge(&same);
        }
        assert!(!r.worth_merging(&same));
        assert!(r.worth_merging(&start(&[(1, 0..10), (2, 0..10), (7, 0..1)])));
    }

    #[test]
    fn stored_records_round_trip_and_hostile_ones_are_cut_down_or_refused() {
        let mut r = StartRecord::new(&layer());
        r.merge(&start(&[(4, 0..100), (2, 70_000..80_000)]));
        let back = StartRecord::decode(&r.encode(), &layer()).unwrap();
        assert_eq!(back, r);

        let other = Digest::of(b"another layer");
        assert!(matches!(
            StartRecord::decode(&r.encode(), &other),
            Err(RecordError::WrongLayer { .. })
        ));
        let v2 = serde_json::to_vec(&StartRecord {
            version: 2,
            ..r.clone()
        })
        .unwrap();
        assert!(matches!(
            StartRecord::decode(&v2, &layer()),
            Err(RecordError::Unsupported { version: 2, .. })
        ));
        assert!(matches!(
            StartRecord::decode(b"{not json", &layer()),
            Err(RecordError::Malformed(_))
        ));
        assert!(matches!(
            StartRecord::decode(&vec![b' '; MAX_RECORD_BYTES + 1], &layer()),
            Err(RecordError::TooLarge(_))
        ));

        // Readable but out of bounds: cut down to what the bounds allow.
        let hostile = StartRecord {
            starts: 1.0,
            files: (0..MAX_FILES as u32 + 10)
                .map(|i| FileRecord {
                    entry: i % (MAX_FILES as u32 + 5), // some entries twice
                    ranges: (0..20u64)
                        .map(|k| [k * 2 + 1, k * 2])
                        .chain([[0, 9]])
                        .collect(),
                    weight: if i == 3 { f64::MAX } else { 1.0 },
                    rank: -5.0,
                })
                .collect(),
            ..r.clone()
        };
        let cut = StartRecord::decode(&serde_json::to_vec(&hostile).unwrap(), &layer()).unwrap();
        assert!(cut.files.len() <= MAX_FILES);
        assert!(cut
            .files
            .iter()
            .all(|f| f.ranges == vec![[0, 9]] && f.weight <= 1.0 && f.rank == 0.0));
        let entries: std::collections::HashSet<u32> = cut.files.iter().map(|f| f.entry).collect();
        assert_eq!(entries.len(), cut.files.len(), "no entry twice");
    }

    #[test]
    fn a_record_too_large_to_store_keeps_the_earliest_files() {
        let mut r = StartRecord::new(&layer());
        r.starts = 1.0;
        r.files = (0..MAX_FILES as u32)
            .map(|i| FileRecord {
                entry: i,
                ranges: (0..MAX_RANGES as u64)
                    .map(|k| [k * 1_000_000_000_000, k * 1_000_000_000_000 + 1])
                    .collect(),
                weight: 1.0,
                rank: i as f64 / MAX_FILES as f64,
            })
            .collect();
        let bytes = r.encode();
        assert!(bytes.len() <= MAX_RECORD_BYTES);
        let back = StartRecord::decode(&bytes, &layer()).unwrap();
        assert!(back.files.len() < MAX_FILES);
        assert_eq!(back.files[0].entry, 0);
        assert_eq!(back.files, r.files[..back.files.len()]);
    }
}
