//! Single-flight blob transfers from the origin, streamed to any number of
//! readers while they arrive.
//!
//! One [`Transfer`] per digest at a time: the first request starts it, later
//! ones join it and read what has arrived from the same partial file.
//!
//! A transfer is driven by the swarm scheduler (`shoal_proto::sched`): the
//! blob is laid out in chunks, the scheduler decides what to fetch from
//! where, and chunks are written at their offsets as they arrive. Until the
//! swarm is wired in, the scheduler runs in its tracker-down mode, so the
//! origin serves every chunk in contiguous Range runs. The whole-blob digest
//! is hashed over the contiguous prefix of stored chunks as it grows; readers
//! may read that prefix, but the last byte waits until the digest checks — so
//! a client never receives a complete wrong blob. A mismatch cuts every
//! reader's response short and stores nothing. Which chunks are on disk is
//! checkpointed (after an fsync) every few MiB, so a restart resumes them.

use std::collections::HashMap;
use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use shoal_proto::sched::{Outcome, Source, PROGRESS_MS};
use shoal_proto::session::{HashBook, Io, Member, Notice, Session, SessionConfig, TrackerFailure};
use shoal_proto::tracker_api::{ChunkHash, LookupReply, NodeId};
use shoal_proto::{
    Bitfield, ChunkHashes, ChunkLayout, Digest, ErrorCode, OciError, Sha256Verifier,
};
use shoal_registry_shim::client::{OriginClient, OriginError};
use shoal_registry_shim::serve::{ByteStream, Target};
use shoal_tracker::client::{ApiError, ErrorCode as TrackerCode, Lease, TrackerApi};
use tokio::sync::{mpsc, watch};
use tracing::Instrument as _;

use crate::metrics::{self, KindLabel, SourceLabel};
use crate::peer::client::ChunkResult;
use crate::peer::PeerAddr;
use crate::rate::Every;
use crate::store::{Kind, ReadGuard, Store, StoreError};
use crate::swarm::Swarm;

/// Bytes of newly stored chunks between index checkpoints of a partial blob
/// (after an fsync), so a crash loses at most about this much of a transfer.
const CHECKPOINT_BYTES: u64 = 8 << 20;
/// Bytes read from disk per body chunk handed to a client.
const READ_CHUNK: u64 = 1 << 20;

/// Where a transfer stands.
#[derive(Debug, Clone)]
pub enum Phase {
    /// Waiting for the origin's answer.
    Starting,
    /// Bytes are arriving.
    Running,
    /// Every byte is present and matches the digest (storing it durably
    /// may still be under way).
    Done,
    /// Failed; nothing was stored.
    Failed(OciError),
    /// The store cannot hold the blob (quota full of pinned or busy blobs,
    /// or the disk refused): readers go to the origin directly.
    NoRoom,
}

/// Why a transfer did not get going.
#[derive(Debug, Clone)]
pub enum Unstarted {
    /// The origin or the store failed.
    Failed(OciError),
    /// The store has no room: serve it straight from the origin.
    NoRoom,
}

/// What readers watch.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Phase.
    pub phase: Phase,
    /// Size of the blob once known.
    pub size: u64,
    /// Bytes written to the file (readable).
    pub written: u64,
    /// The file the bytes are in (stays valid across the rename to complete).
    pub file: Option<Arc<File>>,
    /// The blob's chunk layout, once known.
    pub layout: Option<ChunkLayout>,
    /// Chunks stored in the file (verified: from the origin, or from a peer
    /// against the chunk map); peers may be served these.
    pub have: Option<Bitfield>,
    /// Whether the origin confirmed, for this transfer, that the repository
    /// it was started for holds the blob (`false` when it ran on an earlier
    /// confirmation with the origin unreachable).
    pub confirmed: bool,
}

/// One blob being fetched.
#[derive(Debug)]
pub struct Transfer {
    /// The repository whose request started it (the origin GET confirms it).
    pub started_for: Target,
    progress: watch::Receiver<Progress>,
}

/// How a fetch ended badly.
enum Fail {
    Oci(OciError),
    NoRoom(StoreError),
    /// Writing (or reading back) the partial file failed: a full disk, or
    /// a failing one. Readers continue from the origin.
    Disk(std::io::Error),
}

impl From<OciError> for Fail {
    fn from(e: OciError) -> Self {
        Fail::Oci(e)
    }
}

/// A new transfer id: 16 hex characters, unique in practice across the
/// cluster; members log it, and send it to the tracker with each request
/// the transfer makes.
fn transfer_id(digest: &Digest) -> Arc<str> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = Sha256::new();
    h.update(std::process::id().to_le_bytes());
    h.update(
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_le_bytes(),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.update(now.as_nanos().to_le_bytes());
    h.update(digest.as_bytes());
    hex::encode(&h.finalize()[..8]).into()
}

/// Spawns `fut` in the current transfer: its log lines carry the
/// transfer's span, its tracker requests the transfer's id.
fn spawn_here<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let span = tracing::Span::current();
    match shoal_tracker::https_client::current_transfer() {
        Some(id) => {
            tokio::spawn(shoal_tracker::https_client::in_transfer(id, fut).instrument(span))
        }
        None => tokio::spawn(fut.instrument(span)),
    }
}

/// The set of running transfers.
#[derive(Debug, Clone)]
pub struct Transfers {
    running: Arc<Mutex<HashMap<Digest, Arc<Transfer>>>>,
    /// Transfers fetching chunks now: they share the node's chunks in
    /// flight from peers ([`Session::set_downloads`]).
    fetching: Arc<AtomicU32>,
    store: Store,
    origin: OriginClient,
    swarm: Arc<OnceLock<Arc<Swarm>>>,
}

impl Transfers {
    /// A new, empty set.
    pub fn new(store: Store, origin: OriginClient) -> Self {
        Transfers {
            running: Arc::default(),
            fetching: Arc::default(),
            store,
            origin,
            swarm: Arc::default(),
        }
    }

    /// Joins the swarm: from now on transfers use peers and the tracker.
    pub fn join(&self, swarm: Arc<Swarm>) {
        let _ = self.swarm.set(swarm);
    }

    /// The progress of the running transfer of `digest`, if any.
    pub fn progress(&self, digest: &Digest) -> Option<Progress> {
        let running = self.running.lock().expect("transfers lock");
        running.get(digest).map(|t| t.progress.borrow().clone())
    }

    /// The progress of the running transfer of `digest` as it changes, if
    /// one runs.
    pub fn watch(&self, digest: &Digest) -> Option<watch::Receiver<Progress>> {
        let running = self.running.lock().expect("transfers lock");
        running.get(digest).map(|t| t.reader())
    }

    /// Every running transfer's progress, by blob.
    pub fn list(&self) -> Vec<(Digest, Progress)> {
        let running = self.running.lock().expect("transfers lock");
        let mut all: Vec<(Digest, Progress)> = running
            .iter()
            .map(|(d, t)| (*d, t.progress.borrow().clone()))
            .collect();
        all.sort_by_key(|(d, _)| *d);
        all
    }

    /// Whether a transfer of `digest` is running.
    pub fn is_running(&self, digest: &Digest) -> bool {
        self.running
            .lock()
            .expect("transfers lock")
            .contains_key(digest)
    }

    /// The running transfer of `digest`, or a new one started for `target`.
    /// `None` when the blob became complete in the meantime: read the store.
    ///
    /// `vouched`: this node holds an earlier confirmation from the origin
    /// that `target` holds the blob; with the origin unreachable the blob's
    /// size then comes from the tracker and the chunks from peers.
    pub fn get_or_start(
        &self,
        target: &Target,
        digest: &Digest,
        vouched: bool,
    ) -> Option<Arc<Transfer>> {
        let mut running = self.running.lock().expect("transfers lock");
        if let Some(t) = running.get(digest) {
            return Some(t.clone());
        }
        // A transfer is marked complete in the store before it leaves
        // `running`, so under this lock "not running" and "not complete"
        // means nobody has it.
        if self.store.has_complete(digest) {
            return None;
        }
        let (tx, rx) = watch::channel(Progress {
            phase: Phase::Starting,
            size: 0,
            written: 0,
            file: None,
            layout: None,
            have: None,
            confirmed: false,
        });
        let t = Arc::new(Transfer {
            started_for: target.clone(),
            progress: rx,
        });
        running.insert(*digest, t.clone());
        let this = self.clone();
        let (target, digest) = (target.clone(), *digest);
        metrics::global().transfers_active.inc();
        let id = transfer_id(&digest);
        let span = tracing::info_span!("transfer", id = %id, digest = %digest);
        let run = async move {
            tracing::info!(upstream = %target.upstream, repo = %target.repo, "transfer started");
            match this.fetch(&target, &digest, vouched, &tx).await {
                Ok(()) => {}
                Err(Fail::Oci(e)) => {
                    tracing::warn!(digest = %digest, upstream = %target.upstream, repo = %target.repo, error = %e, "transfer failed");
                    tx.send_modify(|p| p.phase = Phase::Failed(e));
                }
                Err(Fail::NoRoom(e)) => {
                    tracing::warn!(digest = %digest, error = %e, "the store cannot hold this blob; passing it through from the origin");
                    metrics::global().store_refusals.inc();
                    tx.send_modify(|p| p.phase = Phase::NoRoom);
                }
                Err(Fail::Disk(e)) => {
                    let reason = this.store.note_write_failure(&e);
                    tracing::error!(digest = %digest, error = %e, reason,
                        "writing to the store failed; the blob's clients continue from the origin and nothing of it is kept");
                    metrics::global()
                        .store_write_failures
                        .get_or_create(&crate::metrics::ReasonLabel { reason })
                        .inc();
                    // The partial goes (its space with it once its readers
                    // have moved on); readers switch to the origin.
                    let _ = this.store.remove(&digest);
                    tx.send_modify(|p| p.phase = Phase::NoRoom);
                }
            }
            this.running.lock().expect("transfers lock").remove(&digest);
            metrics::global().transfers_active.dec();
        };
        tokio::spawn(shoal_tracker::https_client::in_transfer(id, run).instrument(span));
        Some(t)
    }

    /// The size of `digest` as the tracker knows it, if some member holds
    /// the whole blob.
    async fn size_from_swarm(&self, digest: &Digest) -> Option<u64> {
        let sw = self.swarm.get()?;
        let view = sw.tracker.lookup(&sw.node, digest, None).await.ok()?;
        view.holders()
            .iter()
            .any(|h| h.complete)
            .then(|| view.layout().size())
    }

    async fn fetch(
        &self,
        target: &Target,
        digest: &Digest,
        vouched: bool,
        tx: &watch::Sender<Progress>,
    ) -> Result<(), Fail> {
        // The size, from the origin — whose answer is also its word that
        // this repository holds the blob: asked even when a partial of an
        // earlier attempt is on disk, so no repository reads stored bytes on
        // another repository's confirmation. With the origin unreachable,
        // an earlier confirmation of this node's (`vouched`) lets peers
        // serve a blob the swarm holds; the tracker knows its size.
        let size = match self
            .origin
            .head_blob(&target.upstream, &target.repo, digest)
            .await
        {
            Ok(size) => {
                tx.send_modify(|p| p.confirmed = true);
                size
            }
            Err(e @ OriginError::Unavailable { .. }) if vouched => {
                match self.size_from_swarm(digest).await {
                    Some(size) => {
                        tracing::warn!(digest = %digest, repo = %target.repo, error = %e,
                            "origin unreachable; fetching from peers on an earlier confirmation");
                        size
                    }
                    None => return Err(Fail::from(e.to_oci())),
                }
            }
            Err(e) => return Err(Fail::from(e.to_oci())),
        };
        let chunk_size = self
            .swarm
            .get()
            .map_or(shoal_proto::chunk::DEFAULT_CHUNK_SIZE, |s| s.chunk_size);
        let layout = ChunkLayout::for_blob_with(size, chunk_size).map_err(|e| {
            OciError::new(ErrorCode::Unavailable, format!("blob of {size} bytes: {e}"))
        })?;
        let (store, d) = (self.store.clone(), *digest);
        let (file, have) =
            tokio::task::spawn_blocking(move || store.begin_partial(&d, Kind::Blob, layout))
                .await
                .expect("store task")
                .map_err(Fail::NoRoom)?;
        // While this transfer runs its partial is in use: never evicted.
        let _in_use = self.store.guard(digest);
        let file = Arc::new(file);
        if have.count() > 0 {
            tracing::info!(digest = %digest, chunks = have.count(), of = layout.count(), "resuming a partial blob");
        }
        // The whole-blob digest is hashed over the contiguous prefix of
        // stored chunks as it grows; readers may read that prefix.
        let mut prefix = PrefixHash::new(*digest, layout);
        prefix.advance(&have, &file).await.map_err(Fail::Disk)?;
        tx.send_modify(|p| {
            p.phase = Phase::Running;
            p.size = size;
            p.written = prefix.bytes();
            p.file = Some(file.clone());
            p.layout = Some(layout);
            p.have = Some(have.clone());
        });

        let clock = tokio::time::Instant::now();
        let now = move || clock.elapsed().as_millis() as u64;
        let swarm = self.swarm.get().cloned();
        // Alone (no swarm), the session fetches every chunk from the origin
        // in Range runs.
        let member = swarm.as_ref().map(|sw| Member {
            node: sw.node.clone(),
            addr: sw.addr.clone(),
            rack: sw.rack.clone(),
        });
        let _fetching = Fetching::enter(&self.fetching);
        let mut cfg = SessionConfig::default();
        if let Some(sw) = &swarm {
            cfg.sched.max_inflight = sw.max_inflight;
        }
        let mut session: Session<PeerAddr, Hashes> = Session::new(
            cfg,
            *digest,
            layout,
            have,
            member,
            resolve_peer,
            Hashes(Arc::new(ChunkHashes::new(layout))),
        );
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Ev>();
        let mut net = swarm.map(|sw| Net::new(sw, *digest, ev_tx.clone()));
        let mut runs: HashMap<u32, tokio::task::AbortHandle> = HashMap::new();
        let mut tally = Tally::default();
        // The hash each chunk from a peer was verified against (the last
        // one, if it came again): what this node may vouch for once the
        // blob's digest checks.
        let mut verified_with: HashMap<u32, [u8; 32]> = HashMap::new();
        let mut unsynced = 0u64;
        let mut checkpoint: Option<tokio::task::JoinHandle<()>> = None;
        'download: loop {
            session.set_downloads(self.fetching.load(Ordering::Relaxed));
            while let Some(io) = session.poll(now()) {
                tracing::trace!(digest = %digest, at = now(), ?io, "session");
                match io {
                    Io::FetchOrigin { chunks } => {
                        let run = OriginRun {
                            origin: self.origin.clone(),
                            target: target.clone(),
                            digest: *digest,
                            layout,
                            file: file.clone(),
                            events: ev_tx.clone(),
                            hash_chunks: net.is_some(),
                        };
                        let handle = spawn_here(run.fetch(chunks.clone()));
                        for c in chunks {
                            runs.insert(c, handle.abort_handle());
                        }
                    }
                    Io::CancelOrigin { chunk } => {
                        if let Some(h) = runs.remove(&chunk) {
                            h.abort();
                        }
                    }
                    Io::Complete => break 'download,
                    Io::GiveUp => {
                        for h in runs.values() {
                            h.abort();
                        }
                        return Err(Fail::from(OciError::new(
                            ErrorCode::Unavailable,
                            "the origin transfer kept failing",
                        )));
                    }
                    other => {
                        if let Some(net) = &mut net {
                            net.perform(other, &session);
                        }
                    }
                }
            }
            let deadline = session
                .next_deadline()
                .map(|t| clock + Duration::from_millis(t));
            let event = tokio::select! {
                ev = ev_rx.recv() => ev,
                () = async {
                    match deadline {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => None,
            };
            let Some(event) = event else { continue };
            tracing::trace!(digest = %digest, at = now(), ?event, "transfer event");
            if let (
                Some(net),
                Ev::Peer {
                    peer, chunk, task, ..
                },
            ) = (&mut net, &event)
            {
                net.peer_answered(*task, *peer, *chunk);
            }
            // Chunks whose bytes are now in the file, and from where.
            let stored = match event {
                Ev::Stored { chunk, hash } => {
                    runs.remove(&chunk);
                    Some((chunk, Source::Origin, hash.map(ChunkHash::from_bytes)))
                }
                Ev::Moving(source, chunk) => {
                    session.on_progress(now(), source, chunk);
                    None
                }
                Ev::Broken(chunk, why) => {
                    runs.remove(&chunk);
                    tracing::info!(digest = %digest, chunk, why, "origin run broke; the rest is asked again");
                    session.on_chunk(now(), Source::Origin, chunk, Outcome::Failed, None);
                    None
                }
                Ev::LocalWrite(e) => {
                    for h in runs.values() {
                        h.abort();
                    }
                    return Err(Fail::Disk(e));
                }
                Ev::Peer {
                    peer,
                    chunk,
                    task: _,
                    result,
                    hash,
                } => match result {
                    // Already stored (its bytes perhaps already hashed into
                    // the digest): a late copy is counted, never written.
                    ChunkResult::Verified(_) if session.have().get(chunk) => {
                        Some((chunk, Source::Peer(peer), None))
                    }
                    ChunkResult::Verified(bytes) => {
                        let (off, _) = layout.range(chunk).expect("verified against the layout");
                        match file.write_all_at(&bytes, off) {
                            Ok(()) => {
                                if let Some(h) = hash {
                                    verified_with.insert(chunk, h);
                                }
                                Some((chunk, Source::Peer(peer), None))
                            }
                            Err(e) => {
                                for h in runs.values() {
                                    h.abort();
                                }
                                return Err(Fail::Disk(e));
                            }
                        }
                    }
                    // Bad data is reported to the tracker by the session.
                    other => {
                        let t = now();
                        session.on_chunk(t, Source::Peer(peer), chunk, other.outcome(), None);
                        if let Some(ms) = other.retry_ms() {
                            session.peer_busy_until(peer, t + u64::from(ms));
                        }
                        None
                    }
                },
                Ev::Looked(r) => {
                    let notice = session.on_lookup(now(), r.map_err(failure));
                    log_notice(digest, notice);
                    None
                }
                Ev::Leased(r) => {
                    let r = r.map(|lease| lease.grant.chunks).map_err(failure);
                    let notice = session.on_lease(now(), r);
                    log_notice(digest, notice);
                    None
                }
                Ev::Sent => {
                    session.on_sent();
                    None
                }
                Ev::Watched(peer, bits) => {
                    session.on_watch(now(), peer, bits);
                    None
                }
            };
            if let Some((chunk, source, hash)) = stored {
                let new = session.on_chunk(now(), source.clone(), chunk, Outcome::Verified, hash);
                tally.count(&source, !new);
                if !new {
                    continue;
                }
                unsynced += u64::from(layout.chunk_len(chunk).unwrap_or(0));
                if let Err(e) = prefix.advance(session.have(), &file).await {
                    for h in runs.values() {
                        h.abort();
                    }
                    return Err(Fail::Disk(e));
                }
                let (written, snapshot) = (prefix.bytes(), session.have().clone());
                tx.send_modify(|p| {
                    p.written = written;
                    p.have = Some(snapshot);
                });
                let idle = checkpoint.as_ref().is_none_or(|h| h.is_finished());
                if unsynced >= CHECKPOINT_BYTES && idle {
                    unsynced = 0;
                    let (f, store, d, snapshot) = (
                        file.clone(),
                        self.store.clone(),
                        *digest,
                        session.have().clone(),
                    );
                    checkpoint = Some(tokio::task::spawn_blocking(move || {
                        if f.sync_data().is_ok() {
                            let _ = store.checkpoint(&d, &snapshot);
                        }
                    }));
                }
            }
        }
        if let Some(h) = checkpoint {
            let _ = h.await;
        }
        if let Err(got) = prefix.finish() {
            metrics::global()
                .chunks_rejected
                .get_or_create(&SourceLabel { source: "origin" })
                .inc();
            tracing::error!(digest = %digest, got = %got, upstream = %target.upstream, repo = %target.repo,
                "origin served bytes that do not match the digest; discarded, nothing stored");
            let _ = self.store.release(digest);
            if let (Some(net), Some(report)) = (&mut net, session.mismatch()) {
                net.perform(report, &session);
            }
            return Err(Fail::from(
                OciError::new(
                    ErrorCode::DigestInvalid,
                    "the origin served bytes that do not match the digest",
                )
                .with_detail(format!("expected {digest}, got {got}")),
            ));
        }
        // Verified: readers may have the last byte now. Making the blob
        // durable (fsync, rename, index) follows without holding them up;
        // until it is done the transfer stays registered, so new requests
        // read the same verified file.
        tx.send_modify(|p| p.phase = Phase::Done);
        if let Some(net) = &net {
            let last = session.finish();
            net.swarm.tracker.completed(digest, &verified_with, &last);
            net.finish(last);
        }
        let (store, d, f) = (self.store.clone(), *digest, file.clone());
        let stored = tokio::task::spawn_blocking(move || store.complete(&d, &f, None))
            .await
            .expect("store task");
        match stored {
            Ok(()) => tracing::info!(digest = %digest, size, chunks = layout.count(),
                from_origin = tally.origin, from_peers = tally.peers, duplicates = tally.duplicates,
                "blob complete"),
            Err(e) => {
                // The clients got their verified bytes; the store just keeps nothing.
                tracing::error!(digest = %digest, error = %e, "could not store a verified blob");
                let _ = self.store.release(digest);
            }
        }
        Ok(())
    }
}

/// One transfer counted among those fetching chunks while it lives.
struct Fetching(Arc<AtomicU32>);

impl Fetching {
    fn enter(count: &Arc<AtomicU32>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Fetching(count.clone())
    }
}

impl Drop for Fetching {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where a transfer's chunks came from, for its closing log line.
#[derive(Debug, Default)]
struct Tally {
    origin: u32,
    peers: u32,
    /// Chunks that arrived again after they were stored (endgame losers,
    /// answers after a stall moved the request).
    duplicates: u32,
}

impl Tally {
    fn count(&mut self, source: &Source<u32>, again: bool) {
        if again {
            self.duplicates += 1;
        } else if matches!(source, Source::Origin) {
            self.origin += 1;
        } else {
            self.peers += 1;
        }
    }
}

/// What the tasks of a transfer report to its event loop.
#[derive(Debug)]
enum Ev {
    /// An origin run stored this chunk; its SHA-256, for publishing.
    Stored { chunk: u32, hash: Option<[u8; 32]> },
    /// An origin run broke at this chunk (nothing from it on was stored).
    Broken(u32, String),
    /// An origin run could not write to the partial file.
    LocalWrite(std::io::Error),
    /// Bytes of this chunk are arriving from this source (at most every
    /// [`PROGRESS_MS`](shoal_proto::sched::PROGRESS_MS) per request).
    Moving(Source<u32>, u32),
    /// A peer answered for a chunk (verified bytes, or why not).
    Peer {
        peer: u32,
        chunk: u32,
        /// The request it answers ([`Net::fetch_peer`]).
        task: u64,
        result: ChunkResult,
        /// For a verified chunk, the hash it was verified against.
        hash: Option<[u8; 32]>,
    },
    /// A tracker lookup answered.
    Looked(Result<LookupReply, ApiError>),
    /// A lease request answered.
    Leased(Result<Lease, ApiError>),
    /// An announce or publish finished.
    Sent,
    /// A watched peer's bitfield, or (`None`) the end of its watch.
    Watched(u32, Option<Bitfield>),
}

/// A transfer's link to the swarm: performs the session's tracker requests
/// and peer requests, and keeps track of the peer requests in flight.
struct Net {
    swarm: Arc<Swarm>,
    blob: Digest,
    events: mpsc::UnboundedSender<Ev>,
    /// Peer requests in flight, by task id: the task and the chunks it
    /// still owes.
    peer_tasks: HashMap<u64, (tokio::task::AbortHandle, Vec<u32>)>,
    /// Which task owes (peer, chunk).
    owed_by: HashMap<(u32, u32), u64>,
    next_task: u64,
    /// Watches of peers, dropped with the transfer.
    watches: Vec<tokio::task::AbortHandle>,
}

impl Drop for Net {
    /// Requests still out when the transfer ends (endgame losers, say) are
    /// dropped, so peers stop sending them.
    fn drop(&mut self) {
        for (abort, _) in self.peer_tasks.values() {
            abort.abort();
        }
        for w in &self.watches {
            w.abort();
        }
    }
}

/// How long a watched peer has to send its first bitfield.
const WATCH_DEADLINE: Duration = Duration::from_secs(10);

/// How long a peer has to answer a whole request: a backstop; the
/// scheduler moves stalled chunks (5 s per place in the request) sooner.
const PEER_DEADLINE: Duration = Duration::from_secs(30);

/// The chunk hashes a transfer verifies peer chunks against, shared with the
/// peer requests in flight (copied only when a lookup adds hashes while one
/// still holds them).
struct Hashes(Arc<ChunkHashes>);

impl HashBook for Hashes {
    fn reset(&mut self) {
        self.0 = Arc::new(ChunkHashes::new(self.0.layout()));
    }

    fn learn(&mut self, chunk: u32, hash: &ChunkHash) {
        let _ = Arc::make_mut(&mut self.0).set(chunk, *hash.as_bytes());
    }
}

/// A holder the tracker (or, without one, the DHT) names is dialled at its
/// advertised QUIC address and must prove its node name.
pub(crate) fn resolve_peer(
    node: &NodeId,
    addr: &shoal_proto::tracker_api::PeerAddr,
) -> Option<PeerAddr> {
    match addr.as_str().parse::<SocketAddr>() {
        Ok(addr) => Some(PeerAddr {
            addr,
            name: node.as_str().to_owned(),
        }),
        Err(_) => {
            tracing::debug!(
                addr = addr.as_str(),
                "peer address is not an IP address; skipped"
            );
            None
        }
    }
}

/// How a tracker error reads to the session.
fn failure(e: ApiError) -> TrackerFailure {
    if e.is_down() {
        TrackerFailure::Down
    } else if matches!(
        e.code(),
        Some(&TrackerCode::Excluded | &TrackerCode::Denied)
    ) {
        // Shut out, for bad data or by the operator: the origin serves.
        TrackerFailure::Excluded
    } else {
        TrackerFailure::Refused
    }
}

fn log_notice(digest: &Digest, notice: Option<Notice>) {
    match notice {
        Some(Notice::TrackerDown) => tracing::warn!(digest = %digest,
            "tracker unreachable: the origin serves what no known peer has"),
        Some(Notice::TrackerBack) => {
            tracing::info!(digest = %digest, "tracker reachable again: back to the swarm")
        }
        Some(Notice::LayoutConflict) => tracing::warn!(digest = %digest,
            "the tracker lays this blob out differently; fetching it alone"),
        Some(Notice::Excluded) => tracing::error!(digest = %digest,
            "the tracker excludes this node (for bad data it served: check its disk; or it is on \
             the operator's deny list); the origin serves what no known peer has"),
        None => {}
    }
}

impl Net {
    fn new(swarm: Arc<Swarm>, blob: Digest, events: mpsc::UnboundedSender<Ev>) -> Self {
        Net {
            swarm,
            blob,
            events,
            peer_tasks: HashMap::new(),
            owed_by: HashMap::new(),
            next_task: 0,
            watches: Vec::new(),
        }
    }

    /// Performs a tracker or peer request of the session; its answer comes
    /// back as an [`Ev`].
    fn perform(&mut self, io: Io, session: &Session<PeerAddr, Hashes>) {
        let (sw, blob, ev) = (self.swarm.clone(), self.blob, self.events.clone());
        match io {
            Io::Lookup { since } => {
                spawn_here(async move {
                    let r = sw.tracker.lookup(&sw.node, &blob, since).await;
                    let _ = ev.send(Ev::Looked(r));
                });
            }
            Io::Lease(req) => {
                spawn_here(async move {
                    let _ = ev.send(Ev::Leased(sw.tracker.lease(req).await));
                });
            }
            Io::Publish(p) => {
                spawn_here(async move {
                    if let Err(e) = sw.tracker.publish_hashes(p).await {
                        tracing::debug!(error = %e, "publishing chunk hashes failed");
                    }
                    let _ = ev.send(Ev::Sent);
                });
            }
            Io::Announce(a) => {
                // The node's announcer sends it (merged with the other
                // transfers' if one is on its way): this transfer goes on.
                sw.announce_merged(a);
                let _ = ev.send(Ev::Sent);
            }
            Io::Report(r) => {
                spawn_here(async move {
                    let _ = sw.tracker.report(r).await;
                });
            }
            Io::FetchPeer { peer, chunks } => {
                if let Some((_, addr)) = session.peer(peer) {
                    let hashes = session.hashes().0.clone();
                    self.fetch_peer(peer, addr.clone(), hashes, chunks);
                }
            }
            Io::CancelPeer { peer, chunk } => self.cancel_peer(peer, chunk),
            Io::Watch { peer } => {
                if let Some((_, addr)) = session.peer(peer) {
                    self.watch(peer, addr.clone(), *session.layout());
                }
            }
            // The transfer's own loop handles the origin and the end.
            Io::FetchOrigin { .. } | Io::CancelOrigin { .. } | Io::Complete | Io::GiveUp => {}
        }
    }

    fn fetch_peer(
        &mut self,
        peer: u32,
        addr: PeerAddr,
        hashes: Arc<ChunkHashes>,
        chunks: Vec<u32>,
    ) {
        let task = self.next_task;
        self.next_task += 1;
        let (sw, blob, ev) = (self.swarm.clone(), self.blob, self.events.clone());
        let owed = chunks.clone();
        let handle = spawn_here(async move {
            sw.peers
                .fetch_each(
                    &addr,
                    &blob,
                    &hashes,
                    &chunks,
                    PEER_DEADLINE,
                    |chunk, result| {
                        let hash = match result {
                            ChunkResult::Verified(_) => hashes.get(chunk),
                            _ => None,
                        };
                        let _ = ev.send(Ev::Peer {
                            peer,
                            chunk,
                            task,
                            result,
                            hash,
                        });
                    },
                    |chunk| {
                        let _ = ev.send(Ev::Moving(Source::Peer(peer), chunk));
                    },
                )
                .await;
        });
        for &c in &owed {
            self.owed_by.insert((peer, c), task);
        }
        self.peer_tasks.insert(task, (handle.abort_handle(), owed));
    }

    /// Watches peer `peer`: its bitfields come back as [`Ev::Watched`],
    /// then `None` when the watch ends, however it ends.
    fn watch(&mut self, peer: u32, addr: PeerAddr, layout: ChunkLayout) {
        let (sw, blob, ev) = (self.swarm.clone(), self.blob, self.events.clone());
        let handle = spawn_here(async move {
            let r = sw
                .peers
                .watch(&addr, &blob, layout, WATCH_DEADLINE, |bits| {
                    metrics::global().watch_frames.inc();
                    let _ = ev.send(Ev::Watched(peer, Some(bits)));
                })
                .await;
            if let Err(e) = r {
                tracing::debug!(peer = %addr, error = %e, "watch of a peer ended");
            }
            let _ = ev.send(Ev::Watched(peer, None));
        });
        self.watches.push(handle.abort_handle());
    }

    /// `task` answered for `chunk`: it owes one chunk less.
    fn peer_answered(&mut self, task: u64, peer: u32, chunk: u32) {
        if self.owed_by.get(&(peer, chunk)) == Some(&task) {
            self.owed_by.remove(&(peer, chunk));
        }
        if let Some((_, owed)) = self.peer_tasks.get_mut(&task) {
            owed.retain(|&c| c != chunk);
            if owed.is_empty() {
                self.peer_tasks.remove(&task);
            }
        }
    }

    /// The scheduler no longer waits for `chunk` from `peer`: once its
    /// request owes nothing else, it is dropped, which resets the stream so
    /// the peer stops sending.
    fn cancel_peer(&mut self, peer: u32, chunk: u32) {
        let Some(task) = self.owed_by.remove(&(peer, chunk)) else {
            return;
        };
        if let Some((abort, owed)) = self.peer_tasks.get_mut(&task) {
            owed.retain(|&c| c != chunk);
            if owed.is_empty() {
                abort.abort();
                self.peer_tasks.remove(&task);
            }
        }
    }

    /// The blob is complete and verified: sends the session's closing
    /// publish and announce, in order, without holding the transfer up.
    fn finish(&self, msgs: Vec<Io>) {
        let sw = self.swarm.clone();
        spawn_here(async move {
            for io in msgs {
                let r = match io {
                    Io::Publish(p) => sw.tracker.publish_hashes(p).await.map(|_| ()),
                    // Through the node's announcer, after the publish: it
                    // replaces any partial word on this blob still waiting
                    // there, which would otherwise follow it to the tracker.
                    Io::Announce(a) => {
                        sw.announce_merged(a);
                        Ok(())
                    }
                    _ => Ok(()),
                };
                if let Err(e) = r {
                    tracing::debug!(error = %e, "telling the tracker the blob is complete failed");
                }
            }
        });
    }
}

/// One contiguous Range request to the origin, writing chunks at their
/// offsets as the bytes arrive.
struct OriginRun {
    origin: OriginClient,
    target: Target,
    digest: Digest,
    layout: ChunkLayout,
    file: Arc<File>,
    events: mpsc::UnboundedSender<Ev>,
    /// Hash each chunk (to publish it): only in a cluster.
    hash_chunks: bool,
}

/// Why an origin run ended early.
enum RunFail {
    /// The origin failed at this chunk (or before the first).
    Origin(Option<u32>, String),
    /// Writing to the local file failed.
    Local(std::io::Error),
}

impl OriginRun {
    async fn fetch(self, chunks: Vec<u32>) {
        let first = chunks[0];
        let ev = match self.fetch_impl(&chunks).await {
            Ok(()) => return,
            Err(RunFail::Origin(chunk, why)) => Ev::Broken(chunk.unwrap_or(first), why),
            Err(RunFail::Local(e)) => Ev::LocalWrite(e),
        };
        let _ = self.events.send(ev);
    }

    async fn fetch_impl(&self, chunks: &[u32]) -> Result<(), RunFail> {
        let (start, _) = self.layout.range(chunks[0]).expect("chunk in layout");
        let (last_off, last_len) = self
            .layout
            .range(*chunks.last().expect("a run"))
            .expect("chunk in layout");
        let end = last_off + u64::from(last_len);
        let (t, d) = (&self.target, &self.digest);
        let mut stream = match self
            .origin
            .get_blob_range(&t.upstream, &t.repo, d, start, Some(end - 1))
            .await
        {
            Err(OriginError::RangeIgnored) => {
                self.origin.get_blob(&t.upstream, &t.repo, d, 0).await
            }
            other => other,
        }
        .map_err(|e| RunFail::Origin(None, e.to_string()))?;
        if stream.total_size().is_some_and(|s| s != self.layout.size()) {
            return Err(RunFail::Origin(
                None,
                format!(
                    "origin says the blob has {:?} bytes, not {}",
                    stream.total_size(),
                    self.layout.size()
                ),
            ));
        }
        let origin_bytes = metrics::global()
            .origin_bytes
            .get_or_create(&KindLabel { kind: "blob" })
            .clone();
        let mut pos = stream.offset();
        // The chunk being received and the SHA-256 of its bytes so far.
        let mut current = 0usize;
        let mut hasher = Sha256::new();
        let mut tell = Every::new(Duration::from_millis(PROGRESS_MS));
        while current < chunks.len() {
            let chunk = chunks[current];
            let bytes = match stream.next_chunk().await {
                Some(Ok(b)) => b,
                Some(Err(e)) => return Err(RunFail::Origin(Some(chunk), e.to_string())),
                None => {
                    return Err(RunFail::Origin(
                        Some(chunk),
                        "origin closed the body early".into(),
                    ))
                }
            };
            origin_bytes.inc_by(bytes.len() as u64);
            // Slow is not stalled: where the origin's link is shared by
            // every lessee, a run's first chunk can take minutes.
            if tell.due() {
                let _ = self.events.send(Ev::Moving(Source::Origin, chunk));
            }
            // Keep only what falls inside the run (an origin that ignored
            // the range sends more).
            let mut lo = start.max(pos);
            let hi = end.min(pos + bytes.len() as u64);
            if lo < hi {
                let part = &bytes[(lo - pos) as usize..(hi - pos) as usize];
                self.file.write_all_at(part, lo).map_err(RunFail::Local)?;
                // Report each chunk as it completes (with its hash, in a cluster).
                while lo < hi && current < chunks.len() {
                    let (off, len) = self.layout.range(chunks[current]).expect("chunk in layout");
                    let chunk_end = off + u64::from(len);
                    let take = hi.min(chunk_end);
                    if self.hash_chunks {
                        hasher.update(
                            &part[(lo - start.max(pos)) as usize..(take - start.max(pos)) as usize],
                        );
                    }
                    lo = take;
                    if lo == chunk_end {
                        let hash = self.hash_chunks.then(|| {
                            std::mem::replace(&mut hasher, Sha256::new())
                                .finalize()
                                .into()
                        });
                        let _ = self.events.send(Ev::Stored {
                            chunk: chunks[current],
                            hash,
                        });
                        current += 1;
                    }
                }
            }
            pos += bytes.len() as u64;
        }
        Ok(())
    }
}

/// The whole-blob SHA-256 over the contiguous prefix of stored chunks.
struct PrefixHash {
    verifier: Sha256Verifier,
    layout: ChunkLayout,
    /// First chunk not hashed yet.
    next: u32,
}

impl PrefixHash {
    fn new(digest: Digest, layout: ChunkLayout) -> Self {
        PrefixHash {
            verifier: Sha256Verifier::new(digest),
            layout,
            next: 0,
        }
    }

    /// Bytes of the prefix hashed so far (what readers may have).
    fn bytes(&self) -> u64 {
        self.verifier.len()
    }

    /// Hashes every stored chunk that extends the prefix (read back from the
    /// file). Returns whether the prefix grew.
    async fn advance(&mut self, have: &Bitfield, file: &Arc<File>) -> std::io::Result<bool> {
        let mut grew = false;
        while self.next < self.layout.count() && have.get(self.next) {
            let (off, len) = self.layout.range(self.next).expect("chunk in layout");
            let f = file.clone();
            let data = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len as usize];
                f.read_exact_at(&mut buf, off).map(|()| buf)
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))?;
            self.verifier.update(&data);
            self.next += 1;
            grew = true;
        }
        Ok(grew)
    }

    /// Checks the whole blob (every chunk must have been hashed).
    fn finish(self) -> Result<(), Digest> {
        self.verifier.finish()
    }
}

impl Transfer {
    /// Waits until the origin answered: the blob's size and file, or the error.
    pub async fn started(&self) -> Result<(u64, Arc<File>), Unstarted> {
        let mut rx = self.progress.clone();
        loop {
            {
                let p = rx.borrow_and_update();
                match &p.phase {
                    Phase::Starting => {}
                    Phase::Failed(e) => return Err(Unstarted::Failed(e.clone())),
                    Phase::NoRoom => return Err(Unstarted::NoRoom),
                    Phase::Running | Phase::Done => {
                        return Ok((p.size, p.file.clone().expect("file set when running")));
                    }
                }
            }
            if rx.changed().await.is_err() {
                return Err(Unstarted::Failed(OciError::new(
                    ErrorCode::Unavailable,
                    "transfer ended unexpectedly",
                )));
            }
        }
    }

    /// Whether the origin confirmed this transfer's repository (see
    /// [`Progress::confirmed`]).
    pub fn confirmed_by_origin(&self) -> bool {
        self.progress.borrow().confirmed
    }

    /// A reader of this transfer.
    pub fn reader(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }
}

/// Streams `start..=end` of a blob's file to a client, with read-ahead: a
/// task reads the next chunks from disk while earlier ones are still on their
/// way, so the socket never waits on the disk. The read-ahead is bounded and
/// stops when the client goes away.
///
/// With `progress` (a blob still arriving), only bytes the transfer has
/// written are read, the very last byte of the blob waits for the digest
/// check, and a failed transfer ends the stream with an error — the client's
/// response is cut short.
pub fn blob_stream(
    file: Arc<File>,
    size: u64,
    start: u64,
    end: u64,
    mut progress: Option<watch::Receiver<Progress>>,
    guard: Option<ReadGuard>,
) -> ByteStream {
    const AHEAD: usize = 4;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(AHEAD);
    tokio::spawn(async move {
        let _guard = guard;
        let mut pos = start;
        while pos <= end {
            let avail = match progress.as_mut() {
                None => size,
                Some(rx) => match wait_available(rx, pos, size).await {
                    Ok(avail) => avail,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                },
            };
            let want = (avail.min(end + 1) - pos).min(READ_CHUNK);
            // Wait for room before reading, so at most AHEAD chunks are held.
            let Ok(permit) = tx.reserve().await else {
                return;
            };
            let f = file.clone();
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; want as usize];
                f.read_exact_at(&mut buf, pos).map(|()| Bytes::from(buf))
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            let failed = read.is_err();
            permit.send(read);
            if failed {
                return;
            }
            pos += want;
        }
    });
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

/// The error a reader of an arriving blob gets when the store gave up on it
/// (the disk filled up) with the reader at byte `at`: what it has sent so
/// far is good, and the rest must come from the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the store gave up on this blob at byte {at}")]
pub struct StoreGaveUp {
    /// The first byte the reader has not sent.
    pub at: u64,
    /// How far from the start the file holds the blob's bytes (the
    /// contiguous prefix the transfer had written).
    pub written: u64,
}

/// Waits until the transfer has bytes past `pos` that a reader may see, and
/// returns how far it may read. The last byte of the blob is held back until
/// the digest is verified.
async fn wait_available(
    rx: &mut watch::Receiver<Progress>,
    pos: u64,
    size: u64,
) -> std::io::Result<u64> {
    loop {
        let avail = {
            let p = rx.borrow_and_update();
            match &p.phase {
                Phase::Done => size,
                Phase::Failed(e) => return Err(std::io::Error::other(e.to_string())),
                Phase::NoRoom => {
                    let written = p.written;
                    return Err(std::io::Error::other(StoreGaveUp { at: pos, written }));
                }
                Phase::Starting => 0,
                Phase::Running => p.written.min(size.saturating_sub(1)),
            }
        };
        if avail > pos {
            return Ok(avail);
        }
        if rx.changed().await.is_err() {
            return Err(std::io::Error::other("transfer ended without completing"));
        }
    }
}
