use std::os::unix::ffi::OsStrExt;

use clap::Args;
use strata_fs::manifest::{Entry, Kind, Manifest};

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
    let layers =
        strata_fs::mount::load_layers(&store, std::slice::from_ref(&a.dataset), None).await?;
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
    let tree = if a.summary { Vec::new() } else { walk(m) };
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
