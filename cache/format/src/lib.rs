//! strata-cache-format: how content-addressed bytes are named and stored, with no I/O.
//!
//! This is the code that decodes bytes from the store, so it is kept small, synchronous and
//! free of runtimes: every function here takes a byte slice and answers or errs, never panics.
//!
//! - [`Digest`]: the BLAKE3 name of a piece of content.
//! - [`blob`]: the one-byte codec header every stored object carries (raw or zstd).
//! - [`locator`]: a chunk's locator object, which says where its bytes are ([`ChunkLoc`]).
//! - [`moved`]: where a rewritten pack's live chunks went ([`PackMoves`]).
//! - [`chunk_key`], [`pack_key`]: where chunks and packs live in a store.

pub mod blob;
mod digest;
pub mod locator;
pub mod moved;

pub use digest::{Digest, DigestParseError};
pub use locator::Locator;
pub use moved::{moved_key, Move, PackMoves};

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
