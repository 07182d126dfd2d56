//! The access log: one JSON object per proxied request (SPEC sections 3 and 7), written off
//! the request path.
//!
//! The request path builds an [`AccessEntry`] from values it already holds (clones of
//! `Arc`s, `Bytes`-backed header values and URI parts, numbers: no formatting) and hands it
//! to [`AccessLog::log`], which never blocks: the entry goes into a bounded channel, and
//! when the channel is full it is dropped and counted in
//! `rollgate_access_log_dropped_total`. A writer task serializes entries to JSON lines,
//! batches them in a buffer and writes the buffer whenever the channel is momentarily empty
//! (or the buffer is large), so a quiet proxy's lines appear at once and a busy one's are
//! written in large blocks.
//!
//! A file is opened in append mode (created `0640`) and reopened on SIGUSR1, so logrotate's
//! `postrotate kill -USR1` works; `stdout` and `stderr` are never reopened. A line that
//! cannot be written (disk full) is counted as dropped like one that found the channel full.
//!
//! One access log serves the process: [`install`] puts it where the request path finds it
//! ([`current`]). `rollgate run` installs the config's at start and a reload that changes
//! `access_log` installs a new one (new path and sample rate at once; the old writer
//! finishes the lines it holds, then closes its file).

use std::borrow::Cow;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderValue, Method, Uri, Version};
use prometheus_client::metrics::counter::Counter;
use serde::ser::{Serialize, SerializeStruct, Serializer};
use tokio::sync::{mpsc, oneshot};

use crate::config::{AccessLogConfig, AccessLogPath, VersionName};

/// Entries waiting for the writer before new ones are dropped: about a second of a busy
/// proxy's traffic, a few MiB at most.
pub const CHANNEL_CAPACITY: usize = 8192;

/// Serialized lines kept before a write even while entries keep coming.
const WRITE_AT: usize = 64 * 1024;

/// One proxied request, as the access log records it. Every field is cheap to fill on the
/// request path (owned copies of small values, reference-counted strings and buffers);
/// formatting happens in the writer task.
#[derive(Debug, Clone)]
pub struct AccessEntry {
    /// When the request's head was received.
    pub start_time: SystemTime,
    /// `None` (`null`) only for a head that could not be parsed ([`AccessEntry::unparsed`]).
    pub method: Option<Method>,
    /// Path and query as the client sent them; `None` as `method`.
    pub path: Option<PathAndQuery>,
    /// The client's protocol: serialized `HTTP/1.0`, `HTTP/1.1`, `HTTP/2`.
    pub protocol: Version,
    /// Status code sent to the client (0: none was, e.g. the client went away first).
    pub code: u16,
    /// Request body bytes received from the client.
    pub bytes_received: u64,
    /// Response body bytes sent to the client.
    pub bytes_sent: u64,
    /// From `start_time` to the end of the response body.
    pub duration_ms: f64,
    /// From the upstream request to the upstream's response head (`None`: no upstream
    /// answered).
    pub upstream_service_time_ms: Option<f64>,
    /// `x-request-id` as propagated or generated.
    pub request_id: Option<HeaderValue>,
    /// The `Host` header, or the HTTP/2 `:authority`.
    pub authority: Option<HeaderValue>,
    /// The endpoint that answered (`host:port`).
    pub upstream_host: Option<Authority>,
    pub route: Option<Arc<str>>,
    /// The version that finally answered.
    pub version: Option<VersionName>,
    /// Why that version: `pin`, `sticky`, `weight`, `retry`, `shadow` or `fallback`.
    pub reason: Option<&'static str>,
    /// Time to the first response body byte (TTFT for streams).
    pub ttfb_ms: Option<f64>,
    /// The response's `grpc-status` (trailer or trailers-only header), for gRPC.
    pub grpc_status: Option<u16>,
    /// The request's classification, as in `rollgate_requests_total{classification}`.
    pub classification: &'static str,
}

impl AccessEntry {
    /// An entry for a request whose head is `method`, `uri`, `version`, `headers`: method,
    /// path, protocol, authority and `x-request-id` (if the client sent one) filled in,
    /// everything that comes from the response left empty (`code` 0, no route or version,
    /// `classification` empty) for the caller to fill.
    pub fn from_request_head(
        start_time: SystemTime,
        method: &Method,
        uri: &Uri,
        version: Version,
        headers: &HeaderMap,
    ) -> AccessEntry {
        let authority = headers.get(http::header::HOST).cloned().or_else(|| {
            uri.authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        AccessEntry {
            start_time,
            method: Some(method.clone()),
            path: Some(
                uri.path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            ),
            protocol: version,
            request_id: headers.get(&crate::proxy::headers::X_REQUEST_ID).cloned(),
            authority,
            classification: "",
            ..AccessEntry::unparsed(start_time, 0)
        }
    }

    /// An HTTP/1.1 request head hyper refused before rollgate saw it (malformed, or over
    /// the size limits), answered by hyper with `code`. What the head would have said is
    /// unknown: method, path, authority and request id are `null`, as Envoy logs `-` for a
    /// downstream protocol error. Classified `refused`, like rollgate's own refusals.
    /// `start_time` is when hyper refused the head (where it began is not known: recording
    /// every head's first byte would cost a clock read per request) and `duration_ms` 0;
    /// `protocol` is that of the answer, HTTP/1.1, whatever version the head named.
    pub fn unparsed(start_time: SystemTime, code: u16) -> AccessEntry {
        AccessEntry {
            start_time,
            method: None,
            path: None,
            protocol: Version::HTTP_11,
            code,
            bytes_received: 0,
            bytes_sent: 0,
            duration_ms: 0.0,
            upstream_service_time_ms: None,
            request_id: None,
            authority: None,
            upstream_host: None,
            route: None,
            version: None,
            reason: None,
            ttfb_ms: None,
            grpc_status: None,
            classification: crate::telemetry::recorder::Class::Refused.as_str(),
        }
    }
}

/// `HTTP/1.1`, `HTTP/2`, as Envoy writes `%PROTOCOL%`.
fn protocol_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/?",
    }
}

/// A header value as text; bytes that are not UTF-8 become U+FFFD.
fn header_str(v: &HeaderValue) -> Cow<'_, str> {
    match v.to_str() {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(v.as_bytes()),
    }
}

/// Milliseconds rounded to the microsecond: a log line needs no more digits.
fn ms(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The JSON line's fields, in this order; absent values are `null`, so every line has
/// every field.
impl Serialize for AccessEntry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_struct("AccessEntry", 18)?;
        m.serialize_field(
            "start_time",
            &crate::control::audit::timestamp(self.start_time),
        )?;
        m.serialize_field("method", &self.method.as_ref().map(Method::as_str))?;
        m.serialize_field("path", &self.path.as_ref().map(PathAndQuery::as_str))?;
        m.serialize_field("protocol", protocol_str(self.protocol))?;
        m.serialize_field("code", &self.code)?;
        m.serialize_field("bytes_received", &self.bytes_received)?;
        m.serialize_field("bytes_sent", &self.bytes_sent)?;
        m.serialize_field("duration_ms", &ms(self.duration_ms))?;
        m.serialize_field(
            "upstream_service_time_ms",
            &self.upstream_service_time_ms.map(ms),
        )?;
        m.serialize_field("request_id", &self.request_id.as_ref().map(header_str))?;
        m.serialize_field("authority", &self.authority.as_ref().map(header_str))?;
        m.serialize_field(
            "upstream_host",
            &self.upstream_host.as_ref().map(Authority::as_str),
        )?;
        m.serialize_field("route", &self.route.as_deref())?;
        m.serialize_field("version", &self.version.as_ref().map(VersionName::as_str))?;
        m.serialize_field("reason", &self.reason)?;
        m.serialize_field("ttfb_ms", &self.ttfb_ms.map(ms))?;
        m.serialize_field("grpc_status", &self.grpc_status)?;
        m.serialize_field("classification", self.classification)?;
        m.end()
    }
}

// Nearly every message is an entry: boxing it would cost an allocation per request to
// shrink the rare flush.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Entry(AccessEntry),
    /// Write everything received so far, then answer.
    Flush(oneshot::Sender<()>),
}

/// A running access log: the sending end of the writer task's channel. Dropping the last
/// handle lets the writer write what it holds and end.
pub struct AccessLog {
    tx: mpsc::Sender<Msg>,
    config: AccessLogConfig,
    dropped: Counter,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("config", &self.config)
            .finish()
    }
}

impl AccessLog {
    /// Opens the log's file (if it writes to one) and starts its writer task on the current
    /// Tokio runtime, with room for [`CHANNEL_CAPACITY`] waiting entries. Lines that do
    /// not fit are counted in `dropped` (`rollgate_access_log_dropped_total`). Must be
    /// called inside a runtime.
    pub fn new(config: &AccessLogConfig, dropped: Counter) -> io::Result<AccessLog> {
        AccessLog::with_capacity(config, dropped, CHANNEL_CAPACITY)
    }

    /// [`AccessLog::new`] with room for `capacity` waiting entries (at least 1).
    pub fn with_capacity(
        config: &AccessLogConfig,
        dropped: Counter,
        capacity: usize,
    ) -> io::Result<AccessLog> {
        let (sink, reopen) = match &config.path {
            AccessLogPath::Stdout => (Sink::Stdout, None),
            AccessLogPath::Stderr => (Sink::Stderr, None),
            AccessLogPath::File(path) => {
                let file = open(path).map_err(|e| {
                    io::Error::new(e.kind(), format!("access_log.path {}: {e}", path.display()))
                })?;
                (Sink::File(file), Some((path.clone(), usr1()?)))
            }
        };
        let (tx, rx) = mpsc::channel(capacity.max(1));
        tokio::spawn(write_loop(rx, sink, reopen, dropped.clone()));
        Ok(AccessLog {
            tx,
            config: config.clone(),
            dropped,
        })
    }

    /// The config this log was started from.
    pub fn config(&self) -> &AccessLogConfig {
        &self.config
    }

    /// Whether this request is to be logged (`sample` of them are): ask before building the
    /// entry.
    pub fn sampled(&self) -> bool {
        self.config.sample >= 1.0 || fastrand::f64() < self.config.sample
    }

    /// Queues `entry` for the writer. Never blocks: when the writer is behind by the whole
    /// channel, the entry is dropped and counted.
    pub fn log(&self, entry: AccessEntry) {
        if self.tx.try_send(Msg::Entry(entry)).is_err() {
            self.dropped.inc();
        }
    }

    /// Waits until every entry logged before the call is written (shutdown, tests). Unlike
    /// [`Self::log`], this waits for room in the channel.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

static CURRENT: ArcSwapOption<AccessLog> = ArcSwapOption::const_empty();

/// The process's access log, if one is on. One atomic load: the request path asks this
/// for every request.
pub fn current() -> Option<Arc<AccessLog>> {
    CURRENT.load_full()
}

/// Makes `log` the process's access log (`None`: off). The previous one, once the requests
/// holding it are done, writes what it holds and closes.
pub fn install(log: Option<Arc<AccessLog>>) {
    CURRENT.store(log);
}

/// Turns the access log off if `log` is still the installed one (an instance shutting
/// down must not remove another's).
pub fn uninstall(log: &Arc<AccessLog>) {
    let current = CURRENT.load();
    if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, log)) {
        CURRENT.compare_and_swap(&current, None);
    }
}

fn open(path: &std::path::Path) -> io::Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    o.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o640);
    }
    o.open(path)
}

#[cfg(unix)]
type Usr1 = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Usr1 = ();

/// SIGUSR1 (logrotate's reopen signal). Installing it replaces the default action
/// (terminate) for the whole process.
fn usr1() -> io::Result<Usr1> {
    #[cfg(unix)]
    return tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1());
    #[cfg(not(unix))]
    Ok(())
}

async fn next_usr1(s: &mut Option<(PathBuf, Usr1)>) {
    match s {
        #[cfg(unix)]
        Some((_, sig)) => {
            if sig.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        _ => std::future::pending().await,
    }
}

/// Where lines go. Written on the blocking pool: a slow disk or a full pipe stalls the
/// writer task (and then fills the channel), never a runtime thread.
enum Sink {
    Stdout,
    Stderr,
    File(std::fs::File),
}

impl Sink {
    /// Writes `buf` whole. Standard output and error are locked for the write, so the
    /// lines do not interleave with rollgate's own log lines.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        use std::io::Write;
        match self {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(buf)?;
                out.flush()
            }
            Sink::Stderr => std::io::stderr().lock().write_all(buf),
            Sink::File(f) => f.write_all(buf),
        }
    }
}

/// Lines serialized but not yet written, and how many entries they hold.
struct Pending {
    buf: Vec<u8>,
    entries: u64,
    /// The last write failed (errors are logged once per run of failures).
    failing: bool,
}

impl Pending {
    /// Writes the pending lines. `sink` is `None` only if a previous write's blocking task
    /// panicked; then lines are dropped and counted.
    async fn write(&mut self, sink: &mut Option<Sink>, dropped: &Counter) {
        if self.buf.is_empty() {
            return;
        }
        let buf = std::mem::take(&mut self.buf);
        let r = match sink.take() {
            Some(mut out) => match tokio::task::spawn_blocking(move || {
                let r = out.write_all(&buf);
                (out, buf, r)
            })
            .await
            {
                Ok((out, buf, r)) => {
                    *sink = Some(out);
                    self.buf = buf;
                    r
                }
                Err(e) => Err(io::Error::other(e)),
            },
            None => Err(io::Error::other("the access log's output was lost")),
        };
        match r {
            Ok(()) => self.failing = false,
            Err(e) => {
                dropped.inc_by(self.entries);
                if !self.failing {
                    tracing::error!(error = %e, "access log write failed; lines are dropped and counted in rollgate_access_log_dropped_total");
                }
                self.failing = true;
            }
        }
        self.buf.clear();
        self.entries = 0;
    }
}

async fn write_loop(
    mut rx: mpsc::Receiver<Msg>,
    sink: Sink,
    mut reopen: Option<(PathBuf, Usr1)>,
    dropped: Counter,
) {
    let mut sink = Some(sink);
    let mut pending = Pending {
        buf: Vec::with_capacity(WRITE_AT + 4096),
        entries: 0,
        failing: false,
    };
    loop {
        let msg = tokio::select! {
            // The signal first: under a steady stream of entries it must still be seen.
            biased;
            () = next_usr1(&mut reopen) => {
                pending.write(&mut sink, &dropped).await;
                if let Some((path, _)) = &reopen {
                    let p = path.clone();
                    match tokio::task::spawn_blocking(move || open(&p)).await.map_err(io::Error::other).and_then(|r| r) {
                        Ok(f) => {
                            sink = Some(Sink::File(f));
                            tracing::info!(path = %path.display(), "access log reopened");
                        }
                        Err(e) => tracing::error!(path = %path.display(), error = %e, "access log reopen failed; writing to the previous file"),
                    }
                }
                continue;
            }
            m = rx.recv() => m,
        };
        match msg {
            None => {
                pending.write(&mut sink, &dropped).await;
                return;
            }
            Some(Msg::Flush(done)) => {
                pending.write(&mut sink, &dropped).await;
                let _ = done.send(());
                continue;
            }
            Some(Msg::Entry(e)) => match serde_json::to_writer(&mut pending.buf, &e) {
                Ok(()) => {
                    pending.buf.push(b'\n');
                    pending.entries += 1;
                }
                // Cannot happen for these field types; counted rather than lost silently.
                Err(_) => {
                    dropped.inc();
                }
            },
        }
        if pending.buf.len() >= WRITE_AT || rx.is_empty() {
            pending.write(&mut sink, &dropped).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> AccessEntry {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, HeaderValue::from_static("api.example"));
        headers.insert("x-request-id", HeaderValue::from_static("req-1"));
        let uri: Uri = "/v1/chat/completions?stream=true".parse().unwrap();
        AccessEntry::from_request_head(
            SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123),
            &Method::POST,
            &uri,
            Version::HTTP_11,
            &headers,
        )
    }

    #[test]
    fn an_entry_serializes_every_field() {
        let mut e = entry();
        e.code = 200;
        e.duration_ms = 12.345_678;
        e.upstream_host = Some("10.0.0.2:8000".parse().unwrap());
        e.route = Some(Arc::from("chat"));
        e.version = Some(VersionName::from("v2.5"));
        e.reason = Some("weight");
        e.classification = "success";
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["start_time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["method"], "POST");
        assert_eq!(v["path"], "/v1/chat/completions?stream=true");
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert_eq!(v["authority"], "api.example");
        assert_eq!(v["request_id"], "req-1");
        assert_eq!(v["duration_ms"], 12.346);
        assert_eq!(v["upstream_host"], "10.0.0.2:8000");
        assert_eq!(v["grpc_status"], serde_json::Value::Null);
        assert_eq!(v.as_object().unwrap().len(), 18);
    }

    #[test]
    fn an_h2_authority_comes_from_the_uri() {
        let uri: Uri = "http://model.internal:8080/v2/models".parse().unwrap();
        let e = AccessEntry::from_request_head(
            SystemTime::now(),
            &Method::GET,
            &uri,
            Version::HTTP_2,
            &HeaderMap::new(),
        );
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["authority"], "model.internal:8080");
        assert_eq!(v["protocol"], "HTTP/2");
        assert_eq!(v["path"], "/v2/models");
        assert_eq!(v["request_id"], serde_json::Value::Null);
    }
}
