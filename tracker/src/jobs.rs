//! Preheat jobs in the tracker core: which members were asked to fetch
//! what, and how far each got. Pure, time passed in, part of the tracker's
//! snapshot (replicas apply the same commands and agree).
//!
//! Invariants: at most [`MAX_JOBS`] jobs; a job names at least one member;
//! a member's progress only moves out of a final state if it reports again
//! (a retried job); a job whose every member is done or failed is kept
//! [`KEEP_FINISHED_MS`] for `shoalctl` and the status page, then forgotten;
//! a member that leaves the cluster before finishing is failed.

use std::collections::BTreeMap;

use shoal_proto::preheat::{
    JobProgress, JobState, JobStatus, JobsReply, NodeProgress, NodeSelector, PreheatJob,
    PreheatReply, PreheatRequest, MAX_JOBS, MAX_JOB_NODES,
};
use shoal_proto::tracker_api::{NodeId, Rack, TrackerError};

/// How long a finished job stays visible.
pub const KEEP_FINISHED_MS: u64 = 3_600_000;
/// How long any job is kept at most.
pub const KEEP_ANY_MS: u64 = 24 * 3_600_000;

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Jobs {
    next_id: u64,
    /// When [`Jobs::expire`] last looked (it looks at most once a second).
    #[serde(default)]
    checked_ms: u64,
    jobs: BTreeMap<u64, Job>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Job {
    job: PreheatJob,
    nodes: BTreeMap<NodeId, NodeProgress>,
    /// When the last member finished.
    finished_ms: Option<u64>,
}

impl Job {
    fn status(&self) -> JobStatus {
        JobStatus {
            job: self.job.clone(),
            nodes: self.nodes.clone(),
        }
    }

    fn settle(&mut self, now: u64) {
        let done = self.nodes.values().all(|p| p.state.is_final());
        self.finished_ms = match (done, self.finished_ms) {
            (true, None) => Some(now),
            (true, at) => at,
            (false, _) => None,
        };
    }
}

/// A stable spread of members over jobs: the score of `node` for `job`.
fn score(job: u64, node: &NodeId) -> u64 {
    // FNV-1a over the job id and the name: deterministic across replicas
    // and versions, unlike the std hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in job.to_le_bytes().iter().chain(node.as_str().as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Jobs {
    /// Creates a job for the members `req.nodes` selects among `live`
    /// (each with its rack).
    pub(crate) fn create<'a>(
        &mut self,
        now: u64,
        req: PreheatRequest,
        live: impl Iterator<Item = (&'a NodeId, Option<&'a Rack>)>,
    ) -> Result<PreheatReply, TrackerError> {
        req.validate()?;
        let id = self.next_id + 1;
        let mut chosen: Vec<NodeId> = match &req.preheat.nodes {
            NodeSelector::All => live.map(|(n, _)| n.clone()).collect(),
            NodeSelector::Rack(r) => live
                .filter(|(_, rack)| *rack == Some(r))
                .map(|(n, _)| n.clone())
                .collect(),
            NodeSelector::Count(k) => {
                let mut all: Vec<&NodeId> = live.map(|(n, _)| n).collect();
                all.sort_by_key(|n| (score(id, n), (*n).clone()));
                all.into_iter().take(*k as usize).cloned().collect()
            }
            NodeSelector::Names(names) => {
                let live: std::collections::BTreeSet<&NodeId> = live.map(|(n, _)| n).collect();
                if let Some(gone) = names.iter().find(|n| !live.contains(n)) {
                    return Err(TrackerError::BadPreheat(format!(
                        "{gone} is not a live member"
                    )));
                }
                names.clone()
            }
        };
        chosen.sort();
        chosen.dedup();
        if chosen.is_empty() {
            return Err(TrackerError::BadPreheat(format!(
                "no live member matches --nodes {}",
                req.preheat.nodes
            )));
        }
        if chosen.len() > MAX_JOB_NODES {
            return Err(TrackerError::TooMany {
                what: "members in a job",
                limit: MAX_JOB_NODES,
            });
        }
        if self.jobs.len() >= MAX_JOBS {
            // Make room by forgetting the job that finished first.
            let oldest = self
                .jobs
                .iter()
                .filter_map(|(id, j)| j.finished_ms.map(|at| (at, *id)))
                .min();
            match oldest {
                Some((_, old)) => {
                    self.jobs.remove(&old);
                }
                None => {
                    return Err(TrackerError::TooMany {
                        what: "unfinished preheat jobs",
                        limit: MAX_JOBS,
                    })
                }
            }
        }
        self.next_id = id;
        let job = PreheatJob {
            id,
            preheat: req.preheat,
            by: req.node,
            created_ms: now,
        };
        let nodes = chosen
            .iter()
            .map(|n| (n.clone(), NodeProgress::default()))
            .collect();
        self.jobs.insert(
            id,
            Job {
                job,
                nodes,
                finished_ms: None,
            },
        );
        Ok(PreheatReply {
            job: id,
            nodes: chosen,
        })
    }

    /// The jobs `node` has not finished, oldest first.
    pub(crate) fn pending(&self, node: &NodeId) -> JobsReply {
        JobsReply {
            jobs: self
                .jobs
                .values()
                .filter(|j| j.nodes.get(node).is_some_and(|p| !p.state.is_final()))
                .map(|j| j.job.clone())
                .collect(),
        }
    }

    /// Whether `node` has a job it has not picked up yet.
    pub(crate) fn has_new(&self, node: &NodeId) -> bool {
        self.jobs.values().any(|j| {
            j.nodes
                .get(node)
                .is_some_and(|p| p.state == JobState::Pending)
        })
    }

    /// Records a member's progress.
    pub(crate) fn progress(&mut self, now: u64, mut p: JobProgress) -> Result<(), TrackerError> {
        p.validate()?;
        let job = self
            .jobs
            .get_mut(&p.job)
            .ok_or(TrackerError::UnknownJob(p.job))?;
        let entry = job.nodes.get_mut(&p.node).ok_or_else(|| {
            TrackerError::BadPreheat(format!("{} is not one of job {}'s members", p.node, p.job))
        })?;
        *entry = NodeProgress {
            state: p.state,
            blobs: p.blobs,
            error: p.error,
            updated_ms: now,
        };
        job.settle(now);
        Ok(())
    }

    /// One job.
    pub(crate) fn status(&self, id: u64) -> Result<JobStatus, TrackerError> {
        self.jobs
            .get(&id)
            .map(Job::status)
            .ok_or(TrackerError::UnknownJob(id))
    }

    /// Every job, newest first.
    pub(crate) fn all(&self) -> Vec<JobStatus> {
        self.jobs.values().rev().map(Job::status).collect()
    }

    /// Fails members that left before finishing and forgets old jobs.
    pub(crate) fn expire(&mut self, now: u64, is_member: impl Fn(&NodeId) -> bool) {
        if self.jobs.is_empty() || now < self.checked_ms.saturating_add(1_000) {
            return;
        }
        self.checked_ms = now;
        for job in self.jobs.values_mut() {
            let mut changed = false;
            for (node, p) in job.nodes.iter_mut() {
                if !p.state.is_final() && !is_member(node) {
                    p.state = JobState::Failed;
                    p.error = Some("left the cluster before finishing (no announce)".into());
                    p.updated_ms = now;
                    changed = true;
                }
            }
            if changed {
                job.settle(now);
            }
        }
        self.jobs.retain(|_, j| {
            j.finished_ms
                .is_none_or(|at| now.saturating_sub(at) < KEEP_FINISHED_MS)
                && now.saturating_sub(j.job.created_ms) < KEEP_ANY_MS
        });
    }

    /// Checks the module's invariants.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.jobs.len() > MAX_JOBS {
            return Err("too many jobs".into());
        }
        for (id, j) in &self.jobs {
            if *id != j.job.id || *id > self.next_id {
                return Err(format!("job {id} is filed wrongly"));
            }
            if j.nodes.is_empty() {
                return Err(format!("job {id} names no member"));
            }
            let done = j.nodes.values().all(|p| p.state.is_final());
            if done != j.finished_ms.is_some() {
                return Err(format!("job {id}: finished_ms disagrees with its members"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::preheat::{BlobProgress, Preheat};

    fn n(s: &str) -> NodeId {
        s.parse().unwrap()
    }

    fn req(nodes: &str) -> PreheatRequest {
        PreheatRequest {
            node: n("ctl"),
            preheat: Preheat {
                image: "127.0.0.1:5000/app:v1".into(),
                blob: false,
                platforms: vec![],
                nodes: nodes.parse().unwrap(),
                pin: false,
            },
        }
    }

    fn members() -> Vec<(NodeId, Option<Rack>)> {
        (0..6)
            .map(|i| {
                (
                    n(&format!("node-{i}")),
                    Some(format!("r{}", i % 2).parse().unwrap()),
                )
            })
            .collect()
    }

    fn live(m: &[(NodeId, Option<Rack>)]) -> impl Iterator<Item = (&NodeId, Option<&Rack>)> {
        m.iter().map(|(n, r)| (n, r.as_ref()))
    }

    #[test]
    fn selectors_choose_live_members() {
        let m = members();
        let mut jobs = Jobs::default();
        assert_eq!(jobs.create(1, req("all"), live(&m)).unwrap().nodes.len(), 6);
        let r = jobs.create(1, req("rack=r1"), live(&m)).unwrap();
        assert_eq!(r.nodes, vec![n("node-1"), n("node-3"), n("node-5")]);
        let r = jobs.create(1, req("2"), live(&m)).unwrap();
        assert_eq!(r.nodes.len(), 2);
        assert_eq!(jobs.create(1, req("99"), live(&m)).unwrap().nodes.len(), 6);
        let r = jobs.create(1, req("node-4,node-0"), live(&m)).unwrap();
        assert_eq!(r.nodes, vec![n("node-0"), n("node-4")]);
        let e = jobs.create(1, req("node-9"), live(&m)).unwrap_err();
        assert!(e.to_string().contains("node-9 is not a live member"), "{e}");
        let e = jobs.create(1, req("rack=r7"), live(&m)).unwrap_err();
        assert!(e.to_string().contains("no live member matches"), "{e}");
        assert_eq!(jobs.all().len(), 5);
        jobs.check().unwrap();
    }

    #[test]
    fn progress_finishes_jobs_and_departures_fail_them() {
        let m = members();
        let mut jobs = Jobs::default();
        let id = jobs.create(0, req("node-1,node-2"), live(&m)).unwrap().job;
        assert_eq!(jobs.pending(&n("node-1")).jobs.len(), 1);
        assert!(jobs.pending(&n("node-3")).jobs.is_empty());
        let d = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let report = |node: &str, state| JobProgress {
            node: n(node),
            job: id,
            state,
            blobs: vec![BlobProgress {
                digest: d,
                size: 10,
                done: 10,
            }],
            error: None,
        };
        jobs.progress(5, report("node-1", JobState::Done)).unwrap();
        assert!(jobs.pending(&n("node-1")).jobs.is_empty());
        let e = jobs
            .progress(5, report("node-3", JobState::Done))
            .unwrap_err();
        assert!(e.to_string().contains("not one of job"), "{e}");
        assert_eq!(
            jobs.progress(
                5,
                JobProgress {
                    job: 99,
                    ..report("node-1", JobState::Done)
                }
            ),
            Err(TrackerError::UnknownJob(99))
        );
        assert!(!jobs.status(id).unwrap().finished());
        // node-2 leaves the cluster: failed, and the job is finished.
        jobs.expire(1_000, |node| node != &n("node-2"));
        let s = jobs.status(id).unwrap();
        assert!(s.finished());
        let failed: Vec<_> = s.failed().map(|(n, _)| n.clone()).collect();
        assert_eq!(failed, vec![n("node-2")]);
        jobs.check().unwrap();
        // Kept for an hour, then forgotten.
        jobs.expire(1_000 + KEEP_FINISHED_MS - 1, |_| true);
        jobs.checked_ms = 0;
        assert!(jobs.status(id).is_ok());
        jobs.expire(1_000 + KEEP_FINISHED_MS, |_| true);
        assert_eq!(jobs.status(id), Err(TrackerError::UnknownJob(id)));
    }

    #[test]
    fn the_job_table_is_bounded() {
        let m = members();
        let mut jobs = Jobs::default();
        for _ in 0..MAX_JOBS {
            jobs.create(0, req("node-0"), live(&m)).unwrap();
        }
        let e = jobs.create(0, req("node-0"), live(&m)).unwrap_err();
        assert!(matches!(e, TrackerError::TooMany { .. }), "{e}");
        // A finished job makes room.
        jobs.progress(
            1,
            JobProgress {
                node: n("node-0"),
                job: 3,
                state: JobState::Failed,
                blobs: vec![],
                error: Some("x".into()),
            },
        )
        .unwrap();
        let id = jobs.create(2, req("node-0"), live(&m)).unwrap().job;
        assert_eq!(id, MAX_JOBS as u64 + 1);
        assert!(jobs.status(3).is_err());
        jobs.check().unwrap();
    }
}
