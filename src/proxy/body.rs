//! Body types of the proxy, both directions.
//!
//! [`ReqBody`] goes upstream: empty, a buffered (replayable) body, or a stream with a size
//! limit. [`RespBody`] goes to the client: a small body the proxy wrote itself, or the
//! upstream's body wrapped in [`Metered`], which passes frames through one by one (SSE,
//! gRPC trailers), enforces the idle timeout between frames, and records the request's
//! outcome exactly once: when the body ends, fails, or is dropped by a departing client.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::Sleep;

use crate::config::Signal;
use crate::telemetry::signals::json_number;
use crate::telemetry::{Class, PairStats, UpstreamErrorKind, VersionCounters};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client's body broke the route's size limit or failed while streaming upstream.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error("request body exceeds the route's max_request_body")]
    TooLarge,
    #[error("reading the request body failed: {0}")]
    Read(#[source] hyper::Error),
    #[error("the client sent no request body bytes for the route's idle timeout")]
    Timeout,
}

/// Set when a streamed request body failed on the client's side, so the proxy can tell a
/// client-caused upstream error from an upstream fault.
#[derive(Debug, Default)]
pub struct ClientBodyFlag {
    pub too_large: AtomicBool,
    pub timed_out: AtomicBool,
    pub failed: AtomicBool,
}

pin_project! {
    /// The body sent upstream.
    #[project = ReqBodyProj]
    pub enum ReqBody {
        Empty,
        /// Fully buffered: cloning it replays it.
        Full { data: Option<Bytes> },
        /// Already-read prefix, then the rest of the client's body, size-limited.
        Stream {
            prefix: Option<Bytes>,
            #[pin]
            inner: Incoming,
            remaining: u64,
            flag: Arc<ClientBodyFlag>,
            // Re-armed at every frame: a client that stops sending mid-body (slowloris on
            // the body; hyper has no body timeout) is cut off after the route's idle timeout.
            idle: Duration,
            deadline: Pin<Box<tokio::time::Sleep>>,
        },
    }
}

impl ReqBody {
    /// The rest of the client's body, streamed with `remaining` bytes still allowed and at
    /// most `idle` between frames.
    pub fn stream(
        prefix: Option<Bytes>,
        inner: Incoming,
        remaining: u64,
        flag: Arc<ClientBodyFlag>,
        idle: Duration,
    ) -> Self {
        ReqBody::Stream {
            prefix,
            inner,
            remaining,
            flag,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }

    pub fn full(b: Bytes) -> Self {
        if b.is_empty() {
            ReqBody::Empty
        } else {
            ReqBody::Full { data: Some(b) }
        }
    }

    /// A copy for a retry, if this body can be replayed.
    pub fn replay(&self) -> Option<ReqBody> {
        match self {
            ReqBody::Empty => Some(ReqBody::Empty),
            ReqBody::Full { data } => Some(ReqBody::Full { data: data.clone() }),
            ReqBody::Stream { .. } => None,
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            ReqBodyProj::Empty => Poll::Ready(None),
            ReqBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ReqBodyProj::Stream {
                prefix,
                inner,
                remaining,
                flag,
                idle,
                deadline,
            } => {
                if let Some(p) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(p))));
                }
                let polled = inner.poll_frame(cx);
                if polled.is_ready() {
                    deadline.as_mut().reset(tokio::time::Instant::now() + *idle);
                }
                match polled {
                    Poll::Pending => {
                        if deadline.as_mut().poll(cx).is_ready() {
                            flag.timed_out.store(true, Ordering::Relaxed);
                            flag.failed.store(true, Ordering::Relaxed);
                            return Poll::Ready(Some(Err(Box::new(ClientBodyError::Timeout))));
                        }
                        Poll::Pending
                    }
                    Poll::Ready(None) => Poll::Ready(None),
                    Poll::Ready(Some(Err(e))) => {
                        flag.failed.store(true, Ordering::Relaxed);
                        Poll::Ready(Some(Err(Box::new(ClientBodyError::Read(e)))))
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(d) = frame.data_ref() {
                            let n = d.len() as u64;
                            if n > *remaining {
                                flag.too_large.store(true, Ordering::Relaxed);
                                flag.failed.store(true, Ordering::Relaxed);
                                return Poll::Ready(Some(Err(Box::new(ClientBodyError::TooLarge))));
                            }
                            *remaining -= n;
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Full { data } => data.is_none(),
            ReqBody::Stream { prefix, inner, .. } => prefix.is_none() && inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ReqBody::Stream { prefix, inner, .. } => {
                let p = prefix.as_ref().map_or(0, |d| d.len() as u64);
                let h = inner.size_hint();
                let mut s = SizeHint::new();
                s.set_lower(h.lower() + p);
                if let Some(u) = h.upper() {
                    s.set_upper(u + p);
                }
                s
            }
        }
    }
}

/// gRPC statuses that are the server's fault (SPEC §4): UNKNOWN, DEADLINE_EXCEEDED,
/// INTERNAL, UNAVAILABLE, DATA_LOSS.
pub fn grpc_status_is_fault(v: &HeaderValue) -> bool {
    matches!(v.as_bytes(), b"2" | b"4" | b"13" | b"14" | b"15")
}

/// What a finished exchange is recorded as.
pub struct Recording {
    pub stats: Arc<PairStats>,
    pub counters: Arc<VersionCounters>,
    pub start: Instant,
    pub status: u16,
    pub grpc: bool,
    /// `grpc-status` of a trailers-only response, if any.
    pub grpc_fault_in_headers: bool,
    /// The drift rule's `json:` signal is read from this body.
    pub capture: Option<Capture>,
}

/// Buffers a JSON response body (up to [`Signal::JSON_BODY_LIMIT`]) to read the drift
/// signal's field from it when the body completes.
pub struct Capture {
    pub field: Arc<str>,
    pub buf: BytesMut,
}

impl Capture {
    fn push(&mut self, data: &Bytes) {
        if self.buf.len() + data.len() <= Signal::JSON_BODY_LIMIT {
            self.buf.extend_from_slice(data);
        } else {
            // Too long to be worth parsing: give up on this body, keep the memory bounded.
            self.buf = BytesMut::new();
            self.field = Arc::from("");
        }
    }
}

impl Recording {
    fn finish(self, ttfb: Option<Duration>, outcome: End) {
        let total = self.start.elapsed();
        if let (Some(c), End::Complete { .. }, true) = (&self.capture, &outcome, self.status < 400)
        {
            if !c.field.is_empty() {
                if let Some(x) = json_number(&c.buf, &c.field) {
                    self.stats.signals.push_sample(x);
                }
            }
        }
        let class = match outcome {
            End::Complete { grpc_fault } => {
                if self.status >= 500 {
                    self.counters.upstream_error(UpstreamErrorKind::Status5xx);
                    Class::Error
                } else if self.grpc && (grpc_fault || self.grpc_fault_in_headers) {
                    self.counters.upstream_error(UpstreamErrorKind::Grpc);
                    Class::Error
                } else if self.status >= 400 {
                    Class::ClientError
                } else {
                    Class::Success
                }
            }
            End::UpstreamFailed(kind) => {
                self.counters.upstream_error(kind);
                Class::Error
            }
            End::ClientGone => Class::ClientAbort,
        };
        self.stats.record(class, self.status, ttfb, total);
    }
}

enum End {
    Complete { grpc_fault: bool },
    UpstreamFailed(UpstreamErrorKind),
    ClientGone,
}

/// The upstream stopped sending for longer than the route's idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("upstream idle for longer than {0:?}")]
pub struct IdleTimeout(pub Duration);

pin_project! {
    /// An upstream response body on its way to the client.
    pub struct Metered {
        #[pin]
        inner: Incoming,
        #[pin]
        idle: Sleep,
        idle_for: Duration,
        ttfb: Option<Duration>,
        rec: Option<Recording>,
    }

    impl PinnedDrop for Metered {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(rec) = this.rec.take() {
                // hyper drops a body that says it is already complete (trailers-only gRPC,
                // HEAD, 204) without polling it: that is a completed exchange, not an abort.
                if this.inner.is_end_stream() {
                    let ttfb = this.ttfb.or_else(|| Some(rec.start.elapsed()));
                    rec.finish(ttfb, End::Complete { grpc_fault: false });
                } else {
                    rec.finish(*this.ttfb, End::ClientGone);
                }
            }
        }
    }
}

impl Metered {
    pub fn new(inner: Incoming, idle_for: Duration, rec: Recording) -> Self {
        Metered {
            inner,
            idle: tokio::time::sleep(idle_for),
            idle_for,
            ttfb: None,
            rec: Some(rec),
        }
    }
}

impl Body for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if this.ttfb.is_none() {
                    if let Some(rec) = this.rec.as_ref() {
                        *this.ttfb = Some(rec.start.elapsed());
                    }
                }
                if let Some(trailers) = frame.trailers_ref() {
                    let fault = trailers_fault(trailers);
                    if let Some(rec) = this.rec.take() {
                        rec.finish(*this.ttfb, End::Complete { grpc_fault: fault });
                    }
                } else {
                    if let (
                        Some(data),
                        Some(Recording {
                            capture: Some(c), ..
                        }),
                    ) = (frame.data_ref(), this.rec.as_mut())
                    {
                        c.push(data);
                    }
                    let deadline = tokio::time::Instant::now() + *this.idle_for;
                    this.idle.as_mut().reset(deadline);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                if let Some(rec) = this.rec.take() {
                    let ttfb = this.ttfb.or_else(|| Some(rec.start.elapsed()));
                    rec.finish(ttfb, End::Complete { grpc_fault: false });
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(rec) = this.rec.take() {
                    rec.finish(*this.ttfb, End::UpstreamFailed(UpstreamErrorKind::Reset));
                }
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Pending => {
                if this.idle.as_mut().poll(cx).is_ready() {
                    if let Some(rec) = this.rec.take() {
                        rec.finish(*this.ttfb, End::UpstreamFailed(UpstreamErrorKind::Timeout));
                    }
                    return Poll::Ready(Some(Err(Box::new(IdleTimeout(*this.idle_for)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future;

fn trailers_fault(t: &HeaderMap) -> bool {
    t.get("grpc-status").is_some_and(grpc_status_is_fault)
}

pin_project! {
    /// The body sent to the client.
    #[project = RespBodyProj]
    pub enum RespBody {
        /// Written by the proxy itself (errors, admin).
        Full { data: Option<Bytes> },
        /// Proxied from an upstream.
        Proxied { #[pin] inner: Metered },
    }
}

impl RespBody {
    pub fn full(b: impl Into<Bytes>) -> Self {
        RespBody::Full {
            data: Some(b.into()),
        }
    }
    pub fn empty() -> Self {
        RespBody::Full { data: None }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            RespBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            RespBodyProj::Proxied { inner } => inner.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full { data } => data.is_none(),
            RespBody::Proxied { inner } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RespBody::Proxied { inner } => inner.size_hint(),
        }
    }
}
