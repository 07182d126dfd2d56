//! How each statistical rule becomes a question about a Bernoulli rate, for the detectors
//! of [`super::detector`].
//!
//! Every rule asks: is `θ`, the probability that an observation is "bad", above a null
//! value `θ0`? Observations are counted per evaluator tick.
//!
//! - `error_rate_max`: observations are the candidate's answered requests, bad = error,
//!   `θ0 = error_rate_max`.
//! - `latency_p99_max`: bad = time to first byte above the SLA; "p99 above the SLA" is
//!   exactly "more than 1 % of requests above it", so `θ0 = 0.01`.
//! - `latency_p99_ratio`: bad = time to first byte above `ratio × baseline p99`, `θ0 = 0.01`
//!   (the baseline's p99 is a plug-in estimate from its window, a much larger sample).
//! - `error_rate_ratio` compares two rates. Following Lindon, Sanden and Shirikian (KDD 2022,
//!   "Rapid Regression Detection in Software Deployments through Sequential Testing"), we
//!   condition on errors: with `n_c`, `n_b` requests in a tick and rates `p_c`, `p_b`, each
//!   error of the tick is the candidate's with probability
//!   `θ = n_c p_c / (n_c p_c + n_b p_b)` (the Poisson approximation, tight for error rates of
//!   a few percent). `p_c ≤ k p_b` is `θ ≤ θ0 = k n_c / (k n_c + n_b)`, so the ratio test is
//!   again a one-sided Bernoulli test, on the errors, with a null that follows the traffic
//!   shares tick by tick (a rollout step changing the weights changes `θ0`, not the test).
//! - `min_error_rate`, the effect floor of `error_rate_ratio`: bad = error among the
//!   candidate's answered requests, `θ0 = min_error_rate`. The ratio rule trips only when
//!   both its detectors have the evidence (rejecting the union of the two nulls).
//! - `accuracy_drop`: observations are the candidate's feedback items, bad = "incorrect",
//!   `θ0 = baseline's incorrect rate (from its feedback before the tick) + drop`, a plug-in
//!   null like the latency ratio's.

/// `θ0` for "candidate rate ≤ `ratio` × baseline rate" in a tick where the candidate
/// answered `candidate_requests` and the baseline `baseline_requests`, conditioning on
/// errors. None when one side had no requests (the tick says nothing about the ratio).
pub fn ratio_theta0(ratio: f64, candidate_requests: u64, baseline_requests: u64) -> Option<f64> {
    if candidate_requests == 0 || baseline_requests == 0 {
        return None;
    }
    let c = ratio * candidate_requests as f64;
    Some(c / (c + baseline_requests as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_null_follows_traffic_shares() {
        // 5 % canary, ratio 2: under the null at most ~9.5 % of errors are the canary's.
        let t = ratio_theta0(2.0, 50, 950).unwrap();
        assert!((t - 100.0 / 1050.0).abs() < 1e-12);
        assert_eq!(ratio_theta0(2.0, 0, 950), None);
        assert_eq!(ratio_theta0(2.0, 50, 0), None);
    }
}
