//! The peer wire protocol (ALPN `shoal/1`): frames and a sans-IO codec.
//!
//! Peers talk over QUIC, mutually authenticated, with **one bidirectional
//! stream per request**. The client writes one request frame and finishes its
//! send side; the server answers on the same stream and then finishes it:
//!
//! - [`Request::GetChunks`] → for each requested index, in request order,
//!   exactly one [`Response::Chunk`] or [`Response::DontHave`]. An
//!   [`Response::Error`] may come instead of any of them and ends the answer.
//! - [`Request::GetBitfield`] → one [`Response::Bitfield`], or
//!   [`Response::DontHave`] with index 0 when the server holds nothing of the
//!   blob (and may not even know its size), or one [`Response::Error`].
//! - [`Request::Watch`] → a `Bitfield` now and again each time the server's
//!   holdings of the blob grew (coalesced: each frame is the whole current
//!   bitfield, so a slow reader skips states, never loses chunks), until the
//!   server holds it all (its last frame is full) or stops watching;
//!   `DontHave{0}` or an `Error` (`Busy`: too many watchers) instead ends it.
//!   A member watches the peers it downloads from, so it learns of their new
//!   chunks within a round trip instead of a tracker lookup interval.
//! - [`Request::GetState`] → one [`Response::State`] (the blob's size, what
//!   the server holds, and the chunk hashes it vouches for: all of them once
//!   the blob is complete and its digest checked, else those it fetched from
//!   the origin itself), `DontHave{0}` when it holds nothing, or an `Error`.
//!   Members ask this of each other when no tracker answers (DHT mode), in
//!   place of the tracker's lookup.
//!
//! A `Busy` error's message may start with `retry in N ms: ` — when the
//! server expects an upload slot for this requester ([`busy_message`],
//! [`busy_retry_ms`], the turns of [`crate::slots`]). A peer that does not
//! know the convention shows it as text; one that finds no such prefix
//! guesses its own back-off.
//!
//! `DontHave` means "lacks data" and is not an error: a client scores a peer
//! that lacks data differently from one that sends bad data. Chunk data is
//! never trusted here: the client checks each chunk's index against what it
//! asked for and its bytes with [`ChunkHashes::verify`].
//!
//! # Frames
//!
//! A frame is `tag: u8`, `len: u32` (big-endian) and `len` bytes of payload.
//! Tags `0x00..=0x3f` are requests, `0x40..=0x7f` responses, `0x80..=0xff`
//! reserved; an unassigned tag is an error ([`WireError::UnknownTag`]), so a
//! new frame kind needs a new ALPN or a request the old side never sends.
//! Every integer is big-endian; a digest is its 32 raw bytes.
//!
//! | tag | frame | payload |
//! | --- | --- | --- |
//! | `0x01` | `GetChunks` | blob `[32]`, chunk_size `u32`, 1..=64 strictly increasing indices `u32` |
//! | `0x02` | `GetBitfield` | blob `[32]` |
//! | `0x03` | `Watch` | blob `[32]` |
//! | `0x04` | `GetState` | blob `[32]` |
//! | `0x40` | `Chunk` | index `u32`, data (≤ [`MAX_CHUNK_SIZE`]) |
//! | `0x41` | `DontHave` | index `u32` |
//! | `0x42` | `Bitfield` | blob `[32]`, chunk_size `u32`, len `u32`, bits `[ceil(len/8)]` ([`Bitfield::to_bytes`]) |
//! | `0x43` | `Error` | code `u16` ([`ErrorKind`]), message UTF-8 (≤ 512 bytes) |
//! | `0x44` | `State` | blob `[32]`, size `u64`, chunk_size `u32`, len `u32`, have bits, vouched bits, fetching bits (each `[ceil(len/8)]`), one hash `[32]` per vouched chunk (≤ [`MAX_STATE_HASHES`]) |
//!
//! Each tag has an exact payload bound, checked as soon as the 5 header bytes
//! arrive, before any payload is buffered: control frames stay far below
//! [`MAX_CONTROL_PAYLOAD`], chunk frames below [`MAX_CHUNK_PAYLOAD`], bitfield
//! frames below [`MAX_BITFIELD_PAYLOAD`].
//!
//! # Decoding
//!
//! [`Decoder::push`] takes at most the rest of the current frame, so the
//! decoder never holds more than one frame ([`MAX_FRAME_LEN`] bytes); the
//! caller keeps what was not taken and pushes it after taking the frame:
//!
//! ```
//! use bytes::BytesMut;
//! use shoal_proto::wire::{Response, ResponseDecoder};
//!
//! let mut wire = BytesMut::new();
//! Response::DontHave { index: 3 }.encode(&mut wire)?;
//! Response::DontHave { index: 4 }.encode(&mut wire)?;
//!
//! let mut dec = ResponseDecoder::new();
//! let mut input: &[u8] = &wire; // what one read from the stream returned
//! let mut got = Vec::new();
//! loop {
//!     while let Some(frame) = dec.next_response()? {
//!         got.push(frame);
//!     }
//!     if input.is_empty() {
//!         break; // read more from the stream; at its end, call `dec.finish()`
//!     }
//!     let n = dec.push(input);
//!     input = &input[n..];
//! }
//! dec.finish()?;
//! assert_eq!(got.len(), 2);
//! # Ok::<(), shoal_proto::wire::WireError>(())
//! ```
//!
//! [`ChunkHashes::verify`]: crate::chunk::ChunkHashes::verify

use std::fmt;
use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::chunk::{is_valid_chunk_size, Bitfield, ChunkError, MAX_CHUNKS, MAX_CHUNK_SIZE};
use crate::digest::Digest;

/// The QUIC ALPN of this protocol version.
pub const ALPN: &[u8] = b"shoal/1";
/// Bytes of a frame header: tag and payload length.
pub const HEADER_LEN: usize = 5;
/// Bytes of a chunk frame before its data (see [`encode_chunk_header`]).
pub const CHUNK_HEADER_LEN: usize = HEADER_LEN + 4;
/// Ceiling of the payload of every control frame (requests, `DontHave`,
/// `Error`); each has a much smaller exact bound.
pub const MAX_CONTROL_PAYLOAD: u32 = 64 << 10;
/// Largest payload of a `Chunk` frame: index and a chunk of at most
/// [`MAX_CHUNK_SIZE`].
pub const MAX_CHUNK_PAYLOAD: u32 = 4 + MAX_CHUNK_SIZE;
/// Largest payload of a `Bitfield` frame: a bitfield of [`MAX_CHUNKS`] is
/// 128 KiB, over [`MAX_CONTROL_PAYLOAD`], so it has its own bound.
pub const MAX_BITFIELD_PAYLOAD: u32 = BITFIELD_FIXED + MAX_CHUNKS / 8;
/// Most chunk hashes one `State` frame vouches for (a holder of a blob with
/// more chunks vouches for the first ones only; peers fetch the rest from
/// the origin).
pub const MAX_STATE_HASHES: u32 = 1 << 16;
/// Largest `State` payload.
pub const MAX_STATE_PAYLOAD: u32 = STATE_FIXED + 3 * (MAX_CHUNKS / 8) + 32 * MAX_STATE_HASHES;
/// Largest frame, header included: the most a [`Decoder`] ever holds.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_CHUNK_PAYLOAD as usize;
/// Most chunk indices in one `GetChunks`.
pub const MAX_INDICES: usize = 64;
/// Longest `Error` message, in bytes.
pub const MAX_ERROR_MESSAGE: usize = 512;
/// Least time between two `Bitfield` frames of one watch: chunks stored
/// meanwhile share a frame.
pub const WATCH_FRAME_GAP_MS: u64 = 10;
/// Watchers a server takes per blob by default; more get `Error{Busy}`.
pub const WATCHERS_PER_BLOB: usize = 64;

const GET_CHUNKS_FIXED: u32 = 32 + 4;
const BITFIELD_FIXED: u32 = 32 + 4 + 4;
const ERROR_FIXED: u32 = 2;
const STATE_FIXED: u32 = 32 + 8 + 4 + 4;
const _: () = assert!(MAX_STATE_PAYLOAD <= MAX_CHUNK_PAYLOAD);

const _: () = assert!(GET_CHUNKS_FIXED + 4 * MAX_INDICES as u32 <= MAX_CONTROL_PAYLOAD);
const _: () = assert!(ERROR_FIXED + MAX_ERROR_MESSAGE as u32 <= MAX_CONTROL_PAYLOAD);
const _: () = assert!(MAX_BITFIELD_PAYLOAD <= MAX_CHUNK_PAYLOAD);

/// Frame tags.
mod tag {
    pub(super) const GET_CHUNKS: u8 = 0x01;
    pub(super) const GET_BITFIELD: u8 = 0x02;
    pub(super) const WATCH: u8 = 0x03;
    pub(super) const GET_STATE: u8 = 0x04;
    pub(super) const CHUNK: u8 = 0x40;
    pub(super) const DONT_HAVE: u8 = 0x41;
    pub(super) const BITFIELD: u8 = 0x42;
    pub(super) const ERROR: u8 = 0x43;
    pub(super) const STATE: u8 = 0x44;
}

fn tag_name(tag: u8) -> &'static str {
    match tag {
        tag::GET_CHUNKS => "GetChunks",
        tag::GET_BITFIELD => "GetBitfield",
        tag::WATCH => "Watch",
        tag::CHUNK => "Chunk",
        tag::DONT_HAVE => "DontHave",
        tag::BITFIELD => "Bitfield",
        tag::ERROR => "Error",
        _ if tag < 0x40 => "request",
        _ if tag < 0x80 => "response",
        _ => "reserved",
    }
}

/// Why bytes are not a valid frame, or a frame cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The tag is not one this version knows.
    #[error("unknown {kind} frame tag 0x{0:02x}", kind = tag_name(*.0))]
    UnknownTag(u8),
    /// A request arrived where a response was expected, or the reverse.
    #[error("got a {} frame (tag 0x{tag:02x}) where a {expected} was expected", tag_name(*.tag))]
    UnexpectedFrame {
        /// The frame's tag.
        tag: u8,
        /// `"request"` or `"response"`.
        expected: &'static str,
    },
    /// The payload is longer than the frame kind allows.
    #[error(
        "{} frame (tag 0x{tag:02x}) has a {len}-byte payload, over its limit of {max}",
        tag_name(*.tag)
    )]
    Oversize {
        /// The frame's tag.
        tag: u8,
        /// The payload length declared (or, encoding, needed).
        len: u64,
        /// The limit for this frame kind.
        max: u32,
    },
    /// The payload is shorter than the frame kind's fixed fields.
    #[error(
        "{} frame (tag 0x{tag:02x}) has a {len}-byte payload, under its minimum of {min}",
        tag_name(*.tag)
    )]
    Undersize {
        /// The frame's tag.
        tag: u8,
        /// The payload length declared.
        len: u32,
        /// The minimum for this frame kind.
        min: u32,
    },
    /// The payload's structure is wrong in some other way.
    #[error("malformed {} frame (tag 0x{tag:02x}): {what}", tag_name(*.tag))]
    Malformed {
        /// The frame's tag.
        tag: u8,
        /// What is wrong.
        what: &'static str,
    },
    /// A `GetChunks` asks for no chunk.
    #[error("GetChunks asks for no chunks (1 to {MAX_INDICES} allowed)")]
    NoIndices,
    /// A `GetChunks` asks for more than [`MAX_INDICES`] chunks.
    #[error("GetChunks asks for {0} chunks, more than the limit of {MAX_INDICES}")]
    TooManyIndices(u64),
    /// `GetChunks` indices are not strictly increasing.
    #[error("GetChunks indices must be strictly increasing, got {next} after {prev}")]
    IndicesNotIncreasing {
        /// The earlier index.
        prev: u32,
        /// The index that follows it.
        next: u32,
    },
    /// A chunk index no blob can have (at or over [`MAX_CHUNKS`]).
    #[error("chunk index {0} is beyond the limit of {MAX_CHUNKS} chunks")]
    IndexOutOfRange(u32),
    /// A chunk size that [`is_valid_chunk_size`] rejects.
    #[error(transparent)]
    BadChunkSize(ChunkError),
    /// A `Bitfield` frame's bits do not fit its length.
    #[error("bad bitfield: {0}")]
    BadBitfield(ChunkError),
    /// An `Error` message is not UTF-8.
    #[error("error message is not valid UTF-8")]
    BadUtf8,
    /// An `Error` message is longer than [`MAX_ERROR_MESSAGE`].
    #[error("error message of {0} bytes exceeds the limit of {MAX_ERROR_MESSAGE}")]
    MessageTooLong(usize),
    /// The stream ended inside a frame.
    #[error("the stream ended inside a frame: {received} of {needed} bytes received")]
    Truncated {
        /// Bytes of the frame received.
        received: u64,
        /// Bytes of the frame needed (header only, while it is incomplete).
        needed: u64,
    },
}

/// Why a server refuses a request (the `code` of an `Error` frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The server is overloaded; try another peer or later (code 1).
    Busy,
    /// The client is not an authorized member of the cluster (code 2).
    NotAMember,
    /// The request is malformed or inconsistent, e.g. a chunk size that does
    /// not match the server's layout of the blob (code 3).
    BadRequest,
    /// The server failed internally, e.g. a disk read error (code 4).
    Internal,
    /// A code this version does not know (0, or 5 and above), kept as is.
    Unknown(u16),
}

impl ErrorKind {
    /// The code on the wire.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorKind::Busy => 1,
            ErrorKind::NotAMember => 2,
            ErrorKind::BadRequest => 3,
            ErrorKind::Internal => 4,
            ErrorKind::Unknown(code) => code,
        }
    }

    /// The kind for a wire code; known codes never come back as `Unknown`.
    pub fn from_u16(code: u16) -> Self {
        match code {
            1 => ErrorKind::Busy,
            2 => ErrorKind::NotAMember,
            3 => ErrorKind::BadRequest,
            4 => ErrorKind::Internal,
            code => ErrorKind::Unknown(code),
        }
    }
}

/// A request, the first and only frame a client sends on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Asks for chunks of a blob laid out with `chunk_size`.
    GetChunks {
        /// The blob.
        blob: Digest,
        /// The chunk size the client's layout uses; a server whose layout of
        /// the blob differs answers [`ErrorKind::BadRequest`].
        chunk_size: u32,
        /// 1 to [`MAX_INDICES`] chunk indices, strictly increasing.
        indices: Vec<u32>,
    },
    /// Asks which chunks of a blob the server holds.
    GetBitfield {
        /// The blob.
        blob: Digest,
    },
    /// Asks for the server's bitfield of a blob now and whenever it grows.
    Watch {
        /// The blob.
        blob: Digest,
    },
    /// Asks for the blob's size, the server's holdings and the chunk hashes
    /// it vouches for.
    GetState {
        /// The blob.
        blob: Digest,
    },
}

/// A response frame; a server sends one or more on the request's stream.
#[derive(Clone, PartialEq, Eq)]
pub enum Response {
    /// One requested chunk (unverified until the client checks it).
    Chunk {
        /// The chunk index.
        index: u32,
        /// The chunk's bytes.
        data: Bytes,
    },
    /// The server lacks this chunk (or, answering `GetBitfield`, the blob).
    DontHave {
        /// The chunk index (0 when answering `GetBitfield`).
        index: u32,
    },
    /// The chunks of `blob` the server holds.
    Bitfield {
        /// The blob.
        blob: Digest,
        /// The chunk size the bits refer to.
        chunk_size: u32,
        /// One bit per chunk of the server's layout.
        bits: Bitfield,
    },
    /// The server refuses or fails the request; nothing follows.
    Error {
        /// Why.
        code: ErrorKind,
        /// A human-readable message, at most [`MAX_ERROR_MESSAGE`] bytes.
        message: String,
    },
    /// What the server holds of a blob and the chunk hashes it vouches for.
    State(BlobState),
}

/// The answer to [`Request::GetState`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobState {
    /// The blob.
    pub blob: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// The chunk size of the server's layout.
    pub chunk_size: u32,
    /// The chunks the server holds (verified).
    pub have: Bitfield,
    /// The chunks whose hash the server vouches for (a subset of `have`):
    /// every chunk of a complete blob, else those it fetched from the
    /// origin and hashed itself; at most [`MAX_STATE_HASHES`].
    pub vouched: Bitfield,
    /// One hash per vouched chunk, in index order.
    pub hashes: Vec<[u8; 32]>,
    /// Chunks the server is fetching from the origin now (none of them
    /// held), so members splitting origin fetches leave them to it.
    pub fetching: Bitfield,
}

impl BlobState {
    /// The layout the state describes.
    pub fn layout(&self) -> Result<crate::ChunkLayout, ChunkError> {
        crate::ChunkLayout::new(self.size, self.chunk_size)
    }

    /// The vouched hashes with their chunk indices.
    pub fn vouched_hashes(&self) -> impl Iterator<Item = (u32, &[u8; 32])> + '_ {
        self.vouched.iter_ones().zip(&self.hashes)
    }

    /// The rules a `State` keeps, checked by encoder and decoder alike.
    fn validate(&self) -> Result<(), WireError> {
        check_chunk_size(self.chunk_size)?;
        let layout = self.layout().map_err(WireError::BadBitfield)?;
        let malformed = |what| WireError::Malformed {
            tag: tag::STATE,
            what,
        };
        if self.have.len() != layout.count()
            || self.vouched.len() != layout.count()
            || self.fetching.len() != layout.count()
        {
            return Err(malformed(
                "bitfield length differs from the layout's chunk count",
            ));
        }
        if self.vouched.has_any_outside(&self.have, &self.have) {
            return Err(malformed("a vouched chunk that is not held"));
        }
        if self.fetching.intersects(&self.have) {
            return Err(malformed("a chunk both held and being fetched"));
        }
        if self.vouched.count() as usize != self.hashes.len() {
            return Err(malformed("hash count differs from the vouched chunk count"));
        }
        if self.hashes.len() > MAX_STATE_HASHES as usize {
            return Err(malformed("more hashes than a State frame carries"));
        }
        Ok(())
    }
}

impl fmt::Debug for Response {
    /// Chunk data shows as its length, so logs stay small.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Response::Chunk { index, data } => f
                .debug_struct("Chunk")
                .field("index", index)
                .field("len", &data.len())
                .finish(),
            Response::DontHave { index } => {
                f.debug_struct("DontHave").field("index", index).finish()
            }
            Response::Bitfield {
                blob,
                chunk_size,
                bits,
            } => f
                .debug_struct("Bitfield")
                .field("blob", blob)
                .field("chunk_size", chunk_size)
                .field("bits", bits)
                .finish(),
            Response::Error { code, message } => f
                .debug_struct("Error")
                .field("code", code)
                .field("message", message)
                .finish(),
            Response::State(st) => f
                .debug_struct("State")
                .field("blob", &st.blob)
                .field("size", &st.size)
                .field("have", &st.have.count())
                .field("vouched", &st.vouched.count())
                .finish(),
        }
    }
}

fn check_index(index: u32) -> Result<(), WireError> {
    if index < MAX_CHUNKS {
        Ok(())
    } else {
        Err(WireError::IndexOutOfRange(index))
    }
}

fn check_chunk_size(chunk_size: u32) -> Result<(), WireError> {
    if is_valid_chunk_size(chunk_size) {
        Ok(())
    } else {
        Err(WireError::BadChunkSize(ChunkError::BadChunkSize(
            chunk_size,
        )))
    }
}

fn put_header(dst: &mut BytesMut, tag: u8, len: usize) {
    dst.reserve(HEADER_LEN + len);
    dst.put_u8(tag);
    // Every caller has checked `len` against the frame's bound first.
    dst.put_u32(len as u32);
}

impl Request {
    /// Appends the frame to `dst`; fails, writing nothing, if the request
    /// breaks a rule the decoder enforces.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), WireError> {
        self.validate()?;
        match self {
            Request::GetChunks {
                blob,
                chunk_size,
                indices,
            } => {
                put_header(
                    dst,
                    tag::GET_CHUNKS,
                    GET_CHUNKS_FIXED as usize + 4 * indices.len(),
                );
                dst.put_slice(blob.as_bytes());
                dst.put_u32(*chunk_size);
                for i in indices {
                    dst.put_u32(*i);
                }
            }
            Request::GetBitfield { blob } => {
                put_header(dst, tag::GET_BITFIELD, 32);
                dst.put_slice(blob.as_bytes());
            }
            Request::Watch { blob } => {
                put_header(dst, tag::WATCH, 32);
                dst.put_slice(blob.as_bytes());
            }
            Request::GetState { blob } => {
                put_header(dst, tag::GET_STATE, 32);
                dst.put_slice(blob.as_bytes());
            }
        }
        Ok(())
    }

    /// The rules beyond frame structure, shared by encoder and decoder.
    fn validate(&self) -> Result<(), WireError> {
        match self {
            Request::GetChunks {
                chunk_size,
                indices,
                ..
            } => {
                if indices.is_empty() {
                    return Err(WireError::NoIndices);
                }
                if indices.len() > MAX_INDICES {
                    return Err(WireError::TooManyIndices(indices.len() as u64));
                }
                check_chunk_size(*chunk_size)?;
                for w in indices.windows(2) {
                    if w[0] >= w[1] {
                        return Err(WireError::IndicesNotIncreasing {
                            prev: w[0],
                            next: w[1],
                        });
                    }
                }
                // Increasing, so checking the last checks all.
                indices.last().map_or(Ok(()), |&i| check_index(i))
            }
            Request::GetBitfield { .. } | Request::Watch { .. } | Request::GetState { .. } => {
                Ok(())
            }
        }
    }

    fn parse(tag: u8, mut p: Bytes) -> Result<Self, WireError> {
        let req = match tag {
            tag::GET_CHUNKS => {
                let blob = take_digest(&mut p);
                let chunk_size = p.get_u32();
                let mut indices = Vec::with_capacity(p.len() / 4);
                while p.has_remaining() {
                    indices.push(p.get_u32());
                }
                Request::GetChunks {
                    blob,
                    chunk_size,
                    indices,
                }
            }
            tag::GET_BITFIELD => Request::GetBitfield {
                blob: take_digest(&mut p),
            },
            tag::WATCH => Request::Watch {
                blob: take_digest(&mut p),
            },
            tag::GET_STATE => Request::GetState {
                blob: take_digest(&mut p),
            },
            // `check_header` lets only request tags through.
            _ => return Err(WireError::UnknownTag(tag)),
        };
        req.validate()?;
        Ok(req)
    }
}

/// The header of a `Chunk` frame whose data is `len` bytes, so a server can
/// write it and then the chunk's [`Bytes`] without copying them.
pub fn encode_chunk_header(index: u32, len: usize) -> Result<[u8; CHUNK_HEADER_LEN], WireError> {
    check_index(index)?;
    if len > MAX_CHUNK_SIZE as usize {
        return Err(WireError::Oversize {
            tag: tag::CHUNK,
            len: 4 + len as u64,
            max: MAX_CHUNK_PAYLOAD,
        });
    }
    let mut out = [0u8; CHUNK_HEADER_LEN];
    out[0] = tag::CHUNK;
    out[1..5].copy_from_slice(&(4 + len as u32).to_be_bytes());
    out[5..9].copy_from_slice(&index.to_be_bytes());
    Ok(out)
}

/// A `Busy` error message that says when to ask again: `retry in N ms:
/// REASON`.
pub fn busy_message(retry_ms: u32, reason: &str) -> String {
    format!("retry in {retry_ms} ms: {reason}")
}

/// The retry time a `Busy` error's message carries ([`busy_message`]), at
/// most [`MAX_RETRY_US`](crate::slots::MAX_RETRY_US); `None` if it carries
/// none or a malformed one.
pub fn busy_retry_ms(message: &str) -> Option<u32> {
    let (n, _) = message.strip_prefix("retry in ")?.split_once(" ms")?;
    if n.is_empty() || n.len() > 7 || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let ms: u32 = n.parse().ok()?;
    Some(ms.min((crate::slots::MAX_RETRY_US / 1000) as u32))
}

impl Response {
    /// An `Error` response, its message cut to [`MAX_ERROR_MESSAGE`] bytes
    /// (at a character boundary).
    pub fn error(code: ErrorKind, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE {
            let mut cut = MAX_ERROR_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Response::Error { code, message }
    }

    /// Appends the frame to `dst`; fails, writing nothing, if the response
    /// breaks a rule the decoder enforces. This copies chunk data: for large
    /// chunks write [`encode_chunk_header`] and then the data instead.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), WireError> {
        self.validate()?;
        match self {
            Response::Chunk { index, data } => {
                dst.reserve(CHUNK_HEADER_LEN + data.len());
                dst.put_slice(&encode_chunk_header(*index, data.len())?);
                dst.put_slice(data);
            }
            Response::DontHave { index } => {
                put_header(dst, tag::DONT_HAVE, 4);
                dst.put_u32(*index);
            }
            Response::Bitfield {
                blob,
                chunk_size,
                bits,
            } => {
                let raw = bits.to_bytes();
                put_header(dst, tag::BITFIELD, BITFIELD_FIXED as usize + raw.len());
                dst.put_slice(blob.as_bytes());
                dst.put_u32(*chunk_size);
                dst.put_u32(bits.len());
                dst.put_slice(&raw);
            }
            Response::Error { code, message } => {
                put_header(dst, tag::ERROR, ERROR_FIXED as usize + message.len());
                dst.put_u16(code.to_u16());
                dst.put_slice(message.as_bytes());
            }
            Response::State(st) => {
                let (have, vouched, fetching) = (
                    st.have.to_bytes(),
                    st.vouched.to_bytes(),
                    st.fetching.to_bytes(),
                );
                let len = STATE_FIXED as usize
                    + have.len()
                    + vouched.len()
                    + fetching.len()
                    + 32 * st.hashes.len();
                put_header(dst, tag::STATE, len);
                dst.put_slice(st.blob.as_bytes());
                dst.put_u64(st.size);
                dst.put_u32(st.chunk_size);
                dst.put_u32(st.have.len());
                dst.put_slice(&have);
                dst.put_slice(&vouched);
                dst.put_slice(&fetching);
                for h in &st.hashes {
                    dst.put_slice(h);
                }
            }
        }
        Ok(())
    }

    /// The rules beyond frame structure, shared by encoder and decoder.
    fn validate(&self) -> Result<(), WireError> {
        match self {
            Response::Chunk { index, data } => encode_chunk_header(*index, data.len()).map(drop),
            Response::DontHave { index } => check_index(*index),
            // A `Bitfield` value is at most MAX_CHUNKS long by construction.
            Response::Bitfield { chunk_size, .. } => check_chunk_size(*chunk_size),
            Response::Error { message, .. } => {
                if message.len() > MAX_ERROR_MESSAGE {
                    Err(WireError::MessageTooLong(message.len()))
                } else {
                    Ok(())
                }
            }
            Response::State(st) => st.validate(),
        }
    }

    fn parse(tag: u8, mut p: Bytes) -> Result<Self, WireError> {
        let resp = match tag {
            tag::CHUNK => Response::Chunk {
                index: p.get_u32(),
                data: p,
            },
            tag::DONT_HAVE => Response::DontHave { index: p.get_u32() },
            tag::BITFIELD => {
                let blob = take_digest(&mut p);
                let chunk_size = p.get_u32();
                let len = p.get_u32();
                let bits = Bitfield::from_bytes(len, &p).map_err(WireError::BadBitfield)?;
                Response::Bitfield {
                    blob,
                    chunk_size,
                    bits,
                }
            }
            tag::STATE => {
                let blob = take_digest(&mut p);
                let size = p.get_u64();
                let chunk_size = p.get_u32();
                let len = p.get_u32();
                let n = Bitfield::byte_len(len);
                let truncated = || WireError::Malformed {
                    tag: tag::STATE,
                    what: "payload shorter than its bitfields and hashes",
                };
                if p.len() < 3 * n {
                    return Err(truncated());
                }
                let have =
                    Bitfield::from_bytes(len, &p.split_to(n)).map_err(WireError::BadBitfield)?;
                let vouched =
                    Bitfield::from_bytes(len, &p.split_to(n)).map_err(WireError::BadBitfield)?;
                let fetching =
                    Bitfield::from_bytes(len, &p.split_to(n)).map_err(WireError::BadBitfield)?;
                if p.len() != 32 * vouched.count() as usize {
                    return Err(truncated());
                }
                let hashes = p
                    .chunks_exact(32)
                    .map(|c| c.try_into().expect("32-byte chunks"))
                    .collect();
                Response::State(BlobState {
                    blob,
                    size,
                    chunk_size,
                    have,
                    vouched,
                    hashes,
                    fetching,
                })
            }
            tag::ERROR => {
                let code = ErrorKind::from_u16(p.get_u16());
                let message = std::str::from_utf8(&p)
                    .map_err(|_| WireError::BadUtf8)?
                    .to_owned();
                Response::Error { code, message }
            }
            // `check_header` lets only response tags through.
            _ => return Err(WireError::UnknownTag(tag)),
        };
        resp.validate()?;
        Ok(resp)
    }
}

/// Reads a digest; the caller has checked that 32 bytes remain.
fn take_digest(p: &mut Bytes) -> Digest {
    let mut raw = [0u8; 32];
    p.copy_to_slice(&mut raw);
    Digest::from_bytes(raw)
}

/// Checks a frame header before any of its payload is buffered: the tag is
/// known and of the expected direction, and the length fits the frame kind.
fn check_header(tag: u8, len: u32, requests: bool) -> Result<(), WireError> {
    let (is_request, min, max) = match tag {
        tag::GET_CHUNKS => (true, GET_CHUNKS_FIXED + 4, u32::MAX),
        tag::GET_BITFIELD | tag::WATCH | tag::GET_STATE => (true, 32, 32),
        tag::CHUNK => (false, 4, MAX_CHUNK_PAYLOAD),
        tag::DONT_HAVE => (false, 4, 4),
        tag::BITFIELD => (false, BITFIELD_FIXED, MAX_BITFIELD_PAYLOAD),
        tag::ERROR => (false, ERROR_FIXED, ERROR_FIXED + MAX_ERROR_MESSAGE as u32),
        tag::STATE => (false, STATE_FIXED, MAX_STATE_PAYLOAD),
        _ => return Err(WireError::UnknownTag(tag)),
    };
    if is_request != requests {
        return Err(WireError::UnexpectedFrame {
            tag,
            expected: if requests { "request" } else { "response" },
        });
    }
    if len < min {
        return Err(WireError::Undersize { tag, len, min });
    }
    if len > max {
        return Err(WireError::Oversize {
            tag,
            len: u64::from(len),
            max,
        });
    }
    if tag == tag::GET_CHUNKS {
        let body = len - GET_CHUNKS_FIXED;
        if body % 4 != 0 {
            return Err(WireError::Malformed {
                tag,
                what: "chunk indices are not a whole number of 4-byte values",
            });
        }
        if body / 4 > MAX_INDICES as u32 {
            return Err(WireError::TooManyIndices(u64::from(body / 4)));
        }
    }
    Ok(())
}

/// The kinds of frame a [`Decoder`] can produce: [`Request`] or [`Response`].
pub trait Frame: sealed::Sealed {}

impl Frame for Request {}
impl Frame for Response {}

mod sealed {
    use bytes::Bytes;

    use super::WireError;

    pub trait Sealed: Sized {
        const REQUESTS: bool;
        fn parse(tag: u8, payload: Bytes) -> Result<Self, WireError>;
    }

    impl Sealed for super::Request {
        const REQUESTS: bool = true;
        fn parse(tag: u8, payload: Bytes) -> Result<Self, WireError> {
            super::Request::parse(tag, payload)
        }
    }

    impl Sealed for super::Response {
        const REQUESTS: bool = false;
        fn parse(tag: u8, payload: Bytes) -> Result<Self, WireError> {
            super::Response::parse(tag, payload)
        }
    }
}

/// Decodes the frames of one stream, however its bytes are sliced.
///
/// The decoder holds at most one frame: [`push`](Decoder::push) takes bytes
/// only up to the end of the current frame, checks each header before taking
/// any payload, and allocates exactly the declared (bounded) payload length.
/// The first error is final: the stream is broken and every later call
/// returns it again.
pub struct Decoder<F> {
    state: State,
    _frame: PhantomData<fn() -> F>,
}

/// Decodes the request a client sends (the server side of a stream).
pub type RequestDecoder = Decoder<Request>;
/// Decodes the responses a server sends (the client side of a stream).
pub type ResponseDecoder = Decoder<Response>;

enum State {
    Header {
        buf: [u8; HEADER_LEN],
        filled: usize,
    },
    Payload {
        tag: u8,
        len: usize,
        buf: BytesMut,
    },
    Ready {
        tag: u8,
        payload: Bytes,
    },
    Failed(WireError),
}

const IDLE: State = State::Header {
    buf: [0; HEADER_LEN],
    filled: 0,
};

impl<F> fmt::Debug for Decoder<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Decoder");
        match &self.state {
            State::Header { filled, .. } => d.field("header_bytes", filled),
            State::Payload { tag, len, buf } => d
                .field("tag", tag)
                .field("len", len)
                .field("received", &buf.len()),
            State::Ready { tag, payload } => d.field("tag", tag).field("ready", &payload.len()),
            State::Failed(e) => d.field("failed", e),
        };
        d.finish()
    }
}

impl<F: Frame> Default for Decoder<F> {
    fn default() -> Self {
        Self::new()
    }
}

impl<F: Frame> Decoder<F> {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Decoder {
            state: IDLE,
            _frame: PhantomData,
        }
    }

    /// Takes bytes of `data` up to the end of the current frame and returns
    /// how many it took. It takes nothing while a complete frame waits to be
    /// taken (`next_request`/`next_response`) or after an error, so the
    /// caller must keep `data[n..]` and push it again after taking frames.
    #[must_use = "bytes not taken must be pushed again"]
    pub fn push(&mut self, data: &[u8]) -> usize {
        let mut taken = 0;
        loop {
            let rest = &data[taken..];
            match &mut self.state {
                State::Header { buf, filled } => {
                    if rest.is_empty() {
                        break;
                    }
                    let n = (HEADER_LEN - *filled).min(rest.len());
                    buf[*filled..*filled + n].copy_from_slice(&rest[..n]);
                    *filled += n;
                    taken += n;
                    if *filled == HEADER_LEN {
                        let tag = buf[0];
                        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
                        self.state = match check_header(tag, len, F::REQUESTS) {
                            Err(e) => State::Failed(e),
                            Ok(()) if len == 0 => State::Ready {
                                tag,
                                payload: Bytes::new(),
                            },
                            Ok(()) => State::Payload {
                                tag,
                                len: len as usize,
                                buf: BytesMut::with_capacity(len as usize),
                            },
                        };
                    }
                }
                State::Payload { tag, len, buf } => {
                    if rest.is_empty() {
                        break;
                    }
                    let n = (*len - buf.len()).min(rest.len());
                    buf.extend_from_slice(&rest[..n]);
                    taken += n;
                    if buf.len() == *len {
                        let tag = *tag;
                        let payload = std::mem::take(buf).freeze();
                        self.state = State::Ready { tag, payload };
                    }
                }
                State::Ready { .. } | State::Failed(_) => break,
            }
        }
        taken
    }

    /// How many more bytes the current frame needs (header first, then
    /// payload); 0 while a frame waits to be taken or after an error. Useful
    /// to size the next read.
    pub fn wants(&self) -> usize {
        match &self.state {
            State::Header { filled, .. } => HEADER_LEN - filled,
            State::Payload { len, buf, .. } => len - buf.len(),
            State::Ready { .. } | State::Failed(_) => 0,
        }
    }

    /// Bytes of the current frame held, header included.
    pub fn buffered(&self) -> usize {
        match &self.state {
            State::Header { filled, .. } => *filled,
            State::Payload { buf, .. } => HEADER_LEN + buf.len(),
            State::Ready { payload, .. } => HEADER_LEN + payload.len(),
            State::Failed(_) => 0,
        }
    }

    /// Checks that the stream may end here: not inside a frame, not broken.
    pub fn finish(&self) -> Result<(), WireError> {
        match &self.state {
            State::Header { filled: 0, .. } | State::Ready { .. } => Ok(()),
            State::Header { filled, .. } => Err(WireError::Truncated {
                received: *filled as u64,
                needed: HEADER_LEN as u64,
            }),
            State::Payload { len, buf, .. } => Err(WireError::Truncated {
                received: (HEADER_LEN + buf.len()) as u64,
                needed: (HEADER_LEN + len) as u64,
            }),
            State::Failed(e) => Err(e.clone()),
        }
    }

    fn next_frame(&mut self) -> Result<Option<F>, WireError> {
        match std::mem::replace(&mut self.state, IDLE) {
            State::Ready { tag, payload } => F::parse(tag, payload).map(Some).inspect_err(|e| {
                self.state = State::Failed(e.clone());
            }),
            State::Failed(e) => {
                self.state = State::Failed(e.clone());
                Err(e)
            }
            other => {
                self.state = other;
                Ok(None)
            }
        }
    }
}

impl Decoder<Request> {
    /// The request, once complete: `Ok(None)` means push more bytes.
    pub fn next_request(&mut self) -> Result<Option<Request>, WireError> {
        self.next_frame()
    }
}

impl Decoder<Response> {
    /// The next response, once complete: `Ok(None)` means push more bytes.
    pub fn next_response(&mut self) -> Result<Option<Response>, WireError> {
        self.next_frame()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        hex::decode(s).unwrap()
    }

    fn enc_req(r: &Request) -> Vec<u8> {
        let mut b = BytesMut::new();
        r.encode(&mut b).unwrap();
        b.to_vec()
    }

    fn enc_resp(r: &Response) -> Vec<u8> {
        let mut b = BytesMut::new();
        r.encode(&mut b).unwrap();
        b.to_vec()
    }

    /// Feeds `pieces` in turn, taking frames as they complete and checking
    /// the memory bound after every step.
    fn decode_all<F: Frame>(
        pieces: &[&[u8]],
        mut next: impl FnMut(&mut Decoder<F>) -> Result<Option<F>, WireError>,
    ) -> Result<Vec<F>, WireError> {
        let mut dec = Decoder::<F>::new();
        let mut out = Vec::new();
        for piece in pieces {
            let mut rest = *piece;
            loop {
                while let Some(f) = next(&mut dec)? {
                    out.push(f);
                }
                if rest.is_empty() {
                    break;
                }
                let n = dec.push(rest);
                assert!(n <= rest.len());
                rest = &rest[n..];
                assert_bounded(&dec);
                // Frames were taken and errors returned, so there is room.
                assert!(n > 0);
            }
        }
        dec.finish()?;
        Ok(out)
    }

    fn assert_bounded<F: Frame>(dec: &Decoder<F>) {
        assert!(dec.buffered() <= MAX_FRAME_LEN);
        if let State::Payload { len, buf, .. } = &dec.state {
            assert!(buf.capacity() <= MAX_CHUNK_PAYLOAD as usize);
            assert!(buf.len() <= *len);
        }
    }

    fn requests(bytes: &[u8]) -> Result<Vec<Request>, WireError> {
        decode_all(&[bytes], RequestDecoder::next_request)
    }

    fn responses(bytes: &[u8]) -> Result<Vec<Response>, WireError> {
        decode_all(&[bytes], ResponseDecoder::next_response)
    }

    #[test]
    fn golden_requests() {
        let r = Request::GetBitfield {
            blob: Digest::from_bytes([0xab; 32]),
        };
        let bytes = unhex(&format!("02 00000020 {}", "ab".repeat(32)));
        assert_eq!(enc_req(&r), bytes);
        assert_eq!(requests(&bytes).unwrap(), [r]);

        let r = Request::GetChunks {
            blob: Digest::from_bytes([0x11; 32]),
            chunk_size: 1 << 20,
            indices: vec![0, 5, 0xfffff],
        };
        let bytes = unhex(&format!(
            "01 00000030 {} 00100000 00000000 00000005 000fffff",
            "11".repeat(32)
        ));
        assert_eq!(enc_req(&r), bytes);
        assert_eq!(requests(&bytes).unwrap(), [r]);
    }

    #[test]
    fn golden_responses() {
        let mut bits = Bitfield::new(10).unwrap();
        for i in [0, 7, 9] {
            bits.set(i).unwrap();
        }
        let cases = [
            (
                Response::Chunk {
                    index: 7,
                    data: Bytes::from_static(b"abc"),
                },
                "40 00000007 00000007 616263".to_owned(),
            ),
            (
                Response::DontHave { index: 9 },
                "41 00000004 00000009".to_owned(),
            ),
            (
                Response::Bitfield {
                    blob: Digest::from_bytes([0x22; 32]),
                    chunk_size: 65536,
                    bits,
                },
                format!("42 0000002a {} 00010000 0000000a 8140", "22".repeat(32)),
            ),
            (
                Response::Error {
                    code: ErrorKind::Busy,
                    message: "slow down".into(),
                },
                "43 0000000b 0001 736c6f7720646f776e".to_owned(),
            ),
            (
                Response::Error {
                    code: ErrorKind::Unknown(0x1234),
                    message: String::new(),
                },
                "43 00000002 1234".to_owned(),
            ),
        ];
        for (resp, hex) in cases {
            let bytes = unhex(&hex);
            assert_eq!(enc_resp(&resp), bytes, "{resp:?}");
            assert_eq!(responses(&bytes).unwrap(), [resp]);
        }
        assert_eq!(
            [
                ErrorKind::Busy,
                ErrorKind::NotAMember,
                ErrorKind::BadRequest,
                ErrorKind::Internal
            ]
            .map(ErrorKind::to_u16),
            [1, 2, 3, 4]
        );
        assert_eq!(ALPN, b"shoal/1");
    }

    #[test]
    fn chunk_header_matches_encode() {
        let data = Bytes::from(vec![7u8; MAX_CHUNK_SIZE as usize]);
        let resp = Response::Chunk {
            index: 3,
            data: data.clone(),
        };
        let full = enc_resp(&resp);
        let header = encode_chunk_header(3, data.len()).unwrap();
        assert_eq!(&full[..CHUNK_HEADER_LEN], &header);
        assert_eq!(&full[CHUNK_HEADER_LEN..], &data[..]);
        assert_eq!(responses(&full).unwrap(), [resp]);
        assert_eq!(
            encode_chunk_header(3, MAX_CHUNK_SIZE as usize + 1),
            Err(WireError::Oversize {
                tag: 0x40,
                len: u64::from(MAX_CHUNK_SIZE) + 5,
                max: MAX_CHUNK_PAYLOAD
            })
        );
        assert_eq!(
            encode_chunk_header(MAX_CHUNKS, 1),
            Err(WireError::IndexOutOfRange(MAX_CHUNKS))
        );
    }

    #[test]
    fn oversize_rejected_before_buffering() {
        let mut dec = ResponseDecoder::new();
        let mut bytes = vec![0x40];
        bytes.extend_from_slice(&(MAX_CHUNK_PAYLOAD + 1).to_be_bytes());
        bytes.extend_from_slice(&[0; 1000]);
        assert_eq!(dec.push(&bytes), HEADER_LEN);
        assert_eq!(dec.buffered(), 0);
        let err = dec.next_response().unwrap_err();
        assert_eq!(
            err,
            WireError::Oversize {
                tag: 0x40,
                len: u64::from(MAX_CHUNK_PAYLOAD) + 1,
                max: MAX_CHUNK_PAYLOAD
            }
        );
        assert_eq!(
            err.to_string(),
            "Chunk frame (tag 0x40) has a 4194309-byte payload, over its limit of 4194308"
        );
        // Broken for good.
        assert_eq!(dec.push(&bytes[HEADER_LEN..]), 0);
        assert_eq!(dec.next_response(), Err(err.clone()));
        assert_eq!(dec.finish(), Err(err));

        // Control frames are held to their exact bound.
        let e = requests(&unhex("02 00000021")).unwrap_err();
        assert_eq!(
            e,
            WireError::Oversize {
                tag: 0x02,
                len: 33,
                max: 32
            }
        );
        let e = responses(&unhex("43 00010000")).unwrap_err();
        assert!(matches!(e, WireError::Oversize { tag: 0x43, .. }), "{e}");
    }

    #[test]
    fn allocates_only_the_declared_payload() {
        let mut dec = ResponseDecoder::new();
        assert_eq!(dec.push(&unhex("40 00000010 0000")), 7);
        assert_eq!(dec.wants(), 14);
        assert_eq!(dec.buffered(), 7);
        match &dec.state {
            State::Payload { buf, .. } => assert!(buf.capacity() <= 16),
            _ => panic!("expected payload state"),
        }
        assert_eq!(
            dec.finish(),
            Err(WireError::Truncated {
                received: 7,
                needed: 21
            })
        );
    }

    #[test]
    fn rejects_precisely() {
        let blob = "00".repeat(32);
        let cases: Vec<(String, WireError)> = vec![
            ("00 00000000".into(), WireError::UnknownTag(0)),
            ("05 00000000".into(), WireError::UnknownTag(5)),
            (
                "03 00000000".into(),
                WireError::Undersize {
                    tag: 3,
                    len: 0,
                    min: 32,
                },
            ),
            ("80 00000000".into(), WireError::UnknownTag(0x80)),
            (
                "40 00000004 00000000".into(),
                WireError::UnexpectedFrame {
                    tag: 0x40,
                    expected: "request",
                },
            ),
            (
                "01 00000024".into(),
                WireError::Undersize {
                    tag: 1,
                    len: 36,
                    min: 40,
                },
            ),
            (
                "01 00000029".into(),
                WireError::Malformed {
                    tag: 1,
                    what: "chunk indices are not a whole number of 4-byte values",
                },
            ),
            ("01 00000128".into(), WireError::TooManyIndices(65)),
            (
                format!("01 0000002c {blob} 00010000 00000002 00000002"),
                WireError::IndicesNotIncreasing { prev: 2, next: 2 },
            ),
            (
                format!("01 00000028 {blob} 00010001 00000002"),
                WireError::BadChunkSize(ChunkError::BadChunkSize(0x10001)),
            ),
            (
                format!("01 00000028 {blob} 00010000 00100000"),
                WireError::IndexOutOfRange(MAX_CHUNKS),
            ),
        ];
        for (hex, want) in cases {
            assert_eq!(requests(&unhex(&hex)), Err(want), "{hex}");
        }
        let cases: Vec<(String, WireError)> = vec![
            (
                format!("02 00000020 {blob}"),
                WireError::UnexpectedFrame {
                    tag: 2,
                    expected: "response",
                },
            ),
            (
                "41 00000003 000000".into(),
                WireError::Undersize {
                    tag: 0x41,
                    len: 3,
                    min: 4,
                },
            ),
            ("43 00000003 0001 ff".into(), WireError::BadUtf8),
            (
                format!("42 00000029 {blob} 00010000 00000009 80"),
                WireError::BadBitfield(ChunkError::BitfieldBytes {
                    len: 9,
                    expected: 2,
                    actual: 1,
                }),
            ),
            (
                format!("42 00000029 {blob} 00010000 00000007 81"),
                WireError::BadBitfield(ChunkError::PaddingBitsSet { len: 7 }),
            ),
            (
                format!("42 00000028 {blob} 00010000 ffffffff"),
                WireError::BadBitfield(ChunkError::TooManyChunks { count: 0xffffffff }),
            ),
            (
                "41 00000004 00000000 41".into(),
                WireError::Truncated {
                    received: 1,
                    needed: 5,
                },
            ),
        ];
        for (hex, want) in cases {
            assert_eq!(responses(&unhex(&hex)), Err(want), "{hex}");
        }
        assert_eq!(
            WireError::UnexpectedFrame {
                tag: 2,
                expected: "response"
            }
            .to_string(),
            "got a GetBitfield frame (tag 0x02) where a response was expected"
        );
        assert_eq!(
            WireError::UnknownTag(0x90).to_string(),
            "unknown reserved frame tag 0x90"
        );
    }

    #[test]
    fn a_busy_message_carries_its_retry_time_and_garbage_carries_none() {
        let m = busy_message(12, "all 16 upload slots are in use");
        assert_eq!(m, "retry in 12 ms: all 16 upload slots are in use");
        assert_eq!(busy_retry_ms(&m), Some(12));
        assert_eq!(busy_retry_ms("retry in 0 ms"), Some(0));
        // Bounded: a peer cannot park a requester for long.
        assert_eq!(busy_retry_ms("retry in 9999999 ms: x"), Some(2_000));
        for bad in [
            "all 16 upload slots are in use",
            "retry in  ms: x",
            "retry in -3 ms: x",
            "retry in 3ms",
            "retry in 99999999999 ms",
            "retry in 1e3 ms",
            "retry in +4 ms",
            "",
        ] {
            assert_eq!(busy_retry_ms(bad), None, "{bad:?}");
        }
        // It survives the wire like any message.
        let mut buf = BytesMut::new();
        Response::error(ErrorKind::Busy, m.clone())
            .encode(&mut buf)
            .unwrap();
        let mut dec = ResponseDecoder::new();
        assert_eq!(dec.push(&buf), buf.len());
        let Some(Response::Error { code, message }) = dec.next_response().unwrap() else {
            panic!("an error frame");
        };
        assert_eq!((code, busy_retry_ms(&message)), (ErrorKind::Busy, Some(12)));
    }

    #[test]
    fn encode_refuses_what_decode_rejects() {
        let blob = Digest::of(b"x");
        let bad = [
            (
                Request::GetChunks {
                    blob,
                    chunk_size: 1 << 20,
                    indices: vec![],
                },
                WireError::NoIndices,
            ),
            (
                Request::GetChunks {
                    blob,
                    chunk_size: 1 << 20,
                    indices: (0..65).collect(),
                },
                WireError::TooManyIndices(65),
            ),
            (
                Request::GetChunks {
                    blob,
                    chunk_size: 1 << 20,
                    indices: vec![3, 1],
                },
                WireError::IndicesNotIncreasing { prev: 3, next: 1 },
            ),
            (
                Request::GetChunks {
                    blob,
                    chunk_size: 1000,
                    indices: vec![1],
                },
                WireError::BadChunkSize(ChunkError::BadChunkSize(1000)),
            ),
        ];
        for (r, want) in bad {
            let mut b = BytesMut::new();
            assert_eq!(r.encode(&mut b), Err(want));
            assert!(b.is_empty());
        }
        let mut b = BytesMut::new();
        let long = Response::Error {
            code: ErrorKind::Internal,
            message: "x".repeat(513),
        };
        assert_eq!(long.encode(&mut b), Err(WireError::MessageTooLong(513)));
        assert_eq!(
            Response::DontHave { index: u32::MAX }.encode(&mut b),
            Err(WireError::IndexOutOfRange(u32::MAX))
        );
        assert!(b.is_empty());

        // `Response::error` cuts long messages at a character boundary.
        let Response::Error { message, .. } = Response::error(ErrorKind::Busy, "é".repeat(300))
        else {
            unreachable!()
        };
        assert_eq!(message.len(), 512);
        let msg = "x".to_owned() + &"ü".repeat(300);
        let Response::Error { message, .. } = Response::error(ErrorKind::Busy, msg) else {
            unreachable!()
        };
        assert_eq!(message.len(), 511);
    }

    #[test]
    fn debug_hides_chunk_data() {
        let r = Response::Chunk {
            index: 1,
            data: Bytes::from(vec![0; 1000]),
        };
        assert_eq!(format!("{r:?}"), "Chunk { index: 1, len: 1000 }");
    }

    #[test]
    fn a_state_vouches_only_for_held_chunks_with_one_hash_each() {
        let blob = Digest::from_bytes([7; 32]);
        let cs = crate::chunk::MIN_CHUNK_SIZE;
        let mut have = Bitfield::new(3).unwrap();
        have.set(0).unwrap();
        have.set(2).unwrap();
        let mut vouched = Bitfield::new(3).unwrap();
        vouched.set(2).unwrap();
        let good = BlobState {
            blob,
            size: u64::from(cs) * 2 + 5,
            chunk_size: cs,
            have: have.clone(),
            vouched: vouched.clone(),
            hashes: vec![[9; 32]],
            fetching: {
                let mut f = Bitfield::new(3).unwrap();
                f.set(1).unwrap();
                f
            },
        };
        let mut wire = BytesMut::new();
        Response::State(good.clone()).encode(&mut wire).unwrap();
        let mut dec = ResponseDecoder::new();
        assert_eq!(dec.push(&wire), wire.len());
        assert_eq!(
            dec.next_response().unwrap(),
            Some(Response::State(good.clone()))
        );
        assert_eq!(
            good.vouched_hashes().collect::<Vec<_>>(),
            vec![(2, &[9; 32])]
        );

        let mut not_held = good.clone();
        not_held.vouched.set(1).unwrap();
        not_held.hashes.push([1; 32]);
        let mut hash_missing = good.clone();
        hash_missing.hashes.clear();
        let mut wrong_len = good.clone();
        wrong_len.size = u64::from(cs) * 5;
        let mut fetching_held = good.clone();
        fetching_held.fetching.set(0).unwrap();
        for bad in [not_held, hash_missing, wrong_len, fetching_held] {
            let e = Response::State(bad)
                .encode(&mut BytesMut::new())
                .unwrap_err();
            assert!(
                matches!(e, WireError::Malformed { .. }),
                "unexpected error {e}"
            );
        }

        // A payload whose hashes stop short is refused by the decoder too.
        let mut cut = wire.clone();
        cut.truncate(wire.len() - 1);
        cut[1..5].copy_from_slice(&((wire.len() - 1 - HEADER_LEN) as u32).to_be_bytes());
        let mut dec = ResponseDecoder::new();
        assert_eq!(dec.push(&cut), cut.len());
        assert!(matches!(
            dec.next_response(),
            Err(WireError::Malformed { .. })
        ));
        // A header declaring more than the largest State is refused at once.
        let mut huge = vec![0x44];
        huge.extend_from_slice(&(MAX_STATE_PAYLOAD + 1).to_be_bytes());
        let mut dec = ResponseDecoder::new();
        let _ = dec.push(&huge);
        assert!(matches!(
            dec.next_response(),
            Err(WireError::Oversize { .. })
        ));
    }

    fn arb_digest() -> impl Strategy<Value = Digest> {
        any::<[u8; 32]>().prop_map(Digest::from_bytes)
    }

    fn arb_chunk_size() -> impl Strategy<Value = u32> {
        (0u32..=6).prop_map(|s| crate::chunk::MIN_CHUNK_SIZE << s)
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (
                arb_digest(),
                arb_chunk_size(),
                prop::collection::btree_set(0..MAX_CHUNKS, 1..=MAX_INDICES)
            )
                .prop_map(|(blob, chunk_size, set)| Request::GetChunks {
                    blob,
                    chunk_size,
                    indices: set.into_iter().collect(),
                }),
            arb_digest().prop_map(|blob| Request::GetBitfield { blob }),
            arb_digest().prop_map(|blob| Request::Watch { blob }),
            arb_digest().prop_map(|blob| Request::GetState { blob }),
        ]
    }

    fn arb_state() -> impl Strategy<Value = Response> {
        (
            arb_digest(),
            arb_chunk_size(),
            prop::collection::vec((0u8..4, any::<[u8; 32]>()), 1..200),
            0u64..4096,
        )
            .prop_map(|(blob, chunk_size, v, tail)| {
                let n = v.len() as u32;
                let size =
                    u64::from(chunk_size) * u64::from(n - 1) + 1 + tail % u64::from(chunk_size);
                let mut have = Bitfield::new(n).unwrap();
                let mut vouched = Bitfield::new(n).unwrap();
                let mut fetching = Bitfield::new(n).unwrap();
                let mut hashes = Vec::new();
                // 0: missing, 1: being fetched, 2: held, 3: held and vouched.
                for (i, (kind, hash)) in v.into_iter().enumerate() {
                    let i = i as u32;
                    match kind {
                        1 => fetching.set(i).map(drop).unwrap(),
                        2 => have.set(i).map(drop).unwrap(),
                        3 => {
                            have.set(i).unwrap();
                            vouched.set(i).unwrap();
                            hashes.push(hash);
                        }
                        _ => {}
                    }
                }
                Response::State(BlobState {
                    blob,
                    size,
                    chunk_size,
                    have,
                    vouched,
                    hashes,
                    fetching,
                })
            })
    }

    fn arb_response() -> impl Strategy<Value = Response> {
        prop_oneof![
            (0..MAX_CHUNKS, prop::collection::vec(any::<u8>(), 0..3000)).prop_map(
                |(index, data)| Response::Chunk {
                    index,
                    data: data.into()
                }
            ),
            (0..MAX_CHUNKS).prop_map(|index| Response::DontHave { index }),
            (
                arb_digest(),
                arb_chunk_size(),
                prop::collection::vec(any::<bool>(), 0..300)
            )
                .prop_map(|(blob, chunk_size, v)| {
                    let mut bits = Bitfield::new(v.len() as u32).unwrap();
                    for (i, on) in v.into_iter().enumerate() {
                        if on {
                            bits.set(i as u32).unwrap();
                        }
                    }
                    Response::Bitfield {
                        blob,
                        chunk_size,
                        bits,
                    }
                }),
            (any::<u16>(), "\\PC{0,120}")
                .prop_map(|(code, message)| Response::error(ErrorKind::from_u16(code), message)),
            arb_state(),
        ]
    }

    /// Cuts `data` at arbitrary points.
    fn cut<'a>(data: &'a [u8], cuts: &[prop::sample::Index]) -> Vec<&'a [u8]> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(data.len() + 1)).collect();
        at.push(0);
        at.push(data.len());
        at.sort_unstable();
        at.windows(2).map(|w| &data[w[0]..w[1]]).collect()
    }

    proptest! {
        #[test]
        fn request_roundtrip(r in arb_request(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..10)) {
            let bytes = enc_req(&r);
            let got = decode_all(&cut(&bytes, &cuts), RequestDecoder::next_request).unwrap();
            prop_assert_eq!(got, vec![r]);
        }

        #[test]
        fn responses_roundtrip(
            rs in prop::collection::vec(arb_response(), 0..6),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let mut buf = BytesMut::new();
            for r in &rs {
                r.encode(&mut buf).unwrap();
            }
            let got = decode_all(&cut(&buf, &cuts), ResponseDecoder::next_response).unwrap();
            prop_assert_eq!(got, rs);
        }

        #[test]
        fn decoder_never_panics(
            bytes in prop::collection::vec(any::<u8>(), 0..2000),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let pieces = cut(&bytes, &cuts);
            let _ = decode_all(&pieces, RequestDecoder::next_request);
            let _ = decode_all(&pieces, ResponseDecoder::next_response);
        }

        #[test]
        fn decoder_never_panics_on_plausible_frames(
            tag in prop::sample::select(vec![0x01u8, 0x02, 0x40, 0x41, 0x42, 0x43]),
            len in prop_oneof![0u32..400, any::<u32>()],
            payload in prop::collection::vec(any::<u8>(), 0..400),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let mut bytes = vec![tag];
            bytes.extend_from_slice(&len.to_be_bytes());
            bytes.extend_from_slice(&payload);
            let pieces = cut(&bytes, &cuts);
            let _ = decode_all(&pieces, RequestDecoder::next_request);
            let _ = decode_all(&pieces, ResponseDecoder::next_response);
        }
    }
}
