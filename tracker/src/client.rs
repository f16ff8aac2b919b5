//! The seam between a member and its tracker: [`TrackerApi`], the five v1
//! calls, implemented in-process by [`Embedded`] (`--tracker embedded`) and
//! over HTTPS by [`HttpsTracker`](crate::https_client::HttpsTracker); the
//! daemon picks one at start through [`AnyTracker`].
//!
//! Both implementations give the same replies and the same errors for the
//! same calls at the same tracker time: an error is an [`ApiError`] whose
//! [`ApiError::is_down`] tells "no tracker answered" (the scheduler's
//! `TrackerDown`) from "the tracker said no" ([`ApiError::Refused`], with the
//! tracker's stable [`ErrorCode`]).

use std::fmt;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use shoal_proto::preheat::{JobProgress, JobStatus, JobsReply, PreheatReply, PreheatRequest};
use shoal_proto::tracker_api::{
    Announce, AnnounceReply, HashCursor, LeaseGrant, LeaseRequest, LookupReply, NodeId,
    PublishHashes, PublishReply, Report, ReportReply, TrackerError,
};
use shoal_proto::Digest;

use crate::clock::Clock;
use crate::Tracker;

/// The calls a member makes to its tracker.
///
/// Futures are `Send`, so a driver can spawn them. The trait is not object
/// safe (its methods return `impl Future`); choose an implementation at run
/// time with [`AnyTracker`], and implement the trait directly for test
/// doubles.
pub trait TrackerApi: Send + Sync {
    /// "I am alive at this address and hold these chunks."
    fn announce(&self, a: Announce)
        -> impl Future<Output = Result<AnnounceReply, ApiError>> + Send;

    /// Chunk hashes (those published after `since`, if it is of the
    /// blob's current epoch), a subset of holders chosen for `node`, and
    /// the leased chunks of `blob`.
    fn lookup(
        &self,
        node: &NodeId,
        blob: &Digest,
        since: Option<HashCursor>,
    ) -> impl Future<Output = Result<LookupReply, ApiError>> + Send;

    /// Origin-fetch leases.
    fn lease(&self, r: LeaseRequest) -> impl Future<Output = Result<Lease, ApiError>> + Send;

    /// Hashes of chunks fetched from the origin under a lease.
    fn publish_hashes(
        &self,
        p: PublishHashes,
    ) -> impl Future<Output = Result<PublishReply, ApiError>> + Send;

    /// A peer that sent bad bytes, or a blob whose digest did not match.
    fn report(&self, r: Report) -> impl Future<Output = Result<ReportReply, ApiError>> + Send;
}

/// A lease grant with its lifetime in the member's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The grant as the tracker sent it (`expires_ms` is tracker time).
    pub grant: LeaseGrant,
    /// How long the lease lasts from the moment the tracker granted it.
    /// Count it from when the request was *sent* (that errs on the safe
    /// side) and stop fetching leased chunks, or renew, before it runs out.
    pub valid_for: Duration,
}

impl Lease {
    /// Pairs a grant with the tracker time it was made at.
    pub fn new(grant: LeaseGrant, tracker_now_ms: u64) -> Self {
        let valid_for = Duration::from_millis(grant.expires_ms.saturating_sub(tracker_now_ms));
        Lease { grant, valid_for }
    }
}

/// The tracker's stable machine-readable error codes (`error.code` in JSON
/// error bodies).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request is malformed or invalid (400).
    BadRequest,
    /// The tracker knows nothing about the blob (404).
    UnknownBlob,
    /// The blob's layout is fixed and differs (409).
    LayoutConflict,
    /// The node has not announced itself or expired: announce, then retry (409).
    NotAMember,
    /// The node is excluded for bad data (403).
    Excluded,
    /// The cluster's operator denied the node (403).
    Denied,
    /// A join without a valid join token (401).
    Unauthorized,
    /// A table or list is at its limit (429).
    TooMany,
    /// The request names a node other than the client certificate's (403).
    NodeMismatch,
    /// The body exceeds the tracker's limit (413).
    BodyTooLarge,
    /// No such endpoint (404).
    NotFound,
    /// The endpoint exists but not for this method (405).
    MethodNotAllowed,
    /// The tracker failed (500).
    Internal,
    /// The tracker cannot decide now (its shared store is unreachable):
    /// try another tracker (503).
    Unavailable,
    /// A code this version does not know (a newer tracker).
    Other(String),
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownBlob => "unknown_blob",
            ErrorCode::LayoutConflict => "layout_conflict",
            ErrorCode::NotAMember => "not_a_member",
            ErrorCode::Excluded => "excluded",
            ErrorCode::Denied => "denied",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TooMany => "too_many",
            ErrorCode::NodeMismatch => "node_mismatch",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Other(s) => s,
        }
    }

    /// Reads a wire code; unknown ones become [`ErrorCode::Other`].
    pub fn parse(s: &str) -> ErrorCode {
        match s {
            "bad_request" => ErrorCode::BadRequest,
            "unknown_blob" => ErrorCode::UnknownBlob,
            "layout_conflict" => ErrorCode::LayoutConflict,
            "not_a_member" => ErrorCode::NotAMember,
            "excluded" => ErrorCode::Excluded,
            "denied" => ErrorCode::Denied,
            "unauthorized" => ErrorCode::Unauthorized,
            "too_many" => ErrorCode::TooMany,
            "node_mismatch" => ErrorCode::NodeMismatch,
            "body_too_large" => ErrorCode::BodyTooLarge,
            "not_found" => ErrorCode::NotFound,
            "method_not_allowed" => ErrorCode::MethodNotAllowed,
            "internal" => ErrorCode::Internal,
            "unavailable" => ErrorCode::Unavailable,
            other => ErrorCode::Other(other.chars().take(64).collect()),
        }
    }

    /// The HTTP status the tracker answers with for this code.
    pub fn status(&self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::Other(_) => 400,
            ErrorCode::UnknownBlob | ErrorCode::NotFound => 404,
            ErrorCode::LayoutConflict | ErrorCode::NotAMember => 409,
            ErrorCode::Excluded | ErrorCode::Denied | ErrorCode::NodeMismatch => 403,
            ErrorCode::TooMany => 429,
            ErrorCode::Unauthorized => 401,
            ErrorCode::BodyTooLarge => 413,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::Internal => 500,
            ErrorCode::Unavailable => 503,
        }
    }
}

impl From<&TrackerError> for ErrorCode {
    fn from(e: &TrackerError) -> Self {
        ErrorCode::parse(e.code())
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JSON body of every tracker error response:
/// `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorDetail {
    /// A stable code ([`ErrorCode::as_str`]).
    pub code: String,
    /// A human-readable explanation.
    pub message: String,
}

/// Why a tracker call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// No tracker answered: every URL failed to connect, timed out or broke
    /// the connection (including TLS refusals). The tracker is down for the
    /// scheduler.
    #[error("tracker unreachable: {0}")]
    Unreachable(String),
    /// A tracker answered, but not with a v1 reply: a 5xx, or a body that is
    /// not the expected JSON. Also treated as down.
    #[error("tracker failed (HTTP {status}): {message}")]
    BadResponse {
        /// The HTTP status.
        status: u16,
        /// What was wrong.
        message: String,
    },
    /// The tracker refused the request; retrying the same request will not help
    /// (except after announcing, for [`ErrorCode::NotAMember`]).
    #[error("tracker refused the request ({code}, HTTP {status}): {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The tracker's code.
        code: ErrorCode,
        /// The tracker's message.
        message: String,
    },
    /// The request is larger than the tracker accepts; it was not sent.
    /// Split it (announce fewer blobs, publish fewer hashes at a time).
    #[error("request body of {size} bytes exceeds the tracker limit of {limit} bytes")]
    TooLarge {
        /// The body size.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

impl ApiError {
    /// Whether no usable tracker answered (the scheduler's `TrackerDown`),
    /// as opposed to the tracker deciding against the request.
    pub fn is_down(&self) -> bool {
        matches!(
            self,
            ApiError::Unreachable(_) | ApiError::BadResponse { .. }
        )
    }

    /// The tracker's code, if it refused the request.
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            ApiError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }

    /// A refusal from the tracker core, exactly as the HTTPS server reports it.
    pub fn refused(e: &TrackerError) -> Self {
        let code = ErrorCode::from(e);
        ApiError::Refused {
            status: code.status(),
            code,
            message: e.to_string(),
        }
    }

    /// The error a member sees when the tracker's state was poisoned by a
    /// panic (a bug): a 500, so the member treats the tracker as down.
    pub fn poisoned() -> Self {
        ApiError::BadResponse {
            status: 500,
            message: POISONED.to_owned(),
        }
    }
}

/// Message of the 500 returned once a panic has poisoned the tracker state.
pub(crate) const POISONED: &str =
    "internal: tracker state is unusable after an earlier failure; restart the tracker";

/// The tracker core in this process: `--tracker embedded`, tests and the
/// simulator. Cheap to clone; clones share the tracker.
#[derive(Debug, Clone)]
pub struct Embedded {
    tracker: Arc<RwLock<Tracker>>,
    clock: Arc<dyn Clock>,
}

impl Embedded {
    /// Wraps a shared tracker read at `clock`'s time.
    pub fn new(tracker: Arc<RwLock<Tracker>>, clock: Arc<dyn Clock>) -> Self {
        Embedded { tracker, clock }
    }

    /// The shared tracker (for stats and tests).
    pub fn tracker(&self) -> &Arc<RwLock<Tracker>> {
        &self.tracker
    }

    /// Runs `f` on the tracker at the current time, which it also returns.
    fn with<T>(
        &self,
        f: impl FnOnce(&mut Tracker, u64) -> Result<T, TrackerError>,
    ) -> Result<(T, u64), ApiError> {
        let mut t = self.tracker.write().map_err(|_| ApiError::poisoned())?;
        let now = self.clock.now_ms();
        f(&mut t, now)
            .map(|v| (v, now))
            .map_err(|e| ApiError::refused(&e))
    }
}

impl TrackerApi for Embedded {
    async fn announce(&self, a: Announce) -> Result<AnnounceReply, ApiError> {
        self.with(|t, now| t.announce(now, a)).map(|(r, _)| r)
    }

    async fn lookup(
        &self,
        node: &NodeId,
        blob: &Digest,
        since: Option<HashCursor>,
    ) -> Result<LookupReply, ApiError> {
        {
            // Under the shared lock unless something has to expire first,
            // as the HTTPS server answers lookups.
            let t = self.tracker.read().map_err(|_| ApiError::poisoned())?;
            let now = self.clock.now_ms();
            if !t.expiry_due(now) {
                return t
                    .lookup_current(now, node, blob, since)
                    .map_err(|e| ApiError::refused(&e));
            }
        }
        self.with(|t, now| t.lookup_since(now, node, blob, since))
            .map(|(r, _)| r)
    }

    async fn lease(&self, r: LeaseRequest) -> Result<Lease, ApiError> {
        self.with(|t, now| t.lease(now, r))
            .map(|(g, now)| Lease::new(g, now))
    }

    async fn publish_hashes(&self, p: PublishHashes) -> Result<PublishReply, ApiError> {
        self.with(|t, now| t.publish_hashes(now, p)).map(|(r, _)| r)
    }

    async fn report(&self, r: Report) -> Result<ReportReply, ApiError> {
        self.with(|t, now| t.report(now, r)).map(|(r, _)| r)
    }
}

/// The tracker a member talks to, chosen at start (`--tracker embedded` or
/// `--tracker https://…`).
#[derive(Debug, Clone)]
pub enum AnyTracker {
    /// In this process.
    Embedded(Embedded),
    /// Over HTTPS.
    #[cfg(feature = "net")]
    Https(crate::https_client::HttpsTracker),
}

macro_rules! dispatch {
    ($self:ident, $t:ident => $call:expr) => {
        match $self {
            AnyTracker::Embedded($t) => $call.await,
            #[cfg(feature = "net")]
            AnyTracker::Https($t) => $call.await,
        }
    };
}

impl TrackerApi for AnyTracker {
    async fn announce(&self, a: Announce) -> Result<AnnounceReply, ApiError> {
        dispatch!(self, t => t.announce(a))
    }

    async fn lookup(
        &self,
        node: &NodeId,
        blob: &Digest,
        since: Option<HashCursor>,
    ) -> Result<LookupReply, ApiError> {
        dispatch!(self, t => t.lookup(node, blob, since))
    }

    async fn lease(&self, r: LeaseRequest) -> Result<Lease, ApiError> {
        dispatch!(self, t => t.lease(r))
    }

    async fn publish_hashes(&self, p: PublishHashes) -> Result<PublishReply, ApiError> {
        dispatch!(self, t => t.publish_hashes(p))
    }

    async fn report(&self, r: Report) -> Result<ReportReply, ApiError> {
        dispatch!(self, t => t.report(r))
    }
}

/// Preheat jobs ([`shoal_proto::preheat`]): creating them, picking them
/// up, reporting progress. Apart from [`TrackerApi`] because transfers do
/// not need it and the DHT cannot answer it.
pub trait JobsApi: Send + Sync {
    /// `POST /v1/preheat`.
    fn preheat(
        &self,
        r: PreheatRequest,
    ) -> impl Future<Output = Result<PreheatReply, ApiError>> + Send;
    /// `GET /v1/jobs?node=N&wait_ms=W`: the member's unfinished jobs, once
    /// it has one it has not started or `wait` has passed (a long poll;
    /// in-process trackers answer at once).
    fn jobs_for(
        &self,
        node: &NodeId,
        wait: Duration,
    ) -> impl Future<Output = Result<JobsReply, ApiError>> + Send;
    /// `POST /v1/jobs/progress`.
    fn job_progress(&self, p: JobProgress) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// `GET /v1/jobs/ID`.
    fn job(&self, id: u64) -> impl Future<Output = Result<JobStatus, ApiError>> + Send;
}

impl JobsApi for Embedded {
    async fn preheat(&self, r: PreheatRequest) -> Result<PreheatReply, ApiError> {
        self.with(|t, now| t.preheat(now, r)).map(|(r, _)| r)
    }

    async fn jobs_for(&self, node: &NodeId, _wait: Duration) -> Result<JobsReply, ApiError> {
        self.with(|t, _| Ok(t.jobs_for(node))).map(|(r, _)| r)
    }

    async fn job_progress(&self, p: JobProgress) -> Result<(), ApiError> {
        self.with(|t, now| t.job_progress(now, p)).map(|_| ())
    }

    async fn job(&self, id: u64) -> Result<JobStatus, ApiError> {
        self.with(|t, _| t.job(id)).map(|(r, _)| r)
    }
}

impl JobsApi for AnyTracker {
    async fn preheat(&self, r: PreheatRequest) -> Result<PreheatReply, ApiError> {
        dispatch!(self, t => t.preheat(r))
    }

    async fn jobs_for(&self, node: &NodeId, wait: Duration) -> Result<JobsReply, ApiError> {
        dispatch!(self, t => t.jobs_for(node, wait))
    }

    async fn job_progress(&self, p: JobProgress) -> Result<(), ApiError> {
        dispatch!(self, t => t.job_progress(p))
    }

    async fn job(&self, id: u64) -> Result<JobStatus, ApiError> {
        dispatch!(self, t => t.job(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::TrackerConfig;

    #[test]
    fn codes_round_trip_and_map_to_statuses() {
        for code in [
            "bad_request",
            "unknown_blob",
            "layout_conflict",
            "not_a_member",
            "excluded",
            "too_many",
            "node_mismatch",
            "body_too_large",
            "not_found",
            "method_not_allowed",
            "internal",
        ] {
            let c = ErrorCode::parse(code);
            assert!(!matches!(c, ErrorCode::Other(_)), "{code}");
            assert_eq!(c.as_str(), code);
        }
        assert_eq!(
            ErrorCode::parse("new_thing"),
            ErrorCode::Other("new_thing".into())
        );
        let d = Digest::of(b"x");
        assert_eq!(ErrorCode::from(&TrackerError::UnknownBlob(d)).status(), 404);
        assert_eq!(ErrorCode::from(&TrackerError::ZeroLease).status(), 400);
    }

    #[test]
    fn embedded_reports_refusals_and_lease_lifetimes() {
        let clock = Arc::new(ManualClock::new(1_000));
        let t = Tracker::new(TrackerConfig::default()).unwrap();
        let e = Embedded::new(Arc::new(RwLock::new(t)), clock.clone());
        let n: NodeId = "n1".parse().unwrap();
        let d = Digest::of(b"blob");
        let err = poll_ready(Box::pin(e.lookup(&n, &d, None))).unwrap_err();
        assert_eq!(err.code(), Some(&ErrorCode::UnknownBlob));
        assert!(!err.is_down());
        let a = Announce::new(
            n.clone(),
            "10.0.0.1:4901".parse().unwrap(),
            vec![],
            vec![],
            false,
        )
        .unwrap();
        poll_ready(Box::pin(e.announce(a))).unwrap();
        let layout = shoal_proto::ChunkLayout::new(4 << 20, 1 << 20).unwrap();
        let r = LeaseRequest::new(n, d, layout, 2, 0).unwrap();
        let lease = poll_ready(Box::pin(e.lease(r))).unwrap();
        assert_eq!(lease.grant.chunks, vec![0, 1]);
        let ttl = TrackerConfig::default().lease_ttl_ms;
        assert_eq!(lease.valid_for, Duration::from_millis(ttl));
    }

    /// Polls a future that never waits (the embedded tracker's) once.
    fn poll_ready<T>(mut f: std::pin::Pin<Box<dyn Future<Output = T> + '_>>) -> T {
        use std::task::{Context, Poll, Waker};
        match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(v) => v,
            Poll::Pending => panic!("the embedded tracker never waits"),
        }
    }
}
