//! The tracker core: a deterministic state machine that knows which members
//! hold which chunks of which blobs, the chunk hashes they verify against,
//! and who may fetch which chunk from the origin. No I/O, no clocks, no
//! randomness: every call takes the current time (`now_ms`) and returns a
//! reply, so the HTTPS server, the daemon's `--tracker embedded` mode and the
//! swarm simulator all drive the very same code.
//!
//! # Invariants
//!
//! Checked after every step of the property tests ([`Tracker::check_invariants`]):
//!
//! - **At most one unexpired lease per chunk**, and none on a chunk that is
//!   *served* (its hash is known and a live member holds it). Two nodes asking
//!   at the same instant for a cold blob therefore get disjoint chunks, and
//!   the cluster fetches each chunk from the origin about once.
//! - **A hash is only ever accepted from that chunk's lessee**: the node that
//!   holds the chunk's lease, or last held it if nobody has taken it over
//!   since it expired. A different hash for a chunk with a known hash is
//!   refused and counted against the publisher.
//! - **Excluded nodes never appear in replies**: an excluded node has no
//!   membership, holdings, leases or published hashes, and its requests are
//!   refused until the exclusion ends.
//! - **Memory is bounded by the config**: at most `max_members` members
//!   (each holding at most `max_blobs_per_member` blobs), `max_blobs` blobs
//!   of at most [`shoal_proto::chunk::MAX_CHUNKS`] chunks, `max_lease_chunks`
//!   leases per member and blob, `max_members` exclusions. Reputation records
//!   exist only for members and for nodes with hashes on file.
//!
//! # Time
//!
//! Every operation first calls [`Tracker::expire`] with its `now_ms`, so
//! replies never mention an expired member or lease; callers need not call
//! `expire` themselves, though a server may on a timer to free memory sooner.
//! Time never goes backwards: an earlier `now_ms` is treated as the latest
//! one seen. Expiry is driven by ordered queues (member deadlines, lease
//! deadlines, exclusion ends), so it costs O(log n) per expired item, never a
//! scan.
//!
//! # Data structures (why a lookup does not scan the swarm)
//!
//! Per blob (module `blob`): holdings keyed by node; a per-chunk count of
//! copies; for each chunk up to two *seeds* (partial holders of it, so
//! holders of rare chunks are found without scanning); two *rings* (complete
//! and partial holders at positions `hash(holder, blob)`); the leases with a
//! per-node index; and an *open* bitfield of leasable chunks. A lookup builds
//! the chunk-hash list (O(chunks), the size of the reply anyway), takes
//! holders of the rarest chunks the requester lacks from the seeds, then
//! walks a window of each ring from `hash(requester, blob, now /
//! announce_interval)` — different requesters start at different places, and
//! the window moves every announce interval — and ranks the partial holders
//! in the window by how many chunks they have that the requester lacks. That
//! is O(chunks + k·chunks/64 + log holders) for `k` peers, however many
//! members hold the blob. A lease grant renews the node's own leases and
//! then takes open chunks from `from` onward 64 at a time.

use std::collections::{BTreeMap, BTreeSet};

use shoal_proto::preheat::{JobProgress, JobStatus, JobsReply, PreheatReply, PreheatRequest};
use shoal_proto::tracker_api::{
    Announce, AnnounceReply, BlobView, HashCursor, Holder, LeaseGrant, LeaseRequest, LookupReply,
    NodeId, PeerAddr, PublishHashes, PublishRejection, PublishReply, Rack, Report, ReportReply,
    TrackerError, MAX_DENIED, MAX_DHT_PEERS,
};
use shoal_proto::{Bitfield, ChunkLayout, Digest};

use crate::blob::{Blob, Have, LeaseQueue};

/// Tracker tuning. Defaults suit a cluster of up to 10,000 nodes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrackerConfig {
    /// A member silent for longer than this is forgotten, with its holdings
    /// and leases. Default 30 s (six announce intervals).
    pub member_ttl_ms: u64,
    /// How long an origin lease lasts unless renewed (lessees renew every
    /// second while a leased chunk is missing: keep this well above that).
    /// Default 3 s: a lessee that dies keeps everyone else from its chunks
    /// for that long at most. With 10 s, 5 % of members dying in the first
    /// seconds of a pull at 10 gbit held 300 members up for 10 s (12–15×
    /// the bound; 3.8–7.1× with 3 s and the prompt membership cut).
    pub lease_ttl_ms: u64,
    /// The most chunks of one blob a member may hold leases on. Default 16.
    pub max_lease_chunks: u32,
    /// The bytes of one blob its lessees should have at the origin at once
    /// (at least one chunk), all members of a rack together (members that
    /// name no rack count as one rack). Default 16 MiB. Lessees fetch their
    /// chunks from the origin, whose link they share: with every chunk
    /// leased at once (300 members, 5 × 200 MiB, 10 gbit, in the simulator)
    /// each came in at the origin's rate divided by a thousand, the first
    /// after 0.2 s, and members started on their peers 0.35 s late; a few
    /// at a time let the first chunks spread while the origin sends the
    /// next (1.27–1.29× the bound against 1.72–1.76×). A lease is out
    /// longer than its chunks are at the origin: the grant's way back, the
    /// publish's way in and its wait in the tracker's queue. So the leases
    /// out at once are this cap stretched by how much longer, learned per
    /// blob ([`LeaseRequest`]'s `rtt_ms`, [`PublishHashes`]'s `fetch_ms`, the
    /// tracker's own queue): with a fixed cap a tracker whose queue had
    /// grown to 0.7 s (10,000 members) let the origin send the image in 11 s
    /// instead of 0.84. Per rack, as each rack's chunks come in through its
    /// own uplink: one cap for a cluster of ten racks, 15:1 oversubscribed,
    /// left the origin's flows few among the many crossing those uplinks,
    /// and slow.
    pub max_blob_lease_bytes: u64,
    /// The most holders one lookup returns. Default 32.
    pub max_peers_per_lookup: u32,
    /// How often members should announce; also how often the holder subset a
    /// requester sees changes. Default 5 s.
    pub announce_interval_ms: u64,
    /// The most live members. Default 20,000.
    pub max_members: usize,
    /// The most blobs tracked; blobs with neither holders nor leases (only
    /// hashes) are evicted oldest first to make room. Default 100,000.
    pub max_blobs: usize,
    /// The most blobs one member may hold. Default 10,000.
    pub max_blobs_per_member: usize,
    /// Distinct members reporting bad chunks from a peer before it is
    /// excluded. Default 3.
    pub bad_reports_to_exclude: u32,
    /// Distinct members reporting a peer unresponsive (requests to it stalled
    /// until they benched it) before its membership deadline is cut to when
    /// its next announce is overdue ([`Tracker::report`]): a live peer
    /// announces in time and keeps its place, a dead one is forgotten within
    /// seconds, not a whole member TTL. Default 2.
    pub unresponsive_reports_to_drop: u32,
    /// Strikes (hash conflicts, digest mismatches of blobs it published
    /// hashes for) before a publisher is excluded. Default 2.
    pub strikes_to_exclude: u32,
    /// How long an exclusion lasts. Default 1 hour.
    pub exclusion_ms: u64,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            member_ttl_ms: 30_000,
            lease_ttl_ms: 3_000,
            max_lease_chunks: 16,
            max_blob_lease_bytes: 16 << 20,
            max_peers_per_lookup: 32,
            announce_interval_ms: 5_000,
            max_members: 20_000,
            max_blobs: 100_000,
            max_blobs_per_member: 10_000,
            bad_reports_to_exclude: 3,
            unresponsive_reports_to_drop: 2,
            strikes_to_exclude: 2,
            exclusion_ms: 3_600_000,
        }
    }
}

/// Why a [`TrackerConfig`] is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tracker config: {0} must be at least 1")]
pub struct ConfigError(&'static str);

impl TrackerConfig {
    /// Checks that every knob is usable (all must be non-zero).
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        let zero = [
            (self.member_ttl_ms == 0, "member_ttl_ms"),
            (self.lease_ttl_ms == 0, "lease_ttl_ms"),
            (self.max_lease_chunks == 0, "max_lease_chunks"),
            (self.max_blob_lease_bytes == 0, "max_blob_lease_bytes"),
            (self.max_peers_per_lookup == 0, "max_peers_per_lookup"),
            (self.announce_interval_ms == 0, "announce_interval_ms"),
            (self.max_members == 0, "max_members"),
            (self.max_blobs == 0, "max_blobs"),
            (self.max_blobs_per_member == 0, "max_blobs_per_member"),
            (self.bad_reports_to_exclude == 0, "bad_reports_to_exclude"),
            (
                self.unresponsive_reports_to_drop == 0,
                "unresponsive_reports_to_drop",
            ),
            (self.strikes_to_exclude == 0, "strikes_to_exclude"),
            (self.exclusion_ms == 0, "exclusion_ms"),
        ];
        match zero.iter().find(|(z, _)| *z) {
            Some((_, name)) => Err(ConfigError(name)),
            None => Ok(()),
        }
    }
}

/// A member as the status page shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemberSummary {
    /// Its name.
    pub node: NodeId,
    /// Where peers reach it.
    pub addr: PeerAddr,
    /// Where it sits.
    pub rack: Option<Rack>,
    /// Milliseconds since its last announce.
    pub seen_ms_ago: u64,
    /// Blobs it holds (whole or in part).
    pub blobs: usize,
    /// Excluded for bad data now.
    pub excluded: bool,
}

/// A blob as the status page shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BlobSummary {
    /// The blob.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Its chunks.
    pub chunks: u32,
    /// Members holding all of it.
    pub complete: u32,
    /// Members holding part of it.
    pub partial: u32,
    /// Chunks leased for origin fetches now.
    pub leases: usize,
    /// Chunk hashes known.
    pub hashes: u32,
}

/// Counts for metrics and the status page.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TrackerStats {
    /// Live members.
    pub members: usize,
    /// Blobs tracked.
    pub blobs: usize,
    /// (member, blob) holdings.
    pub holdings: usize,
    /// Unexpired origin leases (chunks).
    pub leases: usize,
    /// Chunk hashes known.
    pub hashes: u64,
    /// Nodes currently excluded.
    pub excluded: usize,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Member {
    addr: PeerAddr,
    /// Key in `Tracker::deadlines`: last announce + member TTL, or sooner
    /// once it is suspected of being gone.
    deadline: u64,
    /// When it last announced.
    seen: u64,
    /// Within how long of `seen` it said it would announce again (at most
    /// the announce interval).
    promise: u64,
    /// Blobs it holds (has a holding in).
    blobs: BTreeSet<Digest>,
    /// Blobs where it holds, or held, leases (may name dropped blobs).
    lease_blobs: BTreeSet<Digest>,
    /// Members that reported it unresponsive since its deadline was last
    /// cut (fewer than `unresponsive_reports_to_drop`).
    stalled_for: BTreeSet<NodeId>,
    /// Where it sits, as it last said.
    rack: Option<Rack>,
    /// Where its DHT listens, as it last said.
    #[serde(default)]
    dht: Option<PeerAddr>,
}

/// What the tracker remembers about a node's trustworthiness. Kept while the
/// node is a member or has hashes on file, then forgotten.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Record {
    /// Distinct members that reported bad chunks from it.
    reporters: BTreeSet<NodeId>,
    strikes: u32,
    /// Blobs it published hashes of that are still on file.
    published: BTreeSet<Digest>,
}

/// Members of a rack a lookup looks at for near holders, at most.
const RACK_SCAN: usize = 4_096;

/// The tracker state machine. See the module documentation.
///
/// Serializes to a snapshot of its whole state but its configuration
/// ([`Tracker::snapshot`], [`Tracker::restore`]), for replicas that share a
/// log of requests.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Tracker {
    #[serde(skip)]
    cfg: TrackerConfig,
    /// The latest time seen.
    now: u64,
    /// Source of blob hash epochs.
    next_epoch: u64,
    members: BTreeMap<NodeId, Member>,
    /// Members by rack (those that said where they sit).
    racks: BTreeMap<Rack, BTreeSet<NodeId>>,
    /// Members that said where their DHT listens: an announce's reply
    /// names a few, and scanning every member for them made an announce
    /// cost a pass over the whole cluster (27 µs at 10,000 members, where
    /// none ran the DHT). Rebuilt from `members` on restore.
    #[serde(skip)]
    dht_members: BTreeSet<NodeId>,
    /// Member expiry queue: `(deadline, node)`.
    deadlines: BTreeSet<(u64, NodeId)>,
    blobs: BTreeMap<Digest, Blob>,
    /// Blobs with hashes but no holders or leases: `(since, blob)`, evicted
    /// oldest first when the blob table is full.
    idle: BTreeSet<(u64, Digest)>,
    leases: LeaseQueue,
    records: BTreeMap<NodeId, Record>,
    /// Excluded nodes and when their exclusion ends.
    excluded: BTreeMap<NodeId, u64>,
    exclusion_ends: BTreeSet<(u64, NodeId)>,
    /// Nodes the operator denied ([`Tracker::deny`]): refused everything
    /// and named nowhere until taken off the list.
    #[serde(default)]
    denied: BTreeSet<NodeId>,
    hashes: u64,
    /// Preheat jobs ([`Tracker::preheat`]).
    #[serde(default)]
    jobs: crate::jobs::Jobs,
}

type Result<T> = std::result::Result<T, TrackerError>;

impl Tracker {
    /// A tracker with no members, starting at time 0.
    pub fn new(cfg: TrackerConfig) -> std::result::Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(Tracker {
            cfg,
            now: 0,
            next_epoch: 1,
            members: BTreeMap::new(),
            racks: BTreeMap::new(),
            dht_members: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            blobs: BTreeMap::new(),
            idle: BTreeSet::new(),
            leases: BTreeSet::new(),
            records: BTreeMap::new(),
            excluded: BTreeMap::new(),
            exclusion_ends: BTreeSet::new(),
            denied: BTreeSet::new(),
            hashes: 0,
            jobs: Default::default(),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &TrackerConfig {
        &self.cfg
    }

    /// Counts for metrics.
    pub fn stats(&self) -> TrackerStats {
        TrackerStats {
            members: self.members.len(),
            blobs: self.blobs.len(),
            holdings: self.members.values().map(|m| m.blobs.len()).sum(),
            leases: self.leases.len(),
            hashes: self.hashes,
            excluded: self.excluded.len(),
        }
    }

    /// Whether `node` is a live member.
    pub fn is_member(&self, node: &NodeId) -> bool {
        self.members.contains_key(node)
    }

    /// Whether `node` is excluded at the latest time seen.
    pub fn is_excluded(&self, node: &NodeId) -> bool {
        self.excluded.contains_key(node)
    }

    // -----------------------------------------------------------------------
    // Operations
    // -----------------------------------------------------------------------

    /// Refreshes the member and applies its holdings; see [`Announce`].
    ///
    /// All-or-nothing: a blob whose layout conflicts with the tracker's, or a
    /// limit reached, refuses the whole announce and changes nothing (so the
    /// member is not refreshed either: it should drop the offending blob from
    /// its announces).
    pub fn announce(&mut self, now_ms: u64, a: Announce) -> Result<AnnounceReply> {
        let now = self.expire(now_ms);
        let node = a.node().clone();
        self.check_excluded(&node)?;
        let known = self.members.contains_key(&node);
        if a.is_leaving() {
            // Shutting down: its chunks and leases go to others now, not
            // once its announces have stopped for a while.
            self.remove_member(&node);
            return Ok(AnnounceReply {
                interval_ms: self.cfg.announce_interval_ms,
                known,
                denied: Vec::new(),
                dht_peers: Vec::new(),
            });
        }
        let empty = BTreeSet::new();
        let current = self.members.get(&node).map_or(&empty, |m| &m.blobs);
        if !self.members.contains_key(&node) && self.members.len() >= self.cfg.max_members {
            return Err(too_many("members", self.cfg.max_members));
        }

        // Validate everything before changing anything.
        let listed: BTreeSet<Digest> = a.blobs().iter().map(|b| *b.blob()).collect();
        let mut held = if a.is_full() {
            0
        } else {
            current.len() - a.dropped().iter().filter(|d| current.contains(*d)).count()
        };
        let (mut new_blobs, mut idle_reused) = (0usize, 0usize);
        for bh in a.blobs() {
            let nonempty = bh.is_complete() || bh.have().count() > 0;
            match self.blobs.get(bh.blob()) {
                Some(b) if b.layout != bh.layout() => {
                    return Err(TrackerError::LayoutConflict {
                        blob: *bh.blob(),
                        known: b.layout,
                        offered: bh.layout(),
                    })
                }
                Some(b) if nonempty && b.idle_since.is_some() => idle_reused += 1,
                None if nonempty => new_blobs += 1,
                _ => {}
            }
            if a.is_full() {
                held += usize::from(nonempty);
            } else if nonempty && !current.contains(bh.blob()) {
                held += 1;
            } else if !nonempty && current.contains(bh.blob()) {
                held -= 1;
            }
        }
        if held > self.cfg.max_blobs_per_member {
            return Err(too_many(
                "blobs held by one member",
                self.cfg.max_blobs_per_member,
            ));
        }
        let room = self.cfg.max_blobs.saturating_sub(self.blobs.len())
            + self.idle.len().saturating_sub(idle_reused);
        if new_blobs > room {
            return Err(too_many("blobs", self.cfg.max_blobs));
        }

        // Refresh the member.
        let deadline = now + self.cfg.member_ttl_ms;
        let interval = self.cfg.announce_interval_ms;
        let promise = a
            .next_ms()
            .map_or(interval, |ms| u64::from(ms.get()).min(interval));
        match self.members.get_mut(&node) {
            Some(m) => {
                self.deadlines.remove(&(m.deadline, node.clone()));
                m.deadline = deadline;
                m.seen = now;
                m.promise = promise;
                m.addr = a.addr().clone();
                m.dht = a.dht().cloned();
                // Keep the lease index to blobs where the node still is a
                // lessee, so it stays bounded over a long membership.
                m.lease_blobs.retain(|d| {
                    self.blobs
                        .get(d)
                        .is_some_and(|b| b.lessee.values().any(|n| *n == node))
                });
            }
            None => {
                self.members.insert(
                    node.clone(),
                    Member {
                        addr: a.addr().clone(),
                        deadline,
                        seen: now,
                        promise,
                        blobs: BTreeSet::new(),
                        lease_blobs: BTreeSet::new(),
                        stalled_for: BTreeSet::new(),
                        rack: None,
                        dht: a.dht().cloned(),
                    },
                );
            }
        }
        self.deadlines.insert((deadline, node.clone()));
        if a.dht().is_some() {
            self.dht_members.insert(node.clone());
        } else {
            self.dht_members.remove(&node);
        }
        if let Some(rack) = a.rack() {
            self.set_rack(&node, rack);
        }

        // Forget what is no longer held.
        let member = &self.members[&node];
        let mut gone: Vec<Digest> = a.dropped().to_vec();
        if a.is_full() {
            gone.extend(member.blobs.iter().filter(|d| !listed.contains(*d)));
        }
        for d in a.dropped() {
            // A dropped blob is not being fetched either: hand its leases over.
            if let Some(b) = self.blobs.get_mut(d) {
                if let Some(mine) = b.by_node.get(&node).cloned() {
                    for i in mine {
                        b.release(i, &mut self.leases);
                    }
                }
            }
        }
        for d in gone {
            self.set_have(&node, &d, None);
        }

        // Existing blobs first (so they are not idle, hence not evicted, when
        // new ones need room), then new ones.
        let (existing, new): (Vec<_>, Vec<_>) = a
            .blobs()
            .iter()
            .partition(|bh| self.blobs.contains_key(bh.blob()));
        for bh in existing.into_iter().chain(new) {
            let have = if bh.is_complete() {
                Some(Have::Complete)
            } else {
                // What it published the hash of, it holds: an announce it
                // made before that publish but that arrives after it (one
                // waiting behind another of the member's, or overtaken on
                // another core) must not take the chunk back — with nobody
                // else holding it yet, the chunk would be leased and fetched
                // from the origin again (5.5 % more egress at 10,000
                // simulated members).
                let mut bits = bh.have().clone();
                if let Some(b) = self.blobs.get(bh.blob()) {
                    if b.layout == bh.layout() {
                        b.published_by(&node, &mut bits);
                    }
                }
                (bits.count() > 0).then_some(Have::Partial(bits))
            };
            if have.is_some() {
                self.ensure_blob(bh.blob(), bh.layout())?;
            }
            self.set_have(&node, bh.blob(), have);
        }
        Ok(AnnounceReply {
            interval_ms: self.cfg.announce_interval_ms,
            known,
            denied: self.denied.iter().cloned().collect(),
            dht_peers: self.dht_peers(&node),
        })
    }

    /// The DHT addresses of the members after `node` in name order (around
    /// the ring), at most [`MAX_DHT_PEERS`]: every member gets a different,
    /// overlapping set, so the DHT they bootstrap from is connected.
    fn dht_peers(&self, node: &NodeId) -> Vec<PeerAddr> {
        use std::ops::Bound::{Excluded, Unbounded};
        let after = self.dht_members.range((Excluded(node), Unbounded));
        let before = self.dht_members.range::<NodeId, _>(..node);
        after
            .chain(before)
            .filter_map(|n| self.members.get(n)?.dht.clone())
            .take(MAX_DHT_PEERS)
            .collect()
    }

    /// What `node` needs to fetch `blob`: the known chunk hashes, at most
    /// `max_peers_per_lookup` holders chosen for it (never itself), and the
    /// chunks under lease. Anyone not excluded may look up.
    pub fn lookup(&mut self, now_ms: u64, node: &NodeId, blob: &Digest) -> Result<LookupReply> {
        self.lookup_since(now_ms, node, blob, None)
    }

    /// [`lookup`](Self::lookup), with only the hashes published after
    /// `since` when it names the blob's current epoch ([`HashCursor`]).
    pub fn lookup_since(
        &mut self,
        now_ms: u64,
        node: &NodeId,
        blob: &Digest,
        since: Option<HashCursor>,
    ) -> Result<LookupReply> {
        let now = self.expire(now_ms);
        self.view(now, node, blob, since)
    }

    /// Whether time passing to `now_ms` would change the tracker: a lease,
    /// a member or an exclusion has run out. While it would not, a lookup
    /// changes nothing and [`lookup_current`](Self::lookup_current) answers
    /// it as [`lookup_since`](Self::lookup_since) would, under a shared lock.
    pub fn expiry_due(&self, now_ms: u64) -> bool {
        let now = self.now.max(now_ms);
        self.leases.first().is_some_and(|&(at, ..)| at <= now)
            || self.deadlines.first().is_some_and(|(at, _)| *at < now)
            || self
                .exclusion_ends
                .first()
                .is_some_and(|(at, _)| *at <= now)
    }

    /// [`lookup_since`](Self::lookup_since) without applying the passage
    /// of time: the same answer when no [`expiry_due`](Self::expiry_due),
    /// else one that still shows what has just run out. Lookups are most
    /// of a tracker's requests; the server answers them through this under
    /// a read lock, so they run on every core at once.
    pub fn lookup_current(
        &self,
        now_ms: u64,
        node: &NodeId,
        blob: &Digest,
        since: Option<HashCursor>,
    ) -> Result<LookupReply> {
        self.view(self.now.max(now_ms), node, blob, since)
    }

    fn view(
        &self,
        now: u64,
        node: &NodeId,
        blob: &Digest,
        since: Option<HashCursor>,
    ) -> Result<LookupReply> {
        self.check_excluded(node)?;
        let b = self
            .blobs
            .get(blob)
            .ok_or(TrackerError::UnknownBlob(*blob))?;
        let count = b.count();
        let epoch = now / self.cfg.announce_interval_ms;
        let k = self.cfg.max_peers_per_lookup as usize;
        // Holders in the requester's rack first, leaving a quarter of the
        // places to the rest of the swarm (where the rack's missing chunks
        // are).
        let near = self.near_holders(node, b, k - k / 4);
        let mut picked = near.clone();
        for n in b.pick(node, epoch, k) {
            if picked.len() >= k {
                break;
            }
            if !picked.contains(&n) {
                picked.push(n);
            }
        }
        // Where there is room, members fetching chunks from the origin under
        // lease are named too, holdings or not: a member watching them hears
        // of each chunk as it lands, instead of a lookup interval after
        // their next announce.
        for lease in b.leases.values() {
            if picked.len() >= k {
                break;
            }
            if lease.node != *node
                && self.members.contains_key(&lease.node)
                && !picked.contains(&lease.node)
            {
                picked.push(lease.node.clone());
            }
        }
        let holders = picked
            .into_iter()
            .map(|n| {
                let (have, complete) = match b.holders.get(&n).map(|h| &h.have) {
                    Some(Have::Complete) => (full(count), true),
                    Some(Have::Partial(bits)) => (bits.clone(), false),
                    None => (Bitfield::for_layout(&b.layout), false),
                };
                Holder {
                    addr: self.members[&n].addr.clone(),
                    near: near.contains(&n),
                    node: n,
                    have,
                    complete,
                }
            })
            .collect();
        let mut leased = Bitfield::for_layout(&b.layout);
        for &i in b.leases.keys() {
            leased.set(i).expect("leases are in range");
        }
        let after = since.filter(|c| c.epoch == b.epoch).map_or(0, |c| c.seq);
        let hashes = b
            .hashes
            .iter()
            .map(|h| h.as_ref().filter(|p| p.seq > after).map(|p| p.hash))
            .collect();
        let mut served = Bitfield::for_layout(&b.layout);
        for i in (0..count).filter(|&i| b.served(i)) {
            served.set(i).expect("chunks are in range");
        }
        BlobView::new(*blob, b.layout, b.epoch, hashes, holders, leased)?
            .with_hash_seq(b.hash_seq)
            .with_served(served)
    }

    /// Makes this tracker number hash epochs from `first` on (default 1).
    /// A tracker process starts them at its start time in microseconds, so
    /// epochs — and the [`HashCursor`]s members keep — never repeat across
    /// restarts.
    pub fn starting_epochs_at(mut self, first: u64) -> Self {
        self.next_epoch = first.max(1);
        self
    }

    /// The latest time seen: the greatest `now_ms` of any call so far.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// The whole state but the configuration, as JSON: where a tracker
    /// replica that joins later, or lost its place in the shared request
    /// log, starts from ([`restore`](Self::restore)).
    pub fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("the tracker state serializes")
    }

    /// A tracker with `cfg` and the state of a [`snapshot`](Self::snapshot).
    /// Refused unless the state keeps every invariant under `cfg`.
    pub fn restore(cfg: TrackerConfig, snapshot: &[u8]) -> std::result::Result<Self, String> {
        cfg.validate().map_err(|e| e.to_string())?;
        let mut t: Tracker =
            serde_json::from_slice(snapshot).map_err(|e| format!("unreadable snapshot: {e}"))?;
        t.cfg = cfg;
        t.dht_members = t
            .members
            .iter()
            .filter(|(_, m)| m.dht.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        t.check_invariants()
            .map_err(|e| format!("inconsistent snapshot: {e}"))?;
        Ok(t)
    }

    /// Grants origin leases; see [`LeaseRequest`]. The node's own leases on
    /// chunks it still lacks are renewed and listed first (those nearest
    /// `from` first, at most the request's budget); then chunks that nobody
    /// serves and nobody leases, from `from` onward, wrapping to the start.
    /// A member holds at most `max_lease_chunks` leases per blob, and the
    /// members of a rack at most `max_blob_lease_bytes` of it.
    pub fn lease(&mut self, now_ms: u64, r: LeaseRequest) -> Result<LeaseGrant> {
        let now = self.expire(now_ms);
        let node = r.node().clone();
        self.check_member(&node)?;
        let d = *r.blob();
        self.ensure_blob(&d, r.layout())?;
        let cap = self.cfg.max_lease_chunks;
        let budget = r.max_chunks().min(cap) as usize;
        let expires = now + self.cfg.lease_ttl_ms;
        let b = self.blobs.get_mut(&d).expect("just ensured");
        if let Some(rtt) = r.rtt_ms() {
            b.lease_life.sample_rtt(rtt);
        }
        let from = r.from();

        let mine: Vec<u32> = b.by_node.get(&node).map_or(Vec::new(), |s| {
            s.range(from..).chain(s.range(..from)).copied().collect()
        });
        let lacks = |i: u32| !b.holders.get(&node).is_some_and(|h| h.have.get(i));
        let renew: Vec<u32> = mine
            .iter()
            .copied()
            .filter(|&i| lacks(i))
            .take(budget)
            .collect();
        let fresh_cap = (cap as usize).saturating_sub(mine.len());
        // Room under the blob's cap in the requester's rack (members that
        // said none count as one rack): each rack brings its chunks in
        // through its own uplink.
        let blob_cap = (self.cfg.max_blob_lease_bytes / u64::from(b.layout.chunk_size())).max(1);
        let blob_cap = b.lease_life.leased_for(blob_cap);
        let blob_room = if blob_cap >= u64::from(b.count()) {
            usize::MAX
        } else {
            let rack = self.members.get(&node).and_then(|m| m.rack.as_ref());
            let members = &self.members;
            let held: usize = b
                .by_node
                .iter()
                .filter(|(n, _)| members.get(*n).and_then(|m| m.rack.as_ref()) == rack)
                .map(|(_, s)| s.len())
                .sum();
            (blob_cap as usize).saturating_sub(held)
        };
        let fresh = b.open_from(from, (budget - renew.len()).min(fresh_cap).min(blob_room));
        let mut chunks = renew;
        chunks.extend(fresh);
        for &i in &chunks {
            b.grant(i, &node, now, expires, &mut self.leases);
        }
        if !chunks.is_empty() {
            self.members
                .get_mut(&node)
                .expect("checked member")
                .lease_blobs
                .insert(d);
        }
        self.settle(&d);
        Ok(LeaseGrant {
            chunks,
            expires_ms: expires,
        })
    }

    /// Records chunk hashes from the chunks' lessee; see [`PublishHashes`].
    /// An accepted hash releases the chunk's lease and marks the publisher as
    /// holding the chunk. Republishing a known hash is accepted from its
    /// publisher or the chunk's lessee; a different hash from the lessee is a
    /// conflict and a strike against it.
    pub fn publish_hashes(&mut self, now_ms: u64, p: PublishHashes) -> Result<PublishReply> {
        let now = self.expire(now_ms);
        let node = p.node().clone();
        self.check_member(&node)?;
        let d = *p.blob();
        if !self.blobs.contains_key(&d) {
            return Err(TrackerError::UnknownBlob(d));
        }
        let mut reply = PublishReply {
            accepted: 0,
            rejected: Vec::new(),
        };
        // Lives (grant to now) of the publisher's leases this publish ends.
        let mut lives = (0u64, 0u64);
        for &(i, hash) in p.hashes() {
            // A conflict may have excluded the publisher (and dropped the blob).
            let Some(b) = self.blobs.get_mut(&d) else {
                reply.rejected.push((i, PublishRejection::NotLeaseHolder));
                continue;
            };
            if i >= b.count() {
                reply.rejected.push((i, PublishRejection::OutOfRange));
                continue;
            }
            let lessee = b.lessee.get(&i) == Some(&node);
            let outcome = match &b.hashes[i as usize] {
                Some(known) if known.hash == hash && (known.by == node || lessee) => Ok(false),
                Some(known) if known.hash != hash && lessee => Err(PublishRejection::Conflict),
                Some(_) => Err(PublishRejection::NotLeaseHolder),
                None if lessee => Ok(true),
                None => Err(PublishRejection::NotLeaseHolder),
            };
            match outcome {
                Ok(fresh) => {
                    if let Some(l) = b.leases.get(&i).filter(|l| l.node == node) {
                        lives.0 += now.saturating_sub(l.granted);
                        lives.1 += 1;
                    }
                    if fresh {
                        b.accept_hash(i, hash, &node, &mut self.leases);
                        self.hashes += 1;
                        self.records
                            .entry(node.clone())
                            .or_default()
                            .published
                            .insert(d);
                    } else {
                        // Already known: still, the publisher holds the chunk.
                        b.lessee.remove(&i);
                        b.release(i, &mut self.leases);
                        b.add_chunk(&node, i);
                    }
                    b.release_served(&mut self.leases);
                    if let Some(m) = self.members.get_mut(&node) {
                        m.blobs.insert(d);
                    }
                    reply.accepted += 1;
                }
                Err(why) => {
                    reply.rejected.push((i, why));
                    if why == PublishRejection::Conflict {
                        self.strike(&node);
                    }
                }
            }
        }
        if let (Some(fetch), Some(b)) = (p.fetch_ms(), self.blobs.get_mut(&d)) {
            if let Some(life) = lives.0.checked_div(lives.1) {
                b.lease_life.sample(life, u64::from(fetch));
            }
        }
        self.settle(&d);
        Ok(reply)
    }

    /// Acts on evidence of bad data; see [`Report`].
    ///
    /// `BadChunk`: one report per distinct reporter counts against the peer;
    /// at `bad_reports_to_exclude` it is excluded. Reports against nodes that
    /// are not members are ignored (they are in no reply already).
    ///
    /// `Unresponsive`: one report per distinct reporter; at
    /// `unresponsive_reports_to_drop` the peer's membership deadline is cut
    /// to when its next announce is overdue: the time it promised
    /// ([`Announce::next_ms`], else the announce interval) and half as much
    /// again (at least a fifth of an interval, and a fifth of an interval
    /// from now at the earliest). A live peer's next announce restores its
    /// TTL, a dead one is forgotten then (holdings and leases go; nothing is
    /// withdrawn), so its chunks become leasable to one live member.
    ///
    /// `DigestMismatch` (for the blob's current hash epoch; stale reports are
    /// ignored): every hash of the blob is withdrawn, every *partial* holding
    /// of it cleared (those chunks were verified against suspect hashes;
    /// complete holders verified the digest and keep theirs), and each
    /// publisher of a withdrawn hash gets a strike.
    pub fn report(&mut self, now_ms: u64, r: Report) -> Result<ReportReply> {
        self.expire(now_ms);
        r.validate()?;
        let reporter = r.node().clone();
        self.check_member(&reporter)?;
        let d = *r.blob();
        let b = self.blobs.get(&d).ok_or(TrackerError::UnknownBlob(d))?;
        let mut reply = ReportReply::default();
        match r {
            Report::BadChunk { peer, chunk, .. } => {
                if chunk >= b.count() {
                    return Err(TrackerError::ChunkOutOfRange {
                        index: chunk,
                        count: b.count(),
                    });
                }
                if !self.members.contains_key(&peer) {
                    return Ok(reply);
                }
                let rec = self.records.entry(peer.clone()).or_default();
                rec.reporters.insert(reporter);
                if rec.reporters.len() >= self.cfg.bad_reports_to_exclude as usize {
                    reply.withdrawn += self.exclude(&peer);
                    reply.excluded.push(peer);
                }
            }
            Report::Unresponsive { peer, .. } => {
                let threshold = self.cfg.unresponsive_reports_to_drop as usize;
                let interval = self.cfg.announce_interval_ms;
                let Some(m) = self.members.get_mut(&peer) else {
                    return Ok(reply);
                };
                // Dead, or alive and slow? Its announces tell: a live member
                // announces when it said it would (every second or so while
                // it downloads, every interval otherwise) and gets its full
                // TTL back; a dead one is forgotten once that announce is
                // late by half the promised time (at least a fifth of an
                // interval, and not before another fifth from now), not a
                // whole TTL later. Forgetting it at once made a slow live
                // holder's chunks leasable, and the origin served them
                // again: 1.67x egress in the lab at 16 members. Waiting two
                // intervals from the report instead kept the chunks only a
                // dead member held out of reach for 10 s: with 5 % of
                // members dying, most of the pull's time.
                let grace = (m.promise / 2).max(interval / 5);
                let soon = (m.seen + m.promise + grace).max(self.now + interval / 5);
                m.stalled_for.insert(reporter);
                if m.stalled_for.len() >= threshold && m.deadline > soon {
                    self.deadlines.remove(&(m.deadline, peer.clone()));
                    m.deadline = soon;
                    m.stalled_for.clear();
                    self.deadlines.insert((soon, peer.clone()));
                    reply.suspected.push(peer);
                }
            }
            Report::DigestMismatch { epoch, .. } => {
                if epoch != b.epoch || b.known == 0 {
                    return Ok(reply);
                }
                let publishers = b.publishers();
                let partial: Vec<NodeId> = b
                    .holders
                    .iter()
                    .filter(|(_, h)| matches!(h.have, Have::Partial(_)))
                    .map(|(n, _)| n.clone())
                    .collect();
                reply.withdrawn += self.withdraw(&d, None);
                for n in partial {
                    self.set_have(&n, &d, None);
                }
                for p in publishers {
                    if self.strike(&p) {
                        reply.excluded.push(p);
                    }
                }
                self.settle(&d);
            }
        }
        Ok(reply)
    }

    /// Applies the passage of time up to `now_ms`: forgets members silent for
    /// longer than `member_ttl_ms` (with their holdings and leases), ends
    /// expired leases and exclusions, and drops blobs left with nothing.
    /// Every other operation calls this first. Returns the tracker's time.
    pub fn expire(&mut self, now_ms: u64) -> u64 {
        self.now = self.now.max(now_ms);
        let now = self.now;
        while let Some(&(at, d, i)) = self.leases.first() {
            if at > now {
                break;
            }
            self.leases.pop_first();
            if let Some(b) = self.blobs.get_mut(&d) {
                b.release(i, &mut self.leases);
            }
            self.settle(&d);
        }
        while let Some((at, node)) = self.deadlines.first().cloned() {
            if at >= now {
                break;
            }
            self.remove_member(&node);
        }
        while let Some((at, node)) = self.exclusion_ends.first().cloned() {
            if at > now {
                break;
            }
            self.exclusion_ends.pop_first();
            self.excluded.remove(&node);
        }
        let members = &self.members;
        self.jobs.expire(now, |n| members.contains_key(n));
        now
    }

    // -----------------------------------------------------------------------
    // Preheat jobs
    // -----------------------------------------------------------------------

    /// Creates a preheat job for the live members `req.nodes` selects.
    pub fn preheat(&mut self, now_ms: u64, req: PreheatRequest) -> Result<PreheatReply> {
        let now = self.expire(now_ms);
        let live = self.members.iter().map(|(n, m)| (n, m.rack.as_ref()));
        self.jobs.create(now, req, live)
    }

    /// The preheat jobs `node` has not finished.
    pub fn jobs_for(&self, node: &NodeId) -> JobsReply {
        self.jobs.pending(node)
    }

    /// Whether `node` has a preheat job it has not started.
    pub fn has_new_jobs(&self, node: &NodeId) -> bool {
        self.jobs.has_new(node)
    }

    /// Records a member's progress on a job.
    pub fn job_progress(&mut self, now_ms: u64, p: JobProgress) -> Result<u64> {
        let now = self.expire(now_ms);
        let job = p.job;
        self.jobs.progress(now, p)?;
        Ok(job)
    }

    /// One preheat job and its members' progress.
    pub fn job(&self, id: u64) -> Result<JobStatus> {
        self.jobs.status(id)
    }

    /// Up to `limit` members, by name.
    pub fn member_summaries(&self, limit: usize) -> Vec<MemberSummary> {
        self.members
            .iter()
            .take(limit)
            .map(|(n, m)| MemberSummary {
                node: n.clone(),
                addr: m.addr.clone(),
                rack: m.rack.clone(),
                seen_ms_ago: self.now.saturating_sub(m.seen),
                blobs: m.blobs.len(),
                excluded: self.excluded.contains_key(n),
            })
            .collect()
    }

    /// The `limit` blobs with the most holders (then the most leases).
    pub fn hot_blobs(&self, limit: usize) -> Vec<BlobSummary> {
        let mut all: Vec<BlobSummary> = self
            .blobs
            .values()
            .map(|b| {
                let complete = b.complete_holders();
                BlobSummary {
                    digest: b.digest,
                    size: b.layout.size(),
                    chunks: b.count(),
                    complete,
                    partial: (b.holders.len() as u32).saturating_sub(complete),
                    leases: b.leases.len(),
                    hashes: b.known,
                }
            })
            .collect();
        all.sort_by(|a, b| {
            (b.complete + b.partial, b.leases, a.digest).cmp(&(
                a.complete + a.partial,
                a.leases,
                b.digest,
            ))
        });
        all.truncate(limit);
        all
    }

    /// Every preheat job the tracker keeps, newest first.
    pub fn jobs(&self) -> Vec<JobStatus> {
        self.jobs.all()
    }

    // -----------------------------------------------------------------------
    // Internals
    // -----------------------------------------------------------------------

    fn check_excluded(&self, node: &NodeId) -> Result<()> {
        if self.denied.contains(node) {
            return Err(TrackerError::Denied(node.clone()));
        }
        match self.excluded.get(node) {
            Some(&until_ms) => Err(TrackerError::Excluded {
                node: node.clone(),
                until_ms,
            }),
            None => Ok(()),
        }
    }

    fn check_member(&self, node: &NodeId) -> Result<()> {
        self.check_excluded(node)?;
        if self.members.contains_key(node) {
            Ok(())
        } else {
            Err(TrackerError::NotAMember(node.clone()))
        }
    }

    /// Makes sure `d` is tracked with `layout`, evicting the oldest idle blob
    /// if the table is full.
    fn ensure_blob(&mut self, d: &Digest, layout: ChunkLayout) -> Result<()> {
        if let Some(b) = self.blobs.get(d) {
            if b.layout != layout {
                return Err(TrackerError::LayoutConflict {
                    blob: *d,
                    known: b.layout,
                    offered: layout,
                });
            }
            return Ok(());
        }
        if self.blobs.len() >= self.cfg.max_blobs {
            let Some((_, victim)) = self.idle.first().copied() else {
                return Err(too_many("blobs", self.cfg.max_blobs));
            };
            self.withdraw(&victim, None);
            self.settle(&victim);
        }
        let epoch = self.bump_epoch();
        self.blobs.insert(*d, Blob::new(*d, layout, epoch));
        Ok(())
    }

    fn bump_epoch(&mut self) -> u64 {
        self.next_epoch += 1;
        self.next_epoch - 1
    }

    /// Sets (or with `None` removes) `node`'s holding of `d`, keeping the
    /// member's index, the blob's leases and its idle state in step.
    fn set_have(&mut self, node: &NodeId, d: &Digest, have: Option<Have>) {
        let Some(b) = self.blobs.get_mut(d) else {
            return;
        };
        let holds = have.is_some();
        b.set_holding(node, have);
        b.release_served(&mut self.leases);
        if let Some(m) = self.members.get_mut(node) {
            if holds {
                m.blobs.insert(*d);
            } else {
                m.blobs.remove(d);
            }
        }
        self.settle(d);
    }

    /// Withdraws the hashes of `d` published by `by` (all if `None`); the
    /// chunks become leasable again and the blob gets a new epoch.
    fn withdraw(&mut self, d: &Digest, by: Option<&NodeId>) -> u32 {
        let Some(b) = self.blobs.get_mut(d) else {
            return 0;
        };
        let publishers = b.publishers();
        let n = b.withdraw(|p| by.is_none_or(|by| &p.by == by));
        if n > 0 {
            b.epoch = self.next_epoch;
            self.next_epoch += 1;
        }
        self.hashes -= u64::from(n);
        let still = b.publishers();
        for p in publishers.difference(&still) {
            if let Some(rec) = self.records.get_mut(p) {
                rec.published.remove(d);
            }
            self.gc_record(p);
        }
        n
    }

    /// Counts a strike against `node`; excludes it at the limit. Returns
    /// whether it was excluded.
    fn strike(&mut self, node: &NodeId) -> bool {
        // Records exist only for members and nodes with hashes on file.
        if !self.members.contains_key(node) && !self.records.contains_key(node) {
            return false;
        }
        let rec = self.records.entry(node.clone()).or_default();
        rec.strikes += 1;
        if rec.strikes >= self.cfg.strikes_to_exclude {
            self.exclude(node);
            true
        } else {
            false
        }
    }

    /// Excludes `node`: it loses membership, holdings and leases, and its
    /// published hashes are withdrawn. Returns how many hashes were withdrawn.
    fn exclude(&mut self, node: &NodeId) -> u32 {
        let until = self.now + self.cfg.exclusion_ms;
        if let Some(old) = self.excluded.insert(node.clone(), until) {
            self.exclusion_ends.remove(&(old, node.clone()));
        }
        self.exclusion_ends.insert((until, node.clone()));
        while self.excluded.len() > self.cfg.max_members {
            let (_, oldest) = self.exclusion_ends.pop_first().expect("queue matches map");
            self.excluded.remove(&oldest);
        }
        self.purge(node)
    }

    /// Forgets everything of `node`: membership, holdings, leases, and the
    /// hashes it published (withdrawn). Returns the hashes withdrawn.
    fn purge(&mut self, node: &NodeId) -> u32 {
        self.remove_member(node);
        let published = self
            .records
            .get(node)
            .map(|r| r.published.clone())
            .unwrap_or_default();
        let mut n = 0;
        for d in published {
            n += self.withdraw(&d, Some(node));
            self.settle(&d);
        }
        self.records.remove(node);
        n
    }

    /// Replaces the operator's deny list with `nodes` (at most
    /// [`MAX_DENIED`]). A newly denied node is forgotten at once — its
    /// membership, holdings, leases and published hashes — and refused
    /// everything ([`TrackerError::Denied`]) until a later list leaves it
    /// out; members learn the list from every announce reply and refuse the
    /// node too. Returns how many nodes were newly denied.
    pub fn deny(&mut self, now_ms: u64, nodes: BTreeSet<NodeId>) -> Result<u32> {
        self.expire(now_ms);
        if nodes.len() > MAX_DENIED {
            return Err(TrackerError::TooMany {
                what: "denied nodes",
                limit: MAX_DENIED,
            });
        }
        let fresh: Vec<NodeId> = nodes.difference(&self.denied).cloned().collect();
        for n in &fresh {
            if let Some(until) = self.excluded.remove(n) {
                self.exclusion_ends.remove(&(until, n.clone()));
            }
            self.purge(n);
        }
        self.denied = nodes;
        Ok(fresh.len() as u32)
    }

    /// The operator's deny list.
    pub fn denied(&self) -> &BTreeSet<NodeId> {
        &self.denied
    }

    /// Records where a member sits.
    fn set_rack(&mut self, node: &NodeId, rack: &Rack) {
        let Some(m) = self.members.get_mut(node) else {
            return;
        };
        if m.rack.as_ref() == Some(rack) {
            return;
        }
        if let Some(old) = m.rack.replace(rack.clone()) {
            self.leave_rack(node, &old);
        }
        self.racks
            .entry(rack.clone())
            .or_default()
            .insert(node.clone());
    }

    fn leave_rack(&mut self, node: &NodeId, rack: &Rack) {
        if let Some(set) = self.racks.get_mut(rack) {
            set.remove(node);
            if set.is_empty() {
                self.racks.remove(rack);
            }
        }
    }

    /// Holders of `blob` in `node`'s rack, at most `max`, walked from just
    /// after `node` (so members of a rack start at different places) and
    /// looking at no more than [`RACK_SCAN`] members.
    fn near_holders(&self, node: &NodeId, blob: &Blob, max: usize) -> Vec<NodeId> {
        let Some(set) = self
            .members
            .get(node)
            .and_then(|m| m.rack.as_ref())
            .and_then(|r| self.racks.get(r))
        else {
            return Vec::new();
        };
        use std::ops::Bound::{Excluded, Unbounded};
        set.range::<NodeId, _>((Excluded(node), Unbounded))
            .chain(set.range::<NodeId, _>(..node))
            .take(RACK_SCAN)
            .filter(|n| blob.holders.contains_key(*n))
            .take(max)
            .cloned()
            .collect()
    }

    /// Forgets a member with its holdings and leases.
    fn remove_member(&mut self, node: &NodeId) {
        let Some(m) = self.members.remove(node) else {
            return;
        };
        self.dht_members.remove(node);
        if let Some(rack) = &m.rack {
            self.leave_rack(node, rack);
        }
        self.deadlines.remove(&(m.deadline, node.clone()));
        for d in &m.blobs {
            if let Some(b) = self.blobs.get_mut(d) {
                b.remove_holding(node);
            }
            self.settle(d);
        }
        for d in &m.lease_blobs {
            if let Some(b) = self.blobs.get_mut(d) {
                b.forget_lessee(node, &mut self.leases);
            }
            self.settle(d);
        }
        self.gc_record(node);
    }

    /// Drops a reputation record that no longer protects anything.
    fn gc_record(&mut self, node: &NodeId) {
        if !self.members.contains_key(node)
            && self
                .records
                .get(node)
                .is_some_and(|r| r.published.is_empty())
        {
            self.records.remove(node);
        }
    }

    /// Drops `d` if nothing is left of it, and tracks whether it is idle.
    fn settle(&mut self, d: &Digest) {
        let Some(b) = self.blobs.get_mut(d) else {
            return;
        };
        let idle = b.holders.is_empty() && b.leases.is_empty();
        if idle && b.known == 0 {
            if let Some(since) = b.idle_since {
                self.idle.remove(&(since, *d));
            }
            self.blobs.remove(d);
        } else if idle && b.idle_since.is_none() {
            b.idle_since = Some(self.now);
            self.idle.insert((self.now, *d));
        } else if !idle {
            if let Some(since) = b.idle_since.take() {
                self.idle.remove(&(since, *d));
            }
        }
    }

    // -----------------------------------------------------------------------
    // Introspection
    // -----------------------------------------------------------------------

    /// Checks every invariant of the module documentation and the internal
    /// indexes against each other. O(state): for tests and the simulator.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let now = self.now;
        if self.members.len() > self.cfg.max_members {
            return Err("too many members".into());
        }
        if self.blobs.len() > self.cfg.max_blobs {
            return Err("too many blobs".into());
        }
        self.jobs.check()?;
        let with_dht = self.members.iter().filter(|(_, m)| m.dht.is_some());
        if !with_dht.map(|(n, _)| n).eq(self.dht_members.iter()) {
            return Err("the DHT index does not match the members' DHT addresses".into());
        }
        if self.excluded.len() > self.cfg.max_members {
            return Err("too many exclusions".into());
        }
        if self.denied.len() > MAX_DENIED {
            return Err("too many denied nodes".into());
        }
        for n in &self.denied {
            if self.members.contains_key(n) || self.records.contains_key(n) {
                return Err(format!("denied {n} is still a member or has a record"));
            }
            if self.excluded.contains_key(n) {
                return Err(format!("denied {n} is also excluded"));
            }
        }
        let deadlines: BTreeSet<(u64, NodeId)> = self
            .members
            .iter()
            .map(|(n, m)| (m.deadline, n.clone()))
            .collect();
        if deadlines != self.deadlines {
            return Err("member deadline queue drifted".into());
        }
        if let Some((at, n)) = self.deadlines.first() {
            if *at < now {
                return Err(format!("member {n} is past its deadline"));
            }
        }
        let mut racks: BTreeMap<Rack, BTreeSet<NodeId>> = BTreeMap::new();
        for (n, m) in &self.members {
            if let Some(r) = &m.rack {
                racks.entry(r.clone()).or_default().insert(n.clone());
            }
        }
        if racks != self.racks {
            return Err("rack index drifted".into());
        }
        let ends: BTreeSet<(u64, NodeId)> =
            self.excluded.iter().map(|(n, &u)| (u, n.clone())).collect();
        if ends != self.exclusion_ends || ends.first().is_some_and(|(u, _)| *u <= now) {
            return Err("exclusion queue drifted".into());
        }
        for n in self.excluded.keys() {
            if self.members.contains_key(n) || self.records.contains_key(n) {
                return Err(format!("excluded {n} is still a member or has a record"));
            }
        }
        for (n, r) in &self.records {
            if !self.members.contains_key(n) && r.published.is_empty() {
                return Err(format!("stale record for {n}"));
            }
        }
        let mut queue = LeaseQueue::new();
        let mut hashes = 0u64;
        let mut published: BTreeMap<NodeId, BTreeSet<Digest>> = BTreeMap::new();
        for (d, b) in &self.blobs {
            b.check()?;
            if b.holders.is_empty() && b.leases.is_empty() && b.known == 0 {
                return Err(format!("{d} is empty but kept"));
            }
            let idle = b.holders.is_empty() && b.leases.is_empty();
            match b.idle_since {
                Some(t) if idle && self.idle.contains(&(t, *d)) => {}
                None if !idle => {}
                _ => return Err(format!("{d}: idle state drifted")),
            }
            for n in b.holders.keys() {
                if !self.members.get(n).is_some_and(|m| m.blobs.contains(d)) {
                    return Err(format!("{d}: holder {n} is not a member holding it"));
                }
            }
            for (i, l) in &b.leases {
                if l.expires <= now {
                    return Err(format!("{d}: expired lease on chunk {i}"));
                }
                queue.insert((l.expires, *d, *i));
            }
            for (node, set) in &b.by_node {
                if set.len() > self.cfg.max_lease_chunks as usize {
                    return Err(format!("{d}: {node} holds {} leases", set.len()));
                }
            }
            for n in b.lessee.values() {
                if !self
                    .members
                    .get(n)
                    .is_some_and(|m| m.lease_blobs.contains(d))
                {
                    return Err(format!("{d}: lessee {n} is not a member leasing it"));
                }
            }
            for p in b.hashes.iter().flatten() {
                hashes += 1;
                published.entry(p.by.clone()).or_default().insert(*d);
                if self.excluded.contains_key(&p.by) || self.denied.contains(&p.by) {
                    return Err(format!("{d}: hash from excluded {}", p.by));
                }
            }
        }
        if queue != self.leases {
            return Err("lease queue drifted".into());
        }
        if hashes != self.hashes {
            return Err("hash count drifted".into());
        }
        let on_file: BTreeMap<NodeId, BTreeSet<Digest>> = self
            .records
            .iter()
            .filter(|(_, r)| !r.published.is_empty())
            .map(|(n, r)| (n.clone(), r.published.clone()))
            .collect();
        if on_file != published {
            return Err("published-hash index drifted".into());
        }
        let idle_count = self
            .blobs
            .values()
            .filter(|b| b.idle_since.is_some())
            .count();
        if idle_count != self.idle.len() {
            return Err("idle index drifted".into());
        }
        for (n, m) in &self.members {
            if m.blobs.len() > self.cfg.max_blobs_per_member + self.cfg.max_blobs {
                return Err(format!("{n} holds too many blobs"));
            }
            for d in &m.blobs {
                if !self.blobs.get(d).is_some_and(|b| b.holders.contains_key(n)) {
                    return Err(format!("{n} lists {d} but holds nothing there"));
                }
            }
        }
        Ok(())
    }

    /// The node holding the unexpired lease on chunk `i` of `d`, and when it
    /// ends.
    pub fn lease_of(&self, d: &Digest, i: u32) -> Option<(NodeId, u64)> {
        let l = self.blobs.get(d)?.leases.get(&i)?;
        Some((l.node.clone(), l.expires))
    }

    /// The node whose hash for chunk `i` of `d` would be accepted (holds or
    /// last held its lease), if the hash is not known.
    pub fn lessee_of(&self, d: &Digest, i: u32) -> Option<NodeId> {
        self.blobs.get(d)?.lessee.get(&i).cloned()
    }

    /// Whether chunk `i` of `d` could be leased right now.
    pub fn is_leasable(&self, d: &Digest, i: u32) -> bool {
        self.blobs
            .get(d)
            .is_some_and(|b| i < b.count() && b.is_open(i))
    }
}

fn too_many(what: &'static str, limit: usize) -> TrackerError {
    TrackerError::TooMany { what, limit }
}

fn full(count: u32) -> Bitfield {
    Bitfield::full(count).expect("layout bounds the count")
}
