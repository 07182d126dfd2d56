//! One request through the proxy: route, choose a version, forward, retry, record.
//!
//! The table is loaded once per request (`Arc` clone, no lock). Statistics handles come
//! from the table, so recording does no label lookup. No lock is held across `.await`.
//! Errors the proxy answers itself are typed by whose fault they are (see [`Refusal`]):
//! only upstream faults are recorded as [`Class::Error`] against a version.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version as HttpVersion};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::body::{
    grpc_status_is_fault, Capture, ClientBodyFlag, Metered, Recording, ReqBody, RespBody,
};
use super::client::RETRY_BUFFER;
use super::headers::{
    self as hdr, X_REQUEST_ID, X_ROLLGATE_DEGRADED, X_ROLLGATE_RETRIED_FROM, X_ROLLGATE_VERSION,
};
use crate::config::{EndpointScheme, Signal, StickyKey};
use crate::routing::select::{self, PinOutcome};
use crate::routing::store::Store;
use crate::routing::table::{Member, Route, Table};
use crate::telemetry::signals::is_flagged;
use crate::telemetry::{Class, PairStats, UpstreamErrorKind};

/// Longest request target accepted (414 beyond), as SPEC §4.
pub const MAX_URI: usize = 8 * 1024;

/// State shared by every connection of the data plane.
pub struct Shared {
    pub store: Arc<Store>,
    in_flight: AtomicUsize,
    max_in_flight: usize,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
            .finish()
    }
}

impl Shared {
    /// `max_in_flight` caps requests in flight on top of the config's `max_in_flight`
    /// (`usize::MAX`: the config alone decides).
    pub fn new(store: Arc<Store>, max_in_flight: usize) -> Self {
        Shared {
            store,
            in_flight: AtomicUsize::new(0),
            max_in_flight,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Facts about the downstream connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// Why the proxy answered a request itself. Each variant knows its status and whether the
/// client, the proxy or the upstream is to blame.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("request target longer than 8 KiB")]
    UriTooLong,
    #[error("request head larger than 64 KiB")]
    HeadersTooLarge,
    #[error("an HTTP/1.0 request body needs a Content-Length")]
    LengthRequired,
    #[error("no route matches this request")]
    NoRoute,
    #[error("the pinned version is not part of this route")]
    UnknownPin,
    #[error("the pinned version is quarantined")]
    QuarantinedPin,
    #[error("request body exceeds the route's max_request_body")]
    BodyTooLarge,
    #[error("too many requests in flight")]
    Overloaded,
    #[error("upstream could not be reached: {0}")]
    UpstreamUnavailable(String),
    #[error("upstream sent no response headers within {0:?}")]
    UpstreamTimeout(Duration),
    #[error("fault injected by a rollback drill")]
    InjectedFault,
    #[error("the request body stalled for {0:?}")]
    BodyTimeout(Duration),
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::UriTooLong => StatusCode::URI_TOO_LONG,
            Refusal::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::LengthRequired => StatusCode::LENGTH_REQUIRED,
            Refusal::NoRoute => StatusCode::NOT_FOUND,
            Refusal::UnknownPin => StatusCode::BAD_REQUEST,
            Refusal::QuarantinedPin => StatusCode::CONFLICT,
            Refusal::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            Refusal::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Refusal::InjectedFault => StatusCode::INTERNAL_SERVER_ERROR,
            Refusal::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Refusal::BadRequest(_) => "bad_request",
            Refusal::UriTooLong => "uri_too_long",
            Refusal::HeadersTooLarge => "headers_too_large",
            Refusal::LengthRequired => "length_required",
            Refusal::NoRoute => "no_route",
            Refusal::UnknownPin => "unknown_version",
            Refusal::QuarantinedPin => "version_quarantined",
            Refusal::BodyTooLarge => "body_too_large",
            Refusal::Overloaded => "overloaded",
            Refusal::UpstreamUnavailable(_) => "upstream_unavailable",
            Refusal::UpstreamTimeout(_) => "upstream_timeout",
            Refusal::InjectedFault => "injected_fault",
            Refusal::BodyTimeout(_) => "request_timeout",
        }
    }

    /// The one place a refusal becomes an HTTP response.
    pub fn into_response(
        self,
        version: Option<&HeaderValue>,
        request_id: Option<&HeaderValue>,
    ) -> Response<RespBody> {
        let body =
            serde_json::json!({"error": self.code(), "detail": self.to_string()}).to_string();
        let mut r = Response::new(RespBody::full(body));
        *r.status_mut() = self.status();
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if matches!(self, Refusal::Overloaded) {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Some(v) = version {
            h.insert(X_ROLLGATE_VERSION.clone(), v.clone());
        }
        if let Some(id) = request_id {
            h.insert(X_REQUEST_ID.clone(), id.clone());
        }
        r
    }
}

/// Records a client abort for the chosen version if the request future is dropped (the
/// client went away) before a response was handed to hyper.
struct AbortGuard<'a> {
    stats: &'a PairStats,
    start: Instant,
    armed: bool,
}

impl Drop for AbortGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.stats
                .record(Class::ClientAbort, 0, None, self.start.elapsed());
        }
    }
}

/// Serves one request. Never fails: every error becomes a response.
pub async fn handle(shared: &Shared, conn: ConnInfo, req: Request<Incoming>) -> Response<RespBody> {
    let table = shared.store.load();
    let cap = table.config.max_in_flight.min(shared.max_in_flight);
    if shared.in_flight.fetch_add(1, Ordering::Relaxed) >= cap {
        shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        shared.store.metrics.requests_shed.inc();
        return Refusal::Overloaded.into_response(None, None);
    }
    let _in_flight = InFlight(&shared.in_flight);
    proxy(&table, conn, req).await
}

/// The authority the client addressed: `:authority` / absolute-form, else `Host`. Rejects
/// requests whose Host is missing, repeated, or disagrees with the authority (RFC 9112
/// §3.2, RFC 9113 §8.3.1), so routing decides on exactly what is forwarded.
fn target_host(parts: &Parts) -> Result<Option<HeaderValue>, Refusal> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Refusal::BadRequest("more than one Host header"));
    }
    match (parts.uri.authority(), host) {
        (Some(a), Some(h)) if !a.as_str().eq_ignore_ascii_case(h.to_str().unwrap_or("")) => Err(
            Refusal::BadRequest("Host header differs from the request authority"),
        ),
        (Some(a), _) => Ok(HeaderValue::from_str(a.as_str()).ok()),
        (None, Some(h)) => Ok(Some(h.clone())),
        (None, None) if parts.version == HttpVersion::HTTP_10 => Ok(None),
        (None, None) => Err(Refusal::BadRequest("missing Host header")),
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The request body as far as routing had to read it.
enum BodyState {
    Unread(Incoming),
    Buffered(Bytes),
}

/// Reads a whole body of at most `limit` bytes.
async fn read_all(body: Incoming, limit: u64) -> Result<Bytes, Refusal> {
    let limited = http_body_util::Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Refusal::BodyTooLarge),
        Err(_) => Err(Refusal::BadRequest("reading the request body failed")),
    }
}

/// Reads up to `max` bytes: the whole body if it fits, else the prefix read so far plus
/// the rest still unread.
async fn read_prefix(
    mut body: Incoming,
    max: u64,
) -> Result<Result<Bytes, (Bytes, Incoming)>, Refusal> {
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    loop {
        match body.frame().await {
            None => break,
            Some(Err(_)) => return Err(Refusal::BadRequest("reading the request body failed")),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if first.is_none() && buf.is_empty() {
                    first = Some(data);
                } else {
                    if let Some(f) = first.take() {
                        buf.extend_from_slice(&f);
                    }
                    buf.extend_from_slice(&data);
                }
                let have = first.as_ref().map_or(buf.len(), Bytes::len) as u64;
                if have > max {
                    let prefix = first.take().unwrap_or_else(|| buf.split().freeze());
                    return Ok(Err((prefix, body)));
                }
            }
        }
    }
    Ok(Ok(first.unwrap_or_else(|| buf.freeze())))
}

/// The `model` field of a JSON body (top level only).
fn body_model(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct M<'a> {
        #[serde(borrow)]
        model: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<M>(body)
        .ok()?
        .model
        .map(|m| m.into_owned())
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

async fn proxy(table: &Table, conn: ConnInfo, req: Request<Incoming>) -> Response<RespBody> {
    let (mut parts, body) = req.into_parts();
    let request_id = hdr::request_id(&parts.headers);
    let target_len = parts.uri.authority().map_or(0, |a| a.as_str().len())
        + parts.uri.path_and_query().map_or(0, |p| p.as_str().len());
    if target_len > MAX_URI {
        return Refusal::UriTooLong.into_response(None, Some(&request_id));
    }
    let head_len: usize = target_len
        + parts
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if head_len > super::server::MAX_HEAD_SIZE {
        return Refusal::HeadersTooLarge.into_response(None, Some(&request_id));
    }
    // HTTP/1.0 has no chunked framing: a body without Content-Length would be read to the
    // end of the connection, which a proxy must never do (Pingora CVE-2026-2836).
    if parts.version == http::Version::HTTP_10
        && matches!(parts.method, Method::POST | Method::PUT | Method::PATCH)
        && !parts.headers.contains_key(header::CONTENT_LENGTH)
    {
        return Refusal::LengthRequired.into_response(None, Some(&request_id));
    }
    let host = match target_host(&parts) {
        Ok(h) => h,
        Err(r) => return r.into_response(None, Some(&request_id)),
    };
    let host_str = host.as_ref().and_then(|h| h.to_str().ok());

    // Route: the first whose head matches and, if it names models, whose model matches.
    let mut body_state = BodyState::Unread(body);
    let mut model: Option<String> = None;
    let mut model_known = false;
    let mut route: Option<&Route> = None;
    for r in table.routes.iter() {
        if !r.matches_head(parts.uri.path(), host_str, &parts.headers) {
            continue;
        }
        if !r.config.matcher.models.is_empty() && !model_known {
            model_known = true;
            model = parts
                .headers
                .get(&hdr::X_GATEWAY_MODEL_NAME)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            if model.is_none() {
                if let BodyState::Unread(b) = body_state {
                    let idle = r.config.timeouts.idle;
                    let bytes =
                        match tokio::time::timeout(idle, read_all(b, r.config.max_request_body))
                            .await
                        {
                            Ok(Ok(bytes)) => bytes,
                            Ok(Err(e)) => return e.into_response(None, Some(&request_id)),
                            Err(_) => {
                                return Refusal::BodyTimeout(idle)
                                    .into_response(None, Some(&request_id))
                            }
                        };
                    model = body_model(&bytes);
                    body_state = BodyState::Buffered(bytes);
                }
            }
        }
        if r.matches_model(model.as_deref()) {
            route = Some(r);
            break;
        }
    }
    let Some(route) = route else {
        return Refusal::NoRoute.into_response(None, Some(&request_id));
    };

    // Version: pin, sticky key, weighted random.
    let pin = parts.headers.get(&table.pin_header).map(|p| {
        let found = route
            .member_by_name(p.as_bytes(), table)
            .map(|i| (i, table.versions[route.members[i].version].quarantined));
        select::resolve_pin(
            found,
            route.baseline,
            table.pin_quarantined,
            table.pin_unknown,
        )
    });
    let chosen = match pin.unwrap_or(PinOutcome::NoPin) {
        PinOutcome::Member(i) => i,
        PinOutcome::RejectUnknown => {
            return Refusal::UnknownPin.into_response(None, Some(&request_id))
        }
        PinOutcome::RejectQuarantined => {
            return Refusal::QuarantinedPin.into_response(None, Some(&request_id))
        }
        PinOutcome::NoPin => {
            let key = match route.sticky() {
                Some(StickyKey::Header(h)) => parts.headers.get(h).map(HeaderValue::as_bytes),
                Some(StickyKey::Cookie(c)) => hdr::cookie(&parts.headers, c).map(str::as_bytes),
                None => None,
            };
            key.and_then(|k| select::rendezvous(&route.members, k))
                .unwrap_or_else(|| route.pick_weighted())
        }
    };
    let start = Instant::now();
    let member = &route.members[chosen];
    member.stats.begin();
    let mut abort = AbortGuard {
        stats: &member.stats,
        start,
        armed: true,
    };

    // Body: refuse oversized ones before any upstream connect; buffer small ones so a
    // retry can replay them.
    let limit = route.config.max_request_body;
    let idle = route.config.timeouts.idle;
    let refuse = |abort: &mut AbortGuard, r: Refusal| {
        abort.armed = false;
        // The member of the attempt in progress (after a retry, the baseline's).
        abort
            .stats
            .record(Class::Refused, r.status().as_u16(), None, start.elapsed());
        r.into_response(None, Some(&request_id))
    };
    let declared = content_length(&parts.headers);
    if declared.is_some_and(|n| n > limit) {
        return refuse(&mut abort, Refusal::BodyTooLarge);
    }
    let flag = Arc::new(ClientBodyFlag::default());
    let mut body = match body_state {
        BodyState::Buffered(b) => ReqBody::full(b),
        BodyState::Unread(b) if b.is_end_stream() => ReqBody::Empty,
        BodyState::Unread(b) => {
            let buffer = RETRY_BUFFER.min(limit);
            if declared.is_some_and(|n| n > buffer) {
                ReqBody::stream(None, b, limit, flag.clone(), idle)
            } else {
                match tokio::time::timeout(idle, read_prefix(b, buffer)).await {
                    Ok(Ok(Ok(all))) => ReqBody::full(all),
                    Ok(Ok(Err((prefix, rest)))) => {
                        let used = prefix.len() as u64;
                        if used > limit {
                            return refuse(&mut abort, Refusal::BodyTooLarge);
                        }
                        ReqBody::stream(Some(prefix), rest, limit - used, flag.clone(), idle)
                    }
                    Ok(Err(r)) => return refuse(&mut abort, r),
                    Err(_) => return refuse(&mut abort, Refusal::BodyTimeout(idle)),
                }
            }
        }
    };

    // Headers shared by every attempt.
    // gRPC requires `te: trailers` end to end (Envoy keeps it too); every other TE is
    // hop-by-hop and goes.
    let is_grpc = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|c| c.as_bytes().starts_with(b"application/grpc"));
    let wants_trailers = is_grpc
        && parts.headers.get_all(header::TE).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        });
    hdr::sanitize_request(&mut parts.headers, &table.pin_header);
    if wants_trailers {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // (The pin header went with the control headers in `sanitize_request`.)
    parts.headers.remove(header::HOST);
    parts
        .headers
        .insert(X_REQUEST_ID.clone(), request_id.clone());
    hdr::add_forwarded(
        &mut parts.headers,
        conn.peer.ip(),
        if conn.tls { "https" } else { "http" },
        host.clone(),
    );
    let retry_allowed_for_method = route.config.retry.non_idempotent
        || is_idempotent(&parts.method)
        || parts.headers.contains_key("idempotency-key");
    route.retry_budget.deposit();

    let mut attempt = chosen;
    let mut retried_from: Option<usize> = None;
    let mut exclude: Option<http::uri::Authority> = None;
    let mut headers = Some(parts.headers);
    loop {
        let m = &route.members[attempt];
        let v = &table.versions[m.version];
        let ep = match &exclude {
            Some(a) => match v.upstream.pick_other(a) {
                Some(e) => e,
                None => v.upstream.pick(),
            },
            None => v.upstream.pick(),
        };
        // A retry goes to the baseline; from the baseline itself only to another endpoint.
        let retry_target = if retried_from.is_some() {
            None
        } else if attempt != route.baseline {
            Some(route.baseline)
        } else if v.upstream.pick_other(&ep.endpoint.authority).is_some() {
            Some(attempt)
        } else {
            None
        };
        let replay = if retry_target.is_some() {
            body.replay()
        } else {
            None
        };
        let can_retry = replay.is_some();
        let this_body = replay.unwrap_or_else(|| std::mem::replace(&mut body, ReqBody::Empty));
        let mut h = if can_retry {
            headers.clone().unwrap_or_default()
        } else {
            headers.take().unwrap_or_default()
        };
        for (n, val) in v.set_headers.iter() {
            h.insert(n.clone(), val.clone());
        }
        let mut uri_parts = http::uri::Parts::default();
        uri_parts.scheme = Some(ep.endpoint.uri_scheme());
        uri_parts.authority = Some(ep.endpoint.authority.clone());
        uri_parts.path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .or_else(|| Some(http::uri::PathAndQuery::from_static("/")));
        let Ok(uri) = Uri::from_parts(uri_parts) else {
            return refuse(&mut abort, Refusal::BadRequest("invalid request target"));
        };
        let mut up = Request::new(this_body);
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = uri;
        *up.version_mut() = if ep.endpoint.scheme == EndpointScheme::H2c {
            HttpVersion::HTTP_2
        } else {
            HttpVersion::HTTP_11
        };
        *up.headers_mut() = h;

        let attempt_start = Instant::now();
        // Moves on to `retry_target` after a failure of this attempt, which the caller has
        // already recorded against the version.
        macro_rules! retry_on {
            ($kind:expr) => {{
                v.counters.upstream_error($kind);
                m.retries_to_baseline.count.fetch_add(1, Ordering::Relaxed);
                retried_from = Some(attempt);
                exclude = Some(ep.endpoint.authority.clone());
                attempt = retry_target.unwrap_or(attempt);
                let next = &route.members[attempt].stats;
                next.begin();
                abort.stats = next;
                continue;
            }};
        }
        let fault = v.counters.faults.sample();
        if !fault.delay.is_zero() {
            tokio::time::sleep(fault.delay).await;
        }
        if fault.fail {
            // Behaves as an upstream 500: counted against the version, retried in budget.
            let ttfb = attempt_start.elapsed();
            m.stats.record(Class::Error, 500, Some(ttfb), ttfb);
            if can_retry && retry_allowed_for_method && route.retry_budget.try_withdraw() {
                retry_on!(UpstreamErrorKind::Status5xx);
            }
            abort.armed = false;
            v.counters.upstream_error(UpstreamErrorKind::Status5xx);
            return Refusal::InjectedFault.into_response(Some(&v.name_value), Some(&request_id));
        }
        let first_byte = route.config.timeouts.first_byte;
        let outcome = tokio::time::timeout(first_byte, ep.client().request(up)).await;
        let failure: (UpstreamErrorKind, u16, Refusal) = match outcome {
            Ok(Ok(resp)) if bad_framing(&resp) => {
                // Two framings (CL and TE) or a body where none may be: a desync
                // attempt or a broken upstream. Never relayed; the connection is dropped
                // with the response.
                tracing::debug!(version = %v.name, endpoint = %ep.endpoint.url, status = %resp.status(), "upstream response with conflicting framing");
                (
                    UpstreamErrorKind::Reset,
                    502,
                    Refusal::UpstreamUnavailable("malformed response framing".to_string()),
                )
            }
            Ok(Ok(resp)) => {
                let status = resp.status();
                if status.is_server_error()
                    && can_retry
                    && retry_allowed_for_method
                    && route.retry_budget.try_withdraw()
                {
                    let ttfb = attempt_start.elapsed();
                    m.stats
                        .record(Class::Error, status.as_u16(), Some(ttfb), ttfb);
                    retry_on!(UpstreamErrorKind::Status5xx);
                }
                abort.armed = false;
                return respond(
                    resp,
                    route,
                    table,
                    attempt,
                    retried_from,
                    attempt_start,
                    &request_id,
                );
            }
            Ok(Err(e)) => {
                if flag.too_large.load(Ordering::Relaxed) {
                    return refuse(&mut abort, Refusal::BodyTooLarge);
                }
                if flag.timed_out.load(Ordering::Relaxed) {
                    return refuse(&mut abort, Refusal::BodyTimeout(idle));
                }
                if flag.failed.load(Ordering::Relaxed) {
                    abort.armed = false;
                    m.stats
                        .record(Class::ClientAbort, 0, None, attempt_start.elapsed());
                    return Refusal::BadRequest("reading the request body failed")
                        .into_response(None, Some(&request_id));
                }
                let connect = e.is_connect();
                let kind = if connect && is_tls_error(&e) {
                    UpstreamErrorKind::Tls
                } else if connect {
                    UpstreamErrorKind::Connect
                } else {
                    UpstreamErrorKind::Reset
                };
                // Nothing reached the upstream on a connect error, so retrying it costs the
                // baseline no more than if the request had gone there first: it is exempt
                // from the budget (a dead canary must not cost clients errors). A reset after
                // the request was sent is budgeted like a 5xx.
                if can_retry
                    && (connect || (retry_allowed_for_method && route.retry_budget.try_withdraw()))
                {
                    m.stats
                        .record(Class::Error, 0, None, attempt_start.elapsed());
                    retry_on!(kind);
                }
                tracing::debug!(version = %v.name, endpoint = %ep.endpoint.url, error = %error_chain(&e), "upstream request failed");
                (kind, 502, Refusal::UpstreamUnavailable(error_chain(&e)))
            }
            Err(_) => (
                UpstreamErrorKind::Timeout,
                504,
                Refusal::UpstreamTimeout(first_byte),
            ),
        };
        let (kind, code, refusal) = failure;
        abort.armed = false;
        v.counters.upstream_error(kind);
        m.stats
            .record(Class::Error, code, None, attempt_start.elapsed());
        let mut resp = refusal.into_response(Some(&v.name_value), Some(&request_id));
        if let Some(from) = retried_from {
            resp.headers_mut().insert(
                X_ROLLGATE_RETRIED_FROM.clone(),
                table.versions[route.members[from].version]
                    .name_value
                    .clone(),
            );
        }
        return resp;
    }
}

/// An upstream response whose framing cannot be relayed faithfully: `Content-Length`
/// together with `Transfer-Encoding`, or a body framing on a status that never has a body
/// (1xx, 204; a 304 may state the representation's length, RFC 9110 §8.6).
fn bad_framing(resp: &Response<Incoming>) -> bool {
    let h = resp.headers();
    let cl = h.contains_key(header::CONTENT_LENGTH);
    let te = h.contains_key(header::TRANSFER_ENCODING);
    let bodiless = resp.status().is_informational() || resp.status() == StatusCode::NO_CONTENT;
    (cl && te)
        || (bodiless
            && (te
                || h.get(header::CONTENT_LENGTH)
                    .is_some_and(|v| v.as_bytes() != b"0")))
}

pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn is_tls_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if c.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some())
            {
                return true;
            }
        }
        cur = c.source();
    }
    false
}

/// Turns the upstream's response into the client's: hop-by-hop headers out, rollgate's
/// headers in, the body metered.
fn respond(
    resp: Response<Incoming>,
    route: &Route,
    table: &Table,
    attempt: usize,
    retried_from: Option<usize>,
    attempt_start: Instant,
    request_id: &HeaderValue,
) -> Response<RespBody> {
    let m = &route.members[attempt];
    let v = &table.versions[m.version];
    let (mut parts, body) = resp.into_parts();
    hdr::strip_hop_by_hop(&mut parts.headers);
    let grpc = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|c| c.as_bytes().starts_with(b"application/grpc"));
    let grpc_fault_in_headers = grpc
        && parts
            .headers
            .get("grpc-status")
            .is_some_and(grpc_status_is_fault);
    parts
        .headers
        .insert(X_ROLLGATE_VERSION.clone(), v.name_value.clone());
    if !parts.headers.contains_key(&X_REQUEST_ID) {
        parts
            .headers
            .insert(X_REQUEST_ID.clone(), request_id.clone());
    }
    if let Some(from) = retried_from {
        parts.headers.insert(
            X_ROLLGATE_RETRIED_FROM.clone(),
            table.versions[route.members[from].version]
                .name_value
                .clone(),
        );
    }
    let capture = observe_signals(table, m, &parts);
    if route.degraded {
        parts
            .headers
            .insert(X_ROLLGATE_DEGRADED.clone(), HeaderValue::from_static("1"));
    }
    let rec = Recording {
        stats: m.stats.clone(),
        counters: v.counters.clone(),
        start: attempt_start,
        status: parts.status.as_u16(),
        grpc,
        grpc_fault_in_headers,
        capture,
    };
    let body = RespBody::Proxied {
        inner: Metered::new(body, route.config.timeouts.idle, rec),
    };
    Response::from_parts(parts, body)
}

/// Feeds the evaluator's optional rules from a response head: remembers the request id for
/// feedback, counts a guardrail flag, takes a drift sample from a header, or arranges for
/// the body to be read for a `json:` drift signal.
fn observe_signals(table: &Table, m: &Member, parts: &http::response::Parts) -> Option<Capture> {
    let rules = &table.config.evaluator.rules;
    if rules.accuracy_drop.is_some() {
        if let Some(id) = parts.headers.get(&X_REQUEST_ID) {
            table.recent.remember(id.as_bytes(), m.stats.id);
        }
    }
    if let Some(s) = &rules.safety_violations {
        if parts
            .headers
            .get(&s.header)
            .is_some_and(|v| is_flagged(v.as_bytes()))
        {
            m.stats.signals.flag();
        }
    }
    match &rules.drift.as_ref()?.signal {
        Signal::Header(h) => {
            if let Some(x) = parts
                .headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok())
            {
                m.stats.signals.push_sample(x);
            }
            None
        }
        Signal::Json(field) => {
            let json = parts.status.is_success()
                && parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .is_some_and(|c| c.as_bytes().starts_with(b"application/json"));
            json.then(|| Capture {
                field: field.clone(),
                buf: BytesMut::new(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_field_is_read_from_top_level_json() {
        assert_eq!(
            body_model(br#"{"model":"gpt-a","messages":[]}"#).as_deref(),
            Some("gpt-a")
        );
        assert_eq!(body_model(br#"{"model":"a\"b"}"#).as_deref(), Some("a\"b"));
        assert_eq!(body_model(br#"{"messages":[{"model":"x"}]}"#), None);
        assert_eq!(body_model(b"not json"), None);
    }

    #[test]
    fn refusals_map_to_statuses() {
        assert_eq!(Refusal::UnknownPin.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            Refusal::BodyTooLarge.status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let r = Refusal::Overloaded.into_response(None, None);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }
}
