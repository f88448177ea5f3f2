//! Chunk locators: a small object per chunk, `chunks/<hex>`, saying which pack holds the chunk
//! and where. Readers never need them (a layer's manifest carries every location); publish
//! looks them up so that a chunk already anywhere in the store is never uploaded again.
//!
//! Format (60 bytes, little-endian): magic `STRATALC`, version u32 = 1, pack digest (32),
//! pack offset u64, stored length u32, plain length u32.

use crate::{ChunkLoc, Digest};

const MAGIC: &[u8; 8] = b"STRATALC";
const VERSION: u32 = 1;
pub const LOCATOR_LEN: usize = 60;

pub struct Locator;

impl Locator {
    pub fn encode(loc: &ChunkLoc) -> Vec<u8> {
        let mut out = Vec::with_capacity(LOCATOR_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&loc.pack.0);
        out.extend_from_slice(&loc.pack_offset.to_le_bytes());
        out.extend_from_slice(&loc.stored_len.to_le_bytes());
        out.extend_from_slice(&loc.len.to_le_bytes());
        out
    }

    /// The location of chunk `digest` from its locator object; `None` if the bytes are not a
    /// locator this version understands.
    pub fn parse(digest: Digest, bytes: &[u8]) -> Option<ChunkLoc> {
        if bytes.len() != LOCATOR_LEN || &bytes[..8] != MAGIC {
            return None;
        }
        if u32::from_le_bytes(bytes[8..12].try_into().ok()?) != VERSION {
            return None;
        }
        let loc = ChunkLoc {
            digest,
            pack: Digest(bytes[12..44].try_into().ok()?),
            pack_offset: u64::from_le_bytes(bytes[44..52].try_into().ok()?),
            stored_len: u32::from_le_bytes(bytes[52..56].try_into().ok()?),
            len: u32::from_le_bytes(bytes[56..60].try_into().ok()?),
        };
        (loc.stored_len > 0 && loc.pack_offset.checked_add(loc.stored_len as u64).is_some())
            .then_some(loc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_garbage() {
        let loc = ChunkLoc {
            digest: Digest::of(b"chunk"),
            len: 1000,
            pack: Digest::of(b"pack"),
            pack_offset: 12345,
            stored_len: 700,
        };
        let bytes = Locator::encode(&loc);
        assert_eq!(bytes.len(), LOCATOR_LEN);
        assert_eq!(Locator::parse(loc.digest, &bytes), Some(loc));
        assert_eq!(Locator::parse(loc.digest, &bytes[1..]), None);
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(Locator::parse(loc.digest, &bad), None);
        let mut zero = bytes;
        zero[52..56].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(Locator::parse(loc.digest, &zero), None);
    }
}
