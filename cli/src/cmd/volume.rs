//! `strata volume ls|show|history|squash|rm`: persistent volumes in a store.

use std::sync::Arc;

use anyhow::bail;
use clap::{Args, Subcommand};
use strata_fs::volume::{self, VolumeRef};
use strata_store::Store;

use crate::units::human;
use crate::GlobalArgs;

#[derive(Args)]
pub struct VolumeArgs {
    #[command(subcommand)]
    command: VolumeCommand,
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// List the volumes in a store (SCOPE/NAME, commits).
    Ls {
        store: String,
        #[arg(long)]
        json: bool,
    },
    /// A volume's head: its commits and the layers of its chain.
    Show {
        store: String,
        volume: String,
        #[arg(long)]
        json: bool,
    },
    /// A volume's commits, newest first.
    History { store: String, volume: String },
    /// Squash a volume's commits into one layer now (the daemon also does it after
    /// --squash-after commits); only a manifest is uploaded.
    Squash { store: String, volume: String },
    /// Remove a volume, by compare-and-swap on its head (its layers stay in the store until
    /// `strata gc`): a commit that lands meanwhile makes it fail, removing nothing.
    Rm { store: String, volume: String },
}

/// The store, the volume and its head; an error if the volume does not exist (a removed one,
/// whose head is an empty chain, does not).
async fn existing(
    g: &GlobalArgs,
    store: &str,
    name: &str,
) -> anyhow::Result<(Arc<dyn Store>, VolumeRef, volume::VolumeHead)> {
    let s = super::open_store(g, store).await?;
    let v = VolumeRef::parse(name)?;
    let (head, version) = volume::read_head(&s, &v).await?;
    if version.is_none() || head.commits.is_empty() {
        bail!("no volume {v} in {store}");
    }
    Ok((s, v, head))
}

pub async fn run(g: &GlobalArgs, a: VolumeArgs) -> anyhow::Result<()> {
    match a.command {
        VolumeCommand::Ls { store, json } => {
            let s = super::open_store(g, &store).await?;
            let mut rows = Vec::new();
            for key in s.list("volumes/").await? {
                let Some(name) = key
                    .strip_prefix("volumes/")
                    .and_then(|k| k.strip_suffix("/head"))
                else {
                    continue;
                };
                let Ok(v) = VolumeRef::parse(name) else {
                    continue;
                };
                let (head, _) = volume::read_head(&s, &v).await?;
                if !head.commits.is_empty() {
                    rows.push((v, head.commits.len()));
                }
            }
            if json {
                let list: Vec<_> = rows
                    .iter()
                    .map(|(v, n)| serde_json::json!({"volume": v.to_string(), "commits": n}))
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                for (v, n) in rows {
                    println!("{v}\t{n} commits");
                }
            }
        }
        VolumeCommand::Show {
            store,
            volume: name,
            json,
        } => {
            // A removed volume is shown while the store keeps conflicts or uppers of it.
            let s = super::open_store(g, &store).await?;
            let v = VolumeRef::parse(&name)?;
            let (head, _) = volume::read_head(&s, &v).await?;
            let conflicts = volume::conflicts(&s, &v).await?;
            let kept = volume::kept(&s, &v).await?;
            if head.commits.is_empty() && conflicts.is_empty() && kept.is_empty() {
                bail!("no volume {v} in {store}");
            }
            if json {
                let value = serde_json::json!({
                    "volume": v.to_string(),
                    "commits": head.commits,
                    "conflicts": conflicts,
                    "kept": kept,
                });
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!("volume {v}: {} commits", head.commits.len());
                for (i, c) in head.commits.iter().enumerate() {
                    println!("  layer {}: {}", i + 1, c.layer);
                }
                for c in &conflicts {
                    let layers: Vec<String> = c
                        .layers
                        .iter()
                        .map(|l| format!("--layer {}@{l}", v.name))
                        .collect();
                    println!(
                        "  conflict {} on {}: mount it with `strata mount {store} MOUNTPOINT {}`",
                        c.id,
                        c.paths.join(", "),
                        layers.join(" ")
                    );
                }
                for k in &kept {
                    let state = if k.quarantined {
                        "quarantined, waiting for an operator".to_string()
                    } else {
                        format!("{} failed commits so far, retried", k.attempts)
                    };
                    println!(
                        "  kept upper {} on host {} in {} ({state}): {}",
                        k.id, k.host, k.path, k.last_error
                    );
                }
            }
        }
        VolumeCommand::History {
            store,
            volume: name,
        } => {
            let (_, _, head) = existing(g, &store, &name).await?;
            for (i, c) in head.commits.iter().enumerate().rev() {
                let squashed = match c.squashed.len() {
                    0 => String::new(),
                    n => format!("\tsquash of {n} commits"),
                };
                println!(
                    "#{}\t{}\t{} changes\t{} uploaded\t{}{squashed}",
                    i + 1,
                    crate::units::when(c.committed_at),
                    c.changes,
                    human(c.bytes_uploaded),
                    c.layer
                );
            }
        }
        VolumeCommand::Squash {
            store,
            volume: name,
        } => {
            let (s, v, head) = existing(g, &store, &name).await?;
            match volume::squash(&s, &v, None).await? {
                Some((new, _)) => println!(
                    "squashed volume {v}: {} commits into layer {}",
                    head.commits.len(),
                    new.commits[0].layer
                ),
                None if head.commits.len() < 2 => {
                    println!(
                        "volume {v}: {} commit, nothing to squash",
                        head.commits.len()
                    )
                }
                None => bail!("volume {v}: the head moved while squashing (a commit or a removal landed); try again"),
            }
        }
        VolumeCommand::Rm {
            store,
            volume: name,
        } => {
            let s = super::open_store(g, &store).await?;
            let v = VolumeRef::parse(&name)?;
            let commits = volume::remove(&s, &v).await?;
            println!("removed volume {v} ({commits} commits; `strata gc` collects its layers)");
        }
    }
    Ok(())
}
