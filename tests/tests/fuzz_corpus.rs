//! Replays every committed fuzz input — the seed corpora and the crashes
//! kept as regression cases (`fuzz/corpus/TARGET/`, `fuzz/regressions/TARGET/`)
//! — through the checks the libFuzzer targets run (`fuzz/src/lib.rs`,
//! included here as a module), so CI keeps them passing without a fuzzer.

#[allow(dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod checks;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let dir = root.join(dir).join(target);
        // No regression cases kept (yet) for this target.
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let path = e.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let caught = std::panic::catch_unwind(|| check(&data));
            assert!(caught.is_ok(), "{} fails its check", path.display());
            n += 1;
        }
    }
    // A seed corpus that went missing would make this test pass on nothing.
    assert!(n >= 5, "only {n} inputs for {target}");
}

#[test]
fn wire_inputs_pass() {
    replay("wire", checks::wire);
}

#[test]
fn tracker_api_inputs_pass() {
    replay("tracker_api", checks::tracker_api);
}

#[test]
fn reference_inputs_pass() {
    replay("reference", checks::reference);
}

#[test]
fn route_inputs_pass() {
    replay("route", checks::route_path);
}

/// The checks find what they are there to find: a tracker seed that
/// decodes into members, leases and hashes, not only refusals.
#[test]
fn the_tracker_seed_reaches_the_tracker() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/tracker_api");
    let text = std::fs::read_to_string(root.join("announce_lease_publish")).unwrap();
    let mut decoded = 0;
    for line in text.lines() {
        let body = line[1..].trim_start();
        let ok = match &line[..1] {
            "a" => serde_json::from_str::<shoal_proto::tracker_api::Announce>(body).is_ok(),
            "l" => serde_json::from_str::<shoal_proto::tracker_api::LeaseRequest>(body).is_ok(),
            "p" => serde_json::from_str::<shoal_proto::tracker_api::PublishHashes>(body).is_ok(),
            "r" => serde_json::from_str::<shoal_proto::tracker_api::Report>(body).is_ok(),
            _ => true,
        };
        assert!(ok, "{line}");
        decoded += 1;
    }
    assert_eq!(decoded, 7);
}
