//! The live routing table: one `ArcSwap`, one writer at a time.
//!
//! Requests call [`Store::load`] (lock-free). Every change, be it a reload, a rollback or a
//! manual override, goes through [`Store::update`]: take the writer lock (cold, never held
//! across `.await`), change the runtime state, compile a new table, swap it in with the next
//! generation. Upstreams (and so connection pools) are cached by version fingerprint and
//! reused by every table that contains the version unchanged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use prometheus_client::metrics::counter::Counter;

use super::table::{compile, Resources, RetryBudget, RuntimeState, Table};
use crate::config::{Config, VersionConfig, VersionName};
use crate::proxy::client::Upstream;
use crate::telemetry::prom::{labels, Metrics};
use crate::telemetry::{PairStats, RetryCounter, Telemetry, VersionCounters};

/// Upstream clients are shared between tables while (version, fingerprint + CA, connect
/// timeout) stays the same, so a swap keeps warm connection pools.
type UpstreamKey = (VersionName, String, Duration);

struct Writer {
    config: Arc<Config>,
    state: RuntimeState,
    generation: u64,
    upstreams: HashMap<UpstreamKey, Arc<Upstream>>,
    /// Retry budgets by route, kept across tables (see `Route::retry_budget`).
    budgets: HashMap<Arc<str>, Arc<RetryBudget>>,
}

pub struct Store {
    table: ArcSwap<Table>,
    writer: Mutex<Writer>,
    pub telemetry: Arc<Telemetry>,
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("generation", &self.table.load().generation)
            .finish()
    }
}

struct Res<'a> {
    upstreams: &'a mut HashMap<UpstreamKey, Arc<Upstream>>,
    budgets: std::cell::RefCell<&'a mut HashMap<Arc<str>, Arc<RetryBudget>>>,
    telemetry: &'a Telemetry,
    metrics: &'a Metrics,
    used: std::cell::RefCell<Vec<UpstreamKey>>,
    created: std::cell::RefCell<Vec<(UpstreamKey, Arc<Upstream>)>>,
}

impl Resources for Res<'_> {
    fn upstream(
        &self,
        v: &VersionConfig,
        connect_timeout: Duration,
    ) -> std::io::Result<Arc<Upstream>> {
        let ca = v
            .ca_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let key = (
            v.name.clone(),
            format!("{}|{ca}", v.fingerprint),
            connect_timeout,
        );
        self.used.borrow_mut().push(key.clone());
        if let Some(u) = self.upstreams.get(&key) {
            return Ok(u.clone());
        }
        let u = Arc::new(Upstream::new(v, connect_timeout)?);
        self.created.borrow_mut().push((key, u.clone()));
        Ok(u)
    }
    fn pair(&self, route: &Arc<str>, version: &VersionName) -> Arc<PairStats> {
        self.telemetry.pair(route, version)
    }
    fn version_counters(&self, version: &VersionName) -> Arc<VersionCounters> {
        self.telemetry.version_counters(version)
    }
    fn retry_counter(
        &self,
        route: &Arc<str>,
        from: &VersionName,
        to: &VersionName,
    ) -> Arc<RetryCounter> {
        self.telemetry.retry_counter(route, from, to)
    }
    fn recent_requests(&self) -> Arc<crate::telemetry::signals::RecentRequests> {
        self.telemetry.recent.clone()
    }
    fn retry_budget(
        &self,
        route: &Arc<str>,
        percent: u32,
        min_per_second: u32,
    ) -> Arc<RetryBudget> {
        let mut budgets = self.budgets.borrow_mut();
        let b = budgets
            .entry(route.clone())
            .or_insert_with(|| Arc::new(RetryBudget::new(percent, min_per_second)));
        if b.settings() != (percent, min_per_second) {
            *b = Arc::new(RetryBudget::new(percent, min_per_second));
        }
        b.clone()
    }
    fn shadow_dropped(&self, route: &Arc<str>, reason: &str) -> Counter {
        self.metrics
            .shadow_dropped
            .get_or_create(&labels(&[("route", route), ("reason", reason)]))
            .clone()
    }
}

/// What one swap did, for audit records.
#[derive(Debug, Clone, Copy)]
pub struct Swap {
    pub generation_before: u64,
    pub generation_after: u64,
    /// Time spent compiling the new table.
    pub compile: Duration,
    /// Time spent in the atomic store itself.
    pub swap: Duration,
}

fn lock(m: &Mutex<Writer>) -> MutexGuard<'_, Writer> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn build(
    w: &mut Writer,
    config: Arc<Config>,
    state: &RuntimeState,
    generation: u64,
    telemetry: &Telemetry,
    metrics: &Metrics,
) -> std::io::Result<Table> {
    let res = Res {
        upstreams: &mut w.upstreams,
        budgets: std::cell::RefCell::new(&mut w.budgets),
        telemetry,
        metrics,
        used: Default::default(),
        created: Default::default(),
    };
    let table = compile(config, state, generation, &res)?;
    let used = res.used.into_inner();
    let created = res.created.into_inner();
    w.budgets
        .retain(|route, _| table.routes.iter().any(|r| &r.name == route));
    w.upstreams.extend(created);
    // Forget upstreams no table uses any more; their pools close when the last in-flight
    // request on the old table is done.
    w.upstreams.retain(|k, _| used.contains(k));
    // Statistics of (route, version) pairs this table no longer has are freed, so memory
    // does not grow with every release name (a returning name starts from zero).
    telemetry.retain(&table);
    Ok(table)
}

impl Store {
    /// Compiles the first table (generation 1).
    pub fn new(
        config: Config,
        state: RuntimeState,
        telemetry: Arc<Telemetry>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let config = Arc::new(config);
        let mut w = Writer {
            config: config.clone(),
            state,
            generation: 1,
            upstreams: HashMap::new(),
            budgets: HashMap::new(),
        };
        let state = w.state.clone();
        let table = build(&mut w, config, &state, 1, &telemetry, &metrics)?;
        let store = Store {
            table: ArcSwap::from_pointee(table),
            writer: Mutex::new(w),
            telemetry,
            metrics,
        };
        store.publish_gauges();
        Ok(store)
    }

    /// The current table, for one request.
    #[inline]
    pub fn load(&self) -> Arc<Table> {
        self.table.load_full()
    }

    pub fn config(&self) -> Arc<Config> {
        lock(&self.writer).config.clone()
    }

    pub fn runtime_state(&self) -> RuntimeState {
        lock(&self.writer).state.clone()
    }

    /// Applies `change` to the runtime state (and optionally a new config), compiles and
    /// swaps. On error nothing changes.
    pub fn update(
        &self,
        new_config: Option<Config>,
        change: impl FnOnce(&mut RuntimeState),
    ) -> std::io::Result<Swap> {
        let mut w = lock(&self.writer);
        let config = new_config.map(Arc::new).unwrap_or_else(|| w.config.clone());
        let mut state = w.state.clone();
        change(&mut state);
        let before = w.generation;
        let t0 = Instant::now();
        let table = build(
            &mut w,
            config.clone(),
            &state,
            before + 1,
            &self.telemetry,
            &self.metrics,
        )?;
        let compiled = t0.elapsed();
        let t1 = Instant::now();
        self.table.store(Arc::new(table));
        let swapped = t1.elapsed();
        w.generation = before + 1;
        w.state = state;
        w.config = config;
        drop(w);
        self.publish_gauges();
        Ok(Swap {
            generation_before: before,
            generation_after: before + 1,
            compile: compiled,
            swap: swapped,
        })
    }

    /// Sets the table-derived gauges (cold: after each swap).
    pub fn publish_gauges(&self) {
        let t = self.load();
        let m = &self.metrics;
        m.routing_table_generation.set(t.generation as i64);
        m.route_weight_ratio.clear();
        m.route_degraded.clear();
        for r in t.routes.iter() {
            for mem in r.members.iter() {
                let ratio = f64::from(mem.weight) / f64::from(r.total_weight.max(1));
                m.route_weight_ratio
                    .get_or_create(&labels(&[
                        ("route", &r.name),
                        ("version", t.versions[mem.version].name.as_str()),
                    ]))
                    .set(ratio);
            }
            m.route_degraded
                .get_or_create(&labels(&[("route", &r.name)]))
                .set(i64::from(r.degraded));
            // Rollback counters exist at 0 before the first rollback, so `increase()` and
            // alert rules see that one too.
            let _ = m
                .rollback_completed
                .get_or_create(&labels(&[("route", &r.name)]));
            for trigger in crate::evaluator::rules::Trigger::ALL {
                let _ = m.rollback_triggered.get_or_create(&labels(&[
                    ("route", &r.name),
                    ("trigger", trigger.as_str()),
                ]));
            }
        }
        m.version_quarantined.clear();
        m.version_healthy.clear();
        for v in t.versions.iter() {
            let l = labels(&[("version", v.name.as_str())]);
            m.version_quarantined
                .get_or_create(&l)
                .set(i64::from(v.quarantined));
            m.version_healthy
                .get_or_create(&l)
                .set(i64::from(v.upstream.any_healthy()));
        }
    }
}
