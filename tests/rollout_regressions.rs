//! Rollout state machine, file-wins, upgrades and the audit of faults: the scenarios a
//! hostile review found (each failed before its fix).

#[macro_use]
mod support;

use std::time::Duration;

use support::*;

fn audit(proxy: &TestProxy) -> Vec<serde_json::Value> {
    let path = proxy.running().controller.audit.path().to_path_buf();
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn post(proxy: &TestProxy, path: &str, body: &str) -> TestResponse {
    TestClient::http1()
        .send(
            request(http::Method::POST, &proxy.admin_url(path))
                .header("content-type", "application/json")
                .body(full(body.to_string()))
                .unwrap(),
        )
        .await
}

async fn edit_and_reload(proxy: &TestProxy, edit: impl Fn(&str) -> String) -> serde_json::Value {
    let path = proxy.running().reloader.path().to_path_buf();
    let text = std::fs::read_to_string(&path).unwrap();
    let new = edit(&text);
    assert_ne!(text, new, "edit changed nothing");
    std::fs::write(&path, new).unwrap();
    let r = post(proxy, "/api/v1/reload", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

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

/// After a completed rollout (next promoted), the operator only tunes `hold` (300ms ->
/// 400ms). Split and baseline are unchanged, so the promoted baseline holds, but the plan
/// hash changed: a "new rollout" starts whose candidate is the first file-split version
/// other than the (promoted) baseline: the *former* baseline. Production is walked back
/// to the old version by automation: the ping-pong of issue 14 item 1, one edit later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tuning_hold_after_a_promote_never_rolls_the_former_baseline_out() {
    let (_s, _n, proxy) = rollout_proxy("[10, 50, 100]").await;
    let load = Load::start(proxy.url("/v1/chat/completions"), 4);
    assert_eventually!(
        proxy.status_json().await["routes"][0]["baseline"] == "next",
        Duration::from_secs(15)
    );
    edit_and_reload(&proxy, |t| t.replace("hold: 300ms", "hold: 400ms")).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let s = proxy.status_json().await;
    load.stop().await;
    let stable_steps: Vec<_> = audit(&proxy)
        .into_iter()
        .filter(|r| {
            (r["kind"] == "rollout_step" || r["kind"] == "promote") && r["version"] == "stable"
        })
        .collect();
    assert!(
        stable_steps.is_empty(),
        "the former baseline was rolled out again after a hold edit: {stable_steps:?}\nstatus: {s}"
    );
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
/// version (fresh incarnation, no evidence at all) serves 50 % again, because the rollback
/// dropped the rollout progress but kept the step's weight override. Unpaused, it is
/// silently set back to the first step on the next tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_a_rollback_mid_rollout_starts_from_the_files_split() {
    let (_s, _n, proxy) = rollout_proxy("[10, 50, 90]").await;
    let load = Load::start(proxy.url("/v1/chat/completions"), 4);
    assert_eventually!(
        proxy.status_json().await["routes"][0]["weights"]["next"] == 50,
        Duration::from_secs(15)
    );
    let r = post(
        &proxy,
        "/api/v1/pause",
        r#"{"route": "chat", "paused": true}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post(
        &proxy,
        "/api/v1/rollback",
        r#"{"route": "chat", "version": "next", "reason": "bad"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post(&proxy, "/api/v1/resume", r#"{"version": "next"}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = proxy.status_json().await;
    load.stop().await;
    let w = s["routes"][0]["weights"]["next"].as_u64().unwrap();
    assert!(
        w <= 10,
        "resumed version back at {w} % with no evidence: {s}"
    );
    proxy.shutdown().await;
}

/// A state.json written before `basis`/`rollouts_done` existed, by a version that had
/// completed a rollout (next promoted). After the upgrade, `prune` adopts the current file
/// as the basis (good) but nothing marks the plan as done: the evaluator starts a rollout
/// of `stable`, the former baseline.
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
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = proxy.status_json().await;
    let steps: Vec<_> = audit(&proxy)
        .into_iter()
        .filter(|r| r["kind"] == "rollout_step")
        .collect();
    eprintln!(
        "UPGRADE runtime: {:?}",
        proxy.running().store.runtime_state()
    );
    eprintln!(
        "UPGRADE plan: {:?}",
        rollgate::decision::rollout_plan(&proxy.running().store.config().routes[0])
    );
    assert!(
        steps.is_empty(),
        "after the upgrade: {steps:?}\nstatus: {s}"
    );
    proxy.shutdown().await;
}

/// Fault injection (make a version fail up to 100 % for up to an hour, the baseline
/// included) is a change of runtime state (issue 14: "drill fault" is a typed command,
/// recorded), yet it writes no audit record and its answer is not a record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_injection_leaves_an_audit_record() {
    let (_s, _n, proxy) = rollout_proxy("[10, 50, 100]").await;
    let before = audit(&proxy).len();
    let r = post(
        &proxy,
        "/api/v1/faults",
        r#"{"version": "stable", "error_rate": 1.0, "duration": "1h"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let after: Vec<_> = audit(&proxy).into_iter().skip(before).collect();
    let body = r.json();
    assert!(
        after
            .iter()
            .any(|r| r["version"] == "stable" && r["kind"] != "rollout_step"),
        "no audit record of the fault; answer: {body}; new records: {after:?}"
    );
    proxy.shutdown().await;
}

/// The hold's evidence is keyed by (route, version, step), not by the candidate's
/// fingerprint. Near the end of the 50 % hold, the operator ships a new bundle under the
/// same version name (a different prompt: new fingerprint, fresh detectors). Traffic
/// stops. The hold counters still hold the *old* bundle's requests, so the new bundle is
/// promoted to baseline at 100 % having answered no request at all.
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
    tokio::time::sleep(Duration::from_millis(2000)).await;
    load.stop().await;
    let rec = edit_and_reload(&proxy, |t| t.replace("x-prompt: p1", "x-prompt: p2")).await;
    assert!(rec.get("overrides_dropped").is_none(), "{rec}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = proxy.status_json().await;
    let promotes: Vec<_> = audit(&proxy)
        .into_iter()
        .filter(|r| r["kind"] == "promote")
        .collect();
    assert!(
        promotes.is_empty(),
        "new bundle promoted without serving a request: {promotes:?}\nstatus: {s}"
    );
    proxy.shutdown().await;
}

/// A crash between persisting a decision and writing its record leaves the state on disk
/// without evidence; the next start says so in a `recovered` record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_persisted_without_its_record_is_recorded_as_recovered_on_start() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let state = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nadmin: {{listen: \"127.0.0.1:0\"}}\nstate_dir: \"{}\"\nevaluator: {{min_requests: 1000000}}\n\
         versions:\n  stable: {{endpoints: [\"{}\"]}}\n  canary: {{endpoints: [\"{}\"]}}\n\
         routes:\n  - {{name: chat, match: {{path_prefix: /}}, baseline: stable, split: {{stable: 90, canary: 10}}}}\n",
        state.path().display(),
        stable.http_url(),
        canary.http_url()
    );
    // A decision made and recorded: the next start finds its record and adds nothing.
    let proxy = TestProxy::from_yaml(&yaml).await;
    let r = post(
        &proxy,
        "/api/v1/pause",
        r#"{"route": "chat", "paused": true}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    proxy.shutdown().await;
    let proxy = TestProxy::from_yaml(&yaml).await;
    assert!(audit(&proxy).iter().all(|r| r["kind"] != "recovered"));
    proxy.shutdown().await;
    // The process died after persisting the next one: its record never made it.
    let path = state.path().join("state.json");
    let mut s: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    s["last_command"] = serde_json::json!({"id": "cmd-00000000deadbeef", "kind": "rollback",
                                           "subject": {"route": "chat", "version": "canary"}});
    std::fs::write(&path, serde_json::to_vec(&s).unwrap()).unwrap();
    let proxy = TestProxy::from_yaml(&yaml).await;
    let recovered: Vec<_> = audit(&proxy)
        .into_iter()
        .filter(|r| r["kind"] == "recovered")
        .collect();
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    assert_eq!(recovered[0]["command_id"], "cmd-00000000deadbeef");
    assert_eq!(recovered[0]["command_kind"], "rollback");
    proxy.shutdown().await;
}
