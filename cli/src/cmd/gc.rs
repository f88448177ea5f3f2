//! `strata gc` and `strata retain`: collecting what no root keeps alive, and how many earlier
//! layers of a dataset's tags count as roots.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use strata_fs::gc::collect::{self, GcOptions};
use strata_fs::gc::retention::{self, Policy};
use strata_fs::gc::usage::Tally;
use strata_store::{CountingStore, Store};

use crate::units::{human, parse_duration};
use crate::GlobalArgs;

#[derive(Args)]
pub struct GcArgs {
    /// Store URL.
    store: String,
    /// Objects written within this long are never deleted (it also covers clocks that
    /// disagree).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    grace: Duration,
    /// Say what would be deleted, and delete nothing (takes no lock).
    #[arg(long)]
    dry_run: bool,
    /// For datasets without a policy of their own (`strata retain`): keep this many earlier
    /// layers per tag [default: every one].
    #[arg(long, value_name = "N")]
    keep_history: Option<u32>,
    /// For datasets without a policy of their own: keep the earlier layers a tag left within
    /// this long (e.g. 30d).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    keep_within: Option<Duration>,
    /// Everything a volume's squash replaced is kept this long after the squash, whoever
    /// mounted what (a host back from a crash commits its kept uppers onto it); after that,
    /// only what a live mount or kept upper may still need.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    keep_replaced: Duration,
    /// Rewrite packs of which less than this percentage is live: their live chunks are
    /// copied into new packs (behind forwarding maps, so layers keep their digests) and the
    /// old packs deleted. 0 never rewrites.
    #[arg(long, value_name = "PERCENT", default_value_t = 50.0, value_parser = parse_percent)]
    rewrite_below: f64,
    /// How long to wait for publishes and commits under way before giving up.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    wait: Duration,
    #[arg(long)]
    json: bool,
}

pub async fn gc(g: &GlobalArgs, a: GcArgs) -> anyhow::Result<i32> {
    let opened = super::open_store(g, &a.store).await?;
    let counting = Arc::new(CountingStore::new(opened));
    let store: Arc<dyn Store> = counting.clone();
    let default_policy = (a.keep_history.is_some() || a.keep_within.is_some())
        .then(|| Policy::new(a.keep_history, a.keep_within.map(|d| d.as_secs())));
    let options = GcOptions {
        grace: a.grace,
        dry_run: a.dry_run,
        default_policy,
        writer_wait: a.wait,
        keep_replaced: a.keep_replaced,
        rewrite_below: a.rewrite_below / 100.0,
        ..GcOptions::default()
    };
    let report = collect::collect(&store, &options).await?;
    let requests = counting.snapshot();
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["freed_bytes"] = report.freed().into();
        v["requests"] = serde_json::to_value(requests)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let tally = |t: &Tally| format!("{} objects, {}", t.objects, human(t.bytes));
        let verb = if report.dry_run {
            "would delete"
        } else {
            "deleted"
        };
        println!("{}: {}", report.store, tally(&report.before));
        for (kind, t) in &report.deleted {
            println!("  {verb} {kind}: {}", tally(t));
        }
        if report.deleted.is_empty() && report.problems.is_empty() {
            println!("  nothing to delete");
        }
        let r = &report.rewrite;
        if r.packs.objects > 0 {
            println!(
                "  {} {} mostly dead pack(s) ({}): {} live copied into {} new pack(s), {} forwarding map(s)",
                if report.dry_run { "would rewrite" } else { "rewrote" },
                r.packs.objects,
                human(r.packs.bytes),
                human(r.copied),
                r.new_packs.objects,
                r.maps.objects
            );
        }
        for s in &r.skipped {
            println!("  not rewritten: {s}");
        }
        if report.locators_rewritten > 0 {
            println!(
                "  pointed {} locator(s) at a live copy of their chunk",
                report.locators_rewritten
            );
        }
        if report.kept_recent.objects > 0 {
            println!(
                "  kept (written within the grace period of {}): {}",
                humantime::format_duration(a.grace),
                tally(&report.kept_recent)
            );
        }
        println!(
            "  left: {} ({} live layers); {} freed",
            tally(&report.after),
            report.live_layers,
            human(report.freed())
        );
        println!(
            "  {:.1}s ({:.1}s waiting for writers), {} requests ({} GET, {} PUT, {} HEAD, {} LIST, {} DELETE)",
            report.secs,
            report.waited_secs,
            requests.requests(),
            requests.get + requests.get_range + requests.get_versioned,
            requests.put + requests.compare_and_swap,
            requests.head,
            requests.list,
            requests.delete
        );
    }
    if !report.problems.is_empty() {
        eprintln!("strata gc: nothing was deleted: what looks dead may not be while these cannot be read:");
        for p in &report.problems {
            eprintln!("  {p}");
        }
        return Ok(1);
    }
    Ok(0)
}

fn parse_percent(s: &str) -> Result<f64, String> {
    match s.trim_end_matches('%').parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a percentage from 0 to 100")),
    }
}

#[derive(Args)]
pub struct RetainArgs {
    /// Store URL.
    store: String,
    /// Dataset NAME.
    name: String,
    /// Keep this many earlier layers per tag.
    #[arg(long, value_name = "N")]
    keep_history: Option<u32>,
    /// Keep the earlier layers a tag left within this long (e.g. 30d).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    keep_within: Option<Duration>,
    /// Remove the policy: every earlier layer is kept (unless `gc` is given a default).
    #[arg(long, conflicts_with_all = ["keep_history", "keep_within"])]
    clear: bool,
    #[arg(long)]
    json: bool,
}

/// Sets, clears or (with no flag) shows a dataset's retention policy.
pub async fn retain(g: &GlobalArgs, a: RetainArgs) -> anyhow::Result<()> {
    let store = super::open_store(g, &a.store).await?;
    let name = &a.name;
    if a.clear {
        retention::write(&store, name, None).await?;
    } else if a.keep_history.is_some() || a.keep_within.is_some() {
        let policy = Policy::new(a.keep_history, a.keep_within.map(|d| d.as_secs()));
        retention::write(&store, name, Some(&policy)).await?;
    }
    let policy = retention::read(&store, name).await?;
    if a.json {
        println!("{}", serde_json::json!({"dataset": name, "policy": policy}));
    } else {
        match policy {
            Some(p) => println!("{name}: {}", p.describe()),
            None => println!("{name}: no policy (every earlier layer is kept)"),
        }
    }
    Ok(())
}
