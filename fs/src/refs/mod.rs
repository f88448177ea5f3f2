//! Dataset refs: `name:tag` → layer digest, stored at `refs/<name>/<tag>` as the text
//! `blake3:<hex>\n` in a checksummed envelope ([`crate::record`]), or `removed\n` once
//! `strata rm` removed the tag. Refs (with volume heads) are the mutable objects and move by
//! compare-and-swap; every move is logged in the tag's history ([`history`]).

pub mod history;
pub mod signed;

use std::fmt;
use std::sync::Arc;

use strata_cache_format::Digest;
use strata_store::{Store, StoreErrorKind};

use crate::error::{FsError, FsResult};
use signed::{RefSignature, SigningKey, Trust};

pub const DEFAULT_TAG: &str = "latest";

/// `name:tag`, `name` (tag `latest`) or `name@blake3:<hex>` (pinned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetRef {
    pub name: String,
    pub tag: String,
    pub pinned: Option<Digest>,
}

/// Checks a name as dataset names are checked (1-128 letters, digits, `.`, `_`, `-`).
pub fn check_dataset_name(s: &str) -> FsResult<()> {
    check_component("name", s)
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
    match r.pinned {
        Some(d) => Ok(d),
        None => resolve_tag(store, r, None).await,
    }
}

/// The layer a ref points at, checked against `trust` when it has keys: the ref must be
/// signed by one of them (FORMAT §5.2). A pinned layer is trusted when a tag of its dataset
/// points at it with such a signature.
pub async fn resolve_trusted(
    store: &Arc<dyn Store>,
    r: &DatasetRef,
    trust: Option<&Trust>,
) -> FsResult<Digest> {
    let trust = trust.filter(|t| t.enforced());
    if let Some(d) = r.pinned {
        if let Some(trust) = trust {
            vouch_for_pinned(store, r, d, trust).await?;
        }
        return Ok(d);
    }
    resolve_tag(store, r, trust).await
}

/// [`resolve_trusted`] of a tag (not a pinned layer).
async fn resolve_tag(
    store: &Arc<dyn Store>,
    r: &DatasetRef,
    trust: Option<&Trust>,
) -> FsResult<Digest> {
    let not_found = || FsError::NotFound(format!("dataset {r} not found in {}", store.url()));
    let (data, fields) = match crate::record::get_fields(store, &r.key()).await {
        Ok(got) => got,
        Err(FsError::Store(e)) if e.is_not_found() => return Err(not_found()),
        Err(e) => return Err(e),
    };
    let layer = parse_ref_object(store.as_ref(), &r.key(), &data)?;
    if let Some(trust) = trust {
        trust
            .check(
                store.url(),
                &r.name,
                &r.tag,
                ref_text(layer.as_ref()).as_str(),
                &fields,
            )
            .await?;
    }
    layer.ok_or_else(not_found)
}

/// Checks that some tag of `r`'s dataset points at `layer` with a trusted signature.
async fn vouch_for_pinned(
    store: &Arc<dyn Store>,
    r: &DatasetRef,
    layer: Digest,
    trust: &Trust,
) -> FsResult<()> {
    let mut why = Vec::new();
    for (tag, digest) in list(store, Some(&r.name)).await? {
        if digest != layer {
            continue;
        }
        match resolve_tag(store, &tag, Some(trust)).await {
            Ok(d) if d == layer => return Ok(()),
            Ok(_) => {}
            Err(e) => why.push(e.to_string()),
        }
    }
    Err(FsError::Untrusted(format!(
        "{r}: no tag of {} points at this layer with a signature this host trusts{}",
        r.name,
        if why.is_empty() {
            String::new()
        } else {
            format!(" ({})", why.join("; "))
        }
    )))
}

/// Whether a tag of dataset `name` points at `layer`, or pointed at it once (as its history
/// says).
pub async fn ever_named(store: &Arc<dyn Store>, name: &str, layer: &Digest) -> FsResult<bool> {
    if list(store, Some(name))
        .await?
        .iter()
        .any(|(_, d)| d == layer)
    {
        return Ok(true);
    }
    let text = layer.to_string();
    for key in store.list(&format!("history/{name}/")).await? {
        let Some(tag) = key.rsplit('/').next() else {
            continue;
        };
        let Ok(r) = DatasetRef::parse(&format!("{name}:{tag}")) else {
            continue;
        };
        let h = match history::read(store, &r).await {
            Ok(h) => h,
            // Only a hint of what was named: a damaged history grants nothing.
            Err(e) => {
                tracing::warn!("{r}: its history cannot be read ({e}); passed over");
                continue;
            }
        };
        if h.moves.iter().any(|m| {
            m.layer.as_deref() == Some(text.as_str()) || m.from.as_deref() == Some(text.as_str())
        }) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A ref object's body text: the layer's digest, or `removed`.
fn ref_text(layer: Option<&Digest>) -> String {
    match layer {
        Some(d) => d.to_string(),
        None => REMOVED.to_string(),
    }
}

/// The sealed ref object for `layer` (`None`: removed), signed by `signer` at the sequence
/// after the one its own signature of the ref it replaces (`current`: that ref's body and
/// fields) carries, and never below the time (see [`signed::next_sequence`]).
fn ref_object(
    r: &DatasetRef,
    layer: Option<&Digest>,
    current: Option<(Option<Digest>, &[String])>,
    signer: Option<&SigningKey>,
) -> FsResult<bytes::Bytes> {
    let text = ref_text(layer);
    let fields: Vec<String> = match signer {
        Some(key) => {
            let previous = current.and_then(|(layer, fields)| {
                signed_by(fields, key, r, layer.as_ref()).map(|s| s.seq)
            });
            let seq = signed::next_sequence(previous)?;
            vec![key.sign_field(&r.name, &r.tag, &text, seq)]
        }
        None => Vec::new(),
    };
    Ok(crate::record::seal_with(
        format!("{text}\n").as_bytes(),
        &fields,
    ))
}

/// `key`'s own signature among a ref's `fields`, if it verifies for `r` pointing at `layer`.
fn signed_by(
    fields: &[String],
    key: &SigningKey,
    r: &DatasetRef,
    layer: Option<&Digest>,
) -> Option<RefSignature> {
    RefSignature::verified_by(fields, &key.public(), &r.name, &r.tag, &ref_text(layer))
}

/// Points `name:tag` at `digest` with compare-and-swap, and logs the move (made by `by`:
/// `publish`, `tag`) in the tag's history. Returns the previous digest.
pub async fn set(
    store: &Arc<dyn Store>,
    r: &DatasetRef,
    digest: &Digest,
    by: &str,
    signer: Option<&SigningKey>,
) -> FsResult<Option<Digest>> {
    if r.pinned.is_some() {
        return Err(FsError::InvalidInput(format!(
            "cannot publish to a pinned ref {r}"
        )));
    }
    let key = r.key();
    let current = crate::record::get_versioned_fields(store, &key).await?;
    let previous = match &current {
        Some((data, _, _)) => parse_ref_object(store.as_ref(), &key, data)?,
        None => None,
    };
    // Already there, and signed as asked (an unsigned ref, or one whose signature does
    // not verify, is signed now).
    let signed_as_asked =
        |fields: &[String]| signer.is_none_or(|k| signed_by(fields, k, r, Some(digest)).is_some());
    if previous == Some(*digest)
        && current
            .as_ref()
            .is_some_and(|(_, fields, _)| signed_as_asked(fields))
    {
        return Ok(previous);
    }
    let body = ref_object(
        r,
        Some(digest),
        current.as_ref().map(|(_, f, _)| (previous, f.as_slice())),
        signer,
    )?;
    match store
        .compare_and_swap(&key, current.as_ref().map(|(_, _, v)| v), body)
        .await
    {
        Ok(_) => {
            log_move(store, r, previous.as_ref(), Some(digest), by).await;
            Ok(previous)
        }
        // The client sends a write again when its reply is lost; the first one may have
        // landed: then the ref holds what this writer put there.
        Err(e)
            if e.kind == StoreErrorKind::Conflict
                && holds(store, r, Some(digest), signer).await =>
        {
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
pub async fn remove(
    store: &Arc<dyn Store>,
    r: &DatasetRef,
    signer: Option<&SigningKey>,
) -> FsResult<Digest> {
    if r.pinned.is_some() {
        return Err(FsError::InvalidInput(format!(
            "{r} is a pinned layer, not a tag: nothing to remove"
        )));
    }
    let key = r.key();
    let not_found = || FsError::NotFound(format!("dataset {r} not found in {}", store.url()));
    let (data, fields, version) = crate::record::get_versioned_fields(store, &key)
        .await?
        .ok_or_else(not_found)?;
    let previous = parse_ref_object(store.as_ref(), &key, &data)?.ok_or_else(not_found)?;
    let body = ref_object(r, None, Some((Some(previous), &fields)), signer)?;
    match store.compare_and_swap(&key, Some(&version), body).await {
        Ok(_) => {
            log_move(store, r, Some(&previous), None, "rm").await;
            Ok(previous)
        }
        Err(e) if e.kind == StoreErrorKind::Conflict && holds(store, r, None, signer).await => {
            log_move(store, r, Some(&previous), None, "rm").await;
            Ok(previous)
        }
        Err(e) if e.kind == StoreErrorKind::Conflict => Err(FsError::Conflict(format!(
            "dataset {r} was moved by another writer meanwhile; nothing was removed ({e})"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Whether ref `r` now holds `want` (`None`: removed), signed by `signer` if given.
async fn holds(
    store: &Arc<dyn Store>,
    r: &DatasetRef,
    want: Option<&Digest>,
    signer: Option<&SigningKey>,
) -> bool {
    let key = r.key();
    match crate::record::get_fields(store, &key).await {
        Ok((data, fields)) => {
            parse_ref_object(store.as_ref(), &key, &data).ok() == Some(want.copied())
                && signer.is_none_or(|k| signed_by(&fields, k, r, want).is_some())
        }
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
            remove(&store, &r, None).await,
            Err(FsError::NotFound(_))
        ));
        set(&store, &r, &a, "publish", None).await.unwrap();
        set(&store, &other, &b, "publish", None).await.unwrap();
        assert_eq!(remove(&store, &r, None).await.unwrap(), a);
        assert!(matches!(
            resolve(&store, &r).await,
            Err(FsError::NotFound(_))
        ));
        assert!(matches!(
            remove(&store, &r, None).await,
            Err(FsError::NotFound(_))
        ));
        let listed: Vec<_> = list(&store, Some("d")).await.unwrap();
        assert_eq!(listed, vec![(other.clone(), b)]);
        assert_eq!(set(&store, &r, &b, "publish", None).await.unwrap(), None);
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

    #[tokio::test]
    async fn signed_refs_resolve_only_as_signed_and_tampering_is_refused() {
        let store: Arc<dyn Store> = Arc::new(strata_store::MemoryStore::new("signed"));
        let key = SigningKey::generate().unwrap();
        let trust = Trust::new(vec![key.public()], None).unwrap();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let latest = DatasetRef::parse("d:latest").unwrap();
        let v1 = DatasetRef::parse("d:v1").unwrap();
        // Unsigned refs resolve without trust, and are refused with it.
        set(&store, &latest, &a, "publish", None).await.unwrap();
        assert_eq!(resolve_trusted(&store, &latest, None).await.unwrap(), a);
        let err = resolve_trusted(&store, &latest, Some(&trust))
            .await
            .unwrap_err();
        assert!(matches!(err, FsError::Untrusted(_)), "{err}");
        // Signing the same layer again makes it trusted; each move signs the next sequence.
        set(&store, &latest, &a, "publish", Some(&key))
            .await
            .unwrap();
        assert_eq!(
            resolve_trusted(&store, &latest, Some(&trust))
                .await
                .unwrap(),
            a
        );
        let first = store.get(&latest.key()).await.unwrap();
        set(&store, &latest, &b, "publish", Some(&key))
            .await
            .unwrap();
        set(&store, &v1, &a, "tag", Some(&key)).await.unwrap();
        assert_eq!(
            resolve_trusted(&store, &latest, Some(&trust))
                .await
                .unwrap(),
            b
        );
        let (_, fields) = crate::record::get_fields(&store, &latest.key())
            .await
            .unwrap();
        let first_seq = RefSignature::all(&crate::record::open_fields(&first).unwrap().1)[0].seq;
        assert!(RefSignature::all(&fields)[0].seq > first_seq);
        // A pinned layer is trusted while a signed tag points at it.
        let pinned = |d: Digest| DatasetRef::parse(&format!("d@{d}")).unwrap();
        assert_eq!(
            resolve_trusted(&store, &pinned(a), Some(&trust))
                .await
                .unwrap(),
            a
        );
        let c = Digest::of(b"c");
        let err = resolve_trusted(&store, &pinned(c), Some(&trust))
            .await
            .unwrap_err();
        assert!(matches!(err, FsError::Untrusted(_)), "{err}");
        // Rolled back: the older signed object put back by someone with write access.
        store.put(&latest.key(), first).await.unwrap();
        let err = resolve_trusted(&store, &latest, Some(&trust))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("rolled back"), "{err}");
        // Replayed: v1's signed ref copied under latest.
        let v1_object = store.get(&v1.key()).await.unwrap();
        store.put(&latest.key(), v1_object).await.unwrap();
        let err = resolve_trusted(&store, &latest, Some(&trust))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        // Rewritten: an unsigned ref to another layer.
        store
            .put(
                &latest.key(),
                crate::record::seal(format!("{c}\n").as_bytes()),
            )
            .await
            .unwrap();
        let err = resolve_trusted(&store, &latest, Some(&trust))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not signed"), "{err}");
        // A signed removal is believed: the tag is gone.
        set(&store, &v1, &b, "tag", Some(&key)).await.unwrap();
        remove(&store, &v1, Some(&key)).await.unwrap();
        let err = resolve_trusted(&store, &v1, Some(&trust))
            .await
            .unwrap_err();
        assert!(matches!(err, FsError::NotFound(_)), "{err}");
    }
}
