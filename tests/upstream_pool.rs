//! The upstream connection pool (`src/proxy/client.rs`): an HTTP/1.1 connection comes back
//! to its pool when its response ends and is reused, so a connection serves request after
//! request and concurrent requests need one connection each, no more; a connection whose
//! response was cut short is never handed out again; an HTTP/2 upstream gets one
//! connection, even when a burst of requests arrives before it exists.

#[macro_use]
mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;
use support::raw_upstream::{ok_response, Fault, RawUpstream};
use support::redis::free_port;
use support::*;

#[tokio::test]
async fn sequential_requests_share_one_upstream_connection() {
    let up = RawUpstream::start(Fault::Respond(ok_response("ok"))).await;
    let proxy = TestProxy::to(&up.url()).await;
    let client = TestClient::http1();
    for i in 0..200 {
        let req = if i % 2 == 0 {
            request(Method::GET, &proxy.url("/v1/get"))
                .body(empty())
                .unwrap()
        } else {
            request(Method::POST, &proxy.url("/v1/post"))
                .header("content-type", "application/json")
                .body(full(format!("{{\"n\":{i}}}")))
                .unwrap()
        };
        let r = client.send(req).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    assert_eq!(up.request_count(), 200);
    assert_eq!(
        up.connection_count(),
        1,
        "200 requests one after another took {} upstream connections",
        up.connection_count()
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn concurrent_requests_need_one_connection_each_and_no_more() {
    let up = RawUpstream::start(Fault::Respond(ok_response("ok"))).await;
    let proxy = TestProxy::to(&up.url()).await;
    const CLIENTS: usize = 16;
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let url = proxy.url("/v1/load");
        tasks.spawn(async move {
            let client = TestClient::http1();
            for i in 0..25 {
                let r = client.get(&url).await;
                assert_eq!(r.status, 200, "client {c} request {i}: {}", r.text());
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    assert_eq!(up.request_count(), CLIENTS * 25);
    assert!(
        up.connection_count() <= CLIENTS,
        "{CLIENTS} concurrent clients took {} upstream connections",
        up.connection_count()
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_connection_whose_response_was_cut_short_is_not_reused() {
    let up = RawUpstream::start(Fault::Drip {
        head: Bytes::from_static(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n"),
        chunk: Bytes::from_static(b"data"),
        every: Duration::from_millis(20),
    })
    .await;
    let proxy = TestProxy::to(&up.url()).await;
    let client = TestClient::http1();
    // The client reads the head and a little of the body, then goes away.
    let resp = client.get_streaming(&proxy.url("/v1/drip")).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.expect("a first frame").expect("data");
    assert!(first.is_data());
    drop(body);
    drop(client);
    // The half-read connection is closed, not put back for the next request.
    assert_eventually!(
        up.open_connections() == 0,
        Duration::from_secs(5),
        "the connection whose response was cut short stays open: {} open",
        up.open_connections()
    );
    up.set(Fault::Respond(ok_response("ok")));
    for i in 0..5 {
        let r = TestClient::http1().get(&proxy.url("/v1/after")).await;
        assert_eq!(r.status, 200, "request {i} after the cut: {}", r.text());
    }
    assert_eq!(
        up.connection_count(),
        2,
        "one connection for the cut response, one for the five after it"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_h2c_upstream_gets_one_connection_even_for_a_first_burst() {
    let up = TestUpstream::start("v1").await;
    up.set_delay(Duration::from_millis(50));
    let proxy = TestProxy::to(&up.h2c_url()).await;
    // 64 requests at once, before any upstream connection exists.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64 {
        let url = proxy.url("/v1/burst");
        tasks.spawn(async move {
            let r = TestClient::http1().get(&url).await;
            assert_eq!(r.status, 200, "request {i}: {}", r.text());
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    for i in 0..20 {
        let r = TestClient::http1().get(&proxy.url("/v1/after")).await;
        assert_eq!(r.status, 200, "request {i} after the burst: {}", r.text());
    }
    assert_eq!(
        up.connections(),
        1,
        "84 requests to an h2c upstream took {} connections",
        up.connections()
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn requests_behind_a_failed_h2c_connect_get_502_and_a_later_request_connects() {
    let port = free_port();
    let proxy = TestProxy::to(&format!("h2c://127.0.0.1:{port}")).await;
    // Nothing listens yet: the first connect is refused and the requests queued behind it
    // share its failure.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let url = proxy.url("/v1/refused");
        tasks.spawn(async move { TestClient::http1().get(&url).await.status });
    }
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.unwrap(), 502);
    }
    // The upstream comes up on that port: the failure is not remembered.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(full("up")))
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
            });
        }
    });
    let r = TestClient::http1().get(&proxy.url("/v1/up")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "up");
    server.abort();
    proxy.shutdown().await;
}
