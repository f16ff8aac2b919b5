//! Request routing and upstream selection for the registry endpoint.
//!
//! Upstream selection, in order: the `ns` query parameter (containerd); a
//! first path component naming an allowed upstream host (registries.conf
//! mirrors of CRI-O and podman); otherwise the default upstream (Docker).

use std::collections::HashSet;

use http::{Method, Uri};
use shoal_proto::reference::{api_host, looks_like_host, valid_host};
use shoal_proto::{Digest, ErrorCode, OciError, Reference, RepoName};

use super::{oci_from_name_error, parse_repo};

/// Which origins this node may use and which one is the default.
#[derive(Debug, Clone)]
pub struct UpstreamPolicy {
    /// Origin for requests that name none (`--default-upstream`).
    pub default: String,
    /// Allowed origins (`--upstream`, `--insecure-upstream`); `None` = any.
    pub allowed: Option<HashSet<String>>,
}

impl UpstreamPolicy {
    /// Whether `host` may be used as an origin. Docker Hub's aliases count
    /// as one host.
    pub fn allows(&self, host: &str) -> bool {
        match &self.allowed {
            None => true,
            Some(set) => set.iter().any(|a| api_host(a) == api_host(host)),
        }
    }
}

/// The repository a request is about, at a chosen origin.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// Origin registry as users write it (`docker.io`, `quay.io`, `host:port`).
    pub upstream: String,
    /// Repository name as the client sent it.
    pub repo: RepoName,
}

/// A routed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /v2/`: API version check.
    Base,
    /// HEAD/GET a manifest.
    Manifest {
        /// Where.
        target: Target,
        /// By tag or digest.
        reference: Reference,
    },
    /// HEAD/GET a blob.
    Blob {
        /// Where.
        target: Target,
        /// Which.
        digest: Digest,
    },
}

/// Longest path the router looks at; longer ones are rejected outright.
const MAX_PATH: usize = 2048;

/// Routes a request, or says precisely why it cannot be served.
pub fn route(method: &Method, uri: &Uri, policy: &UpstreamPolicy) -> Result<Route, OciError> {
    let path = uri.path();
    if path.len() > MAX_PATH {
        return Err(OciError::new(
            ErrorCode::NameInvalid,
            "request path too long",
        ));
    }
    let read_only = *method == Method::GET || *method == Method::HEAD;
    let Some(rest) = path.strip_prefix("/v2") else {
        return Err(
            OciError::new(ErrorCode::NameUnknown, "not a registry API path")
                .with_detail(clip(path)),
        );
    };
    if rest.is_empty() || rest == "/" {
        return if read_only {
            Ok(Route::Base)
        } else {
            Err(unsupported(method))
        };
    }
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    if segs.windows(2).any(|w| w == ["blobs", "uploads"]) {
        return Err(OciError::new(
            ErrorCode::Unsupported,
            "Shoal is a pull-through mirror: push is not supported",
        )
        .with_detail("push to the origin registry instead"));
    }
    if rest == "_catalog" || (n >= 3 && segs[n - 2] == "tags" && segs[n - 1] == "list") {
        return Err(OciError::new(
            ErrorCode::Unsupported,
            "catalog and tag listing are not served by the mirror",
        )
        .with_detail("ask the origin registry"));
    }
    if n < 3 || (segs[n - 2] != "manifests" && segs[n - 2] != "blobs") {
        return Err(
            OciError::new(ErrorCode::NameUnknown, "unknown registry API path")
                .with_detail(clip(path)),
        );
    }
    if !read_only {
        return Err(unsupported(method));
    }
    let name = &rest[..rest.len() - segs[n - 1].len() - segs[n - 2].len() - 2];
    let target = select_upstream(name, uri.query(), policy)?;
    let last = segs[n - 1];
    if segs[n - 2] == "manifests" {
        let reference = last
            .parse::<Reference>()
            .map_err(|e| oci_from_name_error(&e))?;
        Ok(Route::Manifest { target, reference })
    } else {
        let digest = last
            .parse::<Digest>()
            .map_err(|e| OciError::new(ErrorCode::DigestInvalid, e.to_string()))?;
        Ok(Route::Blob { target, digest })
    }
}

fn unsupported(method: &Method) -> OciError {
    OciError::new(
        ErrorCode::Unsupported,
        format!("{method} is not supported: Shoal is a read-only pull-through mirror"),
    )
}

fn clip(s: &str) -> String {
    s.chars().take(120).collect()
}

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

fn select_upstream(
    name: &str,
    query: Option<&str>,
    policy: &UpstreamPolicy,
) -> Result<Target, OciError> {
    let (upstream, repo) = if let Some(ns) = query_param(query, "ns") {
        let ns = ns.replace("%3A", ":").replace("%3a", ":");
        if !valid_host(&ns) {
            return Err(OciError::new(
                ErrorCode::NameInvalid,
                format!("ns {:?} is not a registry host[:port]", clip(&ns)),
            ));
        }
        (ns, name)
    } else {
        match name.split_once('/') {
            Some((first, rest)) if looks_like_host(first) && policy.allows(first) => {
                (first.to_owned(), rest)
            }
            Some((first, _)) if looks_like_host(first) && policy.allowed.is_some() => {
                return Err(denied(first));
            }
            _ => (policy.default.clone(), name),
        }
    };
    if !policy.allows(&upstream) {
        return Err(denied(&upstream));
    }
    Ok(Target {
        upstream,
        repo: parse_repo(repo)?,
    })
}

fn denied(host: &str) -> OciError {
    OciError::new(
        ErrorCode::Denied,
        format!("upstream {:?} is not allowed on this node", clip(host)),
    )
    .with_detail("allow it with --upstream or --insecure-upstream")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allowed: Option<&[&str]>) -> UpstreamPolicy {
        UpstreamPolicy {
            default: "docker.io".into(),
            allowed: allowed.map(|a| a.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn get(uri: &str, p: &UpstreamPolicy) -> Result<Route, OciError> {
        route(&Method::GET, &uri.parse().unwrap(), p)
    }

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn selects_upstream() {
        let any = policy(None);
        let Route::Manifest { target, .. } =
            get("/v2/library/alpine/manifests/3?ns=docker.io", &any).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (target.upstream.as_str(), target.repo.as_str()),
            ("docker.io", "library/alpine")
        );
        let Route::Blob { target, .. } =
            get(&format!("/v2/quay.io/org/app/blobs/{D}"), &any).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (target.upstream.as_str(), target.repo.as_str()),
            ("quay.io", "org/app")
        );
        let Route::Blob { target, .. } = get(&format!("/v2/org/app/blobs/{D}"), &any).unwrap()
        else {
            panic!()
        };
        assert_eq!(target.upstream, "docker.io");
        let only = policy(Some(&["127.0.0.1:5000", "docker.io"]));
        assert!(get("/v2/a/manifests/t?ns=registry-1.docker.io", &only).is_ok());
        assert_eq!(
            get("/v2/a/manifests/t?ns=quay.io", &only).unwrap_err().code,
            ErrorCode::Denied
        );
        assert_eq!(
            get("/v2/quay.io/a/manifests/t", &only).unwrap_err().code,
            ErrorCode::Denied
        );
        let Route::Manifest { target, .. } =
            get("/v2/127.0.0.1:5000/a/manifests/t", &only).unwrap()
        else {
            panic!()
        };
        assert_eq!(target.upstream, "127.0.0.1:5000");
    }

    #[test]
    fn errors() {
        let any = policy(None);
        assert_eq!(get("/v2/", &any).unwrap(), Route::Base);
        assert_eq!(
            get("/v2/UP/blobs/x", &any).unwrap_err().code,
            ErrorCode::NameInvalid
        );
        assert_eq!(
            get("/v2/a//b/manifests/x", &any).unwrap_err().code,
            ErrorCode::NameInvalid
        );
        assert_eq!(
            get("/v2/a/blobs/sha256:xyz", &any).unwrap_err().code,
            ErrorCode::DigestInvalid
        );
        assert_eq!(
            get("/v2/a/manifests/md5:abc", &any).unwrap_err().code,
            ErrorCode::DigestInvalid
        );
        assert_eq!(
            get("/v2/a/manifests/.bad", &any).unwrap_err().code,
            ErrorCode::NameInvalid
        );
        let put = route(&Method::PUT, &"/v2/a/manifests/t".parse().unwrap(), &any).unwrap_err();
        assert_eq!(put.code, ErrorCode::Unsupported);
        let post = route(
            &Method::POST,
            &"/v2/a/blobs/uploads/".parse().unwrap(),
            &any,
        )
        .unwrap_err();
        assert_eq!(post.code, ErrorCode::Unsupported);
        assert_eq!(get("/v3/x", &any).unwrap_err().code, ErrorCode::NameUnknown);
        assert_eq!(
            get("/v2/a/manifests/t?ns=bad_host", &any).unwrap_err().code,
            ErrorCode::NameInvalid
        );
    }
}
