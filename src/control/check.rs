//! `rollgate check`: the effective routing table and a rollback-readiness checklist.
//!
//! The table is compiled by the same [`Store::new`] startup uses (upstream clients, CA files
//! and all), so a file that passes `check` starts, and a file that fails it would not.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::Config;
use crate::routing::store::Store;
use crate::routing::table::RuntimeState;
use crate::telemetry::prom::Metrics;
use crate::telemetry::Telemetry;

/// A drill older than this makes a route "not drilled" in the checklist.
pub const DRILL_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Compiles `config` as startup would and renders the effective table and checklist.
pub fn report(config: Config) -> std::io::Result<String> {
    let telemetry = Arc::new(Telemetry::new(config.evaluator.window));
    let metrics = Arc::new(Metrics::new(telemetry.clone()));
    let store = Store::new(config, RuntimeState::default(), telemetry, metrics)?;
    let table = store.load();
    let cfg = &table.config;
    let drills = last_drills(&cfg.state_dir.join("audit.jsonl"));

    let mut out = String::new();
    let _ = writeln!(
        out,
        "config {} ({}) is valid",
        cfg.source.display(),
        cfg.hash
    );
    let _ = writeln!(
        out,
        "listen {}  admin {}  state_dir {}",
        cfg.listen,
        cfg.admin.listen,
        cfg.state_dir.display()
    );
    let _ = writeln!(out, "\nversions:");
    for v in cfg.versions.iter() {
        let endpoints: Vec<&str> = v.endpoints.iter().map(|e| e.url.as_str()).collect();
        let _ = writeln!(
            out,
            "  {:<16} fingerprint {}  endpoints {}",
            v.name.as_str(),
            &v.fingerprint,
            endpoints.join(", ")
        );
    }
    let _ = writeln!(out, "\nroutes (first match wins):");
    for r in table.routes.iter() {
        let rc = &r.config;
        let baseline = table.versions[r.baseline_member().version].name.as_str();
        let mut matcher = Vec::new();
        if let Some(p) = &rc.matcher.path_prefix {
            matcher.push(format!("path_prefix={p}"));
        }
        if let Some(h) = &rc.matcher.host {
            matcher.push(format!("host={h}"));
        }
        for (n, v) in &rc.matcher.headers {
            matcher.push(format!("header {n}={}", v.to_str().unwrap_or("?")));
        }
        if !rc.matcher.models.is_empty() {
            matcher.push(format!("model in [{}]", rc.matcher.models.join(", ")));
        }
        let _ = writeln!(
            out,
            "  {}  match {}  baseline {}",
            r.name,
            matcher.join(" "),
            baseline
        );
        for m in r.members.iter() {
            let share = 100.0 * f64::from(m.weight) / f64::from(r.total_weight.max(1));
            let _ = writeln!(
                out,
                "    {:<16} weight {:>4}  {:>5.1}%",
                table.versions[m.version].name.as_str(),
                m.weight,
                share
            );
        }
        let base_cfg = cfg.version(baseline);
        let checks = [
            (
                "baseline named and last_verified",
                base_cfg.is_some_and(|v| v.last_verified.is_some()),
            ),
            ("owner named", rc.owner.is_some()),
            (
                "drill within 30 days",
                drills.iter().any(|(route, at)| {
                    route == &*r.name && at.elapsed().is_ok_and(|age| age <= DRILL_MAX_AGE)
                }),
            ),
            (
                "health checks on",
                r.members
                    .iter()
                    .all(|m| table.versions[m.version].config.health_check.is_some()),
            ),
        ];
        let ready = checks.iter().filter(|(_, ok)| *ok).count();
        let _ = writeln!(out, "    rollback readiness {ready}/{}:", checks.len());
        for (what, ok) in checks {
            let _ = writeln!(out, "      [{}] {what}", if ok { "x" } else { " " });
        }
    }
    Ok(out)
}

/// `(route, time)` of every `drill` record in the audit log, if there is one.
pub fn last_drills(audit: &Path) -> Vec<(String, SystemTime)> {
    let Ok(text) = std::fs::read_to_string(audit) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "drill" && v["passed"] != false)
        .filter_map(|v| {
            let route = v["route"].as_str()?.to_string();
            let at = humantime::parse_rfc3339_weak(v["timestamp"].as_str()?).ok()?;
            Some((route, at))
        })
        .collect()
}
