//! A member that accepts connections and streams but never answers: it
//! holds a real certificate of the cluster and tells the tracker it holds a
//! whole blob, then takes every request a member sends it and says nothing.
//! The member pulling the blob must not hang on it: it benches the silent
//! holder after its stall period and gets every chunk elsewhere (here: the
//! origin), with the right digest, in bounded time. Alone with it, the
//! member waits out the bench (10 s) and the orphan period (5 s) before it
//! takes chunks the tracker still shows as served to the origin without a
//! lease: one reporter is not enough for the tracker to drop a member (a
//! reporter's own network may be what failed), so ~15 s is the bound here;
//! with two members reporting, the tracker forgets the silent one sooner.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_proto::{ChunkLayout, Digest};
use shoal_tests::cluster::Cluster;
use shoal_tests::fixture::Origin;
use shoal_tests::{fresh_seed, http, random_blob, ShoaldOpts, MIB};
use shoal_tracker::client::TrackerApi;
use shoal_tracker::https_client::{HttpsConfig, HttpsTracker};
use shoal_tracker::tracker_api::{
    Announce, BlobHave, ChunkHash, LeaseRequest, NodeId, PublishHashes,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_takes_requests_and_never_answers_does_not_stall_a_pull() {
    let origin = Origin::start().await.unwrap();
    let cluster = Cluster::start().await.unwrap();

    // The silent member.
    let id = shoal_cluster::Identity::load(&cluster.ca_dir(), "node-z").unwrap();
    let mut server = id.quic_server().unwrap();
    server.transport_config(shoal_daemon::peer::transport_config());
    let endpoint = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let streams = Arc::new(AtomicUsize::new(0));
    let silent = tokio::spawn({
        let streams = streams.clone();
        async move {
            while let Some(incoming) = endpoint.accept().await {
                let streams = streams.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    let mut held = Vec::new();
                    while let Ok(s) = conn.accept_bi().await {
                        streams.fetch_add(1, Ordering::SeqCst);
                        held.push(s);
                    }
                });
            }
        }
    });

    let size = 8 * MIB as u64;
    let (blob, digest) = random_blob(size as usize, fresh_seed());
    origin
        .registry
        .push_blob("swarm/silent", &blob)
        .await
        .unwrap();
    let d: Digest = digest.parse().unwrap();
    let layout = ChunkLayout::for_blob(size).unwrap();
    let tracker = HttpsTracker::new(
        &[cluster.tracker_url()],
        id.client_tls().unwrap(),
        HttpsConfig::default(),
    )
    .unwrap();
    // It becomes the blob's lessee and publishes the true chunk hashes, as
    // a member that fetched it from the origin would, then says it holds
    // all of it: to the others it is the perfect holder.
    let z: NodeId = "node-z".parse().unwrap();
    let announce = |blobs| {
        Announce::new(
            z.clone(),
            addr.to_string().parse().unwrap(),
            blobs,
            vec![],
            true,
        )
        .unwrap()
    };
    tracker.announce(announce(vec![])).await.unwrap();
    let mut from = 0;
    while from < layout.count() {
        let r = LeaseRequest::new(z.clone(), d, layout, 16, from).unwrap();
        let chunks = tracker.lease(r).await.unwrap().grant.chunks;
        assert!(!chunks.is_empty());
        let hashes = chunks
            .iter()
            .map(|&i| {
                let (off, len) = layout.range(i).unwrap();
                (
                    i,
                    ChunkHash::of(&blob[off as usize..(off + u64::from(len)) as usize]),
                )
            })
            .collect();
        let r = tracker
            .publish_hashes(PublishHashes::new(z.clone(), d, hashes).unwrap())
            .await
            .unwrap();
        assert!(r.rejected.is_empty(), "{r:?}");
        from = chunks.iter().max().unwrap() + 1;
    }
    tracker
        .announce(announce(vec![BlobHave::complete(d, layout)]))
        .await
        .unwrap();

    let member = cluster
        .member("node-a", ShoaldOpts::insecure_default(&origin.addr()))
        .await
        .unwrap();
    let started = Instant::now();
    let url = format!("{}/v2/swarm/silent/blobs/{digest}", member.registry_url());
    http::get_hashed(
        &http::client_with_timeout(Duration::from_secs(60)),
        &url,
        &[],
    )
    .await
    .unwrap()
    .expect_complete(&digest, size)
    .unwrap();
    let took = started.elapsed();
    let asked = streams.load(Ordering::SeqCst);
    eprintln!(
        "injected: node-z takes {asked} stream(s) and answers none; counted: the pull of \
         {size} bytes completed in {took:?}, {} bytes from the origin",
        member.origin_blob_bytes().await.unwrap()
    );
    assert!(asked > 0, "node-a never asked the silent member");
    assert!(
        took < Duration::from_secs(25),
        "the pull took {took:?} with a silent holder"
    );
    assert!(member.origin_blob_bytes().await.unwrap() >= size as f64);
    silent.abort();
}
