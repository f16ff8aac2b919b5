//! What each fuzz target checks. The libFuzzer targets in `fuzz_targets/`
//! call these, and the corpus regression test
//! (`tests/tests/fuzz_corpus.rs`) runs every committed input and every
//! crash kept as a regression case through the same functions, so CI
//! replays them without a fuzzer.
//!
//! Each check panics only on a real defect: a decoder that panics, accepts
//! what it cannot encode again, or answers differently for the same bytes
//! sliced differently; a tracker whose state breaks its invariants; an
//! error body that is not bounded JSON.

use std::collections::HashSet;
use std::str::FromStr;

use bytes::BytesMut;
use shoal_proto::error::OciError;
use shoal_proto::range::parse_range;
use shoal_proto::reference::{ImageRef, Reference, RepoName, Tag};
use shoal_proto::tracker_api::{Announce, LeaseRequest, NodeId, PublishHashes, Report};
use shoal_proto::wire::{Decoder, Frame, Request, Response, WireError, MAX_FRAME_LEN};
use shoal_proto::Digest;
use shoal_registry_shim::serve::{route, UpstreamPolicy};
use shoal_tracker::{Tracker, TrackerConfig};

/// The peer wire codec. The first byte says how the rest is sliced (1 to
/// 256 bytes per push); the rest is a stream, decoded both as a client's
/// request stream and as a server's response stream. Every frame decoded
/// encodes again to a frame that decodes to the same value, and slicing
/// the stream differently (here: all at once) gives the same frames and
/// the same error.
pub fn wire(data: &[u8]) {
    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(step) + 1;
    let sliced = decode_all::<Request>(stream, step, |d| d.next_request());
    let whole = decode_all::<Request>(stream, stream.len().max(1), |d| d.next_request());
    assert_eq!(sliced, whole, "request frames depend on slicing");
    for r in sliced.0 {
        let mut buf = BytesMut::new();
        r.encode(&mut buf).expect("a decoded request encodes");
        let again = decode_all::<Request>(&buf, buf.len(), |d| d.next_request());
        assert_eq!(again, (vec![r], None), "request round trip");
    }
    let sliced = decode_all::<Response>(stream, step, |d| d.next_response());
    let whole = decode_all::<Response>(stream, stream.len().max(1), |d| d.next_response());
    assert_eq!(sliced, whole, "response frames depend on slicing");
    for r in sliced.0 {
        let mut buf = BytesMut::new();
        r.encode(&mut buf).expect("a decoded response encodes");
        assert!(buf.len() <= MAX_FRAME_LEN);
        let again = decode_all::<Response>(&buf, buf.len(), |d| d.next_response());
        assert_eq!(again, (vec![r], None), "response round trip");
    }
}

type Decoded<F> = (Vec<F>, Option<String>);

/// Every frame of `stream` pushed `step` bytes at a time, and the error
/// that ended it (or the truncation at its end), as text.
fn decode_all<F: Frame>(
    stream: &[u8],
    step: usize,
    next: impl Fn(&mut Decoder<F>) -> Result<Option<F>, WireError>,
) -> Decoded<F> {
    let mut dec = Decoder::<F>::new();
    let mut frames = Vec::new();
    let mut at = 0;
    // Each round either takes bytes or takes a frame, or the stream ends.
    loop {
        match next(&mut dec) {
            Ok(Some(f)) => {
                frames.push(f);
                continue;
            }
            Ok(None) => {}
            Err(e) => return (frames, Some(e.to_string())),
        }
        if at == stream.len() {
            break;
        }
        let end = (at + step).min(stream.len());
        let taken = dec.push(&stream[at..end]);
        assert!(taken <= end - at);
        at += taken;
        if taken == 0 {
            // Nothing taken: a frame is ready or the stream is broken,
            // which the next round reports.
            match next(&mut dec) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => unreachable!("a decoder that takes nothing has a frame or an error"),
                Err(e) => return (frames, Some(e.to_string())),
            }
        }
    }
    (frames, dec.finish().err().map(|e| e.to_string()))
}

/// The tracker API: lines of `KIND JSON` (`a` announce, `l` lease, `p`
/// publish hashes, `r` report, `k` lookup as `NODE DIGEST`), applied in
/// order to one tracker, 100 ms apart. Bodies decode (and validate) or are
/// refused with an error, never a panic; what decodes serializes to JSON
/// that decodes to the same value; the tracker's invariants hold after
/// every request, whatever it answered.
pub fn tracker_api(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cfg = TrackerConfig {
        max_members: 64,
        max_blobs: 64,
        max_blobs_per_member: 16,
        ..TrackerConfig::default()
    };
    let mut t = Tracker::new(cfg).expect("a valid config");
    for (k, line) in text.lines().take(256).enumerate() {
        let now = 1_000 + 100 * k as u64;
        let Some(kind) = line.chars().next() else {
            continue;
        };
        let body = line[kind.len_utf8()..].trim_start();
        match kind {
            'a' => {
                if let Some(a) = decoded::<Announce>(body) {
                    let _ = t.announce(now, a);
                }
            }
            'l' => {
                if let Some(r) = decoded::<LeaseRequest>(body) {
                    let _ = t.lease(now, r);
                }
            }
            'p' => {
                if let Some(p) = decoded::<PublishHashes>(body) {
                    let _ = t.publish_hashes(now, p);
                }
            }
            'r' => {
                if let Some(r) = decoded::<Report>(body) {
                    let _ = t.report(now, r);
                }
            }
            'k' => {
                let mut parts = body.split(' ');
                let node = parts.next().and_then(|n| NodeId::from_str(n).ok());
                let blob = parts.next().and_then(|d| Digest::from_str(d).ok());
                if let (Some(node), Some(blob)) = (node, blob) {
                    let _ = t.lookup(now, &node, &blob);
                }
            }
            _ => {}
        }
        if let Err(e) = t.check_invariants() {
            panic!("after line {k} ({line:?}): {e}");
        }
    }
}

/// `body` decoded as a `T`, checked to survive a JSON round trip.
fn decoded<T>(body: &str) -> Option<T>
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let v: T = serde_json::from_str(body).ok()?;
    let json = serde_json::to_string(&v).expect("a decoded value serializes");
    let again: T =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json} does not decode again: {e}"));
    assert_eq!(again, v, "JSON round trip");
    Some(v)
}

/// References, digests and ranges: the first line is parsed as an image
/// reference, a repository name, a tag, a reference and a digest; each
/// accepted one prints to text that parses to the same value. The second
/// line is a `Range` header, resolved against the size in the third: an
/// accepted range lies within the size.
pub fn reference(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let first = lines.next().unwrap_or("");
    round_trip::<ImageRef>(first);
    round_trip::<RepoName>(first);
    round_trip::<Tag>(first);
    round_trip::<Reference>(first);
    round_trip::<Digest>(first);
    let header = lines.next().unwrap_or("");
    let size = lines
        .next()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    if let Ok(r) = parse_range(header, size) {
        assert!(
            r.start <= r.end && r.end < size,
            "{r:?} outside {size} bytes for {header:?}"
        );
    }
}

fn round_trip<T>(s: &str)
where
    T: FromStr + std::fmt::Display + PartialEq + std::fmt::Debug,
{
    if let Ok(v) = s.parse::<T>() {
        let text = v.to_string();
        let again = text
            .parse::<T>()
            .unwrap_or_else(|_| panic!("{s:?} parsed, but its text {text:?} does not"));
        assert_eq!(again, v, "{s:?} → {text:?}");
    }
}

/// The registry path router: the first line is a method, the rest a
/// request target. Whatever it is, the router routes it or refuses it with
/// an OCI error whose JSON body parses and stays small.
pub fn route_path(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (method, target) = text.split_once('\n').unwrap_or(("GET", text));
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let Ok(uri) = http::Uri::try_from(target) else {
        return;
    };
    let policies = [
        UpstreamPolicy {
            default: "registry-1.docker.io".into(),
            allowed: None,
        },
        UpstreamPolicy {
            default: "origin.example:5000".into(),
            allowed: Some(HashSet::from(["origin.example:5000".to_string()])),
        },
    ];
    for policy in &policies {
        if let Err(e) = route(&method, &uri, policy) {
            error_body(&e);
        }
    }
}

fn error_body(e: &OciError) {
    let body = e.to_json();
    assert!(
        body.len() <= 8 << 10,
        "an error body of {} bytes",
        body.len()
    );
    let v: serde_json::Value = serde_json::from_str(&body).expect("error bodies are JSON");
    assert!(v["errors"][0]["code"].is_string(), "{body}");
}
