use clap::Args;
use strata_fs::refs::{self, DatasetRef};

use crate::GlobalArgs;

#[derive(Args)]
pub struct LsArgs {
    /// Store URL.
    store: String,
    /// Only this dataset (NAME) or this ref (NAME:TAG).
    filter: Option<String>,
    #[arg(long)]
    json: bool,
    /// Show where the tag NAME:TAG pointed over time (publishes, `strata tag`, `strata rm`),
    /// oldest first.
    #[arg(long)]
    history: bool,
}

pub async fn run(g: &GlobalArgs, a: LsArgs) -> anyhow::Result<()> {
    let store = super::open_store(g, &a.store).await?;
    if a.history {
        let Some(r) = a.filter.as_deref() else {
            anyhow::bail!("--history needs a tag: NAME:TAG");
        };
        let r = DatasetRef::parse(r)?;
        if r.pinned.is_some() {
            anyhow::bail!("{r} is a pinned layer: only a tag (NAME:TAG) has a history");
        }
        let h = refs::history::read(&store, &r).await?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&h)?);
            return Ok(());
        }
        if h.moves.is_empty() {
            println!("{r}: no moves recorded in {}", a.store);
        }
        for m in &h.moves {
            let to = m.layer.as_deref().unwrap_or("(removed)");
            println!("{}\t{to}\t{}", crate::units::when(m.at), m.by);
        }
        // The ref is the truth; a writer that died between moving it and appending leaves
        // the history behind.
        let now = match refs::resolve(&store, &r).await {
            Ok(d) => Some(d.to_string()),
            Err(strata_fs::error::FsError::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        if let Some(last) = h.moves.last() {
            if last.layer != now {
                println!(
                    "(the tag now points at {}: a move since is not in the history)",
                    now.as_deref().unwrap_or("nothing: it is removed")
                );
            }
        }
        return Ok(());
    }
    let (name, tag) = match &a.filter {
        Some(f) if f.contains(':') => {
            let r = DatasetRef::parse(f)?;
            (Some(r.name), Some(r.tag))
        }
        Some(f) => (Some(f.clone()), None),
        None => (None, None),
    };
    let mut found = refs::list(&store, name.as_deref()).await?;
    if let Some(tag) = &tag {
        found.retain(|(r, _)| &r.tag == tag);
    }
    if a.filter.is_some() && found.is_empty() {
        anyhow::bail!("no dataset {} in {}", a.filter.unwrap_or_default(), a.store);
    }
    if a.json {
        let list: Vec<_> = found
            .iter()
            .map(|(r, d)| serde_json::json!({"name": r.name, "tag": r.tag, "layer": d.to_string()}))
            .collect();
        println!("{}", serde_json::Value::Array(list));
    } else {
        for (r, d) in found {
            println!("{r}\t{d}");
        }
    }
    Ok(())
}
