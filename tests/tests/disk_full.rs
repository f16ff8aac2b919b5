//! The disk under the store fills up mid-pull: `shoald` runs with a small
//! tmpfs as its data dir (in a mount namespace of its own), a file fills
//! that filesystem to a few MiB of free space, and a client pulls a blob
//! larger than that through it from a slow origin. The client still gets
//! every byte, verified (what it had from the partial file, then the rest
//! from the origin); a metric and a log line say why; nothing of the blob is
//! kept; the daemon keeps serving, and for a while passes new blobs through
//! without trying to store them.

use std::io::Write as _;
use std::time::Duration;

use shoal_tests::{fresh_seed, http, random_blob, Stack, MIB};

/// Fills the filesystem at `dir` with one file, then shrinks it so that
/// `leave` bytes are free. Returns the file's path.
fn fill(dir: &std::path::Path, leave: u64) -> std::path::PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0xA5u8; MIB];
    let mut len = 0u64;
    for _ in 0..4096 {
        match f.write_all(&block) {
            Ok(()) => len += MIB as u64,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(28), "filling: {e}");
                break;
            }
        }
    }
    drop(f);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len.saturating_sub(leave)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_up_mid_pull_loses_the_client_nothing() {
    let stack = Stack::start_with(Default::default(), |_, o| {
        o.data_tmpfs = Some(48 * MIB as u64);
        o.cache_max_bytes = Some(40 * MIB as u64);
    })
    .await
    .unwrap();
    let d = &stack.shoald;
    let size = 16 * MIB as u64;
    let (blob, digest) = random_blob(size as usize, fresh_seed());
    stack.push_blob("disk/full", &blob).await.unwrap();
    let filler = fill(&d.data_dir(), 6 * MIB as u64);
    eprintln!("injected: a filesystem of 48 MiB with 6 MiB free, a 16 MiB blob pulled from a 4 MiB/s origin");
    // A slow origin: the client is reading the partial file when it fails.
    stack.origin.proxy.set_rate(Some(4 * MIB as u64));
    let before = stack.origin.egress();
    let r = http::get_hashed(&http::client(), &stack.blob_url("disk/full", &digest), &[])
        .await
        .unwrap();
    r.expect_complete(&digest, size).unwrap();
    let failures = d
        .metric(
            "shoal_store_write_failures_total",
            &[("reason", "no_space")],
        )
        .await
        .unwrap();
    let logs = d.logs();
    eprintln!(
        "counted: {failures} store write failure(s), origin sent {} bytes for the {size}-byte blob",
        stack.origin.egress() - before
    );
    assert_eq!(failures, 1.0);
    assert!(
        logs.contains("writing to the store failed") && logs.contains("No space left on device"),
        "{logs}"
    );
    assert!(
        logs.contains("the reader continues from the origin"),
        "the client was not handed over mid-stream:\n{logs}"
    );
    // Nothing of the blob is kept: no partial, no complete file.
    let data = d.data_dir();
    let partials = std::fs::read_dir(data.join("partial")).unwrap().count();
    assert_eq!(partials, 0, "a partial was kept");
    assert_eq!(d.blob_store_bytes().unwrap(), 0, "blob files were kept");

    // For a while, new pulls pass through without trying the disk; the
    // daemon serves them all.
    stack.origin.proxy.set_rate(None);
    std::fs::remove_file(&filler).unwrap();
    let r = http::get_hashed(&http::client(), &stack.blob_url("disk/full", &digest), &[])
        .await
        .unwrap();
    r.expect_complete(&digest, size).unwrap();
    let refusals = d.metric("shoal_store_refusals_total", &[]).await.unwrap();
    assert_eq!(refusals, 1.0, "the second pull tried the disk again");
    let healthz = http::client()
        .get(format!("{}/healthz", d.ops_url()))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(healthz.status(), 200);
}
