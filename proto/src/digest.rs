//! Content digests (`sha256:<64 lowercase hex>`) and incremental verification.
//!
//! Shoal only accepts SHA-256: it is what every registry and runtime uses, and
//! anything else is rejected with a precise error rather than guessed at.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// A SHA-256 content digest, as registries and runtimes write it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

/// Why a string is not a digest Shoal accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// There is no `algorithm:` prefix.
    #[error("digest {0:?} has no algorithm prefix (expected sha256:<64 hex>)")]
    MissingAlgorithm(String),
    /// The algorithm is not `sha256`.
    #[error("digest algorithm {0:?} is not supported (only sha256)")]
    UnsupportedAlgorithm(String),
    /// The hex part has the wrong length.
    #[error("sha256 digest must have 64 hex characters, got {0}")]
    BadLength(usize),
    /// The hex part has characters outside `[0-9a-f]`.
    #[error("sha256 digest must be lowercase hex, found {0:?}")]
    BadChar(char),
}

impl Digest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Digest(Sha256::digest(data).into())
    }

    /// Builds a digest from raw hash bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Digest(bytes)
    }

    /// The raw hash bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lowercase hex characters, without the algorithm.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Whether `s` looks like a digest at all (has an algorithm prefix), so a
    /// manifest reference can be told apart from a tag before parsing.
    pub fn looks_like(s: &str) -> bool {
        s.contains(':')
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((alg, hex_part)) = s.split_once(':') else {
            return Err(DigestError::MissingAlgorithm(truncate(s)));
        };
        if alg != "sha256" {
            return Err(DigestError::UnsupportedAlgorithm(truncate(alg)));
        }
        if hex_part.len() != 64 {
            return Err(DigestError::BadLength(hex_part.len()));
        }
        if let Some(c) = hex_part
            .chars()
            .find(|c| !matches!(c, '0'..='9' | 'a'..='f'))
        {
            return Err(DigestError::BadChar(c));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).expect("validated hex");
        Ok(Digest(out))
    }
}

/// Keeps error messages bounded whatever a client sends.
fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", &self.hex()[..12])
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Hashes bytes as they stream past and checks them against an expected digest.
#[derive(Clone)]
pub struct Sha256Verifier {
    expected: Digest,
    hasher: Sha256,
    len: u64,
}

impl fmt::Debug for Sha256Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sha256Verifier")
            .field("expected", &self.expected)
            .field("len", &self.len)
            .finish()
    }
}

impl Sha256Verifier {
    /// Starts verifying against `expected`.
    pub fn new(expected: Digest) -> Self {
        Sha256Verifier {
            expected,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// Feeds the next bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.len += data.len() as u64;
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Finishes: `Ok` if the bytes fed match the expected digest, otherwise
    /// the digest they actually have.
    pub fn finish(self) -> Result<(), Digest> {
        let got = Digest(self.hasher.finalize().into());
        if got == self.expected {
            Ok(())
        } else {
            Err(got)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_prints() {
        let d: Digest = EMPTY.parse().unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d, Digest::of(b""));
    }

    #[test]
    fn rejects_precisely() {
        assert_eq!(
            "abc".parse::<Digest>(),
            Err(DigestError::MissingAlgorithm("abc".into()))
        );
        assert_eq!(
            "md5:abc".parse::<Digest>(),
            Err(DigestError::UnsupportedAlgorithm("md5".into()))
        );
        assert_eq!(
            "sha256:abc".parse::<Digest>(),
            Err(DigestError::BadLength(3))
        );
        let upper = EMPTY.to_uppercase().replace("SHA256", "sha256");
        assert_eq!(upper.parse::<Digest>(), Err(DigestError::BadChar('E')));
    }

    #[test]
    fn verifier() {
        let mut v = Sha256Verifier::new(Digest::of(b"hello world"));
        v.update(b"hello ");
        v.update(b"world");
        assert_eq!(v.len(), 11);
        assert!(v.finish().is_ok());
        let mut v = Sha256Verifier::new(Digest::of(b"hello world"));
        v.update(b"hello there");
        assert_eq!(v.finish(), Err(Digest::of(b"hello there")));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,100}") {
            let _ = s.parse::<Digest>();
        }

        #[test]
        fn roundtrip(bytes in proptest::array::uniform32(0u8..)) {
            let d = Digest::from_bytes(bytes);
            proptest::prop_assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        }
    }
}
