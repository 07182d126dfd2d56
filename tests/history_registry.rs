//! Statistics of versions that left the config are freed: cycling through release names
//! (a new version name every deploy) through reloads does not grow the telemetry registry,
//! their series leave `/metrics`, and a name that comes back starts from zero.

#[macro_use]
mod support;

use std::path::Path;
use std::time::Duration;

use http::Method;
use rollgate::config::Config;
use rollgate::telemetry::Registered;
use serde_json::Value;
use support::*;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `n` requests pinned to `version` (all must be answered by it).
async fn pinned(proxy: &TestProxy, version: &str, n: usize) {
    let client = TestClient::http1();
    for _ in 0..n {
        let r = client
            .send(
                request(Method::GET, &proxy.url("/v1/chat"))
                    .header("x-rollgate-version", version)
                    .body(empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.version(), Some(version));
    }
}

fn window_requests(status: &Value, version: &str) -> Option<u64> {
    status["versions"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == version)?["window"]["requests"]
        .as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_release_names_cycled_through_reloads_do_not_grow_the_registry() {
    let stable = TestUpstream::start("stable").await;
    let release = TestUpstream::start("release").await;
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("rel-0", &release)
        .route(Route::new("chat", "stable").split(&[("stable", 90), ("rel-0", 10)]))
        .start()
        .await;
    let template = proxy.yaml().replace("rel-0", "{REL}");
    let store = proxy.running().store.clone();
    let telemetry = store.telemetry.clone();
    // One pair, version and retry counter each for stable and the release of the day.
    let steady = Registered {
        pairs: 2,
        versions: 2,
        retries: 2,
    };
    assert_eq!(telemetry.registered(), steady);
    pinned(&proxy, "rel-0", 20).await;
    assert_eventually!(
        window_requests(&proxy.status_json().await, "rel-0") == Some(20),
        TIMEOUT
    );

    let reload = |name: String| {
        let yaml = template.replace("{REL}", &name);
        let config = Config::from_str(&yaml, Path::new("rollgate.yaml"))
            .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        // The store frees what the new table no longer has (Telemetry::retain).
        store.update(Some(config), |_| {}).expect("reload");
    };
    for i in 1..=1000 {
        reload(format!("rel-{i}"));
        assert_eq!(telemetry.registered(), steady, "after release {i}");
        if i % 250 == 0 {
            pinned(&proxy, &format!("rel-{i}"), 3).await;
        }
    }

    // Their series leave /metrics (request series at once, the evaluator's gauges at its
    // next tick); today's release and the baseline are there.
    let mut stale: Vec<String>;
    assert_eventually!(
        {
            let metrics = proxy.metrics_text().await;
            stale = metrics
                .lines()
                .filter(|l| l.contains("version=\"rel-") && !l.contains("version=\"rel-1000\""))
                .map(str::to_string)
                .collect();
            stale.is_empty()
                && metrics.contains("rollgate_requests_total{route=\"chat\",version=\"rel-1000\"")
                && metrics.contains("version=\"stable\"")
        },
        TIMEOUT,
        "series of releases that left the config: {stale:#?}"
    );
    // The evaluator judges today's release only.
    assert_eventually!(
        {
            let s = proxy.status_json().await;
            let judged: Vec<&Value> = s["evidence"].as_array().unwrap().iter().collect();
            judged.len() == 1 && judged[0]["version"] == "rel-1000"
        },
        TIMEOUT
    );

    // A name that comes back starts from zero: rel-0 answered 20 requests before it left.
    reload("rel-0".into());
    assert_eq!(telemetry.registered(), steady);
    let s = proxy.status_json().await;
    assert_eq!(window_requests(&s, "rel-0"), Some(0), "{s:#}");
    let h = TestClient::http1()
        .get(&proxy.admin_url("/api/v1/history?version=rel-0"))
        .await
        .json();
    let requests: u64 = h["series"][0]["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(requests, 0, "{h:#}");
    assert_eq!(
        proxy
            .metric("rollgate_requests_total", &[("version", "rel-0")])
            .await,
        0.0
    );
    pinned(&proxy, "rel-0", 2).await;
    assert_eventually!(
        window_requests(&proxy.status_json().await, "rel-0") == Some(2),
        TIMEOUT
    );

    proxy.shutdown().await;
}
