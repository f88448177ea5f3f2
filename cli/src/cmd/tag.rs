//! `strata tag` and `strata rm`: move and remove tags, by compare-and-swap.

use clap::Args;
use strata_fs::gc::lease::WriterLease;
use strata_fs::refs::{self, DatasetRef};

use crate::GlobalArgs;

#[derive(Args)]
pub struct TagArgs {
    /// Store URL.
    store: String,
    /// The layer to point at: NAME:TAG (where that tag points now) or NAME@blake3:<hex>.
    source: String,
    /// The tag to point at it: NAME:TAG (made if new, moved if not).
    target: String,
    #[arg(long)]
    json: bool,
    /// Sign the moved ref with this key file (`strata key generate`).
    #[arg(long, env = "STRATA_SIGN_KEY", value_name = "FILE")]
    sign_key: Option<std::path::PathBuf>,
}

pub async fn tag(g: &GlobalArgs, a: TagArgs) -> anyhow::Result<()> {
    let store = super::open_store(g, &a.store).await?;
    let signer = super::key::load(a.sign_key.as_ref())?;
    let trust = g.trust()?;
    let source = DatasetRef::parse(&a.source)?;
    let target = DatasetRef::parse(&a.target)?;
    if target.pinned.is_some() {
        anyhow::bail!("{}: a tag is NAME:TAG, not a pinned layer", a.target);
    }
    // The layer is one this command did not write: garbage collection must not take it
    // between the check below and the ref's move.
    let lease = WriterLease::acquire(&store, "tag").await?;
    let moved = async {
        // With trusted keys, only a layer a trusted publisher signed is tagged.
        let layer = refs::resolve_trusted(&store, &source, trust.as_deref()).await?;
        // A tag must never name a layer a reader would not find.
        if store
            .head(&format!("layers/{}", layer.to_hex()))
            .await?
            .is_none()
        {
            anyhow::bail!("layer {layer} ({source}) is not in {}", a.store);
        }
        lease.ensure_held().await?;
        let previous = refs::set(&store, &target, &layer, "tag", signer.as_deref()).await?;
        Ok((layer, previous))
    }
    .await;
    lease.release().await;
    let (layer, previous) = moved?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"tag": target.to_string(), "layer": layer.to_string(),
                "previous": previous.map(|d| d.to_string())})
        );
    } else {
        match previous {
            Some(p) if p == layer => println!("{target} already points at {layer}"),
            Some(p) => println!("{target} -> {layer} (was {p})"),
            None => println!("{target} -> {layer}"),
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct RmArgs {
    /// Store URL.
    store: String,
    /// NAME:TAG (NAME alone is NAME:latest), or with --all a dataset NAME.
    dataset: String,
    /// Remove every tag of the dataset NAME.
    #[arg(long)]
    all: bool,
    #[arg(long)]
    json: bool,
    /// Sign the removal with this key file (`strata key generate`): daemons that trust it
    /// then refuse the tag, rather than an unsigned ref.
    #[arg(long, env = "STRATA_SIGN_KEY", value_name = "FILE")]
    sign_key: Option<std::path::PathBuf>,
}

pub async fn rm(g: &GlobalArgs, a: RmArgs) -> anyhow::Result<()> {
    let store = super::open_store(g, &a.store).await?;
    let signer = super::key::load(a.sign_key.as_ref())?;
    let tags: Vec<DatasetRef> = if a.all {
        if a.dataset.contains([':', '@']) {
            anyhow::bail!("--all takes a dataset NAME, not {}", a.dataset);
        }
        let found = refs::list(&store, Some(&a.dataset)).await?;
        if found.is_empty() {
            anyhow::bail!("no dataset {} in {}", a.dataset, a.store);
        }
        found.into_iter().map(|(r, _)| r).collect()
    } else {
        vec![DatasetRef::parse(&a.dataset)?]
    };
    let mut removed = Vec::new();
    for r in &tags {
        let layer = match refs::remove(&store, r, signer.as_deref()).await {
            Ok(layer) => layer,
            // Removed by someone else since the listing: what was asked for is done.
            Err(strata_fs::error::FsError::NotFound(_)) if a.all => continue,
            Err(e) => {
                if !removed.is_empty() {
                    eprintln!(
                        "strata: removed before the error: {}",
                        serde_json::Value::Array(removed)
                    );
                }
                return Err(e.into());
            }
        };
        if !a.json {
            println!("removed {r} (it pointed at {layer}; the layer stays in the store: see `strata du`)");
        }
        removed.push(serde_json::json!({"tag": r.to_string(), "layer": layer.to_string()}));
    }
    if a.json {
        println!("{}", serde_json::Value::Array(removed));
    }
    Ok(())
}
