//! `--cache-max-bytes` bounds the store, without breaking a client that reads slowly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use shoal_tests::util::sha256_digest;
use shoal_tests::{fresh_seed, http, random_blob, Stack, MIB};

/// With a quota of 3.5 blobs, six equal blobs are pulled one after another while a client
/// slowly reads the first: after each pull the blob files under the data dir stay within the
/// quota (plus the one blob still being read), and the slow client gets every byte right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_max_bytes_bounds_the_store_while_a_slow_reader_still_gets_its_blob() {
    let layer = 8 * MIB as u64;
    let limit = layer * 7 / 2;
    let stack = Stack::start_with(Default::default(), |_, o| o.cache_max_bytes = Some(limit))
        .await
        .unwrap();
    let mut blobs = Vec::new();
    for _ in 0..6 {
        let (data, digest) = random_blob(layer as usize, fresh_seed());
        stack.push_blob("quota/app", &data).await.unwrap();
        blobs.push((data, digest));
    }

    // The slow reader: ~512 KiB/s until the other pulls are done, then at full speed.
    let done = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicBool::new(false));
    let reader = {
        let url = stack.blob_url("quota/app", &blobs[0].1);
        let (done, started) = (done.clone(), started.clone());
        tokio::spawn(async move {
            let mut seen = 0usize;
            http::get_streaming(
                &http::client_with_timeout(Duration::from_secs(120)),
                &url,
                &[],
                move |n| {
                    started.store(true, Ordering::SeqCst);
                    let delta = n - seen;
                    seen = n;
                    (!done.load(Ordering::SeqCst))
                        .then(|| Duration::from_secs_f64(delta as f64 / (512.0 * 1024.0)))
                },
            )
            .await
        })
    };
    shoal_tests::util::wait_for(
        "the slow reader to get its first bytes",
        Duration::from_secs(20),
        Duration::from_millis(20),
        || {
            let s = started.load(Ordering::SeqCst);
            async move { Ok(s.then_some(())) }
        },
    )
    .await
    .unwrap();

    for (i, (data, digest)) in blobs.iter().enumerate().skip(1) {
        http::get_blob_checked(&stack.blob_url("quota/app", digest), digest, layer)
            .await
            .unwrap();
        let stored = stack.shoald.blob_store_bytes().unwrap();
        assert!(
            stored <= limit + layer,
            "after pulling blob {i}: {stored} bytes of blob files under {}, quota {limit} (+{layer} in flight)",
            stack.shoald.data_dir().join("blobs").display()
        );
        if i == 1 {
            assert!(
                stored >= layer,
                "blob files are not under DATA/blobs ({stored} bytes there)"
            );
        }
        assert_eq!(data.len() as u64, layer);
    }
    assert!(
        !reader.is_finished(),
        "the slow reader finished early: the test did not hold it open"
    );
    done.store(true, Ordering::SeqCst);
    let slow = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("slow reader hung")
        .unwrap()
        .unwrap();
    assert_eq!(slow.status, StatusCode::OK);
    assert!(
        slow.error.is_none(),
        "slow reader: {:?} after {} bytes",
        slow.error,
        slow.body.len()
    );
    assert_eq!(slow.body.len() as u64, layer);
    assert_eq!(
        sha256_digest(&slow.body),
        blobs[0].1,
        "the slow reader got wrong bytes"
    );

    // With nobody reading any more, one more pull leaves the store within the quota.
    stack.shoald.wait_idle().await.unwrap();
    for (_, digest) in blobs.iter().take(2) {
        http::get_blob_checked(&stack.blob_url("quota/app", digest), digest, layer)
            .await
            .unwrap();
    }
    stack.shoald.wait_idle().await.unwrap();
    let stored = stack.shoald.blob_store_bytes().unwrap();
    assert!(
        stored <= limit,
        "idle store holds {stored} bytes of blob files, quota {limit}"
    );
}
