//! The tracker's HTTPS server: the v1 API over mutual TLS, plus the plain
//! HTTP ops endpoint (`/metrics`, `/healthz`, `/status`).
//!
//! Routes (JSON bodies of the [`shoal_proto::tracker_api`] types):
//!
//! | method and path | body → reply |
//! | --- | --- |
//! | `POST /v1/announce` | [`Announce`] → [`AnnounceReply`] |
//! | `GET /v1/blobs/{digest}[?node=ID]` | → [`LookupReply`] |
//! | `POST /v1/lease` | [`LeaseRequest`] → [`LeaseGrant`] |
//! | `POST /v1/hashes` | [`PublishHashes`] → [`PublishReply`] |
//! | `POST /v1/report` | [`Report`] → [`ReportReply`] |
//!
//! [`AnnounceReply`]: shoal_proto::tracker_api::AnnounceReply
//! [`LookupReply`]: shoal_proto::tracker_api::LookupReply
//! [`LeaseGrant`]: shoal_proto::tracker_api::LeaseGrant
//! [`PublishReply`]: shoal_proto::tracker_api::PublishReply
//! [`ReportReply`]: shoal_proto::tracker_api::ReportReply
//!
//! Every successful reply carries the tracker time it was made at in the
//! [`NOW_HEADER`] header (lease expiries are on that clock). Errors are
//! `{"error": {"code", "message"}}` ([`ErrorBody`]) with the status of
//! [`ErrorCode::status`].
//!
//! **Membership and identity.** TLS requires a client certificate of the
//! cluster CA, so outsiders are refused at the handshake. Beyond that, the
//! `node` a request speaks for must be one of the names (DNS or IP SANs) in
//! that certificate, compared exactly; otherwise `403 node_mismatch`.
//! Without this a member could publish hashes as another node, or report a
//! peer under several names to get it excluded. A lookup's requester is the
//! certificate's name, or `?node=` (one of its names) when it has several.
//!
//! The tracker core sits behind one mutex and is never held across an
//! `await`; its time comes from a [`Clock`]. A background tick calls
//! [`Tracker::expire`] to free memory of silent members between requests.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_proto::preheat::{JobProgress, PreheatRequest};
use shoal_proto::tracker_api::{
    Announce, HashCursor, JoinReply, JoinRequest, LeaseRequest, NodeId, PublishHashes,
    RenewRequest, Report, TrackerError,
};
use shoal_proto::Digest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::client::{ErrorBody, ErrorCode, ErrorDetail, POISONED};
use crate::clock::Clock;
use crate::command::{Command, Outcome};
use crate::metrics::Metrics;
use crate::replica::{Replica, ReplicaError};
use crate::Tracker;

/// Response header with the tracker time (ms) a reply was made at.
pub const NOW_HEADER: &str = "shoal-tracker-now-ms";

/// The largest request body accepted by default: 8 MiB, enough for a
/// publish of [`MAX_PUBLISH_HASHES`] hashes (about 5 MB of JSON).
///
/// [`MAX_PUBLISH_HASHES`]: shoal_proto::tracker_api::MAX_PUBLISH_HASHES
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 << 20;

/// Longest error message sent (serde messages can quote client input).
const MAX_MESSAGE: usize = 512;

/// Limits and timers of the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest request body; larger ones get `413 body_too_large`.
    /// Default [`DEFAULT_MAX_BODY_BYTES`].
    pub max_body_bytes: usize,
    /// Connections served at once; further accepts wait. Default 8192.
    pub max_connections: usize,
    /// Time allowed for a TLS handshake. Default 10 s.
    pub handshake_timeout: Duration,
    /// Time allowed to send request headers (slow-loris bound). Default 30 s.
    pub header_timeout: Duration,
    /// Time allowed to send a request body. Default 30 s.
    pub body_timeout: Duration,
    /// How long shutdown waits for in-flight requests. Default 10 s.
    pub drain_timeout: Duration,
    /// How often expired members and leases are dropped between requests.
    /// Default 1 s.
    pub expire_interval: Duration,
    /// The operator's deny list: a file of node names, one per line (`#`
    /// comments). Read at start and whenever it changes (checked every
    /// `deny_poll`); every replica of a cluster should read the same list.
    pub deny_file: Option<std::path::PathBuf>,
    /// How often the deny file is checked. Default 2 s.
    pub deny_poll: Duration,
    /// Joining with a token ([`Server::serve_join`]): who signs, which
    /// tokens count, for how long certificates are issued.
    pub join: Option<Arc<JoinConfig>>,
    /// The origin registry's notifications (`POST /v1/notifications` on
    /// the ops listener), if enabled.
    pub webhook: Option<Arc<crate::webhook::Webhook>>,
}

/// What the join listener needs.
pub struct JoinConfig {
    /// The cluster CA's signing key.
    pub signer: shoal_cluster::Signer,
    /// Tokens that let a node join (each at least [`MIN_JOIN_TOKEN`] bytes).
    pub tokens: Vec<String>,
    /// Lifetime of the certificates issued.
    pub validity: Duration,
}

impl std::fmt::Debug for JoinConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tokens.
        f.debug_struct("JoinConfig")
            .field("tokens", &self.tokens.len())
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

/// The shortest join token accepted: guessing one must be hopeless.
pub const MIN_JOIN_TOKEN: usize = 32;

/// Reads a join token file: one token per line (`#` comments), each at
/// least [`MIN_JOIN_TOKEN`] and at most
/// [`MAX_JOIN_TOKEN`](shoal_proto::tracker_api::MAX_JOIN_TOKEN) bytes.
pub fn read_join_tokens(path: &std::path::Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.split('#').next().unwrap_or("").trim();
        if t.is_empty() {
            continue;
        }
        if t.len() < MIN_JOIN_TOKEN || t.len() > shoal_proto::tracker_api::MAX_JOIN_TOKEN {
            return Err(format!(
                "line {}: a token must be {MIN_JOIN_TOKEN} to {} characters",
                i + 1,
                shoal_proto::tracker_api::MAX_JOIN_TOKEN
            ));
        }
        out.push(t.to_owned());
    }
    if out.is_empty() {
        return Err("no token in it".into());
    }
    Ok(out)
}

/// The longest a member's `GET /v1/jobs` waits for a new job.
const MAX_JOBS_WAIT_MS: u64 = 25_000;

/// Compares two secrets in time independent of where they differ.
pub(crate) fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_connections: 8192,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
            expire_interval: Duration::from_secs(1),
            deny_file: None,
            deny_poll: Duration::from_secs(2),
            join: None,
            webhook: None,
        }
    }
}

/// The tracker's TLS: the cluster identity's server config (TLS 1.3, client
/// certificates of the cluster CA required) with ALPN `h2` and `http/1.1`.
pub fn tls_config(identity: &shoal_cluster::Identity) -> anyhow::Result<rustls::ServerConfig> {
    let mut tls = identity.server_tls()?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tls)
}

/// A tracker server: the shared core, its clock, metrics and limits. Cheap
/// to clone; clones serve the same tracker.
#[derive(Debug, Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    tracker: Arc<RwLock<Tracker>>,
    clock: Arc<dyn Clock>,
    /// With replicas sharing a log: commands go through it, and time is
    /// the log's.
    replica: Option<Arc<Replica>>,
    metrics: Metrics,
    cfg: ServerConfig,
    started: Instant,
    /// Woken when a preheat job is created here (members long-poll for jobs).
    jobs_changed: tokio::sync::Notify,
}

impl Server {
    /// A server for `tracker`, reading time from `clock`.
    pub fn new(tracker: Arc<RwLock<Tracker>>, clock: Arc<dyn Clock>, cfg: ServerConfig) -> Self {
        Server {
            inner: Arc::new(Inner {
                tracker,
                clock,
                replica: None,
                metrics: Metrics::new(),
                cfg,
                started: Instant::now(),
                jobs_changed: tokio::sync::Notify::new(),
            }),
        }
    }

    /// A server for one replica of a tracker whose replicas share a log in
    /// Redis ([`crate::replica`]).
    pub fn replicated(replica: Arc<Replica>, cfg: ServerConfig) -> Self {
        let metrics = Metrics::replicated(replica.counters());
        Server {
            inner: Arc::new(Inner {
                tracker: replica.tracker().clone(),
                clock: Arc::new(crate::clock::MonotonicClock::new()),
                replica: Some(replica),
                metrics,
                cfg,
                started: Instant::now(),
                jobs_changed: tokio::sync::Notify::new(),
            }),
        }
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Serves the API over TLS on `listener` until `shutdown` resolves, then
    /// stops accepting and drains open connections for at most the drain
    /// timeout. Also runs the expiry tick meanwhile.
    pub async fn serve(
        &self,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: impl Future<Output = ()>,
    ) {
        let accept = self.accept_tls(listener, tls, shutdown, false);
        tokio::select! {
            () = accept => {}
            () = self.expiry() => {}
            () = self.deny_watch() => {}
        }
    }

    /// Applies the deny file whenever its contents change; never ends (or
    /// at once without a deny file). A file that does not read or parse is
    /// logged and the last list kept.
    async fn deny_watch(&self) {
        let Some(path) = self.inner.cfg.deny_file.clone() else {
            return std::future::pending().await;
        };
        let mut applied: Option<BTreeSet<NodeId>> = None;
        let mut tick = tokio::time::interval(self.inner.cfg.deny_poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let list = match read_deny_file(&path) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "cannot use the deny file; keeping the last list");
                    continue;
                }
            };
            if applied.as_ref() == Some(&list) {
                continue;
            }
            let count = list.len();
            match self.inner.execute(Command::Deny(list.clone())).await {
                Ok((Outcome::Denied(fresh), _)) => {
                    tracing::info!(file = %path.display(), denied = count, newly = fresh, "deny list applied");
                    applied = Some(list);
                }
                Ok(_) => unreachable!("a deny command has a deny outcome"),
                Err(f) => {
                    tracing::error!(file = %path.display(), code = %f.code, message = %f.message, "applying the deny list failed; retrying");
                }
            }
        }
    }

    /// Serves `POST /v1/join` alone on `listener` until `shutdown`: TLS
    /// with this tracker's certificate but no client certificates (a
    /// joining node has none yet). A node with a join token and a
    /// certificate request gets a certificate of the cluster CA for its
    /// name, unless it is denied.
    pub async fn serve_join(
        &self,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: impl Future<Output = ()>,
    ) {
        self.accept_tls(listener, tls, shutdown, true).await;
    }

    /// Accepts TLS connections on `listener` until `shutdown` and serves
    /// each (`join_only`: the join listener's single route).
    async fn accept_tls(
        &self,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: impl Future<Output = ()>,
        join_only: bool,
    ) {
        let acceptor = TlsAcceptor::from(tls);
        let builder = http_builder(&self.inner.cfg);
        let inner = self.inner.clone();
        accept_loop(
            listener,
            &self.inner.cfg,
            shutdown,
            move |stream, addr, watcher| {
                serve_tls_conn(
                    inner.clone(),
                    acceptor.clone(),
                    builder.clone(),
                    stream,
                    addr,
                    watcher,
                    join_only,
                )
            },
        )
        .await;
    }

    /// Serves the plain-HTTP ops endpoint on `listener` until `shutdown`:
    /// `/metrics` (OpenMetrics), `/healthz` (503 once the tracker state is
    /// unusable) and `/status` (JSON counts and config). Read-only.
    pub async fn serve_ops(&self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let cfg = ServerConfig {
            max_connections: 64,
            drain_timeout: Duration::from_secs(1),
            ..self.inner.cfg.clone()
        };
        let builder = http_builder(&cfg);
        let inner = self.inner.clone();
        accept_loop(listener, &cfg, shutdown, move |stream, _addr, watcher| {
            let inner = inner.clone();
            let builder = builder.clone();
            async move {
                let svc = service_fn(move |req| {
                    let inner = inner.clone();
                    async move { Ok::<_, Infallible>(inner.ops(req).await) }
                });
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .into_owned();
                let _ = watcher.watch(conn).await;
            }
        })
        .await;
    }

    /// Drops expired members and leases every `expire_interval`; never ends.
    async fn expiry(&self) {
        let mut tick = tokio::time::interval(self.inner.cfg.expire_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Some(r) = &self.inner.replica {
                if let Err(e) = r.submit(Command::Expire).await {
                    tracing::debug!(error = %e, "could not log the expiry tick");
                }
            } else if let Ok(mut t) = self.inner.tracker.write() {
                t.expire(self.inner.clock.now_ms());
            }
        }
    }
}

/// Reads a deny file: node names, one per line; blank lines and `#`
/// comments ignored. Any line that is not a node name refuses the whole
/// file (a typo must not lift a denial).
pub fn read_deny_file(path: &std::path::Path) -> Result<BTreeSet<NodeId>, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.len() > 1 << 20 {
        return Err(format!("{} bytes: the limit is 1 MiB", meta.len()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mut out = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let node = line
            .parse::<NodeId>()
            .map_err(|e| format!("line {}: {e}", i + 1))?;
        out.insert(node);
    }
    if out.len() > shoal_proto::tracker_api::MAX_DENIED {
        return Err(format!(
            "{} nodes: the limit is {}",
            out.len(),
            shoal_proto::tracker_api::MAX_DENIED
        ));
    }
    Ok(out)
}

fn http_builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_timeout);
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

/// Accepts connections until `shutdown`, at most `max_connections` at once,
/// each handled by `on_conn` in its own task; then stops accepting and waits
/// for watched connections to finish, at most `drain_timeout`.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    cfg: &ServerConfig,
    shutdown: impl Future<Output = ()>,
    on_conn: F,
) where
    F: Fn(TcpStream, SocketAddr, Watcher) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(cfg.max_connections));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            () = &mut shutdown => break,
        };
        let (stream, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off, don't spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = on_conn(stream, addr, graceful.watcher());
        tokio::spawn(async move {
            conn.await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(cfg.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?cfg.drain_timeout, "connections still open after the drain timeout; closing them");
    }
}

async fn serve_tls_conn(
    inner: Arc<Inner>,
    acceptor: TlsAcceptor,
    builder: auto::Builder<TokioExecutor>,
    stream: TcpStream,
    addr: SocketAddr,
    watcher: Watcher,
    join_only: bool,
) {
    let tls = match tokio::time::timeout(inner.cfg.handshake_timeout, acceptor.accept(stream)).await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            inner.metrics.handshake_failures.inc();
            tracing::info!(peer = %addr, error = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            inner.metrics.handshake_failures.inc();
            tracing::info!(peer = %addr, "TLS handshake timed out");
            return;
        }
    };
    let names = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|leaf| cert_names(leaf))
        .unwrap_or_default();
    tracing::debug!(peer = %addr, ?names, "member connected");
    let peer = Arc::new(Peer {
        addr,
        names,
        join_only,
    });
    inner.metrics.connections.inc();
    let svc = {
        let inner = inner.clone();
        service_fn(move |req| {
            let (inner, peer) = (inner.clone(), peer.clone());
            async move { Ok::<_, Infallible>(inner.handle(&peer, req).await) }
        })
    };
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(tls), svc)
        .into_owned();
    let _ = watcher.watch(conn).await;
    inner.metrics.connections.dec();
}

/// The most names taken from one certificate.
const MAX_CERT_NAMES: usize = 16;

/// The DNS and IP subject alternative names of a DER certificate (the
/// identities it vouches for). Empty if it has none or does not parse.
pub fn cert_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(s) => Some((*s).to_owned()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => Some(IpAddr::from(<[u8; 4]>::try_from(*b).ok()?).to_string()),
                16 => Some(IpAddr::from(<[u8; 16]>::try_from(*b).ok()?).to_string()),
                _ => None,
            },
            _ => None,
        })
        .take(MAX_CERT_NAMES)
        .collect()
}

/// A DER certificate's validity: (not before, not after) in seconds since
/// the Unix epoch. `None` if it does not parse.
pub fn cert_validity(der: &[u8]) -> Option<(i64, i64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let v = cert.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// The authenticated client of one connection.
#[derive(Debug)]
struct Peer {
    addr: SocketAddr,
    /// The names in its certificate.
    names: Vec<String>,
    /// A connection to the join listener: `/v1/join` only.
    join_only: bool,
}

impl Peer {
    /// Checks that the connection's certificate names `node`.
    fn check(&self, node: &NodeId) -> Result<(), Failure> {
        if self.names.iter().any(|n| n == node.as_str()) {
            return Ok(());
        }
        Err(Failure::new(
            ErrorCode::NodeMismatch,
            format!(
                "the request speaks for node {node:?} but the client certificate names {:?}",
                self.names
            ),
        ))
    }

    /// The node a lookup is for when the request does not say.
    fn default_node(&self) -> Result<NodeId, Failure> {
        match self.names.as_slice() {
            [one] => one.parse().map_err(|e: TrackerError| {
                Failure::new(
                    ErrorCode::NodeMismatch,
                    format!("the client certificate's name is not a node id: {e}"),
                )
            }),
            [] => Err(Failure::new(
                ErrorCode::NodeMismatch,
                "the client certificate names no node (no DNS or IP subject alternative name)",
            )),
            many => Err(Failure::new(
                ErrorCode::BadRequest,
                format!(
                    "the client certificate names several nodes {many:?}: say which with ?node="
                ),
            )),
        }
    }
}

/// An error response.
#[derive(Debug)]
struct Failure {
    code: ErrorCode,
    message: String,
    allow: Option<&'static str>,
}

impl Failure {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message: String = message.into();
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        Failure {
            code,
            message,
            allow: None,
        }
    }

    fn method(allow: &'static str, method: &Method, path: &str) -> Self {
        let mut f = Failure::new(
            ErrorCode::MethodNotAllowed,
            format!("{method} is not allowed on {path}: use {allow}"),
        );
        f.allow = Some(allow);
        f
    }

    fn response(&self) -> Response<Full<Bytes>> {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.as_str().to_owned(),
                message: self.message.clone(),
            },
        };
        let status =
            StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = json_response(status, &body);
        if let Some(allow) = self.allow {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        resp
    }
}

impl From<TrackerError> for Failure {
    fn from(e: TrackerError) -> Self {
        Failure::new(ErrorCode::from(&e), e.to_string())
    }
}

fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    // The API types serialize infallibly (no maps with non-string keys).
    let bytes = serde_json::to_vec(body).expect("API types serialize");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, bytes.len())
        .body(Full::new(Bytes::from(bytes)))
        .expect("valid response")
}

fn text_response(status: StatusCode, ct: &'static str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, ct)
        .header(header::CONTENT_LENGTH, body.len())
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

impl Inner {
    async fn handle(&self, peer: &Peer, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let started = Instant::now();
        // A member's transfer id, so its requests can be found in this log.
        let transfer = req
            .headers()
            .get(crate::https_client::TRANSFER_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|t| crate::https_client::valid_transfer_id(t))
            .map(str::to_owned);
        let (route, result) = self.dispatch(peer, req).await;
        let resp = result.unwrap_or_else(|f| {
            tracing::debug!(peer = %peer.addr, route, transfer, code = %f.code, message = %f.message, "request refused");
            f.response()
        });
        if let Some(transfer) = &transfer {
            tracing::debug!(
                transfer,
                route,
                status = resp.status().as_u16(),
                node = peer.names.first().map(String::as_str).unwrap_or(""),
                took_us = started.elapsed().as_micros() as u64,
                "member request"
            );
        }
        self.metrics
            .observe(route, resp.status().as_u16(), started.elapsed());
        resp
    }

    async fn dispatch(
        &self,
        peer: &Peer,
        req: Request<Incoming>,
    ) -> (&'static str, Result<Response<Full<Bytes>>, Failure>) {
        let path = req.uri().path().to_owned();
        if peer.join_only || path == "/v1/join" {
            return match (peer.join_only, path.as_str()) {
                (true, "/v1/join") => ("join", self.join(req).await),
                (true, _) => (
                    "other",
                    Err(Failure::new(
                        ErrorCode::NotFound,
                        format!("{path}: the join listener serves POST /v1/join only"),
                    )),
                ),
                (false, _) => (
                    "other",
                    Err(Failure::new(
                        ErrorCode::NotFound,
                        "/v1/join is served on the join listener (--join-listen)",
                    )),
                ),
            };
        }
        match path.as_str() {
            "/v1/announce" => (
                "announce",
                self.post(peer, req, Announce::node, Command::Announce)
                    .await,
            ),
            "/v1/lease" => (
                "lease",
                self.post(peer, req, LeaseRequest::node, Command::Lease)
                    .await,
            ),
            "/v1/hashes" => (
                "hashes",
                self.post(peer, req, PublishHashes::node, Command::Hashes)
                    .await,
            ),
            "/v1/report" => (
                "report",
                self.post(peer, req, Report::node, Command::Report).await,
            ),
            "/v1/renew" => ("renew", self.renew(peer, req).await),
            "/v1/preheat" => {
                let r = self
                    .post(peer, req, |r: &PreheatRequest| &r.node, Command::Preheat)
                    .await;
                // Members waiting for jobs look again.
                self.jobs_changed.notify_waiters();
                ("preheat", r)
            }
            "/v1/jobs/progress" => (
                "job_progress",
                self.post(peer, req, JobProgress::node, Command::JobProgress)
                    .await,
            ),
            "/v1/jobs" => ("jobs", self.jobs(peer, &req, None).await),
            p => match (p.strip_prefix("/v1/blobs/"), p.strip_prefix("/v1/jobs/")) {
                (Some(digest), _) => ("lookup", self.lookup(peer, &req, digest)),
                (_, Some(id)) => ("jobs", self.jobs(peer, &req, Some(id)).await),
                _ => (
                    "other",
                    Err(Failure::new(
                        ErrorCode::NotFound,
                        format!("no such endpoint: {path}"),
                    )),
                ),
            },
        }
    }

    /// Runs `op` on the core at the current tracker time: the clock's, or
    /// with replicas the time of the last log entry applied (`op` must then
    /// change nothing: changes go through the log).
    fn call<T>(
        &self,
        op: impl FnOnce(&mut Tracker, u64) -> Result<T, TrackerError>,
    ) -> Result<(T, u64), Failure> {
        let mut t = self
            .tracker
            .write()
            .map_err(|_| Failure::new(ErrorCode::Internal, POISONED))?;
        let now = self.now(&t);
        Ok((op(&mut t, now)?, now))
    }

    /// Runs `op` on the tracker under the shared lock (many at once, on
    /// every core) unless time passing has something to expire first: then
    /// `write`, under the exclusive one.
    fn read_or_write<T>(
        &self,
        op: impl FnOnce(&Tracker, u64) -> Result<T, TrackerError>,
        write: impl FnOnce(&mut Tracker, u64) -> Result<T, TrackerError>,
    ) -> Result<(T, u64), Failure> {
        {
            let t = self
                .tracker
                .read()
                .map_err(|_| Failure::new(ErrorCode::Internal, POISONED))?;
            let now = self.now(&t);
            if !t.expiry_due(now) {
                return Ok((op(&t, now)?, now));
            }
        }
        self.call(write)
    }

    /// The tracker time for a reply made from `t`'s state.
    fn now(&self, t: &Tracker) -> u64 {
        match self.replica {
            Some(_) => t.now(),
            None => self.clock.now_ms(),
        }
    }

    /// Applies a command: here, or through the replicas' log.
    async fn execute(&self, cmd: Command) -> Result<(Outcome, u64), Failure> {
        match &self.replica {
            None => {
                // What a lease request waited for the core counts as its
                // round trip (the cap on a blob's leases follows it).
                let asked = std::time::Instant::now();
                self.call(|t, now| cmd.waited(asked.elapsed()).apply(t, now))
            }
            Some(r) => r.submit(cmd).await.map_err(|e| match e {
                ReplicaError::Refused(e) => Failure::from(e),
                ReplicaError::Unavailable(why) => Failure::new(ErrorCode::Unavailable, why),
            }),
        }
    }

    fn reply<T: Serialize>(value: &T, now: u64) -> Response<Full<Bytes>> {
        let mut resp = json_response(StatusCode::OK, value);
        resp.headers_mut()
            .insert(NOW_HEADER, HeaderValue::from(now));
        resp
    }

    /// A JSON POST: reads and validates the body, checks that the
    /// certificate names the request's node, and applies `op`.
    async fn post<Q>(
        &self,
        peer: &Peer,
        req: Request<Incoming>,
        node_of: fn(&Q) -> &NodeId,
        command: fn(Q) -> Command,
    ) -> Result<Response<Full<Bytes>>, Failure>
    where
        Q: DeserializeOwned,
    {
        if req.method() != Method::POST {
            return Err(Failure::method("POST", req.method(), req.uri().path()));
        }
        let body = self.read_body(req).await?;
        let q: Q = serde_json::from_slice(&body).map_err(|e| {
            Failure::new(ErrorCode::BadRequest, format!("invalid request body: {e}"))
        })?;
        peer.check(node_of(&q))?;
        let (reply, now) = self.execute(command(q)).await?;
        Ok(Self::reply(&reply, now))
    }

    /// `POST /v1/renew`: a fresh certificate for the member the client
    /// certificate names, over a new key, unless it is denied.
    async fn renew(
        &self,
        peer: &Peer,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Failure> {
        let (join, q) = self.certificate_request::<RenewRequest>(req).await?;
        q.validate()?;
        peer.check(&q.node)?;
        self.issue(&join, &q.node, &q.csr, "certificate renewed")
    }

    /// The body of a join or renewal, if this tracker issues certificates.
    async fn certificate_request<Q: DeserializeOwned>(
        &self,
        req: Request<Incoming>,
    ) -> Result<(Arc<JoinConfig>, Q), Failure> {
        if req.method() != Method::POST {
            return Err(Failure::method("POST", req.method(), req.uri().path()));
        }
        let Some(join) = self.cfg.join.clone() else {
            return Err(Failure::new(
                ErrorCode::NotFound,
                "this tracker does not issue certificates (no --join-listen)",
            ));
        };
        let body = self.read_body(req).await?;
        let q = serde_json::from_slice(&body).map_err(|e| {
            Failure::new(ErrorCode::BadRequest, format!("invalid request body: {e}"))
        })?;
        Ok((join, q))
    }

    /// Signs `csr` for `node` unless it is denied.
    fn issue(
        &self,
        join: &JoinConfig,
        node: &NodeId,
        csr: &str,
        what: &'static str,
    ) -> Result<Response<Full<Bytes>>, Failure> {
        {
            let t = self
                .tracker
                .read()
                .map_err(|_| Failure::new(ErrorCode::Internal, POISONED))?;
            if t.denied().contains(node) {
                return Err(TrackerError::Denied(node.clone()).into());
            }
        }
        let cert = join
            .signer
            .sign(node.as_str(), csr, join.validity)
            .map_err(|e| Failure::new(ErrorCode::BadRequest, format!("{e:#}")))?;
        tracing::info!(%node, valid_for = ?join.validity, "{what}");
        let reply = JoinReply {
            certificate: cert,
            valid_for_s: join.validity.as_secs(),
        };
        Ok(json_response(StatusCode::OK, &reply))
    }

    /// `POST /v1/join`: a certificate for a node with a join token.
    async fn join(&self, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Failure> {
        let (join, q) = self.certificate_request::<JoinRequest>(req).await?;
        q.validate()?;
        let known = join.tokens.iter().fold(false, |ok, t| {
            same_secret(t.as_bytes(), q.token.as_bytes()) | ok
        });
        if !known {
            tracing::warn!(node = %q.node, "join refused: unknown token");
            return Err(Failure::new(ErrorCode::Unauthorized, "unknown join token"));
        }
        self.issue(&join, &q.node, &q.csr, "node joined: certificate issued")
    }

    async fn read_body(&self, req: Request<Incoming>) -> Result<Bytes, Failure> {
        let limit = self.cfg.max_body_bytes;
        let too_large = |declared: Option<u64>| {
            let size = declared.map_or(String::new(), |n| format!(" of {n} bytes"));
            Failure::new(
                ErrorCode::BodyTooLarge,
                format!("request body{size} exceeds the limit of {limit} bytes"),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(len) = declared.filter(|&l| l > limit as u64) {
            return Err(too_large(Some(len)));
        }
        let read = Limited::new(req.into_body(), limit).collect();
        match tokio::time::timeout(self.cfg.body_timeout, read).await {
            Ok(Ok(body)) => Ok(body.to_bytes()),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large(None)),
            Ok(Err(e)) => Err(Failure::new(
                ErrorCode::BadRequest,
                format!("reading the request body: {e}"),
            )),
            Err(_) => Err(Failure::new(
                ErrorCode::BadRequest,
                format!(
                    "the request body did not arrive within {:?}",
                    self.cfg.body_timeout
                ),
            )),
        }
    }

    fn lookup(
        &self,
        peer: &Peer,
        req: &Request<Incoming>,
        digest: &str,
    ) -> Result<Response<Full<Bytes>>, Failure> {
        if req.method() != Method::GET {
            return Err(Failure::method("GET", req.method(), req.uri().path()));
        }
        let blob: Digest = digest.parse().map_err(|e| {
            Failure::new(
                ErrorCode::BadRequest,
                format!("invalid digest in the path: {e}"),
            )
        })?;
        let query = req.uri().query().unwrap_or("");
        let param = |name: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        };
        let node = match param("node") {
            Some(n) => n.parse::<NodeId>()?,
            None => peer.default_node()?,
        };
        let since = param("since")
            .map(|c| {
                c.parse::<HashCursor>()
                    .map_err(|e| Failure::new(ErrorCode::BadRequest, format!("`since`: {e}")))
            })
            .transpose()?;
        peer.check(&node)?;
        let (reply, now) = self.read_or_write(
            |t, now| t.lookup_current(now, &node, &blob, since),
            |t, now| t.lookup_since(now, &node, &blob, since),
        )?;
        Ok(Self::reply(&reply, now))
    }

    /// `GET /v1/jobs?node=N` (that member's unfinished jobs), `GET
    /// /v1/jobs` (every job) and `GET /v1/jobs/ID` (one job).
    async fn jobs(
        &self,
        peer: &Peer,
        req: &Request<Incoming>,
        id: Option<&str>,
    ) -> Result<Response<Full<Bytes>>, Failure> {
        if req.method() != Method::GET {
            return Err(Failure::method("GET", req.method(), req.uri().path()));
        }
        if let Some(id) = id {
            let id: u64 = id.parse().map_err(|_| {
                Failure::new(
                    ErrorCode::BadRequest,
                    format!("job id {id:?} is not a number"),
                )
            })?;
            let (status, now) = self.call(|t, _| t.job(id))?;
            return Ok(Self::reply(&status, now));
        }
        let query = req.uri().query().unwrap_or("");
        let param = |name: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        };
        match param("node") {
            Some(n) => {
                let node: NodeId = n.parse()?;
                peer.check(&node)?;
                let wait = match param("wait_ms") {
                    None => 0,
                    Some(w) => w.parse::<u64>().map_err(|_| {
                        Failure::new(
                            ErrorCode::BadRequest,
                            format!("wait_ms {w:?} is not a number"),
                        )
                    })?,
                };
                let deadline = Instant::now() + Duration::from_millis(wait.min(MAX_JOBS_WAIT_MS));
                loop {
                    // Registered before looking, so a job created meanwhile wakes it.
                    let changed = self.jobs_changed.notified();
                    tokio::pin!(changed);
                    changed.as_mut().enable();
                    let ((jobs, new), now) =
                        self.call(|t, _| Ok((t.jobs_for(&node), t.has_new_jobs(&node))))?;
                    let left = deadline.saturating_duration_since(Instant::now());
                    if new || left.is_zero() {
                        return Ok(Self::reply(&jobs, now));
                    }
                    // Replicas apply jobs other replicas took: look again
                    // every second.
                    let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), changed).await;
                }
            }
            None => {
                let (reply, now) = self.call(|t, _| Ok(t.jobs()))?;
                Ok(Self::reply(&reply, now))
            }
        }
    }

    /// `POST /v1/notifications`: the origin registry's events, turned into
    /// preheat jobs ([`crate::webhook`]).
    async fn notifications(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Failure> {
        let Some(hook) = self.cfg.webhook.clone() else {
            return Err(Failure::new(
                ErrorCode::NotFound,
                "the registry webhook is off: start the tracker with --webhook-secret-file",
            ));
        };
        if req.method() != Method::POST {
            return Err(Failure::method("POST", req.method(), req.uri().path()));
        }
        let auth = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if !hook.authorized(auth) {
            return Err(Failure::new(
                ErrorCode::Unauthorized,
                "Authorization: Bearer <the --webhook-secret-file secret> required",
            ));
        }
        let body = Limited::new(req.into_body(), crate::webhook::MAX_BODY)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<LengthLimitError>().is_some() {
                    Failure::new(
                        ErrorCode::BodyTooLarge,
                        format!(
                            "notifications are at most {} bytes",
                            crate::webhook::MAX_BODY
                        ),
                    )
                } else {
                    Failure::new(
                        ErrorCode::BadRequest,
                        format!("reading the notification: {e}"),
                    )
                }
            })?
            .to_bytes();
        let envelope: crate::webhook::Envelope = serde_json::from_slice(&body).map_err(|e| {
            Failure::new(
                ErrorCode::BadRequest,
                format!("not a registry notification: {e}"),
            )
        })?;
        let decision = hook.decide(Instant::now(), &envelope);
        let mut jobs = Vec::new();
        let mut refused = decision.rejected.clone();
        for r in decision.preheats {
            let image = r.preheat.image.clone();
            match self.execute(Command::Preheat(r)).await {
                Ok((Outcome::Preheat(reply), _)) => {
                    tracing::info!(job = reply.job, %image, members = reply.nodes.len(), "preheat from the registry webhook");
                    jobs.push(reply.job);
                }
                Ok(_) => {}
                Err(f) => {
                    tracing::warn!(%image, code = %f.code, message = %f.message, "registry webhook preheat refused");
                    refused.push(format!("{image}: {}", f.message));
                }
            }
        }
        if !jobs.is_empty() {
            self.jobs_changed.notify_waiters();
        }
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({"jobs": jobs, "ignored": decision.ignored, "refused": refused}),
        ))
    }

    async fn ops(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path() == "/v1/notifications" {
            return self
                .notifications(req)
                .await
                .unwrap_or_else(|f| f.response());
        }
        let req = &req;
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "read-only endpoint\n".into(),
            );
        }
        let state = self
            .tracker
            .read()
            .ok()
            .map(|t| (t.stats(), t.config().clone(), self.now(&t)));
        match req.uri().path() {
            "/metrics" => {
                if let Some((stats, _, _)) = &state {
                    self.metrics.sample(stats);
                }
                text_response(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    self.metrics.encode(),
                )
            }
            "/healthz" => match state {
                Some(_) => text_response(StatusCode::OK, "text/plain", "ok\n".into()),
                None => text_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("{POISONED}\n"),
                ),
            },
            "/status" => match state {
                Some((stats, config, now)) => json_response(
                    StatusCode::OK,
                    &serde_json::json!({
                        "uptime_s": self.started.elapsed().as_secs(),
                        "now_ms": now,
                        "stats": stats,
                        "config": config,
                        "replica": self.replica.as_ref().map(|r| serde_json::json!({
                            "applied": r.applied().to_string(),
                        })),
                    }),
                ),
                None => text_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("{POISONED}\n"),
                ),
            },
            "/" => {
                let data = self.tracker.read().ok().map(|t| crate::page::PageData {
                    uptime_s: self.started.elapsed().as_secs(),
                    mode: match &self.replica {
                        None => "one tracker, state in memory".into(),
                        Some(r) => format!("replica, log applied to {}", r.applied()),
                    },
                    stats: t.stats(),
                    members: t.member_summaries(crate::page::ROWS),
                    blobs: t.hot_blobs(crate::page::ROWS),
                    jobs: t.jobs(),
                });
                match data {
                    Some(d) => text_response(
                        StatusCode::OK,
                        "text/html; charset=utf-8",
                        crate::page::render(&d),
                    ),
                    None => text_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        format!("{POISONED}\n"),
                    ),
                }
            }
            _ => text_response(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /, /metrics, /healthz or /status\n".into(),
            ),
        }
    }
}
