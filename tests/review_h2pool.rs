//! Review of the HTTP/2 "streams in flight" accounting of the upstream pool
//! (`src/proxy/client.rs`: `SharedH2::streams`, counted per connection under the pool's
//! `h2` lock by `shared_h2` / `set_h2` and `end_h2_stream`, and the reaper that skips an
//! HTTP/2 connection with streams in flight). `replacement_h2_connection_is_reaped_while_
//! the_old_one_drains` failed on the review's first version, which counted streams per
//! pool: a draining old connection kept the new one from ever being reaped.
//!
//! The upstream here is a plain hyper h2c server that numbers its connections, notes when
//! each one ends (the proxy letting go of it), answers each request on its own stream
//! schedule, and can gracefully shut a connection down (GOAWAY) while a stream on it
//! continues, as an upstream does on a rolling restart. `h2_stream_count_is_given_back_
//! once_on_every_path` came from a later review (of a change to `send_h2` that was
//! dropped): it fails with a lease leaked on cancel or a stream counted down twice.

#[macro_use]
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::net::TcpListener;

/// The pool's idle timeout (`POOL_IDLE_TIMEOUT`).
const POOL_IDLE: Duration = Duration::from_secs(4);
/// Bound on a wait for something that follows at once.
const WAIT: Duration = Duration::from_secs(5);

struct H2Up {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// `/hang` requests seen, and those whose handler was dropped before it answered (the
    /// proxy reset the stream).
    hangs: Arc<AtomicUsize>,
    cancelled: Arc<AtomicUsize>,
    /// Per connection (in accept order): when the server saw it end.
    closed: Arc<Mutex<Vec<Option<Instant>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for H2Up {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// `/long/MS`: 200, a chunk every 100 ms for MS ms, then the end.
/// `/drain/MS`: the same, and the connection is gracefully shut down (GOAWAY) at once;
/// the stream still runs to its end.
/// `/hang`: no answer for a minute (counted in `hangs`, and in `cancelled` when dropped
/// before it answers).
/// `/reset`: the handler fails, so hyper resets the stream before any head.
/// anything else: 200 `ok`.
/// Every response carries `x-conn: N` (0-based accept order).
async fn handle(
    req: Request<Incoming>,
    conn: usize,
    kick: Arc<tokio::sync::Notify>,
    hang: (Arc<AtomicUsize>, Arc<AtomicUsize>),
) -> Result<Response<ChannelBody>, std::io::Error> {
    let path = req.uri().path().to_string();
    let _ = req.into_body().collect().await;
    let stream_for = |ms: u64| {
        let (tx, body) = ChannelBody::channel();
        tokio::spawn(async move {
            let end = tokio::time::Instant::now() + Duration::from_millis(ms);
            let mut i = 0u64;
            while tokio::time::Instant::now() < end {
                if tx
                    .send(Frame::data(Bytes::from(format!("data: {i}\n\n"))))
                    .await
                    .is_err()
                {
                    return;
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        body
    };
    let body = if let Some(ms) = path.strip_prefix("/long/") {
        stream_for(ms.parse().unwrap())
    } else if let Some(ms) = path.strip_prefix("/drain/") {
        kick.notify_one();
        stream_for(ms.parse().unwrap())
    } else if path == "/hang" {
        let (hangs, cancelled) = hang;
        let mut hanging = Hanging(Some(cancelled));
        hangs.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(60)).await;
        hanging.0 = None;
        ChannelBody::from_chunks(["late"])
    } else if path == "/reset" {
        return Err(std::io::Error::other("reset this stream"));
    } else {
        ChannelBody::from_chunks(["ok"])
    };
    Ok(Response::builder()
        .header("x-conn", conn.to_string())
        .body(body)
        .unwrap())
}

/// Counts a `/hang` handler dropped before it answered.
struct Hanging(Option<Arc<AtomicUsize>>);

impl Drop for Hanging {
    fn drop(&mut self) {
        if let Some(cancelled) = &self.0 {
            cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl H2Up {
    async fn start() -> H2Up {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed: Arc<Mutex<Vec<Option<Instant>>>> = Arc::default();
        let (hangs, cancelled) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (accepted2, closed2) = (accepted.clone(), closed.clone());
        let hang = (hangs.clone(), cancelled.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let n = accepted2.fetch_add(1, Ordering::SeqCst);
                closed2.lock().unwrap().push(None);
                let closed = closed2.clone();
                let hang = hang.clone();
                tokio::spawn(async move {
                    let kick = Arc::new(tokio::sync::Notify::new());
                    let svc = {
                        let kick = kick.clone();
                        hyper::service::service_fn(move |req: Request<Incoming>| {
                            handle(req, n, kick.clone(), hang.clone())
                        })
                    };
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = kick.notified() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                    closed.lock().unwrap()[n] = Some(Instant::now());
                });
            }
        });
        H2Up {
            addr,
            accepted,
            hangs,
            cancelled,
            closed,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("h2c://{}", self.addr)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn closed_at(&self, n: usize) -> Option<Instant> {
        self.closed.lock().unwrap().get(n).copied().flatten()
    }

    /// How long after `since` connection 0 was closed; fails when it is still open
    /// `within` after `since` (`what` says why that is wrong).
    async fn first_closed_after(&self, since: Instant, within: Duration, what: &str) -> Duration {
        assert_eventually!(self.closed_at(0).is_some(), within, "{what}");
        self.closed_at(0).unwrap().saturating_duration_since(since)
    }
}

async fn read_to_end(resp: Response<Incoming>) -> Result<Bytes, String> {
    tokio::time::timeout(Duration::from_secs(30), resp.into_body().collect())
        .await
        .map_err(|_| "body not done within 30 s".to_string())?
        .map(|c| c.to_bytes())
        .map_err(|e| format!("{e:?}"))
}

/// Sends `/short` until one is answered on connection 1 (the proxy has seen connection 0's
/// GOAWAY and made a new one), every answer a 200; at most 5 s.
async fn until_on_second_connection(client: &TestClient, proxy: &TestProxy) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = client.get(&proxy.url("/short")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        if r.header("x-conn") == Some("1") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no request reached a new connection within 5 s of the GOAWAY"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The reaper is off while a stream is in flight; the end of the last stream must start
/// it again, so the connection is closed about 4 s later (not earlier, not never).
#[tokio::test]
async fn h2_connection_is_closed_about_4s_after_its_long_stream_ends() {
    let up = H2Up::start().await;
    let proxy = TestProxy::to(&up.url()).await;
    let client = TestClient::http1();
    let resp = client.get_streaming(&proxy.url("/long/5000")).await;
    assert_eq!(resp.status(), 200);
    read_to_end(resp).await.expect("the stream ends cleanly");
    let ended = Instant::now();
    assert!(up.closed_at(0).is_none(), "closed under a stream");
    let after = up
        .first_closed_after(
            ended,
            Duration::from_secs(10),
            "the h2 connection is still open 10 s after its last stream ended",
        )
        .await;
    assert!(
        after >= POOL_IDLE - Duration::from_millis(500),
        "closed {after:?} after its last stream, before the idle timeout"
    );
    assert_eq!(up.accepted(), 1);
    proxy.shutdown().await;
}

/// A client that goes away mid-stream: the response body is dropped, not polled to its
/// end; the stream must still count as ended, or the connection is never reaped.
#[tokio::test]
async fn h2_stream_abandoned_by_the_client_still_lets_the_connection_be_reaped() {
    let up = H2Up::start().await;
    let proxy = TestProxy::to(&up.url()).await;
    {
        let client = TestClient::http1();
        let resp = client.get_streaming(&proxy.url("/long/60000")).await;
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let first = tokio::time::timeout(Duration::from_secs(5), body.frame()).await;
        assert!(matches!(first, Ok(Some(Ok(_)))), "{first:?}");
        // Client gone: body and client dropped here.
    }
    let gone = Instant::now();
    let after = up
        .first_closed_after(
            gone,
            Duration::from_secs(12),
            "the h2 connection is still open 12 s after its only stream's client went away \
             (a stream still counted as in flight?)",
        )
        .await;
    assert!(after < Duration::from_secs(12), "{after:?}");
    proxy.shutdown().await;
}

/// A request given up on before its response head (first-byte timeout): the send future
/// is dropped with the lease inside it.
#[tokio::test]
async fn h2_first_byte_timeout_still_lets_the_connection_be_reaped() {
    let up = H2Up::start().await;
    let proxy = TestProxy::new()
        .version_with("v1", &up.url(), "")
        .route(Route::new("chat", "v1").with("timeouts: {first_byte: 1s}"))
        .start()
        .await;
    let r = TestClient::http1().get(&proxy.url("/hang")).await;
    assert_eq!(r.status, 504, "{}", r.text());
    let timed_out = Instant::now();
    let after = up
        .first_closed_after(
            timed_out,
            Duration::from_secs(10),
            "the h2 connection is still open 10 s after its only request timed out",
        )
        .await;
    assert!(after >= POOL_IDLE - Duration::from_millis(500), "{after:?}");
    proxy.shutdown().await;
}

/// Upstream rolling restart: connection A is shut down gracefully (GOAWAY) while a long
/// stream on it drains. The next request comes back from A unsent and goes on a new
/// connection B, then traffic stops. B is idle from then on and should be closed 4 s
/// later like any idle connection; the in-flight count is the pool's, not B's, so A's
/// draining stream keeps B exempt from the reaper (and hands it out however long idle).
#[tokio::test]
async fn replacement_h2_connection_is_reaped_while_the_old_one_drains() {
    let up = H2Up::start().await;
    let proxy = TestProxy::to(&up.url()).await;
    let client = TestClient::http1();
    let resp = client.get_streaming(&proxy.url("/drain/15000")).await;
    assert_eq!(resp.status(), 200);
    let draining = tokio::spawn(read_to_end(resp));
    // A new connection after the GOAWAY.
    until_on_second_connection(&client, &proxy).await;
    let idle_since = Instant::now();
    assert!(!draining.is_finished(), "A's stream still runs");
    let deadline = POOL_IDLE + Duration::from_secs(3);
    let mut closed = None;
    while idle_since.elapsed() < deadline {
        if let Some(at) = up.closed_at(1) {
            closed = Some(at.saturating_duration_since(idle_since));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let still_draining = !draining.is_finished();
    draining.abort();
    proxy.shutdown().await;
    assert!(
        closed.is_some(),
        "connection B idle for {deadline:?} is still open (A's stream still draining: \
         {still_draining}); idle timeout is {POOL_IDLE:?}"
    );
}

/// Same restart, shorter drain: once everything has ended, both connections are closed
/// (no stream left counted, in particular not the request that came back unsent from the
/// GOAWAY'd connection and was sent again on the new one).
#[tokio::test]
async fn after_a_goaway_drain_every_connection_is_closed_once_traffic_stops() {
    let up = H2Up::start().await;
    let proxy = TestProxy::to(&up.url()).await;
    let client = TestClient::http1();
    let resp = client.get_streaming(&proxy.url("/drain/2000")).await;
    assert_eq!(resp.status(), 200);
    let draining = tokio::spawn(read_to_end(resp));
    until_on_second_connection(&client, &proxy).await;
    for _ in 0..3 {
        let r = client.get(&proxy.url("/short")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-conn"), Some("1"));
    }
    draining.await.unwrap().expect("A's stream drains cleanly");
    let ended = Instant::now();
    assert_eventually!(
        up.closed_at(0).is_some() && up.closed_at(1).is_some(),
        Duration::from_secs(10),
        "10 s after the last stream: A closed {:?}, B closed {:?}",
        up.closed_at(0).map(|t| t.saturating_duration_since(ended)),
        up.closed_at(1).map(|t| t.saturating_duration_since(ended))
    );
    assert_eq!(up.accepted(), 2);
    proxy.shutdown().await;
}

/// Overlapping streams so the in-flight count never reaches 0 for longer than the idle
/// timeout, on one connection; then a request: the same connection (nothing reaped while
/// in use), and, once all is over, it is closed.
#[tokio::test]
async fn overlapping_h2_streams_keep_one_connection_then_it_is_reaped() {
    let up = H2Up::start().await;
    let proxy = TestProxy::to(&up.url()).await;
    let client = TestClient::http1();
    let mut streams = Vec::new();
    for _ in 0..4 {
        let resp = client.get_streaming(&proxy.url("/long/2500")).await;
        assert_eq!(resp.status(), 200);
        streams.push(tokio::spawn(read_to_end(resp)));
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    for s in streams {
        s.await.unwrap().expect("stream ends cleanly");
    }
    let r = client.get(&proxy.url("/short")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        up.accepted(),
        1,
        "one connection for ~7 s of overlapping streams"
    );
    let ended = Instant::now();
    let after = up
        .first_closed_after(
            ended,
            Duration::from_secs(10),
            "the h2 connection is still open 10 s after the overlapping streams ended",
        )
        .await;
    assert!(after >= POOL_IDLE - Duration::from_millis(500), "{after:?}");
    proxy.shutdown().await;
}

/// While one long stream runs on the shared h2 connection, other requests on it end every
/// way a stream can before and after its head: cut by their client before the head (three
/// times), reset by the upstream before the head (twice), answered and read to the end
/// (three times). Each must give its place in the count back once: the connection stays
/// in use (not reaped, not replaced) until the long stream ends, and is closed about the
/// idle timeout after that, neither earlier nor never.
#[tokio::test]
async fn h2_stream_count_is_given_back_once_on_every_path() {
    let up = H2Up::start().await;
    let proxy = TestProxy::to(&up.url()).await;
    let client = TestClient::http1();

    let long = client.get_streaming(&proxy.url("/long/6000")).await;
    assert_eq!(long.status(), 200);
    let long = tokio::spawn(read_to_end(long));

    // Cut by the client before the head: hyper's answer future is dropped (the upstream
    // sees its stream reset), and the stream's lease with it.
    for i in 0..3 {
        let c = open_get(proxy.data_addr(), "/hang").await;
        assert_eventually!(
            up.hangs.load(Ordering::SeqCst) == i + 1,
            WAIT,
            "hang {i} never reached the upstream"
        );
        drop(c);
        assert_eventually!(
            up.cancelled.load(Ordering::SeqCst) == i + 1,
            WAIT,
            "hang {i}: the client went away and the upstream stream was not reset"
        );
    }
    // Reset by the upstream before the head: an error answer, its lease dropped in settle.
    for _ in 0..2 {
        let r = client.get(&proxy.url("/reset")).await;
        assert!(r.status.is_server_error(), "{} {}", r.status, r.text());
    }
    // Answered and read to the end.
    for _ in 0..3 {
        let r = client.get(&proxy.url("/short")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "ok");
    }
    assert!(
        !long.is_finished(),
        "the long stream ended too early for the test"
    );
    long.await
        .unwrap()
        .expect("the long stream runs to its end");
    let ended = Instant::now();
    assert_eq!(
        up.accepted(),
        1,
        "a second connection: the shared one was dropped or replaced while in use"
    );
    assert!(up.closed_at(0).is_none(), "closed under its long stream");
    let after = up
        .first_closed_after(
            ended,
            POOL_IDLE * 2 + Duration::from_secs(2),
            "the h2 connection is still open 10 s after its last stream ended: a stream \
             still counted in flight, or one given back twice (the count wrapped)",
        )
        .await;
    assert!(
        after >= POOL_IDLE - Duration::from_millis(500),
        "closed {after:?} after its last stream ended, before the idle timeout: the count \
         reached zero early"
    );
    proxy.shutdown().await;
}
