//! The envelope of the store objects not named by their hash: refs, volume heads, conflict
//! records and kept-upper records. Content-named objects are checked against their name;
//! these cannot be, so each carries its own checksum, and a body damaged or cut short in
//! transit is detected and fetched again instead of failing a mount or, worse, being believed.
//!
//! An enveloped object is one header line, then the body verbatim (a ref's digest, a head's
//! JSON):
//!
//! ```text
//! strata-record 1 <body length> blake3:<64 hex digits of the body's BLAKE3>\n<body>
//! ```
//!
//! Readers ignore fields after these four, so a later version can add one (a publisher's
//! signature) that older readers pass over. An object that does not start with
//! `strata-record ` was written before the envelope existed and is read as its plain body.

use std::sync::Arc;

use bytes::Bytes;
use strata_cache_format::Digest;
use strata_store::{Store, Version};

use crate::error::{FsError, FsResult};

const MAGIC: &str = "strata-record";
const VERSION: u32 = 1;
/// A header is far shorter; a longer first line is damage.
const MAX_HEADER: usize = 1024;
/// Fetches of an object that arrives damaged, in all.
const TRIES: usize = 3;

/// `body` in its envelope.
pub fn seal(body: &[u8]) -> Bytes {
    seal_with(body, &[])
}

/// `body` in its envelope, with extra header `fields` (no spaces or newlines in them) after
/// the checksum: a ref's signature.
pub fn seal_with(body: &[u8], fields: &[String]) -> Bytes {
    let mut header = format!("{MAGIC} {VERSION} {} {}", body.len(), Digest::of(body));
    for f in fields {
        header.push(' ');
        header.push_str(f);
    }
    header.push('\n');
    let mut out = header.into_bytes();
    out.extend_from_slice(body);
    Bytes::from(out)
}

/// The body of an object: checked when enveloped, as is when written before the envelope.
pub fn open(data: &Bytes) -> Result<Bytes, String> {
    open_fields(data).map(|(body, _)| body)
}

/// [`open`], with the header's fields after the checksum (none for a plain record). They are
/// not covered by the checksum: whoever relies on one checks it (a signature does).
pub fn open_fields(data: &Bytes) -> Result<(Bytes, Vec<String>), String> {
    let prefix = format!("{MAGIC} ");
    if !data.starts_with(prefix.as_bytes()) {
        // Objects from before the envelope were a digest (`blake3:…`, or bare hex) or JSON;
        // anything else is an envelope damaged at its start, to be fetched again.
        let plain = match data.first() {
            Some(b'{') | Some(b'b') => true,
            Some(c) => c.is_ascii_hexdigit(),
            None => false,
        };
        return if plain {
            Ok((data.clone(), Vec::new()))
        } else {
            Err("neither a record envelope nor a plain record".into())
        };
    }
    let end = data
        .iter()
        .take(MAX_HEADER)
        .position(|&b| b == b'\n')
        .ok_or("the header line is cut short")?;
    let header = std::str::from_utf8(&data[..end]).map_err(|_| "the header is not text")?;
    let mut fields = header.split(' ').skip(1);
    let version: u32 = fields
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or("no version")?;
    if version != VERSION {
        return Err(format!(
            "envelope version {version}, written by a newer strata (this one reads {VERSION})"
        ));
    }
    let len: usize = fields
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or("no body length")?;
    let digest = fields
        .next()
        .and_then(|d| Digest::parse(d).ok())
        .ok_or("no checksum")?;
    let body = data.slice(end + 1..);
    if body.len() != len {
        return Err(format!("{} body bytes, the header says {len}", body.len()));
    }
    if Digest::of(&body) != digest {
        return Err("the body does not match its checksum".into());
    }
    Ok((body, fields.map(str::to_string).collect()))
}

fn damaged(store: &dyn Store, key: &str, why: &str) -> FsError {
    FsError::InvalidInput(format!(
        "{}: {key:?} arrived damaged {TRIES} times: {why}",
        store.url()
    ))
}

/// Reads the record at `key` and opens its envelope, fetching again when it arrives damaged.
pub async fn get(store: &Arc<dyn Store>, key: &str) -> FsResult<Bytes> {
    get_fields(store, key).await.map(|(body, _)| body)
}

/// [`get`], with the header's extra fields (see [`open_fields`]).
pub async fn get_fields(store: &Arc<dyn Store>, key: &str) -> FsResult<(Bytes, Vec<String>)> {
    let fetched = fetch_open(store, key, || async {
        store.get(key).await.map(|data| Some((data, ())))
    })
    .await?;
    // `get` answers a body or an error: no `None` comes back.
    fetched
        .map(|(body, fields, ())| (body, fields))
        .ok_or_else(|| damaged(store.as_ref(), key, "no body"))
}

/// [`get`] with the store's version, for a compare-and-swap; `None` when there is none.
pub async fn get_versioned(
    store: &Arc<dyn Store>,
    key: &str,
) -> FsResult<Option<(Bytes, Version)>> {
    Ok(get_versioned_fields(store, key)
        .await?
        .map(|(body, _, version)| (body, version)))
}

/// [`get_versioned`], with the header's extra fields.
pub async fn get_versioned_fields(
    store: &Arc<dyn Store>,
    key: &str,
) -> FsResult<Option<(Bytes, Vec<String>, Version)>> {
    fetch_open(store, key, || store.get_versioned(key)).await
}

/// Fetches through `fetch` and opens the envelope, up to [`TRIES`] times while the body
/// arrives damaged; `None` when there is no record.
async fn fetch_open<T, F, Fut>(
    store: &Arc<dyn Store>,
    key: &str,
    fetch: F,
) -> FsResult<Option<(Bytes, Vec<String>, T)>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = strata_store::StoreResult<Option<(Bytes, T)>>>,
{
    let mut why = String::new();
    for _ in 0..TRIES {
        let Some((data, extra)) = fetch().await? else {
            return Ok(None);
        };
        match open_fields(&data) {
            Ok((body, fields)) => return Ok(Some((body, fields, extra))),
            Err(e) => why = e,
        }
    }
    Err(damaged(store.as_ref(), key, &why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_bodies_open_and_damage_is_caught() {
        let body = br#"{"version":1,"commits":[]}"#;
        let sealed = seal(body);
        assert!(sealed.starts_with(b"strata-record 1 26 blake3:"));
        assert_eq!(&open(&sealed).unwrap()[..], body);
        // Every cut and every flipped byte of the body or the header is caught.
        for cut in 1..sealed.len() {
            let short = sealed.slice(..cut);
            if short.starts_with(b"strata-record ") {
                assert!(open(&short).is_err(), "cut at {cut}");
            }
        }
        let header_len = sealed.iter().position(|&b| b == b'\n').unwrap();
        for i in 0..sealed.len() {
            let mut bad = sealed.to_vec();
            bad[i] ^= 0x20;
            let bad = Bytes::from(bad);
            if i == 0 {
                // 's' ^ 0x20 is 'S': neither an envelope nor a plain record.
                assert!(open(&bad).is_err());
                continue;
            }
            let opened = open(&bad);
            assert!(
                opened.is_err() || (i <= header_len && opened.as_deref() == Ok(&body[..])),
                "byte {i} flipped went unnoticed"
            );
        }
        // Fields after the checksum are for later versions; this one passes over them.
        let mut extra = format!("strata-record 1 26 {} sig:abc\n", Digest::of(body)).into_bytes();
        extra.extend_from_slice(body);
        assert_eq!(&open(&Bytes::from(extra)).unwrap()[..], body);
        let signed = seal_with(body, &["sig:abc".into(), "x".into()]);
        assert_eq!(
            open_fields(&signed).unwrap(),
            (
                Bytes::from_static(body),
                vec!["sig:abc".to_string(), "x".to_string()]
            )
        );
        // Objects from before the envelope read as they are; a damaged start is damage.
        let legacy = Bytes::from_static(b"blake3:00\n");
        assert_eq!(open(&legacy).unwrap(), legacy);
        let json = Bytes::from_static(b"{\"version\":1}");
        assert_eq!(open(&json).unwrap(), json);
        assert!(open(&Bytes::from_static(b"strata-rec")).is_err());
        assert!(open(&Bytes::new()).is_err());
        assert!(open(&Bytes::from_static(b"strata-record 2 0 x\n"))
            .unwrap_err()
            .contains("newer strata"));
    }
}
