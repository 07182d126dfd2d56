//! Prometheus exposition (prometheus-client).
//!
//! Request statistics live in [`super::PairStats`] and are encoded at scrape time by a
//! custom collector, so the request path never touches a metric family. Gauges that change
//! only when the routing table changes (weights, quarantine, health, generation) are plain
//! prometheus-client families set at swap time.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram as PromHistogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use super::recorder::{Class, CODES};
use super::{Telemetry, UpstreamErrorKind};

/// Histogram bucket bounds in seconds: from a fast classifier to a long generation.
const BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

type Labels = Vec<(Cow<'static, str>, String)>;

/// Every metric rollgate exports.
pub struct Metrics {
    registry: Registry,
    pub route_weight_ratio: Family<Labels, Gauge<f64, AtomicU64>>,
    pub version_quarantined: Family<Labels, Gauge>,
    pub version_healthy: Family<Labels, Gauge>,
    pub routing_table_generation: Gauge,
    pub rollback_triggered: Family<Labels, Counter>,
    pub rollback_completed: Family<Labels, Counter>,
    pub rollback_duration: PromHistogram,
    pub rollback_drill_timestamp: Gauge<f64, AtomicU64>,
    pub config_reloads: Family<Labels, Counter>,
    pub config_last_reload_successful: Gauge,
    pub route_degraded: Family<Labels, Gauge>,
    pub requests_shed: Counter,
    /// Shadow copies not sent, by route and reason (SPEC section 4: shed first under load).
    pub shadow_dropped: Family<Labels, Counter>,
    /// Access log lines dropped because the writer fell behind (SPEC section 7).
    pub access_log_dropped: Counter,
    /// Each candidate's evidence per rule as a fraction of what trips it (1 trips).
    pub evidence_ratio: Family<Labels, Gauge<f64, AtomicU64>>,
    /// Fleet (SPEC section 10), exported only when `fleet:` is configured ([`Self::with_fleet`]).
    pub fleet_store_up: Gauge,
    pub fleet_replicas: Gauge,
    pub fleet_apply_lag: PromHistogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

pub fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (Cow::Borrowed(*k), (*v).to_string()))
        .collect()
}

impl Metrics {
    pub fn new(telemetry: Arc<Telemetry>) -> Self {
        let mut registry = Registry::with_prefix("rollgate");
        let m = Metrics {
            route_weight_ratio: Family::default(),
            version_quarantined: Family::default(),
            version_healthy: Family::default(),
            routing_table_generation: Gauge::default(),
            rollback_triggered: Family::default(),
            rollback_completed: Family::default(),
            rollback_duration: PromHistogram::new([
                0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
            ]),
            rollback_drill_timestamp: Gauge::default(),
            config_reloads: Family::default(),
            config_last_reload_successful: Gauge::default(),
            route_degraded: Family::default(),
            requests_shed: Counter::default(),
            shadow_dropped: Family::default(),
            access_log_dropped: Counter::default(),
            evidence_ratio: Family::default(),
            fleet_store_up: Gauge::default(),
            fleet_replicas: Gauge::default(),
            fleet_apply_lag: PromHistogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0,
            ]),
            registry: Registry::default(),
        };
        // Counters exist from the start, at 0, so `increase()` sees their first event.
        for result in ["ok", "error"] {
            let _ = m
                .config_reloads
                .get_or_create(&labels(&[("result", result)]));
        }
        m.config_last_reload_successful.set(1);
        registry.register(
            "route_weight_ratio",
            "Effective share of a route's new traffic per version (0..1)",
            m.route_weight_ratio.clone(),
        );
        registry.register(
            "evidence_ratio",
            "A candidate's evidence against it per rule, as a fraction of the level that rolls it back (1 trips; log e-value over log threshold for statistical rules)",
            m.evidence_ratio.clone(),
        );
        registry.register(
            "version_quarantined",
            "1 while the version is rolled back",
            m.version_quarantined.clone(),
        );
        registry.register(
            "version_healthy",
            "1 while at least one endpoint passes health checks",
            m.version_healthy.clone(),
        );
        registry.register(
            "routing_table_generation",
            "Generation of the routing table in use",
            m.routing_table_generation.clone(),
        );
        registry.register(
            "rollback_triggered",
            "Rollbacks triggered, by rule",
            m.rollback_triggered.clone(),
        );
        registry.register(
            "rollback_completed",
            "Rollbacks whose table swap completed",
            m.rollback_completed.clone(),
        );
        registry.register(
            "rollback_duration_seconds",
            "Trip-to-swap time of rollbacks",
            m.rollback_duration.clone(),
        );
        registry.register(
            "rollback_drill_timestamp_seconds",
            "Unix time of the last rollback drill",
            m.rollback_drill_timestamp.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads, by result",
            m.config_reloads.clone(),
        );
        registry.register(
            "config_last_reload_successful",
            "1 if the last config reload was applied, 0 while a rejected file is in place",
            m.config_last_reload_successful.clone(),
        );
        registry.register(
            "route_degraded",
            "1 while the route serves without a healthy baseline",
            m.route_degraded.clone(),
        );
        registry.register(
            "requests_shed",
            "Requests refused by the in-flight cap",
            m.requests_shed.clone(),
        );
        registry.register(
            "shadow_dropped",
            "Shadow copies not sent, by route and reason (shed first under load)",
            m.shadow_dropped.clone(),
        );
        registry.register(
            "access_log_dropped",
            "Access log lines dropped because the writer could not keep up",
            m.access_log_dropped.clone(),
        );
        registry.register(
            "build",
            "rollgate build information",
            Info::new(vec![(
                "version".to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            )]),
        );
        registry.register_collector(Box::new(RequestCollector(telemetry)));
        Metrics { registry, ..m }
    }

    /// Registers the fleet's metrics (a replica in a fleet exports them; one alone does not).
    pub fn with_fleet(mut self) -> Self {
        self.registry.register(
            "fleet_store_up",
            "1 while the fleet's store answers",
            self.fleet_store_up.clone(),
        );
        self.registry.register(
            "fleet_replicas",
            "Replicas of the fleet seen in the last 3 s, this one included",
            self.fleet_replicas.clone(),
        );
        self.registry.register(
            "fleet_apply_lag_seconds",
            "From a decision on any replica to its table swap on this one",
            self.fleet_apply_lag.clone(),
        );
        self
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Encodes the request statistics of every (route, version) at scrape time.
#[derive(Debug)]
struct RequestCollector(Arc<Telemetry>);

/// Per-bucket (not cumulative) counts, as `encode_histogram` sums them itself, ending with
/// the `+Inf` bucket, so the last cumulative bucket equals the count.
fn histogram_buckets(h: &hdrhistogram::Histogram<u64>) -> Vec<(f64, u64)> {
    let mut out = Vec::with_capacity(BUCKETS.len() + 1);
    let mut below = 0u64;
    for b in BUCKETS {
        let cumulative = if h.is_empty() {
            0
        } else {
            h.count_between(0, (b * 1e6) as u64).clamp(below, h.len())
        };
        out.push((b, cumulative - below));
        below = cumulative;
    }
    out.push((f64::INFINITY, h.len() - below));
    out
}

impl prometheus_client::collector::Collector for RequestCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let t = &self.0;
        t.flush(Instant::now());
        let pairs = t.pairs();
        let cum: Vec<_> = pairs.iter().map(|p| (p, p.cumulative())).collect();

        let mut enc = encoder.encode_descriptor(
            "requests",
            "Requests by route, version, status code and classification (only `error` counts against a version)",
            None,
            MetricType::Counter,
        )?;
        let mut code_buf = String::new();
        for (p, c) in &cum {
            for class in Class::ALL {
                for code in 0..CODES {
                    let n = c.counts[class as usize * CODES + code];
                    if n == 0 {
                        continue;
                    }
                    code_buf.clear();
                    use std::fmt::Write;
                    let _ = write!(code_buf, "{code}");
                    let l: [(&str, &str); 4] = [
                        ("route", &p.route),
                        ("version", p.version.as_str()),
                        ("code", &code_buf),
                        ("classification", class.as_str()),
                    ];
                    let fam = enc.encode_family(&l)?;
                    ConstCounter::new(n).encode(fam)?;
                }
            }
        }

        for (name, help, pick) in [
            (
                "request_duration_seconds",
                "Time to the end of the response body",
                0,
            ),
            (
                "time_to_first_byte_seconds",
                "Time to the first response body byte (TTFT for streams)",
                1,
            ),
        ] {
            let mut enc = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (p, c) in &cum {
                let (h, sum_us) = if pick == 0 {
                    (&c.total, c.total_sum_us)
                } else {
                    (&c.ttfb, c.ttfb_sum_us)
                };
                let l: [(&str, &str); 2] = [("route", &p.route), ("version", p.version.as_str())];
                let mut fam = enc.encode_family(&l)?;
                fam.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    sum_us as f64 / 1e6,
                    h.len(),
                    &histogram_buckets(h),
                    None,
                )?;
            }
        }

        let mut enc = encoder.encode_descriptor(
            "upstream_errors",
            "Upstream failures by version and kind",
            None,
            MetricType::Counter,
        )?;
        for (v, counters) in t.versions() {
            for kind in UpstreamErrorKind::ALL {
                let n = counters.upstream_errors[kind as usize].load(Ordering::Relaxed);
                let l: [(&str, &str); 2] = [("version", v.as_str()), ("kind", kind.as_str())];
                ConstCounter::new(n).encode(enc.encode_family(&l)?)?;
            }
        }

        let mut enc = encoder.encode_descriptor(
            "retries",
            "Retries by route and versions",
            None,
            MetricType::Counter,
        )?;
        for r in t.retries() {
            let n = r.count.load(Ordering::Relaxed);
            let l: [(&str, &str); 3] = [
                ("route", &r.route),
                ("from_version", r.from.as_str()),
                ("to_version", r.to.as_str()),
            ];
            ConstCounter::new(n).encode(enc.encode_family(&l)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod bucket_tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_once_and_end_at_the_count() {
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 2).unwrap();
        for us in [1_000u64, 3_000, 20_000, 20_000, 700_000_000] {
            h.record(us).unwrap();
        }
        let b = histogram_buckets(&h);
        assert_eq!(b.len(), BUCKETS.len() + 1);
        assert_eq!(b[0], (0.005, 2));
        assert_eq!(b[2], (0.025, 2));
        assert_eq!(
            *b.last().unwrap(),
            (f64::INFINITY, 1),
            "700 s is above every bound"
        );
        assert_eq!(b.iter().map(|(_, n)| n).sum::<u64>(), h.len());
    }
}
