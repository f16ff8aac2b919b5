//! skopeo copies an image out of shoald, which uses its default upstream (no `ns`).

use shoal_tests::{fresh_seed, skopeo, Stack, TestImage, MIB};

/// `skopeo copy docker://SHOALD/<repo>:<tag> oci:DIR` with no `ns` parameter: shoald takes
/// the image from `--default-upstream`, and every digest of the copy equals the original's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copy_from_shoald_via_default_upstream_preserves_all_digests() {
    let image = TestImage::generate(&[2 * MIB, 500 * 1024], fresh_seed()).unwrap();
    let stack = Stack::start().await.unwrap();
    skopeo::push_image(&image, &stack.origin.registry, "library/tool")
        .await
        .unwrap();

    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("copy");
    let src = format!(
        "{}/library/tool:{}",
        stack.shoald.registry_addr(),
        image.tag
    );
    skopeo::copy_to_oci_dir(&src, &dest, &image.tag, None)
        .await
        .unwrap();
    skopeo::verify_oci_dir(&dest, &image).unwrap();

    let layer_bytes: u64 = image.all_layers().iter().map(|l| l.size).sum();
    let from_origin = stack.shoald.origin_blob_bytes().await.unwrap();
    assert!(
        from_origin >= layer_bytes as f64,
        "shoal_origin_bytes_total{{kind=\"blob\"}} = {from_origin}"
    );
    assert!(
        stack.origin.egress() >= layer_bytes,
        "the default upstream was not used"
    );
}
