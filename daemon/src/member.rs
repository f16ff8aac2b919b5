//! The tracker as a transfer sees it: the configured tracker while it
//! answers, the DHT and the members themselves while it does not.
//!
//! [`MemberTracker`] implements the same [`TrackerApi`] the session's
//! driver calls, so the scheduler runs unchanged in both modes:
//!
//! - **tracker up**: every call goes to it; announces also publish DHT
//!   provider records for the blobs they list (and carry this node's DHT
//!   address, so the tracker can hand it to others as a bootstrap peer);
//! - **tracker down** (a call found it unreachable; it is tried again after
//!   [`PROBE_AFTER`]) and a DHT configured: lookups become
//!   [`DhtView::lookup`] — providers from the DHT, then each provider's own
//!   `GetState` over QUIC: what it holds and the chunk hashes it vouches
//!   for; leases are decided locally by **rendezvous hashing**: each run of
//!   [`RUN`] chunks belongs to one of the members fetching the blob (the
//!   providers not yet complete, and this node), the one with the highest
//!   hash of (member, blob, run), so a cold fleet splits origin fetches
//!   without talking to each other and the origin sends about one copy.
//!   A run owned by someone else shows as leased elsewhere; the scheduler's
//!   own timeouts fetch it from the origin if its owner never delivers.
//!
//! Trust without a tracker (also in `docs/RELIABILITY.md`): a chunk hash is
//! taken from a member that holds the blob complete (it checked the
//! digest) or from the member that says it fetched the chunk from the
//! origin; when two members vouch for different hashes the chunk has none
//! and comes from the origin; every chunk is verified against its hash,
//! the blob against its digest before the last byte reaches a client, and
//! a member whose bytes fail, or whose hashes led to a digest mismatch, is
//! excluded here for [`EXCLUDE_FOR`].

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use shoal_proto::tracker_api::{
    Announce, AnnounceReply, BlobView, ChunkHash, HashCursor, Holder, LeaseGrant, LeaseRequest,
    LookupReply, NodeId, PeerAddr, PublishHashes, PublishReply, Report, ReportReply, TrackerError,
};
use shoal_proto::wire::BlobState;
use shoal_proto::{Bitfield, ChunkLayout, Digest};
use shoal_tracker::client::{AnyTracker, ApiError, Lease, TrackerApi};
use tokio::time::Instant;

use crate::dht::Dht;
use crate::peer::client::PeerClient;
use crate::peer::source::Vouched;

/// After the tracker was found unreachable, calls skip it for this long
/// (then the next call tries it again).
pub const PROBE_AFTER: Duration = Duration::from_secs(3);
/// Chunks per rendezvous run: the unit one member fetches from the origin.
pub const RUN: u32 = 4;
/// How long a member stays excluded here for bad data.
pub const EXCLUDE_FOR: Duration = Duration::from_secs(600);
/// How long a member reported unresponsive is left out.
const UNRESPONSIVE_FOR: Duration = Duration::from_secs(30);
/// Providers are asked of the DHT at most this often per blob.
const PROVIDERS_EVERY: Duration = Duration::from_secs(1);
/// Most providers asked for their state per lookup.
const MAX_ASKED: usize = 32;
/// How long a provider has to answer `GetState`.
const STATE_DEADLINE: Duration = Duration::from_secs(2);
/// No origin lease is granted for a blob until this long after this node
/// first looked it up in the DHT: the provider records of members that
/// started at the same moment need that long to be found, and until they
/// are, this node would take their share too.
pub const LEASE_SETTLE: Duration = Duration::from_secs(1);
/// Blobs a view keeps state for before it forgets old ones.
const MAX_BLOBS: usize = 1_024;
/// A blob's state is forgotten this long after its first DHT lookup (once
/// the tables are full).
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// How long a local lease lasts.
const LEASE_FOR: Duration = Duration::from_secs(5);
/// The hash epoch of DHT-mode views (the tracker's epochs are far larger,
/// so switching between the two always resets what a session knows).
pub const DHT_EPOCH: u64 = 1;

/// The tracker a node's transfers use: the configured one, falling back to
/// the DHT.
#[derive(Debug)]
pub struct MemberTracker {
    primary: AnyTracker,
    dht: Option<DhtView>,
    down_until: Mutex<Option<Instant>>,
}

impl MemberTracker {
    /// `primary` alone (no DHT configured).
    pub fn new(primary: AnyTracker) -> Self {
        MemberTracker {
            primary,
            dht: None,
            down_until: Mutex::new(None),
        }
    }

    /// `primary`, with `dht` when it is unreachable.
    pub fn with_dht(primary: AnyTracker, dht: DhtView) -> Self {
        MemberTracker {
            dht: Some(dht),
            ..Self::new(primary)
        }
    }

    /// The configured tracker.
    pub fn primary(&self) -> &AnyTracker {
        &self.primary
    }

    /// The DHT fallback, if configured.
    pub fn dht(&self) -> Option<&DhtView> {
        self.dht.as_ref()
    }

    /// `blob` completed here, its digest checked; `last` are the session's
    /// final requests. With a DHT, this node now vouches for every chunk
    /// hash: those it computed from origin bytes (published, some in
    /// `last`), and for the other chunks, which came from peers, the hashes
    /// in `hashes` they were verified against — so a member asking for the
    /// blob's state gets it without the blob being read again.
    pub fn completed(
        &self,
        blob: &Digest,
        hashes: &shoal_proto::ChunkHashes,
        last: &[shoal_proto::session::Io],
    ) {
        if let Some(v) = &self.dht {
            for io in last {
                if let shoal_proto::session::Io::Publish(p) = io {
                    v.published(p);
                }
            }
            v.vouched.fill(
                blob,
                hashes
                    .hashes()
                    .iter()
                    .enumerate()
                    .filter_map(|(i, h)| Some((i as u32, (*h)?))),
            );
        }
    }

    /// Whether calls should skip the tracker (found down moments ago) and
    /// go to the DHT.
    fn skip_primary(&self) -> bool {
        self.dht.is_some()
            && self
                .down_until
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| Instant::now() < t)
    }

    /// Notes what a call to the tracker showed; whether it was down (and
    /// a DHT can answer instead).
    fn noted<T>(&self, r: &Result<T, ApiError>) -> bool {
        let down = matches!(r, Err(e) if e.is_down());
        let mut g = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        let was = g.is_some();
        *g = down.then(|| Instant::now() + PROBE_AFTER);
        if down && !was && self.dht.is_some() {
            tracing::warn!("tracker unreachable: finding peers through the DHT");
        } else if !down && was && self.dht.is_some() {
            tracing::info!("tracker reachable again: back from the DHT");
        }
        down && self.dht.is_some()
    }
}

impl TrackerApi for MemberTracker {
    async fn announce(&self, a: Announce) -> Result<AnnounceReply, ApiError> {
        let a = match &self.dht {
            Some(v) => {
                for b in a.blobs() {
                    v.dht.provide(b.blob());
                }
                for d in a.dropped() {
                    v.dht.unprovide(d);
                }
                a.with_dht(Some(v.dht.advertise().clone()))
            }
            None => a,
        };
        let r = self.primary.announce(a).await;
        self.noted(&r);
        if let (Ok(reply), Some(v)) = (&r, &self.dht) {
            v.dht.add_peers(&reply.dht_peers);
        }
        r
    }

    async fn lookup(
        &self,
        node: &NodeId,
        blob: &Digest,
        since: Option<HashCursor>,
    ) -> Result<LookupReply, ApiError> {
        if let Some(v) = &self.dht {
            // A lookup starts a transfer: be findable for it at once.
            v.dht.provide(blob);
        }
        if !self.skip_primary() {
            let r = self.primary.lookup(node, blob, since).await;
            if !self.noted(&r) {
                return r;
            }
        }
        match &self.dht {
            Some(v) => {
                crate::metrics::global()
                    .dht_answers
                    .get_or_create(&crate::metrics::CallLabel { call: "lookup" })
                    .inc();
                v.lookup(blob).await
            }
            None => unreachable!("skipped only with a DHT"),
        }
    }

    async fn lease(&self, r: LeaseRequest) -> Result<Lease, ApiError> {
        if !self.skip_primary() {
            let got = self.primary.lease(r.clone()).await;
            if !self.noted(&got) {
                return got;
            }
        }
        match &self.dht {
            Some(v) => {
                crate::metrics::global()
                    .dht_answers
                    .get_or_create(&crate::metrics::CallLabel { call: "lease" })
                    .inc();
                Ok(v.lease(&r).await)
            }
            None => unreachable!("skipped only with a DHT"),
        }
    }

    async fn publish_hashes(&self, p: PublishHashes) -> Result<PublishReply, ApiError> {
        if let Some(v) = &self.dht {
            v.published(&p);
        }
        if !self.skip_primary() {
            let r = self.primary.publish_hashes(p.clone()).await;
            if !self.noted(&r) {
                return r;
            }
        }
        Ok(PublishReply {
            accepted: p.hashes().len() as u32,
            rejected: Vec::new(),
        })
    }

    async fn report(&self, r: Report) -> Result<ReportReply, ApiError> {
        let local = self.dht.as_ref().map(|v| v.report(&r));
        if !self.skip_primary() {
            let got = self.primary.report(r).await;
            if !self.noted(&got) {
                return got;
            }
        }
        Ok(ReportReply {
            excluded: local.unwrap_or_default(),
            suspected: Vec::new(),
            withdrawn: 0,
        })
    }
}

/// What a member knows of one blob from the DHT and the providers' states.
#[derive(Debug, Clone)]
struct Known {
    layout: ChunkLayout,
    /// Providers with their state, asked at `asked`.
    states: Vec<(NodeId, PeerAddr, BlobState)>,
    asked: Instant,
    /// When the DHT was last asked for providers, and what it said.
    providers: Vec<(NodeId, PeerAddr)>,
    providers_at: Instant,
}

/// Lookups and leases from the DHT and the members themselves.
#[derive(Debug)]
pub struct DhtView {
    dht: Dht,
    peers: std::sync::Arc<PeerClient>,
    node: NodeId,
    vouched: Vouched,
    blobs: Mutex<HashMap<Digest, Known>>,
    /// Members left out, until when.
    excluded: Mutex<HashMap<NodeId, Instant>>,
    /// Chunks this node holds local leases on, per blob.
    mine: Mutex<HashMap<Digest, BTreeSet<u32>>>,
    /// When this node first looked each blob up in the DHT.
    first_lookup: Mutex<HashMap<Digest, Instant>>,
    started: Instant,
}

impl DhtView {
    /// A view for `node` over `dht`, asking members through `peers`,
    /// recording the hashes this node vouches for in `vouched`.
    pub fn new(
        dht: Dht,
        peers: std::sync::Arc<PeerClient>,
        node: NodeId,
        vouched: Vouched,
    ) -> Self {
        DhtView {
            dht,
            peers,
            node,
            vouched,
            blobs: Mutex::default(),
            excluded: Mutex::default(),
            mine: Mutex::default(),
            first_lookup: Mutex::default(),
            started: Instant::now(),
        }
    }

    /// The DHT node.
    pub fn dht(&self) -> &Dht {
        &self.dht
    }

    fn is_excluded(&self, node: &NodeId) -> bool {
        let mut ex = self.excluded.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        ex.retain(|_, until| *until > now);
        ex.contains_key(node)
    }

    fn exclude(&self, node: &NodeId, for_: Duration) {
        tracing::warn!(peer = %node, secs = for_.as_secs(), "leaving a member out of DHT-mode fetches");
        self.excluded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.clone(), Instant::now() + for_);
    }

    /// Providers (at most every [`PROVIDERS_EVERY`]) and their states now.
    async fn refresh(&self, blob: &Digest) -> Option<Known> {
        let cached = self
            .blobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(blob)
            .cloned();
        let providers = match &cached {
            Some(k) if k.providers_at.elapsed() < PROVIDERS_EVERY => k.providers.clone(),
            _ => {
                let found = tokio::time::timeout(STATE_DEADLINE, self.dht.providers(blob))
                    .await
                    .unwrap_or_default();
                // Providers the DHT forgot are kept a little: records land
                // on other nodes only after the routing table settles.
                let mut merged = found;
                if let Some(k) = &cached {
                    for p in &k.providers {
                        if !merged.contains(p) && k.providers_at.elapsed() < PROVIDERS_EVERY * 10 {
                            merged.push(p.clone());
                        }
                    }
                }
                merged
            }
        };
        let providers_at = match &cached {
            Some(k) if k.providers_at.elapsed() < PROVIDERS_EVERY => k.providers_at,
            _ => Instant::now(),
        };
        let asks = providers
            .iter()
            .filter(|(n, _)| *n != self.node && !self.is_excluded(n))
            .take(MAX_ASKED)
            .filter_map(|(n, a)| {
                let addr = crate::peer::PeerAddr {
                    addr: a.as_str().parse().ok()?,
                    name: n.as_str().to_owned(),
                };
                Some(async move {
                    let st = self.peers.state(&addr, blob, STATE_DEADLINE).await;
                    (n.clone(), a.clone(), st)
                })
            });
        let mut states = Vec::new();
        let mut layout = cached.as_ref().map(|k| k.layout);
        for (n, a, st) in futures_util::future::join_all(asks).await {
            match st {
                Ok(Some(st)) => {
                    let Ok(l) = st.layout() else { continue };
                    if *layout.get_or_insert(l) == l {
                        states.push((n, a, st));
                    } else {
                        tracing::debug!(peer = %n, %blob, "a provider lays the blob out differently; ignored");
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(peer = %n, %blob, error = %e, "provider did not tell its state")
                }
            }
        }
        let known = Known {
            layout: layout?,
            states,
            asked: Instant::now(),
            providers,
            providers_at,
        };
        self.blobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(*blob, known.clone());
        Some(known)
    }

    /// Forgets blobs not looked up for [`FORGET_AFTER`] (the tables stay
    /// bounded over a long outage).
    fn prune(&self, first: &mut HashMap<Digest, Instant>) {
        first.retain(|_, t| t.elapsed() < FORGET_AFTER);
        let mut blobs = self.blobs.lock().unwrap_or_else(|p| p.into_inner());
        blobs.retain(|d, k| first.contains_key(d) && k.asked.elapsed() < FORGET_AFTER);
        self.mine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|d, _| first.contains_key(d));
    }

    /// The members fetching `blob` (providers not complete, and this node),
    /// by name: the rendezvous candidates.
    fn fetchers(&self, k: &Known) -> Vec<NodeId> {
        let mut f: Vec<NodeId> = k
            .states
            .iter()
            .filter(|(n, _, st)| !st.have.is_full() && !self.is_excluded(n))
            .map(|(n, _, _)| n.clone())
            .collect();
        f.push(self.node.clone());
        f.sort();
        f.dedup();
        f
    }

    /// A lookup answered from the DHT and the providers themselves.
    pub async fn lookup(&self, blob: &Digest) -> Result<LookupReply, ApiError> {
        {
            let mut first = self.first_lookup.lock().unwrap_or_else(|p| p.into_inner());
            first.entry(*blob).or_insert_with(Instant::now);
            if first.len() > MAX_BLOBS {
                self.prune(&mut first);
            }
        }
        let Some(k) = self.refresh(blob).await else {
            return Err(ApiError::refused(&TrackerError::UnknownBlob(*blob)));
        };
        let count = k.layout.count();
        let (hashes, served, conflict) = summarize(&k, blob);
        let holders: Vec<Holder> = k
            .states
            .iter()
            .filter(|(_, _, st)| st.have.count() > 0)
            .take(shoal_proto::tracker_api::MAX_LOOKUP_HOLDERS)
            .map(|(n, a, st)| Holder {
                node: n.clone(),
                addr: a.clone(),
                have: st.have.clone(),
                complete: st.have.is_full(),
                near: false,
            })
            .collect();
        let fetchers = self.fetchers(&k);
        let mut leased = Bitfield::new(count).expect("a layout's count");
        for i in 0..count {
            if !served.get(i) && !conflict.get(i) && owner(&fetchers, blob, i) != &self.node {
                let _ = leased.set(i);
            }
        }
        let view = BlobView::new(*blob, k.layout, DHT_EPOCH, hashes, holders, leased)
            .and_then(|v| v.with_served(served))
            .map_err(|e| ApiError::refused(&e))?;
        Ok(view)
    }

    /// Local origin leases: the chunks of runs this node owns among the
    /// members fetching the blob that nobody serves, this node's earlier
    /// ones first.
    pub async fn lease(&self, r: &LeaseRequest) -> Lease {
        let blob = *r.blob();
        let fresh = self
            .blobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&blob)
            .filter(|k| k.asked.elapsed() < PROVIDERS_EVERY)
            .cloned();
        let k = match fresh {
            Some(k) => Some(k),
            None => self.refresh(&blob).await,
        };
        let layout = r.layout();
        let count = layout.count();
        let none = || Bitfield::new(count).expect("a layout's count");
        let (fetchers, served, conflict) = match k.filter(|k| k.layout == layout) {
            Some(k) => {
                let (_, served, conflict) = summarize(&k, &blob);
                (self.fetchers(&k), served, conflict)
            }
            None => (vec![self.node.clone()], none(), none()),
        };
        // A chunk members disagree on is everyone's to fetch.
        let open = |i: u32| {
            !served.get(i) && (conflict.get(i) || owner(&fetchers, &blob, i) == &self.node)
        };
        let settled = self
            .first_lookup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&blob)
            .is_some_and(|t| t.elapsed() >= LEASE_SETTLE);
        let budget = if settled {
            r.max_chunks().min(64) as usize
        } else {
            0
        };
        let mut mine = self.mine.lock().unwrap_or_else(|p| p.into_inner());
        let held = mine.entry(blob).or_default();
        held.retain(|&i| i < count && open(i));
        let mut chunks: Vec<u32> = held.iter().copied().take(budget).collect();
        let from = r.from().min(count.saturating_sub(1));
        for i in (from..count).chain(0..from) {
            if chunks.len() >= budget {
                break;
            }
            if open(i) && !chunks.contains(&i) {
                chunks.push(i);
            }
        }
        held.extend(chunks.iter().copied());
        let now_ms = self.started.elapsed().as_millis() as u64;
        Lease::new(
            LeaseGrant {
                chunks,
                expires_ms: now_ms + LEASE_FOR.as_millis() as u64,
            },
            now_ms,
        )
    }

    /// This node published hashes of origin chunks: it vouches for them.
    pub fn published(&self, p: &PublishHashes) {
        self.vouched.record(
            p.blob(),
            p.hashes().iter().map(|(i, h)| (*i, *h.as_bytes())),
        );
        if let Some(held) = self
            .mine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(p.blob())
        {
            for (i, _) in p.hashes() {
                held.remove(i);
            }
        }
    }

    /// A report, applied here: who is left out as a result.
    pub fn report(&self, r: &Report) -> Vec<NodeId> {
        match r {
            Report::BadChunk { peer, .. } => {
                self.exclude(peer, EXCLUDE_FOR);
                vec![peer.clone()]
            }
            Report::Unresponsive { peer, .. } => {
                self.exclude(peer, UNRESPONSIVE_FOR);
                Vec::new()
            }
            Report::DigestMismatch { blob, epoch, .. } if *epoch == DHT_EPOCH => {
                // Some vouched hash was wrong and nothing says whose: leave
                // out every member that vouched for one.
                let known = self
                    .blobs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(blob);
                let vouchers: Vec<NodeId> = known
                    .map(|k| {
                        k.states
                            .into_iter()
                            .filter(|(_, _, st)| st.vouched.count() > 0)
                            .map(|(n, _, _)| n)
                            .collect()
                    })
                    .unwrap_or_default();
                for n in &vouchers {
                    self.exclude(n, EXCLUDE_FOR);
                }
                vouchers
            }
            Report::DigestMismatch { .. } => Vec::new(),
        }
    }
}

/// The chunk hashes the providers vouch for (none for a chunk two of them
/// disagree on), which chunks someone can serve verifiably (held, with a
/// hash), and which chunks they disagree on.
fn summarize(k: &Known, blob: &Digest) -> (Vec<Option<ChunkHash>>, Bitfield, Bitfield) {
    let count = k.layout.count();
    let mut hashes: Vec<Option<ChunkHash>> = vec![None; count as usize];
    let mut conflict = Bitfield::new(count).expect("a layout's count");
    let mut held = Bitfield::new(count).expect("a layout's count");
    for (_, _, st) in &k.states {
        held.union_with(&st.have);
        for (i, h) in st.vouched_hashes() {
            let h = ChunkHash::from_bytes(*h);
            match &hashes[i as usize] {
                Some(known) if *known != h => {
                    let _ = conflict.set(i);
                }
                _ => hashes[i as usize] = Some(h),
            }
        }
    }
    for i in conflict.iter_ones() {
        tracing::warn!(%blob, chunk = i, "members vouch for different hashes of a chunk: it comes from the origin");
        hashes[i as usize] = None;
    }
    let mut served = Bitfield::new(count).expect("a layout's count");
    for i in held.iter_ones() {
        if hashes[i as usize].is_some() {
            let _ = served.set(i);
        }
    }
    (hashes, served, conflict)
}

/// The member that fetches chunk `i`'s run of `blob` from the origin: the
/// highest SHA-256 of (member, blob, run) wins, so every member with the
/// same list picks the same owner, and a member joining or leaving moves
/// only its own share.
pub fn owner<'a>(fetchers: &'a [NodeId], blob: &Digest, i: u32) -> &'a NodeId {
    let run = i / RUN;
    fetchers
        .iter()
        .max_by_key(|n| {
            let mut h = Sha256::new();
            h.update(n.as_str().as_bytes());
            h.update([0]);
            h.update(blob.as_bytes());
            h.update(run.to_be_bytes());
            let out = h.finalize();
            u64::from_be_bytes(out[..8].try_into().expect("8 bytes"))
        })
        .expect("the fetchers always include this node")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeId {
        s.parse().unwrap()
    }

    #[test]
    fn rendezvous_spreads_runs_and_a_leaver_moves_only_its_share() {
        let blob = Digest::from_bytes([3; 32]);
        let all: Vec<NodeId> = (0..6).map(|i| n(&format!("node-{i}"))).collect();
        let runs = 600u32;
        let mut per = HashMap::new();
        for r in 0..runs {
            *per.entry(owner(&all, &blob, r * RUN).clone())
                .or_insert(0u32) += 1;
            // Every chunk of a run has the run's owner.
            assert_eq!(
                owner(&all, &blob, r * RUN),
                owner(&all, &blob, r * RUN + RUN - 1)
            );
        }
        assert_eq!(per.len(), 6);
        for (node, c) in &per {
            assert!((60..=140).contains(c), "{node} owns {c} of {runs} runs");
        }
        let fewer: Vec<NodeId> = all[1..].to_vec();
        for r in 0..runs {
            let before = owner(&all, &blob, r * RUN);
            let after = owner(&fewer, &blob, r * RUN);
            if before != &all[0] {
                assert_eq!(before, after, "run {r} moved though its owner stayed");
            }
        }
    }
}
