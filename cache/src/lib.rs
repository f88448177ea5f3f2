//! strata-cache: everything about bytes named by their hash.
//!
//! - [`Digest`]: the BLAKE3 name of a piece of content.
//! - [`blob`]: the one-byte codec header every stored object carries (raw or zstd).
//! - [`store`]: the [`Store`] trait, its backends (local directory, S3, memory), the counting
//!   and fault-injecting wrappers, and the conformance suite they all pass.
//! - [`ChunkCache`]: the host's chunk cache: memory LRU over a size-capped disk cache over the
//!   store, with single-flight fetches and BLAKE3 verification; and [`AssembledFile`]s, whole
//!   layer files built from cached chunks for the kernel to read directly.
//!
//! This crate knows nothing about files, trees or FUSE.

mod assembled;
pub mod blob;
mod chunk_cache;
mod digest;
mod disk_cache;
pub mod fuzz;
pub mod locator;
pub mod rng;
pub mod store;

pub use assembled::{AssembledFile, FileChunks};
pub use chunk_cache::{
    CacheConfig, CacheStats, ChunkCache, ChunkError, ChunkReader, ReadStats, DEFAULT_FETCH_DEADLINE,
};
pub use digest::{Digest, DigestParseError};
pub use locator::Locator;
pub use store::{
    open_store, CountingStore, FaultConfig, FaultCounts, FaultyStore, MemoryStore, Store,
    StoreCounts, StoreError, StoreErrorKind, StoreOptions, Version,
};

/// Store key of a chunk's locator (where its bytes are): `chunks/<2 hex digits>/<64 hex digits>`.
pub fn chunk_key(digest: &Digest) -> String {
    let hex = digest.to_hex();
    format!("chunks/{}/{}", &hex[..2], hex)
}

/// Store key of a pack (stored chunks back to back): `packs/<2 hex digits>/<64 hex digits>`.
pub fn pack_key(digest: &Digest) -> String {
    let hex = digest.to_hex();
    format!("packs/{}/{}", &hex[..2], hex)
}

/// Where a chunk's stored bytes are, and what they must decode to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLoc {
    /// BLAKE3 of the plain bytes.
    pub digest: Digest,
    /// Plain length.
    pub len: u32,
    /// The pack holding it, and where: `stored_len` bytes at `pack_offset`.
    pub pack: Digest,
    pub pack_offset: u64,
    pub stored_len: u32,
}

impl ChunkLoc {
    /// Whether `next` is stored right after this chunk in the same pack (one ranged GET can
    /// fetch both).
    pub fn adjoins(&self, next: &ChunkLoc) -> bool {
        self.pack == next.pack && self.pack_offset + self.stored_len as u64 == next.pack_offset
    }
}
