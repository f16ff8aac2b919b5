//! `shoald configure RUNTIME`: the container runtime's mirror configuration
//! pointing at the node's shoald, printed, or written without breaking what
//! is there.
//!
//! - **containerd**: `<certs.d>/<origin>/hosts.toml` per origin — shoald
//!   first, the origin as `server` (the fallback when shoald is down).
//! - **docker**: `registry-mirrors` in `daemon.json`, merged into the
//!   existing file (every other key kept; a file that is not a JSON object
//!   is refused, not replaced). Docker mirrors Docker Hub only.
//! - **crio**, **podman**: a drop-in `registries.conf.d/50-shoal.conf`
//!   (containers-registries.conf v2) with a mirror per origin at
//!   `<mirror>/<origin>` — the main `registries.conf` is not touched.
//!
//! Writing replaces a file atomically (temporary file + rename); a file
//! there that shoald did not write is first kept as `NAME.before-shoal`
//! (once: a later run never overwrites that copy). Every file is parsed
//! back before it is written.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The marker line of files shoald writes.
pub const MARK: &str = "written by shoald configure";

/// The runtimes `shoald configure` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Runtime {
    /// containerd (`hosts.toml` per origin).
    Containerd,
    /// The Docker engine (`daemon.json`).
    Docker,
    /// CRI-O (`registries.conf.d` drop-in).
    Crio,
    /// podman (`registries.conf.d` drop-in).
    Podman,
}

/// An origin and the URL its registry answers at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The name images use (`docker.io`, `quay.io`, `registry:5000`).
    pub name: String,
    /// Where the runtime reaches it directly.
    pub url: String,
}

impl std::str::FromStr for Origin {
    type Err = String;

    /// `NAME` or `NAME=URL`; Docker Hub's URL is `https://registry-1.docker.io`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, url) = match s.split_once('=') {
            Some((n, u)) => (n, Some(u)),
            None => (s, None),
        };
        if !shoal_proto::reference::valid_host(name) {
            return Err(format!("origin {name:?} is not a registry host name"));
        }
        let url = match url {
            Some(u) if u.starts_with("https://") || u.starts_with("http://") => u.to_owned(),
            Some(u) => return Err(format!("origin URL {u:?} is not http:// or https://")),
            None if name == "docker.io" => "https://registry-1.docker.io".to_owned(),
            None => format!("https://{name}"),
        };
        Ok(Origin {
            name: name.to_owned(),
            url,
        })
    }
}

/// One file to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// Where.
    pub path: PathBuf,
    /// What.
    pub content: String,
}

/// Where each runtime's configuration lives by default.
pub fn default_path(rt: Runtime) -> &'static str {
    match rt {
        Runtime::Containerd => "/etc/containerd/certs.d",
        Runtime::Docker => "/etc/docker/daemon.json",
        Runtime::Crio | Runtime::Podman => "/etc/containers/registries.conf.d/50-shoal.conf",
    }
}

/// The files that point `rt` at the mirror `mirror` (`HOST:PORT` of
/// shoald's registry endpoint) for `origins`; `path` as in
/// [`default_path`]. `existing` reads a file that is there now (the Docker
/// configuration is merged into it).
pub fn plan(
    rt: Runtime,
    mirror: &str,
    origins: &[Origin],
    path: &Path,
    existing: impl Fn(&Path) -> Option<String>,
) -> anyhow::Result<Vec<Planned>> {
    if origins.is_empty() {
        bail!("no origin given");
    }
    let out = match rt {
        Runtime::Containerd => origins
            .iter()
            .map(|o| Planned {
                path: path.join(&o.name).join("hosts.toml"),
                content: format!(
                    "# {MARK}: pulls of {name} go through the node's shoald; {name} itself\n\
                     # is the fallback when shoald does not answer.\n\
                     server = \"{url}\"\n\n\
                     [host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                    name = o.name,
                    url = o.url
                ),
            })
            .collect(),
        Runtime::Docker => {
            let mut doc = match existing(path) {
                None => serde_json::Map::new(),
                Some(text) if text.trim().is_empty() => serde_json::Map::new(),
                Some(text) => match serde_json::from_str::<serde_json::Value>(&text) {
                    Ok(serde_json::Value::Object(m)) => m,
                    Ok(_) => bail!("{} is not a JSON object; not touched", path.display()),
                    Err(e) => bail!("{} is not valid JSON ({e}); not touched", path.display()),
                },
            };
            let url = format!("http://{mirror}");
            let mirrors = doc
                .entry("registry-mirrors")
                .or_insert_with(|| serde_json::Value::Array(Vec::new()));
            let Some(list) = mirrors.as_array_mut() else {
                bail!(
                    "{}: `registry-mirrors` is not a list; not touched",
                    path.display()
                );
            };
            if !list.iter().any(|m| m.as_str() == Some(url.as_str())) {
                list.insert(0, serde_json::Value::String(url));
            }
            let mut content = serde_json::to_string_pretty(&serde_json::Value::Object(doc))
                .expect("a JSON object serializes");
            content.push('\n');
            vec![Planned {
                path: path.to_owned(),
                content,
            }]
        }
        Runtime::Crio | Runtime::Podman => {
            let mut content = format!(
                "# {MARK}: each origin is pulled through the node's shoald first\n\
                 # (the origin's name as the first path component), the origin itself\n\
                 # when shoald does not answer.\n"
            );
            for o in origins {
                if o.name.contains(':') {
                    bail!(
                        "origin {}: a name with a port cannot be a path component of a \
                         registries.conf mirror; make it shoald's --default-upstream and use \
                         location = \"{mirror}\" instead",
                        o.name
                    );
                }
                content.push_str(&format!(
                    "\n[[registry]]\nprefix = \"{n}\"\nlocation = \"{n}\"\n\n\
                     [[registry.mirror]]\nlocation = \"{mirror}/{n}\"\ninsecure = true\n",
                    n = o.name
                ));
            }
            vec![Planned {
                path: path.to_owned(),
                content,
            }]
        }
    };
    for p in &out {
        check(rt, mirror, p)?;
    }
    Ok(out)
}

/// Parses a planned file back and checks that it says what it should.
fn check(rt: Runtime, mirror: &str, p: &Planned) -> anyhow::Result<()> {
    let bad = |what: &str| anyhow::anyhow!("{}: generated {what}", p.path.display());
    match rt {
        Runtime::Docker => {
            let v: serde_json::Value = serde_json::from_str(&p.content)?;
            let ok = v["registry-mirrors"]
                .as_array()
                .is_some_and(|l| l.iter().any(|m| m == &format!("http://{mirror}")));
            if !ok {
                return Err(bad("daemon.json lacks the mirror"));
            }
        }
        Runtime::Containerd => {
            let v: toml::Value = toml::from_str(&p.content)?;
            if v.get("server").and_then(|s| s.as_str()).is_none()
                || v.get("host")
                    .and_then(|h| h.get(format!("http://{mirror}")))
                    .is_none()
            {
                return Err(bad("hosts.toml lacks the server or the mirror"));
            }
        }
        Runtime::Crio | Runtime::Podman => {
            let v: toml::Value = toml::from_str(&p.content)?;
            let regs = v
                .get("registry")
                .and_then(|r| r.as_array())
                .ok_or_else(|| bad("registries.conf without [[registry]]"))?;
            for r in regs {
                let m = r
                    .get("mirror")
                    .and_then(|m| m.as_array())
                    .and_then(|m| m.first())
                    .and_then(|m| m.get("location"))
                    .and_then(|l| l.as_str());
                if !m.is_some_and(|l| l.starts_with(mirror)) {
                    return Err(bad("[[registry]] without the mirror"));
                }
            }
        }
    }
    Ok(())
}

/// Writes `p`: a file there that shoald did not write is kept first as
/// `NAME.before-shoal` (unless such a copy exists); then the new content
/// replaces it atomically. Returns the backup made, if any.
pub fn write(p: &Planned) -> anyhow::Result<Option<PathBuf>> {
    let dir = p.path.parent().context("a file path has a parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut backup = None;
    if let Ok(old) = std::fs::read_to_string(&p.path) {
        let keep = PathBuf::from(format!("{}.before-shoal", p.path.display()));
        if old != p.content && !old.contains(MARK) && !keep.exists() {
            std::fs::copy(&p.path, &keep)
                .with_context(|| format!("keeping {} as {}", p.path.display(), keep.display()))?;
            backup = Some(keep);
        }
    }
    let tmp = PathBuf::from(format!("{}.shoal-tmp", p.path.display()));
    std::fs::write(&tmp, &p.content).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &p.path).with_context(|| format!("replacing {}", p.path.display()))?;
    Ok(backup)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(names: &[&str]) -> Vec<Origin> {
        names.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn origins_parse_with_docker_hubs_url_and_overrides() {
        assert_eq!(
            "docker.io".parse::<Origin>().unwrap().url,
            "https://registry-1.docker.io"
        );
        let o: Origin = "registry.local:5000=http://10.0.0.9:5000".parse().unwrap();
        assert_eq!(
            (o.name.as_str(), o.url.as_str()),
            ("registry.local:5000", "http://10.0.0.9:5000")
        );
        assert!("quay.io=ftp://x".parse::<Origin>().is_err());
        assert!("bad host!".parse::<Origin>().is_err());
    }

    #[test]
    fn containerd_gets_a_hosts_toml_per_origin_with_the_origin_as_fallback() {
        let p = plan(
            Runtime::Containerd,
            "127.0.0.1:4900",
            &origins(&["docker.io", "quay.io"]),
            Path::new("/etc/containerd/certs.d"),
            |_| None,
        )
        .unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[0].path,
            Path::new("/etc/containerd/certs.d/docker.io/hosts.toml")
        );
        let v: toml::Value = toml::from_str(&p[1].content).unwrap();
        assert_eq!(v["server"].as_str(), Some("https://quay.io"));
        assert_eq!(
            v["host"]["http://127.0.0.1:4900"]["capabilities"],
            toml::Value::Array(vec!["pull".into(), "resolve".into()])
        );
    }

    #[test]
    fn docker_keeps_every_other_setting_and_refuses_a_broken_file() {
        let path = Path::new("/etc/docker/daemon.json");
        let before = r#"{"log-driver": "journald", "registry-mirrors": ["https://m.example"]}"#;
        let p = plan(
            Runtime::Docker,
            "127.0.0.1:4900",
            &origins(&["docker.io"]),
            path,
            |_| Some(before.into()),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&p[0].content).unwrap();
        assert_eq!(v["log-driver"], "journald");
        assert_eq!(
            v["registry-mirrors"],
            serde_json::json!(["http://127.0.0.1:4900", "https://m.example"])
        );
        // Running again changes nothing.
        let again = plan(
            Runtime::Docker,
            "127.0.0.1:4900",
            &origins(&["docker.io"]),
            path,
            |_| Some(p[0].content.clone()),
        )
        .unwrap();
        assert_eq!(again, p);
        for broken in [
            "{\"log-driver\": ",
            "[1, 2]",
            "{\"registry-mirrors\": \"x\"}",
        ] {
            let e = plan(
                Runtime::Docker,
                "127.0.0.1:4900",
                &origins(&["docker.io"]),
                path,
                |_| Some(broken.into()),
            )
            .unwrap_err();
            assert!(format!("{e:#}").contains("not touched"), "{broken}: {e:#}");
        }
    }

    #[test]
    fn crio_and_podman_get_a_drop_in_with_a_mirror_per_origin() {
        let p = plan(
            Runtime::Crio,
            "127.0.0.1:4900",
            &origins(&["docker.io", "quay.io"]),
            Path::new(default_path(Runtime::Crio)),
            |_| None,
        )
        .unwrap();
        let v: toml::Value = toml::from_str(&p[0].content).unwrap();
        let regs = v["registry"].as_array().unwrap();
        assert_eq!(regs.len(), 2);
        assert_eq!(regs[1]["prefix"].as_str(), Some("quay.io"));
        assert_eq!(
            regs[1]["mirror"][0]["location"].as_str(),
            Some("127.0.0.1:4900/quay.io")
        );
        assert_eq!(regs[1]["mirror"][0]["insecure"].as_bool(), Some(true));
        let e = plan(
            Runtime::Podman,
            "127.0.0.1:4900",
            &origins(&["registry.local:5000"]),
            Path::new("/x"),
            |_| None,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("default-upstream"), "{e:#}");
    }

    #[test]
    fn writing_keeps_a_foreign_file_once_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("certs.d/quay.io/hosts.toml");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "server = \"https://theirs\"\n").unwrap();
        let p = plan(
            Runtime::Containerd,
            "127.0.0.1:4900",
            &origins(&["quay.io"]),
            &dir.path().join("certs.d"),
            |_| None,
        )
        .unwrap();
        let kept = write(&p[0]).unwrap().expect("a backup of the foreign file");
        assert_eq!(
            std::fs::read_to_string(&kept).unwrap(),
            "server = \"https://theirs\"\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), p[0].content);
        // Again: nothing more is kept, the content stays.
        assert_eq!(write(&p[0]).unwrap(), None);
        assert_eq!(
            std::fs::read_to_string(&kept).unwrap(),
            "server = \"https://theirs\"\n"
        );
        assert!(!dir
            .path()
            .join("certs.d/quay.io/hosts.toml.shoal-tmp")
            .exists());
    }
}
