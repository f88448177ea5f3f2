//! A tag's history: every layer it pointed at, from when, and what moved it, at
//! `history/<name>/<tag>` (a record, JSON). Retention (how many earlier layers, or how long
//! back, garbage collection keeps) reads it; people read it with `strata ls --history`.
//!
//! The ref is the truth and moves first; the history is appended right after, by
//! compare-and-swap. A writer that dies in between leaves that move out of the history
//! (the ref still says where the tag points). Each move names the layer it moved the tag
//! from, so two writers whose appends land in the other order than their moves still leave
//! the moves in order.

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
    /// The layer it moved the tag from (`None`: the tag was new or removed).
    #[serde(default)]
    pub from: Option<String>,
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
    match load(store, r).await? {
        Stored::Read(h, _) => Ok(h),
        Stored::Damaged(why, _) => Err(FsError::InvalidInput(why)),
    }
}

/// A history as stored: readable (a missing one is empty), or damaged (with the version to
/// replace it at).
enum Stored {
    Read(History, Option<strata_store::Version>),
    Damaged(String, Option<strata_store::Version>),
}

/// Loads the history of `r`. One written by a newer strata is an error: it is neither read
/// nor replaced.
async fn load(store: &Arc<dyn Store>, r: &DatasetRef) -> FsResult<Stored> {
    let key = key(r);
    let (data, version) = match crate::record::get_versioned(store, &key).await {
        Ok(Some(found)) => found,
        Ok(None) => {
            let empty = History {
                version: 1,
                moves: Vec::new(),
            };
            return Ok(Stored::Read(empty, None));
        }
        // The envelope arrived damaged every time: the object itself is.
        Err(FsError::InvalidInput(why)) => {
            let version = store.get_versioned(&key).await?.map(|(_, v)| v);
            return Ok(Stored::Damaged(why, version));
        }
        Err(e) => return Err(e),
    };
    match serde_json::from_slice::<History>(&data) {
        Ok(h) if h.version == 1 => Ok(Stored::Read(h, Some(version))),
        Ok(h) => Err(FsError::InvalidInput(format!(
            "{}: tag {r}: history version {} is not one this strata reads",
            store.url(),
            h.version
        ))),
        Err(e) => Ok(Stored::Damaged(
            format!(
                "{}: tag {r} has an unreadable history {key:?}: {e}",
                store.url()
            ),
            Some(version),
        )),
    }
}

/// Where `m` goes in `moves`: after the last move that led to the layer it moved from (a
/// writer whose append lost a race to a later move's), else at the end.
fn place(moves: &[Move], m: &Move) -> usize {
    match moves.last() {
        Some(last) if last.layer != m.from => moves
            .iter()
            .rposition(|x| x.layer == m.from)
            .map_or(moves.len(), |i| i + 1),
        _ => moves.len(),
    }
}

/// Appends a move of tag `r` from `from` to `layer` (`None`: removed) by `by`, now.
pub async fn append(
    store: &Arc<dyn Store>,
    r: &DatasetRef,
    from: Option<&Digest>,
    layer: Option<&Digest>,
    by: &str,
) -> FsResult<()> {
    let at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let key = key(r);
    let m = Move {
        layer: layer.map(|d| d.to_string()),
        at,
        by: by.to_string(),
        from: from.map(|d| d.to_string()),
    };
    // Writers of one tag append one after another; a lost race is read again and retried.
    for _ in 0..16 {
        let (mut h, version) = match load(store, r).await? {
            Stored::Read(h, version) => (h, version),
            // A damaged history would block every later append: start afresh.
            Stored::Damaged(why, version) => {
                tracing::warn!("{r}: replacing its unreadable history: {why}");
                let empty = History {
                    version: 1,
                    moves: Vec::new(),
                };
                (empty, version)
            }
        };
        // A write whose reply was lost and that the client sent again lands once.
        if h.moves.iter().rev().take(16).any(|x| *x == m) {
            return Ok(());
        }
        let at = place(&h.moves, &m);
        h.moves.insert(at, m.clone());
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
        append(&store, &r, None, Some(&a), "publish").await.unwrap();
        append(&store, &r, Some(&a), Some(&b), "tag").await.unwrap();
        append(&store, &r, Some(&b), None, "rm").await.unwrap();
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
            let (from, to) = (Digest([i as u8; 32]), Digest([(i + 1) as u8; 32]));
            append(&store, &r, Some(&from), Some(&to), "publish")
                .await
                .unwrap();
        }
        let h = read(&store, &r).await.unwrap();
        assert_eq!(h.moves.len(), MAX_MOVES);
        assert_eq!(
            h.moves.last().unwrap().layer,
            Some(Digest([(MAX_MOVES + 5) as u8; 32]).to_string())
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
                tokio::spawn(async move {
                    append(&store, &r, None, Some(&Digest([i; 32])), "publish").await
                })
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

    /// Moves P→X and X→Y whose appends land Y first still read P, X, Y; the same move sent
    /// twice lands once; a damaged history is replaced rather than blocking every later move.
    #[tokio::test]
    async fn late_appends_go_in_move_order_and_damage_is_replaced() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new("history-order"));
        let r = DatasetRef::parse("d:v1").unwrap();
        let (p, x, y) = (Digest([1; 32]), Digest([2; 32]), Digest([3; 32]));
        append(&store, &r, None, Some(&p), "publish").await.unwrap();
        append(&store, &r, Some(&x), Some(&y), "publish")
            .await
            .unwrap();
        append(&store, &r, Some(&p), Some(&x), "publish")
            .await
            .unwrap();
        let layers: Vec<_> = read(&store, &r)
            .await
            .unwrap()
            .moves
            .into_iter()
            .map(|m| m.layer.unwrap())
            .collect();
        assert_eq!(layers, [p, x, y].map(|d| d.to_string()));
        append(&store, &r, Some(&y), None, "rm").await.unwrap();
        append(&store, &r, Some(&y), None, "rm").await.unwrap();
        assert_eq!(read(&store, &r).await.unwrap().moves.len(), 4);

        store
            .put(&key(&r), crate::record::seal(b"{not json"))
            .await
            .unwrap();
        assert!(read(&store, &r).await.is_err());
        append(&store, &r, None, Some(&p), "publish").await.unwrap();
        let h = read(&store, &r).await.unwrap();
        assert_eq!(h.moves.len(), 1);
        assert_eq!(h.moves[0].layer, Some(p.to_string()));

        // One a newer strata wrote is neither read nor replaced.
        let newer = crate::record::seal(br#"{"version": 2, "moves": []}"#);
        store.put(&key(&r), newer.clone()).await.unwrap();
        assert!(read(&store, &r).await.is_err());
        assert!(append(&store, &r, Some(&p), None, "rm").await.is_err());
        assert_eq!(store.get(&key(&r)).await.unwrap(), newer);
    }
}
