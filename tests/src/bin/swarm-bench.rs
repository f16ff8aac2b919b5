//! Loopback swarm benchmark: N `shoald` members and a `shoal-tracker` pull
//! the same cold image (L blobs of S MiB) at the same instant, against N
//! direct pulls from the same origin in the same run. Prints time and
//! origin egress (counted by a proxy in front of the real docker-registry)
//! for both, and one JSON line.
//!
//! `cargo build --release --workspace --bins && \
//!  SHOALD_BIN=target/release/shoald target/release/swarm-bench [N] [L] [S]
//!  [--rate RATE] [--chunk-size SIZE]`
//!
//! Loopback has no bandwidth limit: without `--rate` this measures origin
//! offload and the overhead of the swarm machinery. `--rate` (e.g.
//! `100mbit`) caps the origin (at the counting proxy) and every member's
//! peer upload (`--peer-upload-rate`) at that rate, a stand-in for
//! upload-limited hosts with unlimited download, where the Kumar–Ross bound
//! is `max(F/u_s, N·F/(u_s + N·u)) = F/rate`; the table then gives both
//! pulls as a multiple of it. `--chunk-size` is passed to every member.
//! (The netns lab with real shaped links is the benchmark issue's job.)

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use shoal_tests::cluster::Cluster;
use shoal_tests::fixture::Origin;
use shoal_tests::{fresh_seed, http, random_blob, ShoaldOpts, MIB};

#[tokio::main]
async fn main() -> Result<()> {
    let mut args: Vec<u64> = Vec::new();
    let mut rate: Option<u64> = None;
    let mut member_args: Vec<String> = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rate" => {
                let r = it.next().context("--rate needs a value")?;
                rate = Some(shoal_daemon::config::parse_rate(&r)?);
                member_args.extend(["--peer-upload-rate".into(), r]);
            }
            "--chunk-size" => {
                let c = it.next().context("--chunk-size needs a value")?;
                member_args.extend(["--chunk-size".into(), c]);
            }
            n => args.push(n.parse().with_context(|| format!("{n:?}: not a number"))?),
        }
    }
    let nodes = *args.first().unwrap_or(&8) as usize;
    let layers = *args.get(1).unwrap_or(&3) as usize;
    let layer_mib = *args.get(2).unwrap_or(&16) as usize;
    let origin = Origin::start().await?;
    let mut digests = Vec::new();
    for _ in 0..layers {
        let (blob, digest) = random_blob(layer_mib * MIB, fresh_seed());
        origin.registry.push_blob("bench/app", &blob).await?;
        digests.push(digest);
    }
    let image = (layers * layer_mib * MIB) as f64;
    origin.proxy.set_rate(rate);

    // Baseline: N direct pulls of every blob at once.
    let e0 = origin.egress();
    let t0 = Instant::now();
    let mut pulls = Vec::new();
    for _ in 0..nodes {
        for d in &digests {
            // Through the counting proxy, like the members' pulls.
            let url = format!("http://{}/v2/bench/app/blobs/{d}", origin.addr());
            let d = d.clone();
            pulls.push(tokio::spawn(async move {
                http::get_hashed(&http::client(), &url, &[])
                    .await?
                    .expect_complete(&d, (layer_mib * MIB) as u64)
            }));
        }
    }
    for p in pulls {
        p.await??;
    }
    let direct_s = t0.elapsed().as_secs_f64();
    let direct_egress = (origin.egress() - e0) as f64;

    // Shoal: N members pull every blob at once.
    let cluster = Cluster::start().await?;
    let mut members = Vec::new();
    for i in 0..nodes {
        members.push(
            cluster
                .member(&format!("node-{i}"), {
                    let mut o = ShoaldOpts::insecure_default(&origin.addr());
                    o.extra_args.extend(member_args.iter().cloned());
                    o
                })
                .await?,
        );
    }
    let e1 = origin.egress();
    let t1 = Instant::now();
    let mut pulls = Vec::new();
    for m in &members {
        for d in &digests {
            let url = format!("{}/v2/bench/app/blobs/{d}", m.registry_url());
            let d = d.clone();
            pulls.push(tokio::spawn(async move {
                let t = Instant::now();
                http::get_hashed(&http::client(), &url, &[])
                    .await?
                    .expect_complete(&d, (layer_mib * MIB) as u64)?;
                Ok::<_, anyhow::Error>(t.elapsed().as_secs_f64())
            }));
        }
    }
    for p in pulls {
        p.await??;
    }
    let shoal_s = t1.elapsed().as_secs_f64();
    let shoal_egress = (origin.egress() - e1) as f64;
    let mut peer_rx = 0.0;
    for m in &members {
        peer_rx += m.metric("shoal_peer_bytes_received_total", &[]).await?;
    }
    ensure!(shoal_egress > 0.0, "no origin bytes counted");

    println!("| {nodes} nodes, {layers} x {layer_mib} MiB | time s | origin egress × image |");
    println!("|---|---|---|");
    println!(
        "| direct pulls | {direct_s:.2} | {:.2} |",
        direct_egress / image
    );
    println!(
        "| shoal swarm | {shoal_s:.2} | {:.2} |",
        shoal_egress / image
    );
    println!(
        "time shoal/direct = {:.2}; peers moved {:.2} × image",
        shoal_s / direct_s,
        peer_rx / image
    );
    // With every upload capped at `rate` and downloads free: F / rate.
    let bound_s = rate.map(|r| image / r as f64);
    if let Some(b) = bound_s {
        println!(
            "bound {b:.2} s: shoal {:.2}× bound, direct {:.2}× bound",
            shoal_s / b,
            direct_s / b
        );
    }
    println!(
        "{{\"nodes\":{nodes},\"layers\":{layers},\"layer_mib\":{layer_mib},\"rate_bytes_per_s\":{},\"member_args\":{:?},\"bound_s\":{},\"direct_s\":{direct_s:.3},\"direct_egress_ratio\":{:.3},\"shoal_s\":{shoal_s:.3},\"shoal_egress_ratio\":{:.3},\"peer_bytes_ratio\":{:.3}}}",
        rate.map_or("null".into(), |r| r.to_string()),
        member_args.join(" "),
        bound_s.map_or("null".into(), |b| format!("{b:.3}")),
        direct_egress / image,
        shoal_egress / image,
        peer_rx / image
    );
    Ok(())
}
