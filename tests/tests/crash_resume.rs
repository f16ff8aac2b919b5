//! `kill -9` in the middle of a blob: after a restart the stored prefix is reused.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use shoal_tests::{fresh_seed, http, random_blob, util, Stack, MIB};

/// With the origin throttled to 20 MiB/s, shoald is SIGKILLed after ~32 MiB of a 96 MiB blob
/// went through. After a restart on the same data dir, a GET returns the full correct blob and
/// the origin sent at most 1.25 copies in total (the stored part was kept and the rest asked for
/// with a Range request). Then a HEAD is fast and another GET costs the origin nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_blob_then_restart_reuses_stored_bytes_and_serves_the_full_blob() {
    let mut stack = Stack::start().await.unwrap();
    let size = 96 * MIB as u64;
    let (blob, digest) = random_blob(size as usize, fresh_seed());
    stack.push_blob("crash/app", &blob).await.unwrap();
    drop(blob);
    let url = stack.blob_url("crash/app", &digest);

    stack.origin.proxy.set_rate(Some(20 * MIB as u64));
    let reader = {
        let url = url.clone();
        tokio::spawn(async move { http::get_hashed(&http::client(), &url, &[]).await })
    };
    let kill_at = 32 * MIB as u64;
    let proxy = stack.origin.proxy.bytes_down_counter();
    util::wait_for(
        "32 MiB to leave the origin",
        Duration::from_secs(20),
        Duration::from_millis(10),
        || {
            let n = proxy.load(std::sync::atomic::Ordering::SeqCst);
            async move { Ok((n >= kill_at).then_some(())) }
        },
    )
    .await
    .unwrap();
    stack.shoald.kill9();
    let egress_at_kill = stack.origin.egress();

    // The client of the killed daemon must not have received a complete blob.
    // (An `Err` means the request itself failed: fine too.)
    let ended = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("reader did not end after kill -9");
    if let Ok(r) = ended.unwrap() {
        assert!(
            r.error.is_some() && r.len < size,
            "got {} bytes, error {:?} from a killed daemon",
            r.len,
            r.error
        );
    }

    stack.origin.proxy.set_rate(None);
    stack.shoald.restart().await.unwrap();
    let r = http::get_hashed(&http::client(), &url, &[]).await.unwrap();
    r.expect_complete(&digest, size).unwrap();

    let total = stack.origin.egress();
    let after_restart = total - egress_at_kill;
    assert!(
        total as f64 <= 1.25 * size as f64,
        "origin sent {total} bytes in total ({egress_at_kill} before the kill, {after_restart} after) for a {size}-byte blob: \
         the bytes stored before the crash were not reused"
    );
    let metric = stack.shoald.origin_blob_bytes().await.unwrap();
    assert!(
        metric < size as f64,
        "after the restart shoald fetched {metric} blob bytes: the whole blob again"
    );

    stack.shoald.wait_idle().await.unwrap();
    let t = Instant::now();
    let head = http::send(&http::client(), Method::HEAD, &url, &[], None)
        .await
        .unwrap();
    let took = t.elapsed();
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(
        head.header("content-length"),
        Some(size.to_string().as_str())
    );
    assert_eq!(head.header("docker-content-digest"), Some(digest.as_str()));
    assert!(
        took < Duration::from_secs(1),
        "HEAD of a complete blob took {took:?}"
    );

    let egress = stack.origin.egress();
    let r = http::get_hashed(&http::client(), &url, &[]).await.unwrap();
    r.expect_complete(&digest, size).unwrap();
    assert_eq!(
        stack.shoald.origin_blob_bytes().await.unwrap(),
        metric,
        "a complete blob was fetched again"
    );
    assert!(
        stack.origin.egress() - egress < 64 * 1024,
        "the origin sent blob bytes for a complete blob"
    );
}
