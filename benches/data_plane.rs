//! What the proxy adds over talking to the upstream directly, and what the data plane's
//! optional features cost (SPEC section 4, shadow; section 7, access log) against the same
//! proxy without them. Not criterion: it prints markdown tables.
//!
//! Everything is a real process on 127.0.0.1 (ports found by binding port 0):
//!
//! - the proxy: this build's `rollgate run -c <yaml>` (`CARGO_BIN_EXE_rollgate`), a fresh
//!   process and `state_dir` per row, pinned to core 0 with `taskset` when there is one;
//! - two upstreams, `rollgate mock-model --latency 0ms` as versions `a` and `b`, pinned to
//!   core 1 and kept for the whole run;
//! - the load generator: this process (moved to core 1 with `taskset -a -p`), a
//!   current-thread tokio runtime driving (by default) 16 HTTP/1.1 keep-alive connections
//!   (`hyper::client::conn::http1`) that take requests from one shared queue, fed by a
//!   pacing OS thread on a fixed open-loop schedule (request `i` is due at
//!   `start + i / rate`, whatever the proxy does). Each request is a POST of a 1 KiB OpenAI
//!   chat-completions body; its latency runs from its *scheduled* send time to the end of
//!   the response body, so a stalled proxy's queueing counts (no coordinated omission).
//!
//! Rows: `direct` (the same load sent straight to upstream `a`, no proxy: the baseline of
//! what the proxy adds), `plain` (route `{a: 100}`), `shadow 100 %` (the same route with
//! `shadow: {version: b, percent: 100}`: every request is also copied to `b`), `access log`
//! (top-level `access_log: {path: <temp file>, sample: 1.0}`), and both. Evaluator and
//! everything else at their defaults. Each row: readiness by polling the admin `/readyz`,
//! a warm-up, then a measured window: client latency p50/p99/p99.9 (hdrhistogram, µs),
//! errors (non-2xx, failed or timed-out requests), and the proxy's CPU per request: the
//! change of utime+stime in `/proc/<pid>/stat` over the window (from the first measured
//! request's due time to the last response) divided by the measured requests (none for
//! `direct`); the two upstreams' likewise, for what the shadow adds to core 1. At the end
//! of a row the proxy's `/metrics` says how many copies reached `b` and how many shadow
//! copies or log lines it dropped, and the log file's lines are counted: a row whose
//! feature did not run shows it. Rows are interleaved over the rounds (direct, plain,
//! shadow, log, both, direct, ...), after one unreported plain row that warms everything
//! up, so that drifting background load spreads over all of them; the summary is the
//! median per row. When `direct` is measured, every other row also gets the latency it
//! adds: its p50 and p99 minus the same round's `direct` row's, the median over the
//! rounds. Each feature row is also compared with the same round's plain row. Each rate
//! is its own table, measured after the previous rate's.
//!
//! `cargo bench --bench data_plane` runs the full version (3 rounds of the 4 feature rows,
//! 1 s warm-up and 10 s measured each at 1,000 req/s: about 2.5 minutes after the build;
//! more rounds of fewer seconds, e.g. `ROLLGATE_BENCH_ROUNDS=9 ROLLGATE_BENCH_SECS=3`,
//! give more paired comparisons in the same time). Knobs of the full run:
//! `ROLLGATE_BENCH_RATE` (req/s, default 1000; a comma list such as `1000,3000` measures
//! one table per rate), `ROLLGATE_BENCH_CONNS` (client connections, default 16),
//! `ROLLGATE_BENCH_SECS` (measured seconds per row, default 10), `ROLLGATE_BENCH_ROUNDS`
//! (default 3). `ROLLGATE_BENCH_ROWS` chooses the rows, of both versions: a comma list of
//! `direct`, `plain`, `shadow`, `log`, `both` (measured in that order whatever the list's;
//! default `plain,shadow,log,both`). agentgateway's published protocol, "added p99 over
//! direct at fixed 1,000 and 3,000 QPS, 32 connections, 1 KiB OpenAI bodies", is
//! `ROLLGATE_BENCH_ROWS=direct,plain ROLLGATE_BENCH_CONNS=32 ROLLGATE_BENCH_RATE=1000,3000
//! cargo bench --bench data_plane`.
//!
//! Without `--bench` (`cargo test --benches`) a smoke version: 1 round, 1 s at 200 req/s,
//! which fails only if requests fail or a feature did nothing. Its default rows are the
//! feature rows: `direct` would add 1.2 s and checks no feature
//! (`ROLLGATE_BENCH_ROWS=direct,plain cargo test --bench data_plane` smokes it).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};

const ROLLGATE: &str = env!("CARGO_BIN_EXE_rollgate");
/// Client connections, unless `ROLLGATE_BENCH_CONNS` says otherwise.
const CONNECTIONS: usize = 16;
/// Size of each request body.
const BODY_BYTES: usize = 1024;
/// A request not answered within this counts as an error (and its connection is replaced).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a child process may take to answer its readiness probe.
const READY_BOUND: Duration = Duration::from_secs(20);
/// How long the access log's writer may take to catch up after the load ends.
const LOG_SETTLE_BOUND: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// Rows and knobs

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Row {
    Direct,
    Plain,
    Shadow,
    Log,
    Both,
}

impl Row {
    /// Every row, in the order a round measures them.
    const ALL: [Row; 5] = [Row::Direct, Row::Plain, Row::Shadow, Row::Log, Row::Both];
    /// The default rows: the features against the proxy without them.
    const FEATURES: [Row; 4] = [Row::Plain, Row::Shadow, Row::Log, Row::Both];

    /// Its name in `ROLLGATE_BENCH_ROWS`.
    fn name(self) -> &'static str {
        match self {
            Row::Direct => "direct",
            Row::Plain => "plain",
            Row::Shadow => "shadow",
            Row::Log => "log",
            Row::Both => "both",
        }
    }
    fn named(name: &str) -> Option<Row> {
        Row::ALL.into_iter().find(|r| r.name() == name)
    }
    fn label(self) -> &'static str {
        match self {
            Row::Direct => "direct (no proxy)",
            Row::Plain => "plain",
            Row::Shadow => "shadow 100 %",
            Row::Log => "access log",
            Row::Both => "shadow 100 % + access log",
        }
    }
    fn shadow(self) -> bool {
        matches!(self, Row::Shadow | Row::Both)
    }
    fn log(self) -> bool {
        matches!(self, Row::Log | Row::Both)
    }
}

#[derive(Debug, Clone)]
struct Knobs {
    /// In [`Row::ALL`]'s order, each once.
    rows: Vec<Row>,
    rates: Vec<f64>,
    conns: usize,
    warmup: Duration,
    measure: Duration,
    rounds: usize,
}

fn env_num<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}

/// A comma list (`default` when unset or empty). An item `parse` rejects panics: a typo
/// must not quietly measure something else.
fn env_list<T: Clone>(key: &str, default: &[T], parse: impl Fn(&str) -> Option<T>) -> Vec<T> {
    let text = std::env::var(key).unwrap_or_default();
    let items: Vec<T> = text
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| parse(x).unwrap_or_else(|| panic!("{key}: cannot read {x:?} in {text:?}")))
        .collect();
    if items.is_empty() {
        default.to_vec()
    } else {
        items
    }
}

impl Knobs {
    fn new(full: bool) -> Knobs {
        let chosen = env_list("ROLLGATE_BENCH_ROWS", &Row::FEATURES, Row::named);
        let rows = Row::ALL
            .into_iter()
            .filter(|r| chosen.contains(r))
            .collect();
        if full {
            Knobs {
                rows,
                rates: env_list("ROLLGATE_BENCH_RATE", &[1000.0], |x| {
                    x.parse().ok().filter(|r: &f64| *r > 0.0)
                }),
                conns: env_num("ROLLGATE_BENCH_CONNS", CONNECTIONS).max(1),
                warmup: Duration::from_secs(1),
                measure: Duration::from_secs_f64(env_num("ROLLGATE_BENCH_SECS", 10.0)),
                rounds: env_num("ROLLGATE_BENCH_ROUNDS", 3usize).max(1),
            }
        } else {
            Knobs {
                rows,
                rates: vec![200.0],
                conns: CONNECTIONS,
                warmup: Duration::from_millis(200),
                measure: Duration::from_secs(1),
                rounds: 1,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Child processes

fn have_taskset() -> bool {
    Process::new("taskset")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Cores to pin to: the proxy on 0, everything else on 1; none on a 1-core machine or
/// without `taskset`.
#[derive(Debug, Clone, Copy)]
struct Pinning {
    on: bool,
}

impl Pinning {
    fn detect() -> Pinning {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Pinning {
            on: cores >= 2 && cpus() >= 2 && have_taskset(),
        }
    }

    /// `program args...`, under `taskset -c core` when pinning (taskset execs the program,
    /// so the child's pid is the program's).
    fn command(&self, core: u32, program: &str) -> Process {
        if self.on {
            let mut c = Process::new("taskset");
            c.args(["-c", &core.to_string(), program]);
            c
        } else {
            Process::new(program)
        }
    }

    /// Moves this process, every thread of it, to `core` (threads started later inherit it).
    fn pin_self(&self, core: u32) {
        if !self.on {
            return;
        }
        let ok = Process::new("taskset")
            .args(["-a", "-p", "-c", &core.to_string()])
            .arg(std::process::id().to_string())
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "taskset -a -p -c {core} on the bench process failed");
    }
}

/// A child process killed when dropped (a panic included), and by a watcher shell if this
/// process dies without dropping it.
struct Proc {
    name: String,
    child: Child,
    watcher: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Process, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).expect("child log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("child log file"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let watcher = Process::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill {child} 2>/dev/null",
                me = std::process::id(),
                child = child.id()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
        Proc {
            name: name.to_string(),
            child,
            watcher,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Bounded polling of `GET path` on `addr` until it answers 200.
    fn wait_ready(&mut self, addr: SocketAddr, path: &str) {
        let began = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited at start-up ({status}):\n{}",
                    self.name,
                    self.log_text()
                );
            }
            if http_get(addr, path).is_some_and(|(code, _)| code == 200) {
                return;
            }
            assert!(
                began.elapsed() < READY_BOUND,
                "{} did not answer 200 on {addr}{path} within {READY_BOUND:?}:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Panics (with its log) if the process has exited.
    fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}):\n{}", self.name, self.log_text());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(w) = &mut self.watcher {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// A blocking `GET` with `Connection: close`: (status, body). None on any failure.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = StdTcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((code, body))
}

/// utime + stime of `pid`, in µs.
fn cpu_us(pid: u32, ticks_per_s: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (in parentheses, and it may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name.
    (ticks(11) + ticks(12)) * 1e6 / ticks_per_s
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

// ---------------------------------------------------------------------------------------
// Upstreams and proxy

struct Upstream {
    addr: SocketAddr,
    proc: Proc,
}

fn start_upstream(pin: Pinning, dir: &Path, name: &str) -> Upstream {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut cmd = pin.command(1, ROLLGATE);
    cmd.args(["mock-model", "--listen", &addr.to_string()])
        .args(["--name", name, "--latency", "0ms"]);
    let mut proc = Proc::spawn(
        &format!("mock-model {name}"),
        cmd,
        dir.join(format!("mock-{name}.log")),
    );
    proc.wait_ready(addr, "/health");
    Upstream { addr, proc }
}

struct Proxy {
    data: SocketAddr,
    admin: SocketAddr,
    access_log: Option<PathBuf>,
    proc: Proc,
    _dir: tempfile::TempDir,
}

fn proxy_yaml(
    row: Row,
    dir: &Path,
    data: SocketAddr,
    admin: SocketAddr,
    a: SocketAddr,
    b: SocketAddr,
) -> String {
    let shadow = if row.shadow() {
        ", shadow: {version: b, percent: 100}"
    } else {
        ""
    };
    let access_log = if row.log() {
        format!(
            "access_log: {{path: \"{}\", sample: 1.0}}\n",
            dir.join("access.log").display()
        )
    } else {
        String::new()
    };
    format!(
        "listen: {data}
admin: {{listen: {admin}}}
state_dir: \"{state}\"
drain_timeout: 1s
{access_log}versions:
  a: {{endpoints: [\"http://{a}\"]}}
  b: {{endpoints: [\"http://{b}\"]}}
routes:
  - {{name: chat, owner: bench, match: {{path_prefix: /}}, baseline: a, split: {{a: 100}}{shadow}}}
",
        state = dir.join("state").display(),
    )
}

fn start_proxy(pin: Pinning, row: Row, a: SocketAddr, b: SocketAddr) -> Proxy {
    let dir = tempfile::tempdir().expect("proxy temp dir");
    let data: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let yaml = proxy_yaml(row, dir.path(), data, admin, a, b);
    let config = dir.path().join("rollgate.yaml");
    std::fs::write(&config, &yaml).expect("write proxy config");
    let mut cmd = pin.command(0, ROLLGATE);
    cmd.arg("run").arg("-c").arg(&config);
    let mut proc = Proc::spawn(
        &format!("rollgate run ({})", row.label()),
        cmd,
        dir.path().join("rollgate.log"),
    );
    proc.wait_ready(admin, "/readyz");
    Proxy {
        data,
        admin,
        access_log: row.log().then(|| dir.path().join("access.log")),
        proc,
        _dir: dir,
    }
}

/// The sum of a metric's samples whose label set contains every one of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (metric, rest) = key.split_once('{').unwrap_or((key, ""));
            (metric == name && labels.iter().all(|x| rest.contains(x))).then_some(value)
        })
        .filter_map(|v| v.parse::<f64>().ok())
        .sum()
}

fn count_lines(path: &Path) -> u64 {
    std::fs::read(path).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count() as u64)
}

/// The access log's lines, once its writer has caught up: polled until `want` lines are
/// there or the count stops moving, within [`LOG_SETTLE_BOUND`].
fn settled_lines(path: &Path, want: u64) -> u64 {
    let began = Instant::now();
    let mut last = count_lines(path);
    while last < want && began.elapsed() < LOG_SETTLE_BOUND {
        std::thread::sleep(Duration::from_millis(50));
        let now = count_lines(path);
        if now == last && began.elapsed() > Duration::from_millis(500) {
            break;
        }
        last = now;
    }
    last
}

// ---------------------------------------------------------------------------------------
// Load

/// One request of the schedule.
#[derive(Debug, Clone, Copy)]
struct Job {
    due: Instant,
    measured: bool,
}

#[derive(Debug, Default)]
struct WorkerResult {
    ok: u64,
    errors: u64,
    /// Of the measured requests.
    measured_errors: u64,
}

fn chat_body() -> Bytes {
    let head = r#"{"model":"bench","messages":[{"role":"system","content":"You are a support assistant."},{"role":"user","content":""#;
    let tail = r#""}],"temperature":0.2,"max_tokens":64}"#;
    let words = "where is my order and when will it arrive ";
    let mut s = String::from(head);
    while s.len() + tail.len() < BODY_BYTES {
        let room = BODY_BYTES - tail.len() - s.len();
        s.push_str(&words[..room.min(words.len())]);
    }
    s.push_str(tail);
    assert_eq!(s.len(), BODY_BYTES);
    serde_json::from_str::<serde_json::Value>(&s).expect("the bench body is JSON");
    Bytes::from(s)
}

type Sender = http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Option<Sender> {
    let stream = TcpStream::connect(addr).await.ok()?;
    stream.set_nodelay(true).ok()?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    Some(sender)
}

/// One connection: takes the next due request from the shared queue, sends it, records
/// its latency from the due time to the end of the response body.
async fn worker(
    addr: SocketAddr,
    queue: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>,
    body: Bytes,
    hist: Arc<std::sync::Mutex<Histogram<u64>>>,
) -> WorkerResult {
    let mut out = WorkerResult::default();
    let mut sender = connect(addr).await;
    loop {
        // Held only while this worker is the one waiting for the next job: the others
        // queue behind it, which is what a pool's idle connections do.
        let job = { queue.lock().await.recv().await };
        let Some(job) = job else {
            return out;
        };
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            sender = connect(addr).await;
        }
        let good = match sender.as_mut() {
            None => false,
            Some(s) => {
                let req = http::Request::post("/v1/chat/completions")
                    .header(http::header::HOST, addr.to_string())
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(body.clone()))
                    .expect("request");
                let exchange = async {
                    s.ready().await.ok()?;
                    let resp = s.send_request(req).await.ok()?;
                    let status = resp.status();
                    resp.into_body().collect().await.ok()?;
                    Some(status.is_success())
                };
                match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
                    Ok(Some(success)) => success,
                    Ok(None) => false,
                    Err(_) => {
                        sender = None;
                        false
                    }
                }
            }
        };
        if good {
            out.ok += 1;
        } else {
            out.errors += 1;
            out.measured_errors += u64::from(job.measured);
            // A failed exchange may leave the connection unusable: start afresh.
            sender = None;
        }
        if job.measured {
            let us = job.due.elapsed().as_micros().max(1) as u64;
            hist.lock().expect("histogram").saturating_record(us);
        }
    }
}

#[derive(Debug, Clone)]
struct Sample {
    /// Requests in the measured window (due after the warm-up).
    requests: u64,
    /// Requests of the whole row, warm-up included.
    sent: u64,
    errors: u64,
    /// Achieved rate of the measured window (requests / seconds of their due times).
    rate: f64,
    p50: u64,
    p99: u64,
    p999: u64,
    max: u64,
    /// The proxy's CPU per measured request; none without a proxy (`direct`).
    cpu_per_req_us: Option<f64>,
    /// The proxy's CPU over the window as a share of one core.
    cpu_share: Option<f64>,
    /// Both upstreams' CPU per measured request (they share core 1 with this process).
    upstream_cpu_per_req_us: f64,
    /// Requests the proxy recorded for version `b` (the shadow copies).
    copies: f64,
    shadow_dropped: f64,
    log_lines: Option<u64>,
    log_dropped: f64,
    b_quarantined: bool,
}

/// What every row shares: the knobs, the upstreams, and the client's runtime and body.
struct Bench {
    k: Knobs,
    pin: Pinning,
    ticks: f64,
    a: Upstream,
    b: Upstream,
    body: Bytes,
    runtime: tokio::runtime::Runtime,
}

impl Bench {
    /// One row at `rate`: its own fresh proxy (none for `direct`, whose load goes to `a`).
    fn row(&self, row: Row, rate: f64) -> Sample {
        if row == Row::Direct {
            return self.run_load(self.a.addr, None, rate);
        }
        let mut proxy = start_proxy(self.pin, row, self.a.addr, self.b.addr);
        self.run_load(proxy.data, Some(&mut proxy), rate)
    }

    /// The paced open-loop schedule against `addr` (`proxy`'s data port when there is
    /// one): warm-up, then the measured window.
    fn run_load(&self, addr: SocketAddr, mut proxy: Option<&mut Proxy>, rate: f64) -> Sample {
        let ticks = self.ticks;
        let pid = proxy.as_ref().map(|p| p.proc.pid());
        let proxy_cpu = move || pid.map(|p| cpu_us(p, ticks));
        let up_pids = [self.a.proc.pid(), self.b.proc.pid()];
        let up_cpu = move || up_pids.iter().map(|&p| cpu_us(p, ticks)).sum::<f64>();
        let hist = Arc::new(std::sync::Mutex::new(
            Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram"),
        ));
        let (tx, rx) = mpsc::unbounded_channel::<Job>();
        let queue = Arc::new(Mutex::new(rx));
        // The pacer: an OS thread, so its timing does not depend on the runtime's timer
        // (1 ms granularity) and a busy runtime cannot delay a due time, only its sending.
        let (warmup, measure) = (self.k.warmup, self.k.measure);
        let pacer = std::thread::spawn(move || {
            let start = Instant::now() + Duration::from_millis(20);
            let measure_from = start + warmup;
            let end = measure_from + measure;
            let mut cpu0 = None;
            let (mut sent, mut measured) = (0u64, 0u64);
            for i in 0u64.. {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                if due >= end {
                    break;
                }
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let in_window = due >= measure_from;
                if in_window && cpu0.is_none() {
                    cpu0 = Some((proxy_cpu(), up_cpu(), Instant::now()));
                }
                if tx
                    .send(Job {
                        due,
                        measured: in_window,
                    })
                    .is_err()
                {
                    break;
                }
                sent += 1;
                measured += u64::from(in_window);
            }
            let cpu0 = cpu0.unwrap_or((proxy_cpu(), up_cpu(), Instant::now()));
            (cpu0, sent, measured)
        });
        let results: Vec<WorkerResult> = self.runtime.block_on(async {
            let local = tokio::task::LocalSet::new();
            local
                .run_until(async {
                    let tasks: Vec<_> = (0..self.k.conns)
                        .map(|_| {
                            tokio::task::spawn_local(worker(
                                addr,
                                queue.clone(),
                                self.body.clone(),
                                hist.clone(),
                            ))
                        })
                        .collect();
                    let mut out = Vec::new();
                    for t in tasks {
                        out.push(t.await.expect("load worker"));
                    }
                    out
                })
                .await
        });
        let (cpu1, up1, t1) = (proxy_cpu(), up_cpu(), Instant::now());
        let ((cpu0, up0, t0), sent, measured) = pacer.join().expect("pacer thread");
        let hist = hist.lock().expect("histogram");
        let errors: u64 = results.iter().map(|r| r.measured_errors).sum();
        let all_sent: u64 = results.iter().map(|r| r.ok + r.errors).sum();
        assert_eq!(all_sent, sent, "every scheduled request was sent once");
        let cpu = cpu1.zip(cpu0).map(|(c1, c0)| c1 - c0);
        let window = t1.duration_since(t0).as_secs_f64().max(1e-9);
        // What the proxy says it did; nothing without one.
        let (mut metrics, mut log_lines) = (String::new(), None);
        if let Some(proxy) = proxy.as_mut() {
            proxy.proc.assert_alive();
            metrics = http_get(proxy.admin, "/metrics")
                .map(|(_, body)| body)
                .unwrap_or_default();
            log_lines = proxy.access_log.as_ref().map(|p| {
                // One line per request, and one per shadow copy when both features are on.
                let copies =
                    metric_sum(&metrics, "rollgate_requests_total", &["version=\"b\""]) as u64;
                settled_lines(p, sent + copies)
            });
            // Read again: the writer's drop counter can move while the lines settle.
            if let Some((_, body)) = http_get(proxy.admin, "/metrics") {
                metrics = body;
            }
        }
        Sample {
            requests: measured,
            sent,
            errors,
            rate: measured as f64 / measure.as_secs_f64(),
            p50: hist.value_at_quantile(0.50),
            p99: hist.value_at_quantile(0.99),
            p999: hist.value_at_quantile(0.999),
            max: hist.max(),
            cpu_per_req_us: cpu.map(|c| c / measured.max(1) as f64),
            cpu_share: cpu.map(|c| c / 1e6 / window),
            upstream_cpu_per_req_us: (up1 - up0) / measured.max(1) as f64,
            copies: metric_sum(&metrics, "rollgate_requests_total", &["version=\"b\""]),
            shadow_dropped: metric_sum(&metrics, "rollgate_shadow_dropped_total", &[]),
            log_lines,
            log_dropped: metric_sum(&metrics, "rollgate_access_log_dropped_total", &[]),
            b_quarantined: metric_sum(&metrics, "rollgate_version_quarantined", &["version=\"b\""])
                > 0.0,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Report

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// CPUs of the machine (not of this process's affinity mask, which `pin_self` narrows).
fn cpus() -> usize {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let n = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    if n > 0 {
        n
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("?", |(_, m)| m.trim())
        .to_string();
    format!("{} CPUs ({model})", cpus())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn features(s: &Sample) -> String {
    let mut out = Vec::new();
    if s.copies > 0.0 || s.shadow_dropped > 0.0 {
        out.push(format!(
            "{:.0} copies to b ({:.0} dropped)",
            s.copies, s.shadow_dropped
        ));
    }
    if let Some(lines) = s.log_lines {
        out.push(format!("{lines} log lines ({:.0} dropped)", s.log_dropped));
    }
    if s.b_quarantined {
        out.push("b QUARANTINED".into());
    }
    if out.is_empty() {
        "-".into()
    } else {
        out.join(", ")
    }
}

/// `v` with `digits` decimals, or "-" when there is none.
fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

/// Signed values, comma-separated.
fn signed_list(v: &[f64], digits: usize) -> String {
    v.iter()
        .map(|x| format!("{x:+.digits$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One rate's tables, from its (round, row, sample)s.
fn report(k: &Knobs, rate: f64, samples: &[(usize, Row, Sample)]) {
    let of = |row: Row| -> Vec<&Sample> {
        samples
            .iter()
            .filter(|(_, r, _)| *r == row)
            .map(|(_, _, s)| s)
            .collect()
    };
    let med = |row: Row, f: &dyn Fn(&Sample) -> f64| median(of(row).into_iter().map(f).collect());
    // The proxy's CPU per request, the median over the rounds; none for `direct`.
    let cpu = |row: Row| -> Option<f64> {
        let v: Vec<f64> = of(row).iter().filter_map(|s| s.cpu_per_req_us).collect();
        (!v.is_empty()).then(|| median(v))
    };
    // Paired differences: each round's `row` minus the same round's `base` row, in order.
    let paired = |row: Row, base: Row, f: &dyn Fn(&Sample) -> f64| -> Vec<f64> {
        samples
            .iter()
            .filter(|(_, r, _)| *r == row)
            .filter_map(|(round, _, s)| {
                samples
                    .iter()
                    .find(|(r2, x, _)| r2 == round && *x == base)
                    .map(|(_, _, b)| f(s) - f(b))
            })
            .collect()
    };
    // p50, p99, p99.9.
    let latencies: [fn(&Sample) -> f64; 3] =
        [|s| s.p50 as f64, |s| s.p99 as f64, |s| s.p999 as f64];
    // Against `base`: the per-round Δ p50, Δ p99 and Δ p99.9 cells, then in how many
    // rounds each was higher than `base`'s.
    let against = |row: Row, base: Row| -> String {
        let deltas: Vec<Vec<f64>> = latencies.iter().map(|f| paired(row, base, f)).collect();
        let above: Vec<String> = deltas
            .iter()
            .map(|d| format!("{}/{}", d.iter().filter(|x| **x > 0.0).count(), d.len()))
            .collect();
        let lists: Vec<String> = deltas.iter().map(|d| signed_list(d, 0)).collect();
        format!("{} | {}", lists.join(" | "), above.join(" / "))
    };
    let direct = k.rows.contains(&Row::Direct);
    let plain_cpu = cpu(Row::Plain);

    println!(
        "\n## {rate:.0} req/s: median of {} round{} (open loop, {} connections, {:.0} s measured after {:.1} s warm-up per row)\n",
        k.rounds,
        if k.rounds == 1 { "" } else { "s" },
        k.conns,
        k.measure.as_secs_f64(),
        k.warmup.as_secs_f64()
    );
    println!(
        "Client latency from each request's scheduled send time to the end of its response body (µs).{} Proxy CPU: utime+stime of the proxy's pid over the measured window / measured requests.\n",
        if direct {
            " Added vs direct: each round's p50 / p99 minus the same round's direct row's, the median over the rounds."
        } else {
            ""
        }
    );
    let mut head = vec!["row", "requests", "errors", "p50 µs", "p99 µs", "p99.9 µs"];
    if direct {
        head.extend(["added p50 µs vs direct", "added p99 µs vs direct"]);
    }
    head.extend(["proxy CPU µs/request", "vs plain"]);
    println!("| {} |", head.join(" | "));
    println!("|---|{}", "---:|".repeat(head.len() - 1));
    for &row in &k.rows {
        let mut cells = vec![
            row.label().to_string(),
            format!("{:.0}", med(row, &|s| s.requests as f64)),
            of(row).iter().map(|s| s.errors).sum::<u64>().to_string(),
        ];
        cells.extend(latencies.iter().map(|f| format!("{:.0}", med(row, f))));
        if direct {
            cells.extend(latencies[..2].iter().map(|f| {
                if row == Row::Direct {
                    "-".to_string()
                } else {
                    format!("{:+.0}", median(paired(row, Row::Direct, f)))
                }
            }));
        }
        cells.push(cell(cpu(row), 1));
        cells.push(match (cpu(row), plain_cpu) {
            (Some(c), Some(p)) if row != Row::Plain => {
                format!("{:+.1} µs ({:+.0} %)", c - p, 100.0 * (c / p - 1.0))
            }
            _ => "-".into(),
        });
        println!("| {} |", cells.join(" | "));
    }
    println!("\nErrors: the sum over the rounds.\n");
    println!("\n### Per round\n");
    println!("| round | row | achieved req/s | errors | p50 µs | p99 µs | p99.9 µs | max µs | proxy CPU µs/request | proxy CPU, % of a core | upstreams' CPU µs/request | features seen (whole row, warm-up included) |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for (round, row, s) in samples {
        println!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} |",
            round + 1,
            row.label(),
            s.rate,
            s.errors,
            s.p50,
            s.p99,
            s.p999,
            s.max,
            cell(s.cpu_per_req_us, 1),
            cell(s.cpu_share.map(|x| 100.0 * x), 1),
            s.upstream_cpu_per_req_us,
            features(s)
        );
    }
    let proxied: Vec<Row> = k
        .rows
        .iter()
        .copied()
        .filter(|&r| r != Row::Direct)
        .collect();
    if direct && !proxied.is_empty() {
        println!("\n### Against the same round's direct row\n");
        println!("Each round's row minus the same round's direct row (rounds in order): what the proxy adds; \"rounds above direct\": in how many rounds the row's p50 / p99 / p99.9 was higher than direct's.\n");
        println!("| row | Δ p50 µs per round | Δ p99 µs per round | Δ p99.9 µs per round | rounds above direct (p50 / p99 / p99.9) |");
        println!("|---|---|---|---|---|");
        for &row in &proxied {
            println!("| {} | {} |", row.label(), against(row, Row::Direct));
        }
    }
    let with_feature: Vec<Row> = k
        .rows
        .iter()
        .copied()
        .filter(|r| r.shadow() || r.log())
        .collect();
    if !k.rows.contains(&Row::Plain) || with_feature.is_empty() {
        return;
    }
    // Every row here and plain ran a proxy.
    let proxy_cpu = |s: &Sample| s.cpu_per_req_us.expect("a proxied row's CPU");
    println!("\n### Against the same round's plain row\n");
    println!("Each round's feature row minus the same round's plain row (rounds in order); \"rounds above plain\": in how many rounds the feature row's p50 / p99 / p99.9 was higher than plain's.\n");
    println!("| row | Δ p50 µs per round | Δ p99 µs per round | Δ p99.9 µs per round | rounds above plain (p50 / p99 / p99.9) | Δ CPU µs/request per round | Δ CPU per unit of work |");
    println!("|---|---|---|---|---|---|---|");
    for &row in &with_feature {
        let d_cpu = paired(row, Row::Plain, &proxy_cpu);
        let d_cpu_median = median(d_cpu.clone());
        // Work per request: shadow copies and log lines, over the whole row.
        let per_req = |f: &dyn Fn(&Sample) -> f64| {
            median(
                of(row)
                    .iter()
                    .map(|s| f(s) / s.sent.max(1) as f64)
                    .collect(),
            )
        };
        let copies = per_req(&|s| s.copies);
        let lines = per_req(&|s| s.log_lines.unwrap_or(0) as f64);
        let unit = match row {
            Row::Shadow => format!(
                "{:.1} µs per shadow copy ({copies:.2} copies/request)",
                d_cpu_median / copies.max(1e-9)
            ),
            Row::Log => format!(
                "{:.1} µs per log line ({lines:.2} lines/request)",
                d_cpu_median / lines.max(1e-9)
            ),
            _ => format!("{copies:.2} copies and {lines:.2} log lines per request"),
        };
        println!(
            "| {} | {} | {} (median {d_cpu_median:+.1}) | {unit} |",
            row.label(),
            against(row, Row::Plain),
            signed_list(&d_cpu, 1),
        );
    }
}

// ---------------------------------------------------------------------------------------

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let pin = Pinning::detect();
    pin.pin_self(1);
    let began = Instant::now();
    println!(
        "# Data plane: what the proxy adds over direct, and what shadow and the access log cost ({} run; {}; load average at start {})",
        if full { "full" } else { "smoke" },
        machine(),
        loadavg()
    );
    let dir = tempfile::tempdir().expect("bench temp dir");
    let bench = Bench {
        k: Knobs::new(full),
        pin,
        ticks: clock_ticks(),
        a: start_upstream(pin, dir.path(), "a"),
        b: start_upstream(pin, dir.path(), "b"),
        body: chat_body(),
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime"),
    };
    let k = &bench.k;
    // (rate, round, row, sample), every rate's.
    let mut samples = Vec::new();
    for &rate in &k.rates {
        // One unreported plain row first: the upstreams, this process and the page cache
        // see traffic at this rate before the first measured row (in trial runs, round
        // 1's plain row had the worst tail of all without it).
        let s = bench.row(Row::Plain, rate);
        eprintln!(
            "{rate:.0} req/s warm-up row (not reported): p50 {} µs  p99 {} µs  errors {}",
            s.p50, s.p99, s.errors
        );
        let mut at_rate = Vec::new();
        for round in 0..k.rounds {
            for &row in &k.rows {
                let s = bench.row(row, rate);
                eprintln!(
                    "{rate:.0} req/s round {} {:<26} p50 {:>6} µs  p99 {:>6} µs  p99.9 {:>6} µs  cpu {:>6} µs/req  errors {}  {}",
                    round + 1,
                    row.label(),
                    s.p50,
                    s.p99,
                    s.p999,
                    cell(s.cpu_per_req_us, 1),
                    s.errors,
                    features(&s)
                );
                at_rate.push((round, row, s));
            }
        }
        report(k, rate, &at_rate);
        samples.extend(
            at_rate
                .into_iter()
                .map(|(round, row, s)| (rate, round, row, s)),
        );
    }
    println!(
        "\nMachine: {}; pinning: {}.",
        machine(),
        if pin.on {
            "proxy on core 0; upstreams and this load generator on core 1 (taskset)"
        } else {
            "none (no taskset, or 1 CPU)"
        }
    );
    println!(
        "\nLoad average at the end: {}. Total: {:.0} s.",
        loadavg(),
        began.elapsed().as_secs_f64()
    );
    // The smoke run fails on real errors only: failed requests, or a feature that did
    // nothing (no copy reached b, no line was written). Latency and CPU are not judged.
    let mut problems = Vec::new();
    for (rate, round, row, s) in &samples {
        let at = format!("{rate:.0} req/s round {} {}", round + 1, row.label());
        if s.errors > 0 {
            problems.push(format!("{at}: {} failed requests", s.errors));
        }
        if row.shadow() && s.copies < 1.0 {
            problems.push(format!("{at}: no shadow copy reached b"));
        }
        if row.log() && s.log_lines.unwrap_or(0) == 0 {
            problems.push(format!("{at}: no access log line written"));
        }
        if s.b_quarantined {
            problems.push(format!("{at}: version b was quarantined"));
        }
    }
    if !problems.is_empty() {
        let text = problems.join("\n");
        if full {
            println!("\nWARNING:\n{text}");
        } else {
            panic!("data_plane smoke run:\n{text}");
        }
    }
}
