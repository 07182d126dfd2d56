//! The evaluator: every `interval`, feed each candidate's new observations to its change
//! detectors, and turn a trip into a rollback command; step progressive rollouts that held
//! cleanly.
//!
//! - [`detector`]: the e-detectors and their false-alarm rate guarantee.
//! - [`stats`]: how each rule becomes a Bernoulli question.
//! - [`rules`]: the pure `decide(evidence, rules) -> Verdict`.
//! - [`health`]: active health checks of every endpoint.
//! - this module: the tick task. It owns one [`Track`] per (route, candidate, baseline,
//!   fingerprints, incarnation): a baseline change, a new bundle or a resume starts fresh
//!   detectors, never mixing evidence about two different comparisons.
//!
//! Decisions are not applied here: a trip becomes a [`Command`] with what it assumed
//! ([`Expect`]) and goes to [`Controller::apply`], which checks it again against the state
//! of that moment (a promote or pause in between wins).
//!
//! # Rollouts (SPEC §5)
//!
//! A route with `rollout` moves its candidate one step per clean `hold`: at least
//! `min_requests` answered by the candidate *and* the baseline during the hold (so every
//! comparative rule was evaluated on them), and no trip (a trip rolls back). A hold without
//! that evidence is extended and the status says `waiting_for: traffic`. After the last step
//! the candidate is promoted and the plan is complete ([`crate::decision::rollout_plan`]).
//! Hold evidence lives in memory: after a restart a hold in progress needs fresh evidence.

pub mod detector;
pub mod health;
pub mod rules;
pub mod stats;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{EvaluatorConfig, VersionName};
pub use crate::decision::Controller;
use crate::decision::{rollout_plan, unix_ms, Action, Command, Expect, Refused};
use crate::routing::table::{Member, Route, Table};
use crate::telemetry::prom::labels;
use crate::telemetry::recorder::Cumulative;
use crate::telemetry::signals::SignalCounts;
use crate::telemetry::{PairStats, Ring, RingSlot};
use detector::{Bernoulli, Drift, Starts};
use rules::{Evidence, RuleProgress, Side, Trigger, Verdict};

/// Seconds of per-rule evidence kept for the rollback record's trajectory.
const TRAJECTORY: usize = 60;

/// Guardrail-flag samples a track keeps: one per `per / 64` within the period, the one
/// before it, and room for a period that grew on a reload.
const FLAGGED_SAMPLES: usize = 2 * 66;

/// What the evaluator knows now: for status, metrics and the status page.
#[derive(Debug, Clone, Default, Serialize)]
pub struct View {
    pub candidates: Vec<CandidateView>,
    pub rollouts: BTreeMap<String, RolloutView>,
}

/// One candidate's evidence against its baseline.
#[derive(Debug, Clone, Serialize)]
pub struct CandidateView {
    pub route: String,
    pub version: String,
    pub baseline: String,
    /// Answered since its detectors began (this baseline, this incarnation).
    pub requests: u64,
    pub baseline_requests: u64,
    pub rules: Vec<RuleProgress>,
}

/// Where a route's rollout stands.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutView {
    pub version: String,
    pub step: usize,
    pub weight: u32,
    pub hold_ms: u64,
    pub held_ms: u64,
    /// Answered during this hold, and how many each side needs.
    pub requests: u64,
    pub baseline_requests: u64,
    pub needed: u64,
    /// `traffic` when the hold is over but its evidence is not there yet.
    pub waiting_for: Option<&'static str>,
    /// Enabled rules that had nothing to judge during this hold (no feedback, no drift
    /// samples): the hold does not wait for them, and says so.
    pub not_evaluated: Vec<&'static str>,
}

/// One side's cumulative counts at one tick (the candidate's time-to-first-byte histogram
/// is kept apart: only the candidate's latency is tested).
#[derive(Clone, Copy)]
struct Counts {
    answered: u64,
    errors: u64,
    signals: SignalCounts,
}

impl Counts {
    fn of(c: &Cumulative, signals: SignalCounts) -> Self {
        let (answered, errors) = c.answered_and_errors();
        Counts {
            answered,
            errors,
            signals,
        }
    }
}

/// Requests over `limit` between two cumulative histograms.
fn over_between(now: &Histogram<u64>, prev: &Histogram<u64>, limit: Duration) -> u64 {
    let us = limit.as_micros().min(u128::from(u64::MAX)) as u64;
    let over = |h: &Histogram<u64>| {
        if h.is_empty() || h.max() <= us {
            0
        } else {
            h.count_between(h.next_non_equivalent(us), h.max())
        }
    };
    over(now).saturating_sub(over(prev))
}

/// One tick's new observations of a (candidate, baseline) pair: what [`Comparison`]
/// learns from. The evaluator reads them from the live statistics; the simulation bench
/// (`benches/evaluator.rs`) makes them up, and both run the same detectors and `decide`.
#[derive(Debug, Clone, Default)]
pub struct Tick<'a> {
    pub candidate_answered: u64,
    pub candidate_errors: u64,
    pub baseline_answered: u64,
    pub baseline_errors: u64,
    /// Candidate requests of the tick with time to first byte over `latency_p99_max`.
    pub over_sla: u64,
    /// ... over `latency_p99_ratio × baseline p99`, when the baseline's p99 is known.
    pub over_baseline_p99: Option<u64>,
    pub candidate_feedback: u64,
    pub candidate_incorrect: u64,
    pub baseline_feedback: u64,
    pub baseline_incorrect: u64,
    /// Time-aligned (candidate, baseline) drift samples, and the cut points to bet at.
    pub drift_pairs: &'a [(f64, f64)],
    pub drift_cuts: Option<[f64; detector::DRIFT_QUANTILES.len()]>,
}

/// The detectors of one (candidate, baseline) comparison and what they have seen.
#[derive(Debug, Clone, Default)]
pub struct Comparison {
    starts: Starts,
    err_max: Bernoulli,
    err_ratio: Bernoulli,
    err_floor: Bernoulli,
    lat_max: Bernoulli,
    lat_ratio: Bernoulli,
    accuracy: Bernoulli,
    drift: Drift,
    pub candidate_answered: u64,
    pub baseline_answered: u64,
    pub candidate_feedback: u64,
    pub candidate_incorrect: u64,
    pub baseline_feedback: u64,
    pub baseline_incorrect: u64,
    /// The baseline's feedback and incorrect answers, exponentially decayed over
    /// `RECENT_FEEDBACK_WINDOWS` windows.
    recent_feedback: (f64, f64),
    /// The candidate's answers per tick over the last `window` (one slot a tick), and
    /// their sum: the *current* error rate the `min_error_rate` floor is about.
    recent: Ring<Answers>,
    recent_sum: Answers,
    /// The floor is met now: the window's error rate is above `min_error_rate` by its
    /// one-sided 99.997 % Wilson lower bound.
    floor_met: bool,
}

/// Answered requests and errors of one tick (or the sum of several).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Answers {
    answered: u64,
    errors: u64,
}

impl RingSlot for Answers {
    fn clear(&mut self) {
        *self = Answers::default();
    }
    fn merge(&mut self, other: &Self) {
        self.answered += other.answered;
        self.errors += other.errors;
    }
}

/// Effective baseline feedback items the accuracy null's plug-in rate needs.
const RECENT_FEEDBACK_MIN: f64 = 50.0;
/// Standard errors of the baseline's recent incorrect rate added to the accuracy null, so
/// a noisy estimate below the truth does not turn a healthy candidate into a "drop".
const PLUG_IN_Z: f64 = 2.0;
/// The baseline's recent feedback decays over this many `window`s: long enough for a
/// steady estimate, short enough to follow a shift of the input mix within minutes.
const RECENT_FEEDBACK_WINDOWS: f64 = 10.0;
/// Normal quantile of the floor's Wilson lower bound (one-sided 99.997 %): a repeated
/// check every tick, so a chance excursion of a candidate below the floor must be rare.
const FLOOR_Z: f64 = 4.0;

/// The Wilson score lower bound of a rate of `x` in `n` at `z`.
fn wilson_lower(x: u64, n: u64, z: f64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let (n, p) = (n as f64, x as f64 / n as f64);
    let z2 = z * z;
    (p + z2 / (2.0 * n) - z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt()) / (1.0 + z2 / n)
}

impl Comparison {
    /// Feeds one tick to every enabled rule's detector.
    pub fn observe(&mut self, ev: &EvaluatorConfig, t: &Tick<'_>) {
        let start = self.starts.tick(ev.interval);
        let cap = detector::log_threshold(ev.confidence, ev.interval);
        for d in [
            &mut self.err_max,
            &mut self.err_ratio,
            &mut self.err_floor,
            &mut self.lat_max,
            &mut self.lat_ratio,
            &mut self.accuracy,
        ] {
            d.set_cap(cap);
        }
        self.drift.set_cap(cap);
        let r = &ev.rules;
        let (dca, dce) = (
            t.candidate_answered,
            t.candidate_errors.min(t.candidate_answered),
        );
        let (dba, dbe) = (
            t.baseline_answered,
            t.baseline_errors.min(t.baseline_answered),
        );
        self.candidate_answered += dca;
        self.baseline_answered += dba;
        if let Some(max) = r.error_rate_max {
            self.err_max.observe(start, dce, dca, max);
        }
        if let Some(k) = r.error_rate_ratio {
            match stats::ratio_theta0(k, dca, dba) {
                Some(theta0) => self.err_ratio.observe(start, dce, dce + dbe, theta0),
                None => self.err_ratio.observe(start, 0, 0, 0.5),
            }
            if let Some(floor) = r.min_error_rate {
                self.err_floor.observe(start, dce, dca, floor);
                let ticks = (ev.window.as_secs_f64() / ev.interval.as_secs_f64()).ceil() as usize;
                self.push_recent(
                    ticks.max(1),
                    Answers {
                        answered: dca,
                        errors: dce,
                    },
                );
                self.floor_met =
                    wilson_lower(self.recent_sum.errors, self.recent_sum.answered, FLOOR_Z)
                        >= floor;
            }
        }
        if r.latency_p99_max.is_some() {
            self.lat_max.observe(start, t.over_sla, dca, 0.01);
        }
        if r.latency_p99_ratio.is_some() {
            match t.over_baseline_p99 {
                Some(over) => self.lat_ratio.observe(start, over, dca, 0.01),
                None => self.lat_ratio.observe(start, 0, 0, 0.01),
            }
        }
        if let Some(drop) = r.accuracy_drop {
            // The baseline's *recent* incorrect rate (feedback decayed over ten windows), from
            // before this tick: fixed before the tick's observations, as the test needs, and
            // time-aligned, so a shift of the input mix that moves both versions is not a
            // drop of the candidate's, however long the comparison has run.
            if self.recent_feedback.0 >= RECENT_FEEDBACK_MIN {
                // The plug-in null, widened by PLUG_IN_Z standard errors of the estimate: a
                // thin baseline makes the test conservative, never trigger-happy.
                let n = self.recent_feedback.0;
                let wrong = self.recent_feedback.1 / n;
                let se = (wrong * (1.0 - wrong) / n).sqrt();
                self.accuracy.observe(
                    start,
                    t.candidate_incorrect,
                    t.candidate_feedback,
                    (wrong + drop + PLUG_IN_Z * se).min(0.999),
                );
            } else {
                self.accuracy.observe(start, 0, 0, 0.5);
            }
            let horizon = ev.window.as_secs_f64().max(1e-3) * RECENT_FEEDBACK_WINDOWS;
            let decay = (-ev.interval.as_secs_f64() / horizon).exp();
            self.recent_feedback = (
                self.recent_feedback.0 * decay + t.baseline_feedback as f64,
                self.recent_feedback.1 * decay + t.baseline_incorrect as f64,
            );
        }
        self.candidate_feedback += t.candidate_feedback;
        self.candidate_incorrect += t.candidate_incorrect;
        self.baseline_feedback += t.baseline_feedback;
        self.baseline_incorrect += t.baseline_incorrect;
        if r.drift.is_some() {
            self.drift
                .observe(start, t.drift_pairs, t.drift_cuts.as_ref());
        }
    }

    /// Adds one tick's answers to the window of the last `ticks` ticks and its sum.
    fn push_recent(&mut self, ticks: usize, tick: Answers) {
        if self.recent.capacity() != ticks {
            // A new window or interval (a reload): keep the newest ticks that still fit.
            self.recent = self.recent.resized(ticks, Answers::default);
            self.recent_sum = Answers::default();
            self.recent.merge_from(0, &mut self.recent_sum);
        }
        let next = self.recent.head();
        if next >= ticks as u64 {
            // The tick that leaves the window as this one takes its slot.
            let gone = *self.recent.slot(next - ticks as u64);
            self.recent_sum.answered -= gone.answered;
            self.recent_sum.errors -= gone.errors;
        }
        *self.recent.advance_to(next) = tick;
        self.recent_sum.merge(&tick);
    }

    /// Every rule's statistic, in logs.
    pub fn statistics(&self) -> rules::Statistics {
        rules::Statistics {
            error_rate_max: self.err_max.log_statistic(),
            error_rate_ratio: self.err_ratio.log_statistic(),
            min_error_rate: self.err_floor.log_statistic(),
            latency_p99_max: self.lat_max.log_statistic(),
            latency_p99_ratio: self.lat_ratio.log_statistic(),
            accuracy_drop: self.accuracy.log_statistic(),
            drift: self.drift.log_statistic(),
        }
    }

    /// The evidence `decide` needs from the detectors (the rest, windows and reasons, is
    /// filled in by the caller).
    pub fn evidence(&self, log_threshold: f64) -> Evidence {
        Evidence {
            candidate_answered: self.candidate_answered,
            baseline_answered: self.baseline_answered,
            candidate_feedback: self.candidate_feedback,
            baseline_feedback: self.baseline_feedback,
            drift_pairs: self.drift.pairs,
            stats: self.statistics(),
            floor_met: self.floor_met,
            log_threshold,
            ..Evidence::default()
        }
    }
}

/// What one tick's rules were evaluated on, for a rollout hold's evidence.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    candidate: u64,
    baseline: u64,
    latency_judged: u64,
    feedback: u64,
    drift_pairs: u64,
}

/// A live comparison: its detectors, and where the cumulative statistics stood at the
/// previous tick.
struct Track {
    incarnation: u64,
    /// The statistics this comparison reads: a pair freed and registered again (its version
    /// left the config and came back) is another pair, judged afresh.
    cand_stats: Arc<PairStats>,
    base_stats: Arc<PairStats>,
    cmp: Comparison,
    cand: Counts,
    /// The candidate's cumulative time-to-first-byte histogram at the previous tick.
    cand_ttfb: Histogram<u64>,
    base: Counts,
    /// Drift samples consumed so far, per side.
    cand_samples: u64,
    base_samples: u64,
    /// (time, cumulative flagged) samples covering the `safety_violations` period, by
    /// sample number, from `flagged_front` (the one at or before the period's start) on.
    flagged: Ring<(Instant, u64)>,
    flagged_front: u64,
    /// Per-second evidence of every rule, by sample number.
    trajectory: Ring<(Instant, Vec<(Trigger, f64)>)>,
    /// The comparison's key in the fleet's pooled counts.
    pool_key: String,
    /// Each other replica's published counts as last added: (boot, counts).
    remote_seen: HashMap<String, (u64, crate::fleet::Counts)>,
}

/// The identity of a comparison: a change of any part starts a new [`Track`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TrackKey {
    route: Arc<str>,
    candidate: VersionName,
    baseline: VersionName,
    fingerprints: (String, String),
}

impl Track {
    fn new(
        now: Instant,
        cand: &Arc<PairStats>,
        base_stats: &Arc<PairStats>,
        base: Counts,
        base_samples: u64,
        pool_key: String,
        remote: Option<&crate::fleet::Remote>,
    ) -> Self {
        let c = cand.signals.counts();
        let cum = cand.cumulative();
        // Other replicas' counts so far are not this comparison's: only what they add.
        let remote_seen = remote
            .and_then(|r| r.by_key.get(&pool_key))
            .map(|v| {
                v.iter()
                    .map(|(r, b, c)| (format!("{r}\t{b}"), (*b, *c)))
                    .collect()
            })
            .unwrap_or_default();
        let mut flagged = Ring::new(FLAGGED_SAMPLES, || (now, c.flagged));
        flagged.advance_with(0, |_| {});
        Track {
            pool_key,
            remote_seen,
            incarnation: cand.incarnation(),
            cand_stats: cand.clone(),
            base_stats: base_stats.clone(),
            cmp: Comparison::default(),
            cand: Counts::of(&cum, c),
            cand_ttfb: cum.ttfb,
            base,
            cand_samples: c.samples,
            base_samples,
            flagged,
            flagged_front: 0,
            trajectory: Ring::new(TRAJECTORY, || (now, Vec::new())),
        }
    }

    /// Still reading `cand` and `base`, in the same incarnation?
    fn reads(&self, cand: &Arc<PairStats>, base: &Arc<PairStats>) -> bool {
        self.incarnation == cand.incarnation()
            && Arc::ptr_eq(&self.cand_stats, cand)
            && Arc::ptr_eq(&self.base_stats, base)
    }

    /// Guardrail flags within the last `per`: keeps one sample at or before `now - per`
    /// and one at most every `per / 64`, so memory stays bounded whatever the period.
    fn flagged_within(&mut self, now: Instant, per: Duration, flagged: u64) -> u64 {
        let step = (per / 64).max(Duration::from_millis(100));
        let cap = self.flagged.capacity() as u64;
        if self
            .flagged
            .newest()
            .is_none_or(|(t, _)| now.duration_since(*t) >= step)
        {
            let next = self.flagged.head();
            // Full only after `per` grew on a reload (samples are `per / 64` apart): the
            // oldest goes, and the count covers a little less than `per` for a while.
            if next - self.flagged_front >= cap {
                self.flagged_front = next + 1 - cap;
            }
            *self.flagged.advance_with(next, |_| {}) = (now, flagged);
        }
        while self.flagged.head() - self.flagged_front > 1
            && now.duration_since(self.flagged.slot(self.flagged_front + 1).0) >= per
        {
            self.flagged_front += 1;
        }
        flagged.saturating_sub(self.flagged.slot(self.flagged_front).1)
    }

    /// Reads one tick's new observations from the live statistics and feeds them to the
    /// comparison. Returns what the tick's rules were evaluated on.
    #[allow(clippy::too_many_arguments)]
    fn observe(
        &mut self,
        ev: &EvaluatorConfig,
        cand: &PairStats,
        base: &PairStats,
        b_now: Counts,
        base_p99: Option<Duration>,
        scratch: &mut (Vec<f64>, Vec<f64>),
        pool: Option<(
            &crate::fleet::Remote,
            &mut BTreeMap<String, crate::fleet::Counts>,
        )>,
    ) -> Seen {
        let r = &ev.rules;
        let c_sig = cand.signals.counts();
        let b_sig = b_now.signals;
        let c_cum = cand.cumulative();
        let c_now = Counts::of(&c_cum, c_sig);
        let pairs = match r.drift {
            Some(_) => self.drift_pairs(cand, base, scratch),
            None => (Vec::new(), None),
        };
        let over = |limit| over_between(&c_cum.ttfb, &self.cand_ttfb, limit);
        let over_baseline_p99 = match (r.latency_p99_ratio, base_p99) {
            (Some(k), Some(p99)) if !p99.is_zero() => Some(over(Duration::from_secs_f64(
                (p99.as_secs_f64() * k).min(86_400.0),
            ))),
            _ => None,
        };
        let mut tick = Tick {
            candidate_answered: c_now.answered.saturating_sub(self.cand.answered),
            candidate_errors: c_now.errors.saturating_sub(self.cand.errors),
            baseline_answered: b_now.answered.saturating_sub(self.base.answered),
            baseline_errors: b_now.errors.saturating_sub(self.base.errors),
            over_sla: r.latency_p99_max.map_or(0, over),
            over_baseline_p99,
            candidate_feedback: c_sig.feedback.saturating_sub(self.cand.signals.feedback),
            candidate_incorrect: c_sig.incorrect.saturating_sub(self.cand.signals.incorrect),
            baseline_feedback: b_sig.feedback.saturating_sub(self.base.signals.feedback),
            baseline_incorrect: b_sig.incorrect.saturating_sub(self.base.signals.incorrect),
            drift_pairs: &pairs.0,
            drift_cuts: pairs.1,
        };
        if let Some((remote, published)) = pool {
            self.pool(&mut tick, remote, published);
        }
        self.cmp.observe(ev, &tick);
        let seen = Seen {
            candidate: tick.candidate_answered,
            baseline: tick.baseline_answered,
            latency_judged: if tick.over_baseline_p99.is_some() {
                tick.candidate_answered
            } else {
                0
            },
            feedback: tick.candidate_feedback,
            drift_pairs: tick.drift_pairs.len() as u64,
        };
        self.cand = c_now;
        self.cand_ttfb = c_cum.ttfb;
        self.base = b_now;
        seen
    }

    /// In a pooling fleet: adds this tick's own counts to what this replica publishes, and
    /// the other live replicas' new counts to the tick, so every request of the fleet is
    /// observed once by this comparison's detectors. Drift samples stay local; a tick whose
    /// baseline p99 is unknown here judges no latency ratio, pooled or not.
    fn pool(
        &mut self,
        tick: &mut Tick<'_>,
        remote: &crate::fleet::Remote,
        published: &mut BTreeMap<String, crate::fleet::Counts>,
    ) {
        let own = [
            tick.candidate_answered,
            tick.candidate_errors,
            tick.baseline_answered,
            tick.baseline_errors,
            tick.over_sla,
            tick.over_baseline_p99.unwrap_or(0),
            tick.candidate_feedback,
            tick.candidate_incorrect,
            tick.baseline_feedback,
            tick.baseline_incorrect,
        ];
        let mine = published.entry(self.pool_key.clone()).or_default();
        for (m, o) in mine.iter_mut().zip(own) {
            *m = m.saturating_add(o);
        }
        let mut add = [0u64; 10];
        let mut current = std::collections::HashSet::new();
        for (replica, boot, counts) in remote.by_key.get(&self.pool_key).into_iter().flatten() {
            // Per process (replica and boot): two processes under one name, or a restart,
            // each count from where they were first seen.
            let key = format!("{replica}\t{boot}");
            current.insert(key.clone());
            let prev = self.remote_seen.insert(key, (*boot, *counts));
            let Some((_, base)) = prev else {
                // First seen by this comparison: what it counted before is not evidence
                // about this comparison (it may predate a rollback and resume).
                continue;
            };
            if base.iter().zip(counts).any(|(b, c)| b > c) {
                // Its comparison started over: count from here.
                continue;
            }
            for i in 0..10 {
                // Bounded per replica and tick: a foreign value cannot overflow the evidence.
                add[i] = add[i].saturating_add((counts[i] - base[i]).min(1 << 30));
            }
        }
        self.remote_seen.retain(|k, _| current.contains(k));
        // Errors never above answers, whatever a foreign value says.
        let errors = add[1].min(add[0]);
        tick.candidate_answered = tick.candidate_answered.saturating_add(add[0]);
        tick.candidate_errors = tick.candidate_errors.saturating_add(errors);
        tick.baseline_answered = tick.baseline_answered.saturating_add(add[2]);
        tick.baseline_errors = tick.baseline_errors.saturating_add(add[3].min(add[2]));
        tick.over_sla = tick.over_sla.saturating_add(add[4].min(add[0]));
        tick.over_baseline_p99 = tick
            .over_baseline_p99
            .map(|o| o.saturating_add(add[5].min(add[0])));
        tick.candidate_feedback = tick.candidate_feedback.saturating_add(add[6]);
        tick.candidate_incorrect = tick.candidate_incorrect.saturating_add(add[7].min(add[6]));
        tick.baseline_feedback = tick.baseline_feedback.saturating_add(add[8]);
        tick.baseline_incorrect = tick.baseline_incorrect.saturating_add(add[9].min(add[8]));
    }

    /// Pairs this tick's new candidate samples with the baseline's new samples of the same
    /// tick; the cut points come from the baseline's earlier samples.
    #[allow(clippy::type_complexity)]
    fn drift_pairs(
        &mut self,
        cand: &PairStats,
        base: &PairStats,
        (c, b): &mut (Vec<f64>, Vec<f64>),
    ) -> (
        Vec<(f64, f64)>,
        Option<[f64; detector::DRIFT_QUANTILES.len()]>,
    ) {
        let base_seen = self.base_samples;
        self.cand_samples = cand.signals.samples_since(self.cand_samples, c);
        let base_written = base.signals.samples_since(0, b);
        self.base_samples = base_written;
        let new_b = (base_written.saturating_sub(base_seen) as usize).min(b.len());
        let split = b.len() - new_b;
        let (history, fresh) = b.split_at_mut(split);
        let cuts = detector::drift_cuts(history);
        let n = c.len().min(fresh.len());
        let pairs = (0..n)
            .map(|i| (c[i * c.len() / n], fresh[i * fresh.len() / n]))
            .collect();
        (pairs, cuts)
    }
}

/// Evidence about a rollout's current hold, by route.
#[derive(Debug, Clone, PartialEq)]
struct Hold {
    version: VersionName,
    step: usize,
    /// (candidate, baseline) fingerprints: a new bundle mid-hold starts the hold's evidence
    /// over, as it starts the detectors over.
    fingerprints: (String, String),
    candidate: u64,
    baseline: u64,
    /// Candidate requests judged by `latency_p99_ratio` (the baseline's p99 was known).
    latency_judged: u64,
    /// Feedback items and drift pairs of the candidate during the hold.
    feedback: u64,
    drift_pairs: u64,
}

impl Hold {
    fn new(version: VersionName, step: usize, fingerprints: (String, String)) -> Self {
        Hold {
            version,
            step,
            fingerprints,
            candidate: 0,
            baseline: 0,
            latency_judged: 0,
            feedback: 0,
            drift_pairs: 0,
        }
    }
}

/// The evaluator's memory between ticks.
#[derive(Default)]
pub struct Evaluator {
    tracks: HashMap<TrackKey, Track>,
    holds: HashMap<String, Hold>,
    scratch: (Vec<f64>, Vec<f64>),
    gauges: Vec<[String; 3]>,
    /// Candidates at or over a rule's threshold this tick (tripped, or waiting behind another
    /// trip): never stepped or promoted in the same tick.
    tripping: Vec<(String, VersionName)>,
    /// This replica's own cumulative counts per comparison, published to a pooling fleet.
    published: BTreeMap<String, crate::fleet::Counts>,
}

/// The evaluator task. Runs until `stop` turns true.
pub async fn run(controller: Arc<Controller>, mut stop: watch::Receiver<bool>) {
    let mut ev = Evaluator::default();
    let interval = controller.store.config().evaluator.interval;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let now = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            now = tick.tick() => now,
        };
        ev.tick(&controller, now).await;
    }
}

fn p99(h: &Histogram<u64>) -> Option<Duration> {
    (!h.is_empty()).then(|| Duration::from_micros(h.value_at_quantile(0.99)))
}

impl Evaluator {
    /// One evaluator tick: judge every candidate, then step rollouts on the table as it is
    /// after any rollback this tick made.
    pub async fn tick(&mut self, c: &Arc<Controller>, now: Instant) {
        c.store.telemetry.flush(now);
        let table = c.store.load();
        let mut view = View::default();
        self.tripping.clear();
        self.judge(c, &table, now, &mut view).await;
        let table = c.store.load();
        self.rollouts(c, &table, &mut view).await;
        self.publish(c, &view);
        c.set_view(view);
    }

    async fn judge(&mut self, c: &Arc<Controller>, table: &Table, now: Instant, view: &mut View) {
        let ev = &table.config.evaluator;
        let log_threshold = detector::log_threshold(ev.confidence, ev.interval);
        let runtime = c.store.runtime_state();
        let mut live = Vec::new();
        let mut trip = None;
        let pooling = c.fleet().filter(|f| f.config.pool);
        let remote = pooling.map(|f| f.remote());
        // With the store down, counts are still kept (and published once it is back), but
        // only this replica's own are judged.
        let pooled = pooling.is_some_and(|f| f.pooling());
        for route in table.routes.iter() {
            let paused = runtime.paused.contains(&*route.name);
            let base = route.baseline_member();
            let base_version = &table.versions[base.version];
            let base_window = base.stats.window(now);
            // Read once per route, shared by every candidate compared with this baseline.
            let base_cum = base.stats.cumulative();
            let base_now = Counts::of(&base_cum, base.stats.signals.counts());
            // The baseline's p99 over the window; on a quiet route whose window holds too
            // few answers, over everything it has answered, so `latency_p99_ratio` still runs.
            let base_p99 = (base_window.stats().requests >= ev.min_requests)
                .then(|| p99(&base_window.ttfb))
                .flatten()
                .or_else(|| {
                    (base_cum.ttfb.len() >= ev.min_requests)
                        .then(|| p99(&base_cum.ttfb))
                        .flatten()
                });
            for (i, m) in route.members.iter().enumerate() {
                let v = &table.versions[m.version];
                if i == route.baseline || v.quarantined || v.name == base_version.name {
                    continue;
                }
                let t0 = Instant::now();
                let fingerprints = (
                    v.config.fingerprint.clone(),
                    base_version.config.fingerprint.clone(),
                );
                let key = TrackKey {
                    route: route.name.clone(),
                    candidate: v.name.clone(),
                    baseline: base_version.name.clone(),
                    fingerprints: fingerprints.clone(),
                };
                live.push(key.clone());
                let pool_key = crate::fleet::comparison_key(
                    &route.name,
                    v.name.as_str(),
                    base_version.name.as_str(),
                    &fingerprints,
                );
                let remote = remote.as_deref();
                let fresh = || {
                    Track::new(
                        now,
                        &m.stats,
                        &base.stats,
                        base_now,
                        base_now.signals.samples,
                        pool_key.clone(),
                        remote,
                    )
                };
                let track = self.tracks.entry(key).or_insert_with(fresh);
                if !track.reads(&m.stats, &base.stats) {
                    // Rolled back and resumed since the last tick, or the version (or its
                    // baseline) left the config and came back with fresh statistics:
                    // judged on new traffic only.
                    *track = fresh();
                }
                let own_only = crate::fleet::Remote::default();
                let pool = match remote {
                    Some(r) if pooled => Some((r, &mut self.published)),
                    // Keep publishing our own counts; judge them alone.
                    Some(_) => Some((&own_only, &mut self.published)),
                    None => None,
                };
                let seen = track.observe(
                    ev,
                    &m.stats,
                    &base.stats,
                    base_now,
                    base_p99,
                    &mut self.scratch,
                    pool,
                );
                if let Some(h) = self.holds.get_mut(&*route.name) {
                    if h.version == v.name && h.fingerprints == fingerprints {
                        h.candidate += seen.candidate;
                        h.baseline += seen.baseline;
                        h.latency_judged += seen.latency_judged;
                        h.feedback += seen.feedback;
                        h.drift_pairs += seen.drift_pairs;
                    }
                }
                let e = evidence(
                    track,
                    table,
                    v,
                    m,
                    &base_window,
                    base_p99,
                    now,
                    log_threshold,
                );
                let progress = rules::progress(&e, &ev.rules, ev.min_requests);
                if track.trajectory_due(now) {
                    let next = track.trajectory.head();
                    *track.trajectory.advance_with(next, |_| {}) =
                        (now, progress.iter().map(|p| (p.rule, p.ratio)).collect());
                }
                view.candidates.push(CandidateView {
                    route: route.name.to_string(),
                    version: v.name.to_string(),
                    baseline: base_version.name.to_string(),
                    requests: track.cmp.candidate_answered,
                    baseline_requests: track.cmp.baseline_answered,
                    rules: progress.clone(),
                });
                if progress.iter().any(|p| p.ratio >= 1.0) {
                    self.tripping.push((route.name.to_string(), v.name.clone()));
                }
                if paused || trip.is_some() || !c.decides(Some(&pool_key)) {
                    continue;
                }
                if let Verdict::Trip { trigger, reason } =
                    rules::decide(&e, &ev.rules, ev.min_requests, ev.confidence)
                {
                    let mut record = rollback_evidence(track, &e, trigger, &progress, now);
                    // `metrics` are this replica's window; `evidence` what the detectors saw,
                    // the fleet's pooled counts when pooling.
                    record["evidence"]["pooled"] = json!(pooled);
                    // A rule tripped by a drill's injected fault is recorded (and counted in
                    // rollback_triggered_total) as `drill`, with the rule that caught it, so
                    // drills never look like incidents.
                    let drill = v.counters.faults.remaining().is_some();
                    if drill {
                        record["rule"] = json!(trigger.as_str());
                    }
                    let cmd = Command::new(
                        Action::Rollback {
                            route: Some(route.name.to_string()),
                            version: v.name.clone(),
                            trigger: if drill { Trigger::Drill } else { trigger },
                            evidence: record,
                            expect: Some(Expect {
                                baseline: base_version.name.clone(),
                                incarnation: track.incarnation,
                                fingerprints: Some(fingerprints.clone()),
                            }),
                        },
                        None,
                        Some(reason),
                    );
                    trip = Some((cmd, t0));
                }
            }
        }
        self.tracks.retain(|k, _| live.contains(k));
        if let Some(f) = pooling {
            let keys: Vec<&String> = self.tracks.values().map(|t| &t.pool_key).collect();
            self.published.retain(|k, _| keys.contains(&k));
            f.set_local(self.published.clone());
        }
        if let Some((cmd, t0)) = trip {
            match c.apply_at(cmd, t0).await {
                Ok(_) => {}
                Err(Refused::Stale(why)) => tracing::info!(%why, "automatic rollback dropped"),
                Err(e) => tracing::error!(error = %e, "automatic rollback failed"),
            }
        }
    }

    /// Progressive rollouts: one step per clean `hold`, `promote` after the last.
    async fn rollouts(&mut self, c: &Arc<Controller>, table: &Table, view: &mut View) {
        let runtime = c.store.runtime_state();
        let min = table.config.evaluator.min_requests;
        let mut live = Vec::new();
        for route in table.routes.iter() {
            let (Some(rollout), Some(plan)) = (&route.config.rollout, rollout_plan(&route.config))
            else {
                continue;
            };
            let name = route.name.to_string();
            if rollout.steps.is_empty()
                || runtime.rollouts_done.get(&name) == Some(&plan)
                || runtime.paused.contains(&name)
                || route.degraded
            {
                continue;
            }
            let baseline = &table.versions[route.baseline_member().version].name;
            let progress = runtime.rollouts.get(&name).filter(|p| p.plan == plan);
            // A baseline promoted at runtime ends rollouts on the route until the file
            // changes its split or baseline (which drops the promote): a new plan alone, say
            // a tuned `hold`, never rolls the former baseline out again.
            if progress.is_none() && runtime.baselines.contains_key(&name) {
                continue;
            }
            let Some(candidate) = progress
                .map(|p| p.version.clone())
                .or_else(|| first_candidate(route, table, baseline))
            else {
                continue;
            };
            let Some(cand_version) = table.version(&candidate).filter(|v| !v.quarantined) else {
                continue;
            };
            live.push(name.clone());
            if self.tripping.contains(&(name.clone(), candidate.clone())) {
                continue;
            }
            let cmd = match progress {
                None => Action::RolloutStep {
                    route: name.clone(),
                    version: candidate.clone(),
                    step: 0,
                    weight: rollout.steps[0].min(100),
                    expect_step: None,
                },
                Some(p) => {
                    let fingerprints = (
                        cand_version.config.fingerprint.clone(),
                        table.versions[route.baseline_member().version]
                            .config
                            .fingerprint
                            .clone(),
                    );
                    let hold = self.holds.entry(name.clone()).or_insert_with(|| {
                        Hold::new(p.version.clone(), p.step, fingerprints.clone())
                    });
                    if hold.version != p.version
                        || hold.step != p.step
                        || hold.fingerprints != fingerprints
                    {
                        *hold = Hold::new(p.version.clone(), p.step, fingerprints);
                    }
                    let held = unix_ms().saturating_sub(p.since_ms);
                    let hold_ms = rollout.hold.as_millis() as u64;
                    let rules = &table.config.evaluator.rules;
                    // Clean: every traffic-driven rule evaluated on at least min_requests of
                    // the hold's requests on both sides (a trip would have rolled back).
                    let latency_ok =
                        rules.latency_p99_ratio.is_none() || hold.latency_judged >= min;
                    let evidence = hold.candidate >= min && hold.baseline >= min && latency_ok;
                    // Feedback and signal rules depend on sources outside rollgate's control
                    // (clients posting feedback, a score header): shown when they had nothing
                    // to judge, not waited for.
                    let mut not_evaluated = Vec::new();
                    if rules.accuracy_drop.is_some() && hold.feedback < min {
                        not_evaluated.push("accuracy_drop");
                    }
                    if rules.drift.is_some() && hold.drift_pairs < min {
                        not_evaluated.push("drift");
                    }
                    let waiting = held >= hold_ms && !evidence;
                    view.rollouts.insert(
                        name.clone(),
                        RolloutView {
                            version: p.version.to_string(),
                            step: p.step,
                            weight: rollout.steps.get(p.step).copied().unwrap_or(100).min(100),
                            hold_ms,
                            held_ms: held,
                            requests: hold.candidate,
                            baseline_requests: hold.baseline,
                            needed: min,
                            waiting_for: waiting.then_some("traffic"),
                            not_evaluated,
                        },
                    );
                    if held < hold_ms || !evidence {
                        continue;
                    }
                    let next = p.step + 1;
                    if next >= rollout.steps.len() || rollout.steps[next] >= 100 {
                        Action::Promote {
                            route: name.clone(),
                            version: candidate.clone(),
                            expect_step: Some(p.step),
                        }
                    } else {
                        Action::RolloutStep {
                            route: name.clone(),
                            version: candidate.clone(),
                            step: next,
                            weight: rollout.steps[next],
                            expect_step: Some(p.step),
                        }
                    }
                }
            };
            let reason = match &cmd {
                Action::Promote { .. } => format!(
                    "rollout completed {} steps, each held {:?} with at least {min} requests on both sides and no rule tripped",
                    rollout.steps.len(),
                    rollout.hold
                ),
                _ => format!("rollout step after a clean hold of {:?}", rollout.hold),
            };
            if !c.decides(None) {
                // Another replica of the fleet holds the evaluator lease and steps it.
                continue;
            }
            match c.apply(Command::new(cmd, None, Some(reason))).await {
                Ok(rec) => {
                    tracing::info!(route = %name, version = %candidate, kind = %rec["kind"], "rollout advanced")
                }
                Err(Refused::Stale(why)) => {
                    tracing::info!(route = %name, %why, "rollout step dropped")
                }
                Err(e) => tracing::error!(route = %name, error = %e, "rollout step failed"),
            }
        }
        self.holds.retain(|k, _| live.contains(k));
    }

    /// `rollgate_evidence_ratio{route,version,rule}`: set for live candidates, removed for
    /// those that are gone.
    fn publish(&mut self, c: &Controller, view: &View) {
        let family = &c.store.metrics.evidence_ratio;
        let mut now = Vec::new();
        for cand in &view.candidates {
            for p in &cand.rules {
                let key = [
                    cand.route.clone(),
                    cand.version.clone(),
                    p.rule.as_str().to_string(),
                ];
                family
                    .get_or_create(&labels(&[
                        ("route", &key[0]),
                        ("version", &key[1]),
                        ("rule", &key[2]),
                    ]))
                    .set(p.ratio);
                now.push(key);
            }
        }
        for gone in self.gauges.iter().filter(|k| !now.contains(k)) {
            family.remove(&labels(&[
                ("route", &gone[0]),
                ("version", &gone[1]),
                ("rule", &gone[2]),
            ]));
        }
        self.gauges = now;
    }
}

impl Track {
    /// True once per second: when the trajectory takes its next sample.
    fn trajectory_due(&self, now: Instant) -> bool {
        self.trajectory
            .newest()
            .is_none_or(|(t, _)| now.duration_since(*t) >= Duration::from_secs(1))
    }
}

/// The candidate a route's rollout moves: the first version of the file's split, other
/// than the baseline, that the file gives weight and that is not rolled back.
fn first_candidate(route: &Route, table: &Table, baseline: &VersionName) -> Option<VersionName> {
    route
        .config
        .split
        .iter()
        .find(|(n, w)| n != baseline && w.0 > 0 && !table.version(n).is_some_and(|v| v.quarantined))
        .map(|(n, _)| n.clone())
}

#[allow(clippy::too_many_arguments)]
fn evidence(
    track: &mut Track,
    table: &Table,
    v: &crate::routing::table::Version,
    m: &Member,
    base_window: &crate::telemetry::recorder::WindowSnapshot,
    base_p99: Option<Duration>,
    now: Instant,
    log_threshold: f64,
) -> Evidence {
    let ev = &table.config.evaluator;
    let cand_window = m.stats.window(now);
    let side = |w: &crate::telemetry::recorder::WindowSnapshot| {
        let s = w.stats();
        Side {
            requests: s.requests,
            errors: s.errors,
            feedback: 0,
            incorrect: 0,
        }
    };
    let mut candidate = side(&cand_window);
    let mut baseline = side(base_window);
    candidate.feedback = track.cmp.candidate_feedback;
    baseline.feedback = track.cmp.baseline_feedback;
    baseline.incorrect = track.cmp.baseline_incorrect;
    candidate.incorrect = track.cmp.candidate_incorrect;
    let safety_flagged = match &ev.rules.safety_violations {
        Some(rule) => {
            let flagged = m.stats.signals.counts().flagged;
            track.flagged_within(now, rule.per, flagged)
        }
        None => 0,
    };
    let health_failing_streak = v.config.health_check.is_some().then(|| {
        v.upstream
            .endpoints
            .iter()
            .map(|ep| ep.failures.load(std::sync::atomic::Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    });
    Evidence {
        candidate,
        baseline,
        candidate_p99: p99(&cand_window.ttfb).unwrap_or_default(),
        baseline_p99: base_p99.unwrap_or_default(),
        health_failing_streak,
        safety_flagged,
        ..track.cmp.evidence(log_threshold)
    }
}

/// What a rollback record carries from the evaluator: the window's numbers, and how the
/// tripping rule's evidence built up over the last minute.
fn rollback_evidence(
    track: &Track,
    e: &Evidence,
    trigger: Trigger,
    progress: &[RuleProgress],
    now: Instant,
) -> serde_json::Value {
    let side = |s: &Side, p99: Duration| {
        json!({"requests": s.requests, "error_rate": s.error_rate(),
               "p99_ms": p99.as_secs_f64() * 1000.0})
    };
    let tripped = progress.iter().find(|p| p.rule == trigger);
    let trajectory: Vec<_> = track
        .trajectory
        .iter_from(0)
        .filter_map(|(_, (t, rules))| {
            let ratio = rules.iter().find(|(r, _)| *r == trigger)?.1;
            Some(json!({"t_ms": -(now.duration_since(*t).as_millis() as i64), "ratio": ratio}))
        })
        .collect();
    json!({
        "metrics": {
            "candidate": side(&e.candidate, e.candidate_p99),
            "baseline": side(&e.baseline, e.baseline_p99),
        },
        "evidence": {
            "rule": trigger.as_str(),
            "statistic": tripped.map(|p| p.statistic),
            "threshold": tripped.map(|p| p.threshold),
            "requests": e.candidate_answered,
            "baseline_requests": e.baseline_answered,
            "trajectory": trajectory,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn evaluator_config(rules: &str) -> EvaluatorConfig {
        let yaml = format!(
            "versions:\n  a: {{endpoints: [\"http://127.0.0.1:1\"]}}\n  b: {{endpoints: [\"http://127.0.0.1:2\"]}}\n\
             routes:\n  - {{name: r, match: {{path_prefix: /}}, baseline: a, split: {{a: 95, b: 5}}}}\n\
             evaluator: {{interval: 100ms, min_requests: 50, confidence: 0.99, rules: {rules}}}\n"
        );
        Config::from_str(&yaml, std::path::Path::new("t.yaml"))
            .unwrap()
            .evaluator
    }

    /// Poisson by the normal approximation (means here are 5 and 95 per tick).
    fn poisson(rng: &mut fastrand::Rng, mean: f64) -> u64 {
        let z =
            (-2.0 * rng.f64().max(1e-300).ln()).sqrt() * (std::f64::consts::TAU * rng.f64()).cos();
        (mean + z * mean.sqrt()).round().max(0.0) as u64
    }

    fn binomial(rng: &mut fastrand::Rng, n: u64, p: f64) -> u64 {
        (0..n).filter(|_| rng.f64() < p).count() as u64
    }

    /// The seed scenario over a simulated day: 50 canary req/s at the baseline's 2 %
    /// errors for 24 h (checked every 100 ms: no rollback), then 8 %: caught, and within
    /// the delay the same detector needs from t = 0.
    #[test]
    fn a_regression_after_a_day_of_healthy_traffic_is_caught_as_fast_as_at_the_start() {
        let ev = evaluator_config(
            "{error_rate_ratio: 2.0, min_error_rate: 0.005, error_rate_max: null, latency_p99_max: null, latency_p99_ratio: null, accuracy_drop: null}",
        );
        let thr = detector::log_threshold(ev.confidence, ev.interval);
        let run = |healthy_ticks: u64, seed: u64| -> Option<u64> {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut cmp = Comparison::default();
            let mut tick = |cand_err: f64| {
                let (c, b) = (poisson(&mut rng, 5.0), poisson(&mut rng, 95.0));
                let t = Tick {
                    candidate_answered: c,
                    candidate_errors: binomial(&mut rng, c, cand_err),
                    baseline_answered: b,
                    baseline_errors: binomial(&mut rng, b, 0.02),
                    ..Tick::default()
                };
                cmp.observe(&ev, &t);
                rules::decide(
                    &cmp.evidence(thr),
                    &ev.rules,
                    ev.min_requests,
                    ev.confidence,
                )
            };
            for _ in 0..healthy_ticks {
                assert_eq!(tick(0.02), Verdict::Healthy, "false rollback (seed {seed})");
            }
            (1..=3000).find(|_| tick(0.08) != Verdict::Healthy)
        };
        let day = 24 * 36_000;
        let late = run(day, 1).expect("not caught within 5 min after a day");
        let early: Vec<u64> = (10..16).map(|s| run(0, s).expect("not caught")).collect();
        let slowest_early = *early.iter().max().unwrap();
        // One late run against the spread of early ones: within the early runs' range plus
        // the one second a start may lag the change.
        assert!(
            late <= slowest_early + 10,
            "after a day: {late} ticks; from t=0: {early:?}"
        );
    }
}
