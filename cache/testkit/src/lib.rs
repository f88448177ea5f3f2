//! strata-testkit: what every crate's randomized tests share, so that one seed replays the same
//! way everywhere: [`rng`], a seeded generator read from the environment, and [`fuzz`], a bounded
//! mutation fuzzer for decoders of untrusted bytes. The fault-injecting store uses [`rng`] too.

pub mod fuzz;
pub mod rng;
