//! Shared helpers: a cluster CA in a temp dir, a tracker server on loopback
//! with real TLS and a hand-driven clock, and raw HTTPS/HTTP clients.

#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use shoal_cluster::Identity;
use shoal_tracker::clock::ManualClock;
use shoal_tracker::https_client::{HttpsConfig, HttpsTracker};
use shoal_tracker::server::{self, Server, ServerConfig};
use shoal_tracker::{Tracker, TrackerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Runs a test body with a hard time limit.
pub async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test took longer than 60 s")
}

/// A cluster CA in a temporary directory.
pub struct Cluster {
    pub dir: tempfile::TempDir,
}

impl Cluster {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        shoal_cluster::init(dir.path()).unwrap();
        Cluster { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn identity(&self, name: &str) -> Identity {
        Identity::load(self.dir.path(), name).unwrap()
    }

    /// The cluster CA as a root store.
    pub fn roots(&self) -> Arc<rustls::RootCertStore> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in
            rustls::pki_types::CertificateDer::pem_file_iter(self.path().join("ca.crt")).unwrap()
        {
            roots.add(c.unwrap()).unwrap();
        }
        Arc::new(roots)
    }

    /// An HTTPS tracker client for member `name`.
    pub fn client(&self, name: &str, urls: &[&str]) -> HttpsTracker {
        self.client_with(name, urls, HttpsConfig::default())
    }

    pub fn client_with(&self, name: &str, urls: &[&str], cfg: HttpsConfig) -> HttpsTracker {
        HttpsTracker::new(urls, self.identity(name).client_tls().unwrap(), cfg).unwrap()
    }
}

/// A tracker server on loopback, named 127.0.0.1 in its certificate.
pub struct Running {
    pub addr: SocketAddr,
    pub ops: SocketAddr,
    pub url: String,
    pub clock: Arc<ManualClock>,
    pub tracker: Arc<RwLock<Tracker>>,
    pub server: Server,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<()>>,
}

impl Running {
    pub async fn start(cluster: &Cluster) -> Running {
        Self::start_with(cluster, ServerConfig::default()).await
    }

    pub async fn start_with(cluster: &Cluster, cfg: ServerConfig) -> Running {
        let tls = server::tls_config(&cluster.identity("127.0.0.1")).unwrap();
        let clock = Arc::new(ManualClock::new(0));
        let tracker = Arc::new(RwLock::new(Tracker::new(TrackerConfig::default()).unwrap()));
        let srv = Server::new(tracker.clone(), clock.clone(), cfg);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, ops) = (
            listener.local_addr().unwrap(),
            ops_listener.local_addr().unwrap(),
        );
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let srv = srv.clone();
            async move {
                let (ops_tx, ops_rx) = oneshot::channel::<()>();
                let ops = tokio::spawn({
                    let srv = srv.clone();
                    async move {
                        srv.serve_ops(ops_listener, async {
                            let _ = ops_rx.await;
                        })
                        .await
                    }
                });
                srv.serve(listener, Arc::new(tls), async {
                    let _ = rx.await;
                })
                .await;
                let _ = ops_tx.send(());
                let _ = ops.await;
            }
        });
        Running {
            addr,
            ops,
            url: format!("https://127.0.0.1:{}", addr.port()),
            clock,
            tracker,
            server: srv,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Signals shutdown and returns the serve task.
    pub fn shutdown(&mut self) -> JoinHandle<()> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap()
    }
}

/// A raw HTTPS client presenting `identity`'s certificate (h2 or http/1.1).
pub fn raw_client(
    identity: &Identity,
) -> Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(identity.client_tls().unwrap())
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}

/// A raw reply: status, headers and the body parsed as JSON (or Null).
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub json: serde_json::Value,
}

pub async fn send(
    client: &Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    method: &str,
    url: &str,
    body: impl Into<Bytes>,
) -> Reply {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        json: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    }
}

/// A plain HTTP/1.0 GET; returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

/// A port nothing listens on (bound, then released).
pub async fn dead_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// The `shoal-tracker` binary, started with `args` on loopback ports and
/// named 127.0.0.1; its stderr is collected in the background.
pub struct TrackerProcess {
    pub child: std::process::Child,
    pub url: String,
    pub ops: SocketAddr,
    /// The join listener's URL, when started with `--join-listen`.
    pub join_url: Option<String>,
    log: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl TrackerProcess {
    pub async fn start(cluster: &Cluster, args: &[&str]) -> TrackerProcess {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let mut child = Command::new(env!("CARGO_BIN_EXE_shoal-tracker"))
            .args(["--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0"])
            .args(["--name", "127.0.0.1", "--cluster-dir"])
            .arg(cluster.path())
            .args(args)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        // Read until the "serving" line, then keep draining in the background.
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::thread::spawn(move || {
            let mut all = Vec::new();
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("shoal-tracker serving") {
                    let _ = tx.send(line.clone());
                }
                all.push(line);
            }
            all
        });
        let line = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
            .await
            .unwrap();
        let line = match line {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let log = log.join().unwrap().join("\n");
                panic!("the tracker never logged that it serves:\n{log}");
            }
        };
        let listen = log_field(&line, "listen=").to_owned();
        let ops = log_field(&line, "ops=").parse().unwrap();
        let join = log_field(&line, "join=");
        TrackerProcess {
            child,
            url: format!("https://{listen}"),
            ops,
            join_url: (join != "none").then(|| format!("https://{join}")),
            log: Some(log),
        }
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit (after a signal) and returns its log.
    pub fn logs(&mut self) -> String {
        self.log
            .take()
            .map(|h| h.join().unwrap().join("\n"))
            .unwrap_or_default()
    }

    /// The value of a metric line `NAME VALUE` on the ops port.
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, text) = http_get(self.ops, "/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }
}

impl Drop for TrackerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Value of `key=` in a log line.
pub fn log_field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

/// A `redis-server` on a loopback port, without persistence, stopped on
/// drop. Panics (the test fails) when redis-server is not installed.
pub struct RedisServer {
    child: std::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let port = dead_port().await;
        let child = Self::spawn(port, dir.path()).await;
        RedisServer {
            child,
            port,
            _dir: dir,
        }
    }

    /// `kill -9`, then a fresh (empty) redis-server on the same port.
    pub async fn restart_empty(&mut self) {
        self.kill();
        self.child = Self::spawn(self.port, self._dir.path()).await;
    }

    async fn spawn(port: u16, dir: &Path) -> std::process::Child {
        let bin = ["/usr/bin/redis-server", "/usr/sbin/redis-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("redis-server");
        let child = std::process::Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}): install the Debian package redis-server")
            });
        let started = std::time::Instant::now();
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await {
                let mut buf = [0u8; 7];
                if s.write_all(b"PING\r\n").await.is_ok()
                    && s.read_exact(&mut buf).await.is_ok()
                    && &buf == b"+PONG\r\n"
                {
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not answer on port {port}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        child
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
