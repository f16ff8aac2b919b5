//! `shoald configure`: the files it writes work with the real runtime
//! (containerd pulls through shoald with them) and never break what was
//! there (Docker's `daemon.json` is merged; a foreign file is kept first).

use std::process::Command;

use shoal_tests::containerd::{dead_server_url, HostsDir};
use shoal_tests::shoald::shoald_binary;
use shoal_tests::{fresh_seed, skopeo, Containerd, Stack, TestImage, MIB};

fn configure(args: &[&str]) -> String {
    let out = Command::new(shoald_binary().unwrap())
        .arg("configure")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "shoald configure {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `shoald configure containerd --write` into a hosts dir that already held
/// a `hosts.toml` for the origin; containerd then pulls the image through
/// shoald (the origin's `server` URL is dead, so every byte came through
/// shoald) and the old file is kept beside the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_shoald_with_the_hosts_toml_it_writes() {
    let image = TestImage::generate_single(&[2 * MIB, 200 * 1024], fresh_seed()).unwrap();
    let stack = Stack::start().await.unwrap();
    skopeo::push_image(&image, &stack.origin.registry, "team/app")
        .await
        .unwrap();
    let origin = stack.origin.addr();
    let hosts = HostsDir::new().unwrap();
    let theirs = format!("server = \"http://{origin}\"\n");
    hosts
        .set(&origin, &format!("http://{origin}"), &[])
        .unwrap();

    let dead = dead_server_url().unwrap();
    let said = configure(&[
        "containerd",
        "--write",
        "--mirror",
        &stack.shoald.registry_addr(),
        "--origin",
        &format!("{origin}={dead}"),
        "--path",
        hosts.path().to_str().unwrap(),
    ]);
    assert!(said.contains("before-shoal"), "{said}");
    let kept = hosts.path().join(&origin).join("hosts.toml.before-shoal");
    assert_eq!(std::fs::read_to_string(&kept).unwrap(), theirs);

    let ctr = Containerd::start().await.unwrap();
    ctr.pull(
        &format!("{origin}/team/app:{}", image.tag),
        hosts.path(),
        false,
    )
    .await
    .unwrap();
    assert_eq!(ctr.unpacked_files().unwrap(), image.expected_files(None));
    let layer_bytes: u64 = image.all_layers().iter().map(|l| l.size).sum();
    assert!(stack.shoald.origin_blob_bytes().await.unwrap() >= layer_bytes as f64);
}

/// `shoald configure docker --write` merges the mirror into an existing
/// `daemon.json`, keeping every other setting and the file as it was; a
/// `daemon.json` that is not JSON is refused and left alone.
#[test]
fn docker_daemon_json_is_merged_and_a_broken_one_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.json");
    let before = "{\n  \"log-driver\": \"journald\",\n  \"live-restore\": true\n}\n";
    std::fs::write(&path, before).unwrap();
    configure(&["docker", "--write", "--path", path.to_str().unwrap()]);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(v["log-driver"], "journald");
    assert_eq!(v["live-restore"], true);
    assert_eq!(
        v["registry-mirrors"],
        serde_json::json!(["http://127.0.0.1:4900"])
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("daemon.json.before-shoal")).unwrap(),
        before
    );

    std::fs::write(&path, "{ not json").unwrap();
    let out = Command::new(shoald_binary().unwrap())
        .args([
            "configure",
            "docker",
            "--write",
            "--path",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not valid JSON") && err.contains("not touched"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "{ not json");
}

/// The CRI-O / podman drop-in parses as containers-registries.conf v2 with
/// a mirror per origin at shoald's address and the origin as the first
/// path component.
#[test]
fn the_registries_conf_drop_in_names_shoald_as_each_origins_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registries.conf.d/50-shoal.conf");
    configure(&["crio", "--write", "--path", path.to_str().unwrap()]);
    let v: toml::Value = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let regs = v["registry"].as_array().unwrap();
    let names: Vec<&str> = regs.iter().map(|r| r["prefix"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["docker.io", "quay.io", "ghcr.io", "registry.k8s.io"]
    );
    for r in regs {
        let prefix = r["prefix"].as_str().unwrap();
        assert_eq!(r["location"].as_str(), Some(prefix));
        assert_eq!(
            r["mirror"][0]["location"].as_str().unwrap(),
            format!("127.0.0.1:4900/{prefix}")
        );
        assert_eq!(r["mirror"][0]["insecure"].as_bool(), Some(true));
    }
}
