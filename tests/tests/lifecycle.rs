//! The daemon's life: blobs the store cannot hold, bad configuration, SIGTERM.

use std::time::Duration;

use shoal_tests::shoald::shoald_binary;
use shoal_tests::{fresh_seed, http, random_blob, Stack, MIB};

/// A blob larger than `--cache-max-bytes` is still served, verified, straight from the origin
/// ("never worse than no Shoal"); nothing of it is kept and the refusal is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_larger_than_the_quota_passes_through_verified_and_unstored() {
    let stack = Stack::start_with(Default::default(), |_, o| {
        o.cache_max_bytes = Some(MIB as u64)
    })
    .await
    .unwrap();
    let size = 6 * MIB as u64;
    let (blob, digest) = random_blob(size as usize, fresh_seed());
    stack.push_blob("big/pass", &blob).await.unwrap();
    let url = stack.blob_url("big/pass", &digest);
    for round in 0..2 {
        let r = http::get_hashed(&http::client(), &url, &[]).await.unwrap();
        r.expect_complete(&digest, size)
            .unwrap_or_else(|e| panic!("round {round}: {e:#}"));
    }
    // A range of it, too, verified against the whole blob.
    let r = http::get(&url, &[("Range", "bytes=100-199")])
        .await
        .unwrap();
    assert_eq!(r.status.as_u16(), 206);
    assert_eq!(r.body, blob[100..200]);
    stack.shoald.wait_idle().await.unwrap();
    assert_eq!(
        stack.shoald.blob_store_bytes().unwrap(),
        0,
        "a blob over the quota was stored"
    );
    let refusals = stack
        .shoald
        .metric("shoal_store_refusals_total", &[])
        .await
        .unwrap();
    assert!(refusals >= 3.0, "shoal_store_refusals_total = {refusals}");
    let origin = stack.shoald.origin_blob_bytes().await.unwrap();
    assert!(
        origin >= 3.0 * size as f64,
        "origin bytes {origin}: pass-through must read whole blobs"
    );
}

/// A corrupt origin blob in pass-through mode is cut short too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_of_a_corrupt_blob_is_cut_short() {
    let stack = Stack::start_with(Default::default(), |_, o| {
        o.cache_max_bytes = Some(MIB as u64)
    })
    .await
    .unwrap();
    let size = 4 * MIB as u64;
    let (blob, digest) = random_blob(size as usize, fresh_seed());
    stack.push_blob("big/bad", &blob).await.unwrap();
    stack.origin.registry.corrupt_blob(&digest).unwrap();
    let r = http::get_hashed(&http::client(), &stack.blob_url("big/bad", &digest), &[])
        .await
        .unwrap();
    assert_ne!(r.digest, digest);
    assert!(
        r.len < size,
        "the client received all {size} bytes of a wrong blob"
    );
    assert!(
        !r.status.is_success() || r.error.is_some(),
        "wrong body ended cleanly"
    );
    let rejected = stack
        .shoald
        .metric("shoal_chunks_rejected_total", &[("source", "origin")])
        .await
        .unwrap();
    assert!(
        rejected >= 1.0,
        "shoal_chunks_rejected_total{{source=\"origin\"}} = {rejected}"
    );
}

/// Bad flags and config files are refused with one line naming the field, exit code 2, no panic.
#[test]
fn bad_configuration_is_one_clear_line_naming_the_field() {
    let bin = shoald_binary().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("shoal.toml");
    std::fs::write(&cfg, "data-dir = \"/tmp/x\"\ncache-max-byte = 5\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--cache-max-bytes".into(), "ten".into()],
            "cache-max-bytes",
        ),
        (
            vec!["--upstream".into(), "https://quay.io/".into()],
            "upstream",
        ),
        (vec!["--log-format".into(), "xml".into()], "log-format"),
        (
            vec!["--config".into(), cfg.display().to_string()],
            "cache-max-byte",
        ),
        (
            vec!["--registry-listen".into(), "nowhere".into()],
            "registry-listen",
        ),
    ];
    for (args, field) in cases {
        let out = std::process::Command::new(&bin)
            .arg("run")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(field),
            "{args:?}: stderr does not name {field}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// SIGTERM while a client is mid-download: the daemon stops accepting, lets the download finish
/// within its drain bound, exits 0, and a restart serves the blob from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_downloads_then_exits_cleanly() {
    let mut stack = Stack::start().await.unwrap();
    let size = 24 * MIB as u64;
    let (blob, digest) = random_blob(size as usize, fresh_seed());
    stack.push_blob("drain/app", &blob).await.unwrap();
    stack.origin.proxy.set_rate(Some(12 * MIB as u64));
    let url = stack.blob_url("drain/app", &digest);
    let download = tokio::spawn({
        let url = url.clone();
        async move { http::get_hashed(&http::client(), &url, &[]).await }
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    let status = stack
        .shoald
        .terminate(Duration::from_secs(15))
        .await
        .unwrap();
    assert!(status.success(), "shoald exited with {status}");
    let r = download.await.unwrap().unwrap();
    r.expect_complete(&digest, size).unwrap();
    // Not accepting any more.
    assert!(
        http::get(&url, &[]).await.is_err(),
        "a stopped shoald still answered"
    );
    stack.origin.proxy.set_rate(None);
    let egress = stack.origin.egress();
    stack.shoald.restart().await.unwrap();
    let body = http::get_blob_checked(&url, &digest, size).await.unwrap();
    assert_eq!(body, blob);
    assert!(
        stack.origin.egress() - egress < 64 * 1024,
        "the drained blob was not kept"
    );
}
