//! `Shoald`: the daemon under test, as a child process.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use reqwest::StatusCode;
use tempfile::TempDir;

use crate::metrics;
use crate::util;

/// Options for [`Shoald::start`]; each maps to one `shoald run` flag.
#[derive(Debug, Clone, Default)]
pub struct ShoaldOpts {
    /// `--upstream HOST:PORT` (repeatable).
    pub upstreams: Vec<String>,
    /// `--insecure-upstream HOST:PORT` (repeatable): plain-HTTP origins.
    pub insecure_upstreams: Vec<String>,
    /// `--default-upstream HOST:PORT`.
    pub default_upstream: Option<String>,
    /// `--cache-max-bytes N`.
    pub cache_max_bytes: Option<u64>,
    /// `--docker-config FILE`.
    pub docker_config: Option<PathBuf>,
    /// `--config FILE.toml`.
    pub config: Option<PathBuf>,
    /// Further arguments appended after the others.
    pub extra_args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Run the daemon in a mount namespace of its own with a tmpfs of this
    /// many bytes as its data dir (a small disk that fills up). The data
    /// dir is then seen through `/proc/PID/root` ([`Shoald::data_dir`]).
    pub data_tmpfs: Option<u64>,
}

impl ShoaldOpts {
    /// One plain-HTTP origin, which is also the default upstream.
    pub fn insecure_default(upstream: &str) -> Self {
        ShoaldOpts {
            insecure_upstreams: vec![upstream.to_string()],
            default_upstream: Some(upstream.to_string()),
            ..Default::default()
        }
    }
}

/// A running `shoald` with its own data dir and ports; killed on drop. On a panicking
/// test its stdout and stderr are printed.
pub struct Shoald {
    child: Option<Child>,
    dir: TempDir,
    data_tmpfs: Option<u64>,
    registry_port: u16,
    ops_port: u16,
    args: Vec<String>,
    env: Vec<(String, String)>,
    bin: PathBuf,
    starts: u32,
}

/// `<target dir>/debug/shoald`, found from the test binary's own path
/// (`target/debug/deps/<test>-<hash>`); `SHOALD_BIN` overrides it.
pub fn shoald_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SHOALD_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("test binary has no parent dir")?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().context("deps dir has no parent")?;
    }
    let bin = dir.join("shoald");
    if !bin.is_file() {
        bail!(
            "the daemon binary {} does not exist: run `cargo build -p shoal-daemon` first \
             (scripts/test.sh does), or set SHOALD_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

impl Shoald {
    /// Starts the daemon and waits until `GET /healthz` on the ops port answers 200.
    pub async fn start(opts: ShoaldOpts) -> Result<Shoald> {
        let bin = shoald_binary()?;
        // Ports picked as free can be taken before shoald binds them: retry on that only.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::try_start(&opts, &bin).await {
                Err(e) if attempt < 3 && format!("{e:#}").contains("in use") => continue,
                r => return r,
            }
        }
    }

    async fn try_start(opts: &ShoaldOpts, bin: &Path) -> Result<Shoald> {
        let bin = bin.to_path_buf();
        let dir = tempfile::Builder::new().prefix("shoald-").tempdir()?;
        std::fs::create_dir_all(dir.path().join("data"))?;
        let registry_port = util::free_port()?;
        let ops_port = util::free_port()?;
        let mut args: Vec<String> = vec![
            "run".into(),
            "--data-dir".into(),
            dir.path().join("data").display().to_string(),
            "--registry-listen".into(),
            format!("127.0.0.1:{registry_port}"),
            "--ops-listen".into(),
            format!("127.0.0.1:{ops_port}"),
        ];
        for u in &opts.upstreams {
            args.extend(["--upstream".into(), u.clone()]);
        }
        for u in &opts.insecure_upstreams {
            args.extend(["--insecure-upstream".into(), u.clone()]);
        }
        if let Some(u) = &opts.default_upstream {
            args.extend(["--default-upstream".into(), u.clone()]);
        }
        if let Some(n) = opts.cache_max_bytes {
            args.extend(["--cache-max-bytes".into(), n.to_string()]);
        }
        if let Some(p) = &opts.docker_config {
            args.extend(["--docker-config".into(), p.display().to_string()]);
        }
        if let Some(p) = &opts.config {
            args.extend(["--config".into(), p.display().to_string()]);
        }
        args.extend(opts.extra_args.iter().cloned());
        let mut d = Shoald {
            child: None,
            dir,
            data_tmpfs: opts.data_tmpfs,
            registry_port,
            ops_port,
            args,
            env: opts.env.clone(),
            bin,
            starts: 0,
        };
        d.spawn_and_wait().await?;
        Ok(d)
    }

    async fn spawn_and_wait(&mut self) -> Result<()> {
        self.starts += 1;
        let n = self.starts;
        let stdout = File::create(self.dir.path().join(format!("stdout.{n}.log")))?;
        let stderr = File::create(self.dir.path().join(format!("stderr.{n}.log")))?;
        let mut cmd = match self.data_tmpfs {
            None => Command::new(&self.bin),
            Some(bytes) => {
                // unshare execs sh, which execs shoald: one pid throughout.
                let mut c = Command::new(util::require_program("unshare", "util-linux")?);
                // Root mounts in a mount namespace; others map themselves
                // to root in a user namespace first.
                let root = std::fs::read_to_string("/proc/self/status")
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find_map(|l| l.strip_prefix("Uid:"))
                            .and_then(|u| u.split_whitespace().nth(1).map(|e| e == "0"))
                    })
                    .unwrap_or(false);
                if !root {
                    c.arg("--user").arg("--map-root-user");
                }
                c.args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg(format!(
                        "mount -t tmpfs -o size={bytes} shoal-test \"$0\" && exec \"$@\""
                    ))
                    .arg(self.dir.path().join("data"))
                    .arg(&self.bin);
                c
            }
        };
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        // The daemon must not pick up a developer's own config from the environment.
        for (k, _) in std::env::vars() {
            if k.starts_with("SHOAL_") {
                cmd.env_remove(k);
            }
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.env("NO_PROXY", "*")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("http_proxy");
        cmd.env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy");
        // Credentials come only from what a test passes with --docker-config.
        cmd.env("DOCKER_CONFIG", self.dir.path().join("no-docker-config"));
        cmd.env("HOME", self.dir.path());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        self.child = Some(child);
        let url = format!("{}/healthz", self.ops_url());
        let client = crate::http::client_with_timeout(Duration::from_secs(2));
        let res = util::wait_for(
            "shoald /healthz to answer 200",
            Duration::from_secs(30),
            Duration::from_millis(50),
            || {
                let exited = self.child.as_mut().map(|c| c.try_wait());
                let client = client.clone();
                let url = url.clone();
                async move {
                    if let Some(Ok(Some(status))) = exited {
                        bail!("shoald exited during start-up with {status}");
                    }
                    match client.get(&url).send().await {
                        Ok(r) if r.status() == StatusCode::OK => Ok(Some(())),
                        Ok(r) => bail!("/healthz answered {}", r.status()),
                        Err(_) => Ok(None),
                    }
                }
            },
        )
        .await;
        if let Err(e) = res {
            let logs = self.logs();
            if let Some(mut c) = self.child.take() {
                util::kill_child(&mut c);
            }
            bail!("{e:#}\nargs: {:?}\n{logs}", self.args);
        }
        Ok(())
    }

    /// `http://127.0.0.1:PORT` of the OCI registry endpoint.
    pub fn registry_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.registry_port)
    }

    /// `127.0.0.1:PORT` of the OCI registry endpoint.
    pub fn registry_addr(&self) -> String {
        format!("127.0.0.1:{}", self.registry_port)
    }

    /// `http://127.0.0.1:PORT` of the ops endpoint (`/metrics`, `/healthz`).
    pub fn ops_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ops_port)
    }

    /// The `--data-dir`.
    ///
    /// With [`ShoaldOpts::data_tmpfs`], the path through the daemon's own
    /// mount namespace (`/proc/PID/root/...`), valid while it runs.
    pub fn data_dir(&self) -> PathBuf {
        if self.data_tmpfs.is_some() {
            if let Some(pid) = self.child.as_ref().map(Child::id) {
                let inner = self.dir.path().join("data");
                return PathBuf::from(format!("/proc/{pid}/root{}", inner.display()));
            }
        }
        self.dir.path().join("data")
    }

    /// GETs blob `digest` of `repo` through this daemon and checks it whole
    /// (size and digest).
    pub async fn pull_blob(&self, repo: &str, digest: &str, size: u64) -> Result<()> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.registry_url());
        crate::http::get_hashed(&crate::http::client(), &url, &[])
            .await?
            .expect_complete(digest, size)
    }

    /// Runs `shoalctl --socket <data dir>/admin.sock ARGS` (bounded to
    /// `timeout`); its output whatever its exit status.
    pub async fn ctl(&self, args: &[&str], timeout: Duration) -> Result<std::process::Output> {
        let mut cmd = tokio::process::Command::new(crate::cluster::sibling_binary("shoalctl")?);
        cmd.arg("--socket")
            .arg(self.data_dir().join("admin.sock"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        match tokio::time::timeout(timeout, cmd.output()).await {
            Ok(out) => Ok(out?),
            Err(_) => bail!("shoalctl {args:?} did not finish within {timeout:?}"),
        }
    }

    /// Bytes of all regular files under `<data dir>/blobs`.
    pub fn blob_store_bytes(&self) -> Result<u64> {
        util::dir_regular_file_bytes(&self.data_dir().join("blobs"))
    }

    /// All samples currently exposed at `/metrics`.
    pub async fn metrics(&self) -> Result<Vec<metrics::Sample>> {
        let r = crate::http::get(&format!("{}/metrics", self.ops_url()), &[]).await?;
        if r.status != StatusCode::OK {
            bail!("GET /metrics: {} {:?}", r.status, r.body_text());
        }
        metrics::parse(&String::from_utf8_lossy(&r.body))
    }

    /// The value of a series (summed over series matching `labels`; 0 when absent).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(metrics::value(&self.metrics().await?, name, labels))
    }

    /// `shoal_origin_bytes_total{kind="blob"}`.
    pub async fn origin_blob_bytes(&self) -> Result<f64> {
        self.metric("shoal_origin_bytes_total", &[("kind", "blob")])
            .await
    }

    /// Waits (up to `timeout`) until a metric satisfies `pred`; returns its last value.
    pub async fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        timeout: Duration,
        pred: impl Fn(f64) -> bool,
    ) -> Result<f64> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let v = self.metric(name, labels).await?;
            if pred(v) {
                return Ok(v);
            }
            if std::time::Instant::now() >= deadline {
                bail!("{name}{labels:?} = {v} did not reach the expected value within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `shoal_transfers_active` is 0 (bounded).
    pub async fn wait_idle(&self) -> Result<()> {
        self.wait_metric(
            "shoal_transfers_active",
            &[],
            Duration::from_secs(10),
            |v| v == 0.0,
        )
        .await?;
        Ok(())
    }

    /// SIGKILLs the daemon (no clean shutdown).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            util::kill_child(&mut c);
        }
    }

    /// Kills the daemon if it runs, then starts it again with the same data dir, ports and
    /// arguments, and waits until it is healthy.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn_and_wait().await
    }

    /// Sends SIGTERM and waits up to `within` for the process to exit.
    pub async fn terminate(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let mut c = self.child.take().context("shoald is not running")?;
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status()
            .context("running kill -TERM")?;
        if !sent.success() {
            util::kill_child(&mut c);
            bail!("kill -TERM failed: {sent}");
        }
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                util::kill_child(&mut c);
                bail!("shoald did not exit within {within:?} of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the daemon.
    pub fn signal(&self, sig: &str) -> Result<()> {
        let c = self.child.as_ref().context("shoald is not running")?;
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(c.id().to_string())
            .status()
            .context("running kill")?
            .success();
        if !ok {
            bail!("kill -{sig} failed");
        }
        Ok(())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// stdout and stderr of every start so far (the tail of each).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in 1..=self.starts {
            for stream in ["stdout", "stderr"] {
                let p: &Path = &self.dir.path().join(format!("{stream}.{n}.log"));
                out.push_str(&format!(
                    "--- shoald {stream} (start {n}) ---\n{}\n",
                    util::tail_file(p, 64 * 1024)
                ));
            }
        }
        out
    }
}

impl Drop for Shoald {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            util::kill_child(&mut c);
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        // SHOAL_TEST_LOGS=DIR keeps every daemon's whole logs, for study.
        if let Some(keep) = std::env::var_os("SHOAL_TEST_LOGS") {
            let keep = Path::new(&keep);
            for n in 1..=self.starts {
                let from = self.dir.path().join(format!("stderr.{n}.log"));
                let to = keep.join(format!("shoald-{}.{n}.log", self.registry_addr()));
                if let Err(e) =
                    std::fs::create_dir_all(keep).and_then(|_| std::fs::copy(&from, &to))
                {
                    eprintln!("SHOAL_TEST_LOGS: copying {}: {e}", from.display());
                }
            }
        }
    }
}
