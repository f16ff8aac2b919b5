//! Chunk layout, chunk bitfields and chunk hash maps.
//!
//! Shoal splits every blob into fixed-size chunks (the last one shorter) so
//! peers can verify and share pieces of a blob long before the whole of it
//! exists. Three things describe a blob's chunks:
//!
//! - [`ChunkLayout`]: where chunk `i` lies in the blob (size + chunk size).
//! - [`Bitfield`]: which chunks a node holds, on the wire (`to_bytes`,
//!   BitTorrent's MSB-first order) and in tracker JSON (serde).
//! - [`ChunkHashes`]: the SHA-256 of each chunk as far as it is known, against
//!   which every chunk is verified before it is stored or forwarded.
//!
//! [`ChunkHasher`] computes all chunk hashes and the blob digest of a stream
//! in one pass, however the stream is sliced, for the node that fetches a blob
//! from the origin and publishes its chunk map.
//!
//! Everything built from untrusted input is bounded by [`MAX_CHUNKS`].

use std::fmt;
use std::ops::Range;

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use crate::digest::Digest;

/// The chunk size Shoal uses for new blobs unless the cluster sets another
/// (`--chunk-size`). 256 KiB by measurement: eight members with every
/// upload capped at 100 mbit pulling a cold 3 × 16 MiB image finished in
/// 1.32–1.40× the Kumar–Ross bound at 256 KiB, 1.52× at 512 KiB, 1.92–2.03×
/// at 1 MiB and 1.41–1.55× at 4 MiB (128 KiB: 1.23×, at twice the chunk
/// hashes to publish and fetch); see `docs/BENCHMARKS.md`, "chunk size by
/// measurement".
pub const DEFAULT_CHUNK_SIZE: u32 = 256 << 10;
/// The smallest chunk size accepted.
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// The largest chunk size accepted; also bounds one chunk frame on the wire.
pub const MAX_CHUNK_SIZE: u32 = 4 << 20;
/// The most chunks a blob may have; bounds every structure built from
/// untrusted input (a full bitfield is 128 KiB, a full hash map 33 MiB).
pub const MAX_CHUNKS: u32 = 1 << 20;

/// Why a chunk layout, bitfield, chunk hash or chunk is rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The chunk size is not a power of two within the accepted bounds.
    #[error(
        "chunk size {0} is not a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes"
    )]
    BadChunkSize(u32),
    /// The blob (or bitfield) would have more chunks than [`MAX_CHUNKS`].
    #[error("{count} chunks exceed the limit of {MAX_CHUNKS}")]
    TooManyChunks {
        /// How many chunks were asked for.
        count: u64,
    },
    /// A chunk index is not below the number of chunks.
    #[error("chunk index {index} is out of range: there are {count} chunks")]
    IndexOutOfRange {
        /// The offending index.
        index: u32,
        /// The number of chunks.
        count: u32,
    },
    /// A bitfield's bytes do not match its length.
    #[error("a bitfield of {len} chunks takes {expected} bytes, got {actual}")]
    BitfieldBytes {
        /// The bitfield length in chunks.
        len: u32,
        /// `ceil(len / 8)`.
        expected: usize,
        /// The bytes received.
        actual: usize,
    },
    /// A bitfield has bits set past its last chunk.
    #[error("bitfield of {len} chunks has padding bits set past its end")]
    PaddingBitsSet {
        /// The bitfield length in chunks.
        len: u32,
    },
    /// A bitfield's `bits` string is not standard padded base64.
    #[error("bitfield bits are not valid base64")]
    BadBase64,
    /// A list of chunk hashes has the wrong number of entries for its layout.
    #[error("the layout has {expected} chunks but {actual} hashes were given")]
    HashCount {
        /// Chunks in the layout.
        expected: u32,
        /// Hashes given.
        actual: usize,
    },
    /// A chunk already has a different known hash.
    #[error(
        "chunk {index} already has hash {}, refusing a different one ({})",
        hex::encode(.known),
        hex::encode(.new)
    )]
    Conflict {
        /// The chunk index.
        index: u32,
        /// The hash already known.
        known: [u8; 32],
        /// The conflicting hash offered.
        new: [u8; 32],
    },
    /// A chunk's data has the wrong length for its place in the layout.
    #[error("chunk {index} must be {expected} bytes long, got {actual}")]
    BadLength {
        /// The chunk index.
        index: u32,
        /// The length the layout gives it.
        expected: u32,
        /// The length received.
        actual: usize,
    },
    /// The chunk's hash is not known yet, so it cannot be verified.
    #[error("the hash of chunk {index} is not known yet")]
    UnknownHash {
        /// The chunk index.
        index: u32,
    },
    /// The chunk's data does not hash to the known chunk hash.
    #[error(
        "chunk {index} hashes to {}, expected {}",
        hex::encode(.actual),
        hex::encode(.expected)
    )]
    Mismatch {
        /// The chunk index.
        index: u32,
        /// The known hash.
        expected: [u8; 32],
        /// The hash of the data received.
        actual: [u8; 32],
    },
    /// A stream went on past the blob's declared size.
    #[error("the stream is longer than the declared blob size of {size} bytes")]
    TooLong {
        /// The declared size.
        size: u64,
    },
    /// A stream ended before the blob's declared size.
    #[error("the stream ended after {actual} of {size} bytes")]
    TooShort {
        /// The declared size.
        size: u64,
        /// The bytes received.
        actual: u64,
    },
}

/// Whether `chunk_size` is a power of two in
/// [`MIN_CHUNK_SIZE`]`..=`[`MAX_CHUNK_SIZE`].
pub fn is_valid_chunk_size(chunk_size: u32) -> bool {
    chunk_size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
}

// ---------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------

/// How a blob of `size` bytes splits into chunks of `chunk_size` bytes (the
/// last one shorter). Always valid: built only through [`ChunkLayout::new`].
///
/// Serde form (tracker JSON): `{"size": 123, "chunk_size": 1048576}`,
/// validated on deserialization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "RawLayout")]
pub struct ChunkLayout {
    size: u64,
    chunk_size: u32,
}

#[derive(serde::Deserialize)]
struct RawLayout {
    size: u64,
    chunk_size: u32,
}

impl TryFrom<RawLayout> for ChunkLayout {
    type Error = ChunkError;

    fn try_from(raw: RawLayout) -> Result<Self, ChunkError> {
        ChunkLayout::new(raw.size, raw.chunk_size)
    }
}

impl ChunkLayout {
    /// A layout for a blob of `size` bytes: `chunk_size` must satisfy
    /// [`is_valid_chunk_size`] and the blob must have at most [`MAX_CHUNKS`]
    /// chunks. An empty blob has zero chunks.
    pub fn new(size: u64, chunk_size: u32) -> Result<Self, ChunkError> {
        if !is_valid_chunk_size(chunk_size) {
            return Err(ChunkError::BadChunkSize(chunk_size));
        }
        let count = size.div_ceil(u64::from(chunk_size));
        if count > u64::from(MAX_CHUNKS) {
            return Err(ChunkError::TooManyChunks { count });
        }
        Ok(ChunkLayout { size, chunk_size })
    }

    /// The layout every node picks for a new blob of `size` bytes, so they
    /// agree without talking: [`DEFAULT_CHUNK_SIZE`], doubled as often as
    /// needed to stay within [`MAX_CHUNKS`]. Fails only for blobs larger than
    /// `MAX_CHUNKS × MAX_CHUNK_SIZE` (4 TiB).
    pub fn for_blob(size: u64) -> Result<Self, ChunkError> {
        Self::for_blob_with(size, DEFAULT_CHUNK_SIZE)
    }

    /// [`for_blob`](Self::for_blob) with the cluster's chunk size
    /// `preferred` (every member must use the same one) in place of the
    /// default; fails for a chunk size [`ChunkLayout::new`] refuses.
    pub fn for_blob_with(size: u64, preferred: u32) -> Result<Self, ChunkError> {
        if !is_valid_chunk_size(preferred) {
            return Err(ChunkError::BadChunkSize(preferred));
        }
        let mut chunk_size = preferred;
        while chunk_size < MAX_CHUNK_SIZE
            && size.div_ceil(u64::from(chunk_size)) > u64::from(MAX_CHUNKS)
        {
            chunk_size *= 2;
        }
        ChunkLayout::new(size, chunk_size)
    }

    /// The blob size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The chunk size in bytes (every chunk but the last has exactly this).
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The number of chunks (at most [`MAX_CHUNKS`]).
    pub fn count(&self) -> u32 {
        // At most MAX_CHUNKS by construction, so the cast is exact.
        self.size.div_ceil(u64::from(self.chunk_size)) as u32
    }

    /// Offset and length of chunk `index`, or `None` past the last chunk.
    pub fn range(&self, index: u32) -> Option<(u64, u32)> {
        if index >= self.count() {
            return None;
        }
        let offset = u64::from(index) * u64::from(self.chunk_size);
        let len = (self.size - offset).min(u64::from(self.chunk_size)) as u32;
        Some((offset, len))
    }

    /// The length of chunk `index`, or `None` past the last chunk.
    pub fn chunk_len(&self, index: u32) -> Option<u32> {
        self.range(index).map(|(_, len)| len)
    }

    /// The chunk holding byte `offset`, or `None` at or past the end.
    pub fn chunk_of(&self, offset: u64) -> Option<u32> {
        (offset < self.size).then(|| (offset / u64::from(self.chunk_size)) as u32)
    }

    /// The chunks holding any byte of `start..=end_inclusive` (clamped to the
    /// blob); an empty range if no byte of it lies inside the blob.
    pub fn chunks_overlapping(&self, start: u64, end_inclusive: u64) -> Range<u32> {
        if start > end_inclusive || start >= self.size {
            return 0..0;
        }
        let end = end_inclusive.min(self.size - 1);
        let cs = u64::from(self.chunk_size);
        (start / cs) as u32..(end / cs) as u32 + 1
    }
}

// ---------------------------------------------------------------------------
// Bitfield
// ---------------------------------------------------------------------------

/// A set of chunk indices below a fixed length: which chunks a node holds.
///
/// Wire form ([`to_bytes`](Bitfield::to_bytes)): exactly `ceil(len / 8)`
/// bytes, chunk 0 in the most significant bit of byte 0 (as in BitTorrent),
/// padding bits zero. Serde form (tracker JSON): `{"len": 10, "bits":
/// "<standard padded base64 of the wire form>"}`, validated on
/// deserialization.
///
/// Binary operations treat bitfields as plain sets, so their lengths need not
/// match; see each method.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Bitfield {
    len: u32,
    /// Cached popcount, so [`count`](Bitfield::count) is O(1).
    ones: u32,
    /// Bit `i % 64` of word `i / 64` is chunk `i`; bits past `len` are zero.
    words: Vec<u64>,
}

impl Bitfield {
    /// An empty bitfield of `len` chunks (at most [`MAX_CHUNKS`]).
    pub fn new(len: u32) -> Result<Self, ChunkError> {
        check_len(len)?;
        Ok(Bitfield {
            len,
            ones: 0,
            words: vec![0; len.div_ceil(64) as usize],
        })
    }

    /// A bitfield of `len` chunks with all of them set (at most [`MAX_CHUNKS`]).
    pub fn full(len: u32) -> Result<Self, ChunkError> {
        let mut b = Bitfield::new(len)?;
        b.words.fill(u64::MAX);
        b.mask_tail();
        b.ones = len;
        Ok(b)
    }

    /// An empty bitfield with one bit per chunk of `layout`.
    pub fn for_layout(layout: &ChunkLayout) -> Self {
        let len = layout.count();
        Bitfield {
            len,
            ones: 0,
            words: vec![0; len.div_ceil(64) as usize],
        }
    }

    /// The number of chunks the bitfield covers (set or not).
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the bitfield covers no chunks at all (`len() == 0`); see
    /// [`count`](Bitfield::count) for whether any chunk is set.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of chunks set, in O(1).
    pub fn count(&self) -> u32 {
        self.ones
    }

    /// Whether every chunk is set (true for a zero-length bitfield).
    pub fn is_full(&self) -> bool {
        self.ones == self.len
    }

    /// Whether chunk `index` is set; false past the end.
    #[inline]
    pub fn get(&self, index: u32) -> bool {
        index < self.len && self.words[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    /// Sets chunk `index`; returns whether it was newly set.
    pub fn set(&mut self, index: u32) -> Result<bool, ChunkError> {
        self.check_index(index)?;
        let (w, bit) = ((index / 64) as usize, 1u64 << (index % 64));
        let fresh = self.words[w] & bit == 0;
        self.words[w] |= bit;
        self.ones += u32::from(fresh);
        Ok(fresh)
    }

    /// Clears chunk `index`; returns whether it was set before.
    pub fn clear(&mut self, index: u32) -> Result<bool, ChunkError> {
        self.check_index(index)?;
        let (w, bit) = ((index / 64) as usize, 1u64 << (index % 64));
        let was = self.words[w] & bit != 0;
        self.words[w] &= !bit;
        self.ones -= u32::from(was);
        Ok(was)
    }

    /// The set chunks, in increasing order.
    pub fn iter_ones(&self) -> impl Iterator<Item = u32> + '_ {
        self.words
            .iter()
            .enumerate()
            .flat_map(|(wi, &w)| BitsOf(w).map(move |b| wi as u32 * 64 + b))
    }

    /// The chunks not set, in increasing order.
    pub fn iter_zeros(&self) -> impl Iterator<Item = u32> + '_ {
        self.words
            .iter()
            .enumerate()
            .flat_map(|(wi, &w)| BitsOf(!w & self.word_mask(wi)).map(move |b| wi as u32 * 64 + b))
    }

    /// The first chunk at or after `from` that is not set.
    pub fn first_zero_from(&self, from: u32) -> Option<u32> {
        self.first_from(from, true)
    }

    /// The first chunk at or after `from` that is set.
    pub fn first_one_from(&self, from: u32) -> Option<u32> {
        self.first_from(from, false)
    }

    /// Adds every chunk of `other` that lies below `self.len()`; chunks of
    /// `other` past that end are ignored (lengths normally match).
    pub fn union_with(&mut self, other: &Bitfield) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
        self.mask_tail();
        self.recount();
    }

    /// The chunks of `self` that are not in `other`, with `self`'s length.
    pub fn difference(&self, other: &Bitfield) -> Bitfield {
        let words = self
            .words
            .iter()
            .enumerate()
            .map(|(i, a)| a & !other.words.get(i).copied().unwrap_or(0))
            .collect();
        let mut b = Bitfield {
            len: self.len,
            ones: 0,
            words,
        };
        b.recount();
        b
    }

    /// The chunks set in both, in increasing order (a word at a time).
    pub fn iter_and<'a>(&'a self, other: &'a Bitfield) -> impl Iterator<Item = u32> + 'a {
        self.words
            .iter()
            .zip(&other.words)
            .enumerate()
            .flat_map(|(wi, (&a, &b))| BitsOf(a & b).map(move |bit| wi as u32 * 64 + bit))
    }

    /// How many chunks are set in both.
    #[inline]
    pub fn count_and(&self, other: &Bitfield) -> u32 {
        self.words
            .iter()
            .zip(&other.words)
            .map(|(a, b)| (a & b).count_ones())
            .sum()
    }

    /// Whether some chunk is set in both.
    #[inline]
    pub fn intersects(&self, other: &Bitfield) -> bool {
        self.words.iter().zip(&other.words).any(|(a, b)| a & b != 0)
    }

    /// The chunks whose bit differs between `self` and `new` (lengths
    /// normally match; past the shorter one nothing is compared), each with
    /// whether `new` has it, in increasing order (a word at a time, so
    /// replacing a peer's bitfield costs what changed, not what it holds).
    pub fn changes<'a>(&'a self, new: &'a Bitfield) -> impl Iterator<Item = (u32, bool)> + 'a {
        let common = self.len.min(new.len);
        self.words
            .iter()
            .zip(&new.words)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .flat_map(|(wi, (&a, &b))| {
                BitsOf(a ^ b).map(move |bit| (wi as u32 * 64 + bit, b >> bit & 1 == 1))
            })
            .take_while(move |&(i, _)| i < common)
    }

    /// Whether `self` has a chunk that neither `a` nor `b` has.
    pub fn has_any_outside(&self, a: &Bitfield, b: &Bitfield) -> bool {
        self.words.iter().enumerate().any(|(i, w)| {
            let covered =
                a.words.get(i).copied().unwrap_or(0) | b.words.get(i).copied().unwrap_or(0);
            w & !covered != 0
        })
    }

    /// The number of bytes of the wire form of a bitfield of `len` chunks.
    pub fn byte_len(len: u32) -> usize {
        len.div_ceil(8) as usize
    }

    /// The wire form: `ceil(len / 8)` bytes, MSB-first, padding bits zero.
    pub fn to_bytes(&self) -> Vec<u8> {
        (0..Self::byte_len(self.len))
            .map(|b| ((self.words[b / 8] >> (8 * (b % 8))) as u8).reverse_bits())
            .collect()
    }

    /// Parses the wire form of a bitfield of `len` chunks, rejecting a length
    /// over [`MAX_CHUNKS`], the wrong number of bytes and set padding bits.
    pub fn from_bytes(len: u32, bytes: &[u8]) -> Result<Self, ChunkError> {
        check_len(len)?;
        let expected = Self::byte_len(len);
        if bytes.len() != expected {
            return Err(ChunkError::BitfieldBytes {
                len,
                expected,
                actual: bytes.len(),
            });
        }
        let mut words = vec![0u64; len.div_ceil(64) as usize];
        for (b, byte) in bytes.iter().enumerate() {
            words[b / 8] |= u64::from(byte.reverse_bits()) << (8 * (b % 8));
        }
        let mut bf = Bitfield {
            len,
            ones: 0,
            words,
        };
        if let Some(last) = bf.words.last() {
            if last & !bf.word_mask(bf.words.len() - 1) != 0 {
                return Err(ChunkError::PaddingBitsSet { len });
            }
        }
        bf.recount();
        Ok(bf)
    }

    fn check_index(&self, index: u32) -> Result<(), ChunkError> {
        if index < self.len {
            Ok(())
        } else {
            Err(ChunkError::IndexOutOfRange {
                index,
                count: self.len,
            })
        }
    }

    /// The bits of word `wi` that lie below `len`.
    fn word_mask(&self, wi: usize) -> u64 {
        let start = wi as u64 * 64;
        let valid = u64::from(self.len).saturating_sub(start);
        if valid >= 64 {
            u64::MAX
        } else {
            (1u64 << valid) - 1
        }
    }

    fn mask_tail(&mut self) {
        if let Some(last) = self.words.len().checked_sub(1) {
            self.words[last] &= self.word_mask(last);
        }
    }

    fn recount(&mut self) {
        self.ones = self.words.iter().map(|w| w.count_ones()).sum();
    }

    fn first_from(&self, from: u32, zero: bool) -> Option<u32> {
        if from >= self.len {
            return None;
        }
        let first = (from / 64) as usize;
        for wi in first..self.words.len() {
            let mut w = if zero {
                !self.words[wi]
            } else {
                self.words[wi]
            };
            w &= self.word_mask(wi);
            if wi == first {
                w &= u64::MAX << (from % 64);
            }
            if w != 0 {
                return Some(wi as u32 * 64 + w.trailing_zeros());
            }
        }
        None
    }
}

fn check_len(len: u32) -> Result<(), ChunkError> {
    if len > MAX_CHUNKS {
        return Err(ChunkError::TooManyChunks {
            count: u64::from(len),
        });
    }
    Ok(())
}

/// The positions of the set bits of a word, lowest first.
struct BitsOf(u64);

impl Iterator for BitsOf {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(b)
    }
}

impl fmt::Debug for Bitfield {
    /// `Bitfield(3/10: 0-1,5)`: set count, length and the first runs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bitfield({}/{}:", self.ones, self.len)?;
        let mut runs = 0;
        let mut ones = self.iter_ones().peekable();
        while let Some(start) = ones.next() {
            if runs == 16 {
                return f.write_str(" …)");
            }
            let mut end = start;
            while ones.peek() == Some(&(end + 1)) {
                end += 1;
                ones.next();
            }
            let sep = if runs == 0 { " " } else { "," };
            if end == start {
                write!(f, "{sep}{start}")?;
            } else {
                write!(f, "{sep}{start}-{end}")?;
            }
            runs += 1;
        }
        f.write_str(")")
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct BitfieldJson<S> {
    len: u32,
    bits: S,
}

impl serde::Serialize for Bitfield {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        BitfieldJson {
            len: self.len,
            bits: base64::engine::general_purpose::STANDARD.encode(self.to_bytes()),
        }
        .serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for Bitfield {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let raw = BitfieldJson::<String>::deserialize(d)?;
        check_len(raw.len).map_err(D::Error::custom)?;
        // Refuse to decode a string longer than any valid one for `len`.
        let expected = Bitfield::byte_len(raw.len);
        let chars = expected.div_ceil(3) * 4;
        if raw.bits.len() != chars {
            return Err(D::Error::custom(format_args!(
                "a bitfield of {} chunks takes {chars} base64 characters, got {}",
                raw.len,
                raw.bits.len()
            )));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(raw.bits.as_bytes())
            .map_err(|_| D::Error::custom(ChunkError::BadBase64))?;
        Bitfield::from_bytes(raw.len, &bytes).map_err(D::Error::custom)
    }
}

// ---------------------------------------------------------------------------
// Chunk hashes
// ---------------------------------------------------------------------------

/// The chunk map of one blob: its layout and the SHA-256 of each chunk, as
/// far as known. Hashes arrive chunk by chunk from the node that fetched the
/// blob from the origin; once known, a chunk's hash never changes.
#[derive(Clone, PartialEq, Eq)]
pub struct ChunkHashes {
    layout: ChunkLayout,
    hashes: Vec<Option<[u8; 32]>>,
    known: u32,
}

impl fmt::Debug for ChunkHashes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkHashes")
            .field("layout", &self.layout)
            .field("known", &self.known)
            .finish()
    }
}

impl ChunkHashes {
    /// A chunk map of `layout` with no hash known yet.
    pub fn new(layout: ChunkLayout) -> Self {
        ChunkHashes {
            layout,
            hashes: vec![None; layout.count() as usize],
            known: 0,
        }
    }

    /// A chunk map from one entry per chunk of `layout`.
    pub fn from_hashes(
        layout: ChunkLayout,
        hashes: Vec<Option<[u8; 32]>>,
    ) -> Result<Self, ChunkError> {
        if hashes.len() != layout.count() as usize {
            return Err(ChunkError::HashCount {
                expected: layout.count(),
                actual: hashes.len(),
            });
        }
        let known = hashes.iter().filter(|h| h.is_some()).count() as u32;
        Ok(ChunkHashes {
            layout,
            hashes,
            known,
        })
    }

    /// Hashes a complete blob held in memory: its chunk map (all known) and
    /// its digest. Fails if `data` is not `layout.size()` bytes long.
    pub fn of_blob(layout: ChunkLayout, data: &[u8]) -> Result<(Self, Digest), ChunkError> {
        let mut map = ChunkHashes::new(layout);
        let mut hasher = ChunkHasher::new(layout);
        hasher.update(data, |i, h| {
            map.hashes[i as usize] = Some(h);
            map.known += 1;
        })?;
        let digest = hasher.finish()?;
        Ok((map, digest))
    }

    /// The layout the hashes refer to.
    pub fn layout(&self) -> ChunkLayout {
        self.layout
    }

    /// One entry per chunk, `None` where the hash is not known yet.
    pub fn hashes(&self) -> &[Option<[u8; 32]>] {
        &self.hashes
    }

    /// The hash of chunk `index`, if known (`None` past the end too).
    pub fn get(&self, index: u32) -> Option<[u8; 32]> {
        self.hashes.get(index as usize).copied().flatten()
    }

    /// Records the hash of chunk `index`. Recording the same hash again is
    /// fine; a different hash for a known chunk is a [`ChunkError::Conflict`].
    pub fn set(&mut self, index: u32, hash: [u8; 32]) -> Result<(), ChunkError> {
        let count = self.layout.count();
        let slot = self
            .hashes
            .get_mut(index as usize)
            .ok_or(ChunkError::IndexOutOfRange { index, count })?;
        match slot {
            Some(known) if *known == hash => Ok(()),
            Some(known) => Err(ChunkError::Conflict {
                index,
                known: *known,
                new: hash,
            }),
            None => {
                *slot = Some(hash);
                self.known += 1;
                Ok(())
            }
        }
    }

    /// The chunks whose hash is known.
    pub fn known(&self) -> Bitfield {
        let mut b = Bitfield::for_layout(&self.layout);
        for (i, h) in self.hashes.iter().enumerate() {
            if h.is_some() {
                // `i` is below the layout's count, which is the bitfield's length.
                let _ = b.set(i as u32);
            }
        }
        b
    }

    /// How many chunk hashes are known, in O(1).
    pub fn known_count(&self) -> u32 {
        self.known
    }

    /// Whether every chunk hash is known.
    pub fn is_complete(&self) -> bool {
        self.known == self.layout.count()
    }

    /// Checks `data` as chunk `index`: its length against the layout, then its
    /// SHA-256 against the known hash.
    pub fn verify(&self, index: u32, data: &[u8]) -> Result<(), ChunkError> {
        let count = self.layout.count();
        let expected_len = self
            .layout
            .chunk_len(index)
            .ok_or(ChunkError::IndexOutOfRange { index, count })?;
        if data.len() != expected_len as usize {
            return Err(ChunkError::BadLength {
                index,
                expected: expected_len,
                actual: data.len(),
            });
        }
        let expected = self.get(index).ok_or(ChunkError::UnknownHash { index })?;
        let actual: [u8; 32] = Sha256::digest(data).into();
        if actual == expected {
            Ok(())
        } else {
            Err(ChunkError::Mismatch {
                index,
                expected,
                actual,
            })
        }
    }
}

// ---------------------------------------------------------------------------
// Hashing a stream
// ---------------------------------------------------------------------------

/// Hashes a blob as it streams past, however it is sliced: each chunk's
/// SHA-256 as soon as the chunk is complete, and the blob's [`Digest`] at the
/// end, in one pass over the bytes.
///
/// The layout's size is trusted: bytes past it are an error
/// ([`ChunkError::TooLong`]), and so is ending before it
/// ([`ChunkError::TooShort`]).
#[derive(Clone)]
pub struct ChunkHasher {
    layout: ChunkLayout,
    chunk: Sha256,
    whole: Sha256,
    pos: u64,
    overflowed: bool,
}

impl fmt::Debug for ChunkHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkHasher")
            .field("layout", &self.layout)
            .field("pos", &self.pos)
            .field("overflowed", &self.overflowed)
            .finish()
    }
}

impl ChunkHasher {
    /// Starts hashing a blob laid out as `layout`.
    pub fn new(layout: ChunkLayout) -> Self {
        ChunkHasher {
            layout,
            chunk: Sha256::new(),
            whole: Sha256::new(),
            pos: 0,
            overflowed: false,
        }
    }

    /// Bytes hashed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Feeds the next bytes, calling `on_chunk(index, hash)` for every chunk
    /// they complete, in order. Bytes past the layout's size are not hashed:
    /// the chunks before them are still reported, then this (and
    /// [`finish`](ChunkHasher::finish)) fails with [`ChunkError::TooLong`].
    pub fn update(
        &mut self,
        data: &[u8],
        mut on_chunk: impl FnMut(u32, [u8; 32]),
    ) -> Result<(), ChunkError> {
        let size = self.layout.size;
        let room = size - self.pos;
        let (mut data, overflow) = if data.len() as u64 > room {
            (&data[..room as usize], true)
        } else {
            (data, false)
        };
        let cs = u64::from(self.layout.chunk_size);
        while !data.is_empty() {
            let index = self.pos / cs;
            let chunk_end = ((index + 1) * cs).min(size);
            let n = (chunk_end - self.pos).min(data.len() as u64) as usize;
            let (now, rest) = data.split_at(n);
            self.chunk.update(now);
            self.whole.update(now);
            self.pos += n as u64;
            data = rest;
            if self.pos == chunk_end {
                on_chunk(index as u32, self.chunk.finalize_reset().into());
            }
        }
        if overflow {
            self.overflowed = true;
        }
        if self.overflowed {
            return Err(ChunkError::TooLong { size });
        }
        Ok(())
    }

    /// Finishes: the blob's digest, if exactly the layout's size was fed.
    pub fn finish(self) -> Result<Digest, ChunkError> {
        let size = self.layout.size;
        if self.overflowed {
            return Err(ChunkError::TooLong { size });
        }
        if self.pos < size {
            return Err(ChunkError::TooShort {
                size,
                actual: self.pos,
            });
        }
        Ok(Digest::from_bytes(self.whole.finalize().into()))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const K64: u32 = 64 << 10;

    fn sha(data: &[u8]) -> [u8; 32] {
        Sha256::digest(data).into()
    }

    #[test]
    fn layout_basics() {
        let l = ChunkLayout::new(3 * u64::from(K64) + 5, K64).unwrap();
        assert_eq!(l.count(), 4);
        assert_eq!(l.range(0), Some((0, K64)));
        assert_eq!(l.range(3), Some((3 * u64::from(K64), 5)));
        assert_eq!(l.range(4), None);
        assert_eq!(l.chunk_of(u64::from(K64)), Some(1));
        assert_eq!(l.chunk_of(l.size()), None);
        assert_eq!(l.chunks_overlapping(10, 10), 0..1);
        assert_eq!(
            l.chunks_overlapping(u64::from(K64) - 1, u64::from(K64)),
            0..2
        );
        assert_eq!(l.chunks_overlapping(0, u64::MAX), 0..4);
        assert_eq!(l.chunks_overlapping(l.size(), u64::MAX), 0..0);
        assert_eq!(l.chunks_overlapping(5, 4), 0..0);

        let empty = ChunkLayout::new(0, DEFAULT_CHUNK_SIZE).unwrap();
        assert_eq!(empty.count(), 0);
        assert_eq!(empty.range(0), None);
        assert_eq!(empty.chunk_of(0), None);
        assert_eq!(empty.chunks_overlapping(0, 0), 0..0);
    }

    #[test]
    fn layout_rejects() {
        assert_eq!(ChunkLayout::new(1, 0), Err(ChunkError::BadChunkSize(0)));
        assert_eq!(
            ChunkLayout::new(1, K64 + 1),
            Err(ChunkError::BadChunkSize(K64 + 1))
        );
        assert_eq!(
            ChunkLayout::new(1, K64 / 2),
            Err(ChunkError::BadChunkSize(K64 / 2))
        );
        assert_eq!(
            ChunkLayout::new(1, MAX_CHUNK_SIZE * 2),
            Err(ChunkError::BadChunkSize(MAX_CHUNK_SIZE * 2))
        );
        let max = u64::from(MAX_CHUNKS) * u64::from(K64);
        assert!(ChunkLayout::new(max, K64).is_ok());
        assert_eq!(
            ChunkLayout::new(max + 1, K64),
            Err(ChunkError::TooManyChunks {
                count: u64::from(MAX_CHUNKS) + 1
            })
        );
        assert!(ChunkLayout::new(u64::MAX, MAX_CHUNK_SIZE).is_err());
        let json = r#"{"size":10,"chunk_size":1000}"#;
        assert!(serde_json::from_str::<ChunkLayout>(json).is_err());
        let l: ChunkLayout = serde_json::from_str(r#"{"size":10,"chunk_size":65536}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&l).unwrap(),
            r#"{"size":10,"chunk_size":65536}"#
        );
    }

    #[test]
    fn layout_for_blob() {
        assert_eq!(
            ChunkLayout::for_blob(0).unwrap().chunk_size(),
            DEFAULT_CHUNK_SIZE
        );
        assert_eq!(
            ChunkLayout::for_blob(1 << 30).unwrap().chunk_size(),
            DEFAULT_CHUNK_SIZE
        );
        let big = u64::from(MAX_CHUNKS) * u64::from(DEFAULT_CHUNK_SIZE) + 1;
        assert_eq!(
            ChunkLayout::for_blob(big).unwrap().chunk_size(),
            DEFAULT_CHUNK_SIZE * 2
        );
        let too_big = u64::from(MAX_CHUNKS) * u64::from(MAX_CHUNK_SIZE) + 1;
        assert!(ChunkLayout::for_blob(too_big).is_err());
        assert_eq!(
            ChunkLayout::for_blob_with(1 << 30, MIN_CHUNK_SIZE)
                .unwrap()
                .chunk_size(),
            MIN_CHUNK_SIZE
        );
        let past_min = u64::from(MAX_CHUNKS) * u64::from(MIN_CHUNK_SIZE) + 1;
        assert_eq!(
            ChunkLayout::for_blob_with(past_min, MIN_CHUNK_SIZE)
                .unwrap()
                .chunk_size(),
            MIN_CHUNK_SIZE * 2
        );
        assert_eq!(
            ChunkLayout::for_blob_with(10, 1000),
            Err(ChunkError::BadChunkSize(1000))
        );
    }

    #[test]
    fn bitfield_ops() {
        let mut b = Bitfield::new(70).unwrap();
        assert_eq!(b.count(), 0);
        assert_eq!(b.set(0), Ok(true));
        assert_eq!(b.set(0), Ok(false));
        assert_eq!(b.set(69), Ok(true));
        assert_eq!(
            b.set(70),
            Err(ChunkError::IndexOutOfRange {
                index: 70,
                count: 70
            })
        );
        assert!(!b.get(70) && !b.get(u32::MAX));
        assert_eq!(b.count(), 2);
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), [0, 69]);
        assert_eq!(b.iter_zeros().count(), 68);
        assert_eq!(b.first_zero_from(0), Some(1));
        assert_eq!(b.first_zero_from(69), None);
        assert_eq!(b.first_one_from(1), Some(69));
        assert_eq!(b.first_one_from(70), None);
        assert_eq!(b.clear(0), Ok(true));
        assert_eq!(b.clear(0), Ok(false));
        assert_eq!(format!("{b:?}"), "Bitfield(1/70: 69)");

        let full = Bitfield::full(70).unwrap();
        assert!(full.is_full());
        assert_eq!(full.count(), 70);
        assert_eq!(full.iter_zeros().next(), None);
        assert_eq!(full.first_zero_from(0), None);
        assert_eq!(format!("{full:?}"), "Bitfield(70/70: 0-69)");
        assert_eq!(full.difference(&b).count(), 69);
        assert!(full.intersects(&b));
        assert!(!full.difference(&b).intersects(&b));

        // Different lengths behave as plain sets.
        let mut short = Bitfield::new(3).unwrap();
        short.union_with(&full);
        assert!(short.is_full());
        assert_eq!(short.count(), 3);
        assert_eq!(full.difference(&short).count(), 67);

        assert!(Bitfield::new(MAX_CHUNKS).is_ok());
        assert!(Bitfield::new(MAX_CHUNKS + 1).is_err());
        assert!(Bitfield::full(0).unwrap().is_full());
    }

    #[test]
    fn bitfield_bytes_golden() {
        let mut b = Bitfield::new(10).unwrap();
        b.set(0).unwrap();
        b.set(7).unwrap();
        b.set(9).unwrap();
        // MSB-first: chunk 0 is 0x80 of byte 0, chunk 9 is 0x40 of byte 1.
        assert_eq!(b.to_bytes(), [0x81, 0x40]);
        assert_eq!(Bitfield::from_bytes(10, &[0x81, 0x40]).unwrap(), b);
        assert_eq!(
            Bitfield::from_bytes(10, &[0x81, 0x60]),
            Err(ChunkError::PaddingBitsSet { len: 10 })
        );
        assert_eq!(
            Bitfield::from_bytes(10, &[0x81]),
            Err(ChunkError::BitfieldBytes {
                len: 10,
                expected: 2,
                actual: 1
            })
        );
        assert_eq!(
            Bitfield::from_bytes(MAX_CHUNKS + 1, &[]),
            Err(ChunkError::TooManyChunks {
                count: u64::from(MAX_CHUNKS) + 1
            })
        );
        assert_eq!(Bitfield::new(0).unwrap().to_bytes(), Vec::<u8>::new());
    }

    #[test]
    fn bitfield_json() {
        let mut b = Bitfield::new(10).unwrap();
        b.set(0).unwrap();
        b.set(9).unwrap();
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(json, r#"{"len":10,"bits":"gEA="}"#);
        assert_eq!(serde_json::from_str::<Bitfield>(&json).unwrap(), b);
        for bad in [
            r#"{"len":10,"bits":"gEB="}"#,     // padding bits set
            r#"{"len":10,"bits":"gE"}"#,       // wrong length
            r#"{"len":10,"bits":"g!A="}"#,     // not base64
            r#"{"len":10,"bits":"gEAAAA=="}"#, // too long
            r#"{"len":4294967295,"bits":""}"#,
            r#"{"bits":"gEA="}"#,
        ] {
            assert!(serde_json::from_str::<Bitfield>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hashes_set_and_verify() {
        let layout = ChunkLayout::new(u64::from(K64) + 10, K64).unwrap();
        let data: Vec<u8> = (0..layout.size()).map(|i| i as u8).collect();
        let (c0, c1) = data.split_at(K64 as usize);
        let mut map = ChunkHashes::new(layout);
        assert_eq!(map.verify(0, c0), Err(ChunkError::UnknownHash { index: 0 }));
        assert_eq!(
            map.verify(0, c1),
            Err(ChunkError::BadLength {
                index: 0,
                expected: K64,
                actual: 10
            })
        );
        assert_eq!(
            map.verify(2, c1),
            Err(ChunkError::IndexOutOfRange { index: 2, count: 2 })
        );
        map.set(0, sha(c0)).unwrap();
        map.set(0, sha(c0)).unwrap();
        assert_eq!(
            map.set(0, sha(c1)),
            Err(ChunkError::Conflict {
                index: 0,
                known: sha(c0),
                new: sha(c1)
            })
        );
        assert!(map.set(2, sha(c1)).is_err());
        assert_eq!(map.known_count(), 1);
        assert_eq!(map.known().iter_ones().collect::<Vec<_>>(), [0]);
        assert!(!map.is_complete());
        assert_eq!(map.verify(0, c0), Ok(()));
        let mut bad = c0.to_vec();
        bad[7] ^= 1;
        assert_eq!(
            map.verify(0, &bad),
            Err(ChunkError::Mismatch {
                index: 0,
                expected: sha(c0),
                actual: sha(&bad)
            })
        );
        let (full, digest) = ChunkHashes::of_blob(layout, &data).unwrap();
        assert!(full.is_complete());
        assert_eq!(full.get(1), Some(sha(c1)));
        assert_eq!(digest, Digest::of(&data));
        assert_eq!(
            ChunkHashes::from_hashes(layout, full.hashes().to_vec()).unwrap(),
            full
        );
        assert!(ChunkHashes::from_hashes(layout, vec![None]).is_err());
    }

    #[test]
    fn hasher_length_errors() {
        let layout = ChunkLayout::new(10, K64).unwrap();
        let mut got = Vec::new();
        let mut h = ChunkHasher::new(layout);
        assert_eq!(
            h.update(&[1; 12], |i, x| got.push((i, x))),
            Err(ChunkError::TooLong { size: 10 })
        );
        assert_eq!(got, [(0, sha(&[1; 10]))]);
        assert_eq!(
            h.update(&[], |_, _| {}),
            Err(ChunkError::TooLong { size: 10 })
        );
        assert_eq!(h.finish(), Err(ChunkError::TooLong { size: 10 }));

        let mut h = ChunkHasher::new(layout);
        h.update(&[1; 4], |_, _| panic!("no chunk yet")).unwrap();
        assert_eq!(
            h.finish(),
            Err(ChunkError::TooShort {
                size: 10,
                actual: 4
            })
        );

        let empty = ChunkLayout::new(0, K64).unwrap();
        let (map, d) = ChunkHashes::of_blob(empty, b"").unwrap();
        assert!(map.is_complete());
        assert_eq!(d, Digest::of(b""));
    }

    fn arb_layout() -> impl Strategy<Value = ChunkLayout> {
        (
            0u32..=6,
            0u64..=u64::from(MAX_CHUNKS) * u64::from(MAX_CHUNK_SIZE),
        )
            .prop_map(|(shift, size)| {
                let cs = MIN_CHUNK_SIZE << shift;
                ChunkLayout::new(size.min(u64::from(MAX_CHUNKS) * u64::from(cs)), cs).unwrap()
            })
    }

    /// Cuts `data` into pieces at the given fractions.
    fn slices(data: &[u8], cuts: &[prop::sample::Index]) -> Vec<std::ops::Range<usize>> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(data.len() + 1)).collect();
        at.push(0);
        at.push(data.len());
        at.sort_unstable();
        at.windows(2).map(|w| w[0]..w[1]).collect()
    }

    proptest! {
        #[test]
        fn layout_ranges_tile(layout in arb_layout(), probe in any::<prop::sample::Index>()) {
            let n = layout.count();
            prop_assert!(n <= MAX_CHUNKS);
            prop_assert_eq!(layout.range(n), None);
            if n > 0 {
                // Tiling, checked at both ends and a random inner chunk.
                for i in [0, n - 1, probe.index(n as usize) as u32] {
                    let (off, len) = layout.range(i).unwrap();
                    prop_assert!(len > 0 && len <= layout.chunk_size());
                    prop_assert_eq!(off, u64::from(i) * u64::from(layout.chunk_size()));
                    if i + 1 < n {
                        prop_assert_eq!(len, layout.chunk_size());
                    } else {
                        prop_assert_eq!(off + u64::from(len), layout.size());
                    }
                    prop_assert_eq!(layout.chunk_of(off), Some(i));
                    prop_assert_eq!(layout.chunk_of(off + u64::from(len) - 1), Some(i));
                    prop_assert_eq!(layout.chunks_overlapping(off, off + u64::from(len) - 1), i..i + 1);
                }
            } else {
                prop_assert_eq!(layout.size(), 0);
            }
        }

        #[test]
        fn small_layouts_tile_exactly(size in 0u64..2_000_000, shift in 0u32..=6) {
            let layout = ChunkLayout::new(size, MIN_CHUNK_SIZE << shift).unwrap();
            let mut next = 0;
            for i in 0..layout.count() {
                let (off, len) = layout.range(i).unwrap();
                prop_assert_eq!(off, next);
                next += u64::from(len);
            }
            prop_assert_eq!(next, size);
        }

        #[test]
        fn chunk_of_inverts_range(layout in arb_layout(), offset in any::<u64>()) {
            let offset = if layout.size() == 0 { offset } else { offset % (layout.size() + 1) };
            match layout.chunk_of(offset) {
                Some(i) => {
                    let (off, len) = layout.range(i).unwrap();
                    prop_assert!(off <= offset && offset < off + u64::from(len));
                }
                None => prop_assert!(offset >= layout.size()),
            }
        }

        #[test]
        fn bitfield_roundtrip(bits in prop::collection::vec(any::<bool>(), 0..300)) {
            let len = bits.len() as u32;
            let mut b = Bitfield::new(len).unwrap();
            for (i, &on) in bits.iter().enumerate() {
                if on {
                    b.set(i as u32).unwrap();
                }
            }
            prop_assert_eq!(b.count() as usize, bits.iter().filter(|x| **x).count());
            let ones: Vec<u32> = (0..len).filter(|&i| bits[i as usize]).collect();
            let zeros: Vec<u32> = (0..len).filter(|&i| !bits[i as usize]).collect();
            prop_assert_eq!(b.iter_ones().collect::<Vec<_>>(), ones.clone());
            prop_assert_eq!(b.iter_zeros().collect::<Vec<_>>(), zeros.clone());
            for from in 0..=len {
                prop_assert_eq!(b.first_zero_from(from), zeros.iter().copied().find(|&z| z >= from));
                prop_assert_eq!(b.first_one_from(from), ones.iter().copied().find(|&z| z >= from));
            }
            let bytes = b.to_bytes();
            prop_assert_eq!(bytes.len(), len.div_ceil(8) as usize);
            for i in 0..len {
                let on = bytes[(i / 8) as usize] & (0x80 >> (i % 8)) != 0;
                prop_assert_eq!(on, bits[i as usize]);
            }
            prop_assert_eq!(&Bitfield::from_bytes(len, &bytes).unwrap(), &b);
            let json = serde_json::to_string(&b).unwrap();
            prop_assert_eq!(&serde_json::from_str::<Bitfield>(&json).unwrap(), &b);
        }

        #[test]
        fn bitfield_set_ops(a in prop::collection::vec(any::<bool>(), 0..200),
                            b in prop::collection::vec(any::<bool>(), 0..200)) {
            let mk = |v: &[bool]| {
                let mut f = Bitfield::new(v.len() as u32).unwrap();
                for (i, &on) in v.iter().enumerate() {
                    if on {
                        f.set(i as u32).unwrap();
                    }
                }
                f
            };
            let (fa, fb) = (mk(&a), mk(&b));
            let at = |v: &[bool], i: usize| v.get(i).copied().unwrap_or(false);
            let mut u = fa.clone();
            u.union_with(&fb);
            let d = fa.difference(&fb);
            prop_assert_eq!(u.len(), fa.len());
            prop_assert_eq!(d.len(), fa.len());
            for (i, &on) in a.iter().enumerate() {
                prop_assert_eq!(u.get(i as u32), on || at(&b, i));
                prop_assert_eq!(d.get(i as u32), on && !at(&b, i));
            }
            prop_assert_eq!(u.count() as usize, u.iter_ones().count());
            prop_assert_eq!(d.count() as usize, d.iter_ones().count());
            let inter = (0..a.len()).any(|i| a[i] && at(&b, i));
            prop_assert_eq!(fa.intersects(&fb), inter);
            prop_assert_eq!(fb.intersects(&fa), inter);
            let both: Vec<u32> = (0..a.len())
                .filter(|&i| a[i] && at(&b, i))
                .map(|i| i as u32)
                .collect();
            prop_assert_eq!(fa.iter_and(&fb).collect::<Vec<_>>(), both.clone());
            prop_assert_eq!(fb.iter_and(&fa).collect::<Vec<_>>(), both);
            let common = a.len().min(b.len());
            let changed: Vec<(u32, bool)> = (0..common)
                .filter(|&i| a[i] != b[i])
                .map(|i| (i as u32, b[i]))
                .collect();
            prop_assert_eq!(fa.changes(&fb).collect::<Vec<_>>(), changed);
            let none = Bitfield::new(0).unwrap();
            let outside = (0..a.len()).any(|i| a[i] && !at(&b, i));
            prop_assert_eq!(fa.has_any_outside(&fb, &none), outside);
            prop_assert_eq!(fa.has_any_outside(&none, &fb), outside);
            prop_assert!(!fa.has_any_outside(&fa, &none));
        }

        #[test]
        fn bitfield_from_bytes_never_panics(len in any::<u32>(), bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = Bitfield::from_bytes(len, &bytes);
            let small = len % 520;
            if let Ok(b) = Bitfield::from_bytes(small, &bytes) {
                prop_assert_eq!(b.to_bytes(), bytes);
            }
        }

        #[test]
        fn bitfield_json_never_panics(len in any::<u32>(), bits in "[A-Za-z0-9+/=!]{0,40}") {
            let json = serde_json::json!({ "len": len, "bits": bits }).to_string();
            let _ = serde_json::from_str::<Bitfield>(&json);
        }

        #[test]
        fn hasher_matches_separate_hashing(
            size in 0usize..400_000,
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
            seed in any::<u8>(),
        ) {
            let data: Vec<u8> = (0..size).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
            let layout = ChunkLayout::new(size as u64, MIN_CHUNK_SIZE).unwrap();
            let mut h = ChunkHasher::new(layout);
            let mut got = Vec::new();
            for r in slices(&data, &cuts) {
                h.update(&data[r], |i, x| got.push((i, x))).unwrap();
            }
            prop_assert_eq!(h.position(), size as u64);
            let want: Vec<(u32, [u8; 32])> = (0..layout.count())
                .map(|i| {
                    let (off, len) = layout.range(i).unwrap();
                    (i, sha(&data[off as usize..off as usize + len as usize]))
                })
                .collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(h.finish().unwrap(), Digest::of(&data));
        }
    }
}
