//! The blob store: verified bytes in plain files named by digest, and an
//! index in redb (state, size, kind, last access, pins, schema version).
//!
//! Layout under `--data-dir`:
//! * `blobs/sha256/<2 hex>/<64 hex>`: complete blobs, verified against their
//!   digest, fsynced (file and directory) before the index says complete;
//! * `partial/<64 hex>`: blobs still arriving, written chunk by chunk at
//!   their offsets; the index records which chunks were fsynced (`have`);
//! * `index.redb`: the index.
//!
//! On open the store reconciles files and index so that after a crash it
//! holds only verified complete blobs plus partial blobs whose recorded chunks
//! are resumed (and checked with the whole blob's digest at the end). In memory it keeps the index mirrored for fast lookups, LRU
//! order and reader counts (a blob being read is never evicted).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use shoal_proto::{Bitfield, ChunkLayout, Digest};

/// Version of the on-disk layout and index encoding.
pub const SCHEMA_VERSION: u64 = 1;

/// How long new blobs pass through unstored after the filesystem under the
/// store ran out of space.
pub const NO_SPACE_PAUSE: std::time::Duration = std::time::Duration::from_secs(30);

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const BLOBS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blobs");
const TAGS: TableDefinition<&str, &[u8]> = TableDefinition::new("tags");

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("store I/O: {0}")]
    Io(#[from] io::Error),
    /// The redb index failed.
    #[error("store index: {0}")]
    Index(#[from] redb::Error),
    /// The index was written by an incompatible version.
    #[error("store schema version {found} is not supported (this shoald uses {SCHEMA_VERSION}); use a new --data-dir")]
    Schema {
        /// What the index says.
        found: u64,
    },
    /// The filesystem ran out of space under a transfer a short while ago;
    /// new blobs pass through until [`NO_SPACE_PAUSE`] has passed.
    #[error(
        "the filesystem under the store ran out of space {0} s ago: not storing new blobs for now"
    )]
    NoSpace(u64),
    /// The quota cannot fit this blob even after evicting everything evictable.
    #[error(
        "store is full: need {need} bytes, quota {quota}, {pinned_or_busy} bytes pinned or in use"
    )]
    Full {
        /// Bytes asked for.
        need: u64,
        /// The quota.
        quota: u64,
        /// Bytes that could not be evicted.
        pinned_or_busy: u64,
    },
}

fn db<T, E: Into<redb::Error>>(r: Result<T, E>) -> Result<T, StoreError> {
    r.map_err(|e| StoreError::Index(e.into()))
}

/// Why an operator's store request (`shoalctl pin/unpin/evict`) was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Not in the store.
    #[error("{0} is not in this node's store")]
    NotStored(Digest),
    /// Still arriving.
    #[error("{0} is still being fetched")]
    Partial(Digest),
    /// Pinned: eviction refused.
    #[error("{0} is pinned: unpin it first")]
    Pinned(Digest),
    /// Being read.
    #[error("{0} is being read by {1} client(s) now")]
    InUse(Digest, usize),
    /// The index could not be written.
    #[error(transparent)]
    Store(StoreError),
}

/// What a stored blob is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A layer or config blob.
    Blob,
    /// A manifest or index.
    Manifest,
}

/// One index record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlobMeta {
    /// Complete (verified) or still arriving.
    pub complete: bool,
    /// Size in bytes (0 while unknown).
    pub size: u64,
    /// For partials: chunk size of the layout `have` refers to.
    #[serde(default)]
    pub chunk_size: u32,
    /// For partials: chunks known to be on disk (written, then fsynced,
    /// before the bit was recorded). Resumed, never trusted: the whole blob
    /// is still checked against its digest.
    #[serde(default)]
    pub have: Option<Bitfield>,
    /// Blob or manifest.
    pub kind: Kind,
    /// For manifests: the media type the origin gave.
    pub media_type: Option<String>,
    /// Seconds since the epoch of the last use.
    pub last_access: u64,
    /// Pinned blobs are never evicted.
    pub pinned: bool,
}

/// A tag's last resolution at the origin, for answering while it is down.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TagRecord {
    /// The digest the origin gave.
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Its size.
    pub size: u64,
    /// When (seconds since the epoch).
    pub resolved_at: u64,
}

#[derive(Debug)]
struct Entry {
    meta: BlobMeta,
    readers: usize,
    /// Position in least-recently-used order (higher = used later).
    lru: u64,
}

#[derive(Debug)]
struct Inner {
    entries: HashMap<Digest, Entry>,
    /// Blobs removed (evicted or dropped) since the swarm last heard of it,
    /// oldest first, at most [`DROPPED_MAX`].
    dropped: std::collections::VecDeque<Digest>,
    /// Bytes on disk counted against the quota (complete sizes + partial sizes).
    used: u64,
    /// Source of `Entry::lru` values.
    clock: u64,
}

impl Inner {
    /// Records `meta` for `d` and marks it most recently used.
    fn upsert(&mut self, d: Digest, meta: BlobMeta) {
        self.clock += 1;
        let lru = self.clock;
        let e = self.entries.entry(d).or_insert(Entry {
            meta: meta.clone(),
            readers: 0,
            lru,
        });
        e.meta = meta;
        e.lru = lru;
    }
}

/// The blob store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    root: PathBuf,
    db: Database,
    quota: u64,
    inner: Mutex<Inner>,
    /// Until when new blobs are not stored: the filesystem ran out of space
    /// under a transfer (the quota is ours; the disk is shared).
    no_space_until: Mutex<Option<std::time::Instant>>,
}

/// Keeps a blob from eviction while it is read.
#[derive(Debug)]
pub struct ReadGuard {
    store: Store,
    digest: Digest,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut inner = self.store.shared.inner.lock().expect("store lock");
        if let Some(e) = inner.entries.get_mut(&self.digest) {
            e.readers = e.readers.saturating_sub(1);
        }
    }
}

/// A complete blob opened for reading.
#[derive(Debug)]
pub struct CompleteBlob {
    /// The open file.
    pub file: File,
    /// Its size.
    pub size: u64,
    /// Its index record.
    pub meta: BlobMeta,
    /// Holds off eviction until dropped.
    pub guard: ReadGuard,
}

/// What recovery found, for the start-up log.
#[derive(Debug, Default, Clone, Copy)]
pub struct Recovery {
    /// Complete blobs kept.
    pub complete: usize,
    /// Partial prefixes kept for resuming.
    pub partial: usize,
    /// Index records or files dropped because they disagreed.
    pub dropped: usize,
    /// Verified files adopted that the index had not recorded yet.
    pub adopted: usize,
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Store {
    /// Opens (or creates) the store under `root` with a quota in bytes,
    /// reconciling index and files.
    pub fn open(root: &Path, quota: u64) -> Result<(Store, Recovery), StoreError> {
        for d in ["blobs/sha256", "partial"] {
            fs::create_dir_all(root.join(d))?;
        }
        let index = db(Database::create(root.join("index.redb")))?;
        {
            let tx = db(index.begin_write())?;
            {
                let mut meta = db(tx.open_table(META))?;
                let found = db(meta.get("schema_version"))?.map(|v| v.value());
                match found {
                    None => {
                        db(meta.insert("schema_version", SCHEMA_VERSION))?;
                    }
                    Some(SCHEMA_VERSION) => {}
                    Some(found) => return Err(StoreError::Schema { found }),
                }
                db(tx.open_table(BLOBS))?;
                db(tx.open_table(TAGS))?;
            }
            db(tx.commit())?;
        }
        let store = Store {
            shared: Arc::new(Shared {
                root: root.to_owned(),
                db: index,
                quota,
                no_space_until: Mutex::new(None),
                inner: Mutex::new(Inner {
                    entries: HashMap::new(),
                    dropped: std::collections::VecDeque::new(),
                    used: 0,
                    clock: 0,
                }),
            }),
        };
        let rec = store.recover()?;
        Ok((store, rec))
    }

    fn recover(&self) -> Result<Recovery, StoreError> {
        let mut rec = Recovery::default();
        let mut records: Vec<(Digest, BlobMeta)> = Vec::new();
        {
            let tx = db(self.shared.db.begin_read())?;
            let table = db(tx.open_table(BLOBS))?;
            for item in db(table.iter())? {
                let (k, v) = db(item)?;
                let key: [u8; 32] = match k.value().try_into() {
                    Ok(k) => k,
                    Err(_) => continue,
                };
                if let Ok(meta) = serde_json::from_slice::<BlobMeta>(v.value()) {
                    records.push((Digest::from_bytes(key), meta));
                }
            }
        }
        let mut keep = HashMap::new();
        let mut drop_keys = Vec::new();
        let mut fix = Vec::new();
        for (digest, mut meta) in records {
            if meta.complete {
                let ok = fs::metadata(self.blob_path(&digest)).is_ok_and(|m| m.len() == meta.size);
                if ok {
                    rec.complete += 1;
                    keep.insert(digest, meta);
                } else {
                    drop_keys.push(digest);
                    let _ = fs::remove_file(self.blob_path(&digest));
                    rec.dropped += 1;
                }
            } else {
                let path = self.partial_path(&digest);
                match fs::metadata(&path) {
                    Ok(_) => {
                        // Only chunks recorded after an fsync count; bytes of
                        // others may be garbage after a power loss and will
                        // be fetched again.
                        let layout = ChunkLayout::new(meta.size, meta.chunk_size).ok();
                        let fits = layout
                            .zip(meta.have.as_ref())
                            .is_some_and(|(l, h)| h.len() == l.count());
                        if !fits && meta.have.is_some() {
                            meta.have = None;
                            fix.push((digest, meta.clone()));
                        }
                        rec.partial += 1;
                        keep.insert(digest, meta);
                    }
                    Err(_) => {
                        drop_keys.push(digest);
                        rec.dropped += 1;
                    }
                }
            }
        }
        // Files the index does not know: partials are dropped; complete files
        // (renamed just before a crash, before the index commit) are adopted
        // if they hash to their name.
        for entry in fs::read_dir(self.shared.root.join("partial"))? {
            let entry = entry?;
            let known = parse_hex_name(&entry.file_name()).is_some_and(|d| keep.contains_key(&d));
            if !known {
                let _ = fs::remove_file(entry.path());
                rec.dropped += 1;
            }
        }
        let mut adopt = Vec::new();
        for fan in fs::read_dir(self.shared.root.join("blobs/sha256"))? {
            let fan = fan?;
            if !fan.file_type()?.is_dir() {
                continue;
            }
            for entry in fs::read_dir(fan.path())? {
                let entry = entry?;
                let Some(d) = parse_hex_name(&entry.file_name()) else {
                    let _ = fs::remove_file(entry.path());
                    continue;
                };
                if keep.get(&d).is_some_and(|m| m.complete) {
                    continue;
                }
                if hash_file(&entry.path())? == d {
                    let size = entry.metadata()?.len();
                    let meta = BlobMeta {
                        complete: true,
                        size,
                        chunk_size: 0,
                        have: None,
                        kind: Kind::Blob,
                        media_type: None,
                        last_access: now_secs(),
                        pinned: false,
                    };
                    adopt.push((d, meta.clone()));
                    keep.insert(d, meta);
                    rec.adopted += 1;
                } else {
                    let _ = fs::remove_file(entry.path());
                    rec.dropped += 1;
                }
            }
        }
        {
            let tx = db(self.shared.db.begin_write())?;
            {
                let mut t = db(tx.open_table(BLOBS))?;
                for d in &drop_keys {
                    db(t.remove(d.as_bytes().as_slice()))?;
                }
                for (d, m) in fix.iter().chain(adopt.iter()) {
                    db(t.insert(d.as_bytes().as_slice(), encode(m).as_slice()))?;
                }
            }
            db(tx.commit())?;
        }
        let mut inner = self.shared.inner.lock().expect("store lock");
        inner.used = keep.values().map(|m| m.size).sum();
        let mut by_age: Vec<(Digest, BlobMeta)> = keep.into_iter().collect();
        by_age.sort_by_key(|(_, m)| m.last_access);
        for (d, meta) in by_age {
            inner.upsert(d, meta);
        }
        Ok(rec)
    }

    /// Where a complete blob lives.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.shared
            .root
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
    }

    /// Where a partial blob lives.
    pub fn partial_path(&self, d: &Digest) -> PathBuf {
        self.shared.root.join("partial").join(d.hex())
    }

    /// The quota in bytes.
    pub fn quota(&self) -> u64 {
        self.shared.quota
    }

    /// Bytes counted against the quota, and the number of complete blobs.
    pub fn usage(&self) -> (u64, usize) {
        let inner = self.shared.inner.lock().expect("store lock");
        (
            inner.used,
            inner.entries.values().filter(|e| e.meta.complete).count(),
        )
    }

    /// Opens a complete blob for reading and marks it used.
    pub fn open_complete(&self, d: &Digest) -> Option<CompleteBlob> {
        let meta = {
            let mut inner = self.shared.inner.lock().expect("store lock");
            let e = inner.entries.get_mut(d)?;
            if !e.meta.complete {
                return None;
            }
            e.meta.last_access = now_secs();
            e.readers += 1;
            let meta = e.meta.clone();
            inner.clock += 1;
            let clock = inner.clock;
            inner.entries.get_mut(d).expect("present").lru = clock;
            meta
        };
        let guard = ReadGuard {
            store: self.clone(),
            digest: *d,
        };
        match File::open(self.blob_path(d)) {
            Ok(file) => Some(CompleteBlob {
                file,
                size: meta.size,
                meta,
                guard,
            }),
            Err(e) => {
                tracing::error!(digest = %d, error = %e, "indexed blob file is missing; dropping it from the index");
                drop(guard);
                let _ = self.remove(d);
                None
            }
        }
    }

    /// Holds a blob (partial or complete) from eviction while it is read.
    pub fn guard(&self, d: &Digest) -> Option<ReadGuard> {
        let mut inner = self.shared.inner.lock().expect("store lock");
        let e = inner.entries.get_mut(d)?;
        e.readers += 1;
        Some(ReadGuard {
            store: self.clone(),
            digest: *d,
        })
    }

    /// Whether a complete blob is present.
    pub fn has_complete(&self, d: &Digest) -> bool {
        let inner = self.shared.inner.lock().expect("store lock");
        inner.entries.get(d).is_some_and(|e| e.meta.complete)
    }

    /// Starts (or resumes) a partial blob laid out as `layout`: returns the
    /// file opened for read+write and the chunks already on disk (from the
    /// last checkpoint of an earlier attempt with the same layout). Reserves
    /// the blob's size in the quota, evicting if needed.
    pub fn begin_partial(
        &self,
        d: &Digest,
        kind: Kind,
        layout: ChunkLayout,
    ) -> Result<(File, Bitfield), StoreError> {
        let existing = {
            let inner = self.shared.inner.lock().expect("store lock");
            inner
                .entries
                .get(d)
                .filter(|e| !e.meta.complete)
                .map(|e| e.meta.clone())
        };
        let old_size = existing.as_ref().map_or(0, |m| m.size);
        let need = layout.size().saturating_sub(old_size);
        self.reserve(need, d)?;
        self.open_partial(d, kind, layout, existing)
            .inspect_err(|_| {
                // Give the reservation back: nothing was stored.
                let mut inner = self.shared.inner.lock().expect("store lock");
                inner.used = inner.used.saturating_sub(need);
            })
    }

    /// [`begin_partial`](Self::begin_partial) once the space is reserved.
    fn open_partial(
        &self,
        d: &Digest,
        kind: Kind,
        layout: ChunkLayout,
        existing: Option<BlobMeta>,
    ) -> Result<(File, Bitfield), StoreError> {
        let path = self.partial_path(d);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let resumed = existing
            .filter(|m| m.size == layout.size() && m.chunk_size == layout.chunk_size())
            .and_then(|m| m.have)
            .filter(|h| h.len() == layout.count());
        let have = match resumed {
            Some(h) => h,
            None => {
                file.set_len(0)?;
                Bitfield::for_layout(&layout)
            }
        };
        let meta = BlobMeta {
            complete: false,
            size: layout.size(),
            chunk_size: layout.chunk_size(),
            have: Some(have.clone()),
            kind,
            media_type: None,
            last_access: now_secs(),
            pinned: false,
        };
        self.put(d, &meta)?;
        self.shared
            .inner
            .lock()
            .expect("store lock")
            .upsert(*d, meta);
        Ok((file, have))
    }

    /// Records which chunks of a partial are on disk (call after an fsync
    /// of the data they cover).
    pub fn checkpoint(&self, d: &Digest, have: &Bitfield) -> Result<(), StoreError> {
        let meta = {
            let mut inner = self.shared.inner.lock().expect("store lock");
            let Some(e) = inner.entries.get_mut(d) else {
                return Ok(());
            };
            if e.meta.complete {
                return Ok(());
            }
            e.meta.have = Some(have.clone());
            e.meta.clone()
        };
        self.put(d, &meta)
    }

    /// Makes a verified partial complete: fsync file, rename into place,
    /// fsync the directory, then mark it complete in the index.
    pub fn complete(
        &self,
        d: &Digest,
        file: &File,
        media_type: Option<String>,
    ) -> Result<(), StoreError> {
        file.sync_all()?;
        let size = file.metadata()?.len();
        let dst = self.blob_path(d);
        let dir = dst.parent().expect("fan-out dir");
        fs::create_dir_all(dir)?;
        fs::rename(self.partial_path(d), &dst)?;
        File::open(dir)?.sync_all()?;
        let meta = {
            let mut inner = self.shared.inner.lock().expect("store lock");
            let kind = inner.entries.get(d).map_or(Kind::Blob, |e| e.meta.kind);
            let meta = BlobMeta {
                complete: true,
                size,
                chunk_size: 0,
                have: None,
                kind,
                media_type,
                last_access: now_secs(),
                pinned: false,
            };
            inner.upsert(*d, meta.clone());
            meta
        };
        self.put(d, &meta)
    }

    /// Stores a small verified blob (a manifest) in one go.
    pub fn put_small(
        &self,
        d: &Digest,
        kind: Kind,
        bytes: &[u8],
        media_type: Option<String>,
    ) -> Result<(), StoreError> {
        if self.has_complete(d) {
            return Ok(());
        }
        let layout = ChunkLayout::for_blob(bytes.len() as u64)
            .map_err(|e| StoreError::Io(io::Error::other(e.to_string())))?;
        let (file, _) = self.begin_partial(d, kind, layout)?;
        file.set_len(0)?;
        std::io::Write::write_all(&mut &file, bytes)?;
        self.complete(d, &file, media_type)
    }

    /// Drops a blob (partial or complete) from index and disk. The files
    /// go first, so their space comes back even when the index cannot be
    /// written (a full disk); recovery drops index records without files.
    pub fn remove(&self, d: &Digest) -> Result<(), StoreError> {
        {
            let mut inner = self.shared.inner.lock().expect("store lock");
            if let Some(e) = inner.entries.remove(d) {
                inner.used = inner.used.saturating_sub(e.meta.size);
                inner.note_dropped(*d);
            }
        }
        let _ = fs::remove_file(self.partial_path(d));
        let _ = fs::remove_file(self.blob_path(d));
        let tx = db(self.shared.db.begin_write())?;
        {
            let mut t = db(tx.open_table(BLOBS))?;
            db(t.remove(d.as_bytes().as_slice()))?;
        }
        db(tx.commit())
    }

    /// Records that writing to the store failed with `e`. When the
    /// filesystem is out of space (or quota), no new blob is stored for
    /// [`NO_SPACE_PAUSE`]: they pass through instead of each failing anew.
    /// Returns the metric reason: `no_space` or `io`.
    pub fn note_write_failure(&self, e: &io::Error) -> &'static str {
        // ENOSPC 28, EDQUOT 122 (Linux).
        let no_space =
            e.kind() == io::ErrorKind::StorageFull || matches!(e.raw_os_error(), Some(28 | 122));
        if !no_space {
            return "io";
        }
        *self
            .shared
            .no_space_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now() + NO_SPACE_PAUSE);
        "no_space"
    }

    /// Reserves `need` bytes for `for_digest`, evicting least recently used,
    /// unpinned blobs nobody reads (and partials nobody fetches) until the
    /// quota holds them.
    fn reserve(&self, need: u64, for_digest: &Digest) -> Result<(), StoreError> {
        if let Some(until) = *self
            .shared
            .no_space_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
        {
            let now = std::time::Instant::now();
            if now < until {
                let ago = NO_SPACE_PAUSE.saturating_sub(until - now);
                return Err(StoreError::NoSpace(ago.as_secs()));
            }
        }
        let victims = {
            let mut inner = self.shared.inner.lock().expect("store lock");
            let quota = self.shared.quota;
            if inner.used + need <= quota {
                inner.used += need;
                return Ok(());
            }
            let mut candidates: Vec<(u64, Digest, u64)> = inner
                .entries
                .iter()
                .filter(|(d, e)| {
                    // Partials nobody is fetching or reading (abandoned
                    // transfers) go too.
                    !e.meta.pinned && e.readers == 0 && *d != for_digest
                })
                .map(|(d, e)| (e.lru, *d, e.meta.size))
                .collect();
            candidates.sort();
            let mut freed = 0;
            let mut victims = Vec::new();
            for (_, d, size) in candidates {
                if inner.used - freed + need <= quota {
                    break;
                }
                freed += size;
                victims.push(d);
            }
            if inner.used - freed + need > quota {
                return Err(StoreError::Full {
                    need,
                    quota,
                    pinned_or_busy: inner.used - freed,
                });
            }
            for d in &victims {
                inner.entries.remove(d);
                inner.note_dropped(*d);
            }
            inner.used = inner.used - freed + need;
            victims
        };
        let tx = db(self.shared.db.begin_write())?;
        {
            let mut t = db(tx.open_table(BLOBS))?;
            for d in &victims {
                db(t.remove(d.as_bytes().as_slice()))?;
            }
        }
        db(tx.commit())?;
        for d in &victims {
            tracing::info!(digest = %d, "evicted (least recently used)");
            let _ = fs::remove_file(self.blob_path(d));
            let _ = fs::remove_file(self.partial_path(d));
        }
        crate::metrics::global()
            .evictions
            .inc_by(victims.len() as u64);
        Ok(())
    }

    /// Gives back quota reserved for a partial that was abandoned.
    pub fn release(&self, d: &Digest) -> Result<(), StoreError> {
        self.remove(d)
    }

    fn put(&self, d: &Digest, meta: &BlobMeta) -> Result<(), StoreError> {
        let tx = db(self.shared.db.begin_write())?;
        {
            let mut t = db(tx.open_table(BLOBS))?;
            db(t.insert(d.as_bytes().as_slice(), encode(meta).as_slice()))?;
        }
        db(tx.commit())
    }

    /// Records a tag's resolution at the origin.
    pub fn put_tag(&self, key: &str, rec: &TagRecord) -> Result<(), StoreError> {
        let mut tx = db(self.shared.db.begin_write())?;
        // Losing a tag record in a crash costs nothing but an origin round trip.
        let _ = tx.set_durability(redb::Durability::None);
        {
            let mut t = db(tx.open_table(TAGS))?;
            let v = serde_json::to_vec(rec).expect("serializable");
            db(t.insert(key, v.as_slice()))?;
        }
        db(tx.commit())
    }

    /// The last recorded resolution of a tag.
    pub fn get_tag(&self, key: &str) -> Result<Option<TagRecord>, StoreError> {
        let tx = db(self.shared.db.begin_read())?;
        let t = db(tx.open_table(TAGS))?;
        Ok(db(t.get(key))?.and_then(|v| serde_json::from_slice(v.value()).ok()))
    }

    /// Writes access times kept in memory to the index (called periodically
    /// and at shutdown; losing them only perturbs LRU order).
    pub fn flush_access_times(&self) -> Result<(), StoreError> {
        let snapshot: Vec<(Digest, BlobMeta)> = {
            let inner = self.shared.inner.lock().expect("store lock");
            inner
                .entries
                .iter()
                .filter(|(_, e)| e.meta.complete)
                .map(|(d, e)| (*d, e.meta.clone()))
                .collect()
        };
        let tx = db(self.shared.db.begin_write())?;
        {
            let mut t = db(tx.open_table(BLOBS))?;
            for (d, m) in &snapshot {
                db(t.insert(d.as_bytes().as_slice(), encode(m).as_slice()))?;
            }
        }
        db(tx.commit())
    }

    /// Complete blobs (not manifests) with their sizes, most recently used
    /// first, at most `limit`: what this node can serve its peers.
    pub fn complete_blobs(&self, limit: usize) -> Vec<(Digest, u64)> {
        let inner = self.shared.inner.lock().expect("store lock");
        let mut all: Vec<(u64, Digest, u64)> = inner
            .entries
            .iter()
            .filter(|(_, e)| e.meta.complete && e.meta.kind == Kind::Blob)
            .map(|(d, e)| (e.lru, *d, e.meta.size))
            .collect();
        all.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        all.into_iter()
            .take(limit)
            .map(|(_, d, size)| (d, size))
            .collect()
    }

    /// Blobs removed since the last call (at most `limit`, oldest first),
    /// for telling the tracker this node no longer holds them.
    pub fn take_dropped(&self, limit: usize) -> Vec<Digest> {
        let mut inner = self.shared.inner.lock().expect("store lock");
        let n = limit.min(inner.dropped.len());
        inner.dropped.drain(..n).collect()
    }

    /// Pins (or unpins) a complete blob: eviction skips pinned blobs.
    /// Written to the index at once (a pin survives a crash).
    pub fn set_pinned(&self, d: &Digest, pinned: bool) -> Result<(), AdminError> {
        let meta = {
            let mut inner = self.shared.inner.lock().expect("store lock");
            let e = inner.entries.get_mut(d).ok_or(AdminError::NotStored(*d))?;
            if !e.meta.complete {
                return Err(AdminError::Partial(*d));
            }
            e.meta.pinned = pinned;
            e.meta.clone()
        };
        self.put(d, &meta).map_err(AdminError::Store)
    }

    /// Removes a complete blob at an operator's request: refused while it
    /// is read or pinned (unpin first), or while it is still arriving.
    pub fn evict(&self, d: &Digest) -> Result<u64, AdminError> {
        let size = {
            let inner = self.shared.inner.lock().expect("store lock");
            let e = inner.entries.get(d).ok_or(AdminError::NotStored(*d))?;
            if !e.meta.complete {
                return Err(AdminError::Partial(*d));
            }
            if e.meta.pinned {
                return Err(AdminError::Pinned(*d));
            }
            if e.readers > 0 {
                return Err(AdminError::InUse(*d, e.readers));
            }
            e.meta.size
        };
        self.remove(d).map_err(AdminError::Store)?;
        Ok(size)
    }

    /// Every record, most recently used first.
    pub fn list(&self) -> Vec<(Digest, BlobMeta)> {
        let inner = self.shared.inner.lock().expect("store lock");
        let mut all: Vec<(u64, Digest, BlobMeta)> = inner
            .entries
            .iter()
            .map(|(d, e)| (e.lru, *d, e.meta.clone()))
            .collect();
        all.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        all.into_iter().map(|(_, d, m)| (d, m)).collect()
    }

    /// The record of a blob, if any.
    pub fn meta(&self, d: &Digest) -> Option<BlobMeta> {
        let inner = self.shared.inner.lock().expect("store lock");
        inner.entries.get(d).map(|e| e.meta.clone())
    }
}

/// The most removed blobs remembered for the tracker; older ones are
/// forgotten (the tracker learns of them when a peer says it lacks them).
const DROPPED_MAX: usize = 10_000;

impl Inner {
    fn note_dropped(&mut self, d: Digest) {
        if self.dropped.len() >= DROPPED_MAX {
            self.dropped.pop_front();
        }
        self.dropped.push_back(d);
    }
}

fn encode(meta: &BlobMeta) -> Vec<u8> {
    serde_json::to_vec(meta).expect("serializable")
}

fn parse_hex_name(name: &std::ffi::OsStr) -> Option<Digest> {
    format!("sha256:{}", name.to_str()?).parse().ok()
}

fn hash_file(path: &Path) -> io::Result<Digest> {
    use sha2::Digest as _;
    let mut f = File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Digest::from_bytes(h.finalize().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(store: &Store, data: &[u8]) -> Digest {
        let d = Digest::of(data);
        store.put_small(&d, Kind::Blob, data, None).unwrap();
        d
    }

    #[test]
    fn complete_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 1 << 20).unwrap();
        let d = put(&store, b"hello");
        drop(store);
        let (store, rec) = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(rec.complete, 1);
        let mut b = store.open_complete(&d).unwrap();
        let mut s = String::new();
        b.file.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
    }

    #[test]
    fn operators_pin_unpin_and_evict() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 1 << 20).unwrap();
        let d = put(&store, b"hello");
        store.set_pinned(&d, true).unwrap();
        assert!(matches!(store.evict(&d), Err(AdminError::Pinned(_))));
        drop(store);
        // The pin is in the index.
        let (store, _) = Store::open(dir.path(), 1 << 20).unwrap();
        assert!(store.meta(&d).unwrap().pinned);
        store.set_pinned(&d, false).unwrap();
        let guard = store.guard(&d).unwrap();
        assert!(matches!(store.evict(&d), Err(AdminError::InUse(_, 1))));
        drop(guard);
        assert_eq!(store.evict(&d).unwrap(), 5);
        assert!(!store.has_complete(&d));
        assert!(!store.blob_path(&d).exists());
        let other = Digest::of(b"other");
        assert!(matches!(store.evict(&other), Err(AdminError::NotStored(_))));
        assert!(matches!(
            store.set_pinned(&other, true),
            Err(AdminError::NotStored(_))
        ));
        assert_eq!(store.take_dropped(10), vec![d]);
    }

    #[test]
    fn partial_resumes_with_the_checkpointed_chunks_only() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let chunk = 64 << 10;
        let data: Vec<u8> = (0..4 * chunk).map(|i| (i % 251) as u8).collect();
        let d = Digest::of(&data);
        let layout = ChunkLayout::new(data.len() as u64, chunk as u32).unwrap();
        {
            let (store, _) = Store::open(dir.path(), 1 << 20).unwrap();
            let (f, have) = store.begin_partial(&d, Kind::Blob, layout).unwrap();
            assert_eq!(have.count(), 0);
            // Chunks 0 and 2 written and checkpointed; chunk 3 written after.
            let mut have = have;
            for c in [0u32, 2] {
                let (off, len) = layout.range(c).unwrap();
                f.write_all_at(&data[off as usize..(off + u64::from(len)) as usize], off)
                    .unwrap();
                have.set(c).unwrap();
            }
            f.sync_data().unwrap();
            store.checkpoint(&d, &have).unwrap();
            let (off, _) = layout.range(3).unwrap();
            f.write_all_at(&data[off as usize..], off).unwrap();
        }
        let (store, rec) = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(rec.partial, 1);
        let (f, have) = store.begin_partial(&d, Kind::Blob, layout).unwrap();
        assert_eq!(have.iter_ones().collect::<Vec<_>>(), vec![0, 2]);
        // Another layout of the same blob starts over.
        drop(f);
        let other = ChunkLayout::new(data.len() as u64, 2 * chunk as u32).unwrap();
        let (_, have) = store.begin_partial(&d, Kind::Blob, other).unwrap();
        assert_eq!(have.count(), 0);
    }

    #[test]
    fn orphans_are_dropped_or_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let good = b"adopt me";
        let gd = Digest::of(good);
        {
            let (store, _) = Store::open(dir.path(), 1 << 20).unwrap();
            let p = store.blob_path(&gd);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, good).unwrap();
            let bad = Digest::of(b"x");
            let p = store.blob_path(&bad);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, b"not x").unwrap();
            fs::write(store.partial_path(&bad), b"junk").unwrap();
        }
        let (store, rec) = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(rec.adopted, 1);
        assert_eq!(rec.dropped, 2);
        assert!(store.has_complete(&gd));
        assert!(!store.has_complete(&Digest::of(b"x")));
    }

    #[test]
    fn evicts_lru_but_not_read_or_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 3000).unwrap();
        let a = put(&store, &[1u8; 1000]);
        let b = put(&store, &[2u8; 1000]);
        let c = put(&store, &[3u8; 1000]);
        let reading = store.open_complete(&a).unwrap();
        store
            .shared
            .inner
            .lock()
            .unwrap()
            .entries
            .get_mut(&b)
            .unwrap()
            .meta
            .pinned = true;
        let d = put(&store, &[4u8; 1000]);
        assert!(store.has_complete(&a) && store.has_complete(&b) && store.has_complete(&d));
        assert!(!store.has_complete(&c));
        assert!(store.usage().0 <= 3000);
        let reading_d = store.open_complete(&d).unwrap();
        // Everything else is busy or pinned: a fifth blob cannot fit.
        assert!(matches!(
            store.put_small(&Digest::of(&[5u8; 1000]), Kind::Blob, &[5u8; 1000], None),
            Err(StoreError::Full { .. })
        ));
        // Once read, `a` is older than `d`: it goes first.
        drop(reading);
        drop(reading_d);
        put(&store, &[6u8; 1000]);
        assert!(!store.has_complete(&a));
        assert!(store.has_complete(&d) && store.has_complete(&b));
    }

    #[test]
    fn abandoned_partials_are_evicted_active_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 2500).unwrap();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let layout = ChunkLayout::for_blob(1000).unwrap();
        store.begin_partial(&a, Kind::Blob, layout).unwrap();
        store.begin_partial(&b, Kind::Blob, layout).unwrap();
        let active = store.guard(&b).unwrap();
        // Room for a third only if the abandoned partial `a` goes.
        put(&store, &[9u8; 1000]);
        assert!(store.meta(&a).is_none() && !store.partial_path(&a).exists());
        assert!(store.meta(&b).is_some() && store.partial_path(&b).exists());
        drop(active);
    }
}
