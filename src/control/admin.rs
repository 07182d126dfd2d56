//! The admin listener: liveness, readiness, metrics and the JSON API, on its own port
//! (loopback by default), never on the data port.
//!
//! Every answer is computed from the published routing table and the telemetry registry;
//! nothing here can block the data plane (the only lock touched is the telemetry
//! registry's map, taken briefly per scrape).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;

use crate::proxy::body::RespBody;
use crate::routing::store::Store;
use crate::routing::table::{RouteState, Table};
use crate::telemetry::WindowStats;

/// What the admin handlers need.
#[derive(Debug)]
pub struct Admin {
    pub store: Arc<Store>,
    /// False once shutdown began: `/readyz` answers 503 so load balancers stop sending.
    pub accepting: AtomicBool,
}

impl Admin {
    pub fn new(store: Arc<Store>) -> Self {
        Admin {
            store,
            accepting: AtomicBool::new(true),
        }
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
}

#[derive(Debug, Serialize)]
pub struct RouteStatus {
    pub name: String,
    pub owner: Option<String>,
    pub baseline: String,
    pub state: RouteState,
    pub weights: std::collections::BTreeMap<String, u32>,
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
pub fn status(store: &Store, table: &Table) -> Status {
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
    }
}

/// Serves one admin request.
pub async fn handle(admin: &Admin, req: Request<Incoming>) -> Response<RespBody> {
    let path = req.uri().path();
    let method = req.method();
    match (method, path) {
        (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET | &Method::HEAD, "/readyz") => match admin.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(RespBody::full(admin.store.metrics.encode()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        (&Method::GET, "/api/v1/status") => {
            let table = admin.store.load();
            json(StatusCode::OK, &status(&admin.store, &table))
        }
        (_, "/healthz" | "/readyz" | "/metrics" | "/api/v1/status") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no admin endpoint {path}"),
        ),
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
