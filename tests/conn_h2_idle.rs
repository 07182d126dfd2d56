//! The h2 idle timeout (`rollgate::proxy::server::H2_IDLE_TIMEOUT`, 5 minutes in
//! production): an h2 connection with no stream open for that long gets a GOAWAY
//! (NO_ERROR) and is closed; a stream in flight, however quiet, keeps it, and the timeout
//! counts from the end of the last stream. Written frame by frame ([`support::h2raw`]) to
//! see the GOAWAY itself.
//!
//! A test binary of its own: the timeout is shortened to [`IDLE`] with
//! `set_h2_idle_timeout_for_tests`, which holds for the whole process and would disturb the
//! h2 tests of `tests/hardening.rs` running in parallel there.

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use support::h2raw::{self, H2Conn};
use support::*;

/// The shortened idle timeout.
const IDLE: Duration = Duration::from_secs(1);
/// Slack for a GOAWAY to arrive after the timeout fired (a loaded CI machine included).
const SLACK: Duration = Duration::from_secs(3);

async fn proxy(up: &TestUpstream) -> TestProxy {
    rollgate::proxy::server::set_h2_idle_timeout_for_tests(IDLE);
    TestProxy::new()
        .version("v1", up)
        .route(Route::new("chat", "v1"))
        .start()
        .await
}

fn get(path: &str) -> Vec<u8> {
    h2raw::request_block("GET", path, Some("rollgate.test"), &[])
}

/// Waits for the idle GOAWAY and the close: returns when the GOAWAY came, after `since`.
async fn idle_goaway(conn: &mut H2Conn, since: Instant, what: &str) -> Duration {
    let goaway = conn.goaway(IDLE + SLACK).await;
    let after = since.elapsed();
    assert_eq!(
        goaway.map(|(code, _)| h2raw::code_name(code)),
        Some("NO_ERROR"),
        "{what}: no GOAWAY NO_ERROR within {:?} (seen: {:?})",
        IDLE + SLACK,
        conn.seen()
    );
    assert!(
        conn.closed(SLACK).await,
        "{what}: the connection stayed open after its GOAWAY"
    );
    after
}

#[tokio::test]
async fn h2_connection_that_opens_no_stream_is_closed_after_the_idle_timeout() {
    let up = TestUpstream::start("v1").await;
    let proxy = proxy(&up).await;
    let start = Instant::now();
    let mut c = H2Conn::connect(proxy.data_addr()).await;
    let after = idle_goaway(&mut c, start, "a connection with no stream").await;
    eprintln!("no stream: GOAWAY after {after:?}");
    assert!(
        after >= IDLE - Duration::from_millis(100),
        "GOAWAY after {after:?}, before the idle timeout {IDLE:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn h2_streams_keep_the_connection_and_idleness_counts_from_the_last_stream() {
    let up = TestUpstream::start("v1").await;
    let proxy = proxy(&up).await;
    let mut c = H2Conn::connect(proxy.data_addr()).await;

    // Requests every IDLE/2 for 2 x IDLE: each one restarts the idle period.
    let mut id = 1;
    let busy_until = Instant::now() + 2 * IDLE;
    while Instant::now() < busy_until {
        c.send(&h2raw::headers(id, &get("/v1/busy"), true, true))
            .await
            .unwrap();
        let out = c.outcome(id, REQUEST_TIMEOUT).await;
        assert_eq!(
            (out.status, out.end_stream, out.goaway.clone()),
            (Some(200), true, None),
            "request {id} on a busy connection: {out:?}"
        );
        id += 2;
        // The client's pace, not a wait for anything.
        tokio::time::sleep(IDLE / 2).await;
    }

    // A response that streams for longer than IDLE, silent between its events: the
    // connection has a stream in flight all along, so it stays.
    up.set(Reply::Sse {
        chunks: 4,
        interval: IDLE * 7 / 10,
    });
    let start = Instant::now();
    c.send(&h2raw::headers(id, &get("/v1/stream"), true, true))
        .await
        .unwrap();
    let out = c.outcome(id, REQUEST_TIMEOUT).await;
    let streamed = start.elapsed();
    assert_eq!(
        (out.status, out.end_stream, out.goaway.clone()),
        (Some(200), true, None),
        "a stream longer than the idle timeout: {out:?}"
    );
    assert_eq!(out.body, sse_body("v1", 4), "the stream was cut short");
    assert!(streamed > IDLE, "the stream took only {streamed:?}");
    assert_eq!(c.seen_goaway(), None, "GOAWAY while streams were in flight");

    // Then, with no stream open, the timeout counts from the end of the last one.
    let ended = Instant::now();
    let after = idle_goaway(&mut c, ended, "a connection whose streams ended").await;
    eprintln!("stream of {streamed:?}, then GOAWAY {after:?} after its end");
    assert!(
        after >= IDLE - Duration::from_millis(200),
        "GOAWAY {after:?} after the last stream ended, before the idle timeout {IDLE:?}"
    );
    proxy.shutdown().await;
}
