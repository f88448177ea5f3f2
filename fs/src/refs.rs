//! Dataset refs: `name:tag` → layer digest, stored at `refs/<name>/<tag>` as the text
//! `blake3:<hex>\n` in a checksummed envelope ([`crate::record`]). Refs (with volume heads)
//! are the mutable objects and move by compare-and-swap.

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

fn parse_ref_object(store: &dyn Store, key: &str, data: &[u8]) -> FsResult<Digest> {
    std::str::from_utf8(data)
        .ok()
        .and_then(|s| Digest::parse(s.trim()).ok())
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
    match crate::record::get(store, &r.key()).await {
        Ok(data) => parse_ref_object(store.as_ref(), &r.key(), &data),
        Err(FsError::Store(e)) if e.is_not_found() => Err(FsError::NotFound(format!(
            "dataset {r} not found in {}",
            store.url()
        ))),
        Err(e) => Err(e),
    }
}

/// Points `name:tag` at `digest` with compare-and-swap. Returns the previous digest.
pub async fn set(
    store: &Arc<dyn Store>,
    r: &DatasetRef,
    digest: &Digest,
) -> FsResult<Option<Digest>> {
    if r.pinned.is_some() {
        return Err(FsError::InvalidInput(format!(
            "cannot publish to a pinned ref {r}"
        )));
    }
    let key = r.key();
    let current = crate::record::get_versioned(store, &key).await?;
    let previous = match &current {
        Some((data, _)) => Some(parse_ref_object(store.as_ref(), &key, data)?),
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
        Ok(_) => Ok(previous),
        Err(e) if e.kind == StoreErrorKind::Conflict => Err(FsError::Conflict(format!(
            "dataset {r} was moved by another writer while publishing; the layer {digest} is \
             uploaded, publish again to point the ref at it ({e})"
        ))),
        Err(e) => Err(e.into()),
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
            Err(FsError::NotFound(_)) => {} // deleted while listing
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
}
