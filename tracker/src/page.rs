//! The tracker's read-only status page (`GET /` on the ops listener): the
//! counts, the members, the blobs with the most holders and the preheat
//! jobs, as one self-contained HTML document (no scripts, no external
//! resources; it reloads itself every 5 s). Everything printed is escaped.

use std::fmt::Write as _;

use shoal_proto::preheat::{JobState, JobStatus};

use crate::core::{BlobSummary, MemberSummary, TrackerStats};

/// Rows shown per table at most.
pub const ROWS: usize = 200;

/// What the page shows.
pub struct PageData {
    /// Seconds since the tracker started.
    pub uptime_s: u64,
    /// `memory` or the replicas' shared store and the last applied entry.
    pub mode: String,
    /// Counts.
    pub stats: TrackerStats,
    /// Members (at most [`ROWS`]).
    pub members: Vec<MemberSummary>,
    /// The hottest blobs (at most [`ROWS`]).
    pub blobs: Vec<BlobSummary>,
    /// Preheat jobs, newest first.
    pub jobs: Vec<JobStatus>,
}

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Renders the page.
pub fn render(d: &PageData) -> String {
    let mut h = String::with_capacity(16 << 10);
    let s = &d.stats;
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"5\"><title>Shoal tracker</title>\
         <style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse;margin-bottom:1.5em}}\
         td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}td.n{{text-align:right}}\
         code{{font-size:90%}}.failed{{color:#b00}}</style></head><body>\n\
         <h1>Shoal tracker</h1>\n<p id=\"summary\">up {} s · {} · <span id=\"members\">{}</span> members · \
         {} blobs · {} holdings · {} leases · {} chunk hashes · {} excluded</p>\n",
        d.uptime_s,
        escape(&d.mode),
        s.members,
        s.blobs,
        s.holdings,
        s.leases,
        s.hashes,
        s.excluded
    );
    h.push_str("<h2>Members</h2>\n<table id=\"member-table\"><tr><th>node</th><th>address</th><th>rack</th><th>last announce</th><th>blobs</th><th>state</th></tr>\n");
    for m in &d.members {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{:.1} s ago</td><td class=\"n\">{}</td><td>{}</td></tr>",
            escape(m.node.as_str()),
            escape(m.addr.as_str()),
            escape(m.rack.as_ref().map_or("", |r| r.as_str())),
            m.seen_ms_ago as f64 / 1000.0,
            m.blobs,
            if m.excluded { "excluded" } else { "ok" }
        );
    }
    h.push_str("</table>\n");
    if s.members > d.members.len() {
        let _ = writeln!(h, "<p>and {} more</p>", s.members - d.members.len());
    }
    h.push_str("<h2>Hot blobs</h2>\n<table id=\"blob-table\"><tr><th>digest</th><th>size</th><th>chunks</th><th>complete holders</th><th>partial holders</th><th>leases</th><th>hashes known</th></tr>\n");
    for b in &d.blobs {
        let _ = writeln!(
            h,
            "<tr><td><code>{}</code></td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            escape(&b.digest.to_string()),
            bytes(b.size),
            b.chunks,
            b.complete,
            b.partial,
            b.leases,
            b.hashes
        );
    }
    h.push_str("</table>\n<h2>Preheat jobs</h2>\n<table id=\"job-table\"><tr><th>job</th><th>image</th><th>by</th><th>members</th><th>done</th><th>running</th><th>failed</th><th>bytes</th></tr>\n");
    for j in &d.jobs {
        let n = |st: JobState| j.nodes.values().filter(|p| p.state == st).count();
        let (done, total) = j
            .nodes
            .values()
            .map(|p| p.bytes())
            .fold((0, 0), |(a, b), (c, e)| (a + c, b + e));
        let failed = n(JobState::Failed);
        let _ = writeln!(
            h,
            "<tr><td class=\"n\">{}</td><td><code>{}</code></td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n{}\">{}</td><td class=\"n\">{} of {}</td></tr>",
            j.job.id,
            escape(&j.job.preheat.image),
            escape(j.job.by.as_str()),
            j.nodes.len(),
            n(JobState::Done),
            n(JobState::Running) + n(JobState::Pending),
            if failed > 0 { " failed" } else { "" },
            failed,
            bytes(done),
            bytes(total)
        );
    }
    h.push_str("</table>\n<p>JSON: <a href=\"/status\">/status</a> · metrics: <a href=\"/metrics\">/metrics</a></p>\n</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_sizes_are_readable() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        let page = render(&PageData {
            uptime_s: 3,
            mode: "memory <x>".into(),
            stats: TrackerStats::default(),
            members: vec![],
            blobs: vec![],
            jobs: vec![],
        });
        assert!(page.contains("memory &lt;x&gt;"));
        assert!(page.starts_with("<!doctype html>"));
    }
}
