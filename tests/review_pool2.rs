//! Review of commit 3fd6e6d (pool review fixes): requests already queued behind the HTTP/2
//! connect "turn" when an https upstream stops offering h2 connect one at a time, each
//! holding the turn across a TCP + TLS handshake (`send_fresh` never re-checks
//! `h2_expected()` once it has the turn). Failed on 3fd6e6d (8 x 300 ms in series, 2.47 s);
//! passes with the working tree's `else if !self.h2_expected()` branch (0.65 s).

#[macro_use]
mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::net::TcpListener;

/// A TLS upstream whose ALPN and handshake delay can change while it runs.
struct Up {
    port: u16,
    ca: TestCa,
    alpn: Arc<Mutex<Vec<Vec<u8>>>>,
    delay_ms: Arc<AtomicU64>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Up {
    fn drop(&mut self) {
        self.accept.abort();
        self.kill();
    }
}

impl Up {
    async fn start() -> Up {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let ca = TestCa::new("rollgate review pool2 CA");
        let leaf = Arc::new(ca.leaf(&["localhost", "127.0.0.1"]));
        let alpn: Arc<Mutex<Vec<Vec<u8>>>> = Arc::new(Mutex::new(vec![b"h2".to_vec()]));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (alpn2, delay2, conns2) = (alpn.clone(), delay_ms.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let protos = alpn2.lock().unwrap().clone();
                let delay = Duration::from_millis(delay2.load(Ordering::SeqCst));
                let leaf = leaf.clone();
                let task = tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let sc = support::certs::server_config(&leaf, protos);
                    let Ok(tls) = tokio_rustls::TlsAcceptor::from(sc).accept(stream).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let version = req.version();
                        let _ = req.into_body().collect().await;
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("x-proto", format!("{version:?}"))
                                .body(Full::new(Bytes::from_static(b"ok")))
                                .unwrap(),
                        )
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
                conns2.lock().unwrap().push(task.abort_handle());
            }
        });
        Up {
            port,
            ca,
            alpn,
            delay_ms,
            conns,
            accept,
        }
    }

    fn kill(&self) {
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }
}

// Scenario: an https upstream negotiated h2 (so `negotiated_h2` is true), then restarts with
// http/1.1 only and 300 ms handshakes (a loaded backend, or the h1 half of a balancer over
// mixed backends). A burst of 8 arrives before any request has re-learned the protocol: all
// 8 take the HTTP/2 branch of `send_fresh` and queue on `h2_connecting`. The first connect
// yields HTTP/1.1 (not a failure, so nothing is shared); the 7 others then get the turn one by
// one and each makes its own HTTP/1.1 connection while holding it: 8 x 300 ms in series,
// where parallel connects take ~300 ms.
#[tokio::test]
async fn burst_queued_behind_the_h2_turn_when_upstream_drops_h2_connects_in_parallel() {
    let up = Up::start().await;
    let flow = format!("ca_file: \"{}\"", up.ca.pem_path().display());
    let proxy = TestProxy::new()
        .version_with("v1", &format!("https://localhost:{}", up.port), &flow)
        .route(Route::new("chat", "v1"))
        .start()
        .await;
    let r = TestClient::http1().get(&proxy.url("/v1/first")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-proto"), Some("HTTP/2.0"), "negotiated h2 first");

    *up.alpn.lock().unwrap() = vec![b"http/1.1".to_vec()];
    up.delay_ms.store(300, Ordering::SeqCst);
    up.kill();
    // Let the proxy see the FIN of the killed h2 connection.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let url = proxy.url(&format!("/v1/burst/{i}"));
        tasks.spawn(async move {
            let req = request(Method::GET, &url).body(full("")).unwrap();
            let t = Instant::now();
            let r = TestClient::http1().send(req).await;
            (r.status.as_u16(), t.elapsed())
        });
    }
    let mut results = Vec::new();
    while let Some(r) = tasks.join_next().await {
        results.push(r.unwrap());
    }
    let total = started.elapsed();
    assert!(results.iter().all(|(s, _)| *s == 200), "{results:?}");
    assert!(
        total < Duration::from_millis(1_200),
        "8 concurrent requests took {total:?} (each upstream handshake 300 ms): the HTTP/1.1 \
         connects were made one at a time under the HTTP/2 turn; per request: {results:?}"
    );
    proxy.shutdown().await;
}
