//! The admin API `shoalctl` talks to: HTTP/1 + JSON on a Unix socket
//! (`--admin-socket`, default `DATA/admin.sock`, mode 0600), so only the
//! node's operator (root, or whoever runs shoald) can pin, evict or
//! preheat; nothing of it is reachable over the network.
//!
//! - `GET /v1/status` → [`Status`]
//! - `GET /v1/blobs` → `[BlobEntry]`
//! - `POST /v1/blobs/DIGEST/pin`, `POST /v1/blobs/DIGEST/unpin`,
//!   `DELETE /v1/blobs/DIGEST` (evict)
//! - `POST /v1/preheat` (a `Preheat`: this node asks) → `PreheatReply`, through the
//!   tracker; `GET /v1/jobs/ID` → [`JobStatus`]
//!
//! Errors are `{"error": {"code", "message"}}` with a matching status.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use shoal_proto::preheat::{JobStatus, Preheat, PreheatRequest};
use shoal_proto::Digest;
use shoal_tracker::client::{ApiError, JobsApi};
use tokio::net::UnixListener;

use crate::metrics::{self, KindLabel};
use crate::preheat::Preheater;
use crate::store::{AdminError, Kind, Store};
use crate::swarm::Swarm;
use crate::transfer::{Phase, Transfers};

/// Largest admin request body.
const MAX_BODY: usize = 64 << 10;

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// shoald's version.
    pub version: String,
    /// Seconds since start.
    pub uptime_s: u64,
    /// The node's name in the swarm (none: a mirror without a swarm).
    pub node: Option<String>,
    /// The tracker(s): `embedded` or URLs.
    pub trackers: Vec<String>,
    /// Peers this node is connected to (QUIC, connections it dialled).
    pub peers: usize,
    /// Connected DHT peers.
    pub dht_peers: i64,
    /// The store.
    pub store: StoreStatus,
    /// Bytes by where they came from or went.
    pub bytes: ByteCounts,
    /// Blobs being fetched now.
    pub transfers: Vec<TransferStatus>,
    /// Preheat jobs this node is working on.
    pub jobs: Vec<u64>,
}

/// Store usage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreStatus {
    /// Bytes held (complete blobs and reserved partials).
    pub used: u64,
    /// The quota.
    pub quota: u64,
    /// Complete blobs and manifests.
    pub blobs: usize,
    /// Pinned ones.
    pub pinned: usize,
}

/// Bytes since start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ByteCounts {
    /// Blob bytes from origins.
    pub origin: u64,
    /// Bytes from peers.
    pub peer_received: u64,
    /// Bytes sent to peers.
    pub peer_sent: u64,
    /// Bytes served to this node's runtime.
    pub served: u64,
}

/// One running transfer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransferStatus {
    /// The blob.
    pub digest: Digest,
    /// `starting`, `running`, `done`, `failed` or `no_room`.
    pub phase: String,
    /// Its size (0 while unknown).
    pub size: u64,
    /// Bytes written so far.
    pub written: u64,
}

/// `GET /v1/blobs`: one store record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlobEntry {
    /// The blob.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// `blob` or `manifest`.
    pub kind: String,
    /// Complete (verified) or arriving.
    pub complete: bool,
    /// Pinned.
    pub pinned: bool,
    /// Last use, seconds since the epoch.
    pub last_access: u64,
}

/// An admin error body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable code.
    pub code: String,
    /// For people.
    pub message: String,
}

/// What the admin API works with.
pub struct Admin {
    /// The store.
    pub store: Store,
    /// Running transfers.
    pub transfers: Transfers,
    /// The swarm, if the node is in one.
    pub swarm: Option<Arc<Swarm>>,
    /// Tracker URLs as configured (`embedded` for an in-process one).
    pub trackers: Vec<String>,
    /// The preheat worker, if the node is in a swarm.
    pub preheater: Option<Arc<Preheater>>,
    /// When shoald started.
    pub started: Instant,
}

type Reply = Response<Full<Bytes>>;

fn json<T: Serialize>(status: StatusCode, v: &T) -> Reply {
    let body = serde_json::to_vec(v).expect("admin replies serialize");
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Reply {
    json(
        status,
        &ErrorBody {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
            },
        },
    )
}

fn admin_error(e: &AdminError) -> Reply {
    let (status, code) = match e {
        AdminError::NotStored(_) => (StatusCode::NOT_FOUND, "not_stored"),
        AdminError::Partial(_) => (StatusCode::CONFLICT, "partial"),
        AdminError::Pinned(_) => (StatusCode::CONFLICT, "pinned"),
        AdminError::InUse(..) => (StatusCode::CONFLICT, "in_use"),
        AdminError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store"),
    };
    error(status, code, e.to_string())
}

fn tracker_error(e: &ApiError) -> Reply {
    let status = match e.code() {
        Some(c) => StatusCode::from_u16(c.status()).unwrap_or(StatusCode::BAD_GATEWAY),
        None => StatusCode::BAD_GATEWAY,
    };
    let code = e.code().map_or("tracker_unreachable", |c| c.as_str());
    error(status, code, format!("tracker: {e}"))
}

impl Admin {
    fn status(&self) -> Status {
        let m = metrics::global();
        let (used, blobs) = self.store.usage();
        let list = self.store.list();
        let pinned = list.iter().filter(|(_, m)| m.pinned).count();
        let transfers = self
            .transfers
            .list()
            .into_iter()
            .map(|(digest, p)| TransferStatus {
                digest,
                phase: match p.phase {
                    Phase::Starting => "starting",
                    Phase::Running => "running",
                    Phase::Done => "done",
                    Phase::Failed(_) => "failed",
                    Phase::NoRoom => "no_room",
                }
                .into(),
                size: p.size,
                written: p.written,
            })
            .collect();
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_s: self.started.elapsed().as_secs(),
            node: self.swarm.as_ref().map(|s| s.node.to_string()),
            trackers: self.trackers.clone(),
            peers: self.swarm.as_ref().map_or(0, |s| s.peers.connected()),
            dht_peers: m.dht_peers.get(),
            store: StoreStatus {
                used,
                quota: self.store.quota(),
                blobs,
                pinned,
            },
            bytes: ByteCounts {
                origin: m
                    .origin_bytes
                    .get_or_create(&KindLabel { kind: "blob" })
                    .get(),
                peer_received: m.peer_bytes_received.get(),
                peer_sent: m.peer_bytes_sent.get(),
                served: m.client_bytes_served.get(),
            },
            transfers,
            jobs: self
                .preheater
                .as_ref()
                .map(|p| p.running())
                .unwrap_or_default(),
        }
    }

    fn blobs(&self) -> Vec<BlobEntry> {
        self.store
            .list()
            .into_iter()
            .map(|(digest, m)| BlobEntry {
                digest,
                size: m.size,
                kind: match m.kind {
                    Kind::Blob => "blob",
                    Kind::Manifest => "manifest",
                }
                .into(),
                complete: m.complete,
                pinned: m.pinned,
                last_access: m.last_access,
            })
            .collect()
    }

    async fn blob_op(&self, method: &Method, rest: &str) -> Reply {
        let (digest, op) = match rest.split_once('/') {
            Some((d, op)) => (d, Some(op)),
            None => (rest, None),
        };
        let d: Digest = match digest.parse() {
            Ok(d) => d,
            Err(e) => return error(StatusCode::BAD_REQUEST, "bad_digest", e.to_string()),
        };
        let store = self.store.clone();
        let result = match (method, op) {
            (&Method::POST, Some("pin")) => {
                tokio::task::spawn_blocking(move || store.set_pinned(&d, true).map(|_| None)).await
            }
            (&Method::POST, Some("unpin")) => {
                tokio::task::spawn_blocking(move || store.set_pinned(&d, false).map(|_| None)).await
            }
            (&Method::DELETE, None) => {
                tokio::task::spawn_blocking(move || store.evict(&d).map(Some)).await
            }
            _ => {
                return error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "POST /v1/blobs/DIGEST/pin|unpin or DELETE /v1/blobs/DIGEST",
                )
            }
        };
        match result {
            Ok(Ok(freed)) => match self.store.meta(&d) {
                Some(m) => json(
                    StatusCode::OK,
                    &serde_json::json!({"digest": d, "pinned": m.pinned}),
                ),
                None => json(
                    StatusCode::OK,
                    &serde_json::json!({"digest": d, "evicted": true, "freed": freed}),
                ),
            },
            Ok(Err(e)) => admin_error(&e),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        }
    }

    async fn preheat(&self, body: Bytes) -> Reply {
        let Some(swarm) = &self.swarm else {
            return error(
                StatusCode::CONFLICT,
                "no_swarm",
                "this node is not in a swarm (no --tracker or --cluster-dir): nothing to preheat",
            );
        };
        let preheat: Preheat = match serde_json::from_slice(&body) {
            Ok(a) => a,
            Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
        };
        let req = PreheatRequest {
            node: swarm.node.clone(),
            preheat,
        };
        if let Err(e) = req.validate() {
            return error(StatusCode::BAD_REQUEST, "bad_request", e.to_string());
        }
        match swarm.tracker.primary().preheat(req).await {
            Ok(r) => {
                if let Some(p) = &self.preheater {
                    p.wake();
                }
                json(StatusCode::OK, &r)
            }
            Err(e) => tracker_error(&e),
        }
    }

    async fn job(&self, id: &str) -> Reply {
        let Some(swarm) = &self.swarm else {
            return error(
                StatusCode::CONFLICT,
                "no_swarm",
                "this node is not in a swarm",
            );
        };
        let Ok(id) = id.parse::<u64>() else {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("job id {id:?} is not a number"),
            );
        };
        match swarm.tracker.primary().job(id).await {
            Ok(s) => json::<JobStatus>(StatusCode::OK, &s),
            Err(e) => tracker_error(&e),
        }
    }

    /// Handles one admin request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Reply, Infallible> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return Ok(error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("admin requests are at most {MAX_BODY} bytes"),
                ))
            }
        };
        let reply = match (&method, path.as_str()) {
            (&Method::GET, "/v1/status") => json(StatusCode::OK, &self.status()),
            (&Method::GET, "/v1/blobs") => json(StatusCode::OK, &self.blobs()),
            (&Method::POST, "/v1/preheat") => self.preheat(body).await,
            (&Method::GET, p) if p.starts_with("/v1/jobs/") => {
                self.job(&p["/v1/jobs/".len()..]).await
            }
            (m, p) if p.starts_with("/v1/blobs/") => {
                self.blob_op(m, &p["/v1/blobs/".len()..]).await
            }
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no such admin endpoint: {method} {path}"),
            ),
        };
        Ok(reply)
    }
}

/// Binds the admin socket at `path`: a stale socket left by a crash is
/// replaced, a live one (another shoald) is refused; the socket is made
/// 0600.
pub async fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use anyhow::Context as _;
    use std::os::unix::fs::PermissionsExt as _;
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "--admin-socket {}: another shoald is serving it",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale --admin-socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding --admin-socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))?;
    Ok(listener)
}

/// Serves the admin API on `listener` until `stop` resolves; then removes
/// the socket file.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    admin: Arc<Admin>,
    stop: impl std::future::Future<Output = ()>,
) {
    let conns = Arc::new(tokio::sync::Semaphore::new(16));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let Ok(permit) = conns.clone().try_acquire_owned() else { continue };
                let admin = admin.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| admin.clone().handle(req));
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(std::time::Duration::from_secs(10))
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                    let _ = conn.await;
                    drop(permit);
                });
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}
