//! Per-pair signals beyond counts and latency, for the `safety_violations`, `drift` and
//! `accuracy_drop` rules, and the map from recent request ids to the pair that answered
//! them (for `POST /api/v1/feedback`). Everything on the request path here is one or two
//! relaxed atomic operations: no lock, no allocation.

use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh3::xxh3_64;

/// Numeric samples kept per pair for the drift test: the most recent ones win.
pub const SAMPLE_RING: usize = 2048;

/// Request ids remembered for feedback (a power of two). At 8 bytes a slot this is 2 MiB;
/// at 1,000 requests per second an id stays answerable for minutes, at 50,000 for seconds.
pub const RECENT_REQUESTS: usize = 1 << 18;

/// Signals of one (route, version) pair.
pub struct Signals {
    /// Responses a guardrail flagged (the `safety_violations` header was set).
    flagged: AtomicU64,
    /// Feedback received, and how much of it said "incorrect".
    feedback: AtomicU64,
    incorrect: AtomicU64,
    /// Ring of recent drift samples (`f64` bits); `written` counts every sample ever pushed.
    samples: Box<[AtomicU64]>,
    written: AtomicU64,
}

impl Default for Signals {
    fn default() -> Self {
        Signals {
            flagged: AtomicU64::new(0),
            feedback: AtomicU64::new(0),
            incorrect: AtomicU64::new(0),
            samples: (0..SAMPLE_RING).map(|_| AtomicU64::new(0)).collect(),
            written: AtomicU64::new(0),
        }
    }
}

/// Cumulative signal counts at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SignalCounts {
    pub flagged: u64,
    pub feedback: u64,
    pub incorrect: u64,
    pub samples: u64,
}

impl Signals {
    #[inline]
    pub fn flag(&self) {
        self.flagged.fetch_add(1, Ordering::Relaxed);
    }

    pub fn feedback(&self, correct: bool) {
        self.feedback.fetch_add(1, Ordering::Relaxed);
        if !correct {
            self.incorrect.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Adds one drift sample; non-finite values are ignored.
    #[inline]
    pub fn push_sample(&self, x: f64) {
        if !x.is_finite() {
            return;
        }
        let i = self.written.fetch_add(1, Ordering::Relaxed);
        self.samples[(i % SAMPLE_RING as u64) as usize].store(x.to_bits(), Ordering::Relaxed);
    }

    pub fn counts(&self) -> SignalCounts {
        SignalCounts {
            flagged: self.flagged.load(Ordering::Relaxed),
            feedback: self.feedback.load(Ordering::Relaxed),
            incorrect: self.incorrect.load(Ordering::Relaxed),
            samples: self.written.load(Ordering::Relaxed),
        }
    }

    /// Copies the samples pushed after the first `since` (at most the ring's size, the newest)
    /// into `out`, and returns the total written so far. A sample being written concurrently
    /// may be read as its predecessor in that slot: harmless for a distribution test.
    pub fn samples_since(&self, since: u64, out: &mut Vec<f64>) -> u64 {
        out.clear();
        let written = self.written.load(Ordering::Acquire);
        let from = since.max(written.saturating_sub(SAMPLE_RING as u64));
        for i in from..written {
            let bits = self.samples[(i % SAMPLE_RING as u64) as usize].load(Ordering::Relaxed);
            out.push(f64::from_bits(bits));
        }
        written
    }
}

/// Recent request id → id of the pair that answered it. A fixed, open table: a new id
/// overwrites whatever shared its slot, and a lookup checks a 32-bit tag, so a forgotten
/// or colliding id reads as unknown rather than as another request's pair.
pub struct RecentRequests {
    slots: Box<[AtomicU64]>,
}

impl Default for RecentRequests {
    fn default() -> Self {
        Self::with_capacity(RECENT_REQUESTS)
    }
}

impl RecentRequests {
    /// `capacity` is rounded up to a power of two.
    pub fn with_capacity(capacity: usize) -> Self {
        let n = capacity.max(2).next_power_of_two();
        RecentRequests {
            slots: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn slot_and_tag(&self, id: &[u8]) -> (usize, u64) {
        let h = xxh3_64(id);
        let slot = (h as usize) & (self.slots.len() - 1);
        (slot, h >> 32)
    }

    /// Remembers that `pair` (non-zero) answered request `id`.
    #[inline]
    pub fn remember(&self, id: &[u8], pair: u32) {
        let (slot, tag) = self.slot_and_tag(id);
        self.slots[slot].store((tag << 32) | u64::from(pair), Ordering::Relaxed);
    }

    /// The pair that answered `id`, once: a second lookup of the same id finds nothing, so
    /// each request's feedback counts at most once.
    pub fn take(&self, id: &[u8]) -> Option<u32> {
        let (slot, tag) = self.slot_and_tag(id);
        let cell = &self.slots[slot];
        let v = cell.load(Ordering::Relaxed);
        if v == 0 || v >> 32 != tag {
            return None;
        }
        cell.compare_exchange(v, 0, Ordering::Relaxed, Ordering::Relaxed)
            .ok()
            .map(|v| v as u32)
    }
}

/// Is a guardrail header's value a "flagged"? Anything but empty, `0`, `false` or `no`.
pub fn is_flagged(v: &[u8]) -> bool {
    let v = v.trim_ascii();
    !(v.is_empty()
        || v == b"0"
        || v.eq_ignore_ascii_case(b"false")
        || v.eq_ignore_ascii_case(b"no"))
}

/// The numeric top-level field `field` of a JSON object, if there is one.
pub fn json_number(body: &[u8], field: &str) -> Option<f64> {
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body).ok()?;
    match map.get(field)? {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|x: &f64| x.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feedback_ids_resolve_once_and_unknown_ones_never() {
        let r = RecentRequests::with_capacity(1024);
        r.remember(b"req-1", 7);
        r.remember(b"req-2", 9);
        assert_eq!(r.take(b"req-1"), Some(7));
        assert_eq!(r.take(b"req-1"), None, "feedback counts once");
        assert_eq!(r.take(b"req-2"), Some(9));
        assert_eq!(r.take(b"never-seen"), None);
    }

    #[test]
    fn a_full_table_forgets_old_ids_rather_than_misattributing_them() {
        let r = RecentRequests::with_capacity(16);
        for i in 0..1000u32 {
            r.remember(format!("id-{i}").as_bytes(), i + 1);
        }
        // The newest id is always answerable; every other answer is the right pair or none.
        assert_eq!(r.take(b"id-999"), Some(1000));
        for i in 0..999u32 {
            if let Some(p) = r.take(format!("id-{i}").as_bytes()) {
                assert_eq!(p, i + 1);
            }
        }
    }

    #[test]
    fn samples_since_returns_only_new_samples_and_at_most_the_ring() {
        let s = Signals::default();
        let mut out = Vec::new();
        for i in 0..10 {
            s.push_sample(f64::from(i));
        }
        s.push_sample(f64::NAN);
        let w = s.samples_since(4, &mut out);
        assert_eq!(w, 10);
        assert_eq!(out, vec![4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
        for i in 0..(SAMPLE_RING as u64 * 2) {
            s.push_sample(i as f64);
        }
        let w2 = s.samples_since(w, &mut out);
        assert_eq!(out.len(), SAMPLE_RING);
        assert_eq!(*out.last().unwrap(), (SAMPLE_RING * 2 - 1) as f64);
        assert_eq!(w2, 10 + SAMPLE_RING as u64 * 2);
    }

    #[test]
    fn guardrail_values_and_json_signals_parse() {
        assert!(is_flagged(b"1"));
        assert!(is_flagged(b"true"));
        assert!(is_flagged(b"violence"));
        assert!(!is_flagged(b""));
        assert!(!is_flagged(b" 0 "));
        assert!(!is_flagged(b"False"));
        assert_eq!(json_number(br#"{"score":0.25,"x":1}"#, "score"), Some(0.25));
        assert_eq!(json_number(br#"{"score":"0.5"}"#, "score"), Some(0.5));
        assert_eq!(json_number(br#"{"inner":{"score":1}}"#, "score"), None);
        assert_eq!(json_number(b"[1,2]", "score"), None);
        assert_eq!(json_number(b"not json", "score"), None);
    }
}
