//! `shoalctl preheat`: the tracker hands a job to the chosen members, they
//! fetch the image through the swarm (about one copy from the origin for
//! the whole cluster), report per-blob progress, and shoalctl exits
//! non-zero when any member failed. Also `shoalctl status/ls/pin/unpin/evict`
//! on one node's store.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use shoal_tests::cluster::Cluster;
use shoal_tests::fixture::Origin;
use shoal_tests::image::TestImage;
use shoal_tests::{fresh_seed, http, skopeo, Shoald, ShoaldOpts, MIB};

const CTL_TIMEOUT: Duration = Duration::from_secs(180);

fn text(out: &std::process::Output) -> String {
    format!(
        "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits until the tracker counts `n` live members.
async fn wait_members(cluster: &Cluster, n: u64) {
    let started = Instant::now();
    loop {
        let r = http::get(&format!("{}/status", cluster.tracker_ops_url()), &[])
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        if v["stats"]["members"].as_u64() == Some(n) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the tracker has {} members, not {n}",
            v["stats"]["members"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The complete blobs in a member's store, from `shoalctl ls --json`.
async fn stored(node: &Shoald) -> BTreeSet<String> {
    let out = node.ctl(&["ls", "--json"], CTL_TIMEOUT).await.unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    list.iter()
        .filter(|b| b["complete"] == true)
        .map(|b| b["digest"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preheat_fills_every_member_through_the_swarm_and_fails_loudly() {
    let origin = Origin::start().await.unwrap();
    // linux/amd64 and linux/arm64 under an index, two layers each.
    let image = TestImage::generate(&[3 * MIB, 3 * MIB], fresh_seed()).unwrap();
    skopeo::push_image(&image, &origin.registry, "team/app")
        .await
        .unwrap();
    let cluster = Cluster::start().await.unwrap();
    let mut nodes = Vec::new();
    for name in ["node-a", "node-b", "node-c"] {
        let opts = ShoaldOpts::insecure_default(&origin.addr());
        nodes.push(cluster.member(name, opts).await.unwrap());
    }
    wait_members(&cluster, 3).await;

    // Preheat the image for every member: each member's own platform.
    let amd64 = image.platform("amd64");
    let arm64 = image.platform("arm64");
    let amd64_bytes = image.layer_bytes("amd64") + amd64.config_size;
    let before = origin.egress();
    let reference = format!("{}/team/app:latest", origin.addr());
    let out = nodes[0]
        .ctl(&["preheat", &reference], CTL_TIMEOUT)
        .await
        .unwrap();
    let report = text(&out);
    eprintln!("{report}");
    assert!(out.status.success(), "{report}");
    assert!(report.contains("3 members: 3 done"), "{report}");
    let egress = origin.egress() - before;
    let mut peer_bytes = 0.0;
    for n in &nodes {
        let held = stored(n).await;
        for l in &amd64.layers {
            assert!(
                held.contains(&l.digest),
                "{} lacks {}",
                n.registry_url(),
                l.digest
            );
        }
        assert!(held.contains(&amd64.config_digest));
        for l in &arm64.layers {
            assert!(
                !held.contains(&l.digest),
                "the other platform was fetched too"
            );
        }
        peer_bytes += n
            .metric("shoal_peer_bytes_received_total", &[])
            .await
            .unwrap();
    }
    eprintln!(
        "preheat of {amd64_bytes} bytes to 3 members: origin sent {egress} ({:.3}x), peers {peer_bytes} ({:.2}x)",
        egress as f64 / amd64_bytes as f64,
        peer_bytes / amd64_bytes as f64
    );
    assert!(
        (egress as f64) < 1.3 * amd64_bytes as f64,
        "the origin sent {egress} bytes for a {amd64_bytes}-byte image preheated on 3 members"
    );
    assert!(
        peer_bytes >= 1.0 * amd64_bytes as f64,
        "peers sent only {peer_bytes}"
    );

    // On a terminal (util-linux `script` gives it one), progress bars:
    // one for all layers and one per layer, drawn to the end.
    let ctl = shoal_tests::cluster::sibling_binary("shoalctl").unwrap();
    let socket = nodes[1].data_dir().join("admin.sock");
    let line = format!(
        "{} --socket {} preheat {reference} --nodes node-b",
        ctl.display(),
        socket.display()
    );
    let mut tty = tokio::process::Command::new(
        shoal_tests::util::require_program("script", "bsdutils").unwrap(),
    );
    tty.args(["-qec", &line, "/dev/null"]).env("TERM", "xterm");
    let out = shoal_tests::util::run_command(tty, CTL_TIMEOUT)
        .await
        .unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(screen.contains("all layers ["), "{screen}");
    assert!(screen.contains("1 members: 1 done"), "{screen}");
    let short = &amd64.layers[0].digest["sha256:".len()..][..12];
    assert!(screen.contains(&format!("{short} [")), "{screen}");

    // A runtime's pull of a preheated layer costs the origin nothing.
    let before = origin.egress();
    let layer = &amd64.layers[0];
    let r = http::get_hashed(
        &http::client(),
        &format!(
            "{}/v2/team/app/blobs/{}",
            nodes[2].registry_url(),
            layer.digest
        ),
        &[],
    )
    .await
    .unwrap();
    r.expect_complete(&layer.digest, layer.size).unwrap();
    assert_eq!(
        origin.egress() - before,
        0,
        "a preheated layer went to the origin"
    );

    // `--platform all` on one member by name adds the other platform there.
    let out = nodes[2]
        .ctl(
            &[
                "preheat",
                &reference,
                "--platform",
                "all",
                "--nodes",
                "node-c",
                "--pin",
            ],
            CTL_TIMEOUT,
        )
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let held = stored(&nodes[2]).await;
    for l in arm64.layers.iter().chain(&amd64.layers) {
        assert!(held.contains(&l.digest), "node-c lacks {}", l.digest);
    }

    // Failures: a tag the origin lacks, a platform the index lacks. Each
    // exits non-zero and names the member and the reason.
    let missing = format!("{}/team/app:nope", origin.addr());
    let out = nodes[1]
        .ctl(
            &["preheat", &missing, "--nodes", "node-a,node-b"],
            CTL_TIMEOUT,
        )
        .await
        .unwrap();
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains("2 failed"), "{report}");
    assert!(
        report.contains("node-a") && report.contains("FAILED"),
        "{report}"
    );
    assert!(
        report.contains("MANIFEST_UNKNOWN") || report.contains("manifest unknown"),
        "{report}"
    );
    let out = nodes[1]
        .ctl(
            &[
                "preheat",
                &reference,
                "--platform",
                "linux/s390x",
                "--nodes",
                "1",
            ],
            CTL_TIMEOUT,
        )
        .await
        .unwrap();
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains("no manifest for linux/s390x"), "{report}");
    assert!(report.contains("linux/amd64, linux/arm64"), "{report}");

    // Refused before any job exists: no origin host, no such member.
    let out = nodes[0]
        .ctl(&["preheat", "team/app:latest"], CTL_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("name the origin"), "{}", text(&out));
    let out = nodes[0]
        .ctl(&["preheat", &reference, "--nodes", "node-z"], CTL_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("node-z is not a live member"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoalctl_shows_the_node_and_pins_unpins_and_evicts() {
    let origin = Origin::start().await.unwrap();
    let cluster = Cluster::start().await.unwrap();
    let node = cluster
        .member("node-a", ShoaldOpts::insecure_default(&origin.addr()))
        .await
        .unwrap();
    let (blob, digest) = shoal_tests::random_blob(2 * MIB, fresh_seed());
    origin.registry.push_blob("team/blob", &blob).await.unwrap();
    node.pull_blob("team/blob", &digest, blob.len() as u64)
        .await
        .unwrap();
    node.wait_idle().await.unwrap();

    let out = node.ctl(&["status", "--json"], CTL_TIMEOUT).await.unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["node"], "node-a");
    assert_eq!(s["store"]["blobs"], 1);
    assert_eq!(s["peers"], 0, "{s}");
    assert!(
        s["bytes"]["origin"].as_u64().unwrap() >= blob.len() as u64,
        "{s}"
    );
    assert!(
        s["bytes"]["served"].as_u64().unwrap() >= blob.len() as u64,
        "{s}"
    );
    let out = node.ctl(&["status"], CTL_TIMEOUT).await.unwrap();
    assert!(text(&out).contains("node        node-a"), "{}", text(&out));
    let out = node.ctl(&["ls"], CTL_TIMEOUT).await.unwrap();
    assert!(text(&out).contains(&digest), "{}", text(&out));

    // Pinned: eviction refused until unpinned.
    let out = node.ctl(&["pin", &digest], CTL_TIMEOUT).await.unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = node.ctl(&["ls", "--json"], CTL_TIMEOUT).await.unwrap();
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["pinned"], true);
    let out = node.ctl(&["evict", &digest], CTL_TIMEOUT).await.unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("is pinned: unpin it first"),
        "{}",
        text(&out)
    );
    let out = node.ctl(&["unpin", &digest], CTL_TIMEOUT).await.unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = node.ctl(&["evict", &digest], CTL_TIMEOUT).await.unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("2.00 MiB freed"), "{}", text(&out));
    assert!(stored(&node).await.is_empty());
    assert_eq!(node.blob_store_bytes().unwrap(), 0);

    // Bad input: a malformed digest, an unknown blob, no daemon.
    let out = node.ctl(&["pin", "sha256:xyz"], CTL_TIMEOUT).await.unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = node.ctl(&["evict", &digest], CTL_TIMEOUT).await.unwrap();
    assert!(
        text(&out).contains("is not in this node's store"),
        "{}",
        text(&out)
    );
    let gone = shoal_tests::cluster::sibling_binary("shoalctl").unwrap();
    let out = std::process::Command::new(gone)
        .args(["--socket", "/nonexistent/admin.sock", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("is shoald running"), "{}", text(&out));
}

/// The origin registry's notifications preheat a pushed image: a real
/// `docker-registry` with `notifications.endpoints` pointing at the
/// tracker's ops listener, and the image pushed with skopeo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_a_watched_repository_is_preheated_through_the_registry_webhook() {
    const SECRET: &str = "webhook-secret-0123456789abcdef";
    let ops = shoal_tests::util::free_port().unwrap();
    let hook = format!("http://127.0.0.1:{ops}/v1/notifications");
    let origin = Origin::start_with(shoal_tests::registry::RegistryOpts {
        notify: Some((hook.clone(), SECRET.into())),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("webhook-secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let args: Vec<String> = [
        "--webhook-secret-file",
        secret_file.to_str().unwrap(),
        "--webhook-origin",
        &origin.addr(),
        "--preheat-repo",
        "team/*",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let cluster = Cluster::start_with_tracker_args(&args, Some(ops))
        .await
        .unwrap();
    let mut nodes = Vec::new();
    for name in ["node-a", "node-b"] {
        let opts = ShoaldOpts::insecure_default(&origin.addr());
        nodes.push(cluster.member(name, opts).await.unwrap());
    }
    wait_members(&cluster, 2).await;

    // Without the secret: refused.
    let r = http::send(
        &http::client(),
        reqwest::Method::POST,
        &hook,
        &[("Authorization", "Bearer wrong-secret-0123456789")],
        Some(br#"{"events":[]}"#.to_vec()),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 401, "{:?}", r.body_text());
    let bearer = format!("Bearer {SECRET}");
    let r = http::send(
        &http::client(),
        reqwest::Method::POST,
        &hook,
        &[("Authorization", bearer.as_str())],
        Some(vec![b' '; (1 << 20) + 1]),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 413, "{:?}", r.body_text());

    // An unwatched repository: nothing happens.
    let other = TestImage::generate_single(&[MIB], fresh_seed()).unwrap();
    skopeo::push_image(&other, &origin.registry, "other/app")
        .await
        .unwrap();
    // A watched one: both members fetch it without any runtime asking.
    let image = TestImage::generate_single(&[3 * MIB, 2 * MIB], fresh_seed()).unwrap();
    let before = origin.egress();
    skopeo::push_image(&image, &origin.registry, "team/app")
        .await
        .unwrap();
    let p = image.platform("amd64");
    let bytes = image.layer_bytes("amd64") + p.config_size;
    let started = Instant::now();
    for n in &nodes {
        loop {
            let held = stored(n).await;
            if p.layers.iter().all(|l| held.contains(&l.digest)) && held.contains(&p.config_digest)
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{} did not get the pushed image within 60 s; tracker log:\n{}\nregistry log:\n{}",
                n.registry_url(),
                cluster.tracker_log(),
                origin.registry.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let egress = origin.egress() - before;
    eprintln!(
        "webhook preheat of {bytes} bytes on 2 members in {:.1?}: origin sent {egress} ({:.3}x)",
        started.elapsed(),
        egress as f64 / bytes as f64
    );
    assert!(
        (egress as f64) < 1.3 * bytes as f64,
        "origin sent {egress} for {bytes}"
    );
    // `shoalctl job` exits 0 once every member is done (the last reports
    // may trail the stored blobs by a moment).
    let started = Instant::now();
    let out = loop {
        let out = nodes[0]
            .ctl(&["job", "1", "--json"], CTL_TIMEOUT)
            .await
            .unwrap();
        if out.status.success() || started.elapsed() > Duration::from_secs(20) {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(out.status.success(), "{}", text(&out));
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["job"]["by"], "registry-webhook");
    let image_ref = job["job"]["image"].as_str().unwrap();
    assert!(
        image_ref.starts_with(&format!("{}/team/app:latest@sha256:", origin.addr())),
        "{image_ref}"
    );
    // Only one job: the unwatched push made none.
    let out = nodes[0].ctl(&["job", "2"], CTL_TIMEOUT).await.unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("no preheat job 2"), "{}", text(&out));
}

/// With tracker replicas over Redis, jobs are part of the shared state:
/// members long-polling different replicas all get a job, and after the
/// replica that took it is killed, the job's record and new jobs are
/// served by the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preheat_jobs_live_in_the_replicated_tracker_state() {
    let origin = Origin::start().await.unwrap();
    let image = TestImage::generate_single(&[2 * MIB, MIB], fresh_seed()).unwrap();
    skopeo::push_image(&image, &origin.registry, "team/ha")
        .await
        .unwrap();
    let mut cluster = Cluster::start_replicated(2).await.unwrap();
    let mut nodes = Vec::new();
    for name in ["node-a", "node-b", "node-c"] {
        let opts = ShoaldOpts::insecure_default(&origin.addr());
        nodes.push(cluster.member(name, opts).await.unwrap());
    }
    wait_members(&cluster, 3).await;
    let reference = format!("{}/team/ha:latest", origin.addr());
    let out = nodes[0]
        .ctl(&["preheat", &reference], CTL_TIMEOUT)
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("3 members: 3 done"), "{}", text(&out));

    cluster.kill_first_tracker();
    // The job's record, from the surviving replica.
    let out = nodes[1]
        .ctl(&["job", "1", "--json"], CTL_TIMEOUT)
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["nodes"].as_object().unwrap().len(), 3, "{job}");
    // A new job through the surviving replica (pinning what is held).
    let out = nodes[2]
        .ctl(
            &["preheat", &reference, "--pin", "--nodes", "node-a,node-c"],
            CTL_TIMEOUT,
        )
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("preheat job 2"), "{}", text(&out));
    let out = nodes[2].ctl(&["ls", "--json"], CTL_TIMEOUT).await.unwrap();
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let layer = &image.platform("amd64").layers[0].digest;
    assert!(
        list.iter()
            .any(|b| b["digest"] == layer.as_str() && b["pinned"] == true),
        "{list:?}"
    );
}
