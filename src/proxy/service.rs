//! One request through the proxy: route, choose a version, forward, retry, record.
//!
//! The table is loaded once per request (`Arc` clone, no lock). Statistics handles come
//! from the table, so recording does no label lookup. No lock is held across `.await`.
//!
//! The flow reads top to bottom in [`handle`]: check the head, choose the route and the
//! version, then [`Exchange::run`] makes at most two attempts. Each attempt ends in a typed
//! [`Attempt`] result; what it counts as (the blame rules of SPEC section 4) is decided in
//! one place, [`super::outcome::classify`], when its [`Recording`] closes: at the end of
//! the response body, at a failure, or when the client goes away.

use std::future::Future;
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

use super::body::{Buffered, ClientBodyError, Metered, ReplayBody, ReqBody, RespBody, ShadowCut};
use super::client::{EndpointRt, SendError, UpstreamBody};
use super::headers::{
    self as hdr, X_REQUEST_ID, X_ROLLGATE_DEGRADED, X_ROLLGATE_RETRIED_FROM, X_ROLLGATE_VERSION,
};
use super::outcome::{self, Capture, End, GrpcRule, InFlight, Recording};
use crate::config::{Signal, StickyKey};
use crate::routing::select::{self, PinOutcome};
use crate::routing::store::Store;
use crate::routing::table::{Member, Route, Table, Version};
use crate::telemetry::access_log::{self, AccessEntry, AccessLog};
use crate::telemetry::signals::is_flagged;
use crate::telemetry::{Class, UpstreamErrorKind};

/// Longest request target accepted (414 beyond), as SPEC §4.
pub const MAX_URI: usize = 8 * 1024;

/// State shared by every connection of the data plane.
pub struct Shared {
    pub store: Arc<Store>,
    in_flight: Arc<AtomicUsize>,
    shadow_in_flight: Arc<AtomicUsize>,
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
            in_flight: Arc::new(AtomicUsize::new(0)),
            shadow_in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight,
        }
    }

    /// Client requests in flight: from their head to the end of their response body.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Shadow copies in flight.
    pub fn shadow_in_flight(&self) -> usize {
        self.shadow_in_flight.load(Ordering::Relaxed)
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
    /// Read whole by model routing, with its trailers and its share of the process-wide
    /// buffer cap.
    Buffered(Bytes, Option<HeaderMap>, Buffered),
}

/// Reads a whole body of at most `limit` bytes, with at most `idle` between frames, for
/// model routing.
async fn read_all(
    mut body: Incoming,
    limit: u64,
    idle: Duration,
) -> Result<(Bytes, Option<HeaderMap>, Buffered), Refusal> {
    let mut buf = BytesMut::new();
    let mut reserved = Buffered::default();
    let mut trailers = None;
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(Refusal::BodyTimeout(idle)),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(Refusal::BadRequest("reading the request body failed")),
            Ok(Some(Ok(f))) => f,
        };
        match frame.into_data() {
            Ok(d) => {
                if (buf.len() + d.len()) as u64 > limit {
                    return Err(Refusal::BodyTooLarge);
                }
                if !reserved.grow(d.len()) {
                    return Err(Refusal::Overloaded);
                }
                buf.extend_from_slice(&d);
            }
            Err(f) => trailers = f.into_trailers().ok(),
        }
    }
    Ok((buf.freeze(), trailers, reserved))
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

/// Checks the request head against the proxy's limits; returns the target host.
fn check_head(parts: &Parts) -> Result<Option<HeaderValue>, Refusal> {
    let target_len = parts.uri.authority().map_or(0, |a| a.as_str().len())
        + parts.uri.path_and_query().map_or(0, |p| p.as_str().len());
    if target_len > MAX_URI {
        return Err(Refusal::UriTooLong);
    }
    let head_len: usize = target_len
        + parts
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if head_len > super::server::MAX_HEAD_SIZE {
        return Err(Refusal::HeadersTooLarge);
    }
    // HTTP/1.0 has no chunked framing: a body without Content-Length would be read to the
    // end of the connection, which a proxy must never do (Pingora CVE-2026-2836).
    if parts.version == http::Version::HTTP_10
        && matches!(parts.method, Method::POST | Method::PUT | Method::PATCH)
        && !parts.headers.contains_key(header::CONTENT_LENGTH)
    {
        return Err(Refusal::LengthRequired);
    }
    target_host(parts)
}

/// The first route whose head matches and, if it names models, whose model matches. Reads
/// the body only when a matching route routes on the model and no header names it.
async fn choose_route<'t>(
    table: &'t Table,
    parts: &Parts,
    host: Option<&str>,
    body: Incoming,
) -> Result<(&'t Route, BodyState), Refusal> {
    let mut body = BodyState::Unread(body);
    let mut model: Option<String> = None;
    let mut model_known = false;
    for r in table.routes.iter() {
        if !r.matches_head(parts.uri.path(), host, &parts.headers) {
            continue;
        }
        if !r.config.matcher.models.is_empty() && !model_known {
            model_known = true;
            model = parts
                .headers
                .get(&hdr::X_GATEWAY_MODEL_NAME)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            body = match body {
                BodyState::Unread(b) if model.is_none() => {
                    // Any model route whose head matches may be chosen: read up to the
                    // largest of their limits, then hold the chosen route to its own.
                    let limit = table
                        .routes
                        .iter()
                        .filter(|x| !x.config.matcher.models.is_empty())
                        .filter(|x| x.matches_head(parts.uri.path(), host, &parts.headers))
                        .map(|x| x.config.max_request_body)
                        .max()
                        .unwrap_or(r.config.max_request_body);
                    let (bytes, trailers, reserved) =
                        read_all(b, limit, r.config.timeouts.idle).await?;
                    model = body_model(&bytes);
                    BodyState::Buffered(bytes, trailers, reserved)
                }
                other => other,
            };
        }
        if r.matches_model(model.as_deref()) {
            return Ok((r, body));
        }
    }
    Err(Refusal::NoRoute)
}

/// Why a request went to the version it went to (the access log's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Pin,
    Sticky,
    Weight,
    Retry,
    Shadow,
    Fallback,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Pin => "pin",
            Reason::Sticky => "sticky",
            Reason::Weight => "weight",
            Reason::Retry => "retry",
            Reason::Shadow => "shadow",
            Reason::Fallback => "fallback",
        }
    }
}

/// The route's sticky key in this request, if the route has one.
fn sticky_key<'p>(route: &Route, headers: &'p HeaderMap) -> Option<&'p [u8]> {
    match route.sticky()? {
        StickyKey::Header(h) => headers.get(h).map(HeaderValue::as_bytes),
        StickyKey::Cookie(c) => hdr::cookie(headers, c).map(str::as_bytes),
    }
}

/// Version choice (SPEC section 4): pin, sticky key, weighted random.
fn choose_version(
    table: &Table,
    route: &Route,
    headers: &HeaderMap,
) -> Result<(usize, Reason), Refusal> {
    let pin = headers.get(&table.pin_header).map(|p| {
        let found = route
            .member_by_name(p.as_bytes(), table)
            .map(|i| (i, table.versions[route.members[i].version].quarantined));
        select::resolve_pin(
            found,
            route.stand_in,
            table.pin_quarantined,
            table.pin_unknown,
        )
    });
    let (chosen, reason) = match pin.unwrap_or(PinOutcome::NoPin) {
        PinOutcome::Member(i) => (i, Reason::Pin),
        PinOutcome::RejectUnknown => return Err(Refusal::UnknownPin),
        PinOutcome::RejectQuarantined => return Err(Refusal::QuarantinedPin),
        PinOutcome::NoPin => {
            match sticky_key(route, headers).and_then(|k| select::rendezvous(&route.members, k)) {
                Some(i) => (i, Reason::Sticky),
                None => (route.pick_weighted(), Reason::Weight),
            }
        }
    };
    let reason = if route.degraded && chosen == route.stand_in && chosen != route.baseline {
        Reason::Fallback
    } else {
        reason
    };
    Ok((chosen, reason))
}

/// Serves one request. Never fails: every error becomes a response.
///
/// One `async fn` from the request head to the exchange: every nested level is one more
/// move of the whole request future (several KiB, a `memcpy` per level per request).
pub async fn handle(
    shared: Arc<Shared>,
    conn: ConnInfo,
    req: Request<Incoming>,
) -> Response<RespBody> {
    let table = &shared.store.load();
    let cap = table.config.max_in_flight.min(shared.max_in_flight);
    let Some(permit) = InFlight::acquire(&shared.in_flight, cap) else {
        shared.store.metrics.requests_shed.inc();
        let r = Refusal::Overloaded;
        // Shed, but answered with the client's request id or a new one, as every other
        // answer is.
        let id = hdr::request_id(req.headers());
        if let Some(log) = access_log::current().filter(|l| l.sampled()) {
            let mut e = entry_for(req.method(), req.uri(), req.version(), req.headers());
            e.code = r.status().as_u16();
            e.classification = Class::Refused.as_str();
            e.request_id = Some(id.clone());
            log.log(e);
        }
        return r.into_response(None, Some(&id));
    };
    let (mut parts, body) = req.into_parts();
    let request_id = hdr::request_id(&parts.headers);
    let log = access_log::current().filter(|l| l.sampled());
    let mut entry = log.as_ref().map(|_| {
        let mut e = entry_for(&parts.method, &parts.uri, parts.version, &parts.headers);
        e.request_id = Some(request_id.clone());
        Box::new(e)
    });
    let began = Instant::now();
    let refuse = |r: Refusal| {
        if let (Some(log), Some(e)) = (&log, entry.as_ref()) {
            let mut e = AccessEntry::clone(e);
            e.code = r.status().as_u16();
            e.duration_ms = ms(began.elapsed());
            e.classification = Class::Refused.as_str();
            log.log(e);
        }
        r.into_response(None, Some(&request_id))
    };
    let host = match check_head(&parts) {
        Ok(h) => h,
        Err(r) => return refuse(r),
    };
    let (route, body) = match choose_route(
        table,
        &parts,
        host.as_ref().and_then(|h| h.to_str().ok()),
        body,
    )
    .await
    {
        Ok(x) => x,
        Err(r) => return refuse(r),
    };
    let (chosen, reason) = match choose_version(table, route, &parts.headers) {
        Ok(x) => x,
        Err(r) => return refuse(r),
    };
    let member = &route.members[chosen];
    let version = &table.versions[member.version];
    let client_deadline = parts
        .headers
        .get("grpc-timeout")
        .and_then(outcome::grpc_timeout);
    let rule = GrpcRule {
        faults: route.grpc_faults,
        client_deadline,
    };
    let mut rec = Recording::begin(&member.stats, &version.counters, rule);
    rec.hold(Some(permit));
    if let Some(e) = entry.as_mut() {
        e.route = Some(route.name.clone());
        e.reason = Some(reason.as_str());
        if let BodyState::Buffered(b, ..) = &body {
            e.bytes_received = b.len() as u64;
        }
    }

    // Body: stream it as it arrives; refuse one over the limit before any upstream connect.
    let limit = route.config.max_request_body;
    let idle = route.config.timeouts.idle;
    let mut too_large = content_length(&parts.headers).is_some_and(|n| n > limit);
    // A body model routing read stays counted against the process-wide buffer cap while
    // it is being sent.
    let mut _held = None;
    let body = match body {
        BodyState::Buffered(b, trailers, reserved) => {
            too_large |= b.len() as u64 > limit;
            _held = Some(reserved);
            ReqBody::full(b, trailers)
        }
        BodyState::Unread(b) if b.is_end_stream() => ReqBody::Empty,
        BodyState::Unread(b) => ReqBody::Stream(ReplayBody::new(b, limit, idle)),
    };
    rec.client_body(body.probe());
    // A shadow copy's line is the client's with its own reason and outcome.
    let mut shadow_entry = None;
    if let (Some(e), Some(log)) = (entry.take(), &log) {
        if route.shadow.is_some() {
            let mut copy = e.clone();
            copy.reason = Some(Reason::Shadow.as_str());
            shadow_entry = Some(LogObserver::boxed(log, copy, began, &body));
        }
        rec.observe(LogObserver::boxed(log, e, began, &body));
    }
    if too_large {
        let r = Refusal::BodyTooLarge;
        rec.close(End::Refused(r.status().as_u16()));
        return r.into_response(None, Some(&request_id));
    }

    // Headers shared by every attempt.
    // gRPC requires `te: trailers` end to end (Envoy keeps it too); every other TE is
    // hop-by-hop and goes.
    // The shadow decision is per sticky key: taken before the headers are sanitized.
    let shadow = route
        .shadow
        .as_ref()
        .and_then(|_| route.shadowed(sticky_key(route, &parts.headers)));
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
    // (The pin header went with the control headers in `sanitize_request`.) The client's
    // `Host` stays until the request is sent: the endpoint's replaces it for HTTP/1.1, and
    // HTTP/2 drops it for `:authority` (`EndpointRt::for_h1`, `for_h2`).
    parts
        .headers
        .insert(X_REQUEST_ID.clone(), request_id.clone());
    hdr::add_forwarded(
        &mut parts.headers,
        conn.peer.ip(),
        if conn.tls { "https" } else { "http" },
        host,
    );
    let retry_method = route.config.retry.non_idempotent
        || is_idempotent(&parts.method)
        || parts.headers.contains_key("idempotency-key");
    route.retry_budget.deposit();

    if let Some(sh) = shadow {
        let cap = table.config.max_in_flight.min(shared.max_in_flight);
        let shadow_cap = (cap / 10).max(1);
        let room = shared.in_flight().saturating_add(shadow_cap) < cap;
        match InFlight::acquire(&shared.shadow_in_flight, shadow_cap).filter(|_| room) {
            Some(p) => {
                let observer = shadow_entry.take();
                spawn_shadow(
                    table.clone(),
                    route,
                    sh.member,
                    &parts,
                    body.shadow(),
                    p,
                    observer,
                );
            }
            None => {
                sh.dropped.overloaded.inc();
            }
        }
    }

    let headers = std::mem::take(&mut parts.headers);
    Exchange {
        table,
        route,
        parts: &parts,
        request_id: &request_id,
        retry_method,
        rule,
    }
    .run(chosen, rec, body, headers)
    .await
}

/// The attempts of one request.
struct Exchange<'a> {
    table: &'a Table,
    route: &'a Route,
    parts: &'a Parts,
    request_id: &'a HeaderValue,
    /// The method (or `non_idempotent`, or an idempotency key) allows retrying a request
    /// that reached the upstream.
    retry_method: bool,
    rule: GrpcRule,
}

/// How one attempt ended before its response body.
enum Attempt {
    /// A response to relay (the `Recording` goes into its body).
    Response(Response<UpstreamBody>),
    /// The upstream answered 5xx and the request may be retried.
    Retryable5xx(Response<UpstreamBody>),
    /// No usable response, the version's fault. `unsent`: nothing reached the upstream.
    Upstream {
        kind: UpstreamErrorKind,
        refusal: Refusal,
        unsent: bool,
    },
    /// The client's body failed: never the version's fault.
    Client(ClientBodyError),
    /// A drill's injected fault: an upstream 500 that never left the proxy.
    Injected,
}

impl Exchange<'_> {
    /// Makes the first attempt at `chosen` and at most one retry.
    ///
    /// Not an `async fn`: one would hold the recording and the body twice (its arguments,
    /// and the variables they are moved into).
    fn run(
        &self,
        chosen: usize,
        mut rec: Recording,
        mut body: ReqBody,
        mut headers: HeaderMap,
    ) -> impl Future<Output = Response<RespBody>> + '_ {
        async move {
            let route = self.route;
            let mut at = chosen;
            let mut retried_from: Option<usize> = None;
            let mut exclude: Option<&http::uri::Authority> = None;
            loop {
                let m = &route.members[at];
                let v = &self.table.versions[m.version];
                let ep = exclude
                    .and_then(|a| v.upstream.pick_other(a))
                    .unwrap_or_else(|| v.upstream.pick());
                // A retry goes to the stand-in (the baseline, or the fallback while degraded);
                // from the stand-in itself only to another endpoint.
                let target = if retried_from.is_some() {
                    None
                } else if at != route.stand_in {
                    Some(route.stand_in)
                } else if v.upstream.has_other_than(ep) {
                    Some(at)
                } else {
                    None
                };
                rec.sending_to(&ep.endpoint.authority, retried_from.is_some());
                let fault = v.counters.faults.sample();
                if !fault.delay.is_zero() {
                    rec.injected_delay(fault.delay);
                    tokio::time::sleep(fault.delay).await;
                }
                let sent;
                let attempt = if fault.fail {
                    let this_body = take_body(&mut body, target.is_some());
                    sent = this_body.sent();
                    Attempt::Injected
                } else {
                    let timeouts = &route.config.timeouts;
                    let probe;
                    // Made in a block and awaited at once: what goes into the request is
                    // not also kept beside it while it is sent, nor the request beside
                    // the future that sends it.
                    let answer = {
                        let this_body = take_body(&mut body, target.is_some());
                        sent = this_body.sent();
                        probe = this_body.probe();
                        // The last attempt takes the headers; one that may be retried
                        // sends a copy.
                        let h = if target.is_some() {
                            headers.clone()
                        } else {
                            std::mem::take(&mut headers)
                        };
                        send(
                            ep,
                            upstream_request(self.parts, h, v, this_body),
                            sent.as_deref(),
                            timeouts.first_byte,
                            timeouts.idle,
                        )
                    }
                    .await;
                    classify(answer, &probe, v, ep, timeouts.first_byte)
                };
                // May this failure be retried at `target`, inside the budget?
                let retry = |may: bool| {
                    target.filter(|_| may && body.replayable() && route.retry_budget.try_withdraw())
                };
                let next = match &attempt {
                    Attempt::Retryable5xx(_) => retry(self.retry_method),
                    // A reset may be retried; a timeout is not (it would double the wait and
                    // run the inference twice).
                    Attempt::Upstream {
                        kind: UpstreamErrorKind::Timeout,
                        ..
                    } => None,
                    Attempt::Upstream { unsent, .. } => retry(*unsent || self.retry_method),
                    Attempt::Injected => retry(self.retry_method),
                    _ => None,
                };
                let sent_at = sent.as_deref();
                let Some(next) = next else {
                    return self.finish(attempt, rec, at, retried_from, sent_at);
                };
                // Record the failed attempt, then begin the retry.
                let nm = &route.members[next];
                let mut next_rec = Recording::begin(
                    &nm.stats,
                    &self.table.versions[nm.version].counters,
                    self.rule,
                );
                rec.hand_over(&mut next_rec);
                match attempt {
                    Attempt::Retryable5xx(resp) => {
                        let (head, _) = resp.into_parts();
                        rec.head(&head, sent_at, None);
                        rec.close(End::Answered { trailers: None });
                    }
                    Attempt::Upstream { kind, refusal, .. } => {
                        rec.set_status(refusal.status().as_u16());
                        rec.close(End::Upstream(kind));
                    }
                    _ => {
                        rec.set_status(500);
                        rec.close(End::Upstream(UpstreamErrorKind::Status5xx));
                    }
                }
                m.retries_to_baseline.count.fetch_add(1, Ordering::Relaxed);
                rec = next_rec;
                retried_from = Some(at);
                exclude = Some(&ep.endpoint.authority);
                at = next;
            }
        }
    }

    /// Hands the last attempt's result to the client, recording it.
    fn finish(
        &self,
        attempt: Attempt,
        mut rec: Recording,
        at: usize,
        retried_from: Option<usize>,
        sent_at: Option<&super::body::Sent>,
    ) -> Response<RespBody> {
        let m = &self.route.members[at];
        let v = &self.table.versions[m.version];
        let failed = |rec: Recording, end: End<'_>, r: Refusal, version: bool| {
            rec.close(end);
            let mut resp = r.into_response(version.then_some(&v.name_value), Some(self.request_id));
            self.mark_retry(resp.headers_mut(), retried_from);
            resp
        };
        match attempt {
            Attempt::Response(resp) | Attempt::Retryable5xx(resp) => {
                self.respond(resp, rec, m, retried_from, sent_at)
            }
            Attempt::Upstream { kind, refusal, .. } => {
                rec.set_status(refusal.status().as_u16());
                failed(rec, End::Upstream(kind), refusal, true)
            }
            Attempt::Injected => {
                rec.set_status(500);
                failed(
                    rec,
                    End::Upstream(UpstreamErrorKind::Status5xx),
                    Refusal::InjectedFault,
                    true,
                )
            }
            Attempt::Client(ClientBodyError::TooLarge) => {
                failed(rec, End::Refused(413), Refusal::BodyTooLarge, false)
            }
            Attempt::Client(ClientBodyError::Timeout) => {
                let idle = self.route.config.timeouts.idle;
                failed(rec, End::Refused(408), Refusal::BodyTimeout(idle), false)
            }
            Attempt::Client(ClientBodyError::Read) => {
                rec.set_status(400);
                failed(
                    rec,
                    End::ClientGone,
                    Refusal::BadRequest("reading the request body failed"),
                    false,
                )
            }
        }
    }

    fn mark_retry(&self, h: &mut HeaderMap, retried_from: Option<usize>) {
        if let Some(from) = retried_from {
            let from = &self.table.versions[self.route.members[from].version];
            h.insert(X_ROLLGATE_RETRIED_FROM.clone(), from.name_value.clone());
        }
    }

    /// Turns the upstream's response into the client's: hop-by-hop headers out, rollgate's
    /// headers in, the body metered.
    fn respond(
        &self,
        resp: Response<UpstreamBody>,
        mut rec: Recording,
        m: &Member,
        retried_from: Option<usize>,
        sent_at: Option<&super::body::Sent>,
    ) -> Response<RespBody> {
        let v = &self.table.versions[m.version];
        let (mut parts, body) = resp.into_parts();
        hdr::strip_hop_by_hop(&mut parts.headers);
        parts
            .headers
            .insert(X_ROLLGATE_VERSION.clone(), v.name_value.clone());
        match parts.headers.entry(X_REQUEST_ID.clone()) {
            // The upstream's own (vLLM echoes the request's), never indexed by HTTP/2
            // either: see `hdr::request_id`.
            header::Entry::Occupied(mut ids) => {
                ids.iter_mut().for_each(|id| id.set_sensitive(true))
            }
            header::Entry::Vacant(v) => {
                v.insert(self.request_id.clone());
            }
        }
        let capture = observe_signals(self.table, m, &parts);
        rec.head(&parts, sent_at, capture);
        self.mark_retry(&mut parts.headers, retried_from);
        if self.route.degraded {
            parts
                .headers
                .insert(X_ROLLGATE_DEGRADED.clone(), HeaderValue::from_static("1"));
        }
        let body = RespBody::Proxied {
            inner: Metered::new(body, self.route.config.timeouts.idle, rec),
        };
        Response::from_parts(parts, body)
    }
}

/// Sends `up`; the `first_byte` timer starts once the request body has been sent (`sent`;
/// at once for a body in memory), so a slow upload is never the version's timeout.
///
/// While the body is being sent, an upstream that takes none of it for `idle` although the
/// client has more to give (it stopped reading: a full socket) times out too.
///
/// Not an `async fn` nor a `select!`: the request goes into the send future before this
/// one is made, and [`FirstByte`] holds that future and the timer once each, side by side;
/// an `async fn` would keep room for the request beside the future it went into.
fn send<'a>(
    ep: &'a EndpointRt,
    up: Request<ReqBody>,
    sent: Option<&'a super::body::Sent>,
    first_byte: Duration,
    idle: Duration,
) -> FirstByte<
    impl Future<Output = Result<Response<UpstreamBody>, SendError>> + 'a,
    impl Future<Output = ()> + 'a,
> {
    let timer = async move {
        if let Some(s) = sent {
            let check = (idle / 4).max(Duration::from_millis(10));
            loop {
                tokio::select! {
                    () = s.wait() => break,
                    () = tokio::time::sleep(check) => {
                        if s.upstream_stalled(idle) {
                            return;
                        }
                    }
                }
            }
        }
        tokio::time::sleep(first_byte).await;
    };
    FirstByte {
        response: ep.send(up),
        timer,
    }
}

pin_project_lite::pin_project! {
    /// The response, unless the timer ends first. The response is polled first.
    struct FirstByte<R, T> {
        #[pin]
        response: R,
        #[pin]
        timer: T,
    }
}

impl<R: Future, T: Future<Output = ()>> Future for FirstByte<R, T> {
    type Output = Result<R::Output, FirstByteTimeout>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        if let std::task::Poll::Ready(r) = this.response.poll(cx) {
            return std::task::Poll::Ready(Ok(r));
        }
        this.timer.poll(cx).map(|()| Err(FirstByteTimeout))
    }
}

/// The body for one attempt: a copy when the request may be retried (`keep`, and a body
/// that can be replayed), else the body itself.
fn take_body(body: &mut ReqBody, keep: bool) -> ReqBody {
    match keep.then(|| body.replay()).flatten() {
        Some(copy) => std::mem::replace(body, copy),
        None => std::mem::replace(body, ReqBody::Empty),
    }
}

/// What one attempt's answer means for the exchange.
fn classify(
    answer: Result<Result<Response<UpstreamBody>, SendError>, FirstByteTimeout>,
    probe: &super::body::Probe,
    v: &Version,
    ep: &super::client::EndpointRt,
    first_byte: Duration,
) -> Attempt {
    let client_error = || probe.client_error().map(Attempt::Client);
    match answer {
        Ok(Ok(resp)) if bad_framing(&resp) => {
            // Two framings (CL and TE) or a body where none may be: a desync attempt or
            // a broken upstream. Never relayed; the connection is dropped with it.
            tracing::debug!(version = %v.name, endpoint = %ep.endpoint.url, status = %resp.status(), "upstream response with conflicting framing");
            Attempt::Upstream {
                kind: UpstreamErrorKind::Reset,
                refusal: Refusal::UpstreamUnavailable("malformed response framing".into()),
                unsent: false,
            }
        }
        Ok(Ok(resp)) if resp.status().is_server_error() => Attempt::Retryable5xx(resp),
        Ok(Ok(resp)) => Attempt::Response(resp),
        Ok(Err(e)) => {
            if let Some(a) = client_error() {
                return a;
            }
            let connect = e.is_connect();
            let kind = if connect && is_tls_error(&e) {
                UpstreamErrorKind::Tls
            } else if connect {
                UpstreamErrorKind::Connect
            } else {
                UpstreamErrorKind::Reset
            };
            let unsent = e.is_unsent();
            tracing::debug!(version = %v.name, endpoint = %ep.endpoint.url, error = %error_chain(&e), "upstream request failed");
            Attempt::Upstream {
                kind,
                refusal: Refusal::UpstreamUnavailable(error_chain(&e)),
                unsent,
            }
        }
        Err(_) => match client_error() {
            Some(a) => a,
            None => Attempt::Upstream {
                kind: UpstreamErrorKind::Timeout,
                refusal: Refusal::UpstreamTimeout(first_byte),
                unsent: false,
            },
        },
    }
}

/// No response head within `first_byte` of the request body's end, or an upstream that
/// stopped taking the body.
#[derive(Debug)]
struct FirstByteTimeout;

/// Header entries an HTTP/2 client's request map is given room for before it goes
/// upstream. hyper's HTTP/1.1 client parses the upstream's response into the map of the
/// request it last wrote, and the response then gains rollgate's headers and hyper's h2
/// `Date` check: sized here, its hash table never grows on the way back. (h2 makes each
/// request's map with room for 6, so each response grew it once: a rehash and a
/// reallocation, about 1,100 instructions. A copy made for an attempt that may be retried
/// keeps the table's size but not the spare entries, so its entry list may still
/// reallocate once, without a rehash.) Not for HTTP/1.1 clients: hyper recycles their maps
/// from message to message (a fresh connection's first map is sized to its head), and
/// sizing them too measured about 0.5 KiB more per open stream (`benches/memory.py`).
const HEADER_ROOM: usize = 12;

/// The request as version `v` gets it, in origin form: the endpoint's connection supplies
/// scheme and authority for HTTP/2, and `Host` for HTTP/1.1 (either replaces the client's).
fn upstream_request(
    parts: &Parts,
    mut h: HeaderMap,
    v: &crate::routing::table::Version,
    body: ReqBody,
) -> Request<ReqBody> {
    if parts.version == HttpVersion::HTTP_2 {
        h.reserve(HEADER_ROOM.saturating_sub(h.len()));
    }
    for (n, val) in v.set_headers.iter() {
        h.insert(n.clone(), val.clone());
    }
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let mut up = Request::new(body);
    *up.method_mut() = parts.method.clone();
    *up.uri_mut() = Uri::from(path);
    *up.headers_mut() = h;
    up
}

/// Sends a copy of the request to the route's shadow version, in its own task: it never
/// delays, changes or fails the client's answer. Its response is read to the end and
/// recorded under the shadow version, then discarded.
fn spawn_shadow(
    table: Arc<Table>,
    route: &Route,
    member: usize,
    parts: &Parts,
    body: super::body::ShadowBody,
    permit: InFlight,
    observer: Option<Box<dyn outcome::Observer>>,
) {
    let Some(ri) = table.routes.iter().position(|r| std::ptr::eq(r, route)) else {
        return;
    };
    let m = &route.members[member];
    let v = &table.versions[m.version];
    let ep = v.upstream.pick();
    let endpoint = v
        .upstream
        .endpoints
        .iter()
        .position(|e| std::ptr::eq(e, ep))
        .unwrap_or(0);
    let body = ReqBody::Shadow(body);
    let sent = body.sent();
    let up = upstream_request(parts, parts.headers.clone(), v, body);
    let rule = GrpcRule {
        faults: route.grpc_faults,
        client_deadline: parts
            .headers
            .get("grpc-timeout")
            .and_then(outcome::grpc_timeout),
    };
    tokio::spawn(async move {
        let route = &table.routes[ri];
        let m = &route.members[member];
        let v = &table.versions[m.version];
        let ep = &v.upstream.endpoints[endpoint];
        let mut rec = Recording::begin(&m.stats, &v.counters, rule);
        rec.hold(Some(permit));
        if let Some(o) = observer {
            rec.observe(o);
        }
        rec.sending_to(&ep.endpoint.authority, false);
        let first_byte = route.config.timeouts.first_byte;
        let idle = route.config.timeouts.idle;
        let resp = match send(ep, up, sent.as_deref(), first_byte, idle).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                if let Some(cut) = find_source::<ShadowCut>(&e) {
                    // The copy was abandoned (slow shadow, client failure): not the
                    // shadow version's doing, and not a measurement.
                    let sh = route.shadow.as_ref();
                    if let Some(sh) = sh {
                        let reason = if cut.slow {
                            &sh.dropped.slow
                        } else {
                            &sh.dropped.incomplete
                        };
                        reason.inc();
                    }
                    rec.close(End::ClientGone);
                    return;
                }
                let kind = if e.is_connect() {
                    UpstreamErrorKind::Connect
                } else {
                    UpstreamErrorKind::Reset
                };
                rec.set_status(502);
                rec.close(End::Upstream(kind));
                return;
            }
            Err(FirstByteTimeout) => {
                rec.set_status(504);
                rec.close(End::Upstream(UpstreamErrorKind::Timeout));
                return;
            }
        };
        let (mut head, body) = resp.into_parts();
        // Feedback by request id belongs to the version that answered the client.
        head.headers.remove(&X_REQUEST_ID);
        let capture = observe_signals(&table, m, &head);
        rec.head(&head, sent.as_deref(), capture);
        let body = Metered::new(body, route.config.timeouts.idle, rec);
        tokio::pin!(body);
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                break;
            }
        }
    });
}

/// The first error of type `T` in `e`'s source chain.
fn find_source<'e, T: std::error::Error + 'static>(
    e: &'e (dyn std::error::Error + 'static),
) -> Option<&'e T> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(t) = c.downcast_ref::<T>() {
            return Some(t);
        }
        cur = c.source();
    }
    None
}

/// An upstream response whose framing cannot be relayed faithfully: `Content-Length`
/// together with `Transfer-Encoding`, or a body framing on a status that never has a body
/// (1xx, 204; a 304 may state the representation's length, RFC 9110 §8.6).
fn bad_framing(resp: &Response<UpstreamBody>) -> bool {
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
        // An `io::Error` that wraps another (hyper-rustls wraps rustls' error, sometimes
        // twice) hides it from `source()`: walk into what it wraps.
        cur = match c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => c.source(),
        };
    }
    false
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

/// A fresh access log entry for a request head.
fn entry_for(method: &Method, uri: &Uri, version: HttpVersion, headers: &HeaderMap) -> AccessEntry {
    AccessEntry::from_request_head(std::time::SystemTime::now(), method, uri, version, headers)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Writes a request's access log line when its recording closes.
struct LogObserver {
    log: Arc<AccessLog>,
    entry: Box<AccessEntry>,
    began: Instant,
    body: super::body::Probe,
}

impl LogObserver {
    /// The observer that writes `entry` when the recording closes.
    fn boxed(
        log: &Arc<AccessLog>,
        entry: Box<AccessEntry>,
        began: Instant,
        body: &ReqBody,
    ) -> Box<dyn outcome::Observer> {
        Box::new(LogObserver {
            log: log.clone(),
            entry,
            began,
            body: body.probe(),
        })
    }
}

impl outcome::Observer for LogObserver {
    fn attempt(&mut self, upstream: &http::uri::Authority, retry: bool) {
        self.entry.upstream_host = Some(upstream.clone());
        if retry {
            self.entry.reason = Some(Reason::Retry.as_str());
        }
    }

    fn closed(self: Box<Self>, f: &outcome::Facts<'_>) {
        let LogObserver {
            log,
            mut entry,
            began,
            body,
        } = *self;
        entry.code = f.status;
        entry.bytes_received = entry.bytes_received.max(body.received());
        entry.bytes_sent = f.bytes_sent;
        entry.duration_ms = ms(began.elapsed());
        entry.upstream_service_time_ms = f.upstream_time.map(ms);
        entry.version = Some(f.stats.version.clone());
        entry.ttfb_ms = f.ttfb.map(ms);
        entry.grpc_status = f.grpc;
        entry.classification = f.verdict.class.as_str();
        log.log(*entry);
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
