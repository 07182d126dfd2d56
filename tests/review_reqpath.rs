//! Review of the request-path performance change (one `handle`, the attempt inlined in
//! `Exchange::run`, `FirstByte` instead of `select!`, eager `try_send_request`, the lazily
//! re-armed response idle timer, one pinned stop future in `drive`). Behaviour must be the
//! same as before; each test pins down one path the change touched, over real sockets.

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use http_body::Frame;
use http_body_util::BodyExt;
use support::h2raw::{self, H2Conn};
use support::raw_upstream::{ok_response, Fault, RawUpstream};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(5);

async fn set_fault(proxy: &TestProxy, json: &str) {
    let r = proxy.admin_post("/api/v1/faults", json).await;
    assert_eq!(r.status, 200, "POST /api/v1/faults: {}", r.text());
}

/// A chunked (streamed) request body: `chunks` are queued at once, then the body ends.
fn streamed(chunks: &[&'static str]) -> ReqBody {
    ChannelBody::from_chunks(chunks.iter().map(|c| Bytes::from_static(c.as_bytes()))).boxed()
}

/// Injected latency, then an injected failure, then the retry on the baseline: the body is
/// taken for the attempt after the delay now (before it, previously). The retry must still
/// get the whole streamed body, the baseline's own headers and the client's request id,
/// and the canary nothing.
#[tokio::test]
async fn review_injected_delay_then_failure_retries_the_whole_streamed_body() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let proxy = TestProxy::new()
        .version_with("stable", &stable.http_url(), "set_headers: {x-prompt: s1}")
        .version_with("canary", &canary.http_url(), "set_headers: {x-prompt: c1}")
        .route(Route::new("chat", "stable").split(&[("stable", 100), ("canary", 0)]))
        .start()
        .await;
    set_fault(
        &proxy,
        r#"{"version": "canary", "error_rate": 1.0, "latency": "200ms", "duration": "60s"}"#,
    )
    .await;
    let t = Instant::now();
    let r = TestClient::http1()
        .send(
            request(Method::POST, &proxy.url("/v1/chat"))
                .header("x-rollgate-version", "canary")
                .header("x-test-id", "t1")
                .header("x-request-id", "rid-1")
                .header("content-type", "application/json")
                .body(streamed(&["{\"a\":", "1,", "\"b\":2}"]))
                .unwrap(),
        )
        .await;
    let took = t.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.version(), Some("stable"));
    assert_eq!(r.retried_from(), Some("canary"));
    assert_eq!(r.header("x-request-id"), Some("rid-1"));
    assert!(
        took >= Duration::from_millis(190),
        "the injected delay was skipped: {took:?}"
    );
    assert_eq!(
        canary.request_count(),
        0,
        "an injected fault reached the canary"
    );
    let got = stable.requests_with_id("t1");
    assert_eq!(got.len(), 1, "{got:#?}");
    assert!(got[0].body_complete, "{:?}", got[0]);
    assert_eq!(&got[0].body[..], b"{\"a\":1,\"b\":2}");
    assert_eq!(got[0].header("x-prompt").as_deref(), Some("s1"));
    assert_eq!(got[0].header_all("x-prompt").len(), 1);
    assert_eq!(got[0].header("x-request-id").as_deref(), Some("rid-1"));
    assert_eq!(
        proxy
            .metric(
                "rollgate_upstream_errors_total",
                &[("version", "canary"), ("kind", "5xx")]
            )
            .await,
        1.0
    );
    assert_eq!(proxy.classified("stable", "success").await, 1.0);
    proxy.shutdown().await;
}

/// A retried 5xx with a streamed body and per-version `set_headers`: the first attempt's
/// headers are a copy, so the canary's headers never leak into the retry, and both
/// attempts get the whole body.
#[tokio::test]
async fn review_a_5xx_retry_replays_the_body_with_the_retry_targets_headers_only() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    canary.set(Reply::Status(503));
    let proxy = TestProxy::new()
        .version_with("stable", &stable.http_url(), "")
        .version_with("canary", &canary.http_url(), "set_headers: {x-prompt: c1}")
        .route(Route::new("chat", "stable").split(&[("stable", 100), ("canary", 0)]))
        .start()
        .await;
    let r = TestClient::http1()
        .send(
            request(Method::POST, &proxy.url("/v1/chat"))
                .header("x-rollgate-version", "canary")
                .header("x-test-id", "t2")
                .body(streamed(&["hello ", "streamed ", "world"]))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.version(), Some("stable"));
    assert_eq!(r.retried_from(), Some("canary"));
    let c = canary.requests_with_id("t2");
    let s = stable.requests_with_id("t2");
    assert_eq!((c.len(), s.len()), (1, 1));
    assert_eq!(&c[0].body[..], b"hello streamed world");
    assert_eq!(&s[0].body[..], b"hello streamed world");
    assert!(c[0].body_complete && s[0].body_complete);
    assert_eq!(c[0].header("x-prompt").as_deref(), Some("c1"));
    assert_eq!(
        s[0].header("x-prompt"),
        None,
        "the canary's set_headers leaked into the retry"
    );
    assert_eq!(
        c[0].header("x-request-id"),
        s[0].header("x-request-id"),
        "one request id for both attempts"
    );
    proxy.shutdown().await;
}

/// A client that resets its h2 stream while the request waits out an injected delay: the
/// request future is dropped inside the delay, nothing reaches the upstream, the in-flight
/// slot (`max_in_flight: 1`) comes back, and the request is a client abort.
#[tokio::test]
async fn review_a_client_gone_during_an_injected_delay_sends_nothing_and_frees_its_slot() {
    let stable = TestUpstream::start("stable").await;
    // Holds forever: a request that got through after the delay would keep the slot.
    let canary = RawUpstream::start(Fault::Hold).await;
    let proxy = TestProxy::new()
        .top("max_in_flight: 1")
        .version_with("stable", &stable.http_url(), "")
        .version_with("canary", &canary.url(), "")
        .route(Route::new("chat", "stable").split(&[("stable", 100), ("canary", 0)]))
        .start()
        .await;
    set_fault(
        &proxy,
        r#"{"version": "canary", "error_rate": 0.0, "latency": "1500ms", "duration": "60s"}"#,
    )
    .await;
    let h2 = H2Conn::connect(proxy.data_addr()).await;
    let block = h2raw::request_block(
        "GET",
        "/v1/chat",
        Some("a"),
        &[("x-rollgate-version", "canary")],
    );
    h2.send(&h2raw::headers(1, &block, true, true))
        .await
        .unwrap();
    let client = TestClient::http1();
    // The held request takes the only slot: a second one is shed.
    assert_eventually!(
        client.get(&proxy.url("/v1/probe")).await.status == 503,
        WAIT,
        "the delayed request never took the in-flight slot"
    );
    h2.send(&h2raw::rst_stream(1, h2raw::CANCEL)).await.unwrap();
    let t = Instant::now();
    assert_eventually!(
        client.get(&proxy.url("/v1/probe")).await.status == 200,
        WAIT,
        "the slot of a request dropped in its injected delay never came back"
    );
    assert!(
        t.elapsed() < Duration::from_millis(1400),
        "the slot came back only after the delay: {:?}",
        t.elapsed()
    );
    // Past the end of the delay: the dropped request never reaches the canary.
    assert_always!(canary.request_count() == 0, Duration::from_millis(1700));
    assert_eventually!(
        proxy.classified("canary", "client_abort").await == 1.0,
        WAIT
    );
    assert_eq!(proxy.classified("canary", "error").await, 0.0);
    proxy.shutdown().await;
}

/// The first-byte timer after a slow streamed upload (the `FirstByte` future's timer side
/// with `sent`): a body that takes longer than `first_byte` to arrive is not timed out, the
/// timer runs from its end, and an upstream that never answers gets 504 `first_byte` after
/// it, with the whole body delivered.
#[tokio::test]
async fn review_first_byte_runs_from_the_end_of_a_slow_upload() {
    let up = RawUpstream::start(Fault::Hold).await;
    let proxy = TestProxy::new()
        .version_with("m", &up.url(), "")
        .route(Route::new("r", "m").with("timeouts: {first_byte: 300ms, idle: 5s}"))
        .start()
        .await;
    let (tx, body) = ChannelBody::channel();
    let feeder = tokio::spawn(async move {
        for i in 0..6 {
            let part = Frame::data(Bytes::from(format!("part-{i};")));
            if tx.send(part).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Instant::now()
    });
    let r = TestClient::http1()
        .send(
            request(Method::POST, &proxy.url("/v1/x"))
                .body(body.boxed())
                .unwrap(),
        )
        .await;
    let answered = Instant::now();
    let body_end = feeder.await.unwrap();
    assert_eq!(r.status, 504, "{}", r.text());
    // The upload took ~600 ms, twice first_byte: the timer ran from its end.
    let after_end = answered.saturating_duration_since(body_end);
    assert!(
        after_end >= Duration::from_millis(250),
        "504 {after_end:?} after the body ended (first_byte is 300 ms)"
    );
    let reqs = up.requests();
    assert_eq!(reqs.len(), 1);
    assert!(
        reqs[0].complete,
        "the body did not reach the upstream in full"
    );
    assert_eq!(
        reqs[0].body,
        b"part-0;part-1;part-2;part-3;part-4;part-5;".to_vec()
    );
    assert_eq!(proxy.classified("m", "error").await, 1.0);
    // An upstream that answers within first_byte of the body's end is not timed out,
    // however long the upload took.
    up.set(Fault::DelayFirstByte(Duration::from_millis(100)));
    let (tx, body) = ChannelBody::channel();
    tokio::spawn(async move {
        for i in 0..6 {
            tx.send(Frame::data(Bytes::from(format!("p{i}"))))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let r = TestClient::http1()
        .send(
            request(Method::POST, &proxy.url("/v1/y"))
                .body(body.boxed())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "late");
    proxy.shutdown().await;
}

/// The lazily re-armed response idle timer over h2 and full duplex: a gRPC bidirectional
/// stream whose messages keep coming for many times `idle` is never cut and ends with its
/// trailers; one where both sides then go quiet is cut `idle` after the last message and
/// counted as the client's (whoever spoke last waits for the other), not the version's.
#[tokio::test]
async fn review_full_duplex_streams_longer_than_idle_are_not_cut_and_a_quiet_one_is() {
    let up = TestUpstream::start("triton").await;
    up.set(Reply::Echo);
    let proxy = TestProxy::new()
        .version_with("triton", &up.h2c_url(), "")
        .route(Route::new("infer", "triton").with("timeouts: {first_byte: 5s, idle: 300ms}"))
        .start()
        .await;
    let open = |tx_body: ChannelBody| {
        request(
            Method::POST,
            &proxy.url("/inference.GRPCInferenceService/ModelStreamInfer"),
        )
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tx_body.boxed())
        .unwrap()
    };
    // 12 round trips 100 ms apart: 1.2 s, four times the idle timeout.
    let (tx, body) = ChannelBody::channel();
    let resp = TestClient::h2c().send_streaming(open(body)).await;
    assert_eq!(resp.status(), 200);
    let mut rx = resp.into_body();
    for i in 0..12u8 {
        tx.send(Frame::data(grpc_frame(&[i]))).await.unwrap();
        let f = tokio::time::timeout(WAIT, rx.frame())
            .await
            .expect("an echo within 5 s")
            .expect("the stream ended early")
            .unwrap_or_else(|e| panic!("round trip {i}: cut mid-stream: {e:?}"));
        assert_eq!(f.into_data().unwrap(), grpc_frame(&[i]));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(tx);
    let mut trailers = None;
    while let Some(f) = tokio::time::timeout(WAIT, rx.frame()).await.expect("end") {
        let f = f.expect("clean end");
        if let Ok(t) = f.into_trailers() {
            trailers = Some(t);
        }
    }
    assert_eq!(
        trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
    assert_eventually!(proxy.classified("triton", "success").await == 1.0, WAIT);

    // Both sides quiet after two round trips: cut about `idle` after the last message.
    let (tx, body) = ChannelBody::channel();
    let resp = TestClient::h2c().send_streaming(open(body)).await;
    let mut rx = resp.into_body();
    let mut last = Instant::now();
    for i in 0..2u8 {
        tx.send(Frame::data(grpc_frame(&[i]))).await.unwrap();
        tokio::time::timeout(WAIT, rx.frame())
            .await
            .expect("an echo")
            .expect("open")
            .expect("frame");
        last = Instant::now();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ended = loop {
        match tokio::time::timeout(WAIT, rx.frame()).await {
            Err(_) => panic!("a quiet full-duplex stream was never cut"),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_))) | Ok(None) => break last.elapsed(),
        }
    };
    assert!(
        ended >= Duration::from_millis(250),
        "cut {ended:?} after the last message"
    );
    drop(tx);
    assert_eventually!(
        proxy.classified("triton", "client_abort").await == 1.0,
        WAIT
    );
    assert_eq!(proxy.classified("triton", "error").await, 0.0);
    proxy.shutdown().await;
}

/// One response of a keep-alive HTTP/1.1 connection with a `Content-Length` body: (status
/// line, head, body).
async fn read_one(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> (String, String) {
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .expect("a content-length");
            if buf.len() >= end + 4 + len {
                let status = head.lines().next().unwrap().to_string();
                buf.drain(..end + 4 + len);
                return (status, head);
            }
        }
        let n = tokio::time::timeout(WAIT, s.read(&mut tmp))
            .await
            .expect("response within 5 s")
            .unwrap();
        assert!(n > 0, "connection closed mid-response");
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// The stop future `drive` now pins once per connection must still fire after the
/// connection has been woken many times: an HTTP/1.1 keep-alive connection that served 30
/// requests answers its in-flight one with `Connection: close` when the listener stops,
/// an idle one that served 30 is closed at once (well before `drain_timeout`), and an h2
/// connection that carried 30 streams gets its GOAWAY.
#[tokio::test]
async fn review_stop_reaches_connections_that_were_woken_many_times() {
    let up = RawUpstream::start(Fault::Respond(ok_response("ok"))).await;
    let proxy = TestProxy::to(&up.url()).await;
    let addr = proxy.data_addr();

    let mut busy = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut busy_buf, mut idle_buf) = (Vec::new(), Vec::new());
    for _ in 0..30 {
        for (s, b) in [(&mut busy, &mut busy_buf), (&mut idle, &mut idle_buf)] {
            s.write_all(b"GET /v1/a HTTP/1.1\r\nHost: a\r\n\r\n")
                .await
                .unwrap();
            let (status, head) = read_one(s, b).await;
            assert!(status.contains(" 200 "), "{status}");
            assert!(!head.contains("connection: close"), "{head}");
        }
    }
    let mut h2 = H2Conn::connect(addr).await;
    for i in 0..30u32 {
        let id = 1 + 2 * i;
        let block = h2raw::request_block("GET", "/v1/h2", Some("a"), &[]);
        h2.send(&h2raw::headers(id, &block, true, true))
            .await
            .unwrap();
        let out = h2.outcome(id, WAIT).await;
        assert_eq!(out.status, Some(200), "stream {id}: {out:?}");
    }
    assert!(h2.seen_goaway().is_none());

    // One request in flight on `busy` when the listener stops.
    up.set(Fault::DelayFirstByte(Duration::from_millis(700)));
    let before = up.request_count();
    busy.write_all(b"GET /v1/slow HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert_eventually!(up.request_count() == before + 1, WAIT);
    let stopped = Instant::now();
    let stop = tokio::spawn(proxy.shutdown());

    // The idle h1 connection closes at once.
    let mut tmp = [0u8; 64];
    let n = tokio::time::timeout(WAIT, idle.read(&mut tmp))
        .await
        .expect("the idle connection stayed open")
        .unwrap_or(0);
    assert_eq!(n, 0, "unexpected bytes on the idle connection");
    assert!(
        stopped.elapsed() < Duration::from_millis(1500),
        "idle h1 connection closed only after {:?} (drain_timeout is 2 s)",
        stopped.elapsed()
    );
    // The h2 connection gets a GOAWAY.
    let g = h2.goaway(Duration::from_millis(1500)).await;
    assert!(
        g.is_some(),
        "no GOAWAY within 1.5 s of the stop; events: {:?}",
        h2.seen()
    );
    // The in-flight h1 response says the connection closes.
    let (status, head) = read_one(&mut busy, &mut busy_buf).await;
    assert!(status.contains(" 200 "), "{status}");
    assert!(head.contains("connection: close"), "{head}");
    stop.await.unwrap();
}
