//! The evaluator: every `interval`, compare each candidate with its route's baseline, and
//! roll back what a rule condemns, in one atomic table swap.
//!
//! - [`stats`]: the anytime-valid sequential tests and their guarantee.
//! - [`rules`]: the pure `decide(evidence, rules) -> Verdict`.
//! - [`health`]: active health checks of every endpoint.
//! - this module: the tick task (it owns the per-pair epoch state), the rollback sequence
//!   shared with manual actions ([`Controller::rollback`]), and progressive rollouts.
//!
//! Rollback sequence (SPEC §5): quarantine in the runtime state and swap the table (the
//! candidate's share goes to the baseline on every route; the swap is one `ArcSwap::store`),
//! measure trip-to-swap, persist the state (temp, fsync, rename), count the metrics, then off
//! the tick: wait for the candidate's in-flight requests to finish (bounded by
//! `drain_timeout`), send alerts, and append the one `rollback` audit record.

pub mod health;
pub mod rules;
pub mod stats;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{Config, Severity, VersionName};
use crate::control::alerts::Alerts;
use crate::control::audit::Audit;
use crate::control::state;
use crate::routing::store::Store;
use crate::routing::table::{RolloutProgress, RuntimeState, Table};
use crate::telemetry::prom::labels;
use crate::telemetry::recorder::Cumulative;
use crate::telemetry::signals::SignalCounts;
use crate::telemetry::PairStats;
use rules::{Evidence, Side, Trigger, Verdict};

/// Decisions that change the table: shared by the evaluator and the admin API.
#[derive(Debug)]
pub struct Controller {
    pub store: Arc<Store>,
    pub audit: Arc<Audit>,
    pub alerts: Alerts,
    pub state_dir: PathBuf,
    /// Serializes decisions end to end (swap + persist), so the persisted state always
    /// matches a table that was published. Control path only.
    decisions: tokio::sync::Mutex<()>,
}

/// What the evaluator knew when it decided, for the audit record.
#[derive(Debug, Clone, Default)]
pub struct DecisionContext {
    /// How long `decide` (and gathering its evidence) took.
    pub decide: Duration,
    pub metrics: Value,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Controller {
    pub fn new(store: Arc<Store>, audit: Arc<Audit>, alerts: Alerts, state_dir: PathBuf) -> Self {
        Controller {
            store,
            audit,
            alerts,
            state_dir,
            decisions: tokio::sync::Mutex::new(()),
        }
    }

    async fn persist(&self) -> std::io::Result<Duration> {
        let t = Instant::now();
        let snapshot = self.store.runtime_state();
        let dir = self.state_dir.clone();
        tokio::task::spawn_blocking(move || state::save(&dir, &snapshot))
            .await
            .map_err(std::io::Error::other)??;
        Ok(t.elapsed())
    }

    /// Appends an audit record off the async threads.
    pub async fn record(
        &self,
        kind: &'static str,
        fields: Map<String, Value>,
    ) -> std::io::Result<Value> {
        let audit = self.audit.clone();
        tokio::task::spawn_blocking(move || audit.append(kind, fields))
            .await
            .map_err(std::io::Error::other)?
    }

    /// A change that needs no drain: swap (with a new `config`, for a reload), persist, and
    /// one audit record of `kind` (`fields` plus the generations). Serialized with every
    /// other decision.
    pub async fn change(
        &self,
        kind: &'static str,
        config: Option<Config>,
        change: impl FnOnce(&mut RuntimeState),
        mut fields: Map<String, Value>,
    ) -> std::io::Result<Value> {
        let serial = self.decisions.lock().await;
        let swap = self.store.update(config, change).inspect_err(|e| {
            tracing::error!(kind, error = %e, "compiling the new table failed; nothing changed");
        })?;
        if let Err(e) = self.persist().await {
            tracing::error!(kind, error = %e, "persisting the runtime state failed; it holds until restart");
        }
        drop(serial);
        fields.insert("generation_before".into(), json!(swap.generation_before));
        fields.insert("generation_after".into(), json!(swap.generation_after));
        self.record(kind, fields).await
    }

    /// Rolls `version` back: it gets weight 0 on every route. `tripped_at` is when the
    /// decision began, for trip-to-swap. Returns once the table is swapped and the state
    /// persisted, with a handle that resolves to the audit record (after drain and alerts).
    #[allow(clippy::too_many_arguments)]
    pub async fn rollback(
        self: &Arc<Self>,
        route: &str,
        version: &VersionName,
        trigger: Trigger,
        reason: String,
        initiated_by: Option<String>,
        tripped_at: Instant,
        ctx: DecisionContext,
    ) -> std::io::Result<tokio::task::JoinHandle<Option<Value>>> {
        let _serial = self.decisions.lock().await;
        let table = self.store.load();
        let Some(v) = table.version(version) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("unknown version {version}"),
            ));
        };
        if v.quarantined {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("version {version} is already rolled back"),
            ));
        }
        let fingerprint = v.config.fingerprint.clone();
        let to_version = table
            .routes
            .iter()
            .find(|r| &*r.name == route)
            .map(|r| table.versions[r.baseline_member().version].name.to_string());
        let m = &self.store.metrics;
        m.rollback_triggered
            .get_or_create(&labels(&[("route", route), ("trigger", trigger.as_str())]))
            .inc();

        let swap = self.store.update(None, |s| {
            s.quarantined.insert(version.clone(), fingerprint);
            s.rollouts.retain(|_, p| &p.version != version);
        })?;
        let trip_to_swap = tripped_at.elapsed();
        m.rollback_completed
            .get_or_create(&labels(&[("route", route)]))
            .inc();
        m.rollback_duration.observe(trip_to_swap.as_secs_f64());
        // In flight on the candidate at the swap: these finish on it and are counted.
        let new_table = self.store.load();
        let pairs: Vec<_> = new_table
            .routes
            .iter()
            .flat_map(|r| r.members.iter())
            .filter(|mem| &new_table.versions[mem.version].name == version)
            .map(|mem| mem.stats.clone())
            .collect();
        let drained: i64 = pairs.iter().map(|p| p.in_flight().max(0)).sum();
        for p in &pairs {
            p.new_incarnation();
        }
        let persist = match self.persist().await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "persisting the quarantine failed; it holds until restart");
                Duration::ZERO
            }
        };
        tracing::warn!(%route, %version, trigger = trigger.as_str(), %reason, trip_to_swap_us = trip_to_swap.as_micros() as u64, generation = swap.generation_after, "rolled back");

        let this = self.clone();
        let route = route.to_string();
        let version = version.clone();
        let drain_timeout = table.config.drain_timeout;
        Ok(tokio::spawn(async move {
            let t = Instant::now();
            while pairs.iter().map(|p| p.in_flight().max(0)).sum::<i64>() > 0
                && t.elapsed() < drain_timeout
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let drain = t.elapsed();
            let mut fields = Map::new();
            fields.insert("trigger".into(), json!(trigger.as_str()));
            fields.insert("route".into(), json!(route));
            fields.insert("from_version".into(), json!(version.as_str()));
            fields.insert("to_version".into(), json!(to_version));
            fields.insert("reason".into(), json!(reason));
            fields.insert("automatic".into(), json!(initiated_by.is_none()));
            fields.insert("initiated_by".into(), json!(initiated_by));
            fields.insert("generation_before".into(), json!(swap.generation_before));
            fields.insert("generation_after".into(), json!(swap.generation_after));
            fields.insert(
                "trip_to_swap_us".into(),
                json!(trip_to_swap.as_micros() as u64),
            );
            fields.insert(
                "phases".into(),
                json!([
                    {"phase": "decide", "duration_us": ctx.decide.as_micros() as u64},
                    {"phase": "swap", "duration_us": (swap.compile + swap.swap).as_micros() as u64},
                    {"phase": "persist", "duration_us": persist.as_micros() as u64},
                    {"phase": "drain", "duration_ms": drain.as_millis() as u64, "drained_requests": drained},
                ]),
            );
            fields.insert("metrics".into(), ctx.metrics);
            let alert = json!({
                "kind": "rollback", "severity": "warning", "route": route, "version": version.as_str(),
                "to_version": fields["to_version"], "trigger": trigger.as_str(), "reason": fields["reason"],
                "generation": swap.generation_after,
            });
            let hooks = this.store.config().alerts.webhooks.clone();
            let sent = this.alerts.send(&hooks, Severity::Warning, &alert).await;
            fields.insert(
                "alerts_sent".into(),
                serde_json::to_value(sent).unwrap_or_default(),
            );
            match this.record("rollback", fields).await {
                Ok(rec) => Some(rec),
                Err(e) => {
                    tracing::error!(error = %e, "writing the rollback audit record failed");
                    None
                }
            }
        }))
    }
}

/// Per (route, candidate) test state: the current epoch and the cumulative counts at its
/// start, so each epoch's test sees only that epoch's requests.
struct Epoch {
    number: u64,
    started: Instant,
    candidate: Cumulative,
    baseline: Cumulative,
    candidate_signals: SignalCounts,
    baseline_signals: SignalCounts,
}

/// Everything the evaluator tracks per (route, candidate) between ticks.
struct Track {
    /// The candidate's incarnation this track judges (see `PairStats::new_incarnation`).
    incarnation: u64,
    epoch: Epoch,
    /// (time, cumulative flagged) samples covering the `safety_violations` period.
    flagged: VecDeque<(Instant, u64)>,
    /// Drift: candidate samples already tested, consecutive significant checks, last p.
    drift_seen: u64,
    drift_streak: u32,
    drift_p: f64,
}

impl Track {
    fn new(now: Instant, cand: &PairStats, base: &PairStats) -> Self {
        let c = cand.signals.counts();
        Track {
            incarnation: cand.incarnation(),
            epoch: Epoch::start(1, now, cand, base),
            flagged: VecDeque::from([(now, c.flagged)]),
            drift_seen: c.samples,
            drift_streak: 0,
            drift_p: 1.0,
        }
    }

    /// Guardrail flags within the last `per`: keeps one sample at or before `now - per`
    /// and one at most every `per / 64`, so memory stays bounded whatever the period.
    fn flagged_within(&mut self, now: Instant, per: Duration, flagged: u64) -> u64 {
        let step = (per / 64).max(Duration::from_millis(100));
        if self
            .flagged
            .back()
            .is_none_or(|(t, _)| now.duration_since(*t) >= step)
        {
            self.flagged.push_back((now, flagged));
        }
        while self.flagged.len() > 1 && now.duration_since(self.flagged[1].0) >= per {
            self.flagged.pop_front();
        }
        flagged - self.flagged.front().map_or(flagged, |(_, f)| *f)
    }

    /// One drift check when the candidate has `min` new samples since the last one: a
    /// Kolmogorov-Smirnov test of those against the baseline's most recent samples.
    fn drift_check(
        &mut self,
        rule: &crate::config::DriftRule,
        min: u64,
        cand: &PairStats,
        base: &PairStats,
    ) {
        let min = min.max(20);
        if cand.signals.counts().samples < self.drift_seen + min
            || base.signals.counts().samples < min
        {
            return;
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        self.drift_seen = cand.signals.samples_since(self.drift_seen, &mut a);
        base.signals.samples_since(0, &mut b);
        let (_, p) = stats::ks_two_sample(&mut a, &mut b);
        self.drift_p = p;
        if p < rule.p_value {
            self.drift_streak += 1;
        } else {
            self.drift_streak = 0;
        }
    }
}

impl Epoch {
    fn start(number: u64, now: Instant, cand: &PairStats, base: &PairStats) -> Self {
        Epoch {
            number,
            started: now,
            candidate: cand.cumulative(),
            baseline: base.cumulative(),
            candidate_signals: cand.signals.counts(),
            baseline_signals: base.signals.counts(),
        }
    }
}

/// The evaluator task. Runs until `stop` turns true.
pub async fn run(controller: Arc<Controller>, mut stop: watch::Receiver<bool>) {
    let mut tracks: HashMap<(Arc<str>, VersionName), Track> = HashMap::new();
    let interval = controller.store.config().evaluator.interval;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let now = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            now = tick.tick() => now,
        };
        let table = controller.store.load();
        table_tick(&controller, &table, &mut tracks, now).await;
        rollout_tick(&controller, &table).await;
    }
}

async fn table_tick(
    c: &Arc<Controller>,
    table: &Table,
    tracks: &mut HashMap<(Arc<str>, VersionName), Track>,
    now: Instant,
) {
    let ev = &table.config.evaluator;
    let alpha = (1.0 - ev.confidence).max(1e-12);
    c.store.telemetry.flush(now);
    let runtime = c.store.runtime_state();
    let mut live = Vec::new();
    for route in table.routes.iter() {
        if runtime.paused.contains(&*route.name) {
            continue;
        }
        let base = route.baseline_member();
        let base_version = &table.versions[base.version];
        for (i, m) in route.members.iter().enumerate() {
            let v = &table.versions[m.version];
            if i == route.baseline || v.quarantined || v.name == base_version.name {
                continue;
            }
            let t0 = Instant::now();
            let key = (route.name.clone(), v.name.clone());
            live.push(key.clone());
            let cand_now = m.stats.cumulative();
            let base_now = base.stats.cumulative();
            let track = tracks
                .entry(key)
                .or_insert_with(|| Track::new(now, &m.stats, &base.stats));
            if track.incarnation != m.stats.incarnation() {
                // Rolled back and resumed since the last tick: start from today's traffic.
                *track = Track::new(now, &m.stats, &base.stats);
            }
            if now.duration_since(track.epoch.started) >= ev.window {
                track.epoch = Epoch::start(track.epoch.number + 1, now, &m.stats, &base.stats);
            }
            let cand_sig = m.stats.signals.counts();
            let safety_flagged = match &ev.rules.safety_violations {
                Some(rule) => track.flagged_within(now, rule.per, cand_sig.flagged),
                None => 0,
            };
            if let Some(rule) = &ev.rules.drift {
                track.drift_check(rule, ev.min_requests, &m.stats, &base.stats);
            }
            let epoch = &track.epoch;
            let side =
                |now: &Cumulative, start: &Cumulative, sig: SignalCounts, sig0: SignalCounts| {
                    let (n1, e1) = now.answered_and_errors();
                    let (n0, e0) = start.answered_and_errors();
                    Side {
                        requests: n1 - n0,
                        errors: e1 - e0,
                        feedback: sig.feedback - sig0.feedback,
                        incorrect: sig.incorrect - sig0.incorrect,
                    }
                };
            let candidate = side(
                &cand_now,
                &epoch.candidate,
                cand_sig,
                epoch.candidate_signals,
            );
            let baseline = side(
                &base_now,
                &epoch.baseline,
                base.stats.signals.counts(),
                epoch.baseline_signals,
            );
            let base_window = base.stats.window(now);
            let cand_window = m.stats.window(now);
            let p99 = |h: &hdrhistogram::Histogram<u64>| {
                if h.is_empty() {
                    Duration::ZERO
                } else {
                    Duration::from_micros(h.value_at_quantile(0.99))
                }
            };
            let base_p99 = p99(&base_window.ttfb);
            let base_answered = base_window.stats().requests;
            let mut e = Evidence {
                candidate,
                baseline,
                candidate_p99: p99(&cand_window.ttfb),
                baseline_p99: base_p99,
                alpha: stats::epoch_alpha(alpha, epoch.number),
                ..Evidence::default()
            };
            e.safety_flagged = safety_flagged;
            e.drift_streak = track.drift_streak;
            e.drift_p = track.drift_p;
            if let Some(sla) = ev.rules.latency_p99_max {
                e.over_sla = cand_now.ttfb_over(sla) - epoch.candidate.ttfb_over(sla);
            }
            if let Some(k) = ev.rules.latency_p99_ratio {
                if base_answered >= ev.min_requests && !base_p99.is_zero() {
                    let q = base_p99.mul_f64(k);
                    e.over_baseline_p99 =
                        Some(cand_now.ttfb_over(q) - epoch.candidate.ttfb_over(q));
                }
            }
            if v.config.health_check.is_some() {
                e.health_failing_streak = v
                    .upstream
                    .endpoints
                    .iter()
                    .map(|ep| ep.failures.load(std::sync::atomic::Ordering::Relaxed))
                    .min();
            }
            let verdict = rules::decide(&e, &ev.rules, ev.min_requests, ev.confidence);
            let decided = t0.elapsed();
            if let Verdict::Trip { trigger, reason } = verdict {
                let rate = |s: &Side| {
                    if s.requests == 0 {
                        0.0
                    } else {
                        s.errors as f64 / s.requests as f64
                    }
                };
                let ctx = DecisionContext {
                    decide: decided,
                    metrics: json!({
                        "candidate": {"requests": e.candidate.requests, "error_rate": rate(&e.candidate), "p99_ms": e.candidate_p99.as_secs_f64() * 1000.0},
                        "baseline": {"requests": e.baseline.requests, "error_rate": rate(&e.baseline), "p99_ms": e.baseline_p99.as_secs_f64() * 1000.0},
                    }),
                };
                if let Err(err) = c
                    .rollback(&route.name, &v.name, trigger, reason, None, t0, ctx)
                    .await
                {
                    tracing::error!(route = %route.name, version = %v.name, error = %err, "rollback failed");
                }
                // The table changed: the rest of this tick would judge a stale one.
                return;
            }
        }
    }
    tracks.retain(|k, _| live.contains(k));
}

/// Weight overrides for `route` that replace its split: every version of the split at 0,
/// then `given`.
pub(crate) fn override_split(
    route: &crate::routing::table::Route,
    given: impl IntoIterator<Item = (VersionName, u32)>,
) -> std::collections::BTreeMap<VersionName, u32> {
    let mut w: std::collections::BTreeMap<VersionName, u32> = route
        .config
        .split
        .iter()
        .map(|(n, _)| (n.clone(), 0))
        .collect();
    w.extend(given);
    w
}

/// Weight overrides giving `candidate` `weight` and `baseline` the rest; every other
/// version of the route's split gets 0.
pub(crate) fn split_weights(
    route: &crate::routing::table::Route,
    candidate: &VersionName,
    weight: u32,
    baseline: &VersionName,
) -> std::collections::BTreeMap<VersionName, u32> {
    override_split(
        route,
        [
            (baseline.clone(), 100 - weight),
            (candidate.clone(), weight),
        ],
    )
}

/// Progressive rollouts: one step per clean `hold`, `promote` at 100.
async fn rollout_tick(c: &Arc<Controller>, table: &Table) {
    let runtime = c.store.runtime_state();
    for route in table.routes.iter() {
        let Some(plan) = &route.config.rollout else {
            continue;
        };
        if plan.steps.is_empty() || runtime.paused.contains(&*route.name) || route.degraded {
            continue;
        }
        let baseline = &table.versions[route.baseline_member().version].name;
        let progress = runtime.rollouts.get(&*route.name);
        let candidate = match progress {
            Some(p) => p.version.clone(),
            None => {
                // The candidate: the first version of the split other than the baseline that
                // the file gives weight and that is not rolled back.
                let Some((name, _)) = route.config.split.iter().find(|(n, w)| {
                    n != baseline && w.0 > 0 && !table.version(n).is_some_and(|v| v.quarantined)
                }) else {
                    continue;
                };
                name.clone()
            }
        };
        if table.version(&candidate).is_none_or(|v| v.quarantined) {
            continue;
        }
        let (next_step, due) = match progress {
            None => (0, true),
            Some(p) => (
                p.step + 1,
                unix_ms().saturating_sub(p.since_ms) >= plan.hold.as_millis() as u64,
            ),
        };
        if !due {
            continue;
        }
        let route_name = route.name.to_string();
        if next_step >= plan.steps.len() || plan.steps[next_step] >= 100 {
            // The last step below 100 held cleanly: the candidate becomes the baseline.
            let mut f = Map::new();
            f.insert("route".into(), json!(route_name));
            f.insert("version".into(), json!(candidate.as_str()));
            f.insert("from_version".into(), json!(baseline.as_str()));
            f.insert("automatic".into(), json!(true));
            f.insert("initiated_by".into(), Value::Null);
            f.insert(
                "reason".into(),
                json!(format!(
                    "rollout completed {} steps of {:?} each",
                    plan.steps.len(),
                    plan.hold
                )),
            );
            let change = |s: &mut RuntimeState| {
                s.rollouts.remove(&route_name);
                s.baselines.insert(route_name.clone(), candidate.clone());
                s.weight_overrides.insert(
                    route_name.clone(),
                    split_weights(route, &candidate, 100, baseline),
                );
            };
            if c.change("promote", None, change, f).await.is_ok() {
                tracing::info!(route = %route_name, version = %candidate, "rollout complete: promoted");
            }
            continue;
        }
        let weight = plan.steps[next_step].min(100);
        let mut f = Map::new();
        f.insert("route".into(), json!(route_name));
        f.insert("version".into(), json!(candidate.as_str()));
        f.insert("step".into(), json!(next_step));
        f.insert("weight".into(), json!(weight));
        let change = |s: &mut RuntimeState| {
            let progress = RolloutProgress {
                version: candidate.clone(),
                step: next_step,
                since_ms: unix_ms(),
            };
            s.rollouts.insert(route_name.clone(), progress);
            s.weight_overrides.insert(
                route_name.clone(),
                split_weights(route, &candidate, weight, baseline),
            );
        };
        if c.change("rollout_step", None, change, f).await.is_ok() {
            tracing::info!(route = %route_name, version = %candidate, weight, "rollout step");
        }
    }
}
