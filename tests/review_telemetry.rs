//! Regressions from a hostile review of the window type (`Ring`), the 15-minute history,
//! `Telemetry::retain` and the data-plane review fixes.
//!
//! Each `defect_*` test failed on the reviewed tree and guards its fix (a version that
//! hangs mid-stream while its client keeps sending is the version's timeout; a health flap
//! keeps the fallback's statistics and the retry counters); each `guard_*` test checks a
//! property that held already (detection as fast after a day of healthy traffic or hours
//! idle, windows and history after days and idle gaps, the history API's bad parameters).

#[macro_use]
mod support;

use std::time::Duration;

use http::Method;
use rollgate::evaluator::detector::log_threshold;
use rollgate::evaluator::rules::{decide, Verdict};
use rollgate::evaluator::{Comparison, Tick};
use rollgate::telemetry::{Class, Telemetry};
use support::sim::{binomial, evaluator_config};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMEOUT: Duration = Duration::from_secs(10);

async fn requests_of(proxy: &TestProxy, version: &str) -> f64 {
    proxy
        .metric("rollgate_requests_total", &[("version", version)])
        .await
}

async fn retries(proxy: &TestProxy, from: &str, to: &str) -> f64 {
    proxy
        .metric(
            "rollgate_retries_total",
            &[("from_version", from), ("to_version", to)],
        )
        .await
}

async fn route_state(proxy: &TestProxy) -> String {
    proxy.status_json().await["routes"][0]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A route's `fallback` is in the config for the route's whole life, but it is a member of
/// the table only while the route is degraded, so `Telemetry::retain` frees its statistics
/// every time the baseline recovers; likewise the retry counters (route, v, baseline) are
/// freed while degraded (members then hold (route, v, fallback)) and vice versa. Each health
/// flap resets `rollgate_requests_total{version=fallback}` and
/// `rollgate_retries_total{to_version=...}` to zero: counters of pairs that stay in the
/// config are not monotonic, and the fallback's history of the incident disappears the
/// moment the incident ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defect_health_flap_frees_fallback_stats_and_retry_counters() {
    let stable = TestUpstream::start("stable").await;
    let backup = TestUpstream::start("backup").await;
    let dead = format!("http://127.0.0.1:{}", closed_port());
    let hc = "health_check: {path: /health, interval: 100ms, timeout: 500ms, unhealthy_after: 2, healthy_after: 1}";
    let proxy = TestProxy::new()
        .version_with("stable", &stable.http_url(), hc)
        .version_with("canary", &dead, "")
        .version_with("backup", &backup.http_url(), hc)
        .route(
            Route::new("chat", "stable")
                .split(&[("stable", 100), ("canary", 0)])
                .with("fallback: backup"),
        )
        .start()
        .await;
    let client = TestClient::http1();
    let pinned_canary = || async {
        client
            .send(
                request(Method::GET, &proxy.url("/v1/x"))
                    .header("x-rollgate-version", "canary")
                    .body(empty())
                    .unwrap(),
            )
            .await
    };
    // Healthy: a connect error on canary is retried on stable.
    let r = pinned_canary().await;
    assert_eq!(r.version(), Some("stable"));
    assert_eq!(retries(&proxy, "canary", "stable").await, 1.0);

    // Degraded: traffic goes to backup.
    stable.set(Reply::Status(503));
    assert_eventually!(route_state(&proxy).await == "degraded", TIMEOUT);
    for _ in 0..5 {
        let r = client.get(&proxy.url("/v1/x")).await;
        assert_eq!(r.version(), Some("backup"));
    }
    assert_eq!(requests_of(&proxy, "backup").await, 5.0);
    let during = retries(&proxy, "canary", "stable").await;

    // Recovered.
    stable.set(Reply::Json);
    assert_eventually!(route_state(&proxy).await == "steady", TIMEOUT);
    let after_backup = requests_of(&proxy, "backup").await;
    let after_retries = retries(&proxy, "canary", "stable").await;
    // Degraded again: backup's counter must continue from 5.
    stable.set(Reply::Status(503));
    assert_eventually!(route_state(&proxy).await == "degraded", TIMEOUT);
    let again_backup = requests_of(&proxy, "backup").await;
    proxy.shutdown().await;
    assert_eq!(
        (during, after_backup, after_retries, again_backup),
        (1.0, 5.0, 1.0, 5.0),
        "(retries canary->stable while degraded, requests_total{{backup}} after recovery, \
         retries canary->stable after recovery, requests_total{{backup}} on the next \
         degradation): counters of pairs still in the config went back to 0"
    );
}

/// 92a9f26 blames any idle timeout after the response head on the client when the client's
/// body is still *open* (`Recording::close`: `End::Upstream(Timeout) if head_at && client.open()`),
/// not when the client went *quiet*. A version that hangs mid-response while the client keeps
/// streaming its body (gRPC bidi, ModelStreamInfer: the client sends, the model stops
/// answering) is recorded as `client_abort`: never an error, never rolled back. SPEC 4: an
/// idle timeout counts against the version.
#[tokio::test]
async fn defect_version_hanging_mid_stream_is_not_blamed_while_client_keeps_sending() {
    // An upstream that answers a head and one chunk, then goes silent while it keeps
    // reading (draining) whatever the client sends.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\
                          transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
                    )
                    .await;
                // Silent from now on; keep taking the body.
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    let proxy = TestProxy::new()
        .version_with("m", &format!("http://{addr}"), "")
        .route(Route::new("chat", "m").with("timeouts: {idle: 500ms}"))
        .start()
        .await;
    let mut s = tokio::net::TcpStream::connect(proxy.data_addr())
        .await
        .unwrap();
    s.write_all(
        b"POST /v1/x HTTP/1.1\r\nHost: a\r\ncontent-type: application/octet-stream\r\n\
          transfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n",
    )
    .await
    .unwrap();
    // The client keeps sending a chunk every 50 ms (never quiet) until the exchange ends.
    let sender = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_millis(50));
        loop {
            interval.tick().await;
            if s.write_all(b"4\r\nmore\r\n").await.is_err() {
                return;
            }
        }
    });
    assert_eventually!(requests_of(&proxy, "m").await == 1.0, TIMEOUT);
    let text = proxy.metrics_text().await;
    sender.abort();
    let errors = metric_sum(
        &text,
        "rollgate_requests_total",
        &[("version", "m"), ("classification", "error")],
    );
    let aborts = metric_sum(
        &text,
        "rollgate_requests_total",
        &[("version", "m"), ("classification", "client_abort")],
    );
    proxy.shutdown().await;
    assert_eq!(
        (errors, aborts),
        (1.0, 0.0),
        "(error, client_abort) of a version that stopped answering mid-stream while the \
         client was still sending every 50 ms"
    );
}

/// SPEC 5: a regression after 24 h of healthy traffic is caught as fast as one after a
/// minute. Drives `Comparison` (whose `min_error_rate` window is now a `Ring` with an
/// index that has grown by 864,000 ticks) through one simulated day, and through 6 hours of
/// no traffic at all, then the same regression; detection delay must match.
#[test]
fn guard_late_regression_after_a_day_and_after_idle_hours_caught_as_fast() {
    let ev = evaluator_config(
        "{error_rate_ratio: 2.0, error_rate_max: null, latency_p99_max: null, latency_p99_ratio: null, accuracy_drop: null}",
    );
    let thr = log_threshold(ev.confidence, ev.interval);
    // Ticks of healthy traffic, ticks of idle, then 20 % vs 1 % errors until a trip.
    let run = |healthy: u64, idle: u64, seed: u64| -> Option<u64> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut cmp = Comparison::default();
        for t in 0..healthy + idle {
            let (c, b) = if t < healthy { (5, 95) } else { (0, 0) };
            let tick = Tick {
                candidate_answered: c,
                candidate_errors: binomial(&mut rng, c, 0.01),
                baseline_answered: b,
                baseline_errors: binomial(&mut rng, b, 0.01),
                ..Tick::default()
            };
            cmp.observe(&ev, &tick);
            assert_eq!(
                decide(
                    &cmp.evidence(thr),
                    &ev.rules,
                    ev.min_requests,
                    ev.confidence
                ),
                Verdict::Healthy,
                "false alarm at tick {t}"
            );
        }
        for t in 0..36_000u64 {
            let tick = Tick {
                candidate_answered: 5,
                candidate_errors: binomial(&mut rng, 5, 0.2),
                baseline_answered: 95,
                baseline_errors: binomial(&mut rng, 95, 0.01),
                ..Tick::default()
            };
            cmp.observe(&ev, &tick);
            if decide(
                &cmp.evidence(thr),
                &ev.rules,
                ev.min_requests,
                ev.confidence,
            ) != Verdict::Healthy
            {
                return Some(t);
            }
        }
        None
    };
    let minute = 600; // ticks of 100 ms
    let (mut early, mut late, mut idle) = (Vec::new(), Vec::new(), Vec::new());
    for seed in 1..=3 {
        early.push(run(minute, 0, seed).expect("caught after a minute"));
        late.push(run(24 * 36_000, 0, seed).expect("caught after a day"));
        idle.push(run(minute, 6 * 36_000, seed).expect("caught after idle hours"));
    }
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len() as f64;
    eprintln!("ticks to detect: 1 min {early:?}, 24 h {late:?}, 1 min + 6 h idle {idle:?}");
    assert!(
        mean(&late) <= 1.5 * mean(&early) + 50.0 && mean(&idle) <= 1.5 * mean(&early) + 50.0,
        "late regressions detected slower: 1 min {early:?}, 24 h {late:?}, idle {idle:?}"
    );
}

/// The sliding window and the history over days of uptime, idle gaps of hours and traffic
/// again (tokio paused time): the window holds exactly the new traffic, the history's
/// points line up with what was recorded, `since` past the ring and in the future answers
/// nothing, and memory stays 900 points (899 finished seconds served).
#[tokio::test(start_paused = true)]
async fn guard_window_and_history_after_days_and_idle_gaps() {
    let t = Telemetry::new(Duration::from_secs(30));
    let route: std::sync::Arc<str> = "r".into();
    let p = t.pair(&route, &"v".into());
    let clock = t.history_clock();
    // Three days: traffic and a flush every 10 s, then a last minute of one request a
    // second flushed every 100 ms like the evaluator.
    let step = Duration::from_millis(100);
    for _ in 0..(3 * 24 * 360u64) {
        p.begin();
        p.record(Class::Success, 200, Some(Duration::from_millis(5)), step);
        tokio::time::advance(Duration::from_secs(10)).await;
        t.flush(tokio::time::Instant::now());
    }
    for i in 0..600u64 {
        if i % 10 == 0 {
            p.begin();
            p.record(Class::Success, 200, Some(Duration::from_millis(5)), step);
        }
        tokio::time::advance(step).await;
        t.flush(tokio::time::Instant::now());
    }
    let mut now = tokio::time::Instant::now();
    let w = p.window(now).stats();
    assert!(
        (27..=31).contains(&w.requests),
        "window after 3 days: {w:?}"
    );
    // Six idle hours: flushes keep running.
    for _ in 0..(6 * 3600) {
        tokio::time::advance(Duration::from_secs(1)).await;
        t.flush(tokio::time::Instant::now());
    }
    now = tokio::time::Instant::now();
    assert_eq!(p.window(now).stats().requests, 0);
    let (_, idle_points) = p.history(None, now);
    // The ring's 900 slots include the unfinished current second.
    assert_eq!(idle_points.len(), 899);
    assert!(idle_points.iter().all(|x| x.requests == 0));
    // A burst of 50 errors: the window and the history's newest second both see exactly it.
    for _ in 0..50 {
        p.begin();
        p.record(Class::Error, 500, Some(Duration::from_millis(7)), step);
    }
    t.flush(now);
    assert_eq!(p.window(now).stats().errors, 50);
    tokio::time::advance(Duration::from_secs(1)).await;
    let later = tokio::time::Instant::now();
    t.flush(later);
    let (start, points) = p.history(None, later);
    assert_eq!(points.len(), 899);
    assert_eq!(points.last().unwrap().errors, 50);
    assert_eq!(start + 898, clock.unix(clock.slots.index(later)) - 1);
    // `since` beyond now, or far in the past, or u64::MAX: bounded answers, no panic.
    assert!(p.history(Some(u64::MAX), later).1.is_empty());
    assert!(p.history(Some(u64::MAX - 1), later).1.is_empty());
    assert_eq!(p.history(Some(0), later).1.len(), 899);
    let (s, pts) = p.history(Some(start + 897), later);
    assert_eq!((s, pts.len()), (start + 898, 1));
    assert_eq!(pts[0].errors, 50);
}

/// `/api/v1/history` query parameters: malformed or extreme values answer 4xx or a bounded
/// 200, never a panic or a 5xx.
#[tokio::test]
async fn guard_history_api_bad_parameters_are_4xx() {
    let up = TestUpstream::start("m").await;
    let proxy = TestProxy::new()
        .version("m", &up)
        .route(Route::new("chat", "m"))
        .start()
        .await;
    let client = TestClient::http1();
    for (q, want) in [
        ("since=-1", 400),
        ("since=abc", 400),
        ("since=", 400),
        ("since=1.5", 400),
        ("since=99999999999999999999999", 400),
        ("since=18446744073709551615", 200),
        ("since=0", 200),
        ("route=%ff%fe", 404),
        ("route=%", 404),
        ("version=%zz", 404),
        ("route=chat&version=nope", 404),
        ("route=chat&route=other", 200),
        ("since", 400),
    ] {
        let r = client
            .get(&proxy.admin_url(&format!("/api/v1/history?{q}")))
            .await;
        assert_eq!(r.status, want, "{q}: {}", r.text());
    }
    proxy.shutdown().await;
}
