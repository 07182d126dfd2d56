//! The e-detectors as wired in `Comparison` and `decide`: scenarios a hostile review found
//! (each failed before its fix).
//! Run: cargo test --release --test detector_regressions -- --nocapture

use rollgate::config::{Config, EvaluatorConfig};
use rollgate::evaluator::detector::log_threshold;
use rollgate::evaluator::rules::{decide, progress, Trigger, Verdict};
use rollgate::evaluator::{Comparison, Tick};

fn ev(rules: &str) -> EvaluatorConfig {
    let yaml = format!(
        "versions:\n  a: {{endpoints: [\"http://127.0.0.1:1\"]}}\n  b: {{endpoints: [\"http://127.0.0.1:2\"]}}\n\
         routes:\n  - {{name: r, match: {{path_prefix: /}}, baseline: a, split: {{a: 95, b: 5}}}}\n\
         evaluator: {{interval: 100ms, min_requests: 50, confidence: 0.99, rules: {rules}}}\n"
    );
    Config::from_str(&yaml, std::path::Path::new("t.yaml"))
        .unwrap()
        .evaluator
}

fn binomial(rng: &mut fastrand::Rng, n: u64, p: f64) -> u64 {
    (0..n).filter(|_| rng.f64() < p).count() as u64
}

/// `min_error_rate: 0` (validated: the bound is [0, 1)) reads as "no effect floor". The
/// floor detector then gets theta0 = 0, which `Bernoulli::observe` treats as "nothing to
/// learn": its statistic only grows as ln(#starts) and reaches the threshold after
/// ~100 days. Until then error_rate_ratio can never trip: a canary at 50 % errors against
/// a 2 % baseline is kept for 10 simulated minutes.
#[test]
fn min_error_rate_zero_is_no_floor() {
    let ev = ev("{error_rate_ratio: 2.0, min_error_rate: 0, error_rate_max: null, latency_p99_max: null, latency_p99_ratio: null, accuracy_drop: null}");
    let thr = log_threshold(ev.confidence, ev.interval);
    let mut rng = fastrand::Rng::with_seed(1);
    let mut cmp = Comparison::default();
    let mut tripped = None;
    for t in 0..6000u64 {
        let (c, b) = (5, 95);
        let tick = Tick {
            candidate_answered: c,
            candidate_errors: binomial(&mut rng, c, 0.5),
            baseline_answered: b,
            baseline_errors: binomial(&mut rng, b, 0.02),
            ..Tick::default()
        };
        cmp.observe(&ev, &tick);
        if decide(
            &cmp.evidence(thr),
            &ev.rules,
            ev.min_requests,
            ev.confidence,
        ) != Verdict::Healthy
        {
            tripped = Some(t);
            break;
        }
    }
    let s = cmp.statistics();
    eprintln!(
        "ratio ln {:.1}, floor ln {:.1}, threshold {thr:.1}",
        s.error_rate_ratio, s.min_error_rate
    );
    assert!(
        tripped.is_some(),
        "50% vs 2% errors for 10 min never tripped error_rate_ratio with min_error_rate: 0 (ratio ln {:.1}, floor ln {:.1} >= {thr:.1}?)",
        s.error_rate_ratio, s.min_error_rate
    );
}

/// `accuracy_drop`'s null uses the baseline's incorrect rate *cumulated since the
/// comparison began* (never time-aligned, never forgotten). After 6 healthy hours at 95 %
/// accuracy on both sides, the input mix shifts and *both* versions drop to 85 % (the
/// candidate is exactly as good as the baseline at every instant: the null holds). The
/// baseline's reference stays near 94-95 %, so the candidate is rolled back by
/// accuracy_drop (on by default, 0.05). Feedback on 5 % of 1,000 req/s, 5 % canary.
#[test]
fn accuracy_drop_ignores_a_shift_of_both_versions_after_hours() {
    let ev = ev("{error_rate_ratio: null, error_rate_max: null, latency_p99_max: null, latency_p99_ratio: null, accuracy_drop: 0.05}");
    let thr = log_threshold(ev.confidence, ev.interval);
    let mut rng = fastrand::Rng::with_seed(3);
    let mut cmp = Comparison::default();
    let mut step = |rng: &mut fastrand::Rng, wrong: f64| {
        // per 100 ms: candidate 5 req, baseline 95 req, 5 % get feedback
        let cf = binomial(rng, 5, 0.05);
        let bf = binomial(rng, 95, 0.05);
        let tick = Tick {
            candidate_answered: 5,
            baseline_answered: 95,
            candidate_feedback: cf,
            candidate_incorrect: binomial(rng, cf, wrong),
            baseline_feedback: bf,
            baseline_incorrect: binomial(rng, bf, wrong),
            ..Tick::default()
        };
        cmp.observe(&ev, &tick);
        decide(
            &cmp.evidence(thr),
            &ev.rules,
            ev.min_requests,
            ev.confidence,
        )
    };
    for _ in 0..(6 * 36_000) {
        assert_eq!(
            step(&mut rng, 0.05),
            Verdict::Healthy,
            "false alarm in the stationary phase"
        );
    }
    let mut after = None;
    for t in 0..(2 * 36_000u64) {
        if let Verdict::Trip { trigger, reason } = step(&mut rng, 0.15) {
            after = Some((t, trigger, reason));
            break;
        }
    }
    assert!(
        after.is_none(),
        "rolled back although candidate accuracy == baseline accuracy at every instant: {after:?}"
    );
}

/// With no traffic at all, every statistic grows as ln(#starts): after one idle hour the
/// `rollgate_evidence_ratio` / status "distance to rollback" shows ~50 % of the way to a
/// rollback for a candidate that has served nothing; after a week, ~83 %.
#[test]
fn an_idle_candidate_shows_no_evidence_however_long_it_waits() {
    let ev = ev("{error_rate_ratio: 2.0, min_error_rate: 0.005, error_rate_max: 0.05, latency_p99_max: 500ms, latency_p99_ratio: 1.5, accuracy_drop: null}");
    let thr = log_threshold(ev.confidence, ev.interval);
    let mut cmp = Comparison::default();
    for _ in 0..36_000 {
        cmp.observe(&ev, &Tick::default());
    }
    let p = progress(&cmp.evidence(thr), &ev.rules, ev.min_requests);
    let max = p.iter().map(|p| p.ratio).fold(0.0, f64::max);
    eprintln!(
        "after 1 h without a single request: {:?}",
        p.iter().map(|p| (p.rule, p.ratio)).collect::<Vec<_>>()
    );
    assert!(
        max < 0.2,
        "an idle candidate shows {:.0}% of the way to rollback",
        max * 100.0
    );
    let _ = Trigger::ErrorRateMax;
}

/// A version kept pinnable at weight 0 for a week (a staged release), then given 5 % with
/// `weights`: its detectors kept every idle start, so the first ten minutes of traffic
/// carry the whole week's false-alarm budget. Candidate at exactly `error_rate_max` (inside
/// the null), fresh vs after a week idle.
#[test]
fn a_week_at_weight_zero_does_not_spend_the_false_alarm_budget() {
    let ev = ev("{error_rate_ratio: null, error_rate_max: 0.05, latency_p99_max: null, latency_p99_ratio: null, accuracy_drop: null}");
    let thr = log_threshold(ev.confidence, ev.interval);
    let mut idle = Comparison::default();
    for _ in 0..(7 * 24 * 36_000) {
        idle.observe(&ev, &Tick::default());
    }
    let runs = 300;
    let rate = |start: &Comparison, p: f64| {
        let mut trips = 0;
        for seed in 0..runs {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut cmp = start.clone();
            for _ in 0..6000 {
                let tick = Tick {
                    candidate_answered: 5,
                    candidate_errors: binomial(&mut rng, 5, p),
                    baseline_answered: 95,
                    ..Tick::default()
                };
                cmp.observe(&ev, &tick);
                if decide(
                    &cmp.evidence(thr),
                    &ev.rules,
                    ev.min_requests,
                    ev.confidence,
                ) != Verdict::Healthy
                {
                    trips += 1;
                    break;
                }
            }
        }
        trips as f64 / runs as f64
    };
    let (fresh, after_week) = (rate(&Comparison::default(), 0.05), rate(&idle, 0.05));
    eprintln!("P(false rollback in the first 10 min at exactly error_rate_max): fresh {fresh:.3}, after a week at weight 0 {after_week:.3}");
    assert!(
        after_week <= 0.01,
        "fresh {fresh:.3} vs after a week idle {after_week:.3}"
    );
}
