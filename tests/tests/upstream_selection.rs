//! Which origin a request goes to: `?ns=`, a host as first path component, else the default;
//! origins that are not allowed are denied.

use reqwest::{Method, StatusCode};
use shoal_tests::fixture::encode_ns;
use shoal_tests::http::{self, MANIFEST_ACCEPT};
use shoal_tests::{fresh_seed, skopeo, Registry, Shoald, ShoaldOpts, TestImage, ThrottleProxy};

const REPO: &str = "sel/app";

/// Two origins holding different images under the same `sel/app:latest`; shoald may use both,
/// the first is its default.
struct Setup {
    r1: Registry,
    r2: Registry,
    a: TestImage,
    b: TestImage,
    shoald: Shoald,
}

async fn setup() -> Setup {
    let a = TestImage::generate_single(&[5000], fresh_seed()).unwrap();
    let b = TestImage::generate_single(&[7000], fresh_seed()).unwrap();
    let r1 = Registry::start().await.unwrap();
    let r2 = Registry::start().await.unwrap();
    skopeo::push_image(&a, &r1, REPO).await.unwrap();
    skopeo::push_image(&b, &r2, REPO).await.unwrap();
    let shoald = Shoald::start(ShoaldOpts {
        insecure_upstreams: vec![r1.addr(), r2.addr()],
        default_upstream: Some(r1.addr()),
        ..Default::default()
    })
    .await
    .unwrap();
    Setup {
        r1,
        r2,
        a,
        b,
        shoald,
    }
}

/// HEAD of a manifest at `path` on shoald: the `Docker-Content-Digest` (status must be 200).
async fn resolved_digest(shoald: &Shoald, path: &str) -> String {
    let url = format!("{}{path}", shoald.registry_url());
    let r = http::send(
        &http::client(),
        Method::HEAD,
        &url,
        &[("Accept", MANIFEST_ACCEPT)],
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.status, StatusCode::OK, "HEAD {url}");
    r.require_header("docker-content-digest")
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ns_query_parameter_selects_the_upstream() {
    let s = setup().await;
    let path = format!("/v2/{REPO}/manifests/latest");
    for (ns, image) in [
        (encode_ns(&s.r2.addr()), &s.b),
        (s.r2.addr(), &s.b),
        (encode_ns(&s.r1.addr()), &s.a),
    ] {
        assert_eq!(
            resolved_digest(&s.shoald, &format!("{path}?ns={ns}")).await,
            image.top_digest(),
            "ns={ns}"
        );
    }
    let layer = &s.b.platforms[0].layers[0];
    let url = format!(
        "{}/v2/{REPO}/blobs/{}?ns={}",
        s.shoald.registry_url(),
        layer.digest,
        encode_ns(&s.r2.addr())
    );
    http::get_blob_checked(&url, &layer.digest, layer.size)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_as_first_path_component_selects_the_upstream() {
    let s = setup().await;
    let r2 = s.r2.addr();
    assert_eq!(
        resolved_digest(&s.shoald, &format!("/v2/{r2}/{REPO}/manifests/latest")).await,
        s.b.top_digest()
    );
    let r1 = s.r1.addr();
    assert_eq!(
        resolved_digest(&s.shoald, &format!("/v2/{r1}/{REPO}/manifests/latest")).await,
        s.a.top_digest()
    );
    let layer = &s.b.platforms[0].layers[0];
    let url = format!(
        "{}/v2/{r2}/{REPO}/blobs/{}",
        s.shoald.registry_url(),
        layer.digest
    );
    http::get_blob_checked(&url, &layer.digest, layer.size)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_naming_no_upstream_go_to_the_default_upstream() {
    let s = setup().await;
    assert_eq!(
        resolved_digest(&s.shoald, &format!("/v2/{REPO}/manifests/latest")).await,
        s.a.top_digest()
    );
    let layer = &s.a.platforms[0].layers[0];
    let url = format!(
        "{}/v2/{REPO}/blobs/{}",
        s.shoald.registry_url(),
        layer.digest
    );
    http::get_blob_checked(&url, &layer.digest, layer.size)
        .await
        .unwrap();
    // B's layer is only at r2: not found at the default upstream.
    let other = &s.b.platforms[0].layers[0];
    let r = http::get(
        &format!(
            "{}/v2/{REPO}/blobs/{}",
            s.shoald.registry_url(),
            other.digest
        ),
        &[],
    )
    .await
    .unwrap();
    r.expect_oci_error(404, "BLOB_UNKNOWN").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_that_are_not_allowed_are_403_denied() {
    let s = setup().await;
    // A real origin holding the image, reachable only through a proxy that counts connections.
    let not_allowed = Registry::start().await.unwrap();
    skopeo::push_image(&s.a, &not_allowed, REPO).await.unwrap();
    let proxy = ThrottleProxy::start(&not_allowed.addr()).unwrap();
    let layer = &s.a.platforms[0].layers[0];
    for ns in [
        "example.invalid".to_string(),
        encode_ns(&proxy.addr()),
        proxy.addr(),
    ] {
        for path in [
            format!("/v2/{REPO}/manifests/latest"),
            format!("/v2/{REPO}/blobs/{}", layer.digest),
        ] {
            let url = format!("{}{path}?ns={ns}", s.shoald.registry_url());
            let r = http::get(&url, &[("Accept", MANIFEST_ACCEPT)])
                .await
                .unwrap();
            r.expect_oci_error(403, "DENIED")
                .unwrap_or_else(|e| panic!("GET {url}: {e:#}"));
        }
    }
    assert_eq!(
        proxy.connections(),
        0,
        "shoald contacted an origin it is not allowed to use"
    );
    assert_eq!(s.shoald.origin_blob_bytes().await.unwrap(), 0.0);
}
