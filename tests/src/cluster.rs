//! A Shoal cluster on loopback: a cluster CA, a real `shoal-tracker` process
//! (or several replicas sharing a real `redis-server`), and `shoald` members
//! joined to it.

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
    /// Further tracker replicas (with [`Cluster::start_replicated`]):
    /// process and address.
    replicas: Vec<(Child, String)>,
    redis: Option<Child>,
    /// The tracker's join listener (members joining with a token).
    join_port: u16,
}

/// The join token the test tracker accepts ([`Cluster::joining_member`]).
pub const JOIN_TOKEN: &str = "test-join-token-0123456789abcdef0123456789abcdef";

/// Lifetime of the certificates the test tracker issues to joining members:
/// short, so tests see them renewed.
pub const JOINED_CERT_VALIDITY_S: u64 = 30;

/// A binary of this workspace built beside `shoald` (`shoal-tracker`, ...).
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
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
        Self::start_with_tracker_args(&[], None).await
    }

    /// Like [`start`](Self::start), with more `shoal-tracker` flags and
    /// optionally a given ops port.
    pub async fn start_with_tracker_args(extra: &[String], ops: Option<u16>) -> Result<Cluster> {
        // A port found free can be taken by another process before the
        // tracker binds it (tests run in parallel): pick new ones then.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::try_start(extra, ops).await {
                Err(e) if attempt < 3 && format!("{e:#}").contains("Address already in use") => {
                    eprintln!("shoal-tracker could not bind a port found free; again with others");
                }
                other => return other,
            }
        }
    }

    async fn try_start(extra: &[String], ops: Option<u16>) -> Result<Cluster> {
        let dir = tempfile::tempdir()?;
        cluster_init(&dir.path().join("ca"))?;
        let port = util::free_port()?;
        let ops = match ops {
            Some(p) => p,
            None => util::free_port()?,
        };
        let join_port = util::free_port()?;
        let token_file = dir.path().join("join-tokens");
        std::fs::write(&token_file, format!("{JOIN_TOKEN}\n"))?;
        let join_args = [
            "--join-listen".to_owned(),
            format!("127.0.0.1:{join_port}"),
            "--join-token-file".to_owned(),
            token_file.display().to_string(),
            "--node-cert-validity".to_owned(),
            format!("{JOINED_CERT_VALIDITY_S}s"),
        ];
        let join_args: Vec<&str> = join_args.iter().chain(extra).map(String::as_str).collect();
        let tracker = Self::spawn_tracker(dir.path(), port, ops, &join_args, "tracker.log")?;
        let mut cluster = Cluster {
            dir,
            tracker,
            tracker_addr: format!("127.0.0.1:{port}"),
            ops_port: ops,
            replicas: Vec::new(),
            redis: None,
            join_port,
        };
        cluster.wait_tracker().await?;
        Ok(cluster)
    }

    /// Like [`start`](Self::start), with `replicas` tracker processes
    /// sharing their state through a `redis-server` of their own
    /// (`--store redis://...`). Members are given every replica's URL, each
    /// member in another order so that their requests spread.
    pub async fn start_replicated(replicas: usize) -> Result<Cluster> {
        assert!(replicas >= 1);
        let dir = tempfile::tempdir()?;
        cluster_init(&dir.path().join("ca"))?;
        let redis_port = util::free_port()?;
        let redis = Command::new(util::require_program("redis-server", "redis-server")?)
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .context("spawning redis-server")?;
        util::wait_for(
            "redis-server to accept connections",
            Duration::from_secs(10),
            Duration::from_millis(50),
            || async move {
                Ok(tokio::net::TcpStream::connect(("127.0.0.1", redis_port))
                    .await
                    .ok()
                    .map(|_| ()))
            },
        )
        .await?;
        let store = format!("redis://127.0.0.1:{redis_port}");
        let store_args = ["--store", store.as_str()];
        let (port, ops) = (util::free_port()?, util::free_port()?);
        let tracker = Self::spawn_tracker(dir.path(), port, ops, &store_args, "tracker.log")?;
        let mut cluster = Cluster {
            dir,
            tracker,
            tracker_addr: format!("127.0.0.1:{port}"),
            ops_port: ops,
            replicas: Vec::new(),
            redis: Some(redis),
            join_port: 0,
        };
        cluster.wait_tracker().await?;
        for r in 1..replicas {
            let (port, ops) = (util::free_port()?, util::free_port()?);
            let child = Self::spawn_tracker(
                cluster.dir.path(),
                port,
                ops,
                &store_args,
                &format!("tracker-{r}.log"),
            )?;
            cluster.replicas.push((child, format!("127.0.0.1:{port}")));
            wait_healthy(ops)
                .await
                .with_context(|| format!("tracker replica {r}"))?;
        }
        Ok(cluster)
    }

    fn spawn_tracker(
        dir: &std::path::Path,
        port: u16,
        ops: u16,
        extra: &[&str],
        log: &str,
    ) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(log))?;
        // The operator's deny list ([`Cluster::deny`]), empty at first.
        let deny = dir.join("deny.txt");
        if !deny.exists() {
            std::fs::write(&deny, "# nodes shut out of the cluster\n")?;
        }
        Command::new(sibling_binary("shoal-tracker")?)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--deny-file")
            .arg(&deny)
            .arg("--cluster-dir")
            .arg(dir.join("ca"))
            .args(["--name", "127.0.0.1"])
            .args(["--ops-listen", &format!("127.0.0.1:{ops}")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning shoal-tracker")
    }

    async fn wait_tracker(&mut self) -> Result<()> {
        wait_healthy(self.ops_port)
            .await
            .with_context(|| self.tracker_log())
    }

    /// Writes the tracker's deny list (node names); the tracker reads it
    /// within its poll interval (2 s), members within their next announce.
    pub fn deny(&self, nodes: &[&str]) -> Result<()> {
        let path = self.dir.path().join("deny.txt");
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, nodes.join("\n") + "\n")?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// `kill -9` of the first tracker process (with replicas, the others
    /// go on).
    pub fn kill_first_tracker(&mut self) {
        util::kill_child(&mut self.tracker);
    }

    /// Every tracker URL, rotated by `k` (a member's failover order).
    fn tracker_urls(&self, k: usize) -> Vec<String> {
        let mut all: Vec<String> = std::iter::once(&self.tracker_addr)
            .chain(self.replicas.iter().map(|(_, a)| a))
            .map(|a| format!("https://{a}"))
            .collect();
        let n = all.len();
        all.rotate_left(k % n);
        all
    }
}

/// Waits until a tracker answers `/healthz` on its ops port.
async fn wait_healthy(ops_port: u16) -> Result<()> {
    let url = format!("http://127.0.0.1:{ops_port}/healthz");
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
}

impl Cluster {
    /// Starts the tracker again on the same address (with empty state).
    pub async fn restart_tracker(&mut self) -> Result<()> {
        util::kill_child(&mut self.tracker);
        let port: u16 = self
            .tracker_addr
            .rsplit(':')
            .next()
            .unwrap_or("0")
            .parse()?;
        self.tracker =
            Self::spawn_tracker(self.dir.path(), port, self.ops_port, &[], "tracker.log")?;
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

    /// Starts a member named `node` whose DHT listens on a free TCP port of
    /// 127.0.0.1 (`--dht-listen`), returned with it.
    pub async fn dht_member(
        &self,
        node: &str,
        mut opts: ShoaldOpts,
    ) -> Result<(Shoald, std::net::SocketAddr)> {
        let dht: std::net::SocketAddr = format!("127.0.0.1:{}", util::free_port()?).parse()?;
        opts.extra_args
            .extend(["--dht-listen".into(), dht.to_string()]);
        Ok((self.member(node, opts).await?, dht))
    }

    /// Starts a member with a DHT, like [`dht_member`](Self::dht_member),
    /// whose credentials come from another cluster CA: an outsider.
    pub async fn dht_outsider(&self, node: &str, mut opts: ShoaldOpts) -> Result<Shoald> {
        let dht = format!("127.0.0.1:{}", util::free_port()?);
        opts.extra_args.extend(["--dht-listen".into(), dht]);
        self.outsider(node, opts).await
    }

    /// Starts a member named `node` whose cluster dir holds only the CA
    /// certificate: it joins with `token` at the tracker's join listener
    /// (the CA key stays off the node) and renews its certificate there.
    pub async fn joining_member(
        &self,
        node: &str,
        token: &str,
        mut opts: ShoaldOpts,
    ) -> Result<Shoald> {
        let dir = self.dir.path().join(format!("joined-{node}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(self.dir.path().join("ca/ca.crt"), dir.join("ca.crt"))?;
        let token_file = dir.join("token");
        std::fs::write(&token_file, format!("{token}\n"))?;
        opts.extra_args.extend([
            "--join".into(),
            format!("https://127.0.0.1:{}", self.join_port),
            "--join-token-file".into(),
            token_file.display().to_string(),
        ]);
        self.start_with_ca(node, opts, &dir).await
    }

    /// The cluster CA's directory (`ca.crt`, `ca.key`).
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// The (first) tracker's ops endpoint (`/metrics`, `/healthz`).
    pub fn tracker_ops_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ops_port)
    }

    /// The (first) tracker's URL.
    pub fn tracker_url(&self) -> String {
        format!("https://{}", self.tracker_addr)
    }

    /// The cluster dir of a member started with [`joining_member`](Self::joining_member).
    pub fn joined_dir(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("joined-{node}"))
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
        ]);
        // Members named alike spread over the replicas by their last digit.
        let k = node.bytes().last().map_or(0, usize::from);
        for url in self.tracker_urls(k) {
            opts.extra_args.extend(["--tracker".into(), url]);
        }
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
        for (child, _) in &mut self.replicas {
            util::kill_child(child);
        }
        if let Some(redis) = &mut self.redis {
            util::kill_child(redis);
        }
        if std::thread::panicking() {
            eprintln!("--- shoal-tracker log ---\n{}", self.tracker_log());
            for r in 1..=self.replicas.len() {
                let log =
                    util::tail_file(&self.dir.path().join(format!("tracker-{r}.log")), 16 * 1024);
                eprintln!("--- shoal-tracker replica {r} log ---\n{log}");
            }
        }
    }
}
