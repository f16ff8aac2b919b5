//! Byte-rate caps for the peer data plane (`--peer-upload-rate`,
//! `--peer-download-rate`), so seeding never starves the node's own
//! workloads.
//!
//! [`TokenBucket`] is the pure policy (time in, wait out); [`RateLimit`]
//! shares one bucket between every stream of a direction. A sender takes
//! tokens for the bytes it just moved and then waits off any debt, so one
//! large frame goes out at once and the average over a few hundred
//! milliseconds stays at the cap. On the download side the wait delays the
//! next read, and QUIC flow control slows the sending peer down.
//!
//! [`Every`] paces a notice instead of bytes: the transfers tell the
//! scheduler that a request's bytes are moving at most once a period.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket of `rate` bytes per second holding at most `burst` bytes.
/// Taking more than there is puts the bucket in debt; the caller waits the
/// debt off before moving more.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. `rate` and `burst` must be positive.
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        let rate = rate.max(1) as f64;
        let burst = burst.max(1) as f64;
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes `n` bytes at `now` and returns how long to wait before moving
    /// more (zero while the bucket is not in debt).
    pub fn take(&mut self, n: u64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// A shared cap on bytes per second, or no cap. Cheap to clone.
///
/// The cap is the lower of two: the operator's (`--peer-upload-rate`) and
/// one learned at run time ([`RateLimit::set_learned`], from
/// [`crate::uplink`]); either may be absent.
#[derive(Debug, Clone, Default)]
pub struct RateLimit(Option<Arc<Mutex<Caps>>>);

#[derive(Debug)]
struct Caps {
    configured: Option<u64>,
    learned: Option<u64>,
    bucket: Option<TokenBucket>,
}

impl Caps {
    fn effective(&self) -> Option<u64> {
        match (self.configured, self.learned) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Makes the bucket follow the effective cap, keeping its level.
    fn rebucket(&mut self) {
        self.bucket = self.effective().map(|rate| {
            let burst = burst_of(rate);
            match self.bucket.take() {
                Some(mut b) => {
                    b.rate = rate.max(1) as f64;
                    b.burst = burst as f64;
                    b.tokens = b.tokens.min(b.burst);
                    b
                }
                None => TokenBucket::new(rate, burst, Instant::now()),
            }
        });
    }
}

/// Bursts of a tenth of a second's worth, at least 64 KiB.
fn burst_of(bytes_per_sec: u64) -> u64 {
    (bytes_per_sec / 10).max(64 << 10)
}

impl RateLimit {
    /// No cap.
    pub fn unlimited() -> Self {
        RateLimit(None)
    }

    /// At most `bytes_per_sec` on average, with bursts of a tenth of a
    /// second's worth (at least 64 KiB).
    pub fn new(bytes_per_sec: u64) -> Self {
        Self::adjustable(Some(bytes_per_sec))
    }

    /// `Some(rate)` is a cap, `None` none.
    pub fn from_option(bytes_per_sec: Option<u64>) -> Self {
        bytes_per_sec.map_or_else(Self::unlimited, Self::new)
    }

    /// The operator's cap (or none), lowered while a learned cap is set.
    pub fn adjustable(configured: Option<u64>) -> Self {
        let mut caps = Caps {
            configured,
            learned: None,
            bucket: None,
        };
        caps.rebucket();
        RateLimit(Some(Arc::new(Mutex::new(caps))))
    }

    /// Sets or clears the learned cap. No effect on
    /// [`RateLimit::unlimited`].
    pub fn set_learned(&self, bytes_per_sec: Option<u64>) {
        let Some(caps) = &self.0 else { return };
        let mut caps = caps.lock().expect("rate caps lock");
        if caps.learned != bytes_per_sec {
            caps.learned = bytes_per_sec;
            caps.rebucket();
        }
    }

    /// The cap in force now, if any.
    pub fn current(&self) -> Option<u64> {
        self.0
            .as_ref()
            .and_then(|c| c.lock().expect("rate caps lock").effective())
    }

    /// Whether a cap is in force now.
    pub fn is_limited(&self) -> bool {
        self.current().is_some()
    }

    /// Accounts `n` bytes just moved (or about to be) and waits off any
    /// debt.
    pub async fn spend(&self, n: usize) {
        let Some(caps) = &self.0 else { return };
        let wait = match &mut caps.lock().expect("rate caps lock").bucket {
            Some(bucket) => bucket.take(n as u64, Instant::now()),
            None => return,
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Says yes at most once per period: first when a period has passed since
/// it was made, then a period after each yes.
#[derive(Debug)]
pub struct Every {
    period: Duration,
    last: std::time::Instant,
}

impl Every {
    /// Starts counting now.
    pub fn new(period: Duration) -> Self {
        Every {
            period,
            last: std::time::Instant::now(),
        }
    }

    /// Whether a period has passed since the last yes (or the start).
    pub fn due(&mut self) -> bool {
        let now = std::time::Instant::now();
        if now.duration_since(self.last) < self.period {
            return false;
        }
        self.last = now;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_lets_a_burst_through_then_charges_the_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 500, t0);
        assert_eq!(b.take(500, t0), Duration::ZERO);
        // 300 bytes of debt at 1000 B/s.
        assert_eq!(b.take(300, t0), Duration::from_millis(300));
        // After the debt is waited off, the bucket is level again.
        let t1 = t0 + Duration::from_millis(300);
        assert_eq!(b.take(0, t1), Duration::ZERO);
        // Refill stops at the burst size.
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(b.take(500, t2), Duration::ZERO);
        assert_eq!(b.take(100, t2), Duration::from_millis(100));
    }

    #[test]
    fn the_long_run_average_is_the_rate() {
        // Senders that always wait off their debt move `rate` bytes a second.
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1 << 20, 64 << 10, t0);
        let mut now = t0;
        let mut moved = 0u64;
        while now < t0 + Duration::from_secs(10) {
            moved += 100_000;
            now += b.take(100_000, now);
        }
        let secs = (now - t0).as_secs_f64();
        let rate = moved as f64 / secs;
        assert!(
            (rate - (1 << 20) as f64).abs() / ((1 << 20) as f64) < 0.02,
            "{rate} B/s"
        );
    }

    #[test]
    fn a_clock_that_steps_back_adds_nothing() {
        let t0 = Instant::now() + Duration::from_secs(5);
        let mut b = TokenBucket::new(1000, 1000, t0);
        assert_eq!(b.take(1000, t0), Duration::ZERO);
        let earlier = t0 - Duration::from_secs(1);
        assert_eq!(b.take(100, earlier), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_learned_cap_applies_under_the_operators_and_can_be_cleared() {
        let open = RateLimit::adjustable(None);
        assert_eq!(open.current(), None);
        assert!(!open.is_limited());
        open.set_learned(Some(1 << 20));
        assert_eq!(open.current(), Some(1 << 20));
        let t0 = Instant::now();
        for _ in 0..11 {
            open.spend(100 << 10).await;
        }
        assert!(
            t0.elapsed() >= Duration::from_millis(950),
            "{:?}",
            t0.elapsed()
        );
        open.set_learned(None);
        assert!(!open.is_limited());

        let capped = RateLimit::adjustable(Some(1000));
        capped.set_learned(Some(5000));
        assert_eq!(
            capped.current(),
            Some(1000),
            "the operator's cap is a ceiling"
        );
        capped.set_learned(Some(500));
        assert_eq!(capped.current(), Some(500));
        capped.set_learned(None);
        assert_eq!(capped.current(), Some(1000));

        // `unlimited` has nothing to lower: it stays without a cap.
        let none = RateLimit::unlimited();
        none.set_learned(Some(1));
        assert_eq!(none.current(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn spending_waits_in_tokio_time() {
        let limit = RateLimit::new(1 << 20);
        let t0 = Instant::now();
        // A burst of 104857 bytes (a tenth of a second) is free, the rest waits.
        for _ in 0..11 {
            limit.spend(100 << 10).await;
        }
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(950) && waited <= Duration::from_millis(1000),
            "{waited:?}"
        );
        RateLimit::unlimited().spend(usize::MAX).await;
    }
}
