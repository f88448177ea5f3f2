//! Signed refs: whoever can write a store's ref objects, but does not hold a publisher's key,
//! cannot make a daemon that trusts that key serve other bytes.
//!
//! A signed ref carries, in its record envelope's header (after the checksum, where readers
//! of older versions pass over it), one field:
//!
//! ```text
//! sig=ed25519:<public key, 64 hex>:<sequence>:<signature, 128 hex>
//! ```
//!
//! The signature is over [`message`]: the dataset name, the tag, the ref's body (the layer's
//! digest, or `removed`) and the sequence number, so a signed ref cannot be replayed under
//! another name or tag. Each move of a tag signs the sequence after the one the ref held,
//! and a reader remembers the highest it has seen per tag ([`Trust`]), so an older signed
//! ref put back cannot roll a tag back.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ed25519_dalek::{Signer, Verifier};

use crate::error::{FsError, FsResult};

const FIELD: &str = "sig=ed25519:";
const SECRET_MAGIC: &str = "strata-ed25519-secret-key";

/// The bytes a ref's signature covers.
pub fn message(name: &str, tag: &str, body: &str, seq: u64) -> Vec<u8> {
    format!("strata-ref-signature 1\n{name}\n{tag}\n{body}\n{seq}\n").into_bytes()
}

/// A publisher's public key: `ed25519:<64 hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl PublicKey {
    pub fn parse(s: &str) -> FsResult<PublicKey> {
        let bad = || {
            FsError::InvalidInput(format!(
                "{s:?} is not a public key: expected ed25519:<64 hex digits>"
            ))
        };
        let hex = s.trim().strip_prefix("ed25519:").ok_or_else(bad)?;
        let bytes: [u8; 32] = decode_hex(hex).ok_or_else(bad)?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|_| bad())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ed25519:{}", encode_hex(self.0.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A publisher's secret key. Never printed: its `Debug` shows the public half only.
pub struct SigningKey(ed25519_dalek::SigningKey);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.public())
    }
}

impl SigningKey {
    /// A new key from the system's random source.
    pub fn generate() -> FsResult<SigningKey> {
        let mut seed = [0u8; 32];
        use std::io::Read;
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(|e| FsError::io("/dev/urandom", e))?;
        Ok(SigningKey(ed25519_dalek::SigningKey::from_bytes(&seed)))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The key file's text: a marker line, then the 32-byte seed in hex.
    pub fn to_file_text(&self) -> String {
        format!(
            "{SECRET_MAGIC}\n{}\n",
            encode_hex(self.0.to_bytes().as_slice())
        )
    }

    /// Reads a key file written by [`SigningKey::to_file_text`]. The error never quotes the
    /// file's content.
    pub fn load(path: &Path) -> FsResult<SigningKey> {
        let text = std::fs::read_to_string(path).map_err(|e| FsError::io(path, e))?;
        let mut lines = text.lines();
        let seed = match (lines.next(), lines.next().map(str::trim)) {
            (Some(SECRET_MAGIC), Some(hex)) => decode_hex::<32>(hex),
            _ => None,
        };
        seed.map(|s| SigningKey(ed25519_dalek::SigningKey::from_bytes(&s)))
            .ok_or_else(|| {
                FsError::InvalidInput(format!(
                    "{} is not a strata signing key (made by `strata key generate`)",
                    path.display()
                ))
            })
    }

    /// The header field signing `body` as ref `name:tag` at `seq`.
    pub fn sign_field(&self, name: &str, tag: &str, body: &str, seq: u64) -> String {
        let sig = self.0.sign(&message(name, tag, body, seq));
        format!(
            "{FIELD}{}:{seq}:{}",
            encode_hex(self.0.verifying_key().as_bytes()),
            encode_hex(&sig.to_bytes())
        )
    }
}

/// A signature found in a ref's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefSignature {
    pub key: PublicKey,
    pub seq: u64,
    sig: ed25519_dalek::Signature,
}

impl RefSignature {
    /// Every signature among a header's extra fields that parses.
    pub fn all(fields: &[String]) -> Vec<RefSignature> {
        fields.iter().filter_map(|f| Self::parse(f)).collect()
    }

    fn parse(field: &str) -> Option<RefSignature> {
        let rest = field.strip_prefix(FIELD)?;
        let mut parts = rest.split(':');
        let key = ed25519_dalek::VerifyingKey::from_bytes(&decode_hex(parts.next()?)?).ok()?;
        let seq = parts.next()?;
        if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let seq = seq.parse().ok()?;
        let sig = ed25519_dalek::Signature::from_bytes(&decode_hex(parts.next()?)?);
        parts.next().is_none().then_some(RefSignature {
            key: PublicKey(key),
            seq,
            sig,
        })
    }

    /// The signature in `fields` by `key` that signs `body` as ref `name:tag`, if any.
    pub fn verified_by(
        fields: &[String],
        key: &PublicKey,
        name: &str,
        tag: &str,
        body: &str,
    ) -> Option<RefSignature> {
        Self::all(fields)
            .into_iter()
            .find(|s| s.key == *key && s.verifies(name, tag, body))
    }

    /// Whether this signs `body` as ref `name:tag`.
    pub fn verifies(&self, name: &str, tag: &str, body: &str) -> bool {
        self.key
            .0
            .verify(&message(name, tag, body, self.seq), &self.sig)
            .is_ok()
    }
}

/// The sequence a signer gives the next move of a tag: past the one it signed before (if the
/// ref it replaces carries a signature of its own that verifies), and never below the time
/// in microseconds, so that a ref the signer cannot read back (deleted, or replaced by an
/// unsigned one) does not send the sequence back to where an older signed ref could be
/// replayed over the new one.
pub fn next_sequence(previous: Option<u64>) -> FsResult<u64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let next = previous.map_or(0, |p| p.saturating_add(1)).max(now);
    if next == u64::MAX {
        return Err(FsError::InvalidInput(
            "the tag's signed sequence is exhausted: remove the tag and publish it anew".into(),
        ));
    }
    Ok(next)
}

/// What a reader remembers of a tag: the highest sequence it accepted, and the body signed at
/// it (the same sequence with another body is a forgery's replay, not the same ref again).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Seen {
    seq: u64,
    body: String,
}

/// What a reader trusts: the publishers' keys, and per tag the highest sequence it has seen
/// (kept in a file when given one, so a restart does not forget). Views with other keys
/// ([`Trust::with_keys`]) share the memory.
#[derive(Debug, Default)]
pub struct Trust {
    keys: Vec<PublicKey>,
    memory: std::sync::Arc<Memory>,
}

#[derive(Debug, Default)]
struct Memory {
    seen: Mutex<HashMap<String, Seen>>,
    file: Option<PathBuf>,
    /// Held while the file is written, so the last write is of the latest state.
    writing: tokio::sync::Mutex<()>,
}

impl Trust {
    /// Trusts `keys`; remembers sequences in `file` (read now if it exists).
    pub fn new(keys: Vec<PublicKey>, file: Option<PathBuf>) -> FsResult<Trust> {
        let seen = match &file {
            Some(path) => match std::fs::read(path) {
                Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                    FsError::InvalidInput(format!(
                        "{}: not a record of signed refs seen ({e}); a host that lost it \
                         accepts any signed ref again until it sees a newer one",
                        path.display()
                    ))
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
                Err(e) => return Err(FsError::io(path, e)),
            },
            None => HashMap::new(),
        };
        Ok(Trust {
            keys,
            memory: std::sync::Arc::new(Memory {
                seen: Mutex::new(seen),
                file,
                writing: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// This trust with `keys` instead (the same memory of what was seen).
    pub fn with_keys(&self, keys: Vec<PublicKey>) -> Trust {
        Trust {
            keys,
            memory: std::sync::Arc::clone(&self.memory),
        }
    }

    /// Whether refs are checked at all (unsigned stores keep working without keys).
    pub fn enforced(&self) -> bool {
        !self.keys.is_empty()
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// Checks that `body` (read at ref `name:tag` of the store at `store_url`, with header
    /// fields `fields`) is signed by a trusted key at a sequence no lower than any seen (and
    /// at one seen, for the same body), and remembers it.
    pub async fn check(
        &self,
        store_url: &str,
        name: &str,
        tag: &str,
        body: &str,
        fields: &[String],
    ) -> FsResult<()> {
        let what = format!("dataset {name}:{tag} in {store_url}");
        let sigs = RefSignature::all(fields);
        if sigs.is_empty() {
            return Err(FsError::Untrusted(format!(
                "{what}: its ref is not signed, and this host mounts only refs signed by {}",
                self.key_list()
            )));
        }
        let trusted: Vec<&RefSignature> =
            sigs.iter().filter(|s| self.keys.contains(&s.key)).collect();
        let Some(sig) = trusted.iter().find(|s| s.verifies(name, tag, body)) else {
            return Err(FsError::Untrusted(match trusted.is_empty() {
                true => format!(
                    "{what}: its ref is signed by {}, which this host does not trust (trusted: {})",
                    sigs.iter()
                        .map(|s| s.key.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    self.key_list()
                ),
                false => format!(
                    "{what}: its ref's signature does not match it (rewritten in the store, or \
                     copied from another tag)"
                ),
            }));
        };
        let key = format!("{} {name}:{tag}", store_url.trim_end_matches('/'));
        let changed = {
            let mut seen = self.memory.seen.lock().unwrap_or_else(|e| e.into_inner());
            match seen.get(&key) {
                Some(s) if sig.seq < s.seq || (sig.seq == s.seq && s.body != body) => {
                    return Err(FsError::Untrusted(format!(
                        "{what}: its ref is signed at sequence {}, older than {} seen before: \
                         the tag was rolled back in the store",
                        sig.seq, s.seq
                    )));
                }
                Some(s) if sig.seq == s.seq => false,
                _ => {
                    let now = Seen {
                        seq: sig.seq,
                        body: body.to_string(),
                    };
                    seen.insert(key, now);
                    true
                }
            }
        };
        if changed {
            self.persist().await?;
        }
        Ok(())
    }

    /// Writes what was seen to the file (if any), durably: a host that forgot would accept
    /// an older signed ref again, so a failure fails the check.
    async fn persist(&self) -> FsResult<()> {
        let Some(path) = self.memory.file.clone() else {
            return Ok(());
        };
        let _writing = self.memory.writing.lock().await;
        let json = {
            let seen = self.memory.seen.lock().unwrap_or_else(|e| e.into_inner());
            serde_json::to_vec(&*seen).unwrap_or_default()
        };
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let dir = path.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir)?;
            let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
            tmp.write_all(&json)?;
            tmp.as_file().sync_all()?;
            tmp.persist(&path).map_err(|e| e.error)?;
            std::fs::File::open(dir)?.sync_all()
        })
        .await
        .map_err(|e| FsError::InvalidInput(format!("recording signed refs seen: {e}")))?;
        written.map_err(|e| FsError::Context {
            context: "recording the signed refs this host has seen".into(),
            inner: Box::new(FsError::io(self.memory.file.clone().unwrap_or_default(), e)),
        })
    }

    fn key_list(&self) -> String {
        self.keys
            .iter()
            .map(|k| k.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex<const N: usize>(hex: &str) -> Option<[u8; N]> {
    if hex.len() != 2 * N || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_binds_name_tag_body_and_sequence() {
        let key = SigningKey::generate().unwrap();
        let body = "blake3:00";
        let field = key.sign_field("ds", "latest", body, 3);
        let sig = RefSignature::all(&[String::from("other"), field.clone()])
            .pop()
            .unwrap();
        assert_eq!((sig.key, sig.seq), (key.public(), 3));
        assert!(sig.verifies("ds", "latest", body));
        assert!(
            !sig.verifies("ds", "other", body),
            "replayed under another tag"
        );
        assert!(
            !sig.verifies("dt", "latest", body),
            "replayed under another name"
        );
        assert!(!sig.verifies("ds", "latest", "removed"));
        // A sequence edited in the field no longer verifies.
        let bumped = field.replacen(":3:", ":4:", 1);
        assert!(!RefSignature::all(&[bumped])[0].verifies("ds", "latest", body));
        assert!(RefSignature::all(&["sig=ed25519:zz:1:zz".into()]).is_empty());
        let plus = field.replacen(":3:", ":+3:", 1);
        assert!(
            RefSignature::all(&[plus]).is_empty(),
            "one way to write a sequence"
        );
        // Keys round-trip through their text forms; the secret's Debug shows the public key.
        assert_eq!(
            PublicKey::parse(&key.public().to_string()).unwrap(),
            key.public()
        );
        assert!(PublicKey::parse("ed25519:abc").is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, key.to_file_text()).unwrap();
        assert_eq!(SigningKey::load(&path).unwrap().public(), key.public());
        let secret_hex = key.to_file_text().lines().nth(1).unwrap().to_string();
        assert!(!format!("{key:?}").contains(&secret_hex));
        std::fs::write(&path, "nonsense").unwrap();
        let err = SigningKey::load(&path).unwrap_err().to_string();
        assert!(err.contains("not a strata signing key") && !err.contains("nonsense"));
    }

    async fn check(t: &Trust, fields: Vec<String>, body: &str) -> Result<(), String> {
        t.check("s3://b", "ds", "latest", body, &fields)
            .await
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn trust_refuses_unsigned_untrusted_forged_and_rolled_back_refs_and_remembers() {
        let key = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state").join("seen.json");
        let trust = Trust::new(vec![key.public()], Some(file.clone())).unwrap();
        let (body, forged) = ("blake3:aa", "blake3:bb");
        let sign =
            |k: &SigningKey, seq: u64, body: &str| vec![k.sign_field("ds", "latest", body, seq)];
        let err = check(&trust, vec![], body).await.unwrap_err();
        assert!(err.contains("not signed"), "{err}");
        let err = check(&trust, sign(&other, 1, body), body)
            .await
            .unwrap_err();
        assert!(err.contains("does not trust"), "{err}");
        let err = check(&trust, sign(&key, 1, body), forged)
            .await
            .unwrap_err();
        assert!(err.contains("does not match"), "{err}");
        // An untrusted signature first does not hide a trusted one.
        let mut both = sign(&other, 9, body);
        both.extend(sign(&key, 5, body));
        check(&trust, both, body).await.unwrap();
        check(&trust, sign(&key, 5, body), body).await.unwrap();
        let err = check(&trust, sign(&key, 4, body), body).await.unwrap_err();
        assert!(err.contains("rolled back"), "{err}");
        // The same sequence with another body is a replay of another signed ref.
        let err = check(&trust, sign(&key, 5, forged), forged)
            .await
            .unwrap_err();
        assert!(err.contains("rolled back"), "{err}");
        // A restart remembers (the file is made with its directory).
        let again = Trust::new(vec![key.public()], Some(file.clone())).unwrap();
        assert!(check(&again, sign(&key, 4, body), body).await.is_err());
        // Views with other keys share the memory.
        let view = again.with_keys(vec![key.public(), other.public()]);
        assert!(check(&view, sign(&other, 4, body), body).await.is_err());
        // Other tags have sequences of their own; a store URL's trailing slash is the same store.
        again
            .check(
                "s3://b/",
                "ds",
                "v2",
                body,
                &[key.sign_field("ds", "v2", body, 1)],
            )
            .await
            .unwrap();
        assert!(again
            .check(
                "s3://b",
                "ds",
                "v2",
                body,
                &[key.sign_field("ds", "v2", body, 0)]
            )
            .await
            .is_err());
        // A record that does not parse stops the host from starting rather than forgetting.
        std::fs::write(&file, "{").unwrap();
        let err = Trust::new(vec![key.public()], Some(file))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a record of signed refs seen"), "{err}");
    }

    #[test]
    fn sequences_grow_past_the_previous_and_the_clock() {
        let t = next_sequence(None).unwrap();
        assert!(
            t > 1_700_000_000_000_000,
            "microseconds since the epoch: {t}"
        );
        assert!(next_sequence(Some(t)).unwrap() > t);
        let far = u64::MAX - 10;
        assert_eq!(next_sequence(Some(far)).unwrap(), far + 1);
        assert!(next_sequence(Some(u64::MAX - 1)).is_err());
    }
}
