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
//! | `origin` | string | `"<epoch> <seq>"`: the position of the replica that seeded the store |
//! | `claim:<version>` | string | `"<epoch> <command id>"` rolling `version` back (`SET NX PX`) |
//! | `published:<id>` | string | the `seq` a command got (1 h): a retried publish is not a second one |
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
//! queued (persisted in `state_dir/fleet.json`) and applied locally at once, and published
//! when the store is back. When the log brings such a command back, it is applied again at
//! its place in the order if that changes anything (a replica that acted alone ends in the
//! fleet's state, not its own). The store's `epoch` tells a restart that lost its data: the
//! first replica back seeds it with its state (and records the position it had reached in
//! the old log; a replica that had seen more reseeds it again), the others take that state
//! *plus* their own quarantines, and publish the quarantines the store lacks: a version
//! rolled back anywhere stays rolled back everywhere until resumed. A replica that joins
//! (no cursor for this epoch, or more than `BEHIND_MAX` entries behind) takes the snapshot
//! first. A malformed entry is logged and skipped; entries beyond the store's `seq` are not
//! rollgate's and are ignored; a key of the wrong type, a sequence that is not a count or a
//! log ahead of its sequence makes the replica reseed the store (a new epoch) rather than
//! stop. A rollback of a bundle a replica does not serve (a rolling update) keeps that
//! bundle's quarantine there. Commands run in tasks of their own: a caller that goes away
//! never leaves a change applied but unpublished or unrecorded. Two live processes with
//! one replica name are detected; neither takes the lease or decides while both live.
//!
//! # Pooling (SPEC section 10, `pool: true`)
//!
//! Every heartbeat publishes this replica's cumulative counts per comparison (route,
//! candidate, baseline, fingerprints) and reads everyone's; the evaluator adds the other
//! live replicas' increments to its own each tick, so every event is counted once (a
//! replica's counts are added from the tick this comparison first sees that process, never
//! what it counted before). Only one replica (the `leader`, a 3 s lease renewed by the
//! heartbeat, taken over when its holder is not live) turns pooled evidence into automatic
//! decisions: the fleet runs one detector per comparison, whose false-alarm guarantee is
//! the single replica's. A comparison the lease holder does not judge (it does not serve
//! it) is decided by the replicas that do. With the store down, or `pool: false`, every
//! replica decides on its own counts (with `pool: false`, N replicas are N detectors: up to
//! N times the false-alarm rate). Drift samples and feedback ids stay per replica.

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

use crate::config::{FleetConfig, VersionName};
use crate::decision::{unix_ms, Action, Command, Controller, Refused};
use crate::routing::table::RuntimeState;

/// Commands kept in the store's log (approximately: `XADD MAXLEN ~`). A replica that falls
/// further behind than this takes the snapshot.
pub const LOG_CAP: u64 = 10_000;
/// How long a publish may take before the command is applied locally and queued (a
/// publish is one script on one round trip: a millisecond when the store is well).
pub const PUBLISH_TIMEOUT: Duration = Duration::from_millis(100);
/// A replica unseen for this long drops out of `replicas` and of the pooled counts.
pub const LIVE: Duration = Duration::from_secs(3);
/// The evaluator lease: another replica takes over this long after the leader stops.
pub const LEASE: Duration = Duration::from_secs(3);
/// How long a rollback's claim holds: concurrent trips of one version make one decision.
pub const CLAIM_TTL: Duration = Duration::from_secs(10);
/// How long the store remembers that a command id was published (a retried publish of
/// the same command returns its first place instead of a second one).
const PUBLISHED_TTL_MS: u64 = 3_600_000;
/// Replicas unseen for this long are forgotten by the store.
const FORGET_MS: u64 = 3_600_000;
/// Ids of commands applied here ahead of the fleet's order, remembered so that the log's
/// copy is applied again only if it changes something.
const RECENT: usize = 256;
/// Entries read from the log per round trip.
const PAGE: usize = 256;
/// A replica further behind the log than this takes the snapshot before the rest.
const BEHIND_MAX: u64 = 64;
/// How long start-up waits for the store to hand over the fleet's state before it serves
/// on its own (a refused connection fails at once; this bounds a silent one).
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(2);
const FLEET_FILE: &str = "fleet.json";

/// One command in the store's log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub origin: String,
    pub cmd: Command,
    /// For a rollback: the bundle it quarantined on the replica that decided, so a replica
    /// that does not serve that version yet still keeps the quarantine (SPEC §1).
    #[serde(default)]
    pub fingerprint: Option<String>,
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
    /// The store epoch `seq` belongs to.
    pub epoch: Option<String>,
    /// Already applied here ahead of the fleet's order (while the store was unreachable, or
    /// a publish that timed out): applied again at its place in the order only if that
    /// changes something, so every replica ends in the same state.
    pub replay: bool,
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
    /// Ids of commands applied here ahead of the fleet's order, newest last.
    recent: VecDeque<String>,
    /// The runtime state before the first queued command: what this replica seeds a wiped
    /// store with, so the queued decisions reach every replica as themselves (under their
    /// ids) rather than as part of a snapshot.
    base: Option<RuntimeState>,
}

impl Cursor {
    fn remember(&mut self, id: &str) {
        self.recent.push_back(id.to_string());
        while self.recent.len() > RECENT {
            self.recent.pop_front();
        }
    }

    /// The persisted cursor; `last`, the fleet position persisted with the runtime state,
    /// wins when it is further (a crash between an apply and the cursor's save).
    fn load(dir: &Path, last: Option<(String, u64)>) -> Cursor {
        let mut c = match std::fs::read(dir.join(FLEET_FILE)) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::error!(error = %e, "{FLEET_FILE} is not readable; starting with no fleet cursor (the fleet's snapshot will be taken)");
                Cursor::default()
            }),
            Err(_) => Cursor::default(),
        };
        if let Some((epoch, seq)) = last {
            if c.epoch.as_deref() == Some(epoch.as_str()) && seq > c.seq {
                c.seq = seq;
            }
        }
        c
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
    /// The epoch key as it is (also when another key is corrupt).
    epoch: String,
    seq: u64,
    leader: Option<String>,
    seen: Vec<(String, u64)>,
    counts: Vec<(String, String)>,
    /// Another live process uses this replica's name.
    duplicate: bool,
    /// The snapshot's sequence number (`None`: missing or unreadable).
    snapshot: Option<u64>,
}

/// The pooled counts of the other live replicas: comparison key -> (replica, boot, counts).
#[derive(Debug, Default)]
pub struct Remote {
    pub by_key: HashMap<String, Vec<(String, u64, Counts)>>,
}

type Waiters = HashMap<String, tokio::sync::oneshot::Sender<Result<Value, Refused>>>;

/// A replica's link to its fleet.
pub struct Fleet {
    pub config: FleetConfig,
    keys: Keys,
    conn: ConnectionManager,
    /// The pub/sub connection (RESP3), subscribed to `wake`, kept alive here.
    push: Mutex<Option<ConnectionManager>>,
    boot: u64,
    state_dir: PathBuf,
    up: AtomicBool,
    leader: AtomicBool,
    duplicate: AtomicBool,
    /// When the last heartbeat succeeded (ms since `started`; 0: never): a stalled loop
    /// reads as a store that is down, and loses the lease.
    last_beat: AtomicU64,
    started: Instant,
    /// The cursor's position, epoch and queue length, for status and publish without
    /// waiting on a catch-up.
    applied_seq: AtomicU64,
    queued: AtomicU64,
    epoch: ArcSwap<Option<String>>,
    cursor: tokio::sync::Mutex<Cursor>,
    wake: Notify,
    replicas: ArcSwap<Vec<Seen>>,
    remote: ArcSwap<Remote>,
    /// Comparisons the lease holder publishes counts for: the ones it judges.
    leader_keys: ArcSwap<std::collections::HashSet<String>>,
    local: ArcSwap<BTreeMap<String, Counts>>,
    heartbeat_every: Duration,
    scripts: Scripts,
    /// Commands this replica published and waits to see applied, by id: whichever
    /// catch-up applies one hands its result to the waiting caller.
    waiting: Mutex<Waiters>,
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
    origin: String,
    seen: String,
    counts: String,
    leader: String,
    wake: String,
    claim_prefix: String,
    published_prefix: String,
}

impl Keys {
    fn new(name: &str) -> Keys {
        let p = format!("rollgate:{{{name}}}:");
        Keys {
            epoch: format!("{p}epoch"),
            seq: format!("{p}seq"),
            log: format!("{p}log"),
            snapshot: format!("{p}snapshot"),
            origin: format!("{p}origin"),
            seen: format!("{p}seen"),
            counts: format!("{p}counts"),
            leader: format!("{p}leader"),
            wake: format!("{p}wake"),
            claim_prefix: format!("{p}claim:"),
            published_prefix: format!("{p}published:"),
        }
    }
}

struct Scripts {
    heartbeat: Script,
    publish: Script,
    reseed: Script,
    snapshot: Script,
    release: Script,
}

/// Lua helpers shared by the scripts: a key's type; whether it is usable as `want`; the
/// log's state (`nil` when the sequence or the log is not what rollgate writes).
const LUA_HELPERS: &str = r#"
local function ty(k) local t = redis.call('TYPE', k); if type(t) == 'table' then return t['ok'] end; return t end
local function fits(k, want) local t = ty(k); return t == 'none' or t == want end
local function seq_of(kseq, klog)
  if not fits(kseq, 'string') or not fits(klog, 'stream') then return nil end
  local s = tonumber(redis.call('GET', kseq) or '0')
  if s == nil or s < 0 or s ~= math.floor(s) then return nil end
  local last = redis.call('XREVRANGE', klog, '+', '-', 'COUNT', 1)
  if #last > 0 then
    local top = tonumber(string.match(last[1][1], '^(%d+)-'))
    if top == nil or top > s then return nil end
  end
  return s
end
"#;

/// KEYS: epoch seq log snapshot seen counts leader. ARGV: replica, counts json ('' = none),
/// want_leader (1/0), lease ms, forget ms, boot, live ms.
const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live_ms = tonumber(ARGV[7])
local epoch = ''
if ty(KEYS[1]) == 'string' then epoch = redis.call('GET', KEYS[1]) end
local health = 'ok'
local seq = 0
if not fits(KEYS[4], 'string') then redis.call('DEL', KEYS[4]) end
local snap = -1
if ty(KEYS[4]) == 'string' then snap = tonumber(string.match(redis.call('GET', KEYS[4]), '^(%d+) ')) or -1 end
if not fits(KEYS[1], 'string') then health = 'corrupt:epoch'
else
  local s = seq_of(KEYS[2], KEYS[3])
  if s == nil then health = 'corrupt:log'
  elseif epoch == '' then health = 'empty'
  else seq = s end
end
for _, k in ipairs({KEYS[5], KEYS[6]}) do if not fits(k, 'hash') then redis.call('DEL', k) end end
if not fits(KEYS[7], 'string') then redis.call('DEL', KEYS[7]) end
local function stamp(v) if not v then return nil end return tonumber(string.match(v, '^(%d+)')) end
local dup = 0
local mine = redis.call('HGET', KEYS[5], ARGV[1])
if mine then
  local ts, b = string.match(mine, '^(%d+) (%S+)$')
  if b and b ~= ARGV[6] and math.abs(now - tonumber(ts)) <= live_ms then dup = 1 end
end
redis.call('HSET', KEYS[5], ARGV[1], now .. ' ' .. ARGV[6])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[6], ARGV[1], ARGV[2]) else redis.call('HDEL', KEYS[6], ARGV[1]) end
local leader = redis.call('GET', KEYS[7])
if leader and leader ~= ARGV[1] then
  local ts = stamp(redis.call('HGET', KEYS[5], leader))
  if ts == nil or math.abs(now - ts) > live_ms or redis.call('PTTL', KEYS[7]) < 0 then
    redis.call('DEL', KEYS[7]); leader = false
  end
end
if ARGV[3] == '1' and dup == 0 then
  if not leader then redis.call('SET', KEYS[7], ARGV[1], 'PX', ARGV[4]); leader = ARGV[1]
  elseif leader == ARGV[1] then redis.call('PEXPIRE', KEYS[7], ARGV[4]) end
elseif leader == ARGV[1] then redis.call('DEL', KEYS[7]); leader = false end
local seen = redis.call('HGETALL', KEYS[5])
local live = {}
local counts = {}
for i = 1, #seen, 2 do
  local ts = stamp(seen[i + 1])
  if ts == nil or math.abs(now - ts) > tonumber(ARGV[5]) then
    redis.call('HDEL', KEYS[5], seen[i]); redis.call('HDEL', KEYS[6], seen[i])
  else
    table.insert(live, seen[i]); table.insert(live, tostring(ts))
    if math.abs(now - ts) > live_ms then
      redis.call('HDEL', KEYS[6], seen[i])
    elseif ARGV[2] ~= '' and seen[i] ~= ARGV[1] then
      local c = redis.call('HGET', KEYS[6], seen[i])
      if c then table.insert(counts, seen[i]); table.insert(counts, c) end
    end
  end
end
return {now, health, epoch, seq, leader or '', live, counts, dup, snap}
"#;

/// KEYS: epoch seq log claim unclaim published. ARGV: epoch, entry json, claim id ('' =
/// none), claim ms, unclaim (1/0), log cap, wake channel, published ms. Validates before it
/// writes anything; a command published before returns its first place.
const PUBLISH: &str = r#"
if not fits(KEYS[1], 'string') then return redis.error_reply('rollgate: the fleet epoch is not a string') end
local e = ''
if ty(KEYS[1]) == 'string' then e = redis.call('GET', KEYS[1]) end
if e ~= ARGV[1] then return {0, e} end
local s = seq_of(KEYS[2], KEYS[3])
if s == nil then return redis.error_reply('rollgate: the fleet sequence or log is malformed') end
if ty(KEYS[6]) == 'string' then
  local done = tonumber(redis.call('GET', KEYS[6]))
  if done ~= nil then return {done, e} end
end
if ARGV[3] ~= '' then
  if not fits(KEYS[4], 'string') then redis.call('DEL', KEYS[4]) end
  local holder = redis.call('GET', KEYS[4])
  if holder then
    local he, hid = string.match(holder, '^(%S+) (%S+)$')
    -- A claim of an earlier epoch (before a reseed) or a foreign value holds nothing.
    if he == e and hid ~= ARGV[3] then return {-1, hid} end
  end
  redis.call('SET', KEYS[4], e .. ' ' .. ARGV[3], 'PX', ARGV[4])
end
if ARGV[5] == '1' then redis.call('DEL', KEYS[5]) end
s = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], s .. '-1', 'c', ARGV[2])
if not fits(KEYS[6], 'string') then redis.call('DEL', KEYS[6]) end
redis.call('SET', KEYS[6], s, 'PX', ARGV[8])
redis.call('PUBLISH', ARGV[7], s)
return {s, e}
"#;

/// KEYS: epoch seq log snapshot origin. ARGV: the epoch observed as it was, the new epoch,
/// the snapshot json, where the seed's state came from ("<epoch> <seq>"). Compare-and-set
/// on the epoch: returns the epoch in force afterwards.
const RESEED: &str = r#"
local cur = ''
if ty(KEYS[1]) == 'string' then cur = redis.call('GET', KEYS[1]) end
if cur ~= ARGV[1] then return cur end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], '0')
redis.call('SET', KEYS[4], '0 ' .. ARGV[3])
redis.call('SET', KEYS[5], ARGV[4])
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

/// KEYS: a key. ARGV: a value. Deletes the key if it holds the value (a claim or a lease
/// given back).
const RELEASE: &str = r#"
if ty(KEYS[1]) == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{LUA_HELPERS}{body}"))
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
    if a.len() != 9 {
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
        duplicate: as_u64(&a[7]) == Some(1),
        snapshot: as_u64(&a[8]),
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

/// The snapshot's value: "<seq> <json RuntimeState>".
fn parse_snapshot(v: &RValue) -> Option<(u64, RuntimeState)> {
    let s = as_string(v)?;
    let (seq, json) = s.split_once(' ')?;
    Some((seq.parse().ok()?, serde_json::from_str(json).ok()?))
}

fn redis_err(what: &'static str) -> redis::RedisError {
    (redis::ErrorKind::Client, what).into()
}

/// How [`Fleet::adopt`] treats this replica's own state.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Adopt {
    /// The fleet's state wins (a new replica, or one the capped log left behind).
    Fleet,
    /// The store lost its data: keep this replica's quarantines and publish the ones the
    /// fleet lacks.
    KeepQuarantines,
}

impl Fleet {
    /// Connects lazily (nothing here waits on the store). `last`: the fleet position
    /// persisted with the runtime state.
    pub fn new(
        config: FleetConfig,
        state_dir: &Path,
        interval: Duration,
        last: Option<(String, u64)>,
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
        let client = redis::Client::open(info)
            .map_err(|e| std::io::Error::other(format!("fleet.store: {e}")))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config)
            .map_err(|e| std::io::Error::other(format!("fleet.store: {e}")))?;
        let keys = Keys::new(&config.name);
        let heartbeat_every = if config.pool {
            interval.clamp(Duration::from_millis(100), Duration::from_secs(1))
        } else {
            Duration::from_secs(1)
        };
        let cursor = Cursor::load(state_dir, last);
        Ok(Fleet {
            applied_seq: AtomicU64::new(cursor.seq),
            queued: AtomicU64::new(cursor.pending.len() as u64),
            epoch: ArcSwap::from_pointee(cursor.epoch.clone()),
            keys,
            conn,
            push: Mutex::new(None),
            boot: fastrand::u64(..),
            state_dir: state_dir.to_path_buf(),
            up: AtomicBool::new(false),
            leader: AtomicBool::new(false),
            duplicate: AtomicBool::new(false),
            last_beat: AtomicU64::new(0),
            started: Instant::now(),
            cursor: tokio::sync::Mutex::new(cursor),
            wake: Notify::new(),
            replicas: ArcSwap::from_pointee(Vec::new()),
            remote: ArcSwap::from_pointee(Remote::default()),
            leader_keys: ArcSwap::from_pointee(Default::default()),
            local: ArcSwap::from_pointee(BTreeMap::new()),
            heartbeat_every,
            scripts: Scripts {
                heartbeat: script(HEARTBEAT),
                publish: script(PUBLISH),
                reseed: script(RESEED),
                snapshot: script(SNAPSHOT),
                release: script(RELEASE),
            },
            config,
            waiting: Mutex::new(HashMap::new()),
        })
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the store answered a heartbeat within the lease: a store that stopped
    /// answering, or a sync loop that stalled, reads as down.
    pub fn store_up(&self) -> bool {
        let last = self.last_beat.load(Ordering::Relaxed);
        self.up.load(Ordering::Relaxed)
            && last > 0
            && (self.started.elapsed().as_millis() as u64).saturating_sub(last)
                < LEASE.as_millis() as u64
    }

    /// Whether this replica makes automatic decisions about `comparison` now: always,
    /// unless the fleet pools its evidence, the store is up, and another live replica holds
    /// the evaluator lease and judges that comparison too.
    pub fn decides(&self, comparison: Option<&str>) -> bool {
        if !self.store_up() {
            return true;
        }
        if self.duplicate.load(Ordering::Relaxed) {
            // Another live process has this name: leave decisions to the others.
            return false;
        }
        if !self.config.pool || self.leader.load(Ordering::Relaxed) {
            return true;
        }
        // The lease holder may not serve this comparison (a rolling config update): then
        // whoever does decides.
        comparison.is_some_and(|k| !self.leader_keys.load().contains(k))
    }

    /// Whether the evaluator should add the other replicas' counts.
    pub fn pooling(&self) -> bool {
        self.config.pool && self.store_up() && !self.duplicate.load(Ordering::Relaxed)
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
        json!({
            "name": self.config.name,
            "replica": self.config.replica,
            "store": self.config.redacted(),
            "store_up": self.store_up(),
            "pool": self.config.pool,
            "leader": self.leader.load(Ordering::Relaxed) && self.store_up(),
            "duplicate_name": self.duplicate.load(Ordering::Relaxed),
            "seq": self.applied_seq.load(Ordering::Relaxed),
            "pending": self.queued.load(Ordering::Relaxed),
            "replicas": *self.replicas.load_full(),
        })
    }

    /// Persists the cursor, and mirrors its position, epoch and queue.
    fn save(&self, c: &Cursor) {
        self.applied_seq.store(c.seq, Ordering::Relaxed);
        self.queued.store(c.pending.len() as u64, Ordering::Relaxed);
        if **self.epoch.load() != c.epoch {
            self.epoch.store(Arc::new(c.epoch.clone()));
        }
        if let Err(e) = c.save(&self.state_dir) {
            tracing::error!(error = %e, "persisting the fleet cursor failed; a restart may apply a command again or lose a queued one");
        }
    }

    fn via(&self, origin: &str, seq: Option<u64>, epoch: Option<&str>, replay: bool) -> Via {
        Via {
            replica: self.config.replica.clone(),
            origin: origin.to_string(),
            seq,
            epoch: epoch.map(str::to_string),
            replay,
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
    /// order; with the store unreachable (or slower than [`PUBLISH_TIMEOUT`]), queued and
    /// applied at once. Called in a task of its own ([`Controller::apply_at`]).
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
            let published =
                tokio::time::timeout(PUBLISH_TIMEOUT, self.publish(controller, &cmd)).await;
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
                    // apply it here now; the log's copy is applied again at its place only
                    // if that changes something.
                    let mut c = self.cursor.lock().await;
                    if self.waiters().remove(&cmd.id).is_none() {
                        drop(c);
                        return rx.await.unwrap_or_else(|_| {
                            Err(Refused::Failed("the fleet applier stopped".into()))
                        });
                    }
                    tracing::warn!(seq, command = %cmd.id, "published but not read back; applying locally");
                    c.remember(&cmd.id);
                    self.save(&c);
                    let via = self.via(&self.config.replica, None, None, false);
                    return controller.apply_local(cmd, began, Some(&via)).await;
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
        // Queued (durably) before it is applied: a crash in between publishes a command
        // that was never applied here, which the log then applies; never the reverse.
        let mut c = self.cursor.lock().await;
        if c.pending.is_empty() {
            let mut base = controller.store.runtime_state();
            base.last_command = None;
            c.base = Some(base);
        }
        c.remember(&cmd.id);
        c.pending.push(cmd.clone());
        self.save(&c);
        let via = self.via(&self.config.replica, None, None, false);
        let result = controller.apply_local(cmd.clone(), began, Some(&via)).await;
        if result.is_err() {
            c.pending.retain(|p| p.id != cmd.id);
            if c.pending.is_empty() {
                c.base = None;
            }
            self.save(&c);
        }
        result
    }

    async fn publish(&self, controller: &Controller, cmd: &Command) -> redis::RedisResult<Publish> {
        let epoch = (**self.epoch.load()).clone().unwrap_or_default();
        let fingerprint = match &cmd.action {
            Action::Rollback { version, .. } => controller
                .store
                .load()
                .version(version)
                .map(|v| v.config.fingerprint.clone()),
            _ => None,
        };
        let entry = serde_json::to_string(&Entry {
            origin: self.config.replica.clone(),
            cmd: cmd.clone(),
            fingerprint,
        })
        .map_err(|_| redis_err("a command that does not serialize"))?;
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
            .key(format!("{}{}", self.keys.published_prefix, cmd.id))
            .arg(&epoch)
            .arg(entry)
            .arg(if claim.is_some() { cmd.id.as_str() } else { "" })
            .arg(CLAIM_TTL.as_millis() as u64)
            .arg(if unclaim.is_some() { "1" } else { "0" })
            .arg(LOG_CAP)
            .arg(&self.keys.wake)
            .arg(PUBLISHED_TTL_MS)
            .invoke_async(&mut conn)
            .await?;
        let RValue::Array(a) = &reply else {
            return Err(redis_err("unexpected publish reply"));
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

    /// Gives back a rollback's claim that the fleet refused (a pause or reload came first),
    /// so a rollback decided next is not blocked for the claim's TTL.
    async fn release_claim(&self, version: &VersionName, epoch: &str, id: &str) {
        let mut conn = self.conn.clone();
        let _: redis::RedisResult<RValue> = self
            .scripts
            .release
            .key(format!("{}{}", self.keys.claim_prefix, version))
            .arg(format!("{epoch} {id}"))
            .invoke_async(&mut conn)
            .await;
    }

    /// Applies the log's entries after the cursor, in order; a command this replica
    /// published hands its result to [`Self::submit`]. Entries beyond the store's own
    /// sequence are not rollgate's and are skipped; a gap the snapshot covers is taken from
    /// the snapshot, any other gap is passed (and logged).
    async fn catch_up(&self, controller: &Arc<Controller>) {
        let mut cursor = self.cursor.lock().await;
        let Some(epoch) = cursor.epoch.clone() else {
            return;
        };
        let mut conn = self.conn.clone();
        let mut applied = false;
        loop {
            let from = format!("{}-0", cursor.seq.saturating_add(1));
            let reply: redis::RedisResult<(Option<String>, RValue)> = redis::pipe()
                .cmd("GET")
                .arg(&self.keys.seq)
                .cmd("XRANGE")
                .arg(&self.keys.log)
                .arg(&from)
                .arg("+")
                .arg("COUNT")
                .arg(PAGE)
                .query_async(&mut conn)
                .await;
            let (store_seq, entries) = match reply {
                Ok((s, v)) => (
                    s.and_then(|s| s.parse::<u64>().ok()).unwrap_or(0),
                    parse_range(&v),
                ),
                Err(e) => {
                    // A wrong-typed key is the heartbeat's to repair; a dead store, the
                    // next round's.
                    tracing::warn!(error = %e, "reading the fleet log failed");
                    break;
                }
            };
            let entries: Vec<_> = entries
                .into_iter()
                .filter(|(seq, _)| *seq > cursor.seq && *seq <= store_seq)
                .collect();
            if entries.is_empty() {
                if store_seq > cursor.seq {
                    // The log holds none of what the sequence says was published (trimmed,
                    // or lost): take the snapshot, or pass the gap.
                    self.skip_gap(controller, &mut cursor, &epoch, store_seq + 1)
                        .await;
                }
                break;
            }
            let first = entries[0].0;
            if first > cursor.seq + 1 {
                self.skip_gap(controller, &mut cursor, &epoch, first).await;
                if cursor.seq >= first {
                    continue;
                }
            }
            let n = entries.len();
            for (seq, payload) in entries {
                if seq <= cursor.seq {
                    continue;
                }
                self.apply_entry(controller, &cursor, &epoch, seq, payload)
                    .await;
                cursor.seq = seq;
                applied = true;
            }
            if n < PAGE {
                break;
            }
        }
        if applied {
            self.save(&cursor);
        }
    }

    /// The log does not hold the entries from `cursor + 1` to `next - 1`: the snapshot, if
    /// it covers them, else the gap is passed.
    async fn skip_gap(
        &self,
        controller: &Arc<Controller>,
        cursor: &mut Cursor,
        epoch: &str,
        next: u64,
    ) {
        tracing::warn!(
            cursor = cursor.seq,
            next,
            "the fleet log lacks entries after this replica's position; taking the snapshot"
        );
        let before = cursor.seq;
        self.adopt(controller, cursor, epoch, Adopt::Fleet).await;
        if cursor.seq < next - 1 {
            tracing::error!(
                from = before + 1,
                to = next - 1,
                "fleet log entries lost and not covered by the snapshot; passing them"
            );
            cursor.seq = next - 1;
        }
        self.save(cursor);
    }

    async fn apply_entry(
        &self,
        controller: &Arc<Controller>,
        cursor: &Cursor,
        epoch: &str,
        seq: u64,
        payload: Option<String>,
    ) {
        let entry = match payload.as_deref().map(serde_json::from_str::<Entry>) {
            Some(Ok(e)) => e,
            Some(Err(e)) => {
                tracing::error!(seq, error = %e, "ignoring a malformed entry in the fleet log");
                return;
            }
            None => {
                tracing::error!(seq, "ignoring a fleet log entry without a command");
                return;
            }
        };
        let id = entry.cmd.id.clone();
        let replay = cursor.recent.contains(&id);
        let lag = unix_ms().saturating_sub(entry.cmd.issued_ms);
        let mine = entry.origin == self.config.replica;
        let rollback = match &entry.cmd.action {
            Action::Rollback { version, .. } => Some(version.clone()),
            _ => None,
        };
        let via = self.via(&entry.origin, Some(seq), Some(epoch), replay);
        // A rollback of a bundle this replica does not serve (the version is absent here, or
        // here it is another bundle: a rolling update): its quarantine is kept for that
        // bundle, never applied to another one.
        let elsewhere = match (&rollback, &entry.fingerprint) {
            (Some(v), Some(fp)) => controller
                .store
                .load()
                .version(v)
                .is_none_or(|local| &local.config.fingerprint != fp),
            _ => false,
        };
        let result = match (&rollback, &entry.fingerprint) {
            (Some(version), Some(fp)) if elsewhere => {
                controller
                    .quarantine_absent(&entry.cmd, version, fp, &via)
                    .await
            }
            _ => {
                controller
                    .apply_local(entry.cmd.clone(), Instant::now(), Some(&via))
                    .await
            }
        };
        if !replay {
            controller
                .store
                .metrics
                .fleet_apply_lag
                .observe(lag as f64 / 1000.0);
        }
        match &result {
            Ok(_) if mine => self.write_snapshot(controller, epoch, seq).await,
            Ok(_) => {}
            Err(e) => {
                if replay {
                    tracing::debug!(seq, command = %id, "a command applied here ahead of the fleet's order changes nothing at its place");
                } else {
                    tracing::info!(seq, command = %id, origin = %entry.origin, refused = %e, "fleet command refused here");
                }
                if let (true, Some(v)) = (mine && !replay, &rollback) {
                    self.release_claim(v, epoch, &id).await;
                }
            }
        }
        if let Some(tx) = self.waiters().remove(&id) {
            let _ = tx.send(result);
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

    /// Takes the store's snapshot as this replica's state (see [`Adopt`]). Moves the cursor
    /// to the snapshot's sequence; without a usable snapshot, keeps the local state and
    /// leaves the cursor where it is.
    async fn adopt(
        &self,
        controller: &Arc<Controller>,
        cursor: &mut Cursor,
        epoch: &str,
        how: Adopt,
    ) {
        let mut conn = self.conn.clone();
        let raw: redis::RedisResult<RValue> = redis::cmd("GET")
            .arg(&self.keys.snapshot)
            .query_async(&mut conn)
            .await;
        let Some((seq, mut state)) = raw.ok().as_ref().and_then(parse_snapshot) else {
            tracing::error!(
                "the fleet snapshot is missing or malformed; keeping this replica's state"
            );
            cursor.epoch = Some(epoch.to_string());
            return;
        };
        if cursor.epoch.as_deref() == Some(epoch) && seq <= cursor.seq {
            return;
        }
        let local = controller.store.runtime_state();
        let mut reassert = Vec::new();
        if how == Adopt::KeepQuarantines {
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
            json!(match how {
                Adopt::KeepQuarantines => "the fleet store lost its state; took the state it was reseeded with, keeping this replica's quarantines",
                Adopt::Fleet => "took the fleet's state (joining, or behind the store's log)",
            }),
        );
        if let Err(e) = controller.adopt(state, fields).await {
            tracing::error!(error = %e, "taking the fleet's state failed");
            return;
        }
        cursor.epoch = Some(epoch.to_string());
        cursor.seq = seq;
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
            cursor.remember(&cmd.id);
            cursor.pending.push(cmd);
        }
    }

    /// Publishes the queue of commands applied while the store was unreachable, in order.
    async fn flush_pending(&self, controller: &Arc<Controller>) {
        loop {
            let next = self.cursor.lock().await.pending.first().cloned();
            let Some(cmd) = next else { return };
            match self.publish(controller, &cmd).await {
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
            if c.pending.is_empty() {
                c.base = None;
            }
            self.save(&c);
        }
    }

    async fn beat(&self) -> redis::RedisResult<Beat> {
        let counts = if self.config.pool {
            serde_json::to_string(&Published {
                boot: self.boot,
                counts: (**self.local.load()).clone(),
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
            .arg(format!("{:016x}", self.boot))
            .arg(LIVE.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        parse_beat(&reply).ok_or_else(|| redis_err("unexpected heartbeat reply"))
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
        self.last_beat.store(
            (self.started.elapsed().as_millis() as u64).max(1),
            Ordering::Relaxed,
        );
        controller.store.metrics.fleet_store_up.set(1);
        if beat.duplicate && !self.duplicate.load(Ordering::Relaxed) {
            tracing::error!(replica = %self.config.replica, "another live process uses this replica name: not taking the evaluator lease or pooling until it is gone (set fleet.replica or ROLLGATE_REPLICA)");
        }
        self.duplicate.store(beat.duplicate, Ordering::Relaxed);
        self.leader.store(
            beat.leader.as_deref() == Some(self.config.replica.as_str()),
            Ordering::Relaxed,
        );
        self.take_counts(&beat);
        if beat.health != "ok" {
            if beat.health.starts_with("corrupt") {
                tracing::error!(health = %beat.health, "a fleet key holds a value rollgate did not write; reseeding the store from this replica's state");
            }
            self.reseed(controller, &beat.epoch).await;
            return;
        }
        let mut cursor = self.cursor.lock().await;
        let ours = cursor.epoch.clone();
        let mut store_seq = beat.seq;
        if ours.as_deref() == Some(beat.epoch.as_str()) && store_seq < cursor.seq {
            // The heartbeat may have read `seq` before a catch-up moved the cursor on: read
            // it again now that no catch-up runs. Still lower: the store lost commands (a
            // failover to a replica behind) and this is handled as a wipe.
            let mut conn = self.conn.clone();
            let again: redis::RedisResult<Option<String>> = redis::cmd("GET")
                .arg(&self.keys.seq)
                .query_async(&mut conn)
                .await;
            match again {
                Ok(v) => store_seq = v.and_then(|v| v.parse().ok()).unwrap_or(0),
                Err(e) => {
                    drop(cursor);
                    self.mark_down(controller, &e);
                    return;
                }
            }
        }
        if ours.as_deref() != Some(beat.epoch.as_str()) || store_seq < cursor.seq {
            match ours {
                // A new replica: the fleet's state.
                None => {
                    self.adopt(controller, &mut cursor, &beat.epoch, Adopt::Fleet)
                        .await
                }
                // The store lost its data since our cursor. If it was reseeded from a
                // replica that had seen less of the old log than we had, our state is the
                // better seed.
                Some(old) => {
                    if self.seeded_behind(&old, cursor.seq).await {
                        drop(cursor);
                        tracing::warn!("the fleet store was reseeded from a replica behind this one; reseeding it from this replica's state");
                        self.reseed(controller, &beat.epoch).await;
                        return;
                    }
                    cursor.seq = 0;
                    self.adopt(controller, &mut cursor, &beat.epoch, Adopt::KeepQuarantines)
                        .await;
                }
            }
            self.save(&cursor);
        } else if store_seq > cursor.seq + BEHIND_MAX {
            // Far behind (a replica that was down): the snapshot, then the tail.
            let epoch = beat.epoch.clone();
            self.adopt(controller, &mut cursor, &epoch, Adopt::Fleet)
                .await;
            self.save(&cursor);
        }
        let behind = store_seq > cursor.seq;
        // A replica that is current repairs a missing or unreadable snapshot (joiners need it).
        let current = !behind && beat.snapshot.is_none_or(|s| s > store_seq) && store_seq > 0;
        drop(cursor);
        if behind {
            self.catch_up(controller).await;
        }
        if current {
            self.write_snapshot(controller, &beat.epoch, store_seq)
                .await;
        }
        self.flush_pending(controller).await;
    }

    /// Whether the store's current seed came from the old epoch `old` at a position before
    /// `seq`.
    async fn seeded_behind(&self, old: &str, seq: u64) -> bool {
        let mut conn = self.conn.clone();
        let origin: Option<String> = redis::cmd("GET")
            .arg(&self.keys.origin)
            .query_async(&mut conn)
            .await
            .ok()
            .flatten();
        // Seeded by a replica that had no place in any log (new, or its state lost), while
        // this one had one; or by one that had seen less of the same log.
        seq > 0
            && origin
                .as_deref()
                .and_then(|o| o.split_once(' '))
                .is_some_and(|(e, s)| {
                    e == "-" || (e == old && s.parse::<u64>().is_ok_and(|s| s < seq))
                })
    }

    /// Seeds the store with this replica's state, if its epoch is still `observed`.
    async fn reseed(&self, controller: &Arc<Controller>, observed: &str) {
        let mut cursor = self.cursor.lock().await;
        let mut state = match (&cursor.base, cursor.pending.is_empty()) {
            (Some(base), false) => base.clone(),
            _ => controller.store.runtime_state(),
        };
        state.last_command = None;
        let json = serde_json::to_string(&state).unwrap_or_default();
        let epoch = new_epoch();
        let origin = format!("{} {}", cursor.epoch.as_deref().unwrap_or("-"), cursor.seq);
        let mut conn = self.conn.clone();
        let r: redis::RedisResult<String> = self
            .scripts
            .reseed
            .key(&self.keys.epoch)
            .key(&self.keys.seq)
            .key(&self.keys.log)
            .key(&self.keys.snapshot)
            .key(&self.keys.origin)
            .arg(observed)
            .arg(&epoch)
            .arg(json)
            .arg(origin)
            .invoke_async(&mut conn)
            .await;
        match r {
            Ok(e) if e == epoch => {
                tracing::warn!(%epoch, "seeded the fleet store with this replica's state (a new, wiped or corrupted store)");
                cursor.epoch = Some(epoch);
                cursor.seq = 0;
                self.save(&cursor);
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
            .filter(|(_, t)| beat.now_ms.abs_diff(*t) <= LIVE.as_millis() as u64)
            .map(|(r, t)| Seen {
                replica: r.clone(),
                last_seen_ms: *t,
            })
            .collect();
        let mut remote = Remote::default();
        let mut leader_keys = std::collections::HashSet::new();
        let live_names: std::collections::HashSet<&str> =
            live.iter().map(|s| s.replica.as_str()).collect();
        for (replica, json) in &beat.counts {
            if replica == &self.config.replica || !live_names.contains(replica.as_str()) {
                continue;
            }
            match serde_json::from_str::<Published>(json) {
                Ok(p) => {
                    let leads = beat.leader.as_deref() == Some(replica.as_str());
                    for (k, c) in p.counts {
                        if leads {
                            leader_keys.insert(k.clone());
                        }
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
        self.leader_keys.store(Arc::new(leader_keys));
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
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut subscribed = false;
            loop {
                let Some(fleet) = this.upgrade() else { return };
                if !subscribed {
                    let manager =
                        ConnectionManager::new_lazy_with_config(client.clone(), config.clone());
                    if let Ok(mut m) = manager {
                        if m.subscribe(&fleet.keys.wake).await.is_ok() {
                            subscribed = true;
                            *fleet.push.lock().unwrap_or_else(|e| e.into_inner()) = Some(m);
                        }
                    }
                    if !subscribed {
                        drop(fleet);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
                drop(fleet);
                match rx.recv().await {
                    Some(_) => {
                        if let Some(f) = this.upgrade() {
                            f.wake.notify_one();
                        }
                    }
                    None => subscribed = false,
                }
            }
        });
    }

    /// The first sync at start-up, bounded by [`JOIN_TIMEOUT`]: with the store reachable,
    /// this replica takes the fleet's state before it serves. The sync goes on in its own
    /// task if the bound passes (it is never cut in the middle of an apply).
    pub async fn join(self: &Arc<Self>, controller: &Arc<Controller>) {
        let (this, c) = (self.clone(), controller.clone());
        let task = tokio::spawn(async move { this.sync(&c).await });
        if tokio::time::timeout(JOIN_TIMEOUT, task).await.is_err() {
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
            controller
                .store
                .metrics
                .fleet_store_up
                .set(i64::from(self.store_up()));
        }
        // Step down at once so another replica takes the evaluator lease without waiting.
        if self.leader.swap(false, Ordering::Relaxed) {
            let mut conn = self.conn.clone();
            let _ = tokio::time::timeout(
                Duration::from_millis(500),
                self.scripts
                    .release
                    .key(&self.keys.leader)
                    .arg(&self.config.replica)
                    .invoke_async::<RValue>(&mut conn),
            )
            .await;
        }
        *self.push.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}
