//! Several members pull through the swarm: the origin serves about one copy.

use std::time::Duration;

use shoal_tests::cluster::Cluster;
use shoal_tests::fixture::{pull_all_at_once, Origin};
use shoal_tests::{fresh_seed, http, random_blob, ShoaldOpts, MIB};

const PEER_RX: &str = "shoal_peer_bytes_received_total";

/// GETs `path` (`/v2/…/blobs/<digest>`) through `member` and checks that
/// the bytes are the blob's.
async fn pull(member: &shoal_tests::Shoald, path: &str, digest: &str, size: u64) {
    http::get_hashed(
        &http::client(),
        &format!("{}{path}", member.registry_url()),
        &[],
    )
    .await
    .unwrap()
    .expect_complete(digest, size)
    .unwrap_or_else(|e| panic!("{}: {e:#}", member.registry_url()));
}

/// Node A pulls a blob from the origin; node B then gets it entirely from A:
/// the origin sends B nothing, and the bytes are right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_member_gets_a_blob_from_the_first_not_the_origin() {
    let origin = Origin::start().await.unwrap();
    let cluster = Cluster::start().await.unwrap();
    let opts = || ShoaldOpts::insecure_default(&origin.addr());
    let a = cluster.member("node-a", opts()).await.unwrap();
    let b = cluster.member("node-b", opts()).await.unwrap();
    let size = 12 * MIB as u64;
    let (blob, digest) = random_blob(size as usize, fresh_seed());
    origin.registry.push_blob("swarm/app", &blob).await.unwrap();
    let path = format!("/v2/swarm/app/blobs/{digest}");

    pull(&a, &path, &digest, size).await;
    a.wait_idle().await.unwrap();
    assert!(a.origin_blob_bytes().await.unwrap() >= size as f64);

    pull(&b, &path, &digest, size).await;
    assert_eq!(
        b.origin_blob_bytes().await.unwrap(),
        0.0,
        "B fetched blob bytes from the origin"
    );
    let from_peers = b.metric(PEER_RX, &[]).await.unwrap();
    assert!(
        from_peers >= size as f64,
        "B received {from_peers} bytes from peers"
    );
}

/// The tracker's count of live members.
async fn tracker_members(cluster: &Cluster) -> f64 {
    let r = http::get(&format!("{}/metrics", cluster.tracker_ops_url()), &[])
        .await
        .unwrap();
    let samples = shoal_tests::metrics::parse(&String::from_utf8_lossy(&r.body)).unwrap();
    shoal_tests::metrics::value(&samples, "shoal_tracker_members", &[])
}

/// A member stopped with SIGTERM tells the tracker it leaves: the tracker
/// forgets it at once (not after its membership runs out, 30 s), and the
/// next member pulls the blob it held from the origin without asking it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_stopped_with_sigterm_leaves_the_swarm_at_once() {
    let origin = Origin::start().await.unwrap();
    let cluster = Cluster::start().await.unwrap();
    let opts = || ShoaldOpts::insecure_default(&origin.addr());
    let mut a = cluster.member("node-a", opts()).await.unwrap();
    let size = 4 * MIB as u64;
    let (blob, digest) = random_blob(size as usize, fresh_seed());
    origin.registry.push_blob("swarm/app", &blob).await.unwrap();
    let path = format!("/v2/swarm/app/blobs/{digest}");
    pull(&a, &path, &digest, size).await;
    a.wait_idle().await.unwrap();
    assert_eq!(tracker_members(&cluster).await, 1.0);

    let stopped = std::time::Instant::now();
    let status = a.terminate(Duration::from_secs(15)).await.unwrap();
    assert!(status.success(), "shoald exited with {status}");
    assert!(
        a.logs().contains("left the swarm"),
        "no leave in the log: {}",
        a.logs()
    );
    assert_eq!(
        tracker_members(&cluster).await,
        0.0,
        "still a member {:?} after SIGTERM",
        stopped.elapsed()
    );
    let b = cluster.member("node-b", opts()).await.unwrap();
    pull(&b, &path, &digest, size).await;
    assert!(b.origin_blob_bytes().await.unwrap() >= size as f64);
}

/// Eight members pull every blob of the same cold multi-layer image (pushed
/// with skopeo), all at the same instant: every member gets the right bytes,
/// the origin sends about one copy of the image, and the members send each
/// other most of the bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_members_pulling_a_cold_image_at_once_cost_the_origin_about_one_copy() {
    use shoal_tests::{skopeo, TestImage};

    const MEMBERS: usize = 8;
    let origin = Origin::start().await.unwrap();
    let image = TestImage::generate_single(&[8 * MIB, 8 * MIB, 8 * MIB], fresh_seed()).unwrap();
    skopeo::push_image(&image, &origin.registry, "swarm/cold")
        .await
        .unwrap();
    let cluster = Cluster::start().await.unwrap();
    let mut nodes = Vec::new();
    for n in 1..=MEMBERS {
        nodes.push(
            cluster
                .member(
                    &format!("node-{n}"),
                    ShoaldOpts::insecure_default(&origin.addr()),
                )
                .await
                .unwrap(),
        );
    }
    // Config and layers, with their sizes, as the manifest names them.
    let platform = image.platform("amd64");
    let mut blobs = vec![(platform.config_digest.clone(), platform.config_size)];
    blobs.extend(platform.layers.iter().map(|l| (l.digest.clone(), l.size)));
    let image_bytes: u64 = blobs.iter().map(|(_, s)| s).sum();
    let before = origin.egress();

    // Every member asks for every blob of the image at once.
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(MEMBERS * blobs.len()));
    let mut pulls = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for (digest, size) in &blobs {
            let url = format!("{}/v2/swarm/cold/blobs/{digest}", n.registry_url());
            let (digest, size, start) = (digest.clone(), *size, start.clone());
            pulls.push(tokio::spawn(async move {
                start.wait().await;
                let r = http::get_hashed(&http::client(), &url, &[]).await?;
                r.expect_complete(&digest, size)
                    .map_err(|e| e.context(format!("node-{}: {digest}", i + 1)))
            }));
        }
    }
    for p in pulls {
        p.await.unwrap().unwrap();
    }
    let egress = (origin.egress() - before) as f64;
    let mut origin_total = 0.0;
    let mut peer_total = 0.0;
    let mut watch_frames = 0.0;
    for n in &nodes {
        origin_total += n.origin_blob_bytes().await.unwrap();
        peer_total += n.metric(PEER_RX, &[]).await.unwrap();
        watch_frames += n
            .metric("shoal_peer_watch_frames_total", &[])
            .await
            .unwrap();
    }
    let f = image_bytes as f64;
    eprintln!(
        "{MEMBERS} members, image {image_bytes} bytes: the origin sent {egress} bytes ({:.3}x; \
         {origin_total} blob bytes by the members' metric), peers {peer_total} ({:.2}x), \
         {watch_frames} watch frames",
        egress / f,
        peer_total / f
    );
    // Members watched each other: chunks became known peer to peer.
    assert!(watch_frames > 0.0, "no member heard from a watched peer");
    assert!(
        egress <= 1.10 * f,
        "the origin sent {egress} bytes for a {image_bytes}-byte image"
    );
    // Every member received the image once; all but about one copy came from peers.
    assert!(
        peer_total >= 0.9 * (MEMBERS as f64 - 1.0) * f,
        "members got only {peer_total} bytes from each other"
    );
}

/// containerd on node B pulls an image that node A already pulled: every
/// layer comes from A over QUIC, the origin serves B no blob bytes, and the
/// unpacked files are the image's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_on_a_second_node_pulls_layers_from_the_first() {
    use shoal_tests::containerd::{dead_server_url, HostsDir};
    use shoal_tests::{skopeo, Containerd, TestImage};

    let origin = Origin::start().await.unwrap();
    let image = TestImage::generate(&[3 * MIB, MIB], fresh_seed()).unwrap();
    skopeo::push_image(&image, &origin.registry, "team/app")
        .await
        .unwrap();
    let cluster = Cluster::start().await.unwrap();
    let opts = || ShoaldOpts::insecure_default(&origin.addr());
    let a = cluster.member("node-a", opts()).await.unwrap();
    let b = cluster.member("node-b", opts()).await.unwrap();
    let image_ref = format!("{}/team/app:{}", origin.addr(), image.tag);
    let layer_bytes: u64 = image.all_layers().iter().map(|l| l.size).sum();

    let dead = dead_server_url().unwrap();
    let hosts_a = HostsDir::mirror(&origin.addr(), &a.registry_addr(), &dead).unwrap();
    Containerd::start()
        .await
        .unwrap()
        .pull(&image_ref, hosts_a.path(), true)
        .await
        .unwrap();
    a.wait_idle().await.unwrap();

    let hosts_b = HostsDir::mirror(&origin.addr(), &b.registry_addr(), &dead).unwrap();
    let on_b = Containerd::start().await.unwrap();
    on_b.pull(&image_ref, hosts_b.path(), true).await.unwrap();
    assert_eq!(on_b.unpacked_files().unwrap(), image.expected_files(None));
    assert_eq!(
        b.origin_blob_bytes().await.unwrap(),
        0.0,
        "B fetched blob bytes from the origin"
    );
    let from_peers = b.metric(PEER_RX, &[]).await.unwrap();
    assert!(
        from_peers >= layer_bytes as f64,
        "B got {from_peers} bytes from peers for {layer_bytes} layer bytes"
    );
}

/// A member whose stored blob was corrupted on disk serves bad chunks: the
/// puller rejects them (`shoal_chunks_rejected_total{source="peer"}`), stops
/// asking that member, and still ends with the right bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_from_a_member_with_corrupted_storage_are_rejected_and_the_pull_completes() {
    let origin = Origin::start().await.unwrap();
    let cluster = Cluster::start().await.unwrap();
    let opts = || ShoaldOpts::insecure_default(&origin.addr());
    let a = cluster.member("node-a", opts()).await.unwrap();
    let b = cluster.member("node-b", opts()).await.unwrap();
    let size = 6 * MIB as u64;
    let (blob, digest) = random_blob(size as usize, fresh_seed());
    origin.registry.push_blob("swarm/bad", &blob).await.unwrap();
    let path = format!("/v2/swarm/bad/blobs/{digest}");
    pull(&a, &path, &digest, size).await;
    a.wait_idle().await.unwrap();

    // Flip bytes in every chunk of A's stored copy (same length).
    let hex = digest.trim_start_matches("sha256:");
    let file = a.data_dir().join("blobs/sha256").join(&hex[..2]).join(hex);
    let mut data = std::fs::read(&file).unwrap();
    for i in (0..data.len()).step_by(MIB / 2) {
        data[i] ^= 0xff;
    }
    std::fs::write(&file, &data).unwrap();

    pull(&b, &path, &digest, size).await;
    let rejected = b
        .metric("shoal_chunks_rejected_total", &[("source", "peer")])
        .await
        .unwrap();
    assert!(
        rejected >= 1.0,
        "B rejected no chunk from the corrupted member"
    );
}

/// With the tracker gone, members still pull (from the origin), never hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_tracker_down_pulls_complete_from_the_origin() {
    let origin = Origin::start().await.unwrap();
    let mut cluster = Cluster::start().await.unwrap();
    let a = cluster
        .member("node-a", ShoaldOpts::insecure_default(&origin.addr()))
        .await
        .unwrap();
    cluster.stop_tracker();
    let size = 4 * MIB as u64;
    let (blob, digest) = random_blob(size as usize, fresh_seed());
    origin
        .registry
        .push_blob("swarm/down", &blob)
        .await
        .unwrap();
    let url = format!("{}/v2/swarm/down/blobs/{digest}", a.registry_url());
    let r = http::get_hashed(&http::client(), &url, &[]).await.unwrap();
    r.expect_complete(&digest, size).unwrap();
    assert!(a.origin_blob_bytes().await.unwrap() >= size as f64);
    assert!(
        a.logs().contains("tracker unreachable"),
        "no warning that the tracker is down:\n{}",
        a.logs()
    );
    // Logs written to a file are plain text, without colour codes.
    assert!(!a.logs().contains('\u{1b}'), "{}", a.logs());
}

/// The only member holding a blob is frozen (`SIGSTOP`) or killed
/// (`kill -9`): a puller's requests to it stall, move away within the stall
/// bound, and the pull completes from the origin with the right bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_or_killed_holder_does_not_stall_a_pull() {
    let origin = Origin::start().await.unwrap();
    let cluster = Cluster::start().await.unwrap();
    let opts = || ShoaldOpts::insecure_default(&origin.addr());
    let mut a = cluster.member("node-a", opts()).await.unwrap();
    let b = cluster.member("node-b", opts()).await.unwrap();
    let c = cluster.member("node-c", opts()).await.unwrap();
    let size = 4 * MIB as u64;
    let mut digests = Vec::new();
    for _ in 0..2 {
        let (blob, digest) = random_blob(size as usize, fresh_seed());
        origin
            .registry
            .push_blob("swarm/stuck", &blob)
            .await
            .unwrap();
        let url = format!("{}/v2/swarm/stuck/blobs/{digest}", a.registry_url());
        http::get_hashed(&http::client(), &url, &[])
            .await
            .unwrap()
            .expect_complete(&digest, size)
            .unwrap();
        digests.push(digest);
    }
    a.wait_idle().await.unwrap();

    a.signal("STOP").unwrap();
    let t = std::time::Instant::now();
    let url = format!("{}/v2/swarm/stuck/blobs/{}", b.registry_url(), digests[0]);
    let r = http::get_hashed(&http::client(), &url, &[]).await.unwrap();
    r.expect_complete(&digests[0], size).unwrap();
    let frozen = t.elapsed();

    a.kill9();
    let t = std::time::Instant::now();
    let url = format!("{}/v2/swarm/stuck/blobs/{}", c.registry_url(), digests[1]);
    let r = http::get_hashed(&http::client(), &url, &[]).await.unwrap();
    r.expect_complete(&digests[1], size).unwrap();
    let killed = t.elapsed();
    eprintln!("frozen holder: {frozen:?}; killed holder: {killed:?}");
    assert!(
        frozen.as_secs() < 40 && killed.as_secs() < 40,
        "{frozen:?} / {killed:?}"
    );
}

/// The tracker goes down, then comes back (empty): pulls in between come
/// from the origin, and once it is back the swarm works again — a second
/// member gets a new blob from the first, not from the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_tracker_outage_the_swarm_resumes() {
    let origin = Origin::start().await.unwrap();
    let mut cluster = Cluster::start().await.unwrap();
    let opts = || ShoaldOpts::insecure_default(&origin.addr());
    let a = cluster.member("node-a", opts()).await.unwrap();
    let b = cluster.member("node-b", opts()).await.unwrap();
    let size = 4 * MIB as u64;
    cluster.stop_tracker();
    let (blob, digest) = random_blob(size as usize, fresh_seed());
    origin
        .registry
        .push_blob("swarm/flap", &blob)
        .await
        .unwrap();
    let url = format!("{}/v2/swarm/flap/blobs/{digest}", a.registry_url());
    let r = http::get_hashed(&http::client(), &url, &[]).await.unwrap();
    r.expect_complete(&digest, size).unwrap();

    cluster.restart_tracker().await.unwrap();
    // Members re-register with their heartbeat (every 5 s).
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    let (blob, digest) = random_blob(size as usize, fresh_seed());
    origin
        .registry
        .push_blob("swarm/flap", &blob)
        .await
        .unwrap();
    let path = format!("/v2/swarm/flap/blobs/{digest}");
    for m in [&a, &b] {
        pull(m, &path, &digest, size).await;
        m.wait_idle().await.unwrap();
    }
    assert_eq!(
        b.origin_blob_bytes().await.unwrap(),
        0.0,
        "after the outage B went to the origin"
    );
}

/// A member that held a blob restarts: it announces what its store holds,
/// and a member that asks afterwards gets the blob from it, not the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_serves_what_its_store_holds() {
    let origin = Origin::start().await.unwrap();
    let cluster = Cluster::start().await.unwrap();
    let opts = || ShoaldOpts::insecure_default(&origin.addr());
    let mut a = cluster.member("node-a", opts()).await.unwrap();
    let size = 6 * MIB as u64;
    let (blob, digest) = random_blob(size as usize, fresh_seed());
    origin
        .registry
        .push_blob("swarm/kept", &blob)
        .await
        .unwrap();
    let path = format!("/v2/swarm/kept/blobs/{digest}");
    pull(&a, &path, &digest, size).await;
    a.wait_idle().await.unwrap();
    a.kill9();
    a.restart().await.unwrap();
    // The first heartbeat lists the store's blobs.
    let logs = || a.logs();
    shoal_tests::util::wait_for(
        "node-a to announce the blobs it holds",
        std::time::Duration::from_secs(20),
        std::time::Duration::from_millis(100),
        || {
            let found = logs().contains("announced the blobs held here");
            async move { Ok(found.then_some(())) }
        },
    )
    .await
    .unwrap();

    let b = cluster.member("node-b", opts()).await.unwrap();
    pull(&b, &path, &digest, size).await;
    assert_eq!(
        b.origin_blob_bytes().await.unwrap(),
        0.0,
        "B went to the origin for a blob the restarted A holds"
    );
    assert!(b.metric(PEER_RX, &[]).await.unwrap() >= size as f64);
}

/// A daemon with a certificate of another CA, pointed at the cluster's
/// tracker: the tracker refuses it (its pulls fall back to the origin, with
/// a warning), and no member sends it a byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_of_another_ca_gets_nothing_from_the_swarm() {
    let origin = Origin::start().await.unwrap();
    let cluster = Cluster::start().await.unwrap();
    let opts = || ShoaldOpts::insecure_default(&origin.addr());
    let a = cluster.member("node-a", opts()).await.unwrap();
    let outsider = cluster.outsider("node-x", opts()).await.unwrap();
    let size = 4 * MIB as u64;
    let (blob, digest) = random_blob(size as usize, fresh_seed());
    origin
        .registry
        .push_blob("swarm/closed", &blob)
        .await
        .unwrap();
    let path = format!("/v2/swarm/closed/blobs/{digest}");
    for m in [&a, &outsider] {
        pull(m, &path, &digest, size).await;
    }
    assert!(outsider.origin_blob_bytes().await.unwrap() >= size as f64);
    assert_eq!(outsider.metric(PEER_RX, &[]).await.unwrap(), 0.0);
    assert_eq!(
        a.metric("shoal_peer_bytes_sent_total", &[]).await.unwrap(),
        0.0
    );
    let logs = outsider.logs();
    assert!(
        logs.contains("tracker unreachable"),
        "the outsider did not say the tracker refused it:\n{logs}"
    );
}

/// Four members pull a cold blob together; mid-transfer one is killed
/// (`kill -9`) and another frozen (`SIGSTOP`): the other two still end with
/// the right bytes, their requests to the lost members moving elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_killed_and_frozen_mid_transfer_do_not_stop_the_others() {
    let origin = Origin::start().await.unwrap();
    // A paced origin keeps the transfer going long enough to break it.
    origin.proxy.set_rate(Some(8 * MIB as u64));
    let cluster = Cluster::start().await.unwrap();
    let opts = || ShoaldOpts::insecure_default(&origin.addr());
    let mut nodes = Vec::new();
    for n in ["node-1", "node-2", "node-3", "node-4"] {
        nodes.push(cluster.member(n, opts()).await.unwrap());
    }
    let size = 24 * MIB as u64;
    let (blob, digest) = random_blob(size as usize, fresh_seed());
    origin
        .registry
        .push_blob("swarm/chaos", &blob)
        .await
        .unwrap();
    drop(blob);
    let path = format!("/v2/swarm/chaos/blobs/{digest}");
    let pulls: Vec<_> = nodes
        .iter()
        .map(|n| {
            let url = format!("{}{path}", n.registry_url());
            tokio::spawn(async move { http::get_hashed(&http::client(), &url, &[]).await })
        })
        .collect();
    // Once the swarm is moving (peers sending each other chunks), break it.
    let t = std::time::Instant::now();
    loop {
        let mut moved = 0.0;
        for n in &nodes {
            moved += n.metric(PEER_RX, &[]).await.unwrap_or(0.0);
        }
        if moved >= 2.0 * MIB as f64 {
            break;
        }
        assert!(t.elapsed().as_secs() < 60, "the swarm never started moving");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    nodes[0].kill9();
    nodes[1].signal("STOP").unwrap();
    let broke = std::time::Instant::now();
    let mut pulls = pulls.into_iter();
    let (_killed, frozen) = (pulls.next().unwrap(), pulls.next().unwrap());
    for (i, p) in pulls.enumerate() {
        let r = tokio::time::timeout(std::time::Duration::from_secs(120), p)
            .await
            .unwrap_or_else(|_| panic!("node-{} hung", i + 3))
            .unwrap()
            .unwrap();
        r.expect_complete(&digest, size)
            .unwrap_or_else(|e| panic!("node-{}: {e:#}", i + 3));
    }
    eprintln!(
        "the two survivors finished {:?} after the kill and the freeze",
        broke.elapsed()
    );
    nodes[1].signal("CONT").unwrap();
    frozen.abort();
}

/// With the origin unreachable, a member that has the origin's earlier word
/// that the repository holds a blob (here from a HEAD) gets the blob from a
/// peer; a member without that word gets a clear 503: peers never stand in
/// for the origin's authority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_origin_down_a_confirmed_blob_comes_from_peers() {
    let origin = Origin::start().await.unwrap();
    let cluster = Cluster::start().await.unwrap();
    let opts = || ShoaldOpts::insecure_default(&origin.addr());
    let a = cluster.member("node-a", opts()).await.unwrap();
    let b = cluster.member("node-b", opts()).await.unwrap();
    let c = cluster.member("node-c", opts()).await.unwrap();
    let size = 6 * MIB as u64;
    let (blob, digest) = random_blob(size as usize, fresh_seed());
    origin
        .registry
        .push_blob("swarm/offline", &blob)
        .await
        .unwrap();
    let path = format!("/v2/swarm/offline/blobs/{digest}");
    pull(&a, &path, &digest, size).await;
    a.wait_idle().await.unwrap();
    let r = http::head(&format!("{}{path}", b.registry_url()), &[])
        .await
        .unwrap();
    assert_eq!(r.status.as_u16(), 200);
    drop(origin);

    pull(&b, &path, &digest, size).await;
    assert_eq!(b.origin_blob_bytes().await.unwrap(), 0.0);
    assert!(b.metric(PEER_RX, &[]).await.unwrap() >= size as f64);
    assert!(b
        .logs()
        .contains("origin unreachable; fetching from peers on an earlier confirmation"));

    let t = std::time::Instant::now();
    let r = http::get(&format!("{}{path}", c.registry_url()), &[])
        .await
        .unwrap();
    r.expect_oci_error(503, "UNAVAILABLE").unwrap();
    assert!(t.elapsed().as_secs() < 30, "{:?}", t.elapsed());
    assert_eq!(c.metric(PEER_RX, &[]).await.unwrap(), 0.0);
}

/// Two tracker replicas share their state through Redis; six members pull a
/// cold image, half of them talking to each replica, and the replica most
/// of the members use is killed (`kill -9`) mid-pull. The members fail over
/// to the other replica, which knows their leases, hashes and holdings: every
/// pull completes with the right bytes and the origin still sends about one
/// copy of the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tracker_replicas_killing_one_mid_pull_still_costs_the_origin_one_copy() {
    const MEMBERS: usize = 6;
    let origin = Origin::start().await.unwrap();
    let sizes = [8 * MIB, 8 * MIB, 8 * MIB];
    let blobs = origin.push_random_layers("swarm/ha", &sizes).await.unwrap();
    let image_bytes: u64 = sizes.iter().map(|&s| s as u64).sum();
    // A slow origin (8 MiB/s): the pull lasts seconds, so the kill lands
    // mid-pull.
    origin.proxy.set_rate(Some(8 * MIB as u64));
    let mut cluster = Cluster::start_replicated(2).await.unwrap();
    let mut nodes = Vec::new();
    for n in 1..=MEMBERS {
        let opts = ShoaldOpts::insecure_default(&origin.addr());
        nodes.push(cluster.member(&format!("node-{n}"), opts).await.unwrap());
    }
    let before = origin.egress();
    let pulls = pull_all_at_once(&nodes, "swarm/ha", &blobs);
    let started = std::time::Instant::now();
    while origin.egress() - before < image_bytes / 4 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the pull never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let at_kill = origin.egress() - before;
    cluster.kill_first_tracker();
    for p in pulls {
        p.await.unwrap().unwrap();
    }
    let egress = (origin.egress() - before) as f64;
    let mut peer_total = 0.0;
    for n in &nodes {
        peer_total += n.metric(PEER_RX, &[]).await.unwrap();
    }
    let f = image_bytes as f64;
    eprintln!(
        "injected: kill -9 of one of two tracker replicas after the origin sent {at_kill} bytes; \
         counted: {MEMBERS} members complete, origin sent {egress} bytes ({:.3}x the image), \
         peers {peer_total} ({:.2}x)",
        egress / f,
        peer_total / f
    );
    assert!(
        egress <= 1.15 * f,
        "the origin sent {egress} bytes for a {image_bytes}-byte image"
    );
    assert!(
        peer_total >= 0.8 * (MEMBERS as f64 - 1.0) * f,
        "members got only {peer_total} bytes from each other"
    );
}

/// The operator denies a member (the tracker's `--deny-file`): within a
/// poll and an announce interval every member knows, the denied node gets
/// nothing from the tracker or its peers — its pull still completes, from
/// the origin — and the other members go on as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_member_is_shut_out_by_the_tracker_and_every_peer() {
    let origin = Origin::start().await.unwrap();
    let cluster = Cluster::start().await.unwrap();
    let opts = || ShoaldOpts::insecure_default(&origin.addr());
    let a = cluster.member("node-a", opts()).await.unwrap();
    let b = cluster.member("node-b", opts()).await.unwrap();
    let c = cluster.member("node-c", opts()).await.unwrap();
    let size = 8 * MIB as u64;
    let (blob, digest) = random_blob(size as usize, fresh_seed());
    origin
        .registry
        .push_blob("swarm/deny", &blob)
        .await
        .unwrap();
    let path = format!("/v2/swarm/deny/blobs/{digest}");
    pull(&a, &path, &digest, size).await;
    a.wait_idle().await.unwrap();

    let denied_at = std::time::Instant::now();
    cluster.deny(&["node-c"]).unwrap();
    for m in [&a, &b] {
        m.wait_metric(
            "shoal_peer_denied_nodes",
            &[],
            std::time::Duration::from_secs(20),
            |v| v == 1.0,
        )
        .await
        .unwrap();
    }
    eprintln!(
        "injected: node-c on the deny list; counted: every member knew within {:?}",
        denied_at.elapsed()
    );
    // node-c still gets its blob, all of it from the origin.
    pull(&c, &path, &digest, size).await;
    assert!(c.origin_blob_bytes().await.unwrap() >= size as f64);
    assert_eq!(c.metric(PEER_RX, &[]).await.unwrap(), 0.0);
    // And says so (from its transfer, or its next heartbeat).
    shoal_tests::util::wait_for(
        "node-c to log that it is denied",
        std::time::Duration::from_secs(12),
        std::time::Duration::from_millis(100),
        || {
            let said = c.logs().contains("deny list");
            async move { Ok(said.then_some(())) }
        },
    )
    .await
    .unwrap();
    // node-b is served by node-a as before.
    pull(&b, &path, &digest, size).await;
    assert_eq!(b.origin_blob_bytes().await.unwrap(), 0.0);
}

/// Nodes whose cluster dir holds only the CA certificate join with a token:
/// the tracker signs their certificate requests (the CA key never leaves
/// it), they form a swarm, and they renew their short-lived certificates
/// (30 s here) through the tracker while running — a member that joins
/// after the first certificates expired still fetches from them. A wrong
/// token is refused with one clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_with_a_token_and_renew_their_certificates() {
    use shoal_tests::cluster::{JOINED_CERT_VALIDITY_S, JOIN_TOKEN};
    let origin = Origin::start().await.unwrap();
    let cluster = Cluster::start().await.unwrap();
    let opts = || ShoaldOpts::insecure_default(&origin.addr());
    let joined = std::time::Instant::now();
    let a = cluster
        .joining_member("node-a", JOIN_TOKEN, opts())
        .await
        .unwrap();
    let b = cluster
        .joining_member("node-b", JOIN_TOKEN, opts())
        .await
        .unwrap();
    let dir = cluster.joined_dir("node-a");
    assert!(!dir.join("ca.key").exists());
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir.join("node.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let size = 4 * MIB as u64;
    let (blob, digest) = random_blob(size as usize, fresh_seed());
    origin
        .registry
        .push_blob("swarm/join", &blob)
        .await
        .unwrap();
    let path = format!("/v2/swarm/join/blobs/{digest}");
    pull(&a, &path, &digest, size).await;
    a.wait_idle().await.unwrap();
    pull(&b, &path, &digest, size).await;
    assert_eq!(
        b.origin_blob_bytes().await.unwrap(),
        0.0,
        "b did not get it from a"
    );

    // Both renew at two thirds of the lifetime; then the first certificates
    // run out.
    for m in [&a, &b] {
        shoal_tests::util::wait_for(
            "the node certificate to be renewed",
            std::time::Duration::from_secs(2 * JOINED_CERT_VALIDITY_S),
            std::time::Duration::from_millis(250),
            || {
                let renewed = m.logs().contains("node certificate renewed");
                async move { Ok(renewed.then_some(())) }
            },
        )
        .await
        .unwrap();
    }
    let expired = std::time::Duration::from_secs(JOINED_CERT_VALIDITY_S + 2);
    if let Some(left) = expired.checked_sub(joined.elapsed()) {
        tokio::time::sleep(left).await;
    }
    // A new member dials them: their renewed certificates are in use.
    let c = cluster
        .joining_member("node-c", JOIN_TOKEN, opts())
        .await
        .unwrap();
    pull(&c, &path, &digest, size).await;
    assert_eq!(
        c.origin_blob_bytes().await.unwrap(),
        0.0,
        "c did not get it from a or b"
    );
    eprintln!(
        "injected: certificates valid {JOINED_CERT_VALIDITY_S} s; counted: both renewed, \
         and a member joining {:?} after them fetched from them",
        joined.elapsed()
    );

    // A wrong token: the node does not start, and says why.
    let err = cluster
        .joining_member("node-x", "not-the-token-0123456789abcdef0123456789", opts())
        .await
        .err()
        .expect("a node with a wrong token started");
    assert!(format!("{err:#}").contains("unknown join token"), "{err:#}");
}
