//! The peer client: fetches chunks from cluster members and hands out only
//! chunks that match the blob's chunk map.
//!
//! [`PeerClient`] keeps one QUIC connection per peer (keyed by address and
//! node id, redialled once it dies, closed after [`CONNECTION_IDLE`] unused)
//! and sends one request per stream. Every answer becomes a [`ChunkResult`]
//! per requested chunk:
//!
//! - `Verified(bytes)`: length and SHA-256 matched [`ChunkHashes`];
//! - `Bad`: the peer sent wrong bytes (counted in
//!   `shoal_chunks_rejected_total{source="peer"}`) or broke the protocol
//!   (an answer out of order, for a chunk not asked for, a malformed frame,
//!   a stream that ends early) — either way the peer is at fault;
//! - `DontHave`: the peer lacks the chunk;
//! - `Failed`: no usable answer in time, a connection or stream error, an
//!   `Error` frame (`Busy` among them) — the peer may be fine, just not now.
//!
//! [`ChunkResult::outcome`] maps these onto the scheduler's
//! [`Outcome`]s. Every call is bounded by a deadline: a chunk not answered
//! by then is `Failed(Timeout)`.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{Connection, Endpoint, RecvStream};
use shoal_proto::sched::Outcome;
use shoal_proto::wire::{
    busy_retry_ms, BlobState, ErrorKind, Request, Response, ResponseDecoder, WireError, MAX_INDICES,
};
use shoal_proto::{Bitfield, ChunkError, ChunkHashes, ChunkLayout, Digest};
use tokio::time::Instant;

use super::{close, stream_code, PeerAddr};
use crate::metrics::{self, SourceLabel};
use crate::rate::{Every, RateLimit};

/// A cached connection unused for this long is closed.
pub const CONNECTION_IDLE: Duration = Duration::from_secs(120);
/// How often the connection cache looks for idle or dead connections.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// What became of one requested chunk.
#[derive(Clone)]
pub enum ChunkResult {
    /// The chunk, verified against its hash.
    Verified(Bytes),
    /// The peer sent bad data or broke the protocol.
    Bad(BadPeer),
    /// The peer does not have the chunk.
    DontHave,
    /// No usable answer (timeout, connection, refusal); not the chunk's fault.
    Failed(FetchError),
}

impl ChunkResult {
    /// The scheduler's view of this result.
    pub fn outcome(&self) -> Outcome {
        match self {
            ChunkResult::Verified(_) => Outcome::Verified,
            ChunkResult::Bad(_) => Outcome::Bad,
            ChunkResult::DontHave => Outcome::DontHave,
            ChunkResult::Failed(FetchError::Busy(_)) => Outcome::Busy,
            ChunkResult::Failed(_) => Outcome::Failed,
        }
    }

    /// When a `Busy` peer said to ask again (ms from now), if it did.
    pub fn retry_ms(&self) -> Option<u32> {
        match self {
            ChunkResult::Failed(FetchError::Busy(message)) => busy_retry_ms(message),
            _ => None,
        }
    }
}

impl fmt::Debug for ChunkResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChunkResult::Verified(b) => write!(f, "Verified({} bytes)", b.len()),
            ChunkResult::Bad(e) => f.debug_tuple("Bad").field(e).finish(),
            ChunkResult::DontHave => f.write_str("DontHave"),
            ChunkResult::Failed(e) => f.debug_tuple("Failed").field(e).finish(),
        }
    }
}

/// How a peer was at fault.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BadPeer {
    /// A chunk's length or hash did not match the chunk map.
    #[error("chunk failed verification: {0}")]
    Verify(ChunkError),
    /// The answer broke the wire protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// Why a request got no usable answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// Nothing (or not everything) arrived before the deadline.
    #[error("no answer within the deadline")]
    Timeout,
    /// The connection could not be started (bad address or server name).
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was lost (including a refused handshake).
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Sending the request failed.
    #[error("sending the request: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading the answer failed (stream reset, connection lost).
    #[error("reading the answer: {0}")]
    Read(#[from] quinn::ReadError),
    /// The peer has no upload slot free.
    #[error("peer is busy: {0}")]
    Busy(String),
    /// The peer answered with an `Error` frame.
    #[error("peer refused ({code:?}): {message}")]
    Refused {
        /// The error code.
        code: ErrorKind,
        /// The peer's message.
        message: String,
    },
    /// The chunk's hash is not known yet, so it was not requested.
    #[error("the chunk's hash is not known yet")]
    NoHash,
    /// The index is past the end of the blob's layout; not requested.
    #[error("chunk index {index} is past the end of the blob ({count} chunks)")]
    NoSuchChunk {
        /// The index asked for.
        index: u32,
        /// Chunks in the layout.
        count: u32,
    },
    /// The request could not be encoded.
    #[error("bad request: {0}")]
    Encode(#[from] WireError),
    /// The peer broke the protocol answering a bitfield request.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The peer lays the blob out differently (bitfield requests).
    #[error("peer lays the blob out as {peer_chunks} chunks of {peer_chunk_size} bytes, not {chunks} of {chunk_size}")]
    LayoutMismatch {
        /// The peer's chunk size.
        peer_chunk_size: u32,
        /// The peer's chunk count.
        peer_chunks: u32,
        /// The expected chunk size.
        chunk_size: u32,
        /// The expected chunk count.
        chunks: u32,
    },
}

/// Totals of [`PeerClient::fetch_blob`], for benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchStats {
    /// Chunks verified.
    pub verified: u32,
    /// Bytes of verified chunks.
    pub verified_bytes: u64,
    /// Chunks the peer got wrong.
    pub bad: u32,
    /// Chunks the peer lacks.
    pub dont_have: u32,
    /// Chunks without a usable answer.
    pub failed: u32,
}

impl FetchStats {
    fn add(&mut self, r: &ChunkResult) {
        match r {
            ChunkResult::Verified(b) => {
                self.verified += 1;
                self.verified_bytes += b.len() as u64;
            }
            ChunkResult::Bad(_) => self.bad += 1,
            ChunkResult::DontHave => self.dont_have += 1,
            ChunkResult::Failed(_) => self.failed += 1,
        }
    }
}

#[derive(Debug, Default)]
struct Slot {
    conn: tokio::sync::Mutex<Option<Connection>>,
    last_used: Mutex<Option<Instant>>,
}

type Key = (SocketAddr, String);

#[derive(Debug)]
struct Cache {
    slots: HashMap<Key, Arc<Slot>>,
    last_sweep: Instant,
}

/// Fetches verified chunks from peers over QUIC. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct PeerClient {
    endpoint: Endpoint,
    /// Replaces the endpoint's default client config once the node's
    /// certificate was renewed ([`set_client_config`](Self::set_client_config)).
    renewed: std::sync::RwLock<Option<quinn::ClientConfig>>,
    cache: Mutex<Cache>,
    download_rate: RateLimit,
}

/// How a request's stream ended early.
enum Stop {
    Bad(BadPeer),
    Failed(FetchError),
}

impl From<FetchError> for Stop {
    fn from(e: FetchError) -> Self {
        Stop::Failed(e)
    }
}

fn protocol(msg: impl Into<String>) -> Stop {
    Stop::Bad(BadPeer::Protocol(msg.into()))
}

fn refusal(code: ErrorKind, message: String) -> FetchError {
    match code {
        ErrorKind::Busy => FetchError::Busy(message),
        code => FetchError::Refused { code, message },
    }
}

/// Reads the next response frame. `Ok(None)`: the stream ended cleanly
/// between frames. Counts the bytes in `shoal_peer_bytes_received_total`
/// and calls `on_bytes` after each read that brought some.
async fn next_frame(
    recv: &mut RecvStream,
    dec: &mut ResponseDecoder,
    on_bytes: &mut (dyn FnMut() + Send),
) -> Result<Option<Response>, Stop> {
    loop {
        match dec.next_response() {
            Ok(Some(frame)) => return Ok(Some(frame)),
            Ok(None) => {}
            Err(e) => return Err(protocol(e.to_string())),
        }
        // At least 1 and at most the rest of the current frame: the decoder
        // takes all of what is read.
        match recv.read_chunk(dec.wants(), true).await {
            Ok(Some(chunk)) => {
                metrics::global()
                    .peer_bytes_received
                    .inc_by(chunk.bytes.len() as u64);
                let taken = dec.push(&chunk.bytes);
                debug_assert_eq!(taken, chunk.bytes.len());
                on_bytes();
            }
            Ok(None) => {
                return match dec.finish() {
                    Ok(()) => Ok(None),
                    Err(e) => Err(protocol(e.to_string())),
                }
            }
            Err(e) => return Err(Stop::Failed(e.into())),
        }
    }
}

/// The first frame of an answer; an empty answer breaks the protocol.
async fn first_frame(
    recv: &mut RecvStream,
    dec: &mut ResponseDecoder,
) -> Result<Response, FetchError> {
    match next_frame(recv, dec, &mut || {}).await {
        Ok(Some(frame)) => Ok(frame),
        Ok(None) => Err(FetchError::Protocol("the answer was empty".into())),
        Err(Stop::Failed(e)) => Err(e),
        Err(Stop::Bad(e)) => Err(FetchError::Protocol(e.to_string())),
    }
}

/// A `Bitfield` answer to `asked` about `blob`, checked against `layout`;
/// `None` for `DontHave{0}` (the peer holds nothing of it).
fn bitfield_of(
    frame: Response,
    blob: &Digest,
    layout: ChunkLayout,
    asked: &str,
) -> Result<Option<Bitfield>, FetchError> {
    match frame {
        Response::Bitfield {
            blob: b,
            chunk_size,
            bits,
        } => {
            if b != *blob {
                return Err(FetchError::Protocol(format!(
                    "a bitfield of {b} in answer to one of {blob}"
                )));
            }
            if chunk_size != layout.chunk_size() || bits.len() != layout.count() {
                return Err(FetchError::LayoutMismatch {
                    peer_chunk_size: chunk_size,
                    peer_chunks: bits.len(),
                    chunk_size: layout.chunk_size(),
                    chunks: layout.count(),
                });
            }
            Ok(Some(bits))
        }
        Response::DontHave { index: 0 } => Ok(None),
        Response::Error { code, message } => Err(refusal(code, message)),
        other => Err(FetchError::Protocol(format!(
            "{other:?} in answer to {asked}"
        ))),
    }
}

impl PeerClient {
    /// A client dialling from `endpoint`, whose default client config must
    /// carry the cluster's mutual-TLS settings (and
    /// [`transport_config`](super::transport_config)).
    pub fn new(endpoint: Endpoint) -> Self {
        Self::with_download_rate(endpoint, RateLimit::unlimited())
    }

    /// [`new`](Self::new), receiving from all peers together at most as
    /// fast as `rate` allows (`--peer-download-rate`): after each chunk the
    /// next read waits off the bucket's debt, and QUIC flow control slows
    /// the senders.
    pub fn with_download_rate(endpoint: Endpoint, rate: RateLimit) -> Self {
        PeerClient {
            endpoint,
            renewed: std::sync::RwLock::new(None),
            cache: Mutex::new(Cache {
                slots: HashMap::new(),
                last_sweep: Instant::now(),
            }),
            download_rate: rate,
        }
    }

    /// Dials new connections with `cfg` from now on (a renewed node
    /// certificate); open connections keep theirs.
    pub fn set_client_config(&self, cfg: quinn::ClientConfig) {
        *self.renewed.write().unwrap_or_else(|p| p.into_inner()) = Some(cfg);
    }

    /// A live connection to `peer`: the cached one, or a new one (one dial
    /// at a time per peer). Not bounded in time by itself beyond the
    /// handshake's idle timeout; callers bound it.
    pub(crate) async fn connection(&self, peer: &PeerAddr) -> Result<Connection, FetchError> {
        let slot = {
            let mut cache = self.cache.lock().expect("peer cache lock");
            Self::sweep(&mut cache);
            cache
                .slots
                .entry((peer.addr, peer.name.clone()))
                .or_default()
                .clone()
        };
        *slot.last_used.lock().expect("peer slot lock") = Some(Instant::now());
        let mut conn = slot.conn.lock().await;
        if let Some(c) = conn.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(c.clone());
        }
        *conn = None;
        let renewed = self
            .renewed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let c = match renewed {
            Some(cfg) => self.endpoint.connect_with(cfg, peer.addr, &peer.name)?,
            None => self.endpoint.connect(peer.addr, &peer.name)?,
        }
        .await?;
        tracing::debug!(%peer, "connected to peer");
        *conn = Some(c.clone());
        Ok(c)
    }

    /// Drops dead connections and closes those unused for [`CONNECTION_IDLE`],
    /// at most every [`SWEEP_EVERY`].
    fn sweep(cache: &mut Cache) {
        let now = Instant::now();
        if now.duration_since(cache.last_sweep) < SWEEP_EVERY {
            return;
        }
        cache.last_sweep = now;
        cache.slots.retain(|_, slot| {
            // A slot in use (dialling or being read) is kept.
            let Ok(mut conn) = slot.conn.try_lock() else {
                return true;
            };
            let idle = slot
                .last_used
                .lock()
                .expect("peer slot lock")
                .is_none_or(|t| now.duration_since(t) >= CONNECTION_IDLE);
            match conn.as_ref() {
                Some(c) if c.close_reason().is_some() => false,
                Some(c) if idle => {
                    c.close(close::SHUTDOWN, b"idle");
                    *conn = None;
                    false
                }
                Some(_) => true,
                None => !idle,
            }
        });
    }

    /// Peers this node has an open connection to now (it dialled them).
    pub fn connected(&self) -> usize {
        let cache = self.cache.lock().expect("peer cache lock");
        cache
            .slots
            .values()
            .filter(|slot| {
                slot.conn
                    .try_lock()
                    .map(|c| c.as_ref().is_some_and(|c| c.close_reason().is_none()))
                    // Being used right now: connected or dialling.
                    .unwrap_or(true)
            })
            .count()
    }

    /// Closes every cached connection.
    pub fn close_all(&self) {
        let mut cache = self.cache.lock().expect("peer cache lock");
        for slot in cache.slots.values() {
            if let Ok(conn) = slot.conn.try_lock() {
                if let Some(c) = conn.as_ref() {
                    c.close(close::SHUTDOWN, b"shutting down");
                }
            }
        }
        cache.slots.clear();
    }

    /// Fetches chunks `indices` of `blob` (laid out as `hashes.layout()`)
    /// from `peer` and returns one result per distinct index, in increasing
    /// order, each chunk verified against `hashes`. Requests of more than
    /// [`MAX_INDICES`] chunks go out as several streams at once. Everything
    /// ends within `deadline`.
    #[allow(dead_code)] // transfers use `fetch_each`; the tests use this
    pub(crate) async fn fetch(
        &self,
        peer: &PeerAddr,
        blob: &Digest,
        hashes: &ChunkHashes,
        indices: &[u32],
        deadline: Duration,
    ) -> Vec<(u32, ChunkResult)> {
        let mut out = Vec::with_capacity(indices.len());
        self.fetch_each(
            peer,
            blob,
            hashes,
            indices,
            deadline,
            |i, r| out.push((i, r)),
            |_| {},
        )
        .await;
        out.sort_by_key(|(i, _)| *i);
        out
    }

    /// [`fetch`](Self::fetch), handing each result to `on_result` as soon as
    /// it is known (verified chunks as they arrive), so a transfer can store
    /// and forward them without waiting for the whole request. Each distinct
    /// index gets exactly one result. While a chunk's bytes arrive,
    /// `on_progress` hears of it at most every
    /// [`PROGRESS_MS`](shoal_proto::sched::PROGRESS_MS) per stream (the
    /// scheduler then tells a slow peer from a silent one).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn fetch_each<F, G>(
        &self,
        peer: &PeerAddr,
        blob: &Digest,
        hashes: &ChunkHashes,
        indices: &[u32],
        deadline: Duration,
        on_result: F,
        on_progress: G,
    ) where
        F: FnMut(u32, ChunkResult) + Send,
        G: Fn(u32) + Send + Sync,
    {
        let on_result = Mutex::new(on_result);
        let deliver = |i: u32, r: ChunkResult| (on_result.lock().expect("result callback"))(i, r);
        let deadline = Instant::now() + deadline;
        let layout = hashes.layout();
        let mut wanted = indices.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        wanted.retain(|&index| {
            let refuse = if index >= layout.count() {
                FetchError::NoSuchChunk {
                    index,
                    count: layout.count(),
                }
            } else if hashes.get(index).is_none() {
                FetchError::NoHash
            } else {
                return true;
            };
            deliver(index, ChunkResult::Failed(refuse));
            false
        });
        let batches = wanted.chunks(MAX_INDICES).map(|batch| {
            self.fetch_batch(peer, blob, hashes, batch, deadline, &deliver, &on_progress)
        });
        futures_util::future::join_all(batches).await;
    }

    /// One `GetChunks` on one stream, for at most [`MAX_INDICES`] sorted,
    /// distinct, valid indices; every index gets a result by `deadline`.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_batch(
        &self,
        peer: &PeerAddr,
        blob: &Digest,
        hashes: &ChunkHashes,
        batch: &[u32],
        deadline: Instant,
        deliver: &(impl Fn(u32, ChunkResult) + Sync),
        progress: &(impl Fn(u32) + Sync),
    ) {
        // Answers come in request order, so what is done is a prefix.
        let mut done = 0;
        let run = self.run_batch(peer, blob, hashes, batch, &mut done, deliver, progress);
        let rest = match tokio::time::timeout_at(deadline, run).await {
            Ok(Ok(())) => return,
            Ok(Err(Stop::Bad(why))) => {
                tracing::debug!(%peer, %blob, error = %why, "peer answered badly");
                ChunkResult::Bad(why)
            }
            Ok(Err(Stop::Failed(why))) => {
                tracing::debug!(%peer, %blob, error = %why, "chunk request failed");
                ChunkResult::Failed(why)
            }
            Err(_) => {
                tracing::debug!(%peer, %blob, left = batch.len() - done, "chunk request timed out");
                ChunkResult::Failed(FetchError::Timeout)
            }
        };
        for &index in &batch[done..] {
            deliver(index, rest.clone());
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_batch(
        &self,
        peer: &PeerAddr,
        blob: &Digest,
        hashes: &ChunkHashes,
        batch: &[u32],
        done: &mut usize,
        deliver: &(impl Fn(u32, ChunkResult) + Sync),
        progress: &(impl Fn(u32) + Sync),
    ) -> Result<(), Stop> {
        let mut req = BytesMut::new();
        Request::GetChunks {
            blob: *blob,
            chunk_size: hashes.layout().chunk_size(),
            indices: batch.to_vec(),
        }
        .encode(&mut req)
        .map_err(FetchError::from)?;
        let conn = self.connection(peer).await?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(FetchError::from)?;
        send.write_all(&req).await.map_err(FetchError::from)?;
        // Already finished or reset: the read below tells what happened.
        let _ = send.finish();
        let mut dec = ResponseDecoder::new();
        let mut tell = Every::new(Duration::from_millis(shoal_proto::sched::PROGRESS_MS));
        while let Some(&due) = batch.get(*done) {
            let mut on_bytes = || {
                if tell.due() {
                    progress(due);
                }
            };
            let Some(frame) = next_frame(&mut recv, &mut dec, &mut on_bytes).await? else {
                return Err(protocol(format!(
                    "the answer ended before chunk {due} ({} of {} answered)",
                    *done,
                    batch.len()
                )));
            };
            let received = match &frame {
                Response::Chunk { data, .. } => data.len(),
                _ => 0,
            };
            let result = match frame {
                Response::Chunk { index, data } if index == due => {
                    match hashes.verify(index, &data) {
                        Ok(()) => ChunkResult::Verified(data),
                        Err(e) => {
                            metrics::global()
                                .chunks_rejected
                                .get_or_create(&SourceLabel { source: "peer" })
                                .inc();
                            tracing::warn!(%peer, %blob, index, error = %e, "peer sent a bad chunk");
                            ChunkResult::Bad(BadPeer::Verify(e))
                        }
                    }
                }
                Response::DontHave { index } if index == due => ChunkResult::DontHave,
                Response::Chunk { index, .. } | Response::DontHave { index } => {
                    return Err(protocol(format!(
                        "an answer for chunk {index} where chunk {due} was due"
                    )));
                }
                Response::Bitfield { .. } | Response::State(_) => {
                    return Err(protocol("a Bitfield or State frame in answer to GetChunks"));
                }
                Response::Error { code, message } => {
                    return Err(Stop::Failed(refusal(code, message)));
                }
            };
            deliver(due, result);
            *done += 1;
            self.download_rate.spend(received).await;
        }
        let _ = recv.stop(stream_code::DONE);
        Ok(())
    }

    /// Which chunks of `blob` `peer` holds, if it lays the blob out as
    /// `layout`: `Ok(None)` if it holds nothing of it.
    #[allow(dead_code)] // transfers watch peers instead; the tests use this
    pub(crate) async fn bitfield(
        &self,
        peer: &PeerAddr,
        blob: &Digest,
        layout: ChunkLayout,
        deadline: Duration,
    ) -> Result<Option<Bitfield>, FetchError> {
        let ask = async {
            let (_send, mut recv) = self
                .open(peer, Request::GetBitfield { blob: *blob })
                .await?;
            let mut dec = ResponseDecoder::new();
            let frame = first_frame(&mut recv, &mut dec).await?;
            let _ = recv.stop(stream_code::DONE);
            bitfield_of(frame, blob, layout, "GetBitfield")
        };
        tokio::time::timeout(deadline, ask)
            .await
            .unwrap_or(Err(FetchError::Timeout))
    }

    /// What `peer` holds of `blob` and the chunk hashes it vouches for
    /// (`GetState`): `Ok(None)` if it holds nothing of it.
    pub(crate) async fn state(
        &self,
        peer: &PeerAddr,
        blob: &Digest,
        deadline: Duration,
    ) -> Result<Option<BlobState>, FetchError> {
        let ask = async {
            let (_send, mut recv) = self.open(peer, Request::GetState { blob: *blob }).await?;
            let mut dec = ResponseDecoder::new();
            let frame = first_frame(&mut recv, &mut dec).await?;
            let _ = recv.stop(stream_code::DONE);
            match frame {
                Response::State(st) if st.blob == *blob => Ok(Some(st)),
                Response::State(st) => Err(FetchError::Protocol(format!(
                    "the state of {} in answer to one of {blob}",
                    st.blob
                ))),
                Response::DontHave { index: 0 } => Ok(None),
                Response::Error { code, message } => Err(refusal(code, message)),
                other => Err(FetchError::Protocol(format!(
                    "{other:?} in answer to GetState"
                ))),
            }
        };
        tokio::time::timeout(deadline, ask)
            .await
            .unwrap_or(Err(FetchError::Timeout))
    }

    /// Watches which chunks of `blob` (laid out as `layout`) `peer` holds:
    /// calls `on_bits` with its bitfield now and each time it grows, until
    /// the peer holds the whole blob or ends the watch (`Ok`), or refuses,
    /// fails or breaks the protocol (`Err`). The first answer must come
    /// within `deadline`; after that the connection's keep-alives and idle
    /// timeout bound a peer gone silent, and the caller drops the future
    /// when it no longer cares.
    pub(crate) async fn watch(
        &self,
        peer: &PeerAddr,
        blob: &Digest,
        layout: ChunkLayout,
        deadline: Duration,
        mut on_bits: impl FnMut(Bitfield),
    ) -> Result<(), FetchError> {
        let mut dec = ResponseDecoder::new();
        let first = async {
            let (send, mut recv) = self.open(peer, Request::Watch { blob: *blob }).await?;
            let frame = first_frame(&mut recv, &mut dec).await?;
            Ok::<_, FetchError>((send, recv, frame))
        };
        let (_send, mut recv, frame) = tokio::time::timeout(deadline, first)
            .await
            .unwrap_or(Err(FetchError::Timeout))?;
        let Some(bits) = bitfield_of(frame, blob, layout, "Watch")? else {
            return Ok(());
        };
        on_bits(bits);
        loop {
            let frame = match next_frame(&mut recv, &mut dec, &mut || {}).await {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(()),
                Err(Stop::Failed(e)) => return Err(e),
                Err(Stop::Bad(e)) => return Err(FetchError::Protocol(e.to_string())),
            };
            match bitfield_of(frame, blob, layout, "Watch")? {
                Some(bits) => on_bits(bits),
                None => return Ok(()),
            }
        }
    }

    /// Opens a stream to `peer` and sends `req` on it.
    async fn open(
        &self,
        peer: &PeerAddr,
        req: Request,
    ) -> Result<(quinn::SendStream, RecvStream), FetchError> {
        let mut buf = BytesMut::new();
        req.encode(&mut buf)?;
        let conn = self.connection(peer).await?;
        let (mut send, recv) = conn.open_bi().await?;
        send.write_all(&buf).await?;
        let _ = send.finish();
        Ok((send, recv))
    }

    /// Fetches every chunk of `blob` over `streams` concurrent requests of
    /// up to `per_request` chunks each, verifying and then dropping the bytes;
    /// each request must finish within `deadline`. The entry point of a
    /// peer-to-peer throughput benchmark.
    pub async fn fetch_blob(
        &self,
        peer: &PeerAddr,
        blob: &Digest,
        hashes: &ChunkHashes,
        streams: usize,
        per_request: usize,
        deadline: Duration,
    ) -> FetchStats {
        let count = hashes.layout().count() as usize;
        let per_request = per_request.clamp(1, MAX_INDICES);
        let cursor = AtomicUsize::new(0);
        let worker = || async {
            let mut stats = FetchStats::default();
            loop {
                let start = cursor.fetch_add(per_request, Ordering::Relaxed);
                if start >= count {
                    return stats;
                }
                let end = (start + per_request).min(count);
                let indices: Vec<u32> = (start as u32..end as u32).collect();
                self.fetch_each(
                    peer,
                    blob,
                    hashes,
                    &indices,
                    deadline,
                    |_, r| stats.add(&r),
                    |_| {},
                )
                .await;
            }
        };
        let all = futures_util::future::join_all((0..streams.max(1)).map(|_| worker())).await;
        all.into_iter().fold(FetchStats::default(), |mut acc, s| {
            acc.verified += s.verified;
            acc.verified_bytes += s.verified_bytes;
            acc.bad += s.bad;
            acc.dont_have += s.dont_have;
            acc.failed += s.failed;
            acc
        })
    }
}
