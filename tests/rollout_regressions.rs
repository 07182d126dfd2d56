//! The rollout state machine, the file winning over overrides, upgrades, recorded faults and
//! the start-up check for a decision without its record: scenarios two hostile reviews
//! found, each failing before its fix.

#[macro_use]
mod support;

use std::time::Duration;

use support::*;

/// Rewrites the proxy's config file with `edit` applied and reloads it.
async fn edit_and_reload(proxy: &TestProxy, edit: impl Fn(&str) -> String) -> serde_json::Value {
    let path = proxy.running().reloader.path().to_path_buf();
    let text = std::fs::read_to_string(&path).unwrap();
    let new = edit(&text);
    assert_ne!(text, new, "edit changed nothing");
    std::fs::write(&path, new).unwrap();
    let r = proxy.admin_post("/api/v1/reload", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// `stable` at 95 and `next` at 5 with a rollout of `steps`, holds of 300 ms.
async fn rollout_proxy(steps: &str) -> (TestUpstream, TestUpstream, TestProxy) {
    let stable = TestUpstream::start("stable").await;
    let next = TestUpstream::start("next").await;
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("next", &next)
        .route(
            Route::new("chat", "stable")
                .split(&[("stable", 95), ("next", 5)])
                .with(&format!("rollout: {{steps: {steps}, hold: 300ms}}")),
        )
        .top("evaluator: {interval: 100ms, window: 30s, min_requests: 20}")
        .start()
        .await;
    (stable, next, proxy)
}

/// A `stable` 90 / `canary` 10 route on a state_dir of the caller's, so it outlives restarts.
fn restartable_yaml(
    state: &std::path::Path,
    stable: &TestUpstream,
    canary: &TestUpstream,
) -> String {
    format!(
        "listen: \"127.0.0.1:0\"\nadmin: {{listen: \"127.0.0.1:0\"}}\nstate_dir: \"{}\"\nevaluator: {{min_requests: 1000000}}\n\
         versions:\n  stable: {{endpoints: [\"{}\"]}}\n  canary: {{endpoints: [\"{}\"]}}\n\
         routes:\n  - {{name: chat, match: {{path_prefix: /}}, baseline: stable, split: {{stable: 90, canary: 10}}}}\n",
        state.display(),
        stable.http_url(),
        canary.http_url()
    )
}

fn of_kind(records: Vec<serde_json::Value>, kind: &str) -> Vec<serde_json::Value> {
    records.into_iter().filter(|r| r["kind"] == kind).collect()
}

/// After a completed rollout (`next` promoted), an edit of `hold` alone is a new plan, but
/// the baseline promoted at runtime still stands: no rollout of the former baseline starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tuning_hold_after_a_promote_never_rolls_the_former_baseline_out() {
    let (_s, _n, proxy) = rollout_proxy("[10, 50, 100]").await;
    let load = Load::start(proxy.url("/v1/chat/completions"), 4);
    assert_eventually!(
        proxy.status_json().await["routes"][0]["baseline"] == "next",
        Duration::from_secs(15)
    );
    edit_and_reload(&proxy, |t| t.replace("hold: 300ms", "hold: 400ms")).await;
    // Ten holds of traffic after the edit.
    assert_always!(
        proxy.audit_records().iter().all(|r| {
            !((r["kind"] == "rollout_step" || r["kind"] == "promote") && r["version"] == "stable")
        }),
        Duration::from_secs(4),
        "the former baseline was rolled out again after a hold edit: {:?}",
        proxy.audit_records()
    );
    assert_eq!(proxy.status_json().await["routes"][0]["baseline"], "next");
    load.stop().await;
    proxy.shutdown().await;
}

/// `steps: [100]` would put the candidate at 100 % and the baseline at 0 before any
/// evidence, with no comparison possible: the config refuses it.
#[test]
fn a_first_step_of_100_is_refused_by_the_config() {
    let yaml = "versions:\n  stable: {endpoints: [\"http://127.0.0.1:1\"]}\n  next: {endpoints: [\"http://127.0.0.1:2\"]}\n\
                routes:\n  - {name: chat, match: {path_prefix: /}, baseline: stable, split: {stable: 95, next: 5}, rollout: {steps: [100], hold: 1m}}\n";
    let err = rollgate::config::Config::from_str(yaml, std::path::Path::new("t.yaml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("routes[0].rollout.steps") && err.contains("first below 100"),
        "{err}"
    );
}

/// Rolled back at the 50 % step, then resumed while the route is paused: the resumed
/// version (a fresh incarnation, no evidence) gets the file's split, not the old step's 50 %.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_a_rollback_mid_rollout_starts_from_the_files_split() {
    let (_s, _n, proxy) = rollout_proxy("[10, 50, 90]").await;
    let load = Load::start(proxy.url("/v1/chat/completions"), 4);
    assert_eventually!(
        proxy.status_json().await["routes"][0]["weights"]["next"] == 50,
        Duration::from_secs(15)
    );
    for (path, body) in [
        ("/api/v1/pause", r#"{"route": "chat", "paused": true}"#),
        (
            "/api/v1/rollback",
            r#"{"route": "chat", "version": "next", "reason": "bad"}"#,
        ),
        ("/api/v1/resume", r#"{"version": "next"}"#),
    ] {
        let r = proxy.admin_post(path, body).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    assert_always!(
        proxy.status_json().await["routes"][0]["weights"]["next"]
            .as_u64()
            .is_some_and(|w| w <= 10),
        Duration::from_secs(1),
        "the resumed version is back at its old step's weight: {}",
        proxy.status_json().await
    );
    load.stop().await;
    proxy.shutdown().await;
}

/// A state.json from before overrides remembered their basis and completed plans, written
/// after a completed rollout (`next` promoted): after the upgrade the promote stands and no
/// rollout of the former baseline starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_with_an_old_state_file_keeps_the_promote() {
    let stable = TestUpstream::start("stable").await;
    let next = TestUpstream::start("next").await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(
        state.join("state.json"),
        r#"{"quarantined": {}, "weight_overrides": {"chat": {"stable": 0, "next": 100}},
            "paused": [], "baselines": {"chat": "next"}, "rollouts": {}}"#,
    )
    .unwrap();
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nadmin: {{listen: \"127.0.0.1:0\"}}\nstate_dir: \"{}\"\n\
         evaluator: {{interval: 100ms, window: 30s, min_requests: 20}}\n\
         versions:\n  stable: {{endpoints: [\"{}\"]}}\n  next: {{endpoints: [\"{}\"]}}\n\
         routes:\n  - name: chat\n    match: {{path_prefix: /}}\n    baseline: stable\n    split: {{stable: 95, next: 5}}\n    rollout: {{steps: [10, 50, 100], hold: 300ms}}\n",
        state.display(),
        stable.http_url(),
        next.http_url(),
    );
    let proxy = TestProxy::from_yaml(&yaml).await;
    // Ten evaluator ticks: a rollout would take its first step on the first.
    assert_always!(
        of_kind(proxy.audit_records(), "rollout_step").is_empty(),
        Duration::from_secs(1),
        "a rollout started after the upgrade: {:?}",
        proxy.audit_records()
    );
    assert_eq!(proxy.status_json().await["routes"][0]["baseline"], "next");
    proxy.shutdown().await;
}

/// Fault injection (a version failing up to 100 % for up to an hour, the baseline
/// included) is a command like any other: it answers with, and leaves, its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_injection_leaves_an_audit_record() {
    let (_s, _n, proxy) = rollout_proxy("[10, 50, 100]").await;
    let r = proxy
        .admin_post(
            "/api/v1/faults",
            r#"{"version": "stable", "error_rate": 1.0, "duration": "1h"}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.json();
    assert_eq!(answer["kind"], "fault", "{answer}");
    let faults = of_kind(proxy.audit_records(), "fault");
    assert_eq!(faults.len(), 1, "{faults:?}");
    assert_eq!(
        faults[0], answer,
        "the record answered is the record logged"
    );
    assert_eq!(faults[0]["version"], "stable");
    proxy.shutdown().await;
}

/// A new bundle under the same version name near the end of a hold (a new prompt: a new
/// fingerprint) needs evidence of its own: the old bundle's requests do not promote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_bundle_mid_hold_needs_its_own_evidence() {
    let stable = TestUpstream::start("stable").await;
    let next = TestUpstream::start("next").await;
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version_with("next", &next.http_url(), "set_headers: {x-prompt: p1}")
        .route(
            Route::new("chat", "stable")
                .split(&[("stable", 95), ("next", 5)])
                .with("rollout: {steps: [10, 50, 100], hold: 3s}"),
        )
        .top("evaluator: {interval: 100ms, window: 30s, min_requests: 20}")
        .start()
        .await;
    let load = Load::start(proxy.url("/v1/chat/completions"), 4);
    assert_eventually!(
        proxy.status_json().await["routes"][0]["weights"]["next"] == 50,
        Duration::from_secs(15)
    );
    // The 50 % hold has its evidence; its time is not up yet.
    assert_eventually!(
        {
            let ro = &proxy.status_json().await["routes"][0]["rollout"];
            ro["requests"].as_u64() >= ro["needed"].as_u64()
                && ro["baseline_requests"].as_u64() >= ro["needed"].as_u64()
        },
        Duration::from_secs(3)
    );
    load.stop().await;
    let rec = edit_and_reload(&proxy, |t| t.replace("x-prompt: p1", "x-prompt: p2")).await;
    assert!(rec.get("overrides_dropped").is_none(), "{rec}");
    // Past the end of the hold, without a request to the new bundle: no promote.
    assert_always!(
        of_kind(proxy.audit_records(), "promote").is_empty(),
        Duration::from_secs(4),
        "the new bundle was promoted without serving a request: {}",
        proxy.status_json().await
    );
    proxy.shutdown().await;
}

/// On a route whose baseline answers fewer than `min_requests` per `window`, the latency
/// rule judges on the baseline's p99 over all it answered, so holds get their evidence
/// and the rollout completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_traffic_rollout_completes() {
    let stable = TestUpstream::start("stable").await;
    let next = TestUpstream::start("next").await;
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("next", &next)
        .route(
            Route::new("chat", "stable")
                .split(&[("stable", 95), ("next", 5)])
                .with("rollout: {steps: [50], hold: 300ms}"),
        )
        .top("evaluator: {interval: 100ms, window: 4s, min_requests: 20}")
        .start()
        .await;
    // ~3 req/s: the baseline gets ~1.5 req/s at the 50 % step, ~6 per 4 s window.
    let load = Load::paced(
        proxy.url("/v1/chat/completions"),
        Duration::from_millis(330),
    );
    assert_eventually!(
        proxy.status_json().await["routes"][0]["baseline"] == "next",
        Duration::from_secs(60)
    );
    load.stop().await;
    proxy.shutdown().await;
}

/// A crash between persisting a decision and writing its record leaves the state on disk
/// without evidence; the next start says so in a `recovered` record, and only then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_persisted_without_its_record_is_recorded_as_recovered_on_start() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let state = tempfile::tempdir().unwrap();
    let yaml = restartable_yaml(state.path(), &stable, &canary);
    // A decision made and recorded: the next start finds its record and adds nothing.
    let proxy = TestProxy::from_yaml(&yaml).await;
    let r = proxy
        .admin_post("/api/v1/pause", r#"{"route": "chat", "paused": true}"#)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    proxy.shutdown().await;
    let proxy = TestProxy::from_yaml(&yaml).await;
    assert!(of_kind(proxy.audit_records(), "recovered").is_empty());
    proxy.shutdown().await;
    // The process died after persisting the next one: its record never made it.
    let path = state.path().join("state.json");
    let mut s: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    s["last_command"] = serde_json::json!({"id": "cmd-00000000deadbeef", "kind": "rollback",
                                           "subject": {"route": "chat", "version": "canary"}});
    std::fs::write(&path, serde_json::to_vec(&s).unwrap()).unwrap();
    let proxy = TestProxy::from_yaml(&yaml).await;
    let recovered = of_kind(proxy.audit_records(), "recovered");
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    assert_eq!(recovered[0]["command_id"], "cmd-00000000deadbeef");
    assert_eq!(recovered[0]["command_kind"], "rollback");
    proxy.shutdown().await;
}

/// An audit log archived while rollgate was stopped (logrotate `dateext`) restarts the id
/// sequence below the sequence persisted with the last command: that is no evidence of a
/// missing record, and no start writes a `recovered` record for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archiving_the_audit_log_does_not_make_every_start_recover() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let state = tempfile::tempdir().unwrap();
    let yaml = restartable_yaml(state.path(), &stable, &canary);
    let proxy = TestProxy::from_yaml(&yaml).await;
    // A few records first, so the decision's sequence is well above 0.
    for _ in 0..3 {
        let r = proxy.admin_post("/api/v1/reload", "").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = proxy
        .admin_post("/api/v1/pause", r#"{"route": "chat", "paused": true}"#)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    proxy.shutdown().await;
    std::fs::rename(
        state.path().join("audit.jsonl"),
        state.path().join("audit.jsonl-20261201"),
    )
    .unwrap();
    for _ in 0..3 {
        let proxy = TestProxy::from_yaml(&yaml).await;
        proxy.shutdown().await;
    }
    let recovered = of_kind(
        audit_records_in(&state.path().join("audit.jsonl")),
        "recovered",
    );
    assert!(
        recovered.is_empty(),
        "spurious `recovered` records: {recovered:?}"
    );
}
