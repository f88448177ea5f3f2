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
    /// The signature among a header's extra fields, if one parses.
    pub fn find(fields: &[String]) -> Option<RefSignature> {
        fields.iter().find_map(|f| {
            let rest = f.strip_prefix(FIELD)?;
            let mut parts = rest.split(':');
            let key = ed25519_dalek::VerifyingKey::from_bytes(&decode_hex(parts.next()?)?).ok()?;
            let seq = parts.next()?.parse().ok()?;
            let sig = ed25519_dalek::Signature::from_bytes(&decode_hex(parts.next()?)?);
            parts.next().is_none().then_some(RefSignature {
                key: PublicKey(key),
                seq,
                sig,
            })
        })
    }

    /// Whether this signs `body` as ref `name:tag`.
    pub fn verifies(&self, name: &str, tag: &str, body: &str) -> bool {
        self.key
            .0
            .verify(&message(name, tag, body, self.seq), &self.sig)
            .is_ok()
    }
}

/// What a reader trusts: the publishers' keys, and the highest sequence it has seen per tag
/// (kept in a file when given one, so a restart does not forget).
#[derive(Debug, Default)]
pub struct Trust {
    keys: Vec<PublicKey>,
    seen: Mutex<HashMap<String, u64>>,
    file: Option<PathBuf>,
}

impl Trust {
    /// Trusts `keys`; remembers sequences in `file` (read now if it exists).
    pub fn new(keys: Vec<PublicKey>, file: Option<PathBuf>) -> FsResult<Trust> {
        let seen = match &file {
            Some(path) => match std::fs::read(path) {
                Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                    FsError::InvalidInput(format!(
                        "{}: not a record of signed refs seen: {e}",
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
            seen: Mutex::new(seen),
            file,
        })
    }

    /// Whether refs are checked at all (unsigned stores keep working without keys).
    pub fn enforced(&self) -> bool {
        !self.keys.is_empty()
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// Checks that `body` (read at ref `name:tag` of the store at `store_url`, with header
    /// fields `fields`) is signed by a trusted key at a sequence no lower than any seen, and
    /// remembers it.
    pub fn check(
        &self,
        store_url: &str,
        name: &str,
        tag: &str,
        body: &str,
        fields: &[String],
    ) -> FsResult<()> {
        let what = format!("dataset {name}:{tag} in {store_url}");
        let sig = RefSignature::find(fields).ok_or_else(|| {
            FsError::Untrusted(format!(
                "{what}: its ref is not signed, and this host mounts only refs signed by {}",
                self.key_list()
            ))
        })?;
        if !self.keys.contains(&sig.key) {
            return Err(FsError::Untrusted(format!(
                "{what}: its ref is signed by {}, which this host does not trust (trusted: {})",
                sig.key,
                self.key_list()
            )));
        }
        if !sig.verifies(name, tag, body) {
            return Err(FsError::Untrusted(format!(
                "{what}: its ref's signature does not match it (rewritten in the store, or \
                 copied from another tag)"
            )));
        }
        let key = format!("{store_url} {name}:{tag}");
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let highest = seen.get(&key).copied().unwrap_or(0);
        if sig.seq < highest {
            return Err(FsError::Untrusted(format!(
                "{what}: its ref is signed at sequence {}, older than {highest} seen before: \
                 the tag was rolled back in the store",
                sig.seq
            )));
        }
        if sig.seq > highest {
            seen.insert(key, sig.seq);
            if let Some(path) = &self.file {
                // Best effort: a lost record lets an older ref back in only after a restart.
                let json = serde_json::to_vec(&*seen).unwrap_or_default();
                let tmp = path.with_extension("tmp");
                let dir = path.parent().unwrap_or(Path::new("."));
                let written = std::fs::create_dir_all(dir)
                    .and_then(|()| std::fs::write(&tmp, json))
                    .and_then(|()| std::fs::rename(&tmp, path));
                if let Err(e) = written {
                    tracing::warn!("recording signed ref sequences in {}: {e}", path.display());
                }
            }
        }
        Ok(())
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
    if hex.len() != 2 * N || !hex.is_ascii() {
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
        let sig = RefSignature::find(&[String::from("other"), field.clone()]).unwrap();
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
        assert!(!RefSignature::find(&[bumped])
            .unwrap()
            .verifies("ds", "latest", body));
        assert!(RefSignature::find(&["sig=ed25519:zz:1:zz".into()]).is_none());
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

    #[test]
    fn trust_refuses_unsigned_untrusted_forged_and_rolled_back_refs_and_remembers() {
        let key = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("seen.json");
        let trust = Trust::new(vec![key.public()], Some(file.clone())).unwrap();
        let body = "blake3:aa";
        let check = |t: &Trust, fields: Vec<String>, body: &str| {
            t.check("s3://b", "ds", "latest", body, &fields)
        };
        assert!(check(&trust, vec![], body)
            .unwrap_err()
            .to_string()
            .contains("not signed"));
        let err = check(
            &trust,
            vec![other.sign_field("ds", "latest", body, 1)],
            body,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("does not trust"), "{err}");
        let err = check(
            &trust,
            vec![key.sign_field("ds", "latest", body, 1)],
            "blake3:bb",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("does not match"), "{err}");
        check(&trust, vec![key.sign_field("ds", "latest", body, 5)], body).unwrap();
        check(&trust, vec![key.sign_field("ds", "latest", body, 5)], body).unwrap();
        let err = check(&trust, vec![key.sign_field("ds", "latest", body, 4)], body)
            .unwrap_err()
            .to_string();
        assert!(err.contains("rolled back"), "{err}");
        // A restart remembers.
        let again = Trust::new(vec![key.public()], Some(file)).unwrap();
        assert!(check(&again, vec![key.sign_field("ds", "latest", body, 4)], body).is_err());
        // Other tags and stores have sequences of their own.
        again
            .check(
                "s3://b",
                "ds",
                "v2",
                body,
                &[key.sign_field("ds", "v2", body, 1)],
            )
            .unwrap();
    }
}
