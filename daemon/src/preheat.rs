//! The preheat worker: picks this member's jobs up from the tracker (it
//! only dials out: a long poll, answered as soon as the tracker has a new
//! job for this node), fetches each job's blobs through the same path a runtime's pull
//! takes (origin for manifests, swarm and origin leases for blobs, every
//! byte verified), and reports per-blob progress every [`REPORT_EVERY`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use shoal_proto::preheat::{
    own_platform, parse_image, platform_matches, BlobProgress, JobProgress, JobState, ManifestRefs,
    PreheatJob,
};
use shoal_proto::{ByteRange, Digest, Reference};
use shoal_registry_shim::serve::{Content as _, Target, UpstreamPolicy};
use shoal_tracker::client::JobsApi;
use tokio::sync::{Notify, Semaphore};

use crate::content::NodeContent;
use crate::store::Store;
use crate::swarm::Swarm;

/// How long a request for jobs may wait at the tracker for a new one.
pub const LONG_POLL: Duration = Duration::from_secs(3);
/// How often the tracker is asked for new jobs when it answers at once.
pub const POLL: Duration = Duration::from_secs(2);
/// How often a running job's progress is sent.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// Jobs run at once on one node.
const PARALLEL_JOBS: usize = 2;
/// Blobs of one job fetched at once (as containerd does by default).
const PARALLEL_BLOBS: usize = 3;

/// The worker. See the module documentation.
pub struct Preheater {
    swarm: Arc<Swarm>,
    content: Arc<NodeContent>,
    policy: Arc<UpstreamPolicy>,
    store: Store,
    running: Mutex<BTreeSet<u64>>,
    /// Final reports the tracker has not taken yet (resent at each poll).
    unsent: Mutex<BTreeMap<u64, JobProgress>>,
    slots: Arc<Semaphore>,
    wake: Notify,
}

type Shared = Arc<Mutex<Vec<BlobProgress>>>;

impl Preheater {
    /// A worker for this node.
    pub fn new(
        swarm: Arc<Swarm>,
        content: Arc<NodeContent>,
        policy: Arc<UpstreamPolicy>,
        store: Store,
    ) -> Arc<Self> {
        Arc::new(Preheater {
            swarm,
            content,
            policy,
            store,
            running: Mutex::default(),
            unsent: Mutex::default(),
            slots: Arc::new(Semaphore::new(PARALLEL_JOBS)),
            wake: Notify::new(),
        })
    }

    /// Jobs running here now.
    pub fn running(&self) -> Vec<u64> {
        self.running.lock().expect("lock").iter().copied().collect()
    }

    /// Asks the tracker for jobs now rather than at the next poll.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Asks the tracker for this node's jobs until the task is dropped: a
    /// long poll ([`LONG_POLL`]) where the tracker is remote, a poll every
    /// [`POLL`] otherwise and after errors.
    pub async fn run(self: Arc<Self>) {
        let mut pause = Duration::ZERO;
        loop {
            if !pause.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = self.wake.notified() => {}
                }
            }
            let tracker = self.swarm.tracker.primary();
            let asked = tokio::time::Instant::now();
            let jobs = match tracker.jobs_for(&self.swarm.node, LONG_POLL).await {
                Ok(r) => r.jobs,
                Err(e) => {
                    tracing::debug!(error = %e, "asking the tracker for preheat jobs");
                    pause = POLL;
                    continue;
                }
            };
            let listed: BTreeSet<u64> = jobs.iter().map(|j| j.id).collect();
            let resend: Vec<JobProgress> = {
                let mut unsent = self.unsent.lock().expect("lock");
                unsent.retain(|id, _| listed.contains(id));
                unsent.values().cloned().collect()
            };
            for p in resend {
                let id = p.job;
                if tracker.job_progress(p).await.is_ok() {
                    self.unsent.lock().expect("lock").remove(&id);
                }
            }
            let mut started = 0;
            for job in jobs {
                let fresh = {
                    let unsent = self.unsent.lock().expect("lock");
                    !unsent.contains_key(&job.id)
                        && self.running.lock().expect("lock").insert(job.id)
                };
                if fresh {
                    started += 1;
                    tokio::spawn(self.clone().run_job(job));
                }
            }
            // An answer that came at once and brought nothing new (an
            // in-process tracker, or jobs this node already runs) waits.
            pause = if started == 0 && asked.elapsed() < LONG_POLL / 2 {
                POLL
            } else {
                Duration::ZERO
            };
        }
    }

    async fn run_job(self: Arc<Self>, job: PreheatJob) {
        let _slot = self.slots.clone().acquire_owned().await;
        let id = job.id;
        tracing::info!(job = id, image = %job.preheat.image, by = %job.by, "preheat started");
        let blobs: Shared = Arc::default();
        let report = |state, blobs: &Shared, error: Option<String>| JobProgress {
            node: self.swarm.node.clone(),
            job: id,
            state,
            blobs: blobs.lock().expect("lock").clone(),
            error,
        };
        let reporter = tokio::spawn({
            let this = self.clone();
            let blobs = blobs.clone();
            async move {
                let mut last = None;
                loop {
                    let p = JobProgress {
                        node: this.swarm.node.clone(),
                        job: id,
                        state: JobState::Running,
                        blobs: blobs.lock().expect("lock").clone(),
                        error: None,
                    };
                    if last.as_ref() != Some(&p.blobs) {
                        last = Some(p.blobs.clone());
                        if let Err(e) = this.swarm.tracker.primary().job_progress(p).await {
                            tracing::debug!(job = id, error = %e, "sending preheat progress");
                        }
                    }
                    tokio::time::sleep(REPORT_EVERY).await;
                }
            }
        });
        let outcome = self.fetch(&job, &blobs).await;
        reporter.abort();
        let _ = reporter.await;
        let last = match outcome {
            Ok(()) => {
                let (n, bytes) = {
                    let b = blobs.lock().expect("lock");
                    (b.len(), b.iter().map(|b| b.size).sum::<u64>())
                };
                tracing::info!(job = id, image = %job.preheat.image, blobs = n, bytes, "preheat done");
                report(JobState::Done, &blobs, None)
            }
            Err(e) => {
                tracing::warn!(job = id, image = %job.preheat.image, error = %e, "preheat failed");
                report(JobState::Failed, &blobs, Some(e))
            }
        };
        // The final word is resent at each poll until the tracker takes it.
        let tracker = self.swarm.tracker.primary();
        if tracker.job_progress(last.clone()).await.is_err() {
            self.unsent.lock().expect("lock").insert(id, last);
        }
        self.running.lock().expect("lock").remove(&id);
    }

    /// Fetches the job's blobs; the error says why not.
    async fn fetch(&self, job: &PreheatJob, blobs: &Shared) -> Result<(), String> {
        let image = parse_image(&job.preheat.image, job.preheat.blob).map_err(|e| e.to_string())?;
        if !self.policy.allows(&image.registry) {
            return Err(format!(
                "origin {} is not one this node may fetch from (its --upstream list)",
                image.registry
            ));
        }
        let target = Target {
            upstream: image.registry.clone(),
            repo: image.repo.clone(),
        };
        let wanted: Vec<(Digest, u64)> = match (job.preheat.blob, image.digest) {
            (true, Some(d)) => vec![(d, 0)],
            _ => {
                self.resolve(&target, &image.reference(), &job.preheat.platforms)
                    .await?
            }
        };
        *blobs.lock().expect("lock") = wanted
            .iter()
            .map(|&(digest, size)| BlobProgress {
                digest,
                size,
                done: 0,
            })
            .collect();
        let results: Vec<Result<(), String>> = futures_util::stream::iter(0..wanted.len())
            .map(|i| self.fetch_blob(&target, i, blobs, job.preheat.pin))
            .buffer_unordered(PARALLEL_BLOBS)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// The config and layer blobs of `reference`, for the job's platforms
    /// when it is an index.
    async fn resolve(
        &self,
        target: &Target,
        reference: &Reference,
        platforms: &[String],
    ) -> Result<Vec<(Digest, u64)>, String> {
        let refs = self.manifest(target, reference).await?;
        let manifests = match refs {
            ManifestRefs::Image(blobs) => return Ok(blobs),
            ManifestRefs::Index(ms) => ms,
        };
        let wanted = if platforms.is_empty() {
            vec![own_platform()]
        } else {
            platforms.to_vec()
        };
        let chosen: Vec<&(Digest, String)> = manifests
            .iter()
            .filter(|(_, p)| platform_matches(&wanted, p))
            .collect();
        if chosen.is_empty() {
            let has: Vec<&str> = manifests.iter().map(|(_, p)| p.as_str()).collect();
            return Err(format!(
                "the index has no manifest for {} (it has {})",
                wanted.join(", "),
                has.join(", ")
            ));
        }
        let mut out: Vec<(Digest, u64)> = Vec::new();
        for (d, platform) in chosen {
            match self.manifest(target, &Reference::Digest(*d)).await? {
                ManifestRefs::Image(blobs) => {
                    for b in blobs {
                        if !out.iter().any(|(o, _)| *o == b.0) {
                            out.push(b);
                        }
                    }
                }
                ManifestRefs::Index(_) => {
                    return Err(format!("the {platform} manifest {d} is an index itself"))
                }
            }
        }
        Ok(out)
    }

    async fn manifest(
        &self,
        target: &Target,
        reference: &Reference,
    ) -> Result<ManifestRefs, String> {
        let m = self
            .content
            .manifest(target, reference, false)
            .await
            .map_err(|e| {
                format!(
                    "manifest {}/{}:{reference}: {e}",
                    target.upstream, target.repo
                )
            })?;
        let bytes = m.bytes.unwrap_or_default();
        ManifestRefs::parse(&m.media_type, &bytes).map_err(|e| format!("{}: {e}", m.digest))
    }

    /// Fetches blob `i` of `blobs` through the node's content path (the
    /// swarm first), counting the bytes as they arrive.
    async fn fetch_blob(
        &self,
        target: &Target,
        i: usize,
        blobs: &Shared,
        pin: bool,
    ) -> Result<(), String> {
        let d = blobs.lock().expect("lock")[i].digest;
        let set = |size: Option<u64>, add: u64| {
            let mut b = blobs.lock().expect("lock");
            if let Some(s) = size {
                b[i].size = s;
            }
            b[i].done = (b[i].done + add).min(b[i].size);
        };
        let source = self
            .content
            .blob(target, &d, false)
            .await
            .map_err(|e| format!("{d}: {e}"))?;
        let size = source.size();
        set(Some(size), 0);
        if size > 0 {
            let mut stream = source.open(ByteRange {
                start: 0,
                end: size - 1,
            });
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| format!("{d}: {e}"))?;
                set(None, chunk.len() as u64);
            }
        }
        // The last byte is out once the digest matched; the store may be
        // a moment behind.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !self.store.has_complete(&d) {
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "{d}: fetched and verified but not stored (store full of pinned or busy blobs?)"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if pin {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.set_pinned(&d, true))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("pinning: {e}"))?;
        }
        Ok(())
    }
}
