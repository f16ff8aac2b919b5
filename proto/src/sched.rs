//! The swarm scheduler of one blob download: which chunk to fetch next, from
//! which peer, when to give up on a peer, and when to go to the origin.
//!
//! A pure state machine in the manner of rust-libp2p's Kademlia queries:
//! the driver feeds it [`Event`]s (with the current time), and asks it for
//! the next [`Action`] with [`Scheduler::poll`] until it returns `None`, then
//! sleeps until [`Scheduler::next_deadline`] or the next event. No I/O, no
//! clocks, no randomness: the same events give the same actions, so the same
//! code runs in the daemon, in unit tests with simulated time, and in the
//! swarm simulator.
//!
//! Policy:
//! * **What the client waits for first**: chunks in a small window after the
//!   position the client is reading ([`Event::Want`]) go before anything
//!   else, in order, so streaming to the runtime never waits on rare chunks.
//! * **Rarest first** otherwise: among chunks a peer can give, the one the
//!   fewest known peers hold, so copies spread and no chunk stays scarce.
//! * **Only verifiable chunks from peers**: a chunk is asked of a peer only
//!   once its hash is known (published by whoever fetched it from the
//!   origin), so every byte can be checked before it is stored or forwarded.
//! * **Load spread**: at most `peer_depth` chunks in flight per peer, the
//!   node's `max_inflight` shared by its downloads running at once, and the
//!   least loaded peers are served first. A peer that answers `Busy` (its
//!   upload slots are full) is left alone for a back-off — at first about
//!   the usual chunk time here — that doubles while it stays busy, without
//!   counting against it. At most `max_peers` peers are kept.
//! * **Stalls move**: a request unanswered for `stall_ms` (the k-th chunk of
//!   a request: `k + 1` periods, as they come in order; `origin_stall_ms`
//!   for the origin, whose slowness is usually its shared link) is cancelled
//!   and its chunk asked elsewhere — counted from the last bytes, if the
//!   driver reports them moving ([`Event::Progress`]): slow is not stalled;
//!   after `max_stalls` stalls a peer is benched for
//!   `stall_bench_ms` (and reported to the tracker as unresponsive), then
//!   comes back on probation, one chunk at a time until it delivers. An
//!   overloaded seed thus recovers instead of being lost to the whole swarm.
//! * **Lacks data vs bad data**: a peer that lacks a chunk loses that bit; a
//!   peer that sent bytes failing verification is excluded for this blob.
//! * **Endgame**: when every missing chunk is already in flight and few are
//!   left, a request outstanding for twice the usual time a chunk takes
//!   here (at least `endgame_after_ms`) is also asked of a second peer; the
//!   loser is cancelled.
//! * **Never stuck on a lease**: with no chunk arriving for
//!   `orphan_after_ms`, chunks no peer can serve go to the origin without a
//!   lease when only peers excluded here hold them (the tracker still lists
//!   them, so it will not lease them); a bench period later when a benched
//!   peer holds them (a live peer on a starved CPU stalls too; a dead one
//!   stalls again on probation); two bench periods later, as a last resort,
//!   when nobody known holds them (the tracker leases those to one member).
//! * **Origin under lease**: chunks no peer holds are leased from the tracker
//!   ([`Action::Lease`]); leased chunks are fetched from the origin in
//!   contiguous runs (one Range request each, at most `origin_run` chunks),
//!   at most `origin_requests` runs at once. While leased chunks are still
//!   missing (coming from the origin or waiting for a request) the leases
//!   are renewed every `lease_renew_ms` (a lease request names just them),
//!   so a slow origin does not let the tracker hand the same chunks to a
//!   second node; one the renewal leaves out is given up unless its fetch
//!   has begun. With the tracker down, chunks no
//!   known peer holds go to the origin directly, with the same bounds.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;

use crate::chunk::{Bitfield, ChunkLayout};

/// Back-offs after `Busy` in a row that keep doubling (the base, 2×, 4×).
const BUSY_STEPS: u32 = 3;

/// A peer request counts as stalled after at least this many usual chunk
/// times (see [`SchedConfig::stall_ms`]).
const STALL_CHUNKS: u64 = 4;

/// Tunables of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedConfig {
    /// Chunks in flight per peer (pipelining depth).
    pub peer_depth: u32,
    /// Peers kept (excluded ones aside). Lookups name up to 32 holders and
    /// the tracker's window moves, so over a long pull in a big cluster a
    /// download would otherwise collect every member — and scan them all
    /// after every event. A newcomer past the limit replaces the idle peer
    /// that has the fewest chunks still needed here.
    pub max_peers: u32,
    /// Chunks in flight from peers for all of this node's downloads
    /// together: each of `n` downloads running at once gets `1/n` of them
    /// ([`Scheduler::set_downloads`]), at least `min_inflight`. A node then
    /// asks for about as many chunks at once as it serves (`max_inflight`
    /// is twice a member's 16 upload slots), however many layers it pulls:
    /// in the simulator, 32 per download with five layers at once (160 a
    /// node against 16 slots a holder) drew a million `Busy` answers from
    /// 300 members at 10 gbit and ended at 1.95–2.13× the bound; a fixed 8
    /// per download 1.74–1.80×, but 4.5× for one 512 MiB layer over 2 ms,
    /// where 8 chunks in flight cannot fill 10 gbit.
    pub max_inflight: u32,
    /// The fewest chunks in flight from peers a download is allowed, however
    /// many run at once.
    pub min_inflight: u32,
    /// Range requests to the origin in flight at once.
    pub origin_requests: u32,
    /// Most chunks in one origin Range request.
    pub origin_run: u32,
    /// A peer request unanswered this long is moved to another source — or
    /// four times the usual chunk time here, if longer: in the simulator, 32
    /// members on 10 mbit (16 upload slots each, so a chunk takes ~3.4 s)
    /// stalled, benched and reported one another with a fixed 5 s until
    /// members had downloaded the image 89 times over and 10 never finished.
    /// Once chunks have arrived here the usual chunk time is known, and the
    /// period is four of those but at least `stall_floor_ms`: at 10 gbit a
    /// chunk takes milliseconds, and with at least 5 s per dead peer the
    /// slowest of 1,000 members, 5 % of them dying, took 21 s (12 s with
    /// this floor and the chunks behind an overdue one moving with it).
    pub stall_ms: u64,
    /// The least stall period once the usual chunk time is known.
    pub stall_floor_ms: u64,
    /// An origin chunk not stored after this long (with
    /// [`Event::Progress`]: this long after the last bytes of its run)
    /// counts as stalled (its run is abandoned and fetched again). Much
    /// longer than `stall_ms`:
    /// the origin client already fails a run that sends nothing for its
    /// idle timeout, and a run that is merely slow is slow because the
    /// origin's link is the bottleneck — fetching it again would spend that
    /// link twice. Measured in the shaped lab at 25 mbit: with 5 s, 5–11
    /// runs per member were cut and fetched again (the registry answered
    /// Range requests for 63.8 MB of a 50.3 MB image); with 30 s, exactly
    /// the image. Measured from the start of a run alone, it cut every run
    /// where the origin needs longer than this to send one (32 members at
    /// 5 mbit in the simulator sent the image 44 times and never finished);
    /// bytes moving now keep a run alive.
    pub origin_stall_ms: u64,
    /// Stalls after which a peer is benched.
    pub max_stalls: u32,
    /// How long a peer that stalled `max_stalls` times gets no requests.
    pub stall_bench_ms: u64,
    /// The first back-off after a peer answered `Busy` — the usual time a
    /// chunk takes here, within `busy_backoff_min_ms..=busy_backoff_ms` (this
    /// until a chunk has arrived); it doubles while the peer stays busy, up
    /// to 4 times that (16 times idled 100 mbit members for seconds behind
    /// the holders of a layer's last chunks). In the simulator a fixed 200 ms idled members of a
    /// 300-member 10 gbit swarm, where chunks take a millisecond, behind
    /// busy holders: 5.3× the bound against 3.5× with 50 ms.
    pub busy_backoff_ms: u64,
    /// The shortest first back-off after `Busy`.
    pub busy_backoff_min_ms: u64,
    /// Chunks after the client's position that are fetched in order first.
    pub urgent_window: u32,
    /// Missing chunks at or below which in-flight chunks are duplicated.
    pub endgame_chunks: u32,
    /// The least time a request must have been outstanding before the
    /// endgame duplicates it (so small blobs are not fetched twice by
    /// default); longer when chunks usually take longer here.
    pub endgame_after_ms: u64,
    /// Chunks asked for in one lease request, and so the longest origin
    /// run. Short runs keep the origin's link busy to the end: in the
    /// shaped lab (8 members at 25 mbit) batches of 16 chunks left the last
    /// few runs trickling for 2–4 s after the others were done (1.43–2.0×
    /// the bound), batches of 4 finished the origin's part 1.5 s sooner
    /// (1.32–1.35×); 2 measured the same as 4 with twice the lease calls.
    pub lease_batch: u32,
    /// How often leases of chunks still in flight from the origin are
    /// renewed (well inside the tracker's lease lifetime, 3 s by default:
    /// a lessee that dies holds its chunks that long at most).
    pub lease_renew_ms: u64,
    /// How often to refresh holders and hashes while waiting for chunks.
    pub lookup_interval_ms: u64,
    /// How soon to look up again when that is worth it: a peer holds
    /// chunks this node lacks whose hashes it has not learned (a watched
    /// peer just stored them; they cannot be asked for before their hash is
    /// known), or the tracker leased the chunks this node asked for to
    /// others (a lookup names them, to be watched). At 10 gbit new hashes
    /// come in every millisecond: in the simulator (300 members, 5 × 200
    /// MiB, the tracker's lease cap at 16 MiB) 50 ms took 1.29× the bound,
    /// 100 ms 1.39×, 25 ms no better than 50 with twice the lookups.
    pub hurried_lookup_ms: u64,
    /// Origin failures (after the origin client's own retries) before the
    /// download gives up.
    pub max_origin_failures: u32,
    /// With no chunk arriving for this long, chunks no peer can serve go to
    /// the origin without a lease: a lease the tracker keeps refusing (its
    /// holder excluded here, say) must not stall the download.
    pub orphan_after_ms: u64,
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            peer_depth: 4,
            max_peers: 64,
            max_inflight: 32,
            min_inflight: 4,
            origin_requests: 2,
            origin_run: 64,
            stall_ms: 5_000,
            stall_floor_ms: 1_000,
            origin_stall_ms: 30_000,
            max_stalls: 2,
            stall_bench_ms: 10_000,
            busy_backoff_ms: 200,
            busy_backoff_min_ms: 10,
            urgent_window: 4,
            endgame_chunks: 4,
            endgame_after_ms: 300,
            lease_batch: 4,
            lease_renew_ms: 1_000,
            lookup_interval_ms: 500,
            hurried_lookup_ms: 50,
            max_origin_failures: 3,
            orphan_after_ms: 5_000,
        }
    }
}

/// Where a chunk comes from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source<P> {
    /// A peer of the swarm.
    Peer(P),
    /// The origin registry (under a lease, or with the tracker down).
    Origin,
}

/// How a chunk request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The bytes arrived and were verified (from a peer: against the chunk
    /// hash; from the origin: hashed by this node) and stored.
    Verified,
    /// A peer sent bytes that failed verification.
    Bad,
    /// The peer does not have the chunk.
    DontHave,
    /// The peer's upload slots are full: try later or elsewhere.
    Busy,
    /// The request failed (connection lost, timeout, refused).
    Failed,
}

/// What the driver tells the scheduler.
#[derive(Debug, Clone)]
pub enum Event<P> {
    /// A peer holds these chunks (from a tracker lookup or the peer itself);
    /// replaces what was known of it.
    PeerHas {
        /// The peer.
        peer: P,
        /// Its chunks.
        have: Bitfield,
    },
    /// A peer left or is unreachable.
    PeerGone {
        /// The peer.
        peer: P,
    },
    /// These chunk hashes are known, and no others: replaces what was
    /// known (the tracker withdraws hashes when their publisher turns out to
    /// be bad, and a chunk must not be asked of a peer without one).
    HashesKnown(Bitfield),
    /// A request ended.
    Chunk {
        /// Who was asked.
        source: Source<P>,
        /// Which chunk.
        chunk: u32,
        /// How it went.
        outcome: Outcome,
    },
    /// The tracker granted origin leases on these chunks (maybe none).
    LeaseGranted(Vec<u32>),
    /// A lease request got no answer (tracker down, unreachable, or it
    /// refused): leases held stay as they were.
    LeaseFailed,
    /// Chunks other members are fetching from the origin under a lease
    /// (from a lookup); replaces what was known. The origin is not asked
    /// for them while their lessees are alive.
    LeasedElsewhere(Bitfield),
    /// The peer sits in this node's rack (from a lookup): it is asked
    /// first, and a chunk it holds is not fetched from outside the rack.
    Near(P),
    /// Chunks some member holds with a published hash, named to this node
    /// or not (from a lookup); replaces what was known. The tracker leases
    /// none of them, so none is asked for.
    Served(Bitfield),
    /// A lookup answered (holders and hashes were fed as events).
    LookedUp,
    /// The tracker became unreachable (`true`) or reachable again.
    TrackerDown(bool),
    /// The client is reading from this chunk on.
    Want(u32),
    /// Bytes of `chunk` are arriving on its request to `source`: the
    /// request is alive, however slowly it goes. Its stall deadline (and
    /// those of the chunks queued behind it on the same request) restarts
    /// from now. Drivers report this at most every [`PROGRESS_MS`] per
    /// request, and only while bytes move: a stall then means nothing moved
    /// for a stall period, not that a chunk took longer than usual — on a
    /// congested link every chunk takes longer than usual. A peer's
    /// request is kept alive this way for at most [`PROGRESS_CAP`] times
    /// its first allowance (a peer trickling bytes must not hold chunks
    /// forever); the origin's, as long as bytes come.
    Progress {
        /// Who is sending.
        source: Source<P>,
        /// The chunk whose bytes are arriving.
        chunk: u32,
    },
}

/// How often, at most, a driver reports [`Event::Progress`] for one request
/// (milliseconds). Well under the least stall period (`stall_floor_ms`).
pub const PROGRESS_MS: u64 = 250;

/// Progress keeps a peer request alive for at most this many times the
/// allowance it started with.
pub const PROGRESS_CAP: u64 = 4;

/// What the scheduler asks the driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<P> {
    /// Ask a peer for these chunks (one request, in this order).
    FetchPeer {
        /// The peer.
        peer: P,
        /// The chunks.
        chunks: Vec<u32>,
    },
    /// Fetch these contiguous chunks from the origin with one Range request.
    FetchOrigin {
        /// The chunks, ascending and contiguous.
        chunks: Vec<u32>,
    },
    /// Ask the tracker for origin leases, preferring `from` onward.
    Lease {
        /// Preferred first chunk.
        from: u32,
        /// How many at most.
        max: u32,
    },
    /// Refresh holders and chunk hashes from the tracker.
    Lookup,
    /// Stop waiting for a request (the chunk is asked elsewhere or arrived).
    Cancel {
        /// Who was asked.
        source: Source<P>,
        /// Which chunk.
        chunk: u32,
    },
    /// A peer stalled `max_stalls` times and was benched: tell the tracker.
    /// Once enough members say so, the tracker forgets the peer unless it
    /// announces soon, so a dead holder's chunks can be leased to one live
    /// member rather than waited on.
    Unresponsive {
        /// The peer.
        peer: P,
    },
    /// Every chunk is here: check the whole digest.
    Complete,
    /// The origin keeps failing: give up this download.
    GiveUp,
}

#[derive(Debug)]
struct PeerState {
    have: Bitfield,
    inflight: u32,
    stalls: u32,
    /// Sent bad data: out for this blob.
    excluded: bool,
    /// Benched after stalls until then (0: not benched).
    benched_until: u64,
    /// Back from the bench: one chunk at a time until one arrives.
    probation: bool,
    /// Answered `Busy`: no requests before then.
    busy_until: u64,
    /// `Busy` answers in a row.
    busy_streak: u32,
    /// In this node's rack.
    near: bool,
}

impl PeerState {
    fn new(layout: &ChunkLayout) -> Self {
        PeerState {
            have: Bitfield::for_layout(layout),
            inflight: 0,
            stalls: 0,
            excluded: false,
            benched_until: 0,
            probation: false,
            busy_until: 0,
            busy_streak: 0,
            near: false,
        }
    }

    /// Whether its chunks count as available (neither excluded nor benched).
    fn counted(&self) -> bool {
        !self.excluded && self.benched_until == 0
    }

    /// Whether it may be sent another request at `now`.
    fn open(&self, now: u64, depth: u32) -> bool {
        let depth = if self.probation { 1 } else { depth };
        self.counted() && now >= self.busy_until && self.inflight < depth
    }
}

/// The peers of one download, in one vector sorted by id: every pass walks
/// them all, and at the 64 peers a download keeps a vector keeps that walk
/// contiguous (lookups are a binary search).
#[derive(Debug)]
struct PeerTable<P> {
    entries: Vec<(P, PeerState)>,
}

impl<P> Default for PeerTable<P> {
    fn default() -> Self {
        PeerTable {
            entries: Vec::new(),
        }
    }
}

impl<P: Ord> PeerTable<P> {
    fn find(&self, peer: &P) -> Result<usize, usize> {
        self.entries.binary_search_by(|(p, _)| p.cmp(peer))
    }

    fn contains_key(&self, peer: &P) -> bool {
        self.find(peer).is_ok()
    }

    fn get(&self, peer: &P) -> Option<&PeerState> {
        self.find(peer).ok().map(|i| &self.entries[i].1)
    }

    fn get_mut(&mut self, peer: &P) -> Option<&mut PeerState> {
        self.find(peer).ok().map(|i| &mut self.entries[i].1)
    }

    fn get_or_insert_with(&mut self, peer: P, new: impl FnOnce() -> PeerState) -> &mut PeerState {
        let i = match self.find(&peer) {
            Ok(i) => i,
            Err(i) => {
                self.entries.insert(i, (peer, new()));
                i
            }
        };
        &mut self.entries[i].1
    }

    fn remove(&mut self, peer: &P) -> Option<PeerState> {
        self.find(peer).ok().map(|i| self.entries.remove(i).1)
    }

    /// In id order.
    fn iter(&self) -> impl Iterator<Item = (&P, &PeerState)> {
        self.entries.iter().map(|(p, s)| (p, s))
    }

    fn values(&self) -> impl Iterator<Item = &PeerState> {
        self.entries.iter().map(|(_, s)| s)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut PeerState> {
        self.entries.iter_mut().map(|(_, s)| s)
    }
}

#[derive(Debug, Clone)]
struct Request<P> {
    source: Source<P>,
    started: u64,
    deadline: u64,
    /// Progress extends `deadline` up to this (see [`Event::Progress`]).
    limit: u64,
    /// Position in its request (chunks of one request arrive in order).
    pos: u32,
}

/// The scheduler of one blob download. `P` identifies peers.
#[derive(Debug)]
pub struct Scheduler<P> {
    cfg: SchedConfig,
    layout: ChunkLayout,
    have: Bitfield,
    known: Bitfield,
    /// Live, non-excluded peers holding each chunk.
    avail: Vec<u32>,
    peers: PeerTable<P>,
    inflight: BTreeMap<u32, Vec<Request<P>>>,
    peer_inflight: u32,
    leased: Bitfield,
    /// Chunks leased to other members, as of the last lookup.
    elsewhere: Bitfield,
    /// Chunks some member serves, as of the last lookup.
    served: Bitfield,
    /// Some peer was ever in this node's rack (what near peers hold is
    /// then weighed in each pass).
    any_near: bool,
    /// Chunks held by peers excluded here (they sent bad data): the tracker
    /// may still list them as served, so it will not lease them.
    unusable: Bitfield,
    origin_inflight: u32,
    /// Origin runs in flight: run id → chunks of it still outstanding.
    origin_runs: BTreeMap<u64, u32>,
    /// Which run an origin chunk in flight belongs to.
    origin_run_of: BTreeMap<u32, u64>,
    next_run: u64,
    origin_failures: u32,
    lease_pending: bool,
    /// The pending lease request only renews leases held.
    renewing: bool,
    /// After a grant that left chunks without any source, when to ask again.
    lease_retry_at: u64,
    /// Lease requests in a row that got nothing new.
    lease_refusals: u32,
    /// When leases were last asked for (granted or renewed).
    last_lease: u64,
    lookup_pending: bool,
    last_lookup: Option<u64>,
    /// Orders equally rare chunks ([`Scheduler::set_tie_seed`]; by index
    /// without one).
    tie_seed: Option<u64>,
    /// The session's smoothed round trip to the tracker (ms; 0 unknown).
    tracker_rtt_ms: u64,
    /// A pass over the peers may find something new: set by every event
    /// that can open a peer, free a request or add a wanted chunk a peer
    /// holds, and cleared by the pass.
    pass_due: bool,
    /// No peer backing off after `Busy` opens again before this (a pass is
    /// due then).
    reopen_at: u64,
    /// No request in flight stalls before this (it may lag low: a request
    /// that completed is found gone at the next look).
    stall_due: u64,
    /// No benched peer comes back before this.
    next_unbench: u64,
    /// A lookup soon is worth it (cleared by each lookup): a peer holds
    /// chunks this node lacks whose hashes are unknown here, or the tracker
    /// leased the chunks asked for to others, whom a lookup names.
    hurry: bool,
    /// `hurry` was set while a lookup was on its way: that lookup's answer
    /// predates the reason, so it does not clear it.
    hurry_again: bool,
    want: u32,
    tracker_down: bool,
    /// When a chunk last arrived, or bytes of one were reported moving
    /// (or the download started).
    last_progress: u64,
    /// Moving average of the time one chunk takes from a peer here.
    chunk_ms: Option<u64>,
    /// This node's downloads running now, this one included.
    downloads: u32,
    /// The latest time seen in `handle` or `poll`.
    now: u64,
    queue: VecDeque<Action<P>>,
    finished: bool,
}

impl<P: Ord + Clone + Debug> Scheduler<P> {
    /// A download of a blob with this layout, starting with the chunks in
    /// `have` (resumed from the store).
    pub fn new(cfg: SchedConfig, layout: ChunkLayout, have: Bitfield) -> Self {
        let n = layout.count();
        let mut have = have;
        if have.len() != n {
            have = Bitfield::for_layout(&layout);
        }
        Scheduler {
            cfg,
            layout,
            have,
            known: Bitfield::for_layout(&layout),
            avail: vec![0; n as usize],
            peers: PeerTable::default(),
            inflight: BTreeMap::new(),
            peer_inflight: 0,
            leased: Bitfield::for_layout(&layout),
            elsewhere: Bitfield::for_layout(&layout),
            served: Bitfield::for_layout(&layout),
            any_near: false,
            unusable: Bitfield::for_layout(&layout),
            origin_inflight: 0,
            origin_runs: BTreeMap::new(),
            origin_run_of: BTreeMap::new(),
            next_run: 0,
            origin_failures: 0,
            lease_pending: false,
            renewing: false,
            lease_retry_at: 0,
            lease_refusals: 0,
            last_lease: 0,
            lookup_pending: false,
            last_lookup: None,
            hurry: false,
            hurry_again: false,
            tie_seed: None,
            tracker_rtt_ms: 0,
            pass_due: true,
            reopen_at: u64::MAX,
            stall_due: u64::MAX,
            next_unbench: u64::MAX,
            want: 0,
            tracker_down: false,
            last_progress: 0,
            chunk_ms: None,
            downloads: 1,
            now: 0,
            queue: VecDeque::new(),
            finished: false,
        }
    }

    /// Orders equally rare chunks by `seed` (each member its own, such as a
    /// hash of its name and the blob) rather than by index.
    pub fn set_tie_seed(&mut self, seed: u64) {
        self.tie_seed = Some(seed);
    }

    /// Tells the scheduler its round trip to the tracker (ms, smoothed).
    pub fn set_tracker_rtt(&mut self, ms: u64) {
        self.tracker_rtt_ms = ms;
    }

    /// Tells the scheduler how many downloads this node runs now (this one
    /// included; at least 1): they share [`SchedConfig::max_inflight`].
    pub fn set_downloads(&mut self, downloads: u32) {
        let downloads = downloads.max(1);
        if downloads < self.downloads {
            // Room for more requests.
            self.pass_due = true;
        }
        self.downloads = downloads;
    }

    /// `peer` answered `Busy` and said when it expects a slot for this node
    /// ([`crate::slots`]): no requests go to it before `until` (ms), in
    /// place of the back-off guessed from this node's chunk time, and never
    /// later than the longest such back-off.
    pub fn busy_until(&mut self, peer: &P, until: u64) {
        let longest = self.cfg.busy_backoff_ms << (BUSY_STEPS - 1);
        if let Some(state) = self.peers.get_mut(peer) {
            state.busy_until = until.clamp(self.now + 1, self.now + longest);
            self.reopen_at = self.reopen_at.min(state.busy_until);
        }
    }

    /// Chunks in flight from peers allowed now: this download's share.
    pub fn inflight_limit(&self) -> u32 {
        let max = self.cfg.max_inflight;
        (max / self.downloads).clamp(self.cfg.min_inflight.min(max), max)
    }

    /// Chunks verified and stored so far.
    pub fn have(&self) -> &Bitfield {
        &self.have
    }

    /// The blob's layout.
    pub fn layout(&self) -> &ChunkLayout {
        &self.layout
    }

    /// Whether a peer was excluded for this blob (it sent bad data).
    pub fn is_excluded(&self, peer: &P) -> bool {
        self.peers.get(peer).is_some_and(|p| p.excluded)
    }

    /// What a peer is known to hold.
    pub fn peer_have(&self, peer: &P) -> Option<&Bitfield> {
        self.peers.get(peer).map(|p| &p.have)
    }

    /// Whether a peer is benched after stalls (excluded or not).
    pub fn is_benched(&self, peer: &P) -> bool {
        self.peers.get(peer).is_some_and(|p| p.benched_until > 0)
    }

    /// Feeds an event.
    pub fn handle(&mut self, now: u64, event: Event<P>) {
        self.now = self.now.max(now);
        if !matches!(event, Event::PeerHas { .. } | Event::Progress { .. }) {
            self.pass_due = true;
        }
        match event {
            Event::PeerHas { peer, have } => {
                if have.len() != self.layout.count() {
                    return;
                }
                if !self.peers.contains_key(&peer) && !self.make_room() {
                    return;
                }
                // Only news of chunks this node can ask for is worth a
                // pass: most bitfields (lookups, watch frames) bring none.
                let old = self.peers.get(&peer).map(|s| &s.have);
                if old.is_none_or(|old| have.has_any_outside(old, &self.have)) {
                    self.pass_due = true;
                }
                let layout = self.layout;
                let state = self
                    .peers
                    .get_or_insert_with(peer, || PeerState::new(&layout));
                if state.excluded {
                    self.unusable.union_with(&have);
                    return;
                }
                if state.counted() {
                    for (i, on) in state.have.changes(&have) {
                        if on {
                            self.avail[i as usize] += 1;
                        } else {
                            self.avail[i as usize] -= 1;
                        }
                    }
                }
                let news = have.has_any_outside(&self.known, &self.have);
                state.have = have;
                if news {
                    self.hurry_up();
                }
            }
            Event::PeerGone { peer } => self.drop_peer(&peer, true),
            Event::HashesKnown(bits) => {
                if bits.len() == self.known.len() {
                    self.known = bits;
                }
            }
            Event::Chunk {
                source,
                chunk,
                outcome,
            } => self.on_chunk(source, chunk, outcome),
            Event::LeaseGranted(chunks) => self.lease_answer(now, Some(chunks)),
            Event::LeaseFailed => self.lease_answer(now, None),
            Event::LeasedElsewhere(bits) => {
                if bits.len() == self.layout.count() {
                    self.elsewhere = bits;
                }
            }
            Event::Near(peer) => {
                if let Some(state) = self.peers.get_mut(&peer) {
                    state.near = true;
                    self.any_near = true;
                }
            }
            Event::Served(bits) => {
                if bits.len() == self.layout.count() {
                    self.served = bits;
                }
            }
            Event::LookedUp => {
                self.lookup_pending = false;
                self.last_lookup = Some(now);
                self.hurry = std::mem::take(&mut self.hurry_again);
            }
            Event::TrackerDown(down) => {
                self.tracker_down = down;
                if down {
                    self.lease_pending = false;
                    self.lookup_pending = false;
                }
            }
            Event::Want(chunk) => self.want = chunk.min(self.layout.count().saturating_sub(1)),
            Event::Progress { source, chunk } => self.progress(now, &source, chunk),
        }
    }

    /// Bytes of `chunk` are arriving from `source`: its request, and the
    /// chunks after it on the same request (which come in order), get their
    /// stall periods again from now.
    fn progress(&mut self, now: u64, source: &Source<P>, chunk: u32) {
        let Some(head) = self
            .inflight
            .get(&chunk)
            .and_then(|reqs| reqs.iter().find(|r| r.source == *source))
        else {
            return;
        };
        self.last_progress = self.last_progress.max(now);
        let (started, pos) = (head.started, head.pos);
        let run = match source {
            Source::Origin => self.origin_run_of.get(&chunk).copied(),
            Source::Peer(_) => None,
        };
        let period = self.stall_period(source);
        // Chunks of one request: a peer's are those asked at the same time
        // (one request per peer per pass); the origin's, its run's.
        for (c, reqs) in self.inflight.iter_mut() {
            for r in reqs.iter_mut().filter(|r| r.source == *source) {
                let same = match source {
                    Source::Origin => run.is_some() && self.origin_run_of.get(c) == run.as_ref(),
                    Source::Peer(_) => r.started == started,
                };
                if !same || r.pos < pos {
                    continue;
                }
                let due = now.saturating_add(period.saturating_mul(u64::from(r.pos - pos) + 1));
                r.deadline = r.deadline.max(due.min(r.limit));
            }
        }
    }

    /// The answer to a lease request: the chunks granted, or `None` if it
    /// got none.
    fn lease_answer(&mut self, now: u64, granted: Option<Vec<u32>>) {
        self.lease_pending = false;
        let answered = granted.is_some();
        let chunks = granted.unwrap_or_default();
        if self.renewing && answered {
            // A lease the renewal left out ran out at the tracker
            // (maybe another member has it now): a chunk not yet
            // asked of the origin must not be, unless leased again.
            // The simulator caught a member fetching such a chunk
            // seconds after another had.
            let lost: Vec<u32> = self
                .held_leases()
                .filter(|c| !chunks.contains(c) && !self.origin_fetching(*c))
                .collect();
            for c in lost {
                let _ = self.leased.clear(c);
            }
        }
        let mut fresh = 0;
        for c in chunks {
            if c < self.layout.count() && !self.have.get(c) && !self.leased.get(c) {
                let _ = self.leased.set(c);
                fresh += 1;
            }
        }
        // Nothing new granted (at most the leases held already renewed):
        // the rest is someone else's lease or served, or the blob has all
        // the leases the tracker gives at once. Ask again after a hurried
        // lookup's gap (a lessee between two runs finds the others holding
        // them all only for a moment: waiting a whole lookup interval left
        // the origin's link idle), doubling while refused up to a lookup
        // interval (most members never get a lease). Asking at once would
        // loop on the tracker: the simulator caught members sending
        // thousands of lease requests a second that way. Not sooner than
        // the tracker's round trip either (below).
        if fresh > 0 {
            self.lease_refusals = 0;
        } else if !self.renewing {
            self.hurry_up();
            let first = self.cfg.hurried_lookup_ms.min(self.cfg.lookup_interval_ms);
            let gap = first
                .saturating_mul(1 << self.lease_refusals.min(16))
                .min(self.cfg.lookup_interval_ms);
            // Not sooner than the tracker answers: a refusal is a round
            // trip old when it comes, and a member asking faster than its
            // answers come keeps a slow tracker's queue long (10,000
            // members: 142k lease requests a pull without this, 127k with).
            let gap = gap.max(self.tracker_rtt_ms);
            self.lease_refusals += 1;
            self.lease_retry_at = now + gap;
        }
    }

    fn on_chunk(&mut self, source: Source<P>, chunk: u32, outcome: Outcome) {
        self.settle(source, chunk, outcome, false);
    }

    /// What came of a request (`stalled`: this scheduler gave up waiting,
    /// nothing failed).
    fn settle(&mut self, source: Source<P>, chunk: u32, outcome: Outcome, stalled: bool) {
        if chunk >= self.layout.count() {
            return;
        }
        // Was this request still outstanding?
        let pos = self
            .inflight
            .get(&chunk)
            .and_then(|reqs| reqs.iter().position(|r| r.source == source));
        let Some(pos) = pos else {
            // A late answer (its request was moved or cancelled). Verified
            // bytes are stored all the same: keep them rather than fetch
            // them again.
            if outcome == Outcome::Verified && !self.have.get(chunk) {
                self.arrived(chunk);
            }
            return;
        };
        let req = self.inflight.get_mut(&chunk).expect("found").remove(pos);
        let run = match source {
            Source::Origin => self.origin_run_of.get(&chunk).copied(),
            Source::Peer(_) => None,
        };
        self.release(&source, chunk);
        match (&source, outcome) {
            (_, Outcome::Verified) => {
                if let Source::Peer(p) = &source {
                    if let Some(state) = self.peers.get_mut(p) {
                        state.probation = false;
                        state.busy_streak = 0;
                    }
                    // Chunks of one request arrive one after another.
                    let sample = self.now.saturating_sub(req.started) / u64::from(req.pos + 1);
                    self.chunk_ms = Some(match self.chunk_ms {
                        None => sample,
                        Some(avg) => (avg * 7 + sample) / 8,
                    });
                }
                self.arrived(chunk);
            }
            (Source::Peer(p), Outcome::Bad) => {
                // Bad data: this peer is out for this blob.
                let p = p.clone();
                self.exclude(&p);
            }
            (Source::Peer(p), Outcome::DontHave) => {
                if let Some(state) = self.peers.get_mut(p) {
                    if !state.excluded && state.have.get(chunk) {
                        let _ = state.have.clear(chunk);
                        self.avail[chunk as usize] -= 1;
                    }
                }
            }
            (Source::Peer(p), Outcome::Busy) => {
                let now = self.now;
                // Scaled to how long a chunk takes here: a peer's slots free
                // up in a chunk time or so, and at 10 gbit that is a
                // millisecond, not the 200 ms a slow link needs.
                let base = self.chunk_ms.map_or(self.cfg.busy_backoff_ms, |ms| {
                    ms.clamp(self.cfg.busy_backoff_min_ms, self.cfg.busy_backoff_ms)
                });
                if let Some(state) = self.peers.get_mut(p) {
                    // One back-off per refusal, however many chunks it named.
                    if state.busy_until <= now {
                        state.busy_streak = (state.busy_streak + 1).min(BUSY_STEPS);
                        state.busy_until = now + (base << (state.busy_streak - 1));
                        self.reopen_at = self.reopen_at.min(state.busy_until);
                    }
                }
            }
            (Source::Peer(p), Outcome::Failed) => {
                let p = p.clone();
                self.stalled(&p);
            }
            (Source::Origin, _) => {
                // The run's Range request is dead: abandon what is left of
                // it, and count one failure for the whole run — unless it
                // was only slow. A run still sending when the stall period
                // ran out is slow because the origin's link is shared (the
                // origin client fails one that sends nothing): counted, a
                // third cut gave the download up and a client's pull failed
                // in the lab (16 members at 10 mbit, 500 ms queues).
                if !stalled {
                    self.origin_failures += 1;
                }
                let rest: Vec<u32> = self
                    .origin_run_of
                    .iter()
                    .filter(|(_, r)| Some(**r) == run)
                    .map(|(c, _)| *c)
                    .collect();
                for c in rest {
                    if let Some(reqs) = self.inflight.get_mut(&c) {
                        reqs.retain(|r| r.source != Source::Origin);
                        if reqs.is_empty() {
                            self.inflight.remove(&c);
                        }
                    }
                    self.release(&Source::Origin, c);
                    self.queue.push_back(Action::Cancel {
                        source: Source::Origin,
                        chunk: c,
                    });
                }
            }
        }
        if self.inflight.get(&chunk).is_some_and(|r| r.is_empty()) {
            self.inflight.remove(&chunk);
        }
    }

    /// Chunk `chunk` is verified and stored: other requests for it (endgame
    /// duplicates, the one it was moved to) are no longer needed.
    fn arrived(&mut self, chunk: u32) {
        self.last_progress = self.last_progress.max(self.now);
        let _ = self.have.set(chunk);
        let _ = self.leased.clear(chunk);
        for other in self.inflight.remove(&chunk).unwrap_or_default() {
            self.release(&other.source, chunk);
            self.queue.push_back(Action::Cancel {
                source: other.source,
                chunk,
            });
        }
    }

    fn release(&mut self, source: &Source<P>, chunk: u32) {
        match source {
            Source::Origin => {
                self.origin_inflight -= 1;
                if let Some(run) = self.origin_run_of.remove(&chunk) {
                    let left = self.origin_runs.get_mut(&run).expect("run of a chunk");
                    *left -= 1;
                    if *left == 0 {
                        self.origin_runs.remove(&run);
                    }
                }
            }
            Source::Peer(p) => {
                self.peer_inflight -= 1;
                if let Some(state) = self.peers.get_mut(p) {
                    state.inflight -= 1;
                }
            }
        }
    }

    fn stalled(&mut self, peer: &P) {
        let bench = match self.peers.get_mut(peer) {
            Some(state) => {
                state.stalls += 1;
                // On probation one stall is enough.
                (state.stalls >= self.cfg.max_stalls || state.probation) && state.counted()
            }
            None => false,
        };
        if bench {
            self.bench(peer);
        }
    }

    /// Takes a peer that keeps stalling out of play for `stall_bench_ms`:
    /// its chunks stop counting as available (so the origin may step in)
    /// and what it was asked for goes elsewhere.
    fn bench(&mut self, peer: &P) {
        let until = self.now + self.cfg.stall_bench_ms.max(1);
        let Some(state) = self.peers.get_mut(peer) else {
            return;
        };
        for i in state.have.iter_ones() {
            self.avail[i as usize] -= 1;
        }
        state.benched_until = until;
        state.stalls = 0;
        self.next_unbench = self.next_unbench.min(until);
        self.cancel_all(peer);
        if !self.tracker_down {
            self.queue
                .push_back(Action::Unresponsive { peer: peer.clone() });
        }
    }

    /// Takes back peers whose bench time is over, on probation; returns
    /// whether there were any.
    fn unbench(&mut self, now: u64) -> bool {
        if now < self.next_unbench {
            return false;
        }
        self.next_unbench = u64::MAX;
        let mut any = false;
        for state in self.peers.values_mut() {
            if state.benched_until > now && !state.excluded {
                self.next_unbench = self.next_unbench.min(state.benched_until);
            }
            if state.benched_until > 0 && now >= state.benched_until && !state.excluded {
                state.benched_until = 0;
                state.probation = true;
                for i in state.have.iter_ones() {
                    self.avail[i as usize] += 1;
                }
                any = true;
            }
        }
        any
    }

    /// Makes room for one more peer under `max_peers` (excluded peers do
    /// not count: they stay, to stay excluded): drops the idle peer — no
    /// request in flight, not benched, not backing off — with the fewest
    /// chunks still needed here. False if every peer is busy.
    fn make_room(&mut self) -> bool {
        let live = self.peers.values().filter(|p| !p.excluded).count();
        if live < self.cfg.max_peers as usize {
            return true;
        }
        let now = self.now;
        let victim = self
            .peers
            .iter()
            .filter(|(_, s)| {
                !s.excluded && s.inflight == 0 && s.benched_until == 0 && s.busy_until <= now
            })
            .map(|(p, s)| (s.have.difference(&self.have).count(), p))
            .min_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(a.1)))
            .map(|(_, p)| p.clone());
        let Some(victim) = victim else {
            return false;
        };
        let state = self.peers.remove(&victim).expect("listed");
        for i in state.have.iter_ones() {
            self.avail[i as usize] -= 1;
        }
        true
    }

    fn exclude(&mut self, peer: &P) {
        if let Some(state) = self.peers.get(peer) {
            self.unusable.union_with(&state.have);
        }
        self.drop_peer(peer, false);
    }

    /// Forgets what `peer` holds and cancels what it was asked for. With
    /// `forget`, it may come back with a new `PeerHas`; otherwise it stays
    /// excluded for this blob.
    fn drop_peer(&mut self, peer: &P, forget: bool) {
        let Some(state) = self.peers.get_mut(peer) else {
            return;
        };
        if state.counted() {
            for i in state.have.iter_ones() {
                self.avail[i as usize] -= 1;
            }
        }
        state.excluded = true;
        state.have = Bitfield::for_layout(&self.layout);
        self.cancel_all(peer);
        if forget {
            self.peers.remove(peer);
        }
    }

    /// Cancels every request outstanding at `peer`.
    fn cancel_all(&mut self, peer: &P) {
        let source = Source::Peer(peer.clone());
        let chunks: Vec<u32> = self
            .inflight
            .iter()
            .filter(|(_, reqs)| reqs.iter().any(|r| r.source == source))
            .map(|(c, _)| *c)
            .collect();
        for c in chunks {
            let reqs = self.inflight.get_mut(&c).expect("listed");
            reqs.retain(|r| r.source != source);
            if reqs.is_empty() {
                self.inflight.remove(&c);
            }
            self.release(&source, c);
            self.queue.push_back(Action::Cancel {
                source: source.clone(),
                chunk: c,
            });
        }
    }

    /// When a request may be duplicated in the endgame: after twice the
    /// usual time for its place in its request, and not before
    /// `endgame_after_ms`.
    fn dup_at(&self, r: &Request<P>) -> u64 {
        let usual = self.chunk_ms.unwrap_or(0) * u64::from(r.pos + 1);
        r.started + self.cfg.endgame_after_ms.max(2 * usual)
    }

    /// The earliest time at which [`poll`](Self::poll) has something new to
    /// do without a new event (a stall deadline or a lookup refresh).
    pub fn next_deadline(&self) -> Option<u64> {
        if self.finished {
            return None;
        }
        let missing = self.layout.count() - self.have.count();
        let endgame = missing <= self.cfg.endgame_chunks;
        let stall = self
            .inflight
            .values()
            .flat_map(|reqs| {
                reqs.iter().map(move |r| {
                    // A duplicate time already passed (no peer was free
                    // then) waits for an event, not a busy loop.
                    let dup = self.dup_at(r);
                    if endgame
                        && reqs.len() < 2
                        && matches!(r.source, Source::Peer(_))
                        && dup > self.now
                    {
                        r.deadline.min(dup)
                    } else {
                        r.deadline
                    }
                })
            })
            .min();
        // Benched peers coming back, busy peers open again (both kept
        // as they change: a scan of the peers here ran after every event).
        let peers =
            Some(self.next_unbench.min(self.reopen_at)).filter(|&t| t > self.now && t < u64::MAX);
        let stall = match (stall, peers) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let waiting = !self.tracker_down && self.waiting_on_others();
        let lookup = (waiting && !self.lookup_pending)
            .then(|| self.last_lookup.map(|t| t + self.lookup_gap()))
            .flatten();
        // Only while still ahead: once passed, poll has decided whether to
        // lease (an origin request may be busy), and a deadline in the past
        // would have the driver spin until an event.
        let lease = (waiting && !self.lease_pending && self.lease_retry_at > self.now)
            .then_some(self.lease_retry_at);
        let lookup = match (lookup, lease) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let renew =
            (!self.tracker_down && !self.lease_pending && self.held_leases().next().is_some())
                .then_some(self.last_lease + self.cfg.lease_renew_ms);
        let lookup = match (lookup, renew) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // When waiting chunks may go to the origin without a lease (once
        // each time: after that, only events change the answer).
        let first_orphan_at = self.last_progress + self.cfg.orphan_after_ms;
        let orphans = waiting
            .then(|| {
                // No orphan time comes before this: wake then and look
                // (a scan of every chunk on every call cost a third of the
                // simulator's time at 100 members).
                if self.now < first_orphan_at {
                    return Some(first_orphan_at);
                }
                let mut orphans = (0..self.layout.count())
                    .filter(|&c| self.stuck_orphan(c))
                    .peekable();
                // Most calls have none: no bitfield of benched holdings then.
                orphans.peek()?;
                let benched = self.benched_holdings();
                orphans
                    .map(|c| self.orphan_at(c, &benched))
                    .filter(|&t| t > self.now)
                    .min()
            })
            .flatten();
        let lookup = match (lookup, orphans) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match (stall, lookup) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next thing to do now, if any. Call until `None`.
    pub fn poll(&mut self, now: u64) -> Option<Action<P>> {
        self.now = self.now.max(now);
        if let Some(a) = self.queue.pop_front() {
            return Some(a);
        }
        if self.finished {
            return None;
        }
        if self.have.is_full() {
            self.finished = true;
            return Some(Action::Complete);
        }
        if self.origin_failures >= self.cfg.max_origin_failures {
            self.finished = true;
            return Some(Action::GiveUp);
        }
        if self.expire_stalls(now) | self.unbench(now) {
            self.pass_due = true;
        }
        if now >= self.reopen_at {
            // A peer backing off is open again.
            self.pass_due = true;
            self.reopen_at = self
                .peers
                .values()
                .filter(|s| s.counted() && s.busy_until > now)
                .map(|s| s.busy_until)
                .min()
                .unwrap_or(u64::MAX);
        }
        if let Some(a) = self.queue.pop_front() {
            return Some(a);
        }
        if let Some(a) = self.next_peer_request(now) {
            return Some(a);
        }
        if let Some(a) = self.next_origin_fetch(now) {
            return Some(a);
        }
        if let Some(a) = self.next_endgame(now) {
            return Some(a);
        }
        if !self.tracker_down {
            // Lease just in time: only when the chunks leased so far are
            // all fetched or in flight and an origin request is free, so no
            // node hoards leases it cannot serve soon. The tracker lists a
            // node's own live leases first, so the request's budget covers
            // those in flight plus a fresh batch.
            let idle_leases = self.leased.iter_ones().any(|c| self.idle_missing(c));
            let origin_free = (self.origin_runs.len() as u32) < self.cfg.origin_requests;
            if !self.lease_pending && !idle_leases && origin_free && now >= self.lease_retry_at {
                if let Some(from) = self.first_orphan() {
                    let fetching = self.held_leases().count() as u32;
                    self.lease_pending = true;
                    self.renewing = false;
                    self.last_lease = now;
                    return Some(Action::Lease {
                        from,
                        max: self.cfg.lease_batch + fetching,
                    });
                }
            }
            if !self.lease_pending && now >= self.last_lease + self.cfg.lease_renew_ms {
                let fetching: Vec<u32> = self.held_leases().collect();
                if let Some(&from) = fetching.first() {
                    self.lease_pending = true;
                    self.renewing = true;
                    self.last_lease = now;
                    return Some(Action::Lease {
                        from,
                        max: fetching.len() as u32,
                    });
                }
            }
            let due = self
                .last_lookup
                .is_none_or(|t| now >= t + self.lookup_gap());
            if !self.lookup_pending && due && self.waiting_on_others() {
                self.lookup_pending = true;
                self.hurry_again = false;
                return Some(Action::Lookup);
            }
        }
        None
    }

    /// A lookup soon is worth it (after the one on its way, if any).
    fn hurry_up(&mut self) {
        self.hurry = true;
        if self.lookup_pending {
            self.hurry_again = true;
        }
    }

    /// Time between lookups: shorter while one soon is worth it.
    fn lookup_gap(&self) -> u64 {
        if self.hurry {
            // Hurried, but not sooner than the tracker answers (up to the
            // usual interval): at 10,000 members a tracker 0.6 s behind got
            // a fifth fewer lookups and the pull went from 3.33× the bound
            // to 2.98×.
            let hurried = self.cfg.hurried_lookup_ms.min(self.cfg.lookup_interval_ms);
            hurried.max(self.tracker_rtt_ms.min(self.cfg.lookup_interval_ms))
        } else {
            self.cfg.lookup_interval_ms
        }
    }

    /// Moves requests past their deadline; returns whether there were any.
    fn expire_stalls(&mut self, now: u64) -> bool {
        if now < self.stall_due {
            return false;
        }
        self.stall_due = self
            .inflight
            .values()
            .flatten()
            .map(|r| r.deadline)
            .min()
            .unwrap_or(u64::MAX);
        if now < self.stall_due {
            return false;
        }
        let mut expired: Vec<(u32, Source<P>)> = Vec::new();
        // A peer's chunks of one request come in order on one stream: when
        // one is overdue, those after it in the request cannot come first,
        // so they move now too (a dead peer costs one period, not one per
        // chunk it was asked for).
        let mut stuck: Vec<(P, u64, u32)> = Vec::new();
        for (c, reqs) in &self.inflight {
            for r in reqs.iter().filter(|r| r.deadline <= now) {
                expired.push((*c, r.source.clone()));
                if let Source::Peer(p) = &r.source {
                    stuck.push((p.clone(), r.started, r.pos));
                }
            }
        }
        if !stuck.is_empty() {
            for (c, reqs) in &self.inflight {
                for r in reqs.iter().filter(|r| r.deadline > now) {
                    if let Source::Peer(p) = &r.source {
                        if stuck.iter().any(|(q, started, pos)| {
                            q == p && *started == r.started && r.pos > *pos
                        }) {
                            expired.push((*c, r.source.clone()));
                        }
                    }
                }
            }
        }
        for (chunk, source) in expired {
            // Still outstanding? (A stalled origin chunk takes the rest of
            // its run with it, which may include later entries here.)
            let pending = self
                .inflight
                .get(&chunk)
                .is_some_and(|reqs| reqs.iter().any(|r| r.source == source));
            if !pending {
                continue;
            }
            self.queue.push_back(Action::Cancel {
                source: source.clone(),
                chunk,
            });
            self.settle(source, chunk, Outcome::Failed, true);
        }
        true
    }

    /// Chunks still needed and not being fetched: missing, not in flight.
    fn idle_missing(&self, c: u32) -> bool {
        !self.have.get(c) && !self.inflight.contains_key(&c)
    }

    /// Order in which missing chunks are considered: the urgent window after
    /// the client's position first, in order; then by rarity, equally rare
    /// ones in an order of this download's own ([`Scheduler::set_tie_seed`]),
    /// so members learning of the same chunks at once do not all ask for the
    /// same one first.
    fn priority(&self, c: u32) -> (u8, u32, u32, u32) {
        let urgent = c >= self.want && c < self.want.saturating_add(self.cfg.urgent_window);
        if urgent {
            (0, 0, 0, c)
        } else {
            let tie = self.tie_seed.map_or(c, |seed| tie(seed, c));
            (1, self.avail[c as usize], tie, c)
        }
    }

    /// Chunks a peer may be asked for now: hash known, missing, and not in
    /// flight from anyone.
    fn wanted(&self) -> Bitfield {
        let mut w = self.known.difference(&self.have);
        for &c in self.inflight.keys() {
            let _ = w.clear(c);
        }
        w
    }

    fn next_peer_request(&mut self, now: u64) -> Option<Action<P>> {
        // A pass with nothing changed since the last finds nothing new:
        // every open peer was filled then. (Most events of a big swarm
        // change nothing a pass looks at.)
        let limit = self.inflight_limit();
        if self.peer_inflight >= limit || !self.pass_due {
            return None;
        }
        self.pass_due = false;
        // Word-wise set operations: this runs after every event, and a scan
        // of every chunk of every peer was 40 % of the simulator's time
        // (and of a member's CPU) with a hundred peers.
        let wanted = self.wanted();
        // Most passes in a busy swarm find nothing a peer holds: say so
        // without walking the peers.
        if !wanted.iter_ones().any(|c| self.avail[c as usize] > 0) {
            return None;
        }
        // Peers in this rack first, then the least loaded; ties by id,
        // deterministically. Only those holding something wanted (usually
        // none or a few).
        let mut order: Vec<(bool, u32, P)> = self
            .peers
            .iter()
            .filter(|(_, s)| s.open(now, self.cfg.peer_depth) && s.have.intersects(&wanted))
            .map(|(p, s)| (!s.near, s.inflight, p.clone()))
            .collect();
        order.sort();
        // What the rack holds (near peers not benched or excluded, busy or
        // not) is not fetched from outside it: each chunk should cross the
        // rack's uplink about once, then spread inside.
        let near_have = self.any_near.then(|| {
            let mut h = Bitfield::for_layout(&self.layout);
            for s in self.peers.values().filter(|s| s.near && s.counted()) {
                h.union_with(&s.have);
            }
            h
        });
        // Every open peer is served in this one pass (each filled to its
        // depth, so a pass per peer would find the same order again).
        let mut wanted = wanted;
        let mut far_wanted: Option<Bitfield> = None;
        for (far, _, peer) in order {
            if self.peer_inflight >= limit || wanted.count() == 0 {
                break;
            }
            let Some(state) = self.peers.get(&peer) else {
                continue;
            };
            let pool = match (far, &near_have) {
                (true, Some(near)) => &*far_wanted.get_or_insert_with(|| wanted.difference(near)),
                _ => &wanted,
            };
            let depth = if state.probation {
                1
            } else {
                self.cfg.peer_depth
            };
            let room = (depth - state.inflight).min(limit - self.peer_inflight);
            // The `room` most urgent, then rarest, of what it can give:
            // kept in a small sorted list as its chunks go by (`room` is a
            // few; ranking every wanted chunk per pass cost more).
            let mut best: Vec<(u8, u32, u32, u32)> = Vec::with_capacity(room as usize + 1);
            for c in state.have.iter_and(pool) {
                let p = self.priority(c);
                if best.len() == room as usize && best.last().is_some_and(|&b| p >= b) {
                    continue;
                }
                let at = best.partition_point(|&b| b < p);
                best.insert(at, p);
                best.truncate(room as usize);
            }
            if best.is_empty() {
                continue;
            }
            let chunks: Vec<u32> = best.into_iter().map(|(_, _, _, c)| c).collect();
            for (k, &c) in chunks.iter().enumerate() {
                self.start(c, Source::Peer(peer.clone()), now, k as u32);
                let _ = wanted.clear(c);
                if let Some(f) = far_wanted.as_mut() {
                    let _ = f.clear(c);
                }
            }
            self.queue.push_back(Action::FetchPeer { peer, chunks });
        }
        self.queue.pop_front()
    }

    /// Records a request for `chunk` at position `pos` of its request: the
    /// chunks of one request arrive one after another, so the k-th may take
    /// k+1 stall periods before it counts as stalled.
    fn start(&mut self, chunk: u32, source: Source<P>, now: u64, pos: u32) {
        let period = self.stall_period(&source);
        let limit = match &source {
            Source::Origin => {
                self.origin_inflight += 1;
                u64::MAX
            }
            Source::Peer(p) => {
                self.peer_inflight += 1;
                if let Some(s) = self.peers.get_mut(p) {
                    s.inflight += 1;
                }
                now.saturating_add(period.saturating_mul(PROGRESS_CAP * (u64::from(pos) + 1)))
            }
        };
        let deadline = now + period * (u64::from(pos) + 1);
        self.stall_due = self.stall_due.min(deadline);
        self.inflight.entry(chunk).or_default().push(Request {
            source,
            started: now,
            deadline,
            limit,
            pos,
        });
    }

    /// How long a request to `source` may go without a chunk (or, with
    /// [`Event::Progress`], without bytes) before it counts as stalled.
    fn stall_period(&self, source: &Source<P>) -> u64 {
        match source {
            Source::Origin => self.cfg.origin_stall_ms,
            // On a slow link a healthy peer's chunk takes seconds (its
            // uplink split among its upload slots): a stall is then
            // several usual chunk times, not a fixed 5 s.
            Source::Peer(_) => match self.chunk_ms {
                Some(ms) => self.cfg.stall_floor_ms.max(ms.saturating_mul(STALL_CHUNKS)),
                None => self.cfg.stall_ms,
            },
        }
    }

    /// Whether some peer can serve chunk `c`: one holds it and its hash is
    /// known, so what it sends can be verified.
    fn peer_servable(&self, c: u32) -> bool {
        self.avail[c as usize] > 0 && self.known.get(c)
    }

    /// Whether the origin may serve chunk `c` now: leased to this node;
    /// (tracker down) held by no known peer; or a stuck orphan whose
    /// [`orphan_at`](Self::orphan_at) time has come (`benched`: what benched
    /// peers hold, from [`benched_holdings`](Self::benched_holdings)).
    fn origin_ok(&self, c: u32, benched: &Bitfield) -> bool {
        self.idle_missing(c)
            && (self.leased.get(c)
                || (self.tracker_down && !self.peer_servable(c))
                || (self.stuck_orphan(c) && self.now >= self.orphan_at(c, benched)))
    }

    /// Chunks that benched (not excluded) peers hold: servable again when
    /// their bench ends.
    fn benched_holdings(&self) -> Bitfield {
        let mut b = Bitfield::for_layout(&self.layout);
        for p in self.peers.values() {
            if !p.excluded && p.benched_until > 0 {
                b.union_with(&p.have);
            }
        }
        b
    }

    /// When orphan chunk `c` may go to the origin: `orphan_after_ms` after
    /// the last chunk arrived if only peers excluded here hold it (the
    /// tracker, which still lists them, will not lease it), or a bench
    /// period later if a benched peer holds it verifiably. A peer is benched
    /// for stalling, and under a saturated CPU live peers stall: sending
    /// their chunks to the origin at once fetched them twice (32 members on
    /// 2 cores, 3 % of the image). A holder that is really gone stalls again
    /// on probation and its chunks still reach the origin, one bench period
    /// later.
    ///
    /// A chunk that no peer known here holds at all is leasable at the
    /// tracker, which leases it to one member: going to the origin without
    /// a lease is then a last resort, two bench periods later (the tracker
    /// may know holders this node never heard of). Every member that waited
    /// on a lessee that froze used to fetch its chunks at once when the
    /// lease ran out — in the simulator, twice the image from the origin.
    ///
    /// A chunk the last lookup showed served (a live member holds it with
    /// a published hash) that no peer known here holds waits longer still,
    /// four bench periods: a lookup will name its holder. Where the origin
    /// is the bottleneck, no chunk arrives for a long time at a member
    /// without a lease while its lessees' runs crawl in; the moment they
    /// publish, the chunks were served before the lookup naming their
    /// holders came back, and 20 of 32 members fetched them from the origin
    /// again (1.2–1.34× the image at 5 mbit in the simulator).
    fn orphan_at(&self, c: u32, benched: &Bitfield) -> u64 {
        let wait = if self.unusable.get(c) {
            self.cfg.orphan_after_ms
        } else if benched.get(c) && self.known.get(c) {
            self.cfg.orphan_after_ms + self.cfg.stall_bench_ms
        } else if self.served.get(c) {
            self.cfg.orphan_after_ms + 4 * self.cfg.stall_bench_ms
        } else {
            self.cfg.orphan_after_ms + 2 * self.cfg.stall_bench_ms
        };
        self.last_progress + wait
    }

    /// Whether chunk `c` may go to the origin without a lease once no chunk
    /// has arrived for a while ([`orphan_at`](Self::orphan_at)): nobody can
    /// serve it verifiably now and no other member is fetching it under a
    /// lease (a lessee that dies stops renewing, and its lease runs out at
    /// the tracker).
    fn stuck_orphan(&self, c: u32) -> bool {
        self.idle_missing(c)
            && !self.leased.get(c)
            && !self.peer_servable(c)
            && !self.elsewhere.get(c)
    }

    fn next_origin_fetch(&mut self, now: u64) -> Option<Action<P>> {
        if self.origin_runs.len() as u32 >= self.cfg.origin_requests {
            return None;
        }
        let n = self.layout.count();
        let stuck = self.now >= self.last_progress + self.cfg.orphan_after_ms;
        let benched = if stuck {
            self.benched_holdings()
        } else {
            Bitfield::for_layout(&self.layout)
        };
        // Start at the most urgent fetchable chunk, then extend contiguously.
        // Unless stuck or alone, only leased chunks qualify.
        let candidates: Box<dyn Iterator<Item = u32> + '_> = if stuck || self.tracker_down {
            Box::new(0..n)
        } else {
            Box::new(self.leased.iter_ones())
        };
        let first = candidates
            .filter(|&c| self.origin_ok(c, &benched))
            .min_by_key(|&c| self.priority(c))?;
        let mut chunks = vec![first];
        let mut next = first + 1;
        while (chunks.len() as u32) < self.cfg.origin_run
            && next < n
            && self.origin_ok(next, &benched)
        {
            chunks.push(next);
            next += 1;
        }
        let run = self.next_run;
        self.next_run += 1;
        self.origin_runs.insert(run, chunks.len() as u32);
        for (k, &c) in chunks.iter().enumerate() {
            self.origin_run_of.insert(c, run);
            self.start(c, Source::Origin, now, k as u32);
        }
        Some(Action::FetchOrigin { chunks })
    }

    /// With few chunks left and all of them in flight, ask a second peer.
    fn next_endgame(&mut self, now: u64) -> Option<Action<P>> {
        let missing = self.layout.count() - self.have.count();
        if missing == 0 || missing > self.cfg.endgame_chunks {
            return None;
        }
        if self.peer_inflight >= self.inflight_limit() {
            return None;
        }
        let inflight: Vec<u32> = self.inflight.keys().copied().collect();
        for c in inflight {
            let reqs = &self.inflight[&c];
            let young = reqs.iter().any(|r| now < self.dup_at(r));
            if !self.known.get(c) || reqs.len() >= 2 || young {
                continue;
            }
            let asked: Vec<Source<P>> =
                self.inflight[&c].iter().map(|r| r.source.clone()).collect();
            let peer = self
                .peers
                .iter()
                .filter(|(p, s)| {
                    s.open(now, self.cfg.peer_depth)
                        && s.have.get(c)
                        && !asked.contains(&Source::Peer((*p).clone()))
                })
                .min_by_key(|(p, s)| (s.inflight, (*p).clone()))
                .map(|(p, _)| p.clone());
            if let Some(peer) = peer {
                self.start(c, Source::Peer(peer.clone()), now, 0);
                return Some(Action::FetchPeer {
                    peer,
                    chunks: vec![c],
                });
            }
        }
        None
    }

    /// The first chunk (from the client's position, wrapping) that no peer
    /// can serve verifiably, that is not leased to this node and not in
    /// flight.
    fn first_orphan(&self) -> Option<u32> {
        // Chunks the tracker would not lease (another member's lease, or
        // served by a member this node may not know yet) are not asked for:
        // at 10,000 members most lease requests were refused that way.
        let mut taken = self.have.clone();
        taken.union_with(&self.leased);
        taken.union_with(&self.elsewhere);
        taken.union_with(&self.served);
        let n = self.layout.count();
        let mut from = self.want;
        let mut wrapped = false;
        // Chunks neither held nor leased here, from the client's position
        // on, wrapping once.
        loop {
            match taken.first_zero_from(from) {
                Some(c) if c < n => {
                    if wrapped && c >= self.want {
                        return None;
                    }
                    if !self.inflight.contains_key(&c) && !self.peer_servable(c) {
                        return Some(c);
                    }
                    from = c + 1;
                }
                _ if !wrapped => {
                    wrapped = true;
                    from = 0;
                }
                _ => return None,
            }
        }
    }

    /// Chunks leased to this node and still missing (in flight or waiting
    /// for an origin request), ascending: the leases to keep renewing.
    fn held_leases(&self) -> impl Iterator<Item = u32> + '_ {
        self.leased.iter_ones().filter(|&c| !self.have.get(c))
    }

    /// Whether chunk `c` is being fetched from the origin.
    fn origin_fetching(&self, c: u32) -> bool {
        self.inflight
            .get(&c)
            .is_some_and(|reqs| reqs.iter().any(|r| r.source == Source::Origin))
    }

    /// Whether progress depends on news from the tracker: chunks are missing
    /// that no source is fetching.
    fn waiting_on_others(&self) -> bool {
        let mut taken = self.have.clone();
        taken.union_with(&self.leased);
        let idle = taken.iter_zeros().any(|c| !self.inflight.contains_key(&c));
        idle
    }
}

/// A chunk's place among equally rare ones under `seed` (SplitMix64).
fn tie(seed: u64, c: u32) -> u32 {
    let mut z = seed ^ u64::from(c).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u32 = 1 << 20;

    fn layout(chunks: u32) -> ChunkLayout {
        ChunkLayout::new(u64::from(chunks) * u64::from(MIB), MIB).unwrap()
    }

    fn bits(n: u32, ones: impl IntoIterator<Item = u32>) -> Bitfield {
        let mut b = Bitfield::new(n).unwrap();
        for i in ones {
            b.set(i).unwrap();
        }
        b
    }

    fn sched(n: u32) -> Scheduler<u32> {
        let mut s = Scheduler::new(SchedConfig::default(), layout(n), Bitfield::new(n).unwrap());
        s.handle(0, Event::HashesKnown(Bitfield::full(n).unwrap()));
        // The driver looks the blob up before it starts a download.
        s.handle(0, Event::LookedUp);
        s
    }

    /// A first lease request from `from`: one batch.
    fn lease(from: u32) -> Action<u32> {
        Action::Lease {
            from,
            max: SchedConfig::default().lease_batch,
        }
    }

    fn drain(s: &mut Scheduler<u32>, now: u64) -> Vec<Action<u32>> {
        let mut out = Vec::new();
        while let Some(a) = s.poll(now) {
            out.push(a);
            assert!(out.len() < 10_000, "poll never settles");
        }
        out
    }

    /// Peer `peer`'s answer for `chunk`.
    fn answer(s: &mut Scheduler<u32>, now: u64, peer: u32, chunk: u32, outcome: Outcome) {
        let source = Source::Peer(peer);
        s.handle(
            now,
            Event::Chunk {
                source,
                chunk,
                outcome,
            },
        );
    }

    fn peer_fetches(actions: &[Action<u32>]) -> Vec<(u32, Vec<u32>)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::FetchPeer { peer, chunks } => Some((*peer, chunks.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn past_max_peers_a_newcomer_replaces_the_least_useful_idle_peer() {
        let mut s = sched(4);
        s.cfg.max_peers = 2;
        // Peer 1 has what we need, peer 2 only chunk 0, which we get.
        s.handle(
            0,
            Event::PeerHas {
                peer: 1,
                have: bits(4, [1, 2]),
            },
        );
        s.handle(
            0,
            Event::PeerHas {
                peer: 2,
                have: bits(4, [0]),
            },
        );
        s.handle(
            0,
            Event::Chunk {
                source: Source::Origin,
                chunk: 0,
                outcome: Outcome::Verified,
            },
        );
        // Peer 3 arrives: peer 2 (nothing needed from it) makes room.
        s.handle(
            1,
            Event::PeerHas {
                peer: 3,
                have: bits(4, [3]),
            },
        );
        let f = peer_fetches(&drain(&mut s, 1));
        assert!(f.iter().all(|(p, _)| *p != 2), "{f:?}");
        assert!(f.iter().any(|(p, _)| *p == 3), "{f:?}");
        // Every peer busy: a newcomer is not taken.
        s.handle(
            2,
            Event::PeerHas {
                peer: 4,
                have: bits(4, [1, 2, 3]),
            },
        );
        assert!(peer_fetches(&drain(&mut s, 2)).is_empty());
    }

    #[test]
    fn rarest_first_and_depth() {
        let mut s = sched(8);
        // Chunk 5 is held by one peer, the rest by both.
        s.handle(
            0,
            Event::PeerHas {
                peer: 1,
                have: Bitfield::full(8).unwrap(),
            },
        );
        s.handle(
            0,
            Event::PeerHas {
                peer: 2,
                have: bits(8, [0, 1, 2, 3, 4, 6, 7]),
            },
        );
        s.handle(0, Event::Want(7)); // urgent window 7.. covers only chunk 7
        let acts = drain(&mut s, 0);
        let f = peer_fetches(&acts);
        // Peer 1 first (tie on load, lower id): urgent 7, then the rarest (5).
        assert_eq!(f[0], (1, vec![7, 5, 0, 1]));
        assert_eq!(f[1], (2, vec![2, 3, 4, 6]));
        assert!(f.iter().all(|(_, c)| c.len() <= 4));
    }

    #[test]
    fn members_with_their_own_tie_seeds_ask_one_holder_for_different_chunks() {
        // One holder of 60 equally rare chunks (the urgent window, 0–3, is
        // here already): each member's first request takes 4 of them, in
        // its own order rather than all the same four.
        let fresh = |seed: Option<u64>| {
            let mut s: Scheduler<u32> =
                Scheduler::new(SchedConfig::default(), layout(64), bits(64, 0..4));
            if let Some(seed) = seed {
                s.set_tie_seed(seed);
            }
            s.handle(0, Event::HashesKnown(Bitfield::full(64).unwrap()));
            s.handle(0, Event::LookedUp);
            s.handle(
                0,
                Event::PeerHas {
                    peer: 1,
                    have: Bitfield::full(64).unwrap(),
                },
            );
            peer_fetches(&drain(&mut s, 0)).remove(0).1
        };
        let firsts: Vec<Vec<u32>> = (1..=8).map(|seed| fresh(Some(seed))).collect();
        let distinct: std::collections::BTreeSet<u32> = firsts.iter().flatten().copied().collect();
        assert!(distinct.len() > 16, "{firsts:?}");
        // Without a seed, by index.
        assert_eq!(fresh(None), vec![4, 5, 6, 7]);
    }

    #[test]
    fn on_a_slow_link_a_request_stalls_only_after_several_usual_chunk_times() {
        let mut s = sched(8);
        s.handle(
            0,
            Event::PeerHas {
                peer: 1,
                have: Bitfield::full(8).unwrap(),
            },
        );
        assert_eq!(peer_fetches(&drain(&mut s, 0)), vec![(1, vec![0, 1, 2, 3])]);
        // A chunk takes 3 s here.
        s.handle(
            3_000,
            Event::Chunk {
                source: Source::Peer(1),
                chunk: 0,
                outcome: Outcome::Verified,
            },
        );
        assert_eq!(peer_fetches(&drain(&mut s, 3_000)), vec![(1, vec![4])]);
        let cancelled = |acts: &[Action<u32>], c: u32| {
            acts.iter()
                .any(|a| matches!(a, Action::Cancel { chunk, .. } if *chunk == c))
        };
        // The rest of the first request keeps coming, a chunk per 3 s.
        let arrive = |s: &mut Scheduler<u32>, now, chunk| {
            answer(s, now, 1, chunk, Outcome::Verified);
            drain(s, now)
        };
        assert!(!cancelled(&arrive(&mut s, 6_000, 1), 4));
        assert!(!cancelled(&arrive(&mut s, 9_000, 2), 4));
        // Chunk 4 is not stalled after the fixed 5 s (at 8 s)...
        assert!(!cancelled(&drain(&mut s, 11_000), 4));
        assert!(!cancelled(&arrive(&mut s, 12_000, 3), 4));
        // ...but after four usual chunk times (12 s, at 15 s).
        assert!(cancelled(&drain(&mut s, 15_000), 4));
    }

    #[test]
    fn on_a_fast_link_a_dead_peer_is_given_up_after_the_floor_not_5_s() {
        let mut s = sched(8);
        s.cfg.endgame_chunks = 0;
        for peer in [1, 2] {
            let have = Bitfield::full(8).unwrap();
            s.handle(0, Event::PeerHas { peer, have });
        }
        let f = peer_fetches(&drain(&mut s, 0));
        assert_eq!(f, vec![(1, vec![0, 1, 2, 3]), (2, vec![4, 5, 6, 7])]);
        // Peer 2 delivers in 2 ms a chunk; peer 1 has died.
        let source = Source::Peer(2);
        let outcome = Outcome::Verified;
        s.handle(
            2,
            Event::Chunk {
                source,
                chunk: 4,
                outcome,
            },
        );
        drain(&mut s, 2);
        // Its requests stall after the 1 s floor (the first request was
        // sent before any chunk time was known: 5 s for that one).
        assert_eq!(s.next_deadline(), Some(5_000));
        let acts = drain(&mut s, 5_000);
        assert!(s.is_benched(&1), "{acts:?}");
        // Peer 2 has room for one more (three of its four in flight).
        assert_eq!(peer_fetches(&acts), vec![(2, vec![0])], "{acts:?}");
        // Asked at 5 s with a 2 ms chunk time: stalled at 6 s, not 10.
        let moved = |acts: &[Action<u32>]| {
            acts.contains(&Action::Cancel {
                source: Source::Peer(2),
                chunk: 0,
            })
        };
        assert!(!moved(&drain(&mut s, 5_999)));
        assert!(moved(&drain(&mut s, 6_000)));
    }

    #[test]
    fn only_verifiable_chunks_come_from_peers() {
        let mut s = Scheduler::new(SchedConfig::default(), layout(4), Bitfield::new(4).unwrap());
        s.handle(
            0,
            Event::PeerHas {
                peer: 1,
                have: Bitfield::full(4).unwrap(),
            },
        );
        s.handle(0, Event::HashesKnown(bits(4, [2])));
        let f = peer_fetches(&drain(&mut s, 0));
        assert_eq!(f, vec![(1, vec![2])]);
    }

    #[test]
    fn chunks_only_a_benched_peer_holds_go_to_the_origin_one_bench_period_later() {
        let mut s = sched(1);
        s.handle(
            0,
            Event::PeerHas {
                peer: 1,
                have: Bitfield::full(1).unwrap(),
            },
        );
        assert_eq!(peer_fetches(&drain(&mut s, 0)), vec![(1, vec![0])]);
        // Two stalls bench the only holder (its chunk is not servable now)
        // and nothing has arrived for twice `orphan_after_ms`.
        assert_eq!(peer_fetches(&drain(&mut s, 5_000)), vec![(1, vec![0])]);
        let acts = drain(&mut s, 10_000);
        assert!(s.is_benched(&1), "{acts:?}");
        let bench_end = 10_000 + s.cfg.stall_bench_ms;
        let orphan_at = s.cfg.orphan_after_ms + s.cfg.stall_bench_ms;
        assert!(orphan_at < bench_end);
        // A live but slow holder (a saturated CPU) is not given up on at
        // once: the origin waits one bench period more than for a chunk
        // nobody holds.
        assert!(
            !acts.iter().any(|a| matches!(a, Action::FetchOrigin { .. })),
            "{acts:?}"
        );
        s.handle(10_001, Event::LeaseGranted(vec![]));
        assert!(drain(&mut s, orphan_at - 1)
            .iter()
            .all(|a| !matches!(a, Action::FetchOrigin { .. })));
        assert!(s.next_deadline().is_some_and(|t| t <= orphan_at));
        let acts = drain(&mut s, orphan_at);
        assert!(
            acts.contains(&Action::FetchOrigin { chunks: vec![0] }),
            "a holder that stays silent does not stall the pull: {acts:?}"
        );
    }

    #[test]
    fn a_verified_chunk_from_a_moved_request_is_kept_and_its_new_request_cancelled() {
        let mut s = sched(2);
        s.cfg.endgame_chunks = 0;
        for peer in [1, 2] {
            let have = Bitfield::full(2).unwrap();
            s.handle(0, Event::PeerHas { peer, have });
        }
        let f = peer_fetches(&drain(&mut s, 0));
        assert_eq!(f, vec![(1, vec![0, 1])]);
        // Chunk 0 stalls at peer 1 and moves to peer 2, and chunk 1 with it
        // (it comes after 0 on the same stream, so it cannot come first)...
        let acts = drain(&mut s, 5_000);
        assert_eq!(peer_fetches(&acts), vec![(2, vec![0, 1])]);
        // ...then peer 1's answer arrives after all: it is kept, and the
        // request at peer 2 is cancelled rather than fetched again.
        let late = Event::Chunk {
            source: Source::Peer(1),
            chunk: 0,
            outcome: Outcome::Verified,
        };
        s.handle(5_100, late);
        assert!(s.have().get(0));
        let acts = drain(&mut s, 5_100);
        assert!(acts.contains(&Action::Cancel {
            source: Source::Peer(2),
            chunk: 0
        }));
        assert!(peer_fetches(&acts).is_empty(), "{acts:?}");
    }

    #[test]
    fn stalled_request_moves_elsewhere_and_a_repeat_staller_is_benched_then_on_probation() {
        let mut s = sched(4);
        s.cfg.endgame_chunks = 0;
        s.handle(
            0,
            Event::PeerHas {
                peer: 1,
                have: Bitfield::full(4).unwrap(),
            },
        );
        let f = peer_fetches(&drain(&mut s, 0));
        assert_eq!(f, vec![(1, vec![0, 1, 2, 3])]);
        s.handle(
            10,
            Event::PeerHas {
                peer: 2,
                have: bits(4, [0, 1]),
            },
        );
        assert!(
            peer_fetches(&drain(&mut s, 10)).is_empty(),
            "nothing idle to ask peer 2 for"
        );
        // The first chunk of the request stalls after one period, and the
        // three behind it on the same stream with it: that is past the
        // stalls allowed, so peer 1 is benched and reported at once.
        assert_eq!(s.next_deadline(), Some(5_000));
        let acts = drain(&mut s, 5_000);
        for chunk in [0, 1, 2, 3] {
            assert!(
                acts.contains(&Action::Cancel {
                    source: Source::Peer(1),
                    chunk
                }),
                "{acts:?}"
            );
        }
        assert!(s.is_benched(&1) && !s.is_excluded(&1));
        assert!(acts.contains(&Action::Unresponsive { peer: 1 }), "{acts:?}");
        assert_eq!(peer_fetches(&acts), vec![(2, vec![0, 1])]);
        for chunk in [0, 1] {
            s.handle(
                5_500,
                Event::Chunk {
                    source: Source::Peer(2),
                    chunk,
                    outcome: Outcome::Verified,
                },
            );
        }
        assert!(peer_fetches(&drain(&mut s, 5_500)).is_empty());
        // Back after stall_bench_ms, one chunk at a time until it delivers.
        let acts = drain(&mut s, 15_000);
        assert!(!s.is_benched(&1));
        assert_eq!(peer_fetches(&acts), vec![(1, vec![2])]);
        s.handle(
            15_100,
            Event::Chunk {
                source: Source::Peer(1),
                chunk: 2,
                outcome: Outcome::Verified,
            },
        );
        assert_eq!(peer_fetches(&drain(&mut s, 15_100)), vec![(1, vec![3])]);
    }

    #[test]
    fn on_a_fast_link_a_busy_peer_is_tried_again_after_about_a_chunk_time() {
        let mut s = sched(8);
        for peer in [1, 2] {
            let have = Bitfield::full(8).unwrap();
            s.handle(0, Event::PeerHas { peer, have });
        }
        let f = peer_fetches(&drain(&mut s, 0));
        assert_eq!(f[0], (1, vec![0, 1, 2, 3]));
        // Peer 1's chunks take 2 ms each here.
        for (k, c) in [0, 1, 2, 3].into_iter().enumerate() {
            let (source, outcome) = (Source::Peer(1), Outcome::Verified);
            s.handle(
                2 * (k as u64 + 1),
                Event::Chunk {
                    source,
                    chunk: c,
                    outcome,
                },
            );
        }
        // Peer 2 was busy: it is left alone for the floor (10 ms), not
        // the 200 ms a slow link needs.
        for c in [4, 5, 6, 7] {
            let (source, outcome) = (Source::Peer(2), Outcome::Busy);
            s.handle(
                8,
                Event::Chunk {
                    source,
                    chunk: c,
                    outcome,
                },
            );
        }
        let f = peer_fetches(&drain(&mut s, 8));
        assert_eq!(f, vec![(1, vec![4, 5, 6, 7])]);
        assert!(
            s.next_deadline().is_some_and(|t| t <= 18),
            "{:?}",
            s.next_deadline()
        );
    }

    #[test]
    fn a_busy_peer_that_names_its_retry_time_is_asked_again_then_and_not_before() {
        let mut s = sched(4);
        let have = Bitfield::full(4).unwrap();
        s.handle(0, Event::PeerHas { peer: 1, have });
        assert_eq!(peer_fetches(&drain(&mut s, 0)), vec![(1, vec![0, 1, 2, 3])]);
        let busy = |s: &mut Scheduler<u32>, now| {
            for chunk in 0..4 {
                answer(s, now, 1, chunk, Outcome::Busy);
            }
        };
        // Its answer: come back at 37 ms (a guess here would be 200 ms).
        busy(&mut s, 5);
        s.busy_until(&1, 37);
        assert_eq!(s.next_deadline(), Some(37));
        assert!(peer_fetches(&drain(&mut s, 36)).is_empty());
        assert_eq!(
            peer_fetches(&drain(&mut s, 37)),
            vec![(1, vec![0, 1, 2, 3])]
        );
        // A hint past the longest back-off (800 ms) is cut to it.
        busy(&mut s, 40);
        s.busy_until(&1, 60_000);
        // (An unknown peer's hint changes nothing.)
        s.busy_until(&9, 50);
        assert!(peer_fetches(&drain(&mut s, 839)).is_empty());
        assert_eq!(
            peer_fetches(&drain(&mut s, 840)),
            vec![(1, vec![0, 1, 2, 3])]
        );
    }

    #[test]
    fn a_busy_peer_is_left_alone_for_a_growing_back_off_without_a_stall() {
        let mut s = sched(2);
        s.cfg.endgame_chunks = 0;
        s.handle(
            0,
            Event::PeerHas {
                peer: 1,
                have: Bitfield::full(2).unwrap(),
            },
        );
        assert_eq!(peer_fetches(&drain(&mut s, 0)), vec![(1, vec![0, 1])]);
        let busy = |s: &mut Scheduler<u32>, now, chunk| {
            s.handle(
                now,
                Event::Chunk {
                    source: Source::Peer(1),
                    chunk,
                    outcome: Outcome::Busy,
                },
            )
        };
        // One refusal of a two-chunk request: one back-off of 200 ms.
        busy(&mut s, 10, 0);
        busy(&mut s, 10, 1);
        assert!(peer_fetches(&drain(&mut s, 10)).is_empty());
        assert_eq!(s.next_deadline(), Some(210));
        assert_eq!(peer_fetches(&drain(&mut s, 210)), vec![(1, vec![0, 1])]);
        // Busy again: 400 ms this time; never benched for it.
        busy(&mut s, 220, 0);
        busy(&mut s, 220, 1);
        assert!(peer_fetches(&drain(&mut s, 500)).is_empty());
        assert_eq!(peer_fetches(&drain(&mut s, 620)), vec![(1, vec![0, 1])]);
        assert!(!s.is_benched(&1) && !s.is_excluded(&1));
    }

    #[test]
    fn the_endgame_waits_twice_the_usual_chunk_time_before_duplicating() {
        let mut s = sched(6);
        s.handle(
            0,
            Event::PeerHas {
                peer: 1,
                have: Bitfield::full(6).unwrap(),
            },
        );
        assert_eq!(peer_fetches(&drain(&mut s, 0)), vec![(1, vec![0, 1, 2, 3])]);
        // Chunks take a second each here.
        for (t, chunk) in [(1_000, 0), (2_000, 1)] {
            s.handle(
                t,
                Event::Chunk {
                    source: Source::Peer(1),
                    chunk,
                    outcome: Outcome::Verified,
                },
            );
        }
        // Peer 1 takes the rest; peer 2 appears. Four missing: the endgame.
        let acts = drain(&mut s, 2_000);
        assert_eq!(peer_fetches(&acts), vec![(1, vec![4, 5])]);
        s.handle(
            2_000,
            Event::PeerHas {
                peer: 2,
                have: Bitfield::full(6).unwrap(),
            },
        );
        // Not after the 300 ms floor: chunk 4 (first of its request) is due
        // after 1 s, so it is duplicated only after 2 s.
        assert!(peer_fetches(&drain(&mut s, 2_300)).is_empty());
        let dups = peer_fetches(&drain(&mut s, 4_000));
        assert!(dups.contains(&(2, vec![4])), "{dups:?}");
    }

    #[test]
    fn bad_data_excludes_lacking_data_does_not() {
        let mut s = sched(4);
        s.handle(
            0,
            Event::PeerHas {
                peer: 1,
                have: Bitfield::full(4).unwrap(),
            },
        );
        s.handle(
            0,
            Event::PeerHas {
                peer: 2,
                have: Bitfield::full(4).unwrap(),
            },
        );
        let f = peer_fetches(&drain(&mut s, 0));
        assert_eq!(f, vec![(1, vec![0, 1, 2, 3])]);
        s.handle(
            1,
            Event::Chunk {
                source: Source::Peer(1),
                chunk: 0,
                outcome: Outcome::DontHave,
            },
        );
        assert!(!s.is_excluded(&1));
        let acts = drain(&mut s, 1);
        assert_eq!(peer_fetches(&acts), vec![(2, vec![0])]);
        s.handle(
            2,
            Event::Chunk {
                source: Source::Peer(1),
                chunk: 1,
                outcome: Outcome::Bad,
            },
        );
        assert!(s.is_excluded(&1));
        let acts = drain(&mut s, 2);
        // Its other requests are cancelled and move to peer 2.
        assert!(acts.contains(&Action::Cancel {
            source: Source::Peer(1),
            chunk: 2
        }));
        assert_eq!(peer_fetches(&acts), vec![(2, vec![1, 2, 3])]);
        // A late answer from the excluded peer that verified against the
        // chunk hash is kept (the bytes are good; the peer stays out), and
        // the request it replaces is cancelled.
        s.handle(
            3,
            Event::Chunk {
                source: Source::Peer(1),
                chunk: 2,
                outcome: Outcome::Verified,
            },
        );
        assert!(s.have().get(2) && s.is_excluded(&1));
        assert!(drain(&mut s, 3).contains(&Action::Cancel {
            source: Source::Peer(2),
            chunk: 2
        }));
    }

    #[test]
    fn leases_of_chunks_still_coming_from_the_origin_are_renewed() {
        let mut s = sched(4);
        assert_eq!(drain(&mut s, 0), vec![lease(0)]);
        s.handle(1, Event::LeaseGranted(vec![0, 1, 2, 3]));
        assert_eq!(
            drain(&mut s, 1),
            vec![Action::FetchOrigin {
                chunks: vec![0, 1, 2, 3]
            }]
        );
        // A slow origin: the run is still going when the renewal is due.
        assert_eq!(s.next_deadline(), Some(1_000));
        assert_eq!(
            drain(&mut s, 1_000),
            vec![Action::Lease { from: 0, max: 4 }]
        );
        s.handle(1_001, Event::LeaseGranted(vec![0, 1, 2, 3]));
        for c in [0, 1] {
            s.handle(
                1_500,
                Event::Chunk {
                    source: Source::Origin,
                    chunk: c,
                    outcome: Outcome::Verified,
                },
            );
        }
        assert_eq!(drain(&mut s, 1_500), vec![]);
        // Only what is still missing is renewed.
        assert_eq!(
            drain(&mut s, 2_000),
            vec![Action::Lease { from: 2, max: 2 }]
        );
    }

    #[test]
    fn leases_waiting_for_an_origin_request_are_renewed_and_a_lost_one_is_not_fetched() {
        let mut s = sched(8);
        s.cfg.origin_requests = 1;
        s.cfg.origin_run = 4;
        assert_eq!(drain(&mut s, 0), vec![lease(0)]);
        s.handle(1, Event::LeaseGranted((0..8).collect()));
        assert_eq!(
            drain(&mut s, 1),
            vec![Action::FetchOrigin {
                chunks: vec![0, 1, 2, 3]
            }]
        );
        // Chunks 4-7 wait for the origin request; their leases are renewed
        // all the same (a 3 s lease would otherwise run out under them).
        assert_eq!(
            drain(&mut s, 1_000),
            vec![Action::Lease { from: 0, max: 8 }]
        );
        // No answer: nothing is known to be lost, and the renewal is asked
        // again a second later.
        s.handle(1_001, Event::LeaseFailed);
        assert_eq!(
            drain(&mut s, 2_001),
            vec![Action::Lease { from: 0, max: 8 }]
        );
        // The tracker renewed all but 6 and 7 (they ran out and went to
        // another member): those are not fetched from the origin here.
        s.handle(2_002, Event::LeaseGranted(vec![0, 1, 2, 3, 4, 5]));
        for c in 0..4 {
            s.handle(
                2_200,
                Event::Chunk {
                    source: Source::Origin,
                    chunk: c,
                    outcome: Outcome::Verified,
                },
            );
        }
        let acts = drain(&mut s, 2_200);
        assert!(
            acts.contains(&Action::FetchOrigin { chunks: vec![4, 5] }),
            "{acts:?}"
        );
        assert!(
            !acts
                .iter()
                .any(|a| matches!(a, Action::FetchOrigin { chunks } if chunks.contains(&6))),
            "{acts:?}"
        );
    }

    #[test]
    fn a_grant_of_only_the_leases_held_does_not_ask_again_at_once() {
        let mut s = sched(16);
        assert_eq!(drain(&mut s, 0), vec![lease(0)]);
        s.handle(1, Event::LeaseGranted(vec![0, 1, 2, 3]));
        let acts = drain(&mut s, 1);
        assert_eq!(acts.last(), Some(&Action::Lease { from: 4, max: 8 }));
        // The tracker renewed the four held and had nothing fresh.
        s.handle(2, Event::LeaseGranted(vec![0, 1, 2, 3]));
        assert_eq!(drain(&mut s, 2), vec![]);
        // Asked again after a lookup interval, not in a loop.
        let acts = drain(&mut s, 502);
        assert!(
            acts.contains(&Action::Lease { from: 4, max: 8 }),
            "{acts:?}"
        );
        // Two runs in flight fill the origin requests: no lease then.
        s.handle(503, Event::LeaseGranted(vec![0, 1, 2, 3, 8, 9, 10, 11]));
        let acts = drain(&mut s, 503);
        assert_eq!(
            acts,
            vec![Action::FetchOrigin {
                chunks: vec![8, 9, 10, 11]
            }]
        );
    }

    #[test]
    fn a_peer_outside_the_rack_is_asked_only_for_what_the_rack_lacks() {
        let mut s = sched(8);
        s.cfg.endgame_chunks = 0;
        // Peer 1 (outside) holds everything; peer 2 (this rack) holds 0-5.
        s.handle(
            0,
            Event::PeerHas {
                peer: 1,
                have: Bitfield::full(8).unwrap(),
            },
        );
        s.handle(
            0,
            Event::PeerHas {
                peer: 2,
                have: bits(8, 0..6),
            },
        );
        s.handle(0, Event::Near(2));
        let fetches = peer_fetches(&drain(&mut s, 0));
        // The rack mate first (its depth is 4); the outsider only for 6, 7.
        assert_eq!(fetches.len(), 2, "{fetches:?}");
        assert_eq!(fetches[0].0, 2);
        assert_eq!(fetches[1], (1, vec![6, 7]));
        // The rack mate is busy: what it holds still waits for it.
        for &c in &fetches[0].1 {
            s.handle(
                1,
                Event::Chunk {
                    source: Source::Peer(2),
                    chunk: c,
                    outcome: Outcome::Busy,
                },
            );
        }
        assert!(peer_fetches(&drain(&mut s, 1)).is_empty());
    }

    #[test]
    fn chunks_served_or_leased_elsewhere_are_not_asked_for_a_lease() {
        let mut s = sched(8);
        // Renewals of this node's own leases aside.
        s.cfg.lease_renew_ms = 10_000;
        // A lookup: chunks 0-2 served by members not named here, 3 leased
        // to another member. The first lease request starts at 4.
        s.handle(0, Event::Served(bits(8, [0, 1, 2])));
        s.handle(0, Event::LeasedElsewhere(bits(8, [3])));
        assert_eq!(drain(&mut s, 0), vec![lease(4)]);
        s.handle(1, Event::LeaseGranted(vec![4, 5, 6, 7]));
        let acts = drain(&mut s, 1);
        assert_eq!(
            acts,
            vec![Action::FetchOrigin {
                chunks: vec![4, 5, 6, 7]
            }]
        );
        // Everything else is someone's: no lease request, only lookups.
        for t in [2, 600, 1_200] {
            let acts = drain(&mut s, t);
            assert!(
                !acts.iter().any(|a| matches!(a, Action::Lease { .. })),
                "{t}: {acts:?}"
            );
        }
        // Chunk 3's lessee went away: the next lookup shows it unclaimed.
        s.handle(1_300, Event::LeasedElsewhere(bits(8, [])));
        assert!(drain(&mut s, 1_300).contains(&Action::Lease { from: 3, max: 8 }));
    }

    #[test]
    fn downloads_running_at_once_share_the_chunks_in_flight() {
        let mut s = sched(64);
        for p in 0..10 {
            s.handle(
                0,
                Event::PeerHas {
                    peer: p,
                    have: Bitfield::full(64).unwrap(),
                },
            );
        }
        // Four downloads at once: 32 / 4 = 8 chunks, two peers' depth.
        s.set_downloads(4);
        let asked: usize = peer_fetches(&drain(&mut s, 0))
            .iter()
            .map(|(_, c)| c.len())
            .sum();
        assert_eq!((asked, s.inflight_limit()), (8, 8));
        // Forty at once: never below the least, 4.
        s.set_downloads(40);
        assert_eq!(s.inflight_limit(), 4);
        assert!(peer_fetches(&drain(&mut s, 1)).is_empty());
        // The others finished: this one may fill the node's 32 alone.
        s.set_downloads(1);
        let more: usize = peer_fetches(&drain(&mut s, 2))
            .iter()
            .map(|(_, c)| c.len())
            .sum();
        assert_eq!(asked + more, 32);
    }

    #[test]
    fn a_refused_lease_is_asked_again_soon_then_less_often() {
        let mut s = sched(6);
        assert_eq!(drain(&mut s, 0), vec![lease(0)]);
        // Refused (every chunk is someone's lease, or the blob's leases are
        // all taken): a hurried lookup's gap, 50 ms, for both.
        s.handle(1, Event::LeaseGranted(vec![]));
        assert_eq!(drain(&mut s, 49), vec![]);
        assert_eq!(drain(&mut s, 50), vec![Action::Lookup]);
        assert_eq!(drain(&mut s, 51), vec![lease(0)]);
        // Refused again while that lookup is on its way: its answer predates
        // the reason to look again soon, so the next lookup is still hurried.
        s.handle(52, Event::LeaseGranted(vec![]));
        s.handle(60, Event::LookedUp);
        assert_eq!(drain(&mut s, 109), vec![]);
        assert_eq!(drain(&mut s, 110), vec![Action::Lookup]);
        s.handle(111, Event::LookedUp);
        // The lease gap doubled: 100 ms after the second refusal.
        assert_eq!(drain(&mut s, 151), vec![]);
        assert_eq!(drain(&mut s, 152), vec![lease(0)]);
        let mut at = 152;
        for gap in [200, 400, 500, 500] {
            s.handle(at, Event::LeaseGranted(vec![]));
            assert!(
                !drain(&mut s, at + gap - 1).contains(&lease(0)),
                "{at} + {gap}"
            );
            assert!(drain(&mut s, at + gap).contains(&lease(0)), "{at} + {gap}");
            at += gap;
        }
        // A grant starts over: the next request (just in time, chunk 0
        // being fetched) gets nothing new and is repeated 50 ms later.
        s.handle(at, Event::LeaseGranted(vec![0]));
        let acts = drain(&mut s, at);
        assert!(
            acts.contains(&Action::FetchOrigin { chunks: vec![0] }),
            "{acts:?}"
        );
        assert!(
            acts.iter()
                .any(|a| matches!(a, Action::Lease { from: 1, .. })),
            "{acts:?}"
        );
        s.handle(at + 1, Event::LeaseGranted(vec![0]));
        let is_lease = |a: &Action<u32>| matches!(a, Action::Lease { from: 1, .. });
        assert!(!drain(&mut s, at + 50).iter().any(is_lease));
        assert!(drain(&mut s, at + 51).iter().any(is_lease));
    }

    #[test]
    fn a_refused_lease_waits_at_least_the_tracker_round_trip() {
        let mut s = sched(6);
        s.set_tracker_rtt(700);
        assert_eq!(drain(&mut s, 0), vec![lease(0)]);
        s.handle(1, Event::LeaseGranted(vec![]));
        assert!(!drain(&mut s, 700).contains(&lease(0)));
        assert!(drain(&mut s, 701).contains(&lease(0)));
    }

    #[test]
    fn a_hurried_lookup_waits_at_least_the_tracker_round_trip() {
        let mut s = sched(6);
        drain(&mut s, 0);
        s.handle(1, Event::LeaseGranted(vec![]));
        s.set_tracker_rtt(300);
        assert!(!drain(&mut s, 299).contains(&Action::Lookup));
        assert!(drain(&mut s, 300).contains(&Action::Lookup));
        // Never longer than the usual interval (counted from the answer).
        s.handle(301, Event::LookedUp);
        s.handle(302, Event::LeaseGranted(vec![]));
        s.set_tracker_rtt(5_000);
        assert!(!drain(&mut s, 800).contains(&Action::Lookup));
        assert!(drain(&mut s, 801).contains(&Action::Lookup));
    }

    #[test]
    fn cold_blob_goes_to_origin_under_lease_then_completes() {
        let mut s = sched(6);
        let acts = drain(&mut s, 0);
        assert_eq!(acts, vec![lease(0)]);
        s.handle(1, Event::LeaseGranted(vec![0, 1, 2, 3, 4]));
        // The leased run goes out as one Range request; with every leased
        // chunk in flight and an origin request free, the next lease is
        // asked for just in time (its budget covers the 5 held, which the
        // tracker renews first, plus a fresh batch).
        assert_eq!(
            drain(&mut s, 1),
            vec![
                Action::FetchOrigin {
                    chunks: vec![0, 1, 2, 3, 4]
                },
                Action::Lease { from: 5, max: 9 },
            ]
        );
        // Chunk 5 is someone else's lease: look again soon (the lookup
        // names its lessee, whose chunks are then watched as they land).
        s.handle(2, Event::LeaseGranted(vec![]));
        assert_eq!(drain(&mut s, 2), vec![]);
        for c in 0..5 {
            let (source, outcome) = (Source::Origin, Outcome::Verified);
            s.handle(
                3,
                Event::Chunk {
                    source,
                    chunk: c,
                    outcome,
                },
            );
        }
        assert_eq!(drain(&mut s, 3), vec![]);
        assert_eq!(s.next_deadline(), Some(50));
        assert_eq!(drain(&mut s, 50), vec![Action::Lookup]);
        // The lease holder of chunk 5 published it and holds it.
        s.handle(
            501,
            Event::PeerHas {
                peer: 9,
                have: bits(6, [5]),
            },
        );
        s.handle(501, Event::LookedUp);
        assert_eq!(peer_fetches(&drain(&mut s, 501)), vec![(9, vec![5])]);
        let (source, outcome) = (Source::Peer(9), Outcome::Verified);
        s.handle(
            502,
            Event::Chunk {
                source,
                chunk: 5,
                outcome,
            },
        );
        assert_eq!(drain(&mut s, 502), vec![Action::Complete]);
        assert_eq!(s.poll(503), None);
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn a_stalled_origin_run_is_abandoned_whole_and_retried() {
        let mut s = sched(3);
        s.handle(0, Event::TrackerDown(true));
        assert_eq!(
            drain(&mut s, 0),
            vec![Action::FetchOrigin {
                chunks: vec![0, 1, 2]
            }]
        );
        let (source, outcome) = (Source::Origin, Outcome::Verified);
        s.handle(
            10,
            Event::Chunk {
                source,
                chunk: 0,
                outcome,
            },
        );
        // Chunk 1 was due by 2 origin stall periods (not peer ones); nothing came.
        let due = 2 * s.cfg.origin_stall_ms;
        assert!(due > 2 * s.cfg.stall_ms);
        assert_eq!(s.next_deadline(), Some(due));
        assert!(drain(&mut s, due - 1).is_empty());
        let acts = drain(&mut s, due);
        assert_eq!(
            acts,
            vec![
                Action::Cancel {
                    source: Source::Origin,
                    chunk: 1
                },
                Action::Cancel {
                    source: Source::Origin,
                    chunk: 2
                },
                Action::FetchOrigin { chunks: vec![1, 2] },
            ]
        );
        // Slow is not broken: the stall does not count toward giving up.
        assert_eq!(s.origin_failures, 0);
    }

    #[test]
    fn a_broken_origin_run_counts_once_and_is_refetched() {
        let mut s = sched(4);
        s.handle(0, Event::TrackerDown(true));
        assert_eq!(
            drain(&mut s, 0),
            vec![Action::FetchOrigin {
                chunks: vec![0, 1, 2, 3]
            }]
        );
        let (source, outcome) = (Source::Origin, Outcome::Verified);
        s.handle(
            1,
            Event::Chunk {
                source,
                chunk: 0,
                outcome,
            },
        );
        let (source, outcome) = (Source::Origin, Outcome::Failed);
        s.handle(
            2,
            Event::Chunk {
                source,
                chunk: 1,
                outcome,
            },
        );
        let acts = drain(&mut s, 2);
        assert_eq!(
            acts,
            vec![
                Action::Cancel {
                    source: Source::Origin,
                    chunk: 2
                },
                Action::Cancel {
                    source: Source::Origin,
                    chunk: 3
                },
                Action::FetchOrigin {
                    chunks: vec![1, 2, 3]
                },
            ]
        );
        assert_eq!(s.origin_failures, 1);
    }

    #[test]
    fn chunks_whose_only_holder_is_excluded_go_to_the_origin_after_a_while() {
        let mut s = sched(2);
        s.handle(
            0,
            Event::PeerHas {
                peer: 1,
                have: Bitfield::full(2).unwrap(),
            },
        );
        assert_eq!(peer_fetches(&drain(&mut s, 0)), vec![(1, vec![0, 1])]);
        let (source, outcome) = (Source::Peer(1), Outcome::Bad);
        s.handle(
            10,
            Event::Chunk {
                source,
                chunk: 0,
                outcome,
            },
        );
        // Peer 1 is out; the tracker will not lease what it still "serves".
        let acts = drain(&mut s, 10);
        assert!(acts.contains(&lease(0)), "{acts:?}");
        s.handle(11, Event::LeaseGranted(vec![]));
        assert!(drain(&mut s, 11)
            .iter()
            .all(|a| !matches!(a, Action::FetchOrigin { .. })));
        assert_eq!(s.next_deadline(), Some(50));
        let _ = drain(&mut s, 50);
        s.handle(51, Event::LookedUp);
        // No chunk for orphan_after_ms: the origin it is.
        assert!(s.next_deadline().unwrap() <= 5_000);
        let acts = drain(&mut s, 5_000);
        assert!(
            acts.contains(&Action::FetchOrigin { chunks: vec![0, 1] }),
            "{acts:?}"
        );
    }

    #[test]
    fn chunks_another_member_is_fetching_are_not_taken_from_the_origin_while_stuck() {
        let mut s = sched(4);
        assert_eq!(drain(&mut s, 0), vec![lease(0)]);
        s.handle(1, Event::LeaseGranted(vec![]));
        // Chunks 0-1 are another member's lease; 2-3 nobody's.
        s.handle(2, Event::LeasedElsewhere(bits(4, [0, 1])));
        s.handle(2, Event::LookedUp);
        let _ = drain(&mut s, 2);
        // Nothing arrives for the orphan period: chunks nobody holds are
        // leasable, so they are asked for under a lease, not fetched bare
        // (every waiting member would fetch them at once).
        let acts = drain(&mut s, 5_000);
        assert!(
            acts.iter().any(|a| matches!(a, Action::Lease { .. })),
            "{acts:?}"
        );
        assert!(
            !acts.iter().any(|a| matches!(a, Action::FetchOrigin { .. })),
            "{acts:?}"
        );
        s.handle(5_001, Event::LeaseGranted(vec![]));
        // Still refused two bench periods on: the last resort, and only
        // for the chunks nobody is fetching.
        let _ = drain(&mut s, 20_000);
        let acts = drain(&mut s, 25_000);
        assert!(
            acts.contains(&Action::FetchOrigin { chunks: vec![2, 3] }),
            "{acts:?}"
        );
        assert!(
            !acts
                .iter()
                .any(|a| matches!(a, Action::FetchOrigin { chunks } if chunks.contains(&0))),
            "{acts:?}"
        );
        // The lessee died: its lease ran out and the next lookup says so.
        s.handle(26_000, Event::LeasedElsewhere(bits(4, [])));
        let acts = drain(&mut s, 26_000);
        assert!(
            acts.contains(&Action::FetchOrigin { chunks: vec![0, 1] }),
            "{acts:?}"
        );
    }

    #[test]
    fn a_passed_deadline_that_changes_nothing_is_not_reported_again() {
        // Both origin runs busy, more orphans waiting: past the orphan time
        // there is nothing to do until an event, so no deadline in the past.
        let mut s = sched(200);
        s.handle(0, Event::TrackerDown(true));
        let _ = drain(&mut s, 0);
        s.handle(0, Event::TrackerDown(false));
        let _ = drain(&mut s, 10_000);
        assert!(
            s.next_deadline().is_none_or(|t| t > 10_000),
            "{:?}",
            s.next_deadline()
        );
    }

    #[test]
    fn endgame_duplicates_then_cancels_the_loser() {
        let mut s = sched(2);
        s.handle(
            0,
            Event::PeerHas {
                peer: 1,
                have: Bitfield::full(2).unwrap(),
            },
        );
        assert_eq!(peer_fetches(&drain(&mut s, 0)), vec![(1, vec![0, 1])]);
        s.handle(
            1,
            Event::PeerHas {
                peer: 2,
                have: Bitfield::full(2).unwrap(),
            },
        );
        // Not yet: the requests are young.
        assert!(peer_fetches(&drain(&mut s, 1)).is_empty());
        assert_eq!(s.next_deadline(), Some(300));
        let f = peer_fetches(&drain(&mut s, 300));
        assert_eq!(f, vec![(2, vec![0]), (2, vec![1])]);
        s.handle(
            301,
            Event::Chunk {
                source: Source::Peer(2),
                chunk: 0,
                outcome: Outcome::Verified,
            },
        );
        let acts = drain(&mut s, 301);
        assert!(acts.contains(&Action::Cancel {
            source: Source::Peer(1),
            chunk: 0
        }));
    }

    #[test]
    fn tracker_down_goes_to_origin_for_what_no_known_peer_has() {
        let mut s = sched(6);
        s.handle(0, Event::TrackerDown(true));
        s.handle(
            0,
            Event::PeerHas {
                peer: 1,
                have: bits(6, [0, 1]),
            },
        );
        let acts = drain(&mut s, 0);
        assert_eq!(
            acts,
            vec![
                Action::FetchPeer {
                    peer: 1,
                    chunks: vec![0, 1]
                },
                Action::FetchOrigin {
                    chunks: vec![2, 3, 4, 5]
                },
            ]
        );
    }

    #[test]
    fn origin_failures_give_up() {
        let mut s = sched(1);
        s.handle(0, Event::TrackerDown(true));
        for t in 0..3 {
            assert_eq!(
                drain(&mut s, t),
                vec![Action::FetchOrigin { chunks: vec![0] }]
            );
            s.handle(
                t,
                Event::Chunk {
                    source: Source::Origin,
                    chunk: 0,
                    outcome: Outcome::Failed,
                },
            );
        }
        assert_eq!(drain(&mut s, 9), vec![Action::GiveUp]);
    }

    #[test]
    fn a_slow_origin_never_makes_a_download_give_up() {
        let mut s = sched(1);
        s.cfg.origin_stall_ms = 30_000;
        s.handle(0, Event::TrackerDown(true));
        let mut t = 0;
        for _ in 0..5 {
            let acts = drain(&mut s, t);
            assert!(
                acts.contains(&Action::FetchOrigin { chunks: vec![0] }),
                "{acts:?}"
            );
            t += s.cfg.origin_stall_ms;
        }
        assert!(!drain(&mut s, t).contains(&Action::GiveUp));
    }

    /// Peer `peer` holds `have`, as of time 0.
    fn peer_has(s: &mut Scheduler<u32>, peer: u32, have: Bitfield) {
        s.handle(0, Event::PeerHas { peer, have });
    }

    fn cancels(actions: &[Action<u32>]) -> Vec<(Source<u32>, u32)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Cancel { source, chunk } => Some((source.clone(), *chunk)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_origin_run_whose_bytes_keep_moving_is_never_cut() {
        // The origin needs minutes for a run when its link is shared by
        // every lessee: a run cut for taking longer than the stall period
        // would be fetched again, spending that link twice.
        let mut s = sched(4);
        s.handle(0, Event::TrackerDown(true));
        let acts = drain(&mut s, 0);
        assert!(acts.contains(&Action::FetchOrigin {
            chunks: vec![0, 1, 2, 3]
        }));
        let stall = s.cfg.origin_stall_ms;
        let mut t = 0;
        for chunk in 0..3 {
            // Each chunk takes four stall periods, bytes arriving all along.
            for _ in 0..(4 * stall / PROGRESS_MS) {
                t += PROGRESS_MS;
                s.handle(
                    t,
                    Event::Progress {
                        source: Source::Origin,
                        chunk,
                    },
                );
                assert!(cancels(&drain(&mut s, t)).is_empty(), "cut at {t}");
            }
            s.handle(
                t,
                Event::Chunk {
                    source: Source::Origin,
                    chunk,
                    outcome: Outcome::Verified,
                },
            );
            assert!(cancels(&drain(&mut s, t)).is_empty());
        }
        // Then nothing moves: the last chunk, which had two periods from
        // the last bytes before it, is cut then.
        assert!(cancels(&drain(&mut s, t + 2 * stall - 1)).is_empty());
        assert_eq!(
            cancels(&drain(&mut s, t + 2 * stall)),
            vec![(Source::Origin, 3)]
        );
    }

    #[test]
    fn a_peer_request_lives_while_bytes_move_but_not_past_the_cap() {
        let mut s = sched(2);
        s.cfg.endgame_chunks = 0;
        peer_has(&mut s, 1, Bitfield::full(2).unwrap());
        assert_eq!(peer_fetches(&drain(&mut s, 0)), vec![(1, vec![0, 1])]);
        let period = s.cfg.stall_ms;
        // Slow but moving: kept past the first period (the second chunk,
        // behind it on the stream, moves with it).
        let mut t = 0;
        while t < 3 * period {
            t += PROGRESS_MS;
            s.handle(
                t,
                Event::Progress {
                    source: Source::Peer(1),
                    chunk: 0,
                },
            );
            assert!(cancels(&drain(&mut s, t)).is_empty(), "cut at {t}");
        }
        // Silent from here: cut one period after the last bytes, the chunk
        // behind it with it.
        assert!(cancels(&drain(&mut s, t + period - 1)).is_empty());
        let cut = cancels(&drain(&mut s, t + period));
        assert_eq!(cut, vec![(Source::Peer(1), 0), (Source::Peer(1), 1)]);

        // A peer trickling bytes forever is cut at the cap.
        let mut s = sched(1);
        peer_has(&mut s, 1, Bitfield::full(1).unwrap());
        assert_eq!(peer_fetches(&drain(&mut s, 0)), vec![(1, vec![0])]);
        let cap = PROGRESS_CAP * period;
        let mut t = 0;
        let mut cut_at = None;
        while t < 2 * cap && cut_at.is_none() {
            t += PROGRESS_MS;
            s.handle(
                t,
                Event::Progress {
                    source: Source::Peer(1),
                    chunk: 0,
                },
            );
            if !cancels(&drain(&mut s, t)).is_empty() {
                cut_at = Some(t);
            }
        }
        assert_eq!(cut_at, Some(cap));
    }

    #[test]
    fn progress_for_a_request_not_in_flight_changes_nothing() {
        let mut s = sched(2);
        peer_has(&mut s, 1, Bitfield::full(2).unwrap());
        let _ = drain(&mut s, 0);
        let due = s.next_deadline();
        s.handle(
            100,
            Event::Progress {
                source: Source::Peer(2),
                chunk: 0,
            },
        );
        s.handle(
            100,
            Event::Progress {
                source: Source::Origin,
                chunk: 1,
            },
        );
        s.handle(
            100,
            Event::Progress {
                source: Source::Peer(1),
                chunk: 99,
            },
        );
        assert_eq!(s.next_deadline(), due);
        assert!(drain(&mut s, 100).is_empty());
    }

    proptest::proptest! {
        /// Random event sequences never break the invariants: no request for
        /// a chunk already held, never above the depths, never a peer request
        /// for an unverifiable chunk or to an excluded or benched peer,
        /// availability always counts the peers in play, and the same
        /// events always give the same actions.
        #[test]
        fn invariants_hold(ops in proptest::collection::vec((0u8..11, 0u32..4, 0u32..12, 0u64..3000), 1..200)) {
            let n = 12;
            let run = || {
                let mut s: Scheduler<u32> = Scheduler::new(SchedConfig::default(), layout(n), Bitfield::new(n).unwrap());
                let mut now = 0;
                let mut log = Vec::new();
                for &(kind, peer, chunk, dt) in &ops {
                    now += dt;
                    let ev = match kind {
                        0 => Event::PeerHas { peer, have: bits(n, (0..n).filter(|c| (c + peer) % 3 != 0)) },
                        1 => Event::HashesKnown(bits(n, 0..=chunk)),
                        2 => Event::Chunk { source: Source::Peer(peer), chunk, outcome: Outcome::Verified },
                        3 => Event::Chunk { source: Source::Peer(peer), chunk, outcome: Outcome::Bad },
                        4 => Event::Chunk { source: Source::Origin, chunk, outcome: Outcome::Verified },
                        5 => Event::LeaseGranted(vec![chunk, (chunk + 1) % n]),
                        6 => Event::PeerGone { peer },
                        7 => Event::Chunk { source: Source::Peer(peer), chunk, outcome: Outcome::Busy },
                        8 => Event::Chunk { source: Source::Peer(peer), chunk, outcome: Outcome::Failed },
                        9 => Event::Progress { source: if peer == 0 { Source::Origin } else { Source::Peer(peer) }, chunk },
                        _ => Event::Want(chunk),
                    };
                    s.handle(now, ev);
                    while let Some(a) = s.poll(now) {
                        match &a {
                            Action::FetchPeer { peer, chunks } => {
                                assert!(!s.is_excluded(peer) && !s.is_benched(peer));
                                for c in chunks {
                                    assert!(!s.have().get(*c));
                                    assert!(s.known.get(*c));
                                }
                            }
                            Action::FetchOrigin { chunks } => {
                                assert!(chunks.windows(2).all(|w| w[1] == w[0] + 1));
                                assert!(chunks.len() as u32 <= s.cfg.origin_run);
                            }
                            _ => {}
                        }
                        assert!(s.origin_runs.len() as u32 <= s.cfg.origin_requests);
                        assert_eq!(s.origin_inflight as usize, s.origin_run_of.len());
                        assert!(s.peer_inflight <= s.cfg.max_inflight);
                        assert!(s.peers.values().all(|p| p.inflight <= s.cfg.peer_depth));
                        // Availability counts exactly the peers in play.
                        for c in 0..n {
                            let holders = s.peers.values().filter(|p| p.counted() && p.have.get(c)).count();
                            assert_eq!(s.avail[c as usize] as usize, holders);
                        }
                        log.push(format!("{a:?}"));
                        assert!(log.len() < 100_000);
                    }
                }
                log
            };
            proptest::prop_assert_eq!(run(), run());
        }
    }
}
