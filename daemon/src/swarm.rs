//! This node's place in the swarm: its identity, the tracker it talks to,
//! the QUIC endpoint it serves and dials peers on, and the heartbeat that
//! keeps it a member.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use shoal_proto::tracker_api::MAX_ANNOUNCE_BLOBS;
use shoal_proto::{ChunkLayout, Digest};
use shoal_tracker::client::{AnyTracker, Embedded, ErrorCode, TrackerApi};
use shoal_tracker::clock::MonotonicClock;
use shoal_tracker::https_client::{HttpsConfig, HttpsTracker};
use shoal_tracker::tracker_api::{Announce, BlobHave, NodeId, PeerAddr, Rack, TrackerError};
use shoal_tracker::{Tracker, TrackerConfig};

use crate::config::SwarmConfig;
use crate::dht::{Dht, DhtConfig};
use crate::member::{DhtView, MemberTracker};
use crate::peer::client::PeerClient;
use crate::peer::server::{PeerServer, PeerServerHandle, ServeLimits};
use crate::peer::source::ChunkSource;
use crate::peer::source::Vouched;
use crate::peer::DenyList;
use crate::rate::RateLimit;
use crate::store::Store;

/// Everything a transfer needs to use the swarm.
#[derive(Debug)]
pub struct Swarm {
    /// This node's id (its certificate's name).
    pub node: NodeId,
    /// Where peers reach this node.
    pub addr: PeerAddr,
    /// The tracker (falling back to the DHT when configured).
    pub tracker: MemberTracker,
    /// Dials peers and fetches verified chunks.
    pub peers: Arc<PeerClient>,
    /// The cluster's chunk size for new blobs.
    pub chunk_size: u32,
    /// Where this node sits (`--rack`), said in every announce.
    pub rack: Option<Rack>,
    /// The cluster's deny list, from the tracker's announce replies; the
    /// peer server refuses whom it names.
    pub denied: Arc<DenyList>,
    /// Chunk requests to peers in flight at once, all downloads together
    /// (`--peer-max-inflight`).
    pub max_inflight: u32,
    /// The transfers' announces: one on its way, the rest merged.
    announcer: std::sync::Mutex<shoal_proto::announcer::Announcer>,
}

/// The validity (Unix seconds) of the node certificate in `dir`, if any.
fn node_cert_validity(dir: &std::path::Path) -> Option<(i64, i64)> {
    use rustls::pki_types::pem::PemObject as _;
    let der = rustls::pki_types::CertificateDer::pem_file_iter(dir.join("node.crt"))
        .ok()?
        .next()?
        .ok()?;
    shoal_tracker::server::cert_validity(&der)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Seconds until a certificate valid `from..until` should be renewed: when a
/// third of its lifetime is left.
fn renew_in(from: i64, until: i64, now: i64) -> i64 {
    let renew_at = until - (until - from) / 3;
    renew_at - now
}

/// With `--join`: makes sure `cluster_dir` holds a node certificate with
/// more than a third of its lifetime left, joining the cluster with the
/// token (a new key, a request the tracker signs) when it does not.
pub async fn ensure_certificate(cfg: &SwarmConfig) -> anyhow::Result<()> {
    let Some(join) = &cfg.join else {
        return Ok(());
    };
    if let Some((from, until)) = node_cert_validity(&cfg.cluster_dir) {
        if renew_in(from, until, unix_now()) > 0 {
            return Ok(());
        }
    }
    let (key, csr) = shoal_cluster::certificate_request(&cfg.node_id)?;
    let tls = shoal_cluster::ca_only_client_tls(&cfg.cluster_dir)?;
    let request = shoal_tracker::tracker_api::JoinRequest {
        node: cfg
            .node_id
            .parse()
            .map_err(|e| anyhow::anyhow!("--node-id: {e}"))?,
        token: join.token.clone(),
        csr,
    };
    let reply = shoal_tracker::https_client::join(&join.url, tls, &request)
        .await
        .map_err(|e| anyhow::anyhow!("joining the cluster at {}: {e}", join.url))?;
    shoal_cluster::write_node_identity(&cfg.cluster_dir, &reply.certificate, &key)?;
    tracing::info!(url = %join.url, valid_for_s = reply.valid_for_s, "joined the cluster: node certificate issued");
    Ok(())
}

/// Renews the node certificate through the tracker when a third of its
/// lifetime is left, and puts the new one to use at once: the QUIC
/// endpoint's server and client configs and the tracker client's TLS
/// (connections open keep theirs). Retries every 30 s until it works.
async fn renew_forever(cfg: SwarmConfig, endpoint: quinn::Endpoint, swarm: Arc<Swarm>) {
    let AnyTracker::Https(tracker) = swarm.tracker.primary() else {
        return;
    };
    loop {
        let wait = node_cert_validity(&cfg.cluster_dir)
            .map_or(0, |(from, until)| renew_in(from, until, unix_now()))
            .max(0) as u64;
        tokio::time::sleep(Duration::from_secs(wait)).await;
        match renew_once(&cfg, &endpoint, tracker, &swarm).await {
            Ok(valid_for) => {
                tracing::info!(valid_for_s = valid_for, "node certificate renewed");
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "renewing the node certificate failed; retrying in 30 s");
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
    }
}

async fn renew_once(
    cfg: &SwarmConfig,
    endpoint: &quinn::Endpoint,
    tracker: &HttpsTracker,
    swarm: &Swarm,
) -> anyhow::Result<u64> {
    let (key, csr) = shoal_cluster::certificate_request(&cfg.node_id)?;
    let reply = tracker
        .renew(&swarm.node, csr)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    shoal_cluster::write_node_identity(&cfg.cluster_dir, &reply.certificate, &key)?;
    let identity = shoal_cluster::Identity::load(&cfg.cluster_dir, &cfg.node_id)?;
    let transport = crate::peer::transport_config();
    let mut server = identity.quic_server()?;
    server.transport_config(transport.clone());
    let mut client = identity.quic_client()?;
    client.transport_config(transport);
    endpoint.set_server_config(Some(server));
    swarm.peers.set_client_config(client);
    tracker.set_tls(identity.client_tls()?);
    Ok(reply.valid_for_s)
}

impl Swarm {
    /// Sends a transfer's announce through the node's announcer: when
    /// another is on its way it waits, merged with what the other transfers
    /// announce meanwhile, and goes when that one is answered (a node
    /// pulling five layers sends one announce where it sent five).
    pub fn announce_merged(self: &Arc<Self>, a: shoal_proto::tracker_api::Announce) {
        let first = self
            .announcer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .submit(a);
        let Some(mut a) = first else {
            return;
        };
        let sw = self.clone();
        let task = async move {
            loop {
                if let Err(e) = sw.tracker.announce(a).await {
                    tracing::debug!(error = %e, "announce failed");
                }
                let next = sw
                    .announcer
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .answered();
                match next {
                    Some(n) => a = n,
                    None => break,
                }
            }
        };
        tokio::spawn(tracing::Instrument::in_current_span(task));
    }

    /// Loads the cluster identity, binds the QUIC endpoint, starts serving
    /// `source` to members, and connects to the tracker.
    /// With a DHT configured, it starts too (its peer list kept in
    /// `data_dir`), and vouches for what `vouched` records.
    pub fn start(
        cfg: &SwarmConfig,
        source: Arc<dyn ChunkSource>,
        vouched: Vouched,
        data_dir: &std::path::Path,
    ) -> anyhow::Result<(Arc<Swarm>, PeerServerHandle)> {
        let identity = shoal_cluster::Identity::load(&cfg.cluster_dir, &cfg.node_id)
            .with_context(|| format!("--cluster-dir {}", cfg.cluster_dir.display()))?;
        let transport = crate::peer::transport_config();
        let mut server = identity.quic_server()?;
        server.transport_config(transport.clone());
        let mut client = identity.quic_client()?;
        client.transport_config(transport);
        let mut endpoint = quinn::Endpoint::server(server, cfg.peer_listen)
            .with_context(|| format!("binding --peer-listen {}", cfg.peer_listen))?;
        endpoint.set_default_client_config(client);
        let denied = Arc::new(DenyList::default());
        let limits = ServeLimits {
            max_concurrent_uploads: cfg.max_uploads,
            upload_rate: if cfg.upload_pacing {
                RateLimit::adjustable(cfg.upload_rate)
            } else {
                RateLimit::from_option(cfg.upload_rate)
            },
            pace_uploads: cfg.upload_pacing,
            denied: denied.clone(),
            ..ServeLimits::default()
        };
        let handle = PeerServer::spawn(endpoint.clone(), source, limits);
        let tracker = if cfg.trackers.is_empty() {
            let core = Tracker::new(TrackerConfig::default())
                .map_err(|e| anyhow::anyhow!("embedded tracker: {e}"))?
                .starting_epochs_at(shoal_tracker::clock::epoch_base());
            AnyTracker::Embedded(Embedded::new(
                Arc::new(std::sync::RwLock::new(core)),
                Arc::new(MonotonicClock::new()),
            ))
        } else {
            let https = HttpsTracker::new(
                &cfg.trackers,
                identity.client_tls()?,
                HttpsConfig::default(),
            )
            .map_err(|e| anyhow::anyhow!("--tracker: {e}"))?;
            AnyTracker::Https(https)
        };
        let node: NodeId = cfg
            .node_id
            .parse()
            .map_err(|e| anyhow::anyhow!("--node-id: {e}"))?;
        let addr: PeerAddr = cfg
            .advertise
            .to_string()
            .parse()
            .map_err(|e| anyhow::anyhow!("--advertise: {e}"))?;
        let renew_endpoint = endpoint.clone();
        let peers = Arc::new(PeerClient::with_download_rate(
            endpoint,
            RateLimit::from_option(cfg.download_rate),
        ));
        let tracker = match &cfg.dht {
            None => MemberTracker::new(tracker),
            Some(d) => {
                let dht = Dht::start(DhtConfig {
                    listen: d.listen,
                    advertise: d.advertise,
                    bootstrap: d.bootstrap.clone(),
                    psk: crate::dht::psk_from_ca(&cfg.cluster_dir)?,
                    node: node.clone(),
                    quic: addr.clone(),
                    peers_file: Some(data_dir.join("dht-peers")),
                })?;
                let view = DhtView::new(dht, peers.clone(), node.clone(), vouched);
                MemberTracker::with_dht(tracker, view)
            }
        };
        let swarm = Arc::new(Swarm {
            node,
            addr,
            tracker,
            peers,
            chunk_size: cfg.chunk_size,
            rack: cfg.rack.clone(),
            denied,
            max_inflight: cfg.max_inflight,
            announcer: Default::default(),
        });
        if cfg.join.is_some() {
            tokio::spawn(renew_forever(cfg.clone(), renew_endpoint, swarm.clone()));
        }
        Ok((swarm, handle))
    }

    /// Keeps this node a live member: an announce every `every` (the
    /// transfers announce what they hold as it arrives). The first announce
    /// that gets through, and the first after the tracker says it did not
    /// know this node (it restarted, or forgot the node while it was
    /// unreachable), lists every complete blob of `store` (`full`), so a
    /// restarted node or tracker serves the swarm again at once; the others
    /// carry the blobs the store dropped since.
    ///
    /// `every` holds until the tracker says its announce interval, which is
    /// then kept (within 1 s to 60 s): peers that find this node
    /// unresponsive have the tracker forget it once an announce is half an
    /// interval late, so a heartbeat slower than the tracker's interval would
    /// lose a live node its place.
    pub async fn heartbeat(self: Arc<Self>, store: Store, mut every: Duration) {
        let mut tick = tokio::time::interval(every);
        let mut full_due = true;
        loop {
            tick.tick().await;
            if full_due {
                full_due = !self.announce_all(&store).await;
                continue;
            }
            let dropped = store.take_dropped(MAX_ANNOUNCE_BLOBS);
            let Ok(a) = self.announce(Vec::new(), dropped, false) else {
                continue;
            };
            match self.tracker.announce(a).await {
                Ok(reply) => {
                    let count = reply.denied.len();
                    if self
                        .denied
                        .set(reply.denied.iter().map(|n| n.as_str().to_owned()))
                    {
                        tracing::warn!(denied = count, nodes = ?reply.denied, "the cluster's deny list changed: refusing those nodes");
                    }
                    let period = heartbeat_period(reply.interval_ms);
                    if period != every {
                        tracing::info!(every = ?period, "heartbeat follows the tracker's announce interval");
                        every = period;
                        let start = tokio::time::Instant::now() + every;
                        tick = tokio::time::interval_at(start, every);
                    }
                    if !reply.known {
                        tracing::info!(
                            "the tracker did not know this node: announcing all it holds"
                        );
                        full_due = !self.announce_all(&store).await;
                    }
                }
                Err(e) if e.code() == Some(&ErrorCode::Denied) => {
                    tracing::error!(error = %e, "this node is on the cluster's deny list: the tracker and its peers refuse it");
                    full_due = true;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "heartbeat announce failed");
                    // What was dropped is covered by the next full announce.
                    full_due = e.is_down();
                }
            }
        }
    }

    /// Tells the tracker this node is leaving (shutting down): it forgets
    /// the node with its holdings and leases at once, so members stop
    /// asking it and its leased chunks go to others. Waits at most
    /// `within`; without an answer the tracker forgets the node once its
    /// announces have stopped for a while, as for a node that died.
    pub async fn leave(&self, within: Duration) {
        let a = Announce::leave(self.node.clone(), self.addr.clone());
        match tokio::time::timeout(within, self.tracker.announce(a)).await {
            Ok(Ok(_)) => tracing::info!("left the swarm: the tracker forgot this node"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "leaving the swarm: the tracker refused; it forgets this node once its announces stop")
            }
            Err(_) => {
                tracing::warn!(within = ?within, "leaving the swarm: no answer from the tracker; it forgets this node once its announces stop")
            }
        }
    }

    /// Announces every complete blob of `store` in batches that fit the
    /// tracker's body limit, the first one `full`. Whether it got through;
    /// a tracker that refuses it (a blob laid out differently there, say)
    /// still gets an empty announce, so this node stays a member.
    async fn announce_all(&self, store: &Store) -> bool {
        // Blobs dropped until now are simply not in the list.
        let _ = store.take_dropped(usize::MAX);
        let held: Vec<BlobHave> = store
            .complete_blobs(MAX_ANNOUNCE_BLOBS)
            .into_iter()
            .filter_map(|(d, size)| {
                let layout = ChunkLayout::for_blob_with(size, self.chunk_size).ok()?;
                Some(BlobHave::complete(d, layout))
            })
            .collect();
        let count = held.len();
        let mut first = true;
        for batch in announce_batches(held) {
            let sent = self
                .announce(batch, Vec::new(), first)
                .map_err(|e| e.to_string());
            let result = match sent {
                Ok(a) => self.tracker.announce(a).await.map_err(|e| {
                    let down = e.is_down();
                    (e.to_string(), down)
                }),
                Err(e) => Err((e, false)),
            };
            match result {
                Ok(_) => first = false,
                Err((e, true)) => {
                    tracing::debug!(error = %e, "announcing held blobs failed: tracker unreachable");
                    return false;
                }
                Err((e, false)) => {
                    tracing::warn!(error = %e, "the tracker refused the list of held blobs; peers will not be sent to this node for them");
                    return !first || self.announce_nothing(false).await;
                }
            }
        }
        if first {
            // Nothing held: one empty full announce.
            return self.announce_nothing(true).await;
        }
        tracing::info!(blobs = count, "announced the blobs held here");
        true
    }

    /// An announce from this node (its rack said).
    fn announce(
        &self,
        blobs: Vec<BlobHave>,
        dropped: Vec<Digest>,
        full: bool,
    ) -> Result<Announce, TrackerError> {
        Ok(
            Announce::new(self.node.clone(), self.addr.clone(), blobs, dropped, full)?
                .with_rack(self.rack.clone()),
        )
    }

    /// An announce of no blobs (alive, and with `full`, holding nothing);
    /// whether it got through.
    async fn announce_nothing(&self, full: bool) -> bool {
        match self.announce(Vec::new(), Vec::new(), full) {
            Ok(a) => self.tracker.announce(a).await.is_ok(),
            Err(_) => false,
        }
    }
}

/// Splits `held` into announces of at most [`MAX_ANNOUNCE_BLOBS`] blobs and
/// about [`ANNOUNCE_BATCH_BYTES`] of JSON each (a complete blob's entry is
/// its digest and layout plus its bitfield in base64).
fn announce_batches(held: Vec<BlobHave>) -> Vec<Vec<BlobHave>> {
    let mut out: Vec<Vec<BlobHave>> = Vec::new();
    let mut bytes = 0usize;
    for bh in held {
        let size = 200 + (bh.layout().count() as usize).div_ceil(8) * 4 / 3;
        let fits = out
            .last()
            .is_some_and(|b| b.len() < MAX_ANNOUNCE_BLOBS && bytes + size <= ANNOUNCE_BATCH_BYTES);
        if !fits {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        out.last_mut().expect("pushed").push(bh);
    }
    out
}

/// Target JSON size of one announce of held blobs (the tracker takes 8 MiB).
const ANNOUNCE_BATCH_BYTES: usize = 2 << 20;

/// The heartbeat for a tracker announce interval of `interval_ms`: the
/// interval itself, within 1 s to 60 s.
fn heartbeat_period(interval_ms: u64) -> Duration {
    Duration::from_millis(interval_ms.clamp(1_000, 60_000))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::sync::RwLock;

    use shoal_tracker::clock::Clock;

    use sha2::Digest as _;

    use super::*;
    use crate::store::Kind;

    /// Time that moves only when the test says so.
    #[derive(Debug, Default)]
    struct TestClock(std::sync::atomic::AtomicU64);

    impl Clock for TestClock {
        fn now_ms(&self) -> u64 {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    fn swarm(tracker: Arc<RwLock<Tracker>>, clock: Arc<TestClock>) -> Swarm {
        let endpoint = quinn::Endpoint::client(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
        Swarm {
            node: "node-1".parse().unwrap(),
            addr: "127.0.0.1:4901".parse().unwrap(),
            tracker: MemberTracker::new(AnyTracker::Embedded(Embedded::new(tracker, clock))),
            peers: Arc::new(PeerClient::new(endpoint)),
            chunk_size: shoal_proto::chunk::DEFAULT_CHUNK_SIZE,
            rack: None,
            denied: Arc::default(),
            max_inflight: 32,
            announcer: Default::default(),
        }
    }

    /// Another member's announce of nothing, from a loopback address.
    fn empty_announce(node: &NodeId) -> Announce {
        let addr = "127.0.0.1:4902".parse().unwrap();
        Announce::new(node.clone(), addr, vec![], vec![], false).unwrap()
    }

    /// A store in `dir` holding one blob of `len` bytes of `fill`.
    fn store_holding(dir: &std::path::Path, fill: u8, len: usize) -> (Store, shoal_proto::Digest) {
        let (store, _) = Store::open(dir, 1 << 30).unwrap();
        let data = vec![fill; len];
        let d: shoal_proto::Digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&data)))
            .parse()
            .unwrap();
        store.put_small(&d, Kind::Blob, &data, None).unwrap();
        (store, d)
    }

    #[test]
    fn the_heartbeat_follows_the_trackers_interval_within_bounds() {
        assert_eq!(heartbeat_period(5_000), Duration::from_secs(5));
        assert_eq!(heartbeat_period(2_500), Duration::from_millis(2_500));
        assert_eq!(heartbeat_period(0), Duration::from_secs(1));
        assert_eq!(heartbeat_period(u64::MAX), Duration::from_secs(60));
    }

    #[tokio::test]
    async fn the_heartbeat_brings_the_clusters_deny_list_to_the_peer_server() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 1 << 30).unwrap();
        let core = Arc::new(RwLock::new(Tracker::new(TrackerConfig::default()).unwrap()));
        let denied: std::collections::BTreeSet<NodeId> =
            ["mallory".parse().unwrap()].into_iter().collect();
        core.write().unwrap().deny(0, denied).unwrap();
        let sw = Arc::new(swarm(core, Arc::new(TestClock::default())));
        let beat = tokio::spawn(sw.clone().heartbeat(store, Duration::from_millis(10)));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while sw.denied.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the list never came"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        beat.abort();
        assert!(sw.denied.denies(&["mallory".to_owned()]));
        assert!(!sw.denied.denies(&["node-2".to_owned()]));
    }

    #[tokio::test]
    async fn a_node_that_leaves_is_no_longer_named_to_other_members() {
        let dir = tempfile::tempdir().unwrap();
        let (store, d) = store_holding(dir.path(), 9u8, 1 << 20);
        let core = Arc::new(RwLock::new(Tracker::new(TrackerConfig::default()).unwrap()));
        let sw = swarm(core.clone(), Arc::new(TestClock::default()));
        let other: NodeId = "node-2".parse().unwrap();
        core.write()
            .unwrap()
            .announce(0, empty_announce(&other))
            .unwrap();
        assert!(sw.announce_all(&store).await);
        assert_eq!(
            core.write()
                .unwrap()
                .lookup(0, &other, &d)
                .unwrap()
                .holders()
                .len(),
            1
        );
        sw.leave(Duration::from_secs(1)).await;
        assert_eq!(core.read().unwrap().stats().members, 1);
        assert!(
            core.write().unwrap().lookup(0, &other, &d).is_err(),
            "the blob only the leaver held is gone"
        );
    }

    #[tokio::test]
    async fn held_blobs_are_announced_in_full_and_dropped_ones_queued_for_the_heartbeat() {
        let dir = tempfile::tempdir().unwrap();
        let (store, d) = store_holding(dir.path(), 7u8, 3 << 20);
        let core = Arc::new(RwLock::new(Tracker::new(TrackerConfig::default()).unwrap()));
        let clock = Arc::new(TestClock::default());
        let sw = swarm(core.clone(), clock.clone());
        let me: NodeId = "node-1".parse().unwrap();
        // Another member looks the blob up.
        let other: NodeId = "node-2".parse().unwrap();
        let join = |t: &RwLock<Tracker>, rack: Option<Rack>| {
            let a = empty_announce(&other).with_rack(rack);
            t.write().unwrap().announce(0, a).unwrap();
        };
        join(&core, None);

        assert!(sw.announce_all(&store).await);
        let view = core.write().unwrap().lookup(0, &other, &d).unwrap();
        let holder = &view.holders()[0];
        assert!(holder.complete && holder.node == me, "{view:?}");
        assert!(!holder.near, "no rack said, nobody near");
        let layout = ChunkLayout::for_blob_with(3 << 20, sw.chunk_size).unwrap();
        assert_eq!(view.layout(), layout);
        assert_eq!(holder.have.count(), layout.count());

        // With --rack, every announce says it: a member of the same rack
        // sees this node as near.
        let rack: Rack = "rack-a".parse().unwrap();
        let sw = Swarm {
            rack: Some(rack.clone()),
            ..swarm(core.clone(), clock.clone())
        };
        assert!(sw.announce_all(&store).await);
        join(&core, Some(rack));
        let view = core.write().unwrap().lookup(0, &other, &d).unwrap();
        assert!(view.holders()[0].near, "{view:?}");

        // A full announce after the tracker forgot the node restores it.
        let fresh = Arc::new(RwLock::new(Tracker::new(TrackerConfig::default()).unwrap()));
        let sw = swarm(fresh.clone(), clock);
        let reply = sw
            .tracker
            .announce(Announce::new(me.clone(), sw.addr.clone(), vec![], vec![], false).unwrap())
            .await
            .unwrap();
        assert!(!reply.known, "a new tracker knew the node");
        assert!(sw.announce_all(&store).await);
        join(&fresh, None);
        assert_eq!(
            fresh
                .write()
                .unwrap()
                .lookup(0, &other, &d)
                .unwrap()
                .holders()
                .len(),
            1
        );

        // Dropped blobs go out with the next heartbeat.
        store.remove(&d).unwrap();
        assert_eq!(store.take_dropped(10), vec![d]);
        assert!(store.take_dropped(10).is_empty());
    }
}
