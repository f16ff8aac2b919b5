//! One member's announces, merged: its downloads each announce their own
//! blob (at most every 200 ms, at least every second while incomplete), and
//! a member pulling five layers sent five announces where one would do. At
//! 10,000 members announces were the tracker's most frequent write (228k
//! of 597k requests in a simulated cold pull, each holding the core's lock
//! alone). An [`Announcer`] keeps at most one of the member's announces on
//! its way to the tracker; what the downloads announce meanwhile waits,
//! merged into one ([`Announce::merge`]), and goes when the one on its way
//! is answered. Pure: the daemon and the simulator drive it.

use crate::tracker_api::Announce;

/// A member's announces: at most one on its way, the rest merged.
#[derive(Debug, Default)]
pub struct Announcer {
    on_its_way: bool,
    /// Merged announces waiting, oldest first (more than one only when
    /// merging would list too many blobs for one announce).
    waiting: std::collections::VecDeque<Announce>,
}

impl Announcer {
    /// A download's announce. Returns the announce to send now when none
    /// is on its way; otherwise it waits, merged with the others. Either
    /// way the download may go on at once (its announce is the member's
    /// now).
    pub fn submit(&mut self, a: Announce) -> Option<Announce> {
        if !self.on_its_way {
            self.on_its_way = true;
            return Some(a);
        }
        let unmerged = match self.waiting.back_mut() {
            Some(last) => last.merge(a).err(),
            None => Some(a),
        };
        self.waiting.extend(unmerged);
        None
    }

    /// The announce on its way was answered, or failed: the next one to
    /// send, if any waits.
    pub fn answered(&mut self) -> Option<Announce> {
        let next = self.waiting.pop_front();
        self.on_its_way = next.is_some();
        next
    }

    /// Whether an announce is on its way.
    pub fn busy(&self) -> bool {
        self.on_its_way
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker_api::{BlobHave, NodeId, PeerAddr};
    use crate::{Bitfield, ChunkLayout, Digest};
    use std::num::NonZeroU32;

    fn node(n: &str) -> NodeId {
        n.parse().unwrap()
    }

    fn addr() -> PeerAddr {
        "10.0.0.1:4901".parse().unwrap()
    }

    fn have(d: u8, chunks: &[u32]) -> BlobHave {
        let l = ChunkLayout::new(8 << 20, 1 << 20).unwrap();
        let mut b = Bitfield::for_layout(&l);
        for &c in chunks {
            b.set(c).unwrap();
        }
        BlobHave::new(Digest::of(&[d]), l, b, false).unwrap()
    }

    fn announce(n: &str, blobs: Vec<BlobHave>, dropped: &[u8], full: bool) -> Announce {
        let dropped = dropped.iter().map(|&d| Digest::of(&[d])).collect();
        Announce::new(node(n), addr(), blobs, dropped, full).unwrap()
    }

    fn counts(a: &Announce) -> Vec<(Digest, u32)> {
        a.blobs()
            .iter()
            .map(|b| (*b.blob(), b.have().count()))
            .collect()
    }

    #[test]
    fn a_merge_keeps_each_blobs_latest_word() {
        let first = announce("a", vec![have(1, &[0]), have(2, &[0])], &[3], false);
        let later = announce("a", vec![have(1, &[0, 1]), have(3, &[5])], &[2], false)
            .with_next_ms(NonZeroU32::new(1000));
        let mut m = first;
        m.merge(later).unwrap();
        assert_eq!(
            counts(&m),
            [(Digest::of(&[1]), 2), (Digest::of(&[3]), 1)],
            "blob 1 as later said, blob 2 dropped later, blob 3 back"
        );
        assert_eq!(m.dropped(), [Digest::of(&[2])]);
        assert!(!m.is_full());
        assert_eq!(m.next_ms(), NonZeroU32::new(1000));
        // What the merged announce says still makes a valid announce.
        let again = Announce::new(
            m.node().clone(),
            m.addr().clone(),
            m.blobs().to_vec(),
            m.dropped().to_vec(),
            m.is_full(),
        );
        assert!(again.is_ok());
    }

    #[test]
    fn a_full_announce_stays_full_and_a_later_full_one_replaces_it() {
        let full = announce("a", vec![have(1, &[0]), have(2, &[0])], &[], true);
        let update = announce("a", vec![have(2, &[0, 1])], &[], false);
        let mut m = full;
        m.merge(update).unwrap();
        assert!(m.is_full());
        assert_eq!(counts(&m), [(Digest::of(&[1]), 1), (Digest::of(&[2]), 2)]);
        let newer_full = announce("a", vec![have(4, &[0])], &[], true);
        m.merge(newer_full).unwrap();
        assert!(m.is_full());
        assert_eq!(counts(&m), [(Digest::of(&[4]), 1)]);
        let other = announce("b", vec![], &[], false);
        assert!(m.merge(other).is_err(), "another node's announce");
        assert_eq!(counts(&m), [(Digest::of(&[4]), 1)], "left as it was");
    }

    #[test]
    fn a_leave_replaces_what_waits_and_what_follows_it_replaces_the_leave() {
        let mut m = announce("a", vec![have(1, &[0])], &[], false);
        let leave = Announce::leave(m.node().clone(), m.addr().clone());
        m.merge(leave).unwrap();
        assert!(m.is_leaving() && m.blobs().is_empty());
        // The node came back before the leave went out.
        m.merge(announce("a", vec![have(2, &[0])], &[], false))
            .unwrap();
        assert!(!m.is_leaving());
        assert_eq!(counts(&m), [(Digest::of(&[2]), 1)]);
    }

    #[test]
    fn one_announce_on_its_way_and_the_rest_wait_merged() {
        let mut a = Announcer::default();
        assert!(!a.busy());
        assert!(a
            .submit(announce("a", vec![have(1, &[0])], &[], false))
            .is_some());
        for (d, c) in [(2, 0), (3, 0), (2, 1)] {
            let chunks: Vec<u32> = (0..=c).collect();
            assert!(a
                .submit(announce("a", vec![have(d, &chunks)], &[], false))
                .is_none());
        }
        let next = a.answered().expect("the merged announce");
        assert_eq!(
            counts(&next),
            [(Digest::of(&[3]), 1), (Digest::of(&[2]), 2)]
        );
        assert!(a.busy(), "the merged one is on its way now");
        assert!(a.answered().is_none());
        assert!(!a.busy());
        assert!(a.submit(announce("a", vec![], &[], false)).is_some());
    }
}
