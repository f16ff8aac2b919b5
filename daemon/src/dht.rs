//! Peer discovery when no tracker answers: a Kademlia DHT over libp2p.
//!
//! Every member with `--dht-listen` runs a libp2p node (TCP, a private
//! network key, noise, yamux; Kademlia under `/shoal/kad/1` and identify).
//! It publishes
//!
//! - a **node record** under `/shoal/node/<peer id>`: its node name and the
//!   QUIC address of its peer endpoint, so a provider's libp2p identity
//!   turns into something the data plane can dial;
//! - a **provider record** for each blob it holds or is fetching (keyed by
//!   the digest's 32 bytes), from the announces it sends the tracker anyway.
//!
//! When the tracker is unreachable, [`crate::member::MemberTracker`] asks
//! [`Dht::providers`] who holds a blob, then those members themselves (over
//! QUIC, `GetState`) what they hold and which chunk hashes they vouch for.
//!
//! **DHT records are hints, never trust.** A record only names a member to
//! dial; the QUIC connection must present a cluster certificate for that
//! name, and every byte is verified against hashes that trace back to the
//! origin (see `docs/RELIABILITY.md`, "Trust without a tracker"). Outsiders
//! are kept out of the DHT itself by libp2p's private-network handshake,
//! whose key is derived from the cluster CA certificate every member holds
//! ([`psk_from_ca`]): a node without it cannot complete a connection.
//!
//! Bootstrap: `--dht-bootstrap HOST:PORT` (a headless Service's DNS name
//! resolves to every member; re-resolved while the node knows no peer), the
//! DHT addresses the tracker hands out in announce replies (its last known
//! members), and the same list saved in the data directory
//! (`dht-peers`) from the previous run, so a restart with the tracker down
//! still finds the cluster.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt as _;
use libp2p::core::upgrade::Version;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig};
use libp2p::kad::{self, GetProvidersOk, GetRecordOk, QueryId, QueryResult, Quorum, Record};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, noise, pnet, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Transport};
use sha2::{Digest as _, Sha256};
use shoal_proto::tracker_api::{NodeId, PeerAddr};
use shoal_proto::Digest;
use tokio::sync::{mpsc, oneshot};

/// The Kademlia protocol name: Shoal's DHT is its own, never IPFS's.
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/shoal/kad/1");
/// Most blobs a node publishes provider records for.
const MAX_PROVIDED: usize = 65_536;
/// How often the node re-dials its bootstrap list while it knows no peer,
/// and re-publishes its node record.
const TICK: Duration = Duration::from_secs(5);
/// Longest a DHT query runs.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Most node records kept (one per member).
const MAX_RECORDS: usize = 100_000;
/// How long a provider query is waited for (the query itself may go on,
/// and its records land in the local store for the next).
const PROVIDERS_WAIT: Duration = Duration::from_millis(1500);
/// How long a provider's node record is waited for.
const RECORD_WAIT: Duration = Duration::from_millis(1500);
/// Largest node record accepted.
const MAX_NODE_RECORD: usize = 512;

/// How a member's DHT is set up.
#[derive(Debug, Clone)]
pub struct DhtConfig {
    /// TCP address the libp2p node listens on.
    pub listen: SocketAddr,
    /// The address other members dial (the advertised IP, the listen port).
    pub advertise: SocketAddr,
    /// `HOST:PORT` names to bootstrap from (resolved, all addresses).
    pub bootstrap: Vec<String>,
    /// The private-network key ([`psk_from_ca`]).
    pub psk: [u8; 32],
    /// This node's name and QUIC address (its node record).
    pub node: NodeId,
    /// Where peers reach this node's QUIC endpoint.
    pub quic: PeerAddr,
    /// Where the last known DHT peers are kept across restarts.
    pub peers_file: Option<PathBuf>,
}

/// The private-network key: SHA-256 over a label and the cluster CA
/// certificate (DER) in `ca.crt`. Every member holds the CA certificate and
/// outsiders do not, so only members complete a DHT connection; anyone who
/// holds it still cannot serve data (the data plane wants a certificate
/// the CA signed).
pub fn psk_from_ca(cluster_dir: &std::path::Path) -> anyhow::Result<[u8; 32]> {
    use rustls::pki_types::pem::PemObject as _;
    let path = cluster_dir.join("ca.crt");
    let der = rustls::pki_types::CertificateDer::pem_file_iter(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .next()
        .with_context(|| format!("{}: no certificate", path.display()))?
        .with_context(|| format!("{}: unreadable certificate", path.display()))?;
    let mut h = Sha256::new();
    h.update(b"shoal dht private network v1\0");
    h.update(der.as_ref());
    Ok(h.finalize().into())
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
}

enum Cmd {
    Provide(Digest),
    Unprovide(Digest),
    Providers(Digest, oneshot::Sender<HashSet<PeerId>>),
    Record(PeerId, oneshot::Sender<Option<Vec<u8>>>),
    Peers(Vec<SocketAddr>),
}

/// A handle on the member's DHT node (cheap to clone).
#[derive(Debug, Clone)]
pub struct Dht {
    tx: mpsc::UnboundedSender<Cmd>,
    advertise: PeerAddr,
    local: PeerId,
    /// Node records resolved so far.
    names: Arc<Mutex<HashMap<PeerId, (NodeId, PeerAddr)>>>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cmd")
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct NodeRecord {
    node: NodeId,
    addr: PeerAddr,
}

fn node_key(peer: &PeerId) -> kad::RecordKey {
    let mut k = b"/shoal/node/".to_vec();
    k.extend_from_slice(&peer.to_bytes());
    kad::RecordKey::new(&k)
}

fn blob_key(d: &Digest) -> kad::RecordKey {
    kad::RecordKey::new(d.as_bytes())
}

fn multiaddr(a: SocketAddr) -> Multiaddr {
    Multiaddr::from(a.ip()).with(Protocol::Tcp(a.port()))
}

impl Dht {
    /// Starts the DHT node: binds `cfg.listen`, then bootstraps in the
    /// background. Must run inside the tokio runtime.
    pub fn start(cfg: DhtConfig) -> anyhow::Result<Dht> {
        let psk = pnet::PreSharedKey::new(cfg.psk);
        let mut swarm = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_other_transport(|key| {
                let noise = noise::Config::new(key)?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                        .and_then(move |socket, _| pnet::PnetConfig::new(psk).handshake(socket))
                        .upgrade(Version::V1)
                        .authenticate(noise)
                        .multiplex(yamux::Config::default())
                        .timeout(Duration::from_secs(10)),
                )
            })
            .context("building the DHT transport")?
            .with_behaviour(|key| {
                let local = key.public().to_peer_id();
                let store = MemoryStore::with_config(
                    local,
                    MemoryStoreConfig {
                        max_records: MAX_RECORDS,
                        max_value_bytes: MAX_NODE_RECORD,
                        max_provided_keys: MAX_PROVIDED,
                        ..MemoryStoreConfig::default()
                    },
                );
                let mut kc = kad::Config::new(KAD_PROTOCOL);
                kc.set_query_timeout(QUERY_TIMEOUT);
                // Members come and go; stale hints are dropped within the
                // hour (each node re-publishes its own every ten minutes).
                kc.set_provider_record_ttl(Some(Duration::from_secs(3600)));
                kc.set_provider_publication_interval(Some(Duration::from_secs(600)));
                kc.set_record_ttl(Some(Duration::from_secs(3600)));
                kc.set_publication_interval(Some(Duration::from_secs(600)));
                let mut kad = kad::Behaviour::with_config(local, store, kc);
                kad.set_mode(Some(kad::Mode::Server));
                let identify = identify::Behaviour::new(identify::Config::new(
                    "/shoal/1".into(),
                    key.public(),
                ));
                Behaviour { kad, identify }
            })
            .context("building the DHT node")?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
            .build();
        swarm
            .listen_on(multiaddr(cfg.listen))
            .with_context(|| format!("--dht-listen {}", cfg.listen))?;
        swarm.add_external_address(multiaddr(cfg.advertise));
        let local = *swarm.local_peer_id();
        let advertise: PeerAddr = cfg
            .advertise
            .to_string()
            .parse()
            .map_err(|e| anyhow::anyhow!("DHT address {}: {e}", cfg.advertise))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let names = Arc::new(Mutex::new(HashMap::new()));
        names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(local, (cfg.node.clone(), cfg.quic.clone()));
        let node = Node {
            swarm,
            cfg,
            provided: HashSet::new(),
            queries: HashMap::new(),
            candidates: Vec::new(),
            republish: false,
            routed: 0,
        };
        tokio::spawn(node.run(rx));
        tracing::info!(peer_id = %local, dht = %advertise, "DHT node started");
        Ok(Dht {
            tx,
            advertise,
            local,
            names,
        })
    }

    /// Where other members dial this node's DHT.
    pub fn advertise(&self) -> &PeerAddr {
        &self.advertise
    }

    /// Publishes a provider record for `blob` (idempotent).
    pub fn provide(&self, blob: &Digest) {
        let _ = self.tx.send(Cmd::Provide(*blob));
    }

    /// Withdraws this node's provider record for `blob`.
    pub fn unprovide(&self, blob: &Digest) {
        let _ = self.tx.send(Cmd::Unprovide(*blob));
    }

    /// Adds DHT addresses to bootstrap from (the tracker's member list).
    pub fn add_peers(&self, peers: &[PeerAddr]) {
        let addrs: Vec<SocketAddr> = peers
            .iter()
            .filter_map(|p| p.as_str().parse().ok())
            .collect();
        if !addrs.is_empty() {
            let _ = self.tx.send(Cmd::Peers(addrs));
        }
    }

    /// The other members with a provider record for `blob`, as names and
    /// QUIC addresses (hints: dial them under mutual TLS, verify all).
    pub async fn providers(&self, blob: &Digest) -> Vec<(NodeId, PeerAddr)> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Providers(*blob, tx)).is_err() {
            return Vec::new();
        }
        let Ok(Ok(peers)) = tokio::time::timeout(PROVIDERS_WAIT, rx).await else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut unknown = Vec::new();
        {
            let names = self.names.lock().unwrap_or_else(|p| p.into_inner());
            for p in peers.into_iter().filter(|p| *p != self.local) {
                match names.get(&p) {
                    Some(n) => out.push(n.clone()),
                    None => unknown.push(p),
                }
            }
        }
        // A node record not found soon leaves that provider out this time;
        // the others are answered.
        let lookups = unknown.into_iter().map(|p| async move {
            let (tx, rx) = oneshot::channel();
            self.tx.send(Cmd::Record(p, tx)).ok()?;
            let value = tokio::time::timeout(RECORD_WAIT, rx).await.ok()?.ok()??;
            let rec: NodeRecord = serde_json::from_slice(&value).ok()?;
            Some((p, rec))
        });
        for (p, rec) in futures_util::future::join_all(lookups)
            .await
            .into_iter()
            .flatten()
        {
            let n = (rec.node, rec.addr);
            self.names
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(p, n.clone());
            out.push(n);
        }
        out.sort();
        out.dedup();
        out
    }
}

enum Waiting {
    Providers(HashSet<PeerId>, oneshot::Sender<HashSet<PeerId>>),
    Record(oneshot::Sender<Option<Vec<u8>>>),
}

struct Node {
    swarm: libp2p::Swarm<Behaviour>,
    cfg: DhtConfig,
    provided: HashSet<Digest>,
    queries: HashMap<QueryId, Waiting>,
    /// Addresses to bootstrap from, most recent first.
    candidates: Vec<SocketAddr>,
    /// Provider and node records are due to be (re)published: the routing
    /// table grew to a power of two (1, 2, 4, …) peers, so there are new
    /// closest peers to hold them — a handful of times over a node's life;
    /// Kademlia also republishes them itself every ten minutes.
    republish: bool,
    /// Peers the routing table has gained since the node started.
    routed: u64,
}

impl Node {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        if let Some(saved) = self.load_peers() {
            self.candidates = saved;
        }
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => return,
                },
                ev = self.swarm.select_next_some() => self.event(ev),
                _ = tick.tick() => self.tick().await,
            }
        }
    }

    fn command(&mut self, cmd: Cmd) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        match cmd {
            Cmd::Provide(d) => {
                if self.provided.len() < MAX_PROVIDED && self.provided.insert(d) {
                    let _ = kad.start_providing(blob_key(&d));
                }
            }
            Cmd::Unprovide(d) => {
                if self.provided.remove(&d) {
                    kad.stop_providing(&blob_key(&d));
                }
            }
            Cmd::Providers(d, tx) => {
                let id = kad.get_providers(blob_key(&d));
                self.queries
                    .insert(id, Waiting::Providers(HashSet::new(), tx));
            }
            Cmd::Record(p, tx) => {
                let id = kad.get_record(node_key(&p));
                self.queries.insert(id, Waiting::Record(tx));
            }
            Cmd::Peers(addrs) => {
                let fresh: Vec<SocketAddr> = addrs
                    .into_iter()
                    .filter(|a| *a != self.cfg.advertise && !self.candidates.contains(a))
                    .collect();
                if !fresh.is_empty() {
                    for a in &fresh {
                        let _ = self.swarm.dial(multiaddr(*a));
                    }
                    self.candidates.splice(0..0, fresh);
                    self.candidates.truncate(256);
                    self.save_peers();
                }
            }
        }
    }

    fn event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                let kad = &mut self.swarm.behaviour_mut().kad;
                for a in info.listen_addrs {
                    kad.add_address(&peer_id, a);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                is_new_peer: true,
                ..
            })) => {
                self.routed += 1;
                if self.routed.is_power_of_two() {
                    self.republish = true;
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                ..
            })) => self.progressed(id, result, step.last),
            SwarmEvent::ConnectionEstablished { .. } | SwarmEvent::ConnectionClosed { .. } => {
                let n = self.swarm.connected_peers().count();
                crate::metrics::global().dht_peers.set(n as i64);
            }
            SwarmEvent::OutgoingConnectionError { error, .. } => {
                tracing::debug!(%error, "DHT dial failed");
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                // A node without the cluster's key fails the private-network
                // handshake here.
                tracing::debug!(%error, "DHT connection refused");
            }
            _ => {}
        }
    }

    fn progressed(&mut self, id: QueryId, result: QueryResult, last: bool) {
        match (self.queries.remove(&id), result) {
            (Some(Waiting::Providers(mut found, tx)), QueryResult::GetProviders(r)) => {
                if let Ok(GetProvidersOk::FoundProviders { providers, .. }) = r {
                    found.extend(providers);
                }
                if last {
                    let _ = tx.send(found);
                } else {
                    self.queries.insert(id, Waiting::Providers(found, tx));
                }
            }
            (Some(Waiting::Record(tx)), QueryResult::GetRecord(r)) => match r {
                Ok(GetRecordOk::FoundRecord(pr)) => {
                    let _ = tx.send(Some(pr.record.value));
                    if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                        q.finish();
                    }
                }
                _ if last => {
                    let _ = tx.send(None);
                }
                _ => {
                    self.queries.insert(id, Waiting::Record(tx));
                }
            },
            (Some(w), _) if !last => {
                self.queries.insert(id, w);
            }
            _ => {}
        }
    }

    async fn tick(&mut self) {
        if self.swarm.connected_peers().next().is_none() {
            let mut addrs = self.candidates.clone();
            for name in &self.cfg.bootstrap {
                match tokio::net::lookup_host(name.as_str()).await {
                    Ok(found) => addrs.extend(found),
                    Err(e) => tracing::debug!(bootstrap = %name, error = %e, "cannot resolve"),
                }
            }
            for a in addrs {
                if a != self.cfg.advertise && a != self.cfg.listen {
                    let _ = self.swarm.dial(multiaddr(a));
                }
            }
        }
        if self.republish {
            self.republish = false;
            let rec = NodeRecord {
                node: self.cfg.node.clone(),
                addr: self.cfg.quic.clone(),
            };
            let value = serde_json::to_vec(&rec).expect("a node record serializes");
            let local = *self.swarm.local_peer_id();
            let kad = &mut self.swarm.behaviour_mut().kad;
            let _ = kad.put_record(Record::new(node_key(&local), value), Quorum::One);
            for d in &self.provided {
                let _ = kad.start_providing(blob_key(d));
            }
            if kad.bootstrap().is_err() {
                tracing::debug!("DHT bootstrap: no known peer yet");
            }
        }
    }

    fn load_peers(&self) -> Option<Vec<SocketAddr>> {
        let text = std::fs::read_to_string(self.cfg.peers_file.as_ref()?).ok()?;
        Some(
            text.lines()
                .filter_map(|l| l.trim().parse().ok())
                .take(256)
                .collect(),
        )
    }

    fn save_peers(&self) {
        let Some(path) = &self.cfg.peers_file else {
            return;
        };
        let text: String = self.candidates.iter().map(|a| format!("{a}\n")).collect();
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path)) {
            tracing::debug!(error = %e, "saving the DHT peer list failed");
        }
    }
}
