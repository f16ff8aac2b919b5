//! A blob is served for a repository only if the origin says that repository holds it.

use reqwest::{Method, StatusCode};
use shoal_tests::{fresh_seed, http, random_blob, Stack, MIB};

/// Pulls blob X of repo `a` (now cached), then asks for X under `other` (which the origin
/// either has with different content, or not at all): refused, never 200.
async fn check_refused_under(other: &str, other_exists: bool) {
    let stack = Stack::start().await.unwrap();
    let (x, x_digest) = random_blob(2 * MIB, fresh_seed());
    stack.push_blob("a", &x).await.unwrap();
    if other_exists {
        let (y, _) = random_blob(MIB, fresh_seed());
        stack.push_blob(other, &y).await.unwrap();
    }
    // The origin itself refuses X under `other`.
    let direct = stack
        .origin
        .registry
        .request(
            Method::HEAD,
            &format!("/v2/{other}/blobs/{x_digest}"),
            &[],
            None,
        )
        .await
        .unwrap();
    assert_eq!(direct.status, StatusCode::NOT_FOUND);

    http::get_blob_checked(&stack.blob_url("a", &x_digest), &x_digest, x.len() as u64)
        .await
        .unwrap();
    let url = stack.blob_url(other, &x_digest);
    for method in [Method::HEAD, Method::GET] {
        let r = http::send(&http::client(), method.clone(), &url, &[], None)
            .await
            .unwrap();
        assert_ne!(
            r.status,
            StatusCode::OK,
            "{method} {url}: served a blob of `a` under `{other}`"
        );
        assert!(!r.status.is_success(), "{method} {url}: {}", r.status);
        assert_eq!(
            r.status,
            StatusCode::NOT_FOUND,
            "{method} {url}: the origin said 404"
        );
        assert!(
            r.body.len() < x.len(),
            "{method} {url}: the body holds the blob"
        );
        if method == Method::GET {
            let codes: Vec<_> = r
                .oci_errors()
                .unwrap()
                .into_iter()
                .map(|e| e.code)
                .collect();
            assert!(
                codes
                    .iter()
                    .any(|c| c == "BLOB_UNKNOWN" || c == "NAME_UNKNOWN"),
                "{codes:?}"
            );
        }
    }
    // Range requests too.
    let r = http::get(&url, &[("Range", "bytes=0-99")]).await.unwrap();
    assert!(
        !r.status.is_success(),
        "Range GET under `{other}`: {}",
        r.status
    );
    // And `a` still works, from the cache.
    http::get_blob_checked(&stack.blob_url("a", &x_digest), &x_digest, x.len() as u64)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_blob_of_repo_a_is_refused_under_repo_b_holding_other_content() {
    check_refused_under("b", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_blob_of_repo_a_is_refused_under_a_repo_the_origin_does_not_have() {
    check_refused_under("nobody/here", false).await;
}

/// A partial blob left by a crash while repo `a` was fetching it is not
/// handed to repo `b` (which the origin does not let have it) after the
/// restart: the request is refused before a single byte goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_of_one_repository_is_not_served_to_another_after_a_crash() {
    let mut stack = Stack::start().await.unwrap();
    let size = 32 * MIB as u64;
    let (x, digest) = random_blob(size as usize, fresh_seed());
    stack.push_blob("a", &x).await.unwrap();
    let (y, _) = random_blob(MIB, fresh_seed());
    stack.push_blob("b", &y).await.unwrap();
    stack.origin.proxy.set_rate(Some(16 * MIB as u64));
    let reader = {
        let url = stack.blob_url("a", &digest);
        tokio::spawn(async move { http::get_hashed(&http::client(), &url, &[]).await })
    };
    // Let a good part arrive and be checkpointed, then crash.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    stack.shoald.kill9();
    let _ = reader.await;
    stack.origin.proxy.set_rate(None);
    stack.shoald.restart().await.unwrap();
    let r = http::get(&stack.blob_url("b", &digest), &[]).await.unwrap();
    assert_ne!(
        r.status,
        StatusCode::OK,
        "repo b got a partial fetched for repo a"
    );
    assert!(
        r.body.len() < 4096,
        "repo b received {} bytes",
        r.body.len()
    );
    r.expect_oci_error(404, "BLOB_UNKNOWN").unwrap();
}
