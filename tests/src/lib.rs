//! Black-box test harness for Shoal, built from real components:
//!
//! - [`Registry`]: the CNCF distribution `docker-registry` as the origin (optionally with
//!   htpasswd Basic auth), with access to its on-disk blobs so tests can corrupt them;
//! - [`ThrottleProxy`]: a TCP forwarder that counts (and can rate-limit) origin egress;
//! - [`TestImage`]: generated OCI image layouts (multi-arch or single), uncompressed tar layers;
//! - [`skopeo`]: pushing images to, and copying images out of, registries;
//! - [`Shoald`]: the daemon under test as a child process, with metrics and kill/restart;
//! - [`Containerd`]: a real containerd with its own root, pulling through `ctr`;
//! - [`metrics`] and [`http`]: Prometheus text parsing and a small HTTP client.
//!
//! Every wait is bounded; every process is killed when its handle is dropped.

pub mod cluster;
pub mod containerd;
pub mod fixture;
pub mod http;
pub mod image;
pub mod metrics;
pub mod proxy;
pub mod registry;
pub mod shoald;
pub mod skopeo;
pub mod util;

pub use containerd::{Containerd, HostsDir};
pub use fixture::{Origin, Stack};
pub use image::TestImage;
pub use proxy::ThrottleProxy;
pub use registry::{Registry, RegistryOpts};
pub use shoald::{Shoald, ShoaldOpts};

/// 1 MiB.
pub const MIB: usize = 1 << 20;

/// Incompressible bytes and their digest, for blob-level tests.
pub fn random_blob(size: usize, seed: u64) -> (Vec<u8>, String) {
    let data = util::pseudo_random_bytes(size, seed);
    let digest = util::sha256_digest(&data);
    (data, digest)
}

/// A unique-ish seed per call, so parallel tests never share content by accident
/// (a digest is the same everywhere, which would hide origin fetches).
pub fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 40)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9)
}

/// A registry holding one test image pushed (with skopeo) under `repo:<image.tag>`.
pub async fn registry_with_image(
    opts: RegistryOpts,
    image: &TestImage,
    repo: &str,
) -> anyhow::Result<Registry> {
    let registry = Registry::start_with(opts).await?;
    skopeo::push_image(image, &registry, repo).await?;
    Ok(registry)
}

/// Writes a docker `config.json` into `dir` and returns its path.
pub fn write_docker_config(
    dir: &std::path::Path,
    config: &serde_json::Value,
) -> anyhow::Result<std::path::PathBuf> {
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_vec_pretty(config)?)?;
    Ok(p)
}
