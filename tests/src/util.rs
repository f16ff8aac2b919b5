//! Small helpers shared by the harness: ports, bounded waits, commands, hashing.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest as _, Sha256};

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 to find a free port")?;
    Ok(l.local_addr()?.port())
}

/// A UDP port on 127.0.0.1 that was free a moment ago (for QUIC).
pub fn free_udp_port() -> Result<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0")
        .context("binding UDP 127.0.0.1:0 to find a free port")?;
    Ok(s.local_addr()?.port())
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Hex SHA-256 of a file's content.
pub fn sha256_file_hex(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The hex part of `sha256:<hex>` (or the input if it has no algorithm prefix).
pub fn digest_hex(digest: &str) -> &str {
    digest.split_once(':').map(|(_, h)| h).unwrap_or(digest)
}

/// Deterministic, incompressible pseudo-random bytes (splitmix64).
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed ^ 0x5348_4f41_4c5f_7465; // "SHOAL_te"
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Polls `f` every `every` until it returns `Ok(Some(v))`. `Ok(None)` means "not yet";
/// `Err` is fatal and returned at once. Fails after `timeout`.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => return Err(e.context(format!("while waiting for {what}"))),
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Finds an executable in `PATH` (or the absolute path itself).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.is_file().then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
                .iter()
                .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|c| c.is_file())
}

/// Like [`find_program`] but fails with a message telling how to install it.
pub fn require_program(name: &str, debian_package: &str) -> Result<PathBuf> {
    find_program(name).ok_or_else(|| {
        anyhow!(
            "required program `{name}` not found in PATH: install the Debian package \
             `{debian_package}` (`apt-get install -y {debian_package}`, or run scripts/test.sh \
             which installs it)"
        )
    })
}

/// Runs a command to completion with a time bound, capturing its output.
/// Fails (with stdout and stderr in the message) if it times out or exits non-zero.
pub async fn run_command(mut cmd: tokio::process::Command, timeout: Duration) -> Result<Output> {
    let desc = format!("{:?}", cmd.as_std());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().with_context(|| format!("spawning {desc}"))?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(r) => r.with_context(|| format!("waiting for {desc}"))?,
        Err(_) => bail!("{desc} did not finish within {timeout:?} (killed)"),
    };
    if !out.status.success() {
        bail!(
            "{desc} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Kills a child process (SIGKILL) and reaps it; ignores "already exited".
pub fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Sum of the sizes of all regular files below `dir` (0 if it does not exist).
pub fn dir_regular_file_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for (_, meta) in walk_files(dir)? {
        total += meta.len();
    }
    Ok(total)
}

/// All regular files below `dir` (recursively, not following symlinks), with metadata.
pub fn walk_files(dir: &Path) -> Result<Vec<(PathBuf, std::fs::Metadata)>> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            // Files can vanish under a running daemon (eviction, temp files).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading dir {}", d.display())),
        };
        for entry in rd {
            let entry = match entry {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            let meta = match std::fs::symlink_metadata(entry.path()) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                out.push((entry.path(), meta));
            }
        }
    }
    Ok(out)
}

/// Reads a log file for printing, keeping only its last `max` bytes.
pub fn tail_file(path: &Path, max: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => {
            let start = b.len().saturating_sub(max);
            let prefix = if start > 0 { "[...]\n" } else { "" };
            format!("{prefix}{}", String::from_utf8_lossy(&b[start..]))
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}
