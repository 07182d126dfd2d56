//! Accepting connections: HTTP/1.1 and h2c (prior knowledge) on one port, optionally
//! behind TLS with ALPN `h2,http/1.1`.
//!
//! Every hyper / h2 knob that HARDENING.md lists under "Defaults to set explicitly" is set
//! here, in one place ([`http_builder`]), so a reader can audit the limits without chasing
//! library defaults. The accept loop survives `EMFILE` (it backs off and continues rather than
//! returning), and shutdown is graceful: listeners close, h1 connections finish their
//! response with `Connection: close`, h2 connections get GOAWAY and finish their streams.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::body::RespBody;

/// Time a client has to send a complete request head (slowloris defence).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Request head limit: 431 beyond (Envoy: 60 KiB). Checked by the service, because
/// hyper's own buffer cap would answer 431 to an over-long target too, which deserves 414.
pub const MAX_HEAD_SIZE: usize = 64 * 1024;
/// Read buffer cap: room for a head over [`MAX_HEAD_SIZE`] to be parsed and refused with
/// the right status (hyper answers 414 itself above 64 KiB of target).
pub const MAX_BUF_SIZE: usize = 96 * 1024;
/// Headers per request (431 beyond).
pub const MAX_HEADERS: usize = 100;
/// h2 streams per connection; further streams queue on the client.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// Time a TLS client has to finish its handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/1.1 requests served on one connection before it is closed gracefully (the last
/// response carries `Connection: close`), as nginx's `keepalive_requests`: bounds what one
/// client connection can pin, and lets a load balancer rebalance long-lived clients.
pub const MAX_REQUESTS_PER_CONNECTION: u32 = 1000;
/// Back-off after an accept error such as EMFILE, so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// The hyper-util connection builder with every limit set explicitly.
pub fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF_SIZE)
        .max_headers(MAX_HEADERS)
        .keep_alive(true)
        .half_close(false);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(1024)
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_header_list_size(64 * 1024);
    b
}

/// A server certificate that can be replaced while connections keep being accepted
/// (a bad PEM on reload keeps the old one).
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
}

impl CertStore {
    pub fn load(cert: &Path, key: &Path) -> io::Result<Arc<CertStore>> {
        Ok(Arc::new(CertStore {
            current: ArcSwap::from_pointee(read_certified_key(cert, key)?),
        }))
    }

    /// Replaces the certificate if the new files parse; otherwise keeps the old one.
    pub fn reload(&self, cert: &Path, key: &Path) -> io::Result<()> {
        self.current.store(Arc::new(read_certified_key(cert, key)?));
        Ok(())
    }

    /// A TLS acceptor: TLS 1.2/1.3 only, ALPN `h2, http/1.1`, no 0-RTT.
    pub fn acceptor(self: &Arc<Self>) -> TlsAcceptor {
        let provider = super::client::crypto_provider();
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.max_early_data_size = 0;
        TlsAcceptor::from(Arc::new(config))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn read_certified_key(cert: &Path, key: &Path) -> io::Result<CertifiedKey> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let invalid = |what: &Path, e: &dyn std::fmt::Display| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", what.display()),
        )
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| invalid(cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(cert, &e))?;
    if certs.is_empty() {
        return Err(invalid(cert, &"no certificate in file"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| invalid(key, &e))?;
    let provider = super::client::crypto_provider();
    CertifiedKey::from_der(certs, key_der, &provider).map_err(|e| invalid(key, &e))
}

/// Serves `listener` with `handler` until `shutdown` turns true, then drains for at most
/// `drain` and returns. `handler` is called once per request with the peer address.
pub async fn serve<H, F>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: H,
    write_stall: WriteStall,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) where
    H: Fn(SocketAddr, bool, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<RespBody>> + Send + 'static,
{
    let builders = Arc::new(Builders {
        auto: http_builder(),
        h1: http_builder().http1_only(),
        h2: http_builder().http2_only(),
    });
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE/ENFILE/ECONNABORTED: keep serving the connections we have.
                tracing::warn!(error = %e, "accept failed; backing off");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        tokio::spawn(serve_connection(
            stream,
            peer,
            tls.clone(),
            builders.clone(),
            write_stall.clone(),
            handler.clone(),
            watcher,
        ));
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(?drain, "drain timeout reached with connections still open");
    }
}

/// Connection builders: by protocol when it is known before the first request (ALPN, or
/// the first bytes of a cleartext connection), else hyper-util's detection.
struct Builders {
    auto: auto::Builder<TokioExecutor>,
    h1: auto::Builder<TokioExecutor>,
    h2: auto::Builder<TokioExecutor>,
}

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a cleartext connection speaks h2 (prior knowledge), from its first bytes,
/// without consuming them. `None` when the client closed or sent nothing within
/// [`HEADER_READ_TIMEOUT`]: a silent connection is closed like a slow request head
/// (hyper-util's own detection would wait for it forever).
async fn sniff_h2(stream: &TcpStream) -> Option<bool> {
    let sniff = async {
        let mut buf = [0u8; 24];
        loop {
            let n = stream.peek(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            if buf[..n] != H2_PREFACE[..n] {
                return Some(false);
            }
            if n == H2_PREFACE.len() {
                return Some(true);
            }
            // Part of the preface so far: peek returns at once with the same bytes, so
            // wait a little for the rest.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(HEADER_READ_TIMEOUT, sniff)
        .await
        .ok()
        .flatten()
}

async fn serve_connection<H, F>(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    builders: Arc<Builders>,
    write_stall: WriteStall,
    handler: H,
    watcher: Watcher,
) where
    H: Fn(SocketAddr, bool, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<RespBody>> + Send + 'static,
{
    let is_tls = tls.is_some();
    let served = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let service = service_fn(move |req: Request<Incoming>| {
        let last = req.version() < hyper::Version::HTTP_2
            && served.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
                >= MAX_REQUESTS_PER_CONNECTION;
        let fut = handler(peer, is_tls, req);
        async move {
            let mut resp = fut.await;
            if last {
                resp.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let result = match tls {
        None => {
            let builder = match sniff_h2(&stream).await {
                Some(true) => &builders.h2,
                Some(false) => &builders.h1,
                None => return,
            };
            let stream = StallGuard::new(stream, write_stall);
            watcher
                .watch(
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .into_owned(),
                )
                .await
        }
        Some(acceptor) => {
            let stream = StallGuard::new(stream, write_stall);
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => {
                    let builder = match tls_stream.get_ref().1.alpn_protocol() {
                        Some(b"h2") => &builders.h2,
                        Some(b"http/1.1") => &builders.h1,
                        _ => &builders.auto,
                    };
                    watcher
                        .watch(
                            builder
                                .serve_connection(TokioIo::new(tls_stream), service)
                                .into_owned(),
                        )
                        .await
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// How long a client may leave the proxy's writes blocked (it stopped reading) before its
/// connection is closed, which also cancels the upstream request it was fed by. Asked
/// only when a write blocks, so it can follow the current routing table.
pub type WriteStall = Arc<dyn Fn() -> Duration + Send + Sync>;

pin_project_lite::pin_project! {
    /// A client connection whose writes fail with `TimedOut` once they have been blocked
    /// for the [`WriteStall`] duration: hyper has no write timeout, and a reader that stops
    /// reading would otherwise hold its upstream stream (and the model's work) forever.
    struct StallGuard<T> {
        #[pin]
        inner: T,
        limit: WriteStall,
        stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<T> StallGuard<T> {
    fn new(inner: T, limit: WriteStall) -> Self {
        StallGuard {
            inner,
            limit,
            stalled: None,
        }
    }
}

impl<T: tokio::io::AsyncRead> tokio::io::AsyncRead for StallGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

/// `Ready` results pass through and disarm the stall timer; `Pending` arms it, and once it
/// fires the write fails.
fn guard<R>(
    polled: Poll<io::Result<R>>,
    stalled: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    limit: &WriteStall,
    cx: &mut Context<'_>,
) -> Poll<io::Result<R>> {
    if polled.is_ready() {
        *stalled = None;
        return polled;
    }
    let timer = stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit())));
    match timer.as_mut().poll(cx) {
        Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client stopped reading",
        ))),
        Poll::Pending => Poll::Pending,
    }
}

impl<T: tokio::io::AsyncWrite> tokio::io::AsyncWrite for StallGuard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        guard(this.inner.poll_write(cx, buf), this.stalled, this.limit, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        guard(
            this.inner.poll_write_vectored(cx, bufs),
            this.stalled,
            this.limit,
            cx,
        )
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        guard(this.inner.poll_flush(cx), this.stalled, this.limit, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}
