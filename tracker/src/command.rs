//! The requests that change a tracker, as values: what the HTTPS server
//! applies to its core, and what tracker replicas write to their shared log
//! ([`crate::replica`]) and each apply in the log's order. Lookups change
//! nothing and are not commands.

use std::collections::BTreeSet;

use shoal_proto::preheat::{JobProgress, PreheatReply, PreheatRequest};
use shoal_proto::tracker_api::{
    Announce, AnnounceReply, LeaseGrant, LeaseRequest, NodeId, PublishHashes, PublishReply, Report,
    ReportReply, TrackerError,
};

use crate::Tracker;

/// A request that changes the tracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `POST /v1/announce`.
    Announce(Announce),
    /// `POST /v1/lease`.
    Lease(LeaseRequest),
    /// `POST /v1/hashes`.
    Hashes(PublishHashes),
    /// `POST /v1/report`.
    Report(Report),
    /// The passage of time ([`Tracker::expire`]); replicas log it on a timer
    /// so that members, leases and exclusions expire everywhere at once.
    Expire,
    /// The operator's deny list, whole ([`Tracker::deny`]).
    Deny(BTreeSet<NodeId>),
    /// `POST /v1/preheat` (and the registry webhook).
    Preheat(PreheatRequest),
    /// `POST /v1/jobs/progress`.
    JobProgress(JobProgress),
}

/// What a [`Command`] returned.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum Outcome {
    /// The reply to an announce.
    Announce(AnnounceReply),
    /// The reply to a lease request.
    Lease(LeaseGrant),
    /// The reply to a hash publication.
    Hashes(PublishReply),
    /// The reply to a report.
    Report(ReportReply),
    /// Time passed; the tracker's time after it.
    Expired(u64),
    /// The deny list was replaced; how many nodes are newly denied.
    Denied(u32),
    /// A preheat job was created.
    Preheat(PreheatReply),
    /// A member's progress was recorded (for this job).
    Progressed(ProgressReply),
}

/// The reply to a [`JobProgress`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProgressReply {
    /// The job.
    pub job: u64,
}

/// Why a logged command could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("logged command {op:?}: {reason}")]
pub struct DecodeError {
    /// The operation name as logged (at most 32 characters).
    pub op: String,
    /// What was wrong.
    pub reason: String,
}

impl Command {
    /// The operation's name in the log.
    pub fn op(&self) -> &'static str {
        match self {
            Command::Announce(_) => "announce",
            Command::Lease(_) => "lease",
            Command::Hashes(_) => "hashes",
            Command::Report(_) => "report",
            Command::Expire => "expire",
            Command::Deny(_) => "deny",
            Command::Preheat(_) => "preheat",
            Command::JobProgress(_) => "job_progress",
        }
    }

    /// The request body as logged: the request's JSON (empty for
    /// [`Command::Expire`]).
    pub fn body(&self) -> Vec<u8> {
        let json = match self {
            Command::Announce(a) => serde_json::to_vec(a),
            Command::Lease(r) => serde_json::to_vec(r),
            Command::Hashes(p) => serde_json::to_vec(p),
            Command::Report(r) => serde_json::to_vec(r),
            Command::Deny(nodes) => serde_json::to_vec(nodes),
            Command::Preheat(r) => serde_json::to_vec(r),
            Command::JobProgress(p) => serde_json::to_vec(p),
            Command::Expire => return Vec::new(),
        };
        json.expect("tracker requests serialize")
    }

    /// Reads back what [`op`](Self::op) and [`body`](Self::body) wrote;
    /// the body is validated as the server validates a request.
    pub fn decode(op: &str, body: &[u8]) -> Result<Command, DecodeError> {
        fn json<T: serde::de::DeserializeOwned>(op: &str, body: &[u8]) -> Result<T, DecodeError> {
            serde_json::from_slice(body).map_err(|e| DecodeError {
                op: op.to_owned(),
                reason: e.to_string(),
            })
        }
        Ok(match op {
            "announce" => Command::Announce(json(op, body)?),
            "lease" => Command::Lease(json(op, body)?),
            "hashes" => Command::Hashes(json(op, body)?),
            "report" => Command::Report(json(op, body)?),
            "expire" => Command::Expire,
            "deny" => Command::Deny(json(op, body)?),
            "preheat" => Command::Preheat(json(op, body)?),
            "job_progress" => Command::JobProgress(json(op, body)?),
            other => {
                return Err(DecodeError {
                    op: other.chars().take(32).collect(),
                    reason: "unknown operation".into(),
                })
            }
        })
    }

    /// The same, a lease request having waited `queued` for the tracker's
    /// core (see [`LeaseRequest::waited`]); other commands unchanged.
    pub fn waited(self, queued: std::time::Duration) -> Command {
        match self {
            Command::Lease(r) => {
                Command::Lease(r.waited(u64::try_from(queued.as_millis()).unwrap_or(u64::MAX)))
            }
            other => other,
        }
    }

    /// Applies the command to `t` at `now_ms`.
    pub fn apply(self, t: &mut Tracker, now_ms: u64) -> Result<Outcome, TrackerError> {
        Ok(match self {
            Command::Announce(a) => Outcome::Announce(t.announce(now_ms, a)?),
            Command::Lease(r) => Outcome::Lease(t.lease(now_ms, r)?),
            Command::Hashes(p) => Outcome::Hashes(t.publish_hashes(now_ms, p)?),
            Command::Report(r) => Outcome::Report(t.report(now_ms, r)?),
            Command::Expire => Outcome::Expired(t.expire(now_ms)),
            Command::Deny(nodes) => Outcome::Denied(t.deny(now_ms, nodes)?),
            Command::Preheat(r) => Outcome::Preheat(t.preheat(now_ms, r)?),
            Command::JobProgress(p) => Outcome::Progressed(ProgressReply {
                job: t.job_progress(now_ms, p)?,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TrackerConfig;
    use shoal_proto::preheat::{JobState, NodeSelector, Preheat};
    use shoal_proto::tracker_api::PeerAddr;

    /// Preheat commands survive the replicas' log encoding, and a replica
    /// restored from a snapshot knows the jobs.
    #[test]
    fn preheat_commands_log_and_snapshot() {
        let mut t = Tracker::new(TrackerConfig::default()).unwrap();
        let node: NodeId = "node-a".parse().unwrap();
        let addr: PeerAddr = "127.0.0.1:4901".parse().unwrap();
        t.announce(
            1,
            Announce::new(node.clone(), addr, vec![], vec![], true).unwrap(),
        )
        .unwrap();
        let preheat = Command::Preheat(PreheatRequest {
            node: node.clone(),
            preheat: Preheat {
                image: "registry.example.com/team/app:v1".into(),
                blob: false,
                platforms: vec!["linux/arm64".into()],
                nodes: NodeSelector::All,
                pin: true,
            },
        });
        let decoded = Command::decode(preheat.op(), &preheat.body()).unwrap();
        assert_eq!(decoded, preheat);
        let Outcome::Preheat(reply) = decoded.apply(&mut t, 2).unwrap() else {
            panic!("a preheat reply")
        };
        let progress = Command::JobProgress(JobProgress {
            node: node.clone(),
            job: reply.job,
            state: JobState::Running,
            blobs: vec![],
            error: None,
        });
        let decoded = Command::decode(progress.op(), &progress.body()).unwrap();
        assert_eq!(decoded, progress);
        decoded.apply(&mut t, 3).unwrap();
        let restored = Tracker::restore(TrackerConfig::default(), &t.snapshot()).unwrap();
        assert_eq!(restored.job(reply.job), t.job(reply.job));
        assert_eq!(restored.jobs_for(&node).jobs.len(), 1);
        // A request that is not valid is refused when applied.
        let bad = Command::decode("preheat", b"{\"node\":\"n\",\"image\":\"x\"}").unwrap();
        assert!(bad.apply(&mut t, 4).is_err());
    }
}
