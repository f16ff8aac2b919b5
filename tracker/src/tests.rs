//! Deterministic tests of the tracker core: scenarios for each rule, and a
//! property test that runs random operation sequences and checks the
//! invariants after every step.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use shoal_proto::tracker_api::{
    Announce, BlobHave, ChunkHash, HashCursor, LeaseGrant, LeaseRequest, NodeId, PublishHashes,
    PublishRejection, PublishReply, Rack, Report, ReportReply, TrackerError, MAX_DENIED,
};
use shoal_proto::{Bitfield, ChunkLayout, Digest};

use crate::{Tracker, TrackerConfig};

const MIB: u32 = 1 << 20;

fn id(n: usize) -> NodeId {
    format!("n{n}").parse().unwrap()
}

/// A node that never takes part: it looks up without changing anything.
fn observer() -> NodeId {
    "observer".parse().unwrap()
}

fn blob(n: u8) -> Digest {
    Digest::of(&[b'b', n])
}

fn layout(chunks: u32) -> ChunkLayout {
    ChunkLayout::new(u64::from(chunks) * u64::from(MIB), MIB).unwrap()
}

/// The "true" hash of a chunk, as an honest origin fetch would give it.
fn truth(d: &Digest, i: u32) -> ChunkHash {
    ChunkHash::of(format!("{d}/{i}").as_bytes())
}

fn bits(len: u32, ones: impl IntoIterator<Item = u32>) -> Bitfield {
    let mut b = Bitfield::new(len).unwrap();
    for i in ones {
        b.set(i).unwrap();
    }
    b
}

fn partial(d: Digest, l: ChunkLayout, ones: impl IntoIterator<Item = u32>) -> BlobHave {
    BlobHave::new(d, l, bits(l.count(), ones), false).unwrap()
}

/// A tracker plus helpers that build requests.
struct Harness {
    t: Tracker,
}

impl Harness {
    fn new() -> Self {
        Self::with(TrackerConfig::default())
    }

    fn with(cfg: TrackerConfig) -> Self {
        Harness {
            t: Tracker::new(cfg).unwrap(),
        }
    }

    fn announce(&mut self, now: u64, n: usize, blobs: Vec<BlobHave>) -> Result<(), TrackerError> {
        self.announce_full(now, n, blobs, vec![], false)
    }

    fn announce_full(
        &mut self,
        now: u64,
        n: usize,
        blobs: Vec<BlobHave>,
        dropped: Vec<Digest>,
        full: bool,
    ) -> Result<(), TrackerError> {
        let addr = format!("10.0.{}.{}:4901", n / 250, n % 250 + 1)
            .parse()
            .unwrap();
        let a = Announce::new(id(n), addr, blobs, dropped, full)?;
        self.t.announce(now, a).map(|_| ())
    }

    fn lease(
        &mut self,
        now: u64,
        n: usize,
        d: Digest,
        l: ChunkLayout,
        max: u32,
        from: u32,
    ) -> LeaseGrant {
        self.try_lease(now, n, d, l, max, from).unwrap()
    }

    fn try_lease(
        &mut self,
        now: u64,
        n: usize,
        d: Digest,
        l: ChunkLayout,
        max: u32,
        from: u32,
    ) -> Result<LeaseGrant, TrackerError> {
        let r = LeaseRequest::new(id(n), d, l, max, from)?;
        self.t.lease(now, r)
    }

    fn publish(
        &mut self,
        now: u64,
        n: usize,
        d: Digest,
        hashes: Vec<(u32, ChunkHash)>,
    ) -> PublishReply {
        let p = PublishHashes::new(id(n), d, hashes).unwrap();
        self.t.publish_hashes(now, p).unwrap()
    }

    fn publish_true(&mut self, now: u64, n: usize, d: Digest, chunks: &[u32]) -> PublishReply {
        self.publish(
            now,
            n,
            d,
            chunks.iter().map(|&i| (i, truth(&d, i))).collect(),
        )
    }

    fn holders(&mut self, now: u64, n: usize, d: Digest) -> Vec<NodeId> {
        let v = self.t.lookup(now, &id(n), &d).unwrap();
        v.holders().iter().map(|h| h.node.clone()).collect()
    }

    fn bad_chunk(
        &mut self,
        now: u64,
        reporter: usize,
        peer: usize,
        d: Digest,
        chunk: u32,
    ) -> Vec<NodeId> {
        let r = Report::BadChunk {
            node: id(reporter),
            blob: d,
            peer: id(peer),
            chunk,
        };
        self.t.report(now, r).unwrap().excluded
    }

    fn check(&self) {
        self.t.check_invariants().unwrap();
    }
}

#[test]
fn config_validation() {
    let cfg = TrackerConfig {
        lease_ttl_ms: 0,
        ..TrackerConfig::default()
    };
    assert_eq!(
        Tracker::new(cfg).unwrap_err().to_string(),
        "tracker config: lease_ttl_ms must be at least 1"
    );
    let cfg: TrackerConfig = serde_json::from_str(r#"{"max_lease_chunks": 4}"#).unwrap();
    assert_eq!(cfg.max_lease_chunks, 4);
    assert_eq!(cfg.member_ttl_ms, 30_000);
    assert!(serde_json::from_str::<TrackerConfig>(r#"{"nope": 1}"#).is_err());
}

#[test]
fn cold_cluster_fetches_each_chunk_from_the_origin_once() {
    let (d, l) = (blob(1), layout(1000));
    for from_spread in [false, true] {
        let mut h = Harness::new();
        let nodes = 40;
        for n in 0..nodes {
            h.announce(0, n, vec![]).unwrap();
        }
        let mut granted: BTreeMap<u32, usize> = BTreeMap::new();
        let mut now = 0;
        for round in 0..100 {
            // Everyone asks at the same instant.
            let mut this_round = BTreeSet::new();
            let mut grants = Vec::new();
            for n in 0..nodes {
                let from = if from_spread {
                    (n as u32 * 97) % 1000
                } else {
                    0
                };
                let g = h.lease(now, n, d, l, 64, from);
                assert!(g.chunks.len() <= 16);
                for &c in &g.chunks {
                    assert!(
                        this_round.insert(c),
                        "chunk {c} granted twice in round {round}"
                    );
                    assert!(granted.insert(c, n).is_none(), "chunk {c} granted again");
                }
                grants.push((n, g.chunks));
            }
            h.check();
            // Each node fetches its chunks from the origin and publishes them.
            now += 100;
            for (n, chunks) in grants.into_iter().filter(|(_, c)| !c.is_empty()) {
                let r = h.publish_true(now, n, d, &chunks);
                assert_eq!(r.accepted as usize, chunks.len());
            }
            h.check();
            if granted.len() == 1000 {
                break;
            }
        }
        assert_eq!(granted.len(), 1000, "every chunk leased exactly once");
        assert_eq!(h.t.stats().hashes, 1000);
        assert_eq!(h.t.stats().leases, 0);
        // Nothing is left to fetch from the origin.
        assert!(h.lease(now, 0, d, l, 16, 0).chunks.is_empty());
    }
}

#[test]
fn grants_prefer_from_and_wrap() {
    let (d, l) = (blob(1), layout(10));
    let mut h = Harness::new();
    h.announce(0, 0, vec![]).unwrap();
    h.announce(0, 1, vec![]).unwrap();
    assert_eq!(h.lease(0, 0, d, l, 3, 8).chunks, [8, 9, 0]);
    assert_eq!(h.lease(0, 1, d, l, 4, 8).chunks, [1, 2, 3, 4]);
    let g = h.lease(0, 0, d, l, 5, 5);
    // Own leases first (nearest `from` onward), then fresh ones from `from`.
    assert_eq!(g.chunks, [8, 9, 0, 5, 6]);
}

#[test]
fn expired_lease_is_handed_over() {
    let (d, l) = (blob(1), layout(4));
    // Written for a 10 s lease (the default is shorter).
    let mut h = Harness::with(TrackerConfig {
        lease_ttl_ms: 10_000,
        ..TrackerConfig::default()
    });
    for n in 0..3 {
        h.announce(0, n, vec![]).unwrap();
    }
    let g = h.lease(0, 0, d, l, 2, 0);
    assert_eq!((g.chunks.as_slice(), g.expires_ms), (&[0, 1][..], 10_000));
    assert_eq!(h.lease(9_999, 1, d, l, 2, 0).chunks, [2, 3]);
    // Node 0 stalls; its lease ends and node 2 takes chunk 0 over.
    h.announce(10_000, 0, vec![]).unwrap();
    h.announce(10_000, 2, vec![]).unwrap();
    assert_eq!(h.t.lease_of(&d, 0), None);
    assert_eq!(h.lease(10_000, 2, d, l, 1, 0).chunks, [0]);
    // Node 0 finally publishes: chunk 0 is no longer its to publish, chunk 1
    // (expired but not taken over) still is.
    let r = h.publish_true(10_001, 0, d, &[0, 1]);
    assert_eq!(r.accepted, 1);
    assert_eq!(r.rejected, [(0, PublishRejection::NotLeaseHolder)]);
    assert_eq!(h.publish_true(10_002, 2, d, &[0]).accepted, 1);
    h.check();
}

#[test]
fn leases_are_renewed_within_budget() {
    let (d, l) = (blob(1), layout(40));
    // Written for a 10 s lease (the default is shorter), about one member's
    // cap (the blob's is tested below).
    let mut h = Harness::with(TrackerConfig {
        lease_ttl_ms: 10_000,
        max_blob_lease_bytes: u64::MAX,
        ..TrackerConfig::default()
    });
    h.announce(0, 0, vec![]).unwrap();
    h.announce(0, 1, vec![]).unwrap();
    let first = h.lease(0, 0, d, l, 16, 0);
    assert_eq!(first.chunks, (0..16).collect::<Vec<_>>());
    // Chunk 3 arrives and is announced (its hash is not known yet).
    h.announce(1_000, 0, vec![partial(d, l, [3])]).unwrap();
    let again = h.lease(5_000, 0, d, l, 4, 2);
    assert_eq!(
        again.chunks,
        [2, 4, 5, 6],
        "renewed, nearest `from`, skipping held chunk 3"
    );
    assert_eq!(again.expires_ms, 15_000);
    // Still at the per-blob cap of 16 outstanding leases: nothing new.
    let capped = h.lease(5_000, 0, d, l, 16, 0);
    assert_eq!(capped.chunks.len(), 15);
    assert!(capped.chunks.iter().all(|&c| c < 16 && c != 3));
    // At 12 s the renewed leases still hold; chunk 3's original lease ended
    // (it was never renewed: node 0 holds the chunk) and is free again.
    h.announce(12_000, 1, vec![]).unwrap();
    let other = h.lease(12_000, 1, d, l, 16, 0);
    assert_eq!(other.chunks[0], 3);
    assert!(other.chunks[1..].iter().all(|&c| c >= 16));
    h.check();
}

#[test]
fn hashes_only_from_the_lease_holder() {
    let (d, l) = (blob(1), layout(4));
    let mut h = Harness::new();
    for n in 0..3 {
        h.announce(0, n, vec![]).unwrap();
    }
    assert_eq!(h.lease(0, 0, d, l, 2, 0).chunks, [0, 1]);
    let r = h.publish_true(1, 1, d, &[0]);
    assert_eq!(r.rejected, [(0, PublishRejection::NotLeaseHolder)]);
    let r = h.publish_true(1, 0, d, &[0, 7]);
    assert_eq!(r.accepted, 1);
    assert_eq!(r.rejected, [(7, PublishRejection::OutOfRange)]);
    // Accepting marks the publisher as holder and releases the lease.
    assert_eq!(h.t.lease_of(&d, 0), None);
    assert_eq!(h.holders(2, 1, d), [id(0)]);
    assert!(!h.t.is_leasable(&d, 0));
    // Republishing the same hash is fine for its publisher only.
    assert_eq!(h.publish_true(2, 0, d, &[0]).accepted, 1);
    assert_eq!(
        h.publish_true(2, 2, d, &[0]).rejected,
        [(0, PublishRejection::NotLeaseHolder)]
    );
    // Publishing needs membership, and the blob must be known.
    let p = PublishHashes::new(id(9), d, vec![(1, truth(&d, 1))]).unwrap();
    assert_eq!(
        h.t.publish_hashes(3, p),
        Err(TrackerError::NotAMember(id(9)))
    );
    let p = PublishHashes::new(id(0), blob(9), vec![]).unwrap();
    assert_eq!(
        h.t.publish_hashes(3, p),
        Err(TrackerError::UnknownBlob(blob(9)))
    );
    let v = h.t.lookup(3, &id(2), &d).unwrap();
    assert_eq!(v.hashes()[0], Some(truth(&d, 0)));
    assert_eq!(v.hashes()[1], None);
    assert_eq!(v.leased().iter_ones().collect::<Vec<_>>(), [1]);
    // Chunk 0 is served (held, hash published), whoever is named.
    let served = v.served().expect("this tracker says what is served");
    assert_eq!(served.iter_ones().collect::<Vec<_>>(), [0]);
    h.check();
}

#[test]
fn conflicting_hashes_are_refused_and_struck() {
    let (d, l) = (blob(1), layout(4));
    let mut h = Harness::new();
    h.announce(0, 0, vec![]).unwrap();
    assert_eq!(h.lease(0, 0, d, l, 4, 0).chunks, [0, 1, 2, 3]);
    assert_eq!(h.publish_true(1, 0, d, &[0, 1, 2, 3]).accepted, 4);
    // Node 0 goes away; its hashes stay on file, the chunks become leasable.
    h.announce(31_000, 1, vec![]).unwrap();
    assert_eq!(h.t.stats().members, 1);
    assert_eq!(h.t.stats().hashes, 4);
    assert_eq!(h.lease(31_000, 1, d, l, 4, 0).chunks, [0, 1, 2, 3]);
    // Node 1's origin fetch of chunk 0 agrees; chunk 1 does not.
    let wrong = ChunkHash::of(b"corrupt");
    let r = h.publish(31_001, 1, d, vec![(0, truth(&d, 0)), (1, wrong)]);
    assert_eq!(r.accepted, 1);
    assert_eq!(r.rejected, [(1, PublishRejection::Conflict)]);
    let v = h.t.lookup(31_001, &id(1), &d).unwrap();
    assert_eq!(v.hashes()[1], Some(truth(&d, 1)), "the known hash stands");
    assert!(!h.t.is_excluded(&id(1)));
    // A second strike excludes it, withdrawing what it published.
    let r = h.publish(31_002, 1, d, vec![(2, wrong)]);
    assert_eq!(r.rejected, [(2, PublishRejection::Conflict)]);
    assert!(h.t.is_excluded(&id(1)));
    h.check();
}

#[test]
fn a_lookup_under_the_shared_lock_answers_as_the_exclusive_one_until_something_runs_out() {
    let (d, l) = (blob(1), layout(8));
    let mut h = Harness::new();
    h.announce(0, 0, vec![partial(d, l, [0, 1])]).unwrap();
    h.announce(0, 1, vec![]).unwrap();
    let g = h.lease(0, 1, d, l, 2, 2);
    assert_eq!(g.chunks, [2, 3]);
    for now in [1, g.expires_ms - 1] {
        assert!(!h.t.expiry_due(now), "nothing has run out at {now}");
        let shared = h.t.lookup_current(now, &id(1), &d, None).unwrap();
        assert_eq!(shared, h.t.lookup_since(now, &id(1), &d, None).unwrap());
        assert!(shared.leased().get(2));
    }
    // The lease runs out: the shared answer would still show it, so the
    // server takes the exclusive lock and expires it first.
    let end = g.expires_ms;
    assert!(h.t.expiry_due(end));
    assert!(h
        .t
        .lookup_current(end, &id(1), &d, None)
        .unwrap()
        .leased()
        .get(2));
    assert!(!h
        .t
        .lookup_since(end, &id(1), &d, None)
        .unwrap()
        .leased()
        .get(2));
    assert!(!h.t.expiry_due(end));
    // A member silent past its time is due too.
    let ttl = TrackerConfig::default().member_ttl_ms;
    h.announce(ttl, 1, vec![]).unwrap();
    assert!(!h.t.expiry_due(ttl));
    assert!(h.t.expiry_due(ttl + 1), "member 0 fell silent at 0");
    let stale = h.t.lookup_current(ttl + 1, &id(1), &d, None).unwrap();
    assert_eq!(stale.holders()[0].node, id(0));
    assert_eq!(
        h.t.lookup_since(ttl + 1, &id(1), &d, None),
        Err(TrackerError::UnknownBlob(d)),
        "the blob left with its only holder"
    );
    assert!(!h.t.expiry_due(ttl + 1));
    h.check();
}

#[test]
fn an_announce_older_than_a_publish_does_not_take_the_published_chunks_back() {
    let (d, l) = (blob(1), layout(8));
    let mut h = Harness::new();
    h.announce(0, 0, vec![]).unwrap();
    h.announce(0, 1, vec![]).unwrap();
    assert_eq!(h.lease(0, 0, d, l, 2, 2).chunks, [2, 3]);
    h.publish_true(5, 0, d, &[2, 3]);
    // Made before the publish (chunk 0 only), answered after it.
    h.announce(6, 0, vec![partial(d, l, [0])]).unwrap();
    let v = h.t.lookup(7, &id(1), &d).unwrap();
    let have = &v.holders()[0].have;
    assert!(have.get(0) && have.get(2) && have.get(3), "{have:?}");
    assert!(!h.t.is_leasable(&d, 2), "a held chunk leased again");
    // Dropping the blob still drops it all.
    h.announce_full(8, 0, vec![], vec![d], false).unwrap();
    assert!(h.holders(9, 1, d).is_empty());
    h.check();
}

#[test]
fn member_expiry_removes_holdings_and_leases() {
    let (d, l) = (blob(1), layout(8));
    let mut h = Harness::new();
    h.announce(0, 0, vec![partial(d, l, [0, 1])]).unwrap();
    h.announce(0, 1, vec![]).unwrap();
    assert_eq!(h.lease(0, 0, d, l, 2, 2).chunks, [2, 3]);
    // Node 1 keeps announcing, node 0 falls silent.
    h.announce(20_000, 1, vec![]).unwrap();
    assert_eq!(h.holders(30_000, 1, d), [id(0)]);
    assert_eq!(
        h.t.stats().members,
        2,
        "silent for exactly the TTL: still a member"
    );
    assert_eq!(h.t.stats().members, 2);
    h.t.expire(30_001);
    assert_eq!(h.t.stats().members, 1);
    assert_eq!(
        h.t.lookup(30_001, &id(1), &d),
        Err(TrackerError::UnknownBlob(d))
    );
    assert_eq!(h.t.stats().blobs, 0, "a blob with nothing left is dropped");
    assert_eq!(h.t.stats().leases, 0);
    assert_eq!(h.lease(30_001, 1, d, l, 4, 0).chunks, [0, 1, 2, 3]);
    let p = PublishHashes::new(id(0), d, vec![(2, truth(&d, 2))]).unwrap();
    assert_eq!(
        h.t.publish_hashes(30_002, p),
        Err(TrackerError::NotAMember(id(0)))
    );
    h.check();
}

#[test]
fn a_leaving_member_is_forgotten_at_once_with_its_holdings_and_leases() {
    let (d, l) = (blob(1), layout(8));
    let mut h = Harness::new();
    h.announce(0, 0, vec![partial(d, l, [0, 1])]).unwrap();
    h.announce(0, 1, vec![]).unwrap();
    assert_eq!(h.lease(0, 0, d, l, 2, 2).chunks, [2, 3]);
    assert_eq!(h.holders(1, 1, d), [id(0)]);
    let leave = Announce::leave(id(0), "10.0.0.1:4901".parse().unwrap());
    let json = serde_json::to_string(&leave).unwrap();
    assert!(json.contains("\"leaving\":true"), "{json}");
    let reply =
        h.t.announce(2, serde_json::from_str(&json).unwrap())
            .unwrap();
    assert!(reply.known);
    // Long before its membership would have run out (30 s).
    assert_eq!(h.t.stats().members, 1);
    assert_eq!(h.t.stats().leases, 0);
    assert_eq!(
        h.t.lookup(3, &id(1), &d),
        Err(TrackerError::UnknownBlob(d)),
        "nothing is left of a blob only the leaver had"
    );
    assert_eq!(h.lease(3, 1, d, l, 4, 0).chunks, [0, 1, 2, 3]);
    // Leaving twice, or without having joined, is harmless; announcing
    // again makes it a member again.
    let again = h.t.announce(4, leave.clone()).unwrap();
    assert!(!again.known);
    h.announce(5, 0, vec![]).unwrap();
    assert_eq!(h.t.stats().members, 2);
    h.check();
}

#[test]
fn a_lookup_with_a_cursor_gets_only_the_hashes_published_since() {
    let (d, l) = (blob(7), layout(4));
    let mut h = Harness::new();
    h.announce(0, 0, vec![]).unwrap();
    h.announce(0, 1, vec![]).unwrap();
    assert_eq!(h.lease(0, 0, d, l, 4, 0).chunks, [0, 1, 2, 3]);
    h.publish_true(1, 0, d, &[0, 1]);
    let first = h.t.lookup(2, &id(1), &d).unwrap();
    assert_eq!(first.hashes().iter().flatten().count(), 2);
    h.publish_true(3, 0, d, &[3]);
    let next =
        h.t.lookup_since(4, &id(1), &d, Some(first.cursor()))
            .unwrap();
    let got: Vec<bool> = next.hashes().iter().map(Option::is_some).collect();
    assert_eq!(got, [false, false, false, true]);
    assert!(next.hash_seq() > first.hash_seq());
    // Nothing new: nothing sent.
    let idle =
        h.t.lookup_since(5, &id(1), &d, Some(next.cursor()))
            .unwrap();
    assert!(idle.hashes().iter().all(Option::is_none));
    // A cursor of another epoch (withdrawn hashes, a restarted tracker) gets all.
    let stale = HashCursor {
        epoch: next.epoch() + 1,
        seq: next.hash_seq(),
    };
    let all = h.t.lookup_since(6, &id(1), &d, Some(stale)).unwrap();
    assert_eq!(all.hashes().iter().flatten().count(), 3);
    h.check();
}

#[test]
fn epochs_can_start_anywhere() {
    let mut t = Tracker::new(TrackerConfig::default())
        .unwrap()
        .starting_epochs_at(1_000_000);
    let a = Announce::new(
        id(0),
        "10.0.0.1:4901".parse().unwrap(),
        vec![partial(blob(1), layout(2), [0])],
        vec![],
        false,
    );
    t.announce(0, a.unwrap()).unwrap();
    assert_eq!(t.lookup(0, &id(0), &blob(1)).unwrap().epoch(), 1_000_000);
}

#[test]
fn an_announce_says_whether_the_tracker_knew_the_member() {
    let mut h = Harness::new();
    let announce = |h: &mut Harness, now| {
        let a = Announce::new(
            id(0),
            "10.0.0.1:4901".parse().unwrap(),
            vec![],
            vec![],
            false,
        );
        h.t.announce(now, a.unwrap()).unwrap().known
    };
    assert!(!announce(&mut h, 0), "a new member was known");
    assert!(announce(&mut h, 1_000));
    // Forgotten after the TTL of silence: asked to announce everything again.
    assert!(!announce(&mut h, 40_000));
    h.check();
}

/// Announce replies name other members' DHT addresses: those after the
/// announcer in name order, around the ring, at most `MAX_DHT_PEERS`, never
/// its own, only of members that gave one.
#[test]
fn announce_replies_name_the_next_members_dht_addresses() {
    use shoal_proto::tracker_api::MAX_DHT_PEERS;
    let mut h = Harness::new();
    let dht = |n: usize| -> shoal_proto::tracker_api::PeerAddr {
        format!("10.0.0.{n}:4902").parse().unwrap()
    };
    let announce = |h: &mut Harness, n: usize, with_dht: bool| {
        let a = Announce::new(
            id(n),
            format!("10.0.0.{n}:4901").parse().unwrap(),
            vec![],
            vec![],
            false,
        )
        .unwrap()
        .with_dht(with_dht.then(|| dht(n)));
        h.t.announce(0, a).unwrap().dht_peers
    };
    assert!(announce(&mut h, 1, true).is_empty(), "nobody else yet");
    // n2 gives no DHT address: it is named to nobody.
    assert_eq!(announce(&mut h, 2, false), [dht(1)]);
    assert_eq!(announce(&mut h, 3, true), [dht(1)]);
    assert_eq!(announce(&mut h, 1, true), [dht(3)]);
    for n in 4..30 {
        announce(&mut h, n, true);
    }
    // Names sort as strings: after n3 come n4..n9, then n1 (wrapping), n10...
    let got = announce(&mut h, 3, true);
    assert_eq!(got.len(), MAX_DHT_PEERS);
    assert_eq!(got[0], dht(4));
    assert!(!got.contains(&dht(3)), "its own address");
    assert!(!got.contains(&dht(2)), "a member without a DHT");
    // n4 stops running its DHT: no longer named; a restored snapshot names
    // the same members.
    announce(&mut h, 4, false);
    let got = announce(&mut h, 3, true);
    assert_eq!(got[0], dht(5));
    assert!(!got.contains(&dht(4)));
    let restored = Tracker::restore(TrackerConfig::default(), &h.t.snapshot()).unwrap();
    h.t = restored;
    assert_eq!(announce(&mut h, 3, true), got);
    h.check();
}

#[test]
fn time_never_goes_backwards() {
    let (d, l) = (blob(1), layout(2));
    // Written for a 10 s lease (the default is shorter).
    let mut h = Harness::with(TrackerConfig {
        lease_ttl_ms: 10_000,
        ..TrackerConfig::default()
    });
    h.announce(50_000, 0, vec![]).unwrap();
    let g = h.lease(10, 0, d, l, 1, 0);
    assert_eq!(g.expires_ms, 60_000);
}

#[test]
fn announcing_a_served_chunk_ends_its_lease() {
    let (d, l) = (blob(1), layout(2));
    let mut h = Harness::new();
    h.announce(0, 0, vec![]).unwrap();
    h.lease(0, 0, d, l, 2, 0);
    h.publish_true(1, 0, d, &[0, 1]);
    // Node 1 copies chunk 0 from node 0; node 0 then leaves.
    h.announce(20_000, 1, vec![partial(d, l, [0])]).unwrap();
    h.announce(31_000, 1, vec![partial(d, l, [0])]).unwrap();
    h.announce(31_000, 2, vec![]).unwrap();
    // Chunk 1 (hash known, nobody holds it) is leasable; chunk 0 is not.
    assert_eq!(h.lease(31_000, 2, d, l, 2, 0).chunks, [1]);
    // Node 1 got chunk 1 from somewhere after all: the lease is moot.
    h.announce(31_001, 1, vec![partial(d, l, [0, 1])]).unwrap();
    assert_eq!(h.t.lease_of(&d, 1), None);
    // A chunk announced while its hash is unknown does not end a lease: the
    // lessee still has to publish it.
    let (e, m) = (blob(2), layout(2));
    h.lease(31_001, 2, e, m, 1, 0);
    h.announce(31_002, 1, vec![partial(e, m, [0])]).unwrap();
    assert_eq!(h.t.lease_of(&e, 0).map(|l| l.0), Some(id(2)));
    h.check();
}

#[test]
fn full_announce_and_dropped_blobs() {
    let (d, e, l) = (blob(1), blob(2), layout(4));
    let mut h = Harness::new();
    h.announce(0, 0, vec![partial(d, l, [0]), partial(e, l, [1])])
        .unwrap();
    h.announce(0, 1, vec![partial(d, l, [2])]).unwrap();
    assert_eq!(h.t.stats().holdings, 3);
    // A full list without `e` forgets it.
    h.announce_full(1, 0, vec![partial(d, l, [0, 3])], vec![], true)
        .unwrap();
    assert_eq!(h.t.stats().holdings, 2);
    assert_eq!(h.t.lookup(1, &id(1), &e), Err(TrackerError::UnknownBlob(e)));
    // Dropping a blob hands its leases over at once.
    // No hash is known, so every chunk is leasable, held or not.
    assert_eq!(h.lease(2, 0, d, l, 4, 0).chunks, [0, 1, 2, 3]);
    h.announce_full(3, 0, vec![], vec![d], false).unwrap();
    assert_eq!(h.t.stats().leases, 0);
    assert_eq!(h.holders(3, 2, d), [id(1)]);
    // An empty bitfield (not complete) holds nothing.
    h.announce(4, 1, vec![partial(d, l, [])]).unwrap();
    assert_eq!(h.t.stats().blobs, 0);
    h.check();
}

#[test]
fn lookup_is_bounded_excludes_self_and_spreads() {
    let (d, l) = (blob(1), layout(8));
    let mut h = Harness::new();
    let n = 300;
    for i in 0..n {
        h.announce(0, i, vec![BlobHave::complete(d, l)]).unwrap();
    }
    let mut seen = BTreeSet::new();
    let mut subsets = BTreeSet::new();
    for i in 0..n {
        let got = h.holders(1, i, d);
        assert_eq!(got.len(), 32);
        assert!(!got.contains(&id(i)), "never the requester itself");
        assert_eq!(got.iter().collect::<BTreeSet<_>>().len(), 32, "distinct");
        seen.extend(got.iter().cloned());
        subsets.insert(got);
    }
    assert_eq!(seen.len(), n, "every holder is handed out to someone");
    assert!(subsets.len() > n / 2, "requesters get different subsets");
    assert_ne!(h.holders(1, 0, d), h.holders(1, 1, d));
    // Deterministic within an announce interval, rotating across intervals.
    assert_eq!(h.holders(1, 0, d), h.holders(4_999, 0, d));
    assert_ne!(h.holders(1, 0, d), h.holders(5_000, 0, d));
    // A non-member may look up; it gets peers too.
    assert_eq!(h.holders(5_000, 9999, d).len(), 32);
}

#[test]
fn lookup_finds_the_only_holder_of_a_rare_chunk() {
    let (d, l) = (blob(1), layout(64));
    let mut h = Harness::new();
    // 1000 holders of chunks 0..63; one node alone holds chunk 63.
    h.announce(0, 0, vec![]).unwrap();
    h.lease(0, 0, d, l, 16, 48);
    h.publish_true(1, 0, d, &(48..64).collect::<Vec<_>>());
    for i in 1..1000 {
        h.announce(2, i, vec![partial(d, l, 0..48)]).unwrap();
    }
    h.announce(0, 5000, vec![]).unwrap();
    h.lease(2, 5000, d, l, 16, 0);
    h.publish_true(3, 5000, d, &(0..16).collect::<Vec<_>>());
    for r in 1000..1100 {
        let got = h.holders(4, r, d);
        assert_eq!(got.len(), 32);
        assert!(
            got.contains(&id(0)),
            "requester {r} must learn of the rare holder"
        );
    }
    // A requester that has the rare chunks already is not steered there.
    h.announce(4, 2000, vec![partial(d, l, 48..64)]).unwrap();
    let got = h.holders(4, 2000, d);
    assert!(got.iter().filter(|n| **n == id(0)).count() <= 1);
    h.check();
}

#[test]
fn lookup_over_ten_thousand_holders() {
    // The data structures make this independent of the holder count (see the
    // module docs); this checks it behaves at the target scale.
    let (d, l) = (blob(1), layout(1000));
    let mut h = Harness::new();
    for i in 0..10_000 {
        let have = if i % 2 == 0 {
            BlobHave::complete(d, l)
        } else {
            partial(d, l, (i as u32 % 1000)..1000)
        };
        h.announce(0, i, vec![have]).unwrap();
    }
    let mut seen = BTreeSet::new();
    for r in (0..10_000).step_by(10) {
        let got = h.holders(1, r, d);
        assert_eq!(got.len(), 32);
        assert!(!got.contains(&id(r)));
        seen.extend(got);
    }
    assert!(seen.len() > 5_000, "spread over the swarm: {}", seen.len());
    assert_eq!(h.t.stats().members, 10_000);
}

#[test]
fn bad_chunk_exclusion_needs_distinct_reporters() {
    let (d, l) = (blob(1), layout(4));
    let mut h = Harness::new();
    for n in 0..5 {
        h.announce(0, n, vec![]).unwrap();
    }
    h.lease(0, 0, d, l, 2, 0);
    h.publish_true(1, 0, d, &[0, 1]);
    h.announce(1, 4, vec![partial(d, l, [0])]).unwrap();
    for _ in 0..5 {
        assert!(
            h.bad_chunk(2, 1, 0, d, 0).is_empty(),
            "one reporter is not enough"
        );
    }
    assert!(h.bad_chunk(2, 2, 0, d, 0).is_empty());
    assert_eq!(h.bad_chunk(2, 3, 0, d, 1), [id(0)]);
    assert!(h.t.is_excluded(&id(0)));
    // Gone from lookups; its hashes withdrawn; chunks leasable again; node 4
    // keeps its bit but needs the hash republished.
    let v = h.t.lookup(3, &id(1), &d).unwrap();
    assert_eq!(v.hashes(), &[None, None, None, None]);
    assert_eq!(v.holders().len(), 1);
    assert_eq!(v.holders()[0].node, id(4));
    assert!(v.holders()[0].have.get(0));
    assert!(h.t.is_leasable(&d, 0) && h.t.is_leasable(&d, 1));
    assert_eq!(h.t.stats().excluded, 1);
    // The excluded node is refused everywhere.
    let excluded = |r: Result<(), TrackerError>| matches!(r, Err(TrackerError::Excluded { .. }));
    assert!(excluded(h.announce(4, 0, vec![])));
    assert!(excluded(h.try_lease(4, 0, d, l, 1, 0).map(|_| ())));
    assert!(excluded(h.t.lookup(4, &id(0), &d).map(|_| ())));
    // Reports about non-members, and from non-members, do nothing / fail.
    assert!(h.bad_chunk(5, 1, 0, d, 0).is_empty());
    let r = Report::BadChunk {
        node: id(9),
        blob: d,
        peer: id(1),
        chunk: 0,
    };
    assert_eq!(h.t.report(5, r), Err(TrackerError::NotAMember(id(9))));
    let r = Report::BadChunk {
        node: id(1),
        blob: d,
        peer: id(2),
        chunk: 4,
    };
    assert_eq!(
        h.t.report(5, r),
        Err(TrackerError::ChunkOutOfRange { index: 4, count: 4 })
    );
    h.check();
    // The exclusion ends after an hour.
    assert!(excluded(h.announce(3_600_001, 0, vec![])));
    h.announce(3_600_002, 0, vec![]).unwrap();
    h.check();
}

#[test]
fn digest_mismatch_withdraws_hashes_and_strikes_publishers() {
    let (d, l) = (blob(1), layout(16));
    let mut h = Harness::new();
    for n in 0..5 {
        h.announce(0, n, vec![]).unwrap();
    }
    h.lease(0, 0, d, l, 8, 0);
    h.lease(0, 1, d, l, 8, 8);
    h.publish_true(1, 0, d, &(0..8).collect::<Vec<_>>());
    h.publish_true(1, 1, d, &(8..16).collect::<Vec<_>>());
    h.announce(2, 2, vec![partial(d, l, 0..10)]).unwrap();
    h.announce(2, 3, vec![BlobHave::complete(d, l)]).unwrap();
    let epoch = h.t.lookup(2, &id(4), &d).unwrap().epoch();

    let report = |epoch| Report::DigestMismatch {
        node: id(2),
        blob: d,
        epoch,
    };
    let r = h.t.report(3, report(epoch)).unwrap();
    assert_eq!(r.withdrawn, 16);
    assert!(r.excluded.is_empty(), "one strike each so far");
    let v = h.t.lookup(3, &id(4), &d).unwrap();
    assert!(v.hashes().iter().all(Option::is_none));
    assert_ne!(v.epoch(), epoch);
    // Partial holders (verified against the suspect hashes) are cleared;
    // the complete holder (verified against the digest) is kept.
    let holders: Vec<_> = v
        .holders()
        .iter()
        .map(|h| (h.node.clone(), h.complete))
        .collect();
    assert_eq!(holders, [(id(3), true)]);
    // Every chunk can be fetched (or, by the complete holder, republished).
    assert!((0..16).all(|i| h.t.is_leasable(&d, i)));
    // A stale report (old epoch) changes nothing.
    assert_eq!(h.t.report(3, report(epoch)).unwrap().withdrawn, 0);

    // The same two publish again and are wrong again: both are excluded.
    h.lease(4, 0, d, l, 8, 0);
    h.lease(4, 1, d, l, 8, 8);
    h.publish_true(5, 0, d, &(0..8).collect::<Vec<_>>());
    h.publish_true(5, 1, d, &(8..16).collect::<Vec<_>>());
    let epoch = h.t.lookup(5, &id(4), &d).unwrap().epoch();
    let r = h.t.report(6, report(epoch)).unwrap();
    assert_eq!(r.excluded, [id(0), id(1)]);
    assert!(h.t.is_excluded(&id(0)) && h.t.is_excluded(&id(1)));
    h.check();
}

#[test]
fn layout_conflicts_are_refused_atomically() {
    let (d, e) = (blob(1), blob(2));
    let mut h = Harness::new();
    h.announce(0, 0, vec![partial(d, layout(4), [0])]).unwrap();
    let other = ChunkLayout::new(4 * u64::from(MIB), MIB / 2).unwrap();
    let err = h
        .announce(
            0,
            1,
            vec![partial(e, layout(2), [0]), partial(d, other, [0])],
        )
        .unwrap_err();
    assert_eq!(
        err,
        TrackerError::LayoutConflict {
            blob: d,
            known: layout(4),
            offered: other
        }
    );
    assert_eq!(err.code(), "layout_conflict");
    // Nothing was applied: node 1 is not a member, blob e is unknown.
    assert_eq!(h.t.stats().members, 1);
    assert_eq!(h.t.stats().blobs, 1);
    assert!(matches!(
        h.try_lease(0, 0, d, other, 1, 0),
        Err(TrackerError::LayoutConflict { .. })
    ));
    h.check();
}

#[test]
fn bitfield_length_mismatch_is_rejected() {
    let l = layout(4);
    assert_eq!(
        BlobHave::new(blob(1), l, bits(5, [0]), false),
        Err(TrackerError::BadBitfield {
            blob: blob(1),
            expected: 4,
            actual: 5
        })
    );
    let json = serde_json::json!({
        "node": "n1", "addr": "10.0.0.1:4901",
        "blobs": [{"blob": blob(1), "size": 4 * MIB, "chunk_size": MIB,
                   "have": bits(5, [0]), "complete": false}],
    });
    let err = serde_json::from_value::<Announce>(json)
        .unwrap_err()
        .to_string();
    assert!(err.contains("covers 5 chunks, the blob has 4"), "{err}");
}

#[test]
fn tables_are_bounded() {
    let l = layout(2);
    let cfg = TrackerConfig {
        max_members: 3,
        max_blobs: 2,
        max_blobs_per_member: 2,
        ..TrackerConfig::default()
    };
    let mut h = Harness::with(cfg);
    for n in 0..3 {
        h.announce(0, n, vec![]).unwrap();
    }
    assert_eq!(
        h.announce(0, 3, vec![]),
        Err(TrackerError::TooMany {
            what: "members",
            limit: 3
        })
    );
    let three = vec![
        partial(blob(1), l, [0]),
        partial(blob(2), l, [0]),
        partial(blob(3), l, [0]),
    ];
    assert!(matches!(
        h.announce(0, 0, three),
        Err(TrackerError::TooMany { .. })
    ));
    h.announce(
        0,
        0,
        vec![partial(blob(1), l, [0]), partial(blob(2), l, [0])],
    )
    .unwrap();
    assert!(matches!(
        h.announce(0, 1, vec![partial(blob(3), l, [0])]),
        Err(TrackerError::TooMany { what: "blobs", .. })
    ));
    // A blob with only hashes left is evicted to make room.
    h.announce_full(1, 0, vec![partial(blob(1), l, [0])], vec![], true)
        .unwrap();
    assert_eq!(h.t.stats().blobs, 1);
    let g = h.lease(1, 1, blob(2), l, 2, 0);
    assert_eq!(g.chunks, [0, 1]);
    h.publish_true(2, 1, blob(2), &[0]);
    h.announce_full(3, 1, vec![], vec![blob(2)], false).unwrap();
    assert_eq!(
        h.t.stats().blobs,
        2,
        "blob 2 is idle, with one hash on file"
    );
    h.announce(4, 2, vec![partial(blob(3), l, [1])]).unwrap();
    assert_eq!(h.t.stats().blobs, 2);
    assert_eq!(h.t.stats().hashes, 0, "blob 2 was evicted");
    h.check();
}

// ---------------------------------------------------------------------------
// Property test: random operation sequences
// ---------------------------------------------------------------------------

const NODES: usize = 5;
const BLOBS: u8 = 3;

#[derive(Debug, Clone)]
enum Op {
    Announce {
        node: usize,
        blob: u8,
        have: Vec<bool>,
        complete: bool,
        full: bool,
        drop: bool,
        odd_layout: bool,
    },
    Lease {
        node: usize,
        blob: u8,
        max: u32,
        from: u32,
    },
    Publish {
        node: usize,
        blob: u8,
        chunks: Vec<u32>,
        honest: bool,
    },
    /// Publish every chunk the node is the lessee of, plus `extra`.
    PublishMine {
        node: usize,
        blob: u8,
        extra: u32,
        honest: bool,
    },
    BadChunk {
        node: usize,
        peer: usize,
        blob: u8,
        chunk: u32,
    },
    Unresponsive {
        node: usize,
        peer: usize,
        blob: u8,
    },
    Mismatch {
        node: usize,
        blob: u8,
        stale: bool,
    },
    Lookup {
        node: usize,
        blob: u8,
    },
    Expire,
    Deny {
        nodes: std::collections::BTreeSet<usize>,
    },
}

fn blob_chunks(b: u8) -> u32 {
    [3, 5, 9][b as usize % 3]
}

fn op() -> impl Strategy<Value = Op> {
    let node = 0..NODES;
    let b = 0..BLOBS;
    prop_oneof![
        5 => (node.clone(), b.clone(), prop::collection::vec(any::<bool>(), 9), any::<bool>(),
              prop::bool::weighted(0.2), prop::bool::weighted(0.1), prop::bool::weighted(0.05))
            .prop_map(|(node, blob, have, complete, full, drop, odd_layout)| Op::Announce {
                node, blob, have, complete, full, drop, odd_layout
            }),
        3 => (node.clone(), b.clone(), 1u32..6, 0u32..9)
            .prop_map(|(node, blob, max, from)| Op::Lease { node, blob, max, from }),
        3 => (node.clone(), b.clone(), prop::collection::btree_set(0u32..10, 1..4),
              prop::bool::weighted(0.9))
            .prop_map(|(node, blob, chunks, honest)| Op::Publish {
                node, blob, chunks: chunks.into_iter().collect(), honest
            }),
        3 => (node.clone(), b.clone(), 0u32..10, prop::bool::weighted(0.9))
            .prop_map(|(node, blob, extra, honest)| Op::PublishMine { node, blob, extra, honest }),
        2 => (node.clone(), node.clone(), b.clone(), 0u32..9)
            .prop_map(|(node, peer, blob, chunk)| Op::BadChunk { node, peer, blob, chunk }),
        1 => (node.clone(), node.clone(), b.clone())
            .prop_map(|(node, peer, blob)| Op::Unresponsive { node, peer, blob }),
        1 => (node.clone(), b.clone(), any::<bool>())
            .prop_map(|(node, blob, stale)| Op::Mismatch { node, blob, stale }),
        2 => (node, b).prop_map(|(node, blob)| Op::Lookup { node, blob }),
        1 => Just(Op::Expire),
        1 => prop::collection::btree_set(0..NODES, 0..3).prop_map(|nodes| Op::Deny { nodes }),
    ]
}

fn small_config() -> TrackerConfig {
    TrackerConfig {
        member_ttl_ms: 30_000,
        lease_ttl_ms: 10_000,
        max_lease_chunks: 3,
        max_blob_lease_bytes: 5 * u64::from(MIB),
        max_peers_per_lookup: 2,
        announce_interval_ms: 5_000,
        max_members: 4,
        max_blobs: 2,
        max_blobs_per_member: 2,
        bad_reports_to_exclude: 2,
        unresponsive_reports_to_drop: 2,
        strikes_to_exclude: 2,
        exclusion_ms: 60_000,
    }
}

/// Runs one step, checking the reply against the state before it; returns
/// the reply's debug form (for the determinism check).
fn step(t: &mut Tracker, now: u64, op: &Op) -> Result<String, TestCaseError> {
    let cfg = t.config().clone();
    let op = &match op.clone() {
        Op::PublishMine {
            node,
            blob: b,
            extra,
            honest,
        } => {
            t.expire(now);
            let d = blob(b);
            let mut chunks: BTreeSet<u32> = (0..blob_chunks(b))
                .filter(|&i| t.lessee_of(&d, i) == Some(id(node)))
                .collect();
            chunks.insert(extra);
            Op::Publish {
                node,
                blob: b,
                chunks: chunks.into_iter().collect(),
                honest,
            }
        }
        other => other,
    };
    let out = match op.clone() {
        Op::Announce {
            node,
            blob: b,
            have,
            complete,
            full,
            drop,
            odd_layout,
        } => {
            let d = blob(b);
            let n = blob_chunks(b);
            let l = if odd_layout {
                ChunkLayout::new(u64::from(n) * u64::from(MIB), MIB / 2).unwrap()
            } else {
                layout(n)
            };
            let ones = (0..l.count()).filter(|&i| complete || have[i as usize % 9]);
            let bh = BlobHave::new(d, l, bits(l.count(), ones), complete).unwrap();
            let (blobs, dropped) = if drop {
                (vec![], vec![d])
            } else {
                (vec![bh], vec![])
            };
            let addr = format!("10.0.0.{}:4901", node + 1).parse().unwrap();
            let a = Announce::new(id(node), addr, blobs, dropped, full).unwrap();
            format!("{:?}", t.announce(now, a))
        }
        Op::Lease {
            node,
            blob: b,
            max,
            from,
        } => {
            let d = blob(b);
            let l = layout(blob_chunks(b));
            let from = from % l.count();
            // Snapshot at `now` (the lease call expires first, too).
            t.expire(now);
            let before: Vec<_> = (0..l.count()).map(|i| t.lease_of(&d, i)).collect();
            let r = LeaseRequest::new(id(node), d, l, max, from).unwrap();
            let reply = t.lease(now, r);
            if let Ok(g) = &reply {
                prop_assert!(g.chunks.len() <= max.min(cfg.max_lease_chunks) as usize);
                // No member names a rack here: one cap for the blob.
                let leased = (0..l.count())
                    .filter(|&i| t.lease_of(&d, i).is_some())
                    .count();
                prop_assert!(leased as u64 <= cfg.max_blob_lease_bytes / u64::from(MIB));
                let set: BTreeSet<_> = g.chunks.iter().collect();
                prop_assert_eq!(set.len(), g.chunks.len(), "a chunk granted twice");
                for &c in &g.chunks {
                    // Never another node's unexpired lease.
                    if let Some((holder, _)) = &before[c as usize] {
                        prop_assert_eq!(holder, &id(node));
                    }
                    prop_assert_eq!(t.lease_of(&d, c), Some((id(node), g.expires_ms)));
                }
            }
            format!("{reply:?}")
        }
        Op::Publish {
            node,
            blob: b,
            chunks,
            honest,
        } => {
            let d = blob(b);
            t.expire(now);
            let lessees: Vec<_> = chunks.iter().map(|&i| t.lessee_of(&d, i)).collect();
            let known: Vec<_> = match t.lookup(now, &observer(), &d) {
                Ok(v) => chunks
                    .iter()
                    .map(|&i| v.hashes().get(i as usize).copied().flatten())
                    .collect(),
                Err(_) => vec![None; chunks.len()],
            };
            let hash = |i| {
                if honest {
                    truth(&d, i)
                } else {
                    ChunkHash::of(&[i as u8])
                }
            };
            let p = PublishHashes::new(id(node), d, chunks.iter().map(|&i| (i, hash(i))).collect())
                .unwrap();
            let reply = t.publish_hashes(now, p);
            if let Ok(r) = &reply {
                let rejected: BTreeSet<u32> = r.rejected.iter().map(|(i, _)| *i).collect();
                for (k, &i) in chunks.iter().enumerate() {
                    if !rejected.contains(&i) && known[k].is_none() {
                        // A new hash is only ever accepted from the lessee.
                        prop_assert_eq!(&lessees[k], &Some(id(node)));
                    }
                    if !rejected.contains(&i) {
                        if let Some(k) = known[k] {
                            prop_assert_eq!(k, hash(i));
                        }
                    }
                }
            }
            format!("{reply:?}")
        }
        Op::BadChunk {
            node,
            peer,
            blob: b,
            chunk,
        } => {
            if node == peer {
                return Ok("self".into());
            }
            let r = Report::BadChunk {
                node: id(node),
                blob: blob(b),
                peer: id(peer),
                chunk,
            };
            format!("{:?}", t.report(now, r))
        }
        Op::Unresponsive {
            node,
            peer,
            blob: b,
        } => {
            if node == peer {
                return Ok("self".into());
            }
            let r = Report::Unresponsive {
                node: id(node),
                blob: blob(b),
                peer: id(peer),
            };
            format!("{:?}", t.report(now, r))
        }
        Op::Mismatch {
            node,
            blob: b,
            stale,
        } => {
            let d = blob(b);
            let epoch = t.lookup(now, &id(node), &d).map(|v| v.epoch()).unwrap_or(0);
            let r = Report::DigestMismatch {
                node: id(node),
                blob: d,
                epoch: if stale { epoch.wrapping_sub(1) } else { epoch },
            };
            format!("{:?}", t.report(now, r))
        }
        Op::Lookup { node, blob: b } => {
            let reply = t.lookup(now, &id(node), &blob(b));
            if let Ok(v) = &reply {
                prop_assert!(v.holders().len() <= cfg.max_peers_per_lookup as usize);
                for h in v.holders() {
                    prop_assert!(h.node != id(node), "requester in its own lookup");
                    prop_assert!(!t.is_excluded(&h.node), "excluded node in a lookup");
                }
                for (i, h) in v.hashes().iter().enumerate() {
                    if let Some(h) = h {
                        prop_assert_eq!(
                            t.lease_of(&blob(b), i as u32).is_some()
                                && v.holders().iter().any(|x| x.have.get(i as u32)),
                            false
                        );
                        let _ = h;
                    }
                }
                for i in v.leased().iter_ones() {
                    prop_assert!(t.lease_of(&blob(b), i).is_some());
                }
            }
            format!("{reply:?}")
        }
        Op::Expire => format!("{}", t.expire(now)),
        Op::Deny { nodes } => {
            let set = nodes.iter().map(|&n| id(n)).collect();
            let reply = t.deny(now, set);
            for &n in &nodes {
                prop_assert!(!t.is_member(&id(n)), "denied node still a member");
            }
            format!("{reply:?}")
        }
        Op::PublishMine { .. } => unreachable!("rewritten above"),
    };
    if let Err(e) = t.check_invariants() {
        return Err(TestCaseError::fail(format!("after {op:?} at {now}: {e}")));
    }
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_the_invariants(
        ops in prop::collection::vec((prop_oneof![30 => 0u64..800, 1 => 0u64..40_000], op()), 1..150)
    ) {
        let mut a = Tracker::new(small_config()).unwrap();
        let mut b = Tracker::new(small_config()).unwrap();
        let mut now = 0;
        for (dt, op) in &ops {
            now += dt;
            let ra = step(&mut a, now, op)?;
            // Same inputs, same outputs: the core is deterministic; and a
            // tracker restored from a snapshot (as tracker replicas are)
            // goes on exactly as the one it was taken of.
            b = Tracker::restore(small_config(), &b.snapshot())
                .map_err(|e| TestCaseError::fail(format!("restore at {now}: {e}")))?;
            let rb = step(&mut b, now, op)?;
            prop_assert_eq!(ra, rb);
        }
        prop_assert_eq!(format!("{:?}", a.stats()), format!("{:?}", b.stats()));
    }
}

/// `by` reports `peer` unresponsive for `d`.
fn unresponsive(by: usize, d: Digest, peer: usize) -> Report {
    Report::Unresponsive {
        node: id(by),
        blob: d,
        peer: id(peer),
    }
}

#[test]
fn a_denied_node_is_forgotten_refused_and_named_to_every_member() {
    let (d, l) = (blob(1), layout(4));
    let mut h = Harness::new();
    for n in 0..3 {
        h.announce(0, n, vec![]).unwrap();
    }
    // Node 0 fetched chunks 0 and 1 under lease and published their hashes;
    // node 1 holds the whole blob.
    h.lease(0, 0, d, l, 2, 0);
    h.publish_true(1, 0, d, &[0, 1]);
    h.announce(2, 1, vec![BlobHave::complete(d, l)]).unwrap();
    let denied: BTreeSet<NodeId> = [id(0), id(1)].into_iter().collect();
    assert_eq!(h.t.deny(3, denied.clone()).unwrap(), 2);
    h.check();
    assert!(!h.t.is_member(&id(0)) && !h.t.is_member(&id(1)));
    // Everything they did is gone: no holders, no hashes from node 0.
    let v = h.t.lookup(4, &id(2), &d);
    assert!(matches!(v, Err(TrackerError::UnknownBlob(_))), "{v:?}");
    // They are refused everything; the others learn the list.
    assert!(matches!(
        h.announce(5, 0, vec![]),
        Err(TrackerError::Denied(n)) if n == id(0)
    ));
    assert!(matches!(
        h.t.lookup(5, &id(1), &d),
        Err(TrackerError::Denied(_))
    ));
    let a = Announce::new(
        id(2),
        "10.0.0.3:4901".parse().unwrap(),
        vec![],
        vec![],
        false,
    )
    .unwrap();
    let reply = h.t.announce(6, a).unwrap();
    assert_eq!(reply.denied, [id(0), id(1)]);
    // The same list again denies nobody new; a shorter one lets node 1 back.
    assert_eq!(h.t.deny(7, denied).unwrap(), 0);
    assert_eq!(h.t.deny(8, [id(0)].into_iter().collect()).unwrap(), 0);
    h.announce(9, 1, vec![BlobHave::complete(d, l)]).unwrap();
    assert!(h.t.is_member(&id(1)));
    h.check();
    // The list is bounded.
    let many = (0..=MAX_DENIED)
        .map(|i| format!("n{i}").parse().unwrap())
        .collect();
    assert!(matches!(
        h.t.deny(10, many),
        Err(TrackerError::TooMany { .. })
    ));
}

#[test]
fn a_peer_reported_unresponsive_by_two_members_is_forgotten_unless_it_announces() {
    let (d, l) = (blob(1), layout(4));
    let mut h = Harness::new();
    for n in 0..4 {
        h.announce(0, n, vec![]).unwrap();
    }
    // Node 0 fetched chunks 0 and 1 from the origin and holds them.
    h.lease(0, 0, d, l, 2, 0);
    h.publish_true(1, 0, d, &[0, 1]);
    assert!(!h.t.is_leasable(&d, 0));
    let stalled = |by: usize| unresponsive(by, d, 0);
    // One reporter (twice) is not enough.
    for _ in 0..2 {
        let r = h.t.report(2, stalled(1)).unwrap();
        assert!(r.suspected.is_empty() && r.excluded.is_empty());
    }
    // A second one cuts its membership to an interval and a half after its
    // last announce (at 0).
    let r = h.t.report(3, stalled(2)).unwrap();
    assert_eq!(r.suspected, [id(0)]);
    assert!(!h.t.is_excluded(&id(0)));
    h.check();
    // Alive after all: it announces and keeps its place past that.
    h.announce(5_000, 0, vec![]).unwrap();
    for n in 1..4 {
        h.announce(9_000, n, vec![]).unwrap();
    }
    let v = h.t.lookup(10_010, &id(3), &d).unwrap();
    assert_eq!(v.holders().len(), 1);
    // Reported again and silent this time: forgotten once it has missed its
    // next announce (due at 10,000) by half an interval; its chunks are
    // leasable to a live member and its hashes stay.
    h.t.report(10_020, stalled(1)).unwrap();
    let r = h.t.report(10_020, stalled(3)).unwrap();
    assert_eq!(r.suspected, [id(0)]);
    let v = h.t.lookup(12_500, &id(3), &d).unwrap();
    assert_eq!(v.holders().len(), 1, "not before its deadline");
    let v = h.t.lookup(12_501, &id(3), &d).unwrap();
    assert!(v.holders().is_empty());
    assert!(v.hashes()[0].is_some());
    assert!(h.t.is_leasable(&d, 0));
    h.check();
    // A member reported long after its last announce still gets a fifth of
    // an interval to show it is alive.
    h.lease(13_000, 1, d, l, 2, 0);
    h.publish_true(13_001, 1, d, &[0, 1]);
    h.t.report(20_000, unresponsive(2, d, 1)).unwrap();
    let r = h.t.report(20_000, unresponsive(3, d, 1)).unwrap();
    assert_eq!(r.suspected, [id(1)]);
    assert_eq!(h.t.lookup(21_000, &id(3), &d).unwrap().holders().len(), 1);
    assert!(h.t.lookup(21_001, &id(3), &d).unwrap().holders().is_empty());
    h.check();
    // Reports of oneself are refused; of non-members, ignored.
    let me = unresponsive(2, d, 2);
    assert_eq!(h.t.report(21_002, me), Err(TrackerError::SelfReport));
    let ghost = unresponsive(2, d, 9);
    assert_eq!(h.t.report(21_002, ghost).unwrap(), ReportReply::default());
    h.check();
}

#[test]
fn a_downloading_member_that_promised_its_next_announce_is_forgotten_soon_after_missing_it() {
    let (d, l) = (blob(1), layout(4));
    let mut h = Harness::new();
    for n in 0..4 {
        h.announce(0, n, vec![]).unwrap();
    }
    h.lease(0, 0, d, l, 2, 0);
    h.publish_true(1, 0, d, &[0, 1]);
    let promise = |h: &mut Harness, now: u64, n: usize, ms: u32| {
        let addr = format!("10.0.0.{}:4901", n + 1).parse().unwrap();
        let a = Announce::new(id(n), addr, vec![], vec![], false)
            .unwrap()
            .with_next_ms(std::num::NonZeroU32::new(ms));
        h.t.announce(now, a).unwrap();
    };
    // Node 0 downloads and says it announces again within a second.
    promise(&mut h, 1_000, 0, 1_000);
    let stalled = |by: usize| unresponsive(by, d, 0);
    h.t.report(1_500, stalled(1)).unwrap();
    assert_eq!(h.t.report(1_500, stalled(2)).unwrap().suspected, [id(0)]);
    // Due at 2,000, late by a fifth of an interval (more than half a
    // second) at 3,000: forgotten then, its chunks leasable.
    assert_eq!(h.t.lookup(3_000, &id(3), &d).unwrap().holders().len(), 1);
    assert!(h.t.lookup(3_001, &id(3), &d).unwrap().holders().is_empty());
    assert!(h.t.is_leasable(&d, 0));
    h.check();
    // A promise longer than the announce interval counts as the interval.
    h.lease(3_002, 1, d, l, 2, 0);
    h.publish_true(3_003, 1, d, &[0, 1]);
    promise(&mut h, 4_000, 1, 60_000);
    h.t.report(4_500, unresponsive(2, d, 1)).unwrap();
    let r = h.t.report(4_500, unresponsive(3, d, 1)).unwrap();
    assert_eq!(r.suspected, [id(1)]);
    assert_eq!(h.t.lookup(11_500, &id(3), &d).unwrap().holders().len(), 1);
    assert!(h.t.lookup(11_501, &id(3), &d).unwrap().holders().is_empty());
    h.check();
}

#[test]
fn a_blob_leased_out_longer_than_at_the_origin_gets_more_leases() {
    let (d, l) = (blob(1), layout(40));
    let mut h = Harness::with(TrackerConfig {
        max_lease_chunks: 4,
        max_blob_lease_bytes: 2 * u64::from(MIB),
        ..TrackerConfig::default()
    });
    for n in 0..4 {
        h.announce(0, n, vec![]).unwrap();
    }
    assert_eq!(h.lease(0, 0, d, l, 4, 0).chunks, [0, 1]);
    assert!(h.lease(0, 1, d, l, 4, 0).chunks.is_empty());
    // A renewal keeps the grant's time: the leases live 400 ms.
    assert_eq!(h.lease(300, 0, d, l, 4, 0).chunks, [0, 1]);
    // Publishes without a fetch time (older members) teach nothing.
    assert_eq!(h.publish_true(400, 0, d, &[0]).accepted, 1);
    assert_eq!(h.lease(400, 1, d, l, 4, 0).chunks, [2]);
    // 300 ms of its 400 at the origin, counted as 50 (a long fetch is the
    // lessee's as much as the origin's), 100 ms out but not at the origin:
    // six leases keep two chunks there.
    let p = PublishHashes::new(id(0), d, vec![(1, truth(&d, 1))])
        .unwrap()
        .with_fetch_ms(Some(300));
    assert_eq!(h.t.publish_hashes(400, p).unwrap().accepted, 1);
    assert_eq!(h.lease(400, 2, d, l, 4, 0).chunks, [3, 4, 5, 6]);
    assert_eq!(h.lease(400, 3, d, l, 4, 0).chunks, [7]);
    assert!(h.lease(400, 0, d, l, 4, 0).chunks.is_empty());
    // Leases that lived about as long as their fetch (100 ms; a fetch said
    // to be longer counts as the life) shrink it back, an eighth a publish.
    for (k, i) in (3..7).enumerate() {
        let p = PublishHashes::new(id(2), d, vec![(i, truth(&d, i))])
            .unwrap()
            .with_fetch_ms(Some(1_000));
        assert_eq!(h.t.publish_hashes(500 + k as u64, p).unwrap().accepted, 1);
    }
    // Smoothed life 277 ms, 218 of them at the origin: 59 ms out on top of
    // 50, four leases; nodes 1 and 3 hold two.
    assert_eq!(h.lease(600, 0, d, l, 4, 0).chunks, [8, 9]);
    assert!(h.lease(600, 2, d, l, 4, 0).chunks.is_empty());

    // Before any publish, the lessees' round trip to the tracker counts:
    // 150 ms on top of an assumed 50 at the origin, four times the cap.
    let d2 = blob(2);
    let ask = |h: &mut Harness, n: usize, rtt: Option<u32>| {
        let r = LeaseRequest::new(id(n), d2, l, 4, 0)
            .unwrap()
            .with_rtt_ms(rtt);
        h.t.lease(700, r).unwrap().chunks
    };
    assert_eq!(ask(&mut h, 0, None), [0, 1]);
    assert!(ask(&mut h, 1, None).is_empty());
    assert_eq!(ask(&mut h, 1, Some(150)), [2, 3, 4, 5]);
    assert_eq!(ask(&mut h, 2, Some(150)), [6, 7]);
    h.check();
}

#[test]
fn a_blob_is_leased_a_few_chunks_at_a_time_per_rack() {
    let (d, l) = (blob(1), layout(40));
    let mut h = Harness::with(TrackerConfig {
        max_lease_chunks: 4,
        max_blob_lease_bytes: 6 * u64::from(MIB) + 1,
        ..TrackerConfig::default()
    });
    let announce = |h: &mut Harness, now, n: usize, rack: Option<&str>| {
        let addr = format!("10.0.0.{}:4901", n + 1).parse().unwrap();
        let a = Announce::new(id(n), addr, vec![], vec![], false)
            .unwrap()
            .with_rack(rack.map(|r| r.parse().unwrap()));
        h.t.announce(now, a).unwrap();
    };
    for n in 0..3 {
        announce(&mut h, 0, n, None);
    }
    for n in 3..5 {
        announce(&mut h, 0, n, Some("r1"));
    }
    // Six chunks of this blob at once among the members without a rack.
    assert_eq!(h.lease(0, 0, d, l, 4, 0).chunks, [0, 1, 2, 3]);
    assert_eq!(h.lease(0, 1, d, l, 4, 0).chunks, [4, 5]);
    assert!(h.lease(0, 2, d, l, 4, 0).chunks.is_empty());
    // Rack r1 brings its chunks in through its own uplink: its own six.
    assert_eq!(h.lease(0, 3, d, l, 4, 0).chunks, [6, 7, 8, 9]);
    assert_eq!(h.lease(0, 4, d, l, 4, 0).chunks, [10, 11]);
    assert_eq!(h.lease(0, 4, d, l, 4, 0).chunks, [10, 11], "renewals only");
    // Renewals stay within the member's budget whatever the blob's cap.
    assert_eq!(h.lease(100, 0, d, l, 4, 0).chunks, [0, 1, 2, 3]);
    // Published chunks free their leases: the next member gets room.
    assert_eq!(h.publish_true(200, 0, d, &[0, 1]).accepted, 2);
    assert_eq!(h.lease(200, 2, d, l, 4, 0).chunks, [12, 13]);
    // Expired leases free it too (3 s without a renewal).
    assert_eq!(h.lease(3_500, 2, d, l, 4, 0).chunks, [2, 3, 4, 5]);
    h.check();
}

#[test]
fn holders_in_the_requesters_rack_are_named_first_and_marked_near() {
    let mut h = Harness::new();
    let d = blob(1);
    let l = layout(4);
    let rack = |n: usize| -> Rack { format!("rack-{}", n % 4).parse().unwrap() };
    let announce = |h: &mut Harness, now, n: usize, r: Option<Rack>| {
        let addr = format!("10.0.0.{}:4901", n + 1).parse().unwrap();
        let a = Announce::new(id(n), addr, vec![BlobHave::complete(d, l)], vec![], false)
            .unwrap()
            .with_rack(r);
        h.t.announce(now, a).unwrap();
    };
    // 80 holders over 4 racks: member 0's rack holds 19 others, fewer than
    // the 24 places kept for near holders, so all of them come first.
    for n in 0..80 {
        announce(&mut h, 0, n, Some(rack(n)));
    }
    h.check();
    let v = h.t.lookup(1, &id(0), &d).unwrap();
    let named = v.holders();
    assert_eq!(named.len(), 32);
    let near: Vec<_> = named
        .iter()
        .filter(|x| x.near)
        .map(|x| x.node.clone())
        .collect();
    let want: Vec<NodeId> = (1..80).filter(|n| n % 4 == 0).map(id).collect();
    let mut sorted = near.clone();
    sorted.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(
        sorted, want_sorted,
        "every rack mate holding it, marked near"
    );
    assert!(
        named[..near.len()].iter().all(|x| x.near),
        "near ones first"
    );
    // The rest of the places go to other racks, never marked near.
    assert!(named[near.len()..]
        .iter()
        .all(|x| !x.near && !want.contains(&x.node)));
    // Member 4 moves to rack 1: no longer near 0; the index follows.
    announce(&mut h, 2, 4, Some(rack(1)));
    h.check();
    let v = h.t.lookup(3, &id(0), &d).unwrap();
    assert!(v.holders().iter().all(|x| !(x.near && x.node == id(4))));
    assert_eq!(
        v.holders().iter().filter(|x| x.near).count(),
        want.len() - 1
    );
    // A member that never said its rack has no near holders.
    announce(&mut h, 4, 200, None);
    let v = h.t.lookup(5, &id(200), &d).unwrap();
    assert!(v.holders().iter().all(|x| !x.near));
    // Expiry takes members out of the rack index too.
    h.t.expire(1_000_000);
    h.check();
}
