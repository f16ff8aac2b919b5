//! `hash-bench`: Shoal's SHA-256 verification against raw `sha2`, in the
//! same run, on one core.
//!
//! Over one in-memory blob of random bytes, in interleaved rounds:
//!
//! - **raw**: `sha2::Sha256` over the whole blob, one pass (the ceiling);
//! - **receive**: what a member does with every chunk it gets from a peer:
//!   [`ChunkHashes::verify`] against the chunk's published hash, then the
//!   blob's [`Sha256Verifier`] (the digest check before the last bytes
//!   reach a client) — two passes over every byte;
//! - **origin**: what the member fetching a chunk run from the origin does:
//!   [`ChunkHasher`] (each chunk's hash to publish, plus the blob digest).
//!
//! Prints the median GB/s of each and its ratio to raw, and one JSON line.
//!
//! ```sh
//! cargo build --release -p shoal-daemon --bin hash-bench
//! target/release/hash-bench --mib 256 --rounds 5
//! ```

use std::hint::black_box;
use std::time::Instant;

use anyhow::ensure;
use clap::Parser;
use sha2::{Digest as _, Sha256};
use shoal_proto::{ChunkHasher, ChunkHashes, ChunkLayout, Digest, Sha256Verifier};

/// Shoal's SHA-256 verification paths against raw sha2.
#[derive(Debug, Parser)]
#[command(name = "hash-bench")]
struct Args {
    /// Blob size in MiB.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// Rounds (each measures every path once); medians are reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Chunk size in KiB.
    #[arg(long, default_value_t = 256)]
    chunk_kib: u32,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.mib >= 1 && args.rounds >= 1,
        "--mib and --rounds must be at least 1"
    );
    let size = args.mib << 20;
    // Incompressible, cheap to make: xorshift words.
    let mut data = vec![0u8; size as usize];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for w in data.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    let layout = ChunkLayout::new(size, args.chunk_kib << 10)?;
    let (hashes, digest) = ChunkHashes::of_blob(layout, &data)?;
    ensure!(
        Digest::of(&data) == digest,
        "ChunkHashes::of_blob digest differs"
    );

    let gbs = |secs: f64| size as f64 / secs / 1e9;
    let (mut raw, mut recv, mut origin) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        let t = Instant::now();
        black_box(Sha256::digest(black_box(&data)));
        raw.push(gbs(t.elapsed().as_secs_f64()));

        let t = Instant::now();
        let mut v = Sha256Verifier::new(digest);
        for i in 0..layout.count() {
            let (off, len) = layout.range(i).expect("chunk in range");
            let chunk = &data[off as usize..off as usize + len as usize];
            hashes.verify(i, black_box(chunk))?;
            v.update(chunk);
        }
        ensure!(v.finish().is_ok(), "blob digest did not verify");
        recv.push(gbs(t.elapsed().as_secs_f64()));

        let t = Instant::now();
        let mut h = ChunkHasher::new(layout);
        let mut n = 0u32;
        h.update(black_box(&data), |_, hash| {
            black_box(hash);
            n += 1;
        })?;
        ensure!(
            h.finish()? == digest && n == layout.count(),
            "ChunkHasher disagrees"
        );
        origin.push(gbs(t.elapsed().as_secs_f64()));
    }
    let (raw, recv, origin) = (median(&mut raw), median(&mut recv), median(&mut origin));
    println!(
        "hash-bench: {} MiB blob, {} KiB chunks, {} rounds (medians, one core)",
        args.mib, args.chunk_kib, args.rounds
    );
    println!("  raw sha2, one pass      {raw:6.2} GB/s");
    println!(
        "  receive (chunk + blob)  {recv:6.2} GB/s  {:.2}x raw",
        recv / raw
    );
    println!(
        "  origin (ChunkHasher)    {origin:6.2} GB/s  {:.2}x raw",
        origin / raw
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "hash",
            "mib": args.mib,
            "chunk_kib": args.chunk_kib,
            "rounds": args.rounds,
            "raw_gbps": raw,
            "receive_gbps": recv,
            "origin_gbps": origin,
            "receive_ratio": recv / raw,
            "origin_ratio": origin / raw,
        })
    );
    Ok(())
}
