//! One timer per flow, in an indexed binary heap: rescheduling a flow moves
//! its one entry instead of leaving a stale one behind. (Rates change every
//! time a flow starts or stops on a shared link; with a plain heap of
//! events, 95 % of a 100-member run's events were stale chunk boundaries.)

/// Timers keyed by a dense id, earliest `(at, seq)` first.
#[derive(Debug, Default)]
pub struct Timers {
    /// (at, seq, id), a binary min-heap.
    heap: Vec<(u64, u64, u32)>,
    /// Position of each id's entry in `heap` (`usize::MAX`: none).
    pos: Vec<usize>,
}

impl Timers {
    /// Sets `id`'s timer to `(at, seq)`, replacing any it had.
    pub fn set(&mut self, id: u32, at: u64, seq: u64) {
        let i = id as usize;
        if i >= self.pos.len() {
            self.pos.resize(i + 1, usize::MAX);
        }
        let entry = (at, seq, id);
        match self.pos[i] {
            usize::MAX => {
                self.heap.push(entry);
                let k = self.heap.len() - 1;
                self.pos[i] = k;
                self.up(k);
            }
            k => {
                self.heap[k] = entry;
                let k = self.up(k);
                self.down(k);
            }
        }
    }

    /// Removes `id`'s timer, if any.
    pub fn remove(&mut self, id: u32) {
        let Some(&k) = self.pos.get(id as usize) else {
            return;
        };
        if k == usize::MAX {
            return;
        }
        self.pos[id as usize] = usize::MAX;
        let last = self.heap.pop().expect("an entry");
        if k < self.heap.len() {
            self.heap[k] = last;
            self.pos[last.2 as usize] = k;
            let k = self.up(k);
            self.down(k);
        }
    }

    /// When `id`'s timer is set for, if it is.
    pub fn get(&self, id: u32) -> Option<u64> {
        match self.pos.get(id as usize) {
            Some(&k) if k != usize::MAX => Some(self.heap[k].0),
            _ => None,
        }
    }

    /// The earliest timer: `(at, seq, id)`.
    pub fn peek(&self) -> Option<(u64, u64, u32)> {
        self.heap.first().copied()
    }

    /// Timers set.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether no timer is set.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    fn key(&self, k: usize) -> (u64, u64) {
        (self.heap[k].0, self.heap[k].1)
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.pos[self.heap[a].2 as usize] = a;
        self.pos[self.heap[b].2 as usize] = b;
    }

    fn up(&mut self, mut k: usize) -> usize {
        while k > 0 {
            let parent = (k - 1) / 2;
            if self.key(k) >= self.key(parent) {
                break;
            }
            self.swap(k, parent);
            k = parent;
        }
        k
    }

    fn down(&mut self, mut k: usize) {
        loop {
            let (l, r) = (2 * k + 1, 2 * k + 2);
            let mut least = k;
            if l < self.heap.len() && self.key(l) < self.key(least) {
                least = l;
            }
            if r < self.heap.len() && self.key(r) < self.key(least) {
                least = r;
            }
            if least == k {
                return;
            }
            self.swap(k, least);
            k = least;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn timers_come_out_in_order_after_moves_and_removals() {
        let mut t = Timers::default();
        let mut rng = Rng::new(3);
        let mut want = std::collections::BTreeMap::new();
        for seq in 0..2_000u64 {
            let id = rng.below(64) as u32;
            if rng.below(4) == 0 {
                t.remove(id);
                want.remove(&id);
            } else {
                let at = rng.below(1_000);
                t.set(id, at, seq);
                want.insert(id, (at, seq));
            }
        }
        assert_eq!(t.len(), want.len());
        let mut expected: Vec<(u64, u64, u32)> =
            want.iter().map(|(&id, &(at, seq))| (at, seq, id)).collect();
        expected.sort();
        let mut got = Vec::new();
        while let Some(e) = t.peek() {
            got.push(e);
            t.remove(e.2);
        }
        assert_eq!(got, expected);
        assert!(t.is_empty());
    }
}
