//! The tracker API, version 1: the requests members send to the tracker and
//! the replies they get, as plain serde types (JSON over HTTPS under `/v1/`).
//!
//! Every request type is validated when it is built and when it is
//! deserialized, so the tracker core only ever sees well-formed input: node
//! ids, peer addresses, layouts and bitfield lengths are checked, and every
//! list is bounded. Types with cross-field rules keep their fields private and
//! are built through a checked `new`; plain replies have public fields.
//!
//! The calls, in the order a pulling node makes them:
//!
//! - [`Announce`] → [`AnnounceReply`]: "I am alive at this address and hold
//!   these chunks" (periodically, and whenever holdings change).
//! - lookup of a blob → [`LookupReply`]: its chunk hashes, a bounded subset of
//!   its holders with their bitfields, and which chunks are being fetched from
//!   the origin right now.
//! - [`LeaseRequest`] → [`LeaseGrant`]: permission to fetch chunks nobody holds
//!   from the origin.
//! - [`PublishHashes`] → [`PublishReply`]: the hashes of chunks fetched from
//!   the origin under a lease.
//! - [`Report`] → [`ReportReply`]: a peer that sent bad bytes, or a blob whose
//!   chunks all matched but whose digest did not.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::Arc;

use crate::chunk::{Bitfield, ChunkError, ChunkLayout};
use crate::digest::Digest;

/// The longest node id accepted.
pub const MAX_NODE_ID_LEN: usize = 64;
/// The longest peer address accepted (a 253-character host name, `:`, port).
pub const MAX_ADDR_LEN: usize = 259;
/// The most blobs one announce may list (in `blobs` and `dropped` each).
pub const MAX_ANNOUNCE_BLOBS: usize = 10_000;
/// The most chunk hashes one publish may carry.
pub const MAX_PUBLISH_HASHES: usize = 65_536;
/// "Sign my certificate request": a node joining with a join token, on the
/// tracker's join listener (server-authenticated TLS, no client
/// certificate yet). JSON: `{"node", "token", "csr"}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The name the certificate will carry.
    pub node: NodeId,
    /// A join token the operator gave the tracker (`--join-token-file`).
    pub token: String,
    /// A PEM certificate request (PKCS#10) over the node's new key.
    pub csr: String,
}

/// The longest join token accepted, and the largest certificate request.
pub const MAX_JOIN_TOKEN: usize = 256;
/// The largest certificate request accepted, in bytes of PEM.
pub const MAX_CSR_PEM: usize = 16 << 10;

impl JoinRequest {
    /// Checks the sizes.
    pub fn validate(&self) -> Result<(), TrackerError> {
        if self.token.len() > MAX_JOIN_TOKEN {
            return Err(TrackerError::TooMany {
                what: "bytes of join token",
                limit: MAX_JOIN_TOKEN,
            });
        }
        check_csr(&self.csr)
    }
}

/// A certificate request must fit [`MAX_CSR_PEM`].
fn check_csr(csr: &str) -> Result<(), TrackerError> {
    if csr.len() > MAX_CSR_PEM {
        return Err(TrackerError::TooMany {
            what: "bytes of certificate request",
            limit: MAX_CSR_PEM,
        });
    }
    Ok(())
}

/// "Renew my certificate": a member, over mutual TLS with its current
/// certificate (which must name `node`), sends a request over a new key.
/// The answer is a [`JoinReply`]. JSON: `{"node", "csr"}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// The member (its current certificate's name).
    pub node: NodeId,
    /// A PEM certificate request over the node's new key.
    pub csr: String,
}

impl RenewRequest {
    /// The node it speaks for.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// Checks the size of the request.
    pub fn validate(&self) -> Result<(), TrackerError> {
        check_csr(&self.csr)
    }
}

/// The tracker's answer to a [`JoinRequest`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JoinReply {
    /// The node's certificate (PEM), signed by the cluster CA.
    pub certificate: String,
    /// How long it is valid from now, in seconds.
    pub valid_for_s: u64,
}

/// The most nodes a tracker's deny list may hold.
pub const MAX_DENIED: usize = 1_024;

/// The most holders a lookup reply may list.
pub const MAX_LOOKUP_HOLDERS: usize = 1_024;

/// Why a tracker request was refused or a tracker message is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrackerError {
    /// A node id is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error("node id {0:?} is not 1 to 64 characters of [A-Za-z0-9._-]")]
    BadNodeId(String),
    /// A rack name is empty, too long or has characters outside
    /// `[A-Za-z0-9._-]`.
    #[error("rack {0:?} is not 1 to 64 characters of [A-Za-z0-9._-]")]
    BadRack(String),
    /// A peer address is not `host:port`.
    #[error("peer address {addr:?} is invalid: {reason}")]
    BadAddr {
        /// The address given (truncated).
        addr: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A chunk hash is not 64 lowercase hex characters.
    #[error("chunk hash {0:?} is not 64 lowercase hex characters")]
    BadHash(String),
    /// A layout or bitfield is invalid in itself (chunk size, chunk count).
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    /// A bitfield's length differs from the blob's chunk count.
    #[error("bitfield for {blob} covers {actual} chunks, the blob has {expected}")]
    BadBitfield {
        /// The blob.
        blob: Digest,
        /// The blob's chunk count.
        expected: u32,
        /// The bitfield's length.
        actual: u32,
    },
    /// A blob is claimed complete but its bitfield is not full.
    #[error("{blob} is marked complete but its bitfield is not full")]
    NotFull {
        /// The blob.
        blob: Digest,
    },
    /// A blob appears twice in one announce.
    #[error("{0} is listed more than once in one announce")]
    DuplicateBlob(Digest),
    /// A chunk appears twice in one publish.
    #[error("chunk {0} is listed more than once in one publish")]
    DuplicateChunk(u32),
    /// A chunk index is past the blob's last chunk.
    #[error("chunk {index} is out of range: the blob has {count} chunks")]
    ChunkOutOfRange {
        /// The index given.
        index: u32,
        /// The blob's chunk count.
        count: u32,
    },
    /// A lease request asks for zero chunks.
    #[error("a lease request must ask for at least one chunk")]
    ZeroLease,
    /// A node reported itself.
    #[error("a node cannot report itself")]
    SelfReport,
    /// A lookup reply's parts disagree with its layout.
    #[error("lookup reply for {blob} is inconsistent: {what}")]
    BadView {
        /// The blob.
        blob: Digest,
        /// Which part is wrong.
        what: &'static str,
    },
    /// The tracker knows nothing about this blob.
    #[error("the tracker knows nothing about {0}")]
    UnknownBlob(Digest),
    /// The blob's layout is already fixed and differs from the one given.
    #[error("{blob} has layout {known:?} at the tracker, not {offered:?}")]
    LayoutConflict {
        /// The blob.
        blob: Digest,
        /// The layout the tracker has.
        known: ChunkLayout,
        /// The layout offered.
        offered: ChunkLayout,
    },
    /// The node has not announced itself (or went silent and expired).
    #[error("node {0} is not a live member: announce first")]
    NotAMember(NodeId),
    /// The node is excluded for serving or publishing bad data.
    #[error("node {node} is excluded until {until_ms} ms")]
    Excluded {
        /// The node.
        node: NodeId,
        /// When the exclusion ends (tracker time).
        until_ms: u64,
    },
    /// The cluster's operator denied this node (the tracker's deny list):
    /// refused until taken off the list.
    #[error("node {0} is denied by the cluster's operator")]
    Denied(NodeId),
    /// A preheat request or progress report is malformed.
    #[error("preheat: {0}")]
    BadPreheat(String),
    /// No such preheat job (never, or finished and forgotten).
    #[error("no preheat job {0}")]
    UnknownJob(u64),
    /// A list or a table is at its limit.
    #[error("too many {what} (limit {limit})")]
    TooMany {
        /// What there are too many of.
        what: &'static str,
        /// The limit.
        limit: usize,
    },
}

impl TrackerError {
    /// A stable machine-readable code for error bodies and metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            TrackerError::UnknownBlob(_) => "unknown_blob",
            TrackerError::LayoutConflict { .. } => "layout_conflict",
            TrackerError::NotAMember(_) => "not_a_member",
            TrackerError::Excluded { .. } => "excluded",
            TrackerError::Denied(_) => "denied",
            TrackerError::TooMany { .. } => "too_many",
            TrackerError::UnknownJob(_) => "not_found",
            _ => "bad_request",
        }
    }
}

/// Keeps error messages bounded whatever a client sends.
fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

// ---------------------------------------------------------------------------
// Identifiers
// ---------------------------------------------------------------------------

/// Display, Debug, and serde as a JSON string (parsed with `FromStr`, so
/// what is read is validated) for a validated string newtype.
macro_rules! text_form {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", &*self.0)
            }
        }

        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A member's name: 1 to 64 characters of `[A-Za-z0-9._-]` (a host name or a
/// Kubernetes node name fits). Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(Arc<str>);

impl NodeId {
    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for NodeId {
    type Err = TrackerError;

    fn from_str(s: &str) -> Result<Self, TrackerError> {
        let ok = (1..=MAX_NODE_ID_LEN).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(NodeId(s.into()))
        } else {
            Err(TrackerError::BadNodeId(truncate(s)))
        }
    }
}

text_form!(NodeId);

/// Where a member sits in the network: a rack, or a zone — whatever shares
/// an uplink that is narrower than its hosts together. Same grammar as a
/// [`NodeId`] (`rack-12`, `us-east-1a`). Members of one rack are named to
/// each other first, so each chunk crosses a rack's uplink about once.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rack(Arc<str>);

impl Rack {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Rack {
    type Err = TrackerError;

    fn from_str(s: &str) -> Result<Self, TrackerError> {
        match s.parse::<NodeId>() {
            Ok(id) => Ok(Rack(id.0)),
            Err(_) => Err(TrackerError::BadRack(truncate(s))),
        }
    }
}

text_form!(Rack);

/// Where peers reach a member over QUIC: `host:port`, with the host an IPv4
/// address, a bracketed IPv6 address or a DNS name, and a non-zero port.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerAddr(Arc<str>);

impl PeerAddr {
    /// The address as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PeerAddr {
    type Err = TrackerError;

    fn from_str(s: &str) -> Result<Self, TrackerError> {
        let bad = |reason| TrackerError::BadAddr {
            addr: truncate(s),
            reason,
        };
        if s.len() > MAX_ADDR_LEN {
            return Err(bad("longer than 259 characters"));
        }
        if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
            return if sa.port() == 0 {
                Err(bad("port 0"))
            } else {
                Ok(PeerAddr(s.into()))
            };
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("no :port"))?;
        match port.parse::<u16>() {
            Ok(0) => return Err(bad("port 0")),
            Ok(_) => {}
            Err(_) => return Err(bad("port is not a number from 1 to 65535")),
        }
        let label_ok = |l: &str| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
            return Err(bad("host is not an IP address or DNS name"));
        }
        Ok(PeerAddr(s.into()))
    }
}

text_form!(PeerAddr);

/// The SHA-256 of one chunk; 64 lowercase hex characters in JSON.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash([u8; 32]);

impl ChunkHash {
    /// Wraps raw hash bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        ChunkHash(bytes)
    }

    /// The hash of `data`.
    pub fn of(data: &[u8]) -> Self {
        use sha2::Digest as _;
        ChunkHash(sha2::Sha256::digest(data).into())
    }

    /// The raw hash bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl From<[u8; 32]> for ChunkHash {
    fn from(bytes: [u8; 32]) -> Self {
        ChunkHash(bytes)
    }
}

impl From<ChunkHash> for [u8; 32] {
    fn from(h: ChunkHash) -> Self {
        h.0
    }
}

impl FromStr for ChunkHash {
    type Err = TrackerError;

    fn from_str(s: &str) -> Result<Self, TrackerError> {
        let mut out = [0u8; 32];
        let lower = s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if s.len() != 64 || !lower || hex::decode_to_slice(s, &mut out).is_err() {
            return Err(TrackerError::BadHash(truncate(s)));
        }
        Ok(ChunkHash(out))
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", &hex::encode(self.0)[..12])
    }
}

impl serde::Serialize for ChunkHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> serde::Deserialize<'de> for ChunkHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Checks that `have` is a bitfield of `layout` and, if `complete`, full.
fn check_have(
    blob: &Digest,
    layout: &ChunkLayout,
    have: &Bitfield,
    complete: bool,
) -> Result<(), TrackerError> {
    if have.len() != layout.count() {
        return Err(TrackerError::BadBitfield {
            blob: *blob,
            expected: layout.count(),
            actual: have.len(),
        });
    }
    if complete && !have.is_full() {
        return Err(TrackerError::NotFull { blob: *blob });
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Announce
// ---------------------------------------------------------------------------

/// Which chunks of one blob a node holds. JSON:
/// `{"blob": "sha256:…", "size": 123, "chunk_size": 1048576, "have": {bitfield},
/// "complete": false}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "RawBlobHave")]
pub struct BlobHave {
    blob: Digest,
    #[serde(flatten)]
    layout: ChunkLayout,
    have: Bitfield,
    complete: bool,
}

#[derive(serde::Deserialize)]
struct RawBlobHave {
    blob: Digest,
    size: u64,
    chunk_size: u32,
    have: Bitfield,
    complete: bool,
}

impl TryFrom<RawBlobHave> for BlobHave {
    type Error = TrackerError;

    fn try_from(r: RawBlobHave) -> Result<Self, TrackerError> {
        BlobHave::new(
            r.blob,
            ChunkLayout::new(r.size, r.chunk_size)?,
            r.have,
            r.complete,
        )
    }
}

impl BlobHave {
    /// Holdings of `blob`: `have` must have one bit per chunk of `layout`, and
    /// be full if `complete` (the whole blob was verified against its digest).
    pub fn new(
        blob: Digest,
        layout: ChunkLayout,
        have: Bitfield,
        complete: bool,
    ) -> Result<Self, TrackerError> {
        check_have(&blob, &layout, &have, complete)?;
        Ok(BlobHave {
            blob,
            layout,
            have,
            complete,
        })
    }

    /// A complete blob: every chunk, verified against the digest.
    pub fn complete(blob: Digest, layout: ChunkLayout) -> Self {
        BlobHave {
            blob,
            layout,
            have: Bitfield::full(layout.count()).expect("a layout has at most MAX_CHUNKS chunks"),
            complete: true,
        }
    }

    /// The blob.
    pub fn blob(&self) -> &Digest {
        &self.blob
    }

    /// Its layout.
    pub fn layout(&self) -> ChunkLayout {
        self.layout
    }

    /// The chunks held (each verified against its chunk hash or the digest).
    pub fn have(&self) -> &Bitfield {
        &self.have
    }

    /// Whether the whole blob is held and verified against its digest.
    pub fn is_complete(&self) -> bool {
        self.complete
    }
}

/// "I am alive at `addr` and hold these chunks." Each [`BlobHave`] replaces
/// the node's bitfield for that blob; `dropped` blobs are no longer held; if
/// `full`, the list is the node's complete holdings and blobs not listed are
/// forgotten. A node that holds nothing announces an empty list to stay a
/// member. A `rack`, if given, is where the node sits ([`Rack`]); the
/// tracker keeps the last one given. `next_ms`, if given, is how soon the
/// node will announce again (a download in progress announces every second
/// or so; without it, the tracker's announce interval): if peers report the
/// node unresponsive, the tracker forgets it soon after that announce fails
/// to come, which frees the chunks only it held or had leased. A `leaving`
/// announce (a node shutting down) has the tracker forget the node at once,
/// with its holdings and its leases, rather than after its announces stop.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "RawAnnounce")]
pub struct Announce {
    node: NodeId,
    addr: PeerAddr,
    blobs: Vec<BlobHave>,
    dropped: Vec<Digest>,
    full: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rack: Option<Rack>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next_ms: Option<NonZeroU32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dht: Option<PeerAddr>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    leaving: bool,
}

#[derive(serde::Deserialize)]
struct RawAnnounce {
    node: NodeId,
    addr: PeerAddr,
    #[serde(default)]
    blobs: Vec<BlobHave>,
    #[serde(default)]
    dropped: Vec<Digest>,
    #[serde(default)]
    full: bool,
    #[serde(default)]
    rack: Option<Rack>,
    #[serde(default)]
    next_ms: Option<NonZeroU32>,
    #[serde(default)]
    dht: Option<PeerAddr>,
    #[serde(default)]
    leaving: bool,
}

impl TryFrom<RawAnnounce> for Announce {
    type Error = TrackerError;

    fn try_from(r: RawAnnounce) -> Result<Self, TrackerError> {
        let a = Announce::new(r.node, r.addr, r.blobs, r.dropped, r.full)?
            .with_rack(r.rack)
            .with_next_ms(r.next_ms)
            .with_dht(r.dht);
        Ok(if r.leaving { a.leaving() } else { a })
    }
}

impl Announce {
    /// An announce: at most [`MAX_ANNOUNCE_BLOBS`] entries in each list, and
    /// no blob listed twice (in either list).
    pub fn new(
        node: NodeId,
        addr: PeerAddr,
        blobs: Vec<BlobHave>,
        dropped: Vec<Digest>,
        full: bool,
    ) -> Result<Self, TrackerError> {
        if blobs.len() > MAX_ANNOUNCE_BLOBS || dropped.len() > MAX_ANNOUNCE_BLOBS {
            return Err(TrackerError::TooMany {
                what: "blobs in one announce",
                limit: MAX_ANNOUNCE_BLOBS,
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for d in blobs.iter().map(|b| &b.blob).chain(&dropped) {
            if !seen.insert(*d) {
                return Err(TrackerError::DuplicateBlob(*d));
            }
        }
        Ok(Announce {
            node,
            addr,
            blobs,
            dropped,
            full,
            rack: None,
            next_ms: None,
            dht: None,
            leaving: false,
        })
    }

    /// The node at `addr` leaving the swarm (shutting down): the tracker
    /// forgets it at once, with everything it held and leased.
    pub fn leave(node: NodeId, addr: PeerAddr) -> Self {
        Announce::new(node, addr, Vec::new(), Vec::new(), true)
            .expect("an empty announce is valid")
            .leaving()
    }

    /// The same announce saying the node is leaving: it holds nothing from
    /// now on (its lists are dropped).
    pub fn leaving(mut self) -> Self {
        self.blobs.clear();
        self.dropped.clear();
        self.full = true;
        self.leaving = true;
        self
    }

    /// Whether the node is leaving the swarm.
    pub fn is_leaving(&self) -> bool {
        self.leaving
    }

    /// The same announce saying where the node's DHT listens (TCP), so
    /// the tracker can hand it to other members as a bootstrap peer.
    pub fn with_dht(mut self, dht: Option<PeerAddr>) -> Self {
        self.dht = dht;
        self
    }

    /// Where the node's DHT listens, if it says.
    pub fn dht(&self) -> Option<&PeerAddr> {
        self.dht.as_ref()
    }

    /// The same announce promising the next within `next_ms` milliseconds.
    pub fn with_next_ms(mut self, next_ms: Option<NonZeroU32>) -> Self {
        self.next_ms = next_ms;
        self
    }

    /// How soon the node says it will announce again, if it says.
    pub fn next_ms(&self) -> Option<NonZeroU32> {
        self.next_ms
    }

    /// The same announce saying where the node sits.
    pub fn with_rack(mut self, rack: Option<Rack>) -> Self {
        self.rack = rack;
        self
    }

    /// Where the node sits, if it says.
    pub fn rack(&self) -> Option<&Rack> {
        self.rack.as_ref()
    }

    /// The announcing node.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// Where peers reach it over QUIC.
    pub fn addr(&self) -> &PeerAddr {
        &self.addr
    }

    /// Holdings to set, one per blob.
    pub fn blobs(&self) -> &[BlobHave] {
        &self.blobs
    }

    /// Blobs no longer held.
    pub fn dropped(&self) -> &[Digest] {
        &self.dropped
    }

    /// Whether `blobs` is the node's complete list.
    pub fn is_full(&self) -> bool {
        self.full
    }
}

impl Announce {
    /// Takes a `later` announce from the same node into this one: the
    /// later one's holdings, addresses, rack and promise win; a blob one
    /// lists and the other drops is as the later one says. A later full
    /// announce (the node's whole list) replaces this one, and so does any
    /// announce after a leaving one (the node is back) or a leaving one.
    /// Gives `later` back, and leaves this one as it was, when the node
    /// differs or the merge would list more than [`MAX_ANNOUNCE_BLOBS`]
    /// blobs.
    pub fn merge(&mut self, later: Announce) -> Result<(), Announce> {
        if self.node != later.node {
            return Err(later);
        }
        if later.full || self.leaving {
            *self = later;
            return Ok(());
        }
        let listed = |d| later.blobs.iter().any(|b| b.blob == d) || later.dropped.contains(&d);
        let blobs: Vec<_> = self
            .blobs
            .iter()
            .filter(|b| !listed(b.blob))
            .chain(&later.blobs)
            .cloned()
            .collect();
        let dropped: Vec<_> = self
            .dropped
            .iter()
            .copied()
            .filter(|&d| !listed(d))
            .chain(later.dropped.iter().copied())
            .collect();
        if blobs.len() > MAX_ANNOUNCE_BLOBS || dropped.len() > MAX_ANNOUNCE_BLOBS {
            return Err(later);
        }
        *self = Announce {
            blobs,
            dropped,
            full: self.full,
            ..later
        };
        Ok(())
    }
}

/// The tracker's answer to an announce.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AnnounceReply {
    /// Announce again within this many milliseconds to stay a member.
    pub interval_ms: u64,
    /// Whether the tracker knew the member before this announce. `false`
    /// (the tracker restarted, or forgot a member silent for too long):
    /// the member should announce everything it holds (`full`). Absent from
    /// older trackers' answers, read as `true`.
    #[serde(default = "known_by_default")]
    pub known: bool,
    /// Nodes the cluster's operator denied: members refuse to serve them
    /// or fetch from them (at most [`MAX_DENIED`]; absent when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denied: Vec<NodeId>,
    /// DHT addresses of up to [`MAX_DHT_PEERS`] other members (those that
    /// said theirs): where this member bootstraps its DHT from, and keeps
    /// as the last known member list for when no tracker answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dht_peers: Vec<PeerAddr>,
}

/// How many members' DHT addresses an announce reply carries at most.
pub const MAX_DHT_PEERS: usize = 16;

fn known_by_default() -> bool {
    true
}

// ---------------------------------------------------------------------------
// Lookup
// ---------------------------------------------------------------------------

/// One holder of a blob in a lookup reply.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Holder {
    /// The member.
    pub node: NodeId,
    /// Where to reach it over QUIC.
    pub addr: PeerAddr,
    /// The chunks it holds (full if `complete`).
    pub have: Bitfield,
    /// Whether it holds the whole blob, verified against the digest.
    pub complete: bool,
    /// Whether it sits in the requester's rack (both announced the same
    /// [`Rack`]): such holders are named first and asked first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub near: bool,
}

/// What the tracker knows about one blob, as seen by one requester: the
/// known chunk hashes, a bounded subset of holders chosen for that requester,
/// and the chunks currently being fetched from the origin under a lease.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "RawBlobView")]
pub struct BlobView {
    blob: Digest,
    #[serde(flatten)]
    layout: ChunkLayout,
    epoch: u64,
    hashes: Vec<Option<ChunkHash>>,
    holders: Vec<Holder>,
    leased: Bitfield,
    /// The blob's hash sequence number at this reply: with the epoch, the
    /// cursor of the requester's next lookup ([`HashCursor`]).
    #[serde(default)]
    hash_seq: u64,
    /// Chunks some member holds with a published hash, named here or not
    /// (absent from older trackers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    served: Option<Bitfield>,
}

/// Where a requester's knowledge of a blob's chunk hashes stands: the epoch
/// and hash sequence number of its last lookup reply. A lookup with a
/// cursor of the blob's current epoch gets only the hashes published since
/// (the others are `None` in the reply: the requester keeps what it has);
/// any other epoch gets them all. In a URL: `since=EPOCH.SEQ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashCursor {
    /// [`BlobView::epoch`] of that reply.
    pub epoch: u64,
    /// [`BlobView::hash_seq`] of that reply.
    pub seq: u64,
}

impl fmt::Display for HashCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.epoch, self.seq)
    }
}

impl std::str::FromStr for HashCursor {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a hash cursor EPOCH.SEQ (two decimal numbers)");
        let (e, q) = s.split_once('.').ok_or_else(bad)?;
        let num = |t: &str| {
            (!t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit()))
                .then(|| t.parse::<u64>().ok())
                .flatten()
        };
        Ok(HashCursor {
            epoch: num(e).ok_or_else(bad)?,
            seq: num(q).ok_or_else(bad)?,
        })
    }
}

/// The reply to a lookup.
pub type LookupReply = BlobView;

#[derive(serde::Deserialize)]
struct RawBlobView {
    blob: Digest,
    size: u64,
    chunk_size: u32,
    epoch: u64,
    hashes: Vec<Option<ChunkHash>>,
    holders: Vec<Holder>,
    leased: Bitfield,
    #[serde(default)]
    hash_seq: u64,
    #[serde(default)]
    served: Option<Bitfield>,
}

impl TryFrom<RawBlobView> for BlobView {
    type Error = TrackerError;

    fn try_from(r: RawBlobView) -> Result<Self, TrackerError> {
        let layout = ChunkLayout::new(r.size, r.chunk_size)?;
        let view = BlobView::new(r.blob, layout, r.epoch, r.hashes, r.holders, r.leased)?
            .with_hash_seq(r.hash_seq);
        match r.served {
            Some(served) => view.with_served(served),
            None => Ok(view),
        }
    }
}

impl BlobView {
    /// A view of `blob`: one hash slot per chunk, every bitfield one bit per
    /// chunk, at most [`MAX_LOOKUP_HOLDERS`] holders.
    pub fn new(
        blob: Digest,
        layout: ChunkLayout,
        epoch: u64,
        hashes: Vec<Option<ChunkHash>>,
        holders: Vec<Holder>,
        leased: Bitfield,
    ) -> Result<Self, TrackerError> {
        let bad = |what| TrackerError::BadView { blob, what };
        if hashes.len() != layout.count() as usize {
            return Err(bad("hash list length differs from the chunk count"));
        }
        if leased.len() != layout.count() {
            return Err(bad("leased bitfield length differs from the chunk count"));
        }
        if holders.len() > MAX_LOOKUP_HOLDERS {
            return Err(TrackerError::TooMany {
                what: "holders in one lookup reply",
                limit: MAX_LOOKUP_HOLDERS,
            });
        }
        for h in &holders {
            check_have(&blob, &layout, &h.have, h.complete)?;
        }
        Ok(BlobView {
            blob,
            layout,
            epoch,
            hashes,
            holders,
            leased,
            hash_seq: 0,
            served: None,
        })
    }

    /// The same view saying which chunks are served ([`BlobView::served`]).
    pub fn with_served(mut self, served: Bitfield) -> Result<Self, TrackerError> {
        if served.len() != self.layout.count() {
            return Err(TrackerError::BadView {
                blob: self.blob,
                what: "served bitfield length differs from the chunk count",
            });
        }
        self.served = Some(served);
        Ok(self)
    }

    /// Chunks some member holds with a published hash, whether or not a
    /// holder of them is named here: no lease is granted for them, so a
    /// requester that cannot fetch one from a named holder waits for a
    /// lookup that names one rather than asking for a lease. `None` from a
    /// tracker that does not say.
    pub fn served(&self) -> Option<&Bitfield> {
        self.served.as_ref()
    }

    /// The same view carrying the blob's hash sequence number.
    pub fn with_hash_seq(mut self, seq: u64) -> Self {
        self.hash_seq = seq;
        self
    }

    /// The blob's hash sequence number (grows with every hash published).
    pub fn hash_seq(&self) -> u64 {
        self.hash_seq
    }

    /// The cursor for the next lookup of this requester.
    pub fn cursor(&self) -> HashCursor {
        HashCursor {
            epoch: self.epoch,
            seq: self.hash_seq,
        }
    }

    /// The blob.
    pub fn blob(&self) -> &Digest {
        &self.blob
    }

    /// Its layout (fixed by the first member that announced or leased it).
    pub fn layout(&self) -> ChunkLayout {
        self.layout
    }

    /// The hash generation: changes whenever hashes of this blob are
    /// withdrawn. A [`Report::DigestMismatch`] names the epoch whose hashes it
    /// used, so a stale report cannot withdraw hashes published since.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// One entry per chunk: its hash if published (since the lookup's
    /// cursor, if it gave one of this epoch).
    pub fn hashes(&self) -> &[Option<ChunkHash>] {
        &self.hashes
    }

    /// A bounded subset of the holders, never the requester itself.
    pub fn holders(&self) -> &[Holder] {
        &self.holders
    }

    /// Chunks under an unexpired origin lease: someone is fetching them.
    pub fn leased(&self) -> &Bitfield {
        &self.leased
    }
}

// ---------------------------------------------------------------------------
// Leases
// ---------------------------------------------------------------------------

/// "Let me fetch chunks of `blob` that nobody holds from the origin." JSON:
/// `{"node", "blob", "size", "chunk_size", "max_chunks", "from", "rtt_ms"?}`.
/// `rtt_ms` (optional; older members send none) is the member's smoothed
/// round trip to the tracker, its queue included: how long a lease is out
/// before its chunks can start, and after they are in before the tracker
/// knows (see [`PublishHashes`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "RawLeaseRequest")]
pub struct LeaseRequest {
    node: NodeId,
    blob: Digest,
    #[serde(flatten)]
    layout: ChunkLayout,
    max_chunks: u32,
    from: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rtt_ms: Option<u32>,
}

#[derive(serde::Deserialize)]
struct RawLeaseRequest {
    node: NodeId,
    blob: Digest,
    size: u64,
    chunk_size: u32,
    max_chunks: u32,
    #[serde(default)]
    from: u32,
    #[serde(default)]
    rtt_ms: Option<u32>,
}

impl TryFrom<RawLeaseRequest> for LeaseRequest {
    type Error = TrackerError;

    fn try_from(r: RawLeaseRequest) -> Result<Self, TrackerError> {
        let layout = ChunkLayout::new(r.size, r.chunk_size)?;
        Ok(LeaseRequest::new(r.node, r.blob, layout, r.max_chunks, r.from)?.with_rtt_ms(r.rtt_ms))
    }
}

impl LeaseRequest {
    /// A request for up to `max_chunks` (≥ 1) chunks, preferring `from` (the
    /// chunk the client waits for; 0 for an empty blob) and what follows it.
    pub fn new(
        node: NodeId,
        blob: Digest,
        layout: ChunkLayout,
        max_chunks: u32,
        from: u32,
    ) -> Result<Self, TrackerError> {
        if max_chunks == 0 {
            return Err(TrackerError::ZeroLease);
        }
        let count = layout.count();
        if from >= count.max(1) {
            return Err(TrackerError::ChunkOutOfRange { index: from, count });
        }
        Ok(LeaseRequest {
            node,
            blob,
            layout,
            max_chunks,
            from,
            rtt_ms: None,
        })
    }

    /// The same, saying the member's round trip to the tracker (ms).
    pub fn with_rtt_ms(mut self, rtt_ms: Option<u32>) -> Self {
        self.rtt_ms = rtt_ms;
        self
    }

    /// The same, its round trip at least `queued_ms`: what a tracker server
    /// saw the request wait in its queue (before the member can have
    /// measured it, at a cold start, a burst of requests may queue long).
    pub fn waited(mut self, queued_ms: u64) -> Self {
        let queued = u32::try_from(queued_ms).unwrap_or(u32::MAX);
        if queued > 0 {
            self.rtt_ms = Some(self.rtt_ms.unwrap_or(0).max(queued));
        }
        self
    }

    /// The member's round trip to the tracker, if said.
    pub fn rtt_ms(&self) -> Option<u32> {
        self.rtt_ms
    }

    /// The requesting node.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// The blob.
    pub fn blob(&self) -> &Digest {
        &self.blob
    }

    /// The layout the node uses for it.
    pub fn layout(&self) -> ChunkLayout {
        self.layout
    }

    /// The most chunks wanted.
    pub fn max_chunks(&self) -> u32 {
        self.max_chunks
    }

    /// The chunk the client waits for.
    pub fn from(&self) -> u32 {
        self.from
    }
}

/// Chunks the node may fetch from the origin, until `expires_ms`; renewed by
/// asking again before then. Empty when every chunk is held or leased.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseGrant {
    /// The chunks, the node's renewed leases first, then new ones in order.
    pub chunks: Vec<u32>,
    /// When the lease ends (tracker time).
    pub expires_ms: u64,
}

// ---------------------------------------------------------------------------
// Chunk hashes
// ---------------------------------------------------------------------------

/// "These are the hashes of chunks I fetched from the origin under my lease."
/// JSON: `{"node", "blob", "hashes": [[index, "hex"], …], "fetch_ms"?}`.
/// `fetch_ms` (optional; older members send none) is how long, on average,
/// the chunks took from the lease's grant reaching the member to the chunk
/// verified: the part of a lease's life spent at the origin. The tracker
/// compares it with the whole life it saw, grant to publish, to size the
/// leases out at once (`max_blob_lease_bytes` of the tracker's config).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "RawPublishHashes")]
pub struct PublishHashes {
    node: NodeId,
    blob: Digest,
    hashes: Vec<(u32, ChunkHash)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fetch_ms: Option<u32>,
}

#[derive(serde::Deserialize)]
struct RawPublishHashes {
    node: NodeId,
    blob: Digest,
    hashes: Vec<(u32, ChunkHash)>,
    #[serde(default)]
    fetch_ms: Option<u32>,
}

impl TryFrom<RawPublishHashes> for PublishHashes {
    type Error = TrackerError;

    fn try_from(r: RawPublishHashes) -> Result<Self, TrackerError> {
        Ok(PublishHashes::new(r.node, r.blob, r.hashes)?.with_fetch_ms(r.fetch_ms))
    }
}

impl PublishHashes {
    /// At most [`MAX_PUBLISH_HASHES`] hashes, no chunk twice.
    pub fn new(
        node: NodeId,
        blob: Digest,
        hashes: Vec<(u32, ChunkHash)>,
    ) -> Result<Self, TrackerError> {
        if hashes.len() > MAX_PUBLISH_HASHES {
            return Err(TrackerError::TooMany {
                what: "hashes in one publish",
                limit: MAX_PUBLISH_HASHES,
            });
        }
        let mut idx: Vec<u32> = hashes.iter().map(|(i, _)| *i).collect();
        idx.sort_unstable();
        if let Some(w) = idx.windows(2).find(|w| w[0] == w[1]) {
            return Err(TrackerError::DuplicateChunk(w[0]));
        }
        Ok(PublishHashes {
            node,
            blob,
            hashes,
            fetch_ms: None,
        })
    }

    /// The same, saying how long its chunks took at the origin on average
    /// (grant received to chunk verified, ms).
    pub fn with_fetch_ms(mut self, fetch_ms: Option<u32>) -> Self {
        self.fetch_ms = fetch_ms;
        self
    }

    /// How long the chunks took at the origin on average, if said.
    pub fn fetch_ms(&self) -> Option<u32> {
        self.fetch_ms
    }

    /// The publishing node.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// The blob.
    pub fn blob(&self) -> &Digest {
        &self.blob
    }

    /// `(chunk index, hash)` pairs.
    pub fn hashes(&self) -> &[(u32, ChunkHash)] {
        &self.hashes
    }
}

/// Why one published hash was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishRejection {
    /// The chunk index is past the blob's last chunk.
    OutOfRange,
    /// The publisher neither holds nor last held the chunk's lease.
    NotLeaseHolder,
    /// The chunk already has a different hash (counted against the publisher).
    Conflict,
}

/// The outcome of a publish, hash by hash.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PublishReply {
    /// How many hashes were accepted (including ones already known).
    pub accepted: u32,
    /// The refused ones and why.
    pub rejected: Vec<(u32, PublishRejection)>,
}

// ---------------------------------------------------------------------------
// Reports
// ---------------------------------------------------------------------------

/// Evidence of bad data, from the member that found it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", try_from = "RawReport")]
pub enum Report {
    /// `peer` sent bytes for `chunk` that did not match its published hash.
    BadChunk {
        /// The reporter.
        node: NodeId,
        /// The blob.
        blob: Digest,
        /// The peer that sent the bad bytes.
        peer: NodeId,
        /// The chunk.
        chunk: u32,
    },
    /// `peer` let requests for `blob` stall again and again (it is dead,
    /// hung or unreachable from here). Enough distinct reporters make the
    /// tracker forget it unless its next announce comes in time (within an
    /// interval and a half of its last one),
    /// so a dead holder's chunks become leasable to one live member instead
    /// of every member waiting on it (or all fetching them from the origin).
    Unresponsive {
        /// The reporter.
        node: NodeId,
        /// The blob the stalled requests were for.
        blob: Digest,
        /// The peer that stopped answering.
        peer: NodeId,
    },
    /// Every chunk matched its published hash, yet the whole blob did not
    /// match its digest: some published hash of `epoch` is wrong.
    DigestMismatch {
        /// The reporter.
        node: NodeId,
        /// The blob.
        blob: Digest,
        /// The [`BlobView::epoch`] of the hashes the reporter verified with.
        epoch: u64,
    },
}

#[derive(serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum RawReport {
    BadChunk {
        node: NodeId,
        blob: Digest,
        peer: NodeId,
        chunk: u32,
    },
    Unresponsive {
        node: NodeId,
        blob: Digest,
        peer: NodeId,
    },
    DigestMismatch {
        node: NodeId,
        blob: Digest,
        epoch: u64,
    },
}

impl TryFrom<RawReport> for Report {
    type Error = TrackerError;

    fn try_from(r: RawReport) -> Result<Self, TrackerError> {
        let report = match r {
            RawReport::BadChunk {
                node,
                blob,
                peer,
                chunk,
            } => Report::BadChunk {
                node,
                blob,
                peer,
                chunk,
            },
            RawReport::Unresponsive { node, blob, peer } => {
                Report::Unresponsive { node, blob, peer }
            }
            RawReport::DigestMismatch { node, blob, epoch } => {
                Report::DigestMismatch { node, blob, epoch }
            }
        };
        report.validate()?;
        Ok(report)
    }
}

impl Report {
    /// Checks what the type cannot express: a node never reports itself.
    pub fn validate(&self) -> Result<(), TrackerError> {
        match self {
            Report::BadChunk { node, peer, .. } | Report::Unresponsive { node, peer, .. }
                if node == peer =>
            {
                Err(TrackerError::SelfReport)
            }
            _ => Ok(()),
        }
    }

    /// The reporting node.
    pub fn node(&self) -> &NodeId {
        match self {
            Report::BadChunk { node, .. }
            | Report::Unresponsive { node, .. }
            | Report::DigestMismatch { node, .. } => node,
        }
    }

    /// The blob concerned.
    pub fn blob(&self) -> &Digest {
        match self {
            Report::BadChunk { blob, .. }
            | Report::Unresponsive { blob, .. }
            | Report::DigestMismatch { blob, .. } => blob,
        }
    }
}

/// What a report led to.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReportReply {
    /// Nodes excluded as a result (their hashes withdrawn).
    pub excluded: Vec<NodeId>,
    /// Nodes whose membership now ends unless their next announce comes in
    /// time (reported unresponsive).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub suspected: Vec<NodeId>,
    /// Chunk hashes withdrawn as a result.
    pub withdrawn: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn d(n: u8) -> Digest {
        Digest::of(&[n])
    }

    fn node(s: &str) -> NodeId {
        s.parse().unwrap()
    }

    #[test]
    fn node_ids() {
        for ok in ["a", "node-1.example_x", &"x".repeat(64)] {
            assert_eq!(ok.parse::<NodeId>().unwrap().as_str(), ok);
        }
        for bad in ["", "a b", "ä", "a/b", &"x".repeat(65)] {
            assert!(
                matches!(bad.parse::<NodeId>(), Err(TrackerError::BadNodeId(_))),
                "{bad}"
            );
        }
        let long = "y".repeat(1000);
        let err = long.parse::<NodeId>().unwrap_err().to_string();
        assert!(err.len() < 200, "{err}");
        assert!(serde_json::from_value::<NodeId>(json!("bad id")).is_err());
        assert_eq!(serde_json::to_value(node("n1")).unwrap(), json!("n1"));
    }

    #[test]
    fn racks_parse_and_ride_in_announces() {
        assert_eq!("us-east-1a".parse::<Rack>().unwrap().as_str(), "us-east-1a");
        for bad in ["", "rack 1", "a/b", &"r".repeat(65)] {
            let err = bad.parse::<Rack>().unwrap_err();
            assert!(matches!(err, TrackerError::BadRack(_)), "{bad}");
            assert!(err.to_string().starts_with("rack "), "{err}");
        }
        let addr: PeerAddr = "10.0.0.1:4901".parse().unwrap();
        let a = Announce::new(node("n1"), addr, vec![], vec![], false).unwrap();
        let j = serde_json::to_value(&a).unwrap();
        assert!(j.get("rack").is_none(), "no rack, no field: {j}");
        let a = a.with_rack(Some("rack-7".parse().unwrap()));
        let j = serde_json::to_value(&a).unwrap();
        assert_eq!(j["rack"], json!("rack-7"));
        assert_eq!(serde_json::from_value::<Announce>(j.clone()).unwrap(), a);
        let mut bad = j;
        bad["rack"] = json!("rack 7");
        let err = serde_json::from_value::<Announce>(bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("rack \"rack 7\" is not"), "{err}");
    }

    #[test]
    fn the_next_announce_promise_rides_in_announces_and_is_never_zero() {
        let addr: PeerAddr = "10.0.0.1:4901".parse().unwrap();
        let a = Announce::new(node("n1"), addr, vec![], vec![], false).unwrap();
        let j = serde_json::to_value(&a).unwrap();
        assert!(j.get("next_ms").is_none(), "no promise, no field: {j}");
        let a = a.with_next_ms(NonZeroU32::new(1_000));
        let j = serde_json::to_value(&a).unwrap();
        assert_eq!(j["next_ms"], json!(1_000));
        assert_eq!(serde_json::from_value::<Announce>(j.clone()).unwrap(), a);
        for bad in [json!(0), json!(-1), json!(5_000_000_000u64), json!("1s")] {
            let mut j = j.clone();
            j["next_ms"] = bad.clone();
            let err = serde_json::from_value::<Announce>(j).unwrap_err();
            assert!(
                err.to_string().contains("expected a nonzero u32"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn peer_addrs() {
        for ok in [
            "10.0.0.1:4901",
            "[::1]:4901",
            "node-1.cluster.local:4901",
            "h:1",
        ] {
            assert_eq!(ok.parse::<PeerAddr>().unwrap().as_str(), ok);
        }
        for bad in [
            "10.0.0.1",
            "10.0.0.1:0",
            "h:65536",
            ":4901",
            "a b:1",
            "-h:1",
            "h..x:1",
            "::1:4901",
            "h:x",
        ] {
            assert!(
                matches!(bad.parse::<PeerAddr>(), Err(TrackerError::BadAddr { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn chunk_hash_hex() {
        let h = ChunkHash::of(b"abc");
        let s = serde_json::to_value(h).unwrap();
        assert_eq!(
            s,
            json!("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        assert_eq!(serde_json::from_value::<ChunkHash>(s).unwrap(), h);
        let upper = "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD";
        assert!(upper.parse::<ChunkHash>().is_err());
        assert!("abc".parse::<ChunkHash>().is_err());
        assert!(format!("{:z<64}", "g").parse::<ChunkHash>().is_err());
    }

    #[test]
    fn blob_have_validation() {
        let layout = ChunkLayout::new(3 << 20, 1 << 20).unwrap();
        let mut have = Bitfield::new(3).unwrap();
        have.set(1).unwrap();
        let bh = BlobHave::new(d(1), layout, have.clone(), false).unwrap();
        let v = serde_json::to_value(&bh).unwrap();
        assert_eq!(v["size"], json!(3 << 20));
        assert_eq!(v["chunk_size"], json!(1 << 20));
        assert_eq!(serde_json::from_value::<BlobHave>(v.clone()).unwrap(), bh);

        assert_eq!(
            BlobHave::new(d(1), layout, have.clone(), true),
            Err(TrackerError::NotFull { blob: d(1) })
        );
        assert_eq!(
            BlobHave::new(d(1), layout, Bitfield::new(4).unwrap(), false),
            Err(TrackerError::BadBitfield {
                blob: d(1),
                expected: 3,
                actual: 4
            })
        );
        let mut wrong = v.clone();
        wrong["size"] = json!(5 << 20);
        let err = serde_json::from_value::<BlobHave>(wrong)
            .unwrap_err()
            .to_string();
        assert!(err.contains("covers 3 chunks, the blob has 5"), "{err}");
        let mut wrong = v;
        wrong["chunk_size"] = json!(1000);
        assert!(serde_json::from_value::<BlobHave>(wrong).is_err());
        assert!(BlobHave::complete(d(1), layout).have().is_full());
    }

    #[test]
    fn hash_cursors_round_trip_and_bad_ones_are_refused() {
        let c = HashCursor { epoch: 17, seq: 4 };
        assert_eq!(c.to_string(), "17.4");
        assert_eq!("17.4".parse::<HashCursor>(), Ok(c));
        for bad in [
            "",
            "17",
            "17.",
            ".4",
            "1.2.3",
            "-1.2",
            "1.+2",
            "a.b",
            "99999999999999999999999.1",
        ] {
            let e = bad.parse::<HashCursor>().unwrap_err();
            assert!(e.contains("EPOCH.SEQ"), "{bad}: {e}");
        }
    }

    #[test]
    fn announce_validation() {
        let layout = ChunkLayout::new(10, 1 << 20).unwrap();
        let addr: PeerAddr = "10.0.0.1:4901".parse().unwrap();
        let a = Announce::new(
            node("n1"),
            addr.clone(),
            vec![BlobHave::complete(d(1), layout)],
            vec![d(2)],
            true,
        )
        .unwrap();
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(serde_json::from_value::<Announce>(v).unwrap(), a);
        let minimal = json!({"node": "n1", "addr": "10.0.0.1:4901"});
        let m: Announce = serde_json::from_value(minimal).unwrap();
        assert!(m.blobs().is_empty() && !m.is_full());
        assert_eq!(
            Announce::new(
                node("n1"),
                addr.clone(),
                vec![BlobHave::complete(d(1), layout)],
                vec![d(1)],
                false
            ),
            Err(TrackerError::DuplicateBlob(d(1)))
        );
        let too_many = vec![d(1); MAX_ANNOUNCE_BLOBS + 1];
        assert!(matches!(
            Announce::new(node("n1"), addr, vec![], too_many, false),
            Err(TrackerError::TooMany { .. })
        ));
        let bad = json!({"node": "n 1", "addr": "10.0.0.1:4901"});
        assert!(serde_json::from_value::<Announce>(bad).is_err());
    }

    #[test]
    fn lease_request_validation() {
        let layout = ChunkLayout::new(3 << 20, 1 << 20).unwrap();
        let r = LeaseRequest::new(node("n1"), d(1), layout, 4, 2).unwrap();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["from"], json!(2));
        assert!(
            v.get("rtt_ms").is_none(),
            "older trackers see what they know"
        );
        assert_eq!(serde_json::from_value::<LeaseRequest>(v).unwrap(), r);
        let timed = r.clone().with_rtt_ms(Some(250));
        let v = serde_json::to_value(&timed).unwrap();
        assert_eq!(v["rtt_ms"], json!(250));
        assert_eq!(serde_json::from_value::<LeaseRequest>(v).unwrap(), timed);
        assert_eq!(timed.clone().waited(100).rtt_ms(), Some(250));
        assert_eq!(timed.waited(400).rtt_ms(), Some(400));
        assert_eq!(r.clone().waited(0).rtt_ms(), None);
        assert_eq!(r.waited(7).rtt_ms(), Some(7));
        assert_eq!(
            LeaseRequest::new(node("n1"), d(1), layout, 4, 3),
            Err(TrackerError::ChunkOutOfRange { index: 3, count: 3 })
        );
        assert_eq!(
            LeaseRequest::new(node("n1"), d(1), layout, 0, 0),
            Err(TrackerError::ZeroLease)
        );
        let empty = ChunkLayout::new(0, 1 << 20).unwrap();
        assert!(LeaseRequest::new(node("n1"), d(1), empty, 1, 0).is_ok());
    }

    #[test]
    fn publish_validation() {
        let h = ChunkHash::of(b"x");
        let p = PublishHashes::new(node("n1"), d(1), vec![(0, h), (2, h)]).unwrap();
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["hashes"][1][0], json!(2));
        assert!(
            v.get("fetch_ms").is_none(),
            "older trackers see what they know"
        );
        assert_eq!(serde_json::from_value::<PublishHashes>(v).unwrap(), p);
        let timed = p.clone().with_fetch_ms(Some(12));
        let v = serde_json::to_value(&timed).unwrap();
        assert_eq!(v["fetch_ms"], json!(12));
        assert_eq!(serde_json::from_value::<PublishHashes>(v).unwrap(), timed);
        let bad = json!({"node": "n1", "blob": d(1), "hashes": [], "fetch_ms": -1});
        assert!(serde_json::from_value::<PublishHashes>(bad).is_err());
        assert_eq!(
            PublishHashes::new(node("n1"), d(1), vec![(2, h), (0, h), (2, h)]),
            Err(TrackerError::DuplicateChunk(2))
        );
        let reply = PublishReply {
            accepted: 1,
            rejected: vec![(3, PublishRejection::Conflict)],
        };
        assert_eq!(
            serde_json::to_value(&reply).unwrap(),
            json!({"accepted": 1, "rejected": [[3, "conflict"]]})
        );
    }

    #[test]
    fn report_validation() {
        let r = Report::BadChunk {
            node: node("a"),
            blob: d(1),
            peer: node("b"),
            chunk: 3,
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["kind"], json!("bad_chunk"));
        assert_eq!(serde_json::from_value::<Report>(v.clone()).unwrap(), r);
        let mut own = v;
        own["peer"] = json!("a");
        let err = serde_json::from_value::<Report>(own)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot report itself"), "{err}");
        let dm = json!({"kind": "digest_mismatch", "node": "a", "blob": d(1), "epoch": 7});
        assert_eq!(
            serde_json::from_value::<Report>(dm).unwrap(),
            Report::DigestMismatch {
                node: node("a"),
                blob: d(1),
                epoch: 7
            }
        );
    }

    #[test]
    fn view_validation() {
        let layout = ChunkLayout::new(2 << 20, 1 << 20).unwrap();
        let holder = Holder {
            node: node("a"),
            addr: "h:1".parse().unwrap(),
            have: Bitfield::full(2).unwrap(),
            complete: true,
            near: false,
        };
        let leased = Bitfield::new(2).unwrap();
        let v = BlobView::new(
            d(1),
            layout,
            1,
            vec![Some(ChunkHash::of(b"x")), None],
            vec![holder.clone()],
            leased.clone(),
        )
        .unwrap();
        let j = serde_json::to_value(&v).unwrap();
        assert_eq!(serde_json::from_value::<BlobView>(j.clone()).unwrap(), v);
        let mut short = j.clone();
        short["hashes"] = json!([null]);
        assert!(serde_json::from_value::<BlobView>(short).is_err());
        // A view without `served` (an older tracker's) reads as None; one
        // with it round-trips, and a wrong length is refused.
        assert!(j.get("served").is_none());
        assert_eq!(
            serde_json::from_value::<BlobView>(j.clone())
                .unwrap()
                .served(),
            None
        );
        let served = Bitfield::full(2).unwrap();
        let v2 = v.clone().with_served(served.clone()).unwrap();
        let j2 = serde_json::to_value(&v2).unwrap();
        let back = serde_json::from_value::<BlobView>(j2.clone()).unwrap();
        assert_eq!(back.served(), Some(&served));
        assert!(v.clone().with_served(Bitfield::new(3).unwrap()).is_err());
        let mut long = j2;
        long["served"] = serde_json::to_value(Bitfield::new(9).unwrap()).unwrap();
        let err = serde_json::from_value::<BlobView>(long)
            .unwrap_err()
            .to_string();
        assert!(err.contains("served bitfield length"), "{err}");
        let mut h = holder;
        h.have = Bitfield::new(2).unwrap();
        assert!(BlobView::new(d(1), layout, 1, vec![None, None], vec![h], leased).is_err());
    }

    #[test]
    fn error_codes() {
        assert_eq!(TrackerError::UnknownBlob(d(1)).code(), "unknown_blob");
        assert_eq!(TrackerError::ZeroLease.code(), "bad_request");
        assert_eq!(TrackerError::NotAMember(node("a")).code(), "not_a_member");
    }
}
