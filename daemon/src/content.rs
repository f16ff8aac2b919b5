//! What the registry endpoint serves: the daemon's implementation of the
//! shim's `Content` trait — manifests resolved at the origin, blobs from the
//! store or from a single-flight transfer, and the Authority rule (a cached
//! blob is served for a repository only after the origin confirmed that
//! repository holds it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use shoal_proto::{ByteRange, Digest, ErrorCode, OciError, Reference};
use shoal_registry_shim::client::{OriginClient, OriginError};
use shoal_registry_shim::serve::{
    BlobSource, ByteStream, Content, ManifestBody, RouteKind, Target,
};

use crate::metrics::{self, KindLabel, OutcomeLabel};
use crate::store::{now_secs, Kind, Store, TagRecord};
use crate::transfer::{blob_stream, StoreGaveUp, Transfers, Unstarted};
use futures_util::StreamExt as _;

/// How long a confirmation may be used, past its TTL, while the origin is
/// unreachable (never when the origin answers).
const STALE_CONFIRMATION_MAX: Duration = Duration::from_secs(24 * 3600);
/// How old a tag resolution may be to answer with it while the origin is down.
const STALE_TAG_MAX_SECS: u64 = 24 * 3600;

/// The daemon's content: store, origin, transfers, confirmations.
#[derive(Debug, Clone)]
pub struct NodeContent {
    store: Store,
    origin: OriginClient,
    transfers: Transfers,
    authority_ttl: Duration,
    confirmed: Arc<Mutex<Confirmations>>,
    manifests: Arc<Mutex<ManifestMemo>>,
}

/// Bytes of verified manifests kept in memory: runtimes ask for the same
/// few manifests over and over, and they are small.
const MANIFEST_MEMO_BYTES: usize = 32 << 20;

/// Verified manifests in memory, oldest dropped first past the byte bound.
#[derive(Debug, Default)]
struct ManifestMemo {
    map: HashMap<Digest, (Bytes, String)>,
    order: std::collections::VecDeque<Digest>,
    bytes: usize,
}

impl ManifestMemo {
    fn get(&self, d: &Digest) -> Option<(Bytes, String)> {
        self.map.get(d).cloned()
    }

    fn insert(&mut self, d: Digest, bytes: Bytes, media_type: String) {
        if self.map.contains_key(&d) || bytes.len() > MANIFEST_MEMO_BYTES / 8 {
            return;
        }
        self.bytes += bytes.len();
        self.map.insert(d, (bytes, media_type));
        self.order.push_back(d);
        while self.bytes > MANIFEST_MEMO_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some((b, _)) = self.map.remove(&old) {
                self.bytes -= b.len();
            }
        }
    }
}

/// Longest the confirmation map may grow before old entries are pruned.
const MAX_CONFIRMATIONS: usize = 100_000;

/// When the origin last confirmed that `(upstream, repo)` holds a digest.
#[derive(Debug, Default)]
struct Confirmations(HashMap<(String, String, Digest), Instant>);

impl Confirmations {
    fn get(&self, key: &(String, String, Digest)) -> Option<Instant> {
        self.0.get(key).copied()
    }

    fn insert(&mut self, key: (String, String, Digest)) {
        if self.0.len() >= MAX_CONFIRMATIONS {
            self.0.retain(|_, t| t.elapsed() < STALE_CONFIRMATION_MAX);
            if self.0.len() >= MAX_CONFIRMATIONS {
                // Still full of fresh entries: keep the newer half.
                let mut ages: Vec<Instant> = self.0.values().copied().collect();
                ages.sort_unstable();
                let cut = ages[ages.len() / 2];
                self.0.retain(|_, t| *t >= cut);
            }
        }
        self.0.insert(key, Instant::now());
    }
}

fn outcome(r: &Result<impl Sized, OriginError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(OriginError::NotFound { .. }) => "not_found",
        Err(
            OriginError::Unauthorized { .. }
            | OriginError::Denied { .. }
            | OriginError::Credentials(..),
        ) => "denied",
        Err(OriginError::Unavailable { .. } | OriginError::TooManyRequests { .. }) => "unavailable",
        Err(_) => "error",
    }
}

fn count<T>(r: Result<T, OriginError>) -> Result<T, OriginError> {
    metrics::global()
        .origin_requests
        .get_or_create(&OutcomeLabel {
            outcome: outcome(&r),
        })
        .inc();
    r
}

impl NodeContent {
    /// Content over a store and an origin client.
    pub fn new(store: Store, origin: OriginClient, authority_ttl: Duration) -> Self {
        NodeContent {
            transfers: Transfers::new(store.clone(), origin.clone()),
            store,
            origin,
            authority_ttl,
            confirmed: Arc::default(),
            manifests: Arc::default(),
        }
    }

    /// The running transfers.
    pub fn transfers(&self) -> &Transfers {
        &self.transfers
    }

    fn key(target: &Target, d: &Digest) -> (String, String, Digest) {
        (target.upstream.clone(), target.repo.as_str().to_owned(), *d)
    }

    fn note_confirmed(&self, target: &Target, d: &Digest) {
        self.confirmed
            .lock()
            .expect("lock")
            .insert(Self::key(target, d));
    }

    /// Makes sure the origin says `target` holds `d` (cached for the TTL).
    async fn confirm(&self, target: &Target, d: &Digest, kind: Kind) -> Result<(), OciError> {
        let last = self
            .confirmed
            .lock()
            .expect("lock")
            .get(&Self::key(target, d));
        if last.is_some_and(|t| t.elapsed() < self.authority_ttl) {
            return Ok(());
        }
        let r = match kind {
            Kind::Blob => count(
                self.origin
                    .head_blob(&target.upstream, &target.repo, d)
                    .await,
            )
            .map(|_| ()),
            Kind::Manifest => count(
                self.origin
                    .head_manifest(&target.upstream, &target.repo, &Reference::Digest(*d))
                    .await,
            )
            .map(|_| ()),
        };
        match r {
            Ok(()) => {
                self.note_confirmed(target, d);
                Ok(())
            }
            Err(e @ OriginError::Unavailable { .. }) => match last {
                Some(t) if t.elapsed() < STALE_CONFIRMATION_MAX => {
                    tracing::warn!(digest = %d, repo = %target.repo, error = %e,
                        "origin unreachable; serving on an earlier confirmation");
                    Ok(())
                }
                _ => Err(e.to_oci()),
            },
            Err(e) => Err(e.to_oci()),
        }
    }

    fn tag_key(target: &Target, tag: &str) -> String {
        format!("{}/{}:{}", target.upstream, target.repo, tag)
    }

    async fn manifest_by_digest(
        &self,
        target: &Target,
        d: &Digest,
        head: bool,
    ) -> Result<ManifestBody, OciError> {
        let kind = KindLabel { kind: "manifest" };
        let memo = self.manifests.lock().expect("lock").get(d);
        if let Some((bytes, media_type)) = memo {
            self.confirm(target, d, Kind::Manifest).await?;
            metrics::global().cache_hits.get_or_create(&kind).inc();
            return Ok(ManifestBody {
                digest: *d,
                media_type,
                size: bytes.len() as u64,
                bytes: (!head).then_some(bytes),
            });
        }
        if let Some(blob) = self.store.open_complete(d) {
            self.confirm(target, d, Kind::Manifest).await?;
            metrics::global().cache_hits.get_or_create(&kind).inc();
            let media_type = blob
                .meta
                .media_type
                .clone()
                .unwrap_or_else(|| shoal_proto::media::OCI_MANIFEST.to_owned());
            let size = blob.size;
            let bytes = if head {
                None
            } else {
                let path = self.store.blob_path(d);
                let data = tokio::fs::read(&path).await.map_err(|e| {
                    OciError::new(
                        ErrorCode::Unavailable,
                        format!("reading a cached manifest: {e}"),
                    )
                })?;
                // Stored bytes were verified on the way in; check again since
                // they are small and go straight to a client.
                if Digest::of(&data) != *d {
                    tracing::error!(digest = %d, "cached manifest is corrupt; dropping it");
                    let _ = self.store.remove(d);
                    return Err(OciError::new(
                        ErrorCode::Unavailable,
                        "cached manifest was corrupt; retry",
                    ));
                }
                let data = Bytes::from(data);
                self.manifests
                    .lock()
                    .expect("lock")
                    .insert(*d, data.clone(), media_type.clone());
                Some(data)
            };
            return Ok(ManifestBody {
                digest: *d,
                media_type,
                size,
                bytes,
            });
        }
        metrics::global().cache_misses.get_or_create(&kind).inc();
        let m = count(
            self.origin
                .get_manifest(&target.upstream, &target.repo, &Reference::Digest(*d))
                .await,
        )
        .map_err(|e| e.to_oci())?;
        metrics::global()
            .origin_bytes
            .get_or_create(&kind)
            .inc_by(m.bytes.len() as u64);
        self.manifests
            .lock()
            .expect("lock")
            .insert(*d, m.bytes.clone(), m.media_type.clone());
        self.note_confirmed(target, d);
        let (store, bytes, mt) = (self.store.clone(), m.bytes.clone(), m.media_type.clone());
        let dd = *d;
        let stored = tokio::task::spawn_blocking(move || {
            store.put_small(&dd, Kind::Manifest, &bytes, Some(mt))
        })
        .await;
        if let Ok(Err(e)) = stored {
            tracing::warn!(digest = %d, error = %e, "could not cache manifest; serving it anyway");
        }
        Ok(ManifestBody {
            digest: m.digest,
            media_type: m.media_type,
            size: m.bytes.len() as u64,
            bytes: (!head).then_some(m.bytes),
        })
    }
}

impl Content for NodeContent {
    async fn manifest(
        &self,
        target: &Target,
        reference: &Reference,
        head: bool,
    ) -> Result<ManifestBody, OciError> {
        let tag = match reference {
            Reference::Digest(d) => return self.manifest_by_digest(target, d, head).await,
            Reference::Tag(t) => t,
        };
        // Tags are always resolved at the origin, with a HEAD (which Docker
        // Hub does not count against pull limits); the bytes then come from
        // the store when they are there.
        let key = Self::tag_key(target, tag.as_str());
        let info = match count(
            self.origin
                .head_manifest(&target.upstream, &target.repo, reference)
                .await,
        ) {
            Ok(info) => {
                let rec = TagRecord {
                    digest: info.digest,
                    media_type: info.media_type.clone(),
                    size: info.size,
                    resolved_at: now_secs(),
                };
                if let Err(e) = self.store.put_tag(&key, &rec) {
                    tracing::debug!(error = %e, "could not record tag resolution");
                }
                self.note_confirmed(target, &info.digest);
                rec
            }
            Err(e @ OriginError::Unavailable { .. }) => {
                let fallback = self.store.get_tag(&key).ok().flatten();
                match fallback {
                    Some(rec)
                        if now_secs().saturating_sub(rec.resolved_at) < STALE_TAG_MAX_SECS =>
                    {
                        tracing::warn!(tag = %key, digest = %rec.digest, age_s = now_secs().saturating_sub(rec.resolved_at),
                            error = %e, "origin unreachable; answering with this node's last origin resolution");
                        rec
                    }
                    _ => return Err(e.to_oci()),
                }
            }
            Err(e) => return Err(e.to_oci()),
        };
        if head {
            return Ok(ManifestBody {
                digest: info.digest,
                media_type: info.media_type,
                size: info.size,
                bytes: None,
            });
        }
        let mut body = self.manifest_by_digest(target, &info.digest, false).await?;
        body.media_type = info.media_type;
        Ok(body)
    }

    async fn blob(
        &self,
        target: &Target,
        digest: &Digest,
        head: bool,
    ) -> Result<Box<dyn BlobSource>, OciError> {
        let kind = KindLabel { kind: "blob" };
        let transfer = loop {
            if let Some(blob) = self.store.open_complete(digest) {
                self.confirm(target, digest, Kind::Blob).await?;
                metrics::global().cache_hits.get_or_create(&kind).inc();
                return Ok(Box::new(StoredBlob {
                    file: Arc::new(blob.file),
                    size: blob.size,
                    guard: blob.guard,
                }));
            }
            if head && !self.transfers.is_running(digest) {
                // A HEAD of a cold blob asks the origin, and moves no bytes.
                let size = count(
                    self.origin
                        .head_blob(&target.upstream, &target.repo, digest)
                        .await,
                )
                .map_err(|e| e.to_oci())?;
                self.note_confirmed(target, digest);
                return Ok(Box::new(SizeOnly(size)));
            }
            // With the origin down, an earlier confirmation still counts.
            let vouched = self
                .confirmed
                .lock()
                .expect("lock")
                .get(&Self::key(target, digest))
                .is_some_and(|t| t.elapsed() < STALE_CONFIRMATION_MAX);
            // `None`: it completed since we looked; go round once more.
            if let Some(t) = self.transfers.get_or_start(target, digest, vouched) {
                break t;
            }
        };
        metrics::global().cache_misses.get_or_create(&kind).inc();
        if transfer.started_for != *target {
            // Someone else's request started it: this repository still needs
            // the origin's word.
            self.confirm(target, digest, Kind::Blob).await?;
        }
        let (size, file) = match transfer.started().await {
            Ok(started) => started,
            Err(Unstarted::Failed(e)) => return Err(e),
            Err(Unstarted::NoRoom) => {
                // Never worse than no Shoal: the client still gets the blob,
                // verified on the way, just not kept.
                let size = count(
                    self.origin
                        .head_blob(&target.upstream, &target.repo, digest)
                        .await,
                )
                .map_err(|e| e.to_oci())?;
                return Ok(Box::new(PassThrough {
                    origin: self.origin.clone(),
                    target: target.clone(),
                    digest: *digest,
                    size,
                    prefix: None,
                }));
            }
        };
        if transfer.started_for == *target && transfer.confirmed_by_origin() {
            self.note_confirmed(target, digest);
        }
        Ok(Box::new(ArrivingBlob {
            file,
            size,
            progress: transfer.reader(),
            guard: self.store.guard(digest),
            origin: self.origin.clone(),
            target: target.clone(),
            digest: *digest,
        }))
    }

    fn observe(&self, kind: RouteKind, method: &Method, status: StatusCode, elapsed: Duration) {
        metrics::global().observe_request(kind.as_str(), method, status.as_u16(), elapsed);
    }

    fn served_bytes(&self, n: u64) {
        metrics::global().client_bytes_served.inc_by(n);
    }
}

struct StoredBlob {
    file: Arc<std::fs::File>,
    size: u64,
    guard: crate::store::ReadGuard,
}

impl BlobSource for StoredBlob {
    fn size(&self) -> u64 {
        self.size
    }

    fn open(self: Box<Self>, r: ByteRange) -> ByteStream {
        blob_stream(self.file, self.size, r.start, r.end, None, Some(self.guard))
    }
}

struct ArrivingBlob {
    file: Arc<std::fs::File>,
    size: u64,
    progress: tokio::sync::watch::Receiver<crate::transfer::Progress>,
    guard: Option<crate::store::ReadGuard>,
    /// Where the rest comes from if the store gives up midway.
    origin: OriginClient,
    target: Target,
    digest: Digest,
}

impl BlobSource for ArrivingBlob {
    fn size(&self) -> u64 {
        self.size
    }

    /// The blob's bytes as the transfer writes them; if the store gives up
    /// midway (the disk filled up), the rest comes from the origin, and the
    /// whole — what was sent from the file and what follows — is checked
    /// against the digest before the last byte goes out.
    fn open(self: Box<Self>, r: ByteRange) -> ByteStream {
        let this = *self;
        let local = blob_stream(
            this.file.clone(),
            this.size,
            r.start,
            r.end,
            Some(this.progress),
            this.guard,
        );
        let rest = move |gave_up: StoreGaveUp| {
            tracing::info!(digest = %this.digest, at = gave_up.at, "the store gave up on a blob being read; the reader continues from the origin");
            Box::new(PassThrough {
                origin: this.origin,
                target: this.target,
                digest: this.digest,
                size: this.size,
                prefix: Some((this.file, gave_up.at.min(gave_up.written))),
            })
            .open(ByteRange {
                start: gave_up.at,
                end: r.end,
            })
        };
        // The state: the stream being read, and the hand-over to the origin
        // until it has been used.
        Box::pin(futures_util::stream::unfold(
            (local, Some(rest)),
            |(mut s, rest)| async move {
                match s.next().await? {
                    Err(e) => {
                        let gave_up = e
                            .get_ref()
                            .and_then(|i| i.downcast_ref::<StoreGaveUp>())
                            .copied();
                        match (gave_up, rest) {
                            (Some(g), Some(rest)) => {
                                let mut s = rest(g);
                                let first = s.next().await?;
                                Some((first, (s, None)))
                            }
                            (_, rest) => Some((Err(e), (s, rest))),
                        }
                    }
                    item => Some((item, (s, rest))),
                }
            },
        ))
    }
}

/// What a HEAD of a blob not held here needs: its size.
struct SizeOnly(u64);

impl BlobSource for SizeOnly {
    fn size(&self) -> u64 {
        self.0
    }

    fn open(self: Box<Self>, _r: ByteRange) -> ByteStream {
        Box::pin(futures_util::stream::empty())
    }
}

/// A blob the store cannot hold, relayed from the origin for one client.
///
/// The whole blob is read from the origin and hashed, whatever range the
/// client asked for; the last chunk handed to the client is held back until
/// the digest checks, and the response is cut short if it does not.
struct PassThrough {
    origin: OriginClient,
    target: Target,
    digest: Digest,
    size: u64,
    /// Bytes `0..len` of the blob already in this file (a transfer the store
    /// gave up on): hashed from it, and the origin asked from `len` on.
    prefix: Option<(Arc<std::fs::File>, u64)>,
}

impl BlobSource for PassThrough {
    fn size(&self) -> u64 {
        self.size
    }

    fn open(self: Box<Self>, r: ByteRange) -> ByteStream {
        use shoal_proto::Sha256Verifier;
        struct St {
            src: PassThrough,
            stream: Option<shoal_registry_shim::client::BlobStream>,
            verifier: Sha256Verifier,
            /// Where the origin's bytes are.
            pos: u64,
            /// Bytes `0..hashed` are in the verifier.
            hashed: u64,
            held: Option<Bytes>,
            range: ByteRange,
            finished: bool,
        }
        let st = St {
            verifier: Sha256Verifier::new(self.digest),
            src: *self,
            stream: None,
            pos: 0,
            hashed: 0,
            held: None,
            range: r,
            finished: false,
        };
        let err = |m: String| std::io::Error::other(m);
        Box::pin(futures_util::stream::unfold(st, move |mut st| async move {
            if st.finished {
                return None;
            }
            loop {
                if st.stream.is_none() {
                    if let Some((file, len)) = st.src.prefix.take() {
                        match hash_file_prefix(file, len, st.src.digest).await {
                            Ok(v) => {
                                st.verifier = v;
                                st.hashed = len;
                            }
                            Err(e) => {
                                st.finished = true;
                                return Some((Err(e), st));
                            }
                        }
                    }
                    let s = &st.src;
                    let (repo, d) = (&s.target.repo, &s.digest);
                    let opened = match s
                        .origin
                        .get_blob(&s.target.upstream, repo, d, st.hashed)
                        .await
                    {
                        Err(OriginError::RangeIgnored) => {
                            s.origin.get_blob(&s.target.upstream, repo, d, 0).await
                        }
                        other => other,
                    };
                    match opened {
                        Ok(stream) => {
                            st.pos = stream.offset();
                            st.stream = Some(stream);
                        }
                        Err(e) => {
                            st.finished = true;
                            return Some((Err(err(e.to_string())), st));
                        }
                    }
                }
                let next = st.stream.as_mut().expect("opened").next_chunk().await;
                match next {
                    Some(Ok(chunk)) => {
                        metrics::global()
                            .origin_bytes
                            .get_or_create(&KindLabel { kind: "blob" })
                            .inc_by(chunk.len() as u64);
                        let (start, end) = (st.pos, st.pos + chunk.len() as u64);
                        if end > st.hashed {
                            st.verifier
                                .update(&chunk[(st.hashed.max(start) - start) as usize..]);
                            st.hashed = end;
                        }
                        st.pos = end;
                        let lo = st.range.start.max(start);
                        let hi = (st.range.end + 1).min(end);
                        if lo < hi {
                            let part = chunk.slice((lo - start) as usize..(hi - start) as usize);
                            if let Some(prev) = st.held.replace(part) {
                                return Some((Ok(prev), st));
                            }
                        }
                    }
                    Some(Err(e)) => {
                        st.finished = true;
                        return Some((Err(err(e.to_string())), st));
                    }
                    None => {
                        st.finished = true;
                        let v =
                            std::mem::replace(&mut st.verifier, Sha256Verifier::new(st.src.digest));
                        if st.hashed != st.src.size || v.finish().is_err() {
                            metrics::global()
                                .chunks_rejected
                                .get_or_create(&crate::metrics::SourceLabel { source: "origin" })
                                .inc();
                            tracing::error!(digest = %st.src.digest, "origin served bytes that do not match the digest (pass-through); response cut short");
                            return Some((Err(err("digest mismatch".into())), st));
                        }
                        return st.held.take().map(|b| (Ok(b), st));
                    }
                }
            }
        }))
    }
}

/// A verifier for `digest` that has hashed bytes `0..len` of `file`.
async fn hash_file_prefix(
    file: Arc<std::fs::File>,
    len: u64,
    digest: Digest,
) -> std::io::Result<shoal_proto::Sha256Verifier> {
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt as _;
        let mut v = shoal_proto::Sha256Verifier::new(digest);
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], pos)?;
            v.update(&buf[..n]);
            pos += n as u64;
        }
        Ok(v)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}
