//! [`HttpsTracker`]: the [`TrackerApi`] over HTTPS, for `--tracker https://…`.
//!
//! One pooled hyper client (HTTP/2 when the tracker offers it) over rustls
//! with the node's cluster identity. Each call tries the tracker URLs in
//! turn, starting with the last one that answered; a URL that cannot be
//! connected to is retried in later rounds (after a short backoff), one
//! that timed out is not retried within the call. A refusal from a tracker
//! ([`ApiError::Refused`]) ends the call at once: another replica would say
//! the same. Every v1 call is idempotent (a repeated announce, lease
//! renewal, publish or report changes nothing more), so retrying a request
//! that may have reached a tracker is safe.
//!
//! Worst case, a call takes about `urls × request_timeout` plus connect
//! failures and backoff; pick `request_timeout` with that in mind.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_proto::preheat::{JobProgress, JobStatus, JobsReply, PreheatReply, PreheatRequest};
use shoal_proto::tracker_api::{
    Announce, AnnounceReply, HashCursor, JoinReply, JoinRequest, LeaseGrant, LeaseRequest,
    LookupReply, NodeId, PublishHashes, PublishReply, RenewRequest, Report, ReportReply,
};
use shoal_proto::Digest;

use crate::client::{ApiError, ErrorBody, ErrorCode, JobsApi, Lease, TrackerApi};
use crate::server::{DEFAULT_MAX_BODY_BYTES, NOW_HEADER};

/// The header that carries a member's transfer id to the tracker, so that
/// the tracker's request logs can be matched with the member's.
pub const TRANSFER_HEADER: &str = "shoal-transfer";

tokio::task_local! {
    static TRANSFER: Arc<str>;
}

/// Runs `f` as part of transfer `id`: the tracker requests it makes carry
/// the id ([`TRANSFER_HEADER`]).
pub async fn in_transfer<F: std::future::Future>(id: Arc<str>, f: F) -> F::Output {
    TRANSFER.scope(id, f).await
}

/// The transfer the current task works for, if any.
pub fn current_transfer() -> Option<Arc<str>> {
    TRANSFER.try_with(Arc::clone).ok()
}

/// Whether `id` may be logged as a transfer id: 1 to 64 characters of
/// `[A-Za-z0-9._-]`.
pub fn valid_transfer_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Timeouts, retries and size limits of an [`HttpsTracker`].
#[derive(Debug, Clone)]
pub struct HttpsConfig {
    /// Time allowed for one attempt at one URL, from connecting to the last
    /// byte of the reply. Default 5 s.
    pub request_timeout: Duration,
    /// Time allowed to open a TCP connection. Default 2 s.
    pub connect_timeout: Duration,
    /// How many times each URL may be tried per call when it refuses
    /// connections (rounds over the URL list). Default 2.
    pub rounds: u32,
    /// Pause between rounds. Default 200 ms.
    pub retry_backoff: Duration,
    /// Largest request body sent; larger requests fail with
    /// [`ApiError::TooLarge`] without being sent. Default: the server's
    /// default limit, [`DEFAULT_MAX_BODY_BYTES`].
    pub max_request_bytes: usize,
    /// Largest reply accepted. Default 64 MiB (a lookup of a blob with a
    /// million chunks lists a million hashes).
    pub max_response_bytes: usize,
}

impl Default for HttpsConfig {
    fn default() -> Self {
        HttpsConfig {
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            rounds: 2,
            retry_backoff: Duration::from_millis(200),
            max_request_bytes: DEFAULT_MAX_BODY_BYTES,
            max_response_bytes: 64 << 20,
        }
    }
}

/// A tracker URL that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tracker URL {url:?}: {reason}")]
pub struct UrlError {
    /// The URL given (truncated).
    pub url: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// The tracker API over HTTPS with failover between tracker URLs. Cheap to
/// clone; clones share connections and the preferred URL.
#[derive(Clone)]
pub struct HttpsTracker {
    inner: Arc<Inner>,
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

struct Inner {
    /// Replaced when the node's certificate is renewed ([`HttpsTracker::set_tls`]).
    client: std::sync::RwLock<HttpClient>,
    /// Base URLs without a trailing slash.
    bases: Vec<String>,
    /// Index of the URL that answered last.
    preferred: AtomicUsize,
    cfg: HttpsConfig,
}

impl fmt::Debug for HttpsTracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpsTracker")
            .field("urls", &self.inner.bases)
            .field("preferred", &self.inner.preferred.load(Ordering::Relaxed))
            .field("cfg", &self.inner.cfg)
            .finish()
    }
}

/// Checks one `https://host[:port][/prefix]` URL and returns it without a
/// trailing slash.
fn base_url(url: &str) -> Result<String, UrlError> {
    let bad = |reason| UrlError {
        url: url.chars().take(200).collect(),
        reason,
    };
    let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad(
            "must start with https:// (the tracker only speaks mutual TLS)",
        ));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    if uri.query().is_some() {
        return Err(bad("must not have a query"));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// How one attempt at one URL went wrong.
enum Attempt {
    /// Could not connect: worth another round.
    Connect(String),
    /// Timed out, or the connection broke: not retried in this call.
    Gone(String),
    /// The tracker answered, but not with a v1 reply.
    Bad(u16, String),
}

/// Renders an error with its sources (hyper's own messages are terse).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s
}

fn build_client(tls: rustls::ClientConfig, cfg: &HttpsConfig) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.connect_timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector)
}

/// Asks the tracker's join listener at `url` (`https://host:port`) for a
/// node certificate: `tls` trusts the cluster CA and presents no client
/// certificate (the node has none yet).
pub async fn join(
    url: &str,
    mut tls: rustls::ClientConfig,
    request: &JoinRequest,
) -> Result<JoinReply, ApiError> {
    tls.alpn_protocols.clear();
    let base = base_url(url).map_err(|e| ApiError::Unreachable(e.to_string()))?;
    let cfg = HttpsConfig::default();
    let t = HttpsTracker {
        inner: Arc::new(Inner {
            client: std::sync::RwLock::new(build_client(tls, &cfg)),
            bases: vec![base],
            preferred: AtomicUsize::new(0),
            cfg,
        }),
    };
    t.post("/v1/join", request).await.map(|(r, _)| r)
}

impl HttpsTracker {
    /// Uses `tls` for new connections from now on (a renewed node
    /// certificate); connections open keep theirs until they close.
    pub fn set_tls(&self, mut tls: rustls::ClientConfig) {
        tls.alpn_protocols.clear();
        let client = build_client(tls, &self.inner.cfg);
        *self.inner.client.write().unwrap_or_else(|p| p.into_inner()) = client;
    }

    /// A fresh certificate for this node over the key of `csr` (PEM),
    /// authenticated by the certificate in use (`POST /v1/renew`).
    pub async fn renew(&self, node: &NodeId, csr: String) -> Result<JoinReply, ApiError> {
        let body = RenewRequest {
            node: node.clone(),
            csr,
        };
        self.post("/v1/renew", &body).await.map(|(r, _)| r)
    }

    /// A client for the trackers at `urls` (tried in this order first),
    /// authenticating with `tls` — the node's `Identity::client_tls()`,
    /// without ALPN (h2 and http/1.1 are offered here).
    pub fn new(
        urls: &[impl AsRef<str>],
        mut tls: rustls::ClientConfig,
        cfg: HttpsConfig,
    ) -> Result<Self, UrlError> {
        if urls.is_empty() {
            return Err(UrlError {
                url: String::new(),
                reason: "no tracker URL given",
            });
        }
        let bases = urls
            .iter()
            .map(|u| base_url(u.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        tls.alpn_protocols.clear();
        let client = build_client(tls, &cfg);
        Ok(HttpsTracker {
            inner: Arc::new(Inner {
                client: std::sync::RwLock::new(client),
                bases,
                preferred: AtomicUsize::new(0),
                cfg,
            }),
        })
    }

    /// The tracker URLs, in configured order.
    pub fn urls(&self) -> &[String] {
        &self.inner.bases
    }

    /// The URL tried first by the next call (the last one that answered).
    pub fn preferred_url(&self) -> &str {
        &self.inner.bases[self.inner.preferred.load(Ordering::Relaxed) % self.inner.bases.len()]
    }

    async fn post<Q: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &Q,
    ) -> Result<(R, Option<u64>), ApiError> {
        let bytes = serde_json::to_vec(body).expect("API types serialize");
        if bytes.len() > self.inner.cfg.max_request_bytes {
            return Err(ApiError::TooLarge {
                size: bytes.len(),
                limit: self.inner.cfg.max_request_bytes,
            });
        }
        self.call(Method::POST, path, Bytes::from(bytes)).await
    }

    /// Sends one request with failover and retries; returns the decoded
    /// reply and the tracker time it was made at.
    async fn call<R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(R, Option<u64>), ApiError> {
        let n = self.inner.bases.len();
        let first = self.inner.preferred.load(Ordering::Relaxed) % n;
        let mut retry = vec![true; n];
        let mut failures: Vec<String> = Vec::new();
        let mut last_status: Option<u16> = None;
        for round in 0..self.inner.cfg.rounds.max(1) {
            if !retry.iter().any(|&r| r) {
                break;
            }
            if round > 0 {
                tokio::time::sleep(self.inner.cfg.retry_backoff).await;
            }
            for k in 0..n {
                let i = (first + k) % n;
                if !retry[i] {
                    continue;
                }
                let url = format!("{}{path}", self.inner.bases[i]);
                match self.attempt::<R>(&method, &url, body.clone()).await {
                    Ok(Ok(reply)) => {
                        self.inner.preferred.store(i, Ordering::Relaxed);
                        return Ok(reply);
                    }
                    Ok(Err(refused)) => {
                        self.inner.preferred.store(i, Ordering::Relaxed);
                        return Err(refused);
                    }
                    Err(Attempt::Connect(why)) => failures.push(format!("{url}: {why}")),
                    Err(Attempt::Gone(why)) => {
                        retry[i] = false;
                        failures.push(format!("{url}: {why}"));
                    }
                    Err(Attempt::Bad(status, why)) => {
                        retry[i] = false;
                        failures.push(format!("{url}: HTTP {status}: {why}"));
                        last_status = Some(status);
                    }
                }
            }
        }
        let message = failures.join("; ");
        Err(match last_status {
            // Some tracker answered, but brokenly.
            Some(status) => ApiError::BadResponse { status, message },
            None => ApiError::Unreachable(message),
        })
    }

    /// One request to one URL. `Ok` means a tracker decided (a reply or a
    /// refusal); `Err` means try elsewhere.
    async fn attempt<R: DeserializeOwned>(
        &self,
        method: &Method,
        url: &str,
        body: Bytes,
    ) -> Result<Result<(R, Option<u64>), ApiError>, Attempt> {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(url)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json");
        if let Some(id) = current_transfer() {
            req = req.header(TRANSFER_HEADER, &*id);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| Attempt::Bad(0, format!("building the request: {e}")))?;
        let limit = self.inner.cfg.max_response_bytes;
        let exchange = async {
            let client = self
                .inner
                .client
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let resp = client.request(req).await.map_err(|e| {
                if e.is_connect() {
                    Attempt::Connect(chain(&e))
                } else {
                    Attempt::Gone(chain(&e))
                }
            })?;
            let status = resp.status();
            let now = resp
                .headers()
                .get(NOW_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let body = Limited::new(resp.into_body(), limit)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        Attempt::Bad(status.as_u16(), format!("reply larger than {limit} bytes"))
                    } else {
                        Attempt::Gone(format!("reading the reply: {}", chain(&*e)))
                    }
                })?
                .to_bytes();
            Ok((status, now, body))
        };
        let (status, now, body) = tokio::time::timeout(self.inner.cfg.request_timeout, exchange)
            .await
            .map_err(|_| {
                Attempt::Gone(format!(
                    "no reply within {:?}",
                    self.inner.cfg.request_timeout
                ))
            })??;
        let snippet = || String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        if status.is_success() {
            return match serde_json::from_slice::<R>(&body) {
                Ok(r) => Ok(Ok((r, now))),
                Err(e) => Err(Attempt::Bad(
                    status.as_u16(),
                    format!("reply is not the expected JSON: {e}"),
                )),
            };
        }
        if status.is_client_error() {
            if let Ok(ErrorBody { error }) = serde_json::from_slice::<ErrorBody>(&body) {
                return Ok(Err(ApiError::Refused {
                    status: status.as_u16(),
                    code: ErrorCode::parse(&error.code),
                    message: error.message,
                }));
            }
        }
        let why = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(ErrorBody { error }) => format!("{}: {}", error.code, error.message),
            Err(_) if status == StatusCode::OK => snippet(),
            Err(_) => format!("not a tracker error body: {}", snippet()),
        };
        Err(Attempt::Bad(status.as_u16(), why))
    }
}

impl TrackerApi for HttpsTracker {
    async fn announce(&self, a: Announce) -> Result<AnnounceReply, ApiError> {
        self.post("/v1/announce", &a).await.map(|(r, _)| r)
    }

    async fn lookup(
        &self,
        node: &NodeId,
        blob: &Digest,
        since: Option<HashCursor>,
    ) -> Result<LookupReply, ApiError> {
        // Node ids and cursors need no percent-encoding ([A-Za-z0-9._-]).
        let path = match since {
            Some(c) => format!("/v1/blobs/{blob}?node={node}&since={c}"),
            None => format!("/v1/blobs/{blob}?node={node}"),
        };
        self.call(Method::GET, &path, Bytes::new())
            .await
            .map(|(r, _)| r)
    }

    async fn lease(&self, r: LeaseRequest) -> Result<Lease, ApiError> {
        let (grant, now): (LeaseGrant, _) = self.post("/v1/lease", &r).await?;
        match now {
            Some(now) => Ok(Lease::new(grant, now)),
            None => Err(ApiError::BadResponse {
                status: 200,
                message: format!("lease reply without the {NOW_HEADER} header"),
            }),
        }
    }

    async fn publish_hashes(&self, p: PublishHashes) -> Result<PublishReply, ApiError> {
        self.post("/v1/hashes", &p).await.map(|(r, _)| r)
    }

    async fn report(&self, r: Report) -> Result<ReportReply, ApiError> {
        self.post("/v1/report", &r).await.map(|(r, _)| r)
    }
}

impl JobsApi for HttpsTracker {
    async fn preheat(&self, r: PreheatRequest) -> Result<PreheatReply, ApiError> {
        self.post("/v1/preheat", &r).await.map(|(r, _)| r)
    }

    async fn jobs_for(&self, node: &NodeId, wait: Duration) -> Result<JobsReply, ApiError> {
        // The tracker must answer within the request timeout.
        let wait = wait.min(
            self.inner
                .cfg
                .request_timeout
                .saturating_sub(Duration::from_secs(1)),
        );
        let path = format!("/v1/jobs?node={node}&wait_ms={}", wait.as_millis());
        self.call(Method::GET, &path, Bytes::new())
            .await
            .map(|(r, _)| r)
    }

    async fn job_progress(&self, p: JobProgress) -> Result<(), ApiError> {
        self.post::<_, crate::command::ProgressReply>("/v1/jobs/progress", &p)
            .await
            .map(|_| ())
    }

    async fn job(&self, id: u64) -> Result<JobStatus, ApiError> {
        self.call(Method::GET, &format!("/v1/jobs/{id}"), Bytes::new())
            .await
            .map(|(r, _)| r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert_eq!(base_url("https://t:4902/").unwrap(), "https://t:4902");
        assert_eq!(
            base_url("https://10.0.0.1:4902").unwrap(),
            "https://10.0.0.1:4902"
        );
        assert_eq!(base_url("https://t/prefix/").unwrap(), "https://t/prefix");
        for bad in [
            "http://t:4902",
            "t:4902",
            "https://",
            "https://t/?x=1",
            "embedded",
        ] {
            assert!(base_url(bad).is_err(), "{bad}");
        }
    }
}
