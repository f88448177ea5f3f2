//! strata-cache: the host's chunk cache.
//!
//! [`ChunkCache`]: a memory LRU over a size-capped disk cache over a [`Store`], with
//! single-flight fetches and BLAKE3 verification of every byte before a reader sees it; and
//! local copies of large layer files, filled in place as their chunks arrive, that the kernel
//! reads directly once complete ([`AssembledFile`]). The disk cache holds the cache directory's lock, so two daemons never share one.
//!
//! How chunks are named and encoded is `strata-cache-format`; where they are stored is
//! `strata-store`. This crate knows nothing about files, trees or FUSE.

mod assembled;
mod chunk_cache;
mod disk_cache;
mod lock;
mod low_priority;
mod pieces;

pub use assembled::{AssembledFile, FileChunks, FileLayout};
pub use chunk_cache::{
    BackgroundKind, CacheConfig, CacheStats, ChunkCache, ChunkError, ChunkReader, FetchLatency,
    ReadStats, DEFAULT_FETCH_DEADLINE, FETCH_LATENCY_BOUNDS,
};
pub use lock::CacheDirLock;
