//! `shoal-sim`: runs one swarm scenario and prints what it measured.
//!
//! ```text
//! shoal-sim --nodes 10000 --layers 5 --layer-bytes 200MiB --rate 10gbit --json
//! shoal-sim --scenario churn.toml --seed 7 --svg completions.svg
//! ```
//!
//! For digging into a run: `SHOAL_SIM_TRACE=INDEX` prints every request,
//! answer and chunk of member `INDEX` to stderr; `SHOAL_SIM_NODES=1` prints
//! each member's result line.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use shoal_proto::units::{parse_rate, parse_size};
use shoal_sim::scenario::Outage;
use shoal_sim::{Scenario, Sharing, Start};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Simulates a Shoal swarm pulling one image: the production scheduler,
/// session and tracker core, over a flow-level network in simulated time.
#[derive(Debug, Parser)]
#[command(name = "shoal-sim", version)]
struct Cli {
    /// A TOML scenario; flags given here override its fields.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Members pulling the image.
    #[arg(long)]
    nodes: Option<u32>,
    /// Layers in the image.
    #[arg(long)]
    layers: Option<u32>,
    /// Bytes per layer (e.g. 200MiB).
    #[arg(long, value_parser = size)]
    layer_bytes: Option<u64>,
    /// The cluster's chunk size (e.g. 256KiB).
    #[arg(long, value_parser = size)]
    chunk_size: Option<u64>,
    /// Each member's upload and download rate (e.g. 10gbit, 25mbit).
    #[arg(long, value_parser = rate)]
    rate: Option<u64>,
    /// The origin's upload rate (default: --rate).
    #[arg(long, value_parser = rate)]
    origin_rate: Option<u64>,
    /// Members pace their uploads to this rate, below --rate, as shoald's
    /// --peer-upload-rate does (the bound stays that of --rate).
    #[arg(long, value_parser = rate)]
    upload_cap: Option<u64>,
    /// The share of every link's bytes spent on headers, not blob bytes
    /// (about 0.05 at a 1500-byte MTU; default 0).
    #[arg(long)]
    header_share: Option<f64>,
    /// Round-trip time between hosts in milliseconds (e.g. 0.2).
    #[arg(long)]
    rtt_ms: Option<f64>,
    /// Tracker service time per request in microseconds (0: unlimited).
    #[arg(long)]
    tracker_us: Option<u64>,
    /// Requests each member serves at once (more wait or get `Busy`).
    #[arg(long)]
    upload_slots: Option<u32>,
    /// Requests each member holds while its upload slots are taken.
    #[arg(long)]
    upload_queue: Option<u32>,
    /// `Busy` answers carry a retry-after time (`true`) or not.
    #[arg(long)]
    busy_hint: Option<bool>,
    /// Tracker cores serving requests at once.
    #[arg(long)]
    tracker_cores: Option<u32>,
    /// Lookups hold the tracker core's lock shared (`true`, as the server's
    /// read lock does) or alone, like every other request (`false`).
    #[arg(long)]
    shared_lookups: Option<bool>,
    /// A member's downloads announce through one merging announcer (`true`,
    /// as the daemon's do) or each on its own (`false`).
    #[arg(long)]
    merge_announces: Option<bool>,
    /// Of --tracker-us, microseconds under the core's lock (serial across
    /// cores).
    #[arg(long)]
    tracker_serial_us: Option<u64>,
    /// Start: `all`, `stagger:MS` or `waves:COUNT:GAP_MS`.
    #[arg(long)]
    start: Option<String>,
    /// Fraction of members that die mid-pull.
    #[arg(long)]
    churn: Option<f64>,
    /// Of the members that die, the share that shut down cleanly: they
    /// tell the tracker they leave and close their connections, as shoald
    /// does on SIGTERM (default 0: all just stop answering).
    #[arg(long)]
    churn_leaves: Option<f64>,
    /// Fraction of members frozen from the start.
    #[arg(long)]
    frozen: Option<f64>,
    /// Fraction of members serving corrupt chunks.
    #[arg(long)]
    malicious: Option<f64>,
    /// Tracker outage `FROM_MS-UNTIL_MS` after the pull starts (repeatable).
    #[arg(long = "tracker-outage")]
    outages: Vec<String>,
    /// Racks (members spread evenly over them).
    #[arg(long)]
    racks: Option<u32>,
    /// Each rack's uplink rate.
    #[arg(long, value_parser = rate)]
    rack_uplink: Option<u64>,
    /// Members say their rack to the tracker (`true`, the default) or not.
    #[arg(long)]
    rack_labels: Option<bool>,
    /// Bandwidth sharing: `auto` (max-min up to 300 members, water-fill up
    /// to 3,000, fair share above), `fair-share`, `water-fill` or `max-min`.
    #[arg(long)]
    sharing: Option<String>,
    /// Seed of every random choice.
    #[arg(long)]
    seed: Option<u64>,
    /// Try another lookup interval (ms) than the daemon's.
    #[arg(long)]
    lookup_interval_ms: Option<u64>,
    /// Try another time to the next lookup when one soon is worth it (ms).
    #[arg(long)]
    hurried_lookup_ms: Option<u64>,
    /// Try another number of chunks in flight per peer than the daemon's.
    #[arg(long)]
    peer_depth: Option<u32>,
    /// Try another number of chunks in flight from peers per download.
    #[arg(long)]
    max_inflight: Option<u32>,
    /// Try another cap on the bytes of one blob at the origin at once than
    /// the tracker's (16MiB; e.g. 1TiB for every chunk leasable at once).
    #[arg(long, value_parser = size)]
    blob_lease_bytes: Option<u64>,
    /// Try another least time between announces (ms) than the daemon's.
    #[arg(long)]
    announce_every_ms: Option<u64>,
    /// Try another most time between announces of an incomplete download
    /// (ms) than the daemon's (0: heartbeats only).
    #[arg(long)]
    keepalive_ms: Option<u64>,
    /// Try another number of peers watched per download than the daemon's
    /// (0: learn of peers' chunks from the tracker only).
    #[arg(long)]
    watch_peers: Option<u32>,
    /// Print the report as one JSON line.
    #[arg(long)]
    json: bool,
    /// Write an SVG of completions over time.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Print progress to stderr every two million events (long runs).
    #[arg(long)]
    progress: bool,
}

fn size(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn rate(s: &str) -> Result<u64, String> {
    parse_rate(s).map_err(|e| e.to_string())
}

fn parse_start(s: &str) -> anyhow::Result<Start> {
    let parts: Vec<&str> = s.split(':').collect();
    let num = |p: &str| -> anyhow::Result<u64> {
        p.parse()
            .with_context(|| format!("--start {s:?}: {p:?} is not a number"))
    };
    Ok(match parts.as_slice() {
        ["all"] => Start::AllAtOnce,
        ["stagger", ms] => Start::Staggered { over_ms: num(ms)? },
        ["waves", count, gap] => Start::Waves {
            count: u32::try_from(num(count)?).context("--start: too many waves")?,
            gap_ms: num(gap)?,
        },
        _ => anyhow::bail!("--start {s:?}: expected all, stagger:MS or waves:COUNT:GAP_MS"),
    })
}

fn parse_outage(s: &str) -> anyhow::Result<Outage> {
    let (a, b) = s
        .split_once('-')
        .with_context(|| format!("--tracker-outage {s:?}: expected FROM_MS-UNTIL_MS"))?;
    let ms = |p: &str| -> anyhow::Result<u64> {
        p.trim()
            .parse()
            .with_context(|| format!("--tracker-outage {s:?}: {p:?} is not a number"))
    };
    Ok(Outage {
        from_ms: ms(a)?,
        until_ms: ms(b)?,
    })
}

fn scenario(cli: &Cli) -> anyhow::Result<Scenario> {
    let mut sc = match &cli.scenario {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Scenario::from_toml(&text).with_context(|| format!("scenario {}", p.display()))?
        }
        None => Scenario::default(),
    };
    // A flag given sets the scenario's field (`set_opt!`: an optional one).
    macro_rules! set {
        ($field:ident) => {
            if let Some(v) = cli.$field {
                sc.$field = v;
            }
        };
    }
    macro_rules! set_opt {
        ($field:ident) => {
            if cli.$field.is_some() {
                sc.$field = cli.$field;
            }
        };
    }
    set!(nodes);
    set!(layers);
    set!(layer_bytes);
    set!(rate);
    set!(churn);
    set!(churn_leaves);
    set!(frozen);
    set!(malicious);
    set!(racks);
    set!(seed);
    set!(tracker_us);
    set!(tracker_cores);
    set!(upload_slots);
    set!(upload_queue);
    set!(busy_hint);
    set!(shared_lookups);
    set!(merge_announces);
    set!(tracker_serial_us);
    set!(header_share);
    if let Some(c) = cli.chunk_size {
        sc.chunk_size = u32::try_from(c).context("--chunk-size is too large")?;
    }
    set_opt!(lookup_interval_ms);
    set_opt!(hurried_lookup_ms);
    set_opt!(peer_depth);
    set_opt!(max_inflight);
    set_opt!(blob_lease_bytes);
    set_opt!(announce_every_ms);
    set_opt!(keepalive_ms);
    set_opt!(watch_peers);
    set!(rack_labels);
    set_opt!(upload_cap);
    set_opt!(origin_rate);
    set_opt!(rack_uplink);
    if let Some(ms) = cli.rtt_ms {
        anyhow::ensure!(
            ms.is_finite() && (0.0..=10_000.0).contains(&ms),
            "--rtt-ms must be within 0..=10000"
        );
        sc.rtt_us = (ms * 1000.0).round() as u64;
    }
    if let Some(s) = &cli.start {
        sc.start = parse_start(s)?;
    }
    for o in &cli.outages {
        sc.tracker_outages.push(parse_outage(o)?);
    }
    if let Some(s) = &cli.sharing {
        sc.sharing = match s.as_str() {
            "auto" => Sharing::Auto,
            "fair-share" => Sharing::FairShare,
            "water-fill" => Sharing::WaterFill,
            "max-min" => Sharing::MaxMin,
            other => anyhow::bail!(
                "--sharing {other:?}: expected auto, fair-share, water-fill or max-min"
            ),
        };
    }
    sc.validate()?;
    Ok(sc)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let sc = scenario(&cli)?;
    let started = Instant::now();
    let mut sim = shoal_sim::Sim::new(sc)?;
    sim.progress = cli.progress;
    let mut report = sim.run();
    report.wall_s = started.elapsed().as_secs_f64();
    report.peak_rss_mib = shoal_sim::report::peak_rss_mib();
    if let Some(p) = &cli.svg {
        std::fs::write(p, report.svg()).with_context(|| format!("writing {}", p.display()))?;
    }
    if std::env::var_os("SHOAL_SIM_NODES").is_some() {
        for (i, n) in report.per_node.iter().enumerate() {
            eprintln!("n{i} {}", serde_json::to_string(n)?);
        }
    }
    if cli.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.table());
    }
    if !report.finished {
        std::process::exit(2);
    }
    Ok(())
}
