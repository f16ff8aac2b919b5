//! Prometheus metrics. Names and labels are part of Shoal's interface
//! (DESIGN.md): benchmarks and operators read them.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `kind="blob|manifest"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// blob or manifest.
    pub kind: &'static str,
}

/// `source="peer|origin"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// peer or origin.
    pub source: &'static str,
}

/// Labels of the request-latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// base, manifest, blob, other.
    pub route: &'static str,
    /// HTTP method.
    pub method: &'static str,
    /// Status class: 2xx, 3xx, 4xx, 5xx.
    pub status: &'static str,
}

/// Every metric the daemon exports.
#[derive(Debug)]
pub struct Metrics {
    /// Response-body bytes received from origins.
    pub origin_bytes: Family<KindLabel, Counter>,
    /// Bytes received from peers (the swarm).
    pub peer_bytes_received: Counter,
    /// Bytes sent to peers (the swarm).
    pub peer_bytes_sent: Counter,
    /// Bitfields received from watched peers.
    pub watch_frames: Counter,
    /// Body bytes handed to clients on the registry endpoint.
    pub client_bytes_served: Counter,
    /// Chunks (or whole blobs) that failed verification.
    pub chunks_rejected: Family<SourceLabel, Counter>,
    /// Transfers in progress.
    pub transfers_active: Gauge,
    /// Registry-endpoint request latency until the response head.
    pub request_duration: Family<RequestLabels, Histogram>,
    /// Requests served from the local store without moving blob bytes.
    pub cache_hits: Family<KindLabel, Counter>,
    /// Requests that had to fetch.
    pub cache_misses: Family<KindLabel, Counter>,
    /// Blobs evicted by the quota.
    pub evictions: Counter,
    /// Bytes in the store (complete + partial).
    pub store_bytes: Gauge,
    /// The quota.
    pub store_quota_bytes: Gauge,
    /// Blobs the store could not hold (served straight from the origin).
    pub store_refusals: Counter,
    /// Transfers the store gave up on because writing failed, by reason
    /// (`no_space`: the filesystem is full; `io`: another error).
    pub store_write_failures: Family<ReasonLabel, Counter>,
    /// Requests made to origins, by outcome.
    pub origin_requests: Family<OutcomeLabel, Counter>,
    /// Nodes on the cluster's deny list as last heard from the tracker.
    pub denied_nodes: Gauge,
    /// Peer connections or streams refused because the peer is denied.
    pub denied_refusals: Counter,
    /// Other DHT nodes this node is connected to.
    pub dht_peers: Gauge,
    /// The upload cap learned from losses (`--peer-upload-pacing auto`),
    /// bytes a second; 0 while there is none.
    pub peer_upload_learned_cap: Gauge,
    /// Tracker calls answered from the DHT and the members (the tracker
    /// was unreachable), by call.
    pub dht_answers: Family<CallLabel, Counter>,
    registry: Registry,
}

/// `call="lookup|lease"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabel {
    /// The tracker call.
    pub call: &'static str,
}

/// `reason="no_space|io"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: &'static str,
}

/// `outcome="ok|not_found|denied|unavailable|error"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// What happened.
    pub outcome: &'static str,
}

impl Metrics {
    fn new() -> Self {
        let mut m = Metrics {
            origin_bytes: Family::default(),
            peer_bytes_received: Counter::default(),
            peer_bytes_sent: Counter::default(),
            watch_frames: Counter::default(),
            client_bytes_served: Counter::default(),
            chunks_rejected: Family::default(),
            transfers_active: Gauge::default(),
            request_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.5, 14))
            }),
            cache_hits: Family::default(),
            cache_misses: Family::default(),
            evictions: Counter::default(),
            store_bytes: Gauge::default(),
            store_quota_bytes: Gauge::default(),
            store_refusals: Counter::default(),
            store_write_failures: Family::default(),
            denied_nodes: Gauge::default(),
            denied_refusals: Counter::default(),
            dht_peers: Gauge::default(),
            peer_upload_learned_cap: Gauge::default(),
            dht_answers: Family::default(),
            origin_requests: Family::default(),
            registry: Registry::default(),
        };
        // Series with known label values exist from the start, at zero, so
        // `rate()` and alerts see them before the first event.
        for kind in ["blob", "manifest"] {
            let k = KindLabel { kind };
            let _ = m.origin_bytes.get_or_create(&k);
            let _ = m.cache_hits.get_or_create(&k);
            let _ = m.cache_misses.get_or_create(&k);
        }
        for source in ["peer", "origin"] {
            let _ = m.chunks_rejected.get_or_create(&SourceLabel { source });
        }
        for reason in ["no_space", "io"] {
            let _ = m
                .store_write_failures
                .get_or_create(&ReasonLabel { reason });
        }
        for call in ["lookup", "lease"] {
            let _ = m.dht_answers.get_or_create(&CallLabel { call });
        }
        let r = &mut m.registry;
        r.register(
            "shoal_origin_bytes",
            "Response-body bytes received from origin registries",
            m.origin_bytes.clone(),
        );
        r.register(
            "shoal_peer_bytes_received",
            "Bytes received from peers",
            m.peer_bytes_received.clone(),
        );
        r.register(
            "shoal_peer_bytes_sent",
            "Bytes sent to peers",
            m.peer_bytes_sent.clone(),
        );
        r.register(
            "shoal_peer_watch_frames",
            "Bitfields received from watched peers (each says which chunks the peer holds now)",
            m.watch_frames.clone(),
        );
        r.register(
            "shoal_client_bytes_served",
            "Body bytes served to clients",
            m.client_bytes_served.clone(),
        );
        r.register(
            "shoal_chunks_rejected",
            "Chunks or blobs that failed SHA-256 verification",
            m.chunks_rejected.clone(),
        );
        r.register(
            "shoal_transfers_active",
            "Blob transfers in progress",
            m.transfers_active.clone(),
        );
        r.register(
            "shoal_request_duration_seconds",
            "Registry endpoint latency until the response head is ready",
            m.request_duration.clone(),
        );
        r.register(
            "shoal_cache_hits",
            "Requests answered from the local store",
            m.cache_hits.clone(),
        );
        r.register(
            "shoal_cache_misses",
            "Requests that needed a fetch",
            m.cache_misses.clone(),
        );
        r.register(
            "shoal_evictions",
            "Blobs evicted to stay under the quota",
            m.evictions.clone(),
        );
        r.register(
            "shoal_store_bytes",
            "Bytes held in the store",
            m.store_bytes.clone(),
        );
        r.register(
            "shoal_store_quota_bytes",
            "Store quota (--cache-max-bytes)",
            m.store_quota_bytes.clone(),
        );
        r.register(
            "shoal_store_refusals",
            "Blobs the store could not hold, passed through from the origin unstored",
            m.store_refusals.clone(),
        );
        r.register(
            "shoal_store_write_failures",
            "Transfers the store gave up on because writing failed (no_space: the filesystem is full); their clients continued from the origin",
            m.store_write_failures.clone(),
        );
        r.register(
            "shoal_dht_peers",
            "Other members' DHT nodes this node is connected to",
            m.dht_peers.clone(),
        );
        r.register(
            "shoal_peer_upload_learned_cap_bytes_per_second",
            "The upload cap shoald learned from losses on most peer connections at once (0: none)",
            m.peer_upload_learned_cap.clone(),
        );
        r.register(
            "shoal_dht_answers",
            "Tracker calls answered from the DHT and the members because the tracker was unreachable",
            m.dht_answers.clone(),
        );
        r.register(
            "shoal_peer_denied_nodes",
            "Nodes on the cluster's deny list, as last heard from the tracker",
            m.denied_nodes.clone(),
        );
        r.register(
            "shoal_peer_denied_refusals",
            "Peer connections and streams refused because the peer is on the deny list",
            m.denied_refusals.clone(),
        );
        r.register(
            "shoal_origin_requests",
            "Requests sent to origins, by outcome",
            m.origin_requests.clone(),
        );
        for kind in ["blob", "manifest"] {
            let _ = m.origin_bytes.get_or_create(&KindLabel { kind });
        }
        for source in ["peer", "origin"] {
            let _ = m.chunks_rejected.get_or_create(&SourceLabel { source });
        }
        m
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    /// Records one registry-endpoint request.
    pub fn observe_request(
        &self,
        route: &'static str,
        method: &http::Method,
        status: u16,
        elapsed: Duration,
    ) {
        let method = match *method {
            http::Method::GET => "GET",
            http::Method::HEAD => "HEAD",
            _ => "other",
        };
        let status = match status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.request_duration
            .get_or_create(&RequestLabels {
                route,
                method,
                status,
            })
            .observe(elapsed.as_secs_f64());
    }
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}
