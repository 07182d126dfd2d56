//! The control plane as operators use it: the admin API over its real socket (every POST's
//! record checked against status and events, method and token checks, errors that change
//! nothing), hot reload of the config file (a Kubernetes ConfigMap `..data` swap under load,
//! an editor's rename-on-save of an invalid file), quarantine carried across reloads, the
//! read-only `health_listen`, and SIGTERM drain of the real binary.

#[macro_use]
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Method;
use serde_json::{json, Value};
use support::*;

/// The admin API of one running rollgate, spoken to over its socket.
#[derive(Clone)]
struct AdminApi {
    base: String,
    client: TestClient,
    token: Option<String>,
}

impl AdminApi {
    fn at(addr: SocketAddr) -> AdminApi {
        AdminApi {
            base: format!("http://{addr}"),
            client: TestClient::http1(),
            token: None,
        }
    }

    fn of(proxy: &TestProxy) -> AdminApi {
        AdminApi::at(proxy.admin_addr())
    }

    /// Sends `Authorization: Bearer TOKEN` on every POST.
    fn with_token(mut self, token: &str) -> AdminApi {
        self.token = Some(token.to_string());
        self
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str) -> TestResponse {
        self.client.get(&self.url(path)).await
    }

    /// POST with this API's token (if any) and `extra` headers.
    async fn post_with(&self, path: &str, body: &str, extra: &[(&str, &str)]) -> TestResponse {
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers: Vec<(&str, &str)> = extra.to_vec();
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        self.client
            .post_json(&self.url(path), body.to_string(), &headers)
            .await
    }

    async fn post(&self, path: &str, body: &str) -> TestResponse {
        self.post_with(path, body, &[]).await
    }

    /// POSTs `body`, asserts 200 and returns the JSON answer (the resulting record).
    async fn post_ok(&self, path: &str, body: Value) -> Value {
        let r = self.post(path, &body.to_string()).await;
        assert_eq!(r.status, 200, "POST {path} {body}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        r.json()
    }

    async fn status(&self) -> Value {
        let r = self.get("/api/v1/status").await;
        assert_eq!(r.status, 200, "GET /api/v1/status: {}", r.text());
        r.json()
    }

    async fn generation(&self) -> u64 {
        self.status().await["generation"].as_u64().unwrap()
    }

    async fn events_since(&self, since: &str) -> Vec<Value> {
        let path = if since.is_empty() {
            "/api/v1/events".to_string()
        } else {
            format!("/api/v1/events?since={since}")
        };
        let r = self.get(&path).await;
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        r.json()["events"].as_array().expect("events array").clone()
    }

    async fn events(&self) -> Vec<Value> {
        self.events_since("").await
    }

    /// Records of `kind`, oldest first.
    async fn events_of(&self, kind: &str) -> Vec<Value> {
        self.events()
            .await
            .into_iter()
            .filter(|e| e["kind"] == kind)
            .collect()
    }

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let r = self.get("/metrics").await;
        assert_eq!(r.status, 200, "GET /metrics: {}", r.text());
        metric_sum(&r.text(), name, labels)
    }

    /// Asserts that the table generation is still `generation` and no audit record was added
    /// beyond the `events` already there.
    async fn assert_unchanged(&self, generation: u64, events: usize, after: &str) {
        assert_eq!(
            self.generation().await,
            generation,
            "{after}: the table generation moved"
        );
        let now = self.events().await;
        assert_eq!(now.len(), events, "{after}: new audit records: {now:#?}");
    }
}

/// The entry of `status["versions"]` named `name`.
fn version_of<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no version {name} in {status:#}"))
}

/// The entry of `status["routes"]` named `name`.
fn route_of<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no route {name} in {status:#}"))
}

/// After a quarantine ends: canary is not quarantined in `status`, route `chat` is steady at
/// 50/50, the gauge says so, and more than `min_seen` of `n` requests reach canary.
async fn assert_canary_serves_again(
    admin: &AdminApi,
    s: &Value,
    proxy: &TestProxy,
    n: usize,
    min_seen: usize,
) {
    assert_eq!(version_of(s, "canary")["quarantined"], false);
    assert_eq!(route_of(s, "chat")["state"], "steady");
    assert_eq!(
        route_of(s, "chat")["weights"],
        json!({"stable": 50, "canary": 50})
    );
    assert_eq!(
        admin
            .metric("rollgate_version_quarantined", &[("version", "canary")])
            .await,
        0.0
    );
    let seen = versions_seen(&proxy.url("/v1/chat"), n, &[]).await;
    assert!(
        seen.get("canary").copied().unwrap_or(0) > min_seen,
        "{seen:?}"
    );
}

/// Sends `n` GETs to `url` (8 at a time), asserts each answers 200 and counts them by
/// `x-rollgate-version`.
async fn versions_seen(url: &str, n: usize, headers: &[(&str, &str)]) -> HashMap<String, usize> {
    let client = TestClient::http1();
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut counts = HashMap::new();
    let mut sent = 0;
    while sent < n {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..8.min(n - sent) {
            let (client, url, headers) = (client.clone(), url.to_string(), headers.clone());
            set.spawn(async move {
                let h: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let r = client.get_with(&url, &h).await;
                assert_eq!(r.status, 200, "{}", r.text());
                r.version().expect("x-rollgate-version").to_string()
            });
            sent += 1;
        }
        while let Some(v) = set.join_next().await {
            *counts.entry(v.unwrap()).or_insert(0) += 1;
        }
    }
    counts
}

/// The `state_dir` a TestProxy was given (its config names it on one line).
fn state_dir_of(proxy: &TestProxy) -> PathBuf {
    proxy
        .yaml()
        .lines()
        .find_map(|l| l.strip_prefix("state_dir: "))
        .map(|s| PathBuf::from(s.trim().trim_matches('"')))
        .expect("state_dir in the config")
}

/// Waits (bounded) until the audit log holds `n` `config_reload` records and returns them:
/// a reload swaps the table first and writes its record just after.
async fn reload_records(admin: &AdminApi, n: usize) -> Vec<Value> {
    assert_eventually!(
        admin.events_of("config_reload").await.len() >= n,
        Duration::from_secs(3),
        "fewer than {n} config_reload records: {:#?}",
        admin.events_of("config_reload").await
    );
    let records = admin.events_of("config_reload").await;
    assert_eq!(records.len(), n, "{records:#?}");
    records
}

/// `sha256:<hex>` of `bytes`, as rollgate reports config hashes.
fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(bytes);
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A config with versions `a` and `b` on one route `chat` (baseline `a`), everything on
/// 127.0.0.1:0, plus `extra` top-level YAML.
fn two_versions_yaml(
    state_dir: &Path,
    a: &TestUpstream,
    b: &TestUpstream,
    (wa, wb): (u32, u32),
    extra: &str,
) -> String {
    format!(
        "listen: \"127.0.0.1:0\"\n\
         admin: {{listen: \"127.0.0.1:0\"}}\n\
         state_dir: \"{state}\"\n\
         drain_timeout: 2s\n\
         evaluator: {{min_requests: 1000000}}\n\
         {extra}\
         versions:\n  \
           a: {{endpoints: [\"{ua}\"]}}\n  \
           b: {{endpoints: [\"{ub}\"]}}\n\
         routes:\n  \
           - {{name: chat, owner: rollgate-tests, match: {{path_prefix: /}}, baseline: a, split: {{a: {wa}, b: {wb}}}}}\n",
        state = state_dir.display(),
        ua = a.http_url(),
        ub = b.http_url(),
    )
}

/// Starts rollgate from the config file at `path` (the path matters: it is what reload
/// re-reads and whose directory is watched), on 127.0.0.1:0, with a health listener when
/// `health` is true.
async fn start_from_file(path: &Path, health: bool) -> rollgate::app::Running {
    let config =
        rollgate::config::Config::load(path).unwrap_or_else(|e| panic!("config rejected: {e}"));
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let listeners = rollgate::app::Listeners {
        data: bind().await.unwrap(),
        admin: bind().await.unwrap(),
        health: if health {
            Some(bind().await.unwrap())
        } else {
            None
        },
    };
    rollgate::app::start(config, listeners)
        .await
        .unwrap_or_else(|e| panic!("rollgate::app::start failed: {e}"))
}

async fn shut_down(running: rollgate::app::Running) {
    tokio::time::timeout(Duration::from_secs(10), running.shutdown())
        .await
        .expect("rollgate shutdown did not finish within 10s");
}

/// Two upstreams `stable` and `canary` behind route `chat` with the given split.
async fn stable_canary(split: (u32, u32)) -> (TestUpstream, TestUpstream, TestProxy) {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("canary", &canary)
        .route(Route::new("chat", "stable").split(&[("stable", split.0), ("canary", split.1)]))
        .start()
        .await;
    (stable, canary, proxy)
}

// ---------------------------------------------------------------------------------------
// 1. Each POST's success path, checked against status, events and traffic.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn manual_rollback_quarantines_the_version_and_resume_restores_it() {
    let (_stable, canary, proxy) = stable_canary((50, 50)).await;
    let admin = AdminApi::of(&proxy);
    let g0 = admin.generation().await;
    let seen = versions_seen(&proxy.url("/v1/chat"), 100, &[]).await;
    assert!(seen.contains_key("canary"), "{seen:?}");

    let rec = admin
        .post_ok(
            "/api/v1/rollback",
            json!({"route": "chat", "version": "canary",
                   "reason": "wrong answers in review", "operator": "alice"}),
        )
        .await;
    assert_eq!(rec["kind"], "rollback", "{rec:#}");
    assert!(rec["id"].as_str().unwrap().starts_with("rb-"), "{rec:#}");
    assert_eq!(rec["trigger"], "manual");
    assert_eq!(rec["route"], "chat");
    assert_eq!(rec["from_version"], "canary");
    assert_eq!(rec["to_version"], "stable");
    assert_eq!(rec["reason"], "wrong answers in review");
    assert_eq!(rec["automatic"], false);
    assert_eq!(rec["initiated_by"], "alice");
    assert_eq!(rec["generation_before"], g0);
    assert_eq!(rec["generation_after"], g0 + 1);

    let s = admin.status().await;
    assert_eq!(s["generation"], g0 + 1);
    assert_eq!(version_of(&s, "canary")["quarantined"], true);
    assert_eq!(version_of(&s, "stable")["quarantined"], false);
    let route = route_of(&s, "chat");
    assert_eq!(route["state"], "rolled_back");
    assert_eq!(route["weights"], json!({"stable": 100, "canary": 0}));
    let events = admin.events().await;
    assert_eq!(events[0], rec, "the record answered is the record logged");
    // Drain and alert results follow in one record that names the rollback.
    assert_eventually!(admin.events().await.len() == 2, Duration::from_secs(5));
    let events = admin.events().await;
    assert_eq!(events[1]["kind"], "rollback_completed", "{events:#?}");
    assert_eq!(events[1]["rollback_id"], rec["id"]);
    assert_eq!(
        admin
            .metric(
                "rollgate_rollback_triggered_total",
                &[("route", "chat"), ("trigger", "manual")]
            )
            .await,
        1.0
    );
    assert_eq!(
        admin
            .metric("rollgate_version_quarantined", &[("version", "canary")])
            .await,
        1.0
    );
    // Persisted, so it survives a restart.
    let state: Value = serde_json::from_slice(
        &std::fs::read(state_dir_of(&proxy).join("state.json")).expect("state.json written"),
    )
    .unwrap();
    assert!(
        state["quarantined"]["canary"].is_string(),
        "state.json: {state:#}"
    );

    // Every request goes to the baseline, pinned ones too (pin.quarantined: baseline).
    canary.clear();
    let seen = versions_seen(&proxy.url("/v1/chat"), 200, &[]).await;
    assert_eq!(seen, HashMap::from([("stable".to_string(), 200)]));
    let pinned = versions_seen(
        &proxy.url("/v1/chat"),
        16,
        &[("x-rollgate-version", "canary")],
    )
    .await;
    assert_eq!(pinned, HashMap::from([("stable".to_string(), 16)]));
    assert_eq!(
        canary.request_count(),
        0,
        "a quarantined version got traffic"
    );

    let resumed = admin
        .post_ok(
            "/api/v1/resume",
            json!({"version": "canary", "operator": "bob", "reason": "fixed upstream"}),
        )
        .await;
    assert_eq!(resumed["kind"], "resume", "{resumed:#}");
    assert_eq!(resumed["version"], "canary");
    assert_eq!(resumed["initiated_by"], "bob");
    assert_eq!(resumed["reason"], "fixed upstream");
    assert_eq!(resumed["automatic"], false);
    assert_eq!(resumed["generation_after"], g0 + 2);
    let s = admin.status().await;
    assert_eq!(s["generation"], g0 + 2);
    assert_canary_serves_again(&admin, &s, &proxy, 200, 40).await;
    // `since` takes an event id: only what came after it.
    let later = admin.events_since(events[1]["id"].as_str().unwrap()).await;
    assert_eq!(later, vec![resumed]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn promote_makes_the_version_the_baseline_at_100() {
    let (stable, _canary, proxy) = stable_canary((90, 10)).await;
    let admin = AdminApi::of(&proxy);
    let g0 = admin.generation().await;
    let rec = admin
        .post_ok(
            "/api/v1/promote",
            json!({"route": "chat", "version": "canary"}),
        )
        .await;
    assert_eq!(rec["kind"], "promote", "{rec:#}");
    assert!(rec["id"].as_str().unwrap().starts_with("pr-"), "{rec:#}");
    assert_eq!(rec["route"], "chat");
    assert_eq!(rec["version"], "canary");
    assert_eq!(rec["from_version"], "stable");
    assert_eq!(rec["automatic"], false);
    assert_eq!(rec["initiated_by"], "admin-api");
    assert_eq!(rec["generation_after"], g0 + 1);
    let s = admin.status().await;
    let route = route_of(&s, "chat");
    assert_eq!(route["baseline"], "canary");
    assert_eq!(route["weights"], json!({"stable": 0, "canary": 100}));
    assert_eq!(route["state"], "steady");
    assert_eq!(admin.events().await, vec![rec]);
    stable.clear();
    let seen = versions_seen(&proxy.url("/v1/chat"), 100, &[]).await;
    assert_eq!(seen, HashMap::from([("canary".to_string(), 100)]));
    assert_eq!(stable.request_count(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn weights_override_the_split_and_traffic_follows() {
    let (_stable, _canary, proxy) = stable_canary((50, 50)).await;
    let admin = AdminApi::of(&proxy);
    let g0 = admin.generation().await;
    let rec = admin
        .post_ok(
            "/api/v1/weights",
            json!({"route": "chat", "weights": {"stable": 0, "canary": 100}, "operator": "dana"}),
        )
        .await;
    assert_eq!(rec["kind"], "weights", "{rec:#}");
    assert_eq!(rec["route"], "chat");
    assert_eq!(rec["weights"], json!({"stable": 0, "canary": 100}));
    assert_eq!(rec["previous_weights"], json!({"stable": 50, "canary": 50}));
    assert_eq!(rec["initiated_by"], "dana");
    assert_eq!(rec["generation_after"], g0 + 1);
    let s = admin.status().await;
    assert_eq!(
        route_of(&s, "chat")["weights"],
        json!({"stable": 0, "canary": 100})
    );
    assert_eq!(
        admin
            .metric(
                "rollgate_route_weight_ratio",
                &[("route", "chat"), ("version", "canary")]
            )
            .await,
        1.0
    );
    let seen = versions_seen(&proxy.url("/v1/chat"), 400, &[]).await;
    assert_eq!(seen, HashMap::from([("canary".to_string(), 400)]));

    // The weights given replace the split: a version left out gets 0.
    let rec2 = admin
        .post_ok(
            "/api/v1/weights",
            json!({"route": "chat", "weights": {"stable": 3}}),
        )
        .await;
    assert_eq!(rec2["weights"], json!({"stable": 3, "canary": 0}));
    assert_eq!(
        rec2["previous_weights"],
        json!({"stable": 0, "canary": 100})
    );
    let seen = versions_seen(&proxy.url("/v1/chat"), 100, &[]).await;
    assert_eq!(seen, HashMap::from([("stable".to_string(), 100)]));
    assert_eq!(admin.events().await, vec![rec, rec2]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn pause_freezes_the_route_and_unpause_thaws_it() {
    let (_stable, _canary, proxy) = stable_canary((50, 50)).await;
    let admin = AdminApi::of(&proxy);
    let g0 = admin.generation().await;
    let rec = admin
        .post_ok(
            "/api/v1/pause",
            json!({"route": "chat", "paused": true, "operator": "carol", "reason": "investigating"}),
        )
        .await;
    assert_eq!(rec["kind"], "pause", "{rec:#}");
    assert_eq!(rec["route"], "chat");
    assert_eq!(rec["paused"], true);
    assert_eq!(rec["initiated_by"], "carol");
    assert_eq!(rec["reason"], "investigating");
    assert_eq!(rec["generation_after"], g0 + 1);
    let s = admin.status().await;
    assert_eq!(route_of(&s, "chat")["state"], "paused");
    // Pausing freezes decisions, not traffic.
    let seen = versions_seen(&proxy.url("/v1/chat"), 100, &[]).await;
    assert_eq!(seen.values().sum::<usize>(), 100);
    assert!(
        seen.contains_key("canary") && seen.contains_key("stable"),
        "{seen:?}"
    );

    let rec2 = admin
        .post_ok("/api/v1/pause", json!({"route": "chat", "paused": false}))
        .await;
    assert_eq!(rec2["paused"], false);
    assert_eq!(route_of(&admin.status().await, "chat")["state"], "steady");
    assert_eq!(admin.events().await, vec![rec, rec2]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn post_reload_answers_the_config_reload_record() {
    let (_stable, _canary, proxy) = stable_canary((50, 50)).await;
    let admin = AdminApi::of(&proxy);
    let before = admin.status().await;
    let g0 = before["generation"].as_u64().unwrap();
    let r = admin.post("/api/v1/reload", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = r.json();
    assert_eq!(rec["kind"], "config_reload", "{rec:#}");
    assert!(rec["id"].as_str().unwrap().starts_with("cr-"), "{rec:#}");
    assert_eq!(rec["result"], "ok");
    assert_eq!(rec["cause"], "api");
    assert_eq!(rec["config_hash"], before["config_hash"]);
    assert_eq!(rec["previous_hash"], before["config_hash"]);
    assert!(
        rec["source"].as_str().unwrap().ends_with("rollgate.yaml"),
        "{rec:#}"
    );
    assert_eq!(rec["generation_before"], g0);
    assert_eq!(rec["generation_after"], g0 + 1);
    assert_eq!(admin.generation().await, g0 + 1);
    assert_eq!(admin.events().await, vec![rec]);
    assert_eq!(
        admin
            .metric("rollgate_config_reloads_total", &[("result", "ok")])
            .await,
        1.0
    );
    assert_eq!(
        admin.metric("rollgate_routing_table_generation", &[]).await,
        (g0 + 1) as f64
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn injected_faults_fail_pinned_requests_before_they_reach_the_upstream() {
    let (stable, canary, proxy) = stable_canary((100, 0)).await;
    let admin = AdminApi::of(&proxy);
    let g0 = admin.generation().await;
    let r = admin
        .post_ok(
            "/api/v1/faults",
            json!({"version": "canary", "error_rate": 1.0, "duration": "30s"}),
        )
        .await;
    assert_eq!(r["version"], "canary", "{r:#}");
    assert_eq!(r["error_rate"], 1.0);
    assert_eq!(r["duration_ms"], 30_000);

    let client = TestClient::http1();
    let (mut failed, mut retried) = (0, 0);
    for _ in 0..30 {
        let r = client
            .get_with(&proxy.url("/v1/chat"), &[("x-rollgate-version", "canary")])
            .await;
        match (r.status.as_u16(), r.version(), r.retried_from()) {
            (500, Some("canary"), None) => failed += 1,
            (200, Some("stable"), Some("canary")) => retried += 1,
            other => panic!("a pinned request under a 100% fault answered {other:?}"),
        }
    }
    assert_eq!(failed + retried, 30);
    assert!(retried > 0, "the retry budget's floor covers some retries");
    assert_eq!(
        canary.request_count(),
        0,
        "an injected fault reached the upstream"
    );
    assert_eq!(stable.request_count(), retried);
    assert_eq!(
        admin
            .metric(
                "rollgate_upstream_errors_total",
                &[("version", "canary"), ("kind", "5xx")]
            )
            .await,
        30.0
    );
    // Unpinned traffic on the baseline is untouched.
    let seen = versions_seen(&proxy.url("/v1/chat"), 20, &[]).await;
    assert_eq!(seen, HashMap::from([("stable".to_string(), 20)]));

    // A new fault replaces the old one; once it lapses, the version answers again.
    admin
        .post_ok(
            "/api/v1/faults",
            json!({"version": "canary", "error_rate": 1.0, "duration": "50ms"}),
        )
        .await;
    assert_eventually!(
        {
            let r = client
                .get_with(&proxy.url("/v1/chat"), &[("x-rollgate-version", "canary")])
                .await;
            r.status == 200 && r.version() == Some("canary") && r.retried_from().is_none()
        },
        Duration::from_secs(3)
    );
    assert!(canary.request_count() >= 1);
    // Faults are drills, not table changes; each one leaves its record.
    assert_eq!(admin.generation().await, g0, "faults changed the table");
    let faults = admin.events_of("fault").await;
    assert_eq!(
        admin.events().await.len(),
        faults.len(),
        "only fault records"
    );
    assert!(faults.len() >= 2, "{faults:#?}");
    assert!(faults.iter().all(|f| f["version"] == "canary"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn get_config_returns_the_effective_config() {
    let (stable, canary, proxy) = stable_canary((90, 10)).await;
    let admin = AdminApi::of(&proxy);
    let s = admin.status().await;
    let r = admin.get("/api/v1/config").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let c = r.json();
    let source = c["source"].as_str().unwrap();
    assert!(source.ends_with("rollgate.yaml"), "{c:#}");
    assert_eq!(c["config_hash"], s["config_hash"]);
    assert_eq!(
        c["config_hash"].as_str().unwrap(),
        sha256_hex(&std::fs::read(source).unwrap()),
        "config_hash is the hash of the file's bytes"
    );
    assert_eq!(c["generation"], s["generation"]);
    let doc = &c["config"];
    assert_eq!(
        doc["versions"]["stable"]["endpoints"],
        json!([stable.http_url()])
    );
    assert_eq!(
        doc["versions"]["canary"]["endpoints"],
        json!([canary.http_url()])
    );
    assert_eq!(doc["routes"][0]["name"], "chat");
    assert_eq!(doc["routes"][0]["baseline"], "stable");
    assert!(c.get("runtime").is_some(), "{c:#}");
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 2. Feedback.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn feedback_names_route_and_version_once_per_request_id() {
    let (_stable, _canary, proxy) = stable_canary((0, 100)).await;
    let admin = AdminApi::of(&proxy);
    let g0 = admin.generation().await;
    let client = TestClient::http1();
    let r = client.get(&proxy.url("/v1/chat")).await;
    assert_eq!(r.status, 200);
    let id = r.header("x-request-id").expect("x-request-id").to_string();

    let fb = admin
        .post_ok(
            "/api/v1/feedback",
            json!({"request_id": id, "correct": false}),
        )
        .await;
    assert_eq!(fb["request_id"], id.as_str(), "{fb:#}");
    assert_eq!(fb["route"], "chat");
    assert_eq!(fb["version"], "canary");
    assert_eq!(fb["correct"], false);

    // Feedback counts once: the same id again is unknown.
    let again = admin
        .post(
            "/api/v1/feedback",
            &json!({"request_id": id, "correct": true}).to_string(),
        )
        .await;
    assert_eq!(again.status, 404, "{}", again.text());
    assert_eq!(again.json()["error"], "not_found");
    assert!(again.json()["detail"].is_string());
    let unknown = admin
        .post(
            "/api/v1/feedback",
            r#"{"request_id": "never-seen-1234", "correct": true}"#,
        )
        .await;
    assert_eq!(unknown.status, 404, "{}", unknown.text());
    assert_eq!(unknown.json()["error"], "not_found");

    // A client-chosen id works too.
    let r = client
        .get_with(&proxy.url("/v1/chat"), &[("x-request-id", "client-id-42")])
        .await;
    assert_eq!(r.header("x-request-id"), Some("client-id-42"));
    let fb = admin
        .post_ok(
            "/api/v1/feedback",
            json!({"request_id": "client-id-42", "correct": true}),
        )
        .await;
    assert_eq!(fb["version"], "canary");
    admin.assert_unchanged(g0, 0, "feedback").await;
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 3. Methods.
// ---------------------------------------------------------------------------------------

const POSTS: &[&str] = &[
    "/api/v1/rollback",
    "/api/v1/promote",
    "/api/v1/resume",
    "/api/v1/weights",
    "/api/v1/pause",
    "/api/v1/feedback",
    "/api/v1/faults",
    "/api/v1/reload",
];

const GETS: &[&str] = &[
    "/healthz",
    "/readyz",
    "/metrics",
    "/api/v1/status",
    "/api/v1/config",
    "/api/v1/events",
];

fn assert_json_error(r: &TestResponse, what: &str) {
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{what}: {}",
        r.text()
    );
    let body = r.json();
    assert!(body["error"].is_string(), "{what}: {body}");
    assert!(body["detail"].is_string(), "{what}: {body}");
}

#[tokio::test]
async fn post_endpoints_refuse_get_and_get_endpoints_refuse_post() {
    let (_stable, _canary, proxy) = stable_canary((50, 50)).await;
    let admin = AdminApi::of(&proxy);
    let g0 = admin.generation().await;
    let client = TestClient::http1();
    for path in POSTS {
        let r = admin.get(path).await;
        assert_eq!(r.status, 405, "GET {path}: {}", r.text());
        assert_eq!(r.header("allow"), Some("POST"), "GET {path}");
        assert_json_error(&r, &format!("GET {path}"));
        assert_eq!(r.json()["error"], "method_not_allowed");
        for method in [Method::PUT, Method::DELETE] {
            let r = client
                .send(
                    request(method.clone(), &admin.url(path))
                        .body(empty())
                        .unwrap(),
                )
                .await;
            assert_eq!(r.status, 405, "{method} {path}");
            assert_eq!(r.header("allow"), Some("POST"), "{method} {path}");
        }
    }
    for path in GETS {
        let r = admin.post(path, "{}").await;
        assert_eq!(r.status, 405, "POST {path}: {}", r.text());
        let allow = r.header("allow").unwrap_or_default();
        assert!(allow.contains("GET"), "POST {path}: Allow: {allow:?}");
        assert!(!allow.contains("POST"), "POST {path}: Allow: {allow:?}");
        assert_json_error(&r, &format!("POST {path}"));
    }
    let r = admin.get("/api/v1/nope").await;
    assert_eq!(r.status, 404);
    assert_json_error(&r, "GET /api/v1/nope");
    // None of it reloaded or changed anything.
    admin.assert_unchanged(g0, 0, "wrong methods").await;
    assert_eq!(
        admin.metric("rollgate_config_reloads_total", &[]).await,
        0.0
    );
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 4. Bearer token.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn token_guards_every_post_and_a_refused_call_changes_nothing() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("admin-token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\n\
         admin: {{listen: \"127.0.0.1:0\", token_file: \"{token}\"}}\n\
         state_dir: \"{{state_dir}}\"\n\
         drain_timeout: 2s\n\
         evaluator: {{min_requests: 1000000}}\n\
         versions:\n  \
           stable: {{endpoints: [\"{us}\"]}}\n  \
           canary: {{endpoints: [\"{uc}\"]}}\n\
         routes:\n  \
           - {{name: chat, match: {{path_prefix: /}}, baseline: stable, split: {{stable: 50, canary: 50}}}}\n",
        token = token_file.display(),
        us = stable.http_url(),
        uc = canary.http_url(),
    );
    let proxy = TestProxy::from_yaml(&yaml).await;
    let anonymous = AdminApi::of(&proxy);
    let g0 = anonymous.generation().await;
    let rollback = r#"{"route": "chat", "version": "canary", "operator": "mallory"}"#;

    for (what, api, extra) in [
        ("no Authorization", anonymous.clone(), vec![]),
        (
            "a wrong token",
            anonymous.clone().with_token("not-the-token"),
            vec![],
        ),
        (
            "a token in another scheme",
            anonymous.clone(),
            vec![("authorization", "Basic czNjcmV0LXRva2Vu")],
        ),
        (
            "an empty bearer",
            anonymous.clone(),
            vec![("authorization", "Bearer ")],
        ),
    ] {
        for path in POSTS {
            let body = if *path == "/api/v1/rollback" {
                rollback
            } else {
                "{}"
            };
            let r = api.post_with(path, body, &extra).await;
            assert_eq!(r.status, 401, "POST {path} with {what}: {}", r.text());
            assert_json_error(&r, &format!("POST {path} with {what}"));
            assert_eq!(r.json()["error"], "unauthorized");
            let challenge = r.header("www-authenticate").unwrap_or_default();
            assert!(
                challenge.starts_with("Bearer"),
                "POST {path} with {what}: WWW-Authenticate: {challenge:?}"
            );
        }
    }
    // Nothing changed: no swap, no record, no reload.
    anonymous.assert_unchanged(g0, 0, "401s").await;
    assert_eq!(
        version_of(&anonymous.status().await, "canary")["quarantined"],
        false
    );
    assert_eq!(
        anonymous.metric("rollgate_config_reloads_total", &[]).await,
        0.0
    );
    // Reads need no token.
    for path in GETS {
        let r = anonymous.get(path).await;
        assert_eq!(r.status, 200, "GET {path} without a token: {}", r.text());
    }
    // The right token works (the file's trailing newline is not part of it).
    let operator = anonymous.clone().with_token("s3cret-token");
    let rec = operator
        .post_ok("/api/v1/rollback", serde_json::from_str(rollback).unwrap())
        .await;
    assert_eq!(rec["kind"], "rollback");
    assert_eq!(rec["initiated_by"], "mallory");
    assert_eq!(operator.generation().await, g0 + 1);
    assert_eq!(operator.events().await[0], rec);
    proxy.shutdown().await;
}

/// RFC 9110 §11.1: the authentication scheme is a case-insensitive token, so
/// `authorization: bearer TOKEN` is the same credential as `Bearer TOKEN`.
#[tokio::test]
async fn token_scheme_is_case_insensitive() {
    let stable = TestUpstream::start("stable").await;
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("admin-token");
    std::fs::write(&token_file, "s3cret-token").unwrap();
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\n\
         admin: {{listen: \"127.0.0.1:0\", token_file: \"{token}\"}}\n\
         state_dir: \"{{state_dir}}\"\n\
         versions:\n  \
           stable: {{endpoints: [\"{us}\"]}}\n\
         routes:\n  \
           - {{name: chat, match: {{path_prefix: /}}, baseline: stable, split: {{stable: 100}}}}\n",
        token = token_file.display(),
        us = stable.http_url(),
    );
    let proxy = TestProxy::from_yaml(&yaml).await;
    let admin = AdminApi::of(&proxy);
    let r = admin
        .post_with(
            "/api/v1/pause",
            r#"{"route": "chat", "paused": true}"#,
            &[("authorization", "bearer s3cret-token")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    proxy.shutdown().await;
}

/// `admin.listen` changes only on restart, so after a reload the admin listener is still
/// bound where the old file put it. A new file that moves the admin API to loopback and, in
/// the same edit, drops `admin.token_file` passes validation on its own, but must not leave
/// the running non-loopback listener without a token.
#[tokio::test]
async fn reload_cannot_drop_the_token_of_a_running_non_loopback_admin_listener() {
    let up = TestUpstream::start("stable").await;
    let root = tempfile::tempdir().unwrap();
    let token_file = root.path().join("admin-token");
    std::fs::write(&token_file, "s3cret-token").unwrap();
    let path = root.path().join("rollgate.yaml");
    let config_with = |admin: &str| {
        format!(
            "listen: \"127.0.0.1:0\"\n\
             admin: {admin}\n\
             state_dir: \"{state}\"\n\
             versions:\n  \
               stable: {{endpoints: [\"{url}\"]}}\n\
             routes:\n  \
               - {{name: chat, match: {{path_prefix: /}}, baseline: stable, split: {{stable: 100}}}}\n",
            state = root.path().join("state").display(),
            url = up.http_url(),
        )
    };
    std::fs::write(
        &path,
        config_with(&format!(
            "{{listen: \"0.0.0.0:0\", token_file: \"{}\"}}",
            token_file.display()
        )),
    )
    .unwrap();
    let config = rollgate::config::Config::load(&path).unwrap();
    // Bound as the config says: on every interface (port 0), reached here over loopback.
    let admin_listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let admin_port = admin_listener.local_addr().unwrap().port();
    let running = rollgate::app::start(
        config,
        rollgate::app::Listeners {
            data: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: admin_listener,
            health: None,
        },
    )
    .await
    .unwrap();
    let anonymous = AdminApi::at(SocketAddr::from(([127, 0, 0, 1], admin_port)));
    let operator = anonymous.clone().with_token("s3cret-token");
    let pause = r#"{"route": "chat", "paused": true}"#;
    assert_eq!(anonymous.post("/api/v1/pause", pause).await.status, 401);

    save_like_an_editor(&path, &config_with("{listen: \"127.0.0.1:0\"}"));
    let r = operator.post("/api/v1/reload", "").await;
    assert!(
        [200, 422].contains(&r.status.as_u16()),
        "{} {}",
        r.status,
        r.text()
    );
    let r = anonymous.post("/api/v1/pause", pause).await;
    assert_eq!(
        r.status,
        401,
        "the admin API still listening on 0.0.0.0 took a POST without a token: {}",
        r.text()
    );
    shut_down(running).await;
}

// ---------------------------------------------------------------------------------------
// 5. Errors change nothing.
// ---------------------------------------------------------------------------------------

/// POSTs each `(path, body, status, what)` and asserts the status, a JSON error body, and
/// that neither the table nor the audit log moved.
async fn expect_refused(admin: &AdminApi, cases: &[(&str, &str, u16, &str)]) {
    let g = admin.generation().await;
    let n = admin.events().await.len();
    for (path, body, want, what) in cases {
        let r = admin.post(path, body).await;
        assert_eq!(
            r.status.as_u16(),
            *want,
            "{what}: POST {path} {body}: {}",
            r.text()
        );
        assert_json_error(&r, what);
        admin.assert_unchanged(g, n, what).await;
    }
}

#[tokio::test]
async fn refused_calls_answer_json_errors_and_change_nothing() {
    let (_stable, _canary, proxy) = stable_canary((50, 50)).await;
    let admin = AdminApi::of(&proxy);
    #[rustfmt::skip]
    let cases: &[(&str, &str, u16, &str)] = &[
        ("/api/v1/rollback", r#"{"version": "canary""#, 400, "malformed JSON"),
        ("/api/v1/rollback", "not json at all", 400, "not JSON"),
        ("/api/v1/rollback", r#"{"version": "canary", "bogus": 1}"#, 400, "unknown field"),
        ("/api/v1/rollback", r#"{"reason": "no version"}"#, 400, "missing field"),
        ("/api/v1/weights", r#"{"route": "chat", "weights": {"stable": "ten"}}"#, 400, "weight not a number"),
        ("/api/v1/weights", r#"{"route": "chat", "weights": {"stable": 0, "canary": 0}}"#, 400, "all weights 0"),
        ("/api/v1/weights", r#"{"route": "chat", "weights": {"nope": 10}}"#, 400, "version not on the route"),
        ("/api/v1/faults", r#"{"version": "canary", "error_rate": 1.5, "duration": "1s"}"#, 400, "error_rate > 1"),
        ("/api/v1/faults", r#"{"version": "canary", "duration": "soon"}"#, 400, "bad duration"),
        ("/api/v1/feedback", r#"{"request_id": "x"}"#, 400, "feedback without correct"),
        ("/api/v1/rollback", r#"{"version": "nope"}"#, 404, "unknown version (rollback)"),
        ("/api/v1/resume", r#"{"version": "nope"}"#, 404, "unknown version (resume)"),
        ("/api/v1/faults", r#"{"version": "nope", "duration": "1s"}"#, 404, "unknown version (faults)"),
        ("/api/v1/promote", r#"{"route": "chat", "version": "nope"}"#, 404, "unknown version (promote)"),
        ("/api/v1/rollback", r#"{"route": "nope", "version": "canary"}"#, 404, "unknown route (rollback)"),
        ("/api/v1/promote", r#"{"route": "nope", "version": "canary"}"#, 404, "unknown route (promote)"),
        ("/api/v1/weights", r#"{"route": "nope", "weights": {"canary": 1}}"#, 404, "unknown route (weights)"),
        ("/api/v1/pause", r#"{"route": "nope", "paused": true}"#, 404, "unknown route (pause)"),
        ("/api/v1/resume", r#"{"version": "canary"}"#, 409, "resume of a version not rolled back"),
        ("/api/v1/rollback", r#"{"route": "chat", "version": "stable"}"#, 409, "rollback of the baseline"),
    ];
    expect_refused(&admin, cases).await;
    let s = admin.status().await;
    assert_eq!(
        route_of(&s, "chat")["weights"],
        json!({"stable": 50, "canary": 50})
    );
    assert_eq!(route_of(&s, "chat")["state"], "steady");

    // After one real rollback: a second one is a conflict, and so is promoting it.
    admin
        .post_ok("/api/v1/rollback", json!({"version": "canary"}))
        .await;
    #[rustfmt::skip]
    let after: &[(&str, &str, u16, &str)] = &[
        ("/api/v1/rollback", r#"{"version": "canary"}"#, 409, "rollback of a rolled back version"),
        ("/api/v1/rollback", r#"{"route": "chat", "version": "canary", "operator": "x"}"#, 409, "rollback again, with route"),
        ("/api/v1/promote", r#"{"route": "chat", "version": "canary"}"#, 409, "promote of a rolled back version"),
    ];
    expect_refused(&admin, after).await;
    assert_eq!(admin.events_of("rollback").await.len(), 1);
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 6. Validation on start.
// ---------------------------------------------------------------------------------------

#[test]
fn admin_on_a_non_loopback_address_needs_a_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rollgate.yaml");
    let body = "versions:\n  a: {endpoints: [\"http://127.0.0.1:9\"]}\n\
                routes:\n  - {name: r, match: {path_prefix: /}, baseline: a, split: {a: 1}}\n";
    let open = format!("listen: \"127.0.0.1:0\"\nadmin: {{listen: \"0.0.0.0:0\"}}\n{body}");
    let err = rollgate::config::Config::from_str(&open, &path)
        .expect_err("an open admin API without a token must be rejected")
        .to_string();
    assert!(err.contains("admin.listen"), "{err}");
    assert!(err.contains("token_file"), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(
        err.contains(&format!("{}:2:", path.display())),
        "the error points at the line: {err}"
    );

    // With a token the same address is fine; so is loopback without one.
    let token = dir.path().join("token");
    std::fs::write(&token, "t").unwrap();
    let guarded = format!(
        "listen: \"127.0.0.1:0\"\nadmin: {{listen: \"0.0.0.0:0\", token_file: \"{}\"}}\n{body}",
        token.display()
    );
    rollgate::config::Config::from_str(&guarded, &path).expect("token_file given");
    let loopback = format!("listen: \"127.0.0.1:0\"\nadmin: {{listen: \"127.0.0.1:0\"}}\n{body}");
    rollgate::config::Config::from_str(&loopback, &path).expect("loopback admin");
    // `rollgate check` runs the same pipeline.
    std::fs::write(&path, &open).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rollgate"))
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("admin.listen"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------
// 7-9. Hot reload.
// ---------------------------------------------------------------------------------------

/// Closed-loop GETs from `conns` clients until stopped; counts answers by version and
/// everything that was not a 200.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    versions: Arc<Mutex<HashMap<String, u64>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: String, conns: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let versions = Arc::new(Mutex::new(HashMap::new()));
        let tasks = (0..conns)
            .map(|_| {
                let (stop, sent, failures, versions, url) = (
                    stop.clone(),
                    sent.clone(),
                    failures.clone(),
                    versions.clone(),
                    url.clone(),
                );
                tokio::spawn(async move {
                    let client = TestClient::http1();
                    while !stop.load(Ordering::Relaxed) {
                        let r = client
                            .try_send(request(Method::GET, &url).body(empty()).unwrap())
                            .await;
                        sent.fetch_add(1, Ordering::Relaxed);
                        match r {
                            Ok(r) if r.status == 200 => {
                                let v = r.version().unwrap_or("none").to_string();
                                *versions.lock().unwrap().entry(v).or_insert(0) += 1;
                            }
                            Ok(r) => {
                                failures
                                    .lock()
                                    .unwrap()
                                    .push(format!("{} {}", r.status, r.text()))
                            }
                            Err(e) => failures.lock().unwrap().push(e),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            sent,
            failures,
            versions,
            tasks,
        }
    }

    fn seen(&self, version: &str) -> u64 {
        self.versions
            .lock()
            .unwrap()
            .get(version)
            .copied()
            .unwrap_or(0)
    }

    /// Stops the clients: (requests sent, failures).
    async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.sent.load(Ordering::Relaxed), failures)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn configmap_symlink_swap_reloads_under_load_without_a_failed_request() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("state");
    // What the kubelet builds for a ConfigMap volume.
    let dir = root.path().join("config");
    std::fs::create_dir_all(dir.join("..2026_a")).unwrap();
    std::fs::write(
        dir.join("..2026_a/rollgate.yaml"),
        two_versions_yaml(&state, &a, &b, (100, 0), ""),
    )
    .unwrap();
    std::os::unix::fs::symlink("..2026_a", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/rollgate.yaml", dir.join("rollgate.yaml")).unwrap();
    let running = start_from_file(&dir.join("rollgate.yaml"), false).await;
    let admin = AdminApi::at(running.admin_addr);
    let url = format!("http://{}/v1/chat", running.data_addr);
    let before = admin.status().await;
    assert_eq!(
        route_of(&before, "chat")["weights"],
        json!({"a": 100, "b": 0})
    );

    let load = Load::start(url.clone(), 4);
    assert_eventually!(load.seen("a") >= 50, Duration::from_secs(5));
    // The kubelet's atomic update: new timestamped dir, `..data_tmp` symlink, rename.
    std::fs::create_dir_all(dir.join("..2026_b")).unwrap();
    std::fs::write(
        dir.join("..2026_b/rollgate.yaml"),
        two_versions_yaml(&state, &a, &b, (0, 100), ""),
    )
    .unwrap();
    std::os::unix::fs::symlink("..2026_b", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join("..2026_a")).unwrap();
    let swapped = Instant::now();

    assert_eventually!(
        {
            let s = admin.status().await;
            route_of(&s, "chat")["weights"] == json!({"a": 0, "b": 100})
        },
        Duration::from_secs(2),
        "the new weights were not applied within 2s of the ..data swap"
    );
    let applied_after = swapped.elapsed();
    let b_at_switch = load.seen("b");
    let a_at_switch = load.seen("a");
    assert_eventually!(load.seen("b") >= b_at_switch + 100, Duration::from_secs(5));
    assert!(
        load.seen("a") <= a_at_switch + 4,
        "version a still served after the swap"
    );
    let (sent, failures) = load.stop().await;
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed across the reload: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let seen = versions_seen(&url, 50, &[]).await;
    assert_eq!(seen, HashMap::from([("b".to_string(), 50)]));

    let after = admin.status().await;
    assert_ne!(after["config_hash"], before["config_hash"]);
    assert!(after["generation"].as_u64() > before["generation"].as_u64());
    // Counted once the reload's state and audit record are written, which follows the swap
    // (two fsyncs: long on a busy disk, as under CI's parallel tests).
    assert_eventually!(
        admin
            .metric("rollgate_config_reloads_total", &[("result", "ok")])
            .await
            >= 1.0,
        Duration::from_secs(5),
        "the reload applied but was never counted"
    );
    assert_eq!(
        admin
            .metric("rollgate_config_reloads_total", &[("result", "error")])
            .await,
        0.0
    );
    let reloads = reload_records(&admin, 1).await;
    let rec = reloads
        .iter()
        .find(|r| r["config_hash"] == after["config_hash"])
        .unwrap_or_else(|| panic!("no config_reload record for the new hash: {reloads:#?}"));
    assert_eq!(rec["result"], "ok");
    assert_eq!(rec["cause"], "file_change");
    assert_eq!(rec["previous_hash"], before["config_hash"]);
    eprintln!("..data swap applied within {applied_after:?}; {sent} requests, 0 failed");
    shut_down(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_edit_keeps_the_old_table_and_a_fixed_file_applies() {
    let (_stable, _canary, proxy) = stable_canary((50, 50)).await;
    let admin = AdminApi::of(&proxy);
    let config = admin.get("/api/v1/config").await.json();
    let path = PathBuf::from(config["source"].as_str().unwrap());
    let before = admin.status().await;
    let g0 = before["generation"].as_u64().unwrap();
    let good = proxy.yaml().to_string();
    // Counters exist at 0 before their first event, so `increase()` and alerts see it.
    let text = proxy.metrics_text().await;
    for series in [
        "rollgate_config_reloads_total{result=\"error\"} 0",
        "rollgate_rollback_triggered_total{route=\"chat\",trigger=\"error_rate_ratio\"} 0",
        "rollgate_rollback_completed_total{route=\"chat\"} 0",
        "rollgate_config_last_reload_successful 1",
    ] {
        assert!(text.contains(series), "missing `{series}` in\n{text}");
    }

    // An editor saves a file with an unknown key.
    let broken = format!("{good}bogus_key: 1\n");
    save_like_an_editor(&path, &broken);
    assert_eventually!(
        admin
            .metric("rollgate_config_reloads_total", &[("result", "error")])
            .await
            == 1.0,
        Duration::from_secs(3),
        "the invalid edit was not counted"
    );
    assert_eq!(
        admin
            .metric("rollgate_config_last_reload_successful", &[])
            .await,
        0.0,
        "a rejected file is still in place"
    );
    let errors = reload_records(&admin, 1).await;
    let rec = &errors[0];
    assert_eq!(rec["result"], "error", "{rec:#}");
    assert_eq!(rec["cause"], "file_change");
    let text = rec["error"].as_str().unwrap();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("bogus_key"), "{text}");
    // The error names the line the key is on.
    let line = broken.lines().count();
    assert!(
        text.contains(&format!("{}:{line}:", path.display())),
        "{text}"
    );
    // The old table keeps serving.
    let s = admin.status().await;
    assert_eq!(s["generation"], g0);
    assert_eq!(s["config_hash"], before["config_hash"]);
    let seen = versions_seen(&proxy.url("/v1/chat"), 40, &[]).await;
    assert_eq!(seen.values().sum::<usize>(), 40);

    // POST /api/v1/reload of the same broken file: 422, nothing changed.
    let r = admin.post("/api/v1/reload", "").await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_json_error(&r, "reload of an invalid file");
    let body = r.json();
    assert_eq!(body["error"], "invalid_config");
    assert!(
        body["detail"].as_str().unwrap().contains("bogus_key"),
        "{body:#}"
    );
    let s = admin.status().await;
    assert_eq!(s["generation"], g0);
    assert_eq!(s["config_hash"], before["config_hash"]);
    assert_eq!(
        admin
            .metric("rollgate_config_reloads_total", &[("result", "error")])
            .await,
        2.0
    );
    let records = reload_records(&admin, 2).await;
    assert_eq!(body["record"], records[1], "the 422 carries its record");
    assert_eq!(records[1]["cause"], "api");
    assert_eq!(records[1]["result"], "error");
    assert_eq!(
        admin
            .metric("rollgate_config_reloads_total", &[("result", "ok")])
            .await,
        0.0
    );

    // A bad value rather than a bad key.
    let bad_weight = good.replace(
        "split: {stable: 50, canary: 50}",
        "split: {stable: 50, canary: -5}",
    );
    assert_ne!(bad_weight, good);
    save_like_an_editor(&path, &bad_weight);
    assert_eventually!(
        admin
            .metric("rollgate_config_reloads_total", &[("result", "error")])
            .await
            == 3.0,
        Duration::from_secs(3)
    );
    let last = reload_records(&admin, 3).await.pop().unwrap();
    assert_eq!(last["result"], "error");
    assert!(
        last["error"]
            .as_str()
            .unwrap()
            .contains("routes[0].split.canary"),
        "{last:#}"
    );
    assert_eq!(admin.generation().await, g0);

    // Fixed: the watcher applies it.
    let fixed = good.replace(
        "split: {stable: 50, canary: 50}",
        "split: {stable: 20, canary: 80}",
    );
    save_like_an_editor(&path, &fixed);
    assert_eventually!(
        route_of(&admin.status().await, "chat")["weights"] == json!({"stable": 20, "canary": 80}),
        Duration::from_secs(3),
        "the fixed file was not applied"
    );
    let s = admin.status().await;
    assert_eq!(
        s["config_hash"].as_str().unwrap(),
        sha256_hex(fixed.as_bytes())
    );
    assert_eq!(s["generation"], g0 + 1);
    let last = reload_records(&admin, 4).await.pop().unwrap();
    assert_eq!(last["result"], "ok", "{last:#}");
    assert_eq!(last["cause"], "file_change");
    assert_eq!(last["config_hash"], s["config_hash"]);
    assert_eventually!(
        admin
            .metric("rollgate_config_reloads_total", &[("result", "ok")])
            .await
            == 1.0,
        Duration::from_secs(1)
    );
    assert_eq!(
        admin
            .metric("rollgate_config_last_reload_successful", &[])
            .await,
        1.0
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn quarantine_survives_a_compatible_reload_and_lapses_on_a_new_fingerprint() {
    let (_stable, canary, proxy) = stable_canary((50, 50)).await;
    let admin = AdminApi::of(&proxy);
    let path = PathBuf::from(
        admin.get("/api/v1/config").await.json()["source"]
            .as_str()
            .unwrap(),
    );
    let original = proxy.yaml().to_string();
    admin
        .post_ok(
            "/api/v1/rollback",
            json!({"route": "chat", "version": "canary", "operator": "alice"}),
        )
        .await;
    let fp = version_of(&admin.status().await, "canary")["fingerprint"].clone();

    // Same endpoints, another owner: the quarantine holds.
    let edited = original.replace("owner: rollgate-tests", "owner: ml-platform");
    assert_ne!(edited, original);
    save_like_an_editor(&path, &edited);
    let rec = admin.post_ok("/api/v1/reload", json!({})).await;
    assert_eq!(rec["result"], "ok");
    let s = admin.status().await;
    assert_eq!(route_of(&s, "chat")["owner"], "ml-platform");
    assert_eq!(version_of(&s, "canary")["fingerprint"], fp);
    assert_eq!(version_of(&s, "canary")["quarantined"], true);
    assert_eq!(route_of(&s, "chat")["state"], "rolled_back");
    assert_eq!(
        route_of(&s, "chat")["weights"],
        json!({"stable": 100, "canary": 0})
    );
    let seen = versions_seen(&proxy.url("/v1/chat"), 50, &[]).await;
    assert_eq!(seen, HashMap::from([("stable".to_string(), 50)]));

    // New endpoints: a new bundle, so the quarantine lapses.
    let canary2 = TestUpstream::start("canary2").await;
    let moved = edited.replace(
        &format!("\"{}\"", canary.http_url()),
        &format!("\"{}\"", canary2.http_url()),
    );
    assert_ne!(moved, edited);
    save_like_an_editor(&path, &moved);
    admin.post_ok("/api/v1/reload", json!({})).await;
    let s = admin.status().await;
    assert_ne!(version_of(&s, "canary")["fingerprint"], fp);
    assert_canary_serves_again(&admin, &s, &proxy, 100, 10).await;
    assert!(canary2.request_count() > 10);
    proxy.shutdown().await;
}

/// SPEC §1: a quarantine lasts "until an operator resumes the version or the config changes
/// its fingerprint". Once lapsed it is over: putting the old endpoints back must not bring it
/// back silently (no record, no alert, and `resume` meanwhile answered 409).
#[tokio::test]
async fn a_lapsed_quarantine_does_not_come_back_when_the_old_bundle_returns() {
    let (_stable, canary, proxy) = stable_canary((50, 50)).await;
    let admin = AdminApi::of(&proxy);
    let path = PathBuf::from(
        admin.get("/api/v1/config").await.json()["source"]
            .as_str()
            .unwrap(),
    );
    let original = proxy.yaml().to_string();
    admin
        .post_ok("/api/v1/rollback", json!({"version": "canary"}))
        .await;
    let canary2 = TestUpstream::start("canary2").await;
    let moved = original.replace(
        &format!("\"{}\"", canary.http_url()),
        &format!("\"{}\"", canary2.http_url()),
    );
    save_like_an_editor(&path, &moved);
    admin.post_ok("/api/v1/reload", json!({})).await;
    assert_eq!(
        version_of(&admin.status().await, "canary")["quarantined"],
        false
    );
    // The operator cannot clear it either: the version is not rolled back.
    let r = admin
        .post("/api/v1/resume", r#"{"version": "canary"}"#)
        .await;
    assert_eq!(r.status, 409);

    save_like_an_editor(&path, &original);
    admin.post_ok("/api/v1/reload", json!({})).await;
    let s = admin.status().await;
    assert_eq!(
        version_of(&s, "canary")["quarantined"],
        false,
        "the lapsed quarantine came back with the old endpoints: {s:#}"
    );
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 10. SIGTERM drain of the real binary.
// ---------------------------------------------------------------------------------------

/// A child process killed (and reaped) when the test ends, however it ends.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A field of a `tracing` JSON log line (under `fields`, or flattened).
fn log_field<'a>(line: &'a Value, key: &str) -> Option<&'a str> {
    line["fields"][key].as_str().or_else(|| line[key].as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_fails_readiness_finishes_in_flight_requests_and_exits_0() {
    let slow = TestUpstream::start("slow").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rollgate.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:0\n\
             admin: {{listen: 127.0.0.1:0}}\n\
             state_dir: \"{state}\"\n\
             drain_timeout: 5s\n\
             evaluator: {{min_requests: 1000000}}\n\
             versions:\n  \
               slow: {{endpoints: [\"{url}\"]}}\n\
             routes:\n  \
               - {{name: chat, match: {{path_prefix: /}}, baseline: slow, split: {{slow: 100}}}}\n",
            state = dir.path().join("state").display(),
            url = slow.http_url(),
        ),
    )
    .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_rollgate"))
        .args(["--log-format", "json", "run", "-c"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn rollgate");
    let mut child = ChildGuard(child);
    // Collect both streams line by line (logs go to stderr; read stdout too, to be sure).
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let readers: Vec<_> = [
        Box::new(child.0.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.0.stderr.take().unwrap()),
    ]
    .into_iter()
    .map(|stream| {
        let lines = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stream)
                .lines()
                .map_while(Result::ok)
            {
                lines.lock().unwrap().push(line);
            }
        })
    })
    .collect();
    let logged = |message: &str| -> Option<Value> {
        lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| log_field(v, "message") == Some(message))
    };
    assert_eventually!(
        logged("rollgate serving").is_some(),
        Duration::from_secs(10),
        "no \"rollgate serving\" log line; output so far: {:#?}",
        lines.lock().unwrap()
    );
    let serving = logged("rollgate serving").unwrap();
    let data_addr: SocketAddr = log_field(&serving, "data_addr").unwrap().parse().unwrap();
    let admin_addr: SocketAddr = log_field(&serving, "admin_addr").unwrap().parse().unwrap();
    let admin = AdminApi::at(admin_addr);
    assert_eq!(admin.get("/readyz").await.status, 200);

    // One request that takes 2 s, in flight when SIGTERM arrives.
    slow.set_delay(Duration::from_secs(2));
    let in_flight = tokio::spawn(async move {
        TestClient::http1()
            .get(&format!("http://{data_addr}/v1/chat"))
            .await
    });
    assert_eventually!(slow.request_count() == 1, Duration::from_secs(5));
    let pid = child.0.id();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let term_sent = Instant::now();

    // Draining: readiness fails at once, new connections are refused.
    let probe = TestClient::http1();
    assert_eventually!(
        matches!(
            probe
                .try_send(
                    request(Method::GET, &admin.url("/readyz"))
                        .body(empty())
                        .unwrap()
                )
                .await,
            Ok(ref r) if r.status == 503
        ),
        Duration::from_secs(1),
        "/readyz did not turn 503 after SIGTERM"
    );
    assert!(
        term_sent.elapsed() < Duration::from_millis(1500),
        "readiness failed only after the drain"
    );
    assert_eventually!(
        tokio::net::TcpStream::connect(data_addr).await.is_err(),
        Duration::from_secs(1),
        "the data listener still accepts after SIGTERM"
    );

    // The in-flight request finishes, told to close its connection.
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.version(), Some("slow"));
    assert_eq!(r.header("x-upstream"), Some("slow"));
    assert_eq!(r.header("connection"), Some("close"));

    // ...and the process exits 0 well within drain_timeout (5 s) + margin.
    let mut status;
    assert_eventually!(
        {
            status = child.0.try_wait().unwrap();
            status.is_some()
        },
        Duration::from_secs(7),
        "rollgate still running {:?} after SIGTERM",
        term_sent.elapsed()
    );
    let status = status.unwrap();
    let took = term_sent.elapsed();
    for r in readers {
        r.join().unwrap();
    }
    let output = lines.lock().unwrap().join("\n");
    assert!(
        status.success(),
        "exit status {status:?}; output:\n{output}"
    );
    assert!(
        took < Duration::from_secs(5),
        "exit took {took:?}: the drain waited for drain_timeout instead of the last request"
    );
    assert!(
        logged("shutdown signal received; draining").is_some(),
        "{output}"
    );
    assert!(logged("drained; exiting").is_some(), "{output}");
}

// ---------------------------------------------------------------------------------------
// 11. health_listen.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn health_listen_serves_probes_and_metrics_only() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("rollgate.yaml");
    std::fs::write(
        &path,
        two_versions_yaml(
            &root.path().join("state"),
            &a,
            &b,
            (50, 50),
            "health_listen: \"127.0.0.1:0\"\n",
        ),
    )
    .unwrap();
    let running = start_from_file(&path, true).await;
    let health = AdminApi::at(running.health_addr.expect("health listener"));
    let admin = AdminApi::at(running.admin_addr);
    let g0 = admin.generation().await;

    let r = health.get("/healthz").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = health.get("/readyz").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = health.get("/metrics").await;
    assert_eq!(r.status, 200);
    assert!(
        r.text().contains("rollgate_routing_table_generation"),
        "{}",
        r.text()
    );
    assert_eq!(
        metric_sum(&r.text(), "rollgate_routing_table_generation", &[]),
        g0 as f64
    );
    for path in ["/api/v1/status", "/api/v1/config", "/api/v1/events"] {
        let r = health.get(path).await;
        assert_eq!(r.status, 404, "GET {path} on health_listen: {}", r.text());
        assert_json_error(&r, &format!("GET {path} on health_listen"));
    }
    for path in POSTS {
        let body = if *path == "/api/v1/rollback" {
            r#"{"route": "chat", "version": "b"}"#
        } else {
            "{}"
        };
        let r = health.post(path, body).await;
        assert!(
            [404, 405].contains(&r.status.as_u16()),
            "POST {path} on health_listen: {} {}",
            r.status,
            r.text()
        );
        assert_json_error(&r, &format!("POST {path} on health_listen"));
    }
    let r = health.post("/metrics", "").await;
    assert_eq!(r.status, 405);
    // Nothing reached the control plane through it.
    admin
        .assert_unchanged(g0, 0, "POSTs on health_listen")
        .await;
    assert_eq!(version_of(&admin.status().await, "b")["quarantined"], false);
    shut_down(running).await;
}

/// Reloads run one at a time, each reading the file inside its turn: a reload that read the
/// file before an edit can never apply that stale text after a reload that read the edit
/// (CI caught the file watcher's reload of an older save landing after an API reload of the
/// newer one, so `status` showed the old endpoints). Here a stream of API reloads is busy
/// parsing a long file when a short edit lands and is reloaded: the edit must win.
#[tokio::test]
async fn a_reload_never_applies_text_older_than_one_already_applied() {
    let (_stable, _canary, proxy) = stable_canary((50, 50)).await;
    let admin = AdminApi::of(&proxy);
    let path = PathBuf::from(
        admin.get("/api/v1/config").await.json()["source"]
            .as_str()
            .unwrap(),
    );
    let short = proxy.yaml().to_string();
    assert!(short.contains("owner: rollgate-tests"));
    let padding: String = (0..20_000).map(|i| format!("# note {i}\n")).collect();
    let owner = |s: &Value| route_of(s, "chat")["owner"].as_str().unwrap().to_string();
    for i in 0..5 {
        let long = format!("{short}{padding}").replace("rollgate-tests", &format!("old-{i}"));
        save_like_an_editor(&path, &long);
        let stop = Arc::new(AtomicBool::new(false));
        let hammer = {
            let (admin, stop) = (admin.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let (a, b) = (admin.clone(), admin.clone());
                    tokio::join!(
                        a.post("/api/v1/reload", "{}"),
                        b.post("/api/v1/reload", "{}")
                    );
                }
            })
        };
        assert_eventually!(
            owner(&admin.status().await) == format!("old-{i}"),
            Duration::from_secs(10),
            "the long file never loaded"
        );
        save_like_an_editor(&path, &short.replace("rollgate-tests", &format!("new-{i}")));
        admin.post_ok("/api/v1/reload", json!({})).await;
        stop.store(true, Ordering::Relaxed);
        hammer.await.unwrap();
        assert_eq!(
            owner(&admin.status().await),
            format!("new-{i}"),
            "round {i}: a reload that read the file before the edit applied it afterwards"
        );
    }
    proxy.shutdown().await;
}
