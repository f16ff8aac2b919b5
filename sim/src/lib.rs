//! `shoal-sim`: a deterministic discrete-event simulator of a Shoal swarm.
//!
//! Members run the production download session (`shoal_proto::session`,
//! and through it the scheduler) and talk to the production tracker core
//! (`shoal_tracker::Tracker`); only the network, the origin and the clock
//! are simulated. So a policy change measured here is the change the daemon
//! ships. See `docs/ARCHITECTURE.md` for the map and `docs/BENCHMARKS.md`
//! for what it found.

pub mod engine;
pub mod net;
pub mod queue;
pub mod report;
pub mod rng;
pub mod scenario;
pub mod timers;

pub use engine::Sim;
pub use report::Report;
pub use scenario::{Scenario, Sharing, Start};

/// Runs `scenario` to the end.
pub fn run(scenario: Scenario) -> anyhow::Result<Report> {
    Ok(Sim::new(scenario)?.run())
}
