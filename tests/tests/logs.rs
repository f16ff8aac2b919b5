//! Structured logs: with `--log-format json`, shoald's log lines of one
//! blob transfer carry its transfer id (the `transfer` span), and the
//! tracker's request log lines (`RUST_LOG=shoal_tracker::server=debug`)
//! carry the same id, so an operator can follow one pull across both.

use std::collections::BTreeSet;

use shoal_tests::cluster::Cluster;
use shoal_tests::fixture::Origin;
use shoal_tests::{fresh_seed, ShoaldOpts, MIB};

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.is_object())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_transfer_id_follows_a_pull_through_the_daemon_and_tracker_logs() {
    // Inherited by the tracker and shoald processes this test starts (the
    // only test in this binary).
    std::env::set_var("RUST_LOG", "info,shoal_tracker::server=debug");
    let origin = Origin::start().await.unwrap();
    let (blob, digest) = shoal_tests::random_blob(3 * MIB, fresh_seed());
    origin.registry.push_blob("team/blob", &blob).await.unwrap();
    let cluster = Cluster::start_with_tracker_args(&["--log-format".into(), "json".into()], None)
        .await
        .unwrap();
    let mut opts = ShoaldOpts::insecure_default(&origin.addr());
    opts.extra_args
        .extend(["--log-format".into(), "json".into()]);
    let node = cluster.member("node-a", opts).await.unwrap();
    node.pull_blob("team/blob", &digest, blob.len() as u64)
        .await
        .unwrap();
    node.wait_idle().await.unwrap();

    // shoald: every line of the transfer names it, its id and its digest.
    let daemon = json_lines(&node.logs());
    let in_transfer: Vec<&serde_json::Value> = daemon
        .iter()
        .filter(|l| l["span"]["name"] == "transfer" && l["span"]["digest"] == digest.as_str())
        .collect();
    let ids: BTreeSet<&str> = in_transfer
        .iter()
        .filter_map(|l| l["span"]["id"].as_str())
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "one transfer, one id: {ids:?}\n{}",
        node.logs()
    );
    let id = *ids.iter().next().unwrap();
    let messages: Vec<&str> = in_transfer
        .iter()
        .filter_map(|l| l["fields"]["message"].as_str())
        .collect();
    assert!(messages.contains(&"transfer started"), "{messages:?}");
    assert!(
        messages.iter().any(|m| m.contains("complete")),
        "{messages:?}"
    );

    // The tracker: the same id on that transfer's lookups and leases.
    let tracker = json_lines(&cluster.tracker_log());
    let routes: BTreeSet<&str> = tracker
        .iter()
        .filter(|l| l["fields"]["transfer"] == id)
        .filter_map(|l| l["fields"]["route"].as_str())
        .collect();
    assert!(
        routes.contains("lookup") && routes.contains("lease"),
        "tracker requests with transfer {id}: {routes:?}\n{}",
        cluster.tracker_log()
    );
    assert!(tracker
        .iter()
        .filter(|l| l["fields"]["transfer"] == id && l["fields"]["message"] == "member request")
        .all(|l| l["fields"]["node"] == "node-a"));
}
