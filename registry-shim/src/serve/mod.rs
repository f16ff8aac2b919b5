//! The registry endpoint runtimes pull through: router, handlers, OCI errors.
//!
//! The daemon implements [`Content`]; everything HTTP- and OCI-shaped lives
//! here so it can be tested without a store or an origin.

mod http_server;
mod route;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use shoal_proto::{parse_range, ByteRange, Digest, ErrorCode, OciError, Reference, RepoName};

pub use http_server::{serve_http, ServerConfig};
pub use route::{route, Route, Target, UpstreamPolicy};

/// A stream of body bytes. An `Err` item aborts the response: the client sees
/// the connection cut before the advertised length, never a "complete" body.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, io::Error>> + Send>>;

/// The HTTP body type every response uses.
pub type Body = UnsyncBoxBody<Bytes, io::Error>;

/// A manifest as served: its digest, media type and bytes.
#[derive(Debug, Clone)]
pub struct ManifestBody {
    /// Digest of `bytes` (what `Docker-Content-Digest` says).
    pub digest: Digest,
    /// The `Content-Type` to answer with.
    pub media_type: String,
    /// Length of the manifest in bytes.
    pub size: u64,
    /// The bytes; `None` when only a HEAD was asked for and they weren't needed.
    pub bytes: Option<Bytes>,
}

/// A blob ready to be served: its size is known, its bytes are opened lazily
/// for the range the client asked for.
pub trait BlobSource: Send + 'static {
    /// Size of the whole blob.
    fn size(&self) -> u64;
    /// The bytes of `range` (inclusive), in order.
    fn open(self: Box<Self>, range: ByteRange) -> ByteStream;
}

/// What route a request took, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// `/v2/`.
    Base,
    /// Manifests.
    Manifest,
    /// Blobs.
    Blob,
    /// Anything else (errors, unsupported).
    Other,
}

impl RouteKind {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Base => "base",
            RouteKind::Manifest => "manifest",
            RouteKind::Blob => "blob",
            RouteKind::Other => "other",
        }
    }
}

/// What the daemon provides to the registry endpoint.
pub trait Content: Send + Sync + 'static {
    /// A manifest by tag (resolved at the origin) or by digest. With
    /// `head`, the bytes may be left out.
    fn manifest(
        &self,
        target: &Target,
        reference: &Reference,
        head: bool,
    ) -> impl Future<Output = Result<ManifestBody, OciError>> + Send;

    /// A blob of `target`'s repository, after the origin has confirmed the
    /// repository holds it. With `head`, only its size is needed: the
    /// returned source is never opened.
    fn blob(
        &self,
        target: &Target,
        digest: &Digest,
        head: bool,
    ) -> impl Future<Output = Result<Box<dyn BlobSource>, OciError>> + Send;

    /// Called once per request when the response head is ready.
    fn observe(&self, _kind: RouteKind, _method: &Method, _status: StatusCode, _elapsed: Duration) {
    }

    /// Called with each body chunk handed to a client.
    fn served_bytes(&self, _n: u64) {}
}

/// Handles one request on the registry endpoint.
pub async fn handle<C: Content>(
    content: Arc<C>,
    policy: Arc<UpstreamPolicy>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let method = req.method().clone();
    let (kind, resp) = match route(&method, req.uri(), &policy) {
        Err(e) => (RouteKind::Other, error_response(&e)),
        Ok(Route::Base) => (RouteKind::Base, base_response()),
        Ok(Route::Manifest { target, reference }) => {
            let head = method == Method::HEAD;
            let resp = match content.manifest(&target, &reference, head).await {
                Ok(m) => manifest_response(m, head),
                Err(e) => error_response(&e),
            };
            (RouteKind::Manifest, resp)
        }
        Ok(Route::Blob { target, digest }) => {
            let range = req
                .headers()
                .get(header::RANGE)
                .map(|v| v.to_str().unwrap_or("\u{fffd}").to_owned());
            let head = method == Method::HEAD;
            let resp = match content.blob(&target, &digest, head).await {
                Ok(src) => blob_response(&content, src, &digest, range.as_deref(), head),
                Err(e) => error_response(&e),
            };
            (RouteKind::Blob, resp)
        }
    };
    let mut resp = resp;
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    content.observe(kind, &method, resp.status(), started.elapsed());
    Ok(resp)
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn empty() -> Body {
    full(Bytes::new())
}

fn base_response() -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, 2)
        .body(full("{}"))
        .expect("static response")
}

/// An OCI error response (JSON body, the code's status).
pub fn error_response(e: &OciError) -> Response<Body> {
    let body = e.to_json();
    let status = StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut b = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len());
    if e.code == ErrorCode::Unauthorized {
        // Runtimes only send credentials to the origin, never to a mirror;
        // this just tells them the origin refused us.
        b = b.header(header::WWW_AUTHENTICATE, "Basic realm=\"shoal\"");
    }
    b.body(full(body)).expect("valid error response")
}

fn manifest_response(m: ManifestBody, head: bool) -> Response<Body> {
    let b = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, m.media_type.as_str())
        .header(header::CONTENT_LENGTH, m.size)
        .header("docker-content-digest", m.digest.to_string())
        .header(header::ETAG, format!("\"{}\"", m.digest));
    let body = match (head, m.bytes) {
        (false, Some(bytes)) => full(bytes),
        _ => empty(),
    };
    b.body(body).expect("valid manifest response")
}

fn blob_response<C: Content>(
    content: &Arc<C>,
    src: Box<dyn BlobSource>,
    digest: &Digest,
    range: Option<&str>,
    head: bool,
) -> Response<Body> {
    let size = src.size();
    let (status, byte_range) = match range {
        None => (StatusCode::OK, None),
        Some(r) => match parse_range(r, size) {
            Ok(br) => (StatusCode::PARTIAL_CONTENT, Some(br)),
            Err(e) => {
                let mut resp = error_response(
                    &OciError::new(ErrorCode::RangeInvalid, e.to_string())
                        .with_detail(digest.to_string()),
                );
                resp.headers_mut().insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
                );
                return resp;
            }
        },
    };
    let mut b = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, shoal_proto::media::OCTET_STREAM)
        .header(header::ACCEPT_RANGES, "bytes")
        .header("docker-content-digest", digest.to_string())
        .header(header::ETAG, format!("\"{digest}\""));
    let len = byte_range.map_or(size, |r| r.len());
    b = b.header(header::CONTENT_LENGTH, len);
    if let Some(r) = byte_range {
        b = b.header(header::CONTENT_RANGE, r.content_range(size));
    }
    if head || len == 0 {
        return b.body(empty()).expect("valid blob response");
    }
    let range = byte_range.unwrap_or(ByteRange {
        start: 0,
        end: size - 1,
    });
    let counter = content.clone();
    let stream = src.open(range).map(move |item| {
        if let Ok(chunk) = &item {
            counter.served_bytes(chunk.len() as u64);
        }
        item.map(Frame::data)
    });
    b.body(BodyExt::boxed_unsync(StreamBody::new(stream)))
        .expect("valid blob response")
}

/// Convenience for daemon errors that are not OCI-shaped.
pub fn oci_from_name_error(e: &shoal_proto::NameError) -> OciError {
    match e {
        shoal_proto::NameError::Digest(d) => OciError::new(ErrorCode::DigestInvalid, d.to_string()),
        other => OciError::new(ErrorCode::NameInvalid, other.to_string()),
    }
}

/// Used by the router to check names.
pub(crate) fn parse_repo(s: &str) -> Result<RepoName, OciError> {
    s.parse::<RepoName>().map_err(|e| oci_from_name_error(&e))
}
