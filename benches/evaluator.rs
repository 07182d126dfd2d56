//! Evaluator benchmarks (not criterion: they print tables).
//!
//! 1. Simulation with fixed seeds, through the real `rules::decide` and epoch levels:
//!    false alarms of healthy canaries, and detection delay of error-rate and latency
//!    regressions at 50 and 500 canary requests per second (a 5 % canary: the baseline gets
//!    19x its traffic), evaluated every 100 ms.
//! 2. Trip-to-swap of the real rollback path (`Controller::rollback` on a compiled table),
//!    read from the audit records it writes.
//!
//! `cargo bench --bench evaluator` runs the full sizes; under `cargo test` (no `--bench`
//! argument) it runs a small smoke version so CI stays fast.

use std::sync::Arc;
use std::time::Duration;

use rollgate::config::{Config, Rules};
use rollgate::evaluator::rules::{decide, Evidence, Side, Trigger, Verdict};
use rollgate::evaluator::stats::epoch_alpha;

const TICK: f64 = 0.1;
const WINDOW_TICKS: u64 = 300; // 30 s
const MIN_REQUESTS: u64 = 50;
const CONFIDENCE: f64 = 0.99;

fn rules(error_ratio: f64, latency_ratio: Option<f64>) -> Rules {
    Rules {
        error_rate_ratio: Some(error_ratio),
        min_error_rate: Some(0.005),
        error_rate_max: None,
        latency_p99_max: None,
        latency_p99_ratio: latency_ratio,
        health_failures: None,
        accuracy_drop: None,
        drift: None,
        safety_violations: None,
    }
}

/// Standard normal by Box-Muller.
fn normal(rng: &mut fastrand::Rng) -> f64 {
    let u1 = rng.f64().max(1e-300);
    let u2 = rng.f64();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// One canary's run: returns the tick at which a rule tripped (and which), if any.
struct Scenario {
    canary_rps: f64,
    base_err: f64,
    cand_err: f64,
    /// Latency multiplier of the candidate (lognormal, sigma 0.5).
    cand_latency: f64,
    latency_ratio: Option<f64>,
    error_ratio: f64,
    seconds: f64,
}

fn run(s: &Scenario, seed: u64) -> Option<(u64, u64, Trigger)> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let r = rules(s.error_ratio, s.latency_ratio);
    let cand_per_tick = (s.canary_rps * TICK).round() as u64;
    let base_per_tick = cand_per_tick * 19;
    // The baseline's p99 of time to first byte (lognormal, mu 0, sigma 0.5), as the
    // evaluator would estimate it from its much larger sample.
    let sigma: f64 = 0.5;
    let base_p99 = (2.326 * sigma).exp();
    let mut epoch = 1u64;
    let (mut c, mut b, mut over) = (Side::default(), Side::default(), 0u64);
    let mut total_cand = 0u64;
    let ticks = (s.seconds / TICK) as u64;
    for t in 1..=ticks {
        for _ in 0..cand_per_tick {
            c.requests += 1;
            total_cand += 1;
            if rng.f64() < s.cand_err {
                c.errors += 1;
            }
            if let Some(k) = s.latency_ratio {
                let x = s.cand_latency * (sigma * normal(&mut rng)).exp();
                if x > k * base_p99 {
                    over += 1;
                }
            }
        }
        for _ in 0..base_per_tick {
            b.requests += 1;
            if rng.f64() < s.base_err {
                b.errors += 1;
            }
        }
        let e = Evidence {
            candidate: c,
            baseline: b,
            over_baseline_p99: s.latency_ratio.map(|_| over),
            alpha: epoch_alpha(1.0 - CONFIDENCE, epoch),
            ..Evidence::default()
        };
        if let Verdict::Trip { trigger, .. } = decide(&e, &r, MIN_REQUESTS, CONFIDENCE) {
            return Some((t, total_cand, trigger));
        }
        if t % WINDOW_TICKS == 0 {
            epoch += 1;
            c = Side::default();
            b = Side::default();
            over = 0;
        }
    }
    None
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn simulate(full: bool) {
    let canaries = if full { 1000 } else { 50 };
    println!("\n## Evaluator simulation ({canaries} canaries per row, 100 ms ticks, window 30 s, min_requests 50, confidence 0.99)\n");
    println!("| scenario | canary req/s | tripped | median delay (requests) | median delay (s) |");
    println!("|---|---:|---:|---:|---:|");
    // (name, baseline error rate, candidate error rate, latency factor, error ratio, latency ratio)
    type Row = (&'static str, f64, f64, f64, f64, Option<f64>);
    let rows: [Row; 5] = [
        (
            "healthy: 2 % vs 2 %, equal latency, 60 s",
            0.02,
            0.02,
            1.0,
            2.0,
            Some(1.5),
        ),
        (
            "error rate 2x (4 % vs 2 %), error_rate_ratio: 2.0 (the boundary)",
            0.02,
            0.04,
            1.0,
            2.0,
            None,
        ),
        (
            "error rate 2x (4 % vs 2 %), error_rate_ratio: 1.5",
            0.02,
            0.04,
            1.0,
            1.5,
            None,
        ),
        (
            "error rate 4x (8 % vs 2 %), error_rate_ratio: 2.0",
            0.02,
            0.08,
            1.0,
            2.0,
            None,
        ),
        (
            "p99 +50 %, latency_p99_ratio: 1.25",
            0.0,
            0.0,
            1.5,
            2.0,
            Some(1.25),
        ),
    ];
    for (name, base_err, cand_err, lat, error_ratio, ratio) in rows {
        for rps in [50.0, 500.0] {
            if !full && rps > 50.0 && name.starts_with("healthy") {
                continue;
            }
            let s = Scenario {
                canary_rps: rps,
                base_err,
                cand_err,
                cand_latency: lat,
                latency_ratio: ratio,
                error_ratio,
                seconds: 60.0,
            };
            let n = if name.starts_with("healthy") && rps > 50.0 {
                canaries / 4
            } else {
                canaries
            };
            let mut reqs = Vec::new();
            let mut secs = Vec::new();
            for seed in 0..n as u64 {
                if let Some((t, r, _)) = run(&s, 0x5eed_0000 + seed) {
                    reqs.push(r as f64);
                    secs.push(t as f64 * TICK);
                }
            }
            let tripped = reqs.len();
            println!(
                "| {name} | {rps:.0} | {tripped}/{n} ({:.1} %) | {:.0} | {:.1} |",
                100.0 * tripped as f64 / n as f64,
                median(&mut reqs),
                median(&mut secs)
            );
        }
    }
}

fn trip_to_swap(full: bool) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let n = if full { 200 } else { 10 };
        let mut us = Vec::new();
        for _ in 0..n {
            let dir = tempfile::tempdir().unwrap();
            let mut yaml = format!(
                "listen: 127.0.0.1:0\nstate_dir: \"{}\"\nversions:\n  base: {{endpoints: [\"http://127.0.0.1:9\"]}}\n",
                dir.path().display()
            );
            for i in 0..10 {
                yaml.push_str(&format!("  cand{i}: {{endpoints: [\"http://127.0.0.1:9\"]}}\n"));
            }
            yaml.push_str("routes:\n");
            for i in 0..10 {
                yaml.push_str(&format!(
                    "  - {{name: r{i}, match: {{path_prefix: /r{i}/}}, baseline: base, split: {{base: 95, cand{i}: 5}}}}\n"
                ));
            }
            let config = Config::from_str(&yaml, &dir.path().join("c.yaml")).unwrap();
            let telemetry = Arc::new(rollgate::telemetry::Telemetry::new(Duration::from_secs(30)));
            let metrics = Arc::new(rollgate::telemetry::prom::Metrics::new(telemetry.clone()));
            let store = Arc::new(
                rollgate::routing::store::Store::new(config, Default::default(), telemetry, metrics).unwrap(),
            );
            let audit = Arc::new(rollgate::control::audit::Audit::open(dir.path()).unwrap());
            let alerts = rollgate::control::alerts::Alerts::new().unwrap();
            let c = Arc::new(rollgate::evaluator::Controller::new(store, audit, alerts, dir.path().to_path_buf()));
            let handle = c
                .rollback("r3", &"cand3".into(), Trigger::Drill, "bench".into(), None, tokio::time::Instant::now(), Default::default())
                .await
                .unwrap();
            let rec = handle.await.unwrap().unwrap();
            us.push(rec["trip_to_swap_us"].as_u64().unwrap() as f64);
        }
        let p = |q: f64| {
            let mut v = us.clone();
            v.sort_by(f64::total_cmp);
            v[((v.len() - 1) as f64 * q) as usize]
        };
        println!("\n## Trip-to-swap (10 routes, 11 versions; from audit records, {n} rollbacks)\n");
        println!("| p50 µs | p99 µs | max µs |\n|---:|---:|---:|\n| {:.0} | {:.0} | {:.0} |", p(0.5), p(0.99), p(1.0));
    });
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    simulate(full);
    trip_to_swap(full);
}
