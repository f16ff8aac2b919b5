//! A blob body streaming from an origin.
//!
//! The stream holds the origin's concurrency permit until it is dropped, so
//! the per-origin limit counts bodies in flight, not just requests. Each
//! chunk must arrive within an idle timeout: a stalled origin yields an
//! error, never a hang.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;

use super::OriginError;

/// A blob body from an origin, from [`super::OriginClient::get_blob`].
pub struct BlobStream {
    body: Option<Incoming>,
    offset: u64,
    total: Option<u64>,
    expected_len: Option<u64>,
    received: u64,
    idle_timeout: Duration,
    origin: String,
    _permit: OwnedSemaphorePermit,
}

impl fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobStream")
            .field("origin", &self.origin)
            .field("offset", &self.offset)
            .field("total", &self.total)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl BlobStream {
    pub(crate) fn new(
        body: Incoming,
        offset: u64,
        total: Option<u64>,
        expected_len: Option<u64>,
        idle_timeout: Duration,
        origin: String,
        permit: OwnedSemaphorePermit,
    ) -> Self {
        BlobStream {
            body: Some(body),
            offset,
            total,
            expected_len,
            received: 0,
            idle_timeout,
            origin,
            _permit: permit,
        }
    }

    /// Where the body starts in the blob (the `from` asked for).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The whole blob's size, when the origin said (`Content-Range` total,
    /// or `Content-Length` plus the offset).
    pub fn total_size(&self) -> Option<u64> {
        self.total
    }

    /// Body bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The next piece of the body; `None` at the end. Errors with
    /// [`OriginError::Unavailable`] if no data arrives within the idle
    /// timeout or the connection fails; after an error or the end, `None`.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, OriginError>> {
        loop {
            let body = self.body.as_mut()?;
            let frame = match tokio::time::timeout(self.idle_timeout, body.frame()).await {
                Err(_) => {
                    self.body = None;
                    return Some(Err(self.unavailable(format!(
                        "blob body stalled: no data for {:?} after {} bytes",
                        self.idle_timeout, self.received
                    ))));
                }
                Ok(None) => {
                    self.body = None;
                    if let Some(want) = self.expected_len.filter(|w| *w != self.received) {
                        return Some(Err(self.unavailable(format!(
                            "blob body ended after {} of {want} bytes",
                            self.received
                        ))));
                    }
                    return None;
                }
                Ok(Some(Err(e))) => {
                    self.body = None;
                    return Some(Err(self.unavailable(format!(
                        "blob body failed after {} bytes: {e}",
                        self.received
                    ))));
                }
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                if data.is_empty() {
                    continue;
                }
                self.received += data.len() as u64;
                return Some(Ok(data));
            }
            // Trailers: nothing to hand out.
        }
    }

    fn unavailable(&self, reason: String) -> OriginError {
        OriginError::Unavailable {
            origin: self.origin.clone(),
            reason,
        }
    }
}

/// Parses `Content-Range: bytes <start>-<end>/<total|*>`.
pub(crate) fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.trim().split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().ok()?),
    };
    if end < start || total.is_some_and(|t| end >= t) {
        return None;
    }
    Some((start, end, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(
            parse_content_range("bytes 100-199/1000"),
            Some((100, 199, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 0-0/*"), Some((0, 0, None)));
        assert_eq!(parse_content_range("bytes 5-4/10"), None);
        assert_eq!(parse_content_range("bytes 5-10/10"), None);
        assert_eq!(parse_content_range("bytes */10"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
        assert_eq!(parse_content_range(""), None);
    }
}
