//! What can go wrong talking to an origin, and how it reads as OCI error JSON.

use std::time::Duration;

use shoal_proto::{Digest, ErrorCode, OciError};

/// An origin request that failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OriginError {
    /// The origin says the manifest, blob or repository does not exist (404).
    #[error("{}: {message}", code.as_str())]
    NotFound {
        /// `BLOB_UNKNOWN`, `MANIFEST_UNKNOWN` or `NAME_UNKNOWN`, as the origin said.
        code: ErrorCode,
        /// The origin's message.
        message: String,
    },
    /// The origin (or its token service) refused our credentials or lack of them.
    #[error("unauthorized at {registry}: {message}")]
    Unauthorized {
        /// The registry host.
        registry: String,
        /// The origin's message, or what Shoal knows.
        message: String,
    },
    /// The origin denied access (403).
    #[error("access denied by the origin: {message}")]
    Denied {
        /// The origin's message.
        message: String,
    },
    /// The origin is rate-limiting us (429), still after the retries.
    #[error("the origin is rate-limiting requests{}", retry_after.map(|d| format!(" (retry after {}s)", d.as_secs())).unwrap_or_default())]
    TooManyRequests {
        /// The origin's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
    },
    /// Connect errors, timeouts, stalled bodies, and 5xx after the retries.
    #[error("origin {origin} unavailable: {reason}")]
    Unavailable {
        /// The host that failed.
        origin: String,
        /// What happened.
        reason: String,
    },
    /// The origin's answer is malformed or breaks the protocol.
    #[error("malformed answer from {origin}: {message}")]
    Protocol {
        /// The host that answered.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// Content did not hash to the digest it was asked for by (or announced with).
    #[error("content from the origin has digest {actual}, expected {expected}")]
    DigestMismatch {
        /// The digest asked for (or announced).
        expected: Digest,
        /// The digest of what arrived.
        actual: Digest,
    },
    /// A manifest larger than the limit.
    #[error("manifest larger than {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The credentials needed are in a place Shoal cannot use (a credential
    /// helper, an identity token); the message says what to change.
    #[error("{0}")]
    Credentials(String),
    /// A `Range` request was answered with the whole blob (200): restart from 0.
    #[error("the origin ignored the Range request and sent the whole blob")]
    RangeIgnored,
    /// A plain-HTTP URL for a host that is not configured as insecure.
    #[error("refusing plain http to {host}: it is not configured as an insecure upstream")]
    PlainHttpRefused {
        /// The `host[:port]`.
        host: String,
    },
    /// The registry name is not a valid `host[:port]`.
    #[error("invalid registry host {0:?}")]
    InvalidRegistry(String),
    /// The repository name is not valid at this origin (Docker Hub's
    /// implied `library/` makes it too long).
    #[error("invalid repository name: {0}")]
    InvalidName(shoal_proto::NameError),
    /// Any other unexpected status from the origin.
    #[error("origin answered {status}{}: {message}", code.as_deref().map(|c| format!(" {c}")).unwrap_or_default())]
    Status {
        /// The HTTP status.
        status: u16,
        /// The OCI error code from the body, if any.
        code: Option<String>,
        /// The origin's message.
        message: String,
    },
    /// The client could not be built (TLS setup).
    #[error("origin client setup failed: {0}")]
    Setup(String),
}

impl OriginError {
    /// Whether asking again later may succeed (the origin is down, slow or
    /// rate-limiting), as opposed to a definite answer.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            OriginError::Unavailable { .. } | OriginError::TooManyRequests { .. }
        )
    }

    /// The OCI error to answer a runtime with.
    pub fn to_oci(&self) -> OciError {
        use ErrorCode as C;
        match self {
            OriginError::NotFound { code, message } => {
                let what = match code {
                    C::BlobUnknown => "blob unknown to the origin registry",
                    C::ManifestUnknown => "manifest unknown to the origin registry",
                    C::NameUnknown => "repository name not known to the origin registry",
                    _ => "not found at the origin registry",
                };
                let e = OciError::new(*code, what);
                if message.is_empty() {
                    e
                } else {
                    e.with_detail(message.clone())
                }
            }
            OriginError::Unauthorized { registry, message } => OciError::new(
                C::Unauthorized,
                format!("authentication with the origin registry {registry} failed"),
            )
            .with_detail(message.clone()),
            OriginError::Denied { message } => {
                OciError::new(C::Denied, "the origin registry denied access")
                    .with_detail(message.clone())
            }
            OriginError::TooManyRequests { .. } => {
                OciError::new(C::TooManyRequests, self.to_string())
            }
            OriginError::Credentials(msg) => OciError::new(C::Unauthorized, msg.clone()),
            OriginError::TooLarge { .. } => OciError::new(C::ManifestInvalid, self.to_string()),
            OriginError::InvalidRegistry(_) | OriginError::InvalidName(_) => {
                OciError::new(C::NameInvalid, self.to_string())
            }
            OriginError::Status {
                status,
                code,
                message,
            } => {
                let c =
                    code.as_deref()
                        .and_then(ErrorCode::from_code)
                        .unwrap_or(if *status == 416 {
                            C::RangeInvalid
                        } else {
                            C::Unavailable
                        });
                OciError::new(c, format!("the origin registry answered {status}"))
                    .with_detail(message.clone())
            }
            OriginError::Unavailable { .. }
            | OriginError::Protocol { .. }
            | OriginError::DigestMismatch { .. }
            | OriginError::RangeIgnored
            | OriginError::PlainHttpRefused { .. }
            | OriginError::Setup(_) => OciError::new(C::Unavailable, self.to_string()),
        }
    }
}

/// Code and message from an OCI error body
/// (`{"errors":[{"code","message","detail"}]}`), or the text itself.
pub(crate) fn parse_error_body(body: &[u8]) -> (Option<String>, String) {
    #[derive(serde::Deserialize)]
    struct Body {
        errors: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        code: Option<String>,
        message: Option<String>,
        detail: Option<serde_json::Value>,
    }
    if let Ok(b) = serde_json::from_slice::<Body>(body) {
        if let Some(first) = b.errors.into_iter().next() {
            let mut message = first.message.unwrap_or_default();
            if let Some(d) = first.detail.filter(|d| !d.is_null()) {
                let d = match d {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                if !d.is_empty() {
                    message = if message.is_empty() {
                        d
                    } else {
                        format!("{message} ({d})")
                    };
                }
            }
            return (first.code, clip(&message));
        }
    }
    let text = String::from_utf8_lossy(body);
    (None, clip(text.trim()))
}

fn clip(s: &str) -> String {
    const MAX: usize = 512;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut cut = MAX;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &s[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies() {
        let (c, m) = parse_error_body(
            br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry","detail":"sha256:ab"}]}"#,
        );
        assert_eq!(c.as_deref(), Some("BLOB_UNKNOWN"));
        assert_eq!(m, "blob unknown to registry (sha256:ab)");
        let (c, m) = parse_error_body(
            br#"{"errors":[{"code":"DENIED","message":"no","detail":[{"a":1}]}]}"#,
        );
        assert_eq!(
            (c.as_deref(), m.as_str()),
            (Some("DENIED"), r#"no ([{"a":1}])"#)
        );
        let (c, m) = parse_error_body(b"  <html>bad gateway</html>\n");
        assert_eq!((c, m.as_str()), (None, "<html>bad gateway</html>"));
        let (_, m) = parse_error_body(&[b'x'; 5000]);
        assert!(m.len() < 600);
    }

    #[test]
    fn oci_mapping() {
        let nf = OriginError::NotFound {
            code: ErrorCode::BlobUnknown,
            message: "blob unknown to registry".into(),
        }
        .to_oci();
        assert_eq!(nf.code, ErrorCode::BlobUnknown);
        assert_eq!(nf.detail.as_deref(), Some("blob unknown to registry"));
        let u = OriginError::Unavailable {
            origin: "quay.io".into(),
            reason: "connect timed out".into(),
        }
        .to_oci();
        assert_eq!((u.code, u.code.status()), (ErrorCode::Unavailable, 503));
        let t = OriginError::TooManyRequests {
            retry_after: Some(Duration::from_secs(5)),
        }
        .to_oci();
        assert_eq!(t.code, ErrorCode::TooManyRequests);
        let c = OriginError::Credentials("docker-credential-desktop".into()).to_oci();
        assert_eq!(c.code, ErrorCode::Unauthorized);
        assert!(c.message.contains("docker-credential-desktop"));
        let s = OriginError::Status {
            status: 416,
            code: None,
            message: String::new(),
        }
        .to_oci();
        assert_eq!(s.code, ErrorCode::RangeInvalid);
        assert_eq!(
            OriginError::TooLarge { limit: 1 }.to_oci().code,
            ErrorCode::ManifestInvalid
        );
    }
}
