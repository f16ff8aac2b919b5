//! `Containerd`: a real containerd with its own root, state and socket, driven with `ctr`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use tempfile::TempDir;

use crate::util;

/// The containerd namespace the harness uses.
pub const NAMESPACE: &str = "test";
const PULL_TIMEOUT: Duration = Duration::from_secs(60);

/// A running containerd; killed on drop (its log is printed if the test panics).
pub struct Containerd {
    child: Option<Child>,
    dir: TempDir,
    ctr: PathBuf,
}

impl Containerd {
    /// Starts containerd (CRI and other unneeded plugins disabled) and waits until `ctr version`
    /// answers on its socket.
    pub async fn start() -> Result<Containerd> {
        let bin = util::require_program("containerd", "containerd")?;
        let ctr = util::require_program("ctr", "containerd")?;
        // Keep the socket path short (sun_path is 108 bytes).
        let dir = tempfile::Builder::new()
            .prefix("ctrd-")
            .tempdir_in("/tmp")?;
        let p = dir.path();
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.internal.v1.opt",
  "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.overlayfs",
]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  address = "{debug}"
  level = "info"

[metrics]
  address = ""
"#,
            root = p.join("root").display(),
            state = p.join("state").display(),
            sock = p.join("c.sock").display(),
            debug = p.join("d.sock").display(),
        );
        std::fs::write(p.join("config.toml"), config)?;
        let log = File::create(p.join("containerd.log"))?;
        let child = Command::new(&bin)
            .arg("--config")
            .arg(p.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let mut c = Containerd {
            child: Some(child),
            dir,
            ctr,
        };
        let res = util::wait_for(
            "containerd to answer `ctr version`",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                let exited = c.child.as_mut().map(|ch| ch.try_wait());
                let cmd = c.ctr_cmd(&["version"]);
                async move {
                    if let Some(Ok(Some(status))) = exited {
                        bail!("containerd exited during start-up with {status}");
                    }
                    if !Path::new(&cmd.1).exists() {
                        return Ok(None);
                    }
                    match util::run_command(cmd.0, Duration::from_secs(5)).await {
                        Ok(_) => Ok(Some(())),
                        Err(_) => Ok(None),
                    }
                }
            },
        )
        .await;
        if let Err(e) = res {
            bail!("{e:#}\n--- containerd log ---\n{}", c.log());
        }
        Ok(c)
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    /// `ctr --address SOCK -n test <args>` (and the socket path).
    fn ctr_cmd(&self, args: &[&str]) -> (tokio::process::Command, PathBuf) {
        let mut cmd = tokio::process::Command::new(&self.ctr);
        cmd.arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg(NAMESPACE)
            .args(args);
        cmd.env_remove("CONTAINERD_ADDRESS")
            .env_remove("CONTAINERD_NAMESPACE")
            .env_remove("CONTAINERD_SNAPSHOTTER");
        cmd.env("NO_PROXY", "*")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("http_proxy");
        cmd.env_remove("https_proxy");
        (cmd, self.socket())
    }

    /// Runs `ctr <args>` against this containerd, returning stdout.
    pub async fn ctr(&self, args: &[&str]) -> Result<String> {
        let out = util::run_command(self.ctr_cmd(args).0, PULL_TIMEOUT).await?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ctr images pull --hosts-dir DIR --snapshotter native [--all-platforms] REF`: fetches
    /// and unpacks. Returns ctr's output.
    pub async fn pull(
        &self,
        image_ref: &str,
        hosts_dir: &Path,
        all_platforms: bool,
    ) -> Result<String> {
        let hosts = hosts_dir.display().to_string();
        let mut args = vec![
            "images",
            "pull",
            "--hosts-dir",
            hosts.as_str(),
            "--snapshotter",
            "native",
        ];
        if all_platforms {
            args.push("--all-platforms");
        }
        args.push(image_ref);
        let r = self.ctr(&args).await;
        match r {
            Ok(out) => Ok(out),
            Err(e) => Err(e.context(format!(
                "ctr images pull {image_ref}\n--- containerd log ---\n{}",
                self.log()
            ))),
        }
    }

    /// Digests in the content store (`ctr content ls -q`).
    pub async fn content_digests(&self) -> Result<Vec<String>> {
        let out = self.ctr(&["content", "ls", "--quiet"]).await?;
        Ok(out
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| l.starts_with("sha256:"))
            .collect())
    }

    /// Path → hex SHA-256 of every regular file in every snapshot of the native snapshotter
    /// (relative to the snapshot root). The native snapshotter copies parents into children, so
    /// this is the union of all unpacked layers. Fails if one path has different content in
    /// two snapshots.
    pub fn unpacked_files(&self) -> Result<BTreeMap<String, String>> {
        let snaps = self
            .dir
            .path()
            .join("root/io.containerd.snapshotter.v1.native/snapshots");
        ensure!(
            snaps.is_dir(),
            "no native snapshots at {}: nothing was unpacked",
            snaps.display()
        );
        let mut out: BTreeMap<String, String> = BTreeMap::new();
        for entry in std::fs::read_dir(&snaps)? {
            let snap = entry?.path();
            for (file, _) in util::walk_files(&snap)? {
                let rel = file.strip_prefix(&snap)?.to_string_lossy().into_owned();
                let h = util::sha256_file_hex(&file)?;
                if let Some(prev) = out.insert(rel.clone(), h.clone()) {
                    ensure!(prev == h, "{rel} differs between snapshots ({prev} vs {h})");
                }
            }
        }
        Ok(out)
    }

    /// The containerd log so far.
    pub fn log(&self) -> String {
        util::tail_file(&self.dir.path().join("containerd.log"), 32 * 1024)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            util::kill_child(&mut c);
        }
        if std::thread::panicking() {
            eprintln!("--- containerd log ---\n{}", self.log());
        }
    }
}

/// A `--hosts-dir` directory (deleted on drop).
pub struct HostsDir {
    dir: TempDir,
}

impl HostsDir {
    /// An empty hosts dir.
    pub fn new() -> Result<HostsDir> {
        Ok(HostsDir {
            dir: tempfile::Builder::new().prefix("hosts-").tempdir()?,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `<dir>/<registry>/hosts.toml` with `server = <server_url>` and each mirror URL
    /// as a `[host."<url>"]` with pull and resolve capabilities, tried in order before the server.
    pub fn set(&self, registry: &str, server_url: &str, mirrors: &[String]) -> Result<()> {
        let d = self.dir.path().join(registry);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("hosts.toml"), hosts_toml(server_url, mirrors))?;
        Ok(())
    }

    /// The origin `registry` (`127.0.0.1:PORT`) over plain HTTP, no mirror.
    pub fn direct(registry: &str) -> Result<HostsDir> {
        let h = Self::new()?;
        h.set(registry, &format!("http://{registry}"), &[])?;
        Ok(h)
    }

    /// Pull `registry` through shoald (`127.0.0.1:SHOALPORT`) as a mirror. The `server` entry
    /// is `server_url` (pass a dead address to make a fallback to the origin impossible).
    pub fn mirror(registry: &str, shoald_addr: &str, server_url: &str) -> Result<HostsDir> {
        let h = Self::new()?;
        h.set(registry, server_url, &[format!("http://{shoald_addr}")])?;
        Ok(h)
    }
}

/// The text of a containerd `hosts.toml`.
pub fn hosts_toml(server_url: &str, mirrors: &[String]) -> String {
    let mut s = format!("server = \"{server_url}\"\n");
    for m in mirrors {
        s.push_str(&format!(
            "\n[host.\"{m}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ));
    }
    s
}

/// An address on which nothing listens (connections are refused).
pub fn dead_server_url() -> Result<String> {
    Ok(format!("http://127.0.0.1:{}", util::free_port()?))
}
