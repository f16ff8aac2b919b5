//! The QUIC peer data plane: serving verified chunks to cluster members and
//! fetching chunks from them, verified before anyone sees them.
//!
//! The wire format and its size caps live in [`shoal_proto::wire`] (sans-IO);
//! this module is the async driver over quinn:
//!
//! - [`server::PeerServer`] accepts mutually authenticated connections on an
//!   endpoint and answers one request per bidirectional stream from a
//!   [`source::ChunkSource`] (for now, complete blobs of the [`Store`]), with
//!   a global limit of concurrent uploads (`Busy` beyond it, never a queue).
//! - [`client::PeerClient`] keeps one connection per peer and fetches chunks,
//!   checking each against the blob's [`ChunkHashes`] before returning it;
//!   its per-chunk [`client::ChunkResult`]s map onto the scheduler's
//!   [`Outcome`](shoal_proto::sched::Outcome)s.
//!
//! Crypto is configured outside (the cluster's mutual-TLS `rustls` configs,
//! ALPN `shoal/1`); both sides should use [`transport_config`] so their
//! stream and flow-control limits agree.
//!
//! [`Store`]: crate::store::Store
//! [`ChunkHashes`]: shoal_proto::ChunkHashes

pub mod client;
pub mod server;
pub mod source;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Most requests (bidirectional streams) a peer may have open on one
/// connection at once; quinn holds further `open_bi` calls until one ends.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// A connection with no packets for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pings keep a quiet but live connection from hitting [`IDLE_TIMEOUT`].
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// Per-stream receive window: one whole 4 MiB chunk frame (the largest) can
/// be in flight on a stream without waiting for window updates.
const STREAM_WINDOW: u32 = (4 << 20) + (64 << 10);
/// Per-connection receive and send windows: bounds what one peer connection
/// buffers in memory, with room for several streams at full speed.
const CONNECTION_WINDOW: u32 = 32 << 20;

/// QUIC connection close codes of the peer protocol.
pub(crate) mod close {
    use quinn::VarInt;

    /// The node is shutting down (or the connection was idle).
    pub(crate) const SHUTDOWN: VarInt = VarInt::from_u32(0);
    /// The peer is not a cluster member: no client certificate, or not ALPN
    /// `shoal/1` (the TLS handshake normally refuses such peers first).
    pub(crate) const NOT_A_MEMBER: VarInt = VarInt::from_u32(2);
    /// The peer is on the cluster's deny list.
    pub(crate) const DENIED: VarInt = VarInt::from_u32(3);
}

/// The cluster's deny list as this node last heard it from the tracker
/// (every announce reply carries it): nodes whose certificates are still
/// valid but whom the operator shut out. The peer server refuses them.
#[derive(Debug, Default)]
pub struct DenyList(std::sync::RwLock<std::collections::BTreeSet<String>>);

impl DenyList {
    /// Replaces the list; whether it changed.
    pub fn set(&self, nodes: impl IntoIterator<Item = impl Into<String>>) -> bool {
        let new: std::collections::BTreeSet<String> = nodes.into_iter().map(Into::into).collect();
        let mut cur = self.0.write().unwrap_or_else(|p| p.into_inner());
        if *cur == new {
            return false;
        }
        *cur = new;
        crate::metrics::global()
            .denied_nodes
            .set(i64::try_from(cur.len()).unwrap_or(i64::MAX));
        true
    }

    /// Whether any of `names` (a certificate's names) is denied.
    pub fn denies(&self, names: &[String]) -> bool {
        let cur = self.0.read().unwrap_or_else(|p| p.into_inner());
        !cur.is_empty() && names.iter().any(|n| cur.contains(n))
    }

    /// How many nodes are denied.
    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether nobody is denied.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// QUIC stream error codes (`RESET_STREAM` / `STOP_SENDING`) of the protocol.
pub(crate) mod stream_code {
    use quinn::VarInt;

    /// No more bytes are wanted on this stream (not an error).
    pub(crate) const DONE: VarInt = VarInt::from_u32(0);
    /// The other side stopped reading for longer than the write timeout.
    pub(crate) const STALLED: VarInt = VarInt::from_u32(1);
}

/// The QUIC transport limits both sides of the peer protocol use: at most
/// [`MAX_STREAMS_PER_CONNECTION`] concurrent requests per connection, no
/// unidirectional streams, a [`KEEP_ALIVE`] ping and a [`IDLE_TIMEOUT`], and
/// flow-control windows sized for 4 MiB chunks.
pub fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(MAX_STREAMS_PER_CONNECTION.into())
        .max_concurrent_uni_streams(0u32.into())
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("30 s fits a QUIC idle timeout"),
        ))
        .stream_receive_window(STREAM_WINDOW.into())
        .receive_window(CONNECTION_WINDOW.into())
        .send_window(u64::from(CONNECTION_WINDOW));
    Arc::new(t)
}

/// Where to reach a peer and who it must prove to be.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    /// Its QUIC (UDP) address.
    pub addr: SocketAddr,
    /// Its node id: the DNS name its certificate must carry.
    pub name: String,
}

impl fmt::Debug for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}
