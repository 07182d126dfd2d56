//! Review of 00acb3c (access-log lines for request heads hyper refuses): which connections
//! get a line, and what the line says.

#[macro_use]
mod support;

use std::time::{Duration, SystemTime};

use serde_json::Value;
use support::certs::{write_tls_files, TestCa};
use support::h2raw::{self, H2Conn};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The access log is the process's: one proxy with a log at a time.
static PROCESS_LOG: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A proxy with an access log in front of one upstream, and the process's log to itself.
async fn logged_proxy() -> (
    tokio::sync::MutexGuard<'static, ()>,
    TestUpstream,
    TestProxy,
) {
    let guard = PROCESS_LOG.lock().await;
    let up = TestUpstream::start("v1").await;
    let proxy = proxy_with_access_log(&up, None).await;
    (guard, up, proxy)
}

/// Flushes and returns the lines once there are at least `n`; then checks for 400 ms that
/// no more arrive.
async fn settled_lines(proxy: &TestProxy, n: usize) -> Vec<Value> {
    let path = proxy.config_dir().join("access.log");
    proxy.access_lines(&path, n).await;
    let log = proxy
        .running()
        .reloader
        .access_log()
        .expect("access log on");
    assert_always!(
        {
            log.flush().await;
            json_lines(&path).len() == n
        },
        Duration::from_millis(400),
        "lines: {:#?}",
        json_lines(&path)
    );
    json_lines(&path)
}

async fn read_all<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

const BAD_TARGET: &[u8] = b"GET /v1/a b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";

/// SPEC 7's access log is the data plane's ("one JSON object per request" proxied); the
/// admin listener writes no lines for its requests. But `server::serve` also serves the
/// admin (and health) listener, so a malformed head sent to the admin port is written to
/// the data plane's access log as a `refused` request with `route: null`, which nobody can
/// tell apart from a data-plane one.
#[tokio::test]
async fn a_malformed_head_on_the_admin_port_writes_no_data_plane_access_line() {
    let (_g, _up, proxy) = logged_proxy().await;
    // A well-formed admin request: no line (as before the change).
    let ok = TestClient::http1().get(&proxy.admin_url("/healthz")).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let answer = raw_http1(proxy.admin_addr(), BAD_TARGET).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // One data-plane request so the count is exact.
    let r = TestClient::http1().get(&proxy.url("/v1/ok")).await;
    assert_eq!(r.status, 200);
    let got = settled_lines(&proxy, 1).await;
    assert_eq!(
        got.len(),
        1,
        "admin port traffic in the data access log: {got:#?}"
    );
    proxy.shutdown().await;
}

/// Where an unparsable head began is not known to rollgate (hyper reports the refusal when
/// the connection ends, and recording every head's first byte would cost a clock read per
/// request): the line's `start_time` is when hyper refused the head, and `duration_ms` 0,
/// as `AccessEntry::unparsed` documents. A head trickled over 1.5 s is logged at its end,
/// not at its first byte, and not at some other time.
#[tokio::test]
async fn a_refused_heads_start_time_is_when_it_was_refused() {
    let (_g, _up, proxy) = logged_proxy().await;
    let mut s = TcpStream::connect(proxy.data_addr()).await.unwrap();
    s.write_all(b"GET /v1/x HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    // A slow client, on purpose: the head's first and last bytes 1.5 s apart.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let last_byte = SystemTime::now();
    s.write_all(b"no colon\r\n\r\n").await.unwrap();
    let answer = read_all(&mut s).await;
    let answered = SystemTime::now();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let got = settled_lines(&proxy, 1).await;
    let start = humantime::parse_rfc3339(got[0]["start_time"].as_str().unwrap()).unwrap();
    // The log's timestamps have millisecond precision.
    let ms = Duration::from_millis(1);
    assert!(
        start + ms >= last_byte && start <= answered + ms,
        "start_time {start:?} outside [{last_byte:?}, {answered:?}]: {}",
        got[0]
    );
    assert_eq!(got[0]["duration_ms"], 0.0, "{}", got[0]);
    proxy.shutdown().await;
}

// ---- Probes that hold (kept as regression tests) ----

/// A keep-alive connection that served a request and then sends a malformed head: the
/// served request's line and one `400` line, nothing more.
#[tokio::test]
async fn a_bad_head_after_a_served_request_on_one_connection_adds_one_line() {
    let (_g, _up, proxy) = logged_proxy().await;
    let mut s = TcpStream::connect(proxy.data_addr()).await.unwrap();
    s.write_all(b"GET /v1/ok HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    // Wait for the first response before the bad head (no pipelining).
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    s.write_all(b"GET /v1/x HTTP/1.1\r\nHost: a\r\nno colon\r\n\r\n")
        .await
        .unwrap();
    let answer = read_all(&mut s).await;
    assert!(answer.contains("400 Bad Request"), "{answer}");
    let got = settled_lines(&proxy, 2).await;
    let mut codes: Vec<u64> = got.iter().map(|l| l["code"].as_u64().unwrap()).collect();
    codes.sort_unstable();
    assert_eq!(codes, [200, 400], "{got:#?}");
    proxy.shutdown().await;
}

/// A client that closes half-way through a head was answered nothing: no line.
#[tokio::test]
async fn a_client_closing_mid_head_gets_no_line() {
    let (_g, _up, proxy) = logged_proxy().await;
    let mut s = TcpStream::connect(proxy.data_addr()).await.unwrap();
    s.write_all(b"GET /v1/x HTTP/1.1\r\nHost: a\r\nx-half: ")
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let answer = read_all(&mut s).await;
    assert!(answer.is_empty(), "{answer}");
    let r = TestClient::http1().get(&proxy.url("/v1/ok")).await;
    assert_eq!(r.status, 200);
    let got = settled_lines(&proxy, 1).await;
    assert_eq!(got[0]["code"], 200, "{got:#?}");
    proxy.shutdown().await;
}

/// An h2 connection that ends in a protocol error (a HEADERS frame on an even stream id)
/// writes no line.
#[tokio::test]
async fn an_h2_connection_error_writes_no_line() {
    let (_g, _up, proxy) = logged_proxy().await;
    let mut c = H2Conn::connect(proxy.data_addr()).await;
    let block = h2raw::block(&[
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/v1/x"),
        (b":authority", b"a"),
    ]);
    c.send(&h2raw::headers(2, &block, true, true))
        .await
        .unwrap();
    let goaway = c.goaway(Duration::from_secs(5)).await;
    assert!(
        goaway.as_ref().is_some_and(|(code, _)| *code != 0),
        "{goaway:?}"
    );
    let r = TestClient::http1().get(&proxy.url("/v1/ok")).await;
    assert_eq!(r.status, 200);
    let got = settled_lines(&proxy, 1).await;
    assert_eq!(got[0]["code"], 200, "{got:#?}");
    proxy.shutdown().await;
}

/// Over TLS (ALPN http/1.1, and no ALPN) a refused head gets its line too.
#[tokio::test]
async fn a_refused_head_over_tls_gets_its_line() {
    let _g = PROCESS_LOG.lock().await;
    let up = TestUpstream::start("v1").await;
    let ca = TestCa::new("review_session27 CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_tls_files(&ca, dir.path());
    let top = support::certs::tls_top(&cert, &key);
    let proxy = proxy_with_access_log(&up, Some(&top)).await;
    for alpn in [&[&b"http/1.1"[..]][..], &[][..]] {
        let mut s = tls_connect(proxy.data_addr(), &ca, alpn).await;
        s.write_all(BAD_TARGET).await.unwrap();
        s.flush().await.unwrap();
        let answer = read_all(&mut s).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{alpn:?}: {answer}");
    }
    let got = settled_lines(&proxy, 2).await;
    for l in &got {
        assert_eq!(l["code"], 400, "{l}");
        assert_eq!(l["method"], Value::Null, "{l}");
    }
    proxy.shutdown().await;
}

/// A client that sends a malformed head and closes at once (a scanner, a client that gave
/// up): hyper still writes its 400 and the connection still ends with the parse error, so
/// every such request gets its line (probed because a failed shutdown would surface as a
/// shutdown error instead; on Linux loopback it does not).
#[tokio::test]
async fn a_malformed_head_from_a_client_that_closes_at_once_still_gets_its_line() {
    let (_g, _up, proxy) = logged_proxy().await;
    for _ in 0..20 {
        let mut s = TcpStream::connect(proxy.data_addr()).await.unwrap();
        s.write_all(BAD_TARGET).await.unwrap();
        drop(s);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = TestClient::http1().get(&proxy.url("/v1/ok")).await;
    assert_eq!(r.status, 200);
    // Twenty refused heads and the served request: waited for, then no more.
    let got = settled_lines(&proxy, 21).await;
    let refused = got.iter().filter(|l| l["code"] == 400).count();
    assert_eq!(refused, 20, "{refused} of 20 logged");
    proxy.shutdown().await;
}
