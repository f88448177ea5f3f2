//! Dataset refs: `name:tag` → layer digest, stored at `refs/<name>/<tag>` as the text
//! `blake3:<hex>\n` in a checksummed envelope ([`crate::record`]), or `removed\n` once
//! `strata rm` removed the tag. Refs (with volume heads) are the mutable objects and move by
//! compare-and-swap; every move is logged in the tag's history ([`history`]).

pub mod history;

use std::fmt;
use std::sync::Arc;

use strata_cache_format::Digest;
use strata_store::{Store, StoreErrorKind};

use crate::error::{FsError, FsResult};

pub const DEFAULT_TAG: &str = "latest";

/// `name:tag`, `name` (tag `latest`) or `name@blake3:<hex>` (pinned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetRef {
    pub name: String,
    pub tag: String,
    pub pinned: Option<Digest>,
}

/// Checks one part of a dataset or volume name (`what` says which, for the error).
pub(crate) fn check_component(what: &str, s: &str) -> FsResult<()> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(FsError::InvalidInput(format!(
            "invalid {what} {s:?}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter, digit or '_'"
        )))
    }
}

impl DatasetRef {
    pub fn parse(s: &str) -> FsResult<DatasetRef> {
        if let Some((name, digest)) = s.split_once('@') {
            check_component("dataset name", name)?;
            let digest = Digest::parse(digest).map_err(|e| FsError::InvalidInput(e.to_string()))?;
            return Ok(DatasetRef {
                name: name.to_string(),
                tag: String::new(),
                pinned: Some(digest),
            });
        }
        let (name, tag) = s.split_once(':').unwrap_or((s, DEFAULT_TAG));
        check_component("dataset name", name)?;
        check_component("dataset tag", tag)?;
        Ok(DatasetRef {
            name: name.to_string(),
            tag: tag.to_string(),
            pinned: None,
        })
    }

    pub fn key(&self) -> String {
        format!("refs/{}/{}", self.name, self.tag)
    }
}

impl fmt::Display for DatasetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.pinned {
            Some(d) => write!(f, "{}@{}", self.name, d),
            None => write!(f, "{}:{}", self.name, self.tag),
        }
    }
}

/// The body of a removed tag: a compare-and-swap can replace it (a publish brings the tag
/// back), where a deleted object could not be guarded against a racing writer.
const REMOVED: &str = "removed";

/// What a ref object holds: the layer the tag points at, or `None` for a removed tag.
fn parse_ref_object(store: &dyn Store, key: &str, data: &[u8]) -> FsResult<Option<Digest>> {
    let text = std::str::from_utf8(data).ok().map(str::trim);
    if text == Some(REMOVED) {
        return Ok(None);
    }
    text.and_then(|s| Digest::parse(s).ok())
        .map(Some)
        .ok_or_else(|| {
            FsError::InvalidInput(format!(
                "{}: ref {key:?} does not hold a layer digest",
                store.url()
            ))
        })
}

/// The layer a ref points at.
pub async fn resolve(store: &Arc<dyn Store>, r: &DatasetRef) -> FsResult<Digest> {
    if let Some(d) = r.pinned {
        return Ok(d);
    }
    let not_found = || FsError::NotFound(format!("dataset {r} not found in {}", store.url()));
    match crate::record::get(store, &r.key()).await {
        Ok(data) => parse_ref_object(store.as_ref(), &r.key(), &data)?.ok_or_else(not_found),
        Err(FsError::Store(e)) if e.is_not_found() => Err(not_found()),
        Err(e) => Err(e),
    }
}

/// Points `name:tag` at `digest` with compare-and-swap, and logs the move (made by `by`:
/// `publish`, `tag`) in the tag's history. Returns the previous digest.
pub async fn set(
    store: &Arc<dyn Store>,
    r: &DatasetRef,
    digest: &Digest,
    by: &str,
) -> FsResult<Option<Digest>> {
    if r.pinned.is_some() {
        return Err(FsError::InvalidInput(format!(
            "cannot publish to a pinned ref {r}"
        )));
    }
    let key = r.key();
    let current = crate::record::get_versioned(store, &key).await?;
    let previous = match &current {
        Some((data, _)) => parse_ref_object(store.as_ref(), &key, data)?,
        None => None,
    };
    if previous == Some(*digest) {
        return Ok(previous);
    }
    let body = crate::record::seal(format!("{digest}\n").as_bytes());
    match store
        .compare_and_swap(&key, current.as_ref().map(|(_, v)| v), body)
        .await
    {
        Ok(_) => {
            log_move(store, r, previous.as_ref(), Some(digest), by).await;
            Ok(previous)
        }
        // The client sends a write again when its reply is lost; the first one may have
        // landed: then the ref holds what this writer put there.
        Err(e) if e.kind == StoreErrorKind::Conflict && holds(store, &key, Some(digest)).await => {
            log_move(store, r, previous.as_ref(), Some(digest), by).await;
            Ok(previous)
        }
        Err(e) if e.kind == StoreErrorKind::Conflict => Err(FsError::Conflict(format!(
            "dataset {r} was moved by another writer meanwhile; the layer {digest} is \
             uploaded: try again to point the ref at it ({e})"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Removes tag `r` by compare-and-swap: a publish racing it lands first (and is removed), or
/// after (and brings the tag back), or read the ref before the removal (and fails with a
/// conflict); never lost half-way. Returns the layer it pointed at, which stays in the store.
pub async fn remove(store: &Arc<dyn Store>, r: &DatasetRef) -> FsResult<Digest> {
    if r.pinned.is_some() {
        return Err(FsError::InvalidInput(format!(
            "{r} is a pinned layer, not a tag: nothing to remove"
        )));
    }
    let key = r.key();
    let not_found = || FsError::NotFound(format!("dataset {r} not found in {}", store.url()));
    let (data, version) = crate::record::get_versioned(store, &key)
        .await?
        .ok_or_else(not_found)?;
    let previous = parse_ref_object(store.as_ref(), &key, &data)?.ok_or_else(not_found)?;
    let body = crate::record::seal(format!("{REMOVED}\n").as_bytes());
    match store.compare_and_swap(&key, Some(&version), body).await {
        Ok(_) => {
            log_move(store, r, Some(&previous), None, "rm").await;
            Ok(previous)
        }
        Err(e) if e.kind == StoreErrorKind::Conflict && holds(store, &key, None).await => {
            log_move(store, r, Some(&previous), None, "rm").await;
            Ok(previous)
        }
        Err(e) if e.kind == StoreErrorKind::Conflict => Err(FsError::Conflict(format!(
            "dataset {r} was moved by another writer meanwhile; nothing was removed ({e})"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Whether the ref at `key` now holds `want` (`None`: removed).
async fn holds(store: &Arc<dyn Store>, key: &str, want: Option<&Digest>) -> bool {
    match crate::record::get(store, key).await {
        Ok(data) => parse_ref_object(store.as_ref(), key, &data).ok() == Some(want.copied()),
        Err(_) => false,
    }
}

/// Appends a move that happened to the tag's history. The move stands if that fails (the
/// ref is the truth): it is only left out of the history, and said so.
async fn log_move(
    store: &Arc<dyn Store>,
    r: &DatasetRef,
    from: Option<&Digest>,
    layer: Option<&Digest>,
    by: &str,
) {
    if let Err(e) = history::append(store, r, from, layer, by).await {
        tracing::warn!("{r} moved, but its history could not be appended to: {e}");
    }
}

/// All refs (optionally of one dataset name): (ref, digest), sorted.
pub async fn list(
    store: &Arc<dyn Store>,
    name: Option<&str>,
) -> FsResult<Vec<(DatasetRef, Digest)>> {
    let prefix = match name {
        Some(n) => {
            check_component("name", n)?;
            format!("refs/{n}/")
        }
        None => "refs/".to_string(),
    };
    let keys = store.list(&prefix).await?;
    let mut out = Vec::new();
    for key in keys {
        let mut parts = key.splitn(3, '/');
        let (Some(_), Some(n), Some(t)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let Ok(r) = DatasetRef::parse(&format!("{n}:{t}")) else {
            tracing::warn!(key, "ignoring a ref with an invalid name");
            continue;
        };
        match resolve(store, &r).await {
            Ok(d) => out.push((r, d)),
            Err(FsError::NotFound(_)) => {} // removed, or deleted while listing
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_refs_and_rejects_bad_names() {
        let r = DatasetRef::parse("models:v1").unwrap();
        assert_eq!((r.name.as_str(), r.tag.as_str()), ("models", "v1"));
        assert_eq!(DatasetRef::parse("models").unwrap().tag, "latest");
        let d = Digest::of(b"x");
        assert_eq!(
            DatasetRef::parse(&format!("m@{d}")).unwrap().pinned,
            Some(d)
        );
        for bad in [
            "",
            "a/b:c",
            "../x:y",
            "x:",
            ":y",
            "x:y/z",
            "x y:z",
            "m@blake3:12",
        ] {
            assert!(
                DatasetRef::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    /// A removed tag is gone for readers and listings, comes back with the next publish, and
    /// both moves are in its history.
    #[tokio::test]
    async fn a_removed_tag_is_gone_until_set_again() {
        let store: Arc<dyn Store> = Arc::new(strata_store::MemoryStore::new("refs"));
        let (r, other) = (
            DatasetRef::parse("d:v1").unwrap(),
            DatasetRef::parse("d:v2").unwrap(),
        );
        let (a, b) = (Digest([1; 32]), Digest([2; 32]));
        assert!(matches!(
            remove(&store, &r).await,
            Err(FsError::NotFound(_))
        ));
        set(&store, &r, &a, "publish").await.unwrap();
        set(&store, &other, &b, "publish").await.unwrap();
        assert_eq!(remove(&store, &r).await.unwrap(), a);
        assert!(matches!(
            resolve(&store, &r).await,
            Err(FsError::NotFound(_))
        ));
        assert!(matches!(
            remove(&store, &r).await,
            Err(FsError::NotFound(_))
        ));
        let listed: Vec<_> = list(&store, Some("d")).await.unwrap();
        assert_eq!(listed, vec![(other.clone(), b)]);
        assert_eq!(set(&store, &r, &b, "publish").await.unwrap(), None);
        assert_eq!(resolve(&store, &r).await.unwrap(), b);
        let moves: Vec<_> = history::read(&store, &r)
            .await
            .unwrap()
            .moves
            .into_iter()
            .map(|m| (m.layer, m.by))
            .collect();
        assert_eq!(
            moves,
            vec![
                (Some(a.to_string()), "publish".to_string()),
                (None, "rm".to_string()),
                (Some(b.to_string()), "publish".to_string()),
            ]
        );
    }
}
