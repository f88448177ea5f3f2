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
        let Some(r) = a.filter.as_deref().filter(|f| f.contains(':')) else {
            anyhow::bail!("--history needs a tag: NAME:TAG");
        };
        let r = DatasetRef::parse(r)?;
        let h = refs::history::read(&store, &r).await?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&h)?);
        } else {
            for m in &h.moves {
                let to = m.layer.as_deref().unwrap_or("(removed)");
                println!("{}\t{to}\t{}", crate::units::when(m.at), m.by);
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
