//! Checks the harness itself against the real tools, with no Shoal involved.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use shoal_tests::containerd::{dead_server_url, HostsDir};
use shoal_tests::util::sha256_digest;
use shoal_tests::{
    fresh_seed, http, random_blob, skopeo, Containerd, Registry, RegistryOpts, TestImage,
    ThrottleProxy, MIB,
};

/// docker-registry + skopeo push + containerd pulling straight from the registry: the
/// unpacked files of both platforms equal the generated ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_selfcheck() {
    let image = TestImage::generate(&[2 * MIB, 300 * 1024, 1000], fresh_seed()).unwrap();
    let registry = Registry::start().await.unwrap();
    skopeo::push_image(&image, &registry, "selfcheck/app")
        .await
        .unwrap();

    // The registry serves the layer bytes as generated.
    let layer = &image.platform("amd64").layers[0];
    let r = registry
        .request(
            Method::GET,
            &format!("/v2/selfcheck/app/blobs/{}", layer.digest),
            &[],
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, image.blob(&layer.digest).unwrap());

    let ctrd = Containerd::start().await.unwrap();
    let hosts = HostsDir::direct(&registry.addr()).unwrap();
    let image_ref = format!("{}/selfcheck/app:{}", registry.addr(), image.tag);
    ctrd.pull(&image_ref, hosts.path(), true).await.unwrap();

    let unpacked = ctrd.unpacked_files().unwrap();
    let expected = image.expected_files(None);
    assert_eq!(expected.len(), 12, "2 platforms x 3 layers x 2 files");
    for (path, sha) in &expected {
        assert_eq!(unpacked.get(path), Some(sha), "unpacked {path}");
    }
    let content = ctrd.content_digests().await.unwrap();
    for d in image.all_digests() {
        assert!(content.contains(&d), "content store lacks {d}: {content:?}");
    }
}

/// The mirror form of hosts.toml: containerd pulls through a mirror (here a ThrottleProxy in
/// front of the registry) with a dead `server`, so the pull can only have used the mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_selfcheck_containerd_uses_the_mirror_in_hosts_toml() {
    let image = TestImage::generate_single(&[MIB], fresh_seed()).unwrap();
    let registry = Registry::start().await.unwrap();
    skopeo::push_image(&image, &registry, "mirrored")
        .await
        .unwrap();
    let proxy = ThrottleProxy::start(&registry.addr()).unwrap();
    let hosts =
        HostsDir::mirror(&registry.addr(), &proxy.addr(), &dead_server_url().unwrap()).unwrap();
    let ctrd = Containerd::start().await.unwrap();
    ctrd.pull(
        &format!("{}/mirrored:latest", registry.addr()),
        hosts.path(),
        false,
    )
    .await
    .unwrap();
    assert!(
        proxy.bytes_down() >= image.layer_bytes("amd64"),
        "proxy saw {} bytes",
        proxy.bytes_down()
    );
    // containerd names the registry it means in `ns` on every request sent to a mirror,
    // percent-encoded (`ns=127.0.0.1%3APORT`).
    let log = registry.log();
    let ns = format!("ns={}", registry.addr().replace(':', "%3A"));
    assert!(
        log.contains(&format!("/mirrored/manifests/latest?{ns}")),
        "no ns param in:\n{log}"
    );
    assert!(
        log.contains(&format!(
            "/mirrored/blobs/{}?{ns}",
            image.platforms[0].layers[0].digest
        )),
        "{log}"
    );
    let unpacked = ctrd.unpacked_files().unwrap();
    for (path, sha) in image.expected_files(None) {
        assert_eq!(unpacked.get(&path), Some(&sha), "unpacked {path}");
    }
}

/// htpasswd auth: anonymous access is refused, skopeo pushes with credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_selfcheck_basic_auth_registry() {
    let registry = Registry::start_with(RegistryOpts::basic_auth("alice", "s3cret"))
        .await
        .unwrap();
    let r = http::get(&format!("{}/v2/", registry.url()), &[])
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        r.header("www-authenticate")
            .unwrap_or("")
            .starts_with("Basic"),
        "{:?}",
        r.headers
    );
    let image = TestImage::generate_single(&[4096], fresh_seed()).unwrap();
    skopeo::push_image(&image, &registry, "private/app")
        .await
        .unwrap();
    let (blob, digest) = random_blob(1000, fresh_seed());
    assert_eq!(
        registry.push_blob("private/app", &blob).await.unwrap(),
        digest
    );
    let r = http::get(
        &format!("{}/v2/private/app/blobs/{digest}", registry.url()),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

/// Corrupting the `data` file makes the registry serve wrong bytes of the same length, and the
/// ThrottleProxy counts and rate-limits what it forwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_selfcheck_corruption_and_throttle_proxy() {
    let registry = Registry::start().await.unwrap();
    let (blob, digest) = random_blob(4 * MIB, fresh_seed());
    registry.push_blob("corrupt/me", &blob).await.unwrap();
    assert!(registry.blob_data_path(&digest).is_file());

    let proxy = ThrottleProxy::start(&registry.addr()).unwrap();
    let url = format!("http://{}/v2/corrupt/me/blobs/{digest}", proxy.addr());
    let body = http::get_blob_checked(&url, &digest, blob.len() as u64)
        .await
        .unwrap();
    assert_eq!(body, blob);
    let first = proxy.bytes_down();
    assert!(
        first >= blob.len() as u64 && first < blob.len() as u64 + 4096,
        "proxy counted {first}"
    );

    let original = registry.corrupt_blob(&digest).unwrap();
    assert_eq!(original, blob);
    let r = http::get(&url, &[]).await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), blob.len());
    assert_ne!(
        sha256_digest(&r.body),
        digest,
        "the origin now serves wrong bytes"
    );
    registry.restore_blob(&digest, &original).unwrap();

    proxy.set_rate(Some(8 * MIB as u64));
    let t = Instant::now();
    http::get_blob_checked(&url, &digest, blob.len() as u64)
        .await
        .unwrap();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(400),
        "4 MiB at 8 MiB/s took only {took:?}"
    );
    assert!(
        took <= Duration::from_secs(5),
        "4 MiB at 8 MiB/s took {took:?}"
    );
    proxy.set_rate(None);
    assert!(proxy.bytes_down() >= first + 2 * blob.len() as u64);
}
