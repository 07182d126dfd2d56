//! The pure decision: given what was measured about a candidate and its baseline, does a
//! rule trip? No clocks, no sockets, no locks: unit-tested directly.

use std::fmt::Write as _;
use std::time::Duration;

use crate::config::Rules;

/// Rule names: the trigger names of audit records and metrics (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    ErrorRateRatio,
    ErrorRateMax,
    LatencyP99Max,
    LatencyP99Ratio,
    HealthFailures,
    AccuracyDrop,
    Drift,
    SafetyViolations,
    Manual,
    Drill,
}

impl Trigger {
    pub const ALL: [Trigger; 10] = [
        Trigger::ErrorRateRatio,
        Trigger::ErrorRateMax,
        Trigger::LatencyP99Max,
        Trigger::LatencyP99Ratio,
        Trigger::HealthFailures,
        Trigger::AccuracyDrop,
        Trigger::Drift,
        Trigger::SafetyViolations,
        Trigger::Manual,
        Trigger::Drill,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::ErrorRateRatio => "error_rate_ratio",
            Trigger::ErrorRateMax => "error_rate_max",
            Trigger::LatencyP99Max => "latency_p99_max",
            Trigger::LatencyP99Ratio => "latency_p99_ratio",
            Trigger::HealthFailures => "health_failures",
            Trigger::AccuracyDrop => "accuracy_drop",
            Trigger::Drift => "drift",
            Trigger::SafetyViolations => "safety_violations",
            Trigger::Manual => "manual",
            Trigger::Drill => "drill",
        }
    }
}

/// One side's counts over the sliding window (for reasons and records).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Side {
    /// Answered requests (success, error, 4xx); aborts and refusals never count.
    pub requests: u64,
    pub errors: u64,
    /// Feedback received and how much of it said "incorrect".
    pub feedback: u64,
    pub incorrect: u64,
}

impl Side {
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

/// `ln` of each statistical rule's detector statistic ([`super::detector`]); 0 (no
/// evidence either way) for rules that have not run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Statistics {
    pub error_rate_max: f64,
    pub error_rate_ratio: f64,
    /// The effect floor of `error_rate_ratio`: candidate rate above `min_error_rate`.
    pub min_error_rate: f64,
    pub latency_p99_max: f64,
    pub latency_p99_ratio: f64,
    pub accuracy_drop: f64,
    pub drift: f64,
}

/// Everything [`decide`] looks at for one (candidate, baseline) pair.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    /// Sliding-window counts, for reasons.
    pub candidate: Side,
    pub baseline: Side,
    /// Window p99 of time to first byte, for reasons.
    pub candidate_p99: Duration,
    pub baseline_p99: Duration,
    /// Since this candidate's detectors began (this baseline, this incarnation): answered
    /// requests, feedback items, drift pairs. The gates of `min_requests`.
    pub candidate_answered: u64,
    pub baseline_answered: u64,
    pub candidate_feedback: u64,
    pub baseline_feedback: u64,
    pub drift_pairs: u64,
    /// Smallest consecutive-failure count over the candidate's endpoints (all failing ≥ this).
    pub health_failing_streak: Option<u32>,
    /// Guardrail-flagged responses over the rule's period.
    pub safety_flagged: u64,
    pub stats: Statistics,
    /// The candidate's error rate over the last `window` is above `min_error_rate` (its 99.997 %
    /// Wilson lower bound is): the floor is about the rate *now*, not about a past regime.
    pub floor_met: bool,
    /// `ln A`, the level every statistic is compared with ([`super::detector::log_threshold`]).
    pub log_threshold: f64,
}

/// What [`decide`] concluded.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Healthy,
    Trip { trigger: Trigger, reason: String },
}

/// How close one rule is to tripping: `ratio` is statistic / threshold (1 trips), for
/// status, the `rollgate_evidence_ratio` gauge and the status page.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RuleProgress {
    pub rule: Trigger,
    pub ratio: f64,
    /// The rule's statistic and the level that trips it (log e-value for statistical
    /// rules; counts for health and safety).
    pub statistic: f64,
    pub threshold: f64,
    /// False while a gate (`min_requests`, a baseline) keeps the rule from tripping.
    pub ready: bool,
}

/// Every enabled rule's progress toward a trip, in [`decide`]'s order.
pub fn progress(e: &Evidence, rules: &Rules, min_requests: u64) -> Vec<RuleProgress> {
    let mut out = Vec::with_capacity(8);
    let thr = e.log_threshold.max(f64::MIN_POSITIVE);
    let both = e.candidate_answered >= min_requests && e.baseline_answered >= min_requests;
    let mut stat = |rule, statistic: f64, ready| {
        out.push(RuleProgress {
            rule,
            ratio: statistic.max(0.0) / thr,
            statistic,
            threshold: thr,
            ready,
        })
    };
    if rules.error_rate_max.is_some() {
        stat(
            Trigger::ErrorRateMax,
            e.stats.error_rate_max,
            e.candidate_answered >= min_requests,
        );
    }
    if rules.error_rate_ratio.is_some() {
        // Both the ratio and the effect floor must be shown: the weaker one decides.
        let (s, floor) = match rules.min_error_rate {
            Some(_) => (
                e.stats.error_rate_ratio.min(e.stats.min_error_rate),
                e.floor_met,
            ),
            None => (e.stats.error_rate_ratio, true),
        };
        stat(Trigger::ErrorRateRatio, s, both && floor);
    }
    if rules.latency_p99_max.is_some() {
        stat(
            Trigger::LatencyP99Max,
            e.stats.latency_p99_max,
            e.candidate_answered >= min_requests,
        );
    }
    if rules.latency_p99_ratio.is_some() {
        stat(Trigger::LatencyP99Ratio, e.stats.latency_p99_ratio, both);
    }
    if rules.accuracy_drop.is_some() {
        stat(
            Trigger::AccuracyDrop,
            e.stats.accuracy_drop,
            e.candidate_feedback >= min_requests && e.baseline_feedback >= min_requests,
        );
    }
    if rules.drift.is_some() {
        stat(Trigger::Drift, e.stats.drift, e.drift_pairs >= min_requests);
    }
    if let (Some(n), Some(streak)) = (rules.health_failures, e.health_failing_streak) {
        out.push(RuleProgress {
            rule: Trigger::HealthFailures,
            ratio: f64::from(streak) / f64::from(n.max(1)),
            statistic: f64::from(streak),
            threshold: f64::from(n),
            ready: true,
        });
    }
    if let Some(s) = &rules.safety_violations {
        let limit = (s.max + 1) as f64;
        out.push(RuleProgress {
            rule: Trigger::SafetyViolations,
            ratio: e.safety_flagged as f64 / limit,
            statistic: e.safety_flagged as f64,
            threshold: limit,
            ready: true,
        });
    }
    out
}

/// Applies every enabled rule in a fixed order; the first that trips decides.
///
/// A statistical rule trips when its detector's statistic reaches the threshold and its
/// gates are open: the candidate answered `min_requests` since its detectors began, and for
/// comparative rules the baseline did too; `error_rate_ratio` also needs its effect floor
/// (`min_error_rate`) established by a detector of its own. Gates only withhold trips, so
/// they keep the false-alarm guarantee of [`super::detector`].
pub fn decide(e: &Evidence, rules: &Rules, min_requests: u64, confidence: f64) -> Verdict {
    let trip = |trigger, reason: String| Verdict::Trip { trigger, reason };
    let c = &e.candidate;
    let b = &e.baseline;
    let thr = e.log_threshold;
    let note = |out: &mut String, stat: f64| {
        let _ = write!(
            out,
            ", evidence ln {stat:.1} >= {thr:.1}, n={}/{}, confidence {confidence})",
            c.requests, b.requests
        );
    };

    // Rules that need no statistics.
    if let (Some(n), Some(streak)) = (rules.health_failures, e.health_failing_streak) {
        if streak >= n.max(1) {
            return trip(
                Trigger::HealthFailures,
                format!("every endpoint failed {streak} consecutive health checks (limit {n})"),
            );
        }
    }
    if let Some(s) = &rules.safety_violations {
        if e.safety_flagged > s.max {
            return trip(
                Trigger::SafetyViolations,
                format!(
                    "{} responses flagged by {} within {:?} (max {})",
                    e.safety_flagged, s.header, s.per, s.max
                ),
            );
        }
    }
    if let Some(d) = &rules.drift {
        if e.drift_pairs >= min_requests && e.stats.drift >= thr {
            return trip(
                Trigger::Drift,
                format!(
                    "{} is distributed differently from the baseline's (sequential two-sample test betting on the Kolmogorov-Smirnov distance, {} time-aligned pairs, evidence ln {:.1} >= {thr:.1}, confidence {confidence})",
                    d.signal, e.drift_pairs, e.stats.drift
                ),
            );
        }
    }

    if e.candidate_answered < min_requests {
        return Verdict::Healthy;
    }
    let both = e.baseline_answered >= min_requests;

    if let Some(max) = rules.error_rate_max {
        if e.stats.error_rate_max >= thr {
            let mut r = format!(
                "error rate {:.1}% > max {:.1}% (sequential test",
                100.0 * c.error_rate(),
                100.0 * max
            );
            note(&mut r, e.stats.error_rate_max);
            return trip(Trigger::ErrorRateMax, r);
        }
    }
    if let (Some(k), true) = (rules.error_rate_ratio, both) {
        let floor = rules
            .min_error_rate
            .is_none_or(|_| e.stats.min_error_rate >= thr && e.floor_met);
        if e.stats.error_rate_ratio >= thr && floor {
            let (rc, rb) = (c.error_rate(), b.error_rate());
            let x = if rb > 0.0 {
                format!("{:.1}x", rc / rb)
            } else {
                "inf".to_string()
            };
            let mut r = format!(
                "error rate {:.1}% vs baseline {:.1}% ({x} > {k}x",
                100.0 * rc,
                100.0 * rb
            );
            if let Some(m) = rules.min_error_rate {
                let _ = write!(r, ", above the {:.1}% floor", 100.0 * m);
            }
            note(&mut r, e.stats.error_rate_ratio);
            return trip(Trigger::ErrorRateRatio, r);
        }
    }
    if let Some(max) = rules.latency_p99_max {
        if e.stats.latency_p99_max >= thr {
            let mut r = format!(
                "time-to-first-byte p99 {:.0}ms > max {:.0}ms (more than 1% of requests over",
                ms(e.candidate_p99),
                ms(max),
            );
            note(&mut r, e.stats.latency_p99_max);
            return trip(Trigger::LatencyP99Max, r);
        }
    }
    if let (Some(k), true) = (rules.latency_p99_ratio, both) {
        if e.stats.latency_p99_ratio >= thr {
            let mut r = format!(
                "time-to-first-byte p99 {:.0}ms vs baseline {:.0}ms (> {k}x: more than 1% of requests over {:.0}ms",
                ms(e.candidate_p99),
                ms(e.baseline_p99),
                ms(e.baseline_p99) * k
            );
            note(&mut r, e.stats.latency_p99_ratio);
            return trip(Trigger::LatencyP99Ratio, r);
        }
    }
    if let Some(drop) = rules.accuracy_drop {
        if e.candidate_feedback >= min_requests
            && e.baseline_feedback >= min_requests
            && e.stats.accuracy_drop >= thr
        {
            let acc = |s: &Side| {
                if s.feedback == 0 {
                    f64::NAN
                } else {
                    1.0 - s.incorrect as f64 / s.feedback as f64
                }
            };
            return trip(
                Trigger::AccuracyDrop,
                format!(
                    "accuracy {:.1}% vs baseline {:.1}% (feedback since the comparison began; tested against the baseline's recent rate, drop > {:.1} points, feedback n={}/{} since start, evidence ln {:.1} >= {thr:.1}, confidence {confidence})",
                    100.0 * acc(c),
                    100.0 * acc(b),
                    100.0 * drop,
                    e.candidate_feedback,
                    e.baseline_feedback,
                    e.stats.accuracy_drop
                ),
            );
        }
    }
    Verdict::Healthy
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DriftRule, SafetyRule};

    const THR: f64 = 16.0;

    fn rules() -> Rules {
        Rules {
            error_rate_ratio: Some(2.0),
            min_error_rate: Some(0.005),
            error_rate_max: Some(0.05),
            latency_p99_max: Some(Duration::from_millis(500)),
            latency_p99_ratio: Some(1.5),
            health_failures: Some(3),
            accuracy_drop: Some(0.05),
            drift: None,
            safety_violations: None,
        }
    }

    fn evidence(answered: (u64, u64)) -> Evidence {
        Evidence {
            candidate: Side {
                requests: 412,
                errors: 33,
                ..Side::default()
            },
            baseline: Side {
                requests: 7830,
                errors: 157,
                ..Side::default()
            },
            candidate_answered: answered.0,
            baseline_answered: answered.1,
            floor_met: true,
            log_threshold: THR,
            ..Evidence::default()
        }
    }

    fn trigger(v: Verdict) -> Option<Trigger> {
        match v {
            Verdict::Healthy => None,
            Verdict::Trip { trigger, .. } => Some(trigger),
        }
    }

    #[test]
    fn statistics_below_the_threshold_stay_healthy() {
        let mut e = evidence((10_000, 10_000));
        e.stats.error_rate_ratio = THR - 0.1;
        e.stats.min_error_rate = 100.0;
        assert_eq!(decide(&e, &rules(), 50, 0.99), Verdict::Healthy);
    }

    #[test]
    fn too_few_requests_never_trip_statistical_rules() {
        let mut e = evidence((49, 10_000));
        e.stats.error_rate_max = 100.0;
        e.stats.error_rate_ratio = 100.0;
        e.stats.min_error_rate = 100.0;
        assert_eq!(decide(&e, &rules(), 50, 0.99), Verdict::Healthy);
        // The ratio rule needs the baseline's min_requests too.
        let mut e = evidence((10_000, 49));
        e.stats.error_rate_ratio = 100.0;
        e.stats.min_error_rate = 100.0;
        assert_eq!(decide(&e, &rules(), 50, 0.99), Verdict::Healthy);
    }

    #[test]
    fn the_ratio_rule_needs_its_effect_floor_and_says_why_it_tripped() {
        let mut e = evidence((10_000, 10_000));
        e.stats.error_rate_ratio = 20.0;
        e.stats.min_error_rate = 3.0; // not shown to be above 0.5 % yet
        assert_eq!(decide(&e, &rules(), 50, 0.99), Verdict::Healthy);
        let p = progress(&e, &rules(), 50);
        let ratio = p
            .iter()
            .find(|p| p.rule == Trigger::ErrorRateRatio)
            .unwrap();
        assert!((ratio.ratio - 3.0 / THR).abs() < 1e-9, "{ratio:?}");
        e.stats.min_error_rate = 30.0;
        // Established once, but the window's rate is below the floor now: no trip.
        e.floor_met = false;
        assert_eq!(decide(&e, &rules(), 50, 0.99), Verdict::Healthy);
        e.floor_met = true;
        match decide(&e, &rules(), 50, 0.99) {
            Verdict::Trip { trigger, reason } => {
                assert_eq!(trigger, Trigger::ErrorRateRatio);
                assert!(
                    reason.contains("8.0% vs baseline 2.0%") && reason.contains("n=412/7830"),
                    "{reason}"
                );
            }
            v => panic!("{v:?}"),
        }
        let mut r = rules();
        r.min_error_rate = None;
        e.stats.min_error_rate = 0.0;
        assert_eq!(
            trigger(decide(&e, &r, 50, 0.99)),
            Some(Trigger::ErrorRateRatio)
        );
    }

    #[test]
    fn each_statistical_rule_trips_on_its_own_statistic() {
        for (set, want) in [
            (
                (|s: &mut Statistics| s.error_rate_max = THR) as fn(&mut Statistics),
                Trigger::ErrorRateMax,
            ),
            (|s| s.latency_p99_max = THR, Trigger::LatencyP99Max),
            (|s| s.latency_p99_ratio = THR, Trigger::LatencyP99Ratio),
        ] {
            let mut e = evidence((1000, 1000));
            set(&mut e.stats);
            assert_eq!(trigger(decide(&e, &rules(), 50, 0.99)), Some(want));
        }
        let mut e = evidence((1000, 1000));
        e.stats.accuracy_drop = THR;
        assert_eq!(
            trigger(decide(&e, &rules(), 50, 0.99)),
            None,
            "no feedback yet"
        );
        e.candidate_feedback = 50;
        e.baseline_feedback = 50;
        assert_eq!(
            trigger(decide(&e, &rules(), 50, 0.99)),
            Some(Trigger::AccuracyDrop)
        );
    }

    #[test]
    fn health_safety_and_drift_need_no_requests() {
        let mut e = evidence((0, 0));
        e.health_failing_streak = Some(3);
        assert_eq!(
            trigger(decide(&e, &rules(), 50, 0.99)),
            Some(Trigger::HealthFailures)
        );
        e.health_failing_streak = Some(2);
        assert_eq!(trigger(decide(&e, &rules(), 50, 0.99)), None);

        let mut r = rules();
        r.safety_violations = Some(SafetyRule {
            header: http::HeaderName::from_static("x-flagged"),
            max: 5,
            per: Duration::from_secs(60),
        });
        e.safety_flagged = 6;
        assert_eq!(
            trigger(decide(&e, &r, 50, 0.99)),
            Some(Trigger::SafetyViolations)
        );
        e.safety_flagged = 0;
        r.drift = Some(DriftRule {
            signal: crate::config::Signal::Header(http::HeaderName::from_static("x-score")),
            p_value: 0.05,
            consecutive: 3,
        });
        e.stats.drift = THR;
        assert_eq!(trigger(decide(&e, &r, 50, 0.99)), None, "too few pairs");
        e.drift_pairs = 50;
        assert_eq!(trigger(decide(&e, &r, 50, 0.99)), Some(Trigger::Drift));
    }

    #[test]
    fn disabled_rules_never_trip() {
        let off = Rules {
            error_rate_ratio: None,
            min_error_rate: None,
            error_rate_max: None,
            latency_p99_max: None,
            latency_p99_ratio: None,
            health_failures: None,
            accuracy_drop: None,
            drift: None,
            safety_violations: None,
        };
        let mut e = evidence((1000, 1000));
        e.health_failing_streak = Some(100);
        e.stats = Statistics {
            error_rate_max: 99.0,
            error_rate_ratio: 99.0,
            min_error_rate: 99.0,
            latency_p99_max: 99.0,
            latency_p99_ratio: 99.0,
            accuracy_drop: 99.0,
            drift: 99.0,
        };
        assert_eq!(decide(&e, &off, 50, 0.99), Verdict::Healthy);
        assert!(progress(&e, &off, 50).is_empty());
    }
}
