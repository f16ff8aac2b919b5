//! A Shoal cluster on loopback: a cluster CA, a real `shoal-tracker` process,
//! and `shoald` members joined to it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::shoald::{shoald_binary, Shoald, ShoaldOpts};
use crate::util;

/// A cluster CA and a running tracker; members are started with [`Cluster::member`].
pub struct Cluster {
    dir: TempDir,
    tracker: Child,
    tracker_addr: String,
}

fn sibling_binary(name: &str) -> Result<PathBuf> {
    let shoald = shoald_binary()?;
    let bin = shoald.with_file_name(name);
    if !bin.is_file() {
        bail!(
            "{} does not exist: run `cargo build --workspace --bins` first (scripts/test.sh does)",
            bin.display()
        );
    }
    Ok(bin)
}

impl Cluster {
    /// Writes a cluster CA with `shoald cluster-init` and starts `shoal-tracker` on loopback.
    pub async fn start() -> Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let ca = dir.path().join("ca");
        let out = Command::new(shoald_binary()?)
            .arg("cluster-init")
            .arg(&ca)
            .output()
            .context("running shoald cluster-init")?;
        if !out.status.success() {
            bail!(
                "shoald cluster-init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let port = util::free_port()?;
        let ops = util::free_port()?;
        let log = std::fs::File::create(dir.path().join("tracker.log"))?;
        let tracker = Command::new(sibling_binary("shoal-tracker")?)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--cluster-dir")
            .arg(&ca)
            .args(["--name", "127.0.0.1"])
            .args(["--ops-listen", &format!("127.0.0.1:{ops}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning shoal-tracker")?;
        let cluster = Cluster {
            dir,
            tracker,
            tracker_addr: format!("127.0.0.1:{port}"),
        };
        let url = format!("http://127.0.0.1:{ops}/healthz");
        let client = crate::http::client_with_timeout(Duration::from_secs(2));
        util::wait_for(
            "shoal-tracker to answer /healthz",
            Duration::from_secs(20),
            Duration::from_millis(50),
            || {
                let (client, url) = (client.clone(), url.clone());
                async move {
                    Ok(client
                        .get(&url)
                        .send()
                        .await
                        .ok()
                        .filter(|r| r.status().is_success())
                        .map(|_| ()))
                }
            },
        )
        .await
        .with_context(|| cluster.tracker_log())?;
        Ok(cluster)
    }

    /// Kills the tracker (members find it unreachable).
    pub fn stop_tracker(&mut self) {
        util::kill_child(&mut self.tracker);
    }

    /// The tracker's log so far.
    pub fn tracker_log(&self) -> String {
        util::tail_file(&self.dir.path().join("tracker.log"), 32 * 1024)
    }

    /// Starts a member named `node` with `opts` (its origin settings), joined to this cluster.
    pub async fn member(&self, node: &str, mut opts: ShoaldOpts) -> Result<Shoald> {
        let peer = util::free_port()?;
        opts.extra_args.extend([
            "--cluster-dir".into(),
            self.dir.path().join("ca").display().to_string(),
            "--node-id".into(),
            node.into(),
            "--peer-listen".into(),
            format!("127.0.0.1:{peer}"),
            "--tracker".into(),
            format!("https://{}", self.tracker_addr),
        ]);
        Shoald::start(opts).await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        util::kill_child(&mut self.tracker);
        if std::thread::panicking() {
            eprintln!("--- shoal-tracker log ---\n{}", self.tracker_log());
        }
    }
}
