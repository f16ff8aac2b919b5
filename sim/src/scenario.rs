//! What a simulation run models: the cluster, the image, the network and
//! what goes wrong. Read from TOML (`--scenario FILE`) and overridden by
//! command-line flags; every field has a default.

use serde::Deserialize;
use shoal_proto::chunk::{is_valid_chunk_size, DEFAULT_CHUNK_SIZE};
use shoal_proto::units::{parse_rate, parse_size};

/// How bandwidth is shared among the flows on a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sharing {
    /// Max-min up to [`MAX_MIN_NODES`] members, water-filling up to
    /// [`WATER_FILL_NODES`], fair share above.
    Auto,
    /// Each flow gets the smallest of its links' equal shares
    /// (`capacity / flows on it`), updated only for the links whose flow
    /// count changed: cheap enough for 100,000 nodes, and never above what a
    /// link carries (capacity a flow bottlenecked elsewhere leaves unused is
    /// not handed to the others).
    FairShare,
    /// Each link, when its flows change, shares its capacity by water-filling:
    /// a flow gets at most what its other links last gave it, and what such
    /// flows leave is shared equally by the others. Never above what a link
    /// carries (like the fair share) but it hands on the share a flow
    /// limited elsewhere leaves unused, as max-min does; it costs a sort of
    /// the changed links' flows, so it runs at 10,000 members.
    WaterFill,
    /// Exact max-min fairness (progressive filling over every link at every
    /// change): the reference the fair share is checked against, for
    /// clusters of a few hundred nodes. It matched the shaped lab at 8
    /// members within 1 % where the fair share was 23 % slow: a member's
    /// downlink shared by slow origin runs and peer transfers leaves the
    /// runs' unused share idle under the fair share.
    MaxMin,
}

/// The largest swarm [`Sharing::Auto`] simulates with exact max-min.
pub const MAX_MIN_NODES: u32 = 300;
/// The largest swarm [`Sharing::Auto`] simulates with water-filling (it
/// costs 1.6–2× the fair share's time: 10,000 members would take longer
/// than ten minutes).
pub const WATER_FILL_NODES: u32 = 3_000;

/// When the members start pulling.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Start {
    /// Every member at once.
    AllAtOnce,
    /// Spread evenly over `over_ms`.
    Staggered {
        /// The spread.
        over_ms: u64,
    },
    /// `count` equal waves, `gap_ms` apart.
    Waves {
        /// Waves.
        count: u32,
        /// Time between waves.
        gap_ms: u64,
    },
}

/// A window during which the tracker does not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Outage {
    /// From (ms after the pull starts).
    pub from_ms: u64,
    /// Until.
    pub until_ms: u64,
}

/// A simulation scenario. Rates are bytes per second; sizes bytes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// Members pulling the image.
    pub nodes: u32,
    /// Layers of the image (all pulled at once, as a runtime does).
    pub layers: u32,
    /// Bytes per layer.
    pub layer_bytes: u64,
    /// The cluster's chunk size.
    pub chunk_size: u32,
    /// Each member's upload and download rate.
    pub rate: u64,
    /// The origin's upload rate (default: `rate`).
    pub origin_rate: Option<u64>,
    /// Members pace their uploads to this rate, below their link's, as
    /// shoald's `--peer-upload-rate` does (default: the link's rate). The
    /// bound is still that of the links.
    pub upload_cap: Option<u64>,
    /// The share of every link's bytes spent on headers and framing
    /// (Ethernet, IP, UDP or TCP, QUIC or TLS), not blob bytes: about 0.05
    /// at a 1500-byte MTU, as in the shaped lab. Default 0: links carry
    /// blob bytes at their full rate. The bound is still that of the rates.
    pub header_share: f64,
    /// A fraction of members with a different rate (heterogeneity).
    pub slow_fraction: f64,
    /// Their rate.
    pub slow_rate: Option<u64>,
    /// Round-trip time between any two hosts, in microseconds.
    pub rtt_us: u64,
    /// Tracker service time per request in microseconds, on one core (0:
    /// unlimited). The HTTPS tracker measured 33–41 µs per request.
    pub tracker_us: u64,
    /// Cores serving tracker requests at once (the measured cost is CPU
    /// per request of the whole process: TLS, HTTP/2 and JSON, most of it
    /// outside the core's lock).
    pub tracker_cores: u32,
    /// Of `tracker_us`, the part spent holding the core's lock, one request
    /// at a time (the core's own work; its JSON, HTTP/2 and TLS run outside).
    pub tracker_serial_us: u64,
    /// Lookups hold the core's lock shared, many at once, as the tracker
    /// server's read lock does (unless something has to expire first);
    /// `false`: every request holds it alone, as before.
    pub shared_lookups: bool,
    /// A member's downloads announce through one announcer
    /// (`shoal_proto::announcer`), as the daemon's transfers do: one
    /// announce on its way, the rest merged. `false`: each download sends
    /// its own.
    pub merge_announces: bool,
    /// Upload slots per member (requests served at once; more get `Busy`).
    pub upload_slots: u32,
    /// Requests a member holds while its upload slots are all taken (more
    /// get `Busy`).
    pub upload_queue: u32,
    /// A member's `Busy` answer says when to ask again, as the daemon's
    /// does ([`shoal_proto::slots`]); `false` models peers that guess
    /// their own back-off.
    pub busy_hint: bool,
    /// When members start.
    pub start: Start,
    /// Fraction of members that die mid-pull (stop answering anyone).
    pub churn: f64,
    /// Of those, the share that shut down cleanly (as shoald does on
    /// SIGTERM): they tell the tracker they leave, which forgets them at
    /// once, and close their connections. The rest just stop answering.
    pub churn_leaves: f64,
    /// Deaths happen uniformly within this long after the start.
    pub churn_window_ms: u64,
    /// Fraction of members that freeze at the start of the pull: they take
    /// requests and never answer (a hung process).
    pub frozen: f64,
    /// Fraction of members that serve corrupt chunks.
    pub malicious: f64,
    /// Windows during which the tracker is down.
    pub tracker_outages: Vec<Outage>,
    /// Racks (0: a flat network). Members are spread over them evenly.
    pub racks: u32,
    /// Each rack's uplink (both ways; default: unlimited).
    pub rack_uplink: Option<u64>,
    /// Members tell the tracker their rack (`rack-K`), as a daemon run with
    /// `--rack` does; false: they do not, and nobody is preferred.
    pub rack_labels: bool,
    /// How bandwidth is shared.
    pub sharing: Sharing,
    /// Overrides the session's lookup interval (ms), to try a policy.
    pub lookup_interval_ms: Option<u64>,
    /// Overrides the scheduler's time to a lookup that is worth it soon (ms).
    pub hurried_lookup_ms: Option<u64>,
    /// Overrides the session's least time between announces (ms).
    pub announce_every_ms: Option<u64>,
    /// Overrides the session's most time between announces of an
    /// incomplete download (ms; 0: heartbeats only).
    pub keepalive_ms: Option<u64>,
    /// Peers each download watches, if not the daemon's.
    pub watch_peers: Option<u32>,
    /// Overrides the scheduler's chunks in flight per peer.
    pub peer_depth: Option<u32>,
    /// Overrides the scheduler's chunks in flight from peers per download.
    pub max_inflight: Option<u32>,
    /// Overrides the tracker's most bytes of one blob leased at once.
    pub blob_lease_bytes: Option<u64>,
    /// Seed of every random choice.
    pub seed: u64,
    /// Simulated time after which the run stops, finished or not.
    pub max_sim_ms: u64,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            nodes: 8,
            layers: 3,
            layer_bytes: 16 << 20,
            chunk_size: DEFAULT_CHUNK_SIZE,
            rate: 100_000_000 / 8,
            origin_rate: None,
            upload_cap: None,
            header_share: 0.0,
            slow_fraction: 0.0,
            slow_rate: None,
            rtt_us: 200,
            tracker_us: 40,
            tracker_cores: 1,
            tracker_serial_us: 5,
            shared_lookups: true,
            merge_announces: true,
            upload_slots: 16,
            upload_queue: 4,
            busy_hint: true,
            start: Start::AllAtOnce,
            churn: 0.0,
            churn_leaves: 0.0,
            churn_window_ms: 5_000,
            frozen: 0.0,
            malicious: 0.0,
            tracker_outages: Vec::new(),
            racks: 0,
            rack_uplink: None,
            rack_labels: true,
            sharing: Sharing::Auto,
            lookup_interval_ms: None,
            hurried_lookup_ms: None,
            announce_every_ms: None,
            keepalive_ms: None,
            watch_peers: None,
            peer_depth: None,
            max_inflight: None,
            blob_lease_bytes: None,
            seed: 1,
            max_sim_ms: 3_600_000,
        }
    }
}

impl Scenario {
    /// Reads a scenario from TOML. Sizes and rates may be written as strings
    /// (`"16MiB"`, `"10gbit"`).
    pub fn from_toml(text: &str) -> anyhow::Result<Scenario> {
        let mut v: toml::Table = toml::from_str(text)?;
        for key in ["layer_bytes", "chunk_size", "blob_lease_bytes"] {
            if let Some(toml::Value::String(s)) = v.get(key) {
                let n = parse_size(s).map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
                v.insert(key.into(), toml::Value::Integer(n as i64));
            }
        }
        for key in [
            "rate",
            "origin_rate",
            "upload_cap",
            "slow_rate",
            "rack_uplink",
        ] {
            if let Some(toml::Value::String(s)) = v.get(key) {
                let n = parse_rate(s).map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
                v.insert(key.into(), toml::Value::Integer(n as i64));
            }
        }
        let s: Scenario = v.try_into()?;
        s.validate()?;
        Ok(s)
    }

    /// Checks that the scenario can run.
    pub fn validate(&self) -> anyhow::Result<()> {
        let fraction = |name: &str, f: f64| {
            anyhow::ensure!(
                (0.0..=1.0).contains(&f),
                "{name} must be within 0..=1, not {f}"
            );
            Ok(())
        };
        anyhow::ensure!(self.nodes >= 1, "nodes must be at least 1");
        anyhow::ensure!(self.nodes <= 1_000_000, "nodes must be at most 1,000,000");
        anyhow::ensure!((1..=64).contains(&self.layers), "layers must be 1..=64");
        anyhow::ensure!(self.layer_bytes >= 1, "layer_bytes must be at least 1");
        anyhow::ensure!(
            is_valid_chunk_size(self.chunk_size),
            "chunk_size {} is not a valid chunk size (a power of two from 64 KiB to 4 MiB)",
            self.chunk_size
        );
        shoal_proto::ChunkLayout::new(self.layer_bytes, self.chunk_size)
            .map_err(|e| anyhow::anyhow!("layer_bytes: {e}"))?;
        anyhow::ensure!(self.rate > 0, "rate must be positive");
        anyhow::ensure!(
            (1..=1024).contains(&self.tracker_cores),
            "tracker_cores must be 1..=1024"
        );
        anyhow::ensure!(self.origin_rate != Some(0), "origin_rate must be positive");
        anyhow::ensure!(self.upload_cap != Some(0), "upload_cap must be positive");
        anyhow::ensure!(self.slow_rate != Some(0), "slow_rate must be positive");
        anyhow::ensure!(self.rack_uplink != Some(0), "rack_uplink must be positive");
        anyhow::ensure!(self.upload_slots >= 1, "upload_slots must be at least 1");
        anyhow::ensure!(
            (0.0..0.5).contains(&self.header_share),
            "header_share must be within 0..0.5, not {}",
            self.header_share
        );
        fraction("slow_fraction", self.slow_fraction)?;
        fraction("churn", self.churn)?;
        fraction("churn_leaves", self.churn_leaves)?;
        fraction("frozen", self.frozen)?;
        fraction("malicious", self.malicious)?;
        anyhow::ensure!(
            self.churn + self.frozen + self.malicious <= 1.0,
            "churn + frozen + malicious must be at most 1"
        );
        if let Start::Waves { count, .. } = self.start {
            anyhow::ensure!(count >= 1, "waves need a count of at least 1");
        }
        for o in &self.tracker_outages {
            anyhow::ensure!(
                o.from_ms < o.until_ms,
                "a tracker outage must end after it starts"
            );
        }
        anyhow::ensure!(self.max_sim_ms > 0, "max_sim_ms must be positive");
        anyhow::ensure!(
            self.peer_depth != Some(0)
                && self.max_inflight != Some(0)
                && self.blob_lease_bytes != Some(0),
            "peer_depth, max_inflight and blob_lease_bytes must be positive"
        );
        anyhow::ensure!(
            self.lookup_interval_ms != Some(0)
                && self.hurried_lookup_ms != Some(0)
                && self.announce_every_ms != Some(0),
            "lookup_interval_ms, hurried_lookup_ms and announce_every_ms must be positive"
        );
        Ok(())
    }

    /// The sharing model this run uses (`Auto` resolved).
    pub fn sharing(&self) -> Sharing {
        match self.sharing {
            Sharing::Auto if self.nodes <= MAX_MIN_NODES => Sharing::MaxMin,
            Sharing::Auto if self.nodes <= WATER_FILL_NODES => Sharing::WaterFill,
            Sharing::Auto => Sharing::FairShare,
            other => other,
        }
    }

    /// The origin's upload rate.
    pub fn origin_rate(&self) -> u64 {
        self.origin_rate.unwrap_or(self.rate)
    }

    /// The whole image in bytes.
    pub fn image_bytes(&self) -> u64 {
        self.layer_bytes * u64::from(self.layers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_with_units_and_errors_that_name_the_field() {
        let s = Scenario::from_toml(
            r#"
            nodes = 100
            layer_bytes = "200MiB"
            rate = "10gbit"
            racks = 4
            rack_uplink = "20gbit"
            start = { kind = "waves", count = 2, gap_ms = 1000 }
            tracker_outages = [{ from_ms = 100, until_ms = 900 }]
            "#,
        )
        .unwrap();
        assert_eq!(s.nodes, 100);
        assert_eq!(s.layer_bytes, 200 << 20);
        assert_eq!(s.rate, 1_250_000_000);
        assert_eq!(s.rack_uplink, Some(2_500_000_000));
        assert_eq!(
            s.start,
            Start::Waves {
                count: 2,
                gap_ms: 1000
            }
        );
        let e = Scenario::from_toml("rate = \"fastbit\"").unwrap_err();
        assert!(e.to_string().contains("rate"), "{e}");
        let e = Scenario::from_toml("nodez = 3").unwrap_err();
        assert!(e.to_string().contains("nodez"), "{e}");
        let e = Scenario::from_toml("churn = 1.5").unwrap_err();
        assert!(e.to_string().contains("churn"), "{e}");
        let e = Scenario::from_toml("chunk_size = 1000").unwrap_err();
        assert!(e.to_string().contains("chunk_size"), "{e}");
        let e = Scenario::from_toml("max_inflight = 0").unwrap_err();
        assert!(e.to_string().contains("max_inflight"), "{e}");
        let e = Scenario::from_toml("upload_cap = \"0mbit\"").unwrap_err();
        assert!(e.to_string().contains("upload_cap"), "{e}");
        let e = Scenario::from_toml("header_share = 0.5").unwrap_err();
        assert!(e.to_string().contains("header_share"), "{e}");
        let s = Scenario::from_toml("header_share = 0.05").unwrap();
        assert_eq!(s.header_share, 0.05);
        let s = Scenario::from_toml("upload_cap = \"9mbit\"\npeer_depth = 2").unwrap();
        assert_eq!((s.upload_cap, s.peer_depth), (Some(1_125_000), Some(2)));
    }
}
