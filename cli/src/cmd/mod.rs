pub mod cat;
pub mod daemon;
pub mod inspect;
pub mod ls;
pub mod mount;
pub mod publish;
pub mod run;
pub mod status;
pub mod volume;

use std::sync::Arc;

use anyhow::Context;
use strata_store::Store;

use crate::GlobalArgs;

pub async fn open_store(g: &GlobalArgs, url: &str) -> anyhow::Result<Arc<dyn Store>> {
    strata_store::open_store(url, &g.store_options())
        .await
        .with_context(|| format!("opening store {url}"))
}

/// Resolves dataset refs and loads their layers, in the order given.
pub async fn load_layers(
    store: &Arc<dyn Store>,
    refs: &[String],
    cache_dir: Option<&std::path::Path>,
) -> anyhow::Result<Vec<strata_fs::layer::Layer>> {
    let mut layers = Vec::new();
    for r in refs {
        let parsed = strata_fs::refs::DatasetRef::parse(r)?;
        let digest = strata_fs::refs::resolve(store, &parsed).await?;
        let layer = strata_fs::layer::Layer::load(store, digest, cache_dir)
            .await
            .with_context(|| format!("loading dataset {parsed}"))?;
        layers.push(layer);
    }
    Ok(layers)
}
