//! This node's place in the swarm: its identity, the tracker it talks to,
//! the QUIC endpoint it serves and dials peers on, and the heartbeat that
//! keeps it a member.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use shoal_tracker::client::{AnyTracker, Embedded, TrackerApi};
use shoal_tracker::clock::MonotonicClock;
use shoal_tracker::https_client::{HttpsConfig, HttpsTracker};
use shoal_tracker::tracker_api::{Announce, NodeId, PeerAddr};
use shoal_tracker::{Tracker, TrackerConfig};

use crate::config::SwarmConfig;
use crate::peer::client::PeerClient;
use crate::peer::server::{PeerServer, PeerServerHandle, ServeLimits};
use crate::peer::source::ChunkSource;
use crate::rate::RateLimit;

/// Everything a transfer needs to use the swarm.
#[derive(Debug)]
pub struct Swarm {
    /// This node's id (its certificate's name).
    pub node: NodeId,
    /// Where peers reach this node.
    pub addr: PeerAddr,
    /// The tracker.
    pub tracker: AnyTracker,
    /// Dials peers and fetches verified chunks.
    pub peers: PeerClient,
    /// The cluster's chunk size for new blobs.
    pub chunk_size: u32,
}

impl Swarm {
    /// Loads the cluster identity, binds the QUIC endpoint, starts serving
    /// `source` to members, and connects to the tracker.
    pub fn start(
        cfg: &SwarmConfig,
        source: Arc<dyn ChunkSource>,
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
        let limits = ServeLimits {
            max_concurrent_uploads: cfg.max_uploads,
            upload_rate: RateLimit::from_option(cfg.upload_rate),
            ..ServeLimits::default()
        };
        let handle = PeerServer::spawn(endpoint.clone(), source, limits);
        let tracker = if cfg.trackers.is_empty() {
            let core = Tracker::new(TrackerConfig::default())
                .map_err(|e| anyhow::anyhow!("embedded tracker: {e}"))?;
            AnyTracker::Embedded(Embedded::new(
                Arc::new(std::sync::Mutex::new(core)),
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
        let swarm = Arc::new(Swarm {
            node,
            addr,
            tracker,
            peers: PeerClient::with_download_rate(
                endpoint,
                RateLimit::from_option(cfg.download_rate),
            ),
            chunk_size: cfg.chunk_size,
        });
        Ok((swarm, handle))
    }

    /// Keeps this node a live member: an announce every `every` (the
    /// transfers announce what they hold as it arrives).
    pub async fn heartbeat(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let Ok(a) = Announce::new(
                self.node.clone(),
                self.addr.clone(),
                Vec::new(),
                Vec::new(),
                false,
            ) else {
                return;
            };
            if let Err(e) = self.tracker.announce(a).await {
                tracing::debug!(error = %e, "heartbeat announce failed");
            }
        }
    }
}
