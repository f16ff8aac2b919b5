//! `TestImage`: generated OCI image layouts with incompressible, uncompressed tar layers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use serde_json::json;
use tempfile::TempDir;

use crate::util::{self, pseudo_random_bytes, sha256_digest, sha256_hex};

pub const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// A regular file inside a layer.
#[derive(Debug, Clone)]
pub struct LayerFile {
    /// Path inside the image's root filesystem, without a leading `/`.
    pub path: String,
    pub size: u64,
    /// Hex SHA-256 of the file's content.
    pub sha256: String,
}

/// One layer blob (an uncompressed tar, so its digest is also its diff_id).
#[derive(Debug, Clone)]
pub struct Layer {
    pub digest: String,
    pub size: u64,
    pub files: Vec<LayerFile>,
}

/// One platform's manifest, config and layers.
#[derive(Debug, Clone)]
pub struct PlatformImage {
    pub os: String,
    pub architecture: String,
    pub manifest_digest: String,
    pub manifest_size: u64,
    pub config_digest: String,
    pub config_size: u64,
    pub layers: Vec<Layer>,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Bytes of file content in each layer (the tar adds headers around them).
    pub layer_sizes: Vec<usize>,
    pub seed: u64,
    /// linux/amd64 + linux/arm64 under an OCI image index; otherwise one linux/amd64 manifest.
    pub multi_arch: bool,
    /// The tag recorded as `org.opencontainers.image.ref.name`.
    pub tag: String,
}

/// A generated OCI image layout directory (deleted on drop).
pub struct TestImage {
    dir: TempDir,
    pub tag: String,
    /// (digest, size) of the image index, for multi-arch images.
    pub index: Option<(String, u64)>,
    pub platforms: Vec<PlatformImage>,
}

impl TestImage {
    /// A multi-arch image (linux/amd64 and linux/arm64, with different layers of these sizes),
    /// tagged `latest`.
    pub fn generate(layer_sizes: &[usize], seed: u64) -> Result<TestImage> {
        Self::generate_with(ImageSpec {
            layer_sizes: layer_sizes.to_vec(),
            seed,
            multi_arch: true,
            tag: "latest".into(),
        })
    }

    /// A single-platform (linux/amd64) image with no index, tagged `latest`.
    pub fn generate_single(layer_sizes: &[usize], seed: u64) -> Result<TestImage> {
        Self::generate_with(ImageSpec {
            layer_sizes: layer_sizes.to_vec(),
            seed,
            multi_arch: false,
            tag: "latest".into(),
        })
    }

    pub fn generate_with(spec: ImageSpec) -> Result<TestImage> {
        let dir = tempfile::Builder::new().prefix("shoal-image-").tempdir()?;
        let blobs = dir.path().join("blobs/sha256");
        std::fs::create_dir_all(&blobs)?;
        std::fs::write(
            dir.path().join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        let write_blob = |data: &[u8]| -> Result<(String, u64)> {
            let digest = sha256_digest(data);
            std::fs::write(blobs.join(util::digest_hex(&digest)), data)?;
            Ok((digest, data.len() as u64))
        };
        let archs: &[&str] = if spec.multi_arch {
            &["amd64", "arm64"]
        } else {
            &["amd64"]
        };
        let mut platforms = Vec::new();
        for (pi, arch) in archs.iter().enumerate() {
            let mut layers = Vec::new();
            for (li, &size) in spec.layer_sizes.iter().enumerate() {
                let seed = spec
                    .seed
                    .wrapping_mul(1_000_003)
                    .wrapping_add((pi as u64) << 32 | li as u64);
                let (tar, files) = make_layer_tar(arch, li, size, seed)?;
                let (digest, size) = write_blob(&tar)?;
                layers.push(Layer {
                    digest,
                    size,
                    files,
                });
            }
            let config = json!({
                "created": "2024-01-01T00:00:00Z",
                "architecture": arch,
                "os": "linux",
                "config": { "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["/bin/true"] },
                "rootfs": {
                    "type": "layers",
                    "diff_ids": layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>(),
                },
                "history": layers.iter().enumerate().map(|(i, _)| json!({
                    "created": "2024-01-01T00:00:00Z",
                    "created_by": format!("shoal-tests layer {i} seed {}", spec.seed),
                })).collect::<Vec<_>>(),
            });
            let (config_digest, config_size) = write_blob(&serde_json::to_vec(&config)?)?;
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": MT_MANIFEST,
                "config": { "mediaType": MT_CONFIG, "digest": config_digest, "size": config_size },
                "layers": layers.iter().map(|l| json!({
                    "mediaType": MT_LAYER_TAR, "digest": l.digest, "size": l.size,
                })).collect::<Vec<_>>(),
            });
            let (manifest_digest, manifest_size) = write_blob(&serde_json::to_vec(&manifest)?)?;
            platforms.push(PlatformImage {
                os: "linux".into(),
                architecture: arch.to_string(),
                manifest_digest,
                manifest_size,
                config_digest,
                config_size,
                layers,
            });
        }
        let ref_annotation = json!({ "org.opencontainers.image.ref.name": spec.tag });
        let (top, index) = if spec.multi_arch {
            let index = json!({
                "schemaVersion": 2,
                "mediaType": MT_INDEX,
                "manifests": platforms.iter().map(|p| json!({
                    "mediaType": MT_MANIFEST,
                    "digest": p.manifest_digest,
                    "size": p.manifest_size,
                    "platform": { "architecture": p.architecture, "os": p.os },
                })).collect::<Vec<_>>(),
            });
            let (d, s) = write_blob(&serde_json::to_vec(&index)?)?;
            (
                json!({ "mediaType": MT_INDEX, "digest": d, "size": s, "annotations": ref_annotation }),
                Some((d, s)),
            )
        } else {
            let p = &platforms[0];
            (
                json!({
                    "mediaType": MT_MANIFEST,
                    "digest": p.manifest_digest,
                    "size": p.manifest_size,
                    "annotations": ref_annotation,
                    "platform": { "architecture": p.architecture, "os": p.os },
                }),
                None,
            )
        };
        let layout_index = json!({ "schemaVersion": 2, "manifests": [top] });
        std::fs::write(
            dir.path().join("index.json"),
            serde_json::to_vec(&layout_index)?,
        )?;
        Ok(TestImage {
            dir,
            tag: spec.tag,
            index,
            platforms,
        })
    }

    /// The layout directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the tag points at: the index digest, or the single manifest's digest.
    pub fn top_digest(&self) -> &str {
        match &self.index {
            Some((d, _)) => d,
            None => &self.platforms[0].manifest_digest,
        }
    }

    /// Media type of what the tag points at.
    pub fn top_media_type(&self) -> &'static str {
        if self.index.is_some() {
            MT_INDEX
        } else {
            MT_MANIFEST
        }
    }

    /// The platform image for an architecture (`amd64`, `arm64`).
    pub fn platform(&self, arch: &str) -> &PlatformImage {
        self.platforms
            .iter()
            .find(|p| p.architecture == arch)
            .unwrap_or_else(|| panic!("test image has no {arch} platform"))
    }

    /// Every layer of every platform.
    pub fn all_layers(&self) -> Vec<&Layer> {
        self.platforms
            .iter()
            .flat_map(|p| p.layers.iter())
            .collect()
    }

    /// Digests of every blob: index, manifests, configs, layers.
    pub fn all_digests(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some((d, _)) = &self.index {
            out.push(d.clone());
        }
        for p in &self.platforms {
            out.push(p.manifest_digest.clone());
            out.push(p.config_digest.clone());
            out.extend(p.layers.iter().map(|l| l.digest.clone()));
        }
        out
    }

    /// Path of a blob in the layout.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir
            .path()
            .join("blobs/sha256")
            .join(util::digest_hex(digest))
    }

    /// A blob's bytes.
    pub fn blob(&self, digest: &str) -> Result<Vec<u8>> {
        std::fs::read(self.blob_path(digest))
            .with_context(|| format!("blob {digest} not in the test image"))
    }

    /// Path → hex SHA-256 of every regular file the given architectures' layers hold
    /// (`None`: all platforms). Paths are unique across layers and platforms.
    pub fn expected_files(&self, archs: Option<&[&str]>) -> BTreeMap<String, String> {
        self.platforms
            .iter()
            .filter(|p| archs.is_none_or(|a| a.contains(&p.architecture.as_str())))
            .flat_map(|p| p.layers.iter())
            .flat_map(|l| l.files.iter())
            .map(|f| (f.path.clone(), f.sha256.clone()))
            .collect()
    }

    /// Total bytes of all layers of the given architecture.
    pub fn layer_bytes(&self, arch: &str) -> u64 {
        self.platform(arch).layers.iter().map(|l| l.size).sum()
    }
}

/// An uncompressed tar with one or two regular files (`content_size` bytes in total) under
/// `shoal/<arch>/l<index>/`.
fn make_layer_tar(
    arch: &str,
    index: usize,
    content_size: usize,
    seed: u64,
) -> Result<(Vec<u8>, Vec<LayerFile>)> {
    let mut b = tar::Builder::new(Vec::with_capacity(content_size + 8192));
    let base = format!("shoal/{arch}/l{index}");
    for d in ["shoal".to_string(), format!("shoal/{arch}"), base.clone()] {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_path(format!("{d}/"))?;
        h.set_mode(0o755);
        h.set_size(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append(&h, std::io::empty())?;
    }
    let split = if content_size >= 2 {
        vec![content_size * 2 / 3, content_size - content_size * 2 / 3]
    } else {
        vec![content_size]
    };
    let mut files = Vec::new();
    for (fi, size) in split.into_iter().enumerate() {
        let data = pseudo_random_bytes(size, seed.wrapping_mul(31).wrapping_add(fi as u64));
        let path = format!("{base}/{}.bin", ["a", "b"][fi]);
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_path(&path)?;
        h.set_mode(0o644);
        h.set_size(size as u64);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append(&h, data.as_slice())?;
        files.push(LayerFile {
            path,
            size: size as u64,
            sha256: sha256_hex(&data),
        });
    }
    let tar = b.into_inner().map_err(|e| anyhow!("finishing tar: {e}"))?;
    Ok((tar, files))
}
