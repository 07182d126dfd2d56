//! Telemetry: in-line request statistics, sliding windows, Prometheus exposition.
//!
//! [`Telemetry`] owns every statistics handle. The routing table asks it for handles when it
//! is compiled (cold path, short lock), so handles, and with them counters, windows and
//! history, survive table swaps and config reloads for as long as the (route, version) pair
//! exists.

pub mod access_log;
pub mod prom;
pub mod recorder;
pub mod signals;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::VersionName;
pub use recorder::{
    Class, HistoryClock, HistoryPoint, PairStats, RetryCounter, Ring, RingSlot, SlotClock,
    UpstreamErrorKind, VersionCounters, WindowStats, HISTORY_SECS,
};

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
    pairs: BTreeMap<(Arc<str>, VersionName), Arc<PairStats>>,
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
        let g = &mut *g;
        let window = g.window;
        g.pairs
            .entry((route.clone(), version.clone()))
            .or_insert_with(|| {
                g.next_pair_id += 1;
                let mut p = PairStats::with_history_clock(
                    route.clone(),
                    version.clone(),
                    self.shards,
                    window,
                    self.history_clock,
                );
                p.id = g.next_pair_id;
                Arc::new(p)
            })
            .clone()
    }

    /// The pair registered under `id` (control path: a scan).
    pub fn pair_by_id(&self, id: u32) -> Option<Arc<PairStats>> {
        self.inner().pairs.values().find(|p| p.id == id).cloned()
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

/// Re-exported for benches: the request path's recording call.
pub fn record(stats: &PairStats, class: Class, code: u16, ttfb: Option<Duration>, total: Duration) {
    stats.record(class, code, ttfb, total);
}
