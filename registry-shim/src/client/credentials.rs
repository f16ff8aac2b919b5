//! Registry credentials from a docker `config.json`.
//!
//! Shoal reads the same file `docker login` writes, so operators reuse what
//! they have. Only credentials stored in the file itself (`auths`, as a
//! base64 `auth` or as `username`/`password`) are used: Shoal does not run
//! credential helpers (`credHelpers`, `credsStore`), and it does not trade an
//! `identitytoken` (an OAuth refresh token) for access tokens. When a
//! registry's credentials live only in such places, [`Credentials::lookup`]
//! says so, and the client turns it into an error that tells the operator
//! what to change, instead of a bare `401`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::Value;
use shoal_proto::reference::{api_host, DOCKER_HUB, DOCKER_HUB_API};

/// Why a docker `config.json` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The file could not be read.
    #[error("cannot read docker config {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid JSON.
    #[error("docker config {path} is not valid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// Where and why parsing failed.
        #[source]
        source: serde_json::Error,
    },
    /// A field has the wrong shape or an undecodable value.
    #[error("docker config {path}: field {field}: {reason}")]
    Field {
        /// The file.
        path: PathBuf,
        /// The JSON path of the field, e.g. `auths."quay.io".auth`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// One usable `auths` entry.
#[derive(Clone)]
enum AuthEntry {
    /// A user name and password (or personal access token).
    Basic { username: String, password: String },
    /// Only an `identitytoken`, which Shoal cannot use.
    IdentityToken,
}

/// What Shoal holds for one registry; see [`Credentials::lookup`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum CredentialLookup<'a> {
    /// A user name and password to send as HTTP Basic (to the registry or
    /// its token realm).
    Basic {
        /// The user name.
        username: &'a str,
        /// The password or token.
        password: &'a str,
    },
    /// The entry holds only an `identitytoken` (OAuth refresh token), which
    /// Shoal does not support.
    IdentityToken,
    /// The credentials are kept by this credential helper (the `<name>` of
    /// `docker-credential-<name>`), which Shoal does not run.
    Helper(&'a str),
    /// Nothing for this registry: requests go anonymously.
    None,
}

impl fmt::Debug for CredentialLookup<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialLookup::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            CredentialLookup::IdentityToken => f.write_str("IdentityToken"),
            CredentialLookup::Helper(h) => f.debug_tuple("Helper").field(h).finish(),
            CredentialLookup::None => f.write_str("None"),
        }
    }
}

/// Registry credentials, usually parsed from a docker `config.json`.
///
/// `Debug` shows the registries, never the secrets.
#[derive(Clone, Default)]
pub struct Credentials {
    auths: HashMap<String, AuthEntry>,
    helpers: HashMap<String, String>,
    store: Option<String>,
    source: Option<PathBuf>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut auths: Vec<&str> = self.auths.keys().map(String::as_str).collect();
        auths.sort_unstable();
        f.debug_struct("Credentials")
            .field("source", &self.source)
            .field("auths", &auths)
            .field("cred_helpers", &self.helpers)
            .field("creds_store", &self.store)
            .finish()
    }
}

/// The key a registry is filed under: scheme and path dropped, lowercased,
/// and every name of Docker Hub folded into `docker.io`.
pub(crate) fn registry_key(raw: &str) -> String {
    let mut k = raw.trim();
    for scheme in ["https://", "http://"] {
        if k.len() >= scheme.len() && k[..scheme.len()].eq_ignore_ascii_case(scheme) {
            k = &k[scheme.len()..];
            break;
        }
    }
    let k = k.split('/').next().unwrap_or_default().to_ascii_lowercase();
    if api_host(&k) == DOCKER_HUB_API {
        DOCKER_HUB.to_owned()
    } else {
        k
    }
}

impl Credentials {
    /// No credentials: every request goes anonymously.
    pub fn none() -> Self {
        Credentials::default()
    }

    /// Where docker keeps its config: `$DOCKER_CONFIG/config.json`, else
    /// `~/.docker/config.json`. The file may not exist; `None` when neither
    /// `DOCKER_CONFIG` nor `HOME` is set.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
            return Some(PathBuf::from(dir).join("config.json"));
        }
        let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
        Some(PathBuf::from(home).join(".docker").join("config.json"))
    }

    /// The credentials of [`Credentials::default_path`], or none when that
    /// file does not exist.
    pub fn load_default() -> Result<Self, CredentialsError> {
        match Self::default_path() {
            Some(p) if p.exists() => Self::from_docker_config(&p),
            _ => Ok(Self::none()),
        }
    }

    /// Parses a docker `config.json`. Errors name the file and the field.
    pub fn from_docker_config(path: &Path) -> Result<Self, CredentialsError> {
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Parses the text of a docker `config.json`; `source` names it in
    /// errors and messages.
    pub fn from_json(text: &str, source: &Path) -> Result<Self, CredentialsError> {
        let field_err = |field: String, reason: &str| CredentialsError::Field {
            path: source.to_owned(),
            field,
            reason: reason.to_owned(),
        };
        let root: Value = serde_json::from_str(text).map_err(|e| CredentialsError::Json {
            path: source.to_owned(),
            source: e,
        })?;
        let Value::Object(root) = root else {
            return Err(field_err("(top level)".into(), "expected a JSON object"));
        };
        let mut creds = Credentials {
            source: Some(source.to_owned()),
            ..Credentials::default()
        };

        match root.get("auths") {
            None | Some(Value::Null) => {}
            Some(Value::Object(auths)) => {
                for (key, entry) in auths {
                    let at = |f: &str| format!("auths.{key:?}{f}");
                    let Value::Object(entry) = entry else {
                        return Err(field_err(at(""), "expected an object"));
                    };
                    let text_field = |name: &str| -> Result<Option<&str>, CredentialsError> {
                        match entry.get(name) {
                            None | Some(Value::Null) => Ok(None),
                            Some(Value::String(s)) if s.is_empty() => Ok(None),
                            Some(Value::String(s)) => Ok(Some(s)),
                            Some(_) => Err(field_err(at(&format!(".{name}")), "expected a string")),
                        }
                    };
                    let auth = text_field("auth")?;
                    let username = text_field("username")?;
                    let password = text_field("password")?;
                    let identity = text_field("identitytoken")?;
                    let parsed = if identity.is_some() {
                        Some(AuthEntry::IdentityToken)
                    } else if let Some(auth) = auth {
                        let (u, p) = decode_auth(auth).map_err(|r| field_err(at(".auth"), &r))?;
                        Some(AuthEntry::Basic {
                            username: u,
                            password: p,
                        })
                    } else {
                        match (username, password) {
                            (Some(u), Some(p)) => Some(AuthEntry::Basic {
                                username: u.to_owned(),
                                password: p.to_owned(),
                            }),
                            (Some(_), None) => {
                                return Err(field_err(
                                    at(".password"),
                                    "missing (username given without password)",
                                ))
                            }
                            (None, Some(_)) => {
                                return Err(field_err(
                                    at(".username"),
                                    "missing (password given without username)",
                                ))
                            }
                            // `{}`: docker writes these when the secret lives
                            // in `credsStore`.
                            (None, None) => None,
                        }
                    };
                    if let Some(e) = parsed {
                        creds.auths.insert(registry_key(key), e);
                    }
                }
            }
            Some(_) => return Err(field_err("auths".into(), "expected an object")),
        }

        match root.get("credHelpers") {
            None | Some(Value::Null) => {}
            Some(Value::Object(helpers)) => {
                for (key, helper) in helpers {
                    let Value::String(h) = helper else {
                        return Err(field_err(
                            format!("credHelpers.{key:?}"),
                            "expected a string",
                        ));
                    };
                    if !h.is_empty() {
                        creds.helpers.insert(registry_key(key), h.clone());
                    }
                }
            }
            Some(_) => return Err(field_err("credHelpers".into(), "expected an object")),
        }

        match root.get("credsStore") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.is_empty() => {}
            Some(Value::String(s)) => creds.store = Some(s.clone()),
            Some(_) => return Err(field_err("credsStore".into(), "expected a string")),
        }
        Ok(creds)
    }

    /// Adds (or replaces) a user name and password for `registry`.
    pub fn with_basic(
        mut self,
        registry: &str,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.auths.insert(
            registry_key(registry),
            AuthEntry::Basic {
                username: username.into(),
                password: password.into(),
            },
        );
        self
    }

    /// What Shoal holds for `registry` (as users write it; `docker.io`,
    /// `index.docker.io` and `registry-1.docker.io` are one registry).
    /// `auths` wins, then `credHelpers`, then `credsStore`.
    pub fn lookup(&self, registry: &str) -> CredentialLookup<'_> {
        let key = registry_key(registry);
        if let Some(e) = self.auths.get(&key) {
            return match e {
                AuthEntry::Basic { username, password } => {
                    CredentialLookup::Basic { username, password }
                }
                AuthEntry::IdentityToken => CredentialLookup::IdentityToken,
            };
        }
        if let Some(h) = self.helpers.get(&key) {
            return CredentialLookup::Helper(h);
        }
        match &self.store {
            Some(s) => CredentialLookup::Helper(s),
            None => CredentialLookup::None,
        }
    }

    /// The file these credentials came from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// The registries with usable user name and password, sorted (for a
    /// start-up log line; never the secrets).
    pub fn registries(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .auths
            .iter()
            .filter(|(_, e)| matches!(e, AuthEntry::Basic { .. }))
            .map(|(k, _)| k.as_str())
            .collect();
        v.sort_unstable();
        v
    }

    /// How to name the file in messages.
    pub(crate) fn source_name(&self) -> String {
        match &self.source {
            Some(p) => p.display().to_string(),
            None => "the configured credentials".to_owned(),
        }
    }
}

/// Decodes docker's `auth` field: base64 of `user:password`.
fn decode_auth(auth: &str) -> Result<(String, String), String> {
    let cleaned: String = auth.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&cleaned)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(&cleaned))
        .map_err(|e| format!("not valid base64 ({e})"))?;
    let text =
        String::from_utf8(raw).map_err(|_| "decodes to bytes that are not UTF-8".to_owned())?;
    let (u, p) = text.split_once(':').ok_or_else(|| {
        "decodes to text without ':' (expected base64 of user:password)".to_owned()
    })?;
    if u.is_empty() {
        return Err("decodes to an empty user name".to_owned());
    }
    Ok((u.to_owned(), p.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn parse(text: &str) -> Result<Credentials, CredentialsError> {
        Credentials::from_json(text, Path::new("/etc/shoal/config.json"))
    }

    #[test]
    fn all_forms() {
        let text = format!(
            r#"{{
              "auths": {{
                "https://index.docker.io/v1/": {{"auth": "{hub}"}},
                "quay.io": {{"username": "robot", "password": "pw2"}},
                "http://127.0.0.1:5000": {{"auth": "{local}"}},
                "https://GHCR.io/": {{"auth": "{ghcr}", "email": "x@y"}},
                "acr.example.com": {{"identitytoken": "refresh-xyz"}},
                "desktop.example.com": {{}}
              }},
              "credHelpers": {{"gcr.io": "gcloud", "https://ecr.example.com": "ecr-login"}},
              "HttpHeaders": {{"X-Meta": "1"}}
            }}"#,
            hub = b64("hubuser:hub:pass"),
            local = b64("me:secret"),
            ghcr = b64("gh:tok"),
        );
        let c = parse(&text).unwrap();
        for hub in ["docker.io", "index.docker.io", "registry-1.docker.io"] {
            assert_eq!(
                c.lookup(hub),
                CredentialLookup::Basic {
                    username: "hubuser",
                    password: "hub:pass"
                },
                "{hub}"
            );
        }
        assert_eq!(
            c.lookup("quay.io"),
            CredentialLookup::Basic {
                username: "robot",
                password: "pw2"
            }
        );
        assert_eq!(
            c.lookup("127.0.0.1:5000"),
            CredentialLookup::Basic {
                username: "me",
                password: "secret"
            }
        );
        assert_eq!(
            c.lookup("ghcr.io"),
            CredentialLookup::Basic {
                username: "gh",
                password: "tok"
            }
        );
        assert_eq!(c.lookup("acr.example.com"), CredentialLookup::IdentityToken);
        assert_eq!(c.lookup("gcr.io"), CredentialLookup::Helper("gcloud"));
        assert_eq!(
            c.lookup("ecr.example.com"),
            CredentialLookup::Helper("ecr-login")
        );
        assert_eq!(c.lookup("desktop.example.com"), CredentialLookup::None);
        assert_eq!(c.lookup("127.0.0.1:5001"), CredentialLookup::None);
        assert_eq!(
            c.registries(),
            ["127.0.0.1:5000", "docker.io", "ghcr.io", "quay.io"]
        );
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("secret") && !dbg.contains("pw2") && !dbg.contains("refresh"));
    }

    #[test]
    fn creds_store_and_empty_entries() {
        // What Docker Desktop writes: an empty entry and a store.
        let c = parse(r#"{"auths": {"https://index.docker.io/v1/": {}}, "credsStore": "desktop"}"#)
            .unwrap();
        assert_eq!(c.lookup("docker.io"), CredentialLookup::Helper("desktop"));
        assert_eq!(c.lookup("quay.io"), CredentialLookup::Helper("desktop"));
        assert_eq!(
            parse("{}").unwrap().lookup("docker.io"),
            CredentialLookup::None
        );
    }

    #[test]
    fn errors_name_file_and_field() {
        let cases = [
            (
                r#"{"auths": {"quay.io": {"auth": "!!!"}}}"#,
                r#"auths."quay.io".auth"#,
                "base64",
            ),
            (
                &format!(
                    r#"{{"auths": {{"quay.io": {{"auth": "{}"}}}}}}"#,
                    b64("nocolon")
                ),
                r#"auths."quay.io".auth"#,
                "':'",
            ),
            (
                r#"{"auths": {"quay.io": {"username": "u"}}}"#,
                r#"auths."quay.io".password"#,
                "missing",
            ),
            (
                r#"{"auths": {"quay.io": {"auth": 5}}}"#,
                r#"auths."quay.io".auth"#,
                "string",
            ),
            (
                r#"{"auths": {"quay.io": "x"}}"#,
                r#"auths."quay.io""#,
                "object",
            ),
            (r#"{"auths": []}"#, "auths", "object"),
            (
                r#"{"credHelpers": {"a.io": 1}}"#,
                r#"credHelpers."a.io""#,
                "string",
            ),
            (r#"{"credsStore": 1}"#, "credsStore", "string"),
            ("[]", "(top level)", "object"),
        ];
        for (text, field, why) in cases {
            let msg = parse(text).unwrap_err().to_string();
            assert!(msg.contains("/etc/shoal/config.json"), "{msg}");
            assert!(msg.contains(field), "{msg} lacks {field}");
            assert!(msg.contains(why), "{msg} lacks {why}");
        }
        let msg = parse("{not json").unwrap_err().to_string();
        assert!(
            msg.contains("/etc/shoal/config.json") && msg.contains("line 1"),
            "{msg}"
        );
        let missing = Credentials::from_docker_config(Path::new("/nonexistent/shoal/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("/nonexistent/shoal/config.json"),
            "{missing}"
        );
    }

    #[test]
    fn keys() {
        assert_eq!(registry_key("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(registry_key("registry-1.docker.io"), "docker.io");
        assert_eq!(registry_key("HTTP://Quay.IO"), "quay.io");
        assert_eq!(registry_key("https://host:5000/"), "host:5000");
        assert_eq!(registry_key("host:5000"), "host:5000");
    }
}
