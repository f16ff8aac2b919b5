//! One blob download's swarm session: the scheduler ([`crate::sched`]) and
//! its conversation with the tracker, as one pure state machine.
//!
//! The scheduler decides what to fetch from where; a session adds what a
//! member says and hears around it: lookups (with the hash cursor, so only
//! new chunk hashes come back), turning holders into scheduler peers, hash
//! epochs, origin leases, publishing the hashes of chunks fetched from the
//! origin, announcing progress at most every `announce_every_ms` (and at
//! least every `keepalive_ms`, so the tracker can tell it is alive), probing a
//! tracker that went down, and reporting bad chunks. The driver performs the
//! [`Io`]s it asks for and feeds back what came of them; time is passed in.
//! The daemon's transfers and the swarm simulator drive this same code, so
//! the simulator measures the policy the daemon runs.
//!
//! Peers are numbered in the order lookups first name them; the driver maps
//! a number back to where the peer is reached with [`Session::peer`], whose
//! address type `A` comes from the resolver given to [`Session::new`] (a
//! socket address in the daemon, a node index in the simulator). Holders
//! the resolver rejects are never scheduled.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;

use crate::chunk::{Bitfield, ChunkLayout};
use crate::digest::Digest;
use crate::sched::{Action, Event, Outcome, SchedConfig, Scheduler, Source};
use crate::tracker_api::{
    Announce, BlobHave, BlobView, ChunkHash, HashCursor, LeaseRequest, NodeId, PeerAddr,
    PublishHashes, Rack, Report,
};

/// The most lease grant times a download remembers (a member holds a few
/// leases a blob; entries of leases lost to expiry go oldest first).
const MAX_LEASE_TIMES: usize = 256;

/// Tunables of a session around its scheduler.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The scheduler's.
    pub sched: SchedConfig,
    /// Least time between two announces of this download's progress.
    pub announce_every_ms: u64,
    /// Most time between two announces while the download holds part of
    /// the blob and the tracker is up, progress or not; each says so
    /// ([`Announce::next_ms`]), so the tracker forgets this member within
    /// seconds if it dies and peers report it. 0 turns it off (the
    /// daemon's heartbeat every announce interval is then all it promises).
    pub keepalive_ms: u64,
    /// How often a tracker that is down is probed (with a lookup).
    pub probe_every_ms: u64,
    /// Peers watched at once ([`Io::Watch`]): partial holders that tell
    /// this node of each chunk they store, within a round trip, where the
    /// tracker would tell it a lookup interval later. 0 turns watching off.
    pub watch_peers: u32,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            sched: SchedConfig::default(),
            announce_every_ms: 200,
            keepalive_ms: 1_000,
            probe_every_ms: 2_000,
            watch_peers: 16,
        }
    }
}

/// Where the chunk hashes a session learns are kept. The daemon keeps the
/// hash bytes (it verifies peer chunks against them); the simulator needs
/// only which are known, which the session tracks itself (`()`).
pub trait HashBook {
    /// The tracker withdrew every hash (a new epoch): forget them all.
    fn reset(&mut self);
    /// Chunk `chunk` verifies against `hash`.
    fn learn(&mut self, chunk: u32, hash: &ChunkHash);
}

impl HashBook for () {
    fn reset(&mut self) {}
    fn learn(&mut self, _: u32, _: &ChunkHash) {}
}

/// Why a tracker request got no answer to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackerFailure {
    /// Unreachable (or failing): the scheduler falls back to the origin for
    /// what no known peer has, and lookups probe until it answers again.
    Down,
    /// It answered with an error (the blob is unknown to it, a limit).
    Refused,
    /// It refuses this node: excluded for bad data it served (disk rot,
    /// say). The swarm will not serve it, so the download goes on as with
    /// the tracker down (the origin serves what no known peer has) and the
    /// tracker is asked again every probe interval, as exclusions end.
    Excluded,
}

/// A change the driver may want to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// The tracker stopped answering: the origin serves what no known peer
    /// has until it is back.
    TrackerDown,
    /// The tracker answers again: back to the swarm.
    TrackerBack,
    /// The tracker lays the blob out differently: it is fetched alone.
    LayoutConflict,
    /// The tracker excludes this node: the origin serves what no known peer
    /// has until the exclusion ends.
    Excluded,
}

/// What the session asks its driver to do. Tracker requests are answered
/// with [`Session::on_lookup`], [`Session::on_lease`] and, for publishes
/// and announces, [`Session::on_sent`]; chunk requests with
/// [`Session::on_chunk`] (one call per chunk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Io {
    /// Look the blob up at the tracker.
    Lookup {
        /// Only hashes published after this ([`BlobView::cursor`]).
        since: Option<HashCursor>,
    },
    /// Ask the tracker for origin leases.
    Lease(LeaseRequest),
    /// Publish hashes of chunks fetched from the origin.
    Publish(PublishHashes),
    /// Announce this node's holdings of the blob.
    Announce(Announce),
    /// Report bad data to the tracker (fire and forget).
    Report(Report),
    /// Ask peer `peer` ([`Session::peer`]) for these chunks, in order.
    FetchPeer {
        /// The peer's number.
        peer: u32,
        /// The chunks.
        chunks: Vec<u32>,
    },
    /// Stop waiting for `chunk` from `peer`.
    CancelPeer {
        /// The peer's number.
        peer: u32,
        /// The chunk.
        chunk: u32,
    },
    /// Fetch these contiguous chunks from the origin in one Range request.
    FetchOrigin {
        /// Ascending, contiguous.
        chunks: Vec<u32>,
    },
    /// Stop the origin request that carries `chunk`.
    CancelOrigin {
        /// The chunk.
        chunk: u32,
    },
    /// Watch peer `peer`: ask it for its bitfield of the blob now and each
    /// time it grows, and feed each to [`Session::on_watch`] (`None` when
    /// the watch ends: refused, the peer complete or gone). The driver
    /// drops its watches when the session ends.
    Watch {
        /// The peer's number.
        peer: u32,
    },
    /// Every chunk is here: check the whole digest, then call
    /// [`Session::finish`] (or [`Session::mismatch`]).
    Complete,
    /// The origin keeps failing: give up.
    GiveUp,
}

/// Resolves a holder named by the tracker to where the driver reaches it;
/// `None` skips the holder.
pub type Resolve<A> = fn(&NodeId, &PeerAddr) -> Option<A>;

/// A member's identity in the swarm.
#[derive(Debug, Clone)]
pub struct Member {
    /// Its node name.
    pub node: NodeId,
    /// Where peers reach it.
    pub addr: PeerAddr,
    /// Where it sits, if the operator said ([`Rack`]).
    pub rack: Option<Rack>,
}

/// Where a peer's watch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watch {
    /// Not watched (yet).
    No,
    /// Asked for; the peer's bitfields come from it, not from lookups.
    Open,
    /// Ended (refused, or the peer completed or went away): not asked again
    /// in this download; lookups say what the peer holds.
    Ended,
}

/// One blob download: the scheduler and the tracker conversation around it.
#[derive(Debug)]
pub struct Session<A, H = ()> {
    cfg: SessionConfig,
    sched: Scheduler<u32>,
    blob: Digest,
    layout: ChunkLayout,
    /// `None`: alone, no tracker; the origin serves every chunk.
    me: Option<Member>,
    resolve: Resolve<A>,
    hashes: H,
    known: Bitfield,
    epoch: u64,
    cursor: Option<HashCursor>,
    peers: Vec<(NodeId, A)>,
    ids: HashMap<NodeId, u32>,
    /// Each peer's watch, by peer number (missing: never watched).
    watches: Vec<Watch>,
    /// Watches open now.
    watching: u32,
    to_publish: Vec<(u32, ChunkHash)>,
    /// When each chunk leased here was first granted (ms), until it is held.
    leased_at: Vec<(u32, u64)>,
    /// Grant-to-verified times of the origin chunks in `to_publish`: sum, count.
    fetch_ms: (u64, u32),
    /// Smoothed round trip of lookups and lease requests (µs), once measured.
    rtt_us: Option<u64>,
    /// When the lookup and the lease request in flight were sent.
    lookup_sent: Option<u64>,
    lease_sent: Option<u64>,
    dirty: bool,
    last_announce: u64,
    /// Publishes and announces in flight (at most one at a time).
    in_flight: u32,
    /// Since when the tracker has not answered, if it is down.
    down_since: Option<u64>,
    last_probe: u64,
    out: VecDeque<Io>,
}

impl<A: Clone, H: HashBook> Session<A, H> {
    /// A download of `blob` (laid out as `layout`, `have` already stored).
    /// With `me`, it is a member of a swarm and looks the blob up first;
    /// without, it fetches everything from the origin.
    pub fn new(
        cfg: SessionConfig,
        blob: Digest,
        layout: ChunkLayout,
        have: Bitfield,
        me: Option<Member>,
        resolve: Resolve<A>,
        hashes: H,
    ) -> Self {
        let mut sched = Scheduler::new(cfg.sched.clone(), layout, have);
        if let Some(m) = &me {
            // Members order equally rare chunks each their own way.
            let d = Digest::of(format!("{}/{blob}", m.node.as_str()).as_bytes());
            let seed = u64::from_le_bytes(d.as_bytes()[..8].try_into().expect("8 bytes"));
            sched.set_tie_seed(seed);
        }
        // In a swarm the scheduler's first poll asks for a lookup.
        if me.is_none() {
            sched.handle(0, Event::TrackerDown(true));
        }
        Session {
            cfg,
            sched,
            blob,
            layout,
            me,
            resolve,
            hashes,
            known: Bitfield::for_layout(&layout),
            epoch: 0,
            cursor: None,
            peers: Vec::new(),
            ids: HashMap::new(),
            watches: Vec::new(),
            watching: 0,
            to_publish: Vec::new(),
            leased_at: Vec::new(),
            fetch_ms: (0, 0),
            rtt_us: None,
            lookup_sent: None,
            lease_sent: None,
            dirty: false,
            last_announce: 0,
            in_flight: 0,
            down_since: None,
            last_probe: 0,
            out: VecDeque::new(),
        }
    }

    /// Tells the scheduler how many downloads this node runs now (this one
    /// included): they share its chunks in flight from peers.
    pub fn set_downloads(&mut self, downloads: u32) {
        self.sched.set_downloads(downloads);
    }

    /// Peer `peer` answered `Busy` with a retry-after hint: nothing is
    /// asked of it before `until` (ms).
    pub fn peer_busy_until(&mut self, peer: u32, until: u64) {
        self.sched.busy_until(&peer, until);
    }

    /// The blob's layout.
    pub fn layout(&self) -> &ChunkLayout {
        &self.layout
    }

    /// The chunks verified and stored so far.
    pub fn have(&self) -> &Bitfield {
        self.sched.have()
    }

    /// The chunk hashes learned so far.
    pub fn hashes(&self) -> &H {
        &self.hashes
    }

    /// The hash epoch the session verifies against.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Peer number `peer`: its node name and where it is reached.
    pub fn peer(&self, peer: u32) -> Option<&(NodeId, A)> {
        self.peers.get(peer as usize)
    }

    /// Whether the tracker is taken to be down.
    pub fn tracker_down(&self) -> bool {
        self.down_since.is_some()
    }

    /// The next thing to do, if any; call until `None`, then wait for an
    /// answer or until [`next_deadline`](Self::next_deadline).
    pub fn poll(&mut self, now: u64) -> Option<Io> {
        if let Some(io) = self.out.pop_front() {
            return Some(io);
        }
        while let Some(action) = self.sched.poll(now) {
            if let Some(io) = self.io_of(now, action) {
                return Some(io);
            }
        }
        if self.me.is_some() {
            if self.next_probe().is_some_and(|t| now >= t) {
                self.last_probe = now;
                self.lookup_sent = Some(now);
                return Some(Io::Lookup { since: self.cursor });
            }
            if let Some(io) = self.flush(now) {
                return Some(io);
            }
        }
        None
    }

    fn io_of(&mut self, now: u64, action: Action<u32>) -> Option<Io> {
        Some(match action {
            Action::FetchPeer { peer, chunks } => Io::FetchPeer { peer, chunks },
            Action::FetchOrigin { chunks } => Io::FetchOrigin { chunks },
            Action::Cancel {
                source: Source::Origin,
                chunk,
            } => Io::CancelOrigin { chunk },
            Action::Cancel {
                source: Source::Peer(peer),
                chunk,
            } => Io::CancelPeer { peer, chunk },
            Action::Lease { from, max } => {
                let me = self.me.as_ref().expect("leases only in a swarm");
                match LeaseRequest::new(me.node.clone(), self.blob, self.layout, max.max(1), from) {
                    Ok(r) => {
                        self.lease_sent = Some(now);
                        let rtt_ms = self
                            .rtt_us
                            .map(|us| u32::try_from(us / 1_000).unwrap_or(u32::MAX));
                        Io::Lease(r.with_rtt_ms(rtt_ms))
                    }
                    // Cannot happen for a layout the scheduler accepted;
                    // answered as a refusal all the same.
                    Err(_) => {
                        self.sched.handle(now, Event::LeaseGranted(Vec::new()));
                        return None;
                    }
                }
            }
            Action::Lookup => {
                self.lookup_sent = Some(now);
                Io::Lookup { since: self.cursor }
            }
            Action::Unresponsive { peer } => {
                let (me, (stalled, _)) = (self.me.as_ref()?, self.peers.get(peer as usize)?);
                Io::Report(Report::Unresponsive {
                    node: me.node.clone(),
                    blob: self.blob,
                    peer: stalled.clone(),
                })
            }
            Action::Complete => Io::Complete,
            Action::GiveUp => Io::GiveUp,
        })
    }

    /// The earliest time [`poll`](Self::poll) may have something new to do
    /// without an answer arriving.
    pub fn next_deadline(&self) -> Option<u64> {
        let mut at = self.sched.next_deadline();
        let mut consider = |t: Option<u64>| {
            if let Some(t) = t {
                at = Some(at.map_or(t, |a: u64| a.min(t)));
            }
        };
        consider(self.next_probe());
        if self.me.is_some() && self.in_flight == 0 && self.to_publish.is_empty() {
            consider(self.announce_at());
        }
        at
    }

    /// When this download's next announce is due: progress at most every
    /// `announce_every_ms`; while it holds part of the blob (peers may be
    /// asking it for chunks) and the tracker is up, nothing new or not, at
    /// least every `keepalive_ms`.
    fn announce_at(&self) -> Option<u64> {
        let held = self.have().count();
        if self.dirty {
            Some(self.last_announce + self.cfg.announce_every_ms)
        } else if self.cfg.keepalive_ms > 0
            && self.down_since.is_none()
            && held > 0
            && held < self.layout.count()
        {
            Some(self.last_announce + self.cfg.keepalive_ms)
        } else {
            None
        }
    }

    fn next_probe(&self) -> Option<u64> {
        self.down_since
            .map(|_| self.last_probe + self.cfg.probe_every_ms)
    }

    /// The mean grant-to-verified time of the chunks about to be published.
    fn take_fetch_ms(&mut self) -> Option<u32> {
        let (sum, n) = std::mem::take(&mut self.fetch_ms);
        (n > 0).then(|| u32::try_from(sum / u64::from(n)).unwrap_or(u32::MAX))
    }

    /// Publishes pending chunk hashes, else announces progress (at most one
    /// message in flight; see [`announce_at`](Self::announce_at)).
    fn flush(&mut self, now: u64) -> Option<Io> {
        if self.in_flight > 0 {
            return None;
        }
        self.me.as_ref()?;
        if !self.to_publish.is_empty() {
            let hashes = std::mem::take(&mut self.to_publish);
            let fetch_ms = self.take_fetch_ms();
            let me = self.me.as_ref()?;
            let p = PublishHashes::new(me.node.clone(), self.blob, hashes)
                .ok()?
                .with_fetch_ms(fetch_ms);
            self.in_flight += 1;
            return Some(Io::Publish(p));
        }
        if self.announce_at().is_some_and(|at| now >= at) {
            let me = self.me.as_ref()?;
            self.dirty = false;
            self.last_announce = now;
            let bh = BlobHave::new(self.blob, self.layout, self.have().clone(), false).ok()?;
            let promise = u32::try_from(self.cfg.keepalive_ms)
                .ok()
                .and_then(NonZeroU32::new);
            let a = Announce::new(
                me.node.clone(),
                me.addr.clone(),
                vec![bh],
                Vec::new(),
                false,
            )
            .ok()?
            .with_rack(me.rack.clone())
            .with_next_ms(promise);
            self.in_flight += 1;
            return Some(Io::Announce(a));
        }
        None
    }

    /// A publish or an announce finished (whatever its outcome).
    pub fn on_sent(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    fn went_down(&mut self, now: u64, why: TrackerFailure) -> Option<Notice> {
        self.sched.handle(now, Event::TrackerDown(true));
        if self.down_since.is_some() {
            return None;
        }
        self.down_since = Some(now);
        self.last_probe = now;
        Some(match why {
            TrackerFailure::Excluded => Notice::Excluded,
            _ => Notice::TrackerDown,
        })
    }

    /// A lookup answered.
    pub fn on_lookup(
        &mut self,
        now: u64,
        reply: Result<BlobView, TrackerFailure>,
    ) -> Option<Notice> {
        let sent = self.lookup_sent.take();
        if !matches!(reply, Err(TrackerFailure::Down | TrackerFailure::Excluded)) {
            self.round_trip(now, sent);
        }
        let (view, notice) = match reply {
            Err(why @ (TrackerFailure::Down | TrackerFailure::Excluded)) => {
                return self.went_down(now, why)
            }
            Err(TrackerFailure::Refused) => {
                let notice = self.back_up(now);
                // Unknown to the tracker: nobody holds it yet.
                self.sched.handle(now, Event::LookedUp);
                return notice;
            }
            Ok(view) => (view, self.back_up(now)),
        };
        if view.layout() != self.layout {
            self.sched.handle(now, Event::TrackerDown(true));
            return Some(Notice::LayoutConflict);
        }
        if view.epoch() != self.epoch {
            // Withdrawn hashes: only the new epoch's count.
            self.hashes.reset();
            self.known = Bitfield::for_layout(&self.layout);
            self.epoch = view.epoch();
            self.cursor = None;
        }
        // Answers may come back out of order: the cursor only moves on.
        if self.cursor.is_none_or(|c| c.seq < view.hash_seq()) {
            self.cursor = Some(view.cursor());
        }
        for (i, h) in view.hashes().iter().enumerate() {
            if let Some(h) = h {
                self.hashes.learn(i as u32, h);
                let _ = self.known.set(i as u32);
            }
        }
        self.sched
            .handle(now, Event::HashesKnown(self.known.clone()));
        self.sched
            .handle(now, Event::LeasedElsewhere(view.leased().clone()));
        if let Some(served) = view.served() {
            self.sched.handle(now, Event::Served(served.clone()));
        }
        let me = self.me.as_ref().map(|m| m.node.clone());
        for holder in view.holders() {
            if Some(&holder.node) == me.as_ref() {
                continue;
            }
            let id = match self.ids.get(&holder.node) {
                Some(id) => *id,
                None => {
                    let Some(at) = (self.resolve)(&holder.node, &holder.addr) else {
                        continue;
                    };
                    let id = self.peers.len() as u32;
                    self.peers.push((holder.node.clone(), at));
                    self.ids.insert(holder.node.clone(), id);
                    id
                }
            };
            let watch = self.watches.get(id as usize).copied().unwrap_or(Watch::No);
            let have = if holder.complete {
                full(&self.layout)
            } else if watch == Watch::Open {
                // The watch is fresher than the tracker's view — except
                // for chunks the tracker has the peer holding (it published
                // their hashes) that no frame has shown yet: a holder that
                // died just after publishing sends no more frames, and its
                // watch ends only at the connection's idle timeout. Unasked,
                // nobody found it dead, while the tracker, which had it
                // serving those chunks, leased them to nobody: in the
                // simulator, 40 members at 1 gbit waited 30 s for them.
                match self.sched.peer_have(&id) {
                    Some(seen) if holder.have.has_any_outside(seen, self.sched.have()) => {
                        let mut have = seen.clone();
                        have.union_with(&holder.have);
                        have
                    }
                    _ => continue,
                }
            } else {
                holder.have.clone()
            };
            self.sched.handle(now, Event::PeerHas { peer: id, have });
            if holder.near {
                self.sched.handle(now, Event::Near(id));
            }
            if !holder.complete && watch == Watch::No && self.watching < self.cfg.watch_peers {
                self.set_watch(id, Watch::Open);
                self.watching += 1;
                self.out.push_back(Io::Watch { peer: id });
            }
        }
        self.sched.handle(now, Event::LookedUp);
        notice
    }

    fn set_watch(&mut self, peer: u32, w: Watch) {
        let i = peer as usize;
        if self.watches.len() <= i {
            self.watches.resize(i + 1, Watch::No);
        }
        self.watches[i] = w;
    }

    /// What a watch of peer `peer` ([`Io::Watch`]) brought: the peer's
    /// whole bitfield of the blob (laid out as here, or it is ignored), or
    /// `None` when the watch ended. Returns whether the peer now offers a
    /// chunk missing here that it did not before: only then can
    /// [`poll`](Self::poll) have something new to do (a driver may skip it
    /// otherwise; the simulator does).
    pub fn on_watch(&mut self, now: u64, peer: u32, have: Option<Bitfield>) -> bool {
        if self.watches.get(peer as usize) != Some(&Watch::Open) {
            return false;
        }
        match have {
            Some(have) if have.len() == self.layout.count() => {
                let news = match self.sched.peer_have(&peer) {
                    Some(old) => have.has_any_outside(old, self.sched.have()),
                    None => true,
                };
                self.sched.handle(now, Event::PeerHas { peer, have });
                news
            }
            _ => {
                self.set_watch(peer, Watch::Ended);
                self.watching -= 1;
                false
            }
        }
    }

    fn back_up(&mut self, now: u64) -> Option<Notice> {
        self.down_since.take()?;
        self.sched.handle(now, Event::TrackerDown(false));
        Some(Notice::TrackerBack)
    }

    /// A tracker answer to a request sent at `sent`: one more round trip
    /// in the smoothed one (a quarter weight).
    fn round_trip(&mut self, now: u64, sent: Option<u64>) {
        let Some(sent) = sent else { return };
        let sample = now.saturating_sub(sent).saturating_mul(1_000);
        let rtt = match self.rtt_us {
            None => sample,
            Some(rtt) => rtt - rtt / 4 + sample / 4,
        };
        self.rtt_us = Some(rtt);
        self.sched.set_tracker_rtt(rtt / 1_000);
    }

    /// A lease request answered (the chunks granted).
    pub fn on_lease(
        &mut self,
        now: u64,
        reply: Result<Vec<u32>, TrackerFailure>,
    ) -> Option<Notice> {
        let sent = self.lease_sent.take();
        if !matches!(reply, Err(TrackerFailure::Down | TrackerFailure::Excluded)) {
            self.round_trip(now, sent);
        }
        let (event, notice) = match reply {
            Ok(chunks) => {
                for &c in &chunks {
                    if !self.leased_at.iter().any(|&(l, _)| l == c) {
                        self.leased_at.push((c, now));
                    }
                }
                // Leases lost to expiry leave entries behind until the chunk
                // comes from elsewhere; a member holds a few leases a blob.
                if self.leased_at.len() > MAX_LEASE_TIMES {
                    let excess = self.leased_at.len() - MAX_LEASE_TIMES;
                    self.leased_at.drain(..excess);
                }
                (Event::LeaseGranted(chunks), None)
            }
            Err(why @ (TrackerFailure::Down | TrackerFailure::Excluded)) => {
                (Event::LeaseFailed, self.went_down(now, why))
            }
            Err(TrackerFailure::Refused) => (Event::LeaseFailed, None),
        };
        self.sched.handle(now, event);
        notice
    }

    /// A chunk request ended. For a chunk stored from the origin, `hash` is
    /// its SHA-256, published to the tracker (as its lessee). Returns whether
    /// a verified chunk was new here (not a duplicate of one stored).
    pub fn on_chunk(
        &mut self,
        now: u64,
        source: Source<u32>,
        chunk: u32,
        outcome: Outcome,
        hash: Option<ChunkHash>,
    ) -> bool {
        let new = outcome == Outcome::Verified
            && chunk < self.layout.count()
            && !self.sched.have().get(chunk);
        let leased = if new {
            let at = self.leased_at.iter().position(|&(l, _)| l == chunk);
            at.map(|at| self.leased_at.swap_remove(at).1)
        } else {
            None
        };
        if let (Source::Origin, Outcome::Verified, Some(h), Some(_)) =
            (&source, outcome, hash, &self.me)
        {
            if new {
                self.to_publish.push((chunk, h));
                if let Some(at) = leased {
                    self.fetch_ms.0 += now.saturating_sub(at);
                    self.fetch_ms.1 += 1;
                }
            }
        }
        if let (Source::Peer(p), Outcome::Bad, Some(me)) = (&source, outcome, &self.me) {
            if let Some((bad, _)) = self.peers.get(*p as usize) {
                self.out.push_back(Io::Report(Report::BadChunk {
                    node: me.node.clone(),
                    blob: self.blob,
                    peer: bad.clone(),
                    chunk,
                }));
            }
        }
        self.sched.handle(
            now,
            Event::Chunk {
                source,
                chunk,
                outcome,
            },
        );
        if new {
            self.dirty = true;
        }
        new
    }

    /// Bytes of `chunk` are arriving from `source` (see
    /// [`Event::Progress`](crate::sched::Event::Progress): at most every
    /// [`PROGRESS_MS`](crate::sched::PROGRESS_MS) per request).
    pub fn on_progress(&mut self, now: u64, source: Source<u32>, chunk: u32) {
        self.sched.handle(now, Event::Progress { source, chunk });
    }

    /// The blob is complete and its digest checked: the hashes not published
    /// yet, then an announce of the whole blob (send both, in this order,
    /// whatever else is in flight).
    pub fn finish(&mut self) -> Vec<Io> {
        let fetch_ms = self.take_fetch_ms();
        let Some(me) = &self.me else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let hashes = std::mem::take(&mut self.to_publish);
        if !hashes.is_empty() {
            if let Ok(p) = PublishHashes::new(me.node.clone(), self.blob, hashes) {
                out.push(Io::Publish(p.with_fetch_ms(fetch_ms)));
            }
        }
        let bh = BlobHave::complete(self.blob, self.layout);
        if let Ok(a) = Announce::new(
            me.node.clone(),
            me.addr.clone(),
            vec![bh],
            Vec::new(),
            false,
        ) {
            out.push(Io::Announce(a.with_rack(me.rack.clone())));
        }
        out
    }

    /// Every chunk verified against its hash, yet the blob failed its digest:
    /// the report that withdraws this epoch's hashes.
    pub fn mismatch(&self) -> Option<Io> {
        let me = self.me.as_ref()?;
        Some(Io::Report(Report::DigestMismatch {
            node: me.node.clone(),
            blob: self.blob,
            epoch: self.epoch,
        }))
    }
}

/// Every chunk of `layout`.
fn full(layout: &ChunkLayout) -> Bitfield {
    Bitfield::full(layout.count()).expect("a layout has at most MAX_CHUNKS chunks")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker_api::Holder;

    const MIB: u32 = 1 << 20;

    fn layout() -> ChunkLayout {
        ChunkLayout::new(4 * u64::from(MIB), MIB).unwrap()
    }

    fn blob() -> Digest {
        Digest::of(b"a blob")
    }

    fn me() -> Member {
        Member {
            node: "me".parse().unwrap(),
            addr: "10.0.0.1:7000".parse().unwrap(),
            rack: None,
        }
    }

    /// Peers are reached by their node name in these tests.
    fn by_name(node: &NodeId, _: &PeerAddr) -> Option<String> {
        (node.as_str() != "unreachable").then(|| node.as_str().to_owned())
    }

    fn session() -> Session<String, Vec<(u32, ChunkHash)>> {
        Session::new(
            SessionConfig::default(),
            blob(),
            layout(),
            Bitfield::for_layout(&layout()),
            Some(me()),
            by_name,
            Vec::new(),
        )
    }

    impl HashBook for Vec<(u32, ChunkHash)> {
        fn reset(&mut self) {
            self.clear();
        }
        fn learn(&mut self, chunk: u32, hash: &ChunkHash) {
            self.push((chunk, *hash));
        }
    }

    fn drain<A: Clone, H: HashBook>(s: &mut Session<A, H>, now: u64) -> Vec<Io> {
        let mut out = Vec::new();
        while let Some(io) = s.poll(now) {
            out.push(io);
            assert!(out.len() < 1000, "poll never settles");
        }
        out
    }

    fn holder(name: &str, have: &[u32], complete: bool) -> Holder {
        let mut bits = Bitfield::for_layout(&layout());
        let all = [0, 1, 2, 3];
        for &c in if complete { &all[..] } else { have } {
            bits.set(c).unwrap();
        }
        Holder {
            node: name.parse().unwrap(),
            addr: "10.0.0.9:7000".parse().unwrap(),
            have: bits,
            complete,
            near: false,
        }
    }

    fn view(epoch: u64, hashes: &[u32], holders: Vec<Holder>) -> BlobView {
        let all: Vec<Option<ChunkHash>> = (0..4)
            .map(|c| hashes.contains(&c).then(|| ChunkHash::of(&[c as u8])))
            .collect();
        BlobView::new(
            blob(),
            layout(),
            epoch,
            all,
            holders,
            Bitfield::for_layout(&layout()),
        )
        .unwrap()
        .with_hash_seq(hashes.len() as u64)
    }

    #[test]
    fn a_lookup_names_peers_once_and_skips_itself_and_unresolvable_holders() {
        let mut s = session();
        let first = drain(&mut s, 0);
        assert!(first.contains(&Io::Lookup { since: None }), "{first:?}");
        assert_eq!(first.len(), 2, "a lookup and a lease: {first:?}");
        let holders = vec![
            holder("me", &[0, 1, 2, 3], true),
            holder("unreachable", &[0, 1, 2, 3], true),
            holder("a", &[0, 1], false),
            holder("b", &[1], false),
        ];
        assert_eq!(s.on_lookup(1, Ok(view(7, &[0, 1, 2, 3], holders))), None);
        assert_eq!(s.peer(0).map(|p| p.1.as_str()), Some("a"));
        assert_eq!(s.peer(1).map(|p| p.1.as_str()), Some("b"));
        assert!(s.peer(2).is_none());
        assert_eq!(s.hashes().len(), 4);
        let fetches: Vec<Io> = drain(&mut s, 1)
            .into_iter()
            .filter(|io| matches!(io, Io::FetchPeer { .. }))
            .collect();
        assert_eq!(
            fetches,
            vec![Io::FetchPeer {
                peer: 0,
                chunks: vec![0, 1]
            }]
        );
        // Chunks 2 and 3 have no holder: the next lookup asks only for
        // hashes published since the last answer.
        let later = drain(&mut s, 600);
        assert!(later.contains(&Io::Lookup {
            since: Some(HashCursor { epoch: 7, seq: 4 })
        }));
        // A new epoch withdraws what was learned.
        s.on_lookup(601, Ok(view(8, &[2], vec![])));
        assert_eq!(s.hashes().len(), 1);
        assert_eq!(s.epoch(), 8);
    }

    #[test]
    fn origin_chunks_are_published_before_an_announce_one_message_at_a_time() {
        let mut s = session();
        let acts = drain(&mut s, 0);
        let Some(Io::Lease(req)) = acts.first() else {
            panic!("{acts:?}")
        };
        assert_eq!((req.from(), req.max_chunks()), (0, 4));
        s.on_lookup(1, Err(TrackerFailure::Refused));
        s.on_lease(2, Ok(vec![0, 1, 2, 3]));
        let acts = drain(&mut s, 2);
        assert_eq!(
            acts,
            vec![Io::FetchOrigin {
                chunks: vec![0, 1, 2, 3]
            }]
        );
        let h = ChunkHash::of(b"zero");
        assert!(s.on_chunk(300, Source::Origin, 0, Outcome::Verified, Some(h)));
        // A duplicate is not new and publishes nothing more.
        assert!(!s.on_chunk(300, Source::Origin, 0, Outcome::Verified, Some(h)));
        let acts = drain(&mut s, 300);
        let Some(Io::Publish(p)) = acts.first() else {
            panic!("{acts:?}")
        };
        assert_eq!(p.hashes(), &[(0, h)]);
        assert_eq!(p.fetch_ms(), Some(298), "granted at 2, verified at 300");
        assert_eq!(acts.len(), 1, "one message in flight: {acts:?}");
        s.on_sent();
        let acts = drain(&mut s, 301);
        assert!(matches!(acts.as_slice(), [Io::Announce(a)] if a.blobs()[0].have().count() == 1));
        s.on_sent();
        // Announces are spaced: the next one waits for the interval. A
        // renewal keeps the first grant's time.
        s.on_lease(301, Ok(vec![1, 2, 3]));
        s.on_chunk(302, Source::Origin, 1, Outcome::Verified, Some(h));
        s.on_chunk(304, Source::Origin, 2, Outcome::Verified, Some(h));
        let acts = drain(&mut s, 304);
        assert!(
            matches!(acts.as_slice(), [Io::Publish(p)] if p.fetch_ms() == Some(301)),
            "{acts:?}"
        );
        s.on_sent();
        assert_eq!(drain(&mut s, 305), vec![]);
        assert_eq!(s.next_deadline(), Some(501));
        assert!(matches!(drain(&mut s, 501).as_slice(), [Io::Announce(_)]));
    }

    #[test]
    fn lease_requests_say_the_round_trip_to_the_tracker() {
        let mut s = session();
        let acts = drain(&mut s, 0);
        assert!(
            acts.iter()
                .any(|io| matches!(io, Io::Lease(r) if r.rtt_ms().is_none())),
            "nothing measured yet: {acts:?}"
        );
        // A lookup answered after 100 ms, a lease refused after 200:
        // smoothed 125 ms, and the refused lease waits at least that.
        s.on_lookup(100, Err(TrackerFailure::Refused));
        s.on_lease(200, Ok(vec![]));
        let lease = |acts: &[Io]| {
            acts.iter().find_map(|io| match io {
                Io::Lease(r) => Some(r.rtt_ms()),
                _ => None,
            })
        };
        assert_eq!(lease(&drain(&mut s, 324)), None);
        assert_eq!(lease(&drain(&mut s, 325)), Some(Some(125)));
    }

    #[test]
    fn an_incomplete_download_announces_at_least_every_keepalive_and_says_so() {
        let mut s = session();
        drain(&mut s, 0);
        s.on_lookup(1, Err(TrackerFailure::Refused));
        s.on_lease(2, Ok(vec![0, 1, 2, 3]));
        drain(&mut s, 2);
        let h = ChunkHash::of(b"zero");
        s.on_chunk(300, Source::Origin, 0, Outcome::Verified, Some(h));
        drain(&mut s, 300);
        s.on_sent();
        let announces = |acts: Vec<Io>| -> Vec<Announce> {
            acts.into_iter()
                .filter_map(|io| match io {
                    Io::Announce(a) => Some(a),
                    _ => None,
                })
                .collect()
        };
        let first = announces(drain(&mut s, 301));
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].next_ms().map(|n| n.get()), Some(1_000));
        s.on_sent();
        // Nothing new for a second: announced again all the same.
        assert!(s.next_deadline().is_some_and(|t| t <= 1_301));
        assert!(announces(drain(&mut s, 1_300)).is_empty());
        let again = announces(drain(&mut s, 1_301));
        assert_eq!(again.len(), 1, "keepalive");
        assert_eq!(again[0].blobs()[0].have().count(), 1);
        s.on_sent();
        // Not while the tracker is down (it is probed instead).
        s.on_lookup(1_400, Err(TrackerFailure::Down));
        for t in (1_500..6_000).step_by(100) {
            let acts = drain(&mut s, t);
            assert!(announces(acts).is_empty(), "at {t}");
        }
        // The complete blob's announce promises nothing: the heartbeat's
        // interval holds again.
        let done = s.finish();
        let last = announces(done);
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].next_ms(), None);
    }

    #[test]
    fn a_tracker_that_went_down_is_probed_and_the_origin_steps_in() {
        let mut s = session();
        drain(&mut s, 0);
        assert_eq!(
            s.on_lookup(1, Err(TrackerFailure::Down)),
            Some(Notice::TrackerDown)
        );
        assert!(s.tracker_down());
        // Tracker down: no known peer holds anything, so the origin serves.
        let acts = drain(&mut s, 1);
        assert!(
            matches!(acts.first(), Some(Io::FetchOrigin { .. })),
            "{acts:?}"
        );
        assert_eq!(s.next_deadline(), Some(2_001));
        assert_eq!(drain(&mut s, 2_001), vec![Io::Lookup { since: None }]);
        assert_eq!(
            s.on_lookup(2_002, Ok(view(1, &[], vec![]))),
            Some(Notice::TrackerBack)
        );
        assert!(!s.tracker_down());
    }

    #[test]
    fn an_excluded_node_still_completes_from_the_origin() {
        let mut s = session();
        drain(&mut s, 0);
        assert_eq!(
            s.on_lease(1, Err(TrackerFailure::Excluded)),
            Some(Notice::Excluded)
        );
        s.on_lookup(2, Err(TrackerFailure::Excluded));
        let acts = drain(&mut s, 2);
        assert!(
            matches!(acts.first(), Some(Io::FetchOrigin { .. })),
            "{acts:?}"
        );
    }

    #[test]
    fn bad_chunks_are_reported_and_finish_publishes_then_announces_the_whole_blob() {
        let mut s = session();
        drain(&mut s, 0);
        s.on_lookup(
            1,
            Ok(view(
                3,
                &[0, 1, 2, 3],
                vec![holder("a", &[0, 1, 2, 3], true)],
            )),
        );
        drain(&mut s, 1);
        s.on_chunk(2, Source::Peer(0), 0, Outcome::Bad, None);
        let acts = drain(&mut s, 2);
        assert!(acts.contains(&Io::Report(Report::BadChunk {
            node: me().node,
            blob: blob(),
            peer: "a".parse().unwrap(),
            chunk: 0,
        })));
        let done = s.finish();
        assert!(matches!(done.as_slice(), [Io::Announce(a)] if a.blobs()[0].is_complete()));
        assert_eq!(
            s.mismatch(),
            Some(Io::Report(Report::DigestMismatch {
                node: me().node,
                blob: blob(),
                epoch: 3
            }))
        );
    }

    #[test]
    fn alone_everything_comes_from_the_origin_and_nothing_is_said_to_a_tracker() {
        let mut s: Session<String> = Session::new(
            SessionConfig::default(),
            blob(),
            layout(),
            Bitfield::for_layout(&layout()),
            None,
            by_name,
            (),
        );
        let acts = drain(&mut s, 0);
        assert_eq!(
            acts,
            vec![Io::FetchOrigin {
                chunks: vec![0, 1, 2, 3]
            },]
        );
        for c in 0..4 {
            s.on_chunk(1, Source::Origin, c, Outcome::Verified, None);
        }
        assert_eq!(drain(&mut s, 1), vec![Io::Complete]);
        assert!(s.finish().is_empty() && s.mismatch().is_none());
    }

    fn bits(chunks: &[u32]) -> Bitfield {
        let mut b = Bitfield::for_layout(&layout());
        for &c in chunks {
            b.set(c).unwrap();
        }
        b
    }

    fn watched(out: &[Io]) -> Vec<u32> {
        out.iter()
            .filter_map(|io| match io {
                Io::Watch { peer } => Some(*peer),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn partial_holders_are_watched_up_to_the_limit_and_their_frames_name_new_chunks() {
        let mut s = session();
        s.cfg.watch_peers = 1;
        drain(&mut s, 0);
        let holders = vec![holder("a", &[0], false), holder("b", &[0], false)];
        s.on_lookup(1, Ok(view(1, &[0, 1, 2, 3], holders)));
        let out = drain(&mut s, 1);
        assert_eq!(watched(&out), [0], "one watch fits: {out:?}");
        // Its frame says it stored chunk 3: asked for at once.
        s.on_watch(2, 0, Some(bits(&[0, 3])));
        let out = drain(&mut s, 2);
        assert!(
            out.iter()
                .any(|io| matches!(io, Io::FetchPeer { peer: 0, chunks } if chunks.contains(&3))),
            "{out:?}"
        );
        // A frame of another layout is not believed and ends the watch.
        s.on_watch(3, 0, Some(Bitfield::new(9).unwrap()));
        assert_eq!(s.watching, 0);
        // The slot is free: the next lookup watches `b`, not `a` (its watch
        // ended) nor the complete holder `c` (nothing more to hear).
        let holders = vec![
            holder("c", &[], true),
            holder("a", &[0], false),
            holder("b", &[0], false),
        ];
        s.on_lookup(600, Ok(view(1, &[], holders)));
        assert_eq!(watched(&drain(&mut s, 600)), [1]);
        // A frame for a peer not watched changes nothing.
        s.on_watch(601, 2, None);
        assert_eq!(s.watching, 1);
    }

    #[test]
    fn a_watched_peer_holding_chunks_of_unknown_hash_hurries_the_next_lookup() {
        let mut s = session();
        drain(&mut s, 0);
        s.on_lookup(1, Ok(view(1, &[0], vec![holder("a", &[0], false)])));
        let out = drain(&mut s, 1);
        assert_eq!(watched(&out), [0]);
        assert!(!out.iter().any(|io| matches!(io, Io::Lookup { .. })));
        // Chunk 1's hash is not known yet: it cannot be asked for, and the
        // tracker is asked again after `hurried_lookup_ms`, not the interval.
        s.on_watch(5, 0, Some(bits(&[0, 1])));
        let out = drain(&mut s, 50);
        assert!(
            !out.iter().any(|io| matches!(io, Io::Lookup { .. })),
            "{out:?}"
        );
        assert!(
            !out.iter()
                .any(|io| matches!(io, Io::FetchPeer { chunks, .. } if chunks.contains(&1))),
            "{out:?}"
        );
        assert!(
            s.next_deadline().is_some_and(|t| t <= 101),
            "{:?}",
            s.next_deadline()
        );
        let out = drain(&mut s, 101);
        assert!(
            out.iter().any(|io| matches!(io, Io::Lookup { .. })),
            "{out:?}"
        );
    }
}
