//! A small HTTP client for tests: hyper-util's legacy client over HTTP/1.1 or h2c (prior
//! knowledge), every call bounded by [`REQUEST_TIMEOUT`], plus a raw HTTP/1.1 socket helper for
//! when the exact bytes on the wire matter.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::REQUEST_TIMEOUT;

pub type ReqBody = BoxBody<Bytes, Infallible>;

pub fn full(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into()).boxed()
}

pub fn empty() -> ReqBody {
    Empty::<Bytes>::new().boxed()
}

/// `http::Request::builder()` with method and URI set.
pub fn request(method: Method, url: &str) -> http::request::Builder {
    Request::builder().method(method).uri(url)
}

/// A fully read response.
#[derive(Debug, Clone)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl TestResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `x-rollgate-version`: the version that answered.
    pub fn version(&self) -> Option<&str> {
        self.header("x-rollgate-version")
    }

    /// `x-rollgate-retried-from`.
    pub fn retried_from(&self) -> Option<&str> {
        self.header("x-rollgate-retried-from")
    }

    pub fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers.as_ref()?.get(name)?.to_str().ok()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {:?}", self.text()))
    }
}

#[derive(Clone)]
pub struct TestClient {
    inner: Client<HttpConnector, ReqBody>,
}

impl TestClient {
    /// HTTP/1.1 with keep-alive.
    pub fn http1() -> TestClient {
        TestClient {
            inner: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// HTTP/2 over cleartext with prior knowledge (how gRPC clients talk).
    pub fn h2c() -> TestClient {
        TestClient {
            inner: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        }
    }

    /// Sends and returns the response with its body unread. Panics on error or timeout.
    pub async fn send_streaming(&self, req: Request<ReqBody>) -> Response<Incoming> {
        let what = format!("{} {}", req.method(), req.uri());
        match tokio::time::timeout(REQUEST_TIMEOUT, self.inner.request(req)).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => panic!("{what}: request failed: {e:?}"),
            Err(_) => panic!("{what}: no response headers within {REQUEST_TIMEOUT:?}"),
        }
    }

    /// A GET whose response comes back with its body unread (a stream to read as it goes).
    pub async fn get_streaming(&self, url: &str) -> Response<Incoming> {
        self.send_streaming(request(Method::GET, url).body(empty()).unwrap())
            .await
    }

    /// Sends and reads the whole response (body and trailers), or says what went wrong.
    pub async fn try_send(&self, req: Request<ReqBody>) -> Result<TestResponse, String> {
        let what = format!("{} {}", req.method(), req.uri());
        let fut = async {
            let resp: Response<Incoming> = self
                .inner
                .request(req)
                .await
                .map_err(|e| format!("{e:?}"))?;
            let (parts, body) = resp.into_parts();
            let collected = body.collect().await.map_err(|e| format!("body: {e:?}"))?;
            let trailers = collected.trailers().cloned();
            Ok::<_, String>(TestResponse {
                status: parts.status,
                headers: parts.headers,
                body: collected.to_bytes(),
                trailers,
            })
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
            Ok(r) => r.map_err(|e| format!("{what}: {e}")),
            Err(_) => Err(format!(
                "{what}: no complete response within {REQUEST_TIMEOUT:?}"
            )),
        }
    }

    /// Sends and reads the whole response. Panics on error or timeout.
    pub async fn send(&self, req: Request<ReqBody>) -> TestResponse {
        self.try_send(req).await.unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn get(&self, url: &str) -> TestResponse {
        self.get_with(url, &[]).await
    }

    pub async fn get_with(&self, url: &str, headers: &[(&str, &str)]) -> TestResponse {
        let mut b = request(Method::GET, url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(empty()).unwrap()).await
    }

    /// POST with `content-type: application/json`.
    pub async fn post_json(
        &self,
        url: &str,
        body: impl Into<Bytes>,
        headers: &[(&str, &str)],
    ) -> TestResponse {
        let mut b = request(Method::POST, url).header("content-type", "application/json");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(full(body)).unwrap()).await
    }
}

/// Writes `raw` to a fresh TCP connection and reads until the peer closes (so send
/// `Connection: close`). Returns everything read, lossily decoded.
pub async fn raw_http1(addr: SocketAddr, raw: &[u8]) -> String {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to proxy");
        s.write_all(raw).await.expect("write request");
        let mut out = Vec::new();
        // A reset after the full response is fine for our purposes.
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    tokio::time::timeout(REQUEST_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("raw request: connection not closed within {REQUEST_TIMEOUT:?}"))
}

/// A raw HTTP/1.1 connection that has sent `GET path` and nothing more: the caller reads
/// from it, or drops it to play a client that goes away before its answer.
pub async fn open_get(addr: SocketAddr, path: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to proxy");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
        .await
        .expect("write request");
    s
}

/// Reads from `s` until `needle` has been seen (or panics after 5 s).
pub async fn read_until(s: &mut tokio::net::TcpStream, needle: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !got.windows(needle.len()).any(|w| w == needle) {
        let mut buf = [0u8; 4096];
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => panic!(
                "connection closed before {:?}: {}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "no {:?} within 5 s: {}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&got)
            ),
        }
    }
    got
}
