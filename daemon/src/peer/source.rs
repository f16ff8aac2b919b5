//! What a node serves to its peers: chunks of verified bytes, and nothing
//! else.
//!
//! The server asks a [`ChunkSource`] for the layout of a requested blob, then
//! for each chunk. [`StoreSource`] serves the store's **complete** blobs,
//! which were verified against their digest before the store marked them
//! complete; chunks of blobs still arriving will come from the transfer code
//! through the same trait (each verified against the chunk map when stored).
//!
//! The trait is synchronous: the store is `std::fs` plus an in-memory index,
//! so `layout` and `bitfield` are a lock and a lookup, and `chunk` is one
//! `pread`. The server runs `chunk` under `spawn_blocking` (at most one read
//! ahead per upload slot, so the blocking pool stays bounded by the upload
//! limit), which keeps the trait object-safe without boxing futures.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use sha2::{Digest as _, Sha256};
use shoal_proto::wire::{BlobState, MAX_STATE_HASHES};
use shoal_proto::{Bitfield, ChunkError, ChunkLayout, Digest};
use tokio::sync::watch;

use crate::store::Store;
use crate::transfer::Progress;

/// Verified chunks this node can serve.
pub trait ChunkSource: Send + Sync {
    /// How `blob` splits into chunks of `chunk_size` here: `Ok(None)` if this
    /// node holds nothing of it, `Err` if it holds the blob but cannot lay it
    /// out with that chunk size (the request is then a bad one). Must be cheap
    /// (no disk I/O): it runs on the async runtime.
    fn layout(&self, blob: &Digest, chunk_size: u32) -> Result<Option<ChunkLayout>, ChunkError>;

    /// The bytes of chunk `index` of `blob` under `layout`, only if they were
    /// verified; `Ok(None)` if this node does not hold them (any more, or not
    /// under this layout). May block on disk.
    fn chunk(&self, blob: &Digest, layout: ChunkLayout, index: u32) -> io::Result<Option<Bytes>>;

    /// The layout this node uses for `blob` and which of its chunks it
    /// holds, or `None` if it holds nothing of it. Must be cheap.
    fn bitfield(&self, blob: &Digest) -> Option<(ChunkLayout, Bitfield)>;

    /// While `blob` is still arriving here, a receiver that changes as its
    /// chunks are stored (and closes when its transfer ends), so watchers
    /// hear of them; `None` otherwise.
    fn arrivals(&self, _blob: &Digest) -> Option<watch::Receiver<Progress>> {
        None
    }

    /// The blob's size, the chunks held and the hashes this node vouches
    /// for (all of a complete blob, whose digest was checked; of a blob
    /// still arriving, those it fetched from the origin and hashed itself),
    /// or `None` if it holds nothing of it. May block on disk.
    fn state(&self, _blob: &Digest) -> io::Result<Option<BlobState>> {
        Ok(None)
    }
}

/// Chunk hashes this node computed itself from origin bytes, per blob still
/// arriving: what it vouches for to members that ask (`GetState`) while no
/// tracker holds the published hashes. Recorded as the transfer publishes
/// them; bounded to the [`Vouched::MAX_BLOBS`] most recent blobs.
#[derive(Debug, Clone, Default)]
pub struct Vouched(Arc<Mutex<VouchedInner>>);

#[derive(Debug, Default)]
struct VouchedInner {
    blobs: HashMap<Digest, BTreeMap<u32, [u8; 32]>>,
    order: VecDeque<Digest>,
    /// Hashes held over all blobs.
    total: usize,
    /// Chunks this node holds origin leases on, until when.
    leased: HashMap<Digest, HashMap<u32, std::time::Instant>>,
}

impl Vouched {
    /// Blobs whose vouched hashes are kept.
    pub const MAX_BLOBS: usize = 256;
    /// Hashes kept over all blobs (32 MiB).
    pub const MAX_HASHES: usize = 1 << 20;

    /// Records hashes of origin chunks of `blob` (or, once it is complete,
    /// of all its chunks).
    pub fn record(&self, blob: &Digest, hashes: impl IntoIterator<Item = (u32, [u8; 32])>) {
        self.add(blob, hashes, true);
    }

    /// Records hashes of chunks of `blob` that have none recorded yet (a
    /// hash this node computed from origin bytes is never replaced).
    pub fn fill(&self, blob: &Digest, hashes: impl IntoIterator<Item = (u32, [u8; 32])>) {
        self.add(blob, hashes, false);
    }

    fn add(&self, blob: &Digest, hashes: impl IntoIterator<Item = (u32, [u8; 32])>, replace: bool) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !g.blobs.contains_key(blob) {
            g.order.push_back(*blob);
        }
        let entry = g.blobs.entry(*blob).or_default();
        let before = entry.len();
        for (i, h) in hashes {
            if replace {
                entry.insert(i, h);
            } else {
                entry.entry(i).or_insert(h);
            }
        }
        let added = entry.len() - before;
        g.total += added;
        while (g.order.len() > Self::MAX_BLOBS || g.total > Self::MAX_HASHES) && g.order.len() > 1 {
            let Some(old) = g.order.pop_front() else {
                break;
            };
            if let Some(m) = g.blobs.remove(&old) {
                g.total -= m.len();
            }
        }
    }

    /// This node holds origin leases on `chunks` of `blob` until `until`:
    /// it is fetching them, and says so in its `State`.
    pub fn leased(&self, blob: &Digest, chunks: &[u32], until: std::time::Instant) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        g.leased.retain(|_, m| {
            m.retain(|_, t| *t > now);
            !m.is_empty()
        });
        if g.leased.len() < Self::MAX_BLOBS {
            let m = g.leased.entry(*blob).or_default();
            for &i in chunks.iter().take(MAX_STATE_HASHES as usize) {
                m.insert(i, until);
            }
        }
    }

    /// The chunks of `blob` (of `count`) this node is fetching from the
    /// origin now, leaving out those in `have`.
    pub fn fetching(&self, blob: &Digest, count: u32, have: &Bitfield) -> Bitfield {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut bits = Bitfield::new(count).expect("a layout's count");
        let now = std::time::Instant::now();
        if let Some(m) = g.leased.get(blob) {
            for (&i, t) in m {
                if *t > now && i < count && !have.get(i) {
                    let _ = bits.set(i);
                }
            }
        }
        bits
    }

    /// Every chunk hash of `blob` under `layout`, if all are recorded (the
    /// blob completed here with its digest checked).
    pub fn all(&self, blob: &Digest, count: u32) -> Option<Vec<[u8; 32]>> {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let m = g.blobs.get(blob)?;
        if m.len() != count as usize || m.keys().next_back() != count.checked_sub(1).as_ref() {
            return None;
        }
        Some(m.values().copied().collect())
    }

    /// The vouched chunks among `have` and their hashes, in index order.
    pub fn among(&self, blob: &Digest, have: &Bitfield) -> (Bitfield, Vec<[u8; 32]>) {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut bits = Bitfield::new(have.len()).expect("same length as a valid bitfield");
        let mut hashes = Vec::new();
        if let Some(m) = g.blobs.get(blob) {
            for (&i, h) in m {
                if have.get(i) && hashes.len() < MAX_STATE_HASHES as usize {
                    let _ = bits.set(i);
                    hashes.push(*h);
                }
            }
        }
        (bits, hashes)
    }
}

/// Serves the complete (digest-verified) blobs of the store.
#[derive(Debug, Clone)]
pub struct StoreSource {
    store: Store,
    chunk_size: u32,
}

impl StoreSource {
    /// A source over `store`'s complete blobs, laid out with the default
    /// chunk size.
    pub fn new(store: Store) -> Self {
        Self::with_chunk_size(store, shoal_proto::chunk::DEFAULT_CHUNK_SIZE)
    }

    /// A source whose bitfields lay blobs out with the cluster's
    /// `chunk_size` (chunk requests name their own).
    pub fn with_chunk_size(store: Store, chunk_size: u32) -> Self {
        StoreSource { store, chunk_size }
    }

    fn complete_size(&self, blob: &Digest) -> Option<u64> {
        self.store.meta(blob).filter(|m| m.complete).map(|m| m.size)
    }
}

impl ChunkSource for StoreSource {
    fn layout(&self, blob: &Digest, chunk_size: u32) -> Result<Option<ChunkLayout>, ChunkError> {
        self.complete_size(blob)
            .map(|size| ChunkLayout::new(size, chunk_size))
            .transpose()
    }

    fn chunk(&self, blob: &Digest, layout: ChunkLayout, index: u32) -> io::Result<Option<Bytes>> {
        // The open file (and its read guard) keeps eviction from removing
        // the blob under the read; it was verified when it became complete.
        let Some(open) = self.store.open_complete(blob) else {
            return Ok(None);
        };
        if open.size != layout.size() {
            return Ok(None);
        }
        let Some((offset, len)) = layout.range(index) else {
            return Ok(None);
        };
        let mut buf = BytesMut::zeroed(len as usize);
        open.file.read_exact_at(&mut buf, offset)?;
        Ok(Some(buf.freeze()))
    }

    fn bitfield(&self, blob: &Digest) -> Option<(ChunkLayout, Bitfield)> {
        // Every member lays a blob out the same way (`for_blob_with` the
        // cluster's chunk size), so the answer lines up with the tracker's
        // chunk map.
        let layout = ChunkLayout::for_blob_with(self.complete_size(blob)?, self.chunk_size).ok()?;
        let bits = Bitfield::full(layout.count()).ok()?;
        Some((layout, bits))
    }
}

/// Serves complete blobs from the store and, for blobs still arriving, the
/// chunks their transfer has stored — each verified on the way in (hashed
/// from the origin by this node, or checked against the chunk map when a
/// peer sent it) — so a cold image spreads through the cluster as a
/// pipeline.
#[derive(Debug, Clone)]
pub struct NodeSource {
    store: StoreSource,
    transfers: crate::transfer::Transfers,
    vouched: Vouched,
    /// States of complete blobs (their chunk hashes cost a read of the
    /// whole blob), most recent [`STATE_CACHE`].
    states: Arc<Mutex<VecDeque<Arc<BlobState>>>>,
}

/// How many complete blobs' states a [`NodeSource`] keeps.
const STATE_CACHE: usize = 64;

impl NodeSource {
    /// Serves `store` and the running `transfers`, laying complete blobs
    /// out with the cluster's `chunk_size`.
    pub fn new(store: Store, transfers: crate::transfer::Transfers, chunk_size: u32) -> Self {
        Self::vouching(store, transfers, chunk_size, Vouched::default())
    }

    /// [`new`](Self::new), vouching for the origin chunk hashes `vouched`
    /// records while blobs arrive.
    pub fn vouching(
        store: Store,
        transfers: crate::transfer::Transfers,
        chunk_size: u32,
        vouched: Vouched,
    ) -> Self {
        NodeSource {
            store: StoreSource::with_chunk_size(store, chunk_size),
            transfers,
            vouched,
            states: Arc::default(),
        }
    }

    /// The state of a complete blob: every chunk hashed from the verified
    /// file (once; then cached).
    fn complete_state(&self, blob: &Digest) -> io::Result<Option<BlobState>> {
        // Only while the store holds it complete (an evicted blob's cached
        // state would promise chunks no longer here).
        let Some((layout, have)) = self.store.bitfield(blob) else {
            return Ok(None);
        };
        {
            let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(st) = states
                .iter()
                .find(|s| s.blob == *blob && s.size == layout.size())
            {
                return Ok(Some(BlobState::clone(st)));
            }
        }
        let n = layout.count().min(MAX_STATE_HASHES);
        let mut vouched = Bitfield::new(layout.count()).expect("a valid layout's count");
        for i in 0..n {
            let _ = vouched.set(i);
        }
        let hashes = match self.vouched.all(blob, layout.count()) {
            // Recorded when its transfer completed: no need to read it.
            Some(mut all) => {
                all.truncate(n as usize);
                all
            }
            None => {
                let Some(open) = self.store.store.open_complete(blob) else {
                    return Ok(None);
                };
                let mut hashes = Vec::with_capacity(n as usize);
                let mut buf = vec![0u8; layout.chunk_size() as usize];
                for i in 0..n {
                    let (offset, len) = layout.range(i).expect("index within the layout");
                    let part = &mut buf[..len as usize];
                    open.file.read_exact_at(part, offset)?;
                    hashes.push(Sha256::digest(&*part).into());
                }
                hashes
            }
        };
        let st = BlobState {
            blob: *blob,
            size: layout.size(),
            chunk_size: layout.chunk_size(),
            fetching: Bitfield::new(layout.count()).expect("a valid layout's count"),
            have,
            vouched,
            hashes,
        };
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        if states.len() >= STATE_CACHE {
            states.pop_front();
        }
        states.push_back(Arc::new(st.clone()));
        Ok(Some(st))
    }

    fn arriving(
        &self,
        blob: &Digest,
    ) -> Option<(ChunkLayout, Bitfield, std::sync::Arc<std::fs::File>)> {
        let p = self.transfers.progress(blob)?;
        Some((p.layout?, p.have?, p.file?))
    }
}

impl ChunkSource for NodeSource {
    fn layout(&self, blob: &Digest, chunk_size: u32) -> Result<Option<ChunkLayout>, ChunkError> {
        if let Some(l) = self.store.layout(blob, chunk_size)? {
            return Ok(Some(l));
        }
        Ok(self
            .arriving(blob)
            .map(|(l, _, _)| l)
            .filter(|l| l.chunk_size() == chunk_size))
    }

    fn chunk(&self, blob: &Digest, layout: ChunkLayout, index: u32) -> io::Result<Option<Bytes>> {
        if let Some(b) = self.store.chunk(blob, layout, index)? {
            return Ok(Some(b));
        }
        let Some((l, have, file)) = self.arriving(blob) else {
            return Ok(None);
        };
        if l != layout || !have.get(index) {
            return Ok(None);
        }
        let Some((offset, len)) = layout.range(index) else {
            return Ok(None);
        };
        let mut buf = BytesMut::zeroed(len as usize);
        file.read_exact_at(&mut buf, offset)?;
        Ok(Some(buf.freeze()))
    }

    fn bitfield(&self, blob: &Digest) -> Option<(ChunkLayout, Bitfield)> {
        self.store
            .bitfield(blob)
            .or_else(|| self.arriving(blob).map(|(l, h, _)| (l, h)))
    }

    fn arrivals(&self, blob: &Digest) -> Option<watch::Receiver<Progress>> {
        self.transfers.watch(blob)
    }

    fn state(&self, blob: &Digest) -> io::Result<Option<BlobState>> {
        if let Some(st) = self.complete_state(blob)? {
            return Ok(Some(st));
        }
        let Some((layout, have, _)) = self.arriving(blob) else {
            return Ok(None);
        };
        let (vouched, hashes) = self.vouched.among(blob, &have);
        Ok(Some(BlobState {
            blob: *blob,
            size: layout.size(),
            chunk_size: layout.chunk_size(),
            fetching: self.vouched.fetching(blob, layout.count(), &have),
            have,
            vouched,
            hashes,
        }))
    }
}
