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
//!   `GetState` over QUIC: what it holds, the chunk hashes it vouches for,
//!   and which chunks it is fetching from the origin (its leases, from the
//!   tracker or local); leases are decided locally: a chunk someone holds
//!   or is fetching is left to them, and the rest by **rendezvous
//!   hashing**: each run of [`RUN`] chunks belongs to one of the members
//!   fetching the blob (the providers not yet complete, and this node), the
//!   one with the highest hash of (member, blob, run), so a cold fleet
//!   splits origin fetches without talking to each other and the origin
//!   sends about one copy. A run owned by someone else shows as leased
//!   elsewhere; if nobody holds or fetches it for [`FALLBACK_STEP`] times
//!   this node's rank for it, it is this node's too (views can differ).
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
/// A provider's last state stands in for this long when it does not
/// answer `GetState` in time (a busy member is not a gone one: dropping it
/// would hand its runs to others, who would fetch them again).
const STATE_KEEP: Duration = Duration::from_secs(3);
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
/// A run nobody holds or fetches goes to the member ranked k-th for it
/// (by rendezvous) after k times this.
///
/// Long enough that a busy owner (its origin requests taken by other runs
/// and blobs) gets to its runs first: fallbacks are for runs nobody thinks
/// are theirs, which the scheduler would otherwise fetch only at its last
/// resort (25 s).
pub const FALLBACK_STEP: Duration = Duration::from_secs(8);
/// Leases are decided on providers' states at most this old.
const LEASE_VIEW_AGE: Duration = Duration::from_millis(300);
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

    /// `blob` completed here, its digest checked; `last` are the session's
    /// final requests. With a DHT, this node now vouches for every chunk
    /// hash: those it computed from origin bytes (published, some in
    /// `last`), and for the chunks that came from peers, the hashes they
    /// were verified against (`verified_with`) — so a member asking for the
    /// blob's state gets it without the blob being read again. A chunk with
    /// neither (a chunk that came both ways) makes the set incomplete, and
    /// the state is then hashed from the file once.
    pub fn completed(
        &self,
        blob: &Digest,
        verified_with: &HashMap<u32, [u8; 32]>,
        last: &[shoal_proto::session::Io],
    ) {
        if let Some(v) = &self.dht {
            for io in last {
                if let shoal_proto::session::Io::Publish(p) = io {
                    v.published(p);
                }
            }
            v.vouched
                .fill(blob, verified_with.iter().map(|(&i, &h)| (i, h)));
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

    /// The DHT view answering `call` because the tracker did not (counted).
    /// Only reached with a DHT: without one the tracker is never skipped
    /// and its answer, down or not, is returned.
    fn fallback(&self, call: &'static str) -> &DhtView {
        crate::metrics::global()
            .dht_answers
            .get_or_create(&crate::metrics::CallLabel { call })
            .inc();
        self.dht.as_ref().expect("skipped or down only with a DHT")
    }

    async fn lease_anywhere(&self, r: &LeaseRequest) -> Result<Lease, ApiError> {
        if !self.skip_primary() {
            let got = self.primary.lease(r.clone()).await;
            if !self.noted(&got) {
                return got;
            }
        }
        Ok(self.fallback("lease").lease(r).await)
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
        self.fallback("lookup").lookup(blob).await
    }

    async fn lease(&self, r: LeaseRequest) -> Result<Lease, ApiError> {
        let asked = Instant::now();
        let got = self.lease_anywhere(&r).await;
        if let (Ok(l), Some(v)) = (&got, &self.dht) {
            // Members that split origin fetches without the tracker leave
            // these to this node.
            v.vouched
                .leased(r.blob(), &l.grant.chunks, (asked + l.valid_for).into_std());
        }
        got
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
    /// Per chunk: since when no provider has held it or been fetching it
    /// (`None`: someone has, or is).
    unclaimed: Vec<Option<Instant>>,
    /// When each provider's state in `states` was told.
    told: HashMap<NodeId, Instant>,
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
    /// With `providers_since`, the DHT is asked again unless the providers
    /// known were found after it.
    async fn refresh(&self, blob: &Digest, providers_since: Option<Instant>) -> Option<Known> {
        let cached = self
            .blobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(blob)
            .cloned();
        let recent = cached.as_ref().filter(|k| {
            k.providers_at.elapsed() < PROVIDERS_EVERY
                && providers_since.is_none_or(|t| k.providers_at >= t)
        });
        let (providers, providers_at) = match recent {
            Some(k) => (k.providers.clone(), k.providers_at),
            None => {
                // Bounded inside (the DHT query, then each node record).
                let mut found = self.dht.providers(blob).await;
                // Providers the DHT forgot are kept a little: records land
                // on other nodes only after the routing table settles.
                if let Some(k) = &cached {
                    for p in &k.providers {
                        if !found.contains(p) && k.providers_at.elapsed() < PROVIDERS_EVERY * 10 {
                            found.push(p.clone());
                        }
                    }
                }
                (found, Instant::now())
            }
        };
        let asks = providers
            .iter()
            .filter(|(n, _)| *n != self.node && !self.is_excluded(n))
            .take(MAX_ASKED)
            .filter_map(|(n, a)| {
                let addr = crate::transfer::resolve_peer(n, a)?;
                Some(async move {
                    let st = self.peers.state(&addr, blob, STATE_DEADLINE).await;
                    (n.clone(), a.clone(), st)
                })
            });
        let mut states = Vec::new();
        let mut told = HashMap::new();
        let mut layout = cached.as_ref().map(|k| k.layout);
        let now = Instant::now();
        for (n, a, st) in futures_util::future::join_all(asks).await {
            match st {
                Ok(Some(st)) => {
                    let Ok(l) = st.layout() else { continue };
                    if *layout.get_or_insert(l) == l {
                        told.insert(n.clone(), now);
                        states.push((n, a, st));
                    } else {
                        tracing::debug!(peer = %n, %blob, "a provider lays the blob out differently; ignored");
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(peer = %n, %blob, error = %e, "provider did not tell its state");
                    let last = cached.as_ref().and_then(|k| {
                        let at = *k.told.get(&n)?;
                        let st = k.states.iter().find(|(m, _, _)| *m == n)?;
                        (at.elapsed() < STATE_KEEP).then(|| (at, st.clone()))
                    });
                    if let Some((at, st)) = last {
                        told.insert(n, at);
                        states.push(st);
                    }
                }
            }
        }
        let layout = layout?;
        let mut claimed = Bitfield::new(layout.count()).expect("a layout's count");
        for (_, _, st) in &states {
            claimed.union_with(&st.have);
            claimed.union_with(&st.fetching);
        }
        let before = cached
            .filter(|k| k.layout == layout)
            .map(|k| k.unclaimed)
            .unwrap_or_default();
        let unclaimed = (0..layout.count())
            .map(|i| {
                (!claimed.get(i)).then(|| before.get(i as usize).copied().flatten().unwrap_or(now))
            })
            .collect();
        let known = Known {
            layout,
            states,
            asked: now,
            providers,
            providers_at,
            unclaimed,
            told,
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

    /// Whether chunk `i` is this node's to fetch from the origin, when
    /// nobody holds it or is fetching it: it owns the chunk's run by
    /// rendezvous, or it is this node's turn as a fallback — the run has
    /// gone unclaimed for [`FALLBACK_STEP`] times this node's rank for it.
    /// Views of who is fetching can differ (provider records still
    /// spreading, a member that did not answer `GetState`): without
    /// fallbacks a run could wait for an owner that thinks it is another's.
    fn mine_now(&self, k: &Known, fetchers: &[NodeId], blob: &Digest, i: u32) -> bool {
        let r = rank(fetchers, &self.node, blob, i);
        r == 0
            || k.unclaimed
                .get(i as usize)
                .copied()
                .flatten()
                .is_some_and(|t| t.elapsed() >= FALLBACK_STEP * r as u32)
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
        let Some(k) = self.refresh(blob, None).await else {
            return Err(ApiError::refused(&TrackerError::UnknownBlob(*blob)));
        };
        let count = k.layout.count();
        let Summary {
            hashes,
            served,
            conflict,
            claimed,
        } = summarize(&k, blob);
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
            let theirs =
                !conflict.get(i) && (claimed.get(i) || !self.mine_now(&k, &fetchers, blob, i));
            if !served.get(i) && theirs {
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
        let first = self
            .first_lookup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&blob)
            .copied();
        let settled = first.is_some_and(|t| t.elapsed() >= LEASE_SETTLE);
        // Decide on who fetches what from a fresh view: providers found
        // well after this node's first lookup (members that started with it
        // have published theirs by then), states of a moment ago (who is
        // fetching what).
        let since = first.filter(|_| settled).map(|t| t + LEASE_SETTLE / 2);
        let fresh = self
            .blobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&blob)
            .filter(|k| {
                k.asked.elapsed() < LEASE_VIEW_AGE && since.is_none_or(|t| k.providers_at >= t)
            })
            .cloned();
        let k = match fresh {
            Some(k) => Some(k),
            None => self.refresh(&blob, since).await,
        };
        let layout = r.layout();
        let count = layout.count();
        let k = k.filter(|k| k.layout == layout);
        let (fetchers, sum) = match &k {
            Some(k) => (self.fetchers(k), summarize(k, &blob)),
            None => (vec![self.node.clone()], Summary::empty(count)),
        };
        // Not what someone serves; a chunk members disagree on is
        // everyone's; one another member holds or is fetching is left to
        // it; the rest as `mine_now` says.
        let open = |i: u32| {
            !sum.served.get(i)
                && (sum.conflict.get(i)
                    || (!sum.claimed.get(i)
                        && k.as_ref()
                            .is_none_or(|k| self.mine_now(k, &fetchers, &blob, i))))
        };
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
        if !chunks.is_empty() {
            let ranks: Vec<usize> = chunks
                .iter()
                .map(|&i| rank(&fetchers, &self.node, &blob, i))
                .collect();
            tracing::debug!(%blob, ?chunks, ?ranks, fetchers = fetchers.len(),
                "origin lease decided here (rank 0: owner; more: fallback)");
        }
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
            // The scheduler benches a silent peer itself; a dead one stops
            // answering `GetState` and drops out of the view.
            Report::Unresponsive { .. } => Vec::new(),
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
/// hash), which chunks they disagree on, and which chunks one of them
/// holds or is fetching from the origin (claimed: a holder's hash follows
/// its chunk within moments).
fn summarize(k: &Known, blob: &Digest) -> Summary {
    let count = k.layout.count();
    let mut hashes: Vec<Option<ChunkHash>> = vec![None; count as usize];
    let mut conflict = Bitfield::new(count).expect("a layout's count");
    let mut held = Bitfield::new(count).expect("a layout's count");
    let mut fetching = Bitfield::new(count).expect("a layout's count");
    for (_, _, st) in &k.states {
        held.union_with(&st.have);
        fetching.union_with(&st.fetching);
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
    fetching.union_with(&held);
    Summary {
        hashes,
        served,
        conflict,
        claimed: fetching,
    }
}

/// What the providers' states say of a blob, chunk by chunk.
struct Summary {
    hashes: Vec<Option<ChunkHash>>,
    /// Held by someone, with a hash.
    served: Bitfield,
    /// Members vouch for different hashes.
    conflict: Bitfield,
    /// Held or being fetched from the origin by someone.
    claimed: Bitfield,
}

impl Summary {
    fn empty(count: u32) -> Self {
        let none = || Bitfield::new(count).expect("a layout's count");
        Summary {
            hashes: vec![None; count as usize],
            served: none(),
            conflict: none(),
            claimed: none(),
        }
    }
}

/// The member that fetches chunk `i`'s run of `blob` from the origin: the
/// highest SHA-256 of (member, blob, run) wins, so every member with the
/// same list picks the same owner, and a member joining or leaving moves
/// only its own share.
pub fn owner<'a>(fetchers: &'a [NodeId], blob: &Digest, i: u32) -> &'a NodeId {
    fetchers
        .iter()
        .max_by_key(|n| score(n, blob, i / RUN))
        .expect("the fetchers always include this node")
}

/// `node`'s place for chunk `i`'s run among `fetchers`: 0 for its owner,
/// 1 for the next in line, and so on.
pub fn rank(fetchers: &[NodeId], node: &NodeId, blob: &Digest, i: u32) -> usize {
    let run = i / RUN;
    let mine = score(node, blob, run);
    fetchers
        .iter()
        .filter(|n| *n != node && score(n, blob, run) > mine)
        .count()
}

fn score(node: &NodeId, blob: &Digest, run: u32) -> u64 {
    let mut h = Sha256::new();
    h.update(node.as_str().as_bytes());
    h.update([0]);
    h.update(blob.as_bytes());
    h.update(run.to_be_bytes());
    let out = h.finalize();
    u64::from_be_bytes(out[..8].try_into().expect("8 bytes"))
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
        // Ranks: one owner, then everyone once.
        for r in 0..runs {
            let mut ranks: Vec<usize> = all.iter().map(|n| rank(&all, n, &blob, r * RUN)).collect();
            ranks.sort_unstable();
            assert_eq!(ranks, (0..6).collect::<Vec<_>>());
            assert_eq!(rank(&all, owner(&all, &blob, r * RUN), &blob, r * RUN), 0);
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
