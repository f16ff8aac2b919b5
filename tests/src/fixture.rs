//! Ready-made setups shared by the integration tests.

use anyhow::Result;

use crate::proxy::ThrottleProxy;
use crate::registry::{Registry, RegistryOpts};
use crate::shoald::{Shoald, ShoaldOpts};

/// The origin as shoald sees it: a `docker-registry` behind a [`ThrottleProxy`] that counts
/// origin egress. The proxy's address is the upstream's name (`ns=` value, image ref host).
pub struct Origin {
    pub registry: Registry,
    pub proxy: ThrottleProxy,
}

impl Origin {
    pub async fn start() -> Result<Origin> {
        Self::start_with(RegistryOpts::default()).await
    }

    pub async fn start_with(opts: RegistryOpts) -> Result<Origin> {
        let registry = Registry::start_with(opts).await?;
        let proxy = ThrottleProxy::start(&registry.addr())?;
        Ok(Origin { registry, proxy })
    }

    /// `127.0.0.1:PORT` of the proxy: the upstream name to give shoald and clients.
    pub fn addr(&self) -> String {
        self.proxy.addr()
    }

    /// Bytes the origin has sent through the proxy so far (bodies and headers).
    pub fn egress(&self) -> u64 {
        self.proxy.bytes_down()
    }

    /// Pushes a random blob of each size to `repo`: the layers of a cold
    /// image, as `(bytes, digest)`.
    pub async fn push_random_layers(
        &self,
        repo: &str,
        sizes: &[usize],
    ) -> Result<Vec<(Vec<u8>, String)>> {
        let mut out = Vec::new();
        for &s in sizes {
            let (blob, digest) = crate::random_blob(s, crate::fresh_seed());
            self.registry.push_blob(repo, &blob).await?;
            out.push((blob, digest));
        }
        Ok(out)
    }
}

/// Every member GETs every blob of `repo` at once, each checked whole
/// against its digest when its task is awaited (errors name the member and
/// the blob).
pub fn pull_all_at_once(
    members: &[Shoald],
    repo: &str,
    blobs: &[(Vec<u8>, String)],
) -> Vec<tokio::task::JoinHandle<Result<()>>> {
    let mut pulls = Vec::new();
    for n in members {
        for (blob, digest) in blobs {
            let url = format!("{}/v2/{repo}/blobs/{digest}", n.registry_url());
            let (digest, size, who) = (digest.clone(), blob.len() as u64, n.registry_url());
            pulls.push(tokio::spawn(async move {
                let r = crate::http::get_hashed(&crate::http::client(), &url, &[]).await?;
                r.expect_complete(&digest, size)
                    .map_err(|e| e.context(format!("member at {who}: {digest}")))
            }));
        }
    }
    pulls
}

/// An [`Origin`] and a `shoald` allowed to fetch from it over plain HTTP, with the origin as
/// its default upstream.
pub struct Stack {
    pub origin: Origin,
    pub shoald: Shoald,
}

impl Stack {
    pub async fn start() -> Result<Stack> {
        Self::start_with(RegistryOpts::default(), |_, _| {}).await
    }

    /// Starts the origin, then shoald with [`ShoaldOpts::insecure_default`] for it, adjusted by `f`.
    pub async fn start_with(
        reg: RegistryOpts,
        f: impl FnOnce(&Origin, &mut ShoaldOpts),
    ) -> Result<Stack> {
        let origin = Origin::start_with(reg).await?;
        let mut opts = ShoaldOpts::insecure_default(&origin.addr());
        f(&origin, &mut opts);
        let shoald = Shoald::start(opts).await?;
        Ok(Stack { origin, shoald })
    }

    /// `ns=` query value naming the origin, percent-encoded as containerd sends it.
    pub fn ns(&self) -> String {
        encode_ns(&self.origin.addr())
    }

    /// A shoald URL for `path` (starting with `/v2/`) with `?ns=<origin>` appended.
    pub fn url(&self, path: &str) -> String {
        let sep = if path.contains('?') { '&' } else { '?' };
        format!("{}{path}{sep}ns={}", self.shoald.registry_url(), self.ns())
    }

    /// `GET /v2/<repo>/blobs/<digest>?ns=<origin>` on shoald.
    pub fn blob_url(&self, repo: &str, digest: &str) -> String {
        self.url(&format!("/v2/{repo}/blobs/{digest}"))
    }

    /// `/v2/<repo>/manifests/<reference>?ns=<origin>` on shoald.
    pub fn manifest_url(&self, repo: &str, reference: &str) -> String {
        self.url(&format!("/v2/{repo}/manifests/{reference}"))
    }

    /// Pushes a blob to the origin registry (not through the proxy).
    pub async fn push_blob(&self, repo: &str, data: &[u8]) -> Result<String> {
        self.origin.registry.push_blob(repo, data).await
    }
}

/// Percent-encodes `:` as containerd does in `ns=127.0.0.1%3A5000`.
pub fn encode_ns(host: &str) -> String {
    host.replace('%', "%25").replace(':', "%3A")
}
