//! Per-pair signals beyond counts and latency, for the `safety_violations`, `drift` and
//! `accuracy_drop` rules, and the map from recent request ids to the pair that answered
//! them (for `POST /api/v1/feedback`). Everything on the request path here is a few relaxed
//! atomic operations on one cache line: no lock, no allocation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::xxh3_64;

use super::recorder::Ring;

/// Numeric samples kept per pair for the drift test: the most recent ones win.
pub const SAMPLE_RING: usize = 2048;

/// Request ids remembered for feedback (a power of two): 8 bytes a slot, 8 MiB. See
/// [`RecentRequests`] for how long an id stays answerable at a given request rate.
pub const RECENT_REQUESTS: usize = 1 << 20;

/// Signals of one (route, version) pair.
pub struct Signals {
    /// Responses a guardrail flagged (the `safety_violations` header was set).
    flagged: AtomicU64,
    /// Feedback received, and how much of it said "incorrect".
    feedback: AtomicU64,
    incorrect: AtomicU64,
    /// Recent drift samples (`f64` bits), indexed by sample number: its head counts every
    /// sample ever pushed.
    samples: Ring<AtomicU64>,
}

impl Default for Signals {
    fn default() -> Self {
        Signals {
            flagged: AtomicU64::new(0),
            feedback: AtomicU64::new(0),
            incorrect: AtomicU64::new(0),
            samples: Ring::new(SAMPLE_RING, || AtomicU64::new(0)),
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
        let (_, slot) = self.samples.claim();
        slot.store(x.to_bits(), Ordering::Relaxed);
    }

    pub fn counts(&self) -> SignalCounts {
        SignalCounts {
            flagged: self.flagged.load(Ordering::Relaxed),
            feedback: self.feedback.load(Ordering::Relaxed),
            incorrect: self.incorrect.load(Ordering::Relaxed),
            samples: self.samples.head(),
        }
    }

    /// Copies the samples pushed after the first `since` (at most the ring's size, the newest)
    /// into `out`, and returns the total written so far. A sample being written concurrently
    /// may be read as its predecessor in that slot: harmless for a distribution test.
    pub fn samples_since(&self, since: u64, out: &mut Vec<f64>) -> u64 {
        out.clear();
        let held = self.samples.held();
        for i in held.start.max(since)..held.end {
            out.push(f64::from_bits(self.samples.slot(i).load(Ordering::Relaxed)));
        }
        held.end
    }
}

/// Recent request id → id of the pair that answered it, for feedback that arrives minutes
/// after the answer (a human or an LLM judge).
///
/// A set-associative table: an id hashes (xxh3) to a bucket of [`WAYS`] slots, one cache
/// line, and each slot is one `u64` packing a 28-bit tag from the hash, the second it was
/// remembered (20 bits, wrapping every 12 days) and the pair id (16 bits). A new id takes
/// the way that already holds its tag, else an empty or expired one, else the oldest: each
/// bucket keeps its most recent ids. A lookup needs a matching tag, so a forgotten or
/// unknown id reads as unknown rather than as another request's pair (an unknown id
/// matches some tag with probability 8 / 2^28, about 3 in 100 million); it clears the slot
/// with a compare-exchange, so feedback on a request counts once however many arrive.
/// Entries older than the TTL ([`FEEDBACK_TTL`]) read as unknown.
///
/// Retention, default size (2^20 slots, 8 MiB): an id is lost once its bucket has taken 8
/// newer ids, so after `t` seconds at `r` requests/s it is still answerable with probability
/// P(Poisson(r·t / 131,072) ≤ 7):
///
/// | rate | 99 % answerable | 90 % | 50 % |
/// |---|---|---|---|
/// | 1,000 req/s | 6.3 min | 10 min | 17 min |
/// | 10,000 req/s | 38 s | 61 s | 100 s |
///
/// Below about 200 req/s the 30-minute TTL, not the size, ends an id's life. To keep ids
/// for `t` seconds at `r` req/s with 99 %, a table needs about 2.8·r·t slots
/// ([`RecentRequests::with_capacity`]). The old direct-mapped table of 2^18 slots kept 32 %
/// of ids for 5 minutes at 1,000 req/s; this one keeps 99.7 %.
///
/// On the request path, [`remember`](Self::remember) reads the clock (vDSO, no syscall),
/// loads one cache line and stores one word, all relaxed: no lock, no allocation.
pub struct RecentRequests {
    /// `buckets × WAYS` slots from `base`, plus up to `WAYS - 1` slots of slack before it
    /// so that every bucket starts on a 64-byte boundary (one cache line).
    slots: Box<[AtomicU64]>,
    base: usize,
    /// Number of buckets − 1 (a power of two).
    mask: usize,
    /// Entries this many seconds old or older read as unknown (1 ..= half the clock's wrap).
    ttl_s: u64,
    /// Second 0 of the coarse clock.
    epoch: Instant,
}

/// How long at most a request id stays answerable for feedback.
pub const FEEDBACK_TTL: Duration = Duration::from_secs(30 * 60);

/// Slots per bucket: 8 × 8 bytes, one cache line.
pub const WAYS: usize = 8;

const PAIR_BITS: u32 = 16;
const TIME_BITS: u32 = 20;
/// The tag is the hash's top 28 bits, stored in the slot's top 28 bits.
const TAG_SHIFT: u32 = PAIR_BITS + TIME_BITS;
const PAIR_MASK: u64 = (1 << PAIR_BITS) - 1;
const TIME_MASK: u64 = (1 << TIME_BITS) - 1;
/// The largest table: bucket indexes use the hash's low 32 bits, which must not overlap
/// the tag (bits 36..64) or the way a bucket's scan starts at (bits 32..35).
const MAX_SLOTS: usize = WAYS << 32;

impl Default for RecentRequests {
    fn default() -> Self {
        Self::with_capacity(RECENT_REQUESTS)
    }
}

impl std::fmt::Debug for RecentRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecentRequests")
            .field("capacity", &self.capacity())
            .field("ttl_s", &self.ttl_s)
            .finish()
    }
}

impl RecentRequests {
    /// `capacity` slots, rounded up to a power of two (at least [`WAYS`]), with the default
    /// TTL.
    pub fn with_capacity(capacity: usize) -> Self {
        Self::with_capacity_and_ttl(capacity, FEEDBACK_TTL)
    }

    /// `capacity` as in [`with_capacity`](Self::with_capacity); ids older than `ttl` (whole
    /// seconds, at least 1, at most 6 days) read as unknown.
    pub fn with_capacity_and_ttl(capacity: usize, ttl: Duration) -> Self {
        let n = capacity.clamp(WAYS, MAX_SLOTS).next_power_of_two();
        // `vec![0; _]` is a zeroed allocation (calloc, or mimalloc's fresh arena pages), so
        // slots never written cost no RSS; the in-place `map` reuses that allocation and
        // optimises to nothing in release builds (checked: 8 MiB table, RSS unchanged).
        let slots: Box<[AtomicU64]> = vec![0u64; n + WAYS - 1]
            .into_iter()
            .map(AtomicU64::new)
            .collect();
        // Allocations are 8-byte aligned: skip 0..=7 slots to reach a cache-line boundary.
        let addr = slots.as_ptr() as usize;
        let base = (64 - addr % 64) % 64 / std::mem::size_of::<AtomicU64>();
        RecentRequests {
            slots,
            base,
            mask: n / WAYS - 1,
            ttl_s: ttl.as_secs().clamp(1, TIME_MASK / 2),
            epoch: Instant::now(),
        }
    }

    /// How many ids the table holds at most.
    pub fn capacity(&self) -> usize {
        (self.mask + 1) * WAYS
    }

    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_s)
    }

    /// Seconds since the table was made: the clock `remember` and `take` use.
    #[inline]
    pub fn now_s(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    /// The bucket's slots, the tag, and the way a scan starts at (so that ties between
    /// equally old ways fall on different ways for different ids).
    #[inline]
    fn locate(&self, id: &[u8]) -> (&[AtomicU64], u64, usize) {
        let h = xxh3_64(id);
        let start = self.base + (h as usize & self.mask) * WAYS;
        let way = (h >> 32) as usize % WAYS;
        (&self.slots[start..start + WAYS], h >> TAG_SHIFT, way)
    }

    #[inline]
    fn age(&self, slot: u64, now_s: u64) -> u64 {
        now_s.wrapping_sub(slot >> PAIR_BITS) & TIME_MASK
    }

    /// Remembers that `pair` answered request `id`. `pair` must be non-zero and at most
    /// 65,535 (pair ids are handed out from 1 as (route, version) pairs appear); any other
    /// is not remembered, so its feedback reads as unknown rather than as a wrong pair.
    #[inline]
    pub fn remember(&self, id: &[u8], pair: u32) {
        self.remember_at(id, pair, self.now_s());
    }

    /// [`remember`](Self::remember) at second `now_s` of the table's clock (tests).
    pub fn remember_at(&self, id: &[u8], pair: u32, now_s: u64) {
        let pair = u64::from(pair);
        if pair == 0 || pair > PAIR_MASK {
            return;
        }
        let (ways, tag, first) = self.locate(id);
        let new = (tag << TAG_SHIFT) | ((now_s & TIME_MASK) << PAIR_BITS) | pair;
        // The victim: this id's own way if it has one, else an empty or expired way, else
        // the oldest; among equals, the first from a way that depends on the id.
        let (mut victim, mut best) = (first, 0u64);
        for k in 0..WAYS {
            let w = (first + k) % WAYS;
            let v = ways[w].load(Ordering::Relaxed);
            let rank = if v == 0 {
                u64::MAX - 1
            } else if v >> TAG_SHIFT == tag {
                u64::MAX
            } else {
                match self.age(v, now_s) {
                    age if age >= self.ttl_s => u64::MAX - 1,
                    age => age,
                }
            };
            if k == 0 || rank > best {
                (victim, best) = (w, rank);
            }
        }
        // A plain store, not a compare-exchange: a locked instruction would stall the
        // request on the cache miss. Two requests remembered into the same bucket within
        // the same few nanoseconds may pick the same way and one id is lost (one in 10^8 at
        // 10,000 req/s); no slot ever holds a mix of two ids, so none is misattributed.
        ways[victim].store(new, Ordering::Relaxed);
    }

    /// The pair that answered `id`, once: a second lookup of the same id finds nothing, so
    /// each request's feedback counts at most once. Unknown, forgotten and expired ids read
    /// as `None`.
    pub fn take(&self, id: &[u8]) -> Option<u32> {
        self.take_at(id, self.now_s())
    }

    /// [`take`](Self::take) at second `now_s` of the table's clock (tests).
    pub fn take_at(&self, id: &[u8], now_s: u64) -> Option<u32> {
        let (ways, tag, _) = self.locate(id);
        for cell in ways {
            let v = cell.load(Ordering::Relaxed);
            if v == 0 || v >> TAG_SHIFT != tag || self.age(v, now_s) >= self.ttl_s {
                continue;
            }
            // Fails if another `take` got it first, or a `remember` replaced it.
            if cell
                .compare_exchange(v, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                return Some((v & PAIR_MASK) as u32);
            }
        }
        None
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

    fn id(i: u64) -> Vec<u8> {
        format!("req-{i:016x}").into_bytes()
    }

    #[test]
    fn ids_from_five_minutes_ago_are_answerable_at_1000_requests_per_second() {
        // 10 minutes at 1,000 req/s into the default table, then feedback at minute 10 on
        // requests from minute 5 (remembered at 300..360 s) and from 240..300 s.
        let r = RecentRequests::default();
        let rate = 1_000u64;
        for i in 0..600 * rate {
            r.remember_at(&id(i), (i % 40) as u32 + 1, i / rate);
        }
        let now = 600;
        for from_s in [300, 240] {
            let sample: Vec<u64> = (from_s * rate..(from_s + 60) * rate).step_by(3).collect();
            let mut found = 0;
            for &i in &sample {
                if let Some(p) = r.take_at(&id(i), now) {
                    assert_eq!(p, (i % 40) as u32 + 1, "request {i} misattributed");
                    found += 1;
                }
            }
            let share = found as f64 / sample.len() as f64;
            assert!(
                share >= 0.99,
                "ids remembered at {from_s}..{} s: {found}/{} answerable at {now} s ({:.2} %)",
                from_s + 60,
                sample.len(),
                share * 100.0
            );
        }
    }

    #[test]
    fn ids_expire_after_the_ttl_and_unknown_ones_read_as_none() {
        let r = RecentRequests::with_capacity_and_ttl(1 << 10, Duration::from_secs(60));
        assert_eq!(r.ttl(), Duration::from_secs(60));
        assert_eq!(r.capacity(), 1 << 10);
        r.remember_at(b"old", 3, 100);
        r.remember_at(b"young", 4, 100);
        assert_eq!(r.take_at(b"old", 160), None, "60 s old: expired");
        assert_eq!(r.take_at(b"young", 159), Some(4), "59 s old: still known");
        assert_eq!(
            r.take_at(b"young", 159),
            None,
            "a second take finds nothing"
        );
        // The default TTL is 30 minutes.
        let d = RecentRequests::with_capacity(64);
        assert_eq!(d.ttl(), FEEDBACK_TTL);
        d.remember_at(b"a", 1, 10);
        assert_eq!(d.take_at(b"a", 10 + 30 * 60), None);
        d.remember_at(b"b", 2, 10);
        assert_eq!(d.take_at(b"b", 10 + 30 * 60 - 1), Some(2));
    }

    #[test]
    fn a_full_bucket_evicts_its_oldest_ids() {
        // One bucket of 8 ways: 4 ids at second 0, 4 at 10, then 4 at 20 replace the first 4.
        let s = RecentRequests::with_capacity(WAYS);
        for i in 0..12u64 {
            s.remember_at(&id(i), i as u32 + 1, i / 4 * 10);
        }
        for i in 0..4u64 {
            assert_eq!(s.take_at(&id(i), 20), None, "id {i} was the oldest");
        }
        for i in 4..12u64 {
            assert_eq!(s.take_at(&id(i), 20), Some(i as u32 + 1), "id {i}");
        }
    }

    #[test]
    fn pair_ids_that_do_not_fit_are_not_remembered() {
        let r = RecentRequests::with_capacity(64);
        r.remember_at(b"zero", 0, 1);
        r.remember_at(b"big", 1 << 16, 1);
        r.remember_at(b"max", 65_535, 1);
        assert_eq!(r.take_at(b"zero", 1), None);
        assert_eq!(r.take_at(b"big", 1), None);
        assert_eq!(r.take_at(b"max", 1), Some(65_535));
    }

    #[test]
    fn remembering_an_id_again_replaces_its_pair() {
        let r = RecentRequests::with_capacity(64);
        r.remember_at(b"retried", 5, 1);
        r.remember_at(b"retried", 6, 2);
        assert_eq!(r.take_at(b"retried", 3), Some(6));
        assert_eq!(r.take_at(b"retried", 3), None, "one entry, not two");
    }

    #[test]
    fn the_clock_wraps_without_reviving_or_killing_entries() {
        let r = RecentRequests::with_capacity_and_ttl(64, Duration::from_secs(60));
        let wrap = 1u64 << 20;
        r.remember_at(b"across", 9, wrap - 10);
        assert_eq!(
            r.take_at(b"across", wrap + 10),
            Some(9),
            "20 s old across the wrap"
        );
        r.remember_at(b"late", 9, wrap - 10);
        assert_eq!(
            r.take_at(b"late", wrap + 60),
            None,
            "70 s old across the wrap"
        );
    }

    #[test]
    fn buckets_start_on_a_cache_line() {
        for cap in [8, 64, 1 << 12] {
            let r = RecentRequests::with_capacity(cap);
            assert_eq!(r.capacity(), cap);
            let first = &r.slots[r.base] as *const AtomicU64 as usize;
            assert_eq!(first % 64, 0);
            assert!(r.base + r.capacity() <= r.slots.len());
        }
    }

    #[test]
    fn concurrent_remembers_and_takes_lose_little() {
        use std::sync::Arc;
        // 2 threads remember 100,000 ids (10 % of the table) while a third takes 20,000
        // others remembered before; every answer is the right pair, and at most 0.1 % of
        // the ids are lost to races or full buckets.
        let r = Arc::new(RecentRequests::default());
        let n = 50_000u64;
        let taken_ids = 1_000_000..1_020_000u64;
        for i in taken_ids.clone() {
            r.remember_at(&id(i), 7, 5);
        }
        let writers: Vec<_> = (0..2u64)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for i in t * n..(t + 1) * n {
                        r.remember_at(&id(i), (i % 100) as u32 + 1, 10);
                    }
                })
            })
            .collect();
        let taker = {
            let r = r.clone();
            let ids = taken_ids.clone();
            std::thread::spawn(move || ids.filter(|&i| r.take_at(&id(i), 10) == Some(7)).count())
        };
        for w in writers {
            w.join().unwrap();
        }
        let taken = taker.join().unwrap();
        let mut found = 0;
        for i in 0..2 * n {
            if let Some(p) = r.take_at(&id(i), 11) {
                assert_eq!(p, (i % 100) as u32 + 1);
                found += 1;
            }
        }
        let lost = 2 * n - found;
        assert!(lost <= 2 * n / 1000, "lost {lost} of {}", 2 * n);
        assert!(taken as u64 >= 20_000 - 20, "taken {taken} of 20,000");
        for i in taken_ids {
            assert_eq!(r.take_at(&id(i), 11), None, "taken once");
        }
    }

    #[test]
    fn unknown_ids_never_read_as_another_requests_pair() {
        // A full, small table: every known id answers its own pair or nothing, and none of
        // 20,000 ids never remembered matches.
        let r = RecentRequests::with_capacity(64);
        for i in 0..10_000u64 {
            r.remember_at(&id(i), (i % 60_000) as u32 + 1, i / 100);
        }
        for i in 20_000..40_000u64 {
            assert_eq!(r.take_at(&id(i), 100), None, "unknown id {i}");
        }
        let mut found = 0;
        for i in 0..10_000u64 {
            if let Some(p) = r.take_at(&id(i), 100) {
                assert_eq!(p, (i % 60_000) as u32 + 1);
                found += 1;
            }
        }
        assert!((56..=64).contains(&found), "{found} of the newest ids kept");
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
