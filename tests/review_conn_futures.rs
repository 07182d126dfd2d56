//! From a hostile review of ac730dc / d514600 (futures that held their connection twice:
//! the upstream connection's task a `Driven` future, `drive` polling hyper's server
//! connection through a box of its own, the h2 sniff boxed while it runs).
//!
//! * `drive` takes the boxed connection as an argument now, so it is dropped with the
//!   arguments, after `life` (the drain's token); before, the pinned local was dropped
//!   first. Whatever hyper's connection still owns when it ends (an in-flight request's
//!   service future, cut by a client that went away during the drain) is now torn down
//!   after the drain has been told the connection is gone. Shown through
//!   `server::serve` itself, on a multi-thread runtime (the `Inline` data plane's, the
//!   admin's and the health listener's), with a request state whose drop is slow and wakes
//!   another task, as a real one does (its access-log line, its metrics).
//!   `the_drain_ends_only_after_what_a_cut_connection_held_is_dropped` passes at ac730dc
//!   and fails from d514600 on.
//! * `Driven` logs as the `async move` block did: a line for an upstream connection that
//!   ends in an error, none for one that ends cleanly (passes before and after).

#[macro_use]
mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, Response};
use rollgate::proxy::body::RespBody;
use rollgate::proxy::server::{self, Plane};
use support::raw_upstream::{ok_response, Fault, RawUpstream};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

// ---------------------------------------------------------------------------------------
// The drain's token and hyper's connection: which goes first.
// ---------------------------------------------------------------------------------------

/// An in-flight request's state whose drop takes a while and wakes another task on the
/// way, like a real request's (`Recording` closing as `ClientGone`: metrics, the
/// access-log line handed to its writer). `done` is set once the drop has finished.
struct RequestState {
    done: Arc<AtomicBool>,
    wake: Arc<Notify>,
}

impl Drop for RequestState {
    fn drop(&mut self) {
        self.wake.notify_one();
        std::thread::sleep(Duration::from_millis(300));
        self.done.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_ends_only_after_what_a_cut_connection_held_is_dropped() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    let done = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(Notify::new());
    let started = Arc::new(Notify::new());
    // The task the request's drop wakes (an access-log writer, say).
    let woken = {
        let wake = wake.clone();
        tokio::spawn(async move { wake.notified().await })
    };
    let handler = {
        let (done, wake, started) = (done.clone(), wake.clone(), started.clone());
        move |_peer: SocketAddr, _tls: bool, _req: Request<Incoming>| {
            let state = RequestState {
                done: done.clone(),
                wake: wake.clone(),
            };
            started.notify_one();
            async move {
                let _state = state;
                // The upstream never answers.
                std::future::pending::<Response<RespBody>>().await
            }
        }
    };
    let serving = tokio::spawn(server::serve(
        listener,
        None,
        handler,
        Arc::new(|| Duration::from_secs(60)),
        stop_rx,
        Duration::from_secs(10),
        Plane::Control,
    ));

    let mut client = TcpStream::connect(addr).await.unwrap();
    client
        .write_all(b"GET /slow HTTP/1.1\r\nHost: rollgate.test\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(REQUEST_TIMEOUT, started.notified())
        .await
        .expect("the request never reached the handler");

    // The drain starts; the request in flight keeps the connection (h1: it will be answered
    // with `Connection: close`).
    stop_tx.send(true).unwrap();
    assert_always!(
        !serving.is_finished(),
        Duration::from_millis(200),
        "the drain ended with a request in flight"
    );

    // The client goes away: hyper ends the connection, and its in-flight request with it.
    drop(client);
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("the drain did not end after the last connection was cut")
        .unwrap();
    assert!(
        done.load(Ordering::SeqCst),
        "serve's drain returned while the cut connection's in-flight request state was \
         still being dropped: the connection's drain token went before hyper's connection"
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), woken).await;
}

// ---------------------------------------------------------------------------------------
// Driven: the log line at an upstream connection's end.
// ---------------------------------------------------------------------------------------

/// Everything the process logs at debug level, as text.
fn captured() -> &'static Mutex<Vec<u8>> {
    static LOG: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    static INIT: OnceLock<()> = OnceLock::new();
    let log = LOG.get_or_init(|| Mutex::new(Vec::new()));
    INIT.get_or_init(|| {
        struct W;
        impl Write for W {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                captured().lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(|| W)
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
    });
    log
}

fn lines_with(needle: &str) -> Vec<String> {
    let text = String::from_utf8_lossy(&captured().lock().unwrap()).into_owned();
    text.lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

const H1_END: &str = "upstream HTTP/1.1 connection ended";

#[tokio::test]
async fn an_upstream_connection_logs_its_error_and_nothing_when_it_ends_cleanly() {
    captured();

    // Ends cleanly: the upstream answers in full and closes; hyper's connection is Ok.
    let clean = RawUpstream::start(Fault::RespondAndClose(ok_response("bye"))).await;
    let proxy = TestProxy::to(&clean.url()).await;
    let r = TestClient::http1().get(&proxy.url("/a")).await;
    assert_eq!(r.status, 200);
    assert_eventually!(
        clean.open_connections() == 0,
        REQUEST_TIMEOUT,
        "the upstream connection stays open"
    );
    assert_always!(
        lines_with(H1_END).is_empty(),
        Duration::from_millis(200),
        "a clean end was logged: {:?}",
        lines_with(H1_END)
    );
    proxy.shutdown().await;

    // Ends in an error: bytes after the response, on a connection with no request out
    // (hyper's client: "unexpected message"; an error while a request waits for its answer
    // goes to that request instead, and the connection ends Ok).
    let mut answer = ok_response("ok").to_vec();
    answer.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
    let broken = RawUpstream::start(Fault::Respond(Bytes::from(answer))).await;
    let proxy = TestProxy::to(&broken.url()).await;
    let _ = TestClient::http1()
        .try_send(
            request(http::Method::GET, &proxy.url("/b"))
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eventually!(
        lines_with(H1_END).len() == 1,
        REQUEST_TIMEOUT,
        "no single error line for the broken upstream connection: {:?}; logged: {}",
        lines_with(H1_END),
        lines_with("").join("\n")
    );
    let line = &lines_with(H1_END)[0];
    assert!(line.contains("DEBUG") && line.contains("error="), "{line}");
    proxy.shutdown().await;
}
