//! The admin API against a browser and against stale runtime state: what a page in the
//! operator's browser can do (nothing), and how the config file wins over runtime
//! overrides (SPEC §5, §6).

#[macro_use]
mod support;

use std::time::Duration;

use support::*;

async fn pair() -> (TestUpstream, TestUpstream, TestProxy) {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("canary", &canary)
        .route(Route::new("chat", "stable").split(&[("stable", 90), ("canary", 10)]))
        .top("evaluator: {min_requests: 1000000}")
        .start()
        .await;
    (stable, canary, proxy)
}

async fn post(proxy: &TestProxy, path: &str, headers: &[(&str, &str)], body: &str) -> TestResponse {
    let mut b = request(http::Method::POST, &proxy.admin_url(path));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    TestClient::http1()
        .send(b.body(full(body.to_string())).unwrap())
        .await
}

fn events(proxy: &TestProxy) -> usize {
    proxy.audit_records().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_cannot_drive_or_read_the_admin_api() {
    let (_s, _c, proxy) = pair().await;
    let before = proxy.status_json().await;
    let records = events(&proxy);
    let fault = r#"{"version": "stable", "error_rate": 1.0, "duration": "1h"}"#;
    // `fetch(..., {mode: 'no-cors', body})` sends text/plain: refused before parsing.
    let r = post(
        &proxy,
        "/api/v1/faults",
        &[("content-type", "text/plain")],
        fault,
    )
    .await;
    assert_eq!(r.status, 415, "{}", r.text());
    let r = post(&proxy, "/api/v1/faults", &[], fault).await;
    assert_eq!(r.status, 415, "{}", r.text());
    // A cross-origin page, even with the right content type (it would need a preflight).
    let json = ("content-type", "application/json");
    let r = post(
        &proxy,
        "/api/v1/faults",
        &[json, ("origin", "http://evil.example")],
        fault,
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = post(
        &proxy,
        "/api/v1/weights",
        &[json, ("sec-fetch-site", "cross-site")],
        r#"{"route": "chat", "weights": {"canary": 100}}"#,
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    // DNS rebinding: the attacker's name resolving to this listener, reads included.
    let r = TestClient::http1()
        .get_with(
            &proxy.admin_url("/api/v1/config"),
            &[("host", "evil.example:9901")],
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    // Nothing changed: the baseline still answers, no record was written.
    let c = TestClient::http1();
    for _ in 0..20 {
        let r = c.get(&proxy.url("/v1/x")).await;
        assert_eq!(r.status, 200);
    }
    let after = proxy.status_json().await;
    assert_eq!(after["generation"], before["generation"]);
    assert_eq!(
        after["routes"][0]["weights"],
        before["routes"][0]["weights"]
    );
    assert_eq!(events(&proxy), records);
    // The listener's own origin, localhost and IP hosts work.
    let own = format!("http://{}", proxy.admin_addr());
    let r = post(
        &proxy,
        "/api/v1/pause",
        &[json, ("origin", &own)],
        r#"{"route": "chat", "paused": true}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let port = proxy.admin_addr().port().to_string();
    let r = TestClient::http1()
        .get_with(
            &proxy.admin_url("/api/v1/status"),
            &[("host", &format!("localhost:{port}"))],
        )
        .await;
    assert_eq!(r.status, 200);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_hosts_names_the_extra_hosts_it_answers_to() {
    let stable = TestUpstream::start("stable").await;
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .route(Route::new("chat", "stable"))
        .top("admin: {listen: \"127.0.0.1:0\", hosts: [rollgate-admin.ml]}")
        .start()
        .await;
    let get = |host: &'static str| {
        let url = proxy.admin_url("/api/v1/status");
        async move {
            TestClient::http1()
                .get_with(&url, &[("host", host)])
                .await
                .status
        }
    };
    assert_eq!(get("rollgate-admin.ml").await, 200);
    assert_eq!(get("ROLLGATE-ADMIN.ML:9901").await, 200);
    assert_eq!(get("rollgate-admin.ml.evil.example").await, 403);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_result_cannot_forge_a_record() {
    let (_s, _c, proxy) = pair().await;
    let json = ("content-type", "application/json");
    for forged in [
        r#"{"route": "chat", "version": "canary", "passed": true, "id": "rb-999999"}"#,
        r#"{"route": "chat", "version": "canary", "kind": "rollback"}"#,
        r#"{"route": "chat", "version": "canary", "timestamp": "2020-01-01T00:00:00Z"}"#,
    ] {
        let r = post(&proxy, "/api/v1/drills", &[json], forged).await;
        assert_eq!(r.status, 400, "{forged}: {}", r.text());
    }
    let r = post(
        &proxy,
        "/api/v1/drills",
        &[json],
        r#"{"route": "chat", "version": "canary", "passed": true, "score": 100}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = r.json();
    assert_eq!(rec["kind"], "drill");
    assert!(rec["id"].as_str().unwrap().starts_with("dr-"));
    proxy.shutdown().await;
}

/// Rewrites the proxy's config file with `edit` applied and reloads it.
async fn edit_and_reload(proxy: &TestProxy, edit: impl Fn(&str) -> String) -> serde_json::Value {
    let path = proxy.running().reloader.path().to_path_buf();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, edit(&text)).unwrap();
    let r = post(
        proxy,
        "/api/v1/reload",
        &[("content-type", "application/json")],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_wins_over_a_runtime_override_once_it_changes_what_was_overridden() {
    let (_s, _c, proxy) = pair().await;
    let json = ("content-type", "application/json");
    let r = post(
        &proxy,
        "/api/v1/weights",
        &[json],
        r#"{"route": "chat", "weights": {"stable": 50, "canary": 50}}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        proxy.status_json().await["routes"][0]["weights"]["canary"],
        50
    );
    // A reload that leaves the route's split alone keeps the override.
    let rec = edit_and_reload(&proxy, |t| format!("{t}\n# touched\n")).await;
    assert!(rec.get("overrides_dropped").is_none(), "{rec}");
    assert_eq!(
        proxy.status_json().await["routes"][0]["weights"]["canary"],
        50
    );
    // A Git revert of the split: the file wins, and the record says what was dropped.
    let rec = edit_and_reload(&proxy, |t| {
        t.replace("stable: 90, canary: 10", "stable: 80, canary: 20")
    })
    .await;
    let dropped = rec["overrides_dropped"].as_array().unwrap();
    assert!(
        dropped
            .iter()
            .any(|d| d.as_str().unwrap().contains("weights of route chat")),
        "{rec}"
    );
    let s = proxy.status_json().await;
    assert_eq!(s["routes"][0]["weights"]["canary"], 20, "{s}");
    assert_eq!(s["routes"][0]["weights"]["stable"], 80, "{s}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_reset_goes_back_to_the_file_and_a_promoted_baseline_too() {
    let (_s, _c, proxy) = pair().await;
    let json = ("content-type", "application/json");
    let r = post(
        &proxy,
        "/api/v1/promote",
        &[json],
        r#"{"route": "chat", "version": "canary"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(proxy.status_json().await["routes"][0]["baseline"], "canary");
    let r = post(
        &proxy,
        "/api/v1/weights",
        &[json],
        r#"{"route": "chat", "reset": true}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["reset"], true);
    let s = proxy.status_json().await;
    assert_eq!(s["routes"][0]["baseline"], "stable");
    assert_eq!(s["routes"][0]["weights"]["canary"], 10);
    // Both at once is a mistake, not a guess.
    let r = post(
        &proxy,
        "/api/v1/weights",
        &[json],
        r#"{"route": "chat", "reset": true, "weights": {"stable": 1}}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eventually!(
        proxy.status_json().await["routes"][0]["weights"]["canary"] == 10,
        Duration::from_secs(1)
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_rollback_without_a_route_finds_the_route_where_the_version_is_a_candidate() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let proxy = TestProxy::new()
        .version("a", &a)
        .version("b", &b)
        // `b` is the baseline of the first route and a candidate on the second.
        .route(
            Route::new("first", "b")
                .matching("{path_prefix: /one}")
                .split(&[("b", 100)]),
        )
        .route(Route::new("second", "a").split(&[("a", 90), ("b", 10)]))
        .top("evaluator: {min_requests: 1000000}")
        .start()
        .await;
    let r = post(
        &proxy,
        "/api/v1/rollback",
        &[("content-type", "application/json")],
        r#"{"version": "b", "reason": "bad prompt"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["route"], "second");
    proxy.shutdown().await;
}
