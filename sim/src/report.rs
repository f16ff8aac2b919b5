//! What a run measured: time to all against the Kumar–Ross bound, origin
//! egress against the image, per-member percentiles and byte fairness, as
//! one JSON line, a readable table, or an SVG of completions over time.

use serde::Serialize;
use shoal_tracker::TrackerStats;

use crate::engine::Counters;
use crate::scenario::Scenario;

/// One member's run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeResult {
    /// Its upload and download rate (bytes/s).
    pub rate: f64,
    /// When it started pulling (s after the pull began).
    pub start_s: f64,
    /// When it had the whole image (s after the pull began).
    pub done_s: Option<f64>,
    /// It was made to halt (churn or frozen): not waited for.
    pub halted: bool,
    /// Frozen from the start.
    pub frozen: bool,
    /// It served corrupt chunks.
    pub malicious: bool,
    /// Its download gave up (the origin kept failing).
    pub gave_up: bool,
    /// Bytes it sent to peers.
    pub up_bytes: f64,
    /// Bytes it received from peers.
    pub peer_bytes: f64,
    /// Bytes it received from the origin.
    pub origin_bytes: f64,
    /// Chunks it rejected (failed verification).
    pub rejected: u64,
}

/// Totals of a run, from the engine.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Every member that must finish did.
    pub finished: bool,
    /// Simulated time from the pull's start to the last event (s).
    pub sim_s: f64,
    /// Bytes the origin sent.
    pub origin_bytes: f64,
    /// When the origin sent its last byte (s after the pull began).
    pub origin_done_s: f64,
    /// Event and tracker counters.
    pub counters: Counters,
    /// The tracker's own counters at the end.
    pub tracker: TrackerStats,
}

/// Percentiles of per-member pull times (each from its own start).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50_s: f64,
    /// 90th.
    pub p90_s: f64,
    /// 99th.
    pub p99_s: f64,
    /// Slowest.
    pub max_s: f64,
}

/// Bytes per member as multiples of the image: least, median, most.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spread {
    /// Least.
    pub min: f64,
    /// Median.
    pub median: f64,
    /// Most.
    pub max: f64,
}

/// A run's report. `wall_s` and `peak_rss_mib` describe the host, not the
/// simulated swarm; everything else is a function of the scenario (and so
/// of its seed).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Members.
    pub nodes: u32,
    /// Layers.
    pub layers: u32,
    /// The image (bytes).
    pub image_bytes: u64,
    /// Chunk size.
    pub chunk_size: u32,
    /// Member rate (bits/s).
    pub rate_bps: u64,
    /// Origin rate (bits/s).
    pub origin_rate_bps: u64,
    /// Racks (0: flat).
    pub racks: u32,
    /// The bandwidth model used.
    pub sharing: crate::scenario::Sharing,
    /// The seed.
    pub seed: u64,
    /// Every member that had to finish did.
    pub finished: bool,
    /// Members that had to finish and did not.
    pub incomplete: u32,
    /// From the pull's start until the last member that had to finish did (s).
    pub t_all_s: Option<f64>,
    /// The Kumar–Ross lower bound (s): max(F/u_origin, F/d_min,
    /// N·F/(u_origin + Σu)); with racks also F/rack_uplink (every rack's
    /// copy enters through its uplink).
    pub bound_s: f64,
    /// `t_all_s / bound_s`.
    pub ratio_to_bound: Option<f64>,
    /// Origin bytes sent / image bytes.
    pub egress_ratio: f64,
    /// When the origin sent its last byte (s after the pull began).
    pub origin_done_s: f64,
    /// Of `egress_ratio`, what members serving corrupt chunks fetched (once
    /// excluded, the swarm serves them nothing and the origin does).
    pub egress_ratio_malicious: f64,
    /// Per-member pull times.
    pub pull: Option<Percentiles>,
    /// Slowest / median pull time.
    pub slowest_over_median: Option<f64>,
    /// Bytes each member uploaded, × image.
    pub up_per_node: Spread,
    /// Bytes each member received from peers and the origin, × image.
    pub down_per_node: Spread,
    /// Tracker requests served per second of the pull.
    pub tracker_rps: f64,
    /// Engine counters.
    pub counters: Counters,
    /// Members excluded by the tracker at the end.
    pub excluded: u64,
    /// Simulated seconds.
    pub sim_s: f64,
    /// Per member (omitted from the JSON line unless asked for).
    #[serde(skip)]
    pub per_node: Vec<NodeResult>,
    /// Host wall-clock seconds the run took.
    pub wall_s: f64,
    /// Host peak resident memory (MiB), where the OS says.
    pub peak_rss_mib: Option<f64>,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let k = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[k - 1]
}

fn spread(mut v: Vec<f64>) -> Spread {
    v.sort_by(f64::total_cmp);
    Spread {
        min: v.first().copied().unwrap_or(0.0),
        median: quantile(&v, 0.5),
        max: v.last().copied().unwrap_or(0.0),
    }
}

/// This process's peak resident set (Linux `VmHWM`), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

impl Report {
    /// Builds the report of a run of `sc`.
    pub fn new(sc: &Scenario, o: Outcome, per_node: Vec<NodeResult>) -> Report {
        let f = sc.image_bytes() as f64;
        let must: Vec<&NodeResult> = per_node.iter().filter(|n| !n.halted).collect();
        let incomplete = must.iter().filter(|n| n.done_s.is_none()).count() as u32;
        let t_all_s = (incomplete == 0 && !must.is_empty())
            .then(|| must.iter().filter_map(|n| n.done_s).fold(0.0, f64::max));
        // The bound: members that must finish download; honest ones upload.
        let origin = sc.origin_rate() as f64;
        let d_min = must.iter().map(|n| n.rate).fold(f64::INFINITY, f64::min);
        let up: f64 = must.iter().filter(|n| !n.malicious).map(|n| n.rate).sum();
        let mut bound_s = (f / origin)
            .max(f / d_min)
            .max(must.len() as f64 * f / (origin + up));
        if let (true, Some(r)) = (sc.racks > 1, sc.rack_uplink) {
            bound_s = bound_s.max(f / r as f64);
        }
        let mut times: Vec<f64> = must
            .iter()
            .filter_map(|n| n.done_s.map(|d| d - n.start_s))
            .collect();
        times.sort_by(f64::total_cmp);
        let pull = (!times.is_empty()).then(|| Percentiles {
            p50_s: quantile(&times, 0.5),
            p90_s: quantile(&times, 0.9),
            p99_s: quantile(&times, 0.99),
            max_s: quantile(&times, 1.0),
        });
        let slowest_over_median = pull
            .as_ref()
            .filter(|p| p.p50_s > 0.0)
            .map(|p| p.max_s / p.p50_s);
        Report {
            nodes: sc.nodes,
            layers: sc.layers,
            image_bytes: sc.image_bytes(),
            chunk_size: sc.chunk_size,
            rate_bps: sc.rate * 8,
            origin_rate_bps: sc.origin_rate() * 8,
            racks: sc.racks,
            sharing: sc.sharing(),
            seed: sc.seed,
            finished: o.finished && incomplete == 0,
            incomplete,
            t_all_s,
            bound_s,
            ratio_to_bound: t_all_s.map(|t| t / bound_s),
            egress_ratio: o.origin_bytes / f,
            origin_done_s: o.origin_done_s,
            egress_ratio_malicious: per_node
                .iter()
                .filter(|n| n.malicious)
                .map(|n| n.origin_bytes)
                .fold(0.0, |a, b| a + b)
                / f,
            pull,
            slowest_over_median,
            up_per_node: spread(must.iter().map(|n| n.up_bytes / f).collect()),
            down_per_node: spread(
                must.iter()
                    .map(|n| (n.peer_bytes + n.origin_bytes) / f)
                    .collect(),
            ),
            tracker_rps: if o.sim_s > 0.0 {
                o.counters.tracker_requests as f64 / o.sim_s
            } else {
                0.0
            },
            counters: o.counters,
            excluded: o.tracker.excluded as u64,
            sim_s: o.sim_s,
            per_node,
            wall_s: 0.0,
            peak_rss_mib: None,
        }
    }

    /// The JSON line.
    pub fn json(&self) -> String {
        serde_json::to_string(self).expect("a report serializes")
    }

    /// A readable table.
    pub fn table(&self) -> String {
        let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.3}"));
        let mut out = String::new();
        let mut row = |k: &str, v: String| out.push_str(&format!("{k:<28} {v}\n"));
        row(
            "scenario",
            format!(
                "{} members, {} × {:.1} MiB, {} bit/s, origin {} bit/s, racks {}, {:?}, seed {}",
                self.nodes,
                self.layers,
                self.image_bytes as f64 / f64::from(self.layers) / 1048576.0,
                human(self.rate_bps as f64),
                human(self.origin_rate_bps as f64),
                self.racks,
                self.sharing,
                self.seed
            ),
        );
        row(
            "finished",
            format!("{} ({} incomplete)", self.finished, self.incomplete),
        );
        row("time to all (s)", opt(self.t_all_s));
        row("bound (s)", format!("{:.3}", self.bound_s));
        row("× bound", opt(self.ratio_to_bound));
        row(
            "origin egress × image",
            format!(
                "{:.4} (by corrupt members: {:.4})",
                self.egress_ratio, self.egress_ratio_malicious
            ),
        );
        row("origin done (s)", format!("{:.3}", self.origin_done_s));
        if let Some(p) = &self.pull {
            row(
                "pull p50 / p90 / p99 / max",
                format!(
                    "{:.3} / {:.3} / {:.3} / {:.3} s",
                    p.p50_s, p.p90_s, p.p99_s, p.max_s
                ),
            );
        }
        row("slowest / median", opt(self.slowest_over_median));
        let s = &self.up_per_node;
        row(
            "upload × image",
            format!("min {:.2} median {:.2} max {:.2}", s.min, s.median, s.max),
        );
        let s = &self.down_per_node;
        row(
            "download × image",
            format!("min {:.3} median {:.3} max {:.3}", s.min, s.median, s.max),
        );
        row(
            "tracker",
            format!(
                "{} requests, {:.0}/s, longest queue wait {:.1} ms",
                self.counters.tracker_requests,
                self.tracker_rps,
                self.counters.tracker_max_wait_us as f64 / 1e3
            ),
        );
        row(
            "peers",
            format!(
                "{} busy answers, {} bad chunks rejected, {} excluded, {} watch frames",
                self.counters.busy,
                self.counters.bad_chunks,
                self.excluded,
                self.counters.watch_frames
            ),
        );
        row(
            "integrity",
            format!(
                "{} corrupt chunks stored, {} unverifiable requests",
                self.counters.corrupt_stored, self.counters.unverifiable_requests
            ),
        );
        row(
            "host",
            format!(
                "{:.1} s wall, {} events, peak RSS {}",
                self.wall_s,
                self.counters.events,
                self.peak_rss_mib
                    .map_or("-".into(), |m| format!("{m:.0} MiB"))
            ),
        );
        out
    }

    /// An SVG of the fraction of members done over time.
    pub fn svg(&self) -> String {
        let mut done: Vec<f64> = self
            .per_node
            .iter()
            .filter(|n| !n.halted)
            .filter_map(|n| n.done_s)
            .collect();
        done.sort_by(f64::total_cmp);
        let total = self.per_node.iter().filter(|n| !n.halted).count().max(1) as f64;
        let t_max = done.last().copied().unwrap_or(1.0).max(self.bound_s) * 1.05;
        let (w, h, pad) = (640.0, 360.0, 48.0);
        let x = |t: f64| pad + t / t_max * (w - 2.0 * pad);
        let y = |frac: f64| h - pad - frac * (h - 2.0 * pad);
        let mut points = format!("{:.1},{:.1}", x(0.0), y(0.0));
        for (k, t) in done.iter().enumerate() {
            points.push_str(&format!(
                " {:.1},{:.1} {:.1},{:.1}",
                x(*t),
                y(k as f64 / total),
                x(*t),
                y((k + 1) as f64 / total)
            ));
        }
        format!(
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<line x1="{pad}" y1="{yb}" x2="{xe}" y2="{yb}" stroke="black"/>
<line x1="{pad}" y1="{yb}" x2="{pad}" y2="{pad}" stroke="black"/>
<line x1="{xb:.1}" y1="{yb}" x2="{xb:.1}" y2="{pad}" stroke="#c33" stroke-dasharray="4 3"/>
<text x="{xb:.1}" y="{ty}" fill="#c33">bound {bound:.2} s</text>
<polyline points="{points}" fill="none" stroke="#236" stroke-width="2"/>
<text x="{pad}" y="20">{nodes} members: fraction with the whole image over time ({t_max:.2} s wide)</text>
<text x="{xe}" y="{tx}" text-anchor="end">seconds</text>
<text x="{pad}" y="{ty2}" text-anchor="end">1</text>
</svg>
"##,
            yb = h - pad,
            xe = w - pad,
            xb = x(self.bound_s),
            ty = pad - 6.0,
            tx = h - pad + 20.0,
            ty2 = y(1.0) + 4.0,
            bound = self.bound_s,
            nodes = self.nodes,
        )
    }
}

/// `1.2e9` → `1.2g`.
fn human(bps: f64) -> String {
    match bps {
        b if b >= 1e9 => format!("{:.3}g", b / 1e9),
        b if b >= 1e6 => format!("{:.3}m", b / 1e6),
        b => format!("{:.0}", b),
    }
}
