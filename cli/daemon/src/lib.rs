//! strata-daemon: the host daemon as a library, for the `strata` command and for platforms
//! that embed it in their own worker agent.
//!
//! - [`Daemon`]: one chunk cache shared by any number of FUSE mounts of layer stacks (with
//!   scratch or volume uppers), the volume commit lifecycle, and the control socket.
//! - [`DaemonConfig`]: what it is started with.
//! - [`protocol`]: the control protocol's types, versioned ([`protocol::PROTOCOL_VERSION`]).
//! - [`Client`]: a client of the control socket.
//! - [`DaemonError`]: errors with an [`ErrorKind`] a caller can match on, the same in process
//!   and over the socket.
//!
//! `examples/embed.rs` starts a daemon in process, mounts a layer with a scratch upper, reads
//! it and unmounts.

pub mod client;
pub mod config;
pub mod error;
mod leases;
mod metrics;
pub mod protocol;
mod server;

#[cfg(test)]
mod fuzz_tests;

pub use client::{Client, ClientError};
pub use config::DaemonConfig;
pub use error::{DaemonError, DaemonResult, ErrorKind};
pub use protocol::{CommitReply, MountInfo, MountSpec, MountStats, StatsReply};
pub use server::Daemon;
pub use strata_fs::mount::DEFAULT_SCRATCH_INODES;
