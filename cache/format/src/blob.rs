//! The envelope of every object strata stores under a content name (chunks and layer
//! manifests): one codec byte, then the payload.
//!
//! | first byte | payload |
//! |---|---|
//! | `0x00` | the plain bytes |
//! | `0x01` | one zstd frame that decompresses to the plain bytes |
//!
//! The content name is the BLAKE3 hash of the *plain* bytes, so the name does not depend on the
//! compressor's version or level, and readers verify after decoding.

use crate::Digest;

const RAW: u8 = 0;
const ZSTD: u8 = 1;
const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlobError {
    #[error("empty object (no codec byte)")]
    Empty,
    #[error("unknown codec byte {0:#04x}")]
    UnknownCodec(u8),
    #[error("zstd payload is corrupt: {0}")]
    Corrupt(String),
    #[error("decodes to more than the allowed {limit} bytes")]
    TooLarge { limit: usize },
    #[error("content hash mismatch: expected {expected}, got {actual}")]
    HashMismatch { expected: Digest, actual: Digest },
}

/// Encodes `plain`, compressing with zstd only when that makes the object smaller.
pub fn encode(plain: &[u8]) -> Vec<u8> {
    if let Ok(compressed) = zstd::bulk::compress(plain, ZSTD_LEVEL) {
        if compressed.len() < plain.len() {
            let mut out = Vec::with_capacity(compressed.len() + 1);
            out.push(ZSTD);
            out.extend_from_slice(&compressed);
            return out;
        }
    }
    let mut out = Vec::with_capacity(plain.len() + 1);
    out.push(RAW);
    out.extend_from_slice(plain);
    out
}

/// Decodes an object, refusing to produce more than `limit` bytes (a hostile store could
/// otherwise hand us a zstd bomb).
pub fn decode(object: &[u8], limit: usize) -> Result<Vec<u8>, BlobError> {
    let (&codec, payload) = object.split_first().ok_or(BlobError::Empty)?;
    match codec {
        RAW => {
            if payload.len() > limit {
                return Err(BlobError::TooLarge { limit });
            }
            Ok(payload.to_vec())
        }
        ZSTD => {
            // A frame that says its size (every frame strata writes does) is decoded in one
            // pass into a buffer of exactly that size; a frame that says it is larger than
            // it is fails there. Others are streamed, up to the limit.
            match zstd::zstd_safe::get_frame_content_size(payload) {
                Ok(Some(size)) if size > limit as u64 => {
                    return Err(BlobError::TooLarge { limit });
                }
                Ok(Some(size)) => {
                    return zstd::bulk::decompress(payload, size as usize)
                        .map_err(|e| BlobError::Corrupt(e.to_string()))
                        .and_then(|out| {
                            if out.len() as u64 == size {
                                Ok(out)
                            } else {
                                Err(BlobError::Corrupt(format!(
                                    "the frame says {size} bytes but holds {}",
                                    out.len()
                                )))
                            }
                        });
                }
                _ => {}
            }
            use std::io::Read;
            let decoder = zstd::stream::read::Decoder::new(payload)
                .map_err(|e| BlobError::Corrupt(e.to_string()))?;
            let mut out = Vec::new();
            decoder
                .take(limit as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| BlobError::Corrupt(e.to_string()))?;
            if out.len() > limit {
                return Err(BlobError::TooLarge { limit });
            }
            Ok(out)
        }
        other => Err(BlobError::UnknownCodec(other)),
    }
}

/// Decodes and checks that the plain bytes hash to `expected`. Raw objects are not copied:
/// the plain bytes are a slice of `object`.
pub fn decode_verified(
    object: &bytes::Bytes,
    expected: &Digest,
    limit: usize,
) -> Result<bytes::Bytes, BlobError> {
    let plain = match object.first() {
        Some(&RAW) if object.len() - 1 > limit => return Err(BlobError::TooLarge { limit }),
        Some(&RAW) => object.slice(1..),
        _ => bytes::Bytes::from(decode(object, limit)?),
    };
    let actual = Digest::of(&plain);
    if actual != *expected {
        return Err(BlobError::HashMismatch {
            expected: *expected,
            actual,
        });
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressible_data_is_compressed_and_round_trips() {
        let plain = vec![7u8; 100_000];
        let obj = encode(&plain);
        assert_eq!(obj[0], ZSTD);
        assert!(obj.len() < 1000);
        assert_eq!(
            decode_verified(
                &bytes::Bytes::from(obj.clone()),
                &Digest::of(&plain),
                1 << 20
            )
            .unwrap(),
            plain
        );
    }

    #[test]
    fn incompressible_data_is_stored_raw() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let plain: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let obj = encode(&plain);
        assert_eq!(obj[0], RAW);
        assert_eq!(decode(&obj, 1 << 20).unwrap(), plain);
    }

    /// A frame whose header names another size than it holds is refused, whichever way.
    #[test]
    fn a_frame_that_lies_about_its_size_is_corrupt() {
        let plain = vec![5u8; 200];
        let obj = encode(&plain);
        assert_eq!(obj[0], ZSTD);
        // One-segment frame of a small input: magic (4), header byte, then a 1-byte size.
        let size_at = 1 + 5;
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&obj[1..]).ok(),
            Some(Some(200))
        );
        for claimed in [100u8, 250] {
            let mut lying = obj.clone();
            lying[size_at] = claimed;
            assert_eq!(
                zstd::zstd_safe::get_frame_content_size(&lying[1..]).ok(),
                Some(Some(claimed as u64))
            );
            assert!(
                matches!(decode(&lying, 1 << 20), Err(BlobError::Corrupt(_))),
                "claimed {claimed}"
            );
        }
        // A size over the limit is refused before any decoding.
        assert_eq!(decode(&obj, 199), Err(BlobError::TooLarge { limit: 199 }));
        assert_eq!(decode(&obj, 200).unwrap(), plain);
    }

    #[test]
    fn bad_objects_are_clear_errors() {
        assert_eq!(decode(&[], 10), Err(BlobError::Empty));
        assert_eq!(decode(&[9, 1, 2], 10), Err(BlobError::UnknownCodec(9)));
        assert!(matches!(
            decode(&[ZSTD, 1, 2, 3], 10),
            Err(BlobError::Corrupt(_))
        ));
        let bomb = encode(&vec![0u8; 1 << 20]);
        assert_eq!(
            decode(&bomb, 1000),
            Err(BlobError::TooLarge { limit: 1000 })
        );
        let obj = encode(b"abc");
        assert!(matches!(
            decode_verified(&bytes::Bytes::from(obj.clone()), &Digest::of(b"abd"), 10),
            Err(BlobError::HashMismatch { .. })
        ));
    }
}
