//! The `shoal-tracker` binary as an operator runs it: started on a cluster
//! directory from `shoal_cluster::init`, serving members, stopping on
//! SIGTERM; and one clear line with exit status 2 for bad flags.

#![cfg(feature = "net")]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bounded, http_get, Cluster, TrackerProcess};
use shoal_tracker::client::TrackerApi;
use shoal_tracker::tracker_api::Announce;

const BIN: &str = env!("CARGO_BIN_EXE_shoal-tracker");

#[tokio::test]
async fn the_binary_serves_members_and_stops_on_sigterm() {
    bounded(async {
        let cluster = Cluster::new();
        let mut tracker = TrackerProcess::start(&cluster, &[]).await;
        let ops = tracker.ops;
        let member = cluster.client("node-1", &[tracker.url.as_str()]);
        let a = Announce::new(
            "node-1".parse().unwrap(),
            "127.0.0.1:4901".parse().unwrap(),
            vec![],
            vec![],
            false,
        )
        .unwrap();
        assert_eq!(member.announce(a).await.unwrap().interval_ms, 5_000);
        assert_eq!(http_get(ops, "/healthz").await, (200, "ok\n".to_owned()));
        let (_, metrics) = http_get(ops, "/metrics").await;
        assert!(metrics.contains("shoal_tracker_members 1"), "{metrics}");

        let status = Command::new("kill")
            .args(["-TERM", &tracker.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let started = Instant::now();
        let exit = loop {
            if let Some(s) = tracker.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "no exit after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(exit.success(), "{exit:?}");
        let log = tracker.logs();
        assert!(log.contains("stopped"), "{log}");
    })
    .await;
}

/// Runs the binary expecting it to refuse to start; returns its stderr.
fn refuses(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr:?}");
    assert!(stderr.starts_with("shoal-tracker: "), "{stderr:?}");
    stderr
}

#[test]
fn bad_flags_get_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let e = refuses(&["--cluster-dir", d, "--bogus"], &[]);
    assert!(e.contains("--bogus"), "{e}");
    let e = refuses(&[], &[]);
    assert!(e.contains("--cluster-dir"), "{e}");
    let e = refuses(&["--cluster-dir", d, "--listen", "nowhere"], &[]);
    assert!(e.contains("--listen"), "{e}");
    let e = refuses(&["--cluster-dir", d, "--store", "postgres://x"], &[]);
    assert!(e.contains("--store") && e.contains("redis://"), "{e}");
    let e = refuses(&["--cluster-dir", d, "--snapshot-interval", "0s"], &[]);
    assert!(e.contains("--snapshot-interval"), "{e}");
    let e = refuses(
        &["--cluster-dir", d, "--snapshot-interval", "5 minutes"],
        &[],
    );
    assert!(e.contains("--snapshot-interval"), "{e}");
    let e = refuses(&["--cluster-dir", d, "--name", "Not_A_Name"], &[]);
    assert!(e.contains("--name"), "{e}");
    let e = refuses(
        &["--cluster-dir", d],
        &[("SHOAL_TRACKER_OPS_LISTEN", "garbage")],
    );
    assert!(e.contains("--ops-listen"), "{e}");
}

#[test]
fn a_missing_cluster_ca_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "127.0.0.1:0",
            "--name",
            "t1",
        ])
        .arg("--cluster-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("ca.crt"), "{stderr}");
}
