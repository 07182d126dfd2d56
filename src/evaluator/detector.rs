//! Change detectors whose false-alarm guarantee is a *rate*, and whose detection delay does
//! not grow with uptime (SPEC §5, "Late regressions").
//!
//! # Method: a mixture Shiryaev-Roberts e-detector
//!
//! Each statistical rule reduces to a question about a Bernoulli rate (see [`super::stats`]
//! for the reductions): is `θ`, the probability that an observation is "bad", above a null
//! value `θ0`? Observations arrive in batches, one per evaluator tick, and each tick may
//! have its own `θ0` (the error-ratio test's null moves with the traffic shares).
//!
//! For one alternative `θ1 > θ0`, the likelihood ratio of a tick with `s` bad out of `n` is
//! `L = (θ1/θ0)^s ((1-θ1)/(1-θ0))^(n-s)`. For every true `θ ≤ θ0`, `E[L] ≤ 1`: the product
//! of `L` over the ticks after any start time is a non-negative supermartingale, an
//! *e-process* for the composite null "never worse than the rule allows".
//!
//! Following Shin, Ramdas and Rinaldo ("E-detectors: a nonparametric framework for
//! sequential change detection", 2023), the detector runs one such e-process from every
//! start time and sums them (the Shiryaev-Roberts statistic), with the recursion
//!
//! ```text
//! R_t = (R_{t-1} + 1[a start at t]) · L_t
//! ```
//!
//! so its cost is constant per tick however long the candidate has lived. The alternatives
//! are a finite grid of odds multipliers `m` over the null odds (`θ1/(1-θ1) = m θ0/(1-θ0)`),
//! mixed with equal weights: `M_t = Σ_g w_g R_t(g)`. A start is opened every
//! [`START_SPACING`] (or every tick when ticks are slower).
//!
//! # Guarantee
//!
//! Under the null, `M_t - N_t` (with `N_t` the number of starts so far) is a
//! supermartingale, so for the alarm time `τ = inf{t: M_t ≥ A}`:
//!
//! - `P(τ ≤ T) ≤ N_T / A` (optional stopping at `τ ∧ T` and Markov's inequality), and
//! - `E[N_τ] ≥ A` (the average run length, counted in starts).
//!
//! With `A = N_24h / (1 - confidence)`, a candidate that is never worse than its rule allows
//! is rolled back by that rule with probability at most `1 - confidence` in any 24 h, and at
//! most `1 - confidence` times per 24 h on average after restarts: the false-alarm *rate* of
//! SPEC §5, however often the statistic is looked at. Nothing in it depends on how long the
//! candidate has been live: `M` forgets old starts as the data contradict them, so a
//! regression after a day is caught as fast as one from the first request (the simulation in
//! `benches/evaluator.rs` measures both).
//!
//! The price of the rate guarantee is the threshold: `ln A = ln(86,400 / 1 s) + ln(1/α)`,
//! about 16 at confidence 0.99, against `ln(1/α) = 4.6` for a test that may alarm once per
//! candidate's life. By Lorden's bound no procedure with this false-alarm rate detects
//! faster than about `ln A / KL` (KL: information per second between the regression and the
//! closest null), so the delay figures of the bench are near what the data allow.
//!
//! Gates (`min_requests`, `min_error_rate`'s effect floor) only ever *withhold* an alarm, so
//! they keep the guarantee.

use std::time::Duration;

/// How often a new e-process starts. One per second: the detector forgets at most a second
/// of healthy traffic before a change, and a day holds 86,400 starts.
pub const START_SPACING: Duration = Duration::from_secs(1);

/// Odds multipliers of the alternatives: from a 20 % worsening to 30x.
const ODDS: [f64; 7] = [1.2, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0];

/// How far above the level that trips a component's `ln R` may climb (see
/// [`Bernoulli::set_cap`]).
pub const CAP_MARGIN: f64 = 2.0;

/// `ln A` for a detector opening a start every `spacing` at level `1 - confidence` per 24 h.
pub fn log_threshold(confidence: f64, interval: Duration) -> f64 {
    let spacing = START_SPACING.max(interval).as_secs_f64();
    let starts_per_day = (86_400.0 / spacing).max(1.0);
    let alpha = (1.0 - confidence).clamp(1e-12, 0.5);
    starts_per_day.ln() - alpha.ln()
}

/// `ln(e^a + e^b)`, exact for infinities.
fn log_add_exp(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if hi == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// A Shiryaev-Roberts statistic for each component of a finite mixture, in logs.
///
/// A start that falls due in a tick without observations waits for the next tick that has
/// some: an idle candidate (weight 0, a quiet night) accumulates neither starts nor
/// apparent evidence, and the count of starts per day stays at most one per spacing. Whether
/// a tick has observations depends on how many there are, never on their outcomes, so the
/// supermartingale argument holds conditionally on the counts.
#[derive(Debug, Clone)]
struct Sr<const G: usize> {
    log_r: [f64; G],
    pending: bool,
    /// Upper bound of each component's `ln R` ([`Bernoulli::set_cap`]).
    cap: f64,
}

impl<const G: usize> Sr<G> {
    fn new() -> Self {
        Sr {
            log_r: [f64::NEG_INFINITY; G],
            pending: false,
            cap: f64::INFINITY,
        }
    }

    /// One tick: open a start if one is due and the tick has data, then multiply by each
    /// component's likelihood ratio.
    fn advance(&mut self, due: bool, data: bool, log_lr: impl Fn(usize) -> f64) {
        self.pending |= due;
        if !data {
            return;
        }
        let start = std::mem::take(&mut self.pending);
        for (g, r) in self.log_r.iter_mut().enumerate() {
            if start {
                *r = log_add_exp(*r, 0.0);
            }
            if *r > f64::NEG_INFINITY {
                // Bounded below so a long healthy stretch cannot underflow into NaN later, and
                // above by the cap, so evidence a gate held back does not pile up.
                *r = (*r + log_lr(g)).clamp(-1e9, self.cap);
            }
        }
    }

    /// Caps each component a margin above what makes the mixture trip on its own.
    fn set_cap(&mut self, log_threshold: f64) {
        self.cap = log_threshold + (G as f64).ln() + CAP_MARGIN;
    }

    /// `ln Σ_g R_g / G`: the equally weighted mixture.
    fn log_statistic(&self) -> f64 {
        let total = self
            .log_r
            .iter()
            .fold(f64::NEG_INFINITY, |acc, r| log_add_exp(acc, *r));
        total - (G as f64).ln()
    }
}

/// The e-detector for "is the rate of bad outcomes above `θ0`?", with `θ0` given per tick.
#[derive(Debug, Clone)]
pub struct Bernoulli {
    sr: Sr<{ ODDS.len() }>,
    /// Trials and bad outcomes seen since the detector began (for gates and reasons).
    pub trials: u64,
    pub bad: u64,
}

impl Default for Bernoulli {
    fn default() -> Self {
        Bernoulli {
            sr: Sr::new(),
            trials: 0,
            bad: 0,
        }
    }
}

impl Bernoulli {
    /// One tick: `bad` of `n` trials, against the null rate `theta0` of this tick. A tick
    /// without trials, or with a null of 0 or 1 (nothing to learn), only opens the start.
    pub fn observe(&mut self, start: bool, bad: u64, n: u64, theta0: f64) {
        let bad = bad.min(n);
        self.trials += n;
        self.bad += bad;
        if n == 0 || !(theta0 > 0.0 && theta0 < 1.0) {
            self.sr.advance(start, false, |_| 0.0);
            return;
        }
        let (s, f) = (bad as f64, (n - bad) as f64);
        let odds0 = theta0 / (1.0 - theta0);
        let (l0, l0c) = (theta0.ln(), (1.0 - theta0).ln());
        self.sr.advance(start, true, |g| {
            let odds1 = odds0 * ODDS[g];
            let theta1 = odds1 / (1.0 + odds1);
            s * (theta1.ln() - l0) + f * ((1.0 - theta1).ln() - l0c)
        });
    }

    /// `ln M`: compare with [`log_threshold`].
    pub fn log_statistic(&self) -> f64 {
        self.sr.log_statistic()
    }

    /// Caps the statistic's components at `CAP_MARGIN` above the level where one of them
    /// alone trips the mixture. A value above the threshold trips at once unless a gate
    /// holds it back (`min_requests`, the `min_error_rate` floor, the ratio rule's floor
    /// itself); there, uncapped evidence would pile up for hours and outlive the regime it
    /// was about: a floor established at a healthy 2 % would still stand after the
    /// candidate fell to 0.4 %. Capping the state only makes every `R` smaller (`R_t ≤
    /// (min(R_{t-1}, C) + 1) L_t`), so the guarantee holds, and the statistic forgets in
    /// bounded time once the data contradict it.
    pub fn set_cap(&mut self, log_threshold: f64) {
        self.sr.set_cap(log_threshold);
    }
}

/// Cut points (quantiles of the baseline's earlier samples) the drift test bets on.
pub const DRIFT_QUANTILES: [f64; 5] = [0.1, 0.25, 0.5, 0.75, 0.9];
/// Bet sizes, both directions.
const BETS: [f64; 6] = [-0.8, -0.5, -0.25, 0.25, 0.5, 0.8];
const DRIFT_COMPONENTS: usize = DRIFT_QUANTILES.len() * BETS.len();

/// The sequential two-sample test behind `drift`: is the candidate's signal distributed
/// differently from the baseline's?
///
/// Each tick pairs candidate samples with baseline samples of the *same* tick (time-aligned,
/// so a load-dependent signal moving for both does not look like drift). For a cut point
/// `x` (a quantile of the baseline's samples from earlier ticks, so it is fixed before the
/// tick's data), `Z = 1[c ≤ x] - 1[b ≤ x]` has mean 0 when both come from one distribution,
/// and a bet `λ ∈ (-1, 1)` turns it into the factor `1 + λZ`, of expectation 1 under the
/// null: a test by betting (Shekhar and Ramdas, "Nonparametric two-sample testing by
/// betting", 2023) on the Kolmogorov-Smirnov distance at five cut points. The mixture over
/// cut points and bets enters the same Shiryaev-Roberts recursion as [`Bernoulli`], so
/// `drift` has the same false-alarm rate guarantee.
#[derive(Debug, Clone)]
pub struct Drift {
    sr: Sr<DRIFT_COMPONENTS>,
    /// Pairs tested since the detector began.
    pub pairs: u64,
}

impl Default for Drift {
    fn default() -> Self {
        Drift {
            sr: Sr::new(),
            pairs: 0,
        }
    }
}

impl Drift {
    /// One tick: `pairs` of (candidate, baseline) samples of this tick, bet on at `cuts`
    /// (None before the baseline has history: the tick only opens the start).
    pub fn observe(
        &mut self,
        start: bool,
        pairs: &[(f64, f64)],
        cuts: Option<&[f64; DRIFT_QUANTILES.len()]>,
    ) {
        let Some(cuts) = cuts else {
            self.sr.advance(start, false, |_| 0.0);
            return;
        };
        self.pairs += pairs.len() as u64;
        // Net Z per cut point over the tick, as counts of (+1, -1) outcomes.
        let mut plus = [0u32; DRIFT_QUANTILES.len()];
        let mut minus = [0u32; DRIFT_QUANTILES.len()];
        for &(c, b) in pairs {
            for (q, x) in cuts.iter().enumerate() {
                match (c <= *x, b <= *x) {
                    (true, false) => plus[q] += 1,
                    (false, true) => minus[q] += 1,
                    _ => {}
                }
            }
        }
        self.sr.advance(start, !pairs.is_empty(), |g| {
            let (q, l) = (g / BETS.len(), BETS[g % BETS.len()]);
            f64::from(plus[q]) * l.ln_1p() + f64::from(minus[q]) * (-l).ln_1p()
        });
    }

    pub fn log_statistic(&self) -> f64 {
        self.sr.log_statistic()
    }

    /// As [`Bernoulli::set_cap`].
    pub fn set_cap(&mut self, log_threshold: f64) {
        self.sr.set_cap(log_threshold);
    }
}

/// The cut points for [`Drift`]: quantiles of `history` (sorted in place); None when there
/// are fewer than 20 values.
pub fn drift_cuts(history: &mut [f64]) -> Option<[f64; DRIFT_QUANTILES.len()]> {
    if history.len() < 20 {
        return None;
    }
    history.sort_by(f64::total_cmp);
    let last = history.len() - 1;
    Some(DRIFT_QUANTILES.map(|q| history[((q * last as f64).round() as usize).min(last)]))
}

/// When the next e-process starts: every [`START_SPACING`] of evaluator time.
#[derive(Debug, Clone, Default)]
pub struct Starts {
    /// Evaluator time since the last start; None before the first tick.
    since: Option<Duration>,
}

impl Starts {
    /// Advances by one tick of `interval`; true when a start opens at this tick (the first
    /// tick, then one per spacing).
    pub fn tick(&mut self, interval: Duration) -> bool {
        let since = self.since.map_or(START_SPACING, |s| s + interval);
        let start = since >= START_SPACING;
        self.since = Some(if start { Duration::ZERO } else { since });
        start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);

    #[test]
    fn threshold_is_the_daily_starts_over_alpha() {
        let a = log_threshold(0.99, TICK);
        assert!((a - (86_400f64.ln() + 100f64.ln())).abs() < 1e-9, "{a}");
        // Slower ticks open fewer starts: a lower threshold.
        assert!(log_threshold(0.99, Duration::from_secs(10)) < a);
    }

    #[test]
    fn starts_open_once_per_second() {
        let mut s = Starts::default();
        let opened = (0..100).filter(|_| s.tick(TICK)).count();
        assert!((10..=11).contains(&opened), "{opened}");
    }

    fn binomial(rng: &mut fastrand::Rng, n: u64, p: f64) -> u64 {
        (0..n).filter(|_| rng.f64() < p).count() as u64
    }

    /// A healthy stream at the null's boundary for a simulated hour: the statistic stays
    /// far below the threshold; then a doubling is caught within seconds, and as fast after
    /// an hour as from the start.
    #[test]
    fn a_late_regression_is_caught_as_fast_as_an_early_one() {
        let a = log_threshold(0.99, TICK);
        let delay = |healthy_ticks: u64, seed: u64| {
            let mut rng = fastrand::Rng::with_seed(seed);
            let (mut d, mut s) = (Bernoulli::default(), Starts::default());
            for _ in 0..healthy_ticks {
                d.observe(s.tick(TICK), binomial(&mut rng, 5, 0.05), 5, 0.05);
                assert!(d.log_statistic() < a);
            }
            (1..)
                .find(|_| {
                    d.observe(s.tick(TICK), binomial(&mut rng, 5, 0.3), 5, 0.05);
                    d.log_statistic() >= a
                })
                .unwrap()
        };
        let early: u64 = (0..20).map(|s| delay(0, s)).sum();
        let late: u64 = (0..20).map(|s| delay(36_000, 100 + s)).sum();
        assert!(
            (late as f64) < 1.5 * early as f64,
            "early {early} late {late}"
        );
        assert!(early / 20 < 300, "mean delay {} ticks", early / 20);
    }

    #[test]
    fn idle_time_builds_no_evidence() {
        let mut d = Bernoulli::default();
        for i in 0..100_000 {
            d.observe(i % 10 == 0, 0, 0, 0.05);
        }
        assert_eq!(d.log_statistic(), f64::NEG_INFINITY);
        // The first tick with data opens the one pending start.
        d.observe(false, 0, 1, 0.05);
        assert!(d.log_statistic() <= 0.0, "{}", d.log_statistic());
        d.observe(true, 3, 3, 0.0);
        assert!(!d.log_statistic().is_nan());
    }

    #[test]
    fn drift_bets_find_a_shift_and_not_the_same_distribution() {
        let a = log_threshold(0.99, TICK);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut history: Vec<f64> = (0..500).map(|_| rng.f64()).collect();
        let cuts = drift_cuts(&mut history).unwrap();
        let (mut same, mut shifted, mut s) =
            (Drift::default(), Drift::default(), Starts::default());
        for _ in 0..20_000 {
            let start = s.tick(TICK);
            let pairs: Vec<(f64, f64)> = (0..5).map(|_| (rng.f64(), rng.f64())).collect();
            same.observe(start, &pairs, Some(&cuts));
            let pairs: Vec<(f64, f64)> = (0..5).map(|_| (rng.f64() + 0.3, rng.f64())).collect();
            shifted.observe(start, &pairs, Some(&cuts));
        }
        assert!(same.log_statistic() < a, "{}", same.log_statistic());
        assert!(shifted.log_statistic() > a, "{}", shifted.log_statistic());
    }

    /// A floor established for hours at a healthy 2 % (well above a 0.5 % floor) must not
    /// still stand long after the candidate fell to 0.4 %: capped, it forgets in minutes.
    #[test]
    fn capped_evidence_forgets_a_past_regime_in_bounded_time() {
        let a = log_threshold(0.99, TICK);
        let mut rng = fastrand::Rng::with_seed(3);
        let (mut d, mut s) = (Bernoulli::default(), Starts::default());
        d.set_cap(a);
        for _ in 0..36_000 {
            d.observe(s.tick(TICK), binomial(&mut rng, 5, 0.02), 5, 0.005);
        }
        let cap = a + (ODDS.len() as f64).ln() + CAP_MARGIN;
        assert!(d.log_statistic() <= cap + 1e-9, "{}", d.log_statistic());
        let below = (1..)
            .find(|_| {
                d.observe(s.tick(TICK), binomial(&mut rng, 5, 0.004), 5, 0.005);
                d.log_statistic() < a
            })
            .unwrap();
        assert!(
            below < 10 * 60 * 10,
            "still above the threshold after {below} ticks"
        );
    }
}
