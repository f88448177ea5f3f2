use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use strata_fs::publish::{publish, PublishOptions, PublishProgress};
use strata_fs::refs::DatasetRef;

use crate::units::human;
use crate::GlobalArgs;

#[derive(Args)]
pub struct PublishArgs {
    /// Directory to publish.
    dir: PathBuf,
    /// Store URL: file:///path, a directory path, or s3://bucket/prefix.
    store: String,
    /// Dataset ref to point at the new layer, NAME:TAG (TAG defaults to `latest`).
    target: String,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Chunks looked up in the store at once (new chunks go up in packs, 4 at a time).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Sign the ref with this key file (`strata key generate`), so daemons that trust its
    /// public key mount it.
    #[arg(long, env = "STRATA_SIGN_KEY", value_name = "FILE")]
    sign_key: Option<PathBuf>,
}

pub async fn run(g: &GlobalArgs, a: PublishArgs) -> anyhow::Result<()> {
    let target = DatasetRef::parse(&a.target)?;
    let store = super::open_store(g, &a.store).await?;
    let progress = Arc::new(PublishProgress::default());
    let show_bar = !a.quiet && !a.json && std::io::stderr().is_terminal();
    let ticker = show_bar.then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .expect("valid template"),
        );
        let p = progress.clone();
        tokio::spawn(async move {
            loop {
                bar.set_length(p.total_bytes.load(Ordering::Relaxed));
                bar.set_position(p.bytes_done.load(Ordering::Relaxed));
                bar.set_message(format!(
                    "files {}/{} uploaded {}",
                    p.files_done.load(Ordering::Relaxed),
                    p.total_files.load(Ordering::Relaxed),
                    human(p.bytes_uploaded.load(Ordering::Relaxed))
                ));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    let options = PublishOptions {
        concurrency: a.concurrency.max(1),
        sign_key: super::key::load(a.sign_key.as_ref())?,
        ..Default::default()
    };
    let result = publish(&a.dir, &store, Some(&target), &options, progress).await;
    if let Some(t) = ticker {
        t.abort();
        eprint!("\r\x1b[2K");
    }
    let report = result
        .with_context(|| format!("publishing {} to {} as {target}", a.dir.display(), a.store))?;
    for w in &report.warnings {
        tracing::warn!("{w}");
        if !a.json {
            eprintln!("warning: {w}");
        }
    }
    let layer = report.layer.expect("publish returns a layer");
    let secs = report.elapsed.as_secs_f64().max(1e-9);
    if a.json {
        let out = serde_json::json!({
            "ref": target.to_string(),
            "layer": layer.to_string(),
            "files": report.files,
            "dirs": report.dirs,
            "symlinks": report.symlinks,
            "hardlinks": report.hardlinks,
            "whiteouts": report.whiteouts,
            "bytes": report.bytes,
            "chunks_total": report.chunks_total,
            "chunks_new": report.chunks_new,
            "packs_new": report.packs_new,
            "bytes_uploaded": report.bytes_uploaded,
            "manifest_bytes": report.manifest_bytes,
            "seconds": secs,
            "warnings": report.warnings,
        });
        println!("{out}");
    } else {
        println!("published {target} -> {layer}");
        println!(
            "  {} files, {} dirs, {} symlinks, {} hard links, {} whiteouts, {}",
            report.files,
            report.dirs,
            report.symlinks,
            report.hardlinks,
            report.whiteouts,
            human(report.bytes)
        );
        println!(
            "  chunks: {} total, {} new in {} packs; uploaded {} in {:.1}s ({}/s)",
            report.chunks_total,
            report.chunks_new,
            report.packs_new,
            human(report.bytes_uploaded),
            secs,
            human((report.bytes as f64 / secs) as u64)
        );
    }
    Ok(())
}
