//! The compiled routing table: an immutable snapshot of config plus runtime state.
//!
//! Everything a request needs is resolved here, once per swap: version indices, weight
//! prefix sums, rendezvous seeds, header values, statistics handles. A request reads one
//! `Arc<Table>` and touches nothing else shared but its statistics shard.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use http::{HeaderName, HeaderValue};

use super::select::{self, Candidate};
use crate::config::{
    Config, MatchConfig, PinQuarantined, PinUnknown, RouteConfig, StickyKey, VersionConfig,
    VersionName,
};
use crate::proxy::client::Upstream;
use crate::telemetry::signals::RecentRequests;
use crate::telemetry::{PairStats, RetryCounter, VersionCounters};

/// One version as requests see it.
pub struct Version {
    pub name: VersionName,
    /// `x-rollgate-version` value, built once.
    pub name_value: HeaderValue,
    pub set_headers: Box<[(HeaderName, HeaderValue)]>,
    pub upstream: Arc<Upstream>,
    pub counters: Arc<VersionCounters>,
    pub quarantined: bool,
    pub config: VersionConfig,
}

/// A version's place in one route.
pub struct Member {
    /// Index into [`Table::versions`].
    pub version: usize,
    /// Effective weight (quarantined versions are 0, their share went to the baseline).
    pub weight: u32,
    /// Weight as configured (or overridden at runtime), before quarantine.
    pub configured_weight: u32,
    pub seed: u64,
    pub stats: Arc<PairStats>,
    /// Retries from this member to the route's stand-in (the baseline, or the fallback
    /// while degraded).
    pub retries_to_baseline: Arc<RetryCounter>,
    /// A pin header may name it: false for a version that is only the route's shadow (a
    /// shadow copies, it never answers a client).
    pub pinnable: bool,
}

impl Candidate for Member {
    fn weight(&self) -> u32 {
        self.weight
    }
    fn seed(&self) -> u64 {
        self.seed
    }
}

/// Route state as `/api/v1/status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteState {
    Steady,
    RollingOut,
    RolledBack,
    Paused,
    Degraded,
}

pub struct Route {
    pub name: Arc<str>,
    pub config: RouteConfig,
    pub members: Box<[Member]>,
    /// Prefix sums of effective weights, aligned with `members`.
    pub cumulative: Box<[u32]>,
    pub total_weight: u32,
    /// Index into `members`.
    pub baseline: usize,
    pub state: RouteState,
    pub degraded: bool,
    /// Index into `members` of the version that stands in for the baseline: retries and
    /// `pin.quarantined: baseline` go there. The baseline, or the healthy `fallback` while
    /// the route is degraded.
    pub stand_in: usize,
    /// Shared by every table of this route while its retry settings stay the same, so a
    /// swap (health flip, rollback, reload) does not grant a fresh burst.
    pub retry_budget: Arc<RetryBudget>,
    /// gRPC statuses that count against a version (bit n: code n).
    pub grpc_faults: u32,
    pub shadow: Option<ShadowRoute>,
    /// Statistics handles the route's config can route to while this table does not (the
    /// fallback's, retry counters toward the baseline and the fallback): held so that
    /// [`crate::telemetry::Telemetry::retain`] keeps them across health flips.
    pub standby_pairs: Box<[Arc<PairStats>]>,
    pub standby_retries: Box<[Arc<RetryCounter>]>,
}

/// A route's shadow version (SPEC section 4): a weight-0 member that also receives a copy
/// of `percent` of the route's requests.
pub struct ShadowRoute {
    /// Index into [`Route::members`].
    pub member: usize,
    pub percent: u32,
    /// False while the shadow version is quarantined: no copies.
    pub active: bool,
    /// Seed of the per-key decision on sticky routes.
    pub seed: u64,
    pub dropped: ShadowDropped,
}

/// `rollgate_shadow_dropped_total{route,reason}`, resolved once per table.
pub struct ShadowDropped {
    /// The shadow in-flight cap (10 % of `max_in_flight`) was reached, or the proxy is at
    /// its primary cap.
    pub overloaded: prometheus_client::metrics::counter::Counter,
    /// The shadow upstream read the body slower than the client sent it.
    pub slow: prometheus_client::metrics::counter::Counter,
    /// The client's body failed or was cut short, so the copy would be incomplete.
    pub incomplete: prometheus_client::metrics::counter::Counter,
}

impl Route {
    pub fn baseline_member(&self) -> &Member {
        &self.members[self.baseline]
    }

    /// The member serving version `name`, by a linear scan over a handful of members.
    #[inline]
    pub fn member_by_name(&self, name: &[u8], table: &Table) -> Option<usize> {
        self.members
            .iter()
            .position(|m| m.pinnable && table.versions[m.version].name.as_str().as_bytes() == name)
    }

    /// Does the request's head match (everything but the model)?
    #[inline]
    pub fn matches_head(&self, path: &str, host: Option<&str>, headers: &http::HeaderMap) -> bool {
        let m: &MatchConfig = &self.config.matcher;
        if let Some(p) = &m.path_prefix {
            if !path.starts_with(p.as_str()) {
                return false;
            }
        }
        if let Some(h) = &m.host {
            let Some(req) = host else { return false };
            let req = req.rsplit_once(':').map_or(req, |(h, p)| {
                if p.bytes().all(|b| b.is_ascii_digit()) {
                    h
                } else {
                    req
                }
            });
            if !req.eq_ignore_ascii_case(h) {
                return false;
            }
        }
        m.headers.iter().all(|(n, v)| headers.get(n) == Some(v))
    }

    #[inline]
    pub fn matches_model(&self, model: Option<&str>) -> bool {
        let models = &self.config.matcher.models;
        models.is_empty() || model.is_some_and(|m| models.iter().any(|x| x == m))
    }

    /// Does this request (by its sticky key, if the route has one) get a shadow copy?
    #[inline]
    pub fn shadowed(&self, key: Option<&[u8]>) -> Option<&ShadowRoute> {
        let s = self.shadow.as_ref().filter(|s| s.active)?;
        let bucket = match key {
            Some(k) => (xxhash_rust::xxh3::xxh3_64_with_seed(k, s.seed) % 100) as u32,
            None => fastrand::u32(0..100),
        };
        (bucket < s.percent).then_some(s)
    }

    /// Effective weights as `{version: weight}`.
    pub fn weights(&self, table: &Table) -> BTreeMap<String, u32> {
        self.members
            .iter()
            .map(|m| (table.versions[m.version].name.to_string(), m.weight))
            .collect()
    }

    pub fn sticky(&self) -> Option<&StickyKey> {
        self.config.sticky.as_ref()
    }

    /// Weighted-random member choice.
    #[inline]
    pub fn pick_weighted(&self) -> usize {
        select::weighted(&self.cumulative, fastrand::u32(0..self.total_weight.max(1)))
    }
}

pub struct Table {
    pub generation: u64,
    pub config: Arc<Config>,
    pub routes: Box<[Route]>,
    pub versions: Box<[Version]>,
    pub pin_header: HeaderName,
    pub pin_quarantined: PinQuarantined,
    pub pin_unknown: PinUnknown,
    /// Some route matches on the model: the body's `model` field may be needed.
    pub any_model_match: bool,
    /// Request id → answering pair, for `POST /api/v1/feedback`.
    pub recent: Arc<RecentRequests>,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("generation", &self.generation)
            .field("routes", &self.routes.len())
            .finish()
    }
}

/// Retry budget per route, as Linkerd's: retries may add `percent` of recent requests plus
/// `min_per_second`. Balances are kept in milli-tokens; one retry costs 1000. Lock-free.
pub struct RetryBudget {
    percent: i64,
    min_per_second: i64,
    balance: AtomicI64,
    last_refill_ms: AtomicU64,
    epoch: std::time::Instant,
}

impl RetryBudget {
    const COST: i64 = 1000;

    pub fn new(percent: u32, min_per_second: u32) -> Self {
        RetryBudget {
            percent: i64::from(percent),
            min_per_second: i64::from(min_per_second),
            balance: AtomicI64::new(i64::from(min_per_second) * Self::COST),
            last_refill_ms: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
        }
    }

    /// Cap: ten seconds' worth of the floor plus what 100 requests would deposit.
    fn cap(&self) -> i64 {
        self.min_per_second * 10 * Self::COST + self.percent * 10 * 100
    }

    /// `(budget_percent, min_per_second)` it was made with.
    pub fn settings(&self) -> (u32, u32) {
        (self.percent as u32, self.min_per_second as u32)
    }

    /// Every original request deposits `percent` of a retry.
    #[inline]
    pub fn deposit(&self) {
        if self.percent == 0 {
            return;
        }
        if self.balance.load(Ordering::Relaxed) < self.cap() {
            self.balance.fetch_add(self.percent * 10, Ordering::Relaxed);
        }
    }

    /// Takes one retry from the budget if there is one.
    pub fn try_withdraw(&self) -> bool {
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        let last = self.last_refill_ms.swap(now_ms, Ordering::Relaxed);
        let refill = (now_ms.saturating_sub(last) as i64).saturating_mul(self.min_per_second);
        if refill > 0 {
            let cap = self.cap();
            let _ = self
                .balance
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                    Some((b + refill).min(cap.max(b)))
                });
        }
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= Self::COST).then_some(b - Self::COST)
            })
            .is_ok()
    }
}

/// Runtime state that outlives one table: what rollbacks, overrides and pauses changed.
/// Persisted in `state_dir/state.json` ([`crate::control::state`]).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RuntimeState {
    /// Quarantined versions with the fingerprint they were quarantined at.
    pub quarantined: BTreeMap<VersionName, String>,
    /// Per-route weight overrides (`POST /api/v1/weights`, rollout steps).
    pub weight_overrides: BTreeMap<String, BTreeMap<VersionName, u32>>,
    /// Routes whose automatic decisions are frozen.
    pub paused: std::collections::BTreeSet<String>,
    /// Routes whose baseline was replaced at runtime (`promote`).
    pub baselines: BTreeMap<String, VersionName>,
    /// Progressive rollouts in progress, by route.
    pub rollouts: BTreeMap<String, RolloutProgress>,
    /// The file's split and baseline each route's overrides were made against: when the
    /// file changes either, the file wins ([`crate::decision::prune`]).
    pub basis: BTreeMap<String, RouteBasis>,
    /// Routes whose rollout plan ([`crate::decision::rollout_plan`]) completed: it is not
    /// run again until the file gives the route a new plan.
    pub rollouts_done: BTreeMap<String, String>,
    /// The last command applied: persisted with the state it made, so a start-up after a
    /// crash between persist and audit can see that its record is missing.
    pub last_command: Option<LastCommand>,
}

/// What [`RuntimeState::last_command`] remembers.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LastCommand {
    pub id: String,
    /// The record kind it was to write (`rollback`, `promote`, ...).
    pub kind: String,
    /// Its route and version, for the recovery record.
    #[serde(default)]
    pub subject: serde_json::Value,
    /// The audit log's last sequence number when it was persisted: its record, if written,
    /// comes soon after.
    #[serde(default)]
    pub after_seq: u64,
    /// Its place in the fleet's log, (store epoch, seq), when it came through it: persisted
    /// with the state it made, so a restart never applies it twice.
    #[serde(default)]
    pub fleet: Option<(String, u64)>,
}

/// What the file said of a route when a runtime override was made.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RouteBasis {
    pub split: BTreeMap<VersionName, u32>,
    pub baseline: VersionName,
}

/// Where a route's progressive rollout stands.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RolloutProgress {
    pub version: VersionName,
    /// Index into `rollout.steps` of the weight in force.
    pub step: usize,
    /// Unix time in milliseconds when that step began.
    pub since_ms: u64,
    /// The plan ([`crate::decision::rollout_plan`]) this progress belongs to.
    #[serde(default)]
    pub plan: String,
}

/// What `compile` needs from outside: upstreams and statistics handles.
pub trait Resources {
    fn upstream(
        &self,
        v: &VersionConfig,
        connect_timeout: std::time::Duration,
    ) -> std::io::Result<Arc<Upstream>>;
    fn pair(&self, route: &Arc<str>, version: &VersionName) -> Arc<PairStats>;
    fn version_counters(&self, version: &VersionName) -> Arc<VersionCounters>;
    fn retry_counter(
        &self,
        route: &Arc<str>,
        from: &VersionName,
        to: &VersionName,
    ) -> Arc<RetryCounter>;
    /// Where answered request ids are remembered for feedback.
    fn recent_requests(&self) -> Arc<RecentRequests>;
    /// The route's retry budget, kept across tables while its settings are unchanged.
    fn retry_budget(&self, route: &Arc<str>, percent: u32, min_per_second: u32)
        -> Arc<RetryBudget>;
    /// `rollgate_shadow_dropped_total{route, reason}`.
    fn shadow_dropped(
        &self,
        route: &Arc<str>,
        reason: &str,
    ) -> prometheus_client::metrics::counter::Counter;
}

/// Builds a table from a config and runtime state.
pub fn compile(
    config: Arc<Config>,
    state: &RuntimeState,
    generation: u64,
    res: &dyn Resources,
) -> std::io::Result<Table> {
    let connect_for = |name: &VersionName| {
        config
            .routes
            .iter()
            .filter(|r| r.split.iter().any(|(v, _)| v == name))
            .map(|r| r.timeouts.connect)
            .max()
            .unwrap_or(std::time::Duration::from_secs(2))
    };
    let mut versions = Vec::with_capacity(config.versions.len());
    for v in &config.versions {
        let quarantined = state
            .quarantined
            .get(&v.name)
            .is_some_and(|fp| fp == &v.fingerprint);
        versions.push(Version {
            name: v.name.clone(),
            name_value: HeaderValue::from_str(v.name.as_str()).map_err(std::io::Error::other)?,
            set_headers: v.set_headers.clone().into_boxed_slice(),
            upstream: res.upstream(v, connect_for(&v.name))?,
            counters: res.version_counters(&v.name),
            quarantined,
            config: v.clone(),
        });
    }
    let index_of = |name: &VersionName| versions.iter().position(|v| &v.name == name);

    let mut routes = Vec::with_capacity(config.routes.len());
    for rc in &config.routes {
        let baseline_name = state
            .baselines
            .get(rc.name.as_ref())
            .unwrap_or(&rc.baseline);
        let overrides = state.weight_overrides.get(rc.name.as_ref());
        let mut split: Vec<(VersionName, u32)> = rc
            .split
            .iter()
            .map(|(n, w)| {
                (
                    n.clone(),
                    overrides.and_then(|o| o.get(n)).copied().unwrap_or(w.0),
                )
            })
            .collect();
        if !split.iter().any(|(n, _)| n == baseline_name) {
            split.push((baseline_name.clone(), 0));
        }
        let baseline_pos = split
            .iter()
            .position(|(n, _)| n == baseline_name)
            .unwrap_or(0);
        let mut members = Vec::with_capacity(split.len());
        let mut moved = 0u32;
        for (name, w) in &split {
            let vi = index_of(name)
                .ok_or_else(|| std::io::Error::other(format!("unknown version {name}")))?;
            let q = versions[vi].quarantined && name != baseline_name;
            if q {
                moved += *w;
            }
            members.push(Member {
                version: vi,
                weight: if q { 0 } else { *w },
                configured_weight: *w,
                seed: select::name_seed(name.as_str()),
                stats: res.pair(&rc.name, name),
                retries_to_baseline: res.retry_counter(&rc.name, name, baseline_name),
                pinnable: true,
            });
        }
        members[baseline_pos].weight += moved;
        let member_of = |vi: usize, members: &mut Vec<Member>| match members
            .iter()
            .position(|m| m.version == vi)
        {
            Some(p) => p,
            None => {
                let name = &versions[vi].name;
                members.push(Member {
                    version: vi,
                    weight: 0,
                    configured_weight: 0,
                    seed: select::name_seed(name.as_str()),
                    stats: res.pair(&rc.name, name),
                    retries_to_baseline: res.retry_counter(&rc.name, name, baseline_name),
                    pinnable: true,
                });
                members.len() - 1
            }
        };
        // Degraded mode (SPEC §5): the baseline is unhealthy too. Its share goes to the
        // route's `fallback` when that one is configured, healthy and not quarantined;
        // otherwise the baseline keeps serving. Never to a quarantined version.
        let baseline_healthy = versions[members[baseline_pos].version]
            .upstream
            .any_healthy();
        let mut stand_in = baseline_pos;
        if !baseline_healthy {
            if let Some(fb) = rc.fallback.as_ref().and_then(&index_of) {
                let usable = versions[fb].upstream.any_healthy() && !versions[fb].quarantined;
                if usable && fb != members[baseline_pos].version {
                    let pos = member_of(fb, &mut members);
                    members[pos].weight += std::mem::take(&mut members[baseline_pos].weight);
                    stand_in = pos;
                }
            }
        }
        let shadow = match &rc.shadow {
            Some(sc) if sc.percent > 0 => {
                let vi = index_of(&sc.version).ok_or_else(|| {
                    std::io::Error::other(format!("unknown version {}", sc.version))
                })?;
                let dropped = |reason| res.shadow_dropped(&rc.name, reason);
                let existed = members.iter().any(|m| m.version == vi);
                let member = member_of(vi, &mut members);
                members[member].pinnable = existed;
                Some(ShadowRoute {
                    member,
                    percent: sc.percent.min(100),
                    active: !versions[vi].quarantined,
                    seed: select::name_seed(sc.version.as_str()) ^ 0x5348_4144_4f57,
                    dropped: ShadowDropped {
                        overloaded: dropped("overloaded"),
                        slow: dropped("slow"),
                        incomplete: dropped("incomplete"),
                    },
                })
            }
            _ => None,
        };
        let mut standby_pairs = Vec::new();
        let mut standby_retries = Vec::new();
        for m in members.iter() {
            let from = &versions[m.version].name;
            standby_retries.push(res.retry_counter(&rc.name, from, baseline_name));
            if let Some(fb) = &rc.fallback {
                standby_retries.push(res.retry_counter(&rc.name, from, fb));
            }
        }
        if let Some(fb) = &rc.fallback {
            standby_pairs.push(res.pair(&rc.name, fb));
        }
        if stand_in != baseline_pos {
            // Retries go to the fallback: count them under its name.
            let to = &versions[members[stand_in].version].name;
            for m in members.iter_mut() {
                m.retries_to_baseline = res.retry_counter(&rc.name, &versions[m.version].name, to);
            }
        }
        if members.iter().all(|m| m.weight == 0) {
            // Every effective weight is 0 (say, a runtime override zeroed the baseline
            // while the others are quarantined): the baseline takes everything.
            members[baseline_pos].weight = 1;
        }
        let mut total = 0u32;
        let cumulative: Vec<u32> = members
            .iter()
            .map(|m| {
                total += m.weight;
                total
            })
            .collect();
        let any_quarantined = members
            .iter()
            .any(|m| versions[m.version].quarantined && m.version != members[baseline_pos].version);
        let degraded = !baseline_healthy;
        let state_now = if degraded {
            RouteState::Degraded
        } else if state.paused.contains(rc.name.as_ref()) {
            RouteState::Paused
        } else if any_quarantined {
            RouteState::RolledBack
        } else if rc.rollout.is_some()
            && members
                .iter()
                .enumerate()
                .any(|(i, m)| i != baseline_pos && m.weight > 0)
        {
            RouteState::RollingOut
        } else {
            RouteState::Steady
        };
        routes.push(Route {
            name: rc.name.clone(),
            config: rc.clone(),
            members: members.into_boxed_slice(),
            cumulative: cumulative.into_boxed_slice(),
            total_weight: total,
            baseline: baseline_pos,
            state: state_now,
            degraded,
            stand_in,
            retry_budget: res.retry_budget(
                &rc.name,
                rc.retry.budget_percent,
                rc.retry.min_per_second,
            ),
            grpc_faults: rc.grpc_fault_codes,
            shadow,
            standby_pairs: standby_pairs.into_boxed_slice(),
            standby_retries: standby_retries.into_boxed_slice(),
        });
    }
    Ok(Table {
        generation,
        any_model_match: config.routes.iter().any(|r| !r.matcher.models.is_empty()),
        recent: res.recent_requests(),
        pin_header: config.pin.header.clone(),
        pin_quarantined: config.pin.quarantined,
        pin_unknown: config.pin.unknown,
        routes: routes.into_boxed_slice(),
        versions: versions.into_boxed_slice(),
        config,
    })
}

impl Table {
    /// The version named `name`, if the table has it.
    #[inline]
    pub fn version(&self, name: &VersionName) -> Option<&Version> {
        self.versions.iter().find(|v| &v.name == name)
    }
}
