//! A tag's history: every layer it pointed at, from when, and what moved it, at
//! `history/<name>/<tag>` (a record, JSON). Retention (how many earlier layers, or how long
//! back, garbage collection keeps) reads it; people read it with `strata ls --history`.
//!
//! The ref is the truth and moves first; the history is appended right after, by
//! compare-and-swap. A writer that dies in between leaves that one move out of the history
//! (the ref still says where the tag points).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use strata_cache_format::Digest;
use strata_store::{Store, StoreErrorKind};

use super::DatasetRef;
use crate::error::{FsError, FsResult};

/// Moves a history keeps: the oldest go first.
pub const MAX_MOVES: usize = 1000;

/// One move of a tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    /// The layer the tag pointed at from then on (`blake3:<hex>`); `None`: removed.
    pub layer: Option<String>,
    /// When, in seconds since the epoch (the writer's clock).
    pub at: u64,
    /// What moved it: `publish`, `tag` or `rm`.
    pub by: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct History {
    pub version: u32,
    /// Oldest first.
    pub moves: Vec<Move>,
}

impl History {
    /// The layers the tag pointed at, each with when it started and stopped pointing there
    /// (`None`: it still does), oldest first.
    pub fn spans(&self) -> Vec<(Digest, u64, Option<u64>)> {
        let mut out = Vec::new();
        for (i, m) in self.moves.iter().enumerate() {
            let Some(layer) = m.layer.as_deref().and_then(|l| Digest::parse(l).ok()) else {
                continue;
            };
            out.push((layer, m.at, self.moves.get(i + 1).map(|n| n.at)));
        }
        out
    }
}

pub fn key(r: &DatasetRef) -> String {
    format!("history/{}/{}", r.name, r.tag)
}

/// The history of tag `r` (empty if it never moved since histories were kept).
pub async fn read(store: &Arc<dyn Store>, r: &DatasetRef) -> FsResult<History> {
    Ok(read_versioned(store, r).await?.0)
}

async fn read_versioned(
    store: &Arc<dyn Store>,
    r: &DatasetRef,
) -> FsResult<(History, Option<strata_store::Version>)> {
    let key = key(r);
    match crate::record::get_versioned(store, &key).await? {
        None => Ok((
            History {
                version: 1,
                moves: Vec::new(),
            },
            None,
        )),
        Some((data, version)) => {
            let h: History = serde_json::from_slice(&data).map_err(|e| {
                FsError::InvalidInput(format!(
                    "{}: tag {r} has an unreadable history {key:?}: {e}",
                    store.url()
                ))
            })?;
            if h.version != 1 {
                return Err(FsError::InvalidInput(format!(
                    "{}: tag {r}: history version {} is not one this strata reads",
                    store.url(),
                    h.version
                )));
            }
            Ok((h, Some(version)))
        }
    }
}

/// Appends a move of tag `r` to `layer` (`None`: removed) by `by`, now.
pub async fn append(
    store: &Arc<dyn Store>,
    r: &DatasetRef,
    layer: Option<&Digest>,
    by: &str,
) -> FsResult<()> {
    let at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let key = key(r);
    // Writers of one tag append one after another; a lost race is read again and retried.
    for _ in 0..16 {
        let (mut h, version) = read_versioned(store, r).await?;
        h.moves.push(Move {
            layer: layer.map(|d| d.to_string()),
            at,
            by: by.to_string(),
        });
        let excess = h.moves.len().saturating_sub(MAX_MOVES);
        h.moves.drain(..excess);
        let body = crate::record::seal(&serde_json::to_vec(&h).expect("serializable"));
        match store.compare_and_swap(&key, version.as_ref(), body).await {
            Ok(_) => return Ok(()),
            Err(e) if e.kind == StoreErrorKind::Conflict => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(FsError::Conflict(format!(
        "{}: the history of {r} kept changing under 16 tries to append to it",
        store.url()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_store::MemoryStore;

    #[tokio::test]
    async fn moves_are_logged_in_order_and_bounded() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new("history"));
        let r = DatasetRef::parse("d:v1").unwrap();
        assert!(read(&store, &r).await.unwrap().moves.is_empty());
        let (a, b) = (Digest([1; 32]), Digest([2; 32]));
        append(&store, &r, Some(&a), "publish").await.unwrap();
        append(&store, &r, Some(&b), "tag").await.unwrap();
        append(&store, &r, None, "rm").await.unwrap();
        let h = read(&store, &r).await.unwrap();
        let by: Vec<_> = h.moves.iter().map(|m| m.by.as_str()).collect();
        assert_eq!(by, ["publish", "tag", "rm"]);
        let spans = h.spans();
        assert_eq!(spans.len(), 2);
        assert_eq!((spans[0].0, spans[1].0), (a, b));
        assert_eq!(spans[0].2, Some(h.moves[1].at));
        assert_eq!(
            spans[1].2,
            Some(h.moves[2].at),
            "removed ends the last span"
        );

        for i in 0..MAX_MOVES + 5 {
            append(&store, &r, Some(&Digest([i as u8; 32])), "publish")
                .await
                .unwrap();
        }
        let h = read(&store, &r).await.unwrap();
        assert_eq!(h.moves.len(), MAX_MOVES);
        assert_eq!(
            h.moves.last().unwrap().layer,
            Some(Digest([(MAX_MOVES + 4) as u8; 32]).to_string())
        );
    }

    /// Two writers appending at once both land: a lost compare-and-swap reads again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_lose_nothing() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new("history-race"));
        let r = DatasetRef::parse("d:v1").unwrap();
        let writers: Vec<_> = (0..8u8)
            .map(|i| {
                let (store, r) = (store.clone(), r.clone());
                tokio::spawn(
                    async move { append(&store, &r, Some(&Digest([i; 32])), "publish").await },
                )
            })
            .collect();
        for w in writers {
            w.await.unwrap().unwrap();
        }
        let h = read(&store, &r).await.unwrap();
        let mut layers: Vec<_> = h.moves.iter().map(|m| m.layer.clone().unwrap()).collect();
        layers.sort();
        let mut want: Vec<_> = (0..8u8).map(|i| Digest([i; 32]).to_string()).collect();
        want.sort();
        assert_eq!(layers, want);
    }
}
