//! Tracker replicas sharing their state through a real `redis-server`
//! (`shoal-tracker --store redis://...`), as separate processes: what one
//! replica acknowledged, every other one knows; leases are decided once for
//! all replicas; killing a replica under load loses no acknowledged
//! announce; a replica that joins after the log was trimmed starts from the
//! snapshot; and with Redis gone, changes fail fast with 503 while lookups
//! are still answered.

#![cfg(feature = "net")]

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{bounded, http_get, Cluster, RedisServer, TrackerProcess};
use shoal_proto::{ChunkLayout, Digest};
use shoal_tracker::client::{ApiError, TrackerApi};
use shoal_tracker::https_client::{HttpsConfig, HttpsTracker};
use shoal_tracker::tracker_api::{
    Announce, BlobHave, ChunkHash, LeaseRequest, NodeId, PublishHashes,
};

const MIB: u32 = 1 << 20;

fn layout(chunks: u32) -> ChunkLayout {
    ChunkLayout::new(u64::from(chunks) * u64::from(MIB), MIB).unwrap()
}

fn node(name: &str) -> NodeId {
    name.parse().unwrap()
}

fn announce(name: &str, port: u16, blobs: Vec<BlobHave>) -> Announce {
    Announce::new(
        node(name),
        format!("127.0.0.1:{port}").parse().unwrap(),
        blobs,
        vec![],
        false,
    )
    .unwrap()
}

/// The holders of `blob` that the tracker at `url` names to `asker`.
async fn holders_seen_at(cluster: &Cluster, url: &str, asker: &str, blob: &Digest) -> Vec<String> {
    let view = cluster
        .client(asker, &[url])
        .lookup(&node(asker), blob, None)
        .await
        .unwrap();
    view.holders().iter().map(|h| h.node.to_string()).collect()
}

/// node-1 announces at the tracker at `url` that it holds a whole blob;
/// returns its client and the blob.
async fn node_1_holds_a_blob(cluster: &Cluster, url: &str) -> (HttpsTracker, Digest, ChunkLayout) {
    let (blob, l) = (Digest::of(b"layer"), layout(8));
    let member = cluster.client("node-1", &[url]);
    member
        .announce(announce("node-1", 4001, vec![BlobHave::complete(blob, l)]))
        .await
        .unwrap();
    (member, blob, l)
}

async fn replica(cluster: &Cluster, redis: &RedisServer, extra: &[&str]) -> TrackerProcess {
    let url = redis.url();
    let mut args = vec!["--store", url.as_str()];
    args.extend_from_slice(extra);
    TrackerProcess::start(cluster, &args).await
}

#[tokio::test]
async fn what_one_replica_acknowledged_every_replica_knows() {
    bounded(async {
        let cluster = Cluster::new();
        let redis = RedisServer::start().await;
        let a = replica(&cluster, &redis, &[]).await;
        let b = replica(&cluster, &redis, &[]).await;
        let (blob, l) = (Digest::of(b"layer"), layout(16));
        let at_a = |n: &str| cluster.client(n, &[a.url.as_str()]);
        let at_b = |n: &str| cluster.client(n, &[b.url.as_str()]);

        // node-1 announces at A; node-2, at B, finds it.
        at_a("node-1")
            .announce(announce("node-1", 4001, vec![BlobHave::complete(blob, l)]))
            .await
            .unwrap();
        at_b("node-2")
            .announce(announce("node-2", 4002, vec![]))
            .await
            .unwrap();
        assert_eq!(
            holders_seen_at(&cluster, &b.url, "node-2", &blob).await,
            ["node-1"]
        );

        // A cold blob: leases taken at A and at B never overlap.
        let cold = Digest::of(b"cold layer");
        let mut leased = BTreeSet::new();
        for (i, n) in ["node-3", "node-4", "node-5", "node-6"].iter().enumerate() {
            let c = if i % 2 == 0 { at_a(n) } else { at_b(n) };
            c.announce(announce(n, 4003 + i as u16, vec![]))
                .await
                .unwrap();
            let r = LeaseRequest::new(node(n), cold, l, 4, 0).unwrap();
            let grant = c.lease(r).await.unwrap().grant;
            assert_eq!(grant.chunks.len(), 4, "{n}: {grant:?}");
            for ch in grant.chunks {
                assert!(leased.insert(ch), "chunk {ch} leased twice ({n})");
            }
        }
        assert_eq!(leased.len(), 16);

        // Hashes published at A by the lessee are served by B.
        let mine = LeaseRequest::new(node("node-3"), cold, l, 4, 0).unwrap();
        let chunks = at_a("node-3").lease(mine).await.unwrap().grant.chunks;
        let hashes: Vec<(u32, ChunkHash)> = chunks
            .iter()
            .map(|&i| (i, ChunkHash::of(format!("chunk {i}").as_bytes())))
            .collect();
        let p = PublishHashes::new(node("node-3"), cold, hashes.clone()).unwrap();
        let r = at_a("node-3").publish_hashes(p).await.unwrap();
        assert!(r.rejected.is_empty(), "{r:?}");
        let view = at_b("node-2")
            .lookup(&node("node-2"), &cold, None)
            .await
            .unwrap();
        for (i, h) in hashes {
            assert_eq!(view.hashes()[i as usize], Some(h), "chunk {i}");
        }
        let (_, status) = http_get(b.ops, "/status").await;
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        assert_eq!(status["stats"]["members"], 6, "{status}");
        assert!(status["replica"]["applied"].is_string(), "{status}");
    })
    .await;
}

#[tokio::test]
async fn killing_a_replica_under_load_loses_no_acknowledged_announce() {
    bounded(async {
        let cluster = Cluster::new();
        let redis = RedisServer::start().await;
        let mut a = replica(&cluster, &redis, &[]).await;
        let b = replica(&cluster, &redis, &[]).await;
        let l = layout(4);
        // Members fail over quickly: A first, then B.
        let cfg = HttpsConfig {
            request_timeout: Duration::from_secs(2),
            ..HttpsConfig::default()
        };
        let urls = [a.url.clone(), b.url.clone()];
        let acked: Arc<Mutex<Vec<(String, Digest)>>> = Arc::default();
        let failures = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut loaders = Vec::new();
        for w in 0..8 {
            let client = cluster.client_with(&format!("w{w}"), &[&urls[0], &urls[1]], cfg.clone());
            let (acked, failures, stop) = (acked.clone(), failures.clone(), stop.clone());
            loaders.push(tokio::spawn(async move {
                // Each announce adds a new blob to this member's holdings,
                // so each acknowledgement is checkable on its own.
                let mut blobs = Vec::new();
                let mut k = 0;
                while !stop.load(Ordering::Relaxed) && k < 400 {
                    let d = Digest::of(format!("w{w}/{k}").as_bytes());
                    blobs.push(BlobHave::complete(d, l));
                    let name = format!("w{w}");
                    match client.announce(announce(&name, 5000 + w, blobs.clone())).await {
                        Ok(_) => acked.lock().unwrap().push((name, d)),
                        Err(e) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                            eprintln!("announce failed: {e}");
                            blobs.pop();
                        }
                    }
                    k += 1;
                }
            }));
        }
        // Kill A while the load runs.
        let started = Instant::now();
        while acked.lock().unwrap().len() < 200 {
            assert!(started.elapsed() < Duration::from_secs(30), "no load");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let before_kill = acked.lock().unwrap().len();
        a.kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        for l in loaders {
            l.await.unwrap();
        }
        let acked = acked.lock().unwrap().clone();
        eprintln!(
            "injected: kill -9 of replica A after {before_kill} acknowledged announces; counted: {} acknowledged in all, {} failed",
            acked.len(),
            failures.load(Ordering::Relaxed)
        );
        assert!(acked.len() > before_kill, "no announce went to B after the kill");
        // Every acknowledged announce is known to B.
        let checker = cluster.client("checker", &[b.url.as_str()]);
        checker
            .announce(announce("checker", 4999, vec![]))
            .await
            .unwrap();
        let mut lost = Vec::new();
        for (name, d) in &acked {
            let view = checker.lookup(&node("checker"), d, None).await;
            let held = view.is_ok_and(|v| v.holders().iter().any(|h| h.node.as_str() == name));
            if !held {
                lost.push(format!("{name} {d}"));
            }
        }
        assert!(lost.is_empty(), "acknowledged but unknown to B: {lost:?}");
        // The members failed over rather than failing.
        assert_eq!(failures.load(Ordering::Relaxed), 0);
    })
    .await;
}

#[tokio::test]
async fn a_replica_joining_after_the_log_was_trimmed_starts_from_the_snapshot() {
    bounded(async {
        let cluster = Cluster::new();
        let redis = RedisServer::start().await;
        let a = replica(&cluster, &redis, &["--snapshot-interval", "200ms"]).await;
        let (_, blob, _) = node_1_holds_a_blob(&cluster, &a.url).await;
        // Two snapshots: the second trims the log to the first.
        let started = Instant::now();
        while a
            .metric("shoal_tracker_replica_snapshots_stored_total")
            .await
            < 3.0
        {
            assert!(started.elapsed() < Duration::from_secs(20), "no snapshots");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut redis_conn = redis::Client::open(redis.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let trimmed: Option<String> = redis::cmd("GET")
            .arg("shoal:trimmed")
            .query_async(&mut redis_conn)
            .await
            .unwrap();
        assert!(trimmed.is_some(), "the log was never trimmed");
        let log: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg("shoal:log")
            .arg("-")
            .arg("+")
            .query_async(&mut redis_conn)
            .await
            .unwrap();
        let ops: Vec<String> = log
            .ids
            .iter()
            .map(|e| e.get::<String>("op").unwrap())
            .collect();
        // The announce's entry is gone from the log (expiry ticks remain) ...
        assert!(
            !ops.is_empty() && ops.iter().all(|op| op == "expire"),
            "{ops:?}"
        );
        // ... yet a replica started now knows node-1 (from the snapshot).
        let c = replica(&cluster, &redis, &[]).await;
        assert_eq!(
            c.metric("shoal_tracker_replica_snapshots_loaded_total")
                .await,
            1.0
        );
        assert_eq!(
            holders_seen_at(&cluster, &c.url, "node-2", &blob).await,
            ["node-1"]
        );
    })
    .await;
}

#[tokio::test]
async fn without_redis_changes_fail_fast_and_lookups_still_answer() {
    bounded(async {
        let cluster = Cluster::new();
        let mut redis = RedisServer::start().await;
        let a = replica(&cluster, &redis, &[]).await;
        let (member, blob, _) = node_1_holds_a_blob(&cluster, &a.url).await;
        redis.kill();
        let started = Instant::now();
        let err = member
            .announce(announce("node-1", 4001, vec![]))
            .await
            .unwrap_err();
        let took = started.elapsed();
        match &err {
            ApiError::BadResponse { status, message } => {
                assert_eq!(*status, 503, "{err}");
                assert!(message.contains("unavailable"), "{err}");
            }
            other => panic!("expected a 503 from the replica, got {other}"),
        }
        assert!(took < Duration::from_secs(6), "took {took:?}");
        // Lookups are answered from the replica's state.
        let view = cluster
            .client("node-1", &[a.url.as_str()])
            .lookup(&node("node-1"), &blob, None)
            .await;
        // node-1 asks about its own blob: it is not its own holder, but the
        // blob is known.
        assert!(view.is_ok(), "{view:?}");
        assert!(a.metric("shoal_tracker_replica_unavailable_total").await >= 1.0);
    })
    .await;
}

#[tokio::test]
async fn a_replica_of_another_configuration_refuses_to_join() {
    bounded(async {
        let cluster = Cluster::new();
        let redis = RedisServer::start().await;
        let mut conn = redis::Client::open(redis.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = redis::cmd("HSET")
            .arg("shoal:meta")
            .arg("format")
            .arg(r#"{"format":0}"#)
            .query_async(&mut conn)
            .await
            .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_shoal-tracker"))
            .args(["--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0"])
            .args([
                "--name",
                "127.0.0.1",
                "--store",
                &redis.url(),
                "--cluster-dir",
            ])
            .arg(cluster.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("shoal-tracker: the tracker replicas under Redis prefix \"shoal\" run"),
            "{stderr}"
        );
        // Under another prefix it joins.
        let _ok = replica(&cluster, &redis, &["--store-prefix", "other"]).await;
    })
    .await;
}

#[tokio::test]
async fn a_redis_that_lost_everything_is_refilled_from_a_live_replica() {
    bounded(async {
        let cluster = Cluster::new();
        let mut redis = RedisServer::start().await;
        let a = replica(&cluster, &redis, &[]).await;
        let (member, blob, l) = node_1_holds_a_blob(&cluster, &a.url).await;
        // Redis restarts empty (no persistence).
        redis.restart_empty().await;
        eprintln!("injected: redis-server restarted empty under a replica");
        // The replica writes its state back within a few seconds, and takes
        // commands again (its connection reconnects).
        let started = Instant::now();
        while a
            .metric("shoal_tracker_replica_snapshots_stored_total")
            .await
            < 1.0
        {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "never re-seeded"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let started = Instant::now();
        loop {
            let r = member
                .announce(announce("node-1", 4001, vec![BlobHave::complete(blob, l)]))
                .await;
            if r.is_ok() {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "{r:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // A replica started now knows what the first one knew.
        let b = replica(&cluster, &redis, &[]).await;
        assert_eq!(
            holders_seen_at(&cluster, &b.url, "node-2", &blob).await,
            ["node-1"]
        );
    })
    .await;
}
