//! The fuzz targets' harness, shared by `fuzz/fuzz_targets/*.rs` (cargo-fuzz, nightly) and
//! `tests/properties.rs` (stable: the seed corpora and the proptest inputs run through the
//! same functions). Each entry point takes arbitrary bytes and panics only when rollgate
//! breaks a promise:
//!
//! - [`config`]: the bytes as a YAML and as a TOML config file. Parsing and validation never
//!   panic; an error locates every problem (a line, or at least a key); an accepted config
//!   keeps every invariant validation promises, compiles into a routing table, and reads back
//!   the same from its own effective document (`GET /api/v1/config`).
//! - [`request_route`]: the bytes as a request head (pin header, sticky header or cookie,
//!   path, host, model header or JSON body) sent over a real HTTP/1.1 connection to the real
//!   request handler ([`rollgate::proxy::service::handle`]) in front of a fixed multi-route
//!   table and one local upstream. The version that answers (or the refusal) must be the one
//!   SPEC §4 prescribes, computed independently by [`expected`].
//!
//! This file lives in a subdirectory so that cargo does not build it as a test of its own.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rollgate::config::{Config, ConfigError, PinQuarantined, PinUnknown, StickyKey};
use rollgate::routing::store::Store;
use rollgate::routing::table::{RuntimeState, Table};
use rollgate::telemetry::prom::Metrics;
use rollgate::telemetry::Telemetry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------
// config
// ---------------------------------------------------------------------------------------

/// Where fuzzed config texts claim to come from: a directory that does not exist, so
/// relative paths in them (`ca_file`, `state_dir`) never name a real file.
pub const FUZZ_DIR: &str = "/nonexistent-rollgate-fuzz";

/// Also check the known bugs (KB1..KB4 in `tests/properties.rs`, ignored tests there until
/// fixed)? Off by default so that CI and fuzzing stop only on new findings; set
/// `ROLLGATE_FUZZ_STRICT=1` to check them too (once they are fixed, delete this switch).
pub fn strict() -> bool {
    static STRICT: OnceLock<bool> = OnceLock::new();
    *STRICT.get_or_init(|| std::env::var_os("ROLLGATE_FUZZ_STRICT").is_some_and(|v| v == "1"))
}

/// Fuzz target `config`: the bytes as a YAML file and as a TOML file.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for name in ["rollgate.yaml", "rollgate.toml"] {
        let _ = check_config_text(&text, &Path::new(FUZZ_DIR).join(name));
    }
}

/// Parses and validates `text` as read from `origin`, then checks the outcome: an error
/// must locate each of its problems, an accepted config must keep every invariant
/// (see [`assert_config_invariants`]) and round-trip through its effective document.
pub fn check_config_text(text: &str, origin: &Path) -> Result<Config, ConfigError> {
    match Config::from_str(text, origin) {
        Ok(c) => {
            assert_config_invariants(&c, text);
            assert_document_round_trips(&c);
            Ok(c)
        }
        Err(e) => {
            assert_error_located(&e, text, origin);
            Err(e)
        }
    }
}

/// Every problem has a message and a place: a line within the text (1-based), or, where
/// the position is unknown, the key it is about. The rendered error names the file.
pub fn assert_error_located(e: &ConfigError, text: &str, origin: &Path) {
    assert!(!e.problems.is_empty(), "an error without problems");
    assert_eq!(e.file, origin, "the error names another file");
    // Line breaks are LF, CRLF and (for YAML) a lone CR; a parser may point just past the
    // last line (end of input).
    let breaks =
        text.matches('\n').count() + text.matches('\r').count() - text.matches("\r\n").count();
    let last_line = breaks as u64 + 2;
    for p in &e.problems {
        assert!(
            !p.message.trim().is_empty(),
            "a problem without message: {p:?}"
        );
        assert!(
            p.line > 0 || !p.key.is_empty(),
            "a problem that names neither a line nor a key: {p:?}\n--- text ---\n{text}"
        );
        assert!(
            p.line <= last_line,
            "line {} is past the end of a {}-line text: {p:?}",
            p.line,
            last_line - 1
        );
    }
    let shown = e.to_string();
    assert!(
        shown.starts_with(&origin.display().to_string()),
        "the message does not start with the file: {shown}"
    );
}

/// What validation promises about a config it accepted (SPEC §3, `config/validate.rs`).
pub fn assert_config_invariants(c: &Config, text: &str) {
    assert_eq!(
        c.hash,
        rollgate::config::content_hash(text.as_bytes()),
        "hash is not the sha256 of the text"
    );
    assert!(!c.versions.is_empty(), "no versions");
    let names: Vec<&str> = c.versions.iter().map(|v| v.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(names, sorted, "versions are not sorted by name and unique");
    for v in &c.versions {
        let n = v.name.as_str();
        assert!(
            !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
            "version name {n:?} outside [A-Za-z0-9._-]"
        );
        assert!(!v.endpoints.is_empty(), "version {n} has no endpoint");
        assert_eq!(v.fingerprint.len(), 16, "fingerprint of {n}");
        for (h, _) in &v.set_headers {
            assert!(
                h != header::HOST && h != header::CONTENT_LENGTH && h != header::CONNECTION,
                "version {n} may set {h}"
            );
        }
    }
    let known: BTreeSet<&str> = names.iter().copied().collect();
    assert!(!c.routes.is_empty(), "no routes");
    let mut route_names = BTreeSet::new();
    for r in &c.routes {
        let rn = &*r.name;
        assert!(!rn.trim().is_empty(), "empty route name");
        // KB1: names are compared before trimming, stored after.
        assert!(
            route_names.insert(rn.to_string()) || !strict(),
            "two routes named {rn:?}: admin calls and runtime state address routes by name"
        );
        assert!(
            known.contains(r.baseline.as_str()),
            "{rn}: unknown baseline"
        );
        assert!(
            r.split.iter().any(|(v, _)| v == &r.baseline),
            "{rn}: baseline not in split"
        );
        let split_names: Vec<&str> = r.split.iter().map(|(v, _)| v.as_str()).collect();
        let mut dedup = split_names.clone();
        dedup.sort_unstable();
        dedup.dedup();
        assert_eq!(
            split_names.len(),
            dedup.len(),
            "{rn}: a version twice in split"
        );
        let total: u64 = r.split.iter().map(|(_, w)| u64::from(w.0)).sum();
        assert!(total > 0, "{rn}: weights sum to 0");
        for (v, w) in &r.split {
            assert!(known.contains(v.as_str()), "{rn}: split names unknown {v}");
            assert!(w.0 <= 1_000_000, "{rn}: weight {} above 1000000", w.0);
        }
        if let Some(fb) = &r.fallback {
            assert!(known.contains(fb.as_str()), "{rn}: unknown fallback");
            assert_ne!(fb, &r.baseline, "{rn}: fallback is the baseline");
        }
        if let Some(s) = &r.shadow {
            assert!(known.contains(s.version.as_str()), "{rn}: unknown shadow");
            assert!(s.percent <= 100, "{rn}: shadow percent {}", s.percent);
        }
        if let Some(ro) = &r.rollout {
            assert!(!ro.steps.is_empty(), "{rn}: empty rollout");
            assert!(
                ro.steps.windows(2).all(|w| w[0] < w[1])
                    && ro.steps.iter().all(|s| (1..=100).contains(s)),
                "{rn}: rollout steps {:?}",
                ro.steps
            );
        }
        if let Some(p) = &r.matcher.path_prefix {
            assert!(p.starts_with('/'), "{rn}: path_prefix {p:?}");
        }
        if let Some(StickyKey::Cookie(name)) = &r.sticky {
            assert!(!name.is_empty(), "{rn}: empty sticky cookie");
        }
        let t = r.timeouts;
        assert!(
            !t.connect.is_zero() && !t.first_byte.is_zero() && !t.idle.is_zero(),
            "{rn}: a zero timeout {t:?}"
        );
        assert!(r.retry.budget_percent <= 100, "{rn}: retry budget");
    }
    let ev = &c.evaluator;
    assert!(!ev.interval.is_zero(), "evaluator.interval is 0");
    // KB2: only checked when both are written.
    assert!(
        ev.window > ev.interval || !strict(),
        "evaluator.window {:?} is not longer than evaluator.interval {:?}",
        ev.window,
        ev.interval
    );
    assert!(
        ev.confidence > 0.5 && ev.confidence < 1.0,
        "confidence {}",
        ev.confidence
    );
    let rules = &ev.rules;
    for (name, v, min) in [
        ("error_rate_ratio", rules.error_rate_ratio, 1.0),
        ("latency_p99_ratio", rules.latency_p99_ratio, 1.0),
    ] {
        if let Some(v) = v {
            assert!(v.is_finite() && v > min, "{name} {v}");
        }
    }
    for (name, v) in [
        ("error_rate_max", rules.error_rate_max),
        ("accuracy_drop", rules.accuracy_drop),
    ] {
        if let Some(v) = v {
            assert!(v > 0.0 && v <= 1.0, "{name} {v}");
        }
    }
    if let Some(d) = &rules.drift {
        // KB3: not range-checked.
        assert!(
            (d.p_value > 0.0 && d.p_value < 1.0) || !strict(),
            "drift.p_value {} is not a probability in (0, 1)",
            d.p_value
        );
        assert!(d.consecutive >= 1, "drift.consecutive 0");
    }
    for w in &c.alerts.webhooks {
        assert!(
            w.url.starts_with("http://") || w.url.starts_with("https://"),
            "webhook {}",
            w.url
        );
    }
    if !c.admin.listen.ip().is_loopback() {
        assert!(
            c.admin.token_file.is_some(),
            "non-loopback admin listener without a token"
        );
    }
    // "A value that passed validation cannot be invalid later": it compiles.
    if let Err(e) = compile(c.clone()) {
        // KB4: `ca_file` is only checked for existence.
        let ca_file = c.versions.iter().any(|v| v.ca_file.is_some());
        assert!(
            ca_file && !strict(),
            "a config that passed validation does not compile into a table: {e}"
        );
    }
}

/// The effective document (`GET /api/v1/config`, defaults filled in) is itself a valid
/// config that validates to the same thing.
pub fn assert_document_round_trips(c: &Config) {
    // KB3: a NaN p_value is shown as null, which reads back as the default.
    let nan = c
        .evaluator
        .rules
        .drift
        .as_ref()
        .is_some_and(|d| d.p_value.is_nan());
    if nan && !strict() {
        return;
    }
    let json = serde_json::to_string_pretty(&*c.document).expect("document serializes");
    // JSON is YAML; keep the directory, which anchors relative paths.
    let again = Config::from_str(&json, &c.source.with_extension("yaml")).unwrap_or_else(|e| {
        panic!("the effective document does not validate: {e}\n--- document ---\n{json}")
    });
    assert_eq!(
        normalized(c),
        normalized(&again),
        "the effective document validates to another config\n--- document ---\n{json}"
    );
}

/// A config's meaning, without what depends on the text's bytes (hash, positions).
pub fn normalized(c: &Config) -> String {
    let mut c = c.clone();
    c.hash.clear();
    c.source = PathBuf::new();
    format!("{c:?}")
}

/// Compiles `config` into a routing table the way startup does (no sockets are opened).
pub fn compile(config: Config) -> std::io::Result<Arc<Store>> {
    let telemetry = Arc::new(Telemetry::new(config.evaluator.window));
    let metrics = Arc::new(Metrics::new(telemetry.clone()));
    Store::new(config, RuntimeState::default(), telemetry, metrics).map(Arc::new)
}

// ---------------------------------------------------------------------------------------
// request_route
// ---------------------------------------------------------------------------------------

/// The fixed table requests are routed against. Every version's endpoint is the same
/// local upstream, which answers 200 to everything, so the version that answers is the
/// version that was chosen. `idle` belongs to no route.
const ROUTE_CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: {listen: 127.0.0.1:0}
pin: {quarantined: PIN_QUARANTINED, unknown: PIN_UNKNOWN}
evaluator: {min_requests: 1000000}
versions:
  stable: {endpoints: ["UPSTREAM"]}
  canary: {endpoints: ["UPSTREAM"]}
  beta: {endpoints: ["UPSTREAM"]}
  gamma: {endpoints: ["UPSTREAM"]}
  delta: {endpoints: ["UPSTREAM"]}
  idle: {endpoints: ["UPSTREAM"]}
routes:
  - {name: tenant, match: {headers: {x-tenant: acme}}, baseline: gamma, split: {gamma: 1, delta: 1}}
  - name: models
    match: {path_prefix: /v1/, model: [gpt-a, gpt-b]}
    baseline: beta
    split: {beta: 3, gamma: 1, canary: 1}
    sticky: {header: x-user-id}
    max_request_body: 1KiB
  - {name: by-host, match: {host: api.example.com}, baseline: gamma, split: {gamma: 1, stable: 3}, sticky: {cookie: session}}
  - {name: chat, match: {path_prefix: /v1/}, baseline: stable, split: {stable: 70, canary: 30}, sticky: {header: x-user-id}}
  - {name: legacy, match: {path_prefix: /v0/}, baseline: delta, split: {delta: 1, canary: 0}, fallback: stable}
"#;

/// One table variant per pin policy, with and without `canary` quarantined.
const VARIANTS: [(PinQuarantined, PinUnknown, bool); 4] = [
    (PinQuarantined::Baseline, PinUnknown::Reject, true),
    (PinQuarantined::Honor, PinUnknown::Ignore, true),
    (PinQuarantined::Reject, PinUnknown::Reject, true),
    (PinQuarantined::Baseline, PinUnknown::Ignore, false),
];

struct RouteFixture {
    rt: tokio::runtime::Runtime,
    shared: Vec<Arc<rollgate::proxy::service::Shared>>,
}

fn route_fixture() -> &'static RouteFixture {
    static FIXTURE: OnceLock<RouteFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let upstream = rt.block_on(start_upstream());
        let shared = VARIANTS
            .iter()
            .map(|(q, u, quarantine)| {
                let yaml = ROUTE_CONFIG
                    .replace("UPSTREAM", &format!("http://{upstream}"))
                    .replace("PIN_QUARANTINED", policy_name_q(*q))
                    .replace("PIN_UNKNOWN", policy_name_u(*u));
                let config = Config::from_str(&yaml, &Path::new(FUZZ_DIR).join("route.yaml"))
                    .unwrap_or_else(|e| panic!("fixture config: {e}"));
                let canary_fp = config.version("canary").unwrap().fingerprint.clone();
                let store = compile(config).expect("fixture compiles");
                if *quarantine {
                    store
                        .update(None, |s| {
                            s.quarantined.insert("canary".into(), canary_fp);
                        })
                        .expect("quarantine canary");
                }
                Arc::new(rollgate::proxy::service::Shared::new(store, 10_000))
            })
            .collect();
        RouteFixture { rt, shared }
    })
}

fn policy_name_q(q: PinQuarantined) -> &'static str {
    match q {
        PinQuarantined::Baseline => "baseline",
        PinQuarantined::Honor => "honor",
        PinQuarantined::Reject => "reject",
    }
}

fn policy_name_u(u: PinUnknown) -> &'static str {
    match u {
        PinUnknown::Reject => "reject",
        PinUnknown::Ignore => "ignore",
    }
}

/// A model server that answers 200 `ok` to every request (body read first).
async fn start_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async {
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A request decoded from fuzz bytes. The format is line-based so seeds are readable:
///
/// ```text
/// @2                      optional: table variant (index into VARIANTS, modulo)
/// GET /v1/chat            method and request target (origin or absolute form)
/// host: api.example.com   headers, one a line, until an empty line
/// x-user-id: 42
///
/// {"model": "gpt-a"}      the rest is the body
/// ```
#[derive(Clone, Default)]
pub struct FuzzRequest {
    pub variant: usize,
    pub method: Vec<u8>,
    pub target: Vec<u8>,
    pub http10: bool,
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for FuzzRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "variant {}: {:?}",
            self.variant,
            String::from_utf8_lossy(&self.to_wire())
        )
    }
}

impl FuzzRequest {
    pub fn decode(data: &[u8]) -> FuzzRequest {
        let mut r = FuzzRequest::default();
        let mut rest = data;
        let next_line = |rest: &mut &[u8]| -> Option<Vec<u8>> {
            if rest.is_empty() {
                return None;
            }
            let end = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
            let mut line = rest[..end].to_vec();
            *rest = &rest[(end + 1).min(rest.len())..];
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            Some(line)
        };
        let mut first = next_line(&mut rest).unwrap_or_default();
        if first.first() == Some(&b'@') {
            r.variant = first[1..].iter().fold(0usize, |n, b| {
                n.wrapping_mul(10)
                    .wrapping_add(usize::from(b.wrapping_sub(b'0')))
            });
            first = next_line(&mut rest).unwrap_or_default();
        }
        let mut parts = first.splitn(3, |b| *b == b' ');
        r.method = parts.next().unwrap_or_default().to_vec();
        r.target = parts.next().unwrap_or_default().to_vec();
        r.http10 = parts.next() == Some(b"HTTP/1.0");
        while let Some(line) = next_line(&mut rest) {
            if line.is_empty() {
                break;
            }
            let (name, value) = match line.iter().position(|b| *b == b':') {
                Some(i) => (&line[..i], &line[i + 1..]),
                None => (&line[..], &b""[..]),
            };
            let value = value.strip_prefix(b" ").unwrap_or(value);
            r.headers.push((name.to_vec(), value.to_vec()));
        }
        r.body = rest.to_vec();
        r
    }

    /// The bytes sent on the wire: the request line, the headers (less framing and
    /// connection headers, which the harness sets), `content-length`, `connection: close`.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut w = Vec::new();
        w.extend_from_slice(if self.method.is_empty() {
            b"GET"
        } else {
            &self.method
        });
        w.push(b' ');
        w.extend_from_slice(if self.target.is_empty() {
            b"/"
        } else {
            &self.target
        });
        w.extend_from_slice(if self.http10 {
            b" HTTP/1.0\r\n"
        } else {
            b" HTTP/1.1\r\n"
        });
        for (n, v) in &self.headers {
            let framing = [&b"content-length"[..], b"transfer-encoding", b"connection"]
                .iter()
                .any(|h| n.eq_ignore_ascii_case(h));
            if framing {
                continue;
            }
            w.extend_from_slice(n);
            w.extend_from_slice(b": ");
            w.extend_from_slice(v);
            w.extend_from_slice(b"\r\n");
        }
        w.extend_from_slice(format!("content-length: {}\r\n", self.body.len()).as_bytes());
        w.extend_from_slice(b"connection: close\r\n\r\n");
        w.extend_from_slice(&self.body);
        w
    }
}

/// What SPEC §4 says must happen to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// The proxy answers itself with this status and JSON `error` code.
    Refused(u16, &'static str),
    /// Route `route` serves it, by one of `versions` (exactly one for pins and sticky keys).
    Served {
        route: String,
        versions: BTreeSet<String>,
        how: &'static str,
    },
}

/// What happened to one request that reached the handler.
#[derive(Debug, Clone)]
pub struct RouteOutcome {
    pub expected: Expected,
    pub status: u16,
    pub version: Option<String>,
    pub error_code: Option<String>,
}

/// Fuzz target `request_route`. Returns the outcome when the request reached rollgate's
/// handler (hyper refuses some byte strings before that, which is not rollgate's code).
pub fn request_route(data: &[u8]) -> Option<RouteOutcome> {
    let req = FuzzRequest::decode(data);
    let fx = route_fixture();
    let shared = fx.shared[req.variant % fx.shared.len()].clone();
    let wire = req.to_wire();
    let body = Bytes::from(req.body.clone());
    let outcomes: Arc<Mutex<Vec<Result<RouteOutcome, String>>>> = Arc::default();
    let seen = outcomes.clone();
    let reply = fx.rt.block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let shared = shared.clone();
            let body = body.clone();
            let seen = seen.clone();
            async move {
                let (parts, incoming) = req.into_parts();
                let table = shared.store.load();
                let expected = expected(&table, &parts, &body);
                let conn = rollgate::proxy::service::ConnInfo {
                    peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
                    tls: false,
                };
                let resp = rollgate::proxy::service::handle(
                    shared.clone(),
                    conn,
                    Request::from_parts(parts, incoming),
                )
                .await;
                let (rparts, rbody) = resp.into_parts();
                let collected = tokio::time::timeout(Duration::from_secs(10), rbody.collect())
                    .await
                    .map_err(|_| "response body did not end within 10s".to_string())
                    .and_then(|r| r.map_err(|e| format!("response body failed: {e}")));
                let outcome = collected.map(|c| {
                    let bytes = c.to_bytes();
                    let error_code = serde_json::from_slice::<serde_json::Value>(&bytes)
                        .ok()
                        .and_then(|v| v["error"].as_str().map(str::to_string));
                    RouteOutcome {
                        expected,
                        status: rparts.status.as_u16(),
                        version: rparts
                            .headers
                            .get("x-rollgate-version")
                            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
                        error_code,
                    }
                });
                seen.lock().unwrap().push(outcome);
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
            }
        });
        let builder = rollgate::proxy::server::http1_builder();
        let conn = builder.serve_connection(TokioIo::new(server), svc);
        let talk = async {
            // The proxy may answer (and close) before reading everything: ignore write errors.
            let _ = client.write_all(&wire).await;
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out).await;
            out
        };
        let (_, out) =
            tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(conn, talk) })
                .await
                .unwrap_or_else(|_| panic!("no complete answer within 20s to {req:?}"));
        out
    });
    let mut outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    assert!(
        outcomes.len() <= 1,
        "one request, {} answers",
        outcomes.len()
    );
    let outcome = match outcomes.pop() {
        None => {
            // hyper refused the bytes itself: it must have said so.
            let text = String::from_utf8_lossy(&reply);
            assert!(
                text.is_empty() || text.starts_with("HTTP/1.1 4") || text.starts_with("HTTP/1.0 4"),
                "hyper answered without calling rollgate: {text:?}"
            );
            return None;
        }
        Some(o) => o.unwrap_or_else(|e| panic!("{e}: {:?}", FuzzRequest::decode(data))),
    };
    check_outcome(&outcome, data);
    Some(outcome)
}

/// The handler's answer against [`Expected`].
fn check_outcome(o: &RouteOutcome, data: &[u8]) {
    let req = FuzzRequest::decode(data);
    match &o.expected {
        Expected::Refused(status, code) => {
            assert_eq!(
                (o.status, o.error_code.as_deref()),
                (*status, Some(*code)),
                "expected a {status} {code} refusal, got {o:?} for {req:?}"
            );
        }
        Expected::Served {
            route,
            versions,
            how,
        } => {
            assert_eq!(
                o.status, 200,
                "expected route {route} to serve ({how}), got {o:?} for {req:?}"
            );
            let v = o.version.as_deref().unwrap_or("<no x-rollgate-version>");
            assert!(
                versions.contains(v),
                "route {route} ({how}) must answer with one of {versions:?}, answered with {v} for {req:?}"
            );
        }
    }
}

/// SPEC §4 from first principles, for one request against `table`. Deliberately written
/// apart from `proxy/service.rs` (from the table's data, not the handler's code), so the
/// two can disagree; it uses only the choice primitives tested on their own in
/// `tests/properties.rs` (`select::rendezvous` for sticky keys, cookie parsing).
pub fn expected(table: &Table, parts: &Parts, body: &[u8]) -> Expected {
    let target_len = parts.uri.authority().map_or(0, |a| a.as_str().len())
        + parts.uri.path_and_query().map_or(0, |p| p.as_str().len());
    if target_len > rollgate::proxy::service::MAX_URI {
        return Expected::Refused(414, "uri_too_long");
    }
    // RFC 9112 §3.2: one Host, agreeing with an absolute-form target; required in 1.1.
    let hosts: Vec<_> = parts.headers.get_all(header::HOST).iter().collect();
    if hosts.len() > 1 {
        return Expected::Refused(400, "bad_request");
    }
    let host: Option<String> = match (parts.uri.authority(), hosts.first()) {
        (Some(a), Some(h)) => {
            if !a.as_str().eq_ignore_ascii_case(h.to_str().unwrap_or("")) {
                return Expected::Refused(400, "bad_request");
            }
            Some(a.as_str().to_string())
        }
        (Some(a), None) => Some(a.as_str().to_string()),
        (None, Some(h)) => h.to_str().ok().map(str::to_string),
        (None, None) if parts.version == Version::HTTP_10 => None,
        (None, None) => return Expected::Refused(400, "bad_request"),
    };
    let path = parts.uri.path();

    // The first route whose head matches, and whose model list (if any) holds the model.
    let mut model: Option<Option<String>> = None;
    let mut chosen = None;
    for route in table.routes.iter() {
        let m = &route.config.matcher;
        if m.path_prefix
            .as_ref()
            .is_some_and(|p| !path.starts_with(p.as_str()))
        {
            continue;
        }
        if let Some(want) = &m.host {
            let Some(h) = host.as_deref() else { continue };
            // `host:port` compares without a numeric port.
            let bare = match h.rsplit_once(':') {
                Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
                _ => h,
            };
            if !bare.eq_ignore_ascii_case(want) {
                continue;
            }
        }
        if !m
            .headers
            .iter()
            .all(|(n, v)| parts.headers.get(n) == Some(v))
        {
            continue;
        }
        if !m.models.is_empty() {
            if model.is_none() {
                let from_header = parts
                    .headers
                    .get("x-gateway-model-name")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                model = Some(match from_header {
                    Some(h) => Some(h),
                    None => {
                        if body.len() as u64 > route.config.max_request_body {
                            return Expected::Refused(413, "body_too_large");
                        }
                        json_model(body)
                    }
                });
            }
            let Some(Some(name)) = &model else { continue };
            if !m.models.iter().any(|x| x == name) {
                continue;
            }
        }
        chosen = Some(route);
        break;
    }
    let Some(route) = chosen else {
        return Expected::Refused(404, "no_route");
    };
    let name_of = |member: usize| {
        table.versions[route.members[member].version]
            .name
            .to_string()
    };
    // A declared body over the route's limit is refused once the version is chosen.
    let too_large = body.len() as u64 > route.config.max_request_body;
    let served = |versions: BTreeSet<String>, how| {
        if too_large {
            return Expected::Refused(413, "body_too_large");
        }
        Expected::Served {
            route: route.name.to_string(),
            versions,
            how,
        }
    };

    // (1) A pin naming one of the route's versions.
    if let Some(pin) = parts.headers.get(&table.pin_header) {
        let member = (0..route.members.len()).find(|i| name_of(*i).as_bytes() == pin.as_bytes());
        match member {
            Some(i) if table.versions[route.members[i].version].quarantined => {
                return match table.pin_quarantined {
                    PinQuarantined::Baseline => served(
                        [name_of(route.baseline)].into(),
                        "pin to a quarantined version",
                    ),
                    PinQuarantined::Honor => served([name_of(i)].into(), "pin honoured"),
                    PinQuarantined::Reject => Expected::Refused(409, "version_quarantined"),
                };
            }
            Some(i) => return served([name_of(i)].into(), "pin"),
            None if table.pin_unknown == PinUnknown::Reject => {
                return Expected::Refused(400, "unknown_version")
            }
            None => {}
        }
    }
    // (2) A sticky key: weighted rendezvous over the effective weights.
    let key: Option<&[u8]> = match &route.config.sticky {
        Some(StickyKey::Header(h)) => parts.headers.get(h).map(|v| v.as_bytes()),
        Some(StickyKey::Cookie(c)) => {
            rollgate::proxy::headers::cookie(&parts.headers, c).map(str::as_bytes)
        }
        None => None,
    };
    if let Some(key) = key {
        if let Some(i) = rollgate::routing::select::rendezvous(&route.members, key) {
            return served([name_of(i)].into(), "sticky key");
        }
    }
    // (3) Weighted random: any version with effective weight above 0.
    let positive = (0..route.members.len())
        .filter(|i| route.members[*i].weight > 0)
        .map(name_of)
        .collect();
    served(positive, "weighted random")
}

/// The top-level `model` string of a JSON object body, as OpenAI-style clients send it.
pub fn json_model(body: &[u8]) -> Option<String> {
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

/// Every version a route may ever answer with: its split, baseline and fallback.
pub fn route_versions(table: &Table, route: &str) -> BTreeSet<String> {
    let r = table
        .routes
        .iter()
        .find(|r| &*r.name == route)
        .expect("route");
    let mut s: BTreeSet<String> = r.config.split.iter().map(|(v, _)| v.to_string()).collect();
    s.insert(r.config.baseline.to_string());
    if let Some(f) = &r.config.fallback {
        s.insert(f.to_string());
    }
    s
}

/// The table a [`FuzzRequest`] with this variant is routed against.
pub fn fixture_table(variant: usize) -> Arc<Table> {
    let fx = route_fixture();
    fx.shared[variant % fx.shared.len()].store.load()
}

/// Headers as a map, for tests that build requests by hand.
pub fn header_map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}
