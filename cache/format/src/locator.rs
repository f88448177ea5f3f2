//! Chunk locators: a small object per chunk, `chunks/<hex>`, saying which pack holds the chunk
//! and where. Readers never need them (a layer's manifest carries every location); publish
//! looks them up so that a chunk already anywhere in the store is never uploaded again.
//!
//! A locator is not named by its content, so it carries a checksum: a locator damaged in
//! transit would otherwise send a new layer's manifest to a pack that is not there, and its
//! bytes would be lost on the first read. A damaged locator is ignored (the chunk is stored
//! again).
//!
//! Format (76 bytes, little-endian): magic `STRATALC`, version u32 = 2, pack digest (32),
//! pack offset u64, stored length u32, plain length u32, then the first 16 bytes of the
//! BLAKE3 of the chunk's digest (32) followed by the 60 bytes before it. Version 1 (the same
//! 60 bytes without the checksum) is still read.

use crate::{ChunkLoc, Digest};

const MAGIC: &[u8; 8] = b"STRATALC";
const VERSION: u32 = 2;
const BODY_LEN: usize = 60;
pub const LOCATOR_LEN: usize = BODY_LEN + 16;

pub struct Locator;

/// Ties a locator's fields to the chunk it is the locator of.
fn checksum(digest: &Digest, body: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(&digest.0);
    h.update(body);
    h.finalize().as_bytes()[..16]
        .try_into()
        .expect("16 of 32 bytes")
}

impl Locator {
    pub fn encode(loc: &ChunkLoc) -> Vec<u8> {
        let mut out = Vec::with_capacity(LOCATOR_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&loc.pack.0);
        out.extend_from_slice(&loc.pack_offset.to_le_bytes());
        out.extend_from_slice(&loc.stored_len.to_le_bytes());
        out.extend_from_slice(&loc.len.to_le_bytes());
        let sum = checksum(&loc.digest, &out);
        out.extend_from_slice(&sum);
        out
    }

    /// The location of chunk `digest` from its locator object; `None` if the bytes are not a
    /// locator this version understands, or are damaged.
    pub fn parse(digest: Digest, bytes: &[u8]) -> Option<ChunkLoc> {
        if bytes.len() < BODY_LEN || &bytes[..8] != MAGIC {
            return None;
        }
        match (
            u32::from_le_bytes(bytes[8..12].try_into().ok()?),
            bytes.len(),
        ) {
            (1, BODY_LEN) => {}
            (2, LOCATOR_LEN) => {
                if checksum(&digest, &bytes[..BODY_LEN])[..] != bytes[BODY_LEN..] {
                    return None;
                }
            }
            _ => return None,
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
        let mut zero = bytes.clone();
        zero[52..56].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(Locator::parse(loc.digest, &zero), None);
        // Damage anywhere is caught: a flipped bit, or a locator under another chunk's key.
        for i in 0..bytes.len() * 8 {
            let mut bad = bytes.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert_eq!(Locator::parse(loc.digest, &bad), None, "bit {i}");
        }
        assert_eq!(Locator::parse(Digest::of(b"other"), &bytes), None);
        // Version 1 (no checksum) is still read.
        let mut v1 = bytes[..60].to_vec();
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(Locator::parse(loc.digest, &v1), Some(loc));
    }
}
