//! Pushing test images with the real `skopeo`, and copying images out of a registry.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use tokio::process::Command;

use crate::image::TestImage;
use crate::registry::Registry;
use crate::util;

const SKOPEO_TIMEOUT: Duration = Duration::from_secs(60);

fn skopeo() -> Result<Command> {
    let bin = util::require_program("skopeo", "skopeo")?;
    let mut cmd = Command::new(bin);
    // No signature policy file is needed on a fresh machine.
    cmd.arg("--insecure-policy");
    // Never pick up credentials from the environment of whoever runs the tests.
    cmd.env("REGISTRY_AUTH_FILE", "/nonexistent/shoal-tests-auth.json")
        .env_remove("DOCKER_CONFIG");
    Ok(cmd)
}

/// `skopeo copy --all --preserve-digests oci:<dir>:<tag> docker://<addr>/<repo>:<tag>` over
/// plain HTTP, then checks that the registry serves the tag with the image's top digest.
pub async fn push(
    image_dir: &Path,
    tag: &str,
    registry_addr: &str,
    repo: &str,
    creds: Option<(&str, &str)>,
) -> Result<()> {
    let mut cmd = skopeo()?;
    cmd.args([
        "copy",
        "--all",
        "--preserve-digests",
        "--retry-times",
        "2",
        "--dest-tls-verify=false",
    ]);
    match creds {
        Some((u, p)) => {
            cmd.arg("--dest-creds").arg(format!("{u}:{p}"));
        }
        None => {
            cmd.arg("--dest-no-creds");
        }
    }
    cmd.arg(format!("oci:{}:{tag}", image_dir.display()));
    cmd.arg(format!("docker://{registry_addr}/{repo}:{tag}"));
    util::run_command(cmd, SKOPEO_TIMEOUT)
        .await
        .context("skopeo push")?;
    Ok(())
}

/// Pushes a [`TestImage`] to `repo:<image.tag>` of a [`Registry`] (with its credentials,
/// if it has auth) and verifies every manifest digest at the registry.
pub async fn push_image(image: &TestImage, registry: &Registry, repo: &str) -> Result<()> {
    push(
        image.dir(),
        &image.tag,
        &registry.addr(),
        repo,
        registry.creds(),
    )
    .await?;
    let (top, _, ct) = registry.get_manifest(repo, &image.tag).await?;
    ensure!(
        top == image.top_digest(),
        "registry serves {repo}:{} as {top}, expected {}",
        image.tag,
        image.top_digest()
    );
    ensure!(
        ct == image.top_media_type(),
        "registry serves {repo}:{} with Content-Type {ct}",
        image.tag
    );
    for p in &image.platforms {
        let (d, _, _) = registry.get_manifest(repo, &p.manifest_digest).await?;
        ensure!(
            d == p.manifest_digest,
            "manifest {} came back as {d}",
            p.manifest_digest
        );
    }
    Ok(())
}

/// `skopeo copy --all --preserve-digests docker://<src> oci:<dest_dir>:<tag>` from a
/// plain-HTTP registry (such as shoald's registry endpoint).
pub async fn copy_to_oci_dir(
    src: &str,
    dest_dir: &Path,
    tag: &str,
    creds: Option<(&str, &str)>,
) -> Result<()> {
    let mut cmd = skopeo()?;
    cmd.args([
        "copy",
        "--all",
        "--preserve-digests",
        "--src-tls-verify=false",
    ]);
    match creds {
        Some((u, p)) => {
            cmd.arg("--src-creds").arg(format!("{u}:{p}"));
        }
        None => {
            cmd.arg("--src-no-creds");
        }
    }
    cmd.arg(format!("docker://{src}"));
    cmd.arg(format!("oci:{}:{tag}", dest_dir.display()));
    util::run_command(cmd, SKOPEO_TIMEOUT)
        .await
        .context("skopeo copy from registry")?;
    Ok(())
}

/// Checks that an OCI layout directory written by skopeo holds exactly the test image:
/// the tag points at the same top digest, and every blob is present with its digest.
pub fn verify_oci_dir(dir: &Path, image: &TestImage) -> Result<()> {
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json"))?)?;
    let entry = index["manifests"]
        .as_array()
        .and_then(|m| {
            m.iter().find(|e| {
                e["annotations"]["org.opencontainers.image.ref.name"].as_str()
                    == Some(image.tag.as_str())
            })
        })
        .with_context(|| format!("no entry tagged {} in {index}", image.tag))?;
    ensure!(
        entry["digest"].as_str() == Some(image.top_digest()),
        "copied image's top digest {} != {}",
        entry["digest"],
        image.top_digest()
    );
    for d in image.all_digests() {
        let p = dir.join("blobs/sha256").join(util::digest_hex(&d));
        let got =
            util::sha256_file_hex(&p).with_context(|| format!("blob {d} missing from the copy"))?;
        ensure!(
            format!("sha256:{got}") == d,
            "blob file for {d} has digest sha256:{got}"
        );
    }
    Ok(())
}
