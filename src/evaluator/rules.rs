//! The pure decision: given what was measured about a candidate and its baseline, does a
//! rule trip? No clocks, no sockets, no locks: unit-tested directly.

use std::fmt::Write as _;
use std::time::Duration;

use super::stats;
use crate::config::Rules;

/// Rule names: the trigger names of audit records and metrics (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
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

/// One side's counts over the current test epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Side {
    /// Answered requests (success, error, 4xx); aborts and refusals never count.
    pub requests: u64,
    pub errors: u64,
    /// Feedback received and how much of it said "incorrect".
    pub feedback: u64,
    pub incorrect: u64,
}

/// Everything [`decide`] looks at for one (candidate, baseline) pair.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    pub candidate: Side,
    pub baseline: Side,
    /// Candidate requests of the epoch whose time to first byte exceeded `latency_p99_max`.
    pub over_sla: u64,
    /// Candidate requests of the epoch above `latency_p99_ratio × baseline p99`, when the
    /// baseline has enough requests to estimate its p99.
    pub over_baseline_p99: Option<u64>,
    /// Window p99 of time to first byte, for the reason text.
    pub candidate_p99: Duration,
    pub baseline_p99: Duration,
    /// Smallest consecutive-failure count over the candidate's endpoints (all failing ≥ this).
    pub health_failing_streak: Option<u32>,
    /// Consecutive drift checks with p below the rule's p-value, and the last p.
    pub drift_streak: u32,
    pub drift_p: f64,
    /// Guardrail-flagged responses over the rule's period.
    pub safety_flagged: u64,
    /// Level of this epoch's tests ([`stats::epoch_alpha`]).
    pub alpha: f64,
}

/// What [`decide`] concluded.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Healthy,
    Trip { trigger: Trigger, reason: String },
}

/// Applies every enabled rule in a fixed order; the first that trips decides.
pub fn decide(e: &Evidence, rules: &Rules, min_requests: u64, confidence: f64) -> Verdict {
    let trip = |trigger, reason: String| Verdict::Trip { trigger, reason };
    let c = &e.candidate;
    let b = &e.baseline;
    let rate = |s: &Side| {
        if s.requests == 0 {
            0.0
        } else {
            s.errors as f64 / s.requests as f64
        }
    };
    let n_note = |out: &mut String| {
        let _ = write!(
            out,
            ", n={}/{}, confidence {confidence})",
            c.requests, b.requests
        );
    };

    // Rules that need no statistics.
    if let (Some(n), Some(streak)) = (rules.health_failures, e.health_failing_streak) {
        if streak >= n {
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
        if e.drift_streak >= d.consecutive {
            return trip(
                Trigger::Drift,
                format!(
                    "{} differs from the baseline (Kolmogorov-Smirnov p={:.2e} < {} for {} consecutive checks)",
                    d.signal, e.drift_p, d.p_value, e.drift_streak
                ),
            );
        }
    }

    if c.requests < min_requests {
        return Verdict::Healthy;
    }
    let both = b.requests >= min_requests;

    if let Some(max) = rules.error_rate_max {
        if stats::rejects(c.errors, c.requests, max, e.alpha) {
            let mut r = format!(
                "error rate {:.1}% > max {:.1}% (sequential test",
                100.0 * rate(c),
                100.0 * max
            );
            n_note(&mut r);
            return trip(Trigger::ErrorRateMax, r);
        }
    }
    if let (Some(k), true) = (rules.error_rate_ratio, both) {
        let theta0 = stats::ratio_theta0(k, c.requests, b.requests);
        if stats::rejects(c.errors, c.errors + b.errors, theta0, e.alpha) {
            let (rc, rb) = (rate(c), rate(b));
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
            n_note(&mut r);
            return trip(Trigger::ErrorRateRatio, r);
        }
    }
    if let Some(max) = rules.latency_p99_max {
        if stats::rejects(e.over_sla, c.requests, 0.01, e.alpha) {
            let mut r = format!(
                "time-to-first-byte p99 {:.0}ms > max {:.0}ms ({} of {} requests over",
                ms(e.candidate_p99),
                ms(max),
                e.over_sla,
                c.requests
            );
            n_note(&mut r);
            return trip(Trigger::LatencyP99Max, r);
        }
    }
    if let (Some(k), Some(over), true) = (rules.latency_p99_ratio, e.over_baseline_p99, both) {
        if stats::rejects(over, c.requests, 0.01, e.alpha) {
            let mut r = format!(
                "time-to-first-byte p99 {:.0}ms vs baseline {:.0}ms (> {k}x; {over} of {} requests over {:.0}ms",
                ms(e.candidate_p99),
                ms(e.baseline_p99),
                c.requests,
                ms(e.baseline_p99) * k
            );
            n_note(&mut r);
            return trip(Trigger::LatencyP99Ratio, r);
        }
    }
    if let Some(drop) = rules.accuracy_drop {
        if c.feedback >= min_requests && b.feedback >= min_requests {
            // Plug-in null: candidate incorrect rate ≤ baseline's + drop.
            let base_wrong = b.incorrect as f64 / b.feedback as f64;
            let theta0 = (base_wrong + drop).min(0.999);
            if stats::rejects(c.incorrect, c.feedback, theta0, e.alpha) {
                let acc = |s: &Side| 1.0 - s.incorrect as f64 / s.feedback as f64;
                return trip(
                    Trigger::AccuracyDrop,
                    format!(
                        "accuracy {:.1}% vs baseline {:.1}% (drop > {:.1} points, feedback n={}/{}, confidence {confidence})",
                        100.0 * acc(c),
                        100.0 * acc(b),
                        100.0 * drop,
                        c.feedback,
                        b.feedback
                    ),
                );
            }
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

    fn rules() -> Rules {
        Rules {
            error_rate_ratio: Some(2.0),
            error_rate_max: Some(0.05),
            latency_p99_max: Some(Duration::from_millis(500)),
            latency_p99_ratio: Some(1.5),
            health_failures: Some(3),
            accuracy_drop: Some(0.05),
            drift: None,
            safety_violations: None,
        }
    }

    fn evidence(c: (u64, u64), b: (u64, u64)) -> Evidence {
        Evidence {
            candidate: Side {
                requests: c.0,
                errors: c.1,
                ..Side::default()
            },
            baseline: Side {
                requests: b.0,
                errors: b.1,
                ..Side::default()
            },
            over_baseline_p99: Some(0),
            alpha: 0.01,
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
    fn too_few_requests_never_trip_statistical_rules() {
        let e = evidence((49, 49), (10_000, 0));
        assert_eq!(decide(&e, &rules(), 50, 0.99), Verdict::Healthy);
    }

    #[test]
    fn equal_rates_stay_healthy() {
        let e = evidence((500, 10), (9500, 190));
        assert_eq!(decide(&e, &rules(), 50, 0.99), Verdict::Healthy);
    }

    #[test]
    fn quadrupled_error_rate_trips_the_ratio_rule_with_a_reason() {
        let mut r = rules();
        r.error_rate_max = None;
        // SPEC §7's example at 412 requests sits right at the 0.99 boundary (ln L = 4.56 vs
        // ln 100 = 4.61); a little more traffic at the same rates settles it.
        let e = evidence((600, 48), (7830, 157));
        match decide(&e, &r, 50, 0.99) {
            Verdict::Trip { trigger, reason } => {
                assert_eq!(trigger, Trigger::ErrorRateRatio);
                assert!(
                    reason.contains("vs baseline 2.0%") && reason.contains("n=600/7830"),
                    "{reason}"
                );
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn absolute_error_rate_needs_no_baseline() {
        let e = evidence((400, 80), (0, 0));
        assert_eq!(
            trigger(decide(&e, &rules(), 50, 0.99)),
            Some(Trigger::ErrorRateMax)
        );
        // The ratio rule needs the baseline's min_requests too.
        let mut r = rules();
        r.error_rate_max = None;
        assert_eq!(trigger(decide(&e, &r, 50, 0.99)), None);
    }

    #[test]
    fn latency_rules() {
        let mut e = evidence((400, 0), (4000, 0));
        e.over_sla = 40; // 10 % over the SLA
        e.candidate_p99 = Duration::from_millis(900);
        assert_eq!(
            trigger(decide(&e, &rules(), 50, 0.99)),
            Some(Trigger::LatencyP99Max)
        );
        e.over_sla = 0;
        e.over_baseline_p99 = Some(60);
        assert_eq!(
            trigger(decide(&e, &rules(), 50, 0.99)),
            Some(Trigger::LatencyP99Ratio)
        );
        e.over_baseline_p99 = Some(4); // 1 %: what a p99 means
        assert_eq!(trigger(decide(&e, &rules(), 50, 0.99)), None);
    }

    #[test]
    fn health_safety_and_drift_need_no_traffic() {
        let mut e = evidence((0, 0), (0, 0));
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
        e.drift_streak = 3;
        e.drift_p = 1e-5;
        assert_eq!(trigger(decide(&e, &r, 50, 0.99)), Some(Trigger::Drift));
    }

    #[test]
    fn disabled_rules_never_trip() {
        let off = Rules {
            error_rate_ratio: None,
            error_rate_max: None,
            latency_p99_max: None,
            latency_p99_ratio: None,
            health_failures: None,
            accuracy_drop: None,
            drift: None,
            safety_violations: None,
        };
        let mut e = evidence((1000, 1000), (1000, 0));
        e.health_failing_streak = Some(100);
        e.over_sla = 1000;
        assert_eq!(decide(&e, &off, 50, 0.99), Verdict::Healthy);
    }

    #[test]
    fn accuracy_drop_compares_feedback() {
        let mut e = evidence((1000, 0), (1000, 0));
        e.candidate.feedback = 400;
        e.candidate.incorrect = 120; // 70 % accurate
        e.baseline.feedback = 400;
        e.baseline.incorrect = 40; // 90 % accurate
        assert_eq!(
            trigger(decide(&e, &rules(), 50, 0.99)),
            Some(Trigger::AccuracyDrop)
        );
        e.candidate.incorrect = 44;
        assert_eq!(trigger(decide(&e, &rules(), 50, 0.99)), None);
    }
}
