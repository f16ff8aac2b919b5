//! Preheating: an operator (or the origin, through the tracker's registry
//! webhook) asks the tracker to have members fetch an image before any
//! runtime pulls it. Members pick jobs up from the tracker (they only dial
//! out), fetch through the swarm like any pull, and report per-blob
//! progress, which `shoalctl preheat` shows.
//!
//! - [`PreheatRequest`] → [`PreheatReply`] (`POST /v1/preheat`): a job and
//!   the members chosen for it ([`NodeSelector`]).
//! - `GET /v1/jobs?node=N` → [`JobsReply`]: the jobs that member still has
//!   to do.
//! - [`JobProgress`] (`POST /v1/jobs/progress`): a member's state for one job.
//! - `GET /v1/jobs/ID` → [`JobStatus`]: every chosen member's progress.
//!
//! Also here, because members and `shoalctl` both need it: reading the
//! blobs an image manifest or index names ([`ManifestRefs`]).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;
use crate::media;
use crate::reference::ImageRef;
use crate::tracker_api::{NodeId, Rack, TrackerError};

/// Live and finished jobs a tracker keeps, at most.
pub const MAX_JOBS: usize = 64;
/// Blobs one member reports for one job, at most (an image's layers and
/// config, for every platform chosen).
pub const MAX_JOB_BLOBS: usize = 1_024;
/// Members a job may name, at most.
pub const MAX_JOB_NODES: usize = 50_000;
/// Longest image reference accepted.
pub const MAX_IMAGE_LEN: usize = 512;
/// Longest error a member may report (longer ones are cut).
pub const MAX_JOB_ERROR: usize = 512;
/// Platforms one job may name, at most.
pub const MAX_PLATFORMS: usize = 16;

/// Which members a preheat job goes to. Written as operators type it:
/// `all`, a count (`3`: that many members, spread by the job id),
/// `rack=NAME`, or a comma-separated list of member names.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub enum NodeSelector {
    /// Every live member.
    #[default]
    All,
    /// This many live members (all if fewer).
    Count(u32),
    /// The live members of one rack.
    Rack(Rack),
    /// These members (each must be live).
    Names(Vec<NodeId>),
}

impl FromStr for NodeSelector {
    type Err = TrackerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| TrackerError::BadPreheat(format!("--nodes {s:?}: {why}"));
        if s == "all" {
            return Ok(NodeSelector::All);
        }
        if let Some(rack) = s.strip_prefix("rack=") {
            return rack
                .parse()
                .map(NodeSelector::Rack)
                .map_err(|_| bad("not a rack name"));
        }
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return match s.parse::<u32>() {
                Ok(0) | Err(_) => Err(bad("a count is 1 or more")),
                Ok(n) => Ok(NodeSelector::Count(n)),
            };
        }
        let names = s
            .split(',')
            .map(|n| n.trim().parse::<NodeId>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| bad("not all, a count, rack=NAME or a list of member names"))?;
        if names.len() > MAX_JOB_NODES {
            return Err(bad("too many names"));
        }
        Ok(NodeSelector::Names(names))
    }
}

impl fmt::Display for NodeSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeSelector::All => f.write_str("all"),
            NodeSelector::Count(n) => write!(f, "{n}"),
            NodeSelector::Rack(r) => write!(f, "rack={r}"),
            NodeSelector::Names(n) => {
                let names: Vec<&str> = n.iter().map(NodeId::as_str).collect();
                f.write_str(&names.join(","))
            }
        }
    }
}

impl serde::Serialize for NodeSelector {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for NodeSelector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What to preheat and where: a [`PreheatRequest`] without who asks
/// (what `shoalctl` sends its node).
#[derive(Clone, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct Preheat {
    /// `HOST/NAME[:TAG][@DIGEST]`; the host is required (it names the origin).
    pub image: String,
    /// With `blob`, `image` names a repository and a blob digest
    /// (`HOST/NAME@sha256:…`) and only that blob is fetched.
    #[serde(default)]
    pub blob: bool,
    /// Platforms of a multi-platform image, `OS/ARCH[/VARIANT]`, or `all`;
    /// none means each member's own.
    #[serde(default)]
    pub platforms: Vec<String>,
    /// Which members.
    #[serde(default)]
    pub nodes: NodeSelector,
    /// Pin the fetched blobs (eviction skips them until unpinned).
    #[serde(default)]
    pub pin: bool,
}

/// `POST /v1/preheat`: fetch `image` on the members `nodes` selects.
/// Checked ([`validate`](Self::validate)) where it enters: the tracker's
/// core refuses one that is not.
#[derive(Clone, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct PreheatRequest {
    /// Who asks (a member, or the tracker's webhook).
    pub node: NodeId,
    /// What and where.
    #[serde(flatten)]
    pub preheat: Preheat,
}

/// Checks an image reference for a preheat: a host, a repository, and for
/// a blob job a digest.
pub fn parse_image(image: &str, blob: bool) -> Result<ImageRef, TrackerError> {
    let bad = |why: String| TrackerError::BadPreheat(format!("image {:?}: {why}", truncate(image)));
    if image.len() > MAX_IMAGE_LEN {
        return Err(bad(format!("longer than {MAX_IMAGE_LEN} characters")));
    }
    let first = image.split('/').next().unwrap_or_default();
    if !image.contains('/') || !crate::reference::looks_like_host(first) {
        return Err(bad(
            "name the origin: HOST/NAME[:TAG][@DIGEST] (docker.io/library/alpine:3)".into(),
        ));
    }
    let r: ImageRef = image.parse().map_err(|e| bad(format!("{e}")))?;
    if blob && r.digest.is_none() {
        return Err(bad(
            "a blob preheat names the blob: HOST/NAME@sha256:…".into()
        ));
    }
    Ok(r)
}

/// Checks one platform: `all` or `OS/ARCH[/VARIANT]` of `[a-z0-9._-]`.
pub fn check_platform(p: &str) -> Result<(), TrackerError> {
    let ok_part = |s: &str| {
        !s.is_empty()
            && s.len() <= 32
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    };
    let parts: Vec<&str> = p.split('/').collect();
    if p == "all" || ((2..=3).contains(&parts.len()) && parts.iter().all(|s| ok_part(s))) {
        Ok(())
    } else {
        Err(TrackerError::BadPreheat(format!(
            "platform {:?} is not OS/ARCH[/VARIANT] (linux/arm64/v8) or all",
            truncate(p)
        )))
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

impl PreheatRequest {
    /// Checks the image and the platforms.
    pub fn validate(&self) -> Result<(), TrackerError> {
        self.preheat.validate()
    }
}

impl Preheat {
    /// Checks the image and the platforms.
    pub fn validate(&self) -> Result<(), TrackerError> {
        parse_image(&self.image, self.blob)?;
        if self.platforms.len() > MAX_PLATFORMS {
            return Err(TrackerError::TooMany {
                what: "platforms",
                limit: MAX_PLATFORMS,
            });
        }
        self.platforms.iter().try_for_each(|p| check_platform(p))
    }
}

/// The reply to a [`PreheatRequest`].
#[derive(Clone, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct PreheatReply {
    /// The job's id.
    pub job: u64,
    /// The members chosen.
    pub nodes: Vec<NodeId>,
}

/// A job as a member gets it.
#[derive(Clone, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct PreheatJob {
    /// The job's id.
    pub id: u64,
    /// What to fetch, and where (checked when the job was made).
    #[serde(flatten)]
    pub preheat: Preheat,
    /// Who asked.
    pub by: NodeId,
    /// When the tracker took it (tracker time, ms).
    pub created_ms: u64,
}

/// `GET /v1/jobs?node=N`: the jobs this member has not finished.
#[derive(Clone, PartialEq, Eq, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct JobsReply {
    /// Oldest first.
    pub jobs: Vec<PreheatJob>,
}

/// Where one member is with one job.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Not picked up yet.
    #[default]
    Pending,
    /// Fetching.
    Running,
    /// Every blob is held (verified).
    Done,
    /// Gave up; see the error.
    Failed,
}

impl JobState {
    /// Done or failed.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Done | JobState::Failed)
    }
}

/// One blob of a job on one member.
#[derive(Clone, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct BlobProgress {
    /// The blob.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Verified bytes held so far.
    pub done: u64,
}

/// `POST /v1/jobs/progress`: one member's state for one job.
#[derive(Clone, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct JobProgress {
    /// The member.
    pub node: NodeId,
    /// The job.
    pub job: u64,
    /// Its state.
    pub state: JobState,
    /// The blobs it fetches, as far as it knows them.
    #[serde(default)]
    pub blobs: Vec<BlobProgress>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl JobProgress {
    /// The member.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// Checks the bounds; cuts a long error.
    pub fn validate(&mut self) -> Result<(), TrackerError> {
        if self.blobs.len() > MAX_JOB_BLOBS {
            return Err(TrackerError::TooMany {
                what: "blobs in a job",
                limit: MAX_JOB_BLOBS,
            });
        }
        if let Some(b) = self.blobs.iter().find(|b| b.done > b.size) {
            return Err(TrackerError::BadPreheat(format!(
                "{}: {} bytes done of {}",
                b.digest, b.done, b.size
            )));
        }
        if let Some(e) = &mut self.error {
            if e.len() > MAX_JOB_ERROR {
                let mut cut = MAX_JOB_ERROR;
                while !e.is_char_boundary(cut) {
                    cut -= 1;
                }
                e.truncate(cut);
            }
        }
        Ok(())
    }
}

/// One member's progress as the tracker keeps it.
#[derive(Clone, PartialEq, Eq, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct NodeProgress {
    /// Its state.
    pub state: JobState,
    /// Its blobs.
    #[serde(default)]
    pub blobs: Vec<BlobProgress>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it last said (tracker time, ms; 0: never).
    #[serde(default)]
    pub updated_ms: u64,
}

impl NodeProgress {
    /// Verified bytes held and bytes in all.
    pub fn bytes(&self) -> (u64, u64) {
        self.blobs
            .iter()
            .fold((0, 0), |(d, s), b| (d + b.done, s + b.size))
    }
}

/// `GET /v1/jobs/ID`: a job and every chosen member's progress.
#[derive(Clone, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct JobStatus {
    /// The job.
    pub job: PreheatJob,
    /// By member.
    pub nodes: BTreeMap<NodeId, NodeProgress>,
}

impl JobStatus {
    /// Every member is done or failed.
    pub fn finished(&self) -> bool {
        self.nodes.values().all(|p| p.state.is_final())
    }

    /// Members that failed.
    pub fn failed(&self) -> impl Iterator<Item = (&NodeId, &NodeProgress)> {
        self.nodes
            .iter()
            .filter(|(_, p)| p.state == JobState::Failed)
    }
}

/// What a manifest names: an index's manifests (with their platforms) or
/// an image's config and layers.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum ManifestRefs {
    /// An OCI index or Docker manifest list.
    Index(Vec<(Digest, String)>),
    /// An image manifest: config first, then the layers, with sizes.
    Image(Vec<(Digest, u64)>),
}

#[derive(serde::Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(serde::Deserialize)]
struct Platform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(serde::Deserialize)]
struct ManifestDoc {
    #[serde(default, rename = "mediaType")]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

impl ManifestRefs {
    /// Reads a manifest served with `media_type`.
    pub fn parse(media_type: &str, bytes: &[u8]) -> Result<ManifestRefs, String> {
        let doc: ManifestDoc =
            serde_json::from_slice(bytes).map_err(|e| format!("manifest is not JSON: {e}"))?;
        let mt = doc.media_type.as_deref().unwrap_or(media_type);
        let digest = |d: &Descriptor| {
            d.digest
                .parse::<Digest>()
                .map_err(|e| format!("manifest names {:?}: {e}", truncate(&d.digest)))
        };
        let is_index = mt == media::OCI_INDEX || mt == media::DOCKER_LIST;
        match (&doc.manifests, &doc.config, &doc.layers) {
            (Some(ms), _, _) if is_index || doc.config.is_none() => {
                let mut out = Vec::with_capacity(ms.len());
                for m in ms {
                    let p = m.platform.as_ref().map_or_else(
                        || "unknown/unknown".to_owned(),
                        |p| match &p.variant {
                            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                            None => format!("{}/{}", p.os, p.architecture),
                        },
                    );
                    out.push((digest(m)?, p));
                }
                Ok(ManifestRefs::Index(out))
            }
            (_, Some(c), layers) => {
                let mut out = vec![(digest(c)?, c.size)];
                for l in layers.iter().flatten() {
                    out.push((digest(l)?, l.size));
                }
                Ok(ManifestRefs::Image(out))
            }
            _ => Err(format!(
                "{mt} manifest names neither manifests nor a config"
            )),
        }
    }
}

/// Whether platform `p` (`os/arch[/variant]`) is one `wanted` asks for;
/// `linux/arm64` matches any variant of it.
pub fn platform_matches(wanted: &[String], p: &str) -> bool {
    wanted.iter().any(|w| {
        w == "all" || w == p || (w.matches('/').count() == 1 && p.starts_with(&format!("{w}/")))
    })
}

/// This machine's platform as OCI names it.
pub fn own_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    format!("{}/{arch}", std::env::consts::OS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse_and_print() {
        for s in ["all", "3", "rack=r1", "node-a,node-b"] {
            let sel: NodeSelector = s.parse().unwrap();
            assert_eq!(sel.to_string(), s);
        }
        assert_eq!("2".parse::<NodeSelector>().unwrap(), NodeSelector::Count(2));
        for bad in ["0", "", "rack=", "a,,b", "a b", "99999999999"] {
            let e = bad.parse::<NodeSelector>().unwrap_err();
            assert!(e.to_string().contains("--nodes"), "{bad}: {e}");
        }
    }

    #[test]
    fn requests_are_checked() {
        let ok = r#"{"node":"n1","image":"127.0.0.1:5000/app:v1","nodes":"2","platforms":["linux/amd64"]}"#;
        let r: PreheatRequest = serde_json::from_str(ok).unwrap();
        r.validate().unwrap();
        assert_eq!(r.preheat.nodes, NodeSelector::Count(2));
        for (bad, why) in [
            (r#"{"node":"n1","image":"app:v1"}"#, "name the origin"),
            (r#"{"node":"n1","image":"h.io/App"}"#, "image"),
            (
                r#"{"node":"n1","image":"h.io/app:v1","blob":true}"#,
                "names the blob",
            ),
            (
                r#"{"node":"n1","image":"h.io/app","platforms":["Linux"]}"#,
                "platform",
            ),
            (r#"{"node":"n1","image":"h.io/app","nodes":"0"}"#, "count"),
        ] {
            let e = match serde_json::from_str::<PreheatRequest>(bad) {
                Err(e) => e.to_string(),
                Ok(r) => r.validate().unwrap_err().to_string(),
            };
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn progress_is_bounded() {
        let d: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let mut p = JobProgress {
            node: "n1".parse().unwrap(),
            job: 1,
            state: JobState::Failed,
            blobs: vec![BlobProgress {
                digest: d,
                size: 10,
                done: 10,
            }],
            error: Some("é".repeat(600)),
        };
        p.validate().unwrap();
        assert!(p.error.as_ref().unwrap().len() <= MAX_JOB_ERROR);
        p.blobs[0].done = 11;
        assert!(p.validate().is_err());
    }

    #[test]
    fn manifests_and_indexes_name_their_blobs() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[
              {{"digest":"{}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}},
              {{"digest":"{}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}}]}}"#,
            media::OCI_INDEX,
            d('a'),
            d('b')
        );
        let ManifestRefs::Index(ms) =
            ManifestRefs::parse(media::OCI_INDEX, index.as_bytes()).unwrap()
        else {
            panic!("an index")
        };
        assert_eq!(ms[1].1, "linux/arm64/v8");
        assert!(platform_matches(&["linux/arm64".into()], &ms[1].1));
        assert!(!platform_matches(&["linux/amd64".into()], &ms[1].1));
        let image = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}","size":5}},"layers":[{{"digest":"{}","size":7}}]}}"#,
            d('c'),
            d('e')
        );
        let refs = ManifestRefs::parse(media::OCI_MANIFEST, image.as_bytes()).unwrap();
        assert_eq!(
            refs,
            ManifestRefs::Image(vec![
                (d('c').parse().unwrap(), 5),
                (d('e').parse().unwrap(), 7)
            ])
        );
        assert!(ManifestRefs::parse(media::OCI_MANIFEST, b"{}").is_err());
        assert!(ManifestRefs::parse(media::OCI_MANIFEST, b"[").is_err());
    }
}
