//! The origin's registry notifications (CNCF distribution's
//! `notifications.endpoints`) turned into preheat jobs: a tagged manifest
//! pushed to a watched repository (`--preheat-repo`), or a blob pulled at
//! least `--preheat-pulls` times within `--preheat-window`, becomes a job
//! for the members `--preheat-nodes` selects. Served on the tracker's ops
//! listener as `POST /v1/notifications`, authenticated by a shared secret
//! (`Authorization: Bearer SECRET`, compared in constant time).
//!
//! [`Webhook::decide`] is pure (time passed in); the server applies the
//! requests it returns as [`crate::command::Command::Preheat`].

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use shoal_proto::preheat::{NodeSelector, Preheat, PreheatRequest};
use shoal_proto::{media, Digest};

/// Largest notification body accepted.
pub const MAX_BODY: usize = 1 << 20;
/// The member name jobs from the webhook are filed under.
pub const WEBHOOK_NODE: &str = "registry-webhook";
/// Blobs whose pulls are counted at once, at most (the oldest are
/// forgotten first).
const MAX_COUNTED: usize = 65_536;

/// What the webhook watches.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// The shared secret (from `--webhook-secret-file`).
    pub secret: Vec<u8>,
    /// The origin's name as members know it (`--webhook-origin`); default:
    /// the host the registry's client spoke to (`request.host`).
    pub origin: Option<String>,
    /// Repositories whose tagged pushes are preheated: exact names, or a
    /// prefix ending in `*` (`team/*`, `*`).
    pub repos: Vec<String>,
    /// Pulls of one blob within `window` that make it hot (0: off).
    pub pulls: u32,
    /// The window for `pulls`.
    pub window: Duration,
    /// Which members get the jobs.
    pub nodes: NodeSelector,
    /// Platforms for pushed indexes (none: each member's own).
    pub platforms: Vec<String>,
}

/// CNCF distribution's notification envelope (only what is used).
#[derive(Debug, serde::Deserialize)]
pub struct Envelope {
    /// The events.
    pub events: Vec<Event>,
}

/// One event.
#[derive(Debug, serde::Deserialize)]
pub struct Event {
    /// `push`, `pull`, `mount`, `delete`.
    pub action: String,
    /// What it was about.
    #[serde(default)]
    pub target: Target,
    /// The request that caused it.
    #[serde(default)]
    pub request: RequestInfo,
}

/// An event's target.
#[derive(Debug, Default, serde::Deserialize)]
pub struct Target {
    /// Its media type.
    #[serde(default, rename = "mediaType")]
    pub media_type: String,
    /// Its digest.
    #[serde(default)]
    pub digest: String,
    /// The repository.
    #[serde(default)]
    pub repository: String,
    /// The tag, for manifests pushed or pulled by tag.
    #[serde(default)]
    pub tag: String,
}

/// An event's request.
#[derive(Debug, Default, serde::Deserialize)]
pub struct RequestInfo {
    /// The `Host` the registry's client used.
    #[serde(default)]
    pub host: String,
}

/// What one notification did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Decision {
    /// Preheats to create.
    #[serde(skip)]
    pub preheats: Vec<PreheatRequest>,
    /// Events that asked for nothing.
    pub ignored: usize,
    /// Events that could not be used (why, at most 8).
    pub rejected: Vec<String>,
}

/// The webhook's state: recent pulls per blob.
#[derive(Debug)]
pub struct Webhook {
    cfg: WebhookConfig,
    pulls: Mutex<HashMap<Digest, VecDeque<Instant>>>,
}

fn is_manifest(media_type: &str) -> bool {
    media::MANIFEST_TYPES.contains(&media_type)
}

impl Webhook {
    /// A webhook watching as `cfg` says.
    pub fn new(cfg: WebhookConfig) -> Self {
        Webhook {
            cfg,
            pulls: Mutex::default(),
        }
    }

    /// Whether `secret` (the `Authorization` header's) is the shared one.
    pub fn authorized(&self, header: Option<&str>) -> bool {
        let given = header.and_then(|h| h.strip_prefix("Bearer ")).unwrap_or("");
        crate::server::same_secret(given.trim().as_bytes(), &self.cfg.secret)
    }

    fn watched(&self, repo: &str) -> bool {
        self.cfg.repos.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => repo.starts_with(prefix),
            None => p == repo,
        })
    }

    fn request(&self, image: String, blob: bool) -> Result<PreheatRequest, String> {
        let r = PreheatRequest {
            node: WEBHOOK_NODE.parse().expect("a valid node id"),
            preheat: Preheat {
                image,
                blob,
                platforms: self.cfg.platforms.clone(),
                nodes: self.cfg.nodes.clone(),
                pin: false,
            },
        };
        r.validate().map_err(|e| e.to_string())?;
        Ok(r)
    }

    /// The preheats one notification asks for at `now`.
    pub fn decide(&self, now: Instant, envelope: &Envelope) -> Decision {
        let mut d = Decision::default();
        let reject = |d: &mut Decision, why: String| {
            if d.rejected.len() < 8 {
                d.rejected.push(why);
            }
        };
        for e in &envelope.events {
            let t = &e.target;
            let origin = match (&self.cfg.origin, e.request.host.as_str()) {
                (Some(o), _) => o.clone(),
                (None, "") => {
                    reject(
                        &mut d,
                        format!(
                            "{} event without request.host and no --webhook-origin",
                            e.action
                        ),
                    );
                    continue;
                }
                (None, h) => h.to_owned(),
            };
            let digest: Digest = match t.digest.parse() {
                Ok(dg) => dg,
                Err(_) if e.action != "push" && e.action != "pull" => {
                    d.ignored += 1;
                    continue;
                }
                Err(err) => {
                    reject(&mut d, format!("{} of {:?}: {err}", e.action, t.repository));
                    continue;
                }
            };
            let wanted = match e.action.as_str() {
                "push"
                    if is_manifest(&t.media_type)
                        && !t.tag.is_empty()
                        && self.watched(&t.repository) =>
                {
                    Some((
                        format!("{origin}/{}:{}@{digest}", t.repository, t.tag),
                        false,
                    ))
                }
                "pull" if self.cfg.pulls > 0 && !is_manifest(&t.media_type) => self
                    .hot(now, digest)
                    .then(|| (format!("{origin}/{}@{digest}", t.repository), true)),
                _ => None,
            };
            match wanted {
                None => d.ignored += 1,
                Some((image, blob)) => match self.request(image, blob) {
                    Ok(r) => d.preheats.push(r),
                    Err(why) => reject(&mut d, why),
                },
            }
        }
        d
    }

    /// Counts a pull of `digest`; true when it makes the blob hot (the
    /// `pulls`-th within the window; then counting starts over).
    fn hot(&self, now: Instant, digest: Digest) -> bool {
        let mut pulls = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        let window = self.cfg.window;
        if pulls.len() >= MAX_COUNTED && !pulls.contains_key(&digest) {
            pulls.retain(|_, q| q.back().is_some_and(|&t| now.duration_since(t) < window));
            if pulls.len() >= MAX_COUNTED {
                return false;
            }
        }
        let q = pulls.entry(digest).or_default();
        while q.front().is_some_and(|&t| now.duration_since(t) >= window) {
            q.pop_front();
        }
        q.push_back(now);
        if q.len() >= self.cfg.pulls as usize {
            pulls.remove(&digest);
            return true;
        }
        false
    }
}

/// Reads the shared secret: the file's first line, 16 to 256 characters.
pub fn read_secret(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let secret = text.lines().next().unwrap_or("").trim();
    if !(16..=256).contains(&secret.len()) {
        return Err(format!(
            "the secret is {} characters: use 16 to 256 (its first line)",
            secret.len()
        ));
    }
    Ok(secret.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(pulls: u32) -> Webhook {
        Webhook::new(WebhookConfig {
            secret: b"0123456789abcdef".to_vec(),
            origin: Some("registry.example.com".into()),
            repos: vec!["team/*".into(), "base".into()],
            pulls,
            window: Duration::from_secs(60),
            nodes: NodeSelector::All,
            platforms: vec![],
        })
    }

    fn event(action: &str, media_type: &str, repo: &str, tag: &str, c: char) -> String {
        format!(
            r#"{{"action":"{action}","target":{{"mediaType":"{media_type}","digest":"sha256:{}","repository":"{repo}","tag":"{tag}"}},"request":{{"host":"127.0.0.1:5000"}}}}"#,
            c.to_string().repeat(64)
        )
    }

    fn envelope(events: &[String]) -> Envelope {
        serde_json::from_str(&format!(r#"{{"events":[{}]}}"#, events.join(","))).unwrap()
    }

    #[test]
    fn tagged_pushes_of_watched_repositories_become_preheats() {
        let h = hook(0);
        let layer = "application/vnd.oci.image.layer.v1.tar";
        let d = h.decide(
            Instant::now(),
            &envelope(&[
                event("push", media::OCI_INDEX, "team/app", "v1", 'a'),
                event("push", media::OCI_MANIFEST, "team/app", "", 'b'),
                event("push", layer, "team/app", "", 'c'),
                event("push", media::OCI_MANIFEST, "other/app", "v1", 'e'),
                event("push", media::DOCKER_MANIFEST, "base", "3", 'f'),
                event("pull", layer, "team/app", "", 'c'),
            ]),
        );
        let images: Vec<&str> = d
            .preheats
            .iter()
            .map(|r| r.preheat.image.as_str())
            .collect();
        assert_eq!(
            images,
            vec![
                format!("registry.example.com/team/app:v1@sha256:{}", "a".repeat(64)).as_str(),
                format!("registry.example.com/base:3@sha256:{}", "f".repeat(64)).as_str(),
            ]
        );
        assert_eq!(d.ignored, 4);
        assert!(d
            .preheats
            .iter()
            .all(|r| r.node.as_str() == WEBHOOK_NODE && !r.preheat.blob));
    }

    #[test]
    fn blobs_pulled_often_within_the_window_become_hot() {
        let h = hook(3);
        let layer = "application/vnd.oci.image.layer.v1.tar+gzip";
        let pull = envelope(&[event("pull", layer, "x/y", "", 'c')]);
        let t0 = Instant::now();
        assert!(h.decide(t0, &pull).preheats.is_empty());
        // The first pull leaves the window.
        assert!(h
            .decide(t0 + Duration::from_secs(61), &pull)
            .preheats
            .is_empty());
        assert!(h
            .decide(t0 + Duration::from_secs(62), &pull)
            .preheats
            .is_empty());
        let d = h.decide(t0 + Duration::from_secs(63), &pull);
        assert_eq!(d.preheats.len(), 1);
        assert!(d.preheats[0].preheat.blob);
        assert_eq!(
            d.preheats[0].preheat.image,
            format!("registry.example.com/x/y@sha256:{}", "c".repeat(64))
        );
        // Counting starts over.
        assert!(h
            .decide(t0 + Duration::from_secs(64), &pull)
            .preheats
            .is_empty());
    }

    #[test]
    fn secrets_and_bad_events() {
        let h = hook(0);
        assert!(h.authorized(Some("Bearer 0123456789abcdef")));
        assert!(!h.authorized(Some("Bearer 0123456789abcdeX")));
        assert!(!h.authorized(Some("0123456789abcdef")));
        assert!(!h.authorized(None));
        let d = h.decide(
            Instant::now(),
            &envelope(&[r#"{"action":"push","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"md5:x","repository":"team/a","tag":"v"}}"#.into()]),
        );
        assert_eq!(d.rejected.len(), 1, "{d:?}");
        // A bad event does not spoil the good ones beside it.
        let d = h.decide(
            Instant::now(),
            &envelope(&[
                event("push", media::OCI_MANIFEST, "team/BAD", "v1", 'a'),
                event("push", media::OCI_MANIFEST, "team/good", "v1", 'b'),
            ]),
        );
        assert_eq!(d.rejected.len(), 1, "{d:?}");
        assert_eq!(d.preheats.len(), 1, "{d:?}");
    }
}
