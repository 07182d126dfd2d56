//! The fleet (SPEC section 10): replicas that name the same store and fleet name apply one
//! ordered stream of commands, pool their evidence, and keep serving alone when the store
//! is gone.
//!
//! The store is Redis >= 6 or Valkey, reached through the `redis` crate's tokio
//! [`ConnectionManager`] (reconnects with back-off; lazy, so start-up never waits on it).
//! Redis is the shared log and the lock; there is no consensus of our own. Keys, all under
//! `rollgate:{<name>}:` (one hash tag: one Redis Cluster slot):
//!
//! | key | type | what |
//! |---|---|---|
//! | `epoch` | string | a random id of this incarnation of the store's data |
//! | `seq` | string (int) | the last command's sequence number (`INCR`) |
//! | `log` | stream | entry `<seq>-1`, field `c`: an [`Entry`] (capped near [`LOG_CAP`]) |
//! | `snapshot` | string | `"<seq> <json RuntimeState>"`: the state after command `seq` |
//! | `claim:<version>` | string | the command id rolling `version` back (`SET NX PX`) |
//! | `seen` | hash | replica -> last heartbeat, in the store's clock (ms) |
//! | `counts` | hash | replica -> its [`Published`] evidence counts |
//! | `leader` | string | the replica whose evaluator decides for the pooled fleet |
//! | channel `wake` | pub/sub | the new `seq`, to wake every replica at once |
//!
//! # Order
//!
//! A command made here (automatic, or through this replica's admin API) is checked
//! against the local state, then published by one script (claim, `INCR`, `XADD`,
//! `PUBLISH`), then applied by every replica, this one included, in `seq` order through
//! [`Controller::apply_local`]: the same code path, the same checks, the same record with
//! the same id (`rb-cmd-...`) in every replica's log, plus its own `replica` and the
//! `origin_replica`. A refusal is the same everywhere, and writes nothing.
//! Replicas learn of new commands from pub/sub at once, and from a heartbeat every
//! `interval` (pooling) or second (not) as the backstop for lost messages.
//!
//! # Store down
//!
//! Nothing waits on the store: a publish that fails or takes over [`PUBLISH_TIMEOUT`] is
//! applied locally at once and queued (persisted in `state_dir/fleet.json`), and published
//! when the store is back. The store's `epoch` tells a restart that lost its data: the
//! first replica back seeds it with its state, the others take that state *plus* their own
//! quarantines, and publish the quarantines the store lacks: a version rolled back
//! anywhere stays rolled back everywhere until resumed. A replica that joins (no cursor
//! for this epoch, or a cursor the capped log no longer covers) takes the snapshot first.
//! A malformed entry is logged and skipped; a key of the wrong type makes the replica
//! reseed the store (a new epoch) rather than stop.
//!
//! # Pooling (SPEC section 10, `pool: true`)
//!
//! Every heartbeat publishes this replica's cumulative counts per comparison (route,
//! candidate, baseline, fingerprints) and reads everyone's; the evaluator adds the other
//! live replicas' increments to its own each tick, so every event is counted once. Only
//! one replica (the `leader`, a 3 s lease renewed by the heartbeat) turns pooled evidence
//! into automatic decisions: the fleet runs one detector per comparison, whose false-alarm
//! guarantee is the single replica's. With the store down, or `pool: false`, every replica
//! decides on its own counts.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value as RValue};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::config::FleetConfig;
use crate::decision::{unix_ms, Action, Command, Controller, Refused};
use crate::routing::table::RuntimeState;

/// Commands kept in the store's log (approximately: `XADD MAXLEN ~`). A replica that falls
/// further behind than this takes the snapshot.
pub const LOG_CAP: u64 = 10_000;
/// How long a publish may take before the command is applied locally and queued.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_millis(250);
/// A replica unseen for this long drops out of `replicas` and of the pooled counts.
pub const LIVE: Duration = Duration::from_secs(3);
/// The evaluator lease: another replica takes over this long after the leader stops.
pub const LEASE: Duration = Duration::from_secs(3);
/// How long a rollback's claim holds: concurrent trips of one version make one decision.
pub const CLAIM_TTL: Duration = Duration::from_secs(10);
/// Replicas unseen for this long are forgotten by the store.
const FORGET_MS: u64 = 3_600_000;
/// Command ids remembered to skip a command seen twice (a publish that timed out but
/// landed, then was queued and published again).
const RECENT: usize = 4096;
/// Entries read from the log per round trip.
const PAGE: usize = 256;
/// How long start-up waits for the store to hand over the fleet's state before it serves
/// on its own (a refused connection fails at once; this bounds a silent one).
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(2);
const FLEET_FILE: &str = "fleet.json";

/// One command in the store's log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub origin: String,
    pub cmd: Command,
}

/// How a command reached [`Controller::apply_local`] in a fleet.
#[derive(Debug, Clone)]
pub struct Via {
    /// This replica's name.
    pub replica: String,
    /// The replica that made the decision.
    pub origin: String,
    /// Its place in the fleet's order (`None`: applied while the store was unreachable).
    pub seq: Option<u64>,
}

/// Per-comparison evidence counts (cumulative since the publishing process started):
/// candidate answered and errors, baseline answered and errors, candidate answers over the
/// latency SLA and over k x baseline p99, feedback and incorrect answers of both sides.
pub type Counts = [u64; 10];

/// What a replica publishes each heartbeat when pooling.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Published {
    /// A random id of the publishing process: a restart starts its counts over.
    pub boot: u64,
    pub counts: BTreeMap<String, Counts>,
}

/// The key of a comparison in [`Published::counts`].
pub fn comparison_key(
    route: &str,
    candidate: &str,
    baseline: &str,
    fingerprints: &(String, String),
) -> String {
    format!(
        "{route}\t{candidate}\t{baseline}\t{}\t{}",
        fingerprints.0, fingerprints.1
    )
}

/// A replica as the last heartbeat saw it.
#[derive(Debug, Clone, Serialize)]
pub struct Seen {
    pub replica: String,
    /// Unix ms of its last heartbeat, in the store's clock.
    pub last_seen_ms: u64,
}

/// Where this replica stands in the fleet's order; persisted in `state_dir/fleet.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct Cursor {
    /// The store epoch `seq` belongs to.
    epoch: Option<String>,
    seq: u64,
    /// Applied here while the store was unreachable; published when it is back.
    pending: Vec<Command>,
    /// Ids of commands applied here, newest last.
    recent: VecDeque<String>,
}

impl Cursor {
    fn remember(&mut self, id: &str) {
        self.recent.push_back(id.to_string());
        while self.recent.len() > RECENT {
            self.recent.pop_front();
        }
    }

    fn load(dir: &Path) -> Cursor {
        match std::fs::read(dir.join(FLEET_FILE)) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::error!(error = %e, "{FLEET_FILE} is not readable; starting with no fleet cursor (the fleet's snapshot will be taken)");
                Cursor::default()
            }),
            Err(_) => Cursor::default(),
        }
    }

    fn save(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(format!(".{FLEET_FILE}.tmp"));
        std::fs::create_dir_all(dir)?;
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(
            &mut f,
            &serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(FLEET_FILE))
    }
}

/// The heartbeat's answer.
struct Beat {
    now_ms: u64,
    /// `ok`, `empty` (no epoch: a new or wiped store) or `corrupt:<key>`.
    health: String,
    epoch: String,
    seq: u64,
    leader: Option<String>,
    seen: Vec<(String, u64)>,
    counts: Vec<(String, String)>,
}

/// The pooled counts of the other live replicas: comparison key -> (replica, boot, counts).
#[derive(Debug, Default)]
pub struct Remote {
    pub by_key: HashMap<String, Vec<(String, u64, Counts)>>,
}

/// A replica's link to its fleet.
pub struct Fleet {
    pub config: FleetConfig,
    keys: Keys,
    conn: ConnectionManager,
    /// For pub/sub pushes (RESP3), subscribed to `wake`.
    push: Mutex<Option<ConnectionManager>>,
    boot: u64,
    state_dir: PathBuf,
    up: AtomicBool,
    leader: AtomicBool,
    /// Unix ms of the last successful heartbeat (0: none yet).
    last_beat_ms: AtomicU64,
    /// The cursor's position and queue length, for status without waiting on a catch-up.
    applied_seq: AtomicU64,
    queued: AtomicU64,
    cursor: tokio::sync::Mutex<Cursor>,
    wake: Notify,
    replicas: ArcSwap<Vec<Seen>>,
    remote: ArcSwap<Remote>,
    local: ArcSwap<BTreeMap<String, Counts>>,
    heartbeat_every: Duration,
    scripts: Scripts,
    /// Commands this replica published and waits to see applied, by id: whichever
    /// catch-up applies one hands its result to the waiting caller.
    waiting: Mutex<HashMap<String, tokio::sync::oneshot::Sender<Result<Value, Refused>>>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("name", &self.config.name)
            .field("replica", &self.config.replica)
            .finish()
    }
}

struct Keys {
    epoch: String,
    seq: String,
    log: String,
    snapshot: String,
    seen: String,
    counts: String,
    leader: String,
    wake: String,
    claim_prefix: String,
}

impl Keys {
    fn new(name: &str) -> Keys {
        let p = format!("rollgate:{{{name}}}:");
        Keys {
            epoch: format!("{p}epoch"),
            seq: format!("{p}seq"),
            log: format!("{p}log"),
            snapshot: format!("{p}snapshot"),
            seen: format!("{p}seen"),
            counts: format!("{p}counts"),
            leader: format!("{p}leader"),
            wake: format!("{p}wake"),
            claim_prefix: format!("{p}claim:"),
        }
    }
}

struct Scripts {
    heartbeat: Script,
    publish: Script,
    reseed: Script,
    snapshot: Script,
}

/// Lua helpers shared by the scripts: a key's type, and whether it is usable as `want`.
const LUA_TYPE: &str = r#"
local function ty(k) local t = redis.call('TYPE', k); if type(t) == 'table' then return t['ok'] end; return t end
local function fits(k, want) local t = ty(k); return t == 'none' or t == want end
"#;

/// KEYS: epoch seq log snapshot seen counts leader. ARGV: replica, counts json ('' = none),
/// want_leader (1/0), lease ms, forget ms.
const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local health = 'ok'
if not fits(KEYS[1], 'string') then health = 'corrupt:epoch'
elseif not fits(KEYS[2], 'string') or (ty(KEYS[2]) == 'string' and tonumber(redis.call('GET', KEYS[2])) == nil) then health = 'corrupt:seq'
elseif not fits(KEYS[3], 'stream') then health = 'corrupt:log'
elseif not fits(KEYS[4], 'string') then health = 'corrupt:snapshot'
end
for _, k in ipairs({KEYS[5], KEYS[6]}) do if not fits(k, 'hash') then redis.call('DEL', k) end end
if not fits(KEYS[7], 'string') then redis.call('DEL', KEYS[7]) end
local epoch = ''
if health == 'ok' then
  epoch = redis.call('GET', KEYS[1]) or ''
  if epoch == '' then health = 'empty' end
end
local seq = 0
if health == 'ok' then seq = tonumber(redis.call('GET', KEYS[2]) or '0') end
redis.call('HSET', KEYS[5], ARGV[1], now)
if ARGV[2] ~= '' then redis.call('HSET', KEYS[6], ARGV[1], ARGV[2]) else redis.call('HDEL', KEYS[6], ARGV[1]) end
local leader = redis.call('GET', KEYS[7])
if ARGV[3] == '1' then
  if not leader then redis.call('SET', KEYS[7], ARGV[1], 'PX', ARGV[4]); leader = ARGV[1]
  elseif leader == ARGV[1] then redis.call('PEXPIRE', KEYS[7], ARGV[4]) end
elseif leader == ARGV[1] then redis.call('DEL', KEYS[7]); leader = false end
local seen = redis.call('HGETALL', KEYS[5])
local live = {}
for i = 1, #seen, 2 do
  local ts = tonumber(seen[i + 1])
  if ts == nil or now - ts > tonumber(ARGV[5]) then
    redis.call('HDEL', KEYS[5], seen[i]); redis.call('HDEL', KEYS[6], seen[i])
  else
    table.insert(live, seen[i]); table.insert(live, seen[i + 1])
  end
end
local counts = {}
if ARGV[2] ~= '' then counts = redis.call('HGETALL', KEYS[6]) end
return {now, health, epoch, seq, leader or '', live, counts}
"#;

/// KEYS: epoch seq log claim unclaim. ARGV: epoch, entry json, claim id ('' = none), claim
/// ms, unclaim (1/0), log cap, wake channel.
const PUBLISH: &str = r#"
if not fits(KEYS[1], 'string') or not fits(KEYS[2], 'string') or not fits(KEYS[3], 'stream') then
  return redis.error_reply('rollgate: a fleet key holds a value of the wrong type')
end
local e = redis.call('GET', KEYS[1]) or ''
if e ~= ARGV[1] then return {0, e} end
if ARGV[3] ~= '' then
  if not fits(KEYS[4], 'string') then redis.call('DEL', KEYS[4]) end
  local ok = redis.call('SET', KEYS[4], ARGV[3], 'NX', 'PX', ARGV[4])
  if not ok then return {-1, redis.call('GET', KEYS[4]) or ''} end
end
if ARGV[5] == '1' then redis.call('DEL', KEYS[5]) end
if tonumber(redis.call('GET', KEYS[2]) or '0') == nil then
  return redis.error_reply('rollgate: the fleet sequence is not a number')
end
local s = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], s .. '-1', 'c', ARGV[2])
redis.call('PUBLISH', ARGV[7], s)
return {s, e}
"#;

/// KEYS: epoch seq log snapshot. ARGV: the epoch observed ('' = none or broken), the new
/// epoch, the snapshot json. Returns the epoch in force afterwards.
const RESEED: &str = r#"
local cur = ''
if ty(KEYS[1]) == 'string' then cur = redis.call('GET', KEYS[1]) end
if cur ~= '' and cur ~= ARGV[1] then return cur end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], '0')
redis.call('SET', KEYS[4], '0 ' .. ARGV[3])
return ARGV[2]
"#;

/// KEYS: epoch snapshot. ARGV: epoch, seq, json. Keeps the newest snapshot.
const SNAPSHOT: &str = r#"
if ty(KEYS[1]) ~= 'string' or redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ty(KEYS[2]) == 'string' then
  local cur = tonumber(string.match(redis.call('GET', KEYS[2]), '^(%d+) '))
  if cur ~= nil and cur >= tonumber(ARGV[2]) then return 0 end
elseif ty(KEYS[2]) ~= 'none' then redis.call('DEL', KEYS[2]) end
redis.call('SET', KEYS[2], ARGV[2] .. ' ' .. ARGV[3])
return 1
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{LUA_TYPE}{body}"))
}

fn new_epoch() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// What publishing a command did.
enum Publish {
    /// In the log at this sequence number.
    At(u64),
    /// Another command holds the version's claim.
    Claimed(String),
    /// The store's epoch is not ours: sync first.
    EpochChanged,
}

fn as_u64(v: &RValue) -> Option<u64> {
    match v {
        RValue::Int(n) => u64::try_from(*n).ok(),
        RValue::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        RValue::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn as_string(v: &RValue) -> Option<String> {
    match v {
        RValue::BulkString(b) => String::from_utf8(b.clone()).ok(),
        RValue::SimpleString(s) => Some(s.clone()),
        RValue::VerbatimString { text, .. } => Some(text.clone()),
        RValue::Int(n) => Some(n.to_string()),
        RValue::Nil => Some(String::new()),
        _ => None,
    }
}

/// Pairs of a flat array (HGETALL) or the entries of a map (RESP3).
fn pairs(v: &RValue) -> Vec<(String, String)> {
    match v {
        RValue::Array(items) => items
            .chunks(2)
            .filter_map(|c| match c {
                [k, v] => Some((as_string(k)?, as_string(v)?)),
                _ => None,
            })
            .collect(),
        RValue::Map(m) => m
            .iter()
            .filter_map(|(k, v)| Some((as_string(k)?, as_string(v)?)))
            .collect(),
        _ => Vec::new(),
    }
}

fn parse_beat(v: &RValue) -> Option<Beat> {
    let RValue::Array(a) = v else { return None };
    if a.len() != 7 {
        return None;
    }
    let leader = as_string(&a[4])?;
    Some(Beat {
        now_ms: as_u64(&a[0])?,
        health: as_string(&a[1])?,
        epoch: as_string(&a[2])?,
        seq: as_u64(&a[3])?,
        leader: (!leader.is_empty()).then_some(leader),
        seen: pairs(&a[5])
            .into_iter()
            .filter_map(|(r, t)| Some((r, t.parse().ok()?)))
            .collect(),
        counts: pairs(&a[6]),
    })
}

/// The log entries of an XRANGE reply: (seq, payload) in order; malformed ones as `None`
/// payloads so the cursor can pass them.
fn parse_range(v: &RValue) -> Vec<(u64, Option<String>)> {
    let RValue::Array(entries) = v else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|e| {
            let RValue::Array(parts) = e else { return None };
            let id = as_string(parts.first()?)?;
            let seq = id.split('-').next()?.parse().ok()?;
            let payload = parts
                .get(1)
                .and_then(|f| pairs(f).into_iter().find(|(k, _)| k == "c").map(|(_, v)| v));
            Some((seq, payload))
        })
        .collect()
}

impl Fleet {
    /// Connects lazily (nothing here waits on the store).
    pub fn new(
        config: FleetConfig,
        state_dir: &Path,
        interval: Duration,
    ) -> std::io::Result<Fleet> {
        crate::proxy::client::crypto_provider();
        let mut info = redis::IntoConnectionInfo::into_connection_info(config.store.as_str())
            .map_err(|e| std::io::Error::other(format!("fleet.store: {e}")))?;
        if let Some(path) = &config.password_file {
            let password = std::fs::read_to_string(path).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("fleet.password_file {}: {e}", path.display()),
                )
            })?;
            let settings = info
                .redis_settings()
                .clone()
                .set_password(password.trim_end());
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info.clone())
            .map_err(|e| std::io::Error::other(format!("fleet.store: {e}")))?;
        let manager_config = || {
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_response_timeout(Some(Duration::from_secs(1)))
                .set_min_delay(Duration::from_millis(50))
                .set_max_delay(Duration::from_secs(1))
                .set_number_of_retries(1)
        };
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config())
            .map_err(|e| std::io::Error::other(format!("fleet.store: {e}")))?;
        let keys = Keys::new(&config.name);
        let heartbeat_every = if config.pool {
            interval.clamp(Duration::from_millis(100), Duration::from_secs(1))
        } else {
            Duration::from_secs(1)
        };
        let cursor = Cursor::load(state_dir);
        Ok(Fleet {
            applied_seq: AtomicU64::new(cursor.seq),
            queued: AtomicU64::new(cursor.pending.len() as u64),
            keys,
            conn,
            push: Mutex::new(None),
            boot: fastrand::u64(..),
            state_dir: state_dir.to_path_buf(),
            up: AtomicBool::new(false),
            leader: AtomicBool::new(false),
            last_beat_ms: AtomicU64::new(0),
            cursor: tokio::sync::Mutex::new(cursor),
            wake: Notify::new(),
            replicas: ArcSwap::from_pointee(Vec::new()),
            remote: ArcSwap::from_pointee(Remote::default()),
            local: ArcSwap::from_pointee(BTreeMap::new()),
            heartbeat_every,
            scripts: Scripts {
                heartbeat: script(HEARTBEAT),
                publish: script(PUBLISH),
                reseed: script(RESEED),
                snapshot: script(SNAPSHOT),
            },
            config,
            waiting: Mutex::new(HashMap::new()),
        })
    }

    fn waiters(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        HashMap<String, tokio::sync::oneshot::Sender<Result<Value, Refused>>>,
    > {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the store answered the last heartbeat.
    pub fn store_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Whether this replica makes automatic decisions now: always, unless the fleet pools
    /// its evidence, the store is up, and another replica holds the evaluator lease.
    pub fn decides(&self) -> bool {
        !(self.config.pool && self.store_up() && !self.leader.load(Ordering::Relaxed))
    }

    /// Whether the evaluator should add the other replicas' counts.
    pub fn pooling(&self) -> bool {
        self.config.pool && self.store_up()
    }

    /// The other live replicas' published counts.
    pub fn remote(&self) -> Arc<Remote> {
        self.remote.load_full()
    }

    /// This replica's cumulative counts, for the next heartbeat.
    pub fn set_local(&self, counts: BTreeMap<String, Counts>) {
        self.local.store(Arc::new(counts));
    }

    /// The `fleet` block of `GET /api/v1/status`.
    pub fn status(&self) -> Value {
        let seq = self.applied_seq.load(Ordering::Relaxed);
        let pending = self.queued.load(Ordering::Relaxed);
        json!({
            "name": self.config.name,
            "replica": self.config.replica,
            "store": self.config.redacted(),
            "store_up": self.store_up(),
            "pool": self.config.pool,
            "leader": self.leader.load(Ordering::Relaxed),
            "seq": seq,
            "pending": pending,
            "replicas": *self.replicas.load_full(),
        })
    }

    /// Persists the cursor, and mirrors its position and queue for status.
    fn save(&self, c: &Cursor) -> std::io::Result<()> {
        self.applied_seq.store(c.seq, Ordering::Relaxed);
        self.queued.store(c.pending.len() as u64, Ordering::Relaxed);
        c.save(&self.state_dir)
    }

    fn via(&self, origin: &str, seq: Option<u64>) -> Via {
        Via {
            replica: self.config.replica.clone(),
            origin: origin.to_string(),
            seq,
        }
    }

    fn mark_down(&self, controller: &Controller, why: &dyn std::fmt::Display) {
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::error!(store = %self.config.redacted(), error = %why, "fleet store unreachable: serving and deciding on this replica's own state and counts until it is back");
        }
        self.leader.store(false, Ordering::Relaxed);
        controller.store.metrics.fleet_store_up.set(0);
    }

    /// A command made on this replica: checked, published, then applied in the fleet's
    /// order; with the store unreachable, applied at once and queued.
    pub async fn submit(
        &self,
        controller: &Arc<Controller>,
        cmd: Command,
        began: Instant,
    ) -> Result<Value, Refused> {
        controller.check(&cmd)?;
        if self.store_up() {
            let (tx, mut rx) = tokio::sync::oneshot::channel();
            self.waiters().insert(cmd.id.clone(), tx);
            let published = tokio::time::timeout(PUBLISH_TIMEOUT, self.publish(&cmd)).await;
            if !matches!(published, Ok(Ok(Publish::At(_)))) {
                self.waiters().remove(&cmd.id);
            }
            match published {
                Ok(Ok(Publish::At(seq))) => {
                    self.catch_up(controller).await;
                    if let Ok(Ok(result)) = tokio::time::timeout(PUBLISH_TIMEOUT, &mut rx).await {
                        return result;
                    }
                    // In the log, but not read back yet (the store went away in between):
                    // apply it here now, and skip it when the log brings it.
                    let mut c = self.cursor.lock().await;
                    if self.waiters().remove(&cmd.id).is_none() {
                        // A catch-up applied it meanwhile and sent its result.
                        drop(c);
                        return rx.await.unwrap_or_else(|_| {
                            Err(Refused::Failed("the fleet applier stopped".into()))
                        });
                    }
                    tracing::warn!(seq, command = %cmd.id, "published but not read back; applying locally");
                    c.remember(&cmd.id);
                    let result = controller
                        .apply_local(cmd, began, Some(&self.via(&self.config.replica, Some(seq))))
                        .await;
                    drop(c);
                    return result;
                }
                Ok(Ok(Publish::Claimed(by))) => {
                    return Err(Refused::Conflict(format!(
                        "another replica is already rolling this version back (command {by})"
                    )));
                }
                Ok(Ok(Publish::EpochChanged)) => {
                    self.wake.notify_one();
                    tracing::warn!(command = %cmd.id, "the fleet store was reset; applying locally and publishing after the resync");
                }
                Ok(Err(e)) => self.mark_down(controller, &e),
                Err(_) => {
                    tracing::warn!(command = %cmd.id, "publishing to the fleet store timed out; applying locally and queueing it")
                }
            }
        }
        let mut c = self.cursor.lock().await;
        let result = controller
            .apply_local(
                cmd.clone(),
                began,
                Some(&self.via(&self.config.replica, None)),
            )
            .await;
        if result.is_ok() {
            c.remember(&cmd.id);
            c.pending.push(cmd);
            if let Err(e) = self.save(&c) {
                tracing::error!(error = %e, "persisting the fleet queue failed; a restart before the store is back would not publish it");
            }
        }
        result
    }

    async fn publish(&self, cmd: &Command) -> redis::RedisResult<Publish> {
        let epoch = self.cursor.lock().await.epoch.clone().unwrap_or_default();
        let entry = serde_json::to_string(&Entry {
            origin: self.config.replica.clone(),
            cmd: cmd.clone(),
        })
        .map_err(|e| redis::RedisError::from((redis::ErrorKind::Client, "json", e.to_string())))?;
        let (claim, unclaim) = match &cmd.action {
            Action::Rollback { version, .. } => (Some(version.as_str()), None),
            Action::Resume { version } => (None, Some(version.as_str())),
            _ => (None, None),
        };
        let claim_key = format!(
            "{}{}",
            self.keys.claim_prefix,
            claim.or(unclaim).unwrap_or("-")
        );
        let mut conn = self.conn.clone();
        let reply: RValue = self
            .scripts
            .publish
            .key(&self.keys.epoch)
            .key(&self.keys.seq)
            .key(&self.keys.log)
            .key(&claim_key)
            .key(&claim_key)
            .arg(&epoch)
            .arg(entry)
            .arg(if claim.is_some() { cmd.id.as_str() } else { "" })
            .arg(CLAIM_TTL.as_millis() as u64)
            .arg(if unclaim.is_some() { "1" } else { "0" })
            .arg(LOG_CAP)
            .arg(&self.keys.wake)
            .invoke_async(&mut conn)
            .await?;
        let RValue::Array(a) = &reply else {
            return Err((redis::ErrorKind::Client, "unexpected publish reply").into());
        };
        let first = a.first().and_then(|v| match v {
            RValue::Int(n) => Some(*n),
            _ => None,
        });
        Ok(match first {
            Some(n) if n > 0 => Publish::At(n as u64),
            Some(-1) => Publish::Claimed(a.get(1).and_then(as_string).unwrap_or_default()),
            _ => Publish::EpochChanged,
        })
    }

    /// Applies the log's entries after the cursor, in order; a command this replica
    /// published hands its result to [`Self::submit`].
    async fn catch_up(&self, controller: &Arc<Controller>) {
        let mut cursor = self.cursor.lock().await;
        let Some(epoch) = cursor.epoch.clone() else {
            return;
        };
        let mut conn = self.conn.clone();
        loop {
            let from = format!("{}-0", cursor.seq + 1);
            let reply: redis::RedisResult<RValue> = redis::cmd("XRANGE")
                .arg(&self.keys.log)
                .arg(&from)
                .arg("+")
                .arg("COUNT")
                .arg(PAGE)
                .query_async(&mut conn)
                .await;
            let entries = match reply {
                Ok(v) => parse_range(&v),
                Err(e) => {
                    self.mark_down(controller, &e);
                    break;
                }
            };
            if entries.is_empty() {
                break;
            }
            if entries[0].0 > cursor.seq + 1 {
                // The capped log no longer holds what came after our cursor.
                tracing::warn!(
                    cursor = cursor.seq,
                    first = entries[0].0,
                    "the fleet log was trimmed past this replica's position; taking the snapshot"
                );
                if !self.adopt(controller, &mut cursor, &epoch, false).await {
                    break;
                }
                continue;
            }
            let n = entries.len();
            for (seq, payload) in entries {
                if seq <= cursor.seq {
                    continue;
                }
                cursor.seq = seq;
                let entry = payload.as_deref().map(serde_json::from_str::<Entry>);
                let entry = match entry {
                    Some(Ok(e)) => e,
                    Some(Err(e)) => {
                        tracing::error!(seq, error = %e, "ignoring a malformed entry in the fleet log");
                        continue;
                    }
                    None => {
                        tracing::error!(seq, "ignoring a fleet log entry without a command");
                        continue;
                    }
                };
                if cursor.recent.contains(&entry.cmd.id) {
                    continue;
                }
                cursor.remember(&entry.cmd.id);
                let lag = unix_ms().saturating_sub(entry.cmd.issued_ms);
                let id = entry.cmd.id.clone();
                let mine = entry.origin == self.config.replica;
                let result = controller
                    .apply_local(
                        entry.cmd,
                        Instant::now(),
                        Some(&self.via(&entry.origin, Some(seq))),
                    )
                    .await;
                controller
                    .store
                    .metrics
                    .fleet_apply_lag
                    .observe(lag as f64 / 1000.0);
                match &result {
                    Ok(_) if mine => self.write_snapshot(controller, &epoch, seq).await,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::info!(seq, command = %id, origin = %entry.origin, refused = %e, "fleet command refused here")
                    }
                }
                if let Some(tx) = self.waiters().remove(&id) {
                    let _ = tx.send(result);
                }
            }
            if n < PAGE {
                break;
            }
        }
        if let Err(e) = self.save(&cursor) {
            tracing::error!(error = %e, "persisting the fleet cursor failed");
        }
    }

    async fn write_snapshot(&self, controller: &Controller, epoch: &str, seq: u64) {
        let mut state = controller.store.runtime_state();
        state.last_command = None;
        let Ok(json) = serde_json::to_string(&state) else {
            return;
        };
        let mut conn = self.conn.clone();
        let r: redis::RedisResult<RValue> = self
            .scripts
            .snapshot
            .key(&self.keys.epoch)
            .key(&self.keys.snapshot)
            .arg(epoch)
            .arg(seq)
            .arg(json)
            .invoke_async(&mut conn)
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "writing the fleet snapshot failed");
        }
    }

    /// Takes the store's snapshot as this replica's state. `keep_quarantines`: the store
    /// lost its data (a new epoch over ours), so this replica's quarantines are kept too and
    /// the ones the store lacks are published again. Returns false if there is no usable
    /// snapshot (the cursor then moves to the store's sequence, and the local state stays).
    async fn adopt(
        &self,
        controller: &Arc<Controller>,
        cursor: &mut Cursor,
        epoch: &str,
        keep_quarantines: bool,
    ) -> bool {
        let mut conn = self.conn.clone();
        let raw: redis::RedisResult<RValue> = redis::cmd("GET")
            .arg(&self.keys.snapshot)
            .query_async(&mut conn)
            .await;
        let parsed = raw.ok().as_ref().and_then(as_string).and_then(|s| {
            let (seq, json) = s.split_once(' ')?;
            Some((
                seq.parse::<u64>().ok()?,
                serde_json::from_str::<RuntimeState>(json).ok()?,
            ))
        });
        let Some((seq, mut state)) = parsed else {
            tracing::error!(
                "the fleet snapshot is missing or malformed; keeping this replica's state"
            );
            let store_seq: u64 = redis::cmd("GET")
                .arg(&self.keys.seq)
                .query_async::<Option<String>>(&mut conn)
                .await
                .ok()
                .flatten()
                .and_then(|s| s.parse().ok())
                .unwrap_or(cursor.seq);
            cursor.epoch = Some(epoch.to_string());
            cursor.seq = store_seq;
            return false;
        };
        let local = controller.store.runtime_state();
        let mut reassert = Vec::new();
        if keep_quarantines {
            for (v, fp) in &local.quarantined {
                if !state.quarantined.contains_key(v) {
                    state.quarantined.insert(v.clone(), fp.clone());
                    reassert.push(v.clone());
                }
            }
        }
        let mut fields = Map::new();
        fields.insert("replica".into(), json!(self.config.replica));
        fields.insert("fleet_seq".into(), json!(seq));
        fields.insert("epoch".into(), json!(epoch));
        fields.insert(
            "reason".into(),
            json!(if keep_quarantines {
                "the fleet store lost its state; took the state it was reseeded with, keeping this replica's quarantines"
            } else {
                "took the fleet's state (joining, or behind the store's capped log)"
            }),
        );
        if let Err(e) = controller.adopt(state, fields).await {
            tracing::error!(error = %e, "taking the fleet's state failed");
            return false;
        }
        cursor.epoch = Some(epoch.to_string());
        cursor.seq = seq;
        // Commands applied before the adopt may have been overwritten by it: apply them
        // again when the log brings them.
        cursor.recent.clear();
        for v in reassert {
            let cmd = Command::new(
                Action::Rollback {
                    route: None,
                    version: v.clone(),
                    trigger: crate::evaluator::rules::Trigger::Manual,
                    evidence: Value::Null,
                    expect: None,
                },
                Some(format!("replica {}", self.config.replica)),
                Some(format!(
                    "{v} was rolled back on replica {} while the fleet store lost its state: published again",
                    self.config.replica
                )),
            );
            cursor.pending.push(cmd);
        }
        true
    }

    /// Publishes the queue of commands applied while the store was unreachable, in order.
    async fn flush_pending(&self, controller: &Arc<Controller>) {
        loop {
            let next = self.cursor.lock().await.pending.first().cloned();
            let Some(cmd) = next else { return };
            match self.publish(&cmd).await {
                Ok(Publish::At(seq)) => {
                    tracing::info!(seq, command = %cmd.id, "published a decision made while the store was unreachable");
                }
                Ok(Publish::Claimed(by)) => {
                    tracing::info!(command = %cmd.id, claimed_by = %by, "a queued rollback was already claimed by another replica");
                }
                Ok(Publish::EpochChanged) => return,
                Err(e) => {
                    self.mark_down(controller, &e);
                    return;
                }
            }
            let mut c = self.cursor.lock().await;
            if c.pending.first().is_some_and(|p| p.id == cmd.id) {
                c.pending.remove(0);
            }
            if let Err(e) = self.save(&c) {
                tracing::error!(error = %e, "persisting the fleet queue failed");
            }
        }
    }

    async fn beat(&self) -> redis::RedisResult<Beat> {
        let local = self.local.load_full();
        let counts = if self.config.pool {
            serde_json::to_string(&Published {
                boot: self.boot,
                counts: (*local).clone(),
            })
            .unwrap_or_default()
        } else {
            String::new()
        };
        let mut conn = self.conn.clone();
        let reply: RValue = self
            .scripts
            .heartbeat
            .key(&self.keys.epoch)
            .key(&self.keys.seq)
            .key(&self.keys.log)
            .key(&self.keys.snapshot)
            .key(&self.keys.seen)
            .key(&self.keys.counts)
            .key(&self.keys.leader)
            .arg(&self.config.replica)
            .arg(counts)
            .arg(if self.config.pool { "1" } else { "0" })
            .arg(LEASE.as_millis() as u64)
            .arg(FORGET_MS)
            .invoke_async(&mut conn)
            .await?;
        parse_beat(&reply)
            .ok_or_else(|| (redis::ErrorKind::Client, "unexpected heartbeat reply").into())
    }

    /// One round: heartbeat, then whatever it calls for (seed, join, catch up, publish the
    /// queue). Never panics on anything the store holds.
    pub async fn sync(&self, controller: &Arc<Controller>) {
        let beat = match self.beat().await {
            Ok(b) => b,
            Err(e) => {
                self.mark_down(controller, &e);
                return;
            }
        };
        if !self.up.swap(true, Ordering::Relaxed) {
            tracing::info!(store = %self.config.redacted(), fleet = %self.config.name, replica = %self.config.replica, "fleet store reachable");
        }
        controller.store.metrics.fleet_store_up.set(1);
        self.last_beat_ms.store(beat.now_ms, Ordering::Relaxed);
        self.leader.store(
            beat.leader.as_deref() == Some(self.config.replica.as_str()),
            Ordering::Relaxed,
        );
        self.take_counts(&beat);
        if beat.health != "ok" {
            if beat.health.starts_with("corrupt") {
                tracing::error!(health = %beat.health, "a fleet key holds a value of the wrong type; reseeding the store from this replica's state");
            }
            let observed = if beat.health == "empty" {
                String::new()
            } else {
                beat.epoch.clone()
            };
            self.reseed(controller, &observed).await;
            return;
        }
        let mut cursor = self.cursor.lock().await;
        let ours = cursor.epoch.clone();
        if ours.as_deref() != Some(beat.epoch.as_str()) || beat.seq < cursor.seq {
            // A new replica (no cursor), or a store that lost its data since our cursor.
            let wiped = ours.is_some();
            if self
                .adopt(controller, &mut cursor, &beat.epoch, wiped)
                .await
            {
                if let Err(e) = self.save(&cursor) {
                    tracing::error!(error = %e, "persisting the fleet cursor failed");
                }
            }
        }
        let behind = beat.seq > cursor.seq;
        drop(cursor);
        if behind {
            self.catch_up(controller).await;
        }
        self.flush_pending(controller).await;
    }

    async fn reseed(&self, controller: &Arc<Controller>, observed: &str) {
        let mut cursor = self.cursor.lock().await;
        let mut state = controller.store.runtime_state();
        state.last_command = None;
        let json = serde_json::to_string(&state).unwrap_or_default();
        let epoch = new_epoch();
        let mut conn = self.conn.clone();
        let r: redis::RedisResult<String> = self
            .scripts
            .reseed
            .key(&self.keys.epoch)
            .key(&self.keys.seq)
            .key(&self.keys.log)
            .key(&self.keys.snapshot)
            .arg(observed)
            .arg(&epoch)
            .arg(json)
            .invoke_async(&mut conn)
            .await;
        match r {
            Ok(e) if e == epoch => {
                tracing::warn!(%epoch, "seeded the fleet store with this replica's state (new or wiped store)");
                cursor.epoch = Some(epoch);
                cursor.seq = 0;
                if let Err(e) = self.save(&cursor) {
                    tracing::error!(error = %e, "persisting the fleet cursor failed");
                }
                drop(cursor);
                self.flush_pending(controller).await;
            }
            // Another replica seeded it first: the next round joins.
            Ok(_) => self.wake.notify_one(),
            Err(e) => self.mark_down(controller, &e),
        }
    }

    fn take_counts(&self, beat: &Beat) {
        let live: Vec<Seen> = beat
            .seen
            .iter()
            .filter(|(_, t)| beat.now_ms.saturating_sub(*t) <= LIVE.as_millis() as u64)
            .map(|(r, t)| Seen {
                replica: r.clone(),
                last_seen_ms: *t,
            })
            .collect();
        let mut remote = Remote::default();
        for (replica, json) in &beat.counts {
            if replica == &self.config.replica || !live.iter().any(|s| &s.replica == replica) {
                continue;
            }
            match serde_json::from_str::<Published>(json) {
                Ok(p) => {
                    for (k, c) in p.counts {
                        remote
                            .by_key
                            .entry(k)
                            .or_default()
                            .push((replica.clone(), p.boot, c));
                    }
                }
                Err(e) => tracing::warn!(%replica, error = %e, "ignoring malformed fleet counts"),
            }
        }
        self.remote.store(Arc::new(remote));
        self.replicas.store(Arc::new(live));
    }

    /// Subscribes to `wake` on a RESP3 connection of its own; pushes wake the sync loop.
    fn subscribe(self: &Arc<Self>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let info = redis::IntoConnectionInfo::into_connection_info(self.config.store.as_str());
        let Ok(mut info) = info else { return };
        let mut settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        if let Some(path) = &self.config.password_file {
            if let Ok(p) = std::fs::read_to_string(path) {
                settings = settings.set_password(p.trim_end());
            }
        }
        info = info.set_redis_settings(settings);
        let Ok(client) = redis::Client::open(info) else {
            return;
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_max_delay(Duration::from_secs(1))
            .set_push_sender(tx)
            .set_automatic_resubscription();
        let this = self.clone();
        tokio::spawn(async move {
            let mut subscribed = false;
            loop {
                if !subscribed {
                    let manager =
                        ConnectionManager::new_lazy_with_config(client.clone(), config.clone());
                    if let Ok(mut m) = manager {
                        if m.subscribe(&this.keys.wake).await.is_ok() {
                            subscribed = true;
                            *this.push.lock().unwrap_or_else(|e| e.into_inner()) = Some(m);
                        }
                    }
                    if !subscribed {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
                match rx.recv().await {
                    Some(_) => this.wake.notify_one(),
                    None => {
                        subscribed = false;
                    }
                }
            }
        });
    }

    /// The first sync at start-up, bounded by [`JOIN_TIMEOUT`]: with the store reachable,
    /// this replica takes the fleet's state before it serves.
    pub async fn join(&self, controller: &Arc<Controller>) {
        if tokio::time::timeout(JOIN_TIMEOUT, self.sync(controller))
            .await
            .is_err()
        {
            tracing::warn!(
                "the fleet store did not answer in time; serving on this replica's own state"
            );
        }
    }

    /// The sync loop: a heartbeat every period, and a catch-up whenever pub/sub says a
    /// command was published. Runs until `stop` turns true.
    pub async fn run(
        self: Arc<Self>,
        controller: Arc<Controller>,
        mut stop: watch::Receiver<bool>,
    ) {
        self.subscribe();
        let mut tick = tokio::time::interval(self.heartbeat_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let beat = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = tick.tick() => true,
                _ = self.wake.notified() => false,
            };
            if beat {
                self.sync(&controller).await;
            } else if self.store_up() {
                self.catch_up(&controller).await;
            }
            let live = self.replicas.load().len().max(1);
            controller.store.metrics.fleet_replicas.set(live as i64);
        }
        // Step down at once so another replica takes the evaluator lease without waiting.
        if self.leader.swap(false, Ordering::Relaxed) {
            let mut conn = self.conn.clone();
            let _ = tokio::time::timeout(
                Duration::from_millis(500),
                redis::Script::new(
                    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
                )
                .key(&self.keys.leader)
                .arg(&self.config.replica)
                .invoke_async::<RValue>(&mut conn),
            )
            .await;
        }
    }
}
