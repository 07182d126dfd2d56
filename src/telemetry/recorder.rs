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
//! [`PairStats::flush`] merges the shards into cumulative totals (for `/metrics`), into
//! the sliding window (for the evaluator and `/api/v1/status`) and into the per-second
//! history (for `/api/v1/history` and the status page's charts). Flushes run off the request
//! path: every evaluator `interval` (a task in `app.rs`), and before each read.
//!
//! # Windows
//!
//! Every "last N of something" in rollgate is one type, [`Ring`]: a fixed number of slots
//! addressed by an absolute index that only grows, where slot `i` lives at `i % len` and the
//! ring holds the indices `head - len .. head`. What an index counts is the user's choice:
//!
//! - time slots of a [`SlotClock`]: the sliding window here (`window / 10` per slot) and the
//!   history (one second per slot, [`HISTORY_SECS`] of them);
//! - evaluator ticks: the window of per-tick counts behind `min_error_rate`
//!   (`crate::evaluator`), and its samples of guardrail flags and evidence trajectories;
//! - samples: the drift signal's ring of recent values ([`super::signals::Signals`]), written
//!   lock-free by [`Ring::claim`].
//!
//! Rotation clears at most `len` slots however far the index jumps, so hours of idle time
//! cost one pass over the ring; merging the slots from an index on ([`Ring::merge_from`]) is
//! the snapshot. Memory is fixed when the ring is made.

use std::cell::Cell;
use std::ops::Range;
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

/// A slot a [`Ring`] can rotate (clear for reuse) and merge (sum into a snapshot).
pub trait RingSlot {
    /// Empties the slot for reuse, keeping its allocations.
    fn clear(&mut self);
    /// Adds `other` into `self`.
    fn merge(&mut self, other: &Self);
}

/// A fixed ring of `len` slots addressed by an absolute, ever-growing index (see the module
/// docs): slot `i` lives at `i % len`, and the ring holds `head - len .. head`, where `head`
/// is one past the newest index opened.
///
/// Writers with `&mut` rotate it with [`advance_to`](Self::advance_to); writers sharing it
/// (`&self`, a ring of atomics on the request path) take the next index with
/// [`claim`](Self::claim): one relaxed `fetch_add`, no lock, no allocation.
pub struct Ring<T> {
    slots: Box<[T]>,
    /// `len` is a power of two: positions by mask instead of a division.
    pow2: bool,
    head: AtomicU64,
    /// No index below this one is held (a ring grown by [`resized`](Self::resized) does not
    /// hold what the smaller one had dropped).
    floor: u64,
}

impl<T> Ring<T> {
    /// A ring of `len` slots (at least 1), each made by `make`.
    pub fn new(len: usize, make: impl FnMut() -> T) -> Self {
        let len = len.max(1);
        Ring {
            slots: std::iter::repeat_with(make).take(len).collect(),
            pow2: len.is_power_of_two(),
            head: AtomicU64::new(0),
            floor: 0,
        }
    }

    /// How many slots it holds.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    #[inline]
    fn pos(&self, index: u64) -> usize {
        if self.pow2 {
            (index & (self.slots.len() as u64 - 1)) as usize
        } else {
            (index % self.slots.len() as u64) as usize
        }
    }

    /// One past the newest index opened (0: none yet).
    #[inline]
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// The indices the ring holds now, oldest first (one read of `head`).
    pub fn held(&self) -> Range<u64> {
        let head = self.head();
        head.saturating_sub(self.slots.len() as u64).max(self.floor)..head
    }

    /// The slot index `index` maps to, whether or not the ring still holds that index (a
    /// reader of a shared ring checks [`held`](Self::held) first).
    #[inline]
    pub fn slot(&self, index: u64) -> &T {
        &self.slots[self.pos(index)]
    }

    pub fn slot_mut(&mut self, index: u64) -> &mut T {
        let p = self.pos(index);
        &mut self.slots[p]
    }

    /// The newest slot, if any index was opened.
    pub fn newest(&self) -> Option<&T> {
        self.head().checked_sub(1).map(|i| self.slot(i))
    }

    /// The held slots with index `from` or later, oldest first, with their indices.
    pub fn iter_from(&self, from: u64) -> impl DoubleEndedIterator<Item = (u64, &T)> + '_ {
        let held = self.held();
        (held.start.max(from)..held.end).map(move |i| (i, self.slot(i)))
    }

    /// Opens the next index for a writer that shares the ring: returns it and its slot,
    /// whose old content the writer overwrites. Lock-free (one relaxed `fetch_add`).
    #[inline]
    pub fn claim(&self) -> (u64, &T) {
        let i = self.head.fetch_add(1, Ordering::Relaxed);
        (i, self.slot(i))
    }

    /// Makes `index` the newest slot and returns it. Every index it passes over is opened
    /// and its slot handed to `clear` (at most `len` slots, however far `index` jumps). An
    /// index older than the newest gets the newest slot: time never goes back, so a caller
    /// with a stale clock adds to the current slot.
    pub fn advance_with(&mut self, index: u64, mut clear: impl FnMut(&mut T)) -> &mut T {
        let head = *self.head.get_mut();
        if index < head {
            return self.slot_mut(head - 1);
        }
        let len = self.slots.len() as u64;
        for i in head.max((index + 1).saturating_sub(len))..=index {
            clear(self.slot_mut(i));
        }
        *self.head.get_mut() = index + 1;
        self.slot_mut(index)
    }

    /// A ring of `len` slots holding the newest `min(len, held)` slots of this one, under
    /// the same indices.
    pub fn resized(&self, len: usize, mut make: impl FnMut() -> T) -> Self
    where
        T: Clone,
    {
        let mut out = Ring::new(len, &mut make);
        let held = self.held();
        let from = held
            .start
            .max(held.end.saturating_sub(out.capacity() as u64));
        for (i, s) in self.iter_from(from) {
            *out.slot_mut(i) = s.clone();
        }
        *out.head.get_mut() = held.end;
        out.floor = from;
        out
    }
}

impl<T: RingSlot> Ring<T> {
    /// [`advance_with`](Self::advance_with), clearing the slots passed over.
    pub fn advance_to(&mut self, index: u64) -> &mut T {
        self.advance_with(index, T::clear)
    }

    /// Merges every held slot with index `from` or later into `into`: the snapshot.
    pub fn merge_from(&self, from: u64, into: &mut T) {
        for (_, s) in self.iter_from(from) {
            into.merge(s);
        }
    }
}

impl<T: Clone> Clone for Ring<T> {
    fn clone(&self) -> Self {
        Ring {
            slots: self.slots.clone(),
            pow2: self.pow2,
            head: AtomicU64::new(self.head()),
            floor: self.floor,
        }
    }
}

impl<T: Default> Default for Ring<T> {
    /// One empty slot: grown with [`resized`](Self::resized) once the length is known.
    fn default() -> Self {
        Ring::new(1, T::default)
    }
}

impl<T> std::fmt::Debug for Ring<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("len", &self.slots.len())
            .field("held", &self.held())
            .finish()
    }
}

/// Time slots of fixed length from an origin: the index a time-slotted [`Ring`] uses.
#[derive(Debug, Clone, Copy)]
pub struct SlotClock {
    origin: Instant,
    /// Slot length in nanoseconds (at least 1).
    len_ns: u64,
}

impl SlotClock {
    pub fn new(origin: Instant, len: Duration) -> Self {
        SlotClock {
            origin,
            len_ns: u64::try_from(len.as_nanos()).unwrap_or(u64::MAX).max(1),
        }
    }

    pub fn slot_len(&self) -> Duration {
        Duration::from_nanos(self.len_ns)
    }

    fn since_origin_ns(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The slot `t` falls in (slot 0 for any time before the origin).
    pub fn index(&self, t: Instant) -> u64 {
        self.since_origin_ns(t) / self.len_ns
    }

    /// The first slot that starts at or after `t`.
    pub fn first_from(&self, t: Instant) -> u64 {
        self.since_origin_ns(t).div_ceil(self.len_ns)
    }
}

/// Seconds of per-second history kept per (route, version): 15 minutes.
pub const HISTORY_SECS: usize = 900;

/// The one-second grid history points sit on, shared by every pair of a [`Telemetry`]
/// (`super::Telemetry`) so their points line up, and the Unix second its slot 0 is.
#[derive(Debug, Clone, Copy)]
pub struct HistoryClock {
    pub slots: SlotClock,
    pub unix_origin_s: u64,
}

impl HistoryClock {
    /// Slot 0 starts at the current Unix second, so slots are whole Unix seconds.
    pub fn now() -> Self {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let now = Instant::now();
        let origin = now
            .checked_sub(Duration::from_millis(unix_ms % 1000))
            .unwrap_or(now);
        HistoryClock {
            slots: SlotClock::new(origin, Duration::from_secs(1)),
            unix_origin_s: unix_ms / 1000,
        }
    }

    /// The Unix second of slot `index`.
    pub fn unix(&self, index: u64) -> u64 {
        self.unix_origin_s + index
    }
}

/// One second of a pair's history.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryPoint {
    /// Requests answered (success, error, 4xx), as in [`WindowStats::requests`].
    pub requests: u32,
    pub errors: u32,
    /// Time-to-first-byte p99 of the second's answers, in microseconds (0: none).
    pub ttfb_p99_us: u32,
}

impl RingSlot for HistoryPoint {
    fn clear(&mut self) {
        *self = HistoryPoint::default();
    }
    /// Counts add up; the p99 of merged seconds is their largest (an upper bound).
    fn merge(&mut self, other: &Self) {
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        self.ttfb_p99_us = self.ttfb_p99_us.max(other.ttfb_p99_us);
    }
}

/// Merged state: touched only by `flush` and readers (evaluator tick, scrape, status).
struct Aggregate {
    counts: Box<[u64]>,
    ttfb: Histogram<u64>,
    total: Histogram<u64>,
    ttfb_sum_us: u64,
    total_sum_us: u64,
    /// The sliding window: slots of `window / 10`.
    window: Ring<WindowSnapshot>,
    /// The sum of the window's slots from `window_from` on, kept as flushes add to them
    /// and as slots leave the window, so a read is one copy instead of a merge of every
    /// slot (histogram merges scan every bucket: the evaluator's tick was most of the
    /// proxy's background CPU).
    window_sum: WindowSnapshot,
    window_from: u64,
    /// One point per second, [`HISTORY_SECS`] of them.
    history: Ring<HistoryPoint>,
    /// The current second's times to first byte, for its point's p99.
    second_ttfb: Histogram<u64>,
    /// The first second this pair has history for.
    history_from: Option<u64>,
}

impl Aggregate {
    /// Takes the slots before `from` out of the window sum (a `from` at or before the
    /// sum's start changes nothing). Should a histogram subtraction fail (the sum lacks
    /// what a slot holds), the sum is rebuilt from the slots.
    fn trim_window(&mut self, from: u64) {
        if from <= self.window_from {
            return;
        }
        let held = self.window.held();
        for i in self.window_from.max(held.start)..from.min(held.end) {
            if self.window_sum.subtract(self.window.slot(i)).is_err() {
                self.window_sum.clear();
                self.window.merge_from(from, &mut self.window_sum);
                break;
            }
        }
        self.window_from = from;
    }
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

/// Counts and histograms over a span: one slot of the sliding window, or the merge of
/// several (the window the evaluator judges).
#[derive(Clone)]
pub struct WindowSnapshot {
    pub by_class: [u64; CLASSES],
    pub ttfb: Histogram<u64>,
    pub total: Histogram<u64>,
}

impl Default for WindowSnapshot {
    fn default() -> Self {
        WindowSnapshot {
            by_class: [0; CLASSES],
            ttfb: new_histogram(),
            total: new_histogram(),
        }
    }
}

impl RingSlot for WindowSnapshot {
    fn clear(&mut self) {
        self.by_class = [0; CLASSES];
        self.ttfb.reset();
        self.total.reset();
    }
    fn merge(&mut self, other: &Self) {
        for (a, b) in self.by_class.iter_mut().zip(other.by_class) {
            *a += b;
        }
        let _ = self.ttfb.add(&other.ttfb);
        let _ = self.total.add(&other.total);
    }
}

impl WindowSnapshot {
    /// Takes `other` (merged into this one before) out again.
    fn subtract(&mut self, other: &Self) -> Result<(), hdrhistogram::SubtractionError> {
        for (a, b) in self.by_class.iter_mut().zip(other.by_class) {
            *a = a.saturating_sub(b);
        }
        self.ttfb.subtract(&other.ttfb)?;
        self.total.subtract(&other.total)
    }

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
    /// Slots of the sliding window (`window / 10`, at least 50 ms).
    window_clock: SlotClock,
    window: Duration,
    /// Where history points sit (shared with every pair of the registry).
    history_clock: HistoryClock,
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
        Self::with_history_clock(route, version, shards, window, HistoryClock::now())
    }

    /// As [`new`](Self::new), with history points on `clock`'s grid (the registry's, so
    /// every pair's seconds line up).
    pub fn with_history_clock(
        route: Arc<str>,
        version: VersionName,
        shards: usize,
        window: Duration,
        clock: HistoryClock,
    ) -> Self {
        let slot_len = (window / 10).max(Duration::from_millis(50));
        // The slots a window spans, and the one it is partly past.
        let slots = window.as_nanos().div_ceil(slot_len.as_nanos()) as usize + 1;
        PairStats {
            route,
            version,
            id: 0,
            signals: Signals::default(),
            shards: (0..shards.max(1))
                .map(|_| Padded(Mutex::new(Shard::new())))
                .collect(),
            window_clock: SlotClock::new(Instant::now(), slot_len),
            window,
            history_clock: clock,
            agg: Mutex::new(Aggregate {
                counts: vec![0; CLASSES * CODES].into_boxed_slice(),
                ttfb: new_histogram(),
                total: new_histogram(),
                ttfb_sum_us: 0,
                total_sum_us: 0,
                window: Ring::new(slots, WindowSnapshot::default),
                window_sum: WindowSnapshot::default(),
                window_from: 0,
                history: Ring::new(HISTORY_SECS, HistoryPoint::default),
                second_ttfb: new_histogram(),
                history_from: None,
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

    /// Merges every shard into the cumulative totals, the window and the history at `now`.
    /// What the shards hold counts as of `now`: a point's second is the second of the
    /// flush that collected it, so history has the resolution of the flushes (every
    /// evaluator `interval`, and before each read).
    pub fn flush(&self, now: Instant) {
        let mut agg = lock(&self.agg);
        let agg = &mut *agg;
        let index = self.window_clock.index(now);
        // Out of the sum before the ring recycles them: the slots that leave the ring
        // now, and those that left the window.
        let keep = (index + 1).saturating_sub(agg.window.capacity() as u64);
        agg.trim_window(keep.max(self.window_start(now)));
        // A stale `now` adds to the newest slot (see `Ring::advance_with`).
        let in_sum = index.max(agg.window.head().saturating_sub(1)) >= agg.window_from;
        let slot = agg.window.advance_to(index);
        let sum = &mut agg.window_sum;
        let second = self.history_clock.slots.index(now);
        if second >= agg.history.head() {
            agg.second_ttfb.reset();
            agg.history_from.get_or_insert(second);
        }
        let point = agg.history.advance_to(second);
        let mut by_class = [0u64; CLASSES];
        let mut ttfb_added = false;
        for shard in self.shards.iter() {
            let mut s = lock(&shard.0);
            if !s.dirty {
                continue;
            }
            for (i, c) in s.counts.iter_mut().enumerate() {
                if *c != 0 {
                    agg.counts[i] += *c;
                    by_class[i / CODES] += *c;
                    *c = 0;
                }
            }
            ttfb_added |= !s.ttfb.is_empty();
            let _ = agg.ttfb.add(&s.ttfb);
            let _ = agg.total.add(&s.total);
            let _ = slot.ttfb.add(&s.ttfb);
            let _ = slot.total.add(&s.total);
            if in_sum {
                let _ = sum.ttfb.add(&s.ttfb);
                let _ = sum.total.add(&s.total);
            }
            let _ = agg.second_ttfb.add(&s.ttfb);
            agg.ttfb_sum_us += s.ttfb_sum_us;
            agg.total_sum_us += s.total_sum_us;
            s.ttfb.reset();
            s.total.reset();
            s.ttfb_sum_us = 0;
            s.total_sum_us = 0;
            s.dirty = false;
        }
        for (a, b) in slot.by_class.iter_mut().zip(by_class) {
            *a += b;
        }
        if in_sum {
            for (a, b) in sum.by_class.iter_mut().zip(by_class) {
                *a += b;
            }
        }
        let answered = by_class[Class::Success as usize]
            + by_class[Class::Error as usize]
            + by_class[Class::ClientError as usize];
        let sat = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        point.requests = point.requests.saturating_add(sat(answered));
        point.errors = point
            .errors
            .saturating_add(sat(by_class[Class::Error as usize]));
        if ttfb_added {
            point.ttfb_p99_us = sat(agg.second_ttfb.value_at_quantile(0.99));
        }
    }

    /// The window ending at `now` (call [`flush`](Self::flush) first for fresh data): the
    /// slots that start within `window` of `now`.
    pub fn window(&self, now: Instant) -> WindowSnapshot {
        let from = self.window_start(now);
        let mut agg = lock(&self.agg);
        if from < agg.window_from {
            // A reader whose clock is behind a newer one's (the evaluator mid-tick after a
            // status read): the sum has let go of slots this window still holds.
            let mut snap = WindowSnapshot::default();
            agg.window.merge_from(from, &mut snap);
            return snap;
        }
        agg.trim_window(from);
        agg.window_sum.clone()
    }

    /// The first slot of the window ending at `now`.
    fn window_start(&self, now: Instant) -> u64 {
        now.checked_sub(self.window)
            .map_or(0, |t| self.window_clock.first_from(t))
    }

    /// The history of the seconds that ended by `now`, after Unix second `since` (all it
    /// holds, at most [`HISTORY_SECS`], when `None`): the Unix second of the first point,
    /// and one point per second from there, oldest first. Call [`flush`](Self::flush) at
    /// `now` first, or the seconds since the last flush are missing.
    pub fn history(&self, since: Option<u64>, now: Instant) -> (u64, Vec<HistoryPoint>) {
        let clock = self.history_clock;
        let current = clock.slots.index(now);
        let agg = lock(&self.agg);
        let Some(born) = agg.history_from else {
            return (clock.unix(current), Vec::new());
        };
        // Unix second `since` is slot `since - origin`: the points after it.
        let after = since.map_or(0, |s| {
            s.saturating_add(1).saturating_sub(clock.unix_origin_s)
        });
        let from = after.max(born).max(agg.history.held().start);
        let points: Vec<HistoryPoint> = agg
            .history
            .iter_from(from)
            .take_while(|(i, _)| *i < current)
            .map(|(_, p)| *p)
            .collect();
        (clock.unix(from), points)
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

    /// The running window sum is what merging the window's slots gives, read after read,
    /// over two simulated days of traffic with gaps, bursts, reads between flushes, reads
    /// with an older clock and flushes after long silences.
    #[test]
    fn the_window_sum_equals_a_merge_of_its_slots_for_days() {
        let window = Duration::from_secs(30);
        let p = PairStats::new("r".into(), "v".into(), 2, window);
        let t0 = Instant::now();
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut t = Duration::ZERO;
        let end = Duration::from_secs(2 * 24 * 3600);
        let mut reads = 0;
        while t < end {
            // Steps of 0.1 to 30 s (a window is 10 slots of 3 s); now and then minutes of
            // silence.
            t += match next() % 1000 {
                0 => Duration::from_secs(60 + next() % 600),
                1..=9 => Duration::from_millis(next() % 40_000),
                _ => Duration::from_millis(100 + next() % 29_900),
            };
            let now = t0 + t;
            for _ in 0..next() % 6 {
                let class = if next() % 7 == 0 {
                    Class::Error
                } else {
                    Class::Success
                };
                let ms = 1 + next() % 3000;
                p.record(
                    class,
                    200,
                    Some(Duration::from_millis(ms)),
                    Duration::from_millis(2 * ms),
                );
            }
            if next() % 4 != 0 {
                p.flush(now);
            }
            if next() % 4 == 0 {
                // A reader's clock may be a little behind the last flush's.
                let at = now
                    .checked_sub(Duration::from_millis(next() % 200))
                    .unwrap_or(now);
                let got = p.window(at);
                let agg = lock(&p.agg);
                let mut want = WindowSnapshot::default();
                agg.window.merge_from(p.window_start(at), &mut want);
                assert_eq!(got.by_class, want.by_class, "at {t:?}");
                assert_eq!(got.ttfb, want.ttfb, "at {t:?}");
                assert_eq!(got.total, want.total, "at {t:?}");
                reads += 1;
            }
        }
        assert!(reads > 2_000, "{reads}");
        // After the last traffic, the window empties once it has passed.
        let later = t0 + end + 2 * window;
        p.flush(later);
        assert_eq!(p.window(later).stats().requests, 0);
    }

    /// Found in review: a read with a clock behind an earlier read's (the evaluator's tick
    /// after `GET /api/v1/status` flushed and read at its own clock) still gets the window
    /// ending at its `now`, not one the newer read trimmed.
    #[test]
    fn a_read_behind_a_newer_one_still_gets_the_window_ending_at_its_now() {
        // Slots of 100 ms; one request in each of slots 0..=11.
        let p = PairStats::new("r".into(), "v".into(), 1, Duration::from_secs(1));
        let t0 = p.window_clock.origin;
        for k in 0..12u64 {
            p.record(Class::Success, 200, None, Duration::from_millis(1));
            p.flush(t0 + Duration::from_millis(100 * k + 50));
        }
        // The evaluator's tick at 1.19 s: the window is slots 2..=11.
        let tick = t0 + Duration::from_millis(1_190);
        p.flush(tick);
        assert_eq!(p.window(tick).stats().requests, 10);
        // A status read at 1.21 s flushes and reads at its own clock (slots 3..=11).
        let status = t0 + Duration::from_millis(1_210);
        p.flush(status);
        assert_eq!(p.window(status).stats().requests, 9);
        // The evaluator, still in its tick, reads the candidate's window.
        assert_eq!(
            p.window(tick).stats().requests,
            10,
            "slot 2 left the evaluator's window"
        );
    }

    /// A counter slot for the ring's own tests.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    struct N(u64);

    impl RingSlot for N {
        fn clear(&mut self) {
            self.0 = 0;
        }
        fn merge(&mut self, other: &Self) {
            self.0 += other.0;
        }
    }

    fn held(r: &Ring<N>) -> Vec<(u64, u64)> {
        r.iter_from(0).map(|(i, n)| (i, n.0)).collect()
    }

    #[test]
    fn a_ring_rotates_and_forgets_what_falls_out() {
        let mut r = Ring::new(4, N::default);
        assert_eq!(r.held(), 0..0);
        assert_eq!(r.newest(), None);
        for i in 0..10 {
            r.advance_to(i).0 += i + 1;
        }
        assert_eq!(r.held(), 6..10);
        assert_eq!(held(&r), [(6, 7), (7, 8), (8, 9), (9, 10)]);
        // A stale index adds to the newest slot rather than rewriting the past.
        r.advance_to(3).0 += 100;
        assert_eq!(r.newest(), Some(&N(110)));
        assert_eq!(r.head(), 10);
        // Skipped indices are opened empty.
        r.advance_to(12).0 = 1;
        assert_eq!(held(&r), [(9, 110), (10, 0), (11, 0), (12, 1)]);
    }

    #[test]
    fn snapshots_merge_across_the_wrap() {
        // 5 slots (positions by division) and 8 (by mask): the held indices 8..13 and 5..13
        // wrap around the end of the slots.
        for len in [5usize, 8] {
            let mut r = Ring::new(len, N::default);
            for i in 0..13 {
                *r.advance_to(i) = N(1 << i);
            }
            let sum = |range: std::ops::Range<u64>| range.map(|i| 1u64 << i).sum::<u64>();
            let mut snap = N(0);
            r.merge_from(10, &mut snap);
            assert_eq!(snap.0, sum(10..13), "len {len}");
            let mut all = N(0);
            r.merge_from(0, &mut all);
            assert_eq!(all.0, sum(13 - len as u64..13), "len {len}");
            let mut none = N(0);
            r.merge_from(13, &mut none);
            assert_eq!(none.0, 0);
        }
    }

    #[test]
    fn a_long_idle_gap_clears_the_ring_once() {
        let mut r = Ring::new(8, N::default);
        for i in 0..8 {
            r.advance_to(i).0 = 5;
        }
        // Three hours of 100 ms slots without a write, then one.
        let later = 8 + 3 * 36_000;
        let mut cleared = 0;
        r.advance_with(later, |n| {
            cleared += 1;
            n.0 = 0;
        })
        .0 = 1;
        assert_eq!(cleared, 8, "at most the ring's length is cleared");
        assert_eq!(r.held(), later - 7..later + 1);
        let mut snap = N(0);
        r.merge_from(0, &mut snap);
        assert_eq!(snap.0, 1, "nothing from before the gap survives");
    }

    #[test]
    fn resizing_keeps_the_newest_slots_under_their_indices() {
        let mut r = Ring::new(4, N::default);
        for i in 0..6 {
            *r.advance_to(i) = N(i);
        }
        let small = r.resized(2, N::default);
        assert_eq!(held(&small), [(4, 4), (5, 5)]);
        let mut big = r.resized(10, N::default);
        assert_eq!(held(&big), [(2, 2), (3, 3), (4, 4), (5, 5)]);
        *big.advance_to(6) = N(6);
        assert_eq!(big.held(), 2..7, "a grown ring holds the new slots too");
        for i in 7..20 {
            *big.advance_to(i) = N(i);
        }
        assert_eq!(big.held(), 10..20, "and, once full, its last `len`");
    }

    #[test]
    fn shared_writers_claim_every_index_once() {
        let r = Arc::new(Ring::new(1024, || AtomicU64::new(0)));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for _ in 0..256 {
                        let (i, slot) = r.claim();
                        slot.store(i + 1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(r.held(), 0..1024);
        for i in r.held() {
            assert_eq!(r.slot(i).load(Ordering::Relaxed), i + 1);
        }
    }

    #[test]
    fn hours_of_idle_time_then_traffic() {
        let p = PairStats::new("r".into(), "v".into(), 1, Duration::from_secs(30));
        let t0 = Instant::now();
        for _ in 0..5 {
            p.record(Class::Success, 200, None, Duration::from_millis(1));
        }
        p.flush(t0);
        let later = t0 + Duration::from_secs(3 * 3600);
        p.flush(later);
        assert_eq!(p.window(later).stats().requests, 0);
        assert!(p.history(None, later).1.iter().all(|pt| pt.requests == 0));
        for _ in 0..7 {
            p.record(Class::Error, 502, None, Duration::from_millis(1));
        }
        let after = later + Duration::from_millis(100);
        p.flush(after);
        let w = p.window(after).stats();
        assert_eq!((w.requests, w.errors), (7, 7));
        assert_eq!(p.cumulative().answered_and_errors(), (12, 7));
        let (_, points) = p.history(None, after + Duration::from_secs(1));
        assert_eq!(points.len(), HISTORY_SECS, "15 minutes, not 3 hours");
        let last = points.last().unwrap();
        assert_eq!((last.requests, last.errors), (7, 7));
    }

    #[test]
    fn history_keeps_one_point_per_second_for_fifteen_minutes() {
        let t0 = Instant::now();
        let clock = HistoryClock {
            slots: SlotClock::new(t0, Duration::from_secs(1)),
            unix_origin_s: 1_000_000,
        };
        let p = PairStats::with_history_clock(
            "r".into(),
            "v".into(),
            2,
            Duration::from_secs(30),
            clock,
        );
        // Second s answers s % 7 requests, one of them an error on every tenth second; the
        // shards are flushed every 250 ms.
        for s in 0..1000u64 {
            for q in 0..4u64 {
                if q == 0 {
                    for k in 0..s % 7 {
                        let class = if s.is_multiple_of(10) && k == 0 {
                            Class::Error
                        } else {
                            Class::Success
                        };
                        p.record(
                            class,
                            200,
                            Some(Duration::from_millis(10 + s % 7)),
                            Duration::from_millis(20),
                        );
                    }
                }
                p.flush(t0 + Duration::from_millis(s * 1000 + q * 250));
            }
        }
        // At 999.9 s the second 999 is not over: points end with second 998.
        let now = t0 + Duration::from_millis(999_900);
        let (start, points) = p.history(None, now);
        assert_eq!(points.len(), HISTORY_SECS - 1);
        assert_eq!(start, 1_000_000 + 1000 - HISTORY_SECS as u64);
        for (i, pt) in points.iter().enumerate() {
            let s = start - 1_000_000 + i as u64;
            let errors = u32::from(s.is_multiple_of(10) && !s.is_multiple_of(7));
            assert_eq!(
                (pt.requests, pt.errors),
                ((s % 7) as u32, errors),
                "second {s}"
            );
            let p99 = if s.is_multiple_of(7) {
                0
            } else {
                (10 + s % 7) * 1000
            };
            assert!(
                pt.ttfb_p99_us.abs_diff(p99 as u32) <= p99 as u32 / 100,
                "second {s}: {pt:?}"
            );
        }
        // After a second: the points after it only; in the future: none.
        let (start, points) = p.history(Some(1_000_995), now);
        assert_eq!((start, points.len()), (1_000_996, 3));
        assert_eq!(points[0].requests, (996 % 7) as u32);
        assert!(p.history(Some(1_002_000), now).1.is_empty());
        // A pair never flushed has no history.
        let fresh = PairStats::with_history_clock(
            "r".into(),
            "w".into(),
            1,
            Duration::from_secs(30),
            clock,
        );
        assert_eq!(fresh.history(None, now).1, vec![]);
    }
}
