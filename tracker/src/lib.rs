//! Shoal's tracker: who holds which chunks of which blobs, the chunk hashes
//! peers verify against, and the origin-fetch leases that make a cluster
//! fetch each chunk from the origin about once.
//!
//! This increment is the sans-IO core ([`Tracker`]): a deterministic state
//! machine with time as an input, embedded by the daemon (`--tracker
//! embedded`), driven by the swarm simulator, and later wrapped by the HTTPS
//! server. The request and reply types are shared with clients and live in
//! [`shoal_proto::tracker_api`].

mod blob;
pub mod core;

pub use crate::core::{ConfigError, Tracker, TrackerConfig, TrackerStats};
pub use shoal_proto::tracker_api;

#[cfg(test)]
mod tests;
