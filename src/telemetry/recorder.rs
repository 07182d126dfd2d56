//! In-line, per-(route, version) request statistics.
//!
//! The request path calls [`PairStats::record`] once per request, when its response body
//! ends or is dropped. A record takes one uncontended lock: each [`PairStats`] holds one
//! shard per core, and a thread always writes the same shard (assigned round-robin on its
//! first record), so with one runtime worker per core two requests contend only when the
//! evaluator is merging that shard. The lock is a `std::sync::Mutex`, held for a few
//! counter and histogram increments and never across `.await`. Labels are resolved when the
//! routing table is compiled (the table holds the `Arc<PairStats>`), so a request does no
//! label hashing.
//!
//! [`PairStats::flush`] merges the shards into cumulative totals (for `/metrics`) and into
//! the sliding window (for the evaluator and `/api/v1/status`).

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

use super::signals::Signals;
use crate::config::VersionName;

/// How a finished request is classified. Only [`Class::Error`] counts against a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// 1xx-3xx, gRPC OK or a non-fault gRPC status.
    Success = 0,
    /// The version's fault: 5xx, connect error, timeout, reset mid-body, gRPC UNAVAILABLE...
    Error = 1,
    /// 4xx from the upstream: the client's fault.
    ClientError = 2,
    /// The client went away before the response ended.
    ClientAbort = 3,
    /// Refused by the proxy's own limits (body too large, bad pin, overload).
    Refused = 4,
}

pub const CLASSES: usize = 5;
/// Status codes are kept as exact values 0..=599 (0: no response at all).
pub const CODES: usize = 600;

impl Class {
    pub const ALL: [Class; CLASSES] = [
        Class::Success,
        Class::Error,
        Class::ClientError,
        Class::ClientAbort,
        Class::Refused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Success => "success",
            Class::Error => "error",
            Class::ClientError => "client_error",
            Class::ClientAbort => "client_abort",
            Class::Refused => "refused",
        }
    }
}

/// Kinds of upstream failure, for `rollgate_upstream_errors_total{version,kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Connect = 0,
    Timeout = 1,
    Reset = 2,
    Status5xx = 3,
    Grpc = 4,
    Tls = 5,
}

pub const ERROR_KINDS: usize = 6;

impl UpstreamErrorKind {
    pub const ALL: [UpstreamErrorKind; ERROR_KINDS] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Reset,
        UpstreamErrorKind::Status5xx,
        UpstreamErrorKind::Grpc,
        UpstreamErrorKind::Tls,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::Status5xx => "5xx",
            UpstreamErrorKind::Grpc => "grpc",
            UpstreamErrorKind::Tls => "tls",
        }
    }
}

/// Upper bound of recorded latencies: one hour, in microseconds.
const MAX_US: u64 = 3_600_000_000;

pub(crate) fn new_histogram() -> Histogram<u64> {
    // Two significant digits: p99 within 1%, ~25 KiB per histogram.
    Histogram::new_with_bounds(1, MAX_US, 2).expect("static histogram bounds are valid")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(MAX_US)
        .clamp(1, MAX_US)
}

struct Shard {
    counts: Box<[u64]>,
    ttfb: Histogram<u64>,
    total: Histogram<u64>,
    ttfb_sum_us: u64,
    total_sum_us: u64,
    dirty: bool,
}

impl Shard {
    fn new() -> Self {
        Shard {
            counts: vec![0; CLASSES * CODES].into_boxed_slice(),
            ttfb: new_histogram(),
            total: new_histogram(),
            ttfb_sum_us: 0,
            total_sum_us: 0,
            dirty: false,
        }
    }
}

/// Keeps each shard on its own cache lines.
#[repr(align(128))]
struct Padded<T>(T);

/// One slot of the sliding window.
struct Slot {
    start: Instant,
    by_class: [u64; CLASSES],
    ttfb: Histogram<u64>,
    total: Histogram<u64>,
}

/// Merged state: touched only by `flush` and readers (evaluator tick, scrape, status).
struct Aggregate {
    counts: Box<[u64]>,
    ttfb: Histogram<u64>,
    total: Histogram<u64>,
    ttfb_sum_us: u64,
    total_sum_us: u64,
    ring: VecDeque<Slot>,
}

/// Window statistics of one (route, version), as `/api/v1/status` shows them.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct WindowStats {
    /// Requests the version answered (success, error or 4xx); aborts and refusals excluded.
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub ttfb_p50_ms: f64,
    pub ttfb_p99_ms: f64,
    pub total_p50_ms: f64,
    pub total_p99_ms: f64,
}

/// The merged window with its histograms, for the evaluator.
pub struct WindowSnapshot {
    pub by_class: [u64; CLASSES],
    pub ttfb: Histogram<u64>,
    pub total: Histogram<u64>,
}

impl WindowSnapshot {
    pub fn stats(&self) -> WindowStats {
        let requests = self.by_class[Class::Success as usize]
            + self.by_class[Class::Error as usize]
            + self.by_class[Class::ClientError as usize];
        let errors = self.by_class[Class::Error as usize];
        let ms = |h: &Histogram<u64>, q: f64| {
            if h.is_empty() {
                0.0
            } else {
                (h.value_at_quantile(q) as f64 / 1000.0 * 10.0).round() / 10.0
            }
        };
        WindowStats {
            requests,
            errors,
            error_rate: if requests == 0 {
                0.0
            } else {
                errors as f64 / requests as f64
            },
            ttfb_p50_ms: ms(&self.ttfb, 0.5),
            ttfb_p99_ms: ms(&self.ttfb, 0.99),
            total_p50_ms: ms(&self.total, 0.5),
            total_p99_ms: ms(&self.total, 0.99),
        }
    }
}

/// Cumulative totals since start, for Prometheus.
#[derive(Clone)]
pub struct Cumulative {
    pub counts: Box<[u64]>,
    pub ttfb: Histogram<u64>,
    pub total: Histogram<u64>,
    pub ttfb_sum_us: u64,
    pub total_sum_us: u64,
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static SHARD_INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn shard_index() -> usize {
    SHARD_INDEX.with(|c| {
        let mut i = c.get();
        if i == usize::MAX {
            i = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
            c.set(i);
        }
        i
    })
}

/// Statistics of one version on one route.
pub struct PairStats {
    pub route: Arc<str>,
    pub version: VersionName,
    /// Non-zero once registered with [`Telemetry`](super::Telemetry): the key feedback is
    /// remembered under.
    pub id: u32,
    /// Guardrail flags, feedback and drift samples.
    pub signals: Signals,
    shards: Box<[Padded<Mutex<Shard>>]>,
    slot_len: Duration,
    window: Duration,
    /// Cold lock: flush and readers only.
    agg: Mutex<Aggregate>,
    /// Requests begun ([`begin`](Self::begin)) and not yet recorded: what a rollback drains.
    in_flight: AtomicI64,
    /// Bumped when the version is rolled back: the evaluator then judges it afresh once it
    /// is live again, never on requests from before (a drill's fault, a bug since fixed).
    incarnation: AtomicU64,
}

impl std::fmt::Debug for PairStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairStats")
            .field("route", &self.route)
            .field("version", &self.version)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves only counters behind: keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PairStats {
    pub fn new(route: Arc<str>, version: VersionName, shards: usize, window: Duration) -> Self {
        let slots = 10u32;
        let slot_len = (window / slots).max(Duration::from_millis(50));
        PairStats {
            route,
            version,
            id: 0,
            signals: Signals::default(),
            shards: (0..shards.max(1))
                .map(|_| Padded(Mutex::new(Shard::new())))
                .collect(),
            slot_len,
            window,
            agg: Mutex::new(Aggregate {
                counts: vec![0; CLASSES * CODES].into_boxed_slice(),
                ttfb: new_histogram(),
                total: new_histogram(),
                ttfb_sum_us: 0,
                total_sum_us: 0,
                ring: VecDeque::with_capacity(slots as usize + 2),
            }),
            in_flight: AtomicI64::new(0),
            incarnation: AtomicU64::new(0),
        }
    }

    /// A request was sent this way; exactly one [`record`](Self::record) ends it.
    #[inline]
    pub fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests begun and not yet recorded.
    /// Starts a new incarnation (see the field); called by the rollback sequence.
    pub fn new_incarnation(&self) {
        self.incarnation.fetch_add(1, Ordering::Relaxed);
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Records one finished request. `code` 0 means no response was received.
    #[inline]
    pub fn record(&self, class: Class, code: u16, ttfb: Option<Duration>, total: Duration) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let shard = &self.shards[shard_index() % self.shards.len()].0;
        let code = if usize::from(code) < CODES {
            usize::from(code)
        } else {
            0
        };
        let t_us = micros(total);
        let mut s = lock(shard);
        s.counts[class as usize * CODES + code] += 1;
        // Latency describes answers only: aborts and refusals would skew it.
        if matches!(class, Class::Success | Class::Error | Class::ClientError) {
            if let Some(tt) = ttfb {
                let us = micros(tt);
                s.ttfb.saturating_record(us);
                s.ttfb_sum_us += us;
            }
            s.total.saturating_record(t_us);
            s.total_sum_us += t_us;
        }
        s.dirty = true;
    }

    /// Merges every shard into the cumulative totals and the window at `now`.
    pub fn flush(&self, now: Instant) {
        let mut agg = lock(&self.agg);
        let agg = &mut *agg;
        // Rotate the window: drop slots that left it, open a new one when due.
        while agg
            .ring
            .front()
            .is_some_and(|s| now.saturating_duration_since(s.start) > self.window + self.slot_len)
        {
            agg.ring.pop_front();
        }
        let need_new = agg
            .ring
            .back()
            .is_none_or(|s| now.saturating_duration_since(s.start) >= self.slot_len);
        if need_new {
            let (ttfb, total) = match agg.ring.len() > 10 {
                true => {
                    let mut old = agg.ring.pop_front().expect("len > 10");
                    old.ttfb.reset();
                    old.total.reset();
                    (old.ttfb, old.total)
                }
                false => (new_histogram(), new_histogram()),
            };
            agg.ring.push_back(Slot {
                start: now,
                by_class: [0; CLASSES],
                ttfb,
                total,
            });
        }
        let slot = agg.ring.back_mut().expect("a slot was just ensured");
        for shard in self.shards.iter() {
            let mut s = lock(&shard.0);
            if !s.dirty {
                continue;
            }
            for (i, c) in s.counts.iter_mut().enumerate() {
                if *c != 0 {
                    agg.counts[i] += *c;
                    slot.by_class[i / CODES] += *c;
                    *c = 0;
                }
            }
            let _ = agg.ttfb.add(&s.ttfb);
            let _ = agg.total.add(&s.total);
            let _ = slot.ttfb.add(&s.ttfb);
            let _ = slot.total.add(&s.total);
            agg.ttfb_sum_us += s.ttfb_sum_us;
            agg.total_sum_us += s.total_sum_us;
            s.ttfb.reset();
            s.total.reset();
            s.ttfb_sum_us = 0;
            s.total_sum_us = 0;
            s.dirty = false;
        }
    }

    /// The window ending at `now` (call [`flush`](Self::flush) first for fresh data).
    pub fn window(&self, now: Instant) -> WindowSnapshot {
        let agg = lock(&self.agg);
        let mut snap = WindowSnapshot {
            by_class: [0; CLASSES],
            ttfb: new_histogram(),
            total: new_histogram(),
        };
        for slot in agg.ring.iter() {
            if now.saturating_duration_since(slot.start) > self.window {
                continue;
            }
            for (a, b) in snap.by_class.iter_mut().zip(slot.by_class) {
                *a += b;
            }
            let _ = snap.ttfb.add(&slot.ttfb);
            let _ = snap.total.add(&slot.total);
        }
        snap
    }

    /// Cumulative totals since start (call [`flush`](Self::flush) first).
    pub fn cumulative(&self) -> Cumulative {
        let agg = lock(&self.agg);
        Cumulative {
            counts: agg.counts.clone(),
            ttfb: agg.ttfb.clone(),
            total: agg.total.clone(),
            ttfb_sum_us: agg.ttfb_sum_us,
            total_sum_us: agg.total_sum_us,
        }
    }
}

impl Cumulative {
    /// Totals by class.
    pub fn by_class(&self) -> [u64; CLASSES] {
        let mut out = [0; CLASSES];
        for (c, slot) in out.iter_mut().enumerate() {
            *slot = self.counts[c * CODES..(c + 1) * CODES].iter().sum();
        }
        out
    }

    /// Answered requests (success, error, 4xx) and errors.
    pub fn answered_and_errors(&self) -> (u64, u64) {
        let b = self.by_class();
        (
            b[Class::Success as usize] + b[Class::Error as usize] + b[Class::ClientError as usize],
            b[Class::Error as usize],
        )
    }

    /// Requests whose time to first byte exceeded `limit`.
    pub fn ttfb_over(&self, limit: Duration) -> u64 {
        let us = micros(limit);
        if self.ttfb.is_empty() || self.ttfb.max() <= us {
            return 0;
        }
        self.ttfb
            .count_between(self.ttfb.next_non_equivalent(us), self.ttfb.max())
    }
}

/// Per-version counters that don't depend on the route.
#[derive(Debug, Default)]
pub struct VersionCounters {
    pub upstream_errors: [AtomicU64; ERROR_KINDS],
    /// Drill faults injected into this version's requests.
    pub faults: crate::proxy::faults::Faults,
}

impl VersionCounters {
    #[inline]
    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// `rollgate_retries_total{route,from_version,to_version}`.
#[derive(Debug)]
pub struct RetryCounter {
    pub route: Arc<str>,
    pub from: VersionName,
    pub to: VersionName,
    pub count: AtomicU64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_merge_into_window_and_totals() {
        let p = PairStats::new("r".into(), "v".into(), 2, Duration::from_secs(30));
        let now = Instant::now();
        for i in 0..100u64 {
            let class = if i % 10 == 0 {
                Class::Error
            } else {
                Class::Success
            };
            p.record(
                class,
                if class == Class::Error { 503 } else { 200 },
                Some(Duration::from_millis(i)),
                Duration::from_millis(2 * i),
            );
        }
        p.record(Class::ClientAbort, 0, None, Duration::from_millis(5));
        p.flush(now);
        let w = p.window(now).stats();
        assert_eq!(w.requests, 100);
        assert_eq!(w.errors, 10);
        assert!((w.ttfb_p99_ms - 99.0).abs() < 2.0, "{w:?}");
        let c = p.cumulative();
        assert_eq!(c.counts[Class::Error as usize * CODES + 503], 10);
        assert_eq!(c.counts[Class::ClientAbort as usize * CODES], 1);
        // A second flush with nothing new changes nothing.
        p.flush(now);
        assert_eq!(p.window(now).stats().requests, 100);
    }

    #[test]
    fn window_forgets_old_slots() {
        let p = PairStats::new("r".into(), "v".into(), 1, Duration::from_secs(10));
        let t0 = Instant::now();
        p.record(Class::Success, 200, None, Duration::from_millis(1));
        p.flush(t0);
        let later = t0 + Duration::from_secs(12);
        p.flush(later);
        assert_eq!(p.window(later).stats().requests, 0);
        assert_eq!(p.cumulative().counts[200], 1);
    }
}
