//! Fleet soak (issue 15): three real `rollgate run` replicas in one fleet over a real
//! `redis-server`, under SOAK_SECS (default 300) of HTTP/1.1 traffic spread over all three,
//! while the store is restarted with its data lost every 60 s (a non-persistent Redis), one
//! replica's config file is rewritten and reloaded every 10 s, and the canary is rolled
//! back and resumed through a different replica's admin API every 20 s (sometimes while the
//! store is down).
//!
//! Passes when no client request failed (every answer 2xx), and at the end, with the store
//! up, every replica's status agrees: the same quarantines, the same effective weights per
//! route, and the fleet block sees three live replicas.
//!
//! Not part of the default run: `scripts/soak-fleet` (or
//! `SOAK_SECS=120 cargo test --release --test soak_fleet -- --ignored --nocapture`).

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const RESTART_STORE_EVERY: Duration = Duration::from_secs(60);
const RELOAD_EVERY: Duration = Duration::from_secs(10);
const ROLLBACK_EVERY: Duration = Duration::from_secs(20);
/// The store stays down this long at each restart.
const STORE_DOWN_FOR: Duration = Duration::from_secs(3);

fn yaml(store: &str, stable: &str, canary: &str, weight: u32) -> String {
    format!(
        "state_dir: \"{{state_dir}}\"\n\
         versions:\n  stable: {{endpoints: [\"{stable}\"]}}\n  canary: {{endpoints: [\"{canary}\"]}}\n\
         routes:\n  - {{name: chat, match: {{path_prefix: /}}, baseline: stable, split: {{stable: {}, canary: {weight}}}}}\n\
         evaluator: {{min_requests: 1000000}}\n\
         fleet: {{store: \"{store}\", name: soak}}\n",
        100 - weight
    )
}

/// What must agree across replicas: quarantines and effective weights.
fn shape(status: &Value) -> (Vec<String>, Vec<(String, String)>) {
    let mut q: Vec<String> = status["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["quarantined"] == true)
        .filter_map(|v| v["name"].as_str().map(str::to_string))
        .collect();
    q.sort();
    let w = status["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| (r["name"].to_string(), r["weights"].to_string()))
        .collect();
    (q, w)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: scripts/soak-fleet"]
async fn three_replicas_survive_store_restarts_reloads_and_rollbacks() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let redis = RedisServer::start().await;
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let (s_url, c_url) = (stable.http_url(), canary.http_url());
    let mut replicas = Vec::new();
    for name in ["r1", "r2", "r3"] {
        replicas.push(Replica::start(name, &yaml(&redis.url(), &s_url, &c_url, 10)).await);
    }
    let urls: Vec<String> = replicas.iter().map(|r| r.url("/v1/chat")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for i in 0..6 {
        let url = urls[i % urls.len()].clone();
        let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let client = TestClient::http1();
            while !stop.load(Ordering::Relaxed) {
                let ok = client
                    .try_send(request(http::Method::GET, &url).body(empty()).unwrap())
                    .await
                    .is_ok_and(|r| r.status.is_success());
                sent.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let started = Instant::now();
    let (mut next_restart, mut next_reload, mut next_rollback) =
        (RESTART_STORE_EVERY, RELOAD_EVERY, ROLLBACK_EVERY);
    let mut quarantined = false;
    let mut turn = 0usize;
    let mut rollbacks = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        let t = started.elapsed();
        if t >= next_restart {
            next_restart += RESTART_STORE_EVERY;
            redis.stop();
            eprintln!("[{:>4}s] store stopped", t.as_secs());
            tokio::time::sleep(STORE_DOWN_FOR).await;
            redis.start_again().await;
            eprintln!("[{:>4}s] store back, empty", started.elapsed().as_secs());
        }
        if t >= next_reload {
            next_reload += RELOAD_EVERY;
            let r = &replicas[turn % 3];
            // The file as the harness wrote it (listeners, state_dir), with the split flipped
            // between 90/10 and 80/20: a real change, so the reload swaps a new table.
            let text = std::fs::read_to_string(r.config_path()).unwrap();
            let text = if text.contains("stable: 90, canary: 10") {
                text.replace("stable: 90, canary: 10", "stable: 80, canary: 20")
            } else {
                text.replace("stable: 80, canary: 20", "stable: 90, canary: 10")
            };
            std::fs::write(r.config_path(), text).unwrap();
            let resp = r.admin_post("/api/v1/reload", "{}").await;
            assert!(
                resp.status.is_success(),
                "reload on {}: {}",
                r.name(),
                resp.text()
            );
        }
        if t >= next_rollback {
            next_rollback += ROLLBACK_EVERY;
            let r = &replicas[(turn + 1) % 3];
            let (path, body) = if quarantined {
                ("/api/v1/resume", r#"{"version": "canary"}"#)
            } else {
                rollbacks += 1;
                (
                    "/api/v1/rollback",
                    r#"{"version": "canary", "reason": "soak"}"#,
                )
            };
            let resp = r.admin_post(path, body).await;
            eprintln!(
                "[{:>4}s] {path} on {}: {}",
                t.as_secs(),
                r.name(),
                resp.status
            );
            // A conflict means the fleet already had it that way (a command of a replica that
            // was cut off and re-published); anything else is a failure.
            assert!(
                resp.status.is_success() || resp.status == 409,
                "{path} on {}: {} {}",
                r.name(),
                resp.status,
                resp.text()
            );
            quarantined = !quarantined;
        }
        turn += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    // Converged: the same shape everywhere, three live replicas, store up.
    let mut statuses: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        statuses.clear();
        for r in &replicas {
            statuses.push(r.status_json().await);
        }
        let first = shape(&statuses[0]);
        let agreed = statuses.iter().all(|s| {
            shape(s) == first
                && s["fleet"]["store_up"] == true
                && s["fleet"]["replicas"].as_array().map_or(0, Vec::len) == 3
        });
        if agreed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replicas diverge: {:#?}",
            statuses
                .iter()
                .map(|s| (shape(s), s["fleet"].clone()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "{secs} s: {sent} requests, {failed} failed, {rollbacks} rollbacks, final quarantines {:?}",
        shape(&statuses[0]).0
    );
    assert_eq!(failed, 0, "client-visible errors");
    assert!(sent > 0);
    for r in &replicas {
        let text = r.stderr_text();
        assert!(!text.contains("panicked"), "{}: {text}", r.name());
    }
}
