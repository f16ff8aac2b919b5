//! podman pulls through shoald set up as a `registries.conf` mirror (no
//! `ns` parameter: shoald's `--default-upstream`) — the same mirror entry
//! CRI-O reads.
//!
//! The other mirror form, the origin's name as the first path component
//! (`location = "127.0.0.1:4900/quay.io"`), needs an origin name without a
//! port: containers/image refuses `127.0.0.1:4900/127.0.0.1:5000` as a
//! reference, and the test origin only has a loopback address and port.
//! shoald's side of that form is tested over HTTP in
//! `upstream_selection.rs`.

use std::process::Command;

use shoal_tests::{fresh_seed, skopeo, Stack, TestImage, MIB};

/// `podman pull ORIGIN/team/app:TAG` with shoald (whose default upstream is
/// the origin) as the origin's mirror in `registries.conf`: the image's manifest digest is the original's, and
/// every layer byte podman got went through shoald (which fetched it from
/// the origin once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pulls_through_shoald_as_a_registries_conf_mirror() {
    let image = TestImage::generate_single(&[2 * MIB, 300 * 1024], fresh_seed()).unwrap();
    let stack = Stack::start().await.unwrap();
    skopeo::push_image(&image, &stack.origin.registry, "team/app")
        .await
        .unwrap();
    let origin = stack.origin.addr();
    let mirror = stack.shoald.registry_addr();

    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "unqualified-search-registries = []\n\n\
             [[registry]]\nprefix = \"{origin}\"\nlocation = \"{origin}\"\ninsecure = true\n\n\
             [[registry.mirror]]\nlocation = \"{mirror}\"\ninsecure = true\n"
        ),
    )
    .unwrap();
    // No journald, no systemd here: events to a file, cgroups by hand.
    let engine = dir.path().join("containers.conf");
    std::fs::write(
        &engine,
        "[engine]\nevents_logger = \"file\"\ncgroup_manager = \"cgroupfs\"\n",
    )
    .unwrap();
    let podman = |args: &[&str]| {
        let out = Command::new("podman")
            .args([
                "--root",
                dir.path().join("root").to_str().unwrap(),
                "--runroot",
                dir.path().join("run").to_str().unwrap(),
                "--storage-driver",
                "vfs",
            ])
            .args(args)
            .env("CONTAINERS_REGISTRIES_CONF", &conf)
            .env("CONTAINERS_CONF", &engine)
            .env("XDG_RUNTIME_DIR", dir.path())
            .output()
            .expect("podman is needed (scripts/test.sh installs it)");
        assert!(
            out.status.success(),
            "podman {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let reference = format!("{origin}/team/app:{}", image.tag);
    podman(&["pull", "--quiet", &reference]);
    let digest = podman(&["image", "inspect", "--format", "{{.Digest}}", &reference]);
    assert_eq!(
        digest,
        image.top_digest(),
        "manifest digest of the pulled image"
    );

    let layer_bytes: u64 = image.all_layers().iter().map(|l| l.size).sum();
    let served = stack
        .shoald
        .metric("shoal_client_bytes_served_total", &[])
        .await
        .unwrap();
    let fetched = stack.shoald.origin_blob_bytes().await.unwrap();
    eprintln!(
        "podman pulled {reference} ({layer_bytes} layer bytes): shoald served {served} bytes, \
         fetched {fetched} blob bytes from the origin; origin egress {}",
        stack.origin.egress()
    );
    assert!(
        served >= layer_bytes as f64,
        "podman got only {served} bytes through shoald"
    );
    assert!(
        fetched >= layer_bytes as f64 && fetched < 2.0 * layer_bytes as f64,
        "shoald fetched {fetched} blob bytes for {layer_bytes}"
    );
    assert!(
        stack.origin.egress() < 2 * layer_bytes,
        "the origin sent {} bytes: podman went around the mirror",
        stack.origin.egress()
    );
}
