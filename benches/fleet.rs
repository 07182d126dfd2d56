//! Fleet benchmarks (SPEC section 10; not criterion: they print markdown tables).
//!
//! Everything is real: a `redis-server` started here (a free loopback port, no persistence,
//! killed on exit), N rollgate replicas started in this process with
//! [`rollgate::app::start`] (each with its own temp `state_dir` and loopback listeners,
//! `fleet: {store, name, replica}` in its config, [`rollgate::mock`] upstreams), and the
//! default evaluator `interval` (100 ms: a pooling replica heartbeats every 100 ms, a
//! non-pooling one every second). The replicas of a fleet share two upstreams (one mock
//! per version), as a gateway's replicas front the same model Services: the same
//! endpoints, the same version fingerprints.
//!
//! - **lag**: apply lag. A rollback or a resume of the canary (alternating) is issued on one
//!   replica (rotating) through `running.controller.apply`; a polling thread reads every
//!   other replica's `store.load().generation` every 100 µs and records when it changes.
//!   Idle, and under a paced load (a fixed total rate, spread round-robin over the
//!   replicas' data ports; open loop: a request is sent when due, whatever the others do).
//! - **ops**: store operations per second per replica with the fleet idle (no traffic, no
//!   commands), from `INFO commandstats` / `INFO stats` / `INFO cpu` before and after the
//!   idle period, divided by N and by the seconds; `pool: true` and `pool: false`.
//! - **scale**: the cost of one heartbeat at 100 and 1,000 replicas without starting them:
//!   10 real pooling replicas, plus fake replicas written into the fleet's `seen` hash
//!   (timestamps refreshed every second, in the store's clock, so the real ones count
//!   them live) and `counts` hash (a copy of a real replica's published counts). The real
//!   replicas' heartbeats then read and parse what a fleet of that size would hand them.
//!
//! All replicas share this process's tokio runtime and the machine's cores with Redis and
//! the load generator: on a 2-core machine the figures include that contention.
//!
//! `cargo bench --bench fleet` runs the full sizes (about 2.5 minutes on 2 cores, plus the
//! build); without `--bench` (`cargo test --benches`) a smoke version with tiny sizes.
//! Knobs: `ROLLGATE_BENCH_ONLY=lag,ops,scale` (any subset), `ROLLGATE_BENCH_COMMANDS`
//! (commands per lag row, default 200), `ROLLGATE_BENCH_REPLICAS` (default `3,10`),
//! `ROLLGATE_BENCH_RATE` (total req/s of the load, default 2000),
//! `ROLLGATE_BENCH_IDLE_SECS` (ops and scale periods, default 10),
//! `ROLLGATE_BENCH_FAKES` (scale rows' fake replicas, default `90,990`),
//! `ROLLGATE_BENCH_LOG` (a tracing filter: the replicas' logs on stderr).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command as Process, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rollgate::app::{self, Listeners, Running};
use rollgate::config::Config;
use rollgate::decision::{Action, Command};
use rollgate::evaluator::rules::Trigger;
use rollgate::mock::{self, MockModel, MockOptions};
use rollgate::routing::store::Store;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------
// Sizes

#[derive(Debug, Clone)]
struct Sizes {
    full: bool,
    commands: usize,
    replicas: Vec<usize>,
    rate: f64,
    idle: Duration,
    fakes: Vec<usize>,
    /// Real replicas of the scale rows.
    scale_real: usize,
}

fn env_list(key: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(key)
        .ok()
        .map(|s| {
            s.split(',')
                .filter_map(|x| x.trim().parse().ok())
                .collect::<Vec<usize>>()
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_vec())
}

fn env_num<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}

impl Sizes {
    fn new(full: bool) -> Self {
        if full {
            Sizes {
                full,
                commands: env_num("ROLLGATE_BENCH_COMMANDS", 200),
                replicas: env_list("ROLLGATE_BENCH_REPLICAS", &[3, 10]),
                rate: env_num("ROLLGATE_BENCH_RATE", 2000.0),
                idle: Duration::from_secs_f64(env_num("ROLLGATE_BENCH_IDLE_SECS", 10.0)),
                fakes: env_list("ROLLGATE_BENCH_FAKES", &[90, 990]),
                scale_real: 10,
            }
        } else {
            Sizes {
                full,
                commands: 6,
                replicas: vec![3],
                rate: 200.0,
                idle: Duration::from_secs(1),
                fakes: vec![7],
                scale_real: 3,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// redis-server

/// A `redis-server` of our own on a free loopback port; killed when dropped (and by a
/// watcher process if this one dies without dropping it).
struct Redis {
    child: Child,
    watcher: Option<Child>,
    port: u16,
    _dir: tempfile::TempDir,
}

const REDIS_SERVER: &str = "/usr/bin/redis-server";

impl Redis {
    fn start() -> Redis {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
            l.local_addr().expect("local addr").port()
        };
        let dir = tempfile::tempdir().expect("temp dir for redis-server");
        let log = dir.path().join("redis.log");
        let out = std::fs::File::create(&log).expect("redis log file");
        let child = Process::new(REDIS_SERVER)
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--dir", &dir.path().display().to_string()])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {REDIS_SERVER} (is redis-server installed? apt-get install redis-server): {e}")
            });
        // If this process is killed (Ctrl-C, abort), take redis-server with it.
        let watcher = Process::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill {redis} 2>/dev/null",
                me = std::process::id(),
                redis = child.id()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
        let mut redis = Redis {
            child,
            watcher,
            port,
            _dir: dir,
        };
        let began = Instant::now();
        loop {
            if let Ok(Some(status)) = redis.child.try_wait() {
                panic!(
                    "redis-server exited at start-up ({status}) on port {port}:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if redis.ping() {
                break;
            }
            if began.elapsed() > Duration::from_secs(10) {
                panic!(
                    "redis-server on port {port} did not answer PING within 10 s:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
            return false;
        };
        redis::cmd("PING")
            .query::<String>(&mut c)
            .is_ok_and(|p| p == "PONG")
    }

    /// The bench's own connection: patient (a store busy with a large fleet's heartbeats
    /// is what the scale rows measure, not a failure of the bench).
    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(10)))
            .set_response_timeout(Some(Duration::from_secs(60)));
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .expect("connect to the bench's redis-server")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(w) = &mut self.watcher {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// What the store did so far: `INFO commandstats`, `INFO stats`, `INFO cpu`.
#[derive(Debug, Clone, Default)]
struct StoreStats {
    /// command -> (calls, usec)
    commands: BTreeMap<String, (u64, u64)>,
    net_in: u64,
    net_out: u64,
    cpu_s: f64,
}

async fn store_stats(conn: &mut redis::aio::MultiplexedConnection) -> StoreStats {
    let mut s = StoreStats::default();
    for section in ["commandstats", "stats", "cpu"] {
        let text: String = redis::cmd("INFO")
            .arg(section)
            .query_async(conn)
            .await
            .expect("INFO");
        for line in text.lines() {
            let Some((k, v)) = line.trim().split_once(':') else {
                continue;
            };
            if let Some(name) = k.strip_prefix("cmdstat_") {
                let field = |f: &str| {
                    v.split(',')
                        .find_map(|kv| kv.strip_prefix(f))
                        .and_then(|x| x.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                s.commands
                    .insert(name.to_string(), (field("calls="), field("usec=")));
            }
            match k {
                "total_net_input_bytes" => s.net_in = v.parse().unwrap_or(0),
                "total_net_output_bytes" => s.net_out = v.parse().unwrap_or(0),
                "used_cpu_user" | "used_cpu_sys" => s.cpu_s += v.parse::<f64>().unwrap_or(0.0),
                _ => {}
            }
        }
    }
    s
}

/// Commands a replica sends to the store itself; every other command in the stats ran
/// inside one of its Lua scripts (heartbeat, publish, snapshot, reseed).
const TOP_LEVEL: &[&str] = &[
    "evalsha",
    "eval",
    "script|load",
    "xrange",
    "subscribe",
    "hello",
    "client|setinfo",
    "select",
    "ping",
];
/// The bench's own commands, left out.
const OURS: &[&str] = &["info"];

#[derive(Debug, Clone, Default)]
struct StoreDelta {
    secs: f64,
    commands: BTreeMap<String, (u64, u64)>,
    net_in: u64,
    net_out: u64,
    cpu_s: f64,
}

impl StoreDelta {
    fn between(a: &StoreStats, b: &StoreStats, secs: f64) -> Self {
        let mut commands = BTreeMap::new();
        for (k, (calls, usec)) in &b.commands {
            if OURS.contains(&k.as_str()) {
                continue;
            }
            let (c0, u0) = a.commands.get(k).copied().unwrap_or((0, 0));
            if calls > &c0 {
                commands.insert(k.clone(), (calls - c0, usec.saturating_sub(u0)));
            }
        }
        StoreDelta {
            secs,
            commands,
            net_in: b.net_in.saturating_sub(a.net_in),
            net_out: b.net_out.saturating_sub(a.net_out),
            cpu_s: b.cpu_s - a.cpu_s,
        }
    }

    fn calls(&self, pred: impl Fn(&str) -> bool) -> u64 {
        self.commands
            .iter()
            .filter(|(k, _)| pred(k))
            .map(|(_, (c, _))| c)
            .sum()
    }

    fn top_level(&self) -> u64 {
        self.calls(|k| TOP_LEVEL.contains(&k))
    }

    fn all(&self) -> u64 {
        self.calls(|_| true)
    }

    fn evalsha(&self) -> (u64, u64) {
        self.commands.get("evalsha").copied().unwrap_or((0, 0))
    }
}

// ---------------------------------------------------------------------------------------
// Replicas

struct Replica {
    running: Running,
    mocks: Vec<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

async fn mock_upstream(name: &str) -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
    let addr = l.local_addr().expect("mock addr");
    let model = MockModel::new(MockOptions::named(name)).expect("mock model");
    let task = tokio::spawn(mock::serve(l, model, std::future::pending::<()>()));
    (addr, task)
}

/// Error rules only: a loaded 2-core machine makes latency noise, and nothing here should
/// trip on its own (every generation change must be one of the bench's commands).
fn replica_yaml(
    state_dir: &std::path::Path,
    stable: SocketAddr,
    canary: SocketAddr,
    store: &str,
    fleet: &str,
    replica: &str,
    pool: bool,
) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
state_dir: \"{state}\"
drain_timeout: 1s
versions:
  stable: {{endpoints: [\"http://{stable}\"]}}
  canary: {{endpoints: [\"http://{canary}\"]}}
routes:
  - {{name: chat, owner: bench, match: {{path_prefix: /}}, baseline: stable, split: {{stable: 90, canary: 10}}}}
evaluator:
  rules:
    error_rate_ratio: 2.0
    min_error_rate: 0.005
    error_rate_max: 0.05
    latency_p99_max: null
    latency_p99_ratio: null
    health_failures: null
    accuracy_drop: null
fleet: {{store: \"{store}\", name: {fleet}, replica: {replica}, pool: {pool}}}
",
        state = state_dir.display(),
    )
}

/// N replicas of one fleet in front of the same two upstreams (as a gateway's replicas
/// front the same model Services): the same endpoints make the same version fingerprints,
/// so a rollback made on one replica quarantines the same bundle on every other (a
/// replica with another bundle of the version keeps the quarantine without applying it).
async fn start_fleet(redis: &Redis, fleet: &str, n: usize, pool: bool) -> Vec<Replica> {
    let mut out = Vec::with_capacity(n);
    let (stable, t1) = mock_upstream("stable").await;
    let (canary, t2) = mock_upstream("canary").await;
    let mut mocks = vec![t1, t2];
    for i in 0..n {
        let dir = tempfile::tempdir().expect("replica temp dir");
        let yaml = replica_yaml(
            &dir.path().join("state"),
            stable,
            canary,
            &redis.url(),
            fleet,
            &format!("r{i}"),
            pool,
        );
        let path: PathBuf = dir.path().join("rollgate.yaml");
        let config = Config::from_str(&yaml, &path)
            .unwrap_or_else(|e| panic!("bench config rejected: {e}\n{yaml}"));
        let listeners = Listeners {
            data: TcpListener::bind("127.0.0.1:0").await.expect("bind data"),
            admin: TcpListener::bind("127.0.0.1:0").await.expect("bind admin"),
            health: None,
        };
        let running = app::start(config, listeners)
            .await
            .unwrap_or_else(|e| panic!("replica r{i} did not start: {e}"));
        assert!(
            running.controller.fleet().is_some(),
            "replica r{i} started without its fleet"
        );
        out.push(Replica {
            running,
            mocks: std::mem::take(&mut mocks),
            _dir: dir,
        });
    }
    // Every replica's heartbeat has seen every other (and, pooling, one holds the lease).
    let began = Instant::now();
    loop {
        let mut all = true;
        for r in &out {
            let st = r.running.controller.fleet().expect("fleet").status();
            let seen = st["replicas"].as_array().map_or(0, Vec::len);
            all &= st["store_up"] == true && seen >= n;
        }
        if all {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(15),
            "fleet {fleet}: the replicas did not all see each other within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    out
}

async fn stop_fleet(replicas: Vec<Replica>) {
    let tasks: Vec<_> = replicas
        .into_iter()
        .map(|r| {
            tokio::spawn(async move {
                r.running.shutdown().await;
                for m in r.mocks {
                    m.abort();
                }
                drop(r._dir);
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

// ---------------------------------------------------------------------------------------
// Load

struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    skipped: Arc<AtomicU64>,
    inflight: Arc<AtomicU64>,
    began: Instant,
    pacer: JoinHandle<()>,
}

/// Requests in flight beyond which a due request is skipped (counted) rather than queued.
const MAX_INFLIGHT: u64 = 512;

fn start_load(addrs: Vec<SocketAddr>, rate: f64) -> Load {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let skipped = Arc::new(AtomicU64::new(0));
    let inflight = Arc::new(AtomicU64::new(0));
    let uris: Vec<http::Uri> = addrs
        .iter()
        .map(|a| {
            format!("http://{a}/v1/chat/completions")
                .parse()
                .expect("uri")
        })
        .collect();
    let body = Bytes::from_static(
        br#"{"model":"bench","messages":[{"role":"user","content":"where is my order?"}]}"#,
    );
    let began = Instant::now();
    let pacer = {
        let (stop, sent, ok, failed, skipped, inflight) = (
            stop.clone(),
            sent.clone(),
            ok.clone(),
            failed.clone(),
            skipped.clone(),
            inflight.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let due = (began.elapsed().as_secs_f64() * rate) as u64;
                while n < due {
                    n += 1;
                    if inflight.load(Ordering::Relaxed) >= MAX_INFLIGHT {
                        skipped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    inflight.fetch_add(1, Ordering::Relaxed);
                    let req = http::Request::post(uris[(n as usize) % uris.len()].clone())
                        .header("content-type", "application/json")
                        .body(Full::new(body.clone()))
                        .expect("request");
                    let (client, ok, failed, inflight) =
                        (client.clone(), ok.clone(), failed.clone(), inflight.clone());
                    tokio::spawn(async move {
                        let good = match client.request(req).await {
                            Ok(resp) => {
                                resp.status().is_success()
                                    && resp.into_body().collect().await.is_ok()
                            }
                            Err(_) => false,
                        };
                        if good {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        inflight.fetch_sub(1, Ordering::Relaxed);
                    });
                }
            }
        })
    };
    Load {
        stop,
        sent,
        ok,
        failed,
        skipped,
        inflight,
        began,
        pacer,
    }
}

#[derive(Debug, Clone, Copy)]
struct LoadResult {
    rate: f64,
    ok: u64,
    failed: u64,
    skipped: u64,
}

impl Load {
    async fn stop(self) -> LoadResult {
        self.stop.store(true, Ordering::Relaxed);
        let secs = self.began.elapsed().as_secs_f64();
        let _ = self.pacer.await;
        let began = Instant::now();
        while self.inflight.load(Ordering::Relaxed) > 0 && began.elapsed() < Duration::from_secs(5)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        LoadResult {
            rate: self.sent.load(Ordering::Relaxed) as f64 / secs,
            ok: self.ok.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Apply lag

/// How long a replica may take to apply a command before it counts as missed.
const LAG_BOUND: Duration = Duration::from_secs(5);

/// Polls every replica but `origin` every 100 µs (on its own OS thread, off the runtime)
/// until each has a generation other than `before`; returns the times since `t0`.
fn poll_generations(
    stores: Vec<Arc<Store>>,
    before: Vec<u64>,
    origin: usize,
    t0: Instant,
    cancel: Arc<AtomicBool>,
) -> Vec<Option<Duration>> {
    let mut seen: Vec<Option<Duration>> = vec![None; stores.len()];
    loop {
        let mut pending = false;
        for (i, s) in stores.iter().enumerate() {
            if i == origin || seen[i].is_some() {
                continue;
            }
            if s.load().generation != before[i] {
                seen[i] = Some(t0.elapsed());
            } else {
                pending = true;
            }
        }
        if !pending || cancel.load(Ordering::Relaxed) || t0.elapsed() > LAG_BOUND {
            return seen;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

struct LagRow {
    n: usize,
    load: Option<LoadResult>,
    commands: usize,
    refused: usize,
    /// Per (command, other replica): ms, None = missed.
    lags: Vec<Option<f64>>,
    /// Per command: the slowest other replica (ms), None = one missed.
    converged: Vec<Option<f64>>,
    /// Per command: the origin's `apply` call (ms).
    calls: Vec<f64>,
    /// What the store did during the commands (heartbeats included).
    store: StoreDelta,
}

fn canary_command(rollback: bool) -> Command {
    let action = if rollback {
        Action::Rollback {
            route: Some("chat".into()),
            version: "canary".into(),
            trigger: Trigger::Manual,
            evidence: serde_json::Value::Null,
            expect: None,
        }
    } else {
        Action::Resume {
            version: "canary".into(),
        }
    };
    Command::new(action, Some("bench".into()), None)
}

async fn lag_row(redis: &Redis, z: &Sizes, n: usize, loaded: bool, row: usize) -> LagRow {
    let fleet = format!("lag-{row}-n{n}-{}", if loaded { "load" } else { "idle" });
    let replicas = start_fleet(redis, &fleet, n, true).await;
    let load = loaded.then(|| {
        start_load(
            replicas.iter().map(|r| r.running.data_addr).collect(),
            z.rate,
        )
    });
    if load.is_some() {
        // Let the load reach its pace (connections open, pools warm).
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let stores: Vec<Arc<Store>> = replicas.iter().map(|r| r.running.store.clone()).collect();
    let mut out = LagRow {
        n,
        load: None,
        commands: z.commands,
        refused: 0,
        lags: Vec::new(),
        converged: Vec::new(),
        calls: Vec::new(),
        store: StoreDelta::default(),
    };
    let mut conn = redis.conn().await;
    let stats0 = store_stats(&mut conn).await;
    let began = Instant::now();
    for k in 0..z.commands {
        let origin = k % n;
        let before: Vec<u64> = stores.iter().map(|s| s.load().generation).collect();
        let cancel = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let poller = {
            let (stores, before, cancel) = (stores.clone(), before.clone(), cancel.clone());
            std::thread::spawn(move || poll_generations(stores, before, origin, t0, cancel))
        };
        let result = replicas[origin]
            .running
            .controller
            .apply(canary_command(k % 2 == 0))
            .await;
        out.calls.push(t0.elapsed().as_secs_f64() * 1e3);
        if let Err(e) = &result {
            eprintln!("fleet {fleet}: command {k} on r{origin} refused: {e}");
            out.refused += 1;
            cancel.store(true, Ordering::Relaxed);
        }
        let seen = poller.join().expect("poller thread");
        if result.is_ok() {
            let ms: Vec<Option<f64>> = seen
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != origin)
                .map(|(_, d)| d.map(|d| d.as_secs_f64() * 1e3))
                .collect();
            out.converged
                .push(ms.iter().try_fold(0.0f64, |m, x| x.map(|x| m.max(x))));
            out.lags.extend(ms);
        }
        // A gap, varied so commands land at every phase of the heartbeat.
        tokio::time::sleep(Duration::from_millis(10 + fastrand::u64(0..20))).await;
    }
    out.store = StoreDelta::between(
        &stats0,
        &store_stats(&mut conn).await,
        began.elapsed().as_secs_f64(),
    );
    if let Some(l) = load {
        out.load = Some(l.stop().await);
    }
    // Every replica ends in the same state as the origin of the last command.
    let states: Vec<_> = replicas
        .iter()
        .map(|r| r.running.store.runtime_state().quarantined.len())
        .collect();
    assert!(
        states.windows(2).all(|w| w[0] == w[1]),
        "fleet {fleet}: replicas disagree at the end: quarantined per replica {states:?}"
    );
    stop_fleet(replicas).await;
    out
}

/// Nearest rank; None = some sample at or beyond this rank was missed.
fn pct(sorted: &[Option<f64>], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn sort_missing_last(v: &[Option<f64>]) -> Vec<Option<f64>> {
    let mut v = v.to_vec();
    v.sort_by(|a, b| match (a, b) {
        (Some(a), Some(b)) => a.total_cmp(b),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
    v
}

fn print_lag(rows: &[LagRow], z: &Sizes) {
    println!("\n## Apply lag: command on one replica -> every other replica's table swapped\n");
    println!("A rollback or resume of the canary (alternating), issued through `controller.apply` on replica `k mod N`; for every other replica, the time from the call to its `store.load().generation` changing (polled every 100 µs). `pool: true`, `interval` 100 ms. Load: open-loop {:.0} req/s in total, round-robin over the replicas' data ports (POST /v1/chat/completions, mock upstreams). Missed: not applied within {} s.\n", z.rate, LAG_BOUND.as_secs());
    println!("| replicas | traffic | commands (refused) | samples | p50 ms | p99 ms | max ms | > 250 ms | missed | slowest replica per command: p50 / p99 ms | origin's `apply` call: p50 / p99 ms |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let f = |x: Option<f64>| x.map_or("missed".to_string(), |x| format!("{x:.1}"));
    for r in rows {
        let lags = sort_missing_last(&r.lags);
        let conv = sort_missing_last(&r.converged);
        let calls = sort_missing_last(&r.calls.iter().map(|x| Some(*x)).collect::<Vec<_>>());
        let traffic = match r.load {
            None => "idle".to_string(),
            Some(l) => format!(
                "{:.0} req/s ({} ok, {} failed, {} skipped)",
                l.rate, l.ok, l.failed, l.skipped
            ),
        };
        println!(
            "| {} | {traffic} | {} ({}) | {} | {} | {} | {} | {} | {} | {} / {} | {} / {} |",
            r.n,
            r.commands,
            r.refused,
            lags.len(),
            f(pct(&lags, 0.5)),
            f(pct(&lags, 0.99)),
            f(lags.last().copied().flatten()),
            r.lags
                .iter()
                .filter(|x| x.is_none_or(|x| x > 250.0))
                .count(),
            r.lags.iter().filter(|x| x.is_none()).count(),
            f(pct(&conv, 0.5)),
            f(pct(&conv, 0.99)),
            f(pct(&calls, 0.5)),
            f(pct(&calls, 0.99)),
        );
    }
    println!("\nStore work per command during these rows: heartbeats are the calls of TIME (only the heartbeat script calls it); the other EVALSHA calls are the publish script (claim, INCR, XADD, PUBLISH) and the origin's snapshot write; every replica reads the new entry with XRANGE after the PUBLISH wakes it (heartbeats also catch up when they see a newer seq).\n");
    println!("| replicas | traffic | seconds | heartbeats | EVALSHA other than heartbeats, per command | XRANGE per command | XADD per command | PUBLISH per command | bytes out per second per replica |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let d = &r.store;
        let c = r.commands.max(1) as f64;
        let get = |k: &str| d.commands.get(k).map_or(0, |x| x.0);
        println!(
            "| {} | {} | {:.1} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} |",
            r.n,
            if r.load.is_some() { "loaded" } else { "idle" },
            d.secs,
            get("time"),
            get("evalsha").saturating_sub(get("time")) as f64 / c,
            get("xrange") as f64 / c,
            get("xadd") as f64 / c,
            get("publish") as f64 / c,
            d.net_out as f64 / d.secs.max(1e-9) / r.n as f64,
        );
    }
}

// ---------------------------------------------------------------------------------------
// Idle store operations

/// CPU seconds (user + system) this process has used.
fn process_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name.
    (ticks(11) + ticks(12)) / clock_ticks()
}

fn clock_ticks() -> f64 {
    Process::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

#[derive(Clone)]
struct OpsRow {
    label: String,
    pool: bool,
    n: usize,
    delta: StoreDelta,
    /// This process's CPU over the period (all replicas, their mocks, the runtime).
    process_cpu_s: f64,
    /// Live replicas each real replica saw at the end (the fewest).
    seen: usize,
    /// Replicas whose store was up at the end.
    up: usize,
}

async fn measure_idle(
    redis: &Redis,
    replicas: &[Replica],
    label: String,
    idle: Duration,
) -> OpsRow {
    let mut conn = redis.conn().await;
    let a = store_stats(&mut conn).await;
    let cpu0 = process_cpu_s();
    let t0 = Instant::now();
    tokio::time::sleep(idle).await;
    let b = store_stats(&mut conn).await;
    let cpu1 = process_cpu_s();
    let secs = t0.elapsed().as_secs_f64();
    let mut seen = usize::MAX;
    let mut up = 0;
    for r in replicas {
        let st = r.running.controller.fleet().expect("fleet").status();
        seen = seen.min(st["replicas"].as_array().map_or(0, Vec::len));
        up += usize::from(st["store_up"] == true);
    }
    OpsRow {
        label,
        pool: replicas
            .first()
            .and_then(|r| r.running.controller.fleet())
            .is_some_and(|f| f.config.pool),
        n: replicas.len(),
        delta: StoreDelta::between(&a, &b, secs),
        process_cpu_s: cpu1 - cpu0,
        seen,
        up,
    }
}

async fn ops_row(redis: &Redis, z: &Sizes, n: usize, pool: bool, row: usize) -> OpsRow {
    let fleet = format!("ops-{row}-n{n}-{}", if pool { "pool" } else { "nopool" });
    let replicas = start_fleet(redis, &fleet, n, pool).await;
    let out = measure_idle(redis, &replicas, format!("pool: {pool}"), z.idle).await;
    stop_fleet(replicas).await;
    out
}

fn print_ops(rows: &[OpsRow], z: &Sizes) {
    println!(
        "\n## Store operations per replica, idle ({:.0} s per row)\n",
        z.idle.as_secs_f64()
    );
    println!("From `INFO commandstats` / `stats` / `cpu` before and after the idle period (the bench's own INFO calls left out), divided by the seconds and by N. Requests: what a replica sends (EVALSHA of the heartbeat script, XRANGE, ...); commands: every command Redis executed, the ones inside the Lua scripts included. Redis CPU: `used_cpu_user + used_cpu_sys`. Replica CPU: this process's CPU over the period / N (the replicas' whole idle cost: evaluator ticks, heartbeats, health, runtime).\n");
    println!("| replicas | pool | requests/s per replica | commands/s per replica | heartbeat µs in Redis (per call) | bytes/s in + out per replica | Redis CPU per replica | replica CPU per replica | commands per replica per second, by name |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        let d = &r.delta;
        let per = |x: f64| x / d.secs / r.n as f64;
        let (hb, hb_us) = d.evalsha();
        let by_name: Vec<String> = d
            .commands
            .iter()
            .map(|(k, (c, _))| format!("{k} {:.1}", per(*c as f64)))
            .collect();
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.0} | {:.0} + {:.0} | {:.2} % | {:.2} % | {} |",
            r.n,
            r.label,
            per(d.top_level() as f64),
            per(d.all() as f64),
            hb_us as f64 / hb.max(1) as f64,
            per(d.net_in as f64),
            per(d.net_out as f64),
            100.0 * per(d.cpu_s),
            100.0 * per(r.process_cpu_s),
            by_name.join(", ")
        );
    }
}

// ---------------------------------------------------------------------------------------
// Scale: fake replicas in the store

/// Sets every fake replica's `seen` timestamp to the store's now.
const REFRESH_FAKES: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, tonumber(ARGV[1]) do redis.call('HSET', KEYS[1], 'fake-' .. i, now) end
return 1
"#;

/// `n` real replicas (`pool` as given) and `fakes` fake ones in the store. Returns the
/// row and the size of one real replica's published counts (pooling).
async fn scale_row(
    redis: &Redis,
    z: &Sizes,
    fakes: usize,
    pool: bool,
    row: usize,
) -> (OpsRow, Option<usize>) {
    let n = z.scale_real;
    let fleet = format!(
        "scale-{row}-f{fakes}-{}",
        if pool { "pool" } else { "nopool" }
    );
    let replicas = start_fleet(redis, &fleet, n, pool).await;
    let mut conn = redis.conn().await;
    // The key layout of src/fleet.rs (module docs): `rollgate:{<name>}:seen` and `counts`.
    let seen_key = format!("rollgate:{{{fleet}}}:seen");
    let counts_key = format!("rollgate:{{{fleet}}}:counts");
    let published: Option<String> = redis::cmd("HGET")
        .arg(&counts_key)
        .arg("r0")
        .query_async(&mut conn)
        .await
        .expect("HGET counts");
    if pool && published.is_none() {
        panic!("no published counts of r0 under {counts_key}: did the fleet's key layout change?");
    }
    if let Some(published) = published.as_ref().filter(|_| fakes > 0) {
        let mut hset = redis::cmd("HSET");
        hset.arg(&counts_key);
        for i in 1..=fakes {
            hset.arg(format!("fake-{i}")).arg(published);
        }
        let _: u64 = hset.query_async(&mut conn).await.expect("HSET fake counts");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let refresher = {
        let (stop, mut conn, key) = (stop.clone(), conn.clone(), seen_key.clone());
        tokio::spawn(async move {
            while fakes > 0 && !stop.load(Ordering::Relaxed) {
                // EVAL, not EVALSHA: `cmdstat_evalsha` stays the replicas' heartbeats.
                let _: redis::RedisResult<u64> = redis::cmd("EVAL")
                    .arg(REFRESH_FAKES)
                    .arg(1)
                    .arg(&key)
                    .arg(fakes)
                    .query_async(&mut conn)
                    .await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    if fakes > 0 {
        // A few heartbeats' worth for everyone to see them.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let label = if fakes == 0 {
        format!("{n} real")
    } else {
        format!("{n} real + {fakes} fake = {}", n + fakes)
    };
    let mut out = measure_idle(redis, &replicas, label, z.idle).await;
    out.label = format!("pool: {pool}, {}", out.label);
    stop.store(true, Ordering::Relaxed);
    let _ = refresher.await;
    let len: u64 = redis::cmd("HLEN")
        .arg(&seen_key)
        .query_async(&mut conn)
        .await
        .expect("HLEN");
    assert!(
        len as usize >= n + fakes,
        "the fake replicas are not in {seen_key} ({len} entries): did the fleet's key layout change?"
    );
    let _: redis::RedisResult<u64> = redis::cmd("DEL")
        .arg(&seen_key)
        .arg(&counts_key)
        .query_async(&mut conn)
        .await;
    stop_fleet(replicas).await;
    (out, published.map(|p| p.len()))
}

fn print_scale(rows: &[OpsRow], published_bytes: Option<usize>) {
    println!(
        "\n## One heartbeat at fleet scale (real replicas + fake entries in `seen` and `counts`)\n"
    );
    println!("The real replicas heartbeat as always (every 100 ms pooling, every second not); each heartbeat's script walks every replica's `seen` entry and, pooling, reads every live replica's `counts`, and each replica parses what comes back. Per heartbeat: Redis time of the script (`cmdstat_evalsha` usec per call), and bytes Redis sent (all output / heartbeats). Redis CPU and replica CPU are per *real* replica (the refresher of the fakes' timestamps, one EVAL a second, is included in Redis CPU but not in the heartbeat columns).{}\n",
        published_bytes.map_or(String::new(), |b| format!(" One replica's published counts (one comparison): {b} bytes of JSON.")));
    println!("| fleet | live replicas each real one saw (fewest) | store up at the end | heartbeats/s per real replica | Redis µs per heartbeat | bytes out per heartbeat | Redis CPU per real replica | replica CPU per real replica |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let d = &r.delta;
        let (hb, hb_us) = d.evalsha();
        let per = |x: f64| x / d.secs / r.n as f64;
        println!(
            "| {} | {} | {}/{} | {:.1} | {:.0} | {:.0} | {:.2} % | {:.2} % |",
            r.label,
            r.seen,
            r.up,
            r.n,
            per(hb as f64),
            hb_us as f64 / hb.max(1) as f64,
            d.net_out as f64 / hb.max(1) as f64,
            100.0 * per(d.cpu_s),
            100.0 * per(r.process_cpu_s),
        );
    }
}

// ---------------------------------------------------------------------------------------

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let z = Sizes::new(full);
    let only = std::env::var("ROLLGATE_BENCH_ONLY").unwrap_or_default();
    let run = |section: &str| only.is_empty() || only.split(',').any(|s| s.trim() == section);
    let began = Instant::now();
    println!(
        "# Fleet bench ({} run; {} threads; redis-server {})",
        if z.full { "full" } else { "smoke" },
        std::thread::available_parallelism().map_or(1, |t| t.get()),
        Process::new(REDIS_SERVER)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s
                .split_whitespace()
                .find_map(|w| w.strip_prefix("v=").map(str::to_string)))
            .unwrap_or_else(|| "?".into())
    );
    if let Ok(filter) = std::env::var("ROLLGATE_BENCH_LOG") {
        // Diagnosis: the replicas' logs on stderr, e.g. ROLLGATE_BENCH_LOG=rollgate::fleet=debug
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
    let redis = Redis::start();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let mut row = 0;
        if run("lag") {
            let mut rows = Vec::new();
            for &n in &z.replicas {
                for loaded in [false, true] {
                    row += 1;
                    rows.push(lag_row(&redis, &z, n, loaded, row).await);
                }
            }
            print_lag(&rows, &z);
        }
        let mut ops = Vec::new();
        if run("ops") {
            let mut rows = Vec::new();
            for &n in &z.replicas {
                for pool in [true, false] {
                    row += 1;
                    rows.push(ops_row(&redis, &z, n, pool, row).await);
                }
            }
            print_ops(&rows, &z);
            ops = rows;
        }
        if run("scale") {
            let mut rows = Vec::new();
            let mut published = None;
            for pool in [true, false] {
                // The real replicas alone: the ops row of that size when there is one.
                let measured = ops.iter().find(|r| r.n == z.scale_real && r.pool == pool);
                let first = if measured.is_some() { 1 } else { 0 };
                if let Some(r) = measured {
                    let mut r = r.clone();
                    r.label = format!("pool: {pool}, {} real (the ops row)", r.n);
                    rows.push(r);
                }
                for f in [0].into_iter().chain(z.fakes.iter().copied()).skip(first) {
                    row += 1;
                    let (r, p) = scale_row(&redis, &z, f, pool, row).await;
                    published = published.or(p);
                    rows.push(r);
                }
            }
            print_scale(&rows, published);
        }
    });
    drop(runtime);
    drop(redis);
    println!("\nTotal: {:.0} s.", began.elapsed().as_secs_f64());
}
