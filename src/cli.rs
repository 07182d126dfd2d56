//! The admin client: `rollgate status | rollback | promote | resume | weights | pause |
//! events` against a running proxy's admin API (SPEC §2, §6).
//!
//! Output is a readable table or line per event; `--json` prints the API's JSON as is, for
//! scripts. Failures are one plain line on stderr and exit status 1: the proxy unreachable,
//! the token refused, or the API's own `{"error", "detail"}`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};

/// Where the admin API is and how to authenticate.
#[derive(Debug, Clone)]
pub struct Target {
    /// One client for every call of the command (a drill polls).
    client: crate::proxy::client::HttpClient,
    /// Base URL, e.g. `http://127.0.0.1:9901`.
    pub admin: String,
    pub token: Option<String>,
    /// Print the API's JSON instead of tables.
    pub json: bool,
}

impl Target {
    /// Token from `--token-file`, else the `ROLLGATE_TOKEN` value passed in.
    pub fn new(
        admin: String,
        token_file: Option<PathBuf>,
        env_token: Option<String>,
        json: bool,
    ) -> Result<Target, String> {
        let token = match token_file {
            Some(p) => Some(
                std::fs::read_to_string(&p)
                    .map_err(|e| format!("--token-file {}: {e}", p.display()))?
                    .trim()
                    .to_string(),
            ),
            None => env_token.map(|t| t.trim().to_string()),
        }
        .filter(|t| !t.is_empty());
        Ok(Target {
            client: crate::proxy::client::control_client().map_err(|e| e.to_string())?,
            admin: admin.trim_end_matches('/').to_string(),
            token,
            json,
        })
    }
}

/// One admin client command.
#[derive(Debug, Clone)]
pub enum Action {
    Status,
    Events {
        since: Option<String>,
    },
    Rollback {
        version: String,
        route: Option<String>,
        reason: Option<String>,
        operator: Option<String>,
    },
    Promote {
        route: String,
        version: String,
        reason: Option<String>,
        operator: Option<String>,
    },
    Resume {
        version: String,
        reason: Option<String>,
        operator: Option<String>,
    },
    Weights {
        route: String,
        weights: BTreeMap<String, u32>,
        /// Drop the route's overrides instead.
        reset: bool,
        reason: Option<String>,
        operator: Option<String>,
    },
    Pause {
        route: String,
        paused: bool,
        reason: Option<String>,
        operator: Option<String>,
    },
}

/// Parses `NAME=WEIGHT` arguments.
pub fn parse_weights(args: &[String]) -> Result<BTreeMap<String, u32>, String> {
    let mut out = BTreeMap::new();
    for a in args {
        let (name, w) = a
            .split_once('=')
            .ok_or_else(|| format!("{a:?}: write VERSION=WEIGHT, e.g. v2.5=10"))?;
        let w: u32 = w
            .trim()
            .parse()
            .map_err(|_| format!("{a:?}: the weight must be a non-negative integer"))?;
        out.insert(name.trim().to_string(), w);
    }
    if out.is_empty() {
        return Err("give at least one VERSION=WEIGHT".into());
    }
    Ok(out)
}

/// Runs `action`; returns what to print on stdout, or the one-line error for stderr.
pub async fn run(target: &Target, action: Action) -> Result<String, String> {
    let operator = |o: Option<String>| {
        o.or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "cli".into())
    };
    let (method, path, body) = match &action {
        Action::Status => (Method::GET, "/api/v1/status".to_string(), None),
        Action::Events { since } => (
            Method::GET,
            match since {
                Some(s) => format!("/api/v1/events?since={s}"),
                None => "/api/v1/events".to_string(),
            },
            None,
        ),
        Action::Rollback {
            version,
            route,
            reason,
            operator: o,
        } => (
            Method::POST,
            "/api/v1/rollback".into(),
            Some(json!({"version": version, "route": route,
                        "reason": reason.clone().unwrap_or_else(|| "manual rollback (rollgate CLI)".into()),
                        "operator": operator(o.clone())})),
        ),
        Action::Promote {
            route,
            version,
            reason,
            operator: o,
        } => (
            Method::POST,
            "/api/v1/promote".into(),
            Some(json!({"route": route, "version": version, "reason": reason,
                        "operator": operator(o.clone())})),
        ),
        Action::Resume {
            version,
            reason,
            operator: o,
        } => (
            Method::POST,
            "/api/v1/resume".into(),
            Some(json!({"version": version, "reason": reason, "operator": operator(o.clone())})),
        ),
        Action::Weights {
            route,
            weights,
            reset,
            reason,
            operator: o,
        } => (
            Method::POST,
            "/api/v1/weights".into(),
            Some(if *reset {
                json!({"route": route, "reset": true, "reason": reason,
                       "operator": operator(o.clone())})
            } else {
                json!({"route": route, "weights": weights, "reason": reason,
                       "operator": operator(o.clone())})
            }),
        ),
        Action::Pause {
            route,
            paused,
            reason,
            operator: o,
        } => (
            Method::POST,
            "/api/v1/pause".into(),
            Some(json!({"route": route, "paused": paused, "reason": reason,
                        "operator": operator(o.clone())})),
        ),
    };
    let mut value = call(target, method, &path, body).await?;
    if let Action::Events { .. } = action {
        // A long log comes in pages: follow them to the end.
        let mut pages = 0;
        while value["more"] == true && pages < 1000 {
            let Some(last) = value["events"]
                .as_array()
                .and_then(|e| e.last())
                .and_then(crate::control::audit::record_seq)
            else {
                break;
            };
            let next = call(
                target,
                Method::GET,
                &format!("/api/v1/events?since={last}"),
                None,
            )
            .await?;
            if let (Some(all), Some(more)) =
                (value["events"].as_array_mut(), next["events"].as_array())
            {
                all.extend(more.iter().cloned());
            }
            value["more"] = next["more"].clone();
            value["last_id"] = next["last_id"].clone();
            pages += 1;
        }
    }
    if target.json {
        return Ok(serde_json::to_string_pretty(&value).unwrap_or_default() + "\n");
    }
    Ok(match action {
        Action::Status => render_status(&value),
        Action::Events { .. } => value["events"]
            .as_array()
            .map(|e| e.iter().map(event_line).collect::<String>())
            .unwrap_or_default(),
        _ => event_line(&value),
    })
}

/// One request to the admin API; the JSON answer, or a one-line error.
pub async fn call(
    target: &Target,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    let client = &target.client;
    let url = format!("{}{path}", target.admin);
    let mut b = Request::builder().method(method).uri(&url);
    if let Some(t) = &target.token {
        b = b.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    // Every POST is JSON, even an empty one: the admin API refuses anything else (415).
    if b.method_ref() == Some(&Method::POST) || body.is_some() {
        b = b.header(http::header::CONTENT_TYPE, "application/json");
    }
    let bytes = match &body {
        Some(v) => Bytes::from(serde_json::to_vec(v).unwrap_or_default()),
        None => Bytes::new(),
    };
    let req = b
        .body(crate::proxy::body::ReqBody::full(bytes, None))
        .map_err(|e| format!("invalid --admin URL {:?}: {e}", target.admin))?;
    // A rollback waits for the candidate's in-flight requests to drain.
    let resp = tokio::time::timeout(Duration::from_secs(90), client.request(req))
        .await
        .map_err(|_| format!("the admin API at {} did not answer in 90 s", target.admin))?
        .map_err(|e| {
            format!(
                "cannot reach the admin API at {}: {} (is rollgate running? set --admin)",
                target.admin,
                crate::proxy::service::error_chain(&e)
            )
        })?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the answer from {url} failed: {e}"))?
        .to_bytes();
    let value: Value = serde_json::from_slice(&body).unwrap_or_else(
        |_| json!({"error": "unexpected", "detail": String::from_utf8_lossy(&body).trim()}),
    );
    if status.is_success() {
        return Ok(value);
    }
    let detail = value["detail"]
        .as_str()
        .or(value["error"].as_str())
        .unwrap_or("no detail")
        .to_string();
    Err(match status {
        StatusCode::UNAUTHORIZED => format!(
            "the admin API refused the token (401): {detail}; pass --token-file or set ROLLGATE_TOKEN"
        ),
        _ => format!("{} {}: {detail}", status.as_u16(), value["error"].as_str().unwrap_or("error")),
    })
}

fn ms(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x >= 1000.0 => format!("{:.2}s", x / 1000.0),
        Some(x) => format!("{x:.1}ms"),
        None => "-".into(),
    }
}

/// Left-aligned columns separated by two spaces.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `rollgate status` as tables: routes with weights, versions with window statistics.
pub fn render_status(s: &Value) -> String {
    let mut out = format!(
        "generation {}   config {}\n\n",
        s["generation"],
        s["config_hash"].as_str().unwrap_or("?")
    );
    let mut rows = vec![vec![
        "ROUTE".to_string(),
        "OWNER".into(),
        "BASELINE".into(),
        "STATE".into(),
        "WEIGHTS".into(),
    ]];
    for r in s["routes"].as_array().into_iter().flatten() {
        let weights = r["weights"]
            .as_object()
            .map(|w| {
                w.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        rows.push(vec![
            r["name"].as_str().unwrap_or("?").into(),
            r["owner"].as_str().unwrap_or("-").into(),
            r["baseline"].as_str().unwrap_or("?").into(),
            r["state"].as_str().unwrap_or("?").into(),
            weights,
        ]);
    }
    out.push_str(&table(&rows));
    out.push('\n');
    if let Some(f) = s["fleet"].as_object() {
        out.push_str(&format!(
            "fleet {}   replica {}   store {}{}   seq {}   pending {}{}\n",
            f.get("name").and_then(Value::as_str).unwrap_or("?"),
            f.get("replica").and_then(Value::as_str).unwrap_or("?"),
            if f.get("store_up") == Some(&Value::Bool(true)) {
                "up"
            } else {
                "DOWN"
            },
            if f.get("pool") == Some(&Value::Bool(true)) {
                "   pooled"
            } else {
                ""
            },
            f.get("seq").cloned().unwrap_or_default(),
            f.get("pending").cloned().unwrap_or_default(),
            if f.get("leader") == Some(&Value::Bool(true)) {
                "   (evaluator lease)"
            } else {
                ""
            },
        ));
        let now = crate::decision::unix_ms();
        let mut rows = vec![vec!["REPLICA".to_string(), "LAST SEEN".into()]];
        for r in f
            .get("replicas")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let ago = now.saturating_sub(r["last_seen_ms"].as_u64().unwrap_or(0));
            rows.push(vec![
                r["replica"].as_str().unwrap_or("?").into(),
                format!("{:.1}s ago", ago as f64 / 1000.0),
            ]);
        }
        out.push_str(&table(&rows));
        out.push('\n');
    }
    let mut rows = vec![vec![
        "VERSION".to_string(),
        "HEALTHY".into(),
        "QUARANTINED".into(),
        "REQUESTS".into(),
        "ERRORS".into(),
        "ERROR%".into(),
        "TTFB P50".into(),
        "TTFB P99".into(),
        "TOTAL P99".into(),
    ]];
    for v in s["versions"].as_array().into_iter().flatten() {
        let w = &v["window"];
        let yes = |b: &Value| if b == true { "yes" } else { "no" }.to_string();
        rows.push(vec![
            v["name"].as_str().unwrap_or("?").into(),
            yes(&v["healthy"]),
            yes(&v["quarantined"]),
            w["requests"].to_string(),
            w["errors"].to_string(),
            format!("{:.1}%", 100.0 * w["error_rate"].as_f64().unwrap_or(0.0)),
            ms(&w["ttfb_p50_ms"]),
            ms(&w["ttfb_p99_ms"]),
            ms(&w["total_p99_ms"]),
        ]);
    }
    out.push_str(&table(&rows));
    // Distance to rollback: each candidate's evidence per rule against what trips it.
    let mut rows = vec![vec![
        "CANDIDATE".to_string(),
        "ROUTE".into(),
        "VS".into(),
        "REQUESTS".into(),
        "RULE".into(),
        "EVIDENCE".into(),
        "".into(),
    ]];
    for c in s["evidence"].as_array().into_iter().flatten() {
        for r in c["rules"].as_array().into_iter().flatten() {
            let ratio = r["ratio"].as_f64().unwrap_or(0.0);
            let filled = ((ratio.clamp(0.0, 1.0)) * 20.0).round() as usize;
            let bar = format!("[{}{}]", "#".repeat(filled), ".".repeat(20 - filled));
            rows.push(vec![
                c["version"].as_str().unwrap_or("?").into(),
                c["route"].as_str().unwrap_or("?").into(),
                c["baseline"].as_str().unwrap_or("?").into(),
                c["requests"].to_string(),
                r["rule"].as_str().unwrap_or("?").into(),
                format!("{:.0}%", 100.0 * ratio),
                if r["ready"] == false {
                    format!("{bar} waiting for min_requests")
                } else {
                    bar
                },
            ]);
        }
    }
    if rows.len() > 1 {
        out.push('\n');
        out.push_str(&table(&rows));
    }
    for r in s["routes"].as_array().into_iter().flatten() {
        let ro = &r["rollout"];
        if ro.is_object() {
            let _ = writeln!(
                out,
                "\nrollout {}: {} at step {} ({}%), held {:.0}s of {:.0}s, {}/{} requests (baseline {}){}",
                r["name"].as_str().unwrap_or("?"),
                ro["version"].as_str().unwrap_or("?"),
                ro["step"],
                ro["weight"],
                ro["held_ms"].as_f64().unwrap_or(0.0) / 1000.0,
                ro["hold_ms"].as_f64().unwrap_or(0.0) / 1000.0,
                ro["requests"],
                ro["needed"],
                ro["baseline_requests"],
                if ro["waiting_for"].is_string() {
                    "; waiting for traffic"
                } else {
                    ""
                }
            );
        }
    }
    out
}

/// One audit record as one line: id, time, kind, then what matters for that kind.
pub fn event_line(e: &Value) -> String {
    let s = |k: &str| e[k].as_str().map(str::to_string);
    let mut line = format!(
        "{}  {}  {}",
        s("id").unwrap_or_else(|| "-".into()),
        s("timestamp").unwrap_or_else(|| "-".into()),
        s("kind").unwrap_or_else(|| "?".into())
    );
    let mut add = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            let _ = write!(line, "  {k}={v}");
        }
    };
    add("route", s("route"));
    add("version", s("version").or_else(|| s("from_version")));
    if e["kind"] == "rollback" {
        add("to", s("to_version"));
        add("trigger", s("trigger"));
        add(
            "trip_to_swap_us",
            e["trip_to_swap_us"].as_u64().map(|n| n.to_string()),
        );
    }
    if e["kind"] == "config_reload" {
        add("result", s("result"));
        add("error", s("error"));
    }
    if let Some(w) = e["weights"].as_object() {
        add(
            "weights",
            Some(
                w.iter()
                    .map(|(k, v)| format!("{k}:{v}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        );
    }
    add("by", s("initiated_by"));
    add("reason", s("reason").map(|r| format!("{r:?}")));
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_parse_from_name_equals_weight() {
        let w = parse_weights(&["v2.4=90".into(), "v2.5=10".into()]).unwrap();
        assert_eq!(w["v2.4"], 90);
        assert_eq!(w["v2.5"], 10);
        assert!(parse_weights(&["v2.4".into()]).is_err());
        assert!(parse_weights(&["v2.4=-1".into()]).is_err());
        assert!(parse_weights(&[]).is_err());
    }

    #[test]
    fn status_renders_routes_and_versions_as_aligned_tables() {
        let s = json!({"generation": 8, "config_hash": "sha256:9f2c",
            "routes": [{"name": "chat", "owner": "ml-platform", "baseline": "v2.4",
                        "state": "rolled_back", "weights": {"v2.4": 100, "v2.5": 0}}],
            "versions": [{"name": "v2.5", "fingerprint": "5be1", "healthy": true, "quarantined": true,
                          "window": {"requests": 412, "errors": 33, "error_rate": 0.080,
                                     "ttfb_p50_ms": 21.0, "ttfb_p99_ms": 140.2,
                                     "total_p50_ms": 880.5, "total_p99_ms": 2410.0}}]});
        let out = render_status(&s);
        assert!(
            out.starts_with("generation 8   config sha256:9f2c\n"),
            "{out}"
        );
        assert!(
            out.contains("chat   ml-platform  v2.4      rolled_back  v2.4=100 v2.5=0"),
            "{out}"
        );
        assert!(out.contains("v2.5     yes      yes          412       33      8.0%    21.0ms    140.2ms   2.41s"), "{out}");
    }

    #[test]
    fn a_rollback_record_prints_as_one_line() {
        let e = json!({"id": "rb-000042", "timestamp": "2026-11-22T14:35:23.101Z", "kind": "rollback",
            "trigger": "error_rate_ratio", "route": "chat", "from_version": "v2.5", "to_version": "v2.4",
            "reason": "error rate 8.1%", "initiated_by": null, "trip_to_swap_us": 31});
        assert_eq!(
            event_line(&e),
            "rb-000042  2026-11-22T14:35:23.101Z  rollback  route=chat  version=v2.5  to=v2.4  trigger=error_rate_ratio  trip_to_swap_us=31  reason=\"error rate 8.1%\"\n"
        );
    }
}
