//! The origin client: Shoal's HTTP client for real OCI registries.
//!
//! The origin stays the authority for auth, manifests and tags; this client
//! is how Shoal asks it. It speaks the distribution API the way `docker pull`
//! does:
//!
//! * **Hosts**: `docker.io` is served by `registry-1.docker.io`, and its
//!   one-component names live under `library/` ([`api_host`], [`origin_repo`]).
//!   HTTPS with rustls (ring) and the webpki plus system roots; plain HTTP
//!   only for hosts in [`ClientConfig::insecure_hosts`] — for registries,
//!   token realms and redirect targets alike.
//! * **Auth**: a request goes anonymously (or with a cached token); on `401`
//!   the `WWW-Authenticate` challenge is answered once — a Bearer token from
//!   the realm (`service`, `scope=repository:<repo>:pull`, Basic credentials
//!   to the realm when [`Credentials`] has some), cached by (registry, scope)
//!   for its `expires_in`; or Basic credentials.
//! * **Redirects** (object storage, CDNs) are followed, at most 5 hops, with
//!   `Range` kept and `Authorization` sent only to the scheme, host and port
//!   the request started at.
//! * **Retries**: connect errors, timeouts, `5xx` and `429` (honouring
//!   `Retry-After`) with exponential backoff and jitter, bounded; other `4xx`
//!   never.
//! * **Limits**: a semaphore per origin host bounds requests in flight, blob
//!   bodies included ([`BlobStream`] holds the permit); every wait is
//!   bounded by a timeout; manifests and error bodies are read bounded.
//!
//! Tokens and passwords are never logged; URLs are logged without queries
//! (presigned URLs carry signatures there).

mod auth;
mod blob;
mod credentials;
mod error;
mod redirect;
mod retry;

pub use blob::BlobStream;
pub use credentials::{CredentialLookup, Credentials, CredentialsError};
pub use error::OriginError;
pub use retry::{parse_retry_after, RetryPolicy};

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http::header::{
    HeaderName, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION,
    RANGE, RETRY_AFTER, USER_AGENT, WWW_AUTHENTICATE,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use shoal_proto::media::{declared_media_type, manifest_accept, MAX_MANIFEST_BYTES};
use shoal_proto::reference::{api_host, origin_repo, valid_host};
use shoal_proto::{Digest, ErrorCode, Reference, RepoName};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use url::Url;

use auth::{cache_ttl, parse_challenges, parse_token_response, Challenge, TokenCache};
use blob::parse_content_range;
use error::parse_error_body;
use redirect::{host_port, is_redirect, redacted, resolve_location, same_origin, MAX_REDIRECTS};

/// The `User-Agent` Shoal sends by default.
pub const DEFAULT_USER_AGENT: &str = concat!("shoal/", env!("CARGO_PKG_VERSION"));

/// Most bytes of an origin's error body read (the rest is ignored).
const MAX_ERROR_BODY: usize = 64 << 10;
/// Most bytes of a token realm's answer read.
const MAX_TOKEN_BODY: usize = 1 << 20;

const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");

/// How the origin client behaves.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Origins (`host:port`, or `host` for every port) spoken to over plain
    /// `http://`; applies to token realms and redirect targets too.
    pub insecure_hosts: HashSet<String>,
    /// Credentials for origins (and their token realms).
    pub credentials: Credentials,
    /// Requests in flight per origin host, blob bodies included (default 32).
    pub max_concurrency_per_origin: usize,
    /// Retries of connect errors, timeouts, 5xx and 429.
    pub retry: RetryPolicy,
    /// TCP connect timeout (default 10 s).
    pub connect_timeout: Duration,
    /// Time until response headers, per hop (default 60 s).
    pub response_timeout: Duration,
    /// Longest wait for the next piece of a body (default 30 s).
    pub chunk_idle_timeout: Duration,
    /// The `User-Agent` header (default `shoal/<version>`).
    pub user_agent: String,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            insecure_hosts: HashSet::new(),
            credentials: Credentials::none(),
            max_concurrency_per_origin: 32,
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(60),
            chunk_idle_timeout: Duration::from_secs(30),
            user_agent: DEFAULT_USER_AGENT.to_owned(),
        }
    }
}

/// What a manifest HEAD tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestInfo {
    /// The manifest's digest (`Docker-Content-Digest`, or the hash of its body).
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Its media type.
    pub media_type: String,
}

/// A manifest fetched from an origin, verified to hash to `digest`.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The sha256 of `bytes`.
    pub digest: Digest,
    /// The media type (`Content-Type`, else the body's `mediaType`).
    pub media_type: String,
    /// The body, exactly as the origin sent it.
    pub bytes: Bytes,
}

/// What is being fetched, for mapping a 404.
#[derive(Clone, Copy)]
enum Kind {
    Manifest,
    Blob,
}

/// One request's destination.
struct Target {
    /// The registry as written (lowercased): credentials are filed by it.
    registry: String,
    /// The API host (`registry-1.docker.io` for `docker.io`).
    host: String,
    url: Url,
    /// `repository:<origin repo>:pull`.
    scope: String,
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Shoal's client for origin registries. Cheap to clone; clones share the
/// connection pool, the token cache and the concurrency limits.
#[derive(Clone)]
pub struct OriginClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: HttpClient,
    cfg: ClientConfig,
    insecure: HashSet<String>,
    user_agent: HeaderValue,
    tokens: TokenCache,
    /// Hosts that challenged with Basic: credentials go with the first try.
    basic_hosts: Mutex<HashSet<String>>,
    limits: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl fmt::Debug for OriginClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OriginClient")
            .field("cfg", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

fn basic_header(username: &str, password: &str) -> HeaderValue {
    let enc = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    let mut v =
        HeaderValue::from_str(&format!("Basic {enc}")).expect("base64 is a valid header value");
    v.set_sensitive(true);
    v
}

fn header_str(resp: &Response<Incoming>, name: impl http::header::AsHeaderName) -> Option<&str> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn content_length(resp: &Response<Incoming>) -> Option<u64> {
    header_str(resp, CONTENT_LENGTH).and_then(|v| v.parse().ok())
}

/// The media type of `Content-Type`, parameters dropped.
fn content_type(resp: &Response<Incoming>) -> Option<String> {
    let v = header_str(resp, CONTENT_TYPE)?;
    let t = v.split(';').next().unwrap_or_default().trim();
    (!t.is_empty()).then(|| t.to_ascii_lowercase())
}

/// Reads a body up to `limit` bytes; `true` when there was more.
async fn collect_limited(
    mut body: Incoming,
    limit: usize,
    idle: Duration,
) -> Result<(Bytes, bool), String> {
    let mut buf = BytesMut::new();
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(format!("body stalled: no data for {idle:?}")),
            Ok(None) => return Ok((buf.freeze(), false)),
            Ok(Some(Err(e))) => return Err(format!("body failed: {}", error_chain(&e))),
            Ok(Some(Ok(frame))) => {
                if let Ok(d) = frame.into_data() {
                    if buf.len() + d.len() > limit {
                        let room = limit - buf.len();
                        buf.extend_from_slice(&d[..room]);
                        return Ok((buf.freeze(), true));
                    }
                    buf.extend_from_slice(&d);
                }
            }
        }
    }
}

impl OriginClient {
    /// Builds a client: TLS with rustls and the ring provider, roots from
    /// webpki-roots plus the system's (failures to load those are logged and
    /// tolerated), a pooled HTTP/1.1 + HTTP/2 connection pool.
    pub fn new(cfg: ClientConfig) -> Result<Self, OriginError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::debug!(error = %e, "could not load some of the system's root certificates");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(added, ignored, "system root certificates");

        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| OriginError::Setup(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();

        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_connect_timeout(Some(cfg.connect_timeout));
        tcp.set_nodelay(true);
        tcp.set_keepalive(Some(Duration::from_secs(60)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(tcp);
        let http = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);

        let user_agent = HeaderValue::from_str(&cfg.user_agent)
            .map_err(|_| OriginError::Setup(format!("invalid user agent {:?}", cfg.user_agent)))?;
        let insecure = cfg
            .insecure_hosts
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .collect();
        Ok(OriginClient {
            inner: Arc::new(Inner {
                http,
                cfg,
                insecure,
                user_agent,
                tokens: TokenCache::default(),
                basic_hosts: Mutex::new(HashSet::new()),
                limits: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.cfg
    }

    /// Resolves a manifest by tag or digest with a HEAD: digest from
    /// `Docker-Content-Digest`, size from `Content-Length`, media type from
    /// `Content-Type`. Falls back to a GET (hashing the body) when the
    /// origin leaves any of them out.
    #[tracing::instrument(level = "debug", skip_all, fields(registry = %registry, repo = %repo, reference = %reference))]
    pub async fn head_manifest(
        &self,
        registry: &str,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<ManifestInfo, OriginError> {
        let t = self.target(registry, repo, &format!("manifests/{reference}"))?;
        let info = {
            let _permit = self.permit(&t).await?;
            let (resp, url) = self
                .execute(&t, Method::HEAD, &self.manifest_headers())
                .await?;
            if !resp.status().is_success() {
                return Err(self.status_error(resp, &t, &url, Kind::Manifest).await);
            }
            let size = content_length(&resp);
            if size.is_some_and(|s| s > MAX_MANIFEST_BYTES) {
                return Err(OriginError::TooLarge {
                    limit: MAX_MANIFEST_BYTES,
                });
            }
            let digest =
                header_str(&resp, DOCKER_CONTENT_DIGEST).and_then(|d| d.parse::<Digest>().ok());
            match (digest, size, content_type(&resp)) {
                (Some(digest), Some(size), Some(media_type)) => Some(ManifestInfo {
                    digest,
                    size,
                    media_type,
                }),
                _ => None,
            }
        };
        match info {
            Some(info) => {
                if let Reference::Digest(want) = reference {
                    if info.digest != *want {
                        return Err(OriginError::DigestMismatch {
                            expected: *want,
                            actual: info.digest,
                        });
                    }
                }
                tracing::debug!(digest = %info.digest, size = info.size, media_type = %info.media_type, "manifest resolved");
                Ok(info)
            }
            None => {
                tracing::debug!("HEAD lacks digest, length or type; falling back to GET");
                let m = self.get_manifest(registry, repo, reference).await?;
                Ok(ManifestInfo {
                    digest: m.digest,
                    size: m.bytes.len() as u64,
                    media_type: m.media_type,
                })
            }
        }
    }

    /// Fetches a manifest: the whole body, at most [`MAX_MANIFEST_BYTES`]
    /// ([`OriginError::TooLarge`] beyond), its digest the sha256 of the body.
    /// When `reference` is a digest, a body hashing to anything else is
    /// [`OriginError::DigestMismatch`].
    #[tracing::instrument(level = "debug", skip_all, fields(registry = %registry, repo = %repo, reference = %reference))]
    pub async fn get_manifest(
        &self,
        registry: &str,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Manifest, OriginError> {
        let t = self.target(registry, repo, &format!("manifests/{reference}"))?;
        let _permit = self.permit(&t).await?;
        let headers = self.manifest_headers();
        let attempts = self.inner.cfg.retry.attempts();
        let mut attempt = 1;
        loop {
            let (resp, url) = self.execute(&t, Method::GET, &headers).await?;
            if !resp.status().is_success() {
                return Err(self.status_error(resp, &t, &url, Kind::Manifest).await);
            }
            if content_length(&resp).is_some_and(|s| s > MAX_MANIFEST_BYTES) {
                return Err(OriginError::TooLarge {
                    limit: MAX_MANIFEST_BYTES,
                });
            }
            let header_type = content_type(&resp);
            let announced = header_str(&resp, DOCKER_CONTENT_DIGEST).map(str::to_owned);
            let limit = MAX_MANIFEST_BYTES as usize;
            let bytes =
                match collect_limited(resp.into_body(), limit, self.inner.cfg.chunk_idle_timeout)
                    .await
                {
                    Ok((_, true)) => {
                        return Err(OriginError::TooLarge {
                            limit: limit as u64,
                        })
                    }
                    Ok((bytes, false)) => bytes,
                    Err(reason) if attempt < attempts => {
                        tracing::debug!(%reason, attempt, "manifest body failed; retrying");
                        tokio::time::sleep(self.inner.cfg.retry.delay(attempt, None)).await;
                        attempt += 1;
                        continue;
                    }
                    Err(reason) => {
                        return Err(OriginError::Unavailable {
                            origin: host_port(&url),
                            reason,
                        })
                    }
                };
            let digest = Digest::of(&bytes);
            if let Reference::Digest(want) = reference {
                if digest != *want {
                    return Err(OriginError::DigestMismatch {
                        expected: *want,
                        actual: digest,
                    });
                }
            }
            if announced
                .as_deref()
                .is_some_and(|a| a != digest.to_string())
            {
                tracing::debug!(announced = ?announced, computed = %digest, "Docker-Content-Digest differs from the body's hash; using the hash");
            }
            let generic = |t: &str| {
                matches!(
                    t,
                    "application/json"
                        | "text/plain"
                        | "application/octet-stream"
                        | "binary/octet-stream"
                )
            };
            let media_type = match header_type {
                Some(h) if !generic(&h) => h,
                h => declared_media_type(&bytes)
                    .or(h)
                    .ok_or_else(|| OriginError::Protocol {
                        origin: host_port(&url),
                        message: "manifest has neither a Content-Type nor a mediaType".into(),
                    })?,
            };
            tracing::debug!(%digest, size = bytes.len(), %media_type, "manifest fetched");
            return Ok(Manifest {
                digest,
                media_type,
                bytes,
            });
        }
    }

    /// The size of a blob, from a HEAD.
    #[tracing::instrument(level = "debug", skip_all, fields(registry = %registry, repo = %repo, digest = %digest))]
    pub async fn head_blob(
        &self,
        registry: &str,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<u64, OriginError> {
        let t = self.target(registry, repo, &format!("blobs/{digest}"))?;
        let _permit = self.permit(&t).await?;
        let (resp, url) = self.execute(&t, Method::HEAD, &HeaderMap::new()).await?;
        if !resp.status().is_success() {
            return Err(self.status_error(resp, &t, &url, Kind::Blob).await);
        }
        if let Some(announced) =
            header_str(&resp, DOCKER_CONTENT_DIGEST).and_then(|d| d.parse::<Digest>().ok())
        {
            if announced != *digest {
                return Err(OriginError::DigestMismatch {
                    expected: *digest,
                    actual: announced,
                });
            }
        }
        let size = content_length(&resp).ok_or_else(|| OriginError::Protocol {
            origin: host_port(&url),
            message: "blob HEAD without Content-Length".into(),
        })?;
        tracing::debug!(size, "blob present at origin");
        Ok(size)
    }

    /// Starts a blob download at byte `from`. With `from > 0` it sends
    /// `Range: bytes=<from>-` and requires a `206` starting there; an origin
    /// answering `200` (the whole blob) yields [`OriginError::RangeIgnored`]
    /// so the caller can restart from 0. The stream holds a concurrency
    /// permit of the origin until dropped. The caller verifies the digest.
    #[tracing::instrument(level = "debug", skip_all, fields(registry = %registry, repo = %repo, digest = %digest, from = from))]
    pub async fn get_blob(
        &self,
        registry: &str,
        repo: &RepoName,
        digest: &Digest,
        from: u64,
    ) -> Result<BlobStream, OriginError> {
        self.get_blob_range(registry, repo, digest, from, None)
            .await
    }

    /// Like [`get_blob`](Self::get_blob) for bytes `from..=to` only. An
    /// origin that ignores the range when `from` is 0 answers with the whole
    /// blob; the caller reads what it needs and drops the rest.
    pub async fn get_blob_range(
        &self,
        registry: &str,
        repo: &RepoName,
        digest: &Digest,
        from: u64,
        to: Option<u64>,
    ) -> Result<BlobStream, OriginError> {
        let t = self.target(registry, repo, &format!("blobs/{digest}"))?;
        let permit = self.permit(&t).await?;
        let mut headers = HeaderMap::new();
        if from > 0 || to.is_some() {
            let end = to.map(|t| t.to_string()).unwrap_or_default();
            headers.insert(
                RANGE,
                HeaderValue::from_str(&format!("bytes={from}-{end}"))
                    .expect("digits are a valid header"),
            );
        }
        let (resp, url) = self.execute(&t, Method::GET, &headers).await?;
        let idle = self.inner.cfg.chunk_idle_timeout;
        let origin = host_port(&url);
        match resp.status() {
            StatusCode::OK if from > 0 => {
                tracing::debug!(from, "origin ignored the Range request");
                Err(OriginError::RangeIgnored)
            }
            StatusCode::OK => {
                let len = content_length(&resp);
                tracing::debug!(len = ?len, "blob download started");
                Ok(BlobStream::new(
                    resp.into_body(),
                    0,
                    len,
                    len,
                    idle,
                    origin,
                    permit,
                ))
            }
            StatusCode::PARTIAL_CONTENT => {
                let cr = header_str(&resp, CONTENT_RANGE)
                    .and_then(parse_content_range)
                    .ok_or_else(|| OriginError::Protocol {
                        origin: origin.clone(),
                        message: "206 without a valid Content-Range".into(),
                    })?;
                let (start, end, total) = cr;
                if start != from {
                    return Err(OriginError::Protocol {
                        origin,
                        message: format!(
                            "asked for bytes from {from}, got a range starting at {start}"
                        ),
                    });
                }
                let len = end - start + 1;
                let total = total.or(Some(end + 1));
                tracing::debug!(from, len, total = ?total, "ranged blob download started");
                Ok(BlobStream::new(
                    resp.into_body(),
                    from,
                    total,
                    Some(len),
                    idle,
                    origin,
                    permit,
                ))
            }
            s if s.is_success() => Err(OriginError::Protocol {
                origin,
                message: format!("unexpected status {s} for a blob GET"),
            }),
            _ => Err(self.status_error(resp, &t, &url, Kind::Blob).await),
        }
    }

    fn manifest_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            ACCEPT,
            HeaderValue::from_str(&manifest_accept()).expect("media types are valid header values"),
        );
        h
    }

    fn target(&self, registry: &str, repo: &RepoName, tail: &str) -> Result<Target, OriginError> {
        let registry = registry.trim().to_ascii_lowercase();
        if !valid_host(&registry) {
            return Err(OriginError::InvalidRegistry(registry));
        }
        let host = api_host(&registry).to_owned();
        let repo = origin_repo(&registry, repo).map_err(OriginError::InvalidName)?;
        let plain = Url::parse(&format!("http://{host}/"))
            .map(|u| self.plain_http_allowed(&u))
            .map_err(|_| OriginError::InvalidRegistry(registry.clone()))?;
        let scheme = if plain { "http" } else { "https" };
        let url = Url::parse(&format!("{scheme}://{host}/v2/{repo}/{tail}"))
            .map_err(|_| OriginError::InvalidRegistry(registry.clone()))?;
        Ok(Target {
            registry,
            host,
            url,
            scope: format!("repository:{repo}:pull"),
        })
    }

    fn plain_http_allowed(&self, url: &Url) -> bool {
        let Some(host) = url.host_str() else {
            return false;
        };
        let host = host.to_ascii_lowercase();
        let insecure = &self.inner.insecure;
        insecure.contains(&host)
            || url
                .port_or_known_default()
                .is_some_and(|p| insecure.contains(&format!("{host}:{p}")))
    }

    /// A permit of the origin's concurrency limit.
    async fn permit(&self, t: &Target) -> Result<OwnedSemaphorePermit, OriginError> {
        let sem = {
            let mut limits = self.inner.limits.lock().unwrap_or_else(|e| e.into_inner());
            let n = self.inner.cfg.max_concurrency_per_origin.max(1);
            limits
                .entry(t.host.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(n)))
                .clone()
        };
        sem.acquire_owned()
            .await
            .map_err(|_| OriginError::Unavailable {
                origin: t.host.clone(),
                reason: "client shut down".into(),
            })
    }

    /// One attempt, following redirects. `Authorization` goes only to the
    /// origin (scheme, host, port) of `start`.
    async fn send_hops(
        &self,
        method: &Method,
        start: &Url,
        headers: &HeaderMap,
        auth: Option<&HeaderValue>,
    ) -> Result<(Response<Incoming>, Url), OriginError> {
        let mut url = start.clone();
        for hop in 0..=MAX_REDIRECTS {
            url.set_fragment(None);
            match url.scheme() {
                "https" => {}
                "http" if self.plain_http_allowed(&url) => {}
                "http" => {
                    return Err(OriginError::PlainHttpRefused {
                        host: host_port(&url),
                    })
                }
                other => {
                    return Err(OriginError::Protocol {
                        origin: host_port(start),
                        message: format!("unsupported URL scheme {other:?}"),
                    })
                }
            }
            let mut req = Request::builder()
                .method(method.clone())
                .uri(url.as_str())
                .body(Empty::new())
                .map_err(|e| OriginError::Protocol {
                    origin: host_port(&url),
                    message: format!("cannot request {}: {e}", redacted(&url)),
                })?;
            *req.headers_mut() = headers.clone();
            req.headers_mut()
                .insert(USER_AGENT, self.inner.user_agent.clone());
            let with_auth = auth.is_some() && same_origin(start, &url);
            if let (true, Some(a)) = (with_auth, auth) {
                req.headers_mut().insert(AUTHORIZATION, a.clone());
            }
            tracing::debug!(%method, url = %redacted(&url), hop, with_auth, "origin request");
            let timeout = self.inner.cfg.response_timeout;
            let resp = match tokio::time::timeout(timeout, self.inner.http.request(req)).await {
                Err(_) => {
                    return Err(OriginError::Unavailable {
                        origin: host_port(&url),
                        reason: format!("no response within {timeout:?}"),
                    })
                }
                Ok(Err(e)) => {
                    return Err(OriginError::Unavailable {
                        origin: host_port(&url),
                        reason: error_chain(&e),
                    })
                }
                Ok(Ok(r)) => r,
            };
            tracing::debug!(status = resp.status().as_u16(), url = %redacted(&url), "origin answered");
            if !is_redirect(resp.status()) {
                return Ok((resp, url));
            }
            let next = header_str(&resp, LOCATION)
                .ok_or_else(|| "a redirect without Location".to_owned())
                .and_then(|l| {
                    resolve_location(&url, l)
                        .map_err(|e| format!("a redirect to a bad Location ({e})"))
                })
                .map_err(|message| OriginError::Protocol {
                    origin: host_port(&url),
                    message,
                })?;
            url = next;
        }
        Err(OriginError::Protocol {
            origin: host_port(start),
            message: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }

    /// [`Self::send_hops`] with retries of connect errors, timeouts, 5xx and
    /// 429. After the last attempt the response is returned as is.
    async fn send_retrying(
        &self,
        method: &Method,
        start: &Url,
        headers: &HeaderMap,
        auth: Option<&HeaderValue>,
    ) -> Result<(Response<Incoming>, Url), OriginError> {
        let policy = &self.inner.cfg.retry;
        let attempts = policy.attempts();
        let mut attempt = 1;
        loop {
            let retry_after = match self.send_hops(method, start, headers, auth).await {
                Ok((resp, url)) => {
                    let s = resp.status();
                    let retryable = s == StatusCode::TOO_MANY_REQUESTS
                        || (s.is_server_error()
                            && s != StatusCode::NOT_IMPLEMENTED
                            && s != StatusCode::HTTP_VERSION_NOT_SUPPORTED);
                    if !retryable || attempt >= attempts {
                        return Ok((resp, url));
                    }
                    let ra = header_str(&resp, RETRY_AFTER)
                        .and_then(|v| parse_retry_after(v, SystemTime::now()));
                    tracing::debug!(status = s.as_u16(), attempt, retry_after = ?ra, url = %redacted(&url), "retrying");
                    ra
                }
                Err(e @ OriginError::Unavailable { .. }) if attempt < attempts => {
                    tracing::debug!(error = %e, attempt, "retrying");
                    None
                }
                Err(e) => return Err(e),
            };
            tokio::time::sleep(policy.delay(attempt, retry_after)).await;
            attempt += 1;
        }
    }

    /// The `Authorization` to try first: Basic for hosts that asked for it,
    /// else a cached token.
    fn initial_auth(&self, t: &Target, creds: CredentialLookup<'_>) -> Option<HeaderValue> {
        if let CredentialLookup::Basic { username, password } = creds {
            let basic = self
                .inner
                .basic_hosts
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if basic.contains(&t.host) {
                return Some(basic_header(username, password));
            }
        }
        self.inner.tokens.get(&t.host, &t.scope, Instant::now())
    }

    /// A request with the auth challenge flow around [`Self::send_retrying`].
    async fn execute(
        &self,
        t: &Target,
        method: Method,
        headers: &HeaderMap,
    ) -> Result<(Response<Incoming>, Url), OriginError> {
        let creds = self.inner.cfg.credentials.lookup(&t.registry);
        let mut auth = self.initial_auth(t, creds);
        let mut answered = false;
        loop {
            let (resp, url) = self
                .send_retrying(&method, &t.url, headers, auth.as_ref())
                .await?;
            // A 401 from a redirect target (object storage) is no registry
            // challenge; the caller maps it.
            if resp.status() != StatusCode::UNAUTHORIZED || !same_origin(&t.url, &url) {
                return Ok((resp, url));
            }
            let challenges: Vec<Challenge> = resp
                .headers()
                .get_all(WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(parse_challenges)
                .collect();
            if answered {
                if let Some(a) = &auth {
                    self.inner.tokens.remove(&t.host, &t.scope, a);
                }
                let (_, message) = self.error_body(resp, StatusCode::UNAUTHORIZED).await;
                tracing::debug!(%message, "origin refused the credentials after the challenge was answered");
                return Err(self.refused(t, creds, message));
            }
            answered = true;
            if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
                match self.inner.tokens.get(&t.host, &t.scope, Instant::now()) {
                    // Another request fetched a fresh token meanwhile.
                    Some(tok) if Some(&tok) != auth.as_ref() => auth = Some(tok),
                    _ => {
                        if let Some(a) = &auth {
                            self.inner.tokens.remove(&t.host, &t.scope, a);
                        }
                        auth = Some(self.fetch_token(t, bearer, creds).await?);
                    }
                }
            } else if challenges.iter().any(|c| c.scheme == "basic") {
                match creds {
                    CredentialLookup::Basic { username, password } => {
                        tracing::debug!("origin asks for Basic auth");
                        self.inner
                            .basic_hosts
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(t.host.clone());
                        auth = Some(basic_header(username, password));
                    }
                    other => {
                        let (_, message) = self.error_body(resp, StatusCode::UNAUTHORIZED).await;
                        return Err(self.refused(t, other, message));
                    }
                }
            } else {
                let (_, message) = self.error_body(resp, StatusCode::UNAUTHORIZED).await;
                return Err(OriginError::Unauthorized {
                    registry: t.registry.clone(),
                    message: format!("{message} (the origin sent no Bearer or Basic challenge)"),
                });
            }
        }
    }

    /// The error for an origin that will not let us in, given what
    /// credentials Shoal has for it.
    fn refused(&self, t: &Target, creds: CredentialLookup<'_>, message: String) -> OriginError {
        let source = self.inner.cfg.credentials.source_name();
        let registry = &t.registry;
        match creds {
            CredentialLookup::Helper(helper) => OriginError::Credentials(format!(
                "{registry} requires authentication and its credentials are kept by the credential helper \
                 docker-credential-{helper} (credHelpers/credsStore in {source}); Shoal does not run \
                 credential helpers: put the credentials in \"auths\" instead (origin said: {message})"
            )),
            CredentialLookup::IdentityToken => OriginError::Credentials(format!(
                "{registry} requires authentication and {source} has only an identitytoken for it; \
                 Shoal does not use identity (OAuth refresh) tokens: put a username and password \
                 (or access token) in \"auths\" instead (origin said: {message})"
            )),
            CredentialLookup::Basic { username, .. } => OriginError::Unauthorized {
                registry: registry.clone(),
                message: format!("{message} (credentials of user {username:?} from {source} were not accepted)"),
            },
            CredentialLookup::None => OriginError::Unauthorized {
                registry: registry.clone(),
                message: format!("{message} (no credentials for {registry} in {source})"),
            },
        }
    }

    /// Fetches a Bearer token from the challenge's realm and caches it.
    async fn fetch_token(
        &self,
        t: &Target,
        challenge: &Challenge,
        creds: CredentialLookup<'_>,
    ) -> Result<HeaderValue, OriginError> {
        let protocol = |message: String| OriginError::Protocol {
            origin: t.host.clone(),
            message,
        };
        let realm = challenge
            .param("realm")
            .filter(|r| !r.is_empty())
            .ok_or_else(|| protocol("Bearer challenge without a realm".into()))?;
        let mut url = Url::parse(realm)
            .map_err(|e| protocol(format!("token realm {realm:?} is not a URL: {e}")))?;
        let service = challenge.param("service");
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", &t.scope);
            // Scopes the origin asks for beyond ours (rare) go along too.
            for extra in challenge.param("scope").unwrap_or_default().split(' ') {
                if !extra.is_empty() && extra != t.scope {
                    q.append_pair("scope", extra);
                }
            }
        }
        let basic = match creds {
            CredentialLookup::Basic { username, password } => {
                Some(basic_header(username, password))
            }
            _ => None,
        };
        tracing::debug!(
            realm = %redacted(&url),
            service = service.unwrap_or_default(),
            scope = %t.scope,
            with_credentials = basic.is_some(),
            "fetching a token"
        );
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let (resp, final_url) = self
            .send_retrying(&Method::GET, &url, &headers, basic.as_ref())
            .await?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let (_, message) = self.error_body(resp, status).await;
            let message = format!(
                "token service {} answered {status}: {message}",
                host_port(&url)
            );
            return Err(self.refused(t, creds, message));
        }
        if !status.is_success() {
            let (_, message) = self.error_body(resp, status).await;
            let origin = host_port(&final_url);
            return Err(
                if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                    OriginError::Unavailable {
                        origin,
                        reason: format!("token service answered {status}: {message}"),
                    }
                } else {
                    OriginError::Protocol {
                        origin,
                        message: format!("token service answered {status}: {message}"),
                    }
                },
            );
        }
        let (body, _) = collect_limited(
            resp.into_body(),
            MAX_TOKEN_BODY,
            self.inner.cfg.chunk_idle_timeout,
        )
        .await
        .map_err(|reason| OriginError::Unavailable {
            origin: host_port(&final_url),
            reason: format!("token response: {reason}"),
        })?;
        let (token, lifetime) = parse_token_response(&body).map_err(|m| OriginError::Protocol {
            origin: host_port(&final_url),
            message: m,
        })?;
        let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| protocol("the token has characters not allowed in a header".into()))?;
        value.set_sensitive(true);
        tracing::debug!(lifetime = ?lifetime, "token received");
        self.inner.tokens.put(
            &t.host,
            &t.scope,
            value.clone(),
            cache_ttl(lifetime),
            Instant::now(),
        );
        Ok(value)
    }

    /// Code and message of an error answer (body read bounded; empty for
    /// HEAD, then the status's reason).
    async fn error_body(
        &self,
        resp: Response<Incoming>,
        status: StatusCode,
    ) -> (Option<String>, String) {
        let body = collect_limited(
            resp.into_body(),
            MAX_ERROR_BODY,
            self.inner.cfg.chunk_idle_timeout,
        )
        .await
        .map(|(b, _)| b)
        .unwrap_or_default();
        let (code, message) = parse_error_body(&body);
        if message.is_empty() {
            let reason = status
                .canonical_reason()
                .unwrap_or("error")
                .to_ascii_lowercase();
            return (code, reason);
        }
        (code, message)
    }

    /// Maps a non-success answer to an error.
    async fn status_error(
        &self,
        resp: Response<Incoming>,
        t: &Target,
        url: &Url,
        kind: Kind,
    ) -> OriginError {
        let status = resp.status();
        let retry_after =
            header_str(&resp, RETRY_AFTER).and_then(|v| parse_retry_after(v, SystemTime::now()));
        let (code, message) = self.error_body(resp, status).await;
        tracing::debug!(status = status.as_u16(), code = ?code, %message, "origin error");
        match status.as_u16() {
            404 => {
                let code = code
                    .as_deref()
                    .and_then(ErrorCode::from_code)
                    .filter(|c| {
                        matches!(
                            c,
                            ErrorCode::BlobUnknown
                                | ErrorCode::ManifestUnknown
                                | ErrorCode::NameUnknown
                        )
                    })
                    .unwrap_or(match kind {
                        Kind::Manifest => ErrorCode::ManifestUnknown,
                        Kind::Blob => ErrorCode::BlobUnknown,
                    });
                OriginError::NotFound { code, message }
            }
            401 => OriginError::Unauthorized {
                registry: if same_origin(&t.url, url) {
                    t.registry.clone()
                } else {
                    host_port(url)
                },
                message,
            },
            403 => OriginError::Denied { message },
            429 => OriginError::TooManyRequests { retry_after },
            500..=599 => OriginError::Unavailable {
                origin: host_port(url),
                reason: format!("answered {status}: {message}"),
            },
            s => OriginError::Status {
                status: s,
                code,
                message,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_map_hosts_names_and_schemes() {
        let cfg = ClientConfig {
            insecure_hosts: HashSet::from(["127.0.0.1:5000".to_owned(), "LocalHost".to_owned()]),
            ..ClientConfig::default()
        };
        let c = OriginClient::new(cfg).unwrap();
        let name = |s: &str| s.parse::<RepoName>().unwrap();

        let t = c
            .target("docker.io", &name("alpine"), "manifests/latest")
            .unwrap();
        assert_eq!(
            t.url.as_str(),
            "https://registry-1.docker.io/v2/library/alpine/manifests/latest"
        );
        assert_eq!(
            (t.registry.as_str(), t.host.as_str()),
            ("docker.io", "registry-1.docker.io")
        );
        assert_eq!(t.scope, "repository:library/alpine:pull");

        let t = c.target("quay.io", &name("org/app"), "blobs/x").unwrap();
        assert_eq!(t.url.as_str(), "https://quay.io/v2/org/app/blobs/x");
        assert_eq!(t.scope, "repository:org/app:pull");

        let t = c.target("127.0.0.1:5000", &name("app"), "blobs/x").unwrap();
        assert_eq!(t.url.as_str(), "http://127.0.0.1:5000/v2/app/blobs/x");
        let t = c.target("127.0.0.1:5001", &name("app"), "blobs/x").unwrap();
        assert_eq!(
            t.url.scheme(),
            "https",
            "only the configured port is insecure"
        );
        let t = c.target("localhost:9", &name("app"), "blobs/x").unwrap();
        assert_eq!(t.url.scheme(), "http", "a bare host covers every port");

        for bad in ["", "a b", "host:0", "https://quay.io"] {
            assert!(
                matches!(
                    c.target(bad, &name("app"), "x"),
                    Err(OriginError::InvalidRegistry(_))
                ),
                "{bad}"
            );
        }
    }
}
