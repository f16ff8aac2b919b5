//! Tracker replicas that share their state through Redis
//! (`shoal-tracker --store redis://...`).
//!
//! Every replica runs the same deterministic [`Tracker`] core. A request that
//! changes the tracker ([`Command`]) is not applied where it arrives: it is
//! appended to one Redis stream, the **log**, and every replica applies the
//! log's entries in the log's order, each at the time in its stream id (the
//! Redis server's clock in milliseconds, never going backwards). Same
//! commands, same order, same times: every replica holds the same state,
//! lease grants are decided once for the whole cluster (two replicas never
//! lease one chunk twice), and a member may fail over from one replica to
//! another mid-pull — its hash cursors and leases mean the same there.
//!
//! - **Acknowledged means logged.** The replica that took a request answers
//!   only after Redis has stored its entry and the replica has applied it; the
//!   reply is what the core returned for that entry. A replica killed after
//!   that loses nothing: the entry is in Redis, and every other replica
//!   applies it. One killed before it leaves a request that is either not
//!   logged or logged and unanswered (the member retries elsewhere; every
//!   command is safe to repeat).
//! - **Lookups are local**: answered from the replica's state as of the last
//!   entry it applied (it follows the log within milliseconds), at that
//!   entry's time. They change nothing, so they are not logged.
//! - **Time moves by the log**: each replica logs [`Command::Expire`] every
//!   expire interval, so members, leases and exclusions expire everywhere at
//!   the same log position even when no member calls.
//! - **Snapshots bound the log**: every `snapshot_interval` one replica (a
//!   Redis lock picks it) stores its whole state with the id of the last
//!   entry it reflects, then trims the log to the *previous* snapshot's id.
//!   A replica that starts, or fell so far behind that entries it had not
//!   applied were trimmed, loads the newest snapshot and follows the log from
//!   there. The trim point is written before the trim, and a reader checks it
//!   after each read, so a gap is always noticed.
//! - **Redis unreachable**: commands fail with `503 unavailable` at once (the
//!   member's client tries its next tracker URL); lookups keep being answered
//!   from the last state. Redis's own availability (Sentinel, replicas,
//!   persistence) is the Redis operator's.
//!
//! Keys, under a prefix (default `shoal`): `PREFIX:log` (the stream; fields
//! `op`, `body`, `from`, `tok`), `PREFIX:snapshot` (hash: `id`, `state`),
//! `PREFIX:trimmed` (the id below which entries may be gone),
//! `PREFIX:meta` (hash: `format`, the log format and tracker configuration
//! every replica must share; `epoch_base`), `PREFIX:snapshot-lock`.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::{AsyncConnectionConfig, Value};
use shoal_proto::tracker_api::TrackerError;
use tokio::sync::oneshot;

use crate::command::{Command, Outcome};
use crate::{Tracker, TrackerConfig};

/// Version of the log's entries and snapshots; replicas of another format
/// refuse to join.
const FORMAT: u32 = 1;

/// Entries read from the log at once.
const READ_BATCH: usize = 1024;

/// How long one read of the log blocks waiting for entries.
const READ_BLOCK: Duration = Duration::from_millis(1000);

/// Settings of a replica.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// `redis://[user:password@]host[:port][/db]` (or `rediss://`).
    pub url: String,
    /// Prefix of every key; replicas of one cluster share it.
    pub prefix: String,
    /// How often a snapshot is stored (by one replica) and the log trimmed.
    pub snapshot_interval: Duration,
    /// How long a command may take from arrival to reply: Redis storing
    /// it, then this replica applying it. Beyond it, `503 unavailable`.
    pub command_timeout: Duration,
}

impl ReplicaConfig {
    /// Defaults for `url`: prefix `shoal`, a snapshot every 60 s, commands
    /// answered within 5 s.
    pub fn new(url: impl Into<String>) -> Self {
        ReplicaConfig {
            url: url.into(),
            prefix: "shoal".into(),
            snapshot_interval: Duration::from_secs(60),
            command_timeout: Duration::from_secs(5),
        }
    }
}

/// A position in the log: a Redis stream id `MS-SEQ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct EntryId {
    /// The Redis server's time when the entry was added, in milliseconds.
    pub ms: u64,
    /// Order among entries of the same millisecond.
    pub seq: u64,
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for EntryId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (ms, seq) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?} is not a stream id"))?;
        let num = |t: &str| {
            t.parse::<u64>()
                .map_err(|_| format!("{s:?} is not a stream id"))
        };
        Ok(EntryId {
            ms: num(ms)?,
            seq: num(seq)?,
        })
    }
}

/// Why a command was not answered.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The core refused the command (the reply to give the member).
    #[error(transparent)]
    Refused(#[from] TrackerError),
    /// Redis could not be reached, or the command was not applied in time.
    #[error("{0}")]
    Unavailable(String),
}

/// What a waiting request gets: the outcome and the log time it was made
/// at, or why not.
type Applied = Result<(Outcome, u64), ReplicaError>;

/// Counts for `/metrics` (clones share them).
#[derive(Debug, Default, Clone)]
pub struct ReplicaCounters {
    /// Log entries applied.
    pub applied: Counter,
    /// Commands logged by this replica.
    pub logged: Counter,
    /// Commands that failed for Redis (not logged, or not applied in time).
    pub unavailable: Counter,
    /// Snapshots loaded (at start and after falling behind a trim).
    pub snapshots_loaded: Counter,
    /// Snapshots stored by this replica.
    pub snapshots_stored: Counter,
    /// Entries that could not be read back (damaged).
    pub undecodable: Counter,
}

#[derive(Debug, Clone)]
struct Keys {
    log: String,
    snapshot: String,
    trimmed: String,
    meta: String,
    lock: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Keys {
            log: format!("{prefix}:log"),
            snapshot: format!("{prefix}:snapshot"),
            trimmed: format!("{prefix}:trimmed"),
            meta: format!("{prefix}:meta"),
            lock: format!("{prefix}:snapshot-lock"),
        }
    }
}

/// One tracker replica: its core, shared with the server for lookups, and
/// its place in the log.
pub struct Replica {
    tracker: Arc<RwLock<Tracker>>,
    /// The last entry applied; written with the tracker locked.
    applied: Mutex<EntryId>,
    cfg: ReplicaConfig,
    tracker_cfg: TrackerConfig,
    keys: Keys,
    client: redis::Client,
    /// For commands and snapshots; reconnects by itself after Redis
    /// restarts.
    conn: ConnectionManager,
    /// The log format and configuration this replica runs (`PREFIX:meta`).
    format: String,
    /// This replica's name in log entries (`from`).
    me: String,
    next_token: AtomicU64,
    waiting: Mutex<HashMap<u64, oneshot::Sender<Applied>>>,
    counters: ReplicaCounters,
}

impl fmt::Debug for Replica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replica")
            .field("prefix", &self.cfg.prefix)
            .field("me", &self.me)
            .field("applied", &self.applied())
            .finish_non_exhaustive()
    }
}

fn redis_error(what: &str, e: impl fmt::Display) -> ReplicaError {
    ReplicaError::Unavailable(format!("{what}: {e}"))
}

impl Replica {
    /// Connects to Redis, checks that the replicas already there run the
    /// same log format and tracker configuration, loads the newest snapshot
    /// and starts following the log. Fails if Redis is unreachable or the
    /// configurations differ.
    pub async fn open(cfg: ReplicaConfig, tracker_cfg: TrackerConfig) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context;
        tracker_cfg.validate()?;
        let client = redis::Client::open(cfg.url.as_str())
            .with_context(|| format!("--store {}: not a Redis URL", redacted(&cfg.url)))?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(cfg.command_timeout))
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_with_config(client.clone(), manager)
            .await
            .with_context(|| format!("connecting to Redis at {}", redacted(&cfg.url)))?;
        let keys = Keys::new(&cfg.prefix);
        let mut c = conn.clone();
        let format = serde_json::json!({ "format": FORMAT, "config": tracker_cfg }).to_string();
        let base = crate::clock::epoch_base();
        let (_, _, theirs, base): ((), (), String, u64) = redis::pipe()
            .cmd("HSETNX")
            .arg(&keys.meta)
            .arg("format")
            .arg(&format)
            .cmd("HSETNX")
            .arg(&keys.meta)
            .arg("epoch_base")
            .arg(base)
            .cmd("HGET")
            .arg(&keys.meta)
            .arg("format")
            .cmd("HGET")
            .arg(&keys.meta)
            .arg("epoch_base")
            .query_async::<((), (), String, u64)>(&mut c)
            .await
            .context("reading the replicas' settings from Redis")?;
        if theirs != format {
            anyhow::bail!(
                "the tracker replicas under Redis prefix {:?} run {theirs}, this one {format}: run one version and configuration (or another --store-prefix)",
                cfg.prefix
            );
        }
        let (tracker, at) = match load_snapshot(&mut c, &keys, &tracker_cfg).await? {
            Some((t, at)) => (t, at),
            None => (
                Tracker::new(tracker_cfg.clone())?.starting_epochs_at(base),
                EntryId::default(),
            ),
        };
        let replica = Arc::new(Replica {
            tracker: Arc::new(RwLock::new(tracker)),
            applied: Mutex::new(at),
            me: format!("{}-{}", std::process::id(), crate::clock::epoch_base()),
            cfg,
            tracker_cfg,
            keys,
            client,
            conn,
            format,
            next_token: AtomicU64::new(1),
            waiting: Mutex::new(HashMap::new()),
            counters: ReplicaCounters::default(),
        });
        if at != EntryId::default() {
            replica.counters.snapshots_loaded.inc();
        }
        tracing::info!(snapshot = %at, prefix = %replica.cfg.prefix, "tracker replica joined the log");
        tokio::spawn(replica.clone().follow());
        tokio::spawn(replica.clone().snapshots());
        Ok(replica)
    }

    /// The core, as of the last entry applied.
    pub fn tracker(&self) -> &Arc<RwLock<Tracker>> {
        &self.tracker
    }

    /// The last entry applied.
    pub fn applied(&self) -> EntryId {
        *self.applied.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts for metrics.
    pub fn counters(&self) -> &ReplicaCounters {
        &self.counters
    }

    /// Logs `cmd` and returns what the core returned for it once this
    /// replica has applied it.
    pub async fn submit(&self, cmd: Command) -> Result<(Outcome, u64), ReplicaError> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock_waiting().insert(token, tx);
        let deadline = tokio::time::Instant::now() + self.cfg.command_timeout;
        let result = async {
            let mut c = self.conn.clone();
            redis::cmd("XADD")
                .arg(&self.keys.log)
                .arg("*")
                .arg("op")
                .arg(cmd.op())
                .arg("body")
                .arg(cmd.body())
                .arg("from")
                .arg(&self.me)
                .arg("tok")
                .arg(token)
                .query_async::<String>(&mut c)
                .await
                .map_err(|e| redis_error("logging the request in Redis", e))?;
            self.counters.logged.inc();
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(applied)) => applied,
                Ok(Err(_)) => Err(ReplicaError::Unavailable(
                    "the request was logged but this replica skipped it (it fell behind and loaded a snapshot)"
                        .into(),
                )),
                Err(_) => Err(ReplicaError::Unavailable(format!(
                    "the request was logged but not applied within {:?} (is this replica following the log?)",
                    self.cfg.command_timeout
                ))),
            }
        };
        let result = match tokio::time::timeout_at(deadline, result).await {
            Ok(r) => r,
            Err(_) => Err(ReplicaError::Unavailable(format!(
                "Redis did not store the request within {:?}",
                self.cfg.command_timeout
            ))),
        };
        self.lock_waiting().remove(&token);
        if matches!(result, Err(ReplicaError::Unavailable(_))) {
            self.counters.unavailable.inc();
        }
        result
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Applied>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Follows the log for as long as the replica lives: reads entries
    /// after the last applied one and applies them, reconnecting to Redis
    /// after errors.
    async fn follow(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let conn = self
                .client
                .get_multiplexed_async_connection_with_config(&connection_config(
                    READ_BLOCK + self.cfg.command_timeout,
                ))
                .await;
            let mut conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach Redis to follow the tracker log; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            loop {
                if let Err(e) = self.read_once(&mut conn).await {
                    tracing::warn!(error = %e, "reading the tracker log from Redis failed; reconnecting");
                    break;
                }
            }
        }
    }

    /// One read of the log: entries after the last applied, then the trim
    /// point (read after them: if the log was trimmed past the last applied
    /// entry before this read, what it returned may have a gap).
    async fn read_once(&self, conn: &mut MultiplexedConnection) -> Result<(), ReplicaError> {
        let after = self.applied();
        let (entries, trimmed): (Value, Option<String>) = redis::pipe()
            .cmd("XREAD")
            .arg("COUNT")
            .arg(READ_BATCH)
            .arg("BLOCK")
            .arg(READ_BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.keys.log)
            .arg(after.to_string())
            .cmd("GET")
            .arg(&self.keys.trimmed)
            .query_async(conn)
            .await
            .map_err(|e| redis_error("XREAD", e))?;
        let trimmed = trimmed.and_then(|t| t.parse::<EntryId>().ok());
        if trimmed.is_some_and(|t| after < t) {
            return self.catch_up(conn, after).await;
        }
        let entries = parse_entries(entries).map_err(|e| redis_error("XREAD", e))?;
        if entries.is_empty() {
            return Ok(());
        }
        let mut replies = Vec::new();
        {
            let mut t = self.tracker.write().unwrap_or_else(|p| p.into_inner());
            let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
            for e in entries {
                if e.id <= *applied {
                    continue;
                }
                let outcome = match Command::decode(&e.op, &e.body) {
                    Ok(cmd) => cmd.apply(&mut t, e.id.ms).map_err(ReplicaError::from),
                    Err(err) => {
                        // A replica of this format wrote it, so this is
                        // damage; every replica skips it alike.
                        self.counters.undecodable.inc();
                        tracing::error!(entry = %e.id, error = %err, "skipping a log entry that does not decode");
                        Err(ReplicaError::Unavailable(format!(
                            "the logged request did not decode: {err}"
                        )))
                    }
                };
                *applied = e.id;
                self.counters.applied.inc();
                if e.from == self.me {
                    let now = t.now();
                    replies.push((e.token, outcome.map(|o| (o, now))));
                }
            }
        }
        if !replies.is_empty() {
            let mut waiting = self.lock_waiting();
            for (token, applied) in replies {
                if let Some(tx) = waiting.remove(&token) {
                    let _ = tx.send(applied);
                }
            }
        }
        Ok(())
    }

    /// Entries this replica had not applied were trimmed: start again from
    /// the newest snapshot. Requests of this replica's own in that stretch
    /// are answered `503` (the member retries).
    async fn catch_up(
        &self,
        conn: &mut MultiplexedConnection,
        after: EntryId,
    ) -> Result<(), ReplicaError> {
        let loaded = load_snapshot(conn, &self.keys, &self.tracker_cfg)
            .await
            .map_err(|e| redis_error("loading the tracker snapshot", e))?;
        let Some((fresh, at)) = loaded.filter(|(_, at)| *at > after) else {
            tracing::error!(applied = %after, "the tracker log was trimmed past this replica but no newer snapshot is stored; following from where the log begins");
            // Skip to the trim point: entries below it are gone either way.
            if let Some(t) = self.trim_point(conn).await {
                let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
                *applied = (*applied).max(EntryId {
                    ms: t.ms,
                    seq: t.seq.saturating_sub(1),
                });
            }
            return Ok(());
        };
        {
            let mut t = self.tracker.write().unwrap_or_else(|p| p.into_inner());
            let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
            *t = fresh;
            *applied = at;
        }
        self.counters.snapshots_loaded.inc();
        // Waiters for entries the snapshot covered will not be answered:
        // drop them now rather than at their timeout.
        self.lock_waiting().clear();
        tracing::warn!(from = %after, to = %at, "this tracker replica fell behind the trimmed log and loaded a snapshot");
        Ok(())
    }

    async fn trim_point(&self, conn: &mut MultiplexedConnection) -> Option<EntryId> {
        redis::cmd("GET")
            .arg(&self.keys.trimmed)
            .query_async::<Option<String>>(conn)
            .await
            .ok()
            .flatten()
            .and_then(|t| t.parse().ok())
    }

    /// Every snapshot interval: if this replica wins the lock, stores its
    /// state and trims the log to the previous snapshot. Every couple of
    /// seconds in between, checks that Redis still holds the replicas'
    /// settings: if it lost everything (restarted without persistence),
    /// this replica writes them back and stores its state at once, so a
    /// replica that starts next begins from it, not from nothing.
    async fn snapshots(self: Arc<Self>) {
        let check = self.cfg.snapshot_interval.min(Duration::from_secs(2));
        let mut tick = tokio::time::interval(check);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut last = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            let wiped = match self.reseed_if_wiped().await {
                Ok(w) => w,
                Err(e) => {
                    tracing::debug!(error = %e, "checking the Redis store failed");
                    continue;
                }
            };
            if !wiped && last.elapsed() < self.cfg.snapshot_interval {
                continue;
            }
            last = tokio::time::Instant::now();
            if let Err(e) = self.snapshot_once().await {
                tracing::warn!(error = %e, "storing a tracker snapshot failed");
            }
        }
    }

    /// Writes the replicas' settings back if Redis lost them; whether it
    /// did.
    async fn reseed_if_wiped(&self) -> Result<bool, ReplicaError> {
        let mut c = self.conn.clone();
        let written: bool = redis::cmd("HSETNX")
            .arg(&self.keys.meta)
            .arg("format")
            .arg(&self.format)
            .query_async(&mut c)
            .await
            .map_err(|e| redis_error("checking the replicas' settings", e))?;
        if written {
            tracing::warn!(prefix = %self.cfg.prefix, "Redis lost the tracker's shared state (restarted without persistence?): storing this replica's");
            // The lock may be from before the loss: it is gone too.
        }
        Ok(written)
    }

    /// Stores a snapshot and trims the log, if no other replica did within
    /// the interval. Returns whether this replica stored one.
    pub async fn snapshot_once(&self) -> Result<bool, ReplicaError> {
        let mut c = self.conn.clone();
        let lease_ms = (self.cfg.snapshot_interval.as_millis() as u64 / 2).max(1);
        let won: Option<String> = redis::cmd("SET")
            .arg(&self.keys.lock)
            .arg(&self.me)
            .arg("NX")
            .arg("PX")
            .arg(lease_ms)
            .query_async(&mut c)
            .await
            .map_err(|e| redis_error("taking the snapshot lock", e))?;
        if won.is_none() {
            return Ok(false);
        }
        let (state, at) = {
            let t = self.tracker.read().unwrap_or_else(|p| p.into_inner());
            let at = self.applied();
            if at == EntryId::default() {
                return Ok(false);
            }
            (t.snapshot(), at)
        };
        // Store it unless as new a one is there; answer whether it was
        // stored and the id it replaced ("" for none).
        let (stored, previous): (bool, String) = redis::Script::new(
            r"
            local old = redis.call('HGET', KEYS[1], 'id')
            if old then
                local oms, oseq = string.match(old, '^(%d+)-(%d+)$')
                local nms, nseq = string.match(ARGV[1], '^(%d+)-(%d+)$')
                oms, oseq, nms, nseq = tonumber(oms), tonumber(oseq), tonumber(nms), tonumber(nseq)
                if oms > nms or (oms == nms and oseq >= nseq) then
                    return {0, ''}
                end
            end
            redis.call('HSET', KEYS[1], 'id', ARGV[1], 'state', ARGV[2])
            return {1, old or ''}
            ",
        )
        .key(&self.keys.snapshot)
        .arg(at.to_string())
        .arg(state.as_slice())
        .invoke_async(&mut c)
        .await
        .map_err(|e| redis_error("storing the tracker snapshot", e))?;
        if !stored {
            return Ok(false);
        }
        self.counters.snapshots_stored.inc();
        if let Ok(prev) = previous.parse::<EntryId>() {
            // The trim point first, so readers notice a gap before it opens.
            let _: () = redis::pipe()
                .cmd("SET")
                .arg(&self.keys.trimmed)
                .arg(prev.to_string())
                .ignore()
                .cmd("XTRIM")
                .arg(&self.keys.log)
                .arg("MINID")
                .arg(prev.to_string())
                .ignore()
                .query_async(&mut c)
                .await
                .map_err(|e| redis_error("trimming the tracker log", e))?;
        }
        tracing::debug!(at = %at, bytes = state.len(), "stored a tracker snapshot");
        Ok(true)
    }
}

fn connection_config(response_timeout: Duration) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(response_timeout))
}

/// The URL without its password, for messages.
fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "(unparsable URL)".into(),
    }
}

/// The newest snapshot, restored, with the id it reflects.
async fn load_snapshot(
    c: &mut impl ConnectionLike,
    keys: &Keys,
    cfg: &TrackerConfig,
) -> anyhow::Result<Option<(Tracker, EntryId)>> {
    let (id, state): (Option<String>, Option<Vec<u8>>) = redis::cmd("HMGET")
        .arg(&keys.snapshot)
        .arg("id")
        .arg("state")
        .query_async(c)
        .await?;
    let (Some(id), Some(state)) = (id, state) else {
        return Ok(None);
    };
    let at: EntryId = id
        .parse()
        .map_err(|e| anyhow::anyhow!("tracker snapshot: {e}"))?;
    let t = Tracker::restore(cfg.clone(), &state)
        .map_err(|e| anyhow::anyhow!("tracker snapshot at {at}: {e}"))?;
    Ok(Some((t, at)))
}

/// One log entry as read.
#[derive(Debug)]
struct Entry {
    id: EntryId,
    op: String,
    body: Vec<u8>,
    from: String,
    token: u64,
}

/// The entries of an `XREAD` reply for one stream (nil when none came).
fn parse_entries(v: Value) -> Result<Vec<Entry>, String> {
    let streams = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(s) => s,
        Value::Map(m) => m
            .into_iter()
            .map(|(k, v)| Value::Array(vec![k, v]))
            .collect(),
        other => return Err(format!("unexpected reply {other:?}")),
    };
    let mut out = Vec::new();
    for s in streams {
        let Value::Array(mut kv) = s else {
            return Err("a stream is not a pair".into());
        };
        let Some(Value::Array(items)) = kv.pop() else {
            return Err("a stream has no entries".into());
        };
        for item in items {
            let Value::Array(mut pair) = item else {
                return Err("an entry is not a pair".into());
            };
            let fields = pair.pop();
            let id = pair.pop();
            let id: String = redis::from_redis_value(id.unwrap_or(Value::Nil))
                .map_err(|e| format!("entry id: {e}"))?;
            let mut e = Entry {
                id: id.parse()?,
                op: String::new(),
                body: Vec::new(),
                from: String::new(),
                token: 0,
            };
            let fields = match fields {
                Some(Value::Array(f)) => f,
                _ => return Err(format!("entry {id} has no fields")),
            };
            let mut it = fields.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                let k: String = redis::from_redis_value(k).map_err(|e| e.to_string())?;
                match k.as_str() {
                    "op" => e.op = redis::from_redis_value(v).map_err(|e| e.to_string())?,
                    "body" => e.body = redis::from_redis_value(v).map_err(|e| e.to_string())?,
                    "from" => e.from = redis::from_redis_value(v).map_err(|e| e.to_string())?,
                    "tok" => e.token = redis::from_redis_value(v).map_err(|e| e.to_string())?,
                    _ => {}
                }
            }
            out.push(e);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_parse_print_and_order() {
        let a: EntryId = "1700000000000-0".parse().unwrap();
        let b: EntryId = "1700000000000-12".parse().unwrap();
        let c: EntryId = "1700000000001-0".parse().unwrap();
        assert!(a < b && b < c);
        assert_eq!(b.to_string(), "1700000000000-12");
        for bad in ["", "1", "1-", "-1", "a-1", "1-b", "1-2-3"] {
            assert!(bad.parse::<EntryId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redacted("redis://user:secret@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redacted("redis://host"), "redis://host");
    }
}
