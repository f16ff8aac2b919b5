//! Preheat benchmark: six `shoald` members and a `shoal-tracker` on
//! loopback; `shoalctl preheat` of a cold 24 MiB image (3 × 8 MiB layers)
//! from a real docker-registry behind a counting proxy limited to 8 MiB/s,
//! then, in the same run, every member pulling a cold image of the same
//! layer sizes at once, as runtimes would without a preheat. Bound: one
//! copy at the origin's rate (3 s); direct pulls would cost six copies.
//!
//! `cargo build -p shoal-daemon -p shoal-tracker -p shoal-tests --bins &&
//!  target/debug/preheat-bench`

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use shoal_tests::cluster::Cluster;
use shoal_tests::fixture::{pull_all_at_once, Origin};
use shoal_tests::image::TestImage;
use shoal_tests::{fresh_seed, http, skopeo, ShoaldOpts, MIB};

const MEMBERS: usize = 6;
const RATE: u64 = 8 * MIB as u64;
const CTL_TIMEOUT: Duration = Duration::from_secs(180);

/// Waits until the tracker counts `n` live members.
async fn wait_members(cluster: &Cluster, n: u64) -> Result<()> {
    let started = Instant::now();
    loop {
        let r = http::get(&format!("{}/status", cluster.tracker_ops_url()), &[]).await?;
        let v: serde_json::Value = serde_json::from_slice(&r.body)?;
        if v["stats"]["members"].as_u64() == Some(n) {
            return Ok(());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the tracker has {} members, not {n}",
            v["stats"]["members"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let origin = Origin::start().await?;
    let image = TestImage::generate_single(&[8 * MIB, 8 * MIB, 8 * MIB], fresh_seed())?;
    skopeo::push_image(&image, &origin.registry, "team/big").await?;
    let bytes = image.layer_bytes("amd64") + image.platform("amd64").config_size;
    origin.proxy.set_rate(Some(RATE));
    let cluster = Cluster::start().await?;
    let mut nodes = Vec::new();
    for n in 1..=MEMBERS {
        let opts = ShoaldOpts::insecure_default(&origin.addr());
        nodes.push(cluster.member(&format!("node-{n}"), opts).await?);
    }
    wait_members(&cluster, MEMBERS as u64).await?;

    let before = origin.egress();
    let started = Instant::now();
    let image_ref = format!("{}/team/big:latest", origin.addr());
    let out = nodes[0].ctl(&["preheat", &image_ref], CTL_TIMEOUT).await?;
    let took = started.elapsed();
    ensure!(
        out.status.success(),
        "shoalctl preheat: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let egress = origin.egress() - before;
    let bound = bytes as f64 / RATE as f64;

    // Same run, same members: every member pulls another cold image of the
    // same layer sizes at once.
    let blobs = origin
        .push_random_layers("team/cold", &[8 * MIB, 8 * MIB, 8 * MIB])
        .await?;
    let cold_bytes: u64 = blobs.iter().map(|(b, _)| b.len() as u64).sum();
    let before = origin.egress();
    let started = Instant::now();
    for p in pull_all_at_once(&nodes, "team/cold", &blobs) {
        p.await.context("a pull task panicked")??;
    }
    let cold = started.elapsed();
    let cold_egress = origin.egress() - before;
    let cold_bound = cold_bytes as f64 / RATE as f64;
    println!(
        "preheat of {bytes} bytes on {MEMBERS} members, origin at {RATE} B/s: {took:.2?} \
         ({:.2}x the {bound:.2} s bound), origin sent {:.3}x the image; same run, all members \
         pulling a cold image of the same layers at once: {cold:.2?} ({:.2}x the bound), origin \
         {:.3}x; direct pulls would take {:.1} s ({MEMBERS}x)",
        took.as_secs_f64() / bound,
        egress as f64 / bytes as f64,
        cold.as_secs_f64() / cold_bound,
        cold_egress as f64 / cold_bytes as f64,
        bound * MEMBERS as f64,
    );
    Ok(())
}
