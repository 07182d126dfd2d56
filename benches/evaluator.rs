//! Evaluator benchmarks (not criterion: they print markdown tables).
//!
//! 1. Simulation with fixed seeds through the *real* decision code: every simulated tick
//!    (`evaluator.interval`, 100 ms) becomes a [`Tick`] of counts, fed to
//!    [`Comparison::observe`], and [`decide`] judges `Comparison::evidence` against
//!    [`detector::log_threshold`]. The `EvaluatorConfig` comes from a YAML file parsed and
//!    validated by [`Config::from_str`]. Traffic: a 5 % canary (the baseline answers 19x
//!    the candidate's requests), requests ~ Poisson per tick, errors ~ Binomial(requests,
//!    p), time to first byte lognormal (mu 0, sigma 0.5, in units of 100 ms, so the median
//!    is 100 ms and the p99 320 ms) times a multiplier; requests over a limit are drawn as
//!    Binomial(requests, P(TTFB > limit)) from the lognormal's tail.
//!    - A. False rollbacks per healthy candidate per 24 h, per rule (each rule runs in a
//!      comparison of its own, restarted after a trip, on one shared traffic stream).
//!    - B. Detection delay of the seed scenario (8 % vs 2 % errors) from t = 0, after 1 h
//!      and after 24 h of healthy traffic (the 1 h and 24 h cases fork the 50 req/s runs
//!      of A: the detectors that lived through that healthy traffic).
//!    - C. Other regressions (errors 2x, p99 +50 %, drift, accuracy) from t = 0 and after
//!      1 h.
//!    - D. `min_error_rate` after a change of regime: does `error_rate_ratio` trip while
//!      the candidate's error rate is below the floor?
//!    - F. The seed scenario with the canary's traffic spread over 10 replicas: one replica
//!      seeing it all, a pooling fleet (the deciding replica adds the others' counts one
//!      or three intervals late) and a fleet that does not pool (first of 10 to trip);
//!      and the pooling fleet's false rollbacks on healthy traffic over A's horizon.
//! 2. Trip-to-swap of the real rollback path (`Controller::apply_at` with an
//!    `Action::Rollback` on a compiled table), read from the audit record it writes.
//!
//! `cargo bench --bench evaluator` runs the full sizes (200 runs per row; 7.5 minutes on 2
//! idle cores for A to D and swap, and F's 200 fleet-days of false-alarm simulation 3 to 6
//! more, plus the build); without a `--bench` argument (`cargo test --benches`) it
//! runs a smoke version with tiny sizes. `ROLLGATE_BENCH_RUNS=N` changes the runs per row
//! of the full run; `ROLLGATE_BENCH_ONLY=AB,C,D,F,swap` (any subset) runs only those
//! sections. Runs are independent and spread over the available cores.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as WallClock};

use rollgate::config::{Config, EvaluatorConfig, Rules};
use rollgate::decision::{Action, Command};
use rollgate::evaluator::detector::{self, DRIFT_QUANTILES};
use rollgate::evaluator::rules::{decide, Statistics, Trigger, Verdict};
use rollgate::evaluator::{Comparison, Tick};
use statrs::function::erf::erfc;

/// Seconds per evaluator tick (`interval: 100ms` in the YAML below).
const TICK_S: f64 = 0.1;
/// Lognormal sigma of time to first byte.
const SIGMA: f64 = 0.5;
/// Milliseconds per latency unit (the lognormal's median).
const UNIT_MS: f64 = 100.0;
/// The baseline's p99 in latency units, as the evaluator's plug-in estimate sees it.
fn base_p99() -> f64 {
    (2.326 * SIGMA).exp()
}
/// Baseline requests per candidate request (a 5 % canary).
const BASE_FACTOR: f64 = 19.0;
/// Baseline samples kept for the drift test's cut points.
const DRIFT_HISTORY: usize = 1000;
/// Ticks between recomputations of the drift cut points (see [`Sim::tick`]).
const DRIFT_CUT_REFRESH: u64 = 10;

// ---------------------------------------------------------------------------------------
// Sizes

#[derive(Debug, Clone, Copy)]
struct Sizes {
    full: bool,
    runs: usize,
    /// Ticks of a "day" (A, and the late fork of B) and of an "hour".
    day: u64,
    hour: u64,
    /// Longest simulated regression before a run counts as undetected.
    cap: u64,
    cap_accuracy: u64,
    swaps: usize,
}

impl Sizes {
    fn new(full: bool) -> Self {
        if full {
            let runs = std::env::var("ROLLGATE_BENCH_RUNS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(200);
            Sizes {
                full,
                runs,
                day: 864_000,
                hour: 36_000,
                cap: 36_000,
                cap_accuracy: 6 * 36_000,
                swaps: 200,
            }
        } else {
            Sizes {
                full,
                runs: 2,
                day: 1_200,
                hour: 300,
                cap: 1_200,
                cap_accuracy: 1_200,
                swaps: 10,
            }
        }
    }

    fn label(&self, ticks: u64) -> String {
        let s = ticks as f64 * TICK_S;
        if s >= 3600.0 && (s / 3600.0).fract() == 0.0 {
            format!("{} h", s / 3600.0)
        } else if s >= 60.0 {
            format!("{:.0} min", s / 60.0)
        } else {
            format!("{s:.0} s")
        }
    }
}

// ---------------------------------------------------------------------------------------
// The real config: one small YAML file per rule set, through the real validation.

/// An `EvaluatorConfig` with exactly the rules given (`key: value` YAML), every other
/// rule null.
fn evaluator(rules: &[(&str, &str)]) -> EvaluatorConfig {
    let mut lines = String::new();
    for key in [
        "error_rate_ratio",
        "min_error_rate",
        "error_rate_max",
        "latency_p99_max",
        "latency_p99_ratio",
        "health_failures",
        "accuracy_drop",
        "drift",
        "safety_violations",
    ] {
        let value = rules
            .iter()
            .find(|(k, _)| *k == key)
            .map_or("null", |(_, v)| *v);
        lines.push_str(&format!("    {key}: {value}\n"));
    }
    let yaml = format!(
        "listen: 127.0.0.1:0
versions:
  stable: {{endpoints: [\"http://127.0.0.1:9\"]}}
  canary: {{endpoints: [\"http://127.0.0.1:9\"]}}
routes:
  - name: default
    owner: bench
    match: {{path_prefix: /}}
    baseline: stable
    split: {{stable: 95, canary: 5}}
evaluator:
  interval: 100ms
  window: 30s
  min_requests: 50
  confidence: 0.99
  rules:
{lines}"
    );
    let config = Config::from_str(&yaml, Path::new("bench.yaml"))
        .unwrap_or_else(|e| panic!("bench config rejected: {e}\n{yaml}"));
    assert!(
        (config.evaluator.interval.as_secs_f64() - TICK_S).abs() < 1e-12,
        "the simulation assumes 100 ms ticks"
    );
    config.evaluator
}

/// One rule (or rule set) judged by the real detectors and the real `decide`.
#[derive(Clone)]
struct Judge {
    ev: Arc<EvaluatorConfig>,
    log_threshold: f64,
    cmp: Comparison,
    /// Highest statistic of its rule seen so far (across restarts), `ln M`.
    peak: f64,
}

/// The statistic `decide` compares with `ln A` for the rule(s) of `r` (for the ratio rule
/// with a floor, the weaker of its two detectors), the highest when several are enabled.
fn rule_statistic(s: &Statistics, r: &Rules) -> f64 {
    let mut m = f64::NEG_INFINITY;
    if r.error_rate_ratio.is_some() {
        m = m.max(match r.min_error_rate {
            Some(_) => s.error_rate_ratio.min(s.min_error_rate),
            None => s.error_rate_ratio,
        });
    }
    for (on, x) in [
        (r.error_rate_max.is_some(), s.error_rate_max),
        (r.latency_p99_max.is_some(), s.latency_p99_max),
        (r.latency_p99_ratio.is_some(), s.latency_p99_ratio),
        (r.accuracy_drop.is_some(), s.accuracy_drop),
        (r.drift.is_some(), s.drift),
    ] {
        if on {
            m = m.max(x);
        }
    }
    m
}

impl Judge {
    fn new(ev: &Arc<EvaluatorConfig>) -> Self {
        Judge {
            ev: ev.clone(),
            log_threshold: detector::log_threshold(ev.confidence, ev.interval),
            cmp: Comparison::default(),
            peak: f64::NEG_INFINITY,
        }
    }

    /// The rule's statistic now.
    fn statistic(&self) -> f64 {
        rule_statistic(&self.cmp.statistics(), &self.ev.rules)
    }

    /// Feeds one tick and asks `decide`; a trip is a rollback.
    fn step(&mut self, tick: &Tick<'_>) -> Option<Trigger> {
        self.cmp.observe(&self.ev, tick);
        let e = self.cmp.evidence(self.log_threshold);
        self.peak = self.peak.max(rule_statistic(&e.stats, &self.ev.rules));
        match decide(&e, &self.ev.rules, self.ev.min_requests, self.ev.confidence) {
            Verdict::Trip { trigger, .. } => Some(trigger),
            Verdict::Healthy => None,
        }
    }

    /// After a rollback the candidate is judged afresh (a new incarnation).
    fn restart(&mut self) {
        self.cmp = Comparison::default();
    }
}

// ---------------------------------------------------------------------------------------
// Random draws

#[derive(Clone)]
struct Draws {
    rng: fastrand::Rng,
    spare: Option<f64>,
}

impl Draws {
    fn new(seed: u64) -> Self {
        Draws {
            rng: fastrand::Rng::with_seed(seed),
            spare: None,
        }
    }

    /// Standard normal (Box-Muller, both halves used).
    fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let u1 = loop {
            let u = self.rng.f64();
            if u > 0.0 {
                break u;
            }
        };
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * self.rng.f64()).sin_cos();
        self.spare = Some(r * s);
        r * c
    }

    /// Poisson: Knuth's product of uniforms below 30, the normal approximation above.
    fn poisson(&mut self, mean: f64, exp_neg_mean: f64) -> u64 {
        if mean <= 0.0 {
            0
        } else if mean < 30.0 {
            let mut k = 0;
            let mut p = self.rng.f64();
            while p > exp_neg_mean {
                k += 1;
                p *= self.rng.f64();
            }
            k
        } else {
            (mean + mean.sqrt() * self.normal()).round().max(0.0) as u64
        }
    }

    /// Binomial: inversion of the CDF when `n p < 30`, the normal approximation above.
    fn binomial(&mut self, n: u64, p: f64) -> u64 {
        if n == 0 || p <= 0.0 {
            return 0;
        }
        if p >= 1.0 {
            return n;
        }
        if p > 0.5 {
            return n - self.binomial(n, 1.0 - p);
        }
        let nf = n as f64;
        let mean = nf * p;
        if mean < 30.0 {
            let q = 1.0 - p;
            let odds = p / q;
            let mut pmf = (nf * q.ln()).exp();
            let mut cdf = pmf;
            let u = self.rng.f64();
            let mut k = 0u64;
            while u > cdf && k < n {
                pmf *= odds * (n - k) as f64 / (k + 1) as f64;
                k += 1;
                cdf += pmf;
            }
            k
        } else {
            let sd = (mean * (1.0 - p)).sqrt();
            (mean + sd * self.normal()).round().clamp(0.0, nf) as u64
        }
    }
}

// ---------------------------------------------------------------------------------------
// Traffic

/// What the candidate and baseline do during one phase of a run.
#[derive(Debug, Clone, Copy)]
struct Traffic {
    canary_rps: f64,
    base_err: f64,
    cand_err: f64,
    /// Multiplier of the candidate's time to first byte.
    cand_latency: f64,
    /// Shift of the candidate's drift signal, in baseline standard deviations.
    cand_shift: f64,
    base_accuracy: f64,
    cand_accuracy: f64,
}

impl Traffic {
    fn healthy(canary_rps: f64) -> Self {
        Traffic {
            canary_rps,
            base_err: 0.02,
            cand_err: 0.02,
            cand_latency: 1.0,
            cand_shift: 0.0,
            base_accuracy: 0.92,
            cand_accuracy: 0.92,
        }
    }
}

/// Share of requests that get feedback.
const FEEDBACK_SHARE: f64 = 0.05;

/// `P(m · LN(0, SIGMA) > limit)`.
fn p_over(limit: f64, m: f64) -> f64 {
    let z = (limit / m).ln() / SIGMA;
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// A [`Traffic`] prepared for the judges that will see it: which signals to draw, and
/// the probabilities of the latency limits their rules set.
struct Phase {
    cand_mean: f64,
    cand_exp: f64,
    base_mean: f64,
    base_exp: f64,
    t: Traffic,
    /// Latency limits in units: (`latency_p99_max`, `latency_p99_ratio × baseline p99`).
    sla: Option<f64>,
    ratio: Option<f64>,
    /// P(over the higher limit), P(over the lower | not over the higher).
    p_hi: f64,
    p_mid: f64,
    feedback: bool,
    drift: bool,
}

impl Phase {
    fn new(t: Traffic, judges: &[&Judge]) -> Self {
        let mut sla = None;
        let mut ratio = None;
        let mut feedback = false;
        let mut drift = false;
        for j in judges {
            let r = &j.ev.rules;
            if let Some(d) = r.latency_p99_max {
                sla = Some(d.as_secs_f64() * 1000.0 / UNIT_MS);
            }
            if let Some(k) = r.latency_p99_ratio {
                ratio = Some(k * base_p99());
            }
            feedback |= r.accuracy_drop.is_some();
            drift |= r.drift.is_some();
        }
        let (p_hi, p_mid) = match (sla, ratio) {
            (Some(a), Some(b)) => {
                let (hi, lo) = (a.max(b), a.min(b));
                let p_hi = p_over(hi, t.cand_latency);
                let p_lo = p_over(lo, t.cand_latency);
                (p_hi, ((p_lo - p_hi) / (1.0 - p_hi)).clamp(0.0, 1.0))
            }
            (Some(x), None) | (None, Some(x)) => (p_over(x, t.cand_latency), 0.0),
            (None, None) => (0.0, 0.0),
        };
        let cand_mean = t.canary_rps * TICK_S;
        let base_mean = cand_mean * BASE_FACTOR;
        Phase {
            cand_mean,
            cand_exp: (-cand_mean).exp(),
            base_mean,
            base_exp: (-base_mean).exp(),
            t,
            sla,
            ratio,
            p_hi,
            p_mid,
            feedback,
            drift,
        }
    }
}

/// One tick's counts (the drift pairs stay in the [`Sim`]).
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    cand: u64,
    cand_errors: u64,
    base: u64,
    base_errors: u64,
    over_sla: u64,
    over_ratio: Option<u64>,
    cand_feedback: u64,
    cand_incorrect: u64,
    base_feedback: u64,
    base_incorrect: u64,
}

/// The simulated world of one run: random draws, and what the evaluator would have seen
/// of the baseline (its answered requests, its recent drift samples).
#[derive(Clone)]
struct Sim {
    d: Draws,
    ticks: u64,
    base_total: u64,
    min_requests: u64,
    history: Vec<f64>,
    history_next: usize,
    scratch: Vec<f64>,
    cuts: Option<[f64; DRIFT_QUANTILES.len()]>,
    cand_samples: Vec<f64>,
    pairs: Vec<(f64, f64)>,
}

impl Sim {
    fn new(seed: u64, min_requests: u64) -> Self {
        Sim {
            d: Draws::new(seed),
            ticks: 0,
            base_total: 0,
            min_requests,
            history: Vec::with_capacity(DRIFT_HISTORY),
            history_next: 0,
            scratch: Vec::with_capacity(DRIFT_HISTORY),
            cuts: None,
            cand_samples: Vec::new(),
            pairs: Vec::new(),
        }
    }

    /// The same world with new randomness from here on (forks of one run).
    fn fork(&self, seed: u64) -> Self {
        let mut s = self.clone();
        s.d = Draws::new(seed);
        s
    }

    /// Draws one tick of `ph`.
    fn tick(&mut self, ph: &Phase) -> Counts {
        let d = &mut self.d;
        let t = &ph.t;
        let mut c = Counts {
            cand: d.poisson(ph.cand_mean, ph.cand_exp),
            base: d.poisson(ph.base_mean, ph.base_exp),
            ..Counts::default()
        };
        c.cand_errors = d.binomial(c.cand, t.cand_err);
        c.base_errors = d.binomial(c.base, t.base_err);
        if ph.sla.is_some() || ph.ratio.is_some() {
            let hi = d.binomial(c.cand, ph.p_hi);
            let lo = hi + d.binomial(c.cand - hi, ph.p_mid);
            let (sla, ratio) = match (ph.sla, ph.ratio) {
                (Some(a), Some(b)) if a >= b => (hi, lo),
                (Some(_), Some(_)) => (lo, hi),
                _ => (hi, hi),
            };
            c.over_sla = sla;
            // The evaluator knows the baseline's p99 once its window holds min_requests.
            c.over_ratio =
                (ph.ratio.is_some() && self.base_total >= self.min_requests).then_some(ratio);
        }
        if ph.feedback {
            c.cand_feedback = d.binomial(c.cand, FEEDBACK_SHARE);
            c.cand_incorrect = d.binomial(c.cand_feedback, 1.0 - t.cand_accuracy);
            c.base_feedback = d.binomial(c.base, FEEDBACK_SHARE);
            c.base_incorrect = d.binomial(c.base_feedback, 1.0 - t.base_accuracy);
        }
        self.pairs.clear();
        if ph.drift {
            // Cut points from the baseline's earlier samples only (fixed before this
            // tick's data). Recomputed once a second rather than every tick to keep the
            // sorting affordable: with ~95 baseline samples a tick at 50 req/s the
            // 1000-sample history turns over about once a second anyway.
            if self.ticks.is_multiple_of(DRIFT_CUT_REFRESH) || self.cuts.is_none() {
                self.scratch.clear();
                self.scratch.extend_from_slice(&self.history);
                self.cuts = detector::drift_cuts(&mut self.scratch);
            }
            self.cand_samples.clear();
            for _ in 0..c.cand {
                let x = d.normal() + t.cand_shift;
                self.cand_samples.push(x);
            }
            for i in 0..c.base as usize {
                let b = d.normal();
                if let Some(&x) = self.cand_samples.get(i) {
                    self.pairs.push((x, b));
                }
                if self.history.len() < DRIFT_HISTORY {
                    self.history.push(b);
                } else {
                    self.history[self.history_next] = b;
                }
                self.history_next = (self.history_next + 1) % DRIFT_HISTORY;
            }
        }
        self.base_total += c.base;
        self.ticks += 1;
        c
    }

    fn as_tick(&self, c: &Counts) -> Tick<'_> {
        Tick {
            candidate_answered: c.cand,
            candidate_errors: c.cand_errors,
            baseline_answered: c.base,
            baseline_errors: c.base_errors,
            over_sla: c.over_sla,
            over_baseline_p99: c.over_ratio,
            candidate_feedback: c.cand_feedback,
            candidate_incorrect: c.cand_incorrect,
            baseline_feedback: c.base_feedback,
            baseline_incorrect: c.base_incorrect,
            drift_pairs: &self.pairs,
            drift_cuts: if self.pairs.is_empty() {
                None
            } else {
                self.cuts
            },
        }
    }
}

/// Healthy traffic for `ticks` ticks: every judge's false rollbacks (each restarted after
/// its trip), with `at(tick, sim, judges)` called after the ticks listed in `marks`.
fn healthy(
    sim: &mut Sim,
    judges: &mut [Judge],
    t: Traffic,
    ticks: u64,
    marks: &[u64],
    mut at: impl FnMut(u64, &Sim, &[Judge]),
) -> Vec<u64> {
    let ph = Phase::new(t, &judges.iter().collect::<Vec<_>>());
    let mut trips = vec![0u64; judges.len()];
    for i in 1..=ticks {
        let c = sim.tick(&ph);
        let tick = sim.as_tick(&c);
        for (j, n) in judges.iter_mut().zip(trips.iter_mut()) {
            if j.step(&tick).is_some() {
                *n += 1;
                j.restart();
            }
        }
        if marks.contains(&i) {
            at(i, sim, judges);
        }
    }
    trips
}

/// A regression from now on: the tick (1 = the first after the change) at which each
/// judge first trips, None when not within `cap`.
fn regress(sim: &mut Sim, judges: &mut [Judge], t: Traffic, cap: u64) -> Vec<Option<u64>> {
    let ph = Phase::new(t, &judges.iter().collect::<Vec<_>>());
    let mut first = vec![None; judges.len()];
    for i in 1..=cap {
        let c = sim.tick(&ph);
        let tick = sim.as_tick(&c);
        for (j, f) in judges.iter_mut().zip(first.iter_mut()) {
            if f.is_none() && j.step(&tick).is_some() {
                *f = Some(i);
            }
        }
        if first.iter().all(Option::is_some) {
            break;
        }
    }
    first
}

// ---------------------------------------------------------------------------------------
// Statistics of the results

/// Runs `f(0..n)` over the available cores.
fn par_map<R: Send>(n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(2, |t| t.get())
        .clamp(1, n.max(1));
    let next = AtomicUsize::new(0);
    let mut done: Vec<(usize, R)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break out;
                        }
                        out.push((i, f(i)));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("worker panicked"))
            .collect()
    });
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// One-sided 95 % upper confidence bound of a Poisson mean after observing `k` events
/// (exact: `P(Poisson(λ) ≤ k) = 0.05`; 2.996 for k = 0, the rule of three).
fn poisson_upper95(k: u64) -> f64 {
    let cdf = |lambda: f64| {
        let mut term = (-lambda).exp();
        let mut sum = term;
        for i in 1..=k {
            term *= lambda / i as f64;
            sum += term;
        }
        sum
    };
    let (mut lo, mut hi) = (0.0, 10.0 + 10.0 * k as f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if cdf(mid) > 0.05 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Delays (in ticks, None: not detected within the cap) summarized for a table row.
struct Delays {
    runs: usize,
    detected: usize,
    within_5min: usize,
    median: Option<f64>,
    p90: Option<f64>,
}

impl Delays {
    fn of(ticks: &[Option<u64>]) -> Self {
        let mut v: Vec<f64> = ticks
            .iter()
            .map(|t| t.map_or(f64::INFINITY, |t| t as f64 * TICK_S))
            .collect();
        v.sort_by(f64::total_cmp);
        let q = |q: f64| {
            if v.is_empty() {
                return None;
            }
            let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            v[i].is_finite().then_some(v[i])
        };
        Delays {
            runs: v.len(),
            detected: v.iter().filter(|x| x.is_finite()).count(),
            within_5min: v.iter().filter(|x| **x <= 300.0).count(),
            median: q(0.5),
            p90: q(0.9),
        }
    }

    fn cells(&self, cap: &str) -> String {
        let s = |x: Option<f64>| x.map_or(format!("> {cap}"), |x| format!("{x:.1}"));
        let pct = |k: usize| 100.0 * k as f64 / self.runs.max(1) as f64;
        format!(
            "{}/{} ({:.0} %) | {:.0} % | {} | {}",
            self.detected,
            self.runs,
            pct(self.detected),
            pct(self.within_5min),
            s(self.median),
            s(self.p90)
        )
    }
}

fn kl(a: f64, b: f64) -> f64 {
    let t = |x: f64, y: f64| if x > 0.0 { x * (x / y).ln() } else { 0.0 };
    t(a, b) + t(1.0 - a, 1.0 - b)
}

/// Per-second KL of the error-ratio regression against the closest null, conditioned on
/// errors: each error is the candidate's with probability θ.
fn kl_ratio_conditioned(rps: f64, cand_err: f64, base_err: f64, k: f64) -> f64 {
    let errors = rps * (cand_err + BASE_FACTOR * base_err);
    let theta1 = cand_err / (cand_err + BASE_FACTOR * base_err);
    let theta0 = k / (k + BASE_FACTOR);
    errors * kl(theta1, theta0)
}

/// Per-second KL of the same regression using every request of both sides: the closest
/// null `(p_c', p_b')` with `p_c' = k p_b'`, found by golden-section search.
fn kl_ratio_all_requests(rps: f64, cand_err: f64, base_err: f64, k: f64) -> f64 {
    let f = |q: f64| rps * (kl(cand_err, k * q) + BASE_FACTOR * kl(base_err, q));
    let (mut a, mut b) = (1e-9, (1.0 / k).min(1.0) - 1e-9);
    let g = (5f64.sqrt() - 1.0) / 2.0;
    for _ in 0..200 {
        let (x1, x2) = (b - g * (b - a), a + g * (b - a));
        if f(x1) < f(x2) {
            b = x2;
        } else {
            a = x1;
        }
    }
    f(0.5 * (a + b))
}

/// `min_G KL(P‖G) + KL(Q‖G)` for P = N(δ, 1), Q = N(0, 1) (twice the Jensen-Shannon
/// divergence): the information of one (candidate, baseline) pair against "same
/// distribution".
fn kl_drift_pair(delta: f64) -> f64 {
    let phi = |x: f64| (-0.5 * x * x).exp() / (std::f64::consts::TAU).sqrt();
    let (lo, hi, n) = (-12.0, 12.0 + delta, 24_000);
    let h = (hi - lo) / n as f64;
    (0..=n)
        .map(|i| {
            let x = lo + i as f64 * h;
            let (p, q) = (phi(x - delta), phi(x));
            let m = 0.5 * (p + q);
            let w = if i == 0 || i == n { 0.5 } else { 1.0 };
            let t = |a: f64| if a > 0.0 { a * (a / m).ln() } else { 0.0 };
            w * h * (t(p) + t(q))
        })
        .sum()
}

fn seed(row: u64, run: usize) -> u64 {
    0x5eed_0000_0000 + (row << 20) + run as u64
}

// ---------------------------------------------------------------------------------------
// A and B

struct DayRun {
    trips: Vec<u64>,
    /// Each judge's highest statistic over the day.
    peaks: Vec<f64>,
    /// Per fork: the ratio rule's statistic at the change, and the first trip tick of each
    /// forked judge.
    forks: Vec<Fork>,
}

/// The ratio rule's statistic at the change, and the first trip tick of each judge.
type Fork = (f64, Vec<Option<u64>>);

/// Median of finite-or-not values (nearest rank).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(f64::NAN)
}

fn false_alarms_and_seed_scenario(z: &Sizes) {
    let ratio = Arc::new(evaluator(&[
        ("error_rate_ratio", "2.0"),
        ("min_error_rate", "0.005"),
    ]));
    let max = Arc::new(evaluator(&[("error_rate_max", "0.05")]));
    let lat_ratio = Arc::new(evaluator(&[("latency_p99_ratio", "1.5")]));
    let lat_max = Arc::new(evaluator(&[("latency_p99_max", "500ms")]));
    let judges = || {
        vec![
            Judge::new(&ratio),
            Judge::new(&max),
            Judge::new(&lat_ratio),
            Judge::new(&lat_max),
        ]
    };
    let names = [
        "error_rate_ratio 2.0 (min_error_rate 0.005)",
        "error_rate_max 0.05",
        "latency_p99_ratio 1.5",
        "latency_p99_max 500ms",
    ];
    let log_a = detector::log_threshold(ratio.confidence, ratio.interval);
    let min_requests = ratio.min_requests;
    let seed_regression = Traffic {
        cand_err: 0.08,
        ..Traffic::healthy(50.0)
    };
    let marks = [z.hour, z.day];

    // (label, canary rps, candidate traffic, fork the seed scenario?)
    let boundary = Traffic {
        cand_err: 0.04,
        cand_latency: 1.5,
        ..Traffic::healthy(50.0)
    };
    let streams = [
        (
            "healthy: 2 % vs 2 %, equal latency",
            Traffic::healthy(50.0),
            true,
        ),
        (
            "healthy: 2 % vs 2 %, equal latency",
            Traffic::healthy(500.0),
            false,
        ),
        (
            "null's boundary: 4 % vs 2 % errors, latency x1.5",
            boundary,
            false,
        ),
    ];
    let began = WallClock::now();
    let mut seed_forks: Vec<Vec<Fork>> = Vec::new();
    println!(
        "\n## A. False rollbacks of healthy candidates ({} runs of {} per row, confidence 0.99, min_requests 50, ln A = {log_a:.2})\n",
        z.runs,
        z.label(z.day)
    );
    println!("Each rule runs in a comparison of its own on the row's traffic, restarted after a trip. The guarantee: at most 1 - confidence = 0.01 false rollbacks per candidate-day, per rule. Latency: median 100 ms, p99 320 ms; `latency_p99_max` 500 ms is 1.56x the healthy p99.\n");
    println!("| traffic | canary req/s | rule | runs | candidate-days | false rollbacks | per candidate-day | 95 % upper bound | highest ln M of a run: median, max |");
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|");
    for (row, (label, traffic, fork)) in streams.into_iter().enumerate() {
        let results: Vec<DayRun> = par_map(z.runs, |run| {
            let s = seed(row as u64, run);
            let mut sim = Sim::new(s, min_requests);
            let mut js = judges();
            let mut forks = Vec::new();
            let trips = healthy(&mut sim, &mut js, traffic, z.day, &marks, |i, sim, js| {
                if !fork {
                    return;
                }
                // The seed scenario after this much healthy traffic: the detectors that
                // lived through it (error_rate_ratio, error_rate_max) see 8 % from now on.
                let mut sim = sim.fork(s ^ (i << 40) ^ 0xf0f0);
                let mut pair = vec![js[0].clone(), js[1].clone()];
                let at_change = js[0].statistic();
                forks.push((
                    at_change,
                    regress(&mut sim, &mut pair, seed_regression, z.cap),
                ));
            });
            let peaks = js.iter().map(|j| j.peak).collect();
            DayRun {
                trips,
                peaks,
                forks,
            }
        });
        let days = z.runs as f64 * z.day as f64 * TICK_S / 86_400.0;
        for (j, name) in names.iter().enumerate() {
            let k: u64 = results.iter().map(|r| r.trips[j]).sum();
            let peaks: Vec<f64> = results.iter().map(|r| r.peaks[j]).collect();
            let top = peaks.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            println!(
                "| {label} | {:.0} | {name} | {} | {days:.1} | {k} | {:.4} | {:.4} | {:.1}, {top:.1} |",
                traffic.canary_rps,
                z.runs,
                k as f64 / days,
                poisson_upper95(k) / days,
                median(&peaks),
            );
        }
        if fork {
            seed_forks = results.into_iter().map(|r| r.forks).collect();
        }
    }
    println!("\n(A took {:.0} s.) 95 % upper bound: exact one-sided Poisson bound on the rate (rule of three when 0). In the boundary row, `error_rate_ratio` and `latency_p99_ratio` sit exactly on their nulls (candidate 2.0x the baseline's error rate; 1.0 % of requests over 1.5x the baseline p99); `error_rate_max` sees 4 % against 5 %, `latency_p99_max` 0.8 % over 500 ms against 1 %.", began.elapsed().as_secs_f64());

    // B: the seed scenario from t = 0 (fresh detectors) and from the forks above.
    let began = WallClock::now();
    let fresh: Vec<Fork> = par_map(z.runs, |run| {
        let mut sim = Sim::new(seed(10, run), min_requests);
        let mut pair = vec![Judge::new(&ratio), Judge::new(&max)];
        (
            f64::NEG_INFINITY,
            regress(&mut sim, &mut pair, seed_regression, z.cap),
        )
    });
    println!(
        "\n## B. Detection delay of the seed scenario: 8 % vs 2 % errors, 50 canary req/s (baseline 19x), {} runs per row\n",
        z.runs
    );
    println!("Delay: from the change to the tick whose `decide` trips. Undetected within {} counts as longer than the cap. Goal of the issue: median <= 5 s, p90 <= 10 s.\n", z.label(z.cap));
    println!("| regression begins | rules | detected within {} | within 5 min | median delay (s) | p90 delay (s) | ratio rule's ln M at the change: median, max |", z.label(z.cap));
    println!("|---|---|---:|---:|---:|---:|---:|");
    let cap = z.label(z.cap);
    let cases: Vec<(String, Vec<Fork>)> = vec![
        ("at t = 0".into(), fresh),
        (
            format!("after {} healthy", z.label(z.hour)),
            seed_forks
                .iter()
                .filter_map(|f| f.first().cloned())
                .collect(),
        ),
        (
            format!("after {} healthy", z.label(z.day)),
            seed_forks
                .iter()
                .filter_map(|f| f.get(1).cloned())
                .collect(),
        ),
    ];
    for (when, runs) in &cases {
        let at_change: Vec<f64> = runs.iter().map(|r| r.0).collect();
        let top = at_change.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let at_change = if top == f64::NEG_INFINITY {
            "- (no evidence yet)".to_string()
        } else {
            format!("{:.1}, {top:.1}", median(&at_change))
        };
        let without: Vec<_> = runs.iter().map(|r| r.1[0]).collect();
        let with: Vec<_> = runs
            .iter()
            .map(|r| match (r.1[0], r.1[1]) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            })
            .collect();
        println!(
            "| {when} | error_rate_ratio 2.0, min_error_rate 0.005, error_rate_max null | {} | {at_change} |",
            Delays::of(&without).cells(&cap)
        );
        println!(
            "| {when} | ... and error_rate_max 0.05 | {} | {at_change} |",
            Delays::of(&with).cells(&cap)
        );
    }
    let kl_c = kl_ratio_conditioned(50.0, 0.08, 0.02, 2.0);
    let kl_all = kl_ratio_all_requests(50.0, 0.08, 0.02, 2.0);
    let kl_floor = 50.0 * kl(0.08, 0.005);
    let kl_max = 50.0 * kl(0.08, 0.05);
    println!(
        "\n(B took {:.0} s, besides the forks run within A.)",
        began.elapsed().as_secs_f64()
    );
    println!("\nLorden-style lower bound on the delay of any detector with this false-alarm rate, ln A / KL with ln A = {log_a:.2} (ARL 100 days of 1 s starts):\n");
    println!("- `error_rate_ratio` 2.0, error-conditioned Bernoulli model (23 errors/s; θ1 = 0.174 against the closest null θ0 = 2/21 = 0.095): KL = {kl_c:.3} nats/s, bound **{:.1} s**. With every request of both sides (closest null p_c = 2 p_b): KL = {kl_all:.3} nats/s, bound {:.1} s.", log_a / kl_c, log_a / kl_all);
    println!("- its `min_error_rate` floor (8 % against 0.5 %): KL = {kl_floor:.2} nats/s, bound {:.1} s (not the binding one).", log_a / kl_floor);
    println!(
        "- `error_rate_max` 0.05 (8 % against 5 %): KL = {kl_max:.3} nats/s, bound {:.1} s.",
        log_a / kl_max
    );
    println!("- The goal of <= 5 s median would need ln A <= {:.1}, i.e. a false-alarm budget of one per {:.0} s of healthy traffic rather than one per 100 days.", 5.0 * kl_c, (5.0 * kl_c).exp());
}

// ---------------------------------------------------------------------------------------
// C

struct Scenario {
    name: &'static str,
    rules: Vec<(&'static str, &'static str)>,
    healthy: Traffic,
    regression: Traffic,
    cap: u64,
    /// KL per second against the closest null, for the bound line.
    kl: f64,
    kl_note: &'static str,
}

fn other_regressions(z: &Sizes) {
    let began = WallClock::now();
    let h = Traffic::healthy(50.0);
    let lat_limit = 1.25 * base_p99();
    let scenarios = [
        Scenario {
            name: "errors 2x (4 % vs 2 %), error_rate_ratio 1.5",
            rules: vec![("error_rate_ratio", "1.5"), ("min_error_rate", "0.005")],
            healthy: h,
            regression: Traffic {
                cand_err: 0.04,
                ..h
            },
            cap: z.cap,
            kl: kl_ratio_conditioned(50.0, 0.04, 0.02, 1.5),
            kl_note: "error-conditioned, θ1 = 0.095 vs θ0 = 0.073",
        },
        Scenario {
            name: "p99 +50 % (latency x1.5), latency_p99_ratio 1.25",
            rules: vec![("latency_p99_ratio", "1.25")],
            healthy: h,
            regression: Traffic {
                cand_latency: 1.5,
                ..h
            },
            cap: z.cap,
            kl: 50.0 * kl(p_over(lat_limit, 1.5), 0.01),
            kl_note: "2.5 % of requests over 1.25x the baseline p99 vs 1 %",
        },
        Scenario {
            name: "drift: signal shifted +0.5 sd",
            rules: vec![("drift", "{signal: \"header:x-score\"}")],
            healthy: h,
            regression: Traffic {
                cand_shift: 0.5,
                ..h
            },
            cap: z.cap,
            kl: 50.0 * kl_drift_pair(0.5),
            kl_note: "50 time-aligned pairs/s, each against \"same distribution\"",
        },
        Scenario {
            name: "accuracy 92 % -> 85 %, feedback on 5 %, accuracy_drop 0.05",
            rules: vec![("accuracy_drop", "0.05")],
            healthy: h,
            regression: Traffic {
                cand_accuracy: 0.85,
                ..h
            },
            cap: z.cap_accuracy,
            kl: 50.0 * FEEDBACK_SHARE * kl(0.15, 0.08 + 0.05),
            kl_note: "2.5 feedback/s, 15 % incorrect vs 13 %",
        },
    ];
    println!(
        "\n## C. Other regressions at 50 canary req/s ({} runs per row, one rule each, confidence 0.99)\n",
        z.runs
    );
    println!("| regression | begins | false rollbacks before the change | detected within the cap | within 5 min | median delay (s) | p90 delay (s) | lower bound (s) |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let mut notes = Vec::new();
    for (row, sc) in scenarios.iter().enumerate() {
        let ev = Arc::new(evaluator(&sc.rules));
        let log_a = detector::log_threshold(ev.confidence, ev.interval);
        let bound = log_a / sc.kl;
        for (k, prefix) in [0, z.hour].into_iter().enumerate() {
            let out: Vec<(u64, Option<u64>)> = par_map(z.runs, |run| {
                let mut sim = Sim::new(seed(20 + 2 * row as u64 + k as u64, run), ev.min_requests);
                let mut js = vec![Judge::new(&ev)];
                let falses = healthy(&mut sim, &mut js, sc.healthy, prefix, &[], |_, _, _| {});
                (
                    falses[0],
                    regress(&mut sim, &mut js, sc.regression, sc.cap)[0],
                )
            });
            let falses: u64 = out.iter().map(|o| o.0).sum();
            let delays: Vec<_> = out.iter().map(|o| o.1).collect();
            let when = if prefix == 0 {
                "at t = 0".to_string()
            } else {
                format!("after {} healthy", z.label(prefix))
            };
            let false_cell = if prefix == 0 {
                "-".to_string()
            } else {
                format!(
                    "{falses} in {:.1} candidate-days",
                    z.runs as f64 * prefix as f64 * TICK_S / 86_400.0
                )
            };
            println!(
                "| {} | {when} | {false_cell} | {} | {bound:.1} |",
                sc.name,
                Delays::of(&delays).cells(&z.label(sc.cap)),
            );
        }
        notes.push(format!(
            "- {}: KL = {:.4} nats/s ({}), ln A / KL = {bound:.1} s.",
            sc.name, sc.kl, sc.kl_note
        ));
    }
    println!("\n(C took {:.0} s.) Caps: {} for errors, latency and drift, {} for accuracy. Lower bound: ln A / KL (Lorden), KL per second against the closest null:\n", began.elapsed().as_secs_f64(), z.label(z.cap), z.label(z.cap_accuracy));
    for n in notes {
        println!("{n}");
    }
    println!("\nLorden's bound is asymptotic (A → ∞) and about the worst-case mean delay. With a start every second, the Shiryaev-Roberts sum over the ~1/KL seconds of starts since the change is worth about ln(1/KL) nats when KL < 1 nat/s, so slow regressions (accuracy: ln(1/0.0042) ≈ 5.5 nats ≈ 1300 s) are caught faster than ln A / KL. The drift test's cut points are recomputed once a second (every {DRIFT_CUT_REFRESH} ticks) from the baseline's last {DRIFT_HISTORY} samples.");
}

// ---------------------------------------------------------------------------------------
// D

/// SPEC §5: `error_rate_ratio` never trips while the candidate's error rate is below
/// `min_error_rate`. Both versions at 2 % for a while (the floor's detector gathers
/// evidence that the candidate is above 0.5 %), then both improve: candidate 0.4 %,
/// baseline 0.1 % (4x the baseline, below the floor).
fn effect_floor(z: &Sizes) {
    let began = WallClock::now();
    let ev = Arc::new(evaluator(&[
        ("error_rate_ratio", "2.0"),
        ("min_error_rate", "0.005"),
    ]));
    let low = Traffic {
        base_err: 0.001,
        cand_err: 0.004,
        ..Traffic::healthy(50.0)
    };
    println!(
        "\n## D. The effect floor after a change of regime ({} runs per row, 50 canary req/s, error_rate_ratio 2.0, min_error_rate 0.005)\n",
        z.runs
    );
    println!("SPEC §5: `error_rate_ratio` never trips while the candidate's error rate is below `min_error_rate`. From the change on, the candidate answers 0.4 % errors (below the 0.5 % floor) against the baseline's 0.1 %.\n");
    println!("| before the change | rollbacks within {} of the change | median delay of those (s) | floor detector's ln M at the change: median |", z.label(z.cap));
    println!("|---|---:|---:|---:|");
    for (k, prefix) in [0, z.hour, 4 * z.hour].into_iter().enumerate() {
        let out: Vec<(f64, Option<u64>)> = par_map(z.runs, |run| {
            let mut sim = Sim::new(seed(40 + k as u64, run), ev.min_requests);
            let mut js = vec![Judge::new(&ev)];
            healthy(
                &mut sim,
                &mut js,
                Traffic::healthy(50.0),
                prefix,
                &[],
                |_, _, _| {},
            );
            let floor = js[0].cmp.statistics().min_error_rate;
            (floor, regress(&mut sim, &mut js, low, z.cap)[0])
        });
        let floors: Vec<f64> = out.iter().map(|o| o.0).collect();
        let delays: Vec<f64> = out
            .iter()
            .filter_map(|o| o.1.map(|t| t as f64 * TICK_S))
            .collect();
        let before = if prefix == 0 {
            "nothing (t = 0)".to_string()
        } else {
            format!("{} of 2 % vs 2 %", z.label(prefix))
        };
        let m = median(&floors);
        println!(
            "| {before} | {}/{} | {} | {} |",
            delays.len(),
            z.runs,
            if delays.is_empty() {
                "-".to_string()
            } else {
                format!("{:.0}", median(&delays))
            },
            if m.is_finite() {
                format!("{m:.0}")
            } else {
                "- (no evidence yet)".to_string()
            }
        );
    }
    println!("\n(D took {:.0} s.)", began.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------
// F: the seed scenario spread over a fleet

/// Replicas the canary's traffic is spread over in F.
const REPLICAS: usize = 10;
/// How late the other replicas' counts reach the deciding replica, in ticks: one heartbeat
/// (the model of SPEC section 10); three (the worst case of the real path: a replica's
/// evaluator tick, its next heartbeat, the leader's next heartbeat, the leader's next
/// tick); ten (a heartbeat of 1 s with the 100 ms interval, a cheaper store's cadence).
const POOL_LAGS: [usize; 3] = [1, 3, 10];

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.cand += o.cand;
        self.cand_errors += o.cand_errors;
        self.base += o.base;
        self.base_errors += o.base_errors;
        self.over_sla += o.over_sla;
        self.over_ratio = match (self.over_ratio, o.over_ratio) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        self.cand_feedback += o.cand_feedback;
        self.cand_incorrect += o.cand_incorrect;
        self.base_feedback += o.base_feedback;
        self.base_incorrect += o.base_incorrect;
    }

    /// The tick a comparison sees (error and latency counts; no drift samples).
    fn as_tick(&self) -> Tick<'static> {
        Tick {
            candidate_answered: self.cand,
            candidate_errors: self.cand_errors,
            baseline_answered: self.base,
            baseline_errors: self.base_errors,
            over_sla: self.over_sla,
            over_baseline_p99: self.over_ratio,
            candidate_feedback: self.cand_feedback,
            candidate_incorrect: self.cand_incorrect,
            baseline_feedback: self.base_feedback,
            baseline_incorrect: self.base_incorrect,
            drift_pairs: &[],
            drift_cuts: None,
        }
    }
}

/// The deciding replica of a pooling fleet: its own tick plus the other replicas' ticks of
/// `lag` ticks ago (nothing from before the comparison began).
struct Pooled {
    lag: usize,
    /// The other replicas' summed counts of the last `lag` ticks, oldest first.
    late: std::collections::VecDeque<Counts>,
    judges: Vec<Judge>,
}

impl Pooled {
    fn new(lag: usize, judges: Vec<Judge>) -> Self {
        Pooled {
            lag,
            late: std::collections::VecDeque::new(),
            judges,
        }
    }

    /// What the deciding replica (replica 0) observes this tick.
    fn tick(&mut self, ticks: &[Counts]) -> Counts {
        let mut others = Counts::default();
        for c in &ticks[1..] {
            others.add(c);
        }
        self.late.push_back(others);
        let mut seen = ticks[0];
        if self.late.len() > self.lag {
            if let Some(old) = self.late.pop_front() {
                seen.add(&old);
            }
        }
        seen
    }
}

/// F: detection delay of the seed scenario (8 % vs 2 % errors, 50 canary req/s in total)
/// when the canary's traffic is spread evenly over [`REPLICAS`] replicas: (a) one replica
/// seeing it all (B's fresh row, same seeds), (b) pooled: the deciding replica observes
/// its own share plus the others' counts `lag` ticks late, (c) not pooled: every replica
/// judges its own share and the fleet rolls back at the first trip. (b) and (c) run on
/// the same per-replica draws. Then (b)'s false rollbacks on healthy traffic over A's
/// horizon.
fn fleet_detection(z: &Sizes) {
    let began = WallClock::now();
    let ratio = Arc::new(evaluator(&[
        ("error_rate_ratio", "2.0"),
        ("min_error_rate", "0.005"),
    ]));
    let max = Arc::new(evaluator(&[("error_rate_max", "0.05")]));
    let pair = || vec![Judge::new(&ratio), Judge::new(&max)];
    let min_requests = ratio.min_requests;
    let total = 50.0;
    let share = total / REPLICAS as f64;
    let regression = Traffic {
        cand_err: 0.08,
        ..Traffic::healthy(total)
    };
    let regression_share = Traffic {
        canary_rps: share,
        ..regression
    };
    let sims = |row: u64, run: usize| -> Vec<Sim> {
        (0..REPLICAS)
            .map(|j| Sim::new(seed(row + j as u64, run), min_requests))
            .collect()
    };

    // (a): exactly B's fresh row.
    let single: Vec<Vec<Option<u64>>> = par_map(z.runs, |run| {
        let mut sim = Sim::new(seed(10, run), min_requests);
        let mut js = pair();
        regress(&mut sim, &mut js, regression, z.cap)
    });
    // (b) for each lag and (c), on the same draws. Per run: [pooled lag.., unpooled], each
    // the first trip tick of (ratio, max).
    let fleet: Vec<Vec<[Option<u64>; 2]>> = par_map(z.runs, |run| {
        let mut sims = sims(100, run);
        let ph = Phase::new(regression_share, &pair().iter().collect::<Vec<_>>());
        let mut pooled: Vec<Pooled> = POOL_LAGS.iter().map(|&l| Pooled::new(l, pair())).collect();
        let mut alone: Vec<Vec<Judge>> = (0..REPLICAS).map(|_| pair()).collect();
        let mut first = vec![[None; 2]; POOL_LAGS.len() + 1];
        let mut ticks = vec![Counts::default(); REPLICAS];
        for i in 1..=z.cap {
            for (c, sim) in ticks.iter_mut().zip(sims.iter_mut()) {
                *c = sim.tick(&ph);
            }
            for (p, f) in pooled.iter_mut().zip(first.iter_mut()) {
                let seen = p.tick(&ticks).as_tick();
                for (j, fj) in p.judges.iter_mut().zip(f.iter_mut()) {
                    if fj.is_none() && j.step(&seen).is_some() {
                        *fj = Some(i);
                    }
                }
            }
            let f = first.last_mut().expect("unpooled slot");
            for (js, c) in alone.iter_mut().zip(&ticks) {
                let seen = c.as_tick();
                for (j, fj) in js.iter_mut().zip(f.iter_mut()) {
                    if fj.is_none() && j.step(&seen).is_some() {
                        *fj = Some(i);
                    }
                }
            }
            if first.iter().flatten().all(Option::is_some) {
                break;
            }
        }
        first
    });
    let cap = z.label(z.cap);
    let both = |r: [Option<u64>; 2]| match (r[0], r[1]) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    println!(
        "\n## F. The seed scenario spread over {REPLICAS} replicas: 8 % vs 2 % errors, {total:.0} canary req/s in total ({share:.0} per replica), {} runs per row\n",
        z.runs
    );
    println!("Delay from the change (detectors fresh at the change, as B's first row) to the first tick whose `decide` trips. (a) is B's t = 0 row (same seeds). (b) pooled (`pool: true`): the deciding replica's comparison observes, each tick, its own 1/{REPLICAS} share plus the other {} replicas' counts of `lag` ticks before (nothing from before the change); one comparison decides. (c) not pooled (`pool: false`): {REPLICAS} comparisons, one per replica, each on its 1/{REPLICAS}; the fleet's delay is the first of them to trip. (b) and (c) share the per-replica draws.\n", REPLICAS - 1);
    println!("| fleet | rules | detected within {cap} | within 5 min | median delay (s) | p90 delay (s) | median / (a) | p90 / (a) |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    // (fleet, delays with the ratio rule alone, delays with error_rate_max too)
    type Row = (String, Vec<Option<u64>>, Vec<Option<u64>>);
    let mut rows: Vec<Row> = vec![(
        "(a) one replica sees all traffic".into(),
        single.iter().map(|r| r[0]).collect(),
        single.iter().map(|r| both([r[0], r[1]])).collect(),
    )];
    for (k, lag) in POOL_LAGS.iter().enumerate() {
        rows.push((
            format!(
                "(b) pooled, the others {lag} interval{} late",
                if *lag == 1 { "" } else { "s" }
            ),
            fleet.iter().map(|r| r[k][0]).collect(),
            fleet.iter().map(|r| both(r[k])).collect(),
        ));
    }
    rows.push((
        format!("(c) not pooled, first of {REPLICAS} to trip"),
        fleet.iter().map(|r| r[POOL_LAGS.len()][0]).collect(),
        fleet.iter().map(|r| both(r[POOL_LAGS.len()])).collect(),
    ));
    let reference = [Delays::of(&rows[0].1), Delays::of(&rows[0].2)];
    let ratio_cell = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    for (name, without, with) in &rows {
        for (k, (rules, delays)) in [
            (
                "error_rate_ratio 2.0, min_error_rate 0.005, error_rate_max null",
                without,
            ),
            ("... and error_rate_max 0.05", with),
        ]
        .into_iter()
        .enumerate()
        {
            let d = Delays::of(delays);
            println!(
                "| {name} | {rules} | {} | {} | {} |",
                d.cells(&cap),
                ratio_cell(d.median, reference[k].median),
                ratio_cell(d.p90, reference[k].p90)
            );
        }
    }
    let delays_s = began.elapsed().as_secs_f64();

    // (b)'s false rollbacks: healthy traffic over A's horizon, one interval late.
    let began = WallClock::now();
    let healthy_share = Traffic::healthy(share);
    let falses: Vec<[u64; 2]> = par_map(z.runs, |run| {
        let mut sims = sims(200, run);
        let ph = Phase::new(healthy_share, &pair().iter().collect::<Vec<_>>());
        let mut p = Pooled::new(POOL_LAGS[0], pair());
        let mut trips = [0u64; 2];
        let mut ticks = vec![Counts::default(); REPLICAS];
        for _ in 0..z.day {
            for (c, sim) in ticks.iter_mut().zip(sims.iter_mut()) {
                *c = sim.tick(&ph);
            }
            let seen = p.tick(&ticks).as_tick();
            for (j, n) in p.judges.iter_mut().zip(trips.iter_mut()) {
                if j.step(&seen).is_some() {
                    *n += 1;
                    j.restart();
                }
            }
        }
        trips
    });
    let days = z.runs as f64 * z.day as f64 * TICK_S / 86_400.0;
    println!(
        "\n(b), pooled one interval late, on healthy traffic (2 % vs 2 %, {total:.0} canary req/s in total over {REPLICAS} replicas), {} runs of {} (A's horizon; each rule in a comparison of its own, restarted after a trip):\n",
        z.runs,
        z.label(z.day)
    );
    println!("| rule | candidate-days | false rollbacks | per candidate-day | 95 % upper bound |");
    println!("|---|---:|---:|---:|---:|");
    for (k, name) in [
        "error_rate_ratio 2.0 (min_error_rate 0.005)",
        "error_rate_max 0.05",
    ]
    .iter()
    .enumerate()
    {
        let n: u64 = falses.iter().map(|t| t[k]).sum();
        println!(
            "| {name} | {days:.1} | {n} | {:.4} | {:.4} |",
            n as f64 / days,
            poisson_upper95(n) / days
        );
    }
    println!(
        "\n(F took {delays_s:.0} s for the delays and {:.0} s for the false rollbacks.) Not simulated: (c)'s false rollbacks ({REPLICAS} comparisons, each with the single comparison's guarantee, so up to {REPLICAS}x the per-candidate rate by the union bound), and the latency rules pooled.",
        began.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------
// Trip-to-swap

fn trip_to_swap(z: &Sizes) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let n = z.swaps;
        let mut us = Vec::new();
        for _ in 0..n {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut yaml = format!(
                "listen: 127.0.0.1:0\nstate_dir: \"{}\"\nversions:\n  base: {{endpoints: [\"http://127.0.0.1:9\"]}}\n",
                dir.path().display()
            );
            for i in 0..10 {
                yaml.push_str(&format!(
                    "  cand{i}: {{endpoints: [\"http://127.0.0.1:9\"]}}\n"
                ));
            }
            yaml.push_str("routes:\n");
            for i in 0..10 {
                yaml.push_str(&format!(
                    "  - {{name: r{i}, match: {{path_prefix: /r{i}/}}, baseline: base, split: {{base: 95, cand{i}: 5}}}}\n"
                ));
            }
            let config = Config::from_str(&yaml, &dir.path().join("c.yaml")).expect("config");
            let telemetry = Arc::new(rollgate::telemetry::Telemetry::new(Duration::from_secs(30)));
            let metrics = Arc::new(rollgate::telemetry::prom::Metrics::new(telemetry.clone()));
            let store = Arc::new(
                rollgate::routing::store::Store::new(config, Default::default(), telemetry, metrics)
                    .expect("store"),
            );
            let audit =
                Arc::new(rollgate::control::audit::Audit::open(dir.path()).expect("audit log"));
            let alerts = rollgate::control::alerts::Alerts::new().expect("alerts");
            let c = Arc::new(rollgate::evaluator::Controller::new(
                store,
                audit,
                alerts,
                dir.path().to_path_buf(),
            ));
            let cmd = Command::new(
                Action::Rollback {
                    route: Some("r3".into()),
                    version: "cand3".into(),
                    trigger: Trigger::Manual,
                    evidence: serde_json::Value::Null,
                    expect: None,
                },
                Some("bench".into()),
                Some("bench".into()),
            );
            let rec = c
                .apply_at(cmd, tokio::time::Instant::now())
                .await
                .expect("rollback applied");
            us.push(
                rec["trip_to_swap_us"]
                    .as_u64()
                    .expect("trip_to_swap_us in the record") as f64,
            );
            c.finish(Duration::from_secs(5)).await;
        }
        us.sort_by(f64::total_cmp);
        let p = |q: f64| us[((us.len() - 1) as f64 * q) as usize];
        println!("\n## Trip-to-swap (10 routes, 11 versions; `Controller::apply_at` of a rollback, from its audit records, {n} rollbacks)\n");
        println!(
            "| p50 µs | p99 µs | max µs |\n|---:|---:|---:|\n| {:.0} | {:.0} | {:.0} |",
            p(0.5),
            p(0.99),
            p(1.0)
        );
    });
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let z = Sizes::new(full);
    let began = WallClock::now();
    println!(
        "# Evaluator bench ({} run: {} runs per row, {} threads)",
        if z.full { "full" } else { "smoke" },
        z.runs,
        std::thread::available_parallelism().map_or(1, |t| t.get())
    );
    let only = std::env::var("ROLLGATE_BENCH_ONLY").unwrap_or_default();
    let run = |section: &str| only.is_empty() || only.split(',').any(|s| s == section);
    if run("AB") {
        false_alarms_and_seed_scenario(&z);
    }
    if run("C") {
        other_regressions(&z);
    }
    if run("D") {
        effect_floor(&z);
    }
    if run("F") {
        fleet_detection(&z);
    }
    if run("swap") {
        trip_to_swap(&z);
    }
    println!("\nTotal: {:.0} s.", began.elapsed().as_secs_f64());
}
