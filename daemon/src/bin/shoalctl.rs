//! `shoalctl`: the operator's command line for a node's shoald, over its
//! admin socket (`--socket`, default `/var/lib/shoal/admin.sock`): status,
//! the local store (ls, pin, unpin, evict) and cluster-wide preheats with
//! live progress.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressStyle};
use serde::de::DeserializeOwned;
use shoal_daemon::admin::{BlobEntry, ErrorBody, Status};
use shoal_proto::preheat::{JobState, JobStatus, NodeSelector, Preheat, PreheatReply};
use shoal_proto::Digest;

/// Operate a node's shoald: status, its store, and cluster-wide preheats.
#[derive(Debug, Parser)]
#[command(name = "shoalctl", version, about)]
struct Cli {
    /// shoald's admin socket.
    #[arg(
        long,
        env = "SHOAL_ADMIN_SOCKET",
        default_value = "/var/lib/shoal/admin.sock"
    )]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The node: transfers, store usage, origin and peer bytes.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The blobs in the node's store, most recently used first.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Keep a blob: eviction skips it until unpinned.
    Pin {
        /// The blob (sha256:…).
        digest: Digest,
    },
    /// Let eviction take a pinned blob again.
    Unpin {
        /// The blob (sha256:…).
        digest: Digest,
    },
    /// Remove a blob from the store now (refused while pinned or read).
    Evict {
        /// The blob (sha256:…).
        digest: Digest,
    },
    /// Have members fetch an image (or one blob) through the swarm before
    /// any runtime pulls it; shows progress per layer and overall, and
    /// exits non-zero if any member failed.
    Preheat {
        /// HOST/NAME[:TAG][@DIGEST] (the host names the origin).
        image: String,
        /// Which members: all, a count, rack=NAME, or NAME,NAME,…
        #[arg(long, default_value = "all")]
        nodes: NodeSelector,
        /// Platforms of a multi-platform image (repeatable; `all` for
        /// every one) [default: each member's own].
        #[arg(long = "platform", value_name = "OS/ARCH[/VARIANT]")]
        platforms: Vec<String>,
        /// IMAGE names a blob (HOST/NAME@sha256:…): fetch only that.
        #[arg(long)]
        blob: bool,
        /// Pin what is fetched.
        #[arg(long)]
        pin: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 1800)]
        timeout: u64,
        /// Create the job and print its id without waiting.
        #[arg(long)]
        no_wait: bool,
        /// Print the final job status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// A preheat job's status (any node's shoald can tell); exits 0 once
    /// every member is done, 1 while some run or if any failed.
    Job {
        /// The job id.
        id: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// One request to the admin socket; the reply's JSON, or its error.
async fn call<T: DeserializeOwned>(
    socket: &PathBuf,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> anyhow::Result<T> {
    let stream = tokio::net::UnixStream::connect(socket).await.with_context(|| {
        format!(
            "connecting to shoald's admin socket {} (is shoald running? set --socket or SHOAL_ADMIN_SOCKET)",
            socket.display()
        )
    })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "shoald")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let resp = tokio::time::timeout(Duration::from_secs(60), sender.send_request(req))
        .await
        .context("shoald did not answer within 60 s")??;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    if status != StatusCode::OK {
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(e) => bail!("{} ({})", e.error.message, e.error.code),
            Err(_) => bail!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)),
        }
    }
    serde_json::from_slice(&bytes).context("shoald's reply is not the expected JSON")
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

fn status(s: &Status) {
    println!("node        {}", s.node.as_deref().unwrap_or("(no swarm)"));
    println!("version     {} (up {} s)", s.version, s.uptime_s);
    println!(
        "tracker     {}",
        if s.trackers.is_empty() {
            "none".into()
        } else {
            s.trackers.join(", ")
        }
    );
    println!(
        "peers       {} connected, {} in the DHT",
        s.peers, s.dht_peers
    );
    println!(
        "store       {} of {} ({:.0}%), {} blobs, {} pinned",
        HumanBytes(s.store.used),
        HumanBytes(s.store.quota),
        100.0 * s.store.used as f64 / s.store.quota.max(1) as f64,
        s.store.blobs,
        s.store.pinned
    );
    let fetched = s.bytes.origin + s.bytes.peer_received;
    println!(
        "fetched     {} from the origin, {} from peers ({:.0}% from peers)",
        HumanBytes(s.bytes.origin),
        HumanBytes(s.bytes.peer_received),
        100.0 * s.bytes.peer_received as f64 / fetched.max(1) as f64
    );
    println!(
        "served      {} to this node's runtime, {} to peers",
        HumanBytes(s.bytes.served),
        HumanBytes(s.bytes.peer_sent)
    );
    if !s.jobs.is_empty() {
        let jobs: Vec<String> = s.jobs.iter().map(u64::to_string).collect();
        println!("preheating  job {}", jobs.join(", "));
    }
    if s.transfers.is_empty() {
        println!("transfers   none");
    } else {
        println!("transfers");
        println!(
            "  {:<71} {:>8} {:>10} {:>10}",
            "DIGEST", "PHASE", "WRITTEN", "SIZE"
        );
        for t in &s.transfers {
            println!(
                "  {:<71} {:>8} {:>10} {:>10}",
                t.digest.to_string(),
                t.phase,
                HumanBytes(t.written).to_string(),
                HumanBytes(t.size).to_string()
            );
        }
    }
}

fn ls(blobs: &[BlobEntry]) {
    println!(
        "{:<71} {:>10} {:<8} {:<8} {:<6}",
        "DIGEST", "SIZE", "KIND", "STATE", "PINNED"
    );
    for b in blobs {
        println!(
            "{:<71} {:>10} {:<8} {:<8} {:<6}",
            b.digest.to_string(),
            HumanBytes(b.size).to_string(),
            b.kind,
            if b.complete { "complete" } else { "partial" },
            if b.pinned { "yes" } else { "" }
        );
    }
    let total: u64 = blobs.iter().map(|b| b.size).sum();
    println!("{} blobs, {}", blobs.len(), HumanBytes(total));
}

/// Sums a job's progress: overall and by blob (over every member).
fn totals(s: &JobStatus) -> ((u64, u64), BTreeMap<Digest, (u64, u64)>) {
    let mut overall = (0, 0);
    let mut by_blob: BTreeMap<Digest, (u64, u64)> = BTreeMap::new();
    for p in s.nodes.values() {
        for b in &p.blobs {
            let e = by_blob.entry(b.digest).or_default();
            e.0 += b.done;
            e.1 += b.size;
            overall.0 += b.done;
            overall.1 += b.size;
        }
    }
    (overall, by_blob)
}

fn counts(s: &JobStatus) -> String {
    let n = |st: JobState| s.nodes.values().filter(|p| p.state == st).count();
    format!(
        "{} members: {} done, {} running, {} pending, {} failed",
        s.nodes.len(),
        n(JobState::Done),
        n(JobState::Running),
        n(JobState::Pending),
        n(JobState::Failed)
    )
}

/// Follows a job until every member finished or `timeout`; draws bars on
/// a terminal, prints a line every few seconds otherwise.
async fn follow(
    socket: &PathBuf,
    job: u64,
    timeout: Duration,
) -> anyhow::Result<(JobStatus, bool)> {
    let tty = std::io::stderr().is_terminal();
    let multi = MultiProgress::new();
    let style =
        ProgressStyle::with_template("{prefix:>19} [{bar:30}] {bytes:>10}/{total_bytes:<10} {msg}")
            .expect("valid template")
            .progress_chars("=> ");
    let overall = multi.add(ProgressBar::new(0).with_style(style.clone()));
    overall.set_prefix("all layers");
    let mut bars: BTreeMap<Digest, ProgressBar> = BTreeMap::new();
    let started = Instant::now();
    let mut last_line = Instant::now();
    let mut failing_since: Option<Instant> = None;
    loop {
        // The job goes on at the members whatever happens here: a tracker
        // or daemon briefly unreachable is waited out (30 s), not fatal.
        let s: JobStatus = match call(socket, Method::GET, &format!("/v1/jobs/{job}"), None).await {
            Ok(s) => {
                failing_since = None;
                s
            }
            Err(e) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_secs(30) {
                    return Err(e.context(format!(
                        "following job {job} (it goes on: `shoalctl job {job}`)"
                    )));
                }
                multi.suspend(|| eprintln!("shoalctl: {e:#}; trying again"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let ((done, total), by_blob) = totals(&s);
        overall.set_length(total);
        overall.set_position(done);
        overall.set_message(counts(&s));
        for (d, (done, total)) in &by_blob {
            let bar = bars.entry(*d).or_insert_with(|| {
                let b = multi.add(ProgressBar::new(0).with_style(style.clone()));
                b.set_prefix(d.to_string()["sha256:".len()..][..12].to_owned());
                b
            });
            bar.set_length(*total);
            bar.set_position(*done);
        }
        if !tty && last_line.elapsed() >= Duration::from_secs(5) {
            last_line = Instant::now();
            eprintln!(
                "job {job}: {} of {}; {}",
                HumanBytes(done),
                HumanBytes(total),
                counts(&s)
            );
        }
        if s.finished() {
            overall.finish();
            bars.values().for_each(ProgressBar::finish);
            return Ok((s, true));
        }
        if started.elapsed() >= timeout {
            overall.abandon();
            return Ok((s, false));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let socket = &cli.socket;
    match cli.cmd {
        Cmd::Status { json } => {
            let s: Status = call(socket, Method::GET, "/v1/status", None).await?;
            if json {
                print_json(&s)
            } else {
                status(&s)
            }
        }
        Cmd::Ls { json } => {
            let b: Vec<BlobEntry> = call(socket, Method::GET, "/v1/blobs", None).await?;
            if json {
                print_json(&b)
            } else {
                ls(&b)
            }
        }
        Cmd::Pin { digest } => {
            let _: serde_json::Value = call(
                socket,
                Method::POST,
                &format!("/v1/blobs/{digest}/pin"),
                None,
            )
            .await?;
            println!("pinned {digest}");
        }
        Cmd::Unpin { digest } => {
            let _: serde_json::Value = call(
                socket,
                Method::POST,
                &format!("/v1/blobs/{digest}/unpin"),
                None,
            )
            .await?;
            println!("unpinned {digest}");
        }
        Cmd::Evict { digest } => {
            let v: serde_json::Value =
                call(socket, Method::DELETE, &format!("/v1/blobs/{digest}"), None).await?;
            println!(
                "evicted {digest} ({} freed)",
                HumanBytes(v["freed"].as_u64().unwrap_or(0))
            );
        }
        Cmd::Job { id, json } => {
            let s: JobStatus = call(socket, Method::GET, &format!("/v1/jobs/{id}"), None).await?;
            if json {
                print_json(&s);
            } else {
                report(&s);
            }
            return Ok(exit_for(&s, s.finished()));
        }
        Cmd::Preheat {
            image,
            nodes,
            platforms,
            blob,
            pin,
            timeout,
            no_wait,
            json,
        } => {
            let ask = Preheat {
                image: image.clone(),
                blob,
                platforms,
                nodes,
                pin,
            };
            let reply: PreheatReply = call(
                socket,
                Method::POST,
                "/v1/preheat",
                Some(serde_json::to_vec(&ask)?),
            )
            .await?;
            let names: Vec<&str> = reply.nodes.iter().map(|n| n.as_str()).collect();
            eprintln!(
                "preheat job {}: {image} on {} members ({})",
                reply.job,
                names.len(),
                names.join(", ")
            );
            if no_wait {
                println!("{}", reply.job);
                return Ok(ExitCode::SUCCESS);
            }
            let (s, finished) = follow(socket, reply.job, Duration::from_secs(timeout)).await?;
            if json {
                print_json(&s);
            } else {
                report(&s);
            }
            if !finished {
                eprintln!("shoalctl: gave up waiting after {timeout} s; the job goes on (shoalctl job {})", reply.job);
            }
            return Ok(exit_for(&s, finished));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One line per member, failures with their reason.
fn report(s: &JobStatus) {
    println!("job {} {}: {}", s.job.id, s.job.preheat.image, counts(s));
    for (node, p) in &s.nodes {
        let (done, total) = p.bytes();
        let state = match p.state {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "FAILED",
        };
        match &p.error {
            Some(e) => println!("  {node:<24} {state:<8} {e}"),
            None => println!(
                "  {node:<24} {state:<8} {} blobs, {} of {}",
                p.blobs.len(),
                HumanBytes(done),
                HumanBytes(total)
            ),
        }
    }
}

/// Success only when every member is done.
fn exit_for(s: &JobStatus, finished: bool) -> ExitCode {
    if finished && s.failed().next().is_none() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shoalctl: {e:#}");
            ExitCode::from(2)
        }
    }
}
