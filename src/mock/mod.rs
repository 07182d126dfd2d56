//! `rollgate mock-model`: a small OpenAI-compatible model server to put behind rollgate.
//!
//! It exists so that rollgate can be tried, demonstrated and tested without a GPU or a real
//! model server: `rollgate demo` runs two of these in-process (a stable one and a canary that
//! starts failing), the integration tests use it as a realistic upstream, and a user can start
//! one per version from the command line and point a config file at them.
//!
//! # What it serves
//!
//! | request | answer |
//! |---|---|
//! | `POST /v1/chat/completions` | a `chat.completion`, or SSE `chat.completion.chunk`s with `"stream": true` |
//! | `POST /v1/completions` | a `text_completion`, or SSE chunks with `"stream": true` |
//! | `GET /v1/models` | a list holding the served name |
//! | `GET /health/ready`, `GET /health` | 200, or 503 after [`MockModel::set_healthy`]`(false)` |
//! | anything else | 404 (405 for a known path with the wrong method) |
//!
//! Completions are shaped like OpenAI's (`id`, `object`, `created`, `model`, `choices`,
//! `usage`); `model` is always the served name, whatever the request asked for, so a reader
//! can see which version answered. A request body that is not a JSON object gets a 400 with an
//! OpenAI-style error (`{"error": {"message", "type", "param", "code"}}`). Streams send
//! `chunks` events `data: {json}\n\n`, the first at once and then one every `chunk_interval`,
//! then `data: [DONE]\n\n`.
//!
//! Every response carries `x-mock-version: NAME` and `x-model-score: F`, a number drawn
//! uniformly from `score_mean ± score_jitter`; completion bodies (and every stream chunk)
//! repeat it as a top-level `"score"` field. Moving the mean while serving is how the demo
//! shows a drift rollback on `header:x-model-score` or `json:score`.
//!
//! # Faults
//!
//! Only the two completion endpoints misbehave; health and model listing stay truthful so a
//! fault shows up as what it is (errors or latency) and not as a failed health check.
//! `latency` delays the response head (time to first byte, TTFT for streams) with
//! `tokio::time::sleep`; then, with probability `error_rate`, the answer is a 500 with an
//! OpenAI-style `server_error`. Malformed requests get their 400 at once: a client error is
//! not the server's fault.
//!
//! # Guarantees
//!
//! The runtime knobs ([`MockModel::set_error_rate`], [`MockModel::set_latency`],
//! [`MockModel::set_score_mean`], [`MockModel::set_healthy`], ...) are atomics: a request
//! reads them without a lock, and a change applies to requests that arrive after it.
//! [`serve`] speaks HTTP/1.1 and h2c (prior knowledge) on one port and drains on shutdown.

mod body;
mod service;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

pub use body::MockBody;
pub use service::{X_MOCK_VERSION, X_MODEL_SCORE};

/// How long [`serve`] waits for open connections (say, a stream in progress) after shutdown.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request body read; a bigger one gets 413.
pub const MAX_REQUEST_BODY: usize = 1024 * 1024;
/// Time a client has to send a complete HTTP/1.1 request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Back-off after an accept error such as EMFILE, so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// How a mock model behaves when it starts. The fault and score settings can be changed
/// later through [`MockModel`]; the rest are fixed for its lifetime.
#[derive(Clone, Debug, PartialEq)]
pub struct MockOptions {
    /// Served model name: `model` in responses, `x-mock-version` header, `/v1/models`.
    pub name: String,
    /// Delay before the response head of a completion.
    pub latency: Duration,
    /// Probability in `[0, 1]` that a completion is answered with a 500.
    pub error_rate: f64,
    /// Stream when the request does not say `"stream"` either way.
    pub stream_default: bool,
    /// Events in a stream (and words in a reply).
    pub chunks: u32,
    /// Gap between stream events.
    pub chunk_interval: Duration,
    /// Centre of the `x-model-score` signal.
    pub score_mean: f64,
    /// Half-width of the uniform noise added to the score.
    pub score_jitter: f64,
}

impl Default for MockOptions {
    /// The `rollgate mock-model` defaults: healthy, fast, never failing.
    fn default() -> Self {
        MockOptions {
            name: "mock".to_owned(),
            latency: Duration::ZERO,
            error_rate: 0.0,
            stream_default: false,
            chunks: 8,
            chunk_interval: Duration::from_millis(20),
            score_mean: 0.8,
            score_jitter: 0.05,
        }
    }
}

impl MockOptions {
    /// The defaults, serving as `name`.
    pub fn named(name: impl Into<String>) -> Self {
        MockOptions {
            name: name.into(),
            ..MockOptions::default()
        }
    }
}

/// Why a mock model could not start.
#[derive(Debug, thiserror::Error)]
pub enum MockError {
    #[error("model name {0:?} must be non-empty visible ASCII (it is sent as a header value)")]
    InvalidName(String),
    #[error("error rate {0} must be between 0 and 1")]
    InvalidErrorRate(f64),
    #[error("score mean {0} must be a finite number")]
    InvalidScoreMean(f64),
    #[error("score jitter {0} must be a finite number >= 0")]
    InvalidScoreJitter(f64),
    #[error("cannot watch for shutdown signals: {0}")]
    Signal(#[source] io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// A running mock model's state: what it serves, its runtime knobs and its counters.
///
/// Cloning is cheap (one `Arc`); every clone controls the same model, so a test or the demo
/// keeps a handle and turns knobs while [`serve`] answers requests with another.
#[derive(Clone, Debug)]
pub struct MockModel {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: Arc<str>,
    /// `name` as the `x-mock-version` value, validated once.
    name_header: HeaderValue,
    stream_default: bool,
    chunks: u32,
    chunk_interval: Duration,
    /// Knobs. Each is read on its own with `Relaxed`: they are independent settings and no
    /// request needs to see two of them change together.
    error_rate_bits: AtomicU64,
    latency_nanos: AtomicU64,
    score_mean_bits: AtomicU64,
    score_jitter_bits: AtomicU64,
    healthy: AtomicBool,
    /// Counters.
    requests: AtomicU64,
    faults: AtomicU64,
}

impl MockModel {
    /// Validates `options` and builds the model (not yet serving: see [`serve`]).
    pub fn new(options: MockOptions) -> Result<MockModel, MockError> {
        let visible =
            !options.name.is_empty() && options.name.bytes().all(|b| b.is_ascii_graphic());
        let name_header = HeaderValue::from_str(&options.name)
            .ok()
            .filter(|_| visible)
            .ok_or_else(|| MockError::InvalidName(options.name.clone()))?;
        if !(0.0..=1.0).contains(&options.error_rate) {
            return Err(MockError::InvalidErrorRate(options.error_rate));
        }
        if !options.score_mean.is_finite() {
            return Err(MockError::InvalidScoreMean(options.score_mean));
        }
        if !(options.score_jitter.is_finite() && options.score_jitter >= 0.0) {
            return Err(MockError::InvalidScoreJitter(options.score_jitter));
        }
        Ok(MockModel {
            inner: Arc::new(Inner {
                name: options.name.into(),
                name_header,
                stream_default: options.stream_default,
                chunks: options.chunks,
                chunk_interval: options.chunk_interval,
                error_rate_bits: AtomicU64::new(options.error_rate.to_bits()),
                latency_nanos: AtomicU64::new(duration_nanos(options.latency)),
                score_mean_bits: AtomicU64::new(options.score_mean.to_bits()),
                score_jitter_bits: AtomicU64::new(options.score_jitter.to_bits()),
                healthy: AtomicBool::new(true),
                requests: AtomicU64::new(0),
                faults: AtomicU64::new(0),
            }),
        })
    }

    /// The served model name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Changes the fault probability for requests arriving from now on. Values outside
    /// `[0, 1]` are clamped (NaN counts as 0), so a knob turned too far still means something.
    pub fn set_error_rate(&self, rate: f64) {
        let rate = if rate.is_nan() {
            0.0
        } else {
            rate.clamp(0.0, 1.0)
        };
        self.inner
            .error_rate_bits
            .store(rate.to_bits(), Ordering::Relaxed);
    }

    pub fn error_rate(&self) -> f64 {
        f64::from_bits(self.inner.error_rate_bits.load(Ordering::Relaxed))
    }

    /// Changes the time-to-first-byte delay for requests arriving from now on.
    pub fn set_latency(&self, latency: Duration) {
        self.inner
            .latency_nanos
            .store(duration_nanos(latency), Ordering::Relaxed);
    }

    pub fn latency(&self) -> Duration {
        Duration::from_nanos(self.inner.latency_nanos.load(Ordering::Relaxed))
    }

    /// Moves the centre of the score signal (a non-finite value is ignored), e.g. to make a
    /// canary drift away from its baseline.
    pub fn set_score_mean(&self, mean: f64) {
        if mean.is_finite() {
            self.inner
                .score_mean_bits
                .store(mean.to_bits(), Ordering::Relaxed);
        }
    }

    pub fn score_mean(&self) -> f64 {
        f64::from_bits(self.inner.score_mean_bits.load(Ordering::Relaxed))
    }

    /// Changes the score noise; negative or non-finite values are ignored.
    pub fn set_score_jitter(&self, jitter: f64) {
        if jitter.is_finite() && jitter >= 0.0 {
            self.inner
                .score_jitter_bits
                .store(jitter.to_bits(), Ordering::Relaxed);
        }
    }

    pub fn score_jitter(&self) -> f64 {
        f64::from_bits(self.inner.score_jitter_bits.load(Ordering::Relaxed))
    }

    /// Makes `/health/ready` and `/health` answer 200 (`true`) or 503 (`false`), to drive
    /// rollgate's active health checks.
    pub fn set_healthy(&self, healthy: bool) {
        self.inner.healthy.store(healthy, Ordering::Relaxed);
    }

    pub fn healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Relaxed)
    }

    /// Completion requests received (both endpoints, whatever their outcome). Health checks
    /// and model listings are not counted, so this says how much traffic the version got.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// Completion requests answered with an injected 500.
    pub fn faults(&self) -> u64 {
        self.inner.faults.load(Ordering::Relaxed)
    }

    /// One draw of the score signal, rounded to 4 decimals so the header and the JSON field
    /// carry the same number.
    fn draw_score(&self) -> f64 {
        let jitter = self.score_jitter();
        let raw = self.score_mean() + jitter * (2.0 * fastrand::f64() - 1.0);
        (raw * 1e4).round() / 1e4
    }
}

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Answers requests on `listener` as `model` until `shutdown` completes, then stops accepting,
/// lets open connections finish for at most [`DRAIN_TIMEOUT`], and returns.
///
/// HTTP/1.1 and h2c (prior knowledge) share the port. Accept errors (EMFILE and the like) are
/// logged and retried after a short back-off rather than ending the server, so this has no
/// error to return.
pub async fn serve(listener: TcpListener, model: MockModel, shutdown: impl Future<Output = ()>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "mock model: accept failed; backing off");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let model = model.clone();
        let service = service_fn(move |req| {
            let model = model.clone();
            async move { Ok::<_, Infallible>(service::handle(&model, req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "mock model: connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout = ?DRAIN_TIMEOUT,
            "mock model: drain timed out with connections still open"
        );
    }
}

/// `rollgate mock-model`: binds `listen`, prints one line saying where it serves, answers
/// until SIGINT (Ctrl-C) or SIGTERM, then drains and returns.
pub async fn run(listen: SocketAddr, options: MockOptions) -> Result<(), MockError> {
    let model = MockModel::new(options)?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| MockError::Bind {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| MockError::Bind {
        addr: listen,
        source,
    })?;
    let shutdown = crate::app::shutdown_signal().map_err(MockError::Signal)?;
    println!(
        "rollgate mock-model: serving {} on http://{addr} \
         (POST /v1/chat/completions /v1/completions, GET /v1/models /health/ready)",
        model.name()
    );
    serve(listener, model, shutdown).await;
    Ok(())
}
