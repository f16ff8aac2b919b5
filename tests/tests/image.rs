//! The container image (`Containerfile`, built by `scripts/image.sh`):
//! built with podman from this build's binaries, it runs shoald, which
//! serves a verified blob from a real origin, and shoalctl inside it sees
//! the blob. The image has no shell; Kubernetes examples rely on that.

use std::path::PathBuf;
use std::time::Duration;

use shoal_tests::fixture::Origin;
use shoal_tests::util::{free_port, require_program, run_command};
use shoal_tests::{fresh_seed, http, MIB};

/// podman with its storage in a directory of this test's own.
struct Podman {
    root: tempfile::TempDir,
    container: Option<String>,
}

impl Podman {
    fn args(&self) -> Vec<String> {
        let r = self.root.path();
        // runc (which containerd brings), not podman's default crun: crun
        // refuses hosts with a hybrid cgroup v1/v2 layout ("cgroups in
        // hybrid mode not supported"), runc runs on those and the others.
        let runc = require_program("runc", "runc").unwrap();
        vec![
            format!("--root={}", r.join("root").display()),
            format!("--runroot={}", r.join("run").display()),
            "--storage-driver=vfs".into(),
            format!("--runtime={}", runc.display()),
        ]
    }

    fn command(&self) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(require_program("podman", "podman").unwrap());
        c.args(self.args());
        c
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        if let Some(name) = &self.container {
            let _ = std::process::Command::new("podman")
                .args(self.args())
                .args(["rm", "-f", "-t", "1", name])
                .output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_shoald_and_shoalctl_without_a_shell() {
    let mut podman = Podman {
        root: tempfile::tempdir().unwrap(),
        container: None,
    };
    let bins = shoal_tests::cluster::sibling_binary("shoalctl")
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/image.sh");
    let mut build = tokio::process::Command::new("bash");
    build
        .arg(&script)
        .args(["--tag", "shoal-test:ci", "--binaries"])
        .arg(&bins)
        .env("PODMAN", format!("podman {}", podman.args().join(" ")));
    let out = run_command(build, Duration::from_secs(300)).await.unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("built shoal-test:ci"));

    let origin = Origin::start().await.unwrap();
    let (blob, digest) = shoal_tests::random_blob(2 * MIB, fresh_seed());
    origin.registry.push_blob("team/blob", &blob).await.unwrap();
    let (registry, ops) = (free_port().unwrap(), free_port().unwrap());
    let name = format!("shoal-test-{registry}");
    let mut run = podman.command();
    // This sandbox refuses podman's default rlimits; lower ones are fine.
    run.args(["run", "-d", "--name", &name, "--network", "host"])
        .args([
            "--ulimit",
            "nofile=4096:4096",
            "--ulimit",
            "nproc=1024:1024",
        ])
        .args([
            "shoal-test:ci",
            "shoald",
            "run",
            "--data-dir",
            "/var/lib/shoal",
        ])
        .arg(format!("--registry-listen=127.0.0.1:{registry}"))
        .arg(format!("--ops-listen=127.0.0.1:{ops}"))
        .arg(format!("--insecure-upstream={}", origin.addr()))
        .arg(format!("--default-upstream={}", origin.addr()));
    run_command(run, Duration::from_secs(120)).await.unwrap();
    podman.container = Some(name.clone());
    let healthz = format!("http://127.0.0.1:{ops}/healthz");
    let started = std::time::Instant::now();
    while http::get(&healthz, &[]).await.map(|r| r.status).ok() != Some(reqwest::StatusCode::OK) {
        if started.elapsed() > Duration::from_secs(30) {
            let mut logs = podman.command();
            logs.args(["logs", &name]);
            let out = logs.output().await.unwrap();
            panic!(
                "shoald in the container is not healthy after 30 s:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let r = http::get_hashed(
        &http::client(),
        &format!("http://127.0.0.1:{registry}/v2/team/blob/blobs/{digest}"),
        &[],
    )
    .await
    .unwrap();
    r.expect_complete(&digest, blob.len() as u64).unwrap();

    let mut ls = podman.command();
    ls.args([
        "exec",
        &name,
        "shoalctl",
        "--socket",
        "/var/lib/shoal/admin.sock",
        "ls",
        "--json",
    ]);
    let out = run_command(ls, Duration::from_secs(60)).await.unwrap();
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        list.iter()
            .any(|b| b["digest"] == digest.as_str() && b["complete"] == true),
        "{list:?}"
    );
    // No shell in the image.
    let mut sh = podman.command();
    sh.args(["exec", &name, "/bin/sh", "-c", "true"]);
    assert!(!sh.output().await.unwrap().status.success());
}
