//! `FileConfig` -> `Config`: every check, every problem located.
//!
//! Validation collects all problems rather than stopping at the first, so one `check`
//! run shows everything that is wrong with a file.
//!
//! Every number in the file is bounded (see [`bounds`]): a value that passed validation
//! can neither overflow nor panic later (the release profile aborts on panic), nor make a
//! rule fire on every tick. The bounds are far from anything a real deployment writes;
//! they are repeated in the doc comments of [`super::file`], which become the JSON
//! schema's descriptions.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use http::{HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

use super::file::{FileAccessLog, FileConfig, FileFleet, FileRoute, FileVersion, Located};
use super::*;

/// The range of every number in the file, in one place.
pub(crate) mod bounds {
    use super::{DurSpan, Span};
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);
    const SECOND: Duration = Duration::from_secs(1);
    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(24 * 3600);
    const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

    pub const DRAIN_TIMEOUT: DurSpan = DurSpan::new(Duration::ZERO, HOUR);
    pub const MAX_IN_FLIGHT: (u64, u64) = (1, 10_000_000);
    pub const HEALTH_INTERVAL: DurSpan = DurSpan::new(Duration::from_millis(10), HOUR);
    pub const HEALTH_TIMEOUT: DurSpan = DurSpan::new(MS, HOUR);
    pub const HEALTH_STREAK: (u64, u64) = (1, 1000);
    pub const WEIGHT_MAX: u32 = 1_000_000;
    /// A route's weights together (the routing table sums them in a `u32`).
    pub const ROUTE_WEIGHT_TOTAL: u64 = 1_000_000_000;
    pub const SHADOW_PERCENT: (u64, u64) = (0, 100);
    pub const ROLLOUT_HOLD: DurSpan = DurSpan::new(MS, WEEK);
    pub const TIMEOUT: DurSpan = DurSpan::new(MS, DAY);
    pub const RETRY_BUDGET_PERCENT: (u64, u64) = (0, 100);
    pub const RETRY_MIN_PER_SECOND: (u64, u64) = (0, 100_000);
    pub const MAX_REQUEST_BODY: u64 = 1 << 30;
    pub const INTERVAL: DurSpan = DurSpan::new(Duration::from_millis(10), HOUR);
    /// Also longer than `interval`.
    pub const WINDOW_MAX: Duration = DAY;
    pub const MIN_REQUESTS: (u64, u64) = (1, 1_000_000_000);
    pub const CONFIDENCE: Span = Span::open_closed(0.5, 0.999_999);
    pub const RATIO: Span = Span::open_closed(1.0, 1000.0);
    pub const FLEET_NAME_LEN: usize = 64;
    pub const MIN_ERROR_RATE: Span = Span::closed_open(0.0, 1.0);
    pub const FRACTION: Span = Span::open(0.0, 1.0);
    pub const LATENCY_P99_MAX: DurSpan = DurSpan::new(MS, HOUR);
    pub const HEALTH_FAILURES: (u64, u64) = (1, 1000);
    pub const DRIFT_P_VALUE: Span = Span::open(0.0, 1.0);
    pub const DRIFT_CONSECUTIVE: (u64, u64) = (1, 1000);
    pub const SAFETY_MAX: (u64, u64) = (0, 1_000_000);
    pub const SAFETY_PER: DurSpan = DurSpan::new(SECOND, WEEK);
    pub const ADMIN_HOST_LEN: usize = 253;
    /// gRPC status codes are 0 (OK) to 16 (UNAUTHENTICATED).
    pub const GRPC_STATUS: (u64, u64) = (0, 16);
    pub const ACCESS_LOG_SAMPLE: Span = Span::open_closed(0.0, 1.0);
}

/// A range of real numbers, each end open or closed; never contains NaN or infinities.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    lo: f64,
    lo_open: bool,
    hi: f64,
    hi_open: bool,
}

impl Span {
    const fn open(lo: f64, hi: f64) -> Self {
        Span {
            lo,
            lo_open: true,
            hi,
            hi_open: true,
        }
    }
    const fn open_closed(lo: f64, hi: f64) -> Self {
        Span {
            lo,
            lo_open: true,
            hi,
            hi_open: false,
        }
    }
    const fn closed_open(lo: f64, hi: f64) -> Self {
        Span {
            lo,
            lo_open: false,
            hi,
            hi_open: true,
        }
    }
    pub(crate) fn contains(&self, x: f64) -> bool {
        x.is_finite()
            && if self.lo_open {
                x > self.lo
            } else {
                x >= self.lo
            }
            && if self.hi_open {
                x < self.hi
            } else {
                x <= self.hi
            }
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}{}, {}{}",
            if self.lo_open { '(' } else { '[' },
            self.lo,
            self.hi,
            if self.hi_open { ')' } else { ']' }
        )
    }
}

/// A closed range of durations.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DurSpan {
    pub min: Duration,
    pub max: Duration,
}

impl DurSpan {
    const fn new(min: Duration, max: Duration) -> Self {
        DurSpan { min, max }
    }
    pub(crate) fn contains(&self, d: Duration) -> bool {
        d >= self.min && d <= self.max
    }
}

impl std::fmt::Display for DurSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "between {} and {}",
            short_duration(self.min),
            short_duration(self.max)
        )
    }
}

/// `250ms`, `5s`, `2m`, `24h`, `7d`: the largest unit that divides `d` exactly.
pub(crate) fn short_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return if d.is_zero() {
            "0s".into()
        } else {
            format!("{}ns", d.as_nanos())
        };
    }
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return format!("{}us", d.as_micros());
    }
    // Days only from two on: "24h" reads better than "1d".
    for (unit, len, from) in [
        ("d", 86_400_000, 2),
        ("h", 3_600_000, 1),
        ("m", 60_000, 1),
        ("s", 1000, 1),
    ] {
        if ms.is_multiple_of(len) && ms >= len * from {
            return format!("{}{unit}", ms / len);
        }
    }
    format!("{ms}ms")
}

struct Problems {
    list: Vec<Problem>,
}

impl Problems {
    fn at<T>(&mut self, loc: &Located<T>, key: impl Into<String>, message: impl Into<String>) {
        self.list.push(Problem {
            line: loc.line,
            column: loc.column,
            key: key.into(),
            message: message.into(),
        });
    }

    fn nowhere(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.list.push(Problem {
            line: 0,
            column: 0,
            key: key.into(),
            message: message.into(),
        });
    }

    /// The duration written at `v` (or `default` when absent), which must lie in `span`.
    fn duration(
        &mut self,
        v: &Option<Located<String>>,
        key: &str,
        default: Duration,
        span: DurSpan,
    ) -> Duration {
        match v {
            None => default,
            Some(l) => self.located_duration(l, key, default, span),
        }
    }

    fn located_duration(
        &mut self,
        l: &Located<String>,
        key: &str,
        default: Duration,
        span: DurSpan,
    ) -> Duration {
        match parse_duration(&l.value) {
            Ok(d) if span.contains(d) => d,
            Ok(_) => {
                self.at(
                    l,
                    key,
                    format!("{} is out of range: must be {span}", l.value.trim()),
                );
                default
            }
            Err(e) => {
                self.at(l, key, e);
                default
            }
        }
    }

    /// The number at `l`, which must lie in `span`; `example` shows a sensible value.
    fn number(&mut self, l: &Located<f64>, key: &str, span: Span, example: &str) -> f64 {
        if !span.contains(l.value) {
            self.at(
                l,
                key,
                format!(
                    "{:?} is out of range: must be a number in {span}, e.g. {example}",
                    l.value
                ),
            );
        }
        l.value
    }

    /// The integer at `l`, which must lie in `range.0..=range.1`.
    fn integer<T: Copy + Into<u64>>(&mut self, l: &Located<T>, key: &str, range: (u64, u64)) -> T {
        let v: u64 = l.value.into();
        if v < range.0 || v > range.1 {
            self.at(
                l,
                key,
                format!(
                    "{v} is out of range: must be an integer from {} to {}",
                    range.0, range.1
                ),
            );
        }
        l.value
    }

    fn header_name<T>(&mut self, loc: &Located<T>, name: &str, key: &str) -> Option<HeaderName> {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.at(loc, key, format!("invalid header name {name:?}"));
                None
            }
        }
    }
}

/// `250ms`, `5s`, `2m`, `1h`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?} ({e}); write e.g. 250ms, 5s, 2m"))
}

/// `1024`, `64KiB`, `10MiB`, `1GiB` (also KB/MB/GB as powers of 1000).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}; write e.g. 64KiB, 10MiB"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(format!("invalid size unit in {s:?}; use B, KiB, MiB, GiB")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

fn is_toml(origin: &Path) -> bool {
    origin
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("toml"))
}

pub(super) fn parse_and_validate(text: &str, origin: &Path) -> Result<Config, ConfigError> {
    // serde_path_to_error names the key (`routes[0].bogus`) next to the parser's location.
    let mut key = String::new();
    let file: FileConfig = if is_toml(origin) {
        let de = toml::Deserializer::parse(text).map_err(|e| toml_error(text, origin, "", &e))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            toml_error(text, origin, &key, &e.into_inner())
        })?
    } else {
        serde_saphyr::with_deserializer_from_str(text, |de| {
            serde_path_to_error::deserialize(de).map_err(|e| {
                // `Located<T>` deserializes through `Spanned { value, .. }`: drop that hop.
                key = e
                    .path()
                    .to_string()
                    .split('.')
                    .filter(|seg| *seg != "value")
                    .collect::<Vec<_>>()
                    .join(".");
                e.into_inner()
            })
        })
        .map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            // The error's Display carries a snippet and repeats the location; keep the
            // message only, the location is printed in front.
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("invalid YAML");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            let first = match first.strip_prefix("line ") {
                Some(rest) => rest.split_once(": ").map_or(first, |(_, m)| m),
                None => first,
            };
            let key = if key == "." { "" } else { key.as_str() };
            ConfigError::single(origin, line, column, key, first.to_string())
        })?
    };
    let hash = content_hash(text.as_bytes());
    validate(file, origin, hash)
}

fn toml_error(text: &str, origin: &Path, key: &str, e: &toml::de::Error) -> ConfigError {
    let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
    let key = if key == "." { "" } else { key };
    ConfigError::single(origin, line, column, key, e.message().to_string())
}

fn line_col(text: &str, offset: usize) -> (u64, u64) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() as u64 + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) as u64 + 1;
    (line, col)
}

/// `sha256:<hex>` of a config file's bytes: [`Config::hash`].
pub fn content_hash(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn socket_addr(p: &mut Problems, l: &Located<String>, key: &str) -> Option<SocketAddr> {
    match l.value.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            p.at(
                l,
                key,
                format!(
                    "invalid address {:?}; write IP:PORT, e.g. 127.0.0.1:8080",
                    l.value
                ),
            );
            None
        }
    }
}

fn relative(base: &Path, p: &str) -> PathBuf {
    let path = PathBuf::from(p);
    if path.is_absolute() {
        path
    } else {
        base.parent().map_or(path.clone(), |d| d.join(&path))
    }
}

fn validate(f: FileConfig, origin: &Path, hash: String) -> Result<Config, ConfigError> {
    let mut p = Problems { list: Vec::new() };

    let listen = socket_addr(&mut p, &f.listen, "listen");
    let admin_listen = match &f.admin.listen {
        Some(l) => socket_addr(&mut p, l, "admin.listen"),
        None => Some(SocketAddr::from(([127, 0, 0, 1], 9901))),
    };
    if let (Some(a), None) = (admin_listen, &f.admin.token_file) {
        if !a.ip().is_loopback() {
            let key = "admin.listen";
            let msg = format!(
                "the admin API on non-loopback address {a} needs admin.token_file: without a token anyone who can reach it could roll versions back"
            );
            match &f.admin.listen {
                Some(l) => p.at(l, key, msg),
                None => p.nowhere(key, msg),
            }
        }
    }
    let document = serde_json::to_value(&f).unwrap_or_default();
    let health_listen = f
        .health_listen
        .as_ref()
        .and_then(|l| socket_addr(&mut p, l, "health_listen"));
    let admin_hosts = admin_hosts(&mut p, &f.admin.hosts);
    let drain_timeout = p.duration(
        &f.drain_timeout,
        "drain_timeout",
        Duration::from_secs(25),
        bounds::DRAIN_TIMEOUT,
    );
    let max_in_flight = f.max_in_flight.as_ref().map_or(10_000, |l| {
        p.integer(l, "max_in_flight", bounds::MAX_IN_FLIGHT)
    });
    let max_in_flight = usize::try_from(max_in_flight).unwrap_or(usize::MAX);
    let tls = f.tls.as_ref().map(|t| TlsFiles {
        cert: relative(origin, &t.value.cert),
        key: relative(origin, &t.value.key),
    });

    let mut versions = Vec::new();
    if f.versions.is_empty() {
        p.nowhere("versions", "at least one version is required");
    }
    for (name, v) in &f.versions {
        if let Some(vc) = version(&mut p, origin, name, v) {
            versions.push(vc);
        }
    }
    let known: BTreeSet<&str> = f.versions.keys().map(String::as_str).collect();

    let mut routes = Vec::new();
    if f.routes.is_empty() {
        p.nowhere("routes", "at least one route is required");
    }
    let mut route_names = BTreeSet::new();
    for (i, r) in f.routes.iter().enumerate() {
        // Compared as stored (trimmed): the API, overrides and state are keyed by it.
        if !route_names.insert(r.value.name.value.trim().to_string()) {
            p.at(
                &r.value.name,
                format!("routes[{i}].name"),
                format!("duplicate route name {:?}", r.value.name.value),
            );
        }
        if let Some(rc) = route(&mut p, i, &r.value, &known) {
            routes.push(rc);
        }
    }

    let pin_header = match &f.pin.header {
        None => Some(HeaderName::from_static("x-rollgate-version")),
        Some(l) => {
            let v = l.value.clone();
            p.header_name(l, &v, "pin.header")
        }
    };

    let ev = &f.evaluator;
    let interval = p.duration(
        &ev.interval,
        "evaluator.interval",
        Duration::from_millis(100),
        bounds::INTERVAL,
    );
    let window = p.duration(
        &ev.window,
        "evaluator.window",
        Duration::from_secs(30),
        DurSpan::new(Duration::ZERO, bounds::WINDOW_MAX),
    );
    // Compared with defaults filled in: a window shorter than the default interval is as
    // wrong as one shorter than a written interval.
    if window <= interval {
        match (&ev.window, &ev.interval) {
            (Some(w), _) => p.at(w, "evaluator.window", "window must be longer than interval"),
            (None, Some(i)) => p.at(
                i,
                "evaluator.interval",
                "interval must be shorter than window",
            ),
            (None, None) => {}
        }
    }
    let min_requests = ev.min_requests.as_ref().map_or(50, |l| {
        p.integer(l, "evaluator.min_requests", bounds::MIN_REQUESTS)
    });
    let confidence = ev.confidence.as_ref().map_or(0.99, |l| {
        p.number(l, "evaluator.confidence", bounds::CONFIDENCE, "0.99")
    });
    let r = &ev.rules;
    let number =
        |p: &mut Problems, v: &Option<Located<f64>>, key: &str, span: Span, example: &str| {
            v.as_ref()
                .map(|l| p.number(l, &format!("evaluator.rules.{key}"), span, example))
        };
    let rules = Rules {
        error_rate_ratio: number(
            &mut p,
            &r.error_rate_ratio,
            "error_rate_ratio",
            bounds::RATIO,
            "2.0",
        ),
        // 0 is no floor at all, as null is: one meaning, settled here.
        min_error_rate: number(
            &mut p,
            &r.min_error_rate,
            "min_error_rate",
            bounds::MIN_ERROR_RATE,
            "0.005",
        )
        .filter(|m| *m > 0.0),
        error_rate_max: number(
            &mut p,
            &r.error_rate_max,
            "error_rate_max",
            bounds::FRACTION,
            "0.05",
        ),
        latency_p99_max: r.latency_p99_max.as_ref().map(|l| {
            p.located_duration(
                l,
                "evaluator.rules.latency_p99_max",
                Duration::from_millis(500),
                bounds::LATENCY_P99_MAX,
            )
        }),
        latency_p99_ratio: number(
            &mut p,
            &r.latency_p99_ratio,
            "latency_p99_ratio",
            bounds::RATIO,
            "1.5",
        ),
        health_failures: r.health_failures.as_ref().map(|l| {
            p.integer(
                l,
                "evaluator.rules.health_failures",
                bounds::HEALTH_FAILURES,
            )
        }),
        accuracy_drop: number(
            &mut p,
            &r.accuracy_drop,
            "accuracy_drop",
            bounds::FRACTION,
            "0.05",
        ),
        drift: r.drift.as_ref().and_then(|d| {
            let s = &d.value.signal;
            let signal = if let Some(h) = s.strip_prefix("header:") {
                HeaderName::from_bytes(h.as_bytes())
                    .ok()
                    .map(Signal::Header)
            } else if let Some(k) = s.strip_prefix("json:") {
                (!k.is_empty()).then(|| Signal::Json(k.into()))
            } else {
                None
            };
            // Deprecated (the sequential test ignores them) but still range-checked, so a
            // file that loads today means the same if they come back.
            let p_value = d.value.p_value.as_ref().map_or(0.05, |l| {
                p.number(
                    l,
                    "evaluator.rules.drift.p_value",
                    bounds::DRIFT_P_VALUE,
                    "0.05",
                )
            });
            let consecutive = d.value.consecutive.as_ref().map_or(3, |l| {
                p.integer(
                    l,
                    "evaluator.rules.drift.consecutive",
                    bounds::DRIFT_CONSECUTIVE,
                )
            });
            let Some(signal) = signal else {
                p.at(
                    d,
                    "evaluator.rules.drift.signal",
                    "signal must be header:NAME (a valid header name) or json:FIELD",
                );
                return None;
            };
            Some(DriftRule {
                signal,
                p_value,
                consecutive,
            })
        }),
        safety_violations: r.safety_violations.as_ref().and_then(|s| {
            let per = p.located_duration(
                &s.value.per,
                "evaluator.rules.safety_violations.per",
                Duration::from_secs(3600),
                bounds::SAFETY_PER,
            );
            let max = p.integer(
                &s.value.max,
                "evaluator.rules.safety_violations.max",
                bounds::SAFETY_MAX,
            );
            let header = p.header_name(
                s,
                &s.value.header,
                "evaluator.rules.safety_violations.header",
            )?;
            Some(SafetyRule { header, max, per })
        }),
    };

    let webhooks = f
        .alerts
        .webhooks
        .iter()
        .enumerate()
        .filter_map(|(i, w)| {
            if !(w.value.url.starts_with("http://") || w.value.url.starts_with("https://")) {
                p.at(
                    w,
                    format!("alerts.webhooks[{i}].url"),
                    "webhook url must be http:// or https://",
                );
                return None;
            }
            Some(Webhook {
                url: w.value.url.clone(),
                min_severity: w.value.min_severity.unwrap_or_default(),
            })
        })
        .collect();

    let fleet = f.fleet.as_ref().and_then(|l| fleet(&mut p, l, origin));
    let access_log = f
        .access_log
        .as_ref()
        .and_then(|l| access_log(&mut p, l, origin));

    if !p.list.is_empty() {
        return Err(ConfigError {
            file: origin.to_path_buf(),
            problems: p.list,
        });
    }
    let (Some(listen), Some(admin_listen), Some(pin_header)) = (listen, admin_listen, pin_header)
    else {
        unreachable!("a missing value always records a problem");
    };
    Ok(Config {
        source: origin.to_path_buf(),
        hash,
        document: Arc::new(document),
        listen,
        tls,
        admin: AdminConfig {
            listen: admin_listen,
            token_file: f.admin.token_file.as_ref().map(|t| relative(origin, t)),
            hosts: admin_hosts,
        },
        health_listen,
        state_dir: relative(origin, &f.state_dir),
        drain_timeout,
        max_in_flight,
        versions,
        routes,
        pin: PinConfig {
            header: pin_header,
            quarantined: f.pin.quarantined.unwrap_or_default(),
            unknown: f.pin.unknown.unwrap_or_default(),
        },
        evaluator: EvaluatorConfig {
            interval,
            window,
            min_requests,
            confidence,
            rules,
        },
        alerts: AlertsConfig { webhooks },
        fleet,
        access_log,
    })
}

/// The `access_log:` block: `stdout`, `stderr` or a file in an existing directory, and a
/// sample rate in (0, 1]. The file is not opened here: `check` creates nothing.
fn access_log(
    p: &mut Problems,
    l: &Located<FileAccessLog>,
    origin: &Path,
) -> Option<AccessLogConfig> {
    let f = &l.value;
    let sample = f.sample.as_ref().map_or(1.0, |s| {
        p.number(s, "access_log.sample", bounds::ACCESS_LOG_SAMPLE, "0.1")
    });
    let path = match &f.path {
        None => AccessLogPath::Stdout,
        Some(lp) => {
            let written = lp.value.trim();
            match written {
                "stdout" => AccessLogPath::Stdout,
                "stderr" => AccessLogPath::Stderr,
                "" => {
                    p.at(
                        lp,
                        "access_log.path",
                        "path must not be empty: write stdout, stderr or a file path",
                    );
                    return None;
                }
                _ => {
                    let path = relative(origin, written);
                    let dir = match path.parent() {
                        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                        _ => PathBuf::from("."),
                    };
                    if path.is_dir() {
                        p.at(
                            lp,
                            "access_log.path",
                            format!("{} is a directory, not a file", path.display()),
                        );
                        return None;
                    }
                    if !dir.is_dir() {
                        p.at(
                            lp,
                            "access_log.path",
                            format!(
                                "directory {} does not exist (write stdout, stderr or a file in an existing directory)",
                                dir.display()
                            ),
                        );
                        return None;
                    }
                    AccessLogPath::File(path)
                }
            }
        }
    };
    Some(AccessLogConfig { path, sample })
}

/// The `fleet:` block: a store URL the client accepts, a fleet name usable inside a key,
/// and this replica's name (from the file, else the environment).
fn fleet(p: &mut Problems, l: &Located<FileFleet>, origin: &Path) -> Option<FleetConfig> {
    let f = &l.value;
    let store = f.store.value.trim();
    // Quoted without its password: the error goes to the log, the API and audit records.
    let shown = super::redact_url(store);
    let scheme_ok = store.starts_with("redis://") || store.starts_with("rediss://");
    if !scheme_ok {
        p.at(
            &f.store,
            "fleet.store",
            format!(
                "{shown:?} is not a store URL: write redis://host:6379/0 (or rediss:// for TLS)"
            ),
        );
    } else if let Err(e) = redis::Client::open(store) {
        p.at(
            &f.store,
            "fleet.store",
            format!("{shown:?} is not a valid Redis URL: {e}"),
        );
    }
    let name = f.name.value.trim();
    if name.is_empty()
        || name.len() > bounds::FLEET_NAME_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        p.at(
            &f.name,
            "fleet.name",
            format!(
                "{name:?} is not a fleet name: 1 to {} letters, digits, '.', '_' or '-'",
                bounds::FLEET_NAME_LEN
            ),
        );
    }
    let replica = match &f.replica {
        Some(r) => r.value.trim().to_string(),
        None => default_replica(),
    };
    if replica.is_empty()
        || replica.len() > bounds::ADMIN_HOST_LEN
        || replica.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        let msg = format!(
            "{replica:?} is not a replica name: 1 to {} printable characters without spaces",
            bounds::ADMIN_HOST_LEN
        );
        match &f.replica {
            Some(r) => p.at(r, "fleet.replica", msg),
            None => p.at(
                l,
                "fleet.replica",
                format!(
                    "{msg} (from $ROLLGATE_REPLICA, $POD_NAME or the hostname; set fleet.replica)"
                ),
            ),
        }
    }
    (scheme_ok && p.list.is_empty()).then(|| FleetConfig {
        store: store.to_string(),
        password_file: f.password_file.as_ref().map(|t| relative(origin, t)),
        name: name.to_string(),
        replica,
        pool: f.pool.unwrap_or(true),
    })
}

/// This replica's default name: `$ROLLGATE_REPLICA`, else `$POD_NAME`, else the hostname.
fn default_replica() -> String {
    ["ROLLGATE_REPLICA", "POD_NAME", "HOSTNAME"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `admin.hosts`: DNS names without a port, lowercased, duplicates dropped.
fn admin_hosts(p: &mut Problems, hosts: &[Located<String>]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let name = h.value.trim().to_ascii_lowercase();
        if let Err(why) = dns_name(&name) {
            p.at(
                h,
                format!("admin.hosts[{i}]"),
                format!(
                    "{:?} is not a host name: {why} (write a DNS name without port, e.g. rollgate-admin.ml)",
                    h.value
                ),
            );
            continue;
        }
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// Why `name` (lowercase) is not a DNS host name, if it is not one.
fn dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".into());
    }
    if name.len() > bounds::ADMIN_HOST_LEN {
        return Err(format!(
            "it is longer than {} characters",
            bounds::ADMIN_HOST_LEN
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.'))
    {
        let port = name
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        return Err(if c == ':' && port {
            "a port is not part of a host name".into()
        } else {
            format!("{c:?} is not allowed (only letters, digits, '-' and '.')")
        });
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("it has an empty label (a leading, trailing or double '.')".into());
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} is longer than 63 characters"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with '-'"));
        }
    }
    Ok(())
}

fn version(
    p: &mut Problems,
    origin: &Path,
    name: &str,
    v: &Located<FileVersion>,
) -> Option<VersionConfig> {
    let key = format!("versions.{name}");
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        p.at(
            v,
            &key,
            "version names use letters, digits, '.', '_' and '-'",
        );
    }
    let fv = &v.value;
    if fv.endpoints.is_empty() {
        p.at(
            v,
            format!("{key}.endpoints"),
            "at least one endpoint is required",
        );
    }
    let mut endpoints = Vec::new();
    for (i, e) in fv.endpoints.iter().enumerate() {
        match endpoint(&e.value) {
            Ok(ep) => endpoints.push(ep),
            Err(msg) => p.at(e, format!("{key}.endpoints[{i}]"), msg),
        }
    }
    let mut set_headers = Vec::new();
    for (h, val) in &fv.set_headers {
        let k = format!("{key}.set_headers.{h}");
        let Some(hn) = p.header_name(val, h, &k) else {
            continue;
        };
        if crate::proxy::headers::is_hop_by_hop(&hn)
            || hn == http::header::HOST
            || hn == http::header::CONTENT_LENGTH
        {
            p.at(val, &k, format!("{h} cannot be set per version"));
            continue;
        }
        match HeaderValue::from_str(&val.value) {
            Ok(hv) => set_headers.push((hn, hv)),
            Err(_) => p.at(val, &k, "invalid header value"),
        }
    }
    let health_check = fv.health_check.as_ref().map(|h| {
        let hk = format!("{key}.health_check");
        if !h.value.path.starts_with('/') {
            p.at(h, format!("{hk}.path"), "path must start with /");
        }
        HealthCheckConfig {
            path: h.value.path.clone(),
            interval: p.duration(
                &h.value.interval,
                &format!("{hk}.interval"),
                Duration::from_secs(5),
                bounds::HEALTH_INTERVAL,
            ),
            timeout: p.duration(
                &h.value.timeout,
                &format!("{hk}.timeout"),
                Duration::from_secs(1),
                bounds::HEALTH_TIMEOUT,
            ),
            unhealthy_after: h.value.unhealthy_after.as_ref().map_or(3, |l| {
                p.integer(l, &format!("{hk}.unhealthy_after"), bounds::HEALTH_STREAK)
            }),
            healthy_after: h.value.healthy_after.as_ref().map_or(2, |l| {
                p.integer(l, &format!("{hk}.healthy_after"), bounds::HEALTH_STREAK)
            }),
        }
    });
    let ca_file = fv.ca_file.as_ref().map(|c| relative(origin, &c.value));
    if let (Some(path), Some(l)) = (&ca_file, &fv.ca_file) {
        if !path.exists() {
            p.at(
                l,
                format!("{key}.ca_file"),
                format!("{} does not exist", path.display()),
            );
        }
    }

    // Fingerprint: endpoints + bundle + injected headers, in a canonical order.
    let mut h = Sha256::new();
    for e in &fv.endpoints {
        h.update(e.value.as_bytes());
        h.update(b"\n");
    }
    h.update(b"--bundle\n");
    for (k, val) in &fv.bundle {
        h.update(format!("{k}={val}\n").as_bytes());
    }
    h.update(b"--headers\n");
    for (k, val) in &fv.set_headers {
        h.update(format!("{}={}\n", k.to_ascii_lowercase(), val.value).as_bytes());
    }
    let fingerprint = hex(&h.finalize()[..8]);

    Some(VersionConfig {
        name: VersionName::from(name),
        endpoints,
        bundle: fv.bundle.clone(),
        last_verified: fv.last_verified.clone(),
        set_headers,
        health_check,
        ca_file,
        fingerprint,
    })
}

fn endpoint(url: &str) -> Result<Endpoint, String> {
    let (scheme, rest) = if let Some(r) = url.strip_prefix("http://") {
        (EndpointScheme::Http, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (EndpointScheme::Https, r)
    } else if let Some(r) = url.strip_prefix("h2c://") {
        (EndpointScheme::H2c, r)
    } else {
        return Err(format!(
            "endpoint {url:?} must start with http://, https:// or h2c://"
        ));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('?') || rest.contains('@') {
        return Err(format!(
            "endpoint {url:?} must be scheme://host:port with no path or credentials"
        ));
    }
    let authority: Authority = rest
        .parse()
        .map_err(|_| format!("endpoint {url:?} has an invalid host:port"))?;
    if authority.host().is_empty() {
        return Err(format!("endpoint {url:?} has no host"));
    }
    Ok(Endpoint {
        scheme,
        authority,
        url: url.to_string(),
    })
}

fn route(p: &mut Problems, i: usize, r: &FileRoute, known: &BTreeSet<&str>) -> Option<RouteConfig> {
    let key = format!("routes[{i}]");
    let name = r.name.value.trim().to_string();
    if name.is_empty() {
        p.at(
            &r.name,
            format!("{key}.name"),
            "route name must not be empty",
        );
    }
    let check_known = |p: &mut Problems, l: &Located<String>, k: &str| {
        if !known.contains(l.value.as_str()) {
            p.at(
                l,
                k,
                format!("unknown version {:?} (not under versions:)", l.value),
            );
        }
    };
    check_known(p, &r.baseline, &format!("{key}.baseline"));
    let mut split: BTreeMap<String, u32> = BTreeMap::new();
    let mut total: u64 = 0;
    for (v, w) in &r.split.value {
        if !known.contains(v.as_str()) {
            p.at(
                &r.split,
                format!("{key}.split.{v}"),
                format!("unknown version {v:?} (not under versions:)"),
            );
        }
        if *w > bounds::WEIGHT_MAX {
            p.at(
                &r.split,
                format!("{key}.split.{v}"),
                format!("weight {w} must be at most {}", bounds::WEIGHT_MAX),
            );
        }
        total += u64::from(*w);
        split.insert(v.clone(), *w);
    }
    if r.split.value.is_empty() || total == 0 {
        p.at(
            &r.split,
            format!("{key}.split"),
            "weights must sum to more than 0",
        );
    } else if total > bounds::ROUTE_WEIGHT_TOTAL {
        // The routing table sums a route's weights in a u32.
        p.at(
            &r.split,
            format!("{key}.split"),
            format!(
                "weights sum to {total}; they must sum to at most {}",
                bounds::ROUTE_WEIGHT_TOTAL
            ),
        );
    }
    split.entry(r.baseline.value.clone()).or_insert(0);
    if let Some(fb) = &r.fallback {
        check_known(p, fb, &format!("{key}.fallback"));
        if fb.value == r.baseline.value {
            p.at(
                fb,
                format!("{key}.fallback"),
                "fallback must differ from the baseline",
            );
        }
    }

    let m = &r.matcher;
    let mut headers = Vec::new();
    for (h, v) in &m.headers {
        let k = format!("{key}.match.headers.{h}");
        let Some(hn) = p.header_name(v, h, &k) else {
            continue;
        };
        match HeaderValue::from_str(&v.value) {
            Ok(hv) => headers.push((hn, hv)),
            Err(_) => p.at(v, &k, "invalid header value"),
        }
    }
    if let Some(pp) = &m.path_prefix {
        if !pp.starts_with('/') {
            p.at(
                &r.name,
                format!("{key}.match.path_prefix"),
                "path_prefix must start with /",
            );
        }
    }

    let sticky = r
        .sticky
        .as_ref()
        .and_then(|s| match (&s.value.header, &s.value.cookie) {
            (Some(h), None) => p
                .header_name(s, h, &format!("{key}.sticky.header"))
                .map(StickyKey::Header),
            (None, Some(c)) if !c.is_empty() => Some(StickyKey::Cookie(c.clone())),
            _ => {
                p.at(
                    s,
                    format!("{key}.sticky"),
                    "set exactly one of header or cookie",
                );
                None
            }
        });
    let shadow = r.shadow.as_ref().map(|s| {
        if !known.contains(s.value.version.as_str()) {
            p.at(
                s,
                format!("{key}.shadow.version"),
                format!("unknown version {:?}", s.value.version),
            );
        }
        let percent = p.integer(
            &s.value.percent,
            &format!("{key}.shadow.percent"),
            bounds::SHADOW_PERCENT,
        );
        ShadowConfig {
            version: VersionName::from(s.value.version.as_str()),
            percent,
        }
    });
    let rollout = r.rollout.as_ref().map(|ro| {
        let steps = &ro.value.steps;
        let increasing = steps.windows(2).all(|w| w[0] < w[1]);
        // The first step must leave the baseline some traffic: a hold is clean only with
        // evidence from both sides, and a candidate alone at 100 % could never show it.
        if steps.is_empty()
            || !increasing
            || steps.iter().any(|s| *s == 0 || *s > 100)
            || steps[0] >= 100
        {
            p.at(
                ro,
                format!("{key}.rollout.steps"),
                "steps must be strictly increasing percentages, each from 1 to 100, the first below 100 (the candidate is held next to the baseline before it is promoted)",
            );
        }
        RolloutConfig {
            steps: steps.clone(),
            hold: p.located_duration(
                &ro.value.hold,
                &format!("{key}.rollout.hold"),
                Duration::from_secs(300),
                bounds::ROLLOUT_HOLD,
            ),
        }
    });
    let t = &r.timeouts;
    let mut timeout = |l: &Option<Located<String>>, n: &str, default: u64| {
        p.duration(
            l,
            &format!("{key}.timeouts.{n}"),
            Duration::from_secs(default),
            bounds::TIMEOUT,
        )
    };
    let timeouts = Timeouts {
        connect: timeout(&t.connect, "connect", 2),
        first_byte: timeout(&t.first_byte, "first_byte", 60),
        idle: timeout(&t.idle, "idle", 60),
    };
    let retry = RetryConfig {
        budget_percent: r.retry.budget_percent.as_ref().map_or(20, |l| {
            p.integer(
                l,
                &format!("{key}.retry.budget_percent"),
                bounds::RETRY_BUDGET_PERCENT,
            )
        }),
        min_per_second: r.retry.min_per_second.as_ref().map_or(10, |l| {
            p.integer(
                l,
                &format!("{key}.retry.min_per_second"),
                bounds::RETRY_MIN_PER_SECOND,
            )
        }),
        non_idempotent: r.retry.non_idempotent.unwrap_or(true),
    };
    let max_request_body = match &r.max_request_body {
        None => 10 << 20,
        Some(l) => match parse_size(&l.value) {
            Ok(n) if n <= bounds::MAX_REQUEST_BODY => n,
            Ok(_) => {
                p.at(
                    l,
                    format!("{key}.max_request_body"),
                    format!("{} is out of range: must be at most 1GiB", l.value.trim()),
                );
                10 << 20
            }
            Err(e) => {
                p.at(l, format!("{key}.max_request_body"), e);
                10 << 20
            }
        },
    };

    let grpc_fault_codes = match &r.grpc_fault_codes {
        None => DEFAULT_GRPC_FAULT_CODES,
        Some(codes) => codes.iter().enumerate().fold(0u32, |mask, (j, c)| {
            let code = p.integer(
                c,
                &format!("{key}.grpc_fault_codes[{j}]"),
                bounds::GRPC_STATUS,
            );
            if u64::from(code) <= bounds::GRPC_STATUS.1 {
                mask | (1 << code)
            } else {
                mask
            }
        }),
    };

    Some(RouteConfig {
        name: Arc::from(name.as_str()),
        owner: r.owner.clone(),
        matcher: MatchConfig {
            path_prefix: m.path_prefix.clone(),
            host: m.host.as_ref().map(|h| h.to_ascii_lowercase()),
            headers,
            models: m.model.clone(),
        },
        baseline: VersionName::from(r.baseline.value.as_str()),
        split: split
            .into_iter()
            .map(|(v, w)| (VersionName::from(v.as_str()), Weight(w)))
            .collect(),
        sticky,
        shadow,
        rollout,
        fallback: r
            .fallback
            .as_ref()
            .map(|f| VersionName::from(f.value.as_str())),
        timeouts,
        retry,
        max_request_body,
        grpc_fault_codes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_are_quoted_without_their_password() {
        for (url, shown) in [
            ("redis://:pw@host:6379/0", "redis://***@host:6379/0"),
            ("rediss://user:p@ss@host/0", "rediss://***@host/0"),
            ("user:pw@host:6379", "***@host:6379"),
            ("redis://host:6379/0", "redis://host:6379/0"),
            ("", ""),
            ("redis://:pa/ss@host/0", "redis://***@host/0"),
            ("redis://u:p@[::1]:6379/0", "redis://***@[::1]:6379/0"),
            ("redis://[::1]:6379", "redis://[::1]:6379"),
            // An `@` in the query is not the host's.
            (
                "redis://cache.internal:6379/0?client=a@b",
                "redis://cache.internal:6379/0?client=a@b",
            ),
            // Unix sockets carry the password in the query.
            (
                "redis+unix:///run/redis.sock?db=0&pass=hunter2",
                "redis+unix:///run/redis.sock?db=0&pass=***",
            ),
            (
                "unix:///s.sock?PASSWORD=x&db=1",
                "unix:///s.sock?PASSWORD=***&db=1",
            ),
            (
                "rediss://:pw@h:1/0?protocol=resp3#f",
                "rediss://***@h:1/0?protocol=resp3#f",
            ),
        ] {
            assert_eq!(super::super::redact_url(url), shown, "{url}");
        }
    }

    const MINIMAL: &str = "versions:\n  a: {endpoints: [http://127.0.0.1:1]}\n  b: {endpoints: [http://127.0.0.1:2]}\nroutes:\n  - name: r\n    baseline: a\n    split: {a: 90, b: 10}\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_str(MINIMAL, Path::new("t.yaml")).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9901");
        assert_eq!(c.evaluator.interval, Duration::from_millis(100));
        assert_eq!(c.evaluator.rules.error_rate_ratio, Some(2.0));
        assert_eq!(c.routes[0].max_request_body, 10 << 20);
        assert_eq!(c.routes[0].split.len(), 2);
        assert!(c.hash.starts_with("sha256:"));
    }

    #[test]
    fn unknown_key_is_located() {
        let text = MINIMAL.replace("    split:", "    splt: {a: 1}\n    split:");
        let e = Config::from_str(&text, Path::new("t.yaml")).unwrap_err();
        let p = &e.problems[0];
        assert_eq!(p.line, 7, "{e}");
        assert!(p.message.contains("splt"), "{e}");
    }

    #[test]
    fn unknown_version_in_split_names_line_and_key() {
        let text = MINIMAL.replace("{a: 90, b: 10}", "{a: 90, c: 10}");
        let e = Config::from_str(&text, Path::new("t.yaml")).unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("t.yaml:7:"), "{s}");
        assert!(s.contains("routes[0].split.c"), "{s}");
    }

    #[test]
    fn rule_set_to_null_is_off() {
        let text = format!("{MINIMAL}evaluator:\n  rules: {{error_rate_ratio: null}}\n");
        let c = Config::from_str(&text, Path::new("t.yaml")).unwrap();
        assert_eq!(c.evaluator.rules.error_rate_ratio, None);
        assert_eq!(c.evaluator.rules.error_rate_max, Some(0.05));
    }

    #[test]
    fn bad_values_are_all_reported() {
        let text = MINIMAL.replace("http://127.0.0.1:2", "ftp://x").replace(
            "split: {a: 90, b: 10}",
            "split: {a: 0, b: 0}\n    timeouts: {connect: 5 parsecs}",
        );
        let e = Config::from_str(&text, Path::new("t.yaml")).unwrap_err();
        assert_eq!(e.problems.len(), 3, "{e}");
    }

    #[test]
    fn toml_is_accepted_by_extension() {
        let text = "[versions.a]\nendpoints = [\"http://127.0.0.1:1\"]\n[[routes]]\nname = \"r\"\nbaseline = \"a\"\nsplit = {a = 1}\n";
        let c = Config::from_str(text, Path::new("t.toml")).unwrap();
        assert_eq!(c.routes[0].baseline.as_str(), "a");
        let e = Config::from_str("[versions.a]\nendpoints = 3\n", Path::new("t.toml")).unwrap_err();
        assert_eq!(e.problems[0].line, 2, "{e}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert!(parse_size("10 parsecs").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    }

    /// Line of MINIMAL's route body (`split:`): a route key appended goes on line 8.
    const ROUTE_LINE: u64 = 8;

    /// The one problem `text` has; panics if it validates or has several.
    fn only_problem(text: &str) -> Problem {
        let e = Config::from_str(text, Path::new("t.yaml"))
            .err()
            .unwrap_or_else(|| panic!("accepted:\n{text}"));
        assert_eq!(e.problems.len(), 1, "{e}");
        e.problems[0].clone()
    }

    fn accepted(text: &str) -> Config {
        Config::from_str(text, Path::new("t.yaml")).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    /// `MINIMAL` plus one top-level line (on line 8).
    fn top(line: &str) -> String {
        format!("{MINIMAL}{line}\n")
    }

    /// `MINIMAL` plus one key of its route (on line 8).
    fn route_key(line: &str) -> String {
        format!("{MINIMAL}    {line}\n")
    }

    /// `MINIMAL` with a health check on version `a` (line 2).
    fn health_check(hc: &str) -> String {
        MINIMAL.replace(
            "a: {endpoints: [http://127.0.0.1:1]}",
            &format!("a: {{endpoints: [http://127.0.0.1:1], health_check: {{path: /h, {hc}}}}}"),
        )
    }

    /// Every bound, just outside: rejected, at the value's line, under its key.
    #[test]
    fn every_number_out_of_range_is_located() {
        let cases: Vec<(String, u64, &str)> = vec![
            (top("drain_timeout: 2h"), 8, "drain_timeout"),
            (top("max_in_flight: 0"), 8, "max_in_flight"),
            (top("max_in_flight: 10000001"), 8, "max_in_flight"),
            (top("evaluator: {interval: 5ms}"), 8, "evaluator.interval"),
            (
                top("evaluator: {interval: 2h, window: 3h}"),
                8,
                "evaluator.interval",
            ),
            (top("evaluator: {window: 25h}"), 8, "evaluator.window"),
            (
                top("evaluator: {interval: 1s, window: 1s}"),
                8,
                "evaluator.window",
            ),
            (
                top("evaluator: {min_requests: 0}"),
                8,
                "evaluator.min_requests",
            ),
            (
                top("evaluator: {min_requests: 1000000001}"),
                8,
                "evaluator.min_requests",
            ),
            (
                top("evaluator: {confidence: 0.5}"),
                8,
                "evaluator.confidence",
            ),
            (
                top("evaluator: {confidence: 1.0}"),
                8,
                "evaluator.confidence",
            ),
            (
                top("evaluator: {confidence: 0.9999999}"),
                8,
                "evaluator.confidence",
            ),
            (
                top("evaluator: {confidence: .nan}"),
                8,
                "evaluator.confidence",
            ),
            (
                top("evaluator: {rules: {error_rate_ratio: 1.0}}"),
                8,
                "evaluator.rules.error_rate_ratio",
            ),
            (
                top("evaluator: {rules: {error_rate_ratio: 1001}}"),
                8,
                "evaluator.rules.error_rate_ratio",
            ),
            (
                top("evaluator: {rules: {error_rate_ratio: .inf}}"),
                8,
                "evaluator.rules.error_rate_ratio",
            ),
            (
                top("evaluator: {rules: {min_error_rate: -0.1}}"),
                8,
                "evaluator.rules.min_error_rate",
            ),
            (
                top("evaluator: {rules: {min_error_rate: 1}}"),
                8,
                "evaluator.rules.min_error_rate",
            ),
            (
                top("evaluator: {rules: {error_rate_max: 0}}"),
                8,
                "evaluator.rules.error_rate_max",
            ),
            (
                top("evaluator: {rules: {error_rate_max: 1}}"),
                8,
                "evaluator.rules.error_rate_max",
            ),
            (
                top("evaluator: {rules: {latency_p99_max: 0s}}"),
                8,
                "evaluator.rules.latency_p99_max",
            ),
            (
                top("evaluator: {rules: {latency_p99_max: 2h}}"),
                8,
                "evaluator.rules.latency_p99_max",
            ),
            (
                top("evaluator: {rules: {latency_p99_ratio: 1e20}}"),
                8,
                "evaluator.rules.latency_p99_ratio",
            ),
            (
                top("evaluator: {rules: {latency_p99_ratio: 0.5}}"),
                8,
                "evaluator.rules.latency_p99_ratio",
            ),
            (
                top("evaluator: {rules: {health_failures: 0}}"),
                8,
                "evaluator.rules.health_failures",
            ),
            (
                top("evaluator: {rules: {health_failures: 1001}}"),
                8,
                "evaluator.rules.health_failures",
            ),
            (
                top("evaluator: {rules: {accuracy_drop: 0}}"),
                8,
                "evaluator.rules.accuracy_drop",
            ),
            (
                top("evaluator: {rules: {accuracy_drop: 1}}"),
                8,
                "evaluator.rules.accuracy_drop",
            ),
            (
                top("evaluator: {rules: {drift: {signal: 'header:x-s', p_value: 1}}}"),
                8,
                "evaluator.rules.drift.p_value",
            ),
            (
                top("evaluator: {rules: {drift: {signal: 'header:x-s', consecutive: 0}}}"),
                8,
                "evaluator.rules.drift.consecutive",
            ),
            (
                top("evaluator: {rules: {drift: {signal: 'json:s', consecutive: 1001}}}"),
                8,
                "evaluator.rules.drift.consecutive",
            ),
            (
                top(
                    "evaluator: {rules: {safety_violations: {header: x-f, max: 1000001, per: 1h}}}",
                ),
                8,
                "evaluator.rules.safety_violations.max",
            ),
            (
                top("evaluator: {rules: {safety_violations: {header: x-f, max: 5, per: 0s}}}"),
                8,
                "evaluator.rules.safety_violations.per",
            ),
            (
                top("evaluator: {rules: {safety_violations: {header: x-f, max: 5, per: 8d}}}"),
                8,
                "evaluator.rules.safety_violations.per",
            ),
            (
                route_key("timeouts: {connect: 0s}"),
                ROUTE_LINE,
                "routes[0].timeouts.connect",
            ),
            (
                route_key("timeouts: {first_byte: 25h}"),
                ROUTE_LINE,
                "routes[0].timeouts.first_byte",
            ),
            (
                route_key("timeouts: {idle: 0ms}"),
                ROUTE_LINE,
                "routes[0].timeouts.idle",
            ),
            (
                route_key("retry: {budget_percent: 101}"),
                ROUTE_LINE,
                "routes[0].retry.budget_percent",
            ),
            (
                route_key("retry: {min_per_second: 100001}"),
                ROUTE_LINE,
                "routes[0].retry.min_per_second",
            ),
            (
                route_key("max_request_body: 2GiB"),
                ROUTE_LINE,
                "routes[0].max_request_body",
            ),
            (
                route_key("grpc_fault_codes: [2, 17]"),
                ROUTE_LINE,
                "routes[0].grpc_fault_codes[1]",
            ),
            (top("access_log: {sample: 0}"), 8, "access_log.sample"),
            (top("access_log: {sample: 1.01}"), 8, "access_log.sample"),
            (top("access_log: {sample: .nan}"), 8, "access_log.sample"),
            (
                route_key("shadow: {version: b, percent: 101}"),
                ROUTE_LINE,
                "routes[0].shadow.percent",
            ),
            (
                route_key("rollout: {steps: [5, 50], hold: 0s}"),
                ROUTE_LINE,
                "routes[0].rollout.hold",
            ),
            (
                route_key("rollout: {steps: [5, 50], hold: 8d}"),
                ROUTE_LINE,
                "routes[0].rollout.hold",
            ),
            (
                route_key("rollout: {steps: [5, 5, 50], hold: 1m}"),
                ROUTE_LINE,
                "routes[0].rollout.steps",
            ),
            (
                route_key("rollout: {steps: [0, 50], hold: 1m}"),
                ROUTE_LINE,
                "routes[0].rollout.steps",
            ),
            (
                route_key("rollout: {steps: [50, 101], hold: 1m}"),
                ROUTE_LINE,
                "routes[0].rollout.steps",
            ),
            (
                health_check("interval: 0s"),
                2,
                "versions.a.health_check.interval",
            ),
            (
                health_check("interval: 2h"),
                2,
                "versions.a.health_check.interval",
            ),
            (
                health_check("timeout: 0s"),
                2,
                "versions.a.health_check.timeout",
            ),
            (
                health_check("timeout: 2h"),
                2,
                "versions.a.health_check.timeout",
            ),
            (
                health_check("unhealthy_after: 0"),
                2,
                "versions.a.health_check.unhealthy_after",
            ),
            (
                health_check("healthy_after: 0"),
                2,
                "versions.a.health_check.healthy_after",
            ),
            (
                health_check("healthy_after: 1001"),
                2,
                "versions.a.health_check.healthy_after",
            ),
            (
                MINIMAL.replace("{a: 90, b: 10}", "{a: 1000001, b: 10}"),
                7,
                "routes[0].split.a",
            ),
            (
                MINIMAL.replace("{a: 90, b: 10}", "{a: 0, b: 0}"),
                7,
                "routes[0].split",
            ),
        ];
        for (text, line, key) in cases {
            let p = only_problem(&text);
            assert_eq!((p.key.as_str(), p.line), (key, line), "{p:?}\n{text}");
            assert!(p.column > 0, "{p:?}");
        }
    }

    /// Every bound, just inside (and every default): accepted.
    #[test]
    fn every_number_at_its_bounds_is_accepted() {
        for text in [
            top("drain_timeout: 0s"),
            top("drain_timeout: 1h"),
            top("max_in_flight: 1"),
            top("max_in_flight: 10000000"),
            top("evaluator: {interval: 10ms, window: 20ms}"),
            top("evaluator: {interval: 1h, window: 24h}"),
            top("evaluator: {min_requests: 1}"),
            top("evaluator: {min_requests: 1000000000}"),
            top("evaluator: {confidence: 0.51}"),
            top("evaluator: {confidence: 0.999999}"),
            top("evaluator: {rules: {error_rate_ratio: 1.0001, latency_p99_ratio: 1000}}"),
            top("evaluator: {rules: {min_error_rate: 0, error_rate_max: 0.999}}"),
            top("evaluator: {rules: {min_error_rate: 0.999, accuracy_drop: 0.001}}"),
            top("evaluator: {rules: {latency_p99_max: 1ms, health_failures: 1}}"),
            top("evaluator: {rules: {latency_p99_max: 1h, health_failures: 1000}}"),
            top("evaluator: {rules: {drift: {signal: 'json:s', p_value: 0.999, consecutive: 1000}}}"),
            top("evaluator: {rules: {safety_violations: {header: x-f, max: 0, per: 1s}}}"),
            top("evaluator: {rules: {safety_violations: {header: x-f, max: 1000000, per: 7d}}}"),
            route_key("timeouts: {connect: 1ms, first_byte: 24h, idle: 1ms}"),
            route_key("retry: {budget_percent: 0, min_per_second: 0}"),
            route_key("retry: {budget_percent: 100, min_per_second: 100000}"),
            route_key("max_request_body: 1GiB"),
            route_key("max_request_body: 0"),
            route_key("grpc_fault_codes: [0, 16]"),
            route_key("grpc_fault_codes: []"),
            top("access_log: {sample: 1}"),
            top("access_log: {sample: 0.000001}"),
            route_key("shadow: {version: b, percent: 0}"),
            route_key("shadow: {version: b, percent: 100}"),
            route_key("rollout: {steps: [1, 100], hold: 1ms}"),
            route_key("rollout: {steps: [99, 100], hold: 7d}"),
            health_check("interval: 10ms, timeout: 1ms, unhealthy_after: 1, healthy_after: 1"),
            health_check("interval: 1h, timeout: 1h, unhealthy_after: 1000, healthy_after: 1000"),
        ] {
            accepted(&text);
        }
    }

    #[test]
    fn a_route_total_weight_fits_the_routing_table() {
        let names: Vec<String> = (0..1001).map(|i| format!("v{i}")).collect();
        let mut text = String::from("versions:\n");
        for n in &names {
            text.push_str(&format!("  {n}: {{endpoints: [http://127.0.0.1:1]}}\n"));
        }
        let split: Vec<String> = names.iter().map(|n| format!("{n}: 1000000")).collect();
        text.push_str(&format!(
            "routes:\n  - name: r\n    baseline: v0\n    split: {{{}}}\n",
            split.join(", ")
        ));
        let p = only_problem(&text);
        assert_eq!((p.key.as_str(), p.line), ("routes[0].split", 1006), "{p:?}");
        assert!(p.message.contains("at most 1000000000"), "{p:?}");
        accepted(&text.replace(", v1000: 1000000", ""));
    }

    #[test]
    fn out_of_range_messages_say_the_range() {
        let p = only_problem(&top("evaluator: {rules: {latency_p99_ratio: 1e20}}"));
        assert_eq!(
            p.message,
            "1e20 is out of range: must be a number in (1, 1000], e.g. 1.5"
        );
        let p = only_problem(&top("evaluator: {rules: {health_failures: 0}}"));
        assert_eq!(
            p.message,
            "0 is out of range: must be an integer from 1 to 1000"
        );
        let p = only_problem(&route_key("rollout: {steps: [5], hold: 8d}"));
        assert!(!p.message.contains("first below"), "{p:?}");
        let p = only_problem(&route_key("rollout: {steps: [100], hold: 1m}"));
        assert!(p.message.contains("first below 100"), "{p:?}");
        let p = only_problem(&route_key("rollout: {steps: [5], hold: 8d}"));
        assert_eq!(p.message, "8d is out of range: must be between 1ms and 7d");
        let p = only_problem(&top("evaluator: {window: 25h}"));
        assert_eq!(p.message, "25h is out of range: must be between 0s and 24h");
    }

    #[test]
    fn toml_numbers_are_bounded_too() {
        let text = "[versions.a]\nendpoints = [\"http://127.0.0.1:1\"]\n[[routes]]\nname = \"r\"\nbaseline = \"a\"\nsplit = {a = 1}\n[evaluator.rules]\nhealth_failures = 0\n";
        let e = Config::from_str(text, Path::new("t.toml")).unwrap_err();
        assert_eq!(e.problems[0].key, "evaluator.rules.health_failures", "{e}");
        let ok = text.replace("health_failures = 0", "health_failures = 2");
        let c = Config::from_str(&ok, Path::new("t.toml")).unwrap();
        assert_eq!(c.evaluator.rules.health_failures, Some(2));
    }

    #[test]
    fn min_error_rate_defaults_to_half_a_percent_and_null_disables_it() {
        assert_eq!(
            accepted(MINIMAL).evaluator.rules.min_error_rate,
            Some(0.005)
        );
        let c = accepted(&top("evaluator: {rules: {min_error_rate: null}}"));
        assert_eq!(c.evaluator.rules.min_error_rate, None);
        let c = accepted(&top("evaluator: {rules: {min_error_rate: 0.02}}"));
        assert_eq!(c.evaluator.rules.min_error_rate, Some(0.02));
        let c = accepted(&top("evaluator: {rules: {min_error_rate: 0}}"));
        assert_eq!(c.evaluator.rules.min_error_rate, None, "0 is no floor");
    }

    #[test]
    fn deprecated_drift_keys_are_kept() {
        let c = accepted(&top(
            "evaluator: {rules: {drift: {signal: 'header:x-s', p_value: 0.01, consecutive: 5}}}",
        ));
        let d = c.evaluator.rules.drift.unwrap();
        assert_eq!((d.p_value, d.consecutive), (0.01, 5));
        let d = accepted(&top("evaluator: {rules: {drift: {signal: 'json:s'}}}"))
            .evaluator
            .rules
            .drift
            .unwrap();
        assert_eq!((d.p_value, d.consecutive), (0.05, 3));
    }

    #[test]
    fn admin_hosts_are_dns_names_lowercased() {
        let c = accepted(&top(
            "admin: {hosts: [Rollgate-Admin.ML, rollgate-admin.ml, gw-1.internal, localhost]}",
        ));
        assert_eq!(
            c.admin.hosts,
            ["rollgate-admin.ml", "gw-1.internal", "localhost"]
        );
        assert!(accepted(MINIMAL).admin.hosts.is_empty());
        let long_label = "a".repeat(64);
        let too_long = vec!["abcdefghi"; 26].join(".");
        assert_eq!(too_long.len(), 259);
        for (bad, why) in [
            ("rollgate-admin.ml:9901", "port"),
            ("''", "empty"),
            ("a..b", "empty label"),
            ("example.com.", "empty label"),
            ("-x.example", "starts or ends with '-'"),
            ("a_b.example", "not allowed"),
            ("http://x", "not allowed"),
            (long_label.as_str(), "longer than 63"),
            (too_long.as_str(), "longer than 253"),
        ] {
            let p = only_problem(&top(&format!("admin: {{hosts: [ok.example, {bad}]}}")));
            assert_eq!(
                (p.key.as_str(), p.line),
                ("admin.hosts[1]", 8),
                "{bad}: {p:?}"
            );
            assert!(p.message.contains(why), "{bad}: {}", p.message);
        }
    }

    #[test]
    fn grpc_fault_codes_compile_to_a_bitmask() {
        let c = accepted(MINIMAL);
        assert_eq!(c.routes[0].grpc_fault_codes, DEFAULT_GRPC_FAULT_CODES);
        for code in [2, 4, 13, 14, 15] {
            assert!(c.routes[0].is_grpc_fault(code), "{code}");
        }
        for code in [0, 1, 3, 5, 12, 16, 17, 99] {
            assert!(!c.routes[0].is_grpc_fault(code), "{code}");
        }
        let c = accepted(&route_key("grpc_fault_codes: [0, 16, 16]"));
        assert_eq!(c.routes[0].grpc_fault_codes, 1 | 1 << 16);
        let c = accepted(&route_key("grpc_fault_codes: []"));
        assert_eq!(c.routes[0].grpc_fault_codes, 0);
        let p = only_problem(&route_key("grpc_fault_codes: [-1]"));
        assert!(p.key.starts_with("routes[0].grpc_fault_codes"), "{p:?}");
    }

    #[test]
    fn access_log_defaults_and_paths() {
        assert_eq!(accepted(MINIMAL).access_log, None);
        assert_eq!(accepted(&top("access_log: null")).access_log, None);
        let a = accepted(&top("access_log: {}")).access_log.unwrap();
        assert_eq!((a.path, a.sample), (AccessLogPath::Stdout, 1.0));
        let a = accepted(&top("access_log: {path: stderr, sample: 0.25}"))
            .access_log
            .unwrap();
        assert_eq!((a.path, a.sample), (AccessLogPath::Stderr, 0.25));
        let dir = std::env::temp_dir();
        let origin = dir.join("rollgate.yaml");
        let c = Config::from_str(&top("access_log: {path: access.log}"), &origin).unwrap();
        assert_eq!(
            c.access_log.unwrap().path,
            AccessLogPath::File(dir.join("access.log"))
        );
        for (bad, why) in [
            ("", "must not be empty"),
            ("/nonexistent-rollgate-dir/a.log", "does not exist"),
            (dir.to_str().unwrap(), "is a directory"),
        ] {
            let p = only_problem(&top(&format!("access_log: {{path: '{bad}'}}")));
            assert_eq!((p.key.as_str(), p.line), ("access_log.path", 8), "{p:?}");
            assert!(p.message.contains(why), "{bad}: {}", p.message);
        }
        let p = only_problem(&top("access_log: {path: stdout, format: json}"));
        assert!(p.message.contains("format"), "{p:?}");
    }

    #[test]
    fn short_durations() {
        assert_eq!(short_duration(Duration::ZERO), "0s");
        assert_eq!(short_duration(Duration::from_millis(10)), "10ms");
        assert_eq!(short_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(short_duration(Duration::from_secs(90)), "90s");
        assert_eq!(short_duration(Duration::from_secs(3600)), "1h");
        assert_eq!(short_duration(Duration::from_secs(86_400)), "24h");
        assert_eq!(short_duration(Duration::from_secs(7 * 86_400)), "7d");
    }
}
