//! Body types of the proxy, both directions.
//!
//! [`ReqBody`] goes upstream: empty, a buffered body (model routing read it), a client body
//! streamed as it arrives ([`ReplayBody`]: full duplex, with its first 64 KiB kept for a
//! retry's replay), or a shadow's copy of one ([`ShadowBody`]). [`RespBody`] goes to the
//! client: a small body the proxy wrote itself, or the upstream's body wrapped in
//! [`Metered`], which passes frames through one by one (SSE, gRPC trailers), enforces the
//! idle timeout between frames, and hands the exchange's end to its
//! [`Recording`](super::outcome::Recording) exactly once.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::sync::{mpsc, Notify};
use tokio::time::Sleep;

use super::client::UpstreamBody;
use super::outcome::{End, Recording};
use crate::telemetry::UpstreamErrorKind;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Body bytes kept for a retry: a body that ends within them can be replayed; a larger one
/// is never retried once sent (Linkerd never retries bodies over 64 KiB either).
pub const REPLAY_BUFFER: usize = 64 * 1024;

/// Request body bytes the whole process may hold in buffers at once (replay buffers and
/// model routing's reads). Beyond it, replay buffers stop (no retry) and model routing
/// answers 503: 10,000 requests in flight cannot pin 10,000 x `max_request_body`.
pub const MAX_BUFFERED_REQUEST_BYTES: usize = 256 * 1024 * 1024;

static BUFFERED: AtomicUsize = AtomicUsize::new(0);

/// A reservation of `n` bytes of [`MAX_BUFFERED_REQUEST_BYTES`], released on drop.
#[derive(Debug, Default)]
pub struct Buffered(usize);

impl Buffered {
    /// Grows the reservation by `n` bytes, if the process-wide cap allows.
    pub fn grow(&mut self, n: usize) -> bool {
        let ok = BUFFERED
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b + n <= MAX_BUFFERED_REQUEST_BYTES).then_some(b + n)
            })
            .is_ok();
        if ok {
            self.0 += n;
        }
        ok
    }
}

impl Drop for Buffered {
    fn drop(&mut self) {
        if self.0 > 0 {
            BUFFERED.fetch_sub(self.0, Ordering::Relaxed);
        }
    }
}

/// Request body bytes held in buffers right now, process-wide.
pub fn buffered_request_bytes() -> usize {
    BUFFERED.load(Ordering::Relaxed)
}

/// How the client's body failed: never the version's fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientBodyError {
    #[error("request body exceeds the route's max_request_body")]
    TooLarge,
    #[error("reading the request body failed")]
    Read,
    #[error("the client sent no request body bytes for the route's idle timeout")]
    Timeout,
}

/// Not the client's body: a retry found its body still held by the previous attempt.
#[derive(Debug, thiserror::Error)]
#[error("request body is still held by a previous attempt")]
pub struct BodyBusy;

/// When the request body was completely handed to the upstream connection: the
/// `first_byte` timer and the TTFB measurement start there (SPEC section 4).
#[derive(Debug)]
pub struct Sent {
    at: OnceLock<Instant>,
    notify: Notify,
    base: Instant,
    /// Milliseconds since `base` when a frame was last handed to the upstream connection
    /// (or the body was first polled).
    progress_ms: AtomicU64,
    /// The upstream connection asked for more and the client has not sent it yet.
    waiting_on_client: AtomicBool,
    error: OnceLock<ClientBodyError>,
    received: AtomicU64,
    /// Milliseconds since `base` when the client last sent body bytes.
    read_ms: AtomicU64,
}

impl Default for Sent {
    fn default() -> Self {
        Sent {
            at: OnceLock::new(),
            notify: Notify::new(),
            base: Instant::now(),
            progress_ms: AtomicU64::new(0),
            waiting_on_client: AtomicBool::new(false),
            error: OnceLock::new(),
            received: AtomicU64::new(0),
            read_ms: AtomicU64::new(0),
        }
    }
}

impl Sent {
    fn mark(&self) {
        if self.at.set(Instant::now()).is_ok() {
            self.notify.notify_waiters();
        }
    }

    pub fn at(&self) -> Option<Instant> {
        self.at.get().copied()
    }

    fn progress(&self, waiting_on_client: bool) {
        self.waiting_on_client
            .store(waiting_on_client, Ordering::Relaxed);
        if !waiting_on_client {
            let ms = self.base.elapsed().as_millis() as u64;
            self.progress_ms.store(ms, Ordering::Relaxed);
        }
    }

    /// The upstream has taken nothing of a body the client is ready to give for `idle`:
    /// it stopped reading (a full socket), the version's fault.
    pub fn upstream_stalled(&self, idle: Duration) -> bool {
        if self.at().is_some() || self.waiting_on_client.load(Ordering::Relaxed) {
            return false;
        }
        let last = Duration::from_millis(self.progress_ms.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last) >= idle
    }

    /// Why the client's body failed, if it did.
    pub fn client_error(&self) -> Option<ClientBodyError> {
        self.error.get().copied()
    }

    /// The client's body is still coming (not ended, not failed).
    pub fn open(&self) -> bool {
        self.at().is_none() && self.error.get().is_none()
    }

    /// Bytes read from the client so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// When the client last sent body bytes (or the body was created).
    pub fn last_read(&self) -> Instant {
        self.base + Duration::from_millis(self.read_ms.load(Ordering::Relaxed))
    }

    /// Resolves once the body has been sent.
    pub async fn wait(&self) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.at.get().is_some() {
            return;
        }
        notified.await;
    }
}

/// The client's body as it is read: size limit, idle timeout between frames.
struct Source {
    inner: Incoming,
    remaining: u64,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    /// The deadline runs from the first poll of an attempt: before that, the client cannot
    /// be expected to send (hyper sends `100 Continue` on the first read).
    armed: bool,
}

impl Source {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        if !self.armed {
            self.armed = true;
            let at = tokio::time::Instant::now() + self.idle;
            self.deadline.as_mut().reset(at);
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Pending => {
                if self.deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(ClientBodyError::Timeout)));
                }
                Poll::Pending
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(_))) => Poll::Ready(Some(Err(ClientBodyError::Read))),
            Poll::Ready(Some(Ok(frame))) => {
                let at = tokio::time::Instant::now() + self.idle;
                self.deadline.as_mut().reset(at);
                if let Some(d) = frame.data_ref() {
                    let n = d.len() as u64;
                    if n > self.remaining {
                        return Poll::Ready(Some(Err(ClientBodyError::TooLarge)));
                    }
                    self.remaining -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }
}

/// A frame for the shadow copy, or the mark that the body ended completely.
pub enum Tee {
    Frame(Frame<Bytes>),
    End,
}

/// What the attempts of one request share about its body.
struct ReplayState {
    /// The client's body, while no attempt is reading it.
    source: Option<Source>,
    /// The body's first bytes, in frames, while they fit [`REPLAY_BUFFER`].
    chunks: Vec<Bytes>,
    reserved: Buffered,
    /// The body outgrew the buffer: it cannot be replayed.
    overflowed: bool,
    /// The client's body ended (with these trailers).
    ended: bool,
    trailers: Option<HeaderMap>,
    /// Frames for the shadow copy, while it keeps up.
    shadow: Option<(mpsc::Sender<Tee>, Arc<ShadowLink>)>,
}

/// What a shadow copy and the client's body share.
#[derive(Debug, Default)]
pub struct ShadowLink {
    /// The copy was cut because the shadow read slower than the client sent.
    lagged: AtomicBool,
    /// The copy's body was completely handed to the shadow upstream.
    pub sent: Arc<Sent>,
}

struct ReplayShared {
    state: Mutex<ReplayState>,
    sent: Arc<Sent>,
}

fn lock(m: &Mutex<ReplayState>) -> MutexGuard<'_, ReplayState> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ReplayState {
    fn tee(&mut self, t: Tee) {
        if let Some((tx, link)) = &self.shadow {
            if tx.try_send(t).is_err() {
                // The shadow upstream reads slower than the client sends (or is gone):
                // the copy is cut, the client is never slowed down.
                link.lagged.store(true, Ordering::Relaxed);
                self.shadow = None;
            }
        }
    }
}

/// The client's request body, streamed to the upstream as it arrives, its first
/// [`REPLAY_BUFFER`] bytes kept so a retry can send them again (the shape of linkerd2-proxy's
/// `ReplayBody`). Clones share the state; the attempt being polled holds the client's body
/// and gives it back when dropped, so a retry after a connect error continues where the
/// failed attempt stopped.
pub struct ReplayBody {
    shared: Arc<ReplayShared>,
    source: Option<Source>,
    /// Buffered frames this clone has yielded.
    pos: usize,
    /// This clone stopped buffering (the body outgrew the buffer, no shadow): it reads on
    /// without the shared lock.
    direct: bool,
    done: bool,
}

impl ReplayBody {
    /// `remaining`: bytes the route still accepts; `idle`: the longest pause between frames.
    pub fn new(inner: Incoming, remaining: u64, idle: Duration) -> Self {
        let source = Source {
            inner,
            remaining,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            armed: false,
        };
        ReplayBody {
            shared: Arc::new(ReplayShared {
                state: Mutex::new(ReplayState {
                    source: Some(source),
                    chunks: Vec::new(),
                    reserved: Buffered::default(),
                    overflowed: false,
                    ended: false,
                    trailers: None,
                    shadow: None,
                }),
                sent: Arc::new(Sent::default()),
            }),
            source: None,
            pos: 0,
            direct: false,
            done: false,
        }
    }

    /// Another attempt's copy, if the body can still be sent in full: it ended within the
    /// buffer, or nothing of it is lost (the client's body is not held by another attempt
    /// and nothing outgrew the buffer).
    pub fn replay(&self) -> Option<ReplayBody> {
        self.replayable().then(|| ReplayBody {
            shared: self.shared.clone(),
            source: None,
            pos: 0,
            direct: false,
            done: false,
        })
    }

    /// A copy for the shadow version: every frame read from the client from now on
    /// (nothing has been read yet when this is called), through a bounded queue.
    pub fn shadow(&self) -> ShadowBody {
        let (tx, rx) = mpsc::channel(SHADOW_QUEUE);
        let link = Arc::new(ShadowLink::default());
        lock(&self.shared.state).shadow = Some((tx, link.clone()));
        ShadowBody::Stream {
            rx,
            complete: false,
            link,
        }
    }

    /// Whether every byte of the body can still be sent again (see [`Self::replay`]).
    fn replayable(&self) -> bool {
        let st = lock(&self.shared.state);
        (st.ended || st.source.is_some())
            && !st.overflowed
            && self.shared.sent.client_error().is_none()
    }

    pub fn sent(&self) -> Arc<Sent> {
        self.shared.sent.clone()
    }

    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.source.is_none() {
            let mut st = lock(&self.shared.state);
            if let Some(c) = st.chunks.get(self.pos) {
                self.pos += 1;
                return Poll::Ready(Some(Ok(Frame::data(c.clone()))));
            }
            if st.ended {
                self.done = true;
                self.shared.sent.mark();
                return Poll::Ready(st.trailers.clone().map(|t| Ok(Frame::trailers(t))));
            }
            if let Some(e) = self.shared.sent.client_error() {
                return Poll::Ready(Some(Err(Box::new(e))));
            }
            if st.overflowed && self.pos == 0 && self.shared.sent.received() > 0 {
                // The buffer was given up while another attempt read on: this copy would
                // miss the body's beginning.
                return Poll::Ready(Some(Err(Box::new(BodyBusy))));
            }
            match st.source.take() {
                Some(mut s) => {
                    s.armed = false;
                    self.source = Some(s);
                }
                None => return Poll::Ready(Some(Err(Box::new(BodyBusy)))),
            }
        }
        let Some(source) = self.source.as_mut() else {
            return Poll::Ready(Some(Err(Box::new(BodyBusy))));
        };
        let polled = source.poll(cx);
        let sent = &self.shared.sent;
        sent.progress(polled.is_pending());
        if let Poll::Ready(Some(Ok(f))) = &polled {
            if let Some(d) = f.data_ref() {
                sent.received.fetch_add(d.len() as u64, Ordering::Relaxed);
                let ms = sent.base.elapsed().as_millis() as u64;
                sent.read_ms.store(ms, Ordering::Relaxed);
            }
        }
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame)))
                if self.direct && frame.is_data() && !source.inner.is_end_stream() =>
            {
                // Past the buffer with no shadow: the hot path of a large upload.
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let mut st = lock(&self.shared.state);
                if let Some(d) = frame.data_ref() {
                    if !st.overflowed {
                        let fits = st.reserved.0 + d.len() <= REPLAY_BUFFER;
                        if fits && st.reserved.grow(d.len()) {
                            st.chunks.push(d.clone());
                            self.pos += 1;
                        } else {
                            st.overflowed = true;
                            st.chunks = Vec::new();
                            st.reserved = Buffered::default();
                        }
                    }
                    st.tee(Tee::Frame(Frame::data(d.clone())));
                    self.direct = st.overflowed && st.shadow.is_none();
                    if source.inner.is_end_stream() {
                        // The declared length is complete: hyper will not poll for the
                        // end, so this is where the body has been sent.
                        st.ended = true;
                        st.tee(Tee::End);
                        st.shadow = None;
                        drop(st);
                        self.source = None;
                        self.done = true;
                        self.shared.sent.mark();
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    st.ended = true;
                    st.trailers = Some(t.clone());
                    st.tee(Tee::Frame(Frame::trailers(t.clone())));
                    st.tee(Tee::End);
                    st.shadow = None;
                    drop(st);
                    self.source = None;
                    self.done = true;
                    self.shared.sent.mark();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                let mut st = lock(&self.shared.state);
                st.ended = true;
                st.tee(Tee::End);
                st.shadow = None;
                drop(st);
                self.source = None;
                self.done = true;
                self.shared.sent.mark();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                let _ = self.shared.sent.error.set(e);
                let mut st = lock(&self.shared.state);
                st.shadow = None;
                drop(st);
                self.source = None;
                Poll::Ready(Some(Err(Box::new(e))))
            }
        }
    }

    fn is_end_stream_inner(&self) -> bool {
        if self.done {
            return true;
        }
        if let Some(s) = &self.source {
            return s.inner.is_end_stream() && self.pos == 0;
        }
        let st = lock(&self.shared.state);
        self.pos >= st.chunks.len() && st.ended && st.trailers.is_none()
    }
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        if let Some(s) = self.source.take() {
            lock(&self.shared.state).source = Some(s);
        }
    }
}

/// Frames queued for a shadow copy before it is cut for being slow.
const SHADOW_QUEUE: usize = 16;

/// A shadow's copy of the request body.
pub enum ShadowBody {
    Empty,
    Full {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    Stream {
        rx: mpsc::Receiver<Tee>,
        complete: bool,
        link: Arc<ShadowLink>,
    },
}

/// The shadow's copy stopped before the client's body ended (slow shadow, client failure):
/// the copy is abandoned, never blamed on the shadow version.
#[derive(Debug, thiserror::Error)]
#[error("shadow copy of the request body was cut")]
pub struct ShadowCut {
    /// Cut for reading slower than the client sent (else: the client's body failed).
    pub slow: bool,
}

impl ShadowBody {
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self {
            ShadowBody::Empty => Poll::Ready(None),
            ShadowBody::Full { data, trailers } => Poll::Ready(
                data.take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
            ShadowBody::Stream { rx, complete, link } => {
                if *complete {
                    return Poll::Ready(None);
                }
                match rx.poll_recv(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Some(Tee::Frame(f))) => Poll::Ready(Some(Ok(f))),
                    Poll::Ready(Some(Tee::End)) => {
                        *complete = true;
                        link.sent.mark();
                        Poll::Ready(None)
                    }
                    Poll::Ready(None) => Poll::Ready(Some(Err(Box::new(ShadowCut {
                        slow: link.lagged.load(Ordering::Relaxed),
                    })))),
                }
            }
        }
    }
}

/// The body sent upstream.
pub enum ReqBody {
    Empty,
    /// Fully buffered (model routing read it): replayable, trailers kept.
    Full {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    Stream(ReplayBody),
    Shadow(ShadowBody),
}

impl ReqBody {
    pub fn full(b: Bytes, trailers: Option<HeaderMap>) -> Self {
        if b.is_empty() && trailers.is_none() {
            ReqBody::Empty
        } else {
            ReqBody::Full {
                data: (!b.is_empty()).then_some(b),
                trailers,
            }
        }
    }

    /// A copy for a retry, if this body can be replayed.
    pub fn replay(&self) -> Option<ReqBody> {
        match self {
            ReqBody::Empty => Some(ReqBody::Empty),
            ReqBody::Full { data, trailers } => Some(ReqBody::Full {
                data: data.clone(),
                trailers: trailers.clone(),
            }),
            ReqBody::Stream(s) => s.replay().map(ReqBody::Stream),
            ReqBody::Shadow(_) => None,
        }
    }

    /// A copy for the shadow version. Call before the body is first polled.
    pub fn shadow(&self) -> ShadowBody {
        match self {
            ReqBody::Empty | ReqBody::Shadow(_) => ShadowBody::Empty,
            ReqBody::Full { data, trailers } => ShadowBody::Full {
                data: data.clone(),
                trailers: trailers.clone(),
            },
            ReqBody::Stream(s) => s.shadow(),
        }
    }

    /// When this body was completely handed to the upstream, if it is a streamed one
    /// (`None`: a body in memory, sent at once).
    pub fn sent(&self) -> Option<Arc<Sent>> {
        match self {
            ReqBody::Stream(s) => Some(s.sent()),
            ReqBody::Shadow(ShadowBody::Stream { link, .. }) => Some(link.sent.clone()),
            _ => None,
        }
    }

    /// Whether a retry could send this body again in full, now.
    pub fn replayable(&self) -> bool {
        match self {
            ReqBody::Empty | ReqBody::Full { .. } => true,
            ReqBody::Stream(s) => s.replayable(),
            ReqBody::Shadow(_) => false,
        }
    }

    /// A handle that tells, after the body went into a request, whether the client's side
    /// of it failed.
    pub fn probe(&self) -> Probe {
        match self {
            ReqBody::Stream(s) => Probe(Some(s.shared.sent.clone())),
            _ => Probe(None),
        }
    }
}

/// See [`ReqBody::probe`]. Holds only the body's progress, never the body (nor its
/// buffers or its shadow's queue).
#[derive(Clone, Default)]
pub struct Probe(Option<Arc<Sent>>);

impl Probe {
    /// Why the client's body failed, if it did.
    pub fn client_error(&self) -> Option<ClientBodyError> {
        self.0.as_ref().and_then(|s| s.client_error())
    }

    /// The client's body is still coming: an exchange that goes quiet now may be waiting
    /// on the client (full duplex).
    pub fn open(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.open())
    }

    /// Bytes read from the client so far.
    pub fn received(&self) -> u64 {
        self.0.as_ref().map_or(0, |s| s.received())
    }

    /// When the client last sent body bytes.
    pub fn last_read(&self) -> Option<Instant> {
        self.0.as_ref().map(|s| s.last_read())
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Full { data, trailers } => Poll::Ready(
                data.take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
            ReqBody::Stream(s) => s.poll_inner(cx),
            ReqBody::Shadow(s) => s.poll_inner(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Full { data, trailers } => data.is_none() && trailers.is_none(),
            ReqBody::Stream(s) => s.is_end_stream_inner(),
            ReqBody::Shadow(ShadowBody::Empty) => true,
            ReqBody::Shadow(ShadowBody::Full { data, trailers }) => {
                data.is_none() && trailers.is_none()
            }
            ReqBody::Shadow(ShadowBody::Stream { complete, .. }) => *complete,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Full {
                data,
                trailers: None,
            } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            ReqBody::Stream(s) if s.pos == 0 && !s.done => match &s.source {
                Some(src) => src.inner.size_hint(),
                None => {
                    // Not started: the buffered bytes, then what the client still sends
                    // (hyper counts a declared length down as it is read).
                    let st = lock(&s.shared.state);
                    let buffered = st.chunks.iter().map(|c| c.len() as u64).sum::<u64>();
                    match &st.source {
                        Some(src) if !st.overflowed => match src.inner.size_hint().exact() {
                            Some(rest) => SizeHint::with_exact(buffered + rest),
                            None => SizeHint::default(),
                        },
                        None if st.ended && st.trailers.is_none() => SizeHint::with_exact(buffered),
                        _ => SizeHint::default(),
                    }
                }
            },
            _ => SizeHint::default(),
        }
    }
}

/// The upstream stopped sending for longer than the route's idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("upstream idle for longer than {0:?}")]
pub struct IdleTimeout(pub Duration);

pin_project! {
    /// An upstream response body on its way to the client (or, for a shadow, to nowhere).
    pub struct Metered {
        #[pin]
        inner: UpstreamBody,
        // The idle timer is not moved on every frame (a timer-wheel removal and insertion
        // per chunk): frames only note their time, and a timer that fires before
        // `last_frame + idle_for` is re-armed there.
        #[pin]
        idle: Sleep,
        idle_for: Duration,
        last_frame: tokio::time::Instant,
        rec: Option<Recording>,
    }

    impl PinnedDrop for Metered {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(rec) = this.rec.take() {
                // hyper drops a body that says it is already complete (trailers-only gRPC,
                // HEAD, 204) without polling it: that is a completed exchange, not an abort.
                if this.inner.is_end_stream() {
                    rec.close(End::Answered { trailers: None });
                } else {
                    rec.close(End::ClientGone);
                }
            }
        }
    }
}

impl Metered {
    pub fn new(inner: UpstreamBody, idle_for: Duration, rec: Recording) -> Self {
        let now = tokio::time::Instant::now();
        Metered {
            inner,
            idle: tokio::time::sleep_until(now + idle_for),
            idle_for,
            last_frame: now,
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
                if let Some(trailers) = frame.trailers_ref() {
                    if let Some(rec) = this.rec.take() {
                        rec.close(End::Answered {
                            trailers: Some(trailers),
                        });
                    }
                } else {
                    if let (Some(data), Some(rec)) = (frame.data_ref(), this.rec.as_mut()) {
                        rec.data(data);
                    }
                    *this.last_frame = tokio::time::Instant::now();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                if let Some(rec) = this.rec.take() {
                    rec.close(End::Answered { trailers: None });
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(rec) = this.rec.take() {
                    rec.close(End::Upstream(UpstreamErrorKind::Reset));
                }
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Pending => {
                while this.idle.as_mut().poll(cx).is_ready() {
                    let due = *this.last_frame + *this.idle_for;
                    if due > this.idle.deadline() {
                        // A frame came after the timer was set: not idle yet.
                        this.idle.as_mut().reset(due);
                        continue;
                    }
                    if let Some(rec) = this.rec.take() {
                        rec.close(End::Upstream(UpstreamErrorKind::Timeout));
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
