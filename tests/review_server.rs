//! From a hostile review of 315643f (hyper's http1/http2 builders instead of hyper-util's
//! auto connection, boxed serving state, the combined-read `Rewind`): bodies large and
//! streamed (SSE event by event: `data_plane::sse_arrives_chunk_by_chunk`), heads and
//! prefaces dripped byte by byte, drain on cleartext and TLS.

#[macro_use]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::Method;
use support::raw_upstream::{ok_response, Fault, RawUpstream};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------
// Raw HTTP/1.1 helpers.
// ---------------------------------------------------------------------------------------

struct Resp {
    status: u16,
    head: String,
    body: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// De-chunks `src`: Some((body, bytes consumed)) once the last chunk and the blank line are in.
fn dechunk(src: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut i = 0;
    loop {
        let line_end = i + find(&src[i..], b"\r\n")?;
        let size_text = std::str::from_utf8(&src[i..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        i = line_end + 2;
        if size == 0 {
            // Trailers (none expected) then the blank line.
            let end = i + find(&src[i..], b"\r\n")?;
            return Some((body, end + 2));
        }
        if src.len() < i + size + 2 {
            return None;
        }
        body.extend_from_slice(&src[i..i + size]);
        i += size + 2;
    }
}

/// Reads exactly one response (Content-Length or chunked) from `s`.
async fn read_response<S: AsyncRead + Unpin>(s: &mut S) -> Resp {
    let fut = async {
        let mut acc = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let head_end = loop {
            if let Some(p) = find(&acc, b"\r\n\r\n") {
                break p + 4;
            }
            let n = s.read(&mut buf).await.expect("read response head");
            assert!(
                n > 0,
                "closed before a response head: {:?}",
                String::from_utf8_lossy(&acc)
            );
            acc.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&acc[..head_end]).into_owned();
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        let lower = head.to_ascii_lowercase();
        let chunked = lower.contains("transfer-encoding: chunked");
        let length = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse::<usize>().unwrap());
        let mut rest = acc[head_end..].to_vec();
        let body = loop {
            if chunked {
                if let Some((body, _)) = dechunk(&rest) {
                    break body;
                }
            } else {
                let len = length.unwrap_or(0);
                if rest.len() >= len {
                    rest.truncate(len);
                    break rest;
                }
            }
            let n = s.read(&mut buf).await.expect("read response body");
            assert!(n > 0, "closed mid-body");
            rest.extend_from_slice(&buf[..n]);
        };
        Resp { status, head, body }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("no complete response within 10 s")
}

/// Whether the peer closes `s` within `limit` (reading and discarding anything else).
async fn closed_within<S: AsyncRead + Unpin>(s: &mut S, limit: Duration) -> bool {
    let mut b = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

// ---------------------------------------------------------------------------------------
// Large and streamed bodies through the proxy.
// ---------------------------------------------------------------------------------------

/// A 3 MiB upload echoed back: bytes unchanged on both legs.
#[tokio::test]
async fn large_bodies_pass_byte_exact_both_ways() {
    let up = TestUpstream::start("v1").await;
    up.set(Reply::Echo);
    let proxy = TestProxy::new()
        .version("v1", &up)
        .route(Route::new("chat", "v1"))
        .start()
        .await;
    let body = pattern(3 << 20);
    let r = TestClient::http1()
        .send(
            request(Method::POST, &proxy.url("/v1/echo"))
                .header("content-type", "application/octet-stream")
                .body(full(body.clone()))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.body == body,
        "echoed body differs ({} bytes back)",
        r.body.len()
    );
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Rewind / protocol detection.
// ---------------------------------------------------------------------------------------

/// An HTTP/1.1 head dripped one byte per write: the sniff sees 1 byte, `Rewind` hands
/// hyper that byte (plus whatever is there), the rest follows.
#[tokio::test]
async fn an_h1_head_dripped_byte_by_byte_is_served() {
    let up = RawUpstream::start(Fault::Respond(ok_response("ok"))).await;
    let proxy = TestProxy::to(&up.url()).await;
    let mut s = TcpStream::connect(proxy.data_addr()).await.unwrap();
    s.set_nodelay(true).unwrap();
    for b in b"GET /v1/drip HTTP/1.1\r\nHost: a\r\n\r\n" {
        s.write_all(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let r = read_response(&mut s).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
    // And a second request on the same connection (the prefix is gone).
    s.write_all(b"GET /v1/again HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut s).await.status, 200);
    proxy.shutdown().await;
}

/// Reads h2 frames until one of type `ty` on `stream` arrives: its flags.
async fn h2_frame_of<S: AsyncRead + Unpin>(s: &mut S, ty: u8, stream: u32) -> Option<u8> {
    let fut = async {
        loop {
            let mut h = [0u8; 9];
            s.read_exact(&mut h).await.ok()?;
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await.ok()?;
            if h[3] == ty && id == stream {
                return Some(h[4]);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()
        .flatten()
}

/// The h2 preface dripped one byte per write, then SETTINGS and a request.
#[tokio::test]
async fn an_h2_preface_dripped_byte_by_byte_is_served() {
    let up = RawUpstream::start(Fault::Respond(ok_response("ok"))).await;
    let proxy = TestProxy::to(&up.url()).await;
    let mut s = TcpStream::connect(proxy.data_addr()).await.unwrap();
    s.set_nodelay(true).unwrap();
    for b in b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" {
        s.write_all(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    s.write_all(&support::h2raw::settings(&[])).await.unwrap();
    let block = support::h2raw::request_block("GET", "/v1/h2drip", Some("a"), &[]);
    s.write_all(&support::h2raw::headers(1, &block, true, true))
        .await
        .unwrap();
    assert!(
        h2_frame_of(&mut s, 0x1, 1).await.is_some(),
        "no response HEADERS on stream 1"
    );
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Drain.
// ---------------------------------------------------------------------------------------

/// SIGTERM with an HTTP/1.1 request in flight and an idle keep-alive connection: the
/// response finishes with `Connection: close`, the idle connection is closed at once.
#[tokio::test]
async fn drain_finishes_in_flight_h1_with_close_and_closes_idle_h1() {
    let up = RawUpstream::start(Fault::Respond(ok_response("ok"))).await;
    let proxy = TestProxy::to(&up.url()).await;
    let addr = proxy.data_addr();
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /v1/once HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut idle).await.status, 200);
    up.set(Fault::DelayFirstByte(Duration::from_millis(800)));
    let mut busy = TcpStream::connect(addr).await.unwrap();
    busy.write_all(b"GET /v1/slow HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert_eventually!(up.request_count() == 2, Duration::from_secs(3));
    let t = Instant::now();
    let (_, r, idle_closed) = tokio::join!(
        proxy.shutdown(),
        read_response(&mut busy),
        closed_within(&mut idle, Duration::from_millis(500))
    );
    assert_eq!(r.status, 200);
    assert!(
        r.head.to_ascii_lowercase().contains("connection: close"),
        "in-flight response during drain: {}",
        r.head
    );
    assert!(
        idle_closed,
        "idle keep-alive connection not closed at drain"
    );
    assert!(
        t.elapsed() < Duration::from_millis(1900),
        "drain took {:?}",
        t.elapsed()
    );
}

/// How long the proxy's shutdown takes with one connection from `open` left silent.
async fn shutdown_with_silent<F, Fut, S>(proxy: TestProxy, open: F) -> (Duration, bool)
where
    F: FnOnce(SocketAddr) -> Fut,
    Fut: std::future::Future<Output = S>,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut s = open(proxy.data_addr()).await;
    let t = Instant::now();
    let (_, closed) = tokio::join!(
        proxy.shutdown(),
        closed_within(&mut s, Duration::from_secs(3))
    );
    (t.elapsed(), closed)
}

/// A connection that has not sent its first request is closed at once on drain when it
/// is cleartext (the sniff watches the stop signal), and should be over TLS with ALPN
/// http/1.1 too: there hyper's HTTP/1.1 connection is not "idle" before its first
/// request, so `graceful_shutdown` only disables keep-alive and the drain waits for the
/// client (up to the header read timeout, or drain_timeout).
#[tokio::test]
async fn drain_closes_silent_fresh_connections_over_tls_http11_as_on_cleartext() {
    let up = RawUpstream::start(Fault::Respond(ok_response("ok"))).await;
    let ca = TestCa::new("review_server CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_tls_files(&ca, dir.path());
    let tls_top = support::certs::tls_top(&cert, &key);

    let cleartext = TestProxy::to(&up.url()).await;
    let (clear_took, clear_closed) = shutdown_with_silent(cleartext, |a| async move {
        TcpStream::connect(a).await.unwrap()
    })
    .await;

    let mut took = Vec::new();
    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let proxy = TestProxy::new()
            .version_with("v1", &up.url(), "")
            .route(Route::new("chat", "v1"))
            .top(&tls_top)
            .start()
            .await;
        let ca = &ca;
        let r =
            shutdown_with_silent(proxy, |a| async move { tls_connect(a, ca, &[alpn]).await }).await;
        took.push((String::from_utf8_lossy(alpn).into_owned(), r));
    }
    eprintln!("shutdown with a silent fresh connection: cleartext {clear_took:?} (closed {clear_closed}), TLS {took:?}");
    assert!(clear_closed);
    for (alpn, (t, closed)) in &took {
        assert!(
            *t < clear_took + Duration::from_millis(500) && *closed,
            "TLS ALPN {alpn}: shutdown took {t:?} (cleartext {clear_took:?}), connection closed by drain: {closed}"
        );
    }
}
