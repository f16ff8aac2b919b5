//! The tracker under a steady load, bounded for CI: `tracker-bench` paces
//! announces and lookups (one each ≈ one layer pull) at two tracker
//! replicas sharing a real `redis-server`, kills one of them (`kill -9`)
//! halfway, and must see every request succeed. The ten-minute version at
//! 10,000 requests/s is a benchmark (`docs/BENCHMARKS.md`); this one runs
//! the debug build at a rate it sustains on a shared 2-core machine.

#![cfg(feature = "net")]

use std::process::Command;

#[test]
fn tracker_replicas_answer_every_request_through_the_loss_of_one() {
    let out = Command::new(env!("CARGO_BIN_EXE_tracker-bench"))
        .args(["--tracker-bin", env!("CARGO_BIN_EXE_shoal-tracker")])
        .args(["--connections", "16", "--depth", "4"])
        .args(["--rate", "1000", "--secs", "10"])
        .args(["--replicas", "2", "--kill-replica-after", "5"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "tracker-bench failed:\n{stdout}\n{stderr}"
    );
    let json: serde_json::Value = stdout
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON line in:\n{stdout}"));
    assert_eq!(json["errors"], 0, "{json}");
    assert_eq!(json["replicas"], 2, "{json}");
    assert!(stdout.contains("killed replica 1"), "{stdout}");
    // Paced at 1,000/s for 10 s: nearly all were sent and answered.
    let requests = json["requests"].as_u64().unwrap();
    assert!(
        requests >= 8_000,
        "only {requests} requests answered: {json}"
    );
    assert!(json["announces"].as_u64().unwrap() > 2_000, "{json}");
    assert!(json["lookups"].as_u64().unwrap() > 2_000, "{json}");
}
