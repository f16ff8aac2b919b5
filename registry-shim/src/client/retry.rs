//! When and how long to wait before asking an origin again.
//!
//! Connect errors, timeouts, `5xx` and `429` are retried with exponential
//! backoff and jitter, bounded by a number of attempts; a `Retry-After` from
//! the origin replaces the backoff (capped, so a hostile value cannot park a
//! request for hours).

use std::time::{Duration, SystemTime};

/// Retry policy for requests to origins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (default 4; 0 counts as 1).
    pub max_attempts: u32,
    /// Backoff before the second attempt (default 200 ms); doubles each time.
    pub base_delay: Duration,
    /// Longest wait between attempts, `Retry-After` included (default 10 s).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// Attempts in all, at least one.
    pub fn attempts(&self) -> u32 {
        self.max_attempts.max(1)
    }

    /// The exponential backoff after failed attempt number `attempt`
    /// (1-based) before jitter: `base * 2^(attempt-1)`, capped.
    pub fn backoff_ceiling(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(20);
        self.base_delay
            .saturating_mul(1u32 << shift)
            .min(self.max_delay)
    }

    /// How long to wait after failed attempt `attempt`: the origin's
    /// `Retry-After` if it sent one (capped at `max_delay`), else the
    /// backoff with jitter, uniformly in `[ceiling/2, ceiling]`.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(ra) = retry_after {
            return ra.min(self.max_delay);
        }
        let ceiling = self.backoff_ceiling(attempt);
        let half = ceiling / 2;
        let jitter = rand::random::<f64>();
        half + half.mul_f64(jitter)
    }
}

/// Parses a `Retry-After` value: delay seconds or an HTTP-date (relative to
/// `now`; a date in the past means "now"). `None` when unparseable.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // Absurdly long numbers saturate; the caller caps the wait anyway.
        return Some(Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(42));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(42))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(42));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        for bad in ["", "-1", "1.5", "soon", "Tue, 99 Foo 2020"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad}");
        }
    }

    #[test]
    fn backoff_grows_jitters_and_caps() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff_ceiling(1), Duration::from_millis(200));
        assert_eq!(p.backoff_ceiling(3), Duration::from_millis(800));
        assert_eq!(p.backoff_ceiling(100), Duration::from_secs(10));
        for attempt in 1..8 {
            let c = p.backoff_ceiling(attempt);
            let d = p.delay(attempt, None);
            assert!(d >= c / 2 && d <= c, "{d:?} vs {c:?}");
        }
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3600))),
            Duration::from_secs(10)
        );
        assert_eq!(
            RetryPolicy {
                max_attempts: 0,
                ..p
            }
            .attempts(),
            1
        );
    }
}
