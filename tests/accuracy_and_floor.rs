//! The accuracy null with thin or sparse feedback, and the min_error_rate floor after a
//! change of regime: scenarios a second hostile review found (each failed before its fix).
//! Run: cargo test --release --test accuracy_and_floor -- --nocapture

use rollgate::config::{Config, EvaluatorConfig};
use rollgate::evaluator::detector::log_threshold;
use rollgate::evaluator::rules::{decide, Trigger, Verdict};
use rollgate::evaluator::{Comparison, Tick};

fn ev(rules: &str) -> EvaluatorConfig {
    let yaml = format!(
        "versions:\n  a: {{endpoints: [\"http://127.0.0.1:1\"]}}\n  b: {{endpoints: [\"http://127.0.0.1:2\"]}}\n\
         routes:\n  - {{name: r, match: {{path_prefix: /}}, baseline: a, split: {{a: 50, b: 50}}}}\n\
         evaluator: {{interval: 100ms, min_requests: 50, confidence: 0.99, rules: {rules}}}\n"
    );
    Config::from_str(&yaml, std::path::Path::new("t.yaml"))
        .unwrap()
        .evaluator
}

fn binomial(rng: &mut fastrand::Rng, n: u64, p: f64) -> u64 {
    (0..n).filter(|_| rng.f64() < p).count() as u64
}

/// Fix (1) replaced the accuracy null's reference (the baseline's incorrect rate since the
/// comparison began: accurate after a while) by a plug-in estimate decayed over `window`
/// (30 s), usable from 20 effective items. With sparse feedback (1 item/s per side, which
/// is what clients posting /api/v1/feedback typically give), the reference has ~60
/// effective items: its noise (sd ~5.5 points at 25 % wrong) is the size of the
/// `accuracy_drop` margin (5 points), so the null `θ0 = p̂_base + 0.05` sits *below* the
/// candidate's true rate a large share of the time, and the e-process is no longer a
/// supermartingale. Candidate and baseline are identical (75 % accurate at every instant):
/// any rollback is false. The guarantee is <= 0.01 per candidate-day.
fn accuracy_false_rollbacks(days: u64, cand_fb: f64, base_fb: f64, wrong: f64) -> (u64, f64, f64) {
    let ev = ev("{error_rate_ratio: null, error_rate_max: null, latency_p99_max: null, latency_p99_ratio: null, accuracy_drop: 0.05}");
    let thr = log_threshold(ev.confidence, ev.interval);
    let mut trips = 0u64;
    let mut max_stat = f64::NEG_INFINITY;
    for seed in 0..days {
        let mut rng = fastrand::Rng::with_seed(100 + seed);
        let mut cmp = Comparison::default();
        for _ in 0..(24 * 36_000u64) {
            // per 100 ms: feedback items a side with probability cand_fb / base_fb.
            let cf = binomial(&mut rng, 1, cand_fb);
            let bf = binomial(&mut rng, 1, base_fb);
            let tick = Tick {
                candidate_answered: 10,
                baseline_answered: 10,
                candidate_feedback: cf,
                candidate_incorrect: binomial(&mut rng, cf, wrong),
                baseline_feedback: bf,
                baseline_incorrect: binomial(&mut rng, bf, wrong),
                ..Tick::default()
            };
            cmp.observe(&ev, &tick);
            max_stat = max_stat.max(cmp.statistics().accuracy_drop);
            if let Verdict::Trip { trigger, .. } = decide(
                &cmp.evidence(thr),
                &ev.rules,
                ev.min_requests,
                ev.confidence,
            ) {
                assert_eq!(trigger, Trigger::AccuracyDrop);
                trips += 1;
                cmp = Comparison::default();
            }
        }
    }
    (trips, max_stat, thr)
}

/// 1 feedback item/s a side, 25 % wrong on both.
#[test]
fn accuracy_drop_false_alarm_rate_with_sparse_feedback() {
    let days = 10;
    let (trips, max_stat, thr) = accuracy_false_rollbacks(days, 0.1, 0.1, 0.25);
    eprintln!("accuracy_drop (1/s a side, 25 % wrong): {trips} false rollbacks in {days} candidate-days; highest ln M {max_stat:.1} vs threshold {thr:.1}");
    assert!(
        trips == 0,
        "{trips} false rollbacks in {days} healthy candidate-days"
    );
}

/// A late rollout step (candidate 90 %, baseline 10 %): candidate 6 feedback items/s,
/// baseline 0.7/s (n_eff ~ 42, just above the 20 the null needs), 40 % wrong on both.
#[test]
fn accuracy_drop_false_alarm_rate_with_a_thin_baseline() {
    let days = 10;
    let (trips, max_stat, thr) = accuracy_false_rollbacks(days, 0.6, 0.07, 0.40);
    eprintln!("accuracy_drop (cand 6/s, base 0.7/s, 40 % wrong): {trips} false rollbacks in {days} candidate-days; highest ln M {max_stat:.1} vs threshold {thr:.1}");
    assert!(
        trips as f64 / days as f64 <= 0.05,
        "{trips} false rollbacks in {days} healthy candidate-days (guarantee <= 0.01/day)"
    );
}

/// The cap's purpose (SPEC §5: `error_rate_ratio` never trips while the candidate is below
/// `min_error_rate`): bench D measured it *before* the cap (200/200 rollbacks). After the
/// cap, the floor detector still needs minutes to fall from cap to threshold, while the
/// ratio detector (0.4 % vs 0.1 %: 4x > 2x) gathers its evidence: is a candidate below the
/// floor still rolled back after a change of regime?
#[test]
fn floor_after_a_change_of_regime_with_the_cap() {
    let ev = ev("{error_rate_ratio: 2.0, min_error_rate: 0.005, error_rate_max: null, latency_p99_max: null, latency_p99_ratio: null, accuracy_drop: null}");
    let thr = log_threshold(ev.confidence, ev.interval);
    let runs = 40u64;
    let mut rolled = Vec::new();
    for seed in 0..runs {
        let mut rng = fastrand::Rng::with_seed(7_000 + seed);
        let mut cmp = Comparison::default();
        let mut step = |rng: &mut fastrand::Rng, c_err: f64, b_err: f64| {
            // 50 canary req/s, 950 baseline req/s.
            let tick = Tick {
                candidate_answered: 5,
                candidate_errors: binomial(rng, 5, c_err),
                baseline_answered: 95,
                baseline_errors: binomial(rng, 95, b_err),
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
        for _ in 0..36_000 {
            assert_eq!(step(&mut rng, 0.02, 0.02), Verdict::Healthy);
        }
        for t in 0..36_000u64 {
            if step(&mut rng, 0.004, 0.001) != Verdict::Healthy {
                rolled.push(t as f64 / 10.0);
                break;
            }
        }
    }
    eprintln!(
        "candidate at 0.4 % (floor 0.5 %) after 1 h at 2 %: rolled back in {}/{runs} runs, after {:?} s",
        rolled.len(),
        rolled
    );
    assert!(
        rolled.is_empty(),
        "error_rate_ratio tripped below min_error_rate in {}/{runs} runs",
        rolled.len()
    );
}
