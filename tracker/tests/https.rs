//! The tracker over real mutual TLS on loopback: the API end to end,
//! membership and identity binding, precise errors, failover, and that the
//! in-process and HTTPS implementations of `TrackerApi` agree.

#![cfg(feature = "net")]

mod common;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use common::{bounded, dead_port, http_get, raw_client, send, Cluster, Running};
use shoal_proto::tracker_api::{
    Announce, BlobHave, ChunkHash, HashCursor, LeaseRequest, NodeId, PublishHashes,
    PublishRejection, Report,
};
use shoal_proto::{Bitfield, ChunkLayout, Digest};
use shoal_tracker::client::{ApiError, Embedded, ErrorCode, TrackerApi};
use shoal_tracker::clock::ManualClock;
use shoal_tracker::https_client::HttpsConfig;
use shoal_tracker::server::NOW_HEADER;
use shoal_tracker::{Tracker, TrackerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u32 = 1 << 20;

fn node(s: &str) -> NodeId {
    s.parse().unwrap()
}

fn layout(chunks: u32) -> ChunkLayout {
    ChunkLayout::new(u64::from(chunks) * u64::from(MIB), MIB).unwrap()
}

fn announce(n: &str, port: u16, blobs: Vec<BlobHave>) -> Announce {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    Announce::new(node(n), addr, blobs, vec![], false).unwrap()
}

fn truth(d: &Digest, i: u32) -> ChunkHash {
    ChunkHash::of(format!("{d}/{i}").as_bytes())
}

fn refused_code<T: std::fmt::Debug>(r: Result<T, ApiError>) -> (u16, ErrorCode) {
    match r {
        Err(ApiError::Refused { status, code, .. }) => (status, code),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_member_announces_looks_up_leases_publishes_and_reports() {
    bounded(async {
        let cluster = Cluster::new();
        let t = Running::start(&cluster).await;
        let n1 = cluster.client("node-1", &[t.url.as_str()]);
        let n2 = cluster.client("node-2", &[t.url.as_str()]);
        let blob = Digest::of(b"layer");
        let l = layout(4);

        let reply = n1.announce(announce("node-1", 4901, vec![])).await.unwrap();
        assert_eq!(reply.interval_ms, 5_000);
        let (status, code) = refused_code(n1.lookup(&node("node-1"), &blob, None).await);
        assert_eq!((status, code), (404, ErrorCode::UnknownBlob));

        t.clock.advance(10);
        let lease = n1
            .lease(LeaseRequest::new(node("node-1"), blob, l, 4, 0).unwrap())
            .await
            .unwrap();
        assert_eq!(lease.grant.chunks, vec![0, 1, 2, 3]);
        assert_eq!(lease.grant.expires_ms, 3_010);
        assert_eq!(lease.valid_for, Duration::from_secs(3));

        let hashes = (0..4).map(|i| (i, truth(&blob, i))).collect();
        let published = n1
            .publish_hashes(PublishHashes::new(node("node-1"), blob, hashes).unwrap())
            .await
            .unwrap();
        assert_eq!(published.accepted, 4);
        assert!(published.rejected.is_empty());

        n2.announce(announce("node-2", 4902, vec![])).await.unwrap();
        let view = n2.lookup(&node("node-2"), &blob, None).await.unwrap();
        assert!(view.hashes().iter().all(Option::is_some));
        assert_eq!(view.hashes()[2], Some(truth(&blob, 2)));
        assert_eq!(view.holders().len(), 1);
        assert_eq!(view.holders()[0].node, node("node-1"));
        assert_eq!(view.holders()[0].addr.as_str(), "127.0.0.1:4901");
        assert!(view.holders()[0].have.is_full());
        assert_eq!(view.leased().count(), 0);

        let bad = Report::BadChunk {
            node: node("node-2"),
            blob,
            peer: node("node-1"),
            chunk: 1,
        };
        let r = n2.report(bad).await.unwrap();
        assert!(r.excluded.is_empty(), "one reporter is not enough");
        let mismatch = Report::DigestMismatch {
            node: node("node-2"),
            blob,
            epoch: view.epoch(),
        };
        let r = n2.report(mismatch).await.unwrap();
        assert_eq!(r.withdrawn, 4);
        // Its hashes withdrawn and its partial holdings cleared, nothing is
        // left of the blob.
        let (_, code) = refused_code(n2.lookup(&node("node-2"), &blob, None).await);
        assert_eq!(code, ErrorCode::UnknownBlob);

        let mut t = t;
        t.shutdown().await.unwrap();
    })
    .await;
}

/// Connects with `cfg`, sends a request and returns whatever comes back
/// (bytes, or the error that ended the exchange).
async fn exchange(
    cfg: rustls::ClientConfig,
    addr: std::net::SocketAddr,
) -> Result<Vec<u8>, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(b"GET /v1/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out)
        .await
        .map_err(|e| format!("read: {e}"))?;
    Ok(out)
}

#[tokio::test]
async fn outsiders_are_refused_at_the_handshake() {
    bounded(async {
        let cluster = Cluster::new();
        let t = Running::start(&cluster).await;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            cluster.roots(),
            provider.clone(),
        )
        .build()
        .unwrap();

        // A member gets an HTTP answer (a 404 for the unknown blob): the probe works.
        let member = cluster.identity("node-1").client_tls().unwrap();
        let got = exchange(member, t.addr).await.unwrap();
        assert!(
            got.starts_with(b"HTTP/1.1 404"),
            "{}",
            String::from_utf8_lossy(&got)
        );

        // A certificate of another cluster's CA, though it trusts ours.
        let other = Cluster::new();
        let mut foreign = other.identity("node-1").client_tls().unwrap();
        foreign.dangerous().set_certificate_verifier(verifier);
        let got = exchange(foreign, t.addr).await;
        assert!(
            !matches!(&got, Ok(b) if !b.is_empty()),
            "a foreign certificate got an answer: {got:?}"
        );

        // No certificate at all.
        let anonymous = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(cluster.roots())
            .with_no_client_auth();
        let got = exchange(anonymous, t.addr).await;
        assert!(
            !matches!(&got, Ok(b) if !b.is_empty()),
            "a client without a certificate got an answer: {got:?}"
        );
        assert!(t
            .server
            .metrics()
            .encode()
            .contains("shoal_tracker_handshake_failures_total 2"));

        // A daemon of another cluster, through the real client: unreachable.
        let outsider = other.client("node-1", &[t.url.as_str()]);
        let err = outsider
            .announce(announce("node-1", 4901, vec![]))
            .await
            .unwrap_err();
        assert!(err.is_down(), "{err}");
        assert!(matches!(err, ApiError::Unreachable(_)), "{err}");
    })
    .await;
}

#[tokio::test]
async fn a_member_cannot_speak_for_another_node() {
    bounded(async {
        let cluster = Cluster::new();
        let t = Running::start(&cluster).await;
        let n1 = cluster.client("node-1", &[t.url.as_str()]);
        let n2 = cluster.client("node-2", &[t.url.as_str()]);
        n2.announce(announce("node-2", 4902, vec![])).await.unwrap();

        let (status, code) = refused_code(n1.announce(announce("node-2", 4901, vec![])).await);
        assert_eq!((status, code), (403, ErrorCode::NodeMismatch));
        // Case matters: NODE-1 would be another member to the core.
        let (_, code) = refused_code(n1.announce(announce("NODE-1", 4901, vec![])).await);
        assert_eq!(code, ErrorCode::NodeMismatch);
        let blob = Digest::of(b"x");
        let (_, code) = refused_code(n1.lookup(&node("node-2"), &blob, None).await);
        assert_eq!(code, ErrorCode::NodeMismatch);
        let h = vec![(0, ChunkHash::of(b"evil"))];
        let (_, code) = refused_code(
            n1.publish_hashes(PublishHashes::new(node("node-2"), blob, h).unwrap())
                .await,
        );
        assert_eq!(code, ErrorCode::NodeMismatch);
        let sybil = Report::BadChunk {
            node: node("node-3"),
            blob,
            peer: node("node-2"),
            chunk: 0,
        };
        let (_, code) = refused_code(n1.report(sybil).await);
        assert_eq!(code, ErrorCode::NodeMismatch);
        let (_, code) = refused_code(
            n1.lease(LeaseRequest::new(node("node-2"), blob, layout(1), 1, 0).unwrap())
                .await,
        );
        assert_eq!(code, ErrorCode::NodeMismatch);
        // Nothing reached the core: node-2 is the only member.
        assert_eq!(t.tracker.read().unwrap().stats().members, 1);
    })
    .await;
}

#[tokio::test]
async fn bad_requests_get_precise_json_errors() {
    bounded(async {
        let cluster = Cluster::new();
        let t = Running::start(&cluster).await;
        let c = raw_client(&cluster.identity("node-1"));
        let u = |p: &str| format!("{}{p}", t.url);
        let check = |r: &common::Reply, status: u16, code: &str, needle: &str| {
            assert_eq!(r.status, status, "{}", r.json);
            assert_eq!(r.json["error"]["code"], code, "{}", r.json);
            let msg = r.json["error"]["message"].as_str().unwrap();
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
            assert_eq!(r.headers["content-type"], "application/json");
        };

        let r = send(&c, "POST", &u("/v1/announce"), "{not json").await;
        check(&r, 400, "bad_request", "line 1 column");
        let r = send(&c, "POST", &u("/v1/announce"), r#"{"node":"node 1","addr":"127.0.0.1:1"}"#).await;
        check(&r, 400, "bad_request", "node id");
        let r = send(&c, "POST", &u("/v1/announce"), r#"{"node":"node-1","addr":"nowhere"}"#).await;
        check(&r, 400, "bad_request", "no :port");
        let lease = r#"{"node":"node-1","blob":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":10,"chunk_size":1000,"max_chunks":1}"#;
        let r = send(&c, "POST", &u("/v1/lease"), lease).await;
        check(&r, 400, "bad_request", "chunk size 1000");
        let lease = lease.replace("1000", "1048576");
        let r = send(&c, "POST", &u("/v1/lease"), lease).await;
        check(&r, 409, "not_a_member", "announce first");

        let unknown = Digest::of(b"nobody has this");
        let r = send(&c, "GET", &u(&format!("/v1/blobs/{unknown}")), "").await;
        check(&r, 404, "unknown_blob", &unknown.hex());
        let r = send(&c, "GET", &u("/v1/blobs/sha256:xyz"), "").await;
        check(&r, 400, "bad_request", "digest");
        let r = send(&c, "GET", &u(&format!("/v1/blobs/{unknown}?node=bad%20id")), "").await;
        check(&r, 400, "bad_request", "node id");
        let r = send(&c, "GET", &u(&format!("/v1/blobs/{unknown}?since=7")), "").await;
        check(&r, 400, "bad_request", "hash cursor EPOCH.SEQ");
        let r = send(&c, "GET", &u(&format!("/v1/blobs/{unknown}?since=1.-2")), "").await;
        check(&r, 400, "bad_request", "`since`");

        let big = vec![b' '; 9 << 20];
        let r = send(&c, "POST", &u("/v1/hashes"), big).await;
        check(&r, 413, "body_too_large", "limit of 8388608 bytes");

        let r = send(&c, "GET", &u("/v1/announce"), "").await;
        check(&r, 405, "method_not_allowed", "use POST");
        assert_eq!(r.headers["allow"], "POST");
        let r = send(&c, "POST", &u("/v1/blobs/x"), "").await;
        check(&r, 405, "method_not_allowed", "use GET");
        let r = send(&c, "GET", &u("/v2/"), "").await;
        check(&r, 404, "not_found", "/v2/");

        // A message quoting a huge client string stays bounded.
        let long = format!(r#"{{"node":"{}","addr":"127.0.0.1:1"}}"#, "x".repeat(100_000));
        let r = send(&c, "POST", &u("/v1/announce"), long).await;
        assert_eq!(r.status, 400);
        assert!(r.json["error"]["message"].as_str().unwrap().len() < 1_000);

        // Successful replies carry the tracker time.
        let ok = send(&c, "POST", &u("/v1/announce"), r#"{"node":"node-1","addr":"127.0.0.1:1"}"#).await;
        assert_eq!(ok.status, 200);
        assert_eq!(ok.headers[NOW_HEADER], "0");

        let (status, metrics) = http_get(t.ops, "/metrics").await;
        assert_eq!(status, 200);
        for line in [
            r#"shoal_tracker_requests_total{route="announce",status="400"} 4"#,
            r#"shoal_tracker_requests_total{route="announce",status="200"} 1"#,
            r#"shoal_tracker_requests_total{route="hashes",status="413"} 1"#,
            r#"shoal_tracker_requests_total{route="other",status="404"} 1"#,
            "shoal_tracker_members 1",
            "shoal_tracker_blobs 0",
            "shoal_tracker_request_duration_seconds_count{route=\"lookup\"} 6",
        ] {
            assert!(metrics.contains(line), "missing {line}:\n{metrics}");
        }
        assert_eq!(http_get(t.ops, "/healthz").await, (200, "ok\n".to_owned()));
        let (status, body) = http_get(t.ops, "/status").await;
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["stats"]["members"], 1);
    })
    .await;
}

#[tokio::test]
async fn the_client_fails_over_to_the_next_tracker() {
    bounded(async {
        let cluster = Cluster::new();
        let t = Running::start(&cluster).await;
        let dead = format!("https://127.0.0.1:{}", dead_port().await);
        // Accepts connections, never answers.
        let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hung_url = format!("https://127.0.0.1:{}", hung.local_addr().unwrap().port());
        let cfg = HttpsConfig {
            request_timeout: Duration::from_millis(500),
            retry_backoff: Duration::from_millis(10),
            ..HttpsConfig::default()
        };
        let c = cluster.client_with("node-1", &[dead.as_str(), &hung_url, &t.url], cfg.clone());
        let started = Instant::now();
        c.announce(announce("node-1", 4901, vec![])).await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(c.preferred_url(), t.url);
        // The next call goes straight to the tracker that answered.
        let started = Instant::now();
        c.announce(announce("node-1", 4901, vec![])).await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(400));

        // Nothing answers: "unreachable", within a bounded time, naming each URL.
        let down = cluster.client_with("node-1", &[dead.as_str(), &hung_url], cfg);
        let started = Instant::now();
        let err = down
            .announce(announce("node-1", 4901, vec![]))
            .await
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert!(err.is_down());
        let msg = err.to_string();
        assert!(msg.contains(&dead) && msg.contains(&hung_url), "{msg}");
        assert!(msg.contains("no reply within"), "{msg}");
        drop(hung);

        // A refusal is not "down", and is not retried elsewhere.
        let blob = Digest::of(b"x");
        let err = c.lookup(&node("node-1"), &blob, None).await.unwrap_err();
        assert!(!err.is_down());
        assert_eq!(err.code(), Some(&ErrorCode::UnknownBlob));
    })
    .await;
}

#[tokio::test]
async fn shutdown_drains_and_then_refuses() {
    bounded(async {
        let cluster = Cluster::new();
        let mut t = Running::start(&cluster).await;
        let c = cluster.client("node-1", &[t.url.as_str()]);
        c.announce(announce("node-1", 4901, vec![])).await.unwrap();
        let started = Instant::now();
        t.shutdown().await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let err = c
            .announce(announce("node-1", 4901, vec![]))
            .await
            .unwrap_err();
        assert!(err.is_down(), "{err}");
    })
    .await;
}

/// One scripted sequence of calls by two members; every result, rendered.
async fn script<T: TrackerApi>(n1: &T, n2: &T, clock: &ManualClock) -> Vec<String> {
    let mut out = Vec::new();
    let a = Digest::of(b"a");
    let la = layout(4);
    macro_rules! rec {
        ($e:expr) => {
            out.push(format!("{:?}", $e.await))
        };
    }
    rec!(n1.lease(LeaseRequest::new(node("node-1"), a, la, 2, 0).unwrap()));
    rec!(n1.lookup(&node("node-1"), &a, None));
    rec!(n1.announce(announce("node-1", 4901, vec![])));
    let mut have = Bitfield::new(4).unwrap();
    have.set(3).unwrap();
    rec!(n2.announce(announce(
        "node-2",
        4902,
        vec![BlobHave::new(a, la, have, false).unwrap()]
    )));
    clock.advance(100);
    rec!(n1.lease(LeaseRequest::new(node("node-1"), a, la, 2, 0).unwrap()));
    rec!(n2.lease(LeaseRequest::new(node("node-2"), a, la, 4, 0).unwrap()));
    clock.advance(100);
    rec!(n1.publish_hashes(
        PublishHashes::new(
            node("node-1"),
            a,
            vec![(0, truth(&a, 0)), (1, truth(&a, 1)), (9, truth(&a, 9))]
        )
        .unwrap()
    ));
    rec!(n2.publish_hashes(
        PublishHashes::new(node("node-2"), a, vec![(0, ChunkHash::of(b"bad"))]).unwrap()
    ));
    rec!(n2.lookup(&node("node-2"), &a, None));
    // Only what was published after the first accepted hash.
    rec!(n2.lookup(&node("node-2"), &a, Some(HashCursor { epoch: 1, seq: 1 })));
    rec!(n1.announce(announce(
        "node-1",
        4901,
        vec![BlobHave::complete(a, layout(5))]
    )));
    clock.advance(11_000);
    rec!(n1.lookup(&node("node-1"), &a, None));
    rec!(n2.report(Report::BadChunk {
        node: node("node-2"),
        blob: a,
        peer: node("node-1"),
        chunk: 0
    }));
    rec!(n2.report(Report::DigestMismatch {
        node: node("node-2"),
        blob: a,
        epoch: 1
    }));
    rec!(n1.lookup(&node("node-1"), &a, None));
    clock.advance(40_000);
    rec!(n1.lease(LeaseRequest::new(node("node-1"), a, la, 1, 0).unwrap()));
    out
}

#[tokio::test]
async fn embedded_and_https_give_identical_replies() {
    bounded(async {
        let clock = Arc::new(ManualClock::new(0));
        let tracker = Arc::new(RwLock::new(Tracker::new(TrackerConfig::default()).unwrap()));
        let e = Embedded::new(tracker, clock.clone());
        let embedded = script(&e, &e, &clock).await;

        let cluster = Cluster::new();
        let t = Running::start(&cluster).await;
        let n1 = cluster.client("node-1", &[t.url.as_str()]);
        let n2 = cluster.client("node-2", &[t.url.as_str()]);
        let https = script(&n1, &n2, &t.clock).await;

        assert_eq!(embedded.len(), https.len());
        for (i, (a, b)) in embedded.iter().zip(&https).enumerate() {
            assert_eq!(a, b, "call {i} differs");
        }
        // The script covers refusals and successes alike.
        assert!(embedded[0].contains("NotAMember"), "{}", embedded[0]);
        assert!(embedded.iter().any(|r| r.contains("LayoutConflict")));
        assert!(embedded.iter().any(|r| r.contains("OutOfRange")));
        assert!(embedded
            .iter()
            .any(|r| r.contains(&format!("{:?}", PublishRejection::NotLeaseHolder))));
        assert!(embedded.iter().filter(|r| r.starts_with("Ok(")).count() >= 8);
    })
    .await;
}
