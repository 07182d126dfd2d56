//! `rollgate check`: the effective routing table and a rollback-readiness checklist.
//!
//! The table is compiled by the same [`Store::new`] startup uses (upstream clients, CA files
//! and all), so a file that passes `check` starts, and a file that fails it would not.
//!
//! A valid file can still configure a rule that cannot work as the user expects (an SLA on
//! time to first byte in front of non-streaming completions, a rule that needs signals
//! nothing sends): [`warnings`] names those, and `check` prints them without failing.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::{Config, MatchConfig, RouteConfig};
use crate::routing::store::Store;
use crate::routing::table::RuntimeState;
use crate::telemetry::prom::Metrics;
use crate::telemetry::Telemetry;

/// A drill older than this makes a route "not drilled" in the checklist.
pub const DRILL_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Route traffic (requests per second) above which we call it implausible that a canary
/// reaches `min_requests` in one window: few model-serving routes see more.
pub const PLAUSIBLE_ROUTE_RPS: f64 = 1000.0;

/// Compiles `config` as startup would and renders the effective table, the checklist and
/// the [`warnings`].
pub fn report(config: Config) -> std::io::Result<String> {
    let warnings = warnings(&config);
    let telemetry = Arc::new(Telemetry::new(config.evaluator.window));
    let metrics = Arc::new(Metrics::new(telemetry.clone()));
    let store = Store::new(config, RuntimeState::default(), telemetry, metrics)?;
    let table = store.load();
    let cfg = &table.config;
    let drills = last_drills(&cfg.state_dir);

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
    let _ = writeln!(out, "{}", access_log_line(cfg));
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
    if !warnings.is_empty() {
        let _ = writeln!(out, "\nwarnings:");
        for w in &warnings {
            let _ = writeln!(out, "  - {w}");
        }
    }
    Ok(out)
}

/// `access_log off`, or where the access log goes and which share of requests it records.
pub fn access_log_line(config: &Config) -> String {
    match &config.access_log {
        None => "access_log off".to_string(),
        Some(a) => format!(
            "access_log on: {}, sample {} (one JSON line per request; a file reopens on SIGUSR1)",
            a.path, a.sample
        ),
    }
}

/// Rules that cannot work as configured, one sentence each (empty: none found). The file is
/// valid either way; these are what `rollgate check` prints under `warnings:`.
pub fn warnings(config: &Config) -> Vec<String> {
    let ev = &config.evaluator;
    let rules = &ev.rules;
    let mut out = Vec::new();

    if let Some(sla) = rules.latency_p99_max {
        for r in &config.routes {
            if let Some(why) = completion_match(&r.matcher) {
                out.push(format!(
                    "route {}: evaluator.rules.latency_p99_max is {} but the route {why}: the \
                     time to first byte of a non-streaming completion is the whole generation \
                     time, so healthy versions whose p99 generation takes longer than {} would \
                     be rolled back; raise it above your slowest healthy generation, rely on \
                     latency_p99_ratio, or set it to null",
                    r.name,
                    humantime::format_duration(sla),
                    humantime::format_duration(sla),
                ));
            }
        }
    }

    if let Some(drop) = rules.accuracy_drop {
        out.push(format!(
            "evaluator.rules.accuracy_drop is {drop}: it only works when clients POST \
             /api/v1/feedback {{request_id, correct}} for answered requests, and trips only once \
             the candidate and the baseline each have min_requests ({}) feedback items since \
             the comparison began; without feedback it never fires (set it to null if no feedback is sent)",
            ev.min_requests
        ));
    }

    // The validated rule fills in defaults: whether a key was written shows in the document.
    let drift = &config.document["evaluator"]["rules"]["drift"];
    for key in ["p_value", "consecutive"] {
        if !drift[key].is_null() {
            out.push(format!(
                "evaluator.rules.drift.{key} ({}) is deprecated and ignored: the sequential drift \
                 test takes its threshold from evaluator.confidence ({}); remove the key",
                drift[key], ev.confidence
            ));
        }
    }

    for r in &config.routes {
        let total: u64 = r.split.iter().map(|(_, w)| u64::from(w.0)).sum();
        let window = ev.window.as_secs_f64();
        // Versions judged against the baseline: weighted split members and the shadow.
        let mut shares: Vec<(&str, f64)> = r
            .split
            .iter()
            .filter(|(v, w)| *v != r.baseline && w.0 > 0 && total > 0)
            .map(|(v, w)| (v.as_str(), f64::from(w.0) / total as f64))
            .collect();
        if let Some(s) = r.shadow.as_ref().filter(|s| s.percent > 0) {
            shares.push((s.version.as_str(), f64::from(s.percent) / 100.0));
            out.push(format!(
                "route {}: shadow {} gets a copy of {}% of the route's requests{}: its                  upstream does that share of the route's work again (on a model server,                  GPU time), and its answers are discarded; copies are capped at 10% of                  max_in_flight and shed first",
                r.name,
                s.version,
                s.percent,
                if r.sticky.is_some() { " (chosen per sticky key)" } else { "" },
            ));
        }
        for (v, share) in &shares {
            let rps = ev.min_requests as f64 / (share * window);
            if rps > PLAUSIBLE_ROUTE_RPS {
                out.push(format!(
                    "route {}: {v} gets {:.2}% of the route's requests, so reaching \
                     evaluator.min_requests ({}) within evaluator.window ({}) takes {:.0} \
                     requests/s on the route: its statistical rules may never be evaluated",
                    r.name,
                    share * 100.0,
                    ev.min_requests,
                    humantime::format_duration(ev.window),
                    rps
                ));
            }
        }

        if r.rollout.is_some() {
            rollout_warnings(r, &mut out);
        }

        if let Some(n) = rules.health_failures {
            let candidates: Vec<&str> = r
                .split
                .iter()
                .map(|(v, _)| v)
                .chain(r.shadow.as_ref().map(|s| &s.version))
                .filter(|v| **v != r.baseline)
                .map(|v| v.as_str())
                .collect();
            let checked = candidates.iter().any(|v| {
                config
                    .version(v)
                    .is_some_and(|vc| vc.health_check.is_some())
            });
            if !candidates.is_empty() && !checked {
                out.push(format!(
                    "route {}: evaluator.rules.health_failures is {n} but none of its candidates \
                     ({}) has a health_check, so the rule can never fire; add health_check to \
                     the versions or set it to null",
                    r.name,
                    candidates.join(", ")
                ));
            }
        }
    }
    out
}

/// Why a route's requests are OpenAI-style completions, if they are: a path prefix that
/// covers `/v1/chat/completions` or `/v1/completions` (a catch-all `/` is left out: it says
/// nothing about what is behind it), or a match on the body's `model` field.
fn completion_match(m: &MatchConfig) -> Option<String> {
    const PATHS: [&str; 2] = ["/v1/chat/completions", "/v1/completions"];
    if let Some(p) = &m.path_prefix {
        let covers = PATHS
            .iter()
            .any(|path| (p.len() > 1 && path.starts_with(p.as_str())) || p.starts_with(path));
        if covers {
            return Some(format!("matches OpenAI completion paths (path_prefix {p})"));
        }
    }
    if !m.models.is_empty() {
        return Some(format!(
            "routes OpenAI-style requests by model ({})",
            m.models.join(", ")
        ));
    }
    None
}

/// A rollout advances the first weighted version of the split other than the baseline.
fn rollout_warnings(r: &RouteConfig, out: &mut Vec<String>) {
    let weighted: Vec<&str> = r
        .split
        .iter()
        .filter(|(v, w)| *v != r.baseline && w.0 > 0)
        .map(|(v, _)| v.as_str())
        .collect();
    match weighted.as_slice() {
        [] => out.push(format!(
            "route {}: rollout is set but the split gives no version other than the baseline \
             ({}) a weight above 0: there is nothing to roll out",
            r.name, r.baseline
        )),
        [_] => {}
        [first, rest @ ..] => out.push(format!(
            "route {}: rollout advances only {first}; {} keep their split weight",
            r.name,
            rest.join(", ")
        )),
    }
}

/// `(route, time)` of every `drill` record in the audit log, if there is one.
pub fn last_drills(state_dir: &Path) -> Vec<(String, SystemTime)> {
    let texts: Vec<String> = crate::control::audit::log_files(state_dir)
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .collect();
    texts
        .iter()
        .flat_map(|t| t.lines())
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "drill" && v["passed"] != false)
        .filter_map(|v| {
            let route = v["route"].as_str()?.to_string();
            let at = humantime::parse_rfc3339_weak(v["timestamp"].as_str()?).ok()?;
            Some((route, at))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const VERSIONS: &str = "versions:\n  a: {endpoints: [http://127.0.0.1:1]}\n  b: {endpoints: [http://127.0.0.1:2]}\n  c: {endpoints: [http://127.0.0.1:3]}\n";

    /// Every rule that needs nothing of the route turned off, so each test sees its own.
    const QUIET: &str =
        "evaluator: {rules: {latency_p99_max: null, accuracy_drop: null, health_failures: null}}\n";

    fn config(routes: &str, evaluator: &str) -> Config {
        let text = format!("{VERSIONS}routes:\n{routes}{evaluator}");
        Config::from_str(&text, Path::new("t.yaml")).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    fn route(extra: &str) -> String {
        format!("  - {{name: chat, baseline: a, split: {{a: 90, b: 10}}{extra}}}\n")
    }

    #[test]
    fn a_quiet_config_has_no_warnings() {
        assert_eq!(warnings(&config(&route(""), QUIET)), Vec::<String>::new());
    }

    #[test]
    fn latency_sla_on_completion_routes() {
        let rules = "evaluator: {rules: {latency_p99_max: 500ms, accuracy_drop: null, health_failures: null}}\n";
        for (matcher, shown) in [
            (", match: {path_prefix: /v1/}", "path_prefix /v1/"),
            (
                ", match: {path_prefix: /v1/chat/completions}",
                "path_prefix /v1/chat/completions",
            ),
            (
                ", match: {path_prefix: /v1/completions}",
                "path_prefix /v1/completions",
            ),
            (", match: {model: [gpt-4]}", "by model (gpt-4)"),
        ] {
            let w = warnings(&config(&route(matcher), rules));
            assert_eq!(w.len(), 1, "{matcher}: {w:?}");
            assert!(
                w[0].starts_with("route chat: evaluator.rules.latency_p99_max is 500ms"),
                "{}",
                w[0]
            );
            assert!(w[0].contains(shown), "{}", w[0]);
            assert!(w[0].contains("whole generation time"), "{}", w[0]);
        }
        // Other paths, a catch-all, or the rule off: nothing to say.
        for matcher in [
            ", match: {path_prefix: /v1/embeddings}",
            ", match: {path_prefix: /inference.GRPCInferenceService/}",
            ", match: {path_prefix: /}",
            "",
        ] {
            assert!(
                warnings(&config(&route(matcher), rules)).is_empty(),
                "{matcher}"
            );
        }
        let w = warnings(&config(&route(", match: {path_prefix: /v1/}"), QUIET));
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn accuracy_drop_needs_feedback() {
        let w = warnings(&config(
            &route(""),
            "evaluator: {min_requests: 40, rules: {latency_p99_max: null, health_failures: null}}\n",
        ));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("accuracy_drop is 0.05"), "{}", w[0]);
        assert!(
            w[0].contains("POST /api/v1/feedback {request_id, correct}"),
            "{}",
            w[0]
        );
        assert!(w[0].contains("min_requests (40)"), "{}", w[0]);
    }

    #[test]
    fn explicit_drift_p_value_and_consecutive_are_ignored() {
        let drift = |d: &str| {
            format!("evaluator: {{rules: {{latency_p99_max: null, accuracy_drop: null, health_failures: null, drift: {d}}}}}\n")
        };
        assert!(warnings(&config(&route(""), &drift("{signal: 'json:s'}"))).is_empty());
        let w = warnings(&config(
            &route(""),
            &drift("{signal: 'json:s', p_value: 0.01, consecutive: 3}"),
        ));
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("evaluator.rules.drift.p_value (0.01) is deprecated and ignored"),
            "{}",
            w[0]
        );
        assert!(w[0].contains("evaluator.confidence (0.99)"), "{}", w[0]);
        assert!(
            w[1].starts_with("evaluator.rules.drift.consecutive (3) is deprecated"),
            "{}",
            w[1]
        );
    }

    #[test]
    fn min_requests_out_of_reach_of_a_small_canary() {
        let routes = "  - {name: chat, baseline: a, split: {a: 9999, b: 1}}\n";
        let w = warnings(&config(
            routes,
            "evaluator: {min_requests: 50, rules: {latency_p99_max: null, accuracy_drop: null, health_failures: null}}\n",
        ));
        assert_eq!(w.len(), 1, "{w:?}");
        // 50 requests in 30 s at 0.01 % of the route: 16667 requests/s.
        assert!(
            w[0].contains("b gets 0.01% of the route's requests"),
            "{}",
            w[0]
        );
        assert!(w[0].contains("16667 requests/s"), "{}", w[0]);
        // At 10 %, 50 in 30 s is 17 requests/s: plausible.
        assert!(warnings(&config(&route(""), QUIET)).is_empty());
        // A shadow at 1 % with min_requests 1000: 3333 requests/s.
        let w = warnings(&config(
            &route(", shadow: {version: c, percent: 1}"),
            "evaluator: {min_requests: 1000, rules: {latency_p99_max: null, accuracy_drop: null, health_failures: null}}\n",
        ));
        assert!(w.iter().any(|w| w.contains("c gets 1.00%")), "{w:?}");
    }

    #[test]
    fn a_shadow_states_its_share_of_the_work() {
        let w = warnings(&config(
            &route(", shadow: {version: c, percent: 25}"),
            QUIET,
        ));
        assert!(
            w.iter().any(
                |w| w.contains("shadow c gets a copy of 25% of the route's requests")
                    && w.contains("GPU")
            ),
            "{w:?}"
        );
    }

    #[test]
    fn rollout_with_nothing_to_roll_out() {
        let routes =
            "  - {name: chat, baseline: a, split: {a: 100, b: 0}, rollout: {steps: [5, 50], hold: 1m}}\n";
        let w = warnings(&config(routes, QUIET));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("nothing to roll out"), "{}", w[0]);
        let routes = "  - {name: chat, baseline: a, split: {a: 90, b: 5, c: 5}, rollout: {steps: [5, 50], hold: 1m}}\n";
        let w = warnings(&config(routes, QUIET));
        assert_eq!(
            w,
            ["route chat: rollout advances only b; c keep their split weight"]
        );
        assert!(warnings(&config(
            &route(", rollout: {steps: [5, 50], hold: 1m}"),
            QUIET
        ))
        .is_empty());
    }

    #[test]
    fn health_failures_without_health_checks() {
        let rules = "evaluator: {rules: {latency_p99_max: null, accuracy_drop: null, health_failures: 3}}\n";
        let w = warnings(&config(&route(""), rules));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("route chat: evaluator.rules.health_failures is 3 but none of its candidates (b) has a health_check"), "{}", w[0]);
        // A candidate with a health check: the rule can fire.
        let text = format!(
            "versions:\n  a: {{endpoints: [http://127.0.0.1:1]}}\n  b: {{endpoints: [http://127.0.0.1:2], health_check: {{path: /health}}}}\nroutes:\n{}{rules}",
            route("")
        );
        let c = Config::from_str(&text, Path::new("t.yaml")).unwrap();
        assert!(warnings(&c).is_empty());
        // A route with no candidate has nothing to roll back.
        let single = "  - {name: one, baseline: a, split: {a: 1}}\n";
        assert!(warnings(&config(single, rules)).is_empty());
    }

    #[test]
    fn the_access_log_line_says_on_or_off_and_where() {
        assert_eq!(
            access_log_line(&config(&route(""), QUIET)),
            "access_log off"
        );
        let on = config(&route(""), "access_log: {path: stderr, sample: 0.5}\n");
        assert!(
            access_log_line(&on).starts_with("access_log on: stderr, sample 0.5"),
            "{}",
            access_log_line(&on)
        );
    }
}
