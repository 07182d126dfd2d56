//! Soak test (issue #7): the real binary (`rollgate run -c FILE`, a child process, so its
//! memory is its own) under SOAK_SECS (default 600) of mixed traffic: HTTP/1.1 and h2c
//! JSON calls with sticky keys, and SSE streams over both, while the config file is
//! rewritten (a weight and a `set_headers` value) and reloaded every 10 s and the canary is
//! rolled back and resumed through the admin API every 60 s. It samples the proxy's RSS
//! every 10 s and prints it as a table.
//!
//! Passes when no request failed (every answer 2xx, from the version it names, SSE bodies
//! complete), no request that started after a rollback and ended before the resume was
//! answered by the quarantined canary, every reload and admin call succeeded, and the RSS
//! stayed bounded: after warm-up, the average of the last third of the samples is within
//! 20% + 8 MiB of the average of the first third. Faults: none are injected.
//!
//! Not part of the default run: `scripts/soak` (or
//! `SOAK_SECS=60 cargo test --release --test soak -- --ignored --nocapture`).

#[macro_use]
mod support;

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Method;
use serde_json::{json, Value};
use support::*;

/// Events per SSE stream, and the pause between them.
const SSE_CHUNKS: usize = 8;
const SSE_INTERVAL: Duration = Duration::from_millis(15);
/// How often the config file is rewritten, the canary rolled back, RSS sampled.
const RELOAD_EVERY: Duration = Duration::from_secs(10);
const ROLLBACK_EVERY: Duration = Duration::from_secs(60);
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// How long the canary stays rolled back before it is resumed.
const QUARANTINE_FOR: Duration = Duration::from_secs(5);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Kills the child if the test ends early.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The config file, `generation`-th edition: the chat split and a header value change.
fn config_text(state: &Path, up: &[(&str, &TestUpstream)], generation: u64) -> String {
    let url = |name: &str| {
        up.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, u)| u.http_url())
            .unwrap()
    };
    let (stable_w, canary_w) = if generation.is_multiple_of(2) {
        (80, 20)
    } else {
        (70, 30)
    };
    format!(
        "listen: 127.0.0.1:0\n\
         admin: {{listen: 127.0.0.1:0}}\n\
         state_dir: \"{state}\"\n\
         drain_timeout: 5s\n\
         evaluator: {{min_requests: 1000000}}\n\
         versions:\n  \
           stable: {{endpoints: [\"{stable}\"], set_headers: {{x-soak-edition: \"{generation}\"}}}}\n  \
           canary: {{endpoints: [\"{canary}\"]}}\n  \
           sse-a: {{endpoints: [\"{sse_a}\"]}}\n  \
           sse-b: {{endpoints: [\"{sse_b}\"]}}\n\
         routes:\n  \
           - {{name: chat, owner: soak, match: {{path_prefix: /v1/}}, baseline: stable, \
               split: {{stable: {stable_w}, canary: {canary_w}}}, sticky: {{header: x-user-id}}}}\n  \
           - {{name: stream, owner: soak, match: {{path_prefix: /stream/}}, baseline: sse-a, \
               split: {{sse-a: 50, sse-b: 50}}}}\n",
        state = state.display(),
        stable = url("stable"),
        canary = url("canary"),
        sse_a = url("sse-a"),
        sse_b = url("sse-b"),
    )
}

/// Replaces the file in one rename, as an editor or a ConfigMap update does.
fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Starts `rollgate run -c path` and returns it with its data and admin addresses, read
/// from its "rollgate serving" log line. Warnings and errors it logs are kept in `log`.
fn spawn_rollgate(
    path: &Path,
    log: Arc<Mutex<Vec<String>>>,
) -> (ChildGuard, SocketAddr, SocketAddr) {
    let mut child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_rollgate"))
            .args(["--log-format", "json", "run", "-c"])
            .arg(path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn rollgate"),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<(SocketAddr, SocketAddr)>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let field = |k: &str| {
                v["fields"][k]
                    .as_str()
                    .or_else(|| v[k].as_str())
                    .map(str::to_string)
            };
            if field("message").as_deref() == Some("rollgate serving") {
                let addr = |k: &str| field(k).and_then(|a| a.parse().ok());
                if let (Some(d), Some(a)) = (addr("data_addr"), addr("admin_addr")) {
                    let _ = tx.send((d, a));
                }
            }
            let level = v["level"].as_str().unwrap_or("");
            if level == "WARN" || level == "ERROR" {
                let mut log = log.lock().unwrap();
                if log.len() < 200 {
                    log.push(line);
                }
            }
        }
    });
    let (data, admin) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("no \"rollgate serving\" log line within 20s");
    (child, data, admin)
}

/// What the load generators saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    h1: AtomicU64,
    h2: AtomicU64,
    sse: AtomicU64,
    canary: AtomicU64,
    /// The first failures, described.
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut f = self.failures.lock().unwrap();
        if f.len() < 20 {
            f.push(what);
        }
    }
}

/// When the canary was quarantined: `(rollback answered, resume sent)` as offsets from the
/// start, the end `None` while it still is.
type Quarantines = Mutex<Vec<(Duration, Option<Duration>)>>;

#[allow(clippy::too_many_arguments)]
async fn worker(
    kind: usize,
    id: u64,
    data: SocketAddr,
    t0: Instant,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    quarantines: Arc<Quarantines>,
) {
    let h2 = kind % 2 == 1;
    let sse = kind % 4 >= 2;
    let client = if h2 {
        TestClient::h2c()
    } else {
        TestClient::http1()
    };
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let started = t0.elapsed();
        let (url, req) = if sse {
            let url = format!("http://{data}/stream/chat?w={id}&n={n}");
            (
                url.clone(),
                request(Method::GET, &url)
                    .header("accept", "text/event-stream")
                    .body(empty())
                    .unwrap(),
            )
        } else if h2 && n.is_multiple_of(2) {
            // Every other h2c call is a GET: the harness's h2c client sets no TCP_NODELAY, so
            // a POST (HEADERS and DATA written apart) waits out a delayed ACK, about 40 ms.
            let url = format!("http://{data}/v1/models?n={n}");
            let user = format!("user-{}", (id * 7919 + n) % 1000);
            (
                url.clone(),
                request(Method::GET, &url)
                    .header("x-user-id", user)
                    .body(empty())
                    .unwrap(),
            )
        } else {
            let url = format!("http://{data}/v1/chat/completions");
            let user = format!("user-{}", (id * 7919 + n) % 1000);
            (
                url.clone(),
                request(Method::POST, &url)
                    .header("content-type", "application/json")
                    .header("x-user-id", user)
                    .body(full(format!(
                        "{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi {n}\"}}]}}"
                    )))
                    .unwrap(),
            )
        };
        let proto = if h2 { "h2c" } else { "http/1.1" };
        let r = match client.try_send(req).await {
            Ok(r) => r,
            Err(e) => {
                tally.fail(format!("{proto} {url}: {e}"));
                continue;
            }
        };
        let ended = t0.elapsed();
        let version = r.version().unwrap_or("").to_string();
        let problem = if !r.status.is_success() {
            Some(format!("status {}: {}", r.status, r.text()))
        } else if r.header("x-upstream") != Some(version.as_str()) {
            Some(format!(
                "x-rollgate-version {version:?} but x-upstream {:?}",
                r.header("x-upstream")
            ))
        } else if sse && r.body != sse_body(&version, SSE_CHUNKS) {
            Some(format!("incomplete stream from {version}: {:?}", r.text()))
        } else if !sse && r.body != format!("{{\"version\":\"{version}\"}}") {
            Some(format!("body from {version}: {:?}", r.text()))
        } else {
            None
        };
        if let Some(p) = problem {
            tally.fail(format!("{proto} {url}: {p}"));
            continue;
        }
        if version == "canary" {
            tally.canary.fetch_add(1, Ordering::Relaxed);
            let q = quarantines.lock().unwrap();
            let during = q
                .iter()
                .find(|(from, to)| *from <= started && to.is_none_or(|to| ended <= to))
                .map(|w| w.0);
            drop(q);
            if let Some(from) = during {
                tally.fail(format!(
                    "{proto} {url}: answered by the quarantined canary (request {started:?}..{ended:?}, quarantine from {from:?})"
                ));
                continue;
            }
        }
        tally.ok.fetch_add(1, Ordering::Relaxed);
        let c = if sse {
            &tally.sse
        } else if h2 {
            &tally.h2
        } else {
            &tally.h1
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// One admin call on a connection of its own, as the `rollgate` CLI makes them. (A pooled
/// connection would sit idle ~10 s between calls, and rollgate closes idle HTTP/1.1
/// connections after 10 s: reusing one at that moment races the close and fails the POST.)
async fn admin_post(base: SocketAddr, path: &str, body: Value) -> Value {
    let r = TestClient::http1()
        .post_json(&format!("http://{base}{path}"), body.to_string(), &[])
        .await;
    assert_eq!(r.status, 200, "POST {path} {body}: {}", r.text());
    r.json()
}

fn mib(kib: f64) -> f64 {
    kib / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: minutes long; run scripts/soak (SOAK_SECS, default 600)"]
async fn soak_mixed_traffic_reloads_and_rollbacks() {
    let secs = env_u64("SOAK_SECS", 600);
    let conns = env_u64("SOAK_CONNS", 8) as usize;
    let duration = Duration::from_secs(secs);

    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let sse_a = TestUpstream::start("sse-a").await;
    let sse_b = TestUpstream::start("sse-b").await;
    for u in [&sse_a, &sse_b] {
        u.set(Reply::Sse {
            chunks: SSE_CHUNKS,
            interval: SSE_INTERVAL,
        });
    }
    let ups = [
        ("stable", &stable),
        ("canary", &canary),
        ("sse-a", &sse_a),
        ("sse-b", &sse_b),
    ];

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let path: PathBuf = dir.path().join("rollgate.yaml");
    let mut edition = 0u64;
    write_config(&path, &config_text(&state, &ups, edition));
    let log = Arc::new(Mutex::new(Vec::new()));
    let (mut child, data, admin_addr) = spawn_rollgate(&path, log.clone());
    let pid = child.0.id();
    println!(
        "soak: {secs}s, {conns} connections, rollgate pid {pid} on {data} (admin {admin_addr})"
    );

    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let quarantines: Arc<Quarantines> = Arc::default();
    let workers: Vec<_> = (0..conns)
        .map(|i| {
            tokio::spawn(worker(
                i,
                i as u64,
                data,
                t0,
                stop.clone(),
                tally.clone(),
                quarantines.clone(),
            ))
        })
        .collect();

    // The control loop: one tick a second.
    let mut samples: Vec<(u64, u64, u64, u64)> = vec![(0, rss_kib(pid), 0, 0)];
    let (mut reloads, mut rollbacks) = (0u64, 0u64);
    let mut next_reload = RELOAD_EVERY;
    let mut next_rollback = ROLLBACK_EVERY.min(duration / 2);
    let mut next_sample = SAMPLE_EVERY;
    let mut resume_at: Option<Duration> = None;
    println!(
        "{:>6} {:>9} {:>10} {:>10} {:>8} {:>7}",
        "t(s)", "RSS(MiB)", "(test MiB)", "requests", "failed", "req/s"
    );
    let mut last_requests = 0u64;
    while t0.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(250)).await;
        // TestUpstream records every request it serves: forget them, or this process grows
        // by gigabytes over a long soak (and the machine with it).
        for (_, u) in &ups {
            u.clear();
        }
        let now = t0.elapsed();
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "rollgate exited during the soak: {:?}\n{:#?}",
            child.0.try_wait(),
            log.lock().unwrap()
        );
        if now >= next_reload {
            next_reload += RELOAD_EVERY;
            edition += 1;
            write_config(&path, &config_text(&state, &ups, edition));
            let rec = admin_post(admin_addr, "/api/v1/reload", json!({})).await;
            assert!(
                rec.is_null() || rec["kind"] == "config_reload",
                "reload answered {rec}"
            );
            reloads += 1;
        }
        if now >= next_rollback && resume_at.is_none() {
            next_rollback += ROLLBACK_EVERY;
            let rec = admin_post(
                admin_addr,
                "/api/v1/rollback",
                json!({"route": "chat", "version": "canary", "reason": "soak", "operator": "soak"}),
            )
            .await;
            assert_eq!(rec["kind"], "rollback", "{rec}");
            quarantines.lock().unwrap().push((t0.elapsed(), None));
            resume_at = Some(t0.elapsed() + QUARANTINE_FOR);
            rollbacks += 1;
        }
        if resume_at.is_some_and(|at| now >= at) {
            resume_at = None;
            if let Some(last) = quarantines.lock().unwrap().last_mut() {
                last.1 = Some(t0.elapsed());
            }
            let rec = admin_post(
                admin_addr,
                "/api/v1/resume",
                json!({"version": "canary", "reason": "soak", "operator": "soak"}),
            )
            .await;
            assert_eq!(rec["kind"], "resume", "{rec}");
        }
        if now >= next_sample {
            next_sample += SAMPLE_EVERY;
            let requests = tally.ok.load(Ordering::Relaxed) + tally.failed.load(Ordering::Relaxed);
            let failed = tally.failed.load(Ordering::Relaxed);
            let rss = rss_kib(pid);
            samples.push((now.as_secs(), rss, requests, failed));
            println!(
                "{:>6} {:>9.1} {:>10.1} {:>10} {:>8} {:>7.0}",
                now.as_secs(),
                mib(rss as f64),
                mib(rss_kib(std::process::id()) as f64),
                requests,
                failed,
                (requests - last_requests) as f64 / SAMPLE_EVERY.as_secs_f64()
            );
            last_requests = requests;
        }
    }
    if resume_at.is_some() {
        if let Some(last) = quarantines.lock().unwrap().last_mut() {
            last.1 = Some(t0.elapsed());
        }
        admin_post(
            admin_addr,
            "/api/v1/resume",
            json!({"version": "canary", "reason": "soak end", "operator": "soak"}),
        )
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = t0.elapsed();

    // The proxy's own view: no failed reload, and what it counted.
    let metrics = TestClient::http1()
        .get(&format!("http://{admin_addr}/metrics"))
        .await
        .text();
    let reload_errors = metric_sum(
        &metrics,
        "rollgate_config_reloads_total",
        &[("result", "error")],
    );
    let ok = tally.ok.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    println!(
        "soak: {:.0}s, {} requests ({:.0}/s): {} ok ({} HTTP/1.1, {} h2c, {} SSE streams; {} by canary), {} failed; {} reloads ({} failed), {} rollback+resume cycles",
        elapsed.as_secs_f64(),
        ok + failed,
        (ok + failed) as f64 / elapsed.as_secs_f64(),
        ok,
        tally.h1.load(Ordering::Relaxed),
        tally.h2.load(Ordering::Relaxed),
        tally.sse.load(Ordering::Relaxed),
        tally.canary.load(Ordering::Relaxed),
        failed,
        reloads,
        reload_errors,
        rollbacks,
    );

    // RSS: after warm-up, the last third against the first third.
    let warmup = (secs / 6).clamp(10, 60);
    let steady: Vec<f64> = samples
        .iter()
        .filter(|(t, ..)| *t > warmup)
        .map(|(_, rss, ..)| *rss as f64)
        .collect();
    assert!(steady.len() >= 2, "too few RSS samples: {samples:?}");
    let third = (steady.len() / 3).max(1);
    let avg = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let first = avg(&steady[..third]);
    let last = avg(&steady[steady.len() - third..]);
    let bound = first * 1.2 + 8.0 * 1024.0;
    println!(
        "soak: RSS after {warmup}s warm-up: first third {:.1} MiB, last third {:.1} MiB (bound {:.1} MiB), peak {:.1} MiB",
        mib(first),
        mib(last),
        mib(bound),
        mib(samples.iter().map(|s| s.1).max().unwrap_or(0) as f64)
    );

    // A clean drain at the end.
    let term = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let exit = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < elapsed + Duration::from_secs(15),
            "rollgate did not exit within 15s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let failures = tally.failures.lock().unwrap().clone();
    assert_eq!(failed, 0, "failed requests, the first ones: {failures:#?}");
    assert!(
        ok >= secs * 20,
        "only {ok} requests in {secs}s: the load did not run"
    );
    assert!(
        tally.sse.load(Ordering::Relaxed) > 0
            && tally.h2.load(Ordering::Relaxed) > 0
            && tally.h1.load(Ordering::Relaxed) > 0,
        "some kind of traffic never ran"
    );
    assert_eq!(
        reload_errors,
        0.0,
        "failed reloads: {:#?}",
        log.lock().unwrap()
    );
    assert!(
        last <= bound,
        "RSS grew from {:.1} MiB to {:.1} MiB (bound {:.1} MiB): {samples:?}",
        mib(first),
        mib(last),
        mib(bound)
    );
    assert!(
        exit.success(),
        "rollgate exited with {exit:?} after SIGTERM"
    );
}
