//! The admin listener: liveness, readiness, metrics and the JSON API of SPEC §6, on its own
//! port (loopback unless a token is configured), never on the data port. A second,
//! read-only listener (`health_listen`) serves only probes and metrics.
//!
//! Reads are computed from the published routing table and the telemetry registry; nothing
//! here can block the data plane. Changes go through [`Controller`], the same swap, persist
//! and audit path the evaluator uses, and answer 200 with the resulting audit record.
//! Mutating calls are POST only (GET: 405), need `Authorization: Bearer TOKEN` when
//! `admin.token_file` is set (compared in constant time over SHA-256 digests; 401
//! otherwise), and answer errors as `{"error", "detail"}` with a 4xx and nothing changed.
//!
//! Beyond SPEC §6, `GET /api/v1/history` ([`history`]) serves the last 15 minutes of every
//! (route, version) at one-second resolution, so the status page opened after an incident
//! shows what happened before it was opened.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::audit::id_number;
use super::reload::{Cause, ReloadError, Reloader};
use crate::config::VersionName;
use crate::decision::{Action, Command, Controller, Refused};
use crate::evaluator::rules::Trigger;
use crate::proxy::body::RespBody;
use crate::routing::store::Store;
use crate::routing::table::{Route, RouteState, Table};
use crate::telemetry::{HistoryPoint, WindowStats};

/// The live status page (`GET /`): one self-contained HTML file, no CDN, no build step.
const STATUS_PAGE: &str = include_str!("status.html");

/// Largest admin request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// What the admin handlers need.
#[derive(Debug)]
pub struct Admin {
    pub store: Arc<Store>,
    pub controller: Arc<Controller>,
    pub reloader: Arc<Reloader>,
    /// False once shutdown began: `/readyz` answers 503 so load balancers stop sending.
    pub accepting: AtomicBool,
}

/// Reads `admin.token_file` (trimmed); an empty file is an error, not "no token".
pub fn read_token(path: &std::path::Path) -> std::io::Result<[u8; 32]> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("admin.token_file {}: {e}", path.display()),
        )
    })?;
    let t = text.trim();
    if t.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("admin.token_file {}: the file is empty", path.display()),
        ));
    }
    Ok(Sha256::digest(t.as_bytes()).into())
}

/// Equality that takes the same time wherever the inputs differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Admin {
    pub fn new(controller: Arc<Controller>, reloader: Arc<Reloader>) -> Self {
        Admin {
            store: controller.store.clone(),
            controller,
            reloader,
            accepting: AtomicBool::new(true),
        }
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(want) = self.reloader.admin_token.load_full() else {
            return true;
        };
        // The scheme name is case-insensitive (RFC 9110 §11.1).
        let Some(given) = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim_start().split_once(' '))
            .and_then(|(scheme, t)| scheme.eq_ignore_ascii_case("bearer").then_some(t))
        else {
            return false;
        };
        let given: [u8; 32] = Sha256::digest(given.trim().as_bytes()).into();
        constant_time_eq(&given, &want)
    }

    /// Ready: not draining, and every route has a version with a healthy endpoint.
    pub fn ready(&self) -> Result<(), String> {
        if !self.accepting.load(Ordering::Relaxed) {
            return Err("shutting down".into());
        }
        let t = self.store.load();
        for r in t.routes.iter() {
            if !r
                .members
                .iter()
                .any(|m| t.versions[m.version].upstream.any_healthy())
            {
                return Err(format!("route {} has no healthy version", r.name));
            }
        }
        Ok(())
    }
}

/// `GET /api/v1/status`.
#[derive(Debug, Serialize)]
pub struct Status {
    pub generation: u64,
    pub config_hash: String,
    pub routes: Vec<RouteStatus>,
    pub versions: Vec<VersionStatus>,
    /// Every candidate's evidence per rule against the level that rolls it back.
    pub evidence: Vec<crate::evaluator::CandidateView>,
    /// The fleet this replica belongs to (SPEC section 10); absent when it decides alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct RouteStatus {
    pub name: String,
    pub owner: Option<String>,
    pub baseline: String,
    pub state: RouteState,
    pub weights: std::collections::BTreeMap<String, u32>,
    /// Every version on the route, in the table's order, with its effective weight and its
    /// role (see [`role`]).
    pub members: Vec<MemberStatus>,
    /// The version that gets a copy of `percent` % of the route's requests (SPEC §4);
    /// `active: false` while it is quarantined (no copies). Absent without a shadow.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowStatus>,
    /// Where a progressive rollout stands (`waiting_for: traffic` while a hold lacks
    /// evidence); absent without one in progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::evaluator::RolloutView>,
}

#[derive(Debug, Serialize)]
pub struct MemberStatus {
    pub version: String,
    pub weight: u32,
    pub role: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ShadowStatus {
    pub version: String,
    pub percent: u32,
    pub active: bool,
}

/// What member `i` of `route` is there for: `baseline`; `shadow`, the route's shadow
/// version (a weight-0 member that gets copies, whose answers never reach a client); or
/// `candidate`, every other version (judged against the baseline, the shadow too).
pub fn role(route: &Route, i: usize) -> &'static str {
    if i == route.baseline {
        "baseline"
    } else if route.shadow.as_ref().is_some_and(|s| s.member == i) {
        "shadow"
    } else {
        "candidate"
    }
}

#[derive(Debug, Serialize)]
pub struct VersionStatus {
    pub name: String,
    pub fingerprint: String,
    pub healthy: bool,
    pub quarantined: bool,
    pub window: WindowStats,
}

/// The status document for `table`, with window statistics as of now.
pub fn status(store: &Store, view: &crate::evaluator::View, table: &Table) -> Status {
    let now = tokio::time::Instant::now();
    // Fold the request path's per-thread shards in, so the window includes the last
    // requests and not only those of the last evaluator tick.
    store.telemetry.flush(now);
    Status {
        generation: table.generation,
        config_hash: table.config.hash.clone(),
        routes: table
            .routes
            .iter()
            .map(|r| RouteStatus {
                name: r.name.to_string(),
                owner: r.config.owner.clone(),
                baseline: table.versions[r.baseline_member().version].name.to_string(),
                state: r.state,
                weights: r.weights(table),
                members: r
                    .members
                    .iter()
                    .enumerate()
                    .map(|(i, m)| MemberStatus {
                        version: table.versions[m.version].name.to_string(),
                        weight: m.weight,
                        role: role(r, i),
                    })
                    .collect(),
                shadow: r.shadow.as_ref().map(|s| ShadowStatus {
                    version: table.versions[r.members[s.member].version].name.to_string(),
                    percent: s.percent,
                    active: s.active,
                }),
                rollout: view.rollouts.get(&*r.name).cloned(),
            })
            .collect(),
        versions: table
            .versions
            .iter()
            .map(|v| VersionStatus {
                name: v.name.to_string(),
                fingerprint: v.config.fingerprint.clone(),
                healthy: v.upstream.any_healthy(),
                quarantined: v.quarantined,
                window: store.telemetry.version_window(&v.name, now),
            })
            .collect(),
        evidence: view.candidates.clone(),
        fleet: None,
    }
}

/// Series one `GET /api/v1/history` answers at most: with 900 points each, about 1 MB of
/// JSON. More pairs than this: ask per route or version.
pub const MAX_HISTORY_SERIES: usize = 64;

/// `GET /api/v1/history?route=R&version=V&since=T`: what each (route, version) of the
/// current table did, one point per second, for the last 15 minutes at most.
///
/// - `route`, `version` (optional, exact names, percent-encoded): only those series; a name
///   the table does not have answers 404.
/// - `since` (optional, Unix seconds): only the seconds after it; a client polling passes
///   the previous answer's `last`.
///
/// ```json
/// {"resolution_s": 1, "last": 1764590403, "more": false,
///  "series": [{"route": "chat", "version": "v2.5", "role": "candidate",
///              "start": 1764590401, "requests": [40, 38, 41], "errors": [0, 2, 1],
///              "ttfb_p99_ms": [21.3, 24.0, null]}]}
/// ```
///
/// Each series has one value a second from `start` (a Unix second) on, in three arrays of
/// the same length: `requests` answered (success, error, 4xx: as the status window counts
/// them), `errors` (the version's fault), and `ttfb_p99_ms` of that second's answers (`null`
/// without any). `last` is the newest second included: the current second is not over and
/// is never included. Seconds are attributed when the recorder is flushed (every evaluator
/// `interval`, and before this read), so with an `interval` above 1 s the points are that
/// coarse. At most [`MAX_HISTORY_SERIES`] series, in table order; `more: true` says some
/// were left out. Memory is fixed: 900 points of 12 bytes per pair, freed with the pair.
#[derive(Debug, Serialize)]
pub struct History {
    pub resolution_s: u32,
    pub last: u64,
    pub more: bool,
    pub series: Vec<HistorySeries>,
}

/// One (route, version)'s points in [`History`].
#[derive(Debug, Serialize)]
pub struct HistorySeries {
    pub route: String,
    pub version: String,
    /// `baseline`, `candidate` or `shadow` on this route (see [`role`]).
    pub role: &'static str,
    pub start: u64,
    pub requests: Vec<u32>,
    pub errors: Vec<u32>,
    pub ttfb_p99_ms: Vec<Option<f64>>,
}

/// The history document (see [`History`]) for `table` as of now.
pub fn history(
    store: &Store,
    table: &Table,
    route: Option<&str>,
    version: Option<&str>,
    since: Option<u64>,
) -> Result<History, ApiError> {
    if let Some(r) = route.filter(|r| !table.routes.iter().any(|rt| &*rt.name == *r)) {
        return Err(ApiError::not_found(format!("no route {r:?}")));
    }
    if let Some(v) = version.filter(|v| table.version(&VersionName::from(*v)).is_none()) {
        return Err(ApiError::not_found(format!("no version {v:?}")));
    }
    let now = tokio::time::Instant::now();
    store.telemetry.flush(now);
    let clock = store.telemetry.history_clock();
    let mut doc = History {
        resolution_s: 1,
        last: clock.unix(clock.slots.index(now)).saturating_sub(1),
        more: false,
        series: Vec::new(),
    };
    for r in table
        .routes
        .iter()
        .filter(|r| route.is_none_or(|n| *r.name == *n))
    {
        for (i, m) in r.members.iter().enumerate() {
            let name = table.versions[m.version].name.as_str();
            if version.is_some_and(|v| v != name) {
                continue;
            }
            if doc.series.len() == MAX_HISTORY_SERIES {
                doc.more = true;
                return Ok(doc);
            }
            let (start, points) = m.stats.history(since, now);
            let p99 = |p: &HistoryPoint| {
                (p.requests > 0 && p.ttfb_p99_us > 0)
                    .then(|| (f64::from(p.ttfb_p99_us) / 100.0).round() / 10.0)
            };
            doc.series.push(HistorySeries {
                route: r.name.to_string(),
                version: name.to_string(),
                role: role(r, i),
                start,
                requests: points.iter().map(|p| p.requests).collect(),
                errors: points.iter().map(|p| p.errors).collect(),
                ttfb_p99_ms: points.iter().map(p99).collect(),
            });
        }
    }
    Ok(doc)
}

/// An admin API failure: becomes `{"error": code, "detail": ...}` with `status`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    detail: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            detail: detail.into(),
        }
    }
    fn bad(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }
    fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }
    fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }
    fn internal(e: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
}

type ApiResult = Result<Response<RespBody>, ApiError>;

/// Endpoints that only read.
const GETS: &[&str] = &[
    "/",
    "/healthz",
    "/readyz",
    "/metrics",
    "/api/v1/status",
    "/api/v1/config",
    "/api/v1/events",
    "/api/v1/history",
];
/// Endpoints that change something.
const POSTS: &[&str] = &[
    "/api/v1/rollback",
    "/api/v1/promote",
    "/api/v1/resume",
    "/api/v1/weights",
    "/api/v1/pause",
    "/api/v1/feedback",
    "/api/v1/faults",
    "/api/v1/reload",
    "/api/v1/drills",
];

/// Serves one admin request.
pub async fn handle(admin: &Admin, peer: SocketAddr, req: Request<Incoming>) -> Response<RespBody> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    // Another host (by socket address, never by forwarding headers) gets nothing but the
    // probes without the bearer token: reads reveal routing and versions too.
    let remote = !peer.ip().to_canonical().is_loopback();
    let result = if let Err(e) = browser_safe(admin, &req, POSTS.contains(&path.as_str())) {
        Err(e)
    } else if remote
        && !matches!(path.as_str(), "/healthz" | "/readyz")
        && !(admin.reloader.admin_token.load().is_some() && admin.authorized(&req))
    {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the admin API answers other hosts only with the bearer token",
        ))
    } else if POSTS.contains(&path.as_str()) {
        if method != Method::POST {
            Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{path} changes state: use POST"),
            ))
        } else if !admin.authorized(&req) {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong bearer token (Authorization: Bearer TOKEN)",
            ))
        } else {
            post(admin, &path, req).await
        }
    } else if GETS.contains(&path.as_str()) {
        if method == Method::GET || method == Method::HEAD {
            get(admin, &path, &req).await
        } else {
            Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{path} is read-only: use GET"),
            ))
        }
    } else {
        Err(ApiError::not_found(format!("no admin endpoint {path}")))
    };
    result.unwrap_or_else(|e| {
        let mut r = error(e.status, e.code, &e.detail);
        match e.status {
            StatusCode::METHOD_NOT_ALLOWED => {
                let allow = if POSTS.contains(&path.as_str()) {
                    "POST"
                } else {
                    "GET, HEAD"
                };
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            StatusCode::UNAUTHORIZED => {
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"rollgate\""),
                );
            }
            _ => {}
        }
        r
    })
}

/// Is `host` (a Host header value, port allowed) one the admin API answers to: an IP
/// literal, `localhost`, or a name in `admin.hosts`? Anything else may be a DNS-rebinding
/// page that resolved its own name to this listener.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = match host.strip_prefix('[') {
        // [v6]:port
        Some(rest) => {
            return rest
                .split_once(']')
                .is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok())
        }
        None => host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        }),
    };
    let name = name.trim_end_matches('.');
    name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

/// Browser safety (SPEC §6), with or without a token: a page in the operator's browser
/// must not be able to drive or read the admin API. A mutating call needs
/// `Content-Type: application/json` (a cross-site form or `no-cors` fetch cannot send it
/// without a CORS preflight, which this API never answers); an `Origin` other than the
/// listener's own, or `Sec-Fetch-Site: cross-site`, is refused; so is a `Host` that is not an
/// IP literal, `localhost` or one of `admin.hosts` (DNS rebinding).
fn browser_safe(admin: &Admin, req: &Request<Incoming>, mutating: bool) -> Result<(), ApiError> {
    let forbidden = |d: String| Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", d));
    let h = req.headers();
    let host = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    if let Some(host) = &host {
        let allowed = &admin.store.load().config.admin.hosts;
        if !host_allowed(host, allowed) {
            return forbidden(format!(
                "Host {host:?} is not an IP address, localhost or a name in admin.hosts"
            ));
        }
    }
    if h.get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"))
    {
        return forbidden("cross-site requests are refused".into());
    }
    if let Some(origin) = h.get(header::ORIGIN) {
        // http:// directly; https:// behind a TLS-terminating ingress named in admin.hosts.
        let same = origin.to_str().is_ok_and(|o| {
            host.as_deref().is_some_and(|h| {
                ["http://", "https://"].iter().any(|scheme| {
                    o.len() == scheme.len() + h.len()
                        && o.is_char_boundary(scheme.len())
                        && o[..scheme.len()].eq_ignore_ascii_case(scheme)
                        && o[scheme.len()..].eq_ignore_ascii_case(h)
                })
            })
        });
        if !same {
            return forbidden(format!(
                "Origin {origin:?} is not this admin listener's own"
            ));
        }
    }
    if mutating && req.method() == Method::POST {
        let json = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "mutating calls need Content-Type: application/json",
            ));
        }
    }
    Ok(())
}

/// The read-only listener for kubelet probes and Prometheus: `/healthz`, `/readyz`,
/// `/metrics`, nothing else.
pub async fn handle_health(admin: &Admin, req: Request<Incoming>) -> Response<RespBody> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/healthz" | "/readyz" | "/metrics") => {
            get(admin, path, &req)
                .await
                .unwrap_or_else(|e| error(e.status, e.code, &e.detail))
        }
        (_, "/healthz" | "/readyz" | "/metrics") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "read-only: use GET",
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("{path} is not served on health_listen"),
        ),
    }
}

async fn get(admin: &Admin, path: &str, req: &Request<Incoming>) -> ApiResult {
    Ok(match path {
        "/" => {
            let mut r = Response::new(RespBody::full(STATUS_PAGE));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
                ),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match admin.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => {
            let mut r = Response::new(RespBody::full(admin.store.metrics.encode()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        "/api/v1/status" => {
            let table = admin.store.load();
            let mut s = status(&admin.store, &admin.controller.view(), &table);
            if let Some(f) = admin.controller.fleet() {
                s.fleet = Some(f.status());
            }
            json(StatusCode::OK, &s)
        }
        "/api/v1/config" => {
            let table = admin.store.load();
            let c = &table.config;
            json(
                StatusCode::OK,
                &json!({
                    "source": c.source.display().to_string(),
                    "config_hash": c.hash,
                    "generation": table.generation,
                    "config": *c.document,
                    "runtime": admin.store.runtime_state(),
                }),
            )
        }
        "/api/v1/events" => {
            let audit = admin.controller.audit.clone();
            let since = match query_param(req, "since") {
                None => 0,
                Some(s) => match id_number(&s).or_else(|| s.parse().ok()) {
                    Some(n) => n,
                    // A fleet-wide id (`rb-cmd-...`) carries no number: find its record.
                    None => {
                        let a = audit.clone();
                        let id = s.clone();
                        tokio::task::spawn_blocking(move || a.seq_of(&id))
                            .await
                            .map_err(ApiError::internal)?
                            .map_err(ApiError::internal)?
                            .ok_or_else(|| {
                                ApiError::bad(format!("since={s:?} is not an event id or seq"))
                            })?
                    }
                },
            };
            let read = tokio::task::spawn_blocking(move || {
                let last = audit.last_seq();
                audit
                    .since_limited(since, crate::control::audit::SINCE_LIMIT)
                    .map(|(events, more)| (events, more, last))
            })
            .await
            .map_err(ApiError::internal)?;
            let (events, more, last) = read.map_err(ApiError::internal)?;
            // `more`: a page; ask again with `since` = the last id returned. `last_id`: the
            // newest record, a cursor for "what happens from now on".
            json(
                StatusCode::OK,
                &json!({ "events": events, "more": more, "last_id": last }),
            )
        }
        "/api/v1/history" => {
            let since = match query_param(req, "since") {
                None => None,
                Some(s) => Some(s.parse::<u64>().map_err(|_| {
                    ApiError::bad(format!("since={s:?} is not a Unix time in seconds"))
                })?),
            };
            let route = query_param(req, "route").map(|s| percent_decode(&s));
            let version = query_param(req, "version").map(|s| percent_decode(&s));
            let table = admin.store.load();
            let doc = history(
                &admin.store,
                &table,
                route.as_deref(),
                version.as_deref(),
                since,
            )?;
            json(StatusCode::OK, &doc)
        }
        _ => return Err(ApiError::not_found(format!("no admin endpoint {path}"))),
    })
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| v.to_string())
    })
}

/// `%XX` escapes decoded (as `encodeURIComponent` makes them); `+` stays a plus, and an
/// escape that is not one stays as it is.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(x)) => {
                out.push(x);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads and parses a JSON request body (unknown fields are errors, as in the config).
async fn body<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    let bytes = limited
        .collect()
        .await
        .map_err(|e| ApiError::bad(format!("reading the body failed: {e}")))?
        .to_bytes();
    let bytes = if bytes.is_empty() {
        &b"{}"[..]
    } else {
        &bytes[..]
    };
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackReq {
    route: Option<String>,
    version: VersionName,
    reason: Option<String>,
    operator: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteReq {
    route: String,
    version: VersionName,
    reason: Option<String>,
    operator: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumeReq {
    version: VersionName,
    reason: Option<String>,
    operator: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightsReq {
    route: String,
    #[serde(default)]
    weights: Option<std::collections::BTreeMap<VersionName, u32>>,
    /// Drop the route's runtime overrides: back to the file's split and baseline.
    #[serde(default)]
    reset: bool,
    reason: Option<String>,
    operator: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PauseReq {
    route: String,
    paused: bool,
    reason: Option<String>,
    operator: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackReq {
    request_id: String,
    correct: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsReq {
    version: VersionName,
    error_rate: Option<f64>,
    latency: Option<String>,
    duration: String,
    reason: Option<String>,
    operator: Option<String>,
}

fn duration(key: &str, s: &str) -> Result<Duration, ApiError> {
    humantime::parse_duration(s).map_err(|e| {
        ApiError::bad(format!(
            "{key}: {s:?} is not a duration like 800ms or 30s: {e}"
        ))
    })
}

/// The admin API's answer to a refused command.
fn refused(e: Refused) -> ApiError {
    match e {
        Refused::NotFound(d) => ApiError::not_found(d),
        Refused::Conflict(d) | Refused::Stale(d) => ApiError::conflict(d),
        Refused::Invalid(d) => ApiError::bad(d),
        Refused::Failed(d) => ApiError::internal(d),
    }
}

/// Applies a command made through the API; answers its record.
async fn command(
    admin: &Admin,
    action: Action,
    operator: Option<String>,
    reason: Option<String>,
) -> ApiResult {
    let operator = Some(operator.unwrap_or_else(|| "admin-api".into()));
    let cmd = Command::new(action, operator, reason);
    let record = admin.controller.apply(cmd).await.map_err(refused)?;
    Ok(json(StatusCode::OK, &record))
}

/// The fields a drill result may carry (what `rollgate drill` sends); anything else, and
/// in particular `id`, `kind` or `timestamp`, is refused.
const DRILL_FIELDS: &[&str] = &[
    "route",
    "version",
    "fault",
    "passed",
    "score",
    "checks",
    "rollback_id",
    "trigger",
    "rule",
    "time_to_detect_ms",
    "trip_to_swap_us",
    "client_errors",
    "requests",
    "initiated_by",
];

async fn post(admin: &Admin, path: &str, req: Request<Incoming>) -> ApiResult {
    match path {
        "/api/v1/rollback" => {
            let r: RollbackReq = body(req).await?;
            // What the operator saw, for the record.
            let table = admin.store.load();
            let now = tokio::time::Instant::now();
            let window = |name: &VersionName| admin.store.telemetry.version_window(name, now);
            let baseline = r
                .route
                .as_deref()
                .and_then(|n| table.routes.iter().find(|rt| &*rt.name == n))
                .map(|rt| table.versions[rt.baseline_member().version].name.clone());
            let metrics = json!({"candidate": window(&r.version),
                                 "baseline": baseline.as_ref().map(window)});
            drop(table);
            let action = Action::Rollback {
                route: r.route,
                version: r.version,
                trigger: Trigger::Manual,
                evidence: json!({ "metrics": metrics }),
                expect: None,
            };
            command(admin, action, r.operator, r.reason).await
        }
        "/api/v1/promote" => {
            let r: PromoteReq = body(req).await?;
            let action = Action::Promote {
                route: r.route,
                version: r.version,
                expect_step: None,
            };
            command(admin, action, r.operator, r.reason).await
        }
        "/api/v1/resume" => {
            let r: ResumeReq = body(req).await?;
            command(
                admin,
                Action::Resume { version: r.version },
                r.operator,
                r.reason,
            )
            .await
        }
        "/api/v1/weights" => {
            let r: WeightsReq = body(req).await?;
            let action = Action::Weights {
                route: r.route,
                weights: r.weights.unwrap_or_default(),
                reset: r.reset,
            };
            command(admin, action, r.operator, r.reason).await
        }
        "/api/v1/pause" => {
            let r: PauseReq = body(req).await?;
            let action = Action::Pause {
                route: r.route,
                paused: r.paused,
            };
            command(admin, action, r.operator, r.reason).await
        }
        "/api/v1/feedback" => {
            let r: FeedbackReq = body(req).await?;
            let t = &admin.store.telemetry;
            let pair = t
                .recent
                .take(r.request_id.as_bytes())
                .and_then(|id| t.pair_by_id(id))
                .ok_or_else(|| {
                    ApiError::not_found(format!(
                        "request {:?} is unknown: never seen, already given feedback, or too old",
                        r.request_id
                    ))
                })?;
            pair.signals.feedback(r.correct);
            Ok(json(
                StatusCode::OK,
                &json!({"request_id": r.request_id, "route": &*pair.route,
                        "version": pair.version.as_str(), "correct": r.correct}),
            ))
        }
        "/api/v1/faults" => {
            let r: FaultsReq = body(req).await?;
            let error_rate = r.error_rate.unwrap_or(0.0);
            if !(0.0..=1.0).contains(&error_rate) {
                return Err(ApiError::bad("error_rate must be between 0 and 1"));
            }
            let latency = match &r.latency {
                Some(l) => duration("latency", l)?,
                None => Duration::ZERO,
            };
            let dur = duration("duration", &r.duration)?;
            if dur > Duration::from_secs(3600) {
                return Err(ApiError::bad("duration is at most 1h"));
            }
            if latency > Duration::from_secs(60) {
                return Err(ApiError::bad("latency is at most 60s"));
            }
            let action = Action::Fault {
                version: r.version,
                error_rate,
                latency_ms: latency.as_millis() as u64,
                duration_ms: dur.as_millis() as u64,
            };
            command(admin, action, r.operator, r.reason).await
        }
        "/api/v1/drills" => {
            // A finished drill's result (from `rollgate drill`): one `drill` record; a passed
            // drill sets rollgate_rollback_drill_timestamp_seconds.
            let r: Map<String, Value> = body(req).await?;
            if let Some(k) = r.keys().find(|k| !DRILL_FIELDS.contains(&k.as_str())) {
                return Err(ApiError::bad(format!(
                    "unknown field {k:?} in a drill result (allowed: {})",
                    DRILL_FIELDS.join(", ")
                )));
            }
            let table = admin.store.load();
            let route = r
                .get("route")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad("route is required"))?;
            if !table.routes.iter().any(|rt| &*rt.name == route) {
                return Err(ApiError::not_found(format!("no route {route:?}")));
            }
            let version = r
                .get("version")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad("version is required"))?;
            if table.version(&VersionName::from(version)).is_none() {
                return Err(ApiError::not_found(format!("no version {version}")));
            }
            let passed = r.get("passed").and_then(Value::as_bool).unwrap_or(false);
            drop(table);
            let record = admin
                .controller
                .record_drill(r)
                .await
                .map_err(ApiError::internal)?;
            if passed {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                admin.store.metrics.rollback_drill_timestamp.set(now);
            }
            Ok(json(StatusCode::OK, &record))
        }
        "/api/v1/reload" => match admin.reloader.reload(Cause::Api).await {
            Ok(record) => Ok(json(StatusCode::OK, &record.unwrap_or(Value::Null))),
            Err(ReloadError::Rejected(rejected)) => Ok(json(
                StatusCode::UNPROCESSABLE_ENTITY,
                &json!({"error": "invalid_config", "detail": rejected.error,
                        "record": rejected.record}),
            )),
            // A server fault, not a refusal: the file was applied. What the record would
            // have said (restart-only keys, TLS errors) comes back with the answer.
            Err(ReloadError::Unrecorded {
                generation,
                error,
                record,
            }) => Ok(json(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"error": "audit_failed",
                        "detail": format!("applied (generation {generation}) but the audit record could not be written: {error}"),
                        "unrecorded": record}),
            )),
            Err(ReloadError::Interrupted(e)) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("the reload did not finish: {e}"),
            )),
        },
        _ => Err(ApiError::not_found(format!("no admin endpoint {path}"))),
    }
}

fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<RespBody> {
    let mut r = Response::new(RespBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A JSON response.
pub fn json(status: StatusCode, value: &impl Serialize) -> Response<RespBody> {
    let body = serde_json::to_vec(value)
        .unwrap_or_else(|e| format!("{{\"error\":\"internal\",\"detail\":\"{e}\"}}").into_bytes());
    let mut r = Response::new(RespBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The admin API's error shape: `{"error": "...", "detail": "..."}`.
pub fn error(status: StatusCode, code: &str, detail: &str) -> Response<RespBody> {
    json(
        status,
        &serde_json::json!({"error": code, "detail": detail}),
    )
}
