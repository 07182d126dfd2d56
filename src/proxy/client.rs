//! Upstream connections: a pool of connections per version endpoint and data-plane worker,
//! over plain TCP (`http://`), rustls (`https://`, certificate and SNI verified, ALPN h2 or
//! http/1.1) or HTTP/2 prior knowledge (`h2c://`).
//!
//! Connecting (DNS, TCP with a connect timeout and TCP_NODELAY, TLS with SNI and ALPN) is
//! hyper-util's `HttpConnector` under hyper-rustls. The pool is our own, over hyper's
//! connection API (`hyper::client::conn`), because hyper-util's legacy pool costs the
//! request path on every request: it hashes the authority (SipHash) on each checkout and
//! return, and spawns a task per HTTP/1.1 request to return the connection once the
//! response ends. Here a pool belongs to one endpoint and one thread, so it needs no key
//! and its lock is never contended; an HTTP/1.1 connection is lent with its response
//! ([`UpstreamBody`]) and comes back when that body ends or is dropped. An HTTP/2
//! connection is shared by every request of its pool; it is idle only while none of its
//! streams is in flight (counted from each request's send to the end of its response
//! body), so a stream that runs for minutes keeps it.
//!
//! Settings follow ../shared/HARDENING.md "Defaults to set explicitly": connect timeout and
//! TCP_NODELAY on the connector; an idle connection is not reused after 4 s, below the
//! usual upstream keep-alive of 5 s (gunicorn, Node), so the pool never hands out a
//! connection the upstream is closing, and a reaper closes idle connections once they are
//! past that, also when no request comes; at most 64 idle HTTP/1.1 connections per pool
//! (HARDENING: 32-64 per host), the oldest closed first. A request
//! that a pooled connection returns unsent (its upstream closed it as the request went
//! out) is sent once more on a new connection, as hyper-util's client does.

use std::cell::Cell;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::uri::{Authority, PathAndQuery, Uri};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tower_service::Service;

use super::body::ReqBody;
use crate::config::{Endpoint, EndpointScheme, VersionConfig};

/// The client for the proxy's own outgoing calls (webhooks, the CLI, the demo's load):
/// hyper-util's pooled client. The data plane uses [`EndpointRt::send`].
pub type HttpClient = Client<HttpsConnector<HttpConnector>, ReqBody>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Io = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;

/// An upstream connection's transport, kept in the connection's task for its whole life.
/// hyper-rustls' [`MaybeHttpsStream`] has room for a TLS session inline (1.1 KiB) on a
/// plain connection too; here only a TLS connection pays for it.
enum Transport {
    Plain(TokioIo<tokio::net::TcpStream>),
    Tls(Box<Io>),
}

impl From<Io> for Transport {
    fn from(io: Io) -> Self {
        match io {
            MaybeHttpsStream::Http(plain) => Transport::Plain(plain),
            tls => Transport::Tls(Box::new(tls)),
        }
    }
}

impl hyper::rt::Read for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Transport::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Transport::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Transport::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(io) => io.is_write_vectored(),
            Transport::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(io) => Pin::new(io).poll_flush(cx),
            Transport::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Transport::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Idle upstream connections are not reused after this, below the 5 s keep-alive of
/// gunicorn and Node, so the pool never hands out a connection the upstream is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
const POOL_MAX_IDLE: usize = 64;

/// Data-plane worker threads (see `app::DataPlane`); 0 when the data plane runs on the
/// caller's runtime. Set once at start-up, before the first routing table is compiled.
static DATA_WORKERS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// 1..=DATA_WORKERS on a data-plane worker thread, 0 elsewhere.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Declares how many data-plane worker threads will run, so each endpoint gets one
/// connection pool per worker (plus one for everything else: health checks, inline
/// serving). Call before building the store.
pub fn set_data_workers(n: usize) {
    DATA_WORKERS.store(n, Ordering::Relaxed);
}

/// Marks the calling thread as data-plane worker `index` (0-based).
pub fn enter_worker(index: usize) {
    WORKER.with(|w| w.set(index + 1));
}

/// A failed exchange with an upstream.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection: DNS, TCP connect, TLS or the HTTP/2 handshake failed. The request
    /// was not sent.
    #[error("connect error")]
    Connect(#[source] BoxError),
    /// The upstream refused the request before processing any of it (HTTP/2
    /// `REFUSED_STREAM`, RFC 9113 §8.7): like a connect error, safe to send elsewhere.
    #[error("request refused")]
    Refused(#[source] BoxError),
    /// The connection failed while the request was sent or its response awaited.
    #[error("request error")]
    Request(#[source] BoxError),
}

impl SendError {
    /// No connection could be made.
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }

    /// The upstream never processed the request: it may go elsewhere whatever its method.
    pub fn is_unsent(&self) -> bool {
        matches!(self, SendError::Connect(_) | SendError::Refused(_))
    }

    fn request(e: hyper::Error) -> Self {
        let refused = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<h2::Error>())
            .is_some_and(|h| h.reason() == Some(h2::Reason::REFUSED_STREAM));
        if refused {
            SendError::Refused(e.into())
        } else {
            SendError::Request(e.into())
        }
    }
}

/// A connect failure shared by the requests that waited for that connection: its cause
/// stays reachable through `source()`, so TLS failures are still told from others.
#[derive(Debug, Clone)]
struct SharedFailure {
    cause: Arc<dyn std::error::Error + Send + Sync>,
    /// This request waited for another's attempt (rather than making it).
    waited: bool,
}

impl std::fmt::Display for SharedFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.waited {
            write!(f, "the connection attempt this request waited for failed")
        } else {
            write!(f, "connection attempt failed")
        }
    }
}

impl std::error::Error for SharedFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.cause)
    }
}

/// One endpoint of a version.
pub struct EndpointRt {
    pub endpoint: Endpoint,
    /// One pool per data-plane worker thread, so an upstream connection is only ever driven
    /// by the thread whose requests use it (no cross-thread wake-ups); slot 0 serves every
    /// other thread.
    pools: Box<[Arc<Pool>]>,
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`, what the connector is called with.
    connect_uri: Uri,
    /// The upstream chose h2 by ALPN on the latest connection.
    negotiated_h2: AtomicBool,
    /// The `Host` every HTTP/1.1 request gets, in place of any it came with (the endpoint's
    /// host, and its port unless it is the scheme's default).
    host: HeaderValue,
    /// Kept by the health checker; unhealthy endpoints are skipped while others remain.
    pub healthy: AtomicBool,
    /// Consecutive failed / passed active health checks.
    pub failures: AtomicU32,
    pub successes: AtomicU32,
}

/// A version's endpoints. Shared by every table that contains the version unchanged, so
/// connection pools survive table swaps.
pub struct Upstream {
    pub endpoints: Box<[EndpointRt]>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<_> = self
            .endpoints
            .iter()
            .map(|e| e.endpoint.url.as_str())
            .collect();
        f.debug_struct("Upstream")
            .field("endpoints", &urls)
            .finish()
    }
}

/// The connections of one endpoint used by one thread. Its locks are taken only by that
/// thread (slot 0 aside: health checks and tests) and its reaper, never across an `.await`.
#[derive(Default)]
struct Pool {
    /// HTTP/1.1 connections not lent out, the most recently returned last.
    idle: Mutex<Vec<Idle>>,
    /// The HTTP/2 connection (h2c, or https that negotiated h2), shared by every request.
    h2: Mutex<Option<SharedH2>>,
    /// Held while an HTTP/2 connection is being made (an async lock, held across the
    /// connect on purpose: the requests behind it wait for that one connection).
    h2_connecting: tokio::sync::Mutex<()>,
    /// Failed HTTP/2 connection attempts and the last one's error, so the requests that
    /// waited for an attempt share its failure.
    h2_failures: Mutex<(usize, Option<Arc<dyn std::error::Error + Send + Sync>>)>,
    /// A reaper task is running for this pool.
    reaping: AtomicBool,
}

struct Idle {
    tx: http1::SendRequest<ReqBody>,
    since: Instant,
}

/// A pool's HTTP/2 connection and its use.
struct SharedH2 {
    tx: http2::SendRequest<ReqBody>,
    /// When its last stream ended (or when it was made).
    used: Instant,
    /// Its requests in flight, from their send to the end of their response body: while
    /// any is, the connection is in use, however long ago it was last handed out (an LLM
    /// stream runs for minutes). Changed only under the pool's `h2` lock, so a reaper
    /// never sees a stream begun or ended without its `used`.
    streams: Arc<AtomicUsize>,
}

impl SharedH2 {
    fn idle(&self) -> bool {
        self.streams.load(Ordering::Acquire) == 0
    }
}

/// A pool's reaper is running; dropped, it lets the next returned connection start one.
struct Reaping(std::sync::Weak<Pool>);

impl Drop for Reaping {
    fn drop(&mut self) {
        if let Some(pool) = self.0.upgrade() {
            pool.reaping.store(false, Ordering::Release);
        }
    }
}

fn expired(since: Instant, now: Instant) -> bool {
    now.saturating_duration_since(since) >= POOL_IDLE_TIMEOUT
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pool {
    /// The shared HTTP/2 connection for one request, unless it is closed or idle past
    /// the timeout; the request's stream counts as in flight until its [`Lease`] drops.
    fn shared_h2(self: &Arc<Self>) -> Option<(http2::SendRequest<ReqBody>, Lease)> {
        let mut slot = lock(&self.h2);
        let s = slot.as_mut()?;
        if s.tx.is_closed() || (s.idle() && expired(s.used, Instant::now())) {
            // The reaper has not run yet: the upstream may be closing it.
            *slot = None;
            return None;
        }
        s.streams.fetch_add(1, Ordering::AcqRel);
        Some((s.tx.clone(), self.h2_lease(&s.streams)))
    }

    /// Makes `tx` the shared HTTP/2 connection, with one stream in flight: the request
    /// it was made for.
    fn set_h2(self: &Arc<Self>, tx: http2::SendRequest<ReqBody>) -> Lease {
        let streams = Arc::new(AtomicUsize::new(1));
        let lease = self.h2_lease(&streams);
        *lock(&self.h2) = Some(SharedH2 {
            tx,
            used: Instant::now(),
            streams,
        });
        self.reap_later();
        lease
    }

    fn h2_lease(self: &Arc<Self>, streams: &Arc<AtomicUsize>) -> Lease {
        Lease {
            tx: None,
            pool: self.clone(),
            h2: Some(streams.clone()),
        }
    }

    /// A stream of an HTTP/2 connection ended (its response body, or a failure): when it
    /// was the connection's last one in flight, the connection's idle time starts now (if
    /// it is still the shared one: a replaced connection is no longer the pool's).
    fn end_h2_stream(self: &Arc<Self>, streams: &Arc<AtomicUsize>) {
        let last = {
            let mut slot = lock(&self.h2);
            let last = streams.fetch_sub(1, Ordering::AcqRel) == 1;
            let shared = slot.as_mut().filter(|s| Arc::ptr_eq(&s.streams, streams));
            if let Some(s) = shared.filter(|_| last) {
                s.used = Instant::now();
            }
            last
        };
        if last {
            self.reap_later();
        }
    }

    /// Closes what has been idle too long, also when no request comes to notice: a task
    /// on the calling thread's runtime that runs while the pool holds idle connections,
    /// waking when the oldest of them expires.
    fn reap_later(self: &Arc<Self>) {
        if self.reaping.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.reaping.store(false, Ordering::Release);
            return;
        };
        // Clears `reaping` however the task ends, also when a runtime shutting down drops
        // it unrun.
        let reaping = Reaping(Arc::downgrade(self));
        rt.spawn(async move {
            let mut next = Instant::now() + POOL_IDLE_TIMEOUT;
            loop {
                tokio::time::sleep(next.saturating_duration_since(Instant::now())).await;
                let Some(pool) = reaping.0.upgrade() else {
                    return;
                };
                match pool.reap(Instant::now()) {
                    Some(at) => next = at,
                    None => {
                        drop(reaping);
                        // A connection that came back meanwhile restarts a reaper.
                        if pool.holds_any() {
                            pool.reap_later();
                        }
                        return;
                    }
                }
            }
        });
    }

    /// Drops idle HTTP/1.1 connections and an unused HTTP/2 one past the idle timeout;
    /// when the next of those left expires, if any are left. An HTTP/2 connection with a
    /// stream in flight is in use, not idle: the end of its last stream starts the reaper
    /// again.
    fn reap(&self, now: Instant) -> Option<Instant> {
        let mut idle = lock(&self.idle);
        idle.retain(|c| !c.tx.is_closed() && !expired(c.since, now));
        let mut h2 = lock(&self.h2);
        if h2
            .as_ref()
            .is_some_and(|s| s.tx.is_closed() || (s.idle() && expired(s.used, now)))
        {
            *h2 = None;
        }
        let oldest = idle
            .iter()
            .map(|c| c.since)
            .chain(h2.as_ref().filter(|s| s.idle()).map(|s| s.used))
            .min()?;
        Some(oldest + POOL_IDLE_TIMEOUT)
    }

    /// Whether anything is left for a reaper: idle HTTP/1.1 connections, or an HTTP/2
    /// connection with no stream in flight.
    fn holds_any(&self) -> bool {
        !lock(&self.idle).is_empty() || lock(&self.h2).as_ref().is_some_and(SharedH2::idle)
    }

    /// The most recently returned HTTP/1.1 connection that can take a request now. Closed
    /// connections and those idle too long are dropped; one whose previous response its
    /// connection task has not finished yet stays for later.
    fn take_h1(&self) -> Option<http1::SendRequest<ReqBody>> {
        let mut idle = lock(&self.idle);
        let now = Instant::now();
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let c = &idle[i];
            if c.tx.is_closed() || expired(c.since, now) {
                idle.remove(i);
            } else if c.tx.is_ready() {
                return Some(idle.remove(i).tx);
            }
        }
        None
    }

    fn put_h1(self: &Arc<Self>, tx: http1::SendRequest<ReqBody>) {
        if tx.is_closed() {
            return;
        }
        let now = Instant::now();
        {
            let mut idle = lock(&self.idle);
            if idle.first().is_some_and(|c| expired(c.since, now)) {
                idle.remove(0);
            }
            if idle.len() >= POOL_MAX_IDLE {
                // The oldest goes: the newest are the ones the next requests take.
                idle.remove(0);
            }
            idle.push(Idle { tx, since: now });
        }
        if !self.reaping.load(Ordering::Relaxed) {
            self.reap_later();
        }
    }
}

/// One exchange's use of an upstream connection, until its response body ends: an
/// HTTP/1.1 connection lent to it (back to its pool when dropped), or a stream in flight
/// on an HTTP/2 connection (counted in [`SharedH2::streams`]).
struct Lease {
    tx: Option<http1::SendRequest<ReqBody>>,
    pool: Arc<Pool>,
    h2: Option<Arc<AtomicUsize>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            self.pool.put_h1(tx);
        }
        if let Some(streams) = self.h2.take() {
            self.pool.end_h2_stream(&streams);
        }
    }
}

/// An upstream response body. It carries its [`Lease`]: the HTTP/1.1 connection it came
/// on, which goes back to the pool when the body ends or is dropped (hyper closes a
/// connection whose body was dropped unread; the pool skips it), or its HTTP/2 stream's
/// place in the connection's count of streams in flight.
pub struct UpstreamBody {
    inner: Incoming,
    lease: Option<Lease>,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.lease = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection just made.
enum Fresh {
    H1(http1::SendRequest<ReqBody>),
    /// With the request's stream counted on it.
    H2(http2::SendRequest<ReqBody>, Lease),
}

impl EndpointRt {
    fn new(e: &Endpoint, connect_timeout: Duration, tls: rustls::ClientConfig) -> Self {
        let scheme = e.uri_scheme();
        let connect_uri = Uri::builder()
            .scheme(scheme.clone())
            .authority(e.authority.clone())
            .path_and_query("/")
            .build()
            .unwrap_or_default();
        let default_port = if scheme == http::uri::Scheme::HTTPS {
            443
        } else {
            80
        };
        let host = match e.authority.port_u16() {
            Some(p) if p != default_port => e.authority.as_str(),
            _ => e.authority.host(),
        };
        EndpointRt {
            endpoint: e.clone(),
            pools: (0..=DATA_WORKERS.load(Ordering::Relaxed))
                .map(|_| Arc::new(Pool::default()))
                .collect(),
            connector: connector(e, connect_timeout, tls),
            connect_uri,
            negotiated_h2: AtomicBool::new(false),
            host: HeaderValue::from_str(host)
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            healthy: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            successes: AtomicU32::new(0),
        }
    }

    /// The calling thread's connection pool for this endpoint.
    #[inline]
    fn pool(&self) -> &Arc<Pool> {
        let i = WORKER.with(Cell::get);
        self.pools.get(i).unwrap_or(&self.pools[0])
    }

    /// Sends `req` on a pooled connection, or a new one. The URI may be origin-form (a
    /// path): the endpoint supplies scheme and authority for HTTP/2 (any `Host` is
    /// removed), and `Host` for HTTP/1.1 (replacing the request's).
    pub async fn send(&self, req: Request<ReqBody>) -> Result<Response<UpstreamBody>, SendError> {
        let pool = self.pool();
        // A plain http:// endpoint never has an HTTP/2 connection: no lock for it.
        let h2 = match self.endpoint.scheme {
            EndpointScheme::Http => None,
            EndpointScheme::Https | EndpointScheme::H2c => pool.shared_h2(),
        };
        let req = if let Some((tx, stream)) = h2 {
            match self.send_h2(tx, stream, req).await {
                Ok(answer) => return answer,
                Err(req) => req,
            }
        } else if let Some(tx) = pool.take_h1() {
            match self.send_h1(pool, tx, req).await {
                Ok(answer) => return answer,
                Err(req) => req,
            }
        } else {
            req
        };
        // No pooled connection took it (none idle, or the upstream closed the pooled one
        // as the request went out): a new connection. Boxed: connecting (TLS, the HTTP/2
        // handshake) is a large future, and every request's future would otherwise be
        // as large as it and be moved as such.
        Box::pin(self.send_fresh(pool, req)).await
    }

    async fn send_fresh(
        &self,
        pool: &Arc<Pool>,
        req: Request<ReqBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let fresh = if self.h2_expected() {
            // One HTTP/2 connection at a time per pool: requests that arrive while it is
            // being made wait for it and share it, or share its failure.
            let failures = lock(&pool.h2_failures).0;
            let turn = pool.h2_connecting.lock().await;
            if let Some((tx, stream)) = pool.shared_h2() {
                Fresh::H2(tx, stream)
            } else if !self.h2_expected() {
                // The attempt this request waited for made an HTTP/1.1 connection (the
                // upstream stopped offering h2): connect in parallel, as for HTTP/1.1.
                drop(turn);
                self.connect(pool).await?
            } else {
                let failed = {
                    let f = lock(&pool.h2_failures);
                    (f.0 != failures).then(|| f.1.clone()).flatten()
                };
                if let Some(cause) = failed {
                    let waited = SharedFailure {
                        cause,
                        waited: true,
                    };
                    return Err(SendError::Connect(Box::new(waited)));
                }
                match self.connect(pool).await {
                    Ok(fresh) => fresh,
                    Err(e) => {
                        let cause: Arc<dyn std::error::Error + Send + Sync> = match e {
                            SendError::Connect(b)
                            | SendError::Refused(b)
                            | SendError::Request(b) => Arc::from(b),
                        };
                        let mut f = lock(&pool.h2_failures);
                        f.0 += 1;
                        f.1 = Some(cause.clone());
                        let made = SharedFailure {
                            cause,
                            waited: false,
                        };
                        return Err(SendError::Connect(Box::new(made)));
                    }
                }
            }
        } else {
            self.connect(pool).await?
        };
        let answer = match fresh {
            Fresh::H1(tx) => self.send_h1(pool, tx, req).await,
            Fresh::H2(tx, stream) => self.send_h2(tx, stream, req).await,
        };
        // A new connection that does not take the request is an error, not a reason to
        // try yet another.
        answer.unwrap_or_else(|_| {
            Err(SendError::Connect(
                "a new upstream connection closed before the request was sent".into(),
            ))
        })
    }

    /// The answer, or the request back if it never left.
    ///
    /// Not an `async fn`, here and in [`send_h2`](Self::send_h2): the request is handed to
    /// hyper before the future is made, so the future does not hold it a second time (an
    /// `async fn` keeps room for its by-value arguments), and every future that awaits this
    /// one, up to the whole request's, is that much smaller to move.
    fn send_h1(
        &self,
        pool: &Arc<Pool>,
        mut tx: http1::SendRequest<ReqBody>,
        mut req: Request<ReqBody>,
    ) -> impl Future<Output = Result<Result<Response<UpstreamBody>, SendError>, Request<ReqBody>>>
    {
        self.for_h1(&mut req);
        let answer = tx.try_send_request(req);
        let pool = pool.clone();
        async move {
            let answer = answer.await;
            let lease = Lease {
                tx: Some(tx),
                pool,
                h2: None,
            };
            settle(answer, Some(lease))
        }
    }

    /// The answer, or the request back if it never left.
    fn send_h2(
        &self,
        mut tx: http2::SendRequest<ReqBody>,
        stream: Lease,
        mut req: Request<ReqBody>,
    ) -> impl Future<Output = Result<Result<Response<UpstreamBody>, SendError>, Request<ReqBody>>>
    {
        self.for_h2(&mut req);
        let answer = tx.try_send_request(req);
        async move {
            let answer = answer.await;
            drop(tx); // kept until the answer, as the connection's user
            settle(answer, Some(stream))
        }
    }

    /// Whether a new connection will speak HTTP/2: h2c, or https whose upstream
    /// negotiated h2 on the latest connection.
    fn h2_expected(&self) -> bool {
        self.endpoint.scheme == EndpointScheme::H2c || self.negotiated_h2.load(Ordering::Relaxed)
    }

    /// Connects, and for HTTP/2 makes the connection the pool's shared one.
    async fn connect(&self, pool: &Arc<Pool>) -> Result<Fresh, SendError> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(SendError::Connect)?;
        let io: Io = connector
            .call(self.connect_uri.clone())
            .await
            .map_err(SendError::Connect)?;
        let negotiated_h2 = io.connected().is_negotiated_h2();
        if self.endpoint.scheme == EndpointScheme::Https {
            // What the upstream chose last: one that stops offering h2 (a restart, mixed
            // backends behind a balancer) gets HTTP/1.1 connections made in parallel again.
            self.negotiated_h2.store(negotiated_h2, Ordering::Relaxed);
        }
        let io = Transport::from(io);
        if self.endpoint.scheme == EndpointScheme::H2c || negotiated_h2 {
            // One stream until the upstream's SETTINGS say how many it takes: a burst on a
            // new connection otherwise exceeds a small SETTINGS_MAX_CONCURRENT_STREAMS
            // (Triton, vLLM's gRPC) and is refused (REFUSED_STREAM), instead of queued.
            let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                .initial_max_send_streams(1)
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(20))
                .adaptive_window(true)
                .handshake(io)
                .await
                .map_err(|e| SendError::Connect(e.into()))?;
            tokio::spawn(Driven {
                conn,
                what: "upstream HTTP/2 connection ended",
            });
            let stream = pool.set_h2(tx.clone());
            Ok(Fresh::H2(tx, stream))
        } else {
            let (tx, conn) = http1::handshake(io)
                .await
                .map_err(|e| SendError::Connect(e.into()))?;
            tokio::spawn(Driven {
                conn,
                what: "upstream HTTP/1.1 connection ended",
            });
            Ok(Fresh::H1(tx))
        }
    }

    /// HTTP/1.1 wants the origin form and a `Host`: the endpoint's, in place of any the
    /// request came with (one hashed insert, where removing the client's and then adding
    /// ours took three).
    fn for_h1(&self, req: &mut Request<ReqBody>) {
        *req.version_mut() = http::Version::HTTP_11;
        req.headers_mut().insert(HOST, self.host.clone());
        if req.uri().scheme().is_some() {
            let path = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::from(path);
        }
    }

    /// HTTP/2 wants scheme and authority in the URI (`:scheme`, `:authority`), and no
    /// `Host` (a client's would name another authority than the endpoint's).
    fn for_h2(&self, req: &mut Request<ReqBody>) {
        *req.version_mut() = http::Version::HTTP_2;
        req.headers_mut().remove(HOST);
        if req.uri().scheme().is_none() {
            let mut parts = std::mem::take(req.uri_mut()).into_parts();
            parts.scheme = Some(self.endpoint.uri_scheme());
            parts.authority = Some(self.endpoint.authority.clone());
            if parts.path_and_query.is_none() {
                parts.path_and_query = Some(PathAndQuery::from_static("/"));
            }
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// An upstream connection's task: hyper's connection future, its error logged at the
    /// end. Spawned as this rather than as `async move { conn.await }`, which keeps the
    /// connection twice (captured, then moved into the await): 1,352 bytes per HTTP/1.1
    /// upstream connection for its whole life instead of 672.
    struct Driven<F> {
        #[pin]
        conn: F,
        what: &'static str,
    }
}

impl<F: Future<Output = hyper::Result<()>>> Future for Driven<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if let Err(e) = std::task::ready!(this.conn.poll(cx)) {
            tracing::debug!(error = %e, "{}", this.what);
        }
        Poll::Ready(())
    }
}

fn with_lease(resp: Response<Incoming>, lease: Option<Lease>) -> Response<UpstreamBody> {
    resp.map(|inner| UpstreamBody { inner, lease })
}

/// The answer on a pooled connection, or the request back if it never left.
// The request comes back by value, as from hyper's `try_send_request` (which allows the
// same lint): boxing it would allocate on a path that must stay cheap.
#[allow(clippy::result_large_err)]
fn settle(
    answer: Result<Response<Incoming>, TrySendError<Request<ReqBody>>>,
    lease: Option<Lease>,
) -> Result<Result<Response<UpstreamBody>, SendError>, Request<ReqBody>> {
    match answer {
        Ok(resp) => Ok(Ok(with_lease(resp, lease))),
        Err(mut e) => match e.take_message() {
            Some(req) => Err(req),
            None => Ok(Err(SendError::request(e.into_error()))),
        },
    }
}

impl Upstream {
    pub fn new(v: &VersionConfig, connect_timeout: Duration) -> std::io::Result<Self> {
        let tls = client_tls(v.ca_file.as_deref())?;
        let endpoints = v
            .endpoints
            .iter()
            .map(|e| EndpointRt::new(e, connect_timeout, tls.clone()))
            .collect();
        Ok(Upstream {
            endpoints,
            next: AtomicUsize::new(0),
        })
    }

    /// Round-robin over healthy endpoints (over all of them when none is healthy).
    #[inline]
    pub fn pick(&self) -> &EndpointRt {
        let n = self.endpoints.len();
        if n == 1 {
            return &self.endpoints[0];
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            let e = &self.endpoints[(start + i) % n];
            if e.healthy.load(Ordering::Relaxed) {
                return e;
            }
        }
        &self.endpoints[start % n]
    }

    /// Another endpoint than `not`, if the version has one that is healthy.
    pub fn pick_other(&self, not: &Authority) -> Option<&EndpointRt> {
        self.endpoints
            .iter()
            .find(|e| &e.endpoint.authority != not && e.healthy.load(Ordering::Relaxed))
    }

    /// Whether a retry from `ep` has another healthy endpoint to go to: [`pick_other`]
    /// without comparing authorities when `ep` is the only endpoint (the common case).
    ///
    /// [`pick_other`]: Self::pick_other
    pub fn has_other_than(&self, ep: &EndpointRt) -> bool {
        self.endpoints.len() > 1 && self.pick_other(&ep.endpoint.authority).is_some()
    }

    pub fn any_healthy(&self) -> bool {
        self.endpoints
            .iter()
            .any(|e| e.healthy.load(Ordering::Relaxed))
    }
}

/// The process-wide rustls crypto provider: exactly one is installed (rustls #2148).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

fn client_tls(ca_file: Option<&Path>) -> std::io::Result<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?
            .collect::<Result<_, _>>()
            .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
        for c in certs {
            roots
                .add(c)
                .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(cfg)
}

fn connector(
    e: &Endpoint,
    connect_timeout: Duration,
    tls: rustls::ClientConfig,
) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(30)));
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    match e.scheme {
        EndpointScheme::Https => b.enable_all_versions().wrap_connector(http),
        EndpointScheme::Http | EndpointScheme::H2c => b.enable_http1().wrap_connector(http),
    }
}

/// Body bytes kept for a retry: bodies up to this size are read before the first attempt
/// and replayed on a retry; larger ones stream and are never retried once sent (Linkerd
/// never retries bodies over 64 KiB either).
pub const RETRY_BUFFER: u64 = 64 * 1024;

/// A client for the proxy's own outgoing calls (webhooks): http and https (public roots),
/// HTTP/1.1, connect timeout 2 s.
pub fn control_client() -> std::io::Result<HttpClient> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(2)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_tls(None)?)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .build(connector))
}
