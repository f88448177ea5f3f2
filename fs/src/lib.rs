//! strata-fs: everything about trees.
//!
//! - [`manifest`]: the layer format, which is the `strata-fs-format` crate (no I/O).
//! - [`publish`]: walking a directory into a layer (FastCDC chunks, parallel deduped uploads).
//! - [`refs`]: dataset refs `name:tag` → layer digest, moved by compare-and-swap.
//! - [`layer`]: a layer opened for reading through the chunk cache.
//! - [`stack`]: read-only layers stacked with overlay rules, as a plain API.
//! - [`upper`]: the writable upper of a mount over its stack ([`upper::MountTree`]).
//! - [`volume`]: persistent volumes: chains of committed delta layers under a CAS'd head.
//!   Their commit lifecycle (records, kept uppers and their retry) is [`volume::lifecycle`].
//! - [`mount`]: mount assembly (refs resolved, layers loaded, a volume stacked on top).
//!
//! The FUSE adapter over [`upper::MountTree`] is the `strata-fuse` crate.

pub mod blocking;
pub mod delta;
pub mod error;
pub mod gc;
pub mod handles;
pub mod layer;
pub mod mount;
pub mod pack;
pub mod permit;
pub mod prefetch;
pub mod publish;
pub mod record;
pub mod refs;
pub mod squash;
pub mod stack;
pub mod upper;
pub mod volume;

#[cfg(test)]
mod fault_campaign;
#[cfg(test)]
mod fuzz_tests;

pub use error::{FsError, FsResult};
pub use strata_fs_format as manifest;
