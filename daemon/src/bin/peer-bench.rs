//! `peer-bench`: one peer → one peer over QUIC, against raw quinn in the
//! same run.
//!
//! In one process it makes a throw-away cluster CA and two node identities,
//! stores one complete blob of random bytes, and measures, in interleaved
//! and rotated rounds:
//!
//! - **shoal**: endpoint A serves the blob with [`PeerServer`] from a
//!   [`StoreSource`]; endpoint B fetches every chunk with
//!   [`PeerClient::fetch_blob`] over `s` parallel requests, each chunk
//!   verified against the blob's [`ChunkHashes`] (then dropped);
//! - **raw**: two other endpoints with the same TLS and transport configs;
//!   the server writes the same bytes from memory on `s` parallel
//!   bidirectional streams, the client reads them to the end and drops them
//!   (no framing, no hashing, no disk).
//!
//! Both ends share the process and its tokio runtime (one worker per core),
//! so each figure includes sender and receiver. It prints medians in GB/s,
//! the ratio shoal/raw per stream count, the process's CPU time per GB
//! (`/proc/self/stat`), and one JSON line with every value.
//!
//! ```sh
//! cargo build --release -p shoal-daemon --bin peer-bench
//! target/release/peer-bench --mib 256 --rounds 5 --streams 1,4,8
//! ```

use std::collections::HashMap;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use clap::Parser;
use quinn::Endpoint;
use shoal_daemon::peer::client::PeerClient;
use shoal_daemon::peer::server::{PeerServer, ServeLimits};
use shoal_daemon::peer::source::StoreSource;
use shoal_daemon::peer::{self, PeerAddr};
use shoal_daemon::store::{Kind as BlobKind, Store};
use shoal_proto::{ChunkHashes, ChunkLayout, Digest};

/// mimalloc keeps the chunk buffers of the peer and registry paths in
/// reused memory; glibc's allocator hands such 0.25–4 MiB buffers back to
/// the kernel and faults them in again (see docs/BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The throughput goal: shoal at least this fraction of raw quinn.
const GOAL: f64 = 0.70;
/// Bound on one fetch; a healthy one takes about a second.
const FETCH_DEADLINE: Duration = Duration::from_secs(120);

/// One peer → one peer over QUIC with verification, against raw quinn.
#[derive(Debug, Parser)]
#[command(name = "peer-bench")]
struct Args {
    /// Blob size in MiB.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// Measured rounds (one warm-up round comes first).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Parallel streams to measure, comma-separated: shoal's concurrent
    /// requests and raw quinn's concurrent streams.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    streams: Vec<usize>,
    /// Chunks per shoal request (one stream each; at most 64).
    #[arg(long, default_value_t = 16)]
    per_request: usize,
    /// Chunk size in bytes (a power of two, 65536 to 4194304).
    #[arg(long, default_value_t = shoal_proto::chunk::DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
    /// Directory for the temporary cluster CA and store (default: the
    /// system's temp dir); removed at the end.
    #[arg(long)]
    tmp: Option<PathBuf>,
    /// Measure only this target (`shoal` or `raw`), e.g. under a profiler.
    #[arg(long, value_parser = ["shoal", "raw"])]
    only: Option<String>,
    /// Also append the JSON line to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(parent: Option<&Path>) -> anyhow::Result<TempDir> {
        let parent = parent.map_or_else(std::env::temp_dir, Path::to_path_buf);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = parent.join(format!("peer-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Incompressible bytes without a dependency: SplitMix64.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// CPU time (user + system) of the whole process so far, in seconds.
fn process_cpu_secs() -> f64 {
    // utime and stime are fields 14 and 15, counted after the `(comm)`
    // field, which may hold spaces; they are in USER_HZ (100 on Linux).
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) => (u + s) as f64 / 100.0,
        _ => f64::NAN,
    }
}

/// `YYYY-MM-DD HH:MM:SS` UTC of a Unix time (civil-from-days).
fn utc(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// A server endpoint of `id` on a free loopback port, with the peer
/// protocol's transport config.
fn server_endpoint(id: &shoal_cluster::Identity) -> anyhow::Result<Endpoint> {
    let mut server = id.quic_server()?;
    server.transport_config(peer::transport_config());
    Ok(Endpoint::server(
        server,
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
    )?)
}

/// A client-only endpoint of `id` on a free loopback port.
fn client_endpoint(id: &shoal_cluster::Identity) -> anyhow::Result<Endpoint> {
    let mut client = id.quic_client()?;
    client.transport_config(peer::transport_config());
    let mut ep = Endpoint::client(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    ep.set_default_client_config(client);
    Ok(ep)
}

/// The raw baseline's server: each bidirectional stream asks for a byte
/// range of `data` (two big-endian u64: offset, length) and gets exactly
/// those bytes, written from memory without a copy.
async fn raw_serve(endpoint: Endpoint, data: Bytes) {
    while let Some(incoming) = endpoint.accept().await {
        let data = data.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let data = data.clone();
                tokio::spawn(async move {
                    let Ok(req) = recv.read_to_end(16).await else {
                        return;
                    };
                    let Ok(req) = <[u8; 16]>::try_from(req.as_slice()) else {
                        return;
                    };
                    let start = u64::from_be_bytes(req[..8].try_into().expect("8 bytes")) as usize;
                    let len = u64::from_be_bytes(req[8..].try_into().expect("8 bytes")) as usize;
                    if data.get(start..start + len).is_none() {
                        return;
                    }
                    let mut at = start;
                    while at < start + len {
                        // The same 1 MiB pieces the peer protocol sends.
                        let end = (at + (1 << 20)).min(start + len);
                        if send.write_chunk(data.slice(at..end)).await.is_err() {
                            return;
                        }
                        at = end;
                    }
                    let _ = send.finish();
                    let _ = send.stopped().await;
                });
            }
        });
    }
}

/// The raw baseline's client: reads all `size` bytes over `streams`
/// parallel streams of one connection and drops them.
async fn raw_fetch(conn: &quinn::Connection, size: u64, streams: usize) -> anyhow::Result<u64> {
    let streams = streams.max(1) as u64;
    let part = size.div_ceil(streams);
    let reads = (0..streams).map(|i| {
        let start = (i * part).min(size);
        let len = part.min(size - start);
        async move {
            let (mut send, mut recv) = conn.open_bi().await?;
            let mut req = [0u8; 16];
            req[..8].copy_from_slice(&start.to_be_bytes());
            req[8..].copy_from_slice(&len.to_be_bytes());
            send.write_all(&req).await?;
            send.finish()?;
            let mut got = 0u64;
            while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
                got += chunk.bytes.len() as u64;
            }
            ensure!(got == len, "raw stream got {got} of {len} bytes");
            anyhow::Ok(got)
        }
    });
    let got = futures_util::future::try_join_all(reads).await?;
    Ok(got.iter().sum())
}

/// What is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Target {
    Shoal,
    Raw,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Shoal => "shoal",
            Target::Raw => "raw",
        }
    }
}

/// One measurement: GB/s and CPU seconds per GB.
#[derive(Debug, Clone, Copy)]
struct Sample {
    gbps: f64,
    cpu_per_gb: f64,
}

struct Bench {
    size: u64,
    blob: Digest,
    hashes: ChunkHashes,
    per_request: usize,
    client: PeerClient,
    peer: PeerAddr,
    raw: quinn::Connection,
}

impl Bench {
    async fn run(&self, kind: Target, streams: usize) -> anyhow::Result<Sample> {
        let cpu0 = process_cpu_secs();
        let t0 = Instant::now();
        match kind {
            Target::Shoal => {
                let stats = self
                    .client
                    .fetch_blob(
                        &self.peer,
                        &self.blob,
                        &self.hashes,
                        streams,
                        self.per_request,
                        FETCH_DEADLINE,
                    )
                    .await;
                ensure!(
                    stats.verified == self.hashes.layout().count()
                        && stats.verified_bytes == self.size,
                    "shoal fetch incomplete: {stats:?}"
                );
            }
            Target::Raw => {
                let got = raw_fetch(&self.raw, self.size, streams).await?;
                ensure!(
                    got == self.size,
                    "raw fetch got {got} of {} bytes",
                    self.size
                );
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let cpu = process_cpu_secs() - cpu0;
        let gb = self.size as f64 / 1e9;
        Ok(Sample {
            gbps: gb / secs,
            cpu_per_gb: cpu / gb,
        })
    }
}

/// Writes `data` into `store` as one complete blob and returns its chunk
/// map and digest.
fn store_blob(
    store: &Store,
    data: &[u8],
    chunk_size: u32,
) -> anyhow::Result<(ChunkHashes, Digest)> {
    let layout = ChunkLayout::for_blob_with(data.len() as u64, chunk_size)?;
    let (hashes, digest) = ChunkHashes::of_blob(layout, data)?;
    let (mut file, _) = store.begin_partial(&digest, BlobKind::Blob, layout)?;
    file.write_all(data)?;
    store.complete(&digest, &file, None)?;
    ensure!(
        store.has_complete(&digest),
        "the store did not keep the blob"
    );
    Ok((hashes, digest))
}

/// What [`measure`] starts from.
struct Setup {
    size: u64,
    store: Store,
    hashes: ChunkHashes,
    blob: Digest,
    /// The blob's bytes, for the raw server.
    data: Bytes,
    id_a: shoal_cluster::Identity,
    id_b: shoal_cluster::Identity,
    workers: usize,
}

/// Starts both pairs of endpoints, runs the rounds and prints the results.
async fn measure(args: Args, setup: Setup) -> anyhow::Result<()> {
    let Setup {
        size,
        store,
        hashes,
        blob,
        data,
        id_a,
        id_b,
        workers,
    } = setup;
    // shoal: A serves the store, B fetches.
    let a = server_endpoint(&id_a)?;
    let b = client_endpoint(&id_b)?;
    let server = PeerServer::spawn(
        a.clone(),
        Arc::new(StoreSource::new(store)),
        ServeLimits::default(),
    );
    let peer = PeerAddr {
        addr: server.local_addr()?,
        name: id_a.node_id.clone(),
    };
    // raw: two other endpoints with the same configs.
    let raw_a = server_endpoint(&id_a)?;
    let raw_b = client_endpoint(&id_b)?;
    let raw_addr = raw_a.local_addr()?;
    let raw_server = tokio::spawn(raw_serve(raw_a.clone(), data));
    let raw = raw_b.connect(raw_addr, &id_a.node_id)?.await?;

    let bench = Bench {
        size,
        blob,
        hashes,
        per_request: args.per_request,
        client: PeerClient::new(b.clone()),
        peer,
        raw,
    };
    let targets: Vec<Target> = [Target::Raw, Target::Shoal]
        .into_iter()
        .filter(|t| args.only.as_deref().is_none_or(|o| o == t.name()))
        .collect();
    let plan: Vec<(Target, usize)> = args
        .streams
        .iter()
        .flat_map(|&s| targets.iter().map(move |&t| (t, s)))
        .collect();
    // Warm-up (connections, page cache, allocator), not recorded.
    let widest = *args.streams.iter().max().expect("not empty");
    for &t in &targets {
        bench.run(t, widest).await?;
    }
    let started = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    eprintln!(
        "peer-bench: {} MiB blob, {} rounds, streams {:?}, {} chunks/request, {workers} runtime workers",
        args.mib, args.rounds, args.streams, args.per_request
    );
    let mut samples: HashMap<(Target, usize), Vec<Sample>> = HashMap::new();
    for round in 0..args.rounds {
        // Rotate the order so each target runs at every position.
        let mut line = format!("round {}:", round + 1);
        for k in 0..plan.len() {
            let (target, s) = plan[(k + round) % plan.len()];
            let sample = bench.run(target, s).await?;
            line += &format!(" {}x{s} {:.2}", target.name(), sample.gbps);
            samples.entry((target, s)).or_default().push(sample);
        }
        eprintln!("{line} GB/s");
    }

    let values = |t: Target, s: usize, f: fn(&Sample) -> f64| -> Vec<f64> {
        samples
            .get(&(t, s))
            .map_or_else(Vec::new, |v| v.iter().map(f).collect())
    };
    let gbps = |x: &Sample| x.gbps;
    let cpu = |x: &Sample| x.cpu_per_gb;
    println!();
    println!(
        "peer-bench {} UTC: {} MiB, medians of {} rounds, {} chunks per shoal request",
        utc(started),
        args.mib,
        args.rounds,
        args.per_request
    );
    println!(
        "| streams | shoal GB/s | raw quinn GB/s | shoal / raw | shoal CPU s/GB | raw CPU s/GB |"
    );
    println!("|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    let (mut best_shoal, mut best_raw) = (f64::NAN, f64::NAN);
    for &s in &args.streams {
        let shoal = median(&values(Target::Shoal, s, gbps));
        let raw = median(&values(Target::Raw, s, gbps));
        let shoal_cpu = median(&values(Target::Shoal, s, cpu));
        let raw_cpu = median(&values(Target::Raw, s, cpu));
        let ratio = shoal / raw;
        best_shoal = best_shoal.max(shoal);
        best_raw = best_raw.max(raw);
        println!("| {s} | {shoal:.2} | {raw:.2} | {ratio:.2} | {shoal_cpu:.2} | {raw_cpu:.2} |");
        rows.push(serde_json::json!({
            "streams": s,
            "shoal_gbps": values(Target::Shoal, s, gbps),
            "raw_gbps": values(Target::Raw, s, gbps),
            "shoal_cpu_s_per_gb": values(Target::Shoal, s, cpu),
            "raw_cpu_s_per_gb": values(Target::Raw, s, cpu),
            "shoal_median_gbps": shoal,
            "raw_median_gbps": raw,
            "ratio": ratio,
        }));
    }
    let best_ratio = best_shoal / best_raw;
    println!(
        "best shoal {best_shoal:.2} GB/s vs best raw quinn {best_raw:.2} GB/s: {best_ratio:.2} (goal ≥ {GOAL:.2}: {})",
        if best_ratio >= GOAL { "met" } else { "not met" }
    );
    let json = serde_json::json!({
        "bench": "peer-bench",
        "utc": utc(started),
        "unix_time": started,
        "blob_mib": args.mib,
        "rounds": args.rounds,
        "per_request": args.per_request,
        "chunk_size": args.chunk_size,
        "runtime_workers": workers,
        "results": rows,
        "best_shoal_gbps": best_shoal,
        "best_raw_gbps": best_raw,
        "best_ratio": best_ratio,
        "goal": GOAL,
        "goal_met": best_ratio >= GOAL,
    });
    println!("{json}");
    if let Some(path) = &args.out {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening --out {}", path.display()))?;
        writeln!(f, "{json}")?;
    }

    server.shutdown().await;
    raw_server.abort();
    for ep in [&a, &b, &raw_a, &raw_b] {
        ep.close(0u32.into(), b"done");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.mib > 0 && args.rounds > 0,
        "--mib and --rounds must be positive"
    );
    ensure!(!args.streams.is_empty(), "--streams is empty");
    if args.streams.contains(&0) {
        bail!("--streams must be at least 1");
    }
    let size = args.mib << 20;
    let tmp = TempDir::new(args.tmp.as_deref())?;
    let cluster = tmp.0.join("cluster");
    shoal_cluster::init(&cluster)?;
    let id_a = shoal_cluster::Identity::load(&cluster, "node-a")?;
    let id_b = shoal_cluster::Identity::load(&cluster, "node-b")?;
    let (store, _) = Store::open(&tmp.0.join("store"), 2 * size + (64 << 20))?;
    let data = random_bytes(size as usize, 0x5eed_0000 ^ size);
    let (hashes, blob) = store_blob(&store, &data, args.chunk_size)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench-rt")
        .build()?;
    let setup = Setup {
        size,
        store,
        hashes,
        blob,
        data: Bytes::from(data),
        id_a,
        id_b,
        workers: rt.metrics().num_workers(),
    };
    // On a worker, as a transfer in shoald runs, not on the main thread.
    rt.block_on(async move { tokio::spawn(measure(args, setup)).await? })?;
    drop(tmp);
    Ok(())
}
