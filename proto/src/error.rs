//! OCI distribution error codes and their JSON body.
//!
//! Every error on the registry endpoint is `{"errors":[{"code","message","detail"}]}`
//! with the HTTP status the spec (and CNCF distribution) pairs with the code.

use serde::Serialize;

/// The error codes of the OCI distribution spec that Shoal answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Blob unknown to registry.
    BlobUnknown,
    /// Manifest unknown to registry.
    ManifestUnknown,
    /// Repository name not known to registry.
    NameUnknown,
    /// Invalid repository name.
    NameInvalid,
    /// Provided digest did not match uploaded content, or is malformed.
    DigestInvalid,
    /// Manifest invalid (e.g. too large or not JSON).
    ManifestInvalid,
    /// Authentication required.
    Unauthorized,
    /// Requested access to the resource is denied.
    Denied,
    /// The operation is unsupported (push on a mirror).
    Unsupported,
    /// Too many requests.
    TooManyRequests,
    /// The range requested cannot be satisfied.
    RangeInvalid,
    /// The origin or the node is unavailable right now.
    Unavailable,
}

impl ErrorCode {
    /// The code as written in the JSON body.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
            ErrorCode::Unavailable => "UNAVAILABLE",
        }
    }

    /// The HTTP status that goes with the code.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BlobUnknown | ErrorCode::ManifestUnknown | ErrorCode::NameUnknown => 404,
            ErrorCode::NameInvalid | ErrorCode::DigestInvalid | ErrorCode::ManifestInvalid => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Denied => 403,
            ErrorCode::Unsupported => 405,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::RangeInvalid => 416,
            ErrorCode::Unavailable => 503,
        }
    }

    /// The code for a string an origin sent, if Shoal knows it.
    pub fn from_code(s: &str) -> Option<Self> {
        Some(match s {
            "BLOB_UNKNOWN" => ErrorCode::BlobUnknown,
            "MANIFEST_UNKNOWN" => ErrorCode::ManifestUnknown,
            "NAME_UNKNOWN" => ErrorCode::NameUnknown,
            "NAME_INVALID" => ErrorCode::NameInvalid,
            "DIGEST_INVALID" => ErrorCode::DigestInvalid,
            "MANIFEST_INVALID" => ErrorCode::ManifestInvalid,
            "UNAUTHORIZED" => ErrorCode::Unauthorized,
            "DENIED" => ErrorCode::Denied,
            "UNSUPPORTED" => ErrorCode::Unsupported,
            "TOOMANYREQUESTS" => ErrorCode::TooManyRequests,
            _ => return None,
        })
    }
}

/// One OCI error: a code, a human message and an optional detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciError {
    /// The machine-readable code.
    pub code: ErrorCode,
    /// A precise, human-readable message.
    pub message: String,
    /// Extra context (the offending value, the origin's answer).
    pub detail: Option<String>,
}

/// Longest message or detail Shoal writes, so error bodies stay bounded.
const MAX_TEXT: usize = 1024;

impl OciError {
    /// An error with a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        OciError {
            code,
            message: bounded(message.into()),
            detail: None,
        }
    }

    /// Adds a detail.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(bounded(detail.into()));
        self
    }

    /// The JSON body.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Body<'a> {
            errors: [Item<'a>; 1],
        }
        #[derive(Serialize)]
        struct Item<'a> {
            code: &'static str,
            message: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            detail: Option<&'a str>,
        }
        serde_json::to_string(&Body {
            errors: [Item {
                code: self.code.as_str(),
                message: &self.message,
                detail: self.detail.as_deref(),
            }],
        })
        .expect("plain strings serialize")
    }
}

fn bounded(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

impl std::fmt::Display for OciError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " ({d})")?;
        }
        Ok(())
    }
}

impl std::error::Error for OciError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape() {
        let e = OciError::new(ErrorCode::BlobUnknown, "blob unknown").with_detail("sha256:x");
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["errors"][0]["code"], "BLOB_UNKNOWN");
        assert_eq!(v["errors"][0]["detail"], "sha256:x");
        assert_eq!(e.code.status(), 404);
        let long = OciError::new(ErrorCode::NameInvalid, "x".repeat(5000));
        assert!(long.to_json().len() < 1200);
    }
}
