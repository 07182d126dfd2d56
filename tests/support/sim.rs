//! Simulated evaluator input for tests that drive `Comparison` and `decide` directly.

use rollgate::config::{Config, EvaluatorConfig};

/// The validated evaluator section of a two-version config with `rules` (flow style).
pub fn evaluator_config(rules: &str) -> EvaluatorConfig {
    let yaml = format!(
        "versions:\n  a: {{endpoints: [\"http://127.0.0.1:1\"]}}\n  b: {{endpoints: [\"http://127.0.0.1:2\"]}}\n\
         routes:\n  - {{name: r, match: {{path_prefix: /}}, baseline: a, split: {{a: 95, b: 5}}}}\n\
         evaluator: {{interval: 100ms, min_requests: 50, confidence: 0.99, rules: {rules}}}\n"
    );
    Config::from_str(&yaml, std::path::Path::new("t.yaml"))
        .unwrap()
        .evaluator
}

/// Binomial(n, p) by n Bernoulli draws (n is small per tick).
pub fn binomial(rng: &mut fastrand::Rng, n: u64, p: f64) -> u64 {
    (0..n).filter(|_| rng.f64() < p).count() as u64
}
