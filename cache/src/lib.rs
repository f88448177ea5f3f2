//! strata-cache: everything about bytes named by their hash.
//!
//! - [`Digest`]: the BLAKE3 name of a piece of content.
//! - [`blob`]: the one-byte codec header every stored object carries (raw or zstd).
//! - [`store`]: the [`Store`] trait and its backends (local directory, S3).
//! - [`ChunkCache`]: the host's chunk cache: memory LRU over a size-capped disk cache over the
//!   store, with single-flight fetches and BLAKE3 verification.
//!
//! This crate knows nothing about files, trees or FUSE.

pub mod blob;
mod chunk_cache;
mod digest;
mod disk_cache;
pub mod store;

pub use chunk_cache::{
    CacheConfig, CacheStats, ChunkCache, ChunkError, ChunkReader, ReadStats, DEFAULT_FETCH_DEADLINE,
};
pub use digest::{Digest, DigestParseError};
pub use store::{open_store, Store, StoreError, StoreErrorKind, StoreOptions, Version};

/// Store key of a chunk: `chunks/<first two hex digits>/<64 hex digits>`.
pub fn chunk_key(digest: &Digest) -> String {
    let hex = digest.to_hex();
    format!("chunks/{}/{}", &hex[..2], hex)
}
