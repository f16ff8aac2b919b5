//! The origin client against in-process servers: redirects, retries, error
//! mapping, ranged blob downloads, manifests and the concurrency limit.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use common::*;
use futures_util::StreamExt as _;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use shoal_proto::media::{MANIFEST_TYPES, MAX_MANIFEST_BYTES, OCI_MANIFEST};
use shoal_proto::{Digest, ErrorCode, Reference, RepoName};
use shoal_registry_shim::client::{Credentials, OriginClient, OriginError, RetryPolicy};

fn repo(s: &str) -> RepoName {
    s.parse().unwrap()
}

fn blob_data() -> Vec<u8> {
    (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

/// Serves `data` for any GET, honouring `Range: bytes=N-` when `ranges`.
fn serve_data(req: &Seen, data: &[u8], ranges: bool) -> http::Response<Body> {
    let range = req.header("range").and_then(|r| {
        r.strip_prefix("bytes=")?
            .strip_suffix('-')?
            .parse::<usize>()
            .ok()
    });
    match range {
        Some(from) if ranges => {
            let cr = format!("bytes {from}-{}/{}", data.len() - 1, data.len());
            reply(206, &[("content-range", &cr)], data[from..].to_vec())
        }
        _ => reply(200, &[], data.to_vec()),
    }
}

#[tokio::test]
async fn redirect_to_another_host_drops_authorization_and_keeps_range() {
    bounded(30, async {
        let data = blob_data();
        let d2 = data.clone();
        // The object store, reached as `localhost`: another host.
        let store = serve(move |req| {
            let data = d2.clone();
            async move { serve_data(&req, &data, true) }
        })
        .await;
        let store_port = store.port();
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("alice:pw")
        );
        let a2 = auth.clone();
        let registry = serve(move |req| {
            let auth = a2.clone();
            async move {
                if req.header("authorization") != Some(auth) {
                    return reply(401, &[("www-authenticate", "Basic realm=\"r\"")], "");
                }
                if req.path.ends_with("/final") {
                    return reply(200, &[], "same-origin");
                }
                if req.path.contains("/blobs/") {
                    // Relative first, then off to the store.
                    return reply(307, &[("location", "/v2/hop")], "");
                }
                let loc =
                    format!("http://localhost:{store_port}/bucket/blob?X-Amz-Signature=secret");
                reply(302, &[("location", &loc)], "")
            }
        })
        .await;
        let reg = registry.registry();
        let mut cfg = test_config();
        cfg.credentials = Credentials::none().with_basic(&reg, "alice", "pw");
        let client = OriginClient::new(cfg).unwrap();
        let digest = Digest::of(&data);

        let mut s = client
            .get_blob(&reg, &repo("a/b"), &digest, 100)
            .await
            .unwrap();
        assert_eq!(s.offset(), 100);
        assert_eq!(s.total_size(), Some(data.len() as u64));
        assert_eq!(read_all(&mut s).await.unwrap(), &data[100..]);

        let hops = registry.seen();
        // 401, then the authorised blob request (307), then /v2/hop (302).
        assert_eq!(hops.len(), 3, "{hops:#?}");
        assert_eq!(
            hops[1].header("authorization").as_deref(),
            Some(auth.as_str())
        );
        assert_eq!(hops[2].path, "/v2/hop");
        assert_eq!(
            hops[2].header("authorization").as_deref(),
            Some(auth.as_str()),
            "a relative redirect stays on the origin"
        );
        assert!(hops
            .iter()
            .all(|h| h.header("range").as_deref() == Some("bytes=100-")));
        let far = store.seen();
        assert_eq!(far.len(), 1);
        assert_eq!(far[0].host(), format!("localhost:{store_port}"));
        assert_eq!(
            far[0].header("authorization"),
            None,
            "credentials leaked to another host"
        );
        assert_eq!(far[0].header("range").as_deref(), Some("bytes=100-"));
        assert_eq!(far[0].query, "X-Amz-Signature=secret");
        drop(s);
    })
    .await;
}

#[tokio::test]
async fn redirect_limits_and_plain_http_policy() {
    bounded(30, async {
        let looping = serve(|req| async move {
            let n: u32 = req.query.parse().unwrap_or(0);
            reply(302, &[("location", &format!("/loop?{}", n + 1))], "")
        })
        .await;
        let client = OriginClient::new(test_config()).unwrap();
        let err = client
            .head_blob(&looping.registry(), &repo("a/b"), &Digest::of(b"x"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, OriginError::Protocol { message, .. } if message.contains("redirects")),
            "{err:?}"
        );
        assert_eq!(looping.seen().len(), 6, "first request plus 5 redirects");

        // Plain HTTP only to configured hosts, redirect targets included.
        let store = serve(|_| async { reply(200, &[], "x") }).await;
        let port = store.port();
        let registry = serve(move |_| async move {
            reply(307, &[("location", &format!("http://localhost:{port}/b"))], "")
        })
        .await;
        let mut cfg = test_config();
        cfg.insecure_hosts = HashSet::from([registry.registry()]);
        let strict = OriginClient::new(cfg).unwrap();
        let err = strict
            .get_blob(&registry.registry(), &repo("a/b"), &Digest::of(b"x"), 0)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, OriginError::PlainHttpRefused { host } if *host == format!("localhost:{port}")),
            "{err:?}"
        );
        assert!(store.seen().is_empty());

        // And a registry not configured insecure is spoken to over https.
        let mut cfg = test_config();
        cfg.insecure_hosts.clear();
        cfg.retry.max_attempts = 1;
        let https_only = OriginClient::new(cfg).unwrap();
        let err = https_only
            .head_blob(&store.registry(), &repo("a/b"), &Digest::of(b"x"))
            .await
            .unwrap_err();
        assert!(matches!(err, OriginError::Unavailable { .. }), "{err:?}");
        assert!(store.seen().is_empty(), "a TLS hello is no HTTP request");
    })
    .await;
}

#[tokio::test]
async fn retries_503_then_succeeds_and_gives_up_after_max_attempts() {
    bounded(30, async {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let flaky = serve(move |_| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    reply(503, &[], oci_error("UNAVAILABLE", "try later"))
                } else {
                    reply(200, &[("content-length", "42")], "")
                }
            }
        })
        .await;
        let client = OriginClient::new(test_config()).unwrap();
        let d = Digest::of(b"x");
        assert_eq!(client.head_blob(&flaky.registry(), &repo("a/b"), &d).await.unwrap(), 42);
        assert_eq!(flaky.seen().len(), 3);

        let down = serve(|_| async { reply(502, &[], "bad gateway") }).await;
        let mut cfg = test_config();
        cfg.retry.max_attempts = 3;
        let client = OriginClient::new(cfg).unwrap();
        let err = client
            .get_blob(&down.registry(), &repo("a/b"), &d, 0)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, OriginError::Unavailable { reason, .. } if reason.contains("502") && reason.contains("bad gateway")),
            "{err:?}"
        );
        assert_eq!(err.to_oci().code, ErrorCode::Unavailable);
        assert_eq!(down.seen().len(), 3);

        // Connection refused is retried too, then Unavailable.
        let gone = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let err = client
            .head_blob(&gone.to_string(), &repo("a/b"), &d)
            .await
            .unwrap_err();
        assert!(err.is_transient() && matches!(err, OriginError::Unavailable { .. }), "{err:?}");
    })
    .await;
}

#[tokio::test]
async fn too_many_requests_honours_retry_after() {
    bounded(30, async {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let limited = serve(move |_| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    reply(
                        429,
                        &[("retry-after", "1")],
                        oci_error("TOOMANYREQUESTS", "slow down"),
                    )
                } else {
                    reply(200, &[("content-length", "1")], "")
                }
            }
        })
        .await;
        let client = OriginClient::new(test_config()).unwrap();
        let d = Digest::of(b"x");
        let t0 = Instant::now();
        client
            .head_blob(&limited.registry(), &repo("a/b"), &d)
            .await
            .unwrap();
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_millis(950), "{waited:?}");
        assert!(waited < Duration::from_secs(3), "{waited:?}");
        assert_eq!(limited.seen().len(), 2);

        // Still limited after the retries: TooManyRequests with the hint.
        let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(2));
        let always = serve(move |_| {
            let date = date.clone();
            async move { reply(429, &[("retry-after", &date)], "") }
        })
        .await;
        let mut cfg = test_config();
        cfg.retry = RetryPolicy {
            max_attempts: 2,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(300),
        };
        let client = OriginClient::new(cfg).unwrap();
        let t0 = Instant::now();
        let err = client
            .head_blob(&always.registry(), &repo("a/b"), &d)
            .await
            .unwrap_err();
        let waited = t0.elapsed();
        // The HTTP-date asks for ~2 s; max_delay caps the wait at 300 ms.
        assert!(
            waited >= Duration::from_millis(280) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        match err {
            OriginError::TooManyRequests {
                retry_after: Some(ra),
            } => {
                assert!(
                    ra <= Duration::from_secs(2) && ra >= Duration::from_millis(500),
                    "{ra:?}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(always.seen().len(), 2);
    })
    .await;
}

#[tokio::test]
async fn not_found_keeps_the_origin_code_and_4xx_is_not_retried() {
    bounded(30, async {
        let server = serve(|req| async move {
            if req.path.contains("/blobs/") {
                reply(404, &[], oci_error("BLOB_UNKNOWN", "blob unknown to registry"))
            } else if req.path.starts_with("/v2/gone/") {
                reply(404, &[], oci_error("NAME_UNKNOWN", "repository name not known to registry"))
            } else {
                reply(400, &[], oci_error("MANIFEST_INVALID", "nope"))
            }
        })
        .await;
        let client = OriginClient::new(test_config()).unwrap();
        let reg = server.registry();
        let err = client
            .get_blob(&reg, &repo("a/b"), &Digest::of(b"x"), 0)
            .await
            .unwrap_err();
        match &err {
            OriginError::NotFound { code, message } => {
                assert_eq!(*code, ErrorCode::BlobUnknown);
                assert_eq!(message, "blob unknown to registry");
            }
            other => panic!("{other:?}"),
        }
        let oci = err.to_oci();
        assert_eq!((oci.code, oci.code.status()), (ErrorCode::BlobUnknown, 404));
        assert_eq!(oci.detail.as_deref(), Some("blob unknown to registry"));
        assert_eq!(server.seen().len(), 1, "a 404 is never retried");

        let tag = Reference::Tag("v1".parse().unwrap());
        let err = client.get_manifest(&reg, &repo("gone/x"), &tag).await.unwrap_err();
        assert!(
            matches!(err, OriginError::NotFound { code: ErrorCode::NameUnknown, .. }),
            "{err:?}"
        );
        // HEAD has no body: the kind decides the code.
        let err = client.head_blob(&reg, &repo("a/b"), &Digest::of(b"x")).await.unwrap_err();
        assert!(matches!(err, OriginError::NotFound { code: ErrorCode::BlobUnknown, .. }), "{err:?}");

        let before = server.seen().len();
        let err = client.get_manifest(&reg, &repo("a/b"), &tag).await.unwrap_err();
        assert!(
            matches!(&err, OriginError::Status { status: 400, code: Some(c), .. } if c == "MANIFEST_INVALID"),
            "{err:?}"
        );
        assert_eq!(server.seen().len(), before + 1);
    })
    .await;
}

#[tokio::test]
async fn ranged_blob_requires_206_at_the_right_offset() {
    bounded(30, async {
        let data = blob_data();
        let d = data.clone();
        let server = serve(move |req| {
            let data = d.clone();
            async move {
                if req.path.starts_with("/v2/norange/") {
                    serve_data(&req, &data, false)
                } else if req.path.starts_with("/v2/wrong/") {
                    reply(
                        206,
                        &[("content-range", "bytes 0-9/10000")],
                        data[..10].to_vec(),
                    )
                } else {
                    serve_data(&req, &data, true)
                }
            }
        })
        .await;
        let client = OriginClient::new(test_config()).unwrap();
        let reg = server.registry();
        let digest = Digest::of(&data);

        let mut whole = client
            .get_blob(&reg, &repo("a/b"), &digest, 0)
            .await
            .unwrap();
        assert_eq!((whole.offset(), whole.total_size()), (0, Some(10_000)));
        let got = read_all(&mut whole).await.unwrap();
        assert_eq!(Digest::of(&got), digest);
        assert_eq!(server.seen()[0].header("range"), None);

        let mut tail = client
            .get_blob(&reg, &repo("a/b"), &digest, 9_000)
            .await
            .unwrap();
        assert_eq!(
            server.seen()[1].header("range").as_deref(),
            Some("bytes=9000-")
        );
        assert_eq!(read_all(&mut tail).await.unwrap(), &data[9_000..]);

        let err = client
            .get_blob(&reg, &repo("norange/x"), &digest, 5)
            .await
            .unwrap_err();
        assert!(matches!(err, OriginError::RangeIgnored), "{err:?}");
        let err = client
            .get_blob(&reg, &repo("wrong/x"), &digest, 5)
            .await
            .unwrap_err();
        assert!(matches!(err, OriginError::Protocol { .. }), "{err:?}");
    })
    .await;
}

#[tokio::test]
async fn stalled_body_errors_within_the_idle_timeout() {
    bounded(30, async {
        let server = serve(|_| async {
            let frames = futures_util::stream::iter(vec![Ok::<_, std::io::Error>(Frame::data(
                Bytes::from_static(b"abcd"),
            ))])
            .chain(futures_util::stream::pending());
            http::Response::builder()
                .status(200)
                .header("content-length", "100")
                .body(BodyExt::boxed(StreamBody::new(frames)))
                .unwrap()
        })
        .await;
        let mut cfg = test_config();
        cfg.chunk_idle_timeout = Duration::from_millis(300);
        let client = OriginClient::new(cfg).unwrap();
        let mut s = client
            .get_blob(&server.registry(), &repo("a/b"), &Digest::of(b"x"), 0)
            .await
            .unwrap();
        assert_eq!(s.next_chunk().await.unwrap().unwrap(), &b"abcd"[..]);
        let t0 = Instant::now();
        let err = s.next_chunk().await.unwrap().unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert!(
            matches!(&err, OriginError::Unavailable { reason, .. } if reason.contains("stalled")),
            "{err:?}"
        );
        assert!(s.next_chunk().await.is_none());
        assert_eq!(s.received(), 4);
    })
    .await;
}

const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;

#[tokio::test]
async fn manifests_head_get_and_verification() {
    bounded(60, async {
        let digest = Digest::of(MANIFEST.as_bytes());
        let server = serve(move |req| async move {
            let dcd = digest.to_string();
            let len = MANIFEST.len().to_string();
            let full_headers = [
                ("content-type", OCI_MANIFEST),
                ("docker-content-digest", dcd.as_str()),
                ("content-length", len.as_str()),
            ];
            match (req.method.as_str(), req.path.as_str()) {
                // A HEAD without Docker-Content-Digest: the client must GET.
                ("HEAD", p) if p.starts_with("/v2/nodigest/") => {
                    reply(200, &[("content-type", OCI_MANIFEST), ("content-length", &len)], "")
                }
                ("HEAD", _) => reply(200, &full_headers, ""),
                (_, p) if p.starts_with("/v2/big/") => reply(
                    200,
                    &[("content-type", OCI_MANIFEST)],
                    vec![b' '; MAX_MANIFEST_BYTES as usize + 1],
                ),
                // A generic Content-Type: the body's mediaType wins.
                (_, p) if p.starts_with("/v2/generic/") => {
                    reply(200, &[("content-type", "application/json; charset=utf-8")], MANIFEST)
                }
                _ => reply(200, &full_headers[..1], MANIFEST),
            }
        })
        .await;
        let client = OriginClient::new(test_config()).unwrap();
        let reg = server.registry();
        let tag = Reference::Tag("v1".parse().unwrap());

        let info = client.head_manifest(&reg, &repo("a/b"), &tag).await.unwrap();
        assert_eq!(info.digest, digest);
        assert_eq!(info.size, MANIFEST.len() as u64);
        assert_eq!(info.media_type, OCI_MANIFEST);
        let accept = server.seen()[0].header("accept").unwrap();
        for t in MANIFEST_TYPES {
            assert!(accept.contains(t), "{accept}");
        }

        let m = client.get_manifest(&reg, &repo("a/b"), &tag).await.unwrap();
        assert_eq!((m.digest, m.media_type.as_str()), (digest, OCI_MANIFEST));
        assert_eq!(m.bytes, MANIFEST.as_bytes());
        let by_digest = client
            .get_manifest(&reg, &repo("a/b"), &Reference::Digest(digest))
            .await
            .unwrap();
        assert_eq!(by_digest.digest, digest);
        let server_saw = server.seen();
        assert!(server_saw.iter().all(|s| s.header("accept").is_some()));

        let before = server.seen().len();
        let info = client.head_manifest(&reg, &repo("nodigest/x"), &tag).await.unwrap();
        assert_eq!((info.digest, info.size), (digest, MANIFEST.len() as u64));
        let methods: Vec<_> = server.seen()[before..].iter().map(|s| s.method.to_string()).collect();
        assert_eq!(methods, ["HEAD", "GET"]);

        let other = Digest::of(b"something else");
        let err = client
            .get_manifest(&reg, &repo("a/b"), &Reference::Digest(other))
            .await
            .unwrap_err();
        assert!(
            matches!(err, OriginError::DigestMismatch { expected, actual } if expected == other && actual == digest),
            "{err:?}"
        );
        let err = client
            .head_manifest(&reg, &repo("a/b"), &Reference::Digest(other))
            .await
            .unwrap_err();
        assert!(matches!(err, OriginError::DigestMismatch { .. }), "{err:?}");

        let err = client.get_manifest(&reg, &repo("big/x"), &tag).await.unwrap_err();
        assert!(matches!(err, OriginError::TooLarge { .. }), "{err:?}");
        assert_eq!(err.to_oci().code, ErrorCode::ManifestInvalid);

        let g = client.get_manifest(&reg, &repo("generic/x"), &tag).await.unwrap();
        assert_eq!(g.media_type, OCI_MANIFEST);
    })
    .await;
}

#[tokio::test]
async fn per_origin_concurrency_limit_holds_for_requests_and_bodies() {
    bounded(60, async {
        let active = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (a, p) = (active.clone(), peak.clone());
        let server = serve(move |_| {
            let (a, p) = (a.clone(), p.clone());
            async move {
                let now = a.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                a.fetch_sub(1, Ordering::SeqCst);
                reply(200, &[], vec![7u8; 1000])
            }
        })
        .await;
        let mut cfg = test_config();
        cfg.max_concurrency_per_origin = 3;
        let client = OriginClient::new(cfg).unwrap();
        let streams = Arc::new(AtomicUsize::new(0));
        let stream_peak = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..12u8 {
            let (client, reg) = (client.clone(), server.registry());
            let (streams, stream_peak) = (streams.clone(), stream_peak.clone());
            tasks.push(tokio::spawn(async move {
                let mut s = client
                    .get_blob(&reg, &repo("a/b"), &Digest::of(&[i]), 0)
                    .await
                    .unwrap();
                let now = streams.fetch_add(1, Ordering::SeqCst) + 1;
                stream_peak.fetch_max(now, Ordering::SeqCst);
                // Hold the body a while: the permit lives in the stream.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let n = read_all(&mut s).await.unwrap().len();
                streams.fetch_sub(1, Ordering::SeqCst);
                drop(s);
                n
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 1000);
        }
        assert_eq!(server.seen().len(), 12);
        let (p, sp) = (
            peak.load(Ordering::SeqCst),
            stream_peak.load(Ordering::SeqCst),
        );
        assert!(p <= 3 && sp <= 3, "server peak {p}, open streams peak {sp}");
        assert_eq!(p, 3, "the limit should be reached");

        // Another origin has its own limit.
        let other = serve(|_| async { reply(200, &[("content-length", "1")], "") }).await;
        let held: Vec<_> = futures_util::future::join_all((0..3u8).map(|i| {
            let (c, reg) = (client.clone(), server.registry());
            async move {
                c.get_blob(&reg, &repo("a/b"), &Digest::of(&[i]), 0)
                    .await
                    .unwrap()
            }
        }))
        .await;
        client
            .head_blob(&other.registry(), &repo("a/b"), &Digest::of(b"x"))
            .await
            .unwrap();
        drop(held);
    })
    .await;
}
