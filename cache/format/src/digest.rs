use std::fmt;

/// A BLAKE3 hash naming a chunk or a layer manifest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

#[derive(Debug, thiserror::Error)]
#[error("invalid digest {input:?}: expected `blake3:` followed by 64 hex digits")]
pub struct DigestParseError {
    input: String,
}

impl Digest {
    pub fn of(data: &[u8]) -> Digest {
        Digest(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses `blake3:<hex>` or a bare 64-digit hex string.
    pub fn parse(input: &str) -> Result<Digest, DigestParseError> {
        let hex_part = input.strip_prefix("blake3:").unwrap_or(input);
        let mut out = [0u8; 32];
        if hex_part.len() != 64 || hex::decode_to_slice(hex_part, &mut out).is_err() {
            return Err(DigestParseError {
                input: input.to_string(),
            });
        }
        Ok(Digest(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blake3:{}", self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blake3:{}", &self.to_hex()[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_round_trips_and_rejects_garbage() {
        let d = Digest::of(b"hello");
        assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
        assert_eq!(Digest::parse(&d.to_hex()).unwrap(), d);
        assert!(Digest::parse("blake3:zz").is_err());
        assert!(Digest::parse(&format!("blake3:{}", "g".repeat(64))).is_err());
    }
}
