//! The origin: a real CNCF distribution `docker-registry` process.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use base64::Engine as _;
use reqwest::{Method, StatusCode};
use tempfile::TempDir;

use crate::http::{self, Response};
use crate::util::{self, sha256_digest};

/// Options for [`Registry::start`].
#[derive(Debug, Clone, Default)]
pub struct RegistryOpts {
    /// htpasswd Basic auth with these users (user, password).
    pub htpasswd: Vec<(String, String)>,
    /// A notification endpoint (`notifications.endpoints`): its URL and the
    /// bearer secret sent in `Authorization`.
    pub notify: Option<(String, String)>,
}

impl RegistryOpts {
    /// Basic auth with one user.
    pub fn basic_auth(user: &str, password: &str) -> Self {
        RegistryOpts {
            htpasswd: vec![(user.to_string(), password.to_string())],
            notify: None,
        }
    }
}

/// A running `docker-registry` with filesystem storage in a temp dir; killed on drop.
pub struct Registry {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    creds: Option<(String, String)>,
}

impl Registry {
    /// Starts an anonymous registry.
    pub async fn start() -> Result<Registry> {
        Self::start_with(RegistryOpts::default()).await
    }

    /// Starts a registry with options, waiting until `GET /v2/` answers 200 or 401.
    pub async fn start_with(opts: RegistryOpts) -> Result<Registry> {
        let bin = util::find_program("docker-registry").context(
            "the origin registry binary `docker-registry` (CNCF distribution) is missing: \
             `apt-get install -y docker-registry` (scripts/test.sh does this)",
        )?;
        let mut last_err = None;
        // A port picked as free can be taken before the registry binds it: retry a few times.
        for _ in 0..3 {
            match Self::try_start(&bin, &opts).await {
                Ok(r) => return Ok(r),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    async fn try_start(bin: &Path, opts: &RegistryOpts) -> Result<Registry> {
        let dir = tempfile::Builder::new()
            .prefix("shoal-registry-")
            .tempdir()?;
        let root = dir.path().join("storage");
        std::fs::create_dir_all(&root)?;
        let port = util::free_port()?;
        let mut auth = String::new();
        if !opts.htpasswd.is_empty() {
            let mut lines = String::new();
            for (user, pass) in &opts.htpasswd {
                let hash = bcrypt::hash_with_result(pass, 5)
                    .context("bcrypt")?
                    .format_for_version(bcrypt::Version::TwoY);
                lines.push_str(&format!("{user}:{hash}\n"));
            }
            let path = dir.path().join("htpasswd");
            std::fs::write(&path, lines)?;
            auth = format!(
                "auth:\n  htpasswd:\n    realm: shoal-test-registry\n    path: {}\n",
                path.display()
            );
        }
        let notifications = match &opts.notify {
            None => String::new(),
            Some((url, bearer)) => format!(
                "notifications:\n  endpoints:\n    - name: shoal\n      url: {url}\n      \
                 headers:\n        Authorization: [\"Bearer {bearer}\"]\n      timeout: 2s\n      \
                 threshold: 3\n      backoff: 1s\n"
            ),
        };
        let secret =
            util::sha256_hex(format!("{port}{:?}", std::time::SystemTime::now()).as_bytes());
        let config = format!(
            "version: 0.1\n\
             log:\n  level: warn\n  formatter: text\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n  redirect:\n    disable: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: {secret}\n  \
             headers:\n    X-Content-Type-Options: [nosniff]\n\
             {auth}{notifications}",
            root = root.display(),
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)?;
        let log = File::create(dir.path().join("registry.log"))?;
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config_path)
            .env_remove("REGISTRY_HTTP_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let mut reg = Registry {
            child: Some(child),
            port,
            dir,
            creds: opts.htpasswd.first().cloned(),
        };
        let url = format!("http://127.0.0.1:{port}/v2/");
        let client = http::client_with_timeout(Duration::from_secs(2));
        let ready = util::wait_for(
            "docker-registry to answer GET /v2/",
            Duration::from_secs(20),
            Duration::from_millis(50),
            || {
                let exited = reg.child.as_mut().map(|c| c.try_wait()).transpose();
                let client = client.clone();
                let url = url.clone();
                async move {
                    if let Ok(Some(Some(status))) = exited {
                        bail!("docker-registry exited early with {status}");
                    }
                    match client.get(&url).send().await {
                        Ok(r)
                            if r.status() == StatusCode::OK
                                || r.status() == StatusCode::UNAUTHORIZED =>
                        {
                            Ok(Some(()))
                        }
                        Ok(r) => bail!("GET /v2/ answered {}", r.status()),
                        Err(_) => Ok(None),
                    }
                }
            },
        )
        .await;
        if let Err(e) = ready {
            let log = reg.log();
            bail!("{e:#}\n--- docker-registry log ---\n{log}");
        }
        Ok(reg)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The htpasswd user, if auth is on.
    pub fn creds(&self) -> Option<(&str, &str)> {
        self.creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// The storage root (`rootdirectory`).
    pub fn storage_root(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the registry keeps a blob's bytes: corrupt it to make the origin serve wrong bytes.
    pub fn blob_data_path(&self, digest_hex: &str) -> PathBuf {
        let hex = util::digest_hex(digest_hex);
        self.storage_root()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        util::tail_file(&self.dir.path().join("registry.log"), 64 * 1024)
    }

    fn auth_header(&self) -> Option<String> {
        self.creds.as_ref().map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        })
    }

    /// A request straight to the registry (with its credentials, if any).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Response> {
        let auth = self.auth_header();
        let mut h: Vec<(&str, &str)> = headers.to_vec();
        if let Some(a) = auth.as_deref() {
            h.push(("Authorization", a));
        }
        http::send(
            &http::client(),
            method,
            &format!("{}{}", self.url(), path),
            &h,
            body,
        )
        .await
    }

    /// Uploads a blob to `repo` (monolithic upload) and returns its digest.
    /// PUTs a manifest under `reference` (a tag) and returns its digest.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> Result<String> {
        let r = self
            .request(
                Method::PUT,
                &format!("/v2/{repo}/manifests/{reference}"),
                &[("Content-Type", media_type)],
                Some(body.to_vec()),
            )
            .await?;
        ensure!(
            r.status == StatusCode::CREATED,
            "putting manifest {repo}:{reference}: {} {:?}",
            r.status,
            r.body_text()
        );
        Ok(sha256_digest(body))
    }

    pub async fn push_blob(&self, repo: &str, data: &[u8]) -> Result<String> {
        let digest = sha256_digest(data);
        let r = self
            .request(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/"),
                &[],
                Some(Vec::new()),
            )
            .await?;
        ensure!(
            r.status == StatusCode::ACCEPTED,
            "starting upload to {repo}: {} {:?}",
            r.status,
            r.body_text()
        );
        let loc = r.require_header("location")?.to_string();
        let loc = if loc.starts_with('/') {
            format!("{}{}", self.url(), loc)
        } else {
            loc
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let put_url = format!("{loc}{sep}digest={digest}");
        let auth = self.auth_header();
        let mut h = vec![("Content-Type", "application/octet-stream")];
        if let Some(a) = auth.as_deref() {
            h.push(("Authorization", a));
        }
        let r = http::send(
            &http::client(),
            Method::PUT,
            &put_url,
            &h,
            Some(data.to_vec()),
        )
        .await?;
        ensure!(
            r.status == StatusCode::CREATED,
            "finishing upload to {repo}: {} {:?}",
            r.status,
            r.body_text()
        );
        Ok(digest)
    }

    /// `HEAD /v2/<repo>/manifests/<reference>` with a containerd-like `Accept`.
    pub async fn head_manifest(&self, repo: &str, reference: &str) -> Result<Response> {
        self.request(
            Method::HEAD,
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Accept", http::MANIFEST_ACCEPT)],
            None,
        )
        .await
    }

    /// `GET /v2/<repo>/manifests/<reference>` (must be 200): returns (digest of body, body, content type).
    pub async fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<(String, Vec<u8>, String)> {
        let r = self
            .request(
                Method::GET,
                &format!("/v2/{repo}/manifests/{reference}"),
                &[("Accept", http::MANIFEST_ACCEPT)],
                None,
            )
            .await?;
        ensure!(
            r.status == StatusCode::OK,
            "GET manifest {repo}:{reference}: {} {:?}",
            r.status,
            r.body_text()
        );
        let ct = r.header("content-type").unwrap_or_default().to_string();
        Ok((sha256_digest(&r.body), r.body, ct))
    }

    /// Overwrites a blob's stored bytes in place with the same length, flipping every byte
    /// in the middle 4 KiB. Returns the original bytes for [`Registry::restore_blob`].
    pub fn corrupt_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let path = self.blob_data_path(digest);
        let orig = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        ensure!(!orig.is_empty(), "blob {digest} is empty");
        let mut bad = orig.clone();
        let mid = bad.len() / 2;
        let lo = mid.saturating_sub(2048);
        let hi = (mid + 2048).min(bad.len());
        for b in &mut bad[lo..hi] {
            *b = !*b;
        }
        std::fs::write(&path, &bad)?;
        Ok(orig)
    }

    /// Writes back the original bytes of a blob corrupted with [`Registry::corrupt_blob`].
    pub fn restore_blob(&self, digest: &str, original: &[u8]) -> Result<()> {
        std::fs::write(self.blob_data_path(digest), original)?;
        Ok(())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            util::kill_child(&mut c);
        }
        if std::thread::panicking() {
            eprintln!(
                "--- docker-registry {} log ---\n{}",
                self.addr(),
                self.log()
            );
        }
    }
}
