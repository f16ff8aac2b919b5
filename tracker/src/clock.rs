//! Tracker time: milliseconds on a monotonic clock, as the [`Tracker`] core
//! takes them. The server and [`Embedded`] read time through [`Clock`] so
//! tests can drive it by hand ([`ManualClock`]).
//!
//! Tracker time is private to one tracker process: it starts near zero when
//! the process starts. Times in replies (a lease's `expires_ms`, an
//! exclusion's `until_ms`) are on that clock, not on the member's; see
//! [`crate::client::Lease::valid_for`] for the conversion a member needs.
//!
//! [`Tracker`]: crate::Tracker
//! [`Embedded`]: crate::client::Embedded

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// A source of tracker time in milliseconds; never goes backwards.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current tracker time.
    fn now_ms(&self) -> u64;
}

/// Milliseconds since the clock was made, from [`Instant`] (monotonic: wall
/// clock steps do not move it).
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    start: Instant,
}

impl MonotonicClock {
    /// A clock reading 0 now.
    pub fn new() -> Self {
        MonotonicClock {
            start: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A clock that moves only when told to, for tests.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock reading `ms`.
    pub fn new(ms: u64) -> Self {
        ManualClock(AtomicU64::new(ms))
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    /// Sets the clock to `ms` (ignored if that is earlier than now).
    pub fn set(&self, ms: u64) {
        self.0.fetch_max(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Where a tracker process starts numbering hash epochs
/// ([`Tracker::starting_epochs_at`](crate::Tracker::starting_epochs_at)):
/// the wall clock in microseconds, so a restarted tracker never reuses the
/// epochs (and members' hash cursors) of the one before.
pub fn epoch_base() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
}
