//! A tiny plain-HTTP client for tests (reqwest without TLS), plus OCI error-body helpers.

use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde::Deserialize;

/// The `Accept` header containerd sends when resolving a manifest.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json, */*";

/// A client with no proxy (tests talk to loopback only), bounded connect and total time.
pub fn client() -> reqwest::Client {
    client_with_timeout(Duration::from_secs(60))
}

/// Like [`client`] with a custom total per-request time bound.
pub fn client_with_timeout(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .build()
        .expect("building reqwest client")
}

/// A fully read response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Response {
    /// A header as a string (`None` if absent or not UTF-8).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A header that must be present.
    pub fn require_header(&self, name: &str) -> Result<&str> {
        self.header(name).ok_or_else(|| {
            anyhow!(
                "response ({}) has no `{name}` header; headers: {:?}",
                self.status,
                self.headers
            )
        })
    }

    /// The body as lossy UTF-8 (for messages), cut at 2 KiB.
    pub fn body_text(&self) -> String {
        let end = self.body.len().min(2048);
        String::from_utf8_lossy(&self.body[..end]).into_owned()
    }

    /// The parsed OCI error body (`{"errors":[...]}`).
    pub fn oci_errors(&self) -> Result<Vec<OciError>> {
        parse_oci_errors(&self.body)
            .with_context(|| format!("status {}, body {:?}", self.status, self.body_text()))
    }

    /// Asserts the status and that the OCI error body contains `code`.
    pub fn expect_oci_error(&self, status: u16, code: &str) -> Result<()> {
        ensure!(
            self.status.as_u16() == status,
            "expected status {status} with OCI error {code}, got {} with body {:?}",
            self.status,
            self.body_text()
        );
        let errors = self.oci_errors()?;
        ensure!(
            errors.iter().any(|e| e.code == code),
            "expected OCI error code {code} in {errors:?} (status {})",
            self.status
        );
        let ct = self.header("content-type").unwrap_or("");
        ensure!(
            ct.contains("json"),
            "OCI error response should be JSON, Content-Type is {ct:?}"
        );
        Ok(())
    }
}

/// One entry of an OCI error body.
#[derive(Debug, Clone, Deserialize)]
pub struct OciError {
    pub code: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub detail: serde_json::Value,
}

impl OciError {
    /// Message and detail as one string, for "mentions X" assertions.
    pub fn text(&self) -> String {
        format!("{} {}", self.message, self.detail)
    }
}

/// Parses `{"errors":[{"code","message","detail"}]}`.
pub fn parse_oci_errors(body: &[u8]) -> Result<Vec<OciError>> {
    #[derive(Deserialize)]
    struct Body {
        errors: Vec<OciError>,
    }
    let b: Body = serde_json::from_slice(body).context("body is not an OCI error JSON document")?;
    ensure!(
        !b.errors.is_empty(),
        "OCI error body has an empty `errors` list"
    );
    Ok(b.errors)
}

/// Sends a request and reads the whole body. Transport errors (including a body cut short)
/// are returned as `Err`.
pub async fn send(
    client: &reqwest::Client,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Result<Response> {
    let mut rb = client.request(method.clone(), url);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    if let Some(b) = body {
        rb = rb.body(b);
    }
    let resp = rb.send().await.with_context(|| format!("{method} {url}"))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .bytes()
        .await
        .with_context(|| format!("reading body of {method} {url} (status {status})"))?
        .to_vec();
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// `GET url` with headers.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> Result<Response> {
    send(&client(), Method::GET, url, headers, None).await
}

/// `HEAD url` with headers.
pub async fn head(url: &str, headers: &[(&str, &str)]) -> Result<Response> {
    send(&client(), Method::HEAD, url, headers, None).await
}

/// `GET url`, requiring a 200 whose body has the given digest and length.
pub async fn get_blob_checked(url: &str, digest: &str, size: u64) -> Result<Vec<u8>> {
    let r = get(url, &[]).await?;
    ensure!(
        r.status == StatusCode::OK,
        "GET {url}: status {} body {:?}",
        r.status,
        r.body_text()
    );
    check_bytes(&r.body, digest, size).with_context(|| format!("GET {url}"))?;
    Ok(r.body)
}

/// Checks that `data` has length `size` and digest `digest`.
pub fn check_bytes(data: &[u8], digest: &str, size: u64) -> Result<()> {
    ensure!(
        data.len() as u64 == size,
        "body has {} bytes, expected {size}",
        data.len()
    );
    let got = crate::util::sha256_digest(data);
    ensure!(got == digest, "body digest {got} != expected {digest}");
    Ok(())
}

/// Outcome of streaming a response body to its end.
#[derive(Debug)]
pub struct StreamOutcome {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The bytes received before the end or the error.
    pub body: Vec<u8>,
    /// The transport error that ended the body, if any.
    pub error: Option<String>,
}

/// GETs `url` and reads the body chunk by chunk, recording a transport error instead of
/// failing, so tests can tell a body cut short from a complete one. `pace` is called after
/// each chunk with the bytes received so far (return a delay to read slowly).
pub async fn get_streaming(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
    mut pace: impl FnMut(usize) -> Option<Duration>,
) -> Result<StreamOutcome> {
    let mut rb = client.get(url);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let mut resp = rb.send().await.with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let mut body = Vec::new();
    let mut error = None;
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                body.extend_from_slice(&c);
                if let Some(d) = pace(body.len()) {
                    tokio::time::sleep(d).await;
                }
            }
            Ok(None) => break,
            Err(e) => {
                error = Some(format!("{e:#} ({e:?})"));
                break;
            }
        }
    }
    Ok(StreamOutcome {
        status,
        headers,
        body,
        error,
    })
}

/// Parses `Content-Range: bytes a-b/size`.
pub fn parse_content_range(v: &str) -> Result<(u64, u64, u64)> {
    let rest = v
        .strip_prefix("bytes ")
        .ok_or_else(|| anyhow!("bad Content-Range {v:?}"))?;
    let (range, size) = rest
        .split_once('/')
        .ok_or_else(|| anyhow!("bad Content-Range {v:?}"))?;
    let (a, b) = range
        .split_once('-')
        .ok_or_else(|| anyhow!("bad Content-Range {v:?}"))?;
    let parse = |s: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|e| anyhow!("bad Content-Range {v:?}: {e}"))
    };
    let (a, b, size) = (parse(a)?, parse(b)?, parse(size)?);
    if a > b || b >= size {
        bail!("inconsistent Content-Range {v:?}");
    }
    Ok((a, b, size))
}

/// A response body that was hashed while streaming, not kept.
#[derive(Debug)]
pub struct HashedBody {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// Bytes received before the end or the error.
    pub len: u64,
    /// `sha256:<hex>` of the bytes received.
    pub digest: String,
    /// The transport error that ended the body, if any.
    pub error: Option<String>,
}

impl HashedBody {
    /// Requires a 200 with a complete body of this digest and size.
    pub fn expect_complete(&self, digest: &str, size: u64) -> Result<()> {
        ensure!(self.status == StatusCode::OK, "status {}", self.status);
        ensure!(
            self.error.is_none(),
            "body ended with an error after {} bytes: {:?}",
            self.len,
            self.error
        );
        ensure!(
            self.len == size,
            "body has {} bytes, expected {size}",
            self.len
        );
        ensure!(
            self.digest == digest,
            "body digest {} != {digest}",
            self.digest
        );
        Ok(())
    }
}

/// GETs `url`, hashing the body as it streams (for big blobs and many clients).
pub async fn get_hashed(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<HashedBody> {
    use sha2::{Digest as _, Sha256};
    let mut rb = client.get(url);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let mut resp = rb.send().await.with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let mut h = Sha256::new();
    let mut len = 0u64;
    let mut error = None;
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                h.update(&c);
                len += c.len() as u64;
            }
            Ok(None) => break,
            Err(e) => {
                error = Some(format!("{e:#} ({e:?})"));
                break;
            }
        }
    }
    Ok(HashedBody {
        status,
        headers,
        len,
        digest: format!("sha256:{}", hex::encode(h.finalize())),
        error,
    })
}
