//! The discrete-event simulation: members running the production
//! [`Session`] (and through it the production scheduler) for each layer,
//! the production tracker core, the origin, and the flow-level network.
//!
//! What is modelled, and how:
//! - **Time**: microseconds in an event queue ordered by (time, insertion),
//!   so equal times run in a fixed order and a seed gives one result.
//!   Sessions and the tracker see milliseconds, as in the daemon.
//! - **Tracker**: the real core, behind `tracker_cores` servers that each
//!   take `tracker_us` per request, in arrival order on the first one free
//!   (0 µs: no queueing), half a round trip each way. The last
//!   `tracker_serial_us` of each request hold the core's lock, one request
//!   at a time across all cores (the daemon's tracker serialises its JSON
//!   and speaks TLS outside the lock). During an outage requests are refused at once
//!   (`TrackerFailure::Down`). Members join with an announce before the pull
//!   and repeat it every announce interval, as the daemon's heartbeat does.
//! - **Chunk requests**: reach the holder after a round trip (request out,
//!   first byte back), take an upload slot or get `Busy`, answer `DontHave`
//!   for chunks the holder lacks, and send the rest in order as one flow;
//!   each chunk is delivered when its last byte is through. A cancelled
//!   request is dropped once it owes nothing else (as the daemon drops the
//!   stream); chunks still sent after a cancel are delivered, as late
//!   answers are.
//! - **Verification**: a member keeps the hash of each chunk it learns from
//!   lookups; a chunk is accepted only if what the holder sent matches that
//!   hash (a corrupt holder's chunks fail it and are reported). A request
//!   for a chunk whose hash is unknown is counted as a defect.
//! - **Origin**: one uplink of `origin_rate`; each Range run is a flow after
//!   a round trip; every byte it sends counts as egress, cut runs included.
//! - **Headers**: every link carries blob bytes at `1 − header_share` of its
//!   rate (0 by default; about 0.05 at a 1500-byte MTU).
//! - **Failures**: a halted member (churned or frozen) stops answering,
//!   announcing and pulling; requests to it hang until the requester's
//!   scheduler gives up on them.

use std::collections::HashMap;

use shoal_proto::announcer::Announcer;
use shoal_proto::sched::{Outcome, Source, PROGRESS_MS};
use shoal_proto::session::{HashBook, Io, Member, Session, SessionConfig, TrackerFailure};
use shoal_proto::slots::Appointments;
use shoal_proto::tracker_api::{
    Announce, BlobHave, BlobView, ChunkHash, HashCursor, LeaseRequest, NodeId, PeerAddr,
    PublishHashes, Rack, Report, TrackerError,
};
use shoal_proto::wire::{WATCHERS_PER_BLOB, WATCH_FRAME_GAP_MS};
use shoal_proto::{Bitfield, ChunkLayout, Digest};
use shoal_tracker::{Tracker, TrackerConfig};

use crate::net::{FlowId, FlowNet, LinkId};
use crate::queue::EventQueue;
use crate::report::{NodeResult, Outcome as RunOutcome, Report as RunReport};
use crate::rng::Rng;
use crate::scenario::{Scenario, Start};
use crate::timers::Timers;

/// The hashes a member learned, as 8-byte fingerprints (enough to tell a
/// corrupt chunk from a good one in the simulation, at a quarter of the
/// memory).
#[derive(Debug, Default)]
struct Known(Vec<u64>);

impl HashBook for Known {
    fn reset(&mut self) {
        self.0.iter_mut().for_each(|h| *h = 0);
    }

    fn learn(&mut self, chunk: u32, hash: &ChunkHash) {
        if let Some(slot) = self.0.get_mut(chunk as usize) {
            *slot = fingerprint(hash);
        }
    }
}

fn fingerprint(h: &ChunkHash) -> u64 {
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")).max(1)
}

type Sess = Session<u32, Known>;

/// The width of the delivered-bytes timeline's slots (µs).
const TIMELINE_US: u64 = 25_000;

enum LayerState {
    Waiting,
    Active(Box<Sess>),
    /// Taken out while the session runs (never seen between events).
    Running,
    Done,
}

/// Who sends a flow's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sender {
    Origin,
    Peer {
        /// The holder.
        node: u32,
        /// Its number in the requester's session.
        id: u32,
    },
}

#[derive(Debug)]
struct FlowData {
    to: u32,
    layer: u16,
    from: Sender,
    chunks: Vec<u32>,
    /// Cumulative byte offsets at which each chunk is through.
    ends: Vec<f64>,
    cancelled: Vec<bool>,
    next: usize,
    /// Reached its sender and is moving (else: in transit, or stuck at a
    /// halted sender).
    active: bool,
    /// Holds an upload slot at the sending member.
    slot: bool,
    /// When it took the slot (µs).
    slot_at: u64,
    /// Bytes already counted in the node and origin totals.
    credited: f64,
    /// Tells this request from every other (flow ids are reused, and a
    /// request moves to a new id when it starts moving).
    serial: u64,
}

struct Node {
    id: NodeId,
    /// Upload and download rate (bytes/s).
    rate: f64,
    addr: PeerAddr,
    up: LinkId,
    down: LinkId,
    rack: Option<u32>,
    /// What it tells the tracker of its rack.
    rack_label: Option<Rack>,
    layers: Vec<LayerState>,
    slots: u32,
    /// The retry times its `Busy` answers hand out.
    appointments: Appointments,
    halted: bool,
    /// Halts at this time (µs), if it churns.
    halts_at: Option<u64>,
    /// Halting, it shuts down cleanly: tells the tracker it leaves and
    /// closes its connections (else it just stops answering).
    leaves: bool,
    frozen: bool,
    malicious: bool,
    start: u64,
    done_at: Option<u64>,
    gave_up: bool,
    left: u32,
    /// Open requests to peers, for cancels: (layer, peer id, chunk) → flow.
    peer_reqs: HashMap<(u16, u32, u32), FlowId>,
    /// Open origin runs: (layer, chunk) → flow.
    origin_reqs: HashMap<(u16, u32), FlowId>,
    /// Per layer, the members watching this one: (watcher, this member's
    /// number in the watcher's session).
    watchers: Vec<Vec<(u32, u32)>>,
    /// Per layer, whether a watch frame is on its way out.
    flushing: Vec<bool>,
    /// Requests waiting for an upload slot: (flow, its version).
    waiting: std::collections::VecDeque<(FlowId, u32)>,
    up_bytes: f64,
    peer_bytes: f64,
    origin_bytes: f64,
    rejected: u64,
    /// Its downloads' announces: one on its way, the rest merged.
    announcer: Announcer,
}

enum Call {
    Lookup(Option<HashCursor>),
    Lease(LeaseRequest),
    Publish(PublishHashes),
    Announce(Announce),
    Report(Report),
}

struct Rpc {
    node: u32,
    /// When it reached the tracker (µs).
    arrived: u64,
    /// The session that waits for the answer (none: fire and forget).
    layer: Option<u16>,
    call: Call,
    /// A lookup served under the shared lock (nothing to expire first).
    shared: bool,
    /// The member's merged announce: its answer goes to its announcer.
    merged: bool,
}

enum Answer {
    Lookup(Result<BlobView, TrackerFailure>),
    Lease(Result<Vec<u32>, TrackerFailure>),
    Sent,
}

enum Ev {
    Join(u32),
    Heartbeat(u32),
    Start(u32),
    Halt(u32),
    Wake(u32, u16),
    TrackerIn(Box<Rpc>),
    /// The request takes the core's lock; answered (sent) at the time given.
    TrackerServe(Box<Rpc>, u64),
    Reply(u32, u16, Box<Answer>),
    /// A member's merged announce was answered.
    Announced(u32),
    Arrive(FlowId, u32),
    Refused {
        /// A `Busy` holder's retry-after time (µs).
        retry_at: Option<u64>,
        node: u32,
        layer: u16,
        peer: u32,
        chunks: Vec<u32>,
        outcome: Outcome,
    },
    Boundary(FlowId),
    /// Request `serial`, under flow id `FlowId`, reports its bytes moving
    /// ([`Event::Progress`](shoal_proto::sched::Event::Progress)) if they
    /// do, every [`PROGRESS_MS`] while it moves.
    Tick(FlowId, u64),
    /// A watch request reaches `holder`.
    WatchOpen {
        watcher: u32,
        layer: u16,
        /// The holder's number in the watcher's session.
        id: u32,
        holder: u32,
    },
    /// `holder` sends its watchers of `layer` its current bitfield.
    WatchFlush(u32, u16),
    /// A watch frame (or its end, `None`) reaches the watcher.
    WatchFrame {
        watcher: u32,
        layer: u16,
        id: u32,
        have: Option<Bitfield>,
    },
}

impl Ev {
    /// Its place in [`Counters::events_by_kind`].
    fn kind(&self) -> usize {
        match self {
            Ev::Join(_) | Ev::Heartbeat(_) => 0,
            Ev::Start(_) | Ev::Halt(_) => 1,
            Ev::Wake(..) => 2,
            Ev::TrackerIn(_) | Ev::TrackerServe(..) | Ev::Reply(..) | Ev::Announced(_) => 3,
            Ev::Arrive(..) => 4,
            Ev::Refused { .. } => 5,
            Ev::Boundary(_) => 6,
            Ev::Tick(..) => 7,
            Ev::WatchOpen { .. } => 8,
            Ev::WatchFlush(..) => 9,
            Ev::WatchFrame { .. } => 10,
        }
    }
}

/// Counters a run reports besides per-node results.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Events processed.
    pub events: u64,
    /// Of which: joins and heartbeats, starts and halts, session wake-ups,
    /// tracker work (requests in, served, answers back), peer requests
    /// reaching holders, refusals, chunk boundaries, progress ticks, watch
    /// opens, flushes and frames.
    pub events_by_kind: [u64; 11],
    /// Tracker requests served (refused ones included).
    pub tracker_requests: u64,
    /// Of which lookups, leases, publishes, announces, reports.
    pub tracker_by_kind: [u64; 5],
    /// The longest a request waited in the tracker's queue (µs).
    pub tracker_max_wait_us: u64,
    /// Peer requests answered `Busy`.
    pub busy: u64,
    /// Chunk answers that failed verification (corrupt holders).
    pub bad_chunks: u64,
    /// Requests for chunks whose hash the requester did not know (must be 0).
    pub unverifiable_requests: u64,
    /// Times a session asked to be woken at a time already past, which
    /// would make the daemon spin (must be 0).
    pub past_deadlines: u64,
    /// Corrupt chunks stored (must be 0).
    pub corrupt_stored: u64,
    /// Watch frames (bitfields of watched peers) delivered.
    pub watch_frames: u64,
}

/// How long a connection to a halted member lives on (the daemon's QUIC
/// idle timeout).
const IDLE_TIMEOUT_US: u64 = 30_000_000;

/// A simulation in progress.
pub struct Sim {
    sc: Scenario,
    cfg: SessionConfig,
    now: u64,
    seq: u64,
    /// Requests made so far (each request's serial).
    requests: u64,
    queue: EventQueue<Ev>,
    net: FlowNet<FlowData>,
    nodes: Vec<Node>,
    origin_up: LinkId,
    rack_links: Vec<(LinkId, LinkId)>,
    tracker: Tracker,
    /// When each tracker core is free again.
    tracker_free_at: Vec<u64>,
    /// When the tracker core's lock is free again of the requests that
    /// hold it alone.
    tracker_lock_free_at: u64,
    /// When the lookups holding the lock shared are done with it.
    tracker_readers_until: u64,
    announce_every_us: u64,
    blobs: Vec<(Digest, ChunkLayout)>,
    /// When the pull starts (µs); reported times count from here.
    t0: u64,
    origin_bytes: f64,
    /// When the origin last sent a byte (µs).
    origin_done: u64,
    counters: Counters,
    /// A member whose session work is printed (`SHOAL_SIM_TRACE=INDEX`).
    trace: Option<u32>,
    /// Network jitter (seeded from the scenario's seed).
    rng: Rng,
    /// Each moving flow's next chunk boundary.
    boundaries: Timers,
    /// Each member's next session deadline per layer (id: member × layers
    /// + layer): one entry each, moved when a deadline comes sooner.
    wakes: Timers,
    /// Print progress to stderr every two million events.
    pub progress: bool,
    /// Bytes delivered to members in each [`TIMELINE_US`] of the pull,
    /// from peers and from the origin (`SHOAL_SIM_TIMELINE=1` prints them
    /// as shares of the members' downlinks: where a pull loses time).
    delivered: Vec<(f64, f64)>,
}

fn node_name(i: u32) -> String {
    format!("n{i}")
}

/// How a tracker error reads to the session (as the daemon's client reads it).
fn refusal(e: TrackerError) -> TrackerFailure {
    match e {
        TrackerError::Excluded { .. } => TrackerFailure::Excluded,
        _ => TrackerFailure::Refused,
    }
}

/// Peers are named `n<index>`: the simulator's resolver.
fn resolve(node: &NodeId, _: &PeerAddr) -> Option<u32> {
    node.as_str().strip_prefix('n')?.parse().ok()
}

fn mix(a: u64, b: u64) -> [u8; 32] {
    let mut r = Rng::new(a.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ b);
    let mut out = [0u8; 32];
    for c in out.chunks_mut(8) {
        c.copy_from_slice(&r.next_u64().to_le_bytes());
    }
    out
}

/// Where each of `chunks`, sent in order, is through: cumulative bytes.
fn ends_of(layout: &ChunkLayout, chunks: &[u32]) -> Vec<f64> {
    let mut end = 0.0;
    chunks
        .iter()
        .map(|&c| {
            end += f64::from(layout.chunk_len(c).unwrap_or(0));
            end
        })
        .collect()
}

/// The true hash of a chunk of a layer.
fn chunk_hash(layer: u16, chunk: u32) -> ChunkHash {
    ChunkHash::from_bytes(mix(u64::from(layer) + 1, u64::from(chunk)))
}

impl Sim {
    /// Sets up a run of `sc` (validated).
    pub fn new(sc: Scenario) -> anyhow::Result<Sim> {
        sc.validate()?;
        let mut rng = Rng::new(sc.seed);
        let mut net = FlowNet::new(sc.sharing());
        // Blob bytes a link of `rate` carries a second.
        let payload = |rate: f64| rate * (1.0 - sc.header_share);
        let origin_up = net.add_link(payload(sc.origin_rate() as f64));
        let rack_cap = sc.rack_uplink.map_or(f64::INFINITY, |r| payload(r as f64));
        let rack_links = (0..sc.racks)
            .map(|_| (net.add_link(rack_cap), net.add_link(rack_cap)))
            .collect();
        let tracker_cfg = TrackerConfig {
            max_members: (sc.nodes as usize + 16).max(TrackerConfig::default().max_members),
            max_blob_lease_bytes: sc
                .blob_lease_bytes
                .unwrap_or(TrackerConfig::default().max_blob_lease_bytes),
            ..TrackerConfig::default()
        };
        let announce_every_us = tracker_cfg.announce_interval_ms * 1000;
        let tracker = Tracker::new(tracker_cfg)?;
        let blobs = (0..sc.layers)
            .map(|l| {
                let layout = ChunkLayout::new(sc.layer_bytes, sc.chunk_size).expect("validated");
                (Digest::from_bytes(mix(0, u64::from(l))), layout)
            })
            .collect();

        // Roles, drawn once per node in index order.
        let n = sc.nodes;
        let slow_rate = sc.slow_rate.unwrap_or(sc.rate);
        // Joins take the tracker this long; the pull starts after them.
        let t0 = 1_000_000 + u64::from(n) * sc.tracker_us;
        let mut nodes = Vec::with_capacity(n as usize);
        for i in 0..n {
            let rate = if rng.unit() < sc.slow_fraction {
                slow_rate
            } else {
                sc.rate
            } as f64;
            let role = rng.unit();
            let halts = role < sc.churn;
            // The first `churn_leaves` of the churned (same draw).
            let leaves = halts && role < sc.churn * sc.churn_leaves;
            let frozen = !halts && role < sc.churn + sc.frozen;
            let malicious = !halts && !frozen && role < sc.churn + sc.frozen + sc.malicious;
            let start = t0
                + match sc.start {
                    Start::AllAtOnce => 0,
                    Start::Staggered { over_ms } => {
                        over_ms * 1000 * u64::from(i) / u64::from(n.max(1))
                    }
                    Start::Waves { count, gap_ms } => u64::from(i * count / n) * gap_ms * 1000,
                };
            let halts_at = if halts {
                Some(start + rng.below(sc.churn_window_ms.max(1) * 1000))
            } else if frozen {
                Some(t0)
            } else {
                None
            };
            let name = node_name(i);
            nodes.push(Node {
                id: name.parse().expect("valid node id"),
                rate,
                addr: format!("{name}:7000").parse().expect("valid address"),
                up: net.add_link(
                    sc.upload_cap
                        .map_or(payload(rate), |c| payload(rate).min(c as f64)),
                ),
                down: net.add_link(payload(rate)),
                rack: (sc.racks > 0).then(|| i % sc.racks),
                rack_label: (sc.racks > 0 && sc.rack_labels).then(|| {
                    format!("rack-{}", i % sc.racks)
                        .parse()
                        .expect("a valid rack name")
                }),
                layers: (0..sc.layers).map(|_| LayerState::Waiting).collect(),
                slots: 0,
                appointments: Appointments::new(),
                halted: false,
                halts_at,
                leaves,
                frozen,
                malicious,
                start,
                done_at: None,
                gave_up: false,
                left: sc.layers,
                peer_reqs: HashMap::new(),
                origin_reqs: HashMap::new(),
                watchers: vec![Vec::new(); sc.layers as usize],
                flushing: vec![false; sc.layers as usize],
                waiting: std::collections::VecDeque::new(),
                up_bytes: 0.0,
                peer_bytes: 0.0,
                origin_bytes: 0.0,
                rejected: 0,
                announcer: Announcer::default(),
            });
        }
        let sc_seed = sc.seed;
        let tracker_cores = sc.tracker_cores.max(1) as usize;
        let mut cfg = SessionConfig::default();
        if let Some(ms) = sc.lookup_interval_ms {
            cfg.sched.lookup_interval_ms = ms;
        }
        if let Some(ms) = sc.hurried_lookup_ms {
            cfg.sched.hurried_lookup_ms = ms;
        }
        if let Some(ms) = sc.announce_every_ms {
            cfg.announce_every_ms = ms;
        }
        if let Some(ms) = sc.keepalive_ms {
            cfg.keepalive_ms = ms;
        }
        if let Some(w) = sc.watch_peers {
            cfg.watch_peers = w;
        }
        if let Some(d) = sc.peer_depth {
            cfg.sched.peer_depth = d;
        }
        if let Some(m) = sc.max_inflight {
            cfg.sched.max_inflight = m;
        }
        let mut sim = Sim {
            sc,
            cfg,
            now: 0,
            seq: 0,
            requests: 0,
            queue: EventQueue::default(),
            net,
            nodes,
            origin_up,
            rack_links,
            tracker,
            tracker_free_at: vec![0; tracker_cores],
            tracker_lock_free_at: 0,
            tracker_readers_until: 0,
            announce_every_us,
            blobs,
            t0,
            origin_bytes: 0.0,
            origin_done: 0,
            counters: Counters::default(),
            delivered: Vec::new(),
            trace: std::env::var("SHOAL_SIM_TRACE")
                .ok()
                .and_then(|v| v.parse().ok()),
            rng: Rng::new(sc_seed ^ 0x6a09_e667_f3bc_c909),
            boundaries: Timers::default(),
            wakes: Timers::default(),
            progress: false,
        };
        for i in 0..n {
            // Joins spread over the first half second, as daemons start.
            let join = rng.below(500_000);
            sim.at(join, Ev::Join(i));
            let start = sim.nodes[i as usize].start;
            sim.at(start, Ev::Start(i));
            if let Some(t) = sim.nodes[i as usize].halts_at {
                sim.at(t, Ev::Halt(i));
            }
        }
        Ok(sim)
    }

    fn at(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(at.max(self.now), self.seq, ev);
    }

    fn ms(&self) -> u64 {
        self.now / 1000
    }

    /// One way across the network: half the round trip, plus up to a
    /// quarter of it again at random (jitter: without it members acting at
    /// the same millisecond would reach a holder in index order every time,
    /// and the last index would always find its upload slots taken).
    fn half_rtt(&mut self) -> u64 {
        let half = self.sc.rtt_us / 2;
        half + self.rng.below(half / 2 + 1)
    }

    /// Runs to the end (every member done, halted or given up, or
    /// `max_sim_ms`) and reports.
    pub fn run(mut self) -> RunReport {
        let limit = self.t0 + self.sc.max_sim_ms * 1000;
        let mut pending = self.nodes.iter().filter(|n| n.halts_at.is_none()).count();
        while pending > 0 {
            // The earliest of the next event, chunk boundary and wake-up.
            let event = self.queue.peek();
            let boundary = self.boundaries.peek().map(|(at, seq, _)| (at, seq));
            let wake = self.wakes.peek().map(|(at, seq, _)| (at, seq));
            // A boundary shares its seq with the event set before it, and
            // goes after it.
            let queued = event.into_iter().chain(wake).min();
            let first = match (queued, boundary) {
                (q, Some(b)) if q.is_none_or(|q| b < q) => Some(b),
                (q, _) => q,
            };
            let (at, ev) = match first {
                None => break,
                Some(first) if Some(first) == boundary && queued != Some(first) => {
                    let (at, _, f) = self.boundaries.peek().expect("peeked");
                    self.boundaries.remove(f);
                    (at, Ev::Boundary(f))
                }
                Some(first) if Some(first) == wake => {
                    let (at, _, k) = self.wakes.peek().expect("peeked");
                    self.wakes.remove(k);
                    let layers = self.sc.layers;
                    (at, Ev::Wake(k / layers, (k % layers) as u16))
                }
                Some(_) => self.queue.pop().expect("peeked"),
            };
            if at > limit {
                break;
            }
            self.now = at;
            self.counters.events += 1;
            self.counters.events_by_kind[ev.kind()] += 1;
            if self.handle(ev) {
                pending -= 1;
            }
            if self.progress && self.counters.events % 2_000_000 == 0 {
                eprintln!(
                    "shoal-sim: {} events, {:.3} s simulated, {} members still pulling",
                    self.counters.events,
                    self.now.saturating_sub(self.t0) as f64 / 1e6,
                    pending
                );
            }
        }
        self.report(pending == 0)
    }

    /// Handles one event; returns whether a member that must finish just did.
    fn handle(&mut self, ev: Ev) -> bool {
        match ev {
            Ev::Join(i) => {
                self.announce(i, true);
                let next = self.now + self.announce_every_us;
                self.at(next, Ev::Heartbeat(i));
            }
            Ev::Heartbeat(i) => {
                if !self.nodes[i as usize].halted {
                    self.announce(i, false);
                    let next = self.now + self.announce_every_us;
                    self.at(next, Ev::Heartbeat(i));
                }
            }
            Ev::Start(i) => return self.start(i),
            Ev::Halt(i) => self.halt(i),
            Ev::Wake(i, l) => return self.drive(i, l),
            Ev::TrackerIn(rpc) => self.tracker_in(rpc),
            Ev::TrackerServe(rpc, done) => self.tracker_serve(*rpc, done),
            Ev::Announced(i) => {
                let node = &mut self.nodes[i as usize];
                if let Some(a) = node.announcer.answered() {
                    if !node.halted {
                        self.send_announce(i, a);
                    }
                }
            }
            Ev::Reply(i, l, answer) => {
                let now = self.ms();
                let Some(s) = self.session(i, l) else {
                    return false;
                };
                match *answer {
                    Answer::Lookup(r) => {
                        s.on_lookup(now, r);
                    }
                    Answer::Lease(r) => {
                        s.on_lease(now, r);
                    }
                    Answer::Sent => s.on_sent(),
                }
                return self.drive(i, l);
            }
            Ev::Arrive(f, v) => {
                if self
                    .net
                    .get(f)
                    .is_some_and(|fl| fl.version == v && !fl.data.active)
                {
                    self.arrive(f);
                }
            }
            Ev::Refused {
                retry_at,
                node,
                layer,
                peer,
                chunks,
                outcome,
            } => {
                let now = self.ms();
                if self.trace == Some(node) {
                    eprintln!(
                        "{} n{node}/{layer} peer {peer} {outcome:?} {chunks:?}",
                        self.now
                    );
                }
                let Some(s) = self.session(node, layer) else {
                    return false;
                };
                for c in chunks {
                    s.on_chunk(now, Source::Peer(peer), c, outcome, None);
                }
                if let Some(t) = retry_at {
                    s.peer_busy_until(peer, t.div_ceil(1000));
                }
                return self.drive(node, layer);
            }
            Ev::Boundary(f) => return self.boundary(f),
            Ev::Tick(f, serial) => return self.tick(f, serial),
            Ev::WatchOpen {
                watcher,
                layer,
                id,
                holder,
            } => self.watch_open(watcher, layer, id, holder),
            Ev::WatchFlush(holder, layer) => self.watch_flush(holder, layer),
            Ev::WatchFrame {
                watcher,
                layer,
                id,
                have,
            } => {
                let now = self.ms();
                self.counters.watch_frames += 1;
                let Some(s) = self.session(watcher, layer) else {
                    return false;
                };
                if s.on_watch(now, id, have) {
                    return self.drive(watcher, layer);
                }
            }
        }
        false
    }

    /// A watch frame (or, `None`, the watch's end) reaches `watcher` at `at`.
    fn frame(&mut self, at: u64, watcher: u32, layer: u16, id: u32, have: Option<Bitfield>) {
        self.at(
            at,
            Ev::WatchFrame {
                watcher,
                layer,
                id,
                have,
            },
        );
    }

    /// What member `node` holds of layer `l`, as a watch frame carries it
    /// (`None`: nothing to say, it has not started the layer).
    fn bitfield(&self, node: u32, l: u16) -> Option<Bitfield> {
        match &self.nodes[node as usize].layers[l as usize] {
            LayerState::Done => Bitfield::full(self.blobs[l as usize].1.count()).ok(),
            LayerState::Active(s) => Some(s.have().clone()),
            LayerState::Waiting | LayerState::Running => None,
        }
    }

    fn watch_open(&mut self, watcher: u32, l: u16, id: u32, holder: u32) {
        let h = &self.nodes[holder as usize];
        if h.halted {
            return; // the watch hangs until the watcher's session ends
        }
        let bits = self.bitfield(holder, l);
        let refused = h.watchers[l as usize].len() >= WATCHERS_PER_BLOB
            || bits.as_ref().is_none_or(|b| b.is_full());
        if !refused {
            self.nodes[holder as usize].watchers[l as usize].push((watcher, id));
        }
        let at = self.now + self.half_rtt();
        self.frame(at, watcher, l, id, bits.clone());
        if refused {
            // A complete holder's full bitfield ends the watch; a refusal
            // ends it at once.
            self.frame(at, watcher, l, id, None);
        }
    }

    /// Member `node` stored a chunk of layer `l`: its watchers hear of it
    /// after the server's frame gap (frames coalesce) and half a round trip.
    fn watch_stored(&mut self, node: u32, l: u16) {
        let n = &mut self.nodes[node as usize];
        if n.flushing[l as usize] || n.watchers[l as usize].is_empty() {
            return;
        }
        n.flushing[l as usize] = true;
        let at = self.now + WATCH_FRAME_GAP_MS * 1000;
        self.at(at, Ev::WatchFlush(node, l));
    }

    fn watch_flush(&mut self, holder: u32, l: u16) {
        self.nodes[holder as usize].flushing[l as usize] = false;
        if self.nodes[holder as usize].halted {
            return;
        }
        let Some(bits) = self.bitfield(holder, l) else {
            return;
        };
        let full = bits.is_full();
        let watchers = std::mem::take(&mut self.nodes[holder as usize].watchers[l as usize]);
        let mut kept = Vec::with_capacity(watchers.len());
        for (w, id) in watchers {
            // Watchers done with the layer closed their streams.
            if !matches!(
                self.nodes[w as usize].layers[l as usize],
                LayerState::Active(_)
            ) {
                continue;
            }
            let at = self.now + self.half_rtt();
            self.frame(at, w, l, id, Some(bits.clone()));
            if full {
                self.frame(at, w, l, id, None);
            } else {
                kept.push((w, id));
            }
        }
        self.nodes[holder as usize].watchers[l as usize] = kept;
    }

    fn session(&mut self, i: u32, l: u16) -> Option<&mut Sess> {
        let node = &mut self.nodes[i as usize];
        if node.halted {
            return None;
        }
        match &mut node.layers[l as usize] {
            LayerState::Active(s) => Some(s),
            _ => None,
        }
    }

    fn announce(&mut self, i: u32, full: bool) {
        let node = &self.nodes[i as usize];
        if let Ok(a) = Announce::new(node.id.clone(), node.addr.clone(), vec![], vec![], full) {
            let a = a.with_rack(node.rack_label.clone());
            self.rpc(i, None, Call::Announce(a));
        }
    }

    fn start(&mut self, i: u32) -> bool {
        if self.nodes[i as usize].halted {
            return false;
        }
        for l in 0..self.sc.layers as u16 {
            let (digest, layout) = self.blobs[l as usize];
            let node = &self.nodes[i as usize];
            let me = Member {
                node: node.id.clone(),
                addr: node.addr.clone(),
                rack: node.rack_label.clone(),
            };
            let known = Known(vec![0; layout.count() as usize]);
            let s = Session::new(
                self.cfg.clone(),
                digest,
                layout,
                Bitfield::for_layout(&layout),
                Some(me),
                resolve,
                known,
            );
            self.nodes[i as usize].layers[l as usize] = LayerState::Active(Box::new(s));
        }
        let mut finished = false;
        for l in 0..self.sc.layers as u16 {
            finished |= self.drive(i, l);
        }
        finished
    }

    /// Stops a member for good: it answers nobody, and its own pulls end.
    fn halt(&mut self, i: u32) {
        let node = &mut self.nodes[i as usize];
        if node.halted {
            return;
        }
        node.halted = true;
        for l in node.layers.iter_mut() {
            if matches!(l, LayerState::Active(_)) {
                *l = LayerState::Done;
            }
        }
        let mine: Vec<FlowId> = node
            .peer_reqs
            .values()
            .chain(node.origin_reqs.values())
            .copied()
            .collect();
        node.peer_reqs.clear();
        node.origin_reqs.clear();
        // Its watchers' streams die with the connection's idle timeout.
        let watchers: Vec<(u16, u32, u32)> = node
            .watchers
            .iter_mut()
            .enumerate()
            .flat_map(|(l, ws)| {
                std::mem::take(ws)
                    .into_iter()
                    .map(move |(w, id)| (l as u16, w, id))
            })
            .collect();
        // Its watchers' streams end with the connection: at once when it
        // closes it, else at the idle timeout.
        let leaves = node.leaves;
        let leave = leaves.then(|| Announce::leave(node.id.clone(), node.addr.clone()));
        let waiting: Vec<FlowId> = if leaves {
            node.waiting.drain(..).map(|(f, _)| f).collect()
        } else {
            Vec::new()
        };
        let at = self.now
            + if leaves {
                self.half_rtt()
            } else {
                IDLE_TIMEOUT_US
            };
        for (layer, watcher, id) in watchers {
            self.frame(at, watcher, layer, id, None);
        }
        if let Some(a) = leave {
            self.rpc(i, None, Call::Announce(a));
        }
        for f in mine {
            if self.net.get(f).is_some_and(|fl| fl.data.to == i) {
                self.end_flow(f);
            }
        }
        // Its uploads stop moving: they hang until their requesters cancel.
        let uploads: Vec<FlowId> = self
            .net
            .ids()
            .filter(|&f| {
                let d = &self.net.get(f).expect("live").data;
                matches!(d.from, Sender::Peer { node, .. } if node == i)
            })
            .collect();
        for f in uploads {
            if leaves {
                // Closed: its requesters hear at once.
                self.close_upload(f);
                continue;
            }
            self.credit(f);
            let changed = self.net.detach(self.now, f);
            self.boundaries.remove(f);
            self.reschedule(&changed);
        }
        for f in waiting {
            if self.net.get(f).is_some() {
                self.close_upload(f);
            }
        }
    }

    /// A request to a member that shut down: it ends, and its requester
    /// hears the connection closed (the chunks still owed fail).
    fn close_upload(&mut self, f: FlowId) {
        let d = &self.net.get(f).expect("live").data;
        let Sender::Peer { id, .. } = d.from else {
            return;
        };
        let (to, layer) = (d.to, d.layer);
        let owed: Vec<u32> = (d.next..d.chunks.len())
            .filter(|&k| !d.cancelled[k])
            .map(|k| d.chunks[k])
            .collect();
        self.end_flow(f);
        if !owed.is_empty() {
            self.refuse(to, layer, id, owed, Outcome::Failed);
        }
    }
}

impl Sim {
    /// Runs a session's pending work; returns whether its member just
    /// finished the whole image.
    fn drive(&mut self, i: u32, l: u16) -> bool {
        let slot = &mut self.nodes[i as usize].layers[l as usize];
        if !matches!(slot, LayerState::Active(_)) {
            return false;
        }
        let LayerState::Active(mut s) = std::mem::replace(slot, LayerState::Running) else {
            unreachable!("checked above");
        };
        let now = self.ms();
        // This member's downloads share its chunks in flight from peers.
        let downloads = self.nodes[i as usize]
            .layers
            .iter()
            .filter(|l| matches!(l, LayerState::Active(_) | LayerState::Running))
            .count();
        s.set_downloads(downloads as u32);
        let mut complete = false;
        let trace = self.trace == Some(i);
        while let Some(io) = s.poll(now) {
            if trace {
                let to = match &io {
                    Io::FetchPeer { peer, .. } => s.peer(*peer).map(|p| p.1),
                    _ => None,
                };
                eprintln!("{} n{i}/{l} {io:?} {to:?}", self.now);
            }
            match io {
                Io::Complete => {
                    complete = true;
                    break;
                }
                Io::GiveUp => {
                    self.nodes[i as usize].gave_up = true;
                    complete = true;
                    break;
                }
                io => self.perform(i, l, &s, io),
            }
        }
        if complete {
            for io in s.finish() {
                self.perform(i, l, &s, io);
            }
            let node = &mut self.nodes[i as usize];
            node.layers[l as usize] = LayerState::Done;
            node.left -= 1;
            // Its watchers get the full bitfield, which ends their watches.
            self.watch_stored(i, l);
            let node = &mut self.nodes[i as usize];
            if node.left == 0 {
                node.done_at = Some(self.now);
                // Members that halt later are not waited for.
                return node.halts_at.is_none();
            }
            return false;
        }
        let next = s.next_deadline();
        if trace {
            eprintln!(
                "{} n{i}/{l} have {} next {next:?}",
                self.now,
                s.have().count()
            );
        }
        self.nodes[i as usize].layers[l as usize] = LayerState::Active(s);
        if let Some(t) = next {
            // A deadline already past would have the daemon spin until an
            // event: counted as a defect, and looked at a millisecond later.
            if t * 1000 <= self.now {
                self.counters.past_deadlines += 1;
            }
            let t = (t * 1000).max(self.now + 1000);
            let k = i * self.sc.layers + u32::from(l);
            if self.wakes.get(k).is_none_or(|w| t < w) {
                self.seq += 1;
                self.wakes.set(k, t, self.seq);
            }
        }
        false
    }

    fn perform(&mut self, i: u32, l: u16, s: &Sess, io: Io) {
        match io {
            Io::Lookup { since } => self.rpc(i, Some(l), Call::Lookup(since)),
            Io::Lease(r) => self.rpc(i, Some(l), Call::Lease(r)),
            Io::Publish(p) => self.rpc(i, Some(l), Call::Publish(p)),
            Io::Announce(a) if self.sc.merge_announces => {
                // As the daemon does: the member's announcer sends it, or
                // merges it with what waits; the download goes on at once.
                if let Some(a) = self.nodes[i as usize].announcer.submit(a) {
                    self.send_announce(i, a);
                }
                self.at(self.now, Ev::Reply(i, l, Box::new(Answer::Sent)));
            }
            Io::Announce(a) => self.rpc(i, Some(l), Call::Announce(a)),
            Io::Report(r) => self.rpc(i, None, Call::Report(r)),
            Io::FetchPeer { peer, chunks } => {
                let Some(&(_, holder)) = s.peer(peer) else {
                    return;
                };
                for &c in &chunks {
                    if s.hashes().0.get(c as usize).is_none_or(|&h| h == 0) {
                        self.counters.unverifiable_requests += 1;
                    }
                }
                let from = Sender::Peer {
                    node: holder,
                    id: peer,
                };
                let f = self.request(i, l, from, chunks.clone());
                let node = &mut self.nodes[i as usize];
                for c in chunks {
                    node.peer_reqs.insert((l, peer, c), f);
                }
            }
            Io::FetchOrigin { chunks } => {
                let f = self.request(i, l, Sender::Origin, chunks.clone());
                let node = &mut self.nodes[i as usize];
                for c in chunks {
                    node.origin_reqs.insert((l, c), f);
                }
            }
            Io::CancelPeer { peer, chunk } => {
                let Some(f) = self.nodes[i as usize].peer_reqs.remove(&(l, peer, chunk)) else {
                    return;
                };
                self.cancel(f, i, l, chunk);
            }
            Io::CancelOrigin { chunk } => {
                let Some(f) = self.nodes[i as usize].origin_reqs.remove(&(l, chunk)) else {
                    return;
                };
                // The daemon aborts the whole Range request.
                if self.owns(f, i, l, chunk) {
                    self.end_flow(f);
                }
            }
            Io::Watch { peer } => {
                let Some(&(_, holder)) = s.peer(peer) else {
                    return;
                };
                let at = self.now + self.half_rtt();
                self.at(
                    at,
                    Ev::WatchOpen {
                        watcher: i,
                        layer: l,
                        id: peer,
                        holder,
                    },
                );
            }
            Io::Complete | Io::GiveUp => {}
        }
    }

    /// Whether flow `f` is member `i`'s request carrying `chunk` of layer `l`.
    fn owns(&self, f: FlowId, i: u32, l: u16, chunk: u32) -> bool {
        self.net.get(f).is_some_and(|fl| {
            fl.data.to == i && fl.data.layer == l && fl.data.chunks.contains(&chunk)
        })
    }

    fn cancel(&mut self, f: FlowId, i: u32, l: u16, chunk: u32) {
        if !self.owns(f, i, l, chunk) {
            return;
        }
        let d = &mut self.net.get_mut(f).expect("owned").data;
        if let Some(k) = d.chunks.iter().position(|&c| c == chunk) {
            d.cancelled[k] = true;
        }
        // Dropped once it owes nothing else (the stream is reset).
        if d.cancelled[d.next..].iter().all(|&c| c) {
            self.end_flow(f);
        }
    }

    /// A request of member `i` for `chunks` of layer `l`: it reaches its
    /// sender a round trip from now (request out, first byte back).
    fn request(&mut self, i: u32, l: u16, from: Sender, chunks: Vec<u32>) -> FlowId {
        let ends = ends_of(&self.blobs[l as usize].1, &chunks);
        let n = chunks.len();
        let data = FlowData {
            to: i,
            layer: l,
            from,
            chunks,
            ends,
            cancelled: vec![false; n],
            next: 0,
            active: false,
            slot: false,
            slot_at: 0,
            credited: 0.0,
            serial: self.requests,
        };
        self.requests += 1;
        let (f, _) = self.net.start(self.now, &[], data);
        let at = self.now + self.half_rtt() + self.half_rtt();
        let v = self.net.get(f).expect("just started").version;
        self.at(at, Ev::Arrive(f, v));
        f
    }

    /// The links a flow from `from` to member `to` crosses.
    fn path(&self, from: Sender, to: u32) -> Vec<LinkId> {
        let dst = &self.nodes[to as usize];
        let mut links = Vec::with_capacity(4);
        let src_rack = match from {
            Sender::Origin => {
                links.push(self.origin_up);
                None
            }
            Sender::Peer { node, .. } => {
                let src = &self.nodes[node as usize];
                links.push(src.up);
                src.rack
            }
        };
        if src_rack != dst.rack {
            if let Some(r) = src_rack {
                links.push(self.rack_links[r as usize].0);
            }
            if let Some(r) = dst.rack {
                links.push(self.rack_links[r as usize].1);
            }
        }
        links.push(dst.down);
        links
    }

    /// A request reached its sender.
    fn arrive(&mut self, f: FlowId) {
        let fl = self.net.get(f).expect("checked by the caller");
        let (to, layer, from) = (fl.data.to, fl.data.layer, fl.data.from);
        if self.nodes[to as usize].halted {
            self.end_flow(f);
            return;
        }
        if let Sender::Peer { node, id } = from {
            let holder = &self.nodes[node as usize];
            if holder.halted && holder.leaves {
                self.close_upload(f);
                return;
            }
            if holder.halted {
                return; // it hangs until the requester gives up
            }
            if holder.slots >= self.sc.upload_slots {
                // Queued for a slot while the queue has room, as the
                // daemon's server holds a request until a slot frees.
                if holder.waiting.len() < self.sc.upload_queue as usize {
                    let v = self.net.get(f).expect("live").version;
                    self.nodes[node as usize].waiting.push_back((f, v));
                    return;
                }
                self.counters.busy += 1;
                let (d, _) = self.net.stop(self.now, f).expect("live");
                self.forget(&d.data);
                let retry = self.sc.busy_hint.then(|| {
                    let (slots, now) = (self.sc.upload_slots, self.now);
                    let n = &mut self.nodes[node as usize];
                    n.appointments.refuse(now, n.waiting.len(), slots)
                });
                self.refuse_until(to, layer, id, d.data.chunks, Outcome::Busy, retry);
                return;
            }
        }
        self.serve(f);
    }

    /// Member `to`'s request of layer `layer` to its peer `id` is answered
    /// `outcome` for `chunks`, half a round trip from now.
    fn refuse(&mut self, to: u32, layer: u16, id: u32, chunks: Vec<u32>, outcome: Outcome) {
        self.refuse_until(to, layer, id, chunks, outcome, None);
    }

    /// [`refuse`](Self::refuse), with the holder's retry-after time.
    fn refuse_until(
        &mut self,
        to: u32,
        layer: u16,
        id: u32,
        chunks: Vec<u32>,
        outcome: Outcome,
        retry_at: Option<u64>,
    ) {
        let at = self.now + self.half_rtt();
        self.at(
            at,
            Ev::Refused {
                retry_at,
                node: to,
                layer,
                peer: id,
                chunks,
                outcome,
            },
        );
    }

    /// A request takes an upload slot (if to a peer) and starts moving.
    fn serve(&mut self, f: FlowId) {
        let fl = self.net.get(f).expect("checked by the caller");
        let (to, layer, from) = (fl.data.to, fl.data.layer, fl.data.from);
        if let Sender::Peer { node, id } = from {
            // Chunks the holder lacks are answered at once.
            let lacks: Vec<u32> = {
                let d = &self.net.get(f).expect("live").data;
                d.chunks
                    .iter()
                    .copied()
                    .filter(|&c| !self.holds(node, layer, c))
                    .collect()
            };
            if !lacks.is_empty() && self.trace == Some(to) {
                let st = match &self.nodes[node as usize].layers[layer as usize] {
                    LayerState::Done => "done",
                    LayerState::Active(_) => "active",
                    LayerState::Waiting => "waiting",
                    LayerState::Running => "running",
                };
                eprintln!("{} n{to}/{layer} n{node} lacks {lacks:?} ({st})", self.now);
            }
            if !lacks.is_empty() {
                let layout = self.blobs[layer as usize].1;
                let d = &mut self.net.get_mut(f).expect("live").data;
                d.chunks.retain(|c| !lacks.contains(c));
                d.ends = ends_of(&layout, &d.chunks);
                d.cancelled = vec![false; d.chunks.len()];
                for &c in &lacks {
                    self.nodes[to as usize].peer_reqs.remove(&(layer, id, c));
                }
                self.refuse(to, layer, id, lacks, Outcome::DontHave);
                if self.net.get(f).expect("live").data.chunks.is_empty() {
                    self.net.stop(self.now, f);
                    return;
                }
            }
            self.nodes[node as usize].slots += 1;
        }
        // Off to the links: the placeholder becomes a moving flow.
        let (old, _) = self.net.stop(self.now, f).expect("live");
        let mut data = old.data;
        data.active = true;
        data.slot = matches!(from, Sender::Peer { .. });
        data.slot_at = self.now;
        let serial = data.serial;
        let links = self.path(from, to);
        let (nf, changed) = self.net.start(self.now, &links, data);
        self.rekey(to, f, nf);
        self.reschedule(&changed);
        self.at(self.now + PROGRESS_MS * 1000, Ev::Tick(nf, serial));
    }

    /// Request `serial` (flow `f`) tells its member its bytes are moving,
    /// as the daemon's peer and origin clients do; returns whether that
    /// member just finished.
    fn tick(&mut self, f: FlowId, serial: u64) -> bool {
        let Some(fl) = self.net.get(f) else {
            return false;
        };
        let d = &fl.data;
        if d.serial != serial || !d.active {
            return false;
        }
        // A flow stuck at a halted sender moves nothing.
        let next = (fl.rate > 0.0)
            .then(|| (d.next..d.chunks.len()).find(|&k| !d.cancelled[k]))
            .flatten();
        let (to, layer, chunk) = (d.to, d.layer, next.map(|k| d.chunks[k]));
        let source = match d.from {
            Sender::Origin => Source::Origin,
            Sender::Peer { id, .. } => Source::Peer(id),
        };
        self.at(self.now + PROGRESS_MS * 1000, Ev::Tick(f, serial));
        let Some(chunk) = chunk else {
            return false;
        };
        let now = self.ms();
        let Some(s) = self.session(to, layer) else {
            return false;
        };
        s.on_progress(now, source, chunk);
        self.drive(to, layer)
    }

    /// Requests of member `i` kept under flow id `old` are now under `new`.
    fn rekey(&mut self, i: u32, old: FlowId, new: FlowId) {
        if old == new {
            return;
        }
        let d = &self.net.get(new).expect("live").data;
        let (l, from, chunks) = (d.layer, d.from, d.chunks.clone());
        let node = &mut self.nodes[i as usize];
        for c in chunks {
            let slot = match from {
                Sender::Origin => node.origin_reqs.get_mut(&(l, c)),
                Sender::Peer { id, .. } => node.peer_reqs.get_mut(&(l, id, c)),
            };
            if let Some(v) = slot.filter(|v| **v == old) {
                *v = new;
            }
        }
    }

    /// Whether member `node` holds chunk `c` of layer `l` (verified).
    fn holds(&self, node: u32, l: u16, c: u32) -> bool {
        match &self.nodes[node as usize].layers[l as usize] {
            LayerState::Done => !self.nodes[node as usize].halted,
            LayerState::Active(s) => s.have().get(c),
            LayerState::Waiting | LayerState::Running => false,
        }
    }

    /// Schedules the next chunk boundary of each flow whose rate changed
    /// (replacing its timer, so a boundary is never delivered twice).
    fn reschedule(&mut self, flows: &[FlowId]) {
        for &f in flows {
            let Some(fl) = self.net.get(f) else {
                continue;
            };
            if !fl.data.active {
                continue;
            }
            let target = fl.data.ends[fl.data.next];
            match fl.reaches(target) {
                Some(t) => {
                    self.seq += 1;
                    self.boundaries.set(f, t.max(self.now), self.seq);
                }
                None => self.boundaries.remove(f),
            }
        }
    }

    /// Counts the bytes a flow moved since it was last counted.
    fn credit(&mut self, f: FlowId) {
        self.net.advance(f, self.now);
        let Some(fl) = self.net.get_mut(f) else {
            return;
        };
        let delta = fl.done - fl.data.credited;
        fl.data.credited = fl.done;
        let (to, from) = (fl.data.to, fl.data.from);
        match from {
            Sender::Origin => {
                if delta > 0.0 {
                    self.origin_done = self.now;
                }
                self.origin_bytes += delta;
                self.nodes[to as usize].origin_bytes += delta;
            }
            Sender::Peer { node, .. } => {
                self.nodes[node as usize].up_bytes += delta;
                self.nodes[to as usize].peer_bytes += delta;
            }
        }
    }

    /// Ends a flow (done, cancelled or its requester gone): its bytes are
    /// counted and its sender's slot freed.
    fn end_flow(&mut self, f: FlowId) {
        self.boundaries.remove(f);
        self.credit(f);
        let Some((fl, changed)) = self.net.stop(self.now, f) else {
            return;
        };
        self.forget(&fl.data);
        self.reschedule(&changed);
        if let (true, Sender::Peer { node, .. }) = (fl.data.slot, fl.data.from) {
            let (held, now) = (self.now - fl.data.slot_at, self.now);
            let n = &mut self.nodes[node as usize];
            n.appointments.served(held);
            n.appointments.freed(now, n.waiting.len());
            n.slots -= 1;
            self.admit(node);
        }
    }

    /// Hands member `node`'s free upload slots to the requests waiting for
    /// one, oldest first (those cancelled meanwhile are gone).
    fn admit(&mut self, node: u32) {
        while self.nodes[node as usize].slots < self.sc.upload_slots {
            let Some((f, v)) = self.nodes[node as usize].waiting.pop_front() else {
                return;
            };
            if self
                .net
                .get(f)
                .is_some_and(|fl| fl.version == v && !fl.data.active)
            {
                self.serve(f);
            }
        }
    }

    /// Drops the requester's cancel keys of a finished request.
    fn forget(&mut self, d: &FlowData) {
        let node = &mut self.nodes[d.to as usize];
        for &c in &d.chunks[d.next.min(d.chunks.len())..] {
            match d.from {
                Sender::Origin => {
                    node.origin_reqs.remove(&(d.layer, c));
                }
                Sender::Peer { id, .. } => {
                    node.peer_reqs.remove(&(d.layer, id, c));
                }
            }
        }
    }

    /// A flow's next chunk is through: deliver it.
    fn boundary(&mut self, f: FlowId) -> bool {
        match self.net.get(f) {
            Some(fl) if fl.data.active => {}
            _ => return false,
        }
        self.credit(f);
        let fl = self.net.get_mut(f).expect("live");
        // Rounding: the event was set for this boundary.
        fl.done = fl.done.max(fl.data.ends[fl.data.next]);
        fl.data.credited = fl.done;
        let d = &mut fl.data;
        let (to, layer, from) = (d.to, d.layer, d.from);
        let chunk = d.chunks[d.next];
        d.next += 1;
        let more = d.next < d.chunks.len() && !d.cancelled[d.next..].iter().all(|&c| c);
        match from {
            Sender::Origin => {
                self.nodes[to as usize].origin_reqs.remove(&(layer, chunk));
            }
            Sender::Peer { id, .. } => {
                self.nodes[to as usize]
                    .peer_reqs
                    .remove(&(layer, id, chunk));
            }
        }
        if more {
            self.reschedule(&[f]);
        } else {
            self.end_flow(f);
        }
        self.deliver(to, layer, from, chunk)
    }

    /// Member `to` receives `chunk` of layer `l` from `from` and checks it.
    fn deliver(&mut self, to: u32, l: u16, from: Sender, chunk: u32) -> bool {
        let truth = fingerprint(&chunk_hash(l, chunk));
        let now = self.ms();
        let (source, sent, hash) = match from {
            Sender::Origin => (Source::Origin, truth, Some(chunk_hash(l, chunk))),
            Sender::Peer { node, id } => {
                let sent = if self.nodes[node as usize].malicious {
                    truth ^ 1
                } else {
                    truth
                };
                (Source::Peer(id), sent, None)
            }
        };
        if self.trace == Some(to) {
            eprintln!("{} n{to}/{l} {from:?} delivers {chunk}", self.now);
        }
        let Some(s) = self.session(to, l) else {
            return false;
        };
        let outcome = match &source {
            Source::Origin => Outcome::Verified,
            Source::Peer(_) => match s.hashes().0.get(chunk as usize) {
                Some(&h) if h != 0 && h == sent => Outcome::Verified,
                _ => Outcome::Bad,
            },
        };
        if outcome == Outcome::Bad {
            self.counters.bad_chunks += 1;
            self.nodes[to as usize].rejected += 1;
        } else if sent != truth {
            self.counters.corrupt_stored += 1;
        }
        let slot = (self.now.saturating_sub(self.t0) / TIMELINE_US) as usize;
        if self.delivered.len() <= slot {
            self.delivered.resize(slot + 1, (0.0, 0.0));
        }
        let bytes = f64::from(self.blobs[l as usize].1.chunk_len(chunk).unwrap_or(0));
        match source {
            Source::Origin => self.delivered[slot].1 += bytes,
            Source::Peer(_) => self.delivered[slot].0 += bytes,
        }
        let s = self.session(to, l).expect("just found");
        if s.on_chunk(now, source, chunk, outcome, hash) {
            self.watch_stored(to, l);
        }
        self.drive(to, l)
    }

    fn rpc(&mut self, i: u32, layer: Option<u16>, call: Call) {
        self.rpc_with(i, layer, call, false);
    }

    /// Member `i`'s merged announce.
    fn send_announce(&mut self, i: u32, a: Announce) {
        self.rpc_with(i, None, Call::Announce(a), true);
    }

    fn rpc_with(&mut self, i: u32, layer: Option<u16>, call: Call, merged: bool) {
        let at = self.now + self.half_rtt();
        self.at(
            at,
            Ev::TrackerIn(Box::new(Rpc {
                node: i,
                arrived: at,
                layer,
                call,
                shared: false,
                merged,
            })),
        );
    }

    fn tracker_down(&self) -> bool {
        let t = self.now.saturating_sub(self.t0) / 1000;
        self.now >= self.t0
            && self
                .sc
                .tracker_outages
                .iter()
                .any(|o| (o.from_ms..o.until_ms).contains(&t))
    }

    /// A request reached the tracker: refused during an outage, else queued
    /// behind the ones before it.
    fn tracker_in(&mut self, mut rpc: Box<Rpc>) {
        if self.tracker_down() {
            let answer = match rpc.call {
                Call::Lookup(_) => Answer::Lookup(Err(TrackerFailure::Down)),
                Call::Lease(_) => Answer::Lease(Err(TrackerFailure::Down)),
                _ => Answer::Sent,
            };
            let at = self.now + self.half_rtt();
            self.reply(&rpc, answer, at);
            return;
        }
        let core = (0..self.tracker_free_at.len())
            .min_by_key(|&c| self.tracker_free_at[c])
            .expect("at least one core");
        let start = self.tracker_free_at[core].max(self.now);
        // Outside the lock first (TLS, HTTP, parsing), then the core's work
        // under it; the core waits for the lock (a blocking, writer-preferring
        // read-write lock: a lookup waits for the writers queued before it,
        // a writer for them and for the lookups holding it).
        let serial = self.sc.tracker_serial_us.min(self.sc.tracker_us);
        let ready = start + self.sc.tracker_us - serial;
        rpc.shared = self.sc.shared_lookups
            && matches!(rpc.call, Call::Lookup(_))
            && !self.tracker.expiry_due(self.ms());
        let locked = if rpc.shared {
            let locked = ready.max(self.tracker_lock_free_at);
            self.tracker_readers_until = self.tracker_readers_until.max(locked + serial);
            locked
        } else {
            let locked = ready
                .max(self.tracker_lock_free_at)
                .max(self.tracker_readers_until);
            self.tracker_lock_free_at = locked + serial;
            locked
        };
        let done = locked + serial;
        self.counters.tracker_max_wait_us = self
            .counters
            .tracker_max_wait_us
            .max(done - self.now - self.sc.tracker_us);
        self.tracker_free_at[core] = done;
        self.at(locked, Ev::TrackerServe(rpc, done));
    }

    fn tracker_serve(&mut self, rpc: Rpc, done: u64) {
        self.counters.tracker_requests += 1;
        let k = match &rpc.call {
            Call::Lookup(_) => 0,
            Call::Lease(_) => 1,
            Call::Publish(_) => 2,
            Call::Announce(_) => 3,
            Call::Report(_) => 4,
        };
        self.counters.tracker_by_kind[k] += 1;
        let now = self.ms();
        let node = self.nodes[rpc.node as usize].id.clone();
        let answer = match &rpc.call {
            Call::Lookup(since) => {
                let (blob, _) = self.blobs[rpc.layer.unwrap_or(0) as usize];
                let r = if rpc.shared {
                    self.tracker.lookup_current(now, &node, &blob, *since)
                } else {
                    self.tracker.lookup_since(now, &node, &blob, *since)
                };
                Answer::Lookup(r.map_err(refusal))
            }
            Call::Lease(r) => Answer::Lease(
                self.tracker
                    .lease(now, r.clone().waited((self.now - rpc.arrived) / 1_000))
                    .map(|g| g.chunks)
                    .map_err(refusal),
            ),
            Call::Publish(p) => {
                let _ = self.tracker.publish_hashes(now, p.clone());
                Answer::Sent
            }
            Call::Announce(a) => {
                let known = self.tracker.announce(now, a.clone()).map(|r| r.known);
                // As the daemon's heartbeat does: a tracker that had
                // forgotten this member gets its full holdings at once.
                if rpc.layer.is_none() && known == Ok(false) && !a.is_full() {
                    let full = self.holdings(rpc.node);
                    let _ = self.tracker.announce(now, full);
                }
                Answer::Sent
            }
            Call::Report(r) => {
                let _ = self.tracker.report(now, r.clone());
                Answer::Sent
            }
        };
        let at = done + self.half_rtt();
        self.reply(&rpc, answer, at);
    }

    /// A full announce of what member `i` holds.
    fn holdings(&self, i: u32) -> Announce {
        let node = &self.nodes[i as usize];
        let blobs = node
            .layers
            .iter()
            .zip(&self.blobs)
            .filter_map(|(state, &(d, layout))| match state {
                LayerState::Done => Some(BlobHave::complete(d, layout)),
                LayerState::Active(s) if s.have().count() > 0 => {
                    BlobHave::new(d, layout, s.have().clone(), false).ok()
                }
                _ => None,
            })
            .collect();
        Announce::new(node.id.clone(), node.addr.clone(), blobs, vec![], true)
            .expect("at most one entry per layer")
            .with_rack(node.rack_label.clone())
    }

    fn reply(&mut self, rpc: &Rpc, answer: Answer, at: u64) {
        if rpc.merged {
            self.at(at, Ev::Announced(rpc.node));
        }
        if let Some(l) = rpc.layer {
            self.at(at, Ev::Reply(rpc.node, l, Box::new(answer)));
        }
    }

    fn report(self, finished: bool) -> RunReport {
        if std::env::var_os("SHOAL_SIM_TIMELINE").is_some() {
            let slot_s = TIMELINE_US as f64 / 1e6;
            let downlinks: f64 = self.nodes.iter().map(|n| n.rate).sum::<f64>() * slot_s;
            eprintln!("t_s\tfrom_peers\tfrom_origin\tdownlinks_used");
            for (i, (peers, origin)) in self.delivered.iter().enumerate() {
                eprintln!(
                    "{:.3}\t{:.3}\t{:.3}\t{:.3}",
                    i as f64 * slot_s,
                    peers / downlinks,
                    origin / downlinks,
                    (peers + origin) / downlinks
                );
            }
        }
        let nodes = self
            .nodes
            .iter()
            .map(|n| NodeResult {
                rate: n.rate,
                start_s: (n.start - self.t0) as f64 / 1e6,
                done_s: n.done_at.map(|t| (t - self.t0) as f64 / 1e6),
                halted: n.halts_at.is_some(),
                malicious: n.malicious,
                gave_up: n.gave_up,
                up_bytes: n.up_bytes,
                peer_bytes: n.peer_bytes,
                origin_bytes: n.origin_bytes,
                rejected: n.rejected,
                frozen: n.frozen,
            })
            .collect();
        RunReport::new(
            &self.sc,
            RunOutcome {
                finished,
                sim_s: self.now.saturating_sub(self.t0) as f64 / 1e6,
                origin_bytes: self.origin_bytes,
                origin_done_s: self.origin_done.saturating_sub(self.t0) as f64 / 1e6,
                counters: self.counters,
                tracker: self.tracker.stats(),
            },
            nodes,
        )
    }
}
