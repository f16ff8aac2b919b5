//! The blobs a manifest names are confirmed by the origin serving that manifest: a cold
//! pull through shoald does not `HEAD` them at the origin again. A blob no manifest names
//! still is, and another repository still gets nothing.

use reqwest::StatusCode;
use shoal_tests::{fresh_seed, http, random_blob, skopeo, Stack, TestImage, MIB};

const REPO: &str = "library/app";

/// shoald's `HEAD` requests for `digest` under `repo` in the origin's access log (the push
/// made its own).
fn origin_heads(stack: &Stack, repo: &str, digest: &str) -> usize {
    let needle = format!("\"HEAD /v2/{repo}/blobs/{digest} ");
    let log = stack.origin.registry.log();
    log.lines()
        .filter(|l| l.contains(&needle) && l.contains("\"shoal/"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_named_by_a_served_manifest_start_without_a_head_at_the_origin() {
    let image = TestImage::generate_single(&[2 * MIB, 700 * 1024], fresh_seed()).unwrap();
    let stack = Stack::start().await.unwrap();
    skopeo::push_image(&image, &stack.origin.registry, REPO)
        .await
        .unwrap();
    let platform = &image.platforms[0];

    // The manifest, by tag, as a runtime asks for it first.
    let r = http::get(
        &stack.manifest_url(REPO, &image.tag),
        &[("Accept", shoal_tests::image::MT_MANIFEST)],
    )
    .await
    .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.body_text());
    http::check_bytes(&r.body, &platform.manifest_digest, platform.manifest_size).unwrap();

    // Then every blob it names, cold: served whole and verified.
    let mut blobs = vec![(platform.config_digest.clone(), platform.config_size)];
    blobs.extend(platform.layers.iter().map(|l| (l.digest.clone(), l.size)));
    for (digest, size) in &blobs {
        http::get_blob_checked(&stack.blob_url(REPO, digest), digest, *size)
            .await
            .unwrap();
    }
    let log = stack.origin.registry.log();
    for (digest, _) in &blobs {
        assert_eq!(
            origin_heads(&stack, REPO, digest),
            0,
            "{digest} was HEADed at the origin although its manifest named it\n{log}"
        );
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("\"GET /v2/{REPO}/blobs/{digest} "))
                    && l.contains("\"shoal/")),
            "{digest}: its bytes did not come from the origin\n{log}"
        );
    }

    // A blob no manifest names is confirmed the usual way: one HEAD.
    let (loose, loose_digest) = random_blob(MIB, fresh_seed());
    stack.push_blob(REPO, &loose).await.unwrap();
    http::get_blob_checked(
        &stack.blob_url(REPO, &loose_digest),
        &loose_digest,
        loose.len() as u64,
    )
    .await
    .unwrap();
    assert_eq!(
        origin_heads(&stack, REPO, &loose_digest),
        1,
        "{}",
        stack.origin.registry.log()
    );

    // The manifest vouches for its own repository only.
    let layer = &platform.layers[0].digest;
    let r = http::get(&stack.blob_url("library/other", layer), &[])
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body_text());
    assert!(r.body.len() < 4096, "the body holds the blob");
}
