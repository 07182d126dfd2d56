//! Telemetry: in-line request statistics, sliding windows, Prometheus exposition.
//!
//! [`Telemetry`] owns every statistics handle. The routing table asks it for handles when it
//! is compiled (cold path, short lock), so handles, and with them counters, windows and
//! history, survive table swaps and config reloads for as long as the (route, version) pair
//! exists. After each compile the store hands the new table to [`Telemetry::retain`], which
//! frees the handles no table uses any more: memory follows the config, not every release
//! name ever seen, and a version that comes back starts from zero.

pub mod access_log;
pub mod prom;
pub mod recorder;
pub mod signals;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::VersionName;
pub use recorder::{
    Class, HistoryClock, HistoryPoint, PairStats, RetryCounter, Ring, RingSlot, SlotClock,
    UpstreamErrorKind, VersionCounters, WindowStats, HISTORY_SECS,
};

/// Pair ids are remembered for feedback in 16 bits ([`signals::RecentRequests`]): ids are
/// handed out round-robin in `1..=MAX_PAIR_ID`, skipping live ones, so a freed id comes back
/// only after 65,535 newer pairs (far longer than an id stays answerable).
const MAX_PAIR_ID: u32 = u16::MAX as u32;

/// The registry of statistics handles. Its lock is cold: taken when a table is compiled and
/// when statistics are read, never on the request path.
pub struct Telemetry {
    shards: usize,
    inner: Mutex<Inner>,
    /// Recent request ids and who answered them, for feedback.
    pub recent: Arc<signals::RecentRequests>,
    /// The one-second grid every pair's history sits on.
    history_clock: HistoryClock,
}

#[derive(Default)]
struct Inner {
    window: Duration,
    next_pair_id: u32,
    /// Ids past [`MAX_PAIR_ID`] handed out while every id below was live.
    overflow_ids: u32,
    pairs: BTreeMap<(Arc<str>, VersionName), Arc<PairStats>>,
    by_id: HashMap<u32, Arc<PairStats>>,
    versions: BTreeMap<VersionName, Arc<VersionCounters>>,
    retries: BTreeMap<(Arc<str>, VersionName, VersionName), Arc<RetryCounter>>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("shards", &self.shards)
            .finish()
    }
}

impl Telemetry {
    pub fn new(window: Duration) -> Self {
        let shards = std::thread::available_parallelism().map_or(2, |n| n.get());
        Telemetry {
            shards,
            inner: Mutex::new(Inner {
                window,
                ..Inner::default()
            }),
            recent: Arc::new(signals::RecentRequests::default()),
            history_clock: HistoryClock::now(),
        }
    }

    /// The grid of history points: Unix second of slot 0, one slot a second.
    pub fn history_clock(&self) -> HistoryClock {
        self.history_clock
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The statistics of `version` on `route`, created on first use.
    pub fn pair(&self, route: &Arc<str>, version: &VersionName) -> Arc<PairStats> {
        let mut g = self.inner();
        let key = (route.clone(), version.clone());
        if let Some(p) = g.pairs.get(&key) {
            return p.clone();
        }
        let mut p = PairStats::with_history_clock(
            route.clone(),
            version.clone(),
            self.shards,
            g.window,
            self.history_clock,
        );
        p.id = g.allocate_id();
        let p = Arc::new(p);
        g.by_id.insert(p.id, p.clone());
        g.pairs.insert(key, p.clone());
        p
    }

    /// The pair registered under `id`.
    pub fn pair_by_id(&self, id: u32) -> Option<Arc<PairStats>> {
        self.inner().by_id.get(&id).cloned()
    }

    /// Frees every handle `table` does not hold: (route, version) statistics (windows,
    /// history, signals), per-version counters and retry counters. The store calls it with
    /// each table it compiles, under its writer lock, so no newer table's handles can be
    /// dropped; requests still in flight on an older table finish on their own `Arc`s, and
    /// what they record is not counted anywhere. Series of `/metrics` come from this
    /// registry at scrape time, so freed pairs leave the exposition too, and a pair that
    /// comes back later starts from zero (the evaluator starts its comparison afresh).
    pub fn retain(&self, table: &crate::routing::table::Table) {
        let key = |p: *const ()| p as usize;
        let mut pairs = HashSet::new();
        let mut retries = HashSet::new();
        for r in table.routes.iter() {
            for m in r.members.iter() {
                pairs.insert(key(Arc::as_ptr(&m.stats).cast()));
                retries.insert(key(Arc::as_ptr(&m.retries_to_baseline).cast()));
            }
            for p in r.standby_pairs.iter() {
                pairs.insert(key(Arc::as_ptr(p).cast()));
            }
            for c in r.standby_retries.iter() {
                retries.insert(key(Arc::as_ptr(c).cast()));
            }
        }
        let versions: HashSet<usize> = table
            .versions
            .iter()
            .map(|v| key(Arc::as_ptr(&v.counters).cast()))
            .collect();
        let mut g = self.inner();
        g.pairs
            .retain(|_, p| pairs.contains(&key(Arc::as_ptr(p).cast())));
        g.by_id
            .retain(|_, p| pairs.contains(&key(Arc::as_ptr(p).cast())));
        g.versions
            .retain(|_, v| versions.contains(&key(Arc::as_ptr(v).cast())));
        g.retries
            .retain(|_, r| retries.contains(&key(Arc::as_ptr(r).cast())));
    }

    /// How many handles the registry holds.
    pub fn registered(&self) -> Registered {
        let g = self.inner();
        Registered {
            pairs: g.pairs.len(),
            versions: g.versions.len(),
            retries: g.retries.len(),
        }
    }

    pub fn version_counters(&self, version: &VersionName) -> Arc<VersionCounters> {
        self.inner()
            .versions
            .entry(version.clone())
            .or_default()
            .clone()
    }

    pub fn retry_counter(
        &self,
        route: &Arc<str>,
        from: &VersionName,
        to: &VersionName,
    ) -> Arc<RetryCounter> {
        self.inner()
            .retries
            .entry((route.clone(), from.clone(), to.clone()))
            .or_insert_with(|| {
                Arc::new(RetryCounter {
                    route: route.clone(),
                    from: from.clone(),
                    to: to.clone(),
                    count: Default::default(),
                })
            })
            .clone()
    }

    /// Merges every recorder's shards; called every evaluator tick and before reads.
    pub fn flush(&self, now: Instant) {
        for p in self.pairs() {
            p.flush(now);
        }
    }

    pub fn pairs(&self) -> Vec<Arc<PairStats>> {
        self.inner().pairs.values().cloned().collect()
    }

    pub fn versions(&self) -> Vec<(VersionName, Arc<VersionCounters>)> {
        self.inner()
            .versions
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn retries(&self) -> Vec<Arc<RetryCounter>> {
        self.inner().retries.values().cloned().collect()
    }

    /// Window statistics of `version` summed over every route it serves.
    pub fn version_window(&self, version: &VersionName, now: Instant) -> WindowStats {
        let pairs: Vec<_> = self
            .inner()
            .pairs
            .values()
            .filter(|p| &p.version == version)
            .cloned()
            .collect();
        let mut merged: Option<recorder::WindowSnapshot> = None;
        for p in pairs {
            let w = p.window(now);
            match &mut merged {
                None => merged = Some(w),
                Some(m) => m.merge(&w),
            }
        }
        merged.map(|m| m.stats()).unwrap_or_default()
    }
}

/// Handles held by a [`Telemetry`] registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    pub pairs: usize,
    pub versions: usize,
    pub retries: usize,
}

impl Inner {
    /// The next free pair id, round-robin in `1..=MAX_PAIR_ID` (see [`MAX_PAIR_ID`]).
    fn allocate_id(&mut self) -> u32 {
        for _ in 0..MAX_PAIR_ID {
            self.next_pair_id = self.next_pair_id % MAX_PAIR_ID + 1;
            if !self.by_id.contains_key(&self.next_pair_id) {
                return self.next_pair_id;
            }
        }
        // Every id feedback can name is live: this pair's answers are not remembered.
        self.overflow_ids = self.overflow_ids.wrapping_add(1);
        MAX_PAIR_ID.saturating_add(self.overflow_ids)
    }
}

/// Re-exported for benches: the request path's recording call.
pub fn record(stats: &PairStats, class: Class, code: u16, ttfb: Option<Duration>, total: Duration) {
    stats.record(class, code, ttfb, total);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_ids_go_round_robin_and_skip_live_ones() {
        let t = Telemetry::new(Duration::from_secs(30));
        let route: Arc<str> = "r".into();
        let a = t.pair(&route, &"a".into());
        let b = t.pair(&route, &"b".into());
        assert_eq!((a.id, b.id), (1, 2));
        assert!(
            Arc::ptr_eq(&t.pair(&route, &"a".into()), &a),
            "one pair per name"
        );
        assert!(Arc::ptr_eq(&t.pair_by_id(2).unwrap(), &b));
        // Near the end of the range: ids wrap to 1 and skip the live ones (1 and 2).
        t.inner().next_pair_id = MAX_PAIR_ID - 1;
        let c = t.pair(&route, &"c".into());
        let d = t.pair(&route, &"d".into());
        assert_eq!((c.id, d.id), (MAX_PAIR_ID, 3));
        assert_eq!(t.registered().pairs, 4);
    }
}
