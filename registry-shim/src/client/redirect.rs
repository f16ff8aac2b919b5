//! Redirect rules: which answers are redirects, where they lead, and whether
//! credentials may follow.
//!
//! Registries send blob downloads to object storage (S3, GCS, a CDN) with
//! `307` and a presigned URL. The `Authorization` header meant for the
//! registry must never reach such another host: it is sent only to the exact
//! scheme, host and port the request started at.

use http::StatusCode;
use url::Url;

/// Most redirects followed for one request.
pub(crate) const MAX_REDIRECTS: usize = 5;

/// Whether `status` is a redirect Shoal follows.
pub(crate) fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

/// Whether `a` and `b` are the same origin: scheme, host and port (default
/// ports filled in), so credentials for one may go to the other.
pub(crate) fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str().map(str::to_ascii_lowercase) == b.host_str().map(str::to_ascii_lowercase)
        && a.port_or_known_default() == b.port_or_known_default()
}

/// Resolves a `Location` against the URL that answered with it (relative
/// locations are common).
pub(crate) fn resolve_location(base: &Url, location: &str) -> Result<Url, url::ParseError> {
    base.join(location.trim())
}

/// `host[:port]` of a URL (port only when explicit), as operators write it.
pub(crate) fn host_port(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    }
}

/// A URL fit for logs: no query (presigned URLs carry signatures there), no
/// user info.
pub(crate) fn redacted(url: &Url) -> String {
    format!("{}://{}{}", url.scheme(), host_port(url), url.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn origins() {
        assert!(same_origin(
            &u("https://r.io/v2/a"),
            &u("https://R.io:443/other?x")
        ));
        assert!(same_origin(
            &u("http://127.0.0.1:5000/a"),
            &u("http://127.0.0.1:5000/b")
        ));
        assert!(!same_origin(&u("https://r.io/"), &u("http://r.io/")));
        assert!(!same_origin(&u("https://r.io/"), &u("https://r.io:8443/")));
        assert!(!same_origin(&u("https://r.io/"), &u("https://s3.r.io/")));
        assert!(!same_origin(
            &u("http://127.0.0.1:5000/"),
            &u("http://localhost:5000/")
        ));
        assert!(same_origin(
            &u("http://[::1]:5000/"),
            &u("http://[::1]:5000/x")
        ));
    }

    #[test]
    fn locations() {
        let base = u("https://r.io/v2/a/blobs/sha256:x");
        assert_eq!(
            resolve_location(&base, "/files/1?sig=2").unwrap().as_str(),
            "https://r.io/files/1?sig=2"
        );
        assert_eq!(
            resolve_location(&base, "other").unwrap().as_str(),
            "https://r.io/v2/a/blobs/other"
        );
        assert_eq!(
            resolve_location(&base, "https://s3.example.com/b?X-Amz-Signature=s")
                .unwrap()
                .host_str(),
            Some("s3.example.com")
        );
        assert_eq!(
            resolve_location(&base, "//cdn.example.com/p")
                .unwrap()
                .as_str(),
            "https://cdn.example.com/p"
        );
        assert!(resolve_location(&base, "http://[bad").is_err());
        for s in [301, 302, 303, 307, 308] {
            assert!(is_redirect(StatusCode::from_u16(s).unwrap()));
        }
        assert!(!is_redirect(StatusCode::NOT_MODIFIED));
        assert_eq!(
            redacted(&u(
                "https://user:pw@s3.example.com:9000/b/k?X-Amz-Signature=s"
            )),
            "https://s3.example.com:9000/b/k"
        );
    }
}
