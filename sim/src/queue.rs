//! The simulator's pending events, earliest `(at, seq)` first.
//!
//! Nearly every event is due within a few tens of milliseconds of the
//! present (a round trip, a chunk, a watch frame), so those wait in a ring
//! of one bucket per microsecond — a bucket is a queue, and `seq` only
//! grows, so it comes out in `seq` order — found through a bitmap of the
//! buckets in use. Events further out (heartbeats, progress ticks, idle
//! timeouts) wait in a heap and move into the ring as the present comes
//! within its reach. With a binary heap of every event, its pops were 8 %
//! of a 10,000-member run: each sank through twenty levels of a heap far
//! bigger than the caches.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

/// Microseconds the ring covers.
const WINDOW: u64 = 1 << 16;
const MASK: u64 = WINDOW - 1;
const WORDS: usize = (WINDOW / 64) as usize;

/// Events of type `T` by time (µs) and then insertion number.
pub struct EventQueue<T> {
    /// No pending event is earlier; the ring holds those before
    /// `base + WINDOW`, the heap the rest.
    base: u64,
    ring: Vec<VecDeque<(u64, u32)>>,
    /// A bit per bucket in use.
    used: Vec<u64>,
    in_ring: usize,
    far: BinaryHeap<Reverse<(u64, u64, u32)>>,
    /// The events themselves, by slot.
    slab: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Default for EventQueue<T> {
    fn default() -> Self {
        EventQueue {
            base: 0,
            ring: (0..WINDOW).map(|_| VecDeque::new()).collect(),
            used: vec![0; WORDS],
            in_ring: 0,
            far: BinaryHeap::new(),
            slab: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> EventQueue<T> {
    /// Adds `ev` due at `at` (never before the last event popped), `seq`
    /// greater than any pushed before.
    pub fn push(&mut self, at: u64, seq: u64, ev: T) {
        debug_assert!(at >= self.base, "an event in the past");
        let slot = match self.free.pop() {
            Some(k) => {
                self.slab[k as usize] = Some(ev);
                k
            }
            None => {
                self.slab.push(Some(ev));
                u32::try_from(self.slab.len() - 1).expect("under 4G pending events")
            }
        };
        self.place(at, seq, slot);
    }

    fn place(&mut self, at: u64, seq: u64, slot: u32) {
        if at < self.base + WINDOW {
            let b = (at & MASK) as usize;
            self.ring[b].push_back((seq, slot));
            self.used[b / 64] |= 1 << (b % 64);
            self.in_ring += 1;
        } else {
            self.far.push(Reverse((at, seq, slot)));
        }
    }

    /// The bucket of the earliest event in the ring, if any.
    fn first_bucket(&self) -> Option<usize> {
        if self.in_ring == 0 {
            return None;
        }
        let start = (self.base & MASK) as usize;
        let (w0, bit) = (start / 64, start % 64);
        let head = self.used[w0] & (u64::MAX << bit);
        if head != 0 {
            return Some(w0 * 64 + head.trailing_zeros() as usize);
        }
        (1..=WORDS).find_map(|k| {
            let w = (w0 + k) % WORDS;
            // Back at the first word: only the bits before `start`.
            let word = if k == WORDS {
                self.used[w] & !(u64::MAX << bit)
            } else {
                self.used[w]
            };
            (word != 0).then(|| w * 64 + word.trailing_zeros() as usize)
        })
    }

    /// The earliest event's `(at, seq)`.
    pub fn peek(&self) -> Option<(u64, u64)> {
        match self.first_bucket() {
            Some(b) => {
                let at = self.base + ((b as u64).wrapping_sub(self.base) & MASK);
                Some((at, self.ring[b].front().expect("a used bucket").0))
            }
            None => self.far.peek().map(|Reverse((at, seq, _))| (*at, *seq)),
        }
    }

    /// Takes the earliest event: `(at, event)`.
    pub fn pop(&mut self) -> Option<(u64, T)> {
        let (at, slot) = match self.first_bucket() {
            Some(b) => {
                let at = self.base + ((b as u64).wrapping_sub(self.base) & MASK);
                let (_, slot) = self.ring[b].pop_front().expect("a used bucket");
                if self.ring[b].is_empty() {
                    self.used[b / 64] &= !(1 << (b % 64));
                }
                self.in_ring -= 1;
                (at, slot)
            }
            None => {
                let Reverse((at, _, slot)) = self.far.pop()?;
                (at, slot)
            }
        };
        if at > self.base {
            self.base = at;
            // What the ring now reaches moves in, earliest first, before
            // anything can be pushed there.
            while let Some(&Reverse((t, seq, s))) = self.far.peek() {
                if t >= self.base + WINDOW {
                    break;
                }
                self.far.pop();
                self.place(t, seq, s);
            }
        }
        self.free.push(slot);
        let ev = self.slab[slot as usize].take().expect("a pending event");
        Some((at, ev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn events_come_out_in_time_then_insertion_order_as_a_heap_gives_them() {
        let mut q = EventQueue::default();
        let mut reference = BinaryHeap::new();
        let mut rng = Rng::new(7);
        let (mut now, mut seq) = (0u64, 0u64);
        for _ in 0..200_000 {
            if rng.below(3) > 0 {
                // Mostly near, some far, some at the same microsecond.
                let at = now
                    + match rng.below(10) {
                        0 => 0,
                        1 => WINDOW + rng.below(4 * WINDOW),
                        2 => WINDOW - 1,
                        _ => rng.below(3_000),
                    };
                seq += 1;
                q.push(at, seq, seq);
                reference.push(Reverse((at, seq)));
            } else {
                assert_eq!(q.peek(), reference.peek().map(|r| r.0));
                let got = q.pop();
                let want = reference.pop().map(|Reverse((at, seq))| (at, seq));
                assert_eq!(got, want);
                if let Some((at, _)) = got {
                    now = at;
                }
            }
        }
        while let Some(Reverse((at, seq))) = reference.pop() {
            assert_eq!(q.pop(), Some((at, seq)));
        }
        assert_eq!(q.pop(), None);
        assert_eq!(q.peek(), None);
    }
}
