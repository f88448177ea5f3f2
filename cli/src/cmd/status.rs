//! `strata mounts` and `strata stats`: what the daemon serves and how its cache is doing.

use std::path::PathBuf;

use anyhow::bail;
use cache::ReadStats;
use clap::Args;

use crate::units::human;
use crate::GlobalArgs;
use strata_daemon::{Client, MountInfo, StatsReply};
use strata_store::StoreCounts;

#[derive(Args)]
pub struct MountsArgs {
    /// One JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct StatsArgs {
    /// Only this mount (the total is still shown).
    mountpoint: Option<PathBuf>,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn mounts(g: &GlobalArgs, a: MountsArgs) -> anyhow::Result<()> {
    let mounts: Vec<MountInfo> = Client::new(g.socket()).mounts().await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&mounts)?);
        return Ok(());
    }
    if mounts.is_empty() {
        println!("no mounts");
        return Ok(());
    }
    for m in &mounts {
        let layers: Vec<&str> = m.layers.iter().map(|l| l.dataset.as_str()).collect();
        let upper = match (m.writable, m.scratch_size) {
            (false, _) if m.shared_with.is_some() => format!(
                "read-only, sharing the session of mount {}",
                m.shared_with.unwrap_or_default()
            ),
            (false, _) => "read-only".to_string(),
            (true, Some(size)) => format!("scratch ({})", human(size)),
            (true, None) => "scratch".to_string(),
        };
        let tenant = m
            .tenant
            .as_ref()
            .map_or(String::new(), |t| format!("\ttenant {t}"));
        println!(
            "{}\t{}\t{}\t{upper}{tenant}",
            m.mountpoint.display(),
            m.store,
            layers.join(" + ")
        );
    }
    Ok(())
}

pub async fn stats(g: &GlobalArgs, a: StatsArgs) -> anyhow::Result<()> {
    let mut reply: StatsReply = Client::new(g.socket()).stats().await?;
    if let Some(mp) = &a.mountpoint {
        let mp = strata_fuse::resolve_mountpoint(mp)?;
        reply.mounts.retain(|m| m.mount.mountpoint == mp);
        if reply.mounts.is_empty() {
            bail!("{} is not mounted by the daemon", mp.display());
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    let t = &reply.total;
    println!(
        "cache: disk {} of {} ({} chunk files, {} complete local copies, {} evicted), memory {} of {}, \
         manifests {}",
        human(t.disk_used),
        human(t.disk_capacity),
        t.disk_chunks,
        t.disk_files,
        t.disk_evictions,
        human(t.memory_used),
        human(t.memory_capacity),
        human(reply.manifest_bytes)
    );
    if !reply.local_integrity.is_empty() {
        println!("local copies: {}", reply.local_integrity);
    }
    println!(
        "{:<32} {:>9} {:>10} {:>9} {:>9} {:>9} {:>8} {:>10} {:>7} {:>6} {:>7} {:>9}",
        "mount",
        "reads",
        "served",
        "mem hits",
        "disk hits",
        "store",
        "GETs",
        "fetched",
        "corrupt",
        "errors",
        "direct",
        "prefilled"
    );
    for m in &reply.mounts {
        row(&m.mount.mountpoint.display().to_string(), &m.stats);
    }
    row("total", &t.reads);
    println!();
    println!(
        "{:<32} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6} {:>10} {:>10}",
        "store requests", "GET", "ranged", "HEAD", "PUT", "LIST", "DELETE", "read", "written"
    );
    for m in &reply.mounts {
        requests(&m.mount.mountpoint.display().to_string(), &m.store_requests);
    }
    requests("total (since the daemon started)", &reply.store_requests);
    for m in reply.mounts.iter().filter(|m| m.prefetch.records > 0) {
        let p = &m.prefetch;
        println!(
            "{}: prefetch from {} start record(s): {} files, {} fetched{}",
            m.mount.mountpoint.display(),
            p.records,
            p.files,
            human(p.bytes_fetched),
            if p.done { "" } else { " (running)" }
        );
    }
    let latency = &t.reads.fetch_latency;
    let fetches: u64 = latency.counts.iter().sum();
    if fetches > 0 {
        println!(
            "store fetches: {fetches}, mean {:.1} ms, p50 ≤ {}, p99 ≤ {}",
            latency.sum_micros as f64 / fetches as f64 / 1000.0,
            latency_bound(latency, 0.50),
            latency_bound(latency, 0.99)
        );
    }
    let c = &reply.commits;
    if c.committed + c.rebased + c.conflict + c.kept + c.failed > 0 {
        println!(
            "volume commits: {} committed, {} rebased, {} conflicts, {} kept, {} failed",
            c.committed, c.rebased, c.conflict, c.kept, c.failed
        );
    }
    if !reply.errors.is_empty() {
        let errors: Vec<String> = reply
            .errors
            .iter()
            .map(|(errno, n)| format!("{errno} {n}"))
            .collect();
        println!("errors answered: {}", errors.join(", "));
    }
    for k in &reply.kept {
        let state = if k.quarantined {
            "quarantined".to_string()
        } else {
            format!("{} failed attempts", k.attempts)
        };
        println!(
            "kept upper of volume {} in {} ({state}): {}",
            k.volume,
            k.path.display(),
            k.last_error
        );
    }
    Ok(())
}

/// GETs of whole objects and of versioned ones (refs, heads) count as GET, conditional
/// writes as PUT.
fn requests(name: &str, c: &StoreCounts) {
    println!(
        "{:<32} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6} {:>10} {:>10}",
        name,
        c.get + c.get_range + c.get_versioned,
        c.get_range,
        c.head,
        c.put + c.compare_and_swap,
        c.list,
        c.delete,
        human(c.bytes_read),
        human(c.bytes_written)
    );
}

fn row(name: &str, s: &ReadStats) {
    println!(
        "{:<32} {:>9} {:>10} {:>9} {:>9} {:>9} {:>8} {:>10} {:>7} {:>6} {:>7} {:>9}",
        name,
        s.reads,
        human(s.bytes_served),
        s.memory_hits,
        s.disk_hits,
        s.store_hits,
        s.store_gets,
        human(s.store_bytes),
        s.corrupt_chunks,
        s.errors,
        s.passthrough_opens,
        s.prefilled_opens
    );
}

/// The upper bound of the bucket holding quantile `q` of the fetch times.
fn latency_bound(latency: &cache::FetchLatency, q: f64) -> String {
    match latency.quantile_bound(q) {
        None => "-".into(),
        Some(b) if b.is_finite() => format!("{} ms", b * 1000.0),
        Some(_) => format!(
            "> {} s",
            cache::FETCH_LATENCY_BOUNDS[cache::FETCH_LATENCY_BOUNDS.len() - 1]
        ),
    }
}
