//! `shoald`: the per-node Shoal daemon — the node's registry mirror.
//!
//! `shoald run` serves the OCI pull API on `--registry-listen` for the
//! node's container runtime, fetches from origins with verification and
//! single-flight, keeps verified blobs in a crash-safe store, and exports
//! `/metrics` and `/healthz` on `--ops-listen`.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use shoal_registry_shim::client::{ClientConfig, Credentials, OriginClient};
use shoal_registry_shim::serve::{self, ServerConfig, UpstreamPolicy};
use tokio::net::TcpListener;
use tokio::sync::watch;

use shoal_daemon::config::{Config, LogFormat, RunArgs};
use shoal_daemon::content::NodeContent;
use shoal_daemon::store::Store;
use shoal_daemon::{admin, ops, peer, preheat, swarm};

/// mimalloc keeps the chunk buffers of the peer and registry paths in
/// reused memory; glibc's allocator hands such 0.25–4 MiB buffers back to
/// the kernel and faults them in again (see docs/BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Shoal's per-node daemon: a verifying, streaming, single-flight registry mirror.
#[derive(Debug, Parser)]
#[command(name = "shoald", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the daemon (flags may also come from SHOAL_* variables and --config).
    Run(RunArgs),
    /// Write a new cluster CA (ca.crt, ca.key) into DIR, for quick starts and
    /// tests; production clusters bring their own CA.
    ClusterInit {
        /// Directory to create the CA in (refuses to replace one).
        dir: std::path::PathBuf,
    },
    /// Print (or with --write, install) the container runtime's mirror
    /// configuration pointing at this node's shoald. Files shoald did not
    /// write are kept as NAME.before-shoal first; the Docker daemon.json is
    /// merged, never replaced.
    Configure {
        /// The runtime.
        #[arg(value_enum)]
        runtime: shoal_daemon::configure::Runtime,
        /// shoald's registry endpoint, HOST:PORT.
        #[arg(long, default_value = "127.0.0.1:4900")]
        mirror: String,
        /// Origins to mirror, NAME or NAME=URL (repeatable) [default:
        /// docker.io, quay.io, ghcr.io, registry.k8s.io].
        #[arg(long = "origin", value_name = "NAME[=URL]")]
        origins: Vec<shoal_daemon::configure::Origin>,
        /// Where: containerd's certs.d directory, Docker's daemon.json, or
        /// the registries.conf.d drop-in [default: the runtime's usual path].
        #[arg(long)]
        path: Option<std::path::PathBuf>,
        /// Write the files (otherwise they are printed).
        #[arg(long)]
        write: bool,
    },
}

/// `shoald configure`: plans the files, then prints or writes them.
fn configure(
    runtime: shoal_daemon::configure::Runtime,
    mirror: &str,
    mut origins: Vec<shoal_daemon::configure::Origin>,
    path: Option<std::path::PathBuf>,
    write: bool,
) -> anyhow::Result<()> {
    use shoal_daemon::configure::{self as cf, Runtime};
    if !shoal_proto::reference::valid_host(mirror) {
        anyhow::bail!("--mirror {mirror:?} is not HOST:PORT");
    }
    if origins.is_empty() {
        for o in ["docker.io", "quay.io", "ghcr.io", "registry.k8s.io"] {
            origins.push(o.parse().map_err(anyhow::Error::msg)?);
        }
    }
    let path = path.unwrap_or_else(|| cf::default_path(runtime).into());
    let planned = cf::plan(runtime, mirror, &origins, &path, |p| {
        std::fs::read_to_string(p).ok()
    })?;
    for p in &planned {
        if write {
            match cf::write(p)? {
                Some(kept) => println!(
                    "wrote {} (the file that was there: {})",
                    p.path.display(),
                    kept.display()
                ),
                None => println!("wrote {}", p.path.display()),
            }
        } else {
            println!("# {}\n{}", p.path.display(), p.content);
        }
    }
    match runtime {
        Runtime::Containerd => println!(
            "containerd reads these with config_path = \"{}\" in its CRI registry config",
            path.display()
        ),
        Runtime::Docker if origins.iter().any(|o| o.name != "docker.io") => println!(
            "note: the Docker engine mirrors only Docker Hub; requests without ns go to shoald's --default-upstream"
        ),
        Runtime::Docker => println!("restart the Docker engine to use it"),
        Runtime::Crio => println!("restart CRI-O to use it"),
        Runtime::Podman => {}
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::ClusterInit { dir } => match shoal_cluster::init(&dir) {
            Ok(()) => {
                println!(
                    "wrote a new cluster CA to {}: give every node ca.crt, and either ca.key or a node.crt + node.key it issued",
                    dir.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("shoald cluster-init: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Configure {
            runtime,
            mirror,
            origins,
            path,
            write,
        } => match configure(runtime, &mirror, origins, path, write) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("shoald configure: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Run(args) => {
            let cfg = match args.resolve() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("shoald: {e:#}");
                    return ExitCode::from(2);
                }
            };
            init_tracing(cfg.log_format);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("shoald")
                .build()
                .expect("tokio runtime");
            match rt.block_on(run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("shoald: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: log files and log shippers get plain
    // `key=value` text (as shoal-tracker does).
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

/// Bytes of files under `dir` (the store's own usage before it is opened).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

fn quota(cfg: &Config) -> anyhow::Result<u64> {
    if let Some(q) = cfg.cache_max_bytes {
        return Ok(q);
    }
    let free = fs4::available_space(&cfg.data_dir).with_context(|| {
        format!(
            "reading free space of --data-dir {}",
            cfg.data_dir.display()
        )
    })?;
    let own = dir_bytes(&cfg.data_dir.join("blobs")) + dir_bytes(&cfg.data_dir.join("partial"));
    Ok((free + own) / 5 * 4)
}

async fn bind(addr: std::net::SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --{flag} {addr}"))
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating --data-dir {}", cfg.data_dir.display()))?;
    let quota = quota(&cfg)?;
    let data_dir = cfg.data_dir.clone();
    let (store, rec) = tokio::task::spawn_blocking(move || Store::open(&data_dir, quota))
        .await?
        .with_context(|| format!("opening the store in {}", cfg.data_dir.display()))?;
    let (used, blobs) = store.usage();
    tracing::info!(data_dir = %cfg.data_dir.display(), quota, used, blobs, partial = rec.partial,
        dropped = rec.dropped, adopted = rec.adopted, "store ready");

    let credentials = match &cfg.docker_config {
        Some(p) => Credentials::from_docker_config(p).with_context(|| format!("--docker-config {}", p.display()))?,
        None => match Credentials::default_path().filter(|p| p.exists()) {
            Some(p) => Credentials::from_docker_config(&p).unwrap_or_else(|e| {
                tracing::warn!(path = %p.display(), error = %e, "ignoring unreadable docker config");
                Credentials::none()
            }),
            None => Credentials::none(),
        },
    };
    let origin = OriginClient::new(ClientConfig {
        insecure_hosts: cfg.insecure_upstreams.clone(),
        credentials,
        ..ClientConfig::default()
    })
    .context("setting up the origin client")?;
    match &cfg.upstreams {
        None => tracing::warn!(
            "no --upstream given: this node fetches from any registry a client names"
        ),
        Some(u) => tracing::info!(upstreams = ?u, "origins allowed"),
    }
    let policy = Arc::new(UpstreamPolicy {
        default: cfg.default_upstream.clone(),
        allowed: cfg.upstreams.clone(),
    });
    let content = Arc::new(NodeContent::new(store.clone(), origin, cfg.authority_ttl));
    let peer_server = match &cfg.swarm {
        None => None,
        Some(sc) => {
            let vouched = peer::source::Vouched::default();
            let source = Arc::new(peer::source::NodeSource::vouching(
                store.clone(),
                content.transfers().clone(),
                sc.chunk_size,
                vouched.clone(),
            ));
            swarm::ensure_certificate(sc).await?;
            let (swarm, server) = swarm::Swarm::start(sc, source, vouched, &cfg.data_dir)?;
            content.transfers().join(swarm.clone());
            let heartbeat = tokio::spawn(
                swarm
                    .clone()
                    .heartbeat(store.clone(), Duration::from_secs(5)),
            );
            tracing::info!(node = %sc.node_id, peer_listen = %sc.peer_listen, advertise = %sc.advertise,
                tracker = ?if sc.trackers.is_empty() { vec!["embedded".to_owned()] } else { sc.trackers.clone() },
                upload_rate = ?sc.upload_rate, download_rate = ?sc.download_rate, max_uploads = sc.max_uploads, max_inflight = sc.max_inflight,
                chunk_size = sc.chunk_size, dht = ?sc.dht.as_ref().map(|d| d.advertise),
                "joined the swarm");
            Some((server, swarm, heartbeat))
        }
    };

    let registry_listener = bind(cfg.registry_listen, "registry-listen").await?;
    let ops_listener = bind(cfg.ops_listen, "ops-listen").await?;
    let admin_listener = admin::bind(&cfg.admin_socket).await?;
    let preheater = peer_server.as_ref().map(|(_, swarm, _)| {
        preheat::Preheater::new(
            swarm.clone(),
            content.clone(),
            policy.clone(),
            store.clone(),
        )
    });
    let preheat_task = preheater.clone().map(|p| tokio::spawn(p.run()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let registry = tokio::spawn({
        let (content, policy) = (content.clone(), policy.clone());
        serve::serve_http(
            registry_listener,
            ServerConfig::default(),
            move |req| serve::handle(content.clone(), policy.clone(), req),
            stopped(stop_rx.clone()),
        )
    });
    let ops = tokio::spawn({
        let store = store.clone();
        serve::serve_http(
            ops_listener,
            ServerConfig {
                max_connections: 64,
                drain_timeout: Duration::from_secs(1),
                ..ServerConfig::default()
            },
            move |req| ops::handle(store.clone(), req),
            stopped(stop_rx.clone()),
        )
    });
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        cfg.admin_socket.clone(),
        Arc::new(admin::Admin {
            store: store.clone(),
            transfers: content.transfers().clone(),
            swarm: peer_server.as_ref().map(|(_, s, _)| s.clone()),
            trackers: match &cfg.swarm {
                Some(sc) if sc.trackers.is_empty() => vec!["embedded".into()],
                Some(sc) => sc.trackers.clone(),
                None => vec![],
            },
            preheater,
            started: std::time::Instant::now(),
        }),
        stopped(stop_rx.clone()),
    ));
    let housekeeping = tokio::spawn({
        let store = store.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                let s = store.clone();
                let _ = tokio::task::spawn_blocking(move || s.flush_access_times()).await;
            }
        }
    });
    tracing::info!(registry = %cfg.registry_listen, ops = %cfg.ops_listen, default_upstream = %cfg.default_upstream,
        admin_socket = %cfg.admin_socket.display(), "shoald serving");

    shutdown_signal().await;
    tracing::info!("shutting down: no new connections; draining");
    let _ = stop_tx.send(true);
    let _ = registry.await;
    let _ = ops.await;
    let _ = admin_task.await;
    housekeeping.abort();
    if let Some(t) = preheat_task {
        t.abort();
    }
    if let Some((server, swarm, heartbeat)) = peer_server {
        heartbeat.abort();
        server.shutdown().await;
        // Members stop asking this node, and its leases go to others, now
        // rather than once its announces have stopped for a while.
        swarm.leave(Duration::from_secs(2)).await;
        swarm.peers.close_all();
    }
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.flush_access_times()).await??;
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
