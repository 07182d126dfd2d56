//! Anytime-valid tests: checking every 100 ms must not inflate false alarms.
//!
//! # Method
//!
//! Every statistical rule reduces to one question about a Bernoulli rate: is `θ`, the
//! probability that an observation is "bad", above a null value `θ0`?
//!
//! - `error_rate_max`: observations are the candidate's answered requests, bad = error,
//!   `θ0 = error_rate_max`.
//! - `latency_p99_max`: bad = time to first byte above the SLA; "p99 above the SLA" is
//!   exactly "more than 1 % of requests above it", so `θ0 = 0.01`.
//! - `latency_p99_ratio`: bad = time to first byte above `ratio × baseline p99`, `θ0 = 0.01`
//!   (the baseline's p99 is a plug-in estimate from its larger sample).
//! - `error_rate_ratio` compares two rates. Following Lindon, Sanden and Shirikian (KDD 2022,
//!   "Rapid Regression Detection in Software Deployments through Sequential Testing"), we
//!   condition on errors: with `n_c`, `n_b` requests and rates `p_c`, `p_b`, each error is the
//!   candidate's with probability `θ = n_c p_c / (n_c p_c + n_b p_b)` (the Poisson
//!   approximation, tight for error rates of a few percent). `p_c ≤ k p_b` is
//!   `θ ≤ θ0 = k n_c / (k n_c + n_b)`, so the ratio test is again a one-sided Bernoulli test,
//!   on the sequence of errors.
//!
//! The test statistic is the mixture likelihood ratio (a mixture SPRT)
//!
//! ```text
//! L_n = ∫ θ^s (1-θ)^(n-s) dπ(θ)  /  θ0^s (1-θ0)^(n-s)
//! ```
//!
//! with `π` a Beta prior *truncated to (θ0, 1]*. For every `θ' ≤ θ0`, each factor
//! `f_θ(x)/f_θ0(x)` with `θ > θ0` has expectation `≤ 1` under `θ'`, so `L_n` is a
//! non-negative supermartingale under the whole composite null, and Ville's inequality gives
//! `P(∃n: L_n ≥ 1/α) ≤ α`. The rule trips when `L_n ≥ 1/α`: the bound holds however often it
//! is looked at, which is what lets the evaluator check every `interval`.
//!
//! With a conjugate prior, `L_n` has a closed form in the counts `(s, n)` only, using the
//! regularized incomplete beta function (statrs), so a check costs microseconds.
//!
//! # Guarantee
//!
//! For one candidate, the evaluator runs the test over consecutive *epochs* of `window`
//! (so a regression that starts late is not diluted by hours of healthy history), and the
//! `j`-th epoch (from 1) is tested at `α_j = α / (j (j+1))`. Since `Σ α_j = α`, the
//! probability that a healthy candidate is *ever* rolled back by a given rule is at most
//! `α = 1 - confidence`. The simulation bench (`benches/evaluator.rs`) measures it.

use statrs::function::beta::{beta_reg, ln_beta};

/// `ln L_n` of the truncated-Beta mixture SPRT for `bad` bad outcomes in `n`, against `θ0`.
///
/// The prior is Beta(a, b) with mean `m = min(2θ0, 0.5)` and standard deviation about `θ0`
/// before truncation (`a + b ≈ 2/θ0`, so `a ≈ 4`): its mass sits on regressions of the order
/// of a doubling, where power matters, without excluding larger ones.
pub fn log_mixture_lr(bad: u64, n: u64, theta0: f64) -> f64 {
    if n == 0 || !(theta0 > 0.0 && theta0 < 1.0) {
        return 0.0;
    }
    let s = bad.min(n) as f64;
    let f = (n - bad.min(n)) as f64;
    let m = (2.0 * theta0).min(0.5);
    let a = 4.0;
    let b = a * (1.0 - m) / m;
    // ∫_{θ0}^1 θ^(A-1) (1-θ)^(B-1) dθ = B(A,B) · I_{1-θ0}(B, A)
    let upper = |a: f64, b: f64| ln_beta(a, b) + beta_reg(b, a, 1.0 - theta0).ln();
    let num = upper(a + s, b + f);
    let prior_mass = upper(a, b);
    let null = s * theta0.ln() + f * (1.0 - theta0).ln();
    num - prior_mass - null
}

/// Does the evidence reject `θ ≤ θ0` at level `alpha`?
pub fn rejects(bad: u64, n: u64, theta0: f64, alpha: f64) -> bool {
    log_mixture_lr(bad, n, theta0) >= (1.0 / alpha).ln()
}

/// The level of epoch `j` (from 1): `α / (j (j+1))`, summing to `α` over all epochs.
pub fn epoch_alpha(alpha: f64, epoch: u64) -> f64 {
    let j = epoch.max(1) as f64;
    alpha / (j * (j + 1.0))
}

/// `θ0` for "candidate rate ≤ `ratio` × baseline rate", conditioning on errors.
pub fn ratio_theta0(ratio: f64, candidate_requests: u64, baseline_requests: u64) -> f64 {
    let c = ratio * candidate_requests as f64;
    c / (c + baseline_requests as f64)
}

/// Two-sample Kolmogorov-Smirnov test: the statistic `D` and its asymptotic p-value
/// (Kolmogorov distribution with the Stephens small-sample correction).
pub fn ks_two_sample(a: &mut [f64], b: &mut [f64]) -> (f64, f64) {
    if a.is_empty() || b.is_empty() {
        return (0.0, 1.0);
    }
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (n, m) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut d) = (0usize, 0usize, 0.0f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / n - j as f64 / m).abs());
    }
    let ne = n * m / (n + m);
    let lambda = (ne.sqrt() + 0.12 + 0.11 / ne.sqrt()) * d;
    (d, kolmogorov_q(lambda))
}

/// `Q_KS(λ) = 2 Σ_{k≥1} (-1)^(k-1) e^(-2k²λ²)`.
fn kolmogorov_q(lambda: f64) -> f64 {
    if lambda < 1e-3 {
        return 1.0;
    }
    let mut sum = 0.0;
    let mut sign = 1.0;
    for k in 1..=100 {
        let k = k as f64;
        let term = sign * (-2.0 * k * k * lambda * lambda).exp();
        sum += term;
        if term.abs() < 1e-12 {
            break;
        }
        sign = -sign;
    }
    (2.0 * sum).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_evidence_no_rejection() {
        assert_eq!(log_mixture_lr(0, 0, 0.05), 0.0);
        assert!(!rejects(0, 1000, 0.05, 0.01));
        // At the null rate the statistic stays small.
        assert!(!rejects(50, 1000, 0.05, 0.01));
    }

    #[test]
    fn clear_regressions_reject() {
        assert!(rejects(100, 1000, 0.05, 0.01)); // 10 % vs 5 %
        assert!(rejects(30, 100, 0.01, 0.01)); // p99 badly over the SLA
        assert!(!rejects(2, 100, 0.01, 0.01)); // 2 % over: not enough evidence yet
    }

    #[test]
    fn statistic_grows_with_evidence_for_a_real_difference() {
        let small = log_mixture_lr(20, 200, 0.05);
        let large = log_mixture_lr(200, 2000, 0.05);
        assert!(large > small, "{small} {large}");
    }

    #[test]
    fn ratio_null_follows_traffic_shares() {
        // 5 % canary, ratio 2: under the null at most ~9.5 % of errors are the canary's.
        let t = ratio_theta0(2.0, 50, 950);
        assert!((t - 100.0 / 1050.0).abs() < 1e-12);
        // Canary at 8 % vs baseline 2 % (4x): 80 of 156 errors where 2x allows ~54.
        assert!(rejects(80, 80 + 76, ratio_theta0(2.0, 1000, 3800), 0.01));
        // The same rates on a quarter of the traffic are not yet conclusive.
        assert!(!rejects(20, 20 + 19, ratio_theta0(2.0, 250, 950), 0.01));
    }

    #[test]
    fn epoch_levels_sum_to_alpha() {
        let total: f64 = (1..100_000).map(|j| epoch_alpha(0.01, j)).sum();
        assert!((total - 0.01).abs() < 1e-6);
    }

    #[test]
    fn ks_detects_a_shift_and_accepts_the_same_distribution() {
        let mut a: Vec<f64> = (0..500).map(|i| (i % 100) as f64).collect();
        let mut b: Vec<f64> = (0..500).map(|i| ((i * 7) % 100) as f64).collect();
        let (_, p_same) = ks_two_sample(&mut a, &mut b);
        assert!(p_same > 0.5, "{p_same}");
        let mut c: Vec<f64> = (0..500).map(|i| (i % 100) as f64 + 30.0).collect();
        let (d, p_shift) = ks_two_sample(&mut a, &mut c);
        assert!(d > 0.25 && p_shift < 1e-6, "{d} {p_shift}");
    }
}
