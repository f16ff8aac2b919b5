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
    ops_port: u16,
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

/// Writes a new cluster CA into `dir` with `shoald cluster-init`.
fn cluster_init(dir: &std::path::Path) -> Result<()> {
    let out = Command::new(shoald_binary()?)
        .arg("cluster-init")
        .arg(dir)
        .output()
        .context("running shoald cluster-init")?;
    if !out.status.success() {
        bail!(
            "shoald cluster-init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Cluster {
    /// Writes a cluster CA with `shoald cluster-init` and starts `shoal-tracker` on loopback.
    pub async fn start() -> Result<Cluster> {
        let dir = tempfile::tempdir()?;
        cluster_init(&dir.path().join("ca"))?;
        let port = util::free_port()?;
        let ops = util::free_port()?;
        let tracker = Self::spawn_tracker(dir.path(), port, ops)?;
        let mut cluster = Cluster {
            dir,
            tracker,
            tracker_addr: format!("127.0.0.1:{port}"),
            ops_port: ops,
        };
        cluster.wait_tracker().await?;
        Ok(cluster)
    }

    fn spawn_tracker(dir: &std::path::Path, port: u16, ops: u16) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("tracker.log"))?;
        Command::new(sibling_binary("shoal-tracker")?)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--cluster-dir")
            .arg(dir.join("ca"))
            .args(["--name", "127.0.0.1"])
            .args(["--ops-listen", &format!("127.0.0.1:{ops}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning shoal-tracker")
    }

    async fn wait_tracker(&mut self) -> Result<()> {
        let url = format!("http://127.0.0.1:{}/healthz", self.ops_port);
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
        .with_context(|| self.tracker_log())
    }

    /// Starts the tracker again on the same address (with empty state).
    pub async fn restart_tracker(&mut self) -> Result<()> {
        util::kill_child(&mut self.tracker);
        let port: u16 = self
            .tracker_addr
            .rsplit(':')
            .next()
            .unwrap_or("0")
            .parse()?;
        self.tracker = Self::spawn_tracker(self.dir.path(), port, self.ops_port)?;
        self.wait_tracker().await
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
    pub async fn member(&self, node: &str, opts: ShoaldOpts) -> Result<Shoald> {
        self.start_with_ca(node, opts, &self.dir.path().join("ca"))
            .await
    }

    /// Starts a `shoald` named `node` that dials this cluster's tracker but
    /// holds credentials of another cluster CA of its own (written with
    /// `shoald cluster-init`): an outsider.
    pub async fn outsider(&self, node: &str, opts: ShoaldOpts) -> Result<Shoald> {
        let other = self.dir.path().join(format!("outsider-{node}"));
        cluster_init(&other)?;
        self.start_with_ca(node, opts, &other).await
    }

    async fn start_with_ca(
        &self,
        node: &str,
        mut opts: ShoaldOpts,
        ca: &std::path::Path,
    ) -> Result<Shoald> {
        opts.extra_args.extend([
            "--cluster-dir".into(),
            ca.display().to_string(),
            "--node-id".into(),
            node.into(),
            "--tracker".into(),
            format!("https://{}", self.tracker_addr),
        ]);
        // The QUIC port, picked free, can be taken before shoald binds it
        // (`Shoald::start` retries only its own ports): retry on that too.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut o = opts.clone();
            let peer = util::free_udp_port()?;
            o.extra_args
                .extend(["--peer-listen".into(), format!("127.0.0.1:{peer}")]);
            match Shoald::start(o).await {
                Err(e) if attempt < 3 && format!("{e:#}").contains("in use") => continue,
                r => return r,
            }
        }
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
