//! Automatic rollback as users see it: real traffic, upstreams told to fail, the evidence.

#[macro_use]
mod support;

use std::time::Duration;

use support::*;

async fn quarantined(proxy: &TestProxy, version: &str) -> bool {
    let s = proxy.status_json().await;
    s["versions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["name"] == version && v["quarantined"] == true)
}

/// A manual rollback of `version` through the one decision path; its record.
async fn manual_rollback(
    proxy: &TestProxy,
    version: &str,
    reason: &str,
    operator: &str,
) -> serde_json::Value {
    use rollgate::decision::{Action, Command};
    let cmd = Command::new(
        Action::Rollback {
            route: Some("chat".into()),
            version: version.into(),
            trigger: rollgate::evaluator::rules::Trigger::Manual,
            evidence: serde_json::Value::Null,
            expect: None,
        },
        Some(operator.into()),
        Some(reason.into()),
    );
    proxy.running().controller.apply(cmd).await.unwrap()
}

fn audit_records(proxy: &TestProxy, kind: &str) -> Vec<serde_json::Value> {
    proxy
        .audit_records()
        .into_iter()
        .filter(|r| r["kind"] == kind)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_canary_is_rolled_back_with_zero_client_errors_and_one_record() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("canary", &canary)
        .route(Route::new("chat", "stable").split(&[("stable", 95), ("canary", 5)]))
        .top("evaluator: {interval: 100ms, window: 30s, min_requests: 50}")
        .start()
        .await;
    let load = Load::start(proxy.url("/v1/chat/completions"), 8);
    assert_eventually!(canary.request_count() >= 30, Duration::from_secs(10));
    assert!(
        !quarantined(&proxy, "canary").await,
        "healthy canary rolled back"
    );
    canary.set(Reply::FailFraction(0.5));
    assert_eventually!(quarantined(&proxy, "canary").await, Duration::from_secs(15));
    let served_at_rollback = canary.request_count();
    // Keep the load on for a moment: nothing new reaches the canary.
    let before = stable.request_count();
    assert_eventually!(
        stable.request_count() > before + 200,
        Duration::from_secs(10)
    );
    let (sent, failed) = load.stop().await;
    assert_eq!(failed, 0, "{failed} of {sent} requests failed client-side");
    assert!(
        canary.request_count() <= served_at_rollback + 8,
        "canary still gets traffic"
    );

    let s = proxy.status_json().await;
    let route = &s["routes"][0];
    assert_eq!(route["state"], "rolled_back");
    assert_eq!(route["weights"]["canary"], 0);
    assert_eq!(route["weights"]["stable"], 100);
    assert_eventually!(
        audit_records(&proxy, "rollback").len() == 1,
        Duration::from_secs(10)
    );
    let rec = &audit_records(&proxy, "rollback")[0];
    assert!(rec["id"].as_str().unwrap().starts_with("rb-"));
    assert!(
        ["error_rate_max", "error_rate_ratio"].contains(&rec["trigger"].as_str().unwrap()),
        "{rec}"
    );
    assert_eq!(rec["route"], "chat");
    assert_eq!(rec["from_version"], "canary");
    assert_eq!(rec["to_version"], "stable");
    assert_eq!(rec["automatic"], true);
    assert_eq!(
        rec["generation_after"].as_u64().unwrap(),
        rec["generation_before"].as_u64().unwrap() + 1
    );
    let phases: Vec<&str> = rec["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["decide", "swap", "persist"]);
    // Drain and alerts follow in a second record that names the first.
    assert_eventually!(
        audit_records(&proxy, "rollback_completed").len() == 1,
        Duration::from_secs(10)
    );
    let done = &audit_records(&proxy, "rollback_completed")[0];
    assert_eq!(done["rollback_id"], rec["id"]);
    assert_eq!(done["phases"][0]["phase"], "drain");
    // The evidence that tripped it, with how it built up.
    assert_eq!(rec["evidence"]["rule"], rec["trigger"]);
    assert!(
        rec["evidence"]["statistic"].as_f64().unwrap()
            >= rec["evidence"]["threshold"].as_f64().unwrap(),
        "{rec}"
    );
    assert!(!rec["evidence"]["trajectory"].as_array().unwrap().is_empty());
    assert!(rec["metrics"]["candidate"]["requests"].as_u64().unwrap() >= 50);
    assert!(
        rec["reason"].as_str().unwrap().contains("confidence 0.99"),
        "{rec}"
    );
    assert_eq!(
        proxy
            .metric("rollgate_rollback_completed_total", &[("route", "chat")])
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric("rollgate_version_quarantined", &[("version", "canary")])
            .await,
        1.0
    );
    assert_eq!(
        proxy.metric("rollgate_routing_table_generation", &[]).await,
        s["generation"].as_f64().unwrap()
    );
    // Pins to the quarantined version go to the baseline (pin.quarantined: baseline).
    let r = TestClient::http1()
        .get_with(&proxy.url("/v1/x"), &[("x-rollgate-version", "canary")])
        .await;
    assert_eq!(r.version(), Some("stable"));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_regression_is_rolled_back() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    canary.set_delay(Duration::from_millis(150));
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("canary", &canary)
        .route(Route::new("chat", "stable").split(&[("stable", 50), ("canary", 50)]))
        .top("evaluator: {interval: 100ms, min_requests: 20, rules: {latency_p99_max: 100ms, latency_p99_ratio: null}}")
        .start()
        .await;
    let load = Load::start(proxy.url("/v1/chat/completions"), 8);
    assert_eventually!(quarantined(&proxy, "canary").await, Duration::from_secs(20));
    let (_, failed) = load.stop().await;
    assert_eq!(failed, 0);
    assert_eventually!(
        audit_records(&proxy, "rollback").len() == 1,
        Duration::from_secs(10)
    );
    assert_eq!(
        audit_records(&proxy, "rollback")[0]["trigger"],
        "latency_p99_max"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_checks_roll_the_version_back_without_traffic() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    canary.set(Reply::Status(503));
    let hc = "health_check: {path: /health, interval: 100ms, timeout: 500ms, unhealthy_after: 2, healthy_after: 1}";
    let proxy = TestProxy::new()
        .version_with("stable", &stable.http_url(), hc)
        .version_with("canary", &canary.http_url(), hc)
        .route(Route::new("chat", "stable").split(&[("stable", 90), ("canary", 10)]))
        .top("evaluator: {interval: 100ms, rules: {health_failures: 3}}")
        .start()
        .await;
    assert_eventually!(quarantined(&proxy, "canary").await, Duration::from_secs(10));
    assert_eventually!(
        audit_records(&proxy, "rollback").len() == 1,
        Duration::from_secs(5)
    );
    let rec = &audit_records(&proxy, "rollback")[0];
    assert_eq!(rec["trigger"], "health_failures");
    assert!(canary.requests().iter().all(|r| r.uri.path() == "/health"));
    assert_eq!(
        proxy
            .metric("rollgate_version_healthy", &[("version", "canary")])
            .await,
        0.0
    );
    assert_eq!(
        proxy
            .metric("rollgate_version_healthy", &[("version", "stable")])
            .await,
        1.0
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_canary_with_the_baselines_error_rate_is_never_rolled_back() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    stable.set(Reply::FailFraction(0.03));
    canary.set(Reply::FailFraction(0.03));
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("canary", &canary)
        .route(Route::new("chat", "stable").split(&[("stable", 80), ("canary", 20)]).with("retry: {budget_percent: 0, min_per_second: 0}"))
        .top("evaluator: {interval: 100ms, window: 5s, min_requests: 50, rules: {error_rate_max: null}}")
        .start()
        .await;
    let load = Load::start(proxy.url("/v1/chat/completions"), 4);
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        if quarantined(&proxy, "canary").await {
            assert_eventually!(
                !audit_records(&proxy, "rollback").is_empty(),
                Duration::from_secs(5)
            );
            panic!(
                "false alarm after {:?}: {:?}",
                started.elapsed(),
                audit_records(&proxy, "rollback")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (sent, failed) = load.stop().await;
    assert!(sent > 2000, "only {sent} requests in 20 s");
    assert!(failed > 0, "the upstreams were told to fail 3 %");
    assert!(canary.request_count() > 400);
    assert!(audit_records(&proxy, "rollback").is_empty());
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_survives_restart_and_reload_until_the_fingerprint_changes() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let state = tempfile::tempdir().unwrap();
    let yaml = |canary_bundle: &str| {
        format!(
            "listen: \"127.0.0.1:0\"\nadmin: {{listen: \"127.0.0.1:0\"}}\nstate_dir: \"{}\"\nevaluator: {{min_requests: 1000000}}\n\
             versions:\n  stable: {{endpoints: [\"{}\"]}}\n  canary: {{endpoints: [\"{}\"], bundle: {{prompt: {canary_bundle}}}}}\n\
             routes:\n  - {{name: chat, match: {{path_prefix: /}}, baseline: stable, split: {{stable: 50, canary: 50}}}}\n",
            state.path().display(),
            stable.http_url(),
            canary.http_url()
        )
    };
    let proxy = TestProxy::from_yaml(&yaml("p1")).await;
    let rec = manual_rollback(&proxy, "canary", "test", "tester").await;
    assert_eq!(rec["initiated_by"], "tester");
    assert_eq!(rec["automatic"], false);
    assert!(quarantined(&proxy, "canary").await);
    // Reload with the same file: still quarantined.
    let path = std::path::Path::new("/tmp/x.yaml");
    let same = rollgate::config::Config::from_str(&yaml("p1"), path).unwrap();
    proxy.running().store.update(Some(same), |_| {}).unwrap();
    assert!(quarantined(&proxy, "canary").await);
    proxy.shutdown().await;

    // Restart on the same state_dir: still quarantined, no traffic to it.
    let proxy = TestProxy::from_yaml(&yaml("p1")).await;
    assert!(quarantined(&proxy, "canary").await);
    let client = TestClient::http1();
    for _ in 0..20 {
        assert_eq!(client.get(&proxy.url("/")).await.version(), Some("stable"));
    }
    // A new bundle is a new fingerprint: the quarantine no longer applies.
    let changed = rollgate::config::Config::from_str(&yaml("p2"), path).unwrap();
    proxy.running().store.update(Some(changed), |_| {}).unwrap();
    assert!(!quarantined(&proxy, "canary").await);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_baseline_degrades_the_route_to_its_fallback() {
    let stable = TestUpstream::start("stable").await;
    let backup = TestUpstream::start("backup").await;
    let hc = "health_check: {path: /health, interval: 100ms, timeout: 500ms, unhealthy_after: 2, healthy_after: 1}";
    let proxy = TestProxy::new()
        .version_with("stable", &stable.http_url(), hc)
        .version_with("backup", &backup.http_url(), hc)
        .route(Route::new("chat", "stable").with("fallback: backup"))
        .start()
        .await;
    let client = TestClient::http1();
    let r = client.get(&proxy.url("/v1/x")).await;
    assert_eq!(
        (r.version(), r.header("x-rollgate-degraded")),
        (Some("stable"), None)
    );
    stable.set(Reply::Status(503));
    assert_eventually!(
        proxy.status_json().await["routes"][0]["state"] == "degraded",
        Duration::from_secs(10)
    );
    let r = client.get(&proxy.url("/v1/x")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.version(), Some("backup"));
    assert_eq!(r.header("x-rollgate-degraded"), Some("1"));
    assert_eventually!(
        audit_records(&proxy, "degraded").len() == 1,
        Duration::from_secs(5)
    );
    assert_eq!(
        proxy
            .metric("rollgate_route_degraded", &[("route", "chat")])
            .await,
        1.0
    );
    // The baseline recovers: the route goes back to it.
    stable.set(Reply::Json);
    assert_eventually!(
        proxy.status_json().await["routes"][0]["state"] == "steady",
        Duration::from_secs(10)
    );
    assert_eq!(
        client.get(&proxy.url("/v1/x")).await.version(),
        Some("stable")
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progressive_rollout_steps_each_clean_hold_promotes_and_stays_promoted() {
    let stable = TestUpstream::start("stable").await;
    let next = TestUpstream::start("next").await;
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("next", &next)
        .route(
            Route::new("chat", "stable")
                .split(&[("stable", 95), ("next", 5)])
                .with("rollout: {steps: [10, 50, 100], hold: 300ms}"),
        )
        .top("evaluator: {interval: 100ms, window: 30s, min_requests: 20}")
        .start()
        .await;
    let load = Load::start(proxy.url("/v1/chat/completions"), 4);
    let weights = |s: &serde_json::Value| {
        (
            s["routes"][0]["weights"]["next"].as_u64(),
            s["routes"][0]["baseline"].clone(),
        )
    };
    assert_eventually!(
        proxy.status_json().await["routes"][0]["weights"]["next"] == 10,
        Duration::from_secs(5)
    );
    assert_eq!(
        proxy.status_json().await["routes"][0]["state"],
        "rolling_out"
    );
    assert_eventually!(
        proxy.status_json().await["routes"][0]["weights"]["next"] == 50,
        Duration::from_secs(10)
    );
    assert_eventually!(
        proxy.status_json().await["routes"][0]["baseline"] == "next",
        Duration::from_secs(10)
    );
    let s = proxy.status_json().await;
    assert_eq!(weights(&s), (Some(100), serde_json::json!("next")));
    assert_eq!(s["routes"][0]["weights"]["stable"], 0);
    // The table swaps first and the record is written right after (the swap is what users
    // feel): the status can show the promote a moment before the audit log holds it.
    assert_eventually!(
        !audit_records(&proxy, "promote").is_empty(),
        Duration::from_secs(5)
    );
    assert_eq!(audit_records(&proxy, "rollout_step").len(), 2);
    let promote = audit_records(&proxy, "promote");
    assert_eq!(promote.len(), 1);
    assert_eq!(promote[0]["version"], "next");
    assert_eq!(promote[0]["from_version"], "stable");
    // The step after the promote, and many holds later: the former baseline (95 in the
    // file's split) is never rolled out again. Twenty holds of traffic, checked each tick.
    let until = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < until {
        let s = proxy.status_json().await;
        assert_eq!(weights(&s), (Some(100), serde_json::json!("next")), "{s}");
        assert_eq!(audit_records(&proxy, "rollout_step").len(), 2);
        assert_eq!(audit_records(&proxy, "promote").len(), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, failed) = load.stop().await;
    assert_eq!(failed, 0);
    for _ in 0..10 {
        assert_eq!(
            TestClient::http1().get(&proxy.url("/")).await.version(),
            Some("next")
        );
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_without_traffic_waits_for_evidence_and_is_never_promoted() {
    let stable = TestUpstream::start("stable").await;
    let next = TestUpstream::start("next").await;
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("next", &next)
        .route(
            Route::new("chat", "stable")
                .split(&[("stable", 95), ("next", 5)])
                .with("rollout: {steps: [10, 50, 100], hold: 200ms}"),
        )
        .top("evaluator: {interval: 100ms, window: 30s, min_requests: 20}")
        .start()
        .await;
    assert_eventually!(
        proxy.status_json().await["routes"][0]["weights"]["next"] == 10,
        Duration::from_secs(5)
    );
    assert_eventually!(
        proxy.status_json().await["routes"][0]["rollout"]["waiting_for"] == "traffic",
        Duration::from_secs(5)
    );
    // Fifteen holds without a request: still at the first step.
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        let s = proxy.status_json().await;
        assert_eq!(s["routes"][0]["weights"]["next"], 10, "{s}");
        assert_eq!(s["routes"][0]["baseline"], "stable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(audit_records(&proxy, "promote").is_empty());
    assert_eq!(audit_records(&proxy, "rollout_step").len(), 1);
    // Traffic arrives: the hold gets its evidence and the rollout moves on.
    let load = Load::start(proxy.url("/v1/chat/completions"), 4);
    assert_eventually!(
        proxy.status_json().await["routes"][0]["weights"]["next"] == 50,
        Duration::from_secs(10)
    );
    load.stop().await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_alerts_reach_webhooks_and_their_results_are_recorded() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let hook = TestUpstream::start("hook").await;
    let broken = format!("http://127.0.0.1:{}/hook", closed_port());
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("canary", &canary)
        .route(Route::new("chat", "stable").split(&[("stable", 90), ("canary", 10)]))
        .top(&format!(
            "alerts: {{webhooks: [{{url: \"{}/hook\", min_severity: warning}}, {{url: \"{broken}\"}}, {{url: \"{}/critical-only\", min_severity: critical}}]}}",
            hook.http_url(),
            hook.http_url()
        ))
        .start()
        .await;
    let rec = manual_rollback(&proxy, "canary", "bad prompt", "oncall").await;
    assert_eventually!(
        !audit_records(&proxy, "rollback_completed").is_empty(),
        Duration::from_secs(15)
    );
    let done = audit_records(&proxy, "rollback_completed").remove(0);
    assert_eq!(done["rollback_id"], rec["id"]);
    let sent = done["alerts_sent"].as_array().unwrap();
    assert_eq!(
        sent.len(),
        2,
        "the critical-only hook is not sent a warning: {sent:?}"
    );
    assert_eq!(sent[0]["status"], 200);
    assert_eq!(sent[1]["status"], serde_json::Value::Null);
    assert_eq!(sent[1]["attempts"], 3);
    let got = hook.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].uri.path(), "/hook");
    let body: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(body["kind"], "rollback");
    assert_eq!(body["version"], "canary");
    assert_eq!(body["reason"], "bad prompt");
    proxy.shutdown().await;
}

/// The rollback records once the one expected is written (after the drain).
async fn one_rollback_record(proxy: &TestProxy) -> Vec<serde_json::Value> {
    assert_eventually!(
        !audit_records(proxy, "rollback").is_empty(),
        Duration::from_secs(10)
    );
    let rb = audit_records(proxy, "rollback");
    assert_eq!(rb.len(), 1, "exactly one rollback record: {rb:?}");
    rb
}

/// A stable and a canary answering [`Reply::Scored`], split 50/50, with `rules` as the
/// evaluator's rules (flow style).
async fn scored_pair(rules: &str) -> (TestUpstream, TestUpstream, TestProxy) {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let scored = Reply::Scored {
        score: 0.8,
        spread: 0.2,
        flag_every: 0,
    };
    stable.set(scored.clone());
    canary.set(scored);
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("canary", &canary)
        .route(Route::new("chat", "stable").split(&[("stable", 50), ("canary", 50)]))
        .top(&format!(
            "evaluator: {{interval: 100ms, window: 30s, min_requests: 30, rules: {rules}}}"
        ))
        .start()
        .await;
    (stable, canary, proxy)
}

async fn drift_rolls_back(signal: &str) {
    let (_stable, canary, proxy) = scored_pair(&format!(
        "{{drift: {{signal: \"{signal}\", p_value: 0.01, consecutive: 3}}}}"
    ))
    .await;
    let load = Load::start(proxy.url("/v1/chat/completions"), 4);
    // Same distribution on both sides: several drift checks pass without a trip.
    assert_eventually!(canary.request_count() >= 400, Duration::from_secs(15));
    assert!(
        !quarantined(&proxy, "canary").await,
        "identical score distributions were called drift"
    );
    canary.set(Reply::Scored {
        score: 0.5,
        spread: 0.2,
        flag_every: 0,
    });
    assert_eventually!(quarantined(&proxy, "canary").await, Duration::from_secs(15));
    let (_, failed) = load.stop().await;
    assert_eq!(failed, 0);
    let rb = one_rollback_record(&proxy).await;
    assert_eq!(rb[0]["trigger"], "drift");
    let reason = rb[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains(signal) && reason.contains("Kolmogorov-Smirnov"),
        "{reason}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_in_a_response_header_signal_rolls_the_version_back() {
    drift_rolls_back("header:x-model-score").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_in_a_json_body_field_rolls_the_version_back() {
    drift_rolls_back("json:score").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guardrail_flags_beyond_the_limit_roll_the_version_back() {
    let (stable, canary, proxy) =
        scored_pair("{safety_violations: {header: x-guardrail-flagged, max: 5, per: 1h}}").await;
    let load = Load::start(proxy.url("/v1/chat/completions"), 4);
    assert_eventually!(canary.request_count() >= 100, Duration::from_secs(10));
    assert!(!quarantined(&proxy, "canary").await);
    // The baseline being flagged does not matter: the rule judges candidates.
    stable.set(Reply::Scored {
        score: 0.8,
        spread: 0.2,
        flag_every: 5,
    });
    canary.set(Reply::Scored {
        score: 0.8,
        spread: 0.2,
        flag_every: 10,
    });
    let flagged_from = canary.request_count();
    assert_eventually!(quarantined(&proxy, "canary").await, Duration::from_secs(10));
    let (_, failed) = load.stop().await;
    assert_eq!(failed, 0);
    // Six flags (more than max 5) take about 60 canary responses: no trip before them.
    assert!(
        canary.request_count() - flagged_from >= 50,
        "tripped after {} responses",
        canary.request_count() - flagged_from
    );
    let rb = one_rollback_record(&proxy).await;
    assert_eq!(rb[0]["trigger"], "safety_violations");
    assert!(
        rb[0]["reason"]
            .as_str()
            .unwrap()
            .contains("x-guardrail-flagged"),
        "{}",
        rb[0]["reason"]
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_showing_an_accuracy_drop_rolls_the_version_back() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("canary", &canary)
        .route(Route::new("chat", "stable").split(&[("stable", 50), ("canary", 50)]))
        .top("evaluator: {interval: 100ms, window: 60s, min_requests: 40, rules: {accuracy_drop: 0.05}}")
        .start()
        .await;
    let client = TestClient::http1();
    let feedback = proxy.admin_url("/api/v1/feedback");
    // Ground truth arrives after the answers: the baseline is right 95% of the time, the
    // canary 60%.
    // The baseline's rate is a plug-in estimate widened by its uncertainty, so the evidence
    // needs a few hundred items; the loop ends at the rollback.
    'sending: for i in 0..600u32 {
        for (version, wrong_every) in [("stable", 20), ("canary", 5)] {
            let r = client
                .get_with(&proxy.url("/"), &[("x-rollgate-version", version)])
                .await;
            if r.version() != Some(version) {
                // Rolled back: pins to it now go to the baseline.
                assert!(quarantined(&proxy, version).await);
                break 'sending;
            }
            let id = r.header("x-request-id").unwrap().to_string();
            let correct = i % wrong_every != 0 && (version == "stable" || i % 5 > 1);
            let fb = client
                .post_json(
                    &feedback,
                    format!(r#"{{"request_id":"{id}","correct":{correct}}}"#),
                    &[],
                )
                .await;
            assert_eq!(fb.status, 200, "{}", fb.text());
            assert_eq!(fb.json()["version"], version);
        }
    }
    assert_eventually!(quarantined(&proxy, "canary").await, Duration::from_secs(5));
    let rb = one_rollback_record(&proxy).await;
    assert_eq!(rb[0]["trigger"], "accuracy_drop", "{rb:?}");
    let reason = rb[0]["reason"].as_str().unwrap();
    assert!(reason.contains("accuracy"), "{reason}");
    assert!(!quarantined(&proxy, "stable").await);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_right_after_an_automatic_rollback_keeps_its_record_and_its_alert() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let hook = TestUpstream::start("hook").await;
    // A state_dir of the test's own, to read after the proxy is gone.
    let state = tempfile::tempdir().unwrap();
    let proxy = TestProxy::from_yaml(&format!(
        "listen: \"127.0.0.1:0\"\nadmin: {{listen: \"127.0.0.1:0\"}}\nstate_dir: \"{}\"\n\
         evaluator: {{interval: 100ms, window: 30s, min_requests: 30}}\n\
         alerts: {{webhooks: [{{url: \"{}/hook\"}}]}}\n\
         versions:\n  stable: {{endpoints: [\"{}\"]}}\n  canary: {{endpoints: [\"{}\"]}}\n\
         routes:\n  - {{name: chat, match: {{path_prefix: /}}, baseline: stable, split: {{stable: 80, canary: 20}}}}\n",
        state.path().display(),
        hook.http_url(),
        stable.http_url(),
        canary.http_url()
    ))
    .await;
    let load = Load::start(proxy.url("/v1/chat/completions"), 4);
    canary.set(Reply::FailFraction(0.5));
    assert_eventually!(quarantined(&proxy, "canary").await, Duration::from_secs(15));
    // SIGTERM's path at once: the data plane drains, then the process would exit.
    let audit = proxy.running().controller.audit.path().to_path_buf();
    let shut = tokio::spawn(proxy.shutdown());
    load.stop().await;
    shut.await.unwrap();
    let records = audit_records_in(&audit);
    assert!(!records.is_empty());
    let rb: Vec<_> = records.iter().filter(|r| r["kind"] == "rollback").collect();
    assert_eq!(rb.len(), 1, "{records:?}");
    let got = hook.requests();
    assert_eq!(got.len(), 1, "the alert went out before the exit");
    let body: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(body["id"], rb[0]["id"]);
    // Nothing recorded before the rollback carries a later id than it.
    let ids: Vec<u64> = records
        .iter()
        .map(|r| {
            r["id"]
                .as_str()
                .unwrap()
                .rsplit('-')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promote_landing_between_a_verdict_and_its_application_wins() {
    use rollgate::decision::{Action, Command, Expect, Refused};
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("canary", &canary)
        .route(Route::new("chat", "stable").split(&[("stable", 50), ("canary", 50)]))
        .top("evaluator: {min_requests: 1000000}")
        .start()
        .await;
    let c = proxy.running().controller.clone();
    // The verdict was formed against baseline `stable`...
    let verdict = Command::new(
        Action::Rollback {
            route: Some("chat".into()),
            version: "canary".into(),
            trigger: rollgate::evaluator::rules::Trigger::ErrorRateRatio,
            evidence: serde_json::Value::Null,
            expect: Some(Expect {
                baseline: "stable".into(),
                incarnation: 0,
                fingerprints: None,
            }),
        },
        None,
        Some("error rate 8% vs 2%".into()),
    );
    // ...an operator promotes the canary first...
    let promote = Command::new(
        Action::Promote {
            route: "chat".into(),
            version: "canary".into(),
            expect_step: None,
        },
        Some("oncall".into()),
        None,
    );
    c.apply(promote).await.unwrap();
    // ...so the verdict is stale, and changes nothing.
    match c.apply(verdict).await {
        Err(Refused::Stale(why)) => assert!(why.contains("baseline"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(!quarantined(&proxy, "canary").await);
    assert_eq!(proxy.status_json().await["routes"][0]["baseline"], "canary");
    assert!(audit_records(&proxy, "rollback").is_empty());
    // A pause in between refuses an automatic decision the same way.
    let pause = Command::new(
        Action::Pause {
            route: "chat".into(),
            paused: true,
        },
        Some("oncall".into()),
        None,
    );
    c.apply(pause).await.unwrap();
    let auto = Command::new(
        Action::Rollback {
            route: Some("chat".into()),
            version: "stable".into(),
            trigger: rollgate::evaluator::rules::Trigger::ErrorRateRatio,
            evidence: serde_json::Value::Null,
            expect: Some(Expect {
                baseline: "canary".into(),
                incarnation: 0,
                fingerprints: None,
            }),
        },
        None,
        None,
    );
    assert!(matches!(c.apply(auto).await, Err(Refused::Stale(_))));
    assert!(!quarantined(&proxy, "stable").await);
    proxy.shutdown().await;
}

/// A canary failing at `rate` against a clean baseline, under load for `secs` and until
/// the canary has served `min_served` requests (at most 90 s: a loaded machine serves
/// fewer per second): was it rolled back?
async fn canary_at_error_rate(rate: f64, secs: u64, min_served: usize) -> (bool, usize) {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    canary.set(Reply::FailFraction(rate));
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("canary", &canary)
        .route(Route::new("chat", "stable").split(&[("stable", 50), ("canary", 50)]))
        // Latency rules off: this is about the error floor, and sub-millisecond latencies on a
        // loaded test machine are noise a latency rule may rightly call a difference.
        .top("evaluator: {interval: 100ms, window: 30s, min_requests: 50, rules: {error_rate_max: null, latency_p99_ratio: null, latency_p99_max: null}}")
        .start()
        .await;
    let load = Load::start(proxy.url("/v1/chat/completions"), 4);
    let started = std::time::Instant::now();
    let until = started + Duration::from_secs(secs);
    let cap = started + Duration::from_secs(90);
    let mut rolled_back = false;
    while (std::time::Instant::now() < until || canary.request_count() < min_served)
        && std::time::Instant::now() < cap
        && !rolled_back
    {
        rolled_back = quarantined(&proxy, "canary").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load.stop().await;
    let served = canary.request_count();
    if rolled_back {
        eprintln!("rolled back: {:?}", audit_records(&proxy, "rollback"));
    }
    proxy.shutdown().await;
    (rolled_back, served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_below_the_effect_floor_is_never_rolled_back_and_one_above_it_is() {
    // 0.3 % errors against a baseline with none: a real difference, but below
    // min_error_rate (0.5 %): clients barely notice, and a pod restart looks like this.
    let (rolled_back, served) = canary_at_error_rate(0.003, 12, 3500).await;
    assert!(
        served > 3000,
        "not enough traffic to mean anything: {served}"
    );
    assert!(
        !rolled_back,
        "0.3 % errors rolled back ({served} canary requests)"
    );
    // 5 %: rolled back.
    let (rolled_back, served) = canary_at_error_rate(0.05, 20, 0).await;
    assert!(
        rolled_back,
        "5 % errors not rolled back after {served} requests"
    );
}
