//! `examples/grafana/shoal.json`: every metric a panel queries is one that
//! a running `shoald` or `shoal-tracker` exports (names are an interface;
//! a renamed metric must not leave an empty panel behind).

use std::collections::BTreeSet;

use shoal_tests::cluster::Cluster;
use shoal_tests::fixture::Origin;
use shoal_tests::{http, ShoaldOpts};

/// Sample names in a Prometheus text exposition, and for each `# TYPE`
/// the names its samples take.
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            for s in suffixes {
                names.insert(format!("{name}{s}"));
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

async fn metrics_text(url: &str) -> String {
    let r = http::get(&format!("{url}/metrics"), &[]).await.unwrap();
    assert_eq!(r.status, 200, "GET {url}/metrics");
    String::from_utf8(r.body.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exported() {
    let origin = Origin::start().await.unwrap();
    let cluster = Cluster::start().await.unwrap();
    let (member, _) = cluster
        .dht_member("node-a", ShoaldOpts::insecure_default(&origin.addr()))
        .await
        .unwrap();
    // One pull, so request latencies have series.
    let (blob, digest) = shoal_tests::random_blob(256 * 1024, shoal_tests::fresh_seed());
    origin.registry.push_blob("dash/app", &blob).await.unwrap();
    http::get_hashed(
        &http::client(),
        &format!("{}/v2/dash/app/blobs/{digest}", member.registry_url()),
        &[],
    )
    .await
    .unwrap()
    .expect_complete(&digest, blob.len() as u64)
    .unwrap();
    let mut known = exported(&metrics_text(&member.ops_url()).await);
    known.extend(exported(&metrics_text(&cluster.tracker_ops_url()).await));

    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/grafana/shoal.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let ids: BTreeSet<i64> = panels.iter().map(|p| p["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids repeat");
    let mut queried = BTreeSet::new();
    for p in panels {
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("shoal_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    known.contains(&name),
                    "panel {}: {name} is not exported (by {expr})",
                    p["title"]
                );
                queried.insert(name.clone());
                rest = &rest[at + name.len()..];
            }
        }
    }
    // The headline figures are there.
    for must in [
        "shoal_origin_bytes_total",
        "shoal_peer_bytes_received_total",
        "shoal_client_bytes_served_total",
        "shoal_chunks_rejected_total",
        "shoal_store_bytes",
        "shoal_request_duration_seconds_bucket",
    ] {
        assert!(queried.contains(must), "no panel queries {must}");
    }
}
