//! `GET /api/v1/history`: what each (route, version) did, one point a second for the last 15
//! minutes, kept by the proxy, so whoever looks after an incident (the status page opened
//! late, a script) sees the seconds before they looked.

#[macro_use]
mod support;

use std::time::Duration;

use http::Method;
use serde_json::Value;
use support::*;

/// Upper bound for anything the proxy should show.
const TIMEOUT: Duration = Duration::from_secs(10);

fn series<'a>(doc: &'a Value, route: &str, version: &str) -> &'a Value {
    doc["series"]
        .as_array()
        .and_then(|s| {
            s.iter()
                .find(|x| x["route"] == route && x["version"] == version)
        })
        .unwrap_or_else(|| panic!("no series for ({route}, {version}) in {doc:#}"))
}

fn numbers(series: &Value, key: &str) -> Vec<u64> {
    series[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} is not an array: {series}"))
        .iter()
        .map(|v| v.as_u64().expect("a count"))
        .collect()
}

async fn history(proxy: &TestProxy, query: &str) -> TestResponse {
    TestClient::http1()
        .get(&proxy.admin_url(&format!("/api/v1/history{query}")))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_shows_each_second_of_past_traffic_after_it_stopped() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    // Every canary answer is the version's fault (the proxy retries them on the baseline).
    canary.set(Reply::Status(503));
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("canary", &canary)
        .route(Route::new("chat", "stable").split(&[("stable", 50), ("canary", 50)]))
        .start()
        .await;

    // Three seconds of traffic, then none.
    let client = TestClient::http1();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for _ in 0..30 {
        tick.tick().await;
        let r = client
            .send(
                request(Method::GET, &proxy.url("/v1/chat"))
                    .body(empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let (stable_n, canary_n) = (stable.request_count() as u64, canary.request_count() as u64);
    assert!(
        canary_n > 0 && stable_n > canary_n,
        "{stable_n} / {canary_n}"
    );

    // Once the seconds of that traffic are over, the history holds every request of it.
    let mut doc: Value;
    assert_eventually!(
        {
            let r = history(&proxy, "").await;
            assert_eq!(r.status, 200, "{}", r.text());
            doc = r.json();
            numbers(series(&doc, "chat", "stable"), "requests")
                .iter()
                .sum::<u64>()
                == stable_n
                && numbers(series(&doc, "chat", "canary"), "requests")
                    .iter()
                    .sum::<u64>()
                    == canary_n
        },
        TIMEOUT,
        "the history never added up to {stable_n} stable and {canary_n} canary requests: {doc:#}"
    );
    assert_eq!(doc["resolution_s"], 1);
    assert_eq!(doc["more"], false);
    let last = doc["last"].as_u64().expect("last");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        last < now,
        "last {last} is a second that is over (now {now})"
    );

    let stable_s = series(&doc, "chat", "stable");
    let canary_s = series(&doc, "chat", "canary");
    assert_eq!(stable_s["role"], "baseline");
    assert_eq!(canary_s["role"], "candidate");
    assert_eq!(numbers(stable_s, "errors").iter().sum::<u64>(), 0);
    assert_eq!(
        numbers(canary_s, "errors"),
        numbers(canary_s, "requests"),
        "every canary answer was an error"
    );
    for s in [stable_s, canary_s] {
        let requests = numbers(s, "requests");
        let p99 = s["ttfb_p99_ms"].as_array().unwrap();
        assert_eq!(requests.len(), p99.len());
        assert_eq!(
            s["start"].as_u64().unwrap() + requests.len() as u64 - 1,
            last,
            "one point a second up to `last`"
        );
        // Resolution: the three seconds of traffic are three or more points, not one.
        assert!(
            requests.iter().filter(|n| **n > 0).count() >= 3,
            "traffic over 3 s in one point a second: {s}"
        );
        for (n, p) in requests.iter().zip(p99) {
            assert_eq!(
                *n > 0,
                p.is_number(),
                "a p99 exactly where there were answers: {s}"
            );
        }
    }

    // Only the seconds after `since`.
    let r = history(&proxy, &format!("?since={}", last - 1)).await;
    let later = r.json();
    for x in later["series"].as_array().unwrap() {
        let start = x["start"].as_u64().unwrap();
        let n = x["requests"].as_array().unwrap().len() as u64;
        assert!(start >= last, "{x}");
        assert_eq!(start + n - 1, later["last"].as_u64().unwrap());
    }
    let r = history(&proxy, &format!("?since={}", now + 3600)).await;
    assert!(r.json()["series"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x["requests"].as_array().unwrap().is_empty()));

    // Filters, and errors.
    let one = history(&proxy, "?route=chat&version=canary").await.json();
    assert_eq!(one["series"].as_array().unwrap().len(), 1);
    assert_eq!(one["series"][0]["version"], "canary");
    let r = history(&proxy, "?route=nope").await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = history(&proxy, "?version=nope").await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = history(&proxy, "?since=yesterday").await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = proxy.admin_post("/api/v1/history", "{}").await;
    assert_eq!(r.status, 405, "read-only: {}", r.text());

    proxy.shutdown().await;
}
