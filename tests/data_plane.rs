//! The data plane as a user sees it: real sockets, real upstreams that can be told to fail.

#[macro_use]
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;
use support::*;

/// Sends `n` GETs (16 at a time) and counts answers by `x-rollgate-version`.
async fn count_versions(
    proxy: &TestProxy,
    n: usize,
    headers: &[(&str, &str)],
) -> HashMap<String, usize> {
    let client = TestClient::http1();
    let mut counts = HashMap::new();
    for batch in 0..n.div_ceil(16) {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..16.min(n - batch * 16) {
            let client = client.clone();
            let url = proxy.url("/v1/chat/completions");
            let headers: Vec<(String, String)> = headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            set.spawn(async move {
                let h: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let r = client.get_with(&url, &h).await;
                assert_eq!(r.status, 200, "{}", r.text());
                r.version()
                    .expect("x-rollgate-version on every response")
                    .to_string()
            });
        }
        while let Some(v) = set.join_next().await {
            *counts.entry(v.unwrap()).or_insert(0) += 1;
        }
    }
    counts
}

#[tokio::test]
async fn split_90_10_lands_within_3_points_over_2000_requests() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("canary", &canary)
        .route(Route::new("chat", "stable").split(&[("stable", 90), ("canary", 10)]))
        .start()
        .await;
    let counts = count_versions(&proxy, 2000, &[]).await;
    let canary_share = *counts.get("canary").unwrap_or(&0) as f64 / 2000.0;
    assert!(
        (canary_share - 0.10).abs() <= 0.03,
        "canary share {canary_share} (counts {counts:?})"
    );
    assert_eq!(counts.values().sum::<usize>(), 2000);
    // Every response names the upstream that really answered.
    assert_eq!(stable.request_count() + canary.request_count(), 2000);
    assert_eq!(canary.request_count(), counts["canary"]);
    // The request metrics agree with what the client saw.
    let m = proxy
        .metric(
            "rollgate_requests_total",
            &[("route", "chat"), ("version", "canary")],
        )
        .await;
    assert_eq!(m as usize, counts["canary"]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn pin_reaches_weight_zero_version_and_unknown_pin_is_400() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("canary", &canary)
        .route(Route::new("chat", "stable").split(&[("stable", 100), ("canary", 0)]))
        .start()
        .await;
    let client = TestClient::http1();
    for _ in 0..20 {
        let r = client
            .get_with(&proxy.url("/v1/x"), &[("x-rollgate-version", "canary")])
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.version(), Some("canary"));
        assert_eq!(r.header("x-upstream"), Some("canary"));
    }
    // The pin header is the proxy's own: it never reaches the upstream.
    assert!(canary
        .requests()
        .iter()
        .all(|r| r.header("x-rollgate-version").is_none()));
    // Unpinned traffic never lands on the weight-0 version.
    let counts = count_versions(&proxy, 100, &[]).await;
    assert_eq!(counts.get("canary"), None, "{counts:?}");

    let r = client
        .get_with(&proxy.url("/v1/x"), &[("x-rollgate-version", "nope")])
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "unknown_version");
    assert_eq!(
        stable.request_count() + canary.request_count(),
        120,
        "the 400 reached no upstream"
    );
    proxy.shutdown().await;
}

/// Rendezvous hashing is a pure function of (key, version name, weight), so two proxies with
/// different weights stand in for one proxy before and after a weight change.
#[tokio::test]
async fn sticky_keys_keep_their_version_and_move_only_toward_the_gainer() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let start = |wa: u32, wb: u32| {
        TestProxy::new()
            .version("a", &a)
            .version("b", &b)
            .route(
                Route::new("chat", "a")
                    .split(&[("a", wa), ("b", wb)])
                    .with("sticky: {header: x-user-id}"),
            )
            .start()
    };
    let before = start(70, 30).await;
    let after = start(40, 60).await;
    let client = TestClient::http1();
    let mut moved = 0;
    for i in 0..300 {
        let user = format!("user-{i}");
        let h = [("x-user-id", user.as_str())];
        let v1 = client
            .get_with(&before.url("/v1/x"), &h)
            .await
            .version()
            .unwrap()
            .to_string();
        // Same key, same version, every time.
        for _ in 0..2 {
            assert_eq!(
                client
                    .get_with(&before.url("/v1/x"), &h)
                    .await
                    .version()
                    .unwrap(),
                v1
            );
        }
        let v2 = client
            .get_with(&after.url("/v1/x"), &h)
            .await
            .version()
            .unwrap()
            .to_string();
        if v1 != v2 {
            assert_eq!(
                (v1.as_str(), v2.as_str()),
                ("a", "b"),
                "key {user} moved away from the gainer"
            );
            moved += 1;
        }
    }
    // About (60-30)/70 of a's keys move; make sure the test saw movement at all.
    assert!(moved > 30, "only {moved} keys moved");
    before.shutdown().await;
    after.shutdown().await;
}

#[tokio::test]
async fn sticky_cookie_keeps_version() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let proxy = TestProxy::new()
        .version("a", &a)
        .version("b", &b)
        .route(
            Route::new("chat", "a")
                .split(&[("a", 50), ("b", 50)])
                .with("sticky: {cookie: session}"),
        )
        .start()
        .await;
    let client = TestClient::http1();
    let mut seen = std::collections::HashSet::new();
    for i in 0..40 {
        let cookie = format!("theme=dark; session=s{i}");
        let first = client
            .get_with(&proxy.url("/"), &[("cookie", &cookie)])
            .await
            .version()
            .unwrap()
            .to_string();
        for _ in 0..3 {
            assert_eq!(
                client
                    .get_with(&proxy.url("/"), &[("cookie", &cookie)])
                    .await
                    .version()
                    .unwrap(),
                first
            );
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 2, "both versions get sticky keys");
    proxy.shutdown().await;
}

#[tokio::test]
async fn sse_arrives_chunk_by_chunk() {
    let up = TestUpstream::start("llm").await;
    up.set(Reply::Sse {
        chunks: 6,
        interval: Duration::from_millis(250),
    });
    let proxy = TestProxy::new()
        .version("llm", &up)
        .route(Route::new("chat", "llm"))
        .start()
        .await;
    let client = TestClient::http1();
    let t0 = Instant::now();
    let resp = client
        .send_streaming(
            request(Method::POST, &proxy.url("/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(full(r#"{"model":"m","stream":true}"#))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["x-rollgate-version"], "llm");
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let mut arrivals = Vec::new();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("SSE frame within 5 s")
    {
        if let Ok(data) = frame.unwrap().into_data() {
            got.extend_from_slice(&data);
            arrivals.push(t0.elapsed());
        }
    }
    assert_eq!(
        Bytes::from(got),
        sse_body("llm", 6),
        "bytes pass through untouched"
    );
    assert!(
        arrivals[0] < Duration::from_millis(600),
        "first event only after {:?}: buffered",
        arrivals[0]
    );
    let first = arrivals[0];
    let last = *arrivals.last().unwrap();
    // Produced over 1.25 s: the first chunk must not wait for the last.
    assert!(
        last - first >= Duration::from_millis(1000),
        "first {first:?}, last {last:?}: buffered?"
    );
    assert!(arrivals.len() >= 5, "{} frames", arrivals.len());
    proxy.shutdown().await;
}

#[tokio::test]
async fn grpc_over_h2c_keeps_trailers_and_status_14_counts_as_error() {
    let up = TestUpstream::start("triton").await;
    let proxy = TestProxy::new()
        .version_with("triton", &up.h2c_url(), "")
        .route(Route::new("infer", "triton"))
        .start()
        .await;
    let client = TestClient::h2c();
    let call = || {
        request(
            Method::POST,
            &proxy.url("/inference.GRPCInferenceService/ModelInfer"),
        )
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(grpc_frame(b"hello")))
        .unwrap()
    };
    up.set(Reply::Grpc { status: 0 });
    let ok = client.send(call()).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.version(), Some("triton"));
    assert_eq!(ok.trailer("grpc-status"), Some("0"));
    assert_eq!(ok.trailer("x-upstream-trailer"), Some("triton"));
    assert_eq!(&ok.body[..], &grpc_frame(b"reply from triton")[..]);
    // The upstream saw HTTP/2 and the te: trailers gRPC requires.
    let seen = &up.requests()[0];
    assert_eq!(seen.version, http::Version::HTTP_2);
    assert_eq!(seen.header("te").as_deref(), Some("trailers"));

    up.set(Reply::Grpc { status: 14 });
    let unavailable = client.send(call()).await;
    assert_eq!(unavailable.status, 200);
    assert_eq!(unavailable.trailer("grpc-status"), Some("14"));
    up.set(Reply::GrpcTrailersOnly { status: 13 });
    let internal = client.send(call()).await;
    assert_eq!(internal.header("grpc-status"), Some("13"));
    up.set(Reply::GrpcTrailersOnly { status: 5 }); // NOT_FOUND: the caller's problem
    client.send(call()).await;

    let errors = proxy
        .metric(
            "rollgate_requests_total",
            &[
                ("route", "infer"),
                ("version", "triton"),
                ("classification", "error"),
            ],
        )
        .await;
    let successes = proxy
        .metric(
            "rollgate_requests_total",
            &[
                ("route", "infer"),
                ("version", "triton"),
                ("classification", "success"),
            ],
        )
        .await;
    assert_eq!((errors, successes), (2.0, 2.0));
    proxy.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_headers_never_reach_the_upstream_and_forwarding_headers_are_set() {
    let up = TestUpstream::start("v1").await;
    let proxy = TestProxy::new()
        .version_with("v1", &up.http_url(), "set_headers: {x-prompt-version: p7}")
        .route(Route::new("chat", "v1"))
        .start()
        .await;
    let raw = format!(
        "POST /v1/chat HTTP/1.1\r\nHost: {}\r\nConnection: keep-alive, X-Model-Secret, close\r\n\
         Keep-Alive: timeout=5\r\nTE: trailers, deflate\r\nProxy-Connection: keep-alive\r\n\
         Proxy-Authorization: Basic Zm9vOmJhcg==\r\nTrailer: x-checksum\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\
         X-Model-Secret: s3cret\r\nX-Prompt-Version: client-set\r\nX-Forwarded-For: 10.9.9.9\r\n\
         X-Test-Id: hop\r\nContent-Length: 2\r\n\r\n{{}}",
        proxy.data_addr()
    );
    let resp = raw_http1(proxy.data_addr(), raw.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.to_ascii_lowercase().contains("x-rollgate-version: v1"),
        "{resp}"
    );
    let seen = up.requests_with_id("hop");
    assert_eq!(seen.len(), 1);
    let r = &seen[0];
    for h in [
        "connection",
        "keep-alive",
        "te",
        "proxy-connection",
        "proxy-authorization",
        "trailer",
        "http2-settings",
        "x-model-secret",
        "upgrade",
    ] {
        assert!(
            r.header(h).is_none(),
            "{h} reached the upstream: {:?}",
            r.headers
        );
    }
    assert_eq!(
        r.header("x-prompt-version").as_deref(),
        Some("p7"),
        "set_headers replaces the client value"
    );
    assert_eq!(r.header_all("x-prompt-version").len(), 1);
    assert_eq!(
        r.header("x-forwarded-for").as_deref(),
        Some("10.9.9.9, 127.0.0.1"),
        "peer appended"
    );
    assert_eq!(r.header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        r.header("x-forwarded-host").as_deref(),
        Some(proxy.data_addr().to_string().as_str())
    );
    assert!(r.header("x-request-id").is_some_and(|id| !id.is_empty()));
    assert_eq!(&r.body[..], b"{}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn request_id_is_propagated_or_generated() {
    let up = TestUpstream::start("v1").await;
    let proxy = TestProxy::new()
        .version("v1", &up)
        .route(Route::new("chat", "v1"))
        .start()
        .await;
    let client = TestClient::http1();
    let r = client
        .get_with(
            &proxy.url("/"),
            &[("x-request-id", "abc-123"), ("x-test-id", "a")],
        )
        .await;
    assert_eq!(r.header("x-request-id"), Some("abc-123"));
    assert_eq!(
        up.requests_with_id("a")[0]
            .header("x-request-id")
            .as_deref(),
        Some("abc-123")
    );
    let r1 = client.get(&proxy.url("/")).await;
    let r2 = client.get(&proxy.url("/")).await;
    let (id1, id2) = (
        r1.header("x-request-id").unwrap(),
        r2.header("x-request-id").unwrap(),
    );
    assert!(!id1.is_empty() && id1 != id2);
    proxy.shutdown().await;
}

/// Over HTTP/2 the request id, different on every response, goes as a literal never
/// indexed: indexed, each one took a new entry in the connection's compression table, and
/// the encoder walked the chain of old ids on every later response.
#[tokio::test]
async fn h2_request_ids_stay_out_of_the_header_compression_table() {
    let up = TestUpstream::start("v1").await;
    let proxy = TestProxy::to(&up.http_url()).await;
    let client_id = vec![("x-request-id", "client-id-7")];
    let requests = [vec![], vec![], client_id, vec![]];
    let heads = support::h2raw::get_heads(proxy.data_addr(), &[], &requests).await;
    assert_eq!(
        heads[2].values("x-request-id"),
        ["client-id-7"],
        "the client's id"
    );
    for (i, h) in heads.iter().enumerate() {
        assert!(h.never_indexed("x-request-id"), "response {i}: {h:?}");
    }
    // The same value every time: indexed once, which shows the check can see it.
    assert!(
        heads[0].indexed.iter().any(|n| n == "x-rollgate-version"),
        "{:?}",
        heads[0]
    );
    let mut ids: Vec<String> = heads
        .iter()
        .flat_map(|h| h.values("x-request-id"))
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "one id per request: {ids:?}");
    proxy.shutdown().await;

    // An upstream that answers with its own ids (vLLM echoes the request's; this one sends
    // two): the client gets those, never indexed either.
    use support::raw_upstream::{Fault, RawUpstream};
    let own = "HTTP/1.1 200 OK\r\nx-request-id: upstream-7\r\nx-request-id: upstream-8\r\n\
               content-length: 2\r\n\r\nok";
    let up = RawUpstream::start(Fault::Respond(Bytes::from_static(own.as_bytes()))).await;
    let proxy = TestProxy::to(&up.url()).await;
    let heads = support::h2raw::get_heads(proxy.data_addr(), &[], &[vec![], vec![]]).await;
    for (i, h) in heads.iter().enumerate() {
        assert_eq!(h.values("x-request-id"), ["upstream-7", "upstream-8"]);
        assert!(h.never_indexed("x-request-id"), "response {i}: {h:?}");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn closed_canary_port_still_gives_the_client_a_200_from_the_baseline() {
    let stable = TestUpstream::start("stable").await;
    let dead = format!("http://127.0.0.1:{}", closed_port());
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version_with("canary", &dead, "")
        .route(Route::new("chat", "stable").split(&[("stable", 50), ("canary", 50)]))
        .start()
        .await;
    let client = TestClient::http1();
    let mut retried = 0;
    // Pinned to the dead canary, 10 requests: every one is retried, inside the budget's
    // floor (min_per_second 10 to start with).
    for _ in 0..10 {
        // POST: nothing reached the canary, so even a non-idempotent request is retried.
        let r = client
            .post_json(
                &proxy.url("/v1/chat/completions"),
                r#"{"model":"m"}"#,
                &[("x-rollgate-version", "canary")],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.version(), Some("stable"));
        if r.retried_from() == Some("canary") {
            retried += 1;
        }
    }
    assert_eq!(retried, 10);
    // Every body arrived intact at the baseline (replayed from the retry buffer).
    assert!(stable
        .requests()
        .iter()
        .all(|r| r.body_complete && &r.body[..] == br#"{"model":"m"}"#));
    // The connect failures count against the canary; the retries are counted per attempt.
    let errors = proxy
        .metric("rollgate_upstream_errors_total", &[("version", "canary")])
        .await;
    assert_eq!(errors as usize, retried);
    let retries = proxy
        .metric(
            "rollgate_retries_total",
            &[
                ("route", "chat"),
                ("from_version", "canary"),
                ("to_version", "stable"),
            ],
        )
        .await;
    assert_eq!(retries as usize, retried);
    proxy.shutdown().await;
}

#[tokio::test]
async fn body_over_the_limit_gets_413_and_never_reaches_the_upstream() {
    let up = TestUpstream::start("v1").await;
    let proxy = TestProxy::new()
        .version("v1", &up)
        .route(Route::new("chat", "v1").with("max_request_body: 1KiB"))
        .start()
        .await;
    let client = TestClient::http1();
    // Declared length over the limit.
    let big = vec![b'x'; 4096];
    let r = client
        .post_json(&proxy.url("/v1/chat"), big.clone(), &[])
        .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"], "body_too_large");
    // Chunked body that crosses the limit.
    let chunked = ChannelBody::from_chunks(vec![
        Bytes::from(vec![b'y'; 600]),
        Bytes::from(vec![b'y'; 600]),
    ]);
    let r = client
        .try_send(
            request(Method::POST, &proxy.url("/v1/chat"))
                .body(http_body_util::BodyExt::boxed(chunked))
                .unwrap(),
        )
        .await;
    match r {
        Ok(r) => assert_eq!(r.status, 413),
        Err(e) => panic!("chunked over-limit body: {e}"),
    }
    assert_eq!(
        up.requests().iter().filter(|r| r.body_complete).count(),
        0,
        "no complete body reached the upstream"
    );
    // Within the limit it goes through.
    let r = client
        .post_json(&proxy.url("/v1/chat"), vec![b'z'; 1000], &[])
        .await;
    assert_eq!(r.status, 200);
    proxy.shutdown().await;
}

#[tokio::test]
async fn client_disconnect_mid_stream_closes_the_upstream_stream() {
    let up = TestUpstream::start("llm").await;
    up.set(Reply::Endless {
        interval: Duration::from_millis(20),
    });
    let proxy = TestProxy::new()
        .version("llm", &up)
        .route(Route::new("chat", "llm"))
        .start()
        .await;
    let client = TestClient::http1();
    let resp = client.get_streaming(&proxy.url("/v1/stream")).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    for _ in 0..3 {
        body.frame().await.expect("a tick").expect("frame");
    }
    assert_eq!(up.disconnects(), 0);
    drop(body);
    drop(client);
    assert_eventually!(up.disconnects() == 1, Duration::from_secs(5));
    // Counted as a client abort, never against the version.
    assert_eventually!(
        proxy
            .metric(
                "rollgate_requests_total",
                &[("version", "llm"), ("classification", "client_abort")]
            )
            .await
            == 1.0,
        Duration::from_secs(5)
    );
    assert_eq!(
        proxy
            .metric(
                "rollgate_requests_total",
                &[("version", "llm"), ("classification", "error")]
            )
            .await,
        0.0
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn model_field_routes_and_the_body_is_forwarded_byte_for_byte() {
    let llama = TestUpstream::start("llama").await;
    let mistral = TestUpstream::start("mistral").await;
    let proxy = TestProxy::new()
        .version("llama", &llama)
        .version("mistral", &mistral)
        .route(Route::new("llama", "llama").matching("{path_prefix: /v1/, model: [llama-3]}"))
        .route(
            Route::new("mistral", "mistral")
                .matching("{path_prefix: /v1/, model: [mistral-large]}"),
        )
        .start()
        .await;
    let client = TestClient::http1();
    let body = "{ \"messages\": [{\"role\":\"user\",\"content\":\"hi\"}],\n  \"model\" : \"mistral-large\", \"stream\": false }";
    let r = client
        .post_json(
            &proxy.url("/v1/chat/completions"),
            body,
            &[("x-test-id", "m")],
        )
        .await;
    assert_eq!(r.version(), Some("mistral"));
    assert_eq!(&mistral.requests_with_id("m")[0].body[..], body.as_bytes());
    let r = client
        .post_json(
            &proxy.url("/v1/chat/completions"),
            r#"{"model":"llama-3"}"#,
            &[],
        )
        .await;
    assert_eq!(r.version(), Some("llama"));
    let r = client
        .get_with(
            &proxy.url("/v1/models"),
            &[("x-gateway-model-name", "llama-3")],
        )
        .await;
    assert_eq!(r.version(), Some("llama"));
    let r = client
        .post_json(
            &proxy.url("/v1/chat/completions"),
            r#"{"model":"gpt-9"}"#,
            &[],
        )
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "no_route");
    proxy.shutdown().await;
}

#[tokio::test]
async fn upstream_5xx_is_retried_on_the_baseline_and_counted_against_the_canary() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    canary.set(Reply::Status(503));
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("canary", &canary)
        .route(Route::new("chat", "stable").split(&[("stable", 50), ("canary", 50)]))
        .start()
        .await;
    let client = TestClient::http1();
    // Few enough that the budget's floor (min_per_second: 10) covers every retry.
    for _ in 0..10 {
        let r = client
            .post_json(&proxy.url("/v1/chat"), r#"{"q":1}"#, &[])
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.version(), Some("stable"));
    }
    let canary_errors = proxy
        .metric(
            "rollgate_requests_total",
            &[
                ("version", "canary"),
                ("classification", "error"),
                ("code", "503"),
            ],
        )
        .await;
    assert_eq!(canary_errors as usize, canary.request_count());
    assert!(canary_errors > 0.0);
    // Beyond the budget the canary's own 503 goes to the client: retries are bounded.
    let mut passed_through = 0;
    for _ in 0..60 {
        let r = client
            .get_with(&proxy.url("/v1/x"), &[("x-rollgate-version", "canary")])
            .await;
        match (r.status.as_u16(), r.version()) {
            (200, Some("stable")) => assert_eq!(r.retried_from(), Some("canary")),
            (503, Some("canary")) => passed_through += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        passed_through > 0,
        "60 retries in a burst: the budget did not hold"
    );
    // A 4xx is the caller's problem: passed through, not retried, not an error.
    canary.set(Reply::Status(422));
    let r = client
        .get_with(&proxy.url("/v1/x"), &[("x-rollgate-version", "canary")])
        .await;
    assert_eq!((r.status.as_u16(), r.version()), (422, Some("canary")));
    let client_errors = proxy
        .metric(
            "rollgate_requests_total",
            &[("version", "canary"), ("classification", "client_error")],
        )
        .await;
    assert_eq!(client_errors, 1.0);
    assert_eq!(r.retried_from(), None);
    proxy.shutdown().await;
}

#[tokio::test]
async fn slow_first_byte_gets_504_and_counts_as_a_timeout() {
    let up = TestUpstream::start("slow").await;
    up.set_delay(Duration::from_secs(3));
    let proxy = TestProxy::new()
        .version("slow", &up)
        .route(Route::new("chat", "slow").with("timeouts: {first_byte: 200ms}"))
        .start()
        .await;
    let r = TestClient::http1().get(&proxy.url("/v1/x")).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.version(), Some("slow"));
    let t = proxy
        .metric(
            "rollgate_upstream_errors_total",
            &[("version", "slow"), ("kind", "timeout")],
        )
        .await;
    assert_eq!(t, 1.0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn https_upstream_is_verified_with_sni_and_a_private_ca() {
    let up = TestUpstream::start_tls("secure").await;
    let ca = up.ca_pem_path().display().to_string();
    let proxy = TestProxy::new()
        .version_with("secure", &up.https_url(), &format!("ca_file: \"{ca}\""))
        .version_with("untrusted", &up.https_url(), "")
        .route(Route::new("chat", "secure").split(&[("secure", 100), ("untrusted", 0)]))
        .top("evaluator: {min_requests: 1000000}")
        .start()
        .await;
    let client = TestClient::http1();
    let r = client.get(&proxy.url("/v1/x")).await;
    assert_eq!((r.status.as_u16(), r.version()), (200, Some("secure")));
    // Without the private CA the certificate is not trusted: the pinned request fails over
    // to the baseline, and the failure counts against the untrusted version.
    let r = client
        .get_with(&proxy.url("/v1/x"), &[("x-rollgate-version", "untrusted")])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.version(), Some("secure"));
    assert_eq!(r.retried_from(), Some("untrusted"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn downstream_tls_serves_h1_and_h2_by_alpn() {
    let up = TestUpstream::start("v1").await;
    let ca = TestCa::new("rollgate downstream test CA");
    let dir = tempfile::tempdir().unwrap();
    let (proxy, _) = tls_proxy(&up, &ca, dir.path()).await;

    for want in [http::Version::HTTP_2, http::Version::HTTP_11] {
        let resp = tls_get(&ca, proxy.data_addr().port(), want).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), want);
        assert_eq!(resp.headers()["x-rollgate-version"], "v1");
    }
    let r = up.requests();
    assert!(r
        .iter()
        .all(|r| r.header("x-forwarded-proto").as_deref() == Some("https")));
    proxy.shutdown().await;
}

/// A proxy in front of `up` serving TLS with a `localhost` leaf of `ca`, its PEM files in
/// `dir` (`write_tls_files` names them); returns the certificate's path too.
async fn tls_proxy(
    up: &TestUpstream,
    ca: &TestCa,
    dir: &std::path::Path,
) -> (TestProxy, std::path::PathBuf) {
    let (cert_path, key_path) = support::certs::write_tls_files(ca, dir);
    let proxy = TestProxy::new()
        .version("v1", up)
        .route(Route::new("chat", "v1"))
        .top(&support::certs::tls_top(&cert_path, &key_path))
        .start()
        .await;
    (proxy, cert_path)
}

/// GET https://localhost:PORT/v1/x over a fresh connection trusting only `ca`.
async fn tls_get(
    ca: &TestCa,
    port: u16,
    want: http::Version,
) -> Result<http::Response<hyper::body::Incoming>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(cfg)
        .https_only();
    let connector = if want == http::Version::HTTP_2 {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector);
    let url = format!("https://localhost:{port}/v1/x");
    tokio::time::timeout(REQUEST_TIMEOUT, client.get(url.parse().unwrap()))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test]
async fn tls_certificates_reload_and_a_bad_pem_keeps_the_old_one() {
    let up = TestUpstream::start("v1").await;
    let old_ca = TestCa::new("rollgate old CA");
    let new_ca = TestCa::new("rollgate new CA");
    let dir = tempfile::tempdir().unwrap();
    let (proxy, cert_path) = tls_proxy(&up, &old_ca, dir.path()).await;
    let port = proxy.data_addr().port();
    let h1 = http::Version::HTTP_11;
    assert_eq!(tls_get(&old_ca, port, h1).await.unwrap().status(), 200);
    let reload = || async {
        TestClient::http1()
            .post_json(&proxy.admin_url("/api/v1/reload"), "{}", &[])
            .await
    };

    // A half-written certificate: the reload reports it, the old certificate keeps serving.
    std::fs::write(&cert_path, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    let r = reload().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["tls_error"].is_string(), "{}", r.text());
    assert_eq!(tls_get(&old_ca, port, h1).await.unwrap().status(), 200);

    // The rotated pair: new handshakes present it.
    support::certs::write_tls_files(&new_ca, dir.path());
    let r = reload().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json().get("tls_error").is_none(), "{}", r.text());
    assert_eq!(tls_get(&new_ca, port, h1).await.unwrap().status(), 200);
    assert!(tls_get(&old_ca, port, h1).await.is_err());
    proxy.shutdown().await;
}

#[tokio::test]
async fn status_and_metrics_follow_the_spec_shape() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    canary.set(Reply::Status(500));
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("canary", &canary)
        .route(Route::new("chat", "stable").split(&[("stable", 90), ("canary", 10)]))
        .start()
        .await;
    let client = TestClient::http1();
    for _ in 0..10 {
        client
            .get_with(&proxy.url("/v1/x"), &[("x-rollgate-version", "canary")])
            .await;
        client.get(&proxy.url("/v1/x")).await;
    }
    let s = proxy.status_json().await;
    assert!(s["generation"].as_u64().unwrap() >= 1);
    assert!(s["config_hash"].as_str().unwrap().starts_with("sha256:"));
    let route = &s["routes"][0];
    assert_eq!(route["name"], "chat");
    assert_eq!(route["owner"], "rollgate-tests");
    assert_eq!(route["baseline"], "stable");
    assert_eq!(route["state"], "steady");
    assert_eq!(route["weights"]["stable"], 90);
    assert_eq!(route["weights"]["canary"], 10);
    let versions = s["versions"].as_array().unwrap();
    let canary_status = versions.iter().find(|v| v["name"] == "canary").unwrap();
    assert_eq!(canary_status["quarantined"], false);
    assert_eq!(canary_status["healthy"], true);
    assert!(canary_status["fingerprint"]
        .as_str()
        .is_some_and(|f| !f.is_empty()));
    // Retried pins: the canary's 500s are its errors, answered by the baseline.
    let w = &canary_status["window"];
    assert!(w["requests"].as_u64().unwrap() >= 10, "{w}");
    assert_eq!(w["errors"], w["requests"]);
    assert_eq!(w["error_rate"], 1.0);
    for k in ["ttfb_p50_ms", "ttfb_p99_ms", "total_p50_ms", "total_p99_ms"] {
        assert!(w[k].as_f64().is_some(), "{k} in {w}");
    }
    let text = proxy.metrics_text().await;
    for name in [
        "rollgate_requests_total",
        "rollgate_request_duration_seconds_bucket",
        "rollgate_time_to_first_byte_seconds_bucket",
        "rollgate_route_weight_ratio",
        "rollgate_routing_table_generation",
        "rollgate_version_quarantined",
        "rollgate_build_info",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    assert_eq!(
        metric_sum(&text, "rollgate_routing_table_generation", &[]),
        s["generation"].as_f64().unwrap()
    );
    assert_eq!(
        metric_sum(
            &text,
            "rollgate_route_weight_ratio",
            &[("route", "chat"), ("version", "canary")]
        ),
        0.1
    );
    let h = client.get(&proxy.admin_url("/healthz")).await;
    assert_eq!(h.status, 200);
    let r = client.get(&proxy.admin_url("/readyz")).await;
    assert_eq!(r.status, 200);
    // Metrics never on the data port: there it is just a path like any other.
    assert_eq!(
        client
            .get(&proxy.url("/metrics"))
            .await
            .header("x-upstream"),
        Some("stable")
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_4xx_and_reach_no_upstream() {
    let up = TestUpstream::start("v1").await;
    let proxy = TestProxy::new()
        .version("v1", &up)
        .route(Route::new("chat", "v1"))
        .start()
        .await;
    let addr = proxy.data_addr();
    let cases: &[(&str, &str)] = &[
        ("GET / HTTP/1.1\r\nConnection: close\r\n\r\n", "400"), // no Host
        ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n", "400"),
        ("GET http://other/ HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", "400"),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
            "",
        ),
    ];
    for (raw, want) in cases {
        let resp = raw_http1(addr, raw.as_bytes()).await;
        if !want.is_empty() {
            assert!(
                resp.starts_with(&format!("HTTP/1.1 {want}")),
                "{raw:?} -> {resp}"
            );
        }
    }
    assert!(
        up.requests().iter().all(|r| r.uri.path() != "/smuggled"),
        "smuggled request reached the upstream"
    );
    let huge_uri = format!(
        "GET /{} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "a".repeat(9000)
    );
    assert!(raw_http1(addr, huge_uri.as_bytes())
        .await
        .starts_with("HTTP/1.1 414"));
    let many: String = (0..120).map(|i| format!("x-h{i}: v\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}Connection: close\r\n\r\n");
    assert!(raw_http1(addr, many.as_bytes())
        .await
        .starts_with("HTTP/1.1 431"));
    assert_eq!(
        up.requests().iter().filter(|r| r.uri.path() != "/").count(),
        0
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_keep_alive_connection_is_closed_gracefully_after_its_request_cap() {
    let up = TestUpstream::start("v1").await;
    let proxy = TestProxy::new()
        .version("v1", &up)
        .route(Route::new("chat", "v1"))
        .start()
        .await;
    let cap = rollgate::proxy::server::MAX_REQUESTS_PER_CONNECTION as usize;
    // More requests than the cap, pipelined on one connection without `Connection: close`:
    // the proxy answers exactly `cap` of them, the last with `Connection: close`, and closes.
    let raw = "GET /v1/x HTTP/1.1\r\nHost: a\r\n\r\n".repeat(cap + 5);
    let out = raw_http1(proxy.data_addr(), raw.as_bytes()).await;
    assert_eq!(
        out.matches("HTTP/1.1 200 OK").count(),
        cap,
        "{}",
        &out[out.len().saturating_sub(400)..]
    );
    let last = &out[out.rfind("HTTP/1.1 200 OK").unwrap()..];
    assert!(
        last.to_ascii_lowercase().contains("connection: close"),
        "{last}"
    );
    assert_eq!(
        out.to_ascii_lowercase()
            .matches("connection: close")
            .count(),
        1
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_stalled_request_body_gets_408_and_never_counts_against_the_version() {
    let up = TestUpstream::start("v1").await;
    let proxy = TestProxy::new()
        .version("v1", &up)
        .route(Route::new("chat", "v1").with("timeouts: {idle: 300ms}"))
        .start()
        .await;
    let addr = proxy.data_addr();
    // Small body (buffered for retries before any upstream connect) and large body (streamed
    // upstream after a 64 KiB prefix): both stall half-way, the connection stays open.
    for (declared, sent) in [(100usize, 10usize), (200_000, 80_000)] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head =
            format!("POST /v1/chat HTTP/1.1\r\nHost: a\r\nContent-Length: {declared}\r\n\r\n");
        tokio::io::AsyncWriteExt::write_all(&mut s, head.as_bytes())
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, &vec![b'x'; sent])
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(
            REQUEST_TIMEOUT,
            tokio::io::AsyncReadExt::read(&mut s, &mut buf),
        )
        .await
        .expect("the proxy answers a stalled body instead of waiting forever")
        .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(
            text.starts_with("HTTP/1.1 408"),
            "{declared}-byte body: {text}"
        );
    }
    assert_eq!(
        up.requests().iter().filter(|r| r.body_complete).count(),
        0,
        "no complete body reached the upstream"
    );
    let errors = proxy
        .metric(
            "rollgate_requests_total",
            &[("version", "v1"), ("classification", "error")],
        )
        .await;
    assert_eq!(
        errors, 0.0,
        "a client's stalled body is not the version's fault"
    );
    let refused = proxy
        .metric(
            "rollgate_requests_total",
            &[
                ("version", "v1"),
                ("code", "408"),
                ("classification", "refused"),
            ],
        )
        .await;
    assert_eq!(
        refused, 2.0,
        "both stalls are counted, as the proxy's refusals"
    );
    proxy.shutdown().await;
}
