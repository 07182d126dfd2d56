//! The one place that decides what a request's outcome was, and records it.
//!
//! Every attempt to reach a version is a [`Recording`]: [`Recording::begin`] counts it in
//! flight for its (route, version), and exactly one [`Recording::close`] (or its `Drop`,
//! when the client goes away first) records it. [`classify`] holds the blame rules of SPEC
//! section 4 in one screen: what counts against a version, what is the client's doing, and
//! what the proxy refused on its own.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};

use super::body::Probe;
use crate::config::Signal;
use crate::telemetry::signals::json_number;
use crate::telemetry::{Class, PairStats, UpstreamErrorKind, VersionCounters};

/// A request counted against `max_in_flight` (or the shadow cap) until dropped: with the
/// response body, so long streams are counted for as long as they run.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Counts one more request, if fewer than `cap` are in flight.
    pub fn acquire(count: &Arc<AtomicUsize>, cap: usize) -> Option<InFlight> {
        if count.fetch_add(1, Ordering::Relaxed) >= cap {
            count.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(InFlight(count.clone()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How an exchange with a version ended.
#[derive(Debug, Clone, Copy)]
pub enum End<'a> {
    /// The response ended; `trailers`, if any, carry the final `grpc-status`.
    Answered { trailers: Option<&'a HeaderMap> },
    /// The upstream failed: no response (connect, TLS, reset, first-byte timeout), a
    /// response that could not be relayed, or a body that broke or went idle.
    Upstream(UpstreamErrorKind),
    /// The client went away, or its request body failed.
    ClientGone,
    /// The proxy answered `status` itself for a reason that is not the version's: the
    /// client's body broke a limit or stalled (413, 408), an injected refusal, overload.
    Refused(u16),
}

/// How gRPC statuses are judged on a route.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcRule {
    /// Statuses that count against the version (bit n: code n).
    pub faults: u32,
    /// The client's own `grpc-timeout`: a DEADLINE_EXCEEDED that came after it is the
    /// client's deadline, not the version's fault.
    pub client_deadline: Option<Duration>,
}

/// What an ended exchange is recorded as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub class: Class,
    /// Counted in `rollgate_upstream_errors_total{version,kind}`.
    pub upstream: Option<UpstreamErrorKind>,
}

/// The blame rules (SPEC section 4). `status`: the HTTP status the client got (0: none);
/// `grpc`: the final gRPC status, if the response is gRPC; `total`: time since the attempt
/// began.
pub fn classify(
    end: &End<'_>,
    status: u16,
    grpc: Option<u16>,
    rule: GrpcRule,
    total: Duration,
) -> Verdict {
    let v = |class, upstream| Verdict { class, upstream };
    match *end {
        End::Answered { .. } if status >= 500 => {
            v(Class::Error, Some(UpstreamErrorKind::Status5xx))
        }
        End::Answered { .. } => match grpc {
            Some(4) if rule.client_deadline.is_some_and(|d| total >= d) => {
                v(Class::ClientError, None)
            }
            Some(code) if code < 32 && rule.faults & (1 << code) != 0 => {
                v(Class::Error, Some(UpstreamErrorKind::Grpc))
            }
            _ if status >= 400 => v(Class::ClientError, None),
            _ => v(Class::Success, None),
        },
        End::Upstream(kind) => v(Class::Error, Some(kind)),
        // A 5xx the client did not read to the end is still the version's 5xx.
        End::ClientGone if status >= 500 => v(Class::Error, Some(UpstreamErrorKind::Status5xx)),
        End::ClientGone => v(Class::ClientAbort, None),
        End::Refused(_) => v(Class::Refused, None),
    }
}

/// Parses a `grpc-timeout` header (`<up to 8 digits><H|M|S|m|u|n>`).
pub fn grpc_timeout(v: &HeaderValue) -> Option<Duration> {
    let b = v.as_bytes();
    let (digits, unit) = b.split_at(b.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn grpc_status(h: &HeaderMap) -> Option<u16> {
    h.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
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

/// Called once with the request's final outcome (the access log).
pub trait Observer: Send {
    /// An attempt is sent to `upstream` (`retry`: not the first).
    fn attempt(&mut self, upstream: &http::uri::Authority, retry: bool);
    fn closed(self: Box<Self>, facts: &Facts<'_>);
}

/// What the observer learns when a request ends.
#[derive(Debug)]
pub struct Facts<'a> {
    pub verdict: Verdict,
    pub status: u16,
    pub grpc: Option<u16>,
    pub ttfb: Option<Duration>,
    pub total: Duration,
    /// From the attempt's start to the response head.
    pub upstream_time: Option<Duration>,
    pub bytes_sent: u64,
    pub stats: &'a PairStats,
}

/// One attempt at a version, from its start to the end of its response.
pub struct Recording {
    stats: Arc<PairStats>,
    counters: Arc<VersionCounters>,
    start: Instant,
    /// Where TTFB is measured from: when the request body had been sent, or when the
    /// response head came if that was first.
    ttfb_from: Option<Instant>,
    head_at: Option<Instant>,
    ttfb: Option<Duration>,
    /// When the upstream last sent something (head or body frame).
    last_out: Option<Instant>,
    status: u16,
    /// The response is gRPC; its status from a trailers-only head.
    grpc: bool,
    grpc_head: Option<u16>,
    rule: GrpcRule,
    capture: Option<Capture>,
    bytes_sent: u64,
    /// A drill's injected latency, spent before the request was sent: part of the
    /// version's time to first byte.
    injected: Duration,
    permit: Option<InFlight>,
    observer: Option<Box<dyn Observer>>,
    /// The client's request body, for blame once the response has begun.
    client: Probe,
    open: bool,
}

impl Recording {
    /// Starts an attempt at the (route, version) of `stats`.
    pub fn begin(stats: &Arc<PairStats>, counters: &Arc<VersionCounters>, rule: GrpcRule) -> Self {
        stats.begin();
        Recording {
            stats: stats.clone(),
            counters: counters.clone(),
            start: Instant::now(),
            ttfb_from: None,
            head_at: None,
            ttfb: None,
            last_out: None,
            status: 0,
            grpc: false,
            grpc_head: None,
            rule,
            capture: None,
            bytes_sent: 0,
            injected: Duration::ZERO,
            permit: None,
            observer: None,
            client: Probe::default(),
            open: true,
        }
    }

    /// Holds `permit` until the exchange ends.
    pub fn hold(&mut self, permit: Option<InFlight>) {
        self.permit = permit;
    }

    /// Moves the in-flight permit, the observer and the client body's probe on to the
    /// next attempt.
    pub fn hand_over(&mut self, next: &mut Recording) {
        next.permit = self.permit.take();
        next.observer = self.observer.take();
        next.client = self.client.clone();
    }

    /// The client's request body, streamed alongside the response (full duplex).
    pub fn client_body(&mut self, probe: Probe) {
        self.client = probe;
    }

    pub fn observe(&mut self, o: Box<dyn Observer>) {
        self.observer = Some(o);
    }

    /// The attempt goes to `upstream`.
    pub fn sending_to(&mut self, upstream: &http::uri::Authority, retry: bool) {
        if let Some(o) = &mut self.observer {
            o.attempt(upstream, retry);
        }
    }

    /// A drill delayed this attempt by `d` before sending it.
    pub fn injected_delay(&mut self, d: Duration) {
        self.injected += d;
    }

    /// The status the client is given for a failure without a response (502, 504, 500 for
    /// an injected fault).
    pub fn set_status(&mut self, status: u16) {
        self.status = status;
    }

    /// The response head arrived. `sent`: when a streamed request body was fully sent
    /// (`None`: the body was in memory, sent with the request).
    pub fn head(
        &mut self,
        head: &http::response::Parts,
        sent: Option<&super::body::Sent>,
        capture: Option<Capture>,
    ) {
        let now = Instant::now();
        self.head_at = Some(now);
        self.last_out = Some(now);
        self.ttfb_from = Some(match sent {
            // In memory: sent with the request, after any injected delay (which is in the
            // span from `start`).
            None => self.start,
            // Streamed: from when this attempt's body was sent (never before the attempt:
            // a retry's replay shares the mark), less an injected delay, which came first.
            Some(s) => {
                let from = s.at().map_or(now, |at| at.max(self.start).min(now));
                from.checked_sub(self.injected)
                    .map_or(from, |f| f.max(self.start))
            }
        });
        self.status = head.status.as_u16();
        self.grpc = head
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|c| c.as_bytes().starts_with(b"application/grpc"));
        if self.grpc {
            self.grpc_head = grpc_status(&head.headers);
        }
        self.capture = capture;
    }

    /// A frame of response body went to the client.
    pub fn data(&mut self, data: &Bytes) {
        if self.ttfb.is_none() {
            self.ttfb = self.ttfb_from.map(|t| t.elapsed());
        }
        self.bytes_sent += data.len() as u64;
        self.last_out = Some(Instant::now());
        if let Some(c) = &mut self.capture {
            c.push(data);
        }
    }

    /// Ends the attempt: classifies it and records it, once.
    pub fn close(mut self, end: End<'_>) {
        self.finish(end);
    }

    fn finish(&mut self, end: End<'_>) {
        if !self.open {
            return;
        }
        self.open = false;
        let total = self.start.elapsed();
        if let End::Answered { .. } = end {
            if self.ttfb.is_none() {
                self.ttfb = self.ttfb_from.map(|t| t.elapsed());
            }
        }
        if let End::Refused(s) = end {
            self.status = s;
        }
        // Once the response has begun, a failure of the exchange the client caused (its
        // body broke, or it went quiet mid-stream while its body was still open: full
        // duplex) is the client's, not the version's.
        let end = match end {
            End::Upstream(_) if self.head_at.is_some() && self.client.client_error().is_some() => {
                End::ClientGone
            }
            // Both sides quiet on a full-duplex stream: whoever spoke last is waiting for
            // the other. The upstream answered the client's last message, so it is the
            // client's turn.
            End::Upstream(UpstreamErrorKind::Timeout)
                if self.client.open()
                    && self
                        .last_out
                        .zip(self.client.last_read())
                        .is_some_and(|(out, read)| out >= read) =>
            {
                End::ClientGone
            }
            e => e,
        };
        let grpc = match end {
            End::Answered { trailers: Some(t) } if self.grpc => grpc_status(t).or(self.grpc_head),
            _ if self.grpc => self.grpc_head,
            _ => None,
        };
        let verdict = classify(&end, self.status, grpc, self.rule, total);
        if let (Some(c), End::Answered { .. }, Class::Success) =
            (&self.capture, &end, verdict.class)
        {
            if !c.field.is_empty() {
                if let Some(x) = json_number(&c.buf, &c.field) {
                    self.stats.signals.push_sample(x);
                }
            }
        }
        if let Some(kind) = verdict.upstream {
            self.counters.upstream_error(kind);
        }
        let ttfb = match verdict.class {
            Class::Success | Class::ClientError => self.ttfb,
            _ => self.ttfb.filter(|_| self.head_at.is_some()),
        };
        self.stats.record(verdict.class, self.status, ttfb, total);
        if let Some(o) = self.observer.take() {
            o.closed(&Facts {
                verdict,
                status: self.status,
                grpc,
                ttfb,
                total,
                upstream_time: self.head_at.map(|h| h - self.start),
                bytes_sent: self.bytes_sent,
                stats: &self.stats,
            });
        }
        self.permit = None;
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        // The request future was dropped (the client went away) before the exchange ended.
        self.finish(End::ClientGone);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: u32 = (1 << 2) | (1 << 4) | (1 << 13) | (1 << 14) | (1 << 15);

    fn answered(status: u16, grpc: Option<u16>, rule: GrpcRule, total_ms: u64) -> Class {
        classify(
            &End::Answered { trailers: None },
            status,
            grpc,
            rule,
            Duration::from_millis(total_ms),
        )
        .class
    }

    #[test]
    fn blame_rules() {
        let rule = GrpcRule {
            faults: DEFAULT,
            client_deadline: None,
        };
        assert_eq!(answered(200, None, rule, 1), Class::Success);
        assert_eq!(answered(404, None, rule, 1), Class::ClientError);
        assert_eq!(answered(503, None, rule, 1), Class::Error);
        assert_eq!(answered(200, Some(14), rule, 1), Class::Error);
        assert_eq!(answered(200, Some(3), rule, 1), Class::Success);
        assert_eq!(answered(200, Some(4), rule, 1), Class::Error);
        let custom = GrpcRule {
            faults: 1 << 8,
            client_deadline: None,
        };
        assert_eq!(answered(200, Some(14), custom, 1), Class::Success);
        assert_eq!(answered(200, Some(8), custom, 1), Class::Error);
        let client = GrpcRule {
            faults: DEFAULT,
            client_deadline: Some(Duration::from_millis(5)),
        };
        assert_eq!(answered(200, Some(4), client, 6), Class::ClientError);
        assert_eq!(
            answered(200, Some(4), client, 2),
            Class::Error,
            "the server's own deadline"
        );
        let z = Duration::ZERO;
        assert_eq!(
            classify(&End::ClientGone, 200, None, rule, z).class,
            Class::ClientAbort
        );
        assert_eq!(
            classify(&End::Refused(413), 0, None, rule, z).class,
            Class::Refused
        );
        assert_eq!(
            classify(
                &End::Upstream(UpstreamErrorKind::Connect),
                502,
                None,
                rule,
                z
            ),
            Verdict {
                class: Class::Error,
                upstream: Some(UpstreamErrorKind::Connect)
            }
        );
    }

    #[test]
    fn grpc_timeouts_parse() {
        let p = |s: &'static str| grpc_timeout(&HeaderValue::from_static(s));
        assert_eq!(p("1m"), Some(Duration::from_millis(1)));
        assert_eq!(p("2S"), Some(Duration::from_secs(2)));
        assert_eq!(p("100u"), Some(Duration::from_micros(100)));
        assert_eq!(p("123456789m"), None);
        assert_eq!(p("m"), None);
        assert_eq!(p("5x"), None);
        assert_eq!(p(""), None);
    }
}
