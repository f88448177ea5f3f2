pub mod cat;
pub mod daemon;
pub mod docs;
pub mod du;
pub mod gc;
pub mod inspect;
pub mod key;
pub mod ls;
pub mod mount;
pub mod publish;
pub mod run;
pub mod status;
pub mod tag;
pub mod top;
pub mod volume;

use std::sync::Arc;

use anyhow::Context;
use strata_store::Store;

use crate::GlobalArgs;

/// The layer `dataset` (`NAME:TAG` or `NAME@blake3:…`) names, its ref checked against the
/// keys the command trusts.
pub async fn load_dataset(
    g: &GlobalArgs,
    store: &Arc<dyn Store>,
    dataset: &str,
) -> anyhow::Result<strata_fs::layer::Layer> {
    let trust = g.trust()?;
    let mut layers = strata_fs::mount::load_layers(
        store,
        std::slice::from_ref(&dataset.to_string()),
        None,
        trust.as_deref(),
    )
    .await?;
    Ok(layers.remove(0))
}

pub async fn open_store(g: &GlobalArgs, url: &str) -> anyhow::Result<Arc<dyn Store>> {
    strata_store::open_store(url, &g.store_options()?)
        .await
        .with_context(|| format!("opening store {url}"))
}
