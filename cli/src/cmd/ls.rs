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
}

pub async fn run(g: &GlobalArgs, a: LsArgs) -> anyhow::Result<()> {
    let store = super::open_store(g, &a.store).await?;
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
