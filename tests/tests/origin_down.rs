//! The origin goes away: what this node holds keeps serving, what it doesn't fails fast.

use std::time::{Duration, Instant};

use shoal_tests::{fresh_seed, http, random_blob, Stack, MIB};

const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json";

/// With the origin stopped, a blob and a manifest this node verified before are still served
/// (on the origin's earlier confirmation; `--authority-ttl 0` forces the check every time),
/// a tag is answered from the node's own last origin resolution, and a blob it never held
/// gets a clear 503 `UNAVAILABLE` within a bounded time, never a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_origin_down_held_content_serves_and_misses_fail_fast() {
    let stack = Stack::start_with(Default::default(), |_, o| {
        o.extra_args = vec!["--authority-ttl".into(), "0".into()];
    })
    .await
    .unwrap();
    let size = 2 * MIB as u64;
    let (blob, digest) = random_blob(size as usize, fresh_seed());
    stack.push_blob("down/app", &blob).await.unwrap();
    let (other, other_digest) = random_blob(MIB, fresh_seed());
    stack.push_blob("down/app", &other).await.unwrap();
    // A manifest referencing the blob, tagged, so there is a tag to resolve.
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{ACCEPT}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{digest}","size":{size}}},"layers":[]}}"#
    );
    let manifest_digest = stack
        .origin
        .registry
        .put_manifest("down/app", "v1", ACCEPT, manifest.as_bytes())
        .await
        .unwrap();

    // Warm: the blob and the tag's manifest go through shoald once.
    let blob_url = stack.blob_url("down/app", &digest);
    assert_eq!(
        http::get_blob_checked(&blob_url, &digest, size)
            .await
            .unwrap(),
        blob
    );
    let tag_url = stack.manifest_url("down/app", "v1");
    let r = http::get(&tag_url, &[("Accept", ACCEPT)]).await.unwrap();
    assert_eq!(r.status.as_u16(), 200);
    assert_eq!(
        r.header("docker-content-digest"),
        Some(manifest_digest.as_str())
    );

    let Stack { origin, shoald } = stack;
    let other_url = {
        // Same URL shape as the warm requests, for a blob never fetched.
        let u = blob_url.replace(&digest, &other_digest);
        drop(origin);
        u
    };

    let r = http::get(&blob_url, &[]).await.unwrap();
    assert_eq!(
        r.status.as_u16(),
        200,
        "held blob with the origin down: {}",
        r.body_text()
    );
    assert_eq!(r.body, blob);
    let r = http::get(&tag_url, &[("Accept", ACCEPT)]).await.unwrap();
    assert_eq!(
        r.status.as_u16(),
        200,
        "tag with the origin down: {}",
        r.body_text()
    );
    assert_eq!(
        r.header("docker-content-digest"),
        Some(manifest_digest.as_str())
    );
    assert_eq!(r.body, manifest.as_bytes());

    let t = Instant::now();
    let r = http::get(&other_url, &[]).await.unwrap();
    let took = t.elapsed();
    r.expect_oci_error(503, "UNAVAILABLE").unwrap();
    assert!(
        took < Duration::from_secs(30),
        "a miss with the origin down took {took:?}"
    );
    drop(shoald);
}
