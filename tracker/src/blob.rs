//! The tracker's state for one blob: who holds which chunks, the published
//! chunk hashes, the origin leases, and the indexes that keep lookups and
//! lease grants independent of the number of holders.
//!
//! Everything here keeps its own derived state consistent (copy counts, seed
//! lists, rings, the open set); the cross-blob bookkeeping (members, the
//! global lease queue, reputations) lives in [`crate::core`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use shoal_proto::tracker_api::{ChunkHash, NodeId};
use shoal_proto::{Bitfield, ChunkLayout, Digest};

/// Holders remembered per chunk for finding holders of rare chunks.
pub(crate) const SEEDS: usize = 2;

/// The global lease expiry queue: `(expires_ms, blob, chunk)`.
pub(crate) type LeaseQueue = BTreeSet<(u64, Digest, u32)>;

/// An unexpired origin lease on one chunk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Lease {
    pub(crate) node: NodeId,
    pub(crate) expires: u64,
    /// When the lease was first granted to `node` (renewals keep it).
    #[serde(default)]
    pub(crate) granted: u64,
}

/// How long the blob's leases live, grant to publish (tracker clock),
/// against how long their chunks took at the origin (the lessees'
/// `fetch_ms`) and the lessees' round trip to the tracker (their `rtt_ms`):
/// smoothed, µs; 0 until said.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct LeaseLife {
    life_us: u64,
    fetch_us: u64,
    #[serde(default)]
    rtt_us: u64,
}

impl LeaseLife {
    /// The least origin time counted per chunk: times are whole ms.
    const FLOOR_US: u64 = 1_000;
    /// A leased chunk's time at the origin until publishes say: 300 members
    /// at 10 gbit with a 16 MiB cap measured 25–130 ms (grant to verified,
    /// their turn in the lessee's runs included).
    const ASSUMED_FETCH_US: u64 = 50_000;

    /// One publish: its leases lived `life_ms` on average (tracker clock),
    /// their chunks took `fetch_ms` at the origin (the lessee's clock; no
    /// more than the life).
    pub(crate) fn sample(&mut self, life_ms: u64, fetch_ms: u64) {
        let life = life_ms.saturating_mul(1_000);
        let fetch = fetch_ms.saturating_mul(1_000).min(life);
        let first = self.life_us == 0;
        self.life_us = Self::smooth(self.life_us, life, first);
        self.fetch_us = Self::smooth(self.fetch_us, fetch, first);
    }

    /// One lease request's round trip to the tracker (the member's smoothed).
    pub(crate) fn sample_rtt(&mut self, rtt_ms: u32) {
        let rtt = u64::from(rtt_ms) * 1_000;
        self.rtt_us = Self::smooth(self.rtt_us, rtt, self.rtt_us == 0);
    }

    /// `old` moved an eighth of the way to `new`; `new` itself if `first`.
    fn smooth(old: u64, new: u64, first: bool) -> u64 {
        if first {
            new
        } else {
            old - old / 8 + new / 8
        }
    }

    /// `chunks` at the origin at once take `chunks × (fetch + overhead) ÷
    /// fetch` leased, the overhead being the rest of a lease's life (its
    /// life less its fetch, or the lessees' round trip with the tracker's
    /// queue if longer): the time it is out but not at the origin. The fetch
    /// counts at most [`ASSUMED_FETCH_US`](Self::ASSUMED_FETCH_US): it is
    /// the lessee's turn in its own runs and its downlink shared with its
    /// peers as much as the origin's, and a long one must not close the cap
    /// on a slow tracker. At least `chunks`.
    pub(crate) fn leased_for(&self, chunks: u64) -> u64 {
        let (fetch, overhead) = if self.life_us == 0 {
            (Self::ASSUMED_FETCH_US, self.rtt_us)
        } else {
            let fetch = self.fetch_us.max(Self::FLOOR_US);
            (fetch, (self.life_us - self.fetch_us).max(self.rtt_us))
        };
        let fetch = fetch.min(Self::ASSUMED_FETCH_US);
        let stretched = u128::from(chunks) * u128::from(fetch + overhead) / u128::from(fetch);
        u64::try_from(stretched).unwrap_or(u64::MAX).max(chunks)
    }
}

/// What a holder has of the blob. Complete holdings store no bitfield: most
/// holdings in a settled cluster are complete, so this is most of the memory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum Have {
    Complete,
    Partial(Bitfield),
}

impl Have {
    pub(crate) fn get(&self, i: u32) -> bool {
        match self {
            Have::Complete => true,
            Have::Partial(b) => b.get(i),
        }
    }
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Holding {
    /// The holder's key in its ring.
    pos: u64,
    pub(crate) have: Have,
}

/// A published chunk hash and who published it (the chunk's lease holder).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Published {
    pub(crate) hash: ChunkHash,
    pub(crate) by: NodeId,
    /// The blob's hash sequence number when it was accepted.
    pub(crate) seq: u64,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Blob {
    pub(crate) digest: Digest,
    pub(crate) layout: ChunkLayout,
    /// Hash generation, fresh from a tracker-wide counter at creation and at
    /// every withdrawal, so stale digest-mismatch reports can be told apart.
    pub(crate) epoch: u64,
    pub(crate) hashes: Vec<Option<Published>>,
    /// Number of `Some` in `hashes`.
    pub(crate) known: u32,
    /// Partial holders per chunk (complete holders are counted in `complete`).
    copies: Vec<u32>,
    complete: u32,
    /// Up to [`SEEDS`] partial holders of each chunk: an approximate index
    /// that finds a holder of a rare chunk without scanning all holders.
    seeds: Vec<[Option<NodeId>; SEEDS]>,
    pub(crate) holders: BTreeMap<NodeId, Holding>,
    /// Holders placed at pseudo-random positions (`mix(holder, blob)`); a
    /// lookup walks a window from a requester-specific start.
    complete_ring: BTreeMap<u64, NodeId>,
    partial_ring: BTreeMap<u64, NodeId>,
    pub(crate) leases: BTreeMap<u32, Lease>,
    /// How long leases live against their chunks' time at the origin.
    #[serde(default)]
    pub(crate) lease_life: LeaseLife,
    /// Who holds or last held the lease of a chunk whose hash is unknown: the
    /// only node whose hash for that chunk is accepted.
    pub(crate) lessee: BTreeMap<u32, NodeId>,
    /// Unexpired leases by node.
    pub(crate) by_node: BTreeMap<NodeId, BTreeSet<u32>>,
    /// Chunks that may be leased: not leased, and not "served" (hash known
    /// and held by a member). Lets a grant find chunks 64 at a time.
    open: Bitfield,
    /// Since when the blob has had no holders and no leases (hashes only).
    pub(crate) idle_since: Option<u64>,
    /// Hashes accepted so far (the last one's `Published::seq`).
    pub(crate) hash_seq: u64,
}

impl Blob {
    pub(crate) fn new(digest: Digest, layout: ChunkLayout, epoch: u64) -> Self {
        let n = layout.count() as usize;
        Blob {
            digest,
            layout,
            epoch,
            hashes: vec![None; n],
            known: 0,
            copies: vec![0; n],
            complete: 0,
            seeds: vec![Default::default(); n],
            holders: BTreeMap::new(),
            complete_ring: BTreeMap::new(),
            partial_ring: BTreeMap::new(),
            leases: BTreeMap::new(),
            lease_life: LeaseLife::default(),
            lessee: BTreeMap::new(),
            by_node: BTreeMap::new(),
            open: Bitfield::full(layout.count()).expect("layout bounds the count"),
            idle_since: None,
            hash_seq: 0,
        }
    }

    pub(crate) fn count(&self) -> u32 {
        self.layout.count()
    }

    /// Members holding the whole blob.
    pub(crate) fn complete_holders(&self) -> u32 {
        self.complete
    }

    /// Members holding chunk `i` (partial and complete).
    pub(crate) fn copies(&self, i: u32) -> u32 {
        self.copies[i as usize] + self.complete
    }

    /// Whether peers can get chunk `i` from a member and verify it.
    pub(crate) fn served(&self, i: u32) -> bool {
        self.hashes[i as usize].is_some() && self.copies(i) > 0
    }

    pub(crate) fn is_open(&self, i: u32) -> bool {
        self.open.get(i)
    }

    fn sync_open(&mut self, i: u32) {
        let open = !self.served(i) && !self.leases.contains_key(&i);
        if open {
            self.open.set(i).expect("index in range");
        } else {
            self.open.clear(i).expect("index in range");
        }
    }

    fn sync_open_all(&mut self) {
        for i in 0..self.count() {
            self.sync_open(i);
        }
    }

    // -- holdings ----------------------------------------------------------

    /// Sets `node`'s holding (replacing any), or removes it with `None`.
    pub(crate) fn set_holding(&mut self, node: &NodeId, have: Option<Have>) {
        self.remove_holding(node);
        let Some(have) = have else { return };
        let ring = match have {
            Have::Complete => &mut self.complete_ring,
            Have::Partial(_) => &mut self.partial_ring,
        };
        let mut pos = mix(&[b"ring", node.as_str().as_bytes(), self.digest.as_bytes()]);
        while ring.contains_key(&pos) {
            pos = pos.wrapping_add(1);
        }
        ring.insert(pos, node.clone());
        match &have {
            Have::Complete => {
                self.complete += 1;
                if self.complete == 1 {
                    self.sync_open_all();
                }
            }
            Have::Partial(bits) => {
                for i in bits.iter_ones() {
                    self.copies[i as usize] += 1;
                    seed_add(&mut self.seeds[i as usize], node);
                    if self.copies[i as usize] == 1 {
                        self.sync_open(i);
                    }
                }
            }
        }
        self.holders.insert(node.clone(), Holding { pos, have });
    }

    /// Removes `node`'s holding; returns whether it had one.
    pub(crate) fn remove_holding(&mut self, node: &NodeId) -> bool {
        let Some(h) = self.holders.remove(node) else {
            return false;
        };
        match h.have {
            Have::Complete => {
                self.complete_ring.remove(&h.pos);
                self.complete -= 1;
                if self.complete == 0 {
                    self.sync_open_all();
                }
            }
            Have::Partial(bits) => {
                self.partial_ring.remove(&h.pos);
                for i in bits.iter_ones() {
                    self.copies[i as usize] -= 1;
                    seed_remove(&mut self.seeds[i as usize], node);
                    if self.copies[i as usize] == 0 {
                        self.sync_open(i);
                    }
                }
            }
        }
        true
    }

    /// Adds chunk `i` to `node`'s holding (creating a partial one).
    pub(crate) fn add_chunk(&mut self, node: &NodeId, i: u32) {
        match self.holders.get_mut(node) {
            Some(Holding {
                have: Have::Complete,
                ..
            }) => {}
            Some(Holding {
                have: Have::Partial(bits),
                ..
            }) => {
                if bits.set(i).expect("index in range") {
                    self.copies[i as usize] += 1;
                    seed_add(&mut self.seeds[i as usize], node);
                    self.sync_open(i);
                }
            }
            None => {
                let mut bits = Bitfield::for_layout(&self.layout);
                bits.set(i).expect("index in range");
                self.set_holding(node, Some(Have::Partial(bits)));
            }
        }
    }

    // -- leases --------------------------------------------------------------

    pub(crate) fn grant(
        &mut self,
        i: u32,
        node: &NodeId,
        now: u64,
        expires: u64,
        q: &mut LeaseQueue,
    ) {
        let granted = match self.leases.get(&i) {
            Some(old) if &old.node == node => old.granted,
            _ => now,
        };
        if let Some(old) = self.leases.insert(
            i,
            Lease {
                node: node.clone(),
                expires,
                granted,
            },
        ) {
            q.remove(&(old.expires, self.digest, i));
        }
        q.insert((expires, self.digest, i));
        self.by_node.entry(node.clone()).or_default().insert(i);
        self.lessee.insert(i, node.clone());
        self.sync_open(i);
    }

    /// Ends the lease on chunk `i` (if any); the lessee record stays, so a
    /// late publish from the last holder is still accepted until someone else
    /// takes the chunk over.
    pub(crate) fn release(&mut self, i: u32, q: &mut LeaseQueue) {
        let Some(old) = self.leases.remove(&i) else {
            return;
        };
        q.remove(&(old.expires, self.digest, i));
        if let Some(set) = self.by_node.get_mut(&old.node) {
            set.remove(&i);
            if set.is_empty() {
                self.by_node.remove(&old.node);
            }
        }
        self.sync_open(i);
    }

    /// Releases leases on chunks that became served: nobody needs to fetch
    /// those from the origin any more.
    pub(crate) fn release_served(&mut self, q: &mut LeaseQueue) {
        let served: Vec<u32> = self
            .leases
            .keys()
            .copied()
            .filter(|&i| self.served(i))
            .collect();
        for i in served {
            self.release(i, q);
        }
    }

    /// Ends every lease of `node` and forgets it as a lessee.
    pub(crate) fn forget_lessee(&mut self, node: &NodeId, q: &mut LeaseQueue) {
        if let Some(set) = self.by_node.get(node).cloned() {
            for i in set {
                self.release(i, q);
            }
        }
        self.lessee.retain(|_, n| n != node);
    }

    // -- hashes --------------------------------------------------------------

    /// Records the hash of chunk `i` from its lessee `by`, which now holds it.
    pub(crate) fn accept_hash(&mut self, i: u32, hash: ChunkHash, by: &NodeId, q: &mut LeaseQueue) {
        if self.hashes[i as usize].is_none() {
            self.known += 1;
        }
        self.hash_seq += 1;
        self.hashes[i as usize] = Some(Published {
            hash,
            by: by.clone(),
            seq: self.hash_seq,
        });
        self.lessee.remove(&i);
        self.release(i, q);
        self.add_chunk(by, i);
        self.sync_open(i);
    }

    /// Withdraws the hashes of every chunk `pred` selects; returns how many.
    pub(crate) fn withdraw(&mut self, mut pred: impl FnMut(&Published) -> bool) -> u32 {
        let mut n = 0;
        for i in 0..self.count() {
            if self.hashes[i as usize].as_ref().is_some_and(&mut pred) {
                self.hashes[i as usize] = None;
                self.known -= 1;
                n += 1;
                self.sync_open(i);
            }
        }
        n
    }

    /// Distinct publishers of the known hashes.
    /// Sets in `bits` the chunks whose hash on file `node` published.
    pub(crate) fn published_by(&self, node: &NodeId, bits: &mut Bitfield) {
        for (i, p) in self.hashes.iter().enumerate() {
            if p.as_ref().is_some_and(|p| p.by == *node) {
                let _ = bits.set(i as u32);
            }
        }
    }

    pub(crate) fn publishers(&self) -> BTreeSet<NodeId> {
        self.hashes.iter().flatten().map(|p| p.by.clone()).collect()
    }

    // -- lookups -------------------------------------------------------------

    /// Chooses at most `k` holders for `requester`, never itself.
    ///
    /// A quarter of the slots go to holders of the rarest chunks the
    /// requester lacks (from the seed lists, starting at a requester-specific
    /// chunk so different requesters learn of different rare holders); the
    /// rest are split between complete holders and the most useful partial
    /// holders, each taken from a window of its ring that starts at
    /// `mix(requester, blob, epoch)`. Cost: O(chunks + k·chunks/64 +
    /// log holders), independent of the number of holders.
    pub(crate) fn pick(&self, requester: &NodeId, epoch: u64, k: usize) -> Vec<NodeId> {
        let own = self.holders.get(requester);
        let others = self.holders.len() - usize::from(own.is_some());
        if others <= k {
            return self
                .holders
                .keys()
                .filter(|n| *n != requester)
                .cloned()
                .collect();
        }
        let seed = mix(&[
            b"pick",
            requester.as_str().as_bytes(),
            self.digest.as_bytes(),
            &epoch.to_le_bytes(),
        ]);
        // Chunks worth fetching from a peer: hash known, requester lacks it.
        let mut useful = Bitfield::for_layout(&self.layout);
        for i in 0..self.count() {
            if self.hashes[i as usize].is_some() && !own.is_some_and(|h| h.have.get(i)) {
                useful.set(i).expect("index in range");
            }
        }

        let mut p = Picker {
            requester,
            k,
            out: Vec::with_capacity(k),
            taken: BTreeSet::new(),
        };

        // 1. Holders of the rarest useful chunks.
        let rare_slots = k / 4;
        let rarest = useful
            .iter_ones()
            .map(|i| self.copies(i))
            .filter(|&c| c > 0)
            .min();
        if let (Some(min), true) = (rarest, rare_slots > 0) {
            let limit = min.saturating_mul(2);
            let n = self.count();
            let start = (seed % u64::from(n)) as u32;
            for i in (start..n).chain(0..start) {
                if p.out.len() >= rare_slots {
                    break;
                }
                if useful.get(i) && self.copies(i) <= limit {
                    for s in self.seeds[i as usize].iter().flatten() {
                        p.push(s);
                    }
                }
            }
        }

        // 2. Complete holders, up to half of what is left (more if there are
        //    few partial holders).
        let left = k - p.out.len();
        let own_partial = matches!(
            own,
            Some(Holding {
                have: Have::Partial(_),
                ..
            })
        );
        let partial_others = self.partial_ring.len() - usize::from(own_partial);
        let quota = p.out.len() + left - partial_others.min(left / 2);
        let mut complete = ring_walk(&self.complete_ring, seed);
        for n in complete.by_ref() {
            if p.out.len() >= quota {
                break;
            }
            p.push(n);
        }

        // 3. Partial holders from a window of the ring, most useful first.
        let window = 2 * (k - p.out.len());
        let mut cands: Vec<(Reverse<u32>, u64, &NodeId)> = ring_walk(&self.partial_ring, seed)
            .filter(|n| *n != requester && !p.taken.contains(*n))
            .take(window)
            .map(|n| {
                let Have::Partial(bits) = &self.holders[n].have else {
                    unreachable!("the partial ring holds partial holders")
                };
                let score = bits.count() - bits.difference(&useful).count();
                let tie = mix(&[&seed.to_le_bytes(), n.as_str().as_bytes()]);
                (Reverse(score), tie, n)
            })
            .collect();
        cands.sort_unstable();
        for (_, _, n) in cands {
            p.push(n);
        }

        // 4. Whatever room is left: more complete holders.
        for n in complete {
            if p.out.len() >= k {
                break;
            }
            p.push(n);
        }
        p.out
    }

    // -- checks --------------------------------------------------------------

    /// Checks the derived state against the primary state (for tests and the
    /// simulator; O(holders × chunks)).
    pub(crate) fn check(&self) -> Result<(), String> {
        let d = self.digest;
        let n = self.count();
        let mut copies = vec![0u32; n as usize];
        let mut complete = 0;
        for (node, h) in &self.holders {
            let ring = match &h.have {
                Have::Complete => {
                    complete += 1;
                    &self.complete_ring
                }
                Have::Partial(bits) => {
                    if bits.len() != n || bits.count() == 0 {
                        return Err(format!("{d}: bad partial holding of {node}"));
                    }
                    for i in bits.iter_ones() {
                        copies[i as usize] += 1;
                    }
                    &self.partial_ring
                }
            };
            if ring.get(&h.pos) != Some(node) {
                return Err(format!("{d}: {node} missing from its ring"));
            }
        }
        if self.complete_ring.len() + self.partial_ring.len() != self.holders.len() {
            return Err(format!("{d}: rings hold stale entries"));
        }
        if complete != self.complete || copies != self.copies {
            return Err(format!("{d}: copy counts drifted"));
        }
        for (i, seeds) in self.seeds.iter().enumerate() {
            let s: Vec<&NodeId> = seeds.iter().flatten().collect();
            for (j, node) in s.iter().enumerate() {
                let ok = matches!(self.holders.get(*node),
                    Some(Holding { have: Have::Partial(b), .. }) if b.get(i as u32));
                if !ok || s[..j].contains(node) {
                    return Err(format!("{d}: bad seed {node} for chunk {i}"));
                }
            }
        }
        if self.hashes.iter().flatten().count() != self.known as usize {
            return Err(format!("{d}: known-hash count drifted"));
        }
        let mut by_node: BTreeMap<NodeId, BTreeSet<u32>> = BTreeMap::new();
        for (&i, lease) in &self.leases {
            if i >= n || self.served(i) {
                return Err(format!(
                    "{d}: lease on chunk {i} that is served or out of range"
                ));
            }
            if self.lessee.get(&i) != Some(&lease.node) {
                return Err(format!(
                    "{d}: chunk {i} leased to {} but lessee differs",
                    lease.node
                ));
            }
            by_node.entry(lease.node.clone()).or_default().insert(i);
        }
        if by_node != self.by_node {
            return Err(format!("{d}: per-node lease index drifted"));
        }
        for i in 0..n {
            if self.open.get(i) != (!self.served(i) && !self.leases.contains_key(&i)) {
                return Err(format!("{d}: open set wrong at chunk {i}"));
            }
        }
        Ok(())
    }

    /// The next open chunks from `from`, wrapping to the start, at most `n`.
    pub(crate) fn open_from(&self, from: u32, n: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(n.min(self.count() as usize));
        let mut at = from;
        while out.len() < n {
            match self.open.first_one_from(at) {
                Some(i) => {
                    out.push(i);
                    at = i + 1;
                }
                None => break,
            }
        }
        at = 0;
        while out.len() < n {
            match self.open.first_one_from(at) {
                Some(i) if i < from => {
                    out.push(i);
                    at = i + 1;
                }
                _ => break,
            }
        }
        out
    }
}

/// Collects distinct holders other than the requester, up to `k`.
struct Picker<'a> {
    requester: &'a NodeId,
    k: usize,
    out: Vec<NodeId>,
    taken: BTreeSet<NodeId>,
}

impl Picker<'_> {
    fn push(&mut self, n: &NodeId) {
        if n != self.requester && self.out.len() < self.k && self.taken.insert(n.clone()) {
            self.out.push(n.clone());
        }
    }
}

/// Walks a ring clockwise from `start`, once around.
fn ring_walk(ring: &BTreeMap<u64, NodeId>, start: u64) -> impl Iterator<Item = &NodeId> {
    ring.range(start..)
        .chain(ring.range(..start))
        .map(|(_, n)| n)
}

fn seed_add(seeds: &mut [Option<NodeId>; SEEDS], node: &NodeId) {
    if seeds.iter().flatten().any(|s| s == node) {
        return;
    }
    if let Some(slot) = seeds.iter_mut().find(|s| s.is_none()) {
        *slot = Some(node.clone());
    }
}

fn seed_remove(seeds: &mut [Option<NodeId>; SEEDS], node: &NodeId) {
    for s in seeds.iter_mut() {
        if s.as_ref() == Some(node) {
            *s = None;
        }
    }
}

/// A deterministic 64-bit hash of byte strings (FNV-1a with a splitmix64
/// finish): the tracker's only source of "randomness", identical on every
/// platform and run.
pub(crate) fn mix(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}
