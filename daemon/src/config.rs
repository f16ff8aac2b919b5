//! `shoald run` configuration: flags, `SHOAL_*` environment variables and a
//! TOML file (`--config`), merged in that order of precedence over the
//! documented defaults. Every problem is one clear line naming the field.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;
use shoal_proto::reference::valid_host;

/// Flags of `shoald run`. Each is optional here so that the file and the
/// defaults can fill what the command line and environment left out.
#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// TOML config file with the same keys as the flags (e.g. `data-dir = "/var/lib/shoal"`).
    #[arg(long, env = "SHOAL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Store and metadata directory [default: /var/lib/shoal].
    #[arg(long, env = "SHOAL_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// OCI registry endpoint for the node's runtime [default: 127.0.0.1:4900].
    #[arg(long, env = "SHOAL_REGISTRY_LISTEN", value_name = "ADDR")]
    pub registry_listen: Option<SocketAddr>,
    /// Read-only /metrics and /healthz [default: 0.0.0.0:4903].
    #[arg(long, env = "SHOAL_OPS_LISTEN", value_name = "ADDR")]
    pub ops_listen: Option<SocketAddr>,
    /// Origins this node may fetch from (repeatable; comma-separated in the
    /// environment) [default: any, logged at start].
    #[arg(
        long,
        env = "SHOAL_UPSTREAM",
        value_name = "HOST[:PORT]",
        value_delimiter = ','
    )]
    pub upstream: Vec<String>,
    /// Origins spoken to over plain HTTP; implies --upstream (repeatable).
    #[arg(
        long,
        env = "SHOAL_INSECURE_UPSTREAM",
        value_name = "HOST[:PORT]",
        value_delimiter = ','
    )]
    pub insecure_upstream: Vec<String>,
    /// Origin for requests that name none (the Docker engine's mirror requests) [default: docker.io].
    #[arg(long, env = "SHOAL_DEFAULT_UPSTREAM", value_name = "HOST[:PORT]")]
    pub default_upstream: Option<String>,
    /// Store quota in bytes (suffixes K, M, G, T and KiB, MiB, GiB, TiB accepted)
    /// [default: 80% of free space plus the store's own bytes, computed at start].
    #[arg(long, env = "SHOAL_CACHE_MAX_BYTES", value_name = "N")]
    pub cache_max_bytes: Option<String>,
    /// Docker config.json with credentials for origins
    /// [default: $DOCKER_CONFIG/config.json or ~/.docker/config.json if present].
    #[arg(long, env = "SHOAL_DOCKER_CONFIG", value_name = "FILE")]
    pub docker_config: Option<PathBuf>,
    /// Unix socket of the admin API `shoalctl` uses (mode 0600)
    /// [default: DATA-DIR/admin.sock].
    #[arg(long, env = "SHOAL_ADMIN_SOCKET", value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// How long an origin's confirmation that a repository holds a blob is
    /// trusted, in seconds [default: 300].
    #[arg(long, env = "SHOAL_AUTHORITY_TTL", value_name = "SECS")]
    pub authority_ttl: Option<u64>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "SHOAL_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Cluster credentials: ca.crt + ca.key, or ca.crt + node.crt + node.key.
    /// Without it the node runs alone (no peers) [default: none].
    #[arg(long, env = "SHOAL_CLUSTER_DIR", value_name = "DIR")]
    pub cluster_dir: Option<PathBuf>,
    /// This node's id in the cluster, the name its certificate carries
    /// [default: the host name].
    #[arg(long, env = "SHOAL_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,
    /// QUIC (UDP) address for peers [default: 0.0.0.0:4901].
    #[arg(long, env = "SHOAL_PEER_LISTEN", value_name = "ADDR")]
    pub peer_listen: Option<SocketAddr>,
    /// The peer address others should dial [default: --peer-listen when it
    /// names an address; required when it binds all interfaces].
    #[arg(long, env = "SHOAL_ADVERTISE", value_name = "ADDR")]
    pub advertise: Option<SocketAddr>,
    /// Tracker base URLs, tried in turn (repeatable; comma-separated in the
    /// environment); `embedded` runs one in this process [default: embedded].
    #[arg(long, env = "SHOAL_TRACKER", value_name = "URL", value_delimiter = ',')]
    pub tracker: Vec<String>,
    /// Cap on bytes per second sent to peers, all together (e.g. `100mbit`,
    /// `50MB`); default none.
    #[arg(long, env = "SHOAL_PEER_UPLOAD_RATE", value_name = "RATE")]
    pub peer_upload_rate: Option<String>,
    /// `auto`: pace uploads just under the node's uplink once losses on
    /// most peer connections at once show it is full (under
    /// --peer-upload-rate if set); `off`: never. Default auto.
    #[arg(long, env = "SHOAL_PEER_UPLOAD_PACING", value_name = "auto|off")]
    pub peer_upload_pacing: Option<String>,
    /// Cap on bytes per second received from peers, all together; default
    /// none.
    #[arg(long, env = "SHOAL_PEER_DOWNLOAD_RATE", value_name = "RATE")]
    pub peer_download_rate: Option<String>,
    /// Chunk requests from peers served at once; more are told to try
    /// elsewhere. Default 16.
    #[arg(long, env = "SHOAL_PEER_MAX_UPLOADS", value_name = "N")]
    pub peer_max_uploads: Option<usize>,
    /// Chunk requests to peers in flight at once, all downloads together
    /// (each of n downloads running at once gets 1/n of them). Default 32.
    #[arg(long, env = "SHOAL_PEER_MAX_INFLIGHT", value_name = "N")]
    pub peer_max_inflight: Option<u32>,
    /// The size of the chunks blobs are split into, the same on every
    /// member (a power of two, 64KiB to 4MiB). Default 256KiB.
    #[arg(long, env = "SHOAL_CHUNK_SIZE", value_name = "SIZE")]
    pub chunk_size: Option<String>,
    /// Where this node sits: a rack or zone name (`[A-Za-z0-9._-]`, e.g.
    /// the node's `topology.kubernetes.io/zone`) shared by nodes behind one
    /// uplink. Nodes of a rack are asked first, so a chunk crosses the
    /// uplink about once [default: none, every peer alike].
    #[arg(long, env = "SHOAL_RACK", value_name = "NAME")]
    pub rack: Option<String>,
    /// The tracker's join listener (`https://HOST:PORT`): with a join token
    /// (--join-token-file) a node whose --cluster-dir holds only `ca.crt`
    /// gets its certificate there at start, and renews it through the
    /// tracker while it runs. The CA key stays off the node.
    #[arg(
        long,
        env = "SHOAL_JOIN",
        value_name = "URL",
        requires = "join_token_file"
    )]
    pub join: Option<String>,
    /// TCP address of this node's DHT (libp2p Kademlia), which finds peers
    /// when no tracker answers; others dial the advertised IP with this
    /// port [default: no DHT].
    #[arg(long, env = "SHOAL_DHT_LISTEN", value_name = "ADDR")]
    pub dht_listen: Option<SocketAddr>,
    /// DHT nodes to bootstrap from, `HOST:PORT` (repeatable; a headless
    /// Service's name resolves to every member) [default: the tracker's
    /// member list and the list saved from the last run].
    #[arg(
        long,
        env = "SHOAL_DHT_BOOTSTRAP",
        value_name = "HOST:PORT",
        value_delimiter = ','
    )]
    pub dht_bootstrap: Vec<String>,
    /// A file holding the join token (its first line).
    #[arg(
        long,
        env = "SHOAL_JOIN_TOKEN_FILE",
        value_name = "FILE",
        requires = "join"
    )]
    pub join_token_file: Option<PathBuf>,
}

/// The `--config` file: the same keys as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    data_dir: Option<PathBuf>,
    registry_listen: Option<String>,
    ops_listen: Option<String>,
    #[serde(default)]
    upstream: Vec<String>,
    #[serde(default)]
    insecure_upstream: Vec<String>,
    default_upstream: Option<String>,
    cache_max_bytes: Option<toml::Value>,
    docker_config: Option<PathBuf>,
    admin_socket: Option<PathBuf>,
    authority_ttl: Option<u64>,
    log_format: Option<String>,
    cluster_dir: Option<PathBuf>,
    node_id: Option<String>,
    peer_listen: Option<String>,
    advertise: Option<String>,
    #[serde(default)]
    tracker: Vec<String>,
    peer_upload_rate: Option<toml::Value>,
    peer_upload_pacing: Option<String>,
    peer_download_rate: Option<toml::Value>,
    peer_max_uploads: Option<usize>,
    peer_max_inflight: Option<u32>,
    chunk_size: Option<toml::Value>,
    rack: Option<String>,
    join: Option<String>,
    join_token_file: Option<PathBuf>,
    dht_listen: Option<String>,
    #[serde(default)]
    dht_bootstrap: Vec<String>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Store directory.
    pub data_dir: PathBuf,
    /// Registry endpoint address.
    pub registry_listen: SocketAddr,
    /// Ops endpoint address.
    pub ops_listen: SocketAddr,
    /// Allowed origins (`None` = any).
    pub upstreams: Option<HashSet<String>>,
    /// Origins spoken to over HTTP.
    pub insecure_upstreams: HashSet<String>,
    /// Default origin.
    pub default_upstream: String,
    /// Quota; `None` = computed at start from free space.
    pub cache_max_bytes: Option<u64>,
    /// Credentials file.
    pub docker_config: Option<PathBuf>,
    /// The admin API's Unix socket.
    pub admin_socket: PathBuf,
    /// Authority confirmation lifetime.
    pub authority_ttl: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Swarm settings; `None` = single node.
    pub swarm: Option<SwarmConfig>,
}

/// How this node joins the swarm.
#[derive(Debug, Clone)]
pub struct SwarmConfig {
    /// Cluster credentials directory.
    pub cluster_dir: PathBuf,
    /// This node's id.
    pub node_id: String,
    /// QUIC listen address.
    pub peer_listen: SocketAddr,
    /// Address peers dial.
    pub advertise: SocketAddr,
    /// Tracker URLs, or empty for the embedded tracker.
    pub trackers: Vec<String>,
    /// Cap on bytes per second to peers.
    pub upload_rate: Option<u64>,
    /// Learn an upload cap from losses ([`crate::uplink`]).
    pub upload_pacing: bool,
    /// Cap on bytes per second from peers.
    pub download_rate: Option<u64>,
    /// Where this node sits, if the operator said.
    pub rack: Option<shoal_proto::tracker_api::Rack>,
    /// Chunk requests served at once.
    pub max_uploads: usize,
    /// Chunk requests to peers in flight at once, all downloads together.
    pub max_inflight: u32,
    /// Chunk size of new blobs.
    pub chunk_size: u32,
    /// Join with a token: the tracker's join URL and the token.
    pub join: Option<Join>,
    /// The DHT, if configured.
    pub dht: Option<DhtSettings>,
}

/// Where this node's DHT listens and whom it bootstraps from.
#[derive(Debug, Clone)]
pub struct DhtSettings {
    /// TCP listen address.
    pub listen: SocketAddr,
    /// What other nodes dial: the advertised IP with the listen port.
    pub advertise: SocketAddr,
    /// `HOST:PORT` names to bootstrap from.
    pub bootstrap: Vec<String>,
}

/// Getting and renewing this node's certificate from the tracker.
#[derive(Clone)]
pub struct Join {
    /// The tracker's join listener, `https://HOST:PORT`.
    pub url: String,
    /// The join token.
    pub token: String,
}

impl std::fmt::Debug for Join {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Join")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

impl RunArgs {
    /// Merges flags/env over the file over defaults and validates the result.
    pub fn resolve(self) -> anyhow::Result<Config> {
        let file = match &self.config {
            Some(p) => load_file(p)?,
            None => FileConfig::default(),
        };
        let addr = |flag: Option<SocketAddr>,
                    file: Option<String>,
                    name: &str,
                    default: &str|
         -> anyhow::Result<SocketAddr> {
            match (flag, file) {
                (Some(a), _) => Ok(a),
                (None, Some(s)) => s.parse().with_context(|| {
                    format!("config field `{name}`: {s:?} is not an address like 127.0.0.1:4900")
                }),
                (None, None) => Ok(default.parse().expect("valid default")),
            }
        };
        let registry_listen = addr(
            self.registry_listen,
            file.registry_listen,
            "registry-listen",
            "127.0.0.1:4900",
        )?;
        let ops_listen = addr(
            self.ops_listen,
            file.ops_listen,
            "ops-listen",
            "0.0.0.0:4903",
        )?;
        let pick_list =
            |flag: Vec<String>, file: Vec<String>| if flag.is_empty() { file } else { flag };
        let upstream = pick_list(self.upstream, file.upstream);
        let insecure = pick_list(self.insecure_upstream, file.insecure_upstream);
        for (name, list) in [("upstream", &upstream), ("insecure-upstream", &insecure)] {
            for h in list {
                if !valid_host(h) {
                    bail!("`{name}`: {h:?} is not a registry host[:port] (no scheme, no path)");
                }
            }
        }
        let default_upstream = self
            .default_upstream
            .or(file.default_upstream)
            .unwrap_or_else(|| shoal_proto::DOCKER_HUB.to_owned());
        if !valid_host(&default_upstream) {
            bail!("`default-upstream`: {default_upstream:?} is not a registry host[:port] (no scheme, no path)");
        }
        let insecure_upstreams: HashSet<String> = insecure.into_iter().collect();
        let upstreams = if upstream.is_empty() && insecure_upstreams.is_empty() {
            None
        } else {
            let mut all: HashSet<String> = upstream.into_iter().collect();
            all.extend(insecure_upstreams.iter().cloned());
            Some(all)
        };
        let cache_max_bytes = match (self.cache_max_bytes, file.cache_max_bytes) {
            (Some(s), _) => Some(parse_size(&s).context("`cache-max-bytes`")?),
            (None, Some(toml::Value::Integer(n))) if n > 0 => Some(n as u64),
            (None, Some(toml::Value::String(s))) => {
                Some(parse_size(&s).context("config field `cache-max-bytes`")?)
            }
            (None, Some(other)) => {
                bail!("config field `cache-max-bytes`: {other} is not a positive size")
            }
            (None, None) => None,
        };
        let log_format = match self.log_format.or(file.log_format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => bail!("`log-format`: {other:?} is not one of text, json"),
        };
        let authority_ttl =
            Duration::from_secs(self.authority_ttl.or(file.authority_ttl).unwrap_or(300));
        let pick_list = |flag: Vec<String>, file: Vec<String>| {
            if flag.is_empty() {
                file
            } else {
                flag
            }
        };
        let peer_listen = addr(
            self.peer_listen,
            file.peer_listen,
            "peer-listen",
            "0.0.0.0:4901",
        )?;
        let advertise = match (self.advertise, file.advertise) {
            (Some(a), _) => Some(a),
            (None, Some(s)) => Some(s.parse().with_context(|| {
                format!("config field `advertise`: {s:?} is not an address like 10.0.0.5:4901")
            })?),
            (None, None) => None,
        };
        let trackers = pick_list(self.tracker, file.tracker);
        let dht_listen = match (self.dht_listen, file.dht_listen) {
            (Some(a), _) => Some(a),
            (None, Some(s)) => Some(s.parse().with_context(|| {
                format!("config field `dht-listen`: {s:?} is not an address like 0.0.0.0:4902")
            })?),
            (None, None) => None,
        };
        let dht_bootstrap = pick_list(self.dht_bootstrap, file.dht_bootstrap);
        for b in &dht_bootstrap {
            let port = b.rsplit_once(':').and_then(|(h, p)| {
                (!h.is_empty()).then_some(())?;
                p.parse::<u16>().ok().filter(|&p| p != 0)
            });
            if port.is_none() {
                bail!("`dht-bootstrap`: {b:?} is not HOST:PORT");
            }
        }
        if dht_listen.is_none() && !dht_bootstrap.is_empty() {
            bail!("`dht-bootstrap`: needs `dht-listen` (this node's DHT address)");
        }
        if dht_listen.is_some_and(|a| a.port() == 0) {
            bail!("`dht-listen`: needs a port other nodes can dial, not 0");
        }
        let upload_rate = rate_setting(
            self.peer_upload_rate,
            file.peer_upload_rate,
            "peer-upload-rate",
        )?;
        let upload_pacing = match self
            .peer_upload_pacing
            .or(file.peer_upload_pacing)
            .as_deref()
        {
            None | Some("auto") => true,
            Some("off") => false,
            Some(other) => bail!("`peer-upload-pacing`: {other:?} is not one of auto, off"),
        };
        let download_rate = rate_setting(
            self.peer_download_rate,
            file.peer_download_rate,
            "peer-download-rate",
        )?;
        let max_uploads = self
            .peer_max_uploads
            .or(file.peer_max_uploads)
            .unwrap_or(16);
        if !(1..=4096).contains(&max_uploads) {
            bail!("`peer-max-uploads`: {max_uploads} is not between 1 and 4096");
        }
        let max_inflight = self
            .peer_max_inflight
            .or(file.peer_max_inflight)
            .unwrap_or(shoal_proto::sched::SchedConfig::default().max_inflight);
        if !(1..=4096).contains(&max_inflight) {
            bail!("`peer-max-inflight`: {max_inflight} is not between 1 and 4096");
        }
        let chunk_size = match (self.chunk_size, file.chunk_size) {
            (Some(s), _) => parse_size(&s).context("`chunk-size`")?,
            (None, Some(toml::Value::Integer(n))) if n > 0 => n as u64,
            (None, Some(toml::Value::String(s))) => {
                parse_size(&s).context("config field `chunk-size`")?
            }
            (None, Some(other)) => bail!("config field `chunk-size`: {other} is not a size"),
            (None, None) => u64::from(shoal_proto::chunk::DEFAULT_CHUNK_SIZE),
        };
        let chunk_size = u32::try_from(chunk_size)
            .ok()
            .filter(|&c| shoal_proto::chunk::is_valid_chunk_size(c))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "`chunk-size`: {chunk_size} is not a power of two between 64KiB and 4MiB"
                )
            })?;
        let swarm = match self.cluster_dir.or(file.cluster_dir) {
            None => None,
            Some(cluster_dir) => {
                let node_id = self.node_id.or(file.node_id).unwrap_or_else(host_name);
                if !shoal_cluster::valid_node_id(&node_id) {
                    bail!("`node-id`: {node_id:?} must be lowercase DNS labels ([a-z0-9-], dots between), at most 63 characters");
                }
                let advertise = match advertise {
                    Some(a) => a,
                    None if !peer_listen.ip().is_unspecified() => peer_listen,
                    None => bail!(
                        "`advertise`: required when --peer-listen ({peer_listen}) binds all interfaces: the address other nodes dial"
                    ),
                };
                if advertise.port() == 0 || advertise.ip().is_unspecified() {
                    bail!("`advertise`: {advertise} is not an address other nodes can dial");
                }
                let rack = match self.rack.or(file.rack) {
                    None => None,
                    Some(r) => Some(r.parse().map_err(|_| {
                        anyhow::anyhow!(
                            "`rack`: {r:?} must be 1 to 64 characters of [A-Za-z0-9._-]"
                        )
                    })?),
                };
                let trackers: Vec<String> =
                    trackers.into_iter().filter(|t| t != "embedded").collect();
                for t in &trackers {
                    if !t.starts_with("https://") {
                        bail!("`tracker`: {t:?} must be an https:// URL or `embedded`");
                    }
                }
                let join = match (
                    self.join.or(file.join),
                    self.join_token_file.or(file.join_token_file),
                ) {
                    (None, None) => None,
                    (Some(url), Some(path)) => {
                        if !url.starts_with("https://") {
                            bail!("`join`: {url:?} must be an https:// URL");
                        }
                        if trackers.is_empty() {
                            bail!("`join`: needs a tracker (--tracker https://...) to renew the certificate through");
                        }
                        let text = std::fs::read_to_string(&path).with_context(|| {
                            format!("`join-token-file`: reading {}", path.display())
                        })?;
                        let token = text.lines().next().unwrap_or("").trim().to_owned();
                        if token.is_empty() {
                            bail!("`join-token-file`: {} holds no token", path.display());
                        }
                        Some(Join { url, token })
                    }
                    _ => bail!("`join` and `join-token-file` go together"),
                };
                let dht = dht_listen.map(|listen| DhtSettings {
                    listen,
                    advertise: SocketAddr::new(advertise.ip(), listen.port()),
                    bootstrap: dht_bootstrap,
                });
                Some(SwarmConfig {
                    dht,
                    join,
                    cluster_dir,
                    node_id,
                    peer_listen,
                    advertise,
                    trackers,
                    upload_rate,
                    upload_pacing,
                    download_rate,
                    max_uploads,
                    max_inflight,
                    chunk_size,
                    rack,
                })
            }
        };
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("/var/lib/shoal"));
        Ok(Config {
            admin_socket: self
                .admin_socket
                .or(file.admin_socket)
                .unwrap_or_else(|| data_dir.join("admin.sock")),
            data_dir,
            registry_listen,
            ops_listen,
            upstreams,
            insecure_upstreams,
            default_upstream,
            cache_max_bytes,
            docker_config: self.docker_config.or(file.docker_config),
            authority_ttl,
            log_format,
            swarm,
        })
    }
}

fn load_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        let msg = e.message().to_owned();
        anyhow::anyhow!("config file {}: {}", path.display(), msg)
    })
}

/// A rate from a flag (a string) or the config file (a string or a number
/// of bytes per second).
fn rate_setting(
    flag: Option<String>,
    file: Option<toml::Value>,
    name: &str,
) -> anyhow::Result<Option<u64>> {
    Ok(match (flag, file) {
        (Some(s), _) => Some(parse_rate(&s).with_context(|| format!("`{name}`"))?),
        (None, Some(toml::Value::Integer(n))) if n > 0 => Some(n as u64),
        (None, Some(toml::Value::String(s))) => {
            Some(parse_rate(&s).with_context(|| format!("config field `{name}`"))?)
        }
        (None, Some(other)) => bail!("config field `{name}`: {other} is not a positive rate"),
        (None, None) => None,
    })
}

/// Parses a rate into bytes per second ([`shoal_proto::units::parse_rate`]).
pub fn parse_rate(s: &str) -> anyhow::Result<u64> {
    Ok(shoal_proto::units::parse_rate(s)?)
}

/// Parses a size in bytes ([`shoal_proto::units::parse_size`]).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    Ok(shoal_proto::units::parse_size(s)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("10G").unwrap(), 10_000_000_000);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn swarm_limits_and_chunk_size() {
        fn member(extra: impl FnOnce(&mut RunArgs)) -> anyhow::Result<Config> {
            let mut a = RunArgs {
                cluster_dir: Some(PathBuf::from("/etc/shoal/cluster")),
                node_id: Some("node-1".into()),
                peer_listen: Some("10.0.0.5:4901".parse().unwrap()),
                ..Default::default()
            };
            extra(&mut a);
            a.resolve()
        }
        let sc = member(|_| {}).unwrap().swarm.unwrap();
        assert_eq!(sc.chunk_size, 256 << 10);
        assert_eq!(
            (
                sc.upload_rate,
                sc.upload_pacing,
                sc.download_rate,
                sc.max_uploads
            ),
            (None, true, None, 16)
        );
        assert_eq!(sc.max_inflight, 32);
        let sc = member(|a| {
            a.chunk_size = Some("256KiB".into());
            a.peer_upload_rate = Some("100mbit".into());
            a.peer_upload_pacing = Some("off".into());
            a.peer_max_uploads = Some(4);
            a.peer_max_inflight = Some(8);
        })
        .unwrap()
        .swarm
        .unwrap();
        assert_eq!(sc.chunk_size, 256 << 10);
        assert_eq!(sc.upload_rate, Some(12_500_000));
        assert!(!sc.upload_pacing);
        assert_eq!(sc.max_uploads, 4);
        assert_eq!(sc.max_inflight, 8);
        let err = member(|a| a.peer_upload_pacing = Some("sometimes".into())).unwrap_err();
        assert!(format!("{err:#}").contains("peer-upload-pacing"), "{err:#}");
        for bad in ["1000", "8MiB", "32KiB", "huge"] {
            let err = member(|a| a.chunk_size = Some(bad.into()))
                .map(|_| ())
                .unwrap_err();
            assert!(format!("{err:#}").contains("chunk-size"), "{bad}: {err:#}");
        }
        let err = member(|a| a.peer_max_uploads = Some(0)).unwrap_err();
        assert!(format!("{err:#}").contains("peer-max-uploads"), "{err:#}");
        let err = member(|a| a.peer_max_inflight = Some(0)).unwrap_err();
        assert!(format!("{err:#}").contains("peer-max-inflight"), "{err:#}");
        let err = member(|a| a.peer_download_rate = Some("quick".into())).unwrap_err();
        assert!(format!("{err:#}").contains("peer-download-rate"), "{err:#}");
        // The DHT: off by default; its advertised address is the peer
        // address's IP with the DHT port; bootstrap names need a port.
        assert!(member(|_| {}).unwrap().swarm.unwrap().dht.is_none());
        let d = member(|a| {
            a.dht_listen = Some("0.0.0.0:4902".parse().unwrap());
            a.dht_bootstrap = vec!["shoal-peers.shoal.svc:4902".into()];
        })
        .unwrap()
        .swarm
        .unwrap()
        .dht
        .unwrap();
        assert_eq!(d.advertise, "10.0.0.5:4902".parse().unwrap());
        assert_eq!(d.bootstrap, ["shoal-peers.shoal.svc:4902"]);
        for (bad, boot, says) in [
            (Some("0.0.0.0:0"), vec![], "dht-listen"),
            (Some("0.0.0.0:4902"), vec!["no-port"], "dht-bootstrap"),
            (Some("0.0.0.0:4902"), vec![":4902"], "dht-bootstrap"),
            (None, vec!["a:4902"], "needs `dht-listen`"),
        ] {
            let err = member(|a| {
                a.dht_listen = bad.map(|b| b.parse().unwrap());
                a.dht_bootstrap = boot.iter().map(|s| s.to_string()).collect();
            })
            .unwrap_err();
            assert!(format!("{err:#}").contains(says), "{err:#}");
        }
        assert_eq!(member(|_| {}).unwrap().swarm.unwrap().rack, None);
        let sc = member(|a| a.rack = Some("eu-west-1b".into()))
            .unwrap()
            .swarm
            .unwrap();
        assert_eq!(
            sc.rack.map(|r| r.to_string()).as_deref(),
            Some("eu-west-1b")
        );
        let err = member(|a| a.rack = Some("rack 9".into())).unwrap_err();
        assert!(format!("{err:#}").contains("`rack`: \"rack 9\""), "{err:#}");
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100mbit").unwrap(), 12_500_000);
        assert_eq!(parse_rate("1gbit").unwrap(), 125_000_000);
        assert_eq!(parse_rate("800kbit").unwrap(), 100_000);
        assert_eq!(parse_rate("8bit").unwrap(), 1);
        assert_eq!(parse_rate("50MB").unwrap(), 50_000_000);
        assert_eq!(parse_rate("12MiB/s").unwrap(), 12 << 20);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("mbit").is_err());
        assert!(parse_rate("0mbit").is_err());
        let err = format!("{:#}", parse_rate("10 furlongs").unwrap_err());
        assert!(err.contains("rate"), "{err}");
    }

    #[test]
    fn file_merges_under_flags_and_names_bad_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shoal.toml");
        std::fs::write(&p, "data-dir = \"/tmp/x\"\nregistry-listen = \"127.0.0.1:1\"\ncache-max-bytes = \"1GiB\"\n").unwrap();
        let args = RunArgs {
            config: Some(p.clone()),
            registry_listen: Some("127.0.0.1:2".parse().unwrap()),
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.registry_listen.port(), 2);
        assert_eq!(c.cache_max_bytes, Some(1 << 30));
        assert!(c.upstreams.is_none());

        std::fs::write(&p, "data-dri = \"/tmp/x\"\n").unwrap();
        let err = RunArgs {
            config: Some(p.clone()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(format!("{err:#}").contains("data-dri"), "{err:#}");
        std::fs::write(&p, "ops-listen = \"nope\"\n").unwrap();
        let err = RunArgs {
            config: Some(p),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(format!("{err:#}").contains("ops-listen"), "{err:#}");
        let err = RunArgs {
            upstream: vec!["https://x".into()],
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(format!("{err:#}").contains("upstream"), "{err:#}");
    }
}
