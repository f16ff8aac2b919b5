//! Shoal's tracker: who holds which chunks of which blobs, the chunk hashes
//! peers verify against, and the origin-fetch leases that make a cluster
//! fetch each chunk from the origin about once.
//!
//! - [`Tracker`] (module [`core`]): the sans-IO core, a deterministic state
//!   machine with time as an input, driven by the swarm simulator.
//! - [`client`]: the [`TrackerApi`](client::TrackerApi) seam a member uses,
//!   with the in-process [`Embedded`](client::Embedded) (`--tracker
//!   embedded`) and, with the `net` feature, the HTTPS client
//!   ([`https_client`]).
//! - With the `net` feature (default): the HTTPS [`server`] and its
//!   [`metrics`], run by the `shoal-tracker` binary.
//!
//! The request and reply types are shared with clients and live in
//! [`shoal_proto::tracker_api`].

mod blob;
pub mod client;
pub mod clock;
pub mod command;
pub mod core;
#[cfg(feature = "net")]
pub mod https_client;
mod jobs;
#[cfg(feature = "net")]
pub mod metrics;
#[cfg(feature = "net")]
pub mod page;
#[cfg(feature = "net")]
pub mod replica;
#[cfg(feature = "net")]
pub mod server;
#[cfg(feature = "net")]
pub mod webhook;

pub use crate::core::{
    BlobSummary, ConfigError, MemberSummary, Tracker, TrackerConfig, TrackerStats,
};
pub use shoal_proto::tracker_api;

#[cfg(test)]
mod tests;
