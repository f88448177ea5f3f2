use std::os::unix::ffi::OsStrExt;

use clap::Args;
use strata_fs::manifest::{Entry, Kind, Manifest};
use strata_fs::prefetch::StartRecord;

use crate::units::human;
use crate::GlobalArgs;

#[derive(Args)]
pub struct InspectArgs {
    /// Store URL.
    store: String,
    /// Dataset ref, NAME:TAG or NAME@blake3:…
    dataset: String,
    /// Only the summary, not the tree.
    #[arg(long)]
    summary: bool,
    /// The layer's start record instead of the tree: the files starts read first, in order
    /// (those marked `*` are fetched at a cold mount).
    #[arg(long, conflicts_with = "summary")]
    prefetch: bool,
    #[arg(long)]
    json: bool,
}

fn kind_char(e: &Entry<'_>) -> char {
    match e.kind {
        Kind::Dir => 'd',
        Kind::File => '-',
        Kind::Symlink => 'l',
        Kind::Whiteout => 'w',
    }
}

/// The path of entry `i` in its layer.
fn entry_path(m: &Manifest, mut i: usize) -> String {
    let mut names = Vec::new();
    while i != 0 && names.len() < 4096 {
        let e = m.entry(i);
        names.push(String::from_utf8_lossy(e.name).into_owned());
        i = e.parent as usize;
    }
    names.reverse();
    format!("/{}", names.join("/"))
}

/// What a start record says, with each file's path (`None` for an entry that is not a file of
/// the layer: the record is only a hint, and replay skips those).
struct RecordView {
    record: StartRecord,
    paths: Vec<Option<String>>,
    replayed: Vec<bool>,
    /// Bytes of each file the ranges cover (clipped to the file).
    bytes: Vec<u64>,
}

impl RecordView {
    fn new(record: StartRecord, m: &Manifest) -> RecordView {
        let replay: std::collections::HashSet<u32> = record.replay().map(|f| f.entry).collect();
        let paths = record
            .files
            .iter()
            .map(|f| {
                ((f.entry as usize) < m.entry_count()
                    && m.entry(f.entry as usize).kind == Kind::File)
                    .then(|| entry_path(m, f.entry as usize))
            })
            .collect();
        let replayed = record
            .files
            .iter()
            .map(|f| replay.contains(&f.entry))
            .collect();
        let bytes = record
            .files
            .iter()
            .map(|f| {
                let size = if (f.entry as usize) < m.entry_count() {
                    m.entry(f.entry as usize).size
                } else {
                    0
                };
                f.ranges
                    .iter()
                    .map(|[s, e]| e.min(&size).saturating_sub(*s))
                    .sum()
            })
            .collect();
        RecordView {
            record,
            paths,
            replayed,
            bytes,
        }
    }

    fn replayed_bytes(&self) -> u64 {
        self.bytes
            .iter()
            .zip(&self.replayed)
            .filter(|(_, r)| **r)
            .map(|(b, _)| b)
            .sum()
    }

    fn json(&self) -> serde_json::Value {
        let files: Vec<_> = self
            .record
            .files
            .iter()
            .zip(&self.paths)
            .zip(&self.replayed)
            .zip(&self.bytes)
            .map(|(((f, path), replayed), bytes)| {
                serde_json::json!({
                    "path": path, "entry": f.entry, "ranges": f.ranges, "bytes": bytes,
                    "share": f.weight / self.record.starts.max(f64::MIN_POSITIVE),
                    "rank": f.rank, "replayed": replayed,
                })
            })
            .collect();
        serde_json::json!({
            "starts": self.record.starts,
            "replayed_files": self.replayed.iter().filter(|r| **r).count(),
            "replayed_bytes": self.replayed_bytes(),
            "files": files,
        })
    }
}

/// Depth-first, sorted: (path, entry index).
fn walk(m: &Manifest) -> Vec<(Vec<u8>, usize)> {
    let mut out = Vec::new();
    let mut stack = vec![(Vec::new(), 0usize)];
    while let Some((path, i)) = stack.pop() {
        let e = m.entry(i);
        for c in e.children().rev() {
            let mut p = path.clone();
            p.push(b'/');
            p.extend_from_slice(m.entry(c as usize).name);
            stack.push((p, c as usize));
        }
        out.push((if path.is_empty() { b"/".to_vec() } else { path }, i));
    }
    out
}

pub async fn run(g: &GlobalArgs, a: InspectArgs) -> anyhow::Result<()> {
    let store = super::open_store(g, &a.store).await?;
    let layers = [super::load_dataset(g, &store, &a.dataset).await?];
    let layer = &layers[0];
    let m = &layer.manifest;
    let mut counts = [0u64; 5];
    for i in 0..m.entry_count() {
        counts[m.entry(i).kind as usize] += 1;
    }
    let chunk_lens: Vec<u64> = (0..m.chunk_count())
        .map(|i| m.chunk(i).len as u64)
        .collect();
    let distinct = {
        let mut d: Vec<_> = (0..m.chunk_count()).map(|i| m.chunk(i).digest).collect();
        d.sort();
        d.dedup();
        d.len()
    };
    let avg = if chunk_lens.is_empty() {
        0
    } else {
        m.content_len() / chunk_lens.len() as u64
    };
    let tree = if a.summary || a.prefetch {
        Vec::new()
    } else {
        walk(m)
    };
    let record = match strata_fs::prefetch::load(&store, &layer.digest).await {
        Ok(r) => r.map(|r| RecordView::new(r, m)),
        Err(e) => {
            eprintln!("strata: the layer's start record is not used: {e}");
            None
        }
    };
    if a.json {
        let entries: Vec<_> = tree
            .iter()
            .map(|(p, i)| {
                let e = m.entry(*i);
                let mut v = serde_json::json!({
                    "path": String::from_utf8_lossy(p),
                    "kind": kind_char(&e).to_string(),
                    "mode": format!("{:o}", e.mode),
                    "uid": e.uid, "gid": e.gid, "size": e.size,
                    "mtime": e.mtime_sec,
                });
                if e.kind == Kind::Symlink {
                    v["target"] = String::from_utf8_lossy(m.symlink_target(&e)).into();
                }
                v
            })
            .collect();
        let out = serde_json::json!({
            "layer": layer.digest.to_string(),
            "entries": m.entry_count(),
            "dirs": counts[Kind::Dir as usize],
            "files": counts[Kind::File as usize],
            "symlinks": counts[Kind::Symlink as usize],
            "whiteouts": counts[Kind::Whiteout as usize],
            "opaque_root": m.root().is_opaque(),
            "bytes": m.content_len(),
            "chunks": chunk_lens.len(),
            "distinct_chunks": distinct,
            "chunk_min": chunk_lens.iter().min().copied().unwrap_or(0),
            "chunk_avg": avg,
            "chunk_max": chunk_lens.iter().max().copied().unwrap_or(0),
            "packs": m.pack_count(),
            "manifest_bytes": m.as_bytes().len(),
            "start_record": record.as_ref().map(RecordView::json),
            "tree": entries,
        });
        println!("{out}");
        return Ok(());
    }
    println!("layer     {}", layer.digest);
    println!(
        "entries   {} ({} dirs, {} files, {} symlinks, {} whiteouts)",
        m.entry_count(),
        counts[Kind::Dir as usize],
        counts[Kind::File as usize],
        counts[Kind::Symlink as usize],
        counts[Kind::Whiteout as usize]
    );
    println!("bytes     {} ({})", m.content_len(), human(m.content_len()));
    println!(
        "chunks    {} ({} distinct), size min {} / avg {} / max {}",
        chunk_lens.len(),
        distinct,
        human(chunk_lens.iter().min().copied().unwrap_or(0)),
        human(avg),
        human(chunk_lens.iter().max().copied().unwrap_or(0))
    );
    println!("packs     {}", m.pack_count());
    println!("manifest  {}", human(m.as_bytes().len() as u64));
    match &record {
        Some(r) => println!(
            "prefetch  {} files from {:.1} starts; {} fetched at a cold mount ({})",
            r.record.files.len(),
            r.record.starts,
            r.replayed.iter().filter(|r| **r).count(),
            human(r.replayed_bytes())
        ),
        None => println!("prefetch  no start record yet"),
    }
    if let (true, Some(r)) = (a.prefetch, &record) {
        println!();
        println!("  share   rank  bytes       path");
        let rows = r.record.files.iter().zip(&r.paths).zip(&r.replayed);
        for (((f, path), replayed), &bytes) in rows.zip(&r.bytes) {
            println!(
                "{} {:>5.0}% {:>5.3} {:>10}  {}",
                if *replayed { '*' } else { ' ' },
                100.0 * f.weight / r.record.starts.max(f64::MIN_POSITIVE),
                f.rank,
                human(bytes),
                path.as_deref()
                    .unwrap_or("(not a file of this layer: skipped)")
            );
        }
    }
    if !tree.is_empty() {
        println!();
    }
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    for (path, i) in tree {
        let e = m.entry(i);
        let mut line = format!(
            "{}{}{:04o} {:>6}:{:<6} {:>12} ",
            kind_char(&e),
            if e.is_opaque() { 'o' } else { ' ' },
            e.mode,
            e.uid,
            e.gid,
            e.size
        )
        .into_bytes();
        line.extend_from_slice(std::ffi::OsStr::from_bytes(&path).as_bytes());
        if e.kind == Kind::Symlink {
            line.extend_from_slice(b" -> ");
            line.extend_from_slice(m.symlink_target(&e));
        }
        line.push(b'\n');
        out.write_all(&line)?;
    }
    Ok(())
}
