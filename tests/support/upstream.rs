//! `TestUpstream`: a real HTTP server on 127.0.0.1:0 standing in for a model server.
//!
//! One port speaks HTTP/1.1 and h2c (prior knowledge), optionally behind TLS. It records every
//! request it receives and its reply can be changed while it runs. Every response carries
//! `x-upstream: NAME`, so a test can check that the proxy's `x-rollgate-version` names the
//! upstream that really answered.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::body::ChannelBody;
use super::certs::TestCa;

type RespBody = BoxBody<Bytes, Infallible>;

/// What the upstream answers. Change it at runtime with [`TestUpstream::set`].
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 `{"version":"NAME"}`.
    Json,
    /// The given status with body `{"version":"NAME","status":N}`.
    Status(u16),
    /// 500 on the given fraction of requests (spread evenly and deterministically), else `Json`.
    FailFraction(f64),
    /// OpenAI-style SSE: `chunks` `data: {...}\n\n` events, the first at once, then one every
    /// `interval`, then `data: [DONE]\n\n`. Bytes are exactly [`sse_body`].
    Sse { chunks: usize, interval: Duration },
    /// gRPC unary: HTTP 200, `content-type: application/grpc`, one length-prefixed message
    /// ([`grpc_frame`] of `reply from NAME`), then trailers `grpc-status: status`,
    /// `grpc-message`, `x-upstream-trailer: NAME`.
    Grpc { status: u32 },
    /// gRPC trailers-only: HTTP 200 with `grpc-status` in the headers and no body.
    GrpcTrailersOnly { status: u32 },
    /// 200 `{"version":"NAME","score":X}` with `x-model-score: X`, X spread evenly over
    /// `score ± spread/2`; every `flag_every`-th response (0: none) also carries
    /// `x-guardrail-flagged: 1`.
    Scored {
        score: f64,
        spread: f64,
        flag_every: u64,
    },
    /// Full duplex: 200 at once (with the request's `content-type`), then every request body
    /// frame echoed back as it arrives; gRPC requests end with trailers `grpc-status: 0`.
    /// For bidirectional streams (Triton `ModelStreamInfer`).
    Echo,
    /// 200 `text/event-stream` that sends `data: tick N\n\n` every `interval` forever.
    /// When the proxy lets go of it, [`TestUpstream::disconnects`] goes up.
    Endless { interval: Duration },
}

/// One request as the upstream saw it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// False while the body is still being read, or if it ended in an error (e.g. the proxy
    /// aborted it).
    pub body_complete: bool,
    pub trailers: Option<HeaderMap>,
}

impl RecordedRequest {
    /// The first value of a header, if any (lossy UTF-8).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    /// All values of a header.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    /// The `x-test-id` header tests put on requests to find them again.
    pub fn test_id(&self) -> Option<String> {
        self.header("x-test-id")
    }
}

struct Shared {
    name: String,
    reply: Mutex<Reply>,
    delay: Mutex<Duration>,
    requests: Mutex<Vec<RecordedRequest>>,
    served: AtomicU64,
    disconnects: Arc<AtomicUsize>,
    /// Connections accepted.
    connections: AtomicUsize,
}

pub struct TestUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    ca: Option<TestCa>,
    accept_task: JoinHandle<()>,
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl TestUpstream {
    /// A plain-text upstream (HTTP/1.1 + h2c) answering [`Reply::Json`].
    pub async fn start(name: &str) -> TestUpstream {
        Self::start_inner(name, None).await
    }

    /// An upstream behind TLS for `localhost`, with its own test CA ([`TestUpstream::ca_pem_path`]).
    pub async fn start_tls(name: &str) -> TestUpstream {
        Self::start_inner(
            name,
            Some(TestCa::new(&format!("rollgate test CA for {name}"))),
        )
        .await
    }

    async fn start_inner(name: &str, ca: Option<TestCa>) -> TestUpstream {
        // The largest accept queue the kernel allows (somaxconn, 4096 by default): a proxy
        // fanning a burst of concurrent requests out over new connections must not meet
        // a test upstream that drops their SYNs (tokio's default backlog is 1024).
        let socket = tokio::net::TcpSocket::new_v4().expect("upstream socket");
        socket
            .bind("127.0.0.1:0".parse().unwrap())
            .expect("bind upstream");
        let listener = socket.listen(4096).expect("listen upstream");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            name: name.to_string(),
            reply: Mutex::new(Reply::Json),
            delay: Mutex::new(Duration::ZERO),
            requests: Mutex::new(Vec::new()),
            served: AtomicU64::new(0),
            disconnects: Arc::new(AtomicUsize::new(0)),
            connections: AtomicUsize::new(0),
        });
        let acceptor = ca
            .as_ref()
            .map(|ca| tokio_rustls::TlsAcceptor::from(ca.server_config()));
        let accept_shared = shared.clone();
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                accept_shared.connections.fetch_add(1, Ordering::SeqCst);
                let shared = accept_shared.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(acceptor) => {
                            // A failed handshake (e.g. the proxy does not trust our CA) just
                            // ends this connection.
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        TestUpstream {
            addr,
            shared,
            ca,
            accept_task,
        }
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT`
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `h2c://127.0.0.1:PORT` (HTTP/2 prior knowledge, for gRPC).
    pub fn h2c_url(&self) -> String {
        format!("h2c://{}", self.addr)
    }

    /// `https://localhost:PORT` (only meaningful for [`TestUpstream::start_tls`]).
    pub fn https_url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// The CA that signed this upstream's certificate, as a PEM file.
    pub fn ca_pem_path(&self) -> &Path {
        self.ca.as_ref().expect("not a TLS upstream").pem_path()
    }

    /// Changes what the upstream answers from now on.
    pub fn set(&self, reply: Reply) {
        *self.shared.reply.lock().unwrap() = reply;
    }

    /// Waits this long before sending response headers (on every request from now on).
    pub fn set_delay(&self, delay: Duration) {
        *self.shared.delay.lock().unwrap() = delay;
    }

    /// Every request received so far (including ones whose body is still arriving).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.shared.requests.lock().unwrap().len()
    }

    /// Requests carrying `x-test-id: id`.
    pub fn requests_with_id(&self, id: &str) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.test_id().as_deref() == Some(id))
            .collect()
    }

    pub fn clear(&self) {
        self.shared.requests.lock().unwrap().clear();
    }

    /// How many streamed response bodies were dropped before their end (client went away).
    pub fn disconnects(&self) -> usize {
        self.shared.disconnects.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

/// A port on 127.0.0.1 where nothing listens: connecting to it is refused.
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    port
}

/// A gRPC length-prefixed message: flag 0 (uncompressed), u32 big-endian length, bytes.
pub fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

/// The i-th OpenAI-style SSE event sent by upstream `name`.
pub fn sse_event(name: &str, i: usize) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-{name}\",\"object\":\"chat.completion.chunk\",\"model\":\"{name}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token-{i} \"}},\"finish_reason\":null}}]}}\n\n"
    )
}

/// Exactly the bytes [`Reply::Sse`] with `chunks` events sends.
pub fn sse_body(name: &str, chunks: usize) -> Bytes {
    let mut s = String::new();
    for i in 0..chunks {
        s.push_str(&sse_event(name, i));
    }
    s.push_str("data: [DONE]\n\n");
    Bytes::from(s)
}

/// [`Reply::Echo`]: answers at once and relays the request body back frame by frame.
fn echo(name: &str, headers: &HeaderMap, mut body: Incoming) -> Response<RespBody> {
    let (tx, out) = ChannelBody::channel();
    let grpc = headers
        .get("content-type")
        .is_some_and(|c| c.as_bytes().starts_with(b"application/grpc"));
    tokio::spawn(async move {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(d) = frame.into_data() {
                if tx.send(Frame::data(d)).await.is_err() {
                    return;
                }
            }
        }
        if grpc {
            let mut t = HeaderMap::new();
            t.insert("grpc-status", HeaderValue::from_static("0"));
            let _ = tx.send(Frame::trailers(t)).await;
        }
    });
    let mut r = Response::builder().header("x-upstream", name);
    if let Some(ct) = headers.get("content-type") {
        r = r.header("content-type", ct);
    }
    r.body(out.boxed()).unwrap()
}

fn full_body(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into()).boxed()
}

fn json_response(name: &str, status: StatusCode) -> Response<RespBody> {
    let body = if status == StatusCode::OK {
        format!("{{\"version\":\"{name}\"}}")
    } else {
        format!("{{\"version\":\"{name}\",\"status\":{}}}", status.as_u16())
    };
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-upstream", name)
        .body(full_body(body))
        .unwrap()
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<RespBody> {
    let (parts, body) = req.into_parts();
    let idx = {
        let mut reqs = shared.requests.lock().unwrap();
        reqs.push(RecordedRequest {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            body: Bytes::new(),
            body_complete: false,
            trailers: None,
        });
        reqs.len() - 1
    };
    if matches!(*shared.reply.lock().unwrap(), Reply::Echo) {
        return echo(&shared.name, &parts.headers, body);
    }
    // Read the whole request body first (these are unary model calls).
    let collected = body.collect().await;
    {
        let mut reqs = shared.requests.lock().unwrap();
        if let Some(r) = reqs.get_mut(idx) {
            if let Ok(c) = &collected {
                r.trailers = c.trailers().cloned();
            }
            if let Ok(c) = collected {
                r.body = c.to_bytes();
                r.body_complete = true;
            }
        }
    }
    let n = shared.served.fetch_add(1, Ordering::SeqCst);
    let reply = shared.reply.lock().unwrap().clone();
    let delay = *shared.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let name = shared.name.as_str();
    match reply {
        Reply::Json => json_response(name, StatusCode::OK),
        Reply::Status(code) => json_response(name, StatusCode::from_u16(code).unwrap()),
        Reply::Scored {
            score,
            spread,
            flag_every,
        } => {
            let x = score + spread * (((n * 7919) % 101) as f64 / 100.0 - 0.5);
            let mut r = Response::builder()
                .header("content-type", "application/json")
                .header("x-upstream", name)
                .header("x-model-score", format!("{x:.4}"));
            if flag_every > 0 && n.is_multiple_of(flag_every) {
                r = r.header("x-guardrail-flagged", "1");
            }
            r.body(full_body(format!(
                "{{\"version\":\"{name}\",\"score\":{x:.4}}}"
            )))
            .unwrap()
        }
        Reply::FailFraction(f) => {
            let fail = ((n + 1) as f64 * f).floor() > (n as f64 * f).floor();
            let status = if fail {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::OK
            };
            json_response(name, status)
        }
        Reply::Sse { chunks, interval } => {
            let (tx, body) = ChannelBody::channel();
            let owned_name = name.to_string();
            tokio::spawn(async move {
                let name = owned_name;
                for i in 0..chunks {
                    if i > 0 {
                        tokio::time::sleep(interval).await;
                    }
                    let mut ev = sse_event(&name, i);
                    if i + 1 == chunks {
                        ev.push_str("data: [DONE]\n\n");
                    }
                    if tx.send(Frame::data(Bytes::from(ev))).await.is_err() {
                        return;
                    }
                }
                if chunks == 0 {
                    let _ = tx
                        .send(Frame::data(Bytes::from_static(b"data: [DONE]\n\n")))
                        .await;
                }
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .header("x-upstream", name)
                .body(body.boxed())
                .unwrap()
        }
        Reply::Grpc { status } => {
            let (tx, body) = ChannelBody::channel();
            let msg = grpc_frame(format!("reply from {name}").as_bytes());
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from(status));
            trailers.insert(
                "grpc-message",
                HeaderValue::from_static(if status == 0 { "ok" } else { "failed" }),
            );
            trailers.insert("x-upstream-trailer", HeaderValue::from_str(name).unwrap());
            tokio::spawn(async move {
                if tx.send(Frame::data(msg)).await.is_ok() {
                    let _ = tx.send(Frame::trailers(trailers)).await;
                }
            });
            Response::builder()
                .header("content-type", "application/grpc")
                .header("x-upstream", name)
                .body(body.boxed())
                .unwrap()
        }
        Reply::GrpcTrailersOnly { status } => Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", status)
            .header("grpc-message", "trailers only")
            .header("x-upstream", name)
            .body(full_body(Bytes::new()))
            .unwrap(),
        // Answered before the body was read (see `echo`).
        Reply::Echo => json_response(name, StatusCode::OK),
        Reply::Endless { interval } => {
            let (tx, body) = ChannelBody::channel_with_drop_counter(shared.disconnects.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                loop {
                    let chunk = Bytes::from(format!("data: tick {i}\n\n"));
                    if tx.send(Frame::data(chunk)).await.is_err() {
                        return;
                    }
                    i += 1;
                    tokio::time::sleep(interval).await;
                }
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .header("x-upstream", name)
                .body(body.boxed())
                .unwrap()
        }
    }
}
