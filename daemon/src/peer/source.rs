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

use std::io;
use std::os::unix::fs::FileExt;

use bytes::{Bytes, BytesMut};
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
}

impl NodeSource {
    /// Serves `store` and the running `transfers`, laying complete blobs
    /// out with the cluster's `chunk_size`.
    pub fn new(store: Store, transfers: crate::transfer::Transfers, chunk_size: u32) -> Self {
        NodeSource {
            store: StoreSource::with_chunk_size(store, chunk_size),
            transfers,
        }
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
}
