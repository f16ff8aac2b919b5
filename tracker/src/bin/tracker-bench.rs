//! `tracker-bench`: announces and lookups per second a `shoal-tracker`
//! process answers, sent the way members send them.
//!
//! It makes a throw-away cluster CA, starts `shoal-tracker` (the release
//! binary beside this one unless `--tracker-bin`) on loopback, and opens
//! `--connections` keep-alive mutual-TLS connections, each with its own node
//! certificate and the daemon's own client ([`HttpsTracker`], HTTP/2), with
//! `--depth` requests in flight on each. One request is one call as a
//! transfer makes it:
//!
//! - an **announce** of one blob the node is fetching (a partial bitfield,
//!   as a transfer sends every 200 ms), or
//! - a **lookup** of one blob with the cursor of the previous lookup (as a
//!   transfer sends every 500 ms: holders, leased chunks and only the
//!   hashes published since).
//!
//! Before the clock starts every node announces part of every blob, and
//! one node leases every chunk and publishes its hash, so lookups find
//! holders and a first lookup carries every hash. It prints requests per
//! second, latency percentiles, the CPU time of the tracker process and of
//! the load generator per request, and one JSON line.
//!
//! By default requests go back to back (the most the tracker answers).
//! `--rate R` paces them to R per second instead (a load test: did every
//! request succeed, at what latency). `--replicas N` runs N tracker
//! replicas sharing a `redis-server` the bench starts (`--store redis://`),
//! each member talking to all of them in its own order, and
//! `--kill-replica-after S` kills the first (`kill -9`) S seconds into the
//! measurement: members fail over, and the bench counts any request that
//! failed.
//!
//! ```sh
//! cargo build --release -p shoal-tracker --bins
//! target/release/tracker-bench --connections 32 --depth 8 --secs 10
//! target/release/tracker-bench --rate 10000 --secs 600 --replicas 2 --kill-replica-after 300
//! ```

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use shoal_proto::tracker_api::{
    Announce, BlobHave, ChunkHash, HashCursor, LeaseRequest, NodeId, PeerAddr, PublishHashes,
};
use shoal_proto::{Bitfield, ChunkLayout, Digest};
use shoal_tracker::client::TrackerApi;
use shoal_tracker::https_client::{HttpsConfig, HttpsTracker};

/// Tracker requests per second on keep-alive mutual TLS, sent as members
/// send them.
#[derive(Debug, Parser)]
#[command(name = "tracker-bench")]
struct Args {
    /// The tracker binary [default: shoal-tracker beside this binary].
    #[arg(long, value_name = "PATH")]
    tracker_bin: Option<PathBuf>,
    /// Connections (one node identity each).
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 8)]
    depth: usize,
    /// Measured seconds (after one second of warm-up).
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Blobs the nodes fetch.
    #[arg(long, default_value_t = 8)]
    blobs: u32,
    /// Size of each blob in MiB (256 KiB chunks: 64 chunks for 16 MiB).
    #[arg(long, default_value_t = 16)]
    blob_mib: u64,
    /// Share of lookups among the requests (the rest are announces).
    #[arg(long, default_value_t = 0.5)]
    lookup_share: f64,
    /// Worker threads of the load generator.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Requests per second in all, paced (0: back to back).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Tracker replicas sharing a redis-server the bench starts; 0 for one
    /// in-memory tracker.
    #[arg(long, default_value_t = 0)]
    replicas: usize,
    /// Kill (-9) the first replica this many seconds into the measurement.
    #[arg(long, value_name = "SECS")]
    kill_replica_after: Option<f64>,
}

/// xorshift64*: the bench needs cheap, repeatable choices, not randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// `shoal-tracker` as a child process, killed on drop.
struct TrackerProc {
    child: Child,
}

impl Drop for TrackerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Starts the tracker and waits until its ops port answers `/healthz`.
fn start_tracker(
    bin: &Path,
    cluster: &Path,
    extra: &[String],
) -> anyhow::Result<(TrackerProc, SocketAddr)> {
    let (api, ops) = (free_port()?, free_port()?);
    let child = Command::new(bin)
        .args(["--listen", &format!("127.0.0.1:{api}")])
        .args(["--ops-listen", &format!("127.0.0.1:{ops}")])
        .arg("--cluster-dir")
        .arg(cluster)
        .args(["--name", "127.0.0.1"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let proc = TrackerProc { child };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = TcpStream::connect((Ipv4Addr::LOCALHOST, ops)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut reply = String::new();
            let _ = s.read_to_string(&mut reply);
            if reply.starts_with("HTTP/1.1 200") {
                return Ok((proc, SocketAddr::from((Ipv4Addr::LOCALHOST, api))));
            }
        }
        ensure!(
            Instant::now() < deadline,
            "{} did not answer /healthz within 20 s",
            bin.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `redis-server` on a free loopback port, without persistence; returns
/// it and its port once it accepts connections.
fn start_redis(dir: &Path) -> anyhow::Result<(TrackerProc, u16)> {
    let port = free_port()?;
    let bin = ["/usr/bin/redis-server", "/usr/sbin/redis-server"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("redis-server");
    let child = Command::new(bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting redis-server (Debian package redis-server)")?;
    let proc = TrackerProc { child };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        ensure!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((proc, port))
}

/// User + system CPU seconds of a process, from `/proc/PID/stat`.
fn cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

/// One simulated member: its node id, address and client.
struct Member {
    node: NodeId,
    addr: PeerAddr,
    client: HttpsTracker,
}

/// A partial bitfield with about half the chunks set.
fn partial(layout: &ChunkLayout, rng: &mut Rng) -> Bitfield {
    let mut have = Bitfield::for_layout(layout);
    for i in 0..layout.count() {
        if rng.below(2) == 0 {
            let _ = have.set(i);
        }
    }
    have
}

fn announce_of(m: &Member, blob: Digest, layout: ChunkLayout, have: Bitfield) -> Announce {
    let bh = BlobHave::new(blob, layout, have, false).expect("bitfield fits the layout");
    Announce::new(m.node.clone(), m.addr.clone(), vec![bh], Vec::new(), false)
        .expect("one blob fits an announce")
}

/// Every member announces part of every blob; member 0 leases every chunk
/// and publishes its hash.
async fn prepare(
    members: &[Arc<Member>],
    blobs: &[Digest],
    layout: ChunkLayout,
) -> anyhow::Result<()> {
    let mut rng = Rng(0x5eed);
    for m in members {
        for b in blobs {
            m.client
                .announce(announce_of(m, *b, layout, partial(&layout, &mut rng)))
                .await
                .context("announce")?;
        }
    }
    let m = &members[0];
    for b in blobs {
        let mut from = 0;
        while from < layout.count() {
            let req = LeaseRequest::new(m.node.clone(), *b, layout, 16, from)?;
            let lease = m.client.lease(req).await.context("lease")?;
            let chunks = lease.grant.chunks;
            ensure!(!chunks.is_empty(), "no lease granted at chunk {from}");
            let hashes = chunks
                .iter()
                .map(|&i| {
                    (
                        i,
                        ChunkHash::from_bytes(Digest::of(&i.to_le_bytes()).as_bytes().to_owned()),
                    )
                })
                .collect();
            let p = PublishHashes::new(m.node.clone(), *b, hashes)?;
            let reply = m.client.publish_hashes(p).await.context("publish")?;
            ensure!(
                reply.rejected.is_empty(),
                "hashes refused: {:?}",
                reply.rejected
            );
            from = chunks.iter().max().map_or(from, |&i| i + 1);
        }
    }
    Ok(())
}

#[derive(Default)]
struct Tally {
    announces: u64,
    lookups: u64,
    errors: u64,
    first_error: Option<String>,
    latencies_us: Vec<u32>,
}

/// One in-flight slot: requests back to back until `end`; counts only what
/// completes after `start`.
#[allow(clippy::too_many_arguments)]
async fn slot(
    m: Arc<Member>,
    blobs: Arc<Vec<Digest>>,
    layout: ChunkLayout,
    share: f64,
    seed: u64,
    start: Instant,
    end: Instant,
    pace: Option<Duration>,
) -> Tally {
    let mut rng = Rng(seed | 1);
    let mut cursors: Vec<Option<HashCursor>> = vec![None; blobs.len()];
    let mut t = Tally::default();
    let threshold = (share.clamp(0.0, 1.0) * 1_000_000.0) as u64;
    // Paced slots start spread over one period.
    let mut next = pace.map(|p| start + p.mul_f64(rng.below(1_000_000) as f64 / 1e6));
    loop {
        if let (Some(at), Some(p)) = (next.as_mut(), pace) {
            if Instant::now() >= start {
                tokio::time::sleep_until((*at).into()).await;
                *at += p;
            }
        }
        let now = Instant::now();
        if now >= end {
            return t;
        }
        let bi = rng.below(blobs.len() as u64) as usize;
        let is_lookup = rng.below(1_000_000) < threshold;
        let ok = if is_lookup {
            match m.client.lookup(&m.node, &blobs[bi], cursors[bi]).await {
                Ok(view) => {
                    cursors[bi] = Some(view.cursor());
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            }
        } else {
            let a = announce_of(&m, blobs[bi], layout, partial(&layout, &mut rng));
            m.client
                .announce(a)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let done = Instant::now();
        if now < start {
            continue;
        }
        match ok {
            Ok(()) if is_lookup => t.lookups += 1,
            Ok(()) => t.announces += 1,
            Err(e) => {
                t.errors += 1;
                t.first_error.get_or_insert(e);
            }
        }
        t.latencies_us
            .push(u32::try_from(done.duration_since(now).as_micros()).unwrap_or(u32::MAX));
    }
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.connections >= 1 && args.depth >= 1,
        "--connections and --depth must be at least 1"
    );
    ensure!(
        args.secs > 0.0 && args.blobs >= 1,
        "--secs and --blobs must be positive"
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bin = match &args.tracker_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory")?
            .join("shoal-tracker"),
    };
    if !bin.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p shoal-tracker --bins) or give --tracker-bin",
            bin.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("shoal-tracker-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&args, &bin, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(args: &Args, bin: &Path, dir: &Path) -> anyhow::Result<()> {
    shoal_cluster::init(dir).context("making a cluster CA")?;
    let redis = match args.replicas {
        0 => None,
        _ => Some(start_redis(dir)?),
    };
    let store: Vec<String> = match &redis {
        Some((_, port)) => vec!["--store".into(), format!("redis://127.0.0.1:{port}")],
        None => vec![],
    };
    let mut trackers = Vec::new();
    let mut urls = Vec::new();
    for _ in 0..args.replicas.max(1) {
        let (t, api) = start_tracker(bin, dir, &store)?;
        trackers.push(t);
        urls.push(format!("https://127.0.0.1:{}", api.port()));
    }
    let mut members = Vec::new();
    for i in 0..args.connections {
        let name = format!("bench-{i}.shoal");
        let id = shoal_cluster::Identity::load(dir, &name)?;
        let mut mine = urls.clone();
        mine.rotate_left(i % urls.len());
        let client = HttpsTracker::new(&mine, id.client_tls()?, HttpsConfig::default())?;
        members.push(Arc::new(Member {
            node: name.parse()?,
            addr: format!("127.0.0.{}:4901", 2 + i % 250).parse()?,
            client,
        }));
    }
    let layout = ChunkLayout::for_blob(args.blob_mib << 20)?;
    let blobs: Arc<Vec<Digest>> = Arc::new(
        (0..args.blobs)
            .map(|i| Digest::of(&i.to_le_bytes()))
            .collect(),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    let pids: Vec<String> = trackers.iter().map(|t| t.child.id().to_string()).collect();
    let redis_pid = redis.as_ref().map(|(r, _)| r.child.id().to_string());
    // A killed replica's CPU is no longer readable: count it as 0 from then.
    let cpu_of =
        |pids: &[String]| -> f64 { pids.iter().map(|p| cpu_seconds(p).unwrap_or(0.0)).sum() };
    let slots = (args.connections * args.depth) as f64;
    let pace = (args.rate > 0.0).then(|| Duration::from_secs_f64(slots / args.rate));
    let (tally, measured, tracker_cpu, own_cpu, redis_cpu) = rt.block_on(async {
        prepare(&members, &blobs, layout).await?;
        let start = Instant::now() + Duration::from_secs(1);
        let end = start + Duration::from_secs_f64(args.secs);
        let mut tasks = Vec::new();
        for (i, m) in members.iter().enumerate() {
            for d in 0..args.depth {
                tasks.push(tokio::spawn(slot(
                    m.clone(),
                    blobs.clone(),
                    layout,
                    args.lookup_share,
                    (i * args.depth + d) as u64 * 0x9E37_79B9 + 7,
                    start,
                    end,
                    pace,
                )));
            }
        }
        tokio::time::sleep_until(start.into()).await;
        let (t0, own0) = (cpu_of(&pids), cpu_seconds("self")?);
        let r0 = cpu_of(redis_pid.as_slice());
        let wall0 = Instant::now();
        if let Some(after) = args.kill_replica_after {
            tokio::time::sleep(Duration::from_secs_f64(after)).await;
            let first = &mut trackers[0];
            let _ = first.child.kill();
            let _ = first.child.wait();
            println!("  killed replica 1 (kill -9) {after:.1} s into the measurement");
        }
        let mut all = Tally::default();
        for task in tasks {
            let t = task.await?;
            all.announces += t.announces;
            all.lookups += t.lookups;
            all.errors += t.errors;
            if all.first_error.is_none() {
                all.first_error = t.first_error;
            }
            all.latencies_us.extend(t.latencies_us);
        }
        let measured = wall0.elapsed().as_secs_f64();
        let (t1, own1) = (cpu_of(&pids), cpu_seconds("self")?);
        let r1 = cpu_of(redis_pid.as_slice());
        anyhow::Ok((all, measured, (t1 - t0).max(0.0), own1 - own0, r1 - r0))
    })?;
    drop(trackers);
    drop(redis);
    let mut lat = tally.latencies_us;
    lat.sort_unstable();
    let ok = tally.announces + tally.lookups;
    let rps = ok as f64 / measured;
    let per_req_us = |cpu: f64| if ok == 0 { 0.0 } else { cpu * 1e6 / ok as f64 };
    println!(
        "tracker-bench: {} connections x {} in flight, {} blobs of {} chunks, {:.0}% lookups, {}, {}",
        args.connections,
        args.depth,
        args.blobs,
        layout.count(),
        args.lookup_share * 100.0,
        match args.rate {
            r if r > 0.0 => format!("paced at {r:.0} req/s"),
            _ => "back to back".into(),
        },
        match args.replicas {
            0 => "one in-memory tracker".to_owned(),
            n => format!("{n} replica(s) sharing redis"),
        }
    );
    println!(
        "  {ok} requests in {measured:.1} s: {rps:.0} req/s ({} announces, {} lookups, {} errors)",
        tally.announces, tally.lookups, tally.errors
    );
    println!(
        "  latency p50 {} us, p99 {} us, max {} us",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(0)
    );
    println!(
        "  CPU: tracker {tracker_cpu:.2} s ({:.1} us/req, {:.0} req/s per core), load generator {own_cpu:.2} s ({:.1} us/req)",
        per_req_us(tracker_cpu),
        if tracker_cpu > 0.0 { ok as f64 / tracker_cpu } else { 0.0 },
        per_req_us(own_cpu)
    );
    if redis_pid.is_some() {
        println!(
            "  CPU: redis-server {redis_cpu:.2} s ({:.1} us/req)",
            per_req_us(redis_cpu)
        );
    }
    if let Some(e) = &tally.first_error {
        println!("  first error: {e}");
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "tracker",
            "connections": args.connections,
            "depth": args.depth,
            "blobs": args.blobs,
            "chunks": layout.count(),
            "lookup_share": args.lookup_share,
            "secs": measured,
            "requests": ok,
            "announces": tally.announces,
            "lookups": tally.lookups,
            "errors": tally.errors,
            "req_per_s": rps,
            "p50_us": percentile(&lat, 0.5),
            "p99_us": percentile(&lat, 0.99),
            "rate": args.rate,
            "replicas": args.replicas,
            "killed_replica_after_s": args.kill_replica_after,
            "redis_cpu_s": redis_cpu,
            "tracker_cpu_s": tracker_cpu,
            "tracker_cpu_us_per_req": per_req_us(tracker_cpu),
            "loadgen_cpu_s": own_cpu,
        })
    );
    ensure!(tally.errors == 0, "{} requests failed", tally.errors);
    Ok(())
}
