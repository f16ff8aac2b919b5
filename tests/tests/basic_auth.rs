//! An origin with htpasswd Basic auth: shoald uses credentials from a docker `config.json`.

use base64::Engine as _;
use reqwest::{Method, StatusCode};
use serde_json::json;
use shoal_tests::http::{self, MANIFEST_ACCEPT};
use shoal_tests::{fresh_seed, skopeo, write_docker_config, RegistryOpts, Stack, TestImage, MIB};

const USER: &str = "puller";
const PASS: &str = "p4ss:w0rd!";
const REPO: &str = "private/app";

/// Starts a Basic-auth origin holding a pushed image, and shoald with `--docker-config` set to
/// the config `make_config(origin_name)` returns.
async fn setup(
    make_config: impl FnOnce(&str) -> serde_json::Value,
) -> (Stack, TestImage, tempfile::TempDir) {
    let image = TestImage::generate_single(&[MIB, 1000], fresh_seed()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stack = Stack::start_with(RegistryOpts::basic_auth(USER, PASS), |origin, opts| {
        let path = write_docker_config(dir.path(), &make_config(&origin.addr())).unwrap();
        opts.docker_config = Some(path);
    })
    .await
    .unwrap();
    skopeo::push_image(&image, &stack.origin.registry, REPO)
        .await
        .unwrap();
    (stack, image, dir)
}

async fn assert_pulls(stack: &Stack, image: &TestImage) {
    let r = http::send(
        &http::client(),
        Method::HEAD,
        &stack.manifest_url(REPO, &image.tag),
        &[("Accept", MANIFEST_ACCEPT)],
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.status, StatusCode::OK, "HEAD manifest by tag");
    assert_eq!(r.header("docker-content-digest"), Some(image.top_digest()));
    let p = &image.platforms[0];
    let r = http::get(
        &stack.manifest_url(REPO, &p.manifest_digest),
        &[("Accept", MANIFEST_ACCEPT)],
    )
    .await
    .unwrap();
    assert_eq!(
        r.status,
        StatusCode::OK,
        "GET manifest by digest: {:?}",
        r.body_text()
    );
    for l in &p.layers {
        let body = http::get_blob_checked(&stack.blob_url(REPO, &l.digest), &l.digest, l.size)
            .await
            .unwrap();
        assert_eq!(body, image.blob(&l.digest).unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_config_auth_field_lets_shoald_pull_from_a_basic_auth_origin() {
    let (stack, image, _dir) = setup(|origin| {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASS}"));
        json!({ "auths": { origin: { "auth": auth } } })
    })
    .await;
    assert_pulls(&stack, &image).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_config_username_and_password_fields_let_shoald_pull_from_a_basic_auth_origin() {
    let (stack, image, _dir) =
        setup(|origin| json!({ "auths": { origin: { "username": USER, "password": PASS } } }))
            .await;
    assert_pulls(&stack, &image).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_config_with_only_a_missing_creds_store_fails_naming_the_helper() {
    let (stack, image, _dir) = setup(|_| json!({ "auths": {}, "credsStore": "desktop" })).await;
    let urls = [
        stack.manifest_url(REPO, &image.tag),
        stack.blob_url(REPO, &image.platforms[0].layers[0].digest),
    ];
    for url in urls {
        let r = http::get(&url, &[("Accept", MANIFEST_ACCEPT)])
            .await
            .unwrap();
        assert!(
            r.status.is_client_error() || r.status.is_server_error(),
            "GET {url}: {}",
            r.status
        );
        let errors = r.oci_errors().unwrap();
        assert!(
            errors
                .iter()
                .any(|e| e.text().contains("docker-credential-desktop")),
            "GET {url}: the error does not name the missing credential helper: {errors:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_credentials_a_basic_auth_origin_is_refused_never_served() {
    let (stack, image, _dir) = setup(|_| json!({ "auths": {} })).await;
    let layer = &image.platforms[0].layers[0];
    for url in [
        stack.manifest_url(REPO, &image.tag),
        stack.blob_url(REPO, &layer.digest),
    ] {
        let r = http::get(&url, &[("Accept", MANIFEST_ACCEPT)])
            .await
            .unwrap();
        assert!(
            r.status == StatusCode::UNAUTHORIZED || r.status == StatusCode::FORBIDDEN,
            "GET {url}: {} {:?}",
            r.status,
            r.body_text()
        );
        let codes: Vec<_> = r
            .oci_errors()
            .unwrap()
            .into_iter()
            .map(|e| e.code)
            .collect();
        assert!(
            codes.iter().any(|c| c == "UNAUTHORIZED" || c == "DENIED"),
            "{codes:?}"
        );
    }
    assert_eq!(stack.shoald.origin_blob_bytes().await.unwrap(), 0.0);
}
