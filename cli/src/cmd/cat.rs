use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use cache::{CacheConfig, ChunkCache};
use clap::Args;
use strata_fs::stack::{FileKind, LayerStack, ROOT_INO};

use crate::GlobalArgs;

#[derive(Args)]
pub struct CatArgs {
    /// Store URL.
    store: String,
    /// Dataset ref, NAME:TAG or NAME@blake3:…
    dataset: String,
    /// Path of the file inside the dataset.
    path: String,
}

const PIECE: u32 = 4 << 20;

pub async fn run(g: &GlobalArgs, a: CatArgs) -> anyhow::Result<()> {
    let store = super::open_store(g, &a.store).await?;
    let layers = vec![super::load_dataset(g, &store, &a.dataset).await?];
    let cache = ChunkCache::new(&CacheConfig {
        disk_dir: None,
        disk_capacity: 0,
        memory_capacity: 64 << 20,
        fetch_deadline: cache::DEFAULT_FETCH_DEADLINE,
    })?
    .reader(store);
    let stack = LayerStack::new(layers, cache)?;
    let mut ino = ROOT_INO;
    let mut kind = FileKind::Dir;
    for part in a.path.split('/').filter(|p| !p.is_empty()) {
        if kind != FileKind::Dir {
            anyhow::bail!("{}: not a directory on the way to {}", a.dataset, a.path);
        }
        let attr = stack
            .lookup(ino, part.as_bytes())
            .with_context(|| format!("{} in {}: no such file", a.path, a.dataset))?;
        ino = attr.ino;
        kind = attr.kind;
    }
    match kind {
        FileKind::File => {}
        FileKind::Dir => anyhow::bail!("{} in {} is a directory", a.path, a.dataset),
        FileKind::Symlink => {
            let target = stack.readlink(ino)?;
            anyhow::bail!(
                "{} in {} is a symlink to {}",
                a.path,
                a.dataset,
                String::from_utf8_lossy(&target)
            )
        }
    }
    let size = stack.getattr(ino)?.size;
    let stack = Arc::new(stack);
    let mut out = std::io::stdout().lock();
    let mut offset = 0u64;
    while offset < size {
        let data = stack
            .read(ino, offset, PIECE)
            .await
            .with_context(|| format!("reading {} at offset {offset}", a.path))?;
        if data.is_empty() {
            break;
        }
        out.write_all(&data)?;
        offset += data.len() as u64;
    }
    out.flush()?;
    Ok(())
}
