//! What the tracker core costs a request, by kind, with N members (no
//! HTTPS, no lock: the core's own work, on one core):
//! `cargo run --release -p shoal-tracker --example core_bench -- 10000`.
//! Every member holds a fifth of each of five 200-chunk blobs and a
//! quarter of the first 50 chunks' hashes are published, as early in a
//! cold pull.

use std::time::Instant;

use shoal_proto::tracker_api::{
    Announce, BlobHave, ChunkHash, LeaseRequest, NodeId, PublishHashes,
};
use shoal_proto::{Bitfield, ChunkLayout, Digest};
use shoal_tracker::{Tracker, TrackerConfig};

const REPS: usize = 20_000;

fn main() {
    let n: usize = match std::env::args().nth(1).map(|s| s.parse()) {
        None => 10_000,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("usage: core_bench [MEMBERS]");
            std::process::exit(2);
        }
    };
    let layout = ChunkLayout::new(200 << 20, 1 << 20).expect("a valid layout");
    let blobs: Vec<Digest> = (0..5u8).map(|i| Digest::of(&[b'b', i])).collect();
    let id = |i: usize| -> NodeId { format!("n{i}").parse().expect("a valid name") };
    let have = |i: usize, upto: u32| {
        let mut b = Bitfield::for_layout(&layout);
        for c in (0..upto).filter(|c| (*c as usize + i) % 5 == 0) {
            b.set(c).expect("in range");
        }
        b
    };
    let announce = |i: usize, blobs_listed: usize, upto: u32| {
        let addr = format!("10.{}.{}.{}:4901", i / 65536, (i / 256) % 256, i % 256);
        let listed = blobs[..blobs_listed]
            .iter()
            .map(|d| BlobHave::new(*d, layout, have(i, upto), false).expect("valid"))
            .collect();
        Announce::new(id(i), addr.parse().expect("valid"), listed, vec![], false)
            .expect("a valid announce")
    };
    let mut t = Tracker::new(TrackerConfig::default()).expect("the default config");
    for i in 0..n {
        t.announce(0, announce(i, 5, 20)).expect("joins");
    }
    for d in &blobs {
        for c in (0..50u32).step_by(4) {
            let who = c as usize % n;
            let req = LeaseRequest::new(id(who), *d, layout, 1, c).expect("valid");
            let Ok(grant) = t.lease(1, req) else { continue };
            let hashes = grant
                .chunks
                .iter()
                .map(|&c| (c, ChunkHash::of(&c.to_le_bytes())))
                .collect();
            let p = PublishHashes::new(id(who), *d, hashes).expect("valid");
            let _ = t.publish_hashes(2, p);
        }
    }
    let now = 100;
    let per = |start: Instant| start.elapsed().as_secs_f64() / REPS as f64 * 1e6;
    let one: Vec<Announce> = (0..REPS).map(|r| announce(r % n, 1, 40)).collect();
    let s = Instant::now();
    for a in one {
        t.announce(now, a).expect("accepted");
    }
    let announce_1 = per(s);
    let five: Vec<Announce> = (0..REPS).map(|r| announce(r % n, 5, 40)).collect();
    let s = Instant::now();
    for a in five {
        t.announce(now, a).expect("accepted");
    }
    let announce_5 = per(s);
    let s = Instant::now();
    for r in 0..REPS {
        let v = t.lookup_current(now, &id(r % n), &blobs[r % 5], None);
        assert!(v.is_ok());
    }
    let lookup = per(s);
    let leases: Vec<LeaseRequest> = (0..REPS)
        .map(|r| LeaseRequest::new(id(r % n), blobs[r % 5], layout, 4, (r % 200) as u32))
        .collect::<Result<_, _>>()
        .expect("valid");
    let s = Instant::now();
    for q in leases {
        let _ = t.lease(now, q);
    }
    let lease = per(s);
    println!(
        "{{\"members\":{n},\"announce_1_blob_us\":{announce_1:.2},\"announce_5_blobs_us\":{announce_5:.2},\"lookup_us\":{lookup:.2},\"lease_us\":{lease:.2}}}"
    );
}
