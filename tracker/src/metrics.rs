//! The tracker's Prometheus metrics, served on `--ops-listen` `/metrics`.
//! Names are part of Shoal's interface (DESIGN.md): operators alert on them.
//!
//! One [`Metrics`] per server (not a global), so several trackers can run in
//! one test process.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::replica::ReplicaCounters;
use crate::TrackerStats;

/// Labels of `shoal_tracker_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// announce, lookup, lease, hashes, report or other.
    pub route: &'static str,
    /// The HTTP status sent.
    pub status: u16,
}

/// Labels of `shoal_tracker_request_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// announce, lookup, lease, hashes, report or other.
    pub route: &'static str,
}

/// Every metric the tracker exports.
#[derive(Debug)]
pub struct Metrics {
    /// Requests answered, by route and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Time from request head to response head, by route.
    pub request_duration: Family<RouteLabel, Histogram>,
    /// TLS handshakes that failed or timed out (outsiders, clients without a
    /// certificate, scanners).
    pub handshake_failures: Counter,
    /// Connections open now.
    pub connections: Gauge,
    members: Gauge,
    blobs: Gauge,
    holdings: Gauge,
    leases: Gauge,
    hashes: Gauge,
    excluded: Gauge,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set, registered under `shoal_tracker_*`.
    pub fn new() -> Self {
        let mut m = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.5, 14))
            }),
            handshake_failures: Counter::default(),
            connections: Gauge::default(),
            members: Gauge::default(),
            blobs: Gauge::default(),
            holdings: Gauge::default(),
            leases: Gauge::default(),
            hashes: Gauge::default(),
            excluded: Gauge::default(),
            registry: Registry::default(),
        };
        let r = &mut m.registry;
        r.register(
            "shoal_tracker_requests",
            "Tracker API requests answered, by route and HTTP status",
            m.requests.clone(),
        );
        r.register(
            "shoal_tracker_request_duration_seconds",
            "Tracker API latency until the response head, by route",
            m.request_duration.clone(),
        );
        r.register(
            "shoal_tracker_handshake_failures",
            "TLS handshakes refused or timed out (no certificate of the cluster CA, or not TLS)",
            m.handshake_failures.clone(),
        );
        r.register(
            "shoal_tracker_connections",
            "Member connections open",
            m.connections.clone(),
        );
        r.register("shoal_tracker_members", "Live members", m.members.clone());
        r.register("shoal_tracker_blobs", "Blobs tracked", m.blobs.clone());
        r.register(
            "shoal_tracker_holdings",
            "(member, blob) holdings",
            m.holdings.clone(),
        );
        r.register(
            "shoal_tracker_leases",
            "Unexpired origin-fetch leases (chunks)",
            m.leases.clone(),
        );
        r.register(
            "shoal_tracker_hashes",
            "Chunk hashes known",
            m.hashes.clone(),
        );
        r.register(
            "shoal_tracker_excluded",
            "Nodes excluded for bad data",
            m.excluded.clone(),
        );
        m
    }

    /// A fresh set with the counters of a replica sharing a log in Redis,
    /// under `shoal_tracker_replica_*`.
    pub fn replicated(c: &ReplicaCounters) -> Self {
        let mut m = Self::new();
        let r = &mut m.registry;
        r.register(
            "shoal_tracker_replica_applied",
            "Entries of the replicas' shared log applied by this replica",
            c.applied.clone(),
        );
        r.register(
            "shoal_tracker_replica_logged",
            "Requests this replica wrote to the shared log",
            c.logged.clone(),
        );
        r.register(
            "shoal_tracker_replica_unavailable",
            "Requests refused with 503 because Redis did not log them, or this replica did not apply them, in time",
            c.unavailable.clone(),
        );
        r.register(
            "shoal_tracker_replica_snapshots_loaded",
            "Snapshots loaded: at start, and after falling behind the trimmed log",
            c.snapshots_loaded.clone(),
        );
        r.register(
            "shoal_tracker_replica_snapshots_stored",
            "Snapshots this replica stored (the log is trimmed after each)",
            c.snapshots_stored.clone(),
        );
        r.register(
            "shoal_tracker_replica_undecodable",
            "Log entries skipped because they did not decode (damage)",
            c.undecodable.clone(),
        );
        m
    }

    /// Records one answered request.
    pub fn observe(&self, route: &'static str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
        self.request_duration
            .get_or_create(&RouteLabel { route })
            .observe(took.as_secs_f64());
    }

    /// Sets the state gauges from the core's counts.
    pub fn sample(&self, s: &TrackerStats) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.members.set(g(s.members as u64));
        self.blobs.set(g(s.blobs as u64));
        self.holdings.set(g(s.holdings as u64));
        self.leases.set(g(s.leases as u64));
        self.hashes.set(g(s.hashes));
        self.excluded.set(g(s.excluded as u64));
    }

    /// OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}
