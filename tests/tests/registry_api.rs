//! The OCI pull API of shoald's registry endpoint: HEAD, Range, and error bodies.

use reqwest::{Method, StatusCode};
use shoal_tests::http::{self, parse_content_range, MANIFEST_ACCEPT};
use shoal_tests::util::sha256_digest;
use shoal_tests::{fresh_seed, random_blob, skopeo, Stack, TestImage, MIB};

const REPO: &str = "api/repo";

/// A stack with one 1 MiB blob (plus a few bytes, so sizes are not round) in `api/repo`.
async fn setup() -> (Stack, Vec<u8>, String) {
    let stack = Stack::start().await.unwrap();
    let (blob, digest) = random_blob(MIB + 4321, fresh_seed());
    stack.push_blob(REPO, &blob).await.unwrap();
    (stack, blob, digest)
}

async fn req(method: Method, url: &str, headers: &[(&str, &str)]) -> http::Response {
    http::send(&http::client(), method, url, headers, None)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_v2_root_answers_200_with_distribution_api_version_header() {
    let stack = Stack::start().await.unwrap();
    for url in [
        format!("{}/v2/", stack.shoald.registry_url()),
        stack.url("/v2/"),
    ] {
        let r = req(Method::GET, &url, &[]).await;
        assert_eq!(r.status, StatusCode::OK, "GET {url}: {:?}", r.body_text());
        assert_eq!(
            r.header("docker-distribution-api-version"),
            Some("registry/2.0"),
            "GET {url}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_blob_returns_200_with_content_length_and_digest_and_no_body() {
    let (stack, blob, digest) = setup().await;
    let url = stack.blob_url(REPO, &digest);
    // Cold (nothing cached yet), then after a full GET.
    for round in ["cold", "cached"] {
        let r = req(Method::HEAD, &url, &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{round}");
        assert_eq!(
            r.header("content-length"),
            Some(blob.len().to_string().as_str()),
            "{round}"
        );
        assert_eq!(
            r.header("docker-content-digest"),
            Some(digest.as_str()),
            "{round}"
        );
        assert!(r.body.is_empty(), "{round}: HEAD returned a body");
        if round == "cold" {
            http::get_blob_checked(&url, &digest, blob.len() as u64)
                .await
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_requests_return_206_with_content_range_and_the_exact_bytes() {
    let (stack, blob, digest) = setup().await;
    let size = blob.len() as u64;
    let url = stack.blob_url(REPO, &digest);
    // Cold, then cached after a full GET.
    for round in ["cold", "cached"] {
        let r = req(Method::GET, &url, &[("Range", "bytes=10-99")]).await;
        assert_eq!(
            r.status,
            StatusCode::PARTIAL_CONTENT,
            "{round}: {:?}",
            r.body_text()
        );
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes 10-99/{size}").as_str()),
            "{round}"
        );
        assert_eq!(r.body, &blob[10..100], "{round}: bytes 10-99");

        let r = req(Method::GET, &url, &[("Range", "bytes=-100")]).await;
        assert_eq!(
            r.status,
            StatusCode::PARTIAL_CONTENT,
            "{round}: suffix range"
        );
        let (a, b, total) =
            parse_content_range(r.require_header("content-range").unwrap()).unwrap();
        assert_eq!(
            (a, b, total),
            (size - 100, size - 1, size),
            "{round}: suffix Content-Range"
        );
        assert_eq!(r.body, &blob[blob.len() - 100..], "{round}: last 100 bytes");

        let from = size - 5000;
        let r = req(Method::GET, &url, &[("Range", &format!("bytes={from}-"))]).await;
        assert_eq!(
            r.status,
            StatusCode::PARTIAL_CONTENT,
            "{round}: open-ended range (containerd resume)"
        );
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {from}-{}/{size}", size - 1).as_str())
        );
        assert_eq!(
            r.body,
            &blob[from as usize..],
            "{round}: open-ended range bytes"
        );

        if round == "cold" {
            http::get_blob_checked(&url, &digest, size).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsatisfiable_range_returns_416() {
    let (stack, blob, digest) = setup().await;
    let size = blob.len() as u64;
    let url = stack.blob_url(REPO, &digest);
    for range in [
        format!("bytes={size}-"),
        format!("bytes={}-{}", size + 10, size + 20),
    ] {
        let r = req(Method::GET, &url, &[("Range", &range)]).await;
        assert_eq!(
            r.status,
            StatusCode::RANGE_NOT_SATISFIABLE,
            "Range: {range}: {:?}",
            r.body_text()
        );
        if let Some(cr) = r.header("content-range") {
            assert_eq!(cr, format!("bytes */{size}"), "Range: {range}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_repository_names_are_400_name_invalid() {
    let (stack, _blob, digest) = setup().await;
    for name in ["UPPER", "a//b", "api/-repo", "api/repo-"] {
        for path in [
            format!("/v2/{name}/blobs/{digest}"),
            format!("/v2/{name}/manifests/latest"),
        ] {
            for method in [Method::GET, Method::HEAD] {
                let r = req(method.clone(), &stack.url(&path), &[]).await;
                if method == Method::HEAD {
                    assert_eq!(r.status, StatusCode::BAD_REQUEST, "HEAD {path}");
                } else {
                    r.expect_oci_error(400, "NAME_INVALID")
                        .unwrap_or_else(|e| panic!("GET {path}: {e:#}"));
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_digests_are_400_digest_invalid() {
    let (stack, _blob, digest) = setup().await;
    let short = &digest[..digest.len() - 1];
    for bad in [
        "sha256:xyz",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        short,
        "sha256:ZZZZ",
    ] {
        let path = format!("/v2/{REPO}/blobs/{bad}");
        let r = req(Method::GET, &stack.url(&path), &[]).await;
        r.expect_oci_error(400, "DIGEST_INVALID")
            .unwrap_or_else(|e| panic!("GET {path}: {e:#}"));
        let r = req(Method::HEAD, &stack.url(&path), &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "HEAD {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_blob_is_404_blob_unknown_and_unknown_tag_is_404_manifest_unknown() {
    let (stack, _blob, _digest) = setup().await;
    let missing = sha256_digest(b"never pushed anywhere");
    let r = req(Method::GET, &stack.blob_url(REPO, &missing), &[]).await;
    r.expect_oci_error(404, "BLOB_UNKNOWN").unwrap();
    let r = req(Method::HEAD, &stack.blob_url(REPO, &missing), &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let r = req(
        Method::GET,
        &stack.manifest_url(REPO, "no-such-tag"),
        &[("Accept", MANIFEST_ACCEPT)],
    )
    .await;
    r.expect_oci_error(404, "MANIFEST_UNKNOWN").unwrap();
    let r = req(
        Method::HEAD,
        &stack.manifest_url(REPO, "no-such-tag"),
        &[("Accept", MANIFEST_ACCEPT)],
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = req(
        Method::GET,
        &stack.manifest_url(REPO, &missing),
        &[("Accept", MANIFEST_ACCEPT)],
    )
    .await;
    r.expect_oci_error(404, "MANIFEST_UNKNOWN").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_methods_are_405_unsupported() {
    let (stack, _blob, digest) = setup().await;
    let cases = [
        (Method::POST, format!("/v2/{REPO}/blobs/uploads/")),
        (Method::PUT, format!("/v2/{REPO}/manifests/latest")),
        (
            Method::PUT,
            format!("/v2/{REPO}/blobs/uploads/some-id?digest={digest}"),
        ),
        (Method::PATCH, format!("/v2/{REPO}/blobs/uploads/some-id")),
    ];
    for (method, path) in cases {
        let body = Some(b"{}".to_vec());
        let r = http::send(
            &http::client(),
            method.clone(),
            &stack.url(&path),
            &[("Content-Type", "application/json")],
            body,
        )
        .await
        .unwrap();
        r.expect_oci_error(405, "UNSUPPORTED")
            .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
    }
    // Nothing was written at the origin.
    let r = stack
        .origin
        .registry
        .request(
            Method::GET,
            &format!("/v2/{REPO}/manifests/latest"),
            &[],
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

/// HEAD of a manifest by tag gives what containerd needs to resolve it, exactly as the origin
/// does; GET by tag and by digest give the origin's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_head_by_tag_matches_origin_digest_length_and_type() {
    let stack = Stack::start().await.unwrap();
    let multi = TestImage::generate(&[1000, 2000], fresh_seed()).unwrap();
    let single = TestImage::generate_single(&[3000], fresh_seed()).unwrap();
    skopeo::push_image(&multi, &stack.origin.registry, "m/multi")
        .await
        .unwrap();
    skopeo::push_image(&single, &stack.origin.registry, "m/single")
        .await
        .unwrap();
    let accept = [("Accept", MANIFEST_ACCEPT)];
    for (repo, image) in [("m/multi", &multi), ("m/single", &single)] {
        let origin = stack
            .origin
            .registry
            .head_manifest(repo, &image.tag)
            .await
            .unwrap();
        assert_eq!(origin.status, StatusCode::OK);
        let r = req(Method::HEAD, &stack.manifest_url(repo, &image.tag), &accept).await;
        assert_eq!(r.status, StatusCode::OK, "HEAD {repo}:{}", image.tag);
        for h in ["docker-content-digest", "content-length", "content-type"] {
            assert_eq!(r.header(h), origin.header(h), "{repo}: header {h}");
        }
        assert_eq!(r.header("docker-content-digest"), Some(image.top_digest()));
        assert_eq!(r.header("content-type"), Some(image.top_media_type()));
        assert!(r.body.is_empty());

        let (_, origin_body, _) = stack
            .origin
            .registry
            .get_manifest(repo, &image.tag)
            .await
            .unwrap();
        for reference in [image.tag.as_str(), image.top_digest()] {
            let r = req(Method::GET, &stack.manifest_url(repo, reference), &accept).await;
            assert_eq!(r.status, StatusCode::OK, "GET {repo}:{reference}");
            assert_eq!(r.body, origin_body, "GET {repo}:{reference}");
            assert_eq!(r.header("docker-content-digest"), Some(image.top_digest()));
            assert_eq!(r.header("content-type"), Some(image.top_media_type()));
        }
        for p in &image.platforms {
            let r = req(
                Method::GET,
                &stack.manifest_url(repo, &p.manifest_digest),
                &accept,
            )
            .await;
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(sha256_digest(&r.body), p.manifest_digest);
            assert_eq!(
                r.header("content-length"),
                Some(p.manifest_size.to_string().as_str())
            );
        }
    }
}
