//! The data plane's request bodies, blame and shadow traffic over real sockets (SPEC section
//! 4): bodies stream as they arrive (full duplex), the first-byte timer starts when the body
//! has been sent, `max_in_flight` counts streams to their end, gRPC blame follows the route's
//! codes and the client's own deadline, retries stay inside their budget and go to the
//! fallback on a degraded route, and a shadow version gets copies that never touch the
//! client's answer.

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use http_body::Frame;
use http_body_util::BodyExt;
use support::*;

#[tokio::test]
async fn grpc_bidirectional_stream_does_five_round_trips() {
    let up = TestUpstream::start("triton").await;
    up.set(Reply::Echo);
    let proxy = TestProxy::new()
        .version_with("triton", &up.h2c_url(), "")
        .route(Route::new("infer", "triton"))
        .start()
        .await;
    let (tx, body) = ChannelBody::channel();
    let req = request(
        Method::POST,
        &proxy.url("/inference.GRPCInferenceService/ModelStreamInfer"),
    )
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(body.boxed())
    .unwrap();
    let resp = TestClient::h2c().send_streaming(req).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-rollgate-version"], "triton");
    let mut body = resp.into_body();
    for i in 0..5u8 {
        // One message out, then wait for its answer before the next: a proxy that reads
        // the request body before contacting the upstream never answers the first.
        let msg = grpc_frame(&[i; 16]);
        tx.send(Frame::data(msg.clone())).await.unwrap();
        let mut got = Vec::new();
        while got.len() < msg.len() {
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .unwrap_or_else(|_| panic!("no answer to message {i} within 5 s"))
                .expect("stream open")
                .expect("frame");
            if let Ok(d) = frame.into_data() {
                got.extend_from_slice(&d);
            }
        }
        assert_eq!(got, msg, "round trip {i}");
    }
    drop(tx);
    let mut trailers = None;
    while let Some(f) = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("stream ends")
    {
        if let Ok(t) = f.expect("frame").into_trailers() {
            trailers = Some(t);
        }
    }
    assert_eq!(trailers.expect("grpc trailers")["grpc-status"], "0");
    assert_eventually!(
        proxy.answered_by("triton").await == 1.0,
        Duration::from_secs(5)
    );
    assert_eq!(proxy.classified("triton", "error").await, 0.0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_slow_upload_is_not_the_versions_first_byte_timeout() {
    let up = TestUpstream::start("vision").await;
    let proxy = TestProxy::new()
        .version("vision", &up)
        .route(Route::new("img", "vision").with("timeouts: {first_byte: 1s}"))
        .start()
        .await;
    // 200 KiB trickled over 3 s: the upstream answers only after reading all of it.
    let (tx, body) = ChannelBody::channel();
    let feeder = tokio::spawn(async move {
        for _ in 0..30 {
            tx.send(Frame::data(Bytes::from(vec![b'x'; 200 * 1024 / 30])))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let req = request(Method::POST, &proxy.url("/v1/images"))
        .header("content-type", "application/octet-stream")
        .body(body.boxed())
        .unwrap();
    let started = Instant::now();
    let r = TestClient::http1().send(req).await;
    feeder.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(started.elapsed() >= Duration::from_millis(2900));
    assert_eq!(up.requests()[0].body.len(), 30 * (200 * 1024 / 30));
    assert_eventually!(
        proxy.answered_by("vision").await == 1.0,
        Duration::from_secs(5)
    );
    assert_eq!(proxy.classified("vision", "error").await, 0.0);
    // TTFB started when the body had been sent: nowhere near the 3 s upload.
    let text = proxy.metrics_text().await;
    let ttfb_sum = metric_sum(
        &text,
        "rollgate_time_to_first_byte_seconds_sum",
        &[("version", "vision")],
    );
    assert!(ttfb_sum < 1.0, "ttfb {ttfb_sum} s includes the upload");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_client_that_stalls_mid_upload_gets_408_and_the_version_no_error() {
    let up = TestUpstream::start("m").await;
    let proxy = TestProxy::new()
        .version("m", &up)
        .route(Route::new("r", "m").with("timeouts: {first_byte: 5s, idle: 500ms}"))
        .start()
        .await;
    let (tx, body) = ChannelBody::channel();
    tx.send(Frame::data(Bytes::from_static(b"partial")))
        .await
        .unwrap();
    let req = request(Method::POST, &proxy.url("/v1/x"))
        .body(body.boxed())
        .unwrap();
    let r = TestClient::http1().send(req).await;
    drop(tx);
    assert_eq!(r.status, 408, "{}", r.text());
    assert_eventually!(proxy.answered_by("m").await == 1.0, Duration::from_secs(5));
    assert_eq!(proxy.classified("m", "error").await, 0.0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn open_streams_hold_max_in_flight_until_they_end() {
    let up = TestUpstream::start("llm").await;
    up.set(Reply::Endless {
        interval: Duration::from_millis(50),
    });
    let proxy = TestProxy::new()
        .top("max_in_flight: 2")
        .version("llm", &up)
        .route(Route::new("chat", "llm"))
        .start()
        .await;
    let client = TestClient::http1();
    let mut streams = Vec::new();
    for _ in 0..2 {
        let resp = client.get_streaming(&proxy.url("/v1/stream")).await;
        assert_eq!(resp.status(), 200);
        streams.push(resp);
    }
    // Later requests get a short answer.
    up.set(Reply::Json);
    let third = client.get(&proxy.url("/v1/other")).await;
    assert_eq!(third.status, 503, "two open streams fill max_in_flight: 2");
    assert_eq!(third.header("retry-after"), Some("1"));
    // When a stream ends, its slot is free again.
    drop(streams.pop());
    assert_eventually!(
        client.get(&proxy.url("/v1/other")).await.status == 200,
        Duration::from_secs(5)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn grpc_blame_follows_the_routes_codes_and_the_clients_deadline() {
    let up = TestUpstream::start("g").await;
    up.set(Reply::Grpc { status: 4 });
    up.set_delay(Duration::from_millis(30));
    let proxy = TestProxy::new()
        .version_with("g", &up.h2c_url(), "")
        .route(Route::new("r", "g").with("grpc_fault_codes: [4, 14]"))
        .start()
        .await;
    let client = TestClient::h2c();
    let call = |timeout: Option<&'static str>| {
        let mut b = request(Method::POST, &proxy.url("/pkg.Svc/Call"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(t) = timeout {
            b = b.header("grpc-timeout", t);
        }
        b.body(full(grpc_frame(b"hi"))).unwrap()
    };
    // The client's own 1 ms deadline passed long before the answer: its doing.
    let r = client.send(call(Some("1m"))).await;
    assert_eq!(r.trailer("grpc-status"), Some("4"));
    assert_eventually!(proxy.answered_by("g").await == 1.0, Duration::from_secs(5));
    assert_eq!(proxy.classified("g", "error").await, 0.0);
    // No client deadline (or a longer one): the version's DEADLINE_EXCEEDED.
    client.send(call(None)).await;
    client.send(call(Some("10S"))).await;
    assert_eventually!(
        proxy.classified("g", "error").await == 2.0,
        Duration::from_secs(5)
    );
    // A code outside the route's set is not a fault; one inside is.
    up.set(Reply::Grpc { status: 13 });
    client.send(call(None)).await;
    up.set(Reply::Grpc { status: 14 });
    client.send(call(None)).await;
    assert_eventually!(proxy.answered_by("g").await == 5.0, Duration::from_secs(5));
    assert_eq!(proxy.classified("g", "error").await, 3.0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn connect_error_retries_stay_inside_the_budget_across_table_swaps() {
    let stable = TestUpstream::start("stable").await;
    let dead = format!("http://127.0.0.1:{}", closed_port());
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version_with("canary", &dead, "")
        .route(
            Route::new("chat", "stable")
                .split(&[("stable", 50), ("canary", 50)])
                .with("retry: {budget_percent: 0, min_per_second: 1}"),
        )
        .start()
        .await;
    let client = TestClient::http1();
    let url = proxy.url("/v1/x");
    let pinned = || client.get_with(&url, &[("x-rollgate-version", "canary")]);
    let mut ok = 0;
    let mut failed = 0;
    let started = Instant::now();
    for i in 0..30 {
        let r = pinned().await;
        match r.status.as_u16() {
            200 => ok += 1,
            502 => failed += 1,
            s => panic!("unexpected {s}"),
        }
        if i == 10 {
            // A swap of the routing table (here a weights change) does not refill it.
            let w = proxy
                .admin_post(
                    "/api/v1/weights",
                    r#"{"route":"chat","weights":{"stable":60,"canary":40},"reason":"t"}"#,
                )
                .await;
            assert_eq!(w.status, 200, "{}", w.text());
        }
    }
    // The budget: 1 to start with, plus 1 per second.
    let allowed = 1 + started.elapsed().as_secs() as usize + 1;
    assert!(ok <= allowed, "{ok} retried, budget allows {allowed}");
    assert!(ok >= 1, "the first connect failure is retried");
    assert_eq!(ok + failed, 30);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_degraded_route_retries_on_its_fallback() {
    let fallback = TestUpstream::start("fallback").await;
    let dead = format!("http://127.0.0.1:{}", closed_port());
    let dead2 = format!("http://127.0.0.1:{}", closed_port());
    let hc = "health_check: {path: /health, interval: 100ms, timeout: 100ms, unhealthy_after: 1, healthy_after: 1}";
    let proxy = TestProxy::new()
        .version_with("stable", &dead, hc)
        .version_with("canary", &dead2, "")
        .version("fallback", &fallback)
        .route(
            Route::new("chat", "stable")
                .split(&[("stable", 90), ("canary", 10)])
                .with("fallback: fallback"),
        )
        .start()
        .await;
    assert_eventually!(
        proxy.status_json().await["routes"][0]["state"] == "degraded",
        Duration::from_secs(5)
    );
    let client = TestClient::http1();
    // Pinned to the dead canary: the retry goes to the fallback, not the dead baseline.
    let r = client
        .get_with(&proxy.url("/v1/x"), &[("x-rollgate-version", "canary")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.version(), Some("fallback"));
    assert_eq!(r.retried_from(), Some("canary"));
    // A pin to a quarantined... version goes to the stand-in too; unpinned traffic is
    // served by the fallback.
    let r = client.get(&proxy.url("/v1/x")).await;
    assert_eq!(r.version(), Some("fallback"), "{}", r.text());
    proxy.shutdown().await;
}

#[tokio::test]
async fn model_routing_keeps_trailers_and_each_routes_limit() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let proxy = TestProxy::new()
        .version_with("a", &a.h2c_url(), "")
        .version("b", &b)
        .route(
            Route::new("big", "a")
                .matching("{model: [big]}")
                .with("max_request_body: 1MiB"),
        )
        .route(
            Route::new("small", "b")
                .matching("{model: [small]}")
                .with("max_request_body: 1KiB"),
        )
        .start()
        .await;
    let client = TestClient::http1();
    // Chunked (no Content-Length) and over the chosen route's smaller limit: refused.
    let body = format!(r#"{{"model":"small","pad":"{}"}}"#, "x".repeat(4096));
    let req = request(Method::POST, &proxy.url("/v1/chat"))
        .header("content-type", "application/json")
        .body(ChannelBody::from_chunks([body]).boxed())
        .unwrap();
    let r = client.send(req).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(b.request_count(), 0);
    // Trailers of a body read for its model reach the upstream.
    let (tx, cb) = ChannelBody::channel();
    tx.send(Frame::data(Bytes::from_static(br#"{"model":"big"}"#)))
        .await
        .unwrap();
    let mut t = http::HeaderMap::new();
    t.insert("x-checksum", "abc".parse().unwrap());
    tx.send(Frame::trailers(t)).await.unwrap();
    drop(tx);
    let req = request(Method::POST, &proxy.url("/v1/chat"))
        .header("content-type", "application/json")
        .header("te", "trailers")
        .body(cb.boxed())
        .unwrap();
    let r = TestClient::h2c().send(req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = a.requests();
    assert_eq!(
        seen[0]
            .trailers
            .as_ref()
            .and_then(|t| t.get("x-checksum"))
            .map(|v| v.to_str().unwrap()),
        Some("abc")
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_full_shadow_gets_every_request_and_never_slows_the_client() {
    let stable = TestUpstream::start("stable").await;
    let shadow = TestUpstream::start("shadow").await;
    shadow.set_delay(Duration::from_secs(2));
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("shadow", &shadow)
        .route(Route::new("chat", "stable").with("shadow: {version: shadow, percent: 100}"))
        .start()
        .await;
    let client = TestClient::http1();
    let started = Instant::now();
    for i in 0..20 {
        let body = format!(r#"{{"model":"m","i":{i}}}"#);
        let r = client
            .post_json(
                &proxy.url("/v1/chat"),
                body,
                &[("x-test-id", &i.to_string())],
            )
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.version(), Some("stable"));
        assert_eq!(
            r.json()["version"],
            "stable",
            "the client gets the primary's answer"
        );
    }
    // 20 sequential requests against a 2 s shadow: the client never waited for it.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "client latency includes the shadow: {:?}",
        started.elapsed()
    );
    assert_eventually!(shadow.request_count() == 20, Duration::from_secs(10));
    for r in shadow.requests() {
        let i = r.test_id().unwrap();
        assert!(r.body_complete);
        assert_eq!(r.body, format!(r#"{{"model":"m","i":{i}}}"#).as_bytes());
        assert_eq!(r.method, Method::POST);
    }
    // Measured under its own label once its answers end.
    assert_eventually!(
        proxy.answered_by("shadow").await == 20.0,
        Duration::from_secs(10)
    );
    let status = proxy.status_json().await;
    assert_eq!(
        status["routes"][0]["shadow"]["version"], "shadow",
        "{status}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_failing_shadow_is_quarantined_and_its_copies_stop() {
    let stable = TestUpstream::start("stable").await;
    let shadow = TestUpstream::start("shadow").await;
    shadow.set(Reply::FailFraction(0.5));
    let proxy = TestProxy::new()
        .top("evaluator: {interval: 100ms, min_requests: 20}")
        .version("stable", &stable)
        .version("shadow", &shadow)
        .route(Route::new("chat", "stable").with("shadow: {version: shadow, percent: 100}"))
        .start()
        .await;
    let client = TestClient::http1();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = client.get(&proxy.url("/v1/x")).await;
        assert_eq!(r.status, 200, "the client never sees the shadow's failures");
        let rec = proxy.audit_records();
        if rec
            .iter()
            .any(|r| r["kind"] == "rollback" && r["from_version"] == "shadow")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failing shadow was never rolled back"
        );
    }
    // Copies already on their way may land; after that, none.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let copies = shadow.request_count();
    for _ in 0..50 {
        assert_eq!(client.get(&proxy.url("/v1/x")).await.status, 200);
    }
    assert_eq!(
        shadow.request_count(),
        copies,
        "copies continued after the rollback"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_shadow_over_its_cap_is_dropped_and_counted() {
    let stable = TestUpstream::start("stable").await;
    let shadow = TestUpstream::start("shadow").await;
    shadow.set(Reply::Endless {
        interval: Duration::from_millis(100),
    });
    let proxy = TestProxy::new()
        .top("max_in_flight: 20")
        .version("stable", &stable)
        .version("shadow", &shadow)
        .route(Route::new("chat", "stable").with("shadow: {version: shadow, percent: 100}"))
        .start()
        .await;
    let client = TestClient::http1();
    // The shadow's endless streams fill its cap of 2 (10 % of 20); later copies are shed.
    for _ in 0..10 {
        assert_eq!(client.get(&proxy.url("/v1/x")).await.status, 200);
    }
    assert_eventually!(
        proxy
            .metric(
                "rollgate_shadow_dropped_total",
                &[("route", "chat"), ("reason", "overloaded")]
            )
            .await
            >= 8.0,
        Duration::from_secs(5)
    );
    assert!(shadow.request_count() <= 2);
    proxy.shutdown().await;
}

/// The response body's idle timer is moved lazily (frames only note their time; a timer
/// that fires early is re-armed from the last frame): a stream whose chunks keep coming
/// for longer than `idle` in total is never cut, and one that then goes silent is cut
/// `idle` after its last chunk, not after its first.
#[tokio::test]
async fn response_idle_timeout_counts_from_the_last_chunk_not_the_first() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_url = format!("http://{}", listener.local_addr().unwrap());
    const CHUNKS: usize = 10;
    let upstream = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "proxy closed before its request head");
            head.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        // 10 chunks 150 ms apart: 1.35 s of streaming against a 500 ms idle timeout.
        for i in 0..CHUNKS {
            let event = format!("data: {i}\n\n");
            let chunk = format!("{:x}\r\n{event}\r\n", event.len());
            s.write_all(chunk.as_bytes()).await.unwrap();
            if i + 1 < CHUNKS {
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }
        // Then silence, with the connection open, until the proxy lets go.
        let _ = s.read(&mut buf).await;
    });
    let proxy = TestProxy::new()
        .version_with("m", &up_url, "")
        .route(Route::new("r", "m").with("timeouts: {first_byte: 5s, idle: 500ms}"))
        .start()
        .await;
    let resp = TestClient::http1()
        .get_streaming(&proxy.url("/v1/stream"))
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut received = Vec::new();
    let mut last_chunk = Instant::now();
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(10), body.frame()).await {
            Err(_) => panic!("the silent stream was not cut within 10 s"),
            Ok(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    received.extend_from_slice(d);
                    last_chunk = Instant::now();
                }
            }
            Ok(Some(Err(_))) | Ok(None) => break last_chunk.elapsed(),
        }
    };
    let text = String::from_utf8_lossy(&received);
    assert_eq!(
        text.matches("data: ").count(),
        CHUNKS,
        "every chunk arrived before the cut: {text}"
    );
    assert!(
        ended >= Duration::from_millis(400),
        "cut {ended:?} after the last chunk, before the idle timeout ran from it"
    );
    upstream.abort();
    proxy.shutdown().await;
}

/// An HTTP/2 upstream connection is idle from the end of its last stream, not from the
/// start of its last request: a stream that runs past the pool's 4 s idle timeout, with no
/// other request meanwhile, keeps the connection, and the next request reuses it.
// Failed before the fix: the pool stamped the connection's use when a request began, let
// go of it 4 s into the stream, and the next request opened a second connection.
#[tokio::test]
async fn an_h2_stream_longer_than_the_pool_idle_timeout_keeps_its_connection() {
    let up = TestUpstream::start("llm").await;
    // 46 events 100 ms apart: 4.5 s, past the pool's 4 s idle timeout.
    up.set(Reply::Sse {
        chunks: 46,
        interval: Duration::from_millis(100),
    });
    let proxy = TestProxy::to(&up.h2c_url()).await;
    let client = TestClient::http1();
    let resp = client.get_streaming(&proxy.url("/v1/stream")).await;
    assert_eq!(resp.status(), 200);
    let started = Instant::now();
    let body = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
        .await
        .expect("the stream ends within 20 s")
        .expect("the stream ends cleanly")
        .to_bytes();
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "the stream must outlast the pool's idle timeout: {:?}",
        started.elapsed()
    );
    assert!(String::from_utf8_lossy(&body).contains("[DONE]"));
    up.set(Reply::Json);
    let next = client.get(&proxy.url("/v1/next")).await;
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(
        up.connections(),
        1,
        "the request after a long stream reuses its HTTP/2 connection"
    );
    proxy.shutdown().await;
}
