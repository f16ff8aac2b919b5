//! `shoal-tracker`: the tracker as a service. Serves the v1 API over mutual
//! TLS on `--listen` to members holding a certificate of the cluster CA in
//! `--cluster-dir`, and `/metrics`, `/healthz`, `/status` over plain HTTP on
//! `--ops-listen`. State is in memory, or with `--store redis://...` shared
//! by replicas through Redis ([`shoal_tracker::replica`]). SIGTERM or Ctrl-C stops accepting and
//! drains open requests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use clap::Parser;
use shoal_tracker::clock::MonotonicClock;
use shoal_tracker::replica::{Replica, ReplicaConfig};
use shoal_tracker::server::{self, Server, ServerConfig};
use shoal_tracker::{Tracker, TrackerConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// mimalloc: every request allocates its JSON body, reply and HTTP/2
/// frames; glibc's allocator was ~6 % of the tracker's profile under
/// `tracker-bench` (the measured gain was within this machine's noise).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Shoal's tracker: who holds which chunks, chunk hashes and origin-fetch
/// leases, for the members of one cluster.
#[derive(Debug, Parser)]
#[command(name = "shoal-tracker", version, about)]
struct Args {
    /// HTTPS address for members.
    #[arg(
        long,
        env = "SHOAL_TRACKER_LISTEN",
        value_name = "ADDR",
        default_value = "0.0.0.0:4902"
    )]
    listen: SocketAddr,
    /// Cluster credentials: ca.crt + ca.key (the tracker issues itself a
    /// certificate for --name), or ca.crt + node.crt + node.key.
    #[arg(long, env = "SHOAL_TRACKER_CLUSTER_DIR", value_name = "DIR")]
    cluster_dir: PathBuf,
    /// The name in the tracker's certificate: the host (DNS name or IPv4
    /// address) members dial in --tracker https://NAME:PORT [default: this
    /// machine's hostname].
    #[arg(long, env = "SHOAL_TRACKER_NAME", value_name = "NAME")]
    name: Option<String>,
    /// Plain-HTTP /metrics, /healthz and /status.
    #[arg(
        long,
        env = "SHOAL_TRACKER_OPS_LISTEN",
        value_name = "ADDR",
        default_value = "0.0.0.0:4903"
    )]
    ops_listen: SocketAddr,
    /// Where the tracker state lives: `memory` (this process only), or
    /// `redis://[USER:PASSWORD@]HOST[:PORT][/DB]` for replicas that share
    /// it: run several trackers with the same --store and give members all
    /// their URLs (--tracker A --tracker B); any replica answers for all.
    #[arg(
        long,
        env = "SHOAL_TRACKER_STORE",
        value_name = "STORE",
        default_value = "memory",
        value_parser = parse_store
    )]
    store: String,
    /// Prefix of the Redis keys (one per cluster sharing a Redis server).
    #[arg(
        long,
        env = "SHOAL_TRACKER_STORE_PREFIX",
        value_name = "PREFIX",
        default_value = "shoal"
    )]
    store_prefix: String,
    /// How often one replica stores a snapshot of the state in Redis and
    /// trims the shared log (e.g. `60s`, `500ms`).
    #[arg(
        long,
        env = "SHOAL_TRACKER_SNAPSHOT_INTERVAL",
        value_name = "DURATION",
        default_value = "60s",
        value_parser = parse_duration
    )]
    snapshot_interval: std::time::Duration,
    /// The cluster's deny list: node names, one per line (`#` comments).
    /// Denied nodes are refused by the tracker and, once members hear of
    /// it in their next announce reply (within the announce interval, 5 s),
    /// by every member. Re-read when it changes; give every replica the
    /// same file.
    #[arg(long, env = "SHOAL_TRACKER_DENY_FILE", value_name = "FILE")]
    deny_file: Option<PathBuf>,
    /// Where nodes without a certificate join: TLS with the tracker's
    /// certificate, no client certificate; `POST /v1/join` with a join token
    /// and a certificate request gets a node certificate. Needs ca.key in
    /// --cluster-dir and --join-token-file.
    #[arg(
        long,
        env = "SHOAL_TRACKER_JOIN_LISTEN",
        value_name = "ADDR",
        requires = "join_token_file"
    )]
    join_listen: Option<SocketAddr>,
    /// Join tokens, one per line (`#` comments), each 32 to 256 characters
    /// (e.g. `openssl rand -hex 32`).
    #[arg(
        long,
        env = "SHOAL_TRACKER_JOIN_TOKEN_FILE",
        value_name = "FILE",
        requires = "join_listen"
    )]
    join_token_file: Option<PathBuf>,
    /// How long the node certificates issued to joining nodes are valid
    /// (`24h`, `90m`, `3600s`); nodes renew theirs when a third is left.
    #[arg(
        long,
        env = "SHOAL_TRACKER_NODE_CERT_VALIDITY",
        value_name = "DURATION",
        default_value = "24h",
        value_parser = parse_duration
    )]
    node_cert_validity: std::time::Duration,
    /// Turns on `POST /v1/notifications` on the ops listener: the origin
    /// registry's notifications (CNCF distribution `notifications.endpoints`
    /// with `Authorization: [Bearer SECRET]`), authenticated by this file's
    /// first line (16 to 256 characters).
    #[arg(long, env = "SHOAL_TRACKER_WEBHOOK_SECRET_FILE", value_name = "FILE")]
    webhook_secret_file: Option<PathBuf>,
    /// The origin's name as members know it (`registry.example.com`,
    /// `host:port`), for jobs from notifications [default: the Host the
    /// registry's client used].
    #[arg(long, env = "SHOAL_TRACKER_WEBHOOK_ORIGIN", value_name = "HOST")]
    webhook_origin: Option<String>,
    /// Repositories whose tagged pushes are preheated: a name, or a prefix
    /// ending in `*` (`team/*`; `*` for all). Repeatable.
    #[arg(
        long = "preheat-repo",
        env = "SHOAL_TRACKER_PREHEAT_REPO",
        value_name = "PATTERN",
        value_delimiter = ','
    )]
    preheat_repos: Vec<String>,
    /// A blob pulled from the origin this many times within
    /// --preheat-window is preheated (0: off).
    #[arg(
        long,
        env = "SHOAL_TRACKER_PREHEAT_PULLS",
        value_name = "K",
        default_value_t = 0
    )]
    preheat_pulls: u32,
    /// Bytes of one blob leased at once, per rack, to members fetching it
    /// from the origin (stretched by how long a lease is out but not at
    /// the origin); `16MiB` by default. Every leased run shares the
    /// origin's link, and its chunks are served on only once whole; too few
    /// runs at once leave the origin's link idle between them.
    #[arg(long, env = "SHOAL_TRACKER_ORIGIN_LEASE_BYTES", value_name = "SIZE", value_parser = parse_lease_bytes)]
    origin_lease_bytes: Option<u64>,
    /// The window for --preheat-pulls (`10m`, `60s`).
    #[arg(long, env = "SHOAL_TRACKER_PREHEAT_WINDOW", value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    preheat_window: std::time::Duration,
    /// Which members get webhook preheats: all, a count, rack=NAME, or
    /// NAME,NAME,…
    #[arg(
        long,
        env = "SHOAL_TRACKER_PREHEAT_NODES",
        value_name = "SELECTOR",
        default_value = "all"
    )]
    preheat_nodes: shoal_proto::preheat::NodeSelector,
    /// Platforms for webhook preheats of multi-platform images (repeatable;
    /// `all`) [default: each member's own].
    #[arg(
        long = "preheat-platform",
        env = "SHOAL_TRACKER_PREHEAT_PLATFORM",
        value_name = "OS/ARCH",
        value_delimiter = ','
    )]
    preheat_platforms: Vec<String>,
    /// Log format.
    #[arg(
        long,
        env = "SHOAL_TRACKER_LOG_FORMAT",
        value_name = "FORMAT",
        default_value = "text",
        value_parser = ["text", "json"]
    )]
    log_format: String,
}

fn parse_store(s: &str) -> Result<String, String> {
    if s == "memory" || s.starts_with("redis://") || s.starts_with("rediss://") {
        Ok(s.to_owned())
    } else {
        Err("must be `memory` or a redis:// URL".into())
    }
}

/// A size such as `4MiB`, at least one byte.
fn parse_lease_bytes(s: &str) -> Result<u64, String> {
    match shoal_proto::units::parse_size(s) {
        Ok(0) => Err("must be at least 1 byte".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{s:?} is not a duration such as 60s or 500ms");
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => std::time::Duration::from_millis(n),
        "s" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_secs(n * 60),
        "h" => std::time::Duration::from_secs(n * 3600),
        _ => return Err(bad()),
    };
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

/// This machine's host name, lowercased (DNS names are case-insensitive).
fn hostname() -> anyhow::Result<String> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .context("cannot read the hostname: give --name")?;
    Ok(raw.trim().to_ascii_lowercase())
}

/// A clap error as one line: its first paragraph (without the usage and
/// tips that follow), lines joined, without the `error: ` prefix.
fn one_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let first: Vec<&str> = rendered
        .trim_start()
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let line = first.join(" ");
    line.strip_prefix("error: ").unwrap_or(&line).to_owned()
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("shoal-tracker: {} (see --help)", one_line(&e));
            return ExitCode::from(2);
        }
    };
    let name = match args.name.clone().map_or_else(hostname, Ok) {
        Ok(n) if shoal_cluster::valid_node_id(&n) => n,
        Ok(n) => {
            eprintln!(
                "shoal-tracker: --name {n:?} must be a DNS name of lowercase labels ([a-z0-9-], dots between, at most 63 characters) or an IPv4 address"
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("shoal-tracker: {e:#}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&args.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("shoal-tracker")
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(args, name)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("shoal-tracker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: &str) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --{flag} {addr}"))
}

async fn run(args: Args, name: String) -> anyhow::Result<()> {
    let identity = shoal_cluster::Identity::load(&args.cluster_dir, &name)
        .with_context(|| format!("--cluster-dir {}", args.cluster_dir.display()))?;
    let tls = Arc::new(server::tls_config(&identity)?);
    if let Some(f) = &args.deny_file {
        let list = server::read_deny_file(f)
            .map_err(|e| anyhow::anyhow!("--deny-file {}: {e}", f.display()))?;
        tracing::info!(file = %f.display(), denied = list.len(), "deny list read");
    }
    let join = match &args.join_token_file {
        None => None,
        Some(f) => {
            let tokens = server::read_join_tokens(f)
                .map_err(|e| anyhow::anyhow!("--join-token-file {}: {e}", f.display()))?;
            let signer = shoal_cluster::Signer::load(&args.cluster_dir).with_context(|| {
                format!(
                    "--join-listen: --cluster-dir {}",
                    args.cluster_dir.display()
                )
            })?;
            Some(Arc::new(server::JoinConfig {
                signer,
                tokens,
                validity: args.node_cert_validity,
            }))
        }
    };
    let webhook = match &args.webhook_secret_file {
        None => None,
        Some(f) => {
            let secret = shoal_tracker::webhook::read_secret(f)
                .map_err(|e| anyhow::anyhow!("--webhook-secret-file {}: {e}", f.display()))?;
            if let Some(o) = &args.webhook_origin {
                anyhow::ensure!(
                    shoal_proto::reference::valid_host(o),
                    "--webhook-origin {o:?} is not HOST[:PORT]"
                );
            }
            for p in &args.preheat_platforms {
                shoal_proto::preheat::check_platform(p)
                    .map_err(|e| anyhow::anyhow!("--preheat-platform: {e}"))?;
            }
            if args.preheat_repos.is_empty() && args.preheat_pulls == 0 {
                tracing::warn!("--webhook-secret-file without --preheat-repo or --preheat-pulls: notifications are accepted and ignored");
            }
            tracing::info!(repos = ?args.preheat_repos, pulls = args.preheat_pulls, window = ?args.preheat_window,
                nodes = %args.preheat_nodes, "registry webhook on the ops listener (POST /v1/notifications)");
            Some(Arc::new(shoal_tracker::webhook::Webhook::new(
                shoal_tracker::webhook::WebhookConfig {
                    secret,
                    origin: args.webhook_origin.clone(),
                    repos: args.preheat_repos.clone(),
                    pulls: args.preheat_pulls,
                    window: args.preheat_window,
                    nodes: args.preheat_nodes.clone(),
                    platforms: args.preheat_platforms.clone(),
                },
            )))
        }
    };
    let server_cfg = ServerConfig {
        deny_file: args.deny_file.clone(),
        join,
        webhook,
        ..ServerConfig::default()
    };
    let mut tracker_cfg = TrackerConfig::default();
    if let Some(bytes) = args.origin_lease_bytes {
        tracker_cfg.max_blob_lease_bytes = bytes;
    }
    let server = if args.store == "memory" {
        let tracker = Tracker::new(tracker_cfg.clone())?
            .starting_epochs_at(shoal_tracker::clock::epoch_base());
        Server::new(
            Arc::new(RwLock::new(tracker)),
            Arc::new(MonotonicClock::new()),
            server_cfg,
        )
    } else {
        let mut cfg = ReplicaConfig::new(args.store.clone());
        cfg.prefix = args.store_prefix.clone();
        cfg.snapshot_interval = args.snapshot_interval;
        let replica = Replica::open(cfg, tracker_cfg).await?;
        Server::replicated(replica, server_cfg)
    };
    let listener = bind(args.listen, "listen").await?;
    let ops_listener = bind(args.ops_listen, "ops-listen").await?;
    let join_listener = match args.join_listen {
        Some(a) => Some(bind(a, "join-listen").await?),
        None => None,
    };
    let join_addr = join_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let (listen, ops) = (listener.local_addr()?, ops_listener.local_addr()?);

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let api = tokio::spawn({
        let server = server.clone();
        let stop = stopped(stop_rx.clone());
        async move { server.serve(listener, tls, stop).await }
    });
    let join_task = join_listener
        .map(|listener| {
            let server = server.clone();
            let stop = stopped(stop_rx.clone());
            let mut tls = identity.server_tls_without_client_auth()?;
            tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            anyhow::Ok(tokio::spawn(async move {
                server.serve_join(listener, Arc::new(tls), stop).await
            }))
        })
        .transpose()?;
    let ops_task = tokio::spawn({
        let server = server.clone();
        let stop = stopped(stop_rx.clone());
        async move { server.serve_ops(ops_listener, stop).await }
    });
    let store = if args.store == "memory" {
        "memory"
    } else {
        "redis"
    };
    let join = join_addr.map_or_else(|| "none".to_owned(), |a| a.to_string());
    tracing::info!(%listen, %ops, %join, %name, cluster_dir = %args.cluster_dir.display(), store, "shoal-tracker serving");

    shutdown_signal().await;
    tracing::info!("shutting down: no new connections; draining");
    let _ = stop_tx.send(true);
    let _ = api.await;
    let _ = ops_task.await;
    if let Some(t) = join_task {
        let _ = t.await;
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
