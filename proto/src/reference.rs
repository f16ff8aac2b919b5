//! Repository names, tags, manifest references and registry hosts.
//!
//! The grammar is the OCI distribution spec's (also CNCF distribution's):
//! a name is `/`-separated components of `[a-z0-9]+` joined by `.`, `_`,
//! `__` or runs of `-`, at most 255 characters; a tag is
//! `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`. Docker Hub's quirks (the API host
//! `registry-1.docker.io`, the implicit `library/` namespace) live here too.

use std::fmt;
use std::str::FromStr;

use crate::digest::{Digest, DigestError};

/// The name users and containerd give Docker Hub.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that actually serves Docker Hub's registry API.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// Longest repository name accepted (CNCF distribution's limit).
pub const MAX_NAME_LEN: usize = 255;

/// Why a name, tag, host or image reference was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The repository name is empty.
    #[error("repository name is empty")]
    Empty,
    /// The repository name is longer than 255 characters.
    #[error("repository name is {0} characters long (at most 255)")]
    TooLong(usize),
    /// A path component is empty (`a//b`, leading or trailing `/`).
    #[error("repository name {0:?} has an empty path component")]
    EmptyComponent(String),
    /// A path component breaks the grammar.
    #[error("repository name component {0:?} is invalid: lowercase letters, digits and single separators (. _ __ -) between them only")]
    BadComponent(String),
    /// The tag breaks the grammar.
    #[error("tag {0:?} is invalid: [A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}")]
    BadTag(String),
    /// The registry host is not a `host[:port]`.
    #[error("registry host {0:?} is invalid: expected host[:port]")]
    BadHost(String),
    /// The digest part is malformed.
    #[error(transparent)]
    Digest(#[from] DigestError),
}

fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

/// A validated repository name such as `library/alpine`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: `.`, `_`, `__`, or any number of `-`.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

impl FromStr for RepoName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong(s.len()));
        }
        for c in s.split('/') {
            if c.is_empty() {
                return Err(NameError::EmptyComponent(clip(s)));
            }
            if !valid_component(c) {
                return Err(NameError::BadComponent(clip(c)));
            }
        }
        Ok(RepoName(s.to_owned()))
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A validated tag such as `3.20` or `latest`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Tag(String);

impl Tag {
    /// The tag as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, NameError> {
        let b = s.as_bytes();
        let first_ok = b
            .first()
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_');
        let rest_ok = b
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if !first_ok || !rest_ok || b.len() > 128 {
            return Err(NameError::BadTag(clip(s)));
        }
        Ok(Tag(s.to_owned()))
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a manifest request names: a tag (resolved at the origin) or a digest.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Reference {
    /// A mutable tag; always resolved by the origin.
    Tag(Tag),
    /// An immutable digest.
    Digest(Digest),
}

impl FromStr for Reference {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, NameError> {
        if Digest::looks_like(s) {
            Ok(Reference::Digest(s.parse()?))
        } else {
            Ok(Reference::Tag(s.parse()?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// Whether `s` is a plausible `host[:port]` (DNS name, IPv4, or `[IPv6]`).
pub fn valid_host(s: &str) -> bool {
    if s.is_empty() || s.len() > 255 {
        return false;
    }
    let (host, port): (Option<&str>, Option<&str>) = if let Some(rest) = s.strip_prefix('[') {
        let Some((h, p)) = rest.split_once(']') else {
            return false;
        };
        if h.is_empty() || !h.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
            return false;
        }
        match (p, p.strip_prefix(':')) {
            ("", _) => (None, None),
            (_, Some(port)) => (None, Some(port)),
            _ => return false,
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(s), None),
        }
    };
    if let Some(h) = host {
        let ok = !h.is_empty()
            && h.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !ok {
            return false;
        }
    }
    match port {
        None => true,
        Some(p) => !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok_and(|n| n > 0),
    }
}

/// Whether the first component of a path names a registry host rather than a
/// repository namespace: docker's rule (it has a `.` or a `:`, or is
/// `localhost`).
pub fn looks_like_host(component: &str) -> bool {
    (component.contains('.') || component.contains(':') || component == "localhost")
        && valid_host(component)
}

/// The host Shoal talks to for a registry name users write (`docker.io` →
/// `registry-1.docker.io`; the same name with `index.docker.io`).
pub fn api_host(registry: &str) -> &str {
    match registry {
        DOCKER_HUB | "index.docker.io" | "registry.hub.docker.com" => DOCKER_HUB_API,
        other => other,
    }
}

/// The repository name the origin knows: Docker Hub puts one-component names
/// under `library/`. The name with the prefix must still be a valid name (at
/// most 255 characters, as Docker checks the canonical name): a 250-character
/// `NAME` was accepted and became a 258-character `library/NAME` that no
/// parser takes back (found by the `reference` fuzz target).
pub fn origin_repo(registry: &str, repo: &RepoName) -> Result<RepoName, NameError> {
    if api_host(registry) == DOCKER_HUB_API && !repo.as_str().contains('/') {
        format!("library/{}", repo.as_str()).parse()
    } else {
        Ok(repo.clone())
    }
}

/// A full image reference as users type it: `[host/]name[:tag][@digest]`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ImageRef {
    /// Registry as written (`docker.io` when omitted).
    pub registry: String,
    /// Repository name, with Docker Hub's `library/` added when implied.
    pub repo: RepoName,
    /// The tag, if any (`latest` when neither tag nor digest is given).
    pub tag: Option<Tag>,
    /// The digest, if any; it wins over the tag.
    pub digest: Option<Digest>,
}

impl ImageRef {
    /// The reference to resolve: the digest if pinned, else the tag.
    pub fn reference(&self) -> Reference {
        match (&self.digest, &self.tag) {
            (Some(d), _) => Reference::Digest(*d),
            (None, Some(t)) => Reference::Tag(t.clone()),
            (None, None) => Reference::Tag(Tag("latest".into())),
        }
    }
}

impl FromStr for ImageRef {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, NameError> {
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d.parse::<Digest>()?)),
            None => (s, None),
        };
        let (registry, path) = match rest.split_once('/') {
            Some((first, p)) if looks_like_host(first) => (first.to_owned(), p),
            Some((first, _)) if first.contains(':') || first.contains('.') => {
                return Err(NameError::BadHost(clip(first)))
            }
            _ => (DOCKER_HUB.to_owned(), rest),
        };
        // A tag follows the last `:` after the last `/`.
        let last_slash = path.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match path[last_slash..].rfind(':') {
            Some(i) => (
                &path[..last_slash + i],
                Some(path[last_slash + i + 1..].parse::<Tag>()?),
            ),
            None => (path, None),
        };
        let repo = origin_repo(&registry, &name.parse()?)?;
        Ok(ImageRef {
            registry,
            repo,
            tag,
            digest,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repo)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "a",
            "library/alpine",
            "a.b/c__d/e--f-g",
            "x0/y_z",
            "a-----b",
        ] {
            assert!(ok.parse::<RepoName>().is_ok(), "{ok}");
        }
        assert_eq!("".parse::<RepoName>(), Err(NameError::Empty));
        assert!(matches!(
            "a//b".parse::<RepoName>(),
            Err(NameError::EmptyComponent(_))
        ));
        assert!(matches!(
            "/a".parse::<RepoName>(),
            Err(NameError::EmptyComponent(_))
        ));
        assert!(matches!(
            "Upper".parse::<RepoName>(),
            Err(NameError::BadComponent(_))
        ));
        assert!(matches!(
            "a..b".parse::<RepoName>(),
            Err(NameError::BadComponent(_))
        ));
        assert!(matches!(
            "a___b".parse::<RepoName>(),
            Err(NameError::BadComponent(_))
        ));
        assert!(matches!(
            "-a".parse::<RepoName>(),
            Err(NameError::BadComponent(_))
        ));
        let long = "a".repeat(256);
        assert_eq!(long.parse::<RepoName>(), Err(NameError::TooLong(256)));
    }

    #[test]
    fn tags() {
        assert!("latest".parse::<Tag>().is_ok());
        assert!("_v1.2-rc".parse::<Tag>().is_ok());
        assert!(".x".parse::<Tag>().is_err());
        assert!("".parse::<Tag>().is_err());
        assert!("a".repeat(129).parse::<Tag>().is_err());
    }

    #[test]
    fn hosts() {
        for ok in [
            "docker.io",
            "127.0.0.1:5000",
            "localhost",
            "[::1]:5000",
            "quay.io",
        ] {
            assert!(valid_host(ok), "{ok}");
        }
        for bad in [
            "", "a:b", "a:0", "a..b", "-a.b", "a b", "[zz]:1", "a:123456",
        ] {
            assert!(!valid_host(bad), "{bad}");
        }
        assert!(looks_like_host("localhost"));
        assert!(!looks_like_host("library"));
    }

    #[test]
    fn image_refs() {
        let r: ImageRef = "alpine".parse().unwrap();
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repo.as_str(), "library/alpine");
        assert_eq!(r.reference().to_string(), "latest");
        let r: ImageRef = "127.0.0.1:5000/app/web:1.0".parse().unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repo.as_str()),
            ("127.0.0.1:5000", "app/web")
        );
        assert_eq!(r.tag.unwrap().as_str(), "1.0");
        let d = Digest::of(b"x");
        let r: ImageRef = format!("quay.io/org/app@{d}").parse().unwrap();
        assert_eq!(r.reference(), Reference::Digest(d));
        assert!("Quay.IO:x/app".parse::<ImageRef>().is_err());
        assert_eq!(api_host("docker.io"), DOCKER_HUB_API);
    }

    #[test]
    fn a_docker_hub_name_too_long_once_under_library_is_refused() {
        // 250 characters is a valid name, but not under `library/`.
        let name = "a".repeat(250);
        assert!(name.parse::<RepoName>().is_ok());
        assert_eq!(
            name.parse::<ImageRef>(),
            Err(NameError::TooLong("library/".len() + 250))
        );
        let elsewhere: ImageRef = format!("quay.io/{name}").parse().unwrap();
        assert_eq!(elsewhere.repo.as_str(), name);
        // Whatever parses prints to text that parses to the same reference.
        let r: ImageRef = "a".repeat(247).parse().unwrap();
        assert_eq!(r.to_string().parse::<ImageRef>().unwrap(), r);
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC{0,300}") {
            let _ = s.parse::<RepoName>();
            let _ = s.parse::<Reference>();
            let _ = s.parse::<ImageRef>();
            let _ = valid_host(&s);
        }
    }
}
