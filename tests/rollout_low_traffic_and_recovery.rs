//! Rollouts on a quiet route, and the start-up check for a decision without its record,
//! after an archived audit log: scenarios a second hostile review found.

#[macro_use]
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;

fn audit_at(state: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(state.join("audit.jsonl"))
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

/// The operator archives the audit log (logrotate `dateext`, or moving it to long-term
/// storage while stopped): the id sequence restarts at 1, below the persisted
/// `last_command.after_seq`. `reconcile` then reads "records after after_seq" = none, and
/// writes a `recovered` record (and logs an ERROR "no audit record") on *every* start,
/// about a decision whose record exists in the archive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archiving_the_audit_log_does_not_make_every_start_recover() {
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
    let proxy = TestProxy::from_yaml(&yaml).await;
    // A few records first, so the decision's after_seq is well above 0.
    for _ in 0..3 {
        let r = post(&proxy, "/api/v1/reload", "").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = post(
        &proxy,
        "/api/v1/pause",
        r#"{"route": "chat", "paused": true}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    proxy.shutdown().await;
    // Archived while stopped.
    std::fs::rename(
        state.path().join("audit.jsonl"),
        state.path().join("audit.jsonl-20261201"),
    )
    .unwrap();
    for _ in 0..3 {
        let proxy = TestProxy::from_yaml(&yaml).await;
        proxy.shutdown().await;
    }
    let recovered: Vec<_> = audit_at(state.path())
        .into_iter()
        .filter(|r| r["kind"] == "recovered")
        .collect();
    assert!(
        recovered.is_empty(),
        "{} spurious `recovered` records for a decision whose record exists: {recovered:?}",
        recovered.len()
    );
}

/// Fix (8): a hold now needs `latency_judged >= min_requests`, and a tick counts as judged
/// only when the baseline's *sliding window* (not the hold) holds `min_requests`. On a
/// route whose baseline gets fewer than `min_requests` per `window` (with the defaults:
/// under 1.7 req/s) the rollout never advances, however long it holds, while status shows
/// requests and baseline_requests above `needed`, `waiting_for: traffic`, and
/// `not_evaluated` does not name latency_p99_ratio: nothing tells the operator why.
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
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, url) = (stop.clone(), proxy.url("/v1/chat/completions"));
        tokio::spawn(async move {
            let client = TestClient::http1();
            while !stop.load(Ordering::Relaxed) {
                let _ = client
                    .try_send(
                        request(http::Method::POST, &url)
                            .body(full(r#"{"model":"m"}"#))
                            .unwrap(),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(330)).await;
            }
        })
    };
    // The latency rule judges on the baseline's p99 over all it answered when its window
    // is too thin, so the hold gets its evidence and the rollout completes.
    assert_eventually!(
        proxy.status_json().await["routes"][0]["baseline"] == "next",
        Duration::from_secs(60)
    );
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    proxy.shutdown().await;
}
