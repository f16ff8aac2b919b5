//! An origin that serves wrong bytes: the client never gets a complete wrong blob, and nothing
//! wrong is cached.

use std::time::Duration;

use reqwest::StatusCode;
use shoal_tests::{fresh_seed, http, random_blob, Stack, MIB};

const REJECTED: &str = "shoal_chunks_rejected_total";

/// The blob's `data` file at the registry is corrupted (same length, flipped bytes) before any
/// pull: shoald cuts the response short, counts a rejected origin chunk, and caches nothing:
/// once the file is restored, a GET succeeds and goes to the origin again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_origin_blob_is_cut_short_counted_as_rejected_and_not_cached() {
    let stack = Stack::start().await.unwrap();
    let size = 8 * MIB as u64;
    let (blob, digest) = random_blob(size as usize, fresh_seed());
    stack.push_blob("corrupt/app", &blob).await.unwrap();
    let original = stack.origin.registry.corrupt_blob(&digest).unwrap();
    let url = stack.blob_url("corrupt/app", &digest);
    let rejected0 = stack
        .shoald
        .metric(REJECTED, &[("source", "origin")])
        .await
        .unwrap();

    for attempt in 0..2 {
        let r = http::get_hashed(&http::client(), &url, &[]).await.unwrap();
        assert_ne!(
            r.digest, digest,
            "attempt {attempt}: got the right bytes from a corrupt origin?"
        );
        if r.status.is_success() {
            // Headers went out before the digest could be checked: the body must be cut short,
            // never complete at the advertised length.
            assert!(
                r.error.is_some(),
                "attempt {attempt}: body of {} bytes ended cleanly (status {})",
                r.len,
                r.status
            );
            assert!(
                r.len < size,
                "attempt {attempt}: client received all {size} bytes of a wrong blob"
            );
        } else {
            assert!(
                r.status.is_server_error(),
                "attempt {attempt}: unexpected status {}",
                r.status
            );
        }
        stack.shoald.wait_idle().await.unwrap();
    }
    stack
        .shoald
        .wait_metric(
            REJECTED,
            &[("source", "origin")],
            Duration::from_secs(10),
            |v| v > rejected0,
        )
        .await
        .unwrap();

    stack
        .origin
        .registry
        .restore_blob(&digest, &original)
        .unwrap();
    let egress_before = stack.origin.egress();
    let origin_bytes_before = stack.shoald.origin_blob_bytes().await.unwrap();
    let r = http::get_hashed(&http::client(), &url, &[]).await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    r.expect_complete(&digest, size).unwrap();
    assert!(
        stack.origin.egress() > egress_before,
        "the restored blob was not fetched from the origin again"
    );
    let origin_bytes_after = stack.shoald.origin_blob_bytes().await.unwrap();
    assert!(
        origin_bytes_after > origin_bytes_before,
        "shoal_origin_bytes_total{{kind=\"blob\"}} did not grow"
    );

    // Now it is complete and verified: served from the cache.
    let egress_cached = stack.origin.egress();
    let body = http::get_blob_checked(&url, &digest, size).await.unwrap();
    assert_eq!(body, blob);
    assert_eq!(
        stack.shoald.origin_blob_bytes().await.unwrap(),
        origin_bytes_after
    );
    assert!(
        stack.origin.egress() - egress_cached < 64 * 1024,
        "a cached blob was fetched again"
    );
}
