//! The store over time: what keeps each object alive ([`mark`]), what the store holds and
//! costs ([`usage`], behind `strata du`), and collecting what nothing keeps alive
//! ([`collect`], behind `strata gc`), safely beside publishes and commits ([`lease`]).
//!
//! Objects are alive when a root names them, directly or through a layer: dataset refs and
//! the earlier layers their [`retention`] keeps, volume heads (with the commits their squashes
//! replaced, which mounts started before the squash still read), conflict records, kept-upper
//! records and daemons' mount leases. A live layer keeps its manifest, the packs holding its
//! chunks, its chunks' locators and its start record. Packs mostly dead are rewritten
//! ([`rewrite`]): their live chunks move to new packs, behind forwarding maps.

pub mod collect;
pub mod lease;
pub mod mark;
pub mod retention;
pub mod rewrite;
pub mod usage;
