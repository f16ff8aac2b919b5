//! Single-flight blob transfers from the origin, streamed to any number of
//! readers while they arrive.
//!
//! One [`Transfer`] per digest at a time: the first request starts it, later
//! ones join it and read what has arrived from the same partial file. Bytes
//! are hashed as they come; the whole blob is checked against its digest
//! before it is complete, and readers are held back from the last byte until
//! then — so a client never receives a complete wrong blob. A mismatch cuts
//! every reader's response short and stores nothing.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use shoal_proto::{Digest, ErrorCode, OciError, Sha256Verifier};
use shoal_registry_shim::client::{BlobStream, OriginClient, OriginError};
use shoal_registry_shim::serve::{ByteStream, Target};
use tokio::sync::watch;

use crate::metrics::{self, KindLabel, SourceLabel};
use crate::store::{Kind, ReadGuard, Store, StoreError};

/// Bytes between index checkpoints of a partial blob (after an fsync), so a
/// crash loses at most this much of a transfer.
const CHECKPOINT_BYTES: u64 = 8 << 20;
/// Times a broken origin stream is resumed with `Range` before giving up.
const MAX_RESUMES: u32 = 5;
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
}

impl From<OciError> for Fail {
    fn from(e: OciError) -> Self {
        Fail::Oci(e)
    }
}

/// The set of running transfers.
#[derive(Debug, Clone)]
pub struct Transfers {
    running: Arc<Mutex<HashMap<Digest, Arc<Transfer>>>>,
    store: Store,
    origin: OriginClient,
}

impl Transfers {
    /// A new, empty set.
    pub fn new(store: Store, origin: OriginClient) -> Self {
        Transfers {
            running: Arc::default(),
            store,
            origin,
        }
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
    pub fn get_or_start(&self, target: &Target, digest: &Digest) -> Option<Arc<Transfer>> {
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
        });
        let t = Arc::new(Transfer {
            started_for: target.clone(),
            progress: rx,
        });
        running.insert(*digest, t.clone());
        let this = self.clone();
        let (target, digest) = (target.clone(), *digest);
        metrics::global().transfers_active.inc();
        tokio::spawn(async move {
            match this.fetch(&target, &digest, &tx).await {
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
            }
            this.running.lock().expect("transfers lock").remove(&digest);
            metrics::global().transfers_active.dec();
        });
        Some(t)
    }

    async fn open_origin(
        &self,
        target: &Target,
        digest: &Digest,
        from: u64,
    ) -> Result<BlobStream, OciError> {
        let r = match self
            .origin
            .get_blob(&target.upstream, &target.repo, digest, from)
            .await
        {
            Err(OriginError::RangeIgnored) if from > 0 => {
                self.origin
                    .get_blob(&target.upstream, &target.repo, digest, 0)
                    .await
            }
            other => other,
        };
        r.map_err(|e| e.to_oci())
    }

    async fn fetch(
        &self,
        target: &Target,
        digest: &Digest,
        tx: &watch::Sender<Progress>,
    ) -> Result<(), Fail> {
        let store_err = |e: StoreError| {
            tracing::error!(error = %e, "store failed");
            OciError::new(ErrorCode::Unavailable, format!("local store: {e}"))
        };
        let from = self
            .store
            .meta(digest)
            .filter(|m| !m.complete)
            .map_or(0, |m| m.durable_len);
        let mut stream = self.open_origin(target, digest, from).await?;
        let size = stream.total_size().ok_or_else(|| {
            OciError::new(
                ErrorCode::Unavailable,
                "origin did not say how large the blob is",
            )
        })?;
        let (store, d) = (self.store.clone(), *digest);
        let (begun, mut verifier) = tokio::task::spawn_blocking(move || {
            let mut v = Sha256Verifier::new(d);
            (store.begin_partial(&d, Kind::Blob, size, &mut v), v)
        })
        .await
        .expect("store task");
        let (file, have) = begun.map_err(Fail::NoRoom)?;
        if have != stream.offset() {
            drop(stream);
            stream = self.open_origin(target, digest, have).await?;
            if stream.offset() != have {
                let _ = self.store.release(digest);
                return Err(Fail::from(OciError::new(
                    ErrorCode::Unavailable,
                    "origin did not honour a Range request",
                )));
            }
        }
        if have > 0 {
            tracing::info!(digest = %digest, resumed_at = have, size, "resuming a partial blob");
        }
        // While this transfer runs its partial is in use: never evicted.
        let _in_use = self.store.guard(digest);
        let file = Arc::new(file);
        let mut written = have;
        tx.send_modify(|p| {
            p.phase = Phase::Running;
            p.size = size;
            p.written = written;
            p.file = Some(file.clone());
        });
        let m = metrics::global();
        let origin_bytes = m
            .origin_bytes
            .get_or_create(&KindLabel { kind: "blob" })
            .clone();
        let mut resumes = 0;
        let mut last_checkpoint = written;
        let mut checkpoint: Option<tokio::task::JoinHandle<()>> = None;
        while written < size {
            match stream.next_chunk().await {
                Some(Ok(bytes)) => {
                    origin_bytes.inc_by(bytes.len() as u64);
                    if written + bytes.len() as u64 > size {
                        let _ = self.store.release(digest);
                        return Err(Fail::from(OciError::new(
                            ErrorCode::Unavailable,
                            "origin sent more bytes than the blob's size",
                        )));
                    }
                    verifier.update(&bytes);
                    if let Err(e) = file.write_all_at(&bytes, written) {
                        let _ = self.store.release(digest);
                        return Err(Fail::from(store_err(e.into())));
                    }
                    written += bytes.len() as u64;
                    tx.send_modify(|p| p.written = written);
                    let idle = checkpoint.as_ref().is_none_or(|h| h.is_finished());
                    if written - last_checkpoint >= CHECKPOINT_BYTES && idle {
                        last_checkpoint = written;
                        let (f, store, d) = (file.clone(), self.store.clone(), *digest);
                        checkpoint = Some(tokio::task::spawn_blocking(move || {
                            if f.sync_data().is_ok() {
                                let _ = store.checkpoint(&d, written);
                            }
                        }));
                    }
                }
                other => {
                    let why = match other {
                        Some(Err(e)) => e.to_string(),
                        _ => "origin closed the body early".to_owned(),
                    };
                    resumes += 1;
                    if resumes > MAX_RESUMES {
                        return Err(Fail::from(OciError::new(
                            ErrorCode::Unavailable,
                            format!("origin transfer kept breaking: {why}"),
                        )));
                    }
                    tracing::info!(digest = %digest, at = written, why, "origin stream broke; resuming with Range");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(resumes))).await;
                    stream = self.open_origin(target, digest, written).await?;
                    if stream.offset() != written {
                        return Err(Fail::from(OciError::new(
                            ErrorCode::Unavailable,
                            "origin did not honour a Range request",
                        )));
                    }
                }
            }
        }
        if let Some(h) = checkpoint {
            let _ = h.await;
        }
        if let Err(got) = verifier.finish() {
            m.chunks_rejected
                .get_or_create(&SourceLabel { source: "origin" })
                .inc();
            tracing::error!(digest = %digest, got = %got, upstream = %target.upstream, repo = %target.repo,
                "origin served bytes that do not match the digest; discarded, nothing stored");
            let _ = self.store.release(digest);
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
        let (store, d, f) = (self.store.clone(), *digest, file.clone());
        let stored = tokio::task::spawn_blocking(move || store.complete(&d, &f, None))
            .await
            .expect("store task");
        match stored {
            Ok(()) => tracing::debug!(digest = %digest, size, "blob complete"),
            Err(e) => {
                // The clients got their verified bytes; the store just keeps nothing.
                tracing::error!(digest = %digest, error = %e, "could not store a verified blob");
                let _ = self.store.release(digest);
            }
        }
        Ok(())
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
                    return Err(std::io::Error::other("the store had no room for this blob"))
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
