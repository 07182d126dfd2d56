//! Active health checks: every endpoint of every version with a `health_check` is probed
//! with `GET path` every `interval`. `unhealthy_after` consecutive failures take the
//! endpoint out of rotation, `healthy_after` consecutive passes put it back. When a
//! version's overall health flips, the table is recompiled so routes see it (degraded
//! mode, fallback, `rollgate_version_healthy`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::{Method, Request, Uri};
use tokio::sync::watch;
use tokio::time::Instant;

use super::Controller;
use crate::config::HealthCheckConfig;
use crate::proxy::body::ReqBody;
use crate::proxy::client::EndpointRt;

/// Probes one endpoint once; true when it answered 2xx within the timeout.
async fn probe(ep: &EndpointRt, hc: &HealthCheckConfig) -> bool {
    let uri = Uri::builder()
        .scheme(ep.endpoint.uri_scheme())
        .authority(ep.endpoint.authority.clone())
        .path_and_query(hc.path.as_str())
        .build();
    let Ok(uri) = uri else { return false };
    let Ok(req) = Request::builder()
        .method(Method::GET)
        .uri(uri)
        .body(ReqBody::Empty)
    else {
        return false;
    };
    matches!(tokio::time::timeout(hc.timeout, ep.send(req)).await, Ok(Ok(r)) if r.status().is_success())
}

/// Applies one probe result to the endpoint's streaks; returns whether `healthy` flipped.
pub fn apply(ep: &EndpointRt, hc: &HealthCheckConfig, ok: bool) -> bool {
    if ok {
        ep.failures.store(0, Ordering::Relaxed);
        let s = ep.successes.fetch_add(1, Ordering::Relaxed) + 1;
        if s >= hc.healthy_after && !ep.healthy.swap(true, Ordering::Relaxed) {
            return true;
        }
    } else {
        ep.successes.store(0, Ordering::Relaxed);
        let f = ep.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if f >= hc.unhealthy_after && ep.healthy.swap(false, Ordering::Relaxed) {
            return true;
        }
    }
    false
}

/// The health-check task. Runs until `stop` turns true.
pub async fn run(c: Arc<Controller>, mut stop: watch::Receiver<bool>) {
    let mut next_due: HashMap<(String, String), Instant> = HashMap::new();
    let mut generation = 0;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let now = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            now = tick.tick() => now,
        };
        let table = c.store.load();
        if generation != table.generation {
            // Forget endpoints of versions the config no longer has (bounded by the config,
            // not by every release ever probed).
            generation = table.generation;
            next_due.retain(|(version, url), _| {
                table.versions.iter().any(|v| {
                    v.name.as_str() == version
                        && v.upstream
                            .endpoints
                            .iter()
                            .any(|ep| &ep.endpoint.url == url)
                })
            });
        }
        let mut probes = tokio::task::JoinSet::new();
        for v in table.versions.iter() {
            let Some(hc) = v.config.health_check.clone() else {
                continue;
            };
            for (i, ep) in v.upstream.endpoints.iter().enumerate() {
                let key = (v.name.to_string(), ep.endpoint.url.clone());
                if next_due.get(&key).is_some_and(|t| *t > now) {
                    continue;
                }
                next_due.insert(key, now + hc.interval);
                let upstream = v.upstream.clone();
                let hc = hc.clone();
                probes.spawn(async move {
                    let ep = &upstream.endpoints[i];
                    let ok = probe(ep, &hc).await;
                    apply(ep, &hc, ok)
                });
            }
        }
        let mut flipped = false;
        while let Some(r) = probes.join_next().await {
            flipped |= r.unwrap_or(false);
        }
        if flipped {
            // Recompile (degraded routes, fallback, health gauges); records and alerts go
            // out without holding up the next probes.
            c.health_changed().await;
        }
    }
}
