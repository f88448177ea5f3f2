//! The store over time: what keeps each object alive ([`mark`]), and what the store holds and
//! costs ([`usage`], behind `strata du`).
//!
//! Objects are alive when a root names them, directly or through a layer: dataset refs,
//! volume heads (with the commits their squashes replaced, which mounts started before the
//! squash still read), conflict records and kept-upper records. A live layer keeps its
//! manifest, the packs holding its chunks, its chunks' locators and its start record.

pub mod mark;
pub mod usage;
