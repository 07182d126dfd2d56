//! Fault injection for rollback drills (`POST /api/v1/faults`): for a bounded time, a share
//! of a version's requests fail as if its upstream answered 500, and/or every request waits
//! before it is forwarded. When no fault is set the request path pays one relaxed load.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Injected faults of one version.
#[derive(Debug, Default)]
pub struct Faults {
    /// Milliseconds since [`epoch`] at which the fault ends; 0: none set.
    until_ms: AtomicU64,
    /// Share of requests failed, in parts per million.
    error_ppm: AtomicU32,
    latency_us: AtomicU64,
}

/// What to do to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Injection {
    pub fail: bool,
    pub delay: Duration,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

impl Faults {
    /// Injects `error_rate` (0..=1) failures and `latency` for `duration` from now.
    pub fn set(&self, error_rate: f64, latency: Duration, duration: Duration) {
        let ppm = (error_rate.clamp(0.0, 1.0) * 1e6).round() as u32;
        self.error_ppm.store(ppm, Ordering::Relaxed);
        self.latency_us
            .store(latency.as_micros() as u64, Ordering::Relaxed);
        let until = now_ms().saturating_add(duration.as_millis().min(u128::from(u64::MAX)) as u64);
        self.until_ms.store(until, Ordering::Release);
    }

    pub fn clear(&self) {
        self.until_ms.store(0, Ordering::Release);
    }

    /// Time left of the current fault, if one is active.
    pub fn remaining(&self) -> Option<Duration> {
        let until = self.until_ms.load(Ordering::Acquire);
        let now = now_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }

    /// The fault for one request.
    #[inline]
    pub fn sample(&self) -> Injection {
        let until = self.until_ms.load(Ordering::Acquire);
        if until == 0 || until <= now_ms() {
            return Injection::default();
        }
        let ppm = self.error_ppm.load(Ordering::Relaxed);
        Injection {
            fail: ppm > 0 && fastrand::u32(0..1_000_000) < ppm,
            delay: Duration::from_micros(self.latency_us.load(Ordering::Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_apply_while_set_and_not_after() {
        let f = Faults::default();
        assert_eq!(f.sample(), Injection::default());
        f.set(1.0, Duration::from_millis(5), Duration::from_secs(60));
        let i = f.sample();
        assert!(i.fail);
        assert_eq!(i.delay, Duration::from_millis(5));
        assert!(f.remaining().is_some());
        f.clear();
        assert_eq!(f.sample(), Injection::default());
        f.set(0.5, Duration::ZERO, Duration::from_secs(60));
        let failed = (0..10_000).filter(|_| f.sample().fail).count();
        assert!((4_000..6_000).contains(&failed), "{failed}");
        f.set(1.0, Duration::ZERO, Duration::ZERO);
        assert!(!f.sample().fail, "a zero-length fault is over at once");
    }
}
