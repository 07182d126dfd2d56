//! `rollgate drill`: a rollback drill against a running proxy (SPEC §8), the evidence an
//! EN 18031-style control asks for: did the automatic rollback fire, how fast, what did
//! clients see, was the alert delivered and the audit record written, is the version back.
//!
//! Steps: inject the fault on the version through `POST /api/v1/faults`; optionally drive
//! load through the data plane (`--load URL`) and count client-visible errors; wait for the
//! evaluator's `rollback` record; clear the fault and `resume` the version; score; record a
//! `drill` audit record through `POST /api/v1/drills` (which also sets
//! `rollgate_rollback_drill_timestamp_seconds` when the drill passed). Exit status 1 when the
//! drill fails, so it can be scheduled.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use http::Method;
use serde_json::{json, Value};

use crate::cli::{call, Target};
use crate::load::Load;

/// The fault a drill injects.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DrillFault {
    /// A share of the version's requests fail (0..=1).
    Error(f64),
    /// Every request of the version waits this long first.
    Latency(Duration),
}

impl std::str::FromStr for DrillFault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some(("error", r)) => match r.trim().parse::<f64>() {
                Ok(x) if (0.0..=1.0).contains(&x) && x > 0.0 => Ok(DrillFault::Error(x)),
                _ => Err(format!(
                    "{s:?}: error=RATE needs a rate in (0, 1], e.g. error=0.3"
                )),
            },
            Some(("latency", d)) => humantime::parse_duration(d.trim())
                .map(DrillFault::Latency)
                .map_err(|e| format!("{s:?}: latency=DURATION, e.g. latency=800ms: {e}")),
            _ => Err(format!("{s:?}: write error=0.3 or latency=800ms")),
        }
    }
}

/// Options of `rollgate drill`.
#[derive(Debug, Clone)]
pub struct DrillOptions {
    pub version: String,
    pub fault: DrillFault,
    pub timeout: Duration,
    /// Data-plane URL to send synthetic load to while the drill runs.
    pub load: Option<String>,
    pub operator: String,
}

/// Runs the drill; returns the `drill` record (also when the drill failed) or a one-line
/// error when it could not run at all.
pub async fn run(target: &Target, opts: DrillOptions) -> Result<Value, String> {
    let out = &mut std::io::stderr();
    let tty = out.is_terminal();
    let status = call(target, Method::GET, "/api/v1/status", None).await?;
    let v = &opts.version;
    let version = status["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|x| x["name"] == v.as_str())
        .ok_or_else(|| format!("no version {v} in the running config"))?;
    if version["quarantined"] == true {
        return Err(format!(
            "version {v} is rolled back already: resume it before a drill"
        ));
    }
    let route = status["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["baseline"] != v.as_str() && r["weights"][v.as_str()].as_u64().unwrap_or(0) > 0)
        .ok_or_else(|| {
            format!("version {v} is not a weighted candidate on any route: the evaluator would have nothing to judge")
        })?;
    let route_name = route["name"].as_str().unwrap_or("?").to_string();
    // Only what happens from now on: the newest record's sequence number is the cursor.
    let events = call(target, Method::GET, "/api/v1/events?since=0", None).await?;
    let cursor = events["last_id"].as_u64().map(|n| n.to_string());

    // Inject.
    let (error_rate, latency) = match opts.fault {
        DrillFault::Error(r) => (r, Duration::ZERO),
        DrillFault::Latency(d) => (0.0, d),
    };
    let fault_text = match opts.fault {
        DrillFault::Error(r) => format!("error={r}"),
        DrillFault::Latency(d) => format!("latency={}", humantime::format_duration(d)),
    };
    let _ = writeln!(
        out,
        "drill: injecting {fault_text} on {v} (route {route_name}) for up to {}",
        humantime::format_duration(opts.timeout)
    );
    call(
        target,
        Method::POST,
        "/api/v1/faults",
        Some(json!({"version": v, "error_rate": error_rate,
                    "latency": format!("{}ms", latency.as_millis()),
                    "duration": format!("{}ms", opts.timeout.as_millis())})),
    )
    .await?;
    let injected = Instant::now();

    // Optional load, counting what clients see.
    let mut load = match &opts.load {
        Some(url) => Some(Load::start(url, 4, v).map_err(|e| e.to_string())?),
        None => None,
    };

    // Wait for the evaluator.
    let path = match &cursor {
        Some(id) => format!("/api/v1/events?since={id}"),
        None => "/api/v1/events".to_string(),
    };
    let mut rollback: Option<Value> = None;
    let mut last_note = Instant::now();
    while injected.elapsed() < opts.timeout {
        let ev = call(target, Method::GET, &path, None).await?;
        rollback = ev["events"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["kind"] == "rollback" && e["from_version"] == v.as_str())
            .cloned();
        if rollback.is_some() {
            break;
        }
        if tty {
            let _ = write!(
                out,
                "\r  waiting for the evaluator... {:>5.1}s",
                injected.elapsed().as_secs_f64()
            );
            let _ = out.flush();
        } else if last_note.elapsed() >= Duration::from_secs(5) {
            last_note = Instant::now();
            let _ = writeln!(
                out,
                "  waiting for the evaluator... {:.0}s",
                injected.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if tty {
        let _ = writeln!(out);
    }
    let waited = injected.elapsed();
    if let Some(l) = &mut load {
        l.stop().await;
    }
    // The alerts go out after the rollback record; their results follow in the
    // `rollback_completed` record that names it.
    let mut completed: Option<Value> = None;
    if let Some(id) = rollback.as_ref().and_then(|r| r["id"].as_str()) {
        let t = Instant::now();
        while completed.is_none() && t.elapsed() < Duration::from_secs(15) {
            let ev = call(target, Method::GET, &path, None).await?;
            completed = ev["events"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["kind"] == "rollback_completed" && e["rollback_id"] == id)
                .cloned();
            if completed.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    // Restore: clear the fault, lift the quarantine.
    let cleared = call(
        target,
        Method::POST,
        "/api/v1/faults",
        Some(json!({"version": v, "error_rate": 0.0, "duration": "0s"})),
    )
    .await;
    let mut restore_error = cleared.err();
    if rollback.is_some() {
        if let Err(e) = call(
            target,
            Method::POST,
            "/api/v1/resume",
            Some(json!({"version": v, "reason": "rollback drill: restore", "operator": opts.operator})),
        )
        .await
        {
            restore_error.get_or_insert(e);
        }
    }
    let after = call(target, Method::GET, "/api/v1/status", None).await?;
    let restored = restore_error.is_none()
        && after["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|x| x["name"] == v.as_str() && x["quarantined"] == false);

    // Score.
    let tripped = rollback.is_some();
    let detect = rollback.as_ref().map(|_| waited);
    let alerts = completed
        .as_ref()
        .and_then(|r| r["alerts_sent"].as_array().cloned())
        .unwrap_or_default();
    let alert_delivered = !alerts.is_empty()
        && alerts.iter().all(|a| {
            a["status"]
                .as_u64()
                .is_some_and(|s| (200..300).contains(&s))
        });
    let client_errors = load.as_ref().map(Load::failed);
    let mut score = 0u32;
    let mut checks = Vec::new();
    let mut check = |name: &str, points: u32, got: u32, note: String| {
        score += got;
        checks.push(json!({"check": name, "points": got, "of": points, "note": note}));
    };
    check(
        "tripped",
        40,
        if tripped { 40 } else { 0 },
        match &rollback {
            Some(r) => format!(
                "{} tripped",
                r["rule"].as_str().or(r["trigger"].as_str()).unwrap_or("?")
            ),
            None => "no rollback within the timeout".into(),
        },
    );
    let speed = match detect {
        Some(d) if d <= Duration::from_secs(10) => 20,
        Some(d) => (20.0 * (1.0 - (d.as_secs_f64() - 10.0) / opts.timeout.as_secs_f64().max(10.0)))
            .max(0.0) as u32,
        None => 0,
    };
    check(
        "time to detect",
        20,
        speed,
        detect.map_or("-".into(), |d| format!("{} ms", d.as_millis())),
    );
    check(
        "client-visible errors",
        15,
        match client_errors {
            Some(0) => 15,
            _ => 0,
        },
        match client_errors {
            Some(n) => format!("{n} of {} requests", load.as_ref().map_or(0, Load::sent)),
            None => "not measured (pass --load URL)".into(),
        },
    );
    check(
        "alert delivered",
        10,
        if alert_delivered { 10 } else { 0 },
        if alerts.is_empty() {
            "no webhook configured or no rollback".into()
        } else {
            format!(
                "{} webhook(s): {}",
                alerts.len(),
                if alert_delivered {
                    "all 2xx"
                } else {
                    "some failed"
                }
            )
        },
    );
    check(
        "audit written",
        10,
        if tripped { 10 } else { 0 },
        rollback
            .as_ref()
            .and_then(|r| r["id"].as_str())
            .unwrap_or("-")
            .to_string(),
    );
    check(
        "version restored",
        5,
        if restored { 5 } else { 0 },
        restore_error.unwrap_or_else(|| {
            if restored {
                "resumed".into()
            } else {
                "still quarantined".into()
            }
        }),
    );
    let passed = tripped && restored;
    let result = json!({
        "route": route_name, "version": v, "fault": fault_text,
        "passed": passed, "score": score, "checks": checks,
        "rollback_id": rollback.as_ref().map(|r| r["id"].clone()),
        "trigger": rollback.as_ref().map(|r| r["trigger"].clone()),
        "rule": rollback.as_ref().map(|r| r.get("rule").unwrap_or(&r["trigger"]).clone()),
        "time_to_detect_ms": detect.map(|d| d.as_millis() as u64),
        "trip_to_swap_us": rollback.as_ref().map(|r| r["trip_to_swap_us"].clone()),
        "client_errors": client_errors,
        "requests": load.as_ref().map(Load::sent),
        "initiated_by": opts.operator,
    });
    call(target, Method::POST, "/api/v1/drills", Some(result)).await
}

/// The drill record as a readable report.
pub fn render(rec: &Value) -> String {
    let mut out = format!(
        "\nRollback drill {}: {} on {} (route {})\n",
        rec["id"].as_str().unwrap_or("?"),
        rec["fault"].as_str().unwrap_or("?"),
        rec["version"].as_str().unwrap_or("?"),
        rec["route"].as_str().unwrap_or("?")
    );
    for c in rec["checks"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {:<24}{:>3}/{:<3} {}\n",
            c["check"].as_str().unwrap_or("?"),
            c["points"],
            c["of"],
            c["note"].as_str().unwrap_or("")
        ));
    }
    out.push_str(&format!(
        "  readiness score         {}/100: {}\n",
        rec["score"],
        if rec["passed"] == true {
            "PASSED"
        } else {
            "FAILED"
        }
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse() {
        assert_eq!("error=0.3".parse(), Ok(DrillFault::Error(0.3)));
        assert_eq!(
            "latency=800ms".parse(),
            Ok(DrillFault::Latency(Duration::from_millis(800)))
        );
        assert!("error=1.5".parse::<DrillFault>().is_err());
        assert!("error=0".parse::<DrillFault>().is_err());
        assert!("boom".parse::<DrillFault>().is_err());
    }
}
