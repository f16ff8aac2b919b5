//! Discovery without the tracker: members find each other's blobs through
//! their Kademlia DHT (libp2p, `--dht-listen`), fetch over the QUIC data
//! plane, and split origin fetches by rendezvous hashing, so a cold fleet
//! whose tracker is down still costs the origin about one copy.

use std::time::{Duration, Instant};

use shoal_tests::cluster::Cluster;
use shoal_tests::fixture::{pull_all_at_once, Origin};
use shoal_tests::{fresh_seed, http, random_blob, Shoald, ShoaldOpts, MIB};

const PEER_RX: &str = "shoal_peer_bytes_received_total";
const DHT_PEERS: &str = "shoal_dht_peers";
const DHT_ANSWERS: &str = "shoal_dht_answers_total";

/// Waits (at most `within`) until every member is connected to at least
/// `peers` other DHT nodes.
async fn wait_dht_peers(nodes: &[&Shoald], peers: f64, within: Duration) {
    let started = Instant::now();
    loop {
        let mut least = f64::MAX;
        for n in nodes {
            least = least.min(n.metric(DHT_PEERS, &[]).await.unwrap());
        }
        if least >= peers {
            return;
        }
        assert!(
            started.elapsed() < within,
            "after {within:?} a member had only {least} DHT peers (wanted {peers})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// When the tracker dies.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kill {
    /// Before the pull starts.
    Before,
    /// Once the origin has sent a quarter of the image.
    Midway,
}

/// One six-member pull at a time: two at once on the two cores of a test
/// machine starve each other's daemons (their views of who fetches what
/// age by the wall clock), which is not what these tests measure — once in
/// five runs that way the origin sent 1.16 copies instead of 1.001.
static ONE_PULL_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Six members (with a DHT if `dht`) pull a cold three-layer image all at
/// once; the tracker is killed at `kill`. Returns (origin bytes, peer bytes)
/// as multiples of the image.
async fn cold_pull_with_the_tracker_down(dht: bool, kill: Kill) -> (f64, f64) {
    const MEMBERS: usize = 6;
    let _alone = ONE_PULL_AT_A_TIME.lock().await;
    let origin = Origin::start().await.unwrap();
    let sizes = [8 * MIB, 8 * MIB, 8 * MIB];
    let blobs = origin
        .push_random_layers("swarm/dht", &sizes)
        .await
        .unwrap();
    let image_bytes: u64 = sizes.iter().map(|&s| s as u64).sum();
    // 8 MiB/s: one copy takes 3 s, so members overlap.
    origin.proxy.set_rate(Some(8 * MIB as u64));
    let mut cluster = Cluster::start().await.unwrap();
    let mut nodes = Vec::new();
    for n in 1..=MEMBERS {
        let opts = ShoaldOpts::insecure_default(&origin.addr());
        let name = format!("node-{n}");
        let node = if dht {
            cluster.dht_member(&name, opts).await.unwrap().0
        } else {
            cluster.member(&name, opts).await.unwrap()
        };
        nodes.push(node);
    }
    if dht {
        // Members learn each other's DHT addresses from the tracker's
        // announce replies (heartbeat every 5 s), then connect.
        let all: Vec<&Shoald> = nodes.iter().collect();
        wait_dht_peers(&all, (MEMBERS - 1) as f64, Duration::from_secs(30)).await;
        // Node records are published on the next DHT tick.
        tokio::time::sleep(Duration::from_secs(6)).await;
    } else {
        tokio::time::sleep(Duration::from_secs(6)).await;
    }
    if kill == Kill::Before {
        cluster.stop_tracker();
    }

    let before = origin.egress();
    let started = Instant::now();
    let pulls = pull_all_at_once(&nodes, "swarm/dht", &blobs);
    if kill == Kill::Midway {
        while origin.egress() - before < image_bytes / 4 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the pull never started"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cluster.stop_tracker();
    }
    for p in pulls {
        p.await.unwrap().unwrap();
    }
    let took = started.elapsed();
    let egress = (origin.egress() - before) as f64;
    let (mut peer_total, mut answers) = (0.0, 0.0);
    let mut per_node = Vec::new();
    for n in &nodes {
        per_node.push(n.origin_blob_bytes().await.unwrap() / image_bytes as f64);
        peer_total += n.metric(PEER_RX, &[]).await.unwrap();
        answers += n.metric(DHT_ANSWERS, &[("call", "lookup")]).await.unwrap();
    }
    let f = image_bytes as f64;
    eprintln!(
        "injected: tracker killed {kill:?} (a cold pull {MEMBERS} members, DHT {dht}); counted: all \
         complete in {took:.1?}, origin sent {egress} bytes ({:.3}x the image), peers {peer_total} \
         ({:.2}x), {answers} lookups answered from the DHT; origin bytes per member (x the image): {per_node:.2?}",
        egress / f,
        peer_total / f
    );
    if dht {
        assert!(answers > 0.0, "no lookup was answered from the DHT");
    }
    (egress / f, peer_total / f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_tracker_down_before_a_cold_pull_members_find_each_other_through_the_dht_and_the_origin_sends_about_one_copy(
) {
    let (egress, peers) = cold_pull_with_the_tracker_down(true, Kill::Before).await;
    assert!(
        egress <= 1.1,
        "the origin sent {egress:.3}x the image with the tracker down"
    );
    assert!(
        peers >= 0.7 * 5.0,
        "members got only {peers:.2}x the image from each other"
    );
}

/// The tracker dies mid-pull: members holding its leases and hashes switch
/// to the DHT and rendezvous split, and the origin still sends about one
/// copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_dht_the_tracker_dying_mid_pull_still_costs_the_origin_about_one_copy() {
    let (egress, peers) = cold_pull_with_the_tracker_down(true, Kill::Midway).await;
    assert!(
        egress <= 1.1,
        "the origin sent {egress:.3}x the image after the tracker died"
    );
    assert!(
        peers >= 0.7 * 5.0,
        "members got only {peers:.2}x the image from each other"
    );
}

/// The same pull without a DHT (the baseline in `docs/BENCHMARKS.md`):
/// with no tracker each member fetches alone, so the origin sends several
/// copies — what the DHT tests above save.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_without_a_dht_the_tracker_down_costs_the_origin_a_copy_per_member() {
    let (egress, _) = cold_pull_with_the_tracker_down(false, Kill::Before).await;
    assert!(egress >= 3.0, "the origin sent only {egress:.3}x the image");
}

/// No tracker ever answers: a member bootstraps its DHT from a named peer
/// (`--dht-bootstrap`, as from a headless Service), finds the blob another
/// member holds through its provider record, and fetches it all from that
/// member. A node of another cluster pointed at the same DHT cannot even
/// connect (the private-network key comes from the cluster CA).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_any_tracker_a_member_bootstraps_from_a_named_peer_and_outsiders_stay_out() {
    let origin = Origin::start().await.unwrap();
    let mut cluster = Cluster::start().await.unwrap();
    cluster.stop_tracker();
    let opts = || ShoaldOpts::insecure_default(&origin.addr());
    let (a, a_dht) = cluster.dht_member("node-a", opts()).await.unwrap();
    let mut b_opts = opts();
    b_opts.extra_args.extend([
        "--dht-bootstrap".into(),
        format!("localhost:{}", a_dht.port()),
    ]);
    let (b, _) = cluster.dht_member("node-b", b_opts).await.unwrap();
    let mut o_opts = opts();
    o_opts
        .extra_args
        .extend(["--dht-bootstrap".into(), a_dht.to_string()]);
    let outsider = cluster.dht_outsider("node-x", o_opts).await.unwrap();
    wait_dht_peers(&[&b], 1.0, Duration::from_secs(20)).await;

    let size = 6 * MIB as u64;
    let (blob, digest) = random_blob(size as usize, fresh_seed());
    origin
        .registry
        .push_blob("swarm/boot", &blob)
        .await
        .unwrap();
    let path = format!("/v2/swarm/boot/blobs/{digest}");
    let get = |n: &Shoald| {
        let url = format!("{}{path}", n.registry_url());
        let digest = digest.clone();
        async move {
            http::get_hashed(&http::client(), &url, &[])
                .await
                .unwrap()
                .expect_complete(&digest, size)
                .unwrap()
        }
    };
    get(&a).await;
    a.wait_idle().await.unwrap();
    // A's provider record and node record reach B within a DHT tick.
    tokio::time::sleep(Duration::from_secs(6)).await;
    get(&b).await;
    let b_origin = b.origin_blob_bytes().await.unwrap();
    let b_peers = b.metric(PEER_RX, &[]).await.unwrap();
    get(&outsider).await;
    let x_dht = outsider.metric(DHT_PEERS, &[]).await.unwrap();
    let x_peers = outsider.metric(PEER_RX, &[]).await.unwrap();
    let a_dht_peers = a.metric(DHT_PEERS, &[]).await.unwrap();
    eprintln!(
        "injected: no tracker; B bootstraps from A by name, an outsider from A's address; \
         counted: B origin {b_origin} bytes, B from peers {b_peers}; outsider DHT peers \
         {x_dht}, from peers {x_peers}; A's DHT peers {a_dht_peers}"
    );
    assert_eq!(b_origin, 0.0, "B fetched from the origin");
    assert!(b_peers >= size as f64, "B got only {b_peers} bytes from A");
    assert_eq!(x_dht, 0.0, "the outsider joined the DHT");
    assert_eq!(x_peers, 0.0, "the outsider got bytes from members");
    assert_eq!(a_dht_peers, 1.0, "A is connected to more than B");
}
