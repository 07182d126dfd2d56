//! Accepting connections: HTTP/1.1 and h2c (prior knowledge) on one port, optionally
//! behind TLS with ALPN `h2,http/1.1`.
//!
//! Every hyper / h2 knob that HARDENING.md lists under "Defaults to set explicitly" is set
//! here, in one place ([`http1_builder`], [`http2_builder`]), so a reader can audit the
//! limits without chasing library defaults. The accept loop survives `EMFILE` (it backs off
//! and continues rather than returning), and shutdown is graceful: listeners close, h1
//! connections finish their response with `Connection: close`, h2 connections get GOAWAY
//! and finish their streams.
//!
//! No connection waits for its client without a time limit: the TLS handshake has
//! [`TLS_HANDSHAKE_TIMEOUT`]; the first bytes (which tell h2 from HTTP/1.1 on cleartext and
//! on TLS without ALPN, and must be the h2 preface with ALPN `h2`) and every HTTP/1.1
//! request head have [`HEADER_READ_TIMEOUT`] (on cleartext the two add up: a client that
//! drips the first bytes of an HTTP/1.1 head for up to 10 s gets 10 s more for the rest);
//! an h2 connection with no stream open is closed after [`H2_IDLE_TIMEOUT`]. Waiting costs a
//! pending read and a timer, never a poll loop.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::body::RespBody;
use crate::telemetry::access_log::{self, AccessEntry};

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

/// The HTTP/1.1 connection builder with every limit set explicitly.
///
/// Writes stay vectored (hyper's default for sockets). `writev(false)` was measured: 6 %
/// less CPU per small request at 5,000 req/s, but hyper then copies every body chunk into
/// one buffer that is cleared and never shrunk, so each connection would keep the size of
/// the largest response it ever carried (2 MiB after a 1 MiB frame) for its whole life.
pub fn http1_builder() -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF_SIZE)
        .max_headers(MAX_HEADERS)
        .keep_alive(true)
        .half_close(false);
    b
}

/// The h2 connection builder with every limit set explicitly.
pub fn http2_builder() -> http2::Builder<TokioExecutor> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
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

/// Which listener a [`serve`] loop serves: the data plane's requests are the access log's;
/// the admin and health ports' are not (a malformed probe there is no proxied request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    Data,
    Control,
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
    plane: Plane,
) where
    H: Fn(SocketAddr, bool, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<RespBody>> + Send + 'static,
{
    let builders = Arc::new(Builders {
        h1: http1_builder(),
        h2: http2_builder(),
        plane,
    });
    // Every connection task holds a clone of `live` until it ends, and the drain waits for
    // the last one to go: the counting hyper-util's `GracefulShutdown` does, done here
    // because its watcher owns the connection, and an idle h2 connection must be closed
    // gracefully by the connection's own task too.
    let (live_tx, live) = watch::channel(());
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
        let life = Lifecycle {
            stop: shutdown.clone(),
            _live: live.clone(),
        };
        tokio::spawn(serve_connection(
            stream,
            peer,
            tls.clone(),
            builders.clone(),
            write_stall.clone(),
            handler.clone(),
            life,
        ));
    }
    drop(listener);
    drop(live);
    if tokio::time::timeout(drain, live_tx.closed()).await.is_err() {
        tracing::warn!(?drain, "drain timeout reached with connections still open");
    }
}

/// Connection builders by protocol, which is always known before the first request: from
/// ALPN, or from the first bytes of the connection ([`sniff_h2`]). hyper-util's own
/// detection is not used: it waits for those bytes with no time limit, and its connection
/// type holds both protocols' state, so every connection would take the larger one.
struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    plane: Plane,
}

/// A connection task's tie to its listener: the stop signal, and a token the drain counts
/// until the task ends.
struct Lifecycle {
    stop: watch::Receiver<bool>,
    _live: watch::Receiver<()>,
}

impl Lifecycle {
    /// Resolves once the listener is stopping (or whoever could stop it is gone).
    async fn stopping(&mut self) {
        let _ = self.stop.wait_for(|stop| *stop).await;
    }
}

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads a connection's first bytes, up to the length of the h2 preface or up to the first
/// byte that departs from it, and returns whether they are the preface, with the
/// connection rewound to its start. `None` when the client closed, or had not settled the
/// question within [`HEADER_READ_TIMEOUT`], or the listener is stopping: a silent
/// connection is closed like a slow request head. The wait is a pending read and a timer,
/// so a client that stalls half-way through the preface costs no CPU.
async fn sniff_h2<I>(mut io: I, life: &mut Lifecycle) -> Option<(bool, Rewind<I>)>
where
    I: AsyncRead + Unpin,
{
    let mut buf = [0u8; H2_PREFACE.len()];
    let read = tokio::select! {
        r = tokio::time::timeout(HEADER_READ_TIMEOUT, read_preface(&mut io, &mut buf)) => r,
        _ = life.stopping() => return None,
    };
    let (h2, filled) = read.ok().flatten()?;
    Some((h2, Rewind::new(io, Bytes::copy_from_slice(&buf[..filled]))))
}

/// Fills `buf` while the bytes match the h2 preface: (whether all of it came, bytes read),
/// or `None` at end of stream or on an error.
async fn read_preface<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut [u8; H2_PREFACE.len()],
) -> Option<(bool, usize)> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = io.read(&mut buf[filled..]).await.ok()?;
        if n == 0 {
            return None;
        }
        filled += n;
        if buf[..filled] != H2_PREFACE[..filled] {
            return Some((false, filled));
        }
    }
    Some((true, filled))
}

/// One connection's task. What it keeps for the connection's whole life is kept small:
/// the TLS path and the protocol's serving state are boxed, each at its own size, so a
/// cleartext HTTP/1.1 connection carries no room for a TLS session or for h2's state.
async fn serve_connection<H, F>(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    builders: Arc<Builders>,
    write_stall: WriteStall,
    handler: H,
    mut life: Lifecycle,
) where
    H: Fn(SocketAddr, bool, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<RespBody>> + Send + 'static,
{
    let stream = StallGuard::new(stream, write_stall);
    let conn = Conn {
        peer,
        is_tls: tls.is_some(),
        builders: &builders,
    };
    let result = match tls {
        None => {
            // Boxed, like the TLS path: the sniff's timer and stop futures (512 bytes) would
            // otherwise size the connection's task for its whole life.
            let Some((h2, io)) = Box::pin(sniff_h2(stream, &mut life)).await else {
                return;
            };
            conn.serve(io, h2, handler, life).await
        }
        Some(acceptor) => match Box::pin(accept_tls(stream, acceptor, peer, &mut life)).await {
            Some((h2, io)) => conn.serve(io, h2, handler, life).await,
            None => return,
        },
    };
    if let Err(e) = result {
        let refused = (builders.plane == Plane::Data)
            .then(|| refused_head_status(&*e))
            .flatten();
        if let Some(code) = refused {
            // One access log line per request, also for a head hyper refused itself.
            if let Some(log) = access_log::current().filter(|l| l.sampled()) {
                log.log(AccessEntry::unparsed(SystemTime::now(), code));
            }
        }
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// The status hyper answered an HTTP/1.1 request head it could not parse with, as its
/// server's `on_error` picks it: 414 for a URI over its limit, 431 for a head over
/// `max_buf_size`, 400 for a malformed method, URI, version or header. `None` for every
/// other way a connection ends (no answer was sent): an h2 preface on an HTTP/1.1
/// connection, hyper's internal error, timeouts, resets, I/O errors.
fn refused_head_status(e: &(dyn std::error::Error + 'static)) -> Option<u16> {
    let e = e.downcast_ref::<hyper::Error>()?;
    if !e.is_parse() || e.is_parse_version_h2() || e.is_parse_status() {
        return None;
    }
    // hyper's public API tells "too large" apart, not which of its two kinds; its message
    // does (`access_log::a_head_hyper_refuses_still_gets_its_line_with_the_status_it_was_answered`
    // sends both and checks the logged status against the one received).
    let text = e.to_string();
    if text.starts_with("internal error") {
        None
    } else if e.is_parse_too_large() {
        Some(if text.starts_with("URI too long") {
            414
        } else {
            431
        })
    } else {
        Some(400)
    }
}

/// The TLS handshake, and then the protocol: by ALPN, or sniffed when the client sent no
/// ALPN. `None` when the handshake failed or timed out, the client went silent, or the
/// listener is stopping.
async fn accept_tls(
    stream: StallGuard<TcpStream>,
    acceptor: TlsAcceptor,
    peer: SocketAddr,
    life: &mut Lifecycle,
) -> Option<(bool, Rewind<Box<TlsStream<StallGuard<TcpStream>>>>)> {
    let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
    let tls_stream = tokio::select! {
        r = handshake => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return None;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return None;
            }
        },
        _ = life.stopping() => return None,
    };
    let alpn = tls_stream.get_ref().1.alpn_protocol();
    let (alpn_h1, alpn_h2) = (alpn == Some(b"http/1.1"), alpn == Some(b"h2"));
    // Boxed: the session lives with the serving state, at its own size.
    let tls_stream = Box::new(tls_stream);
    if alpn_h1 {
        // hyper's header read timeout bounds the wait for the first request.
        return Some((false, Rewind::new(tls_stream, Bytes::new())));
    }
    // h2 (by ALPN, or sniffed when the client sent no ALPN) has no header read timeout:
    // the wait for the preface is bounded here, as on cleartext. With ALPN h2, hyper
    // answers anything but the preface with a GOAWAY.
    let Some((h2, io)) = sniff_h2(tls_stream, life).await else {
        tracing::debug!(%peer, "TLS client closed, silent or stopped before a request");
        return None;
    };
    Some((h2 || alpn_h2, io))
}

type ConnError = Box<dyn std::error::Error + Send + Sync>;

/// One accepted connection, once its protocol is known.
struct Conn<'a> {
    peer: SocketAddr,
    is_tls: bool,
    builders: &'a Builders,
}

impl Conn<'_> {
    /// Serves HTTP/1.1 or h2 on `io` until the connection ends. It is closed gracefully
    /// (h1: `Connection: close` on the response in progress; h2: GOAWAY, open streams
    /// finish) when the listener stops and, for h2, after [`H2_IDLE_TIMEOUT`] with no
    /// stream open. The serving state is one allocation of the chosen protocol's size.
    fn serve<I, H, F>(
        self,
        io: I,
        h2: bool,
        handler: H,
        life: Lifecycle,
    ) -> Pin<Box<dyn Future<Output = Result<(), ConnError>> + Send>>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        H: Fn(SocketAddr, bool, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<RespBody>> + Send + 'static,
    {
        let (peer, is_tls) = (self.peer, self.is_tls);
        let streams = h2.then(|| Arc::new(Streams::new()));
        let counted = streams.clone();
        let served = Arc::new(AtomicU32::new(0));
        let service = service_fn(move |req: Request<Incoming>| {
            let last = req.version() < hyper::Version::HTTP_2
                && served.fetch_add(1, Ordering::Relaxed) + 1 >= MAX_REQUESTS_PER_CONNECTION;
            let stream = counted.as_ref().map(Streams::open);
            // Boxed per request: hyper keeps one allocation of the service future's size
            // for the connection's whole life, so an unboxed handler (many KiB of nested
            // state) would stay resident on every idle keep-alive connection.
            let fut = Box::pin(handler(peer, is_tls, req));
            async move {
                let mut resp = fut.await;
                if last {
                    resp.headers_mut().insert(
                        hyper::header::CONNECTION,
                        hyper::header::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, Infallible>(resp.map(|body| Tracked {
                    body,
                    _stream: stream,
                }))
            }
        });
        let io = TokioIo::new(io);
        // hyper's connection boxed on its own, and `drive` polls it through the box: moved
        // into `drive`'s future and pinned there, it was kept twice (the argument and the
        // pinned local): 1,880 bytes per HTTP/1.1 connection for its whole life and 3,976
        // per h2 one, now 760 + 296 and 1,608 + 504.
        match streams {
            Some(streams) => {
                let conn = Box::pin(self.builders.h2.serve_connection(io, service));
                let idle = move || async move { streams.idle_for(h2_idle_timeout()).await };
                Box::pin(drive(life, conn, idle, peer))
            }
            None => {
                let conn = Box::pin(self.builders.h1.serve_connection(io, service));
                Box::pin(drive(life, conn, std::future::pending, peer))
            }
        }
    }
}

/// Runs `conn` to its end, starting its graceful shutdown once when the listener stops or
/// the future `idle` makes resolves.
///
/// Not an `async fn`, which keeps every by-value argument twice (the argument and the local
/// it is moved into): the block uses its captures in place and makes the idle future
/// inside. The connection is dropped before `life`, the drain's token, so the drain never
/// ends while what a cut connection held (a request's recording) is still being dropped.
#[allow(clippy::manual_async_fn)] // on purpose: an `async fn` stores its arguments twice
fn drive<C, I>(
    mut life: Lifecycle,
    mut conn: Pin<Box<C>>,
    idle: impl FnOnce() -> I,
    peer: SocketAddr,
) -> impl Future<Output = Result<(), ConnError>>
where
    C: GracefulConnection,
    C::Error: Into<ConnError>,
    I: Future<Output = ()>,
{
    async move {
        let mut idle = std::pin::pin!(idle());
        // One stop future for the connection's life: made anew on every wake of the
        // connection (every read and write), it cost a watch borrow and a waiter
        // registration per wake.
        let mut stopping = std::pin::pin!(life.stopping());
        let mut closing = false;
        let r = loop {
            tokio::select! {
                biased;
                r = conn.as_mut() => break r,
                _ = stopping.as_mut(), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = idle.as_mut(), if !closing => {
                    tracing::debug!(%peer, "h2 connection idle; sending GOAWAY");
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        };
        drop(conn);
        r.map_err(Into::into)
    }
}

/// How long an h2 connection may stay open with no stream in flight before it gets a
/// GOAWAY (NO_ERROR) and is closed. Envoy's `idle_timeout` defaults to 1 h; an idle h2
/// connection holds a socket, hyper's buffers and a keep-alive ping every 30 s (which
/// proves the peer alive, not that it needs the connection), so rollgate lets one go after
/// 5 minutes: longer than the gap between a client's bursts, short enough that abandoned
/// connections do not pile up. A client that opens no stream at all is counted from the
/// connection's start. HTTP/1.1 connections need no such limit: an idle keep-alive
/// connection is closed at [`HEADER_READ_TIMEOUT`].
pub const H2_IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// A replacement for [`H2_IDLE_TIMEOUT`] in milliseconds, 0 for none.
static H2_IDLE_OVERRIDE_MS: AtomicU64 = AtomicU64::new(0);

/// Replaces [`H2_IDLE_TIMEOUT`] for the h2 connections that start from now on, in this whole
/// process. For tests, which cannot wait 5 minutes (a test binary that uses it should
/// serve nothing else that a short timeout could disturb); not a config key.
#[doc(hidden)]
pub fn set_h2_idle_timeout_for_tests(limit: Duration) {
    let ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX).max(1);
    H2_IDLE_OVERRIDE_MS.store(ms, Ordering::Relaxed);
}

fn h2_idle_timeout() -> Duration {
    match H2_IDLE_OVERRIDE_MS.load(Ordering::Relaxed) {
        0 => H2_IDLE_TIMEOUT,
        ms => Duration::from_millis(ms),
    }
}

/// The streams of one h2 connection that are in flight (from the request head until hyper
/// drops the response body, or the service future when the stream was reset first), for
/// its idle timeout.
struct Streams {
    open: AtomicUsize,
    /// When the last stream ended, in milliseconds after `since` (0: none yet).
    last_end_ms: AtomicU64,
    since: tokio::time::Instant,
    ended: tokio::sync::Notify,
}

impl Streams {
    fn new() -> Streams {
        Streams {
            open: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
            since: tokio::time::Instant::now(),
            ended: tokio::sync::Notify::new(),
        }
    }

    fn open(self: &Arc<Self>) -> StreamGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.clone())
    }

    /// Resolves once no stream has been open for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            if self.open.load(Ordering::Acquire) > 0 {
                // notify_one keeps a permit, so an end between the load and here is not lost.
                self.ended.notified().await;
                continue;
            }
            let last_end = Duration::from_millis(self.last_end_ms.load(Ordering::Acquire));
            let deadline = self.since + last_end + limit;
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            // A stream that opens and ends meanwhile moves `last_end`: checked on waking.
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// One in-flight stream of [`Streams`].
struct StreamGuard(Arc<Streams>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let s = &self.0;
        let ms = u64::try_from(s.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        s.last_end_ms.store(ms, Ordering::Release);
        if s.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            s.ended.notify_one();
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its stream counted in [`Streams`] until hyper drops it
    /// (sent to the end, or reset).
    struct Tracked<B> {
        #[pin]
        body: B,
        _stream: Option<StreamGuard>,
    }
}

impl<B: hyper::body::Body> hyper::body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A connection whose first reads return `prefix` (the bytes read to tell h2 from
    /// HTTP/1.1), then the connection's own bytes; writes go straight through.
    struct Rewind<T> {
        prefix: Bytes,
        // An error met while reading on past the prefix, for the read after it.
        failed: Option<io::Error>,
        #[pin]
        inner: T,
    }
}

impl<T> Rewind<T> {
    fn new(inner: T, prefix: Bytes) -> Self {
        Rewind {
            prefix,
            failed: None,
            inner,
        }
    }
}

impl<T: AsyncRead> AsyncRead for Rewind<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Err(e));
        }
        if this.prefix.is_empty() || buf.remaining() == 0 {
            return this.inner.poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix.split_to(n));
        // The rest of the request head is usually already here: hand it over in the same
        // read. A head that arrives in two reads makes hyper grow its 8 KiB read buffer to
        // 16 KiB for the connection's whole life (bytes' amortised growth), so returning
        // the prefix alone cost every connection 8 KiB. Nothing is lost if the socket has
        // nothing yet: the prefix is returned and the next read waits as usual.
        if this.prefix.is_empty() && buf.remaining() > 0 {
            if let Poll::Ready(Err(e)) = this.inner.poll_read(cx, buf) {
                // The prefix is this read's result; the error is the next one's.
                *this.failed = Some(e);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite> AsyncWrite for Rewind<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
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

impl<T: AsyncRead> AsyncRead for StallGuard<T> {
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

impl<T: AsyncWrite> AsyncWrite for StallGuard<T> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A reader whose every read fails.
    struct Broken;

    impl AsyncRead for Broken {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset")))
        }
    }

    #[tokio::test]
    async fn the_sniffed_prefix_and_the_rest_of_the_head_come_in_one_read() {
        // hyper grows its read buffer to 16 KiB for good when a head comes in two reads.
        let (mut client, server) = tokio::io::duplex(1024);
        client
            .write_all(b"/ HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut io = Rewind::new(server, Bytes::from_static(b"GET "));
        let mut buf = [0u8; 8192];
        let n = io.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    }

    #[tokio::test]
    async fn the_prefix_alone_when_nothing_more_has_come_and_the_rest_later() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut io = Rewind::new(server, Bytes::from_static(b"GET "));
        let mut buf = [0u8; 64];
        let n = io.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET ");
        client.write_all(b"/ HTTP/1.1\r\n").await.unwrap();
        let n = io.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"/ HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn an_error_after_the_prefix_is_the_next_reads_result() {
        let mut io = Rewind::new(Broken, Bytes::from_static(b"GET "));
        let mut buf = [0u8; 64];
        assert_eq!(io.read(&mut buf).await.unwrap(), 4);
        let e = io.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn a_prefix_larger_than_the_buffer_is_handed_over_in_parts() {
        let (_client, server) = tokio::io::duplex(1024);
        let mut io = Rewind::new(server, Bytes::from_static(b"PRI * HTTP/2.0"));
        let mut buf = [0u8; 8];
        assert_eq!(io.read(&mut buf).await.unwrap(), 8);
        assert_eq!(&buf, b"PRI * HT");
        let n = io.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"TP/2.0");
    }
}
