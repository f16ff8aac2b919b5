//! Many clients asking for the same cold blob at once cost the origin one copy.

use shoal_tests::{fresh_seed, http, random_blob, Stack, MIB};

/// 20 concurrent GETs of one cold 32 MiB blob: every body is complete and correct, and the
/// origin sent at most 1.05 copies (counted by the proxy and by shoald's own metric).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_gets_of_a_cold_blob_fetch_it_from_the_origin_about_once() {
    let stack = Stack::start().await.unwrap();
    let size = 32 * MIB as u64;
    let (blob, digest) = random_blob(size as usize, fresh_seed());
    stack.push_blob("big/blob", &blob).await.unwrap();
    drop(blob);
    let url = stack.blob_url("big/blob", &digest);

    let mut tasks = Vec::new();
    for _ in 0..20 {
        let url = url.clone();
        // Each request on its own client: 20 separate connections.
        tasks.push(tokio::spawn(async move {
            http::get_hashed(&http::client(), &url, &[]).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("request {i}: {e:#}"));
        r.expect_complete(&digest, size)
            .unwrap_or_else(|e| panic!("request {i}: {e:#}"));
        if let Some(len) = r.headers.get("content-length") {
            assert_eq!(
                len.to_str().unwrap(),
                size.to_string(),
                "request {i}: Content-Length"
            );
        }
    }

    let limit = size as f64 * 1.05;
    let egress = stack.origin.egress() as f64;
    assert!(
        egress >= size as f64,
        "origin sent only {egress} bytes for a {size}-byte blob"
    );
    assert!(
        egress <= limit,
        "origin sent {egress} bytes (> 1.05 x {size}) for 20 concurrent requests"
    );
    let metric = stack.shoald.origin_blob_bytes().await.unwrap();
    assert!(
        metric >= size as f64 && metric <= limit,
        "shoal_origin_bytes_total{{kind=\"blob\"}} = {metric}"
    );
    let served = stack
        .shoald
        .metric("shoal_client_bytes_served_total", &[])
        .await
        .unwrap();
    assert!(
        served >= 20.0 * size as f64,
        "shoal_client_bytes_served_total = {served}"
    );
    stack.shoald.wait_idle().await.unwrap();
}
