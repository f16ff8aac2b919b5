//! The peer server: answers chunk and bitfield requests of cluster members.
//!
//! [`PeerServer::spawn`] takes a quinn endpoint whose server config carries
//! the cluster's mutual-TLS settings, so a connection exists only once the
//! peer proved membership; the server still refuses a connection that shows
//! no client certificate or another ALPN, in case it is handed a looser
//! config. Each bidirectional stream carries one request:
//!
//! 1. the request is read within [`ServeLimits::request_timeout`] (the
//!    decoder bounds its size); a malformed one gets `Error{BadRequest}`;
//! 2. `GetChunks` takes one of [`ServeLimits::max_concurrent_uploads`] upload
//!    slots, shared by all connections — waiting for one in a short queue
//!    ([`ServeLimits::upload_queue`]) when all are taken, or getting
//!    `Error{Busy}` when the queue is full too — its message says when to
//!    ask again, the refused requests' turns handed out one slot time
//!    apart ([`shoal_proto::slots`]); then
//!    per requested index, in order, a `Chunk` (header, then the chunk's
//!    bytes without a copy) or `DontHave`. The next chunk is read from disk
//!    while the current one is written;
//! 3. `GetBitfield` gets a `Bitfield`, or `DontHave{0}` when nothing of the
//!    blob is here;
//! 4. `Watch` takes one of [`ServeLimits::watchers_per_blob`] watch slots
//!    of that blob (or gets `Error{Busy}`), then a `Bitfield` now and another
//!    each time the blob's transfer stored more, at most one per
//!    [`WATCH_FRAME_GAP_MS`], until the blob is complete (the last frame is
//!    full), its transfer ends, the peer stops reading, or the server shuts
//!    down. Watches hold no upload slot;
//! 5. `GetState` gets a `State` (size, holdings, the chunk hashes this node
//!    vouches for; hashing a complete blob the first time is done off the
//!    runtime and cached), or `DontHave{0}`. Members ask it when no
//!    tracker answers;
//! 6. the stream is finished. A peer that stops reading for longer than
//!    [`ServeLimits::write_timeout`] gets its stream reset, freeing the slot.
//!
//! With an upload cap ([`ServeLimits::upload_rate`]) frames enter their
//! streams in 16 KiB pieces, each paid for from one bucket shared by all
//! streams before it is written; a stream waiting for tokens holds its slot.
//!
//! Per-connection stream counts are bounded by quinn
//! ([`transport_config`](super::transport_config)); connections by
//! [`ServeLimits::max_connections`].

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn::{Connection, Endpoint, Incoming, RecvStream, SendStream};
use rustls::pki_types::CertificateDer;
use shoal_proto::slots::Appointments;
use shoal_proto::wire::{
    busy_message, encode_chunk_header, ErrorKind, Request, RequestDecoder, Response, WireError,
    ALPN, WATCHERS_PER_BLOB, WATCH_FRAME_GAP_MS,
};
use shoal_proto::{Bitfield, ChunkLayout, Digest};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use super::source::ChunkSource;
use super::{close, stream_code, DenyList};
use crate::metrics;
use crate::rate::RateLimit;
use crate::uplink;

/// Limits of the peer server.
#[derive(Debug, Clone)]
pub struct ServeLimits {
    /// `GetChunks` requests served at once across all connections; more get
    /// `Error{Busy}` (default 16: with a one-chunk read-ahead that is at most
    /// 32 chunks, 32 MiB at 1 MiB chunks, in memory). Fewer streams at once
    /// each finish sooner, and requesters turned away try other holders.
    pub max_concurrent_uploads: usize,
    /// Connections at once; more are refused during the handshake
    /// (default 1024).
    pub max_connections: usize,
    /// Time for a stream's request to arrive (default 10 s).
    pub request_timeout: Duration,
    /// Longest a single frame write may wait for the peer to take data
    /// before the stream is reset (default 30 s).
    pub write_timeout: Duration,
    /// On shutdown, how long in-flight requests may take to finish before
    /// their connections are closed (default 5 s).
    pub drain_timeout: Duration,
    /// The cap on bytes per second sent to all peers together
    /// (`--peer-upload-rate`; default none).
    pub upload_rate: RateLimit,
    /// Learn a cap under `upload_rate` when losses show the uplink is full
    /// ([`crate::uplink`]; `--peer-upload-pacing`, default off here, auto in
    /// the daemon). `upload_rate` must then be
    /// [`RateLimit::adjustable`].
    pub pace_uploads: bool,
    /// `GetChunks` requests held, first come first served, while every
    /// upload slot is taken; more get `Error{Busy}` at once (default 4).
    /// Holding a few spares the requester a round trip and a back-off when
    /// a slot frees within a chunk's time, as on fast links it does.
    pub upload_queue: usize,
    /// Longest a request waits in that queue before it gets `Error{Busy}`
    /// (default 2 s).
    pub upload_queue_wait: Duration,
    /// Watches of one blob at once; more get `Error{Busy}` (default
    /// [`WATCHERS_PER_BLOB`]).
    pub watchers_per_blob: usize,
    /// Watches at once across all blobs (default 1024).
    pub max_watches: usize,
    /// The cluster's deny list (kept current by the heartbeat): peers whose
    /// certificate names a denied node are refused, connections and
    /// streams alike.
    pub denied: Arc<DenyList>,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_concurrent_uploads: 16,
            max_connections: 1024,
            request_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(5),
            upload_rate: RateLimit::unlimited(),
            pace_uploads: false,
            upload_queue: 4,
            upload_queue_wait: Duration::from_secs(2),
            watchers_per_blob: WATCHERS_PER_BLOB,
            max_watches: 1024,
            denied: Arc::default(),
        }
    }
}

/// Serves chunks from a [`ChunkSource`] on a QUIC endpoint.
#[derive(Debug)]
pub struct PeerServer;

/// A running [`PeerServer`]. Dropping it stops the server as
/// [`shutdown`](PeerServerHandle::shutdown) does, without waiting.
#[derive(Debug)]
pub struct PeerServerHandle {
    endpoint: Endpoint,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

struct Shared {
    source: Arc<dyn ChunkSource>,
    limits: ServeLimits,
    uploads: Arc<Semaphore>,
    /// Open watches per blob.
    watches: Mutex<HashMap<Digest, usize>>,
    /// Requests waiting for an upload slot.
    queued: AtomicUsize,
    /// Live connections, for [`crate::uplink`].
    conns: uplink::Connections,
    /// The retry times `Busy` answers give, and how long requests hold
    /// their upload slots ([`shoal_proto::slots`]).
    appointments: Mutex<Appointments>,
    /// Where the appointments' clock starts.
    epoch: Instant,
}

impl Shared {
    /// Microseconds since the server started.
    fn clock_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// The `Busy` answer to a request refused now: when its turn for a
    /// slot comes.
    fn busy(&self) -> Response {
        let now = self.clock_us();
        let queued = self.queued.load(Ordering::Acquire);
        let slots = u32::try_from(self.limits.max_concurrent_uploads).unwrap_or(u32::MAX);
        let at = self
            .appointments
            .lock()
            .expect("appointments lock")
            .refuse(now, queued, slots);
        let retry_ms = u32::try_from((at - now).div_ceil(1000)).unwrap_or(u32::MAX);
        let reason = format!(
            "all {} upload slots are in use",
            self.limits.max_concurrent_uploads
        );
        Response::error(ErrorKind::Busy, busy_message(retry_ms, &reason))
    }
}

/// An upload slot's time, told to [`Shared::appointments`] when the
/// request that held it is done.
struct SlotTime<'a> {
    shared: &'a Shared,
    from: u64,
}

impl Drop for SlotTime<'_> {
    fn drop(&mut self) {
        let now = self.shared.clock_us();
        let queued = self.shared.queued.load(Ordering::Acquire);
        if let Ok(mut a) = self.shared.appointments.lock() {
            a.served(now.saturating_sub(self.from));
            a.freed(now, queued);
        }
    }
}

/// A connection's place in [`Shared::conns`] while it is served.
struct Registered {
    conns: uplink::Connections,
    id: usize,
}

impl Registered {
    fn new(conns: &uplink::Connections, conn: &Connection) -> Self {
        let id = conn.stable_id();
        conns
            .lock()
            .expect("connections lock")
            .insert(id, conn.clone());
        Registered {
            conns: conns.clone(),
            id,
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.conns
            .lock()
            .expect("connections lock")
            .remove(&self.id);
    }
}

/// One open watch, counted against the limits while it lives.
struct WatchSlot {
    shared: Arc<Shared>,
    blob: Digest,
}

impl WatchSlot {
    fn take(shared: &Arc<Shared>, blob: Digest) -> Option<WatchSlot> {
        let mut w = shared.watches.lock().expect("watch slots lock");
        let total: usize = w.values().sum();
        let of_blob = w.get(&blob).copied().unwrap_or(0);
        if total >= shared.limits.max_watches || of_blob >= shared.limits.watchers_per_blob {
            return None;
        }
        *w.entry(blob).or_default() += 1;
        Some(WatchSlot {
            shared: shared.clone(),
            blob,
        })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut w = self.shared.watches.lock().expect("watch slots lock");
        if let Some(n) = w.get_mut(&self.blob) {
            *n -= 1;
            if *n == 0 {
                w.remove(&self.blob);
            }
        }
    }
}

impl PeerServer {
    /// Starts serving `source` on `endpoint` (which must have a server
    /// config) in a background task.
    pub fn spawn(
        endpoint: Endpoint,
        source: Arc<dyn ChunkSource>,
        limits: ServeLimits,
    ) -> PeerServerHandle {
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            source,
            uploads: Arc::new(Semaphore::new(limits.max_concurrent_uploads)),
            limits,
            watches: Mutex::default(),
            queued: AtomicUsize::new(0),
            conns: uplink::Connections::default(),
            appointments: Mutex::default(),
            epoch: Instant::now(),
        });
        let task = tokio::spawn(accept_loop(endpoint.clone(), shared, stop_rx));
        PeerServerHandle {
            endpoint,
            stop,
            task,
        }
    }
}

impl PeerServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Stops accepting connections, lets requests in flight finish (for at
    /// most [`ServeLimits::drain_timeout`]), then closes the connections it
    /// accepted. The endpoint itself stays open for outgoing connections;
    /// its owner closes it.
    pub async fn shutdown(self) {
        self.endpoint.set_server_config(None);
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "peer server task failed");
        }
    }
}

async fn accept_loop(endpoint: Endpoint, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let connections = Arc::new(Semaphore::new(shared.limits.max_connections));
    let mut tasks = JoinSet::new();
    let pacer = shared.limits.pace_uploads.then(|| {
        tokio::spawn(uplink::run(
            shared.conns.clone(),
            shared.limits.upload_rate.clone(),
        ))
    });
    loop {
        tokio::select! {
            biased;
            // A value or a dropped handle: either way, stop.
            _ = stop.changed() => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "peer connection task failed");
                }
            }
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let Ok(permit) = connections.clone().try_acquire_owned() else {
                    tracing::warn!(remote = %incoming.remote_address(),
                        limit = shared.limits.max_connections, "peer connection refused: too many connections");
                    incoming.refuse();
                    continue;
                };
                tasks.spawn(serve_connection(incoming, shared.clone(), stop.clone(), permit));
            }
        }
    }
    // Each connection task drains itself within `drain_timeout`; this bound
    // only covers a task stuck elsewhere.
    let drained = tokio::time::timeout(
        shared.limits.drain_timeout + Duration::from_secs(1),
        async { while tasks.join_next().await.is_some() {} },
    )
    .await;
    if drained.is_err() {
        tasks.abort_all();
    }
    if let Some(pacer) = pacer {
        pacer.abort();
    }
}

/// The names in a member's certificate (empty if none).
fn peer_names(conn: &Connection) -> Vec<String> {
    conn.peer_identity()
        .and_then(|p| p.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().map(|c| shoal_tracker::server::cert_names(c)))
        .unwrap_or_default()
}

/// Why a connection is not from a member, if it is not.
fn check_member(conn: &Connection) -> Result<(), &'static str> {
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    if alpn.as_deref() != Some(ALPN) {
        return Err("ALPN shoal/1 is required");
    }
    let has_cert = conn
        .peer_identity()
        .and_then(|p| p.downcast::<Vec<CertificateDer<'static>>>().ok())
        .is_some_and(|chain| !chain.is_empty());
    if !has_cert {
        return Err("a cluster client certificate is required");
    }
    Ok(())
}

async fn serve_connection(
    incoming: Incoming,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let remote = incoming.remote_address();
    let conn = tokio::select! {
        _ = stop.changed() => return,
        c = incoming => match c {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(%remote, error = %e, "peer handshake failed");
                return;
            }
        },
    };
    if let Err(why) = check_member(&conn) {
        tracing::warn!(%remote, why, "peer connection refused");
        conn.close(close::NOT_A_MEMBER, why.as_bytes());
        return;
    }
    let names = peer_names(&conn);
    let denied = |names: &[String]| {
        let no = shared.limits.denied.denies(names);
        if no {
            tracing::warn!(%remote, ?names, "peer connection refused: the node is on the cluster's deny list");
            crate::metrics::global().denied_refusals.inc();
            conn.close(close::DENIED, b"denied by the cluster's operator");
        }
        no
    };
    if denied(&names) {
        return;
    }
    tracing::debug!(%remote, "peer connected");
    let _registered = Registered::new(&shared.conns, &conn);
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some(done) = streams.join_next(), if !streams.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(%remote, error = %e, "peer stream task failed");
                }
            }
            s = conn.accept_bi() => match s {
                // Denied since it connected: cut it off.
                Ok(_) if denied(&names) => break,
                Ok((send, recv)) => {
                    streams.spawn(serve_stream(send, recv, shared.clone(), stop.clone()));
                }
                Err(e) => {
                    tracing::debug!(%remote, error = %e, "peer connection ended");
                    break;
                }
            },
        }
    }
    let drained = tokio::time::timeout(shared.limits.drain_timeout, async {
        while streams.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        streams.abort_all();
    }
    conn.close(close::SHUTDOWN, b"shutting down");
}

/// Why a request could not be read.
enum RequestError {
    /// The stream broke (reset, connection lost): nobody to answer.
    Gone,
    /// The bytes are not a valid request: answer `BadRequest`.
    Wire(WireError),
    /// The stream ended before any request.
    Empty,
}

async fn read_request(recv: &mut RecvStream) -> Result<Request, RequestError> {
    let mut dec = RequestDecoder::new();
    loop {
        if let Some(req) = dec.next_request().map_err(RequestError::Wire)? {
            return Ok(req);
        }
        // `wants` is at least 1 here and never more than the rest of the
        // current frame, so the decoder takes all of what is read.
        match recv.read_chunk(dec.wants(), true).await {
            Ok(Some(chunk)) => {
                let taken = dec.push(&chunk.bytes);
                debug_assert_eq!(taken, chunk.bytes.len());
            }
            Ok(None) => {
                dec.finish().map_err(RequestError::Wire)?;
                return Err(RequestError::Empty);
            }
            Err(_) => return Err(RequestError::Gone),
        }
    }
}

/// The sending half of a request's stream, with the write timeout, the
/// upload cap and the sent-bytes metric.
struct Responder {
    send: SendStream,
    write_timeout: Duration,
    rate: RateLimit,
}

/// Bytes written to a stream at a time under an upload cap.
const PACED_PIECE: usize = 16 << 10;

/// The stream cannot carry more (reset by us after a stall, or by the peer).
struct Gone;

impl Responder {
    async fn write(&mut self, bufs: &mut [Bytes]) -> Result<(), Gone> {
        if !self.rate.is_limited() {
            return self.write_now(bufs).await;
        }
        // Under a cap, bytes enter the stream in small pieces, each paid for
        // before it is written: paying after writing whole 256 KiB frames
        // let every upload slot burst a frame into the link's queue at once.
        for buf in bufs.iter() {
            let mut rest = buf.clone();
            while !rest.is_empty() {
                let piece = rest.split_to(rest.len().min(PACED_PIECE));
                self.rate.spend(piece.len()).await;
                self.write_now(&mut [piece]).await?;
            }
        }
        Ok(())
    }

    async fn write_now(&mut self, bufs: &mut [Bytes]) -> Result<(), Gone> {
        let len: usize = bufs.iter().map(Bytes::len).sum();
        match tokio::time::timeout(self.write_timeout, self.send.write_all_chunks(bufs)).await {
            Ok(Ok(())) => {
                metrics::global().peer_bytes_sent.inc_by(len as u64);
                Ok(())
            }
            Ok(Err(_)) => Err(Gone),
            Err(_) => {
                let _ = self.send.reset(stream_code::STALLED);
                Err(Gone)
            }
        }
    }

    async fn frame(&mut self, resp: &Response) -> Result<(), Gone> {
        let mut buf = BytesMut::new();
        if let Err(e) = resp.encode(&mut buf) {
            // Only a bug produces an unencodable response; tell the peer.
            tracing::error!(error = %e, ?resp, "cannot encode a peer response");
            buf.clear();
            Response::error(ErrorKind::Internal, "internal error")
                .encode(&mut buf)
                .expect("a short error frame encodes");
        }
        self.write(&mut [buf.freeze()]).await
    }

    async fn chunk(&mut self, index: u32, data: Bytes) -> Result<(), Gone> {
        match encode_chunk_header(index, data.len()) {
            Ok(header) => {
                self.write(&mut [Bytes::copy_from_slice(&header), data])
                    .await
            }
            Err(e) => {
                tracing::error!(index, error = %e, "a chunk from the source does not fit a frame");
                self.frame(&Response::error(ErrorKind::Internal, "internal error"))
                    .await
            }
        }
    }

    /// Ends the answer and waits (bounded) until the peer has it all, so a
    /// shutdown that closes the connection next cannot cut it short.
    async fn finish(mut self) {
        if self.send.finish().is_ok() {
            let _ = tokio::time::timeout(self.write_timeout, self.send.stopped()).await;
        }
    }
}

async fn serve_stream(
    send: SendStream,
    mut recv: RecvStream,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) {
    let mut out = Responder {
        send,
        write_timeout: shared.limits.write_timeout,
        rate: shared.limits.upload_rate.clone(),
    };
    let read = tokio::time::timeout(shared.limits.request_timeout, read_request(&mut recv)).await;
    // One request per stream: nothing after it is read.
    let _ = recv.stop(stream_code::DONE);
    let answered = match read {
        Ok(Ok(Request::GetChunks {
            blob,
            chunk_size,
            indices,
        })) => serve_chunks(&mut out, &shared, blob, chunk_size, &indices).await,
        Ok(Ok(Request::GetBitfield { blob })) => {
            let resp = match shared.source.bitfield(&blob) {
                Some((layout, bits)) => Response::Bitfield {
                    blob,
                    chunk_size: layout.chunk_size(),
                    bits,
                },
                None => Response::DontHave { index: 0 },
            };
            out.frame(&resp).await
        }
        Ok(Ok(Request::Watch { blob })) => serve_watch(&mut out, &shared, blob, stop).await,
        Ok(Ok(Request::GetState { blob })) => {
            // Hashing a complete blob the first time reads it whole: off
            // the runtime.
            let source = shared.source.clone();
            let state = tokio::task::spawn_blocking(move || source.state(&blob)).await;
            let resp = match state {
                Ok(Ok(Some(st))) => Response::State(st),
                Ok(Ok(None)) => Response::DontHave { index: 0 },
                Ok(Err(e)) => {
                    tracing::warn!(%blob, error = %e, "reading a blob to answer GetState failed");
                    Response::error(ErrorKind::Internal, "reading the blob failed")
                }
                Err(_) => Response::error(ErrorKind::Internal, "the state task failed"),
            };
            out.frame(&resp).await
        }
        Ok(Err(RequestError::Gone)) => return,
        Ok(Err(RequestError::Wire(e))) => {
            tracing::debug!(error = %e, "malformed peer request");
            out.frame(&Response::error(ErrorKind::BadRequest, e.to_string()))
                .await
        }
        Ok(Err(RequestError::Empty)) => {
            out.frame(&Response::error(
                ErrorKind::BadRequest,
                "the stream ended without a request",
            ))
            .await
        }
        Err(_) => {
            let msg = format!(
                "no complete request within {} s",
                shared.limits.request_timeout.as_secs_f32()
            );
            out.frame(&Response::error(ErrorKind::BadRequest, msg))
                .await
        }
    };
    if answered.is_ok() {
        out.finish().await;
    }
}

/// With every upload slot taken: waits for one in the queue (first come,
/// first served) if the queue has room, for at most
/// [`ServeLimits::upload_queue_wait`]; `None`: answer `Busy`.
async fn wait_for_slot(
    out: &mut Responder,
    shared: &Shared,
) -> Result<Option<OwnedSemaphorePermit>, Gone> {
    let (_place, ahead) = QueuePlace::enter(&shared.queued);
    if ahead >= shared.limits.upload_queue {
        return Ok(None);
    }
    tokio::select! {
        slot = shared.uploads.clone().acquire_owned() => {
            Ok(Some(slot.expect("the upload semaphore is never closed")))
        }
        _ = out.send.stopped() => Err(Gone),
        () = tokio::time::sleep(shared.limits.upload_queue_wait) => Ok(None),
    }
}

/// A place in the upload queue, counted while it lives.
struct QueuePlace<'a>(&'a AtomicUsize);

impl<'a> QueuePlace<'a> {
    /// Enters the queue; also returns how many were in it already.
    fn enter(count: &'a AtomicUsize) -> (Self, usize) {
        let ahead = count.fetch_add(1, Ordering::AcqRel);
        (QueuePlace(count), ahead)
    }
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers a `Watch`: the blob's bitfield now and each time it grows
/// (see the module docs).
async fn serve_watch(
    out: &mut Responder,
    shared: &Arc<Shared>,
    blob: Digest,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Gone> {
    let Some(_slot) = WatchSlot::take(shared, blob) else {
        return out
            .frame(&Response::error(ErrorKind::Busy, "too many watchers"))
            .await;
    };
    let mut arrivals = shared.source.arrivals(&blob);
    let mut sent: Option<Bitfield> = None;
    loop {
        let Some((layout, bits)) = shared.source.bitfield(&blob) else {
            if sent.is_none() {
                out.frame(&Response::DontHave { index: 0 }).await?;
            }
            // Nothing of it here (any more): the watch ends.
            return Ok(());
        };
        if sent.as_ref() != Some(&bits) {
            let full = bits.is_full();
            out.frame(&Response::Bitfield {
                blob,
                chunk_size: layout.chunk_size(),
                bits: bits.clone(),
            })
            .await?;
            if full {
                return Ok(());
            }
            sent = Some(bits);
        }
        // A partial blob nothing is adding to: nothing more will come.
        let Some(rx) = arrivals.as_mut() else {
            return Ok(());
        };
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    // The transfer ended: one last look (complete, or not).
                    arrivals = None;
                    continue;
                }
            }
            _ = out.send.stopped() => return Err(Gone),
            _ = stop.changed() => return Ok(()),
        }
        // Chunks stored meanwhile share the next frame.
        tokio::time::sleep(Duration::from_millis(WATCH_FRAME_GAP_MS)).await;
    }
}

/// Reads a chunk on the blocking pool. The read holds the upload slot too,
/// so a read left behind by a broken stream still counts against the limit.
fn read_ahead(
    shared: &Shared,
    slot: &Arc<OwnedSemaphorePermit>,
    blob: Digest,
    layout: ChunkLayout,
    index: u32,
) -> JoinHandle<io::Result<Option<Bytes>>> {
    let (source, slot) = (shared.source.clone(), slot.clone());
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        source.chunk(&blob, layout, index)
    })
}

async fn serve_chunks(
    out: &mut Responder,
    shared: &Shared,
    blob: Digest,
    chunk_size: u32,
    indices: &[u32],
) -> Result<(), Gone> {
    let slot = match shared.uploads.clone().try_acquire_owned() {
        Ok(slot) => slot,
        Err(_) => match wait_for_slot(out, shared).await? {
            Some(slot) => slot,
            None => return out.frame(&shared.busy()).await,
        },
    };
    let _time = SlotTime {
        shared,
        from: shared.clock_us(),
    };
    let layout = match shared.source.layout(&blob, chunk_size) {
        Ok(Some(layout)) => layout,
        Ok(None) => {
            for &index in indices {
                out.frame(&Response::DontHave { index }).await?;
            }
            return Ok(());
        }
        Err(e) => {
            let msg = format!("chunk size {chunk_size} does not fit blob {blob}: {e}");
            return out
                .frame(&Response::error(ErrorKind::BadRequest, msg))
                .await;
        }
    };
    // Indices increase (the decoder checked), so the last is the largest.
    if let Some(&last) = indices.last().filter(|&&i| i >= layout.count()) {
        let msg = format!(
            "chunk {last} is past the end of blob {blob} ({} chunks of {chunk_size} bytes)",
            layout.count()
        );
        return out
            .frame(&Response::error(ErrorKind::BadRequest, msg))
            .await;
    }
    // Read one chunk ahead: the next read overlaps the current write.
    let slot = Arc::new(slot);
    let mut reads = indices
        .iter()
        .map(|&i| (i, read_ahead(shared, &slot, blob, layout, i)));
    let mut next = reads.next();
    while let Some((index, read)) = next {
        let read = read.await;
        next = reads.next();
        match read {
            Ok(Ok(Some(data))) => out.chunk(index, data).await?,
            Ok(Ok(None)) => out.frame(&Response::DontHave { index }).await?,
            Ok(Err(e)) => {
                tracing::error!(%blob, index, error = %e, "reading a chunk to serve failed");
                let msg = format!("reading chunk {index} failed");
                return out.frame(&Response::error(ErrorKind::Internal, msg)).await;
            }
            Err(e) => {
                tracing::error!(%blob, index, error = %e, "chunk read task failed");
                let msg = format!("reading chunk {index} failed");
                return out.frame(&Response::error(ErrorKind::Internal, msg)).await;
            }
        }
    }
    Ok(())
}
