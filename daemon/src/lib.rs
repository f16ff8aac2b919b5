//! The `shoald` daemon as a library: the binary (`src/main.rs`) wires these
//! modules together, and benchmarks (`src/bin/peer-bench.rs`) drive the peer
//! data plane and the store directly, without a running daemon.
//!
//! - [`store`]: verified blobs on disk and their index;
//! - [`peer`]: the QUIC peer data plane (serve and fetch verified chunks);
//! - [`rate`]: the upload and download caps of the peer data plane;
//! - [`swarm`]: this node's identity, tracker and peer endpoint;
//! - [`content`]: what the registry API serves, backed by the store,
//!   transfers from origins and the swarm;
//! - [`config`] and [`ops`]: the daemon's flags and its `/metrics` and
//!   `/healthz` endpoint;
//! - [`admin`] and [`preheat`]: the admin API on a Unix socket that
//!   `shoalctl` uses, and the worker that runs the tracker's preheat jobs.

pub mod admin;
pub mod config;
pub mod configure;
pub mod content;
pub mod dht;
pub mod member;
mod metrics;
pub mod ops;
pub mod peer;
pub mod preheat;
pub mod rate;
pub mod store;
pub mod swarm;
mod transfer;
pub mod uplink;
