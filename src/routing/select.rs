//! Version choice for one request, per SPEC §4: pin header, then sticky key by weighted
//! rendezvous hashing, then weighted random.
//!
//! Weighted rendezvous hashing (the "logarithmic method" of Schindelhauer & Schomaker):
//! each member scores `weight / -ln(u)`, where `u` in (0, 1) is a stable hash of the key and
//! the member's name; the highest score wins. A key changes version only when weights
//! change, and then only toward a version whose weight rose (or away from one whose weight
//! fell). The hash is xxh3 with a per-version seed derived from the version's name, so
//! replicas and restarts agree.

use crate::config::{PinQuarantined, PinUnknown};

/// One version's place in a route.
pub trait Candidate {
    fn weight(&self) -> u32;
    fn seed(&self) -> u64;
}

/// A stable seed for a version name.
pub fn name_seed(name: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(name.as_bytes())
}

/// Rendezvous choice among members with weight above 0. `None` only if all weights are 0.
#[inline]
pub fn rendezvous<C: Candidate>(members: &[C], key: &[u8]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, m) in members.iter().enumerate() {
        let w = m.weight();
        if w == 0 {
            continue;
        }
        let h = xxhash_rust::xxh3::xxh3_64_with_seed(key, m.seed());
        // 53 random bits, centred in their interval so u is never 0 or 1.
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = f64::from(w) / -u.ln();
        if best.is_none_or(|(_, s)| score > s) {
            best = Some((i, score));
        }
    }
    best.map(|(i, _)| i)
}

/// Weighted random choice using prefix sums; `r` is uniform in `0..total`.
#[inline]
pub fn weighted(cumulative: &[u32], r: u32) -> usize {
    // Routes have a handful of versions: a linear scan beats a binary search here.
    cumulative
        .iter()
        .position(|c| r < *c)
        .unwrap_or(cumulative.len().saturating_sub(1))
}

/// What a pin header asks for, resolved against one route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinOutcome {
    /// No usable pin: choose by sticky key or weight.
    NoPin,
    /// Serve this member.
    Member(usize),
    /// 400: the pin names no version of this route.
    RejectUnknown,
    /// 409: the pin names a quarantined version and policy says reject.
    RejectQuarantined,
}

/// Resolves a pin given the index of the pinned member (if the route has it), whether it
/// is quarantined, and the route's baseline index.
pub fn resolve_pin(
    found: Option<(usize, bool)>,
    baseline: usize,
    on_quarantined: PinQuarantined,
    on_unknown: PinUnknown,
) -> PinOutcome {
    match found {
        None => match on_unknown {
            PinUnknown::Reject => PinOutcome::RejectUnknown,
            PinUnknown::Ignore => PinOutcome::NoPin,
        },
        Some((i, false)) => PinOutcome::Member(i),
        Some((i, true)) => match on_quarantined {
            PinQuarantined::Baseline => PinOutcome::Member(baseline),
            PinQuarantined::Honor => PinOutcome::Member(i),
            PinQuarantined::Reject => PinOutcome::RejectQuarantined,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct M(u32, u64);
    impl Candidate for M {
        fn weight(&self) -> u32 {
            self.0
        }
        fn seed(&self) -> u64 {
            self.1
        }
    }

    #[test]
    fn rendezvous_follows_weights_and_moves_keys_only_toward_gainer() {
        let before = [M(90, name_seed("a")), M(10, name_seed("b"))];
        let after = [M(90, name_seed("a")), M(30, name_seed("b"))];
        let mut to_b = 0;
        let mut count_b = 0;
        for k in 0..20_000u32 {
            let key = k.to_le_bytes();
            let x = rendezvous(&before, &key).unwrap();
            let y = rendezvous(&after, &key).unwrap();
            if x == 1 {
                count_b += 1;
                assert_eq!(y, 1, "a key on the gaining version never leaves it");
            }
            if x != y {
                to_b += 1;
            }
        }
        let share = f64::from(count_b) / 20_000.0;
        assert!((share - 0.10).abs() < 0.015, "share {share}");
        assert!(to_b > 2_000, "some keys move: {to_b}");
    }

    #[test]
    fn weight_zero_never_chosen() {
        let m = [M(0, 1), M(5, 2)];
        for k in 0..1000u32 {
            assert_eq!(rendezvous(&m, &k.to_le_bytes()), Some(1));
        }
        assert_eq!(rendezvous(&[M(0, 1)], b"k"), None);
    }

    #[test]
    fn weighted_picks_by_prefix_sum() {
        let cum = [90, 100];
        assert_eq!(weighted(&cum, 0), 0);
        assert_eq!(weighted(&cum, 89), 0);
        assert_eq!(weighted(&cum, 90), 1);
        assert_eq!(weighted(&cum, 99), 1);
    }

    #[test]
    fn pin_policies() {
        use PinOutcome::*;
        assert_eq!(
            resolve_pin(None, 0, PinQuarantined::Baseline, PinUnknown::Reject),
            RejectUnknown
        );
        assert_eq!(
            resolve_pin(None, 0, PinQuarantined::Baseline, PinUnknown::Ignore),
            NoPin
        );
        assert_eq!(
            resolve_pin(
                Some((1, false)),
                0,
                PinQuarantined::Reject,
                PinUnknown::Reject
            ),
            Member(1)
        );
        assert_eq!(
            resolve_pin(
                Some((1, true)),
                0,
                PinQuarantined::Baseline,
                PinUnknown::Reject
            ),
            Member(0)
        );
        assert_eq!(
            resolve_pin(
                Some((1, true)),
                0,
                PinQuarantined::Honor,
                PinUnknown::Reject
            ),
            Member(1)
        );
        assert_eq!(
            resolve_pin(
                Some((1, true)),
                0,
                PinQuarantined::Reject,
                PinUnknown::Reject
            ),
            RejectQuarantined
        );
    }
}
