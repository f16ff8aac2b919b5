//! When a member whose upload slots are all taken should be asked again.
//!
//! A holder refuses a request with `Busy` when its upload slots and its
//! short queue are full. Without a hint each requester guesses a back-off
//! and most guesses land while the slots are still taken: in a 300-member
//! simulation at 10 gbit three of every four peer requests were refused,
//! each a round trip and a scheduler pass. The holder knows better — how
//! long a request holds a slot, how many wait — so its `Busy` answer says
//! when to come back ([`crate::wire::busy_message`]), and it hands those
//! times out one after another, a slot's turn apart, so the requesters it
//! refused come back spread over the time slots free up instead of all at
//! once. A hint is advice: a requester may get its chunks elsewhere
//! meanwhile, and its turn then goes to whoever asks.
//!
//! Pure (times in, times out): the daemon's peer server and the simulator
//! hand out the same hints.

/// What a request is taken to hold a slot for before one has been timed
/// (µs).
const DEFAULT_HOLD_US: u64 = 50_000;

/// Hints are at least this far apart (µs).
const MIN_GAP_US: u64 = 100;

/// The latest retry time handed out, from now (µs): past it the requester's
/// own back-off is as good a guess.
pub const MAX_RETRY_US: u64 = 2_000_000;

/// Retry times handed out by one member for its upload slots.
#[derive(Debug, Clone, Default)]
pub struct Appointments {
    /// How long a request holds a slot (µs), smoothed; `None` before the
    /// first.
    hold_us: Option<u64>,
    /// The earliest time the next refusal may be given (µs).
    next_us: u64,
}

impl Appointments {
    /// None handed out yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A request held an upload slot for `us`.
    pub fn served(&mut self, us: u64) {
        self.hold_us = Some(match self.hold_us {
            None => us,
            Some(avg) => (avg * 7 + us) / 8,
        });
    }

    /// A slot came free at `now_us` with `queued` requests waiting for one.
    /// With none, the turns handed out ran ahead of the requests coming
    /// back (they found their chunks elsewhere): the next refusal's turn
    /// starts from now again, not after theirs.
    pub fn freed(&mut self, now_us: u64, queued: usize) {
        if queued == 0 {
            self.next_us = self.next_us.min(now_us);
        }
    }

    /// How long a request holds a slot (µs), as timed so far.
    pub fn hold_us(&self) -> u64 {
        self.hold_us.unwrap_or(DEFAULT_HOLD_US)
    }

    /// A request is refused at `now_us` while `queued` requests wait for one
    /// of `slots` slots: when it should be asked again (µs, after `now_us`).
    /// Slots free one every hold time ÷ slots; the queue goes first, then
    /// the requests refused before this one, one turn each.
    pub fn refuse(&mut self, now_us: u64, queued: usize, slots: u32) -> u64 {
        let gap = (self.hold_us() / u64::from(slots.max(1))).max(MIN_GAP_US);
        let turn = self.next_us.max(now_us + gap * (queued as u64 + 1));
        let at = turn.min(now_us + MAX_RETRY_US);
        self.next_us = at + gap;
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_get_turns_a_slot_time_apart_past_the_queue() {
        let mut a = Appointments::new();
        // A request holds a slot for 16 ms; 16 slots: one frees every ms.
        a.served(16_000);
        assert_eq!(a.refuse(10_000, 4, 16), 15_000, "after the 4 queued");
        assert_eq!(a.refuse(10_000, 4, 16), 16_000);
        assert_eq!(a.refuse(10_500, 4, 16), 17_000);
        // Later, with the turns handed out in the past, from now again.
        assert_eq!(a.refuse(100_000, 0, 16), 101_000);
        assert_eq!(a.refuse(100_000, 0, 16), 102_000);
        // A slot frees with requests queued: the turns stand.
        a.freed(100_500, 2);
        assert_eq!(a.refuse(100_500, 0, 16), 103_000);
        // One frees with nobody waiting: those told to come back went
        // elsewhere, and the next turn is from now.
        a.freed(100_600, 0);
        assert_eq!(a.refuse(100_600, 0, 16), 101_600);
    }

    #[test]
    fn hold_times_are_smoothed_and_hints_bounded() {
        let mut a = Appointments::new();
        assert_eq!(a.hold_us(), DEFAULT_HOLD_US);
        a.served(8_000);
        a.served(16_000);
        assert_eq!(a.hold_us(), 9_000);
        // However many were refused, no hint is past the bound.
        let last = (0..100_000).map(|_| a.refuse(0, 4, 16)).last().unwrap();
        assert_eq!(last, MAX_RETRY_US);
        // Tiny hold times still space turns out.
        let mut b = Appointments::new();
        b.served(1);
        assert_eq!(b.refuse(0, 0, 16), MIN_GAP_US);
        assert_eq!(b.refuse(0, 0, 16), 2 * MIN_GAP_US);
    }
}
