//! The pure parts of registry auth: `WWW-Authenticate` challenges, token
//! responses and the token cache.
//!
//! The flow itself (ask, get a `401` with a challenge, fetch a token from the
//! realm, ask again) lives in the client; everything here is testable without
//! sockets.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::HeaderValue;

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Challenge {
    /// The scheme, lowercased (`bearer`, `basic`).
    pub(crate) scheme: String,
    /// Parameters in order; names lowercased, values unquoted.
    pub(crate) params: Vec<(String, String)>,
}

impl Challenge {
    /// The value of parameter `name` (lowercase).
    pub(crate) fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lexer<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t') {
            self.i += 1;
        }
    }

    fn skip_ws_commas(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b',') {
            self.i += 1;
        }
    }

    fn token(&mut self) -> Option<String> {
        let start = self.i;
        while self.i < self.s.len() && is_tchar(self.s[self.i]) {
            self.i += 1;
        }
        (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    /// A quoted string (opening quote current), backslash escapes honoured.
    fn quoted(&mut self) -> String {
        self.i += 1;
        let mut out = Vec::new();
        while let Some(c) = self.peek() {
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    if let Some(n) = self.peek() {
                        out.push(n);
                        self.i += 1;
                    }
                }
                _ => out.push(c),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// An unquoted value: up to a comma or whitespace.
    fn bare(&mut self) -> String {
        let start = self.i;
        while self.i < self.s.len() && !matches!(self.s[self.i], b',' | b' ' | b'\t') {
            self.i += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }
}

/// Parses every challenge in a `WWW-Authenticate` value (RFC 7235: several
/// challenges may share one header; quoted values may hold commas, spaces
/// and escaped quotes). Garbage is skipped, never a panic.
pub(crate) fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut lx = Lexer {
        s: header.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    loop {
        lx.skip_ws_commas();
        if lx.peek().is_none() {
            break;
        }
        let Some(scheme) = lx.token() else {
            // Not a token: skip one byte and resynchronise.
            lx.i += 1;
            continue;
        };
        let mut ch = Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params: Vec::new(),
        };
        loop {
            let save = lx.i;
            lx.skip_ws_commas();
            let Some(name) = lx.token() else {
                // token68 or junk: skip it up to the next comma.
                if lx.peek().is_some_and(|c| c != b',') && lx.i == save {
                    lx.bare();
                }
                if lx.i == save || lx.peek().is_none() {
                    break;
                }
                continue;
            };
            lx.skip_ws();
            if lx.peek() != Some(b'=') {
                // A new challenge starts with this token.
                lx.i = save;
                break;
            }
            lx.i += 1;
            lx.skip_ws();
            let value = if lx.peek() == Some(b'"') {
                lx.quoted()
            } else {
                lx.bare()
            };
            ch.params.push((name.to_ascii_lowercase(), value));
        }
        out.push(ch);
    }
    out
}

/// The JSON a token realm answers with.
#[derive(Debug, serde::Deserialize)]
struct TokenBody {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<serde_json::Number>,
}

/// The token spec's lifetime when `expires_in` is absent.
pub(crate) const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// A token and its lifetime from a realm's answer: `token` wins over
/// `access_token`; a missing or non-positive `expires_in` means 60 s.
pub(crate) fn parse_token_response(body: &[u8]) -> Result<(String, Duration), String> {
    let b: TokenBody = serde_json::from_slice(body)
        .map_err(|e| format!("token response is not the expected JSON: {e}"))?;
    let token = b
        .token
        .filter(|t| !t.is_empty())
        .or(b.access_token.filter(|t| !t.is_empty()))
        .ok_or_else(|| "token response has neither \"token\" nor \"access_token\"".to_owned())?;
    let lifetime = b
        .expires_in
        .and_then(|n| n.as_f64())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| Duration::from_secs_f64(s.min(365.0 * 86400.0)))
        .unwrap_or(DEFAULT_TOKEN_LIFETIME);
    Ok((token, lifetime))
}

/// How long a token is used: its lifetime less a margin for clock skew and
/// the request in flight (a tenth, at most 10 s).
pub(crate) fn cache_ttl(lifetime: Duration) -> Duration {
    lifetime - (lifetime / 10).min(Duration::from_secs(10))
}

/// Most tokens kept; past it, expired ones go, then all.
const MAX_CACHED: usize = 4096;

/// Bearer tokens by (registry host, scope).
#[derive(Debug, Default)]
pub(crate) struct TokenCache {
    map: Mutex<HashMap<(String, String), (HeaderValue, Instant)>>,
}

impl TokenCache {
    /// The cached `Authorization` value, if still valid at `now`.
    pub(crate) fn get(&self, registry: &str, scope: &str, now: Instant) -> Option<HeaderValue> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&(registry.to_owned(), scope.to_owned()))
            .filter(|(_, until)| now < *until)
            .map(|(v, _)| v.clone())
    }

    /// Caches `value` until `now + ttl`.
    pub(crate) fn put(
        &self,
        registry: &str,
        scope: &str,
        value: HeaderValue,
        ttl: Duration,
        now: Instant,
    ) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_CACHED {
            map.retain(|_, (_, until)| now < *until);
            if map.len() >= MAX_CACHED {
                map.clear();
            }
        }
        map.insert((registry.to_owned(), scope.to_owned()), (value, now + ttl));
    }

    /// Forgets a token the origin rejected, unless it was already replaced.
    pub(crate) fn remove(&self, registry: &str, scope: &str, value: &HeaderValue) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let key = (registry.to_owned(), scope.to_owned());
        if map.get(&key).is_some_and(|(v, _)| v == value) {
            map.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_with_commas_in_quotes() {
        let h = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#;
        let c = parse_challenges(h);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c[0].param("service"), Some("registry.docker.io"));
        assert_eq!(
            c[0].param("scope"),
            Some("repository:library/alpine:pull,push")
        );
    }

    #[test]
    fn several_challenges_and_odd_spacing() {
        let h = r#"Basic realm="Registry Realm", Bearer  realm = "https://a/t?x=1,2" , service=svc,error="insufficient_scope",scope="a b\"c""#;
        let c = parse_challenges(h);
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].param("realm"), Some("Registry Realm"));
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(c[1].param("realm"), Some("https://a/t?x=1,2"));
        assert_eq!(c[1].param("service"), Some("svc"));
        assert_eq!(c[1].param("error"), Some("insufficient_scope"));
        assert_eq!(c[1].param("scope"), Some("a b\"c"));
    }

    #[test]
    fn bare_scheme_and_garbage() {
        let c = parse_challenges("Basic");
        assert_eq!(c.len(), 1);
        assert!(c[0].params.is_empty());
        let c = parse_challenges("BASIC REALM=x");
        assert_eq!(
            (c[0].scheme.as_str(), c[0].param("realm")),
            ("basic", Some("x"))
        );
        let c = parse_challenges("Negotiate abc==, Bearer realm=\"r\"");
        assert_eq!(c.last().unwrap().param("realm"), Some("r"));
        for junk in [
            "",
            ",,,",
            "=",
            "\"",
            "Bearer realm=\"unterminated",
            "Bearer ,=,\"",
            "@@ Bearer",
        ] {
            let _ = parse_challenges(junk);
        }
        assert!(parse_challenges("  ").is_empty());
    }

    #[test]
    fn token_responses() {
        let (t, l) = parse_token_response(br#"{"token":"abc","expires_in":300}"#).unwrap();
        assert_eq!((t.as_str(), l), ("abc", Duration::from_secs(300)));
        let (t, l) = parse_token_response(br#"{"access_token":"xyz"}"#).unwrap();
        assert_eq!((t.as_str(), l), ("xyz", DEFAULT_TOKEN_LIFETIME));
        let (t, _) =
            parse_token_response(br#"{"token":"","access_token":"z","expires_in":-5}"#).unwrap();
        assert_eq!(t, "z");
        assert!(parse_token_response(br#"{"expires_in":1}"#).is_err());
        assert!(parse_token_response(b"<html>").is_err());
        assert_eq!(cache_ttl(Duration::from_secs(60)), Duration::from_secs(54));
        assert_eq!(
            cache_ttl(Duration::from_secs(3600)),
            Duration::from_secs(3590)
        );
    }

    #[test]
    fn cache_expires_and_removes() {
        let c = TokenCache::default();
        let now = Instant::now();
        let v = HeaderValue::from_static("Bearer a");
        c.put("r", "s", v.clone(), Duration::from_secs(5), now);
        assert_eq!(c.get("r", "s", now), Some(v.clone()));
        assert_eq!(c.get("r", "other", now), None);
        assert_eq!(c.get("r", "s", now + Duration::from_secs(5)), None);
        c.remove("r", "s", &HeaderValue::from_static("Bearer b"));
        assert!(c.get("r", "s", now).is_some());
        c.remove("r", "s", &v);
        assert!(c.get("r", "s", now).is_none());
    }
}
