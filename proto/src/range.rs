//! HTTP `Range` headers for blobs: one range of bytes, resolved against a size.

/// A resolved, satisfiable byte range: `start..=end` within the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte, inclusive.
    pub start: u64,
    /// Last byte, inclusive.
    pub end: u64,
}

impl ByteRange {
    /// Number of bytes covered.
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    /// Never true: a satisfiable range covers at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `Content-Range` value for a blob of `size` bytes.
    pub fn content_range(&self, size: u64) -> String {
        format!("bytes {}-{}/{}", self.start, self.end, size)
    }
}

/// Why a `Range` header was not honoured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// The header does not follow `bytes=a-b`, `bytes=a-` or `bytes=-n`.
    #[error(
        "malformed Range header {0:?}: expected bytes=START-END, bytes=START- or bytes=-SUFFIX"
    )]
    Malformed(String),
    /// More than one range was asked for; Shoal serves single ranges only.
    #[error("multiple ranges are not supported")]
    Multiple,
    /// The range lies outside the blob.
    #[error("range {0:?} is not satisfiable for a blob of {1} bytes")]
    Unsatisfiable(String, u64),
}

/// Parses a `Range` header against a blob of `size` bytes into the one range
/// it asks for, clamped to the blob (as RFC 9110 says for an end past it).
pub fn parse_range(header: &str, size: u64) -> Result<ByteRange, RangeError> {
    let clip = || header.chars().take(80).collect::<String>();
    let spec = header
        .trim()
        .strip_prefix("bytes=")
        .ok_or_else(|| RangeError::Malformed(clip()))?
        .trim();
    if spec.contains(',') {
        return Err(RangeError::Multiple);
    }
    let (a, b) = spec
        .split_once('-')
        .ok_or_else(|| RangeError::Malformed(clip()))?;
    let num = |s: &str| -> Result<u64, RangeError> {
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(RangeError::Malformed(clip()));
        }
        s.parse().map_err(|_| RangeError::Malformed(clip()))
    };
    let unsat = || RangeError::Unsatisfiable(clip(), size);
    match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n = num(suffix)?;
            if n == 0 || size == 0 {
                return Err(unsat());
            }
            Ok(ByteRange {
                start: size.saturating_sub(n),
                end: size - 1,
            })
        }
        (start, "") => {
            let s = num(start)?;
            if s >= size {
                return Err(unsat());
            }
            Ok(ByteRange {
                start: s,
                end: size - 1,
            })
        }
        (start, end) => {
            let (s, e) = (num(start)?, num(end)?);
            if e < s {
                return Err(RangeError::Malformed(clip()));
            }
            if s >= size {
                return Err(unsat());
            }
            Ok(ByteRange {
                start: s,
                end: e.min(size - 1),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(
            parse_range("bytes=10-99", 1000).unwrap(),
            ByteRange { start: 10, end: 99 }
        );
        assert_eq!(
            parse_range("bytes=10-", 1000).unwrap(),
            ByteRange {
                start: 10,
                end: 999
            }
        );
        assert_eq!(
            parse_range("bytes=-100", 1000).unwrap(),
            ByteRange {
                start: 900,
                end: 999
            }
        );
        assert_eq!(
            parse_range("bytes=-5000", 1000).unwrap(),
            ByteRange { start: 0, end: 999 }
        );
        assert_eq!(
            parse_range("bytes=990-5000", 1000).unwrap(),
            ByteRange {
                start: 990,
                end: 999
            }
        );
        assert_eq!(
            parse_range("bytes=10-99", 1000)
                .unwrap()
                .content_range(1000),
            "bytes 10-99/1000"
        );
    }

    #[test]
    fn errors() {
        assert!(matches!(
            parse_range("items=1-2", 10),
            Err(RangeError::Malformed(_))
        ));
        assert!(matches!(
            parse_range("bytes=5-2", 10),
            Err(RangeError::Malformed(_))
        ));
        assert!(matches!(
            parse_range("bytes=a-2", 10),
            Err(RangeError::Malformed(_))
        ));
        assert_eq!(parse_range("bytes=1-2,4-5", 10), Err(RangeError::Multiple));
        assert!(matches!(
            parse_range("bytes=10-", 10),
            Err(RangeError::Unsatisfiable(..))
        ));
        assert!(matches!(
            parse_range("bytes=-0", 10),
            Err(RangeError::Unsatisfiable(..))
        ));
        assert!(matches!(
            parse_range("bytes=99999999999999999999999-", 10),
            Err(RangeError::Malformed(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_stays_inside(s in "\\PC{0,40}", size in 0u64..10_000) {
            if let Ok(r) = parse_range(&s, size) {
                proptest::prop_assert!(r.start <= r.end && r.end < size);
            }
        }
    }
}
