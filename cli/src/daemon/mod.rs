//! The host daemon and the protocol its clients speak.

pub mod protocol;
pub mod server;
pub mod volumes;

#[cfg(test)]
mod fuzz_tests;
