//! What a request cut short does to an HTTP/1.1 upstream connection of the pool, through
//! real sockets (from the review of a change to `send_h1` / `send_h2` that was measured
//! and dropped; the HTTP/2 side of that review is in `review_h2pool.rs`):
//!
//! * the client gone before the response head: hyper's answer future and the connection's
//!   sender are dropped with the request, the connection is closed and never put back in
//!   the pool while its request is in flight; the next request gets a new connection;
//! * the client gone after the head: the connection goes with the response body and is
//!   not handed out again half-read.

#[macro_use]
mod support;

use std::time::Duration;

use bytes::Bytes;

use support::raw_upstream::{ok_response, Fault, RawUpstream};
use support::*;

/// Bound on a wait for something that follows at once.
const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// HTTP/1.1
// ---------------------------------------------------------------------------------------

/// The client goes away while its request waits for the upstream's head, three times over
/// a pooled connection: each time the connection it was on is closed (not put back with a
/// request in flight), and the next request is sent on a new connection.
#[tokio::test]
async fn h1_client_gone_before_the_head_never_pools_the_connection_in_flight() {
    let up = RawUpstream::start(Fault::Respond(ok_response("ok"))).await;
    let proxy = TestProxy::to(&up.url()).await;
    let client = TestClient::http1();
    // A pooled connection to begin with: the held request goes on it (send_h1 on a pooled
    // sender), the next ones on new connections (send_h1 from send_fresh).
    let r = client.get(&proxy.url("/v1/first")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.connection_count(), 1);
    for round in 0..3 {
        up.set(Fault::Hold);
        let held_conn = up.connection_count() - 1;
        let before = up.request_count();
        let c = open_get(proxy.data_addr(), "/v1/held").await;
        assert_eventually!(
            up.request_count() == before + 1,
            WAIT,
            "round {round}: the held request never reached the upstream"
        );
        let on = up.requests()[before].conn;
        assert_eq!(
            on, held_conn,
            "round {round}: the pooled connection was not reused"
        );
        drop(c);
        assert_eventually!(
            up.connections()[on].peer_closed,
            WAIT,
            "round {round}: the connection of a request whose client went away is still \
             open ({:?})",
            up.connections()[on]
        );
        up.set(Fault::Respond(ok_response("ok")));
        let r = client.get(&proxy.url("/v1/next")).await;
        assert_eq!(r.status, 200, "round {round}: {}", r.text());
        let next = up.requests().last().unwrap().conn;
        assert_ne!(
            next, on,
            "round {round}: the next request went on the cut connection"
        );
    }
    // Every request was sent once, on its own connection or a pooled idle one.
    assert_eq!(up.request_count(), 1 + 3 * 2);
    assert_eq!(up.connection_count(), 4);
    proxy.shutdown().await;
}

/// The client goes away after the head, with the body half-read: the connection is lent
/// with the body and closed when it is dropped unread, never handed out again.
#[tokio::test]
async fn h1_client_gone_after_the_head_never_pools_the_half_read_connection() {
    let up = RawUpstream::start(Fault::Respond(ok_response("ok"))).await;
    let proxy = TestProxy::to(&up.url()).await;
    let client = TestClient::http1();
    let r = client.get(&proxy.url("/v1/first")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    up.set(Fault::Drip {
        head: Bytes::from_static(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"),
        chunk: Bytes::from_static(b"5\r\nhello\r\n"),
        every: Duration::from_millis(20),
    });
    let mut c = open_get(proxy.data_addr(), "/v1/drip").await;
    read_until(&mut c, b"hello").await;
    let on = up.requests().last().unwrap().conn;
    assert_eq!(on, 0, "the pooled connection was not reused");
    drop(c);
    assert_eventually!(
        !up.connections()[on].open,
        WAIT,
        "the half-read connection is still open: {:?}",
        up.connections()[on]
    );
    up.set(Fault::Respond(ok_response("ok")));
    for _ in 0..3 {
        let r = client.get(&proxy.url("/v1/next")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_ne!(up.requests().last().unwrap().conn, on);
    }
    assert_eq!(up.connection_count(), 2);
    proxy.shutdown().await;
}
